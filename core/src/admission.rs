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

/// How far ahead of the receiver's clock an announcement's creation time
/// (`created_unix_ms`) may be: ten minutes covers clocks kept by NTP or
/// set by hand with care; a later time is a clock far off or a lie, and the
/// announcement is refused (not forwarded, at no cost to the forwarder,
/// who cannot know the receiver's clock). Times in the past are not
/// bounded: a version's lineage holds versions of any age.
pub const MAX_CLOCK_SKEW_MS: u64 = 10 * 60 * 1000;

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
    /// Signed at a time further ahead of this node's clock than
    /// [`MAX_CLOCK_SKEW_MS`].
    CreatedInTheFuture {
        /// The announcement's `created_unix_ms`.
        created_unix_ms: u64,
        /// This node's clock when it arrived.
        now_unix_ms: u64,
    },
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
            Rejection::CreatedInTheFuture { .. } => "created_in_the_future",
        }
    }

    /// What gossip does with a message refused for this reason: `Reject`
    /// (the forwarder loses score) only when the message is wrong on its
    /// own terms; `Ignore` (not forwarded, no penalty) when it is refused
    /// for what this node has seen or could fetch, which an honest
    /// forwarder cannot know (see [`crate::door::Rejection::is_evident`],
    /// [`VersionRejection::is_evident`]).
    pub fn verdict(&self) -> Verdict {
        let evident = match self {
            Rejection::Oversized { .. }
            | Rejection::Envelope(_)
            | Rejection::NotInRoster(_)
            | Rejection::Outsider(_) => true,
            Rejection::Delta(r) => r.reason.is_evident(),
            Rejection::Version(r) => r.is_evident(),
            Rejection::CreatedInTheFuture { .. } => false,
        };
        if evident {
            Verdict::Reject
        } else {
            Verdict::Ignore
        }
    }

    /// Whether the message's author (not only its forwarder) is at fault:
    /// a delta or version that is wrong on its own terms, or an author
    /// that signed two deltas for one round (equivocation, proven by its
    /// own two signatures). The node lowers such an author's application
    /// score.
    pub fn blames_author(&self) -> bool {
        match self {
            Rejection::Delta(r) => {
                r.reason.is_evident()
                    || matches!(
                        r.reason,
                        crate::door::Rejection::DuplicateAuthorRound { .. }
                    )
            }
            Rejection::Version(r) => r.is_evident(),
            _ => false,
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
            Rejection::CreatedInTheFuture {
                created_unix_ms,
                now_unix_ms,
            } => write!(
                f,
                "created at {created_unix_ms} ms, {} s ahead of this node's clock (at most {} s)",
                created_unix_ms.saturating_sub(*now_unix_ms) / 1000,
                MAX_CLOCK_SKEW_MS / 1000
            ),
        }
    }
}

/// Whether a message created at `created_unix_ms` may be admitted by a node
/// whose clock reads `now_unix_ms`: not more than [`MAX_CLOCK_SKEW_MS`]
/// ahead of it.
pub fn check_created(created_unix_ms: u64, now_unix_ms: u64) -> Result<(), Rejection> {
    if created_unix_ms > now_unix_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(Rejection::CreatedInTheFuture {
            created_unix_ms,
            now_unix_ms,
        });
    }
    Ok(())
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

/// The gossip topic an announcement came on, which says what it must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// The deltas topic: a signed delta manifest.
    Deltas,
    /// The models topic: a signed model manifest.
    Models,
}

/// An announcement that passed admission.
#[derive(Debug, Clone)]
pub enum Announced {
    /// A delta manifest.
    Delta(Verified<DeltaManifest>),
    /// A model version's manifest.
    Version(Verified<ModelManifest>),
}

