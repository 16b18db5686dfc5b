//! The console's actions: a form (or a script's POST to `/api/actions/`)
//! becomes one typed command, which takes the engine's one road as
//! `web:<user>` from the front end `web`: permission, rate limit,
//! confirmation code, execution, audit. A browser's form must carry its
//! session's CSRF token; a bearer caller needs none.

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use mesh_protocol::AgentId;
use mesh_protocol::envelope::Priority;
use serde::Deserialize;

use super::auth;
use super::live::Update;
use super::{WebState, pages};
use crate::command::{Command, Reply};
use crate::engine::{Platform, Request};

/// An action form's fields (each action reads the ones it needs).
#[derive(Debug, Default, Deserialize)]
pub struct ActionForm {
    /// The session's CSRF token.
    #[serde(default)]
    pub csrf: Option<String>,
    /// The agent (empty: all agents, where that means something).
    #[serde(default)]
    pub agent: Option<String>,
    /// A message's text.
    #[serde(default)]
    pub text: Option<String>,
    /// `low`, `normal`, `high`, `urgent`.
    #[serde(default)]
    pub priority: Option<String>,
    /// `soft`, `hard`, `nuclear`.
    #[serde(default)]
    pub grade: Option<String>,
    /// A soft kill's length (`5m`).
    #[serde(default)]
    pub duration: Option<String>,
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
    /// A confirmation code.
    #[serde(default)]
    pub code: Option<String>,
}

fn field(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn agent(form: &ActionForm) -> Result<Option<AgentId>, String> {
    field(&form.agent).map(|a| AgentId::parse(a).map_err(|e| e.to_string())).transpose()
}

fn text(form: &ActionForm) -> Result<String, String> {
    form.text.as_deref().filter(|t| !t.trim().is_empty()).map(str::to_owned).ok_or_else(|| "write a text".to_owned())
}

/// The typed command an action form asks for. Pure.
pub fn command(action: &str, form: &ActionForm) -> Result<Command, String> {
    let needs_agent = || agent(form)?.ok_or_else(|| "choose an agent".to_owned());
    Ok(match action {
        "send" => {
            let priority = match field(&form.priority) {
                Some(p) => p.parse::<Priority>().map_err(|e| e.to_string())?,
                None => Priority::default(),
            };
            Command::Send { agent: needs_agent()?, text: text(form)?, priority, ttl: None }
        }
        "broadcast" => Command::Broadcast { priority: Priority::default(), text: text(form)?, ttl: None },
        "ask" => Command::Ask { agent: needs_agent()?, text: text(form)?, ttl: None },
        "kill" => {
            let reason = field(&form.reason).map(str::to_owned);
            match field(&form.grade) {
                Some("soft") => Command::KillSoft {
                    duration: match field(&form.duration) {
                        Some(d) => crate::command::grammar::parse_duration(d)?,
                        None => crate::command::grammar::DEFAULT_SOFT_KILL,
                    },
                    agent: agent(form)?,
                    reason,
                },
                Some("hard") => Command::KillHard { agent: agent(form)?, reason },
                Some("nuclear") => Command::KillNuclear { purge: false },
                _ => return Err("choose soft, hard or nuclear".to_owned()),
            }
        }
        "resume" => Command::Resume { agent: agent(form)? },
        "confirm" => {
            let raw = field(&form.code).unwrap_or_default();
            let code = crate::command::confirm::normalize_code(raw)
                .ok_or_else(|| "a confirmation code is 6 letters and digits such as K7P2QX".to_owned())?;
            Command::Confirm { code }
        }
        "replay" => Command::DlqReplay { agent: needs_agent()?, count: 1 },
        other => {
            let shown: String = other.chars().take(30).collect();
            return Err(format!("unknown action {shown:?}; use send, broadcast, ask, kill, resume, confirm or replay"));
        }
    })
}

/// How the caller wants the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// The reply's HTML, for the script to show in place.
    Fragment,
    /// JSON, for scripts.
    Json,
    /// A whole page (no JavaScript).
    Page,
}

fn answer(headers: &HeaderMap) -> Answer {
    let has =
        |name: &str, want: &str| headers.get(name).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains(want));
    if has("x-mesh-fragment", "1") {
        Answer::Fragment
    } else if has("accept", "application/json") {
        Answer::Json
    } else {
        Answer::Page
    }
}

fn refused(how: Answer, status: StatusCode, message: &str) -> Response {
    match how {
        Answer::Json => (status, axum::Json(serde_json::json!({"error": message}))).into_response(),
        Answer::Fragment => (status, pages::reply_fragment_error(message)).into_response(),
        Answer::Page => (status, pages::refusal(message)).into_response(),
    }
}

