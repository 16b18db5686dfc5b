//! Reads the registry file (`tokens.json`) from disk, with errors that say
//! which file and what to fix.

use std::path::{Path, PathBuf};

use mesh_protocol::Registry;
use mesh_protocol::registry::{HostAllowList, RegistryErrors};

/// Default registry path, relative to the working directory.
pub const DEFAULT_REGISTRY: &str = "mesh/tokens.json";
/// Environment variable naming the registry path.
pub const REGISTRY_ENV: &str = "MESH_REGISTRY";

/// Why the registry could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RegistryFileError {
    #[error("registry {path} not found; create it or point --registry / {REGISTRY_ENV} at it")]
    Missing { path: PathBuf },
    #[error("cannot read registry {path}: {source}")]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error("registry {path} is invalid: {errors}")]
    Invalid { path: PathBuf, errors: RegistryErrors },
}

/// Loads and validates the registry at `path`, hosts checked against
/// `allowed` (`MESH_HOOKS_ALLOWED_HOSTS`, read once at start by
/// [`crate::config::allowed_hosts_from_env`]; empty allows any host).
pub fn load(path: &Path, allowed: &HostAllowList) -> Result<Registry, RegistryFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => RegistryFileError::Missing { path: path.to_owned() },
        _ => RegistryFileError::Unreadable { path: path.to_owned(), source },
    })?;
    let invalid = |errors| RegistryFileError::Invalid { path: path.to_owned(), errors };
    let registry = Registry::parse(&text).map_err(invalid)?;
    registry.check_hosts(allowed).map_err(invalid)?;
    Ok(registry)
}
