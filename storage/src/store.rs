//! The [`ChunkStore`] trait: everything the store does, written once over a
//! handful of key-value primitives that each backend provides.
//!
//! ## Keys
//!
//! One ordered keyspace, one byte of prefix per kind of record, so that a
//! single atomic batch can touch several kinds at once:
//!
//! | prefix | key | value |
//! |---|---|---|
//! | `c` | chunk id | chunk bytes |
//! | `i` | chunk id | chunk length (u32 LE): an index to list chunks without reading them |
//! | `m` | envelope id | kind byte (1 delta, 2 model) + signed envelope bytes as received |
//! | `r` | ref name | model version id |
//! | `p` | id | empty: a pin |
//! | `q` | id | kind byte (0 chunk, 1 delta, 2 model), length (u64 LE) and BLAKE3 of the bytes found: quarantine |
//!
//! ## Garbage collection
//!
//! Mark and sweep. The roots are the refs, the pins, and everything written
//! since the previous collection started; from a model manifest the mark
//! follows its chunks, parents and deltas, from a delta manifest its chunks;
//! with a retention horizon ([`ChunkStore::gc_retaining`]) parents are
//! followed only down to a given round. So nothing written is collected before a whole collection cycle has passed
//! over it: a writer has until the next `gc` to reference what it wrote.
//!
//! Writers hold a shared gate while they write and record what they wrote;
//! the sweep holds the gate exclusively, re-reads the roots, marks what was
//! written meanwhile, and only then deletes. A put that races a sweep either
//! lands before it (and is marked) or after it (and writes the bytes again).

use std::collections::HashSet;

use tapestry_protocol::{
    ContentId, DecodeError, DeltaManifest, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, ModelManifest, Signed,
    Verified,
};

use crate::backend::{Backend, KvOp};
use crate::bytes::Bytes;
use crate::error::StoreError;

pub(crate) const CHUNK: u8 = b'c';
pub(crate) const INDEX: u8 = b'i';
pub(crate) const MANIFEST: u8 = b'm';
pub(crate) const REF: u8 = b'r';
pub(crate) const PIN: u8 = b'p';
pub(crate) const QUARANTINE: u8 = b'q';

/// Builds a key: prefix byte, then the rest.
pub(crate) fn key(prefix: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + rest.len());
    k.push(prefix);
    k.extend_from_slice(rest);
    k
}

pub(crate) fn id_from_key(k: &[u8]) -> Option<ContentId> {
    <[u8; 32]>::try_from(k.get(1..)?)
        .ok()
        .map(ContentId::from_bytes)
}

/// Which kind of signed manifest a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ManifestKind {
    /// A [`DeltaManifest`].
    Delta,
    /// A [`ModelManifest`].
    Model,
}

impl ManifestKind {
    fn byte(self) -> u8 {
        match self {
            ManifestKind::Delta => 1,
            ManifestKind::Model => 2,
        }
    }
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(ManifestKind::Delta),
            2 => Some(ManifestKind::Model),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            ManifestKind::Delta => "delta manifest",
            ManifestKind::Model => "model manifest",
        }
    }
}

/// What a garbage collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Chunks kept.
    pub chunks_kept: u64,
    /// Chunks deleted.
    pub chunks_deleted: u64,
    /// Bytes of chunk data deleted.
    pub bytes_deleted: u64,
    /// Bytes of chunk data kept.
    pub bytes_kept: u64,
    /// Manifests kept.
    pub manifests_kept: u64,
    /// Manifests deleted.
    pub manifests_deleted: u64,
    /// Bytes of live chunk data the backend rewrote to give back the space
    /// of deleted chunks (compaction of the on-disk backend's packs).
    pub bytes_compacted: u64,
}

