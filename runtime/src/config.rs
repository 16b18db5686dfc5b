//! The settings the bot and the listeners share, read from the environment
//! once, at start, into typed values that are passed down: NATS credentials
//! and inbox prefix, the stream replicas, the hooks host allow-list, the log
//! format. Together with the binaries' own config modules this is the only
//! place that reads the environment (checked by `layout`'s source scan below).

use mesh_protocol::Secret;
use mesh_protocol::layout::Replicas;
use mesh_protocol::registry::{HOOKS_ALLOWED_HOSTS_ENV, HostAllowList};

use crate::nats::{
    INBOX_PREFIX_ENV, NATS_PASSWORD_ENV, NATS_PASSWORD_FILE_ENV, NATS_USER_ENV, NatsError, REPLICAS_ENV,
};

/// How a process authenticates to NATS, and the inbox prefix its permissions
/// expect. The default: no credentials, the standard `_INBOX` prefix.
#[derive(Debug, Clone, Default)]
pub struct NatsAuth {
    /// User name and password ([`NATS_USER_ENV`], [`NATS_PASSWORD_ENV`] or
    /// the file named by [`NATS_PASSWORD_FILE_ENV`]).
    pub user: Option<(String, Secret)>,
    /// [`INBOX_PREFIX_ENV`] (`_INBOX_<agent>`).
    pub inbox_prefix: Option<String>,
}

/// A variable's value, `None` when unset or empty.
fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl NatsAuth {
    /// Reads the credentials and the inbox prefix from the environment.
    pub fn from_env() -> Result<Self, NatsError> {
        let user = match var(NATS_USER_ENV) {
            None => None,
            Some(user) => {
                let password = match (var(NATS_PASSWORD_ENV), var(NATS_PASSWORD_FILE_ENV)) {
                    (Some(p), _) => p,
                    (None, Some(path)) => std::fs::read_to_string(&path).map(|p| p.trim().to_owned()).map_err(|e| {
                        NatsError::Credentials(format!("cannot read {NATS_PASSWORD_FILE_ENV} {path}: {e}"))
                    })?,
                    (None, None) => {
                        return Err(NatsError::Credentials(format!(
                            "{NATS_USER_ENV} is set but neither {NATS_PASSWORD_ENV} nor {NATS_PASSWORD_FILE_ENV}"
                        )));
                    }
                };
                Some((user, Secret::new(password)))
            }
        };
        Ok(Self { user, inbox_prefix: var(INBOX_PREFIX_ENV) })
    }
}

/// The replicas setting of [`REPLICAS_ENV`] (auto when unset or empty).
pub fn replicas_from_env() -> Result<Replicas, NatsError> {
    match std::env::var(REPLICAS_ENV) {
        Ok(raw) if !raw.trim().is_empty() => raw.parse().map_err(NatsError::Replicas),
        _ => Ok(Replicas::Auto),
    }
}

/// The hosts registry URLs may point at ([`HOOKS_ALLOWED_HOSTS_ENV`]; empty: any).
pub fn allowed_hosts_from_env() -> HostAllowList {
    HostAllowList::parse(&std::env::var(HOOKS_ALLOWED_HOSTS_ENV).unwrap_or_default())
}

/// True when [`crate::logging::LOG_FORMAT_ENV`] asks for JSON lines.
pub fn log_json_from_env() -> bool {
    std::env::var(crate::logging::LOG_FORMAT_ENV).is_ok_and(|v| v == "json")
}

/// The environment is read only by the config modules and `main`, checked on
/// the sources of every crate that runs in production.
#[cfg(test)]
mod layout {
    use std::path::{Path, PathBuf};

    /// Files that may read the environment: the config modules, the secret
    /// resolver (a token reference `env:NAME` names a variable by design) and
    /// the binaries' `main`.
    const ALLOWED: &[&str] = &[
        "runtime/src/config.rs",
        "runtime/src/secrets.rs",
        // The log filter (`MESH_LOG`), read once by `logging::init` at start.
        "runtime/src/logging.rs",
        "bot/src/config.rs",
        "bot/src/main.rs",
        "listener/src/main.rs",
    ];

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
            let path = entry.map(|e| e.path()).unwrap_or_default();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// Where a file reads the environment: `std::env::var`, `var_os`, `vars`.
    fn env_reads(text: &str) -> Vec<(usize, String)> {
        text.lines()
            .enumerate()
            .filter(|(_, line)| {
                let code = line.split("//").next().unwrap_or_default();
                ["env::var(", "env::var_os(", "env::vars(", "env::vars_os(", "use std::env", "try_from_env("]
                    .iter()
                    .any(|read| code.contains(read))
            })
            .map(|(n, line)| (n + 1, line.trim().to_owned()))
            .collect()
    }

    #[test]
    fn the_scan_finds_a_read() {
        assert_eq!(env_reads("let x = std::env::var(\"A\");\n// std::env::var(\"B\")").len(), 1);
        assert_eq!(env_reads("let y = std::env::var_os(\"A\");").len(), 1);
        assert_eq!(env_reads("use std::env::var;\nlet z = var(\"A\");").len(), 1);
        assert_eq!(env_reads("let f = EnvFilter::try_from_env(LOG);").len(), 1);
    }

    #[test]
    fn only_config_modules_read_the_environment() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut offenders = Vec::new();
        for krate in ["protocol", "runtime", "engine", "listener", "bot"] {
            let mut files = Vec::new();
            rust_files(&root.join(krate).join("src"), &mut files);
            assert!(!files.is_empty(), "no sources under {krate}/src");
            for file in files {
                let relative = file.strip_prefix(&root).unwrap_or(&file).to_string_lossy().replace('\\', "/");
                if ALLOWED.contains(&relative.as_str()) {
                    continue;
                }
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                offenders.extend(env_reads(&text).into_iter().map(|(n, line)| format!("{relative}:{n}: {line}")));
            }
        }
        assert!(
            offenders.is_empty(),
            "read the environment once, in a config module, and pass the typed value down:\n{}",
            offenders.join("\n")
        );
    }
}
