//! Every NATS subject of the mesh, built here and nowhere else.
//!
//! The old mesh's subjects are kept as they were (`agents.<id>.inbox`,
//! `agents.broadcast`, `mesh.health.ping`, `mesh.health.pong`); the new ones live
//! under `mesh.`. A subject that arrives from outside (an envelope's `reply_to`)
//! is parsed back into a [`Subject`] and only the kinds a listener may publish to
//! are accepted, so no input can steer a publish onto `$JS.API...` or a wildcard.

use std::fmt;

use crate::agent_id::AgentId;

/// Subject every agent receives broadcasts on.
pub const BROADCAST: &str = "agents.broadcast";
/// Subject health pings are published to.
pub const HEALTH_PING: &str = "mesh.health.ping";
/// Subject listeners also publish their pongs to (old-mesh compatibility).
pub const HEALTH_PONG: &str = "mesh.health.pong";

/// Stream filter for every agent inbox.
pub const ALL_INBOXES: &str = "agents.*.inbox";
/// Stream filter for dead letters of every agent.
pub const ALL_DEAD_LETTERS: &str = "mesh.dlq.*";
/// Stream filter for the audit trail.
pub const ALL_AUDIT: &str = "mesh.audit.>";
/// Stream filter for sender-bound inboxes (`agents.<to>.inbox.<sender>`).
pub const ALL_SENT_INBOXES: &str = "agents.*.inbox.*";
/// Stream filter for sender-bound broadcasts (`agents.broadcast.from.<sender>`).
pub const ALL_SENT_BROADCASTS: &str = "agents.broadcast.from.*";
/// Stream filter for answers to `ask` requests (`mesh.reply.<asker>.<token>.<sender>`).
pub const ALL_REPLIES: &str = "mesh.reply.*.*.*";
/// The asker tag of asks made by humans (the bot, the terminal): `bot` is
/// not a valid agent id ([`crate::agent_id::RESERVED_IDS`]).
pub const HUMAN_ASKER: &str = "bot";
/// Stream filter for events the chat front ends relay.
pub const ALL_EVENTS: &str = "mesh.events.*";

/// Longest reply token accepted in `mesh.reply.<token>`.
pub const MAX_REPLY_TOKEN_LEN: usize = 64;

/// A subject of the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// `agents.<id>.inbox`: one agent's inbox.
    Inbox(AgentId),
    /// `agents.<to>.inbox.<sender>`: one agent's inbox, written by agent
    /// `sender` (a listener's NATS user may publish only with its own id here).
    InboxFrom(AgentId, AgentId),
    /// `agents.broadcast`: every agent.
    Broadcast,
    /// `agents.broadcast.from.<sender>`: a broadcast written by agent `sender`.
    BroadcastFrom(AgentId),
    /// `mesh.health.ping`.
    HealthPing,
    /// `mesh.health.pong`.
    HealthPong,
    /// `mesh.dlq.<id>`: one agent's dead letters.
    DeadLetter(AgentId),
    /// `mesh.audit.<source>`: the audit trail, by source (`slack`, `discord`, `cli`, ...).
    Audit(Token),
    /// `mesh.reply.<asker>.<token>`: where the answer to one `ask` goes (an
    /// envelope's `reply_to`); `asker` is the asking agent's id or
    /// [`HUMAN_ASKER`]. Nothing is published on it: the answer goes to
    /// [`Subject::Answer`], which names its sender.
    Reply(Token, Token),
    /// `mesh.reply.<asker>.<token>.<sender>`: agent `sender`'s answer to an ask.
    Answer(Token, Token, AgentId),
    /// `mesh.events.<kind>`: notifications for the chat channels.
    Event(Token),
}

/// One subject token made of `[a-z0-9_-]`, 1 to 64 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Token(String);

impl Token {
    /// Validates one subject token.
    pub fn parse(raw: &str) -> Result<Self, SubjectError> {
        let ok = !raw.is_empty()
            && raw.len() <= MAX_REPLY_TOKEN_LEN
            && raw.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if ok { Ok(Self(raw.to_owned())) } else { Err(SubjectError::BadToken { token: shorten(raw) }) }
    }

    /// A fresh random token (for reply subjects).
    pub fn random() -> Self {
        Self(uuid::Uuid::now_v7().simple().to_string())
    }

