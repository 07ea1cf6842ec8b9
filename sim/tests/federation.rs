//! Regional swarms federating in the simulator: four regions, each holding
//! only some digit classes, end with models that know all ten when they
//! mix their heads, and stay near their share when they do not; the bytes
//! crossing regions stay a small part of the total.

#![allow(clippy::unwrap_used)]

use tapestry_sim::report;
use tapestry_sim::scenario::Scenario;

/// `sim/scenarios/federation-digits.toml`, with the data found from here.
fn federated() -> Scenario {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/federation-digits.toml"),
    )
    .unwrap();
    Scenario {
        data: tapestry_testkit::digits_arg(),
        ..Scenario::from_toml(&text).unwrap()
    }
}

fn run(s: Scenario) -> serde_json::Value {
    run_with_csv(s).0
}

/// The report and `rounds.csv`.
fn run_with_csv(s: Scenario) -> (serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = report::run(&s.settings().unwrap(), dir.path(), &mut |_, _| {})
        .unwrap()
        .json;
    let csv = std::fs::read_to_string(dir.path().join("rounds.csv")).unwrap();
    (json, csv)
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap()
}

/// Each region's mean accuracy on the whole test set, as a share of
/// centralized training's.
fn shares(r: &serde_json::Value) -> Vec<f64> {
    let central = f(&r["baselines"]["centralized"]["accuracy"]);
    r["regions"]["each"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| f(&e["accuracy_mean"]) / central)
        .collect()
}

#[test]
fn four_federated_regions_each_reach_95_percent_of_centralized_on_all_classes() {
    let (r, csv) = run_with_csv(federated());
    let shares = shares(&r);
    assert_eq!(shares.len(), 4);
    assert!(shares.iter().all(|s| *s >= 0.95), "{shares:?}");
    let regions = &r["regions"];
    let cross = f(&regions["cross_region_share"]);
    assert!(cross > 0.0 && cross <= 0.10, "cross-region share {cross}");
    assert!(f(&regions["mixes_adopted"]) > 0.0);
    // 13 mix rounds (2, 4, ..., 26; the rounds after them only mix too)
    // or more, each bringing 2 foreign heads into each of 4 regions once.
    assert!(
        f(&regions["heads_carried_across"]) >= 13.0 * 8.0,
        "{regions}"
    );
    // Every mix a node took was recomputed, none refused as forged.
    let rejected = r["rejected"].as_object().unwrap();
    for bad in [
        "version_mismatch",
        "bad_version",
        "round_jump",
        "wrong_scope",
    ] {
        assert!(!rejected.contains_key(bad), "{rejected:?}");
    }
    // Within a region every node ends on the same model.
    for e in regions["each"].as_array().unwrap() {
        assert!(f(&e["consensus_distance"]) < 1e-6, "{e}");
    }
    // Round by round: inside each region the nodes agree on the model of
    // every round that is not a mix round (at a mix round a row may catch
    // some on the plain head, others on the mix), while the regions
    // themselves draw together by the end.
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    assert_eq!(
        header[10..],
        [
            "consensus_r0",
            "consensus_r1",
            "consensus_r2",
            "consensus_r3"
        ]
    );
    let rows: Vec<Vec<f64>> = csv
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .map(|c| c.parse().unwrap_or(f64::NAN))
                .collect()
        })
        .collect();
    let global = |row: &[f64]| row[5];
    for row in rows.iter().filter(|row| row[0] as u64 % 2 == 1) {
        assert!(row[10..].iter().all(|c| *c < 1e-6), "{row:?}");
    }
    let (early, last) = (global(&rows[2]), global(rows.last().unwrap()));
    assert!(last < early / 10.0, "global consensus {early} → {last}");
}

#[test]
fn regions_that_do_not_federate_stay_near_their_share_of_the_classes() {
    let r = run(Scenario {
        federation_every: 0,
        ..federated()
    });
    let shares = shares(&r);
    assert!(shares.iter().all(|s| *s < 0.5), "{shares:?}");
    assert_eq!(f(&r["regions"]["bytes_cross_region"]), 0.0);
    assert_eq!(f(&r["regions"]["mixes_adopted"]), 0.0);
}

