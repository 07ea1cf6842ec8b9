//! Training and evaluation of the dense classifiers (logistic regression and
//! MLPs) on the flat parameter vector itself, with a hand-written backward
//! pass: no autograd graph and no tensor copies of the parameters.
//!
//! candle's autograd keeps, for every weight, the parameters as a tensor,
//! the gradient, a zero tensor it was accumulated into and the sum: at the
//! peak of a step, six to eight copies of a large model. Here a step holds
//! the parameters (updated in place), the optimiser's moments, the batch's
//! activations, and the weight gradient of a block of at most
//! [`GRAD_BLOCK`] values, which is applied as soon as it is computed. The
//! matrix products are the ones candle runs (the `gemm` crate, with
//! candle's thread count), so a step costs what it did.
//!
//! Layer `i` computes `z = h · Wᵢᵀ + bᵢ` with `Wᵢ` stored out × in (as in
//! PyTorch's `nn.Linear`); every layer but the last is followed by a ReLU;
//! the loss is the mean softmax cross-entropy. Backward, from the last
//! layer: `∂h = ∂z · Wᵢ` (with `Wᵢ` before its update), then
//! `∂Wᵢ = ∂zᵀ · h` block by block of output rows, each block stepped at
//! once, `∂bᵢ = Σ_rows ∂z`, and `∂z` of the layer below is `∂h` where its
//! ReLU was open.

use super::data::Dataset;
use super::linalg::{View, matmul};
use super::model::{InnerOptimizer, InnerState, step_slices};

/// Most weight-gradient values held at once (a block of output rows).
pub const GRAD_BLOCK: usize = 1 << 16;

/// Rows evaluated per forward pass (bounds evaluation's activations).
const EVAL_ROWS: usize = 256;

/// The (in, out) sizes of each layer and where its weight starts in the
/// flat vector (its bias follows the weight).
fn offsets(layers: &[(usize, usize)]) -> Vec<usize> {
    let mut at = 0;
    layers
        .iter()
        .map(|(i, o)| {
            let here = at;
            at += i * o + o;
            here
        })
        .collect()
}

/// Forward pass of `b` rows `x` (row-major `b × in`): each layer's output,
/// after its ReLU except the last (the logits).
fn forward(layers: &[(usize, usize)], p: &[f32], x: &[f32], b: usize) -> Vec<Vec<f32>> {
    let offs = offsets(layers);
    let mut outs: Vec<Vec<f32>> = Vec::with_capacity(layers.len());
    for (l, (&(inp, out), &off)) in layers.iter().zip(&offs).enumerate() {
        let h = outs.last().map_or(x, |v| v.as_slice());
        let w = &p[off..off + inp * out];
        let bias = &p[off + inp * out..off + inp * out + out];
        let mut z = vec![0f32; b * out];
        matmul(&mut z, View::rows(h, b, inp), View::transposed(w, inp, out));
        for row in z.chunks_exact_mut(out) {
            for (v, bb) in row.iter_mut().zip(bias) {
                *v += bb;
            }
        }
        if l + 1 < layers.len() {
            for v in &mut z {
                *v = v.max(0.0);
            }
        }
        outs.push(z);
    }
    outs
}

/// Per row: the cross-entropy of `logits` against `label`, and
/// (optionally) `softmax − onehot` written over the logits.
fn softmax_xent(row: &mut [f32], label: usize, gradient: bool) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
    let lse = sum.ln();
    let loss = f64::from(lse - (row[label] - max));
    if gradient {
        for v in row.iter_mut() {
            *v = (*v - max - lse).exp();
        }
        row[label] -= 1.0;
    }
    loss
}

/// The rows `rows` of `data` as one row-major batch, with their labels.
fn batch(data: &Dataset, rows: &[usize]) -> (Vec<f32>, Vec<usize>) {
    let mut x = Vec::with_capacity(rows.len() * data.n_features);
    for r in rows {
        x.extend_from_slice(data.row(*r));
    }
    (x, rows.iter().map(|r| data.labels[*r] as usize).collect())
}

