//! The mesh as MCP tools (Model Context Protocol, Streamable HTTP at `/mcp`
//! on a listener's `--http` address, through the official `rmcp` SDK). The
//! Bearer `mesh_token` picks the agent exactly as for `/v1/messages` (401
//! before anything else); every tool that acts on the mesh takes the engine's
//! road as `agent:<id>` from front end `mcp`. Requests that carry an `Origin`
//! header are refused (agents are not browsers: DNS rebinding protection), and
//! sessions follow the specification (`Mcp-Session-Id`).

use std::sync::Arc;

use axum::Router;
use mesh_engine::command::{Command, Reply, Tone};
use mesh_engine::engine::{Platform, Request as EngineRequest};
use mesh_protocol::AgentId;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, JsonObject, ListToolsResult, PaginatedRequestParams,
    ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Value, json};

use crate::agent_api::{AgentApi, Caller};

/// Messages `inbox` returns at most.
pub const INBOX_MAX: usize = crate::state::RECENT_DELIVERIES;

/// The MCP server of one connection: the listener's agent API, and the agent
/// when it is fixed (stdio) rather than taken from each HTTP request's token.
#[derive(Clone)]
pub struct MeshTools {
    api: AgentApi,
    fixed: Option<AgentId>,
}

impl std::fmt::Debug for MeshTools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTools").field("fixed", &self.fixed).finish_non_exhaustive()
    }
}

impl MeshTools {
    /// Tools for whoever each HTTP request authenticated as.
    pub fn new(api: AgentApi) -> Self {
        Self { api, fixed: None }
    }

    /// Tools for one agent (a transport with no per-request token).
    pub fn for_agent(api: AgentApi, agent: AgentId) -> Self {
        Self { api, fixed: Some(agent) }
    }

    fn caller(&self, context: &RequestContext<RoleServer>) -> Option<AgentId> {
        if let Some(agent) = &self.fixed {
            return Some(agent.clone());
        }
        let parts = context.extensions.get::<axum::http::request::Parts>()?;
        parts.extensions.get::<Caller>().map(|Caller(id)| id.clone())
    }
}

/// `/mcp`, behind the same Bearer check as `/v1/messages`.
pub fn router(api: AgentApi) -> Router {
    let config = StreamableHttpServerConfig::default()
        // The Bearer token authenticates every request; the listener's host name varies by deployment.
        .disable_allowed_hosts()
        // No browser has any business here: a request carrying an Origin is refused.
        .enforce_origin_validation();
    let tools = MeshTools::new(api.clone());
    let service: StreamableHttpService<MeshTools, LocalSessionManager> =
        StreamableHttpService::new(move || Ok(tools.clone()), Default::default(), config);
    Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn_with_state(api, crate::agent_api::require_agent))
}

fn schema(value: Value) -> Arc<JsonObject> {
    match value {
        Value::Object(map) => Arc::new(map),
        _ => Arc::new(JsonObject::new()),
    }
}

const PRIORITY: &str = "How urgent: low, normal (default), high or urgent. High and urgent wake the recipient at once; \
     use them only when it cannot wait for the recipient's next heartbeat.";

fn receipt_schema() -> Arc<JsonObject> {
    schema(json!({
        "type": "object",
        "properties": {
            "id": {"type": "string", "description": "the message id (what an answer names as in_reply_to)"},
            "stream_seq": {"type": "integer"},
            "queued": {"type": "boolean", "description": "true while a kill switch holds deliveries: accepted, delivered when the pause ends"},
            "note": {"type": "string"}
        },
        "required": ["id", "stream_seq", "queued"]
    }))
}

