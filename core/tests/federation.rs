//! Regions federating: at a mix round every engine of a region waits for
//! its neighbours' heads, mixes them into a version with all of them as
//! parents, and that version verifies by recomputation on any member of the
//! region that took the foreign heads; a forged or out-of-graph mix fails
//! with its reason.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use tapestry_core::aggregate::AggregationRule;
use tapestry_core::data::Dataset;
use tapestry_core::door::DoorConfig;
use tapestry_core::engine::{EngineConfig, Input};
use tapestry_core::federation::Federation;
use tapestry_core::verify::{self, VersionRejection};
use tapestry_protocol::*;
use tapestry_testkit::swarm::Swarm;

const WAIT_MS: u64 = 15_000;

fn federation() -> Federation {
    Federation {
        every: 2,
        edges: vec![("a".into(), "b".into())],
        clip: None,
        wait_ms: WAIT_MS,
    }
}

fn config(region: &str) -> EngineConfig {
    let mut cfg = tapestry_testkit::engine_config(AggregationRule::Mean, DoorConfig::default(), 0);
    cfg.region = region.into();
    cfg.federation = Some(federation());
    cfg
}

/// Three engines of `region`, holding only the digits of `classes`.
fn region(region: &str, classes: std::ops::Range<u32>) -> Swarm {
    let all = tapestry_testkit::digits();
    let rows: Vec<usize> = (0..all.len())
        .filter(|i| classes.contains(&all.labels[*i]))
        .collect();
    let shards: Vec<Dataset> = (0..3)
        .map(|k| {
            let ix: Vec<usize> = rows.iter().copied().skip(k).step_by(3).collect();
            all.subset(&ix)
        })
        .collect();
    Swarm::new(config(region), tapestry_testkit::sgd(5, 32, 0.05), shards)
}

/// Engine `i`'s head: its manifest and parameters.
fn head(s: &Swarm, i: usize) -> (Verified<ModelManifest>, Arc<Vec<f32>>) {
    let m = s.adopted[i].last().unwrap().clone();
    (m, Arc::new(s.engines[i].params().to_vec()))
}

/// A manifest like `m` with other contents, signed by `key`.
fn resign(
    m: &ModelManifest,
    key: &Keypair,
    edit: impl FnOnce(&mut ModelManifest),
) -> Verified<ModelManifest> {
    let mut m = m.clone();
    edit(&mut m);
    m.author = key.node_id();
    Signed::sign(m, key).unwrap()
}

