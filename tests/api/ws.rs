//! The WebSocket gate: token locations and their order, every refusal, one-time use under
//! contention, store and bot failures, and the relay. Gate tests run on Redis and in memory.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest, protocol::CloseFrame};
use uuid::Uuid;

use crate::{on_both_stores, support::*};

fn assert_refused(result: Result<Client, (u16, Value, Option<String>)>, status: u16, reason: &str) {
    match result {
        Ok(_) => panic!("expected {status} {reason}, got an upgrade"),
        Err((got, body, _)) => {
            assert_eq!(got, status, "{body}");
            assert_eq!(body["reason"], reason, "{body}");
            assert_eq!(body["code"], status.to_string());
        }
    }
}

async fn each_token_location_works(store: Store) {
    let (app, _redis) = TestApp::spawn(store).await;
    for via in [Via::Header, Via::Query, Via::Path] {
        let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
        let mut ws = connect(&ws_url, Some((&token, via)))
            .await
            .unwrap_or_else(|e| panic!("{via:?}: {e:?}"));
        assert_echo(&mut ws, Message::text(format!("hello via {via:?}"))).await;
        assert_echo(&mut ws, Message::binary(vec![0u8, 1, 2, 255])).await;
    }
    assert_eq!(app.bot.connections(), 3);
}
on_both_stores!(each_token_location_works_on, each_token_location_works);

async fn the_first_place_holding_a_token_decides(store: Store) {
    let (app, _redis) = TestApp::spawn(store).await;
    let garbage = "not-a-token";
    let ws_url = app.ws_url(TOKEN_AGENT, ORG);

    /// Whether each place holds a valid token, an invalid one or nothing; and whether the
    /// connect must be accepted.
    type Case = (Option<bool>, Option<bool>, Option<bool>, bool);
    let cases: [Case; 5] = [
        (Some(true), Some(false), Some(false), true),
        (Some(false), Some(true), Some(true), false),
        (None, Some(true), Some(false), true),
        (None, Some(false), Some(true), false),
        (None, None, Some(true), true),
    ];
    for (header, query, path, accepted) in cases {
        let (token, _, _) = app.start_session(TOKEN_AGENT).await;
        let pick = |valid: bool| if valid { token.as_str() } else { garbage };
        let mut url = ws_url.clone();
        if let Some(valid) = path {
            url = format!("{url}/{}", pick(valid));
        }
        if let Some(valid) = query {
            url = format!("{url}?token={}", pick(valid));
        }
        let mut request = url.into_client_request().unwrap();
        if let Some(valid) = header {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {}", pick(valid)).parse().unwrap());
        }
        let result = connect_request(request).await;
        let case = format!("header={header:?} query={query:?} path={path:?}");
        match (accepted, result) {
            (true, Ok(mut ws)) => assert_echo(&mut ws, Message::text("ok")).await,
            (false, Err((403, body, _))) => assert_eq!(body["reason"], "token_malformed", "{case}"),
            (_, other) => panic!("{case}: unexpected {:?}", other.map(|_| "upgrade")),
        }
    }
}
on_both_stores!(
    the_first_place_holding_a_token_decides_on,
    the_first_place_holding_a_token_decides
);

