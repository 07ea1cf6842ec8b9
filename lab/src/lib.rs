//! `tapestry-lab`: real Tapestry processes on one machine, for trying a
//! swarm out and for black-box tests. [`cluster`] starts `tapestry` node
//! processes (on 127.0.0.1, or each in its own network namespace through
//! [`netns`]), kills, restarts and cuts them as scheduled, samples their
//! status and writes a report; [`process`] is one node process, which the
//! node's own process tests and benchmarks use too; [`error`] has the
//! typed errors. Unlike the simulator (`tapestry-sim`), which is
//! deterministic and never touches the network, everything here is real
//! and timed by the wall clock.

pub mod cluster;
pub mod error;
pub mod netns;
pub mod process;

pub use error::{EventProblem, LabError, NetnsUnavailable};
