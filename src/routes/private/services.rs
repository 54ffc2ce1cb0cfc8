//! Agents as the CLI manages them: `deploy` (create with POST, update with PUT, both on the
//! collection), `agent list`, `agent status`, `agent delete`, and the regions and properties
//! `deploy` asks for first.

use actix_web::HttpResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use super::timestamp;
use crate::{
    admin,
    agents::{Agent, WebsocketAuth, is_valid_name},
    error::ApiError,
    registry::deployed_agent,
    state::AppState,
    store::DeployedAgent,
};

/// Whether a deploy creates the agent or updates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deploy {
    Create,
    Update,
}

/// The regions replicas serve, by their public WebSocket URLs.
pub fn regions(state: &AppState) -> HttpResponse {
    let regions: Vec<Value> =
        state.regions().map(|code| json!({"code": code, "display_name": code})).collect();
    HttpResponse::Ok().json(json!({"regions": regions}))
}

/// `deploy` without a region asks for the default one: this replica's.
pub fn properties(state: &AppState) -> HttpResponse {
    HttpResponse::Ok().json(json!({"properties": {"defaultRegion": state.region}}))
}

pub fn list(state: &AppState, org: &str) -> Result<HttpResponse, ApiError> {
    let registry = state.registry.load();
    let mut agents: Vec<&std::sync::Arc<Agent>> =
        registry.agents.iter().filter(|a| a.org == org).collect();
    agents.sort_by(|a, b| a.name.cmp(&b.name));
    let services: Vec<Value> = agents
        .into_iter()
        .map(|agent| {
            let deployed = registry.deployments.get(&agent.service_host);
            json!({
                "name": agent.name,
                "region": agent.region,
                "id": agent.service_host,
                "activeDeploymentId": deployed.and_then(|d| d.deployment_id.clone()),
                "createdAt": deployed.map(|d| timestamp(d.created_ms)),
                "updatedAt": deployed.map(|d| timestamp(d.updated_ms)),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"services": services})))
}

/// `agent status`, and the poll `deploy` makes until `ready`. An agent here is ready as soon as
/// it is deployed: there is no image to pull, and the deployment is reconciled at once.
pub async fn status(state: &AppState, org: &str, name: &str) -> Result<HttpResponse, ApiError> {
    let registry = state.registry.load();
    let agent = registry.agents.get(org, name).ok_or(ApiError::AgentNotFound)?;
    let deployed = registry.deployments.get(&agent.service_host);
    let live = state.store.live_sessions(&agent.service_host).await?;
    let payload = deployed.and_then(|d| d.payload.clone()).unwrap_or(Value::Null);
    let deployment_id = deployed.and_then(|d| d.deployment_id.clone());
    let file: Option<toml::Table> = toml::from_str(&agent.deploy_file).ok();
    let from_file = |key: &str| Some(Value::String(file.as_ref()?.get(key)?.as_str()?.to_owned()));
    let image = payload.get("image").cloned().or_else(|| from_file("image"));
    let min_agents = file.as_ref().and_then(|t| t.get("scaling")?.get("min_agents")?.as_integer());
    Ok(HttpResponse::Ok().json(json!({"body": {
        "name": agent.name,
        "region": agent.region,
        "ready": true,
        "available": true,
        "activeDeploymentId": deployment_id,
        "reconciledDeploymentId": deployment_id,
        "activeSessionCount": live,
        "deployment": {
            "id": deployment_id,
            "manifest": {"spec": {
                "image": image,
                "maxSessionDurationSeconds": agent.max_session_duration.as_secs(),
            }},
        },
        "autoScaling": {"minReplicas": min_agents.unwrap_or(0), "maxReplicas": state.cap_of(agent)},
        "agentProfile": payload.get("agentProfile").cloned().or_else(|| from_file("agent_profile")),
        "krispViva": payload.get("krispViva").cloned().unwrap_or_else(|| json!({"audioFilter": null})),
        "websocketAuth": match agent.websocket_auth { WebsocketAuth::Token => "token", WebsocketAuth::None => "none" },
        "bots": {"anyRegion": agent.bots.any_region, "byRegion": agent.bots.by_region},
        "errors": [],
        "createdAt": deployed.map(|d| timestamp(d.created_ms)),
        "updatedAt": deployed.map(|d| timestamp(d.updated_ms)),
        // What was deployed, fields the broker does not use included.
        "deployedPayload": payload,
        "deployFile": &*agent.deploy_file,
    }})))
}

/// The CLI's deploy payload: the fields the broker reads; the whole payload is kept as sent.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Payload {
    service_name: String,
}

