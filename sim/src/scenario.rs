//! Scenarios: everything a simulation run depends on, from a TOML file
//! and/or command-line flags, parsed into typed settings up front so a bad
//! value is a one-line error before anything runs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tapestry_core::aggregate::AggregationRule;
use tapestry_core::data::Partition;
use tapestry_core::engine::Mode;
use tapestry_core::federation::Federation;
use tapestry_core::model::Architecture;
use tapestry_core::outer::OuterOptimizer;
use tapestry_protocol::Codec;

use crate::error::{CutProblem, DurationError, ScenarioError};
use crate::topology::Topology;

/// A scenario as written (file keys = flag names with `_` for `-`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// A name for reports.
    pub name: String,
    /// Seed of everything random.
    pub seed: u64,
    /// Number of nodes.
    pub nodes: usize,
    /// Rounds to run.
    pub rounds: u64,
    /// `complete`, `ring`, `random-regular:D`, `small-world:K:P`, `regions:K`.
    pub topology: String,
    /// `broadcast`, `mixing` or `push-sum:FANOUT`.
    pub mode: String,
    /// `synthetic`, the path of a CSV (`.csv`, `.csv.gz`) file, or
    /// `text:PATH`: a corpus file or a directory of them (one per
    /// language), for a `transformer:` model.
    pub data: String,
    /// Rows: `iid`, `dirichlet:ALPHA`, `classes:K` or `regions:K` (region
    /// k of consecutive nodes holds only its classes). Text: `by-file`
    /// (node i holds the files of its group: with more nodes than files,
    /// each file's training text is split among consecutive nodes; with
    /// fewer, each node holds consecutive files) or `iid` (every node an
    /// equal share of every file: the control for `by-file`).
    pub partition: String,
    /// Fraction of the data held out for evaluation.
    pub test_fraction: f64,
    /// `logistic`, `mlp:W1,W2,...` or `transformer:LAYERS,WIDTH,HEADS,CONTEXT`.
    pub model: String,
    /// Inner steps per round.
    pub local_steps: usize,
    /// Rows per inner step.
    pub batch_size: usize,
    /// Inner learning rate.
    pub lr: f32,
    /// Inner optimiser: `sgd` (momentum 0.9) or `adamw` (no weight decay;
    /// what a transformer wants).
    pub optimizer: String,
    /// AdamW's ε (unused by `sgd`).
    pub adam_eps: f32,
    /// Delta codec: `f32`, `bf16`, `int8[:BLOCK]`, `topk:F`, `topk-bf16:F`, `topk-int8:F`.
    pub codec: String,
    /// `mean`, `trimmed-mean:B`, `median`, `clip:R[:ITER]`.
    pub aggregator: String,
    /// The outer step on each round's aggregate: `averaging` (SGD with
    /// rate 1), `sgd:LR` or `momentum:LR:MU` (heavy ball, taken on versions;
    /// broadcast mode only).
    pub outer: String,
    /// How much a delta weighs: `equal` or `samples:MAX`.
    pub weighting: String,
    /// `FRACTION:ATTACK`, e.g. `0.25:sign-flip:10` (see [`Attack`]),
    /// `region:K:ATTACK` (every node of region K attacks: a bad region), or
    /// `0`.
    pub byzantine: String,
    /// Probability that any one message is lost.
    pub loss: f64,
    /// One-way latency of every link, milliseconds.
    pub latency_ms: u64,
    /// Extra latency per message, drawn uniformly from `0..=jitter_ms`.
    pub jitter_ms: u64,
    /// Upload bandwidth of every node in megabits per second (`0` =
    /// unlimited): a node's messages leave one after another, so large
    /// deltas and many receivers take time.
    pub bandwidth_mbps: f64,
    /// `0`, or `FRACTION:PERIOD` (e.g. `0.3:2s`): at the start of every
    /// period a fresh random FRACTION of the nodes goes offline until the
    /// next one; a node that comes back catches up from a peer's model
    /// version.
    pub churn: String,
    /// Network cuts, each `GROUPS@FROM-TO`: GROUPS is `halves`,
    /// `regions:K` or explicit node lists like `0-3,8|4-7` (unlisted nodes
    /// form one more group); FROM and TO are virtual times (`1500`, `1.5s`,
    /// `200ms`). Messages between groups are dropped while the cut lasts.
    pub cuts: Vec<String>,
    /// The last this many rounds skip local training: the nodes only
    /// average (a consensus phase at the end).
    pub consensus_rounds: u64,
    /// Evaluate at most this many honest nodes per round (`0` = all); the
    /// last round always evaluates every honest node. Consensus distance
    /// always uses every honest node.
    pub eval_sample: usize,
    /// Worker threads for training and evaluation (`0` = one per core).
    /// Results do not depend on it.
    pub threads: usize,
    /// Give every node the real chunk store (in-memory backend): published
    /// and fetched payloads, model versions and their manifests go into it,
    /// fetches are served from it, and it is garbage-collected every ten
    /// rounds keeping the head; the report gives what nodes store.
    pub chunk_store: bool,
    /// Also run the baselines (centralized, local-only, plain mean).
    pub baselines: bool,
    /// Regional swarms (broadcast mode): the nodes in this many regions of
    /// consecutive nodes (node i in region ⌊i·K/N⌋), each with its own
    /// genesis, rounds and agreement; `1`: one region.
    pub regions: usize,
    /// Regions mix their agreed heads after every this many rounds
    /// (federation); `0`: regions stay apart.
    pub federation_every: u64,
    /// The graph of regions heads are mixed on: `complete` or `ring`.
    pub federation_graph: String,
    /// Each foreign head's difference from the own head is clipped to this
    /// L2 norm before it is mixed in; `0`: no clipping.
    pub federation_clip: f32,
    /// One-way latency between nodes of different regions, milliseconds
    /// (`0`: the same as `latency_ms`).
    pub region_latency_ms: u64,
    /// Bandwidth of the link between two regions in megabits per second
    /// (`0`: unlimited); messages from one region to another queue on it.
    pub region_bandwidth_mbps: f64,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: "default".into(),
            seed: 7,
            nodes: 8,
            rounds: 20,
            topology: "complete".into(),
            mode: "broadcast".into(),
            data: "synthetic".into(),
            partition: "dirichlet:0.5".into(),
            test_fraction: 0.25,
            model: "logistic".into(),
            local_steps: 10,
            batch_size: 32,
            lr: 0.05,
            optimizer: "sgd".into(),
            adam_eps: tapestry_core::model::ADAM_EPS,
            codec: "f32".into(),
            aggregator: "mean".into(),
            outer: "averaging".into(),
            weighting: "equal".into(),
            byzantine: "0".into(),
            loss: 0.0,
            latency_ms: 20,
            jitter_ms: 0,
            bandwidth_mbps: 0.0,
            churn: "0".into(),
            cuts: Vec::new(),
            consensus_rounds: 0,
            eval_sample: 0,
            threads: 0,
            chunk_store: false,
            baselines: true,
            regions: 1,
            federation_every: 0,
            federation_graph: "complete".into(),
            federation_clip: 0.0,
            region_latency_ms: 0,
            region_bandwidth_mbps: 0.0,
        }
    }
}

