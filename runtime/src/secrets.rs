//! Resolves `env:NAME` and `file:/path` token references against the real
//! environment and file system. A `file:` token is read only from a secrets
//! directory: `secrets/` beside the registry file, or `/run/secrets` (Docker
//! and Kubernetes secrets), after symlinks are resolved, so a registry entry
//! cannot point a token at the mesh's own passwords or any other file and
//! have it sent to a gateway.

use std::io;
use std::path::{Path, PathBuf};

use mesh_protocol::SecretResolver;

/// The directory beside the registry that holds token files.
pub const SECRETS_DIR_NAME: &str = "secrets";
/// Where container platforms mount secrets.
pub const RUN_SECRETS: &str = "/run/secrets";

/// The directories `file:` tokens may be read from for a registry at `registry`.
pub fn secrets_dirs(registry: &Path) -> Vec<PathBuf> {
    let dir = registry.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    vec![dir.join(SECRETS_DIR_NAME), PathBuf::from(RUN_SECRETS)]
}

/// Reads `path` if, with symlinks resolved, it lies inside one of `dirs`.
pub fn read_confined(path: &Path, dirs: &[PathBuf]) -> io::Result<String> {
    let real = path.canonicalize()?;
    let inside = dirs.iter().filter_map(|d| d.canonicalize().ok()).any(|d| real.starts_with(d));
    if !inside {
        let shown: Vec<_> = dirs.iter().map(|d| d.display().to_string()).collect();
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("it is outside the secrets directories ({}); move the file there", shown.join(", ")),
        ));
    }
    std::fs::read_to_string(real)
}

/// Reads the process environment, and token files from the secrets directories.
#[derive(Debug, Clone)]
pub struct OsSecrets {
    dirs: Vec<PathBuf>,
}

impl OsSecrets {
    /// Token files come from `secrets/` beside `registry` or `/run/secrets`.
    pub fn for_registry(registry: &Path) -> Self {
        Self { dirs: secrets_dirs(registry) }
    }
}

impl SecretResolver for OsSecrets {
    fn env_var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn read_file(&self, path: &Path) -> io::Result<String> {
        read_confined(path, &self.dirs)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_files_inside_the_secrets_directory_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("tokens.json");
        std::fs::create_dir(dir.path().join("secrets")).unwrap();
        std::fs::write(dir.path().join("secrets/nova"), "tok").unwrap();
        std::fs::write(dir.path().join("nats-password"), "admin-pw").unwrap();
        let secrets = OsSecrets::for_registry(&registry);
        assert_eq!(secrets.read_file(&dir.path().join("secrets/nova")).unwrap(), "tok");
        for outside in [dir.path().join("nats-password"), dir.path().join("secrets/../nats-password")] {
            let e = secrets.read_file(&outside).unwrap_err();
            assert!(e.to_string().contains("outside the secrets directories"), "{e}");
        }
        // A symlink inside pointing outside is judged by where it points.
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.path().join("nats-password"), dir.path().join("secrets/link")).unwrap();
            assert!(secrets.read_file(&dir.path().join("secrets/link")).is_err());
        }
    }
}
