//! Console sessions: a random 256-bit id in an `HttpOnly; SameSite=Strict` cookie, mapped in
//! the store (collection `console_session`, keyed by the id's SHA-256, never the id) to the
//! token's name, a fingerprint of its digest, a CSRF token and an expiry. Kept in the store
//! so every replica behind one load balancer knows every session; the raw API token is kept
//! nowhere.

use axum::http::{header, HeaderMap};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::super::{ApiState, Caller};
use crate::store::StoreError;
use crate::time::now_millis;

/// The cookie's name.
pub const COOKIE: &str = "dinghook_console";

/// How long a session lasts from its sign-in (a working day); then the token is asked again.
pub const LIFETIME_SECONDS: i64 = 8 * 3600;

/// The store's collection of sessions.
pub const COLLECTION: &str = "console_session";

/// One signed-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// The token the session was opened with, as the configuration defines it now.
    pub caller: Caller,
    /// The token every form of this session carries.
    pub csrf: String,
    /// The store key (the id's digest).
    key: String,
    stored: Stored,
}

/// What the store keeps of a session.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    /// The token's name (as the audit shows it).
    token: String,
    /// [`Caller::session_fingerprint`]: the token is known again by it, never kept itself.
    fingerprint: String,
    csrf: String,
    created_at: i64,
    /// Epoch ms; at or after it the session is over (sign-out sets it to 0).
    expires_at: i64,
}

/// 256 random bits, in hex.
pub fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn key(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

/// Opens a session for `caller`; returns the id to set in the cookie.
pub async fn open(state: &ApiState, caller: &Caller) -> Result<(String, Session), StoreError> {
    let id = random_hex();
    let now = now_millis();
    let stored = Stored {
        token: caller.name().to_owned(),
        fingerprint: caller.session_fingerprint(),
        csrf: random_hex(),
        created_at: now,
        expires_at: now + LIFETIME_SECONDS * 1000,
    };
    let key = key(&id);
    let body = serde_json::to_value(&stored).unwrap_or_default();
    state
        .store
        .put_document(COLLECTION, &key, &body, now)
        .await?;
    Ok((
        id,
        Session {
            caller: caller.clone(),
            csrf: stored.csrf.clone(),
            key,
            stored,
        },
    ))
}

/// The session the request's cookie names, when it exists, has not expired and its token is
/// still configured as it was.
pub async fn load(state: &ApiState, headers: &HeaderMap) -> Result<Option<Session>, StoreError> {
    let Some(id) = cookie(headers, COOKIE) else {
        return Ok(None);
    };
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let key = key(id);
    let Some(document) = state.store.get_document(COLLECTION, &key).await? else {
        return Ok(None);
    };
    let Ok(stored) = serde_json::from_value::<Stored>(document.body) else {
        return Ok(None);
    };
    if stored.expires_at <= now_millis() {
        return Ok(None);
    }
    let Some(caller) = state
        .tokens
        .session_caller(&stored.token, &stored.fingerprint)
    else {
        return Ok(None);
    };
    Ok(Some(Session {
        caller,
        csrf: stored.csrf.clone(),
        key,
        stored,
    }))
}

/// Ends `session` (the store has no delete for documents: it is kept, expired).
pub async fn close(state: &ApiState, session: &Session) -> Result<(), StoreError> {
    let now = now_millis();
    let stored = Stored {
        expires_at: 0,
        ..session.stored.clone()
    };
    let body = serde_json::to_value(&stored).unwrap_or_default();
    state
        .store
        .put_document(COLLECTION, &session.key, &body, now)
        .await
}

/// A cookie's value from the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim())
}

/// The `Set-Cookie` value for session `id` (`Secure` when the browser reached us over TLS).
pub fn set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={LIFETIME_SECONDS}{}",
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_read_by_name_and_written_strict() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            "lang=zh; dinghook_console=abc ".parse().unwrap(),
        );
        assert_eq!(cookie(&headers, COOKIE), Some("abc"));
        assert_eq!(cookie(&headers, "lang"), Some("zh"));
        assert_eq!(cookie(&headers, "other"), None);
        let set = set_cookie("abc", false);
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"));
        assert!(set.contains("Path=/console") && set.contains("Max-Age=28800"));
        assert!(!set.contains("Secure"));
        assert!(set_cookie("abc", true).ends_with("; Secure"));
        assert!(clear_cookie(false).contains("Max-Age=0"));
        let a = random_hex();
        assert_eq!(a.len(), 64);
        assert_ne!(a, random_hex());
        assert_ne!(key(&a), a);
    }
}
