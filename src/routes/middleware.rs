//! What wraps every request: a `request` span with a fresh request id (also returned as
//! `x-request-id`) and the path with any token cut short, and the count of refusals by reason.
//! Tokens are never logged whole.

use std::borrow::Cow;

use actix_web::{
    dev::{Service, ServiceRequest, ServiceResponse},
    http::header::{HeaderName, HeaderValue},
    web,
};
use tracing::Instrument;
use uuid::Uuid;

use crate::{error::Refusal, state::AppState, token::redact};

/// Wraps every request in a `request` span with a fresh request id (also returned as
/// `x-request-id`), the method and the path with any token cut short. Handlers record the
/// session id into it once they know it.
pub fn request_span<S, B>(
    req: ServiceRequest,
    service: &S,
) -> impl Future<Output = Result<ServiceResponse<B>, actix_web::Error>> + use<S, B>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
{
    let request_id = Uuid::new_v4();
    let span = tracing::info_span!(
        "request",
        %request_id,
        method = %req.method(),
        path = %loggable_path(req.match_info().as_str()),
        session_id = tracing::field::Empty,
    );
    let response = span.in_scope(|| service.call(req));
    async move {
        let mut response = response.await?;
        let refusal = response.response().extensions().get::<Refusal>().copied();
        if let (Some(Refusal(reason)), Some(state)) =
            (refusal, response.request().app_data::<web::Data<AppState>>())
        {
            state.metrics.refusals.with_label_values(&[reason]).inc();
        }
        // A UUID is always a valid header value.
        let value = HeaderValue::from_str(&request_id.to_string()).expect("uuid header");
        response.headers_mut().insert(HeaderName::from_static("x-request-id"), value);
        Ok(response)
    }
    .instrument(span)
}

/// Path segments longer than this are cut short in logs. Session tokens are about 200
/// characters; the longest segment worth reading in full is a session id (36).
const MAX_LOGGED_SEGMENT: usize = 40;

/// The path as logs may show it: the path as the router saw it (percent-decoded, so no spelling
/// of a path logs differently from how it is routed), with every segment long enough to be a
/// token cut short, wherever it appears. Query strings, which may hold a token too, are never
/// logged.
pub fn loggable_path(path: &str) -> Cow<'_, str> {
    if path.split('/').all(|segment| segment.len() <= MAX_LOGGED_SEGMENT) {
        return Cow::Borrowed(path);
    }
    let segments: Vec<Cow<'_, str>> = path
        .split('/')
        .map(|segment| match segment.len() > MAX_LOGGED_SEGMENT {
            true => Cow::Owned(redact(segment)),
            false => Cow::Borrowed(segment),
        })
        .collect();
    Cow::Owned(segments.join("/"))
}

#[cfg(test)]
mod tests {
    use super::loggable_path;

    #[test]
    fn tokens_in_paths_are_cut_short() {
        let token = "eyJzaCI6ImVjaG8uZGVtbyIsInNpZCI6IjE0NjQ1YzAx.rgGaYtpL2cCIWapppBKEItSrW9";
        let shown = loggable_path(&format!("/ws/generic/echo.demo/{token}")).into_owned();
        assert!(
            shown.starts_with("/ws/generic/echo.demo/eyJzaCI6") && !shown.contains(&token[8..])
        );
        let elsewhere = loggable_path(&format!("/ws/twilio/{token}/x")).into_owned();
        assert!(!elsewhere.contains(&token[8..]), "{elsewhere}");
        assert_eq!(loggable_path("/ws/generic/echo.demo"), "/ws/generic/echo.demo");
        assert_eq!(loggable_path("/v1/public/echo/start"), "/v1/public/echo/start");
        let session = "/v1/public/echo/sessions/639f91d8-d511-4677-a83b-bd7564d5d92f";
        assert_eq!(loggable_path(session), session, "session ids stay readable");
    }
}
