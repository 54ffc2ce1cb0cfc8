//! TLS where traffic leaves the host: the broker on Redis servers that speak TLS only
//! (standalone, Sentinel, Cluster), and bots behind TLS (`wss://`), each with a throwaway CA
//! made by the test. Certificates that are not trusted stop the broker at start (Redis) or make
//! the bot unreachable (a connect), never a hang; bot URLs that could not be dialled are refused
//! when they come in.

use std::time::Duration;

use secrecy::SecretString;
use session_broker::{admin, agents::BotDefaults, config::Settings, store::memory::MemoryStore};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// Longer than a start-up takes, far shorter than a retry loop would run.
const FAILS_WITHIN: Duration = Duration::from_secs(10);

/// An app whose settings `tune` completes (Redis, TLS files), on `bot`.
async fn app_with(bot: &TestBot, tune: impl FnOnce(&mut Settings)) -> anyhow::Result<TestApp> {
    let mut options = AppOptions::new(None, bot);
    tune(&mut options.settings);
    TestApp::try_with(options, bot.clone()).await
}

/// Starting an app must fail, within [`FAILS_WITHIN`]; returns the whole error chain.
async fn start_fails(bot: &TestBot, tune: impl FnOnce(&mut Settings)) -> String {
    match tokio::time::timeout(FAILS_WITHIN, app_with(bot, tune)).await {
        Ok(Err(error)) => format!("{error:#}"),
        Ok(Ok(_)) => panic!("the app started"),
        Err(_) => panic!("start-up hung for {FAILS_WITHIN:?} instead of failing"),
    }
}

/// A session minted by `/start` and relayed to the bot.
async fn relays(app: &TestApp, text: &str) {
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text(text)).await;
}

fn on_standalone<'a>(redis: &'a RedisServer, ca: &'a TestCa) -> impl Fn(&mut Settings) + 'a {
    |s| {
        s.redis.url = Some(SecretString::from(redis.url()));
        s.redis.tls_ca_file = Some(ca.ca_file.clone());
    }
}

fn with_client_certificate(s: &mut Settings, ca: &TestCa) {
    s.redis.tls_client_cert_file = Some(ca.leaf.cert.clone());
    s.redis.tls_client_key_file = Some(ca.leaf.key.clone());
}

#[tokio::test]
async fn a_standalone_redis_over_tls_with_a_ca_bundle() {
    let ca = TestCa::new();
    let redis = RedisServer::start_tls(&ca, false);
    assert!(redis.url().starts_with("rediss://"));
    let bot = TestBot::start().await;
    let app = app_with(&bot, on_standalone(&redis, &ca)).await.unwrap();
    relays(&app, "through a rediss:// store").await;
}

#[tokio::test]
async fn a_redis_that_requires_a_client_certificate_gets_one() {
    let ca = TestCa::new();
    let redis = RedisServer::start_tls(&ca, true);
    let bot = TestBot::start().await;

    // Without one, the server refuses the handshake: the broker stops and says what to set.
    let refused = start_fails(&bot, on_standalone(&redis, &ca)).await;
    assert!(refused.contains("TLS with Redis failed"), "{refused}");
    assert!(refused.contains("redis.tls_client_cert_file"), "{refused}");

    let app = app_with(&bot, |s| {
        on_standalone(&redis, &ca)(s);
        with_client_certificate(s, &ca);
    })
    .await
    .unwrap();
    relays(&app, "with a client certificate").await;
}

#[tokio::test]
async fn a_redis_certificate_from_an_unknown_ca_stops_the_broker_at_start() {
    let ca = TestCa::new();
    let redis = RedisServer::start_tls(&ca, false);
    let bot = TestBot::start().await;
    another_ca_stops(&bot, on_standalone(&redis, &ca)).await;
    // Without a bundle, the system's roots do not vouch for a private CA either.
    let refused = start_fails(&bot, |s| {
        on_standalone(&redis, &ca)(s);
        s.redis.tls_ca_file = None;
    })
    .await;
    assert!(refused.contains("invalid peer certificate: UnknownIssuer"), "{refused}");
}

/// Another CA's bundle: the handshake fails, and start-up stops saying so.
async fn another_ca_stops(bot: &TestBot, on_redis: impl Fn(&mut Settings)) {
    let other = TestCa::new();
    let refused = start_fails(bot, |s| {
        on_redis(s);
        s.redis.tls_ca_file = Some(other.ca_file.clone());
    })
    .await;
    assert!(refused.contains("TLS with Redis failed"), "{refused}");
    assert!(refused.contains("invalid peer certificate"), "{refused}");
}

#[tokio::test]
async fn sentinels_master_and_replica_over_tls() {
    let ca = TestCa::new();
    let group = SentinelGroup::start_tls(&ca);
    let bot = TestBot::start().await;
    let on_sentinels = |s: &mut Settings| {
        s.redis.sentinels = group.sentinel_urls();
        s.redis.master_name = Some(MASTER_NAME.into());
        s.redis.tls_ca_file = Some(ca.ca_file.clone());
        with_client_certificate(s, &ca);
    };
    let app = app_with(&bot, on_sentinels).await.unwrap();
    relays(&app, "through sentinels over TLS").await;
    another_ca_stops(&bot, on_sentinels).await;
}

