//! Fuzzes the listener's decoder on raw inbox bytes: never panics, whatever it
//! accepts is valid, its expiry can be checked, and a re-encoded v1 envelope decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_protocol::envelope::{Arrival, Format};
use mesh_protocol::{AgentId, Envelope, Recipient};

fuzz_target!(|data: &[u8]| {
    let to = if data.first().is_some_and(|b| b & 1 == 1) {
        Recipient::Broadcast
    } else {
        Recipient::Agent(AgentId::parse("nova").expect("valid id"))
    };
    let arrival = Arrival { to, fallback_id: uuid::Uuid::from_u128(7), stored_at: time::OffsetDateTime::UNIX_EPOCH };
    if let Ok((envelope, format)) = Envelope::decode(data, &arrival) {
        envelope.validate().expect("a decoded envelope is valid");
        let _ = envelope.reply_subject();
        // Every listener asks this of every message (an expiry at the end of the calendar once panicked here).
        let _ = envelope.is_expired(time::OffsetDateTime::now_utc());
        let _ = envelope.is_expired(envelope.sent_at);
        if let Ok(bytes) = envelope.encode() {
            let (back, again) = Envelope::decode(&bytes, &arrival).expect("an encoded envelope decodes");
            assert_eq!(again, Format::V1);
            if format == Format::V1 {
                assert_eq!(back, envelope, "v1 round trip");
            }
        }
    }
});
