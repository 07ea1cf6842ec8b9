//! Door checks: what every incoming delta must pass before it is stored,
//! forwarded or aggregated. Each rejection names its reason (and, through
//! [`Rejected`], the sender) so the network layer can penalise the peer and
//! count the reason in its metrics.

use std::collections::VecDeque;
use std::fmt;

use tapestry_protocol::{CodecError, DeltaManifest, NodeId, TensorSpec};

use crate::aggregate::{PayloadSource, fixed_width};

/// Values the door decodes at a time when it checks a payload (64 KiB of
/// f32).
pub const DECODE_BLOCK: usize = 16_384;

/// Limits applied at the door.
#[derive(Debug, Clone, PartialEq)]
pub struct DoorConfig {
    /// A delta's L2 norm may be at most this multiple of the median norm of
    /// recently accepted deltas.
    pub norm_multiple: f32,
    /// How many recent norms the median is taken over.
    pub norm_history: usize,
    /// The norm check starts once this many norms have been seen.
    pub norm_min_history: usize,
    /// Deltas for rounds older than `current − staleness` are dropped.
    pub staleness: u64,
    /// Deltas for rounds newer than `current + lookahead` are refused.
    pub lookahead: u64,
    /// How much each delta weighs in the aggregate.
    pub weighting: Weighting,
    /// A peer's model version more than this many rounds ahead of this
    /// node's head is refused before anything is fetched (catching up
    /// further means recomputing that many rounds).
    pub max_rounds_ahead: u64,
    /// A branch that grew apart (a partition) is merged only if each side
    /// holds deltas of at least this many distinct authors in the compared
    /// window, so one member alone cannot pass its own line off as a branch.
    pub min_branch_authors: usize,
}

/// How much each admitted delta weighs in a weighted aggregate (the plain
/// mean, and clipping's step; trimmed mean and median are unweighted).
///
/// A delta's `sample_count` is its author's word: weighing by it lets one
/// member claim `u64::MAX` samples and outvote everyone. So by default every
/// author weighs the same; `Samples` trusts sample counts up to a cap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Weighting {
    /// Every admitted delta weighs 1 (one author, one vote per round).
    Equal,
    /// A delta weighs its `sample_count`, clamped to `[1, max]`.
    Samples {
        /// The most any one delta may weigh.
        max: u64,
    },
}

impl Weighting {
    /// The weight of a delta declaring `sample_count` samples.
    pub fn weight(&self, sample_count: u64) -> f64 {
        match *self {
            Weighting::Equal => 1.0,
            Weighting::Samples { max } => sample_count.clamp(1, max.max(1)) as f64,
        }
    }
}

/// Why a weighting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightingError {
    /// `samples:` without a positive integer.
    #[error("bad weighting {0:?}: samples:MAX needs MAX ≥ 1")]
    BadMax(String),
    /// Neither `equal` nor `samples:MAX`.
    #[error("unknown weighting {0:?} (equal, samples:MAX)")]
    Unknown(String),
}

impl std::str::FromStr for Weighting {
    type Err = WeightingError;

    /// `equal` or `samples:MAX`.
    fn from_str(s: &str) -> Result<Self, WeightingError> {
        match s.split_once(':') {
            None if s == "equal" => Ok(Weighting::Equal),
            Some(("samples", max)) => match max.parse::<u64>() {
                Ok(max) if max >= 1 => Ok(Weighting::Samples { max }),
                _ => Err(WeightingError::BadMax(s.to_owned())),
            },
            _ => Err(WeightingError::Unknown(s.to_owned())),
        }
    }
}

impl fmt::Display for Weighting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Weighting::Equal => f.write_str("equal"),
            Weighting::Samples { max } => write!(f, "samples:{max}"),
        }
    }
}

impl Default for DoorConfig {
    fn default() -> Self {
        Self {
            norm_multiple: 10.0,
            norm_history: 64,
            norm_min_history: 4,
            staleness: 2,
            lookahead: 2,
            weighting: Weighting::Equal,
            max_rounds_ahead: 1024,
            min_branch_authors: 2,
        }
    }
}

