//! The in-memory backend: fixed-window counters and a dedup set, both with
//! expiry and a size bound (the entry that expires first is evicted). Time
//! comes from a [`Clock`], so tests move a [`ManualClock`] instead of sleeping.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{CommandClass, Decision, Limit, RateLimited};

/// Where the memory backend reads the time: a monotonic offset from an origin.
pub trait Clock: fmt::Debug + Send + Sync {
    /// Time since the clock's origin; never goes back.
    fn now(&self) -> Duration;
}

/// The real monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        Self { origin: Instant::now() }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock that only moves when told to; clones share the time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    millis: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at its origin.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by` (millisecond resolution).
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.millis.fetch_add(by, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_millis(self.millis.load(Ordering::SeqCst))
    }
}

/// A map whose entries expire, holding at most `capacity` of them.
#[derive(Debug)]
struct ExpiringMap<K, V> {
    entries: HashMap<K, (V, Duration, u64)>,
    by_expiry: BTreeMap<(Duration, u64), K>,
    next_seq: u64,
    capacity: usize,
}

impl<K: Clone + Eq + Hash, V> ExpiringMap<K, V> {
    fn new(capacity: usize) -> Self {
        Self { entries: HashMap::new(), by_expiry: BTreeMap::new(), next_seq: 0, capacity: capacity.max(1) }
    }

