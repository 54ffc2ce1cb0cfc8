//! The client <-> bot relay.
//!
//! The broker dials the bot *before* it upgrades the client (see `routes::ws`), so a session
//! only exists once both ends do. Then [`relay`] passes frames both ways as they are on the
//! wire, in order and unchanged: a client's frames are masked, as a bot expects of its client,
//! and a bot's are not, as a client expects of its server (see [`crate::wire`]). Pings, pongs
//! and closes go through too, so each side's close reaches the other with its code and reason.
//! The broker adds frames of its own only between frames: heartbeat pings, and the closes of a
//! session it ends.
//!
//! One task runs a session, the one that read its request: it waits on both sockets at once and
//! each read lands in a buffer of the worker thread, is checked and counted frame by frame, and
//! goes straight on. A session holds a buffer only while its receiver is slower than its sender,
//! and then reads nothing more from that sender until the receiver has taken it: memory stays
//! bounded and TCP flow control slows the sender, without stalling the other direction. An idle
//! session holds its two sockets, one timer and a few hundred bytes of state.

use std::{
    cell::RefCell,
    future::{Future, poll_fn},
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use actix_ws::CloseCode;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
    sync::oneshot,
    time::{Instant, Sleep},
};
use tokio_rustls::client::TlsStream;
use url::Url;

use crate::{
    bot_addresses::BotAddresses,
    sessions::{EndReason, Stop, TERMINATED_CLOSE_CODE},
    wire::{self, Event, FrameReader, Refused, Sender, Violation, opcode},
};

/// How long the broker waits, once a session ends, for the closes it awaits and for both
/// sockets to close.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Bytes read at a time, into the worker thread's buffer (HAProxy's default `bufsize`).
const READ_CHUNK: usize = 16 * 1024;
/// Reads one direction makes in a row before the other gets its turn.
const READS_PER_TURN: usize = 16;
/// Most bytes of the bot's handshake answer.
const MAX_HANDSHAKE_BYTES: usize = 16 * 1024;

thread_local! {
    /// Where each read lands before it goes on: one per worker thread, so a session holds no
    /// read buffer of its own.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
}

/// Per-session limits, from `[limits]`.
#[derive(Debug, Clone, Copy)]
pub struct BridgeLimits {
    pub max_frame_bytes: usize,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
}

/// A bot's connection: plain, or TLS for a `wss://` bot (boxed: a TLS session is large, and
/// most bots are reached in plain on a private network).
pub enum BotStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A bot that answered its handshake, with what it sent after the handshake (the first bytes
/// of its frames, if it spoke first).
pub struct Bot {
    pub stream: BotStream,
    pub prefix: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("bot did not complete the handshake within {0:?}")]
    Timeout(Duration),
    #[error("bot connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("bot handshake failed: {0}")]
    Handshake(String),
}

