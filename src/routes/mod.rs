//! HTTP routes, one file per endpoint family. Every answer, errors included, is JSON.

pub mod health;
pub mod services;
pub mod start;
pub mod ws;

use actix_web::{HttpResponse, web};

use crate::error::ApiError;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::QueryConfig::default().error_handler(|e, _| {
            ApiError::BadRequest(format!("Invalid query string: {e}")).into()
        }),
    )
    .app_data(
        web::PathConfig::default()
            .error_handler(|e, _| ApiError::BadRequest(format!("Invalid path: {e}")).into()),
    )
    .service(
        web::resource("/v1/public/{agent}/start")
            .route(web::post().to(start::start))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/v1/organizations/{org}/services/{agent}")
            .route(web::get().to(services::service))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(["/ws/generic/{service}", "/ws/generic/{service}/{token}"])
            .route(web::get().to(ws::connect))
            .default_service(web::to(method_not_allowed)),
    )
    .route("/healthz", web::get().to(health::healthz))
    .route("/readyz", web::get().to(health::readyz))
    .default_service(web::to(not_found));
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::RouteNotFound)
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}
