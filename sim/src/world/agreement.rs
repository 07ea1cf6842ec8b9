//! Model versions in broadcast mode: announcing them, the forgeries
//! Byzantine nodes announce, and what a node does with one it hears —
//! checked, verified by recomputation through the core's `verify`, and
//! decided by the core's agreement policy (`heads`), as the node does.

use super::*;

impl World<'_> {
    /// Sends a model version's announcement to every other node of its
    /// region.
    pub(super) fn announce_version(&mut self, i: usize, now: u64, v: &Verified<ModelManifest>) {
        let size = v.envelope_bytes().len() as u64;
        for j in 0..self.keys.len() {
            if j != i
                && self.region[j] == self.region[i]
                && let Ok(at) = self.net.send(i, j, now, size)
            {
                self.push(
                    at,
                    Event::Version {
                        node: j,
                        manifest: v.clone(),
                        again: false,
                    },
                );
            }
        }
    }

    /// A Byzantine node's forged versions, made from the version it just
    /// adopted: (made-up versions, merges, round jumps) as `forges` says.
    pub(super) fn forgeries(
        &self,
        i: usize,
        head: &Verified<ModelManifest>,
        params: &[f32],
        (made_up, merges, jumps): (bool, bool, bool),
    ) -> Vec<Verified<ModelManifest>> {
        let key = &self.keys[i];
        let h = head.message();
        let evil: Vec<f32> = params.iter().map(|v| -v).collect();
        let sign = |round: u64, parents: Vec<ContentId>, deltas: Vec<ContentId>| {
            let mut m = h.clone();
            m.round = round;
            m.author = key.node_id();
            m.chunk_ids = verify::params_chunk_ids(&evil, m.chunk_size as usize);
            m.parents = parents;
            m.deltas = deltas;
            Signed::sign(m, key).ok()
        };
        let mut out = Vec::new();
        let Some(parent) = h.parents.first().copied() else {
            return out;
        };
        if made_up {
            // Its head's parent and deltas, other parameters.
            out.extend(sign(h.round, h.parents.clone(), h.deltas.clone()));
            // 64 delta ids nobody ever announced.
            let ids = (0..64u64)
                .map(|k| ContentId::of(&[&k.to_le_bytes()[..], head.id().as_bytes()].concat()))
                .collect();
            out.extend(sign(h.round, h.parents.clone(), ids));
        }
        if merges {
            let mut two = vec![head.id(), parent];
            two.sort();
            out.extend(sign(h.round, two, Vec::new()));
        }
        if jumps {
            out.extend(sign(
                h.round.saturating_add(5),
                vec![head.id()],
                h.deltas.clone(),
            ));
            out.extend(sign(u64::MAX - 1, vec![head.id()], h.deltas.clone()));
        }
        out
    }

    /// Node `j` hears of a model version: it checks the manifest, verifies
    /// the version by recomputation if it could matter, and does what the
    /// core's agreement policy says — the same code the real node runs.
    pub(super) fn on_version(
        &mut self,
        j: usize,
        now: u64,
        v: Verified<ModelManifest>,
        again: bool,
    ) {
        let engine = &self.engines[j];
        if let Err(r) = verify::check_shape(engine.config(), v.message(), engine.round()) {
            self.count_rejected(&r);
            return;
        }
        // Heard again (others adopted it and announce it too): decided
        // already, as the node does.
        if self.verified[j].contains(&v.id()) && !again {
            return;
        }
        if !heads::worth_verifying(engine, v.message()) {
            return;
        }
        let mut view = View {
            versions: &self.versions,
            deltas: &self.delta_manifests,
            payloads: &self.published,
            params: &self.version_params,
            verified: &self.verified[j],
            new: BTreeMap::new(),
            memo: &self.memo,
        };
        let cfg = engine.config();
        // Nodes far behind catch up when they rejoin (see `rejoin`); a
        // version needing more than the comparison window recomputed is
        // refused here.
        let max_chain = (cfg.door.staleness + verify::BRANCH_WINDOW) as usize;
        let checked = match verify::plan(&view, cfg, &v, max_chain) {
            Err(r) => Err(r),
            Ok(Plan::Need {
                models,
                deltas,
                payloads,
            }) => Err(match (models.first(), deltas.first(), payloads.first()) {
                (Some(m), _, _) => VersionRejection::UnknownParent(*m),
                (None, Some(d), _) => VersionRejection::UnknownDelta(*d),
                (None, None, Some(d)) => VersionRejection::UnknownDelta(d.id()),
                (None, None, None) => VersionRejection::TooFarBehind { limit: max_chain },
            }),
            Ok(Plan::Ready(order)) => {
                verify::verify_in_order(&mut view, cfg, engine.door(), &v, &order, |view, v, c| {
                    view.new.insert(v.id(), c.params.clone());
                    Ok(())
                })
            }
        };
        let checked = match checked {
            Ok(c) => c,
            Err(r) => {
                self.count_rejected(&r);
                return;
            }
        };
        let assessment = heads::assess(&view, cfg, engine.version(), &v, checked.authors);
        let new = std::mem::take(&mut view.new);
        let decision = heads::decide(engine, v.clone(), Arc::new(checked.params), assessment);
        for (id, p) in new {
            self.verified[j].insert(id);
            self.version_params.entry(id).or_insert(p);
        }
        match decision {
            Decision::Feed(input) => self.push(
                now,
                Event::Deliver {
                    node: j,
                    input: *input,
                },
            ),
            Decision::Remember(rank) => {
                let round = v.message().round;
                if self.best_seen[j].get(&round).is_none_or(|(r, _)| rank > *r) {
                    self.best_seen[j].insert(round, (rank, v));
                }
            }
            // Assessed against the engine's head just now: never stale.
            Decision::Leave | Decision::Reassess => {}
        }
    }

    pub(super) fn count_rejected(&mut self, r: &VersionRejection) {
        *self.rejected.entry(r.label().to_owned()).or_default() += 1;
    }
}

