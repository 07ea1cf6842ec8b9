//! Models and local training: multinomial logistic regression and an MLP
//! (trained and evaluated by the hand-written passes of `dense`, on the
//! flat vector itself), their parameters as one named, ordered tensor set
//! that flattens to a single f32 vector (what deltas and codecs work on),
//! the inner optimisers (SGD with momentum, AdamW), evaluation, and
//! safetensors export/import (through candle).
//!
//! Randomness comes only from the seed passed in (initialisation and batch
//! order), so the same inputs give the same parameters bit for bit.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType as CDType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tapestry_protocol::{DType, TensorSpec};

use super::data::Dataset;
use super::dense;
use super::text::Text;
use super::transformer::{Transformer, VOCAB};

/// Why a model operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// candle refused (shapes, file format...).
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A parameter vector of the wrong length for the model.
    #[error("{found} parameters, the model has {expected}")]
    WrongLength {
        /// The model's parameter count.
        expected: usize,
        /// What was given.
        found: usize,
    },
    /// Data whose feature count or classes do not fit the model.
    #[error("data does not fit the model: {0}")]
    DataMismatch(String),
    /// A safetensors file that does not hold this model's tensors.
    #[error("safetensors file does not match the model: {0}")]
    Import(String),
    /// A setting out of range.
    #[error("invalid training setting: {0}")]
    Invalid(String),
}

/// Gives candle's kernels one thread unless `RAYON_NUM_THREADS` says
/// otherwise. candle asks for its thread count on every matrix product and,
/// without that variable, works it out again each time by reading
/// `/proc/cpuinfo` (on machines without CPU capacity files, like most x86
/// VMs, half of a simulation's time went there); the node trains small
/// models and the simulator runs nodes in parallel itself, so one thread
/// each is also the faster choice. A child process inherits the setting.
///
/// # Safety
///
/// Sets an environment variable: call it first thing in `main`, before any
/// thread exists, so that nothing reads the environment concurrently.
#[allow(unsafe_code)]
pub unsafe fn one_kernel_thread() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: the caller guarantees no other thread exists yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
}

/// A model architecture as written in a config or scenario, before the
/// data's shape is known: `logistic`, `mlp:W1,W2,...` (hidden widths) or
/// `transformer:LAYERS,WIDTH,HEADS,CONTEXT` (a byte-level language model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Architecture {
    /// Logistic regression.
    Logistic,
    /// An MLP with these hidden widths.
    Mlp(Vec<usize>),
    /// A byte-level transformer (trains on text, not rows).
    Transformer(Transformer),
}

/// Why an architecture string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchitectureError {
    /// Neither `logistic` nor `mlp:...` nor `transformer:...`.
    #[error(
        "unknown architecture {0:?} (logistic, mlp:W1,W2,..., transformer:LAYERS,WIDTH,HEADS,CONTEXT)"
    )]
    Unknown(String),
    /// `mlp:` with a width that is not a positive integer.
    #[error("bad MLP widths in {0:?}")]
    Widths(String),
    /// `transformer:` with a shape that is not one.
    #[error("{0}")]
    Transformer(String),
}

impl std::str::FromStr for Architecture {
    type Err = ArchitectureError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "logistic" {
            Ok(Architecture::Logistic)
        } else if let Some(widths) = s.strip_prefix("mlp:") {
            widths
                .split(',')
                .map(|w| w.trim().parse::<usize>().ok().filter(|w| *w > 0))
                .collect::<Option<Vec<_>>>()
                .map(Architecture::Mlp)
                .ok_or_else(|| ArchitectureError::Widths(s.to_owned()))
        } else if let Some(shape) = s.strip_prefix("transformer:") {
            shape
                .parse::<Transformer>()
                .map(Architecture::Transformer)
                .map_err(|e| ArchitectureError::Transformer(e.to_string()))
        } else {
            Err(ArchitectureError::Unknown(s.to_owned()))
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Architecture::Logistic => f.write_str("logistic"),
            Architecture::Mlp(widths) => {
                f.write_str("mlp:")?;
                for (i, w) in widths.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{w}")?;
                }
                Ok(())
            }
            Architecture::Transformer(t) => write!(f, "transformer:{t}"),
        }
    }
}

impl Architecture {
    /// Whether the model trains on text (a language model) rather than on
    /// rows of features.
    pub fn is_text(&self) -> bool {
        matches!(self, Architecture::Transformer(_))
    }

