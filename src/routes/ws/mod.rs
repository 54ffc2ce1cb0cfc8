//! `GET /ws/generic/{agent}.{org}[/{token}]`: the WebSocket gate.
//!
//! Everything that can refuse a connect happens before the upgrade, with a plain HTTP answer:
//! the handshake is checked first (so a token is never spent on a request that cannot upgrade),
//! then the token is verified and, in one store request, fenced, consumed exactly once, a slot
//! taken and the session's record made active ([`reservation`]), then the bot is dialled. Only
//! when the bot has answered is the client upgraded and the relay started: one store round trip
//! is all a connect waits for, and the store hears of the session again only at its end (one
//! more). If the bot cannot be reached, the reservation is let go in one request: the record goes
//! back to pending and the token works again for the rest of its lifetime.

pub mod providers;
pub mod request;
mod reservation;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use actix_web::{HttpRequest, HttpResponse, http::Method, web};
use tracing::Instrument;

use self::{
    request::{WsQuery, decode_body, encode_body, find_token, parse_path},
    reservation::{Activated, ActiveSession, Reservation},
};
use crate::{
    agents::WebsocketAuth,
    bridge,
    error::{ApiError, TokenRefusal},
    routes::peer::Peer,
    sessions::{EndReason, Registration},
    state::AppState,
    store::{EndRequest, SessionEvent, SessionRecord, StoreError, unix_ms},
    upgrade::{self, ClientSocket},
};

/// Where WebSocket connects arrive: `{PREFIX}/{agent}.{org}[/{token}]`.
pub const PREFIX: &str = "/ws/generic";
/// Pause before a failed store write is tried again (a session's end, a connect's undo),
/// doubled after each failure up to [`RETRY_MAX_PAUSE`].
const RETRY_PAUSE: Duration = Duration::from_millis(250);
const RETRY_MAX_PAUSE: Duration = Duration::from_secs(2);

pub async fn connect(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (path_service, path_token) = check_request(&req, &state)?;
    let query = WsQuery::read(req.query_string(), state.max_query_bytes)?;
    let service = match path_service {
        "" => query.service_host.as_deref().ok_or(ApiError::RouteNotFound)?,
        named => named,
    };
    // Builds the 101 answer without sending it; it is only returned once the bot is connected.
    let handshake = upgrade::handshake(&req).ok_or_else(not_an_upgrade)?;
    let agent = state.registry.load().agents.by_service_host(service).cloned();
    let agent = agent.ok_or(ApiError::AgentNotFound)?;
    let body = query.body.as_deref().map(decode_body).transpose()?;
    let token = match agent.websocket_auth {
        WebsocketAuth::None => None,
        WebsocketAuth::Token => Some(
            find_token(&req, query.token.as_deref(), path_token)
                .ok_or(ApiError::TokenRefused(TokenRefusal::Missing))?,
        ),
    };

    let reservation = Reservation::take(&state, agent, token, body).await?;
    let forwarded_for = Peer::of(&req, &state.trusted_proxies).forwarded_for;
    let bot = match dial_bot(forwarded_for, &state, &reservation).await {
        Ok(bot) => bot,
        Err(e) => {
            let (sid, agent) = (reservation.session_id, &reservation.agent.service_host);
            tracing::warn!(session_id = %sid, %agent, error = %e, "bot unreachable");
            reservation.abandon(&state, Some(EndReason::BotUnreachable)).await;
            return Err(ApiError::BotUnreachable);
        }
    };
    let activated = reservation.activate(&state);
    let session = LiveSession::new(state.into_inner(), activated);
    Ok(upgrade::switch(handshake, move |client, early| session.run(client, early, bot)))
}

fn not_an_upgrade() -> ApiError {
    ApiError::BadRequest("Expected a WebSocket upgrade request".into())
}

/// The checks that need neither the handshake nor the store: method, drain and path. Returns
/// the service host and the token's path segment, if any.
fn check_request<'a>(
    req: &'a HttpRequest,
    state: &AppState,
) -> Result<(&'a str, Option<&'a str>), ApiError> {
    if req.method() != Method::GET {
        return Err(ApiError::MethodNotAllowed);
    }
    if state.is_draining() {
        return Err(ApiError::Draining);
    }
    state.check_connections()?;
    parse_path(req.match_info().unprocessed()).ok_or(ApiError::RouteNotFound)
}

/// A bridged session, from the upgrade to its end.
struct LiveSession {
    state: Arc<AppState>,
    activated: Activated,
}

impl LiveSession {
    fn new(state: Arc<AppState>, activated: Activated) -> Self {
        let agent = &activated.session.agent.service_host;
        tracing::info!(%agent, "session connected");
        state.metrics.connects_accepted.with_label_values(&[agent]).inc();
        Self { state, activated }
    }

