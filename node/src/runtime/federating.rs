//! Federation of regions in the running node (see
//! [`tapestry_core::federation`]): after its region's plain version of a
//! mix round the engine waits for the neighbouring regions' heads of that
//! round ([`Engine::awaits_foreign_heads`]); a task asks the neighbours'
//! roster members which version their region agreed on (`mix-head`),
//! takes it only if enough distinct members of that roster vouch for it
//! (their attestations: the same manifest signed by each), fetches its
//! parameters by their chunk ids, and hands what it found to the engine,
//! which signs the mix. A member's mix that names a foreign head this node
//! does not hold is checked the same way: the head is taken on its
//! region's attestations, then the mix is recomputed.
//!
//! What crosses regions is only this: the plain versions of mix rounds
//! this node adopted or verified ([`Exports`]) and their parameter
//! chunks, served to the members of the neighbours' rosters, and nothing
//! else (no deltas, no other versions).

use tapestry_core::federation::Federation;

use super::*;

/// Mix rounds whose exported versions stay served.
const EXPORTED_ROUNDS: usize = 8;
/// Versions exported per mix round at most (the one adopted and others
/// verified).
const EXPORTED_PER_ROUND: usize = 4;
/// Members of a neighbouring region asked at once.
const MAX_ASKED: usize = 16;
/// How long one question to a foreign member may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between two looks for heads not found yet.
const LOOK_AGAIN: Duration = Duration::from_millis(400);

/// A foreign head taken: its manifest, its parameters, its vouchers.
pub(super) type Taken = (Verified<ModelManifest>, Arc<Vec<f32>>, usize);

/// A neighbouring region as this node checks its heads.
#[derive(Debug, Clone)]
pub(super) struct NeighbourCtx {
    members: BTreeSet<NodeId>,
    threshold: usize,
}

impl NeighbourCtx {
    /// Its members' peer ids, at most [`MAX_ASKED`] (in roster order).
    fn peers(&self) -> Vec<PeerId> {
        self.members
            .iter()
            .filter_map(net::peer_id_of)
            .take(MAX_ASKED)
            .collect()
    }
}

/// What the node's federation tasks share.
#[derive(Clone)]
pub(super) struct FedCtx {
    pub(super) fed: Federation,
    neighbours: Arc<BTreeMap<String, NeighbourCtx>>,
    pub(super) exports: Exports,
}

impl FedCtx {
    /// The federation of `settings`, if its region federates.
    pub(super) fn new(settings: &NodeSettings) -> Option<FedCtx> {
        let fed = settings.engine.federation.clone()?;
        let neighbours = settings
            .neighbours
            .iter()
            .map(|n| {
                let members: BTreeSet<NodeId> =
                    n.roster.message().members.iter().copied().collect();
                let threshold = attest::threshold(members.len(), n.attestations);
                (n.region.clone(), NeighbourCtx { members, threshold })
            })
            .collect();
        Some(FedCtx {
            fed,
            neighbours: Arc::new(neighbours),
            exports: Exports::default(),
        })
    }

    /// Whether `peer` is on a neighbour's roster.
    pub(super) fn federated(&self, peer: &PeerId) -> bool {
        node_id_of(peer).is_some_and(|id| self.neighbours.values().any(|n| n.members.contains(&id)))
    }

    /// The neighbours' names.
    pub(super) fn neighbour_names(&self) -> Vec<String> {
        self.neighbours.keys().cloned().collect()
    }
}

/// The plain versions of mix rounds this node hands to neighbouring
/// regions' members: per round the one it adopted and those it verified
/// (at most [`EXPORTED_PER_ROUND`]), for the last [`EXPORTED_ROUNDS`] mix
/// rounds, and their chunks.
#[derive(Clone, Default)]
pub(super) struct Exports(Arc<Mutex<ExportsInner>>);

#[derive(Default)]
struct ExportsInner {
    adopted: BTreeMap<u64, ContentId>,
    versions: BTreeMap<u64, Vec<(ContentId, Vec<ContentId>)>>,
    chunks: HashMap<ContentId, usize>,
}

