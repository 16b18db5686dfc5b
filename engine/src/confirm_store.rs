//! Confirmation codes shared by the bot replicas: a code asked for on one
//! replica can be confirmed on another. Each pending action is also written
//! to the [`BUCKET`] bucket (expiring after twice the confirmation window);
//! a replica that does not know a code reads it from there, and the replica
//! that runs an action deletes it with the revision it read, so only one
//! replica in the fleet runs it. The rules (who may confirm, the window)
//! stay those of [`crate::command::confirm`].

use std::collections::BTreeSet;
use std::sync::Mutex;

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::command::{Identity, PendingAction, parse};

/// The bucket of pending confirmations.
pub const BUCKET: &str = mesh_protocol::layout::CONFIRM_BUCKET;

/// A pending action as stored: the command in its canonical form (parsed
/// back on the replica that confirms it) and who asked, by identity key.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    command: String,
    requested_by: String,
    #[serde(with = "time::serde::rfc3339")]
    requested_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    expires_at: OffsetDateTime,
}

/// The shared side of the confirmations.
#[derive(Debug)]
pub struct SharedConfirmations {
    kv: kv::Store,
    /// Codes this replica wrote: one missing from the bucket was taken by another replica.
    written: Mutex<BTreeSet<String>>,
}

impl SharedConfirmations {
    /// Opens the bucket, creating it when missing; entries expire after twice `window`.
    pub async fn open(
        js: &jetstream::Context,
        window: std::time::Duration,
        setting: mesh_protocol::layout::Replicas,
    ) -> Result<Self, mesh_runtime::nats::NatsError> {
        let config = kv::Config {
            bucket: BUCKET.to_owned(),
            description: "mesh confirmation codes shared by the bot replicas".to_owned(),
            history: 1,
            max_age: window * 2,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let kv = mesh_runtime::nats::open_or_create_bucket(js, config, setting).await?;
        Ok(Self { kv, written: Mutex::new(BTreeSet::new()) })
    }

    /// Shares a pending action under `code` (best effort: a code that cannot
    /// be shared still works on this replica).
    pub async fn share(&self, code: &str, action: &PendingAction) {
        let stored = Stored {
            command: action.command.to_string(),
            requested_by: action.requested_by.key(),
            requested_at: action.requested_at,
            expires_at: action.expires_at,
        };
        let Ok(bytes) = serde_json::to_vec(&stored) else { return };
        match self.kv.create(code, bytes.into()).await {
            Ok(_) => {
                self.lock().insert(code.to_owned());
            }
            Err(e) => tracing::warn!(error = %e, "confirmation code not shared; only this bot replica knows it"),
        }
    }

    /// The action shared under `code` and the revision it was read at;
    /// `Ok(None)` when no replica holds it (never issued, taken or expired).
    pub async fn fetch(&self, code: &str) -> Result<Option<(PendingAction, u64)>, String> {
        let entry = self.kv.entry(code).await.map_err(|e| e.to_string())?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else { return Ok(None) };
        let stored: Stored = serde_json::from_slice(&entry.value).map_err(|e| format!("unreadable code: {e}"))?;
        let command = parse(&stored.command).map_err(|e| format!("unreadable command {:?}: {e}", stored.command))?;
        let requested_by =
            identity_of(&stored.requested_by).ok_or_else(|| format!("unknown requester {:?}", stored.requested_by))?;
        let action =
            PendingAction { command, requested_by, requested_at: stored.requested_at, expires_at: stored.expires_at };
        Ok(Some((action, entry.revision)))
    }

    /// True when this replica wrote `code` (so its absence from the bucket means another took it).
    pub fn wrote(&self, code: &str) -> bool {
        self.lock().contains(code)
    }

    /// Takes `code` read at `revision` out of the bucket: true for the one
    /// replica whose delete lands; false when another replica took it first.
    pub async fn take(&self, code: &str, revision: u64) -> bool {
        self.lock().remove(code);
        self.kv.delete_expect_revision(code, Some(revision)).await.is_ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The identity an identity key names (roles are read again from the confirmer).
fn identity_of(key: &str) -> Option<Identity> {
    match key.split_once(':') {
        Some(("slack", user)) => Some(Identity::Slack { user: user.to_owned() }),
        Some(("discord", user)) => Some(Identity::Discord { user: user.to_owned(), roles: Vec::new() }),
        None if key == "terminal" => Some(Identity::Terminal),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_and_commands_survive_the_bucket() {
        for who in [
            Identity::Slack { user: "U1".into() },
            Identity::Discord { user: "42".into(), roles: vec!["7".into()] },
            Identity::Terminal,
        ] {
            assert!(identity_of(&who.key()).unwrap().is_same_person(&who), "{who:?}");
        }
        assert_eq!(identity_of("root"), None);
        for line in ["kill hard agent=nova -- leak in prod", "kill hard", "kill nuclear --purge", "kill nuclear"] {
            let command = parse(line).unwrap();
            assert_eq!(parse(&command.to_string()).unwrap(), command, "{line}");
        }
    }
}
