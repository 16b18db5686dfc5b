//! The `mesh` command line, chat bot server and local stack.
//!
//! # Layout
//!
//! - [`command`]: the pure command core: grammar, permissions, confirmations, replies and renderers.
//! - [`publish`]: sending and broadcasting into the mesh, validated against the registry.
//! - [`local_nats`]: a `nats-server` child process (the embedded default, and the test harness).
//! - [`demo`]: `mesh up --demo`: local NATS, demo gateways, listeners, one command.
//! - [`demo_gateway`]: a tiny gateway that prints what it receives.
//! - [`ping`]: `mesh ping`, the fleet health check.
//! - [`dlq`]: listing and replaying dead letters.
//! - [`engine`]: runs a parsed command against the mesh (one core for every front end).
//! - [`audit`]: the audit trail. [`killswitch`]: pulling and releasing the switch.
//! - [`limits`]: rate limits per user and command class, and retry dedup (memory or Redis).
//! - [`maintenance`]: the maintenance window as one command.
//! - [`events`]: mesh events and the fleet monitor.
//! - [`server`]: `mesh bot`, the chat bot server; [`slack`]: the Slack front end.
//! - [`discord`]: the Discord front end (interactions, gateway messages, notifications).
//! - [`mesh`]: the [`mesh::Mesh`] trait the engine reaches the mesh through, and its NATS implementation.
//! - [`containers`]: the [`containers::Containers`] trait the engine reaches Docker through.
//! - [`docker`]: the deployed mesh's containers through bollard (status, restart, hard kill, nuclear).
//! - [`agents`]: agent lifecycle (`mesh agents list|add|remove|rotate`), atomic registry edits.
//! - [`backup`]: `mesh backup` / `mesh restore` (registry, stream messages, consumer positions, kill switch).
//! - [`deploy`]: `mesh deploy render|probe|demo-gateway`: nats.conf, listener services, health probe.
//! - [`cli`]: the `mesh` command line.

pub mod agents;
pub mod audit;
pub mod backup;
pub mod cli;
pub mod command;
pub mod containers;
pub mod demo;
pub mod demo_gateway;
pub mod deploy;
pub mod discord;
pub mod dlq;
pub mod docker;
pub mod engine;
pub mod events;
pub mod killswitch;
pub mod limits;
pub mod local_nats;
pub mod maintenance;
pub mod mesh;
pub mod notify;
pub mod ping;
pub mod publish;
pub mod server;
pub mod slack;
