//! Peers' model versions: which to verify, verifying them (recomputation
//! from the store and from peers, or attestations in a permissioned
//! region) on their own tasks, and what the agreement policy
//! ([`tapestry_core::heads`]) decides with the verdict.

use super::*;

impl Node {
    /// A model version was announced (or a peer answered a head probe;
    /// either way its envelope and roster are checked): check what its
    /// manifest alone can tell, then verify it by
    /// recomputation if it could matter to this node (a later round, a
    /// same-round version that could be preferred, a recent merge). Returns
    /// the gossip verdict now, or `None` when it comes with the
    /// verification's ([`Node::on_finding`]).
    pub(super) async fn on_model(
        &mut self,
        source: PeerId,
        manifest: Verified<ModelManifest>,
        gossip: Option<libp2p::gossipsub::MessageId>,
    ) -> Option<Verdict> {
        let m = manifest.message();
        let shape = check_shape(&self.settings.engine, m, self.engine.round());
        // Too far ahead to recompute: in a permissioned region, roster
        // members' attestations may still carry it (the verification asks).
        let far = matches!(shape, Err(VersionRejection::RoundJump { .. }))
            && self.settings.roster.is_some();
        if let Some(r) = shape.err().filter(|_| !far) {
            tracing::info!(version = %manifest.id().short(), "model version rejected");
            let r = r.into();
            self.blame(&r, &m.author);
            return Some(self.refuse(&r, &source));
        }
        if self.is_verified(&manifest.id()) {
            // Verified before but not this node's head: if it could matter,
            // weigh it against the head now (cheap: its parameters are
            // stored), once per head. A version verified while the head
            // moved is otherwise never offered to the engine again. (The
            // next round's are remembered when verified.)
            if self.running
                && self.engine.version() != Some(manifest.id())
                && m.round != self.engine.round().saturating_add(1)
                && !self.passed_over.contains(&manifest.id())
                && heads::worth_verifying(&self.engine, m)
            {
                self.verify_once(manifest, source, None);
            }
            return Some(Verdict::Accept);
        }
        if !self.accepting() {
            // The store is full: nothing new is verified (or stored).
            return Some(Verdict::Ignore);
        }
        if !self.running || !(far || heads::worth_verifying(&self.engine, m)) {
            tracing::debug!(round = m.round, version = %manifest.id().short(), own = self.engine.round(), running = self.running, "version not worth verifying");
            return Some(Verdict::Ignore);
        }
        // The next round's versions wait until this node closes its own
        // round, unless one already holds this node's delta for it.
        if m.round == self.engine.round().saturating_add(1)
            && !self.engine.holds_own_vote(m)
            && self.early.len() < MAX_EARLY
            && !self.early.iter().any(|(e, ..)| e.id() == manifest.id())
        {
            self.early.push((manifest, source, gossip, Instant::now()));
            return None;
        }
        if self.verify_once(manifest, source, gossip) {
            None
        } else {
            Some(Verdict::Ignore)
        }
    }

    /// Shows how many versions are being verified (and the most so far).
    fn show_verifying(&self) {
        let n = self.offered.lock().map_or(0, |o| o.len());
        self.shared.update(|s| {
            s.verifying = n;
            s.verifying_peak = s.verifying_peak.max(n);
        });
    }

    /// Whether this node verified a version.
    pub(super) fn is_verified(&self, id: &ContentId) -> bool {
        is_verified(&self.store, id)
    }

    /// What a verification found: adopt, merge, remember or reject.
    pub(super) async fn on_finding(&mut self, v: Finding) {
        forget(&self.offered, v.manifest.id());
        self.show_verifying();
        let checked = match v.result {
            Err(r) => {
                tracing::warn!(version = %v.manifest.id().short(), round = v.manifest.message().round, "model version rejected");
                let r = r.into();
                self.blame(&r, &v.manifest.message().author);
                let verdict = self.refuse(&r, &v.source);
                if let Some(id) = v.gossip {
                    self.report(id, v.source, verdict).await;
                }
                return;
            }
            Ok(c) => c,
        };
        if let Some(id) = v.gossip {
            self.report(id, v.source, Verdict::Accept).await;
        }
        self.export(&v.manifest, false);
        let source = v.source;
        let (manifest, (params, assessment)) = (v.manifest, checked);
        let round = manifest.message().round;
        let id = manifest.id();
        let decision = heads::decide(&self.engine, manifest.clone(), params, assessment);
        tracing::debug!(
            round,
            version = %id.short(),
            own = self.engine.round(),
            head = %self.engine.version().map(|h| h.short()).unwrap_or_default(),
            decision = decision.name(),
            "version weighed"
        );
        match decision {
            heads::Decision::Feed(input) => {
                if let Input::BranchOffered { weights, .. } = input.as_ref() {
                    tracing::info!(round, version = %id.short(), ?weights, "merging a branch that grew apart");
                }
                self.feed(*input).await;
            }
            heads::Decision::Remember(rank) => {
                // Kept for when this node closes its own round.
                if self.best_seen.get(&round).is_none_or(|(r, _, _)| rank > *r) {
                    self.best_seen.insert(round, (rank, manifest, source));
                }
            }
            heads::Decision::Leave => {
                if self.passed_over.len() >= MAX_PASSED_OVER {
                    self.passed_over.clear();
                }
                self.passed_over.insert(id);
            }
            heads::Decision::Reassess => {
                // Verified now, so this only weighs it against the head.
                self.verify_once(manifest, source, None);
            }
        }
    }

