//! Chat replies against a real nats-server and recording gateways: a reply
//! too large once JSON-escaped is cut, not retried forever; a reply whose
//! publish keeps failing ends as a dead letter within the delivery budget; a
//! reply to an agent without a consumer, or to a sender that is no registered
//! agent, is refused visibly (a dead letter) instead of vanishing; a dead
//! letter JetStream will not store does not ask the agent past the budget,
//! and leaves the message unacked until it is stored, once.

use std::time::Duration;

use async_nats::jetstream;
use mesh_listener::config::Selection;
use mesh_protocol::dead_letter::DeadLetter;
use mesh_protocol::subject::Subject;
use mesh_protocol::{Envelope, Priority, Recipient, Registry};
use mesh_tests::fixtures::{dead_letters, wait_until_settled};
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(20);

fn chat_agent(gw: &RecordingGateway, name: &str) -> serde_json::Value {
    serde_json::json!({
        "gateway": gw.addr.to_string(),
        "gateway_token": format!("{name}-gateway-token"),
        "hooks_token": format!("{name}-hook-token"),
        "hooks_url": gw.hooks_url(),
        "delivery": "chat",
        "model": "test-model",
    })
}

fn wake_agent(gw: &RecordingGateway, name: &str) -> serde_json::Value {
    serde_json::json!({"hooks_token": format!("{name}-hook-token"), "hooks_url": gw.hooks_url()})
}

fn load(fixture: &Fixture) -> Registry {
    mesh_listener::registry_file::load(&fixture.registry, &Default::default()).expect("registry")
}

async fn send(js: &jetstream::Context, fixture: &Fixture, from: &str, to: &str, text: &str) -> uuid::Uuid {
    mesh_bot::publish::send(js, &load(fixture), from, to, text, Priority::Normal).await.expect("send").id
}

/// Waits until the agent's listener has a pull request open (it passed its start checks).
async fn wait_pulling(js: &jetstream::Context, agent: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stream = js.get_stream("MESH_AGENTS").await.expect("agents stream");
        if let Ok(info) = stream.consumer_info(format!("agent-{agent}")).await
            && info.num_waiting > 0
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{agent}'s listener did not start pulling within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ensure_consumer(js: &jetstream::Context, agent: &str) {
    let id = agent.parse().expect("valid agent id");
    mesh_listener::nats::ensure_consumer(js, &id, Default::default()).await.expect("creating the consumer");
}

async fn wait_for_dead_letter(js: &jetstream::Context) -> (DeadLetter, serde_json::Value) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some((record, payload)) = dead_letters(js).await.into_iter().next() {
            return (record, serde_json::from_slice(&payload).expect("the original envelope is kept"));
        }
        assert!(tokio::time::Instant::now() < deadline, "no dead letter within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn last_in_inbox(js: &jetstream::Context, agent: &str) -> Option<(usize, serde_json::Value)> {
    let stream = js.get_stream("MESH_AGENTS").await.expect("agents stream");
    // An agent's reply arrives on the subject naming its sender (`agents.<to>.inbox.<sender>`).
    let message = stream.get_last_raw_message_by_subject(&format!("agents.{agent}.inbox.*")).await.ok()?;
    Some((message.payload.len(), serde_json::from_slice(&message.payload).expect("an envelope")))
}

