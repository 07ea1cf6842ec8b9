//! The running node: the round engine driven by real time, real peers and a
//! real chunk store. One task owns the [`Engine`]; training and evaluation
//! run on blocking threads, chunk fetches on their own tasks, and their
//! results come back as engine inputs. The network task ([`crate::net`])
//! owns the swarm.
//!
//! What a message must pass before the engine sees it: the signed envelope
//! verifies and names the right kind, the message validates on its own terms
//! (author = signer, sizes), the roster admits the author (permissioned
//! regions), and then the engine's door (scope, layout, round window,
//! replay). Gossipsub forwards only what passed; everything else is
//! reported as `Reject`, which costs the forwarder score, and is counted in
//! the metrics by reason.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use libp2p::gossipsub::TopicHash;
use tapestry_protocol::{
    ContentId, DeltaManifest, FetchRequest, FetchResponse, Keypair, ModelManifest, NodeId, Roster,
    Signed, Verified,
};
use tapestry_storage::ChunkStore;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::metrics::Stage;
use crate::net::{self, NetEvent, NetHandle, PingOutcome};
use tapestry_core::admission::{self, Rejection, Verdict};
use tapestry_core::aggregate::fixed_width;
use tapestry_core::data::Dataset;
use tapestry_core::door::Door;
use tapestry_core::engine::{Action, Engine, EngineConfig, Input, VersionRank, genesis};
use tapestry_core::model::{Examples, InnerState, TrainConfig, evaluate_on, train_on_owned};
use tapestry_core::verify::{self, Lineage, Plan, VersionRejection, check_shape};
use tapestry_core::{attest, heads};

mod checking;
mod federating;
mod fetch;
mod gossip;
mod liveness;
mod model_thread;
mod names;
mod retention;
mod serve;
mod space;
mod verifying;

use fetch::*;
use gossip::*;
use names::*;
use verifying::*;

pub use crate::status::{Shared, Status};
pub use fetch::{
    BATCH, FetchedChunks, PARALLEL_FETCHES, PARALLEL_STREAMS, STREAMS_PER_PROVIDER, Swarm,
    fetch_chunk_map, fetch_chunks,
};
pub use names::{
    HEAD_REF, attested_ref, deltas_topic, genesis_key, models_topic, node_id_of, verified_ref,
};
pub use serve::{
    Access, AccessCheck, ChunkFilter, MAX_STREAMS, MAX_STREAMS_PER_PEER, MemberCheck,
    STREAM_READ_AHEAD, read as read_for_peer, serve_chunk_streams, serve_chunk_streams_to,
};

/// The store a node keeps everything in.
pub type Store = Arc<dyn ChunkStore + Send + Sync>;

/// Stores a version as the head, durably: its parameters, manifest, the
/// mark that it is verified, the head ref, then a flush.
fn store_head(store: &Store, m: &Verified<ModelManifest>, params: &[f32]) -> Result<(), NodeError> {
    put_params(store, m.message(), params)?;
    let id = store.put_model_manifest(m)?;
    store.set_ref(&verified_ref(&id), id)?;
    store.set_ref(HEAD_REF, id)?;
    store.flush()?;
    Ok(())
}

/// A version's parameters read from the store chunk by chunk (each
/// checked against its id), without a copy of the whole payload; `None`
/// if a chunk is missing or corrupt, or the sizes do not add up.
pub(crate) fn read_params(store: &dyn ChunkStore, m: &ModelManifest) -> Option<Vec<f32>> {
    let size = usize::try_from(m.payload_bytes).ok()?;
    if !size.is_multiple_of(4) {
        return None;
    }
    let mut params = Vec::with_capacity(size / 4);
    let mut read = 0usize;
    for id in &m.chunk_ids {
        let bytes = store.get_verified(id).ok()??;
        if !bytes.len().is_multiple_of(4) || read + bytes.len() > size {
            return None;
        }
        read += bytes.len();
        params.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    (read == size).then_some(params)
}

/// Stores a version's parameters, one chunk's bytes at a time (no copy of
/// the whole vector), under the ids its manifest names: ids computed from
/// these very parameters when the version was made or verified, so not
/// hashed again (a chunk stored under a wrong id would be quarantined
/// when read, never served). A manifest whose chunking does not fit the
/// parameters is stored the general way, hashing every chunk.
pub(crate) fn put_params(
    store: &Store,
    m: &ModelManifest,
    params: &[f32],
) -> Result<(), tapestry_storage::StoreError> {
    let chunk = m.chunk_size as usize;
    let fits = chunk >= 4
        && chunk.is_multiple_of(4)
        && m.payload_bytes == params.len() as u64 * 4
        && m.chunk_ids.len() == params.len().div_ceil(chunk / 4);
    if !fits {
        let bytes = tapestry_protocol::f32_le_bytes(params);
        return store.put_payload(&bytes, chunk).map(|_| ());
    }
    let mut buf = Vec::with_capacity(chunk);
    for (values, id) in params.chunks(chunk / 4).zip(&m.chunk_ids) {
        buf.clear();
        tapestry_protocol::write_f32_le(values, &mut buf);
        store.put_checked(*id, &buf)?;
    }
    Ok(())
}

/// What a node trains on and is judged by.
#[derive(Debug, Clone)]
pub struct LocalData {
    /// Its private training rows (already scaled) or text.
    pub train: Examples,
    /// Its held-out rows or text for evaluation.
    pub test: Examples,
}

impl LocalData {
    /// Rows for a classifier.
    pub fn rows(train: Dataset, test: Dataset) -> LocalData {
        LocalData {
            train: Examples::Rows(train),
            test: Examples::Rows(test),
        }
    }
}

/// Everything a running node needs besides its key, store and network.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// The round engine's settings (model, region, rule, timing...).
    pub engine: EngineConfig,
    /// Local training.
    pub train: TrainConfig,
    /// Seed of the initial parameters (the same on every node of a region).
    pub model_seed: u64,
    /// Stop starting new rounds after this one (`None`: run forever).
    pub rounds: Option<u64>,
    /// Wait for this many peers before the first round (at most
    /// `start_wait`), so the first rounds are not trained alone.
    pub start_peers: usize,
    /// Longest wait for `start_peers`.
    pub start_wait: Duration,
    /// Shortest time from one round's start to the next's: training waits
    /// out the rest (zero: rounds run back to back).
    pub min_round: Duration,
    /// The head and its latest this many ancestors are kept on disk, with
    /// their deltas; older versions are collected (`0`: keep everything).
    pub keep_versions: u64,
    /// Most bytes the store may occupy (`None`: no quota, only the disk's
    /// size); past it the node takes no new data (see `space`).
    pub quota_bytes: Option<u64>,
    /// Fault injection, for tests only: the node's loop freezes (never
    /// returns) once it has adopted a version of this round.
    pub freeze_at_round: Option<u64>,
    /// A permissioned region's roster; `None` for an open region.
    pub roster: Option<Verified<Roster>>,
    /// Who may sign the roster (the region key); required with a roster.
    pub region_key: Option<NodeId>,
    /// Where the node keeps its last announced delta (signed manifest), so
    /// that after a crash it does not vote twice in one round; `None`:
    /// nowhere (a restarted node may then announce a second delta for a
    /// round, which its peers refuse).
    pub vote_file: Option<std::path::PathBuf>,
    /// Where the node keeps its peers' last sequence numbers (written with
    /// every new head, read at start), so a replayed announcement is
    /// refused after a restart as before it; `None`: nowhere.
    pub sequences_file: Option<std::path::PathBuf>,
    /// In a permissioned region, how many distinct roster members must
    /// vouch for a version this node cannot recompute before it adopts it
    /// (0: more than a third of the roster; never fewer than two).
    pub attestations: usize,
    /// The neighbouring regions of a federation (`engine.federation`),
    /// each with its roster: empty if the region does not federate.
    pub neighbours: Vec<Neighbour>,
}