    /// Asks `peers` for their heads; a head this node does not have comes
    /// back through `heads_rx` and is treated as an announcement.
    pub(super) fn ask_heads(&mut self, peers: Vec<PeerId>) {
        let cfg = &self.settings.engine;
        let request = FetchRequest::Head {
            model_id: cfg.model_id.clone(),
            region: cfg.region.clone(),
        };
        let own = self.engine.version();
        for peer in peers {
            let (net, tx, offered) = (
                self.net.clone(),
                self.heads_tx.clone(),
                self.offered.clone(),
            );
            let request = request.clone();
            self.tasks.spawn(async move {
                let Ok(FetchResponse::Head(Some(id))) = net.fetch(peer, request).await else {
                    return;
                };
                if Some(id) == own || offered.lock().is_ok_and(|o| o.contains(&id)) {
                    return;
                }
                if let Ok(FetchResponse::SignedManifest(bytes)) =
                    net.fetch(peer, FetchRequest::SignedManifest(id)).await
                {
                    let _ = tx.send((peer, bytes)).await;
                }
            });
        }
    }

    /// Verifies the versions held back by [`Node::on_model`]: all of them
    /// (`all`, when this node has just made a version), or those held
    /// longer than a round's timeout.
    pub(super) async fn verify_early(&mut self, all: bool) {
        let patience = Duration::from_millis(self.settings.engine.round_timeout_ms);
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.early)
            .into_iter()
            .partition(|(.., at)| all || at.elapsed() >= patience);
        self.early = keep;
        for (manifest, source, gossip, _) in due {
            if !self.verify_once(manifest, source, gossip.clone())
                && let Some(id) = gossip
            {
                self.report(id, source, Verdict::Ignore).await;
            }
        }
    }

    /// Verifies a version this node would adopt (a remembered one, when
    /// this node closed its round).
    pub(super) fn offer_if_preferred(
        &mut self,
        manifest: Verified<ModelManifest>,
        source: PeerId,
        gossip: Option<libp2p::gossipsub::MessageId>,
    ) {
        if self.engine.would_adopt(manifest.message()) {
            self.verify_once(manifest, source, gossip);
        }
    }

    /// Verifies a version by recomputation on its own task, unless it is
    /// already being verified or too many are; the verdict comes back
    /// through `findings_rx`. Returns whether a verification started.
    pub(super) fn verify_once(
        &mut self,
        manifest: Verified<ModelManifest>,
        source: PeerId,
        gossip: Option<libp2p::gossipsub::MessageId>,
    ) -> bool {
        let fresh = self
            .offered
            .lock()
            .is_ok_and(|mut o| o.len() < MAX_VERIFYING && o.insert(manifest.id()));
        if !fresh {
            return false;
        }
        self.show_verifying();
        let cfg = &self.settings.engine;
        let furthest = self
            .engine
            .round()
            .saturating_add(cfg.door.max_rounds_ahead);
        let attest = self.settings.roster.as_ref().map(|r| {
            let members: BTreeSet<NodeId> = r.message().members.iter().copied().collect();
            AttestCtx {
                threshold: attest::threshold(members.len(), self.settings.attestations),
                members,
                ask: self.members.iter().copied().collect(),
            }
        });
        let ctx = VerifyCtx {
            recent: self.recent.clone(),
            recomputing: self.recomputing.clone(),
            net: self.net.clone(),
            store: self.store.clone(),
            shared: self.shared.clone(),
            cfg: cfg.clone(),
            door: self.engine.door().clone(),
            furthest,
            attest,
            federation: self.federation.clone(),
        };
        let mut providers = vec![source];
        if let Some(author) = net::peer_id_of(&manifest.message().author)
            && author != source
        {
            providers.push(author);
        }
        let tx = self.findings_tx.clone();
        tracing::debug!(round = manifest.message().round, version = %manifest.id().short(), "verifying a version");
        self.tasks.spawn(async move {
            let result = verify_offered(&ctx, &manifest, &providers).await;
            let _ = tx
                .send(Finding {
                    manifest,
                    source,
                    gossip,
                    result,
                })
                .await;
        });
        true
    }

    /// This node's attestation of version `id`: only of a version it
    /// verified by recomputation (or made) and holds, not one it took on
    /// attestations, and not of its own (its manifest says it already).
    pub(super) fn attestation(&self, id: &ContentId) -> Option<Verified<ModelManifest>> {
        if !self.is_verified(id) || matches!(self.store.get_ref(&attested_ref(id)), Ok(Some(_))) {
            return None;
        }
        let m = self.store.get_model_manifest(id).ok()??;
        if m.message().author == self.key.node_id() {
            return None;
        }
        attest::attest(m.message(), &self.key)
    }
}

