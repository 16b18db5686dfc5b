//! `POST /discord/interactions`: the `/mesh` application command. The Ed25519
//! signature is checked on the raw body before anything else (401 otherwise,
//! as Discord's probes expect); PING is answered with PONG; a command is
//! answered at once with a deferred answer (type 5, ephemeral for errors,
//! help and denials) and the result replaces it later through the
//! interaction's webhook (`@original`), within the token's 15 minutes. A
//! replayed or retried request runs once. The interaction token is a secret:
//! it never reaches a log line.
//!
//! A click on one of the bot's buttons is a message component interaction
//! (type 3, `data.custom_id` the engine's opaque button id; Discord's
//! "Receiving and Responding" reference). The engine decides it with the
//! clicker's identity and roles; a decision that is ready within
//! [`FAST_ANSWER`] is answered with type 7 (UPDATE_MESSAGE: the clicked
//! message becomes who confirmed or cancelled, `components` empty so the
//! buttons go), a refusal with an ephemeral type 4 that leaves the message
//! as it was; a slower one with type 6 (DEFERRED_UPDATE_MESSAGE) and a later
//! edit of `@original`, which for a component interaction is the message
//! the button is on. `allowed_mentions` is empty on every answer and edit.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{info, warn};

use super::api::DiscordApi;
use super::verify::{self, PublicKey, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use crate::command::{Command, Identity, Permissions, render_discord};
use crate::engine::{Engine, Platform, Request};

/// Interaction type of Discord's PING.
pub const PING: u8 = 1;
/// Interaction type of an application command.
pub const APPLICATION_COMMAND: u8 = 2;
/// Interaction type of a click on a message component (a button).
pub const MESSAGE_COMPONENT: u8 = 3;
/// Answer type "acknowledged; the clicked message is edited later".
pub const DEFERRED_UPDATE_MESSAGE: u8 = 6;
/// Answer type "the clicked message becomes this".
pub const UPDATE_MESSAGE: u8 = 7;
/// How long a click may take to be answered in the interaction response
/// itself (type 7 or 4); past it the answer is type 6 and the edit follows
/// (Discord wants an answer within 3 s).
pub const FAST_ANSWER: std::time::Duration = std::time::Duration::from_millis(2000);
/// Answer type PONG.
pub const PONG: u8 = 1;
/// Answer type "message now".
pub const CHANNEL_MESSAGE: u8 = 4;
/// Answer type "deferred: the message follows".
pub const DEFERRED_CHANNEL_MESSAGE: u8 = 5;
/// The name of the application command.
pub const COMMAND_NAME: &str = "mesh";
/// The name of its one option, the command line.
pub const COMMAND_OPTION: &str = "command";

/// What the interactions handler needs.
#[derive(Debug, Clone)]
pub struct DiscordState {
    /// The command engine.
    pub engine: Arc<Engine>,
    /// Discord's API.
    pub api: DiscordApi,
    /// The application's public key.
    pub public_key: Arc<PublicKey>,
    /// Who may do what (to decide whether the deferred answer is ephemeral).
    pub permissions: Arc<Permissions>,
}

/// The fields of an interaction this bot reads.
#[derive(Debug, Deserialize)]
struct Payload {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(default)]
    id: String,
    #[serde(default)]
    application_id: String,
    #[serde(default)]
    token: String,
    #[serde(default)]
    channel_id: Option<String>,
    #[serde(default)]
    channel: Option<IdOnly>,
    #[serde(default)]
    data: Option<CommandData>,
    #[serde(default)]
    member: Option<Member>,
    #[serde(default)]
    user: Option<IdOnly>,
}

#[derive(Debug, Deserialize)]
struct IdOnly {
    id: String,
}

