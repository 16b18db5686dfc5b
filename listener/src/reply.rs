//! A chat agent's reply as a mesh message, pure: where it may go (checked
//! against the registry before the gateway is called, so a reply with nowhere
//! to go costs no LLM turn) and the envelope that carries it, cut to fit the
//! envelope limit. The consumer lookup and the publish are in [`crate::delivery`].

use mesh_protocol::envelope::{MAX_ENVELOPE_BYTES, MAX_TEXT_BYTES, UNKNOWN_SENDER};
use mesh_protocol::subject::Subject;
use mesh_protocol::{AgentId, Envelope, Kind, Recipient, Registry};

use crate::policy::ReplyOutcome;
use uuid::Uuid;

/// Longest reply text kept, in bytes before JSON escaping: half the message
/// limit (a reply is an answer, not a document).
pub const MAX_REPLY_TEXT_BYTES: usize = MAX_TEXT_BYTES / 2;
/// What a cut reply ends with.
pub const TRUNCATED_MARK: &str = "… [truncated]";
/// Metadata key of a cut reply: the reply's length in bytes before the cut.
pub const TRUNCATED_FROM_KEY: &str = "truncated_from_bytes";

/// Where a reply to a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// No reply is routed (a broadcast, a sender without an address); the
    /// message is delivered as usual.
    Nowhere(&'static str),
    /// An ask's reply subject (`mesh.reply.<token>`), read by the bot or `mesh ask`.
    Ask(Subject),
    /// A registered active agent's inbox; its consumer must exist too, which
    /// the caller looks up ([`consumer_check`]).
    Agent(AgentId),
}

impl Route {
    /// The subject the reply is published to.
    pub fn subject(&self) -> Option<Subject> {
        match self {
            Self::Nowhere(_) => None,
            Self::Ask(subject) => Some(subject.clone()),
            Self::Agent(id) => Some(Subject::Inbox(id.clone())),
        }
    }
}

/// Where a reply to `original` goes. `Err` is why it can go nowhere even
/// though the sender expects one: the sender is not a registered active agent.
pub fn route(original: &Envelope, registry: &Registry) -> Result<Route, String> {
    if original.kind == Kind::Broadcast {
        // Every chat agent answering every broadcast would flood the sender.
        return Ok(Route::Nowhere("a broadcast gets no reply"));
    }
    if original.reply_to.is_none() && original.from == UNKNOWN_SENDER {
        return Ok(Route::Nowhere("plain text has no sender to answer"));
    }
    match original.reply_subject() {
        None => Ok(Route::Nowhere("the sender has no inbox and no reply_to")),
        Some(subject @ Subject::Reply(..)) => Ok(Route::Ask(subject)),
        Some(Subject::Inbox(id)) => match registry.get(&id) {
            None => {
                Err(format!("reply target {id} is not a registered agent; add it to the registry or send without it"))
            }
            Some(agent) if !agent.is_active() => Err(format!("reply target {id} is inactive in the registry")),
            Some(_) => Ok(Route::Agent(id)),
        },
        Some(other) => Err(format!("reply target {other} is neither an agent inbox nor an ask reply")),
    }
}

/// What looking up the reply target's consumer found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerLookup {
    /// It exists.
    Found,
    /// JetStream says there is no such consumer.
    Missing,
    /// The lookup itself failed.
    Failed(String),
}

/// Whether a reply to agent `id` can be published, given its consumer lookup.
/// A reply into an inbox without a consumer would be stored but never read
/// (a consumer created later starts at new messages), so it is refused.
pub fn consumer_check(id: &AgentId, lookup: ConsumerLookup) -> ReplyOutcome {
    match lookup {
        ConsumerLookup::Found => ReplyOutcome::Done,
        ConsumerLookup::Missing => ReplyOutcome::Refused(format!(
            "reply target {id} has no consumer; start {id}'s listener (or `mesh agents add` it), then `mesh dlq replay` this message"
        )),
        ConsumerLookup::Failed(e) => ReplyOutcome::Failed(format!("cannot look up reply target {id}'s consumer: {e}")),
    }
}

