//! The agent registry, `tokens.json`: the old mesh's format (one object per
//! agent with `gateway`, `gateway_token`, `hooks_token`, `hooks_url`, `status`)
//! plus optional mesh fields (`delivery`, `model`, `name`). Parsing checks
//! structure; [`Registry::resolve_tokens`] checks that every token reference
//! resolves. Neither `Debug` nor any error ever shows a token.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use url::Url;

use crate::agent_id::AgentId;
use crate::secret::{Secret, SecretError, SecretRef, SecretResolver};

/// Whether a listener runs for an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Active,
    Inactive,
}

/// How a listener hands a message to the agent's gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// `POST hooks_url` with `{"text", "mode"}` (passive, queued).
    #[default]
    Wake,
    /// `POST /hooks/agent`: an isolated agent run.
    Agent,
    /// `POST /v1/chat/completions`: the reply is routed back.
    Chat,
}

impl DeliveryMode {
    fn parse(raw: &str) -> Option<Self> {
        match raw {
            "wake" => Some(Self::Wake),
            "agent" => Some(Self::Agent),
            "chat" => Some(Self::Chat),
            _ => None,
        }
    }
}

/// One validated registry entry.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct Agent {
    /// The agent's id (the registry key).
    #[serde(skip)]
    pub id: AgentId,
    /// The gateway: `host:port` (plain HTTP) or `https://host:port`, for
    /// `agent` and `chat` delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// The gateway's operator token (for `chat` delivery).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_token: Option<SecretRef>,
    /// The token sent as `Authorization: Bearer` to the hook.
    pub hooks_token: SecretRef,
    /// The agent's own credential on the mesh: the Bearer token it presents to
    /// a listener's `POST /v1/messages` (and `/mcp`), which picks the agent.
    /// Without one the agent cannot send.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_token: Option<SecretRef>,
    /// The wake hook, `http(s)://host:port/hooks/wake`.
    pub hooks_url: Url,
    /// Active or inactive.
    pub status: Status,
    /// How messages are handed over.
    #[serde(skip_serializing_if = "is_default_mode")]
    pub delivery: DeliveryMode,
    /// The model named in chat completions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// A display name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Deliveries in flight its consumer is set up for (1 to
    /// [`crate::layout::MAX_CONCURRENCY`], default 1: per-agent order).
    #[serde(skip_serializing_if = "is_one")]
    pub concurrency: u16,
    /// In order (concurrency 1): messages its consumer hands the listener at
    /// once (1 to [`crate::layout::MAX_PREFETCH`], default
    /// [`crate::layout::DEFAULT_PREFETCH`]); 1 for listener replicas that
    /// must keep the order between them.
    #[serde(skip_serializing_if = "is_default_prefetch")]
    pub prefetch: u16,
    /// The operator's opt-in to sending `gateway_token` over plain HTTP to a
    /// host that is not loopback (a private network they trust).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_plaintext: bool,
}

fn is_one(n: &u16) -> bool {
    *n == 1
}

fn is_default_prefetch(n: &u16) -> bool {
    *n == crate::layout::DEFAULT_PREFETCH
}

fn is_default_mode(mode: &DeliveryMode) -> bool {
    *mode == DeliveryMode::Wake
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("id", &self.id)
            .field("gateway", &self.gateway)
            .field("gateway_token", &self.gateway_token)
            .field("hooks_token", &self.hooks_token)
            .field("mesh_token", &self.mesh_token)
            .field("hooks_url", &self.hooks_url.as_str())
            .field("status", &self.status)
            .field("delivery", &self.delivery)
            .field("model", &self.model)
            .field("concurrency", &self.concurrency)
            .field("prefetch", &self.prefetch)
            .field("allow_plaintext", &self.allow_plaintext)
            .finish()
    }
}

/// An agent's tokens, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTokens {
    /// Sent to the hook.
    pub hooks: Secret,
    /// Sent to the gateway's chat endpoint.
    pub gateway: Option<Secret>,
    /// What the agent presents to the mesh (`mesh_token`).
    pub mesh: Option<Secret>,
}

impl Agent {
    /// True when a listener should run for this agent.
    pub fn is_active(&self) -> bool {
        self.status == Status::Active
    }

    /// The tuning its consumer is created and kept with (by the bot, `mesh
    /// agents add` and senders); a listener runs within it.
    pub fn consumer_tuning(&self) -> crate::layout::ConsumerTuning {
        crate::layout::ConsumerTuning::for_agent(self.concurrency, self.prefetch)
    }

