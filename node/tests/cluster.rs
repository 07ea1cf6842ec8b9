//! Black-box runs of the `tapestry` binary: real processes, real libp2p
//! swarms on loopback sockets, real sled stores on disk, real signals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tapestry_lab::process::NodeProcess;

fn digits() -> PathBuf {
    tapestry_testkit::digits_path()
}

fn tapestry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tapestry"));
    c.env("RUST_LOG", "info,libp2p=warn");
    c
}

/// A `tapestry run` process ([`NodeProcess`]: killed when dropped, so a
/// failing test leaves nothing running), with panicking conveniences.
struct Node {
    dir: PathBuf,
    process: NodeProcess,
}

fn init(dir: &Path) {
    let bin = Path::new(env!("CARGO_BIN_EXE_tapestry"));
    tapestry_lab::process::init(bin, dir, &["--region", "test"]).unwrap_or_else(|e| panic!("{e}"));
}

impl Node {
    fn start(dir: &Path, args: &[String]) -> Node {
        let bin = Path::new(env!("CARGO_BIN_EXE_tapestry"));
        let mut cmd = tapestry_lab::process::local_run(bin, dir, args);
        // Rounds back to back unless the test paces them.
        if !args.iter().any(|a| a == "--min-round-ms") {
            cmd.args(["--min-round-ms", "0"]);
        }
        cmd.arg("--data").arg(digits());
        Node {
            dir: dir.to_path_buf(),
            process: NodeProcess::spawn(cmd, dir).unwrap(),
        }
    }

    /// `endpoints.json`, once the node has written it.
    fn endpoints(&self) -> Value {
        self.process
            .endpoints(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("no endpoints.json: {}", self.log()))
    }

    fn api(&self) -> String {
        self.endpoints()["api"].as_str().unwrap().to_owned()
    }

    fn address(&self) -> String {
        self.endpoints()["listen"][0].as_str().unwrap().to_owned()
    }

    fn status(&self) -> Value {
        tapestry_lab::process::status(&self.api()).unwrap()
    }

    fn log(&self) -> String {
        self.process.log()
    }

    /// SIGTERM, then the exit status (within 20 s).
    fn terminate(&mut self) -> std::process::ExitStatus {
        self.process
            .terminate(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("no exit after SIGTERM: {}", self.log()))
    }

    /// SIGKILL: no chance to clean up.
    fn kill9(&mut self) {
        self.process.kill9();
    }
}

/// A GET of the node's API (the body of a 200 answer).
fn get(addr: &str, path: &str) -> String {
    tapestry_node::api::get(addr, path, Duration::from_secs(10)).unwrap()
}

