//! Tracing set-up shared by the binaries: `RUST_LOG`-style filter from
//! `MESH_LOG` (default `info`), JSON lines when `MESH_LOG_FORMAT=json`.

use tracing_subscriber::EnvFilter;

/// Environment variable with the log filter.
pub const LOG_ENV: &str = "MESH_LOG";
/// Environment variable selecting `json` or `text` output.
pub const LOG_FORMAT_ENV: &str = "MESH_LOG_FORMAT";
/// Filter used when `MESH_LOG` is unset.
pub const DEFAULT_FILTER: &str = "info,async_nats=warn,hyper=warn,reqwest=warn";

/// Installs the global subscriber, writing to stderr. Safe to call twice.
pub fn init() {
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let json = crate::config::log_json_from_env();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
