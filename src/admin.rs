//! Operator commands on the shared registry: deploy an agent, create, list and revoke public
//! keys. Every replica picks a change up within `registry.refresh_ms`.

use std::path::Path;

use anyhow::{Context, bail};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;

use crate::{
    agents::{BotDefaults, BotUrls, is_valid_name},
    api_keys::{PUBLIC_KEY_PREFIX, hash_api_key},
    registry::deployed_agent,
    store::{ApiKeyRecord, DeployedAgent, RegistryStore, unix_ms},
};

/// Random bytes in a new public key: 192 bits.
const KEY_RANDOM_BYTES: usize = 24;
/// Hex digits of a key's hash used as its public id.
const KEY_ID_HEX: usize = 12;

/// Validates `pcc-deploy.toml` at `path` for `org`, with the bot URLs given (`URL` for every
/// region, `region=URL` for one; none: the settings' `[bots]` templates), and stores it. Returns
/// `agent.org` and the registry version that includes it.
pub async fn deploy(
    store: &dyn RegistryStore,
    org: &str,
    path: &Path,
    bot_urls: &[String],
    defaults: &BotDefaults,
) -> anyhow::Result<(String, u64)> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {origin}"))?;
    let bots = BotUrls::from_args(bot_urls).map_err(|e| anyhow::anyhow!("--bot-url: {e}"))?;
    let deployed = DeployedAgent {
        toml: text,
        bot_url: bots.any_region.map(String::from),
        bot_urls: bots.by_region.into_iter().map(|(r, u)| (r, u.into())).collect(),
    };
    let agent = deployed_agent(&deployed, org, defaults).map_err(anyhow::Error::msg)?;
    if agent.legacy_section {
        eprintln!(
            "warning: {origin} has a [broker] section, which pcc deploy rejects; remove it and \
             pass --bot-url (or set [bots] in the settings)"
        );
    }
    let version = store.registry_put_agent(org, &agent.name, &deployed).await?;
    Ok((agent.service_host, version))
}

/// Creates a public key for `org`. The key is returned once and stored only as its hash.
pub async fn create_key(
    store: &dyn RegistryStore,
    org: &str,
) -> anyhow::Result<(String, ApiKeyRecord)> {
    if !is_valid_name(org) {
        bail!("`{org}` is not a valid organization name");
    }
    let mut random = [0u8; KEY_RANDOM_BYTES];
    rand::rng().fill_bytes(&mut random);
    let key = format!("{PUBLIC_KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(random));
    let hash = hex::encode(hash_api_key(&key));
    let record = ApiKeyRecord {
        id: hash[..KEY_ID_HEX].to_owned(),
        org: org.to_owned(),
        hash,
        created_ms: unix_ms(),
        revoked_ms: None,
    };
    store.registry_put_key(&record).await?;
    Ok((key, record))
}

/// The keys of `org`, revoked ones included, oldest first.
pub async fn list_keys(store: &dyn RegistryStore, org: &str) -> anyhow::Result<Vec<ApiKeyRecord>> {
    let mut keys: Vec<ApiKeyRecord> =
        store.registry_load().await?.keys.into_iter().filter(|k| k.org == org).collect();
    keys.sort_by_key(|k| k.created_ms);
    Ok(keys)
}

/// Revokes the key `id` of `org`. Revoking a revoked key changes nothing.
pub async fn revoke_key(
    store: &dyn RegistryStore,
    org: &str,
    id: &str,
) -> anyhow::Result<ApiKeyRecord> {
    let mut key = list_keys(store, org)
        .await?
        .into_iter()
        .find(|k| k.id == id)
        .with_context(|| format!("org {org} has no key {id}"))?;
    if key.revoked_ms.is_none() {
        key.revoked_ms = Some(unix_ms());
        store.registry_put_key(&key).await?;
    }
    Ok(key)
}
