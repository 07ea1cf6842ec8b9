//! A long run keeps its store bounded: a real `tapestry run` process for
//! 300 rounds with `keep_versions = 8` holds about nine versions and their
//! deltas at the end, not three hundred.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use tapestry_lab::process::{NodeProcess, init, run_local, set_config, status};

const ROUNDS: u64 = 300;
const KEEP: u64 = 8;

fn start(dir: &Path) -> (NodeProcess, String) {
    let tapestry = Path::new(env!("CARGO_BIN_EXE_tapestry"));
    init(tapestry, dir, &["--region", "test"]).unwrap();
    set_config(dir, "keep_versions", &KEEP.to_string()).unwrap();
    let digits = tapestry_testkit::digits_arg();
    let rounds = ROUNDS.to_string();
    let args = [
        "--min-round-ms",
        "0",
        "--data",
        &digits,
        "--start-peers",
        "0",
        "--rounds",
        &rounds,
    ];
    let node = run_local(tapestry, dir, &args).unwrap();
    let api = node
        .api(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no endpoints; log:\n{}", node.log()));
    (node, api)
}

/// Polls the status (bounded) until `ok` holds.
fn wait(
    node: &NodeProcess,
    api: &str,
    secs: u64,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(s) = status(api)
            && ok(&s)
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_long_run_keeps_its_latest_versions_and_collects_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let (node, api) = start(tmp.path());
    wait(&node, &api, 600, "the rounds to finish", |s| {
        s["finished"].as_bool() == Some(true)
    });
    // The last collection runs after the last head; its figures settle.
    let model_bytes = 4 * (64 * 10 + 10);
    let s = wait(&node, &api, 30, "the last collection", |s| {
        s["store_manifests"].as_u64().is_some_and(|m| m > 0)
    });
    let (bytes, manifests) = (
        s["store_chunk_bytes"].as_u64().unwrap(),
        s["store_manifests"].as_u64().unwrap(),
    );
    eprintln!(
        "after {} rounds: {bytes} chunk bytes, {manifests} manifests (one version: {model_bytes} bytes)",
        s["round"]
    );
    assert!(s["round"].as_u64().unwrap() >= ROUNDS);
    // A lone node makes one version and one delta (f32, the model's size)
    // a round. Kept: the versions of the last KEEP rounds and the head, with
    // their deltas, plus at most one round written since the collection
    // before.
    let per_round = 2 * model_bytes;
    assert!(bytes <= (KEEP + 2) * per_round, "{bytes} bytes kept");
    assert!(
        bytes >= (KEEP + 1) * model_bytes,
        "{bytes} bytes kept: history lost"
    );
    assert!(manifests <= 2 * (KEEP + 2), "{manifests} manifests kept");
    // The collections deleted the rest of the history.
    let metrics = tapestry_node::api::get(&api, "/metrics", Duration::from_secs(5)).unwrap();
    let deleted = metrics
        .lines()
        .find(|l| l.starts_with("tapestry_gc_deleted_bytes_total "))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap();
    assert!(
        deleted >= ((ROUNDS - KEEP - 2) * model_bytes) as f64,
        "{deleted}"
    );
}
