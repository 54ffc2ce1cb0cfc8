//! The broker against its own ceilings, in one run: `cargo bench --bench broker`.
//!
//! Starts a real `redis-server`, the echo bot and the broker (release build) as processes pinned
//! to core 0, and drives them from this process pinned to core 1: HTTP ceiling, `/start`, full
//! sessions through the broker and directly to the bot, relay round trips and message rates,
//! server CPU per connect with and without the token gate, and memory per idle bridged session.
//! Prints one table of figures and one of ratios. Numbers are never asserted: machines are
//! noisy; compare ratios from the same run. `--quick` runs each figure briefly, as a smoke check.

#[path = "support/far_store.rs"]
mod far_store;
#[path = "support/haproxy.rs"]
mod haproxy;
#[path = "support/soak.rs"]
mod soak;

/// `--soak SECONDS`: the soak instead of the figures (see `support/soak.rs`).
fn soak_seconds() -> Option<u64> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == "--soak")?;
    Some(args.get(at + 1).and_then(|s| s.parse().ok()).unwrap_or(600))
}

use std::{
    cell::RefCell,
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    rc::Rc,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use futures_util::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::{WebSocketStream, tungstenite::Message};

const KEY: &str = "pk_bench_key";
const SIGNING_KEY: &str = "bench-signing-key-0123456789abcdefghij";
/// One 20 ms frame of 8 kHz mu-law audio, what a phone call sends.
const FRAME_BYTES: usize = 160;
/// File descriptors the harness and its children should be allowed: 10,000 bridged sessions
/// need two per session in the broker, one in the bot and one here.
const FD_WANTED: u64 = 65_536;
/// Warning and error lines of each server process shown on the harness's standard error.
const MAX_SERVER_LINES_SHOWN: usize = 20;
/// Descriptors the broker needs besides its sessions' (listener, Redis, epoll, logs, ...).
const FD_MARGIN: u64 = 200;

#[derive(Clone)]
struct Plan {
    warmup: Duration,
    measure: Duration,
    idle_counts: [usize; 2],
    /// Concurrent paced calls of the calls figures.
    calls: &'static [usize],
    /// Sessions opened one after another for the far-store figure, at each distance.
    far_samples: usize,
}

/// Clients at once in the far-store figure's second half.
const FAR_AT_A_TIME: usize = 8;
const AT_A_TIME_LABEL: &str = "8 at a time";

/// The added round-trip time to Redis of the far-store figure.
const FAR_RTT: Duration = Duration::from_millis(50);

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                warmup: Duration::from_millis(100),
                measure: Duration::from_millis(400),
                idle_counts: [100, 200],
                calls: &[50],
                far_samples: 5,
            }
        } else {
            Self {
                warmup: Duration::from_secs(1),
                measure: Duration::from_secs(5),
                idle_counts: [1_000, 10_000],
                calls: &[250, 1_000],
                far_samples: 60,
            }
        }
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it, and
    // a test run has no business starting a 90-second measurement.
    if !std::env::args().any(|a| a == "--bench") {
        println!("the broker benchmark runs under `cargo bench --bench broker`");
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let mut plan = Plan::new(quick);
    let fd_limit = raise_fd_limit();
    let most_sessions = (fd_limit.saturating_sub(FD_MARGIN) / 2) as usize;
    if plan.idle_counts[1] > most_sessions {
        println!(
            "open-file limit is {fd_limit} and cannot be raised here: measuring {most_sessions} idle \
             sessions instead of {} (the broker holds two descriptors per session)",
            plan.idle_counts[1]
        );
        plan.idle_counts[1] = most_sessions;
    }
    let pinning = pin_self_to_core(1);
    if let Some(seconds) = soak_seconds() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, soak::run(Duration::from_secs(seconds), pinning));
        return;
    }
    // One generator thread: the load comes from one core, the server side runs on the other.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, run(plan, pinning));
}

/// Pipecat Cloud deploy files of org `bench`: `bench` (token sessions) and `open` (none); their
/// bot comes from the broker's settings.
fn agent_dir() -> tempfile::TempDir {
    let agents = tempfile::tempdir().unwrap();
    let org_dir = agents.path().join("bench");
    std::fs::create_dir(&org_dir).unwrap();
    for (name, auth) in [("bench", "token"), ("open", "none")] {
        let text = format!("agent_name = \"{name}\"\nwebsocket_auth = \"{auth}\"\n");
        std::fs::write(org_dir.join(format!("{name}.toml")), text).unwrap();
    }
    agents
}

