//! The Redis backend, shared by every bot replica: a fixed-window counter
//! incremented and expired in one Lua script (so two replicas can never both
//! pass the last slot), and dedup keys set with `SET NX PX`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

use super::{CommandClass, Decision, Limit, limited_message};

/// Longest wait for one Redis call.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// Key prefix of rate-limit counters.
pub const RATE_PREFIX: &str = "mesh:rate";
/// Key prefix of dedup keys.
pub const DEDUP_PREFIX: &str = "mesh:dedup";

const HIT: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('PTTL', KEYS[1])}
";

/// A Redis failure.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis at {url} is not usable: {reason}")]
    Connect { url: String, reason: String },
    #[error("redis call failed: {0}")]
    Call(String),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

/// A Redis connection (reconnects by itself).
pub struct RedisLimits {
    conn: ConnectionManager,
    script: redis::Script,
    last_warning: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for RedisLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisLimits")
    }
}

/// A Redis URL with any password replaced, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() || !parsed.username().is_empty() => {
            let _ = parsed.set_password(None);
            let _ = parsed.set_username("***");
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "<unparseable url>".to_owned(),
    }
}

impl RedisLimits {
    /// Connects, failing within a few seconds.
    pub async fn connect(url: &str) -> Result<Self, RedisError> {
        let err = |reason: String| RedisError::Connect { url: redact(url), reason };
        let client = redis::Client::open(url).map_err(|e| err(e.to_string()))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(Duration::from_secs(3), ConnectionManager::new_with_config(client, config))
            .await
            .map_err(|_| err("connection timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        Ok(Self { conn, script: redis::Script::new(HIT), last_warning: Mutex::new(None) })
    }

    /// Counts one command; the decision for it.
    pub async fn hit(&self, user: &str, class: CommandClass, limit: Limit) -> Result<Decision, RedisError> {
        let key = format!("{RATE_PREFIX}:{}:{user}", class.as_str());
        let mut conn = self.conn.clone();
        let mut invocation = self.script.key(&key);
        invocation.arg(limit.window.as_millis() as u64);
        let call = invocation.invoke_async::<(u64, i64)>(&mut conn);
        let (count, ttl_ms) = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| RedisError::Timeout(CALL_TIMEOUT))?
            .map_err(|e| RedisError::Call(e.to_string()))?;
        if count <= u64::from(limit.max) {
            Ok(Decision::Allowed)
        } else {
            let retry_after = Duration::from_millis(ttl_ms.max(0) as u64);
            Ok(Decision::Limited { message: limited_message(class, limit, retry_after) })
        }
    }

    /// True the first time `key` is set within `ttl`, across replicas.
    pub async fn first(&self, key: &str, ttl: Duration) -> Result<bool, RedisError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("SET");
        cmd.arg(format!("{DEDUP_PREFIX}:{key}")).arg(1).arg("NX").arg("PX").arg(ttl.as_millis() as u64);
        let call = cmd.query_async::<Option<String>>(&mut conn);
        let set = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| RedisError::Timeout(CALL_TIMEOUT))?
            .map_err(|e| RedisError::Call(e.to_string()))?;
        Ok(set.is_some())
    }

    /// Logs a Redis failure at most once a minute.
    pub fn warn(&self, error: &RedisError) {
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
            tracing::warn!(error = %error, "redis unavailable; using this replica's memory for rate limits and dedup");
            *last = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact("redis://:hunter2@cache:6379/0"), "redis://***@cache:6379/0");
        assert_eq!(redact("redis://user:hunter2@cache:6379"), "redis://***@cache:6379");
        assert_eq!(redact("redis://cache:6379"), "redis://cache:6379");
    }
}