/// Opens the bot's WebSocket with the given extra handshake headers; a `wss://` bot over TLS
/// with `tls` (see [`crate::tls::bot_client_config`]), a bot named by host name at an address
/// from `addresses`.
pub async fn dial(
    url: &Url,
    headers: &[(&'static str, String)],
    tls: &Arc<rustls::ClientConfig>,
    addresses: &BotAddresses,
    timeout: Duration,
) -> Result<Bot, DialError> {
    match tokio::time::timeout(timeout, handshake(url, headers, tls, addresses)).await {
        Ok(dialled) => dialled,
        Err(_) => {
            // Perhaps an address that no longer answers at all: the next connect looks again.
            if let (Some(url::Host::Domain(name)), Some(port)) =
                (url.host(), url.port_or_known_default())
            {
                addresses.forget(name, port);
            }
            Err(DialError::Timeout(timeout))
        }
    }
}

async fn open(
    url: &Url,
    tls: &Arc<rustls::ClientConfig>,
    addresses: &BotAddresses,
) -> Result<BotStream, DialError> {
    let refused = |why: &str| DialError::Handshake(why.to_owned());
    let port = url.port_or_known_default().ok_or_else(|| refused("the bot URL has no port"))?;
    let tcp = match url.host() {
        Some(url::Host::Domain(name)) => addresses.connect(name, port).await?,
        Some(url::Host::Ipv4(ip)) => TcpStream::connect((ip, port)).await?,
        Some(url::Host::Ipv6(ip)) => TcpStream::connect((ip, port)).await?,
        None => return Err(refused("the bot URL has no host")),
    };
    tcp.set_nodelay(true)?;
    match url.scheme() {
        "ws" => Ok(BotStream::Plain(tcp)),
        "wss" => {
            let name = crate::tls::server_name(url)
                .ok_or_else(|| refused("the bot's host cannot carry a certificate"))?;
            let connector = tokio_rustls::TlsConnector::from(tls.clone());
            Ok(BotStream::Tls(Box::new(connector.connect(name, tcp).await?)))
        }
        _ => Err(refused("the bot URL is neither ws:// nor wss://")),
    }
}

/// The client side of the opening handshake (RFC 6455 §4.1), offering no extension and no
/// subprotocol, so the frames that follow are plain frames the relay can pass on.
async fn handshake(
    url: &Url,
    headers: &[(&'static str, String)],
    tls: &Arc<rustls::ClientConfig>,
    addresses: &BotAddresses,
) -> Result<Bot, DialError> {
    use std::fmt::Write as _;
    let mut stream = open(url, tls, addresses).await?;
    let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
    let host = &url[url::Position::BeforeHost..url::Position::AfterPort];
    let target = &url[url::Position::BeforePath..url::Position::AfterQuery];
    let mut request = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
    );
    for (name, value) in headers {
        // A value that cannot be a header value (a control character) is left out.
        if value.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80) {
            let _ = write!(request, "{name}: {value}\r\n");
        }
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;

    let mut answer = Vec::with_capacity(1024);
    loop {
        if answer.len() >= MAX_HANDSHAKE_BYTES {
            return Err(DialError::Handshake("the answer's head is too large".into()));
        }
        answer.reserve(1024);
        if stream.read_buf(&mut answer).await? == 0 {
            return Err(DialError::Handshake("the bot closed the connection".into()));
        }
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut fields);
        match response.parse(&answer) {
            Ok(httparse::Status::Complete(head)) => {
                check_answer(&response, &key).map_err(|why| DialError::Handshake(why.into()))?;
                let prefix = answer[head..].to_vec();
                return Ok(Bot { stream, prefix });
            }
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return Err(DialError::Handshake(format!("not an HTTP answer: {e}"))),
        }
    }
}

fn check_answer(response: &httparse::Response, key: &str) -> Result<(), &'static str> {
    if response.code != Some(101) {
        return Err("the bot did not switch protocols (no 101)");
    }
    fn values<'a>(
        fields: &'a [httparse::Header<'a>],
        name: &'a str,
    ) -> impl Iterator<Item = &'a [u8]> {
        fields.iter().filter(move |h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
    }
    let field = |name: &'static str| values(response.headers, name);
    let has_token = |name: &'static str, token: &str| {
        field(name).any(|v| {
            v.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err("the answer does not upgrade to websocket");
    }
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    if !field("sec-websocket-accept").any(|v| v == accept.as_bytes()) {
        return Err("wrong Sec-WebSocket-Accept");
    }
    if field("sec-websocket-extensions").next().is_some() {
        return Err("the bot chose an extension the broker did not offer");
    }
    if field("sec-websocket-protocol").next().is_some() {
        return Err("the bot chose a subprotocol the broker did not offer");
    }
    Ok(())
}

/// Refuses an upgraded client with a close: written, then the socket shut and read until the
/// client closes too (within the grace), so that no unread byte turns the close into a reset.
pub async fn refuse(mut client: impl AsyncRead + AsyncWrite + Unpin, code: CloseCode, why: &str) {
    let frame = wire::close_frame(code.into(), why, Sender::Client);
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        client.write_all(&frame).await?;
        client.shutdown().await?;
        let mut sink = [0u8; 512];
        while client.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    })
    .await;
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

    fn count(&self, from: Side, len: u64) {
        let (bytes, frames) = match from {
            Side::Client => (&self.up_bytes, &self.up_frames),
            Side::Bot => (&self.down_bytes, &self.down_frames),
        };
        bytes.inc_by(len);
        frames.inc();
    }
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub reason: EndReason,
    pub detail: &'static str,
}

