//! Integration tests: the broker built by its production factory, against real `redis-server`
//! processes (and the embedded store), driven over HTTP and WebSocket like a client would.

mod bridge;
mod migrations;
mod operations;
mod pipecat;
mod public_internet;
mod regions;
mod registry;
mod replicas;
mod sessions;
mod start;
mod support;
mod telephony;
mod tls;
mod topologies;
mod ws;
