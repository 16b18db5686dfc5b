//! What `mesh` reads from the environment, once, at start, into typed
//! settings that are passed down: the chat platforms' secrets and settings,
//! the permissions file, the NATS credentials, stream replicas, the hooks host
//! allow-list, Redis, Docker. No other module of this crate reads the
//! environment (the source scan in `mesh_runtime::config` checks it); flags
//! with an `env` fallback are read by clap in [`crate::cli`].

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use mesh_protocol::Secret;
use mesh_protocol::layout::Replicas;
use mesh_protocol::registry::HostAllowList;
use mesh_runtime::config::NatsAuth;

use crate::command::{ConfirmConfig, Permissions};
use crate::discord;
use crate::docker::DockerHost;
use crate::engine::EngineConfig;
use crate::server::{DiscordConfig, SlackConfig};

/// Everything else `mesh` takes from the environment (besides its flags and
/// the chat platforms' settings), read once by [`Settings::from_env`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// `NATS_USER`, `NATS_PASSWORD` (or `NATS_PASSWORD_FILE`), `MESH_INBOX_PREFIX`.
    pub nats: NatsAuth,
    /// `MESH_REPLICAS` (auto when unset).
    pub replicas: Replicas,
    /// `MESH_HOOKS_ALLOWED_HOSTS` (empty: any host).
    pub allowed_hosts: HostAllowList,
    /// `MESH_TWO_PERSON_NUCLEAR`: a second director confirms a nuclear kill.
    pub two_person_nuclear: bool,
    /// `MESH_CONFIRM_WINDOW`: how long a confirmation code and its buttons
    /// work (`60s` by default, at most 15m: a Discord interaction token lives 15 minutes).
    pub confirm_window: std::time::Duration,
    /// `REDIS_URL`, for shared rate limits and dedup (`mesh bot`).
    pub redis_url: Option<String>,
    /// `DOCKER_HOST` and `MESH_COMPOSE_PROJECT`.
    pub docker: DockerHost,
    /// `USER`: the terminal's default sender is `cli:<user>`.
    pub user: Option<String>,
    /// `MESH_BROADCAST_TTL`: the time to live of a broadcast sent without
    /// `--ttl`, or why it is malformed (which stops only a broadcast and the
    /// bot's start, never `mesh kill` or `mesh resume`).
    pub broadcast_ttl: Result<Option<std::time::Duration>, String>,
    /// `MESH_BACKLOG_WARN_AFTER_S`: how long a message may wait undelivered
    /// before the bot warns that it is about to age out (default 6 days).
    pub backlog_warn_after: std::time::Duration,
}

impl Settings {
    /// Reads the settings; a malformed value stops the command with one line naming it.
    pub fn from_env() -> anyhow::Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Ok(Self {
            nats: NatsAuth::from_env()?,
            replicas: mesh_runtime::config::replicas_from_env()?,
            allowed_hosts: mesh_runtime::config::allowed_hosts_from_env(),
            two_person_nuclear: two_person_nuclear(var(env::MESH_TWO_PERSON_NUCLEAR).as_deref())?,
            confirm_window: confirm_window_from_env()?,
            redis_url: var(env::REDIS_URL),
            docker: DockerHost {
                host: var(crate::docker::HOST_ENV),
                project: crate::docker::Project::from_env(
                    var(crate::docker::PROJECT_ENV),
                    crate::docker::own_container_id(),
                ),
            },
            user: var("USER"),
            broadcast_ttl: broadcast_ttl_from_env().map_err(|e| e.to_string()),
            backlog_warn_after: match var(env::MESH_BACKLOG_WARN_AFTER_S) {
                None => crate::backlog::DEFAULT_WARN_AFTER,
                Some(raw) => raw.trim().parse().map(std::time::Duration::from_secs).map_err(|_| {
                    anyhow::anyhow!("{}={raw:?} is not a number of seconds", env::MESH_BACKLOG_WARN_AFTER_S)
                })?,
            },
        })
    }

    /// The engine's settings for a registry and permissions.
    pub fn engine_config(&self, registry_path: PathBuf, permissions: Permissions) -> EngineConfig {
        EngineConfig {
            confirm: ConfirmConfig {
                window: time::Duration::try_from(self.confirm_window)
                    .unwrap_or(crate::command::confirm::CONFIRM_WINDOW),
                two_person_nuclear: self.two_person_nuclear,
            },
            replicas: self.replicas,
            allowed_hosts: self.allowed_hosts.clone(),
            broadcast_ttl: self.broadcast_ttl.clone().unwrap_or_default(),
            ..EngineConfig::new(registry_path, permissions)
        }
    }
}

