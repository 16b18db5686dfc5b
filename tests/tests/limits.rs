//! Rate limits and retry dedup against a real redis-server: two bot replicas
//! share one limit and one dedup set, concurrency cannot overshoot a limit,
//! windows and dedup keys expire in Redis, and an unreachable Redis falls back
//! to each replica's memory and is used again once it answers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_bot::command::parse;
use mesh_bot::limits::{
    CommandClass, Decision, Limit, LimitStore, LimitsConfig, RateLimits, RedisLimits, SystemClock, hashed,
};
use mesh_tests::redis::TestRedis;

const MINUTE: Duration = Duration::from_secs(60);
/// How long Redis rests after a failure in these tests.
const RETRY: Duration = Duration::from_millis(100);

fn config(max: u32, window: Duration) -> LimitsConfig {
    LimitsConfig { rates: RateLimits::uniform(Limit { max, window }), redis_retry: RETRY, ..LimitsConfig::default() }
}

/// One bot replica using `redis`.
async fn replica(redis: &TestRedis, config: LimitsConfig) -> LimitStore {
    let backend = RedisLimits::connect(&redis.url(), config.redis_retry).await.expect("connecting to the test redis");
    LimitStore::new(config, Some(backend), Arc::new(SystemClock::new()))
}

/// Polls `done` every 20 ms until it holds; panics after `within`.
async fn eventually<F: Future<Output = bool>>(within: Duration, what: &str, mut done: impl FnMut() -> F) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "{what} did not happen within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn two_replicas_share_one_limit_and_one_dedup() {
    let redis = TestRedis::start().await;
    let a = replica(&redis, LimitsConfig::default()).await;
    let b = replica(&redis, LimitsConfig::default()).await;
    assert!(a.is_shared() && b.is_shared());
    let kill = parse("kill soft").unwrap();
    for store in [&a, &b, &a, &b, &a] {
        assert_eq!(store.check("slack:U1", &kill).await, Decision::Allowed);
    }
    let Decision::Limited { message } = b.check("slack:U1", &kill).await else { panic!("the sixth kill passed") };
    assert_eq!((message.class, message.limit.max), (CommandClass::Control, 5));
    assert!(message.retry_after > Duration::from_secs(55) && message.retry_after <= MINUTE, "{message:?}");
    let text = message.to_string();
    assert!(text.starts_with("rate limit: 5 control commands per minute; try again in "), "{text}");
    assert!(!a.check("slack:U1", &kill).await.is_allowed(), "the other replica refuses too");
    assert!(b.check("slack:U2", &kill).await.is_allowed(), "other users are not limited");
    assert!(b.check("slack:U1", &parse("ping").unwrap()).await.is_allowed(), "other classes are not limited");

    assert!(a.seen_once("slack:v0=abc").await);
    assert!(!b.seen_once("slack:v0=abc").await, "a retry reaching the other replica is a duplicate");
    assert!(!a.seen_once("slack:v0=abc").await, "a retry reaching the same replica is a duplicate");
    assert!(b.seen_once("slack:v0=def").await, "another request");

    let keys = redis.keys().await;
    let mut expected = [
        format!("mesh:dedup:{}", hashed("slack:v0=abc")),
        format!("mesh:dedup:{}", hashed("slack:v0=def")),
        format!("mesh:rate:control:{}", hashed("slack:U1")),
        format!("mesh:rate:control:{}", hashed("slack:U2")),
        format!("mesh:rate:read:{}", hashed("slack:U1")),
    ];
    expected.sort();
    assert_eq!(keys, expected, "namespaced keys without user ids or request text");
    for key in &keys {
        let ttl: i64 = redis.cli(&["PTTL", key]).await.trim().parse().unwrap();
        assert!(ttl > 0, "{key} expires (pttl {ttl})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_checks_on_two_replicas_allow_exactly_ten() {
    let redis = TestRedis::start().await;
    let a = Arc::new(replica(&redis, config(10, MINUTE)).await);
    let b = Arc::new(replica(&redis, config(10, MINUTE)).await);
    let send = parse("send nova hi").unwrap();
    let mut checks = tokio::task::JoinSet::new();
    let mut dedups = tokio::task::JoinSet::new();
    for i in 0..50 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (send, dedup) = (send.clone(), store.clone());
        checks.spawn(async move { store.check("slack:U1", &send).await.is_allowed() });
        dedups.spawn(async move { dedup.seen_once("slack:v0=same-request").await });
    }
    let allowed = checks.join_all().await.into_iter().filter(|allowed| *allowed).count();
    assert_eq!(allowed, 10);
    let first = dedups.join_all().await.into_iter().filter(|first| *first).count();
    assert_eq!(first, 1, "one of 50 concurrent deliveries of one request runs");
    assert_eq!(redis.cli(&["GET", &format!("mesh:rate:message:{}", hashed("slack:U1"))]).await.trim(), "50");
}

