//! Rate limits and retry dedup of the chat bot (placeholder until the Redis
//! backend lands: in memory, per process).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::command::Command;

/// Whether a command may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run it.
    Allowed,
    /// Too many; the message says when to retry.
    Limited {
        /// For the user.
        message: String,
    },
}

/// Limits and dedup state.
#[derive(Debug, Default)]
pub struct LimitStore {
    seen: Mutex<HashMap<String, Instant>>,
}

/// How long a request key is remembered.
pub const DEDUP_TTL: Duration = Duration::from_secs(600);

impl LimitStore {
    /// In memory.
    pub fn memory() -> Self {
        Self::default()
    }

    /// From `REDIS_URL` (memory for now).
    pub async fn from_url(_url: Option<&str>) -> Self {
        Self::memory()
    }

    /// Checks a command against the user's limits.
    pub async fn check(&self, _user: &str, _command: &Command) -> Decision {
        Decision::Allowed
    }

    /// True the first time `key` is seen within [`DEDUP_TTL`].
    pub async fn seen_once(&self, key: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        seen.retain(|_, at| now.duration_since(*at) < DEDUP_TTL);
        seen.insert(key.to_owned(), now).is_none()
    }
}
