//! Sending into the mesh: validate the target against the registry, make sure
//! the target's durable consumers exist (so nothing published is missed), then
//! publish with the envelope id as `Nats-Msg-Id` and wait for JetStream's ack.
//! Both steps are retried while JetStream does not answer (see
//! [`mesh_runtime::backoff`]); a retried publish keeps its id, so it is
//! stored once.

use std::time::Duration;

use async_nats::jetstream::context::PublishError;
use futures::StreamExt;
use mesh_protocol::layout::{ConsumerTuning, MSG_ID_HEADER};
use mesh_protocol::{AgentId, AgentIdError, Envelope, EnvelopeError, Priority, Recipient, Registry};
use mesh_runtime::backoff;
use mesh_runtime::nats::{self, NatsError};
use uuid::Uuid;

use crate::command::table::edit_distance;

/// Consumers checked at once before a broadcast.
const ENSURE_PARALLELISM: usize = 32;

/// Why a message was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    InvalidId(#[from] AgentIdError),
    #[error("unknown agent {id:?}{hint} (known: {known})")]
    UnknownAgent { id: String, hint: String, known: String },
    #[error("agent {0:?} is inactive; set its status to \"active\" in the registry to message it")]
    Inactive(String),
    #[error("no active agents in the registry; add one before broadcasting")]
    NoActiveAgents,
    #[error(transparent)]
    Invalid(#[from] EnvelopeError),
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error("JetStream did not accept the message: {0}; nothing was sent, try again")]
    NotAccepted(#[source] backoff::Failure<PublishError>),
    #[error("JetStream did not accept the message: a human recipient has no inbox; nothing was sent")]
    NoInbox,
    #[error(
        "JetStream did not confirm message {id} within {waited_s}s ({error}): it may have been stored and will then \
         be delivered; check the NATS servers before sending it again (a new send is a new message)"
    )]
    Unconfirmed {
        id: Uuid,
        waited_s: u64,
        #[source]
        error: PublishError,
    },
}

/// What JetStream confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The envelope id.
    pub id: Uuid,
    /// Sequence in the agents stream.
    pub stream_seq: u64,
    /// True when JetStream already had this id (a retried send).
    pub duplicate: bool,
    /// Agents it is for.
    pub recipients: usize,
}

/// Checks a target id against the registry.
pub fn resolve_target<'r>(registry: &'r Registry, raw: &str) -> Result<&'r mesh_protocol::Agent, SendError> {
    let id = AgentId::parse(raw)?;
    let agent = registry.get(&id).ok_or_else(|| SendError::UnknownAgent {
        id: raw.to_owned(),
        hint: nearest(registry, raw).map(|n| format!("; did you mean {n:?}?")).unwrap_or_default(),
        known: registry.known_ids(),
    })?;
    if !agent.is_active() {
        return Err(SendError::Inactive(raw.to_owned()));
    }
    Ok(agent)
}

/// Checks an id against the registry, active or not (for reading commands).
pub fn resolve_any(registry: &Registry, raw: &str) -> Result<AgentId, SendError> {
    let id = AgentId::parse(raw)?;
    if registry.get(&id).is_none() {
        return Err(SendError::UnknownAgent {
            id: raw.to_owned(),
            hint: nearest(registry, raw).map(|n| format!("; did you mean {n:?}?")).unwrap_or_default(),
            known: registry.known_ids(),
        });
    }
    Ok(id)
}

/// The registered id closest to `raw`, if close enough to be a typo.
pub fn nearest(registry: &Registry, raw: &str) -> Option<String> {
    registry
        .agents()
        .map(|a| (edit_distance(a.id.as_str(), raw), a.id.as_str()))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, id)| id.to_owned())
}

/// Publishes an envelope and waits for JetStream's ack. A publish that got
/// no answer (a timeout, no stream leader, a reconnect) is sent again, always
/// with the same `Nats-Msg-Id`, for up to [`backoff::JETSTREAM`]'s bound:
/// JetStream stores it once, and says `duplicate` when an earlier attempt had
/// been stored after all.
pub async fn publish(js: &async_nats::jetstream::Context, envelope: &Envelope) -> Result<(u64, bool), SendError> {
    let payload = bytes::Bytes::from(envelope.encode()?);
    // An agent's message goes on the subject naming it as the sender (all its
    // listener's NATS user may publish on); a human's on the plain one.
    let subject = envelope.publish_subject().ok_or(SendError::NoInbox)?;
    let subject = subject.to_string();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(MSG_ID_HEADER, envelope.id.to_string().as_str());
    let (subject, headers, payload) = (&subject, &headers, &payload);
    let attempt =
        move || async move { js.publish_with_headers(subject.clone(), headers.clone(), payload.clone()).await?.await };
    match backoff::retry("publish", backoff::JETSTREAM, attempt).await {
        Ok(ack) => Ok((ack.sequence, ack.duplicate)),
        Err(backoff::Failure::GaveUp { last, waited, maybe_applied: true, .. }) => {
            Err(SendError::Unconfirmed { id: envelope.id, waited_s: waited.as_secs(), error: last })
        }
        Err(failure) => Err(SendError::NotAccepted(failure)),
    }
}

