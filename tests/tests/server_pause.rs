//! The kill switch enforced by nats-server itself (issue 18, item 1): a plain
//! JetStream client, not our listener, pulls nothing from a paused agent's
//! consumer; `mesh resume` lifts it; a soft kill lifts at its deadline with no
//! bot and no listener running; a consumer created during a kill starts
//! paused; `mesh status` shows each consumer's pause on the server.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use futures::StreamExt;
use mesh_bot::killswitch::{Actor, KillSwitch};
use mesh_protocol::killswitch::{Mode, PAUSED_UNTIL_RESUMED, Scope};
use mesh_protocol::{AgentId, Priority};
use mesh_tests::fixtures::{listener_tuning, provision_agent};
use mesh_tests::{Fixture, RecordingGateway, TestNats};
use time::OffsetDateTime;

const WAIT: Duration = Duration::from_secs(20);

fn id(s: &str) -> AgentId {
    s.parse().unwrap()
}

/// Runs `mesh` as the terminal with `role`.
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

/// A plain JetStream client's fetch of at most one message from `agent-<agent>`,
/// waiting up to `expires`: the texts it got.
async fn fetch(js: &async_nats::jetstream::Context, agent: &str, expires: Duration) -> Vec<String> {
    let consumer: async_nats::jetstream::consumer::Consumer<pull::Config> =
        js.get_stream("MESH_AGENTS").await.unwrap().get_consumer(&format!("agent-{agent}")).await.unwrap();
    let mut batch = consumer.fetch().max_messages(1).expires(expires).messages().await.unwrap();
    let mut texts = Vec::new();
    while let Some(message) = batch.next().await {
        let message = message.unwrap();
        let envelope: mesh_protocol::Envelope = serde_json::from_slice(&message.payload).unwrap();
        texts.push(envelope.text);
        message.ack().await.unwrap();
    }
    texts
}

/// The consumer's pause on the server: `(paused, pause_until)`.
async fn server_pause(js: &async_nats::jetstream::Context, agent: &str) -> (bool, Option<OffsetDateTime>) {
    let info = js.get_stream("MESH_AGENTS").await.unwrap().consumer_info(format!("agent-{agent}")).await.unwrap();
    (info.paused, info.config.pause_until)
}

async fn send(js: &async_nats::jetstream::Context, fixture: &Fixture, to: &str, text: &str) {
    let registry = mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
    mesh_bot::publish::send(js, &registry, "cli:t", to, text, Priority::Normal).await.unwrap();
}

#[tokio::test]
async fn a_hard_kill_holds_messages_on_the_server_until_mesh_resume() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true), ("kaan", &gw, true)]);
    let js = nats.jetstream().await;
    for agent in ["nova", "kaan"] {
        provision_agent(&js, agent, listener_tuning(1, Duration::from_secs(30))).await.unwrap();
    }
    let (ok, said) = mesh_as(&nats, &fixture, "director", &["kill", "hard", "--yes", "--reason", "drill"]).await;
    assert!(ok, "{said}");
    assert_eq!(server_pause(&js, "nova").await, (true, Some(PAUSED_UNTIL_RESUMED)));
    assert_eq!(server_pause(&js, "kaan").await, (true, Some(PAUSED_UNTIL_RESUMED)));
    let (_, status) = mesh_as(&nats, &fixture, "director", &["status"]).await;
    assert!(status.contains("agent-nova: paused until resumed"), "{status}");

    send(&js, &fixture, "nova", "held by the server").await;
    // No listener runs: a client with the consumer's rights pulls and the server hands out nothing.
    assert_eq!(fetch(&js, "nova", Duration::from_secs(2)).await, Vec::<String>::new());

    let (ok, said) = mesh_as(&nats, &fixture, "director", &["resume", "--yes"]).await;
    assert!(ok, "{said}");
    assert!(!server_pause(&js, "nova").await.0);
    assert_eq!(fetch(&js, "nova", WAIT).await, ["held by the server"]);
    let (_, status) = mesh_as(&nats, &fixture, "director", &["status"]).await;
    assert!(status.contains("agent-nova: not paused") && status.contains("agent-kaan: not paused"), "{status}");
}

