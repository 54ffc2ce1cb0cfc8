//! A session broker for Pipecat bots: it decides whether a WebSocket may reach a bot, then
//! relays it.
//!
//! How a request flows:
//! 1. `POST /v1/public/{agent}/start` ([`routes::start`]): the org's public key ([`api_keys`])
//!    is checked and the agent looked up, both in the [`registry`] (files, settings and the
//!    shared registry in Redis, see [`agents`]); a short-lived signed token is minted ([`token`])
//!    and the session's record written as pending ([`store::records`]). No bot is contacted.
//! 2. `GET /ws/generic/{agent}.{org}[/{token}]` ([`routes::ws`]) reads as its steps: the request
//!    is checked, a reservation taken (the token verified, then in one request to the shared
//!    [`store`] consumed exactly once, a concurrency slot leased and the session's record made
//!    active; the session registered on this replica), the bot dialled, and only then the
//!    client upgraded. A failure at any step lets the reservation go whole.
//! 3. [`upgrade`] hands the client's socket to [`bridge`], which passes frames both ways as they
//!    are on the wire ([`wire`] checks them), in the connection's one task, until either side ends the
//!    session, `max_session_duration` passes, or the session is terminated (from any replica) or
//!    the replica drains. [`sessions`] keeps the leases of live sessions and sweeps those of
//!    lost replicas.
//!
//! The modules form one downward graph: `main` → [`startup`] → [`routes`] → [`state`] →
//! {[`sessions`], [`registry`], [`token`], [`api_keys`], [`metrics`], [`bridge`]} → [`store`].
//! [`config`] reads the settings once; [`error`] is the table from every refusal to its HTTP
//! status, code and metric; [`telemetry`] installs logging; [`admin`] is the operator commands
//! behind `session-broker deploy` and `keys`; [`tls`] is whom the broker trusts on `rediss://`
//! and `wss://`; [`server`] runs the public listener's workers.

pub mod admin;
pub mod agents;
pub mod api_keys;
pub mod bot_addresses;
pub mod bridge;
pub mod config;
pub mod echo_bot;
pub mod error;
pub mod log_budget;
pub mod metrics;
pub mod private_tokens;
pub mod registry;
pub mod routes;
pub mod server;
pub mod sessions;
pub mod startup;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod telephony;
pub mod tls;
pub mod token;
pub mod upgrade;
pub mod wire;