/// A reply ready to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The envelope.
    pub envelope: Envelope,
    /// Its encoding (at most [`MAX_ENVELOPE_BYTES`]).
    pub payload: Vec<u8>,
    /// The reply text's length in bytes when it had to be cut.
    pub cut_from: Option<usize>,
}

/// Builds `agent`'s reply to `original`, addressed to `target`, with `hops`.
/// Text over [`MAX_REPLY_TEXT_BYTES`], or whose JSON escaping would make the
/// envelope larger than [`MAX_ENVELOPE_BYTES`] (control characters take six
/// bytes each), is cut at a character boundary and ends with
/// [`TRUNCATED_MARK`]; the original length is kept in the metadata. `Err`
/// says why no reply can be built (nothing a retry would change).
pub fn build(agent: &AgentId, original: &Envelope, target: &Subject, text: &str, hops: u8) -> Result<Reply, String> {
    let to = match target {
        Subject::Inbox(id) => Recipient::Agent(id.clone()),
        _ => Recipient::reply_to_sender(&original.from),
    };
    let unencodable = |e: &dyn std::fmt::Display| format!("the reply cannot be encoded as a message: {e}");
    let mut reply = Envelope::new(agent.as_str(), to, TRUNCATED_MARK).map_err(|e| unencodable(&e))?;
    reply.id = reply_id(original.id);
    reply.kind = Kind::Reply;
    reply.hops = hops;
    reply.metadata.insert("in_reply_to".into(), original.id.to_string());
    if text.len() <= MAX_REPLY_TEXT_BYTES {
        reply.text = text.to_owned();
        if let Ok(payload) = reply.encode() {
            return Ok(Reply { envelope: reply, payload, cut_from: None });
        }
    }
    reply.metadata.insert(TRUNCATED_FROM_KEY.into(), text.len().to_string());
    reply.text = String::new();
    let overhead = serde_json::to_vec(&reply).map_err(|e| unencodable(&e))?.len() + escaped_len(TRUNCATED_MARK);
    let cut = cut_point(text, MAX_REPLY_TEXT_BYTES - TRUNCATED_MARK.len(), MAX_ENVELOPE_BYTES.saturating_sub(overhead));
    reply.text = format!("{}{TRUNCATED_MARK}", &text[..cut]);
    let payload = reply.encode().map_err(|e| unencodable(&e))?;
    Ok(Reply { envelope: reply, payload, cut_from: Some(text.len()) })
}

/// Mixed into an original message's id to give its reply's id.
const REPLY_ID_MASK: [u8; 16] = *b"mesh.reply.id/v1";

