//! The console's actions: a form (or a script's POST to `/api/actions/`)
//! becomes one typed command, which takes the engine's one road as
//! `web:<user>` from the front end `web`: permission, rate limit,
//! confirmation code, execution, audit. A dead letter's Replay is the
//! engine's Replay button (`mesh:replay:<agent>:<sequence>`), clicked: the
//! permission and rate limit of `dlq replay`, that one dead letter only,
//! checked against the stream. A browser's form must carry its session's
//! CSRF token; a bearer caller needs none.

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use mesh_protocol::AgentId;
use mesh_protocol::envelope::Priority;
use serde::Deserialize;

use super::auth;
use super::live::Update;
use super::{Peer, WebState, pages};
use crate::command::{ButtonId, Command, Reply, Tone};
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
    /// A dead letter's sequence in the dead-letter stream (`replay`).
    #[serde(default)]
    pub dead_letter: Option<String>,
}

/// What an action form asks the engine for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A typed command.
    Run(Box<Command>),
    /// A click on one of the engine's buttons (a dead letter's Replay, a
    /// confirmation prompt's Cancel).
    Click(ButtonId),
}

fn field(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn agent(form: &ActionForm) -> Result<Option<AgentId>, String> {
    field(&form.agent).map(|a| AgentId::parse(a).map_err(|e| e.to_string())).transpose()
}

fn code(form: &ActionForm) -> Result<String, String> {
    let raw = field(&form.code).unwrap_or_default();
    crate::command::confirm::normalize_code(raw)
        .ok_or_else(|| "a confirmation code is 6 letters and digits such as K7P2QX".to_owned())
}

fn text(form: &ActionForm) -> Result<String, String> {
    form.text.as_deref().filter(|t| !t.trim().is_empty()).map(str::to_owned).ok_or_else(|| "write a text".to_owned())
}

/// What an action form asks for. Pure.
pub fn action(action: &str, form: &ActionForm) -> Result<Action, String> {
    if action == "replay" {
        let agent = agent(form)?.ok_or_else(|| "choose an agent".to_owned())?;
        let dead_letter = field(&form.dead_letter)
            .and_then(|seq| seq.parse::<u64>().ok())
            .filter(|seq| *seq > 0)
            .ok_or_else(|| {
                "name the dead letter to replay: its sequence number, as the dead letters page and /api/dead-letters \
                 list it (dlq_seq)"
                    .to_owned()
            })?;
        return Ok(Action::Click(ButtonId::Replay { agent, dead_letter }));
    }
    if action == "cancel" {
        return Ok(Action::Click(ButtonId::Cancel(code(form)?)));
    }
    command(action, form).map(|c| Action::Run(Box::new(c)))
}

/// The typed command an action form asks for. Pure.
fn command(action: &str, form: &ActionForm) -> Result<Command, String> {
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
        "confirm" => Command::Confirm { code: code(form)? },
        other => {
            let shown: String = other.chars().take(30).collect();
            return Err(format!(
                "unknown action {shown:?}; use send, broadcast, ask, kill, resume, confirm, cancel or replay"
            ));
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

/// What the engine made of an action.
struct Done {
    decision: &'static str,
    reply: Reply,
    code: Option<String>,
    follow_up: bool,
}

/// The HTTP status of an action's outcome: the engine's refusals, and an
/// action that ran but did nothing (an error reply: a dead letter not
/// stored, an agent not in the registry, NATS unreachable) is `422`.
fn status_of(decision: &str, reply: &Reply) -> StatusCode {
    match decision {
        "denied" => StatusCode::FORBIDDEN,
        "limited" => StatusCode::TOO_MANY_REQUESTS,
        "invalid" => StatusCode::BAD_REQUEST,
        _ if reply.tone == Tone::Error => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::OK,
    }
}

/// `POST /actions/{action}` and `POST /api/actions/{action}`.
pub async fn run(
    State(state): State<WebState>,
    Path(action): Path<String>,
    peer: Peer,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    let how = answer(&headers);
    let caller = match state.caller(&headers, peer) {
        Ok(caller) => caller,
        Err(auth::NoCaller::Unknown) => {
            return refused(how, StatusCode::UNAUTHORIZED, "sign in first (or send Authorization: Bearer <token>)");
        }
        Err(auth::NoCaller::Throttled) => {
            let mut response = refused(how, StatusCode::TOO_MANY_REQUESTS, super::BEARER_THROTTLED);
            let retry = auth::FAILURE_WINDOW.as_secs().to_string();
            if let Ok(retry) = axum::http::HeaderValue::from_str(&retry) {
                response.headers_mut().insert(axum::http::header::RETRY_AFTER, retry);
            }
            return response;
        }
    };
    if !caller.csrf_ok(form.csrf.as_deref()) {
        tracing::warn!(user = caller.user(), action, "web console action refused: missing or wrong CSRF token");
        return refused(how, StatusCode::FORBIDDEN, "the form's CSRF token is missing or stale; reload the page");
    }
    let action = match self::action(&action, &form) {
        Ok(action) => action,
        Err(problem) => {
            tracing::warn!(user = caller.user(), action, problem = %problem, "web console action refused: malformed form");
            return refused(how, StatusCode::BAD_REQUEST, &problem);
        }
    };
    let done = match action {
        Action::Run(command) => {
            let request = Request::chat(caller.identity(), Platform::Web, None, command.to_string());
            let handled = state.engine.handle_command(request, *command).await;
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
            Done { decision: handled.decision, reply: handled.reply, code: handled.confirmation_code, follow_up }
        }
        Action::Click(button) => {
            // The engine replaces the line with the click's own audit line.
            let request = Request::chat(caller.identity(), Platform::Web, None, String::new());
            let clicked = state.engine.click(request, &button.to_string()).await;
            let reply = clicked.answer.or(clicked.update).unwrap_or_else(|| Reply::info("done"));
            Done { decision: clicked.decision, reply, code: None, follow_up: false }
        }
    };
    state.hub.refresh();
    let status = status_of(done.decision, &done.reply);
    let Done { decision, reply, code, follow_up } = done;
    let code = code.as_deref();
    match how {
        Answer::Json => (
            status,
            axum::Json(serde_json::json!({
                "decision": decision,
                "reply": reply,
                "confirmation_code": code,
                "follow_up": follow_up,
            })),
        )
            .into_response(),
        Answer::Fragment => {
            (status, pages::reply_fragment(&state.viewer(&caller), &reply, code, follow_up)).into_response()
        }
        Answer::Page => {
            let fragment = pages::reply_fragment(&state.viewer(&caller), &reply, code, follow_up);
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
        ];
        // Each form gives the command its chat line parses to.
        for (action, fields, line) in cases {
            let want = crate::command::parse(line).unwrap();
            assert_eq!(self::action(action, &form(fields)), Ok(Action::Run(Box::new(want))), "{action} {fields:?}");
        }
    }

    #[test]
    fn a_replay_is_the_engine_button_of_that_one_dead_letter() {
        let replay = self::action("replay", &form(&[("agent", "nova"), ("dead_letter", " 42 ")])).unwrap();
        assert_eq!(replay, Action::Click(ButtonId::Replay { agent: AgentId::parse("nova").unwrap(), dead_letter: 42 }));
        let Action::Click(button) = replay else { unreachable!() };
        assert_eq!(button.to_string(), "mesh:replay:nova:42", "the id the engine's click reads back");
        for bad in [
            &[("agent", "nova")][..],
            &[("agent", "nova"), ("dead_letter", "0")],
            &[("agent", "nova"), ("dead_letter", "4x")],
        ] {
            let err = self::action("replay", &form(bad)).unwrap_err();
            assert!(err.starts_with("name the dead letter to replay"), "{bad:?}: {err}");
        }
        assert_eq!(self::action("replay", &form(&[("dead_letter", "42")])).unwrap_err(), "choose an agent");
    }

    #[test]
    fn a_cancel_is_the_engine_button_of_that_code() {
        let cancel = self::action("cancel", &form(&[("code", "k7p2qx")])).unwrap();
        assert_eq!(cancel, Action::Click(ButtonId::Cancel("K7P2QX".into())));
        assert!(self::action("cancel", &form(&[("code", "x")])).unwrap_err().contains("6 letters"));
    }

    #[test]
    fn bad_forms_say_what_to_fix() {
        let err = |action: &str, fields: &[(&str, &str)]| self::action(action, &form(fields)).unwrap_err();
        assert_eq!(err("send", &[("agent", "nova"), ("text", "  ")]), "write a text");
        assert_eq!(err("send", &[("text", "hi")]), "choose an agent");
        assert!(err("send", &[("agent", "No Va"), ("text", "hi")]).contains("agent"));
        assert!(err("kill", &[("grade", "soft"), ("duration", "99h")]).contains("maximum"));
        assert_eq!(err("kill", &[]), "choose soft, hard or nuclear");
        assert!(err("confirm", &[("code", "x")]).contains("6 letters"));
        assert!(err("drop-tables", &[]).starts_with("unknown action \"drop-tables\""));
    }
}
