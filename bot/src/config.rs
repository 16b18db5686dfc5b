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
}

impl Settings {
    /// Reads the settings; a malformed value stops the command with one line naming it.
    pub fn from_env() -> anyhow::Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Ok(Self {
            nats: NatsAuth::from_env()?,
            replicas: mesh_runtime::config::replicas_from_env()?,
            allowed_hosts: mesh_runtime::config::allowed_hosts_from_env(),
            two_person_nuclear: var(env::MESH_TWO_PERSON_NUCLEAR).is_some_and(|v| v == "1" || v == "true"),
            redis_url: var(env::REDIS_URL),
            docker: DockerHost {
                host: var(crate::docker::HOST_ENV),
                project: var(crate::docker::PROJECT_ENV).unwrap_or_else(|| crate::docker::DEFAULT_PROJECT.to_owned()),
            },
            user: var("USER"),
            broadcast_ttl: broadcast_ttl_from_env().map_err(|e| e.to_string()),
        })
    }

    /// The engine's settings for a registry and permissions.
    pub fn engine_config(&self, registry_path: PathBuf, permissions: Permissions) -> EngineConfig {
        EngineConfig {
            confirm: ConfirmConfig {
                window: crate::command::confirm::CONFIRM_WINDOW,
                two_person_nuclear: self.two_person_nuclear,
            },
            replicas: self.replicas,
            allowed_hosts: self.allowed_hosts.clone(),
            broadcast_ttl: self.broadcast_ttl.clone().unwrap_or_default(),
            ..EngineConfig::new(registry_path, permissions)
        }
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
    /// Time to live of a broadcast sent without `--ttl` (`30s`, `5m`, `2h`; unset: none).
    pub const MESH_BROADCAST_TTL: &str = "MESH_BROADCAST_TTL";
    /// Redis URL.
    pub const REDIS_URL: &str = "REDIS_URL";
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