/// Versions verified at once (each on its own task); announcements beyond
/// that are ignored until one finishes (head probes bring them back).
pub(super) const MAX_VERIFYING: usize = 16;

/// Next-round versions held back at once until this node closes its round
/// (more are verified at once, as before).
pub(super) const MAX_EARLY: usize = 16;

/// Takes a version out of the set of versions being verified.
pub(super) fn forget(offered: &Mutex<std::collections::HashSet<ContentId>>, id: ContentId) {
    if let Ok(mut o) = offered.lock() {
        o.remove(&id);
    }
}

/// A version made or verified lately: its manifest, its id, and its
/// parameters while something else (the engine's head) still holds them.
type RecentVersion = (ModelManifest, ContentId, std::sync::Weak<Vec<f32>>);

/// Versions made or verified lately, by their inputs (bounded).
#[derive(Clone, Default)]
pub(super) struct Recent(Arc<Mutex<std::collections::VecDeque<RecentVersion>>>);

impl Recent {
    const KEEP: usize = 64;

    /// Remembers a version; with `params`, the buffer that holds its
    /// parameters (not kept alive by this).
    pub(super) fn add(&self, m: &ModelManifest, id: ContentId, params: Option<&Arc<Vec<f32>>>) {
        if let Ok(mut r) = self.0.lock() {
            if r.len() >= Self::KEEP {
                r.pop_front();
            }
            r.push_back((
                m.clone(),
                id,
                params.map_or_else(Default::default, Arc::downgrade),
            ));
        }
    }

    /// A recent version that is the same computation as `m`.
    fn same_computation(&self, l: &impl Lineage, m: &ModelManifest) -> Option<RecentVersion> {
        let r = self.0.lock().ok()?.clone();
        r.into_iter()
            .rev()
            .find(|(held, _, _)| verify::same_computation(l, held, m))
    }
}

/// What a verification task needs.
#[derive(Clone)]
pub(super) struct VerifyCtx {
    recent: Recent,
    /// One recomputation at a time (see [`recompute_offered`]).
    recomputing: Arc<tokio::sync::Semaphore>,
    net: NetHandle,
    store: Store,
    shared: Shared,
    cfg: EngineConfig,
    door: Door,
    /// The furthest round this node recomputes up to (its round plus
    /// `max_rounds_ahead`).
    furthest: u64,
    /// A permissioned region's attestation settings (`None`: open region,
    /// recomputation only).
    attest: Option<AttestCtx>,
    /// The federation of regions, if any: a mix names foreign heads,
    /// taken on their regions' attestations before it is recomputed.
    federation: Option<federating::FedCtx>,
}

/// Who may vouch for a version, whom to ask, and how many must.
#[derive(Clone)]
pub(super) struct AttestCtx {
    members: BTreeSet<NodeId>,
    ask: Vec<PeerId>,
    threshold: usize,
}

/// A version's parameters as verified and how it compares with the head,
/// or why it was refused.
pub(super) type Verification = Result<(Arc<Vec<f32>>, heads::Assessment), VersionRejection>;

/// What verifying one offered version found.
pub(super) struct Finding {
    manifest: Verified<ModelManifest>,
    source: PeerId,
    gossip: Option<libp2p::gossipsub::MessageId>,
    result: Verification,
}

/// The chunk store as [`Lineage`], with the manifests fetched for one
/// verification held aside until they pass (so nothing unverified is
/// stored as valid or served to peers).
pub(super) struct StoreLineage<'a> {
    store: &'a Store,
    models: HashMap<ContentId, Verified<ModelManifest>>,
    deltas: HashMap<ContentId, Verified<DeltaManifest>>,
}

/// A delta's payload read from the store a range at a time, each chunk
/// verified (BLAKE3) as it is read, the last one read kept: what a
/// recomputation, and the engine when a round closes, aggregate from, so a
/// stored delta is never loaded whole.
pub(super) struct StoredPayload {
    store: Store,
    ids: Vec<ContentId>,
    chunk: usize,
    len: u64,
    cached: std::sync::Mutex<Option<(usize, tapestry_storage::Bytes)>>,
}

impl StoredPayload {
    /// The payload of `m` in `store` (`None` for a chunk size of zero).
    pub(super) fn new(store: Store, m: &DeltaManifest) -> Option<Self> {
        let chunk = usize::try_from(m.chunk_size).ok().filter(|c| *c > 0)?;
        Some(Self {
            store,
            ids: m.chunk_ids.clone(),
            chunk,
            len: m.payload_bytes,
            cached: std::sync::Mutex::new(None),
        })
    }

