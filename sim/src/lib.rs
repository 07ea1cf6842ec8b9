//! `tapestry-sim`: a deterministic discrete-event simulator of Tapestry
//! swarms. It drives the node's own sans-IO round engine (the very code a
//! real node runs) with virtual time, links with latency and loss, and
//! Byzantine nodes, and compares the swarm with baselines trained in the
//! same run.
//!
//! **Status**: `tapestry-sim run` works for the topologies, modes, codecs,
//! aggregators, attacks, latency and loss in [`scenario::Scenario`], with
//! `report.json` and `rounds.csv`. Not yet: churn, partitions, bandwidth
//! caps, plots, and the local-cluster launcher.

pub mod report;
pub mod scenario;
pub mod topology;
pub mod world;
