//! CORS for browsers that call the public session API directly. An org lists the origins it
//! allows (`orgs.<org>.allowed_origins`, none by default). A preflight carries no key, so the
//! origins allowed on `/v1/public/{agent}/…` are those of the orgs that have an agent of that
//! name; the key then decides what the request may do, as for any client. Only the public
//! session API answers CORS: the WebSocket needs none, and nothing else is for browsers.

use actix_web::{
    HttpRequest, HttpResponse,
    http::header::{self, HeaderValue},
};

use crate::state::AppState;

/// How long a browser may cache a preflight answer, in seconds.
const PREFLIGHT_MAX_AGE_SECS: u32 = 600;

/// The request's `Origin`, when the orgs serving `agent` allow it.
pub fn allowed_origin<'a>(
    req: &'a HttpRequest,
    state: &AppState,
    agent: &str,
) -> Option<&'a HeaderValue> {
    let origin = req.headers().get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    let registry = state.registry.load();
    registry
        .agents
        .orgs_with(agent)
        .any(|org| {
            state.allowed_origins.get(org).is_some_and(|allowed| allowed.iter().any(|o| o == text))
        })
        .then_some(origin)
}

/// The answer to a preflight (`OPTIONS` with `Access-Control-Request-Method`).
pub fn preflight(req: &HttpRequest, state: &AppState, agent: &str) -> HttpResponse {
    let mut response = HttpResponse::NoContent();
    response.insert_header((header::VARY, "Origin"));
    if let Some(origin) = allowed_origin(req, state, agent) {
        response
            .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone()))
            .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, "POST, GET, DELETE"))
            .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, "authorization, content-type"))
            .insert_header((header::ACCESS_CONTROL_MAX_AGE, PREFLIGHT_MAX_AGE_SECS));
    }
    response.finish()
}

/// Adds the CORS headers an allowed origin needs to read `response`, errors included.
pub fn expose(req: &HttpRequest, state: &AppState, agent: &str, response: &mut HttpResponse) {
    let headers = response.headers_mut();
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = allowed_origin(req, state, agent) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("retry-after, x-request-id"),
        );
    }
}
