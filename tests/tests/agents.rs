//! Agent lifecycle through the `mesh` binary: `agents add|list|remove|rotate`
//! validate first and edit the registry atomically with a backup; a running
//! listener switches to a rotated token at once and never sends the old one again.
#![allow(clippy::unwrap_used)]

use std::process::Output;
use std::time::Duration;

use mesh_tests::fixtures::mesh_command;
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(20);

async fn mesh(fixture: &Fixture, args: &[&str]) -> Output {
    mesh_at("nats://127.0.0.1:1", fixture, args).await
}

async fn mesh_at(url: &str, fixture: &Fixture, args: &[&str]) -> Output {
    mesh_command(url, &fixture.registry).args(args).output().await.unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn registry_text(fixture: &Fixture) -> String {
    std::fs::read_to_string(&fixture.registry).unwrap()
}

#[tokio::test]
async fn add_list_remove_validate_and_keep_a_backup() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let secret = fixture.secret_file("kaan-hook", "kaan-secret-1\n");
    let token_ref = format!("file:{}", secret.display());
    let before = registry_text(&fixture);

    // Refusals leave the file untouched and never echo a token.
    for (args, want) in [
        (
            vec!["agents", "add", "kaan", "--hooks-url", "http://kaan:7002/hooks/wake", "--hooks-token", "s3cret-lit"],
            "must be a reference",
        ),
        (
            vec!["agents", "add", "nova", "--hooks-url", "http://kaan:7002/hooks/wake", "--hooks-token", &token_ref],
            "already registered",
        ),
        (
            vec!["agents", "add", "kaan", "--hooks-url", "ftp://kaan/hooks/wake", "--hooks-token", &token_ref],
            "scheme \"ftp\"",
        ),
        (
            vec![
                "agents",
                "add",
                "kaan",
                "--hooks-url",
                "http://kaan:7002/hooks/wake",
                "--hooks-token",
                "env:MESH_TOKEN_MESH_TEST_UNSET_X",
            ],
            "MESH_TEST_UNSET_X is not set",
        ),
        (vec!["agents", "remove", "nvoa"], "unknown agent \"nvoa\""),
    ] {
        let out = mesh_at(&nats.url(), &fixture, &args).await;
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(text(&out).contains(want), "{args:?}: {}", text(&out));
        assert!(!text(&out).contains("s3cret-lit") && !text(&out).contains("kaan-secret-1"));
        assert_eq!(registry_text(&fixture), before, "{args:?} changed the registry");
    }

    let add = ["agents", "add", "kaan", "--hooks-url", "http://kaan:7002/hooks/wake", "--hooks-token", &token_ref];
    // NATS not reachable: a consumer left over from an earlier kaan cannot be
    // deleted first, so nothing is written (its backlog would reach the new kaan).
    let out = mesh(&fixture, &add).await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("kaan not added"), "{}", text(&out));
    assert_eq!(registry_text(&fixture), before);
    let out = mesh_at(&nats.url(), &fixture, &add).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("consumers in place (agent-kaan)"), "{}", text(&out));
    let backup = fixture.dir().join("tokens.json.bak");
    assert_eq!(std::fs::read_to_string(&backup).unwrap(), before);

    let out = mesh_at(&nats.url(), &fixture, &["agents", "list", "--json"]).await;
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = &reply["data"];
    assert_eq!(rows[0]["id"], "kaan");
    assert_eq!(rows[0]["hooks_token"], token_ref.as_str());
    assert_eq!(rows[1]["id"], "nova");
    assert_eq!(rows[1]["hooks_token"], "literal(***)", "a literal token is never listed");

    let out = mesh_at(&nats.url(), &fixture, &["agents", "remove", "kaan", "--keep"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(registry_text(&fixture).contains("\"inactive\""));
    let out = mesh_at(&nats.url(), &fixture, &["agents", "remove", "kaan"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(!registry_text(&fixture).contains("kaan"));
    assert!(std::fs::read_to_string(&backup).unwrap().contains("kaan"), "backup holds the previous version");
}

/// Issue 20: an agent has its consumer from the moment it is registered, so a
/// message sent before its listener ever ran waits for it (listeners create nothing).
#[tokio::test]
async fn an_added_agent_has_its_consumer_at_once() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let out = mesh_command(&nats.url(), &fixture.registry)
        .args([
            "agents",
            "add",
            "kaan",
            "--hooks-url",
            &gw.hooks_url(),
            "--hooks-token",
            "env:MESH_TOKEN_KAAN_HOOK",
            "--no-check",
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("consumers in place (agent-kaan)"), "{}", text(&out));
    let js = async_nats::jetstream::new(nats.client().await);
    let info = js.get_stream("MESH_AGENTS").await.unwrap().consumer_info("agent-kaan").await.unwrap();
    assert_eq!(
        info.config.filter_subjects,
        ["agents.kaan.inbox", "agents.kaan.inbox.*", "agents.broadcast", "agents.broadcast.from.*"]
    );
    assert!(js.get_key_value("mesh_killswitch").await.is_ok(), "the kill switch bucket a listener waits for");
}

/// Issue 22: `agents add` checks `MESH_HOOKS_ALLOWED_HOSTS` like every
/// loader, so it never writes a registry that the listeners and the bot refuse.
#[tokio::test]
async fn add_refuses_a_host_outside_the_allow_list_and_writes_nothing() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let before = registry_text(&fixture);
    let add = |url: &str| {
        let mut command = mesh_command(&nats.url(), &fixture.registry);
        command
            .args(["agents", "add", "kaan", "--hooks-url", url, "--hooks-token", "env:MESH_TOKEN_KAAN_HOOK"])
            .args(["--no-check"])
            .env("MESH_HOOKS_ALLOWED_HOSTS", "127.0.0.1");
        command
    };
    let out = add("http://kaan-gateway:7002/hooks/wake").output().await.unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out)
            .contains("agent \"kaan\": field hooks_url: host \"kaan-gateway\" is not in MESH_HOOKS_ALLOWED_HOSTS"),
        "{}",
        text(&out)
    );
    assert_eq!(registry_text(&fixture), before, "a refused add wrote the registry");
    // A host in the list is added.
    let out = add(&gw.hooks_url()).output().await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(registry_text(&fixture).contains("kaan"));
}

