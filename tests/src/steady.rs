//! A steady publisher of numbered messages with unique ids that retries a
//! failed publish with the same `Nats-Msg-Id` and counts only what JetStream
//! acked, and the tally that checks every acked message reached its gateway.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mesh_protocol::health::Pong;
use mesh_protocol::subject::Subject;
use mesh_protocol::{AgentId, Envelope, Recipient};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::gateway::RecordingGateway;

/// How long one message's publish is retried before it counts as not acked.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(30);
/// Wait between retries of a failed publish.
const RETRY_DELAY: Duration = Duration::from_millis(100);

/// What the publisher did.
#[derive(Debug, Clone, Default)]
pub struct PublishLog {
    /// Per message number: whether JetStream acked it.
    pub acked: Vec<bool>,
    /// Publish attempts that failed (then retried with the same id).
    pub failed_attempts: usize,
    /// Acks that said "duplicate": an earlier, failed-looking attempt had been stored.
    pub duplicate_acks: usize,
}

impl PublishLog {
    /// Messages published (attempted).
    pub fn published(&self) -> usize {
        self.acked.len()
    }

    /// Messages acked.
    pub fn acked_count(&self) -> usize {
        self.acked.iter().filter(|a| **a).count()
    }
}

/// A running publisher: message `n` goes to `agents[n % agents.len()]` with
/// text `"<prefix> #<n>"`.
#[derive(Debug)]
pub struct SteadyPublisher {
    stop: CancellationToken,
    join: tokio::task::JoinHandle<PublishLog>,
    /// Number of acked messages so far.
    pub acked: watch::Receiver<usize>,
}

impl SteadyPublisher {
    /// Creates the agents' consumers (as any sender does before publishing),
    /// then publishes one message every `every`, each retried until acked or
    /// [`GIVE_UP_AFTER`].
    pub async fn start(
        js: async_nats::jetstream::Context,
        agents: Vec<AgentId>,
        prefix: &str,
        every: Duration,
    ) -> Self {
        for agent in &agents {
            mesh_listener::nats::ensure_consumer(&js, agent, Default::default())
                .await
                .expect("creating the agent's consumer");
        }
        let stop = CancellationToken::new();
        let (acked_tx, acked) = watch::channel(0);
        let prefix = prefix.to_owned();
        let token = stop.clone();
        let join = tokio::spawn(async move {
            let mut log = PublishLog::default();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !token.is_cancelled() {
                tick.tick().await;
                let n = log.acked.len();
                let agent = agents[n % agents.len()].clone();
                let envelope = Envelope::new("steady", Recipient::Agent(agent), format!("{prefix} #{n}"))
                    .expect("a valid envelope");
                let started = Instant::now();
                let ok = loop {
                    match mesh_bot::publish::publish(&js, &envelope).await {
                        Ok((_, duplicate)) => {
                            log.duplicate_acks += usize::from(duplicate);
                            break true;
                        }
                        Err(_) if started.elapsed() < GIVE_UP_AFTER => {
                            log.failed_attempts += 1;
                            tokio::time::sleep(RETRY_DELAY).await;
                        }
                        Err(_) => break false,
                    }
                };
                log.acked.push(ok);
                if ok {
                    acked_tx.send_modify(|c| *c += 1);
                }
            }
            log
        });
        Self { stop, join, acked }
    }

    /// Waits until at least `n` messages were acked; panics after `timeout`.
    pub async fn wait_acked(&mut self, n: usize, timeout: Duration) {
        let reached = tokio::time::timeout(timeout, self.acked.wait_for(|c| *c >= n)).await.is_ok();
        assert!(reached, "{} of {n} publishes acked within {timeout:?}", *self.acked.borrow());
    }

    /// Stops after the message in progress and returns the log.
    pub async fn stop(self) -> PublishLog {
        self.stop.cancel();
        self.join.await.expect("publisher task")
    }
}

