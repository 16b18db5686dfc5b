//! Sends that meet a JetStream that does not answer for a moment are retried,
//! safely: the same `Nats-Msg-Id` every time, so the message is stored once.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt;
use mesh_listener::nats::ensure_streams;
use mesh_protocol::layout::{MSG_ID_HEADER, Replicas};
use mesh_protocol::subject::Subject;
use mesh_protocol::{AgentId, Envelope, Recipient};
use mesh_tests::TestNats;

/// The first publish reaches a subscriber that never answers (no stream
/// captures the subject yet), so its ack times out; the stream appears; the
/// retry, with the same `Nats-Msg-Id`, is stored, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_publish_is_sent_again_with_the_same_id_and_stored_once() {
    let nats = TestNats::start().await;
    let admin = nats.jetstream().await;
    admin.delete_stream("MESH_AGENTS").await.unwrap();
    let nova = AgentId::parse("nova").unwrap();
    let inbox = Subject::Inbox(nova.clone()).to_string();
    let watcher = nats.client().await;
    let mut seen = watcher.subscribe(inbox).await.unwrap();
    watcher.flush().await.unwrap();

    let sender =
        async_nats::jetstream::ContextBuilder::new().timeout(Duration::from_millis(500)).build(nats.client().await);
    let envelope = Envelope::new("cli:test", Recipient::Agent(nova), "once").unwrap();
    let publish =
        tokio::spawn(async move { mesh_bot::publish::publish(&sender, &envelope).await.map(|r| (r, envelope.id)) });

    let first = tokio::time::timeout(Duration::from_secs(10), seen.next()).await.unwrap().unwrap();
    ensure_streams(&admin, Replicas::Auto).await.unwrap();
    let ((stream_seq, _duplicate), id) =
        tokio::time::timeout(Duration::from_secs(40), publish).await.unwrap().unwrap().expect("the retry is accepted");

    let again = tokio::time::timeout(Duration::from_secs(10), seen.next()).await.unwrap().unwrap();
    let id_of = |m: &async_nats::Message| m.headers.as_ref().and_then(|h| h.get(MSG_ID_HEADER)).map(|v| v.to_string());
    assert_eq!(id_of(&first), Some(id.to_string()));
    assert_eq!(id_of(&again), Some(id.to_string()), "a retry carries the first attempt's Nats-Msg-Id");
    let mut stream = admin.get_stream("MESH_AGENTS").await.unwrap();
    let stored = stream.info().await.unwrap().state.messages;
    assert_eq!((stored, stream_seq), (1, 1), "stored once");
}
