//! `GET /ws/generic/{agent}.{org}[/{token}]`: the WebSocket gate.
//!
//! Everything that can refuse a connect happens before the upgrade, with a plain HTTP answer:
//! the handshake is checked first (so a token is never spent on a request that cannot upgrade),
//! then the token is verified and consumed exactly once, then the bot is dialled. Only when the
//! bot has answered is the client upgraded and the relay started. If the bot cannot be reached,
//! the consume is undone so the token works again for the rest of its lifetime.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use tracing::Instrument;

use actix_web::{
    HttpRequest, HttpResponse,
    http::{Method, header},
    web,
};
use base64::{
    Engine,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig, general_purpose::STANDARD},
};
use serde::Deserialize;
use uuid::Uuid;

use crate::{
    agents::{Agent, WebsocketAuth},
    api_keys, bridge,
    error::{ApiError, TokenRefusal},
    sessions::{EndReason, Registration, Status, ended_fields},
    startup::AppState,
    store::unix_ms,
    token::redact,
};

/// Accepts `?body=` in the standard or the URL-safe alphabet, padded or not.
const LENIENT: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, LENIENT);
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, LENIENT);

/// Where WebSocket connects arrive: `{PREFIX}/{agent}.{org}[/{token}]`.
pub const PREFIX: &str = "/ws/generic";

