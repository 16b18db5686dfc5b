//! Listener settings: defaults, then environment, then flags, validated once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_protocol::AgentId;
use mesh_protocol::layout::{ConsumerTuning, Replicas};

use crate::policy::RetryPolicy;

/// Which agents this process serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// One agent.
    One(AgentId),
    /// Every active agent of the registry, following registry changes.
    All,
}

/// Everything a listener process needs, validated.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// NATS server URL(s), comma separated.
    pub nats_url: String,
    /// Path of `tokens.json`.
    pub registry_path: PathBuf,
    /// Which agents to serve.
    pub selection: Selection,
    /// Deliveries in flight per agent; 1 keeps order.
    pub concurrency: usize,
    /// The prefetch window at concurrency 1 that [`ListenerConfig::tuning`]
    /// asks for (the registry's `prefetch`; the listener runs with its consumer's).
    pub prefetch: u16,
    /// Per-request gateway timeout.
    pub request_timeout: Duration,
    /// Ack wait of the consumers.
    pub ack_wait: Duration,
    /// Retry limits.
    pub retry: RetryPolicy,
    /// Chat replies stop after this many hops (loop guard).
    pub max_hops: u8,
    /// Stream replicas: auto (3 on a cluster, else 1) or a number.
    pub replicas: Replicas,
    /// How often the registry file is checked for changes.
    pub registry_poll: Duration,
    /// A PEM file of CA certificates trusted for `https://` gateways besides
    /// the system's roots (`MESH_GATEWAY_CA_FILE`: a private CA, a self-signed gateway).
    pub gateway_ca_file: Option<PathBuf>,
    /// Where `/health` and `/metrics` are served, if anywhere.
    pub http_addr: Option<SocketAddr>,
    /// Longest wait for in-flight deliveries at shutdown; `None`: the request
    /// timeout plus [`SHUTDOWN_MARGIN`], so a delivery started just before the
    /// stop can still finish and be acked (see [`ListenerConfig::shutdown_grace`]).
    pub shutdown_grace: Option<Duration>,
    /// Roles of the agents that send through `/v1/messages` (`MESH_PERMISSIONS`;
    /// agents with no grant get the file's `"agent"` role, operator by default).
    pub permissions: mesh_engine::command::Permissions,
    /// The permissions file (`MESH_PERMISSIONS`): when set, it replaces
    /// `permissions`, is read at start (unusable: the listener does not start)
    /// and re-read on every registry poll (unusable: agents' commands are refused).
    pub permissions_file: Option<PathBuf>,
    /// Rate limits of those agents, per agent, in this process.
    pub agent_limits: mesh_engine::limits::RateLimits,
    /// NATS credentials and inbox prefix (from the environment, read at start).
    pub nats_auth: mesh_runtime::config::NatsAuth,
    /// The hosts the registry's URLs may point at (`MESH_HOOKS_ALLOWED_HOSTS`; empty: any).
    pub allowed_hosts: mesh_protocol::registry::HostAllowList,
}

/// Added to the request timeout for the default shutdown grace: time to ack
/// (or dead-letter) a delivery whose request ended at the timeout.
pub const SHUTDOWN_MARGIN: Duration = Duration::from_secs(5);

/// Default hop limit of chat replies.
pub const DEFAULT_MAX_HOPS: u8 = 4;

impl ListenerConfig {
    /// Defaults for one selection.
    pub fn new(nats_url: impl Into<String>, registry_path: impl Into<PathBuf>, selection: Selection) -> Self {
        Self {
            nats_url: nats_url.into(),
            registry_path: registry_path.into(),
            selection,
            concurrency: 1,
            prefetch: mesh_protocol::layout::DEFAULT_PREFETCH,
            request_timeout: Duration::from_secs(30),
            ack_wait: ConsumerTuning::default().ack_wait,
            retry: RetryPolicy::default(),
            max_hops: DEFAULT_MAX_HOPS,
            replicas: Replicas::Auto,
            registry_poll: Duration::from_secs(2),
            gateway_ca_file: None,
            http_addr: None,
            shutdown_grace: None,
            permissions: mesh_engine::command::Permissions::new(),
            permissions_file: None,
            agent_limits: mesh_engine::limits::RateLimits::default(),
            nats_auth: mesh_runtime::config::NatsAuth::default(),
            allowed_hosts: mesh_protocol::registry::HostAllowList::default(),
        }
    }

    /// How long a stopping listener waits for in-flight deliveries.
    pub fn shutdown_grace(&self) -> Duration {
        self.shutdown_grace.unwrap_or(self.request_timeout + SHUTDOWN_MARGIN)
    }

    /// The consumer tuning these settings ask for (what a test harness playing
    /// the bot creates the consumer with; see [`ConsumerTuning::for_agent`]).
    /// The listener itself runs within its consumer's tuning.
    pub fn tuning(&self) -> ConsumerTuning {
        let concurrency = u16::try_from(self.concurrency).unwrap_or(mesh_protocol::layout::MAX_CONCURRENCY);
        ConsumerTuning { ack_wait: self.ack_wait, ..ConsumerTuning::for_agent(concurrency, self.prefetch) }
    }
}
