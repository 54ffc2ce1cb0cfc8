//! Agents, read from Pipecat Cloud's `pcc-deploy.toml` format as it is, so the same file deploys
//! an agent there and here. Keys this broker does not use are accepted (and kept by the shared
//! registry); unknown keys are an error, as they are for the Pipecat CLI.
//!
//! The file holds nothing of the broker's own. Where an agent's bots listen comes from the
//! broker's settings ([`BotDefaults`]: a URL template for every region, one per region, a URL
//! per agent) or from `session-broker deploy --bot-url`; its org from where it is deployed
//! (`session-broker deploy --org`, `agents.org`, or the `agents.dir/<org>/` it lies in).
//!
//! Files written for earlier releases carry a `[broker]` section (`org`, `bot_url`,
//! `[broker.bot_urls]`); it still works for this release, with a warning, but `pcc deploy`
//! rejects such files.
//!
//! An agent serves the regions that have a bot for it; `/start` sends clients of other regions
//! to its primary region (`region`).

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use url::Url;

/// Longest agent name Pipecat Cloud accepts.
pub const MAX_NAME_LEN: usize = 54;
/// Longest `max_session_duration` Pipecat Cloud accepts, in seconds.
pub const MAX_SESSION_SECS: u64 = 14_400;
/// Bounds of `max_session_duration`, in seconds, as Pipecat Cloud documents them.
pub const SESSION_DURATION_RANGE: std::ops::RangeInclusive<u64> = 60..=MAX_SESSION_SECS;
/// `max_session_duration` when the file does not set one.
pub const DEFAULT_SESSION_DURATION_SECS: u64 = 7_200;

/// `^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`, at most 54 characters: agents, orgs and regions.
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LEN
        && edge(&bytes[0])
        && edge(&bytes[bytes.len() - 1])
        && bytes.iter().all(|b| edge(b) || *b == b'-')
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebsocketAuth {
    #[default]
    None,
    Token,
}

/// One agent as the broker uses it.
#[derive(Debug, Clone)]
pub struct Agent {
    pub name: String,
    pub org: String,
    /// `agent.org`, the scope of the agent's tokens.
    pub service_host: String,
    pub websocket_auth: WebsocketAuth,
    pub max_session_duration: Duration,
    /// Concurrent sessions cap across all replicas; `None` is unlimited.
    pub max_agents: Option<u32>,
    /// Primary region: where `/start` sends clients of regions the agent does not serve.
    pub region: Option<String>,
    pub bots: BotUrls,
    /// Whether the file carried the deprecated `[broker]` section.
    pub legacy_section: bool,
    /// The deploy file as given, keys the broker does not use included: the private API shows
    /// them back (`agent status`), for agents of files as for deployed ones.
    pub deploy_file: std::sync::Arc<str>,
}

/// Where an agent's bots listen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BotUrls {
    /// The bot of every region that has none of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any_region: Option<Url>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_region: BTreeMap<String, Url>,
}

impl BotUrls {
    pub fn is_empty(&self) -> bool {
        self.any_region.is_none() && self.by_region.is_empty()
    }

    /// Parses `URL` (every region) and `region=URL` arguments, as `deploy --bot-url` takes them.
    pub fn from_args(args: &[String]) -> Result<Self, String> {
        let mut bots = Self::default();
        for arg in args {
            match arg.split_once('=').filter(|(region, _)| is_valid_name(region)) {
                Some((region, url)) => {
                    bots.by_region.insert(region.to_owned(), parse_bot_url(url)?);
                }
                None => bots.any_region = Some(parse_bot_url(arg)?),
            }
        }
        Ok(bots)
    }
}

/// A bot URL: `ws://` or `wss://` with a host, which the broker can dial as it is. Every way a
/// bot URL comes in (settings, agent files, `deploy --bot-url`, the shared registry) passes
/// here, so that no URL is accepted only to fail when a client connects.
pub fn parse_bot_url(text: &str) -> Result<Url, String> {
    let url = Url::parse(text)
        .ok()
        .filter(|u| matches!(u.scheme(), "ws" | "wss") && u.host().is_some())
        .ok_or_else(|| format!("`{text}` is not a ws:// or wss:// URL"))?;
    if url.scheme() == "wss" && crate::tls::server_name(&url).is_none() {
        return Err(format!(
            "`{text}`: `{}` is not a name a TLS certificate can carry",
            url.host_str().unwrap_or_default()
        ));
    }
    // The dialler reads the URL as an HTTP URI, which is stricter than the URL parser.
    if url.as_str().into_client_request().is_err() {
        return Err(format!("`{text}` is not a URL the WebSocket client can dial"));
    }
    Ok(url)
}

