//! What a stranger on the internet controls, and the limits on each: no demo unless asked,
//! forwarded addresses believed only from trusted proxies, rate limits per client address,
//! per-replica caps, slow and oversized requests, and Redis memory.

use std::{
    io::{Read, Write},
    time::Duration,
};

use session_broker::{
    config::{EvictionCheck, Settings},
    startup::Application,
    store::{
        AbandonRequest, Connected, EndReason, EventLog, Listing, MintRequest, Minted, OpenRequest,
        SessionRecord, SessionStore, Status, TokenUse,
    },
};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
use uuid::Uuid;

use crate::support::*;

async fn app_with(
    redis: &RedisServer,
    bot: &TestBot,
    change: impl FnOnce(&mut Settings),
) -> TestApp {
    let mut options = AppOptions::new(Some(redis.url()), bot);
    change(&mut options.settings);
    TestApp::with(options, bot.clone()).await
}

#[tokio::test]
async fn without_the_opt_in_there_is_no_demo() {
    let settings = Settings {
        listen: "127.0.0.1:0".into(),
        internal_listen: "127.0.0.1:0".into(),
        ..Settings::default()
    };
    let app = Application::build(settings).await.unwrap();
    let port = app.port();
    let handle = app.handle();
    tokio::spawn(app.run_until_stopped());
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/v1/public/echo/start"))
        .bearer_auth("pk_demo")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "pk_demo opens nothing without --demo");
    handle.stop(false).await;
}

#[tokio::test]
async fn a_stranger_s_forwarded_for_never_reaches_the_bot() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    for (trusted, expected) in
        [(vec![], "127.0.0.1"), (vec!["127.0.0.1".into()], "6.6.6.6, 127.0.0.1")]
    {
        let app = app_with(&redis, &bot, |s| s.trusted_proxies = trusted).await;
        let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
        let mut request = format!("{ws_url}/{token}").into_client_request().unwrap();
        request.headers_mut().insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
        let mut ws = connect_request(request).await.unwrap();
        assert_echo(&mut ws, Message::text("hi")).await;
        let seen =
            bot.handshakes.lock().unwrap().last().unwrap().headers["x-forwarded-for"].clone();
        assert_eq!(seen, expected);
    }
}

#[tokio::test]
async fn the_per_address_rate_holds_across_replicas() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut apps = Vec::new();
    for _ in 0..2 {
        let mut options = AppOptions::new(Some(redis.url()), &bot);
        options.key_prefix = "shared".into();
        options.settings.limits.start_rate_per_address = 3;
        apps.push(TestApp::with(options, bot.clone()).await);
    }
    // Two keys of two orgs, one address: the address's budget is what runs out.
    let calls = [
        (&apps[0], TOKEN_AGENT, KEY),
        (&apps[1], OTHER_ORG_AGENT, OTHER_KEY),
        (&apps[0], TOKEN_AGENT, KEY),
    ];
    for (app, agent, key) in calls {
        assert_eq!(app.post_start(agent, Some(key), "{}").await.status(), 200);
    }
    let refused = apps[1].post_start(OTHER_ORG_AGENT, Some(OTHER_KEY), "{}").await;
    assert_eq!(refused.status(), 429);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "429");
}

#[tokio::test]
async fn a_replica_at_its_session_limit_answers_503_and_spends_no_token() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let app = app_with(&redis, &bot, |s| s.limits.max_live_sessions = 1).await;
    let (first, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    let mut held = connect(&ws_url, Some((&first, Via::Path))).await.unwrap();
    assert_echo(&mut held, Message::text("one")).await;
    let (second, _, _) = app.start_session(TOKEN_AGENT).await;
    let refused = connect(&ws_url, Some((&second, Via::Path))).await.unwrap_err();
    assert_eq!(refused.0, 503);
    assert_eq!(refused.2.as_deref(), Some("1"), "Retry-After");
    held.close(None).await.unwrap();
    drop(held);
    let mut later = eventually(Duration::from_secs(5), || async {
        connect(&ws_url, Some((&second, Via::Path))).await.ok()
    })
    .await;
    assert_echo(&mut later, Message::text("two")).await;
}