/// Why a delta was turned away.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    /// Another model or region than this node's.
    WrongScope {
        /// What the manifest said, `model/region`.
        found: String,
    },
    /// The tensor layout (names, shapes, dtypes) differs from the model's.
    LayoutMismatch {
        /// First difference.
        detail: String,
    },
    /// The decoded vector has the wrong number of values.
    WrongLength {
        /// Expected.
        expected: usize,
        /// Found.
        found: usize,
    },
    /// The payload did not decode.
    Undecodable(CodecError),
    /// A NaN or infinity.
    NonFinite {
        /// First offending position.
        index: usize,
    },
    /// The norm the manifest declares is not the norm of its payload.
    NormMismatch {
        /// Declared.
        declared: f32,
        /// Computed.
        actual: f32,
    },
    /// The norm is far above what peers usually send.
    NormTooLarge {
        /// The delta's norm.
        norm: f32,
        /// The limit (multiple × recent median).
        limit: f32,
    },
    /// The round is older than the staleness window.
    Stale {
        /// The delta's round.
        round: u64,
        /// This node's round.
        current: u64,
    },
    /// The round is further ahead than this node accepts.
    FromTheFuture {
        /// The delta's round.
        round: u64,
        /// This node's round.
        current: u64,
    },
    /// A sequence number not above the author's last one seen: a replay
    /// of an old announcement (or a forked author).
    Replay {
        /// The announcement's sequence number.
        seq: u64,
        /// The last one seen from this author.
        last: u64,
    },
    /// A second delta from one author for one round: one author has one
    /// vote per round.
    DuplicateAuthorRound {
        /// The round.
        round: u64,
    },
}

impl Rejection {
    /// Whether the delta is wrong on its own terms — its manifest and
    /// payload prove it to anyone — rather than wrong for this node now.
    /// A stale or future round, a replay, a second vote of an author or a
    /// norm above recent ones depend on what this node has seen and when:
    /// an honest peer that saw the deltas in another order forwards them in
    /// good faith, so they must not cost the forwarder its gossip score.
    pub fn is_evident(&self) -> bool {
        match self {
            Rejection::WrongScope { .. }
            | Rejection::LayoutMismatch { .. }
            | Rejection::WrongLength { .. }
            | Rejection::Undecodable(_)
            | Rejection::NonFinite { .. }
            | Rejection::NormMismatch { .. } => true,
            Rejection::NormTooLarge { .. }
            | Rejection::Stale { .. }
            | Rejection::FromTheFuture { .. }
            | Rejection::Replay { .. }
            | Rejection::DuplicateAuthorRound { .. } => false,
        }
    }

    /// A short, stable label for metrics (`deltas_rejected{reason=...}`).
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::WrongScope { .. } => "wrong_scope",
            Rejection::LayoutMismatch { .. } => "layout_mismatch",
            Rejection::WrongLength { .. } => "wrong_length",
            Rejection::Undecodable(_) => "undecodable",
            Rejection::NonFinite { .. } => "non_finite",
            Rejection::NormMismatch { .. } => "norm_mismatch",
            Rejection::NormTooLarge { .. } => "norm_too_large",
            Rejection::Stale { .. } => "stale",
            Rejection::FromTheFuture { .. } => "from_the_future",
            Rejection::Replay { .. } => "replay",
            Rejection::DuplicateAuthorRound { .. } => "duplicate_author_round",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::WrongScope { found } => write!(f, "for another model or region ({found})"),
            Rejection::LayoutMismatch { detail } => write!(f, "tensor layout differs: {detail}"),
            Rejection::WrongLength { expected, found } => {
                write!(f, "{found} values, expected {expected}")
            }
            Rejection::Undecodable(e) => write!(f, "payload does not decode: {e}"),
            Rejection::NonFinite { index } => write!(f, "value {index} is not finite"),
            Rejection::NormMismatch { declared, actual } => {
                write!(f, "declares L2 norm {declared}, payload has {actual}")
            }
            Rejection::NormTooLarge { norm, limit } => {
                write!(f, "L2 norm {norm} above the limit {limit}")
            }
            Rejection::Stale { round, current } => {
                write!(f, "round {round} is too old (current {current})")
            }
            Rejection::FromTheFuture { round, current } => {
                write!(f, "round {round} is too far ahead (current {current})")
            }
            Rejection::Replay { seq, last } => {
                write!(f, "sequence number {seq} not above the last seen ({last})")
            }
            Rejection::DuplicateAuthorRound { round } => {
                write!(f, "a second delta from its author for round {round}")
            }
        }
    }
}

/// A rejection and who sent the delta.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// The delta's author (its signer).
    pub sender: NodeId,
    /// Why.
    pub reason: Rejection,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "delta from {} rejected: {}",
            self.sender.short(),
            self.reason
        )
    }
}

