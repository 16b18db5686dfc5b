//! Dead letters: list them (`mesh dlq [agent]`) and replay them
//! (`mesh dlq replay <agent> [n]`): each is re-published as a new message
//! with the original text and a note that it is a replay, and removed from
//! the dead-letter stream only after the new publish was acked.

use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use mesh_protocol::dead_letter::DeadLetter;
use mesh_protocol::envelope::Arrival;
use mesh_protocol::layout;
use mesh_protocol::subject::{self, Subject};
use mesh_protocol::{AgentId, Envelope, Recipient, Registry};
use serde::Serialize;
use time::OffsetDateTime;

use crate::publish::{self, SendError};

/// Metadata key naming the dead letter a replay came from.
pub const REPLAY_OF: &str = "replay_of";

/// One dead letter as listed.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterEntry {
    /// Sequence in the dead-letter stream.
    pub dlq_seq: u64,
    /// The agent it was for.
    pub agent: String,
    /// Why it was given up.
    pub reason: String,
    /// The gateway's last HTTP status.
    pub status: Option<u16>,
    /// Deliveries attempted.
    pub attempts: u64,
    /// When it was dead-lettered.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The text, when the payload decodes.
    pub text: Option<String>,
    /// The original bytes.
    #[serde(skip)]
    pub payload: bytes::Bytes,
}

/// Errors reading or replaying dead letters.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("cannot read the dead-letter stream: {0}")]
    Read(String),
    #[error(transparent)]
    Send(#[from] SendError),
    #[error(
        "dead letter {seq} was replayed as {id} but could not be removed: {reason}; remove it by hand to avoid a second replay"
    )]
    NotRemoved { seq: u64, id: uuid::Uuid, reason: String },
}

async fn dlq_stream(js: &async_nats::jetstream::Context) -> Result<Stream, DlqError> {
    // The streams exist: the engine's mesh created them at start (`NatsMesh::open`), with the configured replicas.
    js.get_stream(layout::dead_letter_stream(1).name).await.map_err(|e| DlqError::Read(e.to_string()))
}

/// Lists up to `limit` dead letters, oldest first, for one agent or all.
pub async fn list(
    js: &async_nats::jetstream::Context,
    agent: Option<&AgentId>,
    limit: usize,
) -> Result<Vec<DeadLetterEntry>, DlqError> {
    let stream = dlq_stream(js).await?;
    let filter = match agent {
        Some(id) => Subject::DeadLetter(id.clone()).to_string(),
        None => subject::ALL_DEAD_LETTERS.to_owned(),
    };
    let mut out = Vec::new();
    let mut seq = 1;
    while out.len() < limit {
        let message = match stream.raw_message_builder().sequence(seq).next_by_subject(filter.clone()).send().await {
            Ok(message) => message,
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => break,
            Err(e) => return Err(DlqError::Read(e.to_string())),
        };
        seq = message.sequence + 1;
        let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
        let Some(record) = DeadLetter::from_headers(header) else { continue };
        let arrival = Arrival {
            to: Recipient::Agent(record.agent.clone()),
            fallback_id: uuid::Uuid::nil(),
            stored_at: message.time,
        };
        let text = Envelope::decode(&message.payload, &arrival).ok().map(|(e, _)| e.text);
        out.push(DeadLetterEntry {
            dlq_seq: message.sequence,
            agent: record.agent.to_string(),
            reason: record.reason,
            status: record.status,
            attempts: record.attempts,
            at: message.time,
            text,
            payload: message.payload,
        });
    }
    Ok(out)
}

/// The envelope a replay publishes: new id, original text and sender, and a
/// note in its metadata.
pub fn replay_envelope(entry: &DeadLetterEntry, agent: &AgentId) -> Option<Envelope> {
    let arrival = Arrival { to: Recipient::Agent(agent.clone()), fallback_id: uuid::Uuid::nil(), stored_at: entry.at };
    let (original, _) = Envelope::decode(&entry.payload, &arrival).ok()?;
    let mut replay =
        Envelope::new(original.from.clone(), Recipient::Agent(agent.clone()), original.text.clone()).ok()?;
    replay.priority = original.priority;
    replay.metadata = original.metadata.clone();
    replay.metadata.insert(REPLAY_OF.into(), original.id.to_string());
    replay.metadata.insert("dead_letter_reason".into(), entry.reason.clone());
    Some(replay)
}

/// What a replay did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    /// New message ids, by dead-letter sequence.
    pub replayed: Vec<(u64, String)>,
    /// Dead letters left alone, with why.
    pub skipped: Vec<(u64, String)>,
}

/// Replays up to `n` dead letters of `agent`, oldest first.
pub async fn replay(
    js: &async_nats::jetstream::Context,
    registry: &Registry,
    agent: &str,
    n: usize,
) -> Result<ReplayReport, DlqError> {
    let target = publish::resolve_target(registry, agent)?;
    let entries = list(js, Some(&target.id), n).await?;
    let stream = dlq_stream(js).await?;
    mesh_runtime::nats::ensure_consumer(js, &target.id, target.consumer_tuning()).await.map_err(SendError::from)?;
    let mut report = ReplayReport::default();
    for entry in entries {
        let Some(envelope) = replay_envelope(&entry, &target.id) else {
            report
                .skipped
                .push((entry.dlq_seq, "payload does not decode to a message; inspect it and fix the sender".into()));
            continue;
        };
        publish::publish(js, &envelope).await?;
        stream.delete_message(entry.dlq_seq).await.map_err(|e| DlqError::NotRemoved {
            seq: entry.dlq_seq,
            id: envelope.id,
            reason: e.to_string(),
        })?;
        report.replayed.push((entry.dlq_seq, envelope.id.to_string()));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_is_a_new_message_with_the_original_text_and_a_note() {
        let original = Envelope::new("kaan", Recipient::Agent("nova".parse().unwrap()), "hello").unwrap();
        let entry = DeadLetterEntry {
            dlq_seq: 7,
            agent: "nova".into(),
            reason: "gateway answered HTTP 404; not retried".into(),
            status: Some(404),
            attempts: 1,
            at: OffsetDateTime::UNIX_EPOCH,
            text: Some("hello".into()),
            payload: original.encode().unwrap().into(),
        };
        let replay = replay_envelope(&entry, &"nova".parse().unwrap()).unwrap();
        assert_ne!(replay.id, original.id);
        assert_eq!((replay.from.as_str(), replay.text.as_str()), ("kaan", "hello"));
        assert_eq!(replay.metadata[REPLAY_OF], original.id.to_string());
        let garbage = DeadLetterEntry { payload: bytes::Bytes::from_static(&[0xff]), ..entry };
        assert!(replay_envelope(&garbage, &"nova".parse().unwrap()).is_none());
    }
}
