//! Aggregation rules: how a node combines the deltas it received for a round
//! (its own included) into one update. All work on flat f32 vectors of equal
//! length; weights are sample counts.
//!
//! - **Weighted mean** — exact averaging (FedAvg, McMahan et al. 2017); one
//!   bad peer can move it arbitrarily far.
//! - **Coordinate-wise trimmed mean** — per coordinate, drop the ⌊β·n⌋
//!   largest and smallest values and average the rest (Yin et al. 2018,
//!   "Byzantine-Robust Distributed Learning"). Robust to a fraction β of
//!   attackers per coordinate.
//! - **Coordinate-wise median** — the β → ½ limit of the trimmed mean.
//! - **Centred clipping** — start from a centre and add each input's
//!   difference clipped to a radius τ, so no input can move the result by
//!   more than its weight times τ; iterated, this is centred clipping
//!   (Karimireddy, He & Jaggi 2021, "Learning from history"). In mixing mode
//!   the centre is the node's own model: ClippedGossip (He, Karimireddy &
//!   Jaggi 2022). In broadcast mode it is the coordinate-wise median of the
//!   inputs, which every node computes alike (so versions can be checked by
//!   recomputation) and which no minority can drag: on label-skewed digits
//!   with a quarter of the nodes sign-flipping ×10 it keeps 0.954× the
//!   attack-free accuracy, where the self-centred single step kept ~0.68×.
//! - **Median clipping** — centred clipping around the median with τ set to
//!   a multiple of the median distance from it, so no radius needs tuning
//!   to the model's scale.
//!
//! The robust rules are unweighted per coordinate (a weight claimed by a
//! peer is itself an attack surface); the mean uses the weights.

use std::fmt;
use std::str::FromStr;

use tapestry_protocol::{Codec, CodecError};

/// Why inputs could not be aggregated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregateError {
    /// Nothing to aggregate.
    #[error("no inputs to aggregate")]
    Empty,
    /// Inputs of different lengths.
    #[error("input {index} has {found} values, expected {expected}")]
    LengthMismatch {
        /// Which input.
        index: usize,
        /// Its length.
        found: usize,
        /// The first input's length.
        expected: usize,
    },
    /// A weight that is negative, not finite, or weights summing to zero.
    #[error("invalid weights: {0}")]
    BadWeights(String),
    /// A rule parameter out of range.
    #[error("invalid aggregation parameter: {0}")]
    BadParameter(String),
    /// An encoded input's payload did not decode.
    #[error("input {index}: {source}")]
    Decode {
        /// Which input.
        index: usize,
        /// What the codec said.
        source: CodecError,
    },
    /// A stored input's bytes could not be read (a local failure, not the
    /// input's author's).
    #[error("input {index}: cannot read its payload: {reason}")]
    Read {
        /// Which input.
        index: usize,
        /// What the source said.
        reason: String,
    },
}

/// A payload read on demand, a byte range at a time: a delta kept in a
/// store, aggregated without ever being loaded whole.
pub trait PayloadSource: std::fmt::Debug {
    /// Bytes `start .. start + out.len()` of the payload into `out`.
    fn read_at(&self, start: usize, out: &mut [u8]) -> Result<(), String>;
}

/// Bytes per value of a codec whose values sit at fixed places in its
/// payload (`f32`, `bf16`): the ones a [`Values::Stored`] input may use.
pub fn fixed_width(codec: Codec) -> Option<usize> {
    match codec {
        Codec::F32 => Some(4),
        Codec::Bf16 => Some(2),
        _ => None,
    }
}

/// One input of [`AggregationRule::aggregate_values`]: a vector in memory,
/// or a payload that aggregation decodes a block of coordinates at a time
/// (so a node holds the encoded deltas, not a decoded copy of each), or a
/// payload it reads a block at a time from where it is kept.
#[derive(Debug, Clone, Copy)]
pub enum Values<'a> {
    /// A payload of a fixed-width codec ([`fixed_width`]) of `len` values,
    /// read from `source` as needed.
    Stored {
        /// Its codec (`f32` or `bf16`).
        codec: Codec,
        /// The payload.
        source: &'a dyn PayloadSource,
        /// How many values it holds.
        len: usize,
    },
    /// Decoded values.
    Decoded(&'a [f32]),
    /// A payload the door accepted, of `len` values in `codec`.
    Encoded {
        /// Its codec.
        codec: Codec,
        /// Its bytes.
        payload: &'a [u8],
        /// How many values it holds.
        len: usize,
    },
}

/// A delta's payload as an engine hands it to its shell to store and
/// serve: bytes, or, for `f32`, the values themselves (little-endian f32
/// is the encoding), shared with the engine without a copy.
#[derive(Debug, Clone)]
pub enum Payload {
    /// Encoded bytes.
    Bytes(std::sync::Arc<Vec<u8>>),
    /// The values of an `f32` payload.
    F32(std::sync::Arc<Vec<f32>>),
}