#[test]
fn regions_wait_at_a_mix_round_mix_their_heads_and_every_member_verifies_the_mix() {
    let (mut a, mut b) = (region("a", 0..5), region("b", 5..10));
    a.run(2);
    b.run(2);
    for s in [&a, &b] {
        for e in &s.engines {
            assert_eq!(
                e.awaits_foreign_heads(),
                Some(2),
                "a plain head of a mix round waits"
            );
            assert_eq!(e.head_parents().len(), 1);
        }
    }
    let (b_head, b_params) = head(&b, 0);
    let (a_head, a_params) = head(&a, 0);
    for i in 0..3 {
        a.step(
            i,
            Input::ForeignHeads(vec![(b_head.clone(), b_params.clone())]),
        );
        b.step(
            i,
            Input::ForeignHeads(vec![(a_head.clone(), a_params.clone())]),
        );
    }
    // Metropolis–Hastings on one edge: the mean of both heads, the same
    // bits on every member of each region.
    let expected: Vec<f32> = a_params
        .iter()
        .zip(b_params.iter())
        .map(|(x, y)| x + 0.5 * (y - x))
        .collect();
    for i in 0..3 {
        let (mix, params) = head(&a, i);
        assert_eq!(mix.message().round, 2);
        assert_eq!(mix.message().parents.len(), 2);
        assert!(mix.message().parents.contains(&b_head.id()));
        assert_eq!(params.as_slice(), expected.as_slice());
        assert_eq!(a.engines[i].awaits_foreign_heads(), None);
        assert_eq!(head(&b, i).0.message().parents.len(), 2);
    }
    let (mix, params) = head(&a, 1);
    let cfg = config("a");
    let door = a.door();

    // A member of region a that took b's head (on b's attestations: here,
    // marked verified) recomputes the mix bit for bit.
    let mut taken = a.verifier();
    taken.models.insert(b_head.id(), b_head.clone());
    taken.verified.insert(b_head.id(), b_params.to_vec());
    let checked = taken.clone().verify_all(&cfg, &door, &mix).unwrap();
    assert_eq!(checked.params, *params);

    // Without b's head taken, nothing is verified and nobody is blamed.
    let mut not_taken = a.verifier();
    not_taken.models.insert(b_head.id(), b_head.clone());
    assert_eq!(
        verify::plan(&not_taken, &cfg, &mix, 4096).err(),
        Some(VersionRejection::UnknownParent(b_head.id()))
    );

    // A mix that leans further towards the foreign head than the weights
    // say does not recompute.
    let leaning: Vec<f32> = a_params
        .iter()
        .zip(b_params.iter())
        .map(|(x, y)| x + 0.9 * (y - x))
        .collect();
    let forged = resign(mix.message(), &a.keys[2], |m| {
        m.chunk_ids = verify::params_chunk_ids(&leaning, m.chunk_size as usize);
    });
    assert_eq!(
        taken.clone().verify_all(&cfg, &door, &forged).err(),
        Some(VersionRejection::Mismatch)
    );

    // A head of a region outside the graph is refused with the reason.
    let stranger = resign(b_head.message(), &b.keys[0], |m| m.region = "c".into());
    let mut with_c = taken.clone();
    with_c.models.insert(stranger.id(), stranger.clone());
    with_c.verified.insert(stranger.id(), b_params.to_vec());
    let own = mix
        .message()
        .parents
        .iter()
        .copied()
        .find(|p| *p != b_head.id())
        .unwrap();
    let with_stranger = resign(mix.message(), &a.keys[2], |m| {
        m.parents = vec![own, stranger.id()];
        m.parents.sort();
    });
    match with_c.verify_all(&cfg, &door, &with_stranger) {
        Err(VersionRejection::Malformed(why)) => assert!(why.contains("not a neighbour"), "{why}"),
        other => panic!("{other:?}"),
    }

    // A mix off the cadence is refused.
    let off = resign(mix.message(), &a.keys[2], |m| m.round = 3);
    assert!(matches!(
        taken.clone().verify_all(&cfg, &door, &off),
        Err(VersionRejection::Malformed(_) | VersionRejection::RoundJump { .. })
    ));

    // Both regions train on from their mixes.
    a.run(3);
    b.run(3);
    for i in 0..3 {
        let next = head(&a, i).0;
        assert_eq!(next.message().round, 3);
        assert_eq!(next.message().parents.len(), 1);
    }
}

#[test]
fn a_region_whose_neighbours_stay_silent_trains_on_after_the_wait() {
    let mut a = region("a", 0..10);
    a.run(2);
    assert!(
        a.engines
            .iter()
            .all(|e| e.awaits_foreign_heads() == Some(2))
    );
    // Before the wait is up, a tick changes nothing.
    a.now += WAIT_MS / 2;
    for i in 0..3 {
        a.step(i, Input::Tick);
    }
    assert!(
        a.engines
            .iter()
            .all(|e| e.awaits_foreign_heads() == Some(2))
    );
    assert!(a.queue.is_empty(), "nobody trains while waiting");
    // The swarm's clock moves 10 s at each idle tick: past the wait, the
    // engines train on from their plain head.
    a.run(4);
    for i in 0..3 {
        let versions = &a.adopted[i];
        let round2: Vec<_> = versions.iter().filter(|v| v.message().round == 2).collect();
        assert!(round2.iter().all(|v| v.message().parents.len() == 1));
        assert!(a.engines[i].round() >= 4);
    }
}

