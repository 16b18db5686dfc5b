//! Publishing mesh events and watching the fleet for the ones nobody
//! publishes: agents that stop answering pings (and come back), and dead
//! letters piling up.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;
use mesh_protocol::event::{Event, EventKind};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

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

/// What the fleet monitor compares between rounds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FleetView {
    /// Agent id to "up" (answered with a healthy gateway) or not.
    pub up: BTreeMap<String, bool>,
    /// Dead letters stored.
    pub dead_letters: u64,
}

/// The events between two views of the fleet. Pure.
pub fn changes(before: &FleetView, after: &FleetView) -> Vec<Event> {
    let mut out = Vec::new();
    for (agent, up) in &after.up {
        match (before.up.get(agent), up) {
            (Some(true), false) => {
                out.push(Event::now(EventKind::Agent, format!("agent {agent} is down (no pong or gateway failing)")))
            }
            (Some(false), true) => out.push(Event::now(EventKind::Agent, format!("agent {agent} is back"))),
            _ => {}
        }
    }
    if after.dead_letters > before.dead_letters {
        let new = after.dead_letters - before.dead_letters;
        out.push(Event::now(
            EventKind::Dlq,
            format!("{new} new dead letters ({} stored); see `dlq`", after.dead_letters),
        ));
    }
    out
}

/// Pings the fleet every `every` and publishes what changed, until `stop`.
pub async fn monitor(
    client: async_nats::Client,
    registry_path: PathBuf,
    allowed_hosts: mesh_protocol::registry::HostAllowList,
    every: Duration,
    stop: CancellationToken,
) {
    let js = jetstream::new(client.clone());
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
        let dead_letters = match js.get_stream(mesh_protocol::layout::dead_letter_stream(1).name).await {
            Ok(mut stream) => stream.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        };
        let now = FleetView { up, dead_letters };
        if let Some(before) = &before {
            for event in changes(before, &now) {
                debug!(text = %event.text, "fleet event");
                publish(&js, &event).await;
            }
        }
        before = Some(now);
    }
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
        let texts = |before, after| changes(&before, &after).into_iter().map(|e| e.text).collect::<Vec<_>>();
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
