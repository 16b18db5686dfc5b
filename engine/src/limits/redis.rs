//! The Redis backend, shared by every bot replica: a fixed-window counter
//! incremented and given its expiry in one Lua script (so two replicas can
//! never both take the last slot), and dedup keys set with `SET NX PX`.
//! After a failure it answers [`RedisError::Resting`] at once for a while, so
//! an outage costs no latency per command, then tries Redis again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{CommandClass, Decision, Limit, RateLimited};

/// Longest wait for one Redis call, connecting included.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// Key prefix of rate-limit counters: `mesh:rate:<class>:<user hash>`.
pub const RATE_PREFIX: &str = "mesh:rate";
/// Key prefix of dedup keys: `mesh:dedup:<key hash>`.
pub const DEDUP_PREFIX: &str = "mesh:dedup";
/// Least time between two warnings about Redis.
pub const WARN_EVERY: Duration = Duration::from_secs(60);

/// Counts a hit and returns `{count, milliseconds left in the window}`. The
/// expiry is set when missing, so a key can never outlive its window.
const HIT: &str = r"
local n = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
";

/// A Redis failure.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The URL cannot be used.
    #[error("invalid redis url {url}: {reason}")]
    Url {
        /// The URL, without credentials.
        url: String,
        /// Why.
        reason: String,
    },
    /// A call failed.
    #[error("redis call failed: {0}")]
    Call(#[from] redis::RedisError),
    /// A call took too long.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Not tried: Redis failed recently.
    #[error("redis failed recently; trying again in {0:?}")]
    Resting(Duration),
}

#[derive(Debug, Default)]
struct Health {
    /// Redis is not called before this.
    resting_until: Option<Instant>,
    /// When the last warning was logged.
    warned_at: Option<Instant>,
}

/// A Redis connection that reconnects by itself.
pub struct RedisLimits {
    conn: ConnectionManager,
    script: redis::Script,
    url: String,
    retry: Duration,
    health: Mutex<Health>,
}

impl std::fmt::Debug for RedisLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimits").field("url", &self.url).field("retry", &self.retry).finish_non_exhaustive()
    }
}

/// A Redis URL with its user and password replaced by `***`, for logs and errors.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() || !parsed.username().is_empty() => {
            // Both setters only fail for URLs that cannot have credentials, which these do.
            let _ = parsed.set_password(None);
            let _ = parsed.set_username("***");
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "<unparseable url>".to_owned(),
    }
}

impl RedisLimits {
    /// Prepares a connection to `url` without connecting (the first call
    /// connects); after a failure Redis rests for `retry`.
    pub fn open(url: &str, retry: Duration) -> Result<Self, RedisError> {
        let invalid = |reason: String| RedisError::Url { url: redact(url), reason };
        let client = redis::Client::open(url).map_err(|e| invalid(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CALL_TIMEOUT))
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            conn,
            script: redis::Script::new(HIT),
            url: redact(url),
            retry,
            health: Mutex::new(Health::default()),
        })
    }

    /// Opens and checks that Redis answers (for callers that require it).
    pub async fn connect(url: &str, retry: Duration) -> Result<Self, RedisError> {
        let redis = Self::open(url, retry)?;
        redis.ping().await?;
        Ok(redis)
    }

    /// The URL, without credentials.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs one call with the timeout, resting after failures.
    async fn call<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, RedisError> {
        if let Some(until) = self.lock().resting_until {
            let left = until.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                return Err(RedisError::Resting(left));
            }
        }
        let result = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(RedisError::Call(e)),
            Err(_) => Err(RedisError::Timeout(CALL_TIMEOUT)),
        };
        let mut health = self.lock();
        match &result {
            Ok(_) => {
                if health.resting_until.take().is_some() {
                    tracing::info!(redis = %self.url, "redis answers again; rate limits and dedup shared again");
                }
            }
            Err(_) => health.resting_until = Some(Instant::now() + self.retry),
        }
        result
    }

    /// Checks that Redis answers.
    pub async fn ping(&self) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        self.call(async move { redis::cmd("PING").query_async::<String>(&mut conn).await }).await.map(drop)
    }

    /// Counts one command of `user` (a hashed key); the decision for it.
    pub async fn hit(&self, user: &str, class: CommandClass, limit: Limit) -> Result<Decision, RedisError> {
        if limit.max == 0 {
            return Ok(Decision::Limited { message: RateLimited { class, limit, retry_after: limit.window } });
        }
        let key = format!("{RATE_PREFIX}:{}:{user}", class.as_str());
        let window_ms = u64::try_from(limit.window.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut conn = self.conn.clone();
        let mut invocation = self.script.key(key);
        invocation.arg(window_ms);
        let (count, ttl_ms) = self.call(async move { invocation.invoke_async::<(u64, i64)>(&mut conn).await }).await?;
        if count <= u64::from(limit.max) {
            Ok(Decision::Allowed)
        } else {
            let retry_after = Duration::from_millis(u64::try_from(ttl_ms).unwrap_or(0));
            Ok(Decision::Limited { message: RateLimited { class, limit, retry_after } })
        }
    }

    /// True the first time `key` (a hashed key) is set within `ttl`, across replicas.
    pub async fn first(&self, key: &str, ttl: Duration) -> Result<bool, RedisError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut cmd = redis::cmd("SET");
        cmd.arg(format!("{DEDUP_PREFIX}:{key}")).arg(1).arg("NX").arg("PX").arg(ttl_ms);
        let mut conn = self.conn.clone();
        let set = self.call(async move { cmd.query_async::<Option<String>>(&mut conn).await }).await?;
        Ok(set.is_some())
    }

    /// Logs a Redis failure, at most once per [`WARN_EVERY`].
    pub fn warn(&self, error: &RedisError) {
        let mut health = self.lock();
        if health.warned_at.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            tracing::warn!(
                redis = %self.url,
                error = %error,
                "redis unavailable; this replica uses its own memory for rate limits and dedup"
            );
            health.warned_at = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        let cases = [
            ("redis://:hunter2@cache:6379/0", "redis://***@cache:6379/0"),
            ("redis://user:hunter2@cache:6379", "redis://***@cache:6379"),
            ("rediss://user@cache", "rediss://***@cache"),
            ("redis://cache:6379", "redis://cache:6379"),
            ("not a url :hunter2@", "<unparseable url>"),
        ];
        for (url, redacted) in cases {
            assert_eq!(redact(url), redacted, "{url}");
        }
    }

    #[tokio::test]
    async fn an_invalid_url_is_an_error_without_the_password() {
        let e = RedisLimits::open("http://:hunter2@cache", Duration::from_secs(1)).unwrap_err().to_string();
        assert!(e.starts_with("invalid redis url http://***@cache"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
}
