//! Round engines wired through an in-memory message queue, training on
//! digits shards: region broadcast against a centralized baseline, attacks
//! against robust rules, bad deltas at the door, determinism and catch-up.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use tapestry_core::aggregate::AggregationRule;
use tapestry_core::data::{self, Dataset, Partition};
use tapestry_core::door::{DoorConfig, Rejection};
use tapestry_core::engine::{Action, Engine, EngineConfig, Input, Mode, genesis};
use tapestry_core::mixing::consensus_distance;
use tapestry_core::model::*;
use tapestry_protocol::*;
use tapestry_testkit::sign;
use tapestry_testkit::swarm::{Corrupt, Swarm};

fn digits() -> (Dataset, Dataset) {
    tapestry_testkit::digits_split()
}

const H: usize = 10;
const BATCH: usize = 32;

fn train_config() -> TrainConfig {
    tapestry_testkit::sgd(H, BATCH, 0.05)
}

fn spec() -> ModelSpec {
    tapestry_testkit::logistic()
}

fn engine_config(rule: AggregationRule, door: DoorConfig, seed: u64) -> EngineConfig {
    tapestry_testkit::engine_config(rule, door, seed)
}

/// `shards.len()` nodes in a broadcast region, training [`train_config`].
fn net(shards: Vec<Dataset>, rule: AggregationRule, door: DoorConfig) -> Swarm {
    Swarm::new(engine_config(rule, door, 0), train_config(), shards)
}

/// An attacker replaces every delta it publishes by −10× itself.
fn corrupt(
    key: &Keypair,
    manifest: &Verified<DeltaManifest>,
    payload: &[u8],
) -> (Verified<DeltaManifest>, Vec<u8>) {
    let m = manifest.message();
    let n = spec().n_params();
    let evil: Vec<f32> = m
        .codec
        .decode(payload, n)
        .unwrap()
        .iter()
        .map(|v| -10.0 * v)
        .collect();
    let bytes = m.codec.encode(&evil).unwrap();
    let mut forged = m.clone();
    forged.chunk_ids = bytes
        .chunks(m.chunk_size as usize)
        .map(ContentId::of)
        .collect();
    forged.l2_norm = sign::l2_norm(&evil);
    (sign::signed(forged, key), bytes)
}

/// `n` nodes in `mode`, each starting from its own random model (seeded by
/// `init_base + i`) and knowing the peers in `neighbours`.
fn fresh_models_net(
    train: &Dataset,
    mode: Mode,
    local_steps: usize,
    neighbours: Vec<Vec<usize>>,
    init_base: u64,
) -> Swarm {
    let n = neighbours.len();
    let mut net = net(
        shards(train, n, Partition::Iid),
        AggregationRule::Mean,
        DoorConfig::default(),
    );
    net.queue.clear();
    net.train.local_steps = local_steps;
    net.neighbours = neighbours;
    for i in 0..n {
        let mut cfg = engine_config(AggregationRule::Mean, DoorConfig::default(), 100 + i as u64);
        cfg.mode = mode;
        net.engines[i] = Engine::new(cfg.clone(), net.keys[i].clone());
        for j in net.neighbours[i].clone() {
            let peer = net.keys[j].node_id();
            net.queue.push_back((i, Input::PeerJoined(peer)));
        }
        let params = spec().init(init_base + i as u64);
        let manifest = genesis(&cfg, &params, &net.keys[i]).unwrap();
        net.queue.push_back((i, Input::Start { manifest, params }));
    }
    net
}

/// A ring of `n` nodes in neighbour-mixing mode.
fn ring_mixing(train: &Dataset, n: usize, local_steps: usize) -> Swarm {
    let ring = (0..n).map(|i| vec![(i + n - 1) % n, (i + 1) % n]).collect();
    fresh_models_net(train, Mode::Mixing, local_steps, ring, 1000)
}

fn shards(train: &Dataset, nodes: usize, how: Partition) -> Vec<Dataset> {
    data::partition(train, nodes, how, 7)
        .unwrap()
        .iter()
        .map(|rows| train.subset(rows))
        .collect()
}

fn centralized(train: &Dataset, test: &Dataset, rounds: u64) -> f32 {
    let config = TrainConfig {
        local_steps: H * rounds as usize,
        ..train_config()
    };
    let (p, _) = train_local(
        &spec(),
        &spec().init(42),
        train,
        &config,
        &mut InnerState::default(),
        1,
    )
    .unwrap();
    evaluate(&spec(), &p, test).unwrap().1
}

const ROUNDS: u64 = 30;

#[test]
fn region_broadcast_on_label_skewed_shards_matches_centralized() {
    let (train, test) = digits();
    let mut net = net(
        shards(&train, 8, Partition::Dirichlet(0.5)),
        AggregationRule::Mean,
        DoorConfig::default(),
    );
    net.run(ROUNDS);
    let acc = net.accuracies(&test);
    let mean = acc.iter().sum::<f32>() / acc.len() as f32;
    let spread =
        acc.iter().copied().fold(f32::MIN, f32::max) - acc.iter().copied().fold(f32::MAX, f32::min);
    let central = centralized(&train, &test, ROUNDS);
    eprintln!(
        "8 nodes, Dirichlet(0.5), {ROUNDS} rounds × {H} steps: mean accuracy {mean:.4} (spread {spread:.4}); centralized {central:.4}"
    );
    assert!(mean >= 0.97 * central, "{mean} < 0.97 × {central}");
    assert!(spread <= 0.01, "spread {spread}");
    assert!(net.penalties.is_empty(), "{:?}", net.penalties);
    // Every node holds bit-identical parameters: the same chunk ids.
    let heads: Vec<&ModelManifest> = net
        .adopted
        .iter()
        .map(|v| v.last().unwrap().message())
        .collect();
    assert!(
        heads
            .iter()
            .all(|h| h.chunk_ids == heads[0].chunk_ids && h.round == ROUNDS)
    );
    // Lineage: each version names its parent and the 8 deltas that made it.
    let versions = &net.adopted[0];
    for pair in versions.windows(2) {
        assert_eq!(pair[1].message().parents, vec![pair[0].id()]);
        assert_eq!(pair[1].message().deltas.len(), 8);
    }
}

