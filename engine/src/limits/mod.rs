//! Rate limits (per user and per command class) and retry dedup of the chat
//! bot. State lives in Redis when `REDIS_URL` is set, so several bot replicas
//! share it, and in this process's memory otherwise.
//!
//! When Redis fails (down at start, or later), every call falls back to this
//! replica's memory, a warning is logged at most once a minute, and Redis is
//! tried again after [`LimitsConfig::redis_retry`]:
//!
//! - Rate limits fail open to per-replica limits: each replica still enforces
//!   the limits on its own, so a user gets at most one allowance per replica.
//! - Dedup never blocks a command because Redis is down. Every key is also
//!   written to memory, even while Redis works, so a platform retry that
//!   reaches the same replica runs once, before, during and after an outage;
//!   one that reaches another replica during the outage may run twice.
//!
//! Keys never hold raw user text: users and dedup keys are hashed
//! (`mesh:rate:<class>:<hash>`, `mesh:dedup:<hash>`).
//!
//! - [`memory`]: the in-process backend, with a [`Clock`] for tests.
//! - [`redis`]: the shared backend (atomic Lua counter, `SET NX PX` dedup).

pub mod memory;
pub mod redis;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sha2::Digest;

use crate::command::{Command, CommandKind};

pub use memory::{Clock, ManualClock, MemoryLimits, SystemClock};
pub use redis::{RedisError, RedisLimits, redact};

/// How long a dedup key is remembered by default (Slack retries within minutes).
pub const DEFAULT_DEDUP_TTL: Duration = Duration::from_secs(600);
/// Most rate windows, and most dedup keys, kept in memory by default.
pub const DEFAULT_MAX_KEYS: usize = 10_000;
/// How long the bot uses memory only after a Redis failure, by default.
pub const DEFAULT_REDIS_RETRY: Duration = Duration::from_secs(5);

/// What a command costs against the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CommandClass {
    /// ping, status, agents, help, audit, dlq (list).
    Read,
    /// send, broadcast, ask.
    Message,
    /// kill soft/hard/nuclear, resume, confirm, dlq replay, and the terminal's
    /// changes (maintenance, restart, backup, restore, agents, deploy, up).
    Control,
}

impl CommandClass {
    /// Every class.
    pub const ALL: [CommandClass; 3] = [Self::Read, Self::Message, Self::Control];

    /// The class of a command.
    pub fn of(command: &Command) -> Self {
        match command.kind() {
            CommandKind::Send | CommandKind::Broadcast | CommandKind::Ask => Self::Message,
            CommandKind::KillSoft
            | CommandKind::KillHard
            | CommandKind::KillNuclear
            | CommandKind::Resume
            | CommandKind::Confirm
            | CommandKind::DlqReplay
            | CommandKind::Maintenance
            | CommandKind::Restart
            | CommandKind::Backup
            | CommandKind::Restore
            | CommandKind::AgentsAdd
            | CommandKind::AgentsRemove
            | CommandKind::AgentsRotate
            | CommandKind::DeployRender
            | CommandKind::DeployUp
            | CommandKind::Up => Self::Control,
            CommandKind::Ping
            | CommandKind::Status
            | CommandKind::Agents
            | CommandKind::AgentsList
            | CommandKind::Dlq
            | CommandKind::Audit
            | CommandKind::Help => Self::Read,
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
    /// Commands allowed per window (0 refuses every command of the class).
    pub max: u32,
    /// The window.
    pub window: Duration,
}

/// The limits of each class, per user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    /// Reading commands (default 30 a minute).
    pub read: Limit,
    /// Messages to agents (default 20 a minute).
    pub message: Limit,
    /// Kill switch, resume, confirm and replays (default 5 a minute).
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
    /// The same limit for every class.
    pub fn uniform(limit: Limit) -> Self {
        Self { read: limit, message: limit, control: limit }
    }

    /// The limit of one class.
    pub fn of(&self, class: CommandClass) -> Limit {
        match class {
            CommandClass::Read => self.read,
            CommandClass::Message => self.message,
            CommandClass::Control => self.control,
        }
    }
}

/// Settings of a [`LimitStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsConfig {
    /// The limits per class.
    pub rates: RateLimits,
    /// How long [`LimitStore::seen_once`] remembers a key.
    pub dedup_ttl: Duration,
    /// Most rate windows, and most dedup keys, kept in memory.
    pub max_keys: usize,
    /// How long only memory is used after a Redis failure.
    pub redis_retry: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            rates: RateLimits::default(),
            dedup_ttl: DEFAULT_DEDUP_TTL,
            max_keys: DEFAULT_MAX_KEYS,
            redis_retry: DEFAULT_REDIS_RETRY,
        }
    }
}

/// Whether a command may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Run it.
    Allowed,
    /// Too many; `message` says which limit and when to retry.
    Limited {
        /// The limit hit and the wait, displayed for the user.
        message: RateLimited,
    },
}

impl Decision {
    /// True when the command may run.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::Allowed)
    }
}