/// The id of the reply to the message with id `original`: the original's
/// bytes XORed with [`REPLY_ID_MASK`], stamped as a version 8 (custom) UUID.
/// Deterministic, so a reply published again after a redelivery (past the
/// stream's duplicate window too) has the same id, and the target's gateway
/// the same `Idempotency-Key`; it differs from the original's id, so the two
/// never share a key.
pub fn reply_id(original: Uuid) -> Uuid {
    let mut bytes = *original.as_bytes();
    for (byte, mask) in bytes.iter_mut().zip(REPLY_ID_MASK) {
        *byte ^= mask;
    }
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// The longest prefix of `text` (a byte index on a char boundary) of at most
/// `max_raw` bytes whose JSON escaping takes at most `max_escaped` bytes.
fn cut_point(text: &str, max_raw: usize, max_escaped: usize) -> usize {
    let mut escaped = 0;
    for (at, c) in text.char_indices() {
        escaped += escaped_char_len(c);
        if at + c.len_utf8() > max_raw || escaped > max_escaped {
            return at;
        }
    }
    text.len()
}

/// Bytes `text` takes inside a JSON string as serde_json writes it.
fn escaped_len(text: &str) -> usize {
    text.chars().map(escaped_char_len).sum()
}

/// serde_json escapes `"` and `\`, the short forms `\b \f \n \r \t`, and
/// every other control character below 0x20 as `\u00XX`.
fn escaped_char_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\u{08}' | '\u{0c}' | '\n' | '\r' | '\t' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        Registry::parse(
            r#"{
            "nova": {"hooks_token": "hook-n", "hooks_url": "http://127.0.0.1:7002/hooks/wake"},
            "kaan": {"hooks_token": "hook-k", "hooks_url": "http://127.0.0.1:7003/hooks/wake", "status": "inactive"}
        }"#,
        )
        .unwrap()
    }

    fn id(raw: &str) -> AgentId {
        raw.parse().unwrap()
    }

    fn message(from: &str) -> Envelope {
        Envelope::new(from, Recipient::Agent(id("ada")), "question").unwrap()
    }

    #[test]
    fn routes() {
        let reg = registry();
        let ask = Subject::parse_reply_target("mesh.reply.bot.abc123").unwrap();
        let cases: Vec<(Envelope, Result<Route, &str>)> = vec![
            (message("nova"), Ok(Route::Agent(id("nova")))),
            (message("cli:alice"), Ok(Route::Nowhere("the sender has no inbox and no reply_to"))),
            (message(UNKNOWN_SENDER), Ok(Route::Nowhere("plain text has no sender to answer"))),
            (message("slack:U1").with_reply_to(&ask), Ok(Route::Ask(ask.clone()))),
            (message("ghost").with_reply_to(&ask), Ok(Route::Ask(ask.clone()))),
            (
                Envelope::new("nova", Recipient::Broadcast, "all").unwrap(),
                Ok(Route::Nowhere("a broadcast gets no reply")),
            ),
            (message("ghost"), Err("reply target ghost is not a registered agent")),
            (message("kaan"), Err("reply target kaan is inactive in the registry")),
            (message("cli:alice").with_reply_to(&Subject::Inbox(id("ghost"))), Err("reply target ghost is not")),
        ];
        for (envelope, want) in cases {
            let got = route(&envelope, &reg);
            match (&got, &want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{envelope:?}"),
                (Err(got), Err(want)) => assert!(got.starts_with(want), "{got:?} for {envelope:?}"),
                _ => panic!("{got:?}, wanted {want:?}, for {envelope:?}"),
            }
        }
    }

    #[test]
    fn a_target_without_a_consumer_is_refused_and_a_failed_lookup_retried() {
        let kaan = id("kaan");
        assert_eq!(consumer_check(&kaan, ConsumerLookup::Found), ReplyOutcome::Done);
        assert!(matches!(consumer_check(&kaan, ConsumerLookup::Missing),
            ReplyOutcome::Refused(why) if why.starts_with("reply target kaan has no consumer")));
        assert!(matches!(consumer_check(&kaan, ConsumerLookup::Failed("timed out".into())),
            ReplyOutcome::Failed(why) if why.ends_with("timed out")));
    }

    fn built(text: &str) -> Reply {
        let original = message("nova");
        build(&id("ada"), &original, &Subject::Inbox(id("nova")), text, 1).expect("a reply")
    }

    #[test]
    fn a_reply_id_is_derived_from_the_original_id() {
        let original = message("nova");
        let target = Subject::Inbox(id("nova"));
        let first = build(&id("ada"), &original, &target, "answer", 1).unwrap();
        let again = build(&id("ada"), &original, &target, "another answer", 1).unwrap();
        assert_eq!(first.envelope.id, again.envelope.id, "a redelivered reply keeps its id");
        assert_eq!(first.envelope.id, reply_id(original.id));
        assert_ne!(first.envelope.id, original.id);
        assert_eq!(first.envelope.id.get_version_num(), 8);
        let other = message("nova");
        assert_ne!(build(&id("ada"), &other, &target, "answer", 1).unwrap().envelope.id, first.envelope.id);
        let at = time::OffsetDateTime::UNIX_EPOCH;
        let legacy = [crate::delivery::legacy_id(1, at), crate::delivery::legacy_id(2, at)].map(reply_id);
        assert_ne!(legacy[0], legacy[1]);
    }

    #[test]
    fn a_short_reply_is_kept_whole() {
        let reply = built("4");
        assert_eq!((reply.envelope.text.as_str(), reply.cut_from), ("4", None));
        assert_eq!((reply.envelope.kind, reply.envelope.hops), (Kind::Reply, 1));
        assert!(!reply.envelope.metadata.contains_key(TRUNCATED_FROM_KEY));
        assert_eq!(serde_json::to_vec(&reply.envelope).unwrap(), reply.payload);
    }

    #[track_caller]
    fn assert_cut(text: &str) -> Reply {
        let reply = built(text);
        assert_eq!(reply.cut_from, Some(text.len()));
        assert!(reply.payload.len() <= MAX_ENVELOPE_BYTES, "{} bytes", reply.payload.len());
        let kept = reply.envelope.text.strip_suffix(TRUNCATED_MARK).expect("marked as truncated");
        assert!(text.starts_with(kept) && !kept.is_empty(), "a prefix of the reply");
        assert!(reply.envelope.text.len() <= MAX_REPLY_TEXT_BYTES);
        assert_eq!(reply.envelope.metadata[TRUNCATED_FROM_KEY], text.len().to_string());
        // The receiver accepts it as it is.
        let arrival = mesh_protocol::envelope::Arrival {
            to: Recipient::Agent(id("nova")),
            fallback_id: uuid::Uuid::nil(),
            stored_at: time::OffsetDateTime::UNIX_EPOCH,
        };
        assert_eq!(Envelope::decode(&reply.payload, &arrival).unwrap().0, reply.envelope);
        reply
    }

    #[test]
    fn control_characters_are_measured_after_escaping() {
        // The verified case: 98,304 bytes of text fit the raw limit but
        // escape to six bytes each (590 KB).
        let text = "\u{1}".repeat(98_304);
        assert!(text.len() <= MAX_REPLY_TEXT_BYTES);
        let reply = assert_cut(&text);
        // As much as fits: one more escaped character would not.
        assert!(reply.payload.len() + 6 > MAX_ENVELOPE_BYTES, "{} bytes", reply.payload.len());
    }

    #[test]
    fn long_text_is_cut_at_a_char_boundary() {
        assert_cut(&"é".repeat(150 * 1024));
        assert_cut(&"🦀".repeat(MAX_REPLY_TEXT_BYTES / 4 + 1));
        assert_cut(&format!("a{}", "\"".repeat(MAX_REPLY_TEXT_BYTES)));
        let reply = assert_cut(&"x".repeat(3 * 1024 * 1024));
        assert_eq!(reply.envelope.text.len(), MAX_REPLY_TEXT_BYTES, "the raw limit is used to the byte");
    }

    #[test]
    fn escaped_lengths_match_serde_json() {
        let chars = (0u32..0x100).filter_map(char::from_u32).chain(['\u{2028}', 'é', '🦀', '\u{7f}']);
        for c in chars {
            let json = serde_json::to_string(&c.to_string()).unwrap();
            assert_eq!(escaped_char_len(c), json.len() - 2, "{c:?} is {json}");
        }
    }
}

/// Whatever the text, the reply fits, is marked when cut, and keeps a prefix.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_reply_fits_the_envelope(unit in "\\PC{0,8}|[\\x00-\\x1f\"\\\\é]{1,8}", repeat in 1usize..40_000) {
            let text = unit.repeat(repeat);
            prop_assume!(!text.trim().is_empty());
            let original = Envelope::new("nova", Recipient::Agent("ada".parse().unwrap()), "q").unwrap();
            let reply = build(&"ada".parse().unwrap(), &original, &Subject::Inbox("nova".parse().unwrap()), &text, 1).unwrap();
            prop_assert!(reply.payload.len() <= MAX_ENVELOPE_BYTES);
            match reply.cut_from {
                None => prop_assert_eq!(&reply.envelope.text, &text),
                Some(len) => {
                    prop_assert_eq!(len, text.len());
                    let kept = reply.envelope.text.strip_suffix(TRUNCATED_MARK).unwrap();
                    prop_assert!(text.starts_with(kept));
                }
            }
        }
    }
}