/// Relays one session until either side ends it, `max_duration` passes or `stop` fires. Each
/// side's stream starts with its `prefix`: bytes read from it before the relay began. Returns
/// how the session ended, and the [`Teardown`] that closes both sides.
#[allow(clippy::too_many_arguments)]
pub async fn relay<C, B>(
    client: C,
    client_prefix: Vec<u8>,
    bot: B,
    bot_prefix: Vec<u8>,
    limits: BridgeLimits,
    max_duration: Duration,
    stop: oneshot::Receiver<Stop>,
    counters: RelayCounters,
) -> (Outcome, Teardown<C, B>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let now = Instant::now();
    let mut relay = Relay {
        client,
        bot,
        up: Pipe::new(Side::Client, limits.max_frame_bytes, now),
        down: Pipe::new(Side::Bot, limits.max_frame_bytes, now),
        limits,
        counters,
        stop: Some(stop),
        ends_at: now + max_duration,
        next_beat: now + limits.heartbeat_interval,
        closing: None,
        grace_until: now,
        shut: (false, false),
    };
    for (side, prefix) in [(Side::Client, client_prefix), (Side::Bot, bot_prefix)] {
        if !prefix.is_empty() {
            let pipe = match side {
                Side::Client => &mut relay.up,
                Side::Bot => &mut relay.down,
            };
            let (pass, turn) = pipe.read(&prefix, &relay.counters);
            pipe.out.extend_from_slice(&prefix[..pass]);
            if let Some(turn) = turn {
                relay.turn(side, turn);
            }
        }
    }
    let timer = tokio::time::sleep_until(relay.deadline());
    let mut timer = std::pin::pin!(timer);
    let outcome = poll_fn(|cx| relay.poll(cx, timer.as_mut(), false)).await;
    (outcome, Teardown(relay))
}

/// What is left of a session once its end is decided: the closes to pass on and await, and
/// the sockets to close, within the grace. The end can be recorded meanwhile.
pub struct Teardown<C, B>(Relay<C, B>);

impl<C, B> Teardown<C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    pub async fn finish(mut self) {
        let timer = tokio::time::sleep_until(self.0.deadline());
        let mut timer = std::pin::pin!(timer);
        poll_fn(|cx| self.0.poll(cx, timer.as_mut(), true)).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Bot,
}

/// One direction of a session: the frames of one side (the sender) on their way to the other
/// (the receiver).
struct Pipe {
    from: Side,
    reader: FrameReader,
    /// Bytes taken from the sender that the receiver has not taken yet; empty (and unallocated)
    /// whenever the receiver keeps up.
    out: Vec<u8>,
    out_at: usize,
    /// Bytes were written since the last flush (a TLS stream may hold them until flushed).
    unflushed: bool,
    /// When the sender last sent anything.
    seen: Instant,
    /// The sender's frames go on to the receiver (until the session ends, or the sender closed).
    forward: bool,
    /// The sender's stream ended, or failed.
    ended: bool,
    /// The sender broke the protocol: its stream is no longer followed, only read and dropped.
    broken: bool,
    /// The receiver's socket failed: nothing more is written to it.
    dead: bool,
    /// The sender's close frame came, and whether one is awaited before the session ends.
    close_seen: bool,
    awaiting_close: bool,
}

/// What a turn of a pipe ended with, beyond moving bytes.
#[derive(Debug)]
enum Turn {
    Idle,
    SenderGone,
    ReceiverGone,
    Refused(Violation),
    Closed(Option<u16>),
}

impl Pipe {
    fn new(from: Side, max_message: usize, now: Instant) -> Self {
        let sender = match from {
            Side::Client => Sender::Client,
            Side::Bot => Sender::Server,
        };
        Self {
            from,
            reader: FrameReader::new(sender, max_message),
            out: Vec::new(),
            out_at: 0,
            unflushed: false,
            seen: now,
            forward: true,
            ended: false,
            broken: false,
            dead: false,
            close_seen: false,
            awaiting_close: false,
        }
    }

    /// Takes a chunk from the sender: how many of its bytes go on, and what it ended with.
    fn read(&mut self, chunk: &[u8], counters: &RelayCounters) -> (usize, Option<Turn>) {
        self.seen = Instant::now();
        if self.broken {
            return (0, None);
        }
        let (from, mut closed) = (self.from, None);
        let read = self.reader.feed(chunk, &mut |event| match event {
            Event::Data { len, .. } => counters.count(from, len),
            Event::Close { code } => closed = Some(code),
            Event::Ping | Event::Pong => {}
        });
        let pass = |n: usize| if self.forward { n } else { 0 };
        match read {
            Ok(()) => {
                let pass = pass(chunk.len());
                if closed.is_some() {
                    self.close_seen = true;
                }
                (pass, closed.map(Turn::Closed))
            }
            Err(Refused { violation, at }) => {
                // Nothing of the refused frame goes on. If it began in this chunk, the stream to
                // the receiver ends at a frame boundary and may still take a close.
                let pass = at.map_or(0, |at| {
                    self.reader.abandon_frame();
                    pass(at)
                });
                self.broken = true;
                (pass, Some(Turn::Refused(violation)))
            }
        }
    }