/// The door: the model's scope and layout, plus recent accepted norms.
#[derive(Debug, Clone)]
pub struct Door {
    config: DoorConfig,
    model_id: String,
    region: String,
    layout: Vec<TensorSpec>,
    recent_norms: VecDeque<f32>,
}

impl Door {
    /// A door for one model in one region.
    pub fn new(config: DoorConfig, model_id: &str, region: &str, layout: Vec<TensorSpec>) -> Self {
        Self {
            config,
            model_id: model_id.to_owned(),
            region: region.to_owned(),
            layout,
            recent_norms: VecDeque::new(),
        }
    }

    /// Checks what can be checked from the manifest alone (before fetching
    /// any chunk): scope, layout, round window.
    pub fn check_manifest(&self, m: &DeltaManifest, current_round: u64) -> Result<(), Rejected> {
        let reject = |reason| Rejected {
            sender: m.author,
            reason,
        };
        if m.model_id != self.model_id || m.region != self.region {
            return Err(reject(Rejection::WrongScope {
                found: format!("{}/{}", m.model_id, m.region),
            }));
        }
        if m.layout != self.layout {
            let detail = if m.layout.len() != self.layout.len() {
                format!("{} tensors, expected {}", m.layout.len(), self.layout.len())
            } else {
                m.layout
                    .iter()
                    .zip(&self.layout)
                    .find(|(a, b)| a != b)
                    .map(|(a, b)| {
                        format!(
                            "{:?} {:?} where {:?} {:?} was expected",
                            a.name, a.shape, b.name, b.shape
                        )
                    })
                    .unwrap_or_default()
            };
            return Err(reject(Rejection::LayoutMismatch { detail }));
        }
        // Rounds are a peer's numbers: saturating arithmetic, so a round
        // near u64::MAX is refused, never wrapped.
        if m.round.saturating_add(self.config.staleness) < current_round {
            return Err(reject(Rejection::Stale {
                round: m.round,
                current: current_round,
            }));
        }
        if m.round > current_round.saturating_add(self.config.lookahead) {
            return Err(reject(Rejection::FromTheFuture {
                round: m.round,
                current: current_round,
            }));
        }
        Ok(())
    }

    /// Checks a delta's payload: that it decodes (length, finiteness, every
    /// check of its codec), its declared norm, and its norm against recent
    /// deltas. On success the norm joins the history. The payload is decoded
    /// a block at a time ([`DECODE_BLOCK`] values) and never whole: the
    /// door holds a block, not a model.
    pub fn check_payload(&mut self, m: &DeltaManifest, payload: &[u8]) -> Result<(), Rejected> {
        let norm = self.judge_payload(m, payload)?;
        self.remember_norm(norm);
        Ok(())
    }

    /// An admitted delta's norm joins the history the limit is drawn from.
    fn remember_norm(&mut self, norm: f32) {
        self.recent_norms.push_back(norm);
        while self.recent_norms.len() > self.config.norm_history {
            self.recent_norms.pop_front();
        }
    }

    /// Whether a payload decodes (length, finiteness, every check of its
    /// codec), without judging its norm or adding to the history: for a
    /// payload that passed [`Door::check_payload`] before, read again.
    pub fn check_decodes(&self, m: &DeltaManifest, payload: &[u8]) -> Result<(), Rejected> {
        self.decode_blocks(m, payload, |_| {})
    }

    /// Values in the layout.
    pub fn n_values(&self) -> usize {
        self.layout
            .iter()
            .map(|t| t.shape.iter().product::<u64>() as usize)
            .sum()
    }

    /// Decodes a delta's payload whole (length and finiteness checked)
    /// without judging its norm or adding to the history.
    pub fn decode(&self, m: &DeltaManifest, payload: &[u8]) -> Result<Vec<f32>, Rejected> {
        let mut out = Vec::with_capacity(self.n_values());
        self.decode_blocks(m, payload, |b| out.extend_from_slice(b))?;
        Ok(out)
    }

    /// The payload's values to `f`, a block at a time, with the codec's
    /// errors as the door's rejections.
    fn decode_blocks(
        &self,
        m: &DeltaManifest,
        payload: &[u8],
        f: impl FnMut(&[f32]),
    ) -> Result<(), Rejected> {
        let reject = |reason| Rejected {
            sender: m.author,
            reason,
        };
        let n = self.n_values();
        m.codec
            .decode_blocks(payload, n, DECODE_BLOCK, f)
            .map_err(|e| match e {
                CodecError::NonFinite { index } => reject(Rejection::NonFinite { index }),
                CodecError::WrongLength { .. } => reject(Rejection::WrongLength {
                    expected: m.codec.encoded_len(n).unwrap_or(0),
                    found: payload.len(),
                }),
                other => reject(Rejection::Undecodable(other)),
            })
    }

