//! Prometheus metrics, served at `/metrics`. One registry per application (tests run several in
//! one process), names following Prometheus conventions: counters end in `_total`, durations are
//! histograms in seconds.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::store::StoreObserver;

/// Store operations on the request path, shown from the first scrape (with no observations yet)
/// so that dashboards and alerts find the series before the first request.
const STORE_OPERATIONS: &[&str] =
    &["mint_session", "open_session", "end_session", "update_session", "rate_limit", "check"];

/// Buckets for Redis and bot-dial latencies: 100 µs to 2.5 s.
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

pub struct Metrics {
    registry: Registry,
    pub tokens_minted: IntCounterVec,
    pub connects_accepted: IntCounterVec,
    pub refusals: IntCounterVec,
    pub unchecked_accepts: IntCounter,
    pub active_sessions: IntGaugeVec,
    pub sessions_ended: IntCounterVec,
    pub bot_dial_seconds: HistogramVec,
    pub bot_address_lookups: IntCounterVec,
    pub token_consume_seconds: HistogramVec,
    /// Failed store operations, from the store's own count.
    pub redis_errors: FollowedCounter,
    /// Dropped log lines, from the log thread's own count.
    pub log_lines_dropped: FollowedCounter,
    pub relay_bytes: IntCounterVec,
    pub relay_frames: IntCounterVec,
    /// Each agent's concurrent-session cap; set at each scrape from the registry.
    pub agent_session_cap: IntGaugeVec,
    /// 1 when `/readyz` would answer 200; set at each scrape.
    pub ready: IntGauge,
    /// 1 from SIGTERM on; set at each scrape.
    pub draining: IntGauge,
    /// Sessions of a dead replica that this replica's sweep marked `replica_lost`.
    pub sessions_lost: IntCounterVec,
    pub store_operation_seconds: HistogramVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("broker".into()), None).expect("a fixed, valid prefix");
        // Registering fixed, distinct, valid names cannot fail.
        fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        }
        fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            let metric = HistogramVec::new(opts, labels).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        }
        fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        }
        fn plain_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
            let metric = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(metric.clone())).expect("unique metric");
            metric
        }
        let unchecked_accepts = IntCounter::new(
            "unchecked_accepts_total",
            "Connects accepted without the one-time token check (redis.on_unavailable = open)",
        )
        .expect("valid metric");
        registry.register(Box::new(unchecked_accepts.clone())).expect("unique metric");
        let redis_errors = FollowedCounter::new(
            &registry,
            "redis_errors_total",
            "State store operations that failed",
        );
        let log_lines_dropped = FollowedCounter::new(
            &registry,
            "log_lines_dropped_total",
            "Log lines dropped because standard output was not read fast enough",
        );
        let active_sessions = IntGaugeVec::new(
            Opts::new("active_sessions", "Sessions this replica is relaying, by agent"),
            &["agent"],
        )
        .expect("valid metric");
        registry.register(Box::new(active_sessions.clone())).expect("unique metric");
        Self {
            tokens_minted: counter(
                &registry,
                "tokens_minted_total",
                "Session tokens minted by /start",
                &["agent"],
            ),
            connects_accepted: counter(
                &registry,
                "connects_accepted_total",
                "WebSocket connects upgraded and bridged",
                &["agent"],
            ),
            refusals: counter(
                &registry,
                "refusals_total",
                "Requests refused, by reason",
                &["reason"],
            ),
            unchecked_accepts,
            active_sessions,
            sessions_ended: counter(
                &registry,
                "sessions_ended_total",
                "Sessions ended, by reason",
                &["reason"],
            ),
            bot_dial_seconds: histogram(
                &registry,
                "bot_dial_seconds",
                "Time to open the bot's WebSocket",
                &["outcome"],
            ),
            bot_address_lookups: counter(
                &registry,
                "bot_address_lookups_total",
                "Bot host names looked up (each is kept for a few seconds), by outcome",
                &["outcome"],
            ),
            token_consume_seconds: histogram(
                &registry,
                "token_consume_seconds",
                "Time of the one-time token consume in the store",
                &["outcome"],
            ),
            redis_errors,
            log_lines_dropped,
            relay_bytes: counter(
                &registry,
                "relay_bytes_total",
                "Payload bytes relayed, by direction",
                &["direction"],
            ),
            relay_frames: counter(
                &registry,
                "relay_frames_total",
                "Frames relayed, by direction",
                &["direction"],
            ),
            agent_session_cap: gauge(
                &registry,
                "agent_session_cap",
                "Concurrent-session cap of the agent across all replicas and regions",
                &["agent"],
            ),
            ready: plain_gauge(&registry, "ready", "1 when /readyz answers 200, else 0"),
            draining: plain_gauge(
                &registry,
                "draining",
                "1 from SIGTERM on, while this replica drains its live sessions",
            ),
            sessions_lost: counter(
                &registry,
                "sessions_lost_total",
                "Sessions of a replica that stopped renewing its leases, marked replica_lost here",
                &["agent"],
            ),
            store_operation_seconds: {
                let metric = histogram(
                    &registry,
                    "store_operation_seconds",
                    "Round-trip time of one state store operation, by operation",
                    &["operation"],
                );
                for operation in STORE_OPERATIONS {
                    metric.with_label_values(&[operation]);
                }
                metric
            },
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding our own well-formed families into a Vec cannot fail.
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("metrics encode");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// A counter that follows a running total kept elsewhere (the store's count of failures, the
/// log thread's of dropped lines), brought up to it at each scrape.
pub struct FollowedCounter {
    counter: IntCounter,
    /// What the counter already holds of the total.
    seen: std::sync::Mutex<u64>,
}

impl FollowedCounter {
    fn new(registry: &Registry, name: &str, help: &str) -> Self {
        let counter = IntCounter::new(name, help).expect("valid metric");
        registry.register(Box::new(counter.clone())).expect("unique metric");
        Self { counter, seen: std::sync::Mutex::new(0) }
    }

    /// Brings the counter up to `total`.
    pub fn follow(&self, total: u64) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        self.counter.inc_by(total.saturating_sub(*seen));
        *seen = (*seen).max(total);
    }
}

impl StoreObserver for Metrics {
    fn observe(&self, operation: &'static str, took: std::time::Duration) {
        self.store_operation_seconds.with_label_values(&[operation]).observe(took.as_secs_f64());
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
