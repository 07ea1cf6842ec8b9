//! `tapestry-lab cluster`: real `tapestry` processes on this machine, each
//! with its own data directory, keys, data shard and listen address, wired
//! into one region, watched while they train, with scripted kills, restarts
//! and late joiners, and a report in the same shape as `run`'s.
//!
//! Without namespaces nodes listen on 127.0.0.1 ports and network faults
//! are limited to killing and restarting processes. With them (`--netns`,
//! as root on Linux; see [`crate::netns`]) each node has its own network
//! stack and address, and latency, loss and partitions between nodes are
//! real.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tapestry_core::data::{self, CsvOptions, Dataset, Partition};
use tapestry_core::mixing::consensus_distance;
use tapestry_core::model::import_safetensors;
use tapestry_node::config::{
    Config, DataSection, FederationSection, ModelSection, NeighbourSection, RoundSection,
};

use crate::error::{EventProblem, LabError};
use crate::netns::{Lab, LinkFaults, NatKind, RegionLinks};
use crate::process::NodeProcess;
use tapestry_sim::plot::{self, Series};
use tapestry_sim::report::Final;
use tapestry_sim::scenario::parse_duration_ms;
use tapestry_sim::world::SwarmFigures;

/// Something that happens to a node, or the network, during the run.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterEvent {
    /// SIGKILL node `node` at `at_ms`; start it again at `restart_ms`.
    Kill {
        /// The node.
        node: usize,
        /// When it is killed.
        at_ms: u64,
        /// When it is started again (never if `None`).
        restart_ms: Option<u64>,
    },
    /// Node `node` is started only at `at_ms`.
    Join {
        /// The node.
        node: usize,
        /// When it starts.
        at_ms: u64,
    },
    /// The network is cut between sides from `at_ms` to `heal_ms`
    /// (`sides[i]` is node i's side). Needs namespaces.
    Cut {
        /// Each node's side.
        sides: Vec<u8>,
        /// When the cut starts.
        at_ms: u64,
        /// When it heals.
        heal_ms: u64,
    },
}

impl ClusterEvent {
    /// `kill:N@T[-T2]`, `join:N@T` or `cut:A|B@T-T2` (times like `3s`,
    /// `1500ms`; `A` and `B` node lists like `0,1,2`; `cut:3,4@T-T2` cuts
    /// nodes 3 and 4 off from the rest).
    pub fn parse(s: &str, nodes: usize) -> Result<ClusterEvent, LabError> {
        let bad = |problem| LabError::Event {
            event: s.to_owned(),
            problem,
        };
        let duration = |t| parse_duration_ms(t).map_err(|e| bad(EventProblem::Duration(e)));
        let (kind, rest) = s.split_once(':').ok_or_else(|| bad(EventProblem::NoKind))?;
        let (node, when) = rest
            .split_once('@')
            .ok_or_else(|| bad(EventProblem::NoAt))?;
        if kind == "cut" {
            let mut sides = vec![0u8; nodes];
            let groups: Vec<&str> = node.split('|').collect();
            if groups.len() > 2 {
                return Err(bad(EventProblem::TooManySides));
            }
            for (k, g) in groups.iter().enumerate() {
                for n in g.split(',') {
                    let n: usize = n
                        .trim()
                        .parse()
                        .map_err(|_| bad(EventProblem::SideNodeNotANumber))?;
                    if n >= nodes {
                        return Err(bad(EventProblem::NoSuchNode { node: n, nodes }));
                    }
                    sides[n] = if groups.len() == 1 { 1 } else { k as u8 };
                }
            }
            if groups.len() == 2 {
                let listed = groups.iter().flat_map(|g| g.split(',')).count();
                if listed != nodes {
                    return Err(bad(EventProblem::NodesLeftOut));
                }
            }
            if sides.iter().all(|s| *s == sides[0]) {
                return Err(bad(EventProblem::EmptySide));
            }
            let (a, b) = when
                .split_once('-')
                .ok_or_else(|| bad(EventProblem::NoHeal))?;
            let at_ms = duration(a)?;
            let heal_ms = duration(b)?;
            if heal_ms <= at_ms {
                return Err(bad(EventProblem::HealsBeforeCut));
            }
            return Ok(ClusterEvent::Cut {
                sides,
                at_ms,
                heal_ms,
            });
        }
        let node: usize = node
            .parse()
            .map_err(|_| bad(EventProblem::NodeNotANumber))?;
        if node >= nodes {
            return Err(bad(EventProblem::NoSuchNode { node, nodes }));
        }
        match kind {
            "kill" => {
                let (at, restart) = match when.split_once('-') {
                    Some((a, b)) => (a, Some(b)),
                    None => (when, None),
                };
                let at_ms = duration(at)?;
                let restart_ms = restart.map(duration).transpose()?;
                if restart_ms.is_some_and(|r| r <= at_ms) {
                    return Err(bad(EventProblem::RestartBeforeKill));
                }
                if node == 0 {
                    return Err(bad(EventProblem::KillBootstrap));
                }
                Ok(ClusterEvent::Kill {
                    node,
                    at_ms,
                    restart_ms,
                })
            }
            "join" => {
                if node == 0 {
                    return Err(bad(EventProblem::JoinBootstrap));
                }
                Ok(ClusterEvent::Join {
                    node,
                    at_ms: duration(when)?,
                })
            }
            _ => Err(bad(EventProblem::UnknownKind)),
        }
    }
}