impl Payload {
    /// The payload's bytes (a view of the values on a little-endian
    /// machine, a copy elsewhere).
    pub fn bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Payload::Bytes(b) => std::borrow::Cow::Borrowed(b.as_slice()),
            #[cfg(target_endian = "little")]
            Payload::F32(v) => std::borrow::Cow::Borrowed(bytemuck::cast_slice(v.as_slice())),
            #[cfg(not(target_endian = "little"))]
            Payload::F32(v) => {
                std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
        }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Bytes(b) => b.len(),
            Payload::F32(v) => v.len() * 4,
        }
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A delta's values as a node keeps them from the door to aggregation:
/// decoded when its codec is `f32` (the payload is the values), else the
/// payload, which is smaller than the decoded values and which aggregation
/// decodes a block at a time ([`Values::Encoded`]).
#[derive(Debug, Clone)]
pub enum Held {
    /// Decoded values (shared: a node's own f32 delta is also the payload
    /// its shell stores, [`Payload::F32`]).
    Decoded(std::sync::Arc<Vec<f32>>),
    /// A payload the door accepted.
    Encoded {
        /// Its codec.
        codec: Codec,
        /// Its bytes.
        payload: std::sync::Arc<Vec<u8>>,
        /// How many values it holds.
        len: usize,
    },
    /// A payload of a fixed-width codec kept where it was stored and read
    /// from there as it is aggregated: nothing of it in memory.
    Stored {
        /// Its codec (`f32` or `bf16`).
        codec: Codec,
        /// Where it is read from.
        source: std::sync::Arc<dyn PayloadSource + Send + Sync>,
        /// How many values it holds.
        len: usize,
    },
}

impl Held {
    /// Keeps `decoded` (what the door decoded from `payload`) or the
    /// payload, whichever is the smaller.
    pub fn keep(codec: Codec, payload: std::sync::Arc<Vec<u8>>, decoded: Vec<f32>) -> Held {
        if payload.len() < decoded.len() * 4 {
            Held::Encoded {
                codec,
                len: decoded.len(),
                payload,
            }
        } else {
            Held::Decoded(std::sync::Arc::new(decoded))
        }
    }

    /// The values, for aggregation.
    pub fn values(&self) -> Values<'_> {
        match self {
            Held::Decoded(v) => Values::Decoded(v),
            Held::Stored { codec, source, len } => Values::Stored {
                codec: *codec,
                source: source.as_ref(),
                len: *len,
            },
            Held::Encoded {
                codec,
                payload,
                len,
            } => Values::Encoded {
                codec: *codec,
                payload,
                len: *len,
            },
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Held::Decoded(v) => v.len() * 4,
            Held::Encoded { payload, .. } => payload.len(),
            Held::Stored { .. } => 0,
        }
    }
}

impl Values<'_> {
    /// How many values.
    pub fn len(&self) -> usize {
        match self {
            Values::Decoded(v) => v.len(),
            Values::Encoded { len, .. } | Values::Stored { len, .. } => *len,
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values `start .. start + out.len()` into `out`.
    fn read(&self, index: usize, start: usize, out: &mut [f32]) -> Result<(), AggregateError> {
        match self {
            Values::Decoded(v) => {
                out.copy_from_slice(&v[start..start + out.len()]);
                Ok(())
            }
            Values::Encoded {
                codec,
                payload,
                len,
            } => codec
                .decode_range(payload, *len, start, out)
                .map_err(|source| AggregateError::Decode { index, source }),
            Values::Stored { codec, source, len } => {
                let width = fixed_width(*codec).ok_or(AggregateError::Decode {
                    index,
                    source: CodecError::Corrupt("a stored input must have a fixed-width codec"),
                })?;
                if start + out.len() > *len {
                    return Err(AggregateError::Decode {
                        index,
                        source: CodecError::Corrupt("range beyond the vector"),
                    });
                }
                // One scratch buffer per thread for the bytes of a block,
                // not an allocation per block and input.
                thread_local! {
                    static BYTES: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
                }
                BYTES.with_borrow_mut(|bytes| {
                    bytes.resize(out.len() * width, 0);
                    source
                        .read_at(start * width, bytes)
                        .map_err(|reason| AggregateError::Read { index, reason })?;
                    // A fixed-width range is a payload of its own.
                    codec
                        .decode_range(bytes, out.len(), 0, out)
                        .map_err(|source| AggregateError::Decode { index, source })
                })
            }
        }
    }
}

/// An aggregation rule and its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AggregationRule {
    /// Weighted mean.
    Mean,
    /// Coordinate-wise trimmed mean dropping a fraction `beta` (0 ≤ β < ½) at
    /// each end.
    TrimmedMean {
        /// Fraction trimmed at each end.
        beta: f32,
    },
    /// Coordinate-wise median.
    Median,
    /// Self-centred clipping around the node's own vector (ClippedGossip).
    CenteredClip {
        /// Clipping radius τ (L2).
        radius: f32,
        /// Clipping iterations (1 is ClippedGossip's single step).
        iterations: u32,
    },
    /// Centred clipping around the coordinate-wise median with a radius
    /// that scales itself: `factor` × the median of the inputs' distances
    /// from the centre, recomputed each iteration. Needs no tuning to the
    /// model's scale: honest inputs (the majority) lie within the median
    /// distance, and no input moves the result by more than its weight
    /// times that radius.
    MedianClip {
        /// τ = factor × median distance from the centre.
        factor: f32,
        /// Clipping iterations.
        iterations: u32,
    },
    /// [`AggregationRule::MedianClip`] after weighing each input by how
    /// well it points the way of the coordinate-wise median: its weight
    /// times max(0, cos(input, median)) — the trust score of FLTrust (Cao
    /// et al., NDSS 2021) with the median in place of a server's own
    /// update; three passes, each taking the previous result as the
    /// reference. An input pointing against the region's direction (a sign
    /// flip of an honest update, at any scale) weighs nothing; one inside
    /// the clipping radius but pointing elsewhere weighs little. Stateless
    /// and deterministic, like every rule here.
    Aligned {
        /// τ = factor × median distance from the centre.
        factor: f32,
        /// Clipping iterations.
        iterations: u32,
    },
}

