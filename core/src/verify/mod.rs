//! Checking a peer's model version by recomputation: nothing is adopted,
//! ranked or merged on one peer's word.
//!
//! A version of round R with parent P naming deltas D is what every node
//! would compute from P and D: the aggregation is deterministic (inputs in
//! the order of their ids, one thread, no node-local state), so a node that
//! holds P's parameters and D's payloads rebuilds the version and compares
//! the parameters' chunk ids bit for bit. Every delta in D passes the same
//! door as a gossiped one (scope, layout, round window, finite values,
//! declared norm, norm limit) and one author has one delta per round. A
//! merge of two branches is the weighted mean of two verified parents, with
//! weights every node derives alike from their verified lineages, and only
//! when the two really grew apart.
//!
//! The checks read history through [`Lineage`], which the node's chunk
//! store (and the simulator's memory) implements; what is missing comes back
//! as a [`Plan::Need`] for the shell to fetch, so this module does no IO.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use tapestry_protocol::{Codec, ContentId, DeltaManifest, ModelManifest, NodeId, Verified};

use crate::aggregate::{AggregateError, Held, PayloadSource, Values, fixed_width};
use crate::door::{Door, Rejected};
use crate::engine::EngineConfig;

mod branches;

pub use branches::{
    ForkWeights, Split, branch_split, catch_up_backed, fork_weights, recent_authors,
};

/// Most deltas one version may name (a version names one per author of its
/// round, and a few late ones).
pub const MAX_VERSION_DELTAS: usize = 1024;

/// Rounds back from the earlier of two versions over which their lineages
/// are compared to tell a partition from a same-round disagreement.
pub const BRANCH_WINDOW: u64 = 16;

/// Rounds in which one author's deltas must be missing from a lineage for
/// two branches to count as grown apart.
pub const BRANCH_ROUNDS: usize = 3;

/// Most manifests one walk over a lineage visits.
pub const MAX_WALK: usize = 16_384;

/// What a node holds of the region's history.
pub trait Lineage {
    /// A model manifest, verified or not.
    fn model(&self, id: &ContentId) -> Option<Verified<ModelManifest>>;
    /// A delta manifest.
    fn delta(&self, id: &ContentId) -> Option<Verified<DeltaManifest>>;
    /// Whether a delta's manifest is held (`None`: no) and, if so, every
    /// chunk of its payload too.
    fn delta_held(&self, id: &ContentId) -> Option<bool> {
        self.delta(id).map(|d| self.has_payload(&d))
    }
    /// A delta's author (lineage walks ask for nothing else).
    fn delta_author(&self, id: &ContentId) -> Option<NodeId> {
        self.delta(id).map(|d| d.message().author)
    }
    /// Whether every chunk of a delta's payload is held.
    fn has_payload(&self, d: &Verified<DeltaManifest>) -> bool;
    /// A delta's payload, if every chunk is held.
    fn payload(&self, d: &Verified<DeltaManifest>) -> Option<Vec<u8>>;
    /// A delta's payload to be read a range at a time where it is kept,
    /// rather than loaded whole ([`Lineage::payload`]): a store offers one
    /// for payloads of a fixed-width codec, so a recomputation holds none
    /// of its deltas in memory. `None` (the default): load it whole.
    fn payload_source(&self, d: &Verified<DeltaManifest>) -> Option<Box<dyn PayloadSource + '_>> {
        let _ = d;
        None
    }
    /// Whether this node verified the version (made it, recomputed it, or
    /// derived it: the genesis).
    fn is_verified(&self, id: &ContentId) -> bool;
    /// The parameters of a verified version.
    fn params(&self, id: &ContentId) -> Option<Vec<f32>>;
    /// The parameters of a version held here, verified or not, read from
    /// its chunks each checked against its manifest's ids: what a step with
    /// momentum needs of the version before its parent, whose bits the
    /// parent's manifest pins whatever that version's own standing (a
    /// parent taken on attestations has an unverified parent). The
    /// default: verified versions only.
    fn held_params(&self, id: &ContentId) -> Option<Vec<f32>> {
        self.params(id)
    }
    /// [`aggregate_onto_owned`] for a version with parent `parent` naming
    /// the deltas of `inputs` (`previous`: the parameters before the
    /// parent, for momentum). A pure function of them, so a lineage that sees
    /// the same aggregation asked for many times (the simulator: every node
    /// checks every version) may remember results; the default computes.
    fn aggregate(
        &self,
        cfg: &EngineConfig,
        parent: ContentId,
        parent_params: Vec<f32>,
        previous: Option<&[f32]>,
        inputs: &[DeltaInput<'_>],
    ) -> Result<Vec<f32>, AggregateError> {
        let _ = parent;
        aggregate_onto_owned(cfg, parent_params, previous, inputs)
    }
}

