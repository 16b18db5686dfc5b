//! The in-memory backend: fixed-window counters and a dedup set, both with
//! expiry and a size bound. Time is passed in, so tests need no sleeps.

use std::collections::HashMap;
use std::time::Duration;

use super::{CommandClass, Decision, Limit, limited_message};

/// Most keys kept; the oldest are dropped beyond it.
pub const MAX_KEYS: usize = 10_000;

/// Counters and seen keys, by key, with their expiry (time since start).
#[derive(Debug, Default)]
pub struct MemoryLimits {
    windows: HashMap<(String, CommandClass), (u32, Duration)>,
    seen: HashMap<String, Duration>,
}

impl MemoryLimits {
    /// Counts one command of `user` at `now`.
    pub fn hit(&mut self, user: &str, class: CommandClass, limit: Limit, now: Duration) -> Decision {
        self.windows.retain(|_, (_, until)| *until > now);
        bound(&mut self.windows, |(_, until)| *until);
        let entry = self.windows.entry((user.to_owned(), class)).or_insert((0, now + limit.window));
        entry.0 += 1;
        if entry.0 <= limit.max {
            Decision::Allowed
        } else {
            Decision::Limited { message: limited_message(class, limit, entry.1.saturating_sub(now)) }
        }
    }

    /// True the first time `key` is seen within `ttl` of `now`.
    pub fn first(&mut self, key: &str, ttl: Duration, now: Duration) -> bool {
        self.seen.retain(|_, until| *until > now);
        bound(&mut self.seen, |until| *until);
        if self.seen.contains_key(key) {
            return false;
        }
        self.seen.insert(key.to_owned(), now + ttl);
        true
    }
}

/// Drops the entries that expire first until the map is under [`MAX_KEYS`].
fn bound<K: Clone + Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, expiry: impl Fn(&V) -> Duration) {
    if map.len() < MAX_KEYS {
        return;
    }
    let mut by_expiry: Vec<(Duration, K)> = map.iter().map(|(k, v)| (expiry(v), k.clone())).collect();
    by_expiry.sort_by_key(|(at, _)| *at);
    for (_, key) in by_expiry.into_iter().take(map.len() + 1 - MAX_KEYS) {
        map.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn limits_count_per_user_and_class_and_roll_over() {
        let mut m = MemoryLimits::default();
        let limit = Limit { max: 2, window: MIN };
        assert_eq!(m.hit("u1", CommandClass::Control, limit, s(0)), Decision::Allowed);
        assert_eq!(m.hit("u1", CommandClass::Control, limit, s(1)), Decision::Allowed);
        assert_eq!(
            m.hit("u1", CommandClass::Control, limit, s(18)),
            Decision::Limited { message: "rate limit: 2 control commands per 60s; try again in 42s".into() }
        );
        assert_eq!(m.hit("u1", CommandClass::Read, limit, s(18)), Decision::Allowed, "classes are independent");
        assert_eq!(m.hit("u2", CommandClass::Control, limit, s(18)), Decision::Allowed, "users are independent");
        assert_eq!(m.hit("u1", CommandClass::Control, limit, s(60)), Decision::Allowed, "the window rolled over");
    }

    #[test]
    fn dedup_once_then_again_after_expiry() {
        let mut m = MemoryLimits::default();
        assert!(m.first("k", MIN, s(0)));
        assert!(!m.first("k", MIN, s(59)));
        assert!(m.first("k", MIN, s(60)));
    }

    #[test]
    fn memory_is_bounded() {
        let mut m = MemoryLimits::default();
        for i in 0..(MAX_KEYS as u64 + 50) {
            assert!(m.first(&i.to_string(), MIN, Duration::from_millis(i)));
        }
        assert!(m.seen.len() <= MAX_KEYS);
        assert!(!m.first(&(MAX_KEYS as u64 + 49).to_string(), MIN, s(1)), "the newest keys are kept");
    }
}