    /// Drops what expired at or before `now`.
    fn purge(&mut self, now: Duration) {
        while let Some(entry) = self.by_expiry.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            self.entries.remove(&key);
        }
    }

    fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.entries.get_mut(key).map(|(value, _, _)| value)
    }

    /// Inserts a key that is not present, evicting the first to expire when full.
    fn insert(&mut self, key: K, value: V, expires: Duration) {
        while self.entries.len() >= self.capacity {
            let Some((_, evicted)) = self.by_expiry.pop_first() else { break };
            self.entries.remove(&evicted);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_expiry.insert((expires, seq), key.clone());
        self.entries.insert(key, (value, expires, seq));
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[derive(Debug)]
struct State {
    /// Hits in the current window, by (user key, class); the window ends at the expiry.
    windows: ExpiringMap<(String, CommandClass), u32>,
    /// Dedup keys seen, until their expiry.
    seen: ExpiringMap<String, ()>,
}

/// Rate-limit windows and dedup keys of this process.
#[derive(Debug)]
pub struct MemoryLimits {
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

impl MemoryLimits {
    /// Empty, keeping at most `max_keys` windows and `max_keys` dedup keys.
    pub fn new(clock: Arc<dyn Clock>, max_keys: usize) -> Self {
        let state = State { windows: ExpiringMap::new(max_keys), seen: ExpiringMap::new(max_keys) };
        Self { clock, state: Mutex::new(state) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts one command of class `class` by `user` (an already hashed key).
    pub fn hit(&self, user: &str, class: CommandClass, limit: Limit) -> Decision {
        let now = self.clock.now();
        let mut state = self.lock();
        state.windows.purge(now);
        let key = (user.to_owned(), class);
        if let Some(count) = state.windows.get_mut(&key) {
            *count = count.saturating_add(1);
            if *count > limit.max {
                let ends = state.windows.entries.get(&key).map_or(now, |(_, ends, _)| *ends);
                return Decision::Limited {
                    message: RateLimited { class, limit, retry_after: ends.saturating_sub(now) },
                };
            }
            return Decision::Allowed;
        }
        if limit.max == 0 {
            return Decision::Limited { message: RateLimited { class, limit, retry_after: limit.window } };
        }
        state.windows.insert(key, 1, now + limit.window);
        Decision::Allowed
    }

    /// True the first time `key` is seen within `ttl`; the key is remembered either way.
    pub fn first(&self, key: &str, ttl: Duration) -> bool {
        let now = self.clock.now();
        let mut state = self.lock();
        state.seen.purge(now);
        let key = key.to_owned();
        if state.seen.get_mut(&key).is_some() {
            return false;
        }
        state.seen.insert(key, (), now + ttl);
        true
    }

    /// How many windows and dedup keys are held.
    pub fn len(&self) -> (usize, usize) {
        let state = self.lock();
        (state.windows.len(), state.seen.len())
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn setup(max_keys: usize) -> (ManualClock, MemoryLimits) {
        let clock = ManualClock::new();
        let memory = MemoryLimits::new(Arc::new(clock.clone()), max_keys);
        (clock, memory)
    }

    fn retry_after(decision: Decision) -> Duration {
        match decision {
            Decision::Limited { message } => message.retry_after,
            Decision::Allowed => panic!("expected a limited decision"),
        }
    }

    #[test]
    fn the_limit_is_reached_and_says_when_the_window_ends() {
        let (clock, m) = setup(100);
        let limit = Limit { max: 2, window: MIN };
        assert_eq!(m.hit("u1", CommandClass::Control, limit), Decision::Allowed);
        clock.advance(Duration::from_secs(1));
        assert_eq!(m.hit("u1", CommandClass::Control, limit), Decision::Allowed);
        clock.advance(Duration::from_secs(17));
        assert_eq!(retry_after(m.hit("u1", CommandClass::Control, limit)), Duration::from_secs(42));
        clock.advance(Duration::from_secs(40));
        assert_eq!(retry_after(m.hit("u1", CommandClass::Control, limit)), Duration::from_secs(2));
    }

    #[test]
    fn the_window_rolls_over() {
        let (clock, m) = setup(100);
        let limit = Limit { max: 1, window: MIN };
        assert_eq!(m.hit("u1", CommandClass::Read, limit), Decision::Allowed);
        clock.advance(MIN - Duration::from_millis(1));
        assert_ne!(m.hit("u1", CommandClass::Read, limit), Decision::Allowed, "still inside the window");
        clock.advance(Duration::from_millis(1));
        assert_eq!(m.hit("u1", CommandClass::Read, limit), Decision::Allowed, "a new window");
        assert_ne!(m.hit("u1", CommandClass::Read, limit), Decision::Allowed, "and it counts again");
    }

    #[test]
    fn classes_and_users_are_independent() {
        let (_clock, m) = setup(100);
        let limit = Limit { max: 1, window: MIN };
        assert_eq!(m.hit("u1", CommandClass::Control, limit), Decision::Allowed);
        assert_ne!(m.hit("u1", CommandClass::Control, limit), Decision::Allowed);
        assert_eq!(m.hit("u1", CommandClass::Read, limit), Decision::Allowed, "another class");
        assert_eq!(m.hit("u1", CommandClass::Message, limit), Decision::Allowed, "another class");
        assert_eq!(m.hit("u2", CommandClass::Control, limit), Decision::Allowed, "another user");
    }

    #[test]
    fn a_zero_limit_refuses_everything() {
        let (_clock, m) = setup(100);
        let limit = Limit { max: 0, window: MIN };
        assert_eq!(retry_after(m.hit("u1", CommandClass::Control, limit)), MIN);
        assert!(m.is_empty());
    }

    #[test]
    fn dedup_once_then_again_after_expiry() {
        let (clock, m) = setup(100);
        assert!(m.first("k", MIN));
        assert!(!m.first("k", MIN));
        assert!(m.first("other", MIN), "keys are independent");
        clock.advance(MIN - Duration::from_millis(1));
        assert!(!m.first("k", MIN), "a retry just inside the ttl");
        clock.advance(Duration::from_millis(1));
        assert!(m.first("k", MIN), "expired");
        assert!(!m.first("k", MIN));
    }

    #[test]
    fn expired_entries_are_dropped() {
        let (clock, m) = setup(100);
        let limit = Limit { max: 1, window: MIN };
        for user in ["a", "b", "c"] {
            m.hit(user, CommandClass::Read, limit);
            m.first(user, MIN);
        }
        assert_eq!(m.len(), (3, 3));
        clock.advance(MIN);
        m.hit("d", CommandClass::Read, limit);
        m.first("d", MIN);
        assert_eq!(m.len(), (1, 1));
    }

    #[test]
    fn memory_is_bounded_and_evicts_the_oldest() {
        let (clock, m) = setup(100);
        let limit = Limit { max: 1, window: MIN };
        for i in 0..150 {
            assert!(m.first(&format!("k{i}"), MIN));
            m.hit(&format!("u{i}"), CommandClass::Read, limit);
            clock.advance(Duration::from_millis(1));
        }
        assert_eq!(m.len(), (100, 100));
        assert!(!m.first("k149", MIN), "the newest keys are kept");
        assert!(!m.first("k50", MIN), "the oldest kept key");
        assert!(m.first("k49", MIN), "the oldest keys were evicted");
        assert_ne!(m.hit("u149", CommandClass::Read, limit), Decision::Allowed, "the newest windows are kept");
        assert_eq!(m.hit("u0", CommandClass::Read, limit), Decision::Allowed, "the oldest windows were evicted");
    }
}
