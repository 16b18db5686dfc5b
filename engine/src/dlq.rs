//! Dead letters: list them (`mesh dlq [agent]`) and replay them
//! (`mesh dlq replay <agent> [n]`): each is re-published as a new message
//! with the original text, sender, kind, `reply_to` and hop count and a note
//! that it is a replay, and removed from the dead-letter stream only after
//! the new publish was acked. The replay's id (its `Nats-Msg-Id`) is derived
//! from the dead letter's identity (agent, message id, store time), so a replay run
//! again after a crash between publish and removal, or two operators
//! replaying at once, store it once (JetStream's 2-minute duplicate window),
//! and its deliveries share one `Idempotency-Key` after that window too.
//! Each dead letter of a batch is reported on its own; a `duplicate` ack is
//! trusted only after reading back the stored message.

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::stream::{DeleteMessageErrorKind, LastRawMessageErrorKind, Stream};
use mesh_protocol::dead_letter::DeadLetter;
use mesh_protocol::envelope::Arrival;
use mesh_protocol::layout;
use mesh_protocol::subject::{self, Subject};
use mesh_protocol::{AgentId, Envelope, Recipient, Registry};
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

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
    /// The message's id as the listener knew it (absent on dead letters
    /// stored before the header existed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<Uuid>,
    /// The original bytes.
    #[serde(skip)]
    pub payload: bytes::Bytes,
    /// What names this dead letter across restores: its dedup id
    /// ([`DeadLetter::msg_id`]: agent, message id, store time), absent on
    /// dead letters stored before those headers existed.
    #[serde(skip)]
    pub identity: Option<String>,
}

/// Errors reading or replaying dead letters.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("cannot read the dead-letter stream: {0}")]
    Read(#[source] mesh_runtime::nats::Cause),
    #[error(transparent)]
    Send(#[from] SendError),
    #[error(
        "dead letter {seq} was replayed as {id} but could not be removed: {reason}; replaying it again within 2 minutes stores nothing new (same id), later it would be delivered again with the same Idempotency-Key: remove it by hand"
    )]
    NotRemoved { seq: u64, id: uuid::Uuid, reason: String },
}

async fn dlq_stream(js: &async_nats::jetstream::Context) -> Result<Stream, DlqError> {
    // The streams exist: the engine's mesh created them at start (`NatsMesh::open`), with the configured replicas.
    js.get_stream(layout::dead_letter_stream(1).name).await.map_err(|e| DlqError::Read(e.into()))
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
            Err(e) => return Err(DlqError::Read(e.into())),
        };
        seq = message.sequence + 1;
        if let Some(entry) = entry_of(message) {
            out.push(entry);
        }
    }
    Ok(out)
}

/// The dead letter a stream message holds; `None` for a message without the dead-letter headers.
fn entry_of(message: async_nats::jetstream::message::StreamMessage) -> Option<DeadLetterEntry> {
    let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
    let record = DeadLetter::from_headers(header)?;
    let arrival =
        Arrival { to: Recipient::Agent(record.agent.clone()), fallback_id: uuid::Uuid::nil(), stored_at: message.time };
    let text = Envelope::decode(&message.payload, &arrival).ok().map(|(e, _)| e.text);
    let identity =
        (!record.message_id.is_nil() && record.stored_at != OffsetDateTime::UNIX_EPOCH).then(|| record.msg_id());
    Some(DeadLetterEntry {
        dlq_seq: message.sequence,
        agent: record.agent.to_string(),
        reason: record.reason,
        status: record.status,
        attempts: record.attempts,
        at: message.time,
        text,
        message_id: Some(record.message_id).filter(|id| !id.is_nil()),
        identity,
        payload: message.payload,
    })
}

