//! Listener replicas: two `mesh-listener --all` processes serving the same
//! agents share each agent's durable consumer. With a prefetch window of 1
//! (the registry's `"prefetch": 1`, so the server hands out one message of an
//! agent at a time) no message reaches the gateway twice, each agent's
//! messages arrive in order though both replicas deliver them, and when one
//! replica is killed (-9) mid-delivery the other carries on once the ack wait
//! of the message it held runs out.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use async_nats::jetstream;
use mesh_protocol::layout::ConsumerTuning;
use mesh_tests::fixtures::{Logged, listener_bin, wait_until_settled};
use mesh_tests::{Fixture, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(30);

fn registry(agents: &[(&str, &RecordingGateway)]) -> Fixture {
    let mut map = serde_json::Map::new();
    for (id, gw) in agents {
        map.insert(
            (*id).to_owned(),
            serde_json::json!({
                "hooks_token": format!("{id}-hook-token"),
                "hooks_url": gw.hooks_url(),
                "prefetch": 1,
            }),
        );
    }
    Fixture::from_json(&serde_json::Value::Object(map))
}

/// The bot's part: streams, bucket, and each agent's consumer as the registry
/// says (one message out at a time), with a short ack wait.
async fn provision(js: &jetstream::Context, fixture: &Fixture) {
    let registry = mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
    let tuning = registry.agents().next().unwrap().consumer_tuning();
    assert_eq!(tuning.max_ack_pending, 1, "\"prefetch\": 1 hands out one message at a time");
    mesh_bot::provision::ensure_mesh(js, mesh_protocol::layout::Replicas::Auto).await.unwrap();
    let tuning = ConsumerTuning { ack_wait: Duration::from_secs(2), ..tuning };
    mesh_bot::provision::ensure_agents(js, &registry, Some(tuning)).await.unwrap();
}

fn replica(nats: &TestNats, fixture: &Fixture) -> Logged {
    let mut command = tokio::process::Command::new(listener_bin());
    command
        .args(["--all"])
        .env("NATS_URL", nats.url())
        .env("MESH_REGISTRY", &fixture.registry)
        .env("MESH_LOG", "mesh_listener=info")
        .env("MESH_LOG_FORMAT", "json");
    Logged::spawn(command)
}

async fn publish(js: &jetstream::Context, agent: &str, range: std::ops::Range<u32>) {
    for i in range {
        let to = mesh_protocol::Recipient::Agent(agent.parse().unwrap());
        let envelope = mesh_protocol::Envelope::new("kaan", to, format!("{i}")).unwrap();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", envelope.id.to_string().as_str());
        let subject = format!("agents.{agent}.inbox");
        js.publish_with_headers(subject, headers, envelope.encode().unwrap().into()).await.unwrap().await.unwrap();
    }
}

fn numbers(gw: &RecordingGateway) -> Vec<u32> {
    gw.requests().iter().map(|r| r.text().rsplit(' ').next().unwrap().parse().unwrap()).collect()
}

/// Waits until `n` pull requests wait on `agent`'s consumer.
async fn wait_waiting(js: &jetstream::Context, agent: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let info = js.get_stream("MESH_AGENTS").await.unwrap().consumer_info(format!("agent-{agent}")).await.unwrap();
        if info.num_waiting >= n {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{agent}: {} pull requests waiting", info.num_waiting);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deliveries a replica logged (JSON lines with the message "delivered").
fn deliveries(output: &str) -> usize {
    output.lines().filter(|l| l.contains(r#""message":"delivered""#)).count()
}

#[tokio::test]
async fn two_replicas_deliver_each_message_once_and_in_order() {
    let nats = TestNats::start().await;
    let (nova, kaan) = (RecordingGateway::start().await, RecordingGateway::start().await);
    // A little gateway time, so both replicas' pull requests get their turns.
    nova.set_delay(Duration::from_millis(2));
    kaan.set_delay(Duration::from_millis(2));
    let fixture = registry(&[("nova", &nova), ("kaan", &kaan)]);
    let js = nats.jetstream().await;
    provision(&js, &fixture).await;
    let (a, b) = (replica(&nats, &fixture), replica(&nats, &fixture));
    for agent in ["nova", "kaan"] {
        wait_waiting(&js, agent, 2).await;
    }
    let (one, two) = tokio::join!(publish(&js, "nova", 0..150), publish(&js, "kaan", 0..150));
    let ((), ()) = (one, two);
    for (agent, gw) in [("nova", &nova), ("kaan", &kaan)] {
        gw.wait_for(150, WAIT).await;
        wait_until_settled(&js, agent, WAIT).await;
        assert_eq!(numbers(gw), (0..150).collect::<Vec<_>>(), "{agent}: each once, in order");
    }
    let (a, b) = (a.kill().await, b.kill().await);
    let (from_a, from_b) = (deliveries(&a), deliveries(&b));
    println!("replica a delivered {from_a}, replica b {from_b}");
    assert_eq!(from_a + from_b, 300, "every delivery logged once:\n{a}\n{b}");
    assert!(from_a > 0 && from_b > 0, "both replicas delivered ({from_a} and {from_b})");
}

#[tokio::test]
async fn a_replica_killed_mid_delivery_leaves_the_other_carrying_on() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = registry(&[("nova", &gw)]);
    let js = nats.jetstream().await;
    provision(&js, &fixture).await;
    gw.hold();
    let first = replica(&nats, &fixture);
    wait_waiting(&js, "nova", 1).await;
    publish(&js, "nova", 0..20).await;
    // The first replica has message 0 in the gateway; the second waits behind it.
    gw.wait_for(1, WAIT).await;
    let second = replica(&nats, &fixture);
    wait_waiting(&js, "nova", 1).await;
    first.kill().await;
    gw.release();
    gw.wait_for(21, WAIT).await;
    wait_until_settled(&js, "nova", WAIT).await;
    let mut seen = numbers(&gw);
    assert_eq!(seen[..2], [0, 0], "the killed replica's message again, first: {seen:?}");
    let keys: Vec<_> = gw.requests().iter().take(2).map(|r| r.idempotency_key.clone()).collect();
    assert_eq!(keys[0], keys[1], "the redelivery carries the same Idempotency-Key");
    seen.dedup();
    assert_eq!(seen, (0..20).collect::<Vec<_>>(), "the second replica carried on in order");
    second.kill().await;
}
