//! Delta codecs: how a flat f32 delta vector becomes bytes and back.
//!
//! | codec | bytes for n values | error |
//! |---|---|---|
//! | `f32` | 4n | none |
//! | `bf16` | 2n | relative ≤ 2⁻⁸ for normal values (round to nearest even) |
//! | `int8:B` | 4⌈n/B⌉ + n | ≤ scale/2 per value, scale = max\|x\|/127 of its block |
//! | `topk:F` | 4 + 8k, k = max(1, round(F·n)) | keeps the k largest \|x\|, drops the rest |
//! | `topk-bf16:F` | 4 + 6k | as `topk`, the kept values as `bf16` |
//! | `topk-int8:F` | 4 + 5k + 4⌈k/256⌉ | as `topk`, the kept values as `int8:256` |
//!
//! All multi-byte numbers are little-endian. `int8` stores all block scales
//! (f32) first, then all quantised values (i8 in −127..=127). `topk` stores
//! k (u32), then k strictly increasing indices (u32), then k values (f32); ties
//! in |x| are broken towards the lower index, so the choice is unique.
//! `topk-bf16` and `topk-int8` store k and the indices the same way, then the
//! k kept values (in index order) as the `bf16` or `int8:256` payload of
//! those k values: the codecs compose.
//!
//! Lossy codecs lose less over time with [`ErrorFeedback`]: what a round's
//! encoding dropped is added to the next round's delta (Seide et al. 2014;
//! Karimireddy et al. 2019, "Error Feedback Fixes SignSGD").
//!
//! Non-finite input is an encoding error, and decoding refuses non-finite
//! values, out-of-range indices or quantised values, and wrong lengths, so a
//! peer's payload can never smuggle a NaN into aggregation.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A delta codec and its parameter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Codec {
    /// Raw little-endian f32.
    F32,
    /// bfloat16, round to nearest even.
    Bf16,
    /// Blockwise int8 with one f32 scale per block.
    Int8 {
        /// Values per block, 64..=4096.
        block: u32,
    },
    /// Top-k sparsification by magnitude.
    TopK {
        /// Fraction of values kept, in (0, 1].
        fraction: f32,
    },
    /// Top-k sparsification, the kept values as bfloat16.
    #[serde(rename = "top-k-bf16")]
    TopKBf16 {
        /// Fraction of values kept, in (0, 1].
        fraction: f32,
    },
    /// Top-k sparsification, the kept values as blockwise int8 (blocks of
    /// [`TOPK_INT8_BLOCK`] kept values).
    #[serde(rename = "top-k-int8")]
    TopKInt8 {
        /// Fraction of values kept, in (0, 1].
        fraction: f32,
    },
}

/// Kept values per int8 block in `topk-int8`.
pub const TOPK_INT8_BLOCK: u32 = 256;

/// Why a vector could not be encoded or a payload decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    /// The input (or a decoded value) is NaN or infinite.
    #[error("value {index} is not finite")]
    NonFinite {
        /// Position of the first offending value.
        index: usize,
    },
    /// A codec parameter is out of range.
    #[error("bad codec parameter: {0}")]
    BadParameter(String),
    /// The payload does not have the length the codec and element count imply.
    #[error("payload is {found} bytes, expected {expected}")]
    WrongLength {
        /// Expected length.
        expected: usize,
        /// Actual length.
        found: usize,
    },
    /// The payload has the right length but impossible contents.
    #[error("corrupt payload: {0}")]
    Corrupt(&'static str),
    /// The vector is longer than the codec can address.
    #[error("{0} values are more than this codec can encode")]
    TooLong(usize),
    /// Error feedback was given a vector of another length than its residual.
    #[error("delta has {found} values, the residual {expected}")]
    LengthMismatch {
        /// The residual's length.
        expected: usize,
        /// The delta's length.
        found: usize,
    },
}

const EXP_MASK: u32 = 0x7f80_0000;

fn first_non_finite(values: &[f32]) -> Option<usize> {
    // A branch-free pass first (vectorises); the position only on failure.
    let any_bad = values
        .iter()
        .fold(false, |acc, v| acc | (v.to_bits() & EXP_MASK == EXP_MASK));
    if any_bad {
        values.iter().position(|v| !v.is_finite())
    } else {
        None
    }
}

