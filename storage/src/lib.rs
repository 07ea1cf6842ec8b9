//! Tapestry's chunk store: every tensor a node holds or serves — its model
//! versions, its own deltas, the deltas it fetched — lives here as
//! content-addressed chunks (BLAKE3), next to the signed manifests that name
//! them, named refs (e.g. the head version of a model in a region), pins,
//! garbage collection and scrub.
//!
//! One public API, the trait [`ChunkStore`], over two backends:
//! [`SledStore`] on disk (the default: sled for metadata, pack files for
//! chunk bytes)
//! and [`MemoryStore`] (for the simulator and tests). All behaviour is
//! written once in `ChunkStore`'s provided methods over the few key-value
//! primitives of a [`Backend`] (the only thing a backend implements), and one
//! test suite runs against both backends.
//!
//! Guarantees:
//! - A chunk is stored only under the BLAKE3 hash of its bytes, and a
//!   verified read ([`ChunkStore::get_verified`]) never returns bytes that do
//!   not match; corrupt items are quarantined and reported by
//!   [`ChunkStore::scrub`].
//! - A ref only ever points at a model version whose manifest and chunks are
//!   all present when it is moved.
//! - Garbage collection never deletes anything reachable from a ref or pin,
//!   nor anything written since the previous collection began, even while
//!   writes go on.
//! - After [`ChunkStore::flush`] returns, what was written survives a crash
//!   (tested by killing a writer process with SIGKILL).

mod backend;
mod bytes;
mod error;
mod gc;
mod memory;
mod packs;
mod sled_store;
mod store;

pub use backend::{Backend, GcGate, KvOp, KvVisitor};
pub use bytes::Bytes;
pub use error::StoreError;
pub use memory::MemoryStore;
pub use sled_store::{SledConfig, SledStore};
pub use store::{ChunkStore, GcReport, Lineage, ManifestKind, ScrubReport};