#[tokio::test]
async fn the_window_expires_in_redis() {
    let redis = TestRedis::start().await;
    let window = Duration::from_millis(500);
    let store = replica(&redis, config(1, window)).await;
    let started = Instant::now();
    assert!(store.check_class("u", CommandClass::Read).await.is_allowed());
    let Decision::Limited { message } = store.check_class("u", CommandClass::Read).await else {
        panic!("the second read passed")
    };
    assert!(message.retry_after > Duration::ZERO && message.retry_after <= window, "{message:?}");
    let store_ref = &store;
    eventually(Duration::from_secs(5), "the window rolling over", || async move {
        store_ref.check_class("u", CommandClass::Read).await.is_allowed()
    })
    .await;
    assert!(started.elapsed() >= window, "the window ended early: {:?}", started.elapsed());
    assert!(!store.check_class("u", CommandClass::Read).await.is_allowed(), "the new window counts again");
}

#[tokio::test]
async fn dedup_keys_expire_in_redis() {
    let redis = TestRedis::start().await;
    let a = replica(&redis, LimitsConfig::default()).await;
    let b = replica(&redis, LimitsConfig::default()).await;
    let ttl = Duration::from_millis(500);
    let started = Instant::now();
    assert!(a.seen_once_within("discord:1234", ttl).await);
    assert!(!b.seen_once_within("discord:1234", ttl).await);
    eventually(Duration::from_secs(5), "the dedup key expiring", || b.seen_once_within("discord:1234", ttl)).await;
    assert!(started.elapsed() >= ttl, "the key expired early: {:?}", started.elapsed());
    assert!(!a.seen_once_within("discord:1234", ttl).await, "the new key is shared again");
}

#[tokio::test]
async fn an_unreachable_redis_falls_back_to_memory_then_is_used_once_it_answers() {
    let port = mesh_bot::local_nats::free_port().unwrap();
    let with_password = LimitStore::from_url(Some(&format!("redis://:hunter2@127.0.0.1:{port}"))).await;
    assert!(!format!("{with_password:?}").contains("hunter2"), "the password never shows");
    assert!(with_password.seen_once("k").await && !with_password.seen_once("k").await);

    let started = Instant::now();
    let a = LimitStore::from_config(config(2, MINUTE), Some(&format!("redis://127.0.0.1:{port}"))).await;
    assert!(a.is_shared(), "redis stays configured");
    let ping = parse("ping").unwrap();
    assert!(a.check("u", &ping).await.is_allowed());
    assert!(a.check("u", &ping).await.is_allowed());
    assert!(!a.check("u", &ping).await.is_allowed(), "the replica enforces the limit on its own");
    assert!(a.seen_once("k").await);
    assert!(!a.seen_once("k").await, "and dedups on its own");
    assert!(started.elapsed() < Duration::from_secs(3), "the outage added {:?}", started.elapsed());

    // Redis comes up on that port: after the rest period both replicas share it.
    let redis = TestRedis::start_on(port).await;
    let b = replica(&redis, config(2, MINUTE)).await;
    let (a_ref, redis_ref) = (&a, &redis);
    eventually(Duration::from_secs(5), "the first replica using redis again", || async move {
        a_ref.seen_once(&format!("probe-{}", uuid::Uuid::now_v7())).await;
        !redis_ref.keys().await.is_empty()
    })
    .await;
    assert!(a.seen_once("shared").await);
    assert!(!b.seen_once("shared").await, "the dedup is shared again");
    assert!(a.check("v", &ping).await.is_allowed());
    assert!(b.check("v", &ping).await.is_allowed());
    assert!(!a.check("v", &ping).await.is_allowed(), "the limit is shared again");
}

#[tokio::test]
async fn redis_going_away_falls_back_without_losing_this_replicas_dedup() {
    let mut redis = TestRedis::start().await;
    let store = replica(&redis, config(2, MINUTE)).await;
    assert!(store.seen_once("before").await);
    redis.stop().await;

    let started = Instant::now();
    assert!(!store.seen_once("before").await, "a retry of a request handled before the outage");
    assert!(store.seen_once("during").await);
    assert!(!store.seen_once("during").await, "the fallback dedups within this replica");
    assert!(store.check_class("u", CommandClass::Control).await.is_allowed());
    assert!(store.check_class("u", CommandClass::Control).await.is_allowed());
    assert!(!store.check_class("u", CommandClass::Control).await.is_allowed(), "per-replica limits");
    assert!(started.elapsed() < Duration::from_secs(3), "the outage added {:?}", started.elapsed());
}
