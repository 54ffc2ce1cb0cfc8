//! `POST /v1/public/{agent}/start` and the service readiness endpoint.

use base64::{Engine, engine::general_purpose::STANDARD};
use serde_json::{Value, json};

use crate::support::*;

async fn json_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(content_type, "application/json", "every answer is JSON (status {status})");
    (status, resp.json().await.unwrap())
}

/// Asserts the error shape every client renders, and returns its message.
fn assert_error(body: &Value, status: u16, code: &str) -> String {
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["code"], code, "{body}");
    let reason = body["reason"].as_str().expect("every error has a reason");
    assert!(!reason.is_empty() && reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
    let message = body["error"].as_str().expect("error is a string").to_owned();
    assert!(!message.is_empty());
    assert_eq!(body["message"], message.as_str());
    assert_eq!(body["detail"], message.as_str());
    message
}

#[tokio::test]
async fn start_mints_a_token_for_the_agent_websocket() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let (status, body) =
        json_of(app.post_start(TOKEN_AGENT, Some(KEY), r#"{"transport":"websocket"}"#).await).await;
    assert_eq!(status, 200);
    let token = body["token"].as_str().unwrap();
    assert!(token.starts_with("eyJzaCI6"), "token payload starts with the sh claim: {token}");
    assert_eq!(body["wsUrl"], app.ws_url(TOKEN_AGENT, ORG));
    let sid = body["sessionId"].as_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(sid).unwrap().get_version_num(), 4);
    assert!(body.get("body").is_none(), "no body sent, none returned");
    assert_eq!(app.bot.connections(), 0, "/start must not contact the bot");
}

#[tokio::test]
async fn start_accepts_what_the_python_sdk_sends() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    // The SDK sends no transport and may send the Daily fields; unknown fields are ignored.
    let sdk = json!({
        "createDailyRoom": false,
        "dailyRoomProperties": {"start_video_off": true},
        "dailyMeetingTokenProperties": {},
        "enableDefaultIceServers": true,
        "somethingNew": [1, 2, 3],
        "body": {"caller": "+15551234567", "lang": "en"}
    });
    let (status, body) =
        json_of(app.post_start(TOKEN_AGENT, Some(KEY), &sdk.to_string()).await).await;
    assert_eq!(status, 200, "{body}");
    let decoded = STANDARD.decode(body["body"].as_str().unwrap()).unwrap();
    let round_trip: Value = serde_json::from_slice(&decoded).unwrap();
    assert_eq!(round_trip, sdk["body"]);

    for empty in ["{}", ""] {
        let (status, _) = json_of(app.post_start(TOKEN_AGENT, Some(KEY), empty).await).await;
        assert_eq!(status, 200, "body {empty:?}");
    }
}

#[tokio::test]
async fn agents_without_websocket_auth_get_no_token() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let (status, body) = json_of(app.post_start(OPEN_AGENT, Some(KEY), "{}").await).await;
    assert_eq!(status, 200);
    assert!(body.get("token").is_none(), "{body}");
    assert_eq!(body["wsUrl"], app.ws_url(OPEN_AGENT, ORG));
}

#[tokio::test]
async fn key_problems_are_401() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let cases = [
        (None, TOKEN_AGENT, "missing", "api_key_missing"),
        (Some("sk_not_a_public_key"), TOKEN_AGENT, "malformed", "api_key_malformed"),
        (Some("pk_unknown"), TOKEN_AGENT, "unknown", "api_key_unknown"),
        (Some(OTHER_KEY), TOKEN_AGENT, "another organization", "api_key_other_org"),
        (Some(KEY), OTHER_ORG_AGENT, "another organization", "api_key_other_org"),
    ];
    for (key, agent, expected, reason) in cases {
        let (status, body) = json_of(app.post_start(agent, key, "{}").await).await;
        assert_eq!(status, 401, "{key:?} on {agent}");
        let message = assert_error(&body, 401, "401");
        assert!(message.contains(expected), "{key:?}: {message}");
        assert_eq!(body["reason"], reason, "{key:?} on {agent}");
    }
    // Basic auth is not a bearer key.
    let resp = app
        .http
        .post(format!("http://{}/v1/public/{TOKEN_AGENT}/start", app.addr))
        .basic_auth("user", Some(KEY))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn unknown_agent_is_404() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let (status, body) = json_of(app.post_start("no-such-agent", Some(KEY), "{}").await).await;
    assert_eq!(status, 404);
    assert_error(&body, 404, "404");
}

