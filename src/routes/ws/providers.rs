//! Provider-direct streams, as Pipecat Cloud serves them, for agents with
//! `websocket_auth = "none"`: `/ws/twilio` (the agent named by the `_pipecatCloudServiceHost`
//! custom parameter of Twilio's `start` message), `/ws/telnyx`, `/ws/plivo`, `/ws/exotel`
//! (`?serviceHost=agent.org`).
//!
//! Twilio names the agent inside the stream, so the client is upgraded first. The broker then
//! reads only the opening messages it needs (up to `start`; within a bounded time, count and
//! size), picks and dials the bot, replays those messages to it unchanged and in order, and
//! relays the rest. What goes wrong after the upgrade is told with a close code and reason.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, http::Method, web};
use actix_ws::{CloseCode, CloseReason, Message};
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message as BotMessage;

use super::{LiveSession, dial_bot, request::WsQuery, reservation::Reservation};
use crate::{
    agents::WebsocketAuth,
    error::ApiError,
    sessions::EndReason,
    state::AppState,
    telephony::{Opening, Provider, opening},
};

/// How long a provider has to send its opening messages, through `start`.
pub const OPENING_WAIT: Duration = Duration::from_secs(5);
/// Opening messages read at most before `start` must have come.
pub const MAX_OPENING_MESSAGES: usize = 4;
/// Bytes of opening messages read at most.
pub const MAX_OPENING_BYTES: usize = 64 * 1024;

/// Close codes of a provider-direct stream refused after the upgrade.
pub mod close {
    /// The opening messages are not the provider's, or name no agent.
    pub const BAD_OPENING: u16 = 4400;
    /// The agent requires session tokens: it takes calls through the answer webhooks.
    pub const TOKEN_REQUIRED: u16 = 4403;
    /// No agent by the service host named.
    pub const UNKNOWN_AGENT: u16 = 4404;
    /// No `start` within the opening wait.
    pub const OPENING_TIMEOUT: u16 = 4408;
    /// The agent is at its cap.
    pub const AT_CAPACITY: u16 = 4429;
}

pub async fn connect(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let provider =
        req.path().rsplit('/').next().and_then(Provider::parse).ok_or(ApiError::RouteNotFound)?;
    if req.method() != Method::GET {
        return Err(ApiError::MethodNotAllowed);
    }
    if state.is_draining() {
        return Err(ApiError::Draining);
    }
    state.check_connections()?;
    let query = WsQuery::read(req.query_string(), state.max_query_bytes)?;
    let (response, client, stream) = actix_ws::handle(&req, payload)
        .map_err(|_| ApiError::BadRequest("Expected a WebSocket upgrade request".into()))?;
    let state = state.into_inner();
    actix_web::rt::spawn(route(req, state, provider, query.service_host, client, stream));
    Ok(response)
}

