//! The Tapestry node: the sans-IO learning and averaging core and, later, the
//! IO shell around it (libp2p swarm, HTTP API, metrics, the `tapestry` binary).
//!
//! **Status**: [`core`] — training, aggregation, mixing, door checks and the
//! round engine — is implemented and tested on the digits data set. The
//! networked node (libp2p, HTTP API, metrics, the `tapestry` binary) is not
//! implemented yet.

pub mod core;
