//! `mesh backup` and `mesh restore` on real nats-servers: what was pending for
//! an agent before the backup is delivered after a restore into a fresh
//! server, what was acked is not delivered again, and the kill switch and the
//! registry come back.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use mesh_protocol::killswitch::{BUCKET, KillState, Mode};
use mesh_tests::fixtures::{mesh_command, wait_until_settled};
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(20);

async fn mesh(nats: &TestNats, registry: &std::path::Path, args: &[&str]) -> String {
    let out = mesh_command(&nats.url(), registry).args(args).output().await.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "mesh {args:?}: {text}");
    text
}

#[tokio::test]
async fn pending_messages_kill_switch_and_registry_survive_a_round_trip() {
    let (nova_gw, kaan_gw) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = Fixture::registry(&[("nova", &nova_gw, true), ("kaan", &kaan_gw, true), ("zed", &kaan_gw, true)]);
    let registry = mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
    let before = std::fs::read_to_string(&fixture.registry).unwrap();

    // Server A: kaan's listener takes its message and a broadcast; nova has no listener.
    let a = TestNats::start().await;
    let js = a.jetstream().await;
    let kaan = ListenerHandle::one(&fixture, &a, "kaan");
    let send = |to: &'static str, text: &'static str| {
        let (js, registry) = (js.clone(), registry.clone());
        async move {
            let p = mesh_protocol::Priority::Normal;
            if to == "*" {
                mesh_bot::publish::broadcast(&js, &registry, "test", text, p).await.unwrap();
            } else {
                mesh_bot::publish::send(&js, &registry, "test", to, text, p).await.unwrap();
            }
        }
    };
    send("kaan", "kaan one").await;
    send("nova", "nova one").await;
    send("*", "all hands").await;
    send("nova", "nova two").await;
    kaan_gw.wait_for(2, WAIT).await;
    wait_until_settled(&js, "kaan", WAIT).await;
    kaan.stop().await.unwrap();
    let hard = KillState {
        mode: Mode::Hard,
        until: None,
        by: "test".into(),
        reason: Some("held".into()),
        at: time::OffsetDateTime::now_utc(),
    };
    let kv = mesh_listener::killswitch::open(&js, mesh_protocol::layout::Replicas::Auto).await.unwrap();
    kv.put("agent.zed", hard.encode().into()).await.unwrap();

    let backup_dir = tempfile::tempdir().unwrap();
    let dir = backup_dir.path().join("b1");
    let dir_s = dir.to_str().unwrap();
    let printed = mesh(&a, &fixture.registry, &["backup", dir_s]).await;
    assert!(!printed.contains("kaan-hook-token"), "{printed}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    // A second backup into the same directory is refused.
    let out = mesh_command(&a.url(), &fixture.registry).args(["backup", dir_s]).output().await.unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not empty"));
    drop(a);

    // A server where a listener already created its consumer: refused, nothing written.
    let c = TestNats::start().await;
    let js_c = c.jetstream().await;
    mesh_listener::nats::ensure_consumer(&js_c, &"nova".parse().unwrap(), Default::default()).await.unwrap();
    let out = mesh_command(&c.url(), &fixture.registry).args(["restore", dir_s]).output().await.unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("restore before starting the listeners"), "{said}");
    assert_eq!(js_c.get_stream("MESH_AGENTS").await.unwrap().info().await.unwrap().state.messages, 0);
    drop(c);

    // Server B, fresh; the registry file is gone too.
    let b = TestNats::start().await;
    let restored_registry = fixture.dir().join("restored").join("tokens.json");
    // Every command is audited, so a look at the fresh server first leaves a
    // record in MESH_AUDIT: that must not make the server "not fresh".
    let looked = mesh_command(&b.url(), &fixture.registry).args(["status"]).output().await.unwrap();
    assert!(looked.status.success(), "{}", String::from_utf8_lossy(&looked.stderr));
    let audited = b.jetstream().await.get_stream("MESH_AUDIT").await.unwrap().info().await.unwrap().state.messages;
    assert!(audited > 0, "mesh status left an audit record");
    // Watch the consumer creations of the restore (a plain subscriber sees the API requests).
    let watcher = b.client().await;
    let mut creations = watcher.subscribe("$JS.API.CONSUMER.*.MESH_AGENTS.>").await.unwrap();
    watcher.flush().await.unwrap();
    let printed = mesh(&b, &restored_registry, &["restore", dir_s, "--json"]).await;
    // zed's hard kill came back before its consumer: created paused, never unpaused for a moment.
    let zed_created = loop {
        let request = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut creations)).await.unwrap().unwrap();
        if request.subject.as_str().ends_with("agent-zed") {
            break String::from_utf8_lossy(&request.payload).into_owned();
        }
    };
    assert!(zed_created.contains("\"pause_until\":\"2999-01-01T00:00:00Z\""), "{zed_created}");
    let reply: serde_json::Value = serde_json::from_str(printed.trim()).unwrap();
    let report = &reply["data"];
    assert_eq!(report["streams"]["MESH_AGENTS"], 4, "{report}");
    assert_eq!(report["consumers"]["nova"], 3, "nova had 3 pending: {report}");
    assert_eq!(report["consumers"]["kaan"], 0, "kaan had acked everything: {report}");
    assert_eq!(std::fs::read_to_string(&restored_registry).unwrap(), before);
    let js_b = b.jetstream().await;
    let kv_b = js_b.get_key_value(BUCKET).await.unwrap();
    let zed = KillState::decode(&kv_b.get("agent.zed").await.unwrap().unwrap()).unwrap();
    assert_eq!((zed.mode, zed.reason.as_deref()), (Mode::Hard, Some("held")));

    // Run again, the restore finds everything of this backup in place: nothing written twice.
    let again = mesh(&b, &restored_registry, &["restore", dir_s, "--json"]).await;
    let again: serde_json::Value = serde_json::from_str(again.trim()).unwrap();
    assert_eq!(again["data"]["resumed"]["MESH_AGENTS"], 4, "{again}");
    assert_eq!(js_b.get_stream("MESH_AGENTS").await.unwrap().info().await.unwrap().state.messages, 4);

    // Listeners on B: nova gets exactly its three pending messages, in order; kaan nothing old.
    let restored = Fixture::from_json(&serde_json::from_str(&before).unwrap());
    let nova = ListenerHandle::one(&restored, &b, "nova");
    let kaan = ListenerHandle::one(&restored, &b, "kaan");
    let got = nova_gw.wait_for(3, WAIT).await;
    let texts: Vec<&str> = got.iter().map(|r| r.text()).collect();
    assert!(
        texts[0].contains("nova one") && texts[1].contains("all hands") && texts[2].contains("nova two"),
        "{texts:?}"
    );
    let registry_b = mesh_listener::registry_file::load(&restored.registry, &Default::default()).unwrap();
    mesh_bot::publish::send(&js_b, &registry_b, "test", "kaan", "kaan fresh", mesh_protocol::Priority::Normal)
        .await
        .unwrap();
    let got = kaan_gw.wait_for(3, WAIT).await;
    assert!(got[2].text().contains("kaan fresh"), "kaan got an old message again: {:?}", got[2].text());
    // A restore into a server that holds other messages is refused.
    let out = mesh_command(&b.url(), &restored_registry).args(["restore", dir_s]).output().await.unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("fresh server"));
    wait_until_settled(&js_b, "nova", WAIT).await;
    assert_eq!(nova_gw.requests().len(), 3, "nova got a duplicate");
    nova.stop().await.unwrap();
    kaan.stop().await.unwrap();
}