/// One optimiser step on `p` from the batch `rows` of `data`; returns the
/// batch's mean loss. `state` must fit `p` ([`InnerState::fit`]).
pub(crate) fn step(
    layers: &[(usize, usize)],
    p: &mut [f32],
    data: &Dataset,
    rows: &[usize],
    opt: &InnerOptimizer,
    state: &mut InnerState,
) -> f32 {
    let b = rows.len();
    let (x, labels) = batch(data, rows);
    let mut outs = forward(layers, p, &x, b);
    let classes = layers.last().map_or(0, |l| l.1);
    let mut loss = 0f64;
    let mut dz = outs.pop().unwrap_or_default();
    for (row, label) in dz.chunks_exact_mut(classes.max(1)).zip(&labels) {
        loss += softmax_xent(row, *label, true);
    }
    let scale = 1.0 / b.max(1) as f32;
    for v in &mut dz {
        *v *= scale;
    }
    let t = state.next_step();
    let offs = offsets(layers);
    for l in (0..layers.len()).rev() {
        let (inp, out) = layers[l];
        let off = offs[l];
        // The gradient for the layer below, from this layer's weight before
        // its update, masked by the ReLU that produced this layer's input.
        let below = if l > 0 {
            let mut dh = vec![0f32; b * inp];
            matmul(
                &mut dh,
                View::rows(&dz, b, out),
                View::rows(&p[off..off + inp * out], out, inp),
            );
            for (g, h) in dh.iter_mut().zip(&outs[l - 1]) {
                if *h <= 0.0 {
                    *g = 0.0;
                }
            }
            Some(dh)
        } else {
            None
        };
        let h = if l > 0 { outs[l - 1].as_slice() } else { &x };
        let block_rows = (GRAD_BLOCK / inp.max(1)).clamp(1, out.max(1));
        let mut g = vec![0f32; block_rows * inp];
        let mut o0 = 0;
        while o0 < out {
            let o1 = (o0 + block_rows).min(out);
            let n = (o1 - o0) * inp;
            // ∂W[o0..o1] = (∂z[:, o0..o1])ᵀ · h
            let dzt = View {
                data: &dz[o0..],
                rows: o1 - o0,
                cols: b,
                rs: 1,
                cs: out,
            };
            matmul(&mut g[..n], dzt, View::rows(h, b, inp));
            let at = off + o0 * inp;
            state.step(opt, &mut p[at..at + n], &g[..n], at, t);
            o0 = o1;
        }
        let mut gb = vec![0f32; out];
        for row in dz.chunks_exact(out.max(1)) {
            for (s, v) in gb.iter_mut().zip(row) {
                *s += v;
            }
        }
        let at = off + inp * out;
        state.step(opt, &mut p[at..at + out], &gb, at, t);
        if let Some(dh) = below {
            dz = dh;
        }
    }
    (loss / b.max(1) as f64) as f32
}

/// Mean loss and accuracy of `p` on every row of `data`, in passes of a
/// few hundred rows.
pub(crate) fn evaluate(layers: &[(usize, usize)], p: &[f32], data: &Dataset) -> (f32, f32) {
    let classes = layers.last().map_or(0, |l| l.1).max(1);
    let (mut loss, mut correct) = (0f64, 0usize);
    let all: Vec<usize> = (0..data.len()).collect();
    for rows in all.chunks(EVAL_ROWS) {
        let (x, labels) = batch(data, rows);
        let mut outs = forward(layers, p, &x, rows.len());
        let mut logits = outs.pop().unwrap_or_default();
        for (row, label) in logits.chunks_exact_mut(classes).zip(&labels) {
            let predicted = row
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, v)| {
                    if *v > best.1 { (i, *v) } else { best }
                })
                .0;
            correct += usize::from(predicted == *label);
            loss += softmax_xent(row, *label, false);
        }
    }
    let n = data.len().max(1);
    ((loss / n as f64) as f32, correct as f32 / n as f32)
}

/// Steps on a slice of the parameters at a time, with the moments of the
/// same coordinates.
impl InnerState {
    /// Counts a step and returns its number (from 1).
    pub(crate) fn next_step(&mut self) -> u64 {
        self.t += 1;
        self.t
    }

