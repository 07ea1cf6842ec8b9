//! Versions checked by recomputation: every version honest engines make
//! verifies bit for bit on another node, and each way of forging one fails
//! with its reason.

#![allow(clippy::unwrap_used)]

use tapestry_core::aggregate::{AggregationRule, Values};
use tapestry_core::data::{self, Dataset, Partition};
use tapestry_core::door::{DoorConfig, Rejection, Weighting};
use tapestry_core::engine::{Action, Engine, EngineConfig, Input, genesis};
use tapestry_core::model::*;
use tapestry_core::verify::{self, DeltaInput, Lineage, Plan, VersionRejection, aggregate_onto};
use tapestry_protocol::*;
use tapestry_testkit::sign;
use tapestry_testkit::swarm::Swarm;

fn digits() -> Dataset {
    tapestry_testkit::digits()
}

fn spec() -> ModelSpec {
    tapestry_testkit::logistic()
}

fn config(rule: AggregationRule) -> EngineConfig {
    tapestry_testkit::engine_config(rule, DoorConfig::default(), 0)
}

/// `n` honest engines in one region on IID shares of the digits, 5 steps a
/// round, every message delivered; all they publish and adopt is recorded.
fn swarm(n: usize, rule: AggregationRule) -> Swarm {
    let all = digits();
    let shards = data::partition(&all, n, Partition::Iid, 5)
        .unwrap()
        .iter()
        .map(|ix| all.subset(ix))
        .collect();
    Swarm::new(config(rule), tapestry_testkit::sgd(5, 32, 0.05), shards)
}

#[test]
fn every_version_honest_engines_make_verifies_bit_for_bit() {
    for rule in [
        AggregationRule::Mean,
        AggregationRule::TrimmedMean { beta: 0.2 },
        AggregationRule::Median,
        AggregationRule::CenteredClip {
            radius: 0.5,
            iterations: 2,
        },
    ] {
        let mut swarm = swarm(4, rule);
        swarm.run(6);
        let mut l = swarm.verifier();
        let door = swarm.door();
        let mut by_round = swarm.adopted.concat();
        assert!(by_round.len() >= 4 * 6, "{}", by_round.len());
        by_round.sort_by_key(|m| m.message().round);
        for v in &by_round {
            let c = l
                .verify_all(&swarm.cfg, &door, v)
                .unwrap_or_else(|e| panic!("{rule}: round {}: {e}", v.message().round));
            assert!(c.authors >= 1);
        }
        // And each engine's head is among them, with its parameters.
        for e in &swarm.engines {
            let id = e.version().unwrap();
            assert_eq!(l.params(&id).unwrap(), e.params(), "{rule}");
        }
    }
}