#[tokio::test]
async fn a_reply_too_large_once_escaped_is_cut_and_the_gateway_asked_once() {
    // The verified case: 98,304 control characters fit the text limit but
    // escape to 590 KB; the listener used to retry this once a second forever.
    let nats = TestNats::start().await;
    let (ada_gw, nova_gw) = (RecordingGateway::start().await, RecordingGateway::start().await);
    let huge = "\u{1}".repeat(98_304);
    ada_gw.set_chat_reply(&huge);
    let fixture = Fixture::from_json(
        &serde_json::json!({"ada": chat_agent(&ada_gw, "ada"), "nova": wake_agent(&nova_gw, "nova")}),
    );
    let js = nats.jetstream().await;
    ensure_consumer(&js, "nova").await;
    let mut config = fixture.listener_config(&nats, Selection::All);
    config.retry.max_deliver = 5;
    let listener = ListenerHandle::spawn(config);
    let id = send(&js, &fixture, "nova", "ada", "say a lot").await;

    let got = nova_gw.wait_for(1, WAIT).await;
    let text = got[0].text();
    assert!(text.starts_with("[mesh] Reply from ada: \u{1}\u{1}"), "{:?}", &text[..40]);
    assert!(text.ends_with("… [truncated]"), "the cut is marked");
    wait_until_settled(&js, "ada", WAIT).await;
    wait_until_settled(&js, "nova", WAIT).await;
    assert_eq!(ada_gw.requests().len(), 1, "one LLM turn, not one a second");
    let (size, reply) = last_in_inbox(&js, "nova").await.expect("the reply is stored");
    assert!(size <= mesh_protocol::envelope::MAX_ENVELOPE_BYTES, "{size} bytes");
    assert_eq!(reply["metadata"]["truncated_from_bytes"], "98304");
    assert_eq!(reply["metadata"]["in_reply_to"], id.to_string());
    assert!(dead_letters(&js).await.is_empty());
    listener.stop().await.expect("stop");
}

#[tokio::test]
async fn a_reply_publish_that_keeps_failing_is_dead_lettered_within_the_budget() {
    let nats = TestNats::start().await;
    let ada_gw = RecordingGateway::start().await;
    ada_gw.set_chat_reply("4");
    let fixture = Fixture::from_json(&serde_json::json!({"ada": chat_agent(&ada_gw, "ada")}));
    let js = nats.jetstream().await;
    let mut config = fixture.listener_config(&nats, Selection::One("ada".parse().unwrap()));
    config.retry.max_deliver = 3;
    let listener = ListenerHandle::spawn(config);
    ensure_consumer(&js, "ada").await;
    wait_pulling(&js, "ada").await;
    // Replies cannot be stored any more (the listener checked the streams at
    // its start; a stream deleted since stands for JetStream refusing writes).
    js.delete_stream("MESH_REPLIES").await.expect("deleting the replies stream");
    let refused = js.publish("mesh.reply.probe", "x".into()).await.expect("publish").await;
    assert!(refused.is_err(), "nothing stores a reply now");
    let asked = Envelope::new("cli:alice", Recipient::Agent("ada".parse().unwrap()), "2+2?")
        .unwrap()
        .with_reply_to(&Subject::new_reply());
    mesh_bot::publish::publish(&js, &asked).await.expect("publish");

    let (record, original) = wait_for_dead_letter(&js).await;
    wait_until_settled(&js, "ada", WAIT).await;
    assert_eq!(original["id"], asked.id.to_string());
    assert_eq!((record.attempts, record.status), (3, Some(200)));
    assert!(record.reason.starts_with("publishing the reply to mesh.reply."), "{}", record.reason);
    assert!(record.reason.ends_with("; gave up after 3 deliveries"), "{}", record.reason);
    assert_eq!(ada_gw.requests().len(), 3, "one gateway call per delivery, within the budget");
    listener.stop().await.expect("stop");
}