/// Reads the opening, finds and reserves the agent, dials its bot, replays the opening to it and
/// relays the session.
async fn route(
    req: HttpRequest,
    state: std::sync::Arc<AppState>,
    provider: Provider,
    query_host: Option<String>,
    mut client: actix_ws::Session,
    mut stream: actix_ws::MessageStream,
) {
    let refuse = |code: u16, why: &str| CloseReason {
        code: CloseCode::Other(code),
        description: Some(why.to_owned()),
    };
    let (messages, named) = match read_opening(provider, &mut client, &mut stream).await {
        Ok(opening) => opening,
        Err(Some(reason)) => return drop(client.close(Some(reason)).await),
        Err(None) => return,
    };
    let Some(host) = named.or(query_host) else {
        let why = match provider {
            Provider::Twilio => "no _pipecatCloudServiceHost custom parameter in start",
            _ => "no ?serviceHost=agent.org on the stream URL",
        };
        return drop(client.close(Some(refuse(close::BAD_OPENING, why))).await);
    };
    let agent = state.registry.load().agents.by_service_host(&host).cloned();
    let Some(agent) = agent else {
        return drop(
            client.close(Some(refuse(close::UNKNOWN_AGENT, "unknown service host"))).await,
        );
    };
    if agent.websocket_auth == WebsocketAuth::Token {
        let why = "this agent requires session tokens: answer calls with the broker's webhook";
        return drop(client.close(Some(refuse(close::TOKEN_REQUIRED, why))).await);
    }
    let reservation = match Reservation::take(&state, agent, None, None).await {
        Ok(reservation) => reservation,
        Err(ApiError::AtCapacity) => {
            return drop(client.close(Some(refuse(close::AT_CAPACITY, "agent at capacity"))).await);
        }
        Err(e) => {
            let reason = CloseReason { code: CloseCode::Again, description: Some(e.to_string()) };
            return drop(client.close(Some(reason)).await);
        }
    };
    let mut bot = match dial_bot(&req, &state, &reservation).await {
        Ok(bot) => bot,
        Err(e) => {
            tracing::warn!(session_id = %reservation.session_id, error = %e, "bot unreachable");
            reservation.abandon(&state, EndReason::BotUnreachable).await;
            let reason =
                CloseReason { code: CloseCode::Error, description: Some("bot unreachable".into()) };
            return drop(client.close(Some(reason)).await);
        }
    };
    // The bot parses the provider's opening itself, from the first messages, as text.
    for text in messages {
        if bot.send(BotMessage::Text(text.into())).await.is_err() {
            reservation.abandon(&state, EndReason::BotClosed).await;
            let reason = CloseReason {
                code: CloseCode::Error,
                description: Some("bot connection failed".into()),
            };
            return drop(client.close(Some(reason)).await);
        }
    }
    LiveSession::new(state, reservation.activate()).run(client, stream, bot).await
}

/// The opening messages up to and including `start`, and the service host they name. `Err`
/// carries the close to send (`None`: the client went away).
async fn read_opening(
    provider: Provider,
    client: &mut actix_ws::Session,
    stream: &mut actix_ws::MessageStream,
) -> Result<(Vec<String>, Option<String>), Option<CloseReason>> {
    let refuse = |code: u16, why: &str| {
        Some(CloseReason { code: CloseCode::Other(code), description: Some(why.to_owned()) })
    };
    let read = async {
        let mut opened = OpeningMessages::new(provider, MAX_OPENING_MESSAGES, MAX_OPENING_BYTES);
        while let Some(message) = stream.recv().await {
            match message {
                Ok(Message::Text(text)) => match opened.take(&text) {
                    Ok(Opening::Start { service_host }) => {
                        return Ok((opened.messages, service_host));
                    }
                    Ok(_) => {}
                    Err(why) => return Err(refuse(close::BAD_OPENING, why)),
                },
                Ok(Message::Ping(data)) => {
                    if client.pong(&data).await.is_err() {
                        return Err(None);
                    }
                }
                Ok(Message::Pong(_)) => {}
                Ok(Message::Close(_)) => return Err(None),
                Ok(_) => return Err(refuse(close::BAD_OPENING, "the opening messages are text")),
                Err(_) => {
                    return Err(Some(CloseReason { code: CloseCode::Protocol, description: None }));
                }
            }
        }
        Err(None)
    };
    tokio::time::timeout(OPENING_WAIT, read)
        .await
        .unwrap_or_else(|_| Err(refuse(close::OPENING_TIMEOUT, "no start message in time")))
}

/// The opening messages of a stream, read up to `start` within a count and a size: what
/// `read_opening` does with each text message, apart from the socket.
#[derive(Debug)]
pub struct OpeningMessages {
    provider: Provider,
    /// The messages taken, in order, to replay to the bot.
    pub messages: Vec<String>,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

impl OpeningMessages {
    pub fn new(provider: Provider, max_messages: usize, max_bytes: usize) -> Self {
        Self { provider, messages: Vec::new(), bytes: 0, max_messages, max_bytes }
    }

    /// Takes one text message: `Start` once it is the `start` message (the opening is then
    /// complete), `More` to read on, or why the opening is refused (never `Invalid`).
    pub fn take(&mut self, text: &str) -> Result<Opening, &'static str> {
        self.bytes += text.len();
        if self.bytes > self.max_bytes || self.messages.len() >= self.max_messages {
            return Err("no start message among the opening messages");
        }
        let seen = opening(self.provider, text);
        self.messages.push(text.to_owned());
        match seen {
            Opening::Invalid => Err("not a media-stream message"),
            seen => Ok(seen),
        }
    }
}
