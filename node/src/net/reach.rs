//! How the node is reached: AutoNAT's verdict, every open connection
//! (direct or through a relay), hole punches (DCUtR), relay reservations
//! and, for a relay server, the circuits it carried or refused. The
//! network task notes them from swarm events; `/status` shows them.

use libp2p::multiaddr::Protocol;
use libp2p::{autonat, dcutr, relay};

use super::*;

/// Whether an address goes through a relay.
pub(super) fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// Adds `peer` to a sorted list of at most 64.
fn remember(list: &mut Vec<String>, peer: &PeerId) {
    let peer = peer.to_string();
    if let Err(at) = list.binary_search(&peer)
        && list.len() < 64
    {
        list.insert(at, peer);
    }
}

/// Notes what `event` changes of `reach`; returns whether the snapshot
/// should be shown again.
pub(super) fn note(
    reach: &mut Reach,
    connections: &mut HashMap<libp2p::swarm::ConnectionId, Connection>,
    event: &SwarmEvent<BehaviourEvent>,
) -> bool {
    match event {
        SwarmEvent::ConnectionEstablished {
            peer_id,
            connection_id,
            endpoint,
            ..
        } => {
            // (An inbound relayed connection's remote address is only the
            // peer id; its local one is the circuit.)
            connections.insert(
                *connection_id,
                Connection {
                    peer: peer_id.to_string(),
                    address: endpoint.get_remote_address().to_string(),
                    relayed: endpoint.is_relayed(),
                },
            );
        }
        SwarmEvent::ConnectionClosed { connection_id, .. } => {
            connections.remove(connection_id);
        }
        SwarmEvent::NewListenAddr { .. } | SwarmEvent::ExpiredListenAddr { .. } => {}
        SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged {
            new,
            ..
        })) => {
            tracing::info!(status = ?new, "AutoNAT");
            let (status, address) = match new {
                autonat::NatStatus::Public(a) => ("public", Some(a.to_string())),
                autonat::NatStatus::Private => ("private", None),
                autonat::NatStatus::Unknown => ("unknown", None),
            };
            reach.nat_status = status.into();
            reach.public_address = address;
        }
        SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
            remote_peer_id,
            result,
        })) => match result {
            Ok(_) => {
                tracing::info!(peer = %remote_peer_id, "hole punched: a direct connection");
                reach.hole_punches_succeeded += 1;
                remember(&mut reach.hole_punched_peers, remote_peer_id);
            }
            Err(e) => {
                tracing::info!(peer = %remote_peer_id, error = %e, "hole punch failed; the connection stays relayed");
                reach.hole_punches_failed += 1;
                remember(&mut reach.hole_punch_failed_peers, remote_peer_id);
            }
        },
        SwarmEvent::Behaviour(BehaviourEvent::RelayClient(
            relay::client::Event::ReservationReqAccepted { relay_peer_id, .. },
        )) => {
            tracing::info!(relay = %relay_peer_id, "relay reservation accepted");
            reach.relay_reservations += 1;
        }
        SwarmEvent::Behaviour(BehaviourEvent::RelayServer(e)) => match e {
            relay::Event::CircuitReqAccepted { .. } => reach.circuits_relayed += 1,
            relay::Event::CircuitReqDenied { .. } | relay::Event::ReservationReqDenied { .. } => {
                reach.circuits_refused += 1;
            }
            _ => return false,
        },
        _ => return false,
    }
    reach.connections = connections.values().cloned().collect();
    reach
        .connections
        .sort_by(|a, b| (&a.peer, &a.address).cmp(&(&b.peer, &b.address)));
    true
}
