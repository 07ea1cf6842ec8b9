//! The libp2p shell. One task owns the [`Swarm`]; everything else talks to
//! it through a cloneable [`NetHandle`] (a bounded channel of [`Command`]s,
//! with oneshot replies) and hears from it through a bounded channel of
//! [`NetEvent`]s, which the task never waits on (see [`Outbox`]); the node
//! reads the network's state from a watched [`NetSnapshot`], never by asking
//! the task. The task never verifies signatures, decodes tensors or trains:
//! it moves bytes and reports validation results back to gossipsub.
//!
//! Behaviours: identify, ping, Kademlia (peer discovery), mDNS (optional),
//! gossipsub (signed messages, `validate_messages`, message id = BLAKE3 of
//! topic and data, peer scoring with a heavy penalty for invalid messages),
//! request-response for chunk, manifest and head fetches (CBOR through the
//! protocol crate's decoder with limits), AutoNAT, relay client and DCUtR,
//! and connection limits. Transports: TCP with noise and yamux, QUIC, DNS.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::gossipsub::{
    self, IdentTopic, MessageAcceptance, MessageAuthenticity, MessageId, TopicHash, ValidationMode,
};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, autonat, connection_limits, dcutr,
    identify, identity, kad, mdns, noise, ping, tcp, yamux,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tapestry_core::admission::Verdict;
use tapestry_protocol::{ContentId, FetchRequest, FetchResponse, Keypair, NodeId};
use tokio::sync::{mpsc, oneshot, watch};

mod build;
mod chunks;
mod codec;
mod events;
mod outbox;
mod reach;
mod scoring;

pub use build::{Behaviour, BehaviourEvent, SILENCE_LIMIT, message_id};
pub use chunks::{
    CHUNKS_PROTOCOL, ChunkReader, Frame, MAX_BATCH, read_request, write_busy, write_chunk,
    write_missing,
};
pub use codec::FetchCodec;
use events::*;
pub use outbox::Events;
pub(crate) use outbox::QueuedBytes;
use outbox::*;

/// The identify protocol version of Tapestry nodes.
pub const PROTOCOL_VERSION: &str = "/tapestry/1";
/// The request-response protocol for chunks, manifests and heads.
pub const FETCH_PROTOCOL: StreamProtocol = StreamProtocol::new("/tapestry/fetch/1");
/// Tapestry's own Kademlia DHT (not the IPFS one).
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/tapestry/kad/1");
/// Times a chunk stream is opened (and its request sent) before a failure
/// at its start is reported (pauses of 50, 100, 200 ms between).
const OPEN_TRIES: u32 = 4;
/// Largest fetch request accepted (a request names one id or one head).
const MAX_REQUEST_BYTES: u64 = 4 << 10;
/// Largest fetch response accepted: one chunk or manifest and its framing.
const MAX_RESPONSE_BYTES: u64 = tapestry_protocol::DecodeLimits::FETCH.max_bytes as u64;
/// Largest gossip message carried at all (gossipsub drops larger ones
/// silently); the node rejects, and counts, announcements above
/// [`tapestry_core::admission::MAX_ANNOUNCEMENT_BYTES`].
pub const MAX_GOSSIP_BYTES: usize = 1 << 20;

/// Why the network could not start or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A transport or behaviour could not be built.
    #[error("could not build the network: {0}")]
    Build(String),
    /// An address could not be listened on.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// The network task has stopped.
    #[error("the network task has stopped")]
    Stopped,
    /// The peer does not speak the protocol asked for.
    #[error("{peer} does not speak {protocol}")]
    Unsupported {
        /// The peer asked.
        peer: PeerId,
        /// The protocol.
        protocol: StreamProtocol,
    },
    /// A fetch failed (timeout, dial failure, closed connection...).
    #[error("fetch from {peer} failed: {reason}")]
    Fetch {
        /// The peer asked.
        peer: PeerId,
        /// Why.
        reason: String,
    },
}

