//! The simulated world: real round engines (the node's sans-IO core), a
//! virtual clock, a deterministic event queue, links with latency and loss,
//! and Byzantine nodes. Nothing here reads a clock or a socket; the same
//! scenario and seed replay the same events in the same order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use tapestry_core::attest;
use tapestry_core::data::{self, CsvOptions, Dataset, Scaler};
use tapestry_core::door::DoorConfig;
use tapestry_core::engine::{Action, Engine, EngineConfig, Input, Mode, VersionRank, genesis};
use tapestry_core::heads::{self, Decision};
use tapestry_core::mixing::{self, consensus_distance};
use tapestry_core::model::{
    InnerOptimizer, InnerState, ModelSpec, TrainConfig, evaluate, train_local,
};
use tapestry_core::outer::OuterOptimizer;
use tapestry_core::verify::{self, Lineage, Plan, VersionRejection};
use tapestry_protocol::{
    ContentId, DeltaManifest, Keypair, ModelManifest, NodeId, Signed, Verified,
};

use tapestry_storage::{ChunkStore, MemoryStore};

use crate::net::Net;
use crate::par;
use crate::scenario::{Attack, DataSource, Settings};

/// Held-out rows used for evaluation at most.
const MAX_TEST_ROWS: usize = 2000;

/// Virtual time one local training takes.
const TRAIN_MS: u64 = 50;

/// One round's figures over the honest nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundStats {
    /// The round (the version's round number).
    pub round: u64,
    /// Mean test accuracy.
    pub accuracy_mean: f64,
    /// Lowest.
    pub accuracy_min: f64,
    /// Highest.
    pub accuracy_max: f64,
    /// Mean test loss.
    pub loss_mean: f64,
    /// Mean distance to the average model over its norm.
    pub consensus_distance: f64,
    /// Bytes sent per node so far (mean over all nodes).
    pub bytes_sent_per_node: u64,
    /// Honest nodes that reached this round (nodes that caught up past it
    /// or were offline are not counted).
    pub nodes: usize,
    /// Virtual time (ms) the last of them reached it.
    pub virtual_ms: u64,
}

/// Churn figures of a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ChurnCounts {
    /// Times a node went offline.
    pub left: u64,
    /// Times a node came back.
    pub rejoined: u64,
    /// Times a returning node caught up: on a version enough members
    /// vouched for (broadcast), or on the median of several neighbours'
    /// models (mixing, push-sum).
    pub caught_up: u64,
}

/// The outcome of one simulated swarm.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Per-round figures (rounds every honest node reached).
    pub rounds: Vec<RoundStats>,
    /// Honest nodes.
    pub honest_nodes: usize,
    /// Deltas refused at the door, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Messages lost in transit at random.
    pub messages_lost: u64,
    /// Messages dropped by partitions.
    pub messages_cut: u64,
    /// Messages sent to offline nodes.
    pub messages_to_offline: u64,
    /// Churn figures.
    pub churn: ChurnCounts,
    /// What the nodes' chunk stores hold at the end, if they had them.
    pub store: Option<StoreFigures>,
}

/// Chunk-store figures at the end of a run (means over all nodes).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StoreFigures {
    /// Bytes held (keys and values).
    pub bytes_per_node: u64,
    /// Chunks held.
    pub chunks_per_node: u64,
}

/// The data of a run, loaded and scaled once.
#[derive(Debug, Clone)]
pub struct Data {
    /// Training rows (pooled).
    pub train: Dataset,
    /// Held-out rows.
    pub test: Dataset,
    /// Each node's rows of `train`.
    pub shards: Vec<Dataset>,
}

impl Data {
    /// Loads, splits, scales and partitions the data of `settings`.
    pub fn load(settings: &Settings) -> Result<Data, String> {
        let s = &settings.scenario;
        let all = match &settings.data {
            // Ten overlapping classes: hard enough that pooling matters;
            // 3,000 rows, or 30 per node for large swarms.
            DataSource::Synthetic => {
                data::synthetic_with_separation(s.seed, (30 * s.nodes).max(3000), 20, 10, 0.8)
            }
            DataSource::Csv(path) => {
                data::load_csv(path, CsvOptions::default()).map_err(|e| e.to_string())?
            }
        };
        let (mut train, mut test) = all
            .split(s.test_fraction, s.seed)
            .map_err(|e| e.to_string())?;
        if test.len() > MAX_TEST_ROWS {
            // Enough to read accuracy to about a percent; evaluation cost
            // stays bounded in large swarms.
            let rows: Vec<usize> = (0..MAX_TEST_ROWS).collect();
            test = test.subset(&rows);
        }
        // One scaler for everyone, from the pooled training rows: in a real
        // swarm it ships with the model definition (see core::data).
        let scaler = Scaler::fit(&train);
        scaler.apply(&mut train);
        scaler.apply(&mut test);
        let parts = data::partition(&train, s.nodes, settings.partition, s.seed)
            .map_err(|e| e.to_string())?;
        let shards = parts.iter().map(|rows| train.subset(rows)).collect();
        Ok(Data {
            train,
            test,
            shards,
        })
    }
}

fn train_config(settings: &Settings) -> TrainConfig {
    TrainConfig {
        local_steps: settings.scenario.local_steps,
        batch_size: settings.scenario.batch_size,
        optimizer: InnerOptimizer::SgdMomentum {
            lr: settings.scenario.lr,
            momentum: 0.9,
        },
    }
}

/// The model of a run.
pub fn model_spec(settings: &Settings, data: &Data) -> ModelSpec {
    settings
        .model
        .spec(data.train.n_features, data.train.n_classes)
}

/// What happens next in the simulated world.
enum Event {
    /// An input reaches a node's engine.
    Deliver { node: usize, input: Input },
    /// A node's local training for `round` from `version` (job `job`)
    /// finishes.
    Trained {
        node: usize,
        round: u64,
        version: ContentId,
        job: u64,
    },
    /// A Byzantine node sends its forged delta (after hearing the honest
    /// ones of the round, as a colluding attacker would wait to).
    Forge {
        node: usize,
        manifest: Verified<DeltaManifest>,
        payload: Vec<u8>,
    },
    /// A model version reaches `node`: announced by a peer, or (`again`)
    /// one it verified before and kept for when it closed its round.
    Version {
        node: usize,
        manifest: Verified<ModelManifest>,
        again: bool,
    },
    /// A churn period begins.
    Churn,
    /// Nodes notice that a partition began (their connections across it
    /// time out) or ended (they reconnect).
    CutNoticed { cut: usize, healed: bool },
}

/// A local training asked for and not yet run.
struct Job {
    node: usize,
    round: u64,
    params: Vec<f32>,
    seed: u64,
}

/// The models of one round as nodes reach it.
#[derive(Default)]
struct Row {
    params: BTreeMap<usize, Vec<f32>>,
    last_ms: u64,
}