/// What a scrub found. Corrupt items have been quarantined: they are no
/// longer served, `has` says they are absent, and a node fetches them again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Chunks re-hashed.
    pub chunks_checked: u64,
    /// Bytes re-hashed.
    pub bytes_checked: u64,
    /// Manifests re-verified.
    pub manifests_checked: u64,
    /// Chunks whose bytes did not match their id.
    pub corrupt_chunks: Vec<ContentId>,
    /// Manifests whose bytes did not match their id or did not verify.
    pub corrupt_manifests: Vec<ContentId>,
    /// Chunks the index listed but whose bytes are gone (lost by the disk, or
    /// dropped by the storage engine's own checks); their entries are removed.
    pub lost_chunks: Vec<ContentId>,
    /// Chunks whose bytes were present without an index entry (left by a
    /// crash between the two writes, or found by a repair), now indexed
    /// again.
    pub index_repairs: u64,
    /// Refs that point at a version that is now incomplete or missing, with
    /// the number of chunks missing (0 if the manifest itself is gone).
    pub incomplete_refs: Vec<(String, ContentId, usize)>,
}

impl ScrubReport {
    /// Whether the store is entirely sound.
    pub fn is_clean(&self) -> bool {
        self.corrupt_chunks.is_empty()
            && self.lost_chunks.is_empty()
            && self.corrupt_manifests.is_empty()
            && self.incomplete_refs.is_empty()
    }
}

/// The ancestry of a model version, as far as the store holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    /// Versions found, starting with the one asked about, breadth first.
    pub versions: Vec<ContentId>,
    /// Delta manifests aggregated into any of those versions (present or not).
    pub deltas: Vec<ContentId>,
    /// Ancestor versions named but not in the store.
    pub missing_versions: Vec<ContentId>,
}

fn check_ref_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidRefName(name.to_owned()))
    }
}

fn check_chunk_size(chunk_size: usize) -> Result<(), StoreError> {
    if (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        Ok(())
    } else {
        Err(StoreError::BadChunkSize(chunk_size))
    }
}

/// Content-addressed storage of chunks, signed manifests, refs and pins: the
/// store's whole public API.
///
/// Every method is provided here, once, over the key-value primitives of a
/// [`Backend`], so both backends behave identically and one test suite
/// covers both. Every backend is a `ChunkStore`; the trait is object safe
/// (`Arc<dyn ChunkStore>`).
pub trait ChunkStore: Backend {
    /// Makes every completed write durable (fsync). Writes acknowledged
    /// before a successful flush survive any crash.
    fn flush(&self) -> Result<(), StoreError> {
        self.kv_flush()
    }

    /// Whether writes succeed again, after one failed for want of space:
    /// an out-of-space error if not. A backend that refused every write
    /// after the failure (sled does) is opened again on the way, so a
    /// success means the store takes writes. Nothing it writes stays.
    fn probe_room(&self) -> Result<(), StoreError> {
        self.kv_probe_room()
    }

    /// Bytes the store occupies on disk (or in memory, for the memory backend).
    fn disk_bytes(&self) -> Result<u64, StoreError> {
        self.kv_size()
    }

    // ---- chunks ----

    /// Stores a chunk under its BLAKE3 id. Storing the same bytes twice
    /// stores them once.
    fn put(&self, bytes: &[u8]) -> Result<ContentId, StoreError> {
        Ok(self.put_many(&[bytes])?.remove(0))
    }

    /// Stores many chunks in one batch (see [`Backend::kv_apply`] for
    /// what a crash can leave); returns their ids in order.
    fn put_many(&self, chunks: &[&[u8]]) -> Result<Vec<ContentId>, StoreError> {
        let ids: Vec<ContentId> = chunks.iter().map(|c| ContentId::of(c)).collect();
        put_with_ids(self, &ids, chunks)?;
        Ok(ids)
    }

    /// Stores a chunk under `id`, which the caller has just checked it
    /// against (`id.matches(bytes)`: a chunk fetched from a peer and
    /// verified on arrival), without hashing it again. A chunk stored under
    /// a wrong id is never served or applied: [`ChunkStore::get_verified`]
    /// quarantines it (and debug builds check here).
    fn put_checked(&self, id: ContentId, bytes: &[u8]) -> Result<(), StoreError> {
        debug_assert!(id.matches(bytes), "put_checked with a wrong id");
        put_with_ids(self, &[id], &[bytes])
    }