impl Exports {
    fn lock(&self) -> std::sync::MutexGuard<'_, ExportsInner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Exports version `id` (its manifest `m`); `adopted`: as the
    /// region's version of its round this node answers `mix-head` with.
    pub(super) fn add(&self, id: ContentId, m: &ModelManifest, adopted: bool) {
        let mut g = self.lock();
        let g = &mut *g;
        if adopted {
            g.adopted.insert(m.round, id);
        }
        let of_round = g.versions.entry(m.round).or_default();
        if !of_round.iter().any(|(v, _)| *v == id) && of_round.len() < EXPORTED_PER_ROUND {
            of_round.push((id, m.chunk_ids.clone()));
            for c in &m.chunk_ids {
                *g.chunks.entry(*c).or_default() += 1;
            }
        }
        while g.versions.len() > EXPORTED_ROUNDS {
            let Some((round, gone)) = g.versions.pop_first() else {
                break;
            };
            g.adopted.remove(&round);
            for (_, chunks) in gone {
                for c in chunks {
                    if let Some(n) = g.chunks.get_mut(&c) {
                        *n -= 1;
                        if *n == 0 {
                            g.chunks.remove(&c);
                        }
                    }
                }
            }
        }
    }

    /// The version of `round` this node adopted, if exported.
    pub(super) fn adopted(&self, round: u64) -> Option<ContentId> {
        self.lock().adopted.get(&round).copied()
    }

    /// Whether version `id` is exported.
    pub(super) fn has_version(&self, id: &ContentId) -> bool {
        self.lock()
            .versions
            .values()
            .any(|vs| vs.iter().any(|(v, _)| v == id))
    }

    /// Whether chunk `id` is one of an exported version's.
    pub(super) fn has_chunk(&self, id: &ContentId) -> bool {
        self.lock().chunks.contains_key(id)
    }
}

/// What a foreign head is checked and kept with.
pub(super) struct ForeignEnv<'a> {
    pub(super) net: &'a NetHandle,
    pub(super) store: &'a Store,
    pub(super) shared: &'a Shared,
    pub(super) cfg: &'a EngineConfig,
    pub(super) fed: &'a FedCtx,
}

