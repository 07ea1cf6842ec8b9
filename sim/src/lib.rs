//! `tapestry-sim`: a deterministic discrete-event simulator that drives the
//! node's sans-IO core with virtual time, and a launcher for local clusters of
//! real nodes.
//!
//! **Status: not implemented yet.** This crate is a placeholder so the
//! workspace has its final shape. The work is tracked in the simulator and
//! local-cluster issues.
