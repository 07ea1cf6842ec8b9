//! `tapestry-sim run` end to end: figures against baselines, attacks,
//! determinism, and bad input, through the library and the real binary.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use tapestry_sim::report;
use tapestry_sim::scenario::Scenario;

fn digits() -> String {
    tapestry_testkit::digits_arg()
}

fn run(s: Scenario) -> serde_json::Value {
    run_with_rounds(s).0
}

/// One row of `rounds.csv`.
#[derive(Debug)]
struct Row {
    round: u64,
    accuracy_mean: f64,
    consensus: f64,
    nodes: usize,
    virtual_ms: u64,
}

/// Runs and also returns `rounds.csv`, parsed.
fn run_with_rounds(s: Scenario) -> (serde_json::Value, Vec<Row>) {
    let dir = tempfile::tempdir().unwrap();
    let json = report::run(&s.settings().unwrap(), dir.path(), &mut |_, _| {})
        .unwrap()
        .json;
    let csv = std::fs::read_to_string(dir.path().join("rounds.csv")).unwrap();
    let rows = csv
        .lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            Row {
                round: c[0].parse().unwrap(),
                accuracy_mean: c[1].parse().unwrap(),
                consensus: c[5].parse().unwrap(),
                nodes: c[7].parse().unwrap(),
                virtual_ms: c[8].parse().unwrap(),
            }
        })
        .collect();
    (json, rows)
}

/// 16 nodes on label-skewed digits, without baselines.
fn digits16() -> Scenario {
    Scenario {
        nodes: 16,
        rounds: 30,
        data: digits(),
        partition: "dirichlet:0.3".into(),
        baselines: false,
        ..Scenario::default()
    }
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap()
}

#[test]
fn sixteen_nodes_on_label_skewed_digits_match_centralized() {
    let s = Scenario {
        nodes: 16,
        rounds: 30,
        data: digits(),
        partition: "dirichlet:0.3".into(),
        ..Scenario::default()
    };
    let r = run(s);
    let swarm = f(&r["final"]["accuracy_mean"]);
    let central = f(&r["baselines"]["centralized"]["accuracy"]);
    let local = f(&r["baselines"]["local_only"]["accuracy_mean"]);
    eprintln!("swarm {swarm:.4}, centralized {central:.4}, local-only {local:.4}");
    assert!(swarm >= 0.97 * central, "{swarm} vs {central}");
    assert!(
        local < 0.8 * swarm,
        "local-only {local} should be clearly below {swarm}"
    );
    assert_eq!(r["final"]["honest_nodes"], 16);
}

#[test]
fn a_quarter_of_attackers_is_held_off_by_the_trimmed_mean() {
    let base = Scenario {
        nodes: 16,
        rounds: 30,
        data: digits(),
        partition: "dirichlet:0.3".into(),
        baselines: false,
        ..Scenario::default()
    };
    let clean = f(&run(base.clone())["final"]["accuracy_mean"]);
    let attacked = Scenario {
        byzantine: "0.25:sign-flip:10".into(),
        aggregator: "trimmed-mean:0.25".into(),
        baselines: true,
        ..base
    };
    let r = run(attacked);
    let robust = f(&r["final"]["accuracy_mean"]);
    let plain = f(&r["baselines"]["plain_mean"]["accuracy_mean"]);
    eprintln!(
        "attack-free {clean:.4}; 4 of 16 sign-flip ×10: trimmed mean {robust:.4}, plain mean {plain:.4}"
    );
    assert!(robust >= 0.95 * clean, "{robust} vs {clean}");
    assert!(
        plain < 0.8 * clean,
        "the attack must visibly hurt the plain mean ({plain})"
    );
    assert_eq!(r["final"]["honest_nodes"], 12);
}

