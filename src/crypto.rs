//! The DingTalk callback cipher ("DingCallbackCrypto"): no I/O and no clock (the caller passes
//! the time in); sealing draws its 16 random bytes and nonce from the thread's RNG.
//!
//! Plaintext layout: `random(16) ‖ msg_len (u32 BE) ‖ msg ‖ owner_key`, PKCS#7-padded to a
//! **32-byte** block, AES-256-CBC with IV = the first 16 key bytes, base64 (standard, padded,
//! no line breaks). The signature is the lowercase hex SHA-1 of the four strings token,
//! timestamp, nonce and encrypt, sorted and concatenated. See `docs/architecture.md` and the
//! protocol reference for the sources.
//!
//! Nothing in this module panics on any input: every length is checked before it is used.

use aes::cipher::{BlockDecryptMut, BlockEncryptMut, InnerIvInit, KeyInit};
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use rand::Rng;
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// DingTalk pads to 32 bytes, not to the AES block size (all official libs but Go do).
pub const PAD_BLOCK: usize = 32;
const AES_BLOCK: usize = 16;
const RANDOM_LEN: usize = 16;
const HEADER_LEN: usize = RANDOM_LEN + 4;

/// Standard base64 for ciphertexts: DingTalk's are canonical, and ours must be too.
const STANDARD: GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The aes_key decoder. 43 characters carry 258 bits, so the last character has 2 bits that
/// are discarded; DingTalk's random keys usually have them set, and a strict decoder rejects
/// most real keys. Allowing trailing bits accepts them, as every official library does.
const LENIENT_KEY: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;
type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;

/// Why a callback could not be opened or sealed. Each carries DingTalk's crypto error code
/// ([`CryptoError::dingtalk_code`]) and a stable snake_case code for our HTTP errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("aes_key must be 43 base64 characters, got {length} characters")]
    InvalidAesKey { length: usize },
    #[error("the signature does not match token, timestamp, nonce and encrypt")]
    SignatureMismatch,
    #[error("encrypt is not valid base64")]
    BadBase64,
    #[error("ciphertext is {length} bytes, not a non-zero multiple of 16")]
    BadCiphertextLength { length: usize },
    #[error("padding value {value} is not in 1..=32 or does not fit the data (wrong aes_key?)")]
    BadPadding { value: u8 },
    #[error(
        "length field {declared} does not fit the {available} decrypted bytes (wrong aes_key?)"
    )]
    BadLengthField { declared: u64, available: usize },
    #[error(
        "owner key mismatch: the message ends with {received:?} ({received_kind}), \
         but the configured owner key is {expected:?} ({expected_kind})"
    )]
    OwnerKeyMismatch {
        received: String,
        received_kind: &'static str,
        expected: String,
        expected_kind: &'static str,
    },
    #[error("message of {length} bytes is too long to encrypt")]
    MessageTooLong { length: usize },
}

impl CryptoError {
    /// The code DingTalk's own libraries use for this failure (900004–900010).
    pub fn dingtalk_code(&self) -> u32 {
        match self {
            CryptoError::InvalidAesKey { .. } => 900_004,
            CryptoError::SignatureMismatch => 900_005,
            CryptoError::BadBase64
            | CryptoError::BadCiphertextLength { .. }
            | CryptoError::BadPadding { .. } => 900_008,
            CryptoError::BadLengthField { .. } => 900_009,
            CryptoError::OwnerKeyMismatch { .. } => 900_010,
            CryptoError::MessageTooLong { .. } => 900_001,
        }
    }

    /// A stable machine-readable code, used in HTTP error bodies and metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            CryptoError::InvalidAesKey { .. } => "invalid_aes_key",
            CryptoError::SignatureMismatch => "signature_mismatch",
            CryptoError::BadBase64 => "bad_base64",
            CryptoError::BadCiphertextLength { .. } => "bad_ciphertext_length",
            CryptoError::BadPadding { .. } => "bad_padding",
            CryptoError::BadLengthField { .. } => "bad_length_field",
            CryptoError::OwnerKeyMismatch { .. } => "owner_key_mismatch",
            CryptoError::MessageTooLong { .. } => "message_too_long",
        }
    }
}