/// The id of the replay of a dead letter named by `key`: the first 16 bytes
/// of a SHA-256 over it, stamped as a version 8 (custom) UUID. The key is the
/// dead letter's identity ([`DeadLetterEntry::identity`]: agent, message id
/// and store time, the same after `mesh restore` renumbers `MESH_DLQ`, and
/// the same for two dead letters of one stored message); for a dead letter
/// stored before those headers existed, the original's id and the dead
/// letter's sequence ([`replay_key`]).
pub fn replay_id(key: &str) -> Uuid {
    let digest = Sha256::new().chain_update(b"mesh.replay.id/v2").chain_update(key.as_bytes()).finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// The key [`replay_id`] hashes for `entry`, whose message had id `original`.
pub fn replay_key(entry: &DeadLetterEntry, original: Uuid) -> String {
    match &entry.identity {
        Some(identity) => identity.clone(),
        None => format!("legacy-{}-{original}-{}", entry.agent, entry.dlq_seq),
    }
}

/// The envelope a replay publishes: the id [`replay_id`] derives, the
/// original's sender, text, kind, priority, `reply_to`, hop count and
/// metadata, and a note in its metadata. It has no expiry: replaying is an
/// operator's decision that the message is still wanted (an expired one
/// included), so the original's `expires_at` is dropped rather than renewed.
pub fn replay_envelope(entry: &DeadLetterEntry, agent: &AgentId) -> Option<Envelope> {
    // A body without an id (legacy, plain text) has the one the listener derived, kept in the headers.
    let fallback_id = entry.message_id.unwrap_or_default();
    let arrival = Arrival { to: Recipient::Agent(agent.clone()), fallback_id, stored_at: entry.at };
    let (original, _) = Envelope::decode(&entry.payload, &arrival).ok()?;
    let mut replay =
        Envelope::new(original.from.clone(), Recipient::Agent(agent.clone()), original.text.clone()).ok()?;
    replay.id = replay_id(&replay_key(entry, original.id));
    replay.kind = original.kind;
    replay.priority = original.priority;
    replay.reply_to = original.reply_to.clone();
    replay.hops = original.hops;
    replay.metadata = original.metadata.clone();
    replay.metadata.insert(REPLAY_OF.into(), original.id.to_string());
    replay.metadata.insert("dead_letter_reason".into(), entry.reason.clone());
    Some(replay)
}

/// What a replay did, per dead letter.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    /// New message ids, by dead-letter sequence.
    pub replayed: Vec<(u64, String)>,
    /// Dead letters whose replay was stored (by this run or an earlier
    /// one) but which another replay removed first, with the replay's id.
    pub already_removed: Vec<(u64, String)>,
    /// Dead letters left alone, with why.
    pub skipped: Vec<(u64, String)>,
    /// Dead letters that failed, with what to do: kept (or replayed but
    /// not removed) as the reason says.
    pub failed: Vec<(u64, String)>,
}

impl ReplayReport {
    /// One line per dead letter, in the order above.
    pub fn lines(&self) -> Vec<String> {
        let replayed = self.replayed.iter().map(|(seq, id)| format!("dead letter {seq} replayed as {id}"));
        let removed = self.already_removed.iter().map(|(seq, id)| {
            format!("dead letter {seq} replayed as {id} (another replay had already removed it: delivered once)")
        });
        let skipped = self.skipped.iter().map(|(seq, why)| format!("dead letter {seq} skipped: {why}"));
        let failed = self.failed.iter().map(|(seq, why)| format!("dead letter {seq} failed: {why}"));
        replayed.chain(removed).chain(skipped).chain(failed).collect()
    }

    /// Whether nothing was there to replay.
    pub fn is_empty(&self) -> bool {
        self.replayed.is_empty() && self.already_removed.is_empty() && self.skipped.is_empty() && self.failed.is_empty()
    }
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
    mesh_runtime::nats::ensure_consumer(js, &target.id, target.consumer_tuning()).await.map_err(SendError::from)?;
    replay_entries(js, &target.id, entries).await
}