    /// Queues a frame of the broker's own for the receiver, if the stream to it is between
    /// frames and the receiver can still take it. Returns whether it was queued.
    fn inject(&mut self, frame: Vec<u8>) -> bool {
        if self.dead || !self.reader.at_boundary() {
            return false;
        }
        self.out.extend_from_slice(&frame);
        true
    }

    fn flushed(&self) -> bool {
        self.dead || (self.out.is_empty() && !self.unflushed)
    }

    /// Moves the sender's bytes to the receiver until neither has more to give or take.
    fn pump<S, D>(
        &mut self,
        src: &mut S,
        dst: &mut D,
        cx: &mut Context<'_>,
        counters: &RelayCounters,
    ) -> Turn
    where
        S: AsyncRead + Unpin,
        D: AsyncWrite + Unpin,
    {
        for _ in 0..READS_PER_TURN {
            // What the receiver has not taken yet goes first; the sender waits until it has.
            if !self.dead {
                while self.out_at < self.out.len() {
                    match Pin::new(&mut *dst).poll_write(cx, &self.out[self.out_at..]) {
                        Poll::Ready(Ok(n)) if n > 0 => {
                            self.out_at += n;
                            self.unflushed = true;
                        }
                        Poll::Ready(_) => return self.receiver_gone(),
                        Poll::Pending => return Turn::Idle,
                    }
                }
                if !self.out.is_empty() {
                    // Nothing is held while idle.
                    (self.out, self.out_at) = (Vec::new(), 0);
                }
                if self.unflushed {
                    match Pin::new(&mut *dst).poll_flush(cx) {
                        Poll::Ready(Ok(())) => self.unflushed = false,
                        Poll::Ready(Err(_)) => return self.receiver_gone(),
                        Poll::Pending => {}
                    }
                }
            }
            if self.ended {
                return Turn::Idle;
            }
            let step = SCRATCH.with_borrow_mut(|buf| {
                let mut filled = ReadBuf::new(&mut buf[..]);
                match Pin::new(&mut *src).poll_read(cx, &mut filled) {
                    Poll::Pending => Some(Turn::Idle),
                    Poll::Ready(Err(_)) => Some(self.sender_gone()),
                    Poll::Ready(Ok(())) if filled.filled().is_empty() => Some(self.sender_gone()),
                    Poll::Ready(Ok(())) => self.pass_on(filled.filled(), dst, cx, counters),
                }
            });
            if let Some(turn) = step {
                return turn;
            }
        }
        // A busy pair of sockets yields to the other sessions of this thread.
        cx.waker().wake_by_ref();
        Turn::Idle
    }

    /// Checks a chunk read from the sender and writes what may go on straight to the receiver;
    /// what it does not take now waits in `out`.
    fn pass_on<D: AsyncWrite + Unpin>(
        &mut self,
        chunk: &[u8],
        dst: &mut D,
        cx: &mut Context<'_>,
        counters: &RelayCounters,
    ) -> Option<Turn> {
        let (pass, turn) = self.read(chunk, counters);
        let mut written = 0;
        if !self.dead {
            while written < pass {
                match Pin::new(&mut *dst).poll_write(cx, &chunk[written..pass]) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        written += n;
                        self.unflushed = true;
                    }
                    Poll::Ready(_) => return Some(self.receiver_gone()),
                    Poll::Pending => break,
                }
            }
            self.out.extend_from_slice(&chunk[written..pass]);
        }
        turn
    }

    fn sender_gone(&mut self) -> Turn {
        self.ended = true;
        Turn::SenderGone
    }

    fn receiver_gone(&mut self) -> Turn {
        self.dead = true;
        (self.out, self.out_at) = (Vec::new(), 0);
        Turn::ReceiverGone
    }
}

struct Relay<C, B> {
    client: C,
    bot: B,
    /// Client to bot, and bot to client.
    up: Pipe,
    down: Pipe,
    limits: BridgeLimits,
    counters: RelayCounters,
    stop: Option<oneshot::Receiver<Stop>>,
    ends_at: Instant,
    next_beat: Instant,
    /// How the session ended, once it has; it then has until `grace_until` to close.
    closing: Option<Outcome>,
    grace_until: Instant,
    /// Whether the client's and the bot's sockets were shut for writing.
    shut: (bool, bool),
}