    /// The concrete model for `inputs` features and `classes` classes
    /// (both ignored by a transformer: its input and output are bytes).
    pub fn spec(&self, inputs: usize, classes: usize) -> ModelSpec {
        match self {
            Architecture::Transformer(t) => ModelSpec::Transformer(*t),
            Architecture::Logistic => ModelSpec::Logistic { inputs, classes },
            Architecture::Mlp(hidden) => ModelSpec::Mlp {
                inputs,
                hidden: hidden.clone(),
                classes,
            },
        }
    }
}

/// The architecture of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// Multinomial logistic regression: one linear layer and softmax.
    Logistic {
        /// Input features.
        inputs: usize,
        /// Classes.
        classes: usize,
    },
    /// A multi-layer perceptron with ReLU between layers.
    Mlp {
        /// Input features.
        inputs: usize,
        /// Widths of the hidden layers.
        hidden: Vec<usize>,
        /// Classes.
        classes: usize,
    },
    /// A byte-level language model.
    Transformer(Transformer),
}

impl ModelSpec {
    /// (in, out) of each linear layer (none for a transformer).
    pub(crate) fn layers(&self) -> Vec<(usize, usize)> {
        match self {
            ModelSpec::Transformer(_) => Vec::new(),
            ModelSpec::Logistic { inputs, classes } => vec![(*inputs, *classes)],
            ModelSpec::Mlp {
                inputs,
                hidden,
                classes,
            } => {
                let mut dims = vec![*inputs];
                dims.extend(hidden);
                dims.push(*classes);
                dims.windows(2).map(|w| (w[0], w[1])).collect()
            }
        }
    }

    /// Input features (a transformer: its context length in bytes).
    pub fn inputs(&self) -> usize {
        match self {
            ModelSpec::Transformer(t) => t.context,
            _ => self.layers().first().map_or(0, |l| l.0),
        }
    }

    /// Output classes (a transformer: the 256 byte values).
    pub fn classes(&self) -> usize {
        match self {
            ModelSpec::Transformer(_) => VOCAB,
            _ => self.layers().last().map_or(0, |l| l.1),
        }
    }

    /// The transformer, if this is one.
    pub fn transformer(&self) -> Option<&Transformer> {
        match self {
            ModelSpec::Transformer(t) => Some(t),
            _ => None,
        }
    }

    /// The named, ordered tensor set: `layer{i}.weight` (out × in, as in
    /// PyTorch's `nn.Linear`) then `layer{i}.bias`, layer by layer; a
    /// transformer's is GPT-2's ([`Transformer::layout`]).
    pub fn layout(&self) -> Vec<TensorSpec> {
        if let ModelSpec::Transformer(t) = self {
            return t.layout();
        }
        self.layers()
            .iter()
            .enumerate()
            .flat_map(|(i, (inp, out))| {
                [
                    TensorSpec {
                        name: format!("layer{i}.weight"),
                        shape: vec![*out as u64, *inp as u64],
                        dtype: DType::F32,
                    },
                    TensorSpec {
                        name: format!("layer{i}.bias"),
                        shape: vec![*out as u64],
                        dtype: DType::F32,
                    },
                ]
            })
            .collect()
    }

    /// Total parameters.
    pub fn n_params(&self) -> usize {
        if let ModelSpec::Transformer(t) = self {
            return t.n_params();
        }
        self.layers().iter().map(|(i, o)| i * o + o).sum()
    }