struct World<'a> {
    settings: &'a Settings,
    data: &'a Data,
    spec: ModelSpec,
    graph: Vec<Vec<usize>>,
    keys: Vec<Keypair>,
    index: BTreeMap<NodeId, usize>,
    engines: Vec<Engine>,
    net: Net,
    rng: ChaCha8Rng,
    queue: BTreeMap<(u64, u64), Event>,
    seq: u64,
    byzantine: BTreeSet<usize>,
    attack: Option<Attack>,
    honest: Vec<usize>,
    /// Honest nodes evaluated in rounds before the last (all if no sample).
    sampled: BTreeSet<usize>,
    threads: usize,
    train_cfg: TrainConfig,
    jobs: BTreeMap<u64, Job>,
    trained: BTreeMap<u64, (Vec<f32>, u64)>,
    next_job: u64,
    /// Each node's head: its current version and parameters.
    heads: Vec<(Verified<ModelManifest>, Vec<f32>)>,
    /// Each node's latest adopted round.
    reached: Vec<u64>,
    rows: BTreeMap<u64, Row>,
    next_row: u64,
    stats: Vec<RoundStats>,
    published: BTreeMap<ContentId, Vec<u8>>,
    published_in: BTreeMap<u64, Vec<ContentId>>,
    first_delta: BTreeMap<usize, (Verified<DeltaManifest>, Vec<u8>)>,
    first_mix_delta: BTreeMap<usize, Vec<f32>>,
    honest_deltas: BTreeMap<u64, Vec<Vec<f32>>>,
    rejected: BTreeMap<String, u64>,
    churn: ChurnCounts,
    /// Each node's chunk store, if the scenario asks for them.
    stores: Vec<MemoryStore>,
    /// Every model version anyone announced (what a node could fetch).
    versions: BTreeMap<ContentId, Verified<ModelManifest>>,
    /// Every delta manifest anyone announced or serves.
    delta_manifests: BTreeMap<ContentId, Verified<DeltaManifest>>,
    /// Parameters of versions some node verified (recomputation is
    /// deterministic, so one copy serves every node that verified it).
    version_params: BTreeMap<ContentId, Vec<f32>>,
    /// The versions each node verified (made, derived or recomputed).
    verified: Vec<BTreeSet<ContentId>>,
    /// Each node's preferred next-round version heard, for when it closes
    /// its own round.
    best_seen: Vec<BTreeMap<u64, (VersionRank, Verified<ModelManifest>)>>,
    /// Aggregations computed while verifying (see [`Memo`]).
    memo: std::cell::RefCell<Memo>,
}

/// What one simulated node holds of the region's history, as the core's
/// [`Lineage`]: every announced manifest and payload can be fetched, and
/// what this node verified (plus what it verifies now) has parameters.
struct View<'w> {
    versions: &'w BTreeMap<ContentId, Verified<ModelManifest>>,
    deltas: &'w BTreeMap<ContentId, Verified<DeltaManifest>>,
    payloads: &'w BTreeMap<ContentId, Vec<u8>>,
    params: &'w BTreeMap<ContentId, Vec<f32>>,
    verified: &'w BTreeSet<ContentId>,
    new: BTreeMap<ContentId, Vec<f32>>,
    memo: &'w std::cell::RefCell<Memo>,
}

/// Aggregations already computed, by parent and delta ids: a pure function
/// of them, so every node that checks the same version reuses the result.
type Memo = BTreeMap<(ContentId, Vec<ContentId>), Vec<f32>>;

impl Lineage for View<'_> {
    fn model(&self, id: &ContentId) -> Option<Verified<ModelManifest>> {
        self.versions.get(id).cloned()
    }
    fn delta(&self, id: &ContentId) -> Option<Verified<DeltaManifest>> {
        self.deltas.get(id).cloned()
    }
    fn delta_held(&self, id: &ContentId) -> Option<bool> {
        self.deltas
            .contains_key(id)
            .then(|| self.payloads.contains_key(id))
    }
    fn delta_author(&self, id: &ContentId) -> Option<NodeId> {
        self.deltas.get(id).map(|d| d.message().author)
    }
    fn has_payload(&self, d: &Verified<DeltaManifest>) -> bool {
        self.payloads.contains_key(&d.id())
    }
    fn payload(&self, d: &Verified<DeltaManifest>) -> Option<Vec<u8>> {
        self.payloads.get(&d.id()).cloned()
    }
    fn is_verified(&self, id: &ContentId) -> bool {
        self.new.contains_key(id) || self.verified.contains(id)
    }
    fn params(&self, id: &ContentId) -> Option<Vec<f32>> {
        match self.new.get(id) {
            Some(p) => Some(p.clone()),
            None if self.verified.contains(id) => self.params.get(id).cloned(),
            None => None,
        }
    }
    fn aggregate(
        &self,
        cfg: &EngineConfig,
        parent: ContentId,
        parent_params: &[f32],
        inputs: &[verify::DeltaInput<'_>],
    ) -> Result<Vec<f32>, tapestry_core::aggregate::AggregateError> {
        let mut ids: Vec<ContentId> = inputs.iter().map(|d| d.id).collect();
        ids.sort();
        let key = (parent, ids);
        if let Some(p) = self.memo.borrow().get(&key) {
            return Ok(p.clone());
        }
        let p = verify::aggregate_onto(cfg, parent_params, inputs)?;
        self.memo.borrow_mut().insert(key, p.clone());
        Ok(p)
    }
}

