//! The on-disk backend, the default: sled for everything small, pack files
//! for chunk bytes, under a node's data directory.
//!
//! ```text
//! DIR/TAPESTRY_STORE     marker: "tapestry chunk store\nformat 2\n"
//! DIR/meta/              sled database: chunk index and locations, manifests, refs,
//!                        pins, quarantine
//! DIR/packs/….pack       chunk bytes, appended as records to files of ~64 MiB
//!                        (see the packs module)
//! ```
//!
//! Why chunk bytes are not values in sled: sled 0.34 keeps values above
//! ~128 KiB in "blob" files of its own and, when it consolidates a tree leaf
//! (up to 16 entries), writes the whole leaf again as a new blob. Measured on
//! 1 GiB of 256 KiB chunks: 2.5× the bytes written, 2.4× the bytes on disk,
//! and 5.7× the live bytes after deleting half (see BENCHMARKS.md). It never
//! fsyncs those blob files, and it recovers its log only up to the first
//! record that fails its checksum, so one flipped byte in an old chunk made it
//! silently drop every later write — refs included. In packs, a chunk costs
//! its own size and a 48-byte header, rot touches only that chunk (and is
//! caught by its hash), and durability is ours to order.
//!
//! Why packs and not one file per chunk (format 1, before): creating,
//! writing and renaming a file per 256 KiB chunk held the store to about
//! 300 MB/s, slower than the network brings chunks in (BENCHMARKS.md, chunk
//! transfer). A record in a pack is one `pwrite` of its header and one of
//! its bytes; a flush is one `fdatasync` per pack written to. A store of
//! format 1 is moved into packs when it is first opened.
//!
//! A chunk's key in the database holds its [`Location`] (pack, offset,
//! length), written in the same atomic batch as its index entry, after its
//! record was written to the pack. Deleting a chunk deletes those two
//! entries; its record stays until the pack is compacted: after a garbage
//! collection, a pack with nothing live is deleted outright, and the
//! sparsest packs are rewritten (their live records appended to the active
//! pack, their locations moved by compare-and-swap) and deleted until the
//! packs take at most 1.25× the live records.
//!
//! Order of writes, so a crash leaves only harmless states: a record is
//! written to its pack before its location is written to sled; `flush`
//! fdatasyncs the packs written to (and their directory, if packs came or
//! went) before sled's log; before a ref moves, the packs are synced, so a
//! ref that survived a crash names chunks that survived too (sled recovers
//! its log as a prefix, so their locations survived as well). Compaction
//! syncs the moved records and flushes sled before it deletes a pack. The
//! worst cases: a record without a location (dead bytes, taken back by
//! compaction), or after a power cut, a location of a record written but
//! never flushed (scrub reports it lost or corrupt; no ref or pin needs it).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{MappedRwLockReadGuard, RwLock, RwLockReadGuard};

use tapestry_protocol::ContentId;

use crate::backend::{Backend, GcGate, KvOp, KvVisitor};
use crate::bytes::Bytes;
use crate::error::StoreError;
use crate::packs::{Location, Packs};
use crate::store::{CHUNK, ChunkStore, ScrubReport, id_from_key};

const MARKER_FILE: &str = "TAPESTRY_STORE";
/// How many flushes the database has made durable, as the database says
/// (a key of its own) and as a file beside it says (written after each
/// flush returns). sled recovers its log up to the first record that fails
/// its checksum and drops the rest without a word; a database that
/// remembers fewer flushes than the file has lost records it had made
/// durable, and is reported damaged instead of being used.
const GENERATION_KEY: &[u8] = b"g/flushes";
const FLUSHED_FILE: &str = "FLUSHED";
/// The file [`Backend::kv_probe_room`] writes (and removes) to find out
/// whether the file system has room, and its size: a chunk's.
const ROOM_PROBE_FILE: &str = "ROOM_PROBE";
const ROOM_PROBE_BYTES: usize = 256 << 10;
const MARKER: &str = "tapestry chunk store\nformat 2\n";
/// Format 1: one file per chunk under `chunks/`; moved into packs on open.
const MARKER_V1: &str = "tapestry chunk store\nformat 1\n";
/// After a collection, packs are compacted (the sparsest first) until all
/// of them take at most this much (numerator, denominator) of the live
/// records they hold: space on disk stays within 1.25× the live chunks
/// with as little copied as that takes (packs that died whole, as a
/// model version's usually do, go without copying).
const COMPACT_BOUND: (u64, u64) = (5, 4);

