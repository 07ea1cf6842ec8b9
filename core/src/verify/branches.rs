//! Branches and forks: whether two verified versions are branches that grew
//! apart (a partition) and how to weigh them for a merge, how much work
//! each side of a fork holds, and whether enough recent members back a
//! jump ahead.

use super::*;

/// How two verified versions' lineages relate, when they are branches that
/// grew apart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Split {
    /// Merge weights of `a` and `b`: the distinct authors of each side's
    /// deltas in the compared window (verified deltas only, one vote per
    /// author, so a side weighs what its members did, whatever it claims).
    pub weights: (f64, f64),
    /// Some author's deltas of [`BRANCH_ROUNDS`] rounds or more are in `b`
    /// and missing from `a`: adopting `b` instead of merging loses nothing
    /// of `a`'s, keeping `a` loses `b`'s work.
    pub a_lacks: bool,
    /// The same the other way round.
    pub b_lacks: bool,
}

/// Whether `a` and `b` are branches that grew apart (a partition), and
/// how. In broadcast mode lineages of one region always differ by a few
/// deltas scattered over authors and rounds (nodes that closed a round on
/// different sets gave way to one of them); a partition is different: for
/// rounds on end, the other side's authors are missing altogether. So, over
/// the [`BRANCH_WINDOW`] rounds before the earlier of the two (looked for
/// two rounds either side), the rounds in which an author's deltas are in
/// one lineage and not in the other. `None` when neither side lacks
/// [`BRANCH_ROUNDS`] rounds of one author, when a lineage is not held, or
/// when a side has fewer than `min_branch_authors` distinct authors (one
/// member alone cannot pass its own line off as a branch). Symmetric, and
/// computed alike by every node that verified both.
pub fn branch_split(
    l: &impl Lineage,
    cfg: &EngineConfig,
    a: &Verified<ModelManifest>,
    b: &Verified<ModelManifest>,
) -> Option<Split> {
    if a.id() == b.id() {
        return None;
    }
    let hi = a.message().round.min(b.message().round);
    let lo = hi.saturating_sub(BRANCH_WINDOW);
    let wide_hi = hi.saturating_add(3);
    let a_wide = window_deltas(l, a.id(), lo.saturating_sub(2), wide_hi);
    let b_wide = window_deltas(l, b.id(), lo.saturating_sub(2), wide_hi);
    let within = |m: &BTreeMap<ContentId, u64>| -> BTreeMap<ContentId, u64> {
        m.iter()
            .filter(|(_, r)| (lo..hi).contains(*r))
            .map(|(d, r)| (*d, *r))
            .collect()
    };
    let (a_in, b_in) = (within(&a_wide), within(&b_wide));
    if a_in.is_empty() || b_in.is_empty() {
        return None;
    }
    let worst = |lost: BTreeMap<NodeId, BTreeSet<u64>>| lost.values().map(BTreeSet::len).max();
    let a_lacks = worst(missing_by_author(l, &b_in, &a_wide)).unwrap_or(0) >= BRANCH_ROUNDS;
    let b_lacks = worst(missing_by_author(l, &a_in, &b_wide)).unwrap_or(0) >= BRANCH_ROUNDS;
    if !(a_lacks || b_lacks) {
        return None;
    }
    let (na, nb) = (authors_of(l, &a_in).len(), authors_of(l, &b_in).len());
    if na < cfg.door.min_branch_authors || nb < cfg.door.min_branch_authors {
        return None;
    }
    Some(Split {
        weights: (na as f64, nb as f64),
        a_lacks,
        b_lacks,
    })
}

/// The versions in the verified lineage of `v` down to round `lo`.
pub(super) fn ancestry(
    l: &impl Lineage,
    v: ContentId,
    lo: u64,
) -> BTreeMap<ContentId, Verified<ModelManifest>> {
    let mut out = BTreeMap::new();
    let mut queue = vec![v];
    let region = region_of(l, &v);
    while let Some(id) = queue.pop() {
        if out.len() >= MAX_WALK || out.contains_key(&id) || !l.is_verified(&id) {
            continue;
        }
        let Some(m) = l.model(&id) else { continue };
        if m.message().round < lo || Some(&m.message().region) != region.as_ref() {
            continue;
        }
        queue.extend(m.message().parents.iter().copied());
        out.insert(id, m);
    }
    out
}

/// How much each of two verified versions is backed since their lineages
/// parted: over the versions of one lineage and not the other (walked back
/// to [`BRANCH_WINDOW`] rounds before the earlier of the two), the sum of
/// each version's distinct authors — one vote per author per version, so
/// a line weighs the votes cast for it, whatever ids its manifests list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkWeights {
    /// The weight of `a`'s side.
    pub a: usize,
    /// The weight of `b`'s side.
    pub b: usize,
    /// The distinct authors on `b`'s side.
    pub b_authors: BTreeSet<NodeId>,
}

/// The fork choice's weights of `a` and `b` ([`ForkWeights`]).
pub fn fork_weights(l: &impl Lineage, a: ContentId, b: ContentId) -> ForkWeights {
    let round = |id: &ContentId| l.model(id).map_or(0, |m| m.message().round);
    let lo = round(&a).min(round(&b)).saturating_sub(BRANCH_WINDOW);
    let (aa, bb) = (ancestry(l, a, lo), ancestry(l, b, lo));
    let side = |mine: &BTreeMap<ContentId, Verified<ModelManifest>>,
                other: &BTreeMap<ContentId, Verified<ModelManifest>>| {
        let mut weight = 0;
        let mut all = BTreeSet::new();
        for (_, m) in mine.iter().filter(|(id, _)| !other.contains_key(id)) {
            let authors: BTreeSet<NodeId> = m
                .message()
                .deltas
                .iter()
                .filter_map(|d| l.delta_author(d))
                .collect();
            weight += authors.len();
            all.extend(authors);
        }
        (weight, all)
    };
    let ((wa, _), (wb, b_authors)) = (side(&aa, &bb), side(&bb, &aa));
    ForkWeights {
        a: wa,
        b: wb,
        b_authors,
    }
}

/// Distinct authors of the deltas in `head`'s verified lineage over the
/// last [`BRANCH_WINDOW`] rounds: the members this node saw contribute.
pub fn recent_authors(l: &impl Lineage, head: ContentId) -> usize {
    let round = l.model(&head).map_or(0, |m| m.message().round);
    let window = window_deltas(
        l,
        head,
        round.saturating_sub(BRANCH_WINDOW),
        round.saturating_add(1),
    );
    authors_of(l, &window).len()
}

/// The fork choice between this node's head and a verified version: the
/// version is preferred if it weighs more since the two parted
/// ([`fork_weights`]), then if it is of a later round, then by
/// [`crate::engine::version_rank`] (the engine applies this). A version
/// that jumps more than one round ahead must besides be backed by at
/// least half of the members this node saw contribute recently
/// ([`recent_authors`]), so one member cannot pull a node onto a line of
/// its own that extends the node's head, however many rounds it claims.
pub fn catch_up_backed(theirs: usize, recent: usize) -> bool {
    theirs >= recent.div_ceil(2).max(1)
}
