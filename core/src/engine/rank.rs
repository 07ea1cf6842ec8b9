//! How verified versions of one round are ordered, so that every node
//! settles on the same one.

use super::*;

/// How verified versions of one round are ordered: merges of branches
/// and mixes of regions (several parents) first, more parents first, then more distinct authors aggregated, then the
/// smaller digest of the parameters' chunk ids. A total order that every
/// node computes alike from a verified version (a merge outranks the
/// versions it merged, so the nodes that did not merge move on to it).
/// Only verified versions are ranked: a count of authors is a count of
/// admitted deltas of distinct authors, not of ids a manifest lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionRank {
    pub(super) merge: usize,
    pub(super) authors: usize,
    pub(super) params: ContentId,
    pub(super) author: NodeId,
}

impl Default for VersionRank {
    /// Below every real version.
    fn default() -> Self {
        Self {
            merge: 0,
            authors: 0,
            params: ContentId::from_bytes([0xff; 32]),
            author: NodeId::from_bytes([0xff; 32]),
        }
    }
}

impl PartialOrd for VersionRank {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for VersionRank {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.merge
            .cmp(&other.merge)
            .then_with(|| self.authors.cmp(&other.authors))
            .then_with(|| other.params.cmp(&self.params))
            // Equal parameters signed by several nodes (every node that
            // closed the round alike): the smallest signer's, so the
            // region settles on one id without anyone retraining.
            .then_with(|| other.author.cmp(&self.author))
    }
}

/// The digest naming a version's parameters: BLAKE3 over its chunk ids.
/// Versions with equal parameters (and chunking) have equal digests,
/// whoever signed them.
pub fn params_digest(m: &ModelManifest) -> ContentId {
    let ids: Vec<u8> = m.chunk_ids.iter().flat_map(|c| *c.as_bytes()).collect();
    ContentId::of(&ids)
}

/// The rank of a version among versions of its round, given the number of
/// distinct authors of the deltas it aggregates (known once it is verified;
/// the number of deltas it names is an upper bound).
pub fn version_rank(m: &ModelManifest, authors: usize) -> VersionRank {
    VersionRank {
        merge: if m.parents.len() > 1 {
            m.parents.len()
        } else {
            0
        },
        authors,
        params: params_digest(m),
        author: m.author,
    }
}