/// The bot URLs the broker's settings give agents that bring none (`[bots]`).
#[derive(Debug, Clone, Default)]
pub struct BotDefaults {
    /// For every region: `{agent}` and `{org}` are replaced.
    pub url_template: Option<String>,
    /// Per region, over `url_template`.
    pub region_templates: BTreeMap<String, String>,
    /// Per agent (`agent.org`), over every template.
    pub agents: BTreeMap<String, Url>,
}

impl BotDefaults {
    /// Gives `agent` its bots from the settings when it brings none of its own (from
    /// `deploy --bot-url`, or a legacy `[broker]` section). Fails when it then has none.
    pub fn apply(&self, agent: &mut Agent) -> Result<(), String> {
        if agent.bots.is_empty() {
            let fill = |template: &str| {
                parse_bot_url(
                    &template.replace("{agent}", &agent.name).replace("{org}", &agent.org),
                )
            };
            if let Some(url) = self.agents.get(&agent.service_host) {
                agent.bots.any_region = Some(url.clone());
            } else {
                agent.bots.any_region = self.url_template.as_deref().map(fill).transpose()?;
                for (region, template) in &self.region_templates {
                    agent.bots.by_region.insert(region.clone(), fill(template)?);
                }
            }
        }
        if agent.bots.is_empty() {
            return Err(format!(
                "agent {} has no bot URL: set bots.url_template (or bots.regions / bots.agents) in \
                 the broker's settings, or deploy it with --bot-url",
                agent.service_host
            ));
        }
        Ok(())
    }
}

impl Agent {
    /// Whether the agent has a bot in `region`.
    pub fn serves(&self, region: &str) -> bool {
        self.bots.by_region.contains_key(region) || self.bots.any_region.is_some()
    }

    /// The region whose WebSocket URL `/start` answers on a replica of `region`: that region if
    /// the agent serves it, else the agent's primary region.
    pub fn region_for<'a>(&'a self, region: &'a str) -> &'a str {
        if self.serves(region) {
            return region;
        }
        self.region
            .as_deref()
            .or_else(|| self.bots.by_region.keys().next().map(String::as_str))
            .unwrap_or(region)
    }

    /// The bot a replica of `region` dials: the region's own, else the primary region's (a
    /// token minted elsewhere may be presented anywhere).
    pub fn bot_for(&self, region: &str) -> &Url {
        let bots = &self.bots;
        let primary = self.region.as_ref().and_then(|r| bots.by_region.get(r));
        bots.by_region
            .get(region)
            .or(bots.any_region.as_ref())
            .or(primary)
            .or_else(|| bots.by_region.values().next())
            .expect("BotDefaults::apply leaves every agent in a registry a bot URL")
    }
}

/// Keys of Pipecat Cloud's deploy file that configure its image, build and runtime rather than
/// session admission: accepted so that the same file works in both places, then ignored.
const IGNORED_KEYS: &[&str] = &[
    "image",
    "build_id",
    "image_credentials",
    "secret_set",
    "agent_profile",
    "architecture",
    "enable_krisp",
    "enable_managed_keys",
    "docker",
    "build",
    "krisp_viva",
    "resources",
    "git",
];