fn check_finite(values: &[f32]) -> Result<(), CodecError> {
    match first_non_finite(values) {
        Some(index) => Err(CodecError::NonFinite { index }),
        None => Ok(()),
    }
}

fn f32_to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    // Round to nearest, ties to even, on the 16 bits that are dropped.
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    // A finite value just below f32::MAX can round up to infinity: saturate.
    if rounded & 0x7f80 == 0x7f80 {
        (rounded & 0x8000) | 0x7f7f
    } else {
        rounded
    }
}

fn bf16_to_f32(v: u16) -> f32 {
    f32::from_bits(u32::from(v) << 16)
}

/// Raw little-endian bytes of `values` (how parameters are stored and
/// hashed), in one pass that vectorises.
pub fn f32_le_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    write_f32s(values, &mut out);
    out
}

/// The values of raw little-endian f32 bytes (a trailing partial value is
/// ignored).
pub fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(bytes.len() / 4);
    read_f32s(bytes, &mut out);
    out
}

/// Appends the raw little-endian bytes of `values` to `out`.
pub fn write_f32_le(values: &[f32], out: &mut Vec<u8>) {
    write_f32s(values, out);
}

fn read_f32s(bytes: &[u8], out: &mut Vec<f32>) {
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
}

fn write_f32s(values: &[f32], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + values.len() * 4, 0);
    for (dst, v) in out[start..].chunks_exact_mut(4).zip(values) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
}

/// Rounds to the nearest integer, ties to even, for |x| < 2^22, with plain
/// float adds that vectorise on every x86-64 (unlike `f32::round`).
fn round_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    (x + MAGIC) - MAGIC
}

impl Codec {
    /// Checks the codec's parameter.
    pub fn validate(&self) -> Result<(), CodecError> {
        match *self {
            Codec::Int8 { block } if !(64..=4096).contains(&block) => Err(
                CodecError::BadParameter(format!("int8 block {block} outside 64..=4096")),
            ),
            _ => match self.topk_fraction() {
                Some(fraction) if !(fraction > 0.0 && fraction <= 1.0) => Err(
                    CodecError::BadParameter(format!("top-k fraction {fraction} outside (0, 1]")),
                ),
                _ => Ok(()),
            },
        }
    }

    /// The kept fraction of a top-k codec (of any value encoding).
    fn topk_fraction(&self) -> Option<f32> {
        match *self {
            Codec::TopK { fraction }
            | Codec::TopKBf16 { fraction }
            | Codec::TopKInt8 { fraction } => Some(fraction),
            _ => None,
        }
    }

    /// How a top-k codec stores its k kept values: as this dense codec's
    /// payload of k values.
    fn topk_values(&self) -> Option<Codec> {
        match *self {
            Codec::TopK { .. } => Some(Codec::F32),
            Codec::TopKBf16 { .. } => Some(Codec::Bf16),
            Codec::TopKInt8 { .. } => Some(Codec::Int8 {
                block: TOPK_INT8_BLOCK,
            }),
            _ => None,
        }
    }

    /// How many values top-k keeps out of `n`: fraction·n (in f64) rounded to
    /// the nearest integer, at least 1. Rounding, not ceiling, so that a
    /// fraction like 0.1, which f32 stores as 0.100000001, keeps 10 of 100.
    fn topk_k(fraction: f32, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        ((f64::from(fraction) * n as f64).round() as usize).clamp(1, n)
    }

    /// Whether decoding gives back exactly what was encoded (`f32`).
    pub fn is_lossless(&self) -> bool {
        matches!(self, Codec::F32)
    }

    /// The exact payload length for `n` values, or `None` if `n` is too large
    /// (or the parameter invalid).
    pub fn encoded_len(&self, n: usize) -> Option<usize> {
        self.validate().ok()?;
        match *self {
            Codec::F32 => n.checked_mul(4),
            Codec::Bf16 => n.checked_mul(2),
            Codec::Int8 { block } => n.div_ceil(block as usize).checked_mul(4)?.checked_add(n),
            Codec::TopK { fraction }
            | Codec::TopKBf16 { fraction }
            | Codec::TopKInt8 { fraction } => {
                if u32::try_from(n).is_err() {
                    return None;
                }
                let k = Self::topk_k(fraction, n);
                let values = self.topk_values()?.encoded_len(k)?;
                Some(4 + 4 * k + values)
            }
        }
    }

