//! Agents, read from Pipecat Cloud's `pcc-deploy.toml` format so the same file deploys an agent
//! here and there. Keys this broker does not use are accepted and ignored; unknown keys are an
//! error, as they are for the Pipecat CLI. The broker's own needs live in a `[broker]` section:
//!
//! ```toml
//! agent_name = "my-agent"
//! websocket_auth = "token"
//! region = "us-west"                  # the primary region
//!
//! [broker]
//! org = "my-org"
//! bot_url = "ws://bot.us-west.internal:7860/ws"
//!
//! [broker.bot_urls]                   # more regions, each with its own bot
//! eu-central = "ws://bot.eu-central.internal:7860/ws"
//! ```
//!
//! An agent serves the regions that have a bot: its primary region (`region`, through
//! `bot_url`) and those in `bot_urls`. Without `region`, `bot_url` serves every region.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;
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
    /// Bot of the primary region, or of every region when `region` is unset.
    pub bot_url: Option<Url>,
    /// Bots of further regions.
    pub bot_urls: BTreeMap<String, Url>,
}

impl Agent {
    /// Whether the agent has a bot in `region`.
    pub fn serves(&self, region: &str) -> bool {
        self.bot_urls.contains_key(region)
            || (self.bot_url.is_some() && self.region.as_deref().is_none_or(|r| r == region))
    }

    /// The region whose WebSocket URL `/start` answers on a replica of `region`: that region if
    /// the agent serves it, else the agent's primary region.
    pub fn region_for<'a>(&'a self, region: &'a str) -> &'a str {
        if self.serves(region) {
            return region;
        }
        self.region
            .as_deref()
            .or_else(|| self.bot_urls.keys().next().map(String::as_str))
            .unwrap_or(region)
    }

    /// The bot a replica of `region` dials: the region's own, else the primary region's (a
    /// token minted elsewhere may be presented anywhere).
    pub fn bot_for(&self, region: &str) -> &Url {
        self.bot_urls
            .get(region)
            .or(self.bot_url.as_ref())
            .or_else(|| self.bot_urls.values().next())
            .expect("from_toml ensures at least one bot URL")
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
    broker: BrokerSection,
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
        let org = match (org, file.broker.org.as_deref()) {
            (Some(given), Some(written)) if given != written => {
                return Err(fail(format!(
                    "broker.org is `{written}` but the org given is `{given}`"
                )));
            }
            (Some(org), _) | (None, Some(org)) => org.to_owned(),
            (None, None) => return Err(fail("broker.org is required".into())),
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
        let parse_bot = |setting: &str, url: &str| {
            Url::parse(url)
                .ok()
                .filter(|u| matches!(u.scheme(), "ws" | "wss") && u.host().is_some())
                .ok_or_else(|| fail(format!("{setting} must be a ws:// or wss:// URL")))
        };
        let bot_url =
            file.broker.bot_url.as_deref().map(|u| parse_bot("broker.bot_url", u)).transpose()?;
        let mut bot_urls = BTreeMap::new();
        for (region, url) in &file.broker.bot_urls {
            if !is_valid_name(region) {
                return Err(fail(format!(
                    "broker.bot_urls: `{region}` is not a valid region name"
                )));
            }
            bot_urls.insert(region.clone(), parse_bot(&format!("broker.bot_urls.{region}"), url)?);
        }
        if bot_url.is_none() && bot_urls.is_empty() {
            return Err(fail("broker.bot_url or broker.bot_urls is required".into()));
        }
        Ok(Self {
            service_host: format!("{}.{}", file.agent_name, org),
            name: file.agent_name,
            org,
            websocket_auth: file.websocket_auth,
            max_session_duration: Duration::from_secs(duration),
            max_agents: file.scaling.max_agents,
            region: file.region,
            bot_url,
            bot_urls,
        })
    }

    pub fn from_file(path: &Path) -> Result<Self, AgentFileError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| AgentFileError { file: origin.clone(), message: e.to_string() })?;
        Self::from_toml(&text, &origin)
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
    fn the_example_file_is_valid() {
        let text = include_str!("../examples/agents/pcc-deploy.toml");
        let agent = Agent::from_toml(text, "example").unwrap();
        assert_eq!(agent.service_host, "my-agent.my-org");
    }

    #[test]
    fn the_compose_agent_is_valid() {
        let text = include_str!("../deploy/compose/agents/echo.toml");
        let agent = Agent::from_toml(text, "compose").unwrap();
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
    fn lookup_tells_another_orgs_agent_from_an_unknown_one() {
        let mut registry = AgentRegistry::default();
        registry.insert(Agent::from_toml(FULL, "f").unwrap()).unwrap();
        assert!(matches!(registry.lookup("my-org", "my-agent"), Lookup::Found(_)));
        assert!(matches!(registry.lookup("other", "my-agent"), Lookup::OtherOrg));
        assert!(matches!(registry.lookup("my-org", "nope"), Lookup::Unknown));
        assert!(registry.insert(Agent::from_toml(FULL, "f").unwrap()).is_err());
    }
}
