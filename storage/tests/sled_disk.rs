//! The sled backend on a real disk: persistence across reopen, locking,
//! directories that are not stores, and bytes rotting on disk.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use tapestry_protocol::ContentId;
use tapestry_storage::*;

fn open(dir: &Path) -> Result<SledStore, StoreError> {
    SledStore::open(dir, &SledConfig::default())
}

#[test]
fn everything_survives_a_reopen_after_flush() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let (v, d, pinned) = {
        let s = open(&dir).unwrap();
        let d = put_delta(&s, 1, 1);
        let v = put_version(&s, 2, 1, 600_000, 256 << 10, vec![], vec![d.id()]);
        s.set_ref("m/r/head", v.id()).unwrap();
        let pinned = s.put(b"pinned").unwrap();
        s.pin(pinned).unwrap();
        s.flush().unwrap();
        (v.id(), d.id(), pinned)
    };
    let s = open(&dir).unwrap();
    assert_eq!(s.get_ref("m/r/head").unwrap(), Some(v));
    assert!(version_complete(&s, &v));
    assert!(s.get_delta_manifest(&d).unwrap().is_some());
    assert_eq!(s.pins().unwrap(), vec![pinned]);
    assert!(s.scrub().unwrap().is_clean());
}

#[test]
fn a_flush_of_many_chunk_files_makes_them_all_durable() {
    // Enough files for the flush to sync the file system at once.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let chunks: Vec<Vec<u8>> = (0..100).map(|i| bytes(i, 4096 + i as usize)).collect();
    let ids: Vec<ContentId> = {
        let s = open(&dir).unwrap();
        let ids = chunks.iter().map(|c| s.put(c).unwrap()).collect();
        s.flush().unwrap();
        ids
    };
    let s = open(&dir).unwrap();
    for (id, c) in ids.iter().zip(&chunks) {
        assert_eq!(&*s.get_verified(id).unwrap().unwrap(), &c[..]);
    }
    assert!(s.scrub().unwrap().is_clean());
}

#[test]
fn a_second_open_is_refused_while_the_first_holds_the_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let first = open(&dir).unwrap();
    let err = open(&dir).unwrap_err();
    assert!(
        matches!(err, StoreError::Locked(ref p) if p == &dir),
        "{err}"
    );
    assert!(err.to_string().contains("locked by another process"));
    drop(first);
    // sled's flusher thread lets go of the database (and its lock) on its
    // own shortly after the last handle is dropped: the store opens again
    // once it has, within a bounded wait.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match open(&dir) {
            Ok(_) => break,
            Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("the store did not open again after the first closed: {e}"),
        }
    }
}

#[test]
fn directories_that_are_not_stores_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // A directory with someone else's files in it.
    let foreign = tmp.path().join("foreign");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("thesis.tex"), "precious").unwrap();
    let err = open(&foreign).unwrap_err();
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
    assert_eq!(
        fs::read_to_string(foreign.join("thesis.tex")).unwrap(),
        "precious"
    );
    assert_eq!(
        fs::read_dir(&foreign).unwrap().count(),
        1,
        "nothing was written"
    );
    // A file where the directory should be.
    let file = tmp.path().join("file");
    fs::write(&file, "x").unwrap();
    assert!(matches!(open(&file), Err(StoreError::NotAStore { .. })));
    // A marker of another format.
    let other = tmp.path().join("other");
    fs::create_dir(&other).unwrap();
    fs::write(
        other.join("TAPESTRY_STORE"),
        "tapestry chunk store\nformat 99\n",
    )
    .unwrap();
    assert!(matches!(open(&other), Err(StoreError::NotAStore { .. })));
    // A marker that cannot be read (a directory in its place).
    let broken = tmp.path().join("broken");
    fs::create_dir_all(broken.join("TAPESTRY_STORE")).unwrap();
    assert!(matches!(open(&broken), Err(StoreError::Io { .. })));
    // Not asked to create.
    let absent = tmp.path().join("absent");
    let cfg = SledConfig {
        create: false,
        ..SledConfig::default()
    };
    assert!(matches!(
        SledStore::open(&absent, &cfg),
        Err(StoreError::Io { .. })
    ));
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Flips one bit in every file under `dir` that holds `needle`.
fn rot(dir: &Path, needle: &[u8]) -> usize {
    let mut flipped = 0;
    for f in files_under(dir) {
        let mut content = fs::read(&f).unwrap();
        if let Some(pos) = content.windows(needle.len()).position(|w| w == needle) {
            content[pos + 7] ^= 0x40;
            fs::write(&f, &content).unwrap();
            flipped += 1;
        }
    }
    flipped
}