/// Polls until `done` holds for every node's status (or panics with the
/// last statuses and logs).
fn wait_for(nodes: &[&Node], secs: u64, what: &str, done: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let st: Vec<Value> = nodes.iter().map(|n| n.status()).collect();
        if st.iter().all(&done) {
            return st;
        }
        if Instant::now() > deadline {
            for n in nodes {
                eprintln!("--- {}\n{}", n.dir.display(), n.log());
            }
            panic!("timed out waiting for {what}: {st:#?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn scrub(dir: &Path) -> (bool, String) {
    let out = tapestry()
        .args(["scrub", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn shard(i: usize, of: usize) -> String {
    format!("{i}/{of}")
}

/// `tapestry run` flags: rounds (if any), peers to wait for, which shard of
/// the digits file, and the bootstrap address (if any).
fn run_args(
    rounds: Option<u64>,
    start_peers: usize,
    (i, of): (usize, usize),
    boot: Option<&str>,
) -> Vec<String> {
    let mut a = vec![
        "--start-peers".to_string(),
        start_peers.to_string(),
        "--shard".into(),
        shard(i, of),
    ];
    if let Some(r) = rounds {
        a.extend(["--rounds".to_string(), r.to_string()]);
    }
    if let Some(b) = boot {
        a.extend(["--bootstrap".to_string(), b.to_string()]);
    }
    a
}

#[test]
fn three_nodes_learn_digits_agree_on_the_head_and_survive_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("n{i}"))).collect();
    for d in &dirs {
        init(d);
    }
    let rounds = 12;
    let args = |i: usize, boot: Option<&str>| run_args(Some(rounds), 2, (i, 3), boot);
    let n0 = Node::start(&dirs[0], &args(0, None));
    let boot = n0.address();
    let n1 = Node::start(&dirs[1], &args(1, Some(&boot)));
    let n2 = Node::start(&dirs[2], &args(2, Some(&boot)));

    // Mid-run, node 2 is killed with SIGKILL and restarted.
    let mut n2 = n2;
    wait_for(&[&n2], 60, "node 2 to reach round 3", |s| {
        s["round"].as_u64().unwrap() >= 3
    });
    let before = n2.status()["round"].as_u64().unwrap();
    n2.kill9();
    let n2 = Node::start(&dirs[2], &args(2, Some(&boot)));
    let resumed = n2.status()["round"].as_u64().unwrap();
    assert!(
        resumed >= before.saturating_sub(1),
        "resumed at {resumed}, was at {before}"
    );

    wait_for(&[&n0, &n1, &n2], 120, "all nodes to finish", |s| {
        s["finished"].as_bool().unwrap()
    });
    // The last round's versions settle on the preferred one.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (st, heads) = loop {
        let st: Vec<Value> = [&n0, &n1, &n2].iter().map(|n| n.status()).collect();
        let heads: std::collections::BTreeSet<String> =
            st.iter().map(|s| s["head_params"].to_string()).collect();
        if heads.len() == 1 || Instant::now() > deadline {
            break (st, heads);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    for s in &st {
        eprintln!(
            "round {} accuracy {} head {} rejected {}",
            s["round"], s["accuracy"], s["head_params"], s["rejected"]
        );
        assert!(s["accuracy"].as_f64().unwrap() >= 0.9, "{s}");
        assert_eq!(s["round"].as_u64().unwrap(), rounds);
        // The restarted node went on numbering its announcements where it
        // left off: nobody took its new deltas for replays.
        assert!(s["rejected"]["replay"].is_null(), "{s}");
        // Nor did it vote twice in the round it was killed in: it kept
        // the delta it had announced before the kill.
        assert!(s["rejected"]["duplicate_author_round"].is_null(), "{s}");
    }
    assert_eq!(heads.len(), 1, "heads differ: {heads:?}");
    // Metrics are served and count what happened.
    let metrics = get(&n0.api(), "/metrics");
    assert!(metrics.contains("tapestry_rounds_total"), "{metrics}");
    assert!(
        metrics.contains("tapestry_deltas_accepted_total")
            && metrics.contains("libp2p_identify_received_total"),
        "{metrics}"
    );
    let head: Value = serde_json::from_str(&get(&n1.api(), "/model/head")).unwrap();
    assert_eq!(head["round"].as_u64().unwrap(), rounds);

    // SIGTERM stops each node cleanly; every store scrubs clean.
    for n in [n0, n1, n2].iter_mut() {
        assert!(n.terminate().success(), "{}", n.log());
    }
    for d in &dirs {
        let (clean, report) = scrub(d);
        assert!(clean, "{}: {report}", d.display());
    }
    // Node 0 was there from the start: its head's lineage holds every
    // round's deltas, signed by all three nodes.
    let l = lineage(&dirs[0]);
    let count = |k: &str| l[k].as_array().map_or(0, Vec::len);
    assert_eq!(l["deltas_by_author"].as_object().unwrap().len(), 3);
    assert_eq!(count("versions_not_held"), 0);
    // Every round back to genesis (more versions if two lines were merged
    // on the way: each parent is a round earlier, or a merged branch).
    assert!(count("versions") as u64 > rounds, "{l}");
}

/// A rogue peer, built from the library's own network task, that sends
/// hand-made announcements and serves their chunks.
mod rogue {
    use std::collections::HashMap;

    use std::sync::{Arc, Mutex};

    use tapestry_core::model::ModelSpec;
    use tapestry_node::net::{self, NetConfig, NetEvent, NetHandle};
    use tapestry_node::runtime::{deltas_topic, models_topic};
    use tapestry_protocol::{
        Codec, ContentId, DeltaManifest, FetchRequest, FetchResponse, Keypair, ModelManifest,
        Signed, Verified,
    };
    use tokio::sync::mpsc;

    pub struct Rogue {
        pub key: Keypair,
        pub net: NetHandle,
        pub chunks: Arc<Mutex<HashMap<ContentId, Vec<u8>>>>,
        /// Signed manifests it serves, by id.
        pub manifests: Arc<Mutex<HashMap<ContentId, Vec<u8>>>>,
        /// The head it answers probes with.
        pub head: Arc<Mutex<Option<ContentId>>>,
        /// Who it is connected to.
        pub peer: libp2p::PeerId,
        pub topic: String,
        /// Announcements heard on the deltas topic.
        pub heard: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    }

    /// How a ballot-stuffing member crafts its deltas from the honest
    /// deltas of the round before.
    #[derive(Debug, Clone, Copy)]
    pub enum Attack {
        /// The honest mean's direction reversed, at 9× the honest median norm.
        SignFlip,
        /// "A little is enough" (Baruch et al. 2019): mean − z·σ per
        /// coordinate, z = 1.
        Alie,
        /// Inner-product manipulation (Xie et al. 2020): −ε·mean, ε = 0.5.
        Ipm,
    }

    pub fn spec() -> ModelSpec {
        ModelSpec::Logistic {
            inputs: 64,
            classes: 10,
        }
    }

    /// `n` peers with fresh keys, each connected to `peer` only; kept
    /// connected while the returned handles live.
    pub async fn crowd(peer: &str, n: usize) -> Vec<(NetHandle, net::Events)> {
        let mut crowd = Vec::with_capacity(n);
        for _ in 0..n {
            let key = Keypair::generate(&mut rand::rngs::OsRng);
            let (net, events, _task) = net::spawn(
                &key,
                NetConfig {
                    bootstrap: vec![peer.parse().unwrap()],
                    max_connections: 1,
                    ..NetConfig::default()
                },
                &mut prometheus_client::registry::Registry::default(),
            )
            .unwrap();
            crowd.push((net, events));
        }
        crowd
    }

    impl Rogue {
        /// Connects to `peer` only (one connection at most, so it cannot
        /// reach anyone else directly).
        pub async fn connect(peer: &str) -> Rogue {
            Self::connect_as(peer, Keypair::generate(&mut rand::rngs::OsRng)).await
        }

        /// Connects with this key (e.g. a roster member's).
        pub async fn connect_as(peer: &str, key: Keypair) -> Rogue {
            let topic = deltas_topic("digits", "test");
            let (net, mut events, _task) = net::spawn(
                &key,
                NetConfig {
                    listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
                    bootstrap: vec![peer.parse().unwrap()],
                    topics: vec![topic.clone(), models_topic("digits", "test")],
                    max_connections: 1,
                    ..NetConfig::default()
                },
                &mut prometheus_client::registry::Registry::default(),
            )
            .unwrap();
            let chunks = Arc::new(Mutex::new(HashMap::new()));
            let manifests: Arc<Mutex<HashMap<ContentId, Vec<u8>>>> = Arc::default();
            let head: Arc<Mutex<Option<ContentId>>> = Arc::default();
            let (connected_tx, mut connected) = mpsc::channel(1);
            let served = chunks.clone();
            let (served_manifests, served_head) = (manifests.clone(), head.clone());
            let handle = net.clone();
            let (heard_tx, heard) = mpsc::channel(4096);
            let deltas_hash = libp2p::gossipsub::IdentTopic::new(&topic).hash();
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    match event {
                        NetEvent::PeerConnected(p) => {
                            let _ = connected_tx.try_send(p);
                        }
                        NetEvent::Gossip { topic, data, .. } if topic == deltas_hash => {
                            let _ = heard_tx.try_send(data);
                        }
                        NetEvent::Request {
                            request: FetchRequest::SignedManifest(id),
                            channel,
                            ..
                        } => {
                            let bytes = served_manifests.lock().unwrap().get(&id).cloned();
                            let response = bytes
                                .map_or(FetchResponse::NotFound, FetchResponse::SignedManifest);
                            let _ = handle.respond(channel, response).await;
                        }
                        NetEvent::Request {
                            request: FetchRequest::Head { .. },
                            channel,
                            ..
                        } => {
                            let response = FetchResponse::Head(*served_head.lock().unwrap());
                            let _ = handle.respond(channel, response).await;
                        }
                        NetEvent::Request {
                            request: FetchRequest::Chunk(id),
                            channel,
                            ..
                        } => {
                            let bytes = served.lock().unwrap().get(&id).cloned();
                            let response =
                                bytes.map_or(FetchResponse::NotFound, FetchResponse::Chunk);
                            let _ = handle.respond(channel, response).await;
                        }
                        _ => {}
                    }
                }
            });
            let peer = connected.recv().await.unwrap();
            // Let the subscriptions be exchanged.
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            Rogue {
                key,
                net,
                chunks,
                manifests,
                head,
                peer,
                topic,
                heard: tokio::sync::Mutex::new(heard),
            }
        }

        /// For each round the honest nodes announce deltas in (up to
        /// `until`), publishes `per_round` different deltas of its own made
        /// by `attack` from the previous round's honest deltas, each
        /// claiming `u64::MAX` samples. Returns how many it published.
        pub async fn stuff_ballots(&self, attack: Attack, per_round: usize, until: u64) -> usize {
            let n = spec().n_params();
            let mut honest: std::collections::BTreeMap<u64, Vec<Vec<f32>>> = Default::default();
            let mut attacked = std::collections::BTreeSet::new();
            let mut seq = 1u64;
            let mut published = 0;
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(90);
            let mut heard = self.heard.lock().await;
            while tokio::time::Instant::now() < deadline {
                // Quiet for 5 s: the rounds are over.
                let Ok(Some(data)) =
                    tokio::time::timeout(std::time::Duration::from_secs(5), heard.recv()).await
                else {
                    break;
                };
                let Ok(m) = Signed::<DeltaManifest>::open(&data) else {
                    continue;
                };
                let m = m.message().clone();
                if m.author == self.key.node_id() {
                    continue;
                }
                let r = m.round;
                if r >= until {
                    break;
                }
                let mut bytes = Vec::new();
                for c in &m.chunk_ids {
                    if let Ok(FetchResponse::Chunk(b)) =
                        self.net.fetch(self.peer, FetchRequest::Chunk(*c)).await
                    {
                        bytes.extend_from_slice(&b);
                    }
                }
                if let Ok(values) = m.codec.decode(&bytes, n) {
                    honest.entry(r).or_default().push(values);
                }
                let Some(prev) = r.checked_sub(1).and_then(|p| honest.get(&p)) else {
                    continue;
                };
                if prev.is_empty() || !attacked.insert(r) {
                    continue;
                }
                let k = prev.len() as f32;
                let mean: Vec<f32> = (0..n)
                    .map(|i| prev.iter().map(|v| v[i]).sum::<f32>() / k)
                    .collect();
                let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
                let evil: Vec<f32> = match attack {
                    Attack::SignFlip => {
                        let mut norms: Vec<f32> = prev.iter().map(|v| norm(v)).collect();
                        norms.sort_by(f32::total_cmp);
                        let scale = 9.0 * norms[norms.len() / 2] / norm(&mean).max(1e-12);
                        mean.iter().map(|x| -scale * x).collect()
                    }
                    Attack::Alie => (0..n)
                        .map(|i| {
                            let var =
                                prev.iter().map(|v| (v[i] - mean[i]).powi(2)).sum::<f32>() / k;
                            mean[i] - var.sqrt()
                        })
                        .collect(),
                    Attack::Ipm => mean.iter().map(|x| -0.5 * x).collect(),
                };
                for j in 0..per_round {
                    let values: Vec<f32> =
                        evil.iter().map(|x| x * (1.0 + j as f32 * 1e-4)).collect();
                    let payload = Codec::F32.encode(&values).unwrap();
                    let d = DeltaManifest {
                        model_id: "digits".into(),
                        region: "test".into(),
                        round: r,
                        base_version: ContentId::of(b""),
                        author: self.key.node_id(),
                        seq,
                        codec: Codec::F32,
                        layout: spec().layout(),
                        payload_bytes: payload.len() as u64,
                        chunk_size: tapestry_protocol::DEFAULT_CHUNK_SIZE as u32,
                        chunk_ids: payload
                            .chunks(tapestry_protocol::DEFAULT_CHUNK_SIZE)
                            .map(ContentId::of)
                            .collect(),
                        sample_count: u64::MAX,
                        l2_norm: values
                            .iter()
                            .map(|v| f64::from(*v).powi(2))
                            .sum::<f64>()
                            .sqrt() as f32,
                        created_unix_ms: 0,
                    };
                    seq += 1;
                    let d = Signed::sign(d, &self.key).unwrap();
                    self.serve_delta(&d, &payload);
                    if self
                        .net
                        .publish(&self.topic, d.envelope_bytes().to_vec())
                        .await
                        .is_ok()
                    {
                        published += 1;
                    }
                }
            }
            published
        }

        /// Serves a signed model version (and answers head probes with it),
        /// and announces it on the models topic.
        pub async fn announce_version(&self, v: &Verified<ModelManifest>) {
            let bytes = v.envelope_bytes().to_vec();
            self.manifests.lock().unwrap().insert(v.id(), bytes.clone());
            *self.head.lock().unwrap() = Some(v.id());
            let _ = self
                .net
                .publish(&models_topic("digits", "test"), bytes)
                .await;
        }

        /// Serves a signed delta (manifest and chunks) without announcing it.
        pub fn serve_delta(&self, d: &Verified<DeltaManifest>, payload: &[u8]) {
            self.manifests
                .lock()
                .unwrap()
                .insert(d.id(), d.envelope_bytes().to_vec());
            let mut chunks = self.chunks.lock().unwrap();
            for c in payload.chunks(d.message().chunk_size as usize) {
                chunks.insert(ContentId::of(c), c.to_vec());
            }
        }

        /// A version's manifest and parameters, fetched from the peer.
        pub async fn fetch_version(&self, id: ContentId) -> (Verified<ModelManifest>, Vec<f32>) {
            let Ok(FetchResponse::SignedManifest(b)) = self
                .net
                .fetch(self.peer, FetchRequest::SignedManifest(id))
                .await
            else {
                panic!("the peer did not serve version {id}");
            };
            let v = Signed::<ModelManifest>::open(&b).unwrap();
            let mut bytes = Vec::new();
            for c in &v.message().chunk_ids {
                let Ok(FetchResponse::Chunk(chunk)) =
                    self.net.fetch(self.peer, FetchRequest::Chunk(*c)).await
                else {
                    panic!("the peer did not serve a chunk of {id}");
                };
                bytes.extend_from_slice(&chunk);
            }
            let params = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (v, params)
        }

        /// A signed delta of `round` with this sequence number whose payload
        /// is `values` (raw f32, NaN allowed), chunks kept for serving.
        pub fn delta(&self, round: u64, seq: u64, values: &[f32]) -> Vec<u8> {
            let payload: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let id = ContentId::of(&payload);
            self.chunks.lock().unwrap().insert(id, payload.clone());
            let m = DeltaManifest {
                model_id: "digits".into(),
                region: "test".into(),
                round,
                base_version: ContentId::of(b""),
                author: self.key.node_id(),
                seq,
                codec: Codec::F32,
                layout: spec().layout(),
                payload_bytes: payload.len() as u64,
                chunk_size: tapestry_protocol::DEFAULT_CHUNK_SIZE as u32,
                chunk_ids: vec![id],
                sample_count: 100,
                l2_norm: 1.0,
                created_unix_ms: 0,
            };
            Signed::sign(m, &self.key)
                .unwrap()
                .envelope_bytes()
                .to_vec()
        }

        pub async fn publish(&self, data: Vec<u8>) {
            self.net.publish(&self.topic, data).await.unwrap();
        }
    }
}

