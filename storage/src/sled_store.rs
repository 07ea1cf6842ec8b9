//! The sled backend: the default store, on disk under a node's data directory.
//!
//! Layout of the directory:
//!
//! ```text
//! DIR/TAPESTRY_STORE   marker: "tapestry chunk store\nformat 1\n"
//! DIR/sled/            the sled database (log, snapshots, blobs/)
//! ```
//!
//! sled keeps values above about 128 KiB (a quarter of its 512 KiB segment)
//! in files of their own under `sled/blobs/`, so 256 KiB chunks cost about
//! their own size on disk and deleting one frees its file.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::bytes::Bytes;
use crate::error::StoreError;
use crate::store::{ChunkStore, GcGate, KvOp, KvVisitor};

const MARKER_FILE: &str = "TAPESTRY_STORE";
const MARKER: &str = "tapestry chunk store\nformat 1\n";

/// Settings of the sled backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SledConfig {
    /// Bytes of sled's page cache. Default 64 MiB (sled's own default is
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
    db: sled::Db,
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
        let db = sled::Config::new()
            .path(dir.join("sled"))
            .cache_capacity(config.cache_capacity)
            .flush_every_ms(config.flush_every_ms)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
                    StoreError::Locked(dir.to_owned())
                }
                sled::Error::Io(io) => {
                    StoreError::io(format!("opening the database in {}", dir.display()), io)
                }
                other => StoreError::Backend(format!("opening {}: {other}", dir.display())),
            })?;
        Ok(Self {
            db,
            dir: dir.to_owned(),
            gate: GcGate::default(),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
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

impl ChunkStore for SledStore {
    fn kv_get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        Ok(self.db.get(key)?.map(Bytes::from_sled))
    }

    fn kv_contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.db.contains_key(key)?)
    }

    fn kv_apply(&self, batch: Vec<KvOp<'_>>) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        for op in batch {
            match op {
                KvOp::Put(k, v) => b.insert(k, v),
                KvOp::Delete(k) => b.remove(k),
            }
        }
        Ok(self.db.apply_batch(b)?)
    }

    fn kv_for_each(&self, prefix: u8, f: &mut KvVisitor<'_>) -> Result<(), StoreError> {
        for item in self.db.scan_prefix([prefix]) {
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
        Ok(self.db.compare_and_swap(key, old, new)?.is_ok())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn disk_bytes(&self) -> Result<u64, StoreError> {
        du(&self.dir).map_err(|e| StoreError::io(format!("measuring {}", self.dir.display()), e))
    }

    fn gate(&self) -> &GcGate {
        &self.gate
    }
}
