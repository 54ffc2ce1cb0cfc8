//! `POST /v1/public/{agent}/start`: authenticate the org's public key, then mint a session token
//! for the agent's WebSocket. No bot is contacted: for websocket transport the bot is dialled
//! when the client connects.

use actix_web::{HttpRequest, HttpResponse, web};
use base64::{Engine, engine::general_purpose::STANDARD};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, value::RawValue};
use uuid::Uuid;

use super::{agent_of, authenticate, read_body};
use crate::{
    agents::{Agent, WebsocketAuth},
    api_keys,
    error::ApiError,
    routes::peer::Peer,
    state::AppState,
    store::{Listing, MintRequest, Minted, RateCount, SessionRecord, unix_ms},
};

/// Largest request body accepted for any transport.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Largest `body` (as JSON text) for websocket transport: it travels to the bot in a URL.
pub const MAX_WEBSOCKET_BODY_BYTES: usize = 4 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Transport {
    Websocket,
    Daily,
    Webrtc,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Self::Websocket => "websocket",
            Self::Daily => "daily",
            Self::Webrtc => "webrtc",
        }
    }
}

/// The request fields Pipecat Cloud's clients send. Unknown fields are ignored; known fields
/// of the wrong type are a 400. The Daily and ICE fields are accepted and validated, but only
/// websocket transport is served here.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartRequest {
    transport: Option<Transport>,
    /// Kept as the client wrote it: the bot receives these exact bytes.
    body: Option<Box<RawValue>>,
    create_daily_room: Option<bool>,
    #[serde(rename = "dailyRoomProperties")]
    _daily_room_properties: Option<Map<String, Value>>,
    #[serde(rename = "dailyMeetingTokenProperties")]
    _daily_meeting_token_properties: Option<Map<String, Value>>,
    #[serde(rename = "enableDefaultIceServers")]
    _enable_default_ice_servers: Option<bool>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StartResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    ws_url: String,
    session_id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<String>,
}

pub async fn start(
    req: &HttpRequest,
    agent_name: &str,
    payload: web::Payload,
    state: &AppState,
) -> Result<HttpResponse, ApiError> {
    let registry = state.registry.load();
    let (org, key) = authenticate(req, &registry)?;
    let peer = Peer::of(req, &state.trusted_proxies);
    let agent = agent_of(&registry, org, agent_name)?;
    let request = read_request(payload, state).await?;
    let body = websocket_body(&agent, request)?;
    let session_id = Uuid::new_v4();
    let rates = rate_counts(state, key_bucket(key), Some(&peer));
    let token = mint(state, &agent, session_id, &rates, body.as_deref()).await?;
    let body = body.map(|bytes| STANDARD.encode(bytes));
    tracing::Span::current().record("session_id", tracing::field::display(session_id));
    tracing::info!(agent = %agent.service_host, "session started");
    Ok(HttpResponse::Ok().json(StartResponse {
        token,
        ws_url: format!(
            "{}/ws/generic/{}",
            state.ws_base_url(agent.region_for(&state.region)),
            agent.service_host
        ),
        session_id,
        body,
    }))
}

/// The rate limits a `/start` counts against: its credential's (`key_bucket`) and, for callers
/// that are not signed-in providers, its client address's. Counted in the mint's one request.
pub(super) fn rate_counts(
    state: &AppState,
    key_bucket: String,
    peer: Option<&Peer>,
) -> Vec<RateCount> {
    let by_key = state.start_rate_per_key.map(|limit| RateCount { bucket: key_bucket, limit });
    let by_address = peer
        .zip(state.start_rate_per_address)
        .map(|(peer, limit)| RateCount { bucket: peer.bucket(), limit });
    by_key.into_iter().chain(by_address).collect()
}

/// The rate bucket of a public key: named by its hash, so the key never reaches the store.
fn key_bucket(key: &str) -> String {
    hex::encode(&api_keys::hash_api_key(key)[..16])
}

