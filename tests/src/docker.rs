//! Docker for the tests, through bollard: whether an engine is reachable
//! (Docker tests fail under `CI=true` without one, and skip with a message
//! otherwise), a tiny image built from this machine's own files (nothing can
//! be pulled: `FROM scratch` plus `/bin/sleep` and the libraries `ldd` lists),
//! and labelled containers, volumes and networks in a compose-like project of
//! their own, removed on drop even when the test fails.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, HostConfig, NetworkCreateRequest, VolumeCreateRequest,
};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
    ListNetworksOptionsBuilder, ListVolumesOptionsBuilder, RemoveContainerOptionsBuilder, RemoveVolumeOptions,
    StartContainerOptions,
};
use futures::StreamExt;
use mesh_bot::docker::{AGENT_LABEL, DEFAULT_HOST, HOST_ENV, PROJECT_LABEL, ROLE_LABEL};
use tokio::sync::OnceCell;

/// The tiny image: `/bin/sleep` and the libraries it needs, on `scratch`.
pub const IMAGE: &str = "mesh-test-sleeper:local";
/// Longest wait for a container to reach a state.
pub const STATE_DEADLINE: Duration = Duration::from_secs(20);

/// Skips the calling test (returns) when [`docker_or_skip`] says so.
#[macro_export]
macro_rules! require_docker {
    () => {
        if !$crate::docker::docker_or_skip().await {
            return;
        }
    };
}

/// `DOCKER_HOST`, when set.
pub fn host() -> Option<String> {
    std::env::var(HOST_ENV).ok().filter(|h| !h.is_empty())
}

/// The engine at `DOCKER_HOST` (or the local socket), after a ping of at most 3 s.
pub async fn connect() -> Result<Docker, String> {
    let host = host().unwrap_or_else(|| DEFAULT_HOST.to_owned());
    let docker = Docker::connect_with_host(&host).map_err(|e| format!("{host}: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(3), docker.ping()).await {
        Ok(Ok(_)) => Ok(docker),
        Ok(Err(e)) => Err(format!("{host}: {e}")),
        Err(_) => Err(format!("{host}: no answer within 3s")),
    }
}

/// True when a Docker engine answers a ping.
pub async fn docker_available() -> bool {
    connect().await.is_ok()
}

/// True when Docker tests should run; false (after printing
/// "skipping: docker engine not reachable") when they should be skipped.
/// Panics when `CI=true` and no engine answers: CI must run them.
pub async fn docker_or_skip() -> bool {
    match connect().await {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but the docker engine is not reachable ({e}); start docker or set DOCKER_HOST"
            );
            eprintln!("skipping: docker engine not reachable ({e})");
            false
        }
    }
}

/// Builds [`IMAGE`] once per test process, unless the engine already has it.
pub async fn ensure_image(docker: &Docker) {
    static BUILT: OnceCell<()> = OnceCell::const_new();
    BUILT
        .get_or_init(|| async {
            if docker.inspect_image(IMAGE).await.is_ok() {
                return;
            }
            let options = BuildImageOptionsBuilder::new().dockerfile("Dockerfile").t(IMAGE).rm(true).build();
            let context = bytes::Bytes::from(sleeper_context());
            let mut build = docker.build_image(options, None, Some(bollard::body_full(context)));
            let mut log = String::new();
            while let Some(step) = build.next().await {
                let step = step.unwrap_or_else(|e| panic!("building {IMAGE} failed: {e}\n{log}"));
                if let Some(error) = step.error_detail.and_then(|d| d.message) {
                    panic!("building {IMAGE} failed: {error}\n{log}");
                }
                log.push_str(step.stream.as_deref().unwrap_or_default());
            }
            assert!(docker.inspect_image(IMAGE).await.is_ok(), "{IMAGE} missing after the build:\n{log}");
        })
        .await;
}

