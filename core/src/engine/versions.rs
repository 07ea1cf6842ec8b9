//! Making model versions: a round's new version from its deltas, a merge of
//! two branches, signing and adopting either, and a region's genesis.

use super::*;

impl Engine {
    /// Merges the head with another branch's version: the weighted mean of
    /// both, in the later of their rounds, with both as parents. Every node
    /// that merges the same two versions computes the same parameters
    /// (the sum is taken in the order of the versions' ids).
    pub(super) fn merge_with(
        &mut self,
        other: Verified<ModelManifest>,
        other_params: std::sync::Arc<Vec<f32>>,
        (w_own, w_other): (f64, f64),
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let Some(own_id) = self.version else {
            return;
        };
        self.params = std::sync::Arc::new(merge_params(
            (own_id, &self.params, w_own),
            (other.id(), &other_params, w_other),
        ));
        // A merge has no single previous step: the next one takes none.
        self.previous = None;
        let round = self.round.max(other.message().round);
        let mut parents = vec![own_id, other.id()];
        parents.sort();
        self.sign_version(round, parents, Vec::new(), now_ms, out);
    }

    /// Signs the current parameters as the next round's version, adopts it
    /// and starts that round.
    pub(super) fn new_version(
        &mut self,
        delta_ids: Vec<ContentId>,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let parents = self.version.into_iter().collect();
        self.sign_version(
            self.round.saturating_add(1),
            parents,
            delta_ids,
            now_ms,
            out,
        );
    }

    /// Signs the current parameters as the version of `round`, adopts it
    /// and starts the round after it.
    pub(super) fn sign_version(
        &mut self,
        round: u64,
        parents: Vec<ContentId>,
        delta_ids: Vec<ContentId>,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let payload_bytes = (self.params.len() * 4) as u64;
        let lap = self.lap();
        let chunk_ids = params_chunk_ids(&self.params, self.config.chunk_size);
        let lap = self.charge(lap, |t| &mut t.hash);
        let manifest = ModelManifest {
            model_id: self.config.model_id.clone(),
            region: self.config.region.clone(),
            round,
            author: self.node_id(),
            layout: self.config.spec.layout(),
            payload_bytes,
            chunk_size: self.config.chunk_size as u32,
            chunk_ids,
            parents,
            deltas: delta_ids,
            created_unix_ms: self.wall_ms(),
        };
        let Ok(signed) = Signed::sign(manifest, &self.key) else {
            return;
        };
        self.charge(lap, |t| &mut t.sign);
        self.round = round;
        self.version = Some(signed.id());
        self.parents = signed.message().parents.clone();
        self.rank = version_rank(signed.message(), signed.message().deltas.len());
        out.push(Action::Adopt {
            manifest: signed,
            params: self.params.clone(),
        });
        self.start_round(now_ms, out);
    }
}

/// The signed initial version of a model (round 0, no parents, no deltas):
/// what every node of a region starts from.
pub fn genesis(
    config: &EngineConfig,
    params: &[f32],
    key: &Keypair,
) -> Option<Verified<ModelManifest>> {
    let bytes: Vec<u8> = tapestry_protocol::f32_le_bytes(params);
    Signed::sign(
        ModelManifest {
            model_id: config.model_id.clone(),
            region: config.region.clone(),
            round: 0,
            author: key.node_id(),
            layout: config.spec.layout(),
            payload_bytes: bytes.len() as u64,
            chunk_size: config.chunk_size as u32,
            chunk_ids: bytes.chunks(config.chunk_size).map(ContentId::of).collect(),
            parents: vec![],
            deltas: vec![],
            created_unix_ms: 0,
        },
        key,
    )
    .ok()
}
