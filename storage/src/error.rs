//! The store's error type.

use std::io;
use std::path::PathBuf;

use tapestry_protocol::{ContentId, DecodeError};

/// Everything that can go wrong in the chunk store. Messages say what failed
/// and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file system refused an operation.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// Another process (or another handle in this one) has the store open.
    #[error(
        "the store at {0} is locked by another process; stop the other node using this data \
         directory, or choose another one"
    )]
    Locked(PathBuf),
    /// The directory exists but is not a Tapestry store (or a newer one).
    #[error("{path} is not a Tapestry chunk store: {reason}")]
    NotAStore {
        /// The directory.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// The storage engine failed (sled's own error, as text).
    #[error("storage engine error: {0}")]
    Backend(String),
    /// The metadata database cannot be opened: damaged on disk. The pack
    /// files are untouched; [`crate::SledStore::repair`] rebuilds the
    /// database from them.
    #[error(
        "the store's database in {path} is damaged ({detail}); repair the store to rebuild it \
         from its pack files"
    )]
    DamagedDatabase {
        /// The store's directory.
        path: PathBuf,
        /// What the storage engine said.
        detail: String,
    },
    /// Stored bytes no longer match their content id (disk corruption); the
    /// item has been quarantined and will not be served.
    #[error("{what} {id} is corrupt on disk and was quarantined; fetch it again from a peer")]
    Corrupt {
        /// What it was (chunk, delta manifest, model manifest).
        what: &'static str,
        /// Its id.
        id: ContentId,
    },
    /// A ref was to be moved to a version whose data is not all present.
    #[error(
        "model version {version} is missing {} of its chunks (first {first}); fetch them before moving a ref to it",
        missing
    )]
    Incomplete {
        /// The version.
        version: ContentId,
        /// How many chunks are missing.
        missing: usize,
        /// The first missing chunk.
        first: ContentId,
    },
    /// Something asked for is not in the store.
    #[error("{what} {id} is not in the store")]
    NotFound {
        /// What was asked for.
        what: &'static str,
        /// Its id.
        id: ContentId,
    },
    /// A stored manifest could not be decoded or verified.
    #[error("stored manifest {id} is invalid: {source}")]
    BadManifest {
        /// Its id.
        id: ContentId,
        /// Why.
        source: DecodeError,
    },
    /// A ref name outside the allowed alphabet or length.
    #[error("invalid ref name {0:?}: use 1..=200 characters of a-z A-Z 0-9 / _ . -")]
    InvalidRefName(String),
    /// A chunk size outside the protocol's range (or a chunk of 4 GiB or more).
    #[error("chunk size {0} outside 4 KiB..=4 MiB")]
    BadChunkSize(usize),
    /// Reassembled data does not have the length the caller expected.
    #[error("payload of {found} bytes, expected {expected}")]
    WrongLength {
        /// Expected length.
        expected: u64,
        /// Length found.
        found: u64,
    },
}

impl StoreError {
    /// Whether the disk (or the file system's quota) ran out of space.
    pub fn is_out_of_space(&self) -> bool {
        matches!(self, StoreError::Io { source, .. }
            if matches!(source.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded))
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            // Keep the kind (a full disk is told apart from other faults).
            sled::Error::Io(source) => StoreError::Io {
                context: "the store's database".into(),
                source,
            },
            e => StoreError::Backend(e.to_string()),
        }
    }
}