    /// Initial parameters: weights uniform in ±1/√fan_in (PyTorch's
    /// default for linear layers), biases zero; a transformer's are GPT-2's
    /// ([`Transformer::init`]).
    pub fn init(&self, seed: u64) -> Vec<f32> {
        if let ModelSpec::Transformer(t) = self {
            return t.init(seed);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(self.n_params());
        for (inp, o) in self.layers() {
            let bound = 1.0 / (inp as f32).sqrt();
            out.extend((0..inp * o).map(|_| rng.gen_range(-bound..bound)));
            out.extend(std::iter::repeat_n(0.0, o));
        }
        out
    }

    fn check(&self, params: &[f32]) -> Result<(), ModelError> {
        check_len(self.n_params(), params)
    }

    fn check_data(&self, data: &Dataset) -> Result<(), ModelError> {
        if let ModelSpec::Transformer(_) = self {
            return Err(ModelError::DataMismatch(
                "a transformer trains on text, not rows of features".into(),
            ));
        }
        if data.n_features != self.inputs() {
            return Err(ModelError::DataMismatch(format!(
                "{} features, the model takes {}",
                data.n_features,
                self.inputs()
            )));
        }
        if let Some(l) = data.labels.iter().find(|l| **l as usize >= self.classes()) {
            return Err(ModelError::DataMismatch(format!(
                "label {l} but the model has {} classes",
                self.classes()
            )));
        }
        Ok(())
    }

    /// Logits for a batch, with the parameters as tensors in layout order:
    /// candle's autograd reference for the hand-written passes of
    /// [`crate::dense`].
    #[cfg(test)]
    pub(crate) fn forward(&self, tensors: &[Tensor], x: &Tensor) -> Result<Tensor, ModelError> {
        let n_layers = tensors.len() / 2;
        let mut h = x.clone();
        for i in 0..n_layers {
            h = h
                .matmul(&tensors[2 * i].t()?)?
                .broadcast_add(&tensors[2 * i + 1])?;
            if i + 1 < n_layers {
                h = h.relu()?;
            }
        }
        Ok(h)
    }

    pub(crate) fn tensors(&self, params: &[f32], device: &Device) -> Result<Vec<Var>, ModelError> {
        layout_vars(&self.layout(), params, device)
    }
}

/// `Ok` if `params` holds exactly `expected` values.
pub(crate) fn check_len(expected: usize, params: &[f32]) -> Result<(), ModelError> {
    if params.len() != expected {
        return Err(ModelError::WrongLength {
            expected,
            found: params.len(),
        });
    }
    Ok(())
}

/// The flat parameter vector cut into one trainable tensor per layout
/// entry (`params` must hold exactly the layout's values).
pub(crate) fn layout_vars(
    layout: &[TensorSpec],
    params: &[f32],
    device: &Device,
) -> Result<Vec<Var>, ModelError> {
    let mut out = Vec::with_capacity(layout.len());
    let mut at = 0;
    for spec in layout {
        let shape: Vec<usize> = spec.shape.iter().map(|d| *d as usize).collect();
        let n: usize = shape.iter().product();
        out.push(Var::from_slice(&params[at..at + n], shape, device)?);
        at += n;
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) fn batch_tensors(
    data: &Dataset,
    rows: &[usize],
    classes: usize,
    device: &Device,
) -> Result<(Tensor, Tensor), ModelError> {
    let mut x = Vec::with_capacity(rows.len() * data.n_features);
    let mut onehot = vec![0f32; rows.len() * classes];
    for (k, r) in rows.iter().enumerate() {
        x.extend_from_slice(data.row(*r));
        onehot[k * classes + data.labels[*r] as usize] = 1.0;
    }
    Ok((
        Tensor::from_vec(x, (rows.len(), data.n_features), device)?,
        Tensor::from_vec(onehot, (rows.len(), classes), device)?,
    ))
}

/// Mean cross-entropy of logits against one-hot targets.
pub(crate) fn cross_entropy(logits: &Tensor, onehot: &Tensor) -> Result<Tensor, ModelError> {
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let n = logits.dim(0)? as f64;
    Ok((logp.mul(onehot)?.sum_all()?.neg()? / n)?)
}

/// The optimiser of local (inner) steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InnerOptimizer {
    /// SGD with (heavy-ball) momentum.
    SgdMomentum {
        /// Learning rate.
        lr: f32,
        /// Momentum (0 = plain SGD).
        momentum: f32,
    },
    /// AdamW (Loshchilov & Hutter 2019).
    AdamW {
        /// Learning rate.
        lr: f32,
        /// Decoupled weight decay.
        weight_decay: f32,
        /// ε, added to √v̂ in the denominator: a coordinate whose gradient
        /// is much smaller than ε moves by much less than `lr` a step.
        eps: f32,
    },
}

/// AdamW's usual ε (the paper's and PyTorch's default).
pub const ADAM_EPS: f32 = 1e-8;

/// AdamW's ε for a swarm training a language model: 10⁻². Likely why it
/// helps: with the usual 10⁻⁸, Adam blows every consistent gradient,
/// however small, up to a full step, so the nodes whose text never uses a
/// byte (Cyrillic, for most) each take full steps pushing its logit down,
/// and the mean of their deltas outweighs the one node that uses it. A
/// larger ε keeps such gradients small: in the simulator's seven-language swarm it took bits
/// per byte from 4.37 to 4.29 and the gap to centralized training with
/// the same settings from 1.08× to 1.05× (BENCHMARKS.md, "Languages").
pub const TEXT_ADAM_EPS: f32 = 1e-2;

impl InnerOptimizer {
    /// Whether a node keeps this optimiser's state from one round's local
    /// training to the next: AdamW does (as DiLoCo's workers do: a fresh
    /// Adam's first steps are sign-like, and averaging those cancels them
    /// out); SGD starts each round afresh (local SGD).
    pub fn keeps_state(&self) -> bool {
        matches!(self, InnerOptimizer::AdamW { .. })
    }
}

/// Local training settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainConfig {
    /// Inner steps per round (H).
    pub local_steps: usize,
    /// Rows per step.
    pub batch_size: usize,
    /// The inner optimiser.
    pub optimizer: InnerOptimizer,
}