/// Every tool, with its input schema and a description written for a model.
pub fn tools() -> Vec<Tool> {
    let text = json!({"type": "string", "description": "The message text (up to 192 KiB)."});
    let priority = json!({"type": "string", "enum": ["low", "normal", "high", "urgent"], "description": PRIORITY});
    let in_reply_to = json!({"type": "string", "description": "The id of the message this answers: the `id` in the [mesh] line you were woken by. Leave it out to start a new conversation."});
    vec![
        Tool::new(
            "send",
            "Send a message to one agent on the mesh. It is delivered to that agent's gateway (woken now for high or urgent \
             priority). You are always the sender. Use `agents` to see who exists. The result has the message id; \
             `queued: true` means a kill switch holds deliveries and it will arrive when the pause ends.",
            schema(json!({"type": "object", "properties": {
                "to": {"type": "string", "description": "The recipient's agent id, e.g. \"kaan\"."},
                "text": text, "priority": priority, "in_reply_to": in_reply_to},
                "required": ["to", "text"], "additionalProperties": false})),
        )
        .with_raw_output_schema(receipt_schema()),
        Tool::new(
            "broadcast",
            "Send one message to every active agent on the mesh at once (announcements). Use sparingly; prefer `send` for one agent.",
            schema(json!({"type": "object", "properties": {"text": text, "priority": priority},
                "required": ["text"], "additionalProperties": false})),
        )
        .with_raw_output_schema(receipt_schema()),
        Tool::new(
            "reply",
            "Answer a message you were woken by: it goes back to its sender, threaded (the sender sees which message it \
             answers). `in_reply_to` is the id in the [mesh] line of that message: `[mesh] Message from kaan (id <this>): ...`. \
             Conversations between agents stop after a few answers (the loop guard); the error says so.",
            schema(json!({"type": "object", "properties": {"in_reply_to": in_reply_to, "text": text, "priority": priority},
                "required": ["in_reply_to", "text"], "additionalProperties": false})),
        )
        .with_raw_output_schema(receipt_schema()),
        Tool::new(
            "ask",
            "Ask an agent that answers in chat mode a question and wait for its answer (up to two minutes). Returns the \
             answer's text. Only agents whose delivery is \"chat\" answer; use `send` for the others.",
            schema(json!({"type": "object", "properties": {
                "to": {"type": "string", "description": "The agent to ask (delivery chat, see `agents`)."},
                "text": text}, "required": ["to", "text"], "additionalProperties": false})),
        ),
        Tool::new(
            "agents",
            "List the agents on the mesh: id, status (active or inactive) and delivery mode (wake, agent or chat: only chat agents answer `ask`).",
            schema(json!({"type": "object", "properties": {}, "additionalProperties": false})),
        ),
        Tool::new(
            "ping",
            "Health-ping every agent's listener: which answered, their round trip and how many messages wait for each.",
            schema(json!({"type": "object", "properties": {}, "additionalProperties": false})),
        ),
        Tool::new(
            "status",
            "Read the mesh's status: whether a kill switch is pulled (then messages are queued, not delivered), the \
             NATS server, how many agents and listeners, dead letters. Read-only.",
            schema(json!({"type": "object", "properties": {}, "additionalProperties": false})),
        ),
        Tool::new(
            "inbox",
            "The last messages delivered to you (newest first): id, sender, text, what each answers. Read-only; use an id with `reply`.",
            schema(json!({"type": "object", "properties": {
                "n": {"type": "integer", "minimum": 1, "maximum": INBOX_MAX, "description": "How many (default 10)."}},
                "additionalProperties": false})),
        ),
    ]
}

fn failed(message: impl Into<String>) -> CallToolResult {
    CallToolResult::structured_error(json!({"error": message.into()}))
}

fn arg<'a>(args: &'a JsonObject, name: &str) -> Option<&'a str> {
    args.get(name).and_then(Value::as_str)
}

