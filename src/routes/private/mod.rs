//! The private API under `/v1/organizations`: what the `pipecat cloud` CLI calls when
//! `PIPECAT_API_HOST` points at the broker. Every route is authenticated with an org-scoped
//! private token (`pcc_pat_…`, from `session-broker tokens create`): 401 when it is missing,
//! unknown or revoked, 403 for another org's routes. The answers are shaped as the CLI reads
//! them (`docs/pcc-cli-api.md` holds what its source needs, field by field).
//!
//! Each request first brings this replica's registry up to date (one read of its version), so
//! that what one request changed, on any replica, the next one sees: the CLI deploys, then
//! polls at once.

mod keys;
mod services;
mod sessions;

use actix_web::{HttpRequest, HttpResponse, http::Method, web};
use serde_json::json;

use crate::{api_keys, error::ApiError, private_tokens::TokenRejection, state::AppState};

/// The readers of the request bodies, apart from the handlers: for the fuzz targets (`fuzz/`),
/// not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::{
        keys::read_create,
        services::{deploy_file, read_deploy},
    };
}

/// Where the private API lives.
pub const PREFIX: &str = "/v1/organizations";

/// Timestamps as the CLI shows them: RFC 3339 in UTC, with milliseconds.
pub fn timestamp(unix_ms: u64) -> String {
    let nanos = i128::from(unix_ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|at| at.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

/// Largest request body of the private API (a deploy payload is a few hundred bytes).
const MAX_BODY_BYTES: usize = 64 * 1024;

pub async fn dispatch(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.check_connections()?;
    let rest = req.match_info().unprocessed().trim_start_matches('/');
    let segments: Vec<&str> = if rest.is_empty() { Vec::new() } else { rest.split('/').collect() };
    let org = authenticate(&req, &state, segments.first().copied()).await?;
    // Read only once the caller is known.
    let payload = super::read_body(payload, MAX_BODY_BYTES, state.start_body_timeout).await?;
    let method = req.method().clone();
    match (&method, segments.as_slice()) {
        (&Method::GET, []) => {
            Ok(HttpResponse::Ok()
                .json(json!({"organizations": [{"name": org, "verboseName": org}]})))
        }
        (_, []) => Err(ApiError::MethodNotAllowed),
        (_, [_, rest @ ..]) => route(&req, &method, &org, rest, &payload, &state).await,
    }
}

async fn route(
    req: &HttpRequest,
    method: &Method,
    org: &str,
    rest: &[&str],
    payload: &[u8],
    state: &AppState,
) -> Result<HttpResponse, ApiError> {
    use Method as M;
    match (method, rest) {
        (&M::GET, ["regions"]) => Ok(services::regions(state)),
        (&M::GET, ["properties"]) => Ok(services::properties(state)),
        (&M::GET, ["services"]) => services::list(state, org),
        (&M::POST, ["services"]) => {
            services::deploy(state, org, payload, services::Deploy::Create).await
        }
        (&M::PUT, ["services"]) => {
            services::deploy(state, org, payload, services::Deploy::Update).await
        }
        (&M::GET, ["services", agent]) => services::status(state, org, agent).await,
        (&M::DELETE, ["services", agent]) => services::delete(state, org, agent).await,
        (&M::GET, ["services", agent, "sessions"]) => sessions::list(req, state, org, agent).await,
        (&M::GET, ["services", agent, "sessions", id]) => {
            sessions::get(state, org, agent, id).await
        }
        (&M::DELETE, ["services", agent, "sessions", id]) => {
            sessions::stop(state, org, agent, id).await
        }
        (&M::GET, ["services", agent, "logs"]) => sessions::logs(req, state, org, agent).await,
        (&M::GET, ["apiKeys"]) => keys::list(state, org).await,
        (&M::POST, ["apiKeys"]) => keys::create(state, org, payload).await,
        (&M::DELETE, ["apiKeys", id]) => keys::revoke(state, org, id).await,
        // Secrets belong to the bots, which the operator runs: the broker neither holds nor
        // checks them. The existence check `deploy` makes for a file's `secret_set` passes, so
        // the same deploy file works here; managing them is refused clearly.
        (&M::GET, ["secrets"]) => Ok(HttpResponse::Ok().json(json!({"sets": []}))),
        (&M::GET, ["secrets", set]) => Ok(HttpResponse::Ok().json(json!({
            "name": set, "managed": false,
            "note": "secrets are not managed by this broker; the bot's own environment holds them"
        }))),
        (_, ["secrets", ..]) => Err(ApiError::NotServed("Secrets are not managed by this broker")),
        (_, ["builds", ..]) => Err(ApiError::NotServed(
            "Image builds are not served by this broker; build the image yourself and deploy it with `image`",
        )),
        (_, ["daily", ..]) => Err(ApiError::NotServed("Daily rooms are not served by this broker")),
        (_, ["services", _, "deployments", ..]) => Err(ApiError::NotServed(
            "Deployment history is not kept by this broker; agent status shows the current one",
        )),
        _ => Err(ApiError::RouteNotFound),
    }
}

/// The org the private token acts for, checked against the org of the path (when there is
/// one). A public key is not a private token, and gets 401 like any unknown credential.
async fn authenticate(
    req: &HttpRequest,
    state: &AppState,
    path_org: Option<&str>,
) -> Result<String, ApiError> {
    let token = api_keys::bearer(req.headers().get(actix_web::http::header::AUTHORIZATION))
        .ok_or(ApiError::PrivateUnauthorized(TokenRejection::Missing))?;
    // A token created or revoked a moment ago, on any replica, counts now.
    if let Err(e) = state.registry.refresh(&*state.store).await {
        tracing::debug!(error = %e, "registry not refreshed; using the current view");
    }
    let registry = state.registry.load();
    let org = registry.tokens.org_of(token).map_err(ApiError::PrivateUnauthorized)?;
    match path_org {
        Some(wanted) if wanted != org => {
            Err(ApiError::PrivateUnauthorized(TokenRejection::OtherOrg))
        }
        _ => Ok(org.to_owned()),
    }
}
