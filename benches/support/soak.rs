//! The soak: sessions opening and closing at a steady rate across two replicas for a bounded
//! time, with the bot restarted at a third of it and Redis restarted empty at two thirds.
//! Reports each broker's resident memory and open descriptors and Redis's key count over time,
//! whether they come back to their baseline once the churn stops and records expire, and
//! whether the sessions held open across the Redis restart survived it (they must: a live
//! relay needs no store).
//!
//! `cargo bench --bench broker -- --soak 600` (ten minutes; CI runs a short one).

use std::{
    cell::{Cell, RefCell},
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use super::{FRAME_BYTES, Http, Proc, Ws, rss_bytes, start_request};

/// Sessions opened and closed at once, each after the other ends.
const CHURN_WORKERS: usize = 8;
/// Sessions held open from after the bot's restart to the end, across the Redis restart.
const HELD: usize = 20;
/// How often a held session echoes, well inside the broker's heartbeat timeout.
const HOLD_ECHO: Duration = Duration::from_secs(2);
/// Samples of memory, descriptors and keys over the run.
const SAMPLES: u32 = 12;
/// Short lifetimes, so that what the churn leaves in Redis expires within the run.
const TOKEN_LIFETIME_SECS: u64 = 10;
const RETENTION_SECS: u64 = 15;
/// Consume marks outlive their token by the clock-skew margin.
const CLOCK_SKEW_SECS: u64 = 5;

/// How long after the churn everything it wrote has expired: records' retention, and marks'
/// token lifetime plus skew, with a margin.
fn settle() -> Duration {
    Duration::from_secs(RETENTION_SECS.max(TOKEN_LIFETIME_SECS + CLOCK_SKEW_SECS) + 5)
}

#[derive(Default)]
struct Counts {
    /// Bumped when a restart begins and when it is over: a session that saw it change, or
    /// began during one, may fail for it.
    disruption: Cell<u32>,
    sessions: Cell<u64>,
    /// Refusals expected while the bot or Redis restarts: 503s, and 403s for tokens minted
    /// before Redis lost its data.
    refused_in_restarts: Cell<u64>,
    /// Anything else: a failure the soak is looking for.
    unexpected: RefCell<Vec<String>>,
}

pub async fn run(duration: Duration, pinning: bool) {
    let prefix: Vec<String> =
        if pinning { vec!["taskset".into(), "-c".into(), "0".into()] } else { Vec::new() };
    let mut redis = Proc::redis(&prefix);
    let redis_addr = redis.addr;
    let mut bot = Proc::bot(&prefix);
    let bot_addr = bot.addr;
    let agents = super::agent_dir();
    let bot_url = format!("ws://{bot_addr}/");
    let (lifetime, retention) = (TOKEN_LIFETIME_SECS.to_string(), RETENTION_SECS.to_string());
    let skew = (CLOCK_SKEW_SECS * 1000).to_string();
    let overrides = [
        ("BROKER__TOKEN__LIFETIME_SECS", lifetime.as_str()),
        ("BROKER__TOKEN__CLOCK_SKEW_MS", skew.as_str()),
        ("BROKER__SESSIONS__RETENTION_SECS", retention.as_str()),
        ("BROKER__LIMITS__START_RATE_PER_KEY", "1000000"),
        ("BROKER__LIMITS__START_RATE_PER_ADDRESS", "1000000"),
    ];
    let brokers = [
        Proc::broker(&prefix, &redis_addr, agents.path(), &bot_url, &overrides),
        Proc::broker(&prefix, &redis_addr, agents.path(), &bot_url, &overrides),
    ];
    let addrs = [brokers[0].addr, brokers[1].addr];
    println!(
        "soak: {duration:?} of churn ({CHURN_WORKERS} sessions at once, /start on one replica and \
         connect on the other), bot restarted at 1/3, Redis restarted empty at 2/3, {HELD} sessions \
         held across the Redis restart; then {} s for records and marks to expire\n",
        settle().as_secs()
    );
    println!("| t (s) | broker A RSS | broker B RSS | A fds | B fds | Redis keys | sessions |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let began = Instant::now();
    let counts = Rc::new(Counts::default());
    let sample = |label: String, counts: &Counts| {
        let keys = redis_keys(redis_addr);
        println!(
            "| {label} | {:.1} MiB | {:.1} MiB | {} | {} | {} | {} |",
            rss_bytes(brokers[0].pid()) as f64 / 1048576.0,
            rss_bytes(brokers[1].pid()) as f64 / 1048576.0,
            fds(brokers[0].pid()),
            fds(brokers[1].pid()),
            keys.len(),
            counts.sessions.get()
        );
        (
            rss_bytes(brokers[0].pid()) + rss_bytes(brokers[1].pid()),
            fds(brokers[0].pid()) + fds(brokers[1].pid()),
            keys,
        )
    };
    let baseline = sample("0 (baseline)".into(), &counts);

    let deadline = began + duration;
    let churn: Vec<_> = (0..CHURN_WORKERS)
        .map(|i| {
            let counts = counts.clone();
            tokio::task::spawn_local(async move {
                let mut http = [Http::connect(addrs[0]).await, Http::connect(addrs[1]).await];
                let mut turn = i;
                while Instant::now() < deadline {
                    turn += 1;
                    let (minter, gate) = (turn % 2, (turn + 1) % 2);
                    let seen = counts.disruption.get();
                    let result = session(&mut http[minter], addrs[minter], addrs[gate]).await;
                    // Odd: a restart is under way; changed: one began or ended meanwhile.
                    let disrupted = seen % 2 == 1 || counts.disruption.get() != seen;
                    match result {
                        Ok(()) => counts.sessions.set(counts.sessions.get() + 1),
                        Err(Refusal::Expected) => {
                            counts.refused_in_restarts.set(counts.refused_in_restarts.get() + 1);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(Refusal::Unexpected(_)) if disrupted => {
                            counts.refused_in_restarts.set(counts.refused_in_restarts.get() + 1);
                        }
                        Err(Refusal::Unexpected(what)) => counts.unexpected.borrow_mut().push(what),
                    }
                }
            })
        })
        .collect();

    // Each held session echoes every HOLD_ECHO (which also answers the broker's pings, as a
    // client reading its socket does) and says when it stops working.
    let stop_holding = Rc::new(Cell::new(false));
    let alive = Rc::new(Cell::new(0usize));
    let mut held = Vec::new();
    for n in 1..=SAMPLES {
        tokio::time::sleep_until((began + duration * n / SAMPLES).into()).await;
        if n == SAMPLES / 3 {
            counts.disruption.set(counts.disruption.get() + 1);
            drop(bot);
            bot = Proc::bot_on(&prefix, bot_addr);
            tokio::time::sleep(Duration::from_secs(1)).await;
            counts.disruption.set(counts.disruption.get() + 1);
            // Sessions through the restarted bot, held to the end.
            for i in 0..HELD {
                match open_held(addrs[i % 2]).await {
                    Some(ws) => {
                        let (stop, alive) = (stop_holding.clone(), alive.clone());
                        held.push(tokio::task::spawn_local(hold(ws, stop, alive)));
                    }
                    None => {
                        counts.unexpected.borrow_mut().push("a held session did not open".into())
                    }
                }
            }
        }
        if n == 2 * SAMPLES / 3 {
            counts.disruption.set(counts.disruption.get() + 1);
            drop(redis);
            redis = Proc::redis_on(&prefix, redis_addr);
            tokio::time::sleep(Duration::from_secs(1)).await;
            counts.disruption.set(counts.disruption.get() + 1);
        }
        let label = format!("{:.0}", began.elapsed().as_secs_f64());
        sample(label, &counts);
    }
    for task in churn {
        task.await.unwrap();
    }
    // Still relaying at the end, a third of the run after the Redis restart.
    let held_survived = alive.get();
    stop_holding.set(true);
    for task in held {
        task.await.unwrap();
    }
    tokio::time::sleep(settle()).await;
    let (rss, fd_count, keys) =
        sample(format!("{:.0} (settled)", began.elapsed().as_secs_f64()), &counts);
    let (base_rss, base_fds, base_keys) = baseline;
    let left = kinds(keys.iter().filter(|k| !base_keys.contains(*k)));
    println!(
        "\nsessions: {} completed, {} refused while the bot or Redis restarted, {} unexpected \
         failures{}",
        counts.sessions.get(),
        counts.refused_in_restarts.get(),
        counts.unexpected.borrow().len(),
        counts.unexpected.borrow().first().map_or(String::new(), |f| format!(" (first: {f})"))
    );
    println!(
        "held from the bot's restart to the end, across the Redis restart: {held_survived} of \
         {HELD} still relaying ({} lost)",
        HELD - held_survived
    );
    println!(
        "settled against baseline: RSS {:+.1} MiB (both brokers), descriptors {:+}, Redis keys {} → {} \
         (kinds not in the baseline: {left:?}; the baseline's: {:?})",
        (rss as f64 - base_rss as f64) / 1048576.0,
        fd_count as i64 - base_fds as i64,
        base_keys.len(),
        keys.len(),
        kinds(base_keys.iter()),
    );
    drop(bot);
}

enum Refusal {
    Expected,
    Unexpected(String),
}

/// /start on one replica, connect on the other, one echo, close.
async fn session(http: &mut Http, minter: SocketAddr, gate: SocketAddr) -> Result<(), Refusal> {
    let (status, body) = http.call(&start_request(minter)).await;
    match status {
        200 => {}
        503 => return Err(Refusal::Expected),
        other => return Err(Refusal::Unexpected(format!("/start answered {other}"))),
    }
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let token = json["token"].as_str().unwrap_or_default();
    let url = format!("ws://{gate}/ws/generic/bench.bench/{token}");
    let stream = TcpStream::connect(gate).await.map_err(|e| Refusal::Unexpected(e.to_string()))?;
    let mut ws = match tokio_tungstenite::client_async(url, stream).await {
        Ok((ws, _)) => ws,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            return match resp.status().as_u16() {
                503 => Err(Refusal::Expected),
                403 if body.contains("token_predates_store_reset") => Err(Refusal::Expected),
                other => Err(Refusal::Unexpected(format!("connect answered {other}: {body}"))),
            };
        }
        Err(e) => return Err(Refusal::Unexpected(format!("connect: {e}"))),
    };
    if !held_echo(&mut ws).await {
        return Err(Refusal::Unexpected("no echo".into()));
    }
    super::close(ws).await;
    Ok(())
}

/// Echoes on `ws` every [`HOLD_ECHO`] until `stop`, counted in `alive` while it works.
async fn hold(mut ws: Ws, stop: Rc<Cell<bool>>, alive: Rc<Cell<usize>>) {
    alive.set(alive.get() + 1);
    while !stop.get() {
        tokio::time::sleep(HOLD_ECHO).await;
        if !held_echo(&mut ws).await {
            alive.set(alive.get() - 1);
            return;
        }
    }
    alive.set(alive.get() - 1);
    super::close(ws).await;
}

async fn open_held(gate: SocketAddr) -> Option<Ws> {
    let stream = TcpStream::connect(gate).await.ok()?;
    let url = format!("ws://{gate}/ws/generic/open.bench");
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.ok()?;
    held_echo(&mut ws).await.then_some(ws)
}

/// Sends a frame and reads its echo, within a second.
async fn held_echo(ws: &mut Ws) -> bool {
    let frame = vec![7u8; FRAME_BYTES];
    let exchange = async {
        ws.send(Message::binary(frame.clone())).await.ok()?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(data))) => return Some(data.len() == frame.len()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                _ => return None,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(1), exchange).await.ok().flatten().unwrap_or(false)
}

/// Keys by kind, ids and numbers replaced by `*`, with their counts.
fn kinds<'a>(keys: impl Iterator<Item = &'a String>) -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    for key in keys {
        let kind: Vec<&str> = key
            .split(':')
            .map(|part| {
                let bare = part.trim_matches(|c| c == '{' || c == '}');
                let id = bare.len() >= 8 && bare.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
                if id || bare.chars().all(|c| c.is_ascii_digit()) { "*" } else { part }
            })
            .collect();
        *kinds.entry(kind.join(":")).or_insert(0) += 1;
    }
    kinds
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

/// The names of every key in Redis (the soak's Redis holds a few hundred at most).
fn redis_keys(addr: SocketAddr) -> Vec<String> {
    let Ok(client) = redis::Client::open(format!("redis://{addr}")) else { return Vec::new() };
    let Ok(mut conn) = client.get_connection() else { return Vec::new() };
    redis::cmd("KEYS").arg("*").query(&mut conn).unwrap_or_default()
}