/// What Byzantine nodes do with their deltas.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attack {
    /// −k × the honest delta.
    SignFlip(f32),
    /// k × the honest delta.
    Scaled(f32),
    /// The honest delta plus Gaussian noise of this deviation.
    Gaussian(f32),
    /// "A little is enough" (Baruch et al. 2019): mean − z·std of the honest
    /// deltas, coordinate-wise.
    Alie(f32),
    /// Inner-product manipulation (Xie et al. 2020): −ε × the honest mean.
    Ipm(f32),
    /// NaN in every value (the door must refuse it).
    NotANumber,
    /// Re-sends its first delta in every later round.
    StaleReplay,
    /// Never contributes.
    FreeRide,
    /// Trains and sends honest deltas, but announces forged model versions
    /// every round: its head's parent and deltas with other parameters,
    /// and a same-round version naming 64 made-up deltas.
    ForgeVersion,
    /// Announces two-parent "merges" of its head and its head's parent.
    ForgeMerge,
    /// Announces versions five rounds ahead, and of round 2^64 − 2.
    RoundJump,
    /// Sends 20 deltas a round, each −9 × its honest one, claiming 2^64
    /// samples.
    BallotStuffing,
    /// Sends −3 × its honest delta claiming 2^64 samples.
    WeightInflation,
    /// All of forge-version, forge-merge, round-jump, ballot-stuffing and
    /// weight-inflation at once.
    Takeover,
    /// A bad region (with `region:K:poison-head`): its members train and
    /// agree honestly among themselves, but the head they hand to other
    /// regions is forged (its parameters negated and scaled by ten), and
    /// every one of them vouches for it.
    PoisonHead,
}

