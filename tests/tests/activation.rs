//! What a re-activated or re-used agent id receives (issue 20, item 11):
//! nothing sent before its (re)activation. `mesh agents remove` deletes the
//! agent's consumer and `mesh agents add` starts a new one, so neither the
//! broadcasts sent while it was away nor the previous agent's backlog reach it.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use mesh_protocol::Priority;
use mesh_tests::fixtures::{mesh_command, wait_until_settled};
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(20);

async fn mesh(nats: &TestNats, fixture: &Fixture, args: &[&str]) -> String {
    let out = mesh_command(&nats.url(), &fixture.registry).args(args).output().await.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "mesh {args:?}: {text}");
    text
}

#[tokio::test]
async fn a_re_added_agent_gets_neither_old_broadcasts_nor_the_previous_backlog() {
    let nats = TestNats::start().await;
    let (nova_gw, kaan_gw) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = Fixture::registry(&[("nova", &nova_gw, true), ("kaan", &kaan_gw, true)]);
    let js = nats.jetstream().await;
    let registry = || mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
    mesh_bot::provision::ensure_mesh(&js, mesh_protocol::layout::Replicas::Auto).await.unwrap();
    mesh_bot::provision::ensure_agents(&js, &registry(), None).await.unwrap();

    // The first nova never ran its listener: a backlog waits for it.
    mesh_bot::publish::send(&js, &registry(), "test", "nova", "backlog of the first nova", Priority::Normal)
        .await
        .unwrap();
    // Dropping it is asked for: without --drop-backlog the removal is refused (agents.rs).
    let removed = mesh(&nats, &fixture, &["agents", "remove", "nova", "--drop-backlog"]).await;
    mesh_bot::publish::broadcast(&js, &registry(), "test", "while nova was away", Priority::Normal).await.unwrap();

    // The id is used again.
    let token = fixture.secret_file("nova-hook", "nova-hook-token\n");
    let token_ref = format!("file:{}", token.display());
    mesh(&nats, &fixture, &["agents", "add", "nova", "--hooks-url", &nova_gw.hooks_url(), "--hooks-token", &token_ref])
        .await;
    let nova = ListenerHandle::one(&fixture, &nats, "nova");
    mesh_bot::publish::send(&js, &registry(), "test", "nova", "welcome back", Priority::Normal).await.unwrap();
    let got = nova_gw.wait_for(1, WAIT).await;
    wait_until_settled(&js, "nova", WAIT).await;
    let texts: Vec<String> = nova_gw.requests().iter().map(|r| r.text().to_owned()).collect();
    assert_eq!(texts, ["[mesh] Message from test: welcome back"], "only what was sent after the re-add");
    assert_eq!(got[0].authorization.as_deref(), Some("Bearer nova-hook-token"));
    assert!(
        removed.contains("agent-nova deleted (1 undelivered messages dropped)"),
        "the removal says what it dropped: {removed}"
    );
    nova.stop().await.unwrap();
}
