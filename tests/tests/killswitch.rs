//! The kill switch against a real nats-server: paused listeners deliver
//! nothing until the pause ends, a soft pause ends by itself with no bot
//! running, a listener started during a pause starts paused, a per-agent
//! pause leaves the other agents flowing, and an unreadable entry pauses. A
//! kill in force is replaced or lifted only by a role that may resume from
//! it, from the CLI, the switch itself and a maintenance window. A key that
//! does not answer at first (a cluster electing leaders) is waited for at start.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use futures::StreamExt;

use mesh_bot::killswitch::{Actor, KillSwitch};
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
    let registry = mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
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
    switch
        .pull(&Scope::Global, Mode::Hard, None, Actor::director("slack:UDIRECTOR"), Some("incident".into()))
        .await
        .unwrap();
    wait_paused(&control, "nova", true).await;
    send(&js, &fixture, "nova", "held").await;
    wait_waiting(&js, "nova", 1).await;
    assert!(gw.requests().is_empty(), "nothing is delivered while paused");
    switch.release(&Scope::Global, Actor::director("slack:UDIRECTOR")).await.unwrap();
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
        switch
            .pull(&Scope::Global, Mode::Soft, Some(Duration::from_secs(2)), Actor::director("cli:t"), None)
            .await
            .unwrap()
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
    switch.pull(&Scope::Agent(id("nova")), Mode::Hard, None, Actor::director("cli:t"), None).await.unwrap();
    send(&js, &fixture, "nova", "sent before the listener started").await;
    let (listener, control) = ListenerHandle::spawn_with_control(fixture.listener_config(&nats, Selection::All)).await;
    wait_paused(&control, "nova", true).await;
    wait_waiting(&js, "nova", 1).await;
    assert!(gw.requests().is_empty());
    switch.release(&Scope::Agent(id("nova")), Actor::director("cli:t")).await.unwrap();
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
    switch
        .pull(&Scope::Agent(id("nova")), Mode::Soft, Some(Duration::from_secs(600)), Actor::director("cli:t"), None)
        .await
        .unwrap();
    wait_paused(&control, "nova", true).await;
    wait_paused(&control, "kaan", false).await;
    send(&js, &fixture, "nova", "for nova").await;
    send(&js, &fixture, "kaan", "for kaan").await;
    kaan.wait_for(1, WAIT).await;
    wait_until_settled(&js, "kaan", WAIT).await;
    wait_waiting(&js, "nova", 1).await;
    assert!(nova.requests().is_empty(), "the paused agent got nothing");
    switch.release(&Scope::Agent(id("nova")), Actor::director("cli:t")).await.unwrap();
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
    let registry = mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
    let window = mesh_bot::maintenance::Window {
        duration: Duration::from_secs(2),
        lead: Duration::from_secs(1),
        message: Some("db upgrade".into()),
        by: "cli:ops".into(),
        role: Some(mesh_bot::command::Role::Admin),
    };
    let (steps_tx, mut steps) = tokio::sync::mpsc::unbounded_channel::<String>();
    let client = nats.client().await;
    let run = tokio::spawn(async move {
        mesh_bot::maintenance::run(&client, mesh_protocol::layout::Replicas::Auto, &registry, &window, |step| {
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

/// Runs `mesh` as the terminal with `role` (set through `MESH_PERMISSIONS`),
/// against a compose project that does not exist (Docker, if any, finds nothing to stop).
async fn mesh_as(nats: &TestNats, fixture: &Fixture, role: &str, args: &[&str]) -> (bool, String) {
    let permissions = fixture.dir().join(format!("terminal-{role}.json"));
    std::fs::write(&permissions, serde_json::json!({ "terminal": role }).to_string()).unwrap();
    let out = mesh_tests::fixtures::mesh_command(&nats.url(), &fixture.registry)
        .args(args)
        .env("MESH_PERMISSIONS", &permissions)
        .env("MESH_COMPOSE_PROJECT", "mesh-test-no-such-project")
        .output()
        .await
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Issue 19, verified scenario: a director's hard kill, then an admin's
/// `kill soft --for 1s` overwrote it and the admin could resume a second later.
#[tokio::test]
async fn an_admin_cannot_lift_a_directors_hard_kill_by_pulling_a_soft_one() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let (ok, said) = mesh_as(&nats, &fixture, "director", &["kill", "hard", "--yes"]).await;
    assert!(ok && said.contains("HARD by terminal"), "{said}");

    let (ok, said) = mesh_as(&nats, &fixture, "admin", &["resume", "--yes"]).await;
    assert!(!ok && said.contains("needs the director role while a hard kill is in force"), "{said}");
    let (ok, said) = mesh_as(&nats, &fixture, "admin", &["kill", "soft", "--for", "1s"]).await;
    assert!(!ok, "an admin replaced a director's hard kill: {said}");
    assert!(
        said.contains("\"kill soft\" needs the director role while a hard kill is in force; you have admin"),
        "{said}"
    );
    let (ok, said) = mesh_as(&nats, &fixture, "admin", &["kill", "hard", "--yes", "--reason", "mine now"]).await;
    assert!(!ok && said.contains("needs the director role while a hard kill is in force"), "{said}");

    // Whatever the admin tried, the director's entry is still there, unchanged.
    let switch = KillSwitch::open(&js).await.unwrap();
    let state = switch.get(&Scope::Global).await.unwrap().unwrap();
    assert_eq!((state.mode, state.by.as_str(), state.reason.as_deref()), (Mode::Hard, "terminal", None));
    let (_, status) = mesh_as(&nats, &fixture, "admin", &["status"]).await;
    assert!(status.contains("the whole mesh: HARD by terminal") && !status.contains("not pulled"), "{status}");
    let (ok, said) = mesh_as(&nats, &fixture, "admin", &["resume", "--yes"]).await;
    assert!(!ok && said.contains("needs the director role"), "{said}");

    // An agent's own entry lifts nothing of a global kill: allowed, and the global kill stays.
    let (ok, said) = mesh_as(&nats, &fixture, "admin", &["kill", "soft", "--for", "1s", "--agent", "nova"]).await;
    assert!(ok, "{said}");
    let effective = switch.effective(Some(&id("nova"))).await.unwrap().unwrap();
    assert_eq!(effective.mode, Mode::Hard);

    let (ok, said) = mesh_as(&nats, &fixture, "director", &["resume", "--yes"]).await;
    assert!(ok, "{said}");
    assert_eq!(switch.effective(None).await.unwrap(), None);
}

/// The same rule below the engine: the bucket write itself refuses, so a kill
/// pulled between a permission check and the write is not overwritten.
#[tokio::test]
async fn the_switch_replaces_an_entry_only_for_a_role_that_may_resume_it() {
    let nats = TestNats::start().await;
    let js = nats.jetstream().await;
    let switch = KillSwitch::open(&js).await.unwrap();
    let admin = Actor::new("slack:UADM", Some(mesh_bot::command::Role::Admin));
    let nova = Scope::Agent(id("nova"));
    switch.pull(&nova, Mode::Soft, Some(Duration::from_secs(600)), admin, None).await.unwrap();
    switch.pull(&nova, Mode::Hard, None, admin, None).await.expect("an admin may replace a soft pause");
    let err = switch.pull(&nova, Mode::Soft, None, admin, None).await.unwrap_err().to_string();
    assert_eq!(
        err,
        "agent nova: HARD by slack:UADM until a director resumes is in force; replacing or lifting it needs the \
         director role; you have admin"
    );
    assert!(switch.release(&nova, admin).await.unwrap_err().to_string().contains("needs the director role"));
    switch.pull(&Scope::Global, Mode::Nuclear, None, Actor::director("slack:UDIR"), None).await.unwrap();
    let err = switch.pull(&Scope::Global, Mode::Hard, None, admin, None).await.unwrap_err().to_string();
    assert!(err.starts_with("the whole mesh: NUCLEAR by slack:UDIR"), "{err}");
    assert_eq!(switch.get(&nova).await.unwrap().unwrap().mode, Mode::Hard);
    switch.release(&nova, Actor::director("slack:UDIR")).await.unwrap();
    switch.release(&Scope::Global, Actor::director("slack:UDIR")).await.unwrap();
    assert_eq!(switch.in_force().await.unwrap(), Vec::new());
}

/// `mesh maintenance` pulled a soft pause over a global hard kill and released it at its end.
#[tokio::test]
async fn a_maintenance_window_never_replaces_or_ends_a_hard_kill() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let registry = mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
    let switch = KillSwitch::open(&js).await.unwrap();
    let client = nats.client().await;
    let window = |role| mesh_bot::maintenance::Window {
        duration: Duration::from_secs(1),
        lead: Duration::ZERO,
        message: None,
        by: "cli:ops".into(),
        role: Some(role),
    };
    switch.pull(&Scope::Global, Mode::Hard, None, Actor::director("slack:UDIR"), None).await.unwrap();
    for role in [mesh_bot::command::Role::Admin, mesh_bot::command::Role::Director] {
        let err = mesh_bot::maintenance::run(
            &client,
            mesh_protocol::layout::Replicas::Auto,
            &registry,
            &window(role),
            |_| {},
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("the whole mesh: HARD by slack:UDIR until a director resumes is in force"), "{err}");
        assert_eq!(switch.get(&Scope::Global).await.unwrap().unwrap().mode, Mode::Hard);
    }
    assert!(gw.requests().is_empty(), "nothing was announced");

    // A hard kill pulled during the window outlives the window's end.
    switch.release(&Scope::Global, Actor::director("slack:UDIR")).await.unwrap();
    let (steps_tx, mut steps) = tokio::sync::mpsc::unbounded_channel::<String>();
    let run = {
        let (client, registry, window) = (client.clone(), registry.clone(), window(mesh_bot::command::Role::Admin));
        tokio::spawn(async move {
            mesh_bot::maintenance::run(&client, mesh_protocol::layout::Replicas::Auto, &registry, &window, |s| {
                let _ = steps_tx.send(s.to_owned());
            })
            .await
        })
    };
    let _announced = steps.recv().await.unwrap();
    let paused = steps.recv().await.unwrap();
    assert!(paused.starts_with("paused: the whole mesh: SOFT"), "{paused}");
    switch.pull(&Scope::Global, Mode::Hard, None, Actor::director("slack:UDIR"), None).await.unwrap();
    let err = run.await.unwrap().unwrap_err().to_string();
    assert!(err.starts_with("not resumed: the whole mesh: HARD by slack:UDIR"), "{err}");
    assert_eq!(switch.get(&Scope::Global).await.unwrap().unwrap().mode, Mode::Hard);
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

/// Review of `sec`: a revision-checked write gave up as "contended" after
/// five attempts back to back; many directors pulling at once each get
/// their write in (jittered backoff, bounded by time), none overwritten unseen.
#[tokio::test]
async fn many_writers_at_once_all_get_their_write_in() {
    let nats = TestNats::start().await;
    let js = nats.jetstream().await;
    let switch = KillSwitch::open(&js).await.unwrap();
    let writers = 12;
    let names: Vec<String> = (0..writers).map(|i| format!("slack:UDIR{i}")).collect();
    let pulls = names.iter().enumerate().map(|(i, name)| {
        let switch = switch.clone();
        async move {
            let mode = if i % 2 == 0 { Mode::Hard } else { Mode::Nuclear };
            switch.pull(&Scope::Global, mode, None, Actor::director(name), None).await
        }
    });
    let results = futures::future::join_all(pulls).await;
    let failed: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().map(ToString::to_string)).collect();
    assert!(failed.is_empty(), "{} of {writers} writes failed: {failed:?}", failed.len());
    let store = js.get_key_value("mesh_killswitch").await.unwrap();
    let mut history = store.history("global").await.unwrap();
    let mut written = 0;
    while let Some(entry) = futures::StreamExt::next(&mut history).await {
        entry.unwrap();
        written += 1;
    }
    // The bucket keeps 16 revisions of a key: every write landed, each on its own revision.
    assert_eq!(written, writers);
    switch.release(&Scope::Global, Actor::director("slack:UDIR0")).await.unwrap();
}

/// README: sending while paused is accepted, and the answer says the message
/// is queued (send and broadcast, from the terminal, through the engine).
#[tokio::test]
async fn sends_during_a_pause_are_accepted_and_say_they_are_queued() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let run = |args: &'static [&'static str]| {
        let mut command = mesh_tests::fixtures::mesh_command(&nats.url(), &fixture.registry);
        command.args(args);
        async move { command.output().await.unwrap() }
    };
    let text = |out: &std::process::Output| String::from_utf8_lossy(&out.stdout).into_owned();
    let out = run(&["send", "nova", "before"]).await;
    assert!(out.status.success() && !text(&out).contains("queued"), "{}", text(&out));
    assert!(run(&["kill", "hard", "--yes", "--reason", "test"]).await.status.success());
    for args in [&["send", "nova", "while paused"][..], &["broadcast", "all hands"]] {
        let out = run(args).await;
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(text(&out).contains("queued and delivered when the pause ends"), "{args:?}: {}", text(&out));
    }
    let js = nats.jetstream().await;
    let stream = js.get_stream("MESH_AGENTS").await.unwrap();
    assert_eq!(stream.get_info().await.unwrap().state.messages, 3, "all three were stored");
}

/// Issue 21.5: a kill-switch bucket deleted and created again (or a lost NATS
/// volume) restarts revisions at 1; a running listener still follows it.
#[tokio::test]
async fn a_running_listener_follows_a_recreated_kill_switch_bucket() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let (listener, control) = ListenerHandle::spawn_with_control(fixture.listener_config(&nats, Selection::All)).await;
    let director = Actor::director("cli:t");
    let switch = KillSwitch::open(&js).await.unwrap();
    // A few writes: the global key's revision is well above 1.
    for _ in 0..3 {
        switch.pull(&Scope::Global, Mode::Hard, None, director, None).await.unwrap();
        wait_paused(&control, "nova", true).await;
        switch.release(&Scope::Global, director).await.unwrap();
        wait_paused(&control, "nova", false).await;
    }
    js.delete_key_value(mesh_protocol::killswitch::BUCKET).await.unwrap();
    let switch = KillSwitch::open(&js).await.unwrap();
    let written = switch
        .pull_revision(&Scope::Global, Mode::Hard, None, director, Some("after recreation".into()))
        .await
        .unwrap();
    assert_eq!(written.revision, 1, "a new bucket starts at revision 1");
    wait_paused(&control, "nova", true).await;
    switch.release(&Scope::Global, director).await.unwrap();
    wait_paused(&control, "nova", false).await;
    listener.stop().await.unwrap();
}