#[test]
fn forged_replayed_oversized_and_nan_deltas_are_rejected_counted_and_not_forwarded() {
    let tmp = tempfile::tempdir().unwrap();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    init(&da);
    init(&db);
    // Two honest nodes (A and B); rounds wait for the rogue's deltas, so
    // they stay in round 0 or 1 while it talks.
    let args = |i: usize, boot: Option<&str>| run_args(None, 1, (i, 2), boot);
    let a = Node::start(&da, &args(0, None));
    let b = Node::start(&db, &args(1, Some(&a.address())));
    wait_for(&[&a, &b], 60, "A and B to connect", |s| {
        s["peers"].as_u64().unwrap() >= 1
    });

    let rt = tokio::runtime::Runtime::new().unwrap();
    let target = a.address();
    rt.block_on(async {
        let rogue = rogue::Rogue::connect(&target).await;
        let round = a.status()["round"].as_u64().unwrap();
        let n = rogue::spec().n_params();
        // A forged signature: a valid envelope with one signature bit flipped.
        let mut forged = rogue.delta(round, 1, &vec![0.01; n]);
        let last = forged.len() - 1;
        forged[last] ^= 0x01;
        rogue.publish(forged).await;
        // Oversized: 600 KiB in an announcement.
        rogue.publish(vec![0xa5; 600 << 10]).await;
        // A NaN payload under a valid, signed manifest (seq 10).
        let mut nan = vec![0.01f32; n];
        nan[3] = f32::NAN;
        rogue.publish(rogue.delta(round, 10, &nan)).await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        // A replay: an older sequence number than the last one seen.
        rogue.publish(rogue.delta(round, 5, &vec![0.02; n])).await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        // What failed the door does not stay on A's disk: A stored the NaN
        // payload's chunk as it arrived, and once the door refused it the
        // collections that follow took it; A no longer holds (so cannot
        // serve) it.
        let nan_chunk = tapestry_protocol::ContentId::of(
            &nan.iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        for _ in 0..100 {
            if a.status()["rejected"]["non_finite"].as_u64().unwrap_or(0) >= 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let mut answer = None;
        for _ in 0..200 {
            let a = rogue
                .net
                .fetch(
                    rogue.peer,
                    tapestry_protocol::FetchRequest::Chunk(nan_chunk),
                )
                .await;
            let gone = matches!(a, Ok(tapestry_protocol::FetchResponse::NotFound));
            answer = Some(a);
            if gone {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let answer = answer.unwrap();
        assert!(
            matches!(answer, Ok(tapestry_protocol::FetchResponse::NotFound)),
            "A still holds (or would not say) the refused payload 20 s on: {}",
            match &answer {
                Ok(tapestry_protocol::FetchResponse::Chunk(b)) =>
                    format!("a chunk of {} bytes", b.len()),
                other => format!("{other:?}"),
            }
        );
    });

    let want = ["bad_signature", "oversized", "non_finite", "replay"];
    let st = wait_for(&[&a], 30, "A to count every rejection", |s| {
        want.iter()
            .all(|r| s["rejected"][r].as_u64().unwrap_or(0) >= 1)
    });
    eprintln!("A rejected: {}", st[0]["rejected"]);
    let metrics = get(&a.api(), "/metrics");
    for r in want {
        assert!(
            metrics.contains(&format!(
                "tapestry_deltas_rejected_total{{reason=\"{r}\"}} 1"
            )),
            "{r}: {metrics}"
        );
    }
    // B heard none of what A refused at the door (A did not forward it);
    // the NaN delta's manifest was valid, so only its payload was refused,
    // by whoever fetched it.
    let sb = b.status();
    eprintln!("B rejected: {}", sb["rejected"]);
    for r in ["bad_signature", "oversized", "replay"] {
        assert!(sb["rejected"][r].is_null(), "B saw {r}: {sb}");
    }
}

#[test]
fn a_late_joiner_catches_up_to_the_head_and_follows_the_rounds() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("n{i}"))).collect();
    for d in &dirs {
        init(d);
    }
    let rounds = 60;
    let args = |i: usize, boot: Option<&str>| run_args(Some(rounds), 1, (i, 3), boot);
    let n0 = Node::start(&dirs[0], &args(0, None));
    let boot = n0.address();
    let n1 = Node::start(&dirs[1], &args(1, Some(&boot)));
    let st = wait_for(&[&n0], 60, "the first two to reach round 10", |s| {
        s["round"].as_u64().unwrap() >= 10
    });
    let late = Node::start(&dirs[2], &args(2, Some(&boot)));
    // It starts from genesis, asks its peers for their head, fetches and
    // verifies it, and adopts it instead of replaying the rounds it missed.
    let joined = wait_for(&[&late], 30, "the late node to catch up", |s| {
        s["round"].as_u64().unwrap() >= st[0]["round"].as_u64().unwrap()
    });
    eprintln!(
        "late joiner at round {} (the others were at {} when it started)",
        joined[0]["round"], st[0]["round"]
    );
    let done = wait_for(&[&n0, &n1, &late], 120, "all to finish", |s| {
        s["finished"].as_bool().unwrap()
    });
    let heads: std::collections::BTreeSet<String> =
        done.iter().map(|s| s["head_params"].to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut heads = heads;
    while heads.len() > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        heads = [&n0, &n1, &late]
            .iter()
            .map(|n| n.status()["head_params"].to_string())
            .collect();
    }
    assert_eq!(heads.len(), 1, "heads differ: {heads:?}");
    let mut nodes = [n0, n1, late];
    for n in nodes.iter_mut() {
        assert!(n.terminate().success(), "{}", n.log());
    }
    // Catching up brought the signed manifests of the whole history along:
    // the late node can trace its head back to genesis, through rounds it
    // never took part in, to the deltas of all three nodes.
    let l = lineage(&dirs[2]);
    let count = |k: &str| l[k].as_array().map_or(0, Vec::len);
    assert_eq!(count("versions_not_held"), 0);
    assert_eq!(count("deltas_not_held"), 0);
    // Every round back to genesis (more versions if two lines were merged
    // on the way: each parent is a round earlier, or a merged branch).
    assert!(count("versions") as u64 > rounds, "{l}");
    assert_eq!(l["deltas_by_author"].as_object().unwrap().len(), 3);

    // The model leaves as safetensors and comes back in as a new version.
    let model = |cmd: &[&str], dir: &Path| {
        let out = tapestry()
            .args(cmd)
            .arg("--data-dir")
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (f0, f2) = (
        tmp.path().join("n0.safetensors"),
        tmp.path().join("n2.safetensors"),
    );
    let f0s = f0.display().to_string();
    model(&["model", "export", "--out", &f0s], &dirs[0]);
    let imported = model(&["model", "import", "--file", &f0s], &dirs[1]);
    assert!(
        imported.contains(&format!("as round {}", rounds + 1)),
        "{imported}"
    );
    model(
        &["model", "export", "--out", &f2.display().to_string()],
        &dirs[1],
    );
    assert_eq!(std::fs::read(&f0).unwrap(), std::fs::read(&f2).unwrap());
    assert!(scrub(&dirs[1]).0);
}

/// `tapestry model lineage` of a stopped node's head.
fn lineage(dir: &Path) -> Value {
    let out = tapestry()
        .args(["model", "lineage", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The distinct head parameters of `nodes`, once they agree or 30 s have
/// passed (the last round's versions settle on the preferred one).
fn settled_heads(nodes: &[&Node]) -> std::collections::BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let heads: std::collections::BTreeSet<String> = nodes
            .iter()
            .map(|n| n.status()["head_params"].to_string())
            .collect();
        if heads.len() == 1 || Instant::now() > deadline {
            return heads;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The value after `label` on a line of a command's output.
fn field(out: &str, label: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(label))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {label:?} in {out}"))
}

#[test]
fn in_a_permissioned_region_a_non_member_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let region = tmp.path().join("region");
    let out = tapestry()
        .args(["region", "new", "--region", "test", "--dir"])
        .arg(&region)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let region_key = field(&String::from_utf8_lossy(&out.stdout), "region key");
    let dirs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("n{i}"))).collect();
    let mut ids = Vec::new();
    for d in &dirs {
        let out = tapestry()
            .args(["init", "--region", "test", "--data-dir"])
            .arg(d)
            .output()
            .unwrap();
        assert!(out.status.success());
        ids.push(field(&String::from_utf8_lossy(&out.stdout), "node id"));
        // Every node uses the roster; only the first two are on it.
        let cfg = d.join("config.toml");
        let text = std::fs::read_to_string(&cfg).unwrap();
        let text = text
            .replace(
                "roster = \"\"",
                &format!(
                    "roster = {:?}",
                    region.join("roster.cbor").display().to_string()
                ),
            )
            .replace(
                "region_key = \"\"",
                &format!("region_key = \"{region_key}\""),
            );
        std::fs::write(&cfg, text).unwrap();
    }
    let out = tapestry()
        .args(["region", "add", "--dir"])
        .arg(&region)
        .args([&ids[0], &ids[1]])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("version 2: 2 members"));

    let args = |i: usize, boot: Option<&str>| run_args(Some(8), 1, (i, 3), boot);
    let a = Node::start(&dirs[0], &args(0, None));
    let boot = a.address();
    let b = Node::start(&dirs[1], &args(1, Some(&boot)));
    let outsider = Node::start(&dirs[2], &args(2, Some(&boot)));
    let st = wait_for(&[&a, &b], 120, "the members to finish", |s| {
        s["finished"].as_bool().unwrap()
    });
    let st_a = wait_for(&[&a], 30, "A to have refused the outsider", |s| {
        s["rejected"]["not_in_roster"].as_u64().unwrap_or(0) >= 1
    });
    eprintln!(
        "A rejected {}; B rejected {}; outsider at round {}",
        st_a[0]["rejected"],
        b.status()["rejected"],
        outsider.status()["round"]
    );
    assert_eq!(settled_heads(&[&a, &b]).len(), 1);
    assert!(st[0]["accuracy"].as_f64().unwrap() >= 0.9);
    drop(outsider);
}

#[test]
fn in_a_permissioned_region_outsiders_get_nothing_and_a_crowd_of_them_changes_nothing() {
    use tapestry_protocol::{ContentId, FetchRequest, FetchResponse};
    const CROWD: usize = 256;
    let tmp = tempfile::tempdir().unwrap();
    let dirs = permissioned_region(tmp.path(), 3, &[], "1.0");
    let rounds = 8;
    let [a, b, c] = three_paced(&dirs, rounds, 1);
    let nodes = [&a, &b, &c];
    let ids: Vec<String> = nodes
        .iter()
        .map(|n| n.status()["peer_id"].as_str().unwrap().to_owned())
        .collect();
    wait_for(&nodes, 60, "round 2", |s| s["round"].as_u64().unwrap() >= 2);
    let refused = |s: &Value| s["rejected"]["not_in_roster"].as_u64().unwrap_or(0);
    let before: Vec<u64> = nodes.iter().map(|n| refused(&n.status())).collect();

    let rt = tokio::runtime::Runtime::new().unwrap();
    // An outsider asks every member for everything, and joins the gossip
    // (it stays connected and subscribed to the end: the mesh must not
    // take it).
    let (answers, outsiders) = rt.block_on(async {
        let (mut answers, mut outsiders) = (Vec::new(), Vec::new());
        for n in nodes {
            let head =
                tapestry_node::api::get(&n.api(), "/model/head", Duration::from_secs(5)).unwrap();
            let head: Value = serde_json::from_str(&head).unwrap();
            let id: ContentId = head["id"].as_str().unwrap().parse().unwrap();
            let chunk: ContentId = head["chunk_ids"][0].as_str().unwrap().parse().unwrap();
            // Any key: not on the roster.
            let outsider = rogue::Rogue::connect(&n.address()).await;
            for request in [
                FetchRequest::Head {
                    model_id: "digits".into(),
                    region: "test".into(),
                },
                FetchRequest::SignedManifest(id),
                FetchRequest::Attest(id),
                FetchRequest::Chunk(chunk),
            ] {
                answers.push(outsider.net.fetch(outsider.peer, request).await);
            }
            outsiders.push(outsider);
        }
        (answers, outsiders)
    });
    for answer in &answers {
        assert!(matches!(answer, Ok(FetchResponse::NotFound)), "{answers:?}");
    }
    // Then a crowd of peer ids connects to C (which dialled A: that
    // connection is its own, outbound).
    let crowd = rt.block_on(rogue::crowd(&c.address(), CROWD));
    wait_for(&[&c], 60, "the crowd to be turned away", |s| {
        refused(s) >= before[2] + 4 + (CROWD - 16) as u64
    });
    // C keeps its members and at most 16 outsiders: its own count
    // (`outsiders`) never passes 16. The crowd dials again every 5 s, so
    // the network's count also holds peers between connecting and being
    // turned away (a loaded machine delays the turning away); it comes
    // back to the bound (2 members + 16) at some moment of 20 looks over
    // 10 s, so no turned-away peer stays.
    let looks: Vec<(u64, u64)> = (0..20)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(500));
            let s = c.status();
            (
                s["outsiders"].as_u64().unwrap(),
                s["peers"].as_u64().unwrap(),
            )
        })
        .collect();
    eprintln!("C with a crowd at its door: (outsiders kept, connected) {looks:?}");
    assert!(looks.iter().all(|&(kept, _)| kept <= 16), "{looks:?}");
    // A crowd of 256 fills the 16 places (the count is not idle).
    assert!(looks.iter().any(|&(kept, _)| kept == 16), "{looks:?}");
    assert!(looks.iter().any(|&(_, held)| held <= 2 + 16), "{looks:?}");
    let st = wait_for(&nodes, 120, "the members to finish", |s| {
        s["finished"].as_bool().unwrap()
    });
    for (i, s) in st.iter().enumerate() {
        eprintln!("node {i}: refused {}, mesh {}", s["rejected"], s["mesh"]);
        // Every request of the outsider refused and counted (C also
        // counts the crowd it turned away).
        assert!(refused(s) >= before[i] + 4, "{s}");
        // The mesh holds members only.
        for p in s["mesh"].as_array().unwrap() {
            assert!(
                ids.contains(&p.as_str().unwrap().to_owned()),
                "{p} is not a member: {s}"
            );
        }
        assert_eq!(s["round"].as_u64().unwrap(), rounds, "{s}");
    }
    // C kept its members (its own connection to A among them) and its
    // head agrees with theirs.
    let c_mesh: Vec<&str> = st[2]["mesh"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        c_mesh.contains(&ids[0].as_str()) && c_mesh.contains(&ids[1].as_str()),
        "{}",
        st[2]
    );
    assert_eq!(settled_heads(&nodes).len(), 1);
    drop((crowd, outsiders));
}