/// What a cluster run needs.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Nodes.
    pub nodes: usize,
    /// `synthetic` or a CSV file.
    pub data: String,
    /// How rows are dealt to nodes.
    pub partition: Partition,
    /// Rounds each node trains.
    pub rounds: u64,
    /// Seed of the data and the partition.
    pub seed: u64,
    /// Where node directories, the report and the plots go.
    pub out: PathBuf,
    /// The `tapestry` binary.
    pub tapestry: PathBuf,
    /// Scripted events.
    pub events: Vec<ClusterEvent>,
    /// Give up after this long.
    pub timeout: Duration,
    /// Each node in its own network namespace (needs root; see
    /// [`crate::netns`]).
    pub netns: bool,
    /// Latency and loss between nodes (namespaces only).
    pub faults: LinkFaults,
    /// Set from outside (Ctrl-C) to stop the run; everything is torn down.
    pub interrupted: Arc<AtomicBool>,
    /// Regions the nodes are dealt to, in blocks of consecutive nodes
    /// (node i joins region ⌊i·K/N⌋, as the `regions:K` partition deals
    /// classes); all share one network and bootstrap node, each trains its
    /// own model.
    pub regions: usize,
    /// Latency and loss between nodes of different regions (namespaces
    /// only; `faults` are then those within a region).
    pub region_faults: LinkFaults,
    /// Whether and how the regions federate (each region then has a
    /// roster and a region key).
    pub federation: Option<LabFederation>,
    /// Nodes behind NAT (namespaces only), by index; node 0 is then a
    /// relay server, and they listen through it.
    pub nat: Vec<(usize, NatKind)>,
}

impl ClusterOptions {
    /// Node `i`'s place on the network.
    pub fn nat_of(&self, i: usize) -> NatKind {
        self.nat
            .iter()
            .find(|(n, _)| *n == i)
            .map_or(NatKind::Public, |(_, k)| *k)
    }

    /// Whether some node is behind NAT.
    fn any_nat(&self) -> bool {
        self.nat.iter().any(|(_, k)| *k != NatKind::Public)
    }
}

/// How the regions of a cluster run federate.
#[derive(Debug, Clone, PartialEq)]
pub struct LabFederation {
    /// Heads are mixed after every this many rounds.
    pub every: u64,
    /// `ring` or `complete`.
    pub graph: String,
    /// Clipping radius of a foreign head's difference (`None`: none).
    pub clip: Option<f32>,
    /// How long a node waits for foreign heads.
    pub wait_ms: u64,
}

impl LabFederation {
    /// The graph's edges between the regions' names.
    pub fn edges(&self, regions: usize) -> Result<Vec<(String, String)>, String> {
        let names: Vec<String> = (0..regions).map(|r| region_name(r, regions)).collect();
        tapestry_node::config::graph_edges(&names, &self.graph)
            .map_err(|e| format!("federation {e}"))
    }
}

/// The region (index) node `i` of `nodes` joins.
pub fn region_index(i: usize, nodes: usize, regions: usize) -> usize {
    i * regions.max(1) / nodes.max(1)
}

/// The name of region `r`.
fn region_name(r: usize, regions: usize) -> String {
    if regions <= 1 {
        "cluster".into()
    } else {
        format!("region{r}")
    }
}

/// The region node `i` joins.
fn region_of(i: usize, nodes: usize, regions: usize) -> String {
    region_name(region_index(i, nodes, regions), regions)
}

