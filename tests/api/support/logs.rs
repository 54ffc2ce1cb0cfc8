//! Broker logs in tests. A broker process's output is always kept and printed when its test
//! fails. With `BROKER_TEST_LOGS=1` it is printed when the test passes too, and the in-process
//! apps log as well (at `RUST_LOG`, default `info`). Everything goes to the test's captured
//! output: shown for a failing test, and for every test with `cargo test -- --nocapture`.

use std::sync::Once;

use tracing_subscriber::EnvFilter;

/// Turns on the logs of the in-process apps, and the broker processes' output for passing tests.
pub const ENV: &str = "BROKER_TEST_LOGS";

/// Whether [`ENV`] asks for logs: set, and neither empty nor `0`.
pub fn wanted() -> bool {
    std::env::var_os(ENV).is_some_and(|value| !value.is_empty() && value != "0")
}

/// Installs, once per test binary, the subscriber that writes the in-process apps' logs to the
/// captured output of the test they belong to. Without [`ENV`], nothing is installed and the
/// apps' logs cost nothing.
pub fn init_in_process() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if wanted() {
            let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_target(false)
                .with_ansi(false)
                // Through print!, which the test harness captures per test (threads a test
                // starts, like the app's workers, inherit its capture).
                .with_test_writer()
                .init();
        }
    });
}