#[test]
fn a_delta_copied_onto_the_models_topic_still_reaches_its_peers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    // Rounds wait for the rogue (two peers, quorum 1): its delta matters.
    let a = Node::start(&dir, &run_args(Some(3), 1, (0, 1), None));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let rogue = rogue::Rogue::connect(&a.address()).await;
        let n = rogue::spec().n_params();
        let round = a.status()["round"].as_u64().unwrap();
        // A well-formed delta: its payload's norm is the declared 1.0.
        let delta = rogue.delta(round, 1, &vec![1.0 / (n as f32).sqrt(); n]);
        // The exact bytes first on the models topic, then where they belong.
        let _ = rogue
            .net
            .publish(
                &tapestry_node::runtime::models_topic("digits", "test"),
                delta.clone(),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        rogue.publish(delta).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    });
    let st = wait_for(&[&a], 30, "the delta to be accepted", |s| {
        s["deltas_accepted"].as_u64().unwrap_or(0) >= 1
    });
    // The copy was refused as a model announcement; the delta went through.
    assert!(
        st[0]["rejected"]["malformed"].as_u64().unwrap_or(0) >= 1,
        "{}",
        st[0]["rejected"]
    );
}

#[test]
fn after_a_restart_a_peers_old_sequence_number_is_still_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    // Rounds wait for the rogue (two members, quorum 1), at most one every
    // 3 s: the node stays within the round window of the rogue's delta.
    let mut args = run_args(None, 1, (0, 1), None);
    args.extend(["--min-round-ms".to_string(), "3000".to_string()]);
    let mut a = Node::start(&dir, &args);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let n = rogue::spec().n_params();
    let values = vec![1.0 / (n as f32).sqrt(); n];
    // The rogue's delta (sequence number 1) is taken in round 0.
    let (key, _first) = rt.block_on(async {
        let rogue = rogue::Rogue::connect(&a.address()).await;
        let round = a.status()["round"].as_u64().unwrap();
        rogue.publish(rogue.delta(round, 1, &values)).await;
        (rogue.key.clone(), rogue)
    });
    wait_for(&[&a], 60, "the rogue's delta to be taken", |s| {
        s["deltas_accepted"].as_u64().unwrap_or(0) >= 1 && s["round"].as_u64().unwrap_or(0) >= 1
    });
    assert!(a.terminate().success(), "{}", a.log());

    // Restarted, the node still knows the rogue's last sequence number: a
    // new delta under the same number is a replay.
    let a = Node::start(&dir, &args);
    rt.block_on(async {
        let rogue = rogue::Rogue::connect_as(&a.address(), key).await;
        let round = a.status()["round"].as_u64().unwrap();
        rogue
            .publish(rogue.delta(round, 1, &values.iter().map(|v| -v).collect::<Vec<_>>()))
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
    let st = wait_for(&[&a], 30, "the replay to be refused", |s| {
        s["rejected"]["replay"].as_u64().unwrap_or(0) >= 1
    });
    assert_eq!(
        st[0]["deltas_accepted"].as_u64().unwrap_or(0),
        0,
        "{}",
        st[0]
    );
}

#[test]
#[ignore = "saturates the CPU: CI runs it alone, after the suite (.ci/run)"]
fn under_a_flood_of_requests_and_refused_messages_rounds_go_on() {
    use tapestry_protocol::{ContentId, FetchRequest};
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("n{i}"))).collect();
    for d in &dirs {
        init(d);
        // The rogue subscribes, so it counts as a member; rounds close on
        // the three honest deltas of four members without waiting for it.
        set_config(d, "quorum", "0.75");
        // The pace before the flood is compared with the pace after it, so
        // both are measured with the store at its steady state: a store
        // still filling up keeps less and collects less each round than
        // one that keeps `keep_versions` rounds. 32 rounds fill in seconds.
        set_config(d, "keep_versions", &KEEP.to_string());
    }
    const KEEP: u64 = 32;
    let args = |i: usize, boot: Option<&str>| run_args(None, 2, (i, 3), boot);
    let a = Node::start(&dirs[0], &args(0, None));
    let boot = a.address();
    let b = Node::start(&dirs[1], &args(1, Some(&boot)));
    let c = Node::start(&dirs[2], &args(2, Some(&boot)));
    let round = |n: &Node| n.status()["round"].as_u64().unwrap_or(0);
    wait_for(
        &[&a, &b, &c],
        180,
        "the store to reach its steady state",
        |s| s["round"].as_u64().unwrap_or(0) >= 2 * KEEP,
    );
    // The chunk the flood asks for: one of A's head, refreshed every 2 s
    // (a version's chunks are collected KEEP rounds later; asked for after
    // that, they would be answered "not found", which costs A less).
    let head_chunk = {
        let api = a.api();
        move || -> Option<ContentId> {
            let head =
                tapestry_node::api::get(&api, "/model/head", Duration::from_secs(10)).ok()?;
            let head: Value = serde_json::from_str(&head).ok()?;
            head["chunk_ids"][0].as_str()?.parse().ok()
        }
    };
    let chunk = std::sync::Arc::new(std::sync::Mutex::new(head_chunk().unwrap()));
    let rss_before: Vec<u64> = [&a, &b, &c]
        .iter()
        .map(|n| n.process.rss_bytes().unwrap())
        .collect();
    // The normal pace, before. Over 40 s: over 20 s a node's round count
    // varies too much for a 0.8× bound on one window each side (147–179
    // per 20 s with no flood in one run; a CI run measured 204 before the
    // flood and 145 after on 20 s windows, 0.71×, where the next runs gave
    // 0.89× on 20 s and 0.92× on 40 s).
    let pace_window = Duration::from_secs(40);
    let r0 = round(&a);
    std::thread::sleep(pace_window);
    let normal = round(&a) - r0;

    // The flood, for 60 s: 400 requests for chunks and heads held open at
    // all times, and every 2 s a burst of 5,000 distinct signed
    // announcements (far-future rounds: each is refused).
    let flood_for = Duration::from_secs(60);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let boot_a = boot.clone();
    let flood = rt.spawn(async move {
        let rogue = std::sync::Arc::new(rogue::Rogue::connect(&boot_a).await);
        let end = tokio::time::Instant::now() + flood_for;
        let refresh = {
            let chunk = chunk.clone();
            tokio::spawn(async move {
                while tokio::time::Instant::now() < end {
                    let fresh = tokio::task::spawn_blocking(head_chunk.clone()).await;
                    if let Ok(Some(id)) = fresh {
                        *chunk.lock().unwrap() = id;
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            })
        };
        let asking: Vec<_> = (0..400)
            .map(|k| {
                let (rogue, chunk) = (rogue.clone(), chunk.clone());
                tokio::spawn(async move {
                    let mut answered = 0usize;
                    while tokio::time::Instant::now() < end {
                        let request = if k % 2 == 0 {
                            FetchRequest::Chunk(*chunk.lock().unwrap())
                        } else {
                            FetchRequest::Head {
                                model_id: "digits".into(),
                                region: "test".into(),
                            }
                        };
                        if rogue.net.fetch(rogue.peer, request).await.is_ok() {
                            answered += 1;
                        } else {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    answered
                })
            })
            .collect();
        let n = rogue::spec().n_params();
        let values = vec![1.0 / (n as f32).sqrt(); n];
        let (mut sent, mut seq) = (0usize, 1u64);
        let mut every = tokio::time::interval(Duration::from_secs(2));
        while tokio::time::Instant::now() < end {
            every.tick().await;
            for _ in 0..5_000 {
                seq += 1;
                let data = rogue.delta(1 << 40, seq, &values);
                // (Once A has graylisted the rogue, a publish may find no peer.)
                if rogue.net.publish(&rogue.topic, data).await.is_ok() {
                    sent += 1;
                }
            }
        }
        let mut answered = 0;
        for a in asking {
            answered += a.await.unwrap_or(0);
        }
        let _ = refresh.await;
        (answered, sent)
    });
    // Rounds go on during the flood: every 20 s, every honest node is
    // further on.
    let mut during = vec![[&a, &b, &c].map(round)];
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(20));
        during.push([&a, &b, &c].map(round));
    }
    let (answered, sent) = rt.block_on(flood).unwrap();
    // Back to the normal pace within two round timeouts (10 s each), then
    // measured over the same window as before. Meanwhile, every 5 s: the
    // rounds and the CPU time (ms) that A, B, C and this test (the rogue)
    // used.
    let pids = [&a, &b, &c].map(|n| n.process.pid().unwrap());
    let cpu = |pid: u32| cpu_ms(&format!("/proc/{pid}/stat"));
    let mut last: Vec<u64> = pids
        .iter()
        .map(|p| cpu(*p))
        .chain([cpu_ms("/proc/self/stat")])
        .collect();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_secs(5));
        let now: Vec<u64> = pids
            .iter()
            .map(|p| cpu(*p))
            .chain([cpu_ms("/proc/self/stat")])
            .collect();
        let used: Vec<u64> = now.iter().zip(&last).map(|(n, l)| n - l).collect();
        eprintln!(
            "after the flood: rounds {:?}, CPU ms in 5 s (A, B, C, rogue) {used:?}; A {}",
            [&a, &b, &c].map(round),
            a.status()
        );
        last = now;
    }
    let r1 = round(&a);
    std::thread::sleep(pace_window);
    let after = round(&a) - r1;
    let rss_after: Vec<u64> = [&a, &b, &c]
        .iter()
        .map(|n| n.process.rss_bytes().unwrap())
        .collect();
    let metrics = get(&a.api(), "/metrics");
    let busy = metrics
        .lines()
        .filter(|l| {
            l.starts_with("tapestry_requests_busy_total ")
                || l.starts_with("net_shed_total{kind=\"request\"}")
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>();
    eprintln!(
        "flood: {sent} announcements, {answered} requests answered; rounds of A, B, C every 20 s: {during:?}; \
         A's pace over {pace_window:?}: {normal} before, {after} after; busy {busy}; RSS {:?} -> {:?} MiB; A: {}",
        rss_before.iter().map(|b| b >> 20).collect::<Vec<_>>(),
        rss_after.iter().map(|b| b >> 20).collect::<Vec<_>>(),
        a.status()
    );
    for w in during.windows(2) {
        for (k, (then, now)) in w[0].iter().zip(&w[1]).enumerate() {
            assert!(
                now > then,
                "node {k}'s rounds stalled during the flood: {during:?}"
            );
        }
    }
    assert!(
        normal >= 2,
        "too few rounds before the flood to compare: {normal}"
    );
    // Back to its pace: at least 0.8× the rounds of the same window
    // before the flood (with the store at its steady state both times:
    // 204 then 223 rounds, 1.09×; before a node took a next-round version
    // holding its delta at once, rounds stalled to their deadline on
    // deltas lost in the flood: 0.11×–1.01×). Measured with the store
    // still filling before and full after (keep_versions 256), a CI run
    // saw 144 then 109: without any flood, three nodes did 193 rounds in
    // their first 20 s and 147–179 in each 20 s after that.
    assert!(
        after * 5 >= normal * 4,
        "A's pace after the flood, {after} rounds in {pace_window:?}, is not back to {normal}"
    );
    assert!(busy >= 1.0, "no request was answered busy: {metrics}");
    for (k, (before, after)) in rss_before.iter().zip(&rss_after).enumerate() {
        assert!(
            *after < before + (200 << 20),
            "node {k}'s RSS grew from {} to {} MiB",
            before >> 20,
            after >> 20
        );
    }
    // The honest nodes are still connected to each other.
    for n in [&a, &b, &c] {
        assert!(n.status()["peers"].as_u64().unwrap() >= 2, "{}", n.status());
    }
}

/// User plus system CPU time in ms, from a `/proc/PID/stat` file (0 if
/// unreadable).
fn cpu_ms(stat: &str) -> u64 {
    let text = std::fs::read_to_string(stat).unwrap_or_default();
    // Fields after the command name (which may hold spaces), from the
    // state on: utime and stime are the 12th and 13th, in clock ticks
    // (100 per second).
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    f.get(11).zip(f.get(12)).map_or(0, |(u, s)| (u + s) * 10)
}

#[test]
fn a_peer_that_only_listens_does_not_slow_the_rounds() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..2).map(|i| tmp.path().join(format!("n{i}"))).collect();
    for d in &dirs {
        init(d);
    }
    // Paced at four rounds a second, default quorum (every member that
    // takes part), default 10-s round timeout.
    let args = |i: usize, boot: Option<&str>| {
        let mut a = run_args(None, 1, (i, 2), boot);
        a.extend(["--min-round-ms".into(), "250".into()]);
        a
    };
    let a = Node::start(&dirs[0], &args(0, None));
    let boot = a.address();
    let b = Node::start(&dirs[1], &args(1, Some(&boot)));
    wait_for(&[&a, &b], 90, "the rounds to start", |s| {
        s["round"].as_u64().unwrap_or(0) >= 3
    });
    let round = |n: &Node| n.status()["round"].as_u64().unwrap_or(0);
    let window = Duration::from_secs(15);
    let r0 = round(&a);
    std::thread::sleep(window);
    let without = round(&a) - r0;

    // A client subscribes to the region's topics through A and never
    // sends a delta.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(rogue::Rogue::connect(&boot));
    wait_for(&[&a], 30, "A to see the listener", |s| {
        s["peers"].as_u64().unwrap_or(0) >= 2
    });
    // It may hold up the rounds of its first round timeout (10 s), no later.
    std::thread::sleep(Duration::from_secs(12));
    let r1 = round(&a);
    std::thread::sleep(window);
    let with = round(&a) - r1;
    eprintln!("rounds of A in {window:?}: {without} without the listener, {with} with it");
    assert!(
        with * 10 >= without * 9,
        "{with} rounds with a listener, {without} without"
    );
    assert!(
        a.status()["peers"].as_u64().unwrap_or(0) >= 2,
        "the listener stays connected"
    );
    drop(listener);
    drop(b);
}