#[tokio::test]
async fn a_cluster_over_tls() {
    let ca = TestCa::new();
    let cluster = Cluster::start_tls(&ca);
    let bot = TestBot::start().await;
    let on_cluster = |s: &mut Settings| {
        s.redis.cluster_nodes = cluster.urls();
        s.redis.tls_ca_file = Some(ca.ca_file.clone());
    };
    let app = app_with(&bot, on_cluster).await.unwrap();
    // Sessions hash to every slot range: several sessions reach every node.
    for i in 0..6 {
        relays(&app, &format!("through a TLS cluster, session {i}")).await;
    }
    another_ca_stops(&bot, on_cluster).await;
}

#[tokio::test]
async fn a_wss_bot_is_relayed_byte_for_byte() {
    let ca = TestCa::new();
    let bot = TestBot::start_tls(ca.server_config()).await;
    assert!(bot.url().starts_with("wss://"));
    let app = app_with(&bot, |s| s.bots.tls_ca_file = Some(ca.ca_file.clone())).await.unwrap();
    let (token, ws_url, sid) = app.start_session(TOKEN_AGENT).await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("über TLS")).await;
    let every_byte: Vec<u8> = (0..60 * 1024).map(|i| (i % 256) as u8).collect();
    assert_echo(&mut ws, Message::binary(every_byte)).await;
    let handshakes = bot.handshakes.lock().unwrap().clone();
    assert_eq!(handshakes[0].headers["x-pipecat-session-id"], sid);
}

/// `deploy --bot-url wss://…`, with the registry on a Redis that speaks TLS too.
#[tokio::test]
async fn a_wss_bot_deployed_by_bot_url_on_a_rediss_registry() {
    let ca = TestCa::new();
    let redis = RedisServer::start_tls(&ca, false);
    let bot = TestBot::start_tls(ca.server_config()).await;
    let app = app_with(&bot, |s| {
        on_standalone(&redis, &ca)(s);
        s.bots.tls_ca_file = Some(ca.ca_file.clone());
    })
    .await
    .unwrap();
    let file = ca.dir().join("pcc-deploy.toml");
    std::fs::write(&file, "agent_name = \"secure\"\nimage = \"reg/secure:1\"\n").unwrap();
    let bot_url = vec![bot.url()];
    admin::deploy(&*app.store, ORG, &file, &bot_url, &BotDefaults::default()).await.unwrap();
    let mut ws = eventually(Duration::from_secs(3), || async {
        connect(&app.ws_url("secure", ORG), None).await.ok()
    })
    .await;
    assert_echo(&mut ws, Message::text("deployed to wss://")).await;
}

/// Refused like any bot that cannot be reached: 503, the token left usable, the reason recorded.
#[tokio::test]
async fn a_wss_bot_with_an_untrusted_certificate_is_unreachable() {
    let (ca, other) = (TestCa::new(), TestCa::new());
    let bot = TestBot::start_tls(ca.server_config()).await;
    let app = app_with(&bot, |s| s.bots.tls_ca_file = Some(other.ca_file.clone())).await.unwrap();
    let (token, ws_url, sid) = app.start_session(TOKEN_AGENT).await;
    for attempt in 1..=2 {
        match connect(&ws_url, Some((&token, Via::Path))).await {
            Err((503, body, retry_after)) => {
                assert_eq!(body["error"], "Bot unreachable, retry shortly");
                assert!(retry_after.is_some());
            }
            other => panic!("attempt {attempt}: expected 503, got {:?}", other.map(|_| "upgrade")),
        }
    }
    assert_eq!(bot.connections(), 2, "the broker reached the bot's port");
    assert!(bot.handshakes.lock().unwrap().is_empty(), "no WebSocket handshake over bad TLS");
    let (status, record) = app.session(reqwest::Method::GET, TOKEN_AGENT, &sid).await;
    assert_eq!((status, record["lastError"].as_str()), (200, Some("bot_unreachable")));
}

/// Wherever a bot URL comes in (settings, agent files, `deploy --bot-url`), one that could not
/// be dialled is refused there.
#[tokio::test]
async fn bot_urls_that_cannot_be_dialled_are_refused_when_they_come_in() {
    let bot = TestBot::start().await;
    let mut settings = AppOptions::new(None, &bot).settings;
    settings.bots.url_template = Some("wss://{agent}..bots.internal/ws".into());
    let error = settings.validate().unwrap_err().to_string();
    assert!(error.contains("bots.url_template") && error.contains("TLS certificate"), "{error}");

    let mut options = AppOptions::new(None, &bot);
    let legacy =
        format!("agent_name = \"old\"\n[broker]\norg = \"{ORG}\"\nbot_url = \"https://b/ws\"\n");
    options.extra_agents.push(("old".into(), legacy));
    let error = format!("{:#}", TestApp::try_with(options, bot.clone()).await.err().unwrap());
    assert!(error.contains("broker.bot_url") && error.contains("not a ws:// or wss://"), "{error}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pcc-deploy.toml");
    std::fs::write(&file, "agent_name = \"deployed\"\n").unwrap();
    let store = MemoryStore::default();
    for url in ["wss://-bot.internal/ws", "tcp://bot:7860"] {
        let given = vec![url.to_owned()];
        let error = admin::deploy(&store, ORG, &file, &given, &BotDefaults::default()).await;
        let error = error.unwrap_err().to_string();
        assert!(error.starts_with("--bot-url:") && error.contains(url), "{error}");
    }
}
