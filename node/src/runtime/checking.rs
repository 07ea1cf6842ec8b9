//! Gossiped announcements are checked off the node's loop. The loop hands
//! each one to the checker without waiting (a full queue sheds it: it is
//! reported `Ignore` and counted); the checker takes what has queued up, up
//! to [`MAX_BATCH`], and opens it on a blocking thread with one batch
//! signature check per kind ([`admission::open_all`]), one batch at a time
//! (a pool of one thread: the other core stays with the node, the swarm and
//! training); the results come back to the loop in the order they came.

use super::*;
use tapestry_core::admission::{Announced, Topic};

/// Announcements waiting to be checked, at most.
pub(super) const CHECK_QUEUE: usize = 8192;
/// Bytes of announcements waiting to be checked, at most (an announcement
/// is at most 512 KiB; most are a few hundred bytes).
pub(super) const CHECK_QUEUE_BYTES: usize = 64 << 20;
/// Announcements checked in one batch, at most.
pub(super) const MAX_BATCH: usize = 256;
/// Gossip messages one peer may hand this node in a second (both topics),
/// past which the rest of that second's are dropped unchecked (`Ignore`:
/// no one else who forwarded them is blamed), counted `over_budget`, and
/// each costs the peer a fault in its application score (sixteen graylist
/// it, and gossipsub then drops its messages before keeping any record of
/// them). Honest traffic is one delta per author per round and a version
/// or two: a region of 1,000 nodes at a round every 2 s relays 500 a
/// second. gossipsub's peer scoring keeps every distinct message id it is
/// handed for 120 s (~40 KiB of memory per message a second), so this
/// bounds what one peer can make it hold.
pub(super) const GOSSIP_BUDGET: u32 = 1000;

/// Gossip messages counted per forwarding peer over the current second
/// (entries are dropped when the peer disconnects: bounded by the
/// connected peers).
#[derive(Debug, Default)]
pub(super) struct Budget {
    counts: HashMap<PeerId, (Instant, u32)>,
}

impl Budget {
    /// Counts a message from `peer` at `now`; `false` once the peer has
    /// handed [`GOSSIP_BUDGET`] this second.
    pub(super) fn allow(&mut self, peer: PeerId, now: Instant) -> bool {
        let (since, n) = self.counts.entry(peer).or_insert((now, 0));
        if now.saturating_duration_since(*since) >= Duration::from_secs(1) {
            *since = now;
            *n = 0;
        }
        *n = n.saturating_add(1);
        *n <= GOSSIP_BUDGET
    }

    /// Forgets a disconnected peer.
    pub(super) fn forget(&mut self, peer: &PeerId) {
        self.counts.remove(peer);
    }
}

/// A gossip message to check.
pub(super) struct Unchecked {
    pub(super) id: libp2p::gossipsub::MessageId,
    pub(super) source: PeerId,
    pub(super) topic: Topic,
    pub(super) data: Vec<u8>,
}

/// A gossip message checked: what it is, or why it is refused.
pub(super) struct Checked {
    pub(super) id: libp2p::gossipsub::MessageId,
    pub(super) source: PeerId,
    pub(super) result: Result<Announced, Rejection>,
}

/// The node's side of the checker.
pub(super) struct Checker {
    tx: mpsc::Sender<Unchecked>,
    /// Taken by [`Checker::start`].
    rx: Option<mpsc::Receiver<Unchecked>>,
    queued_bytes: net::QueuedBytes,
}

impl Checker {
    pub(super) fn new() -> Checker {
        let (tx, rx) = mpsc::channel(CHECK_QUEUE);
        Checker {
            tx,
            rx: Some(rx),
            queued_bytes: net::QueuedBytes::default(),
        }
    }

    /// Starts checking (once) against `roster`; the results arrive on the
    /// returned receiver.
    pub(super) fn start(&mut self, roster: Option<Roster>) -> mpsc::Receiver<Checked> {
        let (out, checked) = mpsc::channel(CHECK_QUEUE);
        if let Some(rx) = self.rx.take() {
            tokio::spawn(check(rx, out, roster, self.queued_bytes.clone()));
        }
        checked
    }