#[tokio::test]
async fn an_agents_own_kill_pauses_only_its_consumer_and_the_harder_entry_wins() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true), ("kaan", &gw, true)]);
    let js = nats.jetstream().await;
    for agent in ["nova", "kaan"] {
        provision_agent(&js, agent, listener_tuning(1, Duration::from_secs(30))).await.unwrap();
    }
    let switch = KillSwitch::open(&js).await.unwrap();
    let director = Actor::director("cli:t");
    switch.pull(&Scope::Agent(id("nova")), Mode::Hard, None, director, None).await.unwrap();
    assert_eq!(server_pause(&js, "nova").await, (true, Some(PAUSED_UNTIL_RESUMED)));
    assert!(!server_pause(&js, "kaan").await.0, "another agent's kill leaves kaan alone");
    send(&js, &fixture, "kaan", "still flowing").await;
    assert_eq!(fetch(&js, "kaan", WAIT).await, ["still flowing"]);

    // A mesh-wide soft pause pauses kaan until its deadline; nova stays paused until resumed.
    let soft = switch.pull(&Scope::Global, Mode::Soft, Some(Duration::from_secs(600)), director, None).await.unwrap();
    let until = server_pause(&js, "kaan").await;
    assert_eq!(until.1.map(|t| t.unix_timestamp()), soft.until.map(|t| t.unix_timestamp()));
    assert!(until.0);
    assert_eq!(server_pause(&js, "nova").await, (true, Some(PAUSED_UNTIL_RESUMED)));
    // Releasing nova's own entry leaves it under the global soft pause.
    switch.release(&Scope::Agent(id("nova")), director).await.unwrap();
    let nova = server_pause(&js, "nova").await;
    assert_eq!(nova.1.map(|t| t.unix_timestamp()), soft.until.map(|t| t.unix_timestamp()));
    switch.release(&Scope::Global, director).await.unwrap();
    assert!(!server_pause(&js, "nova").await.0 && !server_pause(&js, "kaan").await.0);
}

#[tokio::test]
async fn a_soft_kill_lifts_on_the_server_at_its_deadline_with_no_bot_and_no_listener() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    provision_agent(&js, "nova", listener_tuning(1, Duration::from_secs(30))).await.unwrap();
    let state = {
        // Pulled through a client that is then dropped: nothing of ours runs afterwards.
        let client = nats.jetstream().await;
        let switch = KillSwitch::open(&client).await.unwrap();
        switch
            .pull(&Scope::Global, Mode::Soft, Some(Duration::from_secs(3)), Actor::director("cli:t"), None)
            .await
            .unwrap()
    };
    let until = state.until.unwrap();
    assert!(server_pause(&js, "nova").await.0);
    send(&js, &fixture, "nova", "after the deadline").await;
    // One pull, open across the deadline: the server hands the message out only once it passed.
    assert_eq!(fetch(&js, "nova", WAIT).await, ["after the deadline"]);
    let now = OffsetDateTime::now_utc();
    assert!(now >= until, "handed out at {now}, before the soft pause's deadline {until}");
    assert!(!server_pause(&js, "nova").await.0);
}

#[tokio::test]
async fn consumers_created_during_a_kill_start_paused() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true), ("ada", &gw, true), ("kaan", &gw, true)]);
    let js = nats.jetstream().await;
    mesh_bot::provision::ensure_mesh(&js, mesh_protocol::layout::Replicas::Auto).await.unwrap();
    let switch = KillSwitch::open(&js).await.unwrap();
    switch.pull(&Scope::Global, Mode::Hard, None, Actor::director("cli:t"), None).await.unwrap();
    // The bot's provisioning (create or update) ...
    provision_agent(&js, "ada", listener_tuning(1, Duration::from_secs(30))).await.unwrap();
    assert_eq!(server_pause(&js, "ada").await, (true, Some(PAUSED_UNTIL_RESUMED)));
    // ... a sender creating its target's consumer ...
    send(&js, &fixture, "nova", "sent during the kill").await;
    assert_eq!(server_pause(&js, "nova").await, (true, Some(PAUSED_UNTIL_RESUMED)));
    assert_eq!(fetch(&js, "nova", Duration::from_secs(2)).await, Vec::<String>::new());
    // ... and `mesh agents add`'s provisioning.
    let registry = mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
    let kaan = registry.get(&id("kaan")).unwrap();
    mesh_bot::provision::after_change(&nats.url(), &Default::default(), mesh_protocol::layout::Replicas::Auto, &[kaan])
        .await
        .unwrap();
    assert_eq!(server_pause(&js, "kaan").await, (true, Some(PAUSED_UNTIL_RESUMED)));
    // Updating an existing consumer's tuning keeps its pause.
    provision_agent(&js, "ada", listener_tuning(4, Duration::from_secs(30))).await.unwrap();
    assert_eq!(server_pause(&js, "ada").await, (true, Some(PAUSED_UNTIL_RESUMED)));
    switch.release(&Scope::Global, Actor::director("cli:t")).await.unwrap();
    for agent in ["nova", "ada", "kaan"] {
        assert!(!server_pause(&js, agent).await.0, "{agent}");
    }
    assert_eq!(fetch(&js, "nova", WAIT).await, ["sent during the kill"]);
}

