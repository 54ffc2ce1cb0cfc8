//! Test fixtures: a real `redis-server` per test, a bot that records its handshakes, and the
//! broker itself, built by the same factory as production and bound to port 0.

use std::{
    collections::{BTreeMap, HashMap},
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use futures_util::{SinkExt, StreamExt};
use secrecy::SecretString;
use session_broker::{
    api_keys::hash_api_key,
    config::{OrgSettings, Settings},
    startup::Application,
    token::SigningKeys,
};
use tokio::net::TcpListener;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{self, Message, client::IntoClientRequest, handshake::server},
};

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

pub type Client = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

pub use crate::redis_fixtures::*;

/// What the bot saw of one handshake.
#[derive(Debug, Clone)]
pub struct Handshake {
    pub uri: String,
    pub headers: HashMap<String, String>,
}

/// A WebSocket bot that echoes and remembers every handshake.
#[derive(Clone)]
pub struct TestBot {
    pub addr: SocketAddr,
    pub handshakes: Arc<Mutex<Vec<Handshake>>>,
    connections: Arc<AtomicUsize>,
    /// Frames a `flood` command has sent so far.
    pub flooded: Arc<AtomicUsize>,
}

impl TestBot {
    pub async fn start() -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    pub fn start_on(listener: TcpListener) -> Self {
        let bot = Self {
            addr: listener.local_addr().unwrap(),
            handshakes: Arc::default(),
            connections: Arc::default(),
            flooded: Arc::default(),
        };
        let shared = bot.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let bot = shared.clone();
                tokio::spawn(async move { bot.serve(stream).await });
            }
        });
        bot
    }

    // The handshake callback's error type is tungstenite's, large or not.
    #[allow(clippy::result_large_err)]
    async fn serve(self, stream: tokio::net::TcpStream) {
        self.connections.fetch_add(1, Ordering::SeqCst);
        let record = |req: &server::Request, resp: server::Response| {
            let headers = req
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
                .collect();
            self.handshakes.lock().unwrap().push(Handshake { uri: req.uri().to_string(), headers });
            Ok(resp)
        };
        let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await else { return };
        while let Some(Ok(msg)) = ws.next().await {
            match msg {
                // `close <code> <reason>` asks the bot to end the session itself.
                Message::Text(text) if text.starts_with("close ") => {
                    let mut parts = text.splitn(3, ' ').skip(1);
                    let code: u16 = parts.next().unwrap().parse().unwrap();
                    let reason = parts.next().unwrap_or("").to_owned();
                    let _ = ws
                        .close(Some(tungstenite::protocol::CloseFrame {
                            code: code.into(),
                            reason: reason.into(),
                        }))
                        .await;
                }
                // `flood <count> <bytes>` sends that many binary frames as fast as it can.
                Message::Text(text) if text.starts_with("flood ") => {
                    let mut parts = text.split(' ').skip(1).map(|n| n.parse::<usize>().unwrap());
                    let (count, size) = (parts.next().unwrap(), parts.next().unwrap());
                    for i in 0..count {
                        let frame = vec![(i % 251) as u8; size];
                        let Ok(()) = ws.send(Message::binary(frame)).await else { return };
                        self.flooded.fetch_add(1, Ordering::SeqCst);
                    }
                }
                // `silent` makes the bot stop reading (and so stop answering pings).
                Message::Text(text) if text.as_str() == "silent" => {
                    std::future::pending::<()>().await;
                }
                Message::Text(_) | Message::Binary(_) => {
                    let Ok(()) = ws.send(msg).await else { break };
                }
                Message::Close(frame) => {
                    self.handshakes.lock().unwrap().push(Handshake {
                        uri: "close".into(),
                        headers: frame
                            .map(|f| {
                                HashMap::from([
                                    ("code".into(), u16::from(f.code).to_string()),
                                    ("reason".into(), f.reason.to_string()),
                                ])
                            })
                            .unwrap_or_default(),
                    });
                }
                _ => {}
            }
        }
    }

    /// Connections the bot has accepted so far, handshake or not.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The close frames the bot received, as (code, reason).
    pub fn closes(&self) -> Vec<(String, String)> {
        self.handshakes
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.uri == "close")
            .map(|h| (h.headers["code"].clone(), h.headers["reason"].clone()))
            .collect()
    }
}

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
}