#[test]
fn the_same_scenario_gives_the_same_bytes() {
    let s = Scenario {
        nodes: 6,
        rounds: 5,
        byzantine: "0.2:gaussian:0.5".into(),
        loss: 0.1,
        jitter_ms: 15,
        bandwidth_mbps: 5.0,
        churn: "0.2:300ms".into(),
        cuts: vec!["0-2@200ms-400ms".into()],
        mode: "broadcast".into(),
        threads: 1,
        ..Scenario::default()
    };
    let settings = s.settings().unwrap();
    // A different thread count must not change a byte.
    let mut other = settings.clone();
    other.scenario.threads = 2;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut ra = report::run(&settings, a.path(), &mut |_, _| {})
        .unwrap()
        .json;
    let mut rb = report::run(&other, b.path(), &mut |_, _| {}).unwrap().json;
    ra["wall_seconds"] = serde_json::json!(0);
    rb["wall_seconds"] = serde_json::json!(0);
    rb["scenario"]["threads"] = serde_json::json!(1);
    assert_eq!(ra, rb);
    let csv = |d: &tempfile::TempDir| std::fs::read(d.path().join("rounds.csv")).unwrap();
    assert_eq!(csv(&a), csv(&b));
    assert_eq!(String::from_utf8(csv(&a)).unwrap().lines().count(), 6);
}

