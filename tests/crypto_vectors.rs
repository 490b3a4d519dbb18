//! Known-answer tests with the published vectors, and property tests of the cipher.

use dinghook::crypto::{self, AesKey, CallbackCipher, CryptoError};
use proptest::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Vectors {
    vectors: Vec<Vector>,
}

#[derive(Deserialize)]
struct Vector {
    name: String,
    token: String,
    aes_key: String,
    owner_key: String,
    signature: String,
    timestamp: String,
    nonce: String,
    encrypt: String,
    plaintext: Option<String>,
    random_prefix: Option<String>,
    #[serde(default)]
    encrypt_deterministic: bool,
    valid: bool,
    expect_error: Option<String>,
}

fn vectors() -> Vec<Vector> {
    // A copy of shared/vectors/published.json, kept in the repository so the tests run anywhere.
    let text = include_str!("vectors/published.json");
    let parsed: Vectors = serde_json::from_str(text).expect("vectors parse");
    assert!(parsed.vectors.len() >= 6, "expected every published vector");
    parsed.vectors
}

#[test]
fn every_valid_vector_verifies_and_decrypts() {
    let mut checked = 0;
    for v in vectors().iter().filter(|v| v.valid) {
        let cipher = CallbackCipher::from_strings(&v.token, &v.aes_key, &[], &v.owner_key)
            .unwrap_or_else(|e| panic!("{}: key rejected: {e}", v.name));
        let msg = cipher
            .open(&v.signature, &v.timestamp, &v.nonce, &v.encrypt)
            .unwrap_or_else(|e| panic!("{}: {e}", v.name));
        assert_eq!(
            Some(String::from_utf8(msg).unwrap()),
            v.plaintext,
            "{}",
            v.name
        );
        if let Some(prefix) = &v.random_prefix {
            let plain = AesKey::parse(&v.aes_key)
                .unwrap()
                .decrypt(&v.encrypt)
                .unwrap();
            assert_eq!(plain.random(), prefix.as_bytes(), "{}", v.name);
            assert_eq!(plain.owner_key(), v.owner_key.as_bytes(), "{}", v.name);
        }
        checked += 1;
    }
    assert_eq!(checked, 5);
}

#[test]
fn every_invalid_vector_is_rejected_with_its_error() {
    let mut checked = 0;
    for v in vectors().iter().filter(|v| !v.valid) {
        let cipher = CallbackCipher::from_strings(&v.token, &v.aes_key, &[], &v.owner_key).unwrap();
        let err = cipher
            .open(&v.signature, &v.timestamp, &v.nonce, &v.encrypt)
            .expect_err(&v.name);
        assert_eq!(Some(err.code().to_owned()), v.expect_error, "{}", v.name);
        checked += 1;
    }
    assert!(checked >= 1);
}

#[test]
fn deterministic_vectors_are_reproduced_byte_for_byte() {
    let mut checked = 0;
    for v in vectors().iter().filter(|v| v.encrypt_deterministic) {
        let key = AesKey::parse(&v.aes_key).unwrap();
        let random: [u8; 16] = v
            .random_prefix
            .as_ref()
            .unwrap()
            .as_bytes()
            .try_into()
            .unwrap();
        let plaintext = v.plaintext.as_ref().unwrap();
        let enc = key
            .encrypt_with_random(plaintext.as_bytes(), v.owner_key.as_bytes(), &random)
            .unwrap();
        assert_eq!(enc, v.encrypt, "{}", v.name);
        assert_eq!(
            crypto::signature(&v.token, &v.timestamp, &v.nonce, &enc),
            v.signature,
            "{}",
            v.name
        );
        checked += 1;
    }
    assert_eq!(checked, 1);
}

#[test]
fn a_wrong_owner_key_on_a_valid_vector_is_900010() {
    let v = &vectors()[0];
    let cipher = CallbackCipher::from_strings(&v.token, &v.aes_key, &[], "dingwrong").unwrap();
    let err = cipher
        .open(&v.signature, &v.timestamp, &v.nonce, &v.encrypt)
        .unwrap_err();
    assert_eq!(err.dingtalk_code(), 900_010);
    assert!(err.to_string().contains("suite4xxxxxxxxxxxxxxx"));
}

