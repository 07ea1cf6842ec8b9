//! Round time of three real nodes on loopback, and what verifying peers'
//! versions costs inside it: three `tapestry run` processes (release
//! build) on 127.0.0.1 train a model on shards of the digits data set; the
//! bench polls their `/status` to time every round, and reads at the end
//! how many peers' versions each node verified by recomputation, how long
//! that took (`recompute_ms`: rebuilding and checking; `keep_verified_ms`:
//! storing the result), how many it matched to a version it made or
//! verified itself (same parent and deltas: compared, not recomputed), and
//! how many delta bytes it fetched only to verify.
//!
//! It also shows where a round's time goes (each node's `stage_ms`: train,
//! evaluate, encode, hash, sign, store, announce, fetch, check_chunks,
//! decode, aggregate, verify, adopt, engine), each node's peak RSS
//! (VmHWM), and, in the same run, how long moving each node's bytes of a
//! round takes over plain loopback TCP (one connection per node, all at
//! once, each carrying that node's received bytes per round): the round's
//! overhead (median round minus training and evaluation) against that.
//!
//! `cargo bench -p tapestry-node --bench rounds [-- small|medium|large|huge]`
//! (needs the digits data set at `../shared/data/digits.csv.gz`; `huge`,
//! 100 million parameters, is run only when named). The nodes send f32
//! deltas; `TAPESTRY_BENCH_CODEC=topk-int8:0.01` (any codec) sets another,
//! `TAPESTRY_BENCH_KEEP=K` the versions each node keeps (`keep_versions`),
//! `TAPESTRY_BENCH_NODES=N` the number of nodes (3 by default). It also
//! reports each node's upload as an author (`own_bytes_out`: its own
//! deltas' chunks served to peers) in copies of its delta per round: with
//! swarming, members share an author's upload.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tapestry_lab::process::{NodeProcess, set_config};

/// One model to run.
struct Case {
    name: &'static str,
    architecture: &'static str,
    local_steps: u32,
    rounds: u64,
    timeout_ms: u64,
}

const CASES: [Case; 4] = [
    Case {
        name: "small",
        architecture: "mlp:64",
        local_steps: 20,
        rounds: 40,
        timeout_ms: 10_000,
    },
    Case {
        name: "medium",
        architecture: "mlp:2048,2048",
        local_steps: 5,
        rounds: 16,
        timeout_ms: 60_000,
    },
    Case {
        name: "large",
        architecture: "mlp:4096,4096",
        local_steps: 5,
        rounds: 16,
        timeout_ms: 120_000,
    },
    Case {
        name: "huge",
        architecture: "mlp:10000,10000",
        local_steps: 5,
        rounds: 6,
        timeout_ms: 600_000,
    },
];

/// Nodes in the run (`TAPESTRY_BENCH_NODES`, default 3).
fn nodes() -> usize {
    std::env::var("TAPESTRY_BENCH_NODES")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|n| *n >= 2)
        .unwrap_or(3)
}

fn start(dir: &Path, shard: usize, boot: Option<&str>) -> NodeProcess {
    let _ = std::fs::remove_file(dir.join("node.log"));
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_tapestry"));
    let digits = tapestry_testkit::digits_arg();
    let shard = format!("{shard}/{}", nodes());
    let start_peers = (nodes() - 1).to_string();
    let args = [
        "--min-round-ms",
        "0",
        "--data",
        &digits,
        "--shard",
        &shard,
        "--start-peers",
        &start_peers,
    ];
    let mut cmd = tapestry_lab::process::local_run(bin, dir, &args);
    if let Some(b) = boot {
        cmd.args(["--bootstrap", b]);
    }
    NodeProcess::spawn(cmd, dir).unwrap()
}

fn endpoints(n: &NodeProcess) -> Value {
    n.endpoints(Duration::from_secs(120))
        .expect("no endpoints.json")
}