fn attacked(rule: AggregationRule, attack: bool) -> f32 {
    let (train, test) = digits();
    // The door's norm check would stop a ×10 delta by itself; switch it off
    // so that the aggregation rule alone faces the attack.
    let door = DoorConfig {
        norm_multiple: f32::INFINITY,
        ..DoorConfig::default()
    };
    let attackers = if attack {
        BTreeSet::from([2, 5])
    } else {
        BTreeSet::new()
    };
    let mut net = net(shards(&train, 8, Partition::Iid), rule, door);
    net.attackers = attackers.clone();
    net.corrupt = Some(corrupt);
    net.run(20);
    let acc = net.accuracies(&test);
    let honest: Vec<f32> = acc
        .iter()
        .enumerate()
        .filter(|(i, _)| !attackers.contains(i))
        .map(|(_, a)| *a)
        .collect();
    honest.iter().sum::<f32>() / honest.len() as f32
}

#[test]
fn robust_rules_withstand_two_sign_flipping_scaling_attackers_of_eight() {
    let clean = attacked(AggregationRule::Mean, false);
    let mean = attacked(AggregationRule::Mean, true);
    let trimmed = attacked(AggregationRule::TrimmedMean { beta: 0.25 }, true);
    let clipped = attacked(
        AggregationRule::CenteredClip {
            radius: 0.5,
            iterations: 3,
        },
        true,
    );
    eprintln!(
        "attack-free {clean:.4}; under attack: mean {mean:.4}, trimmed mean {trimmed:.4}, clipping {clipped:.4}"
    );
    assert!(
        mean < 0.5 * clean,
        "the attack must break the plain mean ({mean} vs {clean})"
    );
    assert!(trimmed >= 0.95 * clean, "trimmed mean {trimmed} vs {clean}");
    assert!(clipped >= 0.95 * clean, "clipping {clipped} vs {clean}");
}