/// A neighbouring region of a federation, as this node checks its heads.
#[derive(Debug, Clone)]
pub struct Neighbour {
    /// Its name.
    pub region: String,
    /// Its roster, signed by its region key (checked when loaded).
    pub roster: Verified<Roster>,
    /// Distinct members of its roster that must vouch for its head (0:
    /// more than a third of the roster; never fewer than 2).
    pub attestations: usize,
}

/// Why a node stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] tapestry_storage::StoreError),
    /// The network failed.
    #[error("network: {0}")]
    Net(#[from] net::NetError),
    /// The configuration cannot work.
    #[error("{0}")]
    Config(String),
    /// The store is full (its quota reached or the disk out of space):
    /// nothing new is written.
    #[error("the store is full (see disk_full in /status)")]
    StoreFull,
}

/// From this many parameters on, the engine's handling runs with the
/// runtime's other tasks moved off its thread (aggregating three deltas
/// of a million parameters takes milliseconds; of a hundred million,
/// seconds).
const LARGE_MODEL_PARAMS: usize = 1 << 20;

/// The head's chunks are checked on disk every this many ticks (2 s each).
const HEAD_CHECK_TICKS: u64 = 5;

/// Payload fetches in flight at once (each buffers one payload; the door
/// admits one delta per author and round, so this is many rounds of a large
/// region); past it, an admitted delta is not fetched (a version naming it
/// brings it later).
const MAX_FETCHING: usize = 1024;

/// Versions remembered as weighed against the current head and not taken,
/// before the set is forgotten (each weighing reads one version's
/// parameters from the store). It is also forgotten every 10 s.
const MAX_PASSED_OVER: usize = 1024;

