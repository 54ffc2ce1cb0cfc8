//! Waiting for what nothing announces: probing a condition with a deadline. Prefer awaiting an
//! event (a frame, a log line, a process exit); poll only when there is none.

use std::time::Duration;

/// Awaits a condition the test cannot be notified of, probing every 20 ms for at most `within`.
pub async fn eventually<T, F: Future<Output = Option<T>>>(
    within: Duration,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "condition not reached within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls a synchronous condition every 20 ms for at most `within`. For set-up only: the
/// servers offer nothing to wait on for replication and cluster state.
pub fn wait_until(within: Duration, what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !probe() {
        assert!(std::time::Instant::now() < deadline, "{what} not reached within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
