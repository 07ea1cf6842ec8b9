//! The `tapestry-lab` command line: bad flags and scenario files are
//! one-line errors with exit code 2, before anything is started. (Runs of
//! real processes are black-box tests in the workspace's `tests/`.)

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn lab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tapestry-lab"))
}

#[test]
fn help_names_the_command_and_its_flags() {
    let r = lab().args(["cluster", "--help"]).output().unwrap();
    assert!(r.status.success());
    let text = String::from_utf8_lossy(&r.stdout);
    for flag in [
        "--nodes",
        "--event",
        "--netns",
        "--latency",
        "--loss",
        "--scenario",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help:\n{text}");
    }
}

#[test]
fn bad_cluster_flags_are_one_line_errors_with_exit_code_2() {
    let out = tempfile::tempdir().unwrap();
    let bad = out.path().join("bad.toml");
    std::fs::write(&bad, "nodes = 4\ncolour = \"blue\"\n").unwrap();
    let bad_scenario = bad.display().to_string();
    for (args, needle) in [
        (vec!["--nodes", "1"], "--nodes"),
        (vec!["--event", "kill:9@1s"], "node 9"),
        (vec!["--event", "kill:0@1s"], "bootstrap"),
        (vec!["--partition", "lumpy"], "lumpy"),
        (vec!["--data", "/nonexistent.csv"], "/nonexistent.csv"),
        (vec!["--event", "cut:0,1@2s"], "heal"),
        (vec!["--event", "cut:0,1|2@1s-2s"], "every node"),
        (vec!["--loss", "150%"], "--loss"),
        (vec!["--latency", "soon"], "--latency"),
        (vec!["--nodes", "5", "--regions", "3"], "--regions"),
        (
            vec!["--federate-every", "2"],
            "--federate-every needs --regions",
        ),
        (
            vec!["--regions", "2", "--region-loss", "50"],
            "--region-loss",
        ),
        (vec!["--region-latency", "9ms"], "need --regions"),
        (
            vec![
                "--regions",
                "2",
                "--federate-every",
                "2",
                "--federation-graph",
                "star",
            ],
            "star",
        ),
        (
            vec![
                "--regions",
                "2",
                "--federate-every",
                "2",
                "--federation-clip",
                "0",
            ],
            "--federation-clip",
        ),
        (vec!["--nat", "0:cone"], "node 0 is the public bootstrap"),
        (vec!["--nat", "2:full"], "public, cone or symmetric"),
        (vec!["--nat", "two"], "N:KIND"),
        (vec!["--scenario", "/nonexistent.toml"], "/nonexistent.toml"),
        (vec!["--scenario", bad_scenario.as_str()], "colour"),
    ] {
        let r = lab()
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