#[test]
fn truncated_or_tampered_ciphertexts_are_rejected() {
    let v = &vectors()[0];
    let cipher = CallbackCipher::from_strings(&v.token, &v.aes_key, &[], &v.owner_key).unwrap();
    // Not base64.
    assert_eq!(cipher.decrypt("@@@@"), Err(CryptoError::BadBase64));
    // Valid base64, 15 bytes.
    assert!(matches!(
        cipher.decrypt("AAAAAAAAAAAAAAAAAAAA"),
        Err(CryptoError::BadCiphertextLength { length: 15 })
    ));
    // Empty.
    assert!(matches!(
        cipher.decrypt(""),
        Err(CryptoError::BadCiphertextLength { length: 0 })
    ));
    // One block cut off the end: the pad byte is now garbage or the length is off.
    use base64::Engine;
    let engine = base64::engine::general_purpose::STANDARD;
    let mut raw = engine.decode(&v.encrypt).unwrap();
    raw.truncate(raw.len() - 16);
    assert!(cipher.decrypt(&engine.encode(&raw)).is_err());
    // A flipped bit in the last block scrambles the padding.
    let mut raw = engine.decode(&v.encrypt).unwrap();
    let n = raw.len();
    raw[n - 20] ^= 0x01;
    assert!(cipher.decrypt(&engine.encode(&raw)).is_err());
}

/// Strings of any characters, multi-byte UTF-8 included, up to 70 000 bytes and beyond.
fn message() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,64}",
        proptest::collection::vec(any::<char>(), 0..18_000).prop_map(|c| c.into_iter().collect()),
        (0usize..70_000).prop_map(|n| "钉".repeat(n / 3)),
        (0usize..70_000).prop_map(|n| "x".repeat(n)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn decrypt_inverts_encrypt(msg in message(), owner in "[a-z0-9]{0,24}") {
        let cipher = CallbackCipher::from_strings(
            "token", "4g5j64qlyl3zvetqxz5jiocdr586fn2zvjpa8zls3ij", &[], &owner).unwrap();
        let sealed = cipher.seal(msg.as_bytes(), "1700000000000", "nonce").unwrap();
        prop_assert!(!sealed.encrypt.contains('\n'));
        let opened = cipher.open(&sealed.msg_signature, &sealed.timestamp, &sealed.nonce, &sealed.encrypt).unwrap();
        prop_assert_eq!(opened, msg.as_bytes());
    }

    #[test]
    fn decrypt_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        use base64::Engine;
        let cipher = CallbackCipher::from_strings(
            "token", "4g5j64qlyl3zvetqxz5jiocdr586fn2zvjpa8zls3ij", &[], "owner").unwrap();
        let encoded = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let _ = cipher.decrypt(&encoded);
        let _ = cipher.decrypt(&String::from_utf8_lossy(&bytes));
        let _ = cipher.open(&String::from_utf8_lossy(&bytes), "1", "2", &encoded);
    }

    /// Arbitrary *decrypted* contents: exercises the padding and length-field checks, which
    /// random ciphertexts rarely reach.
    #[test]
    fn arbitrary_plaintext_layouts_never_panic(
        mut plain in (1usize..40).prop_flat_map(|blocks| proptest::collection::vec(any::<u8>(), blocks * 16)),
        pad in 0u8..40,
        declared in any::<u32>(),
    ) {
        use aes::cipher::{BlockEncryptMut, KeyIvInit};
        use base64::Engine;
        let key_str = "4g5j64qlyl3zvetqxz5jiocdr586fn2zvjpa8zls3ij";
        let key = base64::engine::GeneralPurpose::new(&base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent))
            .decode(key_str).unwrap();
        let n = plain.len();
        plain[n - 1] = pad;
        if n >= 20 { plain[16..20].copy_from_slice(&declared.to_be_bytes()); }
        let enc = cbc::Encryptor::<aes::Aes256>::new_from_slices(&key, &key[..16]).unwrap();
        enc.encrypt_padded_mut::<aes::cipher::block_padding::NoPadding>(&mut plain, n).unwrap();
        let encoded = base64::engine::general_purpose::STANDARD.encode(&plain);
        let cipher = CallbackCipher::from_strings("token", key_str, &[], "").unwrap();
        match cipher.decrypt(&encoded) {
            Ok(msg) => prop_assert!(msg.len() + 20 <= n),
            Err(e) => {
                let expected = matches!(e, CryptoError::BadPadding { .. }
                    | CryptoError::BadLengthField { .. } | CryptoError::OwnerKeyMismatch { .. });
                prop_assert!(expected, "unexpected error {:?}", e);
            }
        }
    }
}
