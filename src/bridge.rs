//! The client <-> bot relay.
//!
//! The broker dials the bot *before* it upgrades the client (see `routes::ws`), so a session
//! only exists once both ends do. Then [`relay`] moves frames both ways, unchanged and in order:
//! text stays text, binary stays binary, and a close from one side is passed on to the other
//! with its code and reason.
//!
//! Each direction is its own loop that awaits its write before its next read. That makes every
//! buffer bounded (actix-ws's outbound channel, tungstenite's write buffer): a slow reader on one
//! side slows its writer on the other through TCP flow control, instead of growing memory, and
//! never stalls the opposite direction.

use std::time::Duration;

use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, ProtocolError};
use futures_util::{SinkExt, StreamExt};
use tokio::{net::TcpStream, time::Instant};
use tokio_tungstenite::{
    Connector, MaybeTlsStream, WebSocketStream,
    tungstenite::{
        self, Message as BotMessage,
        client::IntoClientRequest,
        http::{HeaderName, HeaderValue},
        protocol::{CloseFrame, WebSocketConfig, frame::coding::CloseCode as BotCloseCode},
    },
};
use url::Url;

use crate::sessions::{EndReason, Stop, TERMINATED_CLOSE_CODE};

pub type BotSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;
type BotSink = futures_util::stream::SplitSink<BotSocket, BotMessage>;
type BotStream = futures_util::stream::SplitStream<BotSocket>;

/// How long the broker waits for the second side's close reply once it has passed a close on.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Read buffer of each bot connection. tungstenite zero-fills the whole buffer before every read,
/// so its 128 KiB default would make every idle session cost 128 KiB of resident memory. Audio
/// frames are a few hundred bytes; larger messages just take several reads.
const BOT_READ_BUFFER_BYTES: usize = 8 * 1024;

/// Per-session limits, from `[limits]`.
#[derive(Debug, Clone, Copy)]
pub struct BridgeLimits {
    pub max_frame_bytes: usize,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("bot did not complete the handshake within {0:?}")]
    Timeout(Duration),
    #[error("bot handshake failed: {0}")]
    Handshake(#[from] tungstenite::Error),
}

/// Opens the bot's WebSocket with the given extra handshake headers; a `wss://` bot over TLS
/// with `tls` (see [`crate::tls::bot_client_config`]).
pub async fn dial(
    url: &Url,
    headers: &[(&'static str, String)],
    limits: &BridgeLimits,
    tls: &Connector,
    timeout: Duration,
) -> Result<BotSocket, DialError> {
    let mut request = url.as_str().into_client_request()?;
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(value) {
            request.headers_mut().insert(HeaderName::from_static(name), value);
        }
    }
    let config = WebSocketConfig::default()
        .read_buffer_size(BOT_READ_BUFFER_BYTES)
        .max_frame_size(Some(limits.max_frame_bytes))
        .max_message_size(Some(limits.max_frame_bytes));
    let connect = tokio_tungstenite::connect_async_tls_with_config(
        request,
        Some(config),
        true,
        Some(tls.clone()),
    );
    let (socket, _) =
        tokio::time::timeout(timeout, connect).await.map_err(|_| DialError::Timeout(timeout))??;
    Ok(socket)
}

/// Relay traffic counters of one session, resolved once so that each frame costs an atomic add.
pub struct RelayCounters {
    up_bytes: prometheus::IntCounter,
    up_frames: prometheus::IntCounter,
    down_bytes: prometheus::IntCounter,
    down_frames: prometheus::IntCounter,
}

impl RelayCounters {
    pub fn new(metrics: &crate::metrics::Metrics) -> Self {
        let (bytes, frames) = (&metrics.relay_bytes, &metrics.relay_frames);
        Self {
            up_bytes: bytes.with_label_values(&["client_to_bot"]),
            up_frames: frames.with_label_values(&["client_to_bot"]),
            down_bytes: bytes.with_label_values(&["bot_to_client"]),
            down_frames: frames.with_label_values(&["bot_to_client"]),
        }
    }

    fn up(&self, len: usize) {
        self.up_bytes.inc_by(len as u64);
        self.up_frames.inc();
    }

    fn down(&self, len: usize) {
        self.down_bytes.inc_by(len as u64);
        self.down_frames.inc();
    }
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub reason: EndReason,
    pub detail: &'static str,
}

/// Relays one session until either side ends it, `max_duration` passes or `stop` fires, then
/// closes both sides. Returns how it ended.
pub async fn relay(
    client: actix_ws::Session,
    client_stream: actix_ws::MessageStream,
    bot: BotSocket,
    limits: BridgeLimits,
    max_duration: Duration,
    stop: tokio::sync::oneshot::Receiver<Stop>,
    counters: RelayCounters,
) -> Outcome {
    let client_rx = client_stream
        .max_frame_size(limits.max_frame_bytes)
        .aggregate_continuations()
        .max_continuation_size(limits.max_frame_bytes);
    let (mut bot_tx, mut bot_rx) = bot.split();
    let ending = tokio::select! {
        ending = client_to_bot(client_rx, &mut bot_tx, client.clone(), &limits, &counters) => ending,
        ending = bot_to_client(&mut bot_rx, client.clone(), &limits, &counters) => ending,
        () = tokio::time::sleep(max_duration) => Ending::duration_reached(),
        Ok(why) = stop => Ending::stopped(why),
    };

    // Pass the close on. The bot gets a close frame and a short grace to answer it; the client's
    // close is sent by actix-ws, which then ends the response stream.
    let outcome = ending.outcome;
    let bot_close = async {
        let _ = bot_tx.send(BotMessage::Close(ending.to_bot)).await;
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            while let Some(Ok(msg)) = bot_rx.next().await {
                if msg.is_close() {
                    break;
                }
            }
        })
        .await;
    };
    let client_close = client.close(ending.to_client);
    let _ = tokio::join!(bot_close, client_close);
    outcome
}

