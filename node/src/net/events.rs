//! What the swarm reports, turned into the node's [`NetEvent`]s: new
//! connections and addresses, gossip, fetch requests and answers, DHT
//! provider queries, identify and mDNS discoveries, pings (the node decides
//! whom to drop).

use super::*;

/// Feeds libp2p's metrics.
pub(super) fn record(metrics: &libp2p::metrics::Metrics, event: &SwarmEvent<BehaviourEvent>) {
    use libp2p::metrics::Recorder;
    metrics.record(event);
    if let SwarmEvent::Behaviour(b) = event {
        match b {
            BehaviourEvent::Gossipsub(e) => metrics.record(e),
            BehaviourEvent::Identify(e) => metrics.record(e),
            BehaviourEvent::Kad(e) => metrics.record(e),
            BehaviourEvent::Ping(e) => metrics.record(e),
            BehaviourEvent::Dcutr(e) => metrics.record(e),
            _ => {}
        }
    }
}

/// A fetch (request-response) event: a peer's request goes to the node;
/// an answer or failure goes to whoever is waiting for it.
pub(super) fn on_fetch(
    pending: &mut Pending,
    event: request_response::Event<FetchRequest, FetchResponse>,
) -> Option<NetEvent> {
    match event {
        request_response::Event::Message { peer, message, .. } => match message {
            request_response::Message::Request {
                request, channel, ..
            } => Some(NetEvent::Request {
                peer,
                request,
                channel,
            }),
            request_response::Message::Response {
                request_id,
                response,
            } => {
                if let Some(reply) = pending.fetches.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
                None
            }
        },
        request_response::Event::OutboundFailure {
            peer,
            request_id,
            error,
            ..
        } => {
            if let Some(reply) = pending.fetches.remove(&request_id) {
                let _ = reply.send(Err(NetError::Fetch {
                    peer,
                    reason: error.to_string(),
                }));
            }
            None
        }
        request_response::Event::InboundFailure { peer, error, .. } => {
            tracing::debug!(%peer, %error, "inbound fetch failed");
            None
        }
        request_response::Event::ResponseSent { .. } => None,
    }
}

/// A step of a DHT provider query: providers found are collected, and
/// handed to whoever asked once the query ends.
pub(super) fn on_providers(
    pending: &mut Pending,
    id: kad::QueryId,
    result: kad::GetProvidersResult,
    last: bool,
) {
    let done = match result {
        Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
            if let Some((found, _)) = pending.providers.get_mut(&id) {
                found.extend(providers);
            }
            last
        }
        _ => true,
    };
    if done && let Some((found, reply)) = pending.providers.remove(&id) {
        let _ = reply.send(found.into_iter().collect());
    }
}

/// Handles one swarm event; returns what the node should hear of it.
pub(super) fn handle_event(
    swarm: &mut Swarm<Behaviour>,
    pending: &mut Pending,
    listening: &mut HashSet<Multiaddr>,
    event: SwarmEvent<BehaviourEvent>,
) -> Option<NetEvent> {
    match event {
        SwarmEvent::NewListenAddr { address, .. } => {
            // A relay server is public by its operator's word: its own
            // addresses are what it offers the peers that reserve a
            // place (a relay without one is refused by them).
            let routable = !address.iter().any(|p| match p {
                libp2p::multiaddr::Protocol::Ip4(ip) => ip.is_loopback() || ip.is_unspecified(),
                libp2p::multiaddr::Protocol::Ip6(ip) => ip.is_loopback() || ip.is_unspecified(),
                _ => false,
            });
            if swarm.behaviour().relay_server.is_enabled()
                && routable
                && !reach::is_relayed(&address)
            {
                swarm.add_external_address(address.clone());
            }
            listening.insert(address.clone());
            Some(NetEvent::Listening(address))
        }
        SwarmEvent::ExpiredListenAddr { address, .. } => {
            listening.remove(&address);
            None
        }
        SwarmEvent::ConnectionEstablished {
            peer_id,
            endpoint,
            num_established,
            ..
        } => {
            if endpoint.is_dialer() {
                swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer_id, endpoint.get_remote_address().clone());
            }
            (num_established.get() == 1).then_some(NetEvent::PeerConnected(peer_id))
        }
        SwarmEvent::ConnectionClosed {
            peer_id,
            num_established,
            ..
        } => (num_established == 0).then_some(NetEvent::PeerDisconnected(peer_id)),
        SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, result, .. })) => {
            let outcome = match result {
                Ok(rtt) => PingOutcome::Answered(rtt),
                Err(ping::Failure::Unsupported) => PingOutcome::Unsupported,
                Err(e) => PingOutcome::Failed(e.to_string()),
            };
            Some(NetEvent::Ping { peer, outcome })
        }
        SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed {
            peer_id,
            topic,
        })) => Some(NetEvent::Subscribed {
            peer: peer_id,
            topic,
        }),
        SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Unsubscribed {
            peer_id,
            topic,
        })) => Some(NetEvent::Unsubscribed {
            peer: peer_id,
            topic,
        }),
        SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        })) => Some(NetEvent::Gossip {
            id: message_id,
            source: propagation_source,
            topic: message.topic,
            data: message.data,
        }),
        SwarmEvent::Behaviour(BehaviourEvent::Fetch(event)) => on_fetch(pending, event),
        SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
            id,
            result: kad::QueryResult::GetProviders(result),
            step,
            ..
        })) => {
            on_providers(pending, id, result, step.last);
            None
        }
        SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
            peer_id,
            info,
            ..
        })) => {
            if info.protocol_version == PROTOCOL_VERSION {
                for addr in info.listen_addrs {
                    swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            None
        }
        SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
            for (peer, addr) in found {
                swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                if !swarm.is_connected(&peer) {
                    let _ = swarm.dial(addr);
                }
            }
            None
        }
        SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
            tracing::debug!(?peer_id, %error, "outgoing connection failed");
            None
        }
        _ => None,
    }
}