/// Settings of the on-disk backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SledConfig {
    /// Bytes of sled's page cache for the metadata. Default 16 MiB (sled's
    /// own default is 1 GiB, far more than manifests and refs need). Chunk
    /// bytes are read through the operating system's page cache.
    pub cache_capacity: u64,
    /// How often sled flushes the metadata in the background, in
    /// milliseconds (`None`: only on [`ChunkStore::flush`]). Default 500.
    /// Only an explicit flush promises durability.
    pub flush_every_ms: Option<u64>,
    /// Create the store if the directory does not exist or is empty.
    /// Default true.
    pub create: bool,
    /// Bytes at which a pack file of chunk records is sealed and the next
    /// one begun. Default 64 MiB: few files, and a model version's chunks
    /// in packs of their own, so they usually die together.
    pub pack_bytes: u64,
}

impl Default for SledConfig {
    fn default() -> Self {
        Self {
            cache_capacity: 16 << 20,
            flush_every_ms: Some(500),
            create: true,
            pack_bytes: crate::packs::PACK_TARGET,
        }
    }
}

/// The default chunk store: sled for metadata, pack files for chunk
/// bytes, on disk. One process at a time: a second open of the same
/// directory fails with [`StoreError::Locked`].
#[derive(Debug)]
pub struct SledStore {
    /// The metadata database; `None` only between closing a database that
    /// failed a write and opening it again (see [`SledStore::reopen_meta`]).
    meta: RwLock<Option<sled::Db>>,
    /// What the database was opened with (to open it again).
    config: SledConfig,
    dir: PathBuf,
    packs: Packs,
    gate: GcGate,
    /// One compaction at a time (its own records are appended outside the
    /// gate: another one must not take their pack for dead).
    compacting: std::sync::Mutex<()>,
    /// Flushes made (see [`GENERATION_KEY`]).
    generation: AtomicU64,
}

