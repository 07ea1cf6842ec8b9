//! `GET /health` and `tapestry health` tell a working node from a stuck
//! one: a real process whose node loop freezes (a fault hook) turns red
//! while its API still answers `/status`.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tapestry_lab::process::{NodeProcess, init, local_run, status};

fn tapestry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tapestry"))
}

fn health(api: &str) -> (bool, String) {
    let out = tapestry().args(["health", "--api", api]).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn start(dir: &Path, freeze_at: u64) -> (NodeProcess, String) {
    let bin = Path::new(env!("CARGO_BIN_EXE_tapestry"));
    init(bin, dir, &["--region", "test"]).unwrap();
    let digits = tapestry_testkit::digits_arg();
    let args = [
        "--min-round-ms",
        "200",
        "--data",
        &digits,
        "--start-peers",
        "0",
    ];
    let mut cmd = local_run(bin, dir, &args);
    cmd.env("TAPESTRY_FAULT_FREEZE_AT_ROUND", freeze_at.to_string());
    let node = NodeProcess::spawn(cmd, dir).unwrap();
    let api = node
        .api(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no endpoints; log:\n{}", node.log()));
    (node, api)
}

#[test]
fn a_frozen_node_loop_turns_health_red_while_status_still_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let freeze_at = 25;
    let (node, api) = start(tmp.path(), freeze_at);

    // Running: healthy (rounds every 200 ms, so the freeze is seconds away).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let round = status(&api).ok().and_then(|s| s["round"].as_u64());
        if round.is_some_and(|r| r >= 3) {
            break;
        }
        assert!(Instant::now() < deadline, "no rounds; log:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let round = status(&api).unwrap()["round"].as_u64().unwrap();
    assert!(round < freeze_at, "froze before it could be seen healthy");
    let (ok, text) = health(&api);
    assert!(ok, "a running node is unhealthy: {text}");

    // Frozen: the API still answers, the health check does not pass.
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let (ok, text) = health(&api);
        if !ok {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "still healthy; log:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(text.contains("node loop has been silent"), "{text}");
    let s = status(&api).unwrap();
    assert!(s["round"].as_u64().unwrap() >= freeze_at);
}