/// Optimiser state carried across rounds (momentum / Adam moments).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InnerState {
    pub(crate) m: Vec<f32>,
    pub(crate) v: Vec<f32>,
    pub(crate) t: u64,
}

impl InnerState {
    /// Starts afresh if the state was made for another parameter count.
    /// Only AdamW keeps second moments (`v`): SGD's state is the momentum
    /// alone, one copy of the model and not two.
    pub(crate) fn fit(&mut self, n: usize, opt: &InnerOptimizer) {
        let adam = matches!(opt, InnerOptimizer::AdamW { .. });
        if self.m.len() != n || (adam && self.v.len() != n) {
            *self = InnerState {
                m: vec![0.0; n],
                v: if adam { vec![0.0; n] } else { Vec::new() },
                t: 0,
            };
        }
    }
}

/// What a round of local training did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainReport {
    /// Mean training loss over the steps.
    pub mean_loss: f32,
    /// Rows seen.
    pub samples: u64,
}

/// One round of the local-only baseline: node `node` training alone for
/// round `round` (the same steps a swarm member takes in a round, seeded
/// `(node << 32) | round`). What the simulator's and the demo's local-only
/// figures are made of.
pub fn local_round(
    spec: &ModelSpec,
    params: &[f32],
    data: &Dataset,
    config: &TrainConfig,
    state: &mut InnerState,
    (node, round): (usize, u64),
) -> Result<Vec<f32>, ModelError> {
    train_local(
        spec,
        params,
        data,
        config,
        state,
        (node as u64) << 32 | round,
    )
    .map(|(p, _)| p)
}

/// Runs `config.local_steps` steps from `params` on `data` and returns the
/// new parameters. Batches are drawn without replacement from a seeded
/// shuffle, reshuffled when exhausted.
pub fn train_local(
    spec: &ModelSpec,
    params: &[f32],
    data: &Dataset,
    config: &TrainConfig,
    state: &mut InnerState,
    seed: u64,
) -> Result<(Vec<f32>, TrainReport), ModelError> {
    train_local_owned(spec, params.to_vec(), data, config, state, seed)
}

/// [`train_local`] on parameters it may consume: trains on them in place,
/// with no copy.
pub fn train_local_owned(
    spec: &ModelSpec,
    mut p: Vec<f32>,
    data: &Dataset,
    config: &TrainConfig,
    state: &mut InnerState,
    seed: u64,
) -> Result<(Vec<f32>, TrainReport), ModelError> {
    spec.check(&p)?;
    spec.check_data(data)?;
    if data.is_empty() || config.batch_size == 0 {
        return Err(ModelError::Invalid("no data or zero batch size".into()));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.shuffle(&mut rng);
    let mut cursor = 0;
    state.fit(p.len(), &config.optimizer);
    let layers = spec.layers();
    let mut loss_sum = 0f64;
    let mut samples = 0u64;
    for _ in 0..config.local_steps {
        let take = config.batch_size.min(data.len());
        if cursor + take > order.len() {
            order.shuffle(&mut rng);
            cursor = 0;
        }
        let rows = &order[cursor..cursor + take];
        cursor += take;
        let loss = dense::step(&layers, &mut p, data, rows, &config.optimizer, state);
        loss_sum += f64::from(loss);
        samples += take as u64;
    }
    Ok((
        p,
        TrainReport {
            mean_loss: (loss_sum / config.local_steps.max(1) as f64) as f32,
            samples,
        },
    ))
}

/// One inner step from the gradients of `vars` (the parameters' tensors,
/// in layout order), one tensor's gradient copied out at a time: no flat
/// copy of the whole gradient. The same arithmetic, value by value, as a
/// step on the flattened gradient.
pub(crate) fn apply_grads(
    opt: &InnerOptimizer,
    p: &mut [f32],
    grads: &candle_core::backprop::GradStore,
    vars: &[Var],
    s: &mut InnerState,
) -> Result<(), ModelError> {
    s.t += 1;
    let t = s.t;
    let mut at = 0;
    let adam = s.v.len() == p.len();
    for v in vars {
        let n = v.elem_count();
        let end = (at + n).min(p.len());
        let m = &mut s.m[at..end];
        let v2: &mut [f32] = if adam { &mut s.v[at..end] } else { &mut [] };
        match grads.get(v) {
            Some(g) => with_f32_slice(g, |g| step_slices(opt, &mut p[at..end], g, m, v2, t))?,
            None => step_slices(opt, &mut p[at..end], &vec![0.0; n], m, v2, t),
        }
        at = end;
    }
    Ok(())
}

/// Calls `f` on the values of `t` in order: borrowed from its storage when
/// it is a contiguous f32 tensor on the CPU (a gradient usually is), else
/// copied out.
fn with_f32_slice(t: &Tensor, f: impl FnOnce(&[f32])) -> Result<(), ModelError> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(values)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
            && let Some(values) = values.get(start..end)
        {
            f(values);
            return Ok(());
        }
    }
    f(&t.flatten_all()?.to_vec1::<f32>()?);
    Ok(())
}

