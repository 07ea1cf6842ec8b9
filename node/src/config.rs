//! `config.toml`: what a node trains, where it listens, whom it joins.
//! Precedence: command-line flags, then `TAPESTRY_*` environment variables
//! (both handled by the command), then this file, then the defaults below.
//! Unknown keys are errors, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tapestry_protocol::Codec;

use tapestry_core::aggregate::AggregationRule;
use tapestry_core::door::{DoorConfig, Weighting};
use tapestry_core::engine::{EngineConfig, Mode};
use tapestry_core::federation::Federation;
use tapestry_core::model::{
    ADAM_EPS, Architecture, InnerOptimizer, ModelSpec, TEXT_ADAM_EPS, TrainConfig,
};
use tapestry_core::outer::OuterOptimizer;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The model this node trains.
    pub model_id: String,
    /// The region (swarm) it joins.
    pub region: String,
    /// Listen addresses (multiaddrs).
    pub listen: Vec<String>,
    /// Peers to join at start (multiaddrs ending in `/p2p/<peer id>`).
    pub bootstrap: Vec<String>,
    /// The HTTP API address.
    pub api: String,
    /// Discover peers on the local network.
    pub mdns: bool,
    /// Serve as a relay for peers behind NAT (within `[relay_limits]`):
    /// for a region's public bootstrap nodes.
    pub relay_server: bool,
    /// Relays to listen through, as multiaddrs ending in `/p2p/<relay
    /// peer id>`: for a node behind NAT, reachable through them (and then
    /// directly, when hole punching works).
    pub relays: Vec<String>,
    /// What this node allows as a relay server.
    pub relay_limits: RelayLimitsSection,
    /// A permissioned region's roster file (`tapestry region new/add`);
    /// empty for an open region.
    pub roster: String,
    /// The region key (node id hex) that must have signed the roster.
    pub region_key: String,
    /// Distinct roster members that must vouch for a version this node
    /// cannot recompute (0: more than a third of the roster; at least 2).
    pub attestations: usize,
    /// The model.
    pub model: ModelSection,
    /// The node's private data.
    pub data: DataSection,
    /// Local training.
    pub training: TrainingSection,
    /// Rounds.
    pub round: RoundSection,
    /// What the node keeps on disk.
    pub store: StoreSection,
    /// Mixing this region's model with neighbouring regions'.
    pub federation: FederationSection,
}

/// `[federation]`: every `every` rounds the region's agreed head is mixed
/// with the agreed heads of its neighbours in a graph of regions (see
/// `tapestry_core::federation`). Off while `every` is 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationSection {
    /// Heads are mixed after every round that is a multiple of this (`0`:
    /// the region does not federate).
    pub every: u64,
    /// The graph of regions, the same on every member of every region in
    /// it: undirected edges between region names, `[["a", "b"], ...]`.
    pub edges: Vec<(String, String)>,
    /// Each foreign head's difference from the own head is clipped to this
    /// L2 radius (`0`: not clipped).
    pub clip: f32,
    /// How long a node waits for foreign heads after its region's head of a
    /// mix round before it trains on without the missing ones.
    pub wait_ms: u64,
    /// This region's neighbours in the graph, each with its roster: a
    /// foreign head is taken on the attestations of its region's members.
    #[serde(rename = "neighbour")]
    pub neighbours: Vec<NeighbourSection>,
}

impl Default for FederationSection {
    fn default() -> Self {
        Self {
            every: 0,
            edges: Vec::new(),
            clip: 0.0,
            wait_ms: 5_000,
            neighbours: Vec::new(),
        }
    }
}

/// The edges of a graph of regions: `ring` (each region with the next,
/// the last with the first; one edge for two regions) or `complete`
/// (every pair).
pub fn graph_edges(names: &[String], graph: &str) -> Result<Vec<(String, String)>, String> {
    let k = names.len();
    match graph {
        "complete" => Ok((0..k)
            .flat_map(|a| ((a + 1)..k).map(move |b| (a, b)))
            .map(|(a, b)| (names[a].clone(), names[b].clone()))
            .collect()),
        "ring" if k == 2 => Ok(vec![(names[0].clone(), names[1].clone())]),
        "ring" => Ok((0..k)
            .map(|a| (names[a].clone(), names[(a + 1) % k].clone()))
            .collect()),
        g => Err(format!("graph {g:?}: ring or complete")),
    }
}

/// `[[federation.neighbour]]`: a neighbouring region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeighbourSection {
    /// Its name.
    pub region: String,
    /// Its roster file (signed by its region key).
    pub roster: String,
    /// Its region key (node id hex).
    pub region_key: String,
    /// Distinct members of its roster that must vouch for its head (0:
    /// more than a third of its roster; never fewer than 2).
    #[serde(default)]
    pub attestations: usize,
}

