//! `tapestry-sim`: a deterministic discrete-event simulator of Tapestry
//! swarms. It drives the node's own sans-IO round engine (the very code a
//! real node runs) with virtual time, links with latency and loss, and
//! Byzantine nodes, and compares the swarm with baselines trained in the
//! same run.
//!
//! Layout: [`scenario`] parses and checks everything up front; [`world`]
//! is the event loop over the engines; [`net`] decides whether and when a
//! message arrives (latency, jitter, loss, bandwidth, partitions, offline
//! nodes); [`par`] runs trainings and evaluations of one virtual instant on
//! all cores without changing results; [`report`] and [`plot`] write the
//! outputs; [`compare`] runs several arms of a scenario and compares the
//! bytes they send to reach a target; [`error`] has the typed errors and [`cli`] what the commands
//! share about their command lines. Real `tapestry` processes are
//! `tapestry-lab`'s (the `lab/` crate); this crate never touches the
//! network and does not build the networked node.

pub mod cli;
pub mod compare;
pub mod error;
pub mod net;
pub mod par;
pub mod plot;
pub mod report;
pub mod scenario;
pub mod topology;
pub mod world;

pub use error::{CutProblem, DurationError, PlotError, ScenarioError, SimError};