/// [`env::MESH_TWO_PERSON_NUCLEAR`]: `1`, `true`, `on`, `yes` turn the rule on;
/// unset, empty, `0`, `false`, `off`, `no` leave it off; anything else is an
/// error (a typo must not switch a security rule off unseen).
pub fn two_person_nuclear(raw: Option<&str>) -> anyhow::Result<bool> {
    match raw.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("" | "0" | "false" | "off" | "no") => Ok(false),
        Some("1" | "true" | "on" | "yes") => Ok(true),
        Some(other) => anyhow::bail!(
            "{}={other:?} is not understood; use 1 or true (on), 0 or false (off)",
            env::MESH_TWO_PERSON_NUCLEAR
        ),
    }
}

/// The confirmation window ([`env::MESH_CONFIRM_WINDOW`]), read once at start.
pub fn confirm_window_from_env() -> anyhow::Result<std::time::Duration> {
    let default = std::time::Duration::from_secs(crate::command::confirm::CONFIRM_WINDOW.whole_seconds() as u64);
    match std::env::var(env::MESH_CONFIRM_WINDOW) {
        Ok(raw) if !raw.trim().is_empty() => match crate::command::grammar::parse_duration(raw.trim()) {
            Ok(window) if window <= std::time::Duration::from_secs(15 * 60) => Ok(window),
            Ok(_) => anyhow::bail!(
                "{}: at most 15m (a Discord interaction token lives 15 minutes)",
                env::MESH_CONFIRM_WINDOW
            ),
            Err(e) => anyhow::bail!("{}: {e}; unset it (60s) or use 30s, 2m", env::MESH_CONFIRM_WINDOW),
        },
        _ => Ok(default),
    }
}

/// The default time to live of broadcasts ([`env::MESH_BROADCAST_TTL`]), read once at start.
pub fn broadcast_ttl_from_env() -> anyhow::Result<Option<std::time::Duration>> {
    match std::env::var(env::MESH_BROADCAST_TTL) {
        Ok(raw) if !raw.trim().is_empty() => crate::command::grammar::parse_duration(raw.trim())
            .map(Some)
            .map_err(|e| anyhow::anyhow!("{}: {e}; unset it or use 30s, 5m or 2h", env::MESH_BROADCAST_TTL)),
        _ => Ok(None),
    }
}

/// The secret in the variable `name` (`mesh deploy demo-gateway --token-env NAME`), trimmed.
pub fn secret_var(name: &str) -> Option<Secret> {
    std::env::var(name).ok().filter(|t| !t.trim().is_empty()).map(|t| Secret::new(t.trim()))
}

