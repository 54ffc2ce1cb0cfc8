//! `pcc-deploy.toml` as `session-broker deploy` reads it (`agents::Agent::from_toml_for`, with the
//! `--bot-url` arguments and the settings' `[bots]` templates, through
//! `registry::deployed_agent`), and as a file agent without a given org (`Agent::from_toml`).
//!
//! Any text is an agent or an error, never a panic; an agent that is accepted satisfies every
//! rule the parser states (names, duration, scaling, bot URLs), can be routed from any region,
//! and is found again under its name by what `deploy` stores (`admin::store_deployment` reads
//! `agent_name` back from the text).
//!
//! An input is the file's text, then optionally `\0`-separated `--bot-url` arguments.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use session_broker::{
    agents::{Agent, BotDefaults, BotUrls, SESSION_DURATION_RANGE, is_valid_name},
    registry::deployed_agent,
    store::DeployedAgent,
};

const ORG: &str = "my-org";

fn check(agent: &Agent, text: &str) {
    assert!(is_valid_name(&agent.name) && is_valid_name(&agent.org), "{agent:?}");
    assert_eq!(agent.service_host, format!("{}.{}", agent.name, agent.org));
    assert!(SESSION_DURATION_RANGE.contains(&agent.max_session_duration.as_secs()));
    assert_ne!(agent.max_agents, Some(0));
    assert!(agent.region.as_deref().is_none_or(is_valid_name));
    let urls = agent.bots.any_region.iter().chain(agent.bots.by_region.values());
    for url in urls {
        assert!(matches!(url.scheme(), "ws" | "wss") && url.host().is_some(), "{url}");
    }
    assert!(agent.bots.by_region.keys().all(|region| is_valid_name(region)));
    let table: toml::Table = toml::from_str(text).expect("an accepted file is TOML");
    assert_eq!(table.get("agent_name").and_then(toml::Value::as_str), Some(&*agent.name));
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == 0);
    let Ok(text) = std::str::from_utf8(parts.next().unwrap_or_default()) else { return };
    let args: Vec<String> = parts.map(|arg| String::from_utf8_lossy(arg).into_owned()).collect();

    // A file of `agents.dir`, or a legacy file naming its org itself.
    match Agent::from_toml(text, "agents/f.toml") {
        Ok(agent) => check(&agent, text),
        Err(e) => assert_eq!(e.file, "agents/f.toml", "errors name the file"),
    }

    // `session-broker deploy --org my-org [--bot-url ...]`.
    let Ok(bots) = BotUrls::from_args(&args) else { return };
    let deployed = DeployedAgent {
        toml: text.to_owned(),
        bot_url: bots.any_region.clone().map(String::from),
        bot_urls: bots.by_region.iter().map(|(r, u)| (r.clone(), u.to_string())).collect(),
        ..DeployedAgent::default()
    };
    let defaults = BotDefaults {
        url_template: Some("ws://{agent}.{org}.bots:8080/ws".into()),
        region_templates: BTreeMap::from([(
            "eu-central".into(),
            "wss://{agent}.eu.bots/ws".into(),
        )]),
        agents: BTreeMap::new(),
    };
    let Ok(agent) = deployed_agent(&deployed, ORG, &defaults) else { return };
    check(&agent, text);
    assert_eq!(agent.org, ORG);
    // What deploy was given wins over the settings.
    for (region, url) in &bots.by_region {
        assert_eq!(agent.bot_for(region), url);
    }
    if let Some(url) = &bots.any_region
        && !agent.bots.by_region.contains_key("nowhere")
    {
        assert_eq!(agent.bot_for("nowhere"), url);
    }
    // Every replica can route it: no region is without a bot (`bot_for` would panic).
    for region in ["us-west", "eu-central", "ap-south", agent.region.as_deref().unwrap_or("x")] {
        agent.bot_for(region);
        if agent.serves(region) {
            assert_eq!(agent.region_for(region), region);
        }
    }
});
