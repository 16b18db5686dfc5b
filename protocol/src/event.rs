//! Events the chat front ends relay to their notification channels, published
//! on `mesh.events.<kind>`: kill switch changes, broadcasts, agents going down
//! and coming back, dead letters piling up.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::subject::Subject;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// The kill switch was pulled or released.
    Killswitch,
    /// A broadcast went out.
    Broadcast,
    /// An agent went down or came back.
    Agent,
    /// Dead letters are piling up.
    Dlq,
    /// A maintenance window started or ended.
    Maintenance,
}

impl EventKind {
    /// The subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Killswitch => "killswitch",
            Self::Broadcast => "broadcast",
            Self::Agent => "agent",
            Self::Dlq => "dlq",
            Self::Maintenance => "maintenance",
        }
    }

    /// The subject events of this kind are published on.
    pub fn subject(self) -> Subject {
        Subject::event(self.as_str()).expect("event kinds are valid subject tokens")
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// What it is about.
    pub kind: EventKind,
    /// One line for humans (plain text; renderers escape it).
    pub text: String,
    /// When it happened.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

impl Event {
    /// An event happening now.
    pub fn now(kind: EventKind, text: impl Into<String>) -> Self {
        Self { kind, text: text.into(), at: OffsetDateTime::now_utc() }
    }

    /// JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an event always serializes")
    }

    /// Decodes an event.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("invalid event: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_on_their_subjects() {
        let event = Event::now(EventKind::Killswitch, "SOFT pause");
        assert_eq!(Event::decode(&event.encode()).unwrap(), event);
        assert_eq!(EventKind::Dlq.subject().to_string(), "mesh.events.dlq");
    }
}
