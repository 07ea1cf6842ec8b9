//! Federation of regions: every few rounds, a region mixes its agreed head
//! with the agreed heads of the regions it federates with, so regional
//! models converge towards one model with no region above the others.
//!
//! The mix is a version like any other: its parents are the region's own
//! head and the foreign heads it took (each of the same round, at most one
//! per region), and its parameters are a pure function of them, so every
//! member of the region computes the same bits and every verifier
//! recomputes them. The weights are Metropolis–Hastings weights on the
//! graph of regions (symmetric, doubly stochastic: the regions' average is
//! kept, and gossip averaging converges on a connected graph); a foreign
//! head that did not arrive leaves its weight with the own head. Each
//! foreign difference is clipped to a radius before it is weighed
//! (ClippedGossip, He et al. 2022), so one bad region moves another by at
//! most its weight times the radius, whatever it sends.

use std::collections::BTreeSet;

use tapestry_protocol::ContentId;

/// How a region federates with others.
#[derive(Debug, Clone, PartialEq)]
pub struct Federation {
    /// Heads are mixed after every round that is a multiple of this (≥ 1).
    pub every: u64,
    /// The graph of regions: undirected edges between region names. A
    /// region mixes only with its neighbours in it.
    pub edges: Vec<(String, String)>,
    /// The radius (L2 norm) each foreign head's difference from the own
    /// head is clipped to; `None`: no clipping.
    pub clip: Option<f32>,
    /// How long a node waits for foreign heads after its region's head of
    /// a mix round, before it goes on without the missing ones.
    pub wait_ms: u64,
}

/// Why a mix could not be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MixError {
    /// A foreign head of a region that is not a neighbour (or is the own).
    #[error("region {0:?} is not a neighbour of this region in the federation graph")]
    NotANeighbour(String),
    /// Two heads of the same region.
    #[error("two heads of region {0:?}")]
    SameRegion(String),
    /// Parameters of another length.
    #[error("a head's parameters are not the model's size")]
    Size,
    /// Non-finite parameters.
    #[error("a head's parameters are not finite")]
    NotFinite,
}

impl Federation {
    /// Whether heads are mixed after `round`.
    pub fn is_mix_round(&self, round: u64) -> bool {
        self.every > 0 && round > 0 && round.is_multiple_of(self.every)
    }

    /// The neighbours of `region` in the graph (never itself).
    pub fn neighbours<'a>(&'a self, region: &str) -> BTreeSet<&'a str> {
        self.edges
            .iter()
            .filter_map(|(a, b)| match (a == region, b == region) {
                (true, false) => Some(b.as_str()),
                (false, true) => Some(a.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The Metropolis–Hastings weight of `other`'s head in `region`'s mix:
    /// 1 / (1 + max of both degrees), or `None` if they are not neighbours.
    pub fn weight(&self, region: &str, other: &str) -> Option<f64> {
        let mine = self.neighbours(region);
        if !mine.contains(other) {
            return None;
        }
        let degree = mine.len().max(self.neighbours(other).len());
        Some(1.0 / (1 + degree) as f64)
    }

    /// Checks the settings: a cadence of at least one round, no edge from
    /// a region to itself, a positive finite radius.
    pub fn validate(&self) -> Result<(), String> {
        if self.every == 0 {
            return Err("the cadence (every) must be at least 1 round".into());
        }
        if let Some((a, _)) = self.edges.iter().find(|(a, b)| a == b) {
            return Err(format!("an edge from region {a:?} to itself"));
        }
        if self.clip.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
            return Err("the clipping radius must be a positive number".into());
        }
        Ok(())
    }
}

/// A foreign head going into a mix: its id, its region, its parameters.
#[derive(Debug, Clone, Copy)]
pub struct ForeignHead<'a> {
    /// The version's id (mixes sum in the order of ids).
    pub id: ContentId,
    /// The region whose head it is.
    pub region: &'a str,
    /// Its parameters.
    pub params: &'a [f32],
}