/// Replays the one dead letter of `agent` stored at `seq` in the
/// dead-letter stream (what a notification's Replay button names). The
/// sequence is checked: a dead letter no longer stored (replayed already,
/// removed) or not `agent`'s gives an empty report and replays nothing.
pub async fn replay_one(
    js: &async_nats::jetstream::Context,
    registry: &Registry,
    agent: &str,
    seq: u64,
) -> Result<ReplayReport, DlqError> {
    let target = publish::resolve_target(registry, agent)?;
    let stream = dlq_stream(js).await?;
    let message = match stream.get_raw_message(seq).await {
        Ok(message) => message,
        Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => return Ok(ReplayReport::default()),
        Err(e) => return Err(DlqError::Read(e.into())),
    };
    let theirs = message.subject.as_str() == Subject::DeadLetter(target.id.clone()).to_string();
    let Some(entry) = entry_of(message).filter(|e| theirs && e.dlq_seq == seq) else {
        return Ok(ReplayReport::default());
    };
    mesh_runtime::nats::ensure_consumer(js, &target.id, target.consumer_tuning()).await.map_err(SendError::from)?;
    replay_entries(js, &target.id, vec![entry]).await
}

/// Whether deleting a dead letter failed because it is no longer there:
/// nats-server answers 10043 (sequence not found) or 10057 ("no message
/// found") for a message another replay removed.
fn already_removed(kind: &DeleteMessageErrorKind) -> bool {
    match kind {
        DeleteMessageErrorKind::JetStream(e) => {
            e.error_code() == ErrorCode::SEQUENCE_NOT_FOUND
                || (e.error_code() == ErrorCode::STREAM_MESSAGE_DELETE_FAILED
                    && e.to_string().contains("no message found"))
        }
        _ => false,
    }
}

/// Replays `entries` (listed before) for `agent`, each on its own: one
/// that fails is reported and the batch goes on, except after a failed
/// publish (NATS is likely unreachable), which reports the rest as not
/// attempted.
pub async fn replay_entries(
    js: &async_nats::jetstream::Context,
    agent: &AgentId,
    entries: Vec<DeadLetterEntry>,
) -> Result<ReplayReport, DlqError> {
    let stream = dlq_stream(js).await?;
    let mut report = ReplayReport::default();
    let mut entries = entries.into_iter();
    while let Some(entry) = entries.next() {
        let Some(envelope) = replay_envelope(&entry, agent) else {
            report
                .skipped
                .push((entry.dlq_seq, "payload does not decode to a message; inspect it and fix the sender".into()));
            continue;
        };
        // The same id on every attempt: a replay stored before (a crash
        // before the removal, another operator) is answered `duplicate`.
        let (seq, duplicate) = match publish::publish(js, &envelope).await {
            Ok(ack) => ack,
            Err(e) => {
                report.failed.push((entry.dlq_seq, format!("{e}; the dead letter is kept: replay it again")));
                for rest in entries.by_ref() {
                    let why = "not attempted after the failed publish above; the dead letter is kept: replay it again";
                    report.failed.push((rest.dlq_seq, why.into()));
                }
                break;
            }
        };
        if duplicate && let Err(why) = stored_replay_matches(js, seq, &envelope).await {
            report.failed.push((entry.dlq_seq, why));
            continue;
        }
        match stream.delete_message(entry.dlq_seq).await {
            Ok(_) => report.replayed.push((entry.dlq_seq, envelope.id.to_string())),
            Err(e) if already_removed(&e.kind()) => {
                report.already_removed.push((entry.dlq_seq, envelope.id.to_string()));
            }
            Err(e) => report.failed.push((
                entry.dlq_seq,
                DlqError::NotRemoved { seq: entry.dlq_seq, id: envelope.id, reason: e.to_string() }.to_string(),
            )),
        }
    }
    Ok(report)
}

