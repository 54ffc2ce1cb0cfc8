//! The broker in-process, built by the same factory as production and bound to port 0, with
//! the orgs, keys and agents every test app serves.

use std::collections::BTreeMap;

use secrecy::SecretString;
use session_broker::{
    api_keys::hash_api_key,
    config::{OrgSettings, Settings},
    startup::Application,
    token::SigningKeys,
};

use super::{bot::TestBot, logs, redis::RedisServer};

pub const ORG: &str = "acme";
pub const KEY: &str = "pk_acme_test_key";
pub const OTHER_ORG: &str = "rival";
pub const OTHER_KEY: &str = "pk_rival_test_key";
/// Agents every test app serves.
pub const TOKEN_AGENT: &str = "voice";
pub const OPEN_AGENT: &str = "open";
pub const SECOND_AGENT: &str = "voice-two";
pub const OTHER_ORG_AGENT: &str = "rival-agent";
/// An agent with `max_agents = CAP`.
pub const CAPPED_AGENT: &str = "capped";
pub const CAP: u32 = 2;
pub const SIGNING_KEY: &str = "test-signing-key-0123456789abcdefghij";

/// Which state store an app runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Memory,
    Redis,
}

/// Settings shared by the test apps; tweak before calling [`TestApp::spawn`].
pub struct AppOptions {
    pub redis_url: Option<String>,
    pub key_prefix: String,
    pub bot_url: String,
    pub settings: Settings,
    /// More agent files, as (file stem, TOML).
    pub extra_agents: Vec<(String, String)>,
    /// A public listener bound beforehand, for tests that must know the port first.
    pub listener: Option<std::net::TcpListener>,
}

/// A broker running in this test's process, stopped when dropped.
pub struct TestApp {
    pub addr: String,
    /// The internal listener: metrics and probes.
    pub internal: String,
    pub http: reqwest::Client,
    pub bot: TestBot,
    handle: session_broker::server::ServerHandle,
    pub agent_dir: tempfile::TempDir,
    /// The app's own store, for what operators do beside the API (tokens, say).
    pub store: std::sync::Arc<dyn session_broker::store::Store>,
}

impl TestApp {
    /// One app with its own Redis (or memory store) and its own bot.
    pub async fn spawn(store: Store) -> (Self, Option<RedisServer>) {
        let redis = (store == Store::Redis).then(RedisServer::start);
        let bot = TestBot::start().await;
        let options = AppOptions::new(redis.as_ref().map(RedisServer::url), &bot);
        (Self::with(options, bot).await, redis)
    }

    pub async fn with(options: AppOptions, bot: TestBot) -> Self {
        Self::try_with(options, bot).await.expect("app builds")
    }

    pub async fn try_with(options: AppOptions, bot: TestBot) -> anyhow::Result<Self> {
        logs::init_in_process();
        let agent_dir = tempfile::tempdir().unwrap();
        let agents = [
            (TOKEN_AGENT, ORG, "token", 0),
            (SECOND_AGENT, ORG, "token", 0),
            (OPEN_AGENT, ORG, "none", 0),
            (OTHER_ORG_AGENT, OTHER_ORG, "token", 0),
            (CAPPED_AGENT, ORG, "token", CAP),
        ];
        // Pipecat Cloud's deploy files as they are: the org is the directory they lie in, and
        // the bot URL comes from the settings.
        for (name, org, auth, cap) in agents {
            let max_agents = if cap > 0 { format!("max_agents = {cap}\n") } else { String::new() };
            let text = format!(
                "agent_name = \"{name}\"\nwebsocket_auth = \"{auth}\"\nimage = \"x/y:1\"\n\n\
                 [scaling]\nmin_agents = 0\n{max_agents}"
            );
            let org_dir = agent_dir.path().join(org);
            std::fs::create_dir_all(&org_dir).unwrap();
            std::fs::write(org_dir.join(format!("{name}.toml")), text).unwrap();
        }
        for (name, text) in &options.extra_agents {
            std::fs::write(agent_dir.path().join(format!("{name}.toml")), text).unwrap();
        }
        let mut settings = options.settings;
        settings.agents.dir = Some(agent_dir.path().to_owned());
        settings.bots.url_template.get_or_insert(options.bot_url);
        if let Some(url) = options.redis_url {
            settings.redis.url = Some(SecretString::from(url));
        }
        settings.redis.key_prefix = options.key_prefix;
        settings.validate().expect("test settings are valid");
        let app = match options.listener {
            Some(listener) => Application::build_on(settings, listener).await?,
            None => Application::build(settings).await?,
        };
        let addr = format!("127.0.0.1:{}", app.port());
        let internal = format!("127.0.0.1:{}", app.internal_port());
        let handle = app.handle();
        let store = app.state().store.clone();
        tokio::spawn(app.run_until_stopped());
        let http = reqwest::Client::new();
        Ok(Self { addr, internal, http, bot, handle, agent_dir, store })
    }

