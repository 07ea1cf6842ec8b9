//! The Tapestry node: the sans-IO learning and averaging core ([`core`]) and
//! the IO shell around it: the libp2p swarm task ([`net`]), the running node
//! that drives the core with real time, peers and a chunk store
//! ([`runtime`]), its metrics ([`metrics`]) and HTTP API ([`api`]), its
//! configuration ([`config`]), and the `tapestry` command (`src/main.rs`).

pub mod api;
pub mod config;
pub mod core;
pub mod metrics;
pub mod net;
pub mod runtime;