#[test]
fn aggregation_does_not_depend_on_input_order() {
    let cfg = config(AggregationRule::TrimmedMean { beta: 0.2 });
    let n = spec().n_params();
    let vecs: Vec<Vec<f32>> = (0..7)
        .map(|k| {
            (0..n)
                .map(|i| ((i * 31 + k * 17) % 101) as f32 * 1e-3 - 0.05)
                .collect()
        })
        .collect();
    let ids: Vec<ContentId> = (0..7u8).map(|k| ContentId::of(&[k])).collect();
    let inputs: Vec<DeltaInput<'_>> = (0..7)
        .map(|k| DeltaInput {
            id: ids[k],
            sample_count: 10 + k as u64,
            values: Values::Decoded(&vecs[k]),
        })
        .collect();
    let parent = spec().init(1);
    let a = aggregate_onto(&cfg, &parent, &inputs).unwrap();
    let mut reversed = inputs.clone();
    reversed.reverse();
    let b = aggregate_onto(&cfg, &parent, &reversed).unwrap();
    assert_eq!(
        a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn a_claimed_sample_count_buys_no_weight() {
    let n = spec().n_params();
    let honest: Vec<f32> = vec![0.01; n];
    let evil: Vec<f32> = vec![-0.01; n];
    let parent = vec![0.0f32; n];
    let inputs = [
        DeltaInput {
            id: ContentId::of(b"a"),
            sample_count: 100,
            values: Values::Decoded(&honest),
        },
        DeltaInput {
            id: ContentId::of(b"b"),
            sample_count: u64::MAX,
            values: Values::Decoded(&evil),
        },
    ];
    // Equal weights (the default): the two cancel out.
    let cfg = config(AggregationRule::Mean);
    let out = aggregate_onto(&cfg, &parent, &inputs).unwrap();
    assert!(out.iter().all(|v| v.abs() < 1e-9), "{:?}", &out[..3]);
    // Sample counts capped at 200: 100 against 200, not against 2^64.
    let mut capped = config(AggregationRule::Mean);
    capped.door.weighting = Weighting::Samples { max: 200 };
    let out = aggregate_onto(&capped, &parent, &inputs).unwrap();
    // θ − mean(Δ): mean = (100·0.01 − 200·0.01) / 300 = −1/300.
    assert!((out[0] - 0.01 / 3.0).abs() < 1e-6, "{}", out[0]);
}

#[test]
fn forged_versions_fail_each_with_its_reason() {
    let mut swarm = swarm(3, AggregationRule::Mean);
    swarm.run(4);
    let cfg = swarm.cfg.clone();
    let door = swarm.door();
    let rogue = Keypair::from_secret_bytes(&[66; 32]);
    // A version by the rogue.
    let forge = |round: u64, params: &[f32], parents: Vec<ContentId>, deltas: Vec<ContentId>| {
        sign::version(&cfg, &rogue, round, params, parents, deltas)
    };
    let mut l = swarm.verifier();
    // Verify the honest history first.
    let mut made = swarm.adopted.concat();
    made.sort_by_key(|m| m.message().round);
    for v in &made {
        l.verify_all(&cfg, &door, v).unwrap();
    }
    let head = made.last().unwrap().clone();
    let hm = head.message();
    let head_params = l.params(&head.id()).unwrap();
    let parent = l.model(&hm.parents[0]).unwrap();
    let parent_params = l.params(&parent.id()).unwrap();

    // 1. The head's round, parent and deltas, other parameters.
    let mut tampered = head_params.clone();
    tampered[0] += 0.5;
    let v = forge(hm.round, &tampered, hm.parents.clone(), hm.deltas.clone());
    assert_eq!(
        verify::verify_version(&l, &cfg, &door, &v).unwrap_err(),
        VersionRejection::Mismatch
    );

    // 2. 64 made-up delta ids: the plan asks for them, and without them the
    //    version fails.
    let made_up: Vec<ContentId> = (0..64u8).map(|k| ContentId::of(&[k, 1, 2])).collect();
    let v = forge(hm.round, &tampered, hm.parents.clone(), made_up.clone());
    match verify::plan(&l, &cfg, &v, 4096).unwrap() {
        Plan::Need { deltas, .. } => assert_eq!(deltas.len(), 64),
        p => panic!("{p:?}"),
    }
    assert!(matches!(
        verify::verify_version(&l, &cfg, &door, &v),
        Err(VersionRejection::UnknownDelta(_))
    ));

    // 3. Round R+5 on an honest parent: a round jump.
    let v = forge(
        hm.round + 5,
        &head_params,
        vec![head.id()],
        hm.deltas.clone(),
    );
    assert!(matches!(
        verify::verify_version(&l, &cfg, &door, &v),
        Err(VersionRejection::RoundJump { .. })
    ));
    // 4. Round u64::MAX − 1: refused from the manifest alone, no overflow.
    let v = forge(
        u64::MAX - 1,
        &head_params,
        vec![head.id()],
        hm.deltas.clone(),
    );
    assert!(matches!(
        verify::check_shape(&cfg, v.message(), hm.round),
        Err(VersionRejection::RoundJump { .. })
    ));
    assert!(verify::verify_version(&l, &cfg, &door, &v).is_err());

    // 5. The parent's deltas again on top of the head: reused.
    let v = forge(
        hm.round + 1,
        &head_params,
        vec![head.id()],
        hm.deltas.clone(),
    );
    assert!(matches!(
        verify::verify_version(&l, &cfg, &door, &v),
        Err(VersionRejection::ReusedDelta(_))
    ));

    // 6. Two deltas of one author for one round, both well-formed.
    let small = vec![0.001f32; spec().n_params()];
    let (d1, p1) = sign::delta(&cfg, &rogue, hm.round, 1, &small);
    let (d2, p2) = sign::delta(
        &cfg,
        &rogue,
        hm.round,
        2,
        &small.iter().map(|v| v * 2.0).collect::<Vec<_>>(),
    );
    l.add_delta(&d1, &p1);
    l.add_delta(&d2, &p2);
    let v = forge(
        hm.round + 1,
        &head_params,
        vec![head.id()],
        vec![d1.id(), d2.id()],
    );
    assert!(matches!(
        verify::verify_version(&l, &cfg, &door, &v),
        Err(VersionRejection::DuplicateAuthorRound { .. })
    ));
    // One of them alone, computed honestly, passes: the rogue's vote counts
    // once, like anyone's, and weighs no more for its u64::MAX samples.
    let expected = aggregate_onto(
        &cfg,
        &head_params,
        &[DeltaInput {
            id: d1.id(),
            sample_count: u64::MAX,
            values: Values::Decoded(&small),
        }],
    )
    .unwrap();
    let v = forge(hm.round + 1, &expected, vec![head.id()], vec![d1.id()]);
    let c = verify::verify_version(&l, &cfg, &door, &v).unwrap();
    assert_eq!(c.authors, 1);

    // 7. A delta far above the norm limit, named by a version.
    let mut judged = door.clone();
    for k in 0..8 {
        judged
            .check_values(rogue.node_id(), 0.1 + k as f32 * 1e-3, &{
                let mut x = vec![0.0f32; spec().n_params()];
                x[0] = 0.1 + k as f32 * 1e-3;
                x
            })
            .unwrap();
    }
    let huge = vec![1.0f32; spec().n_params()];
    let (d3, p3) = sign::delta(&cfg, &rogue, hm.round, 3, &huge);
    l.add_delta(&d3, &p3);
    let v = forge(hm.round + 1, &head_params, vec![head.id()], vec![d3.id()]);
    assert!(matches!(
        verify::verify_version(&l, &cfg, &judged, &v),
        Err(VersionRejection::DeltaRejected(r)) if matches!(r.reason, Rejection::NormTooLarge { .. })
    ));

    // 8. A "merge" of the head with its own parent, and of two honest
    //    same-lineage versions: not branches.
    let mean: Vec<f32> = head_params
        .iter()
        .zip(&parent_params)
        .map(|(a, b)| 0.5 * a + 0.5 * b)
        .collect();
    let v = forge(hm.round, &mean, vec![head.id(), parent.id()], vec![]);
    assert_eq!(
        verify::verify_version(&l, &cfg, &door, &v).unwrap_err(),
        VersionRejection::NotABranch
    );

    // 9. A line of the rogue's own: three rounds, only its deltas, each
    //    version honestly computed (so each verifies) — then a merge of it
    //    with the honest head. One author is not a branch.
    let mut line = (parent.clone(), parent_params.clone());
    let mut seq = 10;
    for _ in 0..4 {
        let r = line.0.message().round;
        seq += 1;
        let (d, p) = sign::delta(&cfg, &rogue, r, seq, &small);
        l.add_delta(&d, &p);
        let (v, params) = sign::child(&cfg, &rogue, (&line.0, &line.1), &d, &small);
        l.models.insert(v.id(), v.clone());
        let c = l.verify_all(&cfg, &door, &v).unwrap();
        assert_eq!(c.authors, 1);
        line = (v, params);
    }
    // Its line weighs one author against the region's; extending the head
    // with it is not backed by enough of the members seen recently.
    let w = verify::fork_weights(&l, head.id(), line.0.id());
    assert_eq!((w.a, w.b, w.b_authors.len()), (3, 4, 1));
    assert!(!verify::catch_up_backed(
        w.b_authors.len(),
        verify::recent_authors(&l, head.id())
    ));
    let merged = verify::merge_params((head.id(), &head_params, 1.0), (line.0.id(), &line.1, 1.0));
    let v = forge(
        line.0.message().round.max(hm.round),
        &merged,
        {
            let mut p = vec![head.id(), line.0.id()];
            p.sort();
            p
        },
        vec![],
    );
    assert_eq!(
        verify::verify_version(&l, &cfg, &door, &v).unwrap_err(),
        VersionRejection::NotABranch
    );

    // 10. No parent at all, or one parent and nothing aggregated.
    let v = forge(1, &head_params, vec![], vec![]);
    assert_eq!(
        verify::check_shape(&cfg, v.message(), hm.round).unwrap_err(),
        VersionRejection::ForgedGenesis
    );
    let v = forge(hm.round + 1, &head_params, vec![head.id()], vec![]);
    assert_eq!(
        verify::check_shape(&cfg, v.message(), hm.round).unwrap_err(),
        VersionRejection::NoDeltas
    );
    // 11. A version naming 10,000 ids is refused before anything is fetched.
    let many: Vec<ContentId> = (0..10_000u32)
        .map(|k| ContentId::of(&k.to_le_bytes()))
        .collect();
    let v = forge(hm.round + 1, &head_params, vec![head.id()], many);
    assert!(matches!(
        verify::check_shape(&cfg, v.message(), hm.round),
        Err(VersionRejection::Malformed(_))
    ));
}

#[test]
fn one_author_has_one_vote_per_round_at_the_door() {
    let cfg = config(AggregationRule::Mean);
    let mut e = Engine::new(cfg.clone(), Keypair::from_secret_bytes(&[1; 32]));
    let params = spec().init(42);
    let g = genesis(&cfg, &params, &Keypair::from_secret_bytes(&[99; 32])).unwrap();
    let rogue = Keypair::from_secret_bytes(&[66; 32]);
    e.handle(Input::PeerJoined(rogue.node_id()), 0);
    e.handle(
        Input::Start {
            manifest: g,
            params,
        },
        0,
    );
    let small = vec![0.001f32; spec().n_params()];
    let mut fetched = 0;
    let mut refused = 0;
    for seq in 1..=20 {
        let (d, _) = sign::delta(
            &cfg,
            &rogue,
            0,
            seq,
            &small.iter().map(|v| v * seq as f32).collect::<Vec<_>>(),
        );
        for a in e.handle(Input::DeltaAnnounced(d), 1) {
            match a {
                Action::Fetch { .. } => fetched += 1,
                Action::Penalise(r) => {
                    assert_eq!(r.reason, Rejection::DuplicateAuthorRound { round: 0 });
                    refused += 1;
                }
                _ => {}
            }
        }
    }
    assert_eq!((fetched, refused), (1, 19));
    // A round number near u64::MAX is refused, not wrapped.
    let (d, _) = sign::delta(&cfg, &rogue, u64::MAX - 1, 100, &small);
    let out = e.handle(Input::DeltaAnnounced(d), 2);
    assert!(
        out.iter()
            .any(|a| matches!(a, Action::Penalise(r) if matches!(r.reason, Rejection::FromTheFuture { .. }))),
        "{out:?}"
    );
}

#[test]
fn a_parent_must_be_one_round_before_its_child_or_no_later_than_a_merge() {
    // One parent: exactly the round before.
    assert!(verify::check_parent_round((7, 1), 6).is_ok());
    for wrong in [7, 5, 0, 8] {
        assert!(matches!(
            verify::check_parent_round((7, 1), wrong),
            Err(VersionRejection::RoundJump { round: 7, .. })
        ));
    }
    // A merge: any round up to its own.
    for fits in [0, 6, 7] {
        assert!(verify::check_parent_round((7, 2), fits).is_ok());
    }
    assert!(verify::check_parent_round((7, 2), 8).is_err());
    // No overflow at the ends.
    assert!(verify::check_parent_round((0, 1), u64::MAX).is_err());
    assert!(verify::check_parent_round((u64::MAX, 1), u64::MAX - 1).is_ok());
}

#[test]
fn versions_with_momentum_verify_and_the_momentum_term_is_checked() {
    let mut cfg = config(AggregationRule::Mean);
    cfg.outer = tapestry_core::outer::OuterOptimizer::momentum(0.8, 0.5);
    let all = digits();
    let shards = data::partition(&all, 3, Partition::Iid, 5)
        .unwrap()
        .iter()
        .map(|ix| all.subset(ix))
        .collect();
    let mut swarm = Swarm::new(cfg.clone(), tapestry_testkit::sgd(5, 32, 0.05), shards);
    swarm.run(5);
    let mut l = swarm.verifier();
    let door = swarm.door();
    let mut by_round = swarm.adopted.concat();
    by_round.sort_by_key(|m| m.message().round);
    assert!(by_round.len() >= 3 * 5, "{}", by_round.len());
    for v in &by_round {
        l.verify_all(&cfg, &door, v)
            .unwrap_or_else(|e| panic!("round {}: {e}", v.message().round));
    }
    // A verifier that takes the step without the momentum term refuses
    // every version after round 1 (whose parent, the genesis, has no
    // previous step) and accepts round 1's.
    let mut plain = cfg.clone();
    plain.outer = tapestry_core::outer::OuterOptimizer::Sgd { lr: 0.8 };
    for v in &by_round {
        let got = verify::verify_version(&l, &plain, &door, v).map(|c| c.authors);
        if v.message().round == 1 {
            assert!(got.is_ok(), "{got:?}");
        } else {
            assert_eq!(
                got,
                Err(VersionRejection::Mismatch),
                "round {}",
                v.message().round
            );
        }
    }
    // Without the parameters before the parent there is nothing to check
    // it against.
    let v = by_round.iter().find(|v| v.message().round == 4).unwrap();
    let parent = l.model(&v.message().parents[0]).unwrap();
    let before = parent.message().parents[0];
    l.verified.remove(&before);
    assert_eq!(
        verify::verify_version(&l, &cfg, &door, v).map(|c| c.authors),
        Err(VersionRejection::UnknownParent(before))
    );
}

#[test]
fn an_engine_restarted_on_a_step_closes_rounds_with_momentum_only_once_given_the_step_before() {
    let mut cfg = config(AggregationRule::Mean);
    cfg.outer = tapestry_core::outer::OuterOptimizer::momentum(0.8, 0.5);
    let all = digits();
    let shard = all.subset(&(0..600).collect::<Vec<_>>());
    let mut swarm = Swarm::new(cfg.clone(), tapestry_testkit::sgd(5, 32, 0.05), vec![shard]);
    swarm.run(3);
    let head = swarm.adopted[0].last().unwrap().clone();
    assert_eq!(head.message().round, 3);
    let params = swarm.snapshots[&3][&0].clone();
    let parent = head.message().parents[0];
    let parent_params = swarm.snapshots[&2][&0].clone();
    // Restarted from its head (a step): the engine knows the head, not the
    // parameters before it.
    swarm.engines[0] = Engine::new(cfg.clone(), swarm.keys[0].clone());
    swarm.queue.push_back((
        0,
        Input::Start {
            manifest: head.clone(),
            params,
        },
    ));
    let idle = |swarm: &mut Swarm, deliveries: usize| {
        for _ in 0..deliveries {
            match swarm.queue.pop_front() {
                Some((i, input)) => swarm.step(i, input),
                None => {
                    swarm.now += 10_000;
                    swarm.queue.push_back((0, Input::Tick));
                }
            }
        }
    };
    // It trains and publishes its delta but takes no step it cannot take
    // as every verifier would, however many deadlines pass ...
    idle(&mut swarm, 200);
    assert_eq!(swarm.engines[0].round(), 3);
    // ... nor with the parameters of another version ...
    swarm.queue.push_back((
        0,
        Input::PreviousStep {
            version: head.id(),
            params: swarm.snapshots[&1][&0].clone(),
        },
    ));
    idle(&mut swarm, 200);
    assert_eq!(swarm.engines[0].round(), 3);
    // ... and goes on once given its head's parent's.
    swarm.queue.push_back((
        0,
        Input::PreviousStep {
            version: parent,
            params: parent_params,
        },
    ));
    swarm.run(5);
    let mut l = swarm.verifier();
    let door = swarm.door();
    let mut by_round = swarm.adopted.concat();
    by_round.sort_by_key(|m| m.message().round);
    assert!(by_round.iter().any(|v| v.message().round == 5));
    for v in &by_round {
        l.verify_all(&cfg, &door, v)
            .unwrap_or_else(|e| panic!("round {}: {e}", v.message().round));
    }
}