/// Runs the swarm of `settings` on `data`; `progress` is called once per
/// completed round.
pub fn run_swarm(
    settings: &Settings,
    data: &Data,
    progress: &mut dyn FnMut(u64),
) -> Result<Outcome, String> {
    let s = &settings.scenario;
    let n = s.nodes;
    let spec = model_spec(settings, data);
    let graph = settings.topology.build(n, s.seed)?;
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed ^ 0x5157_5157);
    let mut byzantine: BTreeSet<usize> = BTreeSet::new();
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    let attack = settings.byzantine.map(|(count, attack)| {
        byzantine.extend(order.iter().take(count));
        attack
    });
    let keys: Vec<Keypair> = (0..n)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&s.seed.to_le_bytes());
            seed[8..16].copy_from_slice(&(i as u64).to_le_bytes());
            Keypair::from_secret_bytes(&seed)
        })
        .collect();
    let index: BTreeMap<NodeId, usize> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.node_id(), i))
        .collect();
    let config = |i: usize| EngineConfig {
        model_id: "sim".into(),
        region: "sim".into(),
        spec: spec.clone(),
        codec: settings.codec,
        chunk_size: 256 << 10,
        rule: settings.aggregator,
        outer: OuterOptimizer::averaging(),
        quorum: 1.0,
        round_timeout_ms: 20 * (s.latency_ms + s.jitter_ms).max(1) + 4 * TRAIN_MS,
        door: DoorConfig {
            weighting: settings.weighting,
            ..DoorConfig::default()
        },
        mode: settings.mode,
        seed: s.seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
    };
    let engines: Vec<Engine> = (0..n)
        .map(|i| Engine::new(config(i), keys[i].clone()))
        .collect();
    let params0 = spec.init(s.seed);
    let genesis = genesis(
        &config(0),
        &params0,
        &Keypair::from_secret_bytes(&[0xee; 32]),
    )
    .ok_or("could not sign the initial model")?;
    let honest: Vec<usize> = (0..n).filter(|i| !byzantine.contains(i)).collect();
    let mut sample = honest.clone();
    sample.shuffle(&mut rng);
    if s.eval_sample > 0 {
        sample.truncate(s.eval_sample);
    }
    let net = Net::new(
        n,
        s.latency_ms,
        s.jitter_ms,
        s.loss,
        s.bandwidth_mbps,
        settings.cuts.clone(),
        s.seed ^ 0x4e45_5421,
    );
    let mut world = World {
        settings,
        data,
        spec,
        graph,
        keys,
        index,
        engines,
        net,
        rng,
        queue: BTreeMap::new(),
        seq: 0,
        byzantine,
        attack,
        honest,
        sampled: sample.into_iter().collect(),
        threads: par::workers(s.threads),
        train_cfg: train_config(settings),
        jobs: BTreeMap::new(),
        trained: BTreeMap::new(),
        next_job: 0,
        heads: vec![(genesis.clone(), params0.clone()); n],
        reached: vec![0; n],
        rows: BTreeMap::new(),
        next_row: 1,
        stats: Vec::new(),
        published: BTreeMap::new(),
        published_in: BTreeMap::new(),
        first_delta: BTreeMap::new(),
        first_mix_delta: BTreeMap::new(),
        honest_deltas: BTreeMap::new(),
        rejected: BTreeMap::new(),
        churn: ChurnCounts::default(),
        stores: if s.chunk_store {
            (0..n).map(|_| MemoryStore::new()).collect()
        } else {
            Vec::new()
        },
        versions: BTreeMap::from([(genesis.id(), genesis.clone())]),
        delta_manifests: BTreeMap::new(),
        version_params: BTreeMap::from([(genesis.id(), params0.clone())]),
        verified: vec![BTreeSet::from([genesis.id()]); n],
        best_seen: vec![BTreeMap::new(); n],
        memo: std::cell::RefCell::new(BTreeMap::new()),
    };
    for i in 0..n {
        for j in world.peers_of(i) {
            let input = Input::PeerJoined(world.keys[j].node_id());
            world.push(0, Event::Deliver { node: i, input });
        }
        let input = Input::Start {
            manifest: genesis.clone(),
            params: params0.clone(),
        };
        world.push(0, Event::Deliver { node: i, input });
    }
    if let Some(c) = settings.churn {
        world.push(c.period_ms, Event::Churn);
    }
    for (k, cut) in settings.cuts.iter().enumerate() {
        // A dead connection is noticed after a few round trips of silence.
        let noticed = cut.from_ms + 10 * s.latency_ms.max(1);
        if noticed < cut.to_ms {
            world.push(
                noticed,
                Event::CutNoticed {
                    cut: k,
                    healed: false,
                },
            );
        }
        world.push(
            cut.to_ms + s.latency_ms,
            Event::CutNoticed {
                cut: k,
                healed: true,
            },
        );
    }
    world.run(progress)?;
    let store = world.store_figures()?;
    Ok(Outcome {
        store,
        rounds: world.stats,
        honest_nodes: world.honest.len(),
        rejected: world.rejected,
        messages_lost: world.net.lost,
        messages_cut: world.net.cut,
        messages_to_offline: world.net.offline,
        churn: world.churn,
    })
}