/// Takes version `id` of a neighbouring region (of `region`, if known):
/// its manifest from `from` or that region's members, checked (this
/// model, a neighbour, a mix round, a plain version, this model's size);
/// the attestations of that region's members, at least its threshold of
/// distinct vouchers; its parameters by their chunk ids, from the
/// vouchers and `from`, checked. Keeps all of it, marked verified and
/// attested (so this node never vouches for it itself). Returns the head,
/// its parameters and its number of vouchers, or why it was not taken.
pub(super) async fn take_foreign(
    env: &ForeignEnv<'_>,
    id: ContentId,
    region: Option<&str>,
    from: &[PeerId],
) -> Result<Taken, String> {
    let asked: Vec<PeerId> = match region.and_then(|r| env.fed.neighbours.get(r)) {
        Some(n) => n.peers(),
        None => env
            .fed
            .neighbours
            .values()
            .flat_map(|n| n.peers())
            .collect(),
    };
    let manifest = match env.store.get_model_manifest(&id).ok().flatten() {
        Some(m) => m,
        None => {
            let mut sources = from.to_vec();
            sources.extend(asked.iter().filter(|p| !from.contains(p)));
            let bytes = fetch_manifest(env.net, &sources, id)
                .await
                .ok_or("its manifest could not be had")?;
            let v = Signed::<ModelManifest>::open(&bytes)
                .map_err(|e| format!("its manifest does not open: {e}"))?;
            if v.id() != id {
                return Err("a manifest of another id".into());
            }
            v
        }
    };
    let m = manifest.message();
    let Some(n) = env.fed.neighbours.get(&m.region) else {
        return Err(format!("region {:?} is not a neighbour", m.region));
    };
    if region.is_some_and(|r| r != m.region) {
        return Err(format!(
            "a version of region {:?}, not {region:?}",
            m.region
        ));
    }
    if m.model_id != env.cfg.model_id {
        return Err(format!("a version of model {:?}", m.model_id));
    }
    // A region's head for a mix is its plain version of a mix round.
    if !env.fed.fed.is_mix_round(m.round) || m.parents.len() != 1 {
        return Err(format!(
            "not a plain version of a mix round (round {}, {} parents)",
            m.round,
            m.parents.len()
        ));
    }
    if m.payload_bytes != env.cfg.spec.n_params() as u64 * 4 {
        return Err("parameters of another size".into());
    }
    if is_verified(env.store, &id)
        && let Some(params) = read_params(&**env.store, m)
    {
        return Ok((manifest.clone(), Arc::new(params), n.threshold));
    }
    // The vouchers: its author, if a member, and the members that sign
    // the same manifest.
    let peers = n.peers();
    let asks = peers.iter().map(|peer| {
        let net = env.net.clone();
        async move {
            let answer =
                tokio::time::timeout(ASK_TIMEOUT, net.fetch(*peer, FetchRequest::Attest(id))).await;
            (*peer, answer)
        }
    });
    let mut attestations = Vec::new();
    let mut holders = Vec::new();
    for (peer, answer) in futures::future::join_all(asks).await {
        if let Ok(Ok(FetchResponse::SignedManifest(bytes))) = answer
            && let Ok(v) = Signed::<ModelManifest>::open(&bytes)
            && attest::attests(v.message(), m)
        {
            attestations.push(v);
            holders.push(peer);
        }
    }
    let vouchers = attest::vouchers(&manifest, &attestations, &n.members);
    if vouchers.len() < n.threshold {
        return Err(format!(
            "{} of the {} members of region {:?} it needs vouch for it",
            vouchers.len(),
            n.threshold,
            m.region
        ));
    }
    if let Some(author) = net::peer_id_of(&m.author) {
        holders.push(author);
    }
    holders.extend(from.iter().copied());
    if !fetch_chunks(
        env.net,
        env.store,
        id,
        &m.chunk_ids,
        (&holders, None),
        env.shared,
    )
    .await
    {
        return Err("its parameters could not be had".into());
    }
    let params = read_params(&**env.store, m).ok_or("its parameters could not be read back")?;
    if params.len() != env.cfg.spec.n_params() || params.iter().any(|v| !v.is_finite()) {
        return Err("its parameters are malformed".into());
    }
    let kept = (|| -> Result<(), tapestry_storage::StoreError> {
        for v in &attestations {
            env.store.put_model_manifest(v)?;
        }
        env.store.put_model_manifest(&manifest)?;
        env.store.set_ref(&attested_ref(&id), id)?;
        env.store.set_ref(&verified_ref(&id), id)?;
        Ok(())
    })();
    kept.map_err(|e| e.to_string())?;
    tracing::info!(
        region = %m.region,
        round = m.round,
        version = %id.short(),
        vouchers = vouchers.len(),
        "foreign head taken on its region's attestations"
    );
    Ok((manifest, Arc::new(params), vouchers.len()))
}