/// `[relay_limits]`: what a relay server allows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayLimitsSection {
    /// Peers listening through this relay at once.
    pub max_reservations: usize,
    /// Relayed connections at once.
    pub max_circuits: usize,
    /// Relayed connections at once per peer.
    pub max_circuits_per_peer: usize,
    /// A relayed connection is closed after this many seconds.
    pub circuit_seconds: u64,
    /// A relayed connection is closed after this many MiB.
    pub circuit_mb: u64,
}

impl Default for RelayLimitsSection {
    fn default() -> Self {
        Self {
            max_reservations: 128,
            max_circuits: 64,
            max_circuits_per_peer: 8,
            circuit_seconds: 1800,
            circuit_mb: 1024,
        }
    }
}

/// `[store]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// The head's version and those of the `keep_versions` rounds before
    /// it are kept, with their deltas; older versions are collected (`0`:
    /// keep everything). With a quota, fewer rounds are kept when that
    /// many would not fit in 70 % of it (never fewer than 2).
    pub keep_versions: u64,
    /// Most MiB the store may occupy (`0`: no quota, only the disk's
    /// size). Above 90 % of it the node serves what it holds but takes no
    /// new data, until collection brings it under 80 %.
    pub quota_mb: u64,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            keep_versions: 256,
            quota_mb: 0,
        }
    }
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// `logistic` or `mlp:W1,W2,...`.
    #[serde(with = "text::architecture")]
    pub architecture: Architecture,
    /// Input features.
    pub inputs: usize,
    /// Classes.
    pub classes: usize,
    /// Seed of the initial parameters (the same on every node of a region).
    pub seed: u64,
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// A CSV file (`.csv` or `.csv.gz`, label in the last column).
    pub path: String,
    /// Fraction held out for evaluation.
    pub test_fraction: f64,
    /// Features are scaled from `[feature_min, feature_max]` to `[-1, 1]`
    /// (values outside the range are not clipped).
    pub feature_min: f32,
    /// See `feature_min`.
    pub feature_max: f32,
}

/// `[training]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingSection {
    /// Inner steps per round.
    pub local_steps: usize,
    /// Rows per step.
    pub batch_size: usize,
    /// The inner optimiser: `sgd` (momentum 0.9) or `adamw`.
    pub optimizer: String,
    /// Learning rate.
    pub lr: f32,
    /// AdamW's decoupled weight decay (unused by `sgd`).
    pub weight_decay: f32,
    /// AdamW's ε (unused by `sgd`): gradients much smaller than it move
    /// their parameter by much less than `lr` a step.
    pub adam_eps: f32,
}

impl TrainingSection {
    /// The defaults written for a language model: AdamW at 3e-3 with
    /// ε = [`TEXT_ADAM_EPS`], 16 windows a step.
    pub fn for_text() -> TrainingSection {
        TrainingSection {
            local_steps: 20,
            batch_size: 16,
            optimizer: "adamw".into(),
            lr: 3e-3,
            weight_decay: 0.0,
            adam_eps: TEXT_ADAM_EPS,
        }
    }
}

