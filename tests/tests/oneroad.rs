//! One road for every command: the terminal's commands go through the engine
//! like chat commands do. With the terminal given the viewer role, commands
//! that need more are refused, publish nothing and are audited as denied;
//! with no permissions file (the terminal is director) they run and are
//! audited with their message ids; a broken permissions file stops every
//! command that needs a role, and `mesh bot`, naming the file and the fault.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use mesh_tests::fixtures::{mesh_command, wait_until_settled};
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

async fn mesh(nats_url: &str, registry: &Path, permissions: Option<&Path>, args: &[&str]) -> Output {
    let mut command = mesh_command(nats_url, registry);
    command.args(args).env_remove("MESH_PERMISSIONS");
    if let Some(path) = permissions {
        command.env("MESH_PERMISSIONS", path);
    }
    command.output().await.unwrap()
}

fn said(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The newest audit records, newest first, from `mesh audit --json`.
async fn audit(nats: &TestNats, registry: &Path) -> Vec<Value> {
    let out = mesh(&nats.url(), registry, None, &["audit", "50", "--json"]).await;
    assert!(out.status.success(), "{}", said(&out));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    reply["data"].as_array().unwrap().clone()
}

/// The newest record of a command whose audited line starts with `line`.
fn record<'a>(records: &'a [Value], line: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["line"].as_str().unwrap().starts_with(line))
        .unwrap_or_else(|| panic!("no audit record of {line:?} in {records:#?}"))
}

async fn messages_in(js: &async_nats::jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream).await.unwrap().info().await.unwrap().state.messages
}

