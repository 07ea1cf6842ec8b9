//! The agreement policy: what a node does with a peer's model version —
//! whether to look at it at all, and once it is verified
//! ([`super::verify`]), whether to adopt it, merge it, remember it for the
//! round this node is closing, or leave it. The real node and the simulator
//! both decide here; only fetching differs.

use tapestry_protocol::{ContentId, ModelManifest, Verified};

use super::engine::{Engine, EngineConfig, Input, version_rank};
use super::verify::{self, BRANCH_WINDOW, Lineage, Split};

/// Whether a peer's version (its manifest alone known, not yet verified)
/// could matter to this node, so that verifying it is worth the work: the
/// next round's (remembered for when this node closes its own), one the
/// engine would adopt if it checks out, a recent merge (it may hold work
/// this node lacks), a recent older one, or one of this node's round on
/// other parents (the fork choice may prefer either: it weighs branches
/// before ranks, so a rival branch's version that ranks lower may still
/// win, and a node that never looked at it would stay apart for good).
pub fn worth_verifying(engine: &Engine, m: &ModelManifest) -> bool {
    let own = engine.round();
    let recent = m.round.saturating_add(BRANCH_WINDOW) >= own;
    m.round == own.saturating_add(1)
        || engine.would_adopt(m)
        || (recent && m.parents.len() > 1)
        || (recent && m.round < own)
        || (m.round == own && m.parents.as_slice() != engine.head_parents())
}

/// How a verified version relates to this node's head.
#[derive(Debug, Clone)]
pub struct Assessment {
    /// Distinct authors of the deltas it aggregates.
    pub authors: usize,
    /// Deltas in its recent lineage (never to be aggregated again on it).
    pub used: Vec<ContentId>,
    /// The head it was compared with.
    pub head: Option<ContentId>,
    /// If it and the head are branches that grew apart: how.
    pub split: Option<Split>,
    /// Weights of the head and of it since their lineages parted
    /// ([`verify::fork_weights`]).
    pub fork: Option<(usize, usize)>,
    /// Whether enough of the members seen recently back it to jump more
    /// than one round ahead ([`verify::catch_up_backed`]).
    pub backed: bool,
    /// Its parent's parameters, when the outer step has momentum and it is
    /// a plain version: what the step after it continues
    /// ([`verify::previous_step_parent`]).
    pub previous: Option<std::sync::Arc<Vec<f32>>>,
}

impl Assessment {
    /// A version taken on the attestations of `vouchers` distinct roster
    /// members ([`super::attest`]): its lineage is not held, so there is
    /// nothing to weigh or split; it ranks by its vouchers and is backed.
    pub fn attested(head: Option<ContentId>, vouchers: usize) -> Assessment {
        Assessment {
            authors: vouchers,
            used: Vec::new(),
            head,
            split: None,
            fork: None,
            backed: true,
            previous: None,
        }
    }
}

/// Compares a verified version with this node's verified head; `authors`:
/// the distinct authors of its deltas, as verification found them
/// ([`verify::Checked::authors`]).
pub fn assess(
    l: &impl Lineage,
    cfg: &EngineConfig,
    head: Option<ContentId>,
    target: &Verified<ModelManifest>,
    authors: usize,
) -> Assessment {
    let m = target.message();
    let used = verify::recent_deltas(l, target.id(), m.round.saturating_sub(cfg.door.staleness))
        .into_iter()
        .collect();
    let head = head.filter(|h| *h != target.id() && l.is_verified(h));
    let split = head
        .and_then(|h| l.model(&h))
        .and_then(|hm| verify::branch_split(l, cfg, &hm, target));
    let (fork, backed) = match head {
        Some(h) => {
            let w = verify::fork_weights(l, h, target.id());
            let recent = verify::recent_authors(l, h);
            (
                Some((w.a, w.b)),
                verify::catch_up_backed(w.b_authors.len(), recent),
            )
        }
        None => (None, true),
    };
    let previous = verify::previous_step_parent(cfg, m)
        .and_then(|p| l.held_params(&p))
        .map(std::sync::Arc::new);
    Assessment {
        authors,
        used,
        head,
        split,
        fork,
        backed,
        previous,
    }
}

/// What to do with a verified version.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Feed the engine this input (adopt, or merge with the head).
    Feed(Box<Input>),
    /// The next round's version, without this node's delta for the round:
    /// keep it, with its rank, for when this node closes its own round.
    Remember(super::engine::VersionRank),
    /// Nothing: not preferred.
    Leave,
    /// It was weighed against a head that is no longer this node's (the
    /// head moved while it was being verified): weigh it again against the
    /// head now. Left alone, a version verified once is never offered to
    /// the engine again, and two nodes can stay on different heads.
    Reassess,
}

impl Decision {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Decision::Feed(input) => match input.as_ref() {
                Input::BranchOffered { .. } => "merge",
                _ => "adopt",
            },
            Decision::Remember(_) => "remember",
            Decision::Leave => "leave",
            Decision::Reassess => "reassess",
        }
    }
}

/// The decision about a verified version `v` with parameters `params`.
pub fn decide(
    engine: &Engine,
    v: Verified<ModelManifest>,
    params: std::sync::Arc<Vec<f32>>,
    a: Assessment,
) -> Decision {
    let m = v.message();
    let own = engine.round();
    let head = engine.version();
    if a.head.is_some() && a.head != head {
        return Decision::Reassess;
    }
    let preferred =
        engine.prefers(m, a.authors, a.fork) && (m.round <= own.saturating_add(1) || a.backed);
    // Grown apart from this node's head (a partition)? Then merge rather
    // than adopt (which would lose this side's work) or leave it (which
    // would lose the other side's).
    if let (Some(split), Some(against)) = (a.split, head) {
        let merge = if m.round >= own {
            preferred && split.b_lacks
        } else {
            split.a_lacks
        };
        if merge {
            return Decision::Feed(Box::new(Input::BranchOffered {
                manifest: v,
                params,
                against,
                weights: split.weights,
                used: a.used,
            }));
        }
    }
    if m.round == own.saturating_add(1) {
        if preferred && engine.holds_own_vote(m) {
            // It already holds this node's work for the round: take it now
            // rather than wait to close the round here.
            return Decision::Feed(Box::new(Input::ModelOffered {
                manifest: v,
                params,
                previous: a.previous,
                authors: a.authors,
                used: a.used,
                fork: a.fork,
            }));
        }
        return Decision::Remember(version_rank(m, a.authors));
    }
    if preferred {
        Decision::Feed(Box::new(Input::ModelOffered {
            manifest: v,
            params,
            previous: a.previous,
            authors: a.authors,
            used: a.used,
            fork: a.fork,
        }))
    } else {
        Decision::Leave
    }
}