/// The file as written, less `IGNORED_KEYS`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployFile {
    agent_name: String,
    #[serde(default)]
    websocket_auth: WebsocketAuth,
    region: Option<String>,
    max_session_duration: Option<u64>,
    #[serde(default)]
    scaling: Scaling,
    /// Deprecated: the broker's own section of earlier releases.
    broker: Option<BrokerSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scaling {
    min_agents: Option<u32>,
    max_agents: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BrokerSection {
    /// Optional when the org is given apart, as `session-broker deploy --org` does.
    org: Option<String>,
    bot_url: Option<String>,
    #[serde(default)]
    bot_urls: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct AgentFileError {
    pub file: String,
    pub message: String,
}

impl Agent {
    /// Parses one `pcc-deploy.toml`. `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, AgentFileError> {
        Self::from_toml_for(text, origin, None)
    }

    /// Parses one `pcc-deploy.toml` for `org`, which the file's `[broker] org` may repeat but
    /// not contradict.
    pub fn from_toml_for(
        text: &str,
        origin: &str,
        org: Option<&str>,
    ) -> Result<Self, AgentFileError> {
        let fail = |message: String| AgentFileError { file: origin.to_owned(), message };
        let mut table: toml::Table = toml::from_str(text).map_err(|e| fail(e.to_string()))?;
        for key in IGNORED_KEYS {
            table.remove(*key);
        }
        let file: DeployFile =
            table.try_into().map_err(|e: toml::de::Error| fail(e.message().to_owned()))?;
        if !is_valid_name(&file.agent_name) {
            return Err(fail(format!(
                "agent_name `{}` must match ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ (at most {MAX_NAME_LEN} characters)",
                file.agent_name
            )));
        }
        let legacy = file.broker.as_ref();
        let org = match (org, legacy.and_then(|b| b.org.as_deref())) {
            (Some(given), Some(written)) if given != written => {
                return Err(fail(format!(
                    "broker.org is `{written}` but the org given is `{given}`"
                )));
            }
            (Some(org), _) | (None, Some(org)) => org.to_owned(),
            (None, None) => {
                return Err(fail(
                    "no org: deploy it with --org, put it in agents.dir/<org>/, or set agents.org"
                        .into(),
                ));
            }
        };
        if !is_valid_name(&org) {
            return Err(fail(format!("broker.org `{org}` is not a valid org name")));
        }
        if let Some(region) = &file.region
            && !is_valid_name(region)
        {
            return Err(fail(format!("region `{region}` is not a valid region name")));
        }
        let duration = file.max_session_duration.unwrap_or(DEFAULT_SESSION_DURATION_SECS);
        if !SESSION_DURATION_RANGE.contains(&duration) {
            return Err(fail(format!(
                "max_session_duration must be between {} and {} seconds",
                SESSION_DURATION_RANGE.start(),
                SESSION_DURATION_RANGE.end()
            )));
        }
        if let (Some(min), Some(max)) = (file.scaling.min_agents, file.scaling.max_agents)
            && max < min
        {
            return Err(fail("scaling.max_agents must be at least scaling.min_agents".into()));
        }
        if file.scaling.max_agents == Some(0) {
            return Err(fail("scaling.max_agents must be above 0".into()));
        }
        let mut bots = BotUrls::default();
        if let Some(legacy) = legacy {
            let parse = |setting: &str, url: &str| {
                parse_bot_url(url).map_err(|e| fail(format!("{setting}: {e}")))
            };
            if let Some(url) = &legacy.bot_url {
                let url = parse("broker.bot_url", url)?;
                // Then as now: with a primary region, bot_url is that region's bot; without one,
                // every region's.
                match &file.region {
                    Some(region) => bots.by_region.insert(region.clone(), url),
                    None => bots.any_region.replace(url),
                };
            }
            for (region, url) in &legacy.bot_urls {
                if !is_valid_name(region) {
                    return Err(fail(format!(
                        "broker.bot_urls: `{region}` is not a valid region name"
                    )));
                }
                bots.by_region
                    .insert(region.clone(), parse(&format!("broker.bot_urls.{region}"), url)?);
            }
        }
        Ok(Self {
            service_host: format!("{}.{}", file.agent_name, org),
            name: file.agent_name,
            org,
            websocket_auth: file.websocket_auth,
            max_session_duration: Duration::from_secs(duration),
            max_agents: file.scaling.max_agents,
            region: file.region,
            bots,
            legacy_section: legacy.is_some(),
            deploy_file: text.into(),
        })
    }

    /// Reads an agent file of `org` (a legacy file may name its org itself).
    pub fn from_file(path: &Path, org: Option<&str>) -> Result<Self, AgentFileError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| AgentFileError { file: origin.clone(), message: e.to_string() })?;
        Self::from_toml_for(&text, &origin, org)
    }
}

/// What a name resolves to, from the point of view of one org.
pub enum Lookup<'a> {
    Found(&'a Arc<Agent>),
    /// No such agent in this org, but another org has one by that name.
    OtherOrg,
    Unknown,
}

/// All agents, by org and name.
#[derive(Debug, Default)]
pub struct AgentRegistry {
    by_org: HashMap<String, HashMap<String, Arc<Agent>>>,
}

impl AgentRegistry {
    /// Adds an agent; a second agent with the same `agent.org` is an error.
    pub fn insert(&mut self, agent: Agent) -> Result<(), String> {
        let agents = self.by_org.entry(agent.org.clone()).or_default();
        if agents.contains_key(&agent.name) {
            return Err(format!("agent {} is defined twice", agent.service_host));
        }
        agents.insert(agent.name.clone(), Arc::new(agent));
        Ok(())
    }