/// `[round]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoundSection {
    /// `f32`, `bf16`, `int8[:BLOCK]`, `topk:F`, `topk-bf16:F`, `topk-int8:F`.
    #[serde(with = "text::codec")]
    pub codec: Codec,
    /// `mean`, `trimmed-mean:B`, `median`, `clip:R[:ITER]`, `median-clip[:F[:ITER]]`,
    /// `aligned[:F[:ITER]]`.
    #[serde(with = "text::aggregator")]
    pub aggregator: AggregationRule,
    /// How much each delta weighs: `equal` (one author, one vote) or
    /// `samples:MAX` (its declared sample count, at most MAX).
    #[serde(with = "text::weighting")]
    pub weighting: Weighting,
    /// The outer step on each round's aggregate: `averaging`, `sgd:LR` or
    /// `momentum:LR:MU` (heavy ball, taken on versions).
    #[serde(with = "text::outer")]
    pub outer: OuterOptimizer,
    /// A peer's version more than this many rounds ahead of this node is
    /// refused; catching up means recomputing up to this many rounds.
    pub max_rounds_ahead: u64,
    /// Fraction of known peers whose deltas close a round.
    pub quorum: f64,
    /// A round closes at the latest this long after it started.
    pub timeout_ms: u64,
    /// Stop after this many rounds (`0`: never).
    pub rounds: u64,
    /// Wait for this many peers before the first round (at most
    /// `start_wait_ms`).
    pub start_peers: usize,
    /// Longest wait for `start_peers`.
    pub start_wait_ms: u64,
    /// Shortest time from one round's start to the next's (`0`: back to
    /// back). Keep it below `timeout_ms`. The default (2 s) leaves a small
    /// model's swarm on one head most of the time, so `tapestry status` on
    /// any node shows the same head; rounds whose training and exchange take
    /// longer are not slowed by it.
    pub min_round_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            model_id: "digits".into(),
            region: "default".into(),
            listen: vec![
                "/ip4/0.0.0.0/tcp/4001".into(),
                "/ip4/0.0.0.0/udp/4001/quic-v1".into(),
            ],
            bootstrap: Vec::new(),
            api: "127.0.0.1:7400".into(),
            mdns: false,
            relay_server: false,
            relays: Vec::new(),
            relay_limits: RelayLimitsSection::default(),
            roster: String::new(),
            region_key: String::new(),
            attestations: 0,
            model: ModelSection::default(),
            data: DataSection::default(),
            training: TrainingSection::default(),
            round: RoundSection::default(),
            store: StoreSection::default(),
            federation: FederationSection::default(),
        }
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            architecture: Architecture::Logistic,
            inputs: 64,
            classes: 10,
            seed: 1,
        }
    }
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            path: String::new(),
            test_fraction: 0.2,
            feature_min: 0.0,
            feature_max: 16.0,
        }
    }
}

impl Default for TrainingSection {
    fn default() -> Self {
        Self {
            local_steps: 20,
            batch_size: 32,
            optimizer: "sgd".into(),
            lr: 0.05,
            weight_decay: 0.0,
            adam_eps: ADAM_EPS,
        }
    }
}

impl Default for RoundSection {
    fn default() -> Self {
        Self {
            codec: Codec::F32,
            aggregator: AggregationRule::Mean,
            weighting: Weighting::Equal,
            outer: OuterOptimizer::averaging(),
            max_rounds_ahead: 1024,
            quorum: 1.0,
            timeout_ms: 10_000,
            rounds: 0,
            start_peers: 1,
            start_wait_ms: 10_000,
            min_round_ms: 2_000,
        }
    }
}

/// The commented file `tapestry init` writes.
pub fn commented(model_id: &str, region: &str, architecture: &Architecture) -> String {
    let mut d = Config::default();
    d.model.architecture = architecture.clone();
    if architecture.is_text() {
        d.training = TrainingSection::for_text();
    }
    format!(
        r#"# Tapestry node configuration. Flags and TAPESTRY_* environment variables
# override what is here; unknown keys are errors.

# The model this node trains and the region (swarm) it joins. Every node of a
# region must use the same model section.
model_id = "{model_id}"
region = "{region}"

# Where to listen for peers: TCP (noise + yamux) and QUIC. Open these ports
# (or run behind a relay) to be reachable from other organisations.
listen = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"]

# Peers to join at start, as multiaddrs ending in /p2p/<peer id>, e.g.
# "/dns4/bootstrap.example.org/tcp/4001/p2p/12D3KooW...".
bootstrap = []

# The HTTP API (GET /status, /metrics, /model/head). Keep it on loopback
# unless it sits behind something that controls access.
api = "{api}"

# Find peers on the local network with mDNS (for local and demo setups).
mdns = false

# Behind NAT: relays to listen through (multiaddrs ending in /p2p/<relay id>);
# peers reach this node through them, and hole punching (DCUtR) then tries a
# direct connection. /status says what AutoNAT concluded (reach.nat_status)
# and which connections are relayed.
relays = []
# A public node can relay for the region's nodes behind NAT, within
# [relay_limits] below (what it costs: the relayed traffic, both ways).
relay_server = false

# A permissioned region: the roster file its operator gave you (made with
# tapestry region new / region add) and the region key that signs it.
# Messages from nodes not on the roster are rejected and not forwarded.
# Leave both empty for an open region.
roster = ""
region_key = ""
# A version this node cannot recompute (it is more than
# round.max_rounds_ahead ahead, or its deltas are gone) is adopted only if
# this many distinct roster members vouch for it, each signing the same
# round, parents, deltas and parameters. 0: more than a third of the
# roster. Never fewer than 2: no version is taken on one member's word.
attestations = 0

[model]
# logistic, mlp:W1,W2,... (hidden widths), or
# transformer:LAYERS,WIDTH,HEADS,CONTEXT (a byte-level language model; inputs
# and classes do not apply, and [data] path is text)
architecture = "{arch}"
inputs = {inputs}
classes = {classes}
# Seed of the initial parameters: the same on every node of the region.
seed = {seed}

[data]
# Your private data: a CSV (.csv or .csv.gz) with the label in the last
# column; for a transformer a text file (UTF-8 or fortune format, .gz or not)
# or a directory of them, one per language. It never leaves this machine;
# only parameter deltas do.
path = ""
# Fraction of it held out to evaluate the shared model locally.
test_fraction = {tf}
# Features are scaled from [feature_min, feature_max] to [-1, 1]; part of the
# model definition, so the same on every node.
feature_min = {fmin:?}
feature_max = {fmax:?}

[training]
local_steps = {steps}
# Rows a step (for a transformer: windows of CONTEXT + 1 bytes a step).
batch_size = {batch}
# sgd (momentum 0.9) or adamw (weight decay weight_decay, epsilon adam_eps)
optimizer = "{opt}"
lr = {lr:?}
weight_decay = {wd:?}
adam_eps = {eps:?}

{round_and_store}"#,
        api = d.api,
        arch = d.model.architecture,
        inputs = d.model.inputs,
        classes = d.model.classes,
        seed = d.model.seed,
        tf = d.data.test_fraction,
        fmin = d.data.feature_min,
        fmax = d.data.feature_max,
        steps = d.training.local_steps,
        batch = d.training.batch_size,
        lr = d.training.lr,
        opt = d.training.optimizer,
        wd = d.training.weight_decay,
        eps = d.training.adam_eps,
        round_and_store = commented_rounds(&d),
    )
}