/// The rest of the path after [`PREFIX`]: the service host and, maybe, the token.
fn parse_path(rest: &str) -> Option<(&str, Option<&str>)> {
    let rest = rest.strip_prefix('/')?;
    match rest.split_once('/') {
        None => Some((rest, None)),
        Some((service, token)) if !token.contains('/') => Some((service, Some(token))),
        Some(_) => None,
    }
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
    query: web::Query<WsQuery>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    if req.method() != Method::GET {
        return Err(ApiError::MethodNotAllowed);
    }
    if state.draining.load(Ordering::Acquire) {
        return Err(ApiError::Draining);
    }
    let (service, path_token) =
        parse_path(req.match_info().unprocessed()).ok_or(ApiError::RouteNotFound)?;
    // Builds the 101 answer without sending it; it is only returned once the bot is connected.
    let (response, client, stream) = actix_ws::handle(&req, payload)
        .map_err(|_| ApiError::BadRequest("Expected a WebSocket upgrade request".into()))?;
    let agent = state
        .registry
        .load()
        .agents
        .by_service_host(service)
        .ok_or(ApiError::AgentNotFound)?
        .clone();
    let body = query.body.as_deref().map(decode_body).transpose()?;

    let admission = match agent.websocket_auth {
        WebsocketAuth::None => Admission::open(&state),
        WebsocketAuth::Token => {
            let token = find_token(&req, query.token.as_deref(), path_token)
                .ok_or(ApiError::TokenRefused(TokenRefusal::Missing))?;
            Admission::consume(&state, &agent, token).await?
        }
    };
    let sid = admission.session_id;
    tracing::Span::current().record("session_id", tracing::field::display(sid));

    // The cap is taken after the token so that a replay never touches it; at the cap the token
    // is given back.
    match state
        .store
        .acquire_slot(&agent.service_host, sid, agent.max_agents, state.leases.lease)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            admission.give_back(&state).await;
            tracing::info!(session_id = %sid, agent = %agent.service_host, "connect refused: agent at capacity");
            return Err(ApiError::AtCapacity);
        }
        // Failing open means no cap either: the session runs without a lease.
        Err(e) if state.fail_open => {
            tracing::warn!(session_id = %sid, error = %e, "UNCHECKED ACCEPT: concurrency cap not enforced");
        }
        Err(e) => {
            admission.give_back(&state).await;
            return Err(e.into());
        }
    }
    // Registered before the dial, so the lease is renewed from now on and a DELETE finds it.
    let (registration, stop) = state.live.register(sid, &agent.service_host);

    let dialling = Instant::now();
    let dialled = dial_bot(&req, &agent, &state, sid, &admission.minted_in, body.as_deref()).await;
    let outcome = if dialled.is_ok() { "connected" } else { "failed" };
    state
        .metrics
        .bot_dial_seconds
        .with_label_values(&[outcome])
        .observe(dialling.elapsed().as_secs_f64());
    let bot = match dialled {
        Ok(bot) => bot,
        Err(e) => {
            tracing::warn!(session_id = %sid, agent = %agent.service_host, error = %e, "bot unreachable");
            release(&state, &agent, sid, registration).await;
            admission.give_back(&state).await;
            if admission.consumed.is_some() {
                let note = [("last_error", EndReason::BotUnreachable.as_str().to_owned())];
                let _ =
                    state.store.update_session(sid, &[Status::Pending.as_str()], &note, None).await;
            }
            return Err(ApiError::BotUnreachable);
        }
    };

    let max_duration = agent.max_session_duration.min(state.max_session);
    let connected_ms = unix_ms();
    let active = [
        ("status", Status::Active.as_str().to_owned()),
        ("service", agent.service_host.clone()),
        ("replica", state.replica_id.clone()),
        ("region", state.region.clone()),
        ("minted_region", admission.minted_in.clone()),
        ("connected_ms", connected_ms.to_string()),
    ];
    // A token session must still be pending (or unrecorded, if Redis lost it in a failover): if
    // DELETE ended it meanwhile, the connect is refused and the bot let go.
    let from: &[&str] = if admission.consumed.is_some() { &["", "pending"] } else { &[""] };
    let ttl = state.active_record_ttl(max_duration);
    match state.store.update_session(sid, from, &active, Some(ttl)).await {
        Ok(true) => {}
        Ok(false) => {
            release(&state, &agent, sid, registration).await;
            let mut bot = bot;
            let _ = bot.close(None).await;
            tracing::info!(session_id = %sid, "connect refused: session was terminated");
            return Err(ApiError::TokenRefused(TokenRefusal::Terminated));
        }
        // The session goes on; its record says pending until it ends.
        Err(e) => {
            tracing::warn!(session_id = %sid, error = %e, "could not mark the session active")
        }
    }

    tracing::info!(agent = %agent.service_host, "session connected");
    let metrics = &state.metrics;
    metrics.connects_accepted.with_label_values(&[&agent.service_host]).inc();
    let counters = bridge::RelayCounters::new(metrics);
    let span = tracing::info_span!("session", session_id = %sid, agent = %agent.service_host);
    let session = async move {
        let active = state.metrics.active_sessions.with_label_values(&[&agent.service_host]);
        active.inc();
        let outcome =
            bridge::relay(client, stream, bot, state.bridge, max_duration, stop, counters).await;
        active.dec();
        state.metrics.sessions_ended.with_label_values(&[outcome.reason.as_str()]).inc();
        let ended = ended_fields(outcome.reason, outcome.detail, Some(connected_ms));
        let retention = Some(state.leases.retention);
        if let Err(e) =
            state.store.update_session(sid, &["pending", "active"], &ended, retention).await
        {
            tracing::warn!(error = %e, "could not record the end of the session");
        }
        release(&state, &agent, sid, registration).await;
        tracing::info!(
            reason = outcome.reason.as_str(),
            detail = outcome.detail,
            duration_ms = unix_ms().saturating_sub(connected_ms),
            "session ended"
        );
    };
    actix_web::rt::spawn(session.instrument(span));
    Ok(response)
}

/// Lets go of a session's place on this replica and its concurrency slot. A slot that cannot be
/// released lapses with its lease, which is no longer renewed.
async fn release(state: &AppState, agent: &Agent, sid: Uuid, registration: Registration) {
    drop(registration);
    if let Err(e) = state.store.release_slot(&agent.service_host, sid).await {
        tracing::warn!(session_id = %sid, error = %e, "could not release the slot; it lapses with its lease");
    }
}

