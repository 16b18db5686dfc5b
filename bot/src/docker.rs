//! Docker control of a deployed mesh through bollard: list the mesh's
//! containers (compose project label), restart one agent's listener, stop and
//! start the listeners for a hard kill, and tear the project down for a
//! nuclear kill. Without a reachable engine every call says so clearly; the
//! transport-level pause does not depend on Docker.
//!
//! Containers are found by labels only: [`PROJECT_LABEL`] names the compose
//! project, [`ROLE_LABEL`] the role (`listener`, `bot`, `nats`, `gateway`, ...)
//! and [`AGENT_LABEL`] a listener's agent. Every engine call is bounded.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::query_parameters::{
    InspectContainerOptions, ListContainersOptionsBuilder, ListNetworksOptionsBuilder, ListVolumesOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveVolumeOptions, RestartContainerOptionsBuilder, StartContainerOptions,
    StopContainerOptionsBuilder,
};
use futures::future::{BoxFuture, join_all};
use time::OffsetDateTime;

pub use crate::containers::{
    ContainerRow, Containers, DEFAULT_PROJECT, DockerError, NuclearReport, PROJECT_ENV, format_uptime,
};

/// Label naming the compose project.
pub const PROJECT_LABEL: &str = "com.docker.compose.project";
/// Label naming a container's role: `listener`, `bot`, `nats`, `gateway`, ...
pub const ROLE_LABEL: &str = "mesh.role";
/// Label naming a listener's agent.
pub const AGENT_LABEL: &str = "mesh.agent";
/// Role of the listener containers.
pub const LISTENER_ROLE: &str = "listener";
/// Environment variable naming the engine (`unix:///...`, `tcp://host:port`).
pub const HOST_ENV: &str = "DOCKER_HOST";
/// Engine address when `DOCKER_HOST` is not set.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";
/// Longest wait for the first ping.
pub const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for one engine call (a stop included).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// Seconds a container gets to stop before it is killed.
pub const STOP_GRACE_SECS: i32 = 10;

/// The engine and the project it manages.
#[derive(Debug, Clone)]
pub struct DockerControl {
    docker: Docker,
    project: String,
}

/// One container found by label: id, name, and whether it runs.
#[derive(Debug)]
struct Found {
    id: String,
    name: String,
    running: bool,
}

fn call_err(e: BollardError) -> DockerError {
    DockerError::Call(e.into())
}

/// True for the engine's 304 answer: already in the wanted state.
fn unchanged(e: &BollardError) -> bool {
    matches!(e, BollardError::DockerResponseServerError { status_code: 304, .. })
}

/// The engine's answer within [`CALL_TIMEOUT`], or a timeout error.
async fn within<T>(
    call: impl Future<Output = Result<T, BollardError>>,
) -> Result<Result<T, BollardError>, DockerError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| DockerError::Call(format!("no answer within {}s", CALL_TIMEOUT.as_secs()).into()))
}

async fn bounded<T>(call: impl Future<Output = Result<T, BollardError>>) -> Result<T, DockerError> {
    within(call).await?.map_err(call_err)
}

impl DockerControl {
    /// Connects to `host` (`unix:///...`, `tcp://host:port`; the local socket
    /// when `None`) and pings the engine, waiting at most [`PING_TIMEOUT`].
    pub async fn connect_to(host: Option<&str>, project: &str) -> Result<Self, DockerError> {
        let host = host.unwrap_or(DEFAULT_HOST);
        let unreachable = |reason: crate::containers::Cause| DockerError::Unreachable { host: host.to_owned(), reason };
        let docker = Docker::connect_with_host(host).map_err(|e| unreachable(e.into()))?.with_timeout(CALL_TIMEOUT);
        match tokio::time::timeout(PING_TIMEOUT, docker.ping()).await {
            Ok(Ok(_)) => Ok(Self { docker, project: project.to_owned() }),
            Ok(Err(e)) => Err(unreachable(e.into())),
            Err(_) => Err(unreachable(format!("no answer within {}s", PING_TIMEOUT.as_secs()).into())),
        }
    }

