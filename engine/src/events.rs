//! Publishing mesh events and watching the fleet for the ones nobody
//! publishes: agents that stop answering pings (and come back), and dead
//! letters piling up. Every bot replica watches; each change is published
//! once for the fleet: replicas that see the same change publish it with the
//! same `Nats-Msg-Id` (JetStream drops the repeat), and the state last
//! announced per agent is kept in the [`FLEET_BUCKET`] bucket so a replica
//! that sees the change later stays quiet.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use mesh_protocol::event::{Event, EventKind};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// What the event of an agent going down says of it (its notification gets a Ping button).
pub const DOWN_EVENT: &str = "is down";

/// Publishes an event (best effort: a lost notification never blocks a command).
pub async fn publish(js: &jetstream::Context, event: &Event) {
    let subject = event.kind.subject().to_string();
    match js.publish(subject, event.encode().into()).await {
        Ok(ack) => {
            if let Err(e) = ack.await {
                warn!(error = %e, "event not stored");
            }
        }
        Err(e) => warn!(error = %e, "event not published"),
    }
}

/// Publishes an event once for the fleet: a repeat with the same `id` within
/// the events stream's duplicate window is dropped by JetStream (best effort).
pub async fn publish_once(js: &jetstream::Context, event: &Event, id: &str) {
    let subject = event.kind.subject().to_string();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    match js.publish_with_headers(subject, headers, event.encode().into()).await {
        Ok(ack) => match ack.await {
            Ok(ack) if ack.duplicate => debug!(id, "event already published by another replica"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "event not stored"),
        },
        Err(e) => warn!(error = %e, "event not published"),
    }
}

/// The bucket holding, per agent, the state last announced (`up` or `down`),
/// shared by the bot replicas.
pub const FLEET_BUCKET: &str = mesh_protocol::layout::FLEET_BUCKET;

/// Opens the fleet bucket, creating it when missing.
pub async fn fleet_bucket(
    js: &jetstream::Context,
    setting: mesh_protocol::layout::Replicas,
) -> Result<kv::Store, mesh_runtime::nats::NatsError> {
    let config = kv::Config {
        bucket: FLEET_BUCKET.to_owned(),
        description: "mesh fleet monitor: the state last announced per agent".to_owned(),
        history: 1,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    mesh_runtime::nats::open_or_create_bucket(js, config, setting).await
}

/// What an event of the fleet monitor is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// An agent went down (`up` false) or came back.
    Agent {
        /// The agent.
        agent: String,
        /// Its new state.
        up: bool,
    },
    /// New dead letters.
    DeadLetters,
}

/// Announces `event` for an agent's transition unless another replica did:
/// the announced state is compared and swapped in the fleet bucket, and the
/// event's message id names the revision it replaces, so two replicas
/// racing on the same transition publish one event.
async fn announce_agent(js: &jetstream::Context, fleet: &kv::Store, agent: &str, up: bool, event: &Event) {
    let state = if up { "up" } else { "down" };
    let entry = match fleet.entry(agent).await {
        Ok(entry) => entry.filter(|e| e.operation == kv::Operation::Put),
        Err(e) => {
            warn!(error = %e, agent, "fleet state unreadable; announcing anyway");
            None
        }
    };
    let current = entry.as_ref().map(|e| e.value.as_ref());
    if current == Some(state.as_bytes()) || current == Some(format!("seen-{state}").as_bytes()) {
        debug!(agent, state, "already announced by another replica");
        return;
    }
    let revision = entry.as_ref().map_or(0, |e| e.revision);
    // Up again before its going down was ever announced (a listener still
    // starting when the first round looked): nothing to say, only record it.
    if !(up && current == Some(b"seen-down".as_slice())) {
        publish_once(js, event, &format!("agent:{agent}:{state}:{revision}")).await;
    }
    let swapped = match entry {
        Some(_) => {
            fleet.update(agent, state.as_bytes().to_vec().into(), revision).await.map(drop).map_err(|e| e.to_string())
        }
        None => fleet.create(agent, state.as_bytes().to_vec().into()).await.map(drop).map_err(|e| e.to_string()),
    };
    if let Err(e) = swapped {
        debug!(agent, error = %e, "another replica recorded the transition first");
    }
}

/// Records what this replica sees on its first round, without announcing:
/// a change that happened while no bot watched is not news, and the next one is.
/// It is kept as `seen-up`/`seen-down` (not announced), and only for agents
/// the bucket knows nothing of: a state another replica announced stays.
async fn record_seen(fleet: &kv::Store, view: &FleetView) {
    for (agent, up) in &view.up {
        let state: &[u8] = if *up { b"seen-up" } else { b"seen-down" };
        if matches!(fleet.get(agent.as_str()).await, Ok(None)) {
            let _ = fleet.create(agent.as_str(), state.to_vec().into()).await;
        }
    }
}