/// Network settings.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (each must end in `/p2p/<peer id>` to be
    /// added to the DHT; any address is dialled).
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS.
    pub mdns: bool,
    /// Gossip topics to join: the deltas topic first, then the models
    /// topic (peer scoring weighs them as such; see `scoring`).
    pub topics: Vec<String>,
    /// Most established connections in total.
    pub max_connections: u32,
    /// Most established connections per peer.
    pub max_connections_per_peer: u32,
    /// Gossipsub heartbeat (default 1 s, [`scoring::HEARTBEAT`]).
    pub heartbeat: Duration,
    /// How long a delta may still be admitted after it is sent (rounds of
    /// the staleness window × the round timeout): gossip remembers message
    /// ids at least this long (and at least a minute).
    pub round_window: Duration,
    /// Per-request timeout of fetches.
    pub request_timeout: Duration,
    /// Events (gossip, requests, connections) that may wait for the node;
    /// gossip and requests beyond it are shed (see [`Outbox`]).
    pub event_queue: usize,
    /// Gossip bytes that may wait for the node; gossip beyond it is shed.
    pub event_queue_bytes: usize,
    /// Serve as a relay for peers that cannot be reached directly (behind
    /// NAT), within these limits; `None`: not a relay.
    pub relay_server: Option<RelayLimits>,
    /// Relays to listen through (each `.../p2p/<relay id>`): peers reach
    /// this node through them when they cannot directly, and DCUtR then
    /// tries to connect directly (hole punching).
    pub relays: Vec<Multiaddr>,
}

/// What a relay server allows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelayLimits {
    /// Reservations (peers listening through this relay) at once.
    pub max_reservations: usize,
    /// Relayed connections at once.
    pub max_circuits: usize,
    /// Relayed connections at once per peer.
    pub max_circuits_per_peer: usize,
    /// A relayed connection is closed after this long.
    pub circuit_duration: Duration,
    /// A relayed connection is closed after this many bytes.
    pub circuit_bytes: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_reservations: 128,
            max_circuits: 64,
            max_circuits_per_peer: 8,
            circuit_duration: Duration::from_secs(30 * 60),
            circuit_bytes: 1 << 30,
        }
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            bootstrap: Vec::new(),
            mdns: false,
            topics: Vec::new(),
            max_connections: 256,
            max_connections_per_peer: 4,
            heartbeat: scoring::HEARTBEAT,
            round_window: Duration::from_secs(60),
            request_timeout: Duration::from_secs(20),
            event_queue: EVENT_QUEUE,
            event_queue_bytes: EVENT_QUEUE_BYTES,
            relay_server: None,
            relays: Vec::new(),
        }
    }
}

/// What the rest of the node asks the network task to do (through
/// [`NetHandle`]'s methods; the task alone sees these, and the node's
/// in-process tests).
#[derive(Debug)]
pub(crate) enum Command {
    /// Publish on a gossip topic.
    Publish {
        /// The topic.
        topic: String,
        /// The message.
        data: Vec<u8>,
    },
    /// Tell gossipsub what validation found about a message.
    Report {
        /// Its id.
        id: MessageId,
        /// The peer that forwarded it.
        source: PeerId,
        /// Accept (forward), reject (penalise the forwarder) or ignore.
        acceptance: MessageAcceptance,
    },
    /// Ask a peer for something.
    Fetch {
        /// The peer.
        peer: PeerId,
        /// The request.
        request: FetchRequest,
        /// The answer.
        reply: oneshot::Sender<Result<FetchResponse, NetError>>,
    },
    /// Answer a peer's request.
    Respond {
        /// The channel of its request.
        channel: ResponseChannel<FetchResponse>,
        /// The answer.
        response: FetchResponse,
    },
    /// Close every connection to a peer.
    Disconnect(PeerId),
    /// Keep a peer out of gossip: no mesh, none of its messages.
    Blacklist(PeerId),
    /// A fault of a peer the node saw (a corrupt chunk served, a payload
    /// that fails the door, two votes signed for one round): lowers its
    /// application score.
    Fault(PeerId),
    /// Announce in the DHT that this node holds (the chunks of) `id`.
    Provide(ContentId),
    /// Stop announcing `id` in the DHT.
    Unprovide(ContentId),
    /// Ask the DHT who holds (the chunks of) `id`.
    Providers {
        /// The content.
        id: ContentId,
        /// The peers found (possibly none).
        reply: oneshot::Sender<Vec<PeerId>>,
    },
}

