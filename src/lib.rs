//! A session broker for Pipecat bots: it decides whether a WebSocket may reach a bot, then
//! relays it.
//!
//! How a session flows:
//! 1. `POST /v1/public/{agent}/start` ([`routes::start`]): the org's public key ([`keys`]) is
//!    checked, the agent looked up ([`agents`]) and a short-lived signed token minted
//!    ([`token`]). No bot is contacted.
//! 2. `GET /ws/generic/{agent}.{org}[/{token}]` ([`routes::ws`]): the token is verified and
//!    consumed exactly once in the shared state store ([`store`]: Redis, or in memory for a
//!    single process); then the bot is dialled and the client upgraded.
//! 3. [`bridge`] relays frames both ways until either side ends the session.
//!
//! [`config`] reads the settings once; [`startup`] builds the server from them; [`error`] is the
//! table from every refusal to its HTTP status and JSON body.

pub mod admin;
pub mod agents;
pub mod bridge;
pub mod config;
pub mod echo_bot;
pub mod error;
pub mod keys;
pub mod metrics;
pub mod registry;
pub mod routes;
pub mod sessions;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod token;
