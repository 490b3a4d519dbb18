//! POST /dingtalk/callback without the HTTP: query string + body → signature → replay window →
//! decryption (current key, then the previous one) → owner key → envelope → stored event, through
//! `sources::push::open_request`, the function the handler calls. Then what the dispatcher does with a
//! stored payload: `Event::decode`.
//!
//! Input: the first byte picks a mode, the rest is data.
//! - even first byte: a raw request. The bytes up to the first `\n` are the query string, the
//!   rest is the body. Bit 1 turns the replay window on (one hour around `NOW_MS`).
//! - odd first byte: a *validly signed* request whose encrypted plaintext is the rest of the
//!   input, so the fuzzer spends its time in decryption and JSON instead of on the signature.
//!   The other bits vary what a real sender varies (key, owner key, timestamp, spellings).
//!
//! Checked: nothing panics; a signed request gets exactly the answer its plaintext calls for;
//! every accepted request had a valid signature; an accepted event re-sealed and re-opened is
//! the same event; the dispatcher's decoding agrees with the envelope on the type.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use dinghook::crypto::{signature, verify_signature, AesKey, CallbackCipher, CryptoError};
use dinghook::event::{Envelope, EnvelopeError, Event};
use dinghook::sources::push::{
    check_timestamp, encrypt_field, open_request, Opened, Rejection, SignedQuery,
};
use dinghook::store::Source;
use libfuzzer_sys::fuzz_target;

/// The public development keys of `config/dev.toml`.
const TOKEN: &str = "dinghook-dev-token";
const AES_KEY: &str = "DEVONLYdinghookLocalTestingKeyNotForProdXyz";
const OWNER_KEY: &str = "dingdevappkey";
/// A previous key still accepted for decryption: the published V1 test vector's key, so a
/// request sealed for it takes the rotation path.
const PREVIOUS_KEY: &str = "4g5j64qlyl3zvetqxz5jiocdr586fn2zvjpa8zls3ij";

/// The clock the target runs at (2023-11-14), and the window when it is on.
const NOW_MS: i64 = 1_700_000_000_000;
const WINDOW: Duration = Duration::from_secs(3600);

struct Keys {
    cipher: CallbackCipher,
    current: AesKey,
    previous: AesKey,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys {
    cipher: CallbackCipher::from_strings(TOKEN, AES_KEY, &[PREVIOUS_KEY.to_owned()], OWNER_KEY)
        .expect("the development keys parse"),
    current: AesKey::parse(AES_KEY).expect("the development key parses"),
    previous: AesKey::parse(PREVIOUS_KEY).expect("the V1 key parses"),
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        raw(mode, rest);
    } else {
        signed(mode, rest);
    }
});

/// What the handler does after reading the body.
fn run(query: &str, body: &[u8], window: Duration) -> Result<Opened, Rejection> {
    let signed = SignedQuery::parse(Some(query))?;
    open_request(&KEYS.cipher, &signed, body, window, NOW_MS)
}

