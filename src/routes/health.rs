//! Liveness, readiness and metrics.

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::state::AppState;

/// The process is alive and serving HTTP.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// The replica can admit sessions: not draining, its store prepared (schema checked, scripts
/// loaded), and the store answers and accepts writes.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let not_ready = |why: &str| HttpResponse::ServiceUnavailable().json(json!({"status": why}));
    if state.is_draining() {
        return not_ready("draining");
    }
    if !state.is_prepared() {
        return not_ready("store_not_prepared");
    }
    match state.store.check().await {
        Ok(()) => HttpResponse::Ok().json(json!({"status": "ready"})),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            not_ready("store_unreachable")
        }
    }
}

/// Prometheus metrics.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    state.metrics.sync_store_errors(state.store.error_count());
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
