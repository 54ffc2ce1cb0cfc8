//! Which agents exist and which public keys open them: the static part from files and settings,
//! and the shared part in Redis that `session-broker deploy` and `session-broker keys` write.
//!
//! Every replica holds one immutable snapshot of both, swapped whole when the shared part
//! changes: requests read it without locks. A background task compares the registry's version
//! counter in Redis every `registry.refresh_ms` and reloads when it moved, so a deploy or a key
//! revocation reaches every replica within that interval.

use std::{collections::HashMap, sync::Arc, time::Duration};

use arc_swap::ArcSwap;

use crate::{
    agents::{Agent, AgentRegistry, BotDefaults, parse_bot_url},
    api_keys::{ApiKeyHash, ApiKeyIndex, parse_api_key_hash},
    private_tokens::PrivateTokenIndex,
    store::{DeployedAgent, RegistryEntries, RegistryStore, StoreError},
};

/// One consistent view of agents and keys.
#[derive(Debug, Default)]
pub struct Registry {
    pub agents: AgentRegistry,
    pub keys: ApiKeyIndex,
    /// Private tokens of the private API.
    pub tokens: PrivateTokenIndex,
    /// What the shared registry keeps of deployed agents, by `agent.org` (file agents have none).
    pub deployments: HashMap<String, DeployedAgent>,
    /// Version of the shared part this view includes; 0 before any was read.
    pub version: u64,
}

/// The current view, and what it is rebuilt from.
pub struct LiveRegistry {
    current: ArcSwap<Registry>,
    static_agents: Vec<Agent>,
    static_keys: Vec<(ApiKeyHash, String)>,
    /// Bots for deployed agents that brought none.
    bots: BotDefaults,
}

impl LiveRegistry {
    pub fn new(
        static_agents: Vec<Agent>,
        static_keys: Vec<(ApiKeyHash, String)>,
        bots: BotDefaults,
    ) -> Self {
        let live = Self { current: ArcSwap::default(), static_agents, static_keys, bots };
        live.current.store(Arc::new(live.build(&RegistryEntries::default())));
        live
    }

    pub fn load(&self) -> Arc<Registry> {
        self.current.load_full()
    }

    /// Reloads from the store if its registry changed. Returns whether it did.
    pub async fn refresh(&self, store: &dyn RegistryStore) -> Result<bool, StoreError> {
        let version = store.registry_version().await?;
        if version == self.current.load().version {
            return Ok(false);
        }
        let entries = store.registry_load().await?;
        self.current.store(Arc::new(self.build(&entries)));
        tracing::info!(version = entries.version, "registry reloaded");
        Ok(true)
    }

    /// Static entries first, then the shared ones, which win: a deploy replaces a file's agent.
    fn build(&self, entries: &RegistryEntries) -> Registry {
        let mut agents = AgentRegistry::default();
        for agent in &self.static_agents {
            agents.replace(agent.clone());
        }
        let mut deployments = HashMap::new();
        for (org, deployed) in &entries.agents {
            match deployed_agent(deployed, org, &self.bots) {
                Ok(agent) => {
                    deployments.insert(agent.service_host.clone(), deployed.clone());
                    agents.replace(agent);
                }
                // Written by `deploy`, which validates; a file from a newer broker may not
                // parse, and a replica may lack the bot settings another one has.
                Err(e) => tracing::warn!(error = %e, "skipping a registry agent"),
            }
        }
        let mut keys = ApiKeyIndex::default();
        for (hash, org) in &self.static_keys {
            keys.insert(*hash, org);
        }
        for key in entries.keys.iter().filter(|k| k.revoked_ms.is_none()) {
            if let Some(hash) = parse_api_key_hash(&key.hash) {
                keys.insert(hash, &key.org);
            }
        }
        let mut tokens = PrivateTokenIndex::default();
        for token in entries.tokens.iter().filter(|k| k.revoked_ms.is_none()) {
            if let Some(hash) = parse_api_key_hash(&token.hash) {
                tokens.insert(hash, &token.org);
            }
        }
        Registry { agents, keys, tokens, deployments, version: entries.version }
    }
}

/// The agent a registry entry describes, with its bots: those its deploy gave, else the
/// settings' defaults.
pub fn deployed_agent(
    deployed: &DeployedAgent,
    org: &str,
    defaults: &BotDefaults,
) -> Result<Agent, String> {
    let mut agent = Agent::from_toml_for(&deployed.toml, "shared registry", Some(org))
        .map_err(|e| e.to_string())?;
    if let Some(url) = &deployed.bot_url {
        agent.bots.any_region = Some(parse_bot_url(url)?);
    }
    for (region, url) in &deployed.bot_urls {
        agent.bots.by_region.insert(region.clone(), parse_bot_url(url)?);
    }
    defaults.apply(&mut agent)?;
    Ok(agent)
}

/// Keeps `live` in step with the store's registry.
pub async fn keep_fresh(live: Arc<LiveRegistry>, store: Arc<dyn RegistryStore>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = live.refresh(&*store).await {
            tracing::debug!(error = %e, "registry refresh failed; keeping the current view");
        }
    }
}
