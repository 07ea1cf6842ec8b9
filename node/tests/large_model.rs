//! A model of real size in bounded memory and disk: three real `tapestry
//! run` processes on loopback train an MLP of 4.35 million parameters
//! (17.4 MB of f32) on shards of the digits data for a few rounds. Their
//! heads agree at the end; each process's peak resident memory (`VmHWM`,
//! read from `/proc`) stays under three times the model's f32 size plus
//! 200 MB; and each store stays within its retention bound, on disk too.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tapestry_lab::process::{NodeProcess, disk_bytes, init, local_run, set_config, status};

const ARCHITECTURE: &str = "mlp:2048,2048";
const PARAMS: u64 = 64 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 10 + 10;
const ROUNDS: u64 = 6;
const KEEP: u64 = 2;

fn start(dir: &Path, shard: usize, boot: Option<&str>) -> NodeProcess {
    let bin = Path::new(env!("CARGO_BIN_EXE_tapestry"));
    let digits = tapestry_testkit::digits_arg();
    let shard = format!("{shard}/3");
    let args = [
        "--min-round-ms",
        "0",
        "--data",
        &digits,
        "--shard",
        &shard,
        "--start-peers",
        "2",
    ];
    let mut cmd = local_run(bin, dir, &args);
    if let Some(b) = boot {
        cmd.args(["--bootstrap", b]);
    }
    NodeProcess::spawn(cmd, dir).unwrap()
}

#[test]
fn three_nodes_train_a_4m_model_in_bounded_memory_and_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("n{i}"))).collect();
    let bin = Path::new(env!("CARGO_BIN_EXE_tapestry"));
    for d in &dirs {
        init(bin, d, &["--region", "large"]).unwrap();
        for (key, value) in [
            ("architecture", format!("{ARCHITECTURE:?}")),
            ("local_steps", "5".to_owned()),
            ("timeout_ms", "120000".to_owned()),
            ("rounds", ROUNDS.to_string()),
            ("keep_versions", KEEP.to_string()),
        ] {
            set_config(d, key, &value).unwrap();
        }
    }
    let mut nodes = vec![start(&dirs[0], 0, None)];
    let boot = nodes[0].endpoints(Duration::from_secs(60)).unwrap()["listen"][0]
        .as_str()
        .unwrap()
        .to_owned();
    for (i, d) in dirs.iter().enumerate().skip(1) {
        nodes.push(start(d, i, Some(&boot)));
    }
    let apis: Vec<String> = nodes
        .iter()
        .map(|n| {
            n.api(Duration::from_secs(60))
                .unwrap_or_else(|| panic!("no endpoints; log:\n{}", n.log()))
        })
        .collect();

    let deadline = Instant::now() + Duration::from_secs(900);
    let finals: Vec<Value> = loop {
        let st: Vec<Option<Value>> = apis.iter().map(|a| status(a).ok()).collect();
        if st
            .iter()
            .all(|s| s.as_ref().is_some_and(|s| s["finished"] == true))
        {
            break st.into_iter().map(Option::unwrap).collect();
        }
        assert!(
            Instant::now() < deadline,
            "the nodes did not finish: {st:?}\nlog of node 0:\n{}",
            nodes[0].log()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let peak: Vec<u64> = nodes.iter().map(|n| n.peak_rss_bytes().unwrap()).collect();
    for n in &mut nodes {
        n.terminate(Duration::from_secs(60));
    }

    let model_bytes = 4 * PARAMS;
    let head = finals[0]["head_params"].as_str().unwrap().to_owned();
    for s in &finals {
        assert!(s["round"].as_u64().unwrap() >= ROUNDS, "{s}");
        assert_eq!(
            s["head_params"].as_str(),
            Some(head.as_str()),
            "heads differ"
        );
    }

    // Memory: three times the model's f32 size and 200 MB, whatever the
    // number of peers.
    let bound = 3 * model_bytes + 200_000_000;
    eprintln!(
        "peak RSS: {:?} MB (bound {} MB)",
        peak.iter().map(|b| b / 1_000_000).collect::<Vec<_>>(),
        bound / 1_000_000
    );
    for (i, p) in peak.iter().enumerate() {
        assert!(*p <= bound, "node {i}: peak RSS {p} bytes over {bound}");
    }

    // Disk: retention keeps the versions of the head's round and the KEEP
    // rounds before it, each with its round's three deltas, plus at most
    // one round written since the previous collection; compaction keeps
    // the packs within 1.25× what they hold, besides the pack being
    // written; the database is small.
    let per_round = 4 * model_bytes;
    for (i, d) in dirs.iter().enumerate() {
        let store = d.join("store");
        let (packs, meta) = (
            disk_bytes(&store.join("packs")),
            disk_bytes(&store.join("meta")),
        );
        let held = finals[i]["store_chunk_bytes"].as_u64().unwrap();
        eprintln!(
            "node {i}: {held} bytes of chunks held ({:.1} models), {packs} of packs, {meta} of database",
            held as f64 / model_bytes as f64
        );
        assert!(
            held <= (KEEP + 2) * per_round,
            "node {i}: {held} bytes held, over the retention bound"
        );
        assert!(
            held >= (KEEP + 1) * model_bytes,
            "node {i}: {held} bytes held: kept versions lost"
        );
        assert!(
            packs as f64 <= 1.25 * held as f64 + f64::from(64u32 << 20),
            "node {i}: {packs} bytes of packs for {held} held"
        );
        assert!(meta <= 16 << 20, "node {i}: a database of {meta} bytes");
    }
}
