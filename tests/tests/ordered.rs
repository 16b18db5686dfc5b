//! Ordered delivery with a prefetch window (concurrency 1, the consumer
//! handing the listener four messages at once) against a real nats-server
//! and a recording gateway: the gateway sees the messages strictly in order
//! (repeats of the head while it is retried, never one behind it) under
//! 5xx answers, timeouts, a kill -9 of the listener mid-window and a pause
//! mid-window.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use async_nats::jetstream;
use mesh_bot::killswitch::{Actor, KillSwitch};
use mesh_listener::config::Selection;
use mesh_protocol::killswitch::{Mode, Scope};
use mesh_tests::fixtures::{dead_letters, listener_bin, wait_until_settled};
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(20);

/// Publishes messages numbered `range` to nova's inbox, in order.
async fn publish(js: &jetstream::Context, range: std::ops::Range<u32>) {
    for i in range {
        let to = mesh_protocol::Recipient::Agent("nova".parse().unwrap());
        let envelope = mesh_protocol::Envelope::new("kaan", to, format!("{i}")).unwrap();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", envelope.id.to_string().as_str());
        let ack = js.publish_with_headers("agents.nova.inbox", headers, envelope.encode().unwrap().into()).await;
        ack.unwrap().await.expect("publish acked");
    }
}

/// The numbers the gateway was asked to deliver, in arrival order.
fn numbers(gw: &RecordingGateway) -> Vec<u32> {
    gw.requests().iter().map(|r| r.text().rsplit(' ').next().unwrap().parse().unwrap()).collect()
}

/// The same with the retries of one message collapsed: in order, each once.
fn collapsed(gw: &RecordingGateway) -> Vec<u32> {
    let mut seen = numbers(gw);
    seen.dedup();
    seen
}

/// Waits until every number below `n` reached the gateway and the consumer is settled.
async fn wait_all(gw: &RecordingGateway, js: &jetstream::Context, n: u32) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(0..n).all(|i| numbers(gw).contains(&i)) {
        assert!(tokio::time::Instant::now() < deadline, "not all of 0..{n} arrived: {:?}", collapsed(gw));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_until_settled(js, "nova", WAIT).await;
}

async fn window_of(js: &jetstream::Context) -> i64 {
    js.get_stream("MESH_AGENTS").await.unwrap().consumer_info("agent-nova").await.unwrap().config.max_ack_pending
}

async fn unacked(js: &jetstream::Context) -> usize {
    js.get_stream("MESH_AGENTS").await.unwrap().consumer_info("agent-nova").await.unwrap().num_ack_pending
}

async fn wait_unacked(js: &jetstream::Context, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while unacked(js).await != n {
        assert!(tokio::time::Instant::now() < deadline, "{} unacked, expected {n}", unacked(js).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_failing_head_is_retried_in_place_while_the_window_waits() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let mut config = fixture.listener_config(&nats, Selection::One("nova".parse().unwrap()));
    config.retry.base = Duration::from_millis(20);
    config.retry.max = Duration::from_millis(100);
    config.retry.max_deliver = 50;
    config.request_timeout = Duration::from_millis(300);
    // 5xx answers: the first message fails three times, a later one twice, then some at random.
    gw.script([500, 503, 502]);
    // The bot's part first: a consumer created after a publish would not see it.
    mesh_tests::fixtures::provision_agent(&js, "nova", config.tuning()).await.unwrap();
    let listener = ListenerHandle::spawn(config);
    publish(&js, 0..20).await;
    wait_all(&gw, &js, 20).await;
    assert_eq!(window_of(&js).await, 4, "the consumer hands out a window of four");
    gw.set_failure_rate(0.3, 7);
    publish(&js, 20..60).await;
    wait_all(&gw, &js, 60).await;
    gw.set_failure_rate(0.0, 7);
    // Timeouts: the gateway answers nothing; the head is tried again and again, alone.
    let before = gw.requests().len();
    gw.hold();
    publish(&js, 60..70).await;
    gw.wait_for(before + 3, WAIT).await;
    let tried: Vec<u32> = numbers(&gw)[before..].to_vec();
    assert!(tried.iter().all(|&n| n == 60), "only the head is tried while it times out: {tried:?}");
    gw.release();
    wait_all(&gw, &js, 70).await;
    assert_eq!(collapsed(&gw), (0..70).collect::<Vec<_>>(), "in order, each once, retries collapsed");
    assert!(numbers(&gw).len() >= 70 + 3 + 3, "the scripted failures and timeouts happened");
    assert!(dead_letters(&js).await.is_empty());
    listener.stop().await.unwrap();
}

#[tokio::test]
async fn the_dead_letter_budget_applies_to_a_head_retried_in_place() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let mut config = fixture.listener_config(&nats, Selection::One("nova".parse().unwrap()));
    config.retry.base = Duration::from_millis(10);
    config.retry.max = Duration::from_millis(20);
    config.retry.max_deliver = 3;
    gw.script([500, 500, 500]);
    // The bot's part first: a consumer created after a publish would not see it.
    mesh_tests::fixtures::provision_agent(&js, "nova", config.tuning()).await.unwrap();
    let listener = ListenerHandle::spawn(config);
    publish(&js, 0..5).await;
    wait_all(&gw, &js, 5).await;
    assert_eq!(numbers(&gw), [0, 0, 0, 1, 2, 3, 4], "three tries of the head, then the next ones");
    let letters = dead_letters(&js).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].0.attempts, 3);
    assert!(letters[0].0.reason.contains("gave up after 3 deliveries"), "{}", letters[0].0.reason);
    listener.stop().await.unwrap();
}

