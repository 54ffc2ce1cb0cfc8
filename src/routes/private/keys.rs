//! `organizations keys list | create | revoke`: an org's public API keys. A key is shown once,
//! when created; lists show a masked form (only its hash is stored).

use actix_web::HttpResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use super::timestamp;
use crate::{
    admin,
    error::ApiError,
    state::AppState,
    store::{CredentialKind, CredentialRecord, StoreError},
};

#[derive(Debug, Deserialize)]
struct CreateKey {
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

pub async fn list(state: &AppState, org: &str) -> Result<HttpResponse, ApiError> {
    let keys = admin::list_credentials(&*state.store, CredentialKind::ApiKey, org)
        .await
        .map_err(store_error)?;
    let public: Vec<Value> = keys.iter().map(|key| key_json(key, None)).collect();
    Ok(HttpResponse::Ok().json(json!({"public": public})))
}

pub async fn create(state: &AppState, org: &str, body: &[u8]) -> Result<HttpResponse, ApiError> {
    let name = read_create(body)?;
    let (key, record) =
        admin::create_credential(&*state.store, CredentialKind::ApiKey, org, name.as_deref())
            .await
            .map_err(store_error)?;
    let _ = state.registry.refresh(&*state.store).await;
    Ok(HttpResponse::Ok().json(key_json(&record, Some(&key))))
}

/// A create request's body: the name it gives the key. Only public keys are created here.
pub fn read_create(body: &[u8]) -> Result<Option<String>, ApiError> {
    let request: CreateKey = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("Invalid request body: {e}")))?;
    if request.kind.as_deref().is_some_and(|kind| kind != "public") {
        return Err(ApiError::BadRequest(
            "Only public keys (type \"public\") are created here; private tokens come from \
             `session-broker tokens create`"
                .into(),
        ));
    }
    Ok(request.name)
}

pub async fn revoke(state: &AppState, org: &str, id: &str) -> Result<HttpResponse, ApiError> {
    let revoked = admin::revoke_credential(&*state.store, CredentialKind::ApiKey, org, id)
        .await
        .map_err(store_error)?
        .ok_or(ApiError::KeyNotFound)?;
    let _ = state.registry.refresh(&*state.store).await;
    Ok(HttpResponse::Ok().json(key_json(&revoked, None)))
}

/// A key as the CLI lists it; the key itself only when just created.
fn key_json(record: &CredentialRecord, key: Option<&str>) -> Value {
    let shown = key.map_or_else(|| format!("pk_…{}", &record.id), str::to_owned);
    json!({
        "id": record.id,
        "key": shown,
        "metadata": {"name": record.name.clone().unwrap_or_default()},
        "createdAt": timestamp(record.created_ms),
        "revoked": record.revoked_ms.is_some(),
    })
}

fn store_error(e: anyhow::Error) -> ApiError {
    match e.downcast::<StoreError>() {
        Ok(store) => ApiError::StoreUnavailable(store),
        Err(other) => ApiError::BadRequest(other.to_string()),
    }
}
