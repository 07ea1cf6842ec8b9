//! An in-memory swarm: `n` round engines ([`Engine`]) driven through one
//! queue of `(node index, Input)`, their [`Action`]s carried out in memory.
//!
//! It owns delivery and record keeping: local training on each node's
//! shard, deltas announced to every other node and served from one
//! [`MemLineage`], models sent to neighbours (mixing), push-sum shares
//! (a percentage of them lost, if asked), round timers fired whenever the
//! queue runs dry. Every delta published and every version adopted is kept,
//! so that tests can check lineage and verify versions. What a test injects
//! (attackers and how they corrupt deltas, slow or silent nodes, neighbour
//! graphs, other modes or engines) it sets through the public fields.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tapestry_core::aggregate::{PayloadSource, fixed_width};

use tapestry_core::data::Dataset;
use tapestry_core::door::{Door, Rejection};
use tapestry_core::engine::{Action, Engine, EngineConfig, Input, genesis};
use tapestry_core::model::{InnerState, TrainConfig, TrainReport, evaluate, train_local};
use tapestry_core::verify::{self, Lineage, Plan, VersionRejection};
use tapestry_protocol::{ContentId, DeltaManifest, Keypair, ModelManifest, Verified};

/// A payload offered to an engine as stored ([`Swarm::stored`]): read from
/// memory, its first read failing if asked.
#[derive(Debug)]
pub struct Kept {
    bytes: Arc<Vec<u8>>,
    fail_first: AtomicBool,
}

impl Kept {
    /// `bytes`, whose first read fails if `fail_first`.
    pub fn new(bytes: Arc<Vec<u8>>, fail_first: bool) -> Self {
        Kept {
            bytes,
            fail_first: AtomicBool::new(fail_first),
        }
    }
}

impl PayloadSource for Kept {
    fn read_at(&self, start: usize, out: &mut [u8]) -> Result<(), String> {
        if self.fail_first.swap(false, Ordering::Relaxed) {
            return Err("lost".into());
        }
        let src = self
            .bytes
            .get(start..start + out.len())
            .ok_or("beyond the payload")?;
        out.copy_from_slice(src);
        Ok(())
    }
}

/// What one node holds, in memory: version and delta manifests, delta
/// payloads (by their chunk ids) and the parameters of verified versions.
#[derive(Debug, Default, Clone)]
pub struct MemLineage {
    /// Version manifests by id.
    pub models: HashMap<ContentId, Verified<ModelManifest>>,
    /// Delta manifests by id.
    pub deltas: HashMap<ContentId, Verified<DeltaManifest>>,
    /// Delta payloads by their chunk ids.
    pub payloads: HashMap<Vec<ContentId>, Vec<u8>>,
    /// Parameters of the versions counted as verified.
    pub verified: HashMap<ContentId, Vec<f32>>,
}

impl MemLineage {
    /// Verifies `v` and everything unverified behind it, the way a node
    /// does, keeping each verified version's parameters.
    pub fn verify_all(
        &mut self,
        cfg: &EngineConfig,
        door: &Door,
        v: &Verified<ModelManifest>,
    ) -> Result<verify::Checked, VersionRejection> {
        let Plan::Ready(order) = verify::plan(self, cfg, v, 4096)? else {
            panic!("everything is held");
        };
        let mut last = None;
        for id in order {
            let m = if id == v.id() {
                v.clone()
            } else {
                self.model(&id).expect("a planned version is held")
            };
            let c = verify::verify_version(self, cfg, door, &m)?;
            self.verified.insert(id, c.params.clone());
            last = Some(c);
        }
        Ok(last.unwrap_or_else(|| verify::Checked {
            params: self
                .params(&v.id())
                .expect("a verified version's parameters"),
            authors: 0,
        }))
    }
}