impl<C, B> Relay<C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    fn pipe(&mut self, from: Side) -> &mut Pipe {
        match from {
            Side::Client => &mut self.up,
            Side::Bot => &mut self.down,
        }
    }

    fn deadline(&self) -> Instant {
        match self.closing {
            Some(_) => self.grace_until,
            None => self.ends_at.min(self.next_beat),
        }
    }

    /// Relays until the session's end is decided (`to_the_end` false) or until it is closed.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        mut timer: Pin<&mut Sleep>,
        to_the_end: bool,
    ) -> Poll<Outcome> {
        loop {
            let mut changed = false;
            if self.closing.is_none()
                && let Some(stop) = &mut self.stop
                && let Poll::Ready(why) = Pin::new(stop).poll(cx)
            {
                self.stop = None;
                if let Ok(why) = why {
                    self.end(Ending::stopped(why));
                }
                changed = true;
            }
            if timer.as_mut().poll(cx).is_ready() {
                if let Some(outcome) = self.on_timer() {
                    return Poll::Ready(outcome);
                }
                timer.as_mut().reset(self.deadline());
                continue;
            }
            let turn = self.up.pump(&mut self.client, &mut self.bot, cx, &self.counters);
            changed |= self.turn(Side::Client, turn);
            let turn = self.down.pump(&mut self.bot, &mut self.client, cx, &self.counters);
            changed |= self.turn(Side::Bot, turn);
            if let Some(outcome) = self.closing
                && self.may_shut()
            {
                // FIN after the last frame. A side that broke the protocol may still be
                // sending: it is read until it closes too, so that no unread byte turns the
                // close into a reset that loses the close frame on its way.
                self.up.forward = false;
                self.down.forward = false;
                if !self.shut.0 {
                    self.shut.0 = Pin::new(&mut self.client).poll_shutdown(cx).is_ready();
                }
                if !self.shut.1 {
                    self.shut.1 = Pin::new(&mut self.bot).poll_shutdown(cx).is_ready();
                }
                let drained = |p: &Pipe| !p.broken || p.ended;
                if self.shut == (true, true) && drained(&self.up) && drained(&self.down) {
                    return Poll::Ready(outcome);
                }
            }
            if let (Some(outcome), false) = (self.closing, to_the_end) {
                return Poll::Ready(outcome);
            }
            if !changed {
                return Poll::Pending;
            }
            if timer.deadline() != self.deadline() {
                timer.as_mut().reset(self.deadline());
            }
        }
    }

    /// Acts on what a pipe's turn ended with; returns whether anything changed.
    fn turn(&mut self, from: Side, turn: Turn) -> bool {
        let other = match from {
            Side::Client => Side::Bot,
            Side::Bot => Side::Client,
        };
        match turn {
            Turn::Idle => return false,
            Turn::SenderGone => self.end(Ending::gone(from)),
            Turn::ReceiverGone => self.end(Ending::gone(other)),
            Turn::Refused(violation) => self.end(Ending::refused(from, violation)),
            Turn::Closed(code) => {
                if self.closing.is_none() {
                    // The close went on as it was; the receiver's answer goes back the same way.
                    self.closing = Some(Ending::closed_by(from, code));
                    self.grace_until = Instant::now() + CLOSE_GRACE;
                    self.pipe(from).forward = false;
                    self.pipe(other).awaiting_close = true;
                }
            }
        }
        true
    }

    /// Ends the session (the first ending counts): no more data either way, and each side that
    /// can still take one gets the broker's close.
    fn end(&mut self, ending: Ending) {
        if self.closing.is_some() {
            return;
        }
        self.closing = Some(ending.outcome);
        self.grace_until = Instant::now() + CLOSE_GRACE;
        self.up.forward = false;
        self.down.forward = false;
        if let Some((code, reason)) = ending.to_bot
            && self.up.inject(wire::close_frame(code.into(), reason, Sender::Server))
        {
            self.down.awaiting_close = true;
        }
        if let Some((code, reason)) = ending.to_client
            && self.down.inject(wire::close_frame(code.into(), reason, Sender::Client))
        {
            self.up.awaiting_close = true;
        }
    }

    /// Whether everything is written and each awaited close came (or its side went away).
    fn may_shut(&self) -> bool {
        let answered = |p: &Pipe| !p.awaiting_close || p.close_seen || p.ended || p.broken;
        self.up.flushed() && self.down.flushed() && answered(&self.up) && answered(&self.down)
    }

    /// The timer fired: the grace is over (returns the outcome), the duration is reached, or a
    /// heartbeat is due.
    fn on_timer(&mut self) -> Option<Outcome> {
        let now = Instant::now();
        if let Some(outcome) = self.closing {
            return (now >= self.grace_until).then_some(outcome);
        }
        if now >= self.ends_at {
            self.end(Ending::duration_reached());
        } else if now >= self.next_beat {
            self.next_beat = now + self.limits.heartbeat_interval;
            let timeout = self.limits.heartbeat_timeout;
            if now.duration_since(self.up.seen) > timeout {
                self.end(Ending::silent(Side::Client));
            } else if now.duration_since(self.down.seen) > timeout {
                self.end(Ending::silent(Side::Bot));
            } else {
                // A ping to each side, unless the stream to it is mid-frame or backed up: then
                // the next beat tries again.
                if self.up.out.is_empty() {
                    self.up.inject(wire::encode(opcode::PING, b"", Sender::Server));
                }
                if self.down.out.is_empty() {
                    self.down.inject(wire::encode(opcode::PING, b"", Sender::Client));
                }
            }
        }
        None
    }
}

