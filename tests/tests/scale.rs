//! More agents than nats-server's default consumer limit: nats-server 2.15
//! gives a stream at most 1,000 consumers unless the stream sets its own, and
//! the mesh has one durable consumer per agent, so the agents stream sets
//! [`MAX_AGENT_CONSUMERS`], and a stream made before without it is raised.
#![allow(clippy::unwrap_used)]

use futures::StreamExt;
use mesh_protocol::AgentId;
use mesh_protocol::layout::{self, ConsumerTuning, MAX_AGENT_CONSUMERS, Replicas};
use mesh_tests::TestNats;

/// One more agent than the server's default limit.
const AGENTS: usize = 1001;

async fn register(js: &async_nats::jetstream::Context, agents: usize) -> Vec<String> {
    let ids: Vec<AgentId> = (0..agents).map(|i| AgentId::parse(&format!("a{i}")).unwrap()).collect();
    futures::stream::iter(ids.iter().map(|id| mesh_listener::nats::bind_consumer(js, id, ConsumerTuning::default())))
        .buffer_unordered(16)
        .filter_map(|r| async move { r.err().map(|e| e.to_string()) })
        .collect()
        .await
}

async fn consumer_limit(js: &async_nats::jetstream::Context) -> i32 {
    js.get_stream("MESH_AGENTS").await.unwrap().info().await.unwrap().config.max_consumers
}

#[tokio::test]
async fn the_agents_stream_takes_more_agents_than_the_servers_default_limit() {
    let nats = TestNats::start().await;
    let js = nats.jetstream().await;
    mesh_bot::provision::ensure_mesh(&js, Replicas::Auto).await.unwrap();
    assert_eq!(consumer_limit(&js).await, MAX_AGENT_CONSUMERS);
    let failures = register(&js, AGENTS).await;
    assert!(failures.is_empty(), "{} of {AGENTS} consumers refused, first: {:?}", failures.len(), failures.first());
}

#[tokio::test]
async fn a_stream_made_without_the_limit_is_raised_when_the_mesh_is_ensured() {
    let nats = TestNats::start().await;
    let js = nats.jetstream().await;
    // As an earlier version made it: the layout's stream, no consumer limit of its own.
    let mut old = mesh_runtime::nats::stream_config(&layout::agents_stream(1));
    old.max_consumers = 0;
    let _ = js.delete_stream("MESH_AGENTS").await;
    js.create_stream(old).await.unwrap();
    let before = consumer_limit(&js).await;
    assert_ne!(before, MAX_AGENT_CONSUMERS, "the old stream starts without the layout's limit");
    mesh_bot::provision::ensure_mesh(&js, Replicas::Auto).await.unwrap();
    assert_eq!(consumer_limit(&js).await, MAX_AGENT_CONSUMERS);
    let failures = register(&js, AGENTS).await;
    assert!(failures.is_empty(), "{} of {AGENTS} consumers refused, first: {:?}", failures.len(), failures.first());
}

/// Review: the raise once started from the config read before the stream's
/// subjects were widened, so upgrading a stream that lacked both wrote the
/// old subjects back (and the agents' sender-bound subjects found no stream).
#[tokio::test]
async fn raising_the_limit_keeps_the_subjects_an_upgrade_added() {
    let nats = TestNats::start().await;
    let js = nats.jetstream().await;
    let spec = layout::agents_stream(1);
    let mut old = mesh_runtime::nats::stream_config(&spec);
    old.max_consumers = 0;
    old.subjects = vec![spec.subjects[0].clone()];
    let _ = js.delete_stream("MESH_AGENTS").await;
    js.create_stream(old).await.unwrap();
    mesh_bot::provision::ensure_mesh(&js, Replicas::Auto).await.unwrap();
    let config = js.get_stream("MESH_AGENTS").await.unwrap().info().await.unwrap().config.clone();
    assert_eq!(config.subjects, spec.subjects);
    assert_eq!(config.max_consumers, MAX_AGENT_CONSUMERS);
}
