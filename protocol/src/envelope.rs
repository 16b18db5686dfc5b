//! The v1 message envelope, and the decoder every listener runs on the bytes it
//! pulls: a v1 envelope, the old mesh's `{"from", "message"}` body, or plain
//! UTF-8 text from a sender that knows nothing of the mesh.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::agent_id::AgentId;
use crate::subject::{Subject, SubjectError};

/// Envelope format version written by this mesh.
pub const ENVELOPE_VERSION: u8 = 1;
/// Largest message text, in bytes. Leaves room under the gateway's 256 KiB
/// body limit for the JSON wrapping of a hook request.
pub const MAX_TEXT_BYTES: usize = 192 * 1024;
/// Largest encoded envelope, in bytes (under the gateway's 256 KiB and
/// NATS's default 1 MiB max payload).
pub const MAX_ENVELOPE_BYTES: usize = 240 * 1024;
/// Longest sender name.
pub const MAX_FROM_LEN: usize = 64;
/// Sender recorded for a plain-text body.
pub const UNKNOWN_SENDER: &str = "external";
/// Shortest time to live a message may be given.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// Longest time to live (as long as the longest duration the command grammar reads).
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// How far past `expires_at` a receiver still delivers: the clock-skew
/// tolerance between the sender's clock (which set `expires_at`) and the
/// listener's (which reads it). With clocks within this of each other a
/// message lives at least its TTL; it is never delivered later than its TTL
/// plus this plus the skew.
pub const EXPIRY_SKEW_TOLERANCE: Duration = Duration::from_secs(1);
/// [`EXPIRY_SKEW_TOLERANCE`] as the `time` crate's duration, for checked arithmetic.
const SKEW: time::Duration = time::Duration::seconds(EXPIRY_SKEW_TOLERANCE.as_secs() as i64);
/// The latest `expires_at` accepted, counted from `sent_at`: the longest time
/// to live plus the skew tolerance. A later one is refused by
/// [`Envelope::validate`] (a hostile or broken sender, not our CLI).
const MAX_EXPIRY_AFTER_SENT: time::Duration =
    time::Duration::seconds((MAX_TTL.as_secs() + EXPIRY_SKEW_TOLERANCE.as_secs()) as i64);

/// Who a message is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Recipient {
    /// One agent.
    Agent(AgentId),
    /// Every active agent.
    Broadcast,
    /// A human or tool (`cli:alice`, `slack:U123`), reached through `reply_to`.
    Sender(String),
}

impl Recipient {
    /// The subject a message for this recipient is published to; a human
    /// sender has none (replies to them go to the envelope's `reply_to`).
    pub fn subject(&self) -> Option<Subject> {
        match self {
            Self::Agent(id) => Some(Subject::Inbox(id.clone())),
            Self::Broadcast => Some(Subject::Broadcast),
            Self::Sender(_) => None,
        }
    }

    /// The recipient a reply to `from` is addressed to.
    pub fn reply_to_sender(from: &str) -> Self {
        match AgentId::parse(from) {
            Ok(id) => Self::Agent(id),
            Err(_) => Self::Sender(from.to_owned()),
        }
    }
}

impl fmt::Display for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Agent(id) => f.write_str(id.as_str()),
            Self::Broadcast => f.write_str("*"),
            Self::Sender(name) => f.write_str(name),
        }
    }
}

impl Serialize for Recipient {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Recipient {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if raw == "*" {
            return Ok(Self::Broadcast);
        }
        if raw.contains(':') && validate_sender(&raw).is_ok() {
            return Ok(Self::Sender(raw.into_owned()));
        }
        AgentId::parse(&raw).map(Self::Agent).map_err(serde::de::Error::custom)
    }
}

/// What kind of message an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A message to one agent.
    #[default]
    Message,
    /// A message to every agent.
    Broadcast,
    /// A request whose reply goes to `reply_to`.
    Ask,
    /// An agent's reply to a message.
    Reply,
}

/// How urgent a message is. High and urgent wake the agent now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
    Urgent,
}

impl Priority {
    /// All priorities, lowest first.
    pub const ALL: [Priority; 4] = [Self::Low, Self::Normal, Self::High, Self::Urgent];

