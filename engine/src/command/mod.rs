//! The pure command core shared by Slack, Discord and the terminal: one grammar,
//! one permission check, confirmation codes for dangerous actions, and a
//! platform-neutral reply with one small renderer per platform. No I/O lives here.
//!
//! # Layout
//!
//! - [`table`]: every command's name, usage, summary, role and confirmation flag.
//! - [`grammar`]: [`Command`] and [`parse`], the one parser of a command line.
//! - [`help`]: the help reply, generated from the table.
//! - [`permission`]: roles, the identities mapped to them, and the check.
//! - [`confirm`]: one-time codes for `kill hard` and `kill nuclear`.
//! - [`button`]: the ids buttons carry (a pending code, or a fixed notification command).
//! - [`reply`]: the platform-neutral [`Reply`].
//! - [`render_text`]: a reply as plain terminal text.
//! - [`render_slack`]: a reply as Slack Block Kit JSON.
//! - [`render_discord`]: a reply as Discord embeds with no mentions allowed.

pub mod button;
pub mod confirm;
pub mod grammar;
pub mod help;
mod pack;
pub mod permission;
pub mod render_discord;
pub mod render_slack;
pub mod render_text;
pub mod reply;
pub mod table;

pub use button::ButtonId;
pub use confirm::{Challenge, ConfirmConfig, ConfirmError, Confirmations, Confirmer, Decision, PendingAction};
pub use grammar::{Command, KillGrade, ParseError, parse};
pub use permission::{Access, Denied, Identity, Permissions, PermissionsError, Principal, Role, is_web_name};
pub use reply::{Action, ActionStyle, Reply, Section, Tone};
pub use table::{COMMANDS, CommandKind, CommandSpec};