impl Attack {
    /// Whether it announces forged versions: (made-up versions, merges,
    /// round jumps).
    pub fn forges(&self) -> (bool, bool, bool) {
        match self {
            Attack::ForgeVersion => (true, false, false),
            Attack::ForgeMerge => (false, true, false),
            Attack::RoundJump => (false, false, true),
            Attack::Takeover => (true, true, true),
            _ => (false, false, false),
        }
    }

    /// Deltas it sends per round.
    pub fn copies(&self) -> usize {
        match self {
            Attack::BallotStuffing | Attack::Takeover => 20,
            _ => 1,
        }
    }

    /// Whether its deltas claim 2^64 samples.
    pub fn inflates(&self) -> bool {
        matches!(
            self,
            Attack::BallotStuffing | Attack::WeightInflation | Attack::Takeover
        )
    }
}

impl std::str::FromStr for Attack {
    type Err = ScenarioError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ScenarioError::Attack(s.to_owned());
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a.parse::<f32>().map_err(|_| bad())?)),
            None => (s, None),
        };
        Ok(match (name, arg) {
            ("sign-flip", k) => Attack::SignFlip(k.unwrap_or(1.0)),
            ("scaled", Some(k)) => Attack::Scaled(k),
            ("gaussian", Some(s)) => Attack::Gaussian(s),
            ("alie", z) => Attack::Alie(z.unwrap_or(1.0)),
            ("ipm", e) => Attack::Ipm(e.unwrap_or(0.5)),
            ("nan", None) => Attack::NotANumber,
            ("replay", None) => Attack::StaleReplay,
            ("free-ride", None) => Attack::FreeRide,
            ("forge-version", None) => Attack::ForgeVersion,
            ("forge-merge", None) => Attack::ForgeMerge,
            ("round-jump", None) => Attack::RoundJump,
            ("ballot-stuffing", None) => Attack::BallotStuffing,
            ("weight-inflation", None) => Attack::WeightInflation,
            ("takeover", None) => Attack::Takeover,
            ("poison-head", None) => Attack::PoisonHead,
            _ => return Err(bad()),
        })
    }
}

/// Where the data comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSource {
    /// The built-in seeded set.
    Synthetic,
    /// A CSV file.
    Csv(PathBuf),
    /// Corpus files: one file, or every file of a directory.
    Text(PathBuf),
}

/// A scenario with every field parsed and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The scenario as given (echoed in the report).
    pub scenario: Scenario,
    /// Peer graph.
    pub topology: Topology,
    /// Engine mode.
    pub mode: Mode,
    /// Data.
    pub data: DataSource,
    /// How rows are dealt to the nodes; for text `None` is by file and
    /// `Some(Iid)` an equal share of every file to every node.
    pub partition: Option<Partition>,
    /// Model architecture, given the data's shape (filled in by the world).
    pub model: Architecture,
    /// Codec.
    pub codec: Codec,
    /// Aggregation rule.
    pub aggregator: AggregationRule,
    /// The outer step.
    pub outer: OuterOptimizer,
    /// Delta weights.
    pub weighting: tapestry_core::door::Weighting,
    /// Byzantine nodes: how many and how they attack.
    pub byzantine: Option<(usize, Attack)>,
    /// The region whose every node attacks, if the attackers are a region.
    pub byzantine_region: Option<usize>,
    /// Churn, if any.
    pub churn: Option<Churn>,
    /// Network cuts: for each, the group of every node and the interval.
    pub cuts: Vec<Cut>,
    /// How the regions federate, if there are several and they do.
    pub federation: Option<Federation>,
}

/// The name of region `k` in a run.
pub fn region_name(k: usize) -> String {
    format!("r{k}")
}

/// Nodes going offline and coming back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Churn {
    /// Fraction of the nodes offline during each period.
    pub fraction: f64,
    /// Length of a period, virtual milliseconds.
    pub period_ms: u64,
}

