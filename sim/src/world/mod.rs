//! The simulated world: real round engines (the node's sans-IO core), a
//! virtual clock, a deterministic event queue, links with latency and loss,
//! and Byzantine nodes. Nothing here reads a clock or a socket; the same
//! scenario and seed replay the same events in the same order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use tapestry_core::attest;
use tapestry_core::data::{self, CsvOptions, Scaler};
use tapestry_core::door::DoorConfig;
use tapestry_core::engine::{Action, Engine, EngineConfig, Input, Mode, VersionRank, genesis};
use tapestry_core::heads::{self, Decision};
use tapestry_core::mixing::{self, consensus_distance};
use tapestry_core::model::{
    Evaluation, Examples, InnerOptimizer, InnerState, ModelError, ModelSpec, TrainConfig,
    evaluate_on, train_on,
};
use tapestry_core::text::Text;
use tapestry_core::verify::{self, Lineage, Plan, VersionRejection};
use tapestry_protocol::{
    ContentId, DeltaManifest, Keypair, ModelManifest, NodeId, Signed, Verified,
};

use tapestry_storage::{ChunkStore, MemoryStore};

use crate::error::SimError;
use crate::net::Net;
use crate::par;
use crate::scenario::{Attack, DataSource, Settings};
use crate::topology::Topology;

mod agreement;
mod attacks;
mod baselines;
mod churn;
mod deltas;
mod federation;
mod figures;
mod setup;

use agreement::*;
use federation::Federating;
use setup::*;

pub use baselines::{AllBaselines, TextBaselines, all_baselines, centralized, local_only};
pub use figures::{RoundStats, StoreFigures, SwarmFigures, write_rounds_csv};
pub use setup::{Data, by_file, iid_text, model_spec};

/// Held-out rows used for evaluation at most.
const MAX_TEST_ROWS: usize = 2000;

/// Virtual time one local training takes.
pub const TRAIN_MS: u64 = 50;

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
    /// The parameters of the first honest node's head at the end.
    pub head: Vec<f32>,
    /// With several regions: each region's figures at the end, on the
    /// global test set.
    pub regions: Vec<RegionFigures>,
    /// Bytes sent from one region to another, and in all.
    pub bytes_cross_region: u64,
    /// Bytes every node sent, in all.
    pub bytes_total: u64,
    /// Mix versions adopted (by any node), and foreign heads fetched across
    /// regions.
    pub federation: (u64, u64),
}

/// One region at the end of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RegionFigures {
    /// Its name.
    pub name: String,
    /// Honest nodes in it.
    pub nodes: usize,
    /// Mean and lowest accuracy (classifiers) of its honest nodes' heads on
    /// the whole test set.
    pub accuracy_mean: Option<f32>,
    /// See `accuracy_mean`.
    pub accuracy_min: Option<f32>,
    /// Language models: the mean bits per byte of its honest nodes' heads
    /// on all the held-out text, and on each part (language) of it.
    pub bits_per_byte_mean: Option<f64>,
    /// See `bits_per_byte_mean`.
    pub bits_per_byte_parts: BTreeMap<String, f64>,
    /// Consensus distance among its honest nodes.
    pub consensus_distance: f64,
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
    /// A node looks (again) for its neighbouring regions' heads of a mix
    /// round.
    Federate { node: usize, round: u64 },
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
    /// Each node's inner optimiser state, kept across rounds for AdamW.
    inner: Vec<InnerState>,
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
    /// Each node's region (all 0 with one region).
    region: Vec<usize>,
    /// Federation's bookkeeping (see `federation.rs`).
    federating: Federating,
}

/// Node `i`'s identity in a run seeded `seed` (the same in every run of
/// that seed).
fn node_keys(seed: u64, n: usize) -> Vec<Keypair> {
    (0..n)
        .map(|i| {
            let mut bytes = [0u8; 32];
            bytes[..8].copy_from_slice(&seed.to_le_bytes());
            bytes[8..16].copy_from_slice(&(i as u64).to_le_bytes());
            Keypair::from_secret_bytes(&bytes)
        })
        .collect()
}

/// Node `i`'s engine settings: the scenario's rule, codec, weighting and
/// mode; rounds close on every peer's delta or at a deadline of twenty
/// latencies (plus training time).
fn engine_config(settings: &Settings, spec: &ModelSpec, i: usize) -> EngineConfig {
    let s = &settings.scenario;
    let region = if s.regions > 1 {
        crate::scenario::region_name(Topology::region_of(i, s.nodes, s.regions))
    } else {
        "sim".into()
    };
    EngineConfig {
        model_id: "sim".into(),
        region,
        spec: spec.clone(),
        codec: settings.codec,
        chunk_size: 256 << 10,
        rule: settings.aggregator,
        outer: settings.outer,
        federation: settings.federation.clone(),
        quorum: 1.0,
        round_timeout_ms: 20 * (s.latency_ms + s.jitter_ms).max(1) + 4 * TRAIN_MS,
        door: DoorConfig {
            weighting: settings.weighting,
            ..DoorConfig::default()
        },
        mode: settings.mode,
        seed: s.seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
    }
}