/// `POST /actions/{action}` and `POST /api/actions/{action}`.
pub async fn run(
    State(state): State<WebState>,
    Path(action): Path<String>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    let how = answer(&headers);
    let Some(caller) = auth::caller(&headers, &state.users, &state.sessions) else {
        return refused(how, StatusCode::UNAUTHORIZED, "sign in first (or send Authorization: Bearer <token>)");
    };
    if !caller.csrf_ok(form.csrf.as_deref()) {
        tracing::warn!(user = caller.user(), action, "web console action refused: missing or wrong CSRF token");
        return refused(how, StatusCode::FORBIDDEN, "the form's CSRF token is missing or stale; reload the page");
    }
    let command = match command(&action, &form) {
        Ok(command) => command,
        Err(problem) => return refused(how, StatusCode::BAD_REQUEST, &problem),
    };
    let request = Request::chat(caller.identity(), Platform::Web, None, command.to_string());
    let handled = state.engine.handle_command(request, command).await;
    state.hub.refresh();
    let status = match handled.decision {
        "denied" => StatusCode::FORBIDDEN,
        "limited" => StatusCode::TOO_MANY_REQUESTS,
        "invalid" => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    };
    let follow_up = handled.follow_up.is_some();
    if let Some(later) = handled.follow_up {
        let (hub, user) = (state.hub.clone(), caller.user().to_owned());
        tokio::spawn(async move {
            let reply: Reply = later.await;
            let text = crate::command::render_text::render(&reply);
            let lines = text.lines().skip(1).filter(|l| !l.is_empty()).map(str::to_owned).collect();
            hub.send(Update::Reply { user, title: reply.title, lines });
        });
    }
    let code = handled.confirmation_code.as_deref();
    match how {
        Answer::Json => (
            status,
            axum::Json(serde_json::json!({
                "decision": handled.decision,
                "reply": handled.reply,
                "confirmation_code": code,
                "follow_up": follow_up,
            })),
        )
            .into_response(),
        Answer::Fragment => {
            (status, pages::reply_fragment(&state.viewer(&caller), &handled.reply, code, follow_up)).into_response()
        }
        Answer::Page => {
            let fragment = pages::reply_fragment(&state.viewer(&caller), &handled.reply, code, follow_up);
            (status, pages::result(&state.viewer(&caller), fragment)).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> ActionForm {
        serde_urlencoded::from_str(&serde_urlencoded::to_string(pairs).unwrap_or_default()).unwrap_or_default()
    }

    /// An action, its form fields, and the command line it must become.
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);

    #[test]
    fn forms_become_typed_commands() {
        let cases: &[Case] = &[
            (
                "send",
                &[("agent", "nova"), ("text", "hi <b>"), ("priority", "high")],
                "send --priority high nova hi <b>",
            ),
            ("broadcast", &[("text", "maintenance")], "broadcast maintenance"),
            ("ask", &[("agent", "ada"), ("text", "6 x 7?")], "ask ada 6 x 7?"),
            ("kill", &[("grade", "soft"), ("agent", ""), ("duration", "2m")], "kill soft 2m"),
            ("kill", &[("grade", "hard"), ("agent", "nova"), ("reason", "loops")], "kill hard nova loops"),
            ("kill", &[("grade", "nuclear")], "kill nuclear"),
            ("resume", &[("agent", "")], "resume"),
            ("confirm", &[("code", "k7p2qx")], "confirm K7P2QX"),
            ("replay", &[("agent", "nova")], "dlq replay nova 1"),
        ];
        // Each form gives the command its chat line parses to.
        for (action, fields, line) in cases {
            let want = crate::command::parse(line).unwrap();
            assert_eq!(command(action, &form(fields)), Ok(want), "{action} {fields:?}");
        }
    }

    #[test]
    fn bad_forms_say_what_to_fix() {
        let err = |action: &str, fields: &[(&str, &str)]| command(action, &form(fields)).unwrap_err();
        assert_eq!(err("send", &[("agent", "nova"), ("text", "  ")]), "write a text");
        assert_eq!(err("send", &[("text", "hi")]), "choose an agent");
        assert!(err("send", &[("agent", "No Va"), ("text", "hi")]).contains("agent"));
        assert!(err("kill", &[("grade", "soft"), ("duration", "99h")]).contains("maximum"));
        assert_eq!(err("kill", &[]), "choose soft, hard or nuclear");
        assert!(err("confirm", &[("code", "x")]).contains("6 letters"));
        assert!(err("drop-tables", &[]).starts_with("unknown action \"drop-tables\""));
    }
}