#[tokio::test]
async fn a_rotated_token_is_used_at_once_and_the_old_one_no_more() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::from_json(&serde_json::json!({}));
    let old = fixture.secret_file("nova-hook-1", "old-token-1\n");
    let new = fixture.secret_file("nova-hook-2", "new-token-2\n");
    let json =
        serde_json::json!({"nova": {"hooks_token": format!("file:{}", old.display()), "hooks_url": gw.hooks_url()}});
    std::fs::write(&fixture.registry, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    let js = nats.jetstream().await;
    let registry = mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
    let send = |text: String| {
        let (js, registry) = (js.clone(), registry.clone());
        async move {
            mesh_bot::publish::send(&js, &registry, "test", "nova", &text, mesh_protocol::Priority::Normal)
                .await
                .unwrap();
        }
    };
    send("before".into()).await;
    let got = gw.wait_for(1, WAIT).await;
    assert_eq!(got[0].authorization.as_deref(), Some("Bearer old-token-1"));

    let out = mesh(&fixture, &["agents", "rotate", "nova", "--hooks-token", &format!("file:{}", new.display())]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("new-token-2"), "the token is never printed");

    // Within the registry poll the listener switches; from then on only the new token.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut n = 1;
    loop {
        send(format!("probe {n}")).await;
        n += 1;
        let got = gw.wait_for(n, WAIT).await;
        if got.last().unwrap().authorization.as_deref() == Some("Bearer new-token-2") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the listener never used the rotated token");
    }
    for i in 0..3 {
        send(format!("after {i}")).await;
    }
    let got = gw.wait_for(n + 3, WAIT).await;
    for r in &got[n..] {
        assert_eq!(r.authorization.as_deref(), Some("Bearer new-token-2"), "{}", r.text());
    }
    listener.stop().await.unwrap();
}

/// Review of issue 20: `agents remove` drops nothing not delivered unless
/// `--drop-backlog` says so, and says how much and where.
#[tokio::test]
async fn a_removal_that_would_drop_a_backlog_is_refused_without_drop_backlog() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let registry = mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
    for text in ["one", "two"] {
        mesh_bot::publish::send(&js, &registry, "test", "nova", text, mesh_protocol::Priority::Normal).await.unwrap();
    }
    let before = registry_text(&fixture);
    for args in [vec!["agents", "remove", "nova"], vec!["agents", "remove", "nova", "--keep"]] {
        let out = mesh_at(&nats.url(), &fixture, &args).await;
        assert!(!out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("holds 2 messages not delivered"), "{}", text(&out));
        assert!(text(&out).contains("--drop-backlog"), "{}", text(&out));
        assert_eq!(registry_text(&fixture), before, "the registry is left alone");
    }
    let stream = js.get_stream("MESH_AGENTS").await.unwrap();
    assert_eq!(stream.consumer_info("agent-nova").await.unwrap().num_pending, 2, "the backlog is kept");
    // An earlier dead letter of nova's, as a listener stores it.
    let record = mesh_protocol::dead_letter::DeadLetter {
        agent: "nova".parse().unwrap(),
        reason: "gateway answered HTTP 404; not retried".into(),
        status: Some(404),
        attempts: 1,
        subject: "agents.nova.inbox".into(),
        stream_seq: 1,
        message_id: uuid::Uuid::new_v4(),
        stored_at: time::OffsetDateTime::now_utc(),
    };
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in record.headers() {
        headers.insert(name, value.as_str());
    }
    js.publish_with_headers("mesh.dlq.nova", headers, "old".into()).await.unwrap().await.unwrap();

    let out = mesh_at(&nats.url(), &fixture, &["agents", "remove", "nova", "--drop-backlog"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("2 undelivered messages dropped"), "{}", text(&out));
    assert!(text(&out).contains("1 dead letters of nova stay"), "{}", text(&out));
    assert!(stream.consumer_info("agent-nova").await.is_err(), "the consumer is gone");
    assert!(!registry_text(&fixture).contains("nova"));
}