/// The number in a delivered text `"... <prefix> #<n>"`.
pub fn message_number(text: &str, prefix: &str) -> Option<usize> {
    let marker = format!("{prefix} #");
    let at = text.rfind(&marker)?;
    text[at + marker.len()..].trim().parse().ok()
}

/// Acked versus delivered.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Acked messages no gateway received.
    pub lost: Vec<usize>,
    /// Messages received more than once, with the count.
    pub duplicates: BTreeMap<usize, usize>,
    /// Distinct messages delivered.
    pub delivered: usize,
    /// Deliveries (2xx answered), duplicates included.
    pub deliveries: usize,
    /// Messages whose publish never got an ack but that were delivered anyway.
    pub delivered_unacked: usize,
    /// Messages received by the wrong agent's gateway.
    pub misrouted: Vec<usize>,
}

impl Tally {
    /// Counts what `gateways[i]` (agent `i`) received against the log.
    pub fn count(log: &PublishLog, gateways: &[&RecordingGateway], prefix: &str) -> Self {
        let mut seen = vec![0usize; log.acked.len()];
        let mut tally = Self::default();
        for (index, gateway) in gateways.iter().enumerate() {
            for request in gateway.successes() {
                let Some(n) = message_number(request.text(), prefix) else { continue };
                if n >= seen.len() {
                    seen.resize(n + 1, 0);
                }
                seen[n] += 1;
                tally.deliveries += 1;
                if n % gateways.len() != index {
                    tally.misrouted.push(n);
                }
            }
        }
        for (n, count) in seen.iter().enumerate() {
            let acked = log.acked.get(n).copied().unwrap_or(false);
            match count {
                0 if acked => tally.lost.push(n),
                0 => {}
                c => {
                    tally.delivered += 1;
                    if !acked {
                        tally.delivered_unacked += 1;
                    }
                    if *c > 1 {
                        tally.duplicates.insert(n, *c);
                    }
                }
            }
        }
        tally
    }

    /// Waits until no acked message is missing (polling, bounded); returns the last tally.
    pub async fn wait_complete(
        log: &PublishLog,
        gateways: &[&RecordingGateway],
        prefix: &str,
        timeout: Duration,
    ) -> Self {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let tally = Self::count(log, gateways, prefix);
            if tally.lost.is_empty() || tokio::time::Instant::now() > deadline {
                return tally;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Pings the listeners and returns each answering agent's `paused` flag
/// (collected until every agent in `agents` answered, or `timeout`).
pub async fn paused_flags(
    client: &async_nats::Client,
    agents: &[AgentId],
    timeout: Duration,
) -> BTreeMap<AgentId, bool> {
    let mut flags = BTreeMap::new();
    let inbox = client.new_inbox();
    let Ok(mut replies) = client.subscribe(inbox.clone()).await else { return flags };
    if client.publish_with_reply(Subject::HealthPing.to_string(), inbox, bytes::Bytes::new()).await.is_err() {
        return flags;
    }
    let deadline = tokio::time::Instant::now() + timeout;
    while flags.len() < agents.len() {
        let Ok(Some(message)) = tokio::time::timeout_at(deadline, replies.next()).await else { break };
        for pong in Pong::decode_any(&message.payload).unwrap_or_default() {
            if agents.contains(&pong.agent) {
                flags.insert(pong.agent, pong.paused);
            }
        }
    }
    flags
}

/// A small seeded generator (xorshift64) so a chaos schedule can be replayed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n.max(1)
    }

    /// A duration between `min` and `max` milliseconds.
    pub fn millis(&mut self, min: u64, max: u64) -> Duration {
        Duration::from_millis(min + self.below(max.saturating_sub(min) + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_back_from_the_wake_text() {
        assert_eq!(message_number("[mesh] Message from steady: chaos #42", "chaos"), Some(42));
        assert_eq!(message_number("chaos #7", "chaos"), Some(7));
        assert_eq!(message_number("other #7", "chaos"), None);
        assert_eq!(message_number("chaos #x", "chaos"), None);
    }
}
