//! The providers' answer webhooks: `POST` (or `GET`) `/telephony/{provider}/{agent}.{org}`, and
//! for Exotel, which signs nothing, `/telephony/exotel/{agent}.{org}/{secret}`. A call to one is
//! checked the way its provider signs it, then mints a session exactly as `/start` does (same
//! cap, rate, record and metrics) with a body built from the call, and answers the provider's
//! markup, whose stream URL carries the token as its last path segment (Twilio drops query
//! strings). An unsigned, wrongly signed or replayed webhook gets 403 and mints nothing.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, http::Method, web};
use secrecy::ExposeSecret;

use super::{
    read_body,
    start::{mint, rate_counts},
};
use crate::{
    agents::WebsocketAuth,
    config::AgentTelephony,
    error::ApiError,
    state::AppState,
    store::unix_ms,
    telephony::{Provider, signatures},
    token::redact,
};

/// Where the webhooks live.
pub const PREFIX: &str = "/telephony";
/// Largest webhook body: a provider's form is a few hundred bytes.
const MAX_WEBHOOK_BYTES: usize = 16 * 1024;
/// How long a call id (or nonce) stays claimed: a redelivery after this is long past any ring.
const REPLAY_WINDOW: Duration = Duration::from_secs(3600);

pub async fn answer(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.check_connections()?;
    let rest = req.match_info().unprocessed().trim_start_matches('/');
    let segments: Vec<&str> = rest.split('/').collect();
    let (provider, service, secret) = match segments.as_slice() {
        [provider, service] => (*provider, *service, None),
        [provider, service, secret] => (*provider, *service, Some(*secret)),
        _ => return Err(ApiError::RouteNotFound),
    };
    let provider = Provider::parse(provider).ok_or(ApiError::RouteNotFound)?;
    if !matches!(*req.method(), Method::POST | Method::GET) {
        return Err(ApiError::MethodNotAllowed);
    }
    let agent = state.registry.load().agents.by_service_host(service).cloned();
    let agent = agent.ok_or(ApiError::AgentNotFound)?;
    let credentials = state.telephony.get(&agent.service_host).ok_or(ApiError::AgentNotFound)?;
    let body = read_body(payload, MAX_WEBHOOK_BYTES, state.start_body_timeout).await?;
    let form: Vec<(String, String)> = if *req.method() == Method::POST {
        form_urlencoded(&body)
    } else {
        form_urlencoded(req.query_string().as_bytes())
    };
    let replay_key = verify(&req, &state, provider, credentials, secret, &body, &form)?;
    if agent.websocket_auth != WebsocketAuth::Token {
        return Err(ApiError::BadRequest(format!(
            "agent {} takes calls without tokens: point the provider at /ws/{}",
            agent.service_host,
            provider.as_str()
        )));
    }
    let call = provider.call(&form);
    let claim =
        format!("{}:{}", provider.as_str(), replay_key.or(call.id.clone()).unwrap_or_default());
    if !state.store.claim_once(&claim, REPLAY_WINDOW).await? {
        tracing::info!(provider = provider.as_str(), agent = %agent.service_host, "webhook replayed");
        return Err(ApiError::WebhookRefused("replayed"));
    }
    let bucket = format!("telephony:{}:{}", provider.as_str(), agent.service_host);
    let rates = rate_counts(&state, bucket, None);
    let body = call.body(provider, &credentials.parameters);
    let session_id = uuid::Uuid::new_v4();
    // A token agent's mint always yields a token.
    let token = mint(&state, &agent, session_id, &rates, Some(&body))
        .await?
        .ok_or(ApiError::AgentNotFound)?;
    tracing::Span::current().record("session_id", tracing::field::display(session_id));
    tracing::info!(provider = provider.as_str(), agent = %agent.service_host, token = %redact(&token), "call answered");
    let stream_url = format!(
        "{}/ws/generic/{}/{token}",
        state.ws_base_url(agent.region_for(&state.region)),
        agent.service_host
    );
    let (content_type, markup) = provider.answer(&stream_url, &agent.service_host, &call);
    Ok(HttpResponse::Ok().content_type(content_type).body(markup))
}

/// Checks the request the way `provider` signs it. Returns what, beside the call id, makes the
/// request one of a kind (Plivo's nonce).
fn verify(
    req: &HttpRequest,
    state: &AppState,
    provider: Provider,
    credentials: &AgentTelephony,
    secret: Option<&str>,
    body: &[u8],
    form: &[(String, String)],
) -> Result<Option<String>, ApiError> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let unsigned = ApiError::WebhookRefused("unsigned");
    let bad = ApiError::WebhookRefused("bad_signature");
    let not_configured = ApiError::WebhookRefused("not_configured");
    let url = signed_url(req, state);
    let post = *req.method() == Method::POST;
    match provider {
        Provider::Twilio => {
            let token = credentials.twilio_auth_token.as_ref().ok_or(not_configured)?;
            let signature = header("x-twilio-signature").ok_or(unsigned)?;
            let params = if post { form } else { &[] };
            signatures::twilio(token.expose_secret().as_bytes(), &url, params, signature)
                .then_some(None)
                .ok_or(bad)
        }
        Provider::Telnyx => {
            let key = credentials.telnyx_public_key.as_deref().and_then(signatures::telnyx_key);
            let key = key.ok_or(not_configured)?;
            let signature = header("telnyx-signature-ed25519").ok_or(unsigned)?;
            let timestamp =
                header("telnyx-timestamp").ok_or(ApiError::WebhookRefused("unsigned"))?;
            match signatures::telnyx(&key, timestamp, body, signature, unix_ms() / 1000) {
                Ok(()) => Ok(None),
                Err(signatures::TelnyxRefusal::Stale) => Err(ApiError::WebhookRefused("stale")),
                Err(signatures::TelnyxRefusal::BadSignature) => Err(bad),
            }
        }
        Provider::Plivo => {
            let token = credentials.plivo_auth_token.as_ref().ok_or(not_configured)?;
            let signature = header("x-plivo-signature-v3").ok_or(unsigned)?;
            let nonce =
                header("x-plivo-signature-v3-nonce").ok_or(ApiError::WebhookRefused("unsigned"))?;
            let params = if post { form } else { &[] };
            signatures::plivo(
                token.expose_secret().as_bytes(),
                !post,
                &url,
                params,
                nonce,
                signature,
            )
            .then(|| Some(format!("nonce:{nonce}")))
            .ok_or(bad)
        }
        Provider::Exotel => {
            let expected = credentials.exotel_url_secret.as_ref().ok_or(not_configured)?;
            let given = secret.ok_or(unsigned)?;
            use subtle::ConstantTimeEq;
            bool::from(given.as_bytes().ct_eq(expected.expose_secret().as_bytes()))
                .then_some(None)
                .ok_or(bad)
        }
    }
}

/// The URL as the provider called it: the configured public base URL (providers sign what they
/// requested, which a TLS-terminating load balancer hides) or `https://` and the `Host` header,
/// then the path and the query exactly as received.
fn signed_url(req: &HttpRequest, state: &AppState) -> String {
    let base = match &state.telephony_public_url {
        Some(base) => base.trim_end_matches('/').to_owned(),
        None => format!("https://{}", req.connection_info().host()),
    };
    let uri = req.uri();
    let path_and_query = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    format!("{base}{path_and_query}")
}

fn form_urlencoded(bytes: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(bytes).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}