impl Lineage for MemLineage {
    fn model(&self, id: &ContentId) -> Option<Verified<ModelManifest>> {
        self.models.get(id).cloned()
    }
    fn delta(&self, id: &ContentId) -> Option<Verified<DeltaManifest>> {
        self.deltas.get(id).cloned()
    }
    fn has_payload(&self, d: &Verified<DeltaManifest>) -> bool {
        self.payloads.contains_key(&d.message().chunk_ids)
    }
    fn payload(&self, d: &Verified<DeltaManifest>) -> Option<Vec<u8>> {
        self.payloads.get(&d.message().chunk_ids).cloned()
    }
    fn is_verified(&self, id: &ContentId) -> bool {
        self.verified.contains_key(id)
    }
    fn params(&self, id: &ContentId) -> Option<Vec<f32>> {
        self.verified.get(id).cloned()
    }
}

impl MemLineage {
    /// Holds a delta and its payload.
    pub fn add_delta(&mut self, m: &Verified<DeltaManifest>, payload: &[u8]) {
        self.deltas.insert(m.id(), m.clone());
        self.payloads
            .insert(m.message().chunk_ids.clone(), payload.to_vec());
    }
}

/// How an attacker rewrites a delta it publishes: from its key, the honest
/// manifest and payload to the ones it sends instead.
pub type Corrupt =
    fn(&Keypair, &Verified<DeltaManifest>, &[u8]) -> (Verified<DeltaManifest>, Vec<u8>);

/// Round engines wired through an in-memory queue (see the module header).
pub struct Swarm {
    /// The region's config (its seed made the genesis; engine `i` runs with
    /// seed `100 + i`).
    pub cfg: EngineConfig,
    /// Local training per round; `local_steps == 0`: none (pure averaging).
    pub train: TrainConfig,
    /// The engines, one a node.
    pub engines: Vec<Engine>,
    /// Node `i`'s key: the secret `[i + 1; 32]`.
    pub keys: Vec<Keypair>,
    /// Node `i`'s training data.
    pub shards: Vec<Dataset>,
    /// Inputs still to deliver, to the node named.
    pub queue: VecDeque<(usize, Input)>,
    /// The genesis every node started from, with its parameters.
    pub genesis: (Verified<ModelManifest>, Vec<f32>),
    /// Every delta published (with its payload) and every version adopted,
    /// the genesis included; nothing counted as verified.
    pub lineage: MemLineage,
    /// The versions each node adopted, in order.
    pub adopted: Vec<Vec<Verified<ModelManifest>>>,
    /// Parameters of each node after each round: round → node → θ.
    pub snapshots: BTreeMap<u64, BTreeMap<usize, Vec<f32>>>,
    /// Each penalty an engine gave, by the node that gave it.
    pub penalties: Vec<(usize, Rejection)>,
    /// Nodes whose deltas go through [`Swarm::corrupt`] before publication.
    pub attackers: BTreeSet<usize>,
    /// What attackers do to their deltas (none: nothing).
    pub corrupt: Option<Corrupt>,
    /// Who hears whom (mixing mode); everyone else by default.
    pub neighbours: Vec<Vec<usize>>,
    /// Nodes whose announcements arrive only after the next timer round.
    pub slow: BTreeSet<usize>,
    /// Nodes whose deltas never arrive.
    pub silent: BTreeSet<usize>,
    /// Percentage of push-sum shares lost in transit.
    pub loss_percent: u64,
    /// Push-sum shares sent and lost.
    pub shares: (u64, u64),
    /// The swarm's clock (ms): moves only when the queue runs dry.
    pub now: u64,
    /// If set, each engine is told that every delta payload it was given
    /// (and its own) is stored ([`Engine::payload_stored`]) and reads it
    /// from a [`Kept`] source from then on; `Some(true)`: each source's
    /// first read fails (the first source of each delta at each node), as a
    /// store that lost the chunks would.
    pub stored: Option<bool>,
    /// If set, a fetched delta of a fixed-width codec arrives as a shell
    /// that stored its chunks as they came hands it over
    /// ([`Input::DeltaStored`], read from a [`Kept`] source), not whole.
    pub arrive_stored: bool,
    /// The (node, delta) pairs given a source so far.
    sourced: BTreeSet<(usize, ContentId)>,
    held: Vec<(usize, Input)>,
    rng: u64,
}