#[test]
fn over_quic_the_dht_tells_who_provides_a_delta() {
    use tapestry_node::net::{self, NetConfig};
    use tapestry_protocol::{ContentId, Keypair};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let start = |bootstrap: Vec<libp2p::Multiaddr>| {
            let key = Keypair::generate(&mut rand::rngs::OsRng);
            net::spawn(
                &key,
                NetConfig {
                    // QUIC only: the connection below can only be QUIC.
                    listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()],
                    bootstrap,
                    ..NetConfig::default()
                },
                &mut prometheus_client::registry::Registry::default(),
            )
            .unwrap()
        };
        let (a, mut a_events, _ta) = start(vec![]);
        let addr = loop {
            if let Some(net::NetEvent::Listening(addr)) = a_events.recv().await {
                break addr.with(libp2p::multiaddr::Protocol::P2p(a.peer_id()));
            }
        };
        assert!(addr.to_string().contains("/quic-v1/"), "{addr}");
        tokio::spawn(async move { while a_events.recv().await.is_some() {} });
        let (b, mut b_events, _tb) = start(vec![addr]);
        while !matches!(b_events.recv().await, Some(net::NetEvent::PeerConnected(_))) {}
        tokio::spawn(async move { while b_events.recv().await.is_some() {} });
        let id = ContentId::of(b"a delta manifest");
        a.provide(id).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let found = b.providers(id).await.unwrap();
            if found.contains(&a.peer_id()) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "B never learned that A provides it"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            b.providers(ContentId::of(b"nobody has this"))
                .await
                .unwrap()
                .is_empty()
        );
    });
}