    /// Reads a chunk as stored, without re-hashing it. Use
    /// [`ChunkStore::get_verified`] for anything served to peers or applied.
    fn get(&self, id: &ContentId) -> Result<Option<Bytes>, StoreError> {
        self.kv_get(&key(CHUNK, id.as_bytes()))
    }

    /// Reads a chunk and re-hashes it. Bytes that do not match their id are
    /// never returned: they are quarantined and the call fails with
    /// [`StoreError::Corrupt`].
    fn get_verified(&self, id: &ContentId) -> Result<Option<Bytes>, StoreError> {
        let Some(bytes) = self.get(id)? else {
            return Ok(None);
        };
        if id.matches(&bytes) {
            return Ok(Some(bytes));
        }
        quarantine(self, *id, 0, &bytes)?;
        Err(StoreError::Corrupt {
            what: "chunk",
            id: *id,
        })
    }

    /// Whether a chunk is present (and not quarantined).
    fn has(&self, id: &ContentId) -> Result<bool, StoreError> {
        self.kv_contains(&key(INDEX, id.as_bytes()))
    }

    /// Whether a chunk's bytes are there, not only its index entry (a
    /// chunk whose file was deleted from under the store has the one, not
    /// the other).
    fn has_bytes(&self, id: &ContentId) -> Result<bool, StoreError> {
        Ok(self.kv_contains(&key(INDEX, id.as_bytes()))?
            && self.kv_contains(&key(CHUNK, id.as_bytes()))?)
    }

    /// Ids of every chunk, in id order (reads the index, not the data).
    fn chunk_ids(&self) -> Result<Vec<ContentId>, StoreError> {
        let mut ids = Vec::new();
        self.kv_for_each(INDEX, &mut |k, _| {
            ids.extend(id_from_key(k));
            Ok(())
        })?;
        Ok(ids)
    }

    /// Ids of quarantined items.
    fn quarantined(&self) -> Result<Vec<ContentId>, StoreError> {
        let mut ids = Vec::new();
        self.kv_for_each(QUARANTINE, &mut |k, _| {
            ids.extend(id_from_key(k));
            Ok(())
        })?;
        Ok(ids)
    }

    // ---- payloads: a tensor set cut into chunks ----

    /// Cuts `payload` into `chunk_size` pieces (the last may be shorter),
    /// stores them in one batch, and returns their ids in order.
    fn put_payload(&self, payload: &[u8], chunk_size: usize) -> Result<Vec<ContentId>, StoreError> {
        check_chunk_size(chunk_size)?;
        let pieces: Vec<&[u8]> = payload.chunks(chunk_size).collect();
        if pieces.is_empty() {
            return Ok(Vec::new());
        }
        self.put_many(&pieces)
    }

    /// Reassembles a payload from its chunk ids, verifying every chunk.
    fn read_payload(&self, ids: &[ContentId], expected_len: u64) -> Result<Vec<u8>, StoreError> {
        let cap = usize::try_from(expected_len).map_err(|_| StoreError::WrongLength {
            expected: expected_len,
            found: 0,
        })?;
        let mut out = Vec::with_capacity(cap.min(1 << 30));
        for id in ids {
            let chunk = self.get_verified(id)?.ok_or(StoreError::NotFound {
                what: "chunk",
                id: *id,
            })?;
            out.extend_from_slice(&chunk);
        }
        if out.len() as u64 != expected_len {
            return Err(StoreError::WrongLength {
                expected: expected_len,
                found: out.len() as u64,
            });
        }
        Ok(out)
    }

    // ---- manifests ----

    /// Stores a verified delta manifest's envelope as received; returns its id.
    fn put_delta_manifest(&self, m: &Verified<DeltaManifest>) -> Result<ContentId, StoreError> {
        put_manifest(self, ManifestKind::Delta, m.id(), m.envelope_bytes())
    }

