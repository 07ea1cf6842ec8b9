//! The outer optimiser: how an aggregated delta (a pseudo-gradient,
//! Δ = θ − θ′, see DESIGN.md) moves the shared model.
//!
//! - **SGD**: θ ← θ − η·Δ. With η = 1 this is exact averaging of the local
//!   models (local SGD / FedAvg).
//! - **Nesterov momentum**, as in DiLoCo (Douillard et al. 2023, "DiLoCo:
//!   Distributed Low-Communication Training of Language Models"):
//!   m ← μ·m + Δ; θ ← θ − η·(Δ + μ·m). DiLoCo uses η = 0.7, μ = 0.9.

/// An outer optimiser and its state.
#[derive(Debug, Clone, PartialEq)]
pub enum OuterOptimizer {
    /// Plain SGD with learning rate `lr`.
    Sgd {
        /// Learning rate η (1.0 = exact averaging).
        lr: f32,
    },
    /// Nesterov momentum.
    Nesterov {
        /// Learning rate η.
        lr: f32,
        /// Momentum μ.
        momentum: f32,
        /// The momentum buffer (empty until the first step).
        buffer: Vec<f32>,
    },
}

impl OuterOptimizer {
    /// SGD with learning rate 1: the new model is the average of the local ones.
    pub fn averaging() -> Self {
        OuterOptimizer::Sgd { lr: 1.0 }
    }

    /// Nesterov momentum with an empty buffer.
    pub fn nesterov(lr: f32, momentum: f32) -> Self {
        OuterOptimizer::Nesterov {
            lr,
            momentum,
            buffer: Vec::new(),
        }
    }

    /// Applies one outer step to `params` with the aggregated delta.
    pub fn step(&mut self, params: &mut [f32], delta: &[f32]) {
        match self {
            OuterOptimizer::Sgd { lr } => {
                for (p, d) in params.iter_mut().zip(delta) {
                    *p -= *lr * d;
                }
            }
            OuterOptimizer::Nesterov {
                lr,
                momentum,
                buffer,
            } => {
                if buffer.len() != delta.len() {
                    *buffer = vec![0.0; delta.len()];
                }
                for ((p, d), m) in params.iter_mut().zip(delta).zip(buffer.iter_mut()) {
                    *m = *momentum * *m + d;
                    *p -= *lr * (d + *momentum * *m);
                }
            }
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
        OuterOptimizer::averaging().step(&mut p, &delta);
        assert_eq!(p, local);
    }

    #[test]
    fn nesterov_accelerates_a_constant_pull() {
        let mut p = vec![0f32];
        let mut opt = OuterOptimizer::nesterov(0.7, 0.9);
        opt.step(&mut p, &[1.0]);
        assert!((p[0] + 0.7 * 1.9).abs() < 1e-6);
        opt.step(&mut p, &[1.0]);
        // m = 1.9; step = 0.7 · (1 + 0.9 · 1.9)
        assert!(
            (p[0] + 0.7 * 1.9 + 0.7 * (1.0 + 0.9 * 1.9)).abs() < 1e-5,
            "{p:?}"
        );
    }
}