/// Checks that the message a `duplicate` ack points at (agents stream
/// sequence `seq`) is this replay: same id, subject, sender, text, kind,
/// `reply_to`, hop count and origin. Anything else (a message someone
/// stored under the predictable replay id) keeps the dead letter.
async fn stored_replay_matches(js: &async_nats::jetstream::Context, seq: u64, replay: &Envelope) -> Result<(), String> {
    let keep = "the dead letter is kept; inspect the agents stream message and remove the dead letter by hand once it is handled";
    let stream = js
        .get_stream(layout::agents_stream(1).name)
        .await
        .map_err(|e| format!("cannot check the stored replay {}: {e}; {keep}", replay.id))?;
    let stored = stream
        .get_raw_message(seq)
        .await
        .map_err(|e| format!("cannot read the stored replay {} (sequence {seq}): {e}; {keep}", replay.id))?;
    let arrival = Arrival { to: replay.to.clone(), fallback_id: Uuid::nil(), stored_at: stored.time };
    let same = replay.publish_subject().is_some_and(|s| s.to_string() == stored.subject.as_str())
        && Envelope::decode(&stored.payload, &arrival).is_ok_and(|(e, _)| {
            e.id == replay.id
                && e.from == replay.from
                && e.text == replay.text
                && e.kind == replay.kind
                && e.reply_to == replay.reply_to
                && e.hops == replay.hops
                && e.metadata.get(REPLAY_OF) == replay.metadata.get(REPLAY_OF)
        });
    if same {
        Ok(())
    } else {
        Err(format!(
            "replay id {} is already taken by another message (agents stream sequence {seq}), not this replay; {keep}",
            replay.id
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_is_a_new_message_with_the_original_text_and_a_note() {
        let mut original = Envelope::new("kaan", Recipient::Agent("nova".parse().unwrap()), "hello")
            .unwrap()
            .with_reply_to(&Subject::new_reply());
        original.kind = mesh_protocol::Kind::Ask;
        original.hops = 2;
        let entry = DeadLetterEntry {
            dlq_seq: 7,
            agent: "nova".into(),
            reason: "gateway answered HTTP 404; not retried".into(),
            status: Some(404),
            attempts: 1,
            at: OffsetDateTime::UNIX_EPOCH,
            text: Some("hello".into()),
            message_id: Some(original.id),
            payload: original.encode().unwrap().into(),
            identity: None,
        };
        let replay = replay_envelope(&entry, &"nova".parse().unwrap()).unwrap();
        assert_ne!(replay.id, original.id);
        assert_eq!((replay.from.as_str(), replay.text.as_str()), ("kaan", "hello"));
        assert_eq!(replay.metadata[REPLAY_OF], original.id.to_string());
        assert_eq!((replay.kind, replay.hops, &replay.reply_to), (original.kind, 2, &original.reply_to));
        // Derived, not random: a second replay of the same dead letter has the same id.
        let again = replay_envelope(&entry, &"nova".parse().unwrap()).unwrap();
        assert_eq!((again.id, replay.id.get_version_num()), (replay.id, 8));
        assert_eq!(replay.id, replay_id(&format!("legacy-nova-{}-7", original.id)), "no identity: the sequence");
        let named = DeadLetterEntry { identity: Some("dlq-nova-x-1".into()), ..entry.clone() };
        let renumbered = DeadLetterEntry { dlq_seq: 1, ..named.clone() };
        let nova = "nova".parse().unwrap();
        let (a, b) = (replay_envelope(&named, &nova).unwrap(), replay_envelope(&renumbered, &nova).unwrap());
        assert_eq!(a.id, b.id, "named by its identity, not its sequence");
        // An expired message replays without its expiry.
        let expiring = original.clone().with_ttl(std::time::Duration::from_secs(2)).unwrap();
        let expired = DeadLetterEntry {
            reason: "expired: its time to live ended at 2026-11-30T15:00:00Z; not delivered".into(),
            payload: expiring.encode().unwrap().into(),
            ..entry.clone()
        };
        let replay = replay_envelope(&expired, &"nova".parse().unwrap()).unwrap();
        assert_eq!((replay.expires_at, replay.text.as_str()), (None, "hello"));
        assert!(replay.metadata["dead_letter_reason"].starts_with("expired"));
        let garbage = DeadLetterEntry { payload: bytes::Bytes::from_static(&[0xff]), ..entry };
        assert!(replay_envelope(&garbage, &"nova".parse().unwrap()).is_none());
    }
}