    /// Relays until the session ends, then records how it ended and lets go of its slot.
    async fn run(self, client: ClientSocket, early: Vec<u8>, bot: bridge::Bot) {
        let Self { state, activated } = self;
        let Activated { session, registration, stop } = activated;
        let (sid, agent) = (session.session_id, session.agent.clone());
        let span = tracing::info_span!("session", session_id = %sid, agent = %agent.service_host);
        async move {
            let metrics = &state.metrics;
            let active = metrics.active_sessions.with_label_values(&[&agent.service_host]);
            active.inc();
            let max_duration = agent.max_session_duration.min(state.max_session);
            let counters = bridge::RelayCounters::new(metrics);
            let bridge::Bot { stream, prefix } = bot;
            let limits = state.bridge;
            let (outcome, teardown) =
                bridge::relay(client, early, stream, prefix, limits, max_duration, stop, counters)
                    .await;
            // The sockets close while the end is recorded. What runs only at the end of a
            // session is boxed, so that an idle session's task does not hold it (it would be
            // most of a session's memory).
            let ending = end(&state, outcome, session, registration, active);
            Box::pin(futures_util::future::join(teardown.finish(), ending)).await;
        }
        .instrument(span)
        .await
    }
}

/// Records how a session ended, lets go of its slot and logs the end, in one store request.
async fn end(
    state: &AppState,
    outcome: bridge::Outcome,
    session: ActiveSession,
    registration: Registration,
    active: prometheus::IntGauge,
) {
    let (sid, agent, connected_ms) = (session.session_id, &session.agent, session.connected_ms);
    active.dec();
    let reason = outcome.reason.as_str();
    state.metrics.sessions_ended.with_label_values(&[reason]).inc();
    let now = unix_ms();
    let ended = SessionRecord::ended(outcome.reason, outcome.detail, Some(connected_ms), now);
    let text = format!("session {sid} ended: {reason} ({})", outcome.detail);
    let event = SessionEvent { at_ms: now, session_id: sid, text };
    // Off this replica's list before the slot goes, so that no renewal puts its lease back.
    drop(registration);
    let request = EndRequest {
        agent: &agent.service_host,
        sid,
        ended: &ended,
        retention: state.leases.retention,
        event: &event,
        events: state.event_log(),
    };
    record_end(state, &request).await;
    tracing::info!(
        reason,
        detail = outcome.detail,
        duration_ms = now.saturating_sub(connected_ms),
        "session ended"
    );
}

/// Records a session's end, trying again while its lease surely holds. A burst of ends (a
/// replica's callers dropping at once, a store that stalls for a moment) can keep the store
/// busy past one command timeout, and an end never recorded is taken for a lost replica once
/// the lease lapses: the session is listed as `replica_lost` and counted as lost. The end is
/// safe to repeat: 013 knows a repeat of an end it wrote (its answer was lost), frees the slot
/// again and logs nothing more.
async fn record_end(state: &AppState, request: &EndRequest<'_>) {
    // Leases are renewed every third of their time, so half of it is always left.
    if let Err(e) = retried(state.leases.lease / 2, || state.store.end_session(request)).await {
        tracing::warn!(error = %e, "could not record the end of the session; its slot lapses with its lease");
    }
}

/// Runs `attempt` until it succeeds or `within` has passed, pausing between tries; the last
/// failure otherwise. For store writes that are safe to repeat.
async fn retried<T, F: Future<Output = Result<T, StoreError>>>(
    within: Duration,
    mut attempt: impl FnMut() -> F,
) -> Result<T, StoreError> {
    let deadline = Instant::now() + within;
    let mut pause = RETRY_PAUSE;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() + pause < deadline => {
                tracing::debug!(error = %e, "store write failed; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RETRY_MAX_PAUSE);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Opens the bot's WebSocket for a reserved session, timing the dial.
async fn dial_bot(
    forwarded_for: String,
    state: &AppState,
    reservation: &Reservation,
) -> Result<bridge::Bot, bridge::DialError> {
    let agent = &reservation.agent;
    let mut url = agent.bot_for(&state.region).clone();
    if let Some(body) = &reservation.body {
        url.query_pairs_mut().append_pair("body", &encode_body(body));
    }
    let headers = [
        // What Pipecat Cloud's base image reads the session id from.
        ("x-daily-session-id", reservation.session_id.to_string()),
        ("x-pipecat-session-id", reservation.session_id.to_string()),
        ("x-pipecat-service-host", agent.service_host.clone()),
        ("x-pipecat-region", reservation.minted_in.clone()),
        ("x-forwarded-for", forwarded_for),
    ];
    let dialling = Instant::now();
    let (tls, addresses) = (&state.bot_tls, &state.bot_addresses);
    let dialled = bridge::dial(&url, &headers, tls, addresses, state.bot_connect_timeout).await;
    let outcome = if dialled.is_ok() { "connected" } else { "failed" };
    let histogram = state.metrics.bot_dial_seconds.with_label_values(&[outcome]);
    histogram.observe(dialling.elapsed().as_secs_f64());
    dialled
}