/// What the network task tells the node.
#[derive(Debug)]
pub enum NetEvent {
    /// Listening on an address.
    Listening(Multiaddr),
    /// A connection to a new peer.
    PeerConnected(PeerId),
    /// The last connection to a peer closed.
    PeerDisconnected(PeerId),
    /// A peer subscribed to a gossip topic.
    Subscribed {
        /// The peer.
        peer: PeerId,
        /// The topic's hash.
        topic: TopicHash,
    },
    /// A peer unsubscribed from a gossip topic.
    Unsubscribed {
        /// The peer.
        peer: PeerId,
        /// The topic's hash.
        topic: TopicHash,
    },
    /// A gossip message to validate (and then [`Command::Report`]).
    Gossip {
        /// Its id ([`message_id`]).
        id: MessageId,
        /// The peer that forwarded it.
        source: PeerId,
        /// Its topic.
        topic: TopicHash,
        /// The message.
        data: Vec<u8>,
    },
    /// What pinging a peer found.
    Ping {
        /// The peer.
        peer: PeerId,
        /// Answered (with the round-trip time), unsupported, or failed.
        outcome: PingOutcome,
    },
    /// A peer asks for something; answer with [`Command::Respond`].
    Request {
        /// The peer.
        peer: PeerId,
        /// What it asks for.
        request: FetchRequest,
        /// Where the answer goes.
        channel: ResponseChannel<FetchResponse>,
    },
}

/// What one ping of a peer found.
#[derive(Debug, Clone, PartialEq)]
pub enum PingOutcome {
    /// It answered, after this long.
    Answered(Duration),
    /// It does not speak the ping protocol (allowed: it is not pinged, and
    /// not dropped for that).
    Unsupported,
    /// No answer in time, or the stream failed.
    Failed(String),
}

/// A view of the network for status pages.
#[derive(Debug, Clone, Default)]
pub struct NetSnapshot {
    /// This node's peer id.
    pub peer_id: String,
    /// Connected peers.
    pub peers: Vec<String>,
    /// Listen addresses.
    pub listen: Vec<String>,
    /// Peers in this node's gossip mesh (any topic).
    pub mesh: Vec<String>,
    /// When the network task last showed it (it does at least every 5 s).
    pub updated: Option<std::time::Instant>,
    /// How this node is reached, as the network task saw it.
    pub reach: Reach,
}

/// How a node is reached: what AutoNAT concluded, its connections (direct
/// or through a relay), hole punches, relay reservations and circuits.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Reach {
    /// `public` (peers could dial it back), `private` (they could not:
    /// behind NAT or a firewall) or `unknown` (not probed yet).
    pub nat_status: String,
    /// The address peers dialled back, when public.
    pub public_address: Option<String>,
    /// Each open connection: the peer and its address (a relayed one goes
    /// through `/p2p-circuit`).
    pub connections: Vec<Connection>,
    /// Relayed connections upgraded to direct ones (DCUtR).
    pub hole_punches_succeeded: u64,
    /// Hole punches that failed (the connection stays relayed).
    pub hole_punches_failed: u64,
    /// The peers a hole punch reached (at most 64, sorted).
    pub hole_punched_peers: Vec<String>,
    /// The peers a hole punch failed with (at most 64, sorted).
    pub hole_punch_failed_peers: Vec<String>,
    /// Reservations relays accepted for this node (it listens through them).
    pub relay_reservations: u64,
    /// Whether this node serves as a relay.
    pub relay_server: bool,
    /// Connections this node relayed for others (as a relay server).
    pub circuits_relayed: u64,
    /// Relay requests this node refused (past its limits).
    pub circuits_refused: u64,
}