    /// Steps `p` (the coordinates from `at`) by gradient `g`.
    pub(crate) fn step(
        &mut self,
        opt: &InnerOptimizer,
        p: &mut [f32],
        g: &[f32],
        at: usize,
        t: u64,
    ) {
        let end = at + p.len();
        let adam = !self.v.is_empty();
        let v: &mut [f32] = if adam { &mut self.v[at..end] } else { &mut [] };
        step_slices(opt, p, g, &mut self.m[at..end], v, t);
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::data::synthetic;
    use crate::linalg::max_diff;
    use crate::model::{ModelSpec, apply_grads, batch_tensors, cross_entropy};

    /// `steps` steps of candle's autograd on the same batches: the
    /// reference the hand-written passes must match.
    fn reference(
        spec: &ModelSpec,
        mut p: Vec<f32>,
        data: &Dataset,
        batches: &[Vec<usize>],
        opt: &InnerOptimizer,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut state = InnerState::default();
        state.fit(p.len(), opt);
        let mut losses = Vec::new();
        for rows in batches {
            let (x, y) = batch_tensors(data, rows, spec.classes(), &Device::Cpu).unwrap();
            let vars = spec.tensors(&p, &Device::Cpu).unwrap();
            let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let loss = cross_entropy(&spec.forward(&tensors, &x).unwrap(), &y).unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
            let grads = loss.backward().unwrap();
            apply_grads(opt, &mut p, &grads, &vars, &mut state).unwrap();
        }
        (p, losses)
    }

    fn hand(
        spec: &ModelSpec,
        mut p: Vec<f32>,
        data: &Dataset,
        batches: &[Vec<usize>],
        opt: &InnerOptimizer,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut state = InnerState::default();
        state.fit(p.len(), opt);
        let losses = batches
            .iter()
            .map(|rows| step(&spec.layers(), &mut p, data, rows, opt, &mut state))
            .collect();
        (p, losses)
    }

    #[test]
    fn hand_written_steps_match_candle_autograd() {
        let data = synthetic(3, 64, 12, 4);
        let batches: Vec<Vec<usize>> = (0..5).map(|s| (s * 9..s * 9 + 9).collect()).collect();
        let specs = [
            ModelSpec::Logistic {
                inputs: 12,
                classes: 4,
            },
            ModelSpec::Mlp {
                inputs: 12,
                hidden: vec![7, 5],
                classes: 4,
            },
        ];
        let opts = [
            InnerOptimizer::SgdMomentum {
                lr: 0.1,
                momentum: 0.9,
            },
            InnerOptimizer::AdamW {
                lr: 0.01,
                weight_decay: 0.01,
                eps: 1e-8,
            },
        ];
        for spec in &specs {
            for opt in &opts {
                let p0 = spec.init(11);
                let (want, want_loss) = reference(spec, p0.clone(), &data, &batches, opt);
                let (got, got_loss) = hand(spec, p0.clone(), &data, &batches, opt);
                assert!(max_diff(&want, &p0) > 1e-3, "the steps moved nothing");
                assert!(
                    max_diff(&want, &got) < 1e-5,
                    "{spec:?} {opt:?}: parameters differ by {}",
                    max_diff(&want, &got)
                );
                assert!(
                    max_diff(&want_loss, &got_loss) < 1e-5,
                    "{want_loss:?} {got_loss:?}"
                );
            }
        }
    }

    #[test]
    fn weight_gradients_are_applied_in_blocks() {
        // A layer wider than one gradient block steps block by block and
        // ends where a single whole-layer step does.
        let inputs = GRAD_BLOCK / 4 + 3;
        let data = synthetic(5, 8, inputs, 3);
        let spec = ModelSpec::Mlp {
            inputs,
            hidden: vec![9],
            classes: 3,
        };
        let opt = InnerOptimizer::SgdMomentum {
            lr: 0.05,
            momentum: 0.9,
        };
        let batches = vec![(0..8).collect::<Vec<_>>(), (0..4).collect()];
        let p0 = spec.init(2);
        let (want, _) = reference(&spec, p0.clone(), &data, &batches, &opt);
        let (got, _) = hand(&spec, p0, &data, &batches, &opt);
        assert!(max_diff(&want, &got) < 1e-5, "{}", max_diff(&want, &got));
    }

    #[test]
    fn evaluation_matches_candle() {
        let data = synthetic(4, 600, 10, 5);
        let spec = ModelSpec::Mlp {
            inputs: 10,
            hidden: vec![16],
            classes: 5,
        };
        let p = spec.init(1);
        let rows: Vec<usize> = (0..data.len()).collect();
        let (x, y) = batch_tensors(&data, &rows, 5, &Device::Cpu).unwrap();
        let vars = spec.tensors(&p, &Device::Cpu).unwrap();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let logits = spec.forward(&tensors, &x).unwrap();
        let want = cross_entropy(&logits, &y)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let (loss, accuracy) = evaluate(&spec.layers(), &p, &data);
        assert!((loss - want).abs() < 1e-5, "{loss} against {want}");
        assert!((0.0..=1.0).contains(&accuracy));
        let predicted = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        let hits = predicted
            .iter()
            .zip(&data.labels)
            .filter(|(a, b)| a == b)
            .count();
        assert_eq!(accuracy, hits as f32 / data.len() as f32);
    }
}