impl SledStore {
    /// Opens (or, with `config.create`, creates) the store in `dir`.
    pub fn open(dir: &Path, config: &SledConfig) -> Result<Self, StoreError> {
        let not_a_store = |reason: &str| StoreError::NotAStore {
            path: dir.to_owned(),
            reason: reason.to_owned(),
        };
        match fs::metadata(dir) {
            Ok(m) if !m.is_dir() => return Err(not_a_store("it is not a directory")),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound && config.create => {
                fs::create_dir_all(dir)
                    .map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
            }
            Err(e) => return Err(StoreError::io(format!("opening {}", dir.display()), e)),
        }
        let marker = dir.join(MARKER_FILE);
        let mut v1 = false;
        match fs::read_to_string(&marker) {
            Ok(text) if text == MARKER => {}
            Ok(text) if text == MARKER_V1 => v1 = true,
            Ok(_) => {
                return Err(not_a_store(
                    "its TAPESTRY_STORE marker is of another format",
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let empty = fs::read_dir(dir)
                    .map_err(|e| StoreError::io(format!("reading {}", dir.display()), e))?
                    .next()
                    .is_none();
                if !empty {
                    return Err(not_a_store(
                        "the directory is not empty and has no TAPESTRY_STORE marker",
                    ));
                }
                if !config.create {
                    return Err(not_a_store("the directory is empty"));
                }
                write_marker(dir)?;
            }
            Err(e) => return Err(StoreError::io(format!("reading {}", marker.display()), e)),
        }
        let meta = open_meta(dir, config)?;
        let generation = read_generation(&meta)?;
        let flushed = fs::read_to_string(dir.join(FLUSHED_FILE))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if flushed > generation {
            return Err(StoreError::DamagedDatabase {
                path: dir.to_owned(),
                detail: format!(
                    "it lost records it had made durable: it remembers {generation} flushes of \
                     {flushed}"
                ),
            });
        }
        let packs_dir = dir.join("packs");
        let packs = Packs::open(&packs_dir, config.pack_bytes.max(1))
            .map_err(|e| StoreError::io(format!("opening {}", packs_dir.display()), e))?;
        let store = Self {
            meta: RwLock::new(Some(meta)),
            config: config.clone(),
            dir: dir.to_owned(),
            packs,
            gate: GcGate::default(),
            compacting: std::sync::Mutex::default(),
            generation: AtomicU64::new(generation),
        };
        let old_chunks = dir.join("chunks");
        if v1 {
            store.move_chunk_files_into_packs(&old_chunks)?;
        } else if old_chunks.exists() {
            // A move into packs that crashed after its marker was written.
            fs::remove_dir_all(&old_chunks)
                .map_err(|e| StoreError::io(format!("removing {}", old_chunks.display()), e))?;
        }
        Ok(store)
    }

    /// Moves a store of format 1 (one file per chunk under `chunks`) into
    /// packs: every chunk file becomes a record, its location is written
    /// beside its index entry, both are made durable, then the marker says
    /// format 2 and the old files go. A crash before the marker is written
    /// leaves a store of format 1 (whose next open moves it again; the
    /// records of the first attempt are dead bytes that compaction takes
    /// back); a crash after it, a directory of old files that the next open
    /// removes.
    fn move_chunk_files_into_packs(&self, chunks: &Path) -> Result<(), StoreError> {
        let io = |what: &str, p: &Path, e| StoreError::io(format!("{what} {}", p.display()), e);
        let entries = match fs::read_dir(chunks) {
            Ok(d) => d
                .collect::<io::Result<Vec<_>>>()
                .map_err(|e| io("listing", chunks, e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io("listing", chunks, e)),
        };
        for entry in entries {
            // Chunk files are named by their id; tmp/ and anything foreign
            // is left out.
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<ContentId>().ok())
            else {
                continue;
            };
            let bytes = fs::read(entry.path()).map_err(|e| io("reading", &entry.path(), e))?;
            let loc = self
                .packs
                .append(&id, &bytes)
                .map_err(|e| io("writing into", &self.packs.path(0), e))?;
            self.meta()?
                .insert(crate::store::key(CHUNK, id.as_bytes()), &loc.encode())?;
        }
        self.kv_flush()?;
        write_marker(&self.dir)?;
        if chunks.exists() {
            fs::remove_dir_all(chunks).map_err(|e| io("removing", chunks, e))?;
        }
        Ok(())
    }

    /// Rebuilds the metadata database of the store in `dir` from its pack
    /// files, for a store whose database cannot be opened
    /// ([`StoreError::DamagedDatabase`]). The damaged database is moved
    /// aside (to `meta.damaged-<unix seconds>`, for inspection; nothing is
    /// deleted), a new one is made, every record in the packs whose bytes
    /// match the id its header names gets its location again, and a scrub
    /// indexes them (records whose bytes do not match are reported corrupt
    /// and not served; a deleted chunk whose record was not yet compacted
    /// comes back, and the next collection takes it again). Manifests,
    /// refs and pins lived in the database: they are gone, and the store
    /// holds chunks only — a node then starts from its genesis and fetches
    /// from its peers what it needs (the chunks it still holds are not
    /// fetched again).
    pub fn repair(dir: &Path) -> Result<(Self, ScrubReport), StoreError> {
        let marker = dir.join(MARKER_FILE);
        match fs::read_to_string(&marker) {
            Ok(text) if text == MARKER || text == MARKER_V1 => {}
            Ok(_) => {
                return Err(StoreError::NotAStore {
                    path: dir.to_owned(),
                    reason: "its TAPESTRY_STORE marker is of another format".into(),
                });
            }
            Err(e) => return Err(StoreError::io(format!("reading {}", marker.display()), e)),
        }
        // The new database starts counting flushes again.
        match fs::remove_file(dir.join(FLUSHED_FILE)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(format!("removing {FLUSHED_FILE}"), e)),
        }
        let meta = dir.join("meta");
        if meta.exists() {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let aside = dir.join(format!("meta.damaged-{secs}"));
            fs::rename(&meta, &aside).map_err(|e| {
                StoreError::io(
                    format!("moving {} to {}", meta.display(), aside.display()),
                    e,
                )
            })?;
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| StoreError::io(format!("syncing {}", dir.display()), e))?;
        }
        let store = Self::open(
            dir,
            &SledConfig {
                create: false,
                ..SledConfig::default()
            },
        )?;
        // The packs name what they hold: every record whose bytes match
        // its id gets its location again; the scrub then indexes it.
        let mut corrupt = Vec::new();
        for (pack, _) in store
            .packs
            .list()
            .map_err(|e| store.packs_error("listing", e))?
        {
            let scanned = store
                .packs
                .scan(pack)
                .map_err(|e| store.packs_error("reading", e))?;
            let mut batch = sled::Batch::default();
            for (id, loc) in scanned.good {
                batch.insert(crate::store::key(CHUNK, id.as_bytes()), &loc.encode());
            }
            store.meta()?.apply_batch(batch)?;
            corrupt.extend(scanned.corrupt);
        }
        let mut report = store.scrub()?;
        // A record found corrupt whose chunk another record holds whole
        // is not lost.
        corrupt.retain(|id| !matches!(store.has(id), Ok(true)));
        corrupt.sort_unstable();
        corrupt.dedup();
        report.corrupt_chunks.extend(corrupt);
        store.flush()?;
        Ok((store, report))
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The metadata database (opened again first if it was closed by
    /// [`SledStore::reopen_meta`] and its opening failed). Taken without
    /// waiting for a reopen that is waiting itself: a caller may hold it
    /// already (a scan reading chunks).
    fn meta(&self) -> Result<MappedRwLockReadGuard<'_, sled::Db>, StoreError> {
        for _ in 0..2 {
            if let Ok(db) = RwLockReadGuard::try_map(self.meta.read_recursive(), Option::as_ref) {
                return Ok(db);
            }
            self.reopen_meta()?;
        }
        Err(StoreError::Backend(
            "the store's database was closed while it was opened again".into(),
        ))
    }

    /// Closes the metadata database and opens it again. sled keeps the
    /// first error of a failed write to its log (a full disk, say) and
    /// returns it from every later write, even once there is room again:
    /// opened again, it recovers its log as after a crash. What it had not
    /// made durable is lost, as in a crash; no flush had promised it.
    fn reopen_meta(&self) -> Result<(), StoreError> {
        let mut slot = self.meta.write();
        // The old database lets go of its lock once dropped (and sled's
        // flusher has stopped: `open_meta` waits for it).
        drop(slot.take());
        let db = open_meta(&self.dir, &self.config)?;
        self.generation
            .store(read_generation(&db)?, Ordering::SeqCst);
        *slot = Some(db);
        Ok(())
    }

    fn packs_error(&self, what: &str, e: io::Error) -> StoreError {
        StoreError::io(format!("{what} the packs in {}", self.dir.display()), e)
    }

    fn location(&self, key: &[u8]) -> Result<Option<Location>, StoreError> {
        Ok(self.meta()?.get(key)?.and_then(|v| Location::decode(&v)))
    }

    /// The bytes of the chunk under `key`; `None` if it has no location or
    /// its pack lost it. A read that races a compaction moving the chunk
    /// (its pack deleted between the two steps) looks again.
    fn read_chunk(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let mut loc = self.location(key)?;
        for _ in 0..4 {
            let Some(l) = loc else { return Ok(None) };
            if let Some(bytes) = self
                .packs
                .read(l)
                .map_err(|e| self.packs_error("reading", e))?
            {
                return Ok(Some(bytes));
            }
            let again = self.location(key)?;
            if again == loc {
                return Ok(None);
            }
            loc = again;
        }
        Ok(None)
    }

    /// Gives back the space of deleted chunks: deletes each pack with
    /// nothing live, and rewrites the sparsest packs until the rest take at
    /// most [`COMPACT_BOUND`] of their live records. Returns the bytes of
    /// chunks moved.
    fn compact(&self) -> Result<u64, StoreError> {
        // Which records are live, with no write in flight (writers hold the
        // gate shared while they append and record locations): every write
        // after this goes to a pack not looked at here.
        let _one = self.compacting.lock().unwrap_or_else(|e| e.into_inner());
        let (rewrite, remove) = {
            let _exclusive = self.gate.exclusive();
            let mut live: HashMap<u64, (u64, Vec<(sled::IVec, Location)>)> = HashMap::new();
            for item in self.meta()?.scan_prefix([CHUNK]) {
                let (k, v) = item?;
                if let Some(loc) = Location::decode(&v) {
                    let e = live.entry(loc.pack).or_default();
                    e.0 += loc.record_bytes();
                    e.1.push((k, loc));
                }
            }
            let active = self.packs.active();
            let mut remove = Vec::new();
            // (live bytes, size, pack, records) of packs with dead records.
            let mut partly = Vec::new();
            // Bytes of the packs with something live, and of those records.
            let (mut total, mut total_live) = (0u64, 0u64);
            for (pack, size) in self
                .packs
                .list()
                .map_err(|e| self.packs_error("listing", e))?
            {
                let (live_bytes, records) = live.remove(&pack).unwrap_or_default();
                if records.is_empty() {
                    remove.push(pack);
                    continue;
                }
                total += size;
                total_live += live_bytes;
                if live_bytes < size {
                    partly.push((live_bytes, size, pack, records));
                }
            }
            // The sparsest first (the least to copy for the most given
            // back), until the packs take at most COMPACT_BOUND of what is
            // live.
            partly.sort_by(|a, b| {
                (u128::from(a.0) * u128::from(b.1)).cmp(&(u128::from(b.0) * u128::from(a.1)))
            });
            let mut rewrite = Vec::new();
            for (live_bytes, size, pack, records) in partly {
                if total * COMPACT_BOUND.1 <= total_live * COMPACT_BOUND.0 {
                    break;
                }
                total -= size - live_bytes;
                rewrite.push((pack, records));
            }
            if remove
                .iter()
                .chain(rewrite.iter().map(|r| &r.0))
                .any(|p| Some(*p) == active)
            {
                self.packs.seal();
            }
            (rewrite, remove)
        };
        if rewrite.is_empty() && remove.is_empty() {
            return Ok(0);
        }
        let mut moved = 0;
        for (_, records) in &rewrite {
            for (key, loc) in records {
                let Some(id) = id_from_key(key) else { continue };
                // Bytes the pack lost stay lost (scrub reports them).
                let Some(bytes) = self
                    .packs
                    .read(*loc)
                    .map_err(|e| self.packs_error("reading", e))?
                else {
                    continue;
                };
                let new = self
                    .packs
                    .append(&id, &bytes)
                    .map_err(|e| self.packs_error("writing", e))?;
                // Deleted or written again meanwhile: the copy is dead bytes.
                let swapped = self
                    .meta()?
                    .compare_and_swap(key, Some(&loc.encode()[..]), Some(&new.encode()[..]))?
                    .is_ok();
                if swapped {
                    moved += u64::from(loc.len);
                }
            }
        }
        // The moved records and their new locations are durable before the
        // old copies go; so is every deletion that made a pack dead.
        self.packs
            .sync()
            .map_err(|e| self.packs_error("syncing", e))?;
        self.meta()?.flush()?;
        for pack in remove
            .into_iter()
            .chain(rewrite.into_iter().map(|(p, _)| p))
        {
            self.packs
                .remove(pack)
                .map_err(|e| self.packs_error("deleting", e))?;
        }
        self.packs
            .sync()
            .map_err(|e| self.packs_error("syncing", e))?;
        Ok(moved)
    }
}

/// The flush count the database holds.
fn read_generation(meta: &sled::Db) -> Result<u64, StoreError> {
    Ok(meta
        .get(GENERATION_KEY)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_le_bytes))
}