/// One open connection.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Connection {
    /// The peer.
    pub peer: String,
    /// Its address (the remote one).
    pub address: String,
    /// Whether it goes through a relay.
    pub relayed: bool,
}

/// A cloneable handle on the network task.
#[derive(Debug, Clone)]
pub struct NetHandle {
    tx: mpsc::Sender<Command>,
    peer_id: PeerId,
    view: watch::Receiver<NetSnapshot>,
    /// Opens and accepts streams of the swarm's stream behaviour (the
    /// chunk protocol) without going through the task; none on a detached
    /// handle.
    streams: Option<Streams>,
    /// How long a fetch may wait for each answer.
    timeout: Duration,
}

/// The swarm's stream control (it has no `Debug` of its own).
#[derive(Clone)]
struct Streams(libp2p_stream::Control);

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Streams")
    }
}

impl NetHandle {
    /// A handle on no network: what the node asks for arrives on the
    /// returned receiver (for in-process tests of the node).
    #[cfg(test)]
    pub(crate) fn detached(peer_id: PeerId) -> (NetHandle, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(1024);
        let (_, view) = watch::channel(NetSnapshot::default());
        (
            NetHandle {
                tx,
                peer_id,
                view,
                streams: None,
                timeout: Duration::from_secs(20),
            },
            rx,
        )
    }

    /// This node's libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Sends a command (waits if the task is busy).
    async fn send(&self, command: Command) -> Result<(), NetError> {
        self.tx.send(command).await.map_err(|_| NetError::Stopped)
    }

    /// Tells gossipsub what validation found about message `id`, forwarded
    /// by `source`: accept (forward it), reject (penalise the forwarder) or
    /// ignore.
    pub async fn report(
        &self,
        id: MessageId,
        source: PeerId,
        verdict: Verdict,
    ) -> Result<(), NetError> {
        let acceptance = match verdict {
            Verdict::Accept => MessageAcceptance::Accept,
            Verdict::Ignore => MessageAcceptance::Ignore,
            Verdict::Reject => MessageAcceptance::Reject,
        };
        self.send(Command::Report {
            id,
            source,
            acceptance,
        })
        .await
    }

    /// Answers a peer's request on the channel it came with.
    pub async fn respond(
        &self,
        channel: ResponseChannel<FetchResponse>,
        response: FetchResponse,
    ) -> Result<(), NetError> {
        self.send(Command::Respond { channel, response }).await
    }

    /// Closes every connection to `peer` (it may connect again).
    pub async fn disconnect(&self, peer: PeerId) -> Result<(), NetError> {
        self.send(Command::Disconnect(peer)).await
    }

    /// Keeps `peer` out of gossip (mesh and messages) for as long as this
    /// node runs: a non-member of a permissioned region.
    pub async fn blacklist(&self, peer: PeerId) -> Result<(), NetError> {
        self.send(Command::Blacklist(peer)).await
    }

    /// Reports a fault of `peer` that gossipsub cannot see (a corrupt chunk
    /// it served, a payload of its that fails the door, two votes it signed
    /// for one round): its gossip score drops (see `scoring`). Never waits:
    /// if the network task is that far behind, the report is dropped.
    pub fn fault(&self, peer: PeerId) {
        if self.tx.try_send(Command::Fault(peer)).is_err() {
            tracing::debug!(%peer, "fault report dropped: the network task is busy");
        }
    }