#[test]
fn a_byte_rotting_on_disk_is_caught_by_scrub_and_never_served() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let data = bytes(5, 256 << 10);
    let id = {
        let s = open(&dir).unwrap();
        let id = s.put(&data).unwrap();
        s.flush().unwrap();
        id
    };
    assert_eq!(rot(&dir, &data[100_000..100_064]), 1);
    let s = open(&dir).unwrap();
    let report = s.scrub().unwrap();
    assert_eq!(report.corrupt_chunks, vec![id]);
    assert!(!report.is_clean());
    assert!(!s.has(&id).unwrap());
    assert!(s.get_verified(&id).unwrap().is_none());
    assert_eq!(s.quarantined().unwrap(), vec![id]);
    // Fetched again from a peer, it is whole again.
    s.put(&data).unwrap();
    assert_eq!(&*s.get_verified(&id).unwrap().unwrap(), &data[..]);
    assert!(s.scrub().unwrap().is_clean());
}

#[test]
fn a_verified_read_refuses_a_rotten_chunk_before_any_scrub() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let data = bytes(6, 100_000);
    let s = open(&dir).unwrap();
    let id = s.put(&data).unwrap();
    s.flush().unwrap();
    assert_eq!(rot(&dir, &data[50_000..50_064]), 1);
    assert!(matches!(
        s.get_verified(&id),
        Err(StoreError::Corrupt { what: "chunk", .. })
    ));
    assert!(s.get_verified(&id).unwrap().is_none());
}

#[test]
fn rot_in_one_chunk_leaves_the_rest_of_the_store_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let victim = bytes(77, 256 << 10);
    let (v, victim_id) = {
        let s = open(&dir).unwrap();
        // The victim is written first, so a recovery that stopped at the
        // first bad record would lose everything after it.
        let victim_id = s.put(&victim).unwrap();
        s.flush().unwrap();
        let v = put_version(&s, 3, 1, 1 << 20, 256 << 10, vec![], vec![]);
        s.set_ref("head", v.id()).unwrap();
        s.flush().unwrap();
        (v.id(), victim_id)
    };
    assert_eq!(rot(&dir, &victim[200_000..200_064]), 1);
    let s = open(&dir).unwrap();
    let report = s.scrub().unwrap();
    assert_eq!(report.corrupt_chunks, vec![victim_id]);
    assert!(report.lost_chunks.is_empty());
    assert!(report.incomplete_refs.is_empty());
    assert_eq!(s.get_ref("head").unwrap(), Some(v));
    assert!(version_complete(&s, &v));
}

/// Flips 64 bytes of `file` under the store's database at `at`.
fn damage(dir: &Path, file: &str, at: usize) {
    let path = dir.join("meta").join(file);
    let mut bytes = fs::read(&path).unwrap();
    let end = (at + 64).min(bytes.len());
    assert!(at < end, "{file} has only {} bytes", bytes.len());
    for b in &mut bytes[at..end] {
        *b ^= 0x5a;
    }
    fs::write(&path, bytes).unwrap();
}

/// A store with a version, a delta and 200 loose chunks, flushed.
fn filled(dir: &Path) -> (ContentId, Vec<ContentId>) {
    let s = open(dir).unwrap();
    let d = put_delta(&s, 1, 1);
    let v = put_version(&s, 2, 1, 60_000, 16 << 10, vec![], vec![d.id()]);
    s.set_ref("m/r/head", v.id()).unwrap();
    let loose = (0..200u32)
        .map(|k| s.put(&k.to_le_bytes().repeat(100)).unwrap())
        .collect();
    s.flush().unwrap();
    (v.id(), loose)
}

#[test]
fn a_database_that_lost_flushed_records_is_refused_and_repair_rebuilds_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let (_, loose) = filled(&dir);
    // Damage at the start of sled's log: sled itself opens it, silently
    // without the records after the damage (refs, manifests, the index).
    damage(&dir, "db", 0);
    let Err(err) = open(&dir) else {
        panic!("a damaged database was opened")
    };
    assert!(matches!(err, StoreError::DamagedDatabase { .. }), "{err:?}");
    assert!(err.to_string().contains("repair"), "{err}");

    let (s, report) = SledStore::repair(&dir).unwrap();
    // Every chunk file whose bytes match its name is indexed again and
    // served; what lived only in the database (refs, manifests) is gone.
    assert!(report.index_repairs >= loose.len() as u64, "{report:?}");
    assert!(report.corrupt_chunks.is_empty(), "{report:?}");
    for id in &loose {
        assert!(s.get_verified(id).unwrap().is_some(), "{id} lost");
    }
    assert_eq!(s.get_ref("m/r/head").unwrap(), None);
    // The damaged database is kept aside, not deleted.
    let aside: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("meta.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    // The repaired store opens again, and keeps what is written to it.
    let fresh = s.put(b"after the repair").unwrap();
    s.flush().unwrap();
    drop(s);
    let s = open(&dir).unwrap();
    assert!(s.get_verified(&fresh).unwrap().is_some());
    assert!(s.scrub().unwrap().is_clean());
}

