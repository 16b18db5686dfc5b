//! The kill switch against a real nats-server: paused listeners deliver
//! nothing until the pause ends, a soft pause ends by itself with no bot
//! running, a listener started during a pause starts paused, a per-agent
//! pause leaves the other agents flowing, and an unreadable entry pauses.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use mesh_bot::killswitch::KillSwitch;
use mesh_listener::Control;
use mesh_listener::config::Selection;
use mesh_protocol::killswitch::{Mode, Scope};
use mesh_protocol::{AgentId, Priority};
use mesh_tests::fixtures::wait_until_settled;
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(20);

fn id(s: &str) -> AgentId {
    s.parse().unwrap()
}

async fn wait_paused(control: &Control, agent: &str, paused: bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(state) = control.fleet.get(&id(agent))
            && state.paused.load(std::sync::atomic::Ordering::Relaxed) == paused
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{agent} never became paused={paused}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn send(js: &async_nats::jetstream::Context, fixture: &Fixture, to: &str, text: &str) {
    let registry = mesh_listener::registry_file::load(&fixture.registry).unwrap();
    mesh_bot::publish::send(js, &registry, "cli:t", to, text, Priority::Normal).await.unwrap();
}

/// Waits until the server holds `n` undelivered messages for `agent` (none in flight).
async fn wait_waiting(js: &async_nats::jetstream::Context, agent: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let info = js.get_stream("MESH_AGENTS").await.unwrap().consumer_info(format!("agent-{agent}")).await.unwrap();
        if info.num_pending == n && info.num_ack_pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{agent}: {} pending, {} in flight",
            info.num_pending,
            info.num_ack_pending
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_hard_pause_holds_messages_until_resume() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let (listener, control) = ListenerHandle::spawn_with_control(fixture.listener_config(&nats, Selection::All)).await;
    let switch = KillSwitch::open(&js).await.unwrap();
    switch.pull(&Scope::Global, Mode::Hard, None, "slack:UDIRECTOR", Some("incident".into())).await.unwrap();
    wait_paused(&control, "nova", true).await;
    send(&js, &fixture, "nova", "held").await;
    wait_waiting(&js, "nova", 1).await;
    assert!(gw.requests().is_empty(), "nothing is delivered while paused");
    switch.release(&Scope::Global, "slack:UDIRECTOR").await.unwrap();
    gw.wait_for(1, WAIT).await;
    wait_until_settled(&js, "nova", WAIT).await;
    assert_eq!(gw.requests().len(), 1);
    listener.stop().await.unwrap();
}

#[tokio::test]
async fn a_soft_pause_ends_by_itself_with_no_bot_running() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let (listener, control) = ListenerHandle::spawn_with_control(fixture.listener_config(&nats, Selection::All)).await;
    let state = {
        // The switch is pulled and the client dropped: nothing but the listener remains.
        let switch = KillSwitch::open(&nats.jetstream().await).await.unwrap();
        switch.pull(&Scope::Global, Mode::Soft, Some(Duration::from_secs(2)), "cli:t", None).await.unwrap()
    };
    wait_paused(&control, "nova", true).await;
    send(&js, &fixture, "nova", "after the pause").await;
    wait_waiting(&js, "nova", 1).await;
    gw.wait_for(1, WAIT).await;
    let until = state.until.unwrap();
    assert!(time::OffsetDateTime::now_utc() >= until, "delivered only once the soft pause ended at {until}");
    wait_until_settled(&js, "nova", WAIT).await;
    listener.stop().await.unwrap();
}

#[tokio::test]
async fn a_listener_started_during_a_pause_starts_paused() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let switch = KillSwitch::open(&js).await.unwrap();
    switch.pull(&Scope::Agent(id("nova")), Mode::Hard, None, "cli:t", None).await.unwrap();
    send(&js, &fixture, "nova", "sent before the listener started").await;
    let (listener, control) = ListenerHandle::spawn_with_control(fixture.listener_config(&nats, Selection::All)).await;
    wait_paused(&control, "nova", true).await;
    wait_waiting(&js, "nova", 1).await;
    assert!(gw.requests().is_empty());
    switch.release(&Scope::Agent(id("nova")), "cli:t").await.unwrap();
    gw.wait_for(1, WAIT).await;
    listener.stop().await.unwrap();
}

