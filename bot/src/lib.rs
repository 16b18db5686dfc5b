//! The `mesh` command line, chat bot server and local stack.
//!
//! # Layout
//!
//! - [`publish`]: sending and broadcasting into the mesh, validated against the registry.
//! - [`local_nats`]: a `nats-server` child process (the embedded default, and the test harness).
//! - [`demo`]: `mesh up --demo`: local NATS, demo gateways, listeners, one command.
//! - [`demo_gateway`]: a tiny gateway that prints what it receives.
//! - [`cli`]: the `mesh` command line.

pub mod cli;
pub mod demo;
pub mod demo_gateway;
pub mod local_nats;
pub mod publish;
