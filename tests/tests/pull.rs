//! The pull loop's edges against a real nats-server: what happens to
//! messages the server hands out while a pause or a stop is being applied,
//! at concurrency 1 and above.

use std::time::Duration;

use async_nats::jetstream;
use mesh_listener::config::Selection;
use mesh_listener::{Control, PauseCommand};
use mesh_protocol::{Priority, Registry};
use mesh_tests::fixtures::wait_until_settled;
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(20);

fn load(fixture: &Fixture) -> Registry {
    mesh_listener::registry_file::load(&fixture.registry, &Default::default()).expect("registry")
}

async fn send(js: &jetstream::Context, fixture: &Fixture, to: &str, text: &str) {
    mesh_bot::publish::send(js, &load(fixture), "cli:test", to, text, Priority::Normal).await.expect("send");
}

async fn wait_paused(control: &Control, agent: &str, paused: bool) {
    let id = agent.parse().expect("agent id");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(state) = control.fleet.get(&id)
            && state.paused.load(std::sync::atomic::Ordering::Relaxed) == paused
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{agent} never became paused={paused}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_pause_at_concurrency_1_hands_no_message_to_an_abandoned_pull() {
    // At concurrency 1 with a prefetch window of 1 (listener replicas) the
    // server hands out the next message as soon as the one in flight is acked. A pause drains that one: its ack must not let
    // the next one go to a pull request nobody reads any more, where it is
    // either lost until the ack wait (here two minutes) or handed back, having
    // used up a delivery attempt.
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    gw.set_delay(Duration::from_millis(300));
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let mut config = fixture.listener_config(&nats, Selection::One("nova".parse().expect("id")));
    config.ack_wait = Duration::from_secs(120);
    config.prefetch = 1;
    let (listener, control) = ListenerHandle::spawn_with_control(config).await;
    send(&js, &fixture, "nova", "first").await;
    send(&js, &fixture, "nova", "second").await;
    gw.wait_for(1, WAIT).await;
    control.pause.send(PauseCommand::All(true)).expect("pause");
    wait_paused(&control, "nova", true).await;
    assert_eq!(gw.requests().len(), 1, "nothing new starts during a pause");
    control.pause.send(PauseCommand::All(false)).expect("resume");
    let got = gw.wait_for(2, WAIT).await;
    assert!(got[1].text().ends_with("second"), "{:?}", got[1].text());
    wait_until_settled(&js, "nova", WAIT).await;
    // Each message was handed out once: none went to a pull nobody read, so
    // none used up a delivery attempt (which --max-deliver counts).
    let stream = js.get_stream("MESH_AGENTS").await.expect("agents stream");
    let info = stream.consumer_info("agent-nova").await.expect("consumer info");
    assert_eq!(info.delivered.consumer_sequence, 2, "deliveries handed out for two messages");
    listener.stop().await.expect("stop");
}

#[tokio::test]
async fn a_pause_at_concurrency_4_hands_waiting_messages_back_once() {
    // Above concurrency 1 messages wait here for a free slot. A pause hands
    // them back: with the pull still open they would come straight back into
    // it (using up a delivery attempt each time) and be lost with the
    // subscription until the ack wait (here two minutes).
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    gw.set_delay(Duration::from_millis(300));
    let entry = serde_json::json!({"hooks_token": "nova-hook-token", "hooks_url": gw.hooks_url(), "concurrency": 4});
    let fixture = Fixture::from_json(&serde_json::json!({ "nova": entry }));
    let js = nats.jetstream().await;
    let tuning = mesh_tests::fixtures::listener_tuning(4, Duration::from_secs(120));
    mesh_tests::fixtures::provision_agent(&js, "nova", tuning).await.expect("provisioning nova");
    let mut config = fixture.listener_config(&nats, Selection::One("nova".parse().expect("id")));
    config.ack_wait = Duration::from_secs(120);
    config.concurrency = 4;
    let (listener, control) = ListenerHandle::spawn_with_control(config).await;
    for n in 0..20 {
        send(&js, &fixture, "nova", &format!("message {n}")).await;
    }
    gw.wait_for(4, WAIT).await;
    control.pause.send(PauseCommand::All(true)).expect("pause");
    wait_paused(&control, "nova", true).await;
    let during = gw.requests().len();
    let stream = js.get_stream("MESH_AGENTS").await.expect("agents stream");
    let info = stream.consumer_info("agent-nova").await.expect("consumer info");
    assert_eq!(info.config.max_ack_pending, 16, "the listener ran at concurrency 4");
    assert!(during < 20, "the pause came before everything was delivered ({during})");
    control.pause.send(PauseCommand::All(false)).expect("resume");
    let got = gw.wait_for(20, WAIT).await;
    wait_until_settled(&js, "nova", WAIT).await;
    let mut texts: Vec<String> = gw.requests().iter().map(|r| r.text().to_owned()).collect();
    assert_eq!(texts.len(), 20, "every message delivered exactly once: {got:?}");
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len(), 20, "no message delivered twice");
    // At the pause 4 are in flight (the gateway takes 300 ms) and at most
    // 16 - 4 = 12 wait unstarted (max_ack_pending); each of those is handed
    // back and handed out once more, no more.
    let info = stream.consumer_info("agent-nova").await.expect("consumer info");
    assert!(
        info.delivered.consumer_sequence <= 20 + 12,
        "deliveries handed out: {} for 20 messages, {during} started before the pause",
        info.delivered.consumer_sequence
    );
    listener.stop().await.expect("stop");
}