fn raw(mode: u8, rest: &[u8]) {
    let (query, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let query = String::from_utf8_lossy(query);
    let window = if mode & 2 != 0 {
        WINDOW
    } else {
        Duration::ZERO
    };
    let result = run(&query, body, window);
    if result.is_ok() {
        // Nothing is accepted that a correct signature, timestamp and body did not allow.
        let signed = SignedQuery::parse(Some(&query)).expect("accepted, so the query parsed");
        let encrypt = encrypt_field(body).expect("accepted, so the body had encrypt");
        assert!(check_timestamp(&signed.timestamp, window, NOW_MS).is_ok());
        assert_eq!(
            verify_signature(
                TOKEN,
                &signed.timestamp,
                &signed.nonce,
                &encrypt,
                &signed.signature
            ),
            Ok(())
        );
    }
    check(result);
}

fn signed(mode: u8, plaintext: &[u8]) {
    let use_previous = mode & 0b10 != 0;
    let owner: &[u8] = match (mode >> 2) & 0b11 {
        0 | 1 => OWNER_KEY.as_bytes(),
        2 => b"suiteotherkey",
        _ => b"",
    };
    let seconds = mode & 0b1_0000 != 0;
    let stale = mode & 0b10_0000 != 0;
    let other_spelling = mode & 0b100_0000 != 0;
    let padded_body = mode & 0b1000_0000 != 0;

    // A fixed random prefix keeps every run of an input the same.
    let key = if use_previous {
        &KEYS.previous
    } else {
        &KEYS.current
    };
    let Ok(encrypt) = key.encrypt_with_random(plaintext, owner, b"fuzzfuzzfuzzfuzz") else {
        return;
    };
    let base = if stale {
        NOW_MS - 2 * 3_600_000
    } else {
        NOW_MS - 1_000
    };
    let timestamp = if seconds {
        (base / 1000).to_string()
    } else {
        base.to_string()
    };
    let nonce = "fuzznonce";
    let mut sig = signature(TOKEN, &timestamp, nonce, &encrypt);
    let query = if other_spelling {
        sig.make_ascii_uppercase();
        format!("signature={sig}&timeStamp={timestamp}&nonce={nonce}&extra=1")
    } else {
        format!("msg_signature={sig}&signature=ignored&timestamp={timestamp}&nonce={nonce}")
    };
    let body = if padded_body {
        format!(" {{ \"other\": [1, {{}}], \"encrypt\" : \"{encrypt}\" }}\n")
    } else {
        format!("{{\"encrypt\":\"{encrypt}\"}}")
    };
    let result = run(&query, body.as_bytes(), WINDOW);

    // The answer the plaintext calls for.
    if stale {
        assert!(
            matches!(result, Err(Rejection::TimestampOutOfWindow { .. })),
            "{result:?}"
        );
    } else if owner != OWNER_KEY.as_bytes() {
        // Under the current key the mismatch is what is reported; under the previous key the
        // current key's own failure comes first.
        match &result {
            Err(Rejection::Crypto(CryptoError::OwnerKeyMismatch { .. })) => {}
            Err(Rejection::Crypto(_)) if use_previous => {}
            other => panic!("wrong owner key accepted or misreported: {other:?}"),
        }
    } else {
        match (Envelope::parse(plaintext), &result) {
            (Err(expected), Err(Rejection::InvalidEvent(got))) => assert_eq!(&expected, got),
            (Ok((envelope, _)), Ok(Opened::Check(got))) => {
                assert!(envelope.is_check());
                assert_eq!(&envelope, got);
            }
            (Ok((envelope, _)), Ok(Opened::Event(event))) => {
                assert!(!envelope.is_check());
                assert_eq!(event.payload.as_bytes(), plaintext);
                assert_eq!(event.event_type, envelope.event_type);
                assert_eq!(event.corp_id, envelope.corp_id);
                assert_eq!(event.dedup_key, envelope.dedup_key(plaintext));
            }
            (Ok(_), Err(Rejection::InvalidEvent(EnvelopeError::NotJson(_)))) => {
                assert!(std::str::from_utf8(plaintext).is_err());
            }
            (expected, got) => {
                panic!("plaintext parses as {expected:?} but the request gave {got:?}")
            }
        }
    }
    check(result);
}

/// Invariants of any answer.
fn check(result: Result<Opened, Rejection>) {
    match result {
        Err(rejection) => {
            // What the HTTP error body is built from must not panic either.
            let _ = (rejection.code(), rejection.status(), rejection.to_string());
            if let Rejection::Crypto(e) = &rejection {
                let _ = e.dingtalk_code();
            }
        }
        Ok(Opened::Check(envelope)) => {
            assert!(envelope.is_check());
        }
        Ok(Opened::Event(event)) => {
            assert_eq!(event.source, Source::Push);
            assert_eq!(event.received_at, NOW_MS);
            // Re-sealed with a fresh random prefix and re-opened: the same event.
            let sealed = KEYS
                .cipher
                .seal(event.payload.as_bytes(), &NOW_MS.to_string(), "again")
                .expect("an accepted payload can be sealed");
            match run(&sealed.query(), sealed.body().as_bytes(), WINDOW) {
                Ok(Opened::Event(again)) => {
                    assert_eq!(again.payload, event.payload);
                    assert_eq!(again.dedup_key, event.dedup_key);
                    assert_eq!(again.event_type, event.event_type);
                    assert_eq!(again.corp_id, event.corp_id);
                }
                other => panic!("re-sealed event did not open the same: {other:?}"),
            }
            // What the dispatcher does with the stored payload.
            match Event::decode(&event.payload) {
                Ok(decoded) => assert_eq!(decoded.event_type(), event.event_type),
                Err(e) => {
                    let _ = e.to_string();
                }
            }
        }
    }
}