impl fmt::Display for AggregationRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AggregationRule::Mean => f.write_str("mean"),
            AggregationRule::TrimmedMean { beta } => write!(f, "trimmed-mean:{beta}"),
            AggregationRule::Median => f.write_str("median"),
            AggregationRule::CenteredClip { radius, iterations } => {
                write!(f, "clip:{radius}:{iterations}")
            }
            AggregationRule::MedianClip { factor, iterations } => {
                write!(f, "median-clip:{factor}:{iterations}")
            }
            AggregationRule::Aligned { factor, iterations } => {
                write!(f, "aligned:{factor}:{iterations}")
            }
        }
    }
}

impl FromStr for AggregationRule {
    type Err = AggregateError;

    /// `mean`, `trimmed-mean:BETA`, `median`, `clip:RADIUS[:ITERATIONS]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            AggregateError::BadParameter(format!(
                "unknown rule {s:?} (mean, trimmed-mean:BETA, median, clip:RADIUS[:ITERATIONS], median-clip[:FACTOR[:ITERATIONS]], aligned[:FACTOR[:ITERATIONS]])"
            ))
        };
        let parts: Vec<&str> = s.split(':').collect();
        let rule = match parts.as_slice() {
            ["mean"] => AggregationRule::Mean,
            ["median"] => AggregationRule::Median,
            ["trimmed-mean", b] => AggregationRule::TrimmedMean {
                beta: b.parse().map_err(|_| bad())?,
            },
            ["clip", r] => AggregationRule::CenteredClip {
                radius: r.parse().map_err(|_| bad())?,
                iterations: 1,
            },
            ["clip", r, i] => AggregationRule::CenteredClip {
                radius: r.parse().map_err(|_| bad())?,
                iterations: i.parse().map_err(|_| bad())?,
            },
            ["median-clip"] => AggregationRule::MedianClip {
                factor: 1.0,
                iterations: 3,
            },
            ["median-clip", f] => AggregationRule::MedianClip {
                factor: f.parse().map_err(|_| bad())?,
                iterations: 3,
            },
            ["median-clip", f, i] => AggregationRule::MedianClip {
                factor: f.parse().map_err(|_| bad())?,
                iterations: i.parse().map_err(|_| bad())?,
            },
            ["aligned"] => AggregationRule::Aligned {
                factor: 1.0,
                iterations: 3,
            },
            ["aligned", f] => AggregationRule::Aligned {
                factor: f.parse().map_err(|_| bad())?,
                iterations: 3,
            },
            ["aligned", f, i] => AggregationRule::Aligned {
                factor: f.parse().map_err(|_| bad())?,
                iterations: i.parse().map_err(|_| bad())?,
            },
            _ => return Err(bad()),
        };
        rule.validate()?;
        Ok(rule)
    }
}

impl AggregationRule {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), AggregateError> {
        match *self {
            AggregationRule::TrimmedMean { beta } if !(0.0..0.5).contains(&beta) => Err(
                AggregateError::BadParameter(format!("trimmed-mean β = {beta} outside [0, 0.5)")),
            ),
            AggregationRule::CenteredClip { radius, iterations }
            | AggregationRule::MedianClip {
                factor: radius,
                iterations,
            }
            | AggregationRule::Aligned {
                factor: radius,
                iterations,
            } if !(radius.is_finite() && radius > 0.0) || iterations == 0 => {
                Err(AggregateError::BadParameter(format!(
                    "clipping radius {radius} must be finite and > 0, iterations {iterations} ≥ 1"
                )))
            }
            _ => Ok(()),
        }
    }

    /// Aggregates `inputs` (with `weights`, one per input). `center` is the
    /// node's own vector, used by [`AggregationRule::CenteredClip`] (if
    /// `None`, the coordinate-wise median is the centre).
    pub fn aggregate(
        &self,
        inputs: &[&[f32]],
        weights: &[f64],
        center: Option<&[f32]>,
    ) -> Result<Vec<f32>, AggregateError> {
        self.validate()?;
        check_inputs(inputs, weights)?;
        Ok(match *self {
            AggregationRule::Mean => aggregate_mean(inputs, weights),
            AggregationRule::TrimmedMean { beta } => aggregate_trimmed_mean(inputs, beta),
            AggregationRule::Median => aggregate_median(inputs),
            AggregationRule::CenteredClip { radius, iterations } => {
                let start = match center {
                    Some(c) if c.len() == inputs[0].len() => c.to_vec(),
                    Some(c) => {
                        return Err(AggregateError::LengthMismatch {
                            index: usize::MAX,
                            found: c.len(),
                            expected: inputs[0].len(),
                        });
                    }
                    None => aggregate_median(inputs),
                };
                aggregate_centered_clip(inputs, weights, start, radius, iterations)
            }
            AggregationRule::MedianClip { factor, iterations } => median_clip(
                inputs,
                weights,
                aggregate_median(inputs),
                factor,
                iterations,
            ),
            AggregationRule::Aligned { factor, iterations } => {
                aggregate_aligned(inputs, weights, factor, iterations)
            }
        })
    }
}