/// The node's own task.
pub struct Node {
    settings: NodeSettings,
    engine: Engine,
    store: Store,
    net: NetHandle,
    data: Arc<LocalData>,
    shared: Shared,
    started: Instant,
    timers: BTreeSet<u64>,
    inputs_tx: mpsc::Sender<Input>,
    inputs_rx: mpsc::Receiver<Input>,
    /// Where training and evaluation run.
    model_thread: model_thread::ModelThread,
    /// The inner optimiser's state, kept from round to round for AdamW
    /// (SGD starts each round afresh). Only the model thread uses it.
    inner_state: Arc<std::sync::Mutex<InnerState>>,
    /// Connected peers.
    peers: BTreeSet<PeerId>,
    /// Connected peers subscribed to this region's deltas: the region's
    /// members as far as this node can see (peers of other regions share
    /// the network, not the rounds).
    members: BTreeSet<PeerId>,
    /// The node's own tasks on the network (payload fetches, verifications,
    /// head probes, chunk refetches): finished ones are reaped every tick,
    /// and all are aborted when the node stops (dropping the set).
    tasks: tokio::task::JoinSet<()>,
    /// Payload fetches under way: each delta's round and its task (aborted
    /// once the round is outside the staleness window, or when the node
    /// stops; at most [`MAX_FETCHING`]).
    fetching: HashMap<ContentId, (u64, tokio::task::AbortHandle)>,
    /// Who forwarded each announced delta (where to fetch its chunks).
    providers: HashMap<ContentId, Vec<PeerId>>,
    deltas_topic: String,
    models_topic: String,
    deltas_hash: TopicHash,
    models_hash: TopicHash,
    running: bool,
    /// The preferred verified version announced for each coming round, and
    /// who announced it.
    best_seen: BTreeMap<u64, (VersionRank, Verified<ModelManifest>, PeerId)>,
    /// Verified versions weighed against the current head and not taken
    /// (not weighed again until the head moves or 10 s pass; at most
    /// [`MAX_PASSED_OVER`], then forgotten).
    passed_over: HashSet<ContentId>,
    /// Verdicts of version verifications, back from their tasks.
    findings_tx: mpsc::Sender<Finding>,
    findings_rx: mpsc::Receiver<Finding>,
    /// What this node announces in the DHT, oldest first.
    provided: std::collections::VecDeque<ContentId>,
    /// Versions being fetched to be offered to the engine (a fetch that
    /// fails takes its version out again, so it can be tried again).
    offered: Arc<Mutex<std::collections::HashSet<ContentId>>>,
    /// Peers' versions of the round after this node's, held unverified
    /// until this node closes its own round (then most are the same
    /// computation as its own and are checked by comparison, not
    /// recomputed), or until a round's timeout has passed.
    early: Vec<(
        Verified<ModelManifest>,
        PeerId,
        Option<libp2p::gossipsub::MessageId>,
        Instant,
    )>,
    /// Versions this node made or verified lately: a peer's version with
    /// the same inputs ([`verify::same_computation`]) is checked against them
    /// instead of being recomputed.
    recent: Recent,
    /// One recomputation of a peer's version at a time.
    recomputing: Arc<tokio::sync::Semaphore>,
    /// Heads peers answered with, as signed bytes, and who answered.
    heads_tx: mpsc::Sender<(PeerId, Vec<u8>)>,
    heads_rx: mpsc::Receiver<(PeerId, Vec<u8>)>,
    /// Which peers to ask for their heads next (they take turns).
    head_probe: usize,
    /// When the last training started (or will, when paced).
    last_train: Option<Instant>,
    /// This node's identity (signs its attestations).
    key: Keypair,
    /// When each connected peer last answered a ping.
    liveness: liveness::Liveness,
    /// Whether a garbage collection is running.
    collecting: retention::Collecting,
    /// Peers' chunk and manifest reads in flight.
    serving: serve::Serving,
    /// Checks gossiped announcements off the loop, in batches.
    checker: checking::Checker,
    /// Gossip messages per forwarding peer this second.
    gossip_budget: checking::Budget,
    /// Whether the store's size is being measured.
    measuring: space::Measuring,
    /// Ticks of the 2-s ticker so far.
    ticks: u64,
    /// Gossiped deltas' payloads, fetched into memory or into the store.
    fetched_tx: mpsc::Sender<(Verified<DeltaManifest>, Fetched)>,
    fetched_rx: mpsc::Receiver<(Verified<DeltaManifest>, Fetched)>,
    /// Admitted deltas whose payloads reached the store: the engine reads
    /// them from there from now on.
    stored_tx: mpsc::Sender<Verified<DeltaManifest>>,
    stored_rx: mpsc::Receiver<Verified<DeltaManifest>>,
    /// The federation of regions this region takes part in, if any.
    federation: Option<federating::FedCtx>,
    /// The mix round whose foreign heads are being gathered.
    gathering: Option<u64>,
    /// Foreign heads gathered, per mix round.
    foreign_tx: mpsc::Sender<(u64, Vec<federating::Taken>, u64)>,
    foreign_rx: mpsc::Receiver<(u64, Vec<federating::Taken>, u64)>,
}