    /// Chunk `i`, from the one kept or the store.
    fn chunk_bytes(&self, i: usize) -> Result<tapestry_storage::Bytes, String> {
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, bytes)) = &*cached
            && *at == i
        {
            return Ok(bytes.clone());
        }
        let id = self
            .ids
            .get(i)
            .ok_or("a range beyond the payload's chunks")?;
        let bytes = self
            .store
            .get_verified(id)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("chunk {} is not held", id.short()))?;
        // Cut as the protocol cuts (every chunk `chunk` bytes, the last
        // the rest), or offsets would not be where the manifest puts them.
        let expected = usize::try_from(self.len.saturating_sub((i * self.chunk) as u64))
            .unwrap_or(usize::MAX)
            .min(self.chunk);
        if bytes.len() != expected {
            return Err(format!(
                "chunk {} is {} bytes where the payload's cut has {expected}",
                id.short(),
                bytes.len()
            ));
        }
        *cached = Some((i, bytes.clone()));
        Ok(bytes)
    }
}

impl std::fmt::Debug for StoredPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredPayload")
            .field("chunks", &self.ids.len())
            .field("chunk", &self.chunk)
            .finish()
    }
}

impl tapestry_core::aggregate::PayloadSource for StoredPayload {
    fn read_at(&self, start: usize, out: &mut [u8]) -> Result<(), String> {
        let mut done = 0;
        while done < out.len() {
            let pos = start + done;
            let (i, off) = (pos / self.chunk, pos % self.chunk);
            let bytes = self.chunk_bytes(i)?;
            let take = bytes.len().saturating_sub(off).min(out.len() - done);
            if take == 0 {
                return Err("the payload is shorter than its manifest says".into());
            }
            out[done..done + take].copy_from_slice(&bytes[off..off + take]);
            done += take;
        }
        Ok(())
    }
}

impl Lineage for StoreLineage<'_> {
    fn model(&self, id: &ContentId) -> Option<Verified<ModelManifest>> {
        self.models
            .get(id)
            .cloned()
            .or_else(|| self.store.get_model_manifest(id).ok().flatten())
    }

    fn delta(&self, id: &ContentId) -> Option<Verified<DeltaManifest>> {
        self.deltas
            .get(id)
            .cloned()
            .or_else(|| self.store.get_delta_manifest(id).ok().flatten())
    }

    fn has_payload(&self, d: &Verified<DeltaManifest>) -> bool {
        d.message()
            .chunk_ids
            .iter()
            .all(|c| self.store.has(c).unwrap_or(false))
    }

    fn payload(&self, d: &Verified<DeltaManifest>) -> Option<Vec<u8>> {
        let m = d.message();
        self.store.read_payload(&m.chunk_ids, m.payload_bytes).ok()
    }

    fn payload_source(
        &self,
        d: &Verified<DeltaManifest>,
    ) -> Option<Box<dyn tapestry_core::aggregate::PayloadSource + '_>> {
        Some(Box::new(StoredPayload::new(
            self.store.clone(),
            d.message(),
        )?))
    }

    fn is_verified(&self, id: &ContentId) -> bool {
        is_verified(self.store, id)
    }

    fn params(&self, id: &ContentId) -> Option<Vec<f32>> {
        let m = self.store.get_model_manifest(id).ok().flatten()?;
        read_params(&**self.store, m.message())
    }
}

/// Fetches one signed manifest by id from the first provider that has it.
pub(super) async fn fetch_manifest(
    net: &NetHandle,
    providers: &[PeerId],
    id: ContentId,
) -> Option<Vec<u8>> {
    for peer in providers {
        if let Ok(FetchResponse::SignedManifest(b)) =
            net.fetch(*peer, FetchRequest::SignedManifest(id)).await
        {
            return Some(b);
        }
    }
    None
}