#[tokio::test]
async fn the_bots_provisioning_repairs_a_server_pause_that_was_lifted_behind_its_back() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    provision_agent(&js, "nova", listener_tuning(1, Duration::from_secs(30))).await.unwrap();
    let switch = KillSwitch::open(&js).await.unwrap();
    switch.pull(&Scope::Global, Mode::Hard, None, Actor::director("cli:t"), None).await.unwrap();
    // Someone with admin rights resumes the consumer by hand; the kill switch still says hard.
    js.get_stream("MESH_AGENTS").await.unwrap().resume_consumer("agent-nova").await.unwrap();
    assert!(!server_pause(&js, "nova").await.0);
    let stop = tokio_util::sync::CancellationToken::new();
    let config = mesh_bot::provision::FollowConfig {
        registry_path: fixture.registry.clone(),
        poll: Duration::from_millis(100),
        replicas: mesh_protocol::layout::Replicas::Auto,
        allowed_hosts: Default::default(),
        tuning: None,
    };
    let follow = tokio::spawn(mesh_bot::provision::follow(js.clone(), config, stop.clone().cancelled_owned()));
    let deadline = tokio::time::Instant::now() + WAIT;
    while !server_pause(&js, "nova").await.0 {
        assert!(tokio::time::Instant::now() < deadline, "the bot never paused nova again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server_pause(&js, "nova").await.1, Some(PAUSED_UNTIL_RESUMED));
    stop.cancel();
    follow.await.unwrap();
}

/// A running listener resumes at once: the server-side resume comes before
/// the entry the listener follows, so its first pull after the resume is not
/// one the server held while paused (nats-server leaves those unanswered
/// until they expire, 10 s for the listener's pulls).
#[tokio::test]
async fn a_running_listener_delivers_right_after_resume() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let (listener, control) = mesh_tests::ListenerHandle::spawn_with_control(
        fixture.listener_config(&nats, mesh_listener::config::Selection::All),
    )
    .await;
    let switch = KillSwitch::open(&js).await.unwrap();
    for round in 0..3 {
        switch.pull(&Scope::Global, Mode::Hard, None, Actor::director("cli:t"), None).await.unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        while !control.fleet.get(&id("nova")).is_some_and(|s| s.paused.load(std::sync::atomic::Ordering::Relaxed)) {
            assert!(tokio::time::Instant::now() < deadline, "nova never paused");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        send(&js, &fixture, "nova", &format!("round {round}")).await;
        let resumed = std::time::Instant::now();
        switch.release(&Scope::Global, Actor::director("cli:t")).await.unwrap();
        gw.wait_for(round + 1, WAIT).await;
        let took = resumed.elapsed();
        assert!(took < Duration::from_secs(5), "round {round}: delivered {took:?} after the resume");
    }
    listener.stop().await.unwrap();
}

/// Review of #18, item 7: a sync that finds no kill switch bucket (deleted,
/// or a not-found answered during a leader election) once read "no entries"
/// and resumed every consumer, hard kills included. It leaves them as they
/// are now.
#[tokio::test]
async fn a_sync_that_finds_no_bucket_leaves_the_consumers_paused() {
    let nats = TestNats::start().await;
    let js = nats.jetstream().await;
    provision_agent(&js, "nova", listener_tuning(1, Duration::from_secs(30))).await.unwrap();
    let switch = KillSwitch::open(&js).await.unwrap();
    switch.pull(&Scope::Global, Mode::Hard, None, Actor::director("cli:t"), None).await.unwrap();
    assert_eq!(server_pause(&js, "nova").await, (true, Some(PAUSED_UNTIL_RESUMED)));
    js.delete_key_value(mesh_protocol::killswitch::BUCKET).await.unwrap();

    let synced = mesh_runtime::server_pause::sync(&js, None).await.unwrap();
    assert_eq!(synced, mesh_runtime::server_pause::Synced::default());
    assert_eq!(server_pause(&js, "nova").await, (true, Some(PAUSED_UNTIL_RESUMED)), "still held by the server");
}

/// Review of #18, item 2: a consumer paused on the server with no kill switch
/// entry behind it (a crash between the two, a hand-made pause) is flagged by
/// `mesh status`, with what to do.
#[tokio::test]
async fn mesh_status_flags_a_consumer_paused_with_no_entry_in_force() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    provision_agent(&js, "nova", listener_tuning(1, Duration::from_secs(30))).await.unwrap();
    let stream = js.get_stream("MESH_AGENTS").await.unwrap();
    stream.pause_consumer("agent-nova", PAUSED_UNTIL_RESUMED).await.unwrap();

    let (_, status) = mesh_as(&nats, &fixture, "director", &["status"]).await;
    assert!(status.contains("agent-nova: paused until resumed"), "{status}");
    assert!(
        status.contains("mismatch: agent-nova is paused on the server but no kill switch entry is in force for it"),
        "{status}"
    );
    let (ok, said) = mesh_as(&nats, &fixture, "director", &["resume", "--agent", "nova", "--yes"]).await;
    assert!(ok, "{said}");
    let (_, status) = mesh_as(&nats, &fixture, "director", &["status"]).await;
    assert!(!status.contains("mismatch"), "{status}");
}

