//! The agent mesh's command core and engine: one road for every command from
//! every front end. A typed [`command::Command`] (parsed from a chat line, or
//! built from the terminal's flags) goes through [`engine::Engine`]: front end
//! check, permission, rate limit, confirmation, execution, audit, and a
//! platform-neutral reply. The engine reaches the mesh through [`mesh::Mesh`]
//! and Docker through [`containers::Containers`]; this crate links no chat SDK,
//! no HTTP server framework and no Docker client (Slack, Discord, the
//! terminal and bollard live in `mesh-bot`, leaves on this crate).
//!
//! # Layout
//!
//! - [`command`] (pure, no I/O): the command table, grammar, permissions,
//!   confirmations, the neutral reply and its renderers.
//! - [`engine`]: the pipeline. [`mesh`]: the mesh trait and its NATS
//!   implementation. [`containers`]: the containers trait.
//! - Mesh operations: [`publish`] (send, broadcast), [`ping`], [`killswitch`],
//!   [`dlq`], [`audit`], [`events`] (and the fleet monitor), [`backlog`]
//!   (messages about to age out undelivered), [`notify`] (the
//!   events relay chat front ends post through), [`maintenance`], [`backup`],
//!   [`provision`] (streams, the kill switch bucket and every active agent's
//!   consumer, which listeners may not create).
//! - Local operations: [`agents`] (registry edits), [`deploy`] (rendering the
//!   deployment, compose up).
//! - [`limits`]: rate limits and retry dedup (memory or Redis).
//! - [`thread`]: an agent's reply to a message: its hop count and the loop guard.

pub mod agents;
pub mod audit;
pub mod backlog;
pub mod backup;
pub mod command;
pub mod confirm_store;
pub mod containers;
pub mod deploy;
pub mod dlq;
pub mod engine;
pub mod events;
pub mod fleet_dedup;
pub mod killswitch;
pub mod limits;
pub mod maintenance;
pub mod mesh;
pub mod notify;
pub mod ping;
pub mod provision;
pub mod publish;
pub mod thread;

/// The layout this crate promises, checked on its own sources.
#[cfg(test)]
mod layout {
    /// The dependencies of this crate, as its manifest lists them.
    const MANIFEST: &str = include_str!("../Cargo.toml");

    #[test]
    fn no_chat_sdk_http_server_or_docker_client() {
        for forbidden in ["serenity", "slack-morphism", "axum", "hyper", "bollard", "mesh-listener", "mesh-bot"] {
            assert!(!MANIFEST.contains(forbidden), "mesh-engine must not depend on {forbidden}");
        }
    }

    /// The pure command core imports only from itself.
    #[test]
    fn the_command_core_imports_no_io_module() {
        let files = [
            include_str!("command/mod.rs"),
            include_str!("command/table.rs"),
            include_str!("command/grammar.rs"),
            include_str!("command/help.rs"),
            include_str!("command/permission.rs"),
            include_str!("command/confirm.rs"),
            include_str!("command/button.rs"),
            include_str!("command/reply.rs"),
            include_str!("command/pack.rs"),
            include_str!("command/render_text.rs"),
            include_str!("command/render_slack.rs"),
            include_str!("command/render_discord.rs"),
        ];
        for (i, text) in files.iter().enumerate() {
            for (n, line) in text.lines().enumerate() {
                let outside = line.match_indices("crate::").any(|(at, _)| !line[at..].starts_with("crate::command"));
                assert!(!outside, "command file #{i} line {}: {line}", n + 1);
                for io in ["tokio::", "async_nats", "std::fs", "std::net", "std::env"] {
                    assert!(!line.contains(io), "command file #{i} line {}: {line}", n + 1);
                }
            }
        }
    }
}