pub struct TestApp {
    pub addr: String,
    pub http: reqwest::Client,
    pub bot: TestBot,
    handle: actix_web::dev::ServerHandle,
    pub agent_dir: tempfile::TempDir,
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
        let agent_dir = tempfile::tempdir().unwrap();
        let agents = [
            (TOKEN_AGENT, ORG, "token", 0),
            (SECOND_AGENT, ORG, "token", 0),
            (OPEN_AGENT, ORG, "none", 0),
            (OTHER_ORG_AGENT, OTHER_ORG, "token", 0),
            (CAPPED_AGENT, ORG, "token", CAP),
        ];
        for (name, org, auth, cap) in agents {
            let bot_url = &options.bot_url;
            let max_agents = if cap > 0 { format!("max_agents = {cap}\n") } else { String::new() };
            let text = format!(
                "agent_name = \"{name}\"\nwebsocket_auth = \"{auth}\"\nimage = \"x/y:1\"\n\n\
                 [scaling]\nmin_agents = 0\n{max_agents}\n[broker]\norg = \"{org}\"\nbot_url = \"{bot_url}\"\n"
            );
            std::fs::write(agent_dir.path().join(format!("{name}.toml")), text).unwrap();
        }
        for (name, text) in &options.extra_agents {
            std::fs::write(agent_dir.path().join(format!("{name}.toml")), text).unwrap();
        }
        let mut settings = options.settings;
        settings.agents.dir = Some(agent_dir.path().to_owned());
        if let Some(url) = options.redis_url {
            settings.redis.url = Some(SecretString::from(url));
        }
        settings.redis.key_prefix = options.key_prefix;
        settings.validate().expect("test settings are valid");
        let app = Application::build(settings).await?;
        let addr = format!("127.0.0.1:{}", app.port());
        let handle = app.handle();
        tokio::spawn(app.run_until_stopped());
        Ok(Self { addr, http: reqwest::Client::new(), bot, handle, agent_dir })
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
        assert_eq!(resp.status(), 200);
        let json: serde_json::Value = resp.json().await.unwrap();
        (
            json["token"].as_str().unwrap().to_owned(),
            json["wsUrl"].as_str().unwrap().to_owned(),
            json["sessionId"].as_str().unwrap().to_owned(),
        )
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
        let mut settings =
            Settings { listen: "127.0.0.1:0".into(), workers: 2, ..Settings::default() };
        settings.token.signing_key_id = "k1".into();
        settings.token.keys = BTreeMap::from([("k1".into(), SecretString::from(SIGNING_KEY))]);
        for (org, key) in [(ORG, KEY), (OTHER_ORG, OTHER_KEY)] {
            settings.orgs.insert(
                org.into(),
                OrgSettings { public_key_hashes: vec![hex::encode(hash_api_key(key))] },
            );
        }
        Self {
            redis_url,
            key_prefix: format!("test-{}", uuid::Uuid::new_v4().simple()),
            bot_url: bot.url(),
            settings,
            extra_agents: Vec::new(),
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

/// Presents every token to every app at the same moment (the three connects of a token are
/// started together; tokens go ten at a time). Returns (upgrades, refusals as "already used").
pub async fn race(apps: &[&TestApp], agent: &str, tokens: &[String]) -> (usize, usize) {
    let (mut upgrades, mut refusals) = (0, 0);
    for batch in tokens.chunks(10) {
        let mut attempts = Vec::new();
        for token in batch {
            for app in apps {
                let url = app.ws_url(agent, ORG);
                let token = token.clone();
                attempts.push(tokio::spawn(async move {
                    connect(&url, Some((&token, Via::Path))).await.map(drop)
                }));
            }
        }
        for attempt in futures_util::future::join_all(attempts).await {
            match attempt.unwrap() {
                Ok(()) => upgrades += 1,
                Err((403, body, _)) if body["reason"] == "token_already_used" => refusals += 1,
                Err(other) => panic!("unexpected answer {other:?}"),
            }
        }
    }
    (upgrades, refusals)
}

/// Where a connect puts its token.
#[derive(Debug, Clone, Copy)]
pub enum Via {
    Header,
    Query,
    Path,
}

/// Connects with `token` placed as `via` says. On refusal returns the HTTP status and JSON body.
pub async fn connect(
    ws_url: &str,
    token: Option<(&str, Via)>,
) -> Result<Client, (u16, serde_json::Value, Option<String>)> {
    let url = match token {
        Some((t, Via::Query)) => format!("{ws_url}?token={t}"),
        Some((t, Via::Path)) => format!("{ws_url}/{t}"),
        _ => ws_url.to_owned(),
    };
    let mut request = url.into_client_request().unwrap();
    if let Some((t, Via::Header)) = token {
        request.headers_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    connect_request(request).await
}

pub async fn connect_request(
    request: tungstenite::handshake::client::Request,
) -> Result<Client, (u16, serde_json::Value, Option<String>)> {
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let retry_after =
                resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
            let body = resp.body().as_deref().unwrap_or_default();
            let json = serde_json::from_slice(body).unwrap_or_else(|_| {
                panic!("refusal is not JSON: {}", String::from_utf8_lossy(body))
            });
            Err((resp.status().as_u16(), json, retry_after))
        }
        Err(e) => panic!("connect failed below HTTP: {e}"),
    }
}

/// Sends `msg` and expects it back unchanged (heartbeat pings in between are skipped).
pub async fn assert_echo(ws: &mut Client, msg: Message) {
    ws.send(msg.clone()).await.unwrap();
    let back = next_data(ws).await.expect("bot answered");
    // No assert_eq!: a failing 1 MiB frame would print megabytes.
    assert!(back == msg, "sent {} bytes, got back {} bytes that differ", msg.len(), back.len());
}

/// The next data or close frame, skipping pings and pongs.
pub async fn next_data(ws: &mut Client) -> Option<Message> {
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(msg) => return Some(msg),
            Err(_) => return None,
        }
    }
    None
}

