//! `mesh ping`: one ping on `mesh.health.ping`, pongs gathered until every
//! active agent answered or the timeout ran out, one row per registry agent.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mesh_protocol::health::{GatewayHealth, Pong};
use mesh_protocol::subject::Subject;
use mesh_protocol::{AgentId, Registry};
use serde::Serialize;

/// Default time to wait for pongs.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// One agent's row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PingRow {
    /// The agent.
    pub agent: String,
    /// `ok`, `no answer`, `gateway down`, `gateway unknown`, `paused`, `inactive`.
    pub state: &'static str,
    /// Round trip in milliseconds, when it answered.
    pub rtt_ms: Option<u64>,
    /// Messages waiting, when it answered.
    pub pending: Option<u64>,
}

/// The result of one ping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PingReport {
    /// One row per registry agent, by id.
    pub rows: Vec<PingRow>,
    /// Active agents that did not answer.
    pub missing: usize,
    /// Time until the last pong (or the timeout), in milliseconds.
    pub elapsed_ms: u64,
}

impl PingReport {
    /// Builds the report from the pongs received (with their round trips).
    pub fn build(registry: &Registry, pongs: &BTreeMap<AgentId, (Pong, Duration)>, elapsed: Duration) -> Self {
        let rows: Vec<PingRow> = registry
            .agents()
            .map(|agent| {
                let answered = pongs.get(&agent.id);
                let state = match (agent.is_active(), answered) {
                    (false, _) => "inactive",
                    (true, None) => "no answer",
                    (true, Some((pong, _))) if pong.paused => "paused",
                    (true, Some((pong, _))) => match pong.gateway {
                        GatewayHealth::Ok => "ok",
                        GatewayHealth::Down => "gateway down",
                        GatewayHealth::Unknown => "gateway unknown",
                    },
                };
                PingRow {
                    agent: agent.id.to_string(),
                    state,
                    rtt_ms: answered.map(|(_, rtt)| rtt.as_millis() as u64),
                    pending: answered.map(|(pong, _)| pong.pending),
                }
            })
            .collect();
        let missing = rows.iter().filter(|r| r.state == "no answer").count();
        Self { rows, missing, elapsed_ms: elapsed.as_millis() as u64 }
    }

    /// Plain-text table.
    pub fn render_text(&self) -> String {
        let mut out = format!("{:<32} {:<16} {:>8} {:>8}\n", "AGENT", "STATE", "RTT ms", "PENDING");
        for row in &self.rows {
            let rtt = row.rtt_ms.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
            let pending = row.pending.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
            out.push_str(&format!("{:<32} {:<16} {:>8} {:>8}\n", row.agent, row.state, rtt, pending));
        }
        let answered = self.rows.iter().filter(|r| r.rtt_ms.is_some()).count();
        out.push_str(&format!(
            "{answered} answered, {} active agents missing ({} ms)\n",
            self.missing, self.elapsed_ms
        ));
        out
    }
}

/// Why the fleet could not be pinged.
#[derive(Debug, thiserror::Error)]
pub enum PingError {
    /// No subscription for the pongs.
    #[error("cannot subscribe for pongs: {0}")]
    Subscribe(#[source] async_nats::SubscribeError),
    /// The ping was not published.
    #[error("cannot publish the ping: {0}")]
    Publish(#[source] async_nats::PublishError),
    /// The ping was not flushed to the server.
    #[error("cannot publish the ping: {0}")]
    Flush(#[source] async_nats::client::FlushError),
}

/// Pings the fleet and gathers pongs until every active agent answered or `timeout`.
pub async fn ping(
    client: &async_nats::Client,
    registry: &Registry,
    timeout: Duration,
) -> Result<PingReport, PingError> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.map_err(PingError::Subscribe)?;
    let started = Instant::now();
    client
        .publish_with_reply(Subject::HealthPing.to_string(), inbox, bytes::Bytes::new())
        .await
        .map_err(PingError::Publish)?;
    client.flush().await.map_err(PingError::Flush)?;
    let expected = registry.active().count();
    let mut pongs = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while pongs.len() < expected {
        let Ok(Some(message)) = tokio::time::timeout_at(deadline, replies.next()).await else { break };
        let rtt = started.elapsed();
        for pong in Pong::decode_any(&message.payload).unwrap_or_default() {
            if registry.get(&pong.agent).is_some() {
                pongs.entry(pong.agent.clone()).or_insert((pong, rtt));
            }
        }
    }
    Ok(PingReport::build(registry, &pongs, started.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_cover_every_registry_agent() {
        let registry = Registry::parse(
            r#"{"a": {"hooks_token": "t", "hooks_url": "http://h/"},
                "b": {"hooks_token": "t", "hooks_url": "http://h/"},
                "c": {"hooks_token": "t", "hooks_url": "http://h/"},
                "d": {"hooks_token": "t", "hooks_url": "http://h/", "status": "inactive"}}"#,
        )
        .unwrap();
        let pong = |agent: &str, gateway, paused| Pong {
            agent: agent.parse().unwrap(),
            version: "0".into(),
            uptime_s: 1,
            gateway,
            pending: 3,
            paused,
            consecutive_failures: 0,
        };
        let mut pongs = BTreeMap::new();
        pongs.insert("a".parse().unwrap(), (pong("a", GatewayHealth::Ok, false), Duration::from_millis(4)));
        pongs.insert("b".parse().unwrap(), (pong("b", GatewayHealth::Down, false), Duration::from_millis(5)));
        let report = PingReport::build(&registry, &pongs, Duration::from_millis(2000));
        let states: Vec<_> = report.rows.iter().map(|r| (r.agent.as_str(), r.state)).collect();
        assert_eq!(states, [("a", "ok"), ("b", "gateway down"), ("c", "no answer"), ("d", "inactive")]);
        assert_eq!(report.missing, 1);
        let text = report.render_text();
        assert!(text.contains("2 answered, 1 active agents missing (2000 ms)"), "{text}");
    }
}