fn status(api: &str) -> Option<Value> {
    let body = tapestry_node::api::get(api, "/status", Duration::from_secs(30)).ok()?;
    serde_json::from_str(&body).ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn run(case: &Case) {
    let tmp = tempfile::tempdir().unwrap();
    let n_nodes = nodes();
    let dirs: Vec<PathBuf> = (0..n_nodes)
        .map(|i| tmp.path().join(format!("n{i}")))
        .collect();
    for d in &dirs {
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_tapestry"));
        tapestry_lab::process::init(bin, d, &["--region", "bench"]).unwrap();
        for (key, value) in [
            ("architecture", format!("{:?}", case.architecture)),
            ("local_steps", case.local_steps.to_string()),
            ("timeout_ms", case.timeout_ms.to_string()),
            ("rounds", case.rounds.to_string()),
        ] {
            set_config(d, key, &value).unwrap();
        }
        if let Ok(codec) = std::env::var("TAPESTRY_BENCH_CODEC") {
            set_config(d, "codec", &format!("{codec:?}")).unwrap();
        }
        if let Ok(keep) = std::env::var("TAPESTRY_BENCH_KEEP") {
            set_config(d, "keep_versions", &keep).unwrap();
        }
    }
    let mut nodes = vec![start(&dirs[0], 0, None)];
    let boot = endpoints(&nodes[0])["listen"][0]
        .as_str()
        .unwrap()
        .to_owned();
    for (i, d) in dirs.iter().enumerate().skip(1) {
        nodes.push(start(d, i, Some(&boot)));
    }
    let apis: Vec<String> = nodes
        .iter()
        .map(|n| endpoints(n)["api"].as_str().unwrap().to_owned())
        .collect();

    // When each node was first seen in each round.
    let mut seen: Vec<Vec<(u64, Instant)>> = vec![Vec::new(); n_nodes];
    let deadline =
        Instant::now() + Duration::from_secs(60 + case.rounds * (case.timeout_ms / 1000).max(120));
    let finals = loop {
        let st: Vec<Option<Value>> = apis.iter().map(|a| status(a)).collect();
        let now = Instant::now();
        for (i, s) in st.iter().enumerate() {
            if let Some(r) = s.as_ref().and_then(|s| s["round"].as_u64())
                && seen[i].last().is_none_or(|(last, _)| r > *last)
            {
                seen[i].push((r, now));
            }
        }
        if st
            .iter()
            .all(|s| s.as_ref().is_some_and(|s| s["finished"] == true))
        {
            break st.into_iter().map(Option::unwrap).collect::<Vec<_>>();
        }
        assert!(now < deadline, "the nodes did not finish: {st:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let model_bytes = tapestry_node::api::get(&apis[0], "/model/head", Duration::from_secs(30))
        .ok()
        .and_then(|b| serde_json::from_str::<Value>(&b).ok())
        .and_then(|h| h["payload_bytes"].as_u64())
        .unwrap_or(0)
        .max(1);
    let peak_rss: Vec<u64> = nodes
        .iter()
        .map(|n| n.peak_rss_bytes().unwrap_or(0))
        .collect();
    for n in &mut nodes {
        n.terminate(Duration::from_secs(60));
    }
    // Each store at the end, on disk (its packs and its database) against
    // the chunk bytes it holds.
    let stores: Vec<(u64, u64, u64)> = dirs
        .iter()
        .zip(&finals)
        .map(|(d, s)| {
            let store = d.join("store");
            (
                tapestry_lab::process::disk_bytes(&store.join("packs")),
                tapestry_lab::process::disk_bytes(&store.join("meta")),
                s["store_chunk_bytes"].as_u64().unwrap_or(0),
            )
        })
        .collect();

    // Round times: from a node's entering round r to its entering r + 1,
    // for every r after the first two (start-up), on every node.
    let mut round_ms = Vec::new();
    for s in &seen {
        for w in s.windows(2).skip(2) {
            if w[1].0 == w[0].0 + 1 {
                round_ms.push((w[1].1 - w[0].1).as_secs_f64() * 1e3);
            }
        }
    }
    let rounds: f64 = finals
        .iter()
        .map(|s| s["round"].as_u64().unwrap() as f64)
        .sum();
    let sum = |k: &str| -> f64 { finals.iter().map(|s| s[k].as_f64().unwrap_or(0.0)).sum() };
    let (recompute_ms, verified, fetched, matched, keep_ms) = (
        sum("recompute_ms"),
        sum("versions_verified"),
        sum("verify_fetched_bytes"),
        sum("versions_matched"),
        sum("keep_verified_ms"),
    );
    let med = median(round_ms.clone());
    let per_round = recompute_ms / rounds;
    let accuracy = sum("accuracy") / n_nodes as f64;
    println!(
        "{}: {} ({} rounds, {} inner steps), {n_nodes} nodes on loopback",
        case.name, case.architecture, case.rounds, case.local_steps
    );
    println!(
        "  round time: median {med:.1} ms over {} rounds (min {:.1}, max {:.1})",
        round_ms.len(),
        round_ms.iter().copied().fold(f64::INFINITY, f64::min),
        round_ms.iter().copied().fold(0.0, f64::max),
    );
    println!(
        "  versions verified by recomputation: {verified} ({:.2} per node-round)",
        verified / rounds
    );
    println!(
        "  recompute: {recompute_ms:.1} ms in all, {:.2} ms per verified version, {per_round:.2} ms per node-round = {:.2} % of the median round",
        if verified > 0.0 {
            recompute_ms / verified
        } else {
            0.0
        },
        100.0 * per_round / med
    );
    println!(
        "  versions matched to one made or verified here (compared, not recomputed): {matched} ({:.2} per node-round)",
        matched / rounds
    );
    println!(
        "  storing recomputed versions: {keep_ms:.1} ms in all, {:.2} ms per node-round = {:.2} % of the median round",
        keep_ms / rounds,
        100.0 * keep_ms / rounds / med
    );
    println!(
        "  delta bytes fetched only to verify: {fetched} ({:.0} per node-round)",
        fetched / rounds
    );
    println!("  mean accuracy at the end: {accuracy:.4}");

    // Where the time went, per node-round.
    let stage = |k: &str| -> f64 {
        finals
            .iter()
            .map(|s| s["stage_ms"][k].as_f64().unwrap_or(0.0))
            .sum::<f64>()
            / rounds
    };
    let labels = [
        "train",
        "evaluate",
        "encode",
        "hash",
        "sign",
        "store",
        "announce",
        "fetch",
        "check_chunks",
        "decode",
        "aggregate",
        "verify",
        "adopt",
        "engine",
    ];
    println!("  stages, ms per node-round (they overlap in time: fetches run beside training):");
    for l in labels {
        println!("    {l:>13}: {:>10.1}", stage(l));
    }
    let overhead = med - stage("train") - stage("evaluate");
    let params = finals[0]["head_params"].as_str().unwrap_or("?").to_owned();
    println!(
        "  heads agree at the end: {}",
        finals
            .iter()
            .all(|s| s["head_params"].as_str() == Some(params.as_str()))
    );
    let per_round: Vec<u64> = finals
        .iter()
        .map(|s| {
            (s["bytes_in"].as_u64().unwrap_or(0) as f64
                / s["round"].as_u64().unwrap_or(1).max(1) as f64) as u64
        })
        .collect();
    let raw: Vec<f64> = (0..3).map(|_| raw_tcp_seconds(&per_round)).collect();
    // Each node's upload as an author: its own deltas' bytes served, per
    // round, in copies of one delta (the head's payload size).
    println!(
        "  author's upload per round, in copies of its delta: {}",
        finals
            .iter()
            .map(|s| format!(
                "{:.2}",
                s["own_bytes_out"].as_u64().unwrap_or(0) as f64
                    / s["round"].as_u64().unwrap_or(1).max(1) as f64
                    / model_bytes as f64
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let raw_ms = median(raw.clone()) * 1e3;
    println!(
        "  bytes in per round: {} (node by node)",
        per_round
            .iter()
            .map(|b| format!("{:.1} MB", *b as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  raw TCP, the same bytes (one connection per node, all at once): median {raw_ms:.1} ms of 3 ({:?} s)",
        raw.iter()
            .map(|r| (r * 1e3).round() / 1e3)
            .collect::<Vec<_>>()
    );
    println!(
        "  overhead (median round - train - evaluate): {overhead:.1} ms = {:.2}x the raw transfer",
        overhead / raw_ms
    );
    println!(
        "  store at the end (keep_versions {}): {} (node by node; one model: {:.1} MB)",
        std::env::var("TAPESTRY_BENCH_KEEP").unwrap_or_else(|_| "256, the default".into()),
        stores
            .iter()
            .map(|(packs, meta, chunks)| format!(
                "packs {:.1} MB + database {:.1} MB for {:.1} MB of chunks ({:.2}x; {:.1} models)",
                *packs as f64 / 1e6,
                *meta as f64 / 1e6,
                *chunks as f64 / 1e6,
                *packs as f64 / (*chunks).max(1) as f64,
                (*packs + *meta) as f64 / model_bytes as f64
            ))
            .collect::<Vec<_>>()
            .join("; "),
        model_bytes as f64 / 1e6
    );
    println!(
        "  peak RSS (VmHWM): {} (node by node)",
        peak_rss
            .iter()
            .map(|b| format!("{:.0} MB", *b as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// Seconds to move `bytes[i]` over loopback TCP on connection `i`, all
/// connections at once (each a writer and a reader thread).
fn raw_tcp_seconds(bytes: &[u64]) -> f64 {
    use std::io::{Read, Write};
    let started = Instant::now();
    std::thread::scope(|s| {
        for &n in bytes {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            s.spawn(move || {
                let (mut conn, _) = listener.accept().unwrap();
                let mut buf = vec![0u8; 1 << 20];
                let mut got = 0u64;
                while got < n {
                    let k = conn.read(&mut buf).unwrap();
                    assert!(k > 0, "the writer closed early");
                    got += k as u64;
                }
            });
            s.spawn(move || {
                let mut conn = std::net::TcpStream::connect(addr).unwrap();
                let buf = vec![7u8; 1 << 20];
                let mut left = n;
                while left > 0 {
                    let k = left.min(buf.len() as u64) as usize;
                    conn.write_all(&buf[..k]).unwrap();
                    left -= k as u64;
                }
            });
        }
    });
    started.elapsed().as_secs_f64()
}

fn main() {
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for case in &CASES {
        let named = only.iter().any(|o| o == case.name);
        if named || (only.is_empty() && case.name != "huge") {
            run(case);
        }
    }
}