    /// The token as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a subject string is not one the mesh accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject {subject:?} is not a mesh subject; use an agent inbox (agents.<id>.inbox) or mesh.reply.<token>")]
    Unknown { subject: String },
    #[error("subject {subject:?} may not be used here; only an agent inbox or mesh.reply.<token> may receive replies")]
    NotReplyable { subject: String },
    #[error("subject token {token:?} is invalid; use 1 to 64 of a-z, 0-9, '-' and '_'")]
    BadToken { token: String },
    #[error("subject {subject:?} names an invalid agent: {source}")]
    BadAgent { subject: String, source: crate::agent_id::AgentIdError },
}

impl Subject {
    /// Parses a concrete (wildcard-free) mesh subject.
    pub fn parse(raw: &str) -> Result<Self, SubjectError> {
        let unknown = || SubjectError::Unknown { subject: shorten(raw) };
        let agent =
            |id: &str| AgentId::parse(id).map_err(|source| SubjectError::BadAgent { subject: shorten(raw), source });
        let parts: Vec<&str> = raw.split('.').collect();
        match parts.as_slice() {
            ["agents", "broadcast"] => Ok(Self::Broadcast),
            ["agents", id, "inbox"] => agent(id).map(Self::Inbox),
            ["agents", "broadcast", "from", from] => agent(from).map(Self::BroadcastFrom),
            ["agents", id, "inbox", from] => Ok(Self::InboxFrom(agent(id)?, agent(from)?)),
            ["mesh", "health", "ping"] => Ok(Self::HealthPing),
            ["mesh", "health", "pong"] => Ok(Self::HealthPong),
            ["mesh", "dlq", id] => agent(id).map(Self::DeadLetter),
            ["mesh", "audit", t] => Token::parse(t).map(Self::Audit),
            ["mesh", "reply", asker, t] => Ok(Self::Reply(Token::parse(asker)?, Token::parse(t)?)),
            ["mesh", "reply", asker, t, from] => Ok(Self::Answer(Token::parse(asker)?, Token::parse(t)?, agent(from)?)),
            ["mesh", "events", t] => Token::parse(t).map(Self::Event),
            _ => Err(unknown()),
        }
    }

    /// Parses a subject a reply may be published to: an inbox or `mesh.reply.<token>`.
    pub fn parse_reply_target(raw: &str) -> Result<Self, SubjectError> {
        match Self::parse(raw)? {
            s @ (Self::Inbox(_) | Self::Reply(..)) => Ok(s),
            _ => Err(SubjectError::NotReplyable { subject: shorten(raw) }),
        }
    }

    /// A fresh reply subject for an ask by a human (`mesh.reply.bot.<token>`).
    pub fn new_reply() -> Self {
        Self::Reply(Token(HUMAN_ASKER.to_owned()), Token::random())
    }

    /// A fresh reply subject for an ask by `from`: tagged with the agent's id
    /// when `from` is an agent (its listener may subscribe to
    /// `mesh.reply.<id>.*.*` only), with [`HUMAN_ASKER`] otherwise.
    pub fn new_reply_for(from: &str) -> Self {
        match AgentId::parse(from) {
            Ok(id) => Self::Reply(Token(id.as_str().to_owned()), Token::random()),
            Err(_) => Self::new_reply(),
        }
    }

    /// The subject agent `sender` publishes to when it writes to this one:
    /// its own id is bound into the subject, which is all its NATS user may
    /// publish on. `None` for subjects no agent writes to.
    pub fn sent_by(&self, sender: &AgentId) -> Option<Self> {
        match self {
            Self::Inbox(to) | Self::InboxFrom(to, _) => Some(Self::InboxFrom(to.clone(), sender.clone())),
            Self::Broadcast | Self::BroadcastFrom(_) => Some(Self::BroadcastFrom(sender.clone())),
            Self::Reply(asker, token) | Self::Answer(asker, token, _) => {
                Some(Self::Answer(asker.clone(), token.clone(), sender.clone()))
            }
            _ => None,
        }
    }

    /// The agent a sender-bound subject names as its sender.
    pub fn sender(&self) -> Option<&AgentId> {
        match self {
            Self::InboxFrom(_, from) | Self::BroadcastFrom(from) | Self::Answer(_, _, from) => Some(from),
            _ => None,
        }
    }