#[test]
fn the_same_inputs_give_byte_identical_versions() {
    let (train, _) = digits();
    let run = || {
        let mut net = net(
            shards(&train, 4, Partition::Dirichlet(0.5)),
            AggregationRule::Mean,
            DoorConfig::default(),
        );
        net.run(5);
        net.adopted
            .iter()
            .map(|v| v.iter().map(|m| m.id()).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    };
    let a = run();
    assert_eq!(a.iter().map(Vec::len).min(), Some(5));
    assert_eq!(a, run());
}

#[test]
fn deltas_read_from_where_they_are_kept_give_the_same_versions() {
    // The shell tells each engine its deltas are stored; the engine drops
    // its copy and reads them from there when a round closes. The same
    // versions, byte for byte; and when the store fails a read, the engine
    // asks for the delta again and closes the round on it.
    let (train, _) = digits();
    let run = |stored: Option<bool>| {
        let mut net = net(
            shards(&train, 4, Partition::Dirichlet(0.5)),
            AggregationRule::Mean,
            DoorConfig::default(),
        );
        net.stored = stored;
        net.run(5);
        net.adopted
            .iter()
            .map(|v| v.iter().map(|m| m.id()).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    };
    let plain = run(None);
    assert_eq!(plain.iter().map(Vec::len).min(), Some(5));
    assert_eq!(run(Some(false)), plain, "read from the store");
    assert_eq!(run(Some(true)), plain, "a failed read, fetched again");
}

/// An attacker that sends −10× its delta and declares the honest norm.
fn lying(
    key: &Keypair,
    manifest: &Verified<DeltaManifest>,
    payload: &[u8],
) -> (Verified<DeltaManifest>, Vec<u8>) {
    let (forged, bytes) = corrupt(key, manifest, payload);
    let mut m = forged.message().clone();
    m.l2_norm = manifest.message().l2_norm;
    (sign::signed(m, key), bytes)
}

#[test]
fn deltas_judged_where_they_were_kept_as_they_arrived_meet_the_same_verdicts() {
    // The shell stores a fetched delta's chunks as they arrive and the door
    // judges it from there: the same versions, byte for byte, and the same
    // penalties for the same attackers (a norm over the door's limit, and a
    // norm that lies), as when the payload is handed over whole.
    let (train, _) = digits();
    let run = |attack: Corrupt, arrive_stored: bool| {
        let mut net = net(
            shards(&train, 6, Partition::Iid),
            AggregationRule::Mean,
            DoorConfig::default(),
        );
        net.attackers = BTreeSet::from([1, 4]);
        net.corrupt = Some(attack);
        net.arrive_stored = arrive_stored;
        net.run(6);
        let ids: Vec<Vec<ContentId>> = net
            .adopted
            .iter()
            .map(|v| v.iter().map(|m| m.id()).collect())
            .collect();
        let mut penalties: Vec<String> = net
            .penalties
            .iter()
            .map(|(i, r)| format!("{i} {r:?}"))
            .collect();
        penalties.sort();
        (ids, penalties)
    };
    for (name, attack) in [("over the limit", corrupt as Corrupt), ("lying", lying)] {
        let whole = run(attack, false);
        assert!(
            whole.0.iter().all(|v| v.len() >= 6),
            "{name}: every node went six rounds"
        );
        assert!(!whole.1.is_empty(), "{name}: the attackers were penalised");
        assert_eq!(run(attack, true), whole, "{name}");
    }
}

#[test]
fn nan_and_misshapen_deltas_are_rejected_with_their_reasons() {
    let (train, _) = digits();
    let mut net = net(
        shards(&train, 2, Partition::Iid),
        AggregationRule::Mean,
        DoorConfig::default(),
    );
    // Let both start round 0.
    while let Some((i, input)) = net.queue.pop_front() {
        if matches!(input, Input::Start { .. } | Input::PeerJoined(_)) {
            net.step(i, input);
        } else {
            net.queue.push_front((i, input));
            break;
        }
    }
    let evil = Keypair::from_secret_bytes(&[66; 32]);
    let n = spec().n_params();
    let make = |values: Vec<f32>, layout: Vec<TensorSpec>, seq: u64| {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let m = DeltaManifest {
            model_id: "digits".into(),
            region: "test".into(),
            round: 0,
            base_version: ContentId::of(b"x"),
            author: evil.node_id(),
            seq,
            codec: Codec::F32,
            layout,
            payload_bytes: bytes.len() as u64,
            chunk_size: 16 << 10,
            chunk_ids: bytes.chunks(16 << 10).map(ContentId::of).collect(),
            sample_count: 10,
            l2_norm: 0.0,
            created_unix_ms: 0,
        };
        (Signed::sign(m, &evil).unwrap(), bytes)
    };
    let mut nan = vec![0.0f32; n];
    nan[17] = f32::NAN;
    let (m, p) = make(nan, spec().layout(), 1);
    // Announced, fetched (the harness serves the payload), then refused.
    net.lineage.add_delta(&m, &p);
    net.step(0, Input::DeltaAnnounced(m));
    while let Some((i, input)) = net.queue.pop_front() {
        if matches!(input, Input::DeltaPayload { .. }) {
            net.step(i, input);
        }
    }
    let wrong = vec![TensorSpec {
        name: "layer0.weight".into(),
        shape: vec![10, 63],
        dtype: DType::F32,
    }];
    let (m, _) = make(vec![0.0; 630], wrong, 2);
    net.step(0, Input::DeltaAnnounced(m));
    let reasons: Vec<&Rejection> = net.penalties.iter().map(|(_, r)| r).collect();
    assert!(
        matches!(
            reasons[..],
            [
                Rejection::NonFinite { index: 17 },
                Rejection::LayoutMismatch { .. }
            ]
        ),
        "{reasons:?}"
    );
}

#[test]
fn a_late_joiner_catches_up_by_adopting_a_newer_version() {
    let (train, test) = digits();
    let mut net = net(
        shards(&train, 4, Partition::Iid),
        AggregationRule::Mean,
        DoorConfig::default(),
    );
    net.run(10);
    // A fresh engine starts from genesis, then is offered a peer's version.
    let cfg = engine_config(AggregationRule::Mean, DoorConfig::default(), 7);
    let key = Keypair::from_secret_bytes(&[77; 32]);
    let mut late = Engine::new(cfg.clone(), key);
    let params = spec().init(42);
    let g = genesis(&cfg, &params, &Keypair::from_secret_bytes(&[99; 32])).unwrap();
    late.handle(
        Input::Start {
            manifest: g,
            params,
        },
        0,
    );
    assert_eq!(late.round(), 0);
    let peer = &net.engines[0];
    let version = sign::version(
        &cfg,
        &net.keys[0],
        peer.round(),
        peer.params(),
        vec![],
        vec![],
    );
    let actions = late.handle(
        Input::ModelOffered {
            manifest: version.clone(),
            params: peer.params().to_vec().into(),
            previous: None,
            authors: 0,
            used: vec![],
            fork: None,
        },
        1,
    );
    assert_eq!(late.round(), peer.round());
    assert_eq!(late.version(), Some(version.id()));
    // It is announced as the new head, then the next round starts.
    assert!(
        matches!(actions.first(), Some(Action::Adopt { manifest, .. }) if manifest.id() == version.id())
    );
    assert!(matches!(actions.get(1), Some(Action::Train { round, .. }) if *round == peer.round()));
    let (_, acc) = evaluate(&spec(), late.params(), &test).unwrap();
    assert!(acc > 0.85, "adopted model accuracy {acc}");
    // An older version is not adopted.
    late.handle(
        Input::ModelOffered {
            manifest: version,
            params: vec![0.0; spec().n_params()].into(),
            previous: None,
            authors: 0,
            used: vec![],
            fork: None,
        },
        2,
    );
    assert_eq!(late.params(), peer.params());
}

#[test]
fn neighbour_mixing_on_a_ring_of_16_reaches_consensus() {
    let (train, _) = digits();
    // Pure mixing (no training): 16 different models, a ring, Metropolis
    // weights. The consensus distance must shrink every round.
    let rounds = 200;
    let mut net = ring_mixing(&train, 16, 0);
    net.run(rounds);
    let distances: Vec<f64> = (1..=rounds)
        .map(|r| {
            let models: Vec<Vec<f32>> = net.snapshots[&r].values().cloned().collect();
            assert_eq!(models.len(), 16, "round {r}");
            consensus_distance(&models)
        })
        .collect();
    for (r, w) in distances.windows(2).enumerate() {
        assert!(w[1] < w[0], "round {}: {} !< {}", r + 2, w[1], w[0]);
    }
    let last = *distances.last().unwrap();
    eprintln!(
        "ring of 16, mixing only: consensus distance {:.3e} after 1 round, {last:.3e} after {rounds}",
        distances[0]
    );
    assert!(last < 1e-3, "{last}");
}

#[test]
fn neighbour_mixing_with_training_learns_and_stays_close() {
    let (train, test) = digits();
    let rounds = 40;
    let mut net = ring_mixing(&train, 16, H);
    net.run(rounds);
    let distance =
        |r: u64| consensus_distance(&net.snapshots[&r].values().cloned().collect::<Vec<_>>());
    let (first, last) = (distance(1), distance(rounds));
    let acc = net.accuracies(&test);
    let mean = acc.iter().sum::<f32>() / acc.len() as f32;
    let worst = acc.iter().copied().fold(f32::MAX, f32::min);
    eprintln!(
        "ring of 16, training + mixing, {rounds} rounds: accuracy mean {mean:.4}, worst {worst:.4}; \
         consensus distance {first:.3e} after 1 round, {last:.3e} after {rounds}"
    );
    // Training keeps pulling the nodes apart, so they do not agree exactly
    // (that is what region broadcast or mixing-only rounds are for), but the
    // ring keeps them close and every node learns.
    assert!(worst >= 0.9, "{acc:?}");
    assert!(last < first / 4.0 && last < 0.2, "{first} -> {last}");
}

#[test]
fn rounds_close_at_the_deadline_and_late_deltas_are_still_used() {
    let (train, _) = digits();
    let mut net = net(
        shards(&train, 4, Partition::Iid),
        AggregationRule::Mean,
        DoorConfig::default(),
    );
    net.slow.insert(3);
    net.run(6);
    assert!(net.now > 0, "rounds closed at their deadline");
    // Node 0's versions include node 3's deltas one round late (within the
    // staleness window of 2).
    let slow_author = net.keys[3].node_id();
    let late_uses = net.adopted[0]
        .iter()
        .flat_map(|v| {
            v.message()
                .deltas
                .iter()
                .map(move |d| (v.message().round, *d))
        })
        .filter(|(round, d)| {
            let m = net.lineage.deltas[d].message();
            m.author == slow_author && m.round + 1 < *round
        })
        .count();
    assert!(late_uses >= 3, "{late_uses} late deltas used");
    assert!(net.penalties.is_empty(), "{:?}", net.penalties);
}

#[test]
fn a_quorum_below_one_closes_rounds_without_waiting_for_a_silent_peer() {
    let (train, _) = digits();
    let mut net = net(
        shards(&train, 4, Partition::Iid),
        AggregationRule::Mean,
        DoorConfig::default(),
    );
    net.silent.insert(3);
    // Quorum 0.75 of 4: three deltas close a round.
    for i in 0..4 {
        let mut cfg = engine_config(AggregationRule::Mean, DoorConfig::default(), 100 + i as u64);
        cfg.quorum = 0.75;
        net.engines[i] = Engine::new(cfg, net.keys[i].clone());
    }
    net.run(5);
    assert_eq!(net.now, 0, "no round waited for its deadline");
    assert!(
        net.adopted[0]
            .iter()
            .skip(1)
            .all(|v| v.message().deltas.len() == 3)
    );
}

#[test]
fn a_peer_that_only_listens_holds_up_only_the_round_it_joined_in() {
    let (train, _) = digits();
    let mut net = net(
        shards(&train, 4, Partition::Iid),
        AggregationRule::Mean,
        DoorConfig::default(),
    );
    // Node 3 is subscribed but no delta of its ever arrives (a listener).
    net.silent.insert(3);
    net.run(6);
    // The rounds it was new in waited for it until their deadline (10 s);
    // after that the other three closed rounds on their own deltas (the
    // swarm's clock moves only when a round waits). Counting it as a
    // member for good, every round waited: 60 s for six.
    assert_eq!(net.now, 10_000, "rounds waited for the listener");
    assert!(
        net.adopted[0]
            .iter()
            .skip(1)
            .all(|v| v.message().deltas.len() == 3)
    );
}

#[test]
fn a_node_back_from_a_restart_waits_for_the_peers_it_heard_while_behind() {
    let (train, _) = digits();
    let mut net = net(
        shards(&train, 4, Partition::Iid),
        AggregationRule::Mean,
        DoorConfig::default(),
    );
    net.run(8);
    // Node 0 starts again from the genesis, its peers joining at once.
    let cfg = engine_config(AggregationRule::Mean, DoorConfig::default(), 100);
    let mut back = Engine::new(cfg, net.keys[0].clone());
    for k in &net.keys[1..] {
        back.handle(Input::PeerJoined(k.node_id()), 0);
    }
    let (g, params) = net.genesis.clone();
    back.handle(
        Input::Start {
            manifest: g,
            params,
        },
        0,
    );
    // While it is at round 0 its peers' deltas of round 7 arrive: too far
    // ahead for the door, but signed proof that their authors take part.
    let ahead: Vec<_> = net
        .lineage
        .deltas
        .values()
        .filter(|d| d.message().round == 7 && d.message().author != net.keys[0].node_id())
        .cloned()
        .collect();
    assert_eq!(ahead.len(), 3);
    for d in ahead {
        let refused = back.handle(Input::DeltaAnnounced(d), 1_000);
        assert!(
            refused
                .iter()
                .any(|a| matches!(a, Action::Penalise(r) if r.reason.label() == "from_the_future")),
            "{refused:?}"
        );
    }
    // Past its peers' first round timeout, it catches up on a peer's version.
    let version = net.adopted[1].last().unwrap().clone();
    let round = version.message().round;
    let after = back.handle(
        Input::ModelOffered {
            manifest: version.clone(),
            params: net.snapshots[&round][&1].clone().into(),
            previous: None,
            authors: 3,
            used: vec![],
            fork: None,
        },
        12_000,
    );
    let Some(Action::Train {
        version: base,
        params,
        ..
    }) = after
        .into_iter()
        .find(|a| matches!(a, Action::Train { .. }))
    else {
        panic!("no training after catching up");
    };
    // Its own delta alone does not close the round: the peers it heard
    // are waited for (counting only peers that sent an admitted delta, it
    // closed on its own and went off on a head of its own).
    let trained = back.handle(
        Input::TrainingDone {
            round,
            version: base,
            params,
            samples: 10,
        },
        12_100,
    );
    assert!(
        !trained.iter().any(|a| matches!(a, Action::Adopt { .. })),
        "it closed the round alone: {trained:?}"
    );
    assert_eq!(back.round(), round);
}

/// `n` nodes that all know each other, in push-sum mode (fanout 2), with
/// `loss_percent` of shares lost.
fn push_sum_net(train: &Dataset, n: usize, local_steps: usize, loss_percent: u64) -> Swarm {
    let everyone = (0..n)
        .map(|i| (0..n).filter(|j| *j != i).collect())
        .collect();
    let mut net = fresh_models_net(
        train,
        Mode::PushSum { fanout: 2 },
        local_steps,
        everyone,
        2000,
    );
    net.loss_percent = loss_percent;
    net
}

#[test]
fn push_sum_converges_with_a_fifth_of_messages_dropped() {
    let (train, test) = digits();
    let rounds = 100;
    let mut net = push_sum_net(&train, 16, 0, 20);
    net.run(rounds);
    let distance =
        |r: u64| consensus_distance(&net.snapshots[&r].values().cloned().collect::<Vec<_>>());
    let (first, last) = (distance(1), distance(rounds));
    let (sent, lost) = net.shares;
    eprintln!(
        "push-sum, 16 nodes, {lost} of {sent} shares lost: consensus distance {first:.3e} -> {last:.3e}"
    );
    assert!(lost * 100 >= sent * 15, "{lost} of {sent}");
    assert!(last < 1e-3, "{last}");

    // With training as well, every node learns (from 16 different random
    // starting models).
    let mut net = push_sum_net(&train, 16, H, 20);
    net.run(60);
    let acc = net.accuracies(&test);
    let worst = acc.iter().copied().fold(f32::MAX, f32::min);
    eprintln!("push-sum with training, 60 rounds, 20 % loss: worst accuracy {worst:.4}");
    assert!(worst >= 0.9, "{acc:?}");
}

#[test]
fn diverged_training_contributes_no_step_and_waiting_does_not_pile_up_timers() {
    for mode in [Mode::Broadcast, Mode::Mixing, Mode::PushSum { fanout: 1 }] {
        let mut cfg = engine_config(AggregationRule::Mean, DoorConfig::default(), 1);
        cfg.mode = mode;
        cfg.round_timeout_ms = 100;
        let params = spec().init(1);
        let g = genesis(&cfg, &params, &Keypair::from_secret_bytes(&[99; 32])).unwrap();
        let mut e = Engine::new(cfg, Keypair::from_secret_bytes(&[1; 32]));
        e.handle(
            Input::PeerJoined(Keypair::from_secret_bytes(&[2; 32]).node_id()),
            0,
        );
        let version = g.id();
        e.handle(
            Input::Start {
                manifest: g,
                params: params.clone(),
            },
            0,
        );
        let out = e.handle(
            Input::TrainingDone {
                round: 0,
                version,
                params: vec![f32::NAN; params.len()],
                samples: 10,
            },
            10,
        );
        // No NaN leaves the node; the round is not stuck on it.
        for a in &out {
            match a {
                Action::SendToNeighbours { params: p, .. } => assert_eq!(p, &params, "{mode:?}"),
                Action::PushShare { x, .. } => assert!(x.iter().all(|v| v.is_finite())),
                Action::Publish { manifest, .. } => {
                    assert_eq!(manifest.message().l2_norm, 0.0, "{mode:?}: a zero step")
                }
                _ => {}
            }
        }
        assert!(e.params().iter().all(|v| v.is_finite()), "{mode:?}");
        // Past the deadline with the peer silent: many wake-ups and inputs
        // arm one timer per timeout, not one per input.
        let mut timers = 0;
        for t in 100..400 {
            let out = e.handle(Input::Tick, t);
            timers += out
                .iter()
                .filter(|a| matches!(a, Action::SetTimer { .. }))
                .count();
        }
        assert!(timers <= 4, "{mode:?}: {timers} timers armed");
    }
}

#[test]
fn a_mixing_node_resumes_from_a_combined_model_and_ignores_a_far_future_neighbour() {
    let params = spec().init(1);
    let later: Vec<f32> = params.iter().map(|v| v + 0.5).collect();
    let neighbour = Keypair::from_secret_bytes(&[2; 32]).node_id();
    let started = |mode: Mode| {
        let mut cfg = engine_config(AggregationRule::Mean, DoorConfig::default(), 1);
        cfg.mode = mode;
        let g = genesis(&cfg, &params, &Keypair::from_secret_bytes(&[99; 32])).unwrap();
        let mut e = Engine::new(cfg, Keypair::from_secret_bytes(&[1; 32]));
        e.handle(Input::PeerJoined(neighbour), 0);
        e.handle(
            Input::Start {
                manifest: g.clone(),
                params: params.clone(),
            },
            0,
        );
        (e, g.id())
    };
    // Mixing: the combined model becomes this node's own version of the
    // round reached, child of its old one, and training starts from it.
    let (mut e, genesis_id) = started(Mode::Mixing);
    let out = e.handle(
        Input::CaughtUp {
            round: 30,
            params: later.clone(),
        },
        5,
    );
    let adopted = out.iter().find_map(|a| match a {
        Action::Adopt { manifest, params } => Some((manifest.clone(), params.clone())),
        _ => None,
    });
    let (m, p) = adopted.expect("the caught-up model is adopted");
    assert_eq!(
        (m.message().round, &m.message().parents),
        (30, &vec![genesis_id])
    );
    assert_eq!(
        m.message().author,
        Keypair::from_secret_bytes(&[1; 32]).node_id()
    );
    assert_eq!(*p, later);
    assert_eq!(e.round(), 30);
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Train { round: 30, .. }))
    );
    // Not ahead, or misshapen: ignored.
    for (round, p) in [
        (30, later.clone()),
        (31, vec![0.0; 3]),
        (31, vec![f32::NAN; later.len()]),
    ] {
        assert!(e.handle(Input::CaughtUp { round, params: p }, 6).is_empty());
    }
    assert_eq!(e.round(), 30);
    // A neighbour claiming a round far beyond the look-ahead is penalised
    // and its model never stands in for this round.
    let out = e.handle(
        Input::NeighbourModel {
            from: neighbour,
            round: u64::MAX - 1,
            params: later.clone(),
            degree: 1,
        },
        7,
    );
    assert!(
        out.iter().any(|a| matches!(
            a,
            Action::Penalise(r) if r.reason.label() == "from_the_future"
        )),
        "{out:?}"
    );
    // Broadcast mode takes only verified versions, never a bare model.
    let (mut b, _) = started(Mode::Broadcast);
    assert!(
        b.handle(
            Input::CaughtUp {
                round: 30,
                params: later
            },
            5
        )
        .is_empty()
    );
    assert_eq!(b.round(), 0);
}

