//! Gossip mixing of whole model versions, for neighbour mixing (D-PSGD) and
//! to pull drifting nodes back into agreement.
//!
//! - **Metropolis–Hastings weights** (Xiao & Boyd 2004, "Fast linear
//!   iterations for distributed averaging"): over an undirected peer graph,
//!   `w_ij = 1 / (1 + max(d_i, d_j))` for each neighbour and
//!   `w_ii = 1 − Σ_j w_ij`. Symmetric and doubly stochastic using only the
//!   degrees of the two ends, so repeated mixing converges to the exact
//!   average at the rate of the graph's spectral gap.
//! - **Push-sum** (Kempe, Dobra & Gehrke 2003; Nedić & Olshevsky 2015 for
//!   learning): every node keeps a value `x` and a weight `w`, keeps one share
//!   and pushes equal shares of both to its out-neighbours; the estimate is
//!   `x / w`. It needs no symmetry, so one-way links work, and a lost message
//!   removes value and weight together, so the estimates still agree.

use std::collections::BTreeMap;

/// Metropolis–Hastings mixing weights for node `me` of degree `my_degree`,
/// given its neighbours and their degrees. Returns (self weight, neighbour
/// weights). Degrees count distinct neighbours, not the node itself.
pub fn metropolis_weights<P: Ord + Clone>(
    my_degree: usize,
    neighbours: &BTreeMap<P, usize>,
) -> (f64, BTreeMap<P, f64>) {
    let weights: BTreeMap<P, f64> = neighbours
        .iter()
        .map(|(p, d)| (p.clone(), 1.0 / (1.0 + my_degree.max(*d) as f64)))
        .collect();
    let self_weight = 1.0 - weights.values().sum::<f64>();
    (self_weight, weights)
}

/// Mixes `own` with neighbours' vectors: `self_weight · own + Σ w_j · x_j`.
pub fn mix(own: &[f32], self_weight: f64, others: &[(&[f32], f64)]) -> Vec<f32> {
    let mut out: Vec<f32> = own
        .iter()
        .map(|x| (f64::from(*x) * self_weight) as f32)
        .collect();
    for (v, w) in others {
        let w = *w as f32;
        for (o, x) in out.iter_mut().zip(v.iter()) {
            *o += w * x;
        }
    }
    out
}

/// One node's push-sum state.
#[derive(Debug, Clone, PartialEq)]
pub struct PushSum {
    /// The value sum (weights travel inside it).
    pub x: Vec<f32>,
    /// The weight.
    pub w: f64,
}

impl PushSum {
    /// Starts from a node's own vector with weight 1.
    pub fn new(x: Vec<f32>) -> Self {
        Self { x, w: 1.0 }
    }

    /// The current estimate `x / w`.
    pub fn estimate(&self) -> Vec<f32> {
        let inv = (1.0 / self.w) as f32;
        self.x.iter().map(|v| v * inv).collect()
    }

    /// Splits the state into `targets + 1` equal shares: keeps one, returns
    /// the share to send to each target.
    pub fn split(&mut self, targets: usize) -> PushSum {
        let f = 1.0 / (targets as f64 + 1.0);
        self.x.iter_mut().for_each(|v| *v *= f as f32);
        self.w *= f;
        self.clone()
    }

    /// Adds a received share.
    pub fn absorb(&mut self, share: &PushSum) {
        for (a, b) in self.x.iter_mut().zip(&share.x) {
            *a += b;
        }
        self.w += share.w;
    }
}

/// Fewest distinct neighbours a node catching up in mixing mode must hear
/// from: with the coordinate-wise median, one liar among three cannot move
/// any value outside what the honest two sent.
pub const MIN_CATCH_UP_OFFERS: usize = 3;

/// Mixing-mode catch-up, never on one neighbour's word: a node back from
/// an absence takes, from the models its neighbours offer (each with the
/// round it claims), the lower median of the claimed rounds and the
/// coordinate-wise median of the models. While fewer than half of the
/// offers lie, the round lies between two honest ones and every value
/// between two honest values — a lone neighbour claiming round 2^64 − 2 or
/// sending its own parameters negated moves neither. Offers of the wrong
/// length or with non-finite values are dropped first. `None` with fewer
/// than [`MIN_CATCH_UP_OFFERS`] usable offers, or when the median round
/// is not ahead of `own_round` (the node then resumes its own model and
/// mixing pulls it back in).
pub fn catch_up(offers: &[(u64, &[f32])], own_round: u64, len: usize) -> Option<(u64, Vec<f32>)> {
    let usable: Vec<&(u64, &[f32])> = offers
        .iter()
        .filter(|(_, p)| p.len() == len && p.iter().all(|v| v.is_finite()))
        .collect();
    if usable.len() < MIN_CATCH_UP_OFFERS {
        return None;
    }
    let mut rounds: Vec<u64> = usable.iter().map(|(r, _)| *r).collect();
    rounds.sort_unstable();
    let round = rounds[(rounds.len() - 1) / 2];
    if round <= own_round {
        return None;
    }
    let models: Vec<&[f32]> = usable.iter().map(|(_, p)| *p).collect();
    Some((round, super::aggregate::aggregate_median(&models)))
}