    /// Adds an agent, replacing one with the same `agent.org`.
    pub fn replace(&mut self, agent: Agent) {
        self.by_org
            .entry(agent.org.clone())
            .or_default()
            .insert(agent.name.clone(), Arc::new(agent));
    }

    pub fn get(&self, org: &str, name: &str) -> Option<&Arc<Agent>> {
        self.by_org.get(org)?.get(name)
    }

    pub fn lookup(&self, org: &str, name: &str) -> Lookup<'_> {
        match self.get(org, name) {
            Some(agent) => Lookup::Found(agent),
            None if self.by_org.values().any(|agents| agents.contains_key(name)) => {
                Lookup::OtherOrg
            }
            None => Lookup::Unknown,
        }
    }

    /// The orgs that have an agent named `name`.
    pub fn orgs_with<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.by_org
            .iter()
            .filter(move |(_, agents)| agents.contains_key(name))
            .map(|(org, _)| org.as_str())
    }

    /// Resolves a service host, `agent.org`.
    pub fn by_service_host(&self, service_host: &str) -> Option<&Arc<Agent>> {
        let (name, org) = service_host.split_once('.')?;
        self.get(org, name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Agent>> {
        self.by_org.values().flat_map(HashMap::values)
    }

    pub fn len(&self) -> usize {
        self.by_org.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
agent_name = "my-agent"
image = "registry/my-agent:0.1"
secret_set = "my-secrets"
agent_profile = "agent-1x"
websocket_auth = "token"
region = "us-west"
max_session_duration = 600

[scaling]
min_agents = 1
max_agents = 50

[krisp_viva]
audio_filter = "tel"

[broker]
org = "my-org"
bot_url = "ws://127.0.0.1:7860/ws"
"#;

    #[test]
    fn reads_pipecat_deploy_files() {
        let agent = Agent::from_toml(FULL, "pcc-deploy.toml").unwrap();
        assert_eq!(agent.service_host, "my-agent.my-org");
        assert_eq!(agent.websocket_auth, WebsocketAuth::Token);
        assert_eq!(agent.max_session_duration, Duration::from_secs(600));
        assert_eq!(agent.max_agents, Some(50));
        assert_eq!(agent.bot_for("us-west").as_str(), "ws://127.0.0.1:7860/ws");
    }

    #[test]
    fn regions_choose_the_ws_url_and_the_bot() {
        let text = FULL.replace(
            "bot_url = \"ws://127.0.0.1:7860/ws\"",
            "bot_url = \"ws://west/\"\n[broker.bot_urls]\neu-central = \"ws://eu/\"",
        );
        let agent = Agent::from_toml(&text, "f").unwrap();
        assert!(agent.serves("us-west") && agent.serves("eu-central") && !agent.serves("ap-south"));
        assert_eq!(agent.region_for("eu-central"), "eu-central");
        assert_eq!(agent.region_for("ap-south"), "us-west", "unserved regions go to the primary");
        assert_eq!(agent.bot_for("eu-central").as_str(), "ws://eu/");
        assert_eq!(agent.bot_for("ap-south").as_str(), "ws://west/");

        let anywhere = Agent::from_toml(&FULL.replace("region = \"us-west\"\n", ""), "f").unwrap();
        assert!(anywhere.serves("ap-south"));
        assert_eq!(anywhere.region_for("ap-south"), "ap-south");
    }

    #[test]
    fn the_example_file_is_valid_and_has_nothing_of_the_broker() {
        let text = include_str!("../examples/agents/pcc-deploy.toml");
        let mut agent = Agent::from_toml_for(text, "example", Some("my-org")).unwrap();
        assert_eq!(agent.service_host, "my-agent.my-org");
        assert!(!agent.legacy_section && agent.bots.is_empty());
        let defaults = BotDefaults {
            url_template: Some("ws://{agent}.{org}.bots:8080/ws".into()),
            ..BotDefaults::default()
        };
        defaults.apply(&mut agent).unwrap();
        assert_eq!(agent.bot_for("anywhere").as_str(), "ws://my-agent.my-org.bots:8080/ws");
        assert!(
            BotDefaults::default()
                .apply(&mut Agent::from_toml_for(text, "e", Some("o")).unwrap())
                .is_err()
        );
    }

    #[test]
    fn per_region_and_per_agent_bots_win_over_the_template() {
        let text = "agent_name = \"a\"\nregion = \"us-west\"\n";
        let defaults = BotDefaults {
            url_template: Some("ws://{agent}.{org}.any/".into()),
            region_templates: BTreeMap::from([("eu".into(), "ws://{agent}.eu/".into())]),
            agents: BTreeMap::new(),
        };
        let mut agent = Agent::from_toml_for(text, "f", Some("o")).unwrap();
        defaults.apply(&mut agent).unwrap();
        assert_eq!(agent.bot_for("eu").as_str(), "ws://a.eu/");
        assert_eq!(agent.bot_for("us-west").as_str(), "ws://a.o.any/");
        let pinned = BotDefaults {
            agents: BTreeMap::from([("a.o".into(), Url::parse("ws://pinned/").unwrap())]),
            ..defaults
        };
        let mut agent = Agent::from_toml_for(text, "f", Some("o")).unwrap();
        pinned.apply(&mut agent).unwrap();
        assert_eq!(agent.bot_for("eu").as_str(), "ws://pinned/");
        let args = ["ws://all/".to_owned(), "eu=wss://eu/".to_owned()];
        let given = BotUrls::from_args(&args).unwrap();
        assert_eq!(given.any_region.unwrap().as_str(), "ws://all/");
        assert_eq!(given.by_region["eu"].as_str(), "wss://eu/");
        assert!(BotUrls::from_args(&["http://x/".to_owned()]).is_err());
    }

    #[test]
    fn the_compose_agent_is_valid() {
        let text = include_str!("../deploy/compose/agents/echo.toml");
        let mut agent = Agent::from_toml_for(text, "compose", Some("demo")).unwrap();
        assert!(!agent.legacy_section);
        let defaults =
            BotDefaults { url_template: Some("ws://bot:7860/".into()), ..BotDefaults::default() };
        defaults.apply(&mut agent).unwrap();
        assert!(agent.serves("us-west") && agent.serves("eu-central"));
    }

    #[test]
    fn websocket_auth_defaults_to_none() {
        let text = "agent_name = \"a\"\n[broker]\norg = \"o\"\nbot_url = \"ws://h/\"\n";
        assert_eq!(Agent::from_toml(text, "f").unwrap().websocket_auth, WebsocketAuth::None);
    }

    #[test]
    fn rejects_what_pipecat_rejects() {
        let cases = [
            (FULL.replace("region = \"us-west\"", "colour = \"blue\""), "colour"),
            (FULL.replace("my-agent\"", "My_Agent\""), "agent_name"),
            (FULL.replace("600", "30"), "max_session_duration"),
            (FULL.replace("\"token\"", "\"jwt\""), "jwt"),
            (FULL.replace("max_agents = 50", "max_agents = 0"), "max_agents"),
            (FULL.replace("ws://127", "http://127"), "bot_url"),
        ];
        for (text, needle) in cases {
            let err = Agent::from_toml(&text, "f.toml").unwrap_err().to_string();
            assert!(err.contains(needle) && err.starts_with("f.toml"), "{needle}: {err}");
        }
    }

    #[test]
    fn names() {
        for ok in ["a", "my-agent", "a1-b2", &"a".repeat(54)] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(55)] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn bot_urls_are_dialable_as_given() {
        for ok in [
            "ws://bot:7860/ws",
            "wss://bot.example.net/ws",
            "wss://127.0.0.1:8443/ws",
            "wss://[::1]:8443/ws",
            "wss://bot-1.internal/ws?x=1",
        ] {
            assert!(parse_bot_url(ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("http://bot/ws", "is not a ws:// or wss:// URL"),
            ("tcp://bot:7860", "is not a ws:// or wss:// URL"),
            ("wss://bot%20x/ws", "is not a ws:// or wss:// URL"),
            ("wss://bot..example/ws", "`bot..example` is not a name a TLS certificate can carry"),
            ("wss://-bot.example/ws", "`-bot.example` is not a name a TLS certificate can carry"),
        ] {
            let error = parse_bot_url(bad).unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn lookup_tells_another_orgs_agent_from_an_unknown_one() {
        let mut registry = AgentRegistry::default();
        registry.insert(Agent::from_toml(FULL, "f").unwrap()).unwrap();
        assert!(matches!(registry.lookup("my-org", "my-agent"), Lookup::Found(_)));
        assert!(matches!(registry.lookup("other", "my-agent"), Lookup::OtherOrg));
        assert!(matches!(registry.lookup("my-org", "nope"), Lookup::Unknown));
        assert!(registry.insert(Agent::from_toml(FULL, "f").unwrap()).is_err());
    }
}