async fn every_bad_token_is_403_before_the_bot(store: Store) {
    let (app, _redis) = TestApp::spawn(store).await;
    let ws_url = app.ws_url(TOKEN_AGENT, ORG);
    let (good, _, _) = app.start_session(TOKEN_AGENT).await;
    let now = session_broker::store::unix_ms();
    let host = format!("{TOKEN_AGENT}.{ORG}");

    assert_refused(connect(&ws_url, None).await, 403, "token_missing");
    assert_refused(connect(&ws_url, Some(("", Via::Query))).await, 403, "token_missing");
    assert_refused(connect(&ws_url, Some(("abc.def", Via::Query))).await, 403, "token_malformed");
    let oversized = "A".repeat(5000) + "." + "B";
    assert_refused(connect(&ws_url, Some((&oversized, Via::Header))).await, 403, "token_malformed");

    let (payload, signature) = good.split_once('.').unwrap();
    let mut flipped = signature.to_owned().into_bytes();
    flipped[3] = if flipped[3] == b'A' { b'B' } else { b'A' };
    let tampered = format!("{payload}.{}", String::from_utf8(flipped).unwrap());
    assert_refused(
        connect(&ws_url, Some((&tampered, Via::Path))).await,
        403,
        "token_bad_signature",
    );

    let foreign_keys = std::collections::BTreeMap::from([(
        "k1".to_string(),
        secrecy::SecretString::from("a-completely-different-key-of-32+bytes"),
    )]);
    let foreign = session_broker::token::SigningKeys::new("k1", &foreign_keys).unwrap();
    let forged = foreign.mint(&host, Uuid::new_v4(), "local", now + 60_000, None, "");
    assert_refused(connect(&ws_url, Some((&forged, Via::Query))).await, 403, "token_bad_signature");

    let expired = test_keyring().mint(&host, Uuid::new_v4(), "local", now - 1, None, "");
    assert_refused(connect(&ws_url, Some((&expired, Via::Query))).await, 403, "token_expired");

    // A token is scoped to its agent and org.
    let (for_second, _, _) = app.start_session(SECOND_AGENT).await;
    assert_refused(
        connect(&ws_url, Some((&for_second, Via::Header))).await,
        403,
        "token_wrong_scope",
    );
    let other_org_url = app.ws_url(OTHER_ORG_AGENT, OTHER_ORG);
    assert_refused(
        connect(&other_org_url, Some((&good, Via::Header))).await,
        403,
        "token_wrong_scope",
    );
    // Same agent name in the service host, other org.
    let renamed = app.ws_url(TOKEN_AGENT, OTHER_ORG);
    assert!(connect(&renamed, Some((&good, Via::Header))).await.is_err());

    assert_eq!(app.bot.connections(), 0, "no refused connect may reach the bot");
    // None of the refusals spent the good token.
    let mut ws = connect(&ws_url, Some((&good, Via::Header))).await.unwrap();
    assert_echo(&mut ws, Message::text("still good")).await;
}
on_both_stores!(every_bad_token_is_403_before_the_bot_on, every_bad_token_is_403_before_the_bot);

async fn a_token_is_used_once(store: Store) {
    let (app, _redis) = TestApp::spawn(store).await;
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("first")).await;
    for via in [Via::Header, Via::Query, Via::Path] {
        assert_refused(connect(&ws_url, Some((&token, via))).await, 403, "token_already_used");
    }
    // Still refused after the first session ended.
    ws.close(None).await.unwrap();
    assert_refused(connect(&ws_url, Some((&token, Via::Path))).await, 403, "token_already_used");
    assert_eq!(app.bot.connections(), 1);
}
on_both_stores!(a_token_is_used_once_on, a_token_is_used_once);

async fn fifty_concurrent_connects_give_one_upgrade(store: Store) {
    let (app, _redis) = TestApp::spawn(store).await;
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    let attempts = (0..50).map(|i| {
        let (token, ws_url) = (token.clone(), ws_url.clone());
        let via = [Via::Header, Via::Query, Via::Path][i % 3];
        tokio::spawn(async move { connect(&ws_url, Some((&token, via))).await })
    });
    let mut upgrades = Vec::new();
    let mut replays = 0;
    for attempt in futures_util::future::join_all(attempts).await {
        match attempt.unwrap() {
            Ok(ws) => upgrades.push(ws),
            Err((403, body, _)) if body["reason"] == "token_already_used" => replays += 1,
            Err(other) => panic!("unexpected refusal {other:?}"),
        }
    }
    assert_eq!((upgrades.len(), replays), (1, 49));
    assert_echo(&mut upgrades[0], Message::text("the one")).await;
    assert_eq!(app.bot.connections(), 1);
}
on_both_stores!(
    fifty_concurrent_connects_give_one_upgrade_on,
    fifty_concurrent_connects_give_one_upgrade
);