    /// Announces in the DHT that this node holds (the chunks of) `id`.
    pub async fn provide(&self, id: ContentId) -> Result<(), NetError> {
        self.send(Command::Provide(id)).await
    }

    /// Stops announcing `id` in the DHT.
    pub async fn unprovide(&self, id: ContentId) -> Result<(), NetError> {
        self.send(Command::Unprovide(id)).await
    }

    /// Publishes on a topic.
    pub async fn publish(&self, topic: &str, data: Vec<u8>) -> Result<(), NetError> {
        self.send(Command::Publish {
            topic: topic.to_owned(),
            data,
        })
        .await
    }

    /// Asks `peer` and waits for the answer.
    pub async fn fetch(
        &self,
        peer: PeerId,
        request: FetchRequest,
    ) -> Result<FetchResponse, NetError> {
        // A peer that is busy (too many reads in flight, or its node behind
        // on its events) is asked again after a short pause, a few times,
        // before the answer `Busy` is returned.
        let mut pause = BUSY_PAUSE;
        for _ in 0..BUSY_RETRIES {
            match self.fetch_once(peer, request.clone()).await? {
                FetchResponse::Busy => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                answer => return Ok(answer),
            }
        }
        self.fetch_once(peer, request).await
    }

    async fn fetch_once(
        &self,
        peer: PeerId,
        request: FetchRequest,
    ) -> Result<FetchResponse, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Fetch {
            peer,
            request,
            reply,
        })
        .await?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Asks `peer` for the chunks `ids` (1 to [`MAX_BATCH`]) on one
    /// stream of the chunk protocol; the answers are read from the
    /// returned reader, each within the fetch timeout.
    /// [`NetError::Unsupported`] if the peer does not speak it (ask chunk
    /// by chunk with [`NetHandle::fetch`] instead), and always on a
    /// detached handle.
    pub async fn chunks(
        &self,
        peer: PeerId,
        ids: &[ContentId],
    ) -> Result<ChunkReader<libp2p::Stream>, NetError> {
        let unsupported = NetError::Unsupported {
            peer,
            protocol: CHUNKS_PROTOCOL,
        };
        let Some(Streams(control)) = &self.streams else {
            return Err(unsupported);
        };
        let failed = |reason: String| NetError::Fetch { peer, reason };
        let mut control = control.clone();
        let mut tries = 0;
        loop {
            tries += 1;
            let opened =
                tokio::time::timeout(self.timeout, control.open_stream(peer, CHUNKS_PROTOCOL))
                    .await;
            let error = match opened {
                Err(_) => return Err(failed("opening a chunk stream timed out".into())),
                Ok(Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_))) => {
                    return Err(unsupported);
                }
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(stream)) => match ChunkReader::request(stream, ids, self.timeout).await {
                    Ok(reader) => return Ok(reader),
                    Err(e) => e.to_string(),
                },
            };
            // Dropped before the request went out: the peer's swarm hands
            // inbound streams over one at a time and drops those that
            // arrive while one waits (libp2p-stream), or the connection
            // closed meanwhile. Again, after a short pause.
            if tries >= OPEN_TRIES {
                return Err(failed(error));
            }
            tracing::debug!(%peer, %error, "chunk stream failed at its start; again");
            tokio::time::sleep(Duration::from_millis(25 << tries)).await;
        }
    }

    /// The chunk streams peers open to this node, once (`None` after the
    /// first call, and on a detached handle).
    pub fn accept_chunks(&self) -> Option<libp2p_stream::IncomingStreams> {
        let Streams(control) = self.streams.as_ref()?;
        control.clone().accept(CHUNKS_PROTOCOL).ok()
    }

    /// Peers the DHT knows to hold `id` (waits for the look-up).
    pub async fn providers(&self, id: ContentId) -> Result<Vec<PeerId>, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Providers { id, reply }).await?;
        rx.await.map_err(|_| NetError::Stopped)
    }

    /// The network as the swarm task last showed it (kept current by the
    /// task on every connection and address change; never waits for it).
    pub fn snapshot(&self) -> NetSnapshot {
        self.view.borrow().clone()
    }
}

