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
use tapestry_node::core::data::{self, CsvOptions, Dataset, Scaler};
use tapestry_node::core::door::DoorConfig;
use tapestry_node::core::engine::{Action, Engine, EngineConfig, Input, Mode, genesis};
use tapestry_node::core::mixing::consensus_distance;
use tapestry_node::core::model::{
    InnerOptimizer, InnerState, ModelSpec, TrainConfig, evaluate, train_local,
};
use tapestry_node::core::outer::OuterOptimizer;
use tapestry_protocol::{ContentId, DeltaManifest, Keypair, NodeId, Signed, Verified};

use crate::scenario::{Attack, DataSource, Settings};

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
    /// Messages lost in transit.
    pub messages_lost: u64,
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
            // Ten overlapping classes: hard enough that pooling matters.
            DataSource::Synthetic => data::synthetic_with_separation(s.seed, 3000, 20, 10, 0.8),
            DataSource::Csv(path) => {
                data::load_csv(path, CsvOptions::default()).map_err(|e| e.to_string())?
            }
        };
        let (mut train, mut test) = all
            .split(s.test_fraction, s.seed)
            .map_err(|e| e.to_string())?;
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

/// A node's (accuracy, loss, parameters) at the end of a round.
type NodeEval = (f32, f32, Vec<f32>);

