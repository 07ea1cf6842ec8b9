//! Peer graphs: who can talk to whom in a simulated swarm.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::ScenarioError;

/// A topology and its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Topology {
    /// Everyone with everyone.
    Complete,
    /// A cycle.
    Ring,
    /// A random d-regular graph.
    RandomRegular(usize),
    /// Watts–Strogatz: a ring lattice of degree `k` with each edge rewired
    /// with probability `p`.
    SmallWorld(usize, f64),
    /// `k` regions, complete inside, joined by a ring of one link between
    /// consecutive regions.
    Regions(usize),
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topology::Complete => f.write_str("complete"),
            Topology::Ring => f.write_str("ring"),
            Topology::RandomRegular(d) => write!(f, "random-regular:{d}"),
            Topology::SmallWorld(k, p) => write!(f, "small-world:{k}:{p}"),
            Topology::Regions(k) => write!(f, "regions:{k}"),
        }
    }
}

impl FromStr for Topology {
    type Err = ScenarioError;
    /// `complete`, `ring`, `random-regular:D`, `small-world:K:P`, `regions:K`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ScenarioError::Topology(s.to_owned());
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["complete"] => Ok(Topology::Complete),
            ["ring"] => Ok(Topology::Ring),
            ["random-regular", d] => d.parse().map(Topology::RandomRegular).map_err(|_| bad()),
            ["small-world", k, p] => match (k.parse(), p.parse::<f64>()) {
                (Ok(k), Ok(p)) if (0.0..=1.0).contains(&p) => Ok(Topology::SmallWorld(k, p)),
                _ => Err(bad()),
            },
            ["regions", k] => match k.parse() {
                Ok(k) if k > 0 => Ok(Topology::Regions(k)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl Topology {
    /// The region of node `v` of `n` when they are split into `k` regions
    /// (contiguous blocks, as `regions:K` builds them).
    pub fn region_of(v: usize, n: usize, k: usize) -> usize {
        let k = k.clamp(1, n.max(1));
        v * k / n.max(1)
    }

    /// Builds the graph over `n` nodes: sorted neighbour lists, symmetric,
    /// no self-loops. Deterministic in `seed`.
    pub fn build(&self, n: usize, seed: u64) -> Result<Vec<Vec<usize>>, ScenarioError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut edges: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
        let link = |a: usize, b: usize, edges: &mut Vec<BTreeSet<usize>>| {
            if a != b {
                edges[a].insert(b);
                edges[b].insert(a);
            }
        };
        match *self {
            Topology::Complete => {
                for a in 0..n {
                    for b in a + 1..n {
                        link(a, b, &mut edges);
                    }
                }
            }
            Topology::Ring => {
                for a in 0..n {
                    link(a, (a + 1) % n, &mut edges);
                }
            }
            Topology::RandomRegular(d) => {
                if d >= n || (n * d) % 2 == 1 {
                    return Err(ScenarioError::NoRegularGraph {
                        degree: d,
                        nodes: n,
                    });
                }
                // Steger–Wormald: join random pairs of free stubs that make
                // a valid edge; restart in the rare case it gets stuck.
                'attempt: for _ in 0..100 {
                    let mut stubs: Vec<usize> =
                        (0..n).flat_map(|v| std::iter::repeat_n(v, d)).collect();
                    let mut e: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
                    while !stubs.is_empty() {
                        let mut joined = false;
                        for _ in 0..100 {
                            let (x, y) =
                                (rng.gen_range(0..stubs.len()), rng.gen_range(0..stubs.len()));
                            let (a, b) = (stubs[x], stubs[y]);
                            if x != y && a != b && !e[a].contains(&b) {
                                e[a].insert(b);
                                e[b].insert(a);
                                let (hi, lo) = (x.max(y), x.min(y));
                                stubs.swap_remove(hi);
                                stubs.swap_remove(lo);
                                joined = true;
                                break;
                            }
                        }
                        if !joined {
                            continue 'attempt;
                        }
                    }
                    edges = e;
                    break;
                }
                if edges.iter().any(|e| e.len() != d) {
                    return Err(ScenarioError::RegularGraphNotDrawn {
                        degree: d,
                        nodes: n,
                    });
                }
            }
            Topology::SmallWorld(k, p) => {
                let half = (k / 2).max(1);
                for a in 0..n {
                    for j in 1..=half {
                        let b = (a + j) % n;
                        if rng.gen_bool(p) {
                            let c = rng.gen_range(0..n);
                            if c != a && !edges[a].contains(&c) {
                                link(a, c, &mut edges);
                                continue;
                            }
                        }
                        link(a, b, &mut edges);
                    }
                }
            }
            Topology::Regions(k) => {
                let k = k.min(n.max(1));
                let region = |v: usize| Topology::region_of(v, n, k);
                for a in 0..n {
                    for b in a + 1..n {
                        if region(a) == region(b) {
                            link(a, b, &mut edges);
                        }
                    }
                }
                // One bridge between consecutive regions (a ring of regions).
                let firsts: Vec<usize> = (0..k)
                    .map(|r| (0..n).find(|v| region(*v) == r).unwrap_or(0))
                    .collect();
                for r in 0..k {
                    if k > 1 {
                        link(firsts[r], firsts[(r + 1) % k], &mut edges);
                    }
                }
            }
        }
        Ok(edges.into_iter().map(|e| e.into_iter().collect()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connected(g: &[Vec<usize>]) -> bool {
        let mut seen = vec![false; g.len()];
        let mut stack = vec![0];
        while let Some(v) = stack.pop() {
            if !std::mem::replace(&mut seen[v], true) {
                stack.extend(&g[v]);
            }
        }
        seen.iter().all(|s| *s)
    }

    #[test]
    fn graphs_have_their_shapes() {
        let n = 64;
        for t in [
            "complete",
            "ring",
            "random-regular:6",
            "small-world:4:0.1",
            "regions:4",
        ] {
            let topo: Topology = t.parse().unwrap();
            let g = topo.build(n, 1).unwrap();
            assert!(connected(&g), "{t}");
            for (v, ns) in g.iter().enumerate() {
                assert!(!ns.contains(&v), "{t}: self-loop");
                for u in ns {
                    assert!(g[*u].contains(&v), "{t}: asymmetric");
                }
            }
            assert_eq!(g, topo.build(n, 1).unwrap(), "{t}: deterministic");
            assert_eq!(topo.to_string(), t);
        }
        assert!(
            Topology::RandomRegular(6)
                .build(64, 1)
                .unwrap()
                .iter()
                .all(|ns| ns.len() == 6)
        );
        assert!(
            Topology::Ring
                .build(64, 1)
                .unwrap()
                .iter()
                .all(|ns| ns.len() == 2)
        );
        assert!(Topology::RandomRegular(3).build(5, 1).is_err());
        assert!("torus".parse::<Topology>().is_err());
    }
}