/// The optimiser's update of parameters `p` (with their moments `m`, `v`)
/// by gradient `g`, at step `t` (counted from 1).
pub(crate) fn step_slices(
    opt: &InnerOptimizer,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    t: u64,
) {
    match *opt {
        InnerOptimizer::SgdMomentum { lr, momentum } => {
            for ((p, g), m) in p.iter_mut().zip(g).zip(m.iter_mut()) {
                *m = momentum * *m + g;
                *p -= lr * *m;
            }
        }
        InnerOptimizer::AdamW {
            lr,
            weight_decay,
            eps,
        } => {
            let (b1, b2) = (0.9f32, 0.999f32);
            let c1 = 1.0 - b1.powi(t.min(i32::MAX as u64) as i32);
            let c2 = 1.0 - b2.powi(t.min(i32::MAX as u64) as i32);
            for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *p -= lr * (weight_decay * *p + (*m / c1) / ((*v / c2).sqrt() + eps));
            }
        }
    }
}

/// Loss and accuracy of `params` on `data`.
pub fn evaluate(
    spec: &ModelSpec,
    params: &[f32],
    data: &Dataset,
) -> Result<(f32, f32), ModelError> {
    spec.check(params)?;
    spec.check_data(data)?;
    if data.is_empty() {
        return Err(ModelError::Invalid("no data to evaluate on".into()));
    }
    Ok(dense::evaluate(&spec.layers(), params, data))
}

/// What a model trains or is evaluated on: rows of features for a
/// classifier, text for a language model.
#[derive(Debug, Clone, PartialEq)]
pub enum Examples {
    /// Labelled rows.
    Rows(Dataset),
    /// Bytes of text, in named parts (one per source, e.g. language).
    Text(Text),
}

