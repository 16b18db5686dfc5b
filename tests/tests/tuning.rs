//! Consumer tuning comes from one place: the registry's `concurrency` of an
//! agent. The bot creates (or updates) the consumer with it, and a listener
//! runs within what its consumer allows: its in-flight window and its ack
//! wait (in-progress acks are timed from the consumer's, not `--ack-wait`).
//! Also: with `--all`, an agent whose consumer is set up otherwise stops
//! alone, reported in `/health`, while the others keep delivering.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use mesh_listener::config::Selection;
use mesh_protocol::layout::{ConsumerTuning, Replicas};
use mesh_protocol::{AgentId, Priority, Registry};
use mesh_tests::fixtures::wait_until_settled;
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(20);

fn load(fixture: &Fixture) -> Registry {
    mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap()
}

async fn send(js: &async_nats::jetstream::Context, fixture: &Fixture, to: &str, text: &str) {
    mesh_bot::publish::send(js, &load(fixture), "cli:t", to, text, Priority::Normal).await.unwrap();
}

fn entry(gw: &RecordingGateway, id: &str, concurrency: Option<u16>) -> serde_json::Value {
    let mut entry = serde_json::json!({
        "gateway": gw.addr.to_string(),
        "hooks_token": format!("{id}-hook-token"),
        "hooks_url": gw.hooks_url(),
    });
    if let Some(n) = concurrency {
        entry["concurrency"] = n.into();
    }
    entry
}

/// Most requests the gateway was serving at one moment: each request takes
/// `delay`, so two overlap when they arrived less than `delay` apart.
fn most_at_once(gw: &RecordingGateway, delay: Duration) -> usize {
    let arrivals: Vec<_> = gw.requests().iter().map(|r| r.at).collect();
    arrivals
        .iter()
        .map(|&at| arrivals.iter().filter(|&&other| other <= at && at < other + delay).count())
        .max()
        .unwrap()
}

/// Issue (review of `sec`): the bot created every consumer with the defaults,
/// so `--concurrency 4` ran one delivery at a time.
#[tokio::test]
async fn a_listener_runs_the_deliveries_its_registry_entry_allows_at_once() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let delay = Duration::from_millis(1500);
    gw.set_delay(delay);
    let fixture = Fixture::from_json(&serde_json::json!({"nova": entry(&gw, "nova", Some(4))}));
    let js = nats.jetstream().await;
    // A sender created the consumer with the defaults earlier; the bot's pass brings it to the registry's tuning.
    mesh_bot::provision::ensure_mesh(&js, Replicas::Auto).await.unwrap();
    let nova: AgentId = "nova".parse().unwrap();
    mesh_listener::nats::ensure_consumer(&js, &nova, ConsumerTuning::default()).await.unwrap();
    mesh_bot::provision::ensure_agents(&js, &load(&fixture), None).await.unwrap();
    let info = js.get_stream("MESH_AGENTS").await.unwrap().consumer_info("agent-nova").await.unwrap();
    assert_eq!(info.config.max_ack_pending, 16, "the bot updated the consumer to the registry's concurrency 4");

    let mut config = fixture.listener_config(&nats, Selection::One(nova));
    config.concurrency = 4;
    config.request_timeout = Duration::from_secs(10);
    let listener = ListenerHandle::spawn_bare(config);
    for i in 0..8 {
        send(&js, &fixture, "nova", &format!("m{i}")).await;
    }
    gw.wait_for(8, WAIT).await;
    wait_until_settled(&js, "nova", WAIT).await;
    assert_eq!(most_at_once(&gw, delay), 4, "four deliveries in flight at once");
    assert_eq!(gw.requests().len(), 8, "each once");
    listener.stop().await.unwrap();
}

/// Issue (review of `sec`): in-progress acks were timed from `--ack-wait`
/// (120 s: one every 40 s) while the consumer redelivers after its own ack
/// wait (here 1 s), so a slow delivery reached the gateway twice.
#[tokio::test]
async fn in_progress_acks_follow_the_consumers_ack_wait_not_the_flag() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    gw.set_delay(Duration::from_millis(3500));
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let tuning = ConsumerTuning { ack_wait: Duration::from_secs(1), max_ack_pending: 1 };
    mesh_tests::fixtures::provision_agent(&js, "nova", tuning).await.unwrap();
    let mut config = fixture.listener_config(&nats, Selection::One("nova".parse().unwrap()));
    config.ack_wait = Duration::from_secs(120);
    config.request_timeout = Duration::from_secs(10);
    let listener = ListenerHandle::spawn_bare(config);
    send(&js, &fixture, "nova", "take your time").await;
    gw.wait_for(1, WAIT).await;
    wait_until_settled(&js, "nova", WAIT).await;
    assert_eq!(gw.requests().len(), 1, "the gateway took 3.5x the consumer's ack wait and still got one request");
    listener.stop().await.unwrap();
}

/// Issue (review of `sec`): with `--all`, one agent's consumer set up
/// otherwise stopped every agent of the process.
#[tokio::test]
async fn with_all_one_bad_consumer_stops_only_its_agent() {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true), ("kaan", &gw, true)]);
    let js = nats.jetstream().await;
    mesh_bot::provision::ensure_mesh(&js, Replicas::Auto).await.unwrap();
    mesh_bot::provision::ensure_agents(&js, &load(&fixture), None).await.unwrap();
    // nova's consumer now reads every inbox.
    let stream = js.get_stream("MESH_AGENTS").await.unwrap();
    stream
        .create_consumer(pull::Config {
            durable_name: Some("agent-nova".into()),
            filter_subjects: vec!["agents.*.inbox".into(), "agents.broadcast".into()],
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: 1,
            max_deliver: -1,
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut config = fixture.listener_config(&nats, Selection::All);
    let port = mesh_bot::local_nats::free_port().unwrap();
    config.http_addr = Some(([127, 0, 0, 1], port).into());
    let (control_tx, control_rx) = tokio::sync::oneshot::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(mesh_listener::run_with(
        config,
        async move {
            let _ = stopped.await;
        },
        move |control| {
            let _ = control_tx.send(control);
        },
    ));
    let control = control_rx.await.unwrap();
    let nova = control.fleet.get(&"nova".parse().unwrap()).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while nova.refused().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "nova's loop never stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(nova.refused().unwrap().contains("consumer agent-nova is not set up as this listener expects"));
    send(&js, &fixture, "kaan", "still flowing").await;
    let got = gw.wait_for(1, WAIT).await;
    assert!(got[0].text().ends_with("still flowing"));
    let health: serde_json::Value =
        reqwest::get(format!("http://127.0.0.1:{port}/health")).await.unwrap().json().await.unwrap();
    assert_eq!(health["status"], "unhealthy", "{health}");
    assert!(health["refused"]["nova"].as_str().unwrap().contains("agent-nova"), "{health}");
    assert!(health["refused"].get("kaan").is_none(), "{health}");
    let _ = stop.send(());
    run.await.unwrap().unwrap();
}