/// Whether the nodes of every region hold one head (each region its own).
fn heads_agree(views: &[NodeView], regions: usize) -> bool {
    let n = views.len();
    (0..regions.max(1)).all(|r| {
        let heads: BTreeSet<&str> = views
            .iter()
            .enumerate()
            .filter(|(i, _)| region_index(*i, n, regions) == r)
            .map(|(_, v)| v.head.as_str())
            .collect();
        heads.len() <= 1
    })
}

/// One node's view at one moment.
#[derive(Debug, Clone)]
pub struct NodeView {
    /// Running now.
    pub up: bool,
    /// Round.
    pub round: u64,
    /// Accuracy on its evaluation split.
    pub accuracy: f64,
    /// Connected peers.
    pub peers: u64,
    /// Finished its rounds.
    pub finished: bool,
    /// Head parameter digest.
    pub head: String,
    /// Full status.
    pub status: Value,
}

fn write_csv(path: &Path, d: &Dataset) -> std::io::Result<()> {
    let mut out = String::new();
    for i in 0..d.len() {
        let row = &d.features[i * d.n_features..(i + 1) * d.n_features];
        for v in row {
            out.push_str(&format!("{v},"));
        }
        out.push_str(&format!("{}\n", d.labels[i]));
    }
    std::fs::write(path, out)
}

/// Starts node `dir` (in network namespace `namespace`, if any), joining
/// through `bootstrap` (if any), listening through `relay` (if any).
fn start(
    tapestry: &Path,
    dir: &Path,
    bootstrap: Option<&str>,
    relay: Option<&str>,
    namespace: Option<&str>,
) -> Result<NodeProcess, LabError> {
    let mut cmd = match namespace {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(tapestry);
            c
        }
        None => Command::new(tapestry),
    };
    // Rounds back to back: the lab measures how fast a swarm goes.
    cmd.args(["run", "--min-round-ms", "0", "--data-dir"])
        .arg(dir);
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    if let Some(r) = relay {
        cmd.args(["--relay", r]);
    }
    NodeProcess::spawn(cmd, dir)
}