impl Node {
    /// A node over a started network.
    pub fn new(
        settings: NodeSettings,
        key: Keypair,
        store: Store,
        net: NetHandle,
        data: LocalData,
        shared: Shared,
    ) -> Result<Node, NodeError> {
        let mut settings = settings;
        if let Some(roster) = &settings.roster {
            check_roster(roster, &settings)?;
            // In a permissioned region a branch must be more than a third
            // of the roster to be merged (a partition's smaller side still
            // is, one member or a small clique on its own is not).
            let third = roster.message().members.len() / 3 + 1;
            let door = &mut settings.engine.door;
            door.min_branch_authors = door.min_branch_authors.max(third);
        }
        let cfg = &settings.engine;
        let deltas_topic = deltas_topic(&cfg.model_id, &cfg.region);
        let models_topic = models_topic(&cfg.model_id, &cfg.region);
        let (inputs_tx, inputs_rx) = mpsc::channel(256);
        let (heads_tx, heads_rx) = mpsc::channel(64);
        let (findings_tx, findings_rx) = mpsc::channel(64);
        let (fetched_tx, fetched_rx) = mpsc::channel(64);
        let (stored_tx, stored_rx) = mpsc::channel(64);
        let (foreign_tx, foreign_rx) = mpsc::channel(4);
        let federation = federating::FedCtx::new(&settings);
        shared
            .metrics
            .store_quota_bytes
            .set(settings.quota_bytes.unwrap_or(0) as i64);
        shared.disk.set_quota(settings.quota_bytes);
        shared.update(|s| {
            s.node_id = key.node_id().to_string();
            s.peer_id = net.peer_id().to_string();
            s.model_id = cfg.model_id.clone();
            s.region = cfg.region.clone();
            s.keep_rounds = settings.keep_versions;
            s.federation = federation
                .as_ref()
                .map(|f| crate::status::FederationStatus {
                    every: f.fed.every,
                    neighbours: f.neighbour_names(),
                    ..Default::default()
                });
        });
        let mut engine = Engine::new(settings.engine.clone(), key.clone());
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        engine.continue_sequence_after(unix_ms);
        engine.set_stopwatch(std::time::Instant::now);
        // `now_ms` counts from this moment (`started` below).
        engine.set_wall_clock(unix_ms);
        if let Some(seqs) = settings.sequences_file.as_deref().and_then(read_sequences) {
            engine.restore_sequences(seqs);
        }
        Ok(Node {
            engine,
            deltas_hash: libp2p::gossipsub::IdentTopic::new(&deltas_topic).hash(),
            models_hash: libp2p::gossipsub::IdentTopic::new(&models_topic).hash(),
            deltas_topic,
            models_topic,
            settings,
            store,
            net,
            data: Arc::new(data),
            shared,
            started: Instant::now(),
            timers: BTreeSet::new(),
            inputs_tx,
            model_thread: model_thread::ModelThread::start()
                .map_err(|e| NodeError::Config(format!("cannot start the model thread: {e}")))?,
            inner_state: Arc::default(),
            inputs_rx,
            peers: BTreeSet::new(),
            members: BTreeSet::new(),
            providers: HashMap::new(),
            running: false,
            best_seen: BTreeMap::new(),
            fetching: HashMap::new(),
            tasks: tokio::task::JoinSet::new(),
            passed_over: HashSet::new(),
            findings_tx,
            findings_rx,
            provided: std::collections::VecDeque::new(),
            offered: Arc::default(),
            recent: Recent::default(),
            recomputing: Arc::new(tokio::sync::Semaphore::new(1)),
            early: Vec::new(),
            heads_tx,
            heads_rx,
            head_probe: 0,
            last_train: None,
            key,
            liveness: liveness::Liveness::new(net::SILENCE_LIMIT),
            collecting: retention::Collecting::default(),
            serving: serve::Serving::default(),
            checker: checking::Checker::new(),
            gossip_budget: checking::Budget::default(),
            measuring: space::Measuring::default(),
            ticks: 0,
            fetched_tx,
            fetched_rx,
            stored_tx,
            stored_rx,
            federation,
            gathering: None,
            foreign_tx,
            foreign_rx,
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The version to start from: the stored head if there is one (a
    /// restart resumes where it was), else the region's genesis.
    fn starting_version(&self) -> Result<(Verified<ModelManifest>, Vec<f32>), NodeError> {
        if let Some(id) = self.store.get_ref(HEAD_REF)?
            && let Some(m) = self.store.get_model_manifest(&id)?
        {
            let bytes = self
                .store
                .read_payload(&m.message().chunk_ids, m.message().payload_bytes)?;
            let params = tapestry_protocol::f32_from_le_bytes(&bytes);
            if params.len() == self.settings.engine.spec.n_params() {
                // This node's own head (made, verified or imported here).
                self.store.set_ref(&verified_ref(&id), id)?;
                return Ok((m, params));
            }
        }
        let cfg = &self.settings.engine;
        let params = cfg.spec.init(self.settings.model_seed);
        let manifest = genesis(cfg, &params, &genesis_key(&cfg.model_id, &cfg.region))
            .ok_or_else(|| NodeError::Config("cannot sign the genesis version".into()))?;
        self.keep_version(&manifest, &params)?;
        Ok((manifest, params))
    }

    /// With an outer step with momentum, the parameters of the parent of a
    /// head this node did not make or verify here (restarted from its
    /// store, or taken on attestations) go to the engine if the store holds
    /// them, each chunk checked against its id. Without them the engine
    /// leaves closing rounds to its peers until it takes a version made on
    /// its head.
    async fn give_previous_step(&mut self, head: &ModelManifest) {
        let Some(version) =
            tapestry_core::verify::previous_step_parent(&self.settings.engine, head)
        else {
            return;
        };
        let params = self
            .store
            .get_model_manifest(&version)
            .ok()
            .flatten()
            .and_then(|m| read_params(&*self.store, m.message()));
        match params {
            Some(params) => self.feed(Input::PreviousStep { version, params }).await,
            None => tracing::info!(
                parent = %version.short(),
                "the head's parent is not held: closing rounds is left to peers until a version on this head arrives"
            ),
        }
    }

    /// This node's own delta of round `round`, if it announced one before a
    /// restart (read from [`NodeSettings::vote_file`]; a file that does not
    /// open as this node's signed delta is ignored, with a warning).
    fn last_vote(&self, round: u64) -> Option<Verified<DeltaManifest>> {
        let path = self.settings.vote_file.as_ref()?;
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "cannot read last vote");
                return None;
            }
        };
        match Signed::<DeltaManifest>::open(&bytes) {
            Ok(m) if m.message().author == self.engine.node_id() => {
                (m.message().round == round).then_some(m)
            }
            Ok(_) => {
                tracing::warn!(path = %path.display(), "last vote is not this node's; ignored");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "last vote unreadable; ignored");
                None
            }
        }
    }

    fn keep_version(&self, m: &Verified<ModelManifest>, params: &[f32]) -> Result<(), NodeError> {
        self.recent.add(m.message(), m.id(), None);
        store_head(&self.store, m, params)
    }

    /// [`Node::keep_version`] on a blocking thread (the runtime's threads
    /// stay free to serve peers meanwhile); the parameters come back.
    async fn keep_version_off_loop(
        &self,
        m: &Verified<ModelManifest>,
        params: Arc<Vec<f32>>,
    ) -> (Result<(), NodeError>, Arc<Vec<f32>>) {
        self.recent.add(m.message(), m.id(), Some(&params));
        let (store, manifest) = (self.store.clone(), m.clone());
        let kept = tokio::task::spawn_blocking(move || {
            let kept = store_head(&store, &manifest, &params);
            (kept, params)
        })
        .await;
        // A panic took the parameters with it; nothing was acknowledged,
        // and the caller uses them only after a success.
        kept.unwrap_or_else(|_| {
            (
                Err(NodeError::Config("storing the new head panicked".into())),
                Arc::default(),
            )
        })
    }

