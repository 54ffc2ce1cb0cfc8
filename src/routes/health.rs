//! Liveness and readiness.

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::startup::AppState;

/// The process is alive and serving HTTP.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// The replica can admit sessions: its state store answers and accepts writes.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match state.store.check().await {
        Ok(()) => HttpResponse::Ok().json(json!({"status": "ready"})),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            HttpResponse::ServiceUnavailable()
                .json(json!({"status": "unavailable", "store": "unreachable"}))
        }
    }
}