struct Event {
    node: usize,
    input: Input,
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
        round_timeout_ms: 20 * s.latency_ms.max(1) + 4 * TRAIN_MS,
        door: DoorConfig::default(),
        mode: settings.mode,
        seed: s.seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
    };
    let mut engines: Vec<Engine> = (0..n)
        .map(|i| Engine::new(config(i), keys[i].clone()))
        .collect();
    let params0 = spec.init(s.seed);
    let genesis = genesis(
        &config(0),
        &params0,
        &Keypair::from_secret_bytes(&[0xee; 32]),
    )
    .ok_or("could not sign the initial model")?;

    let mut queue: BTreeMap<(u64, u64), Event> = BTreeMap::new();
    let mut seq = 0u64;
    let mut push = |queue: &mut BTreeMap<(u64, u64), Event>, at: u64, node: usize, input: Input| {
        seq += 1;
        queue.insert((at, seq), Event { node, input });
    };
    for (i, peers) in graph.iter().enumerate() {
        // Broadcast mode hears the whole region; the graph shapes mixing.
        let known: Vec<usize> = match settings.mode {
            Mode::Broadcast => (0..n).filter(|j| *j != i).collect(),
            _ => peers.clone(),
        };
        for j in known {
            push(&mut queue, 0, i, Input::PeerJoined(keys[j].node_id()));
        }
        push(
            &mut queue,
            0,
            i,
            Input::Start {
                manifest: genesis.clone(),
                params: params0.clone(),
            },
        );
    }

    let honest: Vec<usize> = (0..n).filter(|i| !byzantine.contains(i)).collect();
    let mut published: BTreeMap<ContentId, Vec<u8>> = BTreeMap::new();
    let mut first_delta: BTreeMap<usize, (Verified<DeltaManifest>, Vec<u8>)> = BTreeMap::new();
    let mut honest_deltas: BTreeMap<u64, Vec<Vec<f32>>> = BTreeMap::new();
    let mut published_in: BTreeMap<u64, Vec<ContentId>> = BTreeMap::new();
    let mut bytes_sent = vec![0u64; n];
    let mut at_round: BTreeMap<u64, BTreeMap<usize, NodeEval>> = BTreeMap::new();
    let mut stats = Vec::new();
    let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
    let mut lost = 0u64;
    let latency = s.latency_ms;
    let train_cfg = train_config(settings);
    let max_events = 50_000_000u64;
    let mut handled = 0u64;

    while let Some(((now, _), event)) = queue.pop_first() {
        handled += 1;
        if handled > max_events {
            return Err("the simulation did not finish (event limit reached)".into());
        }
        if engines[event.node].round() >= s.rounds
            && !matches!(
                event.input,
                Input::DeltaAnnounced(_) | Input::DeltaPayload { .. }
            )
        {
            continue;
        }
        let i = event.node;
        for action in engines[i].handle(event.input, now) {
            match action {
                Action::Train {
                    round,
                    params,
                    seed,
                } => {
                    let (trained, report) = train_local(
                        &spec,
                        &params,
                        &data.shards[i],
                        &train_cfg,
                        // Fresh optimiser state each round (local SGD).
                        &mut InnerState::default(),
                        seed,
                    )
                    .map_err(|e| e.to_string())?;
                    push(
                        &mut queue,
                        now + TRAIN_MS,
                        i,
                        Input::TrainingDone {
                            round,
                            params: trained,
                            samples: report.samples,
                        },
                    );
                }
                Action::Publish { manifest, payload } => {
                    let (manifest, payload) = match (byzantine.contains(&i), attack) {
                        (true, Some(Attack::FreeRide)) => continue,
                        (true, Some(a)) => {
                            let forged = forge(
                                a,
                                &manifest,
                                &payload,
                                &honest_deltas,
                                &first_delta,
                                i,
                                &keys[i],
                                &mut rng,
                            );
                            first_delta
                                .entry(i)
                                .or_insert_with(|| (manifest.clone(), payload.clone()));
                            match forged {
                                Some(f) => f,
                                None => continue,
                            }
                        }
                        _ => {
                            // Colluding attacks (ALIE, IPM) read the honest deltas.
                            let colluding =
                                matches!(attack, Some(Attack::Alie(_) | Attack::Ipm(_)));
                            if let (true, Ok(v)) = (
                                colluding,
                                manifest.message().codec.decode(&payload, spec.n_params()),
                            ) {
                                honest_deltas
                                    .entry(manifest.message().round)
                                    .or_default()
                                    .push(v);
                            }
                            (manifest, payload)
                        }
                    };
                    published_in
                        .entry(manifest.message().round)
                        .or_default()
                        .push(manifest.id());
                    published.insert(manifest.id(), payload);
                    for j in 0..n {
                        if j == i {
                            continue;
                        }
                        bytes_sent[i] += manifest.envelope_bytes().len() as u64;
                        if rng.gen_bool(s.loss) {
                            lost += 1;
                            continue;
                        }
                        push(
                            &mut queue,
                            now + latency,
                            j,
                            Input::DeltaAnnounced(manifest.clone()),
                        );
                    }
                }
                Action::Fetch { manifest } => {
                    let author = index.get(&manifest.message().author).copied();
                    if let (Some(payload), Some(a)) = (published.get(&manifest.id()), author) {
                        bytes_sent[a] += payload.len() as u64;
                        push(
                            &mut queue,
                            now + 2 * latency,
                            i,
                            Input::DeltaPayload {
                                id: manifest.id(),
                                payload: payload.clone(),
                            },
                        );
                    }
                }
                Action::SendToNeighbours {
                    round,
                    params,
                    degree,
                } => {
                    for &j in &graph[i] {
                        bytes_sent[i] += params.len() as u64 * 4;
                        if rng.gen_bool(s.loss) {
                            lost += 1;
                            continue;
                        }
                        let input = Input::NeighbourModel {
                            from: keys[i].node_id(),
                            round,
                            params: params.clone(),
                            degree,
                        };
                        push(&mut queue, now + latency, j, input);
                    }
                }
                Action::PushShare { to, x, w } => {
                    for peer in to {
                        let Some(&j) = index.get(&peer) else { continue };
                        bytes_sent[i] += x.len() as u64 * 4 + 8;
                        if rng.gen_bool(s.loss) {
                            lost += 1;
                            continue;
                        }
                        push(
                            &mut queue,
                            now + latency,
                            j,
                            Input::PushShare { x: x.clone(), w },
                        );
                    }
                }
                Action::SetTimer { at_ms } => push(&mut queue, at_ms, i, Input::Tick),
                Action::Penalise(r) => {
                    *rejected.entry(r.reason.label().to_owned()).or_default() += 1
                }
                Action::Adopt { manifest, params } => {
                    // Forget payloads no node can still use (older than the
                    // staleness window of the slowest node), so memory stays
                    // flat over long runs.
                    let slowest = engines.iter().map(Engine::round).min().unwrap_or(0);
                    let horizon = slowest.saturating_sub(DoorConfig::default().staleness + 1);
                    while let Some(entry) = published_in.first_entry() {
                        if *entry.key() >= horizon {
                            break;
                        }
                        for id in entry.remove() {
                            published.remove(&id);
                        }
                    }
                    honest_deltas.retain(|r, _| *r >= horizon);
                    if byzantine.contains(&i) {
                        continue;
                    }
                    let round = manifest.message().round;
                    let (loss, acc) =
                        evaluate(&spec, &params, &data.test).map_err(|e| e.to_string())?;
                    let entry = at_round.entry(round).or_default();
                    entry.insert(i, (acc, loss, params));
                    if entry.len() == honest.len() {
                        let rows = at_round.remove(&round).unwrap_or_default();
                        let accs: Vec<f64> = rows.values().map(|(a, _, _)| f64::from(*a)).collect();
                        let losses: Vec<f64> =
                            rows.values().map(|(_, l, _)| f64::from(*l)).collect();
                        let models: Vec<Vec<f32>> = rows.into_values().map(|(_, _, p)| p).collect();
                        stats.push(RoundStats {
                            round,
                            accuracy_mean: accs.iter().sum::<f64>() / accs.len() as f64,
                            accuracy_min: accs.iter().copied().fold(f64::MAX, f64::min),
                            accuracy_max: accs.iter().copied().fold(f64::MIN, f64::max),
                            loss_mean: losses.iter().sum::<f64>() / losses.len() as f64,
                            consensus_distance: consensus_distance(&models),
                            bytes_sent_per_node: bytes_sent.iter().sum::<u64>() / n as u64,
                        });
                        progress(round);
                    }
                }
            }
        }
    }
    Ok(Outcome {
        rounds: stats,
        honest_nodes: honest.len(),
        rejected,
        messages_lost: lost,
    })
}

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
) -> Option<(Verified<DeltaManifest>, Vec<u8>)> {
    let m = manifest.message();
    let n: usize = m
        .layout
        .iter()
        .map(|t| t.shape.iter().product::<u64>() as usize)
        .sum();
    let own = m.codec.decode(payload, n).ok()?;
    let peers = honest.get(&m.round).filter(|v| !v.is_empty());
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
    let values: Vec<f32> = match attack {
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
        Attack::StaleReplay => match first.get(&node) {
            // Re-sign the first delta's payload as this round's.
            Some((first_m, first_p)) => first_m.message().codec.decode(first_p, n).ok()?,
            None => own,
        },
        Attack::FreeRide => return None,
    };
    // NaN cannot go through a codec; send raw f32 bytes under the f32 codec.
    let (codec, bytes) = match m.codec.encode(&values) {
        Ok(b) => (m.codec, b),
        Err(_) => (
            tapestry_protocol::Codec::F32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
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
    Some((Signed::sign(forged, key).ok()?, bytes))
}

/// Centralized baseline: the same model trained on the pooled data for the
/// same number of sequential steps.
pub fn centralized(settings: &Settings, data: &Data) -> Result<f64, String> {
    let spec = model_spec(settings, data);
    let cfg = TrainConfig {
        local_steps: settings.scenario.local_steps * settings.scenario.rounds as usize,
        ..train_config(settings)
    };
    let (p, _) = train_local(
        &spec,
        &spec.init(settings.scenario.seed),
        &data.train,
        &cfg,
        &mut InnerState::default(),
        settings.scenario.seed,
    )
    .map_err(|e| e.to_string())?;
    Ok(f64::from(
        evaluate(&spec, &p, &data.test)
            .map_err(|e| e.to_string())?
            .1,
    ))
}

/// Local-only baseline: every node trains alone on its shard for the same
/// number of steps; the mean of their accuracies.
pub fn local_only(settings: &Settings, data: &Data) -> Result<f64, String> {
    let spec = model_spec(settings, data);
    let cfg = TrainConfig {
        local_steps: settings.scenario.local_steps * settings.scenario.rounds as usize,
        ..train_config(settings)
    };
    let mut sum = 0.0;
    for (i, shard) in data.shards.iter().enumerate() {
        let (p, _) = train_local(
            &spec,
            &spec.init(settings.scenario.seed),
            shard,
            &cfg,
            &mut InnerState::default(),
            i as u64,
        )
        .map_err(|e| e.to_string())?;
        sum += f64::from(
            evaluate(&spec, &p, &data.test)
                .map_err(|e| e.to_string())?
                .1,
        );
    }
    Ok(sum / data.shards.len() as f64)
}

/// Writes `rounds.csv`.
pub fn write_rounds_csv(path: &Path, rounds: &[RoundStats]) -> std::io::Result<()> {
    let mut out = String::from(
        "round,accuracy_mean,accuracy_min,accuracy_max,loss_mean,consensus_distance,bytes_sent_per_node\n",
    );
    for r in rounds {
        out.push_str(&format!(
            "{},{:.6},{:.6},{:.6},{:.6},{:.6e},{}\n",
            r.round,
            r.accuracy_mean,
            r.accuracy_min,
            r.accuracy_max,
            r.loss_mean,
            r.consensus_distance,
            r.bytes_sent_per_node
        ));
    }
    std::fs::write(path, out)
}