/// A network partition: messages between nodes of different groups are
/// dropped from `from_ms` (inclusive) to `to_ms` (exclusive).
#[derive(Debug, Clone, PartialEq)]
pub struct Cut {
    /// The group of each node.
    pub group: Vec<u32>,
    /// Start, virtual milliseconds.
    pub from_ms: u64,
    /// End, virtual milliseconds.
    pub to_ms: u64,
}

impl Cut {
    /// Whether the cut separates `a` and `b` at time `now_ms`.
    pub fn separates(&self, a: usize, b: usize, now_ms: u64) -> bool {
        (self.from_ms..self.to_ms).contains(&now_ms) && self.group[a] != self.group[b]
    }

    /// Parses `GROUPS@FROM-TO` for `n` nodes.
    pub fn parse(s: &str, n: usize) -> Result<Cut, ScenarioError> {
        let bad = |problem| ScenarioError::Cut {
            cut: s.to_owned(),
            problem,
        };
        let (groups, span) = s.split_once('@').ok_or_else(|| bad(CutProblem::NoAt))?;
        let (from, to) = span
            .split_once('-')
            .ok_or_else(|| bad(CutProblem::NoSpan))?;
        let from_ms = parse_duration_ms(from).map_err(|e| bad(CutProblem::Duration(e)))?;
        let to_ms = parse_duration_ms(to).map_err(|e| bad(CutProblem::Duration(e)))?;
        if to_ms <= from_ms {
            return Err(bad(CutProblem::Backwards));
        }
        let group: Vec<u32> = if groups == "halves" {
            (0..n).map(|v| u32::from(v >= n / 2)).collect()
        } else if let Some(k) = groups.strip_prefix("regions:") {
            let k: usize = k
                .parse()
                .ok()
                .filter(|k| *k > 0)
                .ok_or_else(|| bad(CutProblem::Regions))?;
            (0..n)
                .map(|v| Topology::region_of(v, n, k) as u32)
                .collect()
        } else {
            let lists: Vec<&str> = groups.split('|').collect();
            let mut group = vec![lists.len() as u32; n];
            for (g, list) in lists.iter().enumerate() {
                for item in list.split(',') {
                    let (a, b) = match item.split_once('-') {
                        Some((a, b)) => (a, b),
                        None => (item, item),
                    };
                    let (a, b): (usize, usize) = match (a.trim().parse(), b.trim().parse()) {
                        (Ok(a), Ok(b)) if a <= b => (a, b),
                        _ => return Err(bad(CutProblem::NotANode((*item).to_owned()))),
                    };
                    if b >= n {
                        return Err(bad(CutProblem::NoSuchNode { node: b, nodes: n }));
                    }
                    group[a..=b].fill(g as u32);
                }
            }
            group
        };
        Ok(Cut {
            group,
            from_ms,
            to_ms,
        })
    }
}

/// A virtual duration: `1500` or `1500ms` (milliseconds), `1.5s`, `2m`.
pub fn parse_duration_ms(s: &str) -> Result<u64, DurationError> {
    let s = s.trim();
    let (number, scale) = if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1e3)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60e3)
    } else {
        (s, 1.0)
    };
    match number.parse::<f64>() {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok((v * scale).round() as u64),
        _ => Err(DurationError(s.to_owned())),
    }
}

impl Scenario {
    /// Reads a scenario file; unknown keys are errors.
    pub fn from_toml(text: &str) -> Result<Scenario, ScenarioError> {
        toml::from_str(text).map_err(ScenarioError::Toml)
    }