/// Verifies `target`: by recomputation, or — where that is impossible (the
/// version is too far ahead, or ancestors or deltas cannot be had) and the
/// region is permissioned — on the attestations of enough roster members.
pub(super) async fn verify_offered(
    ctx: &VerifyCtx,
    target: &Verified<ModelManifest>,
    providers: &[PeerId],
) -> Verification {
    let m = target.message();
    let far = m.round > ctx.furthest;
    let mut recomputed = if far {
        Err(VersionRejection::RoundJump {
            round: m.round,
            expected: ctx.furthest,
        })
    } else {
        recompute_offered(ctx, target, providers).await
    };
    // A mix of regions (the version or one of its ancestors) names
    // foreign heads this node may not hold: each is taken on its own
    // region's attestations, then the version recomputed (at most as many
    // times as a mix has foreign parents, for each mix in its lineage
    // that is not verified here: bounded by the lineage's limits).
    if let Some(fed) = &ctx.federation {
        let most = fed.fed.neighbours(&ctx.cfg.region).len().saturating_mul(4);
        for _ in 0..most {
            let Err(VersionRejection::UnknownParent(p)) = &recomputed else {
                break;
            };
            // Only a foreign head (its manifest from the store or the
            // peers that offered the version); another unknown parent is
            // this region's, for attestations or for later.
            let held = ctx.store.get_model_manifest(p).ok().flatten();
            let region = match held {
                Some(v) => Some(v.message().region.clone()),
                None => fetch_manifest(&ctx.net, providers, *p)
                    .await
                    .and_then(|b| Signed::<ModelManifest>::open(&b).ok())
                    .filter(|v| v.id() == *p)
                    .map(|v| v.message().region.clone()),
            };
            if region.is_none_or(|r| r == ctx.cfg.region) {
                break;
            }
            let env = federating::ForeignEnv {
                net: &ctx.net,
                store: &ctx.store,
                shared: &ctx.shared,
                cfg: &ctx.cfg,
                fed,
            };
            match federating::take_foreign(&env, *p, None, providers).await {
                Ok(_) => recomputed = recompute_offered(ctx, target, providers).await,
                Err(why) => {
                    tracing::debug!(version = %target.id().short(), parent = %p.short(), %why, "foreign parent not taken");
                    break;
                }
            }
        }
    }
    let impossible = far
        || matches!(
            recomputed,
            Err(VersionRejection::UnknownParent(_)
                | VersionRejection::UnknownDelta(_)
                | VersionRejection::TooFarBehind { .. })
        );
    match (recomputed, &ctx.attest) {
        (Err(e), Some(a)) if impossible => match take_attested(ctx, a, target).await {
            Ok(taken) => Ok(taken),
            Err(why) => {
                tracing::debug!(version = %target.id().short(), %why, "not attested");
                Err(e)
            }
        },
        (r, _) => r,
    }
}

/// Takes `target` on attestations: asks the connected roster members for
/// theirs, and if at least the threshold of distinct members vouch for it
/// (its author included), fetches its parameters by their chunk ids and
/// keeps it, marked verified and attested, with the attestations.
pub(super) async fn take_attested(
    ctx: &VerifyCtx,
    a: &AttestCtx,
    target: &Verified<ModelManifest>,
) -> Result<(Arc<Vec<f32>>, heads::Assessment), String> {
    let m = target.message();
    let asks = a.ask.iter().map(|peer| {
        let net = ctx.net.clone();
        async move {
            (
                *peer,
                net.fetch(*peer, FetchRequest::Attest(target.id())).await,
            )
        }
    });
    let mut attestations = Vec::new();
    let mut from = Vec::new();
    for (peer, answer) in futures::future::join_all(asks).await {
        if let Ok(FetchResponse::SignedManifest(bytes)) = answer
            && let Ok(v) = Signed::<ModelManifest>::open(&bytes)
            && attest::attests(v.message(), m)
        {
            attestations.push(v);
            from.push(peer);
        }
    }
    let vouchers = attest::vouchers(target, &attestations, &a.members);
    if vouchers.len() < a.threshold {
        return Err(format!(
            "{} of {} roster members vouch for it",
            vouchers.len(),
            a.threshold
        ));
    }
    if let Some(author) = net::peer_id_of(&m.author)
        && !from.contains(&author)
    {
        from.push(author);
    }
    let params = fetch_params(ctx, target.id(), m, &from).await?;
    let kept = (|| -> Result<(), tapestry_storage::StoreError> {
        for v in &attestations {
            ctx.store.put_model_manifest(v)?;
        }
        ctx.store.put_model_manifest(target)?;
        ctx.store
            .set_ref(&attested_ref(&target.id()), target.id())?;
        ctx.store
            .set_ref(&verified_ref(&target.id()), target.id())?;
        Ok(())
    })();
    kept.map_err(|e| e.to_string())?;
    tracing::info!(round = m.round, version = %target.id().short(), vouchers = vouchers.len(), "version taken on roster members' attestations");
    ctx.shared.metrics.versions_attested.inc();
    let head = ctx.store.get_ref(HEAD_REF).ok().flatten();
    let mut assessment = heads::Assessment::attested(head, vouchers.len());
    // With momentum, the next step continues this version's own: its
    // parent's parameters are needed to make or check the next version.
    if let Some(parent) = verify::previous_step_parent(&ctx.cfg, m) {
        assessment.previous = fetch_version_params(ctx, parent, &from).await.map(Arc::new);
        tracing::info!(
            parent = %parent.short(),
            held = assessment.previous.is_some(),
            "parameters of the attested version's parent fetched for the momentum step"
        );
    }
    Ok((Arc::new(params), assessment))
}

