//! `GET /ws/generic/{agent}.{org}[/{token}]`: the WebSocket gate.
//!
//! Everything that can refuse a connect happens before the upgrade, with a plain HTTP answer:
//! the handshake is checked first (so a token is never spent on a request that cannot upgrade),
//! then the token is verified and consumed exactly once, then the bot is dialled. Only when the
//! bot has answered is the client upgraded and the relay started. If the bot cannot be reached,
//! the consume is undone so the token works again for the rest of its lifetime.

use std::time::{Duration, Instant};

use actix_web::{HttpRequest, HttpResponse, http::header, web};
use base64::{
    Engine,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig, general_purpose::STANDARD},
};
use serde::Deserialize;
use uuid::Uuid;

use crate::{
    agents::{Agent, WebsocketAuth},
    bridge,
    error::{ApiError, TokenRefusal},
    keys,
    startup::AppState,
    store::unix_ms,
    token::redact,
};

/// Accepts `?body=` in the standard or the URL-safe alphabet, padded or not.
const LENIENT: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, LENIENT);
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, LENIENT);

#[derive(Debug, Deserialize)]
pub struct WsPath {
    service: String,
    token: Option<String>,
}

/// The query parameters the gate reads; the rest of the query string is dropped, never passed
/// to the bot.
#[derive(Debug, Deserialize)]
pub struct WsQuery {
    token: Option<String>,
    body: Option<String>,
}

pub async fn connect(
    req: HttpRequest,
    path: web::Path<WsPath>,
    query: web::Query<WsQuery>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    // Builds the 101 answer without sending it; it is only returned once the bot is connected.
    let (response, session, stream) = actix_ws::handle(&req, payload)
        .map_err(|_| ApiError::BadRequest("Expected a WebSocket upgrade request".into()))?;
    let WsPath { service, token: path_token } = path.into_inner();
    let agent = state.agents.by_service_host(&service).ok_or(ApiError::AgentNotFound)?.clone();
    let body = query.body.as_deref().map(decode_body).transpose()?;

    let (session_id, minted_in, consumed) = match agent.websocket_auth {
        WebsocketAuth::None => (Uuid::new_v4(), state.region.clone(), None),
        WebsocketAuth::Token => {
            let token = find_token(&req, query.token.as_deref(), path_token.as_deref())
                .ok_or(ApiError::TokenRefused(TokenRefusal::Missing))?;
            let now = unix_ms();
            let claims = state.keyring.verify(token, &agent.service_host, now).map_err(|e| {
                tracing::info!(agent = %agent.service_host, token = %redact(token), reason = %e, "connect refused");
                ApiError::TokenRefused(TokenRefusal::Invalid(e))
            })?;
            let holder = format!("{}:{}", state.replica_id, Uuid::new_v4().simple());
            // The mark needs to outlive the token only: after expiry the token is refused anyway.
            let remaining = Duration::from_millis(claims.exp - now);
            if !state.store.consume_token(claims.sid, &holder, remaining).await? {
                tracing::info!(session_id = %claims.sid, agent = %agent.service_host, "connect refused: token already used");
                return Err(ApiError::TokenRefused(TokenRefusal::Replayed));
            }
            (claims.sid, claims.rg, Some(holder))
        }
    };

    let bot = match dial_bot(&req, &agent, &state, session_id, &minted_in, body.as_deref()).await {
        Ok(bot) => bot,
        Err(e) => {
            tracing::warn!(%session_id, agent = %agent.service_host, error = %e, "bot unreachable");
            if let Some(holder) = consumed {
                // If this fails the token stays spent: the client must call /start again.
                if let Err(e) = state.store.release_token(session_id, &holder).await {
                    tracing::warn!(%session_id, error = %e, "could not give the token back");
                }
            }
            return Err(ApiError::BotUnreachable);
        }
    };

    tracing::info!(%session_id, agent = %agent.service_host, "session connected");
    let limits = state.bridge;
    let max_duration = agent.max_session_duration;
    actix_web::rt::spawn(async move {
        let started = Instant::now();
        let reason = bridge::relay(session, stream, bot, limits, max_duration).await;
        tracing::info!(
            %session_id,
            agent = %agent.service_host,
            reason = reason.as_str(),
            duration_ms = started.elapsed().as_millis() as u64,
            "session ended"
        );
    });
    Ok(response)
}

/// The token, from the first place that holds one: `Authorization: Bearer`, then `?token=`,
/// then the last path segment (telephony providers such as Twilio drop query strings).
fn find_token<'a>(
    req: &'a HttpRequest,
    query: Option<&'a str>,
    path: Option<&'a str>,
) -> Option<&'a str> {
    keys::bearer(req.headers().get(header::AUTHORIZATION))
        .or(query.filter(|t| !t.is_empty()))
        .or(path.filter(|t| !t.is_empty()))
}

/// Decodes `?body=` and re-encodes it canonically (standard alphabet, padded) for the bot.
fn decode_body(raw: &str) -> Result<String, ApiError> {
    let bytes = STANDARD_LENIENT
        .decode(raw)
        .or_else(|_| URL_SAFE_LENIENT.decode(raw))
        .map_err(|_| ApiError::BadRequest("body must be base64-encoded JSON".into()))?;
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .map_err(|_| ApiError::BadRequest("body must be base64-encoded JSON".into()))?;
    Ok(STANDARD.encode(bytes))
}

async fn dial_bot(
    req: &HttpRequest,
    agent: &Agent,
    state: &AppState,
    session_id: Uuid,
    minted_in: &str,
    body: Option<&str>,
) -> Result<bridge::BotSocket, bridge::DialError> {
    let mut url = agent.bot_url.clone();
    if let Some(body) = body {
        url.query_pairs_mut().append_pair("body", body);
    }
    let peer = req.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    let forwarded_for = match req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(chain) if !peer.is_empty() => format!("{chain}, {peer}"),
        Some(chain) => chain.to_owned(),
        None => peer,
    };
    let headers = [
        ("x-pipecat-session-id", session_id.to_string()),
        ("x-pipecat-service-host", agent.service_host.clone()),
        ("x-pipecat-region", minted_in.to_owned()),
        ("x-forwarded-for", forwarded_for),
    ];
    bridge::dial(&url, &headers, &state.bridge, state.bot_connect_timeout).await
}