/// How long an open waits for sled's lock: a store dropped in this process
/// releases it only when sled's background flusher has stopped, a moment
/// later; a store another process holds is reported after this wait.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens (or creates) the metadata database, waiting up to [`LOCK_WAIT`]
/// for its lock ([`open_meta_once`]).
fn open_meta(dir: &Path, config: &SledConfig) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match open_meta_once(dir, config) {
            Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Opens (or creates) the metadata database. sled's lock on it is the
/// store's lock. A database sled cannot read — an error, or a panic on
/// bytes it did not expect — is reported as damaged.
fn open_meta_once(dir: &Path, config: &SledConfig) -> Result<sled::Db, StoreError> {
    let damaged = |detail: String| StoreError::DamagedDatabase {
        path: dir.to_owned(),
        detail,
    };
    let sled_config = sled::Config::new()
        .path(dir.join("meta"))
        .cache_capacity(config.cache_capacity)
        .flush_every_ms(config.flush_every_ms);
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sled_config.open()))
        .map_err(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "the storage engine panicked".into());
            damaged(what)
        })?;
    opened.map_err(|e| match e {
        sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
            StoreError::Locked(dir.to_owned())
        }
        sled::Error::Io(io) if io.kind() == io::ErrorKind::InvalidData => damaged(io.to_string()),
        sled::Error::Io(io) => {
            StoreError::io(format!("opening the database in {}", dir.display()), io)
        }
        sled::Error::Corruption { .. } | sled::Error::ReportableBug(_) => damaged(e.to_string()),
        other => StoreError::Backend(format!("opening {}: {other}", dir.display())),
    })
}

