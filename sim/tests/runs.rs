//! `tapestry-sim run` end to end: figures against baselines, attacks,
//! determinism, and bad input, through the library and the real binary.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use tapestry_sim::report;
use tapestry_sim::scenario::Scenario;

fn digits() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/digits.csv.gz");
    assert!(
        p.is_file(),
        "tests need the shared digits data set beside the checkout"
    );
    p.display().to_string()
}

fn run(s: Scenario) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    report::run(&s.settings().unwrap(), dir.path(), &mut |_, _| {})
        .unwrap()
        .json
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
        mode: "broadcast".into(),
        ..Scenario::default()
    };
    let settings = s.settings().unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut ra = report::run(&settings, a.path(), &mut |_, _| {})
        .unwrap()
        .json;
    let mut rb = report::run(&settings, b.path(), &mut |_, _| {})
        .unwrap()
        .json;
    ra["wall_seconds"] = serde_json::json!(0);
    rb["wall_seconds"] = serde_json::json!(0);
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
}
