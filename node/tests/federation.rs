//! Two permissioned regions federate: real `tapestry run` processes on
//! loopback, each region with its own roster, region key and digit
//! classes; every second round each region mixes its head with the other's,
//! taken on the other region's attestations.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tapestry_core::data::{self, CsvOptions, Dataset, Scaler};
use tapestry_core::model::{Architecture, Examples, evaluate_on};
use tapestry_lab::process::NodeProcess;
use tapestry_storage::{ChunkStore, SledConfig, SledStore};

fn tapestry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tapestry"));
    c.env("RUST_LOG", "info,libp2p=warn");
    c
}

/// The value after `label` on a line of a command's output.
fn field(out: &str, label: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(label))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {label:?} in {out}"))
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A permissioned region named `name` in `root/name`: its key and roster,
/// and `n` initialised nodes on it. Returns the nodes' directories, the
/// roster's path and the region key.
fn region(root: &Path, name: &str, n: usize) -> (Vec<PathBuf>, PathBuf, String) {
    let dir = root.join(name);
    let out = ok(&tapestry()
        .args(["region", "new", "--region", name, "--dir"])
        .arg(&dir)
        .output()
        .unwrap());
    let key = field(&out, "region key");
    let nodes: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("n{i}"))).collect();
    let mut ids = Vec::new();
    for d in &nodes {
        let out = ok(&tapestry()
            .args(["init", "--region", name, "--data-dir"])
            .arg(d)
            .output()
            .unwrap());
        ids.push(field(&out, "node id"));
    }
    ok(&tapestry()
        .args(["region", "add", "--dir"])
        .arg(&dir)
        .args(&ids)
        .output()
        .unwrap());
    (nodes, dir.join("roster.cbor"), key)
}

/// A region's name, roster and region key.
type Region<'a> = (&'a str, &'a Path, &'a str);

/// Writes the federation settings into a node's config: its own roster,
/// a mix every `every` rounds with every region of `all` (a complete
/// graph; its own among them).
fn federate(node: &Path, all: &[Region<'_>], every: u64) {
    let cfg = node.join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let region = field(&text, "region = ").trim_matches('"').to_owned();
    let own = all.iter().find(|r| r.0 == region).unwrap();
    let mut edges = Vec::new();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            edges.push(format!("[\"{}\", \"{}\"]", a.0, b.0));
        }
    }
    let mut text = text
        .replace(
            "roster = \"\"",
            &format!("roster = {:?}", own.1.display().to_string()),
        )
        .replace("region_key = \"\"", &format!("region_key = \"{}\"", own.2))
        .replace("every = 0", &format!("every = {every}"))
        .replace("edges = []", &format!("edges = [{}]", edges.join(", ")))
        .replace("wait_ms = 5000", "wait_ms = 8000");
    for other in all.iter().filter(|r| r.0 != region) {
        text.push_str(&format!(
            "\n[[federation.neighbour]]\nregion = \"{}\"\nroster = {:?}\nregion_key = \"{}\"\n",
            other.0,
            other.1.display().to_string(),
            other.2
        ));
    }
    std::fs::write(&cfg, text).unwrap();
}

struct Node {
    dir: PathBuf,
    process: NodeProcess,
}

impl Node {
    fn start(dir: &Path, data: &Path, i: usize, boot: &[String]) -> Node {
        Self::start_waiting(dir, data, i, boot, 2)
    }

    /// [`Node::start`], waiting for `peers` members before the first round.
    fn start_waiting(dir: &Path, data: &Path, i: usize, boot: &[String], peers: usize) -> Node {
        let bin = Path::new(env!("CARGO_BIN_EXE_tapestry"));
        let peers = peers.to_string();
        let mut args: Vec<String> = [
            "--rounds",
            "10",
            "--start-peers",
            &peers,
            "--min-round-ms",
            "300",
            "--shard",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("{i}/3"));
        for b in boot {
            args.extend(["--bootstrap".to_string(), b.clone()]);
        }
        let mut cmd = tapestry_lab::process::local_run(bin, dir, &args);
        cmd.arg("--data").arg(data);
        Node {
            dir: dir.to_path_buf(),
            process: NodeProcess::spawn(cmd, dir).unwrap(),
        }
    }

    fn endpoints(&self) -> Value {
        self.process
            .endpoints(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("no endpoints.json: {}", self.process.log()))
    }

    fn address(&self) -> String {
        self.endpoints()["listen"][0].as_str().unwrap().to_owned()
    }

    fn status(&self) -> Value {
        let api = self.endpoints()["api"].as_str().unwrap().to_owned();
        tapestry_lab::process::status(&api).unwrap()
    }
}