impl World<'_> {
    fn push(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.queue.insert((at, self.seq), event);
    }

    /// Who a node talks to: the whole region in broadcast mode (the graph
    /// only shapes mixing), its graph neighbours otherwise.
    fn peers_of(&self, i: usize) -> Vec<usize> {
        match self.settings.mode {
            Mode::Broadcast => (0..self.keys.len()).filter(|j| *j != i).collect(),
            _ => self.graph[i].clone(),
        }
    }

    fn run(&mut self, progress: &mut dyn FnMut(u64)) -> Result<(), String> {
        let rounds = self.settings.scenario.rounds;
        let max_events = 200_000_000u64;
        let mut handled = 0u64;
        while let Some(((now, _), event)) = self.queue.pop_first() {
            handled += 1;
            if handled > max_events {
                return Err("the simulation did not finish (event limit reached)".into());
            }
            let (i, input) = match event {
                Event::Churn => {
                    self.churn_period(now);
                    self.finish_rows(progress)?;
                    continue;
                }
                Event::CutNoticed { cut, healed } => {
                    self.cut_noticed(cut, healed, now);
                    continue;
                }
                Event::Version {
                    node,
                    manifest,
                    again,
                } => {
                    if self.net.online[node] && self.engines[node].round() < rounds {
                        self.on_version(node, now, manifest, again);
                    }
                    continue;
                }
                Event::Forge {
                    node,
                    manifest,
                    payload,
                } => {
                    if self.net.online[node] {
                        self.forge_and_send(node, now, &manifest, &payload);
                    }
                    continue;
                }
                Event::Trained {
                    node,
                    round,
                    version,
                    job,
                } => {
                    if !self.trained.contains_key(&job) {
                        self.run_jobs()?;
                    }
                    let Some((params, samples)) = self.trained.remove(&job) else {
                        continue;
                    };
                    (
                        node,
                        Input::TrainingDone {
                            round,
                            version,
                            params,
                            samples,
                        },
                    )
                }
                Event::Deliver { node, input } => (node, input),
            };
            if !self.net.online[i] {
                continue;
            }
            if self.engines[i].round() >= rounds
                && !matches!(input, Input::DeltaAnnounced(_) | Input::DeltaPayload { .. })
            {
                continue;
            }
            let actions = self.engines[i].handle(input, now);
            for action in actions {
                self.act(i, now, action)?;
            }
            self.finish_rows(progress)?;
        }
        // Whatever is left: rounds some honest node never reached.
        self.finish_rows_at_end(progress)
    }

    /// Runs every pending training on the worker threads.
    fn run_jobs(&mut self) -> Result<(), String> {
        let jobs: Vec<(u64, Job)> = std::mem::take(&mut self.jobs).into_iter().collect();
        let (spec, data, cfg) = (&self.spec, self.data, &self.train_cfg);
        let results = par::map(&jobs, self.threads, |(_, job)| {
            train_local(
                spec,
                &job.params,
                &data.shards[job.node],
                cfg,
                // Fresh optimiser state each round (local SGD).
                &mut InnerState::default(),
                job.seed,
            )
            .map_err(|e| format!("node {} round {}: {e}", job.node, job.round))
        });
        for ((id, _), r) in jobs.iter().zip(results) {
            let (params, report) = r?;
            self.trained.insert(*id, (params, report.samples));
        }
        Ok(())
    }

    fn act(&mut self, i: usize, now: u64, action: Action) -> Result<(), String> {
        let s = &self.settings.scenario;
        match action {
            Action::Train {
                round,
                version,
                params,
                seed,
            } => {
                let job = self.next_job;
                self.next_job += 1;
                if round >= s.rounds - s.consensus_rounds {
                    // Consensus phase: no training, only averaging.
                    self.trained.insert(job, (params, 1));
                } else {
                    let job_data = Job {
                        node: i,
                        round,
                        params,
                        seed,
                    };
                    self.jobs.insert(job, job_data);
                }
                self.push(
                    now + TRAIN_MS,
                    Event::Trained {
                        node: i,
                        round,
                        version,
                        job,
                    },
                );
            }
            Action::Publish { manifest, payload } => {
                match (self.byzantine.contains(&i), self.attack) {
                    (true, Some(Attack::FreeRide)) => {}
                    (true, Some(attack)) => {
                        // Colluding attacks wait to hear the honest deltas.
                        let wait = match attack {
                            Attack::Alie(_) | Attack::Ipm(_) => {
                                self.net.latency_ms() + s.jitter_ms + 1
                            }
                            _ => 0,
                        };
                        self.push(
                            now + wait,
                            Event::Forge {
                                node: i,
                                manifest,
                                payload,
                            },
                        );
                    }
                    _ => {
                        let colluding =
                            matches!(self.attack, Some(Attack::Alie(_) | Attack::Ipm(_)));
                        let n_params = self.spec.n_params();
                        let decoded = colluding
                            .then(|| manifest.message().codec.decode(&payload, n_params).ok())
                            .flatten();
                        if let Some(v) = decoded {
                            self.honest_deltas
                                .entry(manifest.message().round)
                                .or_default()
                                .push(v);
                        }
                        self.announce(i, now, manifest, payload);
                    }
                }
            }
            Action::Fetch { manifest } => {
                let author = self.index.get(&manifest.message().author).copied();
                let payload = match (author, self.stores.is_empty()) {
                    (Some(a), false) => {
                        let m = manifest.message();
                        self.stores[a]
                            .read_payload(&m.chunk_ids, m.payload_bytes)
                            .ok()
                    }
                    _ => self.published.get(&manifest.id()).cloned(),
                };
                if let (Some(payload), Some(a)) = (payload, author) {
                    if let Some(store) = self.stores.get(i) {
                        let m = manifest.message();
                        store
                            .put_payload(&payload, m.chunk_size as usize)
                            .and_then(|_| store.put_delta_manifest(&manifest))
                            .map_err(|e| e.to_string())?;
                    }
                    let id = manifest.id();
                    // The request travels, then the author's uplink sends.
                    let asked = self.net.send_reliable(i, a, now, 128);
                    if let Ok(at) =
                        asked.and_then(|t| self.net.send_reliable(a, i, t, payload.len() as u64))
                    {
                        let input = Input::DeltaPayload { id, payload };
                        self.push(at, Event::Deliver { node: i, input });
                    }
                }
            }
            Action::SendToNeighbours {
                round,
                params,
                degree,
            } => {
                let Some(params) = self.mixing_model(i, round, params) else {
                    return Ok(());
                };
                let from = self.keys[i].node_id();
                for j in self.graph[i].clone() {
                    if let Ok(at) = self.net.send(i, j, now, params.len() as u64 * 4) {
                        let input = Input::NeighbourModel {
                            from,
                            round,
                            params: params.clone(),
                            degree,
                        };
                        self.push(at, Event::Deliver { node: j, input });
                    }
                }
            }
            Action::PushShare { to, x, w } => {
                for peer in to {
                    let Some(&j) = self.index.get(&peer) else {
                        continue;
                    };
                    if let Ok(at) = self.net.send(i, j, now, x.len() as u64 * 4 + 8) {
                        let input = Input::PushShare { x: x.clone(), w };
                        self.push(at, Event::Deliver { node: j, input });
                    }
                }
            }
            Action::SetTimer { at_ms } => self.push(
                at_ms,
                Event::Deliver {
                    node: i,
                    input: Input::Tick,
                },
            ),
            Action::Penalise(r) => {
                *self
                    .rejected
                    .entry(r.reason.label().to_owned())
                    .or_default() += 1
            }
            Action::Adopt { manifest, params } => self.adopted(i, now, manifest, params),
        }
        Ok(())
    }

    /// Mixing mode: the model node `i` sends its neighbours after training
    /// for `round`: its own, or a Byzantine node's forgery — the attack
    /// applied to its delta (round-start model minus trained model) — or
    /// nothing (free-riding). Colluding attacks see the honest deltas of the
    /// round so far, or of the previous round.
    fn mixing_model(&mut self, i: usize, round: u64, params: Vec<f32>) -> Option<Vec<f32>> {
        let Some(attack) = self.attack else {
            return Some(params);
        };
        let start = self.engines[i].params();
        let delta: Vec<f32> = start.iter().zip(&params).map(|(a, b)| a - b).collect();
        if !self.byzantine.contains(&i) {
            if matches!(attack, Attack::Alie(_) | Attack::Ipm(_)) {
                self.honest_deltas.entry(round).or_default().push(delta);
            }
            return Some(params);
        }
        let first = self
            .first_mix_delta
            .entry(i)
            .or_insert_with(|| delta.clone())
            .clone();
        let honest = self
            .honest_deltas
            .get(&round)
            .filter(|v| !v.is_empty())
            .or_else(|| self.honest_deltas.get(&round.saturating_sub(1)));
        let forged = attacked(attack, delta, honest, Some(first), &mut self.rng)?;
        Some(start.iter().zip(&forged).map(|(a, d)| a - d).collect())
    }

    /// Stores a payload for fetching and announces its manifest to the region.
    fn announce(
        &mut self,
        i: usize,
        now: u64,
        manifest: Verified<DeltaManifest>,
        payload: Vec<u8>,
    ) {
        self.published_in
            .entry(manifest.message().round)
            .or_default()
            .push(manifest.id());
        if let Some(store) = self.stores.get(i) {
            // The author keeps what it announces; fetches are served from here.
            let stored = store
                .put_payload(&payload, manifest.message().chunk_size as usize)
                .and_then(|_| store.put_delta_manifest(&manifest));
            if stored.is_err() {
                return;
            }
        }
        self.published.insert(manifest.id(), payload);
        self.delta_manifests.insert(manifest.id(), manifest.clone());
        let size = manifest.envelope_bytes().len() as u64;
        for j in 0..self.keys.len() {
            if j == i {
                continue;
            }
            if let Ok(at) = self.net.send(i, j, now, size) {
                let input = Input::DeltaAnnounced(manifest.clone());
                self.push(at, Event::Deliver { node: j, input });
            }
        }
    }

    fn forge_and_send(
        &mut self,
        i: usize,
        now: u64,
        manifest: &Verified<DeltaManifest>,
        payload: &[u8],
    ) {
        let Some(attack) = self.attack else { return };
        let forged = forge(
            attack,
            manifest,
            payload,
            &self.honest_deltas,
            &self.first_delta,
            i,
            &self.keys[i],
            &mut self.rng,
        );
        self.first_delta
            .entry(i)
            .or_insert_with(|| (manifest.clone(), payload.to_vec()));
        for (m, p) in forged {
            self.announce(i, now, m, p);
        }
    }

    fn adopted(&mut self, i: usize, now: u64, manifest: Verified<ModelManifest>, params: Vec<f32>) {
        let round = manifest.message().round;
        self.reached[i] = self.reached[i].max(round);
        // Forget payloads no online node can still use (older than the
        // staleness window of the slowest one), so memory stays flat over
        // long runs; nodes coming back catch up from a model instead.
        let slowest = (0..self.engines.len())
            .filter(|v| self.net.online[*v])
            .map(|v| self.engines[v].round())
            .min()
            .unwrap_or(0);
        // (Broadcast mode keeps the comparison window too: a version of
        // that age may still be verified, and recomputing it needs them.)
        let keep = match self.settings.mode {
            Mode::Broadcast => DoorConfig::default().staleness + 1 + verify::BRANCH_WINDOW,
            _ => DoorConfig::default().staleness + 1,
        };
        let horizon = slowest.saturating_sub(keep);
        while let Some(entry) = self.published_in.first_entry() {
            if *entry.key() >= horizon {
                break;
            }
            for id in entry.remove() {
                self.published.remove(&id);
            }
        }
        self.honest_deltas.retain(|r, _| *r >= horizon);
        // Aggregations and parameters of versions far behind every online
        // node are not asked for again.
        let old = horizon;
        let versions = &self.versions;
        let round_of = |id: &ContentId| versions.get(id).map_or(0, |v| v.message().round);
        self.memo
            .borrow_mut()
            .retain(|(p, _), _| round_of(p) >= old);
        self.version_params
            .retain(|id, _| round_of(id) >= old || round_of(id) == 0);
        if !self.byzantine.contains(&i) && round >= self.next_row {
            let row = self.rows.entry(round).or_default();
            row.params.insert(i, params.clone());
            row.last_ms = now;
        }
        if let Some(store) = self.stores.get(i) {
            let bytes: Vec<u8> = tapestry_protocol::f32_le_bytes(&params);
            let kept = store
                .put_payload(&bytes, manifest.message().chunk_size as usize)
                .and_then(|_| store.put_model_manifest(&manifest))
                .and_then(|id| store.set_ref("head", id));
            if kept.is_ok() && round.is_multiple_of(10) {
                // Steady state: what a node keeps is its head's history.
                let _ = store.gc();
            }
        }
        if self.settings.mode == Mode::Broadcast {
            self.versions.insert(manifest.id(), manifest.clone());
            self.version_params
                .entry(manifest.id())
                .or_insert_with(|| params.clone());
            self.verified[i].insert(manifest.id());
            self.announce_version(i, now, &manifest);
            let forges = self.attack.map(|a| a.forges());
            if let (true, Some(forges)) = (self.byzantine.contains(&i), forges) {
                for v in self.forgeries(i, &manifest, &params, forges) {
                    self.versions.insert(v.id(), v.clone());
                    self.announce_version(i, now, &v);
                }
            }
            // A preferred version of this round heard while closing it.
            if let Some((_, best)) = self.best_seen[i].remove(&round) {
                let again = Event::Version {
                    node: i,
                    manifest: best,
                    again: true,
                };
                self.push(now, again);
            }
            self.best_seen[i].retain(|r, _| *r > round);
        }
        self.heads[i] = (manifest, params);
    }

    /// Sends a model version's announcement to every other node.
    fn announce_version(&mut self, i: usize, now: u64, v: &Verified<ModelManifest>) {
        let size = v.envelope_bytes().len() as u64;
        for j in 0..self.keys.len() {
            if j != i
                && let Ok(at) = self.net.send(i, j, now, size)
            {
                self.push(
                    at,
                    Event::Version {
                        node: j,
                        manifest: v.clone(),
                        again: false,
                    },
                );
            }
        }
    }

    /// A Byzantine node's forged versions, made from the version it just
    /// adopted: (made-up versions, merges, round jumps) as `forges` says.
    fn forgeries(
        &self,
        i: usize,
        head: &Verified<ModelManifest>,
        params: &[f32],
        (made_up, merges, jumps): (bool, bool, bool),
    ) -> Vec<Verified<ModelManifest>> {
        let key = &self.keys[i];
        let h = head.message();
        let evil: Vec<f32> = params.iter().map(|v| -v).collect();
        let sign = |round: u64, parents: Vec<ContentId>, deltas: Vec<ContentId>| {
            let mut m = h.clone();
            m.round = round;
            m.author = key.node_id();
            m.chunk_ids = verify::params_chunk_ids(&evil, m.chunk_size as usize);
            m.parents = parents;
            m.deltas = deltas;
            Signed::sign(m, key).ok()
        };
        let mut out = Vec::new();
        let Some(parent) = h.parents.first().copied() else {
            return out;
        };
        if made_up {
            // Its head's parent and deltas, other parameters.
            out.extend(sign(h.round, h.parents.clone(), h.deltas.clone()));
            // 64 delta ids nobody ever announced.
            let ids = (0..64u64)
                .map(|k| ContentId::of(&[&k.to_le_bytes()[..], head.id().as_bytes()].concat()))
                .collect();
            out.extend(sign(h.round, h.parents.clone(), ids));
        }
        if merges {
            let mut two = vec![head.id(), parent];
            two.sort();
            out.extend(sign(h.round, two, Vec::new()));
        }
        if jumps {
            out.extend(sign(
                h.round.saturating_add(5),
                vec![head.id()],
                h.deltas.clone(),
            ));
            out.extend(sign(u64::MAX - 1, vec![head.id()], h.deltas.clone()));
        }
        out
    }

    /// Node `j` hears of a model version: it checks the manifest, verifies
    /// the version by recomputation if it could matter, and does what the
    /// core's agreement policy says — the same code the real node runs.
    fn on_version(&mut self, j: usize, now: u64, v: Verified<ModelManifest>, again: bool) {
        let engine = &self.engines[j];
        if let Err(r) = verify::check_shape(engine.config(), v.message(), engine.round()) {
            self.count_rejected(&r);
            return;
        }
        // Heard again (others adopted it and announce it too): decided
        // already, as the node does.
        if self.verified[j].contains(&v.id()) && !again {
            return;
        }
        if !heads::worth_verifying(engine, v.message()) {
            return;
        }
        let mut view = View {
            versions: &self.versions,
            deltas: &self.delta_manifests,
            payloads: &self.published,
            params: &self.version_params,
            verified: &self.verified[j],
            new: BTreeMap::new(),
            memo: &self.memo,
        };
        let cfg = engine.config();
        // Nodes far behind catch up when they rejoin (see `rejoin`); a
        // version needing more than the comparison window recomputed is
        // refused here.
        let max_chain = (cfg.door.staleness + verify::BRANCH_WINDOW) as usize;
        let checked = match verify::plan(&view, cfg, &v, max_chain) {
            Err(r) => Err(r),
            Ok(Plan::Need {
                models,
                deltas,
                payloads,
            }) => Err(match (models.first(), deltas.first(), payloads.first()) {
                (Some(m), _, _) => VersionRejection::UnknownParent(*m),
                (None, Some(d), _) => VersionRejection::UnknownDelta(*d),
                (None, None, Some(d)) => VersionRejection::UnknownDelta(d.id()),
                (None, None, None) => VersionRejection::TooFarBehind { limit: max_chain },
            }),
            Ok(Plan::Ready(order)) => {
                verify::verify_in_order(&mut view, cfg, engine.door(), &v, &order, |view, v, c| {
                    view.new.insert(v.id(), c.params.clone());
                    Ok(())
                })
            }
        };
        let checked = match checked {
            Ok(c) => c,
            Err(r) => {
                self.count_rejected(&r);
                return;
            }
        };
        let assessment = heads::assess(&view, cfg, engine.version(), &v, &checked);
        let new = std::mem::take(&mut view.new);
        let decision = heads::decide(engine, v.clone(), checked.params, assessment);
        for (id, p) in new {
            self.verified[j].insert(id);
            self.version_params.entry(id).or_insert(p);
        }
        match decision {
            Decision::Feed(input) => self.push(
                now,
                Event::Deliver {
                    node: j,
                    input: *input,
                },
            ),
            Decision::Remember(rank) => {
                let round = v.message().round;
                if self.best_seen[j].get(&round).is_none_or(|(r, _)| rank > *r) {
                    self.best_seen[j].insert(round, (rank, v));
                }
            }
            Decision::Leave => {}
        }
    }

    fn count_rejected(&mut self, r: &VersionRejection) {
        *self.rejected.entry(r.label().to_owned()).or_default() += 1;
    }

    fn store_figures(&self) -> Result<Option<StoreFigures>, String> {
        if self.stores.is_empty() {
            return Ok(None);
        }
        let n = self.stores.len() as u64;
        let mut f = StoreFigures::default();
        for store in &self.stores {
            f.bytes_per_node += store.disk_bytes().map_err(|e| e.to_string())?;
            f.chunks_per_node += store.chunk_ids().map_err(|e| e.to_string())?.len() as u64;
        }
        f.bytes_per_node /= n;
        f.chunks_per_node /= n;
        Ok(Some(f))
    }

    /// Closes every round row that can no longer change, in order: all
    /// honest nodes reached it, or (before the last round) are offline.
    fn finish_rows(&mut self, progress: &mut dyn FnMut(u64)) -> Result<(), String> {
        let rounds = self.settings.scenario.rounds;
        while self.next_row <= rounds {
            let r = self.next_row;
            let done = self
                .honest
                .iter()
                .all(|&v| self.reached[v] >= r || (r < rounds && !self.net.online[v]));
            if !done {
                break;
            }
            self.finish_row(r, progress)?;
        }
        Ok(())
    }

    fn finish_rows_at_end(&mut self, progress: &mut dyn FnMut(u64)) -> Result<(), String> {
        while self.next_row <= self.settings.scenario.rounds {
            if !self.rows.contains_key(&self.next_row) {
                break;
            }
            self.finish_row(self.next_row, progress)?;
        }
        Ok(())
    }

    fn finish_row(&mut self, r: u64, progress: &mut dyn FnMut(u64)) -> Result<(), String> {
        self.next_row = r + 1;
        let Some(row) = self.rows.remove(&r) else {
            return Ok(());
        };
        let last = r == self.settings.scenario.rounds;
        let evaluated: Vec<&Vec<f32>> = row
            .params
            .iter()
            .filter(|(v, _)| last || self.sampled.contains(v))
            .map(|(_, p)| p)
            .collect();
        let (spec, test) = (&self.spec, &self.data.test);
        let scores = par::map(&evaluated, self.threads, |p| evaluate(spec, p, test))
            .into_iter()
            .collect::<Result<Vec<(f32, f32)>, _>>()
            .map_err(|e| e.to_string())?;
        if scores.is_empty() {
            return Ok(());
        }
        let accs: Vec<f64> = scores.iter().map(|(_, a)| f64::from(*a)).collect();
        let losses: Vec<f64> = scores.iter().map(|(l, _)| f64::from(*l)).collect();
        let models: Vec<Vec<f32>> = row.params.into_values().collect();
        let n = self.keys.len() as u64;
        self.stats.push(RoundStats {
            round: r,
            nodes: models.len(),
            accuracy_mean: accs.iter().sum::<f64>() / accs.len() as f64,
            accuracy_min: accs.iter().copied().fold(f64::MAX, f64::min),
            accuracy_max: accs.iter().copied().fold(f64::MIN, f64::max),
            loss_mean: losses.iter().sum::<f64>() / losses.len() as f64,
            consensus_distance: consensus_distance(&models),
            bytes_sent_per_node: self.net.bytes_sent.iter().sum::<u64>() / n,
            virtual_ms: row.last_ms,
        });
        progress(r);
        Ok(())
    }

    /// A churn period begins: a fresh random set of nodes is offline until
    /// the next one. Once every online honest node has finished, everyone
    /// comes back (and catches up) and churn stops.
    fn churn_period(&mut self, now: u64) {
        let Some(churn) = self.settings.churn else {
            return;
        };
        let rounds = self.settings.scenario.rounds;
        let n = self.keys.len();
        let finished = self
            .honest
            .iter()
            .filter(|v| self.net.online[**v])
            .all(|&v| self.engines[v].round() >= rounds);
        let mut away = BTreeSet::new();
        if !finished {
            let mut all: Vec<usize> = (0..n).collect();
            all.shuffle(&mut self.rng);
            away.extend(
                all.into_iter()
                    .take((churn.fraction * n as f64).round() as usize),
            );
            self.push(now + churn.period_ms, Event::Churn);
        }
        for v in 0..n {
            match (self.net.online[v], away.contains(&v)) {
                (true, true) => self.leave(v, now),
                (false, false) => self.rejoin(v, now),
                _ => {}
            }
        }
    }

    /// Every online node hears that its peers across cut `k` left (or,
    /// once it heals, came back).
    fn cut_noticed(&mut self, k: usize, healed: bool, now: u64) {
        let group = &self.settings.cuts[k].group;
        for v in 0..self.keys.len() {
            if !self.net.online[v] {
                continue;
            }
            for p in self.peers_of(v) {
                if group[p] == group[v] || !self.net.online[p] {
                    continue;
                }
                let id = self.keys[p].node_id();
                let input = if healed {
                    Input::PeerJoined(id)
                } else {
                    Input::PeerLeft(id)
                };
                self.push(now, Event::Deliver { node: v, input });
            }
        }
    }

    fn leave(&mut self, v: usize, now: u64) {
        self.net.online[v] = false;
        self.churn.left += 1;
        let lat = self.net.latency_ms();
        let id = self.keys[v].node_id();
        for p in self.peers_of(v) {
            if self.net.online[p] {
                let input = Input::PeerLeft(id);
                self.push(now + lat, Event::Deliver { node: p, input });
            }
        }
    }

    /// A node comes back: it reconnects, learns who is there, and catches up
    /// — never on one peer's word. In broadcast mode it takes the furthest
    /// version that enough members vouch for ([`attest::best_vouched`]); in
    /// mixing and push-sum modes the median of several neighbours' models
    /// ([`mixing::catch_up`]). Byzantine peers offer forgeries (a round
    /// jump to 2^64 − 2 with its parameters negated) and vouch for each
    /// other's. With nothing to take it resumes its own model.
    fn rejoin(&mut self, v: usize, now: u64) {
        self.net.online[v] = true;
        self.churn.rejoined += 1;
        let lat = self.net.latency_ms();
        let id = self.keys[v].node_id();
        let mut reachable = Vec::new();
        for p in self.peers_of(v) {
            let pid = self.keys[p].node_id();
            if self.net.online[p] && !self.net.separated(v, p, now) {
                self.push(
                    now + lat,
                    Event::Deliver {
                        node: p,
                        input: Input::PeerJoined(id),
                    },
                );
                self.push(
                    now,
                    Event::Deliver {
                        node: v,
                        input: Input::PeerJoined(pid),
                    },
                );
                reachable.push(p);
            } else {
                self.push(
                    now,
                    Event::Deliver {
                        node: v,
                        input: Input::PeerLeft(pid),
                    },
                );
            }
        }
        let caught = match self.settings.mode {
            Mode::Broadcast => self.catch_up_attested(v, now, &reachable),
            _ => self.catch_up_mixing(v, now, &reachable),
        };
        if caught {
            self.churn.caught_up += 1;
        } else {
            let (manifest, params) = self.heads[v].clone();
            let input = Input::Start { manifest, params };
            self.push(now, Event::Deliver { node: v, input });
        }
    }

    /// What node `p` offers a node catching up: its head, or, if it is
    /// Byzantine, a forged one — the round it claims jumped to 2^64 − 2 and
    /// its parameters negated (signed by it, naming its head as parent).
    fn catch_up_offer(&self, p: usize) -> (Verified<ModelManifest>, Vec<f32>) {
        let (head, params) = &self.heads[p];
        if self.attack.is_some() && self.byzantine.contains(&p) {
            let evil: Vec<f32> = params.iter().map(|x| -x).collect();
            let mut m = head.message().clone();
            m.round = u64::MAX - 1;
            m.author = self.keys[p].node_id();
            m.chunk_ids = verify::params_chunk_ids(&evil, m.chunk_size as usize);
            m.parents = vec![head.id()];
            if let Ok(forged) = Signed::sign(m, &self.keys[p]) {
                return (forged, evil);
            }
        }
        (head.clone(), params.clone())
    }

    /// Fetches one offer from each reachable peer (a request, then the
    /// model): the offers that arrived and when the last one did.
    fn gather_offers(&mut self, v: usize, now: u64, reachable: &[usize]) -> (Vec<Offer>, u64) {
        let mut offers = Vec::new();
        let mut last = now;
        for &p in reachable {
            let (manifest, params) = self.catch_up_offer(p);
            let bytes = params.len() as u64 * 4 + manifest.envelope_bytes().len() as u64;
            if let Ok(at) = self
                .net
                .send_reliable(v, p, now, 128)
                .and_then(|t| self.net.send_reliable(p, v, t, bytes))
            {
                last = last.max(at);
                offers.push((p, manifest, params));
            }
        }
        (offers, last)
    }

    /// Broadcast-mode catch-up on attestations: every reachable peer offers
    /// its head and attests it (honest peers vouch only for the version
    /// they hold; Byzantine ones vouch for every forgery); the node takes
    /// the furthest version that more than a third of the region vouches
    /// for, through the core's agreement policy. Forged offers passed over
    /// are counted as `round_jump`.
    fn catch_up_attested(&mut self, v: usize, now: u64, reachable: &[usize]) -> bool {
        let (offers, at) = self.gather_offers(v, now, reachable);
        let mut distinct: BTreeMap<ContentId, &Verified<ModelManifest>> = BTreeMap::new();
        for (_, m, _) in &offers {
            distinct.entry(m.id()).or_insert(m);
        }
        let mut attestations = Vec::new();
        for (p, _, _) in &offers {
            for (id, version) in &distinct {
                let holds = self.heads[*p].0.id() == *id;
                let colludes = self.byzantine.contains(p)
                    && self
                        .index
                        .get(&version.message().author)
                        .is_some_and(|a| self.byzantine.contains(a));
                if (holds || colludes)
                    && let Some(a) = attest::attest(version.message(), &self.keys[*p])
                {
                    attestations.push(a);
                }
            }
        }
        let members: BTreeSet<NodeId> = self.keys.iter().map(|k| k.node_id()).collect();
        let threshold = attest::threshold(members.len(), 0);
        let versions: Vec<Verified<ModelManifest>> =
            offers.iter().map(|(_, m, _)| m.clone()).collect();
        let own = self.engines[v].round();
        let furthest = own.saturating_add(self.engines[v].config().door.max_rounds_ahead);
        let jumps = versions
            .iter()
            .filter(|m| m.message().round > furthest)
            .count();
        for _ in 0..jumps {
            self.count_rejected(&VersionRejection::RoundJump {
                round: u64::MAX - 1,
                expected: furthest,
            });
        }
        let Some((best, vouchers)) =
            attest::best_vouched(&versions, &attestations, &members, threshold)
        else {
            return false;
        };
        if best.message().round <= own || best.message().round > furthest {
            return false;
        }
        let Some((_, _, params)) = offers.iter().find(|(_, m, _)| m.id() == best.id()) else {
            return false;
        };
        let engine = &self.engines[v];
        let assessment = heads::Assessment::attested(engine.version(), vouchers);
        match heads::decide(engine, best.clone(), params.clone(), assessment) {
            Decision::Feed(input) => {
                self.push(
                    at,
                    Event::Deliver {
                        node: v,
                        input: *input,
                    },
                );
                true
            }
            _ => false,
        }
    }

    /// Mixing-mode catch-up: the median round and coordinate-wise median
    /// model of the reachable neighbours' offers, if at least three offer.
    fn catch_up_mixing(&mut self, v: usize, now: u64, reachable: &[usize]) -> bool {
        let (offers, at) = self.gather_offers(v, now, reachable);
        let views: Vec<(u64, &[f32])> = offers
            .iter()
            .map(|(_, m, p)| (m.message().round, p.as_slice()))
            .collect();
        let own = self.engines[v].round();
        let Some((round, params)) = mixing::catch_up(&views, own, self.heads[v].1.len()) else {
            return false;
        };
        self.push(
            at,
            Event::Deliver {
                node: v,
                input: Input::CaughtUp { round, params },
            },
        );
        true
    }
}