/// A permissioned region in `root`: `n` nodes initialised (region "test",
/// quorum `quorum`), the roster holding them and `extra` node ids. Returns
/// the nodes' directories.
fn permissioned_region(root: &Path, n: usize, extra: &[String], quorum: &str) -> Vec<PathBuf> {
    let region = root.join("region");
    let out = tapestry()
        .args(["region", "new", "--region", "test", "--dir"])
        .arg(&region)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let region_key = field(&String::from_utf8_lossy(&out.stdout), "region key");
    let dirs: Vec<PathBuf> = (0..n).map(|i| root.join(format!("n{i}"))).collect();
    let mut ids = extra.to_vec();
    for d in &dirs {
        let out = tapestry()
            .args(["init", "--region", "test", "--data-dir"])
            .arg(d)
            .output()
            .unwrap();
        assert!(out.status.success());
        ids.push(field(&String::from_utf8_lossy(&out.stdout), "node id"));
        let cfg = d.join("config.toml");
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace(
                "roster = \"\"",
                &format!(
                    "roster = {:?}",
                    region.join("roster.cbor").display().to_string()
                ),
            )
            .replace(
                "region_key = \"\"",
                &format!("region_key = \"{region_key}\""),
            )
            .replace("quorum = 1.0", &format!("quorum = {quorum}"));
        std::fs::write(&cfg, text).unwrap();
    }
    let out = tapestry()
        .args(["region", "add", "--dir"])
        .arg(&region)
        .args(&ids)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dirs
}

/// Runs three honest nodes of a region to the end: A first, B and C
/// bootstrapping from A; `during` runs once A reached round 4, with A's
/// address. Returns the nodes, still running, and their final statuses.
fn three_honest(
    dirs: &[PathBuf],
    rounds: u64,
    during: impl FnOnce(&Node),
) -> (Vec<Node>, Vec<Value>) {
    let args = |i: usize, boot: Option<&str>| run_args(Some(rounds), 2, (i, 3), boot);
    let a = Node::start(&dirs[0], &args(0, None));
    let boot = a.address();
    let b = Node::start(&dirs[1], &args(1, Some(&boot)));
    let c = Node::start(&dirs[2], &args(2, Some(&boot)));
    wait_for(&[&a], 90, "A to reach round 4", |s| {
        s["round"].as_u64().unwrap() >= 4
    });
    during(&a);
    wait_for(&[&a, &b, &c], 240, "all to finish", |s| {
        s["finished"].as_bool().unwrap()
    });
    settled_heads(&[&a, &b, &c]);
    let st = [&a, &b, &c].iter().map(|n| n.status()).collect();
    (vec![a, b, c], st)
}

/// Starts three nodes of a region paced at one round a second, so that a
/// rogue acts while rounds run: A first, B and C bootstrapping from A,
/// each waiting for `start_peers` peers before its first round.
fn three_paced(dirs: &[PathBuf], rounds: u64, start_peers: usize) -> [Node; 3] {
    let args = |i: usize, boot: Option<&str>| {
        let mut a = run_args(Some(rounds), start_peers, (i, 3), boot);
        a.extend(["--min-round-ms".into(), "1000".into()]);
        a
    };
    let a = Node::start(&dirs[0], &args(0, None));
    let boot = a.address();
    let b = Node::start(&dirs[1], &args(1, Some(&boot)));
    let c = Node::start(&dirs[2], &args(2, Some(&boot)));
    [a, b, c]
}

fn mean_accuracy(st: &[Value]) -> f64 {
    st.iter()
        .map(|s| s["accuracy"].as_f64().unwrap())
        .sum::<f64>()
        / st.len() as f64
}

#[test]
fn forged_versions_fail_against_every_honest_node_and_are_never_forwarded() {
    use tapestry_core::verify::{DeltaInput, aggregate_onto, merge_params};
    use tapestry_protocol::{ContentId, DeltaManifest, Keypair, ModelManifest, Verified};
    let rogue_key = Keypair::from_secret_bytes(&[66; 32]);
    let rogue_id = rogue_key.node_id().to_string();
    let rounds = 20;
    let tmp = tempfile::tempdir().unwrap();

    // The control: the same region, the rogue on the roster but absent.
    let control_dirs = permissioned_region(
        &tmp.path().join("control"),
        3,
        std::slice::from_ref(&rogue_id),
        "0.75",
    );
    let (mut control, control_st) = three_honest(&control_dirs, rounds, |_| {});
    for n in control.iter_mut() {
        assert!(n.terminate().success(), "{}", n.log());
    }
    let control_acc = mean_accuracy(&control_st);

    let dirs = permissioned_region(&tmp.path().join("attack"), 3, &[rogue_id], "0.75");
    let cfg = tapestry_node::config::Config {
        region: "test".into(),
        ..Default::default()
    }
    .engine(0)
    .unwrap();
    let n = cfg.spec.n_params();
    let forged: std::sync::Mutex<Vec<Verified<ModelManifest>>> = Default::default();
    let (mut nodes, st) = three_honest(&dirs, rounds, |a| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let head: ContentId = a.status()["head"].as_str().unwrap().parse().unwrap();
        rt.block_on(async {
            let rogue = rogue::Rogue::connect_as(&a.address(), rogue_key.clone()).await;
            let (h, hp) = rogue.fetch_version(head).await;
            let hm = h.message().clone();
            let (p, pp) = rogue.fetch_version(hm.parents[0]).await;
            let sign = |round: u64, params: &[f32], parents, deltas| {
                tapestry_testkit::sign::version(&cfg, &rogue_key, round, params, parents, deltas)
            };
            let mut seq = 1_000_000;
            let mut delta = |round: u64, values: &[f32]| -> (Verified<DeltaManifest>, Vec<u8>) {
                seq += 1;
                let (d, payload) =
                    tapestry_testkit::sign::delta(&cfg, &rogue_key, round, seq, values);
                rogue.serve_delta(&d, &payload);
                (d, payload)
            };
            let mut out = Vec::new();
            let evil: Vec<f32> = hp.iter().map(|v| -v).collect();
            // 1. The head's round and parent, 64 made-up delta ids.
            let made_up: Vec<ContentId> = (0..64u8).map(|k| ContentId::of(&[k, 7])).collect();
            out.push(sign(hm.round, &evil, hm.parents.clone(), made_up));
            // 2. A "merge" of the head and its parent.
            let mut two = vec![h.id(), p.id()];
            two.sort();
            out.push(sign(hm.round, &evil, two, vec![]));
            // 3. Round R+5 on the head, naming a real, well-formed delta.
            let small = vec![1e-4f32; n];
            let (d0, _) = delta(hm.round, &small);
            out.push(sign(hm.round + 5, &evil, vec![h.id()], vec![d0.id()]));
            // 4. Round u64::MAX − 1.
            out.push(sign(u64::MAX - 1, &evil, vec![h.id()], vec![d0.id()]));
            // 5. A line of its own from the head's parent (three rounds of
            //    its deltas only, each version honestly computed), merged
            //    with the head.
            let mut line = (p.clone(), pp.clone());
            for _ in 0..3 {
                let r = line.0.message().round;
                let (d, _) = delta(r, &small);
                let params = aggregate_onto(
                    &cfg,
                    &line.1,
                    &[DeltaInput {
                        id: d.id(),
                        sample_count: 1,
                        values: tapestry_core::aggregate::Values::Decoded(&small),
                    }],
                )
                .unwrap();
                let v = sign(r + 1, &params, vec![line.0.id()], vec![d.id()]);
                rogue.announce_version(&v).await;
                out.push(v.clone());
                line = (v, params);
            }
            let mut two = vec![h.id(), line.0.id()];
            two.sort();
            let merged = merge_params((h.id(), &hp, 1.0), (line.0.id(), &line.1, 10_000.0));
            out.push(sign(
                line.0.message().round.max(hm.round),
                &merged,
                two,
                vec![],
            ));
            // 6. A merge with a version naming 10,000 unknown deltas.
            let many: Vec<ContentId> = (0..10_000u32)
                .map(|k| ContentId::of(&k.to_le_bytes()))
                .collect();
            let y = sign(hm.round, &evil, vec![p.id()], many);
            rogue.announce_version(&y).await;
            let mut two = vec![h.id(), y.id()];
            two.sort();
            out.push(y);
            out.push(sign(hm.round, &evil, two, vec![]));
            // 7. A line of its own extending the head, two rounds ahead.
            let (d1, _) = delta(hm.round, &small);
            let z1p = aggregate_onto(
                &cfg,
                &hp,
                &[DeltaInput {
                    id: d1.id(),
                    sample_count: 1,
                    values: tapestry_core::aggregate::Values::Decoded(&small),
                }],
            )
            .unwrap();
            let z1 = sign(hm.round + 1, &z1p, vec![h.id()], vec![d1.id()]);
            rogue.announce_version(&z1).await;
            let (d2, _) = delta(hm.round + 1, &small);
            let z2p = aggregate_onto(
                &cfg,
                &z1p,
                &[DeltaInput {
                    id: d2.id(),
                    sample_count: 1,
                    values: tapestry_core::aggregate::Values::Decoded(&small),
                }],
            )
            .unwrap();
            let z2 = sign(hm.round + 2, &z2p, vec![z1.id()], vec![d2.id()]);
            out.push(z1);
            out.push(z2);
            // Announce each, and answer head probes with each in turn.
            for v in &out {
                rogue.announce_version(v).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            *forged.lock().unwrap() = out;
            // Stay a while, answering probes with the last one.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
    });
    let forged = forged.into_inner().unwrap();
    let digest = |m: &ModelManifest| {
        ContentId::of(
            &m.chunk_ids
                .iter()
                .flat_map(|c| *c.as_bytes())
                .collect::<Vec<u8>>(),
        )
        .to_string()
    };
    let forged_digests: std::collections::BTreeSet<String> =
        forged.iter().map(|v| digest(v.message())).collect();
    for (s, name) in st.iter().zip(["A", "B", "C"]) {
        eprintln!(
            "{name}: round {} accuracy {} rejected {}",
            s["round"], s["accuracy"], s["rejected"]
        );
        assert!(
            !forged_digests.contains(s["head_params"].as_str().unwrap()),
            "{name} holds a forged version: {s}"
        );
        assert!(s["accuracy"].as_f64().unwrap() >= 0.85, "{s}");
        assert_eq!(s["round"].as_u64().unwrap(), rounds, "{s}");
    }
    // A refused each kind, counted by reason.
    let ra = &st[0]["rejected"];
    for reason in ["unknown_delta", "not_a_branch", "round_jump", "bad_version"] {
        assert!(
            ra[reason].as_u64().unwrap_or(0) >= 1,
            "A did not count {reason}: {ra}"
        );
    }
    // B and C heard the rogue only through A, which forwarded none of it:
    // neither refused (nor so much as logged) any forged version, and
    // neither counted a refusal only a forgery causes. (An honest version
    // can still be refused as `unknown_delta` by a node that could not
    // fetch one of its deltas in time from busy peers, on a loaded
    // machine: not the rogue's doing, so it is shown, not asserted.)
    let forged_ids: Vec<String> = forged.iter().map(|v| v.id().short()).collect();
    // The check can see a forgery: A's log names those it refused.
    let a_log = nodes[0].log();
    assert!(
        forged_ids.iter().any(|id| a_log.contains(id.as_str())),
        "A's log names none of the forged versions {forged_ids:?}"
    );
    for ((s, n), name) in st[1..].iter().zip(&nodes[1..]).zip(["B", "C"]) {
        let log = n.log();
        let refusals: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("refused") || l.contains("rejected"))
            .collect();
        if !refusals.is_empty() {
            eprintln!("{name} refused:\n{}", refusals.join("\n"));
        }
        for id in &forged_ids {
            let naming: Vec<&str> = log.lines().filter(|l| l.contains(id.as_str())).collect();
            assert!(
                naming.is_empty(),
                "forged version {id} reached {name}, which only A could forward to: {s}\n{}",
                naming.join("\n")
            );
        }
        for reason in [
            "not_a_branch",
            "round_jump",
            "bad_version",
            "version_mismatch",
        ] {
            assert!(
                s["rejected"][reason].is_null(),
                "{reason} reached {name}, which only A could forward to: {s}\n{}",
                refusals.join("\n")
            );
        }
    }
    let acc = mean_accuracy(&st);
    eprintln!("mean accuracy {acc:.4} with the rogue, {control_acc:.4} without");
    // The rogue changed nothing the honest nodes hold (the lineages are
    // checked below); what remains is timing: which deltas each round
    // closed on, back to back, decides the final head, and with it each
    // node's accuracy on its own third of the test split (steps of about
    // 0.004). Over three runs: the control's mean 0.9724 to 0.9752, with
    // the rogue 0.9641 to 0.9752 (every rogue version refused each time);
    // a bound of 0.01 failed once on that spread, so it is 0.02, beside an
    // absolute floor for every node.
    for s in &st {
        assert!(s["accuracy"].as_f64().unwrap() >= 0.9, "{s}");
    }
    assert!(acc >= control_acc - 0.02, "{acc} against {control_acc}");
    for n in nodes.iter_mut() {
        assert!(n.terminate().success(), "{}", n.log());
        assert!(!n.log().contains("panicked"), "{}", n.log());
    }
    // No honest lineage holds a rogue version (no merge naming one).
    for d in &dirs {
        let l = lineage(d).to_string();
        for v in &forged {
            assert!(
                !l.contains(&v.id().to_string()),
                "{} holds {}",
                d.display(),
                v.id()
            );
        }
    }
}

/// What one run of five honest nodes (and perhaps a ballot-stuffing
/// member) ended with.
struct VoteRun {
    accuracy: f64,
    /// Node A's rejections by reason (the rogue talks to A only).
    rejected: Value,
    /// A's norm limit when it reached round 2, and at the end.
    norm_limits: (f64, f64),
    /// A's head lineage.
    lineage: Value,
    /// Deltas the rogue published.
    published: usize,
}

fn five_and_a_rogue(
    root: &Path,
    rule: &str,
    attack: Option<rogue::Attack>,
    rogue_key: &tapestry_protocol::Keypair,
) -> VoteRun {
    let rounds = 10;
    let dirs: Vec<PathBuf> = (0..5).map(|i| root.join(format!("n{i}"))).collect();
    for d in &dirs {
        init(d);
        let cfg = d.join("config.toml");
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("aggregator = \"mean\"", &format!("aggregator = \"{rule}\""))
            .replace("quorum = 1.0", "quorum = 0.8");
        std::fs::write(&cfg, text).unwrap();
        // A round closes on quorum, not at its deadline: a round whose
        // deadline passes closes on whatever arrived (its own delta alone,
        // on a machine loaded by the other tests), and the lineage check
        // below counts the authors of rounds closed on quorum.
        set_config(d, "timeout_ms", "30000");
    }
    // Rounds of at least a second, so the rogue keeps up with them.
    let args = |i: usize, boot: Option<&str>| {
        let mut a = run_args(Some(rounds), 4, (i, 5), boot);
        a.extend(["--min-round-ms".to_string(), "1000".to_string()]);
        a
    };
    let a = Node::start(&dirs[0], &args(0, None));
    let boot = a.address();
    let rogue = attack.map(|attack| {
        let (key, target) = (rogue_key.clone(), boot.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let rogue = rogue::Rogue::connect_as(&target, key).await;
                rogue.stuff_ballots(attack, 20, rounds - 1).await
            })
        })
    });
    let others: Vec<Node> = (1..5)
        .map(|i| Node::start(&dirs[i], &args(i, Some(&boot))))
        .collect();
    let early = wait_for(&[&a], 90, "A to reach round 2", |s| {
        s["round"].as_u64().unwrap() >= 2
    });
    let mut all: Vec<&Node> = vec![&a];
    all.extend(others.iter());
    let st = wait_for(&all, 240, "all to finish", |s| {
        s["finished"].as_bool().unwrap()
    });
    let published = rogue.map_or(0, |t| t.join().unwrap());
    let rejected = a.status()["rejected"].clone();
    let norm = |s: &Value| s["norm_limit"].as_f64().unwrap_or(f64::NAN);
    let norm_limits = (norm(&early[0]), norm(&a.status()));
    let accuracy = mean_accuracy(&st);
    let mut nodes = vec![a];
    nodes.extend(others);
    for n in nodes.iter_mut() {
        assert!(n.terminate().success(), "{}", n.log());
    }
    VoteRun {
        accuracy,
        rejected,
        norm_limits,
        lineage: lineage(&dirs[0]),
        published,
    }
}

