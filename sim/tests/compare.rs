//! `tapestry-sim compare`: experiment files, the comparison's figures
//! against the arms' own `rounds.csv`, and bad input.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use tapestry_sim::compare::{self, Experiment};

/// Two arms on digits: the reference averages f32 after every step, the
/// other sends top-1 % int8 after 10 steps; both take 60 local steps.
fn experiment(target: f64) -> String {
    format!(
        r#"
name = "small"
target = {target}
seed = 3
nodes = 4
data = "{data}"
partition = "iid"
model = "logistic"
batch_size = 32
lr = 0.1

[[arm]]
name = "naive"
label = "f32 every step"
local_steps = 1
rounds = 60
codec = "f32"

[[arm]]
name = "sparse"
local_steps = 10
rounds = 6
codec = "topk-int8:0.01"
"#,
        data = tapestry_testkit::digits_arg().replace('\\', "/"),
    )
}

/// (bytes sent per node, accuracy mean) of each round in an arm's rounds.csv.
fn rounds(dir: &std::path::Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("rounds.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            (c[6].parse().unwrap(), c[1].parse().unwrap())
        })
        .collect()
}

#[test]
fn the_comparison_reads_each_arms_curve_and_the_sparse_arm_sends_less() {
    let exp = Experiment::from_toml(&experiment(0.8)).unwrap();
    assert_eq!(exp.arms.len(), 2);
    assert_eq!(
        exp.arms[1].label, "sparse",
        "an arm without a label uses its name"
    );
    let dir = tempfile::tempdir().unwrap();
    let c = compare::run(&exp, dir.path(), false, &mut |_, _, _| {}).unwrap();
    assert_eq!(c.metric, "accuracy");
    for arm in &c.arms {
        let curve = rounds(&dir.path().join(&arm.name));
        assert_eq!(curve.len() as u64, arm.rounds);
        // The first round at or above the target, and the bytes by then,
        // are the arm's own rounds.csv's.
        let first = curve.iter().position(|(_, a)| *a >= 0.8);
        assert_eq!(
            arm.round_at_target,
            first.map(|i| i as u64 + 1),
            "{}",
            arm.name
        );
        assert_eq!(
            arm.bytes_to_target,
            first.map(|i| curve[i].0),
            "{}",
            arm.name
        );
        assert_eq!(arm.bytes_total, curve.last().unwrap().0);
        // rounds.csv writes six decimals.
        assert!((arm.final_metric - curve.last().unwrap().1).abs() < 1e-6);
    }
    let (naive, sparse) = (&c.arms[0], &c.arms[1]);
    assert_eq!(naive.saving, Some(1.0));
    assert_eq!(sparse.codec, "topk-int8:0.01");
    // Both reach 0.8 on digits; the sparse arm with fewer bytes (for a model
    // of 650 parameters the manifests and announcements, the same size in
    // both arms, weigh more than the payloads: 6x here, not 80x).
    let (a, b) = (
        naive.bytes_to_target.unwrap(),
        sparse.bytes_to_target.unwrap(),
    );
    assert_eq!(sparse.saving, Some(a as f64 / b as f64));
    assert!(sparse.saving.unwrap() > 2.0, "saving {:?}", sparse.saving);
    for f in [
        "communication.md",
        "communication.csv",
        "communication.json",
        "metric_vs_bytes.png",
    ] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    let md = std::fs::read_to_string(dir.path().join("communication.md")).unwrap();
    assert!(md.contains("| f32 every step | `f32` | 1 | 60 |"), "{md}");

    // Read back with another target: nothing runs again (no arm reports
    // progress), and the figures are the ones the first pass found.
    let again = Experiment::from_toml(&experiment(0.85)).unwrap();
    let mut ran = false;
    let c2 = compare::run(&again, dir.path(), true, &mut |_, _, _| ran = true).unwrap();
    assert!(!ran, "an arm ran again");
    for (a, b) in c.arms.iter().zip(&c2.arms) {
        assert_eq!(a.bytes_total, b.bytes_total);
        assert_eq!(a.rounds, b.rounds);
        assert!((a.final_metric - b.final_metric).abs() < 1e-6);
    }
    // An arm whose scenario changed is run again.
    let changed =
        Experiment::from_toml(&experiment(0.8).replace("rounds = 6\n", "rounds = 5\n")).unwrap();
    let mut ran_arms = std::collections::BTreeSet::new();
    let c3 = compare::run(&changed, dir.path(), true, &mut |i, _, _| {
        ran_arms.insert(i);
    })
    .unwrap();
    assert_eq!(ran_arms.into_iter().collect::<Vec<_>>(), vec![1]);
    assert_eq!(c3.arms[1].rounds, 5);
}

#[test]
fn a_target_never_reached_is_said_so() {
    let exp = Experiment::from_toml(&experiment(0.9999)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = compare::run(&exp, dir.path(), false, &mut |_, _, _| {}).unwrap();
    assert!(
        c.arms
            .iter()
            .all(|a| a.bytes_to_target.is_none() && a.saving.is_none())
    );
    let md = std::fs::read_to_string(dir.path().join("communication.md")).unwrap();
    assert!(md.contains("not reached"), "{md}");
}

#[test]
fn bad_experiment_files_are_one_line_errors() {
    let good = experiment(0.8);
    for (text, says) in [
        (good.replace("target = 0.8\n", ""), "no target"),
        (
            good.replace("target = 0.8", "target = -1.0"),
            "not a positive number",
        ),
        (
            good.split("[[arm]]\nname = \"sparse\"")
                .next()
                .unwrap()
                .to_owned(),
            "at least two",
        ),
        (
            good.replace("name = \"sparse\"", "name = \"naive\""),
            "two arms are named naive",
        ),
        (
            good.replace("name = \"sparse\"", "name = \"../up\""),
            "needs a name",
        ),
        (
            good.replace("codec = \"topk-int8:0.01\"", "codec = \"gzip\""),
            "arm sparse",
        ),
        (
            good.replace("local_steps = 10", "local_stpes = 10"),
            "arm sparse",
        ),
        ("target = [".to_owned(), ""),
    ] {
        let e = Experiment::from_toml(&text).err().unwrap().to_string();
        assert!(e.contains(says), "{e:?} does not say {says:?}");
        assert!(!e.contains('\n'), "{e:?}");
    }
    // Through the binary: exit code 2 and one line.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("e.toml");
    std::fs::write(&file, good.replace("target = 0.8\n", "")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tapestry-sim"))
        .args(["compare", "--experiment"])
        .arg(&file)
        .arg("--out")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no target"), "{err}");
}

#[test]
fn every_shipped_experiment_file_parses_and_checks() {
    let dir = format!("{}/experiments", env!("CARGO_MANIFEST_DIR"));
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        // The files' data paths are from the repository root; tests run in
        // sim/.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace(
                "\"text:../shared/data/fortunes\"",
                &format!("\"text:{}\"", tapestry_testkit::fortunes_dir().display()),
            )
            .replace(
                "\"../shared/data/digits.csv.gz\"",
                &format!("\"{}\"", tapestry_testkit::digits_arg()),
            );
        let e = Experiment::from_toml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(e.arms.len() >= 2, "{}", path.display());
        seen += 1;
    }
    assert!(seen >= 3, "{seen} experiment files");
}