/// Environment variable names.
pub mod env {
    /// Slack signing secret.
    pub const SLACK_SIGNING_SECRET: &str = "SLACK_SIGNING_SECRET";
    /// File holding the Slack signing secret.
    pub const SLACK_SIGNING_SECRET_FILE: &str = "SLACK_SIGNING_SECRET_FILE";
    /// Slack bot token.
    pub const SLACK_BOT_TOKEN: &str = "SLACK_BOT_TOKEN";
    /// Slack app-level token (`xapp-...`), for Socket Mode.
    pub const SLACK_APP_TOKEN: &str = "SLACK_APP_TOKEN";
    /// File holding the Slack app-level token.
    pub const SLACK_APP_TOKEN_FILE: &str = "SLACK_APP_TOKEN_FILE";
    /// Slack Web API base URL.
    pub const SLACK_API_URL: &str = "SLACK_API_URL";
    /// Accepted prefix of `response_url`.
    pub const SLACK_RESPONSE_URL_PREFIX: &str = "SLACK_RESPONSE_URL_PREFIX";
    /// Channel for notifications.
    pub const SLACK_NOTIFY_CHANNEL: &str = "SLACK_NOTIFY_CHANNEL";
    /// Discord application public key (hex).
    pub const DISCORD_PUBLIC_KEY: &str = "DISCORD_PUBLIC_KEY";
    /// File holding the Discord public key.
    pub const DISCORD_PUBLIC_KEY_FILE: &str = "DISCORD_PUBLIC_KEY_FILE";
    /// Discord bot token.
    pub const DISCORD_BOT_TOKEN: &str = "DISCORD_BOT_TOKEN";
    /// File holding the Discord bot token.
    pub const DISCORD_BOT_TOKEN_FILE: &str = "DISCORD_BOT_TOKEN_FILE";
    /// Discord application id.
    pub const DISCORD_APPLICATION_ID: &str = "DISCORD_APPLICATION_ID";
    /// Discord REST API base URL.
    pub const DISCORD_API_URL: &str = "DISCORD_API_URL";
    /// Discord channel for notifications.
    pub const DISCORD_NOTIFY_CHANNEL: &str = "DISCORD_NOTIFY_CHANNEL";
    /// `on` or `off`: the Discord gateway client.
    pub const DISCORD_GATEWAY: &str = "DISCORD_GATEWAY";
    /// Permissions file.
    pub const MESH_PERMISSIONS: &str = "MESH_PERMISSIONS";
    /// Two-person rule for nuclear.
    pub const MESH_TWO_PERSON_NUCLEAR: &str = "MESH_TWO_PERSON_NUCLEAR";
    /// How long a confirmation code and its buttons work (`30s`, `2m`; default 60s).
    pub const MESH_CONFIRM_WINDOW: &str = "MESH_CONFIRM_WINDOW";
    /// Time to live of a broadcast sent without `--ttl` (`30s`, `5m`, `2h`; unset: none).
    pub const MESH_BROADCAST_TTL: &str = "MESH_BROADCAST_TTL";
    /// Redis URL.
    pub const REDIS_URL: &str = "REDIS_URL";
    /// The web console's users file (name -> `env:`/`file:` token reference).
    pub const MESH_WEB_USERS: &str = "MESH_WEB_USERS";
    /// Proxies (IP addresses, comma separated) whose `X-Forwarded-Proto: https` is believed.
    pub const MESH_WEB_TRUSTED_PROXIES: &str = "MESH_WEB_TRUSTED_PROXIES";
    /// Seconds a message may wait undelivered before the bot warns it is about to age out.
    pub const MESH_BACKLOG_WARN_AFTER_S: &str = "MESH_BACKLOG_WARN_AFTER_S";
}

fn secret_from_env(var: &str, file_var: Option<&str>) -> anyhow::Result<Option<Secret>> {
    if let Ok(value) = std::env::var(var)
        && !value.trim().is_empty()
    {
        return Ok(Some(Secret::new(value.trim())));
    }
    if let Some(file_var) = file_var
        && let Ok(path) = std::env::var(file_var)
    {
        let value = std::fs::read_to_string(&path).with_context(|| format!("reading {file_var}={path}"))?;
        return Ok(Some(Secret::new(value.trim())));
    }
    Ok(None)
}

/// Reads the Slack settings from the environment: Slack is on when a signing
/// secret (HTTP slash commands) or an app token (Socket Mode) is set.
pub fn slack_from_env() -> anyhow::Result<Option<SlackConfig>> {
    let signing_secret = secret_from_env(env::SLACK_SIGNING_SECRET, Some(env::SLACK_SIGNING_SECRET_FILE))?;
    let app_token = secret_from_env(env::SLACK_APP_TOKEN, Some(env::SLACK_APP_TOKEN_FILE))?;
    if signing_secret.is_none() && app_token.is_none() {
        return Ok(None);
    }
    Ok(Some(SlackConfig {
        signing_secret,
        app_token,
        bot_token: secret_from_env(env::SLACK_BOT_TOKEN, None)?,
        api_url: std::env::var(env::SLACK_API_URL).unwrap_or_else(|_| "https://slack.com/api".into()),
        response_url_prefix: std::env::var(env::SLACK_RESPONSE_URL_PREFIX)
            .unwrap_or_else(|_| "https://hooks.slack.com/".into()),
        notify_channel: std::env::var(env::SLACK_NOTIFY_CHANNEL).ok().filter(|c| !c.is_empty()),
    }))
}

/// Reads the Discord settings from the environment (none when neither a
/// public key nor a bot token is set).
pub fn discord_from_env() -> anyhow::Result<Option<DiscordConfig>> {
    let public_key = secret_from_env(env::DISCORD_PUBLIC_KEY, Some(env::DISCORD_PUBLIC_KEY_FILE))?;
    let bot_token = secret_from_env(env::DISCORD_BOT_TOKEN, Some(env::DISCORD_BOT_TOKEN_FILE))?;
    if public_key.is_none() && bot_token.is_none() {
        return Ok(None);
    }
    let public_key = public_key.map(|k| k.expose().parse::<discord::verify::PublicKey>()).transpose()?;
    let var = |name: &str| std::env::var(name).ok().map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    let gateway = match var(env::DISCORD_GATEWAY).as_deref() {
        None | Some("on" | "1" | "true") => bot_token.is_some(),
        Some("off" | "0" | "false") => false,
        Some(other) => anyhow::bail!("{}={other:?} is not on or off", env::DISCORD_GATEWAY),
    };
    Ok(Some(DiscordConfig {
        public_key,
        bot_token,
        application_id: var(env::DISCORD_APPLICATION_ID),
        api_url: var(env::DISCORD_API_URL).unwrap_or_else(|| discord::api::DEFAULT_API_URL.into()),
        notify_channel: var(env::DISCORD_NOTIFY_CHANNEL),
        gateway,
    }))
}

