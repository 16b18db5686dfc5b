//! `mesh maintenance <duration> [message]`: the runbook's maintenance window
//! as one command. Announce, wait the lead time, soft-pause the mesh for the
//! duration, resume, ping the fleet, and announce that the mesh is back with
//! the ping result. Each step is printed and sent to the chat channels.
//!
//! A window acts as an admin at most: it needs the role `kill soft` needs,
//! and it never replaces a hard or nuclear kill (its end would lift it). It
//! refuses to start while one is in force for the whole mesh, and at its end
//! it releases only its own entry: a kill pulled during the window stays.

use std::time::Duration;

use async_nats::jetstream;
use mesh_protocol::event::{Event, EventKind};
use mesh_protocol::killswitch::{Mode, Scope};
use mesh_protocol::{Priority, Registry};

use crate::command::{CommandKind, Role};
use crate::killswitch::{Actor, KillSwitch};
use crate::{events, ping, publish};

/// Default time between the announcement and the pause.
pub const DEFAULT_LEAD: Duration = Duration::from_secs(5 * 60);

/// A maintenance window.
#[derive(Debug, Clone)]
pub struct Window {
    /// How long the mesh is paused.
    pub duration: Duration,
    /// Time between the announcement and the pause.
    pub lead: Duration,
    /// What the maintenance is for.
    pub message: Option<String>,
    /// Who runs it.
    pub by: String,
    /// The role they act with.
    pub role: Option<Role>,
}

/// What the window did, step by step.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// One line per step.
    pub steps: Vec<String>,
    /// Active agents that did not answer the final ping.
    pub missing: usize,
    /// The ids of the two announcements.
    pub message_ids: Vec<String>,
}

/// The announcement texts (pure).
pub fn announcements(window: &Window, answered: usize, active: usize) -> (String, String) {
    let what = window.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
    let start = format!(
        "maintenance in {}{what}; the mesh pauses for {}",
        crate::command::grammar::format_duration(window.lead),
        crate::command::grammar::format_duration(window.duration)
    );
    let end = format!("mesh is active again ({answered}/{active} agents answered the health check)");
    (start, end)
}

/// Why a maintenance window did not run, or did not end as planned.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    /// The streams could not be ensured.
    #[error(transparent)]
    Nats(#[from] mesh_runtime::nats::NatsError),
    /// The kill switch could not be read or written.
    #[error(transparent)]
    KillSwitch(#[from] crate::killswitch::KillSwitchError),
    /// An announcement was not sent.
    #[error(transparent)]
    Send(#[from] publish::SendError),
    /// The health check after the window failed.
    #[error(transparent)]
    Ping(#[from] ping::PingError),
    /// The role may not pull a soft kill.
    #[error("\"maintenance\" needs the {needed} role; you have {}", have.map_or("no role", Role::as_str))]
    Role {
        /// The role needed.
        needed: Role,
        /// The role of whoever asked.
        have: Option<Role>,
    },
    /// A hard or nuclear kill is in force.
    #[error(
        "{} is in force; a maintenance window would end it, so a director resumes it first (mesh resume)",
        crate::killswitch::describe(&Scope::Global, state)
    )]
    Held {
        /// The entry in force.
        state: Box<mesh_protocol::killswitch::KillState>,
    },
    /// The pause was replaced during the window, so it was not lifted.
    #[error("not resumed: {}", crate::killswitch::describe(&Scope::Global, held))]
    NotResumed {
        /// The entry that replaced the window's pause.
        held: Box<mesh_protocol::killswitch::KillState>,
    },
}

/// Runs the window; `progress` sees each step as it happens.
pub async fn run(
    client: &async_nats::Client,
    replicas: mesh_protocol::layout::Replicas,
    registry: &Registry,
    window: &Window,
    mut progress: impl FnMut(&str),
) -> Result<Report, MaintenanceError> {
    let js = jetstream::new(client.clone());
    mesh_runtime::nats::ensure_streams(&js, replicas).await?;
    let switch = KillSwitch::open_with(&js, replicas).await?;
    let needed = CommandKind::KillSoft.spec().access.required(None);
    if window.role < needed {
        return Err(MaintenanceError::Role { needed: needed.unwrap_or(Role::Admin), have: window.role });
    }
    // At most admin: a window may replace a soft pause, never a hard or nuclear kill.
    let actor = Actor::new(&window.by, window.role.min(Some(Role::Admin)));
    if let Some(state) = switch.get(&Scope::Global).await?
        && state.in_force(time::OffsetDateTime::now_utc())
        && state.mode != Mode::Soft
    {
        return Err(MaintenanceError::Held { state: Box::new(state) });
    }
    let mut report = Report::default();
    let mut step = |report: &mut Report, line: String| {
        progress(&line);
        report.steps.push(line);
    };
    let (start, _) = announcements(window, 0, 0);
    let receipt = publish::broadcast(&js, registry, &window.by, &start, Priority::High).await?;
    report.message_ids.push(receipt.id.to_string());
    events::publish(&js, &Event::now(EventKind::Maintenance, start.clone())).await;
    step(&mut report, format!("announced to {} agents: {start}", receipt.recipients));
    tokio::time::sleep(window.lead).await;
    let reason = Some(window.message.clone().unwrap_or_else(|| "maintenance".into()));
    let written = switch.pull_revision(&Scope::Global, Mode::Soft, Some(window.duration), actor, reason).await?;
    let (state, revision) = (&written.state, written.revision);
    step(&mut report, format!("paused: {}", crate::killswitch::describe(&Scope::Global, state)));
    if let Some(warning) = written.server {
        step(&mut report, format!("warning: {warning}"));
    }
    tokio::time::sleep(window.duration).await;
    match switch.release_written(&Scope::Global, &window.by, revision).await? {
        None => step(&mut report, "resumed".to_owned()),
        Some(held) => {
            let error = MaintenanceError::NotResumed { held: Box::new(held) };
            step(&mut report, format!("{error} (pulled during the window)"));
            return Err(error);
        }
    }
    let pinged = ping::ping(client, registry, ping::DEFAULT_TIMEOUT).await?;
    let active = registry.active().count();
    let answered = pinged.rows.iter().filter(|r| r.rtt_ms.is_some()).count();
    report.missing = pinged.missing;
    let (_, end) = announcements(window, answered, active);
    let receipt = publish::broadcast(&js, registry, &window.by, &end, Priority::Normal).await?;
    report.message_ids.push(receipt.id.to_string());
    events::publish(&js, &Event::now(EventKind::Maintenance, end.clone())).await;
    step(&mut report, format!("announced: {end}"));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_say_when_for_how_long_and_the_result() {
        let window = Window {
            duration: Duration::from_secs(600),
            lead: DEFAULT_LEAD,
            message: Some("database upgrade".into()),
            by: "cli:ops".into(),
            role: Some(Role::Admin),
        };
        let (start, end) = announcements(&window, 11, 12);
        assert_eq!(start, "maintenance in 5m: database upgrade; the mesh pauses for 10m");
        assert_eq!(end, "mesh is active again (11/12 agents answered the health check)");
    }
}
