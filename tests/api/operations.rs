//! What operators rely on: readiness, metrics, request ids, logs without secrets, and a drain
//! on SIGTERM that lets live calls finish.

use std::time::Duration;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

async fn metrics(app: &TestApp) -> String {
    let resp = app.http.get(format!("http://{}/metrics", app.internal)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    resp.text().await.unwrap()
}

/// The value of one sample line, `name{labels} value`.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

#[tokio::test]
async fn metrics_count_what_happens() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::binary(vec![1u8; 160])).await;
    assert!(connect(&ws_url, Some((&token, Via::Path))).await.is_err());
    assert!(connect(&ws_url, Some(("garbage", Via::Path))).await.is_err());

    let live = metrics(&app).await;
    let agent = format!("{TOKEN_AGENT}.{ORG}");
    assert_eq!(sample(&live, &format!("broker_tokens_minted_total{{agent=\"{agent}\"}}")), 1.0);
    assert_eq!(sample(&live, &format!("broker_connects_accepted_total{{agent=\"{agent}\"}}")), 1.0);
    assert_eq!(sample(&live, &format!("broker_active_sessions{{agent=\"{agent}\"}}")), 1.0);
    assert_eq!(sample(&live, "broker_refusals_total{reason=\"token_already_used\"}"), 1.0);
    assert_eq!(sample(&live, "broker_refusals_total{reason=\"token_malformed\"}"), 1.0);
    assert_eq!(sample(&live, "broker_relay_frames_total{direction=\"client_to_bot\"}"), 1.0);
    assert_eq!(sample(&live, "broker_relay_bytes_total{direction=\"bot_to_client\"}"), 160.0);
    assert_eq!(sample(&live, "broker_bot_dial_seconds_count{outcome=\"connected\"}"), 1.0);
    assert_eq!(sample(&live, "broker_token_consume_seconds_count{outcome=\"consumed\"}"), 1.0);
    assert_eq!(sample(&live, "broker_token_consume_seconds_count{outcome=\"already_used\"}"), 1.0);
    assert_eq!(sample(&live, "broker_redis_errors_total"), 0.0);

    ws.close(None).await.unwrap();
    let after = eventually(Duration::from_secs(2), || async {
        let text = metrics(&app).await;
        (sample(&text, &format!("broker_active_sessions{{agent=\"{agent}\"}}")) == 0.0)
            .then_some(text)
    })
    .await;
    assert_eq!(sample(&after, "broker_sessions_ended_total{reason=\"client_closed\"}"), 1.0);
}

/// A bot named by host name, as in `url_template = "ws://{agent}.{org}.bots.internal/ws"`: its
/// name is looked up once for many sessions, not on every connect.
#[tokio::test]
async fn a_bot_s_host_name_is_not_looked_up_on_every_connect() {
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(None, &bot);
    options.bot_url = bot.url().replace("127.0.0.1", "localhost");
    assert!(options.bot_url.starts_with("ws://localhost:"), "{}", options.bot_url);
    let app = TestApp::with(options, bot.clone()).await;
    for _ in 0..3 {
        let mut ws = connect(&app.ws_url(OPEN_AGENT, ORG), None).await.unwrap();
        assert_echo(&mut ws, Message::text("hi")).await;
    }
    let text = metrics(&app).await;
    assert_eq!(sample(&text, "broker_bot_dial_seconds_count{outcome=\"connected\"}"), 3.0);
    assert_eq!(sample(&text, "broker_bot_address_lookups_total{outcome=\"ok\"}"), 1.0);
}

#[tokio::test]
async fn readiness_follows_the_store_and_requests_carry_an_id() {
    let (app, redis) = TestApp::spawn(Store::Redis).await;
    let ready = app.http.get(format!("http://{}/readyz", app.internal)).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert!(ready.headers().contains_key("x-request-id"));
    redis.unwrap().stop();
    // Readiness answers are reused for READINESS_CACHE, so the 503 comes within that.
    let within = session_broker::state::READINESS_CACHE + Duration::from_secs(3);
    let body = eventually(within, || async {
        let resp = app.http.get(format!("http://{}/readyz", app.internal)).send().await.ok()?;
        (resp.status() == 503).then_some(resp.json::<serde_json::Value>().await.unwrap())
    })
    .await;
    assert_eq!(body["status"], "store_unreachable");
    // Liveness does not depend on Redis.
    let alive = app.http.get(format!("http://{}/healthz", app.internal)).send().await.unwrap();
    assert_eq!(alive.status(), 200);
    let errors = sample(&metrics(&app).await, "broker_redis_errors_total");
    assert!(errors >= 1.0, "failed store operations are counted: {errors}");
}