    /// Checks decoded values (for callers that decode themselves); on
    /// success the norm joins the history.
    pub fn check_values(
        &mut self,
        sender: NodeId,
        declared_norm: f32,
        values: &[f32],
    ) -> Result<(), Rejected> {
        let norm = self.judge_values(sender, declared_norm, values)?;
        self.remember_norm(norm);
        Ok(())
    }

    /// The door's scope, layout and round-window checks for a delta named by
    /// a peer's model version of round `version_round`: the delta must be of
    /// one of the rounds that version could aggregate (the one before it,
    /// or up to `staleness` earlier).
    pub fn check_named_manifest(
        &self,
        m: &DeltaManifest,
        version_round: u64,
    ) -> Result<(), Rejected> {
        let closes = version_round.checked_sub(1).ok_or(Rejected {
            sender: m.author,
            reason: Rejection::FromTheFuture {
                round: m.round,
                current: version_round,
            },
        })?;
        self.check_manifest(m, closes)?;
        if m.round > closes {
            return Err(Rejected {
                sender: m.author,
                reason: Rejection::FromTheFuture {
                    round: m.round,
                    current: closes,
                },
            });
        }
        Ok(())
    }

    /// Checks the payload of a delta named by a peer's model version,
    /// exactly as [`Door::check_payload`] does, without adding its norm to
    /// the history (a version's deltas were judged when announced).
    pub fn check_named_payload(&self, m: &DeltaManifest, payload: &[u8]) -> Result<(), Rejected> {
        self.judge_payload(m, payload).map(|_| ())
    }

    /// [`Door::check_named_payload`] for a payload of a fixed-width codec
    /// read from where it is kept, a block at a time. `Err(None)`: the
    /// source could not be read (a local failure, nobody's fault).
    pub fn check_named_source(
        &self,
        m: &DeltaManifest,
        source: &dyn PayloadSource,
    ) -> Result<(), Option<Rejected>> {
        self.judge_source(m, source).map(|_| ())
    }

    /// [`Door::check_payload`] for a payload of a fixed-width codec read
    /// from where the shell kept it as it arrived, a block at a time: the
    /// same checks and the same verdict; on success the norm joins the
    /// history. `Err(None)`: the source could not be read.
    pub fn check_source(
        &mut self,
        m: &DeltaManifest,
        source: &dyn PayloadSource,
    ) -> Result<(), Option<Rejected>> {
        let norm = self.judge_source(m, source)?;
        self.remember_norm(norm);
        Ok(())
    }

