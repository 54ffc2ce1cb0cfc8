//! A session broker for Pipecat bots: it decides whether a WebSocket may reach a bot, then
//! relays it.
//!
//! How a session flows:
//! 1. `POST /v1/public/{agent}/start` ([`routes::start`]): the org's public key ([`api_keys`]) is
//!    checked and the agent looked up, both in the [`registry`] (files, settings and the shared
//!    registry in Redis, see [`agents`]); a short-lived signed token is minted ([`token`]) and the
//!    session's record written as pending ([`sessions`]). No bot is contacted.
//! 2. `GET /ws/generic/{agent}.{org}[/{token}]` ([`routes::ws`]): the token is verified and
//!    consumed exactly once in the shared state store ([`store`]: Redis standalone, Sentinel or
//!    Cluster, or in memory for a single process), a concurrency slot leased, the bot dialled,
//!    and only then the client upgraded.
//! 3. [`bridge`] relays frames both ways until either side ends the session, `max_session_duration`
//!    passes, or the session is terminated (from any replica) or the replica drains.
//!
//! [`config`] reads the settings once; [`startup`] builds the server from them and runs its
//! background work (lease renewal, sweeps, registry refresh); [`error`] is the table from every
//! refusal to its HTTP status and JSON body; [`metrics`] and [`telemetry`] are what operators see;
//! [`admin`] is the operator commands behind `session-broker deploy` and `keys`.

pub mod admin;
pub mod agents;
pub mod api_keys;
pub mod bridge;
pub mod config;
pub mod echo_bot;
pub mod error;
pub mod metrics;
pub mod registry;
pub mod routes;
pub mod sessions;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod token;
