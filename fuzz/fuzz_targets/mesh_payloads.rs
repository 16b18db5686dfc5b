//! Fuzzes the decoders of the other subjects services read: kill switch
//! entries (KV), pongs (single and batched), events, subjects and secret
//! references. None may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_protocol::event::Event;
use mesh_protocol::health::Pong;
use mesh_protocol::killswitch::{KillState, Scope};
use mesh_protocol::subject::Subject;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = KillState::decode(data) {
        let _ = state.in_force(time::OffsetDateTime::UNIX_EPOCH);
        assert_eq!(KillState::decode(&state.encode()).as_ref(), Ok(&state));
    }
    let _ = Pong::decode_any(data);
    let _ = Event::decode(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(subject) = Subject::parse(text) {
            let shown = subject.to_string();
            assert!(!shown.contains(['*', '>', ' ', '\t', '\n', '\r']), "{shown:?}");
            assert_eq!(Subject::parse(&shown).as_ref(), Ok(&subject));
        }
        let _ = Subject::parse_reply_target(text);
        if let Some(scope) = Scope::from_key(text) {
            assert_eq!(Scope::from_key(&scope.key()), Some(scope));
        }
        let _ = mesh_protocol::SecretRef::parse(text);
    }
});
