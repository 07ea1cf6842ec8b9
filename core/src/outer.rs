//! The outer optimiser: how an aggregated delta (a pseudo-gradient,
//! Δ = θ − θ′, see DESIGN.md) moves the shared model.
//!
//! - **SGD**: θ ← θ − η·Δ. With η = 1 this is exact averaging of the local
//!   models (local SGD / FedAvg).
//! - **Momentum** (Polyak's heavy ball), written on versions:
//!   θ ← θ − η·Δ + μ·(θ − θ₋₁), where θ₋₁ is the parameters of the parent's
//!   own parent. The momentum buffer of the usual form (m ← μ·m + Δ;
//!   θ ← θ − η·m) is exactly the parent's step θ₋₁ − θ divided by η, so it
//!   is not state a node keeps: every verifier recomputes it from two
//!   versions of the lineage it holds anyway. (DiLoCo's Nesterov form,
//!   Douillard et al. 2023, cannot be written this way: its buffer is not
//!   a function of the last step, so it would have to travel with every
//!   version, unverifiable.) A parent that is the genesis or a merge of two
//!   branches has no single previous step: the step after it has no
//!   momentum term.

/// An outer optimiser (stateless: what momentum needs comes from the
/// lineage, see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OuterOptimizer {
    /// Plain SGD with learning rate `lr`.
    Sgd {
        /// Learning rate η (1.0 = exact averaging).
        lr: f32,
    },
    /// Heavy-ball momentum, taken on versions.
    Momentum {
        /// Learning rate η.
        lr: f32,
        /// Momentum μ (0 ≤ μ < 1).
        momentum: f32,
    },
}

impl OuterOptimizer {
    /// SGD with learning rate 1: the new model is the average of the local ones.
    pub fn averaging() -> Self {
        OuterOptimizer::Sgd { lr: 1.0 }
    }

    /// Heavy-ball momentum with learning rate `lr` and momentum `momentum`.
    pub fn momentum(lr: f32, momentum: f32) -> Self {
        OuterOptimizer::Momentum { lr, momentum }
    }

    /// Whether a step needs the parameters before the parent's
    /// ([`OuterOptimizer::step`]'s `previous`).
    pub fn has_momentum(&self) -> bool {
        matches!(self, OuterOptimizer::Momentum { momentum, .. } if *momentum != 0.0)
    }

    /// Parses `sgd:LR` or `momentum:LR:MU` (`averaging` = `sgd:1`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let number = |v: &str| -> Result<f32, String> {
            v.parse::<f32>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| format!("{v:?} is not a number"))
        };
        let o = match s.split(':').collect::<Vec<_>>().as_slice() {
            ["averaging"] => Self::averaging(),
            ["sgd", lr] => OuterOptimizer::Sgd { lr: number(lr)? },
            ["momentum", lr, mu] => Self::momentum(number(lr)?, number(mu)?),
            _ => {
                return Err(format!(
                    "unknown outer optimiser {s:?} (averaging, sgd:LR, momentum:LR:MU)"
                ));
            }
        };
        let (lr, mu) = match o {
            OuterOptimizer::Sgd { lr } => (lr, 0.0),
            OuterOptimizer::Momentum { lr, momentum } => (lr, momentum),
        };
        if lr <= 0.0 || !(0.0..1.0).contains(&mu) {
            return Err(format!(
                "outer optimiser {s:?}: the rate must be above 0 and the momentum in [0, 1)"
            ));
        }
        Ok(o)
    }

    /// One outer step on (a block of) the parent's parameters `params`,
    /// with the aggregate of the same coordinates and, for momentum, the
    /// same coordinates of the parameters before the parent (`None`: no
    /// previous step, no momentum term). Coordinate by coordinate, in one
    /// fixed order of operations: bit-exact wherever it runs, whole or a
    /// block at a time.
    pub fn step(&self, params: &mut [f32], aggregate: &[f32], previous: Option<&[f32]>) {
        match (*self, previous) {
            (OuterOptimizer::Sgd { lr }, _) | (OuterOptimizer::Momentum { lr, .. }, None) => {
                for (p, d) in params.iter_mut().zip(aggregate) {
                    *p -= lr * d;
                }
            }
            (OuterOptimizer::Momentum { lr, momentum }, Some(before)) => {
                for ((p, d), b) in params.iter_mut().zip(aggregate).zip(before) {
                    *p = (*p - lr * d) + momentum * (*p - b);
                }
            }
        }
    }
}