#[test]
fn two_branches_merge_into_one_version_whoever_merges_them() {
    // Two engines went apart (a partition): each has its own head. Each is
    // offered the other's head as a branch to merge; both end on the same
    // parameters, with both heads as parents, in the later round, and the
    // merge outranks plain versions of its round.
    let cfg = engine_config(AggregationRule::Mean, DoorConfig::default(), 7);
    let n = spec().n_params();
    let (ka, kb) = (
        Keypair::from_secret_bytes(&[1; 32]),
        Keypair::from_secret_bytes(&[2; 32]),
    );
    let (pa, pb): (Vec<f32>, Vec<f32>) = (
        (0..n).map(|i| (i % 7) as f32 * 0.1).collect(),
        (0..n).map(|i| (i % 5) as f32 * -0.3).collect(),
    );
    let (va, vb) = (
        sign::version(&cfg, &ka, 12, &pa, vec![], vec![]),
        sign::version(&cfg, &kb, 11, &pb, vec![], vec![]),
    );
    let start = |key: &Keypair, v: &Verified<ModelManifest>, p: &[f32]| {
        let mut e = Engine::new(cfg.clone(), key.clone());
        e.handle(
            Input::Start {
                manifest: v.clone(),
                params: p.to_vec(),
            },
            0,
        );
        e
    };
    let (mut a, mut b) = (start(&ka, &va, &pa), start(&kb, &vb, &pb));
    // B (round 11) merges A's later head, weighted 3 : 2 (its own first).
    let out_b = b.handle(
        Input::BranchOffered {
            manifest: va.clone(),
            params: pa.clone().into(),
            against: vb.id(),
            weights: (2.0, 3.0),
            used: vec![],
        },
        1,
    );
    let Some(Action::Adopt {
        manifest: merged,
        params,
    }) = out_b.first()
    else {
        panic!("no merge: {out_b:?}");
    };
    let m = merged.message();
    assert_eq!(m.round, 12);
    let mut parents = vec![va.id(), vb.id()];
    parents.sort();
    assert_eq!(m.parents, parents);
    for i in [0, 1, n / 2, n - 1] {
        let want = 0.6 * pa[i] + 0.4 * pb[i];
        assert!(
            (params[i] - want).abs() < 1e-6,
            "{i}: {} vs {want}",
            params[i]
        );
    }
    // A moves on to the merge (it outranks A's own version of round 12),
    // and a stale offer (the head moved on) is ignored.
    assert!(a.would_adopt(m));
    a.handle(
        Input::ModelOffered {
            manifest: merged.clone(),
            params: params.to_vec().into(),
            previous: None,
            authors: 0,
            used: vec![],
            fork: None,
        },
        2,
    );
    assert_eq!(a.params(), b.params());
    assert_eq!(a.version(), Some(merged.id()));
    let stale = a.handle(
        Input::BranchOffered {
            manifest: sign::version(&cfg, &kb, 13, &pb, vec![], vec![]),
            params: pb.clone().into(),
            against: va.id(),
            weights: (1.0, 1.0),
            used: vec![],
        },
        3,
    );
    assert!(stale.is_empty(), "{stale:?}");
    // A merging B's (older) head instead gives the same parameters, round
    // and parents: whoever merges, the merge is the same.
    let mut a2 = start(&ka, &va, &pa);
    let out = a2.handle(
        Input::BranchOffered {
            manifest: vb.clone(),
            params: pb.clone().into(),
            against: va.id(),
            weights: (3.0, 2.0),
            used: vec![],
        },
        1,
    );
    let Some(Action::Adopt {
        manifest: m2,
        params: p2,
    }) = out.first()
    else {
        panic!("no merge");
    };
    assert_eq!(p2, params);
    assert_eq!(m2.message().round, 12);
    assert_eq!(m2.message().parents, m.parents);
}