    /// Runs until `shutdown` turns true or the network stops; flushes the
    /// store on the way out.
    pub async fn run(
        mut self,
        mut events: net::Events,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), NodeError> {
        let (start_manifest, start_params) = self.starting_version()?;
        self.show_head(&start_manifest, Arc::new(start_params.clone()));
        let start_at = Instant::now() + self.settings.start_wait;
        let mut ticker = tokio::time::interval(Duration::from_secs(2));
        let mut start = Some((start_manifest, start_params));
        let mut checked = self.checker.start(self.roster().cloned());
        self.start_serving_streams();
        loop {
            if start.is_some()
                && (self.members.len() >= self.settings.start_peers || Instant::now() >= start_at)
                && let Some((manifest, params)) = start.take()
            {
                self.running = true;
                tracing::info!(
                    round = manifest.message().round,
                    peers = self.members.len(),
                    "starting rounds"
                );
                if let Some(vote) = self.last_vote(manifest.message().round) {
                    // Restarted mid-round after voting: that delta stands.
                    let members: Vec<PeerId> = self.members.iter().copied().collect();
                    self.providers.insert(vote.id(), members);
                    tracing::info!(round = vote.message().round, id = %vote.id().short(), "resuming with own delta of this round");
                    self.feed(Input::OwnVote(vote)).await;
                }
                let head = manifest.message().clone();
                self.feed(Input::Start { manifest, params }).await;
                self.give_previous_step(&head).await;
                // A fresh or restarted node asks its peers where they are.
                self.ask_heads(self.members.iter().copied().collect());
            }
            let next = self.timers.first().copied();
            let sleep = match next {
                Some(at) => {
                    let now = self.now_ms();
                    Duration::from_millis(at.saturating_sub(now))
                }
                None => Duration::from_secs(3600),
            };
            let silence = self.liveness.next_deadline();
            tokio::select! {
                _ = shutdown.changed() => break,
                event = events.recv() => match event {
                    Some(event) => self.on_net(event).await,
                    None => break,
                },
                Some(input) = self.inputs_rx.recv() => self.feed(input).await,
                _ = tokio::time::sleep(sleep), if next.is_some() => {
                    let now = self.now_ms();
                    while self.timers.first().is_some_and(|t| *t <= now) {
                        self.timers.pop_first();
                    }
                    self.feed(Input::Tick).await;
                }
                Some(c) = checked.recv() => self.on_checked(c).await,
                Some((peer, bytes)) = self.heads_rx.recv() => {
                    let opened = admission::open_version(&bytes, self.roster()).and_then(|m| {
                        admission::check_created(m.message().created_unix_ms, crate::ops::unix_ms())
                            .map(|()| m)
                    });
                    match opened {
                        Ok(m) => {
                            self.on_model(peer, m, None).await;
                        }
                        Err(r) => {
                            self.refuse(&r, &peer);
                        }
                    }
                }
                Some(finding) = self.findings_rx.recv() => self.on_finding(finding).await,
                Some((manifest, fetched)) = self.fetched_rx.recv() => {
                    self.on_fetched(manifest, fetched).await;
                }
                Some(manifest) = self.stored_rx.recv() => self.payload_stored(&manifest),
                Some((round, heads, refused)) = self.foreign_rx.recv() => {
                    self.on_foreign_heads(round, heads, refused).await;
                }
                _ = tokio::time::sleep_until(silence.unwrap_or_else(Instant::now)), if silence.is_some() => {
                    for peer in self.liveness.overdue(Instant::now()) {
                        tracing::info!(%peer, "no answer to pings; disconnecting");
                        let _ = self.net.disconnect(peer).await;
                    }
                }
                _ = ticker.tick() => {
                    while self.tasks.try_join_next().is_some() {}
                    self.shared.health.ticked(self.net.snapshot().updated);
                    self.check_space();
                    self.collect_owed();
                    // Every 10 s: are the head's chunks all on disk?
                    self.ticks = self.ticks.wrapping_add(1);
                    if self.ticks.is_multiple_of(HEAD_CHECK_TICKS) {
                        self.check_head_chunks();
                        // A version passed over is weighed again now and
                        // then, not only at the next head: a decision made
                        // on a view that has changed since (a delta's
                        // author learnt, the rank of the head revised)
                        // must not keep two nodes apart for good.
                        self.passed_over.clear();
                    }
                    self.refresh_network().await;
                    self.verify_early(false).await;
                    // Announcements can be missed (a peer that was away, a
                    // message lost); every tick two peers take turns to say
                    // where they are, so a node that missed a preferred
                    // version still settles on it.
                    if self.running && !self.members.is_empty() {
                        let peers: Vec<PeerId> = self.members.iter().copied().collect();
                        let ask = (0..2.min(peers.len()))
                            .map(|k| peers[(self.head_probe + k) % peers.len()])
                            .collect();
                        self.head_probe = self.head_probe.wrapping_add(2);
                        self.ask_heads(ask);
                    }
                }
            }
        }
        self.cancel_fetches(None);
        self.store.flush()?;
        tracing::info!("node stopped; store flushed");
        Ok(())
    }

    async fn refresh_network(&self) {
        let snap = self.net.snapshot();
        let outsiders = self.outsiders();
        self.shared.update(|s| {
            s.peers = snap.peers.len();
            s.outsiders = outsiders;
            s.mesh = snap.mesh.clone();
            s.listen = snap.listen.clone();
            s.reach = snap.reach.clone();
        });
        self.shared.metrics.peers.set(snap.peers.len() as i64);
    }

    /// Feeds one input to the engine and carries out what it asks.
    async fn feed(&mut self, input: Input) {
        let now = self.now_ms();
        let started = Instant::now();
        // A large model's aggregation or decoding takes long enough to hold
        // up the runtime's other tasks (serving peers): tokio moves them
        // to another thread meanwhile. Not worth the hand-over for small
        // models (and impossible on a single-threaded runtime).
        let large = self.settings.engine.spec.n_params() >= LARGE_MODEL_PARAMS;
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let engine = &mut self.engine;
        let actions = if large && multi {
            tokio::task::block_in_place(|| engine.handle(input, now))
        } else {
            engine.handle(input, now)
        };
        let took = started.elapsed();
        let stages = self.engine.take_stage_times();
        let m = &self.shared.metrics;
        m.time(Stage::Encode, stages.encode);
        m.time(Stage::Hash, stages.hash);
        m.time(Stage::Sign, stages.sign);
        m.time(Stage::Decode, stages.decode);
        m.time(Stage::Aggregate, stages.aggregate);
        m.time(Stage::Engine, took.saturating_sub(stages.total()));
        for action in actions {
            self.act(action).await;
        }
        self.maybe_gather();
    }

    async fn act(&mut self, action: Action) {
        match action {
            Action::Train {
                round,
                version,
                params,
                seed,
            } => self.train(round, version, params, seed),
            Action::Publish { manifest, payload } => self.publish(manifest, payload).await,
            Action::Fetch { manifest } => self.fetch(manifest),
            Action::Adopt { manifest, params } => self.adopted(manifest, params).await,
            Action::SendToNeighbours { .. } | Action::PushShare { .. } => {
                // The networked node runs region broadcast (see the config).
            }
            Action::SetTimer { at_ms } => {
                self.timers.insert(at_ms);
            }
            Action::Penalise(r) => {
                tracing::info!(sender = %r.sender.short(), reason = %r.reason, "delta rejected");
                self.shared.metrics.reject(r.reason.label());
                let author = r.sender;
                self.blame(&Rejection::Delta(r), &author);
            }
        }
    }

