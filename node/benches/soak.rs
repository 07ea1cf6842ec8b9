//! A soak: six `tapestry run` processes (release build) on loopback for a
//! while (30 minutes by default) with a rogue flooding one of them
//! throughout — 400 chunk and head requests held open at all times, and
//! every 2 s a burst of 5,000 distinct signed announcements (far-future
//! rounds: each refused) — and, in the same invocation, the same run
//! without the rogue. Every 10 s it samples each node's round, RSS and
//! store size; it writes them to `target/soak/soak.csv`, plots RSS and
//! store size over time (`target/soak/rss.png`, `target/soak/store.png`),
//! and prints rounds per minute of both runs and how RSS and the store
//! moved over the run's second half.
//!
//! `cargo bench -p tapestry-node --bench soak [-- MINUTES [rogue]]`
//! (`rogue`: the flooded run only, for a quick look)
//! (needs the digits data set at `../shared/data/digits.csv.gz`).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tapestry_lab::process::{NodeProcess, set_config};
use tapestry_node::net::{self, NetConfig};
use tapestry_node::runtime::{deltas_topic, models_topic};
use tapestry_protocol::{Codec, ContentId, DeltaManifest, FetchRequest, Keypair, Signed};
use tapestry_sim::plot::{Series, line_chart};

const NODES: usize = 6;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tapestry"))
}

fn start(dir: &Path, shard: usize, boot: Option<&str>) -> NodeProcess {
    let digits = tapestry_testkit::digits_arg();
    let shard = format!("{shard}/{NODES}");
    let args = ["--data", &digits, "--shard", &shard, "--start-peers", "2"];
    let mut cmd = tapestry_lab::process::local_run(bin(), dir, &args);
    if let Some(b) = boot {
        cmd.args(["--bootstrap", b]);
    }
    NodeProcess::spawn(cmd, dir).unwrap()
}

fn status(api: &str) -> Option<Value> {
    let body = tapestry_node::api::get(api, "/status", Duration::from_secs(30)).ok()?;
    serde_json::from_str(&body).ok()
}

/// One sample of one node.
#[derive(Clone, Copy)]
struct Sample {
    t: f64,
    round: u64,
    rss: u64,
    store: u64,
}

/// The flood on `peer` (at `addr`) until `end`: held requests and bursts
/// of announcements. Returns (announcements published, requests answered).
async fn flood(addr: String, end: tokio::time::Instant) -> (usize, usize) {
    let key = Keypair::generate(&mut rand::rngs::OsRng);
    let topic = deltas_topic("digits", "soak");
    let (handle, mut events, _task) = net::spawn(
        &key,
        NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            bootstrap: vec![addr.parse().unwrap()],
            topics: vec![topic.clone(), models_topic("digits", "soak")],
            max_connections: 1,
            ..NetConfig::default()
        },
        &mut prometheus_client::registry::Registry::default(),
    )
    .unwrap();
    let peer = loop {
        if let Some(net::NetEvent::PeerConnected(p)) = events.recv().await {
            break p;
        }
    };
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let handle = Arc::new(handle);
    let asking: Vec<_> = (0..400)
        .map(|k| {
            let net = handle.clone();
            tokio::spawn(async move {
                let mut answered = 0usize;
                while tokio::time::Instant::now() < end {
                    let request = if k % 2 == 0 {
                        FetchRequest::Chunk(ContentId::of(&[k as u8]))
                    } else {
                        FetchRequest::Head {
                            model_id: "digits".into(),
                            region: "soak".into(),
                        }
                    };
                    if net.fetch(peer, request).await.is_ok() {
                        answered += 1;
                    } else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                answered
            })
        })
        .collect();
    // A delta of the nodes' model (logistic, 64 inputs, 10 classes), for a
    // round far ahead: the door refuses it after the signature check.
    let spec = tapestry_core::model::ModelSpec::Logistic {
        inputs: 64,
        classes: 10,
    };
    let layout = spec.layout();
    let values = vec![0.01f32; spec.n_params()];
    let payload = Codec::F32.encode(&values).unwrap();
    let chunk = tapestry_protocol::DEFAULT_CHUNK_SIZE;
    let (mut sent, mut seq) = (0usize, 1u64);
    let mut every = tokio::time::interval(Duration::from_secs(2));
    while tokio::time::Instant::now() < end {
        every.tick().await;
        for _ in 0..5_000 {
            seq += 1;
            let d = DeltaManifest {
                model_id: "digits".into(),
                region: "soak".into(),
                round: 1 << 40,
                base_version: ContentId::of(b""),
                author: key.node_id(),
                seq,
                codec: Codec::F32,
                layout: layout.clone(),
                payload_bytes: payload.len() as u64,
                chunk_size: chunk as u32,
                chunk_ids: payload.chunks(chunk).map(ContentId::of).collect(),
                sample_count: 1,
                l2_norm: 0.01 * (values.len() as f32).sqrt(),
                created_unix_ms: 0,
            };
            let Ok(d) = Signed::sign(d, &key) else {
                continue;
            };
            if handle
                .publish(&topic, d.envelope_bytes().to_vec())
                .await
                .is_ok()
            {
                sent += 1;
            }
        }
    }
    let mut answered = 0;
    for a in asking {
        answered += a.await.unwrap_or(0);
    }
    (sent, answered)
}