/// Issue 21.5: a restore writes the kill switch before anything else, and one
/// that failed part way (here a damaged line in a stream file) resumes when
/// run again: nothing written twice, the consumers at the right place.
#[tokio::test]
async fn a_restore_writes_the_kill_switch_first_and_resumes_after_a_failure() {
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let registry = mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
    let a = TestNats::start().await;
    let js = a.jetstream().await;
    mesh_listener::nats::ensure_consumer(&js, &"nova".parse().unwrap(), Default::default()).await.unwrap();
    for text in ["one", "two", "three"] {
        mesh_bot::publish::send(&js, &registry, "test", "nova", text, mesh_protocol::Priority::Normal).await.unwrap();
    }
    let hard = KillState {
        mode: Mode::Hard,
        until: None,
        by: "test".into(),
        reason: None,
        at: time::OffsetDateTime::now_utc(),
    };
    let kv = mesh_listener::killswitch::open(&js, mesh_protocol::layout::Replicas::Auto).await.unwrap();
    kv.put("agent.nova", hard.encode().into()).await.unwrap();
    let backup_dir = tempfile::tempdir().unwrap();
    let dir = backup_dir.path().join("b");
    let dir_s = dir.to_str().unwrap();
    mesh(&a, &fixture.registry, &["backup", dir_s]).await;
    drop(a);

    // The second message's line is damaged: the restore stops there.
    let file = dir.join("streams/MESH_AGENTS.jsonl");
    let good = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = good.lines().collect();
    assert_eq!(lines.len(), 3);
    std::fs::write(&file, format!("{}\n{{damaged\n{}\n", lines[0], lines[2])).unwrap();
    let b = TestNats::start().await;
    let js_b = b.jetstream().await;
    let restored_registry = fixture.dir().join("restored.json");
    let out = mesh_command(&b.url(), &restored_registry).args(["restore", dir_s]).output().await.unwrap();
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let kv_b = js_b.get_key_value(BUCKET).await.expect("the kill switch is written before the messages");
    let nova = KillState::decode(&kv_b.get("agent.nova").await.unwrap().unwrap()).unwrap();
    assert_eq!(nova.mode, Mode::Hard);
    assert_eq!(js_b.get_stream("MESH_AGENTS").await.unwrap().info().await.unwrap().state.messages, 1);

    // Repaired, the same restore resumes after what the failed run wrote.
    std::fs::write(&file, &good).unwrap();
    let printed = mesh(&b, &restored_registry, &["restore", dir_s, "--json"]).await;
    let reply: serde_json::Value = serde_json::from_str(printed.trim()).unwrap();
    assert_eq!(reply["data"]["resumed"]["MESH_AGENTS"], 1, "{reply}");
    assert_eq!(reply["data"]["consumers"]["nova"], 3, "{reply}");
    assert_eq!(js_b.get_stream("MESH_AGENTS").await.unwrap().info().await.unwrap().state.messages, 3);
}