/// Runs a test body against both stores.
#[macro_export]
macro_rules! on_both_stores {
    ($name:ident, $body:path) => {
        mod $name {
            use super::*;
            #[tokio::test]
            async fn redis() {
                $body($crate::helpers::Store::Redis).await;
            }
            #[tokio::test]
            async fn memory() {
                $body($crate::helpers::Store::Memory).await;
            }
        }
    };
}

/// The broker binary as a process of its own, for what only a real process shows: being
/// killed without any chance to clean up.
pub struct BrokerProcess {
    pub addr: String,
    child: Child,
    /// Everything the process printed on stdout (its logs), line by line.
    pub output: Arc<Mutex<Vec<String>>>,
}

impl BrokerProcess {
    pub fn spawn(
        redis_url: &str,
        key_prefix: &str,
        agent_dir: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Self {
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_session-broker"))
            .arg("serve")
            .env_clear()
            .env("BROKER__LISTEN", format!("127.0.0.1:{port}"))
            .env("BROKER__REDIS__URL", redis_url)
            .env("BROKER__REDIS__KEY_PREFIX", key_prefix)
            .env("BROKER__TOKEN__SIGNING_KEY_ID", "k1")
            .env("BROKER__TOKEN__KEYS__K1", SIGNING_KEY)
            .env("BROKER__AGENTS__DIR", agent_dir)
            .env(format!("BROKER__ORGS__{ORG}__PUBLIC_KEY_HASHES"), hex::encode(hash_api_key(KEY)))
            .env("BROKER__WORKERS", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the broker binary runs");
        let output: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines.by_ref().map_while(Result::ok).any(|line| {
            output.lock().unwrap().push(line.clone());
            line.contains("session broker ready")
        });
        assert!(ready, "the broker process exited before it was ready");
        let sink = output.clone();
        std::thread::spawn(move || {
            lines.map_while(Result::ok).for_each(|line| sink.lock().unwrap().push(line))
        });
        Self { addr: format!("127.0.0.1:{port}"), child, output }
    }

    /// Sends SIGTERM, as an orchestrator does to stop a replica.
    pub fn terminate(&self) {
        // SAFETY: kill(2) with our own child's pid and a valid signal number.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) }, 0);
    }

    /// Waits (polling, for at most `within`) for the process to exit; returns its exit code.
    pub fn exit_code(&mut self, within: std::time::Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the broker did not exit within {within:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self, agent: &str, org: &str) -> String {
        format!("ws://{}/ws/generic/{agent}.{org}", self.addr)
    }

    /// SIGKILL: the process gets no chance to end its sessions or release anything.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Awaits a condition the test cannot be notified of, probing every 20 ms for at most `within`.
pub async fn eventually<T, F: Future<Output = Option<T>>>(
    within: std::time::Duration,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "condition not reached within {within:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