    /// Checks an envelope's `from` against the sender the subject it arrived
    /// on names. A subject without a sender (`agents.<id>.inbox`, written only
    /// by the bot and the operator's users, which may send as any human or as
    /// a legacy sender) accepts any `from`.
    pub fn check_sender(&self, from: &str) -> Result<(), String> {
        match self.sender() {
            Some(sender) if sender.as_str() != from => Err(format!(
                "sender mismatch: published on {self} by agent {sender}, but the message says it is from {:?}; \
                 refused as a forged sender (an agent may only send as itself)",
                shorten(from)
            )),
            _ => Ok(()),
        }
    }

    /// The audit subject of one source (`cli`, `slack`, `discord`).
    pub fn audit(source: &str) -> Result<Self, SubjectError> {
        Token::parse(source).map(Self::Audit)
    }

    /// The event subject of one kind (`killswitch`, `broadcast`, `agent`, `dlq`).
    pub fn event(kind: &str) -> Result<Self, SubjectError> {
        Token::parse(kind).map(Self::Event)
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inbox(id) => write!(f, "agents.{id}.inbox"),
            Self::InboxFrom(id, from) => write!(f, "agents.{id}.inbox.{from}"),
            Self::Broadcast => f.write_str(BROADCAST),
            Self::BroadcastFrom(from) => write!(f, "{BROADCAST}.from.{from}"),
            Self::HealthPing => f.write_str(HEALTH_PING),
            Self::HealthPong => f.write_str(HEALTH_PONG),
            Self::DeadLetter(id) => write!(f, "mesh.dlq.{id}"),
            Self::Audit(t) => write!(f, "mesh.audit.{}", t.0),
            Self::Reply(asker, t) => write!(f, "mesh.reply.{}.{}", asker.0, t.0),
            Self::Answer(asker, t, from) => write!(f, "mesh.reply.{}.{}.{from}", asker.0, t.0),
            Self::Event(t) => write!(f, "mesh.events.{}", t.0),
        }
    }
}