impl Swarm {
    /// One node a shard, all in `cfg`'s region and knowing each other,
    /// each to start from the same genesis: `cfg.spec` initialised with
    /// seed 42, signed by the key `[99; 32]`. Their joins and starts are
    /// queued; nothing has run yet.
    pub fn new(cfg: EngineConfig, train: TrainConfig, shards: Vec<Dataset>) -> Swarm {
        let n = shards.len();
        let keys: Vec<Keypair> = (0..n)
            .map(|i| Keypair::from_secret_bytes(&[i as u8 + 1; 32]))
            .collect();
        let engines = (0..n)
            .map(|i| {
                let config = EngineConfig {
                    seed: 100 + i as u64,
                    ..cfg.clone()
                };
                Engine::new(config, keys[i].clone())
            })
            .collect();
        let params = cfg.spec.init(42);
        let g = genesis(&cfg, &params, &Keypair::from_secret_bytes(&[99; 32]))
            .expect("a genesis of the swarm's model");
        let mut lineage = MemLineage::default();
        lineage.models.insert(g.id(), g.clone());
        let mut queue = VecDeque::new();
        for i in 0..n {
            for key in &keys {
                queue.push_back((i, Input::PeerJoined(key.node_id())));
            }
            queue.push_back((
                i,
                Input::Start {
                    manifest: g.clone(),
                    params: params.clone(),
                },
            ));
        }
        Swarm {
            cfg,
            train,
            engines,
            keys,
            shards,
            queue,
            genesis: (g, params),
            lineage,
            adopted: vec![Vec::new(); n],
            snapshots: BTreeMap::new(),
            penalties: Vec::new(),
            attackers: BTreeSet::new(),
            corrupt: None,
            neighbours: (0..n)
                .map(|i| (0..n).filter(|j| *j != i).collect())
                .collect(),
            slow: BTreeSet::new(),
            silent: BTreeSet::new(),
            loss_percent: 0,
            shares: (0, 0),
            now: 0,
            stored: None,
            arrive_stored: false,
            sourced: BTreeSet::new(),
            held: Vec::new(),
            rng: 0x2545_f491_4f6c_dd1d,
        }
    }

