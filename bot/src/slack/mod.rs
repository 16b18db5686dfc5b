//! The Slack front end: slash commands over HTTP, the Web API for channel
//! posts, and the notifications relay.
//!
//! - [`verify`]: `v0` request signatures.
//! - [`api`]: `response_url` follow-ups and `chat.postMessage`.
//! - [`commands`]: `POST /slack/commands`.
//! - [`interactions`]: `POST /slack/interactions`, button clicks (`block_actions`).
//! - [`socket`]: Socket Mode, slash commands and clicks over a WebSocket (`SLACK_APP_TOKEN`).

pub mod api;
pub mod commands;
pub mod interactions;
pub mod socket;
pub mod verify;
