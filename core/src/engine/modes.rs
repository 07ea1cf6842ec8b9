//! The engine in neighbour-mixing and push-sum modes: neighbours' models
//! in, a robust mix out; push-sum shares.

use super::*;

impl Engine {
    /// Mixing mode: a neighbour's model for `round`.
    pub(super) fn on_neighbour_model(
        &mut self,
        from: NodeId,
        round: u64,
        params: Vec<f32>,
        degree: usize,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let furthest = self.round.saturating_add(self.config.door.max_rounds_ahead);
        if round > furthest {
            // A neighbour claiming a round this far ahead is lying or
            // broken: its model would stand in for this round.
            out.push(Action::Penalise(Rejected {
                sender: from,
                reason: crate::door::Rejection::FromTheFuture {
                    round,
                    current: self.round,
                },
            }));
        } else if self.peers.contains(&from) && round >= self.round && self.fits(&params) {
            self.neighbour_models
                .insert((round, from), (params, degree));
            self.maybe_close(now_ms, out);
        }
    }

    /// Push-sum: apply the training step to the value (scaled by the
    /// weight, so the model x/w moves by exactly the step), push shares to
    /// random peers, and close the round with the model as it now stands.
    pub(super) fn push(
        &mut self,
        trained: Vec<f32>,
        fanout: usize,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let Some(mut ps) = self.push_sum.take() else {
            return;
        };
        if trained.len() != self.params.len() || !trained.iter().all(|v| v.is_finite()) {
            self.push_sum = Some(ps);
            return;
        }
        let w = ps.w as f32;
        for ((x, t), p) in ps.x.iter_mut().zip(&trained).zip(self.params.iter()) {
            *x += w * (t - p);
        }
        let peers: Vec<NodeId> = self.peers.iter().copied().collect();
        let mut to = Vec::with_capacity(fanout);
        while to.len() < fanout.min(peers.len()) {
            let p = peers[self.rng.gen_range(0..peers.len())];
            if !to.contains(&p) {
                to.push(p);
            }
        }
        if !to.is_empty() {
            let share = ps.split(to.len());
            out.push(Action::PushShare {
                to,
                x: share.x,
                w: share.w,
            });
        }
        self.params = std::sync::Arc::new(ps.estimate());
        self.push_sum = Some(ps);
        self.new_version(Vec::new(), now_ms, out);
    }

    pub(super) fn close_mixing_round(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let Some(own) = self.trained.take() else {
            return;
        };
        let degree = self.peers.len();
        let heard: Vec<(&NodeId, &(Vec<f32>, usize))> =
            self.latest_neighbour_models().into_iter().collect();
        let degrees: BTreeMap<NodeId, usize> =
            heard.iter().map(|(from, (_, d))| (**from, *d)).collect();
        let (self_weight, weights) = crate::mixing::metropolis_weights(degree, &degrees);
        let others: Vec<(&[f32], f64)> = heard
            .iter()
            .map(|(from, (p, _))| (p.as_slice(), weights[*from]))
            .collect();
        self.params = std::sync::Arc::new(match self.config.rule {
            AggregationRule::Mean => crate::mixing::mix(&own, self_weight, &others),
            rule => robust_mix(rule, &own, self_weight, &others).unwrap_or(own),
        });
        self.new_version(Vec::new(), now_ms, out);
    }

    /// Mixing mode: for each current neighbour, its model for this round,
    /// or failing that the earliest later one it sent.
    pub(super) fn latest_neighbour_models(&self) -> BTreeMap<&NodeId, &(Vec<f32>, usize)> {
        let mut heard = BTreeMap::new();
        for ((_, from), v) in self
            .neighbour_models
            .range((self.round, NodeId::from_bytes([0; 32]))..)
        {
            if self.peers.contains(from) {
                heard.entry(from).or_insert(v);
            }
        }
        heard
    }
}

/// Mixing with a robust rule: the rule combines the neighbours' offsets
/// from this node's own model (its own offset is zero) with the
/// Metropolis–Hastings weights, and the node moves by the result. With the
/// plain mean this is exactly Metropolis–Hastings mixing; with self-centred
/// clipping it is ClippedGossip (He, Karimireddy and Jaggi, 2022): no
/// neighbour can pull a node further than the clipping radius per round.
pub(super) fn robust_mix(
    rule: AggregationRule,
    own: &[f32],
    self_weight: f64,
    others: &[(&[f32], f64)],
) -> Option<Vec<f32>> {
    let zero = vec![0.0f32; own.len()];
    let offsets: Vec<Vec<f32>> = others
        .iter()
        .map(|(p, _)| p.iter().zip(own).map(|(x, o)| x - o).collect())
        .collect();
    let mut inputs: Vec<&[f32]> = vec![&zero];
    inputs.extend(offsets.iter().map(Vec::as_slice));
    let mut weights = vec![self_weight];
    weights.extend(others.iter().map(|(_, w)| *w));
    let step = rule.aggregate(&inputs, &weights, Some(&zero)).ok()?;
    Some(own.iter().zip(&step).map(|(o, s)| o + s).collect())
}
