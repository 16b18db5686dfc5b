//! Docker for the tests: whether an engine is reachable (Docker tests fail
//! under `CI=true` without one, and skip with a message otherwise), a tiny
//! image built from this machine's own files (nothing can be pulled), and
//! labelled containers in a project of their own, removed on drop.

use std::process::Command;
use std::sync::OnceLock;

/// The tiny image: `/bin/sleep` and the libraries it needs, on `scratch`.
pub const IMAGE: &str = "mesh-test-sleeper:local";

/// True when Docker tests should run; false (after saying why) when they
/// should be skipped. Panics when `CI=true` and no engine answers.
pub fn docker_or_skip() -> bool {
    let ok = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true but no docker engine is reachable");
    eprintln!("skipping: docker engine not reachable");
    false
}

/// Builds [`IMAGE`] once per test process from local files.
pub fn build_image() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut files = vec!["/bin/sleep".to_owned()];
        let ldd = Command::new("ldd").arg("/bin/sleep").output().expect("ldd");
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            if let Some(path) = line.split_whitespace().find(|w| w.starts_with('/')) {
                files.push(path.to_owned());
            }
        }
        let mut dockerfile = String::from("FROM scratch\n");
        for (i, file) in files.iter().enumerate() {
            let real = std::fs::canonicalize(file).expect("library path");
            std::fs::copy(&real, dir.path().join(format!("f{i}"))).expect("copying a file into the context");
            dockerfile.push_str(&format!("COPY f{i} {file}\n"));
        }
        dockerfile.push_str("ENTRYPOINT [\"/bin/sleep\"]\nCMD [\"3600\"]\n");
        std::fs::write(dir.path().join("Dockerfile"), dockerfile).expect("Dockerfile");
        let status = Command::new("docker")
            .args(["build", "-q", "-t", IMAGE])
            .arg(dir.path())
            .env("DOCKER_BUILDKIT", "0")
            .output()
            .expect("docker build");
        assert!(status.status.success(), "docker build failed: {}", String::from_utf8_lossy(&status.stderr));
    });
}

/// A compose-like project of labelled containers, removed on drop.
#[derive(Debug)]
pub struct Project {
    /// The project name (unique per test).
    pub name: String,
}

impl Project {
    /// A fresh project name.
    pub fn new() -> Self {
        build_image();
        Self { name: format!("meshtest-{}", uuid::Uuid::now_v7().simple()) }
    }

    /// Runs a container with the project's labels; returns its name.
    pub fn run(&self, role: &str, agent: Option<&str>) -> String {
        let name = format!("{}-{role}{}", self.name, agent.map(|a| format!("-{a}")).unwrap_or_default());
        let mut cmd = Command::new("docker");
        cmd.args(["run", "-d", "--name", &name, "--label"])
            .arg(format!("com.docker.compose.project={}", self.name))
            .args(["--label", &format!("mesh.role={role}")]);
        if let Some(agent) = agent {
            cmd.args(["--label", &format!("mesh.agent={agent}")]);
        }
        let out = cmd.arg(IMAGE).output().expect("docker run");
        assert!(out.status.success(), "docker run failed: {}", String::from_utf8_lossy(&out.stderr));
        name
    }

    /// Creates a labelled volume and network of the project.
    pub fn volume_and_network(&self) -> (String, String) {
        let (volume, network) = (format!("{}-data", self.name), format!("{}-net", self.name));
        let label = format!("com.docker.compose.project={}", self.name);
        for args in [
            vec!["volume", "create", "--label", &label, &volume],
            vec!["network", "create", "--label", &label, &network],
        ] {
            let out = Command::new("docker").args(&args).output().expect("docker create");
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        (volume, network)
    }

    /// `docker inspect` of one field of a container (`None` when it does not exist).
    pub fn inspect(&self, container: &str, format: &str) -> Option<String> {
        let out = Command::new("docker").args(["inspect", "--format", format, container]).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Default for Project {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let label = format!("label=com.docker.compose.project={}", self.name);
        if let Ok(out) = Command::new("docker").args(["ps", "-aq", "--filter", &label]).output() {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
        let _ = Command::new("docker").args(["volume", "rm", "-f", &format!("{}-data", self.name)]).output();
        let _ = Command::new("docker").args(["network", "rm", &format!("{}-net", self.name)]).output();
    }
}
