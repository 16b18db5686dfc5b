//! Docker control of a deployed mesh through bollard: list the mesh's
//! containers (compose project label), restart one agent's listener, stop and
//! start the listeners for a hard kill, and tear the project down for a
//! nuclear kill. Without a reachable engine every call says so clearly; the
//! transport-level pause does not depend on Docker.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{
    InspectContainerOptions, ListContainersOptionsBuilder, ListVolumesOptionsBuilder, RemoveContainerOptionsBuilder,
    RestartContainerOptionsBuilder, StartContainerOptions, StopContainerOptionsBuilder,
};
use time::OffsetDateTime;

/// Label naming the compose project.
pub const PROJECT_LABEL: &str = "com.docker.compose.project";
/// Label naming a container's role: `listener`, `bot`, `nats`, `gateway`, ...
pub const ROLE_LABEL: &str = "mesh.role";
/// Label naming a listener's agent.
pub const AGENT_LABEL: &str = "mesh.agent";
/// Environment variable naming the compose project.
pub const PROJECT_ENV: &str = "MESH_COMPOSE_PROJECT";
/// Project name when none is given.
pub const DEFAULT_PROJECT: &str = "mesh";
/// Longest wait for one engine call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// Seconds a container gets to stop before it is killed.
pub const STOP_GRACE_SECS: i32 = 10;

/// A Docker problem.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("docker engine not reachable ({0}); the transport-level pause still works")]
    Unreachable(String),
    #[error("docker call failed: {0}")]
    Call(String),
    #[error("no listener container for agent {agent:?} in project {project:?}")]
    NoListener { agent: String, project: String },
}

/// One container of the mesh.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ContainerRow {
    /// Container name.
    pub name: String,
    /// `mesh.role` label.
    pub role: String,
    /// `mesh.agent` label.
    pub agent: Option<String>,
    /// `running`, `exited`, ...
    pub state: String,
    /// Health check status, if the container has one.
    pub health: Option<String>,
    /// Restarts by the engine.
    pub restarts: i64,
    /// Seconds since it started, while running.
    pub uptime_s: Option<u64>,
}

/// What a nuclear teardown did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct NuclearReport {
    /// Containers stopped and removed.
    pub removed: Vec<String>,
    /// Containers left alone (the bot's own).
    pub kept: Vec<String>,
    /// Volumes removed (with purge).
    pub volumes: Vec<String>,
    /// Networks removed (with purge).
    pub networks: Vec<String>,
    /// What failed, with why.
    pub failed: Vec<String>,
}

/// The engine and the project it manages.
#[derive(Debug, Clone)]
pub struct DockerControl {
    docker: Docker,
    project: String,
}

fn call_err(e: impl std::fmt::Display) -> DockerError {
    DockerError::Call(e.to_string())
}

async fn bounded<T, E: std::fmt::Display>(
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, DockerError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| DockerError::Call(format!("no answer within {}s", CALL_TIMEOUT.as_secs())))?
        .map_err(call_err)
}

impl DockerControl {
    /// Connects through `DOCKER_HOST` or the local socket and pings the engine.
    pub async fn connect(project: &str) -> Result<Self, DockerError> {
        let docker = Docker::connect_with_defaults().map_err(|e| DockerError::Unreachable(e.to_string()))?;
        match tokio::time::timeout(Duration::from_secs(3), docker.ping()).await {
            Ok(Ok(_)) => Ok(Self { docker, project: project.to_owned() }),
            Ok(Err(e)) => Err(DockerError::Unreachable(e.to_string())),
            Err(_) => Err(DockerError::Unreachable("no answer within 3s".into())),
        }
    }

    /// The project from `MESH_COMPOSE_PROJECT`, or `mesh`.
    pub fn project_from_env() -> String {
        std::env::var(PROJECT_ENV).ok().filter(|p| !p.is_empty()).unwrap_or_else(|| DEFAULT_PROJECT.to_owned())
    }

    async fn ids(&self, role: Option<&str>) -> Result<Vec<(String, String)>, DockerError> {
        let mut labels = vec![format!("{PROJECT_LABEL}={}", self.project)];
        if let Some(role) = role {
            labels.push(format!("{ROLE_LABEL}={role}"));
        }
        let filters: HashMap<&str, Vec<String>> = HashMap::from([("label", labels)]);
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let list = bounded(self.docker.list_containers(Some(options))).await?;
        let mut out: Vec<(String, String)> = list
            .into_iter()
            .filter_map(|c| {
                let name =
                    c.names.and_then(|n| n.first().cloned()).unwrap_or_default().trim_start_matches('/').to_owned();
                Some((c.id?, name))
            })
            .collect();
        out.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(out)
    }

    /// Every container of the project, by name.
    pub async fn containers(&self) -> Result<Vec<ContainerRow>, DockerError> {
        let mut rows = Vec::new();
        for (id, name) in self.ids(None).await? {
            let inspect = bounded(self.docker.inspect_container(&id, None::<InspectContainerOptions>)).await?;
            let labels = inspect.config.as_ref().and_then(|c| c.labels.clone()).unwrap_or_default();
            let state = inspect.state.as_ref();
            let running = state.and_then(|s| s.running).unwrap_or(false);
            let started = state.and_then(|s| s.started_at.as_deref()).and_then(parse_time);
            rows.push(ContainerRow {
                name,
                role: labels.get(ROLE_LABEL).cloned().unwrap_or_else(|| "-".into()),
                agent: labels.get(AGENT_LABEL).cloned(),
                state: state.and_then(|s| s.status).map(|s| s.to_string()).unwrap_or_else(|| "unknown".into()),
                health: state.and_then(|s| s.health.as_ref()).and_then(|h| h.status).map(|s| s.to_string()),
                restarts: inspect.restart_count.unwrap_or(0),
                uptime_s: if running {
                    started.map(|at| (OffsetDateTime::now_utc() - at).whole_seconds().max(0) as u64)
                } else {
                    None
                },
            });
        }
        Ok(rows)
    }