async fn tokens_expire_after_their_lifetime(store: Store) {
    let redis = (store == Store::Redis).then(RedisServer::start);
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(redis.as_ref().map(RedisServer::url), &bot);
    options.settings.token.lifetime = Duration::from_secs(1);
    let app = TestApp::with(options, bot).await;
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    let (fresh, _, _) = app.start_session(TOKEN_AGENT).await;
    assert!(
        connect(&ws_url, Some((&fresh, Via::Query))).await.is_ok(),
        "valid within its lifetime"
    );
    // Time passing is what this tests: the token's lifetime (1 s) must run out.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_refused(connect(&ws_url, Some((&token, Via::Query))).await, 403, "token_expired");
    assert_eq!(app.bot.connections(), 1);
}
on_both_stores!(tokens_expire_after_their_lifetime_on, tokens_expire_after_their_lifetime);

async fn agents_without_auth_need_no_token(store: Store) {
    let (app, _redis) = TestApp::spawn(store).await;
    let mut ws = connect(&app.ws_url(OPEN_AGENT, ORG), None).await.unwrap();
    assert_echo(&mut ws, Message::text("open")).await;
}
on_both_stores!(agents_without_auth_need_no_token_on, agents_without_auth_need_no_token);

#[tokio::test]
async fn store_down_is_503_and_leaves_the_token_unused() {
    let (app, redis) = TestApp::spawn(Store::Redis).await;
    let redis = redis.unwrap();
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    redis.pause();
    match connect(&ws_url, Some((&token, Via::Path))).await {
        Err((503, body, retry_after)) => {
            assert_eq!(body["code"], "503");
            assert!(retry_after.is_some(), "503 carries Retry-After");
        }
        other => panic!("expected 503, got {:?}", other.map(|_| "upgrade")),
    }
    assert_eq!(app.bot.connections(), 0);
    // Redis answers again, with its data, and runs the connect's request that timed out: the
    // broker gives that consume back, and the token works. (Until the give-back lands, the
    // token reads as used.)
    redis.resume();
    let mut ws = eventually(Duration::from_secs(10), || async {
        match connect(&ws_url, Some((&token, Via::Path))).await {
            Ok(ws) => Some(ws),
            Err((503, _, _)) => None,
            Err((403, body, _)) if body["reason"] == "token_already_used" => None,
            Err(other) => panic!("after recovery: {other:?}"),
        }
    })
    .await;
    assert_echo(&mut ws, Message::text("recovered")).await;
}

async fn bot_down_is_503_and_the_token_stays_usable(store: Store) {
    let redis = (store == Store::Redis).then(RedisServer::start);
    // Reserve the bot's address, but start the bot only after the first attempt.
    let bot_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bot_addr = bot_listener.local_addr().unwrap();
    drop(bot_listener);
    let unused = TestBot::start().await;
    let mut options = AppOptions::new(redis.as_ref().map(RedisServer::url), &unused);
    options.bot_url = format!("ws://{bot_addr}/ws");
    let app = TestApp::with(options, unused).await;
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    match connect(&ws_url, Some((&token, Via::Path))).await {
        Err((503, body, _)) => assert_eq!(body["code"], "503"),
        other => panic!("expected 503, got {:?}", other.map(|_| "upgrade")),
    }
    let bot = TestBot::start_on(tokio::net::TcpListener::bind(bot_addr).await.unwrap());
    let mut ws = connect(&ws_url, Some((&token, Via::Path)))
        .await
        .expect("same token works once the bot is up");
    assert_echo(&mut ws, Message::text("late bot")).await;
    assert_eq!(bot.connections(), 1);
    assert_refused(connect(&ws_url, Some((&token, Via::Path))).await, 403, "token_already_used");
}
on_both_stores!(
    bot_down_is_503_and_the_token_stays_usable_on,
    bot_down_is_503_and_the_token_stays_usable
);