/// CI of 63a9665: a listener started on a fresh cluster exited because its
/// first read of a kill switch key found no responder yet. A read that gets
/// no answer at start is retried within the JetStream bound; the entry
/// written meanwhile is what the listener starts with.
#[tokio::test]
async fn the_start_waits_for_a_kill_switch_key_that_does_not_answer_at_first() {
    let nats = TestNats::start().await;
    let client = nats.client().await;
    let js = nats.jetstream().await;
    let key = Scope::Global.key();
    // Stand in for a replica that takes the request but has no answer yet.
    let mut silent = client.subscribe(mesh_protocol::access::killswitch_direct_get(&key)).await.unwrap();
    let keys = std::collections::BTreeSet::from([key.clone()]);
    let load = tokio::spawn({
        let client = client.clone();
        async move { mesh_listener::killswitch::load(&client, &keys).await }
    });
    let first = tokio::time::timeout(WAIT, silent.next()).await.expect("the start reads the key").unwrap();
    assert!(first.reply.is_some(), "a direct get asks for an answer");
    silent.unsubscribe().await.unwrap();
    let switch = KillSwitch::open(&js).await.unwrap();
    switch.pull(&Scope::Global, Mode::Hard, None, Actor::director("cli:t"), Some("held".into())).await.unwrap();
    let (states, _) =
        tokio::time::timeout(WAIT, load).await.expect("the start ends").unwrap().expect("the retry reads it");
    assert_eq!(states.get(&key).map(|s| s.mode), Some(Mode::Hard), "{states:?}");
}

