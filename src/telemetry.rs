//! Logging: human-readable by default, JSON lines when `log.format = "json"`. The request
//! spans themselves are opened by `routes::middleware`.
//!
//! Lines are written by a thread of their own. A worker that wrote its own lines would stop
//! relaying every call it holds whenever standard output stops draining (a container runtime's
//! log pipe is 64 KiB, and its reader can stall), and would pay a `write` per line; the log
//! thread writes what has queued up in one `write`. Past [`QUEUED_LINES`] waiting, lines are
//! dropped rather than waited for, and counted: `broker_log_lines_dropped_total`, and a last
//! line on standard error at exit.

use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{EnvFilter, fmt};

use crate::config::{LogFormat, LogSettings};

/// Lines waiting for the log thread before new ones are dropped (tracing-appender's default:
/// about 20 MiB of typical lines).
const QUEUED_LINES: usize = 128_000;

/// The log thread's count of dropped lines, once logging is installed.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Keeps the log thread running; dropping it writes what is queued (waiting at most a second)
/// and reports dropped lines.
pub struct LogGuard(Option<WorkerGuard>);

impl Drop for LogGuard {
    fn drop(&mut self) {
        drop(self.0.take());
        let dropped = dropped_lines();
        if dropped > 0 {
            eprintln!(
                "session-broker: {dropped} log lines were dropped: standard output was not read fast enough"
            );
        }
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `log.filter`.
pub fn init(settings: &LogSettings) -> LogGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.filter));
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUED_LINES)
        .lossy(true)
        .thread_name("broker-log")
        // Buffered: the log thread flushes once the queue is empty, so what queued up while it
        // wrote goes out in one write.
        .finish(std::io::BufWriter::new(std::io::stdout()));
    let _ = DROPPED.set(writer.error_counter());
    let builder = fmt().with_env_filter(filter).with_target(false).with_writer(writer);
    // try_init fails only when a subscriber is already installed, which is harmless.
    let _ = match settings.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    LogGuard(Some(guard))
}

/// Log lines dropped so far because the log thread's queue was full.
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |counter| counter.dropped_lines() as u64)
}
