//! Admission: what a gossiped announcement must be before anything else looks
//! at it (its size, its signed envelope, its author's place on the roster),
//! and the one place where every reason a peer's message is refused — these,
//! the door's ([`crate::door::Rejection`]) and verification's
//! ([`VersionRejection`]) — becomes a gossip verdict and a metric label.

use std::fmt;

use tapestry_protocol::{
    DecodeError, DeltaManifest, ModelManifest, NodeId, Roster, Signed, Verified,
};

use crate::door::Rejected;
use crate::verify::VersionRejection;

/// Largest announcement (a signed delta or model manifest) admitted: a
/// signed manifest of a delta of a few billion parameters is about 300 KiB.
pub const MAX_ANNOUNCEMENT_BYTES: usize = 512 << 10;

/// What gossip should do with a message: forward it, drop it quietly, or
/// drop it and count it against the peer that forwarded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Valid and useful: forward it.
    Accept,
    /// Not wrong, but not worth forwarding (a duplicate, a version this node
    /// does not need).
    Ignore,
    /// Invalid: drop it and penalise the forwarder.
    Reject,
}

/// Why a peer's announcement, delta or model version was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    /// Larger than [`MAX_ANNOUNCEMENT_BYTES`].
    Oversized {
        /// Its length.
        bytes: usize,
    },
    /// The signed envelope did not open: malformed, forged, or invalid on
    /// its own terms.
    Envelope(DecodeError),
    /// In a permissioned region, an author not on the roster.
    NotInRoster(NodeId),
    /// In a permissioned region, a request from a peer not on the roster
    /// (named as the network names it).
    Outsider(String),
    /// A delta that failed the door.
    Delta(Rejected),
    /// A model version that failed its checks or its recomputation.
    Version(VersionRejection),
}

impl Rejection {
    /// A short, stable label for metrics (`deltas_rejected{reason=...}`).
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::Oversized { .. } => "oversized",
            Rejection::Envelope(e) => match e {
                DecodeError::BadSignature | DecodeError::InvalidKey => "bad_signature",
                DecodeError::TooLarge { .. } => "oversized",
                DecodeError::Invalid(_) => "invalid",
                _ => "malformed",
            },
            Rejection::NotInRoster(_) | Rejection::Outsider(_) => "not_in_roster",
            Rejection::Delta(r) => r.reason.label(),
            Rejection::Version(r) => r.label(),
        }
    }

    /// What gossip does with a message refused for this reason. Every
    /// refusal is the sender's fault today (a stale delta too: honest peers
    /// forward only deltas they admitted, within the same window).
    pub fn verdict(&self) -> Verdict {
        match self {
            Rejection::Oversized { .. }
            | Rejection::Envelope(_)
            | Rejection::NotInRoster(_)
            | Rejection::Outsider(_)
            | Rejection::Delta(_)
            | Rejection::Version(_) => Verdict::Reject,
        }
    }

    /// The labels a node's metrics start at zero, so their series exist
    /// (and rates work) before the first rejection.
    pub const USUAL_LABELS: [&'static str; 12] = [
        "bad_signature",
        "malformed",
        "oversized",
        "not_in_roster",
        "replay",
        "stale",
        "non_finite",
        "corrupt_chunk",
        "duplicate_author_round",
        "version_mismatch",
        "unknown_delta",
        "round_jump",
    ];
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Oversized { bytes } => write!(
                f,
                "announcement of {bytes} bytes (at most {MAX_ANNOUNCEMENT_BYTES})"
            ),
            Rejection::Envelope(e) => write!(f, "announcement does not open: {e}"),
            Rejection::NotInRoster(id) => write!(f, "author {} is not on the roster", id.short()),
            Rejection::Outsider(peer) => write!(f, "peer {peer} is not on the roster"),
            Rejection::Delta(r) => r.fmt(f),
            Rejection::Version(r) => r.fmt(f),
        }
    }
}

impl From<Rejected> for Rejection {
    fn from(r: Rejected) -> Self {
        Rejection::Delta(r)
    }
}

impl From<VersionRejection> for Rejection {
    fn from(r: VersionRejection) -> Self {
        Rejection::Version(r)
    }
}

