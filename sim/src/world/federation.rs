//! Regions federating: when a node's engine waits for foreign heads (its
//! region's plain version of a mix round), the node takes the agreed head
//! of each neighbouring region of that round — the version more than a
//! third of that region's members adopted, i.e. attested — as the real
//! node takes a version on attestations. The first member of a region to
//! take a foreign head fetches it across regions from one of its vouchers;
//! the other members get it from that member, inside the region. The
//! engine then mixes ([`tapestry_core::federation`]) and announces the mix
//! to its region like any version, and members verify it by recomputation.

use super::*;

/// What federation keeps track of in a run.
#[derive(Default)]
pub(super) struct Federating {
    /// When each node began waiting for the foreign heads of a round.
    asked: BTreeMap<(usize, u64), u64>,
    /// The members of each region that adopted each plain version of a
    /// mix round: (region, round) → version → members.
    adopted: BTreeMap<(usize, u64), BTreeMap<ContentId, BTreeSet<usize>>>,
    /// Foreign heads already in a region: (region, head) → the member that
    /// fetched it across.
    carried: BTreeMap<(usize, ContentId), usize>,
    /// A bad region's forged heads, by the real head's id.
    forged: BTreeMap<ContentId, ContentId>,
    /// Mix versions nodes adopted.
    pub mixes: u64,
    /// Foreign heads fetched across regions.
    pub heads_carried: u64,
}

impl World<'_> {
    /// Notes a version node `i` adopted: a plain version of a mix round
    /// counts as its attestation; a mix as a mix.
    pub(super) fn note_for_federation(&mut self, i: usize, manifest: &Verified<ModelManifest>) {
        let Some(fed) = &self.settings.federation else {
            return;
        };
        let m = manifest.message();
        if m.parents.len() == 1 && fed.is_mix_round(m.round) {
            self.federating
                .adopted
                .entry((self.region[i], m.round))
                .or_default()
                .entry(manifest.id())
                .or_default()
                .insert(i);
        } else if m.parents.len() > 1 && fed.is_mix_round(m.round) {
            self.federating.mixes += 1;
        }
    }

    /// After node `i` handled an input: if its engine now waits for
    /// foreign heads it was not yet getting, start gathering them.
    pub(super) fn maybe_federate(&mut self, i: usize, now: u64) {
        let Some(round) = self.engines[i].awaits_foreign_heads() else {
            return;
        };
        if self.federating.asked.contains_key(&(i, round)) {
            return;
        }
        self.federating.asked.insert((i, round), now);
        self.gather_foreign_heads(i, now, round);
    }

    /// The head of region `s` for mix round `round` that more than a third
    /// of its members vouch for (adopted), the most vouched first, then the
    /// smallest id; with the members that vouch for it.
    fn agreed_head(&self, s: usize, round: u64) -> Option<(ContentId, BTreeSet<usize>)> {
        let roster = self.region.iter().filter(|r| **r == s).count();
        let need = attest::threshold(roster, 0);
        self.federating
            .adopted
            .get(&(s, round))?
            .iter()
            .filter(|(_, by)| by.len() >= need)
            .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(a.0)))
            .map(|(id, by)| (*id, by.clone()))
    }

    /// Node `i` gathers the agreed heads of its neighbouring regions for
    /// `round`; while some are not agreed yet and three quarters of the
    /// wait remain, it looks again two latencies later; then it hands
    /// what it has to its engine as they arrive.
    pub(super) fn gather_foreign_heads(&mut self, i: usize, now: u64, round: u64) {
        let Some(fed) = self.settings.federation.clone() else {
            return;
        };
        if !self.net.online[i] || self.engines[i].round() != round {
            return;
        }
        let own = self.region[i];
        let name = crate::scenario::region_name(own);
        let neighbours: Vec<usize> = (0..self.settings.scenario.regions)
            .filter(|s| {
                fed.weight(&name, &crate::scenario::region_name(*s))
                    .is_some()
            })
            .collect();
        let found: Vec<(ContentId, BTreeSet<usize>)> = neighbours
            .iter()
            .filter_map(|s| self.agreed_head(*s, round))
            .collect();
        let began = self
            .federating
            .asked
            .get(&(i, round))
            .copied()
            .unwrap_or(now);
        let retry = 2 * self.net.latency_ms().max(1);
        if found.len() < neighbours.len() && now + retry < began + fed.wait_ms * 3 / 4 {
            self.push(now + retry, Event::Federate { node: i, round });
            return;
        }
        let mut heads = Vec::new();
        let mut arrives = now;
        for (id, vouchers) in found {
            let id = self.poisoned(id, &vouchers).unwrap_or(id);
            let (Some(m), Some(params)) = (self.versions.get(&id), self.version_params.get(&id))
            else {
                continue;
            };
            // The version, its parameters and the vouchers' attestations.
            let bytes = m.envelope_bytes().len() as u64 * (1 + vouchers.len() as u64)
                + params.len() as u64 * 4;
            let from = match self.federating.carried.get(&(own, id)) {
                Some(&member) if member != i => member,
                _ => {
                    // Across regions, from the first voucher that is online.
                    let Some(&voucher) = vouchers.iter().find(|v| self.net.online[**v]) else {
                        continue;
                    };
                    voucher
                }
            };
            let Ok(at) = self.net.send(from, i, now, bytes) else {
                continue;
            };
            if self.region[from] != own {
                self.federating.carried.insert((own, id), i);
                self.federating.heads_carried += 1;
            }
            arrives = arrives.max(at);
            heads.push((m.clone(), Arc::new(params.clone())));
        }
        if !heads.is_empty() {
            let input = Input::ForeignHeads(heads);
            self.push(arrives, Event::Deliver { node: i, input });
        }
    }
}