#[test]
fn one_member_gets_one_vote_per_round_whatever_it_sends() {
    use rogue::Attack;
    let rogue_key = tapestry_protocol::Keypair::from_secret_bytes(&[77; 32]);
    let rogue_id = rogue_key.node_id().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let mut table = Vec::new();
    for rule in ["trimmed-mean:0.2", "mean"] {
        let control = five_and_a_rogue(
            &tmp.path().join(format!("{rule}-control")),
            rule,
            None,
            &rogue_key,
        );
        table.push(format!(
            "{rule:<16} {:<9} accuracy {:.4}",
            "none", control.accuracy
        ));
        for attack in [Attack::SignFlip, Attack::Alie, Attack::Ipm] {
            let run = five_and_a_rogue(
                &tmp.path().join(format!("{rule}-{attack:?}")),
                rule,
                Some(attack),
                &rogue_key,
            );
            let voted = run.lineage["rounds_by_author"][&rogue_id]
                .as_array()
                .map_or(0, Vec::len);
            table.push(format!(
                "{rule:<16} {:<9} accuracy {:.4} ({:.3}× control)  published {}  duplicates refused {}  rounds it voted in {voted}  norm limit {:.4} -> {:.4}",
                format!("{attack:?}"),
                run.accuracy,
                run.accuracy / control.accuracy,
                run.published,
                run.rejected["duplicate_author_round"],
                run.norm_limits.0,
                run.norm_limits.1,
            ));
            eprintln!("{}\n  A rejected {}", table.last().unwrap(), run.rejected);
            // It sent 20 a round; A admitted one per round and refused the rest.
            assert!(run.published >= 20, "the rogue published {}", run.published);
            // (Gossipsub's peer score drops the rogue's messages once A
            // reported a refused one, so A's engine sees only the first few.)
            assert!(
                run.rejected["duplicate_author_round"].as_u64().unwrap_or(0) >= 1,
                "{}",
                run.rejected
            );
            // In the head's lineage: at most one delta of the rogue per round,
            // and every version aggregates at least quorum-many distinct
            // authors (0.8 of the five honest nodes A's peers see besides the
            // rogue: four).
            let l = &run.lineage;
            let rogue_deltas = l["deltas_by_author"][&rogue_id]
                .as_array()
                .map_or(0, Vec::len);
            let rogue_rounds = l["rounds_by_author"][&rogue_id]
                .as_array()
                .map_or(0, Vec::len);
            assert_eq!(rogue_deltas, rogue_rounds, "{l}");
            for (id, v) in l["by_version"].as_object().unwrap() {
                if v["parents"].as_u64().unwrap() == 1 {
                    assert!(v["authors"].as_u64().unwrap() >= 4, "{id}: {v}");
                }
            }
            // The norm limit does not ratchet up under large-but-admissible
            // deltas.
            assert!(
                run.norm_limits.1 < 2.0 * run.norm_limits.0,
                "norm limit {:?}",
                run.norm_limits
            );
            if rule != "mean" {
                assert!(
                    run.accuracy >= 0.95 * control.accuracy,
                    "{rule} under {attack:?}: {} against {}",
                    run.accuracy,
                    control.accuracy
                );
            }
        }
    }
    eprintln!("{}", table.join("\n"));
}

/// Sets `key = value` in a node's config.toml (the key's first line).
fn set_config(dir: &Path, key: &str, value: &str) {
    tapestry_lab::process::set_config(dir, key, value).unwrap();
}