/// A guess at what kind of owner key a string is, for error messages only: it turns
/// "900010" into "got a suite key, configured a corp id or app key".
pub fn owner_key_kind(key: &str) -> &'static str {
    if key.is_empty() {
        "empty"
    } else if key.starts_with("suite") {
        "looks like a suite key"
    } else if key.starts_with("ding") {
        "looks like a corp id or an app key / Client ID"
    } else {
        "a custom key or not an owner key at all"
    }
}

/// A decoded 32-byte aes_key with its expanded AES key schedule.
#[derive(Clone)]
pub struct AesKey {
    cipher: aes::Aes256,
    iv: [u8; AES_BLOCK],
}

impl std::fmt::Debug for AesKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AesKey([redacted])")
    }
}

impl AesKey {
    /// Parses the 43-character EncodingAESKey from the DingTalk console.
    pub fn parse(encoded: &str) -> Result<Self, CryptoError> {
        let length = encoded.chars().count();
        if length != 43 {
            return Err(CryptoError::InvalidAesKey { length });
        }
        let bytes = LENIENT_KEY
            .decode(encoded)
            .map_err(|_| CryptoError::InvalidAesKey { length })?;
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| CryptoError::InvalidAesKey { length })?;
        let mut iv = [0u8; AES_BLOCK];
        iv.copy_from_slice(&key[..AES_BLOCK]);
        let cipher = aes::Aes256::new(&key.into());
        Ok(AesKey { cipher, iv })
    }

    /// Decrypts a base64 ciphertext into its layout, without checking the owner key.
    pub fn decrypt(&self, encrypt: &str) -> Result<Plaintext, CryptoError> {
        let mut buf = STANDARD
            .decode(encrypt.as_bytes())
            .map_err(|_| CryptoError::BadBase64)?;
        let length = buf.len();
        if length == 0 || length % AES_BLOCK != 0 {
            return Err(CryptoError::BadCiphertextLength { length });
        }
        let dec = Aes256CbcDec::inner_iv_init(self.cipher.clone(), &self.iv.into());
        dec.decrypt_padded_mut::<aes::cipher::block_padding::NoPadding>(&mut buf)
            .map_err(|_| CryptoError::BadCiphertextLength { length })?;

        let value = buf[length - 1];
        let pad = usize::from(value);
        if pad == 0
            || pad > PAD_BLOCK
            || pad > length
            || buf[length - pad..].iter().any(|&b| b != value)
        {
            return Err(CryptoError::BadPadding { value });
        }
        let unpadded = length - pad;
        if unpadded < HEADER_LEN {
            return Err(CryptoError::BadLengthField {
                declared: 0,
                available: unpadded,
            });
        }
        let declared = u32::from_be_bytes([buf[16], buf[17], buf[18], buf[19]]);
        let msg_end = usize::try_from(declared)
            .ok()
            .and_then(|n| n.checked_add(HEADER_LEN))
            .filter(|&end| end <= unpadded)
            .ok_or(CryptoError::BadLengthField {
                declared: u64::from(declared),
                available: unpadded - HEADER_LEN,
            })?;
        buf.truncate(unpadded);
        Ok(Plaintext { buf, msg_end })
    }

    /// Encrypts `msg` for `owner_key` with the given 16-byte random prefix.
    pub fn encrypt_with_random(
        &self,
        msg: &[u8],
        owner_key: &[u8],
        random: &[u8; RANDOM_LEN],
    ) -> Result<String, CryptoError> {
        let msg_len = u32::try_from(msg.len())
            .map_err(|_| CryptoError::MessageTooLong { length: msg.len() })?;
        let content = HEADER_LEN + msg.len() + owner_key.len();
        let pad = PAD_BLOCK - content % PAD_BLOCK; // 1..=32: a full block when aligned
        let mut buf = Vec::with_capacity(content + pad);
        buf.extend_from_slice(random);
        buf.extend_from_slice(&msg_len.to_be_bytes());
        buf.extend_from_slice(msg);
        buf.extend_from_slice(owner_key);
        // pad is at most 32, so the cast cannot truncate.
        buf.resize(content + pad, pad as u8);
        let total = buf.len();
        let enc = Aes256CbcEnc::inner_iv_init(self.cipher.clone(), &self.iv.into());
        enc.encrypt_padded_mut::<aes::cipher::block_padding::NoPadding>(&mut buf, total)
            .map_err(|_| CryptoError::MessageTooLong { length: msg.len() })?;
        Ok(STANDARD.encode(&buf))
    }

    /// Encrypts `msg` with a fresh random alphanumeric prefix.
    pub fn encrypt(&self, msg: &[u8], owner_key: &[u8]) -> Result<String, CryptoError> {
        let mut random = [0u8; RANDOM_LEN];
        let mut rng = rand::thread_rng();
        for b in &mut random {
            *b = rng.sample(rand::distributions::Alphanumeric);
        }
        self.encrypt_with_random(msg, owner_key, &random)
    }
}

