//! The `mesh` command line, chat bot server and local stack.
//!
//! The leaves on `mesh-engine`: the terminal, Slack and Discord front ends,
//! the bot server, Docker through bollard, and the local demo. Every command
//! runs through [`engine::Engine`]; this crate only maps platform input to
//! commands and renders the replies.
//!
//! # Layout
//!
//! - [`cli`]: the `mesh` command line (flags to typed commands; `--json`).
//! - [`config`]: what `mesh` reads from the environment, once, at start.
//! - [`server`]: `mesh bot`, the chat bot server.
//! - [`web`]: the web console `mesh bot` serves (`MESH_WEB_USERS`).
//! - [`slack`]: the Slack front end. [`discord`]: the Discord front end.
//! - [`docker`]: `docker::DockerHost`, the engine's containers through bollard.
//! - [`expiry`]: confirmation prompts edited to "expired" when their window passes.
//! - [`helpers`]: `mesh deploy probe` and `mesh deploy demo-gateway`.
//! - [`kill_gauge`]: the kill switch in force as gauges on the bot's `/metrics`.
//! - [`local_nats`]: a `nats-server` child process (the demo, and the test harness).
//! - [`demo`]: `mesh up --demo`; [`demo_gateway`]: a gateway that prints what it receives.
//! - Re-exported from `mesh-engine` under their old paths: [`command`],
//!   [`engine`], [`mesh`], [`containers`], [`publish`], [`ping`], [`killswitch`],
//!   [`dlq`], [`audit`], [`events`], [`notify`], [`maintenance`], [`backup`],
//!   [`agents`], [`deploy`], [`limits`], [`provision`].

pub mod cli;
pub mod config;
pub mod demo;
pub mod demo_gateway;
pub mod discord;
pub mod docker;
pub mod expiry;
pub mod helpers;
pub mod kill_gauge;
pub mod local_nats;
pub mod mcp_stdio;
pub mod server;
pub mod slack;
pub mod web;

// The engine crate's modules, under their old paths (`mesh_bot::engine`, `crate::command`, ...).
pub use mesh_engine::{
    agents, audit, backlog, backup, command, containers, deploy, dlq, engine, events, killswitch, limits, maintenance,
    mesh, notify, ping, provision, publish,
};
