//! Gossipsub peer scoring, after lighthouse's: every weight and threshold
//! derived from the highest score a good peer can earn, so that no reward
//! outweighs misbehaviour, and an application score for faults only the
//! node can see (a corrupt chunk served, a payload that fails the door, an
//! author signing two votes for one round).
//!
//! The score of a peer is the sum over topics of (time in mesh + first
//! deliveries − missing mesh deliveries − invalid messages²) × topic weight,
//! plus the application score and the behaviour penalty. With the numbers
//! below a good peer earns at most [`max_positive_score`] (75); one invalid
//! message costs as much as that, and a peer that keeps sending them falls
//! below the graylist (−160 × 75) after about 13, however long it has been
//! in the mesh — while one honest mistake (or one evident fault relayed in
//! good faith) never graylists anyone.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::gossipsub::{PeerScoreParams, PeerScoreThresholds, TopicHash, TopicScoreParams};

/// How often counters decay (and the heartbeat, [`HEARTBEAT`]): once a
/// second, gossipsub's smallest decay interval.
pub const DECAY_INTERVAL: Duration = Duration::from_secs(1);
/// The gossipsub heartbeat: mesh upkeep and gossip once a second (rounds
/// last seconds; a faster heartbeat only costs control traffic).
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A decaying counter below this counts as zero (gossipsub's default).
const DECAY_TO_ZERO: f64 = 0.01;
/// Most a peer earns for its time in a topic's mesh (before the topic's
/// weight): small, so that long membership cannot buy immunity.
const MAX_IN_MESH_SCORE: f64 = 10.0;
/// Most a peer earns for delivering messages first (before the weight).
const MAX_FIRST_MESSAGE_DELIVERIES_SCORE: f64 = 40.0;
/// Time in the mesh counts in seconds, up to ten minutes.
const TIME_IN_MESH_QUANTUM: Duration = Duration::from_secs(1);
const TIME_IN_MESH_CAP: f64 = 600.0;
/// The deltas topic carries the round's work: it weighs most.
const DELTAS_WEIGHT: f64 = 1.0;
/// The models topic carries versions anyone can also ask for by probing
/// heads: it weighs half.
const MODELS_WEIGHT: f64 = 0.5;
/// Expected messages per second on each topic, for the delivery caps and
/// thresholds: a region of a few dozen nodes closing a round every few
/// seconds sends a handful of deltas a second and a version or two.
const DELTAS_RATE: f64 = 4.0;
const MODELS_RATE: f64 = 1.0;
/// The mesh size gossipsub aims for (its default `mesh_n`).
const MESH_N: f64 = 6.0;
/// Invalid messages are remembered for an hour (decaying to 1 %).
const INVALID_MEMORY: Duration = Duration::from_secs(3600);
/// First deliveries are remembered for ten minutes.
const FIRST_DELIVERY_MEMORY: Duration = Duration::from_secs(600);
/// A mesh peer is expected to deliver on the deltas topic only after two
/// minutes in the mesh (a region's rounds have started by then), and its
/// deliveries are remembered for five.
const MESH_DELIVERY_ACTIVATION: Duration = Duration::from_secs(120);
const MESH_DELIVERY_MEMORY: Duration = Duration::from_secs(300);
/// A delivery within this long of the first counts as a mesh delivery
/// (lighthouse's 2 s): peers forward in parallel.
const MESH_DELIVERY_WINDOW: Duration = Duration::from_secs(2);
/// Behaviour penalties (broken IHAVE promises, grafting during a
/// backoff) fade over about ten heartbeats: slowness is transient.
const BEHAVIOUR_MEMORY: Duration = Duration::from_secs(10);
/// Penalty events tolerated (as a decaying count) before the behaviour
/// penalty applies.
const BEHAVIOUR_THRESHOLD: f64 = 6.0;
/// A peer that breaks this many promises a second, steadily, reaches the
/// gossip threshold.
const BEHAVIOUR_TARGET_RATE: f64 = 5.0;
/// Peers on one address beyond this many cost every one of them score
/// (sybils behind one address); loopback is exempt (a local test swarm).
const COLOCATION_THRESHOLD: f64 = 8.0;
/// A disconnected peer's score is kept for an hour, so reconnecting does
/// not wash it clean.
const RETAIN_SCORE: Duration = Duration::from_secs(3600);

/// The most a well-behaved peer can score: full time-in-mesh and first
/// delivery rewards on both topics.
pub fn max_positive_score() -> f64 {
    (MAX_IN_MESH_SCORE + MAX_FIRST_MESSAGE_DELIVERIES_SCORE) * (DELTAS_WEIGHT + MODELS_WEIGHT)
}

/// Score thresholds as multiples of the best score: below −40× no gossip
/// is exchanged with the peer, below −80× nothing is published to it,
/// below −160× everything from it is ignored. Peer exchange only from a
/// peer that earned the best score; opportunistic grafting when the
/// median mesh score falls under 5 (a mesh of fresh or idle peers).
pub fn thresholds() -> PeerScoreThresholds {
    let max = max_positive_score();
    PeerScoreThresholds {
        gossip_threshold: -40.0 * max,
        publish_threshold: -80.0 * max,
        graylist_threshold: -160.0 * max,
        accept_px_threshold: max,
        opportunistic_graft_threshold: 5.0,
    }
}

/// The decay factor per interval that brings a counter to
/// [`DECAY_TO_ZERO`] after `memory`.
fn decay(memory: Duration) -> f64 {
    let ticks = memory.as_secs_f64() / DECAY_INTERVAL.as_secs_f64();
    DECAY_TO_ZERO.powf(1.0 / ticks)
}

/// Where a counter that gains `rate` a second and decays by `decay` a
/// second settles.
fn convergence(decay: f64, rate: f64) -> f64 {
    rate / (1.0 - decay)
}

/// The score parameters for the deltas and models topics (by hash).
pub fn params(deltas: Option<TopicHash>, models: Option<TopicHash>) -> PeerScoreParams {
    let max = max_positive_score();
    let behaviour_decay = decay(BEHAVIOUR_MEMORY);
    // A peer that keeps breaking promises at the target rate reaches the
    // gossip threshold (lighthouse's construction).
    let target = convergence(behaviour_decay, BEHAVIOUR_TARGET_RATE) - BEHAVIOUR_THRESHOLD;
    let mut params = PeerScoreParams {
        decay_interval: DECAY_INTERVAL,
        decay_to_zero: DECAY_TO_ZERO,
        retain_score: RETAIN_SCORE,
        // Topics together add at most half the best score: the rest must
        // come from being good everywhere.
        topic_score_cap: max * 0.5,
        app_specific_weight: 1.0,
        ip_colocation_factor_weight: -max * 0.5,
        ip_colocation_factor_threshold: COLOCATION_THRESHOLD,
        ip_colocation_factor_whitelist: HashSet::from([
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ]),
        behaviour_penalty_threshold: BEHAVIOUR_THRESHOLD,
        behaviour_penalty_decay: behaviour_decay,
        behaviour_penalty_weight: thresholds().gossip_threshold / target.powi(2),
        ..PeerScoreParams::default()
    };
    if let Some(hash) = deltas {
        params
            .topics
            .insert(hash, topic(DELTAS_WEIGHT, DELTAS_RATE, true));
    }
    if let Some(hash) = models {
        params
            .topics
            .insert(hash, topic(MODELS_WEIGHT, MODELS_RATE, false));
    }
    params
}

/// One topic's parameters: `weight`, the messages a second expected on it,
/// and whether mesh peers must deliver.
fn topic(weight: f64, rate: f64, mesh_deliveries: bool) -> TopicScoreParams {
    let max = max_positive_score();
    let first_decay = decay(FIRST_DELIVERY_MEMORY);
    let first_cap = convergence(first_decay, 2.0 * rate / MESH_N);
    let mut t = TopicScoreParams {
        topic_weight: weight,
        time_in_mesh_quantum: TIME_IN_MESH_QUANTUM,
        time_in_mesh_cap: TIME_IN_MESH_CAP,
        time_in_mesh_weight: MAX_IN_MESH_SCORE / TIME_IN_MESH_CAP,
        first_message_deliveries_decay: first_decay,
        first_message_deliveries_cap: first_cap,
        first_message_deliveries_weight: MAX_FIRST_MESSAGE_DELIVERIES_SCORE / first_cap,
        // One invalid message costs the best score; n cost n² times it.
        invalid_message_deliveries_weight: -max / weight,
        invalid_message_deliveries_decay: decay(INVALID_MEMORY),
        mesh_message_deliveries_weight: 0.0,
        mesh_message_deliveries_decay: 0.0,
        mesh_message_deliveries_cap: 0.0,
        mesh_message_deliveries_threshold: 0.0,
        mesh_message_deliveries_window: Duration::ZERO,
        mesh_message_deliveries_activation: Duration::ZERO,
        mesh_failure_penalty_weight: 0.0,
        mesh_failure_penalty_decay: 0.0,
    };
    if mesh_deliveries {
        // A mesh peer that relays (almost) nothing is pruned: it owes a
        // fiftieth of the expected rate, remembered for minutes, so an
        // honest peer in a quiet moment owes nothing.
        let d = decay(MESH_DELIVERY_MEMORY);
        let threshold = convergence(d, rate / 50.0) * d;
        t.mesh_message_deliveries_decay = d;
        t.mesh_message_deliveries_threshold = threshold;
        t.mesh_message_deliveries_cap = (3.0 * threshold).max(2.0);
        t.mesh_message_deliveries_activation = MESH_DELIVERY_ACTIVATION;
        t.mesh_message_deliveries_window = MESH_DELIVERY_WINDOW;
        t.mesh_message_deliveries_weight = -weight;
        t.mesh_failure_penalty_weight = -weight;
        t.mesh_failure_penalty_decay = d;
    }
    t
}

/// What one fault the node sees costs the peer in application score:
/// ten times the best score, so a peer that serves corrupt data or signs
/// faulty payloads stops being gossiped with after four faults and is
/// graylisted after sixteen (within an hour: the penalty halves every
/// [`APP_PENALTY_HALF_LIFE`]).
pub const APP_PENALTY: f64 = 10.0;
/// The application score of a non-member of a permissioned region: far
/// below the graylist threshold (−160× the best score), so gossipsub refuses
/// its GRAFTs, prunes it from the mesh at the next heartbeat if it got in,
/// and ignores everything it sends. (Blacklisting alone drops its messages
/// but still lets it into the mesh.)
pub fn outsider_score() -> f64 {
    -1000.0 * max_positive_score()
}

/// How fast application penalties fade.
pub const APP_PENALTY_HALF_LIFE: Duration = Duration::from_secs(900);
/// Peers whose application penalty is remembered at once; past this the
/// smallest penalty is forgotten.
pub const MAX_PENALISED: usize = 4096;

/// The application penalties of peers, fading with time.
#[derive(Debug, Default)]
pub struct AppPenalties {
    /// Peer → (penalty in units of the best score, when last updated).
    peers: HashMap<PeerId, (f64, Instant)>,
}

impl AppPenalties {
    /// Records a fault of `peer` at `now`; returns its new application
    /// score (negative).
    pub fn fault(&mut self, peer: PeerId, now: Instant) -> f64 {
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_PENALISED {
            let smallest = self
                .peers
                .iter()
                .min_by(|a, b| (a.1.0).total_cmp(&b.1.0))
                .map(|(p, _)| *p);
            if let Some(p) = smallest {
                self.peers.remove(&p);
            }
        }
        let entry = self.peers.entry(peer).or_insert((0.0, now));
        entry.0 = faded(entry.0, now.saturating_duration_since(entry.1)) + APP_PENALTY;
        entry.1 = now;
        -entry.0 * max_positive_score()
    }

    /// Fades every penalty to `now`; returns the peers with their new
    /// scores, and forgets those that have faded away (score 0).
    pub fn fade(&mut self, now: Instant) -> Vec<(PeerId, f64)> {
        let mut out = Vec::with_capacity(self.peers.len());
        self.peers.retain(|peer, (penalty, at)| {
            *penalty = faded(*penalty, now.saturating_duration_since(*at));
            *at = now;
            let keep = *penalty >= 0.1;
            out.push((
                *peer,
                if keep {
                    -*penalty * max_positive_score()
                } else {
                    0.0
                },
            ));
            keep
        });
        out
    }

    /// Peers with a penalty.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.peers.len()
    }
}