async fn run(plan: Plan, pinning: bool) {
    let server_prefix: Vec<String> =
        if pinning { vec!["taskset".into(), "-c".into(), "0".into()] } else { Vec::new() };
    let redis = Proc::redis(&server_prefix);
    let bot = Proc::bot(&server_prefix);
    let agents = agent_dir();
    let bot_url = format!("ws://{}/", bot.addr);
    let broker = Proc::broker(&server_prefix, &redis.addr, agents.path(), &bot_url, &[]);
    let broker_addr = broker.addr;

    println!(
        "session-broker benchmark: {} mode; generator on core 1, broker + redis + bot on core 0 {}",
        if plan.measure < Duration::from_secs(1) { "quick" } else { "full" },
        if pinning {
            "(pinned with taskset)"
        } else {
            "(NOT pinned: taskset unavailable or one core)"
        }
    );
    println!(
        "warm-up {:?} then {:?} per figure; broker: release build, 1 worker, log level warn; loopback\n",
        plan.warmup, plan.measure
    );

    if let Some(at) = std::env::args().position(|a| a == "--profile") {
        // Churn of sessions for a profiler to watch: `perf record -p <pid>`.
        let seconds = std::env::args().nth(at + 1).and_then(|s| s.parse().ok()).unwrap_or(20);
        // `--relay [N]`: echoes over N (32) established sessions instead of a churn.
        let relay = std::env::args().position(|a| a == "--relay").map(|at| {
            std::env::args().nth(at + 1).and_then(|n| n.parse::<usize>().ok()).unwrap_or(32)
        });
        let load = match relay {
            Some(sessions) => format!("echoes over {sessions} sessions"),
            None => "connect+echo+close".to_owned(),
        };
        println!(
            "broker pid {} (redis {}, bot {}): {seconds} s of {load}",
            broker.pid(),
            redis.pid(),
            bot.pid()
        );
        let plan = Plan { measure: Duration::from_secs(seconds), ..plan };
        if std::env::args().any(|a| a == "--haproxy") {
            // The same load through HAProxy, to profile the peer the same way.
            let peer = haproxy::HaProxy::start(&server_prefix, bot.addr).expect("HAProxy runs");
            println!("haproxy pid {}", peer.pid());
            if let Some(sessions) = relay {
                let echoes = phase(&plan, sessions, relay_worker(peer.addr, Target::Direct)).await;
                println!("{:.0} messages/s", echoes.rate);
                return;
            }
            let churn = phase(&plan, 32, session_worker(peer.addr, Target::Direct)).await;
            println!("{:.0} sessions/s", churn.rate);
            return;
        }
        if let Some(sessions) = relay {
            let echoes = phase(&plan, sessions, relay_worker(broker_addr, Target::Open)).await;
            println!("{:.0} messages/s", echoes.rate);
            return;
        }
        // `--token`: sessions of a token agent, each with its /start.
        let target =
            if std::env::args().any(|a| a == "--token") { Target::Broker } else { Target::Open };
        let churn = phase(&plan, 32, session_worker(broker_addr, target)).await;
        println!("{:.0} sessions/s", churn.rate);
        return;
    }
    if std::env::args().any(|a| a == "--cpu") {
        let embedded = Proc::embedded_broker(&server_prefix, agents.path(), &bot_url);
        cpu_rounds(&plan, [&broker, &embedded], &redis, &bot, &server_prefix).await;
        return;
    }
    if let Some(at) = std::env::args().position(|a| a == "--against") {
        let other = std::env::args().nth(at + 1).expect("--against takes a session-broker binary");
        let theirs = Proc::redis(&server_prefix);
        let other = Proc::broker_of(
            &other,
            &server_prefix,
            Some(&theirs.addr),
            agents.path(),
            &bot_url,
            &[],
        );
        against(&plan, [(&broker, &redis), (&other, &theirs)]).await;
        return;
    }
    if std::env::args().any(|a| a == "--relay") {
        // Only the relay's figures beside HAProxy's, in rounds: for working on them.
        let peer = haproxy::HaProxy::start(&server_prefix, bot.addr);
        let relay = relay_rounds(&plan, broker_addr, bot.addr, peer.as_ref().map(|p| p.addr)).await;
        for (at, path) in relay.paths.iter().enumerate() {
            let [rtt, rate] = [&relay.rtt[at], &relay.rate[at]];
            println!(
                "{path}: 1 session p50 {} p99 {}; 32 sessions {:.0} messages/s{}",
                us(rtt.p50),
                us(rtt.p99),
                rate.rate,
                relay.of_rounds()
            );
        }
        return;
    }
    if let Some(at) = std::env::args().position(|a| a == "--calls") {
        // Only the paced calls, in rounds, for working on them.
        let count = std::env::args().nth(at + 1).and_then(|n| n.parse().ok()).unwrap_or(250);
        let peer = haproxy::HaProxy::start(&server_prefix, bot.addr);
        for _ in 0..rounds() {
            let calls = paced_calls(&plan, count, &broker, &bot, peer.as_ref()).await;
            println!("{}\n{}\n", calls.row(), calls.summary());
        }
        return;
    }
    if std::env::args().any(|a| a == "--memory") {
        // Only the idle-memory figure, beside HAProxy's: for working on it.
        let peer = haproxy::HaProxy::start(&server_prefix, bot.addr);
        for count in plan.idle_counts {
            let broker = idle_bytes_per_session(broker_addr, broker.pid(), count, true).await;
            let peer = match &peer {
                Some(peer) => idle_bytes_per_session(peer.addr, peer.pid(), count, false).await,
                None => f64::NAN,
            };
            println!(
                "{count} idle sessions: broker {:.1} KiB, HAProxy {:.1} KiB per session",
                broker / 1024.0,
                peer / 1024.0
            );
        }
        return;
    }

    let mut rows = Vec::new();
    // The ceiling: a trivial GET on the same process and core (probes are on the internal
    // listener, also one worker).
    let internal = broker.internal.expect("the broker has an internal listener");
    let healthz = phase(&plan, 64, http_worker(internal, get_request(internal, "/healthz"))).await;
    rows.push(("GET /healthz (HTTP ceiling)", healthz.clone()));
    let start = phase(&plan, 64, http_worker(broker_addr, start_request(broker_addr))).await;
    rows.push(("POST /start (mint, record)", start.clone()));

    let servers = [("broker", broker.pid()), ("redis", redis.pid()), ("bot", bot.pid())];
    let meter = CpuMeter::new(&servers);
    let full = phase(&plan, 32, session_worker(broker_addr, Target::Broker)).await;
    let full_cpu = meter.per_op(full.count);
    rows.push(("session via broker: /start+connect+echo+close", full.clone()));
    let meter = CpuMeter::new(&servers);
    let open = phase(&plan, 32, session_worker(broker_addr, Target::Open)).await;
    let open_cpu = meter.per_op(open.count);
    rows.push(("connect+echo+close via broker, no token", open.clone()));
    // Tokens minted beforehand, so that the gate is measured without /start: enough for the
    // phase at three times the ungated rate (a noisy machine measured the ungated phase at a
    // moment of a third less, and ran out of tokens with half as much to spare).
    let wanted = (open.rate * (plan.warmup + plan.measure).as_secs_f64() * 3.0) as usize + 64;
    let pool = mint_tokens(broker_addr, wanted).await;
    let meter = CpuMeter::new(&servers);
    let gated = phase(&plan, 32, session_worker(broker_addr, Target::Minted(pool))).await;
    let gated_cpu = meter.per_op(gated.count);
    rows.push(("connect+echo+close via broker, token minted before", gated.clone()));
    let bot_addr = bot.addr;
    let meter = CpuMeter::new(&servers);
    let direct = phase(&plan, 32, session_worker(bot_addr, Target::Direct)).await;
    let direct_cpu = meter.per_op(direct.count);
    rows.push(("connect+echo+close direct to bot", direct.clone()));

    // The peer: HAProxy proxying the same bot, on the same core, measured the same way.
    let peer = haproxy::HaProxy::start(&server_prefix, bot_addr);
    let mut peer_figures = None;
    if let Some(peer) = &peer {
        let meter = CpuMeter::new(&[("haproxy", peer.pid()), ("bot", bot.pid())]);
        let sessions = phase(&plan, 32, session_worker(peer.addr, Target::Direct)).await;
        let cpu = meter.per_op(sessions.count);
        rows.push(("connect+echo+close via HAProxy", sessions.clone()));
        peer_figures = Some((sessions, cpu));
    }
    // The floor under the broker's CPU: the same churns through a broker on its embedded store,
    // which costs no store round trip at all.
    let embedded = Proc::embedded_broker(&server_prefix, agents.path(), &bot_url);
    let mut floor_cpu = Vec::new();
    for target in [Target::Open, Target::Broker] {
        let meter = CpuMeter::new(&[("broker", embedded.pid())]);
        let sessions = phase(&plan, 32, session_worker(embedded.addr, target)).await;
        floor_cpu.push(meter.per_op(sessions.count)[0]);
    }
    drop(embedded);
    let relay = relay_rounds(&plan, broker_addr, bot_addr, peer.as_ref().map(|p| p.addr)).await;
    let [relay_rtt, direct_rtt] = [0, 1].map(|path| relay.rtt[path].clone());
    let [relay_rate, direct_rate] = [0, 1].map(|path| relay.rate[path].clone());
    for (at, path) in relay.paths.iter().enumerate() {
        let name = format!("relay RTT, 160 B, 1 session, {path}{}", relay.of_rounds());
        rows.push((leak(name), relay.rtt[at].clone()));
    }
    for (at, path) in relay.paths.iter().enumerate() {
        let name = format!("relay, 160 B, 32 sessions, {path}{}", relay.of_rounds());
        rows.push((leak(name), relay.rate[at].clone()));
    }

    println!("| figure | ops/s | p50 | p90 | p99 |\n|---|---:|---:|---:|---:|");
    for (name, f) in &rows {
        println!("| {name} | {:.0} | {} | {} | {} |", f.rate, us(f.p50), us(f.p90), us(f.p99));
    }

    let mut memory = Vec::new();
    for count in plan.idle_counts {
        let broker_bytes = idle_bytes_per_session(broker_addr, broker.pid(), count, true).await;
        let peer_bytes = match &peer {
            Some(peer) => Some(idle_bytes_per_session(peer.addr, peer.pid(), count, false).await),
            None => None,
        };
        memory.push((count, broker_bytes, peer_bytes));
    }
    // Calls: each sends a 20 ms media frame (Twilio's JSON, 160 B of μ-law) and reads the
    // bot's echo, 50 frames a second, all at once; the delay is each frame's round trip. After
    // the idle sessions, whose memory figure a busier heap before them would blur.
    let mut call_figures = Vec::new();
    for &count in plan.calls {
        let calls = paced_calls(&plan, count, &broker, &bot, peer.as_ref()).await;
        println!("{}", calls.row());
        call_figures.push(calls);
    }

    println!(
        "\n| idle bridged sessions | broker RSS growth per session | HAProxy's per tunnel |\n|---:|---:|---:|"
    );
    for (count, bytes, peer_bytes) in &memory {
        let peer = peer_bytes.map_or("—".into(), |b| format!("{:.1} KiB", b / 1024.0));
        println!("| {count} | {:.1} KiB | {peer} |", bytes / 1024.0);
    }
    println!("\n| server CPU per session (µs) | broker | redis | bot |\n|---|---:|---:|---:|");
    for (name, cpu) in [
        ("/start + connect + echo + close, token agent", &full_cpu),
        ("connect + echo + close, token minted before", &gated_cpu),
        ("connect + echo + close, agent without token", &open_cpu),
        ("connect + echo + close, direct to the bot", &direct_cpu),
    ] {
        println!("| {name} | {:.0} | {:.0} | {:.0} |", cpu[0], cpu[1], cpu[2]);
    }
    for (cpu, name) in floor_cpu.iter().zip([
        "connect + echo + close, agent without token",
        "/start + connect + echo + close, token agent",
    ]) {
        println!("| {name}, broker on its embedded store (no Redis) | {cpu:.0} | — | — |");
    }

    if let Some((_, cpu, ..)) = &peer_figures {
        println!(
            "| connect + echo + close via HAProxy (its CPU in the broker column) | {:.0} | — | {:.0} |",
            cpu[0], cpu[1]
        );
    }

    for calls in &call_figures {
        println!("\n{}", calls.summary());
    }

    // The far store: a broker of its own (rate limits on, as shipped), near Redis and behind
    // the delay proxy, sessions opened one at a time.
    let (mut far, mut far_together) = (Vec::new(), Vec::new());
    for rtt in [Duration::ZERO, FAR_RTT] {
        let redis_addr = match rtt.is_zero() {
            true => redis.addr,
            false => far_store::delay_proxy(redis.addr, rtt / 2),
        };
        let limits = [
            ("BROKER__LIMITS__START_RATE_PER_KEY", "1000000"),
            ("BROKER__LIMITS__START_RATE_PER_ADDRESS", "1000000"),
        ];
        let distant = Proc::broker(&server_prefix, &redis_addr, agents.path(), &bot_url, &limits);
        far.push((rtt, far_figures(distant.addr, plan.far_samples, 1).await));
        // The same, FAR_AT_A_TIME clients at once: a caller waits for its own round trip only,
        // never for another's.
        let together = far_figures(distant.addr, plan.far_samples, FAR_AT_A_TIME).await;
        far_together.push((rtt, together));
    }
    println!(
        "\n| Redis RTT added | sessions opened | /start p50 | /start p99 | connect (to 101) p50 | connect p99 |\n|---:|---|---:|---:|---:|---:|"
    );
    let rows = far.iter().map(|row| ("one at a time", row));
    let rows = rows.chain(far_together.iter().map(|row| (AT_A_TIME_LABEL, row)));
    for (how, (rtt, (start, connect))) in rows {
        println!(
            "| {} ms | {how} | {} | {} | {} | {} |",
            rtt.as_millis(),
            us(start.p50),
            us(start.p99),
            us(connect.p50),
            us(connect.p99)
        );
    }
    let in_rtts = |pick: fn(&(Figures, Figures)) -> Duration| {
        (pick(&far[1].1).as_secs_f64() - pick(&far[0].1).as_secs_f64()) / FAR_RTT.as_secs_f64()
    };
    let together_in_rtts = |pick: fn(&(Figures, Figures)) -> Duration| {
        let [near, distant] = [&far_together[0].1, &far_together[1].1];
        (pick(distant).as_secs_f64() - pick(near).as_secs_f64()) / FAR_RTT.as_secs_f64()
    };

    let worst_memory = memory.iter().map(|(_, b, _)| *b).fold(0.0, f64::max);
    let ratios = [
        ("/start ÷ HTTP ceiling", start.rate / healthz.rate, "≥ 0.50"),
        (
            "token gate ÷ ungated connect, broker + redis CPU",
            (gated_cpu[0] + gated_cpu[1]) / (open_cpu[0] + open_cpu[1]),
            "≤ 1.30",
        ),
        ("full session via broker ÷ direct", full.rate / direct.rate, "≥ 0.45"),
        (
            "relay p50 RTT added (µs)",
            (relay_rtt.p50.as_secs_f64() - direct_rtt.p50.as_secs_f64()) * 1e6,
            "≤ 100",
        ),
        (
            "relay p99 RTT added (µs)",
            (relay_rtt.p99.as_secs_f64() - direct_rtt.p99.as_secs_f64()) * 1e6,
            "≤ 300",
        ),
        ("relay messages/s via broker ÷ direct", relay_rate.rate / direct_rate.rate, "≥ 0.45"),
        ("broker memory per idle session (KiB)", worst_memory / 1024.0, "< 64"),
        ("far store: /start p50 added, in RTTs", in_rtts(|f| f.0.p50), "≤ 1.2"),
        ("far store: /start p99 added, in RTTs", in_rtts(|f| f.0.p99), "≤ 1.2"),
        ("far store: connect p50 added, in RTTs", in_rtts(|f| f.1.p50), "≤ 1.2"),
        ("far store: connect p99 added, in RTTs", in_rtts(|f| f.1.p99), "≤ 1.2"),
        (
            "far store, 8 at a time: /start p50 added, in RTTs",
            together_in_rtts(|f| f.0.p50),
            "≤ 1.2",
        ),
        (
            "far store, 8 at a time: connect p50 added, in RTTs",
            together_in_rtts(|f| f.1.p50),
            "≤ 1.2",
        ),
        (
            "far store, 8 at a time: connect p99 added, in RTTs",
            together_in_rtts(|f| f.1.p99),
            "≤ 1.2",
        ),
    ];
    let mut ratios = ratios.to_vec();
    if let Some((sessions, cpu)) = &peer_figures {
        let peer_memory = memory.iter().filter_map(|(_, _, p)| *p).fold(0.0, f64::max);
        ratios.extend([
            (
                "HAProxy: sessions/s via broker (no token) ÷ via HAProxy",
                open.rate / sessions.rate,
                "—",
            ),
            (
                "HAProxy: broker + redis CPU per session (no token) ÷ HAProxy's",
                (open_cpu[0] + open_cpu[1]) / cpu[0],
                "≤ 1.2",
            ),
            (
                "HAProxy: broker + redis CPU per session (token, /start) ÷ HAProxy's",
                (full_cpu[0] + full_cpu[1]) / cpu[0],
                "≤ 1.5",
            ),
            (
                "HAProxy: the floor: embedded-store broker CPU per session (no token) ÷ HAProxy's",
                floor_cpu[0] / cpu[0],
                "—",
            ),
            (
                "HAProxy: the floor: embedded-store broker CPU per session (token, /start) ÷ HAProxy's",
                floor_cpu[1] / cpu[0],
                "—",
            ),
            (
                "HAProxy: relay messages/s, 32 sessions, broker ÷ HAProxy (median of rounds)",
                median(relay.rate_ratios.clone()),
                "≥ 1.0",
            ),
            (
                "HAProxy: p50 RTT added, broker ÷ HAProxy (median of rounds)",
                median(relay.p50_ratios.clone()),
                "≤ 1.0",
            ),
            (
                "HAProxy: p99 RTT added, broker ÷ HAProxy (median of rounds)",
                median(relay.p99_ratios.clone()),
                "—",
            ),
            (
                "HAProxy: memory per idle session, broker ÷ HAProxy",
                worst_memory / peer_memory,
                "≤ 1.0",
            ),
        ]);
    }
    println!("\n| ratio | this run | target |\n|---|---:|---:|");
    for (name, value, target) in ratios {
        println!("| {name} | {value:.2} | {target} |");
    }
}

