//! Pipecat's own clients, as they behave: the SDK's `/start` body appended verbatim as `?body=`,
//! a server client that leaves its public key in the header, the SDK's Daily flag, the
//! documented query form of the WebSocket URL, and a bot built on Pipecat Cloud's base image,
//! which reads the session id from `X-Daily-Session-Id` and the body from `?body=`.

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use serde_json::Value;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

use crate::support::*;

/// `/start` with `body`, as the SDK sends it; returns the answer.
async fn start_with_body(app: &TestApp, body_json: &str) -> Value {
    let resp = app.post_start(TOKEN_AGENT, Some(KEY), &format!(r#"{{"body":{body_json}}}"#)).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// What the bot got as `?body=`, decoded as Pipecat's base image does (`base64.b64decode`:
/// standard alphabet, padding required).
fn body_seen_by_bot(bot: &TestBot) -> Vec<u8> {
    let handshake = bot.handshakes.lock().unwrap().last().unwrap().clone();
    let url = url::Url::parse(&format!("ws://bot{}", handshake.uri)).unwrap();
    let sent = url.query_pairs().find(|(k, _)| k == "body").expect("a ?body=").1.into_owned();
    STANDARD.decode(sent).expect("standard padded base64")
}

#[tokio::test]
async fn the_body_reaches_the_bot_byte_for_byte_in_every_spelling() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    // Key order, spacing and number forms a re-serializer would change; `<b>` and `?` make the
    // standard base64 hold `+` and `/`.
    let json = r#"{"z": 1.0, "a": 1e3, "name": "<b>hi</b>???>>>"}"#;
    let standard = STANDARD.encode(json);
    assert!(standard.contains('+') && standard.contains('/'), "{standard}");
    let spellings = [
        standard.clone(),           // verbatim, as the documentation shows
        standard.replace('+', " "), // a query parser read `+` as a space
        standard.replace('+', "%2B").replace('/', "%2F").replace('=', "%3D"), // encoded
        URL_SAFE_NO_PAD.encode(json), // the other alphabet, unpadded
    ];
    for spelling in spellings {
        let minted = start_with_body(&app, json).await;
        assert_eq!(minted["body"], standard, "/start answers base64 of the exact bytes");
        let (token, ws_url) =
            (minted["token"].as_str().unwrap(), minted["wsUrl"].as_str().unwrap());
        let url = format!("{ws_url}/{token}?body={}", spelling.replace(' ', "%20"));
        let mut ws = connect(&url, None).await.unwrap_or_else(|e| panic!("{spelling}: {e:?}"));
        assert_echo(&mut ws, Message::text("hi")).await;
        assert_eq!(body_seen_by_bot(&app.bot), json.as_bytes(), "{spelling}");
    }
}

#[tokio::test]
async fn without_a_body_parameter_the_bot_still_gets_the_minted_body() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let json = r#"{"caller":"+15550001111","custom":{"lang":"en"}}"#;
    let minted = start_with_body(&app, json).await;
    let (token, ws_url) = (minted["token"].as_str().unwrap(), minted["wsUrl"].as_str().unwrap());
    // A telephony provider cannot add a query string: the token is the last path segment.
    let mut ws = connect(ws_url, Some((token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("hi")).await;
    assert_eq!(body_seen_by_bot(&app.bot), json.as_bytes());
}

#[tokio::test]
async fn another_body_than_the_minted_one_is_refused_before_anything_is_spent() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let minted = start_with_body(&app, r#"{"role":"user"}"#).await;
    let (token, ws_url) = (minted["token"].as_str().unwrap(), minted["wsUrl"].as_str().unwrap());
    let forged = STANDARD.encode(r#"{"role":"admin"}"#);
    match connect(&format!("{ws_url}/{token}?body={forged}"), None).await {
        Err((403, body, _)) => assert_eq!(body["reason"], "body_mismatch"),
        other => panic!("expected 403 body_mismatch, got {:?}", other.map(|_| "upgrade")),
    }
    // A token minted without a body takes none either.
    let (bare, _, _) = app.start_session(TOKEN_AGENT).await;
    match connect(&format!("{ws_url}/{bare}?body={forged}"), None).await {
        Err((403, body, _)) => assert_eq!(body["reason"], "body_mismatch"),
        other => panic!("expected 403 body_mismatch, got {:?}", other.map(|_| "upgrade")),
    }
    assert_eq!(app.bot.connections(), 0, "no bot was touched");
    let mut ws = connect(ws_url, Some((token, Via::Path))).await.expect("the token is unspent");
    assert_echo(&mut ws, Message::text("hi")).await;
}

#[tokio::test]
async fn a_public_key_left_in_the_header_does_not_hide_the_token() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    for via in [Via::Query, Via::Path] {
        let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
        let url = match via {
            Via::Query => format!("{ws_url}?token={token}"),
            _ => format!("{ws_url}/{token}"),
        };
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert("authorization", format!("Bearer {KEY}").parse().unwrap());
        let mut ws = connect_request(request).await.unwrap();
        assert_echo(&mut ws, Message::text("hi")).await;
    }
}

#[tokio::test]
async fn daily_rooms_are_refused_like_any_transport_not_served() {
    let (app, _redis) = TestApp::spawn(Store::Memory).await;
    for body in [r#"{"createDailyRoom": true}"#, r#"{"transport": "daily"}"#] {
        let resp = app.post_start(TOKEN_AGENT, Some(KEY), body).await;
        assert_eq!(resp.status(), 400, "{body}");
        let json: Value = resp.json().await.unwrap();
        assert_eq!(json["code"], "400");
    }
    let fine = app.post_start(TOKEN_AGENT, Some(KEY), r#"{"createDailyRoom": false}"#).await;
    assert_eq!(fine.status(), 200);
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_its_own_reason_and_retry_after() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(Some(redis.url()), &bot);
    options.settings.limits.start_rate_per_key = 1;
    let app = TestApp::with(options, bot).await;
    assert_eq!(app.post_start(TOKEN_AGENT, Some(KEY), "{}").await.status(), 200);
    let refused = app.post_start(TOKEN_AGENT, Some(KEY), "{}").await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        (body["code"].as_str(), body["reason"].as_str()),
        (Some("429"), Some("rate_limited"))
    );
}

#[tokio::test]
async fn the_query_form_of_the_url_works_like_the_path_form() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let (token, _, _) = app.start_session(TOKEN_AGENT).await;
    let url = format!("ws://{}/ws/generic?serviceHost={TOKEN_AGENT}.{ORG}&token={token}", app.addr);
    let mut ws = connect(&url, None).await.unwrap();
    assert_echo(&mut ws, Message::text("hi")).await;
    let replay = connect(&url, None).await.unwrap_err();
    assert_eq!((replay.0, replay.1["reason"].as_str()), (403, Some("token_already_used")));
    let nowhere = connect(&format!("ws://{}/ws/generic?token={token}", app.addr), None).await;
    assert_eq!(nowhere.unwrap_err().0, 404, "no service host, no agent");
}

/// A stand-in for a bot built `FROM dailyco/pipecat-base`: it reads exactly the session id
/// header and `?body=` that image reads.
#[tokio::test]
async fn a_base_image_bot_gets_its_session_id_and_body() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let minted = start_with_body(&app, r#"{"lang":"en"}"#).await;
    let (token, ws_url) = (minted["token"].as_str().unwrap(), minted["wsUrl"].as_str().unwrap());
    let mut ws = connect(ws_url, Some((token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("hi")).await;
    let handshake = app.bot.handshakes.lock().unwrap().last().unwrap().clone();
    assert_eq!(handshake.headers["x-daily-session-id"], minted["sessionId"].as_str().unwrap());
    assert_eq!(handshake.headers["x-pipecat-session-id"], minted["sessionId"].as_str().unwrap());
    let body: Value = serde_json::from_slice(&body_seen_by_bot(&app.bot)).unwrap();
    assert_eq!(body["lang"], "en");
}

/// A browser on an origin the org allows calls `/start` directly; any other origin gets no
/// CORS headers, and the WebSocket and other routes answer none.
#[tokio::test]
async fn browsers_of_allowed_origins_may_call_start() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(Some(redis.url()), &bot);
    let allowed = "https://app.example.com";
    options.settings.orgs.get_mut(ORG).unwrap().allowed_origins = vec![allowed.into()];
    let app = TestApp::with(options, bot).await;
    let url = format!("http://{}/v1/public/{TOKEN_AGENT}/start", app.addr);
    let preflight = |origin: &'static str| {
        app.http
            .request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type")
            .send()
    };
    let ok = preflight(allowed).await.unwrap();
    assert!(ok.status().is_success());
    assert_eq!(ok.headers()["access-control-allow-origin"], allowed);
    assert!(
        ok.headers()["access-control-allow-headers"].to_str().unwrap().contains("authorization")
    );
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());

    let start = |origin: &'static str, key: &'static str| {
        app.http.post(&url).header("origin", origin).bearer_auth(key).body("{}").send()
    };
    let minted = start(allowed, KEY).await.unwrap();
    assert_eq!(minted.status(), 200);
    assert_eq!(minted.headers()["access-control-allow-origin"], allowed);
    let refused = start(allowed, "pk_wrong").await.unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["access-control-allow-origin"], allowed, "errors are readable");
    let foreign = start("https://evil.example", KEY).await.unwrap();
    assert!(foreign.headers().get("access-control-allow-origin").is_none());
    // Another org's agent does not inherit this org's origins.
    let rival = app
        .http
        .request(
            reqwest::Method::OPTIONS,
            format!("http://{}/v1/public/{OTHER_ORG_AGENT}/start", app.addr),
        )
        .header("origin", allowed)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(rival.headers().get("access-control-allow-origin").is_none());
}