/// The libp2p identity of a Tapestry key: the same ed25519 key, so a node's
/// peer id and its node id name one key.
pub fn libp2p_keypair(key: &Keypair) -> Result<identity::Keypair, NetError> {
    let secret = key.secret_bytes();
    identity::Keypair::ed25519_from_bytes(*secret).map_err(|e| NetError::Build(e.to_string()))
}

/// The peer id of a node id (both are the node's ed25519 public key).
pub fn peer_id_of(node: &NodeId) -> Option<PeerId> {
    let public = identity::ed25519::PublicKey::try_from_bytes(node.as_bytes()).ok()?;
    Some(identity::PublicKey::from(public).to_peer_id())
}

/// Builds the swarm, starts listening and dialling, and spawns the task that
/// owns it. Returns the handle, the event stream and the task.
pub fn spawn(
    key: &Keypair,
    config: NetConfig,
    registry: &mut prometheus_client::registry::Registry,
) -> Result<(NetHandle, Events, tokio::task::JoinHandle<()>), NetError> {
    let keypair = libp2p_keypair(key)?;
    let peer_id = keypair.public().to_peer_id();
    let mut swarm = build::swarm(keypair, &config, registry)?;
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    for addr in &config.bootstrap {
        if let Some(peer) = peer_of_addr(addr) {
            swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        }
        if let Err(e) = swarm.dial(addr.clone()) {
            tracing::warn!(%addr, error = %e, "cannot dial bootstrap address");
        }
    }
    for relay in &config.relays {
        if peer_of_addr(relay).is_none() {
            return Err(NetError::Listen {
                addr: relay.clone(),
                reason: "a relay's address must end in /p2p/<relay peer id>".into(),
            });
        }
        // (Listening through it starts in the task, and starts again
        // whenever it stops: the relay was not up yet, or went away.)
        if let Some(peer) = peer_of_addr(relay) {
            swarm.behaviour_mut().kad.add_address(&peer, relay.clone());
        }
    }
    let reach = Reach {
        nat_status: "unknown".into(),
        relay_server: config.relay_server.is_some(),
        ..Reach::default()
    };
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let (ev_tx, ev_rx) = mpsc::channel(config.event_queue.max(1));
    let (view_tx, view) = watch::channel(NetSnapshot {
        peer_id: peer_id.to_string(),
        reach,
        ..NetSnapshot::default()
    });
    let shed = Family::<ShedLabel, Counter>::default();
    registry.register(
        "net_shed",
        "Peers' gossip messages and requests the network task shed because the node's queue was full",
        shed.clone(),
    );
    let faults = Counter::default();
    registry.register(
        "peer_faults",
        "Faults of peers that gossipsub cannot see (corrupt chunks, payloads failing the door, equivocation), each lowering the peer's gossip score",
        faults.clone(),
    );
    let bytes = QueuedBytes::default();
    let outbox = Outbox {
        tx: ev_tx,
        backlog: VecDeque::new(),
        shed,
        bytes: bytes.clone(),
        max_bytes: config.event_queue_bytes,
    };
    // libp2p's own metrics (connections, identify, Kademlia, ping, gossipsub,
    // DCUtR) in the node's registry, beside the bandwidth counters.
    let metrics = libp2p::metrics::Metrics::new(registry);
    let streams = Streams(swarm.behaviour().streams.new_control());
    let task = tokio::spawn(run(
        swarm,
        cmd_rx,
        outbox,
        view_tx,
        metrics,
        (config.bootstrap.clone(), config.relays.clone()),
        faults,
    ));
    Ok((
        NetHandle {
            tx: cmd_tx,
            peer_id,
            view,
            streams: Some(streams),
            timeout: config.request_timeout,
        },
        Events { rx: ev_rx, bytes },
        task,
    ))
}

