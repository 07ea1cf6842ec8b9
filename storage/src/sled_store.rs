//! The sled backend: the default store, on disk under a node's data directory.
//!
//! Layout of the directory:
//!
//! ```text
//! DIR/TAPESTRY_STORE   marker: "tapestry chunk store\nformat 1\n"
//! DIR/chunks/          sled database of chunk bytes (id -> bytes)
//! DIR/meta/            sled database of everything else: chunk index,
//!                      manifests, refs, pins, quarantine
//! ```
//!
//! Why two databases: sled recovers its log only up to the first record that
//! fails its checksum, because it cannot tell rot from a torn write, and a
//! record can hold up to 16 entries (values above ~128 KiB live in files under
//! `blobs/`). One flipped byte in an old chunk would then silently take every
//! later write with it — refs and manifests included. With chunk bytes in a
//! database of their own, rot can only lose chunks, which scrub reports (the
//! index still names them) and peers can serve again; refs, manifests and
//! pins are untouched.
//!
//! Order of writes across the two, so that a crash leaves only harmless
//! states: chunk bytes before their index entry; index entry before deleting
//! chunk bytes; and before a ref is moved, the chunk database is flushed, so a
//! ref that survived a crash names a version whose chunks survived too (the
//! meta log is recovered as a prefix, so the index entries written before the
//! ref survived as well). The worst case is bytes without an index entry,
//! which scrub re-indexes and GC then collects.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::bytes::Bytes;
use crate::error::StoreError;
use crate::store::{CHUNK, ChunkStore, GcGate, KvOp, KvVisitor};

const MARKER_FILE: &str = "TAPESTRY_STORE";
const MARKER: &str = "tapestry chunk store\nformat 1\n";

/// Settings of the sled backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SledConfig {
    /// Bytes of sled's page cache, shared equally by the chunk and meta
    /// databases. Default 64 MiB (sled's own default is
    /// 1 GiB, too much to take from a machine that also trains). Chunks not
    /// in the cache are read from disk (and usually the OS page cache).
    pub cache_capacity: u64,
    /// How often sled flushes in the background, in milliseconds (`None`:
    /// only on [`ChunkStore::flush`]). Default 500. Only an explicit flush
    /// promises durability.
    pub flush_every_ms: Option<u64>,
    /// Create the store if the directory does not exist or is empty.
    /// Default true.
    pub create: bool,
}

impl Default for SledConfig {
    fn default() -> Self {
        Self {
            cache_capacity: 64 << 20,
            flush_every_ms: Some(500),
            create: true,
        }
    }
}

/// A chunk store in a sled database on disk. One process at a time: a
/// second open of the same directory fails with [`StoreError::Locked`].
#[derive(Debug)]
pub struct SledStore {
    chunks: sled::Db,
    meta: sled::Db,
    dir: PathBuf,
    gate: GcGate,
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
        let chunks = open_db(&dir.join("chunks"), config, dir)?;
        let meta = open_db(&dir.join("meta"), config, dir)?;
        Ok(Self {
            chunks,
            meta,
            dir: dir.to_owned(),
            gate: GcGate::default(),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn open_db(path: &Path, config: &SledConfig, store: &Path) -> Result<sled::Db, StoreError> {
    sled::Config::new()
        .path(path)
        .cache_capacity(config.cache_capacity / 2)
        .flush_every_ms(config.flush_every_ms)
        .open()
        .map_err(|e| match e {
            sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
                StoreError::Locked(store.to_owned())
            }
            sled::Error::Io(io) => {
                StoreError::io(format!("opening the database in {}", path.display()), io)
            }
            other => StoreError::Backend(format!("opening {}: {other}", path.display())),
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

fn du(path: &Path) -> io::Result<u64> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for entry in fs::read_dir(path)? {
        total += du(&entry?.path())?;
    }
    Ok(total)
}

impl SledStore {
    fn tree(&self, key: &[u8]) -> &sled::Db {
        if key.first() == Some(&CHUNK) {
            &self.chunks
        } else {
            &self.meta
        }
    }
}

impl ChunkStore for SledStore {
    fn kv_get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        Ok(self.tree(key).get(key)?.map(Bytes::from_sled))
    }

    fn kv_contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.tree(key).contains_key(key)?)
    }

    fn kv_apply(&self, batch: Vec<KvOp<'_>>) -> Result<(), StoreError> {
        // Chunk puts, then the meta batch, then chunk deletes (module docs).
        let mut chunk_puts = sled::Batch::default();
        let mut meta = sled::Batch::default();
        let mut chunk_deletes = sled::Batch::default();
        let (mut puts, mut metas, mut deletes) = (0, 0, 0);
        for op in batch {
            match op {
                KvOp::Put(k, v) if k.first() == Some(&CHUNK) => {
                    chunk_puts.insert(k, v);
                    puts += 1;
                }
                KvOp::Delete(k) if k.first() == Some(&CHUNK) => {
                    chunk_deletes.remove(k);
                    deletes += 1;
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
        if puts > 0 {
            self.chunks.apply_batch(chunk_puts)?;
        }
        if metas > 0 {
            self.meta.apply_batch(meta)?;
        }
        if deletes > 0 {
            self.chunks.apply_batch(chunk_deletes)?;
        }
        Ok(())
    }

    fn kv_for_each(&self, prefix: u8, f: &mut KvVisitor<'_>) -> Result<(), StoreError> {
        for item in self.tree(&[prefix]).scan_prefix([prefix]) {
            let (k, v) = item?;
            f(&k, &v)?;
        }
        Ok(())
    }

    fn kv_compare_and_swap(
        &self,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        Ok(self.tree(key).compare_and_swap(key, old, new)?.is_ok())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.chunks.flush()?;
        self.meta.flush()?;
        Ok(())
    }

    fn kv_chunk_barrier(&self) -> Result<(), StoreError> {
        self.chunks.flush()?;
        Ok(())
    }

    fn disk_bytes(&self) -> Result<u64, StoreError> {
        du(&self.dir).map_err(|e| StoreError::io(format!("measuring {}", self.dir.display()), e))
    }

    fn gate(&self) -> &GcGate {
        &self.gate
    }
}