    /// Connects like [`DockerControl::connect_to`] and manages the compose
    /// project of the container `own` (this process's own container, by id):
    /// its [`PROJECT_LABEL`]. A container that cannot be inspected or has no
    /// such label is [`DockerError::ProjectUnknown`].
    pub async fn for_container(host: Option<&str>, own: &str) -> Result<Self, DockerError> {
        let mut control = Self::connect_to(host, "").await?;
        let inspect = within(control.docker.inspect_container(own, None::<InspectContainerOptions>)).await?;
        let labels = match inspect {
            Ok(inspect) => inspect.config.and_then(|c| c.labels).unwrap_or_default(),
            Err(e) => {
                return Err(DockerError::ProjectUnknown(format!(
                    "this process's container {own} cannot be inspected on the engine: {e}"
                )));
            }
        };
        match labels.get(PROJECT_LABEL).filter(|p| !p.is_empty()) {
            Some(project) => {
                control.project = project.clone();
                Ok(control)
            }
            None => Err(DockerError::ProjectUnknown(format!(
                "this process's container {own} has no {PROJECT_LABEL} label: it was not started by compose"
            ))),
        }
    }

    /// The compose project this control manages.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// The project's containers carrying all `extra` labels (`key=value`), by name.
    async fn find(&self, extra: &[String]) -> Result<Vec<Found>, DockerError> {
        let mut labels = vec![format!("{PROJECT_LABEL}={}", self.project)];
        labels.extend_from_slice(extra);
        let filters: HashMap<&str, Vec<String>> = HashMap::from([("label", labels)]);
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let list = bounded(self.docker.list_containers(Some(options))).await?;
        let mut out: Vec<Found> = list
            .into_iter()
            .filter_map(|c| {
                let id = c.id?;
                let name = c.names.and_then(|n| n.into_iter().next()).unwrap_or_else(|| id.clone());
                let running = c.state.is_some_and(|s| s.to_string() == "running");
                Some(Found { name: name.trim_start_matches('/').to_owned(), id, running })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn listeners(&self) -> Result<Vec<Found>, DockerError> {
        self.find(&[format!("{ROLE_LABEL}={LISTENER_ROLE}")]).await
    }

    /// Every container of the project, by name (for `mesh status`).
    pub async fn containers(&self) -> Result<Vec<ContainerRow>, DockerError> {
        let mut rows = Vec::new();
        let now = OffsetDateTime::now_utc();
        for Found { id, name, .. } in self.find(&[]).await? {
            let inspect = match within(self.docker.inspect_container(&id, None::<InspectContainerOptions>)).await? {
                Ok(inspect) => inspect,
                // Removed between the list and the inspect.
                Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => continue,
                Err(e) => return Err(call_err(e)),
            };
            let labels = inspect.config.as_ref().and_then(|c| c.labels.clone()).unwrap_or_default();
            let (role, agent) = role_and_agent(&labels);
            let state = inspect.state.as_ref();
            let running = state.and_then(|s| s.running).unwrap_or(false);
            rows.push(ContainerRow {
                name,
                role,
                agent,
                state: state.and_then(|s| s.status).map_or_else(|| "unknown".into(), |s| s.to_string()),
                health: state.and_then(|s| s.health.as_ref()).and_then(|h| h.status).map(|s| s.to_string()),
                restarts: inspect.restart_count.unwrap_or(0),
                uptime_s: uptime_secs(running, state.and_then(|s| s.started_at.as_deref()), now),
            });
        }
        Ok(rows)
    }

    /// Restarts one agent's listener container (stop grace [`STOP_GRACE_SECS`]);
    /// returns its name.
    pub async fn restart_listener(&self, agent: &str) -> Result<String, DockerError> {
        let found = self.find(&[format!("{ROLE_LABEL}={LISTENER_ROLE}"), format!("{AGENT_LABEL}={agent}")]).await?;
        let Some(container) = found.into_iter().next() else {
            return Err(DockerError::NoListener { agent: agent.to_owned(), project: self.project.clone() });
        };
        let options = RestartContainerOptionsBuilder::new().t(STOP_GRACE_SECS).build();
        bounded(self.docker.restart_container(&container.id, Some(options))).await?;
        Ok(container.name)
    }

    async fn stop(&self, id: &str) -> Result<(), DockerError> {
        let options = StopContainerOptionsBuilder::new().t(STOP_GRACE_SECS).build();
        match within(self.docker.stop_container(id, Some(options))).await? {
            Err(e) if !unchanged(&e) => Err(call_err(e)),
            _ => Ok(()),
        }
    }

    /// Stops every running listener container (all at once, each with a
    /// grace of [`STOP_GRACE_SECS`]); returns the names of those it stopped.
    /// Already stopped ones are left out: `resume` starts only what the kill
    /// stopped, never a listener an operator stopped on purpose.
    pub async fn stop_listeners(&self) -> Result<Vec<String>, DockerError> {
        let listeners: Vec<Found> = self.listeners().await?.into_iter().filter(|c| c.running).collect();
        let results = join_all(listeners.iter().map(|c| self.stop(&c.id))).await;
        settle("stopped", listeners, results)
    }

    /// Starts the listener containers named in `names` (those a kill
    /// stopped); returns their names. Already running ones count as started;
    /// names no longer found (removed since) are skipped.
    pub async fn start_listeners(&self, names: &[String]) -> Result<Vec<String>, DockerError> {
        let listeners: Vec<Found> = self.listeners().await?.into_iter().filter(|c| names.contains(&c.name)).collect();
        let results = join_all(listeners.iter().map(|c| async {
            match within(self.docker.start_container(&c.id, None::<StartContainerOptions>)).await? {
                Err(e) if !unchanged(&e) => Err(call_err(e)),
                _ => Ok(()),
            }
        }))
        .await;
        settle("started", listeners, results)
    }

    /// Stops (grace [`STOP_GRACE_SECS`]) and removes every container of the
    /// project except `own` (the bot's own container id, id prefix or name);
    /// with `purge` also the project's volumes and networks. Failures are
    /// listed in the report, not returned; only a failed listing is an error.
    pub async fn nuclear(&self, purge: bool, own: Option<&str>) -> Result<NuclearReport, DockerError> {
        let own = own.filter(|o| !o.is_empty());
        let mut report = NuclearReport::default();
        let (kept, doomed): (Vec<Found>, Vec<Found>) =
            self.find(&[]).await?.into_iter().partition(|c| own.is_some_and(|o| c.id.starts_with(o) || c.name == o));
        report.kept = kept.into_iter().map(|c| c.name).collect();

        let running: Vec<&Found> = doomed.iter().filter(|c| c.running).collect();
        for (c, result) in running.iter().zip(join_all(running.iter().map(|c| self.stop(&c.id))).await) {
            match result {
                Ok(()) => report.stopped.push(c.name.clone()),
                Err(e) => report.failed.push(format!("stop container {}: {e}", c.name)),
            }
        }
        for c in &doomed {
            let options = RemoveContainerOptionsBuilder::new().force(true).v(false).build();
            match bounded(self.docker.remove_container(&c.id, Some(options))).await {
                Ok(()) => report.removed.push(c.name.clone()),
                Err(e) => report.failed.push(format!("remove container {}: {e}", c.name)),
            }
        }
        if purge {
            let filters: HashMap<&str, Vec<String>> =
                HashMap::from([("label", vec![format!("{PROJECT_LABEL}={}", self.project)])]);
            let volumes =
                bounded(self.docker.list_volumes(Some(ListVolumesOptionsBuilder::new().filters(&filters).build())))
                    .await?;
            let mut volumes: Vec<String> = volumes.volumes.unwrap_or_default().into_iter().map(|v| v.name).collect();
            volumes.sort();
            for name in volumes {
                match bounded(self.docker.remove_volume(&name, None::<RemoveVolumeOptions>)).await {
                    Ok(()) => report.volumes.push(name),
                    Err(e) => report.failed.push(format!("remove volume {name}: {e}")),
                }
            }
            let networks =
                bounded(self.docker.list_networks(Some(ListNetworksOptionsBuilder::new().filters(&filters).build())))
                    .await?;
            let mut networks: Vec<String> = networks
                .into_iter()
                .filter(|n| n.labels.as_ref().and_then(|l| l.get(PROJECT_LABEL)) == Some(&self.project))
                .filter_map(|n| n.name)
                .collect();
            networks.sort();
            for name in networks {
                match bounded(self.docker.remove_network(&name)).await {
                    Ok(()) => report.networks.push(name),
                    Err(e) => report.failed.push(format!("remove network {name}: {e}")),
                }
            }
        }
        Ok(report)
    }
}

/// The names that changed, or [`DockerError::Partial`] when some did not.
fn settle(
    action: &'static str,
    containers: Vec<Found>,
    results: Vec<Result<(), DockerError>>,
) -> Result<Vec<String>, DockerError> {
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    for (c, result) in containers.into_iter().zip(results) {
        match result {
            Ok(()) => done.push(c.name),
            Err(e) => failed.push(format!("{}: {e}", c.name)),
        }
    }
    if failed.is_empty() { Ok(done) } else { Err(DockerError::Partial { action, done, failed }) }
}

/// Role and agent of a container from its labels (`-` without a role).
pub fn role_and_agent(labels: &HashMap<String, String>) -> (String, Option<String>) {
    let role = labels.get(ROLE_LABEL).filter(|r| !r.is_empty()).cloned().unwrap_or_else(|| "-".into());
    let agent = labels.get(AGENT_LABEL).filter(|a| !a.is_empty()).cloned();
    (role, agent)
}

/// Seconds since `started_at` (the engine's RFC 3339 `State.StartedAt`) while
/// running; `None` when stopped or unreadable.
pub fn uptime_secs(running: bool, started_at: Option<&str>, now: OffsetDateTime) -> Option<u64> {
    let started = parse_time(started_at?)?;
    running.then(|| u64::try_from((now - started).whole_seconds()).unwrap_or(0))
}

fn parse_time(raw: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339).ok()
}

/// The id of the container this process runs in, if any: from the engine's
/// bind mounts in `/proc/self/mountinfo`, then `/proc/self/cgroup`, then the
/// hostname (the engine's default is the short id) when `/.dockerenv` exists.
/// `None` outside a container.
pub fn own_container_id() -> Option<String> {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    id_from_mountinfo(&read("/proc/self/mountinfo")).or_else(|| id_from_cgroup(&read("/proc/self/cgroup"))).or_else(
        || {
            if !std::path::Path::new("/.dockerenv").exists() {
                return None;
            }
            // The engine writes the short id there (and into HOSTNAME) unless the service sets a hostname.
            short_id(read("/etc/hostname").trim())
        },
    )
}

const ID_LEN: usize = 64;

fn is_hex_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The 64-hex id right after the first `marker` in `text` that has one.
fn id_after(text: &str, marker: &str) -> Option<String> {
    text.match_indices(marker).find_map(|(at, _)| {
        let rest = text.get(at + marker.len()..)?;
        let id = rest.get(..ID_LEN)?;
        is_hex_id(id).then(|| id.to_owned())
    })
}

/// The container id from `/proc/self/mountinfo`: the engine bind-mounts
/// `/var/lib/docker/containers/<id>/hostname` (and `hosts`, `resolv.conf`)
/// into every container. Only those mount points count, so a host that sees
/// other containers' mounts finds nothing.
pub fn id_from_mountinfo(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        matches!(mount_point, "/etc/hostname" | "/etc/hosts" | "/etc/resolv.conf")
            .then(|| id_after(root, "/containers/"))
            .flatten()
    })
}

