//! Agent identifiers: the one validated name an agent has on every subject,
//! consumer, registry entry and chat command.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest agent id, in bytes (ids are ASCII).
pub const MAX_AGENT_ID_LEN: usize = 32;

/// What an agent id may contain, quoted in every error.
pub const AGENT_ID_RULE: &str =
    "1 to 32 characters: lowercase letters a-z, digits, '-' and '_', starting with a letter or digit";

/// The verbs the NATS Agent Protocol (Synadia, v0.3) reserves under `agents.`
/// (`agents.{verb}.{agent}...`, heartbeats on `agents.hb.*`): an agent of ours
/// named one of them would make `agents.<id>.inbox` look like that protocol's
/// traffic, so no agent may be named one.
pub const RESERVED_VERBS: [&str; 4] = ["prompt", "hb", "status", "attachments"];

/// Ids the mesh keeps for itself: `bot` is the bot's NATS inbox prefix
/// (`_INBOX_bot`, a listener's being `_INBOX_<id>`) and the asker tag of the
/// humans' `ask` reply subjects (`mesh.reply.bot.<token>`), so an agent named
/// `bot` could read the bot's request replies and the answers to humans' asks.
pub const RESERVED_IDS: [&str; 1] = ["bot"];

/// A validated agent id, safe to embed in a NATS subject or consumer name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AgentId(String);

/// Why a string is not an agent id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentIdError {
    #[error("agent id is empty; an agent id is {AGENT_ID_RULE}")]
    Empty,
    #[error("agent id {shown} is {len} characters long; an agent id is {AGENT_ID_RULE}")]
    TooLong { shown: String, len: usize },
    #[error("agent id {shown} has upper case letters; use {suggestion:?} (an agent id is {AGENT_ID_RULE})")]
    UpperCase { shown: String, suggestion: String },
    #[error("agent id {shown} contains {what}; an agent id is {AGENT_ID_RULE}")]
    BadChar { shown: String, what: String },
    #[error("agent id {shown} starts with {first:?}; an agent id is {AGENT_ID_RULE}")]
    BadStart { shown: String, first: char },
    #[error(
        "agent id {shown} is reserved: the NATS Agent Protocol uses agents.{id}.* for its {id} verb (its \
         reserved verbs: prompt, hb, status, attachments); pick another name"
    )]
    Reserved { shown: String, id: &'static str },
    #[error(
        "agent id {shown} is reserved for the mesh itself: `bot` is the bot's NATS inbox prefix and the tag of \
         humans' ask replies, so an agent of that name could read them; pick another name"
    )]
    ReservedByMesh { shown: String },
}