pub async fn deploy(
    state: &AppState,
    org: &str,
    body: &[u8],
    mode: Deploy,
) -> Result<HttpResponse, ApiError> {
    let (payload, name) = read_deploy(body)?;
    let registry = state.registry.load();
    let exists = registry.agents.get(org, &name).is_some();
    match mode {
        Deploy::Create if exists => {
            return Err(ApiError::Conflict(format!("Agent {name} exists; update it (PUT)")));
        }
        Deploy::Update if !exists => return Err(ApiError::AgentNotFound),
        _ => {}
    }
    // Bot URLs given by an earlier `session-broker deploy --bot-url` stay.
    let previous = registry.deployments.get(&format!("{name}.{org}"));
    let deployed = DeployedAgent {
        toml: deploy_file(&payload, &name)?,
        payload: Some(payload),
        bot_url: previous.and_then(|p| p.bot_url.clone()),
        bot_urls: previous.map(|p| p.bot_urls.clone()).unwrap_or_default(),
        ..DeployedAgent::default()
    };
    let defaults = state.bot_defaults();
    deployed_agent(&deployed, org, &defaults).map_err(ApiError::BadRequest)?;
    let (stored, _) =
        admin::store_deployment(&*state.store, org, &name, deployed).await.map_err(|e| {
            match e.downcast::<crate::store::StoreError>() {
                Ok(store) => ApiError::StoreUnavailable(store),
                Err(other) => ApiError::BadRequest(other.to_string()),
            }
        })?;
    // Seen by this replica's next request at once; by the others' within a refresh.
    let _ = state.registry.refresh(&*state.store).await;
    tracing::info!(agent = %format!("{name}.{org}"), ?mode, "agent deployed");
    Ok(HttpResponse::Ok().json(json!({
        "name": name,
        "deploymentId": stored.deployment_id,
        "ready": true,
    })))
}

pub async fn delete(state: &AppState, org: &str, name: &str) -> Result<HttpResponse, ApiError> {
    let registry = state.registry.load();
    let agent = registry.agents.get(org, name).ok_or(ApiError::AgentNotFound)?;
    if !registry.deployments.contains_key(&agent.service_host) {
        return Err(ApiError::Conflict(format!(
            "Agent {name} is defined in the broker's files (agents.dir / agents.files); remove it there"
        )));
    }
    state.store.registry_delete_agent(org, name).await?;
    let _ = state.registry.refresh(&*state.store).await;
    tracing::info!(agent = %agent.service_host, "agent deleted");
    Ok(HttpResponse::Ok().json(json!({"name": name, "deleted": true})))
}

/// A deploy request's body: the payload as sent, and the agent it names.
pub fn read_deploy(body: &[u8]) -> Result<(Value, String), ApiError> {
    let payload: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("Invalid deploy payload: {e}")))?;
    let Payload { service_name: name } = serde_json::from_value(payload.clone())
        .map_err(|e| ApiError::BadRequest(format!("Invalid deploy payload: {e}")))?;
    if !is_valid_name(&name) {
        return Err(ApiError::BadRequest(format!(
            "serviceName `{name}` must match ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ (at most 54 characters)"
        )));
    }
    Ok((payload, name))
}

/// The payload as the `pcc-deploy.toml` it stands for, which the broker's parser validates. A
/// field it reads that holds another type than the CLI sends (a string where a number goes, say)
/// is refused, not dropped for the default.
pub fn deploy_file(payload: &Value, name: &str) -> Result<String, ApiError> {
    let mut file = toml::Table::new();
    file.insert("agent_name".into(), name.into());
    let wrong = |path: &str, kind: &str| {
        let field = path.trim_start_matches('/').replace('/', ".");
        ApiError::BadRequest(format!("Invalid deploy payload: `{field}` must be {kind}"))
    };
    // Absent and null are the same: the CLI drops its `None`s, other clients may send them.
    let field = |path: &str| payload.pointer(path).filter(|value| !value.is_null());
    let text = |path: &str| match field(path) {
        Some(value) => {
            value.as_str().map(|t| Some(t.to_owned())).ok_or_else(|| wrong(path, "a string"))
        }
        None => Ok(None),
    };
    let number = |path: &str| match field(path) {
        Some(value) => value.as_i64().map(Some).ok_or_else(|| wrong(path, "an integer")),
        None => Ok(None),
    };
    for (from, to) in [
        ("/image", "image"),
        ("/region", "region"),
        ("/websocketAuth", "websocket_auth"),
        ("/agentProfile", "agent_profile"),
        ("/secretSet", "secret_set"),
        ("/imagePullSecretSet", "image_credentials"),
        ("/architecture", "architecture"),
    ] {
        if let Some(value) = text(from)? {
            file.insert(to.into(), value.into());
        }
    }
    if let Some(seconds) = number("/maxSessionDuration")? {
        file.insert("max_session_duration".into(), seconds.into());
    }
    if let Some(scaling) = field("/autoScaling") {
        if !scaling.is_object() {
            return Err(wrong("/autoScaling", "an object"));
        }
        let mut table = toml::Table::new();
        if let Some(min) = number("/autoScaling/minAgents")? {
            table.insert("min_agents".into(), min.into());
        }
        if let Some(max) = number("/autoScaling/maxAgents")? {
            table.insert("max_agents".into(), max.into());
        }
        file.insert("scaling".into(), table.into());
    }
    if let Some(filter) = text("/krispViva/audioFilter")? {
        let mut table = toml::Table::new();
        table.insert("audio_filter".into(), filter.into());
        file.insert("krisp_viva".into(), table.into());
    }
    toml::to_string(&file).map_err(|e| ApiError::BadRequest(format!("Invalid deploy payload: {e}")))
}
