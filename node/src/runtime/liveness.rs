//! Which connected peers are still there: a peer that answers no ping for
//! [`net::SILENCE_LIMIT`] is dropped, so a round never waits on a peer that
//! cannot be heard. Kept in the node on tokio's clock (libp2p's ping runs on
//! its own timer), so it is tested with paused time.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use libp2p::PeerId;
use tokio::time::Instant;

use crate::net::PingOutcome;

/// When each connected peer was last heard from.
#[derive(Debug)]
pub(super) struct Liveness {
    limit: Duration,
    heard: HashMap<PeerId, Instant>,
    /// Peers without the ping protocol: never pinged, never dropped for it.
    unpinged: HashSet<PeerId>,
}

impl Liveness {
    pub(super) fn new(limit: Duration) -> Self {
        Self {
            limit,
            heard: HashMap::new(),
            unpinged: HashSet::new(),
        }
    }

    /// A new connection counts as hearing from the peer.
    pub(super) fn connected(&mut self, peer: PeerId, now: Instant) {
        self.unpinged.remove(&peer);
        self.heard.insert(peer, now);
    }

    /// The last connection closed.
    pub(super) fn gone(&mut self, peer: &PeerId) {
        self.heard.remove(peer);
        self.unpinged.remove(peer);
    }

    /// What a ping found.
    pub(super) fn ping(&mut self, peer: PeerId, outcome: &PingOutcome, now: Instant) {
        match outcome {
            PingOutcome::Answered(_) => {
                if !self.unpinged.contains(&peer) {
                    self.heard.insert(peer, now);
                }
            }
            PingOutcome::Unsupported => {
                self.heard.remove(&peer);
                self.unpinged.insert(peer);
            }
            // Silence speaks for itself: the peer's deadline is not moved.
            PingOutcome::Failed(_) => {}
        }
    }

    /// When the next peer falls silent for too long, if any is watched.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.heard.values().min().map(|t| *t + self.limit)
    }

    /// The peers silent for too long at `now`; they are no longer watched
    /// (a new connection watches them again).
    pub(super) fn overdue(&mut self, now: Instant) -> Vec<PeerId> {
        let limit = self.limit;
        let late: Vec<PeerId> = self
            .heard
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) >= limit)
            .map(|(p, _)| *p)
            .collect();
        for p in &late {
            self.heard.remove(p);
        }
        late
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_peers_are_overdue_answering_and_unpinged_ones_are_not() {
        let t0 = Instant::now();
        let limit = Duration::from_secs(9);
        let (quiet, chatty, mute) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut l = Liveness::new(limit);
        for p in [quiet, chatty, mute] {
            l.connected(p, t0);
        }
        l.ping(mute, &PingOutcome::Unsupported, t0);
        assert_eq!(l.next_deadline(), Some(t0 + limit));
        let t1 = t0 + Duration::from_secs(6);
        l.ping(chatty, &PingOutcome::Answered(Duration::from_millis(1)), t1);
        l.ping(quiet, &PingOutcome::Failed("timeout".into()), t1);
        l.ping(mute, &PingOutcome::Answered(Duration::from_millis(1)), t1);
        assert!(l.overdue(t0 + Duration::from_secs(8)).is_empty());
        assert_eq!(l.overdue(t0 + limit), vec![quiet]);
        assert_eq!(l.next_deadline(), Some(t1 + limit));
        assert_eq!(l.overdue(t1 + limit), vec![chatty]);
        assert_eq!(l.next_deadline(), None);
    }
}
