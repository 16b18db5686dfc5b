//! Slack Socket Mode (when `SLACK_APP_TOKEN` is set): slash commands arrive
//! over a WebSocket that slack-morphism opens with `apps.connections.open`,
//! so the bot needs no public HTTPS endpoint. Each command is handled like
//! one from `POST /slack/commands`: the envelope is acknowledged at once with
//! the ephemeral "working" answer and the result follows on `response_url`.
//! Slack redelivers an unacknowledged envelope, possibly on another
//! connection: the command's `trigger_id` makes such a retry run once.

use std::sync::Arc;

use slack_morphism::prelude::*;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::api::{HyperConnector, SlackApiError, web_client};
use super::commands::{Refused, SlackState, SlashCommand, start};

/// Serves slash commands over Socket Mode until `stop`.
pub async fn serve(
    state: SlackState,
    api_url: &str,
    app_token: &mesh_protocol::Secret,
    stop: CancellationToken,
) -> Result<(), SlackApiError> {
    let client = web_client(api_url)?;
    let environment =
        Arc::new(SlackClientEventsListenerEnvironment::new(client).with_error_handler(on_error).with_user_state(state));
    let callbacks = SlackSocketModeListenerCallbacks::new().with_command_events(on_command);
    let listener = SlackClientSocketModeListener::new(&SlackClientSocketModeConfig::new(), environment, callbacks);
    let token = SlackApiToken::new(SlackApiTokenValue(app_token.expose().to_owned()));
    tokio::time::timeout(super::api::CALL_TIMEOUT, listener.listen_for(&token))
        .await
        .map_err(|_| SlackApiError::TimedOut(super::api::CALL_TIMEOUT))?
        .map_err(|e| SlackApiError::Post(format!("socket mode: {e}")))?;
    listener.start().await;
    info!("slack socket mode connected");
    stop.cancelled().await;
    listener.shutdown().await;
    Ok(())
}

async fn on_command(
    event: SlackCommandEvent,
    _client: Arc<SlackClient<HyperConnector>>,
    states: SlackClientEventsUserState,
) -> UserCallbackResult<SlackCommandEventResponse> {
    let state = states.read().await.get_user_state::<SlackState>().cloned().ok_or("slack state missing")?;
    let dedup_key = format!("slack:trigger:{}", event.trigger_id.0);
    let command = SlashCommand {
        user_id: event.user_id.0,
        channel_id: Some(event.channel_id.0),
        text: event.text.unwrap_or_default(),
        response_url: event.response_url.0.to_string(),
    };
    let text = match start(&state, command, &dedup_key).await {
        Ok(text) => text,
        Err(Refused::ForeignResponseUrl) => "response_url is not a Slack URL; command not run".to_owned(),
    };
    Ok(SlackCommandEventResponse::new(SlackMessageContent::new().with_text(text))
        .with_response_type(SlackMessageResponseType::Ephemeral))
}

/// Logs what went wrong without the frame itself (it holds a `response_url`).
fn on_error(
    error: Box<dyn std::error::Error + Send + Sync>,
    _client: Arc<SlackClient<HyperConnector>>,
    _states: SlackClientEventsUserState,
) -> HttpStatusCode {
    let text = error.to_string();
    warn!(error = %text.split(['\n', '{']).next().unwrap_or_default().trim(), "slack socket mode error");
    HttpStatusCode::OK
}
