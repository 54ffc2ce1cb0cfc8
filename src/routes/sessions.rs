//! `GET` and `DELETE /v1/public/{agent}/sessions/{sessionId}`: read a session's record, or end
//! the session wherever it runs. Authenticated with the org's public key, like `/start`.

use actix_web::{HttpRequest, HttpResponse};
use uuid::Uuid;

use super::{agent_of, authenticate};
use crate::{
    agents::Agent,
    error::ApiError,
    sessions::{EndReason, SessionView, Status},
    state::AppState,
    store::{SessionRecord, unix_ms},
};

pub async fn get(
    req: &HttpRequest,
    agent_name: &str,
    session_id: &str,
    state: &AppState,
) -> Result<HttpResponse, ApiError> {
    let (agent, sid) = target(req, state, agent_name, session_id)?;
    Ok(HttpResponse::Ok().json(view(state, &agent, sid).await?))
}

pub async fn delete(
    req: &HttpRequest,
    agent_name: &str,
    session_id: &str,
    state: &AppState,
) -> Result<HttpResponse, ApiError> {
    let (agent, sid) = target(req, state, agent_name, session_id)?;
    Ok(HttpResponse::Ok().json(terminate(state, &agent, sid).await?))
}

/// Ends the session. A pending session's token is spent so it can no longer connect; a live
/// session's lease is removed and its holder told through the store's pub/sub, and it closes both
/// sockets with code 4000. Answers the record.
///
/// Every step is idempotent, and a session already ended as `terminated` repeats them, so a
/// retry after a failure part-way (503) completes the termination. A session that ended for
/// another reason is left as it is.
pub async fn terminate(
    state: &AppState,
    agent: &Agent,
    sid: Uuid,
) -> Result<SessionView, ApiError> {
    let record = view(state, agent, sid).await?;
    if record.status == Status::Ended {
        return Ok(record);
    }
    let ended = SessionRecord::ended(
        EndReason::Terminated,
        "terminated through the API",
        record.connected_at_ms,
        unix_ms(),
    );
    let retention = Some(state.leases.retention);
    let from = [Some(Status::Pending), Some(Status::Active)];
    state.store.update_session(&agent.service_host, sid, &from, &ended, retention).await?;
    if let Some(expires) = record.token_expires_at_ms {
        // Spend the token: a connect racing this DELETE either opened its session first (which
        // the announcement below then ends) or finds the record ended, and is refused.
        let remaining = expires.saturating_sub(unix_ms());
        if remaining > 0 {
            let ttl = std::time::Duration::from_millis(remaining) + state.clock_skew;
            state.store.consume_token(&agent.service_host, sid, "terminated", ttl).await?;
        }
    }
    state.store.release_slot(&agent.service_host, sid).await?;
    state.store.publish_termination(sid).await?;
    tracing::info!(session_id = %sid, agent = %agent.service_host, "session terminated");
    state.log_event(&agent.service_host, sid, "terminated through the API".into());
    view(state, agent, sid).await
}

fn target(
    req: &HttpRequest,
    state: &AppState,
    agent_name: &str,
    session_id: &str,
) -> Result<(std::sync::Arc<Agent>, Uuid), ApiError> {
    let registry = state.registry.load();
    let (org, _) = authenticate(req, &registry)?;
    let agent = agent_of(&registry, org, agent_name)?;
    // Not a UUID: no such session, rather than a request error a client must handle apart.
    let sid = Uuid::parse_str(session_id).map_err(|_| ApiError::SessionNotFound)?;
    Ok((agent, sid))
}

/// The record of `sid`, if it belongs to `agent`: another agent's session is not found.
pub async fn view(state: &AppState, agent: &Agent, sid: Uuid) -> Result<SessionView, ApiError> {
    let record = state
        .store
        .get_session(&agent.service_host, sid)
        .await?
        .ok_or(ApiError::SessionNotFound)?;
    SessionView::new(sid, record, unix_ms())
        .filter(|record| record.service == agent.service_host)
        .ok_or(ApiError::SessionNotFound)
}