/// One run of `minutes`, with or without the rogue: every node's samples.
fn run(minutes: f64, rogue: bool) -> (Vec<Vec<Sample>>, Option<(usize, usize)>) {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..NODES)
        .map(|i| tmp.path().join(format!("n{i}")))
        .collect();
    for d in &dirs {
        tapestry_lab::process::init(bin(), d, &["--region", "soak"]).unwrap();
        // The rogue subscribes, so it counts as a member: rounds close on
        // the honest deltas without waiting for it.
        set_config(d, "quorum", "0.75").unwrap();
    }
    let mut nodes = vec![start(&dirs[0], 0, None)];
    let first = nodes[0]
        .endpoints(Duration::from_secs(120))
        .expect("no endpoints");
    let boot = first["listen"][0].as_str().unwrap().to_owned();
    for (i, d) in dirs.iter().enumerate().skip(1) {
        nodes.push(start(d, i, Some(&boot)));
    }
    let apis: Vec<String> = nodes
        .iter()
        .map(|n| {
            n.api(Duration::from_secs(120))
                .expect("no endpoints")
                .to_owned()
        })
        .collect();
    // Everyone running before the clock starts.
    let ready = Instant::now() + Duration::from_secs(120);
    while !apis
        .iter()
        .all(|a| status(a).is_some_and(|s| s["round"].as_u64().unwrap_or(0) >= 2))
    {
        assert!(Instant::now() < ready, "the nodes did not start");
        std::thread::sleep(Duration::from_millis(500));
    }
    let length = Duration::from_secs_f64(minutes * 60.0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let flooding = rogue.then(|| {
        let end = tokio::time::Instant::now() + length;
        rt.spawn(flood(boot.clone(), end))
    });
    let t0 = Instant::now();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); NODES];
    loop {
        let t = t0.elapsed().as_secs_f64();
        for (i, (n, api)) in nodes.iter().zip(&apis).enumerate() {
            let round = status(api)
                .and_then(|s| s["round"].as_u64())
                .or_else(|| samples[i].last().map(|s| s.round))
                .unwrap_or(0);
            samples[i].push(Sample {
                t,
                round,
                rss: n.rss_bytes().unwrap_or(0),
                store: tapestry_lab::process::disk_bytes(&n.dir().join("store")),
            });
        }
        if t0.elapsed() >= length {
            break;
        }
        std::thread::sleep(SAMPLE_EVERY.min(length.saturating_sub(t0.elapsed())));
    }
    let figures = flooding.map(|f| rt.block_on(f).unwrap());
    for n in &mut nodes {
        let _ = n.terminate(Duration::from_secs(20));
    }
    (samples, figures)
}