/// Runs the cluster; `view` gets every node's state about twice a second.
/// Writes `DIR/report.json`, `DIR/samples.csv`, `DIR/accuracy.png` and
/// `DIR/rounds.png`, and leaves each node's directory (log, store) in
/// `DIR/nodes/`.
pub fn run(o: &ClusterOptions, view: &mut dyn FnMut(f64, &[NodeView])) -> Result<Value, LabError> {
    let started = Instant::now();
    if !o.tapestry.is_file() {
        return Err(LabError::NoBinary(o.tapestry.clone()));
    }
    let nodes_dir = o.out.join("nodes");
    if nodes_dir.exists() {
        std::fs::remove_dir_all(&nodes_dir).map_err(|source| LabError::Clear {
            path: nodes_dir.clone(),
            source,
        })?;
    }
    std::fs::create_dir_all(&nodes_dir).map_err(LabError::io(&nodes_dir))?;
    let lab = if o.netns {
        let links = RegionLinks {
            region: (0..o.nodes)
                .map(|i| region_index(i, o.nodes, o.regions))
                .collect(),
            across: o.region_faults,
        };
        let nat = (0..o.nodes).map(|i| o.nat_of(i)).collect();
        Some(Lab::create_regions(o.nodes, o.faults, links, nat, o.seed)?)
    } else {
        None
    };
    let (dirs, all) = prepare_nodes(o, &nodes_dir, lab.as_ref())?;
    let mut run = Run::start(o, dirs, lab)?;
    let last = loop {
        let now_ms = run.t0.elapsed().as_millis() as u64;
        if o.interrupted.load(Ordering::Relaxed) {
            return Err(LabError::Interrupted);
        }
        run.carry_out_events(now_ms)?;
        let last = run.observe();
        view(run.t0.elapsed().as_secs_f64(), &last);
        let pending = o.events.len() > run.done_events.len() || !run.restarts.is_empty();
        if !pending && last.iter().all(|v| v.up && v.finished) && heads_agree(&last, o.regions) {
            break last;
        }
        if run.t0.elapsed() > o.timeout {
            return Err(LabError::Timeout {
                secs: o.timeout.as_secs(),
                logs: nodes_dir,
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let ended = run.stop_and_check(&all);
    let mut report = run.report(&last, &ended, &all);
    report["wall_seconds"] = json!(started.elapsed().as_secs_f64());
    std::fs::write(
        o.out.join("report.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )
    .map_err(LabError::WriteReport)?;
    let samples = o.out.join("samples.csv");
    std::fs::write(&samples, &run.samples).map_err(LabError::io(&samples))?;
    plot_series(&o.out, &run.series)?;
    Ok(report)
}

/// Deals the data to the nodes and creates each one (`tapestry init`, its
/// shard as `data.csv`, its `config.toml`). Returns the node directories
/// and the pooled data.
fn prepare_nodes(
    o: &ClusterOptions,
    nodes_dir: &Path,
    lab: Option<&Lab>,
) -> Result<(Vec<PathBuf>, Dataset), LabError> {
    // Data: one pool, dealt to the nodes; each node holds out its own split.
    let all = if o.data == "synthetic" {
        data::synthetic_with_separation(o.seed, (400 * o.nodes).max(3000), 20, 10, 0.8)
    } else {
        data::load_csv(Path::new(&o.data), CsvOptions::default()).map_err(|source| {
            LabError::LoadData {
                path: o.data.clone(),
                source,
            }
        })?
    };
    let parts = data::partition(&all, o.nodes, o.partition, o.seed)?;
    let dirs: Vec<PathBuf> = (0..o.nodes)
        .map(|i| nodes_dir.join(format!("node{i}")))
        .collect();
    for (i, d) in dirs.iter().enumerate() {
        let region = region_of(i, o.nodes, o.regions);
        crate::process::init(&o.tapestry, d, &["--region", &region, "--model", "cluster"])?;
        let csv = d.join("data.csv");
        write_csv(&csv, &all.subset(&parts[i])).map_err(LabError::io(&csv))?;
    }
    let rosters = match &o.federation {
        Some(_) => Some(make_rosters(o, &dirs, nodes_dir)?),
        None => None,
    };
    for (i, d) in dirs.iter().enumerate() {
        let mut cfg = node_config(o, i, d, lab, &all);
        if let (Some(f), Some(rosters)) = (&o.federation, &rosters) {
            federate(&mut cfg, o, f, i, rosters).map_err(|message| LabError::Roster {
                region: cfg.region.clone(),
                message,
            })?;
        }
        let text = toml::to_string(&cfg)?;
        let config = d.join("config.toml");
        std::fs::write(&config, text).map_err(LabError::io(&config))?;
    }
    Ok((dirs, all))
}

/// Each region's key and roster (its nodes), in `nodes_dir/../regions/`:
/// per region, the roster file and the region key.
fn make_rosters(
    o: &ClusterOptions,
    dirs: &[PathBuf],
    nodes_dir: &Path,
) -> Result<Vec<(PathBuf, String)>, LabError> {
    let root = nodes_dir.with_file_name("regions");
    if root.exists() {
        std::fs::remove_dir_all(&root).map_err(|source| LabError::Clear {
            path: root.clone(),
            source,
        })?;
    }
    (0..o.regions)
        .map(|r| {
            let name = region_name(r, o.regions);
            let fail = |e: tapestry_node::ops::OpsError| LabError::Roster {
                region: name.clone(),
                message: e.to_string(),
            };
            let dir = root.join(&name);
            let key = tapestry_node::ops::region_new(&dir, "cluster", &name).map_err(fail)?;
            let members = dirs
                .iter()
                .enumerate()
                .filter(|(i, _)| region_index(*i, o.nodes, o.regions) == r)
                .map(|(_, d)| {
                    tapestry_node::ops::read_key(&tapestry_node::config::DataDir {
                        root: d.clone(),
                    })
                    .map(|k| k.node_id())
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(fail)?;
            tapestry_node::ops::region_add(&dir, &members).map_err(fail)?;
            Ok((dir.join("roster.cbor"), key.to_string()))
        })
        .collect()
}

/// Node `i`'s region made permissioned (its roster) and federating with
/// its neighbours in the graph.
fn federate(
    cfg: &mut Config,
    o: &ClusterOptions,
    f: &LabFederation,
    i: usize,
    rosters: &[(PathBuf, String)],
) -> Result<(), String> {
    let own = region_index(i, o.nodes, o.regions);
    let edges = f.edges(o.regions)?;
    let (roster, key) = &rosters[own];
    cfg.roster = roster.display().to_string();
    cfg.region_key = key.clone();
    let me = region_name(own, o.regions);
    let neighbours = (0..o.regions)
        .filter(|r| {
            let n = region_name(*r, o.regions);
            edges
                .iter()
                .any(|(a, b)| (*a == me && *b == n) || (*b == me && *a == n))
        })
        .map(|r| NeighbourSection {
            region: region_name(r, o.regions),
            roster: rosters[r].0.display().to_string(),
            region_key: rosters[r].1.clone(),
            attestations: 0,
        })
        .collect();
    cfg.federation = FederationSection {
        every: f.every,
        edges,
        clip: f.clip.unwrap_or(0.0),
        wait_ms: f.wait_ms,
        neighbours,
    };
    cfg.federation().map_err(|e| e.to_string())?;
    Ok(())
}

/// Node `i`'s configuration: its region, addresses (in its namespace, or
/// any port on 127.0.0.1), the model for the data's shape, the feature
/// range of the pooled data, and rounds that wait for up to two peers of
/// its region.
fn node_config(
    o: &ClusterOptions,
    i: usize,
    dir: &Path,
    lab: Option<&Lab>,
    all: &Dataset,
) -> Config {
    let (lo, hi) = feature_range(all);
    let k = o.regions.max(1);
    let region = region_index(i, o.nodes, k);
    Config {
        model_id: "cluster".into(),
        region: region_of(i, o.nodes, o.regions),
        // The bootstrap node relays for the nodes behind NAT.
        relay_server: i == 0 && lab.is_some() && o.any_nat(),
        listen: vec![match lab {
            Some(l) => format!("/ip4/{}/tcp/4001", l.address(i)),
            None => "/ip4/127.0.0.1/tcp/0".into(),
        }],
        api: match lab {
            Some(l) => format!("{}:8080", l.address(i)),
            None => "127.0.0.1:0".into(),
        },
        model: ModelSection {
            inputs: all.n_features,
            classes: all.n_classes,
            ..ModelSection::default()
        },
        data: DataSection {
            path: dir.join("data.csv").display().to_string(),
            feature_min: lo,
            feature_max: hi,
            ..DataSection::default()
        },
        round: RoundSection {
            rounds: o.rounds,
            start_peers: ((0..o.nodes)
                .filter(|j| region_index(*j, o.nodes, k) == region)
                .count()
                - 1)
            .min(2),
            timeout_ms: 5_000,
            ..RoundSection::default()
        },
        ..Config::default()
    }
}

/// The smallest and largest feature value of the pooled data: the range
/// every node scales its features from.
fn feature_range(all: &Dataset) -> (f32, f32) {
    all.features
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)))
}

/// A running cluster and what has been seen of it. (Processes are stopped
/// before the namespaces go: fields drop in this order.)
struct Run<'a> {
    o: &'a ClusterOptions,
    dirs: Vec<PathBuf>,
    procs: Vec<NodeProcess>,
    lab: Option<Lab>,
    boot: String,
    apis: Vec<Option<String>>,
    t0: Instant,
    done_events: BTreeSet<usize>,
    cut_started: BTreeSet<usize>,
    cut_rounds: BTreeMap<usize, Vec<u64>>,
    cut_heads: Vec<Value>,
    agreed_after_heal: Vec<Value>,
    healed_at: Vec<(usize, f64)>,
    last_views: Vec<NodeView>,
    restarts: Vec<(usize, u64)>,
    samples: String,
    series: Vec<Vec<(f64, f64, f64)>>,
}

/// How the nodes ended: clean exits, clean stores, their exported models.
struct Ended {
    clean_exit: Vec<bool>,
    scrub_clean: Vec<bool>,
    models: Vec<Option<Vec<f32>>>,
}

impl<'a> Run<'a> {
    /// Starts node 0 (the bootstrap node), then every node not scheduled to
    /// join late, through it.
    fn start(
        o: &'a ClusterOptions,
        dirs: Vec<PathBuf>,
        lab: Option<Lab>,
    ) -> Result<Run<'a>, LabError> {
        let mut run = Run {
            o,
            procs: Vec::new(),
            lab,
            boot: String::new(),
            apis: vec![None; o.nodes],
            t0: Instant::now(),
            done_events: BTreeSet::new(),
            cut_started: BTreeSet::new(),
            cut_rounds: BTreeMap::new(),
            cut_heads: Vec::new(),
            agreed_after_heal: Vec::new(),
            healed_at: Vec::new(),
            last_views: Vec::new(),
            restarts: Vec::new(),
            samples: String::from("seconds,node,up,round,accuracy,peers\n"),
            series: vec![Vec::new(); o.nodes],
            dirs,
        };
        let first = run.spawn(0, None)?;
        run.procs.push(first);
        run.boot = run.procs[0]
            .endpoints(Duration::from_secs(60))
            .and_then(|e| e["listen"][0].as_str().map(str::to_owned))
            .ok_or_else(|| LabError::BootstrapDidNotStart(run.dirs[0].join("node.log")))?;
        let joins_late = |i: usize| {
            o.events
                .iter()
                .any(|e| matches!(e, ClusterEvent::Join { node, .. } if *node == i))
        };
        for i in 1..o.nodes {
            let p = if joins_late(i) {
                NodeProcess::idle(&run.dirs[i])
            } else {
                let boot = run.boot.clone();
                run.spawn(i, Some(&boot))?
            };
            run.procs.push(p);
        }
        run.t0 = Instant::now();
        Ok(run)
    }

    /// Starts node `i` (in its namespace, if any); behind NAT, it listens
    /// through node 0, the relay.
    fn spawn(&self, i: usize, bootstrap: Option<&str>) -> Result<NodeProcess, LabError> {
        let ns = self.lab.as_ref().map(|l| l.namespace(i));
        let relay = (self.lab.is_some() && self.o.nat_of(i) != NatKind::Public)
            .then_some(self.boot.as_str());
        start(
            &self.o.tapestry,
            &self.dirs[i],
            bootstrap,
            relay,
            ns.as_deref(),
        )
    }

    /// Kills, restarts, late joins, cuts and heals that fall due by `now_ms`.
    fn carry_out_events(&mut self, now_ms: u64) -> Result<(), LabError> {
        let boot = self.boot.clone();
        for (k, e) in self.o.events.iter().enumerate() {
            match e {
                &ClusterEvent::Kill {
                    node,
                    at_ms,
                    restart_ms,
                } if now_ms >= at_ms && self.done_events.insert(k) => {
                    self.procs[node].kill9();
                    self.apis[node] = None;
                    if let Some(r) = restart_ms {
                        self.restarts.push((node, r));
                    }
                }
                &ClusterEvent::Join { node, at_ms }
                    if now_ms >= at_ms && self.done_events.insert(k) =>
                {
                    self.procs[node] = self.spawn(node, Some(&boot))?;
                }
                ClusterEvent::Cut {
                    sides,
                    at_ms,
                    heal_ms,
                } => self.cut(k, sides, *at_ms, *heal_ms, now_ms),
                _ => {}
            }
        }
        let due: Vec<usize> = self
            .restarts
            .iter()
            .filter(|(_, r)| now_ms >= *r)
            .map(|(n, _)| *n)
            .collect();
        self.restarts.retain(|(_, r)| now_ms < *r);
        for n in due {
            self.procs[n] = self.spawn(n, Some(&boot))?;
        }
        Ok(())
    }

    /// Cut `k` between `sides` from `at_ms` to `heal_ms`: started and
    /// healed when due, with what each node held as it ended.
    fn cut(&mut self, k: usize, sides: &[u8], at_ms: u64, heal_ms: u64, now_ms: u64) {
        if now_ms >= at_ms && self.cut_started.insert(k) {
            self.cut_rounds
                .insert(k, self.last_views.iter().map(|v| v.round).collect());
            if let Some(l) = &self.lab {
                l.cut(sides.to_vec());
            }
        }
        if now_ms >= heal_ms && self.done_events.insert(k) {
            // What each node held as the cut ended: the test of a merge is
            // that the final head descends from both sides' heads.
            self.cut_heads.push(json!({
                "event": k,
                "heads": self.last_views.iter().map(|v| v.status["head"].clone()).collect::<Vec<_>>(),
                "rounds_at_cut": self.cut_rounds.get(&k),
                "rounds": self.last_views.iter().map(|v| v.round).collect::<Vec<_>>(),
            }));
            if let Some(l) = &self.lab {
                l.heal();
            }
            self.healed_at.push((k, self.t0.elapsed().as_secs_f64()));
        }
    }

    /// Every node's status now, recorded in the samples and series; notes
    /// how long after each heal the heads agreed again.
    fn observe(&mut self) -> Vec<NodeView> {
        let mut last = Vec::with_capacity(self.procs.len());
        for (i, p) in self.procs.iter().enumerate() {
            if p.up() && self.apis[i].is_none() {
                self.apis[i] = p
                    .endpoints(Duration::from_millis(10))
                    .and_then(|e| e["api"].as_str().map(str::to_owned));
            }
            let status: Value = self.apis[i]
                .as_deref()
                .filter(|_| p.up())
                .and_then(|a| crate::process::status(a).ok())
                .unwrap_or(Value::Null);
            last.push(NodeView {
                up: p.up() && !status.is_null(),
                round: status["round"].as_u64().unwrap_or(0),
                accuracy: status["accuracy"].as_f64().unwrap_or(0.0),
                peers: status["peers"].as_u64().unwrap_or(0),
                finished: status["finished"].as_bool().unwrap_or(false),
                head: status["head_params"].as_str().unwrap_or("").to_owned(),
                status,
            });
        }
        let secs = self.t0.elapsed().as_secs_f64();
        for (i, v) in last.iter().enumerate() {
            self.samples.push_str(&format!(
                "{secs:.2},{i},{},{},{:.6},{}\n",
                u8::from(v.up),
                v.round,
                v.accuracy,
                v.peers
            ));
            if v.up {
                self.series[i].push((secs, v.accuracy, v.round as f64));
            }
        }
        // How long after each heal all nodes agreed on one head again.
        if heads_agree(&last, self.o.regions) && last.iter().all(|v| v.up) {
            for (k, at) in self.healed_at.drain(..) {
                self.agreed_after_heal.push(json!({
                    "event": k,
                    "seconds": secs - at,
                    "round": last[0].round,
                }));
            }
        }
        self.last_views = last.clone();
        last
    }

    /// Stops every node with SIGTERM, scrubs every store and exports every
    /// model.
    fn stop_and_check(&mut self, all: &Dataset) -> Ended {
        let clean_exit = self
            .procs
            .iter_mut()
            .map(|p| {
                p.terminate(Duration::from_secs(20))
                    .is_some_and(|s| s.success())
            })
            .collect();
        let spec = tapestry_core::model::ModelSpec::Logistic {
            inputs: all.n_features,
            classes: all.n_classes,
        };
        let tapestry = &self.o.tapestry;
        let mut ended = Ended {
            clean_exit,
            scrub_clean: Vec::new(),
            models: Vec::new(),
        };
        for d in &self.dirs {
            let scrub = Command::new(tapestry)
                .args(["scrub", "--data-dir"])
                .arg(d)
                .output();
            ended
                .scrub_clean
                .push(scrub.is_ok_and(|s| s.status.success()));
            let file = d.join("model.safetensors");
            let export = Command::new(tapestry)
                .args(["model", "export", "--data-dir"])
                .arg(d)
                .arg("--out")
                .arg(&file)
                .output();
            ended.models.push(
                export
                    .ok()
                    .filter(|e| e.status.success())
                    .and_then(|_| import_safetensors(&spec, &file).ok()),
            );
        }
        ended
    }

    /// `report.json` (all but `wall_seconds`); `all` is the pooled data
    /// (each region's model is also judged on all of it).
    fn report(&self, last: &[NodeView], ended: &Ended, all: &Dataset) -> Value {
        let o = self.o;
        let accs: Vec<f64> = last.iter().map(|v| v.accuracy).collect();
        let losses: Vec<f64> = last
            .iter()
            .map(|v| v.status["loss"].as_f64().unwrap_or(0.0))
            .collect();
        let bytes: u64 = last
            .iter()
            .map(|v| v.status["bytes_out"].as_u64().unwrap_or(0))
            .sum();
        let k = o.regions.max(1);
        // The pooled data, scaled as the nodes scale theirs: what a
        // region's model knows of every class, not only its own.
        let mut pooled = all.clone();
        let (lo, hi) = feature_range(all);
        tapestry_core::data::Scaler::from_range(all.n_features, lo, hi).apply(&mut pooled);
        let pooled = tapestry_core::model::Examples::Rows(pooled);
        let spec = tapestry_core::model::ModelSpec::Logistic {
            inputs: all.n_features,
            classes: all.n_classes,
        };
        let mut first_models = Vec::new();
        let regions: Vec<Value> = (0..k)
            .map(|r| {
                let members: Vec<usize> = (0..o.nodes)
                    .filter(|i| region_index(*i, o.nodes, k) == r)
                    .collect();
                let views: Vec<NodeView> = members.iter().map(|i| last[*i].clone()).collect();
                let region_models: Vec<Vec<f32>> = members
                    .iter()
                    .filter_map(|i| ended.models.get(*i).cloned().flatten())
                    .collect();
                let global = region_models.first().and_then(|m| {
                    tapestry_core::model::evaluate_on(&spec, m, &pooled)
                        .ok()
                        .and_then(|e| e.accuracy)
                });
                if let Some(m) = region_models.first() {
                    first_models.push(m.clone());
                }
                let sum = |key: &str| -> u64 {
                    views
                        .iter()
                        .map(|v| v.status["federation"][key].as_u64().unwrap_or(0))
                        .sum()
                };
                json!({
                    "region": region_name(r, o.regions),
                    "nodes": members,
                    "heads_agree": heads_agree(&views, 1),
                    "accuracy_mean": views.iter().map(|v| v.accuracy).sum::<f64>() / views.len() as f64,
                    "accuracy_on_all_data": global,
                    "consensus_distance": consensus_distance(&region_models),
                    "mixes_signed": sum("mixes_signed"),
                    "foreign_heads_taken": sum("foreign_heads_taken"),
                })
            })
            .collect();
        let federation = o.federation.as_ref().map(|f| {
            json!({
                "every": f.every,
                "graph": f.graph,
                "clip": f.clip,
                "wait_ms": f.wait_ms,
            })
        });
        let consensus = regions
            .iter()
            .filter_map(|r| r["consensus_distance"].as_f64())
            .fold(0.0, f64::max);
        json!({
            "nodes": o.nodes,
            "rounds": o.rounds,
            "seed": o.seed,
            "data": o.data,
            "events": o.events.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>(),
            "final": Final {
                heads_agree: Some(heads_agree(last, o.regions)),
                ..Final::new(
                    SwarmFigures::over(&accs, &losses, consensus, bytes / o.nodes as u64),
                    o.nodes,
                )
            },
            "regions": regions,
            "federation": federation,
            // How far apart the regions' models ended (one model each).
            "consensus_between_regions": (k > 1).then(|| consensus_distance(&first_models)),
            "per_node": last.iter().map(|v| v.status.clone()).collect::<Vec<_>>(),
            "clean_exit": ended.clean_exit,
            "scrub_clean": ended.scrub_clean,
            "network": match &self.lab {
                Some(l) => {
                    let (forwarded, lost, cut) = l.stats();
                    let (within, across) = l.bytes();
                    json!({
                        "netns": true,
                        "latency_ms": o.faults.latency_ms,
                        "loss": o.faults.loss,
                        "region_latency_ms": o.region_faults.latency_ms,
                        "region_loss": o.region_faults.loss,
                        "packets_forwarded": forwarded,
                        "packets_dropped_loss": lost,
                        "packets_dropped_cut": cut,
                        "packets_dropped_nat": l.dropped_nat(),
                        "nat": (0..o.nodes).map(|i| format!("{:?}", o.nat_of(i)).to_lowercase()).collect::<Vec<_>>(),
                        "bytes_within_regions": within,
                        "bytes_across_regions": across,
                        "cross_region_share": across as f64 / (within + across).max(1) as f64,
                    })
                }
                None => json!({
                    "netns": false,
                    "note": "nodes on 127.0.0.1; faults limited to killing and restarting processes",
                }),
            },
            "cuts": self.cut_heads,
            "agreed_after_heal": self.agreed_after_heal,
        })
    }
}

/// `accuracy.png` and `rounds.png`: each node's accuracy and round over
/// time.
fn plot_series(out: &Path, series: &[Vec<(f64, f64, f64)>]) -> Result<(), LabError> {
    let palette = plot::PALETTE;
    let lines = |pick: fn(&(f64, f64, f64)) -> f64| -> Vec<Series> {
        series
            .iter()
            .enumerate()
            .map(|(i, s)| Series {
                label: format!("node {i}"),
                points: s.iter().map(|p| (p.0, pick(p))).collect(),
                color: palette[i % palette.len()],
                thin: false,
            })
            .collect()
    };
    plot::line_chart(
        &out.join("accuracy.png"),
        "Accuracy of each node's head (its own evaluation split)",
        "seconds",
        "accuracy",
        &lines(|p| p.1),
        Some((0.0, 1.0)),
    )?;
    plot::line_chart(
        &out.join("rounds.png"),
        "Round of each node",
        "seconds",
        "round",
        &lines(|p| p.2),
        None,
    )?;
    Ok(())
}