    /// The name used on the wire and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Normal => "normal",
            Self::High => "high",
            Self::Urgent => "urgent",
        }
    }

    /// True when the agent should be woken at once rather than at its next heartbeat.
    pub fn wakes_now(self) -> bool {
        self >= Self::High
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown priority {s:?}; use low, normal, high or urgent"))
    }
}

/// The v1 envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Format version, always 1.
    pub v: u8,
    /// Unique id (UUID v7); also the `Nats-Msg-Id` and the gateway's `Idempotency-Key`.
    pub id: Uuid,
    /// Who sent it: an agent id, or a human or tool (`cli:alice`, `slack:U123`).
    pub from: String,
    /// Who it is for.
    pub to: Recipient,
    /// What kind of message it is.
    #[serde(default)]
    pub kind: Kind,
    /// How urgent it is.
    #[serde(default)]
    pub priority: Priority,
    /// The message text.
    pub text: String,
    /// Where a reply goes: an agent inbox or `mesh.reply.<token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// When it was sent (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub sent_at: OffsetDateTime,
    /// How many agent replies led to this message (the loop guard counts them).
    #[serde(default)]
    pub hops: u8,
    /// When it stops being worth delivering (RFC 3339, set from `--ttl` by the
    /// sender's clock); absent: never. A listener dead-letters a message past
    /// it (reason `expired`) instead of delivering it; see [`EXPIRY_SKEW_TOLERANCE`].
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// Free-form string metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// Why an envelope cannot be built or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("message text is empty; say something")]
    EmptyText,
    #[error("message text is {len} bytes; the limit is {MAX_TEXT_BYTES} bytes (192 KiB), so split it or send a link")]
    TextTooLarge { len: usize },
    #[error("encoded message is {len} bytes; the limit is {MAX_ENVELOPE_BYTES} bytes, so shorten the text or metadata")]
    EncodedTooLarge { len: usize },
    #[error("sender {0:?} is invalid; use 1 to 64 printable characters")]
    BadSender(String),
    #[error("reply_to is invalid: {0}")]
    BadReplyTo(SubjectError),
    #[error("a time to live lasts between 1 second and 24 hours, not {0:?}")]
    BadTtl(Duration),
    #[error("expires_at is more than 24 hours after sent_at; a time to live lasts at most 24 hours")]
    BadExpiry,
}

/// Why received bytes are not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is empty; send a JSON envelope or UTF-8 text")]
    Empty,
    #[error("payload is {len} bytes; the limit is {MAX_ENVELOPE_BYTES} bytes")]
    TooLarge { len: usize },
    #[error("payload is not UTF-8 text ({len} bytes); send a JSON envelope or UTF-8 text")]
    NotUtf8 { len: usize },
    #[error("payload starts with '{{' but is not valid JSON: {0}")]
    BadJson(String),
    #[error(
        "JSON object is neither a mesh envelope (with \"v\": 1) nor a legacy body {{\"from\": ..., \"message\": ...}}"
    )]
    UnknownShape,
    #[error("envelope version {0} is not supported; this mesh speaks version 1")]
    UnsupportedVersion(u64),
    #[error("invalid envelope: {0}")]
    BadEnvelope(String),
    #[error("invalid legacy body: {0}")]
    BadLegacy(String),
    #[error(transparent)]
    Invalid(#[from] EnvelopeError),
}

/// Which of the accepted formats a payload was in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A v1 envelope.
    V1,
    /// The old mesh's `{"from", "message"}`.
    Legacy,
    /// Plain UTF-8 text.
    PlainText,
}

/// What the decoder needs to know about where bytes arrived, to fill in what
/// legacy and plain-text bodies lack.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// The recipient implied by the subject.
    pub to: Recipient,
    /// A stable id for bodies without one (derived from the stream sequence,
    /// so a redelivery gets the same id).
    pub fallback_id: Uuid,
    /// When the broker stored it.
    pub stored_at: OffsetDateTime,
}