    /// Encodes a flat vector. Fails on non-finite input.
    pub fn encode(&self, values: &[f32]) -> Result<Vec<u8>, CodecError> {
        self.validate()?;
        check_finite(values)?;
        let n = values.len();
        let len = self.encoded_len(n).ok_or(CodecError::TooLong(n))?;
        let mut out = Vec::with_capacity(len);
        match *self {
            Codec::F32 => write_f32s(values, &mut out),
            Codec::Bf16 => {
                out.resize(len, 0);
                for (dst, v) in out.chunks_exact_mut(2).zip(values) {
                    dst.copy_from_slice(&f32_to_bf16(*v).to_le_bytes());
                }
            }
            Codec::Int8 { block } => {
                let block = block as usize;
                let blocks = n.div_ceil(block);
                out.resize(len, 0);
                let (scales, quants) = out.split_at_mut(blocks * 4);
                for ((chunk, q), s) in values
                    .chunks(block)
                    .zip(quants.chunks_mut(block))
                    .zip(scales.chunks_exact_mut(4))
                {
                    let max_abs = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = max_abs / 127.0;
                    s.copy_from_slice(&scale.to_le_bytes());
                    let inv = if max_abs > 0.0 { 127.0 / max_abs } else { 0.0 };
                    for (dst, v) in q.iter_mut().zip(chunk) {
                        *dst = round_small(v * inv).clamp(-127.0, 127.0) as i8 as u8;
                    }
                }
            }
            Codec::TopK { fraction }
            | Codec::TopKBf16 { fraction }
            | Codec::TopKInt8 { fraction } => {
                let k = Self::topk_k(fraction, n);
                let mut idx: Vec<u32> = (0..n as u32).collect();
                if k < n {
                    // Larger |x| first, lower index first among equals: a total
                    // order, so the k chosen are the same everywhere.
                    idx.select_nth_unstable_by(k - 1, |a, b| {
                        let (x, y) = (values[*a as usize].abs(), values[*b as usize].abs());
                        y.total_cmp(&x).then(a.cmp(b))
                    });
                    idx.truncate(k);
                }
                idx.sort_unstable();
                out.extend_from_slice(&(k as u32).to_le_bytes());
                for i in &idx {
                    out.extend_from_slice(&i.to_le_bytes());
                }
                let kept: Vec<f32> = idx.iter().map(|i| values[*i as usize]).collect();
                let dense = self.topk_values().ok_or(CodecError::TooLong(n))?;
                out.extend_from_slice(&dense.encode(&kept)?);
            }
        }
        debug_assert_eq!(out.len(), len);
        Ok(out)
    }

    /// Checks the parameter and that `bytes` is a payload of `n` values' length.
    fn check_len(&self, bytes: &[u8], n: usize) -> Result<(), CodecError> {
        self.validate()?;
        let expected = self.encoded_len(n).ok_or(CodecError::TooLong(n))?;
        if bytes.len() != expected {
            return Err(CodecError::WrongLength {
                expected,
                found: bytes.len(),
            });
        }
        Ok(())
    }