/// Opens many announcements at once, as [`open_delta`] and
/// [`open_version`] would one by one, with one batch signature check per
/// kind ([`tapestry_protocol::verify_batch`]: about twice the rate of
/// single checks; a batch with a bad signature falls back to checking
/// each), and a creation time checked against `now_unix_ms`
/// ([`check_created`]). Results come in the order of `items`.
pub fn open_all(
    items: Vec<(Topic, Vec<u8>)>,
    roster: Option<&Roster>,
    now_unix_ms: u64,
) -> Vec<Result<Announced, Rejection>> {
    let mut out: Vec<Option<Result<Announced, Rejection>>> = Vec::new();
    out.resize_with(items.len(), || None);
    let mut deltas = Vec::new();
    let mut models = Vec::new();
    for (k, (topic, data)) in items.into_iter().enumerate() {
        match topic {
            Topic::Deltas => match parse::<DeltaManifest>(data) {
                Ok(s) => deltas.push((k, s)),
                Err(r) => out[k] = Some(Err(r)),
            },
            Topic::Models => match parse::<ModelManifest>(data) {
                Ok(s) => models.push((k, s)),
                Err(r) => out[k] = Some(Err(r)),
            },
        }
    }
    let (at, signed): (Vec<usize>, Vec<_>) = deltas.into_iter().unzip();
    for (k, r) in at.into_iter().zip(tapestry_protocol::verify_batch(signed)) {
        out[k] = Some(
            r.map_err(Rejection::Envelope)
                .and_then(|m| admit(m, roster, |m| m.author))
                .and_then(|m| check_created(m.message().created_unix_ms, now_unix_ms).map(|()| m))
                .map(Announced::Delta),
        );
    }
    let (at, signed): (Vec<usize>, Vec<_>) = models.into_iter().unzip();
    for (k, r) in at.into_iter().zip(tapestry_protocol::verify_batch(signed)) {
        out[k] = Some(
            r.map_err(Rejection::Envelope)
                .and_then(|m| admit(m, roster, |m| m.author))
                .and_then(|m| check_created(m.message().created_unix_ms, now_unix_ms).map(|()| m))
                .map(Announced::Version),
        );
    }
    // Every slot was filled above: by its parse error or by its check.
    out.into_iter().flatten().collect()
}