/// Why a peer's model version was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum VersionRejection {
    /// Another model or region.
    WrongScope,
    /// Malformed on its own terms (layout, sizes, parents, counts).
    Malformed(String),
    /// Its round does not follow its parent's, or is too far ahead.
    RoundJump {
        /// The version's round.
        round: u64,
        /// What it should have been (the parent's round + 1), or the
        /// furthest round accepted.
        expected: u64,
    },
    /// A parent that is not held and could not be had.
    UnknownParent(ContentId),
    /// A parentless version that is not the region's genesis.
    ForgedGenesis,
    /// A delta it names that could not be had.
    UnknownDelta(ContentId),
    /// A delta it names fails the door.
    DeltaRejected(Rejected),
    /// Two deltas of one author for one round.
    DuplicateAuthorRound {
        /// The author.
        author: NodeId,
        /// The round.
        round: u64,
    },
    /// A delta already aggregated into one of its recent ancestors.
    ReusedDelta(ContentId),
    /// A plain version that aggregates nothing.
    NoDeltas,
    /// A merge of two versions that did not grow apart (or one side too
    /// thin to be a branch).
    NotABranch,
    /// Recomputed parameters differ from the ones it claims.
    Mismatch,
    /// More unverified versions behind it than this node recomputes.
    TooFarBehind {
        /// The limit.
        limit: usize,
    },
    /// Verifying it would take more manifests, or more manifest bytes, than
    /// one verification may fetch.
    LineageTooLarge {
        /// Manifests fetched when the limit was reached.
        manifests: usize,
        /// Their bytes.
        bytes: usize,
    },
}

impl VersionRejection {
    /// Whether the version is wrong on its own terms — its manifest, the
    /// deltas it names and its lineage prove it to anyone who recomputes —
    /// rather than unverifiable here now (a parent or delta this node
    /// could not fetch, a round too far from this node's, a lineage longer
    /// than it recomputes, a delta refused for what this node has seen).
    /// Only evident faults cost the forwarder its gossip score: an honest
    /// peer that holds what this node could not fetch forwards in good
    /// faith.
    pub fn is_evident(&self) -> bool {
        match self {
            VersionRejection::WrongScope
            | VersionRejection::Malformed(_)
            | VersionRejection::ForgedGenesis
            | VersionRejection::DuplicateAuthorRound { .. }
            | VersionRejection::ReusedDelta(_)
            | VersionRejection::NoDeltas
            | VersionRejection::Mismatch => true,
            VersionRejection::DeltaRejected(r) => r.reason.is_evident(),
            VersionRejection::RoundJump { .. }
            | VersionRejection::UnknownParent(_)
            | VersionRejection::UnknownDelta(_)
            | VersionRejection::NotABranch
            | VersionRejection::TooFarBehind { .. }
            | VersionRejection::LineageTooLarge { .. } => false,
        }
    }

    /// A short, stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            VersionRejection::WrongScope => "wrong_scope",
            VersionRejection::Malformed(_) => "bad_version",
            VersionRejection::RoundJump { .. } => "round_jump",
            VersionRejection::UnknownParent(_) => "unknown_parent",
            VersionRejection::ForgedGenesis => "forged_genesis",
            VersionRejection::UnknownDelta(_) => "unknown_delta",
            VersionRejection::DeltaRejected(_) => "bad_delta_in_version",
            VersionRejection::DuplicateAuthorRound { .. } => "duplicate_author_round",
            VersionRejection::ReusedDelta(_) => "reused_delta",
            VersionRejection::NoDeltas => "no_deltas",
            VersionRejection::NotABranch => "not_a_branch",
            VersionRejection::Mismatch => "version_mismatch",
            VersionRejection::TooFarBehind { .. } => "too_far_behind",
            VersionRejection::LineageTooLarge { .. } => "lineage_too_large",
        }
    }

    /// Every label, for metrics that start at zero.
    pub const LABELS: [&'static str; 14] = [
        "wrong_scope",
        "bad_version",
        "round_jump",
        "unknown_parent",
        "forged_genesis",
        "unknown_delta",
        "bad_delta_in_version",
        "duplicate_author_round",
        "reused_delta",
        "no_deltas",
        "not_a_branch",
        "version_mismatch",
        "too_far_behind",
        "lineage_too_large",
    ];
}