#[test]
fn a_database_sled_cannot_read_is_reported_damaged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    filled(&dir);
    damage(&dir, "conf", 0);
    let Err(err) = open(&dir) else {
        panic!("a damaged database was opened")
    };
    assert!(matches!(err, StoreError::DamagedDatabase { .. }), "{err:?}");
    let (s, report) = SledStore::repair(&dir).unwrap();
    assert!(report.index_repairs >= 200, "{report:?}");
    assert!(s.scrub().unwrap().is_clean());
}

#[test]
fn repair_refuses_a_directory_that_is_not_a_store() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("notes.txt"), "mine").unwrap();
    let err = SledStore::repair(tmp.path()).err().unwrap();
    assert!(err.to_string().contains("TAPESTRY_STORE"), "{err}");
    assert!(tmp.path().join("notes.txt").exists());
}

/// Bytes of every pack file of the store in `dir`.
fn pack_bytes(dir: &Path) -> u64 {
    files_under(&dir.join("packs"))
        .iter()
        .map(|f| fs::metadata(f).unwrap().len())
        .sum()
}

#[test]
fn a_collection_gives_back_the_space_of_what_it_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let s = open(&dir).unwrap();
    // Garbage on both sides of a live version, in one pack.
    let before: Vec<ContentId> = (200..224)
        .map(|i| s.put(&bytes(i, 256 << 10)).unwrap())
        .collect();
    let v = put_version(&s, 9, 1, 4 << 20, 256 << 10, vec![], vec![]);
    s.set_ref("head", v.id()).unwrap();
    let after: Vec<ContentId> = (100..124)
        .map(|i| s.put(&bytes(i, 256 << 10)).unwrap())
        .collect();
    s.flush().unwrap();
    let full = pack_bytes(&dir);
    assert!(full >= 16 << 20, "{full}");
    // The first collection keeps what was written since none had run.
    assert_eq!(s.gc().unwrap().chunks_deleted, 0);
    let report = s.gc().unwrap();
    assert_eq!(report.chunks_deleted, 48, "{report:?}");
    assert_eq!(report.bytes_compacted, 4 << 20, "{report:?}");
    let left = pack_bytes(&dir);
    assert!(
        left <= (4 << 20) + 16 * 48,
        "{left} bytes of packs left for 4 MiB live (from {full})"
    );
    for id in before.iter().chain(&after) {
        assert!(!s.has(id).unwrap());
    }
    assert!(version_complete(&s, &v.id()));
    assert!(s.scrub().unwrap().is_clean());
    // Nothing to give back: nothing rewritten.
    assert_eq!(s.gc().unwrap().bytes_compacted, 0);
    drop(s);
    let s = open(&dir).unwrap();
    assert!(version_complete(&s, &v.id()));
    assert!(s.scrub().unwrap().is_clean());
}

#[test]
fn a_pack_deleted_from_under_the_store_is_noticed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let s = open(&dir).unwrap();
    let data = bytes(3, 100_000);
    let id = s.put(&data).unwrap();
    s.flush().unwrap();
    for f in files_under(&dir.join("packs")) {
        fs::remove_file(f).unwrap();
    }
    assert!(s.has(&id).unwrap(), "the index still names it");
    assert!(!s.has_bytes(&id).unwrap());
    // Stored again (fetched from a peer), it is whole, in a new pack.
    s.put(&data).unwrap();
    assert!(s.has_bytes(&id).unwrap());
    s.flush().unwrap();
    drop(s);
    let s = open(&dir).unwrap();
    assert_eq!(&*s.get_verified(&id).unwrap().unwrap(), &data[..]);
    assert!(s.scrub().unwrap().is_clean());
}

