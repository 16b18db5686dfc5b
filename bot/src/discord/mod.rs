//! The Discord front end: the `/mesh` application command over HTTP
//! interactions, `!mesh` message commands over the gateway, the REST API for
//! answers and channel posts, and the notifications relay.
//!
//! - [`verify`]: Ed25519 request signatures.
//! - [`interactions`]: `POST /discord/interactions` (PING, deferred answers, `@original` edits).
//! - [`messages`]: a gateway [`serenity::model::channel::Message`] into a command, and its answer.
//! - [`gateway`]: the serenity gateway client.
//! - [`api`]: Discord's REST API (configurable base URL, spaced under the global limit).

pub mod api;
pub mod gateway;
pub mod interactions;
pub mod messages;
pub mod verify;
