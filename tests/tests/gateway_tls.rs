//! Chat delivery over HTTPS (issue 19.8): the `mesh-listener` binary delivers
//! to an `https://` gateway whose certificate comes from a private CA once
//! `MESH_GATEWAY_CA_FILE` names that CA (and not before: the system's roots do
//! not know it), with the gateway token over TLS; and a chat agent whose
//! `gateway_token` would cross a network in clear text stops the listener.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use mesh_listener::config::Selection;
use mesh_tests::fixtures::{Logged, listener_bin, provision};
use mesh_tests::tls::TestTls;
use mesh_tests::{Fixture, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(30);

fn listener(nats: &TestNats, fixture: &Fixture, ca_file: Option<&std::path::Path>) -> Logged {
    let mut command = tokio::process::Command::new(listener_bin());
    command
        .args(["--agent", "ada"])
        .env("NATS_URL", nats.url())
        .env("MESH_REGISTRY", &fixture.registry)
        .env("MESH_LOG", "info")
        .env_remove("MESH_GATEWAY_CA_FILE")
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR");
    if let Some(ca) = ca_file {
        command.env("MESH_GATEWAY_CA_FILE", ca);
    }
    Logged::spawn(command)
}

#[tokio::test]
async fn a_listener_delivers_to_an_https_gateway_trusting_the_ca_file_it_was_given() {
    let nats = TestNats::start().await;
    let tls = TestTls::generate();
    let gw = RecordingGateway::start_tls(&tls).await;
    gw.set_chat_reply("over tls");
    let base = format!("https://localhost:{}", gw.addr.port());
    let fixture = Fixture::from_json(&serde_json::json!({
        "ada": {
            "gateway": base,
            "gateway_token": "ada-gateway-token",
            "hooks_token": "ada-hook-token",
            "hooks_url": format!("{base}/hooks/wake"),
            "delivery": "chat",
            "model": "test-model",
        },
        // The sender, where the chat reply goes (no listener: it waits in NATS).
        "kaan": {"hooks_token": "kaan-hook-token", "hooks_url": "http://127.0.0.1:9/hooks/wake"},
    }));
    let provisioner = provision(&fixture.listener_config(&nats, Selection::One("ada".parse().unwrap()))).await;
    let js = nats.jetstream().await;
    let registry = mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
    let text = format!("secret plans {}", uuid::Uuid::now_v7().simple());
    mesh_bot::publish::send(&js, &registry, "kaan", "ada", &text, Default::default()).await.unwrap();

    // Without the CA: the handshake fails (unknown issuer), nothing reaches the gateway.
    let untrusting = listener(&nats, &fixture, None);
    untrusting.wait_for_output("delivery failed; will retry", WAIT).await.unwrap();
    let (_, log) = untrusting.finish(true).await;
    assert!(
        log.contains("unreachable") && log.contains("UnknownIssuer"),
        "the handshake failed on the certificate: {log}"
    );
    assert!(gw.requests().is_empty(), "a request got through without a trusted certificate: {:?}", gw.requests());

    // With MESH_GATEWAY_CA_FILE: delivered over TLS, with the gateway token.
    let trusting = listener(&nats, &fixture, Some(&tls.ca_file()));
    let got = gw.wait_for(1, WAIT).await;
    assert_eq!(got[0].path, "/v1/chat/completions");
    assert_eq!(got[0].authorization.as_deref(), Some("Bearer ada-gateway-token"));
    assert!(got[0].body.to_string().contains(&text), "{}", got[0].body);
    trusting.wait_for_output("delivered", WAIT).await.unwrap();
    let (_, log) = trusting.finish(true).await;
    assert!(!log.contains("ada-gateway-token"), "the token reached a log:\n{log}");
    provisioner.abort();
}

#[tokio::test]
async fn a_chat_gateway_token_over_plain_http_to_another_host_stops_the_listener() {
    let nats = TestNats::start().await;
    // 192.0.2.0/24 is TEST-NET-1: not loopback, never routed.
    let fixture = Fixture::from_json(&serde_json::json!({
        "ada": {
            "gateway": "192.0.2.10:7004",
            "gateway_token": "ada-gateway-token",
            "hooks_token": "ada-hook-token",
            "hooks_url": "http://192.0.2.10:7004/hooks/wake",
            "delivery": "chat",
            "model": "test-model",
        },
    }));
    let refused = listener(&nats, &fixture, None);
    let (status, log) = tokio::time::timeout(WAIT, refused.finish(false))
        .await
        .expect("the listener kept running with a gateway token in clear text");
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("clear text") && log.contains("https://192.0.2.10") && log.contains("allow_plaintext"),
        "{log}"
    );
    assert!(!log.contains("ada-gateway-token"), "{log}");
}