#[test]
fn a_restarted_node_keeps_the_vote_it_cast_before_the_crash() {
    let cfg = engine_config(AggregationRule::Mean, DoorConfig::default(), 1);
    let params = spec().init(1);
    let g = genesis(&cfg, &params, &Keypair::from_secret_bytes(&[99; 32])).unwrap();
    let key = Keypair::from_secret_bytes(&[1; 32]);
    // Before the crash: the node trained round 0 and announced its delta.
    let mut before = Engine::new(cfg.clone(), key.clone());
    before.handle(
        Input::Start {
            manifest: g.clone(),
            params: params.clone(),
        },
        0,
    );
    let trained: Vec<f32> = params.iter().map(|v| v + 0.01).collect();
    let out = before.handle(
        Input::TrainingDone {
            round: 0,
            version: g.id(),
            params: trained,
            samples: 10,
        },
        5,
    );
    let (vote, payload) = out
        .into_iter()
        .find_map(|a| match a {
            Action::Publish { manifest, payload } => Some((manifest, payload.bytes().into_owned())),
            _ => None,
        })
        .expect("a delta announced");

    // After the restart: given its vote before the start, it trains no
    // second delta for round 0, fetches its own and counts it.
    let mut after = Engine::new(cfg, key);
    let out = after.handle(Input::OwnVote(vote.clone()), 0);
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Fetch { manifest } if manifest.id() == vote.id())),
        "{out:?}"
    );
    let out = after.handle(
        Input::Start {
            manifest: g,
            params: params.clone(),
        },
        0,
    );
    assert!(
        !out.iter()
            .any(|a| matches!(a, Action::Train { .. } | Action::Publish { .. })),
        "{out:?}"
    );
    // Alone (quorum 1 of 1), its own delta closes the round.
    let out = after.handle(
        Input::DeltaPayload {
            id: vote.id(),
            payload: payload.into(),
        },
        10,
    );
    let adopted = out
        .iter()
        .find_map(|a| match a {
            Action::Adopt { manifest, .. } => Some(manifest.message().clone()),
            _ => None,
        })
        .expect("the round closed");
    assert_eq!(adopted.deltas, vec![vote.id()]);
    // A vote that is not this node's is ignored.
    let mut other = Engine::new(
        engine_config(AggregationRule::Mean, DoorConfig::default(), 1),
        Keypair::from_secret_bytes(&[2; 32]),
    );
    assert!(other.handle(Input::OwnVote(vote), 0).is_empty());
}

