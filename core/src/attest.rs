//! Attestations: in a permissioned region, a version that a node cannot
//! recompute (its deltas are gone, or it is further ahead than the node
//! recomputes) may still be adopted when enough distinct roster members
//! vouch for it — never on one member's word.
//!
//! An attestation rides on what exists: it is the version's own manifest
//! (round, parents, deltas, parameter chunk ids) re-signed by another
//! member as its author, which is what that member would have signed had
//! it closed the round itself. A member attests only versions it verified
//! by recomputation or made, not ones it took on attestations.

use std::collections::BTreeSet;

use tapestry_protocol::{Keypair, ModelManifest, NodeId, Signed, Verified};

/// Fewest distinct vouchers a version needs, whatever is configured: one
/// member's word is never enough.
pub const MIN_VOUCHERS: usize = 2;

/// `key`'s attestation of version `v`: the same manifest, signed by `key`
/// as its author. `None` if signing fails.
pub fn attest(v: &ModelManifest, key: &Keypair) -> Option<Verified<ModelManifest>> {
    let mut m = v.clone();
    m.author = key.node_id();
    Signed::sign(m, key).ok()
}

/// Whether `a` attests `v`: every field but the author is equal.
pub fn attests(a: &ModelManifest, v: &ModelManifest) -> bool {
    a.author != v.author && {
        let mut same = a.clone();
        same.author = v.author;
        same == *v
    }
}

/// The distinct roster members vouching for `v`: its author, if a member,
/// and the signers of those `attestations` that attest it and are members.
pub fn vouchers(
    v: &Verified<ModelManifest>,
    attestations: &[Verified<ModelManifest>],
    members: &BTreeSet<NodeId>,
) -> BTreeSet<NodeId> {
    std::iter::once(v.message().author)
        .chain(
            attestations
                .iter()
                .filter(|a| attests(a.message(), v.message()))
                .map(|a| a.message().author),
        )
        .filter(|n| members.contains(n))
        .collect()
}

/// How many vouchers a version needs in a region of `roster` members:
/// `configured`, or (0) more than a third of the roster; never fewer than
/// [`MIN_VOUCHERS`].
pub fn threshold(roster: usize, configured: usize) -> usize {
    let t = if configured == 0 {
        roster / 3 + 1
    } else {
        configured
    };
    t.max(MIN_VOUCHERS)
}

/// Catch-up on attestations: of the versions peers offer, the one of the
/// latest round (then the smallest id, so every node picks alike) that at
/// least `threshold` distinct members of `members` vouch for, with its
/// number of vouchers. Versions short of the threshold are passed over
/// however far ahead they claim to be.
pub fn best_vouched<'a>(
    offers: &'a [Verified<ModelManifest>],
    attestations: &[Verified<ModelManifest>],
    members: &BTreeSet<NodeId>,
    threshold: usize,
) -> Option<(&'a Verified<ModelManifest>, usize)> {
    offers
        .iter()
        .map(|v| (v, vouchers(v, attestations, members).len()))
        .filter(|(_, n)| *n >= threshold.max(MIN_VOUCHERS))
        .max_by(|(a, _), (b, _)| {
            (a.message().round, std::cmp::Reverse(a.id()))
                .cmp(&(b.message().round, std::cmp::Reverse(b.id())))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapestry_protocol::{ContentId, DType, TensorSpec};

    fn key(b: u8) -> Keypair {
        Keypair::from_secret_bytes(&[b; 32])
    }

    fn version(author: &Keypair, round: u64) -> Verified<ModelManifest> {
        let m = ModelManifest {
            model_id: "m".into(),
            region: "r".into(),
            round,
            author: author.node_id(),
            layout: vec![TensorSpec {
                name: "w".into(),
                shape: vec![2],
                dtype: DType::F32,
            }],
            payload_bytes: 8,
            chunk_size: 4096,
            chunk_ids: vec![ContentId::of(&[0; 8])],
            parents: vec![ContentId::of(b"parent")],
            deltas: vec![ContentId::of(b"delta")],
            created_unix_ms: 0,
        };
        Signed::sign(m, author).unwrap()
    }

    #[test]
    fn distinct_members_attesting_the_same_version_are_counted_once_each() {
        let (a, b, c, outsider) = (key(1), key(2), key(3), key(4));
        let members: BTreeSet<NodeId> = [&a, &b, &c].iter().map(|k| k.node_id()).collect();
        let v = version(&a, 7);
        let by_b = attest(v.message(), &b).unwrap();
        assert!(attests(by_b.message(), v.message()));
        let other_round = attest(version(&a, 8).message(), &c).unwrap();
        let by_outsider = attest(v.message(), &outsider).unwrap();
        let vs = vouchers(
            &v,
            &[by_b.clone(), by_b, other_round, by_outsider],
            &members,
        );
        // The author and b; c attested another version, the outsider is
        // not on the roster, b's second copy counts once.
        assert_eq!(vs, [a.node_id(), b.node_id()].into_iter().collect());
        // The version itself is no attestation of itself.
        assert!(!attests(v.message(), v.message()));
    }

    #[test]
    fn a_version_whose_parameters_differ_is_not_attested() {
        let (a, b) = (key(1), key(2));
        let v = version(&a, 7);
        let mut m = v.message().clone();
        m.chunk_ids = vec![ContentId::of(&[1; 8])];
        let forged = attest(&m, &b).unwrap();
        assert!(!attests(forged.message(), v.message()));
    }

    #[test]
    fn catch_up_takes_the_furthest_version_enough_members_vouch_for() {
        let keys: Vec<Keypair> = (1..=6).map(key).collect();
        let members: BTreeSet<NodeId> = keys.iter().map(|k| k.node_id()).collect();
        let honest = version(&keys[0], 7);
        let newer = version(&keys[1], 8);
        let jump = version(&keys[5], u64::MAX - 1);
        // Three members hold round 7, one has just made round 8, and the
        // liar's round jump is attested by itself alone.
        let attestations = vec![
            attest(honest.message(), &keys[2]).unwrap(),
            attest(honest.message(), &keys[3]).unwrap(),
        ];
        let offers = vec![honest.clone(), newer.clone(), jump.clone()];
        let (v, n) = best_vouched(&offers, &attestations, &members, 3).unwrap();
        assert_eq!((v.id(), n), (honest.id(), 3));
        // Once round 8 has enough vouchers, it is the one.
        let mut more = attestations.clone();
        more.push(attest(newer.message(), &keys[4]).unwrap());
        let (v, _) = best_vouched(&offers, &more, &members, 2).unwrap();
        assert_eq!(v.id(), newer.id());
        // Nobody vouched enough: nothing is taken.
        assert!(best_vouched(&offers, &[], &members, 2).is_none());
        assert!(
            best_vouched(&[jump], &[], &members, 1).is_none(),
            "never one word"
        );
    }

    #[test]
    fn one_member_is_never_enough() {
        assert_eq!(threshold(3, 0), 2);
        assert_eq!(threshold(9, 0), 4);
        assert_eq!(threshold(2, 0), 2);
        assert_eq!(threshold(9, 1), 2);
        assert_eq!(threshold(9, 6), 6);
    }
}