    /// The gateway's base URL: `http://host:port/` or `https://host:port/`
    /// when `gateway` is set, else the hook's origin.
    pub fn gateway_base(&self) -> Url {
        if let Some(gateway) = &self.gateway
            && let Ok(url) = gateway_url(gateway)
        {
            return url;
        }
        let mut base = self.hooks_url.clone();
        base.set_path("/");
        base
    }

    /// Resolves its tokens and checks they all differ.
    pub fn resolve_tokens(&self, resolver: &dyn SecretResolver) -> Result<AgentTokens, RegistryError> {
        let field_err = |field: &'static str| {
            let agent = self.id.to_string();
            move |source: SecretError| RegistryError::Token { agent, field, source }
        };
        let hooks = self.hooks_token.resolve(resolver).map_err(field_err("hooks_token"))?;
        let gateway = match &self.gateway_token {
            Some(r) => Some(r.resolve(resolver).map_err(field_err("gateway_token"))?),
            None => None,
        };
        if gateway.as_ref() == Some(&hooks) {
            return Err(RegistryError::SameTokens { agent: self.id.to_string() });
        }
        let mesh = match &self.mesh_token {
            Some(r) => Some(r.resolve(resolver).map_err(field_err("mesh_token"))?),
            None => None,
        };
        if let Some(mesh) = &mesh
            && (*mesh == hooks || gateway.as_ref() == Some(mesh))
        {
            return Err(RegistryError::MeshTokenReused { agent: self.id.to_string() });
        }
        Ok(AgentTokens { hooks, gateway, mesh })
    }
}

/// A registry problem, naming the agent and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("registry is not a JSON object of agents: {0}")]
    NotAnObject(String),
    #[error("registry key {key:?}: {source}")]
    BadId { key: String, source: crate::agent_id::AgentIdError },
    #[error("agent {agent:?}: {message}")]
    Field { agent: String, message: String },
    #[error("agent {agent:?}: field {field}: {reason}")]
    BadValue { agent: String, field: &'static str, reason: String },
    #[error("agent {agent:?}: field {field}: {source}")]
    Token { agent: String, field: &'static str, source: SecretError },
    #[error("agent {agent:?}: hooks_token and gateway_token are the same; give the hook its own token")]
    SameTokens { agent: String },
    #[error(
        "agent {agent:?}: mesh_token is the same as its hooks_token or gateway_token; give the agent a mesh token of \
         its own (whoever holds the hook token could otherwise send as the agent)"
    )]
    MeshTokenReused { agent: String },
    #[error(
        "agents {first:?} and {second:?} would share the NATS user password variable {variable} (`-` and `_` map to the same name); rename one of them"
    )]
    SharedPassword { first: String, second: String, variable: String },
    #[error(
        "agents {first:?} and {second:?} have the same mesh_token; give each agent its own (whoever holds it could \
         send as either)"
    )]
    SharedMeshToken { first: String, second: String },
    #[error("agent {agent:?}: delivery \"chat\" needs {field}")]
    ChatNeeds { agent: String, field: &'static str },
}

/// Pairs of agents whose resolved mesh tokens are the same value (different
/// references, same secret): neither may be authenticated by it.
pub fn shared_mesh_tokens<'a>(
    tokens: impl IntoIterator<Item = (&'a AgentId, &'a crate::Secret)>,
) -> Vec<(AgentId, AgentId)> {
    let mut seen: Vec<(&AgentId, &crate::Secret)> = Vec::new();
    let mut shared = Vec::new();
    for (id, token) in tokens {
        if let Some((first, _)) = seen.iter().find(|(_, known)| known.expose() == token.expose()) {
            shared.push(((*first).clone(), id.clone()));
        }
        seen.push((id, token));
    }
    shared
}

/// Several registry problems at once, on one line separated by `; ` (errors are one line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct RegistryErrors(pub Vec<RegistryError>);

/// The raw shape of one entry, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    gateway: Option<String>,
    gateway_token: Option<String>,
    hooks_token: String,
    mesh_token: Option<String>,
    hooks_url: String,
    status: Option<String>,
    delivery: Option<String>,
    model: Option<String>,
    name: Option<String>,
    concurrency: Option<i64>,
    prefetch: Option<i64>,
    #[serde(default)]
    allow_plaintext: bool,
}

/// The whole registry, by agent id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    agents: BTreeMap<AgentId, Agent>,
}