/// Review of issue 20: the bot deletes only empty consumers of removed agents
/// and never retires every agent in one pass (a `{}` written by a script).
#[tokio::test]
async fn the_bot_never_drops_a_backlog_nor_retires_every_agent_at_once() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture =
        Fixture::registry(&[("nova", &gw, true), ("kaan", &gw, true), ("rex", &gw, true), ("zed", &gw, true)]);
    let js = nats.jetstream().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let config = mesh_bot::provision::FollowConfig {
        registry_path: fixture.registry.clone(),
        poll: Duration::from_millis(50),
        replicas: mesh_protocol::layout::Replicas::Auto,
        allowed_hosts: Default::default(),
        tuning: None,
    };
    let follow = tokio::spawn(mesh_bot::provision::follow(js.clone(), config, stop.clone().cancelled_owned()));
    let exists = |id: &'static str| {
        let js = js.clone();
        async move { js.get_stream("MESH_AGENTS").await.unwrap().consumer_info(format!("agent-{id}")).await.is_ok() }
    };
    let wait = |id: &'static str, want: bool| async move {
        let deadline = tokio::time::Instant::now() + WAIT;
        while exists(id).await != want {
            assert!(tokio::time::Instant::now() < deadline, "agent-{id} exists: {} within {WAIT:?}", !want);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    for id in ["nova", "kaan", "rex", "zed"] {
        wait(id, true).await;
    }
    let registry = mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
    mesh_bot::publish::send(&js, &registry, "test", "nova", "pending", mesh_protocol::Priority::Normal).await.unwrap();
    let entry = |id: &str| serde_json::json!({"hooks_token": format!("{id}-token"), "hooks_url": gw.hooks_url()});
    let write = |agents: serde_json::Value| std::fs::write(&fixture.registry, agents.to_string()).unwrap();

    // nova (one message pending) and rex (nothing) removed by hand in one edit.
    write(serde_json::json!({"kaan": entry("kaan"), "zed": entry("zed")}));
    wait("rex", false).await;
    let info = js.get_stream("MESH_AGENTS").await.unwrap().consumer_info("agent-nova").await.unwrap().clone();
    assert_eq!(info.num_pending, 1, "nova's consumer and its backlog are kept");

    // Every remaining agent gone at once, then a new one: nobody is retired.
    write(serde_json::json!({}));
    write(serde_json::json!({"amy": entry("amy")}));
    wait("amy", true).await;
    for id in ["kaan", "zed", "nova"] {
        assert!(exists(id).await, "agent-{id} kept");
    }
    stop.cancel();
    follow.await.unwrap();
}

/// Issue 21.6: several `mesh agents add` processes at once each hold the
/// registry's lock for their read-modify-write: every agent is in the file.
#[tokio::test]
async fn concurrent_agents_add_processes_lose_no_agent() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let secret = fixture.secret_file("shared-hook", "hook-secret\n");
    let token_ref = format!("file:{}", secret.display());
    let names: Vec<String> = (0..6).map(|i| format!("agent{i}")).collect();
    let adds = names.iter().map(|name| {
        let url = format!("http://{name}:7002/hooks/wake");
        let args: Vec<String> = ["agents", "add", name, "--hooks-url", &url, "--hooks-token", &token_ref]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        mesh_command(&nats.url(), &fixture.registry).args(args).output()
    });
    for out in futures::future::join_all(adds).await {
        let out = out.unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    let registry: serde_json::Value = serde_json::from_str(&registry_text(&fixture)).unwrap();
    for name in names.iter().map(String::as_str).chain(["nova"]) {
        assert!(registry.get(name).is_some(), "{name} was lost: {registry}");
    }
}
