//! End-to-end tests of the foundation: a message travels from the `mesh`
//! command line through a real nats-server to a recording gateway.

use std::process::Output;
use std::time::{Duration, Instant};

use mesh_tests::fixtures::{mesh_command, wait_until_settled};
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(15);

async fn mesh(nats_url: &str, fixture: &Fixture, args: &[&str]) -> Output {
    mesh_command(nats_url, &fixture.registry)
        .args(args)
        .env("MESH_FROM", "cli:tester")
        .output()
        .await
        .expect("running mesh")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn stream_messages(nats: &TestNats) -> u64 {
    let js = nats.jetstream().await;
    js.get_stream("MESH_AGENTS").await.expect("stream").info().await.expect("info").state.messages
}

#[tokio::test]
async fn send_reaches_the_gateway_exactly_once_with_token_and_text() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let listener = ListenerHandle::one(&fixture, &nats, "nova");

    let text = "hello \"nova\" — שלום <!channel> 👋";
    let out = mesh(&nats.url(), &fixture, &["send", "nova", text]).await;
    assert!(out.status.success(), "mesh send failed: {}", stderr(&out));
    let printed = stdout(&out);
    let id = printed.split("message id ").nth(1).and_then(|r| r.split_whitespace().next()).expect("an id").to_owned();
    uuid::Uuid::parse_str(&id).expect("mesh send prints the message id");

    let got = gw.wait_for(1, WAIT).await;
    wait_until_settled(&nats.jetstream().await, "nova", WAIT).await;
    let got_after_ack = gw.requests();
    assert_eq!(got_after_ack.len(), 1, "delivered more than once: {got_after_ack:?}");
    let req = &got[0];
    assert_eq!(req.path, "/hooks/wake");
    assert_eq!(req.authorization.as_deref(), Some("Bearer nova-hook-token"));
    assert_eq!(req.idempotency_key.as_deref(), Some(format!("nova:{id}").as_str()));
    assert_eq!(req.text(), format!("[mesh] Message from cli:tester: {text}"));
    assert_eq!(req.body["mode"], "next-heartbeat");
    listener.stop().await.expect("listener stops cleanly");
}