fn check_inputs(inputs: &[&[f32]], weights: &[f64]) -> Result<(), AggregateError> {
    let lens: Vec<usize> = inputs.iter().map(|v| v.len()).collect();
    check_lens(&lens, weights)
}

fn check_lens(lens: &[usize], weights: &[f64]) -> Result<(), AggregateError> {
    let first = lens.first().ok_or(AggregateError::Empty)?;
    for (index, len) in lens.iter().enumerate() {
        if len != first {
            return Err(AggregateError::LengthMismatch {
                index,
                found: *len,
                expected: *first,
            });
        }
    }
    if weights.len() != lens.len() {
        return Err(AggregateError::BadWeights(format!(
            "{} weights for {} inputs",
            weights.len(),
            lens.len()
        )));
    }
    if weights.iter().any(|w| !w.is_finite() || *w < 0.0) || weights.iter().sum::<f64>() <= 0.0 {
        return Err(AggregateError::BadWeights(format!("{weights:?}")));
    }
    Ok(())
}

/// Weighted mean. Inputs must be non-empty, of equal length, with
/// non-negative weights of positive sum (checked by [`AggregationRule::aggregate`]).
pub fn aggregate_mean(inputs: &[&[f32]], weights: &[f64]) -> Vec<f32> {
    let total: f64 = weights.iter().sum();
    let mut out = vec![0f32; inputs[0].len()];
    for (v, w) in inputs.iter().zip(weights) {
        let w = (*w / total) as f32;
        for (o, x) in out.iter_mut().zip(v.iter()) {
            *o += w * x;
        }
    }
    out
}

/// Coordinates are processed in blocks so the n values of one coordinate are
/// gathered from cache, not from n distant places in memory.
const BLOCK: usize = 4096;

fn per_coordinate(inputs: &[&[f32]], mut reduce: impl FnMut(&mut [f32]) -> f32) -> Vec<f32> {
    let n = inputs.len();
    let len = inputs[0].len();
    let mut out = vec![0f32; len];
    let mut column = vec![0f32; n];
    let mut start = 0;
    while start < len {
        let end = (start + BLOCK).min(len);
        for i in start..end {
            for (c, v) in column.iter_mut().zip(inputs) {
                *c = v[i];
            }
            out[i] = reduce(&mut column);
        }
        start = end;
    }
    out
}

/// Coordinate-wise trimmed mean: drops ⌊β·n⌋ values at each end.
pub fn aggregate_trimmed_mean(inputs: &[&[f32]], beta: f32) -> Vec<f32> {
    per_coordinate(inputs, trimmed_mean_of(inputs.len(), beta))
}

/// The trimmed mean of one coordinate's n values.
fn trimmed_mean_of(n: usize, beta: f32) -> impl FnMut(&mut [f32]) -> f32 {
    let k = ((f64::from(beta) * n as f64).floor() as usize).min((n - 1) / 2);
    let kept = (n - 2 * k) as f32;
    move |col| {
        col.sort_unstable_by(f32::total_cmp);
        col[k..n - k].iter().sum::<f32>() / kept
    }
}

/// [`AggregationRule::Aligned`]: weights times max(0, cos) with a
/// reference — the coordinate-wise median first, then each pass's result
/// (which the Byzantine inputs pull less than they pull the median) —
/// each pass median-clipped from the reference.
fn aggregate_aligned(inputs: &[&[f32]], weights: &[f64], factor: f32, iterations: u32) -> Vec<f32> {
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let mut reference = aggregate_median(inputs);
    for _ in 0..ALIGNED_PASSES {
        let r_norm = norm(&reference);
        let trusted: Vec<f64> = inputs
            .iter()
            .zip(weights)
            .map(|(v, w)| {
                let dot: f64 = v
                    .iter()
                    .zip(&reference)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum();
                let cos = dot / (norm(v) * r_norm);
                if cos.is_finite() {
                    w * cos.max(0.0)
                } else {
                    0.0
                }
            })
            .collect();
        if trusted.iter().sum::<f64>() <= 0.0 {
            return reference;
        }
        reference = median_clip(inputs, &trusted, reference, factor, iterations);
    }
    reference
}