impl fmt::Display for VersionRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VersionRejection::WrongScope => f.write_str("for another model or region"),
            VersionRejection::Malformed(m) => write!(f, "malformed: {m}"),
            VersionRejection::RoundJump { round, expected } => {
                write!(f, "round {round} where {expected} was expected")
            }
            VersionRejection::UnknownParent(id) => write!(f, "parent {} not to be had", id.short()),
            VersionRejection::ForgedGenesis => f.write_str("no parent, and not the genesis"),
            VersionRejection::UnknownDelta(id) => write!(f, "delta {} not to be had", id.short()),
            VersionRejection::DeltaRejected(r) => write!(f, "names a bad delta: {r}"),
            VersionRejection::DuplicateAuthorRound { author, round } => {
                write!(f, "two deltas of {} for round {round}", author.short())
            }
            VersionRejection::ReusedDelta(id) => {
                write!(f, "delta {} already in its lineage", id.short())
            }
            VersionRejection::NoDeltas => f.write_str("aggregates no delta"),
            VersionRejection::NotABranch => f.write_str("merges versions that did not grow apart"),
            VersionRejection::Mismatch => {
                f.write_str("its parameters are not its parent plus its deltas")
            }
            VersionRejection::TooFarBehind { limit } => {
                write!(f, "more than {limit} unverified versions behind it")
            }
            VersionRejection::LineageTooLarge { manifests, bytes } => write!(
                f,
                "its lineage is too large to fetch ({manifests} manifests, {bytes} bytes so far)"
            ),
        }
    }
}

/// One admitted delta, as aggregation sees it.
#[derive(Debug, Clone, Copy)]
pub struct DeltaInput<'a> {
    /// Its manifest id (the order of aggregation).
    pub id: ContentId,
    /// Its declared sample count (weighed per the region's weighting).
    pub sample_count: u64,
    /// Its values: decoded, or a payload decoded as aggregation reads it.
    pub values: Values<'a>,
}