/// What the fleet monitor compares between rounds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FleetView {
    /// Agent id to "up" (answered with a healthy gateway) or not.
    pub up: BTreeMap<String, bool>,
    /// Dead letters stored.
    pub dead_letters: u64,
}

/// The events between two views of the fleet, with what each is about. Pure.
pub fn changes(before: &FleetView, after: &FleetView) -> Vec<(Event, Change)> {
    let mut out = Vec::new();
    for (agent, up) in &after.up {
        let text = match (before.up.get(agent), up) {
            (Some(true), false) => format!("agent {agent} {DOWN_EVENT} (no pong or gateway failing)"),
            (Some(false), true) => format!("agent {agent} is back"),
            _ => continue,
        };
        out.push((
            Event::now(EventKind::Agent, text).about(agent.clone()),
            Change::Agent { agent: agent.clone(), up: *up },
        ));
    }
    if after.dead_letters > before.dead_letters {
        let new = after.dead_letters - before.dead_letters;
        let text = format!("{new} new dead letters ({} stored); see `dlq`", after.dead_letters);
        out.push((Event::now(EventKind::Dlq, text), Change::DeadLetters));
    }
    out
}

/// Pings the fleet every `every` and publishes what changed, until `stop`.
pub async fn monitor(
    client: async_nats::Client,
    registry_path: PathBuf,
    allowed_hosts: mesh_protocol::registry::HostAllowList,
    replicas: mesh_protocol::layout::Replicas,
    every: Duration,
    stop: CancellationToken,
) {
    let js = jetstream::new(client.clone());
    let mut fleet: Option<kv::Store> = None;
    let mut before: Option<FleetView> = None;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(registry) = mesh_runtime::registry_file::load(&registry_path, &allowed_hosts) else { continue };
        let Ok(report) = crate::ping::ping(&client, &registry, Duration::from_secs(2)).await else { continue };
        let up = report
            .rows
            .iter()
            .filter(|r| r.state != "inactive")
            .map(|r| (r.agent.clone(), matches!(r.state, "ok" | "paused" | "gateway unknown")))
            .collect();
        let (dead_letters, last_dead_letter) = match js
            .get_stream(mesh_protocol::layout::dead_letter_stream(1).name)
            .await
        {
            Ok(mut stream) => stream.info().await.map(|i| (i.state.messages, i.state.last_sequence)).unwrap_or((0, 0)),
            Err(_) => (0, 0),
        };
        if fleet.is_none() {
            fleet =
                fleet_bucket(&js, replicas).await.inspect_err(|e| warn!(error = %e, "agent events not shared")).ok();
        }
        let Some(fleet) = &fleet else { continue };
        let now = FleetView { up, dead_letters };
        match &before {
            None => {
                record_seen(fleet, &now).await;
                info!(agents = now.up.len(), "fleet monitor watching the agents");
            }
            Some(before) => {
                for (event, change) in changes(before, &now) {
                    debug!(text = %event.text, "fleet event");
                    match change {
                        Change::Agent { agent, up } => announce_agent(&js, fleet, &agent, up, &event).await,
                        // The newest dead letter's sequence names this pile-up for every replica.
                        Change::DeadLetters => {
                            let event = match newest_dead_letter_agent(&js, last_dead_letter).await {
                                Some(agent) => event.about(agent).dead_letter(last_dead_letter),
                                None => event,
                            };
                            publish_once(&js, &event, &format!("dlq:{last_dead_letter}")).await
                        }
                    }
                }
            }
        }
        before = Some(now);
    }
}

/// The agent of the dead letter stored at `seq` (the newest), for the
/// notification's Replay button (which names that dead letter by `seq`);
/// `None` when it cannot be read.
async fn newest_dead_letter_agent(js: &jetstream::Context, seq: u64) -> Option<String> {
    let stream = js.get_stream(mesh_protocol::layout::dead_letter_stream(1).name).await.ok()?;
    let message = stream.get_raw_message(seq).await.ok()?;
    let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
    mesh_protocol::dead_letter::DeadLetter::from_headers(header).map(|d| d.agent.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_report_down_back_and_new_dead_letters() {
        let view = |a: bool, b: bool, dl: u64| FleetView {
            up: [("a".to_owned(), a), ("b".to_owned(), b)].into(),
            dead_letters: dl,
        };
        let texts = |before, after| changes(&before, &after).into_iter().map(|(e, _)| e.text).collect::<Vec<_>>();
        assert!(texts(view(true, true, 0), view(true, true, 0)).is_empty());
        assert_eq!(
            texts(view(true, false, 0), view(false, true, 2)),
            [
                "agent a is down (no pong or gateway failing)",
                "agent b is back",
                "2 new dead letters (2 stored); see `dlq`"
            ]
        );
    }
}
