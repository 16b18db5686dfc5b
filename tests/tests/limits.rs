//! Rate limits and retry dedup against a real redis-server: two bot replicas
//! share one limit and one dedup set, concurrency cannot overshoot a limit,
//! and an unreachable Redis falls back to memory.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::sync::Arc;
use std::time::Duration;

use mesh_bot::command::parse;
use mesh_bot::limits::redis::RedisLimits;
use mesh_bot::limits::{Decision, Limit, LimitStore, RateLimits};
use mesh_tests::redis::TestRedis;

fn limits(max: u32, window: Duration) -> RateLimits {
    let limit = Limit { max, window };
    RateLimits { read: limit, message: limit, control: limit }
}

async fn replica(redis: &TestRedis, max: u32, window: Duration) -> LimitStore {
    LimitStore::with_limits(limits(max, window), Some(RedisLimits::connect(&redis.url()).await.unwrap()))
}

#[tokio::test]
async fn two_replicas_share_one_limit_and_one_dedup() {
    let redis = TestRedis::start().await;
    let (a, b) = (replica(&redis, 3, Duration::from_secs(60)).await, replica(&redis, 3, Duration::from_secs(60)).await);
    assert!(a.is_shared() && b.is_shared());
    let kill = parse("kill soft").unwrap();
    assert_eq!(a.check("slack:U1", &kill).await, Decision::Allowed);
    assert_eq!(b.check("slack:U1", &kill).await, Decision::Allowed);
    assert_eq!(a.check("slack:U1", &kill).await, Decision::Allowed);
    let Decision::Limited { message } = b.check("slack:U1", &kill).await else { panic!("the fourth command passed") };
    assert!(message.starts_with("rate limit: 3 control commands per 60s; try again in"), "{message}");
    assert_eq!(b.check("slack:U2", &kill).await, Decision::Allowed, "other users are not limited");
    assert_eq!(b.check("slack:U1", &parse("ping").unwrap()).await, Decision::Allowed, "other classes are not limited");

    assert!(a.seen_once("slack:v0=abc").await);
    assert!(!b.seen_once("slack:v0=abc").await, "a retry reaching the other replica runs once");
    assert!(!a.seen_once("slack:v0=abc").await);
}

#[tokio::test]
async fn concurrent_checks_never_overshoot_the_limit() {
    let redis = TestRedis::start().await;
    let store = Arc::new(replica(&redis, 10, Duration::from_secs(60)).await);
    let send = parse("send nova hi").unwrap();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (store, send) = (store.clone(), send.clone());
        tasks.push(tokio::spawn(async move { store.check("slack:U1", &send).await }));
    }
    let mut allowed = 0;
    for task in tasks {
        if task.await.unwrap() == Decision::Allowed {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 10);
}

#[tokio::test]
async fn the_window_expires_in_redis() {
    let redis = TestRedis::start().await;
    let store = replica(&redis, 1, Duration::from_millis(300)).await;
    let ping = parse("ping").unwrap();
    assert_eq!(store.check("u", &ping).await, Decision::Allowed);
    assert!(matches!(store.check("u", &ping).await, Decision::Limited { .. }));
    // Poll until Redis expired the window key (no fixed sleep).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if store.check("v", &ping).await == Decision::Allowed && store.check("u", &ping).await == Decision::Allowed {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the window never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_unreachable_redis_falls_back_to_memory() {
    let port = mesh_bot::local_nats::free_port().unwrap();
    let started = std::time::Instant::now();
    let store = LimitStore::from_url(Some(&format!("redis://:secret@127.0.0.1:{port}"))).await;
    assert!(started.elapsed() < Duration::from_secs(5), "gave up within a few seconds");
    assert!(!store.is_shared());
    assert!(store.seen_once("k").await && !store.seen_once("k").await);

    // Redis going away after the start: calls fall back instead of failing.
    let mut redis = TestRedis::start().await;
    let store = replica(&redis, 5, Duration::from_secs(60)).await;
    redis.stop().await;
    assert_eq!(store.check("u", &parse("ping").unwrap()).await, Decision::Allowed);
    assert!(store.seen_once("after-outage").await);
    assert!(!store.seen_once("after-outage").await, "the fallback still deduplicates within this replica");
}