/// Passes of [`aggregate_aligned`] (measured in the simulator, 16 and 64
/// nodes on label-skewed digits: 2 and 5 passes did worse against
/// sign-flip ×10 or the takeover mix than 3).
const ALIGNED_PASSES: usize = 3;

/// Centred clipping from `center`, the radius `factor` × the median of the
/// inputs' distances from the centre, recomputed each iteration.
fn median_clip(
    inputs: &[&[f32]],
    weights: &[f64],
    mut center: Vec<f32>,
    factor: f32,
    iterations: u32,
) -> Vec<f32> {
    for _ in 0..iterations {
        let mut d: Vec<f64> = inputs.iter().map(|v| l2_distance(v, &center)).collect();
        d.sort_unstable_by(f64::total_cmp);
        let radius = (f64::from(factor) * d[d.len() / 2]) as f32;
        if !(radius > 0.0 && radius.is_finite()) {
            break;
        }
        center = aggregate_centered_clip(inputs, weights, center, radius, 1);
    }
    center
}

/// Coordinate-wise median (the mean of the two middle values for even n).
pub fn aggregate_median(inputs: &[&[f32]]) -> Vec<f32> {
    per_coordinate(inputs, median_of(inputs.len()))
}

/// The median of one coordinate's n values.
fn median_of(n: usize) -> impl FnMut(&mut [f32]) -> f32 {
    move |col| {
        let (_, hi, _) = col.select_nth_unstable_by(n / 2, f32::total_cmp);
        let hi = *hi;
        if n % 2 == 1 {
            hi
        } else {
            let lo = col[..n / 2]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            (lo + hi) / 2.0
        }
    }
}

fn l2_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Self-centred clipping: `iterations` times, move the centre by the
/// weighted mean of every input's difference from it, each difference
/// clipped to L2 norm `radius`.
pub fn aggregate_centered_clip(
    inputs: &[&[f32]],
    weights: &[f64],
    mut center: Vec<f32>,
    radius: f32,
    iterations: u32,
) -> Vec<f32> {
    let total: f64 = weights.iter().sum();
    let mut step = vec![0f32; center.len()];
    for _ in 0..iterations {
        step.iter_mut().for_each(|s| *s = 0.0);
        for (v, w) in inputs.iter().zip(weights) {
            let dist = l2_distance(v, &center);
            let scale = if dist > f64::from(radius) {
                f64::from(radius) / dist
            } else {
                1.0
            };
            let f = (w / total * scale) as f32;
            for ((s, x), c) in step.iter_mut().zip(v.iter()).zip(&center) {
                *s += f * (x - c);
            }
        }
        for (c, s) in center.iter_mut().zip(&step) {
            *c += s;
        }
    }
    center
}

