//! `agent sessions`, `agent stop` and `agent logs`: an agent's sessions as the CLI lists them,
//! their termination on whatever replica holds them, and the broker's own events about them
//! (the bot's logs are the bot's).

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::timestamp;
use crate::{
    error::ApiError,
    routes::sessions::{terminate, view},
    sessions::{EndReason, SessionView, Status},
    state::AppState,
    store::SessionEvent,
};

/// Sessions listed at most, newest first.
const MAX_LISTED: usize = 500;
/// Log entries answered when the CLI asks for no number.
const DEFAULT_LOG_LIMIT: usize = 100;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    end_state: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogQuery {
    limit: Option<usize>,
    session_id: Option<Uuid>,
}

pub async fn list(
    req: &HttpRequest,
    state: &AppState,
    org: &str,
    name: &str,
) -> Result<HttpResponse, ApiError> {
    let query = web::Query::<ListQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest(format!("Invalid query string: {e}")))?;
    let agent = agent(state, org, name)?;
    let now = crate::store::unix_ms();
    let sessions: Vec<Value> = state
        .store
        .list_sessions(&agent.service_host, MAX_LISTED)
        .await?
        .into_iter()
        .filter_map(|(sid, record)| SessionView::new(sid, record, now))
        .filter(|view| query.end_state.as_deref().is_none_or(|wanted| end_state(view) == wanted))
        .map(|view| session_json(&view))
        .collect();
    Ok(HttpResponse::Ok().json(json!({"sessions": sessions})))
}

pub async fn get(
    state: &AppState,
    org: &str,
    name: &str,
    id: &str,
) -> Result<HttpResponse, ApiError> {
    let (agent, sid) = session_of(state, org, name, id)?;
    Ok(HttpResponse::Ok().json(session_json(&view(state, &agent, sid).await?)))
}

/// `agent stop`: ends the session wherever it runs (see `routes::sessions::terminate`).
pub async fn stop(
    state: &AppState,
    org: &str,
    name: &str,
    id: &str,
) -> Result<HttpResponse, ApiError> {
    let (agent, sid) = session_of(state, org, name, id)?;
    Ok(HttpResponse::Ok().json(session_json(&terminate(state, &agent, sid).await?)))
}

/// `agent logs`: the newest `limit` events, oldest first, as the CLI prints them in order.
pub async fn logs(
    req: &HttpRequest,
    state: &AppState,
    org: &str,
    name: &str,
) -> Result<HttpResponse, ApiError> {
    let query = web::Query::<LogQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest(format!("Invalid query string: {e}")))?;
    let agent = agent(state, org, name)?;
    let limit = query.limit.unwrap_or(DEFAULT_LOG_LIMIT);
    let host = &agent.service_host;
    let (events, sessions) = futures_util::future::join(
        state.store.events(host),
        state.store.list_sessions(host, MAX_LISTED),
    )
    .await;
    // A session's start is its record's creation: /start writes no event of its own, which
    // keeps it to one write to the store.
    let started = sessions?.into_iter().filter_map(|(sid, record)| {
        let minted_in = record.minted_region?;
        Some(SessionEvent {
            at_ms: record.created_ms?,
            session_id: sid,
            text: format!("session {sid} started (token minted in {minted_in})"),
        })
    });
    let mut all: Vec<SessionEvent> = events?.into_iter().chain(started).collect();
    all.retain(|event| query.session_id.is_none_or(|sid| sid == event.session_id));
    // The newest `limit`, shown oldest first, as the CLI prints them in order.
    all.sort_by_key(|event| std::cmp::Reverse(event.at_ms));
    all.truncate(limit);
    let logs: Vec<Value> = all
        .iter()
        .rev()
        .map(|e| json!({"timestamp": timestamp(e.at_ms), "log": e.text, "sessionId": e.session_id}))
        .collect();
    Ok(HttpResponse::Ok().json(json!({"logs": logs})))
}

fn agent(
    state: &AppState,
    org: &str,
    name: &str,
) -> Result<std::sync::Arc<crate::agents::Agent>, ApiError> {
    state.registry.load().agents.get(org, name).cloned().ok_or(ApiError::AgentNotFound)
}

/// The agent and the session id a route names; an id that is no UUID names no session.
fn session_of(
    state: &AppState,
    org: &str,
    name: &str,
    id: &str,
) -> Result<(std::sync::Arc<crate::agents::Agent>, Uuid), ApiError> {
    let agent = agent(state, org, name)?;
    Ok((agent, Uuid::parse_str(id).map_err(|_| ApiError::SessionNotFound)?))
}

/// The CLI's names for how a session stands: `active`, or how it ended.
fn end_state(view: &SessionView) -> &'static str {
    match (view.status, view.end_reason) {
        (Status::Pending, _) => "pending",
        (Status::Active, _) => "active",
        (Status::Ended, Some(EndReason::Terminated)) => "terminated",
        (Status::Ended, Some(EndReason::Expired)) => "ended_before_agent_start",
        (Status::Ended, Some(EndReason::BotUnreachable)) => "agent_start_timeout",
        (Status::Ended, Some(EndReason::BotClosed)) => "agent_error",
        (Status::Ended, Some(EndReason::ReplicaLost) | None) => "unknown",
        (
            Status::Ended,
            Some(EndReason::Completed | EndReason::ClientClosed | EndReason::Timeout),
        ) => "completed",
    }
}

/// A session as the CLI reads it (`sessionId`, `createdAt`, `endedAt`, `botStartSeconds`,
/// `coldStart` are required), with the broker's own fields beside.
fn session_json(view: &SessionView) -> Value {
    let created = view.created_at_ms.or(view.connected_at_ms).unwrap_or_default();
    let bot_start = match (view.created_at_ms, view.connected_at_ms) {
        (Some(created), Some(connected)) => Some(connected.saturating_sub(created) as f64 / 1000.0),
        _ => None,
    };
    json!({
        "sessionId": view.session_id,
        "createdAt": timestamp(created),
        "endedAt": view.ended_at_ms.map(timestamp),
        "botStartSeconds": bot_start,
        "coldStart": false,
        "endState": end_state(view),
        "service": view.service,
        "region": view.region,
        "replica": view.replica,
        "endReason": view.end_reason,
        "detail": view.detail,
        "durationMs": view.duration_ms,
    })
}