    /// Judges a payload read from `source`; returns its norm.
    fn judge_source(
        &self,
        m: &DeltaManifest,
        source: &dyn PayloadSource,
    ) -> Result<f32, Option<Rejected>> {
        let reject = |reason| {
            Some(Rejected {
                sender: m.author,
                reason,
            })
        };
        let n = self.n_values();
        let Some(width) = fixed_width(m.codec) else {
            return Err(None);
        };
        let expected = m.codec.encoded_len(n).unwrap_or(0);
        if m.payload_bytes != expected as u64 {
            return Err(reject(Rejection::WrongLength {
                expected,
                found: usize::try_from(m.payload_bytes).unwrap_or(usize::MAX),
            }));
        }
        let mut bytes = vec![0u8; DECODE_BLOCK.min(n) * width];
        let mut values = vec![0f32; DECODE_BLOCK.min(n)];
        let mut squares = 0f64;
        let mut start = 0;
        while start < n {
            let len = DECODE_BLOCK.min(n - start);
            let (b, v) = (&mut bytes[..len * width], &mut values[..len]);
            source.read_at(start * width, b).map_err(|_| None)?;
            m.codec
                .decode_range(b, len, 0, v)
                .map_err(|e| reject(Rejection::Undecodable(e)))?;
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(reject(Rejection::NonFinite { index: start + i }));
            }
            for x in v.iter() {
                squares += f64::from(*x).powi(2);
            }
            start += len;
        }
        self.judge_norm(m.author, m.l2_norm, squares.sqrt() as f32)
            .map_err(Some)
    }

    /// The current norm limit (multiple × median of recent norms), once
    /// enough norms were seen.
    pub fn norm_limit(&self) -> Option<f32> {
        if self.recent_norms.len() < self.config.norm_min_history {
            return None;
        }
        let mut sorted: Vec<f32> = self.recent_norms.iter().copied().collect();
        sorted.sort_unstable_by(f32::total_cmp);
        Some(self.config.norm_multiple * sorted[sorted.len() / 2])
    }

    /// Checks a payload without recording anything; returns its norm
    /// (summed in order, as over the decoded values).
    fn judge_payload(&self, m: &DeltaManifest, payload: &[u8]) -> Result<f32, Rejected> {
        let mut squares = 0f64;
        self.decode_blocks(m, payload, |b| {
            for v in b {
                squares += f64::from(*v).powi(2);
            }
        })?;
        self.judge_norm(m.author, m.l2_norm, squares.sqrt() as f32)
    }

    /// Checks values without recording anything; returns their norm.
    fn judge_values(
        &self,
        sender: NodeId,
        declared_norm: f32,
        values: &[f32],
    ) -> Result<f32, Rejected> {
        let reject = |reason| Rejected { sender, reason };
        let n = self.n_values();
        if values.len() != n {
            return Err(reject(Rejection::WrongLength {
                expected: n,
                found: values.len(),
            }));
        }
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(reject(Rejection::NonFinite { index }));
        }
        let norm = values
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt() as f32;
        self.judge_norm(sender, declared_norm, norm)
    }

    /// The declared norm against the actual one, and the actual one against
    /// the limit.
    fn judge_norm(&self, sender: NodeId, declared_norm: f32, norm: f32) -> Result<f32, Rejected> {
        let reject = |reason| Rejected { sender, reason };
        if (norm - declared_norm).abs() > 1e-3 * norm.max(declared_norm).max(1e-6) {
            return Err(reject(Rejection::NormMismatch {
                declared: declared_norm,
                actual: norm,
            }));
        }
        if let Some(limit) = self.norm_limit()
            && norm > limit
        {
            return Err(reject(Rejection::NormTooLarge { norm, limit }));
        }
        Ok(norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapestry_protocol::{Codec, ContentId, DType, Keypair};

    fn layout() -> Vec<TensorSpec> {
        vec![TensorSpec {
            name: "w".into(),
            shape: vec![4],
            dtype: DType::F32,
        }]
    }

    fn manifest(values: &[f32], round: u64) -> (DeltaManifest, Vec<u8>) {
        let payload: Vec<u8> = tapestry_protocol::f32_le_bytes(values);
        let norm = values
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt() as f32;
        let m = DeltaManifest {
            model_id: "m".into(),
            region: "r".into(),
            round,
            base_version: ContentId::of(b"base"),
            author: Keypair::from_secret_bytes(&[9; 32]).node_id(),
            seq: 1,
            codec: Codec::F32,
            layout: vec![TensorSpec {
                name: "w".into(),
                shape: vec![values.len() as u64],
                dtype: DType::F32,
            }],
            payload_bytes: payload.len() as u64,
            chunk_size: 4096,
            chunk_ids: vec![ContentId::of(&payload)],
            sample_count: 1,
            l2_norm: if norm.is_finite() { norm } else { 0.0 },
            created_unix_ms: 0,
        };
        (m, payload)
    }

    /// A payload in memory offered as a source (one that cannot be read
    /// when the flag is set).
    #[derive(Debug)]
    struct Memory(Vec<u8>, bool);

    impl PayloadSource for Memory {
        fn read_at(&self, start: usize, out: &mut [u8]) -> Result<(), String> {
            if self.1 {
                return Err("unreadable".into());
            }
            let src = self.0.get(start..start + out.len()).ok_or("short")?;
            out.copy_from_slice(src);
            Ok(())
        }
    }

    #[test]
    fn a_payload_read_from_its_source_is_judged_as_in_memory() {
        let mut door = Door::new(DoorConfig::default(), "m", "r", layout());
        for i in 0..4 {
            let (m, p) = manifest(&[1.0 + i as f32 * 0.1, 0.0, 0.0, 0.0], 5);
            door.check_payload(&m, &p).unwrap();
        }
        let (mut mismatched, p) = manifest(&[1.0, 0.0, 0.0, 0.0], 5);
        mismatched.l2_norm = 0.5;
        let cases = [
            manifest(&[1.0, -0.5, 0.25, 0.0], 5),
            manifest(&[f32::NAN, 0.0, 0.0, 0.0], 5),
            manifest(&[1.0, f32::INFINITY, 0.0, 0.0], 5),
            manifest(&[100.0, 0.0, 0.0, 0.0], 5),
            (mismatched, p),
        ];
        // A second door admits payloads from their sources (remembering
        // their norms) while the first admits them whole: the same
        // verdicts, and the same limit after each.
        let mut kept = door.clone();
        for (m, p) in cases {
            let whole = door.check_named_payload(&m, &p);
            let source = door.check_named_source(&m, &Memory(p.clone(), false));
            assert_eq!(whole.clone().map_err(Some), source, "{:?}", m.l2_norm);
            let admitted = door.check_payload(&m, &p);
            assert_eq!(whole, admitted);
            assert_eq!(
                kept.check_source(&m, &Memory(p.clone(), false)),
                admitted.map_err(Some)
            );
            assert_eq!(kept.norm_limit(), door.norm_limit());
        }
        // A manifest whose length is not the layout's, and a source that
        // cannot be read (nobody's fault: no rejection).
        let (mut m, p) = manifest(&[1.0, 0.0, 0.0, 0.0], 5);
        assert_eq!(
            door.check_named_source(&m, &Memory(p.clone(), true)),
            Err(None)
        );
        m.payload_bytes = 12;
        assert!(matches!(
            door.check_named_source(&m, &Memory(p, false)),
            Err(Some(Rejected {
                reason: Rejection::WrongLength { .. },
                ..
            }))
        ));
    }

    #[test]
    fn each_bad_delta_is_rejected_with_its_reason_and_sender() {
        let mut door = Door::new(DoorConfig::default(), "m", "r", layout());
        for i in 0..4 {
            let (m, p) = manifest(&[1.0 + i as f32 * 0.1, 0.0, 0.0, 0.0], 5);
            door.check_manifest(&m, 5).unwrap();
            door.check_payload(&m, &p).unwrap();
        }
        fn reason<T: std::fmt::Debug>(r: Result<T, Rejected>) -> Rejection {
            let e = r.unwrap_err();
            assert_eq!(e.sender, Keypair::from_secret_bytes(&[9; 32]).node_id());
            e.reason
        }
        let (m, p) = manifest(&[f32::NAN, 0.0, 0.0, 0.0], 5);
        assert_eq!(
            reason(door.check_payload(&m, &p)),
            Rejection::NonFinite { index: 0 }
        );
        let (m, _) = manifest(&[1.0, 2.0, 3.0], 5);
        assert!(matches!(
            reason(door.check_manifest(&m, 5)),
            Rejection::LayoutMismatch { .. }
        ));
        let (m, p) = manifest(&[100.0, 0.0, 0.0, 0.0], 5);
        assert!(matches!(
            reason(door.check_payload(&m, &p)),
            Rejection::NormTooLarge { .. }
        ));
        let (mut m, p) = manifest(&[1.0, 0.0, 0.0, 0.0], 5);
        m.l2_norm = 0.5;
        assert!(matches!(
            reason(door.check_payload(&m, &p)),
            Rejection::NormMismatch { .. }
        ));
        let (m, _) = manifest(&[1.0, 0.0, 0.0, 0.0], 2);
        assert_eq!(
            reason(door.check_manifest(&m, 5)),
            Rejection::Stale {
                round: 2,
                current: 5
            }
        );
        let (m, _) = manifest(&[1.0, 0.0, 0.0, 0.0], 9);
        assert_eq!(
            reason(door.check_manifest(&m, 5)),
            Rejection::FromTheFuture {
                round: 9,
                current: 5
            }
        );
        let (mut m, _) = manifest(&[1.0, 0.0, 0.0, 0.0], 5);
        m.region = "elsewhere".into();
        assert!(matches!(
            reason(door.check_manifest(&m, 5)),
            Rejection::WrongScope { .. }
        ));
        let (m, p) = manifest(&[1.0, 0.0, 0.0, 0.0], 5);
        assert!(matches!(
            reason(door.check_payload(&m, &p[..8])),
            Rejection::WrongLength { .. }
        ));
        // Within the staleness window is fine.
        let (m, _) = manifest(&[1.0, 0.0, 0.0, 0.0], 3);
        door.check_manifest(&m, 5).unwrap();
    }
}