/// A version's parameters, fetched from `from` by its chunk ids (its
/// signed manifest too, if not held) and kept in the store; whether this
/// node verified the version or not, the bits are the ones its manifest
/// names. `None` if they cannot be had.
async fn fetch_version_params(ctx: &VerifyCtx, id: ContentId, from: &[PeerId]) -> Option<Vec<f32>> {
    let manifest = match ctx.store.get_model_manifest(&id).ok().flatten() {
        Some(m) => m,
        None => {
            let bytes = fetch_manifest(&ctx.net, from, id).await?;
            let v = Signed::<ModelManifest>::open(&bytes).ok()?;
            if v.id() != id {
                return None;
            }
            ctx.store.put_model_manifest(&v).ok()?;
            v
        }
    };
    fetch_params(ctx, id, manifest.message(), from).await.ok()
}

/// The parameters of version `id` (manifest `m`), fetched from `from` by
/// their chunk ids into the store and read back, or what kept them from
/// being had.
async fn fetch_params(
    ctx: &VerifyCtx,
    id: ContentId,
    m: &ModelManifest,
    from: &[PeerId],
) -> Result<Vec<f32>, String> {
    if !fetch_chunks(
        &ctx.net,
        &ctx.store,
        id,
        &m.chunk_ids,
        (from, None),
        &ctx.shared,
    )
    .await
    {
        return Err("its parameters could not be had".into());
    }
    let params = read_params(&*ctx.store, m).ok_or("its parameters could not be read back")?;
    if params.len() != ctx.cfg.spec.n_params() || params.iter().any(|v| !v.is_finite()) {
        return Err("its parameters are malformed".into());
    }
    Ok(params)
}

/// The same computation (parent and deltas) as a version this node made or
/// verified: its parameters are known, so compare instead of recomputing.
/// `None` if there is no such version (or it cannot be read).
fn match_offered(
    ctx: &VerifyCtx,
    l: &StoreLineage<'_>,
    target: &Verified<ModelManifest>,
) -> Option<Verification> {
    let (held, held_id, held_params) = ctx.recent.same_computation(l, target.message())?;
    if !is_verified(&ctx.store, &held_id) {
        return None;
    }
    if held.chunk_ids != target.message().chunk_ids {
        return Some(Err(VersionRejection::Mismatch));
    }
    // The buffer that holds them already (the head's, usually), or read
    // back from the store.
    let params = match held_params.upgrade() {
        Some(p) => p,
        None => Arc::new(l.params(&held_id)?),
    };
    ctx.store
        .put_model_manifest(target)
        .and_then(|_| ctx.store.set_ref(&verified_ref(&target.id()), target.id()))
        .ok()?;
    ctx.shared.metrics.versions_matched.inc();
    let authors = verify::distinct_authors(l, target.message());
    let head = ctx.store.get_ref(HEAD_REF).ok().flatten();
    let assessment = heads::assess(l, &ctx.cfg, head, target, authors);
    Some(Ok((params, assessment)))
}

/// Manifests one verification may fetch, at most: a catch-up over
/// `max_rounds_ahead` (1,024) rounds in a region of a dozen authors. A
/// version whose lineage needs more is refused (`lineage_too_large`), not
/// held against the peer (it may be honest and this node far behind).
pub(super) const MAX_LINEAGE_MANIFESTS: usize = 16 * 1024;
/// Bytes of manifests one verification may hold, at most (they stay in
/// memory until the version passes): 64 MiB, so that the
/// [`MAX_VERIFYING`] verifications at once hold at most 1 GiB.
pub(super) const MAX_LINEAGE_BYTES: usize = 64 << 20;

/// What one verification has fetched so far, against its limits.
#[derive(Default)]
struct Fetched {
    manifests: usize,
    bytes: usize,
}

impl Fetched {
    fn add(&mut self, bytes: usize) -> Result<(), VersionRejection> {
        self.manifests += 1;
        self.bytes += bytes;
        if self.manifests > MAX_LINEAGE_MANIFESTS || self.bytes > MAX_LINEAGE_BYTES {
            return Err(VersionRejection::LineageTooLarge {
                manifests: self.manifests,
                bytes: self.bytes,
            });
        }
        Ok(())
    }
}