/// Whether the roster (if the region has one) admits `author`.
pub fn on_roster(roster: Option<&Roster>, author: &NodeId) -> bool {
    roster.is_none_or(|r| r.members.binary_search(author).is_ok())
}

/// Opens an announced delta manifest: size, envelope, roster. What the
/// manifest says is then for the door ([`crate::door::Door`]) and the engine.
pub fn open_delta(
    data: &[u8],
    roster: Option<&Roster>,
) -> Result<Verified<DeltaManifest>, Rejection> {
    let m = open::<DeltaManifest>(data)?;
    admit(m, roster, |m| m.author)
}

/// Opens an announced model manifest: size, envelope, roster. What the
/// version claims is then for [`crate::verify`] and [`crate::heads`].
pub fn open_version(
    data: &[u8],
    roster: Option<&Roster>,
) -> Result<Verified<ModelManifest>, Rejection> {
    let m = open::<ModelManifest>(data)?;
    admit(m, roster, |m| m.author)
}

fn open<T: tapestry_protocol::SignedMessage>(data: &[u8]) -> Result<Verified<T>, Rejection> {
    if data.len() > MAX_ANNOUNCEMENT_BYTES {
        return Err(Rejection::Oversized { bytes: data.len() });
    }
    Signed::<T>::open(data).map_err(Rejection::Envelope)
}

fn admit<T: tapestry_protocol::SignedMessage>(
    m: Verified<T>,
    roster: Option<&Roster>,
    author: impl Fn(&T) -> NodeId,
) -> Result<Verified<T>, Rejection> {
    let author = author(m.message());
    if on_roster(roster, &author) {
        Ok(m)
    } else {
        Err(Rejection::NotInRoster(author))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapestry_protocol::{Codec, DType, Keypair, TensorSpec};

    fn delta(key: &Keypair) -> Vec<u8> {
        let m = DeltaManifest {
            model_id: "m".into(),
            region: "r".into(),
            round: 1,
            base_version: tapestry_protocol::ContentId::of(b"base"),
            author: key.node_id(),
            seq: 1,
            codec: Codec::F32,
            layout: vec![TensorSpec {
                name: "w".into(),
                shape: vec![2],
                dtype: DType::F32,
            }],
            payload_bytes: 8,
            chunk_size: 1 << 16,
            chunk_ids: vec![tapestry_protocol::ContentId::of(b"chunk")],
            sample_count: 1,
            l2_norm: 1.0,
            created_unix_ms: 1,
        };
        Signed::sign(m, key)
            .map(|v| v.envelope_bytes().to_vec())
            .unwrap_or_default()
    }

    #[test]
    fn each_refusal_has_its_label_and_a_verdict() {
        let (a, b) = (
            Keypair::from_secret_bytes(&[1; 32]),
            Keypair::from_secret_bytes(&[2; 32]),
        );
        let bytes = delta(&a);
        assert!(open_delta(&bytes, None).is_ok());

        let roster = Roster {
            model_id: "m".into(),
            region: "r".into(),
            version: 1,
            members: vec![b.node_id()],
            created_unix_ms: 1,
        };
        let r = open_delta(&bytes, Some(&roster)).err();
        assert_eq!(r.as_ref().map(Rejection::label), Some("not_in_roster"));

        let mut forged = bytes.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        let r = open_delta(&forged, None).err();
        assert_eq!(r.as_ref().map(Rejection::label), Some("bad_signature"));

        let r = open_delta(&bytes[..bytes.len() / 2], None).err();
        assert_eq!(r.as_ref().map(Rejection::label), Some("malformed"));

        let huge = vec![0u8; MAX_ANNOUNCEMENT_BYTES + 1];
        let r = open_delta(&huge, None).err();
        assert_eq!(r.as_ref().map(Rejection::label), Some("oversized"));
        assert_eq!(r.map(|r| r.verdict()), Some(Verdict::Reject));

        // A delta manifest is not a model manifest.
        let r = open_version(&bytes, None).err();
        assert_eq!(r.as_ref().map(Rejection::label), Some("malformed"));
    }
}