impl std::str::FromStr for OuterOptimizer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl std::fmt::Display for OuterOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OuterOptimizer::Sgd { lr } if *lr == 1.0 => write!(f, "averaging"),
            OuterOptimizer::Sgd { lr } => write!(f, "sgd:{lr}"),
            OuterOptimizer::Momentum { lr, momentum } => write!(f, "momentum:{lr}:{momentum}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgd_with_rate_one_lands_on_the_local_model() {
        let theta = vec![1.0f32, 2.0];
        let local = vec![0.5f32, 2.5];
        let delta: Vec<f32> = theta.iter().zip(&local).map(|(a, b)| a - b).collect();
        let mut p = theta.clone();
        OuterOptimizer::averaging().step(&mut p, &delta, None);
        assert_eq!(p, local);
    }

    #[test]
    fn momentum_on_versions_is_the_heavy_ball_with_its_buffer() {
        // The usual form, with a buffer: m ← μ·m + Δ; θ ← θ − η·m.
        let (lr, mu) = (0.5f32, 0.9f32);
        let grads = [1.0f32, 0.5, -2.0, 0.25, 1.5];
        let (mut theta, mut m) = (0.0f64, 0.0f64);
        let mut buffered = vec![theta];
        for g in grads {
            m = mu as f64 * m + g as f64;
            theta -= lr as f64 * m;
            buffered.push(theta);
        }
        // On versions: no buffer, only the parameters before the parent;
        // the first step (from the genesis) has none.
        let o = OuterOptimizer::momentum(lr, mu);
        let mut versions = vec![vec![0.0f32]];
        for (t, g) in grads.iter().enumerate() {
            let mut p = versions[t].clone();
            let before = t.checked_sub(1).map(|i| versions[i].clone());
            o.step(&mut p, &[*g], before.as_deref());
            versions.push(p);
        }
        for (v, b) in versions.iter().zip(&buffered) {
            assert!(
                (v[0] as f64 - b).abs() < 1e-5,
                "{versions:?} against {buffered:?}"
            );
        }
    }

    #[test]
    fn momentum_accelerates_a_constant_pull() {
        let step = |o: OuterOptimizer| {
            let mut versions = vec![vec![0.0f32]];
            for t in 0..5 {
                let mut p = versions[t].clone();
                let before = t.checked_sub(1).map(|i| versions[i].clone());
                o.step(&mut p, &[1.0], before.as_deref());
                versions.push(p);
            }
            versions[5][0]
        };
        // SGD: 5 · 0.5; heavy ball: 0.5 · (1 + 1.9 + 2.71 + 3.439 + 4.0951).
        assert!((step(OuterOptimizer::Sgd { lr: 0.5 }) + 2.5).abs() < 1e-6);
        let far = step(OuterOptimizer::momentum(0.5, 0.9));
        assert!((far + 0.5 * 13.1441).abs() < 1e-4, "{far}");
    }

    #[test]
    fn parses_and_refuses_clearly() {
        assert_eq!(
            OuterOptimizer::parse("averaging"),
            Ok(OuterOptimizer::averaging())
        );
        assert_eq!(
            OuterOptimizer::parse("momentum:0.7:0.9"),
            Ok(OuterOptimizer::momentum(0.7, 0.9))
        );
        assert_eq!(
            OuterOptimizer::parse("sgd:0.5"),
            Ok(OuterOptimizer::Sgd { lr: 0.5 })
        );
        for bad in [
            "nesterov:0.7:0.9",
            "momentum:0.7:1.0",
            "sgd:0",
            "sgd:x",
            "momentum:1",
        ] {
            assert!(OuterOptimizer::parse(bad).is_err(), "{bad}");
        }
        for o in ["averaging", "sgd:0.5", "momentum:0.7:0.9"] {
            assert_eq!(OuterOptimizer::parse(o).unwrap().to_string(), o);
        }
    }
}
