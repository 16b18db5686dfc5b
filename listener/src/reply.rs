//! A chat agent's reply as a mesh message, pure: the envelope that carries
//! it, cut to fit the envelope limit. The publish is in [`crate::delivery`].

use mesh_protocol::envelope::{MAX_ENVELOPE_BYTES, MAX_TEXT_BYTES};
use mesh_protocol::subject::Subject;
use mesh_protocol::{AgentId, Envelope, Kind, Recipient};

/// Longest reply text kept, in bytes before JSON escaping: half the message
/// limit (a reply is an answer, not a document).
pub const MAX_REPLY_TEXT_BYTES: usize = MAX_TEXT_BYTES / 2;
/// What a cut reply ends with.
pub const TRUNCATED_MARK: &str = "… [truncated]";
/// Metadata key of a cut reply: the reply's length in bytes before the cut.
pub const TRUNCATED_FROM_KEY: &str = "truncated_from_bytes";

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

    fn id(raw: &str) -> AgentId {
        raw.parse().unwrap()
    }

    fn message(from: &str) -> Envelope {
        Envelope::new(from, Recipient::Agent(id("ada")), "question").unwrap()
    }

    fn built(text: &str) -> Reply {
        let original = message("nova");
        build(&id("ada"), &original, &Subject::Inbox(id("nova")), text, 1).expect("a reply")
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
