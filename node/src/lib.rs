//! The Tapestry node: the sans-IO learning and averaging core and, later, the
//! IO shell around it (libp2p swarm, HTTP API, metrics, the `tapestry` binary).
//!
//! **Status**: [`core`] holds the aggregation rules, outer optimisers, gossip
//! mixing and door checks, tested. Training, the round engine and the
//! networked node are not implemented yet (see the core and node issues).

pub mod core;
