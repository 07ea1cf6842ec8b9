//! The byte-level transformer's forward and backward passes written out by
//! hand on the flat parameter vector: no autograd graph, no tensor per
//! parameter, no tensor per intermediate operation.
//!
//! Through candle's autograd a training step is hundreds of small tensor
//! operations (layer norm, softmax and GELU built from element-wise pieces,
//! each allocating its output and its gradient), and at a million
//! parameters it ran at a third of PyTorch's speed on the same CPU
//! (BENCHMARKS.md). Here each layer is one loop over its rows and the
//! matrix products are `gemm` calls on strided views (`linalg`), the same
//! products candle runs. The results are checked against candle's autograd
//! (`transformer::tests`): logits, loss and every gradient.
//!
//! Notation: `B` windows of `T` positions, `N = B·T` rows, width `W`,
//! `H` heads of `D = W/H`, MLP width `F = 4W`. Weights are stored input ×
//! output (GPT-2's `Conv1D`), so a linear layer is `x · W + b`.

use crate::linalg::{View, product};
use crate::transformer::{LN_EPS, PER_BLOCK, Transformer, VOCAB};

/// What a block's backward pass needs from its forward pass.
#[derive(Default)]
struct BlockCache {
    /// First layer norm: normalised input (N×W) and 1/σ per row.
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    /// Its output, the attention's input (N×W).
    a: Vec<f32>,
    /// Queries, keys and values (N×3W; head h's at columns h·D of each).
    qkv: Vec<f32>,
    /// Attention probabilities, B·H matrices of T×T (zero above the
    /// diagonal).
    probs: Vec<f32>,
    /// The heads' outputs side by side (N×W), before the projection.
    y: Vec<f32>,
    /// Second layer norm: normalised input, 1/σ, output (the MLP's input).
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
    m: Vec<f32>,
    /// The MLP's hidden layer before (N×F) and after GELU.
    u: Vec<f32>,
    g: Vec<f32>,
}

/// A forward pass: the logits and what the backward pass needs. Its
/// buffers are kept from one pass to the next (a training step allocates
/// nothing once the first has run), and resized when the batch's shape
/// changes.
#[derive(Default)]
pub(crate) struct Forward {
    /// Rows of the batch and positions per window.
    n: usize,
    t: usize,
    blocks: Vec<BlockCache>,
    /// The final layer norm's normalised input, 1/σ and output.
    xhat_f: Vec<f32>,
    rstd_f: Vec<f32>,
    z: Vec<f32>,
    /// `N × 256`: row b·T + t predicts the byte after position t of window b.
    pub(crate) logits: Vec<f32>,
    /// Working buffers: the residual stream, a layer's output, and the
    /// backward pass's gradients of activations.
    x: Vec<f32>,
    out: Vec<f32>,
    dz: Vec<f32>,
    dx: Vec<f32>,
    dm: Vec<f32>,
    dg: Vec<f32>,
    dy: Vec<f32>,
    dqkv: Vec<f32>,
    dp: Vec<f32>,
}

/// `v` with `n` values. Kept as it is when it has them already: every
/// caller overwrites or clears what it reads.
fn sized(v: &mut Vec<f32>, n: usize) {
    if v.len() != n {
        v.clear();
        v.resize(n, 0.0);
    }
}

/// Where each tensor of the layout starts in the flat vector.
fn offsets(model: &Transformer) -> Vec<usize> {
    let mut at = 0;
    model
        .layout()
        .iter()
        .map(|spec| {
            let here = at;
            at += spec.shape.iter().map(|d| *d as usize).product::<usize>();
            here
        })
        .chain(std::iter::once(model.n_params()))
        .collect()
}

/// The parameter slice of tensor `k` of the layout.
fn tensor<'a>(p: &'a [f32], offs: &[usize], k: usize) -> &'a [f32] {
    &p[offs[k]..offs[k + 1]]
}

/// Layer norm of each row of `x` (rows of `w`): writes the normalised rows
/// into `xhat`, 1/σ into `rstd` and `xhat · gain + bias` into `out`.
fn layer_norm(
    x: &[f32],
    w: usize,
    gain: &[f32],
    bias: &[f32],
    xhat: &mut [f32],
    rstd: &mut [f32],
    out: &mut [f32],
) {
    for (((row, xh), r), o) in x
        .chunks_exact(w)
        .zip(xhat.chunks_exact_mut(w))
        .zip(rstd.iter_mut())
        .zip(out.chunks_exact_mut(w))
    {
        let mean = row.iter().sum::<f32>() / w as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / w as f32;
        *r = 1.0 / (var + LN_EPS as f32).sqrt();
        for (((h, o), v), (g, b)) in xh
            .iter_mut()
            .zip(o.iter_mut())
            .zip(row)
            .zip(gain.iter().zip(bias))
        {
            *h = (v - mean) * *r;
            *o = *h * g + b;
        }
    }
}

