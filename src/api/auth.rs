//! Bearer tokens: each with a name, scopes and the apps it may touch. Only SHA-256 digests
//! are kept in memory; a presented token is hashed and compared with every digest in
//! constant time, so neither timing nor the answer tells one token from another.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::problem::Problem;
use crate::secret::Secret;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read events, deliveries, routes, apps and actions.
    Read,
    /// Replay events and deliveries.
    Replay,
    /// Submit actions.
    Act,
    /// Pause and resume routes.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Replay, Scope::Act, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Replay => "replay",
            Scope::Act => "act",
            Scope::Admin => "admin",
        }
    }
}

/// `[[api.tokens]]`: one token. Give the token's SHA-256 (hex) or a file holding the token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who uses it (shown in the audit log, never the token).
    pub name: String,
    /// The token's SHA-256, 64 hex digits (`printf %s "$TOKEN" | sha256sum`).
    #[serde(default)]
    pub sha256: Option<String>,
    /// A file holding the token itself (a mounted secret).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    pub scopes: Vec<Scope>,
    /// The apps it may touch; `["*"]` (the default): every app.
    #[serde(default = "every_app")]
    pub apps: Vec<String>,
}

fn every_app() -> Vec<String> {
    vec!["*".to_owned()]
}

/// The name of the token `DINGHOOK_API_TOKEN` (`api.token`) gives.
pub const ENV_TOKEN_NAME: &str = "api.token";

/// One usable token.
#[derive(Debug)]
pub struct ApiToken {
    pub name: String,
    digest: [u8; 32],
    pub scopes: Vec<Scope>,
    /// `None`: every app.
    pub apps: Option<Vec<String>>,
}

impl ApiToken {
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    pub fn may_touch(&self, app: &str) -> bool {
        self.apps
            .as_ref()
            .is_none_or(|apps| apps.iter().any(|a| a == app))
    }
}

/// A token configuration problem: the key at fault and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TokenConfigError {
    pub key: String,
    pub message: String,
}

fn bad(key: String, message: impl Into<String>) -> TokenConfigError {
    TokenConfigError {
        key,
        message: message.into(),
    }
}

/// The configured tokens.
#[derive(Debug, Default, Clone)]
pub struct Tokens(Arc<Vec<ApiToken>>);

