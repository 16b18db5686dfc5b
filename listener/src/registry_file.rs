//! Reads the registry file (`tokens.json`) from disk, with errors that say
//! which file and what to fix.

use std::path::{Path, PathBuf};

use mesh_protocol::Registry;
use mesh_protocol::registry::RegistryErrors;

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
    #[error("registry {path} is invalid:\n{errors}")]
    Invalid { path: PathBuf, errors: RegistryErrors },
}

/// Loads and validates the registry at `path`.
pub fn load(path: &Path) -> Result<Registry, RegistryFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => RegistryFileError::Missing { path: path.to_owned() },
        _ => RegistryFileError::Unreadable { path: path.to_owned(), source },
    })?;
    Registry::parse(&text).map_err(|errors| RegistryFileError::Invalid { path: path.to_owned(), errors })
}
