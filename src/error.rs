//! The HTTP error table: every error the API answers, its status and its stable code, in one
//! place. Bodies are always JSON of one shape, a superset that every known client renders:
//! `{"error", "code", "status", "message", "detail"}` (the Pipecat Python SDK reads `error` and
//! `code`; other clients read `message` or `detail`). Token refusals add `reason`.

use actix_web::{
    HttpResponse, ResponseError,
    http::{StatusCode, header},
};
use serde::Serialize;

use crate::{api_keys::ApiKeyRejection, store::StoreError, token::TokenError};

/// Seconds a client is told to wait when the state store is unreachable.
pub const STORE_RETRY_AFTER_SECS: u32 = 1;

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
    StoreUnavailable(#[source] StoreError),
    #[error("Bot unreachable, retry shortly")]
    BotUnreachable,
    #[error("This replica is shutting down; connect again")]
    Draining,
    #[error("Not found")]
    RouteNotFound,
    #[error("Method not allowed")]
    MethodNotAllowed,
    /// Never shown to the client: 500s say nothing internal.
    #[error("Internal error")]
    Internal(#[source] anyhow::Error),
}

/// Why a WebSocket connect was refused with 403.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    Missing,
    Invalid(TokenError),
    Replayed,
    /// The token's session was ended through the session API.
    Terminated,
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
            Self::Replayed => "token_already_used",
            Self::Terminated => "session_terminated",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::Missing => "This agent requires a session token; call /start first",
            Self::Invalid(TokenError::Malformed) => "Session token is malformed",
            Self::Invalid(TokenError::BadSignature) => "Session token signature is invalid",
            Self::Invalid(TokenError::Expired) => "Session token has expired",
            Self::Invalid(TokenError::WrongScope) => "Session token was issued for another agent",
            Self::Replayed => "Session token has already been used",
            Self::Terminated => "Session was terminated",
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
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

impl ApiError {
    /// The stable `code`. Pipecat Cloud uses the status number for most errors and a named code
    /// where clients branch on it.
    fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "401",
            Self::AgentNotFound | Self::RouteNotFound | Self::SessionNotFound => "404",
            Self::BadRequest(_) => "400",
            Self::PayloadTooLarge(_) => "413",
            Self::RateLimited => "429",
            Self::AtCapacity => "PCC-AGENT-AT-CAPACITY",
            Self::TokenRefused(_) => "403",
            Self::StoreUnavailable(_) | Self::BotUnreachable | Self::Draining => "503",
            Self::MethodNotAllowed => "405",
            Self::Internal(_) => "500",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::AgentNotFound | Self::RouteNotFound | Self::SessionNotFound => {
                StatusCode::NOT_FOUND
            }
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited | Self::AtCapacity => StatusCode::TOO_MANY_REQUESTS,
            Self::TokenRefused(_) => StatusCode::FORBIDDEN,
            Self::StoreUnavailable(_) | Self::BotUnreachable | Self::Draining => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let message = self.to_string();
        let reason = match self {
            Self::TokenRefused(refusal) => Some(refusal.reason()),
            _ => None,
        };
        let body = ErrorBody {
            error: &message,
            code: self.code(),
            status: status.as_u16(),
            message: &message,
            detail: &message,
            reason,
        };
        let mut response = HttpResponse::build(status);
        if let Self::StoreUnavailable(_) | Self::Draining = self {
            response.insert_header((header::RETRY_AFTER, STORE_RETRY_AFTER_SECS));
        }
        let mut response = response.json(body);
        // Counted by the request middleware, which can reach the metrics.
        response.extensions_mut().insert(Refusal(self.metric_reason()));
        response
    }
}

/// The reason a request was refused, as the `refusals_total` metric labels it.
#[derive(Debug, Clone, Copy)]
pub struct Refusal(pub &'static str);

impl ApiError {
    fn metric_reason(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "unauthorized",
            Self::AgentNotFound => "agent_not_found",
            Self::BadRequest(_) => "bad_request",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::RateLimited => "rate_limited",
            Self::AtCapacity => "at_capacity",
            Self::SessionNotFound => "session_not_found",
            Self::TokenRefused(refusal) => refusal.reason(),
            Self::StoreUnavailable(_) => "store_unavailable",
            Self::BotUnreachable => "bot_unreachable",
            Self::Draining => "draining",
            Self::RouteNotFound => "route_not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Internal(_) => "internal",
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::StoreUnavailable(e)
    }
}