    /// Trains for `round` from `version` on a blocking thread (paced: a
    /// round starts at most every `min_round`); the result comes back as
    /// [`Input::TrainingDone`].
    fn train(&mut self, round: u64, version: ContentId, params: Vec<f32>, seed: u64) {
        if self.settings.rounds.is_some_and(|r| round >= r) {
            self.shared.update(|s| s.finished = true);
            return;
        }
        let (spec, cfg, data) = (
            self.settings.engine.spec.clone(),
            self.settings.train,
            self.data.clone(),
        );
        let (tx, shared) = (self.inputs_tx.clone(), self.shared.clone());
        let worker = self.model_thread.clone();
        let inner = self.inner_state.clone();
        let now = Instant::now();
        let wait = self.last_train.map_or(Duration::ZERO, |t| {
            (t + self.settings.min_round).saturating_duration_since(now)
        });
        self.last_train = Some(now + wait);
        tokio::spawn(async move {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let trained = worker
                .run(move || {
                    let started = std::time::Instant::now();
                    let mut fresh = InnerState::default();
                    let mut kept = inner.lock().unwrap_or_else(|e| e.into_inner());
                    let state = if cfg.optimizer.keeps_state() {
                        &mut *kept
                    } else {
                        &mut fresh
                    };
                    let trained = train_on_owned(&spec, params, &data.train, &cfg, state, seed);
                    shared.metrics.time(Stage::Train, started.elapsed());
                    trained
                })
                .await;
            match trained {
                Some(Ok((params, report))) => {
                    let _ = tx
                        .send(Input::TrainingDone {
                            round,
                            version,
                            params,
                            samples: report.samples,
                        })
                        .await;
                }
                Some(Err(e)) => tracing::error!(error = %e, "local training failed"),
                None => tracing::error!("local training panicked"),
            }
        });
    }

    /// Stores this node's delta, records it as its vote of the round (so a
    /// restart does not vote twice), and announces it.
    async fn publish(
        &mut self,
        manifest: Verified<DeltaManifest>,
        payload: tapestry_core::aggregate::Payload,
    ) {
        let m = manifest.message();
        // Its own vote is written even when the store is full, as long as
        // the disk takes it and it fits the quota itself (it is one delta a
        // round, collected after the round window; not voting would hold up
        // every round of the region until its deadline).
        if !self.room_for(payload.len()) && !space::within_quota(&self.shared, payload.len()) {
            tracing::warn!(
                round = m.round,
                "cannot store own delta: it would take the store over its quota; not announcing it"
            );
            return;
        }
        let started = Instant::now();
        // On a blocking thread: the runtime's threads stay free to serve
        // peers meanwhile.
        let (store, signed, chunk_size) = (self.store.clone(), manifest.clone(), m.chunk_size);
        let stored = tokio::task::spawn_blocking(move || {
            store
                .put_payload(&payload.bytes(), chunk_size as usize)
                .and_then(|_| store.put_delta_manifest(&signed))
        })
        .await
        .unwrap_or_else(|_| {
            Err(tapestry_storage::StoreError::Backend(
                "storing the delta panicked".into(),
            ))
        });
        self.shared.metrics.time(Stage::Store, started.elapsed());
        self.shared.own.note(m.round, &m.chunk_ids);
        if let Err(e) = stored {
            tracing::error!(error = %e, "cannot store own delta; not announcing it");
            self.store_failed(&e);
            return;
        }
        self.payload_stored(&manifest);
        let data = manifest.envelope_bytes().to_vec();
        if let Some(path) = &self.settings.vote_file
            && let Err(e) = write_atomically(path, &data)
        {
            tracing::error!(error = %e, path = %path.display(), "cannot record own vote; not announcing it");
            return;
        }
        self.count_out(data.len());
        let started = Instant::now();
        self.provide(manifest.id()).await;
        if let Err(e) = self.net.publish(&self.deltas_topic, data).await {
            tracing::warn!(error = %e, "cannot announce delta");
        }
        self.shared.metrics.time(Stage::Announce, started.elapsed());
        tracing::debug!(round = m.round, id = %manifest.id().short(), "delta announced");
    }

    /// An admitted delta's payload is in the store: the engine reads it from
    /// there when its round closes rather than holding it in memory.
    fn payload_stored(&mut self, manifest: &Verified<DeltaManifest>) {
        if let Some(source) = verifying::StoredPayload::new(self.store.clone(), manifest.message())
        {
            self.engine.payload_stored(manifest.id(), Arc::new(source));
        }
    }

