//! Provider-direct streams, as Pipecat Cloud serves them, for agents with
//! `websocket_auth = "none"`: `/ws/twilio` (the agent named by the `_pipecatCloudServiceHost`
//! custom parameter of Twilio's `start` message), `/ws/telnyx`, `/ws/plivo`, `/ws/exotel`
//! (`?serviceHost=agent.org`).
//!
//! Twilio names the agent inside the stream, so the client is upgraded first. The broker then
//! reads only the opening messages it needs (up to `start`; within a bounded time, count and
//! size), picks and dials the bot, passes those frames on to it as they came, and relays the
//! rest. What goes wrong after the upgrade is told with a close code and reason.

use std::{sync::Arc, time::Duration};

use actix_web::{HttpRequest, HttpResponse, http::Method, web};
use actix_ws::CloseCode;
use tokio::io::AsyncReadExt;

use super::{LiveSession, dial_bot, not_an_upgrade, request::WsQuery, reservation::Reservation};
use crate::{
    agents::WebsocketAuth,
    bridge,
    error::ApiError,
    routes::peer::Peer,
    sessions::EndReason,
    state::AppState,
    telephony::{Opening, Provider, opening},
    upgrade::{self, ClientSocket},
    wire::{self, Sender, Violation, opcode},
};

/// How long a provider has to send its opening messages, through `start`.
pub const OPENING_WAIT: Duration = Duration::from_secs(5);
/// Opening messages read at most before `start` must have come.
pub const MAX_OPENING_MESSAGES: usize = 4;
/// Bytes of opening messages read at most.
pub const MAX_OPENING_BYTES: usize = 64 * 1024;

/// Close codes of a provider-direct stream refused after the upgrade.
pub mod close {
    use actix_ws::CloseCode;

    /// The opening messages are not the provider's, or name no agent.
    pub const BAD_OPENING: CloseCode = CloseCode::Other(4400);
    /// The agent requires session tokens: it takes calls through the answer webhooks.
    pub const TOKEN_REQUIRED: CloseCode = CloseCode::Other(4403);
    /// No agent by the service host named.
    pub const UNKNOWN_AGENT: CloseCode = CloseCode::Other(4404);
    /// No `start` within the opening wait.
    pub const OPENING_TIMEOUT: CloseCode = CloseCode::Other(4408);
    /// The agent is at its cap.
    pub const AT_CAPACITY: CloseCode = CloseCode::Other(4429);
}

pub async fn connect(
    req: HttpRequest,
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
    let handshake = upgrade::handshake(&req).ok_or_else(not_an_upgrade)?;
    let forwarded_for = Peer::of(&req, &state.trusted_proxies).forwarded_for;
    let state = state.into_inner();
    let host = query.service_host;
    Ok(upgrade::switch(handshake, move |client, early| {
        route(forwarded_for, state, provider, host, client, early)
    }))
}

/// Reads the opening, finds and reserves the agent, dials its bot and relays the session, the
/// opening first: the bot receives the provider's frames exactly as they came.
async fn route(
    forwarded_for: String,
    state: Arc<AppState>,
    provider: Provider,
    query_host: Option<String>,
    mut client: ClientSocket,
    early: Vec<u8>,
) {
    let mut read = early;
    let max_frame = state.bridge.max_frame_bytes;
    let named = match read_opening(provider, &mut client, &mut read, max_frame).await {
        Ok(named) => named,
        Err(Some((code, why))) => return bridge::refuse(client, code, why).await,
        Err(None) => return,
    };
    let Some(host) = named.or(query_host) else {
        let why = match provider {
            Provider::Twilio => "no _pipecatCloudServiceHost custom parameter in start",
            _ => "no ?serviceHost=agent.org on the stream URL",
        };
        return bridge::refuse(client, close::BAD_OPENING, why).await;
    };
    let agent = state.registry.load().agents.by_service_host(&host).cloned();
    let Some(agent) = agent else {
        return bridge::refuse(client, close::UNKNOWN_AGENT, "unknown service host").await;
    };
    if agent.websocket_auth == WebsocketAuth::Token {
        let why = "this agent requires session tokens: answer calls with the broker's webhook";
        return bridge::refuse(client, close::TOKEN_REQUIRED, why).await;
    }
    let reservation = match Reservation::take(&state, agent, None, None).await {
        Ok(reservation) => reservation,
        Err(ApiError::AtCapacity) => {
            return bridge::refuse(client, close::AT_CAPACITY, "agent at capacity").await;
        }
        Err(e) => {
            let why = e.to_string();
            return bridge::refuse(client, CloseCode::Again, &why).await;
        }
    };
    let bot = match dial_bot(forwarded_for, &state, &reservation).await {
        Ok(bot) => bot,
        Err(e) => {
            tracing::warn!(session_id = %reservation.session_id, error = %e, "bot unreachable");
            reservation.abandon(&state, Some(EndReason::BotUnreachable)).await;
            return bridge::refuse(client, CloseCode::Error, "bot unreachable").await;
        }
    };
    // The bot parses the provider's opening itself, from the first messages: the relay starts
    // with every byte read so far.
    let activated = reservation.activate(&state);
    LiveSession::new(state, activated).run(client, read, bot).await
}

/// Reads the client's frames into `read` up to and including `start`; returns the service host
/// they name. `Err` carries the close to send (`None`: the client went away).
async fn read_opening(
    provider: Provider,
    client: &mut ClientSocket,
    read: &mut Vec<u8>,
    max_frame: usize,
) -> Result<Option<String>, Option<(CloseCode, &'static str)>> {
    let refuse = |code: CloseCode, why: &'static str| Some((code, why));
    let reading = async {
        let mut opened = OpeningMessages::new(provider, MAX_OPENING_MESSAGES, MAX_OPENING_BYTES);
        let mut at = 0;
        loop {
            loop {
                let frame = match wire::decode(&read[at..], Sender::Client, max_frame) {
                    Ok(Some((frame, size))) => {
                        at += size;
                        frame
                    }
                    Ok(None) => break,
                    Err(Violation::TooBig) => {
                        return Err(refuse(CloseCode::Size, "client message too big"));
                    }
                    Err(Violation::Protocol(why)) => {
                        return Err(refuse(CloseCode::Protocol, why));
                    }
                };
                match frame.opcode {
                    opcode::TEXT if frame.fin => {
                        let Ok(text) = std::str::from_utf8(&frame.payload) else {
                            return Err(refuse(CloseCode::Invalid, "text is not UTF-8"));
                        };
                        match opened.take(text) {
                            Ok(Opening::Start { service_host }) => return Ok(service_host),
                            Ok(_) => {}
                            Err(why) => return Err(refuse(close::BAD_OPENING, why)),
                        }
                    }
                    // Pings and pongs go on to the bot with the rest.
                    opcode::PING | opcode::PONG => {}
                    opcode::CLOSE => return Err(None),
                    _ => return Err(refuse(close::BAD_OPENING, "the opening messages are text")),
                }
            }
            if read.len() > 2 * MAX_OPENING_BYTES {
                let why = "no start message among the opening messages";
                return Err(refuse(close::BAD_OPENING, why));
            }
            read.reserve(4096);
            match client.read_buf(read).await {
                Ok(0) | Err(_) => return Err(None),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(OPENING_WAIT, reading)
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
