//! Pack files: the on-disk backend's chunk bytes, appended as records to a
//! few large files instead of one file per chunk.
//!
//! ```text
//! DIR/packs/0000000000000001.pack   records, appended; never appended to again
//!                                   once sealed (full, or the process ended)
//! record = "TPCK" | length (u32 LE) | chunk id (32 bytes)
//!          | check (8 bytes: BLAKE3 of the 40 bytes before, truncated) | bytes
//! ```
//!
//! Where each chunk's bytes are ([`Location`]) is kept in the metadata
//! database, in the same atomic batch as its index entry; a pack is only a
//! log of records. The header makes a pack readable without the database
//! ([`Packs::scan`], for repair): a header whose check matches was written
//! whole, and the bytes after it are checked against the id it names.
//!
//! Writers reserve their record's place under a lock and write it outside
//! the lock (`pwrite`), so writers on several threads do not wait for each
//! other's bytes. A new process always starts a new pack: the tail of the
//! last one may have been torn by a crash. Space of deleted chunks is given
//! back by compaction (see `SledStore`), which rewrites the live records of
//! a pack that is mostly dead and then deletes it.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tapestry_protocol::ContentId;

/// Bytes of a record's header.
pub(crate) const HEADER: u64 = 48;
const MAGIC: [u8; 4] = *b"TPCK";
/// Bytes of a pack written between two starts of its write-back: once a
/// record crosses a multiple of this, the window of bytes before it is
/// handed to the kernel to write out (`sync_file_range`, not waiting), so
/// that the next flush finds little left to write.
const WRITE_BACK: u64 = 8 << 20;
/// The default size at which a pack is sealed (a record is never split: a
/// pack may end up larger by one record).
pub(crate) const PACK_TARGET: u64 = 64 << 20;
const SUFFIX: &str = ".pack";

/// Where a chunk's bytes are: the pack, the offset of the bytes (after the
/// record's header), their length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Location {
    pub pack: u64,
    pub offset: u64,
    pub len: u32,
}

impl Location {
    /// Bytes of an encoded location.
    pub const ENCODED: usize = 20;