#[tokio::test]
async fn a_replica_past_its_connection_limit_answers_503() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let app = app_with(&redis, &bot, |s| s.limits.max_connections = 1).await;
    let idle = std::net::TcpStream::connect(&app.addr).unwrap();
    let resp = eventually(Duration::from_secs(5), || async {
        let resp = reqwest::Client::new()
            .post(format!("http://{}/v1/public/{TOKEN_AGENT}/start", app.addr))
            .bearer_auth(KEY)
            .body("{}")
            .send()
            .await
            .ok()?;
        (resp.status() == 503).then_some(resp)
    })
    .await;
    assert_eq!(resp.headers()["retry-after"], "1");
    drop(idle);
    let fine = eventually(Duration::from_secs(5), || async {
        let resp = app.post_start(TOKEN_AGENT, Some(KEY), "{}").await;
        (resp.status() == 200).then_some(())
    });
    fine.await;
}

#[tokio::test]
async fn a_trickled_start_body_gets_408() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let app =
        app_with(&redis, &bot, |s| s.limits.start_body_timeout = Duration::from_millis(300)).await;
    let answer = tokio::task::spawn_blocking({
        let addr = app.addr.clone();
        move || {
            let mut stream = std::net::TcpStream::connect(&addr).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(
                stream,
                "POST /v1/public/{TOKEN_AGENT}/start HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"bo"
            )
            .unwrap();
            let mut answer = vec![0; 2048];
            let n = stream.read(&mut answer).unwrap();
            String::from_utf8_lossy(&answer[..n]).into_owned()
        }
    });
    let answer = answer.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"408\""), "a JSON error: {answer}");
}

#[tokio::test]
async fn an_oversized_query_is_refused_before_it_is_read() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let app = app_with(&redis, &bot, |_| {}).await;
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    let body = "A".repeat(9 * 1024);
    let refused = connect(&format!("{ws_url}?body={body}&token={token}"), None).await.unwrap_err();
    assert_eq!(refused.0, 414);
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("the token was not spent")).await;
}

#[tokio::test]
async fn agents_without_a_cap_get_the_default_one() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let app = app_with(&redis, &bot, |s| s.agents.default_max_agents = 1).await;
    let mut held = connect(&app.ws_url(OPEN_AGENT, ORG), None).await.unwrap();
    assert_echo(&mut held, Message::text("one")).await;
    let refused = connect(&app.ws_url(OPEN_AGENT, ORG), None).await.unwrap_err();
    assert_eq!(refused.0, 429, "open agents are capped by default too");
}

#[tokio::test]
async fn pending_records_and_consume_marks_live_as_long_as_their_token() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(Some(redis.url()), &bot);
    options.key_prefix = "ttl".into();
    let app = TestApp::with(options, bot.clone()).await;
    let (token, ws_url, sid) = app.start_session(TOKEN_AGENT).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let pttl = |key: String| {
        let mut conn = conn.clone();
        async move { redis::cmd("PTTL").arg(key).query_async::<i64>(&mut conn).await.unwrap() }
    };
    let lifetime_and_skew = (300 + 30) * 1000;
    let tag = format!("ttl:agent:{{{TOKEN_AGENT}.{ORG}}}");
    let record = pttl(format!("{tag}:session:{sid}")).await;
    assert!(record > 0 && record <= lifetime_and_skew, "pending record ttl {record}");
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("hi")).await;
    let mark = pttl(format!("{tag}:token:{sid}")).await;
    assert!(mark > 300_000 && mark <= lifetime_and_skew, "the mark outlives the token: {mark}");
}