/// Fetches what recomputing `target` needs — ancestors' manifests in one
/// walk ([`gather_ancestors`]), then deltas' manifests, then payloads —
/// into `l` and the store; the versions to recompute, oldest first. At
/// most [`MAX_LINEAGE_MANIFESTS`] manifests and [`MAX_LINEAGE_BYTES`] of
/// them; the delta payloads fetched are each checked against the layout
/// by the door before they are aggregated (and collected with the rest if
/// the version fails).
async fn gather(
    ctx: &VerifyCtx,
    l: &mut StoreLineage<'_>,
    target: &Verified<ModelManifest>,
    providers: &[PeerId],
    max_chain: usize,
) -> Result<Vec<ContentId>, VersionRejection> {
    let mut fetched = Fetched::default();
    gather_ancestors(ctx, l, target, providers, max_chain, &mut fetched).await?;
    for _ in 0..=max_chain {
        let (models, deltas, payloads) = match verify::plan(&*l, &ctx.cfg, target, max_chain)? {
            Plan::Ready(order) => return Ok(order),
            Plan::Need {
                models,
                deltas,
                payloads,
            } => (models, deltas, payloads),
        };
        // Every ancestor is held after `gather_ancestors`.
        if let Some(id) = models.first() {
            return Err(VersionRejection::UnknownParent(*id));
        }
        let progress = !deltas.is_empty() || !payloads.is_empty();
        for id in &deltas {
            let got = fetch_manifest(&ctx.net, providers, *id)
                .await
                .and_then(|b| Signed::<DeltaManifest>::open(&b).ok())
                .filter(|v| v.id() == *id)
                .ok_or(VersionRejection::UnknownDelta(*id))?;
            fetched.add(got.envelope_bytes().len())?;
            l.deltas.insert(*id, got);
        }
        for dm in &payloads {
            let mut from = providers.to_vec();
            if let Some(author) = net::peer_id_of(&dm.message().author)
                && !from.contains(&author)
            {
                from.push(author);
            }
            // Into memory first: the chunks reach the store only once the
            // payload passes the door, so a version naming a bad delta
            // leaves nothing of it on disk.
            let m = dm.message();
            let payload = fetch_payload(&ctx.net, &ctx.store, dm, &from, &ctx.shared, None)
                .await
                .ok_or(VersionRejection::UnknownDelta(dm.id()))?;
            ctx.door
                .check_named_payload(m, &payload)
                .map_err(VersionRejection::DeltaRejected)?;
            if !space::room_for(&ctx.shared, payload.len()) {
                return Err(VersionRejection::UnknownDelta(dm.id()));
            }
            let stored = put_fetched(&ctx.store, m, &payload);
            drop(payload);
            if let Err(e) = stored {
                tracing::warn!(error = %e, delta = %dm.id().short(), "cannot store a delta fetched for verification");
                space::note_failure(&ctx.shared, &e);
                return Err(VersionRejection::UnknownDelta(dm.id()));
            }
            ctx.shared
                .metrics
                .verify_fetched_bytes
                .inc_by(m.payload_bytes);
        }
        if !progress {
            return Err(VersionRejection::TooFarBehind { limit: max_chain });
        }
    }
    Err(VersionRejection::TooFarBehind { limit: max_chain })
}

/// Fetches the unverified ancestors of `target` back to versions this
/// node verified: each manifest once, each checked for shape and for its
/// round against the version that names it as it arrives, at most
/// `max_chain` of them. One walk, so a line of n versions costs n look-ups
/// (planning again after each generation cost n²).
async fn gather_ancestors(
    ctx: &VerifyCtx,
    l: &mut StoreLineage<'_>,
    target: &Verified<ModelManifest>,
    providers: &[PeerId],
    max_chain: usize,
    fetched: &mut Fetched,
) -> Result<(), VersionRejection> {
    let mut seen = HashSet::from([target.id()]);
    // (parent, (round, parents) of the version that names it).
    let named = |child: &ModelManifest| -> Vec<(ContentId, (u64, usize))> {
        let of = (child.round, child.parents.len());
        child.parents.iter().map(|p| (*p, of)).collect()
    };
    let mut stack = named(target.message());
    while let Some((id, child)) = stack.pop() {
        if l.is_verified(&id) || !seen.insert(id) {
            continue;
        }
        if seen.len() > max_chain {
            return Err(VersionRejection::TooFarBehind { limit: max_chain });
        }
        let v = match l.model(&id) {
            Some(v) => v,
            None => {
                let got = fetch_manifest(&ctx.net, providers, id)
                    .await
                    .and_then(|b| Signed::<ModelManifest>::open(&b).ok())
                    .filter(|v| v.id() == id)
                    .ok_or(VersionRejection::UnknownParent(id))?;
                fetched.add(got.envelope_bytes().len())?;
                l.models.insert(id, got.clone());
                got
            }
        };
        let m = v.message();
        verify::check_parent_round(child, m.round)?;
        if m.region != ctx.cfg.region && child.1 >= 2 {
            // A foreign head a mix names: not this region's to recompute;
            // taken on its own region's attestations, or not at all.
            return Err(VersionRejection::UnknownParent(id));
        }
        check_shape(&ctx.cfg, m, u64::MAX - ctx.cfg.door.max_rounds_ahead)?;
        stack.extend(named(m));
    }
    Ok(())
}