/// The relay's figures over each path, measured in rounds that take the paths in turn.
struct Relay {
    rounds: usize,
    /// The paths' names: via the broker, direct, and via HAProxy if it runs.
    paths: Vec<&'static str>,
    /// Per path, the median over rounds of each figure of the round trip over one session.
    rtt: Vec<Figures>,
    /// Per path, the same for echoes over 32 sessions.
    rate: Vec<Figures>,
    /// Per round, the broker's (path 0) messages/s over HAProxy's (path 2).
    rate_ratios: Vec<f64>,
    /// Per round, the round trip the broker adds over direct (path 1), over HAProxy's.
    p50_ratios: Vec<f64>,
    p99_ratios: Vec<f64>,
}

/// Measures the relay over each path (the broker, the bot directly and HAProxy, in that order)
/// in rounds that take them in turn, each round starting from a different path. This VM's pace
/// drifts over seconds: measured one path after the other, the broker ÷ HAProxy ratios of one
/// and the same code ranged from 0.88 to 1.12 between runs (BENCHMARKS.md, session 8); taken in
/// turn, each round's ratio sets paths side by side that ran within seconds of each other, and
/// the median of the rounds is printed with each round's.
async fn relay_rounds(
    plan: &Plan,
    broker: SocketAddr,
    bot: SocketAddr,
    haproxy: Option<SocketAddr>,
) -> Relay {
    let mut paths = vec![("via broker", broker, Target::Broker), ("direct", bot, Target::Direct)];
    if let Some(haproxy) = haproxy {
        paths.push(("via HAProxy", haproxy, Target::Direct));
    }
    let rounds = if plan.measure < Duration::from_secs(1) { 1 } else { rounds() };
    let plan = Plan { measure: plan.measure / 2, ..plan.clone() };
    let mut rtt = vec![Vec::new(); paths.len()];
    let mut rate = vec![Vec::new(); paths.len()];
    for round in 0..rounds {
        for turn in 0..paths.len() {
            let at = (round + turn) % paths.len();
            let (_, addr, target) = paths[at].clone();
            rtt[at].push(phase(&plan, 1, relay_worker(addr, target.clone())).await);
            rate[at].push(phase(&plan, 32, relay_worker(addr, target)).await);
        }
    }
    let added = |round: usize, path: usize, q: fn(&Figures) -> Duration| {
        q(&rtt[path][round]).as_secs_f64() - q(&rtt[1][round]).as_secs_f64()
    };
    let (mut rate_ratios, mut p50_ratios, mut p99_ratios) = (Vec::new(), Vec::new(), Vec::new());
    if paths.len() > 2 {
        for (round, (ours, peers)) in rate[0].iter().zip(&rate[2]).enumerate() {
            rate_ratios.push(ours.rate / peers.rate);
            p50_ratios.push(added(round, 0, |f| f.p50) / added(round, 2, |f| f.p50));
            p99_ratios.push(added(round, 0, |f| f.p99) / added(round, 2, |f| f.p99));
        }
        let each = |ratios: &[f64]| -> String {
            ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" / ")
        };
        println!(
            "relay, broker ÷ HAProxy in each of {rounds} rounds: messages/s {}; p50 RTT added {}; p99 RTT added {}\n",
            each(&rate_ratios),
            each(&p50_ratios),
            each(&p99_ratios)
        );
    }
    let medians = |figures: Vec<Vec<Figures>>| -> Vec<Figures> {
        figures.into_iter().map(Figures::median).collect()
    };
    Relay {
        rounds,
        paths: paths.iter().map(|(name, ..)| *name).collect(),
        rtt: medians(rtt),
        rate: medians(rate),
        rate_ratios,
        p50_ratios,
        p99_ratios,
    }
}

