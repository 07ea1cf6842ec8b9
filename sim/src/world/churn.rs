//! Nodes leaving and coming back, cuts noticed and healed, and catch-up
//! never on one peer's word: attestations in broadcast mode, the median
//! of several neighbours' models in mixing and push-sum modes.

use super::*;

impl World<'_> {
    /// A churn period begins: a fresh random set of nodes is offline until
    /// the next one. Once every online honest node has finished, everyone
    /// comes back (and catches up) and churn stops.
    pub(super) fn churn_period(&mut self, now: u64) {
        let Some(churn) = self.settings.churn else {
            return;
        };
        let rounds = self.settings.scenario.rounds;
        let n = self.keys.len();
        let finished = self
            .honest
            .iter()
            .filter(|v| self.net.online[**v])
            .all(|&v| self.engines[v].round() >= rounds);
        let mut away = BTreeSet::new();
        if !finished {
            let mut all: Vec<usize> = (0..n).collect();
            all.shuffle(&mut self.rng);
            away.extend(
                all.into_iter()
                    .take((churn.fraction * n as f64).round() as usize),
            );
            self.push(now + churn.period_ms, Event::Churn);
        }
        for v in 0..n {
            match (self.net.online[v], away.contains(&v)) {
                (true, true) => self.leave(v, now),
                (false, false) => self.rejoin(v, now),
                _ => {}
            }
        }
    }

    /// Every online node hears that its peers across cut `k` left (or,
    /// once it heals, came back).
    pub(super) fn cut_noticed(&mut self, k: usize, healed: bool, now: u64) {
        let group = &self.settings.cuts[k].group;
        for v in 0..self.keys.len() {
            if !self.net.online[v] {
                continue;
            }
            for p in self.peers_of(v) {
                if group[p] == group[v] || !self.net.online[p] {
                    continue;
                }
                let id = self.keys[p].node_id();
                let input = if healed {
                    Input::PeerJoined(id)
                } else {
                    Input::PeerLeft(id)
                };
                self.push(now, Event::Deliver { node: v, input });
            }
        }
    }

    pub(super) fn leave(&mut self, v: usize, now: u64) {
        self.net.online[v] = false;
        self.churn.left += 1;
        let lat = self.net.latency_ms();
        let id = self.keys[v].node_id();
        for p in self.peers_of(v) {
            if self.net.online[p] {
                let input = Input::PeerLeft(id);
                self.push(now + lat, Event::Deliver { node: p, input });
            }
        }
    }

    /// A node comes back: it reconnects, learns who is there, and catches up
    /// — never on one peer's word. In broadcast mode it takes the furthest
    /// version that enough members vouch for ([`attest::best_vouched`]); in
    /// mixing and push-sum modes the median of several neighbours' models
    /// ([`mixing::catch_up`]). Byzantine peers offer forgeries (a round
    /// jump to 2^64 − 2 with its parameters negated) and vouch for each
    /// other's. With nothing to take it resumes its own model.
    pub(super) fn rejoin(&mut self, v: usize, now: u64) {
        self.net.online[v] = true;
        self.churn.rejoined += 1;
        let lat = self.net.latency_ms();
        let id = self.keys[v].node_id();
        let mut reachable = Vec::new();
        for p in self.peers_of(v) {
            let pid = self.keys[p].node_id();
            if self.net.online[p] && !self.net.separated(v, p, now) {
                self.push(
                    now + lat,
                    Event::Deliver {
                        node: p,
                        input: Input::PeerJoined(id),
                    },
                );
                self.push(
                    now,
                    Event::Deliver {
                        node: v,
                        input: Input::PeerJoined(pid),
                    },
                );
                reachable.push(p);
            } else {
                self.push(
                    now,
                    Event::Deliver {
                        node: v,
                        input: Input::PeerLeft(pid),
                    },
                );
            }
        }
        let caught = match self.settings.mode {
            Mode::Broadcast => self.catch_up_attested(v, now, &reachable),
            _ => self.catch_up_mixing(v, now, &reachable),
        };
        if caught {
            self.churn.caught_up += 1;
        } else {
            let (manifest, params) = self.heads[v].clone();
            let previous =
                verify::previous_step_parent(self.engines[v].config(), manifest.message());
            let input = Input::Start { manifest, params };
            self.push(now, Event::Deliver { node: v, input });
            self.give_previous_step(v, previous, now);
        }
    }

    /// What node `p` offers a node catching up: its head, or, if it is
    /// Byzantine, a forged one — the round it claims jumped to 2^64 − 2 and
    /// its parameters negated (signed by it, naming its head as parent).
    pub(super) fn catch_up_offer(&self, p: usize) -> (Verified<ModelManifest>, Vec<f32>) {
        let (head, params) = &self.heads[p];
        if self.attack.is_some() && self.byzantine.contains(&p) {
            let evil: Vec<f32> = params.iter().map(|x| -x).collect();
            let mut m = head.message().clone();
            m.round = u64::MAX - 1;
            m.author = self.keys[p].node_id();
            m.chunk_ids = verify::params_chunk_ids(&evil, m.chunk_size as usize);
            m.parents = vec![head.id()];
            if let Ok(forged) = Signed::sign(m, &self.keys[p]) {
                return (forged, evil);
            }
        }
        (head.clone(), params.clone())
    }

    /// Fetches one offer from each reachable peer (a request, then the
    /// model): the offers that arrived and when the last one did.
    pub(super) fn gather_offers(
        &mut self,
        v: usize,
        now: u64,
        reachable: &[usize],
    ) -> (Vec<Offer>, u64) {
        let mut offers = Vec::new();
        let mut last = now;
        for &p in reachable {
            let (manifest, params) = self.catch_up_offer(p);
            let bytes = params.len() as u64 * 4 + manifest.envelope_bytes().len() as u64;
            if let Ok(at) = self
                .net
                .send_reliable(v, p, now, 128)
                .and_then(|t| self.net.send_reliable(p, v, t, bytes))
            {
                last = last.max(at);
                offers.push((p, manifest, params));
            }
        }
        (offers, last)
    }

    /// Broadcast-mode catch-up on attestations: every reachable peer offers
    /// its head and attests it (honest peers vouch only for the version
    /// they hold; Byzantine ones vouch for every forgery); the node takes
    /// the furthest version that more than a third of the region vouches
    /// for, through the core's agreement policy. Forged offers passed over
    /// are counted as `round_jump`.
    pub(super) fn catch_up_attested(&mut self, v: usize, now: u64, reachable: &[usize]) -> bool {
        let (offers, at) = self.gather_offers(v, now, reachable);
        let mut distinct: BTreeMap<ContentId, &Verified<ModelManifest>> = BTreeMap::new();
        for (_, m, _) in &offers {
            distinct.entry(m.id()).or_insert(m);
        }
        let mut attestations = Vec::new();
        for (p, _, _) in &offers {
            for (id, version) in &distinct {
                let holds = self.heads[*p].0.id() == *id;
                let colludes = self.byzantine.contains(p)
                    && self
                        .index
                        .get(&version.message().author)
                        .is_some_and(|a| self.byzantine.contains(a));
                if (holds || colludes)
                    && let Some(a) = attest::attest(version.message(), &self.keys[*p])
                {
                    attestations.push(a);
                }
            }
        }
        // The node's region's roster.
        let members: BTreeSet<NodeId> = (0..self.keys.len())
            .filter(|p| self.region[*p] == self.region[v])
            .map(|p| self.keys[p].node_id())
            .collect();
        let threshold = attest::threshold(members.len(), 0);
        let versions: Vec<Verified<ModelManifest>> =
            offers.iter().map(|(_, m, _)| m.clone()).collect();
        let own = self.engines[v].round();
        let furthest = own.saturating_add(self.engines[v].config().door.max_rounds_ahead);
        let jumps = versions
            .iter()
            .filter(|m| m.message().round > furthest)
            .count();
        for _ in 0..jumps {
            self.count_rejected(&VersionRejection::RoundJump {
                round: u64::MAX - 1,
                expected: furthest,
            });
        }
        let Some((best, vouchers)) =
            attest::best_vouched(&versions, &attestations, &members, threshold)
        else {
            return false;
        };
        if best.message().round <= own || best.message().round > furthest {
            return false;
        }
        let Some((_, _, params)) = offers.iter().find(|(_, m, _)| m.id() == best.id()) else {
            return false;
        };
        let engine = &self.engines[v];
        let assessment = heads::Assessment::attested(engine.version(), vouchers);
        let previous = verify::previous_step_parent(engine.config(), best.message());
        match heads::decide(engine, best.clone(), Arc::new(params.clone()), assessment) {
            Decision::Feed(input) => {
                self.push(
                    at,
                    Event::Deliver {
                        node: v,
                        input: *input,
                    },
                );
                self.give_previous_step(v, previous, at);
                true
            }
            _ => false,
        }
    }

    /// With momentum, the step after a head a node did not make or verify
    /// here (restarted from its own store, or caught up on attestations)
    /// continues its parent's step: those parameters, fetched like any
    /// version's, go to the engine.
    fn give_previous_step(&mut self, v: usize, parent: Option<ContentId>, at: u64) {
        if let Some(version) = parent
            && let Some(params) = fetched_params(&self.versions, &self.version_params, &version)
        {
            let input = Input::PreviousStep { version, params };
            self.push(at, Event::Deliver { node: v, input });
        }
    }

    /// Mixing-mode catch-up: the median round and coordinate-wise median
    /// model of the reachable neighbours' offers, if at least three offer.
    pub(super) fn catch_up_mixing(&mut self, v: usize, now: u64, reachable: &[usize]) -> bool {
        let (offers, at) = self.gather_offers(v, now, reachable);
        let views: Vec<(u64, &[f32])> = offers
            .iter()
            .map(|(_, m, p)| (m.message().round, p.as_slice()))
            .collect();
        let own = self.engines[v].round();
        let Some((round, params)) = mixing::catch_up(&views, own, self.heads[v].1.len()) else {
            return false;
        };
        self.push(
            at,
            Event::Deliver {
                node: v,
                input: Input::CaughtUp { round, params },
            },
        );
        true
    }
}

/// A peer's answer to a node catching up: (peer, version, parameters).
pub(super) type Offer = (usize, Verified<ModelManifest>, Vec<f32>);
