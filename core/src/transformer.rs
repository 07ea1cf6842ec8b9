//! A decoder-only transformer over bytes: GPT-2's architecture with a
//! vocabulary of the 256 byte values, so no tokenizer stands between a
//! node's text and the model. Token and learned position embeddings,
//! pre-norm blocks (LayerNorm, causal multi-head self-attention, GELU
//! MLP), a final LayerNorm and an output head tied to the token
//! embedding.
//!
//! The parameters are one named, ordered tensor set with GPT-2's own names
//! and shapes (`wte.weight`, `wpe.weight`, `h.{i}.ln_1.weight`, ...,
//! `h.{i}.attn.c_attn.weight` as `[width, 3·width]`: GPT-2's `Conv1D`
//! orientation, input × output), flattened in [`Transformer::layout`]'s
//! order into the one f32 vector that deltas, codecs and aggregation work
//! on — so a model written out under these names is what GPT-2
//! implementations load.
//!
//! Deterministic for a fixed seed on one kernel thread (initialisation,
//! training windows and sampling all come from the seeds passed in).

use candle_core::{D, Device, Tensor, Var};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tapestry_protocol::{DType, TensorSpec};

use crate::model::{
    InnerState, ModelError, TrainConfig, TrainReport, apply_grads, check_len, cross_entropy,
    layout_vars,
};
use crate::text::{window_rng, windows};
use crate::transformer_passes::Forward;

/// The vocabulary: one symbol per byte value.
pub const VOCAB: usize = 256;

/// The largest context length accepted (attention is quadratic in it).
pub const MAX_CONTEXT: usize = 4096;

/// LayerNorm's ε, as in GPT-2.
pub(crate) const LN_EPS: f64 = 1e-5;

/// Tensors per block, in layout order.
pub(crate) const PER_BLOCK: usize = 12;

/// The shape of a byte-level transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transformer {
    /// Blocks.
    pub layers: usize,
    /// Width of the residual stream (GPT-2's `n_embd`).
    pub width: usize,
    /// Attention heads; `width` is a multiple of it.
    pub heads: usize,
    /// Context length in bytes (GPT-2's `n_positions`).
    pub context: usize,
}

impl std::str::FromStr for Transformer {
    type Err = ModelError;

    /// `LAYERS,WIDTH,HEADS,CONTEXT`, e.g. `2,64,4,64`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<usize> = s
            .split(',')
            .map(|p| p.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|_| {
                ModelError::Invalid(format!(
                    "transformer {s:?}: expected LAYERS,WIDTH,HEADS,CONTEXT (four integers)"
                ))
            })?;
        match parts[..] {
            [layers, width, heads, context] => Transformer::new(layers, width, heads, context),
            _ => Err(ModelError::Invalid(format!(
                "transformer {s:?}: expected LAYERS,WIDTH,HEADS,CONTEXT (four integers)"
            ))),
        }
    }
}

impl std::fmt::Display for Transformer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{},{},{},{}",
            self.layers, self.width, self.heads, self.context
        )
    }
}

impl Transformer {
    /// A transformer of this shape, if it is one: every dimension ≥ 1,
    /// `width` a multiple of `heads`, `context` at most [`MAX_CONTEXT`].
    pub fn new(
        layers: usize,
        width: usize,
        heads: usize,
        context: usize,
    ) -> Result<Self, ModelError> {
        if layers == 0 || width == 0 || heads == 0 || context == 0 {
            return Err(ModelError::Invalid(
                "a transformer needs layers, width, heads and context ≥ 1".into(),
            ));
        }
        if !width.is_multiple_of(heads) {
            return Err(ModelError::Invalid(format!(
                "width {width} is not a multiple of heads {heads}"
            )));
        }
        if context > MAX_CONTEXT {
            return Err(ModelError::Invalid(format!(
                "context {context} above {MAX_CONTEXT}"
            )));
        }
        Ok(Transformer {
            layers,
            width,
            heads,
            context,
        })
    }