fn wait_for(nodes: &[&Node], secs: u64, what: &str, done: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let st: Vec<Value> = nodes.iter().map(|n| n.status()).collect();
        if st.iter().all(&done) {
            return;
        }
        if Instant::now() > deadline {
            for n in nodes {
                eprintln!("--- {}\n{}", n.dir.display(), n.process.log());
            }
            panic!("timed out waiting for {what}: {st:#?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The head parameters kept in a stopped node's store.
fn head_params(dir: &Path) -> Vec<f32> {
    let store = SledStore::open(&dir.join("store"), &SledConfig::default()).unwrap();
    let id = store
        .get_ref(tapestry_node::runtime::HEAD_REF)
        .unwrap()
        .unwrap();
    let m = store.get_model_manifest(&id).unwrap().unwrap();
    let bytes = store
        .read_payload(&m.message().chunk_ids, m.message().payload_bytes)
        .unwrap();
    tapestry_protocol::f32_from_le_bytes(&bytes)
}

/// Accuracy of logistic-regression parameters on all 1,797 digits.
fn accuracy_on_all_ten(params: &[f32]) -> f32 {
    let mut all: Dataset =
        data::load_csv(&tapestry_testkit::digits_path(), CsvOptions::default()).unwrap();
    Scaler::from_range(64, 0.0, 16.0).apply(&mut all);
    let spec = Architecture::Logistic.spec(64, 10);
    evaluate_on(&spec, params, &Examples::Rows(all))
        .unwrap()
        .accuracy
        .unwrap()
}

#[test]
fn two_permissioned_regions_mix_their_heads_on_each_others_attestations() {
    let tmp = tempfile::tempdir().unwrap();
    let (east, east_roster, east_key) = region(tmp.path(), "east", 3);
    let (west, west_roster, west_key) = region(tmp.path(), "west", 3);
    // A third region of three members of which only one runs: its heads
    // have one voucher, their author, where two are needed. No one may
    // take them, though that member takes the others' and mixes.
    let (south, south_roster, south_key) = region(tmp.path(), "south", 3);
    let all = [
        ("east", east_roster.as_path(), east_key.as_str()),
        ("west", west_roster.as_path(), west_key.as_str()),
        ("south", south_roster.as_path(), south_key.as_str()),
    ];
    for d in east.iter().chain(&west).chain(&south) {
        federate(d, &all, 2);
    }
    // Each region holds half of the classes.
    let (east_data, west_data) = (tmp.path().join("east.csv"), tmp.path().join("west.csv"));
    tapestry_testkit::write_digits_of(0..5, &east_data);
    tapestry_testkit::write_digits_of(5..10, &west_data);

    let e0 = Node::start(&east[0], &east_data, 0, &[]);
    let boot = e0.address();
    let w0 = Node::start(&west[0], &west_data, 0, std::slice::from_ref(&boot));
    let both = [boot.clone(), w0.address()];
    let e1 = Node::start(&east[1], &east_data, 1, &both);
    let e2 = Node::start(&east[2], &east_data, 2, &both);
    let w1 = Node::start(&west[1], &west_data, 1, &both);
    let w2 = Node::start(&west[2], &west_data, 2, &both);
    let s0 = Node::start_waiting(&south[0], &tapestry_testkit::digits_path(), 0, &both, 0);
    let nodes = [&e0, &e1, &e2, &w0, &w1, &w2];
    wait_for(&nodes, 300, "all to finish", |s| {
        s["finished"].as_bool().unwrap()
    });
    let lone = s0.status();
    // Within a region, one head.
    let settle = |region: &[&Node]| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let heads: std::collections::BTreeSet<String> = region
                .iter()
                .map(|n| n.status()["head_params"].to_string())
                .collect();
            if heads.len() == 1 || Instant::now() > deadline {
                return heads;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    assert_eq!(settle(&nodes[..3]).len(), 1, "east's members disagree");
    assert_eq!(settle(&nodes[3..]).len(), 1, "west's members disagree");
    let statuses: Vec<Value> = nodes.iter().map(|n| n.status()).collect();
    for (i, s) in statuses.iter().enumerate() {
        let f = &s["federation"];
        assert_eq!(f["every"], 2, "{s:#}");
        assert!(
            f["foreign_heads_taken"].as_u64().unwrap() >= 1,
            "node {i} took no foreign head: {s:#}"
        );
        // Nothing was refused for being a mix, or as an outsider.
        let rejected = s["rejected"].as_object().unwrap();
        for reason in ["version_mismatch", "bad_version", "outsider"] {
            assert!(
                !rejected.contains_key(reason),
                "node {i} refused {reason}: {s:#}"
            );
        }
    }
    // The lone member's heads were named and refused, by every node.
    for (i, s) in statuses.iter().enumerate() {
        assert!(
            s["federation"]["foreign_heads_refused"].as_u64().unwrap() >= 1,
            "node {i} refused nothing: {s:#}"
        );
    }
    // It took theirs (each vouched for by their regions) and mixed.
    assert!(
        lone["federation"]["foreign_heads_taken"].as_u64().unwrap() >= 2,
        "{lone:#}"
    );
    assert!(
        lone["federation"]["mixes_signed"].as_u64().unwrap() >= 1,
        "{lone:#}"
    );
    // Each region signed mixes that took the other's head on at least two
    // of its members' word, never the lone member's.
    for (region, other, range) in [("east", "west", 0..3), ("west", "east", 3..6)] {
        let mixes: Vec<&Value> = statuses[range]
            .iter()
            .filter_map(|s| s["federation"]["last_mix"].as_object().map(|_| s))
            .collect();
        assert!(
            !mixes.is_empty(),
            "no member of {region} mixed: {statuses:#?}"
        );
        for s in mixes {
            let foreign = s["federation"]["last_mix"]["foreign"].as_array().unwrap();
            assert_eq!(foreign.len(), 1, "{s:#}");
            assert_eq!(foreign[0]["region"], other);
            assert!(foreign[0]["vouchers"].as_u64().unwrap() >= 2, "{s:#}");
            assert!(foreign[0]["distance"].as_f64().unwrap() > 0.0, "{s:#}");
        }
    }
    // Each region's model knows the other's classes: on all ten, far above
    // the half a region alone can reach.
    let mut nodes = [e0, e1, e2, w0, w1, w2, s0];
    for n in &mut nodes {
        n.process.terminate(Duration::from_secs(20)).unwrap();
    }
    for (name, dir) in [("east", &east[0]), ("west", &west[0])] {
        let accuracy = accuracy_on_all_ten(&head_params(dir));
        eprintln!("{name}: accuracy on all ten classes {accuracy:.3}");
        assert!(
            accuracy > 0.7,
            "{name} reaches {accuracy} on all ten classes"
        );
    }
}
