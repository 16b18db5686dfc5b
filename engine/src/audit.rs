//! The audit trail: every command (who, where, what, the decision and the
//! outcome) is appended to the JetStream stream `MESH_AUDIT`; `audit [n]`
//! reads the newest entries back.

use async_nats::jetstream;
use mesh_protocol::layout;
use mesh_protocol::subject::Subject;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// One audited command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Who (`slack:U123`, `discord:42`, `terminal`, `agent:nova`).
    pub who: String,
    /// `slack`, `discord`, `cli`, or an agent's front end: `http` (`/v1/messages`) or `mcp`.
    pub platform: String,
    /// The channel it was given in.
    pub channel: Option<String>,
    /// The command line as typed (cut to 2000 characters).
    pub line: String,
    /// `allowed`, `denied`, `limited`, `invalid`, `confirmation required`, `duplicate`.
    pub decision: String,
    /// What happened, in one line.
    pub outcome: String,
    /// Message ids it produced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub message_ids: Vec<String>,
}

/// Why the audit trail could not be written or read (each keeps its cause).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The platform name is no subject token.
    #[error(transparent)]
    Subject(#[from] mesh_protocol::subject::SubjectError),
    /// The record cannot be encoded.
    #[error(transparent)]
    Encode(#[from] serde_json::Error),
    /// JetStream did not take or confirm the record.
    #[error(transparent)]
    Publish(#[from] jetstream::context::PublishError),
    /// The audit stream cannot be read.
    #[error(transparent)]
    Stream(#[from] jetstream::context::GetStreamError),
    /// The audit stream's state cannot be read.
    #[error(transparent)]
    Info(#[from] jetstream::context::RequestError),
}

/// Appends a record; waits for JetStream's ack.
pub async fn append(js: &jetstream::Context, record: &AuditRecord) -> Result<(), AuditError> {
    let subject = Subject::audit(&record.platform)?;
    let payload = serde_json::to_vec(record)?;
    js.publish(subject.to_string(), payload.into()).await?.await?;
    Ok(())
}

/// The newest `n` records, newest first.
pub async fn newest(js: &jetstream::Context, n: usize) -> Result<Vec<AuditRecord>, AuditError> {
    let stream = js.get_stream(layout::audit_stream(1).name).await?;
    let info = stream.get_info().await?;
    let (first, mut seq) = (info.state.first_sequence, info.state.last_sequence);
    let mut out = Vec::new();
    while out.len() < n && seq >= first && seq > 0 {
        if let Ok(message) = stream.get_raw_message(seq).await
            && let Ok(record) = serde_json::from_slice::<AuditRecord>(&message.payload)
        {
            out.push(record);
        }
        seq -= 1;
    }
    Ok(out)
}

/// Cuts a command line for the record.
pub fn clip(line: &str) -> String {
    line.chars().take(2000).collect()
}
