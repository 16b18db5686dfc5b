//! Test harness of the agent mesh: a real `nats-server` on a free port with a
//! temporary store, recording gateways (real HTTP servers on port 0 with
//! scripted answers), temporary registries, and in-process listeners.
//!
//! # Layout
//!
//! - [`server`]: the nats-server under test.
//! - [`cluster`]: a three-node JetStream cluster under test (and the config
//!   `deploy/nats-cluster/` is rendered from).
//! - [`steady`]: a steady publisher that counts acks, and the delivery tally.
//! - [`gateway`]: the recording gateway.
//! - [`bench`]: the sink and helpers of the `mesh-bench` program; [`soak`]:
//!   its long run that samples a listener's memory.
//! - [`redis`]: the redis-server under test.
//! - [`discord_gateway`]: a fake Discord gateway (the WebSocket protocol serenity speaks).
//! - [`ports`]: processes under test on a free port, started again on another when it was taken.
//! - [`docker`]: a tiny local image and labelled test containers.
//! - [`bot`]: the `mesh bot` process under test (start, wait, logs, stop).
//! - [`browser`]: headless Chromium over WebDriver (chromedriver), with screenshots.
//! - [`fixtures`]: registries, in-process listeners, the binaries under test.
//! - [`secrets`]: the secret scan over everything the processes under test printed.
//! - [`tls`]: a throwaway CA and a server certificate for `localhost` (the `openssl` command), and a TLS listener.

pub mod bench;
pub mod bot;
pub mod browser;
pub mod cluster;
pub mod discord_gateway;
pub mod docker;
pub mod fixtures;
pub mod gateway;
pub mod oldstyle;
pub mod ports;
pub mod redis;
pub mod secrets;
pub mod server;
pub mod soak;
pub mod steady;
pub mod tls;

pub use cluster::TestCluster;
pub use fixtures::{Fixture, ListenerHandle};
pub use gateway::{Recorded, RecordingGateway};
pub use secrets::SecretScan;
pub use server::TestNats;
