//! Answers `mesh.health.ping` with one pong per agent of this process, and
//! keeps each agent's gateway health fresh (a `GET /health` at most every
//! [`HEALTH_MAX_AGE`], in the background, so pongs never wait for it).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use mesh_protocol::health::Pong;
use mesh_protocol::subject::Subject;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::gateway::Gateway;
use crate::state::FleetState;

/// Pongs batched into one message (well under NATS's max payload).
pub const PONGS_PER_MESSAGE: usize = 200;

/// Longest a gateway health result is reused.
pub const HEALTH_MAX_AGE: Duration = Duration::from_secs(15);

/// Gateway base URLs by agent, for health checks.
pub type GatewayUrls = Arc<std::sync::RwLock<std::collections::BTreeMap<mesh_protocol::AgentId, url::Url>>>;

/// Serves pings until `stop` is cancelled.
pub async fn respond<G: Gateway + Clone>(
    client: async_nats::Client,
    fleet: Arc<FleetState>,
    gateway: G,
    urls: GatewayUrls,
    stop: CancellationToken,
) {
    let mut pings = match client.subscribe(Subject::HealthPing.to_string()).await {
        Ok(sub) => sub,
        Err(e) => {
            warn!(error = %e, "cannot subscribe to health pings; pings go unanswered");
            return;
        }
    };
    loop {
        let ping = tokio::select! {
            _ = stop.cancelled() => break,
            ping = pings.next() => match ping { Some(ping) => ping, None => break },
        };
        let target = ping.reply.clone().map(|r| r.to_string()).unwrap_or_else(|| Subject::HealthPong.to_string());
        let uptime = fleet.started.elapsed();
        let agents = fleet.agents();
        // A process with many agents answers in a few batched messages, not one per agent.
        for chunk in agents.chunks(PONGS_PER_MESSAGE) {
            let pongs: Vec<_> = chunk.iter().map(|agent| agent.pong(uptime)).collect();
            let payload = if pongs.len() == 1 { pongs[0].encode() } else { Pong::encode_batch(&pongs) };
            if let Err(e) = client.publish(target.clone(), payload.into()).await {
                debug!(error = %e, "pong not sent");
            }
        }
        for agent in agents {
            if agent.health_check_due(HEALTH_MAX_AGE) {
                let url = urls.read().unwrap_or_else(|p| p.into_inner()).get(&agent.id).cloned();
                if let Some(url) = url {
                    let gateway = gateway.clone();
                    agent.mark_health_check_started();
                    tokio::spawn(async move {
                        let ok = gateway.health(url).await;
                        agent.record_health_check(ok);
                    });
                }
            }
        }
        let _ = client.flush().await;
    }
}
