//! Discord request signatures: Ed25519 over `timestamp + raw body` with the
//! application's public key, and timestamps more than five minutes off
//! rejected. Runs before the body is parsed; any failure answers 401 (Discord
//! probes the endpoint with bad signatures).

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

/// Header with the signature (hex).
pub const SIGNATURE_HEADER: &str = "x-signature-ed25519";
/// Header with the request timestamp.
pub const TIMESTAMP_HEADER: &str = "x-signature-timestamp";
/// Largest accepted distance between the request timestamp and now.
pub const MAX_SKEW_SECS: i64 = 5 * 60;

/// Why a request is not from Discord.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    #[error("timestamp header is not a number")]
    BadTimestamp,
    #[error("timestamp is {0} s away from now; requests older than 5 minutes are rejected (replay protection)")]
    Stale(i64),
    #[error("signature header is not 64 hex-encoded bytes")]
    MalformedSignature,
    #[error("signature does not match")]
    BadSignature,
}

/// Why a public key is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "DISCORD_PUBLIC_KEY is not an Ed25519 public key: expected 64 hex characters \
     (the application's \"public key\" in the developer portal)"
)]
pub struct PublicKeyError;

/// The application's public key.
#[derive(Debug, Clone)]
pub struct PublicKey(VerifyingKey);

impl std::str::FromStr for PublicKey {
    type Err = PublicKeyError;

    fn from_str(hex: &str) -> Result<Self, Self::Err> {
        let bytes: [u8; 32] = decode_hex(hex.trim()).ok_or(PublicKeyError)?.try_into().map_err(|_| PublicKeyError)?;
        VerifyingKey::from_bytes(&bytes).map(Self).map_err(|_| PublicKeyError)
    }
}

/// Checks one request. `timestamp` and `signature` are the header values.
pub fn verify(
    key: &PublicKey,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now_unix: i64,
) -> Result<(), VerifyError> {
    let timestamp = timestamp.ok_or(VerifyError::MissingHeader(TIMESTAMP_HEADER))?;
    let signature = signature.ok_or(VerifyError::MissingHeader(SIGNATURE_HEADER))?;
    let bytes: [u8; 64] =
        decode_hex(signature.trim()).and_then(|b| b.try_into().ok()).ok_or(VerifyError::MalformedSignature)?;
    let mut message = Vec::with_capacity(timestamp.len() + body.len());
    message.extend_from_slice(timestamp.as_bytes());
    message.extend_from_slice(body);
    key.0.verify_strict(&message, &Signature::from_bytes(&bytes)).map_err(|_| VerifyError::BadSignature)?;
    // Checked after the signature so a forged timestamp is a bad signature.
    let ts: i64 = timestamp.trim().parse().map_err(|_| VerifyError::BadTimestamp)?;
    let skew = now_unix - ts;
    if skew.abs() > MAX_SKEW_SECS {
        return Err(VerifyError::Stale(skew));
    }
    Ok(())
}

/// Signs a body as Discord does (for tests and local tools): hex signature.
pub fn sign(key: &SigningKey, timestamp: &str, body: &[u8]) -> String {
    let mut message = Vec::with_capacity(timestamp.len() + body.len());
    message.extend_from_slice(timestamp.as_bytes());
    message.extend_from_slice(body);
    encode_hex(&key.sign(&message).to_bytes())
}