impl World<'_> {
    /// What a bad region (every voucher an attacker with `poison-head`)
    /// hands out for its head `id`: a forged version of the same round and
    /// parent with its parameters negated and scaled by ten, signed by one
    /// of them (every one of them vouches for it); `None` otherwise.
    fn poisoned(&mut self, id: ContentId, vouchers: &BTreeSet<usize>) -> Option<ContentId> {
        let bad = self.attack == Some(Attack::PoisonHead)
            && vouchers.iter().all(|v| self.byzantine.contains(v));
        if !bad {
            return None;
        }
        if let Some(forged) = self.federating.forged.get(&id) {
            return Some(*forged);
        }
        let signer = *vouchers.first()?;
        let params: Vec<f32> = self
            .version_params
            .get(&id)?
            .iter()
            .map(|v| -10.0 * v)
            .collect();
        let mut m = self.versions.get(&id)?.message().clone();
        m.chunk_ids = verify::params_chunk_ids(&params, m.chunk_size as usize);
        m.author = self.keys[signer].node_id();
        let forged = Signed::sign(m, &self.keys[signer]).ok()?;
        let forged_id = forged.id();
        self.versions.insert(forged_id, forged);
        self.version_params.insert(forged_id, params);
        self.federating.forged.insert(id, forged_id);
        Some(forged_id)
    }

    /// Each region's figures at the end (none with one region): its honest
    /// nodes' heads on the whole test set; a region of attackers only is
    /// left out.
    pub(super) fn region_figures(&self) -> Result<Vec<RegionFigures>, SimError> {
        let k = self.settings.scenario.regions;
        if k < 2 {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(k);
        for r in 0..k {
            let members: Vec<usize> = self
                .honest
                .iter()
                .copied()
                .filter(|v| self.region[*v] == r)
                .collect();
            if members.is_empty() {
                continue;
            }
            let models: Vec<Vec<f32>> = members.iter().map(|v| self.heads[*v].1.clone()).collect();
            let (spec, test) = (&self.spec, &self.data.test);
            let scores = par::map(&models, self.threads, |p| evaluate_on(spec, p, test))
                .into_iter()
                .collect::<Result<Vec<_>, _>>()?;
            let acc: Vec<f32> = scores.iter().filter_map(|e| e.accuracy).collect();
            let bits: Vec<f64> = scores.iter().filter_map(|e| e.bits_per_byte).collect();
            let mut parts: BTreeMap<String, f64> = BTreeMap::new();
            for e in &scores {
                for (name, b) in &e.parts {
                    *parts.entry(name.clone()).or_default() += b / scores.len() as f64;
                }
            }
            out.push(RegionFigures {
                name: crate::scenario::region_name(r),
                nodes: members.len(),
                accuracy_mean: (!acc.is_empty())
                    .then(|| acc.iter().sum::<f32>() / acc.len() as f32),
                accuracy_min: acc.iter().copied().reduce(f32::min),
                bits_per_byte_mean: (!bits.is_empty())
                    .then(|| bits.iter().sum::<f64>() / bits.len() as f64),
                bits_per_byte_parts: parts,
                consensus_distance: consensus_distance(&models),
            });
        }
        Ok(out)
    }
}