/// Moves the client's messages to the bot, answers the client's pings and pings the bot, until
/// one side fails or the client closes or falls silent. Awaits each write before the next read.
async fn client_to_bot(
    mut client_rx: AggregatedMessageStream,
    bot_tx: &mut BotSink,
    mut client_pinger: actix_ws::Session,
    limits: &BridgeLimits,
    counters: &RelayCounters,
) -> Ending {
    let mut client_seen = Instant::now();
    let mut beat = heartbeat(limits.heartbeat_interval);
    loop {
        tokio::select! {
            msg = client_rx.recv() => {
                client_seen = Instant::now();
                let forwarded = match msg {
                    Some(Ok(AggregatedMessage::Text(text))) => {
                        // actix-ws validated the UTF-8 already; this re-check is cheap.
                        counters.up(text.len());
                        match tungstenite::Utf8Bytes::try_from(text.into_bytes()) {
                            Ok(text) => bot_tx.send(BotMessage::Text(text)).await,
                            Err(_) => return Ending::client_error(CloseCode::Invalid, "client sent invalid UTF-8"),
                        }
                    }
                    Some(Ok(AggregatedMessage::Binary(data))) => {
                        counters.up(data.len());
                        bot_tx.send(BotMessage::Binary(data)).await
                    }
                    Some(Ok(AggregatedMessage::Ping(data))) => {
                        if client_pinger.pong(&data).await.is_err() {
                            return Ending::client_gone();
                        }
                        Ok(())
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => Ok(()),
                    Some(Ok(AggregatedMessage::Close(reason))) => {
                        return Ending {
                            outcome: Outcome { reason: EndReason::ClientClosed, detail: "client closed" },
                            to_client: reason.clone(),
                            to_bot: reason.map(bot_close),
                        };
                    }
                    Some(Err(ProtocolError::Overflow)) => {
                        return Ending::client_error(CloseCode::Size, "client message too big");
                    }
                    Some(Err(_)) => return Ending::client_error(CloseCode::Protocol, "client protocol error"),
                    None => return Ending::client_gone(),
                };
                if forwarded.is_err() {
                    return Ending::bot_gone();
                }
            }
            _ = beat.tick() => {
                if client_seen.elapsed() > limits.heartbeat_timeout {
                    return Ending::silent(Side::Client);
                }
                if bot_tx.send(BotMessage::Ping(Default::default())).await.is_err() {
                    return Ending::bot_gone();
                }
            }
        }
    }
}

/// Moves the bot's messages to the client and pings the client, until one side fails or the
/// bot closes or falls silent. Awaits each write before the next read.
async fn bot_to_client(
    bot_rx: &mut BotStream,
    mut client: actix_ws::Session,
    limits: &BridgeLimits,
    counters: &RelayCounters,
) -> Ending {
    let mut bot_seen = Instant::now();
    let mut beat = heartbeat(limits.heartbeat_interval);
    loop {
        tokio::select! {
            msg = bot_rx.next() => {
                bot_seen = Instant::now();
                let forwarded = match msg {
                    Some(Ok(BotMessage::Text(text))) => {
                        counters.down(text.len());
                        match bytestring::ByteString::try_from(bytes::Bytes::from(text)) {
                            Ok(text) => client.text(text).await,
                            Err(_) => return Ending::bot_error(BotCloseCode::Invalid, "bot sent invalid UTF-8"),
                        }
                    }
                    Some(Ok(BotMessage::Binary(data))) => {
                        counters.down(data.len());
                        client.binary(data).await
                    }
                    // tungstenite answers the bot's pings itself.
                    Some(Ok(BotMessage::Ping(_) | BotMessage::Pong(_) | BotMessage::Frame(_))) => Ok(()),
                    Some(Ok(BotMessage::Close(frame))) => {
                        let normal = frame.as_ref().is_some_and(|f| f.code == BotCloseCode::Normal);
                        let outcome = if normal {
                            Outcome { reason: EndReason::Completed, detail: "bot closed normally" }
                        } else {
                            Outcome { reason: EndReason::BotClosed, detail: "bot closed" }
                        };
                        return Ending { outcome, to_client: frame.map(client_close), to_bot: None };
                    }
                    Some(Err(tungstenite::Error::Capacity(_))) => {
                        return Ending::bot_error(BotCloseCode::Size, "bot message too big");
                    }
                    Some(Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed)) | None => {
                        return Ending::bot_gone();
                    }
                    Some(Err(_)) => return Ending::bot_error(BotCloseCode::Protocol, "bot protocol error"),
                };
                if forwarded.is_err() {
                    return Ending::client_gone();
                }
            }
            _ = beat.tick() => {
                if bot_seen.elapsed() > limits.heartbeat_timeout {
                    return Ending::silent(Side::Bot);
                }
                if client.ping(b"").await.is_err() {
                    return Ending::client_gone();
                }
            }
        }
    }
}

