//! The Tapestry node: the IO shell around the sans-IO core
//! ([`tapestry_core`]): the libp2p swarm task ([`net`]), the running node
//! that drives the core with real time, peers and a chunk store
//! ([`runtime`]), what it shows of itself ([`status`]), its metrics
//! ([`metrics`]) and HTTP API ([`api`]), its
//! configuration ([`config`]), the operations on a node's files ([`ops`]),
//! and the `tapestry` command (`src/main.rs`).

pub mod api;
pub mod config;
pub mod inflight;
pub mod metrics;
pub mod net;
pub mod ops;
pub mod runtime;
pub mod status;