impl Relay {
    /// What a row of medians says of itself.
    fn of_rounds(&self) -> String {
        match self.rounds {
            1 => String::new(),
            rounds => format!(" (median of {rounds} rounds)"),
        }
    }
}

/// The middle value (the upper one of an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A row's name made at run time, for the table of `&'static str` names.
fn leak(name: String) -> &'static str {
    Box::leak(name.into_boxed_str())
}

/// Rounds of `--cpu`, `--against` and a full run's relay figures, unless `--rounds N` says
/// otherwise.
const CPU_ROUNDS: usize = 3;

/// The two churns of `--cpu` and `--against`: sessions without a token, and with a token and
/// its `/start`.
fn churns() -> [(&'static str, Target); 2] {
    [
        ("connect + echo + close, agent without token", Target::Open),
        ("/start + connect + echo + close, token agent", Target::Broker),
    ]
}

/// The rounds asked for with `--rounds N`, or [`CPU_ROUNDS`].
fn rounds() -> usize {
    let args: Vec<String> = std::env::args().collect();
    let asked =
        args.iter().position(|a| a == "--rounds").and_then(|at| args.get(at + 1)?.parse().ok());
    asked.unwrap_or(CPU_ROUNDS).max(1)
}

/// This build beside another, both under the same churn *at the same time*, each with its own
/// Redis and all on the same core: whatever the machine does meanwhile, it does to both, so a
/// difference of a few percent shows where alternating runs drown it (BENCHMARKS.md, session
/// 8). Prints each round's CPU per session (and per echo, for the relay) and the ratios'
/// medians.
async fn against(plan: &Plan, stacks: [(&Proc, &Proc); 2]) {
    let rounds = rounds();
    // The churns, per session, then the relay, per echo over 32 established sessions.
    let mut phases: Vec<(&str, Option<Target>)> =
        churns().into_iter().map(|(name, target)| (name, Some(target))).collect();
    phases.push(("echo over 32 open sessions (the relay)", None));
    println!(
        "both at once, 32 sessions each; µs of CPU per session or echo, this build / the other\n"
    );
    println!(
        "| round | per session or echo | ops/s | broker | redis | broker + redis, ÷ the other's |"
    );
    println!("|---:|---|---|---|---|---:|");
    let mut ratios = vec![Vec::new(); phases.len()];
    for round in 1..=rounds {
        for (at, (name, target)) in phases.iter().cloned().enumerate() {
            let meters = stacks.map(|(broker, redis)| {
                CpuMeter::new(&[("broker", broker.pid()), ("redis", redis.pid())])
            });
            let [ours, theirs] = stacks.map(|(broker, _)| {
                let worker: Box<dyn Fn(Window) -> LoopFuture> = match target.clone() {
                    Some(target) => Box::new(session_worker(broker.addr, target)),
                    None => Box::new(relay_worker(broker.addr, Target::Open)),
                };
                phase(plan, 32, worker)
            });
            let (ours, theirs) = futures_util::future::join(ours, theirs).await;
            let cpu = [meters[0].per_op(ours.count), meters[1].per_op(theirs.count)];
            let ratio = (cpu[0][0] + cpu[0][1]) / (cpu[1][0] + cpu[1][1]);
            ratios[at].push(ratio);
            println!(
                "| {round} | {name} | {:.0} / {:.0} | {:.1} / {:.1} | {:.1} / {:.1} | {ratio:.3} |",
                ours.rate, theirs.rate, cpu[0][0], cpu[1][0], cpu[0][1], cpu[1][1]
            );
        }
    }
    println!("\n| this build's broker + redis CPU ÷ the other's | median of {rounds} | rounds |");
    println!("|---|---:|---|");
    for ((name, _), values) in phases.iter().zip(ratios) {
        let each: Vec<String> = values.iter().map(|r| format!("{r:.3}")).collect();
        println!("| {name} | {:.3} | {} |", median(values), each.join(" / "));
    }
}

/// `--cpu`: only the CPU per session, beside HAProxy's, for working on it. The phases run in
/// turn, round after round, and the ratios' medians are printed with every round's: on a shared
/// machine HAProxy's own reading moves by a quarter between runs, and a single round's ratio
/// moves with it. Each churn also runs through a broker on its embedded store, whose ratio is
/// the floor under the broker's: what the broker itself costs with no store round trip at all.
async fn cpu_rounds(
    plan: &Plan,
    [broker, embedded]: [&Proc; 2],
    redis: &Proc,
    bot: &Proc,
    prefix: &[String],
) {
    let rounds = rounds();
    let Some(peer) = haproxy::HaProxy::start(prefix, bot.addr) else {
        println!("HAProxy could not be started: no ratios");
        return;
    };
    let phases: Vec<(String, Target, &Proc, &str)> = churns()
        .into_iter()
        .zip(["≤ 1.2", "≤ 1.5"])
        .flat_map(|((name, target), goal)| {
            [
                (name.to_owned(), target.clone(), broker, goal),
                (format!("{name}, embedded store (no Redis)"), target, embedded, "floor"),
            ]
        })
        .collect();
    println!(
        "| round | per session | sessions/s | broker or HAProxy (µs) | redis (µs) | bot (µs) | ÷ HAProxy's |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    let mut ratios = vec![Vec::new(); phases.len()];
    for round in 1..=rounds {
        let mut rows = Vec::new();
        for (name, target, server, _) in &phases {
            let servers = [("broker", server.pid()), ("redis", redis.pid()), ("bot", bot.pid())];
            let meter = CpuMeter::new(&servers);
            let figures = phase(plan, 32, session_worker(server.addr, target.clone())).await;
            rows.push((name, figures.rate, meter.per_op(figures.count)));
        }
        let meter = CpuMeter::new(&[("haproxy", peer.pid()), ("bot", bot.pid())]);
        let figures = phase(plan, 32, session_worker(peer.addr, Target::Direct)).await;
        let peer_cpu = meter.per_op(figures.count);
        for (at, (name, rate, cpu)) in rows.iter().enumerate() {
            let ratio = (cpu[0] + cpu[1]) / peer_cpu[0];
            ratios[at].push(ratio);
            println!(
                "| {round} | {name} | {rate:.0} | {:.0} | {:.0} | {:.0} | {ratio:.2} |",
                cpu[0], cpu[1], cpu[2]
            );
        }
        println!(
            "| {round} | connect + echo + close via HAProxy | {:.0} | {:.0} | — | {:.0} | 1.00 |",
            figures.rate, peer_cpu[0], peer_cpu[1]
        );
    }
    println!(
        "\n| broker + redis CPU per session ÷ HAProxy's | median of {rounds} | rounds | target |"
    );
    println!("|---|---:|---|---:|");
    for ((name, _, _, goal), values) in phases.iter().zip(ratios) {
        let each: Vec<String> = values.iter().map(|r| format!("{r:.2}")).collect();
        println!("| {name} | {:.2} | {} | {goal} |", median(values), each.join(" / "));
    }
}

/// Throughput and latency of one figure.
#[derive(Clone, Debug)]
struct Figures {
    count: usize,
    rate: f64,
    p50: Duration,
    p90: Duration,
    p99: Duration,
}

impl Figures {
    /// Summarizes the samples taken in a measured window of length `measure`.
    fn of(mut samples: Vec<Duration>, measure: Duration) -> Self {
        samples.sort_unstable();
        let pick = |q: f64| {
            let index = ((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1));
            samples.get(index).copied().unwrap_or_default()
        };
        Self {
            count: samples.len(),
            rate: samples.len() as f64 / measure.as_secs_f64(),
            p50: pick(0.50),
            p90: pick(0.90),
            p99: pick(0.99),
        }
    }
}

impl Figures {
    /// Each figure's median over several measurements of the same thing.
    fn median(rounds: Vec<Figures>) -> Figures {
        let of = |pick: fn(&Figures) -> Duration| -> Duration {
            let mut values: Vec<Duration> = rounds.iter().map(pick).collect();
            values.sort_unstable();
            values[values.len() / 2]
        };
        let rate = median(rounds.iter().map(|f| f.rate).collect());
        let mut counts: Vec<usize> = rounds.iter().map(|f| f.count).collect();
        counts.sort_unstable();
        Figures {
            count: counts[counts.len() / 2],
            rate,
            p50: of(|f| f.p50),
            p90: of(|f| f.p90),
            p99: of(|f| f.p99),
        }
    }
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// When a worker's samples count: after the warm-up, before the end.
#[derive(Clone, Copy)]
struct Window {
    from: Instant,
    until: Instant,
}

/// Runs `workers` copies of a worker for warm-up plus measure, and summarizes the samples taken
/// inside the measured window. Workers set themselves up during the warm-up.
async fn phase(plan: &Plan, workers: usize, worker: impl Fn(Window) -> LoopFuture) -> Figures {
    let now = Instant::now();
    let window = Window { from: now + plan.warmup, until: now + plan.warmup + plan.measure };
    let tasks: Vec<_> = (0..workers).map(|_| tokio::task::spawn_local(worker(window))).collect();
    let mut samples: Vec<Duration> = Vec::new();
    for task in tasks {
        samples.extend(task.await.unwrap());
    }
    Figures::of(samples, plan.measure)
}

type LoopFuture = std::pin::Pin<Box<dyn Future<Output = Vec<Duration>>>>;

impl Window {
    /// The start time of the next operation, or `None` once the window has closed.
    fn next(&self) -> Option<Instant> {
        let now = Instant::now();
        (now < self.until).then_some(now)
    }

    /// Keeps the duration of an operation begun at `began` if it began after the warm-up.
    fn record(&self, samples: &mut Vec<Duration>, began: Instant) {
        if began >= self.from {
            samples.push(began.elapsed());
        }
    }
}

// ----- HTTP: a minimal keep-alive client, so the generator costs as little as wrk would. -----

struct Http {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Http {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Self { stream, buf: Vec::with_capacity(4096) }
    }

    /// Sends one request and returns the status and body of its answer.
    async fn call(&mut self, request: &[u8]) -> (u16, Vec<u8>) {
        self.stream.write_all(request).await.unwrap();
        self.buf.clear();
        loop {
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).unwrap().to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                while self.buf.len() < end + 4 + length {
                    let n = self.stream.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "server closed mid-body");
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                let status = head[9..12].parse().unwrap();
                return (status, self.buf[end + 4..end + 4 + length].to_vec());
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn get_request(addr: SocketAddr, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes()
}

fn start_request(addr: SocketAddr) -> Vec<u8> {
    let body = r#"{"transport":"websocket"}"#;
    format!(
        "POST /v1/public/bench/start HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn http_worker(addr: SocketAddr, request: Vec<u8>) -> impl Fn(Window) -> LoopFuture {
    move |window| {
        let request = request.clone();
        Box::pin(async move {
            let mut http = Http::connect(addr).await;
            let mut samples = Vec::new();
            while let Some(began) = window.next() {
                let (status, _) = http.call(&request).await;
                assert_eq!(status, 200);
                window.record(&mut samples, began);
            }
            samples
        })
    }
}

// ----- WebSocket sessions -----

#[derive(Clone)]
enum Target {
    /// The token agent through the broker: /start, then connect with the token.
    Broker,
    /// The token agent through the broker, with a token from a pool minted beforehand.
    Minted(Rc<RefCell<Vec<String>>>),
    /// The agent without websocket auth through the broker: connect only.
    Open,
    /// The echo bot itself.
    Direct,
}

type Ws = WebSocketStream<TcpStream>;

/// Opens a session the way a client would; for the broker, `/start` over `http` first.
async fn open_session(addr: SocketAddr, target: &Target, http: &mut Option<Http>) -> Ws {
    let path = match target {
        Target::Broker => {
            let http = http.get_or_insert(Http::connect(addr).await);
            format!("/ws/generic/bench.bench/{}", mint(http, addr).await)
        }
        Target::Minted(pool) => {
            let token = pool.borrow_mut().pop().expect("the token pool is large enough");
            format!("/ws/generic/bench.bench/{token}")
        }
        Target::Open => "/ws/generic/open.bench".to_owned(),
        Target::Direct => "/".to_owned(),
    };
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}{path}"), stream)
        .await
        .unwrap_or_else(|e| panic!("connect {path}: {e}"));
    ws
}

/// Calls /start and returns the token.
async fn mint(http: &mut Http, addr: SocketAddr) -> String {
    let (status, body) = http.call(&start_request(addr)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    json["token"].as_str().unwrap().to_owned()
}

/// Opens `count` sessions one after another, each /start then connect, echo and close: the
/// time of each /start and of each connect (request to 101).
async fn far_figures(addr: SocketAddr, count: usize, at_a_time: usize) -> (Figures, Figures) {
    let workers: Vec<_> =
        (0..at_a_time).map(|_| tokio::task::spawn_local(far_samples(addr, count))).collect();
    let (mut starts, mut connects) = (Vec::new(), Vec::new());
    for worker in workers {
        let (s, c) = worker.await.unwrap();
        starts.extend(s);
        connects.extend(c);
    }
    let span = Duration::from_secs(1);
    (Figures::of(starts, span), Figures::of(connects, span))
}

/// `count` sessions opened one after another: how long each `/start`, and each connect to its
/// 101, took.
async fn far_samples(addr: SocketAddr, count: usize) -> (Vec<Duration>, Vec<Duration>) {
    let mut http = Http::connect(addr).await;
    let (mut starts, mut connects) = (Vec::new(), Vec::new());
    for i in 0..count + 2 {
        let began = Instant::now();
        let token = mint(&mut http, addr).await;
        let minted = began.elapsed();
        let began = Instant::now();
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let url = format!("ws://{addr}/ws/generic/bench.bench/{token}");
        let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
        let connected = began.elapsed();
        echo(&mut ws, &[7u8; FRAME_BYTES]).await;
        close(ws).await;
        // The first two warm the connections up.
        if i >= 2 {
            starts.push(minted);
            connects.push(connected);
        }
    }
    (starts, connects)
}

/// Mints `count` tokens over 16 connections.
async fn mint_tokens(addr: SocketAddr, count: usize) -> Rc<RefCell<Vec<String>>> {
    let pool = Rc::new(RefCell::new(Vec::with_capacity(count)));
    let minters: Vec<_> = (0..16)
        .map(|i| {
            let pool = pool.clone();
            tokio::task::spawn_local(async move {
                let mut http = Http::connect(addr).await;
                for _ in (i..count).step_by(16) {
                    let token = mint(&mut http, addr).await;
                    pool.borrow_mut().push(token);
                }
            })
        })
        .collect();
    for minter in minters {
        minter.await.unwrap();
    }
    pool
}

async fn echo(ws: &mut Ws, frame: &[u8]) {
    ws.send(Message::binary(frame.to_vec())).await.unwrap();
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(data))) => {
                assert_eq!(data.len(), frame.len());
                return;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected the echo, got {other:?}"),
        }
    }
}

/// Closes with a close handshake, then drops the TCP connection at once, as browsers do. (A
/// client that waits for the server to drop TCP first waits out actix's
/// `client_disconnect_timeout`.)
async fn close(mut ws: Ws) {
    let _ = ws.close(None).await;
    while let Some(Ok(msg)) = ws.next().await {
        if msg.is_close() {
            break;
        }
    }
}

/// Whole sessions, one after the other: (/start,) connect, one echo, close.
fn session_worker(addr: SocketAddr, target: Target) -> impl Fn(Window) -> LoopFuture {
    move |window| {
        let target = target.clone();
        Box::pin(async move {
            let mut http = None;
            let frame = [0x7fu8; FRAME_BYTES];
            let mut samples = Vec::new();
            while let Some(began) = window.next() {
                let mut ws = open_session(addr, &target, &mut http).await;
                echo(&mut ws, &frame).await;
                close(ws).await;
                window.record(&mut samples, began);
            }
            samples
        })
    }
}

/// Echo round trips over one established session.
fn relay_worker(addr: SocketAddr, target: Target) -> impl Fn(Window) -> LoopFuture {
    move |window| {
        let target = target.clone();
        Box::pin(async move {
            let mut ws = open_session(addr, &target, &mut None).await;
            let frame = [0x7fu8; FRAME_BYTES];
            let mut samples = Vec::new();
            while let Some(began) = window.next() {
                echo(&mut ws, &frame).await;
                window.record(&mut samples, began);
            }
            close(ws).await;
            samples
        })
    }
}

/// Media frames a call sends each second: one per 20 ms of audio.
const FRAMES_PER_SECOND: u32 = 50;

/// Paced calls through the broker, through HAProxy (when it runs) and directly to the bot, in
/// turn, with each proxy's CPU per frame.
struct PacedCalls {
    count: usize,
    broker: (Figures, Vec<f64>),
    haproxy: Option<(Figures, Vec<f64>)>,
    direct: Figures,
}

async fn paced_calls(
    plan: &Plan,
    count: usize,
    broker: &Proc,
    bot: &Proc,
    haproxy: Option<&haproxy::HaProxy>,
) -> PacedCalls {
    let meter = CpuMeter::new(&[("broker", broker.pid()), ("bot", bot.pid())]);
    let calls = call_phase(plan, count, broker.addr, Target::Open).await;
    let broker = (calls.clone(), meter.per_op(calls.count));
    let mut peer = None;
    if let Some(haproxy) = haproxy {
        let meter = CpuMeter::new(&[("haproxy", haproxy.pid()), ("bot", bot.pid())]);
        let calls = call_phase(plan, count, haproxy.addr, Target::Direct).await;
        peer = Some((calls.clone(), meter.per_op(calls.count)));
    }
    let direct = call_phase(plan, count, bot.addr, Target::Direct).await;
    PacedCalls { count, broker, haproxy: peer, direct }
}

impl PacedCalls {
    /// The row of the figures' table: via the broker / HAProxy / direct.
    fn row(&self) -> String {
        let paths: Vec<&Figures> =
            [Some(&self.broker.0), self.haproxy.as_ref().map(|(f, _)| f), Some(&self.direct)]
                .into_iter()
                .flatten()
                .collect();
        let all = |pick: fn(&Figures) -> String| {
            paths.iter().map(|f| pick(f)).collect::<Vec<_>>().join(" / ")
        };
        let via =
            if self.haproxy.is_some() { "broker / HAProxy / direct" } else { "broker / direct" };
        format!(
            "| {} paced calls via {via} (frame round trip) | {} | {} | {} | {} |",
            self.count,
            all(|f| format!("{:.0}", f.rate)),
            all(|f| us(f.p50)),
            all(|f| us(f.p90)),
            all(|f| us(f.p99)),
        )
    }

    /// What the calls say: frames answered, CPU per frame and the delay each proxy adds.
    fn summary(&self) -> String {
        let added = |via: &Figures| {
            let [p50, p99] = [via.p50, via.p99].map(|q| q.as_secs_f64() * 1e6);
            (p50 - self.direct.p50.as_secs_f64() * 1e6, p99 - self.direct.p99.as_secs_f64() * 1e6)
        };
        let (calls, cpu) = &self.broker;
        let (p50, p99) = added(calls);
        let mut text = format!(
            "{} concurrent paced calls (50 frames/s each way) on one core shared with the bot \
             and Redis: {:.0} of {} frames/s answered; broker CPU {:.1} µs per frame; added delay \
             p50 {p50:.0} µs, p99 {p99:.0} µs (target: p99 under 5 ms at 1,000 calls)",
            self.count,
            calls.rate,
            self.count * FRAMES_PER_SECOND as usize,
            cpu[0],
        );
        if let Some((calls, cpu)) = &self.haproxy {
            let (p50, p99) = added(calls);
            text.push_str(&format!(
                "; through HAProxy, the same way: {:.0} frames/s answered, {:.1} µs of its CPU per \
                 frame, added delay p50 {p50:.0} µs, p99 {p99:.0} µs",
                calls.rate, cpu[0]
            ));
        }
        text
    }
}

/// `calls` paced calls at once: each opens its session during a warm-up long enough for
/// all to open, then sends a media frame every 20 ms and times its echo.
async fn call_phase(plan: &Plan, calls: usize, addr: SocketAddr, target: Target) -> Figures {
    let now = Instant::now();
    let warmup = plan.warmup.max(Duration::from_millis(calls as u64 * 2));
    let window = Window { from: now + warmup, until: now + warmup + plan.measure };
    let frame = serde_json::json!({
        "event": "media", "streamSid": "MZ00000000000000000000000000000001",
        "media": {"track": "inbound", "chunk": "1", "timestamp": "20", "payload": STANDARD.encode([0x7fu8; FRAME_BYTES])},
    })
    .to_string();
    let period = Duration::from_secs(1) / FRAMES_PER_SECOND;
    let tasks: Vec<_> = (0..calls)
        .map(|i| {
            let (target, frame) = (target.clone(), frame.clone());
            // Calls begin at independent moments: their frames are spread over each 20 ms.
            let offset = period * i as u32 / calls as u32;
            tokio::task::spawn_local(async move {
                let mut ws = open_session(addr, &target, &mut None).await;
                tokio::time::sleep_until((window.from + offset).into()).await;
                let mut pace = tokio::time::interval(period);
                pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut samples = Vec::new();
                while let Some(began) = window.next() {
                    pace.tick().await;
                    let sent = Instant::now();
                    ws.send(Message::text(frame.clone())).await.unwrap();
                    loop {
                        match ws.next().await {
                            Some(Ok(Message::Text(_))) => break,
                            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                            other => panic!("expected the echo, got {other:?}"),
                        }
                    }
                    if began >= window.from {
                        samples.push(sent.elapsed());
                    }
                }
                close(ws).await;
                samples
            })
        })
        .collect();
    let mut samples: Vec<Duration> = Vec::new();
    for task in tasks {
        samples.extend(task.await.unwrap());
    }
    Figures::of(samples, plan.measure)
}

/// Opens `count` bridged sessions, leaves them idle, and returns the broker's RSS growth per
/// session. The sessions close before this returns.
/// RSS growth of `server` per idle session held open through `addr`: the broker's agent without
/// a token (and, with `token`, one token session too), or any proxy of the bot (`!token`).
async fn idle_bytes_per_session(addr: SocketAddr, server: u32, count: usize, token: bool) -> f64 {
    let target = if token { Target::Open } else { Target::Direct };
    let before = rss_bytes(server);
    let mut sessions = Vec::with_capacity(count);
    let mut http = None;
    // Sixteen at a time: fast enough, and well inside the listen backlog.
    while sessions.len() < count {
        let batch = (count - sessions.len()).min(16);
        let mut opening = Vec::new();
        for _ in 0..batch {
            let target = target.clone();
            opening.push(tokio::task::spawn_local(async move {
                open_session(addr, &target, &mut None).await
            }));
        }
        for task in opening {
            sessions.push(task.await.unwrap());
        }
    }
    // One token session too, so the figure includes a gated one's record and lease bookkeeping.
    if token {
        sessions.push(open_session(addr, &Target::Broker, &mut http).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes(server);
    let per_session = (after.saturating_sub(before)) as f64 / sessions.len() as f64;
    let closing: Vec<_> =
        sessions.into_iter().map(|ws| tokio::task::spawn_local(close(ws))).collect();
    for task in closing {
        let _ = task.await;
    }
    per_session
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// CPU time (user + system) of each server process, from /proc.
struct CpuMeter {
    pids: Vec<u32>,
    start: Vec<f64>,
}

impl CpuMeter {
    fn new(servers: &[(&str, u32)]) -> Self {
        let pids: Vec<u32> = servers.iter().map(|(_, pid)| *pid).collect();
        let start = pids.iter().map(|pid| cpu_seconds(*pid)).collect();
        Self { pids, start }
    }

    /// Microseconds of CPU per operation of each process since the meter started. The warm-up's
    /// operations are not counted but their CPU is, so this errs high by the warm-up's share;
    /// the same for every figure, so ratios are unaffected.
    fn per_op(&self, ops: usize) -> Vec<f64> {
        self.pids
            .iter()
            .zip(&self.start)
            .map(|(pid, start)| (cpu_seconds(*pid) - start) * 1e6 / ops.max(1) as f64)
            .collect()
    }
}

fn cpu_seconds(pid: u32) -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let utime: f64 = fields[11].parse().unwrap();
    let stime: f64 = fields[12].parse().unwrap();
    (utime + stime) / ticks
}

// ----- processes -----

struct Proc {
    child: Child,
    addr: SocketAddr,
    /// The broker's internal listener (metrics and probes); the others have none.
    internal: Option<SocketAddr>,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn spawn(
        prefix: &[String],
        program: &str,
        args: &[String],
        env: &[(String, String)],
        ready: &str,
        addr: SocketAddr,
    ) -> Self {
        let mut argv: Vec<String> = prefix.to_vec();
        argv.push(program.to_owned());
        argv.extend(args.iter().cloned());
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .envs(env.iter().cloned())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        // Readiness is announced on stdout (redis, broker) or stderr (echo bot).
        let (tx, rx) = std::sync::mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            let (ready, program) = (ready.to_owned(), program.to_owned());
            std::thread::spawn(move || {
                // A server's warnings and errors explain a failed figure: the first few are shown.
                let mut shown = 0;
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if line.contains(&ready) {
                        let _ = tx.send(());
                    }
                    if shown < MAX_SERVER_LINES_SHOWN
                        && (line.contains("WARN") || line.contains("ERROR"))
                    {
                        shown += 1;
                        eprintln!("[{program}] {line}");
                    }
                }
            });
        }
        rx.recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{program} did not become ready"));
        Self { child, addr, internal: None }
    }

    fn redis(prefix: &[String]) -> Self {
        Self::redis_on(prefix, free_addr())
    }

    /// A Redis without persistence on `addr`: restarted on the same address, it comes back empty.
    fn redis_on(prefix: &[String], addr: SocketAddr) -> Self {
        // A file name of its own, which is never written (no save): a dump.rdb left in the
        // working directory by something else would otherwise be loaded at start.
        let dbfilename = format!("session-broker-bench-{}.rdb", addr.port());
        let args = [
            "--port",
            &addr.port().to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &std::env::temp_dir().display().to_string(),
            "--dbfilename",
            &dbfilename,
        ];
        Self::spawn(
            prefix,
            "redis-server",
            &args.map(String::from),
            &[],
            "Ready to accept connections",
            addr,
        )
    }

    fn bot(prefix: &[String]) -> Self {
        Self::bot_on(prefix, free_addr())
    }

    fn bot_on(prefix: &[String], addr: SocketAddr) -> Self {
        let args = ["echo-bot".to_owned(), "--listen".to_owned(), addr.to_string()];
        Self::spawn(
            prefix,
            env!("CARGO_BIN_EXE_session-broker"),
            &args,
            &[],
            "echo bot listening",
            addr,
        )
    }

    fn broker(
        prefix: &[String],
        redis: &SocketAddr,
        agents: &std::path::Path,
        bot_url: &str,
        overrides: &[(&str, &str)],
    ) -> Self {
        let program = env!("CARGO_BIN_EXE_session-broker");
        Self::broker_of(program, prefix, Some(redis), agents, bot_url, overrides)
    }

    /// A broker on its embedded store: what the broker itself costs with no store round trip.
    fn embedded_broker(prefix: &[String], agents: &std::path::Path, bot_url: &str) -> Self {
        let program = env!("CARGO_BIN_EXE_session-broker");
        Self::broker_of(program, prefix, None, agents, bot_url, &[])
    }

    /// A broker of another build (`program`), configured the same way; on Redis at `redis`, or
    /// on its embedded store.
    fn broker_of(
        program: &str,
        prefix: &[String],
        redis: Option<&SocketAddr>,
        agents: &std::path::Path,
        bot_url: &str,
        overrides: &[(&str, &str)],
    ) -> Self {
        let addr = free_addr();
        let internal = free_addr();
        let hash = session_broker::api_keys::hash_api_key(KEY);
        let env = [
            ("BROKER__LISTEN", addr.to_string()),
            ("BROKER__WORKERS", "1".into()),
            ("BROKER__TOKEN__SIGNING_KEY_ID", "k1".into()),
            ("BROKER__TOKEN__KEYS__K1", SIGNING_KEY.into()),
            ("BROKER__AGENTS__DIR", agents.display().to_string()),
            ("BROKER__BOTS__URL_TEMPLATE", bot_url.to_owned()),
            ("BROKER__ORGS__BENCH__PUBLIC_KEY_HASHES", hex::encode(hash)),
            ("BROKER__INTERNAL_LISTEN", internal.to_string()),
            // The benchmark is one client address opening thousands of sessions: every limit
            // that guards a replica against strangers is lifted.
            ("BROKER__LIMITS__START_RATE_PER_KEY", "0".into()),
            ("BROKER__LIMITS__START_RATE_PER_ADDRESS", "0".into()),
            ("BROKER__LIMITS__MAX_CONNECTIONS", "1000000".into()),
            ("BROKER__LIMITS__MAX_LIVE_SESSIONS", "1000000".into()),
            ("BROKER__AGENTS__DEFAULT_MAX_AGENTS", "1000000".into()),
            ("BROKER__LOG__FILTER", "warn,session_broker::startup=info".into()),
        ]
        .map(|(k, v)| (k.to_owned(), v));
        let mut env = env.to_vec();
        if let Some(redis) = redis {
            env.push(("BROKER__REDIS__URL".into(), format!("redis://{redis}")));
        }
        env.extend(overrides.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let args = ["serve".to_owned()];
        let mut broker = Self::spawn(prefix, program, &args, &env, "session broker ready", addr);
        broker.internal = Some(internal);
        broker
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Raises the open-file limit (inherited by the servers) as far as allowed; returns it.
fn raise_fd_limit() -> u64 {
    let wanted = libc::rlimit { rlim_cur: FD_WANTED, rlim_max: FD_WANTED };
    // SAFETY: getrlimit and setrlimit only read or write the struct we pass.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
            return FD_WANTED;
        }
        // Without CAP_SYS_RESOURCE the hard limit is the ceiling.
        let mut current: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut current);
        current.rlim_cur = current.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &current);
        current.rlim_max
    }
}

/// Pins this process to `core`, when the machine has it and taskset exists for the servers.
fn pin_self_to_core(core: usize) -> bool {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let taskset =
        Command::new("taskset").arg("--version").output().is_ok_and(|o| o.status.success());
    if cores < 2 || !taskset {
        return false;
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only touch
    // the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}
