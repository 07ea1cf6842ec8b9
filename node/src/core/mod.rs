//! The learning and averaging core, written sans-IO: it computes, it does not
//! move bytes, read clocks or spawn tasks, so the real node and the simulator
//! run the very same code.
//!
//! **Status**: the aggregation rules, the outer optimisers, gossip mixing
//! (Metropolis–Hastings, push-sum) and the door checks are here and tested.
//! Local training (candle), data loading and the round engine are not yet.

pub mod aggregate;
pub mod data;
pub mod door;
pub mod engine;
pub mod mixing;
pub mod model;
pub mod outer;