fn shorten(raw: &str) -> String {
    raw.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> AgentId {
        AgentId::parse(s).unwrap()
    }

    #[test]
    fn subjects_are_compatible_with_the_old_mesh() {
        assert_eq!(Subject::Inbox(id("nova")).to_string(), "agents.nova.inbox");
        assert_eq!(Subject::Broadcast.to_string(), "agents.broadcast");
        assert_eq!(Subject::HealthPing.to_string(), "mesh.health.ping");
        assert_eq!(Subject::HealthPong.to_string(), "mesh.health.pong");
        assert_eq!(Subject::DeadLetter(id("nova")).to_string(), "mesh.dlq.nova");
    }

    #[test]
    fn an_agent_writes_on_subjects_that_name_it() {
        let nova = id("nova");
        let sent = |s: Subject| s.sent_by(&nova).unwrap().to_string();
        assert_eq!(sent(Subject::Inbox(id("kaan"))), "agents.kaan.inbox.nova");
        assert_eq!(sent(Subject::Broadcast), "agents.broadcast.from.nova");
        let ask = Subject::parse_reply_target("mesh.reply.bot.abc").unwrap();
        assert_eq!(sent(ask), "mesh.reply.bot.abc.nova");
        assert_eq!(Subject::HealthPong.sent_by(&nova), None);
        assert!(Subject::new_reply_for("kaan").to_string().starts_with("mesh.reply.kaan."));
        assert!(Subject::new_reply_for("slack:U1").to_string().starts_with("mesh.reply.bot."));
    }

    #[test]
    fn the_sender_a_subject_names_must_be_the_envelopes() {
        let on = |raw: &str| Subject::parse(raw).unwrap();
        assert!(on("agents.kaan.inbox.nova").check_sender("nova").is_ok());
        for (subject, from) in [
            ("agents.kaan.inbox.nova", "slack:U1"),
            ("agents.kaan.inbox.nova", "ada"),
            ("agents.broadcast.from.nova", "discord:42"),
            ("mesh.reply.bot.abc.nova", "ada"),
        ] {
            let err = on(subject).check_sender(from).unwrap_err();
            assert!(err.contains("sender mismatch") && err.contains(subject), "{err}");
        }
        // The bot's and the operator's subjects carry no sender: any human or legacy `from`.
        assert!(on("agents.kaan.inbox").check_sender("slack:U1").is_ok());
        assert!(on("agents.broadcast").check_sender("nova").is_ok());
    }

    #[test]
    fn display_and_parse_round_trip() {
        let all = [
            Subject::Inbox(id("kaan_2")),
            Subject::InboxFrom(id("kaan_2"), id("nova")),
            Subject::InboxFrom(id("broadcast"), id("from")),
            Subject::BroadcastFrom(id("inbox")),
            Subject::Broadcast,
            Subject::HealthPing,
            Subject::HealthPong,
            Subject::DeadLetter(id("x")),
            Subject::audit("slack").unwrap(),
            Subject::new_reply(),
            Subject::new_reply_for("nova").sent_by(&id("ada")).unwrap(),
            Subject::event("killswitch").unwrap(),
        ];
        for s in all {
            assert_eq!(Subject::parse(&s.to_string()).unwrap(), s);
        }
    }

    #[test]
    fn reply_targets_reject_injection() {
        for bad in [
            "$JS.API.STREAM.DELETE.MESH_AGENTS",
            "agents.*.inbox",
            "agents.>",
            "agents.nova.inbox.extra",
            "agents.Nova.inbox",
            "mesh.reply.a.b.c",
            "mesh.reply.abc",
            "mesh.reply.*",
            "mesh.reply.bot.*",
            "agents.kaan.inbox.nova",
            "agents.broadcast.from.nova",
            "mesh.reply.",
            "agents.broadcast",
            "mesh.health.ping",
            "",
        ] {
            assert!(Subject::parse_reply_target(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Subject::parse_reply_target("agents.nova.inbox").is_ok());
        assert!(Subject::parse_reply_target("mesh.reply.bot.0123abcd").is_ok());
    }
}

/// Property tests: every valid id round-trips through its subjects, no built
/// subject carries a wildcard or whitespace, and parsing never panics.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    fn token() -> impl Strategy<Value = Token> {
        "[a-z0-9_-]{1,64}".prop_map(|t| Token::parse(&t).expect("the pattern is a valid token"))
    }

    fn subject() -> impl Strategy<Value = Subject> {
        let id = "[a-z0-9][a-z0-9_-]{0,31}".prop_map(|s| AgentId::parse(&s).expect("the pattern is a valid id"));
        prop_oneof![
            id.clone().prop_map(Subject::Inbox),
            (id.clone(), id.clone()).prop_map(|(to, from)| Subject::InboxFrom(to, from)),
            id.clone().prop_map(Subject::BroadcastFrom),
            (token(), token(), id.clone()).prop_map(|(a, t, from)| Subject::Answer(a, t, from)),
            id.prop_map(Subject::DeadLetter),
            Just(Subject::Broadcast),
            Just(Subject::HealthPing),
            Just(Subject::HealthPong),
            token().prop_map(Subject::Audit),
            (token(), token()).prop_map(|(a, t)| Subject::Reply(a, t)),
            token().prop_map(Subject::Event),
        ]
    }

    proptest! {
        #[test]
        fn built_subjects_round_trip_and_are_concrete(subject in subject()) {
            let shown = subject.to_string();
            prop_assert!(!shown.contains(['*', '>']) && !shown.chars().any(char::is_whitespace), "{:?}", shown);
            prop_assert!(!shown.starts_with('$') && !shown.contains("..") && !shown.ends_with('.'), "{:?}", shown);
            prop_assert_eq!(Subject::parse(&shown), Ok(subject));
        }

        #[test]
        fn parsing_is_canonical(raw in "\\PC{0,40}|(agents|mesh)\\.[a-z.*> ]{0,20}") {
            // Whatever parses prints back as exactly what was given: no input is
            // silently rewritten into a different subject.
            if let Ok(subject) = Subject::parse(&raw) {
                prop_assert_eq!(subject.to_string(), raw.clone());
            }
            let _ = Subject::parse_reply_target(&raw);
        }

        #[test]
        fn ids_with_subject_syntax_are_rejected(prefix in "[a-z0-9]{0,5}", bad in "[.*>$]|\\s|[A-Z]|[^\\x00-\\x7f]", suffix in "[a-z0-9]{0,5}") {
            let raw = format!("{prefix}{bad}{suffix}");
            prop_assert!(AgentId::parse(&raw).is_err(), "{:?} accepted", raw);
            prop_assert!(Token::parse(&raw).is_err(), "{:?} accepted as a token", raw);
            let inbox = format!("agents.{raw}.inbox");
            prop_assert!(Subject::parse_reply_target(&inbox).is_err());
        }
    }
}