#[tokio::test]
async fn a_terminated_session_s_token_is_never_given_back() {
    let redis = RedisServer::start();
    let store = redis.store().await;
    let sid = Uuid::new_v4();
    let record = SessionRecord::pending("a.o", 0, u64::MAX / 2, "r");
    let listing = Listing { agent: "a.o", created_ms: 0, retention: Duration::from_secs(60) };
    let minted = store
        .mint_session(&MintRequest {
            agent: "a.o",
            sid,
            cap: 5,
            rates: &[],
            rate_window: Duration::from_secs(60),
            record: Some((&record, Duration::from_secs(60), listing)),
        })
        .await
        .unwrap();
    let Minted::Ok { fence: Some(fence) } = minted else { panic!("not minted: {minted:?}") };
    // A connect holds the token while it dials; meanwhile DELETE ends the session.
    let active = SessionRecord { status: Some(Status::Active), ..SessionRecord::default() };
    let events = EventLog { cap: 10, retention: Duration::from_secs(60) };
    let open = |holder| OpenRequest {
        agent: "a.o",
        sid,
        token: Some(TokenUse {
            fence: &fence,
            holder,
            mark_ttl: Duration::from_secs(60),
            want_body: false,
        }),
        cap: 5,
        lease: Duration::from_secs(60),
        active: &active,
        record_ttl: Duration::from_secs(60),
        listing: None,
    };
    let connected = store.open_session(&open("connect")).await.unwrap();
    assert_eq!(connected, Connected::Ok { body: None });
    let ended = SessionRecord { status: Some(Status::Ended), ..SessionRecord::default() };
    let live = [Some(Status::Pending), Some(Status::Active)];
    assert!(store.update_session("a.o", sid, &live, &ended, None).await.unwrap());
    assert!(!store.consume_token("a.o", sid, "terminated", Duration::from_secs(60)).await.unwrap());
    // The dial fails: the connect would give the token back, which would undo the DELETE.
    let abandon = AbandonRequest {
        agent: "a.o",
        sid,
        holder: Some("connect"),
        token: true,
        why: Some(EndReason::BotUnreachable),
        record_ttl: Duration::from_secs(60),
        event: None,
        events,
    };
    assert!(!store.abandon_session(&abandon).await.unwrap());
    let record = store.get_session("a.o", sid).await.unwrap().unwrap();
    assert_eq!(record.status, Some(Status::Ended), "the DELETE stands");
    let replay = store.open_session(&open("replay")).await.unwrap();
    assert_eq!(replay, Connected::Replayed);
}

/// The soft open-file limit of a shell or a systemd unit (1024) would hold about 500 sessions:
/// the broker raises it to the hard limit, and says so when even that is below what its limits
/// allow for.
#[tokio::test]
async fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let agents = TestApp::with(AppOptions::new(Some(redis.url()), &bot), bot.clone()).await;
    // (soft, hard) of a process, from /proc.
    let max_open_files = |pid: &str| {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_owned();
        let values: Vec<String> =
            line.split_whitespace().skip(3).take(2).map(String::from).collect();
        (values[0].clone(), values[1].clone())
    };
    // As high as this process may set it.
    let hard = max_open_files("self").1;
    assert!(hard.parse::<u64>().unwrap() > 2048, "a hard limit of {hard} is too low to test");
    let roomy = format!("--nofile=512:{hard}");
    let broker =
        BrokerProcess::spawn_under(&["prlimit", &roomy], &redis.url(), "roomy", &agents, &[]).await;
    assert_eq!(max_open_files(&broker.pid().to_string()), (hard.clone(), hard.clone()));
    let raised = broker.log_line(Duration::from_secs(5), &["open-file limit raised"]).await;
    assert!(raised.contains("512") && raised.contains(&hard), "{raised}");

    let tight = ["prlimit", "--nofile=512:2048"];
    let broker = BrokerProcess::spawn_under(&tight, &redis.url(), "tight", &agents, &[]).await;
    assert_eq!(max_open_files(&broker.pid().to_string()), ("2048".into(), "2048".into()));
    let warned = broker.log_line(Duration::from_secs(5), &["open-file limit is below"]).await;
    assert!(warned.contains("WARN") && warned.contains("2048"), "{warned}");
}

#[tokio::test]
async fn a_redis_that_may_evict_is_refused_unless_accepted() {
    let redis = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let bot = TestBot::start().await;
    let error = TestApp::try_with(AppOptions::new(Some(redis.url()), &bot), bot.clone())
        .await
        .err()
        .expect("the broker refuses an evicting Redis");
    let message = format!("{error:#}");
    assert!(message.contains("allkeys-lru") && message.contains("noeviction"), "{message}");
    let mut options = AppOptions::new(Some(redis.url()), &bot);
    options.settings.redis.on_evicting_policy = EvictionCheck::Warn;
    let app = TestApp::with(options, bot.clone()).await;
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    assert!(connect(&ws_url, Some((&token, Via::Path))).await.is_ok());
}