/// The container id from `/proc/self/cgroup`: `/docker/<id>` (cgroup v1) or
/// `docker-<id>.scope` (systemd driver, host cgroup namespace).
pub fn id_from_cgroup(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|line| {
        let path = line.splitn(3, ':').nth(2)?;
        id_after(path, "/docker/").or_else(|| id_after(path, "docker-")).or_else(|| id_after(path, "libpod-"))
    })
}

/// A hostname that looks like the engine's default (the 12-hex short id).
fn short_id(hostname: &str) -> Option<String> {
    (hostname.len() == 12 && hostname.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then(|| hostname.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3c1f0e5b9a7d4e2f8b6c1a0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f";

    #[test]
    fn uptime_reads_well() {
        for (secs, want) in [(0, "0s"), (42, "42s"), (125, "2m 5s"), (7500, "2h 5m"), (90_000, "1d 1h")] {
            assert_eq!(format_uptime(secs), want, "{secs}");
        }
    }

    #[test]
    fn uptime_counts_from_started_at_while_running() {
        let now = time::macros::datetime!(2026-11-23 09:00:00 UTC);
        for (running, started, want) in [
            (true, Some("2026-11-23T08:00:00.123456789Z"), Some(3599)),
            (true, Some("2026-11-23T09:00:00Z"), Some(0)),
            (true, Some("2026-11-23T09:00:05Z"), Some(0)), // clock skew: never negative
            (false, Some("2026-11-23T08:00:00Z"), None),
            (true, Some("garbage"), None),
            (true, None, None),
        ] {
            assert_eq!(uptime_secs(running, started, now), want, "{running} {started:?}");
        }
    }

    #[test]
    fn labels_give_role_and_agent() {
        let labels = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        for (given, role, agent) in [
            (labels(&[(ROLE_LABEL, "listener"), (AGENT_LABEL, "nova")]), "listener", Some("nova")),
            (labels(&[(ROLE_LABEL, "nats")]), "nats", None),
            (labels(&[(PROJECT_LABEL, "mesh")]), "-", None),
            (labels(&[(ROLE_LABEL, ""), (AGENT_LABEL, "")]), "-", None),
        ] {
            assert_eq!(role_and_agent(&given), (role.to_owned(), agent.map(str::to_owned)), "{given:?}");
        }
    }

    #[test]
    fn own_id_from_mountinfo_only_from_our_own_mounts() {
        let ours = format!(
            "1 0 0:1 / / rw - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/{ID}/diff\n\
             2 1 8:1 /var/lib/docker/containers/{ID}/resolv.conf /etc/resolv.conf rw - ext4 /dev/sda1 rw\n"
        );
        assert_eq!(id_from_mountinfo(&ours).as_deref(), Some(ID));
        // A host seeing another container's shm mount, and a layer id: not ours.
        let host = format!(
            "3 1 0:2 / /var/lib/docker/containers/{ID}/mounts/shm rw - tmpfs shm rw\n\
             4 1 0:3 / /var/lib/docker/overlay2/{ID}/merged rw - overlay overlay rw\n"
        );
        assert_eq!(id_from_mountinfo(&host), None);
        assert_eq!(id_from_mountinfo(""), None);
    }

    #[test]
    fn own_id_from_cgroup_v1_and_systemd() {
        for (cgroup, want) in [
            (format!("12:memory:/docker/{ID}\n11:pids:/docker/{ID}\n"), Some(ID)),
            (format!("0::/system.slice/docker-{ID}.scope\n"), Some(ID)),
            ("0::/\n".to_owned(), None),
            ("9:name=systemd:/user.slice/user-1000.slice\n".to_owned(), None),
            (format!("12:memory:/docker/{}\n", &ID[..40]), None),
        ] {
            assert_eq!(id_from_cgroup(&cgroup).as_deref(), want, "{cgroup}");
        }
    }

    #[test]
    fn the_project_is_configured_or_the_own_containers_or_the_default_outside_one() {
        let named = |s: &str| Project::Named(s.to_owned());
        assert_eq!(Project::from_env(Some("staging".into()), Some(ID.into())), named("staging"));
        assert_eq!(Project::from_env(None, Some(ID.into())), Project::OwnContainer(ID.into()));
        assert_eq!(Project::from_env(None, None), named(DEFAULT_PROJECT));
        let e = DockerError::ProjectUnknown("container x has no label".into());
        assert!(e.to_string().contains("set MESH_COMPOSE_PROJECT"), "{e}");
    }

    #[test]
    fn hostname_counts_only_as_a_short_id() {
        assert_eq!(short_id("3c1f0e5b9a7d").as_deref(), Some("3c1f0e5b9a7d"));
        assert_eq!(short_id("mesh-bot"), None);
        assert_eq!(short_id("3C1F0E5B9A7D"), None);
    }

    #[test]
    fn unreachable_says_where_and_what_still_works() {
        let e = DockerError::Unreachable { host: "tcp://127.0.0.1:1".into(), reason: "connection refused".into() };
        assert_eq!(
            e.to_string(),
            "docker engine not reachable at tcp://127.0.0.1:1: connection refused; the transport-level pause still works"
        );
        let e = DockerError::Partial { action: "stopped", done: vec!["a".into()], failed: vec!["b: boom".into()] };
        assert_eq!(e.to_string(), "stopped a but failed on b: boom; run it again or check `docker ps`");
    }
}

/// Which compose project the mesh's containers belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Project {
    /// Named by [`PROJECT_ENV`] (or, outside a container, [`DEFAULT_PROJECT`]).
    Named(String),
    /// The project of the container this process runs in (its id): a bot in
    /// a `mesh-staging` stack acts on `mesh-staging`, never on `mesh`.
    OwnContainer(String),
}

impl Project {
    /// [`PROJECT_ENV`] when set; otherwise the own container's project when
    /// this process runs in one; otherwise [`DEFAULT_PROJECT`] (the `mesh`
    /// command on the host, as `mesh deploy up` names the project).
    pub fn from_env(configured: Option<String>, own_container: Option<String>) -> Self {
        match (configured, own_container) {
            (Some(name), _) => Self::Named(name),
            (None, Some(id)) => Self::OwnContainer(id),
            (None, None) => Self::Named(DEFAULT_PROJECT.to_owned()),
        }
    }
}

/// The [`Containers`] the engine reaches: the Docker engine at `host` (the
/// local socket when `None`), connected for each call so an engine that comes
/// and goes is reported per command.
#[derive(Debug, Clone)]
pub struct DockerHost {
    /// `DOCKER_HOST`, if set.
    pub host: Option<String>,
    /// The compose project.
    pub project: Project,
}

impl DockerHost {
    async fn control(&self) -> Result<DockerControl, DockerError> {
        match &self.project {
            Project::Named(name) => DockerControl::connect_to(self.host.as_deref(), name).await,
            Project::OwnContainer(id) => DockerControl::for_container(self.host.as_deref(), id).await,
        }
    }
}

impl Containers for DockerHost {
    fn list(&self) -> BoxFuture<'_, Result<Vec<ContainerRow>, DockerError>> {
        Box::pin(async move { self.control().await?.containers().await })
    }

    fn restart_listener<'a>(&'a self, agent: &'a str) -> BoxFuture<'a, Result<String, DockerError>> {
        Box::pin(async move { self.control().await?.restart_listener(agent).await })
    }

    fn stop_listeners(&self) -> BoxFuture<'_, Result<Vec<String>, DockerError>> {
        Box::pin(async move { self.control().await?.stop_listeners().await })
    }

    fn start_listeners<'a>(&'a self, names: &'a [String]) -> BoxFuture<'a, Result<Vec<String>, DockerError>> {
        Box::pin(async move { self.control().await?.start_listeners(names).await })
    }

    fn nuclear(&self, purge: bool) -> BoxFuture<'_, Result<NuclearReport, DockerError>> {
        Box::pin(async move { self.control().await?.nuclear(purge, own_container_id().as_deref()).await })
    }
}