/// A decrypted callback: the message and the owner-key suffix that followed it.
#[derive(Debug, Clone)]
pub struct Plaintext {
    buf: Vec<u8>,
    msg_end: usize,
}

impl Plaintext {
    /// The 16 random bytes that start the plaintext.
    pub fn random(&self) -> &[u8] {
        &self.buf[..RANDOM_LEN]
    }
    /// The message (UTF-8 JSON for events, `success` for replies).
    pub fn msg(&self) -> &[u8] {
        &self.buf[HEADER_LEN..self.msg_end]
    }
    /// Everything after the message: the sender's owner key.
    pub fn owner_key(&self) -> &[u8] {
        &self.buf[self.msg_end..]
    }
    /// Checks the suffix against the configured owner key, byte for byte.
    pub fn check_owner_key(&self, expected: &str) -> Result<(), CryptoError> {
        if self.owner_key() == expected.as_bytes() {
            return Ok(());
        }
        let received = shorten(&String::from_utf8_lossy(self.owner_key()), 64);
        Err(CryptoError::OwnerKeyMismatch {
            received_kind: owner_key_kind(&received),
            received,
            expected: expected.to_owned(),
            expected_kind: owner_key_kind(expected),
        })
    }
    /// Consumes the plaintext and returns the message bytes.
    pub fn into_msg(mut self) -> Vec<u8> {
        self.buf.truncate(self.msg_end);
        self.buf.drain(..HEADER_LEN);
        self.buf
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max).collect();
        out.push('…');
        out
    }
}

/// `lowercase_hex(SHA1(concat(sort([token, timestamp, nonce, encrypt]))))`.
pub fn signature(token: &str, timestamp: &str, nonce: &str, encrypt: &str) -> String {
    hex::encode(signature_bytes(token, timestamp, nonce, encrypt))
}

fn signature_bytes(token: &str, timestamp: &str, nonce: &str, encrypt: &str) -> [u8; 20] {
    let mut parts = [
        token.as_bytes(),
        timestamp.as_bytes(),
        nonce.as_bytes(),
        encrypt.as_bytes(),
    ];
    parts.sort_unstable();
    let mut hasher = Sha1::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// Verifies a signature in constant time. Upper- or lower-case hex is accepted.
pub fn verify_signature(
    token: &str,
    timestamp: &str,
    nonce: &str,
    encrypt: &str,
    signature: &str,
) -> Result<(), CryptoError> {
    let mut given = [0u8; 20];
    if hex::decode_to_slice(signature, &mut given).is_err() {
        return Err(CryptoError::SignatureMismatch);
    }
    let expected = signature_bytes(token, timestamp, nonce, encrypt);
    if bool::from(expected.ct_eq(&given)) {
        Ok(())
    } else {
        Err(CryptoError::SignatureMismatch)
    }
}

/// A signed, encrypted message in the shape DingTalk expects back (keys are case-sensitive).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sealed {
    pub msg_signature: String,
    #[serde(rename = "timeStamp")]
    pub timestamp: String,
    pub nonce: String,
    pub encrypt: String,
}

impl Sealed {
    /// The query string DingTalk sends with a push (it sends both signature spellings).
    pub fn query(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("signature", &self.msg_signature)
            .append_pair("msg_signature", &self.msg_signature)
            .append_pair("timestamp", &self.timestamp)
            .append_pair("nonce", &self.nonce)
            .finish()
    }

    /// The JSON body DingTalk sends with a push: `{"encrypt": "..."}`.
    pub fn body(&self) -> String {
        serde_json::json!({ "encrypt": self.encrypt }).to_string()
    }
}