/// Mean L2 distance of each vector to their average, relative to the
/// average's norm: how far a swarm is from agreeing.
pub fn consensus_distance(models: &[Vec<f32>]) -> f64 {
    if models.is_empty() {
        return 0.0;
    }
    let n = models.len() as f64;
    let len = models[0].len();
    let mut avg = vec![0f64; len];
    for m in models {
        for (a, x) in avg.iter_mut().zip(m) {
            *a += f64::from(*x) / n;
        }
    }
    let mean_dist = models
        .iter()
        .map(|m| {
            m.iter()
                .zip(&avg)
                .map(|(x, a)| (f64::from(*x) - a).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .sum::<f64>()
        / n;
    let norm = avg.iter().map(|a| a * a).sum::<f64>().sqrt();
    if norm > 0.0 {
        mean_dist / norm
    } else {
        mean_dist
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(n: usize) -> Vec<Vec<usize>> {
        (0..n).map(|i| vec![(i + n - 1) % n, (i + 1) % n]).collect()
    }

    fn start(n: usize, len: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| {
                (0..len)
                    .map(|j| ((i * 7 + j * 3) % 11) as f32 + 1.0)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn metropolis_on_a_ring_converges_to_the_exact_average() {
        let n = 16;
        let graph = ring(n);
        let mut models = start(n, 50);
        let target: Vec<f64> = (0..50)
            .map(|j| models.iter().map(|m| f64::from(m[j])).sum::<f64>() / n as f64)
            .collect();
        let mut prev = consensus_distance(&models);
        for round in 0..200 {
            let next: Vec<Vec<f32>> = (0..n)
                .map(|i| {
                    let neighbours: BTreeMap<usize, usize> =
                        graph[i].iter().map(|j| (*j, graph[*j].len())).collect();
                    let (sw, w) = metropolis_weights(graph[i].len(), &neighbours);
                    let others: Vec<(&[f32], f64)> = w
                        .iter()
                        .map(|(j, wj)| (models[*j].as_slice(), *wj))
                        .collect();
                    mix(&models[i], sw, &others)
                })
                .collect();
            models = next;
            let d = consensus_distance(&models);
            assert!(d < prev, "round {round}: {d} !< {prev}");
            prev = d;
        }
        assert!(prev < 1e-3, "consensus distance {prev}");
        // Doubly stochastic: the average never moved.
        for (j, t) in target.iter().enumerate() {
            let avg = models.iter().map(|m| f64::from(m[j])).sum::<f64>() / n as f64;
            assert!((avg - t).abs() < 1e-4, "{avg} vs {t}");
        }
    }

    #[test]
    fn catch_up_takes_the_median_of_several_neighbours_never_one_word() {
        let honest = [
            vec![1.0f32, 2.0, 3.0],
            vec![1.2, 2.2, 2.8],
            vec![0.9, 1.9, 3.1],
        ];
        let liar = vec![-1e30f32, 1e30, -3.0];
        fn offers<'a>(
            honest: &'a [Vec<f32>; 3],
            extra: &[(u64, &'a [f32])],
        ) -> Vec<(u64, &'a [f32])> {
            let mut o: Vec<(u64, &[f32])> = vec![
                (40, honest[0].as_slice()),
                (41, honest[1].as_slice()),
                (40, honest[2].as_slice()),
            ];
            o.extend_from_slice(extra);
            o
        }
        // One liar among four: a round of 2^64 − 2 and absurd values move
        // nothing outside the honest range.
        let (round, params) =
            catch_up(&offers(&honest, &[(u64::MAX - 1, liar.as_slice())]), 10, 3).unwrap();
        assert!((40..=41).contains(&round), "{round}");
        for (j, v) in params.iter().enumerate() {
            let lo = honest.iter().map(|h| h[j]).fold(f32::INFINITY, f32::min);
            let hi = honest
                .iter()
                .map(|h| h[j])
                .fold(f32::NEG_INFINITY, f32::max);
            assert!((lo..=hi).contains(v), "value {j}: {v} outside [{lo}, {hi}]");
        }
        // Without the liar: the median of three.
        assert_eq!(
            catch_up(&offers(&honest, &[]), 10, 3),
            Some((40, honest[0].clone()))
        );
        // Two offers (or two usable ones) are not enough.
        let two: Vec<(u64, &[f32])> = vec![(40, &honest[0]), (41, &honest[1])];
        assert_eq!(catch_up(&two, 10, 3), None);
        let nan = [f32::NAN, 0.0, 0.0];
        let short = [1.0f32];
        let bad: Vec<(u64, &[f32])> = vec![(40, &honest[0]), (41, &nan), (42, &short)];
        assert_eq!(catch_up(&bad, 10, 3), None);
        // Not ahead of the node: nothing to catch up on.
        assert_eq!(catch_up(&offers(&honest, &[]), 40, 3), None);
    }

    #[test]
    fn push_sum_agrees_despite_lost_messages() {
        let n = 16;
        let mut states: Vec<PushSum> = start(n, 20).into_iter().map(PushSum::new).collect();
        let mut rng = 0x9e37_79b9u64;
        let mut next_rand = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let (mut sent, mut lost) = (0, 0);
        // Lost messages drain value and weight together (by ~13 % a round
        // here), so the estimates stay comparable; 100 rounds keep x well
        // inside f32's normal range.
        for _ in 0..100 {
            let mut inbox: Vec<Vec<PushSum>> = vec![Vec::new(); n];
            for (i, s) in states.iter_mut().enumerate() {
                // One-way: push to the next node and to one random node.
                let targets = [(i + 1) % n, (next_rand() as usize) % n];
                let share = s.split(targets.len());
                for t in targets {
                    sent += 1;
                    if next_rand() % 100 < 20 {
                        lost += 1; // 20 % of messages dropped
                        continue;
                    }
                    inbox[t].push(share.clone());
                }
            }
            for (s, msgs) in states.iter_mut().zip(&inbox) {
                for m in msgs {
                    s.absorb(m);
                }
            }
        }
        assert!(lost * 100 / sent >= 15, "{lost} of {sent} dropped");
        let estimates: Vec<Vec<f32>> = states.iter().map(PushSum::estimate).collect();
        let d = consensus_distance(&estimates);
        assert!(d < 1e-3, "push-sum consensus distance {d}");
    }
}