/// nats-server whose `listener` user may not subscribe to the kill switch
/// bucket's key subjects (`$KV.mesh_killswitch.>`): every put or delete
/// notification is withheld from it, its direct gets still answer. The
/// `admin` user may do anything. Killed on drop.
struct DeafNats {
    _child: tokio::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl DeafNats {
    const LISTENER: (&'static str, &'static str) = ("listener", "listener-pw-1");
    const ADMIN: (&'static str, &'static str) = ("admin", "admin-pw-1");

    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // JSON is nats-server config syntax too, and keeps `$KV...` a literal string.
        let conf = serde_json::json!({"authorization": {"users": [
            {"user": Self::ADMIN.0, "password": Self::ADMIN.1},
            {"user": Self::LISTENER.0, "password": Self::LISTENER.1, "permissions": {
                "publish": {"allow": [">"]},
                "subscribe": {"allow": [">"], "deny": [mesh_protocol::access::killswitch_key_subject(">")]},
            }},
        ]}});
        let path = dir.path().join("deaf.conf");
        std::fs::write(&path, conf.to_string()).unwrap();
        let port = mesh_bot::local_nats::free_port().unwrap();
        let mut child = tokio::process::Command::new("nats-server")
            .arg("-c")
            .arg(&path)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path().join("store"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server (run scripts/install.sh)");
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(child.try_wait().unwrap().is_none(), "nats-server refused the config");
            assert!(tokio::time::Instant::now() < deadline, "nats-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { _child: child, port, _dir: dir }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// README (Kill switch): besides following notifications, a listener
/// re-reads its keys every `RESYNC_EVERY` (5 s), so a lost notification
/// cannot leave it delivering through a kill or paused after a resume. Here
/// no notification ever reaches it (nats-server denies its user the key
/// subjects; a probe as that user is told so): the pull and the resume are
/// seen by the periodic re-read alone, each within two re-read periods, and
/// what was sent during the pause is delivered after it.
#[tokio::test]
async fn a_listener_that_never_hears_a_change_still_pauses_and_resumes_by_its_re_read() {
    use mesh_listener::killswitch::RESYNC_EVERY;
    let nats = DeafNats::start().await;
    let admin = async_nats::ConnectOptions::with_user_and_password(DeafNats::ADMIN.0.into(), DeafNats::ADMIN.1.into())
        .connect(nats.url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(admin);
    mesh_listener::nats::ensure_streams(&js, mesh_protocol::layout::Replicas::Auto).await.unwrap();
    let switch = KillSwitch::open(&js).await.unwrap();

    // The listener's user hears nothing on a key's subject: the server says so.
    let (errors_tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let probe =
        async_nats::ConnectOptions::with_user_and_password(DeafNats::LISTENER.0.into(), DeafNats::LISTENER.1.into())
            .event_callback(move |event| {
                let errors_tx = errors_tx.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        let _ = errors_tx.send(e.to_string());
                    }
                }
            })
            .connect(nats.url())
            .await
            .unwrap();
    let _deaf = probe.subscribe(mesh_protocol::access::killswitch_key_subject(&Scope::Global.key())).await.unwrap();
    probe.flush().await.unwrap();
    let said = tokio::time::timeout(WAIT, errors.recv()).await.expect("the server refuses the subscription").unwrap();
    assert!(said.contains("Permissions Violation for Subscription"), "{said}");

    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let mut config = fixture.listener_config_at(&nats.url(), Selection::All);
    config.nats_auth.user =
        Some((DeafNats::LISTENER.0.to_owned(), mesh_protocol::Secret::new(DeafNats::LISTENER.1.to_owned())));
    let (listener, control) = ListenerHandle::spawn_with_control(config).await;
    send(&js, &fixture, "nova", "before").await;
    gw.wait_for(1, WAIT).await;

    // Within two re-read periods: the next re-read is at most one period away.
    let bound = 2 * RESYNC_EVERY;
    let within = |paused: bool| {
        let fleet = control.fleet.clone();
        async move {
            let started = tokio::time::Instant::now();
            loop {
                if fleet.get(&id("nova")).is_some_and(|s| s.paused.load(std::sync::atomic::Ordering::Relaxed) == paused)
                {
                    return started.elapsed();
                }
                assert!(started.elapsed() < bound, "nova not paused={paused} within {bound:?} without notifications");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    switch.pull(&Scope::Global, Mode::Hard, None, Actor::director("cli:t"), Some("unheard".into())).await.unwrap();
    within(true).await;
    send(&js, &fixture, "nova", "held").await;
    wait_waiting(&js, "nova", 1).await;
    assert_eq!(gw.requests().len(), 1, "nothing delivered while paused");
    switch.release(&Scope::Global, Actor::director("cli:t")).await.unwrap();
    within(false).await;
    let got = gw.wait_for(2, WAIT).await;
    assert!(got[1].text().ends_with("held"), "{}", got[1].text());
    listener.stop().await.unwrap();
}
