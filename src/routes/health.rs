//! The internal listener's routes: liveness, readiness and metrics. The public listener does
//! not serve them under any spelling; they answer only on `internal_listen`.

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::{error::ApiError, state::AppState};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .default_service(web::to(|| async { Err::<HttpResponse, _>(ApiError::RouteNotFound) }));
}

/// The process is alive and serving HTTP.
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// The replica can admit sessions: not draining, its store prepared (schema checked, scripts
/// loaded), and the store answers and accepts writes (checked at most once per
/// [`crate::state::READINESS_CACHE`]).
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let not_ready = |why: &str| HttpResponse::ServiceUnavailable().json(json!({"status": why}));
    if state.is_draining() {
        return not_ready("draining");
    }
    if !state.is_prepared() {
        return not_ready("store_not_prepared");
    }
    match state.store_ready().await {
        Ok(()) => HttpResponse::Ok().json(json!({"status": "ready"})),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            not_ready("store_unreachable")
        }
    }
}

/// Prometheus metrics. Gauges that describe the replica as a whole are brought up to date first.
async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let metrics = &state.metrics;
    metrics.redis_errors.follow(state.store.error_count());
    metrics.log_lines_dropped.follow(crate::telemetry::dropped_lines());
    let ready = !state.is_draining() && state.is_prepared() && state.store_ready().await.is_ok();
    metrics.ready.set(i64::from(ready));
    metrics.draining.set(i64::from(state.is_draining()));
    // Caps of agents that are gone must not linger: rebuilt whole from the registry.
    metrics.agent_session_cap.reset();
    for agent in state.registry.load().agents.iter() {
        let cap = i64::from(state.cap_of(agent));
        metrics.agent_session_cap.with_label_values(&[&agent.service_host]).set(cap);
        metrics.sessions_lost.with_label_values(&[&agent.service_host]);
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