/// Verifies `target` by recomputation: fetches what [`verify::plan`] says
/// is missing (ancestor and delta manifests, delta chunks) from
/// `providers`, then recomputes every unverified version from its verified
/// parent, oldest first, storing each that passes (parameters as this node
/// computed them, never as a peer sent them) and marking it verified.
pub(super) async fn recompute_offered(
    ctx: &VerifyCtx,
    target: &Verified<ModelManifest>,
    providers: &[PeerId],
) -> Verification {
    let mut l = StoreLineage {
        store: &ctx.store,
        models: HashMap::new(),
        deltas: HashMap::new(),
    };
    if let Some(matched) = match_offered(ctx, &l, target) {
        return matched;
    }
    let max_chain = (ctx.cfg.door.max_rounds_ahead as usize)
        .saturating_mul(2)
        .saturating_add(16);
    let order = gather(ctx, &mut l, target, providers, max_chain).await?;
    // The recomputation itself on a blocking thread, one at a time: each
    // holds a few models' worth of memory (the parent, the decoded deltas,
    // the result) and keeps a core busy for as long as it takes (seconds
    // for a large model), so two at once would double the memory on two
    // cores and hold up the runtime's threads.
    let Ok(permit) = ctx.recomputing.clone().acquire_owned().await else {
        return Err(VersionRejection::UnknownParent(target.id()));
    };
    let (models, deltas) = (std::mem::take(&mut l.models), std::mem::take(&mut l.deltas));
    let (job, version) = (ctx.clone(), target.clone());
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        recompute_in_order(&job, models, deltas, &version, &order)
    })
    .await
    .unwrap_or_else(|_| {
        tracing::error!(version = %target.id().short(), "recomputing a version panicked");
        Err(VersionRejection::UnknownParent(target.id()))
    })
}

/// [`recompute_offered`]'s recomputation, once every ancestor and delta is
/// held: verifies the versions of `order` oldest first, storing each that
/// passes, and assesses `target`.
fn recompute_in_order(
    ctx: &VerifyCtx,
    models: HashMap<ContentId, Verified<ModelManifest>>,
    deltas: HashMap<ContentId, Verified<DeltaManifest>>,
    target: &Verified<ModelManifest>,
    order: &[ContentId],
) -> Verification {
    let mut l = StoreLineage {
        store: &ctx.store,
        models,
        deltas,
    };
    let store = ctx.store.clone();
    let started = Instant::now();
    let mut recomputed = 0;
    let mut keep_s = 0.0;
    let checked = verify::verify_in_order(
        &mut l,
        &ctx.cfg,
        &ctx.door,
        target,
        order,
        |l, v, checked| {
            // Keep it: the deltas it names, its parameters as computed here,
            // its manifest, and the mark that it is verified.
            let keeping = Instant::now();
            if !space::room_for(&ctx.shared, checked.params.len() * 4) {
                return Err(VersionRejection::UnknownParent(v.id()));
            }
            let kept = (|| -> Result<(), tapestry_storage::StoreError> {
                for d in &v.message().deltas {
                    if let Some(dm) = l.deltas.get(d) {
                        store.put_delta_manifest(dm)?;
                    }
                }
                put_params(&store, v.message(), &checked.params)?;
                store.put_model_manifest(v)?;
                store.set_ref(&verified_ref(&v.id()), v.id())?;
                Ok(())
            })();
            recomputed += 1;
            keep_s += keeping.elapsed().as_secs_f64();
            if kept.is_ok() {
                ctx.recent.add(v.message(), v.id(), None);
            }
            kept.map_err(|e| {
                tracing::error!(error = %e, "cannot store a verified version");
                space::note_failure(&ctx.shared, &e);
                VersionRejection::UnknownParent(v.id())
            })
        },
    );
    let took = (started.elapsed().as_secs_f64() - keep_s).max(0.0);
    ctx.shared.metrics.recompute_seconds.inc_by(took);
    ctx.shared.metrics.versions_verified.inc_by(recomputed);
    ctx.shared.metrics.keep_verified_seconds.inc_by(keep_s);
    let m = &ctx.shared.metrics;
    m.time(Stage::Verify, Duration::from_secs_f64(took));
    m.time(Stage::Store, Duration::from_secs_f64(keep_s));
    let checked = checked?;
    let head = ctx.store.get_ref(HEAD_REF).ok().flatten();
    let assessment = heads::assess(&l, &ctx.cfg, head, target, checked.authors);
    Ok((Arc::new(checked.params), assessment))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verification_fetches_no_more_manifests_or_bytes_than_its_limits() {
        let mut f = Fetched::default();
        for _ in 0..MAX_LINEAGE_MANIFESTS {
            assert!(f.add(100).is_ok());
        }
        assert!(matches!(
            f.add(100),
            Err(VersionRejection::LineageTooLarge { manifests, .. }) if manifests == MAX_LINEAGE_MANIFESTS + 1
        ));
        let mut f = Fetched::default();
        assert!(f.add(MAX_LINEAGE_BYTES - 1).is_ok());
        let refused = f.add(2).map_err(Rejection::from);
        // Refused, but not held against whoever offered it.
        assert_eq!(
            refused.as_ref().map_err(Rejection::verdict),
            Err(Verdict::Ignore)
        );
        assert_eq!(
            refused.as_ref().map_err(Rejection::label),
            Err("lineage_too_large")
        );
    }
}
