//! The process and NATS plumbing the bot and the listeners share: connecting
//! (credentials, clusters, fail-fast or forever), creating the streams,
//! consumers and the kill switch bucket of [`mesh_protocol::layout`], the
//! registry file and token references on disk, shutdown signals and logging.
//! No chat SDK, no HTTP server, no Docker client.
//!
//! # Layout
//!
//! - [`config`]: the settings read from the environment, once, at start
//!   (NATS credentials, replicas, the hooks host allow-list, the log format).
//! - [`nats`]: connect, streams, consumers, replicas; [`backoff`]: retrying
//!   JetStream calls that fail only for a moment.
//! - [`kill_bucket`]: the kill switch bucket; [`server_pause`]: the kill
//!   switch enforced by nats-server (consumer pause, NATS 2.11+).
//! - [`lookup`] and [`layout_check`] (pure): the read-only look at the
//!   streams, the bucket and a consumer, checked against `protocol::layout`
//!   (the listener at start, the bot before it provisions).
//! - [`registry_file`] and [`secrets`]: the I/O half of the registry.
//! - [`shutdown`] and [`logging`]: process plumbing.

pub mod backoff;
pub mod config;
pub mod error_text;
pub mod kill_bucket;
pub mod layout_check;
pub mod logging;
pub mod lookup;
pub mod nats;
pub mod registry_file;
pub mod secrets;
pub mod server_pause;
pub mod shutdown;