    /// Stores a verified model manifest's envelope as received; returns its id.
    fn put_model_manifest(&self, m: &Verified<ModelManifest>) -> Result<ContentId, StoreError> {
        put_manifest(self, ManifestKind::Model, m.id(), m.envelope_bytes())
    }

    /// The stored envelope bytes of a manifest and its kind (to re-serve it).
    fn manifest_bytes(&self, id: &ContentId) -> Result<Option<(ManifestKind, Bytes)>, StoreError> {
        let Some(record) = self.kv_get(&key(MANIFEST, id.as_bytes()))? else {
            return Ok(None);
        };
        match record.first().copied().and_then(ManifestKind::from_byte) {
            Some(kind) => Ok(Some((kind, record.slice_from(1)))),
            None => {
                quarantine(self, *id, 0xff, &record)?;
                Err(StoreError::Corrupt {
                    what: "manifest",
                    id: *id,
                })
            }
        }
    }

    /// Loads a delta manifest, re-checking its id and signature.
    fn get_delta_manifest(
        &self,
        id: &ContentId,
    ) -> Result<Option<Verified<DeltaManifest>>, StoreError> {
        load_manifest::<DeltaManifest, Self>(self, id, ManifestKind::Delta)
    }

    /// Loads a model manifest, re-checking its id and signature.
    fn get_model_manifest(
        &self,
        id: &ContentId,
    ) -> Result<Option<Verified<ModelManifest>>, StoreError> {
        load_manifest::<ModelManifest, Self>(self, id, ManifestKind::Model)
    }

    /// The message of a stored delta manifest, its id re-checked but not
    /// its signature (it was verified before it was stored, and the id
    /// proves these are those bytes): about a signature verification
    /// cheaper than [`ChunkStore::get_delta_manifest`], for bookkeeping such
    /// as garbage collection that does not pass the manifest on.
    fn delta_manifest_message(&self, id: &ContentId) -> Result<Option<DeltaManifest>, StoreError> {
        read_manifest::<DeltaManifest, _, Self>(
            self,
            id,
            ManifestKind::Delta,
            Signed::<DeltaManifest>::decode_stored,
        )
    }

    /// The message of a stored model manifest, its id re-checked but not
    /// its signature; see [`ChunkStore::delta_manifest_message`].
    fn model_manifest_message(&self, id: &ContentId) -> Result<Option<ModelManifest>, StoreError> {
        read_manifest::<ModelManifest, _, Self>(
            self,
            id,
            ManifestKind::Model,
            Signed::<ModelManifest>::decode_stored,
        )
    }

    // ---- refs and pins ----

    /// Points `name` at model version `version`, after checking that the
    /// version's manifest and every one of its chunks are present. Atomic.
    fn set_ref(&self, name: &str, version: ContentId) -> Result<(), StoreError> {
        self.swap_ref(name, None, version).map(|_| ())
    }

    /// Like [`ChunkStore::set_ref`], but only if the ref currently points at
    /// `expected` (`None`: any value). Returns false if it did not.
    fn swap_ref(
        &self,
        name: &str,
        expected: Option<Option<ContentId>>,
        version: ContentId,
    ) -> Result<bool, StoreError> {
        check_ref_name(name)?;
        let _shared = self.gc_gate().shared();
        let m = self
            .get_model_manifest(&version)?
            .ok_or(StoreError::NotFound {
                what: "model manifest",
                id: version,
            })?;
        let mut missing = m
            .message()
            .chunk_ids
            .iter()
            .filter(|c| !matches!(self.has(c), Ok(true)));
        if let Some(first) = missing.next() {
            return Err(StoreError::Incomplete {
                version,
                missing: 1 + missing.count(),
                first: *first,
            });
        }
        self.kv_chunk_barrier()?;
        let k = key(REF, name.as_bytes());
        let swapped = match expected {
            None => {
                self.kv_apply(vec![KvOp::Put(k, version.as_bytes())])?;
                true
            }
            Some(old) => self.kv_compare_and_swap(
                &k,
                old.as_ref().map(|o| o.as_bytes().as_slice()),
                Some(version.as_bytes()),
            )?,
        };
        if swapped {
            self.gc_gate().record([version]);
        }
        Ok(swapped)
    }