/// How often bootstrap peers that are not connected are dialled again.
const REDIAL_EVERY: Duration = Duration::from_secs(5);

/// The peer id at the end of an address (`.../p2p/<id>`), if any.
pub fn peer_of_addr(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// How often a fetch answered `Busy` is asked again, and the first pause
/// (doubled each time: 50 + 100 + ... + 1,600 ms, about 3 s, at most).
const BUSY_RETRIES: usize = 6;
const BUSY_PAUSE: Duration = Duration::from_millis(50);

/// Commands from the node waiting for the swarm task: the node waits when
/// this is full (back-pressure it sees), the task never waits on the node.
const COMMAND_QUEUE: usize = 1024;
/// Events for the node, by default. Gossip and requests that find it full
/// are shed.
pub const EVENT_QUEUE: usize = 16 * 1024;
/// Gossip bytes waiting for the node, by default (as much as the checker
/// behind it holds). Gossip that finds them used up is shed.
pub const EVENT_QUEUE_BYTES: usize = 64 << 20;
/// Replies owed to the node: fetches in flight and provider look-ups.
#[derive(Default)]
struct Pending {
    fetches: HashMap<OutboundRequestId, oneshot::Sender<Result<FetchResponse, NetError>>>,
    providers: HashMap<kad::QueryId, (HashSet<PeerId>, oneshot::Sender<Vec<PeerId>>)>,
}

/// The DHT key under which a content id is provided.
fn provider_key(id: &ContentId) -> kad::RecordKey {
    kad::RecordKey::new(id.as_bytes())
}

/// The event loop: the only code that touches the swarm.
async fn run(
    mut swarm: Swarm<Behaviour>,
    mut commands: mpsc::Receiver<Command>,
    mut outbox: Outbox,
    view: watch::Sender<NetSnapshot>,
    metrics: libp2p::metrics::Metrics,
    (bootstrap, relays): (Vec<Multiaddr>, Vec<Multiaddr>),
    faults: Counter,
) {
    let mut reach = view.borrow().reach.clone();
    // Listening through each relay: its listener, while it is open.
    let mut through: HashMap<libp2p::core::transport::ListenerId, Multiaddr> = HashMap::new();
    listen_through(&mut swarm, &relays, &mut through);
    let mut pending = Pending::default();
    let mut connections: HashMap<libp2p::swarm::ConnectionId, Connection> = HashMap::new();
    let mut penalties = scoring::AppPenalties::default();
    let mut listening: HashSet<Multiaddr> = HashSet::new();
    // A node that lost its bootstrap peers (a cut network, a restarted
    // peer) dials them again, and refreshes the DHT to find the others.
    let mut redial = tokio::time::interval(REDIAL_EVERY);
    redial.tick().await;
    loop {
        tokio::select! {
            _ = redial.tick() => {
                show(&swarm, &listening, &view, &reach);
                listen_through(&mut swarm, &relays, &mut through);
                for (peer, score) in penalties.fade(std::time::Instant::now()) {
                    swarm.behaviour_mut().gossipsub.set_application_score(&peer, score);
                }
                let mut dialled = false;
                // (An address without a peer id, like /dns4/bootstrap/tcp/4001,
                // cannot tell whether it is connected: it is dialled again
                // only while this node has no peer at all.)
                let alone = swarm.connected_peers().next().is_none();
                for addr in &bootstrap {
                    match peer_of_addr(addr) {
                        Some(peer) if !swarm.is_connected(&peer) => {
                            swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                            dialled |= swarm.dial(addr.clone()).is_ok();
                        }
                        None if alone => dialled |= swarm.dial(addr.clone()).is_ok(),
                        _ => {}
                    }
                }
                if dialled {
                    let _ = swarm.behaviour_mut().kad.bootstrap();
                }
            }
            command = commands.recv() => {
                let Some(command) = command else { break };
                if let Command::Fault(peer) = command {
                    faults.inc();
                    let score = penalties.fault(peer, std::time::Instant::now());
                    tracing::info!(%peer, score, "peer at fault; gossip score lowered");
                    swarm.behaviour_mut().gossipsub.set_application_score(&peer, score);
                } else {
                    handle_command(&mut swarm, &mut pending, command);
                }
            }
            permit = outbox.tx.clone().reserve_owned(), if !outbox.backlog.is_empty() => {
                let Ok(permit) = permit else { break };
                if let Some(event) = outbox.backlog.pop_front() {
                    permit.send(event);
                }
            }
            event = swarm.select_next_some() => {
                record(&metrics, &event);
                if let SwarmEvent::ListenerClosed { listener_id, reason, .. } = &event
                    && let Some(relay) = through.remove(listener_id)
                {
                    tracing::info!(%relay, ?reason, "no longer listening through the relay; trying again shortly");
                }
                let changed = reach::note(&mut reach, &mut connections, &event);
                let event = handle_event(&mut swarm, &mut pending, &mut listening, event);
                if changed {
                    show(&swarm, &listening, &view, &reach);
                }
                if let Some(event) = event
                    && !outbox.offer(&mut swarm, event)
                {
                    break;
                }
            }
        }
    }
    tracing::debug!("network task stopped");
}

/// Listens through each relay not listened through now.
fn listen_through(
    swarm: &mut Swarm<Behaviour>,
    relays: &[Multiaddr],
    through: &mut HashMap<libp2p::core::transport::ListenerId, Multiaddr>,
) {
    for relay in relays {
        if through.values().any(|r| r == relay) {
            continue;
        }
        let circuit = relay.clone().with(libp2p::multiaddr::Protocol::P2pCircuit);
        match swarm.listen_on(circuit) {
            Ok(id) => {
                through.insert(id, relay.clone());
            }
            Err(e) => tracing::warn!(%relay, error = %e, "cannot listen through the relay"),
        }
    }
}

fn handle_command(swarm: &mut Swarm<Behaviour>, pending: &mut Pending, command: Command) {
    match command {
        Command::Publish { topic, data } => {
            if let Err(e) = swarm
                .behaviour_mut()
                .gossipsub
                .publish(IdentTopic::new(topic.as_str()), data)
            {
                tracing::debug!(%topic, error = %e, "publish not sent");
            }
        }
        Command::Report {
            id,
            source,
            acceptance,
        } => {
            swarm
                .behaviour_mut()
                .gossipsub
                .report_message_validation_result(&id, &source, acceptance);
        }
        Command::Fetch {
            peer,
            request,
            reply,
        } => {
            let id = swarm.behaviour_mut().fetch.send_request(&peer, request);
            pending.fetches.insert(id, reply);
        }
        Command::Respond { channel, response } => {
            let _ = swarm.behaviour_mut().fetch.send_response(channel, response);
        }
        Command::Disconnect(peer) => {
            let _ = swarm.disconnect_peer_id(peer);
        }
        Command::Blacklist(peer) => {
            let gossip = &mut swarm.behaviour_mut().gossipsub;
            gossip.blacklist_peer(&peer);
            gossip.set_application_score(&peer, scoring::outsider_score());
        }
        Command::Fault(_) => {} // kept by the task's loop (it holds the penalties)
        Command::Provide(id) => {
            if let Err(e) = swarm.behaviour_mut().kad.start_providing(provider_key(&id)) {
                tracing::debug!(error = %e, "cannot record a provider");
            }
        }
        Command::Unprovide(id) => {
            swarm.behaviour_mut().kad.stop_providing(&provider_key(&id));
        }
        Command::Providers { id, reply } => {
            let query = swarm.behaviour_mut().kad.get_providers(provider_key(&id));
            pending.providers.insert(query, (HashSet::new(), reply));
        }
    }
}