/// A validated message and the agents it is for, built without any I/O so
/// bad input is refused before NATS is even contacted.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The envelope to publish.
    pub envelope: Envelope,
    /// The agents whose consumers must exist before it is published, with the tuning a missing one gets.
    pub recipients: Vec<(AgentId, ConsumerTuning)>,
}

impl Prepared {
    /// Makes the message expire `ttl` after it is sent (`None`: never); see
    /// [`mesh_protocol::envelope::EXPIRY_SKEW_TOLERANCE`].
    pub fn with_ttl(mut self, ttl: Option<Duration>) -> Result<Self, SendError> {
        if let Some(ttl) = ttl {
            self.envelope = self.envelope.with_ttl(ttl)?;
            self.envelope.encode()?;
        }
        Ok(self)
    }
}

/// Validates a message to one agent.
pub fn prepare_send(
    registry: &Registry,
    from: &str,
    to: &str,
    text: &str,
    priority: Priority,
) -> Result<Prepared, SendError> {
    let agent = resolve_target(registry, to)?;
    let envelope = Envelope::new(from, Recipient::Agent(agent.id.clone()), text)?.with_priority(priority);
    envelope.encode()?;
    Ok(Prepared { envelope, recipients: vec![(agent.id.clone(), agent.consumer_tuning())] })
}

/// Validates a message to every active agent.
pub fn prepare_broadcast(
    registry: &Registry,
    from: &str,
    text: &str,
    priority: Priority,
) -> Result<Prepared, SendError> {
    let recipients: Vec<_> = registry.active().map(|a| (a.id.clone(), a.consumer_tuning())).collect();
    if recipients.is_empty() {
        return Err(SendError::NoActiveAgents);
    }
    let envelope = Envelope::new(from, Recipient::Broadcast, text)?.with_priority(priority);
    envelope.encode()?;
    Ok(Prepared { envelope, recipients })
}

/// Makes sure the recipients' consumers exist, publishes, and waits for the
/// ack. The streams must exist already (`nats::ensure_streams`, once per
/// connection: the bot's engine does it at start, the CLI before its publish).
pub async fn deliver(js: &async_nats::jetstream::Context, prepared: &Prepared) -> Result<Receipt, SendError> {
    let mut ensured = futures::stream::iter(
        prepared
            .recipients
            .iter()
            .cloned()
            .map(|(id, tuning)| async move { nats::ensure_consumer(js, &id, tuning).await }),
    )
    .buffer_unordered(ENSURE_PARALLELISM);
    while let Some(result) = ensured.next().await {
        result?;
    }
    let (stream_seq, duplicate) = publish(js, &prepared.envelope).await?;
    Ok(Receipt { id: prepared.envelope.id, stream_seq, duplicate, recipients: prepared.recipients.len() })
}

/// Sends `text` to one agent.
pub async fn send(
    js: &async_nats::jetstream::Context,
    registry: &Registry,
    from: &str,
    to: &str,
    text: &str,
    priority: Priority,
) -> Result<Receipt, SendError> {
    deliver(js, &prepare_send(registry, from, to, text, priority)?).await
}

/// Sends `text` to every active agent.
pub async fn broadcast(
    js: &async_nats::jetstream::Context,
    registry: &Registry,
    from: &str,
    text: &str,
    priority: Priority,
) -> Result<Receipt, SendError> {
    deliver(js, &prepare_broadcast(registry, from, text, priority)?).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        Registry::parse(
            r#"{"nova": {"hooks_token": "a", "hooks_url": "http://h/"},
                "kaan": {"hooks_token": "b", "hooks_url": "http://h/", "status": "inactive"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn targets_are_checked_with_helpful_errors() {
        let reg = registry();
        assert_eq!(resolve_target(&reg, "nova").unwrap().id.as_str(), "nova");
        assert_eq!(
            resolve_target(&reg, "nvoa").unwrap_err().to_string(),
            "unknown agent \"nvoa\"; did you mean \"nova\"? (known: kaan, nova)"
        );
        assert_eq!(resolve_target(&reg, "zed").unwrap_err().to_string(), "unknown agent \"zed\" (known: kaan, nova)");
        assert!(resolve_target(&reg, "kaan").unwrap_err().to_string().contains("is inactive"));
        assert!(resolve_target(&reg, "agents.*").unwrap_err().to_string().contains("subject separator"));
        assert!(resolve_target(&reg, "Nova").unwrap_err().to_string().contains("use \"nova\""));
    }
}