#[tokio::test]
async fn kill_9_mid_window_keeps_the_order() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let spawn = || {
        tokio::process::Command::new(listener_bin())
            .args(["--agent", "nova", "--ack-wait", "2"])
            .env("NATS_URL", nats.url())
            .env("MESH_REGISTRY", &fixture.registry)
            .env("MESH_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("listener")
    };
    let tuning = mesh_tests::fixtures::listener_tuning(1, Duration::from_secs(2));
    assert_eq!(tuning.max_ack_pending, 4);
    mesh_tests::fixtures::provision_agent(&js, "nova", tuning).await.unwrap();
    gw.hold();
    let mut first = spawn();
    // Two messages out to the first listener (a window not full), the head in the gateway.
    publish(&js, 0..2).await;
    gw.wait_for(1, WAIT).await;
    wait_unacked(&js, 2).await;
    first.start_kill().expect("kill -9");
    first.wait().await.expect("reaped");
    // Newer messages: the server could hand them out at once (the window has room).
    publish(&js, 2..8).await;
    gw.release();
    let mut second = spawn();
    wait_all(&gw, &js, 8).await;
    assert_eq!(collapsed(&gw), (0..8).collect::<Vec<_>>(), "the crashed window first, in order, then the rest");
    second.start_kill().unwrap();
}

#[tokio::test]
async fn a_pause_mid_window_hands_the_window_back_in_order() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let mut config = fixture.listener_config(&nats, Selection::One("nova".parse().unwrap()));
    // The ack wait (30 s) is longer than the test waits: a window not handed back would stall it.
    config.request_timeout = Duration::from_millis(500);
    config.retry.base = Duration::from_millis(10);
    config.retry.max = Duration::from_millis(20);
    let (listener, control) = ListenerHandle::spawn_with_control(config).await;
    gw.hold();
    publish(&js, 0..8).await;
    gw.wait_for(1, WAIT).await;
    wait_unacked(&js, 4).await;
    let switch = KillSwitch::open(&js).await.unwrap();
    let director = || Actor::director("slack:UDIRECTOR");
    switch.pull(&Scope::Global, Mode::Hard, None, director(), Some("mid-window".into())).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !control
        .fleet
        .get(&"nova".parse().unwrap())
        .is_some_and(|s| s.paused.load(std::sync::atomic::Ordering::Relaxed))
    {
        assert!(tokio::time::Instant::now() < deadline, "never paused");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The head's call times out; then nothing more reaches the gateway while paused.
    gw.release();
    let during = numbers(&gw);
    assert!(during.iter().all(|&n| n == 0), "only the head was tried before the pause: {during:?}");
    switch.release(&Scope::Global, director()).await.unwrap();
    wait_all(&gw, &js, 8).await;
    assert_eq!(collapsed(&gw), (0..8).collect::<Vec<_>>(), "handed back and redelivered in order");
    listener.stop().await.unwrap();
}

#[tokio::test]
async fn a_backlog_waiting_before_the_listener_starts_is_delivered_in_order() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let config = fixture.listener_config(&nats, Selection::One("nova".parse().unwrap()));
    mesh_tests::fixtures::provision_agent(&js, "nova", config.tuning()).await.unwrap();
    publish(&js, 0..500).await;
    let listener = ListenerHandle::spawn(config);
    // A debug build on a loaded machine: as long as the thousand-message test in listener.rs allows.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while gw.requests().len() < 500 {
        assert!(tokio::time::Instant::now() < deadline, "{} of 500 delivered", gw.requests().len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_all(&gw, &js, 500).await;
    assert_eq!(numbers(&gw), (0..500).collect::<Vec<_>>(), "each once, in order");
    listener.stop().await.unwrap();
}
