//! Tests of the test harness itself: a process under test whose free port
//! was taken before it bound it is started again on another port.

#![allow(clippy::unwrap_used)] // test helpers fail loudly

use std::time::Duration;

use mesh_tests::fixtures::mesh_command;
use mesh_tests::{Fixture, RecordingGateway, TestNats};

#[tokio::test]
async fn a_bot_whose_port_was_taken_is_started_on_another() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    // Another test's server holds the first port the harness picked; it answers /health/live too.
    let taken = RecordingGateway::start().await;
    let free = mesh_bot::local_nats::free_port().unwrap();
    let mut addrs = Vec::new();
    let (bot, port) = mesh_tests::ports::spawn_listening_on(
        [taken.addr.port(), free],
        |port| {
            addrs.push(port);
            let mut bot = mesh_command(&nats.url(), &fixture.registry);
            bot.args(["bot", "--addr", &format!("127.0.0.1:{port}")]).env("MESH_LOG", "info");
            bot
        },
        mesh_tests::ports::BOT_LISTENING,
    )
    .await;
    assert_eq!(addrs, [taken.addr.port(), free], "tried the taken port, then another");
    assert_eq!(port, free);
    mesh_listener::gateway::install_tls_provider();
    let live = reqwest::get(format!("http://127.0.0.1:{port}/health/live")).await.unwrap();
    assert_eq!(live.text().await.unwrap(), "ok");
    let health: serde_json::Value =
        reqwest::get(format!("http://127.0.0.1:{port}/health")).await.unwrap().json().await.unwrap();
    assert_eq!(health["nats"], "connected", "the bot answers, not the server that held the port: {health}");
    let (status, output) = tokio::time::timeout(Duration::from_secs(20), bot.finish(true)).await.unwrap();
    assert!(status.success(), "{output}");
}