impl Tokens {
    /// Resolves `api.token` and `[[api.tokens]]` (reading token files); `apps` are the
    /// configured app names, which a token's `apps` must be among.
    pub fn resolve(
        env_token: &Secret,
        configured: &[TokenConfig],
        apps: &[&str],
    ) -> Result<Tokens, TokenConfigError> {
        let mut tokens = Vec::new();
        if !env_token.is_empty() {
            if env_token.expose().len() < MIN_TOKEN_LEN {
                return Err(bad(
                    "api.token".into(),
                    format!("too short: use at least {MIN_TOKEN_LEN} characters"),
                ));
            }
            tokens.push(ApiToken {
                name: ENV_TOKEN_NAME.to_owned(),
                digest: digest(env_token.expose()),
                scopes: Scope::ALL.to_vec(),
                apps: None,
            });
        }
        for (i, token) in configured.iter().enumerate() {
            let key = |field: &str| format!("api.tokens[{i}].{field}");
            if token.name.trim().is_empty() {
                return Err(bad(key("name"), "must not be empty"));
            }
            if tokens.iter().any(|t| t.name == token.name) {
                return Err(bad(key("name"), format!("{:?} is used twice", token.name)));
            }
            let digest = match (&token.sha256, &token.token_file) {
                (Some(hex_digest), None) => {
                    let bytes = hex::decode(hex_digest.trim())
                        .ok()
                        .and_then(|b| <[u8; 32]>::try_from(b).ok())
                        .ok_or_else(|| bad(key("sha256"), "must be 64 hex digits (SHA-256)"))?;
                    bytes
                }
                (None, Some(path)) => {
                    let text = std::fs::read_to_string(path).map_err(|e| {
                        bad(
                            key("token_file"),
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?;
                    let text = text.trim();
                    if text.len() < MIN_TOKEN_LEN {
                        return Err(bad(
                            key("token_file"),
                            format!(
                                "the token is too short: use at least {MIN_TOKEN_LEN} characters"
                            ),
                        ));
                    }
                    digest(text)
                }
                _ => return Err(bad(key("sha256"), "give sha256 or token_file, one of them")),
            };
            if token.scopes.is_empty() {
                return Err(bad(
                    key("scopes"),
                    "give at least one of read, replay, act, admin",
                ));
            }
            let every = token.apps.iter().any(|a| a == "*");
            if !every {
                if token.apps.is_empty() {
                    return Err(bad(key("apps"), "give app names, or \"*\" for every app"));
                }
                if let Some(unknown) = token.apps.iter().find(|a| !apps.contains(&a.as_str())) {
                    return Err(bad(key("apps"), format!("no app is called {unknown:?}")));
                }
            }
            tokens.push(ApiToken {
                name: token.name.clone(),
                digest,
                scopes: token.scopes.clone(),
                apps: (!every).then(|| token.apps.clone()),
            });
        }
        Ok(Tokens(Arc::new(tokens)))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The token an `Authorization` header carries, or 401 (missing, malformed or unknown:
    /// one answer for all three).
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Caller, Problem> {
        let presented = authorization
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| {
                let (scheme, token) = h.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(Problem::unauthorized)?;
        self.authenticate_token(presented)
    }

    /// The token itself (as the console's sign-in form gives it), or 401.
    pub fn authenticate_token(&self, presented: &str) -> Result<Caller, Problem> {
        if presented.is_empty() {
            return Err(Problem::unauthorized());
        }
        let presented = digest(presented);
        // Every digest is compared, whichever matches.
        let mut found = None;
        for (i, token) in self.0.iter().enumerate() {
            if bool::from(token.digest.ct_eq(&presented)) {
                found = Some(i);
            }
        }
        let index = found.ok_or_else(Problem::unauthorized)?;
        Ok(Caller {
            tokens: self.clone(),
            index,
        })
    }

    /// The caller a console session stands for: the token still configured under `name` whose
    /// [`Caller::session_fingerprint`] is `fingerprint` (compared in constant time). A token
    /// removed or changed since the sign-in ends its sessions; its scopes and apps are the
    /// configuration's now, not those of the sign-in.
    pub fn session_caller(&self, name: &str, fingerprint: &str) -> Option<Caller> {
        let index = self.0.iter().position(|t| t.name == name)?;
        let caller = Caller {
            tokens: self.clone(),
            index,
        };
        bool::from(
            caller
                .session_fingerprint()
                .as_bytes()
                .ct_eq(fingerprint.as_bytes()),
        )
        .then_some(caller)
    }
}

/// Tokens shorter than this are refused: a bearer token has to resist guessing.
pub const MIN_TOKEN_LEN: usize = 16;

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    tokens: Tokens,
    index: usize,
}

impl Caller {
    pub fn token(&self) -> &ApiToken {
        &self.tokens.0[self.index]
    }

    pub fn name(&self) -> &str {
        &self.token().name
    }

    /// What a console session keeps to know its token again: a digest of the token's
    /// digest, so neither the token nor the digest the configuration holds is in the store.
    pub fn session_fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"dinghook console session\0");
        h.update(self.token().digest);
        hex::encode(h.finalize())
    }

    /// The token's place among the configured tokens (its rate-limit bucket).
    pub fn index(&self) -> usize {
        self.index
    }

    /// 403 unless the token has `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), Problem> {
        if self.token().has(scope) {
            Ok(())
        } else {
            Err(Problem::forbidden(format!(
                "this token lacks the {} scope",
                scope.as_str()
            )))
        }
    }

    /// 403 unless the token may touch `app`.
    pub fn app(&self, app: &str) -> Result<(), Problem> {
        if self.token().may_touch(app) {
            Ok(())
        } else {
            Err(Problem::forbidden(format!(
                "this token may not touch app {app:?}"
            )))
        }
    }

    /// The one app a token limited to exactly one app may touch.
    pub fn only_app(&self) -> Option<&str> {
        match self.token().apps.as_deref() {
            Some([one]) => Some(one),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        let configured = vec![TokenConfig {
            name: "reader".into(),
            sha256: Some(hex::encode(digest("reader-token-0123456789"))),
            token_file: None,
            scopes: vec![Scope::Read],
            apps: vec!["ops".into()],
        }];
        Tokens::resolve(
            &Secret::new("env-token-0123456789"),
            &configured,
            &["ops", "hr"],
        )
        .unwrap()
    }

    #[test]
    fn tokens_are_told_apart_by_their_digest() {
        let tokens = tokens();
        let env = tokens
            .authenticate(Some(b"Bearer env-token-0123456789"))
            .unwrap();
        assert_eq!(env.name(), ENV_TOKEN_NAME);
        assert!(env.require(Scope::Admin).is_ok());
        assert!(env.app("hr").is_ok());
        let reader = tokens
            .authenticate(Some(b"bearer  reader-token-0123456789 "))
            .unwrap();
        assert_eq!(reader.name(), "reader");
        assert!(reader.require(Scope::Act).is_err());
        assert!(reader.app("hr").is_err());
        assert_eq!(reader.only_app(), Some("ops"));
        for header in [
            None,
            Some(&b"Bearer"[..]),
            Some(b"Basic env-token-0123456789"),
            Some(b"Bearer wrong-token-0123456789"),
            Some(b"Bearer \xff"),
        ] {
            let problem = tokens.authenticate(header).unwrap_err();
            assert_eq!(problem.status, 401);
        }
    }

    #[test]
    fn bad_token_settings_name_the_key() {
        let base = TokenConfig {
            name: "x".into(),
            sha256: Some("00".repeat(32)),
            token_file: None,
            scopes: vec![Scope::Read],
            apps: every_app(),
        };
        let cases = [
            (
                TokenConfig {
                    sha256: Some("abc".into()),
                    ..base.clone()
                },
                "api.tokens[0].sha256",
            ),
            (
                TokenConfig {
                    sha256: None,
                    ..base.clone()
                },
                "api.tokens[0].sha256",
            ),
            (
                TokenConfig {
                    scopes: vec![],
                    ..base.clone()
                },
                "api.tokens[0].scopes",
            ),
            (
                TokenConfig {
                    apps: vec!["nope".into()],
                    ..base.clone()
                },
                "api.tokens[0].apps",
            ),
        ];
        for (token, key) in cases {
            let err = Tokens::resolve(&Secret::default(), &[token], &["ops"]).unwrap_err();
            assert_eq!(err.key, key, "{err}");
        }
        let short = Tokens::resolve(&Secret::new("short"), &[], &[]).unwrap_err();
        assert_eq!(short.key, "api.token");
    }
}
