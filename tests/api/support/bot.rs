//! A WebSocket bot that echoes, obeys a few text commands (`close`, `flood`, `silent`) and
//! records every handshake and close frame it sees; on `ws://`, or on `wss://` behind TLS.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use futures_util::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
};
use tokio_tungstenite::tungstenite::{self, Message, handshake::server};

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
    /// `ws`, or `wss` for a bot behind TLS.
    scheme: &'static str,
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
        let bot = Self::new(&listener, "ws");
        let shared = bot.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let bot = shared.clone();
                tokio::spawn(async move { bot.serve(stream).await });
            }
        });
        bot
    }

    /// The bot behind TLS (`wss://`), presenting the certificate of `tls`. A connection whose
    /// TLS handshake fails goes no further.
    pub async fn start_tls(tls: Arc<tokio_rustls::rustls::ServerConfig>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bot = Self::new(&listener, "wss");
        let (shared, acceptor) = (bot.clone(), tokio_rustls::TlsAcceptor::from(tls));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let (bot, acceptor) = (shared.clone(), acceptor.clone());
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        bot.serve(stream).await;
                    }
                });
            }
        });
        bot
    }

    fn new(listener: &TcpListener, scheme: &'static str) -> Self {
        Self {
            addr: listener.local_addr().unwrap(),
            scheme,
            handshakes: Arc::default(),
            connections: Arc::default(),
            flooded: Arc::default(),
        }
    }

    // The handshake callback's error type is tungstenite's, large or not.
    #[allow(clippy::result_large_err)]
    async fn serve(self, stream: impl AsyncRead + AsyncWrite + Unpin) {
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
        format!("{}://{}/ws", self.scheme, self.addr)
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
