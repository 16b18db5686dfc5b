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

/// Whether `answer`, arrived on an ask's answer subject, is `asked`'s answer
/// to `question`: its `from` must be the asked agent and its `in_reply_to`
/// the question's id. Anything else (a confused or forging publisher) is not
/// shown to the asker; `Err` says why, for the log.
pub fn check_answer(answer: &Envelope, asked: &str, question: Uuid) -> Result<(), String> {
    if answer.from != asked {
        return Err(format!("answer claims to be from {:?}, but {asked} was asked", answer.from));
    }
    let answered = answer.metadata.get(IN_REPLY_TO).map(String::as_str);
    if answered != Some(question.to_string().as_str()) {
        return Err(format!("answer is in reply to {answered:?}, not to the question {question}"));
    }
    Ok(())
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

    #[test]
    fn only_the_asked_agents_answer_to_the_question_is_shown() {
        let question = Uuid::now_v7();
        let answer = |from: &str, to: Option<Uuid>| {
            let mut e = Envelope::new(from, Recipient::Sender("slack:U1".into()), "yes").unwrap();
            if let Some(id) = to {
                e.metadata.insert(IN_REPLY_TO.to_owned(), id.to_string());
            }
            e
        };
        assert!(check_answer(&answer("ada", Some(question)), "ada", question).is_ok());
        let forged = check_answer(&answer("slack:U1", Some(question)), "ada", question).unwrap_err();
        assert!(forged.contains("but ada was asked"), "{forged}");
        assert!(check_answer(&answer("nova", Some(question)), "ada", question).is_err());
        let other = check_answer(&answer("ada", Some(Uuid::now_v7())), "ada", question).unwrap_err();
        assert!(other.contains("not to the question"), "{other}");
        assert!(check_answer(&answer("ada", None), "ada", question).is_err());
    }
}