#[test]
fn signed_manifests_carry_the_wall_clock_the_shell_gives() {
    let cfg = engine_config(AggregationRule::Mean, DoorConfig::default(), 1);
    let params = spec().init(42);
    let g = genesis(&cfg, &params, &Keypair::from_secret_bytes(&[99; 32])).unwrap();
    assert_eq!(
        g.message().created_unix_ms,
        0,
        "the genesis is the same everywhere"
    );
    let mut e = Engine::new(cfg, Keypair::from_secret_bytes(&[1; 32]));
    let base = 1_764_633_600_000; // 2025-12-02, in milliseconds
    e.set_wall_clock(base);
    let train = e.handle(
        Input::Start {
            manifest: g.clone(),
            params: params.clone(),
        },
        10,
    );
    let Some(Action::Train { version, .. }) = train
        .into_iter()
        .find(|a| matches!(a, Action::Train { .. }))
    else {
        panic!("no training asked for");
    };
    let trained: Vec<f32> = params.iter().map(|p| p + 0.01).collect();
    let actions = e.handle(
        Input::TrainingDone {
            round: 0,
            version,
            params: trained,
            samples: 10,
        },
        250,
    );
    let delta = actions.iter().find_map(|a| match a {
        Action::Publish { manifest, .. } => Some(manifest.message().created_unix_ms),
        _ => None,
    });
    assert_eq!(delta, Some(base + 250));
    // Alone, the round closes on its own delta: the version is stamped too.
    let version = actions.iter().find_map(|a| match a {
        Action::Adopt { manifest, .. } => Some(manifest.message().created_unix_ms),
        _ => None,
    });
    assert_eq!(version, Some(base + 250));
}

