//! Crash safety: a child process writes versions and moves refs in a loop; the
//! test kills it with SIGKILL at random moments, reopens the store, scrubs it
//! and checks that nothing acknowledged as durable was lost.
//!
//! `TAPESTRY_CRASH_CYCLES=1000 cargo test -p tapestry-storage --test crash`
//! runs a longer soak (default 30 cycles).

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use tapestry_protocol::ContentId;
use tapestry_storage::*;

const DIR_VAR: &str = "TAPESTRY_CRASH_CHILD_DIR";
const SEED_VAR: &str = "TAPESTRY_CRASH_CHILD_SEED";

/// The writer. Runs only as the child of `sigkill_at_random_moments_loses_nothing_durable`.
#[test]
#[ignore = "run as a child process by sigkill_at_random_moments_loses_nothing_durable"]
fn crash_child() {
    let Some(dir) = std::env::var_os(DIR_VAR) else {
        return;
    };
    let seed: u64 = std::env::var(SEED_VAR).unwrap().parse().unwrap();
    let s = SledStore::open(Path::new(&dir), &SledConfig::default()).unwrap();
    let start = s
        .get_ref("head")
        .unwrap()
        .and_then(|v| s.get_model_manifest(&v).unwrap())
        .map_or(0, |m| m.message().round + 1);
    println!("ready {start}");
    let mut acked: Option<ContentId> = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    for round in start..start + 100_000 {
        if Instant::now() > deadline {
            break;
        }
        // 100 KB to 1.5 MB of parameters in 256 KiB chunks.
        let len =
            4 * (25_000 + (seed.wrapping_mul(31).wrapping_add(round * 7919) % 350_000) as usize);
        let v = put_version(
            &s,
            seed << 32 | round,
            round,
            len,
            256 << 10,
            vec![],
            vec![],
        );
        s.set_ref("head", v.id()).unwrap();
        if round % 3 == 0 {
            // Acknowledge: pin it, flush, say so; then release the previous one.
            s.pin(v.id()).unwrap();
            s.flush().unwrap();
            println!("durable {round} {}", v.id());
            if let Some(prev) = acked.replace(v.id()) {
                s.unpin(prev).unwrap();
            }
        }
        if round % 10 == 5 {
            s.gc().unwrap();
        }
    }
}

fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[test]
fn sigkill_at_random_moments_loses_nothing_durable() {
    let cycles: u64 = std::env::var("TAPESTRY_CRASH_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(30);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let mut rng = 0x5eed_1234_u64;
    let mut last_acked: Option<(u64, ContentId)> = None;
    let (mut acks, mut lost_in_flight, mut reindexed) = (0u64, 0usize, 0u64);
    for cycle in 0..cycles {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_VAR, &dir)
            .env(SEED_VAR, cycle.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Wait until the child has opened the store.
        let ready_by = Instant::now() + Duration::from_secs(30);
        loop {
            let line = rx
                .recv_timeout(ready_by.saturating_duration_since(Instant::now()))
                .unwrap();
            // The test harness prints "test crash_child ... " before it.
            if line.contains("ready ") {
                break;
            }
        }
        if cycle == 0 {
            // Another process holds the store: a clear error, not a panic.
            let err = SledStore::open(&dir, &SledConfig::default()).unwrap_err();
            assert!(matches!(err, StoreError::Locked(_)), "{err}");
        }
        std::thread::sleep(Duration::from_millis(30 + next(&mut rng) % 400));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        for line in rx.try_iter() {
            if let Some(rest) = line.split_once("durable ").map(|(_, r)| r) {
                let (round, id) = rest.split_once(' ').unwrap();
                last_acked = Some((round.parse().unwrap(), id.parse().unwrap()));
                acks += 1;
            }
        }

        let s = SledStore::open(&dir, &SledConfig::default()).unwrap();
        let report = s.scrub().unwrap();
        assert!(
            report.corrupt_chunks.is_empty(),
            "cycle {cycle}: {report:?}"
        );
        assert!(
            report.corrupt_manifests.is_empty(),
            "cycle {cycle}: {report:?}"
        );
        assert!(
            report.incomplete_refs.is_empty(),
            "cycle {cycle}: {report:?}"
        );
        // Chunks written but never made durable may be lost (work in flight),
        // but never one that a ref or pin needs.
        let mut needed: Vec<ContentId> = Vec::new();
        for id in s
            .refs()
            .unwrap()
            .into_iter()
            .map(|(_, id)| id)
            .chain(s.pins().unwrap())
        {
            if let Some(m) = s.get_model_manifest(&id).unwrap() {
                needed.extend(&m.message().chunk_ids);
            }
        }
        assert!(
            report.lost_chunks.iter().all(|c| !needed.contains(c)),
            "cycle {cycle}: {report:?}"
        );
        lost_in_flight += report.lost_chunks.len();
        reindexed += report.index_repairs;

        if let Some((round, id)) = last_acked {
            assert!(
                version_complete(&s, &id),
                "cycle {cycle}: acknowledged version {id} lost"
            );
            assert!(s.pins().unwrap().contains(&id));
            let head = s
                .get_ref("head")
                .unwrap()
                .expect("a head after an acknowledgement");
            assert!(
                version_complete(&s, &head),
                "cycle {cycle}: head incomplete"
            );
            let head_round = s
                .get_model_manifest(&head)
                .unwrap()
                .unwrap()
                .message()
                .round;
            assert!(
                head_round >= round,
                "cycle {cycle}: head went back from {round} to {head_round}"
            );
        }
    }
    eprintln!(
        "{cycles} SIGKILL cycles, {acks} acknowledged flushes, {lost_in_flight} unflushed chunks lost, \
         {reindexed} chunks re-indexed"
    );
    assert!(
        acks >= cycles,
        "the writer made too little progress to test anything ({acks} acks)"
    );
}
