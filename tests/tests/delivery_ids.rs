//! The ids that keep delivery exactly-once-looking on real nats-servers
//! (issue 20): a dead letter's `Nats-Msg-Id` does not hang on the stream
//! sequence, so a new dead letter right after `mesh restore` is stored, not
//! dropped as a restored one's duplicate; a dead letter replayed twice (a
//! crash between publish and removal) reaches the gateway once, with its
//! `reply_to`, kind and hop count; every agent gets its own `Idempotency-Key`,
//! and a body without an id gets a key that does not repeat after a restore.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use mesh_listener::config::Selection;
use mesh_protocol::subject::Subject;
use mesh_protocol::{Envelope, Kind, Priority, Recipient, Registry};
use mesh_tests::fixtures::{dead_letters, mesh_command, wait_until_settled};
use mesh_tests::{Fixture, ListenerHandle, RecordingGateway, TestNats};

const WAIT: Duration = Duration::from_secs(20);

fn load(fixture: &Fixture) -> Registry {
    mesh_listener::registry_file::load(&fixture.registry, &Default::default()).unwrap()
}

async fn mesh(nats: &TestNats, registry: &Path, args: &[&str]) -> String {
    let out = mesh_command(&nats.url(), registry).args(args).output().await.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "mesh {args:?}: {text}");
    text
}