/// The `[round]` and `[store]` sections of [`commented`].
fn commented_rounds(d: &Config) -> String {
    format!(
        r#"[round]
# Delta encoding: f32, bf16, int8[:BLOCK], topk:FRACTION, topk-bf16:FRACTION, topk-int8:FRACTION
codec = "{codec}"
# How deltas are combined: mean, trimmed-mean:BETA, median,
# clip:RADIUS[:ITERATIONS] (centred on the median), median-clip[:F[:I]]
# (radius F x the median distance), aligned[:F[:I]] (median-clip after
# weighing each delta by its alignment with the median; measured in the
# simulator README)
aggregator = "{agg}"
# How much each delta weighs: equal (every author the same; a sample count
# is the sender's word) or samples:MAX (its sample count, capped at MAX).
# The outer step on each round's aggregate: averaging (the new version is
# the mean of the local models), sgd:LR (LR x the mean delta), or
# momentum:LR:MU (heavy ball: also MU x the previous version's step; read
# from the lineage, so every node recomputes it).
outer = "{outer}"
# Every node of a region must use the same aggregator, weighting and outer:
# peers' versions are checked by recomputing them.
weighting = "{weighting}"
# Peers' versions further ahead than this many rounds are refused; a node
# catches up by recomputing every missed round from the deltas (or, in a
# permissioned region, on the attestations of enough members).
max_rounds_ahead = {ahead}
# Fraction of known peers whose deltas close a round early.
quorum = {quorum:?}
# A round closes at the latest this long after it started (ms).
timeout_ms = {timeout}
# Stop after this many rounds (0 = never).
rounds = {rounds}
# Wait for this many peers before the first round, at most start_wait_ms.
start_peers = {start_peers}
start_wait_ms = {start_wait}
# Start a round at most every min_round_ms (0 = back to back, as soon as the
# previous one closes). Keep it below timeout_ms. With a pause between
# rounds the nodes of a swarm show one head most of the time; back to back,
# they are always a little apart while rounds go on.
min_round_ms = {min_round}

[store]
# After every new head the node keeps the head and the versions of the
# keep_versions rounds before it, with their deltas, and collects older versions and
# deltas no longer needed (0 = keep everything). A peer further behind than
# this (a long cut, a long absence) cannot catch up by recomputing from this
# node's store: in a permissioned region it needs members' attestations.
# Disk: about keep_versions x (model + one round's deltas). With a quota, fewer
# rounds are kept when that many would not fit in 70 % of it (never fewer than
# 2); /status says how many in keep_rounds.
keep_versions = {keep}
# Most MiB the store may occupy (0 = no quota: only the disk's size). Above
# 90 % of it, or with the disk out of space, the node keeps serving what it
# holds and keeps its peers, takes no new deltas or versions, and says
# disk_full in /status and tapestry_disk_full in /metrics; it takes data
# again once collection brings the store under 80 % (or the disk has room).
quota_mb = {quota}

[relay_limits]
# Only with relay_server = true: peers listening through this node, relayed
# connections in all and per peer, and each one's lifetime and MiB.
max_reservations = {rres}
max_circuits = {rcirc}
max_circuits_per_peer = {rpeer}
circuit_seconds = {rsecs}
circuit_mb = {rmb}

[federation]
# Mix this region's model with its neighbouring regions' every `every` rounds
# (0 = do not federate): after the region's version of such a round, each
# node asks the neighbours' members for their region's version of that round,
# takes it only if enough of that region's roster vouch for it (attestations
# below), and signs the mix (weights 1 / (1 + the larger degree) in the
# graph); its region's members recompute it. Regions whose heads do not come
# within wait_ms are left out of that mix. Only parameters cross regions:
# never deltas, never data.
every = {every}
# The graph of regions, the same everywhere: [["eu", "us"], ["us", "asia"]].
edges = []
# Clip each foreign head's difference from this region's to this L2 radius
# (0 = no clipping): bounds what one bad region can do to this one.
clip = 0.0
wait_ms = {wait}
# One section per neighbour in the graph, with its roster (from its operator)
# and region key; an open region cannot vouch for its head, so cannot be one.
# [[federation.neighbour]]
# region = "us-east"
# roster = "us-east-roster.cbor"
# region_key = "<node id hex>"
# attestations = 0   # 0: more than a third of its roster, never fewer than 2
"#,
        rres = d.relay_limits.max_reservations,
        rcirc = d.relay_limits.max_circuits,
        rpeer = d.relay_limits.max_circuits_per_peer,
        rsecs = d.relay_limits.circuit_seconds,
        rmb = d.relay_limits.circuit_mb,
        every = d.federation.every,
        wait = d.federation.wait_ms,
        codec = d.round.codec,
        agg = d.round.aggregator,
        weighting = d.round.weighting,
        outer = d.round.outer,
        ahead = d.round.max_rounds_ahead,
        quorum = d.round.quorum,
        timeout = d.round.timeout_ms,
        rounds = d.round.rounds,
        start_peers = d.round.start_peers,
        start_wait = d.round.start_wait_ms,
        min_round = d.round.min_round_ms,
        keep = d.store.keep_versions,
        quota = d.store.quota_mb,
    )
}