/// The build context of [`IMAGE`], as an in-memory tar: a `FROM scratch`
/// Dockerfile and `rootfs/` holding `/bin/sleep`, the libraries `ldd` lists
/// for it and the dynamic loader, at their own paths.
pub fn sleeper_context() -> Vec<u8> {
    let sleep = "/bin/sleep";
    let mut files = vec![sleep.to_owned()];
    // No ldd (or a static binary): the binary alone.
    if let Ok(out) = Command::new("ldd").arg(sleep).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`.
            if let Some(path) = line.split_whitespace().find(|w| w.starts_with('/')) {
                files.push(path.to_owned());
            }
        }
    }
    let dockerfile = "FROM scratch\nCOPY rootfs/ /\nENTRYPOINT [\"/bin/sleep\"]\nCMD [\"3600\"]\n";
    let mut tar = Vec::new();
    tar_file(&mut tar, "Dockerfile", 0o644, dockerfile.as_bytes());
    for file in files {
        let data = std::fs::read(&file).unwrap_or_else(|e| panic!("reading {file} for {IMAGE}: {e}"));
        tar_file(&mut tar, &format!("rootfs{file}"), 0o755, &data);
    }
    tar.resize(tar.len() + 1024, 0); // two zero blocks end the archive
    tar
}

/// Appends one regular file to a ustar archive.
fn tar_file(tar: &mut Vec<u8>, path: &str, mode: u32, data: &[u8]) {
    assert!(path.len() < 100, "tar path too long: {path}");
    let mut header = [0u8; 512];
    let mut put = |at: usize, field: &[u8]| header[at..at + field.len()].copy_from_slice(field);
    put(0, path.as_bytes());
    put(100, format!("{mode:07o}\0").as_bytes());
    put(108, b"0000000\0"); // uid
    put(116, b"0000000\0"); // gid
    put(124, format!("{:011o}\0", data.len()).as_bytes());
    put(136, b"00000000000\0"); // mtime
    put(148, b"        "); // checksum, counted as spaces
    put(156, b"0"); // regular file
    put(257, b"ustar\0");
    put(263, b"00");
    let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    tar.extend_from_slice(&header);
    tar.extend_from_slice(data);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
}

/// A compose-like project of labelled containers, volumes and networks with a
/// unique name (`meshtest-<uuid>`), all removed on drop.
#[derive(Debug)]
pub struct Project {
    /// The project name.
    pub name: String,
    /// The engine.
    pub docker: Docker,
}

/// What a test container gets besides its labels.
#[derive(Debug, Default, Clone)]
pub struct Extras<'a> {
    /// A volume mounted at `/data`.
    pub volume: Option<&'a str>,
    /// A network to join.
    pub network: Option<&'a str>,
}

impl Project {
    /// A fresh project on the local engine, with [`IMAGE`] built.
    pub async fn new() -> Self {
        let docker = connect().await.unwrap_or_else(|e| panic!("docker engine not reachable: {e}"));
        ensure_image(&docker).await;
        Self { name: format!("meshtest-{}", uuid::Uuid::now_v7().simple()), docker }
    }

    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([(PROJECT_LABEL.to_owned(), self.name.clone())])
    }

    /// Runs a container `<project>-<role>[-<agent>]` with the project's,
    /// role's and agent's labels; returns its name.
    pub async fn run(&self, role: &str, agent: Option<&str>) -> String {
        self.run_with(role, agent, Extras::default()).await
    }

    /// [`Project::run`] with a volume and a network.
    pub async fn run_with(&self, role: &str, agent: Option<&str>, extras: Extras<'_>) -> String {
        let name = format!("{}-{role}{}", self.name, agent.map(|a| format!("-{a}")).unwrap_or_default());
        let mut labels = self.labels();
        labels.insert(ROLE_LABEL.to_owned(), role.to_owned());
        if let Some(agent) = agent {
            labels.insert(AGENT_LABEL.to_owned(), agent.to_owned());
        }
        let body = ContainerCreateBody {
            image: Some(IMAGE.to_owned()),
            labels: Some(labels),
            host_config: Some(HostConfig {
                // docker-init as PID 1: sleep dies on SIGTERM, stops take no grace period.
                init: Some(true),
                binds: extras.volume.map(|v| vec![format!("{v}:/data")]),
                network_mode: extras.network.map(str::to_owned),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        self.docker.create_container(Some(options), body).await.unwrap_or_else(|e| panic!("creating {name}: {e}"));
        self.docker
            .start_container(&name, None::<StartContainerOptions>)
            .await
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        name
    }

    /// Creates the project's volume `<project>-data`.
    pub async fn volume(&self) -> String {
        let name = format!("{}-data", self.name);
        let options =
            VolumeCreateRequest { name: Some(name.clone()), labels: Some(self.labels()), ..Default::default() };
        self.docker.create_volume(options).await.unwrap_or_else(|e| panic!("creating volume {name}: {e}"));
        name
    }

    /// Creates the project's network `<project>-net`.
    pub async fn network(&self) -> String {
        let name = format!("{}-net", self.name);
        let request = NetworkCreateRequest { name: name.clone(), labels: Some(self.labels()), ..Default::default() };
        self.docker.create_network(request).await.unwrap_or_else(|e| panic!("creating network {name}: {e}"));
        name
    }

    /// The container's inspect, `None` when it does not exist.
    pub async fn inspect(&self, container: &str) -> Option<ContainerInspectResponse> {
        self.docker.inspect_container(container, None::<InspectContainerOptions>).await.ok()
    }

    /// Whether the container runs, `None` when it does not exist.
    pub async fn running(&self, container: &str) -> Option<bool> {
        Some(self.inspect(container).await?.state?.running.unwrap_or(false))
    }

    /// The container's `State.StartedAt`.
    pub async fn started_at(&self, container: &str) -> Option<String> {
        self.inspect(container).await?.state?.started_at
    }

    /// The container's full id.
    pub async fn id(&self, container: &str) -> String {
        self.inspect(container).await.and_then(|i| i.id).unwrap_or_else(|| panic!("no container {container}"))
    }

    /// Polls until the container runs (or not), panicking after [`STATE_DEADLINE`].
    pub async fn wait_running(&self, container: &str, want: bool) {
        let deadline = Instant::now() + STATE_DEADLINE;
        loop {
            let now = self.running(container).await;
            if now == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "{container}: running {now:?}, wanted {want} within {STATE_DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether a volume of this name exists.
    pub async fn volume_exists(&self, name: &str) -> bool {
        self.docker.inspect_volume(name).await.is_ok()
    }

    /// Whether a network of this name exists.
    pub async fn network_exists(&self, name: &str) -> bool {
        self.docker.inspect_network(name, None::<bollard::query_parameters::InspectNetworkOptions>).await.is_ok()
    }
}

/// Removes every container, volume and network labelled with `project`.
async fn remove_project(docker: &Docker, project: &str) {
    let filters: HashMap<&str, Vec<String>> = HashMap::from([("label", vec![format!("{PROJECT_LABEL}={project}")])]);
    let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
    for container in docker.list_containers(Some(options)).await.unwrap_or_default() {
        if let Some(id) = container.id {
            let options = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
            let _ = docker.remove_container(&id, Some(options)).await;
        }
    }
    let volumes = docker.list_volumes(Some(ListVolumesOptionsBuilder::new().filters(&filters).build())).await;
    for volume in volumes.ok().and_then(|v| v.volumes).unwrap_or_default() {
        let _ = docker.remove_volume(&volume.name, None::<RemoveVolumeOptions>).await;
    }
    let networks = docker.list_networks(Some(ListNetworksOptionsBuilder::new().filters(&filters).build())).await;
    for network in networks.unwrap_or_default() {
        if let Some(name) = network.name {
            let _ = docker.remove_network(&name).await;
        }
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime: clean up on a thread with its own.
        let project = self.name.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async {
                if let Ok(docker) = connect().await {
                    let _ = tokio::time::timeout(Duration::from_secs(60), remove_project(&docker, &project)).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}