/// How a session ends: the outcome, and the close frames each side receives.
struct Ending {
    outcome: Outcome,
    to_client: Option<CloseReason>,
    to_bot: Option<CloseFrame>,
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Client,
    Bot,
}

impl Ending {
    fn client_error(code: CloseCode, detail: &'static str) -> Self {
        Self {
            outcome: Outcome { reason: EndReason::ClientClosed, detail },
            to_client: Some(client_reason(code, detail)),
            to_bot: Some(bot_frame(BotCloseCode::Away, "client connection failed")),
        }
    }

    fn bot_error(code: BotCloseCode, detail: &'static str) -> Self {
        Self {
            outcome: Outcome { reason: EndReason::BotClosed, detail },
            to_client: Some(client_reason(CloseCode::Error, "bot connection failed")),
            to_bot: Some(bot_frame(code, detail)),
        }
    }

    /// The client vanished without a close frame.
    fn client_gone() -> Self {
        Self {
            outcome: Outcome { reason: EndReason::ClientClosed, detail: "client disconnected" },
            to_client: None,
            to_bot: Some(bot_frame(BotCloseCode::Away, "client disconnected")),
        }
    }

    /// The bot vanished without a close frame.
    fn bot_gone() -> Self {
        Self {
            outcome: Outcome { reason: EndReason::BotClosed, detail: "bot disconnected" },
            to_client: Some(client_reason(CloseCode::Error, "bot disconnected")),
            to_bot: None,
        }
    }

    /// A side sent nothing, not even a pong, for the heartbeat timeout.
    fn silent(side: Side) -> Self {
        let detail = match side {
            Side::Client => "client heartbeat timeout",
            Side::Bot => "bot heartbeat timeout",
        };
        Self {
            outcome: Outcome { reason: EndReason::Timeout, detail },
            to_client: Some(client_reason(CloseCode::Away, detail)),
            to_bot: Some(bot_frame(BotCloseCode::Away, detail)),
        }
    }

    fn duration_reached() -> Self {
        let detail = "max_session_duration reached";
        Self {
            outcome: Outcome { reason: EndReason::Timeout, detail },
            to_client: Some(client_reason(CloseCode::Normal, detail)),
            to_bot: Some(bot_frame(BotCloseCode::Normal, detail)),
        }
    }

    fn stopped(why: Stop) -> Self {
        let (outcome, code) = match why {
            Stop::Terminated => (
                Outcome { reason: EndReason::Terminated, detail: "session terminated" },
                TERMINATED_CLOSE_CODE,
            ),
            Stop::LeaseLost => (
                Outcome { reason: EndReason::ReplicaLost, detail: "session lease lost" },
                u16::from(CloseCode::Away),
            ),
            Stop::Draining => (
                Outcome { reason: EndReason::Terminated, detail: "replica shutting down" },
                u16::from(CloseCode::Away),
            ),
        };
        Self {
            outcome,
            to_client: Some(client_reason(CloseCode::from(code), outcome.detail)),
            to_bot: Some(bot_frame(BotCloseCode::from(code), outcome.detail)),
        }
    }
}

/// Ticks every `period`, first one `period` from now (a plain interval ticks at once).
fn heartbeat(period: Duration) -> tokio::time::Interval {
    let mut beat = tokio::time::interval_at(Instant::now() + period, period);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat
}

fn client_reason(code: CloseCode, text: &str) -> CloseReason {
    CloseReason { code, description: (!text.is_empty()).then(|| text.to_owned()) }
}

fn bot_frame(code: BotCloseCode, text: &'static str) -> CloseFrame {
    CloseFrame { code, reason: text.into() }
}

/// A client's close, as the bot receives it: same code, same reason.
fn bot_close(reason: CloseReason) -> CloseFrame {
    CloseFrame {
        code: BotCloseCode::from(u16::from(reason.code)),
        reason: reason.description.unwrap_or_default().into(),
    }
}

/// A bot's close, as the client receives it: same code, same reason.
fn client_close(frame: CloseFrame) -> CloseReason {
    let text = frame.reason.as_str();
    CloseReason {
        code: CloseCode::from(u16::from(frame.code)),
        description: (!text.is_empty()).then(|| text.to_owned()),
    }
}