/// The layer norm's backward pass: adds the input's gradient to `dx` and
/// the gain's and bias's to `dgain`, `dbias`, from the output's `dy`.
#[allow(clippy::too_many_arguments)]
fn layer_norm_backward(
    dy: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    gain: &[f32],
    w: usize,
    dx: &mut [f32],
    dgain: &mut [f32],
    dbias: &mut [f32],
) {
    for (((dy, xh), r), dx) in dy
        .chunks_exact(w)
        .zip(xhat.chunks_exact(w))
        .zip(rstd)
        .zip(dx.chunks_exact_mut(w))
    {
        let (mut mean1, mut mean2) = (0f32, 0f32);
        for ((d, h), g) in dy.iter().zip(xh).zip(gain) {
            let dxh = d * g;
            mean1 += dxh;
            mean2 += dxh * h;
        }
        mean1 /= w as f32;
        mean2 /= w as f32;
        for ((((d, h), g), o), (dg, db)) in dy
            .iter()
            .zip(xh)
            .zip(gain)
            .zip(dx.iter_mut())
            .zip(dgain.iter_mut().zip(dbias.iter_mut()))
        {
            *o += r * (d * g - mean1 - h * mean2);
            *dg += d * h;
            *db += d;
        }
    }
}

/// `out = x · w + b` for `x` of `n × inp` and `w` of `inp × outp`.
fn linear(x: &[f32], n: usize, inp: usize, w: &[f32], b: &[f32], out: &mut [f32]) {
    let outp = b.len();
    product(
        out,
        outp,
        View::rows(x, n, inp),
        View::rows(w, inp, outp),
        false,
    );
    for row in out.chunks_exact_mut(outp) {
        for (o, bb) in row.iter_mut().zip(b) {
            *o += bb;
        }
    }
}

/// The weight's and bias's gradients of `out = x · w + b` (written, not
/// added) and, if asked, `dx = dout · wᵀ` (added to `dx`).
#[allow(clippy::too_many_arguments)]
fn linear_backward(
    x: &[f32],
    dout: &[f32],
    n: usize,
    inp: usize,
    outp: usize,
    w: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
    dx: Option<&mut [f32]>,
) {
    // ∂w = xᵀ · ∂out
    let xt = View {
        data: x,
        rows: inp,
        cols: n,
        rs: 1,
        cs: inp,
    };
    product(dw, outp, xt, View::rows(dout, n, outp), false);
    db.fill(0.0);
    for row in dout.chunks_exact(outp) {
        for (s, v) in db.iter_mut().zip(row) {
            *s += v;
        }
    }
    if let Some(dx) = dx {
        product(
            dx,
            inp,
            View::rows(dout, n, outp),
            View::transposed(w, outp, inp),
            true,
        );
    }
}

/// √(2/π), GELU's tanh approximation's constant.
const GELU_C: f32 = 0.797_884_6;

/// tanh as a rational function (the approximation of Eigen's
/// `generic_fast_tanh_float`, within 4·10⁻⁷ of the exact value over the
/// reals): some seven times faster than the C library's `tanhf`, which took
/// a quarter of a million-parameter model's step in GELU alone.
fn tanh(x: f32) -> f32 {
    let x = x.clamp(-7.905_311, 7.905_311);
    let x2 = x * x;
    let mut p = -2.760_768_5e-16f32;
    p = p * x2 + 2.000_188e-13;
    p = p * x2 - 8.604_672e-11;
    p = p * x2 + 5.122_297e-8;
    p = p * x2 + 1.485_722_4e-5;
    p = p * x2 + 6.372_619_3e-4;
    p = p * x2 + 4.893_524_6e-3;
    let mut q = 1.198_258_4e-6f32;
    q = q * x2 + 1.185_347_1e-4;
    q = q * x2 + 2.268_434_6e-3;
    q = q * x2 + 4.893_525e-3;
    x * p / q
}

/// GELU, tanh approximation (GPT-2's and candle's `gelu`).
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh(GELU_C * (x + 0.044_715 * x * x * x)))
}

