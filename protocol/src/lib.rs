//! The wire contract of the agent mesh: who can be addressed, on which subject,
//! with which bytes, and how the JetStream side is laid out. No I/O lives here.
//!
//! # Layout
//!
//! - [`agent_id`]: the validated [`AgentId`] every other type is keyed by.
//! - [`subject`]: every NATS subject the mesh uses, built in one place.
//! - [`envelope`]: the v1 message envelope and the decoder that also accepts
//!   legacy and plain-text bodies.
//! - [`registry`]: the `tokens.json` agent registry (old format plus mesh fields).
//! - [`secret`]: tokens that never show in `Debug` or `Display`, and references
//!   (`env:NAME`, `file:/path`) resolved by the caller.
//! - [`dead_letter`]: what a dead letter carries besides the original bytes.
//! - [`event`]: notifications for the chat channels.
//! - [`health`]: the pong a listener answers a health ping with.
//! - [`killswitch`]: the kill switch entries and which pause is in force.
//! - [`layout`]: streams and consumers described as plain data.
//! - [`access`]: NATS permissions of a listener and of the bot, derived from the two above.

pub mod access;
pub mod agent_id;
pub mod dead_letter;
pub mod envelope;
pub mod event;
pub mod health;
pub mod killswitch;
pub mod layout;
pub mod registry;
pub mod secret;
pub mod subject;

pub use agent_id::{AgentId, AgentIdError};
pub use envelope::{DecodeError, Envelope, EnvelopeError, Kind, Priority, Recipient};
pub use registry::{Agent, DeliveryMode, Registry, RegistryError, Status};
pub use secret::{Secret, SecretRef, SecretResolver};

/// Version of the mesh, reported in pongs and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