#[tokio::test]
async fn a_per_agent_pause_leaves_other_agents_flowing_in_one_all_process() {
    let nats = TestNats::start().await;
    let (nova, kaan) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = Fixture::registry(&[("nova", &nova, true), ("kaan", &kaan, true)]);
    let js = nats.jetstream().await;
    let (listener, control) = ListenerHandle::spawn_with_control(fixture.listener_config(&nats, Selection::All)).await;
    let switch = KillSwitch::open(&js).await.unwrap();
    switch.pull(&Scope::Agent(id("nova")), Mode::Soft, Some(Duration::from_secs(600)), "cli:t", None).await.unwrap();
    wait_paused(&control, "nova", true).await;
    wait_paused(&control, "kaan", false).await;
    send(&js, &fixture, "nova", "for nova").await;
    send(&js, &fixture, "kaan", "for kaan").await;
    kaan.wait_for(1, WAIT).await;
    wait_until_settled(&js, "kaan", WAIT).await;
    wait_waiting(&js, "nova", 1).await;
    assert!(nova.requests().is_empty(), "the paused agent got nothing");
    switch.release(&Scope::Agent(id("nova")), "cli:t").await.unwrap();
    nova.wait_for(1, WAIT).await;
    listener.stop().await.unwrap();
}

#[tokio::test]
async fn a_maintenance_window_announces_pauses_resumes_and_reports() {
    let nats = TestNats::start().await;
    let (nova, kaan) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = Fixture::registry(&[("nova", &nova, true), ("kaan", &kaan, true)]);
    let js = nats.jetstream().await;
    let (listener, control) = ListenerHandle::spawn_with_control(fixture.listener_config(&nats, Selection::All)).await;
    let registry = mesh_listener::registry_file::load(&fixture.registry).unwrap();
    let window = mesh_bot::maintenance::Window {
        duration: Duration::from_secs(2),
        lead: Duration::from_secs(1),
        message: Some("db upgrade".into()),
        by: "cli:ops".into(),
    };
    let (steps_tx, mut steps) = tokio::sync::mpsc::unbounded_channel::<String>();
    let client = nats.client().await;
    let run = tokio::spawn(async move {
        mesh_bot::maintenance::run(&client, &registry, &window, |step| {
            let _ = steps_tx.send(step.to_owned());
        })
        .await
    });
    let announced = steps.recv().await.unwrap();
    assert!(announced.starts_with("announced to 2 agents: maintenance in 1s: db upgrade"), "{announced}");
    let paused = steps.recv().await.unwrap();
    assert!(paused.starts_with("paused: the whole mesh: SOFT pause by cli:ops until"), "{paused}");
    wait_paused(&control, "nova", true).await;
    send(&js, &fixture, "nova", "during maintenance").await;
    wait_waiting(&js, "nova", 1).await;
    assert_eq!(nova.requests().len(), 1, "only the announcement reached nova while paused");
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.missing, 0);
    assert_eq!(report.steps.len(), 4);
    assert_eq!(report.steps[3], "announced: mesh is active again (2/2 agents answered the health check)");
    let got = nova.wait_for(3, WAIT).await;
    let texts: Vec<&str> = got.iter().map(|r| r.text()).collect();
    assert!(texts[0].contains("maintenance in 1s: db upgrade"), "{texts:?}");
    assert!(texts.iter().any(|t| t.ends_with("during maintenance")), "{texts:?}");
    assert!(texts.iter().any(|t| t.contains("mesh is active again")), "{texts:?}");
    listener.stop().await.unwrap();
}

#[tokio::test]
async fn an_unreadable_kill_switch_entry_pauses_until_it_is_deleted() {
    // Fail closed: garbage in the bucket (a hand edit, a newer writer) is a
    // pause, not a missing entry, both when it appears and at start.
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true), ("kaan", &gw, true)]);
    let js = nats.jetstream().await;
    let (listener, control) = ListenerHandle::spawn_with_control(fixture.listener_config(&nats, Selection::All)).await;
    let bucket = js.get_key_value(mesh_protocol::killswitch::BUCKET).await.unwrap();
    bucket.put("global", "{not a kill state".into()).await.unwrap();
    wait_paused(&control, "nova", true).await;
    wait_paused(&control, "kaan", true).await;
    send(&js, &fixture, "nova", "held by the unreadable entry").await;
    wait_waiting(&js, "nova", 1).await;
    assert!(gw.requests().is_empty(), "nothing is delivered under an unreadable entry");
    listener.stop().await.unwrap();

    // A listener starting over it starts paused, and one agent's bad entry pauses that agent only.
    bucket.delete("global").await.unwrap();
    bucket.put(&Scope::Agent(id("nova")).key(), "\u{0}".into()).await.unwrap();
    let (listener, control) = ListenerHandle::spawn_with_control(fixture.listener_config(&nats, Selection::All)).await;
    wait_paused(&control, "nova", true).await;
    send(&js, &fixture, "kaan", "kaan still flows").await;
    let got = gw.wait_for(1, WAIT).await;
    assert!(got[0].text().ends_with("kaan still flows"), "{}", got[0].text());
    wait_waiting(&js, "nova", 1).await;
    bucket.delete(&Scope::Agent(id("nova")).key()).await.unwrap();
    let got = gw.wait_for(2, WAIT).await;
    assert!(got[1].text().ends_with("held by the unreadable entry"), "{}", got[1].text());
    wait_until_settled(&js, "nova", WAIT).await;
    listener.stop().await.unwrap();
}