/// The parameters of the version that aggregates `inputs` onto `parent`:
/// the region's rule over the inputs in the order of their ids, weighed by
/// the region's weighting, then the outer step. Deterministic and bit-exact
/// on every node and thread count: a fixed order, one thread, and no state
/// besides the versions. This is the step without a momentum term (a
/// parent that is the genesis or a merge, or an outer step without
/// momentum); [`aggregate_onto_owned`] takes the parameters before the
/// parent.
pub fn aggregate_onto(
    cfg: &EngineConfig,
    parent: &[f32],
    inputs: &[DeltaInput<'_>],
) -> Result<Vec<f32>, AggregateError> {
    aggregate_onto_owned(cfg, parent.to_vec(), None, inputs)
}

/// [`aggregate_onto`] on parent parameters it may consume (the outer step
/// is taken on them in place: one model's worth less held), with the
/// parameters of the parent's own parent for an outer step with momentum
/// ([`previous_step_parent`]; `None`: no momentum term).
pub fn aggregate_onto_owned(
    cfg: &EngineConfig,
    mut params: Vec<f32>,
    previous: Option<&[f32]>,
    inputs: &[DeltaInput<'_>],
) -> Result<Vec<f32>, AggregateError> {
    let mut sorted: Vec<&DeltaInput<'_>> = inputs.iter().collect();
    sorted.sort_by_key(|d| d.id);
    let values: Vec<Values<'_>> = sorted.iter().map(|d| d.values).collect();
    let weights: Vec<f64> = sorted
        .iter()
        .map(|d| cfg.door.weighting.weight(d.sample_count))
        .collect();
    let previous = previous.filter(|p| cfg.outer.has_momentum() && p.len() == params.len());
    // No node-local centre: clipping centres on the coordinate-wise median,
    // which every node computes alike.
    if values.iter().all(|v| v.len() == params.len()) {
        // The outer step taken block by block as the aggregate comes: the
        // aggregate is never held whole. The step is a function of each
        // coordinate alone, so this is the whole step, bit for bit.
        cfg.rule
            .aggregate_blocks(&values, &weights, None, |start, block| {
                let end = start + block.len();
                cfg.outer.step(
                    &mut params[start..end],
                    block,
                    previous.map(|p| &p[start..end]),
                );
            })?;
        return Ok(params);
    }
    let aggregate = cfg.rule.aggregate_values(&values, &weights, None)?;
    cfg.outer.step(&mut params, &aggregate, previous);
    Ok(params)
}

/// The version whose parameters an outer step with momentum needs to make
/// a child of `parent` (the parent's own parent), or `None` if the step
/// takes no momentum term: no momentum configured, or a parent that is
/// the genesis or a merge. A function of the lineage alone, so every node
/// takes the same step.
pub fn previous_step_parent(cfg: &EngineConfig, parent: &ModelManifest) -> Option<ContentId> {
    match parent.parents.as_slice() {
        [before] if cfg.outer.has_momentum() => Some(*before),
        _ => None,
    }
}

/// The parameters of the merge of two versions: their weighted mean, summed
/// in the order of the versions' ids.
pub fn merge_params(a: (ContentId, &[f32], f64), b: (ContentId, &[f32], f64)) -> Vec<f32> {
    let mut sides = [a, b];
    sides.sort_by_key(|s| s.0);
    let total = (sides[0].2 + sides[1].2) as f32;
    let (wa, wb) = (sides[0].2 as f32 / total, sides[1].2 as f32 / total);
    sides[0]
        .1
        .iter()
        .zip(sides[1].1)
        .map(|(x, y)| wa * x + wb * y)
        .collect()
}

/// Whether two versions are the same computation: the same model, region,
/// round, layout and chunking, the same deltas, over one parent each with
/// the same parameters (the same version, or two verified versions with
/// equal parameter chunk ids — nodes that close a round alike sign equal
/// parameters under different ids). Aggregation is deterministic, so two
/// such versions have equal parameters, whoever signed them: one
/// recomputation serves both, and if their chunk ids differ, one is wrong.
pub fn same_computation(l: &impl Lineage, a: &ModelManifest, b: &ModelManifest) -> bool {
    let parents = || match (a.parents.as_slice(), b.parents.as_slice()) {
        ([pa], [pb]) if pa == pb => true,
        ([pa], [pb]) => {
            l.is_verified(pa)
                && l.is_verified(pb)
                && matches!((l.model(pa), l.model(pb)),
                    (Some(x), Some(y)) if x.message().chunk_ids == y.message().chunk_ids)
        }
        _ => false,
    };
    a.model_id == b.model_id
        && a.region == b.region
        && a.round == b.round
        && a.layout == b.layout
        && a.payload_bytes == b.payload_bytes
        && a.chunk_size == b.chunk_size
        && a.deltas == b.deltas
        && parents()
}

/// Distinct authors of the deltas a version names, as far as their
/// manifests are held.
pub fn distinct_authors(l: &impl Lineage, m: &ModelManifest) -> usize {
    m.deltas
        .iter()
        .filter_map(|d| l.delta_author(d))
        .collect::<BTreeSet<_>>()
        .len()
}

/// The chunk ids of parameters cut at `chunk_size`: what a version's
/// manifest must name.
pub fn params_chunk_ids(params: &[f32], chunk_size: usize) -> Vec<ContentId> {
    let chunk_size = chunk_size.max(1);
    if !chunk_size.is_multiple_of(4) {
        let bytes = tapestry_protocol::f32_le_bytes(params);
        return bytes.chunks(chunk_size).map(ContentId::of).collect();
    }
    // One chunk's bytes at a time: no copy of the whole parameter vector.
    let mut buf = Vec::with_capacity(chunk_size);
    params
        .chunks(chunk_size / 4)
        .map(|c| {
            buf.clear();
            tapestry_protocol::write_f32_le(c, &mut buf);
            ContentId::of(&buf)
        })
        .collect()
}

/// Checks what a version's manifest alone can tell: scope, layout, sizes,
/// counts, and (against this node's head round) how far ahead it is.
pub fn check_shape(
    cfg: &EngineConfig,
    m: &ModelManifest,
    head_round: u64,
) -> Result<(), VersionRejection> {
    let bad = |s: &str| Err(VersionRejection::Malformed(s.to_owned()));
    if m.model_id != cfg.model_id || m.region != cfg.region {
        return Err(VersionRejection::WrongScope);
    }
    if m.layout != cfg.spec.layout() {
        return bad("tensor layout differs from the model's");
    }
    let n = cfg.spec.n_params() as u64;
    if m.payload_bytes != n * 4 {
        return bad("parameter bytes differ from the model's size");
    }
    if m.chunk_size as usize != cfg.chunk_size {
        return bad("chunk size differs from the region's");
    }
    if m.chunk_ids.len() as u64 != m.payload_bytes.div_ceil(u64::from(m.chunk_size)) {
        return bad("chunk count does not match the size");
    }
    if m.deltas.len() > MAX_VERSION_DELTAS {
        return bad("names too many deltas");
    }
    // A mix of regions has the own head and at most one head per
    // neighbouring region as parents ([`crate::federation`]).
    let most_parents = cfg
        .federation
        .as_ref()
        .map_or(2, |f| 1 + f.neighbours(&cfg.region).len())
        .max(2);
    match (m.parents.len(), m.deltas.is_empty()) {
        (1, false) => {}
        (n, true) if (2..=most_parents).contains(&n) => {}
        (0, _) => return Err(VersionRejection::ForgedGenesis),
        (1, true) => return Err(VersionRejection::NoDeltas),
        _ if most_parents > 2 => {
            return bad(
                "a version has one parent and deltas, or two parents (a merge) or the own and foreign heads (a mix of regions) and none",
            );
        }
        _ => return bad("a version has one parent and deltas, or two parents and none"),
    }
    if m.parents.iter().collect::<BTreeSet<_>>().len() != m.parents.len() {
        return bad("a merge of a version with itself");
    }
    let furthest = head_round.saturating_add(cfg.door.max_rounds_ahead);
    if m.round > furthest {
        return Err(VersionRejection::RoundJump {
            round: m.round,
            expected: furthest,
        });
    }
    Ok(())
}

/// Checks a parent's round against the version that names it, before
/// anything else of the parent is fetched: one round before a version
/// with one parent, at most the round of a merge. A made-up line whose
/// rounds do not step down is refused at its first wrong step.
/// `child` is the naming version's (round, number of parents).
pub fn check_parent_round(child: (u64, usize), parent_round: u64) -> Result<(), VersionRejection> {
    let (round, parents) = child;
    let fits = if parents >= 2 {
        parent_round <= round
    } else {
        parent_round.checked_add(1) == Some(round)
    };
    if fits {
        Ok(())
    } else {
        Err(VersionRejection::RoundJump {
            round,
            expected: parent_round.saturating_add(1),
        })
    }
}

/// What verifying a version needs next.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Fetch these, then plan again.
    Need {
        /// Model manifests (unverified ancestors).
        models: Vec<ContentId>,
        /// Delta manifests.
        deltas: Vec<ContentId>,
        /// Deltas whose manifest is held but not every chunk.
        payloads: Vec<Verified<DeltaManifest>>,
    },
    /// Everything is held: verify these versions in this order (parents
    /// before children; the offered version last).
    Ready(Vec<ContentId>),
}

/// Works out what verifying `target` takes: walks its unverified ancestry
/// back to versions this node verified, and lists what is missing. At most
/// `max_chain` unverified versions are walked.
pub fn plan(
    l: &impl Lineage,
    cfg: &EngineConfig,
    target: &Verified<ModelManifest>,
    max_chain: usize,
) -> Result<Plan, VersionRejection> {
    let (mut models, mut deltas, mut payloads) = (Vec::new(), Vec::new(), Vec::new());
    let mut order = Vec::new();
    let mut visited = BTreeSet::new();
    // Iterative post-order: (id, children pushed?).
    let mut stack: Vec<(ContentId, bool)> = vec![(target.id(), false)];
    while let Some((id, expanded)) = stack.pop() {
        if expanded {
            order.push(id);
            continue;
        }
        if l.is_verified(&id) || !visited.insert(id) {
            continue;
        }
        if visited.len() > max_chain {
            return Err(VersionRejection::TooFarBehind { limit: max_chain });
        }
        let manifest = if id == target.id() {
            Some(target.clone())
        } else {
            l.model(&id)
        };
        let Some(v) = manifest else {
            models.push(id);
            continue;
        };
        let m = v.message();
        if id != target.id() && m.region != cfg.region && m.model_id == cfg.model_id {
            // A foreign head a mix of regions names: taken on its region's
            // attestations by the shell before the mix can be checked, not
            // verified here (this region holds none of its deltas).
            return Err(VersionRejection::UnknownParent(id));
        }
        check_shape(cfg, m, u64::MAX - cfg.door.max_rounds_ahead)?;
        for d in &m.deltas {
            match l.delta_held(d) {
                None => deltas.push(*d),
                Some(false) => payloads.extend(l.delta(d)),
                Some(true) => {}
            }
        }
        stack.push((id, true));
        for p in &m.parents {
            stack.push((*p, false));
        }
    }
    if models.is_empty() && deltas.is_empty() && payloads.is_empty() {
        Ok(Plan::Ready(order))
    } else {
        Ok(Plan::Need {
            models,
            deltas,
            payloads,
        })
    }
}

/// A version that passed.
#[derive(Debug, Clone)]
pub struct Checked {
    /// Its parameters (recomputed).
    pub params: Vec<f32>,
    /// Distinct authors of the deltas it aggregates (what ranks it).
    pub authors: usize,
}

/// Verifies one version whose parents are verified and whose deltas are
/// held: the deltas pass the door, one per author and round, none already
/// in a recent ancestor, and recomputing gives its parameters exactly.
pub fn verify_version(
    l: &impl Lineage,
    cfg: &EngineConfig,
    door: &Door,
    v: &Verified<ModelManifest>,
) -> Result<Checked, VersionRejection> {
    let m = v.message();
    check_shape(cfg, m, u64::MAX - cfg.door.max_rounds_ahead)?;
    let parent = |id: &ContentId| -> Result<(Verified<ModelManifest>, Vec<f32>), VersionRejection> {
        if !l.is_verified(id) {
            return Err(VersionRejection::UnknownParent(*id));
        }
        let pm = l.model(id).ok_or(VersionRejection::UnknownParent(*id))?;
        let params = l.params(id).ok_or(VersionRejection::UnknownParent(*id))?;
        if params.len() != cfg.spec.n_params() {
            return Err(VersionRejection::UnknownParent(*id));
        }
        Ok((pm, params))
    };
    let foreign = m.parents.iter().any(|p| {
        l.model(p)
            .is_some_and(|pm| pm.message().region != cfg.region)
    });
    if !foreign && m.parents.len() > 2 {
        return Err(VersionRejection::Malformed(
            "more than two parents and none of another region".into(),
        ));
    }
    let (params, authors) = if foreign {
        (verify_mix(cfg, m, &parent)?, 0)
    } else if m.parents.len() == 2 {
        let (a, pa) = parent(&m.parents[0])?;
        let (b, pb) = parent(&m.parents[1])?;
        let round = a.message().round.max(b.message().round);
        if m.round != round {
            return Err(VersionRejection::RoundJump {
                round: m.round,
                expected: round,
            });
        }
        if is_ancestor(l, a.id(), &b) || is_ancestor(l, b.id(), &a) {
            return Err(VersionRejection::NotABranch);
        }
        let split = branch_split(l, cfg, &a, &b).ok_or(VersionRejection::NotABranch)?;
        if !(split.a_lacks || split.b_lacks) {
            return Err(VersionRejection::NotABranch);
        }
        let params = merge_params(
            (a.id(), &pa, split.weights.0),
            (b.id(), &pb, split.weights.1),
        );
        (params, 0)
    } else {
        let (p, pp) = parent(&m.parents[0])?;
        let expected = p
            .message()
            .round
            .checked_add(1)
            .ok_or(VersionRejection::RoundJump {
                round: m.round,
                expected: u64::MAX,
            })?;
        if m.round != expected {
            return Err(VersionRejection::RoundJump {
                round: m.round,
                expected,
            });
        }
        let recent = recent_deltas(l, p.id(), m.round.saturating_sub(cfg.door.staleness));
        let mut votes = BTreeSet::new();
        let mut ids = BTreeSet::new();
        let mut held: Vec<(ContentId, u64, Codec, Input<'_>)> = Vec::with_capacity(m.deltas.len());
        for d in &m.deltas {
            if !ids.insert(*d) {
                return Err(VersionRejection::Malformed("names a delta twice".into()));
            }
            if recent.contains(d) {
                return Err(VersionRejection::ReusedDelta(*d));
            }
            let dm = l.delta(d).ok_or(VersionRejection::UnknownDelta(*d))?;
            let dmm = dm.message();
            door.check_named_manifest(dmm, m.round)
                .map_err(VersionRejection::DeltaRejected)?;
            if !votes.insert((dmm.author, dmm.round)) {
                return Err(VersionRejection::DuplicateAuthorRound {
                    author: dmm.author,
                    round: dmm.round,
                });
            }
            // Read where it is kept a block at a time if the lineage can,
            // else loaded whole; decoded a block at a time either way.
            let input = match l
                .payload_source(&dm)
                .filter(|_| fixed_width(dmm.codec).is_some())
            {
                Some(source) => {
                    door.check_named_source(dmm, source.as_ref())
                        .map_err(|e| match e {
                            Some(r) => VersionRejection::DeltaRejected(r),
                            None => VersionRejection::UnknownDelta(*d),
                        })?;
                    Input::Stored(source)
                }
                None => {
                    let payload = l.payload(&dm).ok_or(VersionRejection::UnknownDelta(*d))?;
                    door.check_named_payload(dmm, &payload)
                        .map_err(VersionRejection::DeltaRejected)?;
                    Input::Held(Held::Encoded {
                        codec: dmm.codec,
                        payload: std::sync::Arc::new(payload),
                        len: door.n_values(),
                    })
                }
            };
            held.push((*d, dmm.sample_count, dmm.codec, input));
        }
        let n = door.n_values();
        let inputs: Vec<DeltaInput<'_>> = held
            .iter()
            .map(|(id, samples, codec, input)| DeltaInput {
                id: *id,
                sample_count: *samples,
                values: match input {
                    Input::Held(h) => h.values(),
                    Input::Stored(source) => Values::Stored {
                        codec: *codec,
                        source: source.as_ref(),
                        len: n,
                    },
                },
            })
            .collect();
        let mut order: Vec<ContentId> = held.iter().map(|(id, ..)| *id).collect();
        order.sort();
        let previous = match previous_step_parent(cfg, p.message()) {
            Some(before) => Some(
                l.held_params(&before)
                    .filter(|b| b.len() == cfg.spec.n_params())
                    .ok_or(VersionRejection::UnknownParent(before))?,
            ),
            None => None,
        };
        let params = l
            .aggregate(cfg, p.id(), pp, previous.as_deref(), &inputs)
            .map_err(|e| match e {
                // The store failed under us: nobody's fault.
                AggregateError::Read { index, .. } => {
                    VersionRejection::UnknownDelta(order.get(index).copied().unwrap_or(p.id()))
                }
                e => VersionRejection::Malformed(e.to_string()),
            })?;
        let authors: BTreeSet<NodeId> = votes.iter().map(|(a, _)| *a).collect();
        (params, authors.len())
    };
    if params_chunk_ids(&params, m.chunk_size as usize) != m.chunk_ids {
        return Err(VersionRejection::Mismatch);
    }
    Ok(Checked { params, authors })
}

/// Recomputes a mix of regions ([`crate::federation::mix`]): one parent is
/// a plain version of this region of the mix's round (verified here), the
/// others heads of neighbouring regions of the same round, at most one
/// each, taken by this node on their region's attestations (marked
/// verified by the shell).
fn verify_mix(
    cfg: &EngineConfig,
    m: &ModelManifest,
    parent: &impl Fn(&ContentId) -> Result<(Verified<ModelManifest>, Vec<f32>), VersionRejection>,
) -> Result<Vec<f32>, VersionRejection> {
    let bad = |s: &str| VersionRejection::Malformed(s.to_owned());
    let fed = cfg
        .federation
        .as_ref()
        .ok_or_else(|| bad("a mix of regions in a region that does not federate"))?;
    if !fed.is_mix_round(m.round) {
        return Err(bad("a mix of regions in a round that is not a mix round"));
    }
    let mut own = None;
    let mut foreign = Vec::new();
    for id in &m.parents {
        let (pm, params) = parent(id)?;
        if pm.message().round != m.round {
            return Err(VersionRejection::RoundJump {
                round: m.round,
                expected: pm.message().round,
            });
        }
        if pm.message().model_id != cfg.model_id {
            return Err(VersionRejection::WrongScope);
        }
        if pm.message().region == cfg.region {
            if own.is_some() {
                return Err(bad("a mix of regions with two heads of its own region"));
            }
            if pm.message().parents.len() != 1 {
                return Err(bad(
                    "a mix of regions on a version that is not a plain round's",
                ));
            }
            own = Some(params);
        } else {
            foreign.push((pm, params));
        }
    }
    let own = own.ok_or_else(|| bad("a mix of regions without a head of its own region"))?;
    let heads: Vec<crate::federation::ForeignHead<'_>> = foreign
        .iter()
        .map(|(pm, params)| crate::federation::ForeignHead {
            id: pm.id(),
            region: &pm.message().region,
            params,
        })
        .collect();
    crate::federation::mix(fed, &cfg.region, &own, &heads).map_err(|e| bad(&e.to_string()))
}

/// A delta as a recomputation holds it: in memory, or read where it is
/// kept.
enum Input<'a> {
    Held(Held),
    Stored(Box<dyn PayloadSource + 'a>),
}

/// The deltas aggregated into `version` and its ancestors of round
/// `min_round` or later (the ones a next version must not use again).
pub fn recent_deltas(l: &impl Lineage, version: ContentId, min_round: u64) -> BTreeSet<ContentId> {
    let mut out = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut queue = vec![version];
    let region = region_of(l, &version);
    while let Some(v) = queue.pop() {
        if seen.len() >= MAX_WALK || !seen.insert(v) {
            continue;
        }
        let Some(m) = l.model(&v) else { continue };
        let m = m.message();
        if m.round < min_round || Some(&m.region) != region.as_ref() {
            continue;
        }
        out.extend(m.deltas.iter().copied());
        queue.extend(m.parents.iter().copied());
    }
    out
}

/// The region of a version the lineage holds. Walks of a lineage stay in
/// the region they start in: a foreign head a mix of regions names (held
/// by the members that took it, not by others) is where they stop, so
/// every member walks the same versions.
pub(crate) fn region_of(l: &impl Lineage, id: &ContentId) -> Option<String> {
    l.model(id).map(|m| m.message().region.clone())
}

/// Whether `ancestor` is in `of`'s lineage within [`BRANCH_WINDOW`] rounds.
fn is_ancestor(l: &impl Lineage, ancestor: ContentId, of: &Verified<ModelManifest>) -> bool {
    let lo = of.message().round.saturating_sub(BRANCH_WINDOW);
    let mut seen = BTreeSet::new();
    let mut queue: Vec<ContentId> = of.message().parents.clone();
    while let Some(v) = queue.pop() {
        if v == ancestor {
            return true;
        }
        if seen.len() >= MAX_WALK || !seen.insert(v) {
            continue;
        }
        if let Some(m) = l.model(&v)
            && m.message().round >= lo
            && m.message().region == of.message().region
        {
            queue.extend(m.message().parents.iter().copied());
        }
    }
    false
}

/// The deltas aggregated into the verified lineage of `version` in
/// versions of rounds `lo..hi`, with the round of the version that
/// aggregated each.
fn window_deltas(
    l: &impl Lineage,
    version: ContentId,
    lo: u64,
    hi: u64,
) -> BTreeMap<ContentId, u64> {
    let mut out = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut queue = vec![version];
    let region = region_of(l, &version);
    while let Some(v) = queue.pop() {
        if seen.len() >= MAX_WALK || !seen.insert(v) || !l.is_verified(&v) {
            continue;
        }
        let Some(m) = l.model(&v) else { continue };
        let m = m.message();
        if m.round < lo || Some(&m.region) != region.as_ref() {
            continue;
        }
        if m.round < hi {
            for d in &m.deltas {
                out.entry(*d).or_insert(m.round);
            }
        }
        queue.extend(m.parents.iter().copied());
    }
    out
}

/// For each author, the rounds in which its deltas are in `a` and not in `b`.
fn missing_by_author(
    l: &impl Lineage,
    a: &BTreeMap<ContentId, u64>,
    b: &BTreeMap<ContentId, u64>,
) -> BTreeMap<NodeId, BTreeSet<u64>> {
    let mut out: BTreeMap<NodeId, BTreeSet<u64>> = BTreeMap::new();
    for (d, round) in a {
        if b.contains_key(d) {
            continue;
        }
        if let Some(author) = l.delta_author(d) {
            out.entry(author).or_default().insert(*round);
        }
    }
    out
}

fn authors_of(l: &impl Lineage, deltas: &BTreeMap<ContentId, u64>) -> BTreeSet<NodeId> {
    deltas.keys().filter_map(|d| l.delta_author(d)).collect()
}

/// Verifies the versions of a [`Plan::Ready`] order, parents first, handing
/// each that passes to `keep` (which stores it and marks it verified, so
/// its children find it), and returns what the target's check found — or,
/// if the target was verified before, its parameters and authors as held.
pub fn verify_in_order<L: Lineage>(
    l: &mut L,
    cfg: &EngineConfig,
    door: &Door,
    target: &Verified<ModelManifest>,
    order: &[ContentId],
    mut keep: impl FnMut(&mut L, &Verified<ModelManifest>, &Checked) -> Result<(), VersionRejection>,
) -> Result<Checked, VersionRejection> {
    let mut found = None;
    for id in order {
        let v = if *id == target.id() {
            target.clone()
        } else {
            l.model(id).ok_or(VersionRejection::UnknownParent(*id))?
        };
        let checked = verify_version(&*l, cfg, door, &v)?;
        keep(l, &v, &checked)?;
        if *id == target.id() {
            found = Some(checked);
        }
    }
    match found {
        Some(c) => Ok(c),
        None => Ok(Checked {
            params: l
                .params(&target.id())
                .ok_or(VersionRejection::UnknownParent(target.id()))?,
            authors: target
                .message()
                .deltas
                .iter()
                .filter_map(|d| l.delta(d).map(|m| m.message().author))
                .collect::<BTreeSet<_>>()
                .len(),
        }),
    }
}