/// Why the permissions file cannot be used. Every command that needs a role,
/// and `mesh bot`, stops on it (fail closed).
#[derive(Debug, thiserror::Error)]
pub enum PermissionsFileError {
    /// The file cannot be read.
    #[error("cannot read the permissions file {path} ({}); fix the path or unset it", env::MESH_PERMISSIONS)]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not JSON, names an unknown role or key, or a malformed identity.
    #[error(
        "the permissions file {path} ({}) is invalid, so commands that need a role are refused; fix it",
        env::MESH_PERMISSIONS
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The fault, with its line and column.
        #[source]
        source: serde_json::Error,
    },
}

/// Reads the permissions file named by `MESH_PERMISSIONS`. None set: chat
/// users may only run `help`, and the terminal is director.
pub fn permissions_from_env() -> Result<Permissions, PermissionsFileError> {
    // `var_os`: a path that is not UTF-8 is still a file to read (failing closed
    // if it is unusable), never "no file" (which would make the terminal director).
    match std::env::var_os(env::MESH_PERMISSIONS) {
        // Set but empty (a compose default) means unset.
        Some(path) if !path.to_string_lossy().trim().is_empty() => permissions_from_file(Path::new(&path)),
        _ => Ok(Permissions::new()),
    }
}

/// Reads one permissions file.
pub fn permissions_from_file(path: &Path) -> Result<Permissions, PermissionsFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| PermissionsFileError::Unreadable { path: path.to_owned(), source })?;
    serde_json::from_str(&text).map_err(|source| PermissionsFileError::Invalid { path: path.to_owned(), source })
}

/// The variable holding the agent's mesh token (never a flag: it would land in shell history).
pub const MESH_TOKEN_ENV: &str = "MESH_TOKEN";

/// `mesh mcp`: the agent's mesh token from `MESH_TOKEN` (or the file named by `MESH_TOKEN_FILE`).
pub fn token_from_env() -> anyhow::Result<String> {
    if let Ok(token) = std::env::var(MESH_TOKEN_ENV)
        && !token.trim().is_empty()
    {
        return Ok(token.trim().to_owned());
    }
    if let Ok(path) = std::env::var("MESH_TOKEN_FILE") {
        let token =
            std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("cannot read MESH_TOKEN_FILE {path}: {e}"))?;
        return Ok(token.trim().to_owned());
    }
    anyhow::bail!("set {MESH_TOKEN_ENV} to the agent's mesh_token (the registry's reference for it)")
}

/// Why the web console's settings cannot be used (`mesh bot` does not start: fail closed).
#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    /// The users file cannot be read.
    #[error("cannot read the web users file {path} ({}); fix the path or unset it", env::MESH_WEB_USERS)]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The users file is not a JSON object of names to token references.
    #[error(
        "the web users file {path} ({}) is invalid; write {{\"alice\": \"env:MESH_TOKEN_ALICE\"}}",
        env::MESH_WEB_USERS
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The fault.
        #[source]
        source: serde_json::Error,
    },
    /// A token reference that is not `env:` or `file:`, or does not resolve.
    #[error("web user {user}: {problem}")]
    Token {
        /// The user.
        user: String,
        /// What is wrong, and what to do.
        problem: String,
    },
    /// The users are unusable (name, length, shared token).
    #[error(transparent)]
    Users(#[from] crate::web::auth::WebUsersError),
    /// A proxy address that is not an IP address.
    #[error(
        "{} has {value:?}, which is not an IP address; list the proxies' addresses, comma separated",
        env::MESH_WEB_TRUSTED_PROXIES
    )]
    Proxy {
        /// The entry as written.
        value: String,
    },
}