/// Why a configuration cannot be used. The message names the file or the
/// setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration (unknown keys
    /// included).
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong, on one line.
        message: String,
    },
    /// A setting is out of range or does not parse.
    #[error("{0}")]
    Invalid(String),
}

/// The longest `model_id` or `region`.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a `model_id` or `region`: 1 to [`MAX_NAME_LEN`] ASCII letters,
/// digits, `.`, `_` or `-`. Both are parts of the gossip topic names
/// (`/tapestry/1/MODEL/REGION/...`), so a `/` in one could make two
/// regions share a topic.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?}: 1 to {MAX_NAME_LEN} ASCII letters, digits, '.', '_' or '-'"
        ))
    }
}

impl Config {
    /// Reads `path`; a missing file is an error naming it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().replace('\n', " "),
        })?;
        cfg.check().map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        Ok(cfg)
    }

    /// The checks one setting alone or the file as a whole allows (those
    /// that flags can change are made where the settings are used).
    fn check(&self) -> Result<(), String> {
        check_name("model_id", &self.model_id)?;
        self.train().map_err(|e| e.to_string())?;
        check_name("region", &self.region)?;
        self.federation().map_err(|e| e.to_string())?;
        let r = &self.relay_limits;
        if r.max_reservations == 0
            || r.max_circuits == 0
            || r.max_circuits_per_peer == 0
            || r.circuit_seconds == 0
            || r.circuit_mb == 0
        {
            return Err("every [relay_limits] setting must be at least 1".into());
        }
        let d = &self.data;
        if !(d.feature_min.is_finite()
            && d.feature_max.is_finite()
            && d.feature_min < d.feature_max)
        {
            return Err(format!(
                "feature_min {} must be below feature_max {} (both finite)",
                d.feature_min, d.feature_max
            ));
        }
        if self.round.max_rounds_ahead == 0 {
            return Err(
                "max_rounds_ahead must be at least 1 (0 would refuse every peer's next round)"
                    .into(),
            );
        }
        if self.region_key.is_empty() != self.roster.is_empty() {
            return Err(
                "a permissioned region needs both roster and region_key (an open region neither)"
                    .into(),
            );
        }
        Ok(())
    }

    /// The model.
    pub fn spec(&self) -> Result<ModelSpec, ConfigError> {
        let (inputs, classes) = (self.model.inputs, self.model.classes);
        if self.model.architecture.is_text() {
            // Bytes in, bytes out: `inputs` and `classes` do not apply.
            return Ok(self.model.architecture.spec(inputs, classes));
        }
        if inputs == 0 || classes < 2 {
            return Err(ConfigError::Invalid(
                "model needs inputs ≥ 1 and classes ≥ 2".into(),
            ));
        }
        Ok(self.model.architecture.spec(inputs, classes))
    }

    /// The round engine's settings for a node with this `seed`.
    pub fn engine(&self, seed: u64) -> Result<EngineConfig, ConfigError> {
        let r = &self.round;
        if !(r.quorum > 0.0 && r.quorum <= 1.0) {
            return Err(ConfigError::Invalid(format!(
                "quorum {} outside (0, 1]",
                r.quorum
            )));
        }
        if r.timeout_ms == 0 {
            return Err(ConfigError::Invalid("timeout_ms must be positive".into()));
        }
        if r.min_round_ms >= r.timeout_ms {
            return Err(ConfigError::Invalid(format!(
                "min_round_ms {} must be below timeout_ms {}: rounds would close before this node trains",
                r.min_round_ms, r.timeout_ms
            )));
        }
        Ok(EngineConfig {
            model_id: self.model_id.clone(),
            region: self.region.clone(),
            spec: self.spec()?,
            codec: r.codec,
            chunk_size: tapestry_protocol::DEFAULT_CHUNK_SIZE,
            rule: r.aggregator,
            outer: r.outer,
            federation: self.federation()?,
            quorum: r.quorum,
            round_timeout_ms: r.timeout_ms,
            door: DoorConfig {
                weighting: r.weighting,
                max_rounds_ahead: r.max_rounds_ahead,
                ..DoorConfig::default()
            },
            mode: Mode::Broadcast,
            seed,
        })
    }

    /// Local training settings.
    pub fn train(&self) -> Result<TrainConfig, ConfigError> {
        let t = &self.training;
        if t.local_steps == 0 || t.batch_size == 0 || !(t.lr > 0.0 && t.lr.is_finite()) {
            return Err(ConfigError::Invalid(
                "training needs local_steps ≥ 1, batch_size ≥ 1 and lr > 0".into(),
            ));
        }
        if !(t.weight_decay >= 0.0 && t.weight_decay.is_finite()) {
            return Err(ConfigError::Invalid(format!(
                "training.weight_decay {} must be finite and ≥ 0",
                t.weight_decay
            )));
        }
        if !(t.adam_eps > 0.0 && t.adam_eps.is_finite()) {
            return Err(ConfigError::Invalid(format!(
                "training.adam_eps {} must be finite and > 0",
                t.adam_eps
            )));
        }
        let optimizer = match t.optimizer.as_str() {
            "sgd" => InnerOptimizer::SgdMomentum {
                lr: t.lr,
                momentum: 0.9,
            },
            "adamw" => InnerOptimizer::AdamW {
                lr: t.lr,
                weight_decay: t.weight_decay,
                eps: t.adam_eps,
            },
            other => {
                return Err(ConfigError::Invalid(format!(
                    "training.optimizer {other:?}: sgd or adamw"
                )));
            }
        };
        Ok(TrainConfig {
            local_steps: t.local_steps,
            batch_size: t.batch_size,
            optimizer,
        })
    }

    /// The federation of regions this region takes part in (`None`: it
    /// does not federate), checked: a graph with this region in it, a
    /// neighbour section for each of its neighbours and for no other.
    pub fn federation(&self) -> Result<Option<Federation>, ConfigError> {
        let f = &self.federation;
        if f.every == 0 {
            if !f.edges.is_empty() || !f.neighbours.is_empty() {
                return Err(ConfigError::Invalid(
                    "federation.edges and federation.neighbour need federation.every ≥ 1".into(),
                ));
            }
            return Ok(None);
        }
        let fed = Federation {
            every: f.every,
            edges: f.edges.clone(),
            clip: (f.clip != 0.0).then_some(f.clip),
            wait_ms: f.wait_ms,
        };
        let bad = |m: String| ConfigError::Invalid(format!("federation: {m}"));
        fed.validate().map_err(bad)?;
        for (a, b) in &f.edges {
            check_name("federation.edges", a).map_err(bad)?;
            check_name("federation.edges", b).map_err(bad)?;
        }
        if f.wait_ms == 0 {
            return Err(bad("wait_ms must be positive".into()));
        }
        let neighbours = fed.neighbours(&self.region);
        if neighbours.is_empty() {
            return Err(bad(format!(
                "region {:?} has no neighbour in the graph (edges)",
                self.region
            )));
        }
        for n in &neighbours {
            if !f.neighbours.iter().any(|s| s.region == *n) {
                return Err(bad(format!(
                    "neighbour {n:?} needs a [[federation.neighbour]] section with its roster and region key"
                )));
            }
        }
        for s in &f.neighbours {
            if !neighbours.contains(s.region.as_str()) {
                return Err(bad(format!(
                    "[[federation.neighbour]] {:?} is not a neighbour of {:?} in the graph (edges)",
                    s.region, self.region
                )));
            }
            if f.neighbours.iter().filter(|o| o.region == s.region).count() > 1 {
                return Err(bad(format!("two sections for neighbour {:?}", s.region)));
            }
            if s.roster.is_empty() || s.region_key.is_empty() {
                return Err(bad(format!(
                    "neighbour {:?} needs its roster and region_key (an open region cannot vouch for its head)",
                    s.region
                )));
            }
        }
        Ok(Some(fed))
    }

    /// The relay server's limits, if this node is one.
    pub fn relay_limits(&self) -> Option<crate::net::RelayLimits> {
        let r = &self.relay_limits;
        self.relay_server.then_some(crate::net::RelayLimits {
            max_reservations: r.max_reservations,
            max_circuits: r.max_circuits,
            max_circuits_per_peer: r.max_circuits_per_peer,
            circuit_duration: Duration::from_secs(r.circuit_seconds),
            circuit_bytes: r.circuit_mb.saturating_mul(1 << 20),
        })
    }

    /// The API address.
    pub fn api_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.api.parse().map_err(|_| {
            ConfigError::Invalid(format!("api address {:?} is not HOST:PORT", self.api))
        })
    }

    /// How long to wait for the first peers.
    pub fn start_wait(&self) -> Duration {
        Duration::from_millis(self.round.start_wait_ms)
    }
}