/// The mix of `region`'s head `own` with the foreign heads: own + Σ w_s ·
/// clip(θ_s − own), summed in the order of the heads' ids, each difference
/// scaled to at most the clipping radius. Deterministic: every node that
/// mixes the same heads gets the same bits.
pub fn mix(
    fed: &Federation,
    region: &str,
    own: &[f32],
    foreign: &[ForeignHead<'_>],
) -> Result<Vec<f32>, MixError> {
    let mut heads: Vec<&ForeignHead<'_>> = foreign.iter().collect();
    heads.sort_by_key(|h| h.id);
    let mut seen = BTreeSet::new();
    let mut weighed = Vec::with_capacity(heads.len());
    for h in heads {
        let w = fed
            .weight(region, h.region)
            .ok_or_else(|| MixError::NotANeighbour(h.region.to_owned()))?;
        if !seen.insert(h.region) {
            return Err(MixError::SameRegion(h.region.to_owned()));
        }
        if h.params.len() != own.len() {
            return Err(MixError::Size);
        }
        let norm = own
            .iter()
            .zip(h.params)
            .map(|(a, b)| f64::from(b - a).powi(2))
            .sum::<f64>()
            .sqrt();
        if !norm.is_finite() {
            return Err(MixError::NotFinite);
        }
        let scale = match fed.clip {
            Some(radius) if norm > f64::from(radius) => f64::from(radius) / norm,
            _ => 1.0,
        };
        weighed.push(((w * scale) as f32, h.params));
    }
    let mut out = own.to_vec();
    for (c, theta) in weighed {
        for ((o, a), b) in out.iter_mut().zip(own).zip(theta) {
            *o += c * (b - a);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring4() -> Federation {
        let e = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        Federation {
            every: 5,
            edges: vec![e("a", "b"), e("b", "c"), e("c", "d"), e("d", "a")],
            clip: None,
            wait_ms: 1_000,
        }
    }

    fn id(n: u8) -> ContentId {
        ContentId::of(&[n])
    }

    #[test]
    fn weights_are_metropolis_hastings_on_the_region_graph() {
        let f = ring4();
        assert_eq!(f.neighbours("a"), BTreeSet::from(["b", "d"]));
        assert_eq!(f.weight("a", "b"), Some(1.0 / 3.0));
        assert_eq!(f.weight("a", "c"), None);
        assert_eq!(f.weight("a", "a"), None);
        assert!(f.is_mix_round(5) && f.is_mix_round(10));
        assert!(!f.is_mix_round(0) && !f.is_mix_round(7));
    }

    #[test]
    fn a_full_ring_of_mixes_keeps_the_regions_average_and_narrows_their_spread() {
        let f = ring4();
        let names = ["a", "b", "c", "d"];
        let mut models: Vec<Vec<f32>> = vec![
            vec![0.0, 4.0],
            vec![8.0, 0.0],
            vec![4.0, 4.0],
            vec![0.0, 0.0],
        ];
        let spread = |m: &[Vec<f32>]| {
            let mean = [0, 1].map(|i| m.iter().map(|v| v[i]).sum::<f32>() / 4.0);
            m.iter()
                .map(|v| (v[0] - mean[0]).powi(2) + (v[1] - mean[1]).powi(2))
                .sum::<f32>()
        };
        let before = spread(&models);
        for _ in 0..10 {
            let next: Vec<Vec<f32>> = (0..4)
                .map(|r| {
                    let foreign: Vec<ForeignHead<'_>> = (0..4)
                        .filter(|s| f.weight(names[r], names[*s]).is_some())
                        .map(|s| ForeignHead {
                            id: id(s as u8),
                            region: names[s],
                            params: &models[s],
                        })
                        .collect();
                    mix(&f, names[r], &models[r], &foreign).unwrap()
                })
                .collect();
            models = next;
        }
        for i in 0..2 {
            let mean: f32 = models.iter().map(|v| v[i]).sum::<f32>() / 4.0;
            assert!((mean - [3.0, 2.0][i]).abs() < 1e-4, "average kept: {mean}");
        }
        assert!(
            spread(&models) < before * 1e-3,
            "{} vs {before}",
            spread(&models)
        );
    }

    #[test]
    fn a_missing_head_leaves_its_weight_with_the_own_and_the_order_of_heads_does_not_matter() {
        let f = ring4();
        let own = [1.0f32, 1.0];
        let (b, d) = ([4.0f32, 1.0], [1.0f32, 7.0]);
        let hb = ForeignHead {
            id: id(1),
            region: "b",
            params: &b,
        };
        let hd = ForeignHead {
            id: id(2),
            region: "d",
            params: &d,
        };
        assert_eq!(mix(&f, "a", &own, &[hb]).unwrap(), vec![2.0, 1.0]);
        let both = mix(&f, "a", &own, &[hb, hd]).unwrap();
        assert_eq!(both, mix(&f, "a", &own, &[hd, hb]).unwrap());
        assert_eq!(both, vec![2.0, 3.0]);
    }

    #[test]
    fn clipping_bounds_what_one_bad_region_moves_the_model() {
        let mut f = ring4();
        f.clip = Some(0.5);
        let own = [0.0f32; 4];
        let evil = [1e6f32; 4];
        let out = mix(
            &f,
            "a",
            &own,
            &[ForeignHead {
                id: id(1),
                region: "b",
                params: &evil,
            }],
        )
        .unwrap();
        let moved = out.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((moved - 0.5 / 3.0).abs() < 1e-6, "moved {moved}");
        // Without the radius the same head drags the model far away.
        f.clip = None;
        let out = mix(
            &f,
            "a",
            &own,
            &[ForeignHead {
                id: id(1),
                region: "b",
                params: &evil,
            }],
        )
        .unwrap();
        assert!(out[0] > 1e5);
    }

    #[test]
    fn bad_heads_are_refused_with_the_reason() {
        let f = ring4();
        let own = [0.0f32; 2];
        let h = |n: u8, region: &'static str, params: &'static [f32]| ForeignHead {
            id: id(n),
            region,
            params,
        };
        assert_eq!(
            mix(&f, "a", &own, &[h(1, "c", &[1.0, 1.0])]),
            Err(MixError::NotANeighbour("c".into()))
        );
        assert_eq!(
            mix(
                &f,
                "a",
                &own,
                &[h(1, "b", &[1.0, 1.0]), h(2, "b", &[2.0, 2.0])]
            ),
            Err(MixError::SameRegion("b".into()))
        );
        assert_eq!(
            mix(&f, "a", &own, &[h(1, "b", &[1.0])]),
            Err(MixError::Size)
        );
        assert_eq!(
            mix(&f, "a", &own, &[h(1, "b", &[f32::NAN, 1.0])]),
            Err(MixError::NotFinite)
        );
        let mut bad = ring4();
        bad.every = 0;
        assert!(bad.validate().is_err());
        bad = ring4();
        bad.clip = Some(-1.0);
        assert!(bad.validate().is_err());
        bad = ring4();
        bad.edges.push(("a".into(), "a".into()));
        assert!(bad.validate().is_err());
        assert!(ring4().validate().is_ok());
    }
}
