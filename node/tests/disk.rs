//! A node whose store fills up: the disk itself (a small tmpfs the test
//! mounts, then fills) and the store's quota. The node keeps serving and
//! stays healthy, says `disk_full` in `/status` and `/metrics`, takes no new
//! data, takes data again when there is room, and loses nothing it
//! acknowledged (SIGKILL, restart). Real processes, a real sled store on a
//! real file system. Mounting needs root (as the namespace tests do).

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tapestry_lab::process::{NodeProcess, init, local_run, set_config, status};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tapestry"))
}

/// A tmpfs of `mib` MiB, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot mount a tmpfs (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn start(dir: &Path) -> (NodeProcess, String) {
    start_rounds_of(dir, 100)
}

/// [`start`] with rounds of at least `min_round_ms`.
fn start_rounds_of(dir: &Path, min_round_ms: u64) -> (NodeProcess, String) {
    let _ = std::fs::remove_file(dir.join("endpoints.json"));
    let digits = tapestry_testkit::digits_arg();
    let min_round_ms = min_round_ms.to_string();
    let args = [
        "--min-round-ms",
        &min_round_ms,
        "--data",
        &digits,
        "--start-peers",
        "0",
    ];
    let node = NodeProcess::spawn(local_run(bin(), dir, &args), dir).unwrap();
    let api = node
        .api(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no endpoints; log:\n{}", node.log()));
    (node, api)
}

/// Polls the node's status until `done` holds; returns it.
fn wait(
    node: &NodeProcess,
    api: &str,
    secs: u64,
    what: &str,
    mut done: impl FnMut(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(s) = status(api)
            && done(&s)
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not after {secs} s; status {:?}\nlog:\n{}",
            status(api).ok(),
            node.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn round(s: &Value) -> u64 {
    s["round"].as_u64().unwrap_or(0)
}

fn get(api: &str, path: &str) -> Option<String> {
    tapestry_node::api::get(api, path, Duration::from_secs(10)).ok()
}

/// Whether `tapestry health` says the node is healthy; if not, what it said.
fn healthy(api: &str) -> Result<(), String> {
    let out = Command::new(bin())
        .args(["health", "--api", api])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn a_full_disk_stops_new_data_not_the_node_and_nothing_acknowledged_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = Tmpfs::mount(&tmp.path().join("mnt"), 16);
    let dir = mnt.0.join("node");
    init(bin(), &dir, &["--region", "test"]).unwrap();
    let (mut node, api) = start(&dir);
    wait(&node, &api, 60, "rounds", |s| round(s) >= 5);

    // Fill the file system to the last block.
    let filler = mnt.0.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let block = vec![0x5au8; 64 << 10];
    while f.write_all(&block).is_ok() {}
    let _ = f.write_all(&[0u8; 512]);
    drop(f);

    let full = wait(&node, &api, 60, "disk_full", |s| s["disk_full"] == true);
    assert_eq!(
        full["disk_full_reason"], "the disk is out of space",
        "{full}"
    );
    let metrics = get(&api, "/metrics").unwrap();
    assert!(metrics.contains("tapestry_disk_full 1"), "{metrics}");
    // Still serving, still healthy.
    if let Err(why) = healthy(&api) {
        panic!(
            "a node with a full disk is unhealthy: {why}\nstatus {:?}\nlog:\n{}",
            status(&api).ok(),
            node.log()
        );
    }
    let head = get(&api, "/model/head").expect("the head is not served");
    assert!(head.contains(full["head"].as_str().unwrap()), "{head}");
    // While full, the head on disk stays put.
    std::thread::sleep(Duration::from_secs(3));
    let still = status(&api).unwrap();
    assert_eq!(still["disk_full"], true, "{still}");
    assert_eq!(still["head"], full["head"], "the head moved on a full disk");

    // Room again: data again, rounds again.
    std::fs::remove_file(&filler).unwrap();
    let r = round(&still);
    let back = wait(&node, &api, 60, "room again", |s| {
        s["disk_full"] == false && round(s) > r + 3
    });
    assert!(
        get(&api, "/metrics")
            .unwrap()
            .contains("tapestry_disk_full 0")
    );

    // Acknowledged is on disk: killed without warning, the node comes back
    // at least where it said it was.
    let acknowledged = round(&status(&api).unwrap()).max(round(&back));
    node.kill9();
    let (mut node, api) = start(&dir);
    let again = status(&api).unwrap();
    assert!(
        round(&again) >= acknowledged,
        "back at round {} after acknowledging {acknowledged}",
        round(&again)
    );
    assert!(node.terminate(Duration::from_secs(20)).is_some());
    let scrub = Command::new(bin())
        .args(["scrub", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        scrub.status.success(),
        "{}",
        String::from_utf8_lossy(&scrub.stdout)
    );
}

/// The most the store took on disk while `done` did not hold, sampling its
/// status every 200 ms; the last status.
fn most_until(
    node: &NodeProcess,
    api: &str,
    secs: u64,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> (u64, Value) {
    let mut most = 0;
    let s = wait(node, api, secs, what, |s| {
        most = most.max(s["store_bytes"].as_u64().unwrap_or(0));
        done(s)
    });
    (most, s)
}

#[test]
fn the_store_stays_within_its_quota() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    init(bin(), &dir, &["--region", "test"]).unwrap();
    // A model whose versions, not the database, make most of the store
    // (84 k parameters, 337 kB a version).
    set_config(&dir, "architecture", "\"mlp:256,256\"").unwrap();
    set_config(&dir, "keep_versions", "20").unwrap();
    // How big the store is at rest decides the quota: about three times
    // that.
    let (mut node, api) = start(&dir);
    let s = wait(&node, &api, 60, "rounds", |s| {
        round(s) >= 30 && s["store_bytes"].as_u64().unwrap_or(0) > 0
    });
    assert!(node.terminate(Duration::from_secs(20)).is_some());
    let at_rest = s["store_bytes"].as_u64().unwrap();
    // What a round takes on disk, keeping 20 rounds behind the head.
    let per_round = at_rest / 21;
    let quota_mb = 3 * (at_rest >> 20) + 1;
    let quota = quota_mb << 20;
    set_config(&dir, "quota_mb", &quota_mb.to_string()).unwrap();
    set_config(&dir, "keep_versions", "256").unwrap();

    // Keeping 256 rounds would not fit: the node keeps fewer, and its
    // store stays within the quota without ever being full. (Rounds of
    // 300 ms: the store is measured every 2 s and what is written in
    // between is counted whole, so a round or two, not twenty, must fit
    // beside what is kept.)
    let (mut node, api) = start_rounds_of(&dir, 300);
    let r0 = round(&wait(&node, &api, 60, "a round", |s| round(s) > 30));
    // Rounds enough to fill the quota twice over at that rate if nothing
    // older went.
    let fill = 2 * quota / per_round.max(1);
    let (most, s) = most_until(&node, &api, 300, "rounds under the quota", |s| {
        assert_eq!(s["disk_full"], false, "the store filled up: {s}");
        round(s) >= r0 + fill
    });
    eprintln!(
        "store at rest {at_rest} bytes, {per_round} a round; quota {quota}; most {most}; {s}"
    );
    assert!(
        most <= quota,
        "the store grew to {most} bytes over a quota of {quota}"
    );
    let kept = s["keep_rounds"].as_u64().unwrap();
    assert!((20..256).contains(&kept), "kept {kept} rounds: {s}");
    assert!(node.terminate(Duration::from_secs(20)).is_some());

    // A quota under what the store holds: it is full and takes no new
    // data, not even its own votes over the quota; it collects down to
    // the rounds that fit, then takes data again and stays within it.
    // (Two thirds of it: the rounds that fit leave room for what a
    // compaction copies before it deletes, which is not counted.)
    let small_mb = (at_rest >> 20) * 2 / 3;
    let small = small_mb << 20;
    set_config(&dir, "quota_mb", &small_mb.to_string()).unwrap();
    let (mut node, api) = start_rounds_of(&dir, 300);
    let full = wait(&node, &api, 120, "the quota reached", |s| {
        s["disk_full"] == true
    });
    assert!(
        full["disk_full_reason"]
            .as_str()
            .unwrap()
            .contains("over its quota"),
        "{full}"
    );
    let metrics = get(&api, "/metrics").unwrap();
    assert!(
        metrics.contains(&format!("tapestry_store_quota_bytes {small}")),
        "{metrics}"
    );
    let r = round(&full);
    wait(&node, &api, 60, "room again under the quota", |s| {
        s["disk_full"] == false && round(s) > r + 3
    });
    let (most, s) = most_until(&node, &api, 60, "rounds under the small quota", |s| {
        round(s) > r + 30
    });
    eprintln!("small quota {small}; most {most}; {s}");
    assert!(
        most <= small,
        "the store grew to {most} bytes over a quota of {small}"
    );
    let kept = s["keep_rounds"].as_u64().unwrap();
    assert!((2..20).contains(&kept), "kept {kept} rounds: {s}");
    assert_eq!(healthy(&api), Ok(()));
    assert!(node.terminate(Duration::from_secs(20)).is_some());
}
