//! Timing the engine's heavy steps with a stopwatch the shell lends it:
//! the engine reads no clock of its own, and nothing it times enters a
//! decision (the same inputs give the same outputs with or without one).

use std::time::{Duration, Instant};

use super::Engine;

/// Time the engine spent in each of its heavy steps since it was last
/// asked ([`Engine::take_stage_times`]); all zero without a stopwatch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageTimes {
    /// This node's delta: the difference from the round's parameters, the
    /// codec (with error feedback), decoding what peers will decode, its
    /// norm.
    pub encode: Duration,
    /// Content ids (BLAKE3) of this node's delta payloads and of the
    /// parameters of the versions it makes.
    pub hash: Duration,
    /// Signing this node's manifests.
    pub sign: Duration,
    /// Peers' payloads through the door: decoded and checked.
    pub decode: Duration,
    /// Closing rounds: the aggregation rule and the outer step.
    pub aggregate: Duration,
}

impl StageTimes {
    /// All of it.
    pub fn total(&self) -> Duration {
        self.encode + self.hash + self.sign + self.decode + self.aggregate
    }
}

impl Engine {
    /// Lends the engine a stopwatch (e.g. `std::time::Instant::now`) to
    /// time its heavy steps with; read them with
    /// [`Engine::take_stage_times`].
    pub fn set_stopwatch(&mut self, now: fn() -> Instant) {
        self.stopwatch = Some(now);
    }

    /// What the engine timed since the last call (then starts again from
    /// zero).
    pub fn take_stage_times(&mut self) -> StageTimes {
        std::mem::take(&mut self.stages)
    }

    /// The stopwatch's reading, if there is one.
    pub(super) fn lap(&self) -> Option<Instant> {
        self.stopwatch.map(|now| now())
    }

    /// Charges the time since `since` to one stage; the new reading.
    pub(super) fn charge(
        &mut self,
        since: Option<Instant>,
        stage: fn(&mut StageTimes) -> &mut Duration,
    ) -> Option<Instant> {
        let (since, now) = (since?, self.lap()?);
        *stage(&mut self.stages) += now.saturating_duration_since(since);
        Some(now)
    }
}