/// The heads of round `round` of this node's neighbouring regions: asks
/// each neighbour's members which version their region adopted
/// (`mix-head`), takes the one most of them name that passes
/// [`take_foreign`], and looks again every [`LOOK_AGAIN`] for those not
/// found yet, for at most `patience`. Returns the heads taken and how
/// many versions named by a neighbour's members were refused.
pub(super) async fn gather(
    env: &ForeignEnv<'_>,
    round: u64,
    patience: Duration,
) -> (Vec<Taken>, u64) {
    let deadline = Instant::now() + patience;
    let mut taken: BTreeMap<String, Taken> = BTreeMap::new();
    let mut refused: BTreeSet<ContentId> = BTreeSet::new();
    loop {
        for (region, n) in env.fed.neighbours.iter() {
            if taken.contains_key(region) {
                continue;
            }
            let request = FetchRequest::MixHead {
                model_id: env.cfg.model_id.clone(),
                region: region.clone(),
                round,
            };
            let asks = n.peers().into_iter().map(|peer| {
                let (net, request) = (env.net.clone(), request.clone());
                async move {
                    (
                        peer,
                        tokio::time::timeout(ASK_TIMEOUT, net.fetch(peer, request)).await,
                    )
                }
            });
            let mut named: BTreeMap<ContentId, Vec<PeerId>> = BTreeMap::new();
            for (peer, answer) in futures::future::join_all(asks).await {
                if let Ok(Ok(FetchResponse::Head(Some(id)))) = answer {
                    named.entry(id).or_default().push(peer);
                }
            }
            // The version most members name first (then the smallest id).
            let mut order: Vec<(ContentId, Vec<PeerId>)> = named.into_iter().collect();
            order.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
            for (id, by) in order {
                match take_foreign(env, id, Some(region), &by).await {
                    Ok(t) if t.0.message().round == round => {
                        taken.insert(region.clone(), t);
                        break;
                    }
                    Ok(_) => {}
                    Err(why) => {
                        if refused.insert(id) {
                            tracing::info!(%region, round, version = %id.short(), %why, "foreign head not taken");
                        }
                    }
                }
            }
        }
        let now = Instant::now();
        if taken.len() == env.fed.neighbours.len() || now >= deadline {
            break;
        }
        tokio::time::sleep(LOOK_AGAIN.min(deadline - now)).await;
    }
    // One refused at first (its vouchers not in yet) and taken later is
    // not counted.
    for (m, ..) in taken.values() {
        refused.remove(&m.id());
    }
    (taken.into_values().collect(), refused.len() as u64)
}

impl Node {
    /// Starts gathering foreign heads if the engine waits for them and no
    /// gathering for that round is under way.
    pub(super) fn maybe_gather(&mut self) {
        let Some(round) = self.engine.awaits_foreign_heads() else {
            return;
        };
        let Some(fed) = self.federation.clone() else {
            return;
        };
        if self.gathering == Some(round) {
            return;
        }
        self.gathering = Some(round);
        // Three quarters of the wait: what is found comes to the engine
        // before its wait ends.
        let patience = Duration::from_millis(fed.fed.wait_ms.saturating_mul(3) / 4);
        let (net, store, shared, cfg, tx) = (
            self.net.clone(),
            self.store.clone(),
            self.shared.clone(),
            self.settings.engine.clone(),
            self.foreign_tx.clone(),
        );
        tracing::debug!(round, "gathering neighbouring regions' heads");
        self.tasks.spawn(async move {
            let env = ForeignEnv {
                net: &net,
                store: &store,
                shared: &shared,
                cfg: &cfg,
                fed: &fed,
            };
            let (heads, refused) = gather(&env, round, patience).await;
            let _ = tx.send((round, heads, refused)).await;
        });
    }

