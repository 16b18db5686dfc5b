//! Pulling and releasing the kill switch: entries in the JetStream bucket that
//! every listener follows, plus an event for the chat channels. Listeners
//! enforce it (they stop pulling), so no agent can ignore it, and a soft
//! kill ends at its deadline even when nothing else runs.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use mesh_protocol::event::{Event, EventKind};
use mesh_protocol::killswitch::{self, KillState, Mode, Scope};
use mesh_protocol::{AgentId, layout};
use time::OffsetDateTime;

/// Errors reading or writing the switch.
#[derive(Debug, thiserror::Error)]
pub enum KillSwitchError {
    #[error("cannot reach the kill switch bucket: {0}; check that nats-server runs with JetStream enabled (-js)")]
    Bucket(String),
    #[error("cannot write the kill switch: {0}")]
    Write(String),
    #[error("a soft kill lasts between 1 second and 24 hours, not {0:?}")]
    BadDuration(Duration),
}

/// The kill switch of one mesh.
#[derive(Debug, Clone)]
pub struct KillSwitch {
    store: kv::Store,
    js: jetstream::Context,
}

/// Longest soft kill.
pub const MAX_SOFT: Duration = Duration::from_secs(24 * 3600);

impl KillSwitch {
    /// Opens the bucket (creating it when missing).
    pub async fn open(js: &jetstream::Context) -> Result<Self, KillSwitchError> {
        let replicas = mesh_runtime::nats::replicas_from_env().map_err(|e| KillSwitchError::Bucket(e.to_string()))?;
        let store =
            mesh_runtime::kill_bucket::open(js, replicas).await.map_err(|e| KillSwitchError::Bucket(e.to_string()))?;
        Ok(Self { store, js: js.clone() })
    }

    /// Pulls the switch for `scope`.
    pub async fn pull(
        &self,
        scope: &Scope,
        mode: Mode,
        duration: Option<Duration>,
        by: &str,
        reason: Option<String>,
    ) -> Result<KillState, KillSwitchError> {
        let now = OffsetDateTime::now_utc();
        let until = match mode {
            Mode::Soft => {
                let d = duration.unwrap_or(killswitch::DEFAULT_SOFT);
                if d.is_zero() || d > MAX_SOFT {
                    return Err(KillSwitchError::BadDuration(d));
                }
                Some(now + d)
            }
            _ => None,
        };
        let state = KillState { mode, until, by: by.to_owned(), reason, at: now };
        self.write(scope, &state).await?;
        Ok(state)
    }

    /// Releases the switch for `scope` (records who released it).
    pub async fn release(&self, scope: &Scope, by: &str) -> Result<(), KillSwitchError> {
        let state =
            KillState { mode: Mode::None, until: None, by: by.to_owned(), reason: None, at: OffsetDateTime::now_utc() };
        self.write(scope, &state).await
    }

    async fn write(&self, scope: &Scope, state: &KillState) -> Result<(), KillSwitchError> {
        self.store.put(scope.key(), state.encode().into()).await.map_err(|e| KillSwitchError::Write(e.to_string()))?;
        let text = match state.mode {
            Mode::None => format!("kill switch released for {scope} by {}", state.by),
            _ => format!("kill switch pulled: {}", describe(scope, state)),
        };
        crate::events::publish(&self.js, &Event::now(EventKind::Killswitch, text)).await;
        Ok(())
    }

    /// The entry of one scope, if any.
    pub async fn get(&self, scope: &Scope) -> Result<Option<KillState>, KillSwitchError> {
        match self.store.get(scope.key()).await {
            Ok(Some(bytes)) => Ok(KillState::decode(&bytes).ok()),
            Ok(None) => Ok(None),
            Err(e) => Err(KillSwitchError::Bucket(e.to_string())),
        }
    }

    /// Every entry in force now.
    pub async fn in_force(&self) -> Result<Vec<(Scope, KillState)>, KillSwitchError> {
        let now = OffsetDateTime::now_utc();
        let mut keys = self.store.keys().await.map_err(|e| KillSwitchError::Bucket(e.to_string()))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| KillSwitchError::Bucket(e.to_string()))?;
            let Some(scope) = Scope::from_key(&key) else { continue };
            if let Some(state) = self.get(&scope).await?
                && state.in_force(now)
            {
                out.push((scope, state));
            }
        }
        Ok(out)
    }

    /// The pause in force for an agent (or, with `None`, the global one).
    pub async fn effective(&self, agent: Option<&AgentId>) -> Result<Option<KillState>, KillSwitchError> {
        let global = self.get(&Scope::Global).await?;
        let own = match agent {
            Some(id) => self.get(&Scope::Agent(id.clone())).await?,
            None => None,
        };
        Ok(killswitch::effective(global.as_ref(), own.as_ref(), OffsetDateTime::now_utc()).cloned())
    }
}

/// A one-line description of a pause, for replies.
pub fn describe(scope: &Scope, state: &KillState) -> String {
    let reason = state.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
    match (state.mode, state.until) {
        (Mode::Soft, Some(until)) => format!("{scope}: SOFT pause by {} until {}{reason}", state.by, rfc3339(until)),
        (mode, _) => {
            format!("{scope}: {} by {} until a director resumes{reason}", mode.as_str().to_uppercase(), state.by)
        }
    }
}

/// A timestamp as RFC 3339 (seconds).
pub fn rfc3339(at: OffsetDateTime) -> String {
    let at = at.replace_nanosecond(0).unwrap_or(at);
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| at.to_string())
}

/// Stream name of the events relayed to chat.
pub fn events_stream() -> &'static str {
    layout::events_stream(1).name
}