    /// Parses and checks every field.
    pub fn settings(&self) -> Result<Settings, ScenarioError> {
        if self.nodes == 0 {
            return Err(ScenarioError::NoNodes);
        }
        if self.rounds == 0 {
            return Err(ScenarioError::NoRounds);
        }
        if !(0.0..1.0).contains(&self.loss) {
            return Err(ScenarioError::Loss(self.loss));
        }
        if !(0.0..1.0).contains(&self.test_fraction) || self.test_fraction <= 0.0 {
            return Err(ScenarioError::TestFraction(self.test_fraction));
        }
        if self.local_steps == 0
            || self.batch_size == 0
            || !(self.lr > 0.0 && self.lr.is_finite())
            || !(self.adam_eps > 0.0 && self.adam_eps.is_finite())
        {
            return Err(ScenarioError::Training);
        }
        let mode = parse_mode(&self.mode)?;
        let model: Architecture = self.model.parse()?;
        if !matches!(self.optimizer.as_str(), "sgd" | "adamw") {
            return Err(ScenarioError::Optimizer(self.optimizer.clone()));
        }
        let data = if self.data == "synthetic" {
            DataSource::Synthetic
        } else if let Some(path) = self.data.strip_prefix("text:") {
            let path = PathBuf::from(path);
            if !path.exists() {
                return Err(ScenarioError::NoDataFile(path));
            }
            DataSource::Text(path)
        } else {
            let path = PathBuf::from(&self.data);
            if !path.is_file() {
                return Err(ScenarioError::NoDataFile(path));
            }
            DataSource::Csv(path)
        };
        let text = matches!(data, DataSource::Text(_));
        if text != model.is_text() {
            return Err(ScenarioError::ModelData {
                model: self.model.clone(),
                data: self.data.clone(),
            });
        }
        let partition = if text {
            match self.partition.as_str() {
                "by-file" => None,
                "iid" => Some(Partition::Iid),
                other => return Err(ScenarioError::TextPartition(other.to_owned())),
            }
        } else {
            Some(self.partition.parse()?)
        };
        let (byzantine, byzantine_region) = match self.byzantine.strip_prefix("region:") {
            Some(rest) => {
                let bad = || ScenarioError::Byzantine(self.byzantine.clone());
                let (k, attack) = rest.split_once(':').ok_or_else(bad)?;
                let k: usize = k.parse().map_err(|_| bad())?;
                if k >= self.regions {
                    return Err(ScenarioError::Regions(format!(
                        "byzantine {:?}: there are regions 0 to {}",
                        self.byzantine,
                        self.regions - 1
                    )));
                }
                let size = (0..self.nodes)
                    .filter(|v| Topology::region_of(*v, self.nodes, self.regions) == k)
                    .count();
                (Some((size, attack.parse()?)), Some(k))
            }
            None => (parse_byzantine(&self.byzantine, self.nodes)?, None),
        };
        for b in [self.bandwidth_mbps, self.region_bandwidth_mbps] {
            if !(b >= 0.0 && b.is_finite()) {
                return Err(ScenarioError::Bandwidth(b));
            }
        }
        if self.consensus_rounds >= self.rounds {
            return Err(ScenarioError::ConsensusRounds {
                consensus_rounds: self.consensus_rounds,
                rounds: self.rounds,
            });
        }
        let churn = parse_churn(&self.churn)?;
        let outer = OuterOptimizer::parse(&self.outer).map_err(ScenarioError::Outer)?;
        if outer != OuterOptimizer::averaging() && mode != Mode::Broadcast {
            return Err(ScenarioError::Outer(format!(
                "outer {:?} needs mode broadcast (mixing and push-sum average)",
                self.outer
            )));
        }
        let cuts = self
            .cuts
            .iter()
            .map(|c| Cut::parse(c, self.nodes))
            .collect::<Result<Vec<_>, _>>()?;
        let federation = self.federation(mode)?;
        Ok(Settings {
            scenario: self.clone(),
            topology: self.topology.parse()?,
            mode,
            data,
            partition,
            model,
            codec: self.codec.parse()?,
            aggregator: self.aggregator.parse()?,
            outer,
            weighting: self.weighting.parse()?,
            byzantine,
            byzantine_region,
            churn,
            cuts,
            federation,
        })
    }

    /// Checks the regions and parses the federation settings.
    fn federation(&self, mode: Mode) -> Result<Option<Federation>, ScenarioError> {
        let bad = |why: String| Err(ScenarioError::Regions(why));
        let k = self.regions;
        if k == 0 || k > self.nodes {
            return bad(format!(
                "regions {k}: between 1 and the {} nodes",
                self.nodes
            ));
        }
        if k > 1 && mode != Mode::Broadcast {
            return bad("several regions need mode broadcast".into());
        }
        if self.federation_every == 0 {
            return Ok(None);
        }
        if k < 2 {
            return bad("federation_every needs at least 2 regions".into());
        }
        let names: Vec<String> = (0..k).map(region_name).collect();
        let edges: Vec<(String, String)> = match self.federation_graph.as_str() {
            "complete" => (0..k)
                .flat_map(|a| ((a + 1)..k).map(move |b| (a, b)))
                .map(|(a, b)| (names[a].clone(), names[b].clone()))
                .collect(),
            "ring" if k == 2 => vec![(names[0].clone(), names[1].clone())],
            "ring" => (0..k)
                .map(|a| (names[a].clone(), names[(a + 1) % k].clone()))
                .collect(),
            g => return bad(format!("federation_graph {g:?}: complete or ring")),
        };
        let clip = self.federation_clip;
        if !(clip >= 0.0 && clip.is_finite()) {
            return bad(format!(
                "federation_clip {clip}: 0 (none) or a positive norm"
            ));
        }
        let latency = self.region_latency_ms.max(self.latency_ms) + self.jitter_ms;
        let f = Federation {
            every: self.federation_every,
            edges,
            clip: (clip > 0.0).then_some(clip),
            // Long enough for a slower neighbour's round and the fetch.
            wait_ms: 40 * latency.max(1) + 8 * crate::world::TRAIN_MS,
        };
        f.validate().map_err(ScenarioError::Regions)?;
        Ok(Some(f))
    }
}