/// The transport must be websocket, the only one served here (the official Python SDK never
/// sends `transport`; the agent's default applies, which is websocket for every agent of this
/// broker). Returns the `body`: the exact bytes of its JSON as the client sent them.
fn websocket_body(agent: &Agent, request: StartRequest) -> Result<Option<Vec<u8>>, ApiError> {
    let transport = request.transport.unwrap_or(Transport::Websocket);
    if request.create_daily_room == Some(true) {
        return Err(ApiError::BadRequest(format!(
            "createDailyRoom is not served by agent {}: this broker serves websocket transport",
            agent.name
        )));
    }
    if transport != Transport::Websocket {
        return Err(ApiError::BadRequest(format!(
            "Transport \"{}\" is not served by agent {}; use \"websocket\"",
            transport.as_str(),
            agent.name
        )));
    }
    let Some(body) = request.body else { return Ok(None) };
    if agent.websocket_auth == WebsocketAuth::None {
        return Err(ApiError::BadRequest(
            "A body cannot be sent through /start to an agent without websocket_auth = \"token\"; \
             pass it as ?body= on the WebSocket URL"
                .into(),
        ));
    }
    let json = body.get();
    if !json.starts_with('{') {
        return Err(ApiError::BadRequest(
            "Invalid request body: body must be a JSON object".into(),
        ));
    }
    if json.len() > MAX_WEBSOCKET_BODY_BYTES {
        return Err(ApiError::PayloadTooLarge(format!(
            "body is {} bytes of JSON; websocket transport allows at most {MAX_WEBSOCKET_BODY_BYTES}",
            json.len()
        )));
    }
    Ok(Some(json.as_bytes().to_vec()))
}

/// Asks the store, in one request, to count the call against `rates`, check the agent's cap
/// (live sessions only: /start reserves nothing, the connect takes the slot) and, for a token
/// agent, record the session as pending with its body; then mints the token, which carries the
/// body's digest and the store's fence. A token never exists without its record. Agents without
/// tokens get none: nothing ties a connect to this id, and the connect makes its own record.
pub(super) async fn mint(
    state: &AppState,
    agent: &Agent,
    session_id: Uuid,
    rates: &[RateCount],
    body: Option<&[u8]>,
) -> Result<Option<String>, ApiError> {
    let now = unix_ms();
    let expires = now + state.token_lifetime.as_millis() as u64;
    let tokens = agent.websocket_auth == WebsocketAuth::Token;
    let mut record = SessionRecord::pending(&agent.service_host, now, expires, &state.region);
    record.body = body.map(|bytes| STANDARD.encode(bytes));
    // A pending record lives as long as its token (and the skew margin): an unused token
    // leaves nothing behind in Redis. Listed for `agent sessions`.
    let ttl = state.token_lifetime + state.clock_skew;
    let listing =
        Listing { agent: &agent.service_host, created_ms: now, retention: state.leases.retention };
    let request = MintRequest {
        agent: &agent.service_host,
        sid: session_id,
        cap: state.cap_of(agent),
        rates,
        rate_window: state.start_rate_window,
        record: tokens.then_some((&record, ttl, listing)),
    };
    let fence = match state.store.mint_session(&request).await? {
        Minted::Ok { fence } => fence,
        Minted::RateLimited => return Err(ApiError::RateLimited),
        Minted::AtCapacity => return Err(ApiError::AtCapacity),
    };
    if !tokens {
        return Ok(None);
    }
    state.metrics.tokens_minted.with_label_values(&[&agent.service_host]).inc();
    let (host, region, fence) = (&agent.service_host, &state.region, fence.unwrap_or_default());
    Ok(Some(state.signing_keys.mint(host, session_id, region, expires, body, &fence)))
}

/// Reads the request body (within its time and size limits) and parses it.
async fn read_request(payload: web::Payload, state: &AppState) -> Result<StartRequest, ApiError> {
    let bytes = read_body(payload, MAX_REQUEST_BYTES, state.start_body_timeout).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(StartRequest::default());
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("Invalid request body: {e}")))
}