#[tokio::test]
async fn the_bot_learns_the_session_and_never_sees_the_token() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(Some(redis.url()), &bot);
    // The client's chain is passed on because the peer is a trusted proxy (a load balancer).
    options.settings.trusted_proxies = vec!["127.0.0.1".into()];
    let app = TestApp::with(options, bot).await;
    let start = app.post_start(TOKEN_AGENT, Some(KEY), r#"{"body":{"caller":"+15550001111"}}"#);
    let minted: serde_json::Value = start.await.json().await.unwrap();
    let (token, sid) = (minted["token"].as_str().unwrap(), minted["sessionId"].as_str().unwrap());
    let ws_url = minted["wsUrl"].as_str().unwrap();
    // The same body in the other alphabet, unpadded: the token's digest is of the bytes.
    let body = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        br#"{"caller":"+15550001111"}"#,
    );
    let url = format!("{ws_url}?token={token}&body={body}&secret=xyz");
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
    let mut ws = connect_request(request).await.unwrap();
    assert_echo(&mut ws, Message::text("hi")).await;

    let handshake = app.bot.handshakes.lock().unwrap()[0].clone();
    assert_eq!(handshake.headers["x-pipecat-session-id"], sid);
    assert_eq!(handshake.headers["x-pipecat-service-host"], format!("{TOKEN_AGENT}.{ORG}"));
    assert_eq!(handshake.headers["x-pipecat-region"], "local");
    assert_eq!(handshake.headers["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert!(
        !handshake.uri.contains(token) && !handshake.uri.contains("secret"),
        "{}",
        handshake.uri
    );
    assert!(handshake.headers.values().all(|v| !v.contains(token)));
    // The body reaches the bot as standard padded base64 of the same JSON.
    let url = url::Url::parse(&format!("ws://bot{}", handshake.uri)).unwrap();
    let sent: String = url.query_pairs().find(|(k, _)| k == "body").unwrap().1.into_owned();
    let decoded = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, sent).unwrap();
    assert_eq!(decoded, br#"{"caller":"+15550001111"}"#);
}

#[tokio::test]
async fn a_bad_body_parameter_is_400_and_spends_nothing() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    let request =
        format!("{ws_url}?token={token}&body=%%%not-base64").into_client_request().unwrap();
    match connect_request(request).await {
        Err((400, body, _)) => assert_eq!(body["code"], "400"),
        other => panic!("expected 400, got {:?}", other.map(|_| "upgrade")),
    }
    assert!(connect(&ws_url, Some((&token, Via::Query))).await.is_ok());
}

#[tokio::test]
async fn a_plain_get_does_not_spend_the_token() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    let http_url = ws_url.replacen("ws://", "http://", 1);
    let resp = app.http.get(format!("{http_url}/{token}")).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert!(connect(&ws_url, Some((&token, Via::Path))).await.is_ok());
}

#[tokio::test]
async fn close_codes_pass_through_both_ways() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;

    // Client closes: the bot receives the same code and reason.
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("hi")).await;
    ws.close(Some(CloseFrame { code: 4001.into(), reason: "caller hung up".into() }))
        .await
        .unwrap();
    while ws.next().await.is_some() {}
    let closes =
        eventually(Duration::from_secs(2), || async { app.bot.closes().first().cloned() }).await;
    assert_eq!(closes, ("4001".to_owned(), "caller hung up".to_owned()));

    // Bot closes: the client receives the same code and reason.
    let (token, ws_url, sid) = app.start_session(TOKEN_AGENT).await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    ws.send(Message::text("close 4002 bot is done")).await.unwrap();
    match next_data(&mut ws).await {
        Some(Message::Close(Some(frame))) => {
            assert_eq!(u16::from(frame.code), 4002);
            assert_eq!(frame.reason.as_str(), "bot is done");
        }
        other => panic!("expected the bot's close, got {other:?}"),
    }
    let reason = eventually(Duration::from_secs(2), || async {
        let (_, body) = app.session(reqwest::Method::GET, TOKEN_AGENT, &sid).await;
        (body["status"] == "ended").then(|| body["endReason"].clone())
    })
    .await;
    assert_eq!(reason, "bot_closed", "a close other than 1000 is the bot's, not a completion");
}

#[tokio::test]
async fn large_binary_frames_relay_unchanged() {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(Some(redis.url()), &bot);
    // Above the voice-sized default: the documented opt-in for bots that send large messages.
    options.settings.limits.max_frame_bytes = 1024 * 1024 + 64;
    let app = TestApp::with(options, bot).await;
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    let frame: Vec<u8> = (0..1024 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    assert_echo(&mut ws, Message::binary(frame)).await;
    for i in 0..100u8 {
        assert_echo(&mut ws, Message::binary(vec![i; 160])).await;
    }
}
