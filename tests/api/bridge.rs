//! The relay's limits: message size, backpressure, heartbeats, session duration, pings.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

async fn app_with(
    tune: impl FnOnce(&mut session_broker::config::Settings),
) -> (TestApp, RedisServer) {
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(Some(redis.url()), &bot);
    tune(&mut options.settings);
    (TestApp::with(options, bot).await, redis)
}

async fn ended_reason(app: &TestApp, sid: &str) -> (String, String) {
    eventually(Duration::from_secs(5), || async {
        let (_, body) = app.session(Method::GET, TOKEN_AGENT, sid).await;
        (body["status"] == "ended").then(|| {
            (
                body["endReason"].as_str().unwrap().to_owned(),
                body["detail"].as_str().unwrap().to_owned(),
            )
        })
    })
    .await
}

#[tokio::test]
async fn an_oversized_message_closes_with_1009() {
    let (app, _redis) = app_with(|s| s.limits.max_frame_bytes = 64 * 1024).await;
    let (token, ws_url, sid) = app.start_session(TOKEN_AGENT).await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::binary(vec![7u8; 64 * 1024])).await;
    ws.send(Message::binary(vec![7u8; 64 * 1024 + 1])).await.unwrap();
    match next_data(&mut ws).await {
        Some(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1009),
        other => panic!("expected close 1009, got {other:?}"),
    }
    let closes =
        eventually(Duration::from_secs(2), || async { app.bot.closes().first().cloned() }).await;
    assert_eq!(closes.0, "1001", "the bot is told the client went away");
    assert_eq!(ended_reason(&app, &sid).await.1, "client message too big");
}

#[tokio::test]
async fn a_slow_client_holds_the_bot_back_instead_of_filling_memory() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    const FRAMES: usize = 2_000;
    const SIZE: usize = 64 * 1024; // 125 MiB in all
    ws.send(Message::text(format!("flood {FRAMES} {SIZE}"))).await.unwrap();

    // The client reads nothing. The bot's sends must stall once the buffers between the two are
    // full: kernel socket buffers on both hops plus the relay's bounded queues, a few MiB. A stall
    // announces nothing: it is the count of sent frames standing still for a while.
    const STILL_FOR: Duration = Duration::from_millis(300);
    let mut last_change = (usize::MAX, Instant::now());
    let stalled_at = eventually(Duration::from_secs(30), || {
        let sent = app.bot.flooded.load(Ordering::SeqCst);
        if sent != last_change.0 {
            last_change = (sent, Instant::now());
        }
        let settled = sent == FRAMES || last_change.1.elapsed() >= STILL_FOR;
        std::future::ready(settled.then_some(sent))
    })
    .await;
    let in_flight_mib = stalled_at * SIZE / (1024 * 1024);
    eprintln!("flood stalled after {stalled_at} frames ({in_flight_mib} MiB in flight)");
    assert!(
        stalled_at < FRAMES && in_flight_mib < 48,
        "the bot pushed {in_flight_mib} MiB to a client that reads nothing"
    );

    // Nothing is lost: every frame arrives, in order, once the client reads.
    for i in 0..FRAMES {
        match next_data(&mut ws).await {
            Some(Message::Binary(data)) => {
                assert!(data.len() == SIZE && data[0] == (i % 251) as u8, "frame {i} out of order")
            }
            other => panic!("frame {i}: {:?}", other.map(|m| m.len())),
        }
    }
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_heartbeat_timeout() {
    let (app, _redis) = app_with(|s| {
        s.limits.heartbeat_interval = Duration::from_millis(100);
        s.limits.heartbeat_timeout = Duration::from_millis(400);
    })
    .await;
    let (token, ws_url, sid) = app.start_session(TOKEN_AGENT).await;
    let ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    // A client that never reads never answers the broker's pings.
    let (reason, detail) = ended_reason(&app, &sid).await;
    assert_eq!((reason.as_str(), detail.as_str()), ("timeout", "client heartbeat timeout"));
    let closes =
        eventually(Duration::from_secs(2), || async { app.bot.closes().first().cloned() }).await;
    assert_eq!(closes.0, "1001");
    drop(ws);
}

#[tokio::test]
async fn an_answering_client_outlives_many_heartbeats() {
    let (app, _redis) = app_with(|s| {
        s.limits.heartbeat_interval = Duration::from_millis(100);
        s.limits.heartbeat_timeout = Duration::from_millis(1_000);
    })
    .await;
    let (token, ws_url, sid) = app.start_session(TOKEN_AGENT).await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    // Reading is enough: tungstenite answers the broker's pings while the client waits.
    let idle = tokio::time::timeout(Duration::from_millis(2_500), next_data(&mut ws)).await;
    assert!(idle.is_err(), "no data frame and no close while idle: {idle:?}");
    assert_echo(&mut ws, Message::text("still here")).await;
    let (_, body) = app.session(Method::GET, TOKEN_AGENT, &sid).await;
    assert_eq!(body["status"], "active");
}

#[tokio::test]
async fn a_silent_bot_is_dropped_after_the_heartbeat_timeout() {
    let (app, _redis) = app_with(|s| {
        s.limits.heartbeat_interval = Duration::from_millis(100);
        s.limits.heartbeat_timeout = Duration::from_millis(400);
    })
    .await;
    let (token, ws_url, sid) = app.start_session(TOKEN_AGENT).await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    ws.send(Message::text("silent")).await.unwrap();
    match next_data(&mut ws).await {
        Some(Message::Close(Some(frame))) => {
            assert_eq!(u16::from(frame.code), 1001);
            assert_eq!(frame.reason.as_str(), "bot heartbeat timeout");
        }
        other => panic!("expected close 1001, got {other:?}"),
    }
    assert_eq!(ended_reason(&app, &sid).await.0, "timeout");
}

#[tokio::test]
async fn the_session_duration_is_enforced_with_a_clean_close() {
    let (app, _redis) = app_with(|s| s.limits.max_session = Duration::from_secs(1)).await;
    let (token, ws_url, sid) = app.start_session(TOKEN_AGENT).await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    assert_echo(&mut ws, Message::text("short call")).await;
    match tokio::time::timeout(Duration::from_secs(3), next_data(&mut ws)).await {
        Ok(Some(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1000);
            assert_eq!(frame.reason.as_str(), "max_session_duration reached");
        }
        other => panic!("expected a clean close, got {other:?}"),
    }
    let (reason, detail) = ended_reason(&app, &sid).await;
    assert_eq!((reason.as_str(), detail.as_str()), ("timeout", "max_session_duration reached"));
    let closes =
        eventually(Duration::from_secs(2), || async { app.bot.closes().first().cloned() }).await;
    assert_eq!(closes, ("1000".to_owned(), "max_session_duration reached".to_owned()));
}

#[tokio::test]
async fn a_client_ping_reaches_the_bot_and_its_pong_comes_back() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.unwrap();
    ws.send(Message::Ping(b"are you there".to_vec().into())).await.unwrap();
    let pong = loop {
        match ws.next().await {
            Some(Ok(Message::Pong(data))) => break data,
            Some(Ok(Message::Ping(_))) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    };
    assert_eq!(&pong[..], b"are you there");
    assert_echo(&mut ws, Message::text("and the relay still works")).await;
}
