//! The permissions file of the agents a listener serves (`MESH_PERMISSIONS`):
//! read at start, where an unusable file stops the listener (as it stops
//! `mesh bot`), then re-read on every registry poll. A file that becomes
//! unusable refuses every agent call with the reason until it is fixed (fail
//! closed); the listener never falls back to the default roles.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mesh_engine::command::Permissions;
use mesh_engine::engine::LivePermissions;
use tokio::sync::watch;
use tracing::{error, info};

/// The file `MESH_PERMISSIONS` names, as `mesh bot` reads it: set but blank
/// (a compose default, `"${MESH_PERMISSIONS:-}"`) means unset.
pub fn configured(raw: Option<&OsStr>) -> Option<PathBuf> {
    raw.filter(|raw| !raw.to_string_lossy().trim().is_empty()).map(PathBuf::from)
}

/// Reads and parses the file; the error says which file, what is wrong and what to do.
pub fn read(path: &Path) -> Result<Permissions, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!("cannot read the permissions file {} (MESH_PERMISSIONS): {e}; fix the path or unset it", path.display())
    })?;
    serde_json::from_str(&text)
        .map_err(|e| format!("the permissions file {} (MESH_PERMISSIONS) is invalid: {e}; fix it", path.display()))
}

/// A permissions file followed while the listener runs.
#[derive(Debug)]
pub struct Followed {
    path: PathBuf,
    live: watch::Sender<Result<Arc<Permissions>, String>>,
}

impl Followed {
    /// Reads `path` once: an unusable file is an error (the listener does not start).
    pub fn start(path: PathBuf) -> Result<(Self, LivePermissions), String> {
        let permissions = read(&path)?;
        let (live, rx) = watch::channel(Ok(Arc::new(permissions)));
        Ok((Self { path, live }, rx))
    }

    /// Reads the file again and passes on what changed: new permissions, or
    /// why the file is unusable now (agent calls are refused until it is fixed).
    pub fn reload(&self) {
        let now = read(&self.path).map(Arc::new).map_err(|e| {
            format!("{e}; agents' commands are refused until it is fixed (the listener does not fall back to defaults)")
        });
        self.live.send_if_modified(|known| {
            if *known == now {
                return false;
            }
            match &now {
                Ok(_) => info!(file = %self.path.display(), "permissions file changed; applying"),
                Err(e) => error!(error = %e, "permissions file unusable; refusing agents' commands"),
            }
            *known = now;
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blank_setting_is_no_file_as_for_the_bot() {
        for blank in ["", "  ", "\t"] {
            assert_eq!(configured(Some(OsStr::new(blank))), None, "{blank:?}");
        }
        assert_eq!(configured(None), None);
        assert_eq!(configured(Some(OsStr::new("/etc/mesh/p.json"))), Some(PathBuf::from("/etc/mesh/p.json")));
    }
}
