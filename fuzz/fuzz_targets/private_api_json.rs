//! The private API's JSON bodies, read as its handlers read them
//! (`routes::private::fuzzing`): the deploy payload of `POST`/`PUT .../services`, turned into the
//! `pcc-deploy.toml` it stands for and validated as one; and the body of `POST .../apiKeys`.
//!
//! Any body is an answer or a 400, never a panic. A deploy that is accepted keeps the payload as
//! sent, names a valid agent, writes TOML that its own parser reads back with the same values,
//! and deploys the agent the payload describes. A key is created only of type `public`, with the
//! name asked for.
//!
//! An input is one request body; each handler reads it.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use session_broker::{
    agents::{BotDefaults, WebsocketAuth, is_valid_name},
    registry::deployed_agent,
    routes::private::fuzzing::{deploy_file, read_create, read_deploy},
    store::DeployedAgent,
};

fn check_deploy(data: &[u8]) {
    let Ok((payload, name)) = read_deploy(data) else { return };
    assert!(is_valid_name(&name), "{name:?}");
    let sent: Value = serde_json::from_slice(data).expect("an accepted payload is JSON");
    assert_eq!(payload, sent, "the payload is kept as sent");
    let Ok(toml) = deploy_file(&payload, &name) else { return };
    // Accepted only with every field it reads of the type the CLI sends (null is absent).
    let typed = [
        ("/image", Value::is_string as fn(&Value) -> bool),
        ("/region", Value::is_string),
        ("/websocketAuth", Value::is_string),
        ("/agentProfile", Value::is_string),
        ("/secretSet", Value::is_string),
        ("/imagePullSecretSet", Value::is_string),
        ("/architecture", Value::is_string),
        ("/krispViva/audioFilter", Value::is_string),
        ("/autoScaling", Value::is_object),
        ("/maxSessionDuration", Value::is_i64),
        ("/autoScaling/minAgents", Value::is_i64),
        ("/autoScaling/maxAgents", Value::is_i64),
    ];
    for (path, is_right) in typed {
        let value = payload.pointer(path).filter(|value| !value.is_null());
        assert!(value.is_none_or(is_right), "{path} accepted as {value:?}");
    }

    let table: toml::Table = toml::from_str(&toml).expect("deploy_file writes TOML it reads back");
    assert_eq!(table.get("agent_name").and_then(toml::Value::as_str), Some(&*name));
    for (from, to) in [("image", "image"), ("region", "region"), ("secretSet", "secret_set")] {
        if let Some(text) = payload.get(from).and_then(Value::as_str) {
            assert_eq!(table.get(to).and_then(toml::Value::as_str), Some(text), "{from}");
        }
    }

    let deployed =
        DeployedAgent { toml, payload: Some(payload.clone()), ..DeployedAgent::default() };
    let defaults = BotDefaults {
        url_template: Some("ws://{agent}.{org}.bots:8080/ws".into()),
        region_templates: BTreeMap::new(),
        agents: BTreeMap::new(),
    };
    let Ok(agent) = deployed_agent(&deployed, "my-org", &defaults) else { return };
    assert_eq!(agent.name, name);
    assert_eq!(agent.service_host, format!("{name}.my-org"));
    if let Some(seconds) = payload.get("maxSessionDuration").and_then(Value::as_i64) {
        assert_eq!(Some(agent.max_session_duration.as_secs()), u64::try_from(seconds).ok());
    }
    if let Some(region) = payload.get("region").and_then(Value::as_str) {
        assert_eq!(agent.region.as_deref(), Some(region));
    }
    let auth = payload.get("websocketAuth").and_then(Value::as_str);
    assert_eq!(agent.websocket_auth == WebsocketAuth::Token, auth == Some("token"));
    let max_agents = payload.pointer("/autoScaling/maxAgents").and_then(Value::as_i64);
    if let Some(max) = max_agents {
        assert_eq!(agent.max_agents.map(i64::from), Some(max));
    }
}

fn check_create_key(data: &[u8]) {
    let Ok(name) = read_create(data) else { return };
    // serde_json skips the fields it does not read without checking that their strings are UTF-8
    // or their numbers in range: such a body is accepted (those fields are never used), so it is
    // read here lossily, and one with such a number is not judged.
    let Ok(sent) = serde_json::from_str::<Value>(&String::from_utf8_lossy(data)) else { return };
    let kind = sent.get("type").filter(|kind| !kind.is_null());
    assert!(kind.is_none_or(|kind| kind == "public"), "created a key of type {kind:?}");
    assert_eq!(name.as_deref(), sent.get("name").and_then(Value::as_str));
}

fuzz_target!(|data: &[u8]| {
    check_deploy(data);
    check_create_key(data);
});