/// What one simulated node holds of the region's history, as the core's
/// [`Lineage`]: every announced manifest and payload can be fetched, and
/// what this node verified (plus what it verifies now) has parameters.
pub(super) struct View<'w> {
    versions: &'w BTreeMap<ContentId, Verified<ModelManifest>>,
    deltas: &'w BTreeMap<ContentId, Verified<DeltaManifest>>,
    payloads: &'w BTreeMap<ContentId, Vec<u8>>,
    params: &'w BTreeMap<ContentId, Vec<f32>>,
    verified: &'w BTreeSet<ContentId>,
    new: BTreeMap<ContentId, Vec<f32>>,
    memo: &'w std::cell::RefCell<Memo>,
}

/// Aggregations already computed, by parent and delta ids: a pure function
/// of them, so every node that checks the same version reuses the result.
pub(super) type Memo = BTreeMap<(ContentId, Vec<ContentId>), Vec<f32>>;

impl Lineage for View<'_> {
    fn model(&self, id: &ContentId) -> Option<Verified<ModelManifest>> {
        self.versions.get(id).cloned()
    }
    fn delta(&self, id: &ContentId) -> Option<Verified<DeltaManifest>> {
        self.deltas.get(id).cloned()
    }
    fn delta_held(&self, id: &ContentId) -> Option<bool> {
        self.deltas
            .contains_key(id)
            .then(|| self.payloads.contains_key(id))
    }
    fn delta_author(&self, id: &ContentId) -> Option<NodeId> {
        self.deltas.get(id).map(|d| d.message().author)
    }
    fn has_payload(&self, d: &Verified<DeltaManifest>) -> bool {
        self.payloads.contains_key(&d.id())
    }
    fn payload(&self, d: &Verified<DeltaManifest>) -> Option<Vec<u8>> {
        self.payloads.get(&d.id()).cloned()
    }
    fn is_verified(&self, id: &ContentId) -> bool {
        self.new.contains_key(id) || self.verified.contains(id)
    }
    fn params(&self, id: &ContentId) -> Option<Vec<f32>> {
        match self.new.get(id) {
            Some(p) => Some(p.clone()),
            None if self.verified.contains(id) => self.params.get(id).cloned(),
            None => None,
        }
    }
    fn held_params(&self, id: &ContentId) -> Option<Vec<f32>> {
        self.params(id)
            .or_else(|| fetched_params(self.versions, self.params, id))
    }
    fn aggregate(
        &self,
        cfg: &EngineConfig,
        parent: ContentId,
        parent_params: Vec<f32>,
        previous: Option<&[f32]>,
        inputs: &[verify::DeltaInput<'_>],
    ) -> Result<Vec<f32>, tapestry_core::aggregate::AggregateError> {
        let mut ids: Vec<ContentId> = inputs.iter().map(|d| d.id).collect();
        ids.sort();
        let key = (parent, ids);
        if let Some(p) = self.memo.borrow().get(&key) {
            return Ok(p.clone());
        }
        let p = verify::aggregate_onto_owned(cfg, parent_params, previous, inputs)?;
        self.memo.borrow_mut().insert(key, p.clone());
        Ok(p)
    }
}

/// A version's parameters as a node fetching its chunks would get them:
/// held by some node, and matching the chunk ids of its manifest.
pub(super) fn fetched_params(
    versions: &BTreeMap<ContentId, Verified<ModelManifest>>,
    held: &BTreeMap<ContentId, Vec<f32>>,
    id: &ContentId,
) -> Option<Vec<f32>> {
    let m = versions.get(id)?;
    let params = held.get(id)?;
    (verify::params_chunk_ids(params, m.message().chunk_size as usize) == m.message().chunk_ids)
        .then(|| params.clone())
}