/// Waits until `MESH_DLQ` holds `n` dead letters.
async fn wait_dead_letters(
    js: &jetstream::Context,
    n: usize,
) -> Vec<(mesh_protocol::dead_letter::DeadLetter, bytes::Bytes)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = dead_letters(js).await;
        if got.len() >= n {
            return got;
        }
        assert!(tokio::time::Instant::now() < deadline, "{} of {n} dead letters within {WAIT:?}", got.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the agent's listener has a pull request open (its consumer
/// exists: a raw publish before it would be missed, consumers start at new messages).
async fn wait_pulling(js: &jetstream::Context, agent: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stream = js.get_stream("MESH_AGENTS").await.unwrap();
        if let Ok(info) = stream.consumer_info(format!("agent-{agent}")).await
            && info.num_waiting > 0
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{agent}'s listener did not start pulling within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Backs up `a` (after dropping its agents stream's messages, as a week of
/// age does while dead letters stay 30 days) and restores into a fresh `b`,
/// whose stream sequences start again at 1.
async fn age_out_back_up_and_restore(a: &TestNats, b: &TestNats, fixture: &Fixture) {
    a.jetstream().await.get_stream("MESH_AGENTS").await.unwrap().purge().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("backup");
    mesh(a, &fixture.registry, &["backup", backup.to_str().unwrap()]).await;
    mesh(b, &dir.path().join("restored-tokens.json"), &["restore", backup.to_str().unwrap()]).await;
}

#[tokio::test]
async fn a_new_dead_letter_right_after_a_restore_is_stored_and_its_message_not_lost() {
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let a = TestNats::start().await;
    let js_a = a.jetstream().await;
    let listener = ListenerHandle::one(&fixture, &a, "nova");
    gw.script([404]);
    let first = mesh_bot::publish::send(&js_a, &load(&fixture), "test", "nova", "old", Priority::Normal).await.unwrap();
    wait_dead_letters(&js_a, 1).await;
    listener.stop().await.unwrap();

    let b = TestNats::start().await;
    age_out_back_up_and_restore(&a, &b, &fixture).await;
    let js_b = b.jetstream().await;
    assert_eq!(dead_letters(&js_b).await.len(), 1, "the old dead letter is restored");
    // Within the 2-minute duplicate window of the restore: the new message
    // gets the restored one's stream sequence (1).
    let listener = ListenerHandle::one(&fixture, &b, "nova");
    gw.script([404]);
    let second =
        mesh_bot::publish::send(&js_b, &load(&fixture), "test", "nova", "new", Priority::Normal).await.unwrap();
    assert_eq!(second.stream_seq, 1, "sequences restart after a restore");
    let got = wait_dead_letters(&js_b, 2).await;
    wait_until_settled(&js_b, "nova", WAIT).await;
    let ids: Vec<String> = got
        .iter()
        .map(|(_, payload)| {
            serde_json::from_slice::<serde_json::Value>(payload).unwrap()["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        ids,
        [first.id.to_string(), second.id.to_string()],
        "the new dead letter is stored beside the restored one"
    );
    assert_eq!(got[1].0.stream_seq, 1);
    listener.stop().await.unwrap();
}

#[tokio::test]
async fn a_dead_letter_after_the_agents_stream_restarts_its_sequences_is_stored() {
    // The same hazard without a restore: the agents stream recreated (wiped
    // by an operator) numbers from 1 again while the dead letters stay, and
    // a dead letter id built on the sequence would repeat within the window.
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let nats = TestNats::start().await;
    let js = nats.jetstream().await;
    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    gw.script([404]);
    mesh_bot::publish::send(&js, &load(&fixture), "test", "nova", "first", Priority::Normal).await.unwrap();
    wait_dead_letters(&js, 1).await;
    listener.stop().await.unwrap();
    js.delete_stream("MESH_AGENTS").await.unwrap();
    mesh_bot::provision::ensure_mesh(&js, mesh_protocol::layout::Replicas::Auto).await.unwrap();

    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    gw.script([404]);
    let second =
        mesh_bot::publish::send(&js, &load(&fixture), "test", "nova", "second", Priority::Normal).await.unwrap();
    assert_eq!(second.stream_seq, 1, "the recreated stream numbers from 1 again");
    let got = wait_dead_letters(&js, 2).await;
    wait_until_settled(&js, "nova", WAIT).await;
    let newest: serde_json::Value = serde_json::from_slice(&got[1].1).unwrap();
    assert_eq!(newest["id"], second.id.to_string());
    listener.stop().await.unwrap();
}

#[tokio::test]
async fn a_dead_letter_replayed_twice_reaches_the_gateway_once_with_its_fields() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let listener = ListenerHandle::one(&fixture, &nats, "nova");
    wait_pulling(&js, "nova").await;
    gw.script([404]);
    let mut asked = Envelope::new("cli:alice", Recipient::Agent("nova".parse().unwrap()), "2+2?")
        .unwrap()
        .with_reply_to(&Subject::new_reply());
    asked.kind = Kind::Ask;
    asked.hops = 2;
    mesh_bot::publish::publish(&js, &asked).await.unwrap();
    wait_dead_letters(&js, 1).await;
    wait_until_settled(&js, "nova", WAIT).await;

    // An operator's replay that crashed after its publish, before removing the dead letter...
    let nova = "nova".parse().unwrap();
    let entries = mesh_bot::dlq::list(&js, Some(&nova), 10).await.unwrap();
    let crashed = mesh_bot::dlq::replay_envelope(&entries[0], &nova).unwrap();
    mesh_bot::publish::publish(&js, &crashed).await.unwrap();
    // ...and the replay run again (through the engine, as every front end does).
    let said = mesh(&nats, &fixture.registry, &["dlq", "replay", "nova"]).await;
    gw.wait_for(2, WAIT).await;
    wait_until_settled(&js, "nova", WAIT).await;
    let got = gw.requests();
    assert_eq!(got.len(), 2, "the original's 404 and one replay: {got:?}");
    assert!(said.contains(&format!("replayed as {}", crashed.id)), "{said}");
    assert_eq!(got[1].idempotency_key.as_deref(), Some(format!("nova:{}", crashed.id).as_str()));
    assert!(dead_letters(&js).await.is_empty(), "the dead letter is removed");

    let stream = js.get_stream("MESH_AGENTS").await.unwrap();
    let stored = stream.get_last_raw_message_by_subject("agents.nova.inbox").await.unwrap();
    let replay: Envelope = serde_json::from_slice(&stored.payload).unwrap();
    assert_eq!(replay.id, crashed.id);
    assert_eq!((replay.kind, replay.hops, replay.reply_to.as_deref()), (Kind::Ask, 2, asked.reply_to.as_deref()));
    assert_eq!((replay.from.as_str(), replay.text.as_str()), ("cli:alice", "2+2?"));
    assert_eq!(replay.metadata["replay_of"], asked.id.to_string());
    assert_eq!(stream.get_info().await.unwrap().state.messages, 2, "the original and one replay");
    listener.stop().await.unwrap();
}

#[tokio::test]
async fn a_broadcast_gives_each_agent_behind_one_gateway_its_own_key() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true), ("kaan", &gw, true)]);
    let js = nats.jetstream().await;
    let listener = ListenerHandle::spawn(fixture.listener_config(&nats, Selection::All));
    let sent = mesh_bot::publish::broadcast(&js, &load(&fixture), "test", "all hands", Priority::Normal).await.unwrap();
    let got = gw.wait_for(2, WAIT).await;
    let mut keys: Vec<String> = got.iter().map(|r| r.idempotency_key.clone().unwrap()).collect();
    keys.sort();
    assert_eq!(keys, [format!("kaan:{}", sent.id), format!("nova:{}", sent.id)]);
    listener.stop().await.unwrap();
}