    /// Foreign heads of `round` found: to the engine if it still waits
    /// for them, and into the status.
    pub(super) async fn on_foreign_heads(&mut self, round: u64, heads: Vec<Taken>, refused: u64) {
        if self.gathering == Some(round) {
            self.gathering = None;
        }
        let taken = heads.len() as u64;
        self.shared.update(|s| {
            if let Some(f) = s.federation.as_mut() {
                f.foreign_heads_taken += taken;
                f.foreign_heads_refused += refused;
            }
        });
        if heads.is_empty() || self.engine.awaits_foreign_heads() != Some(round) {
            tracing::info!(
                round,
                found = heads.len(),
                "no foreign heads mixed in this round"
            );
            return;
        }
        let own = self.engine.version();
        let distance = |p: &[f32]| -> f64 {
            let own = self.engine.params();
            own.iter()
                .zip(p)
                .map(|(a, b)| f64::from(b - a).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let foreign: Vec<crate::status::ForeignHeadStatus> = heads
            .iter()
            .map(|(m, p, vouchers)| crate::status::ForeignHeadStatus {
                region: m.message().region.clone(),
                head: m.id().to_string(),
                vouchers: *vouchers,
                distance: distance(p),
            })
            .collect();
        let input = Input::ForeignHeads(heads.into_iter().map(|(m, p, _)| (m, p)).collect());
        self.feed(input).await;
        let mixed = self.engine.head_parents().len() >= 2 && self.engine.round() == round;
        tracing::info!(
            round,
            regions = foreign.len(),
            mixed,
            "foreign heads handed to the engine"
        );
        if mixed {
            self.shared.update(|s| {
                if let Some(f) = s.federation.as_mut() {
                    f.mixes_signed += 1;
                    f.last_mix = Some(crate::status::LastMix {
                        round,
                        own_head: own.map(|o| o.to_string()).unwrap_or_default(),
                        foreign: foreign.clone(),
                    });
                }
            });
        }
    }

    /// Exports `m` to neighbouring regions' members if it is this
    /// region's plain version of a mix round (`adopted`: the one this node
    /// adopted).
    pub(super) fn export(&self, m: &Verified<ModelManifest>, adopted: bool) {
        let Some(fed) = &self.federation else {
            return;
        };
        let v = m.message();
        if v.region == self.settings.engine.region
            && v.parents.len() == 1
            && fed.fed.is_mix_round(v.round)
        {
            fed.exports.add(m.id(), v, adopted);
        }
    }

    /// Whether a member of a neighbour's roster may have what it asks:
    /// the version a round agreed on, and the exported versions and their
    /// chunks.
    pub(super) fn exported(&self, request: &FetchRequest) -> bool {
        let Some(fed) = &self.federation else {
            return false;
        };
        match request {
            FetchRequest::MixHead { .. } => true,
            FetchRequest::SignedManifest(id) | FetchRequest::Attest(id) => {
                fed.exports.has_version(id)
            }
            FetchRequest::Chunk(id) => fed.exports.has_chunk(id),
            FetchRequest::Head { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(round: u64, chunks: &[u8]) -> (ContentId, ModelManifest) {
        let m = ModelManifest {
            model_id: "m".into(),
            region: "r".into(),
            round,
            author: NodeId::from_bytes([1; 32]),
            layout: Vec::new(),
            payload_bytes: 0,
            chunk_size: 4,
            chunk_ids: chunks.iter().map(|c| ContentId::of(&[*c])).collect(),
            parents: Vec::new(),
            deltas: Vec::new(),
            created_unix_ms: 0,
        };
        (
            ContentId::of(&[&round.to_le_bytes()[..], chunks].concat()),
            m,
        )
    }

    #[test]
    fn exports_hold_the_last_mix_rounds_and_their_chunks_only() {
        let e = Exports::default();
        let (a, ma) = version(2, &[1, 2]);
        let (b, mb) = version(2, &[2, 3]);
        e.add(a, &ma, true);
        e.add(b, &mb, false);
        assert_eq!(e.adopted(2), Some(a));
        assert!(e.has_version(&a) && e.has_version(&b));
        assert!(e.has_chunk(&ContentId::of(&[3])));
        assert!(!e.has_chunk(&ContentId::of(&[9])));
        // Later mix rounds push the oldest out, chunks shared or not.
        for r in 1..=EXPORTED_ROUNDS as u64 {
            let (v, m) = version(2 + 2 * r, &[100 + r as u8]);
            e.add(v, &m, true);
        }
        assert_eq!(e.adopted(2), None);
        assert!(!e.has_version(&a) && !e.has_version(&b));
        for c in [1, 2, 3] {
            assert!(!e.has_chunk(&ContentId::of(&[c])), "chunk {c}");
        }
        assert!(e.has_chunk(&ContentId::of(&[100 + EXPORTED_ROUNDS as u8])));
        // At most a few versions of one round.
        for i in 0..10u8 {
            let (_, m) = version(99, &[200 + i]);
            e.add(ContentId::of(&[i, 99]), &m, false);
        }
        assert!(e.has_chunk(&ContentId::of(&[203])));
        assert!(!e.has_chunk(&ContentId::of(&[204])));
    }
}