/// The web console's settings: none when `MESH_WEB_USERS` is unset. Tokens
/// are `env:NAME` or `file:PATH` references (a `file:` only inside
/// `secrets/` beside the users file or `/run/secrets`), resolved once, here.
pub fn web_from_env() -> Result<Option<crate::web::WebConfig>, WebConfigError> {
    let Some(path) = std::env::var_os(env::MESH_WEB_USERS).filter(|p| !p.to_string_lossy().trim().is_empty()) else {
        return Ok(None);
    };
    let path = PathBuf::from(path);
    let proxies = std::env::var(env::MESH_WEB_TRUSTED_PROXIES).unwrap_or_default();
    web_from_file(&path, &proxies).map(Some)
}

/// Reads a web users file and a proxies list (see [`web_from_env`]).
pub fn web_from_file(path: &Path, proxies: &str) -> Result<crate::web::WebConfig, WebConfigError> {
    use mesh_protocol::secret::SecretRef;
    let text =
        std::fs::read_to_string(path).map_err(|source| WebConfigError::Unreadable { path: path.to_owned(), source })?;
    let raw: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&text).map_err(|source| WebConfigError::Invalid { path: path.to_owned(), source })?;
    let resolver = mesh_runtime::secrets::OsSecrets::for_registry(path);
    let mut users = Vec::new();
    for (user, reference) in raw {
        let token_error = |problem: String| WebConfigError::Token { user: user.clone(), problem };
        let parsed = SecretRef::parse(&reference).map_err(|e| token_error(e.to_string()))?;
        if matches!(parsed, SecretRef::Literal(_)) {
            return Err(token_error("write the token as env:NAME or file:PATH, never the token itself".into()));
        }
        let token = parsed.resolve(&resolver).map_err(|e| token_error(e.to_string()))?;
        users.push((user, token));
    }
    let trusted_proxies = proxies
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().map_err(|_| WebConfigError::Proxy { value: p.to_owned() }))
        .collect::<Result<_, _>>()?;
    Ok(crate::web::WebConfig { users: crate::web::auth::WebUsers::new(users)?, trusted_proxies })
}

#[cfg(test)]
mod web_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn web_users_resolve_from_the_secrets_directory_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("secrets")).unwrap();
        std::fs::write(dir.path().join("secrets/alice"), "alice-token-0123456789\n").unwrap();
        std::fs::write(dir.path().join("outside"), "outside-token-0123456789").unwrap();
        let users = dir.path().join("web-users.json");
        let write = |json: serde_json::Value| std::fs::write(&users, json.to_string()).unwrap();
        let alice = dir.path().join("secrets/alice").display().to_string();
        write(serde_json::json!({"alice": format!("file:{alice}")}));
        let config = web_from_file(&users, "127.0.0.1, ::1").unwrap();
        assert_eq!(config.users.by_token("alice-token-0123456789"), Some("alice"));
        assert_eq!(config.trusted_proxies.len(), 2);
        let outside = dir.path().join("outside").display().to_string();
        write(serde_json::json!({"bob": format!("file:{outside}")}));
        let e = web_from_file(&users, "").unwrap_err().to_string();
        assert!(e.contains("web user bob") && e.contains("outside the secrets directories"), "{e}");
        write(serde_json::json!({"bob": "bob-token-0123456789"}));
        let e = web_from_file(&users, "").unwrap_err().to_string();
        assert!(e.contains("env:NAME or file:PATH"), "{e}");
        write(serde_json::json!({"bob": "env:MESH_TOKEN_NOT_SET_ANYWHERE_42"}));
        let e = web_from_file(&users, "").unwrap_err().to_string();
        assert!(e.contains("MESH_TOKEN_NOT_SET_ANYWHERE_42"), "{e}");
        write(serde_json::json!({"alice": format!("file:{alice}")}));
        assert!(web_from_file(&users, "proxy.local").unwrap_err().to_string().contains("not an IP address"));
        std::fs::write(&users, "[]").unwrap();
        assert!(web_from_file(&users, "").unwrap_err().to_string().contains("is invalid"));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn the_two_person_rule_takes_plain_words_and_refuses_a_typo() {
        for (raw, on) in [(None, false), (Some(""), false), (Some("0"), false), (Some("off"), false)] {
            assert_eq!(super::two_person_nuclear(raw).unwrap(), on, "{raw:?}");
        }
        for raw in ["1", "true", "TRUE", "on", "yes"] {
            assert!(super::two_person_nuclear(Some(raw)).unwrap(), "{raw}");
        }
        let err = super::two_person_nuclear(Some("ture")).unwrap_err().to_string();
        assert!(err.contains("MESH_TWO_PERSON_NUCLEAR=\"ture\" is not understood") && !err.contains('\n'), "{err}");
    }
}