/// The derivative of [`gelu`].
fn gelu_grad(x: f32) -> f32 {
    let th = tanh(GELU_C * (x + 0.044_715 * x * x * x));
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * GELU_C * (1.0 + 3.0 * 0.044_715 * x * x)
}

impl Forward {
    /// The forward pass of `b` windows of `t` input bytes each
    /// (`tokens`, row-major `b × t`, `t` ≤ the context), keeping what the
    /// backward pass needs. `p` must have the model's length and `tokens`
    /// `b · t` bytes: the callers check both.
    pub(crate) fn run(
        &mut self,
        model: &Transformer,
        p: &[f32],
        tokens: &[u8],
        b: usize,
        t: usize,
    ) {
        let offs = offsets(model);
        let (w, h) = (model.width, model.heads);
        let d = w / h;
        let f = 4 * w;
        let n = b * t;
        let wte = tensor(p, &offs, 0);
        let wpe = tensor(p, &offs, 1);
        let mut x = std::mem::take(&mut self.x);
        let mut attn = std::mem::take(&mut self.out);
        sized(&mut x, n * w);
        sized(&mut attn, n * w);
        for (r, (row, tok)) in x.chunks_exact_mut(w).zip(tokens).enumerate() {
            let pos = r % t;
            let te = &wte[usize::from(*tok) * w..][..w];
            let pe = &wpe[pos * w..][..w];
            for ((o, a), c) in row.iter_mut().zip(te).zip(pe) {
                *o = a + c;
            }
        }
        let scale = 1.0 / (d as f32).sqrt();
        self.blocks.resize_with(model.layers, BlockCache::default);
        for (i, c) in self.blocks.iter_mut().enumerate() {
            let k = 2 + i * PER_BLOCK;
            let pt = |j: usize| tensor(p, &offs, k + j);
            for (v, len) in [
                (&mut c.xhat1, n * w),
                (&mut c.rstd1, n),
                (&mut c.a, n * w),
                (&mut c.qkv, n * 3 * w),
                (&mut c.probs, b * h * t * t),
                (&mut c.y, n * w),
                (&mut c.xhat2, n * w),
                (&mut c.rstd2, n),
                (&mut c.m, n * w),
                (&mut c.u, n * f),
                (&mut c.g, n * f),
            ] {
                sized(v, len);
            }
            layer_norm(&x, w, pt(0), pt(1), &mut c.xhat1, &mut c.rstd1, &mut c.a);
            linear(&c.a, n, w, pt(2), pt(3), &mut c.qkv);
            for bi in 0..b {
                for hi in 0..h {
                    let base = bi * t * 3 * w + hi * d;
                    let s = &mut c.probs[(bi * h + hi) * t * t..][..t * t];
                    let q = View {
                        data: &c.qkv[base..],
                        rows: t,
                        cols: d,
                        rs: 3 * w,
                        cs: 1,
                    };
                    let kt = View {
                        data: &c.qkv[base + w..],
                        rows: d,
                        cols: t,
                        rs: 1,
                        cs: 3 * w,
                    };
                    product(s, t, q, kt, false);
                    for (row_i, row) in s.chunks_exact_mut(t).enumerate() {
                        let seen = &mut row[..=row_i];
                        let max = seen.iter().fold(f32::NEG_INFINITY, |m, v| m.max(v * scale));
                        let mut sum = 0f32;
                        for v in seen.iter_mut() {
                            *v = (*v * scale - max).exp();
                            sum += *v;
                        }
                        for v in seen.iter_mut() {
                            *v /= sum;
                        }
                        row[row_i + 1..].fill(0.0);
                    }
                    let v = View {
                        data: &c.qkv[base + 2 * w..],
                        rows: t,
                        cols: d,
                        rs: 3 * w,
                        cs: 1,
                    };
                    product(
                        &mut c.y[bi * t * w + hi * d..],
                        w,
                        View::rows(s, t, t),
                        v,
                        false,
                    );
                }
            }
            linear(&c.y, n, w, pt(4), pt(5), &mut attn);
            for (o, a) in x.iter_mut().zip(&attn) {
                *o += a;
            }
            layer_norm(&x, w, pt(6), pt(7), &mut c.xhat2, &mut c.rstd2, &mut c.m);
            linear(&c.m, n, w, pt(8), pt(9), &mut c.u);
            for (g, u) in c.g.iter_mut().zip(&c.u) {
                *g = gelu(*u);
            }
            linear(&c.g, n, f, pt(10), pt(11), &mut attn);
            for (o, a) in x.iter_mut().zip(&attn) {
                *o += a;
            }
        }
        let last = offs.len() - 1;
        sized(&mut self.xhat_f, n * w);
        sized(&mut self.rstd_f, n);
        sized(&mut self.z, n * w);
        layer_norm(
            &x,
            w,
            tensor(p, &offs, last - 2),
            tensor(p, &offs, last - 1),
            &mut self.xhat_f,
            &mut self.rstd_f,
            &mut self.z,
        );
        sized(&mut self.logits, n * VOCAB);
        product(
            &mut self.logits,
            VOCAB,
            View::rows(&self.z, n, w),
            View::transposed(wte, w, VOCAB),
            false,
        );
        self.n = n;
        self.t = t;
        self.x = x;
        self.out = attn;
    }