    /// Fetches an admitted delta's payload on its own task (from the peers
    /// known to provide it and its author); it comes back to
    /// [`Node::on_fetched`].
    fn fetch(&mut self, manifest: Verified<DeltaManifest>) {
        let mut providers = self
            .providers
            .get(&manifest.id())
            .cloned()
            .unwrap_or_default();
        let author = net::peer_id_of(&manifest.message().author);
        // Every member fetches every delta at about the same time: they
        // share the author's upload (see `Swarm`), the author and the
        // other members asked first.
        let swarm = author.map(|author| {
            let me = self.net.peer_id();
            let inflight = &self.shared.inflight;
            let swarm = Swarm::new(
                author,
                self.members
                    .iter()
                    .copied()
                    .filter(|p| inflight.shares(p))
                    .chain([me]),
                manifest.message().payload_bytes,
            );
            let mut first: Vec<PeerId> = [author]
                .into_iter()
                .chain(
                    self.members
                        .iter()
                        .copied()
                        .filter(|p| *p != author && *p != me),
                )
                .collect();
            for p in providers.drain(..) {
                if !first.contains(&p) {
                    first.push(p);
                }
            }
            providers = first;
            swarm
        });
        let (net, store, tx, shared) = (
            self.net.clone(),
            self.store.clone(),
            self.fetched_tx.clone(),
            self.shared.clone(),
        );
        self.fetching.retain(|_, (_, task)| !task.is_finished());
        if self.fetching.len() >= MAX_FETCHING {
            tracing::warn!(delta = %manifest.id().short(), "too many payload fetches under way; not fetching this one");
            return;
        }
        let (id, round) = (manifest.id(), manifest.message().round);
        let task = self.tasks.spawn(async move {
            let started = Instant::now();
            // A fixed-width payload goes into the store as it arrives when
            // there is room for it; otherwise (and a compressed one, small)
            // into memory, stored once admitted.
            let m = manifest.message();
            let fetched = if fixed_width(m.codec).is_some()
                && space::room_for(
                    &shared,
                    usize::try_from(m.payload_bytes).unwrap_or(usize::MAX),
                ) {
                // Landing until the engine has judged it and its manifest
                // is stored (see `Node::on_fetched_stored`); the engine's
                // door judges it from the store, and one it refuses is
                // collected with the garbage (no manifest names it).
                shared.landing.begin(id, &m.chunk_ids);
                let landed = fetch_chunks(
                    &net,
                    &store,
                    id,
                    &m.chunk_ids,
                    (&providers, swarm.as_ref()),
                    &shared,
                )
                .await;
                if !landed {
                    shared.landing.end(&id);
                }
                landed.then_some(Fetched::Stored)
            } else {
                fetch_payload(&net, &store, &manifest, &providers, &shared, swarm.as_ref())
                    .await
                    .map(Fetched::InMemory)
            };
            shared.metrics.time(Stage::Fetch, started.elapsed());
            if let Some(fetched) = fetched {
                let _ = tx.send((manifest, fetched)).await;
            }
        });
        self.fetching.insert(id, (round, task));
    }

    /// Aborts the payload fetches of deltas the door no longer admits
    /// (older than the staleness window before `round`); all of them when
    /// `round` is `None` (the node stops).
    fn cancel_fetches(&mut self, round: Option<u64>) {
        let staleness = self.settings.engine.door.staleness;
        let oldest = round.map(|r| r.saturating_sub(staleness));
        let landing = &self.shared.landing;
        self.fetching.retain(|id, (r, task)| {
            let keep = !task.is_finished() && oldest.is_some_and(|o| *r >= o);
            if !keep && !task.is_finished() {
                task.abort();
                // What it stored of the payload is garbage now.
                landing.end(id);
            }
            keep
        });
    }

    /// The engine adopted a version: keep it as the head, offer a preferred
    /// version of the same round heard meanwhile, verify the next round's
    /// versions held back, show it, and announce it.
    async fn adopted(&mut self, manifest: Verified<ModelManifest>, params: Arc<Vec<f32>>) {
        let started = Instant::now();
        let (kept, params) = if self.accepting() && self.room_for(params.len() * 4) {
            self.keep_version_off_loop(&manifest, params).await
        } else {
            (Err(NodeError::StoreFull), params)
        };
        let storing = started.elapsed();
        self.shared.metrics.time(Stage::Store, storing);
        if let Err(e) = kept {
            // Not stored, so not acknowledged: not announced, not served,
            // and not the head on disk (after a restart the node is back on
            // the last version it stored).
            tracing::error!(error = %e, round = manifest.message().round, "cannot store the new version; not announcing it");
            if let NodeError::Store(e) = &e {
                self.store_failed(e);
            }
            self.shared.metrics.rounds.inc();
            self.verify_early(true).await;
            return;
        }
        // A peer may already have announced a preferred version of this
        // round while this node was still closing it.
        let round = manifest.message().round;
        self.passed_over.clear();
        self.cancel_fetches(Some(round));
        self.best_seen.retain(|r, _| *r >= round);
        if let Some((_, best, source)) = self.best_seen.remove(&round) {
            self.offer_if_preferred(best, source, None);
        }
        self.shared.metrics.rounds.inc();
        self.export(&manifest, true);
        self.verify_early(true).await;
        self.show_head(&manifest, params);
        let data = manifest.envelope_bytes().to_vec();
        self.count_out(data.len());
        let announcing = Instant::now();
        self.provide(manifest.id()).await;
        let _ = self.net.publish(&self.models_topic, data).await;
        let announcing = announcing.elapsed();
        self.shared.metrics.time(Stage::Announce, announcing);
        if self.providers.len() > 4096 {
            self.providers.clear();
        }
        self.collect_garbage(round);
        self.keep_sequences();
        let rest = started.elapsed().saturating_sub(storing + announcing);
        self.shared.metrics.time(Stage::Adopt, rest);
        if self.settings.freeze_at_round.is_some_and(|r| round >= r) {
            tracing::warn!(round, "fault injection: the node loop freezes");
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }

    /// Publishes a head in the status and metrics, and evaluates it on the
    /// local split on a blocking thread (its accuracy and loss follow, unless
    /// a newer head came first).
    fn show_head(&self, manifest: &Verified<ModelManifest>, params: Arc<Vec<f32>>) {
        let m = manifest.message();
        let params_id = ContentId::of(
            &m.chunk_ids
                .iter()
                .flat_map(|c| *c.as_bytes())
                .collect::<Vec<u8>>(),
        );
        let norm_limit = self.engine.door().norm_limit();
        let id = manifest.id().to_string();
        self.shared.update(|s| {
            s.norm_limit = norm_limit;
            s.round = m.round;
            s.head = Some(id.clone());
            s.head_params = Some(params_id.to_string());
        });
        self.shared.metrics.round.set(m.round as i64);
        self.shared.metrics.set_head(&params_id.to_string());
        if let Ok(mut h) = self.shared.head.lock() {
            *h = Some(manifest.clone());
        }
        let (spec, data, shared, params, round) = (
            self.settings.engine.spec.clone(),
            self.data.clone(),
            self.shared.clone(),
            params,
            m.round,
        );
        let worker = self.model_thread.clone();
        tokio::spawn(async move {
            let evaluated = worker
                .try_run(move || {
                    // A head replaced while this waited is not evaluated.
                    let mut still = false;
                    shared.update(|s| still = s.head.as_deref() == Some(id.as_str()));
                    if !still {
                        return;
                    }
                    let started = std::time::Instant::now();
                    let evaluated = evaluate_on(&spec, &params, &data.test);
                    drop(params);
                    shared.metrics.time(Stage::Evaluate, started.elapsed());
                    let evaluation = match evaluated {
                        Ok(e) => Some(e),
                        Err(e) => {
                            tracing::warn!(error = %e, "head not evaluated");
                            None
                        }
                    };
                    let (accuracy, bpb) = evaluation
                        .as_ref()
                        .map_or((None, None), |e| (e.accuracy, e.bits_per_byte));
                    let mut current = false;
                    shared.update(|s| {
                        current = s.head.as_deref() == Some(id.as_str());
                        if current {
                            s.accuracy = accuracy;
                            s.loss = evaluation.as_ref().map(|e| e.loss);
                            s.bits_per_byte = bpb;
                            s.bits_per_byte_by_part = evaluation
                                .as_ref()
                                .map(|e| e.parts.iter().cloned().collect())
                                .unwrap_or_default();
                        }
                    });
                    if current && let Some(a) = accuracy {
                        shared.metrics.set_accuracy(a);
                    }
                    if current && let Some(b) = bpb {
                        shared.metrics.bits_per_byte.set(b);
                    }
                    tracing::info!(round, ?accuracy, bits_per_byte = ?bpb, head = %id.get(..8).unwrap_or(&id), "head");
                })
                .await;
            if evaluated.is_none() {
                tracing::debug!(round, "head not evaluated: the model thread is busy");
            }
        });
    }

    /// Announces in the DHT that this node serves `id`, and withdraws the
    /// oldest such record beyond [`MAX_PROVIDED`].
    async fn provide(&mut self, id: ContentId) {
        let _ = self.net.provide(id).await;
        self.provided.push_back(id);
        while self.provided.len() > MAX_PROVIDED {
            if let Some(old) = self.provided.pop_front() {
                let _ = self.net.unprovide(old).await;
            }
        }
    }

    /// Writes peers' last sequence numbers to the sequences file.
    fn keep_sequences(&self) {
        let Some(path) = &self.settings.sequences_file else {
            return;
        };
        let written = tapestry_protocol::cbor::to_cbor(&self.engine.sequences())
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|bytes| write_atomically(path, &bytes));
        if let Err(e) = written {
            tracing::warn!(error = %e, path = %path.display(), "cannot keep peers' sequence numbers");
        }
    }

