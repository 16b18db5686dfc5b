//! Resolves `env:NAME` and `file:/path` token references against the real
//! environment and file system.

use std::path::Path;

use mesh_protocol::SecretResolver;

/// Reads the process environment and the file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsSecrets;

impl SecretResolver for OsSecrets {
    fn env_var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn read_file(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}