#[tokio::test]
async fn a_body_without_an_id_gets_a_key_that_does_not_repeat_after_a_restore() {
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let a = TestNats::start().await;
    let listener = ListenerHandle::one(&fixture, &a, "nova");
    wait_pulling(&a.jetstream().await, "nova").await;
    a.jetstream().await.publish("agents.nova.inbox", "plain one".into()).await.unwrap().await.unwrap();
    let before = gw.wait_for(1, WAIT).await[0].idempotency_key.clone().unwrap();
    wait_until_settled(&a.jetstream().await, "nova", WAIT).await;
    listener.stop().await.unwrap();

    let b = TestNats::start().await;
    age_out_back_up_and_restore(&a, &b, &fixture).await;
    let listener = ListenerHandle::one(&fixture, &b, "nova");
    wait_pulling(&b.jetstream().await, "nova").await;
    let ack = b.jetstream().await.publish("agents.nova.inbox", "plain two".into()).await.unwrap().await.unwrap();
    assert_eq!(ack.sequence, 1, "the same stream sequence as the first");
    let got = gw.wait_for(2, WAIT).await;
    assert!(got[1].text().ends_with("plain two"), "{}", got[1].text());
    let after = got[1].idempotency_key.clone().unwrap();
    assert!(before.starts_with("nova:") && after.starts_with("nova:"), "{before} {after}");
    assert_ne!(before, after, "another message, another key");
    listener.stop().await.unwrap();
}

/// Three dead letters of nova, listed; the gateway then answers 200.
async fn three_dead_letters(
    nats: &TestNats,
    gw: &RecordingGateway,
    fixture: &Fixture,
) -> (ListenerHandle, Vec<mesh_bot::dlq::DeadLetterEntry>) {
    let js = nats.jetstream().await;
    let listener = ListenerHandle::one(fixture, nats, "nova");
    gw.script([404, 404, 404]);
    for text in ["one", "two", "three"] {
        mesh_bot::publish::send(&js, &load(fixture), "test", "nova", text, Priority::Normal).await.unwrap();
    }
    wait_dead_letters(&js, 3).await;
    wait_until_settled(&js, "nova", WAIT).await;
    let entries = mesh_bot::dlq::list(&js, Some(&"nova".parse().unwrap()), 10).await.unwrap();
    assert_eq!(entries.len(), 3);
    (listener, entries)
}