#[test]
fn clipping_foreign_differences_bounds_what_a_bad_region_does_to_the_others() {
    // Region 3 trains and agrees honestly inside, but hands the others a
    // forged head (negated, ten times its size) that all its members vouch
    // for. The three honest regions can reach at most ~0.8 of centralized
    // (classes 8 and 9 are only in region 3).
    let bad = Scenario {
        byzantine: "region:3:poison-head".into(),
        ..federated()
    };
    let wrecked = shares(&run(bad.clone()));
    assert_eq!(wrecked.len(), 3, "the bad region is not scored");
    assert!(wrecked.iter().all(|s| *s < 0.3), "{wrecked:?}");
    let clipped = shares(&run(Scenario {
        federation_clip: 2.0,
        ..bad
    }));
    assert!(clipped.iter().all(|s| *s > 0.45), "{clipped:?}");
    // Region 1 is not a neighbour of region 3 on the ring.
    assert!(clipped[1] > 0.7, "{clipped:?}");
    // The same radius costs honest regions nothing.
    let calm = shares(&run(Scenario {
        federation_clip: 2.0,
        ..federated()
    }));
    assert!(calm.iter().all(|s| *s >= 0.95), "{calm:?}");
}

#[test]
fn languages_as_regions_federated_beat_regions_apart_on_every_language_they_never_saw() {
    // Seven regions of two nodes, each region one language of the
    // fortunes; a tiny transformer for a few rounds.
    let base = Scenario {
        nodes: 14,
        rounds: 16,
        data: format!("text:{}", tapestry_testkit::fortunes_dir().display()),
        partition: "by-file".into(),
        model: "transformer:1,16,2,16".into(),
        optimizer: "adamw".into(),
        adam_eps: tapestry_core::model::TEXT_ADAM_EPS,
        lr: 0.01,
        local_steps: 4,
        batch_size: 8,
        regions: 7,
        federation_graph: "complete".into(),
        consensus_rounds: 2,
        baselines: false,
        ..Scenario::default()
    };
    let parts = |r: &serde_json::Value| -> Vec<serde_json::Map<String, serde_json::Value>> {
        r["regions"]["each"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["bits_per_byte_parts"].as_object().unwrap().clone())
            .collect()
    };
    let apart = parts(&run(base.clone()));
    let together = parts(&run(Scenario {
        federation_every: 2,
        ..base
    }));
    let langs = ["cs", "de", "en", "es", "it", "pt", "ru"];
    for (k, own) in langs.iter().enumerate() {
        for l in langs.iter().filter(|l| *l != own) {
            let (a, t) = (f(&apart[k][*l]), f(&together[k][*l]));
            assert!(
                t < a,
                "region of {own} on {l}: federated {t:.3}, apart {a:.3}"
            );
        }
    }
}

#[test]
fn regions_federate_through_churn_and_every_node_recomputes_the_same_versions() {
    // A tenth of the nodes away each second: every region still reaches
    // 95 % of centralized on all ten classes.
    let light = run(Scenario {
        churn: "0.1:1s".into(),
        ..federated()
    });
    assert!(
        shares(&light).iter().all(|s| *s >= 0.95),
        "{:?}",
        shares(&light)
    );
    assert!(f(&light["churn"]["caught_up"]) > 0.0);
    // A quarter away every half second. Members that took a foreign head
    // and members that did not walk the same lineage (walks stay inside
    // the region), so no honest version fails recomputation anywhere.
    let heavy = run(Scenario {
        churn: "0.25:500ms".into(),
        seed: 3,
        ..federated()
    });
    let rejected = heavy["rejected"].as_object().unwrap();
    assert!(!rejected.contains_key("version_mismatch"), "{rejected:?}");
    assert_eq!(f(&heavy["final"]["nodes_at_final_round"]), 16.0);
    assert!(
        shares(&heavy).iter().all(|s| *s >= 0.85),
        "{:?}",
        shares(&heavy)
    );
}