#[tokio::test]
async fn broadcast_reaches_every_active_agent_once_and_no_inactive_one() {
    let nats = TestNats::start().await;
    let (a, b, c) = (RecordingGateway::start().await, RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = Fixture::registry(&[("nova", &a, true), ("kaan", &b, true), ("old", &c, false)]);
    let listener = ListenerHandle::spawn(fixture.listener_config(&nats, mesh_listener::config::Selection::All));

    let out = mesh(&nats.url(), &fixture, &["broadcast", "--priority", "high", "maintenance in 5 minutes"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("broadcast to 2 active agents"), "{}", stdout(&out));

    let js = nats.jetstream().await;
    for (agent, gw) in [("nova", &a), ("kaan", &b)] {
        let got = gw.wait_for(1, WAIT).await;
        wait_until_settled(&js, agent, WAIT).await;
        assert_eq!(gw.requests().len(), 1, "{agent} got {:?}", gw.requests());
        assert_eq!(got[0].text(), "[mesh] Broadcast from cli:tester: maintenance in 5 minutes");
        assert_eq!(got[0].body["mode"], "now");
        assert_eq!(got[0].authorization.as_deref(), Some(format!("Bearer {agent}-hook-token").as_str()));
    }
    listener.stop().await.expect("listener stops cleanly");
    assert!(c.requests().is_empty(), "inactive agent got {:?}", c.requests());
    let stream = js.get_stream("MESH_AGENTS").await.expect("stream");
    assert!(stream.consumer_info("agent-old").await.is_err(), "no consumer is made for an inactive agent");
}

#[tokio::test]
async fn a_listener_started_after_the_send_still_delivers() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);

    let out = mesh(&nats.url(), &fixture, &["send", "nova", "sent while nobody listened"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(gw.requests().is_empty());

    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    let got = gw.wait_for(1, WAIT).await;
    assert_eq!(got[0].text(), "[mesh] Message from cli:tester: sent while nobody listened");
    wait_until_settled(&nats.jetstream().await, "nova", WAIT).await;
    assert_eq!(gw.requests().len(), 1);
    listener.stop().await.expect("listener stops cleanly");
}

#[tokio::test]
async fn a_failing_gateway_gets_no_ack_until_it_recovers() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    gw.script([500, 500, 503]);
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let listener = ListenerHandle::one(&fixture, &nats, "nova");

    let out = mesh(&nats.url(), &fixture, &["send", "nova", "keep trying"]).await;
    assert!(out.status.success(), "{}", stderr(&out));

    // Three failures, then the gateway recovers and the fourth attempt lands.
    let got = gw.wait_for(4, WAIT).await;
    let js = nats.jetstream().await;
    wait_until_settled(&js, "nova", WAIT).await;
    let got_after = gw.requests();
    assert_eq!(got_after.len(), 4, "exactly three failed attempts and one success: {got_after:?}");
    assert!(got.iter().all(|r| r.text() == "[mesh] Message from cli:tester: keep trying"));
    let keys: std::collections::BTreeSet<_> = got.iter().map(|r| r.idempotency_key.clone()).collect();
    assert_eq!(keys.len(), 1, "every attempt carries the same Idempotency-Key");
    let dlq = js.get_stream("MESH_DLQ").await.expect("dlq").info().await.expect("info").state.messages;
    assert_eq!(dlq, 0, "a recovered message is not dead-lettered");
    listener.stop().await.expect("listener stops cleanly");
}

#[tokio::test]
async fn bad_inputs_fail_clearly_and_publish_nothing() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true), ("kaan", &gw, false)]);
    let url = nats.url();
    let big = "x".repeat(mesh_protocol::envelope::MAX_TEXT_BYTES + 1);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["send", "nvoa", "hi"], "unknown agent \"nvoa\"; did you mean \"nova\"? (known: kaan, nova)"),
        (vec!["send", "agents.*", "hi"], "contains '.' (a NATS subject separator)"),
        (vec!["send", ">", "hi"], "'>' (a NATS wildcard)"),
        (vec!["send", "Nova", "hi"], "use \"nova\""),
        (vec!["send", "kaan", "hi"], "agent \"kaan\" is inactive"),
        (vec!["broadcast", "--priority", "loud", "hi"], "unknown priority \"loud\""),
    ];
    for (args, expected) in cases {
        let out = mesh(&url, &fixture, &args).await;
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error: ") && first.contains(expected),
            "{:?}: {err:?} lacks {expected:?}",
            &args[..2]
        );
    }

    let mut child = mesh_command(&url, &fixture.registry)
        .args(["send", "nova", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running mesh");
    let mut stdin = child.stdin.take().expect("stdin");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, big.as_bytes()).await.expect("writing stdin");
    drop(stdin);
    let out = child.wait_with_output().await.expect("mesh output");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("the limit is 196608 bytes"), "{}", stderr(&out));

    let started = Instant::now();
    let port = mesh_bot::local_nats::free_port().expect("port");
    let out = mesh(&format!("nats://127.0.0.1:{port}"), &fixture, &["send", "nova", "hi"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot reach NATS at nats://127.0.0.1:"), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(10), "unreachable NATS took {:?}", started.elapsed());

    let missing = Fixture::registry(&[]);
    let out = mesh_command(&url, &missing.dir().join("nope.json"))
        .args(["send", "nova", "hi"])
        .output()
        .await
        .expect("running mesh");
    assert!(stderr(&out).contains("nope.json not found"), "{}", stderr(&out));

    assert_eq!(stream_messages(&nats).await, 0, "a rejected send published something");
    assert!(gw.requests().is_empty());
}

/// README: the listener follows no redirects. A hook answering 307 to another
/// server is a failure of that delivery (a dead letter: 3xx is not retried);
/// the other server never sees the token or the message.
#[tokio::test]
async fn a_redirecting_hook_is_not_followed_and_the_message_is_dead_lettered() {
    let nats = TestNats::start().await;
    let elsewhere = RecordingGateway::start().await;
    let target = format!("{}/steal", elsewhere.hooks_url().trim_end_matches("/hooks/wake"));
    let app = axum::Router::new().fallback(move || {
        let target = target.clone();
        async move { (axum::http::StatusCode::TEMPORARY_REDIRECT, [(axum::http::header::LOCATION, target)]) }
    });
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(server, app).await });
    let fixture = Fixture::from_json(&serde_json::json!({
        "nova": {"hooks_token": "nova-hook-token", "hooks_url": format!("http://{addr}/hooks/wake")},
    }));
    let listener = ListenerHandle::one(&fixture, &nats, "nova");

    let out = mesh(&nats.url(), &fixture, &["send", "nova", "follow me"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let js = nats.jetstream().await;
    wait_until_settled(&js, "nova", WAIT).await;
    let letters = mesh_tests::fixtures::dead_letters(&js).await;
    assert_eq!(letters.len(), 1, "the redirected message is a dead letter");
    assert!(letters[0].0.reason.contains("307"), "{:?}", letters[0].0);
    assert!(elsewhere.requests().is_empty(), "the redirect was followed: {:?}", elsewhere.requests());
    listener.stop().await.unwrap();
}