/// Runs the swarm of `settings` on `data`; `progress` is called once per
/// completed round.
pub fn run_swarm(
    settings: &Settings,
    data: &Data,
    progress: &mut dyn FnMut(u64),
) -> Result<Outcome, SimError> {
    let s = &settings.scenario;
    let n = s.nodes;
    let spec = model_spec(settings, data);
    let graph = settings.topology.build(n, s.seed)?;
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed ^ 0x5157_5157);
    let mut byzantine: BTreeSet<usize> = BTreeSet::new();
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    let attack = settings.byzantine.map(|(count, attack)| {
        match settings.byzantine_region {
            Some(k) => {
                byzantine.extend((0..n).filter(|v| Topology::region_of(*v, n, s.regions) == k))
            }
            None => byzantine.extend(order.iter().take(count)),
        }
        attack
    });
    let keys = node_keys(s.seed, n);
    let index: BTreeMap<NodeId, usize> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.node_id(), i))
        .collect();
    let config = |i: usize| engine_config(settings, &spec, i);
    let engines: Vec<Engine> = (0..n)
        .map(|i| Engine::new(config(i), keys[i].clone()))
        .collect();
    let params0 = spec.init(s.seed);
    let region: Vec<usize> = (0..n)
        .map(|i| Topology::region_of(i, n, s.regions.max(1)))
        .collect();
    // One genesis per region (the same parameters, each region's name).
    let geneses: Vec<Verified<ModelManifest>> = (0..s.regions.max(1))
        .map(|k| {
            let first = region.iter().position(|r| *r == k).unwrap_or(0);
            genesis(
                &config(first),
                &params0,
                &Keypair::from_secret_bytes(&[0xee; 32]),
            )
            .ok_or(SimError::Genesis)
        })
        .collect::<Result<_, _>>()?;
    let genesis_of = |i: usize| geneses[region[i]].clone();
    let honest: Vec<usize> = (0..n).filter(|i| !byzantine.contains(i)).collect();
    let mut sample = honest.clone();
    sample.shuffle(&mut rng);
    if s.eval_sample > 0 {
        sample.truncate(s.eval_sample);
    }
    let mut net = Net::new(
        n,
        s.latency_ms,
        s.jitter_ms,
        s.loss,
        s.bandwidth_mbps,
        settings.cuts.clone(),
        s.seed ^ 0x4e45_5421,
    );
    let region_latency = if s.region_latency_ms > 0 {
        s.region_latency_ms
    } else {
        s.latency_ms
    };
    net.set_regions(region.clone(), region_latency, s.region_bandwidth_mbps);
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
        inner: vec![InnerState::default(); n],
        jobs: BTreeMap::new(),
        trained: BTreeMap::new(),
        next_job: 0,
        heads: (0..n).map(|i| (genesis_of(i), params0.clone())).collect(),
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
        versions: geneses.iter().map(|g| (g.id(), g.clone())).collect(),
        delta_manifests: BTreeMap::new(),
        version_params: geneses.iter().map(|g| (g.id(), params0.clone())).collect(),
        verified: (0..n)
            .map(|i| BTreeSet::from([genesis_of(i).id()]))
            .collect(),
        best_seen: vec![BTreeMap::new(); n],
        memo: std::cell::RefCell::new(BTreeMap::new()),
        region,
        federating: Federating::default(),
    };
    world.schedule_start(&params0);
    world.run(progress)?;
    let store = world.store_figures()?;
    let first_honest = world.honest.first().copied().unwrap_or(0);
    let head = world
        .heads
        .get(first_honest)
        .map(|(_, p)| p.clone())
        .unwrap_or_default();
    let regions = world.region_figures()?;
    Ok(Outcome {
        store,
        head,
        regions,
        bytes_cross_region: world.net.bytes_cross,
        bytes_total: world.net.bytes_sent.iter().sum(),
        federation: (world.federating.mixes, world.federating.heads_carried),
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
    /// The first events: every node meets its peers and starts from the
    /// genesis model at time 0; churn periods and cuts (noticed after a
    /// few round trips of silence, healed a latency after they end).
    fn schedule_start(&mut self, params0: &[f32]) {
        let s = &self.settings.scenario;
        let (latency, churn) = (s.latency_ms, self.settings.churn);
        for i in 0..self.engines.len() {
            for j in self.peers_of(i) {
                let input = Input::PeerJoined(self.keys[j].node_id());
                self.push(0, Event::Deliver { node: i, input });
            }
            let input = Input::Start {
                manifest: self.heads[i].0.clone(),
                params: params0.to_vec(),
            };
            self.push(0, Event::Deliver { node: i, input });
        }
        if let Some(c) = churn {
            self.push(c.period_ms, Event::Churn);
        }
        let cuts: Vec<(u64, u64)> = self
            .settings
            .cuts
            .iter()
            .map(|c| (c.from_ms, c.to_ms))
            .collect();
        for (k, (from, to)) in cuts.into_iter().enumerate() {
            let noticed = from + 10 * latency.max(1);
            if noticed < to {
                let healed = false;
                self.push(noticed, Event::CutNoticed { cut: k, healed });
            }
            let healed = true;
            self.push(to + latency, Event::CutNoticed { cut: k, healed });
        }
    }

    fn push(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.queue.insert((at, self.seq), event);
    }

    /// Who a node talks to: its whole region in broadcast mode (the graph
    /// only shapes mixing), its graph neighbours otherwise.
    fn peers_of(&self, i: usize) -> Vec<usize> {
        match self.settings.mode {
            Mode::Broadcast => (0..self.keys.len())
                .filter(|j| *j != i && self.region[*j] == self.region[i])
                .collect(),
            _ => self.graph[i].clone(),
        }
    }

    fn run(&mut self, progress: &mut dyn FnMut(u64)) -> Result<(), SimError> {
        let rounds = self.settings.scenario.rounds;
        let max_events = 200_000_000u64;
        let mut handled = 0u64;
        while let Some(((now, _), event)) = self.queue.pop_first() {
            handled += 1;
            if handled > max_events {
                return Err(SimError::EventLimit);
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
                Event::Federate { node, round } => {
                    self.gather_foreign_heads(node, now, round);
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
            if let Input::ForeignHeads(heads) = &input {
                // Taken on their regions' attestations, as the node does.
                for (m, _) in heads {
                    self.verified[i].insert(m.id());
                }
            }
            let actions = self.engines[i].handle(input, now);
            for action in actions {
                self.act(i, now, action)?;
            }
            self.maybe_federate(i, now);
            self.finish_rows(progress)?;
        }
        // Whatever is left: rounds some honest node never reached.
        self.finish_rows_at_end(progress)
    }

    /// Runs every pending training on the worker threads.
    fn run_jobs(&mut self) -> Result<(), SimError> {
        let jobs: Vec<(u64, Job)> = std::mem::take(&mut self.jobs).into_iter().collect();
        let (spec, data, cfg) = (&self.spec, self.data, &self.train_cfg);
        let keep = cfg.optimizer.keeps_state();
        let work: Vec<(&Job, InnerState)> = jobs
            .iter()
            .map(|(_, job)| {
                let state = if keep {
                    std::mem::take(&mut self.inner[job.node])
                } else {
                    InnerState::default()
                };
                (job, state)
            })
            .collect();
        let results = par::map(&work, self.threads, |(job, state)| {
            let mut state = state.clone();
            train_on(
                spec,
                &job.params,
                &data.shards[job.node],
                cfg,
                &mut state,
                job.seed,
            )
            .map(|r| (r, state))
        });
        for ((id, job), r) in jobs.iter().zip(results) {
            let ((params, report), state) = r.map_err(|source| SimError::Training {
                node: job.node,
                round: job.round,
                source,
            })?;
            if keep {
                self.inner[job.node] = state;
            }
            self.trained.insert(*id, (params, report.samples));
        }
        Ok(())
    }

    fn act(&mut self, i: usize, now: u64, action: Action) -> Result<(), SimError> {
        match action {
            Action::Train {
                round,
                version,
                params,
                seed,
            } => self.train(i, now, round, version, params, seed),
            Action::Publish { manifest, payload } => {
                self.publish(i, now, manifest, payload.bytes().into_owned())
            }
            Action::Fetch { manifest } => self.fetch(i, now, manifest)?,
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
            Action::Adopt { manifest, params } => {
                self.adopted(i, now, manifest, Arc::unwrap_or_clone(params))
            }
        }
        Ok(())
    }

    /// Node `i` trains for `round`: a job run with the others due at the
    /// same instant, done [`TRAIN_MS`] later (in the consensus phase, no
    /// training: the model comes back as it went).
    fn train(
        &mut self,
        i: usize,
        now: u64,
        round: u64,
        version: ContentId,
        params: Vec<f32>,
        seed: u64,
    ) {
        let s = &self.settings.scenario;
        let job = self.next_job;
        self.next_job += 1;
        if round >= s.rounds - s.consensus_rounds {
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
        self.note_for_federation(i, &manifest);
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
}

/// Rounds in which nodes train (the rest is the consensus phase).
fn training_rounds(settings: &Settings) -> u64 {
    settings.scenario.rounds - settings.scenario.consensus_rounds
}