    /// Restarts one agent's listener container.
    pub async fn restart_listener(&self, agent: &str) -> Result<String, DockerError> {
        let want = format!("{AGENT_LABEL}={agent}");
        let filters: HashMap<&str, Vec<String>> = HashMap::from([(
            "label",
            vec![format!("{PROJECT_LABEL}={}", self.project), format!("{ROLE_LABEL}=listener"), want],
        )]);
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let found = bounded(self.docker.list_containers(Some(options))).await?;
        let Some(container) = found.into_iter().next() else {
            return Err(DockerError::NoListener { agent: agent.to_owned(), project: self.project.clone() });
        };
        let id = container.id.unwrap_or_default();
        let name = container.names.and_then(|n| n.first().cloned()).unwrap_or_else(|| id.clone());
        let options = RestartContainerOptionsBuilder::new().t(STOP_GRACE_SECS).build();
        bounded(self.docker.restart_container(&id, Some(options))).await?;
        Ok(name.trim_start_matches('/').to_owned())
    }

    /// Stops every listener container; returns their names.
    pub async fn stop_listeners(&self) -> Result<Vec<String>, DockerError> {
        let mut stopped = Vec::new();
        for (id, name) in self.ids(Some("listener")).await? {
            let options = StopContainerOptionsBuilder::new().t(STOP_GRACE_SECS).build();
            match self.docker.stop_container(&id, Some(options)).await {
                Ok(()) => stopped.push(name),
                // 304: already stopped.
                Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. }) => stopped.push(name),
                Err(e) => return Err(call_err(e)),
            }
        }
        Ok(stopped)
    }

    /// Starts every listener container; returns their names.
    pub async fn start_listeners(&self) -> Result<Vec<String>, DockerError> {
        let mut started = Vec::new();
        for (id, name) in self.ids(Some("listener")).await? {
            match self.docker.start_container(&id, None::<StartContainerOptions>).await {
                Ok(()) => started.push(name),
                Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. }) => started.push(name),
                Err(e) => return Err(call_err(e)),
            }
        }
        Ok(started)
    }

    /// Stops and removes every container of the project except `own` (the
    /// bot's own container id or name); with `purge` also the project's
    /// volumes and networks.
    pub async fn nuclear(&self, purge: bool, own: Option<&str>) -> Result<NuclearReport, DockerError> {
        let mut report = NuclearReport::default();
        for (id, name) in self.ids(None).await? {
            if own.is_some_and(|own| id.starts_with(own) || name == own) {
                report.kept.push(name);
                continue;
            }
            let options = RemoveContainerOptionsBuilder::new().force(true).v(false).build();
            match bounded(self.docker.remove_container(&id, Some(options))).await {
                Ok(()) => report.removed.push(name),
                Err(e) => report.failed.push(format!("container {name}: {e}")),
            }
        }
        if purge {
            let filters: HashMap<&str, Vec<String>> =
                HashMap::from([("label", vec![format!("{PROJECT_LABEL}={}", self.project)])]);
            let volumes =
                bounded(self.docker.list_volumes(Some(ListVolumesOptionsBuilder::new().filters(&filters).build())))
                    .await?;
            for volume in volumes.volumes.unwrap_or_default() {
                match bounded(
                    self.docker.remove_volume(&volume.name, None::<bollard::query_parameters::RemoveVolumeOptions>),
                )
                .await
                {
                    Ok(()) => report.volumes.push(volume.name),
                    Err(e) => report.failed.push(format!("volume {}: {e}", volume.name)),
                }
            }
            let networks =
                bounded(self.docker.list_networks(None::<bollard::query_parameters::ListNetworksOptions>)).await?;
            for network in networks {
                let ours =
                    network.labels.as_ref().and_then(|l| l.get(PROJECT_LABEL)).is_some_and(|p| *p == self.project);
                let Some(name) = network.name.filter(|_| ours) else { continue };
                match bounded(self.docker.remove_network(&name)).await {
                    Ok(()) => report.networks.push(name),
                    Err(e) => report.failed.push(format!("network {name}: {e}")),
                }
            }
        }
        Ok(report)
    }
}

/// The id of the container this process runs in, if any (`HOSTNAME` inside a container).
pub fn own_container_id() -> Option<String> {
    if !std::path::Path::new("/.dockerenv").exists() {
        return None;
    }
    std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty())
}

fn parse_time(raw: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339).ok()
}

/// Uptime as `3d 4h`, `2h 5m`, `42s`.
pub fn format_uptime(secs: u64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_reads_well() {
        assert_eq!(format_uptime(42), "42s");
        assert_eq!(format_uptime(125), "2m 5s");
        assert_eq!(format_uptime(7500), "2h 5m");
        assert_eq!(format_uptime(90_000), "1d 1h");
    }

    #[test]
    fn docker_timestamps_parse() {
        assert!(parse_time("2026-11-23T08:00:00.123456789Z").is_some());
        assert!(parse_time("0001-01-01T00:00:00Z").is_some());
        assert!(parse_time("garbage").is_none());
    }
}
