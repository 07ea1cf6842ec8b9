//! The way from the swarm task to the node, which the task never waits on:
//! what sheds under load, what waits in order, and the watched snapshot of
//! the network the node reads instead of asking the task.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::encoding::EncodeLabelSet;

use super::*;

/// Connection, subscription, ping and address events waiting for room in
/// the node's queue: few (bounded by connection churn, itself bounded by the
/// connection limits); past this, the oldest are dropped and logged.
const MAX_BACKLOG: usize = 16 * 1024;

/// The `kind` label of shed events.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ShedLabel {
    kind: &'static str,
}

/// Events on their way to the node. The swarm task never waits for the
/// node: a gossip message or a request that finds the node's queue full is
/// shed (the message reported `Ignore`, the request answered `Busy`) and
/// counted; other events, which the node must not miss, wait in a backlog
/// that drains as the node catches up. Order is kept: while a backlog
/// waits, traffic is shed rather than sent ahead of it.
pub(super) struct Outbox {
    pub(super) tx: mpsc::Sender<NetEvent>,
    pub(super) backlog: VecDeque<NetEvent>,
    pub(super) shed: Family<ShedLabel, Counter>,
    /// Gossip bytes in the queue, and the most there may be: the queue is
    /// bounded in bytes as well as in events (a message may be 1 MiB).
    pub(super) bytes: QueuedBytes,
    pub(super) max_bytes: usize,
}

/// Bytes waiting in a queue, shared by its two ends: the sender reserves
/// what it queues (within a bound), the receiver releases what it takes.
/// Gossip waiting for the node: the swarm task adds what it sends, the
/// node's [`Events`] takes away what it reads.
#[derive(Debug, Clone, Default)]
pub(crate) struct QueuedBytes(Arc<AtomicUsize>);

impl QueuedBytes {
    /// Counts `n` more bytes if they fit within `max`; whether they did.
    pub(crate) fn reserve(&self, n: usize, max: usize) -> bool {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= max)
            })
            .is_ok()
    }

    /// Counts `n` bytes fewer.
    pub(crate) fn release(&self, n: usize) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(n))
            });
    }

    /// Bytes counted now.
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// The node's end of the event queue (see [`Outbox`]).
#[derive(Debug)]
pub struct Events {
    pub(super) rx: mpsc::Receiver<NetEvent>,
    pub(super) bytes: QueuedBytes,
}

impl Events {
    /// Events fed by hand, with no network task behind them (in-process
    /// tests of the node).
    #[cfg(test)]
    pub(crate) fn from_receiver(rx: mpsc::Receiver<NetEvent>) -> Events {
        Events {
            rx,
            bytes: QueuedBytes::default(),
        }
    }

    /// The next event; `None` once the network task has stopped.
    pub async fn recv(&mut self) -> Option<NetEvent> {
        let event = self.rx.recv().await?;
        if let NetEvent::Gossip { data, .. } = &event {
            self.bytes.release(data.len());
        }
        Some(event)
    }

    /// Gossip bytes waiting in the queue.
    pub fn queued_bytes(&self) -> usize {
        self.bytes.get()
    }
}

impl Outbox {
    /// Offers an event to the node; `false` once the node has gone.
    pub(super) fn offer(&mut self, swarm: &mut Swarm<Behaviour>, event: NetEvent) -> bool {
        let traffic = matches!(event, NetEvent::Gossip { .. } | NetEvent::Request { .. });
        if !traffic {
            if self.backlog.len() >= MAX_BACKLOG {
                tracing::warn!("the node is not reading network events; dropping the oldest");
                self.backlog.pop_front();
            }
            self.backlog.push_back(event);
            return !self.tx.is_closed();
        }
        if !self.backlog.is_empty() {
            self.shed(swarm, event);
            return true;
        }
        let bytes = match &event {
            NetEvent::Gossip { data, .. } => data.len(),
            _ => 0,
        };
        if !self.bytes.reserve(bytes, self.max_bytes) {
            self.shed(swarm, event);
            return true;
        }
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(event)) => {
                self.bytes.release(bytes);
                self.shed(swarm, event);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn shed(&self, swarm: &mut Swarm<Behaviour>, event: NetEvent) {
        match event {
            NetEvent::Gossip { id, source, .. } => {
                self.shed.get_or_create(&ShedLabel { kind: "gossip" }).inc();
                let _ = swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&id, &source, MessageAcceptance::Ignore);
            }
            NetEvent::Request { channel, .. } => {
                self.shed
                    .get_or_create(&ShedLabel { kind: "request" })
                    .inc();
                let _ = swarm
                    .behaviour_mut()
                    .fetch
                    .send_response(channel, FetchResponse::Busy);
            }
            _ => {}
        }
    }
}

/// Shows the node the network as it is now.
pub(super) fn show(
    swarm: &Swarm<Behaviour>,
    listening: &HashSet<Multiaddr>,
    view: &watch::Sender<NetSnapshot>,
    reach: &Reach,
) {
    view.send_replace(NetSnapshot {
        reach: reach.clone(),
        peer_id: swarm.local_peer_id().to_string(),
        peers: swarm.connected_peers().map(|p| p.to_string()).collect(),
        listen: listening.iter().map(|a| a.to_string()).collect(),
        mesh: swarm
            .behaviour()
            .gossipsub
            .all_mesh_peers()
            .map(|p| p.to_string())
            .collect(),
        updated: Some(std::time::Instant::now()),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_bytes_stay_within_their_bound_and_come_back_when_read() {
        let q = QueuedBytes::default();
        assert!(q.reserve(600, 1000));
        assert!(!q.reserve(500, 1000), "over the bound");
        assert_eq!(q.get(), 600);
        assert!(q.reserve(400, 1000));
        q.release(600);
        assert!(q.reserve(500, 1000));
        assert_eq!(q.get(), 900);
        q.release(5000);
        assert_eq!(q.get(), 0, "never below zero");
        assert!(!q.reserve(usize::MAX, usize::MAX - 1));
    }
}