fn sim(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tapestry-sim"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_input_is_a_one_line_error_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let scenario = dir.path().join("s.toml");
    std::fs::write(&scenario, "nodes = 4\nwobble = 1\n").unwrap();
    for (args, needle) in [
        (
            vec![
                "run",
                "--out",
                out,
                "--scenario",
                scenario.to_str().unwrap(),
            ],
            "wobble",
        ),
        (
            vec!["run", "--out", out, "--data", "/nonexistent/data.csv"],
            "/nonexistent/data.csv",
        ),
        (vec!["run", "--out", out, "--topology", "torus"], "torus"),
        (vec!["run", "--out", out, "--nodes", "many"], "many"),
        (
            vec!["run", "--out", out, "--cut", "halves@3s-1s"],
            "halves@3s-1s",
        ),
        (vec!["run", "--out", out, "--cut", "0-99@1s-2s"], "node 99"),
        (vec!["run", "--out", out, "--churn", "2:1s"], "churn"),
        (
            vec!["run", "--out", out, "--outer", "nesterov:0.7:0.9"],
            "nesterov",
        ),
        (vec!["run", "--out", out, "--regions", "40"], "regions 40"),
        (
            vec!["run", "--out", out, "--regions", "2", "--mode", "mixing"],
            "broadcast",
        ),
        (
            vec!["run", "--out", out, "--federation-every", "2"],
            "at least 2 regions",
        ),
        (
            vec![
                "run",
                "--out",
                out,
                "--regions",
                "2",
                "--federation-every",
                "2",
                "--federation-graph",
                "star",
            ],
            "star",
        ),
        (
            vec![
                "run",
                "--out",
                out,
                "--regions",
                "2",
                "--federation-every",
                "2",
                "--federation-clip=-1",
            ],
            "federation_clip",
        ),
        (
            vec!["run", "--out", out, "--outer", "momentum:0.7:1.5"],
            "momentum",
        ),
        (
            vec![
                "run",
                "--out",
                out,
                "--outer",
                "momentum:0.7:0.9",
                "--mode",
                "mixing",
            ],
            "broadcast",
        ),
    ] {
        let (code, err) = sim(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
    // And a good run through the binary writes its report.
    let (code, err) = sim(&[
        "run",
        "--out",
        out,
        "--nodes",
        "4",
        "--rounds",
        "3",
        "--no-baselines",
    ]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/report.json")).unwrap())
            .unwrap();
    assert_eq!(report["rounds_completed"], 3);
    for plot in ["accuracy.png", "consensus.png"] {
        let png = std::fs::read(dir.path().join("out").join(plot)).unwrap();
        assert_eq!(&png[..4], b"\x89PNG", "{plot}");
    }
}

#[test]
fn alie_from_a_quarter_is_held_off_by_the_trimmed_mean() {
    let clean = f(&run(digits16())["final"]["accuracy_mean"]);
    let r = run(Scenario {
        byzantine: "0.25:alie".into(),
        aggregator: "trimmed-mean:0.25".into(),
        baselines: true,
        ..digits16()
    });
    let robust = f(&r["final"]["accuracy_mean"]);
    let plain = f(&r["baselines"]["plain_mean"]["accuracy_mean"]);
    eprintln!(
        "attack-free {clean:.4}; 4 of 16 ALIE (z = 1): trimmed mean {robust:.4}, plain mean {plain:.4}"
    );
    assert!(robust >= 0.95 * clean, "{robust} vs {clean}");
    assert_eq!(r["final"]["honest_nodes"], 12);
}

#[test]
fn sixty_four_nodes_on_a_random_6_regular_graph_agree_within_20_rounds_of_mixing() {
    let (_, rows) = run_with_rounds(Scenario {
        nodes: 64,
        rounds: 40,
        consensus_rounds: 20,
        topology: "random-regular:6".into(),
        mode: "mixing".into(),
        ..digits16()
    });
    // Rounds 1–20 train (and so pull the label-skewed nodes apart); from
    // round 21 on the nodes only mix.
    let trained = &rows[19];
    assert_eq!(trained.round, 20);
    assert!(
        trained.consensus > 1e-2,
        "training keeps models apart ({:e}), so agreement is earned by mixing",
        trained.consensus
    );
    let agreed = rows
        .iter()
        .find(|r| r.round > 20 && r.consensus <= 1e-3)
        .expect("consensus distance never reached 1e-3");
    eprintln!(
        "consensus {:.2e} after training, ≤ 1e-3 after {} rounds of mixing ({:.2e})",
        trained.consensus,
        agreed.round - 20,
        agreed.consensus
    );
    assert!(agreed.round <= 40);
    assert!(rows.iter().all(|r| r.nodes == 64));
}

#[test]
fn nodes_that_leave_come_back_and_catch_up() {
    let mixing = Scenario {
        topology: "random-regular:4".into(),
        mode: "mixing".into(),
        rounds: 40,
        consensus_rounds: 10,
        ..digits16()
    };
    let clean = f(&run(mixing.clone())["final"]["accuracy_mean"]);
    // Every 500 ms a fresh quarter of the nodes is away.
    let (r, rows) = run_with_rounds(Scenario {
        churn: "0.25:500ms".into(),
        ..mixing
    });
    let churn = &r["churn"];
    eprintln!(
        "{churn}; accuracy {} vs {clean} without churn",
        r["final"]["accuracy_mean"]
    );
    assert!(churn["left"].as_u64().unwrap() >= 16, "{churn}");
    assert_eq!(churn["left"], churn["rejoined"], "everyone comes back");
    assert!(churn["caught_up"].as_u64().unwrap() > 0, "{churn}");
    assert!(r["network"]["messages_to_offline"].as_u64().unwrap() > 0);
    // Rounds went on without the absent nodes ...
    assert!(rows.iter().any(|row| row.nodes < 16));
    // ... and at the end every node is back, caught up, and agrees.
    assert_eq!(r["final"]["nodes_at_final_round"], 16);
    assert!(f(&r["final"]["accuracy_mean"]) >= 0.95 * clean);
    assert!(
        f(&r["final"]["consensus_distance"]) < 1e-2,
        "{}",
        r["final"]
    );
}

#[test]
fn with_outer_momentum_every_version_verifies_and_nodes_that_leave_rejoin_the_head() {
    // Broadcast rounds with heavy-ball momentum: every node recomputes
    // every version it takes, the momentum term from the lineage included,
    // and a node that was away (it catches up without its new head's
    // parent) takes part again.
    let base = Scenario {
        rounds: 25,
        churn: "0.25:500ms".into(),
        ..digits16()
    };
    let (plain, _) = run_with_rounds(base.clone());
    let (r, rows) = run_with_rounds(Scenario {
        outer: "momentum:1:0.5".into(),
        ..base
    });
    eprintln!(
        "momentum: {}; averaging: accuracy {}",
        r["final"], plain["final"]["accuracy_mean"]
    );
    assert_eq!(r["scenario"]["outer"], "momentum:1:0.5");
    // No version failed its recomputation or lacked the parameters before
    // its parent (versions from the future, refused in either run under
    // churn, are another matter).
    for bad in ["version_mismatch", "unknown_parent"] {
        assert!(r["rejected"][bad].is_null(), "{}", r["rejected"]);
    }
    assert!(
        r["churn"]["caught_up"].as_u64().unwrap() > 0,
        "{}",
        r["churn"]
    );
    assert!(rows.iter().any(|row| row.nodes < 16));
    assert_eq!(r["final"]["nodes_at_final_round"], 16);
    // Under churn the last round ends with some nodes a version apart
    // (averaging: 0.025 in this scenario).
    assert!(
        f(&r["final"]["consensus_distance"]) < 0.05,
        "{}",
        r["final"]
    );
    // The step is not averaging's: another trajectory, and it learns.
    assert_ne!(r["final"]["accuracy_mean"], plain["final"]["accuracy_mean"]);
    assert!(f(&r["final"]["accuracy_mean"]) >= 0.9, "{}", r["final"]);
}

#[test]
fn nodes_coming_back_never_catch_up_on_one_liars_word_in_either_mode() {
    // A quarter of the nodes lie to every node catching up from them: a
    // model of round 2^64 − 2 with its parameters negated, and (in
    // broadcast mode) attestations of each other's lies. Their deltas and
    // neighbour models are honest (round-jump), so the run with them must
    // end where the run without them does.
    for (mode, topology) in [("broadcast", "complete"), ("mixing", "random-regular:6")] {
        let churned = Scenario {
            topology: topology.into(),
            mode: mode.into(),
            rounds: 30,
            consensus_rounds: if mode == "mixing" { 10 } else { 0 },
            churn: "0.25:500ms".into(),
            ..digits16()
        };
        let calm = run(churned.clone());
        let r = run(Scenario {
            byzantine: "0.25:round-jump".into(),
            ..churned
        });
        let churn = &r["churn"];
        eprintln!(
            "{mode}: {churn}; accuracy {} vs {} without liars; rejected {}",
            r["final"]["accuracy_mean"], calm["final"]["accuracy_mean"], r["rejected"]
        );
        assert!(churn["rejoined"].as_u64().unwrap() >= 8, "{mode}: {churn}");
        assert!(churn["caught_up"].as_u64().unwrap() > 0, "{mode}: {churn}");
        // Every honest node ends at the final round: none jumped to the
        // liars' round or took their negated model.
        assert_eq!(
            r["final"]["nodes_at_final_round"], 12,
            "{mode}: {}",
            r["final"]
        );
        let (acc, clean) = (
            f(&r["final"]["accuracy_mean"]),
            f(&calm["final"]["accuracy_mean"]),
        );
        assert!(acc >= clean - 0.02, "{mode}: {acc} vs {clean}");
        assert!(
            f(&r["final"]["accuracy_min"]) > 0.5,
            "{mode}: {}",
            r["final"]
        );
        if mode == "broadcast" {
            assert!(
                r["rejected"]["round_jump"].as_u64().unwrap_or(0) > 0,
                "{}",
                r["rejected"]
            );
        }
    }
}

#[test]
fn a_partition_splits_the_swarm_and_mixing_heals_it() {
    let (r, rows) = run_with_rounds(Scenario {
        topology: "random-regular:4".into(),
        mode: "mixing".into(),
        rounds: 40,
        consensus_rounds: 10,
        cuts: vec!["halves@1s-2s".into()],
        ..digits16()
    });
    assert!(r["network"]["messages_cut"].as_u64().unwrap() > 0);
    let at = |ms: u64| rows.iter().rev().find(|row| row.virtual_ms <= ms).unwrap();
    let (before, during) = (at(1000), at(2000));
    eprintln!(
        "consensus {:.2e} before the cut, {:.2e} at its end (round {} → {}), {:.2e} at the end",
        before.consensus,
        during.consensus,
        before.round,
        during.round,
        rows.last().unwrap().consensus
    );
    // Both halves kept training through the cut, and drifted apart ...
    assert!(during.round >= before.round + 5, "{before:?} {during:?}");
    assert!(during.consensus > 2.0 * before.consensus);
    assert!(during.accuracy_mean > 0.9);
    // ... and mixing brought them back together after it.
    assert!(rows.last().unwrap().consensus < 0.05 * during.consensus);
    assert_eq!(rows.last().unwrap().nodes, 16);
}

#[test]
fn a_bandwidth_cap_makes_rounds_take_longer() {
    let base = Scenario {
        rounds: 5,
        ..digits16()
    };
    let (free, free_rows) = run_with_rounds(base.clone());
    let (capped, capped_rows) = run_with_rounds(Scenario {
        bandwidth_mbps: 1.0,
        ..base.clone()
    });
    let (starved, starved_rows) = run_with_rounds(Scenario {
        bandwidth_mbps: 0.5,
        ..base
    });
    // Each node serves its 2.6 kB delta to 15 peers per round, and takes in
    // 15 of them: about 0.3 s at 1 Mbit/s, twice that at 0.5 Mbit/s, which
    // comes close to the round deadline (0.6 s), so rounds close without
    // every delta. (A node whose delta a peer's next version already holds
    // takes that version at once, so rounds no longer wait for the slowest
    // node's own closing: 1 Mbit/s went from 2,140 to 1,413 ms.)
    let ms = |rows: &[Row]| rows[4].virtual_ms;
    let acc = |r: &serde_json::Value| f(&r["final"]["accuracy_mean"]);
    eprintln!(
        "5 rounds: {} ms and accuracy {:.4} unlimited, {} ms and {:.4} at 1 Mbit/s, {} ms and {:.4} at 0.5 Mbit/s",
        ms(&free_rows),
        acc(&free),
        ms(&capped_rows),
        acc(&capped),
        ms(&starved_rows),
        acc(&starved)
    );
    assert!(ms(&capped_rows) > ms(&free_rows));
    assert!(ms(&capped_rows) >= 5 * 250, "{}", ms(&capped_rows));
    // Same deltas, only later: the very same model.
    assert_eq!(acc(&capped), acc(&free));
    assert_eq!(f(&capped["final"]["consensus_distance"]), 0.0);
    // Rounds took about as long as moving the deltas takes, and at most
    // the deadline (and a little past it where a node moved to a preferred
    // version of the round when its announcement came).
    assert!(
        (5 * 500..5 * 600 + 5 * 100).contains(&ms(&starved_rows)),
        "{}",
        ms(&starved_rows)
    );
    assert!(f(&starved["final"]["consensus_distance"]) > 0.01);
}

#[test]
fn in_mixing_mode_clipping_holds_off_attackers_that_wreck_the_plain_mean() {
    let base = Scenario {
        nodes: 32,
        topology: "random-regular:6".into(),
        mode: "mixing".into(),
        ..digits16()
    };
    let clean = f(&run(base.clone())["final"]["accuracy_mean"]);
    // The plain-mean baseline diverges to non-finite models; the run must
    // still finish (a node whose training diverges contributes no step
    // instead of stalling its round).
    let r = run(Scenario {
        byzantine: "0.25:sign-flip:10".into(),
        aggregator: "clip:1".into(),
        baselines: true,
        ..base
    });
    let clipped = f(&r["final"]["accuracy_mean"]);
    let plain = f(&r["baselines"]["plain_mean"]["accuracy_mean"]);
    eprintln!(
        "mixing, 8 of 32 sign-flip ×10: clip {clipped:.4}, plain mean {plain:.4}, attack-free {clean:.4}"
    );
    assert!(clipped >= 0.9 * clean, "{clipped} vs {clean}");
    assert!(plain < 0.5 * clean, "{plain}");
}

#[test]
fn with_real_chunk_stores_fetches_are_served_from_them_and_nothing_changes() {
    let s = Scenario {
        nodes: 6,
        rounds: 12,
        baselines: false,
        ..Scenario::default()
    };
    let plain = run(s.clone());
    let stored = run(Scenario {
        chunk_store: true,
        ..s
    });
    assert_eq!(plain["final"], stored["final"]);
    assert!(plain["store"].is_null());
    // Every node keeps its head's whole lineage: 12 versions and the 6
    // deltas that built each one, one chunk apiece at this size.
    assert_eq!(stored["store"]["chunks_per_node"], 12 * 7);
    assert!(stored["store"]["bytes_per_node"].as_u64().unwrap() > 12 * 7 * 840);
}

/// 16 nodes, digits, Dirichlet 0.5, seed 3: the setting the robust rules
/// are measured on.
fn robust_setting(rounds: u64) -> Scenario {
    Scenario {
        nodes: 16,
        rounds,
        seed: 3,
        data: digits(),
        partition: "dirichlet:0.5".into(),
        baselines: false,
        ..Scenario::default()
    }
}

#[test]
fn every_forged_version_is_refused_in_the_simulator_and_takes_nothing_over() {
    let calm = run(Scenario {
        aggregator: "clip:0.5:3".into(),
        ..robust_setting(20)
    });
    let calm_acc = f(&calm["final"]["accuracy_mean"]);
    // Forged versions, merges and round jumps only (the Byzantine nodes'
    // deltas are honest): refused by every honest node, so nothing changes.
    for (attack, reasons) in [
        ("forge-version", &["version_mismatch", "unknown_delta"][..]),
        ("forge-merge", &["not_a_branch"][..]),
        ("round-jump", &["round_jump"][..]),
    ] {
        let r = run(Scenario {
            aggregator: "clip:0.5:3".into(),
            byzantine: format!("0.25:{attack}"),
            ..robust_setting(20)
        });
        eprintln!(
            "{attack}: accuracy {} rejected {}",
            r["final"]["accuracy_mean"], r["rejected"]
        );
        for reason in reasons {
            assert!(
                r["rejected"][reason].as_u64().unwrap_or(0) > 0,
                "{attack}: {}",
                r["rejected"]
            );
        }
        assert_eq!(f(&r["final"]["accuracy_mean"]), calm_acc, "{attack}");
        assert!(f(&r["final"]["consensus_distance"]) < 1e-6, "{attack}");
    }
    // All of it at once, with 20 deltas a round at −9 × claiming 2^64
    // samples: one vote each, bounded by the rule.
    let r = run(Scenario {
        aggregator: "clip:0.5:3".into(),
        byzantine: "0.25:takeover".into(),
        ..robust_setting(20)
    });
    eprintln!(
        "takeover: accuracy {} (calm {calm_acc}) rejected {}",
        r["final"]["accuracy_mean"], r["rejected"]
    );
    for reason in ["duplicate_author_round", "not_a_branch", "round_jump"] {
        assert!(
            r["rejected"][reason].as_u64().unwrap_or(0) > 0,
            "{}",
            r["rejected"]
        );
    }
    assert!(f(&r["final"]["accuracy_mean"]) >= 0.95 * calm_acc, "{r}");
}

#[test]
fn clipping_around_the_median_keeps_95_percent_under_a_quarter_of_attackers() {
    // Median-centred clipping, and the same after weighing inputs by their
    // alignment with the median (aligned): each against its own run
    // without attackers.
    for rule in ["clip:0.5:3", "aligned:1:10"] {
        let calm = f(&run(Scenario {
            aggregator: rule.into(),
            ..robust_setting(40)
        })["final"]["accuracy_mean"]);
        for attack in ["sign-flip:10", "alie"] {
            let r = run(Scenario {
                aggregator: rule.into(),
                byzantine: format!("0.25:{attack}"),
                ..robust_setting(40)
            });
            let acc = f(&r["final"]["accuracy_mean"]);
            eprintln!(
                "{rule} {attack}: {acc:.4} against {calm:.4} without attackers ({:.3}×)",
                acc / calm
            );
            assert!(acc >= 0.95 * calm, "{rule} {attack}: {acc} against {calm}");
        }
    }
}