    /// The named, ordered tensor set, with GPT-2's names and shapes:
    /// `wte.weight`, `wpe.weight`, then for each block `h.{i}.ln_1.*`,
    /// `h.{i}.attn.c_attn.*`, `h.{i}.attn.c_proj.*`, `h.{i}.ln_2.*`,
    /// `h.{i}.mlp.c_fc.*`, `h.{i}.mlp.c_proj.*` (weights input × output),
    /// then `ln_f.*`.
    pub fn layout(&self) -> Vec<TensorSpec> {
        let w = self.width as u64;
        let t = |name: String, shape: Vec<u64>| TensorSpec {
            name,
            shape,
            dtype: DType::F32,
        };
        let mut out = vec![
            t("wte.weight".into(), vec![VOCAB as u64, w]),
            t("wpe.weight".into(), vec![self.context as u64, w]),
        ];
        for i in 0..self.layers {
            let h = |s: &str| format!("h.{i}.{s}");
            out.extend([
                t(h("ln_1.weight"), vec![w]),
                t(h("ln_1.bias"), vec![w]),
                t(h("attn.c_attn.weight"), vec![w, 3 * w]),
                t(h("attn.c_attn.bias"), vec![3 * w]),
                t(h("attn.c_proj.weight"), vec![w, w]),
                t(h("attn.c_proj.bias"), vec![w]),
                t(h("ln_2.weight"), vec![w]),
                t(h("ln_2.bias"), vec![w]),
                t(h("mlp.c_fc.weight"), vec![w, 4 * w]),
                t(h("mlp.c_fc.bias"), vec![4 * w]),
                t(h("mlp.c_proj.weight"), vec![4 * w, w]),
                t(h("mlp.c_proj.bias"), vec![w]),
            ]);
        }
        out.extend([
            t("ln_f.weight".into(), vec![w]),
            t("ln_f.bias".into(), vec![w]),
        ]);
        out
    }

    /// Total parameters: V·W + C·W + L·(12·W² + 13·W) + 2·W.
    pub fn n_params(&self) -> usize {
        let w = self.width;
        VOCAB * w + self.context * w + self.layers * (12 * w * w + 13 * w) + 2 * w
    }