impl Envelope {
    /// A new envelope sent now, validated.
    pub fn new(from: impl Into<String>, to: Recipient, text: impl Into<String>) -> Result<Self, EnvelopeError> {
        let kind = match to {
            Recipient::Broadcast => Kind::Broadcast,
            Recipient::Agent(_) | Recipient::Sender(_) => Kind::Message,
        };
        let envelope = Self {
            v: ENVELOPE_VERSION,
            id: Uuid::now_v7(),
            from: from.into(),
            to,
            kind,
            priority: Priority::Normal,
            text: text.into(),
            reply_to: None,
            sent_at: OffsetDateTime::now_utc(),
            hops: 0,
            expires_at: None,
            metadata: BTreeMap::new(),
        };
        envelope.validate()?;
        Ok(envelope)
    }

    /// Sets the priority.
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Sets where a reply goes, making this an `ask`.
    pub fn with_reply_to(mut self, reply_to: &Subject) -> Self {
        self.reply_to = Some(reply_to.to_string());
        self.kind = Kind::Ask;
        self
    }

    /// Makes the message expire `ttl` after it was sent (`sent_at`).
    pub fn with_ttl(mut self, ttl: Duration) -> Result<Self, EnvelopeError> {
        check_ttl(ttl)?;
        self.expires_at = Some(
            self.sent_at
                .checked_add(ttl.try_into().map_err(|_| EnvelopeError::BadTtl(ttl))?)
                .ok_or(EnvelopeError::BadTtl(ttl))?,
        );
        Ok(self)
    }

    /// True when the message must no longer be delivered at `now` (the
    /// receiver's clock): past `expires_at` by more than [`EXPIRY_SKEW_TOLERANCE`].
    /// An expiry so late that adding the tolerance leaves the calendar
    /// (year 9999) is never reached: not expired, and no panic.
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_some_and(|at| at.checked_add(SKEW).is_some_and(|last| now > last))
    }

    /// Checks the limits and fields a receiver relies on.
    pub fn validate(&self) -> Result<(), EnvelopeError> {
        if self.text.is_empty() {
            return Err(EnvelopeError::EmptyText);
        }
        if self.text.len() > MAX_TEXT_BYTES {
            return Err(EnvelopeError::TextTooLarge { len: self.text.len() });
        }
        validate_sender(&self.from)?;
        if let Some(reply_to) = &self.reply_to {
            Subject::parse_reply_target(reply_to).map_err(EnvelopeError::BadReplyTo)?;
        }
        if let Some(at) = self.expires_at {
            // Overflow (a `sent_at` near year 9999) means no limit is reachable past it.
            let latest = self.sent_at.checked_add(MAX_EXPIRY_AFTER_SENT);
            if latest.is_some_and(|latest| at > latest) {
                return Err(EnvelopeError::BadExpiry);
            }
        }
        Ok(())
    }

    /// The subject this envelope is published to: its recipient's, bound to
    /// the sender when the sender is an agent (`agents.<to>.inbox.<from>`,
    /// `agents.broadcast.from.<from>`), so the receiver can check `from`
    /// against what NATS let the publisher write. A human or legacy sender's
    /// message goes to the plain subject (the bot's and the operator's users only).
    pub fn publish_subject(&self) -> Option<Subject> {
        let plain = self.to.subject()?;
        match AgentId::parse(&self.from) {
            Ok(sender) => plain.sent_by(&sender),
            Err(_) => Some(plain),
        }
    }

    /// The subject a reply to this envelope goes to: `reply_to`, else the
    /// sender's inbox when the sender is an agent.
    pub fn reply_subject(&self) -> Option<Subject> {
        match &self.reply_to {
            Some(raw) => Subject::parse_reply_target(raw).ok(),
            None => AgentId::parse(&self.from).ok().map(Subject::Inbox),
        }
    }

    /// Encodes to JSON, refusing anything a receiver would reject.
    pub fn encode(&self) -> Result<Vec<u8>, EnvelopeError> {
        self.validate()?;
        let bytes = serde_json::to_vec(self).expect("an envelope always serializes");
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::EncodedTooLarge { len: bytes.len() });
        }
        Ok(bytes)
    }

    /// Decodes received bytes in any accepted format.
    pub fn decode(payload: &[u8], arrival: &Arrival) -> Result<(Self, Format), DecodeError> {
        if payload.is_empty() {
            return Err(DecodeError::Empty);
        }
        if payload.len() > MAX_ENVELOPE_BYTES {
            return Err(DecodeError::TooLarge { len: payload.len() });
        }
        let text = std::str::from_utf8(payload).map_err(|_| DecodeError::NotUtf8 { len: payload.len() })?;
        if !text.trim_start().starts_with('{') {
            let envelope = Self::from_parts(arrival, UNKNOWN_SENDER.into(), text.to_owned());
            envelope.validate()?;
            return Ok((envelope, Format::PlainText));
        }
        // The common case, a valid v1 envelope, is parsed once, straight into
        // the struct; anything else goes the slower way that explains itself.
        if let Ok(envelope) = serde_json::from_str::<Self>(text)
            && envelope.v == ENVELOPE_VERSION
        {
            envelope.validate()?;
            return Ok((envelope, Format::V1));
        }
        let object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| DecodeError::BadJson(e.to_string()))?;
        if let Some(v) = object.get("v") {
            match v.as_u64() {
                Some(1) => {}
                Some(other) => return Err(DecodeError::UnsupportedVersion(other)),
                None => {
                    return Err(DecodeError::BadEnvelope("\"v\" must be the number 1".into()));
                }
            }
            let envelope: Self = serde_json::from_value(serde_json::Value::Object(object))
                .map_err(|e| DecodeError::BadEnvelope(e.to_string()))?;
            envelope.validate()?;
            return Ok((envelope, Format::V1));
        }
        if object.contains_key("message") {
            let legacy: Legacy = serde_json::from_value(serde_json::Value::Object(object))
                .map_err(|e| DecodeError::BadLegacy(e.to_string()))?;
            let envelope = Self::from_parts(arrival, legacy.from, legacy.message);
            envelope.validate()?;
            return Ok((envelope, Format::Legacy));
        }
        Err(DecodeError::UnknownShape)
    }

    fn from_parts(arrival: &Arrival, from: String, text: String) -> Self {
        let kind = match arrival.to {
            Recipient::Broadcast => Kind::Broadcast,
            Recipient::Agent(_) | Recipient::Sender(_) => Kind::Message,
        };
        Self {
            v: ENVELOPE_VERSION,
            id: arrival.fallback_id,
            from,
            to: arrival.to.clone(),
            kind,
            priority: Priority::Normal,
            text,
            reply_to: None,
            sent_at: arrival.stored_at,
            hops: 0,
            expires_at: None,
            metadata: BTreeMap::new(),
        }
    }
}