    /// Decodes a payload of `n` values. Refuses wrong lengths and anything a
    /// correct encoder could not have produced.
    pub fn decode(&self, bytes: &[u8], n: usize) -> Result<Vec<f32>, CodecError> {
        self.check_len(bytes, n)?;
        let mut out = Vec::with_capacity(n);
        match *self {
            Codec::F32 => {
                read_f32s(bytes, &mut out);
                check_finite(&out)?;
            }
            Codec::Bf16 => {
                out.extend(
                    bytes
                        .chunks_exact(2)
                        .map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))),
                );
                check_finite(&out)?;
            }
            Codec::Int8 { block } => {
                let block = block as usize;
                let (scale_bytes, quants) = bytes.split_at(n.div_ceil(block) * 4);
                let mut scales = Vec::with_capacity(scale_bytes.len() / 4);
                read_f32s(scale_bytes, &mut scales);
                if scales.iter().any(|s| !s.is_finite() || *s < 0.0) {
                    return Err(CodecError::Corrupt(
                        "an int8 block scale is negative or not finite",
                    ));
                }
                if quants.contains(&0x80) {
                    return Err(CodecError::Corrupt("int8 value -128 is never produced"));
                }
                for (q, s) in quants.chunks(block).zip(&scales) {
                    out.extend(q.iter().map(|v| f32::from(*v as i8) * s));
                }
                // scale·127 can overflow to infinity for a crafted scale.
                check_finite(&out)?;
            }
            Codec::TopK { fraction }
            | Codec::TopKBf16 { fraction }
            | Codec::TopKInt8 { fraction } => {
                let k = Self::topk_k(fraction, n);
                let stored = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
                if stored != k {
                    return Err(CodecError::Corrupt(
                        "top-k count does not match the fraction",
                    ));
                }
                let (idx_bytes, val_bytes) = bytes[4..].split_at(4 * k);
                let dense = self.topk_values().ok_or(CodecError::TooLong(n))?;
                let vals = dense.decode(val_bytes, k)?;
                out.resize(n, 0.0);
                let mut prev: Option<u32> = None;
                for (c, v) in idx_bytes.chunks_exact(4).zip(vals) {
                    let i = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    if prev.is_some_and(|p| i <= p) || i as usize >= n {
                        return Err(CodecError::Corrupt(
                            "top-k indices not increasing or out of range",
                        ));
                    }
                    prev = Some(i);
                    out[i as usize] = v;
                }
            }
        }
        Ok(out)
    }

    /// Decodes values `start .. start + out.len()` of a payload of `n`
    /// values into `out`, without decoding the rest: the same values
    /// [`Codec::decode`] gives there, bit for bit, for a payload it accepts.
    /// Meant for payloads `decode` (or the door) already accepted: this
    /// checks the length and the range and never panics, but a top-k
    /// payload's index order and every value's finiteness are `decode`'s
    /// checks, not this one's.
    pub fn decode_range(
        &self,
        bytes: &[u8],
        n: usize,
        start: usize,
        out: &mut [f32],
    ) -> Result<(), CodecError> {
        self.check_len(bytes, n)?;
        let end = start
            .checked_add(out.len())
            .filter(|e| *e <= n)
            .ok_or(CodecError::Corrupt("range beyond the vector"))?;
        match *self {
            Codec::F32 => {
                for (o, c) in out
                    .iter_mut()
                    .zip(bytes[4 * start..4 * end].chunks_exact(4))
                {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Codec::Bf16 => {
                for (o, c) in out
                    .iter_mut()
                    .zip(bytes[2 * start..2 * end].chunks_exact(2))
                {
                    *o = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
                }
            }
            Codec::Int8 { block } => int8_range(bytes, n, block as usize, start, out),
            Codec::TopK { fraction }
            | Codec::TopKBf16 { fraction }
            | Codec::TopKInt8 { fraction } => {
                let k = Self::topk_k(fraction, n);
                let idx = &bytes[4..4 + 4 * k];
                let vals = &bytes[4 + 4 * k..];
                let index = |j: usize| {
                    let c = &idx[4 * j..4 * j + 4];
                    u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize
                };
                out.fill(0.0);
                // The first stored index at or after `start` (indices increase).
                let (mut lo, mut hi) = (0, k);
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    if index(mid) < start {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                let mut one = [0f32; 1];
                for j in lo..k {
                    let i = index(j);
                    if i >= end {
                        break;
                    }
                    if i < start {
                        return Err(CodecError::Corrupt(
                            "top-k indices not increasing or out of range",
                        ));
                    }
                    let v = match *self {
                        Codec::TopK { .. } => {
                            let c = &vals[4 * j..4 * j + 4];
                            f32::from_le_bytes([c[0], c[1], c[2], c[3]])
                        }
                        Codec::TopKBf16 { .. } => {
                            bf16_to_f32(u16::from_le_bytes([vals[2 * j], vals[2 * j + 1]]))
                        }
                        _ => {
                            int8_range(vals, k, TOPK_INT8_BLOCK as usize, j, &mut one);
                            one[0]
                        }
                    };
                    out[i - start] = v;
                }
            }
        }
        Ok(())
    }
}

impl Codec {
    /// Makes every check [`Codec::decode`] makes, with the same error for
    /// the same payload, and hands the decoded values to `f` in order, at
    /// most `block` at a time, without ever holding the whole decoded
    /// vector: what the door needs to judge a large payload (finiteness,
    /// norm) in a block's memory. The values are `decode`'s, bit for bit.
    pub fn decode_blocks(
        &self,
        bytes: &[u8],
        n: usize,
        block: usize,
        mut f: impl FnMut(&[f32]),
    ) -> Result<(), CodecError> {
        self.check_len(bytes, n)?;
        match *self {
            Codec::F32 | Codec::Bf16 => {}
            Codec::Int8 { block } => {
                let (scale_bytes, quants) = bytes.split_at(n.div_ceil(block as usize) * 4);
                let bad_scale = scale_bytes.chunks_exact(4).any(|c| {
                    let s = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    !s.is_finite() || s < 0.0
                });
                if bad_scale {
                    return Err(CodecError::Corrupt(
                        "an int8 block scale is negative or not finite",
                    ));
                }
                if quants.contains(&0x80) {
                    return Err(CodecError::Corrupt("int8 value -128 is never produced"));
                }
            }
            Codec::TopK { fraction }
            | Codec::TopKBf16 { fraction }
            | Codec::TopKInt8 { fraction } => {
                let k = Self::topk_k(fraction, n);
                let stored = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
                if stored != k {
                    return Err(CodecError::Corrupt(
                        "top-k count does not match the fraction",
                    ));
                }
                let (idx_bytes, val_bytes) = bytes[4..].split_at(4 * k);
                let dense = self.topk_values().ok_or(CodecError::TooLong(n))?;
                // The kept values (k of them, not n): decode's checks.
                dense.decode(val_bytes, k)?;
                let mut prev: Option<u32> = None;
                for c in idx_bytes.chunks_exact(4) {
                    let i = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    if prev.is_some_and(|p| i <= p) || i as usize >= n {
                        return Err(CodecError::Corrupt(
                            "top-k indices not increasing or out of range",
                        ));
                    }
                    prev = Some(i);
                }
            }
        }
        let block = block.clamp(1, n.max(1));
        let mut buf = vec![0f32; block.min(n)];
        let mut start = 0;
        while start < n {
            let len = block.min(n - start);
            let out = &mut buf[..len];
            self.decode_range(bytes, n, start, out)?;
            if let Some(i) = first_non_finite(out) {
                return Err(CodecError::NonFinite { index: start + i });
            }
            f(out);
            start += len;
        }
        Ok(())
    }
}

/// Values `start ..` of an `int8:block` payload of `n` values (its length
/// checked by the caller) into `out`: quantised value times its block's
/// scale, as `decode` computes it.
fn int8_range(bytes: &[u8], n: usize, block: usize, start: usize, out: &mut [f32]) {
    let scales = n.div_ceil(block) * 4;
    for (k, o) in out.iter_mut().enumerate() {
        let i = start + k;
        let b = 4 * (i / block);
        let s = f32::from_le_bytes([bytes[b], bytes[b + 1], bytes[b + 2], bytes[b + 3]]);
        *o = f32::from(bytes[scales + i] as i8) * s;
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::F32 => f.write_str("f32"),
            Codec::Bf16 => f.write_str("bf16"),
            Codec::Int8 { block } => write!(f, "int8:{block}"),
            Codec::TopK { fraction } => write!(f, "topk:{fraction}"),
            Codec::TopKBf16 { fraction } => write!(f, "topk-bf16:{fraction}"),
            Codec::TopKInt8 { fraction } => write!(f, "topk-int8:{fraction}"),
        }
    }
}

impl FromStr for Codec {
    type Err = CodecError;

    /// Parses `f32`, `bf16`, `int8` (block 256), `int8:BLOCK`, `topk:FRACTION`,
    /// `topk-bf16:FRACTION`, `topk-int8:FRACTION`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            CodecError::BadParameter(format!(
                "unknown codec {s:?} (f32, bf16, int8[:BLOCK], topk:FRACTION, topk-bf16:FRACTION, topk-int8:FRACTION)"
            ))
        };
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let codec = match (name, arg) {
            ("f32", None) => Codec::F32,
            ("bf16", None) => Codec::Bf16,
            ("int8", None) => Codec::Int8 { block: 256 },
            ("int8", Some(a)) => Codec::Int8 {
                block: a.parse().map_err(|_| bad())?,
            },
            ("topk", Some(a)) => Codec::TopK {
                fraction: a.parse().map_err(|_| bad())?,
            },
            ("topk-bf16", Some(a)) => Codec::TopKBf16 {
                fraction: a.parse().map_err(|_| bad())?,
            },
            ("topk-int8", Some(a)) => Codec::TopKInt8 {
                fraction: a.parse().map_err(|_| bad())?,
            },
            _ => return Err(bad()),
        };
        codec.validate()?;
        Ok(codec)
    }
}

