//! Rate limits (per user and per command class) and retry dedup of the chat
//! bot. State lives in Redis when `REDIS_URL` is set, so several bot replicas
//! share it, and in memory otherwise. When Redis fails, the bot falls back to
//! its own memory (and says so in the log) rather than refusing every command
//! or running a retried request twice within this replica.
//!
//! - [`memory`]: the in-process backend, with an explicit clock for tests.
//! - [`redis`]: the shared backend (atomic Lua counter, `SET NX PX` dedup).

pub mod memory;
pub mod redis;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::command::{Command, CommandKind};

/// How long a request key is remembered for dedup.
pub const DEDUP_TTL: Duration = Duration::from_secs(600);

/// What a command costs against the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CommandClass {
    /// ping, status, agents, help, audit, dlq (list).
    Read,
    /// send, broadcast, ask.
    Message,
    /// kill, resume, confirm, dlq replay.
    Control,
}

impl CommandClass {
    /// The class of a command.
    pub fn of(command: &Command) -> Self {
        match command.kind() {
            CommandKind::Send | CommandKind::Broadcast | CommandKind::Ask => Self::Message,
            CommandKind::KillSoft
            | CommandKind::KillHard
            | CommandKind::KillNuclear
            | CommandKind::Resume
            | CommandKind::Confirm
            | CommandKind::DlqReplay => Self::Control,
            _ => Self::Read,
        }
    }

    /// The name used in keys and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Message => "message",
            Self::Control => "control",
        }
    }
}

/// One limit: at most `max` commands per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Commands allowed per window.
    pub max: u32,
    /// The window.
    pub window: Duration,
}

/// The limits of each class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// Reading commands.
    pub read: Limit,
    /// Messages to agents.
    pub message: Limit,
    /// Kill switch and replays.
    pub control: Limit,
}

impl Default for RateLimits {
    fn default() -> Self {
        let minute = Duration::from_secs(60);
        Self {
            read: Limit { max: 30, window: minute },
            message: Limit { max: 20, window: minute },
            control: Limit { max: 5, window: minute },
        }
    }
}

impl RateLimits {
    /// The limit of one class.
    pub fn of(&self, class: CommandClass) -> Limit {
        match class {
            CommandClass::Read => self.read,
            CommandClass::Message => self.message,
            CommandClass::Control => self.control,
        }
    }
}

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

/// The message of a limited command.
pub fn limited_message(class: CommandClass, limit: Limit, retry_after: Duration) -> String {
    format!(
        "rate limit: {} {} commands per {}s; try again in {}s",
        limit.max,
        class.as_str(),
        limit.window.as_secs(),
        retry_after.as_secs().max(1)
    )
}

/// A key that names a user without putting their id in Redis.
pub fn user_key(user: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(user.as_bytes());
    digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// Limits and dedup state: shared in Redis, or this process's memory.
#[derive(Debug)]
pub struct LimitStore {
    limits: RateLimits,
    memory: Mutex<memory::MemoryLimits>,
    redis: Option<redis::RedisLimits>,
    started: Instant,
}

impl LimitStore {
    /// In memory.
    pub fn memory() -> Self {
        Self::with_limits(RateLimits::default(), None)
    }

    /// With given limits and an optional Redis backend.
    pub fn with_limits(limits: RateLimits, redis: Option<redis::RedisLimits>) -> Self {
        Self { limits, memory: Mutex::new(memory::MemoryLimits::default()), redis, started: Instant::now() }
    }

    /// Redis when `url` is given and reachable, else memory (with a warning).
    pub async fn from_url(url: Option<&str>) -> Self {
        let Some(url) = url else { return Self::memory() };
        match redis::RedisLimits::connect(url).await {
            Ok(redis) => Self::with_limits(RateLimits::default(), Some(redis)),
            Err(e) => {
                tracing::warn!(error = %e, "rate limits and dedup stay in this process's memory");
                Self::memory()
            }
        }
    }

    /// True when Redis backs the store.
    pub fn is_shared(&self) -> bool {
        self.redis.is_some()
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Checks (and counts) a command of `user`.
    pub async fn check(&self, user: &str, command: &Command) -> Decision {
        let class = CommandClass::of(command);
        let limit = self.limits.of(class);
        let key = user_key(user);
        if let Some(redis) = &self.redis {
            match redis.hit(&key, class, limit).await {
                Ok(decision) => return decision,
                Err(e) => redis.warn(&e),
            }
        }
        let now = self.now();
        self.memory.lock().unwrap_or_else(|p| p.into_inner()).hit(&key, class, limit, now)
    }

    /// True the first time `key` is seen within [`DEDUP_TTL`].
    pub async fn seen_once(&self, key: &str) -> bool {
        let key = user_key(key);
        if let Some(redis) = &self.redis {
            match redis.first(&key, DEDUP_TTL).await {
                Ok(first) => return first,
                Err(e) => redis.warn(&e),
            }
        }
        let now = self.now();
        self.memory.lock().unwrap_or_else(|p| p.into_inner()).first(&key, DEDUP_TTL, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::parse;

    #[test]
    fn classes_follow_the_command_table() {
        let class = |line: &str| CommandClass::of(&parse(line).unwrap());
        assert_eq!(class("ping"), CommandClass::Read);
        assert_eq!(class("dlq"), CommandClass::Read);
        assert_eq!(class("send nova hi"), CommandClass::Message);
        assert_eq!(class("kill soft"), CommandClass::Control);
        assert_eq!(class("dlq replay nova"), CommandClass::Control);
    }

    #[test]
    fn user_keys_hide_the_user_id() {
        let key = user_key("slack:U123");
        assert_eq!(key.len(), 24);
        assert!(!key.contains("U123"));
        assert_eq!(key, user_key("slack:U123"));
    }

    #[test]
    fn the_limited_message_says_when_to_retry() {
        let limit = Limit { max: 5, window: Duration::from_secs(60) };
        assert_eq!(
            limited_message(CommandClass::Control, limit, Duration::from_secs(42)),
            "rate limit: 5 control commands per 60s; try again in 42s"
        );
    }
}