#[tokio::test]
async fn a_viewer_terminal_is_refused_what_needs_more_and_every_refusal_is_audited() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let permissions = fixture.dir().join("permissions.json");
    std::fs::write(&permissions, r#"{"terminal": "viewer"}"#).unwrap();
    let backup = fixture.dir().join("no-backup-here");
    let cases: [(&[&str], &str, &str); 5] = [
        (&["send", "nova", "hello"], "send nova hello", "\"send\" needs the operator role; you have viewer"),
        (&["broadcast", "hello", "all"], "broadcast", "\"broadcast\" needs the operator role; you have viewer"),
        (&["dlq", "replay", "nova"], "dlq replay nova", "\"dlq replay\" needs the admin role; you have viewer"),
        (
            &["maintenance", "1s", "--lead", "1s", "db", "upgrade"],
            "maintenance 1s",
            "\"maintenance\" needs the admin role; you have viewer",
        ),
        (&["restore", backup.to_str().unwrap()], "restore", "\"restore\" needs the director role; you have viewer"),
    ];
    let started = time::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    for (args, _, refusal) in &cases {
        let out = mesh(&nats.url(), &fixture.registry, Some(&permissions), args).await;
        assert!(!out.status.success(), "mesh {args:?} ran as a viewer: {}", said(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(refusal), "mesh {args:?}: {stderr}");
    }
    let js = nats.jetstream().await;
    assert_eq!(messages_in(&js, "MESH_AGENTS").await, 0, "a refused command published something");
    assert!(gw.requests().is_empty());

    let records = audit(&nats, &fixture.registry).await;
    for (args, line, refusal) in &cases {
        let r = record(&records, line);
        assert_eq!(r["decision"], "denied", "mesh {args:?}: {r}");
        assert_eq!(r["who"], "terminal", "{r}");
        assert_eq!(r["platform"], "cli", "{r}");
        assert!(r["outcome"].as_str().unwrap().contains(refusal), "{r}");
        let at = time::OffsetDateTime::parse(r["at"].as_str().unwrap(), &time::format_description::well_known::Rfc3339)
            .unwrap();
        assert!(at >= started, "{r}");
    }
}

#[tokio::test]
async fn a_director_terminal_runs_them_and_each_is_audited_with_its_message_ids() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    let js = nats.jetstream().await;
    let (url, registry) = (nats.url(), fixture.registry.clone());
    let run = async |args: &[&str]| {
        let out = mesh(&url, &registry, None, args).await;
        assert!(out.status.success(), "mesh {args:?}: {}", said(&out));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };

    // A refused delivery becomes the dead letter `dlq replay` takes back.
    gw.script([404]);
    let sent = run(&["send", "nova", "hello", "--json"]).await;
    let sent_id = sent["data"]["id"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + WAIT;
    while messages_in(&js, "MESH_DLQ").await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let broadcast = run(&["broadcast", "--json", "hello", "all"]).await;
    let broadcast_id = broadcast["data"]["id"].as_str().unwrap().to_owned();
    let replayed = run(&["dlq", "replay", "nova", "--json"]).await;
    let replay_id = replayed["data"]["replayed"][0][1].as_str().unwrap().to_owned();
    gw.wait_for(3, WAIT).await;
    wait_until_settled(&js, "nova", WAIT).await;
    let maintenance = run(&["maintenance", "1s", "--lead", "1s", "--json", "db", "upgrade"]).await;
    let announcements: Vec<String> =
        maintenance["data"]["message_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().into()).collect();
    assert_eq!(announcements.len(), 2, "{maintenance}");
    let dir = fixture.dir().join("backup");
    run(&["backup", "--json", dir.to_str().unwrap()]).await;
    listener.stop().await.unwrap();

    let records = audit(&nats, &fixture.registry).await;
    let ids = |r: &Value| -> Vec<String> {
        r["message_ids"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    for (line, want) in [
        ("send nova hello", vec![sent_id]),
        ("broadcast", vec![broadcast_id]),
        ("dlq replay nova", vec![replay_id]),
        ("maintenance 1s --lead 1s -- db upgrade", announcements),
        ("backup", vec![]),
    ] {
        let r = record(&records, line);
        assert_eq!((r["decision"].as_str(), r["who"].as_str()), (Some("allowed"), Some("terminal")), "{r}");
        assert_eq!(ids(r), want, "{r}");
    }

    // Restore, into a fresh server, is a director's command too.
    let fresh = TestNats::start().await;
    let restored = fixture.dir().join("restored").join("tokens.json");
    let out = mesh(&fresh.url(), &restored, None, &["restore", dir.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", said(&out));
    let r = record(&audit(&fresh, &restored).await, "restore").clone();
    assert_eq!(r["decision"], "allowed", "{r}");
}

#[tokio::test]
async fn a_broken_permissions_file_stops_every_command_that_needs_a_role_and_the_bot() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let faults = [
        ("not-json.json", "{\"terminal\": \"viewer\"", "EOF while parsing"),
        ("unknown-role.json", r#"{"terminal": "boss"}"#, "unknown variant `boss`"),
        ("unknown-key.json", r#"{"terminals": "viewer"}"#, "unknown field `terminals`"),
    ];
    for (name, text, fault) in faults {
        let path = fixture.dir().join(name);
        std::fs::write(&path, text).unwrap();
        let port = mesh_bot::local_nats::free_port().unwrap().to_string();
        let addr = format!("127.0.0.1:{port}");
        let commands: [&[&str]; 5] =
            [&["send", "nova", "hi"], &["status"], &["audit"], &["agents", "list"], &["bot", "--addr", &addr]];
        for args in commands {
            let out = tokio::time::timeout(WAIT, mesh(&nats.url(), &fixture.registry, Some(&path), args))
                .await
                .unwrap_or_else(|_| panic!("mesh {args:?} kept running with {name}"));
            assert!(!out.status.success(), "mesh {args:?} ran with {name}: {}", said(&out));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
            assert!(stderr.contains(path.to_str().unwrap()) && stderr.contains(fault), "mesh {args:?}: {stderr}");
        }
    }
    let published = js.get_stream("MESH_AGENTS").await.map(|_| ()).is_ok();
    if published {
        assert_eq!(messages_in(&js, "MESH_AGENTS").await, 0);
    }
    assert!(gw.requests().is_empty());
}

#[tokio::test]
async fn completions_come_from_the_command_definitions() {
    for (shell, marker) in [("bash", "_mesh()"), ("zsh", "#compdef mesh"), ("fish", "complete -c mesh")] {
        let out = mesh("nats://127.0.0.1:1", Path::new("none.json"), None, &["completions", shell]).await;
        assert!(out.status.success(), "{shell}: {}", said(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        for subcommand in ["maintenance", "restore", "dlq", "completions"] {
            assert!(script.contains(subcommand), "{shell} lacks {subcommand}");
        }
    }
}

#[tokio::test]
async fn errors_before_the_engine_are_the_json_error_object_under_json() {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("tokens.json");
    let broken = dir.path().join("permissions.json");
    std::fs::write(&broken, "{not json").unwrap();
    // Nothing listens on port 1: NATS is unreachable at once.
    let unreachable = "nats://127.0.0.1:1";
    let cases: [(&[&str], Option<&Path>, &str); 5] = [
        (&["send", "--json"], None, "the following required arguments were not provided"),
        (&["--json", "send", "nova", "hi", "--priority", "loud"], None, "invalid value 'loud'"),
        (&["send", "Nova!", "hi", "--json"], None, "contains 'N' (U+004E)"),
        (&["status", "--json"], Some(&broken), "permissions.json"),
        (&["ping", "--json"], None, "cannot reach NATS at nats://127.0.0.1:1"),
    ];
    for (args, permissions, says) in cases {
        let out = mesh(unreachable, &registry, permissions, args).await;
        assert!(!out.status.success(), "mesh {args:?} must fail: {}", said(&out));
        let reply: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("mesh {args:?}: not one JSON object ({e}): {}", said(&out)));
        assert_eq!(reply["tone"], "error", "mesh {args:?}: {reply}");
        assert!(reply.to_string().contains(says), "mesh {args:?} should say {says:?}: {reply}");
        assert!(out.stderr.is_empty(), "mesh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Without --json the same errors stay one plain line on stderr; text after `--` is no option.
    let out = mesh(unreachable, &registry, None, &["send", "Nova!", "hi"]).await;
    assert!(out.stdout.is_empty() && String::from_utf8_lossy(&out.stderr).starts_with("error: "), "{}", said(&out));
    let out = mesh(unreachable, &registry, None, &["send", "Nova!", "--", "--json"]).await;
    assert!(out.stdout.is_empty() && String::from_utf8_lossy(&out.stderr).starts_with("error: "), "{}", said(&out));
}

/// Issue 21.5: the runbook runs `mesh status` when NATS is down; it then
/// reports the containers and the registry and says NATS is unreachable
/// (exit status 1), instead of failing with nothing but the error.
#[tokio::test]
async fn status_degrades_when_nats_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("tokens.json");
    std::fs::write(
        &registry,
        r#"{"nova": {"hooks_token": "env:MESH_TOKEN_T", "hooks_url": "http://nova:7002/hooks/wake"},
            "kaan": {"hooks_token": "env:MESH_TOKEN_T", "hooks_url": "http://kaan:7002/hooks/wake", "status": "inactive"}}"#,
    )
    .unwrap();
    let mut command = mesh_command("nats://127.0.0.1:1", &registry);
    command.args(["status"]).env_remove("MESH_PERMISSIONS").env("MESH_COMPOSE_PROJECT", "meshtest-none-here");
    let out = command.output().await.unwrap();
    let text = said(&out);
    assert!(!out.status.success(), "NATS down is reported as a failure: {text}");
    assert!(text.contains("NATS unreachable: cannot reach NATS at nats://127.0.0.1:1"), "{text}");
    assert!(text.contains("agents: 2 registered, 1 active (kaan, nova)"), "{text}");
    assert!(text.contains("containers"), "{text}");
    // The same under --json: one object, a warning, with the sections.
    let out = mesh("nats://127.0.0.1:1", &registry, None, &["status", "--json"]).await;
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", said(&out)));
    assert_eq!(reply["tone"], "warn", "{reply}");
    assert!(reply.to_string().contains("NATS unreachable"), "{reply}");
}