#[test]
fn a_rival_branch_is_looked_at_and_a_version_weighed_against_an_old_head_is_weighed_again() {
    use tapestry_core::heads::{self, Assessment, Decision};
    // The fork choice weighs branches before ranks, so a version of this
    // node's round on other parents must be verified even when it ranks
    // lower: otherwise two nodes on rival branches each wait for the other.
    let cfg = engine_config(AggregationRule::Mean, DoorConfig::default(), 7);
    let n = spec().n_params();
    let params: Vec<f32> = (0..n).map(|i| (i % 3) as f32 * 0.1).collect();
    let key = Keypair::from_secret_bytes(&[1; 32]);
    let (p1, p2) = (ContentId::of(b"parent one"), ContentId::of(b"parent two"));
    let head = sign::version(&cfg, &key, 5, &params, vec![p1], vec![]);
    let mut e = Engine::new(cfg.clone(), key.clone());
    e.handle(
        Input::Start {
            manifest: head.clone(),
            params: params.clone(),
        },
        0,
    );
    assert_eq!(e.head_parents(), &[p1]);
    // Versions of round 5 by other signers; keep those the rank alone
    // would not take.
    let lower = |parents: Vec<ContentId>| {
        (2u8..=255)
            .map(|s| {
                let k = Keypair::from_secret_bytes(&[s; 32]);
                sign::version(&cfg, &k, 5, &params, parents.clone(), vec![])
            })
            .find(|v| !e.would_adopt(v.message()))
            .unwrap()
    };
    let rival = lower(vec![p2]);
    let alternative = lower(vec![p1]);
    assert!(heads::worth_verifying(&e, rival.message()));
    assert!(!heads::worth_verifying(&e, alternative.message()));

    // A version weighed against a head that is no longer this node's is to
    // be weighed again, not left.
    let assessed = |against: ContentId| Assessment {
        authors: 0,
        previous: None,
        used: vec![],
        head: Some(against),
        split: None,
        fork: None,
        backed: false,
    };
    let moved = heads::decide(&e, rival.clone(), params.clone().into(), assessed(p2));
    assert!(matches!(moved, Decision::Reassess), "{moved:?}");
    let current = heads::decide(&e, rival, params.into(), assessed(head.id()));
    assert!(matches!(current, Decision::Leave), "{current:?}");
}

#[test]
fn a_next_round_version_holding_this_nodes_delta_is_taken_at_once() {
    use tapestry_core::heads::{self, Assessment, Decision};
    // A node that has sent its delta for the round and waits for its peers'
    // (lost, say, in a flood) takes a verified version of the next round
    // that already aggregates its delta, instead of waiting for the round's
    // deadline; one without its delta is kept for when it closes its round.
    let mut cfg = engine_config(AggregationRule::Mean, DoorConfig::default(), 7);
    cfg.quorum = 1.0;
    let n = spec().n_params();
    let params: Vec<f32> = (0..n).map(|i| (i % 3) as f32 * 0.1).collect();
    let key = Keypair::from_secret_bytes(&[1; 32]);
    let head = sign::version(&cfg, &key, 5, &params, vec![ContentId::of(b"p")], vec![]);
    let mut e = Engine::new(cfg.clone(), key.clone());
    e.handle(
        Input::Start {
            manifest: head.clone(),
            params: params.clone(),
        },
        0,
    );
    let peer = Keypair::from_secret_bytes(&[2; 32]);
    e.handle(Input::PeerJoined(peer.node_id()), 0);
    let next =
        |deltas: Vec<ContentId>| sign::version(&cfg, &peer, 6, &params, vec![head.id()], deltas);
    let theirs = ContentId::of(b"the peer's delta");
    // Still training: nothing of this node's is out yet.
    assert!(!e.holds_own_vote(next(vec![theirs]).message()));

    let trained: Vec<f32> = params.iter().map(|p| p - 0.01).collect();
    let out = e.handle(
        Input::TrainingDone {
            round: 5,
            version: head.id(),
            params: trained,
            samples: 10,
        },
        10,
    );
    let own = out
        .iter()
        .find_map(|a| match a {
            Action::Publish { manifest, .. } => Some(manifest.id()),
            _ => None,
        })
        .expect("the node publishes its delta");
    assert_eq!(e.round(), 5, "the round waits for the peer's delta");

    let assessed = Assessment {
        authors: 2,
        previous: None,
        used: vec![],
        head: Some(head.id()),
        split: None,
        fork: None,
        backed: true,
    };
    let with_own = next(vec![own, theirs]);
    let without = next(vec![theirs]);
    assert!(e.holds_own_vote(with_own.message()));
    assert!(!e.holds_own_vote(without.message()));
    let take = heads::decide(&e, with_own, params.clone().into(), assessed.clone());
    assert!(
        matches!(&take, Decision::Feed(i) if matches!(i.as_ref(), Input::ModelOffered { .. })),
        "{take:?}"
    );
    let keep = heads::decide(&e, without, params.into(), assessed);
    assert!(matches!(keep, Decision::Remember(_)), "{keep:?}");
}