    /// GPT-2's initialisation: weights and embeddings with σ 0.02 (the
    /// residual projections `c_proj` with σ 0.02/√(2·layers)), biases zero,
    /// LayerNorm gains one, drawn in layout order from one seeded stream.
    /// Each draw is σ × (the sum of 12 uniforms on [0, 1) − 6): the
    /// Irwin–Hall approximation of a standard normal (variance 1, bounded
    /// by ±6), which needs nothing but additions, so every implementation
    /// gets the same bits (node/PROTOCOL.md, "The genesis parameters").
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let std = 0.02f32;
        let proj_std = std / ((2 * self.layers) as f32).sqrt();
        let mut out = Vec::with_capacity(self.n_params());
        for spec in self.layout() {
            let n: usize = spec.shape.iter().map(|d| *d as usize).product();
            let name = spec.name.as_str();
            if name.ends_with(".bias") {
                out.extend(std::iter::repeat_n(0.0, n));
            } else if name.contains("ln_") {
                out.extend(std::iter::repeat_n(1.0, n));
            } else {
                let sigma = if name.ends_with("c_proj.weight") {
                    proj_std
                } else {
                    std
                };
                out.extend((0..n).map(|_| sigma * irwin_hall(&mut rng)));
            }
        }
        out
    }

    fn check(&self, params: &[f32]) -> Result<(), ModelError> {
        check_len(self.n_params(), params)
    }

    /// The logits `[len, 256]` after each byte of `bytes` (at most
    /// `context` of them): row t scores the byte that follows `bytes[t]`.
    pub fn logits_of(&self, params: &[f32], bytes: &[u8]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.check(params)?;
        if bytes.is_empty() || bytes.len() > self.context {
            return Err(ModelError::Invalid(format!(
                "{} bytes: between 1 and the context, {}",
                bytes.len(),
                self.context
            )));
        }
        let mut fwd = Forward::default();
        fwd.run(self, params, bytes, 1, bytes.len());
        Ok(fwd
            .logits
            .chunks_exact(VOCAB)
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// A Hugging Face `config.json` for GPT-2 (`GPT2LMHeadModel`) with this
    /// shape: vocabulary 256 (the byte values), `gelu_new` (the tanh
    /// approximation this model uses), LayerNorm ε 1e-5, the head tied to
    /// the token embedding, newline (byte 10) as beginning and end token.
    pub fn gpt2_config_json(&self) -> String {
        let config = serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": VOCAB,
            "n_positions": self.context,
            "n_ctx": self.context,
            "n_embd": self.width,
            "n_layer": self.layers,
            "n_head": self.heads,
            "n_inner": 4 * self.width,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": LN_EPS,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": true,
            "scale_attn_weights": true,
            "bos_token_id": 10,
            "eos_token_id": 10,
            "torch_dtype": "float32",
        });
        serde_json::to_string_pretty(&config).unwrap_or_default() + "\n"
    }

    /// The shape a GPT-2 `config.json` describes, if it is one this model
    /// can be: vocabulary 256, `gelu_new`, inner width 4 × `n_embd` (or
    /// unset).
    pub fn from_gpt2_config(json: &str) -> Result<Transformer, ModelError> {
        let bad = |why: String| ModelError::Import(format!("config.json: {why}"));
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| bad(format!("not JSON: {e}")))?;
        let num = |key: &str| -> Result<usize, ModelError> {
            v.get(key)
                .and_then(serde_json::Value::as_u64)
                .map(|n| n as usize)
                .ok_or_else(|| bad(format!("no integer {key:?}")))
        };
        if num("vocab_size")? != VOCAB {
            return Err(bad(format!(
                "vocab_size {} (a byte-level model has {VOCAB})",
                num("vocab_size")?
            )));
        }
        if let Some(act) = v.get("activation_function").and_then(|a| a.as_str())
            && act != "gelu_new"
        {
            return Err(bad(format!("activation {act:?}, this model uses gelu_new")));
        }
        let t = Transformer::new(
            num("n_layer")?,
            num("n_embd")?,
            num("n_head")?,
            num("n_positions")?,
        )?;
        if let Some(inner) = v.get("n_inner").filter(|i| !i.is_null())
            && inner.as_u64() != Some(4 * t.width as u64)
        {
            return Err(bad(format!("n_inner {inner}, this model uses 4 × n_embd")));
        }
        Ok(t)
    }

    fn vars(&self, params: &[f32], device: &Device) -> Result<Vec<Var>, ModelError> {
        layout_vars(&self.layout(), params, device)
    }

    /// Logits `[B·T, 256]` for byte sequences `tokens` `[B, T]` (u32,
    /// T ≤ context): row b·T + t predicts the byte after `tokens[b][t]`.
    fn logits(&self, p: &[Tensor], tokens: &Tensor) -> Result<Tensor, ModelError> {
        let (b, t) = tokens.dims2()?;
        let (w, h) = (self.width, self.heads);
        let hd = w / h;
        let device = tokens.device();
        let tok = p[0].index_select(&tokens.flatten_all()?, 0)?;
        let pos = p[1].index_select(&Tensor::arange(0u32, t as u32, device)?, 0)?;
        let mut x = tok
            .reshape((b, t, w))?
            .broadcast_add(&pos)?
            .reshape((b * t, w))?;
        // 0 on and below the diagonal, a large negative number above it: a
        // position attends to itself and the positions before it only.
        let mask: Vec<f32> = (0..t * t)
            .map(|k| if k % t > k / t { -1e9 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), device)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for i in 0..self.layers {
            let q0 = 2 + i * PER_BLOCK;
            let blk = &p[q0..q0 + PER_BLOCK];
            let a = layer_norm(&x, &blk[0], &blk[1])?;
            let qkv = linear(&a, &blk[2], &blk[3])?.reshape((b, t, 3, h, hd))?;
            let head = |k: usize| -> Result<Tensor, ModelError> {
                Ok(qkv
                    .narrow(2, k, 1)?
                    .squeeze(2)?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let (q, k, v) = (head(0)?, head(1)?, head(2)?);
            let att = q
                .matmul(&k.t()?.contiguous()?)?
                .affine(scale, 0.0)?
                .broadcast_add(&mask)?;
            let y = softmax_last(&att)?
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * t, w))?;
            x = (x + linear(&y, &blk[4], &blk[5])?)?;
            let m = layer_norm(&x, &blk[6], &blk[7])?;
            let m = linear(&m, &blk[8], &blk[9])?.gelu()?;
            x = (x + linear(&m, &blk[10], &blk[11])?)?;
        }
        let n = p.len();
        let x = layer_norm(&x, &p[n - 2], &p[n - 1])?;
        Ok(x.matmul(&p[0].t()?)?)
    }

    /// Runs `config.local_steps` steps from `params` on windows of
    /// `context + 1` bytes of `text`, `config.batch_size` windows a step,
    /// drawn from a generator seeded with `seed`. `samples` in the report
    /// counts the bytes predicted.
    pub fn train_local(
        &self,
        params: &[f32],
        text: &[u8],
        config: &TrainConfig,
        state: &mut InnerState,
        seed: u64,
    ) -> Result<(Vec<f32>, TrainReport), ModelError> {
        self.train_local_owned(params.to_vec(), text, config, state, seed)
    }

    /// [`Transformer::train_local`] on parameters it may consume: trains
    /// on them in place, with no copy.
    pub fn train_local_owned(
        &self,
        p: Vec<f32>,
        text: &[u8],
        config: &TrainConfig,
        state: &mut InnerState,
        seed: u64,
    ) -> Result<(Vec<f32>, TrainReport), ModelError> {
        self.train(p, text, config, state, seed, false)
    }

    /// [`Transformer::train_local_owned`] through candle's autograd (the
    /// parameters made tensors, `backward`, each gradient read from
    /// candle's storage): how the core trained before its hand-written
    /// passes, kept as the reference they are checked and benchmarked
    /// against. The same steps to within float rounding.
    #[doc(hidden)]
    pub fn train_local_autograd(
        &self,
        p: Vec<f32>,
        text: &[u8],
        config: &TrainConfig,
        state: &mut InnerState,
        seed: u64,
    ) -> Result<(Vec<f32>, TrainReport), ModelError> {
        self.train(p, text, config, state, seed, true)
    }

    fn train(
        &self,
        mut p: Vec<f32>,
        text: &[u8],
        config: &TrainConfig,
        state: &mut InnerState,
        seed: u64,
        autograd: bool,
    ) -> Result<(Vec<f32>, TrainReport), ModelError> {
        self.check(&p)?;
        if config.batch_size == 0 || config.local_steps == 0 {
            return Err(ModelError::Invalid(
                "local_steps and batch_size must be at least 1".into(),
            ));
        }
        let device = Device::Cpu;
        let mut rng = window_rng(seed);
        state.fit(p.len(), &config.optimizer);
        let mut loss_sum = 0f64;
        let mut samples = 0u64;
        let mut grad = Vec::new();
        let mut fwd = Forward::default();
        for _ in 0..config.local_steps {
            let windows =
                windows(text, config.batch_size, self.context + 1, &mut rng).ok_or_else(|| {
                    ModelError::DataMismatch(format!(
                        "{} bytes of training text, shorter than one window of {}",
                        text.len(),
                        self.context + 1
                    ))
                })?;
            if autograd {
                let (x, y) = window_tensors(&windows, &device)?;
                let vars = self.vars(&p, &device)?;
                let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
                let loss = cross_entropy(&self.logits(&tensors, &x)?, &y)?;
                loss_sum += f64::from(loss.to_scalar::<f32>()?);
                let grads = loss.backward()?;
                apply_grads(&config.optimizer, &mut p, &grads, &vars, state)?;
            } else {
                let (x, y) = window_bytes(&windows);
                fwd.run(self, &p, &x, windows.len(), self.context);
                let nats = fwd.cross_entropy(&y, true);
                loss_sum += nats / y.len().max(1) as f64;
                grad.resize(p.len(), 0.0);
                fwd.backward(self, &p, &x, &mut grad);
                let t = state.next_step();
                state.step(&config.optimizer, &mut p, &grad, 0, t);
            }
            samples += (windows.len() * self.context) as u64;
        }
        Ok((
            p,
            TrainReport {
                mean_loss: (loss_sum / config.local_steps as f64) as f32,
                samples,
            },
        ))
    }

    /// Bits per byte of `params` on `text` (lower is better; 8 is a uniform
    /// guess): the mean cross-entropy, in bits, of predicting each byte
    /// from the ones before it, over consecutive windows of `context + 1`
    /// bytes overlapping by one (every byte after the first predicted
    /// once), at most `max_windows` of them. A text shorter than one window
    /// is one shorter window.
    pub fn bits_per_byte(
        &self,
        params: &[f32],
        text: &[u8],
        max_windows: usize,
    ) -> Result<f64, ModelError> {
        self.bits_per_byte_scored(params, text, max_windows)
            .map(|(bpb, _)| bpb)
    }

    /// [`Transformer::bits_per_byte`] and the number of bytes it predicted
    /// (to weigh several texts' figures by).
    pub fn bits_per_byte_scored(
        &self,
        params: &[f32],
        text: &[u8],
        max_windows: usize,
    ) -> Result<(f64, usize), ModelError> {
        self.check(params)?;
        if text.len() < 2 {
            return Err(ModelError::Invalid(
                "at least two bytes of text are needed to evaluate".into(),
            ));
        }
        let len = (self.context + 1).min(text.len());
        let windows: Vec<&[u8]> = (0..)
            .map(|k| k * (len - 1))
            .take_while(|at| at + len <= text.len())
            .take(max_windows.max(1))
            .map(|at| &text[at..at + len])
            .collect();
        let (mut nats, mut count) = (0f64, 0usize);
        let mut fwd = Forward::default();
        for batch in windows.chunks(16) {
            let (x, y) = window_bytes(batch);
            fwd.run(self, params, &x, batch.len(), len - 1);
            nats += fwd.cross_entropy(&y, false);
            count += y.len();
        }
        Ok((nats / count as f64 / std::f64::consts::LN_2, count))
    }

    /// `n` bytes continuing `prompt` (its last `context` bytes are
    /// what the model sees; an empty prompt starts from a newline): each
    /// byte drawn from the softmax of the logits divided by `temperature`,
    /// or the most likely byte at temperature 0.
    pub fn sample(
        &self,
        params: &[f32],
        prompt: &[u8],
        n: usize,
        temperature: f32,
        seed: u64,
    ) -> Result<Vec<u8>, ModelError> {
        self.check(params)?;
        if !(temperature >= 0.0 && temperature.is_finite()) {
            return Err(ModelError::Invalid(format!(
                "temperature {temperature} must be finite and ≥ 0"
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut fwd = Forward::default();
        let mut seq: Vec<u8> = if prompt.is_empty() {
            b"\n".to_vec()
        } else {
            prompt.to_vec()
        };
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let from = seq.len().saturating_sub(self.context);
            let ctx = &seq[from..];
            let t = ctx.len();
            fwd.run(self, params, ctx, 1, t);
            let logits = &fwd.logits[(t - 1) * VOCAB..];
            let next = if temperature == 0.0 {
                argmax(logits)
            } else {
                draw(logits, temperature, &mut rng)
            };
            out.push(next);
            seq.push(next);
        }
        Ok(out)
    }
}

/// Inputs `[B, len − 1]` (u32) and one-hot targets `[B·(len − 1), 256]`
/// of equally long windows.
fn window_tensors(windows: &[&[u8]], device: &Device) -> Result<(Tensor, Tensor), ModelError> {
    let len = windows.first().map_or(0, |w| w.len());
    let t = len.saturating_sub(1);
    let mut x = Vec::with_capacity(windows.len() * t);
    let mut onehot = vec![0f32; windows.len() * t * VOCAB];
    for (b, w) in windows.iter().enumerate() {
        for k in 0..t {
            x.push(u32::from(w[k]));
            onehot[(b * t + k) * VOCAB + usize::from(w[k + 1])] = 1.0;
        }
    }
    Ok((
        Tensor::from_vec(x, (windows.len(), t), device)?,
        Tensor::from_vec(onehot, (windows.len() * t, VOCAB), device)?,
    ))
}

/// Inputs (`B × (len − 1)` bytes, row-major) and targets (the byte after
/// each input) of equally long windows.
fn window_bytes(windows: &[&[u8]]) -> (Vec<u8>, Vec<u8>) {
    let mut x = Vec::new();
    let mut y = Vec::new();
    for w in windows {
        if let Some((_, inputs)) = w.split_last() {
            x.extend_from_slice(inputs);
            y.extend_from_slice(&w[1..]);
        }
    }
    (x, y)
}

/// A standard normal, approximately: the sum, in f32 and in order, of 12
/// uniforms on [0, 1), minus 6. Each uniform is the f32 with bits
/// 0x3f800000 | (u ≫ 9) for the next u32 u of the stream, minus 1.
fn irwin_hall(rng: &mut ChaCha8Rng) -> f32 {
    let mut sum = 0f32;
    for _ in 0..12 {
        let u = rng.next_u32();
        sum += f32::from_bits(0x3f80_0000 | (u >> 9)) - 1.0;
    }
    sum - 6.0
}

fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor, ModelError> {
    Ok(x.matmul(w)?.broadcast_add(b)?)
}

fn layer_norm(x: &Tensor, gain: &Tensor, bias: &Tensor) -> Result<Tensor, ModelError> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&var.affine(1.0, LN_EPS)?.sqrt()?)?;
    Ok(normed.broadcast_mul(gain)?.broadcast_add(bias)?)
}

