//! HTTP routes, one file per endpoint family. Every answer, errors included, is JSON.

pub mod cors;
pub mod health;
pub mod middleware;
pub mod peer;
pub mod private;
pub mod sessions;
pub mod start;
pub mod telephony;
pub mod ws;

use std::sync::Arc;

use actix_web::{
    HttpRequest, HttpResponse, ResponseError,
    http::{Method, header},
    web,
};

use crate::{
    agents::{Agent, Lookup},
    api_keys::{self, ApiKeyRejection},
    error::ApiError,
    registry::Registry,
    state::AppState,
};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::QueryConfig::default().error_handler(|e, _| {
            ApiError::BadRequest(format!("Invalid query string: {e}")).into()
        }),
    )
    .app_data(
        web::PathConfig::default()
            .error_handler(|e, _| ApiError::BadRequest(format!("Invalid path: {e}")).into()),
    )
    // Static prefixes, parsed by hand below them: actix matches dynamic segments with a regex,
    // a measurable share of the broker's CPU per request (BENCHMARKS.md).
    .service(web::scope(PUBLIC_PREFIX).default_service(web::to(public_api)))
    .service(web::scope(private::PREFIX).default_service(web::to(private::dispatch)))
    .service(web::scope(telephony::PREFIX).default_service(web::to(telephony::answer)))
    .service(web::scope(ws::PREFIX).default_service(web::to(ws::connect)))
    .route("/ws/twilio", web::to(ws::providers::connect))
    .route("/ws/telnyx", web::to(ws::providers::connect))
    .route("/ws/plivo", web::to(ws::providers::connect))
    .route("/ws/exotel", web::to(ws::providers::connect))
    .default_service(web::to(not_found));
}

/// Where the public session API lives.
const PUBLIC_PREFIX: &str = "/v1/public";

/// `/v1/public/{agent}/start` and `/v1/public/{agent}/sessions/{sessionId}`; the Session API's
/// `…/sessions/{sessionId}/{path}` is answered as not served.
async fn public_api(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let rest = req.match_info().unprocessed().strip_prefix('/').unwrap_or_default();
    let segments: Vec<&str> = rest.split('/').collect();
    let agent = segments.first().copied().unwrap_or_default();
    if req.method() == Method::OPTIONS
        && matches!(segments.as_slice(), [_, "start"] | [_, "sessions", _])
    {
        return Ok(cors::preflight(&req, &state, agent));
    }
    let answer = async {
        state.check_connections()?;
        match (req.method(), segments.as_slice()) {
            (&Method::POST, [agent, "start"]) => start::start(&req, agent, payload, &state).await,
            (&Method::GET, [agent, "sessions", id]) => sessions::get(&req, agent, id, &state).await,
            (&Method::DELETE, [agent, "sessions", id]) => {
                sessions::delete(&req, agent, id, &state).await
            }
            (_, [_, "start"] | [_, "sessions", _]) => Err(ApiError::MethodNotAllowed),
            // Pipecat Cloud's Session API: HTTP requests proxied to the bot of a running
            // session (and SmallWebRTC's offers through it).
            (_, [_, "sessions", _, _, ..]) => Err(ApiError::NotServed(
                "Requests to a running session's bot (the Session API, WebRTC offers) are not \
                 served by this broker; reach the bot over its WebSocket",
            )),
            _ => Err(ApiError::RouteNotFound),
        }
    };
    let mut response = answer.await.unwrap_or_else(|e| e.error_response());
    cors::expose(&req, &state, agent, &mut response);
    Ok(response)
}

/// The org whose public key authorizes this request (`Authorization: Bearer pk_…`), and the key.
fn authenticate<'a>(
    req: &'a HttpRequest,
    registry: &'a Registry,
) -> Result<(&'a str, &'a str), ApiError> {
    let key = api_keys::bearer(req.headers().get(header::AUTHORIZATION))
        .ok_or(ApiError::Unauthorized(ApiKeyRejection::Missing))?;
    let org = registry.keys.org_of(key).map_err(ApiError::Unauthorized)?;
    Ok((org, key))
}

/// The org's agent of that name. Another org's agent is refused as the key's fault (401), not
/// reported missing.
fn agent_of(registry: &Registry, org: &str, name: &str) -> Result<Arc<Agent>, ApiError> {
    match registry.agents.lookup(org, name) {
        Lookup::Found(agent) => Ok(agent.clone()),
        Lookup::OtherOrg => Err(ApiError::Unauthorized(ApiKeyRejection::OtherOrg)),
        Lookup::Unknown => Err(ApiError::AgentNotFound),
    }
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::RouteNotFound)
}

/// Reads a request body of at most `max` bytes, refusing it as soon as it passes the limit, and
/// within `within`: a client that trickles its body gets 408, not a worker's attention forever.
pub async fn read_body(
    mut payload: web::Payload,
    max: usize,
    within: std::time::Duration,
) -> Result<web::Bytes, ApiError> {
    use futures_util::StreamExt;
    let read = async {
        let mut bytes = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::BadRequest(format!("Could not read the request body: {e}"))
            })?;
            if bytes.len() + chunk.len() > max {
                return Err(ApiError::PayloadTooLarge(format!("Request body exceeds {max} bytes")));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes.freeze())
    };
    tokio::time::timeout(within, read).await.map_err(|_| ApiError::RequestTimeout)?
}