fn per_minute(s: &[Sample]) -> f64 {
    match (s.first(), s.last()) {
        (Some(a), Some(b)) if b.t > a.t => (b.round - a.round) as f64 / ((b.t - a.t) / 60.0),
        _ => f64::NAN,
    }
}

/// (at half time, at the end, most) of `f` over the samples.
fn drift(s: &[Sample], f: impl Fn(&Sample) -> u64) -> (u64, u64, u64) {
    let half = s
        .iter()
        .find(|x| x.t >= s.last().map_or(0.0, |l| l.t) / 2.0);
    (
        half.map_or(0, &f),
        s.last().map_or(0, &f),
        s.iter().map(&f).max().unwrap_or(0),
    )
}

fn main() {
    let minutes: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(30.0);
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/soak");
    std::fs::create_dir_all(&out).unwrap();
    println!("soak: {NODES} nodes, {minutes} min without the rogue, then {minutes} min with it");
    // `-- MINUTES rogue`: the flooded run only (for a quick look).
    let rogue_only = std::env::args().any(|a| a == "rogue");
    let (clean, _) = if rogue_only {
        (vec![Vec::new(); NODES], None)
    } else {
        run(minutes, false)
    };
    let (flooded, figures) = run(minutes, true);

    let mut csv = String::from("run,node,t_s,round,rss_bytes,store_bytes\n");
    for (name, runs) in [("clean", &clean), ("rogue", &flooded)] {
        for (i, s) in runs.iter().enumerate() {
            for x in s {
                let _ = writeln!(
                    csv,
                    "{name},{i},{:.0},{},{},{}",
                    x.t, x.round, x.rss, x.store
                );
            }
        }
    }
    std::fs::write(out.join("soak.csv"), csv).unwrap();

    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    let colours = [
        (200, 30, 30),
        (30, 90, 200),
        (30, 150, 60),
        (200, 120, 0),
        (120, 40, 160),
        (0, 140, 140),
    ];
    for (file, title, f) in [
        (
            "rss.png",
            "RSS of each node (thick: with the rogue flooding node 0; thin: without)",
            (|s: &Sample| s.rss) as fn(&Sample) -> u64,
        ),
        (
            "store.png",
            "Store on disk of each node (thick: with the rogue; thin: without)",
            |s: &Sample| s.store,
        ),
    ] {
        let mut series = Vec::new();
        for (name, runs, thin) in [("rogue", &flooded, false), ("clean", &clean, true)] {
            for (i, s) in runs.iter().enumerate() {
                series.push(Series {
                    label: format!("node {i} ({name})"),
                    points: s.iter().map(|x| (x.t / 60.0, mib(f(x)))).collect(),
                    color: colours[i % colours.len()],
                    thin,
                });
            }
        }
        line_chart(&out.join(file), title, "minutes", "MiB", &series, None).unwrap();
    }

    let rate =
        |runs: &Vec<Vec<Sample>>| -> Vec<f64> { runs.iter().map(|s| per_minute(s)).collect() };
    let (rc, rr) = (rate(&clean), rate(&flooded));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!("rounds per minute, each node, without the rogue: {rc:.1?}");
    println!("rounds per minute, each node, with the rogue:    {rr:.1?}");
    println!(
        "ratio (mean over nodes): {:.3} (node 0, the flooded one: {:.3})",
        mean(&rr) / mean(&rc),
        rr[0] / rc[0]
    );
    for (name, runs) in [("clean", &clean), ("rogue", &flooded)] {
        for (i, s) in runs.iter().enumerate() {
            let (rh, re, rm) = drift(s, |x| x.rss);
            let (sh, se, sm) = drift(s, |x| x.store);
            println!(
                "{name} node {i}: RSS {:.0} MiB at half time, {:.0} at the end, {:.0} at most; store {:.1} / {:.1} / {:.1} MiB",
                mib(rh),
                mib(re),
                mib(rm),
                mib(sh),
                mib(se),
                mib(sm)
            );
        }
    }
    if let Some((sent, answered)) = figures {
        println!(
            "the rogue published {sent} announcements; {answered} of its requests were answered"
        );
    }
    println!("samples: {}", out.join("soak.csv").display());
}
