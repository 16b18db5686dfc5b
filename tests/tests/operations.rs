//! Operating the mesh: `mesh ping`, the listener's `/health` and `/metrics`,
//! `mesh dlq` and `mesh dlq replay`, graceful shutdown, and no token in any log.

use std::process::Output;
use std::time::Duration;

use mesh_listener::config::Selection;
use mesh_tests::fixtures::{Logged, listener_bin, mesh_command, wait_until_settled};
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(20);

async fn mesh(nats: &TestNats, fixture: &Fixture, args: &[&str]) -> Output {
    mesh_command(&nats.url(), &fixture.registry)
        .args(args)
        .env("MESH_LOG", "trace")
        .output()
        .await
        .expect("running mesh")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn ping_reports_every_registry_agent_and_fails_when_one_is_silent() {
    let nats = TestNats::start().await;
    let (a, b) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let fixture = Fixture::registry(&[("nova", &a, true), ("kaan", &b, true), ("old", &b, false)]);
    let only_nova = ListenerHandle::one(&fixture, &nats, "nova");
    // The listener answers once it is subscribed; retry the ping until nova shows up.
    let deadline = tokio::time::Instant::now() + WAIT;
    let out = loop {
        let out = mesh(&nats, &fixture, &["ping", "--json", "--timeout-ms", "500"]).await;
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ping --json prints JSON");
        if reply["data"]["rows"][1]["rtt_ms"].is_number() {
            break out;
        }
        assert!(tokio::time::Instant::now() < deadline, "nova never answered: {reply}");
    };
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows: Vec<(String, String)> = reply["data"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["agent"].as_str().unwrap().to_owned(), r["state"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(rows[0], ("kaan".into(), "no answer".into()));
    assert_eq!(rows[1].0, "nova");
    assert!(["ok", "gateway unknown"].contains(&rows[1].1.as_str()), "{rows:?}");
    assert_eq!(rows[2], ("old".into(), "inactive".into()));
    assert!(!out.status.success(), "an active agent did not answer: exit non-zero");

    let both = ListenerHandle::one(&fixture, &nats, "kaan");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let out = mesh(&nats, &fixture, &["ping"]).await;
        if out.status.success() {
            let table = text(&out.stdout);
            assert!(table.contains("2 answered, 0 active agents missing"), "{table}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "kaan never answered: {}", text(&out.stdout));
    }
    both.stop().await.unwrap();
    only_nova.stop().await.unwrap();
}

#[tokio::test]
async fn health_and_metrics_endpoints_report_the_listener() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let port = mesh_bot::local_nats::free_port().unwrap();
    let mut config = fixture.listener_config(&nats, Selection::One("nova".parse().unwrap()));
    config.http_addr = Some(([127, 0, 0, 1], port).into());
    let listener = ListenerHandle::spawn(config);
    let js = nats.jetstream().await;
    mesh_bot::publish::send(
        &js,
        &mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap(),
        "kaan",
        "nova",
        "hi",
        Default::default(),
    )
    .await
    .unwrap();
    gw.wait_for(1, WAIT).await;
    wait_until_settled(&js, "nova", WAIT).await;
    let http = reqwest_like_get(port, "/health").await;
    assert!(http.starts_with("HTTP/1.1 200"), "{http}");
    assert!(http.contains("\"nats\":\"connected\"") && http.contains("\"agent\":\"nova\""), "{http}");
    assert!(reqwest_like_get(port, "/health/live").await.starts_with("HTTP/1.1 200"));
    assert!(reqwest_like_get(port, "/health/ready").await.starts_with("HTTP/1.1 200"));
    let metrics = reqwest_like_get(port, "/metrics").await;
    assert!(metrics.contains("mesh_deliveries_total{agent=\"nova\",outcome=\"delivered\"}"), "{metrics}");
    assert!(metrics.contains("mesh_publish_to_gateway_seconds_bucket"), "{metrics}");
    assert!(metrics.contains("mesh_pending_messages{agent=\"nova\"} 0"), "{metrics}");
    listener.stop().await.unwrap();
}

/// A bare HTTP/1.1 GET (the test crate has no HTTP client; this keeps it that way).
async fn reqwest_like_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed_from_the_command_line() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    gw.script([404]);
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    let sent = mesh(&nats, &fixture, &["send", "nova", "lost then found"]).await;
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    let js = nats.jetstream().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let listed = loop {
        let out = mesh(&nats, &fixture, &["dlq", "nova"]).await;
        let listed = text(&out.stdout);
        if listed.contains("lost then found") {
            break listed;
        }
        assert!(tokio::time::Instant::now() < deadline, "dead letter never listed: {listed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let row = listed.lines().find(|l| l.contains("lost then found")).unwrap();
    let cells: Vec<&str> = row.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(cells[2..6], ["nova", "1", "404", "gateway answered HTTP 404; not retried"], "{listed}");

    let out = mesh(&nats, &fixture, &["dlq", "replay", "nova"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("replayed as"), "{}", text(&out.stdout));
    let got = gw.wait_for(2, WAIT).await;
    assert_eq!(got[1].text().split(": ").nth(1), Some("lost then found"));
    assert!(got[1].text().starts_with("[mesh] Replayed message from cli:"), "{}", got[1].text());
    assert_ne!(got[0].idempotency_key, got[1].idempotency_key, "a replay is a new message");
    wait_until_settled(&js, "nova", WAIT).await;
    let out = mesh(&nats, &fixture, &["dlq"]).await;
    assert_eq!(text(&out.stdout).trim(), "no dead letters");
    let out = mesh(&nats, &fixture, &["dlq", "replay", "nova"]).await;
    assert_eq!(text(&out.stdout).trim(), "no dead letters for nova");
    listener.stop().await.unwrap();
}

#[tokio::test]
async fn sigterm_finishes_the_delivery_in_flight_and_logs_never_show_a_token() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::from_json(&serde_json::json!({
        "nova": {"hooks_token": "env:MESH_TOKEN_NOVA_SECRET_HOOK", "hooks_url": gw.hooks_url(), "gateway_token": "literal-gateway-secret"},
    }));
    let mut command = tokio::process::Command::new(listener_bin());
    command
        .args(["--agent", "nova"])
        .env("NATS_URL", nats.url())
        .env("MESH_REGISTRY", &fixture.registry)
        .env("MESH_TOKEN_NOVA_SECRET_HOOK", "env-hook-secret")
        .env("MESH_LOG", "trace");
    let child = Logged::spawn(command);
    // A 401 and a retried 503 make the listener log errors too.
    gw.script([401, 503]);
    for text in ["rejected", "retried", "slow"] {
        let out = mesh(&nats, &fixture, &["send", "nova", text]).await;
        assert!(out.status.success());
    }
    let got = gw.wait_for(3, WAIT).await;
    assert_eq!(got[0].authorization.as_deref(), Some("Bearer env-hook-secret"));
    let js = nats.jetstream().await;
    wait_until_settled(&js, "nova", WAIT).await;
    gw.set_delay(Duration::from_millis(1500));
    let out = mesh(&nats, &fixture, &["send", "nova", "in flight at shutdown"]).await;
    assert!(out.status.success());
    let seq: u64 = text(&out.stdout)
        .split("stream seq ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no stream seq in {:?}", text(&out.stdout)));
    let deadline = tokio::time::Instant::now() + WAIT;
    while !gw.requests().iter().any(|r| r.text().ends_with("in flight at shutdown")) {
        assert!(tokio::time::Instant::now() < deadline, "the last message never reached the gateway");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, logs) = child.finish(true).await;
    assert!(status.success(), "graceful exit: {status:?}");
    let info = js.get_stream("MESH_AGENTS").await.unwrap().consumer_info("agent-nova").await.unwrap();
    assert!(
        info.ack_floor.stream_sequence >= seq,
        "the in-flight delivery finished and was acked before exit: {info:?}\n{}",
        logs.lines().filter(|l| l.contains("mesh_listener")).collect::<Vec<_>>().join("\n")
    );
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0));
    assert!(logs.contains("delivered") && logs.contains("dead-lettered"), "trace logs were captured");
    for secret in ["env-hook-secret", "literal-gateway-secret"] {
        assert!(!logs.contains(secret), "a token leaked into the logs");
    }
}