/// The hex form of a signing key's public key, as the developer portal shows it.
pub fn public_key_hex(key: &SigningKey) -> String {
    encode_hex(key.verifying_key().as_bytes())
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    // Only hex digits: `from_str_radix` alone would also take a leading `+`.
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = br#"{"type":2,"data":{"name":"mesh","options":[{"name":"command","type":3,"value":"ping"}]}}"#;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn verification_table() {
        let signer = key(7);
        let public: PublicKey = public_key_hex(&signer).parse().unwrap();
        let now = 1_700_000_000;
        let ts = now.to_string();
        let good = sign(&signer, &ts, BODY);
        assert_eq!(verify(&public, Some(&ts), Some(&good), BODY, now), Ok(()));
        assert_eq!(verify(&public, Some(&ts), Some(&good), b"{\"type\":1}", now), Err(VerifyError::BadSignature));
        let other = sign(&key(8), &ts, BODY);
        assert_eq!(verify(&public, Some(&ts), Some(&other), BODY, now), Err(VerifyError::BadSignature));
        let moved = (now + 1).to_string();
        assert_eq!(verify(&public, Some(&moved), Some(&good), BODY, now), Err(VerifyError::BadSignature));
        let old = (now - 301).to_string();
        assert_eq!(
            verify(&public, Some(&old), Some(&sign(&signer, &old, BODY)), BODY, now),
            Err(VerifyError::Stale(301))
        );
        assert_eq!(verify(&public, None, Some(&good), BODY, now), Err(VerifyError::MissingHeader(TIMESTAMP_HEADER)));
        assert_eq!(verify(&public, Some(&ts), None, BODY, now), Err(VerifyError::MissingHeader(SIGNATURE_HEADER)));
        assert_eq!(verify(&public, Some(&ts), Some("zz"), BODY, now), Err(VerifyError::MalformedSignature));
        assert_eq!(verify(&public, Some(&ts), Some(&good[..126]), BODY, now), Err(VerifyError::MalformedSignature));
        let soon = "soon";
        assert_eq!(
            verify(&public, Some(soon), Some(&sign(&signer, soon, BODY)), BODY, now),
            Err(VerifyError::BadTimestamp)
        );
    }

    #[test]
    fn public_keys_are_checked() {
        assert!("00".parse::<PublicKey>().is_err());
        assert!("g".repeat(64).parse::<PublicKey>().is_err());
        assert!(public_key_hex(&key(1)).to_uppercase().parse::<PublicKey>().is_ok());
    }

    #[test]
    fn hex_is_hex_digits_only() {
        assert_eq!(decode_hex("0aFF"), Some(vec![0x0a, 0xff]));
        // `u8::from_str_radix("+a", 16)` is Ok(10): a second spelling of a signature.
        assert_eq!(decode_hex("+aff"), None);
        assert_eq!(decode_hex("-aff"), None);
    }

    #[test]
    fn signature_matches_rfc8032_test_vector() {
        // RFC 8032 section 7.1, TEST 2 (a one-byte message 0x72 = "r"; empty timestamp).
        let seed = decode_hex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb").unwrap();
        let signer = SigningKey::from_bytes(&seed.try_into().unwrap());
        assert_eq!(public_key_hex(&signer), "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c");
        assert_eq!(
            sign(&signer, "", b"r"),
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da\
             085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
        );
    }

    proptest::proptest! {
        #[test]
        fn only_the_right_key_over_the_exact_bytes_passes(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            flip in proptest::prelude::any::<usize>(),
            seed in 1u8..=255,
        ) {
            let now = 1_700_000_000i64;
            let ts = now.to_string();
            let public: PublicKey = public_key_hex(&key(seed)).parse().unwrap();
            let good = sign(&key(seed), &ts, &body);
            proptest::prop_assert!(verify(&public, Some(&ts), Some(&good), &body, now).is_ok());
            let other = sign(&key(seed.wrapping_add(1).max(1)), &ts, &body);
            if seed.wrapping_add(1).max(1) != seed {
                proptest::prop_assert!(verify(&public, Some(&ts), Some(&other), &body, now).is_err());
            }
            if !body.is_empty() {
                let mut tampered = body.clone();
                tampered[flip % body.len()] ^= 0x01;
                proptest::prop_assert!(verify(&public, Some(&ts), Some(&good), &tampered, now).is_err());
            }
        }

        #[test]
        fn arbitrary_headers_never_panic(ts in "\\PC{0,40}", signature in "\\PC{0,200}") {
            let public: PublicKey = public_key_hex(&key(7)).parse().unwrap();
            proptest::prop_assert!(verify(&public, Some(&ts), Some(&signature), BODY, 1_700_000_000).is_err());
        }
    }
}