impl Examples {
    /// Rows or bytes held.
    pub fn len(&self) -> usize {
        match self {
            Examples::Rows(d) => d.len(),
            Examples::Text(t) => t.len(),
        }
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How well parameters do on held-out examples.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Evaluation {
    /// Mean cross-entropy in nats (per row, or per predicted byte).
    pub loss: f32,
    /// Share of rows classified correctly (classifiers only).
    pub accuracy: Option<f32>,
    /// Bits per byte over every part of the text (language models only;
    /// lower is better, 8 is a uniform guess).
    pub bits_per_byte: Option<f64>,
    /// Bits per byte of each named part of the text, in its order.
    pub parts: Vec<(String, f64)>,
}

/// Windows of held-out text scored per part by [`evaluate_on`]: the first
/// `EVAL_WINDOWS` windows of each part, so the figure is comparable
/// between nodes and rounds and evaluation stays short.
pub const EVAL_WINDOWS: usize = 64;

/// [`train_local`] for either kind of examples: rows for a classifier,
/// text for a transformer (anything else is a [`ModelError::DataMismatch`]).
pub fn train_on(
    spec: &ModelSpec,
    params: &[f32],
    data: &Examples,
    config: &TrainConfig,
    state: &mut InnerState,
    seed: u64,
) -> Result<(Vec<f32>, TrainReport), ModelError> {
    train_on_owned(spec, params.to_vec(), data, config, state, seed)
}

/// [`train_on`] on parameters it may consume: trains on them in place,
/// with no copy (a large model's training holds one copy fewer).
pub fn train_on_owned(
    spec: &ModelSpec,
    params: Vec<f32>,
    data: &Examples,
    config: &TrainConfig,
    state: &mut InnerState,
    seed: u64,
) -> Result<(Vec<f32>, TrainReport), ModelError> {
    match (spec, data) {
        (ModelSpec::Transformer(t), Examples::Text(text)) => {
            t.train_local_owned(params, &text.bytes, config, state, seed)
        }
        (ModelSpec::Transformer(_), Examples::Rows(_)) => Err(ModelError::DataMismatch(
            "a transformer trains on text, not rows of features".into(),
        )),
        (_, Examples::Text(_)) => Err(ModelError::DataMismatch(
            "a classifier trains on rows of features, not text".into(),
        )),
        (_, Examples::Rows(rows)) => train_local_owned(spec, params, rows, config, state, seed),
    }
}

/// [`evaluate`] for either kind of examples: loss and accuracy for a
/// classifier; loss, bits per byte over all the text and per part for a
/// transformer (the first [`EVAL_WINDOWS`] windows of each part; the
/// overall figure weighs parts by the bytes scored).
pub fn evaluate_on(
    spec: &ModelSpec,
    params: &[f32],
    data: &Examples,
) -> Result<Evaluation, ModelError> {
    match (spec, data) {
        (ModelSpec::Transformer(t), Examples::Text(text)) => {
            let (mut bits, mut bytes) = (0f64, 0f64);
            let mut parts = Vec::with_capacity(text.parts.len());
            for (name, part) in text.iter_parts() {
                if part.len() < 2 {
                    continue;
                }
                let (bpb, scored) = t.bits_per_byte_scored(params, part, EVAL_WINDOWS)?;
                bits += bpb * scored as f64;
                bytes += scored as f64;
                parts.push((name.to_owned(), bpb));
            }
            if bytes == 0.0 {
                return Err(ModelError::Invalid("no text to evaluate on".into()));
            }
            let bpb = bits / bytes;
            Ok(Evaluation {
                loss: (bpb * std::f64::consts::LN_2) as f32,
                accuracy: None,
                bits_per_byte: Some(bpb),
                parts,
            })
        }
        (_, Examples::Rows(rows)) => evaluate(spec, params, rows).map(|(loss, a)| Evaluation {
            loss,
            accuracy: Some(a),
            ..Evaluation::default()
        }),
        (_, Examples::Text(_)) => Err(ModelError::DataMismatch(
            "a classifier is evaluated on rows of features, not text".into(),
        )),
    }
}

/// Writes the parameters as a safetensors file, one tensor per layout entry
/// (names and shapes preserved), loadable from PyTorch or numpy.
pub fn export_safetensors(spec: &ModelSpec, params: &[f32], path: &Path) -> Result<(), ModelError> {
    spec.check(params)?;
    let vars = spec.tensors(params, &Device::Cpu)?;
    let map: HashMap<String, Tensor> = spec
        .layout()
        .into_iter()
        .zip(vars)
        .map(|(s, v)| (s.name, v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&map, path)?;
    Ok(())
}

/// Reads parameters from a safetensors file, checking that it holds exactly
/// this model's tensors with the right shapes and f32 values.
pub fn import_safetensors(spec: &ModelSpec, path: &Path) -> Result<Vec<f32>, ModelError> {
    let map = candle_core::safetensors::load(path, &Device::Cpu)?;
    let layout = spec.layout();
    if map.len() != layout.len() {
        return Err(ModelError::Import(format!(
            "{} tensors, the model has {}",
            map.len(),
            layout.len()
        )));
    }
    let mut out = Vec::with_capacity(spec.n_params());
    for t in layout {
        let tensor = map
            .get(&t.name)
            .ok_or_else(|| ModelError::Import(format!("no tensor {:?}", t.name)))?;
        let shape: Vec<u64> = tensor.dims().iter().map(|d| *d as u64).collect();
        if shape != t.shape {
            return Err(ModelError::Import(format!(
                "{:?} has shape {shape:?}, expected {:?}",
                t.name, t.shape
            )));
        }
        if tensor.dtype() != CDType::F32 {
            return Err(ModelError::Import(format!(
                "{:?} is {:?}, expected f32",
                t.name,
                tensor.dtype()
            )));
        }
        out.extend(tensor.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}
