//! `GET /v1/organizations/{org}/services/{agent}`: the Pipecat CLI asks whether an agent is
//! ready before it calls `/start`. Agents here have no deployment phase, so a known agent is
//! always ready.

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::{error::ApiError, state::AppState};

pub async fn service(
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (org, agent) = path.into_inner();
    state.registry.load().agents.get(&org, &agent).ok_or(ApiError::AgentNotFound)?;
    Ok(HttpResponse::Ok().json(json!({"body": {"ready": true}})))
}