#[tokio::test]
async fn bad_requests_are_400() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let cases = [
        (TOKEN_AGENT, "{not json"),
        (TOKEN_AGENT, "[]"),
        (TOKEN_AGENT, r#"{"transport": 5}"#),
        (TOKEN_AGENT, r#"{"transport": "carrier-pigeon"}"#),
        (TOKEN_AGENT, r#"{"body": "not an object"}"#),
        (TOKEN_AGENT, r#"{"createDailyRoom": "yes"}"#),
        (TOKEN_AGENT, r#"{"dailyRoomProperties": 1}"#),
        (TOKEN_AGENT, r#"{"enableDefaultIceServers": "true"}"#),
        // A transport this agent does not serve.
        (TOKEN_AGENT, r#"{"transport": "daily"}"#),
        (TOKEN_AGENT, r#"{"transport": "webrtc"}"#),
        // Without a token there is nothing to carry the body to the bot.
        (OPEN_AGENT, r#"{"transport": "websocket", "body": {"a": 1}}"#),
    ];
    for (agent, request) in cases {
        let (status, body) = json_of(app.post_start(agent, Some(KEY), request).await).await;
        assert_eq!(status, 400, "{request}: {body}");
        assert_error(&body, 400, "400");
    }
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let just_fits = json!({"transport": "websocket", "body": {"x": "a".repeat(4096 - 8)}});
    let resp = app.post_start(TOKEN_AGENT, Some(KEY), &just_fits.to_string()).await;
    assert_eq!(resp.status(), 200, "a body of exactly 4096 bytes of JSON fits");

    let too_big = json!({"transport": "websocket", "body": {"x": "a".repeat(4096)}});
    let (status, body) =
        json_of(app.post_start(TOKEN_AGENT, Some(KEY), &too_big.to_string()).await).await;
    assert_eq!(status, 413);
    assert_error(&body, 413, "413");

    let huge = json!({"padding": "a".repeat(1024 * 1024)});
    let (status, body) =
        json_of(app.post_start(TOKEN_AGENT, Some(KEY), &huge.to_string()).await).await;
    assert_eq!(status, 413);
    assert_error(&body, 413, "413");
}

#[tokio::test]
async fn rate_limit_per_key_is_429() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(Some(redis.url()), &bot);
    options.settings.limits.start_rate_per_key = 3;
    options.settings.limits.start_rate_window = std::time::Duration::from_secs(3600);
    let app = TestApp::with(options, bot).await;
    for _ in 0..3 {
        assert_eq!(app.post_start(TOKEN_AGENT, Some(KEY), "{}").await.status(), 200);
    }
    let (status, body) = json_of(app.post_start(TOKEN_AGENT, Some(KEY), "{}").await).await;
    assert_eq!(status, 429);
    assert_error(&body, 429, "429");
    // Another key has its own budget.
    let (status, _) = json_of(app.post_start(OTHER_ORG_AGENT, Some(OTHER_KEY), "{}").await).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn store_unreachable_is_503() {
    let (app, redis) = TestApp::spawn(Store::Redis).await;
    assert_eq!(app.post_start(TOKEN_AGENT, Some(KEY), "{}").await.status(), 200);
    redis.unwrap().stop();
    let resp = app.post_start(TOKEN_AGENT, Some(KEY), "{}").await;
    assert!(resp.headers().contains_key("retry-after"));
    let (status, body) = json_of(resp).await;
    assert_eq!(status, 503);
    assert_error(&body, 503, "503");
}

#[tokio::test]
async fn service_readiness_for_the_cli() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let url = |org: &str, agent: &str| {
        format!("http://{}/v1/organizations/{org}/services/{agent}", app.addr)
    };
    let token = app.private_token(ORG).await;
    let get = |org: &str, agent: &str, token: &str| {
        app.http.get(url(org, agent)).bearer_auth(token.to_owned()).send()
    };
    let (status, body) = json_of(get(ORG, TOKEN_AGENT, &token).await.unwrap()).await;
    assert_eq!((status, &body["body"]["ready"]), (200, &json!(true)), "{body}");
    let (status, _) = json_of(get(ORG, "missing", &token).await.unwrap()).await;
    assert_eq!(status, 404);
    // A private route: no token, a public key or an unknown token is 401, another org's 403.
    let (status, body) = json_of(app.http.get(url(ORG, TOKEN_AGENT)).send().await.unwrap()).await;
    assert_eq!((status, &body["code"]), (401, &json!("401")));
    for wrong in [KEY, "pcc_pat_unknown"] {
        let (status, _) = json_of(get(ORG, TOKEN_AGENT, wrong).await.unwrap()).await;
        assert_eq!(status, 401, "{wrong}");
    }
    let (status, body) = json_of(get(OTHER_ORG, OTHER_ORG_AGENT, &token).await.unwrap()).await;
    assert_eq!((status, &body["code"]), (403, &json!("403")));
}

/// An agent of the broker's files shows back, through the private API, what its deploy file
/// holds for Pipecat Cloud and the broker does not use, as a deployed agent does.
#[tokio::test]
async fn a_file_agent_shows_its_deploy_file_back() {
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(None, &bot);
    let text = "agent_name = \"profiled\"\nimage = \"reg/profiled:2\"\nsecret_set = \"s\"\n\
                agent_profile = \"agent-2x\"\n\n[scaling]\nmin_agents = 2\nmax_agents = 7\n";
    options.extra_agents.push((format!("{ORG}/profiled"), text.into()));
    let app = TestApp::with(options, bot).await;
    let token = app.private_token(ORG).await;
    let url = format!("http://{}/v1/organizations/{ORG}/services/profiled", app.addr);
    let (status, body) = json_of(app.http.get(url).bearer_auth(token).send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let body = &body["body"];
    assert_eq!(body["deployment"]["manifest"]["spec"]["image"], "reg/profiled:2", "{body}");
    assert_eq!(body["agentProfile"], "agent-2x");
    assert_eq!(body["autoScaling"], json!({"minReplicas": 2, "maxReplicas": 7}));
    assert_eq!(body["deployFile"], text);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let (app, _redis) = TestApp::spawn(Store::Memory).await;
    let (status, body) =
        json_of(app.http.get(format!("http://{}/nope", app.addr)).send().await.unwrap()).await;
    assert_eq!(status, 404);
    assert_error(&body, 404, "404");
    let get_start = app.http.get(format!("http://{}/v1/public/{TOKEN_AGENT}/start", app.addr));
    let (status, body) = json_of(get_start.send().await.unwrap()).await;
    assert_eq!(status, 405);
    assert_error(&body, 405, "405");
}

/// Pipecat Cloud's Session API (`…/sessions/{id}/{path}`, proxied to the session's bot, also
/// where SmallWebRTC posts its offer) is not this broker's: a clear JSON refusal, not a 404 that
/// reads as "no such session".
#[tokio::test]
async fn the_session_api_proxy_is_refused_as_not_served() {
    let (app, _redis) = TestApp::spawn(Store::Memory).await;
    let (_, _, sid) = app.start_session(TOKEN_AGENT).await;
    let base = format!("http://{}/v1/public/{TOKEN_AGENT}/sessions/{sid}", app.addr);
    for request in [
        app.http.get(format!("{base}/status")),
        app.http.post(format!("{base}/api/offer")).body(r#"{"sdp": "v=0", "type": "offer"}"#),
        app.http.delete(format!("{base}/a/b")),
    ] {
        let resp = request.bearer_auth(KEY).send().await.unwrap();
        let (status, body) = json_of(resp).await;
        assert_eq!(status, 501, "{body}");
        assert_error(&body, 501, "501");
        assert_eq!(body["reason"], "not_served");
        assert!(body["error"].as_str().unwrap().contains("Session API"), "{body}");
    }
    // The session itself is still there to read.
    let resp = app.http.get(&base).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}