impl MeshTools {
    /// Runs one tool for `caller`.
    pub async fn call(&self, caller: &AgentId, name: &str, args: &JsonObject) -> CallToolResult {
        let owned = |name: &str| arg(args, name).map(str::to_owned);
        let need = |name: &str| owned(name).ok_or_else(|| failed(format!("{name} is required")));
        match name {
            "send" | "broadcast" | "reply" => {
                let text = match need("text") {
                    Ok(text) => text,
                    Err(e) => return e,
                };
                let (to, in_reply_to) = match name {
                    "send" => match need("to") {
                        Ok(to) => (to, owned("in_reply_to")),
                        Err(e) => return e,
                    },
                    "broadcast" => ("*".to_owned(), None),
                    _ => match need("in_reply_to").and_then(|id| self.sender_of(caller, &id).map(|from| (from, id))) {
                        Ok((from, id)) => (from, Some(id)),
                        Err(e) => return e,
                    },
                };
                let sent =
                    crate::agent_api::send(&self.api, caller, Platform::Mcp, &to, text, owned("priority"), in_reply_to)
                        .await;
                match sent {
                    Ok(sent) => CallToolResult::structured(serde_json::to_value(sent).unwrap_or_default()),
                    Err((_, message)) => failed(message),
                }
            }
            "ask" => {
                let (to, text) = match (need("to"), need("text")) {
                    (Ok(to), Ok(text)) => (to, text),
                    (Err(e), _) | (_, Err(e)) => return e,
                };
                let agent = match AgentId::parse(&to) {
                    Ok(agent) => agent,
                    Err(e) => return failed(format!("to: {e}")),
                };
                let command = Command::Ask { agent, text, ttl: None };
                let request = EngineRequest::agent(caller, Platform::Mcp, &command);
                let handled = self.api.engine.handle_command(request, command).await;
                if handled.failed {
                    return failed(handled.reply.title);
                }
                match handled.follow_up {
                    Some(answer) => {
                        let answer = answer.await;
                        let text = lines(&answer).join("\n");
                        let answered = answer.tone != Tone::Error && answer.tone != Tone::Warn;
                        if answered {
                            CallToolResult::structured(json!({"from": to, "answer": text}))
                        } else {
                            failed(answer.title)
                        }
                    }
                    None => failed("the engine gave no answer to wait for"),
                }
            }
            "agents" | "ping" | "status" => {
                let command = match name {
                    "agents" => Command::Agents,
                    "ping" => Command::Ping,
                    _ => Command::Status,
                };
                let request = EngineRequest::agent(caller, Platform::Mcp, &command);
                let handled = self.api.engine.handle_command(request, command).await;
                if handled.reply.tone == Tone::Error {
                    return failed(handled.reply.title);
                }
                CallToolResult::structured(read_only(name, &handled.reply))
            }
            "inbox" => {
                let n = args.get("n").and_then(Value::as_u64).unwrap_or(10).clamp(1, INBOX_MAX as u64) as usize;
                let messages: Vec<Value> = self
                    .api
                    .fleet
                    .get(caller)
                    .map(|state| state.recent(n))
                    .unwrap_or_default()
                    .into_iter()
                    .map(|h| {
                        json!({"id": h.id.to_string(), "from": h.from, "text": h.text, "in_reply_to": h.in_reply_to,
                               "hops": h.hops, "stream_seq": h.stream_seq,
                               "sent_at": mesh_engine::killswitch::rfc3339(h.sent_at)})
                    })
                    .collect();
                CallToolResult::structured(json!({"messages": messages}))
            }
            other => failed(format!(
                "unknown tool {other:?}; the tools are send, broadcast, reply, ask, agents, ping, status, inbox"
            )),
        }
    }

    /// The agent that sent a message handed to `caller` (whom a `reply` goes to).
    fn sender_of(&self, caller: &AgentId, raw: &str) -> Result<String, CallToolResult> {
        let id = uuid::Uuid::parse_str(raw.trim())
            .map_err(|_| failed(format!("in_reply_to {raw:?} is not a message id (the id in the [mesh] line)")))?;
        let handed = self.api.fleet.get(caller).and_then(|state| state.handed(id)).ok_or_else(|| {
            failed(format!(
                "message {id} is not one of the last {} messages delivered to you; see `inbox`",
                crate::state::RECENT_DELIVERIES
            ))
        })?;
        match AgentId::parse(&handed.from) {
            Ok(from) => Ok(from.to_string()),
            Err(_) => Err(failed(format!(
                "message {id} came from {}, not from an agent: it cannot be answered through the mesh",
                handed.from
            ))),
        }
    }
}

/// Every line of a reply's text sections.
fn lines(reply: &Reply) -> Vec<String> {
    reply
        .sections
        .iter()
        .filter_map(|s| match s {
            mesh_engine::command::Section::Text { lines, .. } => Some(lines.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// The structured result of a reading tool: the engine's data, or its reply.
fn read_only(name: &str, reply: &Reply) -> Value {
    if name == "agents" {
        // Never a URL or a token: id, status, delivery.
        let agents: Vec<Value> = reply
            .sections
            .iter()
            .filter_map(|s| match s {
                mesh_engine::command::Section::Table { rows, .. } => Some(rows.clone()),
                _ => None,
            })
            .flatten()
            .map(|row| json!({"id": row.first(), "status": row.get(1), "delivery": row.get(2)}))
            .collect();
        return json!({"agents": agents});
    }
    match &reply.data {
        Some(data) => json!({"summary": reply.title, "data": data}),
        None => json!({"summary": reply.title, "reply": serde_json::to_value(reply).unwrap_or_default()}),
    }
}

impl ServerHandler for MeshTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_instructions(
            "The agent mesh: message other agents (send, broadcast, reply, ask), see who is there (agents, ping, \
             status) and read what you were sent (inbox). You always send as yourself.",
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let Some(caller) = self.caller(&context) else {
            return Err(ErrorData::invalid_request("no authenticated agent: send the agent's mesh_token", None));
        };
        let args = request.arguments.unwrap_or_default();
        Ok(self.call(&caller, &request.name, &args).await.into())
    }
}
