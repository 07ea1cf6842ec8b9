//! The on-disk backend, the default: sled for everything small, files for
//! chunk bytes, under a node's data directory.
//!
//! ```text
//! DIR/TAPESTRY_STORE     marker: "tapestry chunk store\nformat 1\n"
//! DIR/meta/              sled database: chunk index, manifests, refs, pins, quarantine
//! DIR/chunks/abcd…       one file per chunk, named by its id (one directory, so a
//!                        flush syncs one directory entry list, not one per shard)
//! DIR/chunks/tmp/        writes in progress (emptied on open)
//! ```
//!
//! Why chunk bytes are not values in sled: sled 0.34 keeps values above
//! ~128 KiB in "blob" files of its own and, when it consolidates a tree leaf
//! (up to 16 entries), writes the whole leaf again as a new blob. Measured on
//! 1 GiB of 256 KiB chunks: 2.5× the bytes written, 2.4× the bytes on disk,
//! and 5.7× the live bytes after deleting half (see BENCHMARKS.md). It never
//! fsyncs those blob files, and it recovers its log only up to the first
//! record that fails its checksum, so one flipped byte in an old chunk made it
//! silently drop every later write — refs included. As plain files, a chunk
//! costs its own size, rot touches only that chunk (and is caught by its
//! hash), and durability is ours to order.
//!
//! Order of writes, so a crash leaves only harmless states: a chunk file is
//! written under `tmp/` and renamed into place before its index entry is
//! written to sled; `flush` fsyncs new chunk files and their directories
//! before sled's log; before a ref moves, the chunk files are fsynced, so a
//! ref that survived a crash names chunks that survived too (sled recovers
//! its log as a prefix, so their index entries survived as well). Index
//! entries are deleted before the files. The worst cases: a file without an
//! index entry (scrub re-indexes it, GC then collects it), or after a power
//! cut, an index entry for a chunk written but never flushed (scrub reports
//! it lost or corrupt; no ref or pin needs it).

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tapestry_protocol::ContentId;

use crate::backend::{Backend, GcGate, KvOp, KvVisitor};
use crate::bytes::Bytes;
use crate::error::StoreError;
use crate::store::{CHUNK, ChunkStore, ScrubReport};

const MARKER_FILE: &str = "TAPESTRY_STORE";
/// How many flushes the database has made durable, as the database says
/// (a key of its own) and as a file beside it says (written after each
/// flush returns). sled recovers its log up to the first record that fails
/// its checksum and drops the rest without a word; a database that
/// remembers fewer flushes than the file has lost records it had made
/// durable, and is reported damaged instead of being used.
const GENERATION_KEY: &[u8] = b"g/flushes";
const FLUSHED_FILE: &str = "FLUSHED";
const MARKER: &str = "tapestry chunk store\nformat 1\n";

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
}

impl Default for SledConfig {
    fn default() -> Self {
        Self {
            cache_capacity: 16 << 20,
            flush_every_ms: Some(500),
            create: true,
        }
    }
}

/// Chunk files written since the last fsync, and the directories to sync.
#[derive(Debug, Default)]
struct Unsynced {
    files: Vec<PathBuf>,
    dirs: HashSet<PathBuf>,
}

/// The default chunk store: sled for metadata, one file per chunk, on disk.
/// One process at a time: a second open of the same directory fails with
/// [`StoreError::Locked`].
#[derive(Debug)]
pub struct SledStore {
    meta: sled::Db,
    dir: PathBuf,
    chunks: PathBuf,
    gate: GcGate,
    unsynced: Mutex<Unsynced>,
    tmp_counter: AtomicU64,
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
        match fs::read_to_string(&marker) {
            Ok(text) if text == MARKER => {}
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
        let chunks = dir.join("chunks");
        let tmp = chunks.join("tmp");
        // Half-written chunks of a crashed writer.
        if tmp.exists() {
            fs::remove_dir_all(&tmp)
                .map_err(|e| StoreError::io(format!("emptying {}", tmp.display()), e))?;
        }
        fs::create_dir_all(&tmp)
            .map_err(|e| StoreError::io(format!("creating {}", tmp.display()), e))?;
        Ok(Self {
            meta,
            dir: dir.to_owned(),
            chunks,
            gate: GcGate::default(),
            unsynced: Mutex::default(),
            tmp_counter: AtomicU64::new(0),
            generation: AtomicU64::new(generation),
        })
    }

