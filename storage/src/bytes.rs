//! [`Bytes`]: a stored value handed out without copying it.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

#[derive(Clone)]
enum Inner {
    Sled(sled::IVec),
    Shared(Arc<[u8]>),
    Owned(Arc<Vec<u8>>),
}

/// An immutable, cheaply cloned view of a stored value. Reading a chunk hands
/// out the backend's own buffer (sled's reference-counted `IVec`, or the
/// memory backend's `Arc<[u8]>`, or the buffer a chunk was read into from its pack),
/// so a large chunk is never held twice.
#[derive(Clone)]
pub struct Bytes {
    inner: Inner,
    start: usize,
}

impl Bytes {
    pub(crate) fn from_sled(v: sled::IVec) -> Self {
        Self {
            inner: Inner::Sled(v),
            start: 0,
        }
    }

    pub(crate) fn from_shared(v: Arc<[u8]>) -> Self {
        Self {
            inner: Inner::Shared(v),
            start: 0,
        }
    }

    pub(crate) fn from_vec(v: Vec<u8>) -> Self {
        Self {
            inner: Inner::Owned(Arc::new(v)),
            start: 0,
        }
    }

    /// The same buffer without its first `n` bytes (no copy).
    pub(crate) fn slice_from(&self, n: usize) -> Self {
        Self {
            inner: self.inner.clone(),
            start: (self.start + n).min(self.full().len()),
        }
    }

    fn full(&self) -> &[u8] {
        match &self.inner {
            Inner::Sled(v) => v,
            Inner::Shared(v) => v,
            Inner::Owned(v) => v,
        }
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.full()[self.start..]
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.len())
    }
}

impl PartialEq<[u8]> for Bytes {
    fn eq(&self, other: &[u8]) -> bool {
        **self == *other
    }
}