    /// Where a ref points, if it exists.
    fn get_ref(&self, name: &str) -> Result<Option<ContentId>, StoreError> {
        check_ref_name(name)?;
        Ok(self
            .kv_get(&key(REF, name.as_bytes()))?
            .and_then(|v| id_from_value(&v)))
    }

    /// Removes a ref (what it pointed at becomes collectable).
    fn delete_ref(&self, name: &str) -> Result<(), StoreError> {
        check_ref_name(name)?;
        self.kv_apply(vec![KvOp::Delete(key(REF, name.as_bytes()))])
    }

    /// Every ref, in name order.
    fn refs(&self) -> Result<Vec<(String, ContentId)>, StoreError> {
        let mut out = Vec::new();
        self.kv_for_each(REF, &mut |k, v| {
            if let (Ok(name), Some(id)) = (std::str::from_utf8(&k[1..]), id_from_value(v)) {
                out.push((name.to_owned(), id));
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Keeps `id` (a chunk or a manifest and everything it names) from
    /// garbage collection until unpinned.
    fn pin(&self, id: ContentId) -> Result<(), StoreError> {
        let _shared = self.gc_gate().shared();
        self.kv_apply(vec![KvOp::Put(key(PIN, id.as_bytes()), &[])])?;
        self.gc_gate().record([id]);
        Ok(())
    }

    /// Removes a pin.
    fn unpin(&self, id: ContentId) -> Result<(), StoreError> {
        self.kv_apply(vec![KvOp::Delete(key(PIN, id.as_bytes()))])
    }

    /// Every pinned id.
    fn pins(&self) -> Result<Vec<ContentId>, StoreError> {
        let mut out = Vec::new();
        self.kv_for_each(PIN, &mut |k, _| {
            out.extend(id_from_key(k));
            Ok(())
        })?;
        Ok(out)
    }

    // ---- lineage, garbage collection, scrub ----

    /// Walks a model version's parents (breadth first, at most `limit`
    /// versions) and collects the deltas aggregated along the way.
    fn lineage(&self, version: ContentId, limit: usize) -> Result<Lineage, StoreError> {
        let mut out = Lineage::default();
        let mut seen = HashSet::new();
        let mut seen_deltas = HashSet::new();
        let mut queue = std::collections::VecDeque::from([version]);
        while let Some(v) = queue.pop_front() {
            if out.versions.len() >= limit || !seen.insert(v) {
                continue;
            }
            match self.get_model_manifest(&v)? {
                None => out.missing_versions.push(v),
                Some(m) => {
                    out.versions.push(v);
                    for d in &m.message().deltas {
                        if seen_deltas.insert(*d) {
                            out.deltas.push(*d);
                        }
                    }
                    queue.extend(m.message().parents.iter().copied());
                }
            }
        }
        Ok(out)
    }

    /// Deletes every chunk and manifest not reachable from a ref, a pin, or
    /// what was written since the previous collection began (module docs).
    fn gc(&self) -> Result<GcReport, StoreError> {
        self.gc_retaining(0, &[])
    }

    /// [`ChunkStore::gc`] with a retention horizon: following parents, the
    /// mark stops at versions of a round before `oldest_round` (a version
    /// kept keeps its deltas and chunks). With the head as a root, the head
    /// and its ancestors from `oldest_round` on stay; older history goes
    /// unless a ref or a pin names it, it is in `keep` (extra roots for this
    /// collection, e.g. deltas not yet aggregated), or it was written since
    /// the previous collection began.
    fn gc_retaining(&self, oldest_round: u64, keep: &[ContentId]) -> Result<GcReport, StoreError> {
        crate::gc::collect(self, oldest_round, keep)
    }

    /// Re-hashes every chunk and re-verifies every manifest; quarantines what
    /// is corrupt, repairs the chunk index, and reports refs left incomplete.
    fn scrub(&self) -> Result<ScrubReport, StoreError> {
        let mut report = ScrubReport::default();
        let mut corrupt = Vec::new();
        let mut present = HashSet::new();
        self.kv_for_each(CHUNK, &mut |k, v| {
            let Some(id) = id_from_key(k) else {
                return Ok(());
            };
            report.chunks_checked += 1;
            report.bytes_checked += v.len() as u64;
            if id.matches(v) {
                present.insert((id, v.len() as u32));
            } else {
                corrupt.push((id, v.to_vec()));
            }
            Ok(())
        })?;
        for (id, found) in corrupt {
            quarantine(self, id, 0, &found)?;
            report.corrupt_chunks.push(id);
        }
        // Index entries whose bytes the disk lost, and bytes left without an
        // index entry by a crash.
        let mut lost = Vec::new();
        self.kv_for_each(INDEX, &mut |k, v| {
            let Some(id) = id_from_key(k) else {
                return Ok(());
            };
            let len = v
                .get(..4)
                .map_or(u32::MAX, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            if !present.remove(&(id, len)) && !report.corrupt_chunks.contains(&id) {
                lost.push(id);
            }
            Ok(())
        })?;
        for id in &lost {
            self.kv_apply(vec![
                KvOp::Delete(key(INDEX, id.as_bytes())),
                KvOp::Delete(key(CHUNK, id.as_bytes())),
            ])?;
        }
        report.lost_chunks = lost;
        report.index_repairs = present.len() as u64;
        for (id, len) in present {
            self.kv_apply(vec![KvOp::Put(
                key(INDEX, id.as_bytes()),
                &len.to_le_bytes(),
            )])?;
        }
        let mut manifests = Vec::new();
        self.kv_for_each(MANIFEST, &mut |k, _| {
            manifests.extend(id_from_key(k));
            Ok(())
        })?;
        for id in manifests {
            report.manifests_checked += 1;
            let ok = match self.manifest_bytes(&id) {
                Ok(Some((ManifestKind::Delta, _))) => self.get_delta_manifest(&id).map(|_| ()),
                Ok(Some((ManifestKind::Model, _))) => self.get_model_manifest(&id).map(|_| ()),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            match ok {
                Ok(()) => {}
                Err(StoreError::Corrupt { .. } | StoreError::BadManifest { .. }) => {
                    report.corrupt_manifests.push(id)
                }
                Err(e) => return Err(e),
            }
        }
        for (name, version) in self.refs()? {
            match self.get_model_manifest(&version) {
                Ok(Some(m)) => {
                    let missing = m
                        .message()
                        .chunk_ids
                        .iter()
                        .filter(|c| !matches!(self.has(c), Ok(true)))
                        .count();
                    if missing > 0 {
                        report.incomplete_refs.push((name, version, missing));
                    }
                }
                Ok(None) | Err(StoreError::Corrupt { .. } | StoreError::BadManifest { .. }) => {
                    report.incomplete_refs.push((name, version, 0))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }
}

impl<B: Backend> ChunkStore for B {}

/// Stores `chunks` under `ids` (their BLAKE3 ids, computed or checked by
/// the caller) in one batch.
fn put_with_ids<S: ChunkStore + ?Sized>(
    s: &S,
    ids: &[ContentId],
    chunks: &[&[u8]],
) -> Result<(), StoreError> {
    let mut lens = Vec::with_capacity(chunks.len());
    for c in chunks {
        let len = u32::try_from(c.len()).map_err(|_| StoreError::BadChunkSize(c.len()))?;
        lens.push(len.to_le_bytes());
    }
    let _shared = s.gc_gate().shared();
    let mut batch = Vec::with_capacity(chunks.len() * 2);
    let mut seen = HashSet::with_capacity(chunks.len());
    for ((id, bytes), len) in ids.iter().zip(chunks).zip(&lens) {
        // Skip only what is really there: an indexed chunk whose bytes
        // the disk lost is written again.
        if !seen.insert(*id)
            || (s.kv_contains(&key(INDEX, id.as_bytes()))?
                && s.kv_contains(&key(CHUNK, id.as_bytes()))?)
        {
            continue;
        }
        batch.push(KvOp::Put(key(CHUNK, id.as_bytes()), bytes));
        batch.push(KvOp::Put(key(INDEX, id.as_bytes()), len));
    }
    if !batch.is_empty() {
        s.kv_apply(batch)?;
    }
    s.gc_gate().record(ids.iter().copied());
    Ok(())
}

fn id_from_value(v: &[u8]) -> Option<ContentId> {
    <[u8; 32]>::try_from(v).ok().map(ContentId::from_bytes)
}

/// Moves a corrupt item out of service into quarantine. `kind`: 0 chunk,
/// 1 delta manifest, 2 model manifest, 0xff unreadable manifest record.
fn quarantine<S: ChunkStore + ?Sized>(
    store: &S,
    id: ContentId,
    kind: u8,
    found: &[u8],
) -> Result<(), StoreError> {
    // What was found, not the bytes themselves: kind, length, BLAKE3.
    let mut record = Vec::with_capacity(41);
    record.push(kind);
    record.extend_from_slice(&(found.len() as u64).to_le_bytes());
    record.extend_from_slice(ContentId::of(found).as_bytes());
    let mut batch = vec![KvOp::Put(key(QUARANTINE, id.as_bytes()), &record)];
    if kind == 0 {
        batch.push(KvOp::Delete(key(INDEX, id.as_bytes())));
        batch.push(KvOp::Delete(key(CHUNK, id.as_bytes())));
    } else {
        batch.push(KvOp::Delete(key(MANIFEST, id.as_bytes())));
    }
    store.kv_apply(batch)
}

fn put_manifest<S: ChunkStore + ?Sized>(
    store: &S,
    kind: ManifestKind,
    id: ContentId,
    envelope: &[u8],
) -> Result<ContentId, StoreError> {
    let mut record = Vec::with_capacity(envelope.len() + 1);
    record.push(kind.byte());
    record.extend_from_slice(envelope);
    let _shared = store.gc_gate().shared();
    store.kv_apply(vec![KvOp::Put(key(MANIFEST, id.as_bytes()), &record)])?;
    store.gc_gate().record([id]);
    Ok(id)
}

fn load_manifest<T: tapestry_protocol::SignedMessage, S: ChunkStore + ?Sized>(
    store: &S,
    id: &ContentId,
    want: ManifestKind,
) -> Result<Option<Verified<T>>, StoreError> {
    read_manifest::<T, _, S>(store, id, want, Signed::<T>::open)
}

/// Reads a stored manifest of kind `want`, checks its id (quarantining it
/// if it does not match) and decodes it with `decode` (quarantining it if
/// that fails).
fn read_manifest<T: tapestry_protocol::SignedMessage, R, S: ChunkStore + ?Sized>(
    store: &S,
    id: &ContentId,
    want: ManifestKind,
    decode: impl FnOnce(&[u8]) -> Result<R, DecodeError>,
) -> Result<Option<R>, StoreError> {
    let Some((kind, bytes)) = store.manifest_bytes(id)? else {
        return Ok(None);
    };
    if kind != want {
        return Err(StoreError::BadManifest {
            id: *id,
            source: DecodeError::WrongKind {
                expected: T::DOMAIN_TAG,
                found: kind.name().into(),
            },
        });
    }
    if !id.matches(&bytes) {
        quarantine(store, *id, kind.byte(), &bytes)?;
        return Err(StoreError::Corrupt {
            what: kind.name(),
            id: *id,
        });
    }
    match decode(&bytes) {
        Ok(v) => Ok(Some(v)),
        Err(source) => {
            quarantine(store, *id, kind.byte(), &bytes)?;
            Err(StoreError::BadManifest { id: *id, source })
        }
    }
}