/// A refused command: the limit it hit and how long until the window ends.
///
/// Displays as `rate limit: 5 control commands per minute; try again in 42s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    /// The class of the command.
    pub class: CommandClass,
    /// The limit of that class.
    pub limit: Limit,
    /// When the window ends.
    pub retry_after: Duration,
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.retry_after.as_millis().div_ceil(1000).max(1);
        write!(
            f,
            "rate limit: {} {} command{} per {}; try again in {secs}s",
            self.limit.max,
            self.class.as_str(),
            if self.limit.max == 1 { "" } else { "s" },
            per(self.limit.window)
        )
    }
}

impl From<RateLimited> for String {
    fn from(limited: RateLimited) -> Self {
        limited.to_string()
    }
}

/// A window for people: `minute`, `hour`, `10 minutes`, `90s`.
fn per(window: Duration) -> String {
    match window.as_secs() {
        1 => "second".to_owned(),
        60 => "minute".to_owned(),
        3600 => "hour".to_owned(),
        86_400 => "day".to_owned(),
        s if s >= 3600 && s % 3600 == 0 => format!("{} hours", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{} minutes", s / 60),
        0 => format!("{}ms", window.as_millis()),
        s => format!("{s}s"),
    }
}

/// A short stable hash of `text`, so keys never hold user ids or request text.
pub fn hashed(text: &str) -> String {
    sha2::Sha256::digest(text.as_bytes()).iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// Rate limits and dedup state: shared in Redis when configured, with this
/// process's memory as the fallback (and the only store without Redis).
#[derive(Debug)]
pub struct LimitStore {
    config: LimitsConfig,
    memory: MemoryLimits,
    redis: Option<RedisLimits>,
}

impl LimitStore {
    /// In memory, with the default limits and the system clock.
    pub fn memory() -> Self {
        Self::new(LimitsConfig::default(), None, Arc::new(SystemClock::new()))
    }

    /// With given settings, an optional Redis backend and the clock of the memory backend.
    pub fn new(config: LimitsConfig, redis: Option<RedisLimits>, clock: Arc<dyn Clock>) -> Self {
        let memory = MemoryLimits::new(clock, config.max_keys);
        Self { config, memory, redis }
    }

    /// Default settings; Redis at `url` when given (`REDIS_URL`), else memory.
    pub async fn from_url(url: Option<&str>) -> Self {
        Self::from_config(LimitsConfig::default(), url).await
    }

    /// Redis at `url` when given, else memory. An invalid URL is logged (redacted)
    /// and gives memory; an unreachable Redis is logged and used once it answers.
    pub async fn from_config(config: LimitsConfig, url: Option<&str>) -> Self {
        let clock = Arc::new(SystemClock::new());
        let Some(url) = url else { return Self::new(config, None, clock) };
        match RedisLimits::open(url, config.redis_retry) {
            Ok(redis) => {
                match redis.ping().await {
                    Ok(()) => tracing::info!(redis = %redact(url), "rate limits and dedup shared in redis"),
                    Err(e) => redis.warn(&e),
                }
                Self::new(config, Some(redis), clock)
            }
            Err(e) => {
                tracing::warn!(error = %e, "rate limits and dedup stay in this process's memory");
                Self::new(config, None, clock)
            }
        }
    }

    /// True when Redis is configured (it may be down right now).
    pub fn is_shared(&self) -> bool {
        self.redis.is_some()
    }

    /// The settings.
    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    /// Checks and counts a command of `user` (an [`Identity`](crate::command::Identity) key).
    pub async fn check(&self, user: &str, command: &Command) -> Decision {
        self.check_class(user, CommandClass::of(command)).await
    }

    /// Checks and counts one command of class `class` by `user`.
    pub async fn check_class(&self, user: &str, class: CommandClass) -> Decision {
        let limit = self.config.rates.of(class);
        let user = hashed(user);
        if let Some(redis) = &self.redis {
            match redis.hit(&user, class, limit).await {
                Ok(decision) => return decision,
                Err(e) => redis.warn(&e),
            }
        }
        self.memory.hit(&user, class, limit)
    }

    /// True the first time `key` (e.g. `slack:<signature>`) is seen within the
    /// configured dedup TTL; false for a retry of the same request.
    pub async fn seen_once(&self, key: &str) -> bool {
        self.seen_once_within(key, self.config.dedup_ttl).await
    }

    /// True the first time `key` is seen within `ttl`.
    pub async fn seen_once_within(&self, key: &str, ttl: Duration) -> bool {
        let key = hashed(key);
        // Always remembered here too, so an outage cannot make this replica run
        // a retry twice. A key seen here is a duplicate without asking Redis;
        // otherwise Redis decides, so exactly one caller in the fleet gets true.
        if !self.memory.first(&key, ttl) {
            return false;
        }
        if let Some(redis) = &self.redis {
            match redis.first(&key, ttl).await {
                Ok(first_anywhere) => return first_anywhere,
                Err(e) => redis.warn(&e),
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::parse;

    fn store(rates: RateLimits, max_keys: usize) -> (ManualClock, LimitStore) {
        let clock = ManualClock::new();
        let config = LimitsConfig { rates, max_keys, ..LimitsConfig::default() };
        (clock.clone(), LimitStore::new(config, None, Arc::new(clock)))
    }

    fn command(line: &str) -> Command {
        parse(line).unwrap()
    }

    #[test]
    fn classes_follow_the_command_table() {
        let cases = [
            ("ping", CommandClass::Read),
            ("status", CommandClass::Read),
            ("agents", CommandClass::Read),
            ("help", CommandClass::Read),
            ("audit", CommandClass::Read),
            ("dlq", CommandClass::Read),
            ("send nova hi", CommandClass::Message),
            ("broadcast hi", CommandClass::Message),
            ("ask nova hi", CommandClass::Message),
            ("kill soft", CommandClass::Control),
            ("kill hard", CommandClass::Control),
            ("kill nuclear", CommandClass::Control),
            ("resume", CommandClass::Control),
            ("confirm K7P2QX", CommandClass::Control),
            ("dlq replay nova", CommandClass::Control),
        ];
        for (line, class) in cases {
            assert_eq!(CommandClass::of(&command(line)), class, "{line}");
        }
    }

    #[test]
    fn hashed_keys_hide_the_text() {
        let key = hashed("slack:U123");
        assert_eq!(key.len(), 24);
        assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
        assert!(!key.contains("U123"));
        assert_eq!(key, hashed("slack:U123"));
        assert_ne!(key, hashed("slack:U124"));
    }

    #[test]
    fn the_limited_message_says_when_to_retry() {
        let cases = [
            (5, 60_000, 42_000, "rate limit: 5 control commands per minute; try again in 42s"),
            (5, 60_000, 41_200, "rate limit: 5 control commands per minute; try again in 42s"),
            (5, 60_000, 0, "rate limit: 5 control commands per minute; try again in 1s"),
            (30, 3_600_000, 10_000, "rate limit: 30 control commands per hour; try again in 10s"),
            (3, 600_000, 1_000, "rate limit: 3 control commands per 10 minutes; try again in 1s"),
            (3, 90_000, 1_000, "rate limit: 3 control commands per 90s; try again in 1s"),
            (1, 300, 300, "rate limit: 1 control command per 300ms; try again in 1s"),
        ];
        for (max, window, retry, text) in cases {
            let limited = RateLimited {
                class: CommandClass::Control,
                limit: Limit { max, window: Duration::from_millis(window) },
                retry_after: Duration::from_millis(retry),
            };
            assert_eq!(limited.to_string(), text);
            assert_eq!(String::from(limited), text);
        }
    }

    #[tokio::test]
    async fn the_store_limits_per_user_and_class_with_a_fake_clock() {
        let (clock, store) = store(RateLimits::default(), 100);
        let kill = command("kill soft");
        for _ in 0..5 {
            assert_eq!(store.check("slack:U1", &kill).await, Decision::Allowed);
        }
        clock.advance(Duration::from_secs(18));
        let Decision::Limited { message } = store.check("slack:U1", &kill).await else { panic!("sixth kill passed") };
        assert_eq!(message.to_string(), "rate limit: 5 control commands per minute; try again in 42s");
        assert!(store.check("slack:U2", &kill).await.is_allowed(), "users are independent");
        assert!(store.check("slack:U1", &command("ping")).await.is_allowed(), "classes are independent");
        clock.advance(Duration::from_secs(42));
        assert!(store.check("slack:U1", &kill).await.is_allowed(), "the window rolled over");
    }

    #[tokio::test]
    async fn the_store_dedups_with_the_configured_ttl() {
        let (clock, store) = store(RateLimits::default(), 100);
        assert!(store.seen_once("slack:v0=abc").await);
        assert!(!store.seen_once("slack:v0=abc").await);
        clock.advance(DEFAULT_DEDUP_TTL - Duration::from_millis(1));
        assert!(!store.seen_once("slack:v0=abc").await);
        clock.advance(Duration::from_millis(1));
        assert!(store.seen_once("slack:v0=abc").await, "expired");
        assert!(store.seen_once_within("discord:1234", Duration::from_secs(1)).await);
        clock.advance(Duration::from_secs(1));
        assert!(store.seen_once_within("discord:1234", Duration::from_secs(1)).await, "a shorter ttl");
    }

    #[tokio::test]
    async fn the_store_is_bounded() {
        let (_clock, store) = store(RateLimits::uniform(Limit { max: 1, window: Duration::from_secs(60) }), 10);
        for i in 0..50 {
            assert!(store.seen_once(&format!("k{i}")).await);
            assert!(store.check_class(&format!("u{i}"), CommandClass::Read).await.is_allowed());
        }
        assert_eq!(store.memory.len(), (10, 10));
        assert!(!store.seen_once("k49").await);
        assert!(!store.check_class("u49", CommandClass::Read).await.is_allowed());
    }
}