/// Waits until `agent`'s consumer has made at least `deliveries` deliveries.
async fn wait_deliveries(js: &jetstream::Context, agent: &str, deliveries: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stream = js.get_stream("MESH_AGENTS").await.expect("agents stream");
        if let Ok(info) = stream.consumer_info(format!("agent-{agent}")).await
            && info.delivered.consumer_sequence >= deliveries
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{agent} did not reach {deliveries} deliveries within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_dead_letter_that_cannot_be_stored_does_not_ask_the_agent_again() {
    // JetStream refusing writes: neither the reply nor its dead letter can be
    // stored. The agent is asked within the budget only; the message stays in
    // the stream and is dead-lettered once the dead-letter stream takes it.
    let nats = TestNats::start().await;
    let ada_gw = RecordingGateway::start().await;
    ada_gw.set_chat_reply("4");
    let fixture = Fixture::from_json(&serde_json::json!({"ada": chat_agent(&ada_gw, "ada")}));
    let js = nats.jetstream().await;
    let mut config = fixture.listener_config(&nats, Selection::One("ada".parse().unwrap()));
    config.retry.max_deliver = 2;
    config.retry.base = Duration::from_millis(20);
    config.retry.max = Duration::from_millis(100);
    // One message out at a time, so every retry is a JetStream delivery this
    // test can count (with a wider window the listener retries in place).
    config.prefetch = 1;
    let listener = ListenerHandle::spawn(config);
    ensure_consumer(&js, "ada").await;
    wait_pulling(&js, "ada").await;
    js.delete_stream("MESH_REPLIES").await.expect("deleting the replies stream");
    js.delete_stream("MESH_DLQ").await.expect("deleting the dead-letter stream");
    let asked = Envelope::new("cli:alice", Recipient::Agent("ada".parse().unwrap()), "2+2?")
        .unwrap()
        .with_reply_to(&Subject::new_reply());
    mesh_bot::publish::publish(&js, &asked).await.expect("publish");

    // Three times the budget in deliveries (the consumer's own max-deliver is unlimited or larger).
    wait_deliveries(&js, "ada", 6).await;
    assert_eq!(ada_gw.requests().len(), 2, "the agent is asked once per delivery within the budget, never past it");

    let spec = mesh_protocol::layout::dead_letter_stream(1);
    js.create_stream(mesh_listener::nats::stream_config(&spec)).await.expect("recreating the dead-letter stream");
    let (record, original) = wait_for_dead_letter(&js).await;
    wait_until_settled(&js, "ada", WAIT).await;
    assert_eq!(original["id"], asked.id.to_string());
    assert_eq!(record.subject, "agents.ada.inbox");
    assert!(record.attempts > 2, "dead-lettered on a later delivery: {}", record.attempts);
    assert_eq!(ada_gw.requests().len(), 2, "still no further LLM turn");
    listener.stop().await.expect("stop");
}

#[tokio::test]
async fn a_reply_to_an_agent_without_a_consumer_is_dead_lettered_not_lost() {
    // The verified case: `mesh send --from kaan nova "hello"`, nova in chat
    // mode, kaan registered but its consumer not created yet.
    let nats = TestNats::start().await;
    let (nova_gw, kaan_gw) = (RecordingGateway::start().await, RecordingGateway::start().await);
    nova_gw.set_chat_reply("hello kaan");
    let fixture = Fixture::from_json(
        &serde_json::json!({"nova": chat_agent(&nova_gw, "nova"), "kaan": wake_agent(&kaan_gw, "kaan")}),
    );
    let js = nats.jetstream().await;
    // The send creates nova's consumer; nothing else runs that would create kaan's
    // (no bot: a bare listener, not the harness's provisioning one).
    let id = send(&js, &fixture, "kaan", "nova", "hello").await;
    mesh_bot::killswitch::KillSwitch::open(&js).await.expect("the kill switch bucket");
    let nova_id = mesh_protocol::AgentId::parse("nova").unwrap();
    let nova = ListenerHandle::spawn_bare(fixture.listener_config(&nats, Selection::One(nova_id)));

    let (record, original) = wait_for_dead_letter(&js).await;
    wait_until_settled(&js, "nova", WAIT).await;
    assert!(record.reason.starts_with("reply target kaan has no consumer"), "{}", record.reason);
    assert!(record.reason.ends_with("; not retried"), "{}", record.reason);
    assert_eq!((record.attempts, record.status, record.subject.as_str()), (1, None, "agents.nova.inbox.kaan"));
    assert_eq!(original["id"], id.to_string());
    assert!(nova_gw.requests().is_empty(), "no LLM turn for a reply with nowhere to go");
    assert!(last_in_inbox(&js, "kaan").await.is_none(), "nothing published into kaan's unread inbox");

    // Once kaan has its consumer, the same conversation works.
    ensure_consumer(&js, "kaan").await;
    let kaan = ListenerHandle::one(&fixture, &nats, "kaan");
    send(&js, &fixture, "kaan", "nova", "hello again").await;
    let got = kaan_gw.wait_for(1, WAIT).await;
    assert_eq!(got[0].text(), "[mesh] Reply from nova: hello kaan");
    assert_eq!(dead_letters(&js).await.len(), 1);
    kaan.stop().await.expect("stop");
    nova.stop().await.expect("stop");
}

#[tokio::test]
async fn a_reply_to_a_sender_that_is_no_registered_agent_is_dead_lettered() {
    let nats = TestNats::start().await;
    let nova_gw = RecordingGateway::start().await;
    nova_gw.set_chat_reply("who are you?");
    let fixture = Fixture::from_json(&serde_json::json!({"nova": chat_agent(&nova_gw, "nova")}));
    let js = nats.jetstream().await;
    let nova = ListenerHandle::one(&fixture, &nats, "nova");
    let id = send(&js, &fixture, "ghost", "nova", "boo").await;

    let (record, original) = wait_for_dead_letter(&js).await;
    wait_until_settled(&js, "nova", WAIT).await;
    assert!(record.reason.starts_with("reply target ghost is not a registered agent"), "{}", record.reason);
    assert_eq!((record.attempts, record.status), (1, None));
    assert_eq!(original["id"], id.to_string());
    assert!(nova_gw.requests().is_empty(), "no LLM turn for a reply with nowhere to go");
    assert!(last_in_inbox(&js, "ghost").await.is_none(), "nothing published into the void");
    nova.stop().await.expect("stop");
}

#[tokio::test]
async fn a_chat_answer_that_is_no_completion_is_dead_lettered_not_acked() {
    // A proxy's page or another endpoint's answer with a 2xx says nothing
    // about the agent having read the message.
    let nats = TestNats::start().await;
    let ada_gw = RecordingGateway::start().await;
    ada_gw.respond_with("/v1/chat/completions", serde_json::json!({"status": "queued"}));
    let fixture = Fixture::from_json(&serde_json::json!({"ada": chat_agent(&ada_gw, "ada")}));
    let js = nats.jetstream().await;
    let listener = ListenerHandle::one(&fixture, &nats, "ada");
    wait_pulling(&js, "ada").await;
    let asked = Envelope::new("cli:alice", Recipient::Agent("ada".parse().unwrap()), "2+2?")
        .unwrap()
        .with_reply_to(&Subject::new_reply());
    mesh_bot::publish::publish(&js, &asked).await.expect("publish");

    let (record, original) = wait_for_dead_letter(&js).await;
    wait_until_settled(&js, "ada", WAIT).await;
    assert_eq!(original["id"], asked.id.to_string());
    assert!(
        record
            .reason
            .starts_with("the gateway answered 2xx but not with a chat completion (JSON without a \"choices\" list"),
        "{}",
        record.reason
    );
    assert_eq!((record.attempts, record.status), (1, Some(200)));
    assert_eq!(ada_gw.requests().len(), 1, "not asked again");
    listener.stop().await.expect("stop");
}

#[tokio::test]
async fn a_reply_to_an_agent_added_since_the_last_registry_poll_is_routed() {
    let nats = TestNats::start().await;
    let (nova_gw, kaan_gw) = (RecordingGateway::start().await, RecordingGateway::start().await);
    nova_gw.set_chat_reply("hello kaan");
    let fixture = Fixture::from_json(&serde_json::json!({"nova": chat_agent(&nova_gw, "nova")}));
    let js = nats.jetstream().await;
    // A poll far longer than the test: the listener's copy of the registry stays the first one.
    let mut config = fixture.listener_config(&nats, Selection::One("nova".parse().unwrap()));
    config.registry_poll = Duration::from_secs(3600);
    let nova = ListenerHandle::spawn(config);
    wait_pulling(&js, "nova").await;

    // kaan is added as `mesh agents add` does: registry entry, then its consumer.
    let both = serde_json::json!({"nova": chat_agent(&nova_gw, "nova"), "kaan": wake_agent(&kaan_gw, "kaan")});
    std::fs::write(&fixture.registry, both.to_string()).unwrap();
    ensure_consumer(&js, "kaan").await;
    let id = send(&js, &fixture, "kaan", "nova", "hello").await;

    wait_until_settled(&js, "nova", WAIT).await;
    assert!(dead_letters(&js).await.is_empty(), "{:?}", dead_letters(&js).await);
    let (_, reply) = last_in_inbox(&js, "kaan").await.expect("the reply is in kaan's inbox");
    assert_eq!((reply["kind"].as_str(), reply["text"].as_str()), (Some("reply"), Some("hello kaan")));
    assert_eq!(reply["metadata"]["in_reply_to"], id.to_string());
    nova.stop().await.expect("stop");
}

#[tokio::test]
async fn a_reply_target_removed_while_the_agent_answers_is_dead_lettered() {
    let nats = TestNats::start().await;
    let (nova_gw, kaan_gw) = (RecordingGateway::start().await, RecordingGateway::start().await);
    nova_gw.set_chat_reply("hello kaan");
    // A slow agent: the answer comes when the test releases it.
    nova_gw.hold();
    let fixture = Fixture::from_json(
        &serde_json::json!({"nova": chat_agent(&nova_gw, "nova"), "kaan": wake_agent(&kaan_gw, "kaan")}),
    );
    let js = nats.jetstream().await;
    let nova = ListenerHandle::one(&fixture, &nats, "nova");
    ensure_consumer(&js, "kaan").await;
    let id = send(&js, &fixture, "kaan", "nova", "hello").await;

    // While nova answers, kaan is removed as `mesh agents remove` does: registry entry and consumer.
    nova_gw.wait_for(1, WAIT).await;
    std::fs::write(&fixture.registry, serde_json::json!({"nova": chat_agent(&nova_gw, "nova")}).to_string()).unwrap();
    let stream = js.get_stream("MESH_AGENTS").await.expect("agents stream");
    stream.delete_consumer("agent-kaan").await.expect("deleting kaan's consumer");
    nova_gw.release();

    let (record, original) = wait_for_dead_letter(&js).await;
    wait_until_settled(&js, "nova", WAIT).await;
    assert_eq!(original["id"], id.to_string());
    assert!(record.reason.starts_with("reply target kaan "), "{}", record.reason);
    assert_eq!(record.status, Some(200));
    assert!(last_in_inbox(&js, "kaan").await.is_none(), "nothing published into the removed agent's inbox");
    assert_eq!(nova_gw.requests().len(), 1);
    nova.stop().await.expect("stop");
}

/// Review of issue 20: the check before publishing a reply reads the
/// registry file, not the listener's copy (up to a poll old): a target made
/// inactive by hand while the agent answers is refused at once.
#[tokio::test]
async fn a_reply_target_made_inactive_by_hand_is_refused_before_the_next_poll() {
    let nats = TestNats::start().await;
    let (nova_gw, kaan_gw) = (RecordingGateway::start().await, RecordingGateway::start().await);
    nova_gw.set_chat_reply("hello kaan");
    nova_gw.hold();
    let fixture = Fixture::from_json(
        &serde_json::json!({"nova": chat_agent(&nova_gw, "nova"), "kaan": wake_agent(&kaan_gw, "kaan")}),
    );
    let js = nats.jetstream().await;
    let nova = ListenerHandle::one(&fixture, &nats, "nova");
    ensure_consumer(&js, "kaan").await;
    let id = send(&js, &fixture, "kaan", "nova", "hello").await;
    nova_gw.wait_for(1, WAIT).await;
    // kaan made inactive by hand; its consumer is still there (the bot deletes it later).
    let mut kaan = wake_agent(&kaan_gw, "kaan");
    kaan["status"] = serde_json::json!("inactive");
    std::fs::write(
        &fixture.registry,
        serde_json::json!({"nova": chat_agent(&nova_gw, "nova"), "kaan": kaan}).to_string(),
    )
    .unwrap();
    nova_gw.release();

    let (record, original) = wait_for_dead_letter(&js).await;
    wait_until_settled(&js, "nova", WAIT).await;
    assert_eq!(original["id"], id.to_string());
    assert!(record.reason.starts_with("reply target kaan "), "{}", record.reason);
    assert!(last_in_inbox(&js, "kaan").await.is_none(), "nothing published into the inactive agent's inbox");
    nova.stop().await.expect("stop");
}

/// SECURITY.md (Messages): an accepted message is delivered or dead-lettered,
/// never lost. An agent refuses a message for good (400) while the
/// dead-letter stream is gone: the message is not acked, it stays on its
/// consumer and comes back (the gateway asked only within the budget); once
/// the dead-letter stream is back it is dead-lettered exactly once and settled.
#[tokio::test]
async fn a_failed_dead_letter_publish_leaves_the_message_unacked_until_it_is_stored_once() {
    let nats = TestNats::start().await;
    let nova_gw = RecordingGateway::start().await;
    nova_gw.script([400; 64]);
    let fixture = Fixture::from_json(&serde_json::json!({"nova": wake_agent(&nova_gw, "nova")}));
    let js = nats.jetstream().await;
    let mut config = fixture.listener_config(&nats, Selection::One("nova".parse().unwrap()));
    config.retry.max_deliver = 2;
    config.retry.base = Duration::from_millis(20);
    config.retry.max = Duration::from_millis(100);
    config.prefetch = 1;
    let listener = ListenerHandle::spawn(config);
    ensure_consumer(&js, "nova").await;
    wait_pulling(&js, "nova").await;
    js.delete_stream("MESH_DLQ").await.expect("deleting the dead-letter stream");
    let id = send(&js, &fixture, "cli:t", "nova", "refused for good").await;

    // Delivered again and again: each dead letter failed, nothing was acked.
    wait_deliveries(&js, "nova", 6).await;
    let stream = js.get_stream("MESH_AGENTS").await.expect("agents stream");
    let info = stream.consumer_info("agent-nova").await.expect("consumer info");
    assert_eq!(info.num_ack_pending as u64 + info.num_pending, 1, "the message stays on its consumer: {info:?}");
    assert_eq!(info.ack_floor.stream_sequence, 0, "nothing was acked or terminated: {info:?}");
    assert_eq!(nova_gw.requests().len(), 2, "the gateway is asked within the budget only");

    let spec = mesh_protocol::layout::dead_letter_stream(1);
    js.create_stream(mesh_listener::nats::stream_config(&spec)).await.expect("recreating the dead-letter stream");
    wait_until_settled(&js, "nova", WAIT).await;
    // Settled: nothing is in flight any more, so the count below is final.
    let letters = dead_letters(&js).await;
    assert_eq!(letters.len(), 1, "dead-lettered exactly once: {:?}", letters.iter().map(|l| &l.0).collect::<Vec<_>>());
    let (record, payload) = &letters[0];
    assert_eq!(record.message_id, id);
    assert_eq!(record.subject, "agents.nova.inbox");
    assert!(record.attempts > 2, "stored on a later delivery: {}", record.attempts);
    let original: serde_json::Value = serde_json::from_slice(payload).expect("the original envelope is kept");
    assert_eq!(original["text"], "refused for good");
    assert_eq!(nova_gw.requests().len(), 2, "still no further call");
    listener.stop().await.expect("stop");
}
