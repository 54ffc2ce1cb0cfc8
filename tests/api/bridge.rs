//! The relay's limits: message size, backpressure, heartbeats, session duration, pings.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use tokio_tungstenite::tungstenite::Message;

use session_broker::wire;

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

/// A masked client frame, as a client sends it.
fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = wire::encode(opcode, payload, wire::Sender::Server);
    if !fin {
        frame[0] &= 0x7F;
    }
    frame
}

#[tokio::test]
async fn frames_sent_with_the_handshake_reach_the_bot() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    // The first frame leaves in the same write as the request, before any 101.
    let early = client_frame(true, wire::opcode::TEXT, b"early bird");
    let mut ws = RawClient::open(&ws_url, &token, &early).await.unwrap();
    let echo = ws.data().await.expect("the bot's echo");
    assert_eq!((echo.opcode, echo.payload.as_slice()), (wire::opcode::TEXT, &b"early bird"[..]));
}

#[tokio::test]
async fn a_fragmented_message_reaches_the_bot_as_one_message() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    let mut ws = RawClient::open(&ws_url, &token, b"").await.unwrap();
    // Three fragments with a ping between them: the bot (tungstenite) reassembles the message
    // and echoes it whole, so the fragments reached it in order and well formed.
    ws.send(&client_frame(false, wire::opcode::TEXT, b"frag")).await;
    ws.send(&client_frame(false, wire::opcode::CONTINUATION, b"ment")).await;
    ws.send(&client_frame(true, wire::opcode::PING, b"between")).await;
    ws.send(&client_frame(true, wire::opcode::CONTINUATION, b"ed")).await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.push(ws.data().await.expect("the pong and the echo"));
    }
    seen.sort_by_key(|f| f.opcode);
    assert_eq!(
        (seen[0].opcode, seen[0].payload.as_slice()),
        (wire::opcode::TEXT, &b"fragmented"[..])
    );
    assert_eq!((seen[1].opcode, seen[1].payload.as_slice()), (wire::opcode::PONG, &b"between"[..]));
}

#[tokio::test]
async fn an_unmasked_client_frame_closes_with_1002_and_never_reaches_the_bot() {
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let (token, ws_url, sid) = app.start_session(TOKEN_AGENT).await;
    let mut ws = RawClient::open(&ws_url, &token, b"").await.unwrap();
    ws.send(&client_frame(true, wire::opcode::TEXT, b"fine")).await;
    let echo = ws.data().await.expect("the echo of a good frame");
    assert_eq!(echo.payload, b"fine");
    // A server's frame (no mask) from a client breaks RFC 6455 §5.1.
    ws.send(&wire::encode(wire::opcode::TEXT, b"unmasked", wire::Sender::Client)).await;
    let close = ws.data().await.expect("a close");
    assert_eq!(close.opcode, wire::opcode::CLOSE);
    assert_eq!(&close.payload[..2], &1002u16.to_be_bytes());
    let closes =
        eventually(Duration::from_secs(2), || async { app.bot.closes().first().cloned() }).await;
    assert_eq!(closes, ("1001".to_owned(), "client connection failed".to_owned()));
    assert_eq!(ended_reason(&app, &sid).await.1, "client protocol error");
    assert!(ws.data().await.is_none(), "the bot's echo of the bad frame never comes");
}

#[tokio::test]
async fn an_upgrade_with_a_body_is_refused_and_spends_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (app, _redis) = TestApp::spawn(Store::Redis).await;
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    // actix-http reads a chunked request as a plain one, never as an upgrade: it must not
    // spend the token on a socket nobody relays.
    let url = url::Url::parse(&format!("{ws_url}/{token}")).unwrap();
    let addr = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        url.path()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0; 4096];
    let n = stream.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(app.bot.connections(), 0, "no bot was dialled");
    let mut ws = connect(&ws_url, Some((&token, Via::Path))).await.expect("the token still works");
    assert_echo(&mut ws, Message::text("unspent")).await;
}

#[tokio::test]
async fn a_bot_whose_handshake_is_wrong_is_unreachable_and_the_token_stays_usable() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A "bot" that answers 101 with an accept key for another request.
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_addr = fake.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = fake.accept().await {
            let mut head = vec![0; 4096];
            let _ = socket.read(&mut head).await;
            let _ = socket
                .write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                      Connection: Upgrade\r\nSec-WebSocket-Accept: bm90IHRoaXMgb25l\r\n\r\n",
                )
                .await;
        }
    });
    let redis = RedisServer::start();
    let bot = TestBot::start().await;
    let mut options = AppOptions::new(Some(redis.url()), &bot);
    options.bot_url = format!("ws://{fake_addr}/ws");
    let app = TestApp::with(options, bot).await;
    let (token, ws_url, _) = app.start_session(TOKEN_AGENT).await;
    for _ in 0..2 {
        match connect(&ws_url, Some((&token, Via::Path))).await {
            Err((503, body, _)) => assert_eq!(body["code"], "503"),
            other => panic!("expected 503, got {:?}", other.map(|_| "upgrade")),
        }
    }
}
