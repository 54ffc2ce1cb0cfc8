//! The client's side: connecting with a token where a client may put it, reading what comes
//! back, and racing one token's connects across replicas.

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{self, Message, client::IntoClientRequest},
};

use session_broker::wire;

use super::app::{ORG, TestApp};

pub type Client = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

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

/// Connects with each of `tokens` on each of `apps` and asserts every attempt is refused as
/// minted before the store lost its data, with no bot touched by any.
pub async fn assert_all_fenced(apps: &[&TestApp], agent: &str, tokens: &[String]) {
    for token in tokens {
        for app in apps {
            match connect(&app.ws_url(agent, ORG), Some((token, Via::Path))).await {
                Err((403, body, _)) => {
                    assert_eq!(body["reason"], "token_predates_store_reset", "{body}");
                    assert!(body["message"].as_str().unwrap().contains("call /start again"));
                }
                other => panic!("a token minted before the loss: {:?}", other.map(|_| "upgrade")),
            }
        }
    }
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

/// A WebSocket client written by hand, for what a library client will not send: frames in the
/// same write as the handshake, fragments, frames that break the protocol.
pub struct RawClient {
    stream: tokio::net::TcpStream,
    read: Vec<u8>,
}

impl RawClient {
    /// Opens `ws_url/token` and sends `early` in the same write as the handshake. Returns the
    /// client once upgraded, or the answer's head if it was not a 101.
    pub async fn open(ws_url: &str, token: &str, early: &[u8]) -> Result<Self, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let url = url::Url::parse(&format!("{ws_url}/{token}")).unwrap();
        let addr = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut request = format!(
            "GET {} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            url.path()
        )
        .into_bytes();
        request.extend_from_slice(early);
        stream.write_all(&request).await.unwrap();
        let mut read = Vec::new();
        let head = loop {
            if let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before answering: {}", String::from_utf8_lossy(&read));
            read.extend_from_slice(&chunk[..n]);
        };
        let answer = String::from_utf8_lossy(&read[..head]).into_owned();
        if !answer.starts_with("HTTP/1.1 101") {
            return Err(answer);
        }
        read.drain(..head);
        Ok(Self { stream, read })
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next frame from the broker, unmasked as a server's must be; `None` once the
    /// connection closes.
    pub async fn frame(&mut self) -> Option<wire::Frame> {
        use tokio::io::AsyncReadExt;
        loop {
            let decoded = wire::decode(&self.read, wire::Sender::Server, 1 << 24)
                .expect("the broker sent a frame a client must refuse");
            if let Some((frame, size)) = decoded {
                self.read.drain(..size);
                return Some(frame);
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                self.stream.read(&mut chunk),
            )
            .await
            .expect("no frame within 5 s")
            .ok()?;
            if n == 0 {
                return None;
            }
            self.read.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next frame that is not a ping.
    pub async fn data(&mut self) -> Option<wire::Frame> {
        loop {
            match self.frame().await? {
                f if f.opcode == wire::opcode::PING => continue,
                f => return Some(f),
            }
        }
    }
}
