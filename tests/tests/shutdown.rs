//! A stopping listener lets a delivery in flight finish and acks it: its
//! default shutdown grace is the gateway request timeout plus a margin, so a
//! slow gateway's answer is not thrown away (and the agent not called again).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use mesh_listener::config::SHUTDOWN_MARGIN;
use mesh_protocol::Priority;
use mesh_tests::fixtures::wait_until_settled;
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(30);

/// Longer than the shutdown grace the listener had before (10 s), shorter
/// than its request timeout (30 s).
const SLOW_ANSWER: Duration = Duration::from_secs(12);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_in_flight_at_stop_finishes_and_is_acked() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    gw.set_delay(SLOW_ANSWER);
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let registry = mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap();
    mesh_bot::publish::send(&js, &registry, "cli:test", "nova", "slow one", Priority::Normal).await.unwrap();

    let config = fixture.listener_config(&nats, mesh_listener::config::Selection::One("nova".parse().unwrap()));
    assert_eq!(config.shutdown_grace(), config.request_timeout + SHUTDOWN_MARGIN);
    assert!(config.shutdown_grace() > SLOW_ANSWER);
    let listener = ListenerHandle::spawn(config);
    gw.wait_for(1, WAIT).await;
    // The gateway holds the request; stop the listener while it does.
    listener.stop().await.unwrap();

    wait_until_settled(&js, "nova", Duration::from_secs(5)).await;
    assert_eq!(gw.requests().len(), 1, "the gateway was called once");
}