/// A peer's answer to a node catching up: (peer, version, parameters).
type Offer = (usize, Verified<ModelManifest>, Vec<f32>);

/// Builds a Byzantine node's replacement for its honest delta (or `None`
/// to send nothing this round).
#[allow(clippy::too_many_arguments)]
fn forge(
    attack: Attack,
    manifest: &Verified<DeltaManifest>,
    payload: &[u8],
    honest: &BTreeMap<u64, Vec<Vec<f32>>>,
    first: &BTreeMap<usize, (Verified<DeltaManifest>, Vec<u8>)>,
    node: usize,
    key: &Keypair,
    rng: &mut ChaCha8Rng,
) -> Vec<(Verified<DeltaManifest>, Vec<u8>)> {
    let m = manifest.message();
    let n: usize = m
        .layout
        .iter()
        .map(|t| t.shape.iter().product::<u64>() as usize)
        .sum();
    let Ok(own) = m.codec.decode(payload, n) else {
        return Vec::new();
    };
    let first = first
        .get(&node)
        .and_then(|(fm, fp)| fm.message().codec.decode(fp, n).ok());
    let Some(values) = attacked(attack, own, honest.get(&m.round), first, rng) else {
        return Vec::new();
    };
    let copies = attack.copies();
    (0..copies)
        .filter_map(|k| {
            // Ballot stuffing: slightly different copies (different ids),
            // numbered after the honest sequence.
            let values: Vec<f32> = values.iter().map(|v| v * (1.0 + k as f32 * 1e-4)).collect();
            // NaN cannot go through a codec; send raw f32 bytes under the f32 codec.
            let (codec, bytes) = match m.codec.encode(&values) {
                Ok(b) => (m.codec, b),
                Err(_) => (
                    tapestry_protocol::Codec::F32,
                    tapestry_protocol::f32_le_bytes(&values),
                ),
            };
            let mut forged = m.clone();
            forged.codec = codec;
            forged.payload_bytes = bytes.len() as u64;
            forged.chunk_ids = bytes
                .chunks(m.chunk_size as usize)
                .map(ContentId::of)
                .collect();
            let norm = values
                .iter()
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .sqrt() as f32;
            forged.l2_norm = if norm.is_finite() { norm } else { 0.0 };
            if copies > 1 {
                forged.seq = m.seq.saturating_mul(64).saturating_add(k as u64);
            }
            if attack.inflates() {
                forged.sample_count = u64::MAX;
            }
            Some((Signed::sign(forged, key).ok()?, bytes))
        })
        .collect()
}