/// Softmax over the last dimension (the maximum subtracted first, and not
/// differentiated: softmax does not depend on it).
fn softmax_last(x: &Tensor) -> Result<Tensor, ModelError> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

fn argmax(logits: &[f32]) -> u8 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best.min(255) as u8
}

fn draw(logits: &[f32], temperature: f32, rng: &mut ChaCha8Rng) -> u8 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits
        .iter()
        .map(|l| f64::from((l - max) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    if !(total > 0.0 && total.is_finite()) {
        return argmax(logits);
    }
    let mut u = rng.gen_range(0.0..total);
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i.min(255) as u8;
        }
        u -= w;
    }
    argmax(logits)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::linalg::max_diff;
    use crate::model::InnerOptimizer;
    use crate::text::TextCorpus;

    fn tiny() -> Transformer {
        "1,16,2,16".parse().unwrap()
    }

    #[test]
    fn the_layout_has_gpt2s_names_and_shapes_and_counts_every_parameter() {
        let m: Transformer = "2,8,2,4".parse().unwrap();
        let layout = m.layout();
        let total: usize = layout
            .iter()
            .map(|s| s.shape.iter().product::<u64>() as usize)
            .sum();
        assert_eq!(total, m.n_params());
        assert_eq!(layout.len(), 2 + 2 * PER_BLOCK + 2);
        assert_eq!(layout[0].name, "wte.weight");
        assert_eq!(layout[0].shape, vec![256, 8]);
        assert_eq!(layout[1].shape, vec![4, 8]);
        assert_eq!(layout[4].name, "h.0.attn.c_attn.weight");
        assert_eq!(layout[4].shape, vec![8, 24]);
        assert_eq!(layout[12].name, "h.0.mlp.c_proj.weight");
        assert_eq!(layout[12].shape, vec![32, 8]);
        assert_eq!(layout.last().unwrap().name, "ln_f.bias");
        for bad in ["1,10,3,8", "0,8,2,8", "1,8,2", "1,8,2,x", "1,8,2,5000"] {
            assert!(bad.parse::<Transformer>().is_err(), "{bad}");
        }
        assert_eq!(m.to_string(), "2,8,2,4");
    }

    #[test]
    fn initialisation_is_seeded_with_unit_layer_norms() {
        let m = tiny();
        let a = m.init(3);
        assert_eq!(a, m.init(3));
        assert_ne!(a, m.init(4));
        let ln_1 = 256 * 16 + 16 * 16;
        assert!(a[ln_1..ln_1 + 16].iter().all(|v| *v == 1.0));
        assert!(a[ln_1 + 16..ln_1 + 32].iter().all(|v| *v == 0.0));
        let sd = (a[..256 * 16].iter().map(|v| v * v).sum::<f32>() / 4096.0).sqrt();
        assert!((0.015..0.025).contains(&sd), "{sd}");
    }

    /// The logits through candle's tensor operations (the autograd path).
    fn candle_logits(m: &Transformer, p: &[f32], bytes: &[u8]) -> Vec<Vec<f32>> {
        let vars = m.vars(p, &Device::Cpu).unwrap();
        let t: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let x: Vec<u32> = bytes.iter().map(|b| u32::from(*b)).collect();
        let x = Tensor::from_vec(x, (1, bytes.len()), &Device::Cpu).unwrap();
        m.logits(&t, &x).unwrap().to_vec2::<f32>().unwrap()
    }

    #[test]
    fn a_byte_sees_only_the_bytes_before_it() {
        let m = tiny();
        let p = m.init(1);
        for run in [
            |m: &Transformer, p: &[f32], b: &[u8]| m.logits_of(p, b).unwrap(),
            candle_logits,
        ] {
            let a = run(&m, &p, b"hello world");
            let b = run(&m, &p, b"hello there");
            assert_eq!(a[..6], b[..6], "the first six positions saw the same bytes");
            assert_ne!(a[6], b[6]);
        }
    }

    #[test]
    fn hand_written_passes_match_candle_autograd() {
        let text: Vec<u8> =
            "Der Zug fährt um acht. El tren sale a las ocho. Поезд уходит в восемь. "
                .repeat(8)
                .into_bytes();
        for shape in ["1,16,2,16", "2,24,3,8", "3,32,4,12"] {
            let m: Transformer = shape.parse().unwrap();
            let p = m.init(5);
            // A full context, and a shorter sequence.
            for bytes in [&text[3..3 + m.context], &text[40..45]] {
                let hand: Vec<f32> = m.logits_of(&p, bytes).unwrap().concat();
                let reference: Vec<f32> = candle_logits(&m, &p, bytes).concat();
                let d = max_diff(&hand, &reference);
                assert!(d < 1e-5, "{shape}: logits differ by {d}");
            }
            for optimizer in [
                InnerOptimizer::SgdMomentum {
                    lr: 0.5,
                    momentum: 0.9,
                },
                InnerOptimizer::AdamW {
                    lr: 1e-2,
                    weight_decay: 0.01,
                    eps: crate::model::TEXT_ADAM_EPS,
                },
            ] {
                let config = TrainConfig {
                    local_steps: 4,
                    batch_size: 3,
                    optimizer,
                };
                let (mut sa, mut sb) = (InnerState::default(), InnerState::default());
                let (a, ra) = m
                    .train_local_owned(p.clone(), &text, &config, &mut sa, 11)
                    .unwrap();
                let (b, rb) = m
                    .train_local_autograd(p.clone(), &text, &config, &mut sb, 11)
                    .unwrap();
                let moved = max_diff(&a, &p);
                let d = max_diff(&a, &b);
                assert!(
                    moved > 1e-3,
                    "{shape} {optimizer:?}: training moved {moved}"
                );
                assert!(
                    d < 1e-4 * moved.max(1.0),
                    "{shape} {optimizer:?}: {d} apart after 4 steps (moved {moved})"
                );
                assert!((ra.mean_loss - rb.mean_loss).abs() < 1e-4, "{ra:?} {rb:?}");
                assert_eq!(ra.samples, rb.samples);
                let dm = max_diff(&sa.m, &sb.m);
                assert!(dm < 1e-4, "{shape} {optimizer:?}: moments {dm} apart");
            }
            // Bits per byte over several windows (batches of windows, the
            // last one shorter) against candle's logits.
            let held_out = &text[..200];
            let hand = m.bits_per_byte(&p, held_out, 100).unwrap();
            let len = m.context + 1;
            let (mut nats, mut count) = (0f64, 0usize);
            let mut at = 0;
            while at + len <= held_out.len() {
                let w = &held_out[at..at + len];
                let logits = candle_logits(&m, &p, &w[..len - 1]);
                for (row, y) in logits.iter().zip(&w[1..]) {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let lse = row
                        .iter()
                        .map(|v| f64::from(v - max).exp())
                        .sum::<f64>()
                        .ln();
                    nats += lse - f64::from(row[usize::from(*y)] - max);
                    count += 1;
                }
                at += len - 1;
            }
            let reference = nats / count as f64 / std::f64::consts::LN_2;
            assert!(
                (hand - reference).abs() < 1e-4,
                "{shape}: {hand} against {reference}"
            );
        }
    }

    #[test]
    fn training_on_repetitive_text_lowers_bits_per_byte() {
        let m = tiny();
        let text: String = (0..60)
            .map(|i| format!("abcabcabc {}\n\n", i % 3))
            .collect();
        let corpus = TextCorpus::from_text(&text);
        let p0 = m.init(1);
        let before = m.bits_per_byte(&p0, &corpus.test, 8).unwrap();
        assert!((7.0..9.0).contains(&before), "{before}");
        let config = TrainConfig {
            local_steps: 60,
            batch_size: 8,
            optimizer: InnerOptimizer::AdamW {
                lr: 1e-2,
                weight_decay: 0.0,
                eps: crate::model::ADAM_EPS,
            },
        };
        let mut state = InnerState::default();
        let (p1, report) = m
            .train_local(&p0, &corpus.train, &config, &mut state, 9)
            .unwrap();
        assert_eq!(report.samples, 60 * 8 * 16);
        let after = m.bits_per_byte(&p1, &corpus.test, 8).unwrap();
        eprintln!("bits per byte {before:.3} → {after:.3}");
        assert!(after < 3.0, "{before} → {after}");
        // The same seed, the same parameters.
        let mut state = InnerState::default();
        let (again, _) = m
            .train_local(&p0, &corpus.train, &config, &mut state, 9)
            .unwrap();
        assert_eq!(again, p1);
        // And it continues the pattern it learned.
        // ("ab" is always followed by "c", "abc" by "a" or " ").
        let out = m.sample(&p1, b"\nabcab", 6, 0.0, 1).unwrap();
        assert_eq!(out.len(), 6);
        assert_eq!(out[0], b'c', "{:?}", String::from_utf8_lossy(&out));
        assert_eq!(
            m.sample(&p1, b"ab", 8, 1.0, 5).unwrap(),
            m.sample(&p1, b"ab", 8, 1.0, 5).unwrap()
        );
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let m = tiny();
        let p = m.init(1);
        assert!(m.bits_per_byte(&p[1..], b"abc", 4).is_err());
        assert!(m.bits_per_byte(&p, b"a", 4).is_err());
        assert!(m.sample(&p, b"a", 2, f32::NAN, 1).is_err());
        let short = TextCorpus {
            train: b"tiny".to_vec(),
            test: b"x".to_vec(),
            units: (1, 1),
        };
        let config = TrainConfig {
            local_steps: 1,
            batch_size: 1,
            optimizer: InnerOptimizer::SgdMomentum {
                lr: 0.1,
                momentum: 0.0,
            },
        };
        let err = m
            .train_local(&p, &short.train, &config, &mut InnerState::default(), 1)
            .unwrap_err();
        assert!(err.to_string().contains("shorter than one window"), "{err}");
    }
}