fn write_marker(dir: &Path) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{MARKER_FILE}.tmp"));
    let io = |e| StoreError::io(format!("writing the store marker in {}", dir.display()), e);
    fs::write(&tmp, MARKER).map_err(io)?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    fs::rename(&tmp, dir.join(MARKER_FILE)).map_err(io)?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

/// Bytes allocated on disk under `path` (blocks, not apparent sizes).
fn du(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(path)?;
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return Ok(own);
    }
    let mut total = own;
    for entry in fs::read_dir(path)? {
        total += du(&entry?.path())?;
    }
    Ok(total)
}

impl Backend for SledStore {
    fn kv_get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        if key.first() != Some(&CHUNK) {
            return Ok(self.meta()?.get(key)?.map(Bytes::from_sled));
        }
        Ok(self.read_chunk(key)?.map(Bytes::from_vec))
    }

    fn kv_contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        if key.first() != Some(&CHUNK) {
            return Ok(self.meta()?.contains_key(key)?);
        }
        match self.location(key)? {
            Some(loc) => self
                .packs
                .holds(loc)
                .map_err(|e| self.packs_error("reading", e)),
            None => Ok(false),
        }
    }

    fn kv_apply(&self, batch: Vec<KvOp<'_>>) -> Result<(), StoreError> {
        // Chunk records first, then one metadata batch with their locations.
        let mut meta = sled::Batch::default();
        for op in batch {
            match op {
                KvOp::Put(k, v) if k.first() == Some(&CHUNK) => {
                    let Some(id) = id_from_key(&k) else {
                        return Err(StoreError::Backend("a chunk key without an id".into()));
                    };
                    let loc = self
                        .packs
                        .append(&id, v)
                        .map_err(|e| self.packs_error("writing into", e))?;
                    meta.insert(k, &loc.encode());
                }
                KvOp::Put(k, v) => meta.insert(k, v),
                KvOp::Delete(k) => meta.remove(k),
            }
        }
        self.meta()?.apply_batch(meta)?;
        Ok(())
    }

    fn kv_for_each(&self, prefix: u8, f: &mut KvVisitor<'_>) -> Result<(), StoreError> {
        for item in self.meta()?.scan_prefix([prefix]) {
            let (k, v) = item?;
            if prefix != CHUNK {
                f(&k, &v)?;
                continue;
            }
            // One chunk in memory at a time; bytes a pack lost are skipped.
            if let Some(bytes) = self.read_chunk(&k)? {
                f(&k, &bytes)?;
            }
        }
        Ok(())
    }

    fn kv_compare_and_swap(
        &self,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        if key.first() == Some(&CHUNK) {
            return Err(StoreError::Backend(
                "compare-and-swap on chunk bytes".into(),
            ));
        }
        Ok(self.meta()?.compare_and_swap(key, old, new)?.is_ok())
    }

    fn kv_flush(&self) -> Result<(), StoreError> {
        let meta = self.meta()?;
        let n = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        meta.insert(GENERATION_KEY, &n.to_le_bytes())?;
        self.packs
            .sync()
            .map_err(|e| self.packs_error("syncing", e))?;
        meta.flush()?;
        // After the flush returned: the file never says more than the
        // database holds. Not synced (a lost update only weakens the check).
        let tmp = self.dir.join(format!("{FLUSHED_FILE}.tmp"));
        fs::write(&tmp, format!("{n}\n"))
            .and_then(|()| fs::rename(&tmp, self.dir.join(FLUSHED_FILE)))
            .map_err(|e| StoreError::io(format!("recording the flush in {}", tmp.display()), e))
    }

    /// A file written and synced beside the store tells whether the file
    /// system has room; then a flush tells whether the database can write,
    /// and if it cannot, the database is opened again (see
    /// [`SledStore::reopen_meta`]) and flushed.
    fn kv_probe_room(&self) -> Result<(), StoreError> {
        use std::io::Write;
        let probe = self.dir.join(ROOM_PROBE_FILE);
        let written = fs::File::create(&probe).and_then(|mut f| {
            f.write_all(&[0u8; ROOM_PROBE_BYTES])?;
            f.sync_all()
        });
        let _ = fs::remove_file(&probe);
        written.map_err(|e| StoreError::io(format!("writing {}", probe.display()), e))?;
        if self.kv_flush().is_ok() {
            return Ok(());
        }
        self.reopen_meta()?;
        self.kv_flush()
    }

    fn kv_chunk_barrier(&self) -> Result<(), StoreError> {
        self.packs
            .sync()
            .map_err(|e| self.packs_error("syncing", e))
    }

    fn kv_compact(&self) -> Result<u64, StoreError> {
        self.compact()
    }

    fn kv_size(&self) -> Result<u64, StoreError> {
        du(&self.dir).map_err(|e| StoreError::io(format!("measuring {}", self.dir.display()), e))
    }

    fn gc_gate(&self) -> &GcGate {
        &self.gate
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::key;

    #[test]
    fn a_store_of_one_file_per_chunk_is_moved_into_packs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let chunks: Vec<Vec<u8>> = (0..40u32)
            .map(|i| i.to_le_bytes().repeat(5_000 + i as usize))
            .collect();
        let ids: Vec<ContentId> = {
            let s = SledStore::open(&dir, &SledConfig::default()).unwrap();
            let ids = chunks.iter().map(|c| s.put(c).unwrap()).collect();
            s.flush().unwrap();
            ids
        };
        // Made into a store of format 1 as its writer left it: chunk files
        // named by their ids (and a write in progress), index entries in
        // the database, no locations, no packs.
        {
            let meta = sled::open(dir.join("meta")).unwrap();
            let old = dir.join("chunks");
            fs::create_dir_all(old.join("tmp")).unwrap();
            fs::write(old.join("tmp").join("1.0"), b"half a chunk").unwrap();
            for (id, c) in ids.iter().zip(&chunks) {
                fs::write(old.join(id.to_hex()), c).unwrap();
                meta.remove(key(CHUNK, id.as_bytes())).unwrap();
            }
            meta.flush().unwrap();
        }
        fs::remove_dir_all(dir.join("packs")).unwrap();
        fs::write(dir.join(MARKER_FILE), MARKER_V1).unwrap();

        let s = SledStore::open(&dir, &SledConfig::default()).unwrap();
        for (id, c) in ids.iter().zip(&chunks) {
            assert_eq!(&*s.get_verified(id).unwrap().unwrap(), &c[..]);
        }
        assert!(!dir.join("chunks").exists());
        assert_eq!(fs::read_to_string(dir.join(MARKER_FILE)).unwrap(), MARKER);
        let report = s.scrub().unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.chunks_checked, 40);
        drop(s);
        let s = SledStore::open(&dir, &SledConfig::default()).unwrap();
        assert_eq!(s.chunk_ids().unwrap().len(), 40);
        assert!(s.scrub().unwrap().is_clean());
    }
}
