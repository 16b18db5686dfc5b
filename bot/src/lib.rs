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
//! - [`cli`]: the `mesh` command line.

pub mod cli;
pub mod command;
pub mod demo;
pub mod demo_gateway;
pub mod dlq;
pub mod local_nats;
pub mod ping;
pub mod publish;
