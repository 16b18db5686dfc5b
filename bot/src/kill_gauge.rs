//! The kill switch as Prometheus gauges on the bot's `/metrics`, so alert
//! rules can tell a kill in force (listeners stopped on purpose, agents
//! paused) from an outage: [`KILL_IN_FORCE`] per scope and grade.

use std::collections::BTreeSet;
use std::time::Duration;

use mesh_protocol::killswitch::{KillState, Scope};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::killswitch::KillSwitch;

/// 1 while a kill is in force: labels `agent` (`*` for the mesh-wide entry)
/// and `mode` (`soft`, `hard`, `nuclear`); 0 once it ended.
pub const KILL_IN_FORCE: &str = "mesh_kill_in_force";

/// How often the entries are read.
pub const EVERY: Duration = Duration::from_secs(15);

/// The gauge's labels of one entry in force: (agent, mode).
pub fn labels(scope: &Scope, state: &KillState) -> (String, String) {
    let agent = match scope {
        Scope::Global => "*".to_owned(),
        Scope::Agent(id) => id.to_string(),
    };
    (agent, state.mode.as_str().to_owned())
}

/// Sets the gauges every [`EVERY`] from the entries in force until `stop`;
/// a series whose kill ended goes to 0. Unreadable entries leave the gauges
/// as they were (a NATS outage has its own alert).
pub async fn export(
    js: async_nats::jetstream::Context,
    replicas: mesh_protocol::layout::Replicas,
    stop: CancellationToken,
) {
    let mut shown: BTreeSet<(String, String)> = BTreeSet::new();
    let mut switch: Option<KillSwitch> = None;
    loop {
        if switch.is_none() {
            switch = KillSwitch::open_with(&js, replicas).await.ok();
        }
        let read = match &switch {
            Some(switch) => switch.in_force().await.map_err(|e| e.to_string()),
            None => Err("the kill switch bucket cannot be opened".to_owned()),
        };
        match read {
            Ok(kills) => {
                let now: BTreeSet<(String, String)> = kills.iter().map(|(scope, state)| labels(scope, state)).collect();
                for (agent, mode) in shown.union(&now) {
                    let value = if now.contains(&(agent.clone(), mode.clone())) { 1.0 } else { 0.0 };
                    metrics::gauge!(KILL_IN_FORCE, "agent" => agent.clone(), "mode" => mode.clone()).set(value);
                }
                shown.extend(now);
            }
            Err(e) => warn!(error = %e, "cannot read the kill switch for the metrics; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_protocol::killswitch::Mode;

    #[test]
    fn labels_name_the_scope_and_the_grade() {
        let state =
            |mode| KillState { mode, until: None, by: "t".into(), reason: None, at: time::OffsetDateTime::UNIX_EPOCH };
        assert_eq!(labels(&Scope::Global, &state(Mode::Hard)), ("*".to_owned(), "hard".to_owned()));
        let nova = Scope::Agent("nova".parse().unwrap());
        assert_eq!(labels(&nova, &state(Mode::Soft)), ("nova".to_owned(), "soft".to_owned()));
    }
}
