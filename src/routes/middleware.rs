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
        path = %loggable_path(req.path()),
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

/// The path as logs may show it: a WebSocket path's token segment is shortened. Query strings,
/// which may hold a token too, are never logged.
pub fn loggable_path(path: &str) -> Cow<'_, str> {
    match path
        .strip_prefix(super::ws::PREFIX)
        .and_then(|rest| rest[1.min(rest.len())..].split_once('/'))
    {
        Some((service, token)) if !token.is_empty() => {
            Cow::Owned(format!("{}/{service}/{}", super::ws::PREFIX, redact(token)))
        }
        _ => Cow::Borrowed(path),
    }
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
        assert_eq!(loggable_path("/ws/generic/echo.demo"), "/ws/generic/echo.demo");
        assert_eq!(loggable_path("/v1/public/echo/start"), "/v1/public/echo/start");
    }
}