    /// Rebuilds the metadata database of the store in `dir` from its chunk
    /// files, for a store whose database cannot be opened
    /// ([`StoreError::DamagedDatabase`]). The damaged database is moved
    /// aside (to `meta.damaged-<unix seconds>`, for inspection; nothing is
    /// deleted), a new one is made, and a scrub re-indexes every chunk file
    /// whose bytes match its name (the rest are quarantined). Manifests,
    /// refs and pins lived in the database: they are gone, and the store
    /// holds chunks only — a node then starts from its genesis and fetches
    /// from its peers what it needs (the chunks it still holds are not
    /// fetched again).
    pub fn repair(dir: &Path) -> Result<(Self, ScrubReport), StoreError> {
        let marker = dir.join(MARKER_FILE);
        match fs::read_to_string(&marker) {
            Ok(text) if text == MARKER => {}
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
        let report = store.scrub()?;
        store.flush()?;
        Ok((store, report))
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn chunk_path(&self, key: &[u8]) -> Option<PathBuf> {
        let id = <[u8; 32]>::try_from(key.get(1..)?)
            .ok()
            .map(ContentId::from_bytes)?;
        Some(self.chunks.join(id.to_hex()))
    }

    fn unsynced(&self) -> std::sync::MutexGuard<'_, Unsynced> {
        self.unsynced.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_chunk(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let io = |e| StoreError::io(format!("writing chunk {}", path.display()), e);
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .chunks
            .join("tmp")
            .join(format!("{}.{n}", std::process::id()));
        let written = fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(bytes))
            .and_then(|()| fs::rename(&tmp, path));
        if let Err(e) = written {
            // A half-written chunk (a full disk) must not hold on to space.
            let _ = fs::remove_file(&tmp);
            return Err(io(e));
        }
        let mut unsynced = self.unsynced();
        unsynced.files.push(path.to_owned());
        unsynced.dirs.insert(self.chunks.clone());
        Ok(())
    }

    /// Fsyncs chunk files written since the last call, then their directories.
    fn sync_chunks(&self) -> Result<(), StoreError> {
        let Unsynced { files, dirs } = std::mem::take(&mut *self.unsynced());
        let result = (|| {
            // Many files: one syncfs of the chunks' file system instead of
            // an fsync (and, on journalling file systems, a journal commit)
            // each; a fetched payload of 1 GiB is 4,096 files.
            if files.len() >= SYNCFS_FROM && syncfs(&self.chunks).is_ok() {
                return Ok(());
            }
            for f in &files {
                match fs::File::open(f).and_then(|f| f.sync_all()) {
                    Ok(()) => {}
                    // Collected meanwhile: nothing to make durable.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(StoreError::io(format!("syncing {}", f.display()), e)),
                }
            }
            for d in &dirs {
                fs::File::open(d)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| StoreError::io(format!("syncing {}", d.display()), e))?;
            }
            Ok(())
        })();
        if result.is_err() {
            // Try again at the next flush.
            let mut u = self.unsynced();
            u.files.extend(files);
            u.dirs.extend(dirs);
        }
        result
    }
}

/// Unsynced chunk files from which a flush syncs their whole file system
/// at once (Linux) instead of each file.
const SYNCFS_FROM: usize = 32;

/// Makes everything written to the file system holding `dir` durable
/// (`syncfs(2)`); an error where there is no such call.
#[cfg(target_os = "linux")]
fn syncfs(dir: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = fs::File::open(dir)?;
    // SAFETY: the descriptor is open for the whole call (`d` lives to the
    // end of this function); syncfs reads nothing else of ours.
    #[allow(unsafe_code)]
    let r = unsafe { libc::syncfs(d.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn syncfs(_: &Path) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "no syncfs here"))
}

/// The flush count the database holds.
fn read_generation(meta: &sled::Db) -> Result<u64, StoreError> {
    Ok(meta
        .get(GENERATION_KEY)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_le_bytes))
}