    pub async fn post_start(
        &self,
        agent: &str,
        key: Option<&str>,
        body: &str,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .post(format!("http://{}/v1/public/{agent}/start", self.addr))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req.send().await.unwrap()
    }

    /// `GET` or `DELETE` of a session record, with the org's key.
    pub async fn session(
        &self,
        method: reqwest::Method,
        agent: &str,
        sid: &str,
    ) -> (u16, serde_json::Value) {
        let url = format!("http://{}/v1/public/{agent}/sessions/{sid}", self.addr);
        let resp = self.http.request(method, url).bearer_auth(KEY).send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    /// `/start` for a token agent; returns `(token, wsUrl, sessionId)`.
    pub async fn start_session(&self, agent: &str) -> (String, String, String) {
        let resp = self.post_start(agent, Some(KEY), r#"{"transport":"websocket"}"#).await;
        let status = resp.status();
        let json: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(status, 200, "/start answered {json}");
        (
            json["token"].as_str().unwrap().to_owned(),
            json["wsUrl"].as_str().unwrap().to_owned(),
            json["sessionId"].as_str().unwrap().to_owned(),
        )
    }

    /// A private token of `org`, as `session-broker tokens create` makes one.
    pub async fn private_token(&self, org: &str) -> String {
        let kind = session_broker::store::CredentialKind::PrivateToken;
        session_broker::admin::create_credential(&*self.store, kind, org, None).await.unwrap().0
    }

    pub fn ws_url(&self, agent: &str, org: &str) -> String {
        format!("ws://{}/ws/generic/{agent}.{org}", self.addr)
    }
}

impl Drop for TestApp {
    /// Stops the server's workers with the test; the stop command is sent before the future
    /// that would await its completion is dropped.
    fn drop(&mut self) {
        drop(self.handle.stop(false));
    }
}

impl AppOptions {
    pub fn new(redis_url: Option<String>, bot: &TestBot) -> Self {
        let mut settings = Settings {
            listen: "127.0.0.1:0".into(),
            internal_listen: "127.0.0.1:0".into(),
            workers: 2,
            ..Settings::default()
        };
        // Tests open many sessions and call /start often from one address; the limits that
        // would stop them are tested on their own, with their own settings.
        settings.agents.default_max_agents = 100_000;
        settings.limits.start_rate_per_address = 0;
        settings.token.signing_key_id = "k1".into();
        settings.token.keys = BTreeMap::from([("k1".into(), SecretString::from(SIGNING_KEY))]);
        for (org, key) in [(ORG, KEY), (OTHER_ORG, OTHER_KEY)] {
            settings.orgs.insert(
                org.into(),
                OrgSettings {
                    public_key_hashes: vec![hex::encode(hash_api_key(key))],
                    ..OrgSettings::default()
                },
            );
        }
        Self {
            redis_url,
            key_prefix: format!("test-{}", uuid::Uuid::new_v4().simple()),
            bot_url: bot.url(),
            settings,
            extra_agents: Vec::new(),
            listener: None,
        }
    }
}

/// The keyring the test apps use, for minting tokens the API would not (expired, say).
pub fn test_keyring() -> SigningKeys {
    let keys = BTreeMap::from([("k1".to_string(), SecretString::from(SIGNING_KEY))]);
    SigningKeys::new("k1", &keys).unwrap()
}

/// `count` replicas sharing the Redis at `redis_url` (one key prefix) and the bot.
pub async fn replicas(redis_url: &str, bot: &TestBot, count: usize) -> Vec<TestApp> {
    let mut apps = Vec::with_capacity(count);
    for _ in 0..count {
        let mut options = AppOptions::new(Some(redis_url.to_owned()), bot);
        options.key_prefix = "shared".into();
        apps.push(TestApp::with(options, bot.clone()).await);
    }
    apps
}

/// Runs a test body against both stores.
#[macro_export]
macro_rules! on_both_stores {
    ($name:ident, $body:path) => {
        mod $name {
            use super::*;
            #[tokio::test]
            async fn redis() {
                $body($crate::support::Store::Redis).await;
            }
            #[tokio::test]
            async fn memory() {
                $body($crate::support::Store::Memory).await;
            }
        }
    };
}