impl AggregationRule {
    /// [`AggregationRule::aggregate`] over inputs that may be encoded
    /// payloads, a block of coordinates at a time: each payload is decoded
    /// one block at a time as the rule reads it (twice or more per input
    /// for the rules that need distances), so memory is the encoded
    /// inputs, the result and a few vectors of the model's size, however
    /// many inputs there are. Bit for bit the same result as `aggregate`
    /// on the decoded inputs: every coordinate sees the same operations in
    /// the same order, and every sum over coordinates is the same
    /// sequential sum.
    pub fn aggregate_values(
        &self,
        inputs: &[Values<'_>],
        weights: &[f64],
        center: Option<&[f32]>,
    ) -> Result<Vec<f32>, AggregateError> {
        self.validate()?;
        let lens: Vec<usize> = inputs.iter().map(Values::len).collect();
        check_lens(&lens, weights)?;
        match *self {
            AggregationRule::Mean => blocks_mean(inputs, weights),
            AggregationRule::TrimmedMean { beta } => {
                blocks_per_coordinate(inputs, trimmed_mean_of(inputs.len(), beta))
            }
            AggregationRule::Median => blocks_per_coordinate(inputs, median_of(inputs.len())),
            AggregationRule::CenteredClip { radius, iterations } => {
                let start = match center {
                    Some(c) if c.len() == lens[0] => c.to_vec(),
                    Some(c) => {
                        return Err(AggregateError::LengthMismatch {
                            index: usize::MAX,
                            found: c.len(),
                            expected: lens[0],
                        });
                    }
                    None => blocks_per_coordinate(inputs, median_of(inputs.len()))?,
                };
                blocks_centered_clip(inputs, weights, start, radius, iterations)
            }
            AggregationRule::MedianClip { factor, iterations } => {
                let start = blocks_per_coordinate(inputs, median_of(inputs.len()))?;
                blocks_median_clip(inputs, weights, start, factor, iterations)
            }
            AggregationRule::Aligned { factor, iterations } => {
                blocks_aligned(inputs, weights, factor, iterations)
            }
        }
    }
}

impl AggregationRule {
    /// [`AggregationRule::aggregate_values`], handed to `emit` a block of
    /// coordinates at a time, in order (`emit(start, values)`), the same
    /// values bit for bit. The rules that work coordinate by coordinate
    /// (mean, trimmed mean, median) never hold the whole result: a caller
    /// that consumes each block as it comes (an outer step onto the
    /// parameters) holds one block of it. The clipping rules need their
    /// whole centre, so they compute it and then hand it out.
    pub fn aggregate_blocks(
        &self,
        inputs: &[Values<'_>],
        weights: &[f64],
        center: Option<&[f32]>,
        mut emit: impl FnMut(usize, &[f32]),
    ) -> Result<(), AggregateError> {
        self.validate()?;
        let lens: Vec<usize> = inputs.iter().map(Values::len).collect();
        check_lens(&lens, weights)?;
        match *self {
            AggregationRule::Mean => stream_mean(inputs, weights, emit),
            AggregationRule::TrimmedMean { beta } => {
                stream_per_coordinate(inputs, trimmed_mean_of(inputs.len(), beta), emit)
            }
            AggregationRule::Median => stream_per_coordinate(inputs, median_of(inputs.len()), emit),
            _ => {
                let whole = self.aggregate_values(inputs, weights, center)?;
                for (k, block) in whole.chunks(BLOCK).enumerate() {
                    emit(k * BLOCK, block);
                }
                Ok(())
            }
        }
    }
}

/// The start of a sequential `f64` sum, as `Iterator::sum` starts it.
fn sum_start() -> f64 {
    std::iter::empty::<f64>().sum()
}

/// Calls `f(start, block)` for every block of `v`, in order: decoded
/// values are lent as they are, a payload is decoded into `buf`.
fn for_blocks(
    v: &Values<'_>,
    index: usize,
    buf: &mut [f32],
    mut f: impl FnMut(usize, &[f32]),
) -> Result<(), AggregateError> {
    let len = v.len();
    let mut start = 0;
    while start < len {
        let end = (start + BLOCK).min(len);
        match v {
            Values::Decoded(values) => f(start, &values[start..end]),
            Values::Encoded { .. } | Values::Stored { .. } => {
                let block = &mut buf[..end - start];
                v.read(index, start, block)?;
                f(start, block);
            }
        }
        start = end;
    }
    Ok(())
}

fn blocks_mean(inputs: &[Values<'_>], weights: &[f64]) -> Result<Vec<f32>, AggregateError> {
    let mut out = Vec::with_capacity(inputs[0].len());
    stream_mean(inputs, weights, |_, block| out.extend_from_slice(block))?;
    Ok(out)
}

/// The weighted mean, handed to `emit` a block of coordinates at a time
/// (in order): each coordinate sums the inputs in their order, as a pass
/// over whole inputs would.
fn stream_mean(
    inputs: &[Values<'_>],
    weights: &[f64],
    mut emit: impl FnMut(usize, &[f32]),
) -> Result<(), AggregateError> {
    let total: f64 = weights.iter().sum();
    let scaled: Vec<f32> = weights.iter().map(|w| (*w / total) as f32).collect();
    let len = inputs[0].len();
    let mut out = vec![0f32; BLOCK.min(len)];
    let mut buf = vec![0f32; BLOCK.min(len)];
    let mut start = 0;
    while start < len {
        let end = (start + BLOCK).min(len);
        let out = &mut out[..end - start];
        out.fill(0.0);
        for (index, (v, w)) in inputs.iter().zip(&scaled).enumerate() {
            let block: &[f32] = match v {
                Values::Decoded(values) => &values[start..end],
                Values::Encoded { .. } | Values::Stored { .. } => {
                    let b = &mut buf[..end - start];
                    v.read(index, start, b)?;
                    b
                }
            };
            for (o, x) in out.iter_mut().zip(block) {
                *o += w * x;
            }
        }
        emit(start, out);
        start = end;
    }
    Ok(())
}

fn blocks_per_coordinate(
    inputs: &[Values<'_>],
    reduce: impl FnMut(&mut [f32]) -> f32,
) -> Result<Vec<f32>, AggregateError> {
    let mut out = Vec::with_capacity(inputs[0].len());
    stream_per_coordinate(inputs, reduce, |_, block| out.extend_from_slice(block))?;
    Ok(out)
}

/// A per-coordinate rule, handed to `emit` a block of coordinates at a
/// time (in order).
fn stream_per_coordinate(
    inputs: &[Values<'_>],
    mut reduce: impl FnMut(&mut [f32]) -> f32,
    mut emit: impl FnMut(usize, &[f32]),
) -> Result<(), AggregateError> {
    let n = inputs.len();
    let len = inputs[0].len();
    let mut out = vec![0f32; BLOCK.min(len)];
    let mut rows = vec![0f32; n * BLOCK];
    let mut column = vec![0f32; n];
    let mut start = 0;
    while start < len {
        let end = (start + BLOCK).min(len);
        let width = end - start;
        for (index, (v, row)) in inputs.iter().zip(rows.chunks_exact_mut(BLOCK)).enumerate() {
            v.read(index, start, &mut row[..width])?;
        }
        for (i, o) in out[..width].iter_mut().enumerate() {
            for (c, row) in column.iter_mut().zip(rows.chunks_exact(BLOCK)) {
                *c = row[i];
            }
            *o = reduce(&mut column);
        }
        emit(start, &out[..width]);
        start = end;
    }
    Ok(())
}

/// [`l2_distance`] of an input from `center`, a block at a time.
fn blocks_distance(
    v: &Values<'_>,
    index: usize,
    center: &[f32],
    buf: &mut [f32],
) -> Result<f64, AggregateError> {
    let mut acc = sum_start();
    for_blocks(v, index, buf, |start, block| {
        acc = block
            .iter()
            .zip(&center[start..])
            .map(|(x, y)| f64::from(x - y).powi(2))
            .fold(acc, |a, b| a + b);
    })?;
    Ok(acc.sqrt())
}

fn blocks_centered_clip(
    inputs: &[Values<'_>],
    weights: &[f64],
    mut center: Vec<f32>,
    radius: f32,
    iterations: u32,
) -> Result<Vec<f32>, AggregateError> {
    let total: f64 = weights.iter().sum();
    let mut step = vec![0f32; center.len()];
    let mut buf = vec![0f32; BLOCK];
    for _ in 0..iterations {
        step.iter_mut().for_each(|s| *s = 0.0);
        for (index, (v, w)) in inputs.iter().zip(weights).enumerate() {
            let dist = blocks_distance(v, index, &center, &mut buf)?;
            let scale = if dist > f64::from(radius) {
                f64::from(radius) / dist
            } else {
                1.0
            };
            let f = (w / total * scale) as f32;
            for_blocks(v, index, &mut buf, |start, block| {
                let end = start + block.len();
                for ((s, x), c) in step[start..end]
                    .iter_mut()
                    .zip(block)
                    .zip(&center[start..end])
                {
                    *s += f * (x - c);
                }
            })?;
        }
        for (c, s) in center.iter_mut().zip(&step) {
            *c += s;
        }
    }
    Ok(center)
}

fn blocks_median_clip(
    inputs: &[Values<'_>],
    weights: &[f64],
    mut center: Vec<f32>,
    factor: f32,
    iterations: u32,
) -> Result<Vec<f32>, AggregateError> {
    let mut buf = vec![0f32; BLOCK];
    for _ in 0..iterations {
        let mut d = Vec::with_capacity(inputs.len());
        for (index, v) in inputs.iter().enumerate() {
            d.push(blocks_distance(v, index, &center, &mut buf)?);
        }
        d.sort_unstable_by(f64::total_cmp);
        let radius = (f64::from(factor) * d[d.len() / 2]) as f32;
        if !(radius > 0.0 && radius.is_finite()) {
            break;
        }
        center = blocks_centered_clip(inputs, weights, center, radius, 1)?;
    }
    Ok(center)
}

fn blocks_aligned(
    inputs: &[Values<'_>],
    weights: &[f64],
    factor: f32,
    iterations: u32,
) -> Result<Vec<f32>, AggregateError> {
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let mut reference = blocks_per_coordinate(inputs, median_of(inputs.len()))?;
    let mut buf = vec![0f32; BLOCK];
    for _ in 0..ALIGNED_PASSES {
        let r_norm = norm(&reference);
        let mut trusted = Vec::with_capacity(inputs.len());
        for (index, (v, w)) in inputs.iter().zip(weights).enumerate() {
            let (mut dot, mut sq) = (sum_start(), sum_start());
            for_blocks(v, index, &mut buf, |start, block| {
                dot = block
                    .iter()
                    .zip(&reference[start..])
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .fold(dot, |a, b| a + b);
                sq = block
                    .iter()
                    .map(|x| f64::from(*x).powi(2))
                    .fold(sq, |a, b| a + b);
            })?;
            let cos = dot / (sq.sqrt() * r_norm);
            trusted.push(if cos.is_finite() {
                w * cos.max(0.0)
            } else {
                0.0
            });
        }
        if trusted.iter().sum::<f64>() <= 0.0 {
            return Ok(reference);
        }
        reference = blocks_median_clip(inputs, &trusted, reference, factor, iterations)?;
    }
    Ok(reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agg(rule: AggregationRule, inputs: &[Vec<f32>]) -> Vec<f32> {
        let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
        rule.aggregate(&refs, &vec![1.0; inputs.len()], None)
            .unwrap()
    }

    #[test]
    fn mean_is_weighted() {
        let a = [1.0f32, 2.0];
        let b = [3.0f32, 6.0];
        let out = AggregationRule::Mean
            .aggregate(&[&a, &b], &[1.0, 3.0], None)
            .unwrap();
        assert_eq!(out, vec![2.5, 5.0]);
    }

    #[test]
    fn aligned_gives_inputs_pointing_against_the_median_no_weight() {
        // Five honest inputs around (1, 1, 0); two flipped ones, one of
        // them small enough to pass any clipping radius.
        let mut all: Vec<Vec<f32>> = (0..5)
            .map(|i| vec![1.0 + i as f32 * 0.02, 1.0 - i as f32 * 0.02, 0.1])
            .collect();
        all.push(vec![-1.0, -1.0, -0.1]);
        all.push(vec![-10.0, -10.0, -1.0]);
        let rule: AggregationRule = "aligned:1:10".parse().unwrap();
        let out = agg(rule, &all);
        let honest_mean = agg(AggregationRule::Mean, &all[..5]);
        for (o, h) in out.iter().zip(&honest_mean) {
            assert!((o - h).abs() < 0.02, "{out:?} vs {honest_mean:?}");
        }
        // Median-clip alone still gives the flipped inputs their clipped
        // pull; aligned ends nearer the honest mean.
        let clipped = agg("median-clip:1:10".parse().unwrap(), &all);
        assert!(
            l2_distance(&out, &honest_mean) < l2_distance(&clipped, &honest_mean),
            "{out:?} {clipped:?} {honest_mean:?}"
        );
        assert_eq!(rule.to_string(), "aligned:1:10");
    }

    #[test]
    fn trimmed_mean_and_median_ignore_outliers() {
        let honest: Vec<Vec<f32>> = (0..8).map(|i| vec![1.0 + i as f32 * 0.01, -1.0]).collect();
        let mut all = honest.clone();
        all.push(vec![1e6, 1e6]);
        all.push(vec![1e6, -1e6]);
        let tm = agg(AggregationRule::TrimmedMean { beta: 0.2 }, &all);
        // Trims 2 at each end: the honest 1.02..=1.07 remain.
        assert!(
            (tm[0] - 1.045).abs() < 1e-4 && (tm[1] + 1.0).abs() < 1e-6,
            "{tm:?}"
        );
        let med = agg(AggregationRule::Median, &all);
        assert!(
            (med[0] - 1.045).abs() < 1e-4 && (med[1] + 1.0).abs() < 1e-6,
            "{med:?}"
        );
        // The control: the same two attackers drag the plain mean away.
        let mean = agg(AggregationRule::Mean, &all);
        assert!(mean[0] > 1e5, "{mean:?}");
        // Odd and even medians.
        assert_eq!(
            agg(AggregationRule::Median, &[vec![3.0], vec![1.0], vec![2.0]]),
            vec![2.0]
        );
        assert_eq!(
            agg(
                AggregationRule::Median,
                &[vec![4.0], vec![1.0], vec![2.0], vec![3.0]]
            ),
            vec![2.5]
        );
    }

    #[test]
    fn clipping_bounds_any_single_peers_pull() {
        let own = vec![0f32; 100];
        let honest = vec![0.01f32; 100];
        let evil = vec![1e9f32; 100];
        let inputs: [&[f32]; 3] = [&own, &honest, &evil];
        let rule = AggregationRule::CenteredClip {
            radius: 1.0,
            iterations: 1,
        };
        let out = rule
            .aggregate(&inputs, &[1.0, 1.0, 1.0], Some(&own))
            .unwrap();
        // The attacker moves the result by at most weight × radius = 1/3.
        assert!(
            l2_distance(&out, &own) <= 1.0 / 3.0 + 0.1 + 1e-5,
            "{}",
            l2_distance(&out, &own)
        );
        // With no attacker and a large radius it is the mean.
        let out = AggregationRule::CenteredClip {
            radius: 1e6,
            iterations: 1,
        }
        .aggregate(&[&own, &honest], &[1.0, 1.0], Some(&own))
        .unwrap();
        assert!(out.iter().all(|x| (x - 0.005).abs() < 1e-7));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let a = [1.0f32, 2.0];
        let b = [1.0f32];
        assert_eq!(
            AggregationRule::Mean.aggregate(&[], &[], None),
            Err(AggregateError::Empty)
        );
        assert!(matches!(
            AggregationRule::Mean.aggregate(&[&a, &b], &[1.0, 1.0], None),
            Err(AggregateError::LengthMismatch { index: 1, .. })
        ));
        assert!(matches!(
            AggregationRule::Mean.aggregate(&[&a], &[-1.0], None),
            Err(AggregateError::BadWeights(_))
        ));
        assert!(matches!(
            AggregationRule::Mean.aggregate(&[&a], &[0.0], None),
            Err(AggregateError::BadWeights(_))
        ));
        assert!("trimmed-mean:0.5".parse::<AggregationRule>().is_err());
        assert!("clip:0".parse::<AggregationRule>().is_err());
        assert_eq!(
            "trimmed-mean:0.2"
                .parse::<AggregationRule>()
                .unwrap()
                .to_string(),
            "trimmed-mean:0.2"
        );
        assert_eq!(
            "clip:2.5".parse::<AggregationRule>().unwrap(),
            AggregationRule::CenteredClip {
                radius: 2.5,
                iterations: 1
            }
        );
    }
}
