//! The way from the swarm task to the node, which the task never waits on:
//! what sheds under load, what waits in order, and the watched snapshot of
//! the network the node reads instead of asking the task.

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
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(event)) => {
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
) {
    view.send_replace(NetSnapshot {
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