/// Error feedback for a lossy codec: keeps what encoding dropped and adds it
/// to the next delta, so that over rounds nothing is lost for good.
#[derive(Debug, Clone)]
pub struct ErrorFeedback {
    n: usize,
    /// Empty while it is all zero (nothing dropped yet, or a lossless codec
    /// carried everything over): a node on `f32` holds no residual.
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// Starts with a zero residual for vectors of `n` values.
    pub fn new(n: usize) -> Self {
        Self {
            n,
            residual: Vec::new(),
        }
    }

    /// What previous encodings dropped and the next one will carry (empty
    /// when that is nothing).
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Encodes `delta + residual` and keeps the new residual (what the
    /// encoding lost). On error the residual is left unchanged.
    pub fn encode(&mut self, codec: &Codec, delta: &[f32]) -> Result<Vec<u8>, CodecError> {
        if delta.len() != self.n {
            return Err(CodecError::LengthMismatch {
                expected: self.n,
                found: delta.len(),
            });
        }
        if self.residual.is_empty() && codec.is_lossless() {
            // Nothing carried over, nothing dropped.
            return codec.encode(delta);
        }
        let corrected: Vec<f32> = if self.residual.is_empty() {
            delta.to_vec()
        } else {
            delta
                .iter()
                .zip(&self.residual)
                .map(|(d, r)| d + r)
                .collect()
        };
        let bytes = codec.encode(&corrected)?;
        if codec.is_lossless() {
            self.residual = Vec::new();
            return Ok(bytes);
        }
        let decoded = codec.decode(&bytes, corrected.len())?;
        self.residual = corrected.iter().zip(&decoded).map(|(c, d)| c - d).collect();
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even_and_saturates() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1.0078125: ties to even.
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f7f);
        assert_eq!(f32_to_bf16(-f32::MAX), 0xff7f);
    }