#[test]
fn a_member_too_far_behind_to_recompute_catches_up_on_attestations_of_enough_members() {
    let rounds = 12;
    let tmp = tempfile::tempdir().unwrap();
    // Four members; D recomputes at most 3 rounds ahead, so a head of
    // round 12 is too far for it to rebuild.
    let dirs = permissioned_region(tmp.path(), 4, &[], "0.75");
    set_config(&dirs[3], "max_rounds_ahead", "3");
    // With outer momentum, which needs the parameters of the parent of a
    // version taken on attestations too (fetched with it).
    for d in &dirs {
        set_config(d, "outer", "\"momentum:1:0.5\"");
    }
    let (mut honest, st) = three_honest(&dirs[..3], rounds, |_| {});
    let head = st[0]["head_params"].clone();
    assert!(st.iter().all(|s| s["head_params"] == head));
    let boot = honest[0].address();
    let mut d_args = run_args(Some(rounds), 1, (0, 3), Some(&boot));
    // D's own rounds, alone (the others have finished and send nothing, so
    // they do not hold its rounds up), at most one every 3 s.
    d_args.extend(["--min-round-ms".to_string(), "3000".to_string()]);

    // Asking for all four members' word (D's own included, which it cannot
    // give): the head stays out of reach; D keeps to its own rounds.
    set_config(&dirs[3], "attestations", "4");
    let mut d = Node::start(&dirs[3], &d_args);
    std::thread::sleep(Duration::from_secs(12));
    let s = d.status();
    assert!(s["round"].as_u64().unwrap() < rounds, "{s}");
    assert_ne!(s["head_params"], head, "{s}");
    assert!(
        s["rejected"]["round_jump"].as_u64().unwrap_or(0) >= 1,
        "{s}"
    );
    assert!(
        !d.log().contains("attestations"),
        "taken on too few attestations: {}",
        d.log()
    );
    assert!(d.terminate().success(), "{}", d.log());

    // The default (more than a third of the roster: 2 of 4): the head's
    // author and the two members who verified it vouch; D takes it.
    set_config(&dirs[3], "attestations", "0");
    let mut d = Node::start(&dirs[3], &d_args);
    wait_for(&[&d], 60, "D to take the head", |s| {
        s["head_params"] == head
    });
    let s = d.status();
    assert_eq!(s["round"].as_u64().unwrap(), rounds, "{s}");
    assert!(
        d.log()
            .contains("version taken on roster members' attestations"),
        "{}",
        d.log()
    );
    let log = d.log();
    let fetched = log
        .lines()
        .find(|l| l.contains("attested version's parent fetched"))
        .unwrap_or_else(|| panic!("the parent was not fetched: {log}"));
    // (The log is coloured: drop the escape sequences around `=`.)
    let mut plain = String::new();
    let mut escape = false;
    for c in fetched.chars() {
        match (escape, c) {
            (false, '\u{1b}') => escape = true,
            (true, 'm') => escape = false,
            (false, c) => plain.push(c),
            _ => {}
        }
    }
    assert!(plain.contains("held=true"), "{plain}");
    for n in honest.iter_mut().chain(std::iter::once(&mut d)) {
        assert!(n.terminate().success(), "{}", n.log());
    }
    let (clean, report) = scrub(&dirs[3]);
    assert!(clean, "{report}");
}

#[test]
fn made_up_lineages_and_nan_deltas_cost_bounded_work_and_no_disk() {
    use tapestry_protocol::{ContentId, ModelManifest, Verified};
    use tapestry_storage::ChunkStore;
    const VERSIONS: usize = 200;
    const LINEAGE: usize = 4096;
    const NAN_DELTAS: u64 = 100;
    const QUOTA_MB: u64 = 32;
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("n{i}"))).collect();
    for d in &dirs {
        init(d);
        set_config(d, "quota_mb", &QUOTA_MB.to_string());
    }
    let rounds = 24;
    let [a, b, c] = three_paced(&dirs, rounds, 2);
    let nodes = [&a, &b, &c];
    wait_for(&nodes, 90, "round 3", |s| s["round"].as_u64().unwrap() >= 3);
    let cfg = tapestry_node::config::Config {
        region: "test".into(),
        ..Default::default()
    }
    .engine(0)
    .unwrap();
    let n = cfg.spec.n_params();

    // A sampler watches every node's store while the rogue works.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (made_up, nan_chunks, store_peak) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = [0u64; 3];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (i, n) in nodes.iter().enumerate() {
                    peak[i] = peak[i].max(n.status()["store_bytes"].as_u64().unwrap());
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            peak
        });
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (made_up, nan_chunks) = rt.block_on(async {
            let rogue = rogue::Rogue::connect(&a.address()).await;
            let key = rogue.key.clone();
            let head: ContentId = a.status()["head"].as_str().unwrap().parse().unwrap();
            let (h, hp) = rogue.fetch_version(head).await;
            let round = h.message().round;
            let sign = |round: u64, parents: Vec<ContentId>, deltas: Vec<ContentId>| {
                tapestry_testkit::sign::version(&cfg, &key, round, &hp, parents, deltas)
            };
            // One made-up line of LINEAGE − 1 versions off the head, each
            // naming the same delta (served, so a verifier must walk the
            // line); the 200 versions announced end it, each naming a
            // delta of its own (served too).
            let mut seq = 1_000;
            let mut delta = |round: u64| {
                seq += 1;
                let (d, payload) =
                    tapestry_testkit::sign::delta(&cfg, &key, round, seq, &vec![0.001; n]);
                rogue.serve_delta(&d, &payload);
                d.id()
            };
            let shared = delta(round);
            let mut made_up: Vec<Verified<ModelManifest>> = Vec::new();
            let mut parent = h.id();
            for _ in 0..LINEAGE - 1 {
                let v = sign(round + 1, vec![parent], vec![shared]);
                parent = v.id();
                rogue
                    .manifests
                    .lock()
                    .unwrap()
                    .insert(v.id(), v.envelope_bytes().to_vec());
                made_up.push(v);
            }
            let mut tips = Vec::new();
            for _ in 0..VERSIONS {
                let own = delta(round);
                tips.push(sign(round + 1, vec![parent], vec![own]));
            }
            for v in &tips {
                rogue.announce_version(v).await;
            }
            made_up.extend(tips);
            // And 100 deltas of this round whose payloads are NaN.
            let round = a.status()["round"].as_u64().unwrap();
            let nan = vec![f32::NAN; n];
            let payload: Vec<u8> = nan.iter().flat_map(|v| v.to_le_bytes()).collect();
            let mut nan_chunks = vec![ContentId::of(&payload)];
            for seq in 1..=NAN_DELTAS {
                // Each payload differs (one value), so each is its own chunk.
                let mut values = nan.clone();
                values[0] = seq as f32;
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                nan_chunks.push(ContentId::of(&bytes));
                rogue.publish(rogue.delta(round, seq, &values)).await;
            }
            // Stay a while, answering head probes with the last version.
            tokio::time::sleep(Duration::from_secs(15)).await;
            (made_up, nan_chunks)
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (made_up, nan_chunks, sampler.join().unwrap())
    });

    let st = wait_for(&nodes, 240, "all to finish", |s| {
        s["finished"].as_bool().unwrap()
    });
    for (i, s) in st.iter().enumerate() {
        eprintln!(
            "node {i}: round {} verifying_peak {} store peak {} B rejected {}",
            s["round"], s["verifying_peak"], store_peak[i], s["rejected"]
        );
        // Honest rounds went on to the end.
        assert_eq!(s["round"].as_u64().unwrap(), rounds, "{s}");
        // Version fetches stayed under the cap.
        assert!(s["verifying_peak"].as_u64().unwrap() <= 16, "{s}");
        // The store stayed within its quota.
        assert!(store_peak[i] <= QUOTA_MB << 20, "{s}");
    }
    // A heard the rogue and worked on it (it verified made-up versions and
    // refused the NaN deltas) ...
    assert!(st[0]["verifying_peak"].as_u64().unwrap() >= 2, "{}", st[0]);
    assert!(
        st[0]["rejected"]["non_finite"].as_u64().unwrap_or(0) >= 1,
        "{}",
        st[0]
    );
    assert_eq!(settled_heads(&nodes).len(), 1);
    let mut nodes = [a, b, c];
    for n in nodes.iter_mut() {
        assert!(n.terminate().success(), "{}", n.log());
    }
    // ... and kept none of it: no made-up version, no NaN payload.
    for d in &dirs {
        let store = tapestry_node::ops::open_store(
            &tapestry_node::config::DataDir {
                root: d.to_path_buf(),
            },
            false,
        )
        .unwrap();
        for v in &made_up {
            assert!(store.get_model_manifest(&v.id()).unwrap().is_none());
        }
        for c in &nan_chunks {
            assert!(
                !store.has(c).unwrap(),
                "{}: NaN payload {c} kept",
                d.display()
            );
        }
    }
}

#[test]
fn with_outer_momentum_every_node_recomputes_every_version_and_a_restarted_node_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..4).map(|i| tmp.path().join(format!("n{i}"))).collect();
    for d in &dirs {
        init(d);
        set_config(d, "outer", "\"momentum:1:0.5\"");
    }
    // Three nodes: each version's step has the momentum term, read from
    // the lineage; every node recomputes its peers' versions and they agree.
    let (mut nodes, st) = three_honest(&dirs[..3], 8, |_| {});
    let refs: Vec<&Node> = nodes.iter().collect();
    assert_eq!(settled_heads(&refs).len(), 1);
    for s in &st {
        assert_eq!(s["round"].as_u64().unwrap(), 8, "{s}");
        for bad in ["version_mismatch", "unknown_parent"] {
            assert_eq!(
                s["rejected"][bad].as_u64().unwrap_or(0),
                0,
                "{}",
                s["rejected"]
            );
        }
        assert!(s["accuracy"].as_f64().unwrap() > 0.8, "{s}");
    }
    for n in nodes.iter_mut() {
        assert!(n.terminate().success(), "{}", n.log());
    }
    // A node alone, stopped after a few rounds and started again: its head
    // is a step whose parent's parameters the engine no longer holds; the
    // node reads them from its store, or it would wait for peers forever.
    let args = run_args(None, 0, (0, 1), None);
    let mut alone = Node::start(&dirs[3], &args);
    let before = wait_for(&[&alone], 60, "the lone node to reach round 3", |s| {
        s["round"].as_u64().unwrap() >= 3
    });
    assert!(alone.terminate().success(), "{}", alone.log());
    let stopped = before[0]["round"].as_u64().unwrap();
    let mut alone = Node::start(&dirs[3], &args);
    wait_for(&[&alone], 60, "the restarted node to go on", |s| {
        s["round"].as_u64().unwrap() >= stopped + 3
    });
    assert!(alone.terminate().success(), "{}", alone.log());
}
