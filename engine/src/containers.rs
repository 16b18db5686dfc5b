//! What the engine needs from the containers of a deployed mesh, without a
//! Docker client: the [`Containers`] trait (bollard's implementation is
//! `docker::DockerHost`; tests use fakes), its rows and reports, and the one
//! error type. The transport-level pause never depends on it.

use futures::future::BoxFuture;

/// Environment variable naming the compose project.
pub const PROJECT_ENV: &str = "MESH_COMPOSE_PROJECT";
/// Project name when none is given.
pub const DEFAULT_PROJECT: &str = "mesh";

/// The containers of the mesh's compose project.
pub trait Containers: Send + Sync + std::fmt::Debug {
    /// Every container of the project, by name (for `status`).
    fn list(&self) -> BoxFuture<'_, Result<Vec<ContainerRow>, DockerError>>;
    /// Restarts one agent's listener container; returns its name.
    fn restart_listener<'a>(&'a self, agent: &'a str) -> BoxFuture<'a, Result<String, DockerError>>;
    /// Stops every running listener container (a mesh-wide hard kill);
    /// returns the names of those it stopped (already stopped ones are not).
    fn stop_listeners(&self) -> BoxFuture<'_, Result<Vec<String>, DockerError>>;
    /// Starts the listener containers named (resume: those the kill
    /// stopped); returns their names. Names no longer found are skipped.
    fn start_listeners<'a>(&'a self, names: &'a [String]) -> BoxFuture<'a, Result<Vec<String>, DockerError>>;
    /// Stops and removes the project's containers but this process's own
    /// (and with `purge` its volumes and networks).
    fn nuclear(&self, purge: bool) -> BoxFuture<'_, Result<NuclearReport, DockerError>>;
}

/// No containers: the mesh is not deployed with Docker (or not known to be).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoContainers;

impl Containers for NoContainers {
    fn list(&self) -> BoxFuture<'_, Result<Vec<ContainerRow>, DockerError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn restart_listener<'a>(&'a self, _agent: &'a str) -> BoxFuture<'a, Result<String, DockerError>> {
        Box::pin(async { Err(DockerError::NotInUse) })
    }

    fn stop_listeners(&self) -> BoxFuture<'_, Result<Vec<String>, DockerError>> {
        Box::pin(async { Err(DockerError::NotInUse) })
    }

    fn start_listeners<'a>(&'a self, _names: &'a [String]) -> BoxFuture<'a, Result<Vec<String>, DockerError>> {
        Box::pin(async { Err(DockerError::NotInUse) })
    }

    fn nuclear(&self, _purge: bool) -> BoxFuture<'_, Result<NuclearReport, DockerError>> {
        Box::pin(async { Err(DockerError::NotInUse) })
    }
}

/// The cause of a Docker problem, from whatever client the implementation uses
/// (this crate links none).
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// A Docker problem.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The engine did not answer the ping.
    #[error("docker engine not reachable at {host}: {reason}; the transport-level pause still works")]
    Unreachable {
        /// The address tried.
        host: String,
        /// What went wrong.
        #[source]
        reason: Cause,
    },
    /// One engine call failed.
    #[error("docker call failed: {0}; check the engine with `docker ps`")]
    Call(#[source] Cause),
    /// No listener container carries this agent's label.
    #[error("no listener container for agent {agent:?} in project {project:?}; check `mesh status` and {PROJECT_ENV}")]
    NoListener {
        /// The agent asked for.
        agent: String,
        /// The project searched.
        project: String,
    },
    /// The bot runs in a container whose compose project cannot be read, and
    /// no project is configured: acting on a guessed one could touch another
    /// stack's containers.
    #[error(
        "the compose project is unknown ({0}); Docker actions are refused so no other project's containers are touched: set {PROJECT_ENV}"
    )]
    ProjectUnknown(String),
    /// No container engine is configured for this mesh.
    #[error("docker is not in use for this mesh")]
    NotInUse,
    /// Some containers changed state, others did not.
    #[error("{action} {} but failed on {}; run it again or check `docker ps`", list(done), failed.join("; "))]
    Partial {
        /// `stopped` or `started`.
        action: &'static str,
        /// Names that did change.
        done: Vec<String>,
        /// Names that did not, with why.
        failed: Vec<String>,
    },
}

fn list(names: &[String]) -> String {
    if names.is_empty() { "nothing".to_owned() } else { names.join(", ") }
}

/// One container of the mesh.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ContainerRow {
    /// Container name.
    pub name: String,
    /// `mesh.role` label (`-` without one).
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
    /// Containers that were running and were stopped.
    pub stopped: Vec<String>,
    /// Containers removed.
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
    fn docker_errors_keep_their_cause_and_their_message() {
        use std::error::Error as _;
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let e = DockerError::Unreachable { host: "tcp://127.0.0.1:1".into(), reason: Box::new(refused) };
        assert_eq!(
            e.to_string(),
            "docker engine not reachable at tcp://127.0.0.1:1: connection refused; the transport-level pause still works"
        );
        assert!(e.source().is_some_and(|cause| cause.is::<std::io::Error>()), "{e:?}");
    }
}