/// A Byzantine node's replacement for its honest delta `own` (or `None` to
/// send nothing): `honest` holds the honest deltas of the round so far (for
/// colluding attacks), `first` the node's first delta (for replay).
fn attacked(
    attack: Attack,
    own: Vec<f32>,
    honest: Option<&Vec<Vec<f32>>>,
    first: Option<Vec<f32>>,
    rng: &mut ChaCha8Rng,
) -> Option<Vec<f32>> {
    let n = own.len();
    let peers = honest.filter(|v| !v.is_empty());
    let mean_std = |vs: &Vec<Vec<f32>>| {
        let k = vs.len() as f32;
        let mean: Vec<f32> = (0..n)
            .map(|j| vs.iter().map(|v| v[j]).sum::<f32>() / k)
            .collect();
        let std: Vec<f32> = (0..n)
            .map(|j| (vs.iter().map(|v| (v[j] - mean[j]).powi(2)).sum::<f32>() / k).sqrt())
            .collect();
        (mean, std)
    };
    Some(match attack {
        Attack::SignFlip(k) => own.iter().map(|v| -k * v).collect(),
        Attack::Scaled(k) => own.iter().map(|v| k * v).collect(),
        Attack::Gaussian(sigma) => own
            .iter()
            .map(|v| v + sigma * rng.sample::<f32, _>(StandardNormal))
            .collect(),
        Attack::Alie(z) => {
            let (mean, std) = mean_std(peers.unwrap_or(&vec![own.clone()]));
            mean.iter().zip(&std).map(|(m, s)| m - z * s).collect()
        }
        Attack::Ipm(eps) => {
            let (mean, _) = mean_std(peers.unwrap_or(&vec![own.clone()]));
            mean.iter().map(|m| -eps * m).collect()
        }
        Attack::NotANumber => vec![f32::NAN; n],
        // Re-send the first delta as this round's.
        Attack::StaleReplay => first.unwrap_or(own),
        Attack::FreeRide => return None,
        // Honest deltas; these attack the versions.
        Attack::ForgeVersion | Attack::ForgeMerge | Attack::RoundJump => own,
        Attack::BallotStuffing | Attack::Takeover => own.iter().map(|v| -9.0 * v).collect(),
        Attack::WeightInflation => own.iter().map(|v| -3.0 * v).collect(),
    })
}

