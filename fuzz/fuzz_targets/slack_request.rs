//! Fuzzes the Slack entry point: signature verification on arbitrary headers
//! and bodies (never panics, never accepts an unsigned body), then the form
//! parser on arbitrary bytes, and sign-then-verify on arbitrary bodies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_bot::slack::commands::SlashCommand;
use mesh_bot::slack::verify::{sign, verify};

const SECRET: &str = "fuzz-signing-secret";

fuzz_target!(|data: &[u8]| {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    // Split the input into timestamp, signature and body at the first two NULs.
    let mut parts = data.splitn(3, |b| *b == 0);
    let ts = parts.next().and_then(|b| std::str::from_utf8(b).ok());
    let sig = parts.next().and_then(|b| std::str::from_utf8(b).ok());
    let body = parts.next().unwrap_or_default();
    if verify(SECRET, ts, sig, body, now).is_ok() {
        // Only possible with a correct HMAC, which the fuzzer cannot forge.
        let expected = sign(SECRET, ts.unwrap_or_default(), body);
        assert_eq!(sig, Some(expected.as_str()));
    }
    let _ = SlashCommand::parse(data);
    let ts = now.to_string();
    let signed = sign(SECRET, &ts, data);
    let verdict = verify(SECRET, Some(&ts), Some(&signed), data, now);
    assert_eq!(verdict.is_ok(), std::str::from_utf8(data).is_ok(), "{verdict:?}");
});