/// `broadcast`, `mixing` or `push-sum:FANOUT`.
fn parse_mode(mode: &str) -> Result<Mode, ScenarioError> {
    match mode.split_once(':') {
        None if mode == "broadcast" => Ok(Mode::Broadcast),
        None if mode == "mixing" => Ok(Mode::Mixing),
        Some(("push-sum", f)) => Ok(Mode::PushSum {
            fanout: f
                .parse()
                .map_err(|_| ScenarioError::Fanout(mode.to_owned()))?,
        }),
        _ => Err(ScenarioError::Mode(mode.to_owned())),
    }
}

/// `0` (none) or `FRACTION:ATTACK`: how many of `nodes` attack, and how.
fn parse_byzantine(
    byzantine: &str,
    nodes: usize,
) -> Result<Option<(usize, Attack)>, ScenarioError> {
    if byzantine == "0" || byzantine.is_empty() {
        return Ok(None);
    }
    let (fraction, attack) = byzantine
        .split_once(':')
        .ok_or_else(|| ScenarioError::Byzantine(byzantine.to_owned()))?;
    let fraction: f64 = fraction
        .parse()
        .ok()
        .filter(|f| (0.0..1.0).contains(f))
        .ok_or_else(|| ScenarioError::ByzantineFraction(fraction.to_owned()))?;
    let count = (fraction * nodes as f64).round() as usize;
    Ok(Some((count, attack.parse()?)))
}

/// `0` (none) or `FRACTION:PERIOD`.
fn parse_churn(churn: &str) -> Result<Option<Churn>, ScenarioError> {
    if churn == "0" || churn.is_empty() {
        return Ok(None);
    }
    let bad = || ScenarioError::Churn(churn.to_owned());
    let (f, p) = churn.split_once(':').ok_or_else(bad)?;
    let fraction: f64 = f
        .parse()
        .ok()
        .filter(|f| (0.0..1.0).contains(f))
        .ok_or_else(bad)?;
    let period_ms = parse_duration_ms(p)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(bad)?;
    Ok(Some(Churn {
        fraction,
        period_ms,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_bad_values_name_themselves() {
        Scenario::default().settings().unwrap();
        let err = Scenario::from_toml("nodes = 4\nwobble = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("wobble"), "{err}");
        let s = Scenario {
            byzantine: "0.25:sign-flip:10".into(),
            nodes: 8,
            ..Scenario::default()
        };
        assert_eq!(
            s.settings().unwrap().byzantine,
            Some((2, Attack::SignFlip(10.0)))
        );
        for (field, bad) in [
            (
                "topology",
                Scenario {
                    topology: "torus".into(),
                    ..Scenario::default()
                },
            ),
            (
                "data",
                Scenario {
                    data: "/nonexistent/file.csv".into(),
                    ..Scenario::default()
                },
            ),
            (
                "attack",
                Scenario {
                    byzantine: "0.1:tickle".into(),
                    ..Scenario::default()
                },
            ),
            (
                "mode",
                Scenario {
                    mode: "shout".into(),
                    ..Scenario::default()
                },
            ),
            (
                "codec",
                Scenario {
                    codec: "gzip".into(),
                    ..Scenario::default()
                },
            ),
        ] {
            let err = bad.settings().unwrap_err().to_string();
            assert!(!err.contains('\n'), "{field}: {err}");
        }
    }
}