/// How a session ends: the outcome, and the close each side receives from the broker.
struct Ending {
    outcome: Outcome,
    to_client: Option<(CloseCode, &'static str)>,
    to_bot: Option<(CloseCode, &'static str)>,
}

impl Ending {
    /// A side closed; its close went on to the other unchanged.
    fn closed_by(from: Side, code: Option<u16>) -> Outcome {
        match (from, code) {
            (Side::Client, _) => {
                Outcome { reason: EndReason::ClientClosed, detail: "client closed" }
            }
            (Side::Bot, Some(1000)) => {
                Outcome { reason: EndReason::Completed, detail: "bot closed normally" }
            }
            (Side::Bot, _) => Outcome { reason: EndReason::BotClosed, detail: "bot closed" },
        }
    }

    /// A side broke the protocol or sent a message over the size limit.
    fn refused(from: Side, violation: Violation) -> Self {
        let (code, detail) = match (from, violation) {
            (Side::Client, Violation::TooBig) => (CloseCode::Size, "client message too big"),
            (Side::Client, Violation::Protocol(_)) => {
                (CloseCode::Protocol, "client protocol error")
            }
            (Side::Bot, Violation::TooBig) => (CloseCode::Size, "bot message too big"),
            (Side::Bot, Violation::Protocol(_)) => (CloseCode::Protocol, "bot protocol error"),
        };
        match from {
            Side::Client => Self {
                outcome: Outcome { reason: EndReason::ClientClosed, detail },
                to_client: Some((code, detail)),
                to_bot: Some((CloseCode::Away, "client connection failed")),
            },
            Side::Bot => Self {
                outcome: Outcome { reason: EndReason::BotClosed, detail },
                to_client: Some((CloseCode::Error, "bot connection failed")),
                to_bot: Some((code, detail)),
            },
        }
    }

    /// A side vanished without a close frame.
    fn gone(side: Side) -> Self {
        match side {
            Side::Client => Self {
                outcome: Outcome { reason: EndReason::ClientClosed, detail: "client disconnected" },
                to_client: None,
                to_bot: Some((CloseCode::Away, "client disconnected")),
            },
            Side::Bot => Self {
                outcome: Outcome { reason: EndReason::BotClosed, detail: "bot disconnected" },
                to_client: Some((CloseCode::Error, "bot disconnected")),
                to_bot: None,
            },
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
            to_client: Some((CloseCode::Away, detail)),
            to_bot: Some((CloseCode::Away, detail)),
        }
    }

    fn duration_reached() -> Self {
        let detail = "max_session_duration reached";
        Self {
            outcome: Outcome { reason: EndReason::Timeout, detail },
            to_client: Some((CloseCode::Normal, detail)),
            to_bot: Some((CloseCode::Normal, detail)),
        }
    }

    fn stopped(why: Stop) -> Self {
        let (outcome, code) = match why {
            Stop::Terminated => (
                Outcome { reason: EndReason::Terminated, detail: "session terminated" },
                CloseCode::from(TERMINATED_CLOSE_CODE),
            ),
            Stop::LeaseLost => (
                Outcome { reason: EndReason::ReplicaLost, detail: "session lease lost" },
                CloseCode::Away,
            ),
            Stop::Draining => (
                Outcome { reason: EndReason::Terminated, detail: "replica shutting down" },
                CloseCode::Away,
            ),
        };
        Self {
            outcome,
            to_client: Some((code, outcome.detail)),
            to_bot: Some((code, outcome.detail)),
        }
    }
}

impl AsyncRead for BotStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BotStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