#[tokio::test]
async fn a_dead_letter_removed_by_another_replay_does_not_stop_the_batch() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let (listener, entries) = three_dead_letters(&nats, &gw, &fixture).await;
    let nova = "nova".parse().unwrap();
    // Another operator replays the second one between our list and our replay.
    let theirs = mesh_bot::dlq::replay_envelope(&entries[1], &nova).unwrap();
    mesh_bot::publish::publish(&js, &theirs).await.unwrap();
    js.get_stream("MESH_DLQ").await.unwrap().delete_message(entries[1].dlq_seq).await.unwrap();

    let report = mesh_bot::dlq::replay_entries(&js, &nova, entries.clone()).await.unwrap();
    let seqs = |list: &[(u64, String)]| list.iter().map(|(seq, _)| *seq).collect::<Vec<_>>();
    assert_eq!(seqs(&report.replayed), [entries[0].dlq_seq, entries[2].dlq_seq], "{report:?}");
    assert_eq!(report.already_removed, [(entries[1].dlq_seq, theirs.id.to_string())], "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    assert!(report.lines().iter().any(|l| l.contains("another replay had already removed it")), "{report:?}");
    // Three 404s, then each message once more: the second replay was stored once.
    gw.wait_for(6, WAIT).await;
    wait_until_settled(&js, "nova", WAIT).await;
    assert_eq!(gw.requests().len(), 6, "{:?}", gw.requests());
    assert!(dead_letters(&js).await.is_empty());
    listener.stop().await.unwrap();
}

#[tokio::test]
async fn a_replay_id_taken_by_another_message_keeps_the_dead_letter() {
    let nats = TestNats::start().await;
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let js = nats.jetstream().await;
    let (listener, entries) = three_dead_letters(&nats, &gw, &fixture).await;
    // Someone who may publish to nova's inbox stores a message under the
    // (predictable) id the first dead letter's replay will have.
    let nova = "nova".parse().unwrap();
    let mut squatter = mesh_bot::dlq::replay_envelope(&entries[0], &nova).unwrap();
    squatter.text = "something else".into();
    mesh_bot::publish::publish(&js, &squatter).await.unwrap();

    let out = mesh_command(&nats.url(), &fixture.registry).args(["dlq", "replay", "nova", "3"]).output().await.unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(said.contains(&format!("dead letter {} failed", entries[0].dlq_seq)), "{said}");
    assert!(said.contains("already taken by another message"), "{said}");
    let left = dead_letters(&js).await;
    assert_eq!(left.len(), 1, "only the squatted dead letter is kept: {said}");
    // The other two were replayed: three 404s, the squatter, two replays.
    gw.wait_for(6, WAIT).await;
    listener.stop().await.unwrap();
}

#[tokio::test]
async fn a_dead_letter_keeps_its_replay_id_when_a_restore_renumbers_it() {
    let gw = RecordingGateway::start().await;
    let fixture = Fixture::registry(&[("nova", &gw, true)]);
    let a = TestNats::start().await;
    let js_a = a.jetstream().await;
    let listener = ListenerHandle::one(&fixture, &a, "nova");
    gw.script([404, 404]);
    for text in ["first", "second"] {
        mesh_bot::publish::send(&js_a, &load(&fixture), "test", "nova", text, Priority::Normal).await.unwrap();
    }
    wait_dead_letters(&js_a, 2).await;
    listener.stop().await.unwrap();
    let nova = "nova".parse().unwrap();
    let first = mesh_bot::dlq::list(&js_a, Some(&nova), 10).await.unwrap()[0].dlq_seq;
    js_a.get_stream("MESH_DLQ").await.unwrap().delete_message(first).await.unwrap();
    let before = mesh_bot::dlq::list(&js_a, Some(&nova), 10).await.unwrap();
    let id_before = mesh_bot::dlq::replay_envelope(&before[0], &nova).unwrap().id;

    let b = TestNats::start().await;
    age_out_back_up_and_restore(&a, &b, &fixture).await;
    let after = mesh_bot::dlq::list(&b.jetstream().await, Some(&nova), 10).await.unwrap();
    assert_ne!(after[0].dlq_seq, before[0].dlq_seq, "the restore renumbers MESH_DLQ");
    assert_eq!(mesh_bot::dlq::replay_envelope(&after[0], &nova).unwrap().id, id_before);
}