/// Everything needed to open DingTalk's callbacks and to seal our replies.
#[derive(Clone)]
pub struct CallbackCipher {
    token: Secret,
    /// The current key first, then previous keys accepted for decryption only, so a key
    /// rotation in the console does not reject retries encrypted under the old key.
    keys: Vec<AesKey>,
    owner_key: String,
}

impl std::fmt::Debug for CallbackCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackCipher")
            .field("token", &self.token)
            .field("keys", &self.keys.len())
            .field("owner_key", &self.owner_key)
            .finish()
    }
}

impl CallbackCipher {
    pub fn new(token: Secret, key: AesKey, previous: Vec<AesKey>, owner_key: String) -> Self {
        let mut keys = Vec::with_capacity(1 + previous.len());
        keys.push(key);
        keys.extend(previous);
        CallbackCipher {
            token,
            keys,
            owner_key,
        }
    }

    /// Parses the string forms of the configuration values.
    pub fn from_strings(
        token: &str,
        aes_key: &str,
        previous: &[String],
        owner_key: &str,
    ) -> Result<Self, CryptoError> {
        let key = AesKey::parse(aes_key)?;
        let previous = previous
            .iter()
            .map(|k| AesKey::parse(k))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(
            Secret::new(token.to_owned()),
            key,
            previous,
            owner_key.to_owned(),
        ))
    }

    pub fn owner_key(&self) -> &str {
        &self.owner_key
    }

    /// Verifies the signature, decrypts (trying previous keys if the current one does not fit)
    /// and checks the owner-key suffix. Returns the message bytes.
    pub fn open(
        &self,
        signature: &str,
        timestamp: &str,
        nonce: &str,
        encrypt: &str,
    ) -> Result<Vec<u8>, CryptoError> {
        verify_signature(self.token.expose(), timestamp, nonce, encrypt, signature)?;
        self.decrypt(encrypt)
    }

    /// Decrypts and checks the owner key, without the signature check.
    pub fn decrypt(&self, encrypt: &str) -> Result<Vec<u8>, CryptoError> {
        let mut first_error = None;
        for key in &self.keys {
            let result = key
                .decrypt(encrypt)
                .and_then(|p| p.check_owner_key(&self.owner_key).map(|()| p));
            match result {
                Ok(plain) => return Ok(plain.into_msg()),
                // Input errors do not depend on the key: no point in trying another.
                Err(e @ (CryptoError::BadBase64 | CryptoError::BadCiphertextLength { .. })) => {
                    return Err(e)
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(CryptoError::BadBase64))
    }

    /// Encrypts and signs `msg` with the current key.
    pub fn seal(&self, msg: &[u8], timestamp: &str, nonce: &str) -> Result<Sealed, CryptoError> {
        let encrypt = self.keys[0].encrypt(msg, self.owner_key.as_bytes())?;
        let msg_signature = signature(self.token.expose(), timestamp, nonce, &encrypt);
        Ok(Sealed {
            msg_signature,
            timestamp: timestamp.to_owned(),
            nonce: nonce.to_owned(),
            encrypt,
        })
    }

    /// The reply DingTalk wants: `success`, stamped `now_ms`, with a fresh nonce.
    pub fn seal_success(&self, now_ms: i64) -> Result<Sealed, CryptoError> {
        self.seal(b"success", &now_ms.to_string(), &random_nonce())
    }
}

/// A fresh 16-character alphanumeric nonce.
pub fn random_nonce() -> String {
    let rng = rand::thread_rng();
    rng.sample_iter(rand::distributions::Alphanumeric)
        .take(16)
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_KEY: &str = "4g5j64qlyl3zvetqxz5jiocdr586fn2zvjpa8zls3ij";

    #[test]
    fn lenient_key_decoding_accepts_keys_a_strict_decoder_rejects() {
        assert!(STANDARD.decode(format!("{V1_KEY}=")).is_err());
        assert!(AesKey::parse(V1_KEY).is_ok());
    }

    #[test]
    fn key_of_wrong_length_is_900004() {
        let err = AesKey::parse("abc").unwrap_err();
        assert_eq!(err.dingtalk_code(), 900_004);
        assert_eq!(err, CryptoError::InvalidAesKey { length: 3 });
        let err = AesKey::parse(&"!".repeat(43)).unwrap_err();
        assert_eq!(err.code(), "invalid_aes_key");
    }

    #[test]
    fn aligned_content_gets_a_full_32_byte_pad_block() {
        let key = AesKey::parse(V1_KEY).unwrap();
        // 20 header + 12 msg + 0 owner = 32 bytes: one more full block of padding.
        let enc = key
            .encrypt_with_random(&[b'x'; 12], b"", b"0123456789abcdef")
            .unwrap();
        assert_eq!(STANDARD.decode(enc).unwrap().len(), 64);
    }

    #[test]
    fn pad_values_outside_1_to_32_are_rejected() {
        let key = AesKey::parse(V1_KEY).unwrap();
        for value in [0u8, 33, 200] {
            let mut plain = vec![b'a'; 64];
            plain[63] = value;
            let mut buf = plain.clone();
            let enc = Aes256CbcEnc::inner_iv_init(key.cipher.clone(), &key.iv.into());
            enc.encrypt_padded_mut::<aes::cipher::block_padding::NoPadding>(&mut buf, 64)
                .unwrap();
            let err = key.decrypt(&STANDARD.encode(&buf)).unwrap_err();
            assert_eq!(err, CryptoError::BadPadding { value });
        }
    }

    #[test]
    fn length_field_larger_than_data_is_rejected() {
        let key = AesKey::parse(V1_KEY).unwrap();
        let mut plain = vec![b'a'; 64];
        plain[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        plain[48..].fill(16);
        let enc = Aes256CbcEnc::inner_iv_init(key.cipher.clone(), &key.iv.into());
        enc.encrypt_padded_mut::<aes::cipher::block_padding::NoPadding>(&mut plain, 64)
            .unwrap();
        let err = key.decrypt(&STANDARD.encode(&plain)).unwrap_err();
        assert!(matches!(err, CryptoError::BadLengthField { .. }), "{err:?}");
        assert_eq!(err.dingtalk_code(), 900_009);
    }

    #[test]
    fn previous_keys_decrypt_after_a_rotation() {
        let old = "1234567890123456789012345678901234567890123";
        let old_cipher = CallbackCipher::from_strings("t", old, &[], "dingowner").unwrap();
        let sealed = old_cipher.seal(b"{\"a\":1}", "1", "n").unwrap();
        let rotated =
            CallbackCipher::from_strings("t", V1_KEY, &[old.to_owned()], "dingowner").unwrap();
        let msg = rotated
            .open(&sealed.msg_signature, "1", "n", &sealed.encrypt)
            .unwrap();
        assert_eq!(msg, b"{\"a\":1}");
        let without = CallbackCipher::from_strings("t", V1_KEY, &[], "dingowner").unwrap();
        assert!(without
            .open(&sealed.msg_signature, "1", "n", &sealed.encrypt)
            .is_err());
    }

    #[test]
    fn owner_key_mismatch_names_what_was_received() {
        let c = CallbackCipher::from_strings("t", V1_KEY, &[], "suiteabc").unwrap();
        let other = CallbackCipher::from_strings("t", V1_KEY, &[], "dingcorp123").unwrap();
        let sealed = other.seal(b"{}", "1", "n").unwrap();
        let err = c.decrypt(&sealed.encrypt).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("dingcorp123"), "{text}");
        assert!(text.contains("corp id"), "{text}");
        assert_eq!(err.dingtalk_code(), 900_010);
    }

    #[test]
    fn uppercase_hex_signature_is_accepted_and_garbage_is_a_mismatch() {
        let sig = signature("a", "b", "c", "d");
        assert!(verify_signature("a", "b", "c", "d", &sig.to_uppercase()).is_ok());
        assert_eq!(
            verify_signature("a", "b", "c", "d", "zz"),
            Err(CryptoError::SignatureMismatch)
        );
    }

    #[test]
    fn debug_output_hides_the_token_and_key() {
        let c = CallbackCipher::from_strings("supersecret", V1_KEY, &[], "o").unwrap();
        let text = format!("{c:?}");
        assert!(!text.contains("supersecret"), "{text}");
        assert!(!text.contains(V1_KEY), "{text}");
    }
}