#[test]
fn a_mix_of_more_regions_heads_outranks_one_that_left_a_head_out() {
    // Region a federates with b and c. One member of a mixes only b's head
    // (it did not get c's, or left it out); another mixes both. The mix
    // with more heads is preferred by both: a member cannot drop a region
    // from its region's mix by mixing early.
    let edges = vec![("a".into(), "b".into()), ("a".into(), "c".into())];
    let mut cfg = config("a");
    cfg.federation.as_mut().unwrap().edges = edges.clone();
    let all = tapestry_testkit::digits();
    let shards: Vec<Dataset> = (0..3)
        .map(|k| {
            let ix: Vec<usize> = (k..all.len()).step_by(3).collect();
            all.subset(&ix)
        })
        .collect();
    let mut a = Swarm::new(
        cfg.clone(),
        tapestry_testkit::sgd(5, 32, 0.05),
        shards.clone(),
    );
    let fed = |region: &str| {
        let mut c = config(region);
        c.federation.as_mut().unwrap().edges = edges.clone();
        Swarm::new(c, tapestry_testkit::sgd(5, 32, 0.05), shards.clone())
    };
    let (mut b, mut c) = (fed("b"), fed("c"));
    for s in [&mut a, &mut b, &mut c] {
        s.run(2);
    }
    let (hb, hc) = (head(&b, 0), head(&c, 0));
    a.step(0, Input::ForeignHeads(vec![hb.clone()]));
    a.step(1, Input::ForeignHeads(vec![hb.clone(), hc.clone()]));
    let (partial, full) = (head(&a, 0), head(&a, 1));
    assert_eq!(partial.0.message().parents.len(), 2);
    assert_eq!(full.0.message().parents.len(), 3);
    let offer = |(m, p): (Verified<ModelManifest>, Arc<Vec<f32>>)| Input::ModelOffered {
        manifest: m,
        params: p,
        previous: None,
        authors: 0,
        used: Vec::new(),
        fork: None,
    };
    a.step(1, offer(partial.clone()));
    assert_eq!(head(&a, 1).0.id(), full.0.id(), "the fuller mix stays");
    a.step(0, offer(full.clone()));
    assert_eq!(head(&a, 0).0.id(), full.0.id(), "the fuller mix is taken");
    assert_eq!(*head(&a, 0).1, *full.1);
}

#[test]
fn a_waiting_member_that_takes_the_same_head_under_another_signer_still_trains_after_the_wait() {
    // Two members close a mix round's plain version on the same deltas:
    // the same parameters, two signers. A member that settles on the
    // other's id (the tie-break: the smaller signer) waits for foreign
    // heads under that id and trains when the wait is up; it once stayed
    // put, and in a run's last round for good.
    let mut a = region("a", 0..10);
    a.run(2);
    let heads: Vec<_> = (0..3).map(|i| head(&a, i)).collect();
    let (i, j) = (0..3)
        .flat_map(|i| (0..3).map(move |j| (i, j)))
        .find(|&(i, j)| {
            heads[i].1 == heads[j].1 && heads[j].0.message().author < heads[i].0.message().author
        })
        .expect("two members closed round 1 on the same deltas");
    let (m, p) = heads[j].clone();
    let authors = m.message().deltas.len();
    a.step(
        i,
        Input::ModelOffered {
            manifest: m.clone(),
            params: p,
            previous: None,
            authors,
            used: Vec::new(),
            fork: None,
        },
    );
    assert_eq!(
        a.engines[i].version(),
        Some(m.id()),
        "the preferred id is taken"
    );
    assert_eq!(
        a.engines[i].awaits_foreign_heads(),
        Some(2),
        "still waiting"
    );
    a.queue.clear();
    a.now += WAIT_MS + 1;
    a.step(i, Input::Tick);
    assert!(
        a.queue
            .iter()
            .any(|(k, input)| *k == i && matches!(input, Input::TrainingDone { round: 2, .. })),
        "trains round 2 once the wait is up"
    );
}
