//! The simulator's errors. [`ScenarioError`] is a scenario that does not
//! parse or check, found before anything runs (the command's exit code 2);
//! [`SimError`] is a run that fails; [`PlotError`] is a chart that cannot
//! be drawn. Each message is the one line the command prints.

use std::path::PathBuf;

use plotters::drawing::DrawingAreaErrorKind;
use plotters::prelude::{BitMapBackend, DrawingBackend};
use tapestry_core::aggregate::AggregateError;
use tapestry_core::data::DataError;
use tapestry_core::model::{ArchitectureError, ModelError};
use tapestry_protocol::CodecError;
use tapestry_storage::StoreError;

/// Why a simulation run failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The scenario asks for something that cannot be built (a graph that
    /// does not exist); found only when the run starts.
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// The data set could not be read, split or dealt to the nodes.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A baseline's training or an evaluation failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A node's local training failed.
    #[error("node {node} round {round}: {source}")]
    Training {
        /// The node that trained.
        node: usize,
        /// The round it trained for.
        round: u64,
        /// What the model code said.
        source: ModelError,
    },
    /// A node's chunk store refused an operation.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The genesis model could not be signed.
    #[error("could not sign the initial model")]
    Genesis,
    /// The event loop ran past its limit of events: the swarm kept busy
    /// without finishing its rounds.
    #[error("the simulation did not finish (event limit reached)")]
    EventLimit,
    /// Not even the first round was reached by every honest node, so there
    /// are no figures to report.
    #[error("no round completed")]
    NoRoundCompleted,
    /// The output directory could not be created.
    #[error("creating {}: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// An output file could not be written.
    #[error("writing {file}: {source}")]
    Write {
        /// The file's name in the output directory.
        file: &'static str,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The report could not be encoded as JSON.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A chart could not be drawn.
    #[error(transparent)]
    Plot(#[from] PlotError),
}

/// Why a scenario was refused: a value that does not parse or is out of
/// range. Each message names the field or value and what is accepted.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The scenario file is not TOML or has an unknown key.
    #[error("{}", .0.message().replace('\n', " "))]
    Toml(#[source] toml::de::Error),
    /// An experiment file (`tapestry-sim compare`) is malformed: no target,
    /// fewer than two arms, an arm without a name, or an arm's scenario
    /// refused (the message names the arm).
    #[error("{0}")]
    Experiment(String),
    /// `nodes` is 0.
    #[error("nodes must be at least 1")]
    NoNodes,
    /// `rounds` is 0.
    #[error("rounds must be at least 1")]
    NoRounds,
    /// `loss` is not a probability below 1.
    #[error("loss {0} outside [0, 1)")]
    Loss(f64),
    /// `test_fraction` leaves no training or no test rows.
    #[error("test_fraction {0} outside (0, 1)")]
    TestFraction(f64),
    /// `local_steps` or `batch_size` is 0, or `lr` or `adam_eps` is not
    /// positive.
    #[error("local_steps and batch_size must be ≥ 1, lr > 0 and adam_eps > 0")]
    Training,
    /// `mode` is none of the engine's modes.
    #[error("unknown mode {0:?} (broadcast, mixing, push-sum:FANOUT)")]
    Mode(String),
    /// `push-sum:FANOUT` with a fanout that is not a number.
    #[error("bad push-sum fanout in {0:?}")]
    Fanout(String),
    /// `model` is not an architecture.
    #[error("model: {0}")]
    Model(#[from] ArchitectureError),
    /// Bad regions or federation settings.
    #[error("{0}")]
    Regions(String),
    /// A bad `outer` optimiser.
    #[error("{0}")]
    Outer(String),
    /// `optimizer` is neither `sgd` nor `adamw`.
    #[error("optimizer {0:?}: sgd or adamw")]
    Optimizer(String),
    /// A transformer without text, or a classifier with text.
    #[error(
        "model {model:?} does not fit data {data:?}: a transformer trains on text:PATH, logistic and mlp on rows"
    )]
    ModelData {
        /// The model.
        model: String,
        /// The data.
        data: String,
    },
    /// Text data with a partition other than `by-file` or `iid`.
    #[error("partition {0:?}: text is dealt to nodes by-file or iid")]
    TextPartition(String),
    /// `data` names a file that is not there.
    #[error("data file {} does not exist", .0.display())]
    NoDataFile(PathBuf),
    /// `byzantine` is neither `0` nor `FRACTION:ATTACK`.
    #[error("byzantine {0:?} should be FRACTION:ATTACK")]
    Byzantine(String),
    /// The fraction of `FRACTION:ATTACK` is not in [0, 1).
    #[error("byzantine fraction {0:?} outside [0, 1)")]
    ByzantineFraction(String),
    /// The attack of `FRACTION:ATTACK` is not one the simulator knows.
    #[error(
        "unknown attack {0:?} (sign-flip[:K], scaled:K, gaussian:SIGMA, alie[:Z], ipm[:EPS], nan, replay, free-ride, forge-version, forge-merge, round-jump, ballot-stuffing, weight-inflation, takeover)"
    )]
    Attack(String),
    /// `bandwidth_mbps` is negative or not finite.
    #[error("bandwidth_mbps {0} must be ≥ 0 (0 = unlimited)")]
    Bandwidth(f64),
    /// The consensus phase would take every round.
    #[error("consensus_rounds {consensus_rounds} must be below rounds {rounds}")]
    ConsensusRounds {
        /// Rounds of the consensus phase asked for.
        consensus_rounds: u64,
        /// All rounds of the run.
        rounds: u64,
    },
    /// `churn` is neither `0` nor `FRACTION:PERIOD`.
    #[error("bad churn {0:?} (FRACTION:PERIOD, e.g. 0.3:2s, or 0)")]
    Churn(String),
    /// One of `cuts` is not a partition of these nodes.
    #[error("bad cut {cut:?}: {problem} (GROUPS@FROM-TO, e.g. halves@1s-3s)")]
    Cut {
        /// The cut as written.
        cut: String,
        /// What is wrong with it.
        problem: CutProblem,
    },
    /// `topology` is none of the known graphs.
    #[error(
        "unknown topology {0:?} (complete, ring, random-regular:D, small-world:K:P, regions:K)"
    )]
    Topology(String),
    /// `random-regular:D` asks for a graph that does not exist.
    #[error("no {degree}-regular graph on {nodes} nodes (need d < n and n·d even)")]
    NoRegularGraph {
        /// The degree asked for.
        degree: usize,
        /// The swarm's size.
        nodes: usize,
    },
    /// `random-regular:D`: the random construction kept getting stuck.
    #[error("could not draw a {degree}-regular graph on {nodes} nodes")]
    RegularGraphNotDrawn {
        /// The degree asked for.
        degree: usize,
        /// The swarm's size.
        nodes: usize,
    },
    /// `partition` is not a partition scheme.
    #[error(transparent)]
    Partition(#[from] DataError),
    /// `codec` is not a delta codec.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// `aggregator` is not an aggregation rule.
    #[error(transparent)]
    Aggregator(#[from] AggregateError),
    /// `weighting` is not a delta weighting.
    #[error(transparent)]
    Weighting(#[from] tapestry_core::door::WeightingError),
}

/// What is wrong with a cut (`GROUPS@FROM-TO`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CutProblem {
    /// There is no `@` between the groups and the times.
    #[error("no @")]
    NoAt,
    /// The times are not `FROM-TO`.
    #[error("no FROM-TO")]
    NoSpan,
    /// FROM or TO is not a duration.
    #[error(transparent)]
    Duration(#[from] DurationError),
    /// The cut would end before it starts.
    #[error("TO must be after FROM")]
    Backwards,
    /// `regions:K` with K not a positive number.
    #[error("regions:K needs K ≥ 1")]
    Regions,
    /// An item of a node list that is neither a node nor a range `A-B`.
    #[error("{0:?} is not a node or a range")]
    NotANode(String),
    /// A node list names a node the scenario does not have.
    #[error("node {node} does not exist ({nodes} nodes)")]
    NoSuchNode {
        /// The node named.
        node: usize,
        /// The scenario's nodes.
        nodes: usize,
    },
}

/// A virtual duration that does not parse (see
/// [`crate::scenario::parse_duration_ms`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0:?} is not a duration (1500, 1500ms, 1.5s, 2m)")]
pub struct DurationError(pub String);

/// Why a chart could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The font compiled into the binary was refused, so no label can be
    /// drawn.
    #[error("the built-in plot font did not load")]
    Font,
    /// Drawing or writing the PNG failed.
    #[error("plotting {}: {source}", path.display())]
    Draw {
        /// The PNG being drawn.
        path: PathBuf,
        /// What plotters said.
        source: DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>,
    },
}