fn parse<T: tapestry_protocol::SignedMessage>(data: Vec<u8>) -> Result<Signed<T>, Rejection> {
    if data.len() > MAX_ANNOUNCEMENT_BYTES {
        return Err(Rejection::Oversized { bytes: data.len() });
    }
    Signed::<T>::parse(data).map_err(Rejection::Envelope)
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
        delta_at(key, 1)
    }

    fn delta_at(key: &Keypair, created_unix_ms: u64) -> Vec<u8> {
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
            created_unix_ms,
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

    #[test]
    fn opening_many_at_once_finds_what_opening_one_by_one_finds() {
        let keys: Vec<Keypair> = (1..=6u8)
            .map(|k| Keypair::from_secret_bytes(&[k; 32]))
            .collect();
        let good: Vec<Vec<u8>> = keys.iter().map(delta).collect();
        let mut forged = good[1].clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        let roster = Roster {
            model_id: "m".into(),
            region: "r".into(),
            version: 1,
            members: {
                let mut m: Vec<NodeId> = keys[..5].iter().map(|k| k.node_id()).collect();
                m.sort();
                m
            },
            created_unix_ms: 1,
        };
        let items = vec![
            (Topic::Deltas, good[0].clone()),
            (Topic::Deltas, forged),
            (Topic::Models, good[2].clone()),
            (Topic::Deltas, vec![0u8; MAX_ANNOUNCEMENT_BYTES + 1]),
            (Topic::Deltas, good[3].clone()),
            (Topic::Deltas, good[5].clone()),
            (Topic::Deltas, good[4][..10].to_vec()),
        ];
        let one_by_one: Vec<Result<String, &str>> = items
            .iter()
            .map(|(topic, data)| match topic {
                Topic::Deltas => open_delta(data, Some(&roster))
                    .map(|m| m.id().to_string())
                    .map_err(|r| r.label()),
                Topic::Models => open_version(data, Some(&roster))
                    .map(|m| m.id().to_string())
                    .map_err(|r| r.label()),
            })
            .collect();
        let together: Vec<Result<String, &str>> = open_all(items, Some(&roster), 1)
            .into_iter()
            .map(|r| {
                r.map(|a| match a {
                    Announced::Delta(m) => m.id().to_string(),
                    Announced::Version(m) => m.id().to_string(),
                })
                .map_err(|r| r.label())
            })
            .collect();
        assert_eq!(together, one_by_one);
        let labels: Vec<&str> = together.iter().filter_map(|r| r.clone().err()).collect();
        assert_eq!(
            labels,
            [
                "bad_signature",
                "malformed",
                "oversized",
                "not_in_roster",
                "malformed"
            ]
        );
        assert_eq!(together.iter().filter(|r| r.is_ok()).count(), 2);
    }

    #[test]
    fn an_announcement_created_too_far_ahead_of_the_clock_is_refused() {
        let key = Keypair::from_secret_bytes(&[7; 32]);
        let now = 1_795_000_000_000;
        let opened = |created| {
            open_all(vec![(Topic::Deltas, delta_at(&key, created))], None, now)
                .remove(0)
                .err()
        };
        // Up to the bound ahead, and any time before: admitted.
        assert_eq!(opened(now + MAX_CLOCK_SKEW_MS), None);
        assert_eq!(opened(1), None);
        let r = opened(now + MAX_CLOCK_SKEW_MS + 1);
        assert_eq!(
            r.as_ref().map(Rejection::label),
            Some("created_in_the_future")
        );
        // The forwarder cannot know this node's clock: not its fault.
        assert_eq!(r.as_ref().map(Rejection::verdict), Some(Verdict::Ignore));
        assert_eq!(r.map(|r| r.blames_author()), Some(false));
        assert_eq!(check_created(u64::MAX, u64::MAX), Ok(()));
    }

    #[test]
    fn only_faults_a_message_proves_cost_its_forwarder() {
        use crate::door::Rejection as Door;
        let author = Keypair::from_secret_bytes(&[3; 32]).node_id();
        let delta = |reason| {
            Rejection::Delta(Rejected {
                sender: author,
                reason,
            })
        };
        // Wrong on its own terms: rejected, and the author is to blame.
        for r in [
            delta(Door::NonFinite { index: 3 }),
            delta(Door::NormMismatch {
                declared: 1.0,
                actual: 2.0,
            }),
            Rejection::Version(VersionRejection::Mismatch),
            Rejection::Version(VersionRejection::DeltaRejected(Rejected {
                sender: author,
                reason: Door::NonFinite { index: 0 },
            })),
        ] {
            assert_eq!(r.verdict(), Verdict::Reject, "{r}");
            assert!(r.blames_author(), "{r}");
        }
        // Wrong for this node now (its round, what it saw first, what it
        // could fetch): not forwarded, but no one's score suffers...
        for r in [
            delta(Door::Stale {
                round: 1,
                current: 5,
            }),
            delta(Door::FromTheFuture {
                round: 9,
                current: 1,
            }),
            delta(Door::Replay { seq: 1, last: 2 }),
            delta(Door::NormTooLarge {
                norm: 50.0,
                limit: 10.0,
            }),
            Rejection::Version(VersionRejection::UnknownDelta(
                tapestry_protocol::ContentId::of(b"x"),
            )),
            Rejection::Version(VersionRejection::TooFarBehind { limit: 8 }),
            Rejection::Version(VersionRejection::DeltaRejected(Rejected {
                sender: author,
                reason: Door::Stale {
                    round: 1,
                    current: 5,
                },
            })),
        ] {
            assert_eq!(r.verdict(), Verdict::Ignore, "{r}");
            assert!(!r.blames_author(), "{r}");
        }
        // ...except that two signed votes for one round prove the author
        // equivocated, whoever forwarded the second.
        let twice = delta(Door::DuplicateAuthorRound { round: 4 });
        assert_eq!(twice.verdict(), Verdict::Ignore);
        assert!(twice.blames_author());
        // Envelope faults are the forwarder's (it must check signatures).
        let forged = Rejection::Envelope(DecodeError::BadSignature);
        assert_eq!(forged.verdict(), Verdict::Reject);
        assert!(!forged.blames_author());
    }
}