#[tokio::test]
async fn json_logs_carry_request_and_session_ids_and_never_a_token() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let agents = TestApp::with(AppOptions::new(Some(redis.url()), &bot), bot.clone()).await;
    let broker =
        BrokerProcess::spawn(&redis.url(), "logs", &agents, &[("BROKER__LOG__FORMAT", "json")])
            .await;
    let http = reqwest::Client::new();
    let resp = http
        .post(broker.http(&format!("/v1/public/{TOKEN_AGENT}/start")))
        .bearer_auth(KEY)
        .body("{}")
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = resp.json().await.unwrap();
    let (token, sid) = (body["token"].as_str().unwrap(), body["sessionId"].as_str().unwrap());
    let mut ws = connect(&broker.ws_url(TOKEN_AGENT, ORG), Some((token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("logged")).await;
    ws.close(None).await.unwrap();
    assert!(connect(&broker.ws_url(TOKEN_AGENT, ORG), Some((token, Via::Query))).await.is_err());
    // A spelling of the path that the router decodes the same way is logged the same way.
    let spelt = broker.ws_url(TOKEN_AGENT, ORG).replace("/generic/", "/gener%69c/");
    let replayed = connect(&spelt, Some((token, Via::Path))).await.unwrap_err();
    assert_eq!(replayed.0, 403, "the percent-encoded path is routed to the gate");

    broker.log_line(Duration::from_secs(5), &["session ended"]).await;
    let lines = broker.logs();
    for line in &lines {
        let json: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not a JSON log line: {line}"));
        assert!(json.get("timestamp").is_some() && json.get("level").is_some(), "{line}");
        assert!(
            !line.contains(token) && !line.contains(&token[20..60]),
            "a token was logged: {line}"
        );
        assert!(!line.contains(KEY), "a key was logged: {line}");
    }
    let connected = lines.iter().find(|l| l.contains("session connected")).expect("connect logged");
    assert!(connected.contains(sid) && connected.contains("request_id"), "{connected}");
}

/// Calls go on while nobody reads the broker's logs (a container runtime's log pipe holds
/// 64 KiB, and its reader can stall): the lines wait for the reader, and none is lost.
#[tokio::test]
async fn calls_go_on_while_the_logs_are_not_read() {
    /// Enough sessions for their log lines to fill a pipe several times over.
    const SESSIONS: usize = 400;
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let agents = TestApp::with(AppOptions::new(Some(redis.url()), &bot), bot.clone()).await;
    let broker = BrokerProcess::spawn(&redis.url(), "stalled", &agents, &[]).await;
    broker.stall_logs();
    let logged_before = broker.logs().len();
    for n in 0..SESSIONS {
        let session = async {
            let mut ws = connect(&broker.ws_url(OPEN_AGENT, ORG), None).await.unwrap();
            assert_echo(&mut ws, Message::text("hi")).await;
            ws.close(None).await.unwrap();
        };
        if tokio::time::timeout(Duration::from_secs(10), session).await.is_err() {
            panic!("session {n} stalled behind the unread logs");
        }
    }
    let stalled_bytes: usize = broker.logs()[logged_before..].iter().map(|l| l.len() + 1).sum();
    assert!(stalled_bytes < 64 * 1024, "the logs were not stalled: {stalled_bytes} bytes read");
    broker.resume_logs();
    let ended = eventually(Duration::from_secs(10), || async {
        let ended = broker.logs().iter().filter(|l| l.contains("session ended")).count();
        (ended == SESSIONS).then_some(ended)
    })
    .await;
    assert_eq!(ended, SESSIONS, "every session's end was logged");
    let text = reqwest::get(broker.internal_http("/metrics")).await.unwrap().text().await.unwrap();
    assert_eq!(sample(&text, "broker_log_lines_dropped_total"), 0.0);
}

#[tokio::test]
async fn sigterm_drains_live_sessions_then_exits_cleanly() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let agents = TestApp::with(AppOptions::new(Some(redis.url()), &bot), bot.clone()).await;
    let mut broker = BrokerProcess::spawn(
        &redis.url(),
        "drain",
        &agents,
        &[("BROKER__LIMITS__DRAIN_DEADLINE_SECS", "3")],
    )
    .await;
    let http = reqwest::Client::new();
    let ws_url = broker.ws_url(OPEN_AGENT, ORG);
    let mut live = connect(&ws_url, None).await.unwrap();
    assert_echo(&mut live, Message::text("before SIGTERM")).await;

    broker.terminate();
    let status = eventually(Duration::from_secs(2), || async {
        let resp = http.get(broker.internal_http("/readyz")).send().await.ok()?;
        (resp.status() == 503).then_some(resp.json::<serde_json::Value>().await.unwrap())
    })
    .await;
    assert_eq!(status["status"], "draining");
    match connect(&ws_url, None).await {
        Err((503, body, retry_after)) => {
            assert_eq!(body["code"], "503");
            assert!(retry_after.is_some());
        }
        other => panic!("a new upgrade while draining: {:?}", other.map(|_| "upgrade")),
    }
    // The live call goes on during the drain...
    assert_echo(&mut live, Message::text("during the drain")).await;
    live.send(Message::text("still talking")).await.unwrap();
    // ...until the deadline, when it is closed with 1001.
    let closed = loop {
        match next_data(&mut live).await {
            Some(Message::Text(_)) => continue,
            other => break other,
        }
    };
    match closed {
        Some(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
    assert_eq!(broker.exit_code(Duration::from_secs(10)).await, Some(0));
}

/// Metrics and probes answer on the internal listener only: the public one knows no such
/// routes, however the path is spelt, so no load balancer rule has to keep them in.
#[tokio::test]
async fn metrics_and_probes_are_internal_only() {
    let (app, _redis) = TestApp::spawn(Store::Memory).await;
    for path in
        ["/metrics", "/%6Detrics", "/healthz", "/readyz", "/%72eadyz", "//metrics", "/metrics/"]
    {
        let resp = app.http.get(format!("http://{}{path}", app.addr)).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{path} on the public listener");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["code"], "404", "{path}");
    }
    for path in ["/metrics", "/healthz", "/readyz"] {
        let resp = app.http.get(format!("http://{}{path}", app.internal)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path} on the internal listener");
    }
    let resp = app.http.post(format!("http://{}/v1/public/x/start", app.internal)).send();
    assert_eq!(resp.await.unwrap().status(), 404, "the internal listener serves no session API");
}
