//! The lab's errors: [`LabError`] for a cluster run, a node process or the
//! network namespaces that fail, [`EventProblem`] for a scripted event
//! that does not parse, and [`NetnsUnavailable`] for why namespaces cannot
//! be used here. Each message is the one line the command prints.

use std::ffi::OsString;
use std::path::PathBuf;

use tapestry_core::data::DataError;
use tapestry_node::api::ClientError;
use tapestry_sim::{DurationError, PlotError};

/// Why a cluster run, a node process or the namespaces failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// There is no `tapestry` binary to launch where it was looked for.
    #[error(
        "no tapestry binary at {} (build it: cargo build -p tapestry-node, or pass --tapestry)",
        .0.display()
    )]
    NoBinary(PathBuf),
    /// A file or directory could not be read, written or created.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// The node directories of an earlier run in the output directory
    /// could not be removed.
    #[error("cannot clear {}: {source}", path.display())]
    Clear {
        /// The directory.
        path: PathBuf,
        /// What the file system said.
        source: std::io::Error,
    },
    /// `report.json` could not be written.
    #[error("writing report.json: {0}")]
    WriteReport(#[source] std::io::Error),
    /// The report could not be encoded as JSON.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A node's configuration could not be encoded as TOML.
    #[error(transparent)]
    Config(#[from] toml::ser::Error),
    /// A chart could not be drawn.
    #[error(transparent)]
    Plot(#[from] PlotError),
    /// The `tapestry` binary could not be run (for `tapestry init`).
    #[error("cannot run {}: {source}", program.display())]
    Run {
        /// The binary.
        program: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// `tapestry init` refused to create a node (what it printed on
    /// standard error).
    #[error("tapestry init failed: {0}")]
    Init(String),
    /// A node process could not be started.
    #[error("cannot start {program:?}: {source}")]
    Start {
        /// The program (`tapestry`, or `ip` for a node in a namespace).
        program: OsString,
        /// What the system said.
        source: std::io::Error,
    },
    /// A region's key and roster could not be made.
    #[error("the roster of region {region}: {message}")]
    Roster {
        /// The region.
        region: String,
        /// What went wrong.
        message: String,
    },
    /// The bootstrap node wrote no endpoints within a minute; its log says
    /// why.
    #[error("node 0 did not start; see {}", .0.display())]
    BootstrapDidNotStart(PathBuf),
    /// The run was interrupted (Ctrl-C or SIGTERM) and torn down.
    #[error("interrupted; nodes stopped and namespaces removed")]
    Interrupted,
    /// The nodes did not all finish and agree before the timeout.
    #[error(
        "the cluster did not finish within {secs} s; node logs are in {}",
        logs.display()
    )]
    Timeout {
        /// The timeout.
        secs: u64,
        /// The directory of the node directories.
        logs: PathBuf,
    },
    /// The CSV data file could not be loaded.
    #[error("{path}: {source}")]
    LoadData {
        /// The file, as given.
        path: String,
        /// What the loader said.
        source: DataError,
    },
    /// The data could not be dealt to the nodes.
    #[error(transparent)]
    Partition(#[from] DataError),
    /// A node's API did not answer.
    #[error(transparent)]
    Api(#[from] ClientError),
    /// A node's `/status` answer is not JSON.
    #[error("{addr}/status: {source}")]
    Status {
        /// The node's API address.
        addr: String,
        /// What the JSON parser said.
        source: serde_json::Error,
    },
    /// A node's `config.toml` has no such key to set.
    #[error("no {key} in {}", path.display())]
    NoConfigKey {
        /// The key.
        key: String,
        /// The file.
        path: PathBuf,
    },
    /// A scripted event does not parse or does not fit the cluster.
    #[error("bad event {event:?}: {problem} (kill:N@T[-T2], join:N@T, cut:A|B@T-T2)")]
    Event {
        /// The event as written.
        event: String,
        /// What is wrong with it.
        problem: EventProblem,
    },
    /// Network namespaces cannot be made here.
    #[error(transparent)]
    NetnsUnavailable(#[from] NetnsUnavailable),
    /// More nodes than one namespace network has addresses for (the
    /// limit).
    #[error("at most {0} nodes in namespaces")]
    TooManyNodes(usize),
    /// The `ip` command could not be run.
    #[error("ip {command}: {source}")]
    IpCommand {
        /// Its arguments.
        command: String,
        /// What the system said.
        source: std::io::Error,
    },
    /// The `ip` command refused.
    #[error("ip {command}: {stderr}")]
    Ip {
        /// Its arguments.
        command: String,
        /// What it printed on standard error.
        stderr: String,
    },
    /// A TUN device name longer than the kernel takes.
    #[error("interface name {0:?} is too long")]
    TunName(String),
    /// The kernel refused to create a TUN device.
    #[error("TUNSETIFF {name}: {source}")]
    Tun {
        /// The device's name.
        name: String,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// The userspace router between the namespaces could not be started.
    #[error("cannot start the router: {0}")]
    Router(#[source] std::io::Error),
}

impl LabError {
    /// For `map_err`: a file-system error at `path`.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LabError {
        let path = path.into();
        move |source| LabError::Io { path, source }
    }
}

/// What is wrong with a scripted event (`kill:N@T[-T2]`, `join:N@T` or
/// `cut:A|B@T-T2`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EventProblem {
    /// There is no `KIND:` in front.
    #[error("no kind")]
    NoKind,
    /// There is no `@` before the time.
    #[error("no @")]
    NoAt,
    /// The kind is none of `kill`, `join` and `cut`.
    #[error("unknown kind")]
    UnknownKind,
    /// The node of a kill or join is not a number.
    #[error("node is not a number")]
    NodeNotANumber,
    /// A node of a cut's sides is not a number.
    #[error("a node is not a number")]
    SideNodeNotANumber,
    /// The event names a node the cluster does not have.
    #[error("node {node} does not exist ({nodes} nodes)")]
    NoSuchNode {
        /// The node named.
        node: usize,
        /// The cluster's nodes.
        nodes: usize,
    },
    /// A time is not a duration.
    #[error(transparent)]
    Duration(#[from] DurationError),
    /// A cut with more than two sides.
    #[error("at most two sides")]
    TooManySides,
    /// A cut with two sides that leaves nodes out.
    #[error("with two sides, every node must be on one")]
    NodesLeftOut,
    /// A cut with every node on one side.
    #[error("both sides must have nodes")]
    EmptySide,
    /// A cut without the time it heals.
    #[error("a cut needs a heal time: T-T2")]
    NoHeal,
    /// A cut that would heal before it starts.
    #[error("the cut must heal after it starts")]
    HealsBeforeCut,
    /// A restart at or before the kill.
    #[error("the restart must come after the kill")]
    RestartBeforeKill,
    /// A kill of the node everyone joins through.
    #[error("node 0 is the bootstrap node; kill another one")]
    KillBootstrap,
    /// A late join of the node everyone joins through.
    #[error("node 0 is the bootstrap node and starts first")]
    JoinBootstrap,
}

/// Why network namespaces cannot be used on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NetnsUnavailable {
    /// Namespaces are Linux's.
    #[error("network namespaces need Linux")]
    NotLinux,
    /// Creating namespaces and devices takes root.
    #[error("network namespaces need root")]
    NotRoot,
    /// The kernel has no TUN driver (or it is not exposed).
    #[error("no /dev/net/tun")]
    NoTun,
    /// iproute2's `ip` is not installed.
    #[error("no `ip` command (install iproute2)")]
    NoIp,
}