/// Rounds in which nodes train (the rest is the consensus phase).
fn training_rounds(settings: &Settings) -> u64 {
    settings.scenario.rounds - settings.scenario.consensus_rounds
}

/// Centralized baseline: the same model trained on the pooled data for the
/// same number of sequential steps (one node doing every round's steps);
/// test accuracy after each round's worth.
pub fn centralized(settings: &Settings, data: &Data) -> Result<Vec<f64>, String> {
    let spec = model_spec(settings, data);
    let cfg = train_config(settings);
    let seed = settings.scenario.seed;
    let mut params = spec.init(seed);
    let mut state = InnerState::default();
    let mut curve = Vec::new();
    for r in 0..settings.scenario.rounds {
        if r < training_rounds(settings) {
            params = train_local(&spec, &params, &data.train, &cfg, &mut state, seed ^ r)
                .map_err(|e| e.to_string())?
                .0;
        }
        curve.push(f64::from(
            evaluate(&spec, &params, &data.test)
                .map_err(|e| e.to_string())?
                .1,
        ));
    }
    Ok(curve)
}

/// Local-only baseline: every node trains alone on its shard for the same
/// number of steps; the mean test accuracy after each round's worth (over a
/// sample of nodes if the scenario asks for one, over all at the end).
pub fn local_only(settings: &Settings, data: &Data) -> Result<Vec<f64>, String> {
    let s = &settings.scenario;
    let spec = model_spec(settings, data);
    let cfg = train_config(settings);
    let mut order: Vec<usize> = (0..data.shards.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(s.seed ^ 0x10ca_1000));
    if s.eval_sample > 0 {
        order.truncate(s.eval_sample);
    }
    let sampled: BTreeSet<usize> = order.into_iter().collect();
    let nodes: Vec<usize> = (0..data.shards.len()).collect();
    let curves = par::map(&nodes, par::workers(s.threads), |&i| {
        let mut params = spec.init(s.seed);
        let mut state = InnerState::default();
        let mut curve = Vec::new();
        for r in 0..s.rounds {
            if r < training_rounds(settings) {
                params = train_local(
                    &spec,
                    &params,
                    &data.shards[i],
                    &cfg,
                    &mut state,
                    (i as u64) << 32 | r,
                )
                .map_err(|e| e.to_string())?
                .0;
            }
            let last = r + 1 == s.rounds;
            curve.push(if last || sampled.contains(&i) {
                Some(f64::from(
                    evaluate(&spec, &params, &data.test)
                        .map_err(|e| e.to_string())?
                        .1,
                ))
            } else {
                None
            });
        }
        Ok::<_, String>(curve)
    })
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    Ok((0..s.rounds as usize)
        .map(|r| {
            let seen: Vec<f64> = curves.iter().filter_map(|c| c[r]).collect();
            seen.iter().sum::<f64>() / seen.len().max(1) as f64
        })
        .collect())
}

/// Writes `rounds.csv`.
pub fn write_rounds_csv(path: &Path, rounds: &[RoundStats]) -> std::io::Result<()> {
    let mut out = String::from(
        "round,accuracy_mean,accuracy_min,accuracy_max,loss_mean,consensus_distance,bytes_sent_per_node,nodes,virtual_ms\n",
    );
    for r in rounds {
        out.push_str(&format!(
            "{},{:.6},{:.6},{:.6},{:.6},{:.6e},{},{},{}\n",
            r.round,
            r.accuracy_mean,
            r.accuracy_min,
            r.accuracy_max,
            r.loss_mean,
            r.consensus_distance,
            r.bytes_sent_per_node,
            r.nodes,
            r.virtual_ms
        ));
    }
    std::fs::write(path, out)
}
