//! The Tapestry node: the sans-IO learning and averaging core (candle
//! training, aggregation rules, the round engine) and the IO shell around it
//! (libp2p swarm, HTTP API, metrics, the `tapestry` binary).
//!
//! **Status: not implemented yet.** This crate is a placeholder so the
//! workspace has its final shape and its one-way dependencies
//! (protocol ← storage ← node ← sim). The work is tracked in the core and node
//! issues.