    fn count_out(&self, n: usize) {
        self.shared.metrics.bytes_out.inc_by(n as u64);
    }

    async fn report(&self, id: libp2p::gossipsub::MessageId, source: PeerId, verdict: Verdict) {
        let _ = self.net.report(id, source, verdict).await;
    }
}

/// Peers' last sequence numbers as [`Node::keep_sequences`] wrote them; a
/// missing file is nothing, an unreadable one is ignored with a warning.
fn read_sequences(path: &std::path::Path) -> Option<Vec<(NodeId, u64, u64)>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot read peers' sequence numbers");
            return None;
        }
    };
    match tapestry_protocol::cbor::from_cbor(&bytes, &tapestry_protocol::DecodeLimits::MANIFEST) {
        Ok(seqs) => Some(seqs),
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "peers' sequence numbers unreadable; ignored");
            None
        }
    }
}

/// Everything needed to start a node.
pub struct Launch {
    /// Its identity.
    pub key: Keypair,
    /// Its settings.
    pub settings: NodeSettings,
    /// Its store.
    pub store: Store,
    /// Its private data.
    pub data: LocalData,
    /// Its network settings.
    pub net: net::NetConfig,
    /// Where to serve the HTTP API, if anywhere.
    pub api: Option<std::net::SocketAddr>,
}

/// A started node.
pub struct Running {
    /// Its status, head and metrics.
    pub shared: Shared,
    /// The bound API address.
    pub api: Option<std::net::SocketAddr>,
    /// Its network handle.
    pub net: NetHandle,
    shutdown: watch::Sender<bool>,
    node: tokio::task::JoinHandle<Result<(), NodeError>>,
    net_task: tokio::task::JoinHandle<()>,
    api_task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// The addresses it listens on, once it does (waits up to 10 s).
    pub async fn listen_addrs(&self) -> Vec<libp2p::Multiaddr> {
        for _ in 0..100 {
            let snap = self.net.snapshot();
            if !snap.listen.is_empty() {
                return snap.listen.iter().filter_map(|a| a.parse().ok()).collect();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Vec::new()
    }

    /// Stops the node cleanly: the node task finishes and flushes the
    /// store, then the network and the API stop.
    pub async fn stop(self) -> Result<(), NodeError> {
        let _ = self.shutdown.send(true);
        let result = match self.node.await {
            Ok(r) => r,
            Err(e) => Err(NodeError::Config(format!("node task failed: {e}"))),
        };
        self.net_task.abort();
        if let Some(api) = self.api_task {
            let _ = api.await;
        }
        result
    }
}

/// Starts the network, the node and (if asked) the API.
pub async fn launch(l: Launch) -> Result<Running, NodeError> {
    let mut registry = prometheus_client::registry::Registry::default();
    let (handle, events, net_task) = net::spawn(&l.key, l.net, &mut registry)?;
    let shared = Shared::new(Arc::new(crate::metrics::Metrics::new(registry)));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (api, api_task) = match l.api {
        Some(addr) => {
            let (bound, task) = crate::api::serve(addr, shared.clone(), shutdown_rx.clone())
                .await
                .map_err(|e| NodeError::Config(format!("cannot serve the API on {addr}: {e}")))?;
            (Some(bound), Some(task))
        }
        None => (None, None),
    };
    let node = Node::new(
        l.settings,
        l.key,
        l.store,
        handle.clone(),
        l.data,
        shared.clone(),
    )?;
    let node = tokio::spawn(node.run(events, shutdown_rx));
    Ok(Running {
        shared,
        api,
        net: handle,
        shutdown,
        node,
        net_task,
        api_task,
    })
}
#[cfg(test)]
mod tests;