/// Review of #18, item 4: the bot's provisioning once applied the server-side
/// pause only after the registry, the streams and every agent consumer were
/// in place, so a broken registry disabled the repair. It runs on its own.
#[tokio::test]
async fn the_bots_provisioning_repairs_a_server_pause_even_with_a_broken_registry() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    provision_agent(&js, "nova", listener_tuning(1, Duration::from_secs(30))).await.unwrap();
    let switch = KillSwitch::open(&js).await.unwrap();
    switch.pull(&Scope::Global, Mode::Hard, None, Actor::director("cli:t"), None).await.unwrap();
    js.get_stream("MESH_AGENTS").await.unwrap().resume_consumer("agent-nova").await.unwrap();
    assert!(!server_pause(&js, "nova").await.0);
    std::fs::write(&fixture.registry, "{ not a registry").unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let config = mesh_bot::provision::FollowConfig {
        registry_path: fixture.registry.clone(),
        poll: Duration::from_millis(100),
        replicas: mesh_protocol::layout::Replicas::Auto,
        allowed_hosts: Default::default(),
        tuning: None,
    };
    let follow = tokio::spawn(mesh_bot::provision::follow(js.clone(), config, stop.clone().cancelled_owned()));
    let deadline = tokio::time::Instant::now() + WAIT;
    while !server_pause(&js, "nova").await.0 {
        assert!(tokio::time::Instant::now() < deadline, "the bot never paused nova again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server_pause(&js, "nova").await.1, Some(PAUSED_UNTIL_RESUMED));
    // And the bucket is watched: a hand-made resume of the entry reaches the server at once.
    let store = js.get_key_value(mesh_protocol::killswitch::BUCKET).await.unwrap();
    store.delete(Scope::Global.key()).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while server_pause(&js, "nova").await.0 {
        assert!(tokio::time::Instant::now() < deadline, "the bot never followed the bucket");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    follow.await.unwrap();
}

/// Review of #18, item 3: two writers at once (a global hard kill and an
/// agent's soft one, then both released) must leave each consumer's pause on
/// the server as the entries say, whichever set lands last.
#[tokio::test]
async fn two_writers_at_once_leave_the_server_pause_as_the_entries_say() {
    let nats = TestNats::start().await;
    let js = nats.jetstream().await;
    provision_agent(&js, "nova", listener_tuning(1, Duration::from_secs(30))).await.unwrap();
    let switch = KillSwitch::open(&js).await.unwrap();
    let director = Actor::director("cli:t");
    let nova = Scope::Agent(id("nova"));
    for round in 0..10 {
        let (global, own) = tokio::join!(
            switch.pull(&Scope::Global, Mode::Hard, None, director, None),
            switch.pull(&nova, Mode::Soft, Some(Duration::from_secs(600)), director, None),
        );
        global.unwrap();
        own.unwrap();
        assert_eq!(server_pause(&js, "nova").await, (true, Some(PAUSED_UNTIL_RESUMED)), "round {round}");
        let (global, own) = tokio::join!(switch.release(&Scope::Global, director), switch.release(&nova, director));
        global.unwrap();
        own.unwrap();
        assert!(!server_pause(&js, "nova").await.0, "round {round}");
    }
}