    /// Delivers `input` to node `i` and carries out what it asks for.
    pub fn step(&mut self, i: usize, input: Input) {
        let given = match (&input, self.stored) {
            (Input::DeltaPayload { id, payload }, Some(_)) => Some((*id, payload.clone())),
            _ => None,
        };
        let actions = self.engines[i].handle(input, self.now);
        if let (Some((id, payload)), Some(fail)) = (given, self.stored) {
            let fail = fail && self.sourced.insert((i, id));
            self.engines[i].payload_stored(id, Arc::new(Kept::new(payload, fail)));
        }
        for a in actions {
            match a {
                Action::Train {
                    round,
                    version,
                    params,
                    seed,
                } => {
                    let (p, report) = if self.train.local_steps == 0 {
                        let report = TrainReport {
                            mean_loss: 0.0,
                            samples: 1,
                        };
                        (params, report)
                    } else {
                        train_local(
                            &self.cfg.spec,
                            &params,
                            &self.shards[i],
                            &self.train,
                            &mut InnerState::default(),
                            seed,
                        )
                        .unwrap_or_else(|e| panic!("node {i} training round {round}: {e}"))
                    };
                    self.queue.push_back((
                        i,
                        Input::TrainingDone {
                            round,
                            version,
                            params: p,
                            samples: report.samples,
                        },
                    ));
                }
                Action::Publish { manifest, payload } => {
                    let payload = payload.bytes().into_owned();
                    let (manifest, payload) = match self.corrupt {
                        Some(corrupt) if self.attackers.contains(&i) => {
                            corrupt(&self.keys[i], &manifest, &payload)
                        }
                        _ => (manifest, payload),
                    };
                    self.lineage.add_delta(&manifest, &payload);
                    if let Some(fail) = self.stored {
                        let fail = fail && self.sourced.insert((i, manifest.id()));
                        let kept = Kept::new(Arc::new(payload), fail);
                        self.engines[i].payload_stored(manifest.id(), Arc::new(kept));
                    }
                    if self.silent.contains(&i) {
                        continue;
                    }
                    for j in (0..self.engines.len()).filter(|j| *j != i) {
                        let input = Input::DeltaAnnounced(manifest.clone());
                        if self.slow.contains(&i) {
                            self.held.push((j, input));
                        } else {
                            self.queue.push_back((j, input));
                        }
                    }
                }
                Action::Fetch { manifest } => {
                    let payload = self
                        .lineage
                        .payload(&manifest)
                        .unwrap_or_else(|| panic!("node {i} fetched an unpublished delta"));
                    let input =
                        if self.arrive_stored && fixed_width(manifest.message().codec).is_some() {
                            Input::DeltaStored {
                                id: manifest.id(),
                                source: Arc::new(Kept::new(Arc::new(payload), false)),
                            }
                        } else {
                            Input::DeltaPayload {
                                id: manifest.id(),
                                payload: payload.into(),
                            }
                        };
                    self.queue.push_back((i, input));
                }
                Action::Adopt { manifest, params } => {
                    self.snapshots
                        .entry(manifest.message().round)
                        .or_default()
                        .insert(i, params.to_vec());
                    self.lineage.models.insert(manifest.id(), manifest.clone());
                    self.adopted[i].push(manifest);
                }
                Action::PushShare { to, x, w } => {
                    for peer in to {
                        let j = self
                            .keys
                            .iter()
                            .position(|k| k.node_id() == peer)
                            .unwrap_or_else(|| panic!("node {i} pushed to a stranger"));
                        self.rng ^= self.rng << 13;
                        self.rng ^= self.rng >> 7;
                        self.rng ^= self.rng << 17;
                        self.shares.0 += 1;
                        if self.rng % 100 < self.loss_percent {
                            self.shares.1 += 1;
                            continue;
                        }
                        self.queue
                            .push_back((j, Input::PushShare { x: x.clone(), w }));
                    }
                }
                Action::SendToNeighbours {
                    round,
                    params,
                    degree,
                } => {
                    let from = self.keys[i].node_id();
                    for &j in &self.neighbours[i] {
                        let input = Input::NeighbourModel {
                            from,
                            round,
                            params: params.clone(),
                            degree,
                        };
                        self.queue.push_back((j, input));
                    }
                }
                Action::Penalise(r) => self.penalties.push((i, r.reason)),
                Action::SetTimer { .. } => {}
            }
        }
    }

    /// Runs until every engine has reached `rounds` (panics after a million
    /// deliveries). A node already there takes only delta announcements and
    /// payloads. When the queue runs dry the clock moves on by 10 s, every
    /// node gets a tick, and slow nodes' held announcements land after them.
    pub fn run(&mut self, rounds: u64) {
        for _ in 0..1_000_000 {
            if self.engines.iter().all(|e| e.round() >= rounds) {
                return;
            }
            match self.queue.pop_front() {
                Some((i, input)) => {
                    if self.engines[i].round() < rounds
                        || matches!(input, Input::DeltaAnnounced(_) | Input::DeltaPayload { .. })
                    {
                        self.step(i, input);
                    }
                }
                None => {
                    self.now += 10_000;
                    for i in 0..self.engines.len() {
                        self.queue.push_back((i, Input::Tick));
                    }
                    self.queue.extend(self.held.drain(..));
                }
            }
        }
        panic!("the swarm did not reach round {rounds}");
    }

    /// Each node's accuracy on `test`.
    pub fn accuracies(&self, test: &Dataset) -> Vec<f32> {
        self.engines
            .iter()
            .map(|e| {
                evaluate(&self.cfg.spec, e.params(), test)
                    .unwrap_or_else(|e| panic!("evaluating: {e}"))
                    .1
            })
            .collect()
    }

    /// A verifier's view: everything published, only the genesis verified.
    pub fn verifier(&self) -> MemLineage {
        let mut m = self.lineage.clone();
        m.verified
            .insert(self.genesis.0.id(), self.genesis.1.clone());
        m
    }

    /// A fresh door for the swarm's region, as a verifier would hold one.
    pub fn door(&self) -> Door {
        Door::new(
            self.cfg.door.clone(),
            &self.cfg.model_id,
            &self.cfg.region,
            self.cfg.spec.layout(),
        )
    }
}
