//! `tapestry-sim cluster` end to end: real `tapestry` processes started,
//! killed, restarted and stopped by the launcher, on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

/// A binary of the workspace, built by `cargo test --workspace` beside this
/// test (target/<profile>/).
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built; run the whole suite (cargo test --workspace) or cargo build --workspace first",
        path.display()
    );
    path
}

fn digits() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/digits.csv.gz");
    assert!(
        p.is_file(),
        "tests need the shared digits data set beside the checkout"
    );
    p.display().to_string()
}

#[test]
fn five_processes_learn_digits_agree_and_survive_a_kill_and_a_late_join() {
    let out = tempfile::tempdir().unwrap();
    let result = Command::new(binary("tapestry-sim"))
        .args([
            "cluster",
            "--nodes",
            "5",
            "--rounds",
            "12",
            "--partition",
            "iid",
        ])
        .args(["--data", &digits()])
        .args(["--event", "kill:2@1500ms-3s", "--event", "join:4@1s"])
        .arg("--tapestry")
        .arg(binary("tapestry"))
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    let f = &report["final"];
    eprintln!("{f}");
    assert_eq!(f["heads_agree"], true);
    assert!(f["accuracy_min"].as_f64().unwrap() >= 0.9, "{f}");
    assert_eq!(f["consensus_distance"].as_f64().unwrap(), 0.0);
    for key in ["clean_exit", "scrub_clean"] {
        assert!(
            report[key].as_array().unwrap().iter().all(|v| v == true),
            "{key}: {}",
            report[key]
        );
    }
    for file in ["samples.csv", "accuracy.png", "rounds.png"] {
        assert!(out.path().join(file).is_file(), "{file}");
    }
    // The killed node really was down for a while.
    let samples = std::fs::read_to_string(out.path().join("samples.csv")).unwrap();
    assert!(
        samples
            .lines()
            .any(|l| l.split(',').nth(1) == Some("2") && l.split(',').nth(2) == Some("0"))
    );
}

#[test]
fn bad_cluster_flags_are_one_line_errors_with_exit_code_2() {
    let out = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (vec!["--nodes", "1"], "--nodes"),
        (vec!["--event", "kill:9@1s"], "node 9"),
        (vec!["--event", "kill:0@1s"], "bootstrap"),
        (vec!["--partition", "lumpy"], "lumpy"),
        (vec!["--data", "/nonexistent.csv"], "/nonexistent.csv"),
    ] {
        let r = Command::new(binary("tapestry-sim"))
            .arg("cluster")
            .args(&args)
            .arg("--out")
            .arg(out.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
}