fn faded(penalty: f64, elapsed: Duration) -> f64 {
    penalty * 0.5f64.powf(elapsed.as_secs_f64() / APP_PENALTY_HALF_LIFE.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes() -> (TopicHash, TopicHash) {
        (
            libp2p::gossipsub::IdentTopic::new("d").hash(),
            libp2p::gossipsub::IdentTopic::new("m").hash(),
        )
    }

    #[test]
    fn parameters_are_valid_for_gossipsub() {
        let (d, m) = hashes();
        assert_eq!(params(Some(d), Some(m)).validate(), Ok(()));
        assert_eq!(thresholds().validate(), Ok(()));
    }

    /// A topic's score for a peer `secs` seconds in the mesh that has
    /// delivered first at `first` messages a second and sent `invalid`
    /// invalid messages a second throughout (gossipsub's formula, with its
    /// per-second decay).
    fn topic_score(t: &TopicScoreParams, secs: u32, first: f64, invalid: f64) -> f64 {
        let (mut first_count, mut invalid_count) = (0.0f64, 0.0f64);
        for _ in 0..secs {
            first_count = (first_count + first).min(t.first_message_deliveries_cap);
            invalid_count += invalid;
            first_count *= t.first_message_deliveries_decay;
            invalid_count *= t.invalid_message_deliveries_decay;
        }
        let in_mesh =
            (f64::from(secs) / t.time_in_mesh_quantum.as_secs_f64()).min(t.time_in_mesh_cap);
        t.topic_weight
            * (in_mesh * t.time_in_mesh_weight
                + first_count * t.first_message_deliveries_weight
                + invalid_count.powi(2) * t.invalid_message_deliveries_weight)
    }

    #[test]
    fn no_reward_outweighs_a_stream_of_invalid_messages() {
        let (d, m) = hashes();
        let p = params(Some(d.clone()), Some(m));
        let deltas = &p.topics[&d];
        let graylist = thresholds().graylist_threshold;
        // A peer an hour in the mesh, delivering first at twice the expected
        // rate, that sends one invalid delta every second: graylisted within
        // a minute, long before any reward could matter (the old defaults
        // let it send about four a second forever).
        let score = topic_score(deltas, 3600, 2.0 * DELTAS_RATE, 1.0);
        assert!(score < graylist, "{score} ≥ {graylist}");
        let t = (1..=3600)
            .find(|s| topic_score(deltas, *s, 2.0 * DELTAS_RATE, 1.0) < graylist)
            .unwrap_or(u32::MAX);
        assert!(t <= 60, "graylisted only after {t} s");
        // The most any good peer earns is bounded by the cap.
        let best = topic_score(deltas, 3600, 100.0, 0.0);
        assert!(
            best <= max_positive_score() * DELTAS_WEIGHT + 1e-9,
            "{best}"
        );
    }

    #[test]
    fn one_invalid_message_does_not_silence_a_fresh_peer() {
        let (d, m) = hashes();
        let p = params(Some(d.clone()), Some(m));
        let mut one = 0.0;
        one += p.topics[&d].invalid_message_deliveries_weight * p.topics[&d].topic_weight;
        // Even a few: a fresh peer that relayed three bad messages in good
        // faith still gets gossip and publishes.
        assert!(9.0 * one > thresholds().gossip_threshold, "{one}");
        assert!((one + max_positive_score()).abs() < 1e-9);
    }

    #[test]
    fn app_penalties_add_up_fade_and_stay_bounded() {
        let mut a = AppPenalties::default();
        let t0 = Instant::now();
        let peer = PeerId::random();
        let s1 = a.fault(peer, t0);
        let s2 = a.fault(peer, t0);
        assert!(s2 < s1 && s1 < 0.0);
        let th = thresholds();
        // Four faults: no more gossip with it; sixteen: graylisted.
        let mut s = s2;
        for _ in 2..4 {
            s = a.fault(peer, t0);
        }
        assert!(s < th.gossip_threshold * 0.99 && s > th.publish_threshold);
        for _ in 4..16 {
            s = a.fault(peer, t0);
        }
        assert!(s <= th.graylist_threshold, "{s}");
        // Half a score after a half-life; gone after many.
        let later = a.fade(t0 + APP_PENALTY_HALF_LIFE);
        assert!((later[0].1 - s / 2.0).abs() < 1e-6 * s.abs());
        let gone = a.fade(t0 + APP_PENALTY_HALF_LIFE * 20);
        assert_eq!(gone, vec![(peer, 0.0)]);
        assert_eq!(a.len(), 0);
        // Bounded: the smallest penalty makes room.
        for _ in 0..MAX_PENALISED + 10 {
            a.fault(PeerId::random(), t0);
        }
        assert_eq!(a.len(), MAX_PENALISED);
    }
}