impl Registry {
    /// Parses and validates `tokens.json`, reporting every problem found.
    pub fn parse(json: &str) -> Result<Self, RegistryErrors> {
        let object: BTreeMap<String, serde_json::Value> =
            serde_json::from_str(json).map_err(|e| RegistryErrors(vec![RegistryError::NotAnObject(e.to_string())]))?;
        let mut agents = BTreeMap::new();
        let mut errors = Vec::new();
        for (key, value) in object {
            match parse_agent(&key, value) {
                Ok(agent) => {
                    agents.insert(agent.id.clone(), agent);
                }
                Err(mut errs) => errors.append(&mut errs),
            }
        }
        // `mesh deploy render` names each listener's password variable after
        // its id: two ids that map to one name would share a NATS user's password.
        let mut variables: BTreeMap<String, &AgentId> = BTreeMap::new();
        for id in agents.keys() {
            let variable = crate::access::password_env(&crate::access::listener_user(id));
            if let Some(first) = variables.insert(variable.clone(), id) {
                errors.push(RegistryError::SharedPassword {
                    first: first.to_string(),
                    second: id.to_string(),
                    variable,
                });
            }
        }
        // A mesh token names its agent: the same reference for two agents would let either send as the other.
        let mut mesh_tokens: Vec<(&SecretRef, &AgentId)> = Vec::new();
        for agent in agents.values() {
            let Some(token) = &agent.mesh_token else { continue };
            if let Some((_, first)) = mesh_tokens.iter().find(|(known, _)| *known == token) {
                errors.push(RegistryError::SharedMeshToken { first: first.to_string(), second: agent.id.to_string() });
            }
            mesh_tokens.push((token, &agent.id));
        }
        if errors.is_empty() { Ok(Self { agents }) } else { Err(RegistryErrors(errors)) }
    }

    /// Writes the registry back in the `tokens.json` format.
    pub fn to_json(&self) -> String {
        let map: BTreeMap<&str, &Agent> = self.agents.iter().map(|(id, a)| (id.as_str(), a)).collect();
        let mut out = serde_json::to_string_pretty(&map).expect("a registry always serializes");
        out.push('\n');
        out
    }