/// Opens (or creates) the metadata database. sled's lock on it is the
/// store's lock. A database sled cannot read — an error, or a panic on
/// bytes it did not expect — is reported as damaged.
fn open_meta(dir: &Path, config: &SledConfig) -> Result<sled::Db, StoreError> {
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

fn sorted_dir(path: &Path) -> io::Result<Vec<fs::DirEntry>> {
    let mut entries = fs::read_dir(path)?.collect::<io::Result<Vec<_>>>()?;
    entries.sort_by_key(fs::DirEntry::file_name);
    Ok(entries)
}

impl Backend for SledStore {
    fn kv_get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        if key.first() != Some(&CHUNK) {
            return Ok(self.meta.get(key)?.map(Bytes::from_sled));
        }
        let Some(path) = self.chunk_path(key) else {
            return Ok(None);
        };
        match fs::read(&path) {
            Ok(v) => Ok(Some(Bytes::from_vec(v))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io(
                format!("reading chunk {}", path.display()),
                e,
            )),
        }
    }

    fn kv_contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        if key.first() != Some(&CHUNK) {
            return Ok(self.meta.contains_key(key)?);
        }
        Ok(self.chunk_path(key).is_some_and(|p| p.exists()))
    }

    fn kv_apply(&self, batch: Vec<KvOp<'_>>) -> Result<(), StoreError> {
        // Chunk files first, then the metadata batch, then chunk deletions.
        let mut meta = sled::Batch::default();
        let mut metas = 0;
        let mut deletions = Vec::new();
        for op in batch {
            match op {
                KvOp::Put(k, v) if k.first() == Some(&CHUNK) => {
                    if let Some(path) = self.chunk_path(&k) {
                        self.write_chunk(&path, v)?;
                    }
                }
                KvOp::Delete(k) if k.first() == Some(&CHUNK) => {
                    deletions.extend(self.chunk_path(&k))
                }
                KvOp::Put(k, v) => {
                    meta.insert(k, v);
                    metas += 1;
                }
                KvOp::Delete(k) => {
                    meta.remove(k);
                    metas += 1;
                }
            }
        }
        if metas > 0 {
            self.meta.apply_batch(meta)?;
        }
        for path in deletions {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io(format!("deleting {}", path.display()), e)),
            }
        }
        Ok(())
    }

    fn kv_for_each(&self, prefix: u8, f: &mut KvVisitor<'_>) -> Result<(), StoreError> {
        if prefix != CHUNK {
            for item in self.meta.scan_prefix([prefix]) {
                let (k, v) = item?;
                f(&k, &v)?;
            }
            return Ok(());
        }
        let io = |e| StoreError::io(format!("listing {}", self.chunks.display()), e);
        for entry in sorted_dir(&self.chunks).map_err(io)? {
            // Chunk files are named by their id; tmp/ and anything foreign is skipped.
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<ContentId>().ok())
            else {
                continue;
            };
            let mut key = vec![CHUNK];
            key.extend_from_slice(id.as_bytes());
            // One chunk in memory at a time.
            match fs::read(entry.path()) {
                Ok(bytes) => f(&key, &bytes)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(StoreError::io(
                        format!("reading {}", entry.path().display()),
                        e,
                    ));
                }
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
        Ok(self.meta.compare_and_swap(key, old, new)?.is_ok())
    }

    fn kv_flush(&self) -> Result<(), StoreError> {
        let n = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.meta.insert(GENERATION_KEY, &n.to_le_bytes())?;
        self.sync_chunks()?;
        self.meta.flush()?;
        // After the flush returned: the file never says more than the
        // database holds. Not synced (a lost update only weakens the check).
        let tmp = self.dir.join(format!("{FLUSHED_FILE}.tmp"));
        fs::write(&tmp, format!("{n}\n"))
            .and_then(|()| fs::rename(&tmp, self.dir.join(FLUSHED_FILE)))
            .map_err(|e| StoreError::io(format!("recording the flush in {}", tmp.display()), e))
    }

    fn kv_chunk_barrier(&self) -> Result<(), StoreError> {
        self.sync_chunks()
    }

    fn kv_size(&self) -> Result<u64, StoreError> {
        du(&self.dir).map_err(|e| StoreError::io(format!("measuring {}", self.dir.display()), e))
    }

    fn gc_gate(&self) -> &GcGate {
        &self.gate
    }
}
