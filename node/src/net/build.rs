//! Building the swarm: the transports (TCP with noise and yamux, QUIC,
//! DNS, the relay client) and the behaviours — identify, ping, Kademlia,
//! mDNS, gossipsub with its message id and peer scoring, the fetch
//! protocol, the stream behaviour of the chunk protocol, DCUtR, AutoNAT,
//! a relay server (if configured) and connection limits.

use super::*;

/// How often connected peers are pinged, and how long a ping may take.
pub(super) const PING_EVERY: Duration = Duration::from_secs(3);
pub(super) const PING_TIMEOUT: Duration = Duration::from_secs(6);
/// A peer that answers no ping for this long is disconnected by the node
/// (a cut network leaves TCP connections open for many minutes otherwise,
/// and rounds would wait for a peer that cannot be heard): one interval
/// and one ping's timeout.
pub const SILENCE_LIMIT: Duration = PING_EVERY.saturating_add(PING_TIMEOUT);

/// The swarm of a node with this identity and configuration, its
/// bandwidth counted in `registry`.
pub(super) fn swarm(
    keypair: identity::Keypair,
    config: &NetConfig,
    registry: &mut prometheus_client::registry::Registry,
) -> Result<Swarm<Behaviour>, NetError> {
    let swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(build_err)?
        .with_quic()
        .with_dns()
        .map_err(build_err)?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(build_err)?
        .with_bandwidth_metrics(registry)
        .with_behaviour(|key, relay_client| {
            let peer_id = key.public().to_peer_id();
            let mut kad_config = kad::Config::new(KAD_PROTOCOL);
            kad_config.set_query_timeout(Duration::from_secs(30));
            let mut kad = kad::Behaviour::with_config(
                peer_id,
                kad::store::MemoryStore::new(peer_id),
                kad_config,
            );
            kad.set_mode(Some(kad::Mode::Server));
            let mdns = if config.mdns {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    peer_id,
                )?)
            } else {
                None
            };
            let limits = connection_limits::ConnectionLimits::default()
                .with_max_established(Some(config.max_connections))
                .with_max_established_incoming(Some(max_incoming(config.max_connections)))
                .with_max_established_per_peer(Some(config.max_connections_per_peer));
            let fetch = request_response::Behaviour::with_codec(
                FetchCodec,
                [(FETCH_PROTOCOL, ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(config.request_timeout),
            );
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                identify: identify::Behaviour::new(
                    identify::Config::new(PROTOCOL_VERSION.into(), key.public())
                        .with_agent_version(format!("tapestry/{}", env!("CARGO_PKG_VERSION"))),
                ),
                ping: ping::Behaviour::new(
                    ping::Config::new()
                        .with_interval(PING_EVERY)
                        .with_timeout(PING_TIMEOUT),
                ),
                kad,
                mdns: Toggle::from(mdns),
                gossipsub: gossipsub_behaviour(key, config).map_err(Box::new)?,
                fetch,
                streams: libp2p_stream::Behaviour::new(),
                relay_client,
                relay_server: Toggle::from(config.relay_server.map(|l| {
                    libp2p::relay::Behaviour::new(
                        peer_id,
                        libp2p::relay::Config {
                            max_reservations: l.max_reservations,
                            max_circuits: l.max_circuits,
                            max_circuits_per_peer: l.max_circuits_per_peer,
                            max_circuit_duration: l.circuit_duration,
                            max_circuit_bytes: l.circuit_bytes,
                            ..libp2p::relay::Config::default()
                        },
                    )
                })),
                dcutr: dcutr::Behaviour::new(peer_id),
                autonat: autonat::Behaviour::new(
                    peer_id,
                    autonat::Config {
                        only_global_ips: false,
                        // Sooner and more often than libp2p's defaults
                        // (15 s, 90 s, 90 s): a region has few peers to
                        // ask, and a node should know early whether it
                        // needs a relay.
                        boot_delay: Duration::from_secs(5),
                        retry_interval: Duration::from_secs(30),
                        throttle_server_period: Duration::from_secs(15),
                        ..Default::default()
                    },
                ),
            })
        })
        .map_err(build_err)?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    Ok(swarm)
}