#[derive(Debug, Deserialize)]
struct CommandData {
    #[serde(default)]
    name: String,
    #[serde(default)]
    options: Vec<CommandOption>,
    /// A component's id (type 3).
    #[serde(default)]
    custom_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CommandOption {
    name: String,
    #[serde(default)]
    value: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct Member {
    user: IdOnly,
    #[serde(default)]
    roles: Vec<String>,
}

/// A verified interaction, understood.
#[derive(Debug, Clone)]
pub enum Incoming {
    /// Discord checking the endpoint.
    Ping,
    /// `/mesh <command line>`.
    Command {
        /// The command to run (boxed: it is much larger than PING).
        request: Box<Request>,
        /// The interaction's id: unique per interaction, so the dedup key.
        interaction_id: String,
        /// The application the token belongs to.
        application_id: String,
        /// The interaction token (a secret: never log it).
        token: String,
    },
    /// A click on a button of one of the bot's messages.
    Click {
        /// Who clicked, where (the line is set by the engine).
        request: Box<Request>,
        /// The button's id.
        custom_id: String,
        /// The interaction's id: the dedup key.
        interaction_id: String,
        /// The application the token belongs to.
        application_id: String,
        /// The interaction token (a secret: never log it).
        token: String,
    },
}

/// Why an interaction is not one this bot handles.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InteractionError {
    #[error("body is not an interaction: {0}")]
    NotJson(String),
    #[error("interaction type {0} is not handled (only PING, the /mesh command and button clicks)")]
    Unsupported(u8),
    #[error("application command \"{0}\" is not handled (only /mesh)")]
    UnknownCommand(String),
    #[error("interaction has no {0}")]
    Missing(&'static str),
}

/// Reads a verified interaction body.
pub fn parse(body: &[u8]) -> Result<Incoming, InteractionError> {
    let payload: Payload = serde_json::from_slice(body).map_err(|e| InteractionError::NotJson(e.to_string()))?;
    match payload.kind {
        PING => return Ok(Incoming::Ping),
        APPLICATION_COMMAND | MESSAGE_COMPONENT => {}
        other => return Err(InteractionError::Unsupported(other)),
    }
    let data = payload.data.ok_or(InteractionError::Missing("data"))?;
    if payload.kind == APPLICATION_COMMAND && data.name != COMMAND_NAME {
        return Err(InteractionError::UnknownCommand(data.name));
    }
    if payload.token.is_empty() {
        return Err(InteractionError::Missing("token"));
    }
    if payload.application_id.is_empty() {
        return Err(InteractionError::Missing("application_id"));
    }
    if payload.id.is_empty() {
        return Err(InteractionError::Missing("id"));
    }
    // In a guild the member carries the user and their role ids; in a DM only `user` is sent.
    let who = match (payload.member, payload.user) {
        (Some(member), _) => Identity::Discord { user: member.user.id, roles: member.roles },
        (None, Some(user)) => Identity::Discord { user: user.id, roles: Vec::new() },
        (None, None) => return Err(InteractionError::Missing("member or user")),
    };
    let channel = payload.channel_id.or(payload.channel.map(|c| c.id));
    if payload.kind == MESSAGE_COMPONENT {
        let custom_id = data.custom_id.filter(|c| !c.is_empty()).ok_or(InteractionError::Missing("custom_id"))?;
        return Ok(Incoming::Click {
            request: Box::new(Request::chat(who, Platform::Discord, channel, "")),
            custom_id,
            interaction_id: payload.id,
            application_id: payload.application_id,
            token: payload.token,
        });
    }
    let line = data
        .options
        .iter()
        .find(|o| o.name == COMMAND_OPTION)
        .and_then(|o| o.value.as_ref())
        .and_then(Value::as_str)
        .unwrap_or("help")
        .to_owned();
    Ok(Incoming::Command {
        request: Box::new(Request::chat(who, Platform::Discord, channel, line)),
        interaction_id: payload.id,
        application_id: payload.application_id,
        token: payload.token,
    })
}

/// True when the answer should show only to the person who ran the command:
/// help, a line that does not parse, or a command they may not run.
pub fn answer_is_private(permissions: &Permissions, request: &Request) -> bool {
    match crate::command::parse(&request.line) {
        Err(_) | Ok(Command::Help { .. }) => true,
        Ok(command) => permissions.check(&request.who, &command, None).is_err(),
    }
}

/// Handles one interaction request.
pub async fn handle(
    State(state): State<DiscordState>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, axum::Json<Value>) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if let Err(e) = verify::verify(&state.public_key, header(TIMESTAMP_HEADER), header(SIGNATURE_HEADER), &body, now) {
        warn!(error = %e, "discord request rejected");
        return (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": format!("invalid request: {e}")})));
    }
    let (request, interaction_id, application_id, token) = match parse(&body) {
        Ok(Incoming::Ping) => return (StatusCode::OK, axum::Json(json!({"type": PONG}))),
        Ok(Incoming::Command { request, interaction_id, application_id, token }) => {
            (*request, interaction_id, application_id, token)
        }
        Ok(Incoming::Click { request, custom_id, interaction_id, application_id, token }) => {
            let clicked = ClickRef { custom_id, interaction_id, application_id, token };
            let (status, answer) = click(state.engine, state.api, *request, clicked).await;
            return (status, axum::Json(answer));
        }
        Err(e) => {
            warn!(error = %e, "discord interaction not handled");
            return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": e.to_string()})));
        }
    };
    // The id comes from the signed body and is unique per interaction, so a
    // replay runs once however its signature header is spelled (upper-case
    // hex, a leading `+`) and whatever timestamp it was re-signed with.
    if !state.engine.first_in_fleet(&format!("discord:interaction:{interaction_id}")).await {
        info!(user = %request.who.key(), "duplicate discord interaction ignored");
        let data = json!({"content": "duplicate request ignored (already handled)",
                          "flags": render_discord::EPHEMERAL_FLAG, "allowed_mentions": {"parse": []}});
        return (StatusCode::OK, axum::Json(json!({"type": CHANNEL_MESSAGE, "data": data})));
    }
    let private = answer_is_private(&state.permissions, &request);
    tokio::spawn(run(state, request, application_id, token));
    let data = if private { json!({"flags": render_discord::EPHEMERAL_FLAG}) } else { json!({}) };
    (StatusCode::OK, axum::Json(json!({"type": DEFERRED_CHANNEL_MESSAGE, "data": data})))
}

/// What names a click and lets it be answered.
#[derive(Debug, Clone)]
pub struct ClickRef {
    /// The button's id.
    pub custom_id: String,
    /// The interaction's id: the dedup key.
    pub interaction_id: String,
    /// The application the token belongs to.
    pub application_id: String,
    /// The interaction token (a secret: never log it).
    pub token: String,
}

/// Decides a click: answered in the response itself when the engine is done
/// within [`FAST_ANSWER`] (type 7 for a decision, an ephemeral type 4 for a
/// refusal or a notification button's result), else type 6 and an edit or
/// a follow-up once done. A replayed click runs once. The HTTP endpoint
/// returns the answer as its response; the gateway posts it to the
/// interaction's callback.
pub async fn click(engine: Arc<Engine>, api: DiscordApi, request: Request, clicked: ClickRef) -> (StatusCode, Value) {
    let ClickRef { custom_id, interaction_id, application_id, token } = clicked;
    if !engine.first_in_fleet(&format!("discord:interaction:{interaction_id}")).await {
        info!(user = %request.who.key(), "duplicate discord click ignored");
        let data = json!({"content": "duplicate click ignored (already handled)",
                          "flags": render_discord::EPHEMERAL_FLAG, "allowed_mentions": {"parse": []}});
        return (StatusCode::OK, json!({"type": CHANNEL_MESSAGE, "data": data}));
    }
    let mut task = tokio::spawn(async move { engine.click(request, &custom_id).await });
    let clicked = match tokio::time::timeout(FAST_ANSWER, &mut task).await {
        Ok(Ok(clicked)) => clicked,
        Ok(Err(e)) => {
            warn!(error = %e, "discord click failed");
            return (StatusCode::INTERNAL_SERVER_ERROR, json!({"error": "the click could not be handled"}));
        }
        Err(_) => {
            tokio::spawn(async move {
                match task.await {
                    Ok(clicked) => deliver_later(&api, clicked, &application_id, &token).await,
                    Err(e) => warn!(error = %e, "discord click failed"),
                }
            });
            return (StatusCode::OK, json!({"type": DEFERRED_UPDATE_MESSAGE}));
        }
    };
    match (clicked.update, clicked.answer) {
        (Some(update), answer) => {
            if let Some(answer) = answer {
                // After the update, so that it is the interaction's answer.
                let (api, app, token) = (api.clone(), application_id, token);
                tokio::spawn(async move {
                    if let Err(e) = api.follow_up(&app, &token, &answer).await {
                        warn!(error = %e, "discord click answer not delivered");
                    }
                });
            }
            (StatusCode::OK, json!({"type": UPDATE_MESSAGE, "data": render_discord::render_update(&update)}))
        }
        (None, Some(answer)) => {
            (StatusCode::OK, json!({"type": CHANNEL_MESSAGE, "data": render_discord::interaction_data(&answer)}))
        }
        (None, None) => (StatusCode::OK, json!({"type": DEFERRED_UPDATE_MESSAGE})),
    }
}

/// What a slow click did, after its type 6 answer: the clicked message
/// edited, and the answer as a follow-up.
async fn deliver_later(api: &DiscordApi, clicked: crate::engine::Clicked, application_id: &str, token: &str) {
    if let Some(update) = &clicked.update
        && let Err(e) = api.edit_original_update(application_id, token, update).await
    {
        warn!(error = %e, "discord message not updated after a click");
    }
    if let Some(answer) = &clicked.answer
        && let Err(e) = api.follow_up(application_id, token, answer).await
    {
        warn!(error = %e, "discord click answer not delivered");
    }
}

/// Runs the command and replaces the deferred answer with its reply; an
/// `ask` answer follows as a follow-up message in the same channel.
async fn run(state: DiscordState, request: Request, application_id: String, token: String) {
    let handled = state.engine.handle(request).await;
    if let Err(e) = state.api.edit_original(&application_id, &token, &handled.reply).await {
        warn!(error = %e, "discord answer not delivered");
    }
    if let Some(code) = handled.confirmation_code {
        // The prompt is the interaction's original answer: edited there once its window passes undecided.
        let (api, app, token) = (state.api.clone(), application_id.clone(), token.clone());
        crate::expiry::when_expired(state.engine.clone(), code, move |expired| async move {
            if let Err(e) = api.edit_original_update(&app, &token, &expired).await {
                warn!(error = %e, "discord prompt not marked expired");
            }
        });
    }
    if let Some(follow_up) = handled.follow_up {
        let answer = follow_up.await;
        if let Err(e) = state.api.follow_up(&application_id, &token, &answer).await {
            warn!(error = %e, "discord ask reply not delivered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Principal, Role};

    fn command(line: Option<&str>, member: Value) -> Vec<u8> {
        let options = line.map_or(json!([]), |l| json!([{"name": "command", "type": 3, "value": l}]));
        let mut body = json!({
            "type": 2, "id": "1", "application_id": "42", "token": "tok", "channel_id": "900",
            "data": {"id": "7", "name": "mesh", "type": 1, "options": options},
        });
        if !member.is_null() {
            body["member"] = member;
        }
        serde_json::to_vec(&body).unwrap()
    }

    #[test]
    fn ping_and_commands_are_read() {
        assert!(matches!(parse(br#"{"type":1,"id":"1","application_id":"42","token":"t"}"#), Ok(Incoming::Ping)));
        let body = command(Some("send nova hi"), json!({"user": {"id": "5"}, "roles": ["100", "200"]}));
        let Ok(Incoming::Command { request, interaction_id, application_id, token }) = parse(&body) else {
            panic!("not a command")
        };
        assert_eq!(interaction_id, "1");
        assert_eq!(request.who, Identity::Discord { user: "5".into(), roles: vec!["100".into(), "200".into()] });
        assert_eq!((request.line.as_str(), request.channel.as_deref()), ("send nova hi", Some("900")));
        assert_eq!(request.platform, Platform::Discord);
        assert_eq!((application_id.as_str(), token.as_str()), ("42", "tok"));

        // A DM: the user without roles; no option: help.
        let mut dm: Value = serde_json::from_slice(&command(None, Value::Null)).unwrap();
        dm["user"] = json!({"id": "6"});
        let Ok(Incoming::Command { request, .. }) = parse(&serde_json::to_vec(&dm).unwrap()) else { panic!() };
        assert_eq!(request.who, Identity::Discord { user: "6".into(), roles: vec![] });
        assert_eq!(request.line, "help");
    }

    #[test]
    fn button_clicks_are_read() {
        let body = json!({
            "type": 3, "id": "77", "application_id": "42", "token": "tok", "channel_id": "900",
            "member": {"user": {"id": "5"}, "roles": ["100"]},
            "message": {"id": "555", "components": []},
            "data": {"component_type": 2, "custom_id": "mesh:confirm:K7P2QX"},
        });
        let Ok(Incoming::Click { request, custom_id, interaction_id, application_id, token }) =
            parse(&serde_json::to_vec(&body).unwrap())
        else {
            panic!("not a click")
        };
        assert_eq!(custom_id, "mesh:confirm:K7P2QX");
        assert_eq!((interaction_id.as_str(), application_id.as_str(), token.as_str()), ("77", "42", "tok"));
        assert_eq!(request.who, Identity::Discord { user: "5".into(), roles: vec!["100".into()] });
        assert_eq!(request.channel.as_deref(), Some("900"));
        let mut no_id = body.clone();
        no_id["data"] = json!({"component_type": 2});
        assert_eq!(parse(&serde_json::to_vec(&no_id).unwrap()).err(), Some(InteractionError::Missing("custom_id")));
    }

    #[test]
    fn other_interactions_are_refused() {
        assert_eq!(parse(br#"{"type":5}"#).err(), Some(InteractionError::Unsupported(5)));
        assert_eq!(parse(br#"{"type":3}"#).err(), Some(InteractionError::Missing("data")));
        assert!(matches!(parse(b"nope"), Err(InteractionError::NotJson(_))));
        let mut other: Value = serde_json::from_slice(&command(Some("ping"), json!({"user": {"id": "5"}}))).unwrap();
        other["data"]["name"] = json!("other");
        assert_eq!(
            parse(&serde_json::to_vec(&other).unwrap()).err(),
            Some(InteractionError::UnknownCommand("other".into()))
        );
        assert_eq!(parse(&command(Some("ping"), Value::Null)).err(), Some(InteractionError::Missing("member or user")));
    }

    #[test]
    fn errors_help_and_denials_are_private() {
        let permissions = Permissions::new().grant(Principal::DiscordRole("100".into()), Role::Operator);
        let request = |user: &str, roles: &[&str], line: &str| {
            Request::chat(
                Identity::Discord { user: user.into(), roles: roles.iter().map(|r| r.to_string()).collect() },
                Platform::Discord,
                None,
                line,
            )
        };
        assert!(!answer_is_private(&permissions, &request("1", &["100"], "send nova hi")));
        assert!(answer_is_private(&permissions, &request("1", &[], "send nova hi")));
        assert!(answer_is_private(&permissions, &request("1", &["100"], "sned nova hi")));
        assert!(answer_is_private(&permissions, &request("1", &["100"], "help")));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_bytes(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse(&body);
        }

        #[test]
        fn the_command_line_and_roles_pass_through_intact(
            line in "\\PC{1,120}",
            roles in proptest::collection::vec("[0-9]{5,19}", 0..4),
        ) {
            let body = command(Some(&line), json!({"user": {"id": "55"}, "roles": roles}));
            match parse(&body) {
                Ok(Incoming::Command { request, token, .. }) => {
                    proptest::prop_assert_eq!(request.line, line);
                    proptest::prop_assert_eq!(request.who, Identity::Discord { user: "55".into(), roles });
                    proptest::prop_assert_eq!(token, "tok");
                }
                other => proptest::prop_assert!(false, "not a command: {other:?}"),
            }
        }
    }
}
