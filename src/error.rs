//! The HTTP error table: every error the API answers, its status and its stable code, in one
//! place. Bodies are always JSON of one shape, a superset that every known client renders:
//! `{"error", "code", "reason", "status", "message", "detail"}` (the Pipecat Python SDK reads
//! `error` and `code`; other clients read `message` or `detail`). `code` is the status, as Pipecat
//! Cloud sends it; `reason` is stable and finer, for clients that branch on the cause (the two
//! 429s share a code and differ in `reason`).

use actix_web::{
    HttpResponse, ResponseError,
    http::{StatusCode, header},
};
use serde::Serialize;

use crate::{
    api_keys::ApiKeyRejection, private_tokens::TokenRejection, store::StoreError, token::TokenError,
};

/// Seconds a client is told to wait before retrying a 503.
pub const RETRY_AFTER_SECS: u32 = 1;
/// Seconds a rate-limited client is told to wait: windows are a minute by default, and a client
/// that retries sooner is likely refused again.
pub const RATE_LIMIT_RETRY_AFTER_SECS: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(ApiKeyRejection),
    #[error("Agent not found")]
    AgentNotFound,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("Rate limit exceeded for this API key")]
    RateLimited,
    #[error("Service maximum agent instances reached")]
    AtCapacity,
    #[error("Session not found")]
    SessionNotFound,
    #[error("{}", .0.message())]
    TokenRefused(TokenRefusal),
    #[error("State store unavailable, retry shortly")]
    StoreUnavailable(#[from] StoreError),
    #[error("Bot unreachable, retry shortly")]
    BotUnreachable,
    #[error("This replica is shutting down; connect again")]
    Draining,
    #[error("This replica is at its connection or session limit; retry shortly")]
    ReplicaBusy,
    #[error("The request was not received in time")]
    RequestTimeout,
    #[error("Query string too long")]
    QueryTooLong,
    #[error("Not found")]
    RouteNotFound,
    #[error("{0}")]
    PrivateUnauthorized(TokenRejection),
    #[error("API key not found")]
    KeyNotFound,
    #[error("{0}")]
    Conflict(String),
    /// A provider's webhook that is not signed as that provider signs, or was seen before.
    #[error("Webhook refused: {0}")]
    WebhookRefused(&'static str),
    /// What Pipecat Cloud does and this broker does not (image builds, Daily rooms, …).
    #[error("{0}")]
    NotServed(&'static str),
    #[error("Method not allowed")]
    MethodNotAllowed,
}

/// Why a WebSocket connect was refused with 403.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    Missing,
    Invalid(TokenError),
    Replayed,
    /// The token's session was ended through the session API.
    Terminated,
    /// A `?body=` other than the one minted with the token.
    BodyMismatch,
    /// Minted before the store lost data (a restart, a failover, a flush): its consume may have
    /// been lost with it, so it cannot be trusted to be unused.
    StoreReset,
}

impl TokenRefusal {
    /// Stable machine-readable reason, returned as `reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Missing => "token_missing",
            Self::Invalid(TokenError::Malformed) => "token_malformed",
            Self::Invalid(TokenError::BadSignature) => "token_bad_signature",
            Self::Invalid(TokenError::Expired) => "token_expired",
            Self::Invalid(TokenError::WrongScope) => "token_wrong_scope",
            Self::Invalid(TokenError::LifetimeTooLong) => "token_lifetime_too_long",
            Self::Replayed => "token_already_used",
            Self::Terminated => "session_terminated",
            Self::BodyMismatch => "body_mismatch",
            Self::StoreReset => "token_predates_store_reset",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::Missing => "This agent requires a session token; call /start first",
            Self::Invalid(TokenError::Malformed) => "Session token is malformed",
            Self::Invalid(TokenError::BadSignature) => "Session token signature is invalid",
            Self::Invalid(TokenError::Expired) => "Session token has expired",
            Self::Invalid(TokenError::WrongScope) => "Session token was issued for another agent",
            Self::Invalid(TokenError::LifetimeTooLong) => {
                "Session token claims a longer lifetime than this broker mints"
            }
            Self::Replayed => "Session token has already been used",
            Self::Terminated => "Session was terminated",
            Self::BodyMismatch => {
                "The body differs from the one minted with the token; connect without ?body= or \
                 with the body /start returned"
            }
            Self::StoreReset => {
                "Session token was minted before the session store lost its data (a restart or \
                 failover); call /start again for a new token"
            }
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    code: &'a str,
    status: u16,
    message: &'a str,
    detail: &'a str,
    reason: &'static str,
}

/// How one error is answered.
struct Row {
    status: StatusCode,
    /// The stable `code`. Pipecat Cloud uses the status number for most errors and a named code
    /// where clients branch on it.
    code: &'static str,
    /// The `refusals_total` label, and the body's `reason` unless `reason` is set.
    metric: &'static str,
    /// Sent as `reason` in the body where it is finer than, or named apart from, the metric.
    reason: Option<&'static str>,
    /// Sent as `Retry-After`, in seconds.
    retry_after: Option<u32>,
}

impl ApiError {
    /// The table: every variant's status, code, metric label, reason and `Retry-After`.
    fn row(&self) -> Row {
        use StatusCode as S;
        let row =
            |status, code, metric| Row { status, code, metric, reason: None, retry_after: None };
        let unavailable = |metric| Row {
            retry_after: Some(RETRY_AFTER_SECS),
            ..row(S::SERVICE_UNAVAILABLE, "503", metric)
        };
        match self {
            Self::Unauthorized(why) => Row {
                reason: Some(match why {
                    ApiKeyRejection::Missing => "api_key_missing",
                    ApiKeyRejection::Malformed => "api_key_malformed",
                    ApiKeyRejection::Unknown => "api_key_unknown",
                    ApiKeyRejection::OtherOrg => "api_key_other_org",
                }),
                ..row(S::UNAUTHORIZED, "401", "unauthorized")
            },
            Self::AgentNotFound => row(S::NOT_FOUND, "404", "agent_not_found"),
            Self::BadRequest(_) => row(S::BAD_REQUEST, "400", "bad_request"),
            Self::PayloadTooLarge(_) => row(S::PAYLOAD_TOO_LARGE, "413", "payload_too_large"),
            // Both 429s carry code "429", which the SDK's documented example tests for;
            // `reason` tells them apart.
            Self::RateLimited => Row {
                reason: Some("rate_limited"),
                retry_after: Some(RATE_LIMIT_RETRY_AFTER_SECS),
                ..row(S::TOO_MANY_REQUESTS, "429", "rate_limited")
            },
            Self::AtCapacity => Row {
                reason: Some("agent_at_capacity"),
                ..row(S::TOO_MANY_REQUESTS, "429", "at_capacity")
            },
            Self::SessionNotFound => row(S::NOT_FOUND, "404", "session_not_found"),
            Self::TokenRefused(refusal) => {
                Row { reason: Some(refusal.reason()), ..row(S::FORBIDDEN, "403", refusal.reason()) }
            }
            Self::StoreUnavailable(_) => unavailable("store_unavailable"),
            Self::BotUnreachable => unavailable("bot_unreachable"),
            Self::Draining => unavailable("draining"),
            Self::ReplicaBusy => unavailable("replica_busy"),
            Self::RequestTimeout => row(S::REQUEST_TIMEOUT, "408", "request_timeout"),
            Self::QueryTooLong => row(S::URI_TOO_LONG, "414", "query_too_long"),
            Self::RouteNotFound => row(S::NOT_FOUND, "404", "route_not_found"),
            Self::PrivateUnauthorized(TokenRejection::OtherOrg) => {
                row(S::FORBIDDEN, "403", "private_token_other_org")
            }
            Self::PrivateUnauthorized(why) => Row {
                reason: Some(match why {
                    TokenRejection::Missing => "private_token_missing",
                    _ => "private_token_unknown",
                }),
                ..row(S::UNAUTHORIZED, "401", "private_unauthorized")
            },
            Self::KeyNotFound => row(S::NOT_FOUND, "404", "key_not_found"),
            Self::Conflict(_) => row(S::CONFLICT, "409", "conflict"),
            Self::NotServed(_) => row(S::NOT_IMPLEMENTED, "501", "not_served"),
            Self::WebhookRefused(why) => Row {
                reason: Some(webhook_reason(why)),
                ..row(S::FORBIDDEN, "403", webhook_reason(why))
            },
            Self::MethodNotAllowed => row(S::METHOD_NOT_ALLOWED, "405", "method_not_allowed"),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.row().status
    }

    fn error_response(&self) -> HttpResponse {
        let row = self.row();
        // The client is told only "retry shortly"; the operator needs the cause, within a
        // budget: an outage fails every request.
        static STORE_FAILURES: std::sync::LazyLock<crate::log_budget::LogBudget> =
            std::sync::LazyLock::new(crate::log_budget::LogBudget::for_refusals);
        if let Self::StoreUnavailable(cause) = self
            && let Some(suppressed) = STORE_FAILURES.take()
        {
            tracing::warn!(error = %cause, suppressed, "answered 503: the store failed");
        }
        let message = self.to_string();
        let body = ErrorBody {
            error: &message,
            code: row.code,
            status: row.status.as_u16(),
            message: &message,
            detail: &message,
            reason: row.reason.unwrap_or(row.metric),
        };
        let mut response = HttpResponse::build(row.status);
        if let Some(seconds) = row.retry_after {
            response.insert_header((header::RETRY_AFTER, seconds));
        }
        let mut response = response.json(body);
        // Counted by the request middleware, which can reach the metrics.
        response.extensions_mut().insert(Refusal(row.metric));
        response
    }
}

/// The `reason` of a refused webhook: a fixed set, so the metric's labels stay bounded.
fn webhook_reason(why: &str) -> &'static str {
    match why {
        "unsigned" => "webhook_unsigned",
        "stale" => "webhook_stale",
        "replayed" => "webhook_replayed",
        "not_configured" => "webhook_not_configured",
        _ => "webhook_bad_signature",
    }
}

/// The reason a request was refused, as the `refusals_total` metric labels it.
#[derive(Debug, Clone, Copy)]
pub struct Refusal(pub &'static str);
