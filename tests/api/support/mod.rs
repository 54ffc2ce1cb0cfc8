//! What the integration tests stand on, one concern per file:
//!
//! - [`app`]: the broker in-process, built by the production factory on port 0, and the orgs,
//!   keys and agents every test app serves;
//! - [`bot`]: a WebSocket bot that echoes and records what it sees;
//! - [`client`]: connecting as a client does, and reading what comes back;
//! - [`broker_process`]: the broker binary as a process of its own, for signals and kills;
//! - [`redis`]: real `redis-server` processes: standalone, Sentinel, Cluster, plain or TLS;
//! - [`tls`]: a throwaway certificate authority and its certificates;
//! - [`output`]: a child process's output, read on a thread of its own and kept;
//! - [`logs`]: broker logs in tests, and `BROKER_TEST_LOGS` to turn them on;
//! - [`wait`]: polling with a deadline, for conditions nothing announces.
//!
//! Tests `use crate::support::*`: every helper a test calls is re-exported here.

mod app;
mod bot;
mod broker_process;
mod client;
mod logs;
mod output;
mod redis;
mod tls;
mod wait;

pub use app::*;
pub use bot::*;
pub use broker_process::*;
pub use client::*;
pub use redis::*;
pub use tls::*;
pub use wait::*;