#[test]
fn packs_that_died_whole_go_without_copying_and_the_rest_stay_within_the_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    // Four records of 256 KiB to a pack.
    let cfg = SledConfig {
        pack_bytes: 4 * ((256 << 10) + 48),
        ..SledConfig::default()
    };
    let s = SledStore::open(&dir, &cfg).unwrap();
    // Eight versions of 1 MiB, each in a pack of its own, the head moving.
    let mut v = put_version(&s, 500, 0, 1 << 20, 256 << 10, vec![], vec![]);
    s.set_ref("head", v.id()).unwrap();
    for round in 1..8 {
        v = put_version(&s, 500 + round, round, 1 << 20, 256 << 10, vec![], vec![]);
        s.set_ref("head", v.id()).unwrap();
    }
    s.gc().unwrap();
    let report = s.gc().unwrap();
    assert_eq!(report.chunks_deleted, 28, "{report:?}");
    // Nothing to copy: the old versions' packs held nothing else.
    assert_eq!(report.bytes_compacted, 0, "{report:?}");
    assert_eq!(pack_bytes(&dir), (1 << 20) + 4 * 48);
    assert!(version_complete(&s, &v.id()));

    // Loose chunks in between: every other one is garbage, in every pack.
    let mut kept = Vec::new();
    for i in 0..48u64 {
        let id = s.put(&bytes(900 + i, 64 << 10)).unwrap();
        if i % 2 == 0 {
            s.pin(id).unwrap();
            kept.push(id);
        }
    }
    s.gc().unwrap();
    let report = s.gc().unwrap();
    assert_eq!(report.chunks_deleted, 24, "{report:?}");
    assert!(report.bytes_compacted > 0, "{report:?}");
    let live = (1 << 20) + 24 * (64 << 10);
    let packs = pack_bytes(&dir);
    assert!(
        packs * 4 <= live * 5 + 28 * 48 * 5,
        "{packs} bytes of packs for {live} live"
    );
    for id in &kept {
        assert!(s.get_verified(id).unwrap().is_some());
    }
    assert!(version_complete(&s, &v.id()));
    assert!(s.scrub().unwrap().is_clean());
}

/// A tmpfs of `mib` MiB mounted at `at` (needs root), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, mib: u64) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
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
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_store_that_ran_out_of_space_takes_writes_again_once_there_is_room() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = Tmpfs::mount(&tmp.path().join("mnt"), 8);
    let dir = mnt.0.join("store");
    let s = open(&dir).unwrap();
    let kept = put_version(&s, 1, 1, 100_000, 64 << 10, vec![], vec![]).id();
    s.set_ref("m/r/head", kept).unwrap();
    s.flush().unwrap();

    // Fill the file system to the last byte, then write until the
    // database's log finds no room.
    let filler = mnt.0.join("filler");
    {
        use std::io::Write;
        let mut f = fs::File::create(&filler).unwrap();
        let block = vec![0x5au8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        while f.write_all(&[0u8; 512]).is_ok() {}
    }
    // (Other writes fail first: the flush count's file, and sled fills
    // what is left of its log's segment before it needs another.)
    let mut failed = None;
    for i in 0..100_000u32 {
        let step = s
            .set_ref(&format!("m/r/{}", i % 64), kept)
            .and_then(|()| s.flush());
        match step {
            Err(StoreError::Io { context, source }) if context == "the store's database" => {
                failed = Some(source);
                break;
            }
            Err(e) => assert!(e.is_out_of_space(), "{e}"),
            Ok(()) => {}
        }
    }
    let failed = failed.expect("the database took 100,000 writes on a full file system");
    assert_eq!(failed.kind(), std::io::ErrorKind::StorageFull, "{failed}");
    assert!(s.probe_room().unwrap_err().is_out_of_space());

    // Room again: sled still refuses every write (it keeps its first
    // error); the probe opens the database again, and writes go on.
    fs::remove_file(&filler).unwrap();
    assert!(
        s.set_ref("m/r/again", kept)
            .and_then(|()| s.flush())
            .is_err(),
        "sled took a write after a failed one: this test no longer tests a reopen"
    );
    s.probe_room().unwrap();
    let new = put_version(&s, 2, 2, 100_000, 64 << 10, vec![kept], vec![]).id();
    s.set_ref("m/r/head", new).unwrap();
    s.flush().unwrap();
    drop(s);

    let s = open(&dir).unwrap();
    assert_eq!(s.get_ref("m/r/head").unwrap(), Some(new));
    assert!(version_complete(&s, &kept));
    assert!(version_complete(&s, &new));
    assert!(s.scrub().unwrap().is_clean());
}