    /// Resolves every token of every active agent, reporting every problem.
    pub fn resolve_tokens(
        &self,
        resolver: &dyn SecretResolver,
    ) -> Result<BTreeMap<AgentId, AgentTokens>, RegistryErrors> {
        let mut tokens = BTreeMap::new();
        let mut errors = Vec::new();
        for agent in self.active() {
            match agent.resolve_tokens(resolver) {
                Ok(t) => {
                    tokens.insert(agent.id.clone(), t);
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() { Ok(tokens) } else { Err(RegistryErrors(errors)) }
    }

    /// One agent, if registered.
    pub fn get(&self, id: &AgentId) -> Option<&Agent> {
        self.agents.get(id)
    }

    /// Every agent, by id.
    pub fn agents(&self) -> impl Iterator<Item = &Agent> {
        self.agents.values()
    }

    /// Every active agent, by id.
    pub fn active(&self) -> impl Iterator<Item = &Agent> {
        self.agents.values().filter(|a| a.is_active())
    }

    /// Number of agents.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// True when no agent is registered.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// Ids of every agent, comma separated, for "known: ..." hints.
    pub fn known_ids(&self) -> String {
        if self.agents.is_empty() {
            return "none registered".into();
        }
        self.agents.keys().map(AgentId::as_str).collect::<Vec<_>>().join(", ")
    }

    /// Adds or replaces an agent.
    pub fn insert(&mut self, agent: Agent) -> Option<Agent> {
        self.agents.insert(agent.id.clone(), agent)
    }

    /// Removes an agent.
    pub fn remove(&mut self, id: &AgentId) -> Option<Agent> {
        self.agents.remove(id)
    }
}

fn parse_agent(key: &str, value: serde_json::Value) -> Result<Agent, Vec<RegistryError>> {
    let id = AgentId::parse(key)
        .map_err(|source| vec![RegistryError::BadId { key: key.chars().take(40).collect(), source }])?;
    let agent = id.to_string();
    let raw: RawAgent = serde_json::from_value(value)
        .map_err(|e| vec![RegistryError::Field { agent: agent.clone(), message: e.to_string() }])?;
    let mut errors = Vec::new();
    let bad = |field: &'static str, reason: String| RegistryError::BadValue { agent: agent.clone(), field, reason };

    let status = match raw.status.as_deref() {
        None | Some("active") => Status::Active,
        Some("inactive") => Status::Inactive,
        Some(other) => {
            errors.push(bad("status", format!("{other:?} is unknown; use \"active\" or \"inactive\"")));
            Status::Inactive
        }
    };
    let delivery = match raw.delivery.as_deref() {
        None => DeliveryMode::Wake,
        Some(other) => DeliveryMode::parse(other).unwrap_or_else(|| {
            errors.push(bad("delivery", format!("{other:?} is unknown; use \"wake\", \"agent\" or \"chat\"")));
            DeliveryMode::Wake
        }),
    };
    let max = crate::layout::MAX_CONCURRENCY;
    let concurrency = match raw.concurrency {
        None => 1,
        Some(n) => u16::try_from(n).ok().filter(|n| (1..=max).contains(n)).unwrap_or_else(|| {
            errors.push(bad("concurrency", format!("{n} is out of range; use 1 (in order) to {max}")));
            1
        }),
    };
    let most = crate::layout::MAX_PREFETCH;
    let prefetch = match raw.prefetch {
        None => crate::layout::DEFAULT_PREFETCH,
        Some(n) => u16::try_from(n).ok().filter(|n| (1..=most).contains(n)).unwrap_or_else(|| {
            errors.push(bad("prefetch", format!("{n} is out of range; use 1 (replicas keep the order) to {most}")));
            crate::layout::DEFAULT_PREFETCH
        }),
    };
    let hooks_url = match check_hooks_url(&raw.hooks_url) {
        Ok(url) => Some(url),
        Err(reason) => {
            errors.push(bad("hooks_url", reason));
            None
        }
    };
    if let Some(gateway) = &raw.gateway
        && let Err(reason) = check_gateway(gateway)
    {
        errors.push(bad("gateway", reason));
    }
    let token = |field: &'static str, raw: &str| {
        SecretRef::parse(raw).map_err(|source| RegistryError::Token { agent: agent.clone(), field, source })
    };
    let hooks_token = token("hooks_token", &raw.hooks_token).map_err(|e| errors.push(e)).ok();
    let gateway_token = match raw.gateway_token.as_deref() {
        None => None,
        Some(r) => token("gateway_token", r).map_err(|e| errors.push(e)).ok(),
    };
    if let (Some(h @ SecretRef::Literal(_)), Some(g @ SecretRef::Literal(_))) = (&hooks_token, &gateway_token)
        && h == g
    {
        errors.push(RegistryError::SameTokens { agent: agent.clone() });
    }
    let mesh_token = match raw.mesh_token.as_deref() {
        None => None,
        Some(r) => token("mesh_token", r).map_err(|e| errors.push(e)).ok(),
    };
    // The same reference (or literal) as another token is refused here; two
    // references that resolve to the same value, by `resolve_tokens`.
    if let Some(m) = &mesh_token
        && (hooks_token.as_ref() == Some(m) || gateway_token.as_ref() == Some(m))
    {
        errors.push(RegistryError::MeshTokenReused { agent: agent.clone() });
    }
    if delivery == DeliveryMode::Chat {
        if raw.gateway_token.is_none() {
            errors.push(RegistryError::ChatNeeds { agent: agent.clone(), field: "gateway_token" });
        }
        if raw.model.is_none() {
            errors.push(RegistryError::ChatNeeds { agent: agent.clone(), field: "model" });
        }
    }
    // Only chat delivery sends the gateway token (wake and agent send the hook token).
    if let (Some(url), Some(_), DeliveryMode::Chat, false) = (&hooks_url, &gateway_token, delivery, raw.allow_plaintext)
    {
        let base = match &raw.gateway {
            Some(gateway) => gateway_url(gateway).ok(),
            None => Some(url.clone()),
        };
        if let Some(base) = base
            && base.scheme() == "http"
            && !is_loopback(&base)
        {
            errors.push(bad(
                "gateway",
                format!(
                    "gateway_token would cross the network to {} in clear text: use https://{}, or set \"allow_plaintext\": true for a private network you trust",
                    base.host_str().unwrap_or("?"),
                    base.host_str().unwrap_or("host:port"),
                ),
            ));
        }
    }
    match (hooks_url, hooks_token) {
        (Some(hooks_url), Some(hooks_token)) if errors.is_empty() => Ok(Agent {
            id,
            gateway: raw.gateway,
            gateway_token,
            hooks_token,
            mesh_token,
            hooks_url,
            status,
            delivery,
            model: raw.model,
            name: raw.name,
            concurrency,
            prefetch,
            allow_plaintext: raw.allow_plaintext,
        }),
        _ => Err(errors),
    }
}

/// A hook URL is plain `http(s)://host[:port]/path`: no userinfo (it would leak
/// a credential into logs), no query (tokens in query strings are rejected by
/// gateways), no fragment.
pub fn check_hooks_url(raw: &str) -> Result<Url, String> {
    let url = Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL ({e}); use http://host:port/hooks/wake"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("scheme {:?} is not allowed; use http or https", url.scheme()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("URL carries user info; put the credential in hooks_token instead".into());
    }
    if url.query().is_some() {
        return Err("URL has a query string; gateways reject tokens in query strings, so use hooks_token".into());
    }
    if url.fragment().is_some() {
        return Err("URL has a fragment; remove the part after '#'".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("URL has no host".into());
    }
    Ok(url)
}

/// The hosts hooks URLs and gateways may point at (SSRF guard). Empty, the
/// default, allows any host: agents on loopback and private networks are the
/// normal case. An entry `example.com` allows that host exactly, `.example.com`
/// (or `*.example.com`) any host under it; IP addresses are written as the URL
/// shows them (`10.0.0.7`, `[::1]`). Matching ignores case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostAllowList(Vec<String>);

impl HostAllowList {
    /// Parses a comma- or whitespace-separated list (the value of `MESH_HOOKS_ALLOWED_HOSTS`).
    pub fn parse(raw: &str) -> Self {
        let hosts = raw
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|h| !h.is_empty())
            .map(|h| h.strip_prefix('*').unwrap_or(h).to_ascii_lowercase())
            .collect();
        Self(hosts)
    }

    /// True when no list is configured (every host allowed).
    pub fn is_open(&self) -> bool {
        self.0.is_empty()
    }

    /// True when `host` may be called.
    pub fn allows(&self, host: &str) -> bool {
        if self.is_open() {
            return true;
        }
        let host = host.to_ascii_lowercase();
        self.0.iter().any(|entry| match entry.strip_prefix('.') {
            Some(suffix) => host.len() > suffix.len() && host.ends_with(entry.as_str()),
            None => host == *entry,
        })
    }

    fn check(&self, host: Option<&str>) -> Result<(), String> {
        match host {
            Some(host) if self.allows(host) => Ok(()),
            Some(host) => Err(format!(
                "host {host:?} is not in {HOOKS_ALLOWED_HOSTS_ENV} ({}); add it there or fix the URL",
                self.0.join(", ")
            )),
            None => Err("URL has no host".into()),
        }
    }
}

/// Environment variable the registry loaders read the [`HostAllowList`] from.
pub const HOOKS_ALLOWED_HOSTS_ENV: &str = "MESH_HOOKS_ALLOWED_HOSTS";

impl Registry {
    /// Checks every agent's `hooks_url` and `gateway` host against `allowed`,
    /// reporting every agent and field outside it.
    pub fn check_hosts(&self, allowed: &HostAllowList) -> Result<(), RegistryErrors> {
        if allowed.is_open() {
            return Ok(());
        }
        let mut errors = Vec::new();
        for agent in self.agents() {
            let bad = |field: &'static str, reason: String| RegistryError::BadValue {
                agent: agent.id.to_string(),
                field,
                reason,
            };
            if let Err(reason) = allowed.check(agent.hooks_url.host_str()) {
                errors.push(bad("hooks_url", reason));
            }
            if let Some(gateway) = &agent.gateway {
                let host = gateway_url(gateway).ok();
                if let Err(reason) = allowed.check(host.as_ref().and_then(Url::host_str)) {
                    errors.push(bad("gateway", reason));
                }
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(RegistryErrors(errors)) }
    }
}

fn check_gateway(raw: &str) -> Result<(), String> {
    gateway_url(raw).map(|_| ())
}

/// `host:port` is plain HTTP; `https://host:port` (or an explicit
/// `http://host:port`) names the scheme. Nothing else: no path, query or user info.
fn gateway_url(raw: &str) -> Result<Url, String> {
    let (scheme, rest) = match raw.split_once("://") {
        Some((scheme @ ("http" | "https"), rest)) => (scheme, rest),
        Some((other, _)) => return Err(format!("{raw:?}: scheme {other:?} is not http or https")),
        None => ("http", raw),
    };
    let url = Url::parse(&format!("{scheme}://{rest}/")).map_err(|_| format!("{raw:?} is not host:port"))?;
    if url.path() != "/" || url.query().is_some() || !url.username().is_empty() || rest.contains(['/', '?', '#']) {
        return Err(format!("{raw:?} is not host:port or https://host:port (no path, query or user info)"));
    }
    Ok(url)
}

/// True for `localhost` and loopback addresses: traffic that never leaves the machine.
fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::MapResolver;