    /// The summed cross-entropy (nats) of the logits against `targets`
    /// (one byte per row). With `gradient`, the logits are replaced by the
    /// gradient of the *mean* cross-entropy with respect to them.
    pub(crate) fn cross_entropy(&mut self, targets: &[u8], gradient: bool) -> f64 {
        let n = self.n.max(1) as f32;
        let mut nats = 0f64;
        for (row, y) in self.logits.chunks_exact_mut(VOCAB).zip(targets) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
            let lse = sum.ln();
            nats += f64::from(lse - (row[usize::from(*y)] - max));
            if gradient {
                for v in row.iter_mut() {
                    *v = (*v - max - lse).exp() / n;
                }
                row[usize::from(*y)] -= 1.0 / n;
            }
        }
        nats
    }

    /// The gradient of the loss with respect to every parameter, written
    /// into `grad` (the model's length), from logits that
    /// [`Forward::cross_entropy`] turned into their gradient.
    pub(crate) fn backward(
        &mut self,
        model: &Transformer,
        p: &[f32],
        tokens: &[u8],
        grad: &mut [f32],
    ) {
        let offs = offsets(model);
        let (w, h) = (model.width, model.heads);
        let d = w / h;
        let f = 4 * w;
        let (n, t) = (self.n, self.t);
        let b = n / t.max(1);
        let scale = 1.0 / (d as f32).sqrt();
        grad.fill(0.0);
        let last = offs.len() - 1;
        let wte = tensor(p, &offs, 0);
        // The tied head: logits = z · wteᵀ.
        let Forward {
            blocks,
            xhat_f,
            rstd_f,
            z,
            logits,
            dz,
            dx,
            dm,
            dg,
            dy,
            dqkv,
            dp,
            ..
        } = self;
        for (v, len) in [
            (&mut *dz, n * w),
            (&mut *dx, n * w),
            (&mut *dm, n * w),
            (&mut *dg, n * f),
            (&mut *dy, n * w),
            (&mut *dqkv, n * 3 * w),
            (&mut *dp, t * t),
        ] {
            sized(v, len);
        }
        product(
            dz,
            w,
            View::rows(logits, n, VOCAB),
            View::rows(wte, VOCAB, w),
            false,
        );
        {
            let dlt = View {
                data: logits,
                rows: VOCAB,
                cols: n,
                rs: 1,
                cs: VOCAB,
            };
            let dwte = &mut grad[offs[0]..offs[1]];
            product(dwte, w, dlt, View::rows(z, n, w), false);
        }
        // The residual stream's gradient, from the top down.
        dx.fill(0.0);
        {
            let (g_lo, g_hi) = grad.split_at_mut(offs[last - 1]);
            layer_norm_backward(
                dz,
                xhat_f,
                rstd_f,
                tensor(p, &offs, last - 2),
                w,
                dx,
                &mut g_lo[offs[last - 2]..],
                &mut g_hi[..w],
            );
        }
        for (i, c) in blocks.iter().enumerate().rev() {
            let k = 2 + i * PER_BLOCK;
            let pt = |j: usize| tensor(p, &offs, k + j);
            let [
                g_ln1,
                g_ln1b,
                g_attn,
                g_attnb,
                g_proj,
                g_projb,
                g_ln2,
                g_ln2b,
                g_fc,
                g_fcb,
                g_out,
                g_outb,
            ] = split_block(grad, &offs, k);
            // The MLP's projection, GELU, and first layer.
            dg.fill(0.0);
            linear_backward(&c.g, dx, n, f, w, pt(10), g_out, g_outb, Some(&mut dg[..]));
            for (dg, u) in dg.iter_mut().zip(&c.u) {
                *dg *= gelu_grad(*u);
            }
            dm.fill(0.0);
            linear_backward(&c.m, dg, n, w, f, pt(8), g_fc, g_fcb, Some(&mut dm[..]));
            layer_norm_backward(dm, &c.xhat2, &c.rstd2, pt(6), w, &mut dx[..], g_ln2, g_ln2b);
            // The attention's projection.
            dy.fill(0.0);
            linear_backward(&c.y, dx, n, w, w, pt(4), g_proj, g_projb, Some(&mut dy[..]));
            // Attention, window by window and head by head.
            for bi in 0..b {
                for hi in 0..h {
                    let base = bi * t * 3 * w + hi * d;
                    let probs = &c.probs[(bi * h + hi) * t * t..][..t * t];
                    let dyv = View {
                        data: &dy[bi * t * w + hi * d..],
                        rows: t,
                        cols: d,
                        rs: w,
                        cs: 1,
                    };
                    // ∂P = ∂y · vᵀ
                    let vt = View {
                        data: &c.qkv[base + 2 * w..],
                        rows: d,
                        cols: t,
                        rs: 1,
                        cs: 3 * w,
                    };
                    product(&mut dp[..], t, dyv, vt, false);
                    // ∂v = Pᵀ · ∂y
                    product(
                        &mut dqkv[base + 2 * w..],
                        3 * w,
                        View::transposed(probs, t, t),
                        dyv,
                        false,
                    );
                    // ∂S = P ∘ (∂P − Σⱼ ∂P·P), times the scale.
                    for (row_i, (dr, pr)) in dp
                        .chunks_exact_mut(t)
                        .zip(probs.chunks_exact(t))
                        .enumerate()
                    {
                        let dot: f32 = dr[..=row_i].iter().zip(pr).map(|(a, b)| a * b).sum();
                        for (dv, pv) in dr[..=row_i].iter_mut().zip(pr) {
                            *dv = pv * (*dv - dot) * scale;
                        }
                        dr[row_i + 1..].fill(0.0);
                    }
                    // ∂q = ∂S · k, ∂k = ∂Sᵀ · q
                    let kv = View {
                        data: &c.qkv[base + w..],
                        rows: t,
                        cols: d,
                        rs: 3 * w,
                        cs: 1,
                    };
                    product(&mut dqkv[base..], 3 * w, View::rows(dp, t, t), kv, false);
                    let qv = View {
                        data: &c.qkv[base..],
                        rows: t,
                        cols: d,
                        rs: 3 * w,
                        cs: 1,
                    };
                    product(
                        &mut dqkv[base + w..],
                        3 * w,
                        View::transposed(dp, t, t),
                        qv,
                        false,
                    );
                }
            }
            dm.fill(0.0);
            linear_backward(
                &c.a,
                dqkv,
                n,
                w,
                3 * w,
                pt(2),
                g_attn,
                g_attnb,
                Some(&mut dm[..]),
            );
            layer_norm_backward(dm, &c.xhat1, &c.rstd1, pt(0), w, &mut dx[..], g_ln1, g_ln1b);
        }
        // The embeddings: each row's gradient to its byte's and its
        // position's vector.
        let (g_wte, g_rest) = grad.split_at_mut(offs[1]);
        let g_wpe = &mut g_rest[..offs[2] - offs[1]];
        for (r, (row, tok)) in dx.chunks_exact(w).zip(tokens).enumerate() {
            let pos = r % t;
            let te = &mut g_wte[usize::from(*tok) * w..][..w];
            for (g, v) in te.iter_mut().zip(row) {
                *g += v;
            }
            let pe = &mut g_wpe[pos * w..][..w];
            for (g, v) in pe.iter_mut().zip(row) {
                *g += v;
            }
        }
    }
}

/// The gradient slices of block tensors `k .. k + PER_BLOCK`, in order.
fn split_block<'a>(grad: &'a mut [f32], offs: &[usize], k: usize) -> [&'a mut [f32]; PER_BLOCK] {
    let mut rest = &mut grad[offs[k]..offs[k + PER_BLOCK]];
    std::array::from_fn(|j| {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(offs[k + j + 1] - offs[k + j]);
        rest = tail;
        head
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rational_tanh_is_within_half_a_micro_of_the_exact_one() {
        let mut worst = 0f32;
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4;
            worst = worst.max((tanh(x) - x.tanh()).abs());
        }
        for x in [-1e30f32, -50.0, 7.9, 8.0, 1e30] {
            worst = worst.max((tanh(x) - x.tanh()).abs());
        }
        assert!(worst < 5e-7, "{worst}");
        assert_eq!(tanh(0.0), 0.0);
        assert!(tanh(1e-30) > 0.0 && tanh(-1e-30) < 0.0);
    }
}