/// The right to start one session: a session id, and for token agents the consumed token.
struct Admission {
    session_id: Uuid,
    minted_in: String,
    /// The value this connect wrote to consume the token, to give it back by.
    consumed: Option<String>,
}

impl Admission {
    /// An agent without websocket auth: every connect is a new session.
    fn open(state: &AppState) -> Self {
        Self { session_id: Uuid::new_v4(), minted_in: state.region.clone(), consumed: None }
    }

    /// Verifies the token and consumes it, exactly once across all replicas.
    async fn consume(state: &AppState, agent: &Agent, token: &str) -> Result<Self, ApiError> {
        let now = unix_ms();
        let claims = state.keyring.verify(token, &agent.service_host, now).map_err(|e| {
            tracing::info!(agent = %agent.service_host, token = %redact(token), reason = %e, "connect refused");
            ApiError::TokenRefused(TokenRefusal::Invalid(e))
        })?;
        let holder = format!("{}:{}", state.replica_id, Uuid::new_v4().simple());
        // The mark needs to outlive the token only: after expiry the token is refused anyway.
        let remaining = Duration::from_millis(claims.exp - now);
        let consuming = Instant::now();
        let consumed = state.store.consume_token(claims.sid, &holder, remaining).await;
        let outcome = match consumed {
            Ok(true) => "consumed",
            Ok(false) => "already_used",
            Err(_) => "failed",
        };
        let histogram = state.metrics.token_consume_seconds.with_label_values(&[outcome]);
        histogram.observe(consuming.elapsed().as_secs_f64());
        match consumed {
            Ok(true) => {
                Ok(Self { session_id: claims.sid, minted_in: claims.rg, consumed: Some(holder) })
            }
            Ok(false) => {
                tracing::info!(session_id = %claims.sid, agent = %agent.service_host, "connect refused: token already used");
                Err(ApiError::TokenRefused(TokenRefusal::Replayed))
            }
            Err(e) if state.fail_open => {
                state.metrics.unchecked_accepts.inc();
                let count = state.metrics.unchecked_accepts.get();
                tracing::warn!(
                    session_id = %claims.sid, agent = %agent.service_host, error = %e,
                    unchecked_accepts = count,
                    "UNCHECKED ACCEPT: Redis unreachable and on_unavailable = open; the token's \
                     one-time use is not enforced for this connect"
                );
                Ok(Self { session_id: claims.sid, minted_in: claims.rg, consumed: None })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the token back, so the client can connect again within its lifetime.
    async fn give_back(&self, state: &AppState) {
        let Some(holder) = &self.consumed else { return };
        // If this fails the token stays spent: the client must call /start again.
        if let Err(e) = state.store.release_token(self.session_id, holder).await {
            tracing::warn!(session_id = %self.session_id, error = %e, "could not give the token back");
        }
    }
}

/// The token, from the first place that holds one: `Authorization: Bearer`, then `?token=`,
/// then the last path segment (telephony providers such as Twilio drop query strings).
fn find_token<'a>(
    req: &'a HttpRequest,
    query: Option<&'a str>,
    path: Option<&'a str>,
) -> Option<&'a str> {
    api_keys::bearer(req.headers().get(header::AUTHORIZATION))
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
    let mut url = agent.bot_for(&state.region).clone();
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

#[cfg(test)]
mod tests {
    use super::parse_path;

    #[test]
    fn paths() {
        assert_eq!(parse_path("/a.o"), Some(("a.o", None)));
        assert_eq!(parse_path("/a.o/tok"), Some(("a.o", Some("tok"))));
        assert_eq!(parse_path("/a.o/"), Some(("a.o", Some(""))));
        assert_eq!(parse_path("/a.o/tok/more"), None);
        assert_eq!(parse_path(""), None);
    }
}