impl AgentId {
    /// Validates `raw` as an agent id.
    pub fn parse(raw: &str) -> Result<Self, AgentIdError> {
        let shown = quote(raw);
        if raw.is_empty() {
            return Err(AgentIdError::Empty);
        }
        if let Some(c) = raw.chars().find(|c| !is_allowed(*c)) {
            let lower = raw.to_lowercase();
            if c.is_uppercase() && lower.chars().all(is_allowed) && lower.chars().count() <= MAX_AGENT_ID_LEN {
                return Err(AgentIdError::UpperCase { shown, suggestion: lower });
            }
            return Err(AgentIdError::BadChar { shown, what: describe(c) });
        }
        if raw.len() > MAX_AGENT_ID_LEN {
            return Err(AgentIdError::TooLong { shown, len: raw.len() });
        }
        let first = raw.chars().next().unwrap_or('-');
        if !first.is_ascii_alphanumeric() {
            return Err(AgentIdError::BadStart { shown, first });
        }
        if let Some(verb) = RESERVED_VERBS.iter().find(|v| **v == raw) {
            return Err(AgentIdError::Reserved { shown, id: verb });
        }
        if RESERVED_IDS.contains(&raw) {
            return Err(AgentIdError::ReservedByMesh { shown });
        }
        Ok(Self(raw.to_owned()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_allowed(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'
}

/// Names a rejected character so the error is readable even when the
/// character itself is invisible (control, bidi, whitespace).
fn describe(c: char) -> String {
    match c {
        '.' => "'.' (a NATS subject separator)".into(),
        '*' | '>' => format!("{c:?} (a NATS wildcard)"),
        c if c.is_whitespace() => format!("whitespace (U+{:04X})", c as u32),
        c if c.is_control() => format!("a control character (U+{:04X})", c as u32),
        c if is_bidi_or_invisible(c) => {
            format!("an invisible or bidi character (U+{:04X})", c as u32)
        }
        c => format!("{c:?} (U+{:04X})", c as u32),
    }
}

fn is_bidi_or_invisible(c: char) -> bool {
    matches!(c as u32, 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2069 | 0xFEFF | 0x061C)
}

/// Quotes user input for an error message with invisible characters escaped,
/// and cut so a hostile megabyte id does not become a megabyte error.
fn quote(raw: &str) -> String {
    const SHOWN: usize = 40;
    let mut out = String::from("\"");
    for (i, c) in raw.chars().enumerate() {
        if i == SHOWN {
            out.push_str("...");
            break;
        }
        if c.is_control() || is_bidi_or_invisible(c) || (c.is_whitespace() && c != ' ') {
            out.push_str(&format!("\\u{{{:04x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out.push('"');
    out
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentId({})", self.0)
    }
}

impl FromStr for AgentId {
    type Err = AgentIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for AgentId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for AgentId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for AgentId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(raw: &str, expect: Result<(), &str>) {
        match (AgentId::parse(raw), expect) {
            (Ok(id), Ok(())) => assert_eq!(id.as_str(), raw),
            (Err(e), Err(fragment)) => {
                let msg = e.to_string();
                assert!(msg.contains(fragment), "{msg:?} lacks {fragment:?}");
                assert!(msg.contains("lowercase letters"), "{msg:?} does not say what is allowed");
            }
            (got, want) => panic!("{raw:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn accepts_and_rejects() {
        check("nova", Ok(()));
        check("a", Ok(()));
        check("0agent", Ok(()));
        check("kaan_2-b", Ok(()));
        check(&"a".repeat(32), Ok(()));
        check("", Err("empty"));
        check(&"a".repeat(33), Err("33 characters"));
        check("Nova", Err("use \"nova\""));
        check("NOVA", Err("use \"nova\""));
        check("no.va", Err("subject separator"));
        check("nova*", Err("wildcard"));
        check(">", Err("wildcard"));
        check("no va", Err("whitespace"));
        check("no\tva", Err("whitespace"));
        check("nova\u{0}", Err("control character"));
        check("nova\u{202e}", Err("bidi"));
        check("nova\u{200b}", Err("invisible"));
        check("-nova", Err("starts with '-'"));
        check("_nova", Err("starts with '_'"));
        check("növa", Err("'ö'"));
        check("Nö", Err("'N'"));
    }

    #[test]
    fn bot_is_reserved_for_the_bots_inbox_prefix_and_ask_replies() {
        let err = AgentId::parse("bot").unwrap_err().to_string();
        assert!(err.contains("reserved for the mesh") && err.contains("inbox prefix"), "{err}");
        for ok in ["bots", "robot", "bot-1"] {
            assert!(AgentId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn the_agent_protocol_verbs_are_reserved() {
        for verb in RESERVED_VERBS {
            let err = AgentId::parse(verb).unwrap_err().to_string();
            assert!(err.contains("is reserved") && err.contains("NATS Agent Protocol"), "{err}");
        }
        // Only the exact verbs: names that merely contain one are fine.
        for ok in ["prompter", "hb2", "status-bot", "attachment"] {
            assert!(AgentId::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn hostile_input_is_quoted_short_and_visible() {
        let err = AgentId::parse(&format!("\u{202e}{}", "x".repeat(10_000))).unwrap_err().to_string();
        assert!(err.len() < 300, "{err}");
        assert!(err.contains("\\u{202e}"), "{err}");
    }

    #[test]
    fn serde_validates() {
        let ok: AgentId = serde_json::from_str("\"nova\"").unwrap();
        assert_eq!(ok.as_str(), "nova");
        assert!(serde_json::from_str::<AgentId>("\"no.va\"").is_err());
    }
}