    #[test]
    fn parse_and_display() {
        for s in [
            "f32",
            "bf16",
            "int8:256",
            "topk:0.01",
            "topk-bf16:0.01",
            "topk-int8:0.5",
        ] {
            assert_eq!(s.parse::<Codec>().unwrap().to_string(), s);
        }
        assert_eq!("int8".parse::<Codec>().unwrap(), Codec::Int8 { block: 256 });
        assert!("int8:7".parse::<Codec>().is_err());
        assert!("topk:0".parse::<Codec>().is_err());
        assert!("topk:nan".parse::<Codec>().is_err());
        assert!("gzip".parse::<Codec>().is_err());
    }

    #[test]
    fn non_finite_is_an_error() {
        for c in [
            Codec::F32,
            Codec::Bf16,
            Codec::Int8 { block: 64 },
            Codec::TopK { fraction: 0.5 },
            Codec::TopKBf16 { fraction: 0.5 },
            Codec::TopKInt8 { fraction: 0.5 },
        ] {
            assert_eq!(
                c.encode(&[1.0, f32::NAN]),
                Err(CodecError::NonFinite { index: 1 })
            );
            assert_eq!(
                c.encode(&[f32::INFINITY]),
                Err(CodecError::NonFinite { index: 0 })
            );
        }
        let nan = f32::NAN.to_le_bytes();
        assert_eq!(
            Codec::F32.decode(&nan, 1),
            Err(CodecError::NonFinite { index: 0 })
        );
    }
}
