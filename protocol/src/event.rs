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
    /// The agent it is about, when one is (an agent down, an agent's dead
    /// letters, a kill switch pulled for one agent): a notification's
    /// buttons name it. Absent in events from older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The dead-letter stream sequence of the dead letter a `dlq` event
    /// announces (the newest of the pile-up): its Replay button replays
    /// that one only. Absent in other events and in older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<u64>,
}

impl Event {
    /// An event happening now.
    pub fn now(kind: EventKind, text: impl Into<String>) -> Self {
        Self { kind, text: text.into(), at: OffsetDateTime::now_utc(), agent: None, dead_letter: None }
    }

    /// The event, about `agent`.
    pub fn about(mut self, agent: impl Into<String>) -> Self {
        self.agent = Some(agent.into());
        self
    }

    /// The event, announcing the dead letter stored at `seq` in the dead-letter stream.
    pub fn dead_letter(mut self, seq: u64) -> Self {
        self.dead_letter = Some(seq);
        self
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
        let about = Event::now(EventKind::Agent, "agent nova is down").about("nova");
        assert_eq!(Event::decode(&about.encode()).unwrap(), about);
        let old = br#"{"kind":"agent","text":"agent nova is down","at":"2026-03-01T12:00:00Z"}"#;
        assert_eq!(Event::decode(old).unwrap().agent, None, "events of older versions still read");
        let dead = Event::now(EventKind::Dlq, "1 new dead letters").about("nova").dead_letter(42);
        assert_eq!(Event::decode(&dead.encode()).unwrap().dead_letter, Some(42));
        assert_eq!(Event::decode(old).unwrap().dead_letter, None);
    }
}
