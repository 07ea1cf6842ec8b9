//! A node whose store database is damaged on disk: it refuses to start,
//! with one line naming the fix; `tapestry repair` rebuilds the database
//! from the pack files; started again, the node takes the region's head
//! from its peer; and a pack file deleted from under a running node is
//! noticed and the head's chunks it held are fetched again from its peer.
//! Real processes, a real sled store.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tapestry_lab::process::{NodeProcess, init, local_run, status};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tapestry"))
}

fn command(dir: &Path, shard: &str, boot: Option<&str>) -> Command {
    let digits = tapestry_testkit::digits_arg();
    let mut args = vec![
        "--min-round-ms",
        "300",
        "--data",
        &digits,
        "--start-peers",
        "1",
        "--shard",
        shard,
    ];
    if let Some(b) = boot {
        args.extend(["--bootstrap", b]);
    }
    local_run(bin(), dir, &args)
}

fn start(dir: &Path, shard: &str, boot: Option<&str>) -> (NodeProcess, Value) {
    // A stale endpoints file from an earlier run must not be read.
    let _ = std::fs::remove_file(dir.join("endpoints.json"));
    let node = NodeProcess::spawn(command(dir, shard, boot), dir).unwrap();
    let endpoints = node
        .endpoints(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no endpoints; log:\n{}", node.log()));
    (node, endpoints)
}

fn api(e: &Value) -> String {
    e["api"].as_str().unwrap().to_owned()
}

/// Polls both nodes' status until `done` holds (or panics with both logs).
fn wait(nodes: [(&NodeProcess, &str); 2], secs: u64, what: &str, done: impl Fn(&[Value]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let st: Vec<Value> = nodes
            .iter()
            .map(|(_, api)| status(api).unwrap_or(Value::Null))
            .collect();
        if done(&st) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not after {secs} s; statuses {st:?}\nlogs:\n{}\n---\n{}",
            nodes[0].0.log(),
            nodes[1].0.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn round(s: &Value) -> u64 {
    s["round"].as_u64().unwrap_or(0)
}

#[test]
fn a_damaged_store_is_refused_repaired_and_the_node_rejoins() {
    let tmp = tempfile::tempdir().unwrap();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    for d in [&da, &db] {
        init(bin(), d, &["--region", "test"]).unwrap();
    }
    let (a, ea) = start(&da, "0/2", None);
    let boot = ea["listen"][0].as_str().unwrap().to_owned();
    let (mut b, eb) = start(&db, "1/2", Some(&boot));
    let (api_a, api_b) = (api(&ea), api(&eb));
    wait([(&a, &api_a), (&b, &api_b)], 90, "rounds", |st| {
        st.iter().all(|s| round(s) >= 8)
    });
    assert!(
        b.terminate(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );

    // Damage the start of sled's log. sled would open it, silently without
    // the records after the damage; the store notices it lost flushed
    // records.
    let log = db.join("store").join("meta").join("db");
    let mut bytes = std::fs::read(&log).unwrap();
    for byte in bytes.iter_mut().take(64) {
        *byte ^= 0x5a;
    }
    std::fs::write(&log, bytes).unwrap();

    let out = command(&db, "1/2", Some(&boot)).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it ran on a damaged store: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let error = lines.iter().find(|l| l.starts_with("tapestry: ")).copied();
    assert!(
        error.is_some_and(|l| l.contains("is damaged")
            && l.contains(&format!("tapestry repair --data-dir {}", db.display()))),
        "no one-line error naming the fix: {stderr}"
    );

    let out = Command::new(bin())
        .args(["repair", "--data-dir"])
        .arg(&db)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "repair failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("chunks indexed again"), "{stdout}");

    // Started again, it takes the region's head from A (verified by
    // recomputation from its genesis, as a new node would) and follows.
    let at_restart = round(&status(&api_a).unwrap());
    let (b, eb) = start(&db, "1/2", Some(&boot));
    let api_b = api(&eb);
    wait(
        [(&a, &api_a), (&b, &api_b)],
        120,
        "B back on A's head",
        |st| round(&st[1]) > at_restart && st[0]["head"] == st[1]["head"],
    );
    eprintln!(
        "{stdout}A was at round {at_restart} when B restarted; B now: {}",
        status(&api_b).unwrap()
    );
    let scrub = Command::new(bin())
        .args(["scrub", "--data-dir"])
        .arg(&db)
        .output()
        .unwrap();
    // (B is running: the store is locked, scrub must say so, not damage it.)
    assert!(!scrub.status.success());
    assert!(
        String::from_utf8_lossy(&scrub.stderr).contains("locked"),
        "{}",
        String::from_utf8_lossy(&scrub.stderr)
    );
}

#[test]
fn a_pack_file_deleted_underneath_is_noticed_and_the_head_fetched_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    for d in [&da, &db] {
        init(bin(), d, &["--region", "test"]).unwrap();
    }
    let run = |dir: &Path, shard: &str, boot: Option<&str>| {
        let mut cmd = command(dir, shard, boot);
        // A few rounds, then the heads stay put (the nodes keep running).
        cmd.args(["--rounds", "5"]);
        let node = NodeProcess::spawn(cmd, dir).unwrap();
        let e = node
            .endpoints(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("no endpoints; log:\n{}", node.log()));
        (node, e)
    };
    let (a, ea) = run(&da, "0/2", None);
    let boot = ea["listen"][0].as_str().unwrap().to_owned();
    let (mut b, eb) = run(&db, "1/2", Some(&boot));
    let (api_a, api_b) = (api(&ea), api(&eb));
    wait(
        [(&a, &api_a), (&b, &api_b)],
        120,
        "both finished on one head",
        |st| st.iter().all(|s| s["finished"] == true) && st[0]["head"] == st[1]["head"],
    );
    let head: Value = serde_json::from_str(
        &tapestry_node::api::get(&api_b, "/model/head", Duration::from_secs(10)).unwrap(),
    )
    .unwrap();
    let ids: Vec<Vec<u8>> = head["chunk_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let hex = c.as_str().unwrap();
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect()
        })
        .collect();
    // The pack holding the head's first chunk (its record's header names
    // the chunk's id), and how many of the head's chunks it holds.
    let packs = db.join("store").join("packs");
    let holds = |data: &[u8], id: &[u8]| data.windows(id.len()).any(|w| w == id);
    let (pack, lost) = std::fs::read_dir(&packs)
        .unwrap_or_else(|e| panic!("{} is not where chunks are kept: {e}", packs.display()))
        .map(|e| e.unwrap().path())
        .find_map(|p| {
            let data = std::fs::read(&p).unwrap();
            holds(&data, &ids[0]).then(|| (p, ids.iter().filter(|id| holds(&data, id)).count()))
        })
        .expect("no pack holds the head's first chunk");
    std::fs::remove_file(&pack).unwrap();

    // Within a few checks (every 10 s) B notices and fetches them from A.
    let deadline = Instant::now() + Duration::from_secs(60);
    let want = format!("tapestry_chunks_refetched_total {lost}\n");
    loop {
        let metrics = tapestry_node::api::get(&api_b, "/metrics", Duration::from_secs(10)).unwrap();
        if metrics.contains(&want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the head's {lost} lost chunks were not fetched again; metrics:\n{metrics}\nlog:\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        b.terminate(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );
    // Scrub reports what else the pack held (older versions, deltas, and
    // the refs the node keeps to them) as lost; the head is whole.
    let scrub = Command::new(bin())
        .args(["scrub", "--data-dir"])
        .arg(&db)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&scrub.stdout);
    let head_id = head["id"].as_str().unwrap();
    let short = |hex: &str| format!("ContentId({})", &hex[..8]);
    assert!(!out.contains(&short(head_id)), "{out}");
    for c in head["chunk_ids"].as_array().unwrap() {
        assert!(!out.contains(&short(c.as_str().unwrap())), "{out}");
    }
}
