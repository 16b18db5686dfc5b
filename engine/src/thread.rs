//! An agent's answer to a message: it carries the hop count of the message it
//! answers plus one, and the loop guard refuses it past the hop limit, so two
//! agents that answer every message cannot ping-pong forever. Pure.

use mesh_protocol::{Envelope, Kind};
use uuid::Uuid;

/// Metadata key naming the message an envelope answers (chat replies use it too).
pub const IN_REPLY_TO: &str = "in_reply_to";

/// Why an answer was refused.
#[derive(Debug, thiserror::Error)]
pub enum ThreadError {
    /// Past the hop limit.
    #[error(
        "loop guard: message {in_reply_to} is already {depth} replies deep and the limit is {max_hops} (--max-hops); this conversation has to stop here, or start a new one without in_reply_to"
    )]
    LoopGuard {
        /// The message answered.
        in_reply_to: Uuid,
        /// How many replies deep it already is.
        depth: u8,
        /// The limit.
        max_hops: u8,
    },
    /// The marked envelope no longer encodes (too large).
    #[error(transparent)]
    Envelope(#[from] mesh_protocol::envelope::EnvelopeError),
}

/// The message a `send` answers, as the front end found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thread {
    /// The id of the message answered.
    pub in_reply_to: Uuid,
    /// The answer's hop count: the answered message's plus one.
    pub hops: u8,
    /// The most hops an answer may carry (`--max-hops`).
    pub max_hops: u8,
}

impl Thread {
    /// An answer to a message that carried `hops`.
    pub fn answering(in_reply_to: Uuid, hops: u8, max_hops: u8) -> Self {
        Self { in_reply_to, hops: hops.saturating_add(1), max_hops }
    }

    /// Marks `envelope` as this answer, or refuses it past the hop limit.
    pub fn stamp(&self, envelope: &mut Envelope) -> Result<(), ThreadError> {
        if self.hops > self.max_hops {
            return Err(ThreadError::LoopGuard {
                in_reply_to: self.in_reply_to,
                depth: self.hops - 1,
                max_hops: self.max_hops,
            });
        }
        if envelope.kind == Kind::Message {
            envelope.kind = Kind::Reply;
        }
        envelope.hops = self.hops;
        envelope.metadata.insert(IN_REPLY_TO.to_owned(), self.in_reply_to.to_string());
        envelope.encode().map(|_| ()).map_err(ThreadError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_protocol::{AgentId, Recipient};

    #[test]
    fn answers_count_hops_and_stop_at_the_limit() {
        let original = Uuid::now_v7();
        let to = Recipient::Agent(AgentId::parse("kaan").unwrap());
        let mut answer = Envelope::new("nova", to.clone(), "ok").unwrap();
        Thread::answering(original, 3, 4).stamp(&mut answer).unwrap();
        assert_eq!((answer.kind, answer.hops), (Kind::Reply, 4));
        assert_eq!(answer.metadata.get(IN_REPLY_TO), Some(&original.to_string()));
        let mut one_too_many = Envelope::new("nova", to, "ok").unwrap();
        let err = Thread::answering(original, 4, 4).stamp(&mut one_too_many).unwrap_err().to_string();
        assert!(err.starts_with("loop guard: message") && err.contains("limit is 4"), "{err}");
        assert_eq!(Thread::answering(original, u8::MAX, u8::MAX).hops, u8::MAX);
    }
}
