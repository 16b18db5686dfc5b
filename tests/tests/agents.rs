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
    mesh_command("nats://127.0.0.1:1", &fixture.registry).args(args).output().await.unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn registry_text(fixture: &Fixture) -> String {
    std::fs::read_to_string(&fixture.registry).unwrap()
}

#[tokio::test]
async fn add_list_remove_validate_and_keep_a_backup() {
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
        let out = mesh(&fixture, &args).await;
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(text(&out).contains(want), "{args:?}: {}", text(&out));
        assert!(!text(&out).contains("s3cret-lit") && !text(&out).contains("kaan-secret-1"));
        assert_eq!(registry_text(&fixture), before, "{args:?} changed the registry");
    }

    let out = mesh(
        &fixture,
        &["agents", "add", "kaan", "--hooks-url", "http://kaan:7002/hooks/wake", "--hooks-token", &token_ref],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    // NATS is not reachable here: the registry is written all the same, and it says who creates the consumer.
    assert!(text(&out).contains("warning: consumer agent-kaan not created yet"), "{}", text(&out));
    assert!(text(&out).contains("the bot (`mesh bot`) creates it when it runs"), "{}", text(&out));
    let backup = fixture.dir().join("tokens.json.bak");
    assert_eq!(std::fs::read_to_string(&backup).unwrap(), before);

    let out = mesh(&fixture, &["agents", "list", "--json"]).await;
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = &reply["data"];
    assert_eq!(rows[0]["id"], "kaan");
    assert_eq!(rows[0]["hooks_token"], token_ref.as_str());
    assert_eq!(rows[1]["id"], "nova");
    assert_eq!(rows[1]["hooks_token"], "literal(***)", "a literal token is never listed");

    let out = mesh(&fixture, &["agents", "remove", "kaan", "--keep"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(registry_text(&fixture).contains("\"inactive\""));
    let out = mesh(&fixture, &["agents", "remove", "kaan"]).await;
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
    assert_eq!(info.config.filter_subjects, ["agents.kaan.inbox", "agents.broadcast"]);
    assert!(js.get_key_value("mesh_killswitch").await.is_ok(), "the kill switch bucket a listener waits for");
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