mod behaviour {
    //! The behaviour set, in its own module because the derive generates an
    //! event enum (`BehaviourEvent`, one variant per field) that cannot carry
    //! doc comments.
    #![allow(missing_docs)]

    use libp2p::swarm::NetworkBehaviour;
    use libp2p::swarm::behaviour::toggle::Toggle;
    use libp2p::{
        autonat, connection_limits, dcutr, gossipsub, identify, kad, mdns, ping, relay,
        request_response,
    };

    use super::FetchCodec;

    /// Every behaviour of a Tapestry node.
    #[derive(NetworkBehaviour)]
    pub struct Behaviour {
        pub(in crate::net) limits: connection_limits::Behaviour,
        pub(in crate::net) identify: identify::Behaviour,
        pub(in crate::net) ping: ping::Behaviour,
        pub(in crate::net) kad: kad::Behaviour<kad::store::MemoryStore>,
        pub(in crate::net) mdns: Toggle<mdns::tokio::Behaviour>,
        pub(in crate::net) gossipsub: gossipsub::Behaviour,
        pub(in crate::net) fetch: request_response::Behaviour<FetchCodec>,
        /// Raw streams: the chunk protocol (`chunks`).
        pub(in crate::net) streams: libp2p_stream::Behaviour,
        pub(in crate::net) relay_client: relay::client::Behaviour,
        pub(in crate::net) relay_server: Toggle<relay::Behaviour>,
        pub(in crate::net) dcutr: dcutr::Behaviour,
        pub(in crate::net) autonat: autonat::Behaviour,
    }
}

pub use behaviour::{Behaviour, BehaviourEvent};

/// A gossip message's id: BLAKE3 of the topic, a zero byte, and the data.
pub fn message_id(topic: &str, data: &[u8]) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    h.update(topic.as_bytes());
    h.update(&[0]);
    h.update(data);
    h.finalize().as_bytes().to_vec()
}

pub(super) fn build_err(e: impl std::fmt::Display) -> NetError {
    NetError::Build(e.to_string())
}

fn gossipsub_behaviour(
    key: &identity::Keypair,
    config: &NetConfig,
) -> Result<gossipsub::Behaviour, NetError> {
    let gossip_config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(config.heartbeat)
        .validation_mode(ValidationMode::Strict)
        .validate_messages()
        // The id covers the topic: the same bytes published on another topic
        // (a delta's envelope republished on the models topic) are another
        // message, so a copy cannot get the real one dropped as a duplicate.
        .message_id_fn(|m: &gossipsub::Message| {
            MessageId::from(message_id(m.topic.as_str(), &m.data))
        })
        .max_transmit_size(MAX_GOSSIP_BYTES)
        // Remember message ids at least as long as a delta can be admitted
        // (the round window), so a copy sent again within it is dropped
        // unread.
        .duplicate_cache_time(config.round_window.max(Duration::from_secs(60)))
        .build()
        .map_err(build_err)?;
    let mut gossip =
        gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), gossip_config)
            .map_err(build_err)?;
    // The first topic is the deltas topic, the second the models topic
    // (see [`NetConfig::topics`]); each is scored as such.
    let hash = |k: usize| config.topics.get(k).map(|t| IdentTopic::new(t).hash());
    gossip
        .with_peer_score(scoring::params(hash(0), hash(1)), scoring::thresholds())
        .map_err(build_err)?;
    for topic in &config.topics {
        gossip
            .subscribe(&IdentTopic::new(topic))
            .map_err(build_err)?;
    }
    Ok(gossip)
}

/// Of `max` connections, how many peers may open: a quarter is kept for the
/// connections this node dials, so a crowd of inbound peers (sybils) cannot
/// cut it off from the peers it chose.
pub(in crate::net) fn max_incoming(max: u32) -> u32 {
    max - max / 4
}