    pub fn encode(&self) -> [u8; Self::ENCODED] {
        let mut out = [0; Self::ENCODED];
        out[..8].copy_from_slice(&self.pack.to_le_bytes());
        out[8..16].copy_from_slice(&self.offset.to_le_bytes());
        out[16..].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    pub fn decode(v: &[u8]) -> Option<Self> {
        let v: &[u8; Self::ENCODED] = v.try_into().ok()?;
        Some(Self {
            pack: u64::from_le_bytes(v[..8].try_into().ok()?),
            offset: u64::from_le_bytes(v[8..16].try_into().ok()?),
            len: u32::from_le_bytes(v[16..].try_into().ok()?),
        })
    }

    /// The end of the bytes in the pack.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }

    /// Bytes the whole record takes in its pack.
    pub fn record_bytes(&self) -> u64 {
        HEADER + u64::from(self.len)
    }
}

fn header(id: &ContentId, len: u32) -> [u8; HEADER as usize] {
    let mut h = [0; HEADER as usize];
    h[..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..40].copy_from_slice(id.as_bytes());
    let check = ContentId::of(&h[..40]);
    h[40..].copy_from_slice(&check.as_bytes()[..8]);
    h
}

/// Parses a header; `None` if it is not one written whole.
fn parse_header(h: &[u8]) -> Option<(ContentId, u32)> {
    let h: &[u8; HEADER as usize] = h.get(..HEADER as usize)?.try_into().ok()?;
    if h[..4] != MAGIC || ContentId::of(&h[..40]).as_bytes()[..8] != h[40..] {
        return None;
    }
    let len = u32::from_le_bytes(h[4..8].try_into().ok()?);
    let id = ContentId::from_bytes(h[8..40].try_into().ok()?);
    Some((id, len))
}

/// The pack being appended to.
#[derive(Debug)]
struct Active {
    pack: u64,
    file: Arc<File>,
    len: u64,
}

#[derive(Debug, Default)]
struct State {
    active: Option<Active>,
    /// The number the next new pack gets.
    next: u64,
    /// Open packs, for reading.
    handles: HashMap<u64, Arc<File>>,
    /// Packs written to since the last sync.
    dirty: HashSet<u64>,
    /// Whether packs were created or deleted since the last sync (the
    /// directory's entries must be made durable too).
    dir_dirty: bool,
}

/// The pack files of one store.
#[derive(Debug)]
pub(crate) struct Packs {
    dir: PathBuf,
    /// Bytes at which a pack is sealed.
    target: u64,
    state: Mutex<State>,
}

/// What [`Packs::scan`] found in one pack.
#[derive(Debug, Default)]
pub(crate) struct Scanned {
    /// Records whose bytes match their id.
    pub good: Vec<(ContentId, Location)>,
    /// Ids of records written whole whose bytes do not match.
    pub corrupt: Vec<ContentId>,
}

impl Packs {
    /// Opens (creating it if needed) the pack directory `dir`; packs are
    /// sealed at `target` bytes.
    pub fn open(dir: &Path, target: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let s = Self {
            dir: dir.to_owned(),
            target,
            state: Mutex::default(),
        };
        let next = s.list()?.iter().map(|(p, _)| p + 1).max().unwrap_or(1);
        s.state().next = next;
        Ok(s)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // No half-done change is left behind by a panic under this lock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The path of pack `pack`.
    pub fn path(&self, pack: u64) -> PathBuf {
        self.dir.join(format!("{pack:016x}{SUFFIX}"))
    }

    /// Every pack and its size in bytes, in order.
    pub fn list(&self) -> io::Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(pack) = name
                .to_str()
                .and_then(|n| n.strip_suffix(SUFFIX))
                .filter(|n| n.len() == 16)
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            match entry.metadata() {
                Ok(m) => out.push((pack, m.len())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Appends a record of `bytes` under `id`; where its bytes are.
    pub fn append(&self, id: &ContentId, bytes: &[u8]) -> io::Result<Location> {
        let len = u32::try_from(bytes.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "chunk over 4 GiB"))?;
        let record = HEADER + u64::from(len);
        let (pack, file, start) = {
            let mut st = self.state();
            let usable = st.active.as_ref().is_some_and(|a| {
                // A full pack is sealed; one deleted from under the store
                // would take new writes into a file that no longer exists.
                (a.len == 0 || a.len + record <= self.target) && self.path(a.pack).exists()
            });
            if !usable {
                let pack = st.next;
                let file = Arc::new(
                    File::options()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(self.path(pack))?,
                );
                st.next += 1;
                st.dir_dirty = true;
                st.handles.insert(pack, file.clone());
                st.active = Some(Active { pack, file, len: 0 });
            }
            let Some(a) = st.active.as_mut() else {
                unreachable!("an active pack was just made");
            };
            let start = a.len;
            a.len += record;
            let taken = (a.pack, a.file.clone(), start);
            st.dirty.insert(taken.0);
            taken
        };
        // A failed write leaves a hole of dead bytes; compaction takes it back.
        file.write_all_at(&header(id, len), start)?;
        file.write_all_at(bytes, start + HEADER)?;
        let end = start + record;
        if end / WRITE_BACK > start / WRITE_BACK {
            start_write_back(&file, (end / WRITE_BACK - 1) * WRITE_BACK, WRITE_BACK);
        }
        Ok(Location {
            pack,
            offset: start + HEADER,
            len,
        })
    }

    fn handle(&self, pack: u64) -> io::Result<Option<Arc<File>>> {
        if let Some(f) = self.state().handles.get(&pack) {
            return Ok(Some(f.clone()));
        }
        match File::open(self.path(pack)) {
            Ok(f) => {
                let f = Arc::new(f);
                self.state().handles.insert(pack, f.clone());
                Ok(Some(f))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads the bytes at `loc`; `None` if its pack is gone or too short.
    pub fn read(&self, loc: Location) -> io::Result<Option<Vec<u8>>> {
        let Some(file) = self.handle(loc.pack)? else {
            return Ok(None);
        };
        // A location past the pack's end (a damaged database, a truncated
        // pack) is not read, nor its length allocated.
        if file.metadata()?.len() < loc.end() {
            return Ok(None);
        }
        let mut buf = vec![0; loc.len as usize];
        match file.read_exact_at(&mut buf, loc.offset) {
            Ok(()) => Ok(Some(buf)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether the pack file of `loc` is there and long enough to hold it
    /// (asks the file system, not an open handle: a pack deleted from under
    /// the store counts as gone).
    pub fn holds(&self, loc: Location) -> io::Result<bool> {
        match fs::metadata(self.path(loc.pack)) {
            Ok(m) => Ok(m.len() >= loc.end()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.state().handles.remove(&loc.pack);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Makes every record written so far durable (fdatasync of each pack
    /// written to, then of the directory if packs came or went).
    pub fn sync(&self) -> io::Result<()> {
        let (dirty, dir_dirty) = {
            let mut st = self.state();
            let dirty: Vec<(u64, Option<Arc<File>>)> = std::mem::take(&mut st.dirty)
                .into_iter()
                .map(|p| (p, st.handles.get(&p).cloned()))
                .collect();
            (dirty, std::mem::take(&mut st.dir_dirty))
        };
        let result = (|| {
            for (_, file) in &dirty {
                // A pack deleted meanwhile (compacted) has nothing to keep.
                if let Some(f) = file {
                    f.sync_data()?;
                }
            }
            if dir_dirty {
                File::open(&self.dir)?.sync_all()?;
            }
            Ok(())
        })();
        if result.is_err() {
            // Try again at the next sync.
            let mut st = self.state();
            st.dirty.extend(dirty.into_iter().map(|(p, _)| p));
            st.dir_dirty |= dir_dirty;
        }
        result
    }

    /// The pack being appended to, if any.
    pub fn active(&self) -> Option<u64> {
        self.state().active.as_ref().map(|a| a.pack)
    }

    /// Stops appending to the active pack: the next record starts a new one.
    pub fn seal(&self) {
        self.state().active = None;
    }

    /// Deletes pack `pack` (a reader holding it open still reads it).
    pub fn remove(&self, pack: u64) -> io::Result<()> {
        {
            let mut st = self.state();
            st.handles.remove(&pack);
            st.dirty.remove(&pack);
            if st.active.as_ref().is_some_and(|a| a.pack == pack) {
                st.active = None;
            }
            st.dir_dirty = true;
        }
        match fs::remove_file(self.path(pack)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reads every record of pack `pack` without the database: records
    /// whose header was written whole and whose bytes match their id, and
    /// the ids of whole headers followed by bytes that do not match. Past
    /// anything that is not a whole header (a torn write, a hole), it looks
    /// for the next one.
    pub fn scan(&self, pack: u64) -> io::Result<Scanned> {
        let data = fs::read(self.path(pack))?;
        let mut out = Scanned::default();
        let mut at = 0usize;
        let header_len = HEADER as usize;
        while at + header_len <= data.len() {
            let Some((id, len)) = parse_header(&data[at..]) else {
                // Resynchronise on the next magic.
                match data[at + 1..].windows(4).position(|w| w == MAGIC) {
                    Some(p) => at += 1 + p,
                    None => break,
                }
                continue;
            };
            let start = at + header_len;
            let end = start.saturating_add(len as usize);
            match data.get(start..end) {
                Some(bytes) if id.matches(bytes) => {
                    out.good.push((
                        id,
                        Location {
                            pack,
                            offset: start as u64,
                            len,
                        },
                    ));
                    at = end;
                }
                Some(_) => {
                    out.corrupt.push(id);
                    at = end;
                }
                // Cut short by a crash: not a record.
                None => break,
            }
        }
        Ok(out)
    }
}

/// Starts writing `len` bytes of `file` from `offset` out to the disk,
/// without waiting for it (Linux's `sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE`). Only a hint: durability is still the flush's
/// `fdatasync`; a failure here changes nothing and is ignored. Bytes of
/// the window another writer has not written yet are left to the flush.
fn start_write_back(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: the descriptor is open for as long as `file` is borrowed;
        // the call reads no memory of this process.
        #[allow(unsafe_code)]
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_read_back_and_scanned_without_the_database() {
        let tmp = tempfile::tempdir().unwrap();
        let packs = Packs::open(tmp.path(), PACK_TARGET).unwrap();
        let chunks: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000 + usize::from(i)]).collect();
        let locs: Vec<Location> = chunks
            .iter()
            .map(|c| packs.append(&ContentId::of(c), c).unwrap())
            .collect();
        for (c, l) in chunks.iter().zip(&locs) {
            assert_eq!(packs.read(*l).unwrap().unwrap(), *c);
            assert!(packs.holds(*l).unwrap());
            assert_eq!(Location::decode(&l.encode()), Some(*l));
        }
        packs.sync().unwrap();
        // Rot in the third record's bytes, a torn header before the fifth.
        let path = packs.path(locs[0].pack);
        let mut data = fs::read(&path).unwrap();
        data[locs[2].offset as usize + 10] ^= 1;
        data[(locs[4].offset - HEADER) as usize + 45] ^= 1;
        fs::write(&path, data).unwrap();
        let scanned = packs.scan(locs[0].pack).unwrap();
        let good: Vec<Location> = scanned.good.iter().map(|(_, l)| *l).collect();
        assert_eq!(good, vec![locs[0], locs[1], locs[3]]);
        assert_eq!(scanned.corrupt, vec![ContentId::of(&chunks[2])]);
    }

    #[test]
    fn a_new_process_starts_a_new_pack_and_full_packs_are_sealed() {
        let tmp = tempfile::tempdir().unwrap();
        let first = Packs::open(tmp.path(), PACK_TARGET).unwrap();
        let a = first.append(&ContentId::of(b"a"), b"a").unwrap();
        drop(first);
        let second = Packs::open(tmp.path(), PACK_TARGET).unwrap();
        let b = second.append(&ContentId::of(b"b"), b"b").unwrap();
        assert_eq!(b.pack, a.pack + 1);
        let big = vec![7u8; (PACK_TARGET / 2) as usize];
        let c = second.append(&ContentId::of(&big), &big).unwrap();
        let d = second.append(&ContentId::of(&big), &big).unwrap();
        assert_eq!(c.pack, b.pack);
        assert_eq!(d.pack, c.pack + 1);
        assert_eq!(second.read(a).unwrap().unwrap(), b"a");
        // A location past the pack's end reads as absent.
        let past = Location { len: u32::MAX, ..b };
        assert_eq!(second.read(past).unwrap(), None);
        assert!(!second.holds(past).unwrap());
        second.remove(a.pack).unwrap();
        assert!(!second.holds(a).unwrap());
        assert_eq!(second.read(a).unwrap(), None);
    }
}