    /// Queues a message to check; gives it back if there is no room.
    pub(super) fn offer(&self, u: Unchecked) -> Result<(), Box<Unchecked>> {
        if !self.queued_bytes.reserve(u.data.len(), CHECK_QUEUE_BYTES) {
            return Err(Box::new(u));
        }
        self.tx.try_send(u).map_err(|e| {
            let u = e.into_inner();
            self.queued_bytes.release(u.data.len());
            Box::new(u)
        })
    }
}

/// The checker's task: batches of what has queued up, opened on a blocking
/// thread, the results sent on in order (waiting for the node if it is
/// behind: the node never waits for the checker, so this cannot deadlock).
async fn check(
    mut rx: mpsc::Receiver<Unchecked>,
    out: mpsc::Sender<Checked>,
    roster: Option<Roster>,
    queued_bytes: net::QueuedBytes,
) {
    let roster = Arc::new(roster);
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(u) => batch.push(u),
                Err(_) => break,
            }
        }
        let bytes: usize = batch.iter().map(|u| u.data.len()).sum();
        queued_bytes.release(bytes);
        let roster = roster.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let (meta, items): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .map(|u| ((u.id, u.source), (u.topic, u.data)))
                .unzip();
            let results =
                admission::open_all(items, roster.as_ref().as_ref(), crate::ops::unix_ms());
            meta.into_iter()
                .zip(results)
                .map(|((id, source), result)| Checked { id, source, result })
                .collect::<Vec<_>>()
        })
        .await;
        let Ok(checked) = opened else {
            tracing::error!("checking gossip failed; the checker stops");
            return;
        };
        for c in checked {
            if out.send(c).await.is_err() {
                return;
            }
        }
    }
}

impl Node {
    /// A gossip message arrived: to the checker, or shed if it is full.
    pub(super) async fn on_gossip(
        &mut self,
        id: libp2p::gossipsub::MessageId,
        source: PeerId,
        topic: TopicHash,
        data: Vec<u8>,
    ) {
        if !self.gossip_budget.allow(source, Instant::now()) {
            self.shared.metrics.reject("over_budget");
            self.net.fault(source);
            self.report(id, source, Verdict::Ignore).await;
            return;
        }
        let topic = if topic == self.deltas_hash {
            Topic::Deltas
        } else if topic == self.models_hash {
            Topic::Models
        } else {
            self.report(id, source, Verdict::Ignore).await;
            return;
        };
        let unchecked = Unchecked {
            id,
            source,
            topic,
            data,
        };
        if let Err(u) = self.checker.offer(unchecked) {
            self.shared.metrics.gossip_shed.inc();
            self.report(u.id, u.source, Verdict::Ignore).await;
        }
    }

    /// A gossip message checked: refused, or on to the engine.
    pub(super) async fn on_checked(&mut self, c: Checked) {
        let verdict = match c.result {
            Err(r) => Some(self.refuse(&r, &c.source)),
            Ok(Announced::Delta(m)) => Some(self.on_delta(c.source, m).await),
            // A version being verified is reported when the verdict comes:
            // forwarded only if it passed.
            Ok(Announced::Version(m)) => self.on_model(c.source, m, Some(c.id.clone())).await,
        };
        if let Some(verdict) = verdict {
            self.report(c.id, c.source, verdict).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_past_its_budget_is_refused_until_the_next_second() {
        let mut b = Budget::default();
        let (p, q) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        for _ in 0..GOSSIP_BUDGET {
            assert!(b.allow(p, t0));
        }
        assert!(!b.allow(p, t0 + Duration::from_millis(999)));
        // Another peer has its own budget.
        assert!(b.allow(q, t0));
        // A new second, a new budget.
        assert!(b.allow(p, t0 + Duration::from_secs(1)));
        b.forget(&p);
        b.forget(&q);
        assert!(b.counts.is_empty());
    }
}