    const OLD: &str = r#"{
      "nova": {
        "gateway": "novasl-gateway:7002",
        "gateway_token": "nova-token-2026",
        "hooks_token": "nova-mesh-hook-2026",
        "hooks_url": "http://novasl-gateway:7002/hooks/wake",
        "status": "active"
      },
      "kaan": {
        "hooks_token": "env:MESH_TOKEN_KAAN_HOOK",
        "hooks_url": "https://kaan.example:443/hooks/wake",
        "status": "inactive"
      }
    }"#;

    #[test]
    fn a_chat_gateway_token_crosses_a_network_only_over_https_or_by_opt_in() {
        let chat = |gateway: &str, extra: &str| {
            Registry::parse(&format!(
                r#"{{"ada": {{"hooks_token": "h", "gateway_token": "g", "model": "m", "delivery": "chat",
                    "gateway": "{gateway}", "hooks_url": "http://ada-gw:7004/hooks/wake"{extra}}}}}"#
            ))
        };
        let err = chat("ada-gw:7004", "").unwrap_err().to_string();
        assert!(
            err.contains("clear text") && err.contains("https://ada-gw") && err.contains("allow_plaintext"),
            "{err}"
        );
        assert!(chat("http://10.0.0.5:7004", "").is_err());
        let ok = chat("https://ada-gw:7004", "").unwrap();
        let ada = ok.get(&"ada".parse().unwrap()).unwrap();
        assert_eq!(ada.gateway_base().as_str(), "https://ada-gw:7004/");
        for local in ["127.0.0.1:7004", "localhost:7004", "[::1]:7004"] {
            assert!(chat(local, "").is_ok(), "{local}");
        }
        let opted = chat("ada-gw:7004", r#", "allow_plaintext": true"#).unwrap();
        assert!(opted.to_json().contains("\"allow_plaintext\": true"), "the opt-in is written back");
        for bad in ["ftp://ada-gw:1", "https://ada-gw:1/path", "https://u@ada-gw:1", "ada-gw:1?x"] {
            assert!(chat(bad, "").is_err(), "{bad}");
        }
        // Wake delivery never sends the gateway token: the old format stays valid.
        assert!(Registry::parse(OLD).is_ok());
    }

    #[test]
    fn ids_that_would_share_a_nats_password_variable_are_refused() {
        let err = Registry::parse(
            r#"{"nova-2": {"hooks_token": "a", "hooks_url": "http://n/h"},
                "nova_2": {"hooks_token": "b", "hooks_url": "http://n/h"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("\"nova-2\" and \"nova_2\"") && err.contains("LISTENER_NOVA_2_NATS_PASSWORD"), "{err}");
    }

    #[test]
    fn reads_the_old_format() {
        let reg = Registry::parse(OLD).unwrap();
        assert_eq!(reg.len(), 2);
        let nova = reg.get(&AgentId::parse("nova").unwrap()).unwrap();
        assert_eq!(nova.delivery, DeliveryMode::Wake);
        assert_eq!(nova.gateway_base().as_str(), "http://novasl-gateway:7002/");
        assert_eq!(reg.active().count(), 1);
        assert_eq!(reg.known_ids(), "kaan, nova");
    }

    #[test]
    fn debug_never_shows_tokens() {
        let reg = Registry::parse(OLD).unwrap();
        let shown = format!("{reg:?}");
        assert!(!shown.contains("nova-token-2026") && !shown.contains("nova-mesh-hook-2026"), "{shown}");
        let err = Registry::parse(r#"{"a": {"hooks_token": "same-secret", "gateway_token": "same-secret", "hooks_url": "http://h/hooks/wake"}}"#)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("same-secret"), "{err}");
    }

    #[track_caller]
    fn rejects(entry: &str, fragments: &[&str]) {
        let json = format!(r#"{{"nova": {entry}}}"#);
        let err = Registry::parse(&json).unwrap_err().to_string();
        for f in fragments {
            assert!(err.contains(f), "{err:?} lacks {f:?}");
        }
    }

    #[test]
    fn validation_names_agent_and_field() {
        let h = r#""hooks_token": "t1""#;
        rejects(
            &format!(r#"{{{h}, "hooks_url": "http://g:1/hooks/wake", "status": "paused"}}"#),
            &["\"nova\"", "status", "\"paused\" is unknown"],
        );
        rejects(&format!(r#"{{{h}, "hooks_url": "http://u:p@g:1/hooks/wake"}}"#), &["hooks_url", "user info"]);
        rejects(&format!(r#"{{{h}, "hooks_url": "http://g:1/hooks/wake?token=x"}}"#), &["hooks_url", "query"]);
        rejects(&format!(r#"{{{h}, "hooks_url": "http://g:1/hooks/wake#x"}}"#), &["hooks_url", "fragment"]);
        rejects(&format!(r#"{{{h}, "hooks_url": "ftp://g:1/hooks/wake"}}"#), &["hooks_url", "scheme \"ftp\""]);
        rejects(&format!(r#"{{{h}, "hooks_url": "not a url"}}"#), &["hooks_url", "not a URL"]);
        rejects(
            r#"{"hooks_token": "t", "gateway_token": "t", "hooks_url": "http://g/"}"#,
            &["\"nova\"", "are the same"],
        );
        rejects(
            &format!(r#"{{{h}, "hooks_url": "http://g/", "delivery": "push"}}"#),
            &["delivery", "\"push\" is unknown"],
        );
        rejects(
            &format!(r#"{{{h}, "hooks_url": "http://g/", "delivery": "chat"}}"#),
            &["needs gateway_token", "needs model"],
        );
        rejects(
            &format!(r#"{{{h}, "hooks_url": "http://g/", "concurrency": 0}}"#),
            &["concurrency", "1 (in order) to 1024"],
        );
        rejects(
            &format!(r#"{{{h}, "hooks_url": "http://g/", "concurrency": 1025}}"#),
            &["concurrency", "1025 is out of range"],
        );
        rejects(
            &format!(r#"{{{h}, "hooks_url": "http://g/", "prefetch": 0}}"#),
            &["prefetch", "1 (replicas keep the order) to 4"],
        );
        rejects(&format!(r#"{{{h}, "hooks_url": "http://g/", "prefetch": 5}}"#), &["prefetch", "5 is out of range"]);
        let replica =
            Registry::parse(&format!(r#"{{"nova": {{{h}, "hooks_url": "http://g/", "prefetch": 1}}}}"#)).unwrap();
        assert_eq!(replica.agents().next().unwrap().consumer_tuning().max_ack_pending, 1);
        let busy =
            Registry::parse(&format!(r#"{{"nova": {{{h}, "hooks_url": "http://g/", "concurrency": 32}}}}"#)).unwrap();
        let nova = busy.agents().next().unwrap();
        assert_eq!((nova.concurrency, nova.consumer_tuning().max_ack_pending), (32, 128));
        assert!(busy.to_json().contains("\"concurrency\": 32"));
        assert_eq!(Registry::parse(&busy.to_json()).unwrap(), busy);
        rejects(
            &format!(r#"{{{h}, "hooks_url": "http://g/", "stauts": "active"}}"#),
            &["\"nova\"", "unknown field `stauts`"],
        );
        rejects(r#"{"hooks_token": "env:", "hooks_url": "http://g/"}"#, &["hooks_token", "malformed reference"]);
        rejects(
            &format!(r#"{{{h}, "hooks_url": "http://g/", "gateway": "http://x/y"}}"#),
            &["gateway", "not host:port"],
        );
        let err =
            Registry::parse(r#"{"No.va": {"hooks_token": "t", "hooks_url": "http://g/"}}"#).unwrap_err().to_string();
        assert!(err.contains("registry key \"No.va\""), "{err}");
        assert!(Registry::parse("[1]").unwrap_err().to_string().contains("not a JSON object"));
    }

    #[test]
    fn a_mesh_token_belongs_to_one_agent() {
        let err = Registry::parse(
            r#"{"nova": {"hooks_token": "h1", "mesh_token": "env:MESH_TOKEN_SHARED", "hooks_url": "http://g/"},
                "kaan": {"hooks_token": "h2", "mesh_token": "env:MESH_TOKEN_SHARED", "hooks_url": "http://g/"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "agents \"kaan\" and \"nova\" have the same mesh_token; give each agent its own (whoever holds it could send \
             as either)"
        );
        let literal = Registry::parse(
            r#"{"nova": {"hooks_token": "h1", "mesh_token": "the-secret", "hooks_url": "http://g/"},
                "kaan": {"hooks_token": "h2", "mesh_token": "the-secret", "hooks_url": "http://g/"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(literal.contains("have the same mesh_token") && !literal.contains("the-secret"), "{literal}");
        // Different references to one value: found when resolved.
        let ids: Vec<AgentId> = ["ada", "kaan", "nova"].iter().map(|i| i.parse().unwrap()).collect();
        let secrets = [crate::Secret::new("x"), crate::Secret::new("y"), crate::Secret::new("x")];
        assert_eq!(shared_mesh_tokens(ids.iter().zip(&secrets)), vec![(ids[0].clone(), ids[2].clone())]);
    }

    #[test]
    fn a_mesh_token_is_the_agents_own() {
        let reg = Registry::parse(
            r#"{"nova": {"hooks_token": "h", "gateway_token": "env:MESH_TOKEN_G", "mesh_token": "env:MESH_TOKEN_NOVA_MESH", "hooks_url": "http://g/"}}"#,
        )
        .unwrap();
        let nova = reg.agents().next().unwrap();
        assert_eq!(nova.mesh_token, Some(SecretRef::Env("MESH_TOKEN_NOVA_MESH".into())));
        assert!(reg.to_json().contains("\"mesh_token\": \"env:MESH_TOKEN_NOVA_MESH\""));
        assert_eq!(Registry::parse(&reg.to_json()).unwrap(), reg);
        // The same reference or literal as another token is refused when parsed ...
        for other in ["hooks_token", "gateway_token"] {
            let json = format!(
                r#"{{"nova": {{"hooks_token": "h", "gateway_token": "g", "hooks_url": "http://g/", "{other}": "same", "mesh_token": "same"}}}}"#
            );
            let err = Registry::parse(&json).unwrap_err().to_string();
            assert!(err.contains("mesh_token is the same as its hooks_token or gateway_token"), "{other}: {err}");
        }
        // ... and different references to the same value when resolved.
        let mut res = MapResolver::default();
        res.env.insert("MESH_TOKEN_G".into(), "gw".into());
        res.env.insert("MESH_TOKEN_NOVA_MESH".into(), "h".into());
        assert!(matches!(nova.resolve_tokens(&res), Err(RegistryError::MeshTokenReused { .. })));
        res.env.insert("MESH_TOKEN_NOVA_MESH".into(), "mesh-secret".into());
        assert_eq!(nova.resolve_tokens(&res).unwrap().mesh.unwrap().expose(), "mesh-secret");
        // Never shown: Debug keeps the reference only.
        res.env.clear();
        assert!(!format!("{nova:?}").contains("mesh-secret"));
        let err = nova.resolve_tokens(&res).unwrap_err().to_string();
        assert!(err.contains("field gateway_token"), "{err}");
    }

    #[test]
    fn reserved_agent_protocol_verbs_are_refused_as_keys() {
        let err =
            Registry::parse(r#"{"status": {"hooks_token": "t", "hooks_url": "http://g/"}}"#).unwrap_err().to_string();
        assert!(err.contains("registry key \"status\"") && err.contains("reserved"), "{err}");
    }

    #[test]
    fn token_references_must_resolve() {
        let reg = Registry::parse(
            r#"{"nova": {"hooks_token": "env:MESH_TOKEN_NOVA_HOOK", "gateway_token": "file:/s/gw", "hooks_url": "http://g/"}}"#,
        )
        .unwrap();
        let err = reg.resolve_tokens(&MapResolver::default()).unwrap_err().to_string();
        assert!(
            err.contains("agent \"nova\": field hooks_token: environment variable MESH_TOKEN_NOVA_HOOK is not set"),
            "{err}"
        );
        let mut res = MapResolver::default();
        res.env.insert("MESH_TOKEN_NOVA_HOOK".into(), "same".into());
        res.files.insert("/s/gw".into(), "same\n".into());
        assert!(reg.resolve_tokens(&res).unwrap_err().to_string().contains("are the same"));
        res.files.insert("/s/gw".into(), "other".into());
        let tokens = reg.resolve_tokens(&res).unwrap();
        assert_eq!(tokens.values().next().unwrap().hooks.expose(), "same");
    }

    #[test]
    fn host_allow_list_names_agent_and_field() {
        let reg = Registry::parse(
            r#"{"nova": {"gateway": "gw.internal:7002", "hooks_token": "t", "hooks_url": "http://Nova.Agents.internal:7002/hooks/wake"},
                "kaan": {"hooks_token": "t", "hooks_url": "http://169.254.169.254/hooks/wake"}}"#,
        )
        .unwrap();
        assert_eq!(reg.check_hosts(&HostAllowList::default()), Ok(()));
        assert_eq!(reg.check_hosts(&HostAllowList::parse("  ")), Ok(()));
        let err = reg.check_hosts(&HostAllowList::parse("*.agents.internal, gw.internal")).unwrap_err().to_string();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(
                "agent \"kaan\": field hooks_url: host \"169.254.169.254\" is not in MESH_HOOKS_ALLOWED_HOSTS"
            ),
            "{err}"
        );
        let err = reg.check_hosts(&HostAllowList::parse(".agents.internal 169.254.169.254")).unwrap_err().to_string();
        assert!(err.contains("agent \"nova\": field gateway: host \"gw.internal\""), "{err}");
        // A suffix entry does not match the bare suffix or a look-alike.
        let list = HostAllowList::parse(".agents.internal");
        assert!(
            list.allows("a.agents.internal") && !list.allows("agents.internal") && !list.allows("evilagents.internal")
        );
        assert!(HostAllowList::parse("[::1]").allows("[::1]"));
    }

    #[test]
    fn writes_back_what_it_read() {
        let reg = Registry::parse(OLD).unwrap();
        assert_eq!(Registry::parse(&reg.to_json()).unwrap(), reg);
    }
}
