//! Slack request signatures (`v0`): HMAC-SHA256 over `v0:{timestamp}:{raw body}`
//! with the signing secret, compared in constant time, and timestamps more
//! than five minutes off rejected. Runs before the body is parsed.

use slack_morphism::prelude::SlackSigningSecret;
use slack_morphism::signature_verifier::SlackEventSignatureVerifier;

/// Header with the request timestamp.
pub const TIMESTAMP_HEADER: &str = "x-slack-request-timestamp";
/// Header with the signature.
pub const SIGNATURE_HEADER: &str = "x-slack-signature";
/// Largest accepted distance between the request timestamp and now.
pub const MAX_SKEW_SECS: i64 = 5 * 60;

/// Why a request is not from Slack.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    #[error("timestamp header is not a number")]
    BadTimestamp,
    #[error("timestamp is {0} s away from now; requests older than 5 minutes are rejected (replay protection)")]
    Stale(i64),
    #[error("body is not UTF-8")]
    NotUtf8,
    #[error("signature does not match")]
    BadSignature,
}

/// Checks one request. `timestamp` and `signature` are the header values.
pub fn verify(
    secret: &str,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now_unix: i64,
) -> Result<(), VerifyError> {
    let timestamp = timestamp.ok_or(VerifyError::MissingHeader(TIMESTAMP_HEADER))?;
    let signature = signature.ok_or(VerifyError::MissingHeader(SIGNATURE_HEADER))?;
    let ts: i64 = timestamp.trim().parse().map_err(|_| VerifyError::BadTimestamp)?;
    let skew = now_unix - ts;
    if skew.abs() > MAX_SKEW_SECS {
        return Err(VerifyError::Stale(skew));
    }
    let body = std::str::from_utf8(body).map_err(|_| VerifyError::NotUtf8)?;
    let verifier = SlackEventSignatureVerifier::new(&SlackSigningSecret::new(secret.to_owned()));
    verifier.verify(signature, body, timestamp).map_err(|_| VerifyError::BadSignature)
}

/// Signs a body as Slack does (for tests and local tools).
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("v0={hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
    const BODY: &[u8] =
        b"token=x&team_id=T1&user_id=U1&command=%2Fmesh&text=ping&response_url=https%3A%2F%2Fhooks.slack.com%2Fx";

    #[test]
    fn verification_table() {
        // slack-morphism also checks the timestamp against the real clock.
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let ts = now.to_string();
        let good = sign(SECRET, &ts, BODY);
        assert_eq!(verify(SECRET, Some(&ts), Some(&good), BODY, now), Ok(()));
        assert_eq!(
            verify(SECRET, Some(&ts), Some(&good), b"token=x&text=kill+nuclear", now),
            Err(VerifyError::BadSignature)
        );
        let wrong = sign("another-secret", &ts, BODY);
        assert_eq!(verify(SECRET, Some(&ts), Some(&wrong), BODY, now), Err(VerifyError::BadSignature));
        let old = (now - 360).to_string();
        let old_sig = sign(SECRET, &old, BODY);
        assert_eq!(verify(SECRET, Some(&old), Some(&old_sig), BODY, now), Err(VerifyError::Stale(360)));
        let future = (now + 400).to_string();
        assert_eq!(
            verify(SECRET, Some(&future), Some(&sign(SECRET, &future, BODY)), BODY, now),
            Err(VerifyError::Stale(-400))
        );
        assert_eq!(verify(SECRET, None, Some(&good), BODY, now), Err(VerifyError::MissingHeader(TIMESTAMP_HEADER)));
        assert_eq!(verify(SECRET, Some(&ts), None, BODY, now), Err(VerifyError::MissingHeader(SIGNATURE_HEADER)));
        assert_eq!(verify(SECRET, Some("soon"), Some(&good), BODY, now), Err(VerifyError::BadTimestamp));
        assert_eq!(verify(SECRET, Some(&ts), Some("v0=00"), BODY, now), Err(VerifyError::BadSignature));
    }

    #[test]
    fn signature_matches_slacks_documented_example() {
        // From Slack's "Verifying requests from Slack" guide.
        let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let sig = sign("8f742231b10e8888abcd99yyyzzz85a5", "1531420618", body);
        assert_eq!(sig, "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503");
    }
}
