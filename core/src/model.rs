//! Models and local training with candle: multinomial logistic regression
//! and an MLP, their parameters as one named, ordered tensor set that
//! flattens to a single f32 vector (what deltas and codecs work on), the
//! inner optimisers (SGD with momentum, AdamW), evaluation, and safetensors
//! export/import.
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
/// data's shape is known: `logistic` or `mlp:W1,W2,...` (hidden widths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Architecture {
    /// Logistic regression.
    Logistic,
    /// An MLP with these hidden widths.
    Mlp(Vec<usize>),
}

/// Why an architecture string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchitectureError {
    /// Neither `logistic` nor `mlp:...`.
    #[error("unknown architecture {0:?} (logistic, mlp:W1,W2,...)")]
    Unknown(String),
    /// `mlp:` with a width that is not a positive integer.
    #[error("bad MLP widths in {0:?}")]
    Widths(String),
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
        }
    }
}

impl Architecture {
    /// The concrete model for `inputs` features and `classes` classes.
    pub fn spec(&self, inputs: usize, classes: usize) -> ModelSpec {
        match self {
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
}

impl ModelSpec {
    /// (in, out) of each linear layer.
    fn layers(&self) -> Vec<(usize, usize)> {
        match self {
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

    /// Input features.
    pub fn inputs(&self) -> usize {
        self.layers()[0].0
    }

    /// Output classes.
    pub fn classes(&self) -> usize {
        self.layers().last().map_or(0, |l| l.1)
    }

    /// The named, ordered tensor set: `layer{i}.weight` (out × in, as in
    /// PyTorch's `nn.Linear`) then `layer{i}.bias`, layer by layer.
    pub fn layout(&self) -> Vec<TensorSpec> {
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
        self.layers().iter().map(|(i, o)| i * o + o).sum()
    }

    /// Initial parameters: weights uniform in ±1/√fan_in (PyTorch's
    /// default for linear layers), biases zero.
    pub fn init(&self, seed: u64) -> Vec<f32> {
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

    /// Logits for a batch, with the parameters as tensors in layout order.
    fn forward(&self, tensors: &[Tensor], x: &Tensor) -> Result<Tensor, ModelError> {
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

    fn tensors(&self, params: &[f32], device: &Device) -> Result<Vec<Var>, ModelError> {
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

/// The gradients of `vars`, flattened in their order (zero for a tensor
/// the loss does not depend on).
pub(crate) fn flat_grads(
    grads: &candle_core::backprop::GradStore,
    vars: &[Var],
) -> Result<Vec<f32>, ModelError> {
    let mut g = Vec::with_capacity(vars.iter().map(|v| v.elem_count()).sum());
    for v in vars {
        match grads.get(v) {
            Some(t) => g.extend(t.flatten_all()?.to_vec1::<f32>()?),
            None => g.extend(std::iter::repeat_n(0.0, v.elem_count())),
        }
    }
    Ok(g)
}

fn batch_tensors(
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
    },
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
    m: Vec<f32>,
    v: Vec<f32>,
    t: u64,
}

impl InnerState {
    /// Starts afresh if the state was made for another parameter count.
    pub(crate) fn fit(&mut self, n: usize) {
        if self.m.len() != n {
            *self = InnerState {
                m: vec![0.0; n],
                v: vec![0.0; n],
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
    spec.check(params)?;
    spec.check_data(data)?;
    if data.is_empty() || config.batch_size == 0 {
        return Err(ModelError::Invalid("no data or zero batch size".into()));
    }
    let device = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.shuffle(&mut rng);
    let mut cursor = 0;
    let mut p = params.to_vec();
    let n = p.len();
    state.fit(n);
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
        let (x, y) = batch_tensors(data, rows, spec.classes(), &device)?;
        let vars = spec.tensors(&p, &device)?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let loss = cross_entropy(&spec.forward(&tensors, &x)?, &y)?;
        loss_sum += f64::from(loss.to_scalar::<f32>()?);
        samples += take as u64;
        let g = flat_grads(&loss.backward()?, &vars)?;
        apply_inner(&config.optimizer, &mut p, &g, state);
    }
    Ok((
        p,
        TrainReport {
            mean_loss: (loss_sum / config.local_steps.max(1) as f64) as f32,
            samples,
        },
    ))
}

pub(crate) fn apply_inner(opt: &InnerOptimizer, p: &mut [f32], g: &[f32], s: &mut InnerState) {
    s.t += 1;
    match *opt {
        InnerOptimizer::SgdMomentum { lr, momentum } => {
            for ((p, g), m) in p.iter_mut().zip(g).zip(s.m.iter_mut()) {
                *m = momentum * *m + g;
                *p -= lr * *m;
            }
        }
        InnerOptimizer::AdamW { lr, weight_decay } => {
            let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
            let c1 = 1.0 - b1.powi(s.t.min(i32::MAX as u64) as i32);
            let c2 = 1.0 - b2.powi(s.t.min(i32::MAX as u64) as i32);
            for (((p, g), m), v) in p.iter_mut().zip(g).zip(s.m.iter_mut()).zip(s.v.iter_mut()) {
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
    let device = Device::Cpu;
    let rows: Vec<usize> = (0..data.len()).collect();
    let (x, y) = batch_tensors(data, &rows, spec.classes(), &device)?;
    let vars = spec.tensors(params, &device)?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let logits = spec.forward(&tensors, &x)?;
    let loss = cross_entropy(&logits, &y)?.to_scalar::<f32>()?;
    let predicted = logits
        .argmax(D::Minus1)?
        .to_dtype(CDType::U32)?
        .to_vec1::<u32>()?;
    let correct = predicted
        .iter()
        .zip(&data.labels)
        .filter(|(p, l)| p == l)
        .count();
    Ok((loss, correct as f32 / data.len() as f32))
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