/// Files of a node's data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    /// The directory.
    pub root: PathBuf,
}

impl DataDir {
    /// The identity key file (0600).
    pub fn key(&self) -> PathBuf {
        self.root.join("node.key")
    }
    /// The configuration.
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    /// The node's last announced delta (so a restart does not vote twice).
    pub fn last_vote(&self) -> PathBuf {
        self.root.join("last-vote")
    }
    /// Peers' last sequence numbers (so a restart still refuses replays).
    pub fn sequences(&self) -> PathBuf {
        self.root.join("sequences.cbor")
    }
    /// The chunk store.
    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }
    /// Where a running node writes its peer id, API and listen addresses.
    pub fn endpoints(&self) -> PathBuf {
        self.root.join("endpoints.json")
    }
}

/// Settings written as text in the file (`codec = "int8:256"`) and held
/// parsed: a typo is an error when the file is read, naming the key.
mod text {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: Display, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }

    pub fn parse<'de, T, D>(d: D, key: &str) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("{key}: {e}")))
    }

    macro_rules! field {
        ($key:ident, $ty:ty) => {
            pub mod $key {
                pub use super::serialize;
                pub fn deserialize<'de, D: serde::Deserializer<'de>>(
                    d: D,
                ) -> Result<$ty, D::Error> {
                    super::parse(d, stringify!($key))
                }
            }
        };
    }
    field!(architecture, tapestry_core::model::Architecture);
    field!(codec, tapestry_protocol::Codec);
    field!(aggregator, tapestry_core::aggregate::AggregationRule);
    field!(weighting, tapestry_core::door::Weighting);
    field!(outer, tapestry_core::outer::OuterOptimizer);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_commented_file_is_the_defaults_and_typos_are_errors() {
        let text = commented("digits", "default", &Architecture::Logistic);
        let parsed: Config = toml::from_str(&text).unwrap();
        assert_eq!(parsed, Config::default());
        parsed.engine(1).unwrap();
        parsed.train().unwrap();
        let bad = format!("{text}\n[extra]\nwobble = 1\n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, bad).unwrap();
        let err = Config::load(&path).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        let err = err.to_string();
        assert!(err.contains("extra") || err.contains("unknown"), "{err}");
        let odd = text.replace("outer = \"averaging\"", "outer = \"nesterov:0.7:0.9\"");
        assert_ne!(odd, text);
        std::fs::write(&path, odd).unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("outer") && err.contains("nesterov"), "{err}");
        let loud = text.replace("aggregator = \"mean\"", "aggregator = \"loudest\"");
        assert_ne!(loud, text);
        std::fs::write(&path, loud).unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("aggregator"), "{err}");
    }

    #[test]
    fn a_language_model_config_trains_a_transformer_with_adamw() {
        let arch: Architecture = "transformer:2,32,4,32".parse().unwrap();
        let text = commented("bytes", "default", &arch);
        let parsed: Config = toml::from_str(&text).unwrap();
        assert_eq!(parsed.model.architecture, arch);
        let spec = parsed.spec().unwrap();
        assert_eq!(spec.transformer().map(|t| t.width), Some(32));
        assert!(matches!(
            parsed.train().unwrap().optimizer,
            InnerOptimizer::AdamW { .. }
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text.replace("\"adamw\"", "\"adam\"")).unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("optimizer"), "{err}");
        let bad = text.replace("transformer:2,32,4,32", "transformer:2,30,4,32");
        std::fs::write(&path, bad).unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("multiple of heads"), "{err}");
    }

    #[test]
    fn federation_settings_are_checked_against_the_graph() {
        let text = commented("digits", "east", &Architecture::Logistic);
        let parsed: Config = toml::from_str(&text).unwrap();
        assert_eq!(parsed.federation().unwrap(), None);
        let key = "ab".repeat(32);
        let neighbour = |region: &str| {
            format!(
                "\n[[federation.neighbour]]\nregion = \"{region}\"\nroster = \"r.cbor\"\nregion_key = \"{key}\"\n"
            )
        };
        let on = text
            .replace("every = 0", "every = 3")
            .replace(
                "edges = []",
                "edges = [[\"east\", \"west\"], [\"west\", \"south\"]]",
            )
            .replace("clip = 0.0", "clip = 2.5");
        let good: Config = toml::from_str(&format!("{on}{}", neighbour("west"))).unwrap();
        good.check().unwrap();
        let fed = good.engine(1).unwrap().federation.unwrap();
        assert_eq!((fed.every, fed.clip, fed.wait_ms), (3, Some(2.5), 5_000));
        assert_eq!(fed.weight("east", "west"), Some(1.0 / 3.0));
        let refused = |text: String, says: &str| {
            let c: Config = toml::from_str(&text).unwrap();
            let err = c.check().unwrap_err();
            assert!(err.contains(says), "{err}");
        };
        // A neighbour without its roster, one that is not a neighbour, a
        // region outside the graph, a graph without a cadence.
        refused(on.clone(), "\"west\" needs a [[federation.neighbour]]");
        refused(
            format!("{on}{}{}", neighbour("west"), neighbour("south")),
            "\"south\" is not a neighbour",
        );
        refused(
            format!("{on}{}", neighbour("west")).replace("[\"east\", \"west\"], ", ""),
            "no neighbour in the graph",
        );
        refused(
            format!("{text}{}", neighbour("west")),
            "need federation.every",
        );
        refused(
            format!("{on}{}", neighbour("west")).replace("clip = 2.5", "clip = -1.0"),
            "clipping radius",
        );
        refused(
            format!("{on}{}", neighbour("west"))
                .replace(&format!("region_key = \"{key}\""), "region_key = \"\""),
            "an open region cannot vouch",
        );
    }

    #[test]
    fn settings_that_cannot_work_are_refused_with_the_key_named() {
        let text = commented("digits", "default", &Architecture::Logistic);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let refused = |from: &str, to: &str, key: &str| {
            let changed = text.replacen(from, to, 1);
            assert_ne!(changed, text, "{from}");
            std::fs::write(&path, changed).unwrap();
            let err = Config::load(&path).unwrap_err().to_string();
            assert!(err.contains(key), "{to}: {err}");
        };
        refused("region = \"default\"", "region = \"eu/west\"", "region");
        refused("region = \"default\"", "region = \"\"", "region");
        refused("model_id = \"digits\"", "model_id = \"a b\"", "model_id");
        refused("feature_max = 16.0", "feature_max = 0.0", "feature_min");
        refused(
            "max_rounds_ahead = 1024",
            "max_rounds_ahead = 0",
            "max_rounds_ahead",
        );
        refused(
            "region_key = \"\"",
            &format!("region_key = \"{}\"", "ab".repeat(32)),
            "roster",
        );
        // Fine as written, and names of the allowed characters pass.
        std::fs::write(&path, text.replacen("\"default\"", "\"eu-west_2.a\"", 1)).unwrap();
        assert_eq!(Config::load(&path).unwrap().region, "eu-west_2.a");
        // Pacing that flags may set is checked where the engine is made.
        let mut c = Config::default();
        c.round.min_round_ms = c.round.timeout_ms;
        let err = c.engine(1).unwrap_err().to_string();
        assert!(err.contains("min_round_ms"), "{err}");
        let mut c = Config::default();
        c.training.adam_eps = 0.0;
        let err = c.train().unwrap_err().to_string();
        assert!(
            err.contains("training.adam_eps 0 must be finite and > 0"),
            "{err}"
        );
    }
}