#[test]
fn a_used_deltas_values_go_and_come_back_if_the_head_stops_counting_it() {
    // A node drops the values of deltas its head aggregated (memory: one
    // model per delta still to aggregate, not per delta of the staleness
    // window). If it then moves to a version that did not aggregate one of
    // them, it asks for that payload again and aggregates it next round.
    let mut cfg = engine_config(AggregationRule::Mean, DoorConfig::default(), 3);
    cfg.quorum = 1.0;
    let n = spec().n_params();
    let params: Vec<f32> = (0..n).map(|i| (i % 5) as f32 * 0.01).collect();
    let key = Keypair::from_secret_bytes(&[1; 32]);
    let g = sign::version(&cfg, &key, 0, &params, vec![], vec![]);
    let mut e = Engine::new(cfg.clone(), key.clone());
    e.handle(
        Input::Start {
            manifest: g.clone(),
            params: params.clone(),
        },
        0,
    );
    let train = |e: &mut Engine, round: u64, from: ContentId, at: u64| {
        let trained: Vec<f32> = e.params().iter().map(|p| p - 0.01).collect();
        e.handle(
            Input::TrainingDone {
                round,
                version: from,
                params: trained,
                samples: 10,
            },
            at,
        )
    };
    // Alone: its own delta closes round 0.
    let out = train(&mut e, 0, g.id(), 10);
    let (d0, payload0) = out
        .iter()
        .find_map(|a| match a {
            Action::Publish { manifest, payload } => {
                Some((manifest.clone(), payload.bytes().into_owned()))
            }
            _ => None,
        })
        .expect("a delta published");
    let v1 = out
        .iter()
        .find_map(|a| match a {
            Action::Adopt { manifest, .. } => Some(manifest.clone()),
            _ => None,
        })
        .expect("round 0 closed");
    assert_eq!(v1.message().deltas, vec![d0.id()]);
    assert!(
        !out.iter().any(|a| matches!(a, Action::Fetch { .. })),
        "a delta the head counts is not fetched again: {out:?}"
    );
    assert!(e.holds_delta(&d0.id()));

    // A preferred version of round 1 (two authors) that did not use d0.
    let peer = Keypair::from_secret_bytes(&[2; 32]);
    let other: Vec<f32> = params.iter().map(|p| p + 0.02).collect();
    let w1 = sign::version(&cfg, &peer, 1, &other, vec![g.id()], vec![]);
    let out = e.handle(
        Input::ModelOffered {
            manifest: w1.clone(),
            params: other.clone().into(),
            previous: None,
            authors: 2,
            used: vec![],
            fork: None,
        },
        20,
    );
    assert_eq!(e.version(), Some(w1.id()));
    let refetch: Vec<ContentId> = out
        .iter()
        .filter_map(|a| match a {
            Action::Fetch { manifest } => Some(manifest.id()),
            _ => None,
        })
        .collect();
    assert_eq!(refetch, vec![d0.id()], "{out:?}");
    let out = e.handle(
        Input::DeltaPayload {
            id: d0.id(),
            payload: payload0.clone().into(),
        },
        25,
    );
    assert!(
        !out.iter().any(|a| matches!(a, Action::Penalise(_))),
        "{out:?}"
    );
    // Round 1 closes on this node's new delta and d0, back.
    let out = train(&mut e, 1, w1.id(), 30);
    let (d1, payload1) = out
        .iter()
        .find_map(|a| match a {
            Action::Publish { manifest, payload } => {
                Some((manifest.id(), payload.bytes().into_owned()))
            }
            _ => None,
        })
        .expect("a delta published");
    let v2 = out
        .iter()
        .find_map(|a| match a {
            Action::Adopt { manifest, .. } => Some(manifest.message().clone()),
            _ => None,
        })
        .expect("round 1 closed");
    let mut expected = vec![d0.id(), d1];
    expected.sort();
    let mut got = v2.deltas.clone();
    got.sort();
    assert_eq!(got, expected);
    // The same parameters as aggregating both payloads onto w1's.
    let codec = d0.message().codec;
    let (v0, v1) = (
        codec.decode(&payload0, n).unwrap(),
        codec.decode(&payload1, n).unwrap(),
    );
    let inputs = [
        tapestry_core::verify::DeltaInput {
            id: d0.id(),
            sample_count: 10,
            values: tapestry_core::aggregate::Values::Decoded(&v0),
        },
        tapestry_core::verify::DeltaInput {
            id: d1,
            sample_count: 10,
            values: tapestry_core::aggregate::Values::Decoded(&v1),
        },
    ];
    let expected = tapestry_core::verify::aggregate_onto(&cfg, &other, &inputs).unwrap();
    assert_eq!(e.params(), expected.as_slice());
}