/// Checks a time to live against [`MIN_TTL`] and [`MAX_TTL`].
pub fn check_ttl(ttl: Duration) -> Result<(), EnvelopeError> {
    if (MIN_TTL..=MAX_TTL).contains(&ttl) { Ok(()) } else { Err(EnvelopeError::BadTtl(ttl)) }
}

/// The old mesh's body.
#[derive(Deserialize)]
struct Legacy {
    from: String,
    message: String,
}

fn validate_sender(from: &str) -> Result<(), EnvelopeError> {
    let ok = !from.is_empty()
        && from.chars().count() <= MAX_FROM_LEN
        && from.chars().all(|c| !c.is_control() && !c.is_whitespace());
    if ok { Ok(()) } else { Err(EnvelopeError::BadSender(from.chars().take(MAX_FROM_LEN).collect())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival() -> Arrival {
        Arrival {
            to: Recipient::Agent(AgentId::parse("nova").unwrap()),
            fallback_id: Uuid::from_u128(7),
            stored_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn v1_round_trips() {
        let env = Envelope::new("cli:alice", Recipient::Broadcast, "héllo \"world\" <!channel> שלום")
            .unwrap()
            .with_priority(Priority::Urgent);
        let bytes = env.encode().unwrap();
        let (back, format) = Envelope::decode(&bytes, &arrival()).unwrap();
        assert_eq!(format, Format::V1);
        assert_eq!(back, env);
        assert_eq!(env.id.get_version_num(), 7);
    }

    #[test]
    fn legacy_and_plain_text_are_accepted() {
        let (env, format) = Envelope::decode(br#"{"from": "kaan", "message": "hi"}"#, &arrival()).unwrap();
        assert_eq!((format, env.from.as_str(), env.text.as_str()), (Format::Legacy, "kaan", "hi"));
        assert_eq!(env.id, Uuid::from_u128(7));
        let (env, format) = Envelope::decode("just words".as_bytes(), &arrival()).unwrap();
        assert_eq!((format, env.from.as_str(), env.text.as_str()), (Format::PlainText, UNKNOWN_SENDER, "just words"));
    }

    #[track_caller]
    fn rejects(payload: &[u8], fragment: &str) {
        let err = Envelope::decode(payload, &arrival()).unwrap_err().to_string();
        assert!(err.contains(fragment), "{err:?} lacks {fragment:?}");
    }

    #[test]
    fn rejections_say_why() {
        rejects(b"", "empty");
        rejects(&[0xff, 0xfe, 0x00], "not UTF-8");
        rejects(b"{not json", "not valid JSON");
        rejects(br#"{"foo": 1}"#, "neither a mesh envelope");
        rejects(br#"{"v": 2, "id": "x"}"#, "version 2 is not supported");
        rejects(br#"{"v": "1"}"#, "must be the number 1");
        rejects(br#"{"v": 1, "from": "a"}"#, "missing field");
        rejects(br#"{"from": 5, "message": "hi"}"#, "invalid legacy body");
        rejects(br#"{"from": "a b", "message": "hi"}"#, "sender");
        rejects(br#"{"from": "a", "message": ""}"#, "empty");
        rejects(&vec![b'a'; MAX_ENVELOPE_BYTES + 1], "limit");
        let mut env = Envelope::new("a", Recipient::Broadcast, "x").unwrap();
        env.reply_to = Some("$JS.API.STREAM.DELETE.X".into());
        let json = serde_json::to_vec(&env).unwrap();
        rejects(&json, "reply_to is invalid");
    }

    #[test]
    fn oversize_text_is_refused_before_publishing() {
        let err = Envelope::new("a", Recipient::Broadcast, "x".repeat(MAX_TEXT_BYTES + 1)).unwrap_err();
        assert!(matches!(err, EnvelopeError::TextTooLarge { .. }));
        // Control characters escape to six bytes each: the encoded limit catches them.
        let env = Envelope::new("a", Recipient::Broadcast, "\u{1}".repeat(MAX_TEXT_BYTES / 2)).unwrap();
        assert!(matches!(env.encode().unwrap_err(), EnvelopeError::EncodedTooLarge { .. }));
    }

    #[test]
    fn reply_subject_defaults_to_the_sender_inbox() {
        let env = Envelope::new("kaan", Recipient::Broadcast, "x").unwrap();
        assert_eq!(env.reply_subject().unwrap().to_string(), "agents.kaan.inbox");
        assert_eq!(env.publish_subject().unwrap().to_string(), "agents.broadcast.from.kaan");
        let env = Envelope::new("cli:alice", Recipient::Broadcast, "x").unwrap();
        assert_eq!(env.reply_subject(), None);
        assert_eq!(env.publish_subject().unwrap().to_string(), "agents.broadcast");
    }

    #[test]
    fn human_recipients_round_trip() {
        let env = Envelope::new("nova", Recipient::reply_to_sender("slack:U123"), "done").unwrap();
        let (back, _) = Envelope::decode(&env.encode().unwrap(), &arrival()).unwrap();
        assert_eq!(back.to, Recipient::Sender("slack:U123".into()));
        assert_eq!(Recipient::reply_to_sender("kaan"), Recipient::Agent(AgentId::parse("kaan").unwrap()));
    }

    #[test]
    fn expiry_is_absolute_optional_and_tolerates_skew() {
        let env = Envelope::new("cli:alice", Recipient::Broadcast, "maintenance in 5 minutes").unwrap();
        let json = String::from_utf8(env.encode().unwrap()).unwrap();
        assert!(!json.contains("expires_at"), "no ttl, no field: older listeners read it as before");
        assert!(!env.is_expired(env.sent_at + Duration::from_secs(365 * 24 * 3600)));
        let env = env.with_ttl(Duration::from_secs(2)).unwrap();
        let at = env.expires_at.unwrap();
        assert_eq!(at, env.sent_at + Duration::from_secs(2));
        let (back, _) = Envelope::decode(&env.encode().unwrap(), &arrival()).unwrap();
        assert_eq!(back.expires_at, Some(at), "round trips as an absolute time");
        assert!(!back.is_expired(at), "delivered up to its expiry");
        assert!(!back.is_expired(at + EXPIRY_SKEW_TOLERANCE), "and within the skew tolerance after it");
        assert!(back.is_expired(at + EXPIRY_SKEW_TOLERANCE + Duration::from_millis(1)));
        // An envelope written before expiry existed decodes with none.
        let old = br#"{"v":1,"id":"0190b0a0-0000-7000-8000-000000000000","from":"kaan","to":"nova","text":"hi","sent_at":"2026-01-01T00:00:00Z"}"#;
        assert_eq!(Envelope::decode(old, &arrival()).unwrap().0.expires_at, None);
        let expiring = r#"{"v":1,"id":"0190b0a0-0000-7000-8000-000000000000","from":"kaan","to":"nova","text":"hi","sent_at":"2026-01-01T00:00:00Z","expires_at":"2026-01-01T00:00:02Z"}"#;
        let (env, _) = Envelope::decode(expiring.as_bytes(), &arrival()).unwrap();
        assert_eq!(env.expires_at, Some(time::macros::datetime!(2026-01-01 0:00:02 UTC)));
        rejects(expiring.replace("2026-01-01T00:00:02Z", "soon").as_bytes(), "invalid envelope");
        for bad in [Duration::ZERO, Duration::from_millis(999), MAX_TTL + Duration::from_secs(1)] {
            let env = Envelope::new("a", Recipient::Broadcast, "x").unwrap();
            assert!(matches!(env.with_ttl(bad), Err(EnvelopeError::BadTtl(_))), "{bad:?}");
        }
    }

    #[test]
    fn an_expiry_at_the_end_of_the_calendar_neither_panics_nor_passes() {
        let hostile = r#"{"v":1,"id":"0190b0a0-0000-7000-8000-000000000000","from":"kaan","to":"nova","text":"hi","sent_at":"2026-01-01T00:00:00Z","expires_at":"9999-12-31T23:59:59Z"}"#;
        rejects(hostile.as_bytes(), "expires_at is more than 24 hours after sent_at");
        // Built by hand (no decode): reading it must not panic, and it is not expired.
        let mut env = Envelope::new("kaan", Recipient::Broadcast, "hi").unwrap();
        let end = time::macros::datetime!(9999-12-31 23:59:59.999_999_999 UTC);
        env.expires_at = Some(end);
        assert!(!env.is_expired(OffsetDateTime::now_utc()));
        assert!(!env.is_expired(end));
        assert_eq!(env.validate(), Err(EnvelopeError::BadExpiry));
        // A sender at the end of the calendar: no limit to add, no panic.
        env.sent_at = end;
        assert_eq!(env.validate(), Ok(()));
        // The last accepted expiry is the longest ttl plus the skew tolerance.
        let mut env = Envelope::new("kaan", Recipient::Broadcast, "hi").unwrap();
        env.expires_at = Some(env.sent_at + MAX_TTL + EXPIRY_SKEW_TOLERANCE);
        assert_eq!(env.validate(), Ok(()));
        env.expires_at = Some(env.sent_at + MAX_TTL + EXPIRY_SKEW_TOLERANCE + Duration::from_nanos(1));
        assert_eq!(env.validate(), Err(EnvelopeError::BadExpiry));
        // An expiry before sending is merely expired.
        env.expires_at = Some(env.sent_at - Duration::from_secs(60));
        assert_eq!(env.validate(), Ok(()));
        assert!(env.is_expired(OffsetDateTime::now_utc()));
    }

    #[test]
    fn priorities_parse_and_wake() {
        assert_eq!("high".parse::<Priority>().unwrap(), Priority::High);
        assert!("HIGH".parse::<Priority>().unwrap_err().contains("use low, normal, high or urgent"));
        assert!(Priority::Urgent.wakes_now() && Priority::High.wakes_now() && !Priority::Normal.wakes_now());
    }
}
