//! The mesh listener: consumes agents' JetStream subjects and forwards every
//! message to the agent's gateway, acking only what the gateway accepted.
//!
//! # Layout
//!
//! - [`config`]: validated listener settings (flags, env, defaults).
//! - [`secrets`] and [`registry_file`]: the I/O half of the registry (reading
//!   the file, resolving `env:` and `file:` tokens).
//! - [`hook`] (pure): which endpoint, headers and body a message becomes.
//! - [`policy`] (pure): what a gateway outcome (and a chat reply's fate)
//!   means: ack, retry later, or dead-letter.
//! - [`reply`] (pure): where a chat reply may go, and its envelope cut to fit.
//! - [`gateway`]: the HTTP call, behind the [`gateway::Gateway`] trait.
//! - [`delivery`]: one message, start to finish.
//! - [`consumer`]: one agent's pull loop; [`ordered`]: the in-order loop with a prefetch window.
//! - [`fleet`]: the agents of one process, registry reload, pause control.
//! - [`supervise`]: an agent loop that panics is reported and started again.
//! - [`killswitch`]: reading and following the kill switch bucket.
//! - [`state`]: live per-agent counters; [`ping`]: health pongs;
//!   [`http`]: `/health` and `/metrics`; [`metrics`]: metric names.
//! - [`agent_api`]: `POST /v1/messages`, agents sending through the engine
//!   with their `mesh_token`.
//! - [`mcp`]: the same as MCP tools (`/mcp`, Streamable HTTP, `rmcp`).
//! - [`permissions`]: the agents' permissions file, followed while running (fail closed).
//! - [`cli`]: the `mesh-listener` command line.
//! - [`nats`], [`lookup`], [`layout_check`], [`registry_file`], [`secrets`], [`shutdown`], [`logging`]:
//!   re-exported from `mesh-runtime`, the plumbing shared with the `mesh` binary.

pub mod agent_api;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod delivery;
pub mod fleet;
pub mod gateway;
pub mod hook;
pub mod http;
pub mod killswitch;
pub mod mcp;
pub mod metrics;
pub mod ordered;
pub mod permissions;
pub mod ping;
pub mod policy;
pub mod reply;
pub mod state;
pub mod supervise;

pub use mesh_runtime::{backoff, layout_check, logging, lookup, nats, registry_file, secrets, shutdown};

pub use config::ListenerConfig;
pub use fleet::{Control, PauseCommand, run, run_with};
