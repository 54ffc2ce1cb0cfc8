//! Operator commands on the shared registry: deploy an agent, create, list and revoke public
//! keys and private tokens. The CLI and the private API both use them. Every replica picks a
//! change up within `registry.refresh_ms`.

use std::path::Path;

use anyhow::{Context, bail};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;

use crate::{
    agents::{BotDefaults, BotUrls, is_valid_name},
    api_keys::{PUBLIC_KEY_PREFIX, hash_api_key},
    private_tokens::PRIVATE_TOKEN_PREFIX,
    registry::deployed_agent,
    store::{CredentialKind, CredentialRecord, DeployedAgent, RegistryStore, unix_ms},
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
        ..DeployedAgent::default()
    };
    let agent = deployed_agent(&deployed, org, defaults).map_err(anyhow::Error::msg)?;
    if agent.legacy_section {
        eprintln!(
            "warning: {origin} has a [broker] section, which pcc deploy rejects; remove it and \
             pass --bot-url (or set [bots] in the settings)"
        );
    }
    let (_, version) = store_deployment(store, org, &agent.name, deployed).await?;
    Ok((agent.service_host, version))
}

/// Stores `deployed` as the agent `name` of `org`, with a new deployment id, keeping the
/// creation time of the agent it replaces.
pub async fn store_deployment(
    store: &dyn RegistryStore,
    org: &str,
    name: &str,
    mut deployed: DeployedAgent,
) -> anyhow::Result<(DeployedAgent, u64)> {
    let now = unix_ms();
    let host = format!("{name}.{org}");
    let previous = store.registry_load().await?.agents.into_iter().find(|(o, agent)| {
        o == org && toml_agent_name(&agent.toml).is_some_and(|n| format!("{n}.{o}") == host)
    });
    deployed.created_ms = previous.map_or(now, |(_, agent)| agent.created_ms);
    deployed.updated_ms = now;
    deployed.deployment_id = Some(uuid::Uuid::new_v4().to_string());
    let version = store.registry_put_agent(org, name, &deployed).await?;
    Ok((deployed, version))
}

fn toml_agent_name(text: &str) -> Option<String> {
    let table: toml::Table = toml::from_str(text).ok()?;
    table.get("agent_name")?.as_str().map(str::to_owned)
}

/// Creates a credential of `kind` for `org`. The secret is returned once and stored only as
/// its hash.
pub async fn create_credential(
    store: &dyn RegistryStore,
    kind: CredentialKind,
    org: &str,
    name: Option<&str>,
) -> anyhow::Result<(String, CredentialRecord)> {
    if !is_valid_name(org) {
        bail!("`{org}` is not a valid organization name");
    }
    let mut random = [0u8; KEY_RANDOM_BYTES];
    rand::rng().fill_bytes(&mut random);
    let prefix = match kind {
        CredentialKind::ApiKey => PUBLIC_KEY_PREFIX,
        CredentialKind::PrivateToken => PRIVATE_TOKEN_PREFIX,
    };
    let secret = format!("{prefix}{}", URL_SAFE_NO_PAD.encode(random));
    let hash = hex::encode(hash_api_key(&secret));
    let record = CredentialRecord {
        id: hash[..KEY_ID_HEX].to_owned(),
        org: org.to_owned(),
        hash,
        created_ms: unix_ms(),
        revoked_ms: None,
        name: name.map(str::to_owned),
    };
    store.registry_put_credential(kind, &record).await?;
    Ok((secret, record))
}

/// The credentials of `kind` of `org`, revoked ones included, oldest first.
pub async fn list_credentials(
    store: &dyn RegistryStore,
    kind: CredentialKind,
    org: &str,
) -> anyhow::Result<Vec<CredentialRecord>> {
    let entries = store.registry_load().await?;
    let all = match kind {
        CredentialKind::ApiKey => entries.keys,
        CredentialKind::PrivateToken => entries.tokens,
    };
    let mut mine: Vec<CredentialRecord> = all.into_iter().filter(|k| k.org == org).collect();
    mine.sort_by_key(|k| k.created_ms);
    Ok(mine)
}

/// Revokes the credential `id` of `org`; `None` when it has none by that id. Revoking a
/// revoked credential changes nothing.
pub async fn revoke_credential(
    store: &dyn RegistryStore,
    kind: CredentialKind,
    org: &str,
    id: &str,
) -> anyhow::Result<Option<CredentialRecord>> {
    let found = list_credentials(store, kind, org).await?.into_iter().find(|k| k.id == id);
    let Some(mut record) = found else { return Ok(None) };
    if record.revoked_ms.is_none() {
        record.revoked_ms = Some(unix_ms());
        store.registry_put_credential(kind, &record).await?;
    }
    Ok(Some(record))
}
