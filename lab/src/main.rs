//! The `tapestry-lab` command: real `tapestry` processes on this machine.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Run real Tapestry nodes on this machine: several `tapestry` processes
/// (on 127.0.0.1, or as root each in its own network namespace with real
/// latency, loss and cuts), with kills, restarts and late joiners, and a
/// report of how they trained together.
#[derive(Parser)]
#[command(name = "tapestry-lab", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start N real `tapestry` node processes on this machine, watch them
    /// train together, and write DIR/report.json, DIR/samples.csv and plots.
    Cluster(Box<ClusterArgs>),
}

/// `tapestry-lab cluster`'s settings: a scenario file's fields, each also
/// a flag (flags win; events of both are run).
#[derive(Args, serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ClusterArgs {
    /// Scenario file (TOML) with any of the fields below (events as a list
    /// of strings); flags override its fields.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    scenario: Option<PathBuf>,
    /// Nodes to start [default: 5].
    #[arg(long)]
    nodes: Option<usize>,
    /// `synthetic` or a CSV file (.csv or .csv.gz, label in the last
    /// column) [default: synthetic].
    #[arg(long)]
    data: Option<String>,
    /// iid | dirichlet:ALPHA | classes:K | regions:K (each region holds only
    /// its own classes) [default: dirichlet:0.5]
    #[arg(long)]
    partition: Option<String>,
    /// Rounds each node trains [default: 20].
    #[arg(long)]
    rounds: Option<u64>,
    /// Seed of the data and partition [default: 7].
    #[arg(long)]
    seed: Option<u64>,
    /// Where node directories, the report and plots go.
    #[arg(long, value_name = "DIR", required_unless_present = "check_netns")]
    #[serde(skip)]
    out: Option<PathBuf>,
    /// Only say whether network namespaces can be used here (exit 0) or
    /// why not (exit 1), and stop.
    #[arg(long)]
    #[serde(skip)]
    check_netns: bool,
    /// The tapestry binary (default: next to this one).
    #[arg(long, value_name = "PATH", env = "TAPESTRY_BIN")]
    #[serde(skip)]
    tapestry: Option<PathBuf>,
    /// kill:N@T[-T2] (SIGKILL node N at T, restart at T2), join:N@T
    /// (start node N late) or cut:A|B@T-T2 (partition: node lists A and
    /// B cannot reach each other from T to T2; needs --netns); repeat for
    /// several.
    #[arg(long = "event", value_name = "EVENT")]
    #[serde(default)]
    events: Vec<String>,
    /// Regions: consecutive blocks of nodes (node i joins region ⌊i·K/N⌋);
    /// they share the network and the bootstrap node, and each trains its
    /// own model [default: 1].
    #[arg(long)]
    regions: Option<usize>,
    /// Federate the regions: each gets a roster and a region key, and
    /// every N rounds mixes its head with its neighbours' (needs
    /// --regions ≥ 2) [default: 0, no federation].
    #[arg(long, value_name = "N")]
    federate_every: Option<u64>,
    /// The graph of regions: ring or complete [default: ring].
    #[arg(long)]
    federation_graph: Option<String>,
    /// Clip each foreign head's difference to this L2 radius [default: none].
    #[arg(long, value_name = "R")]
    federation_clip: Option<f32>,
    /// How long a node waits for foreign heads, e.g. 5s [default: 5s].
    #[arg(long)]
    federation_wait: Option<String>,
    /// One-way latency between nodes of different regions, e.g. 150ms
    /// (needs --netns) [default: as --latency].
    #[arg(long)]
    region_latency: Option<String>,
    /// Packet loss between nodes of different regions, e.g. 1% (needs
    /// --netns) [default: as --loss].
    #[arg(long)]
    region_loss: Option<String>,
    /// Put each node in its own network namespace, so that latency, loss
    /// and cuts between nodes are real (root on Linux; otherwise nodes run
    /// on 127.0.0.1 and only kills and restarts are possible).
    #[arg(long)]
    #[serde(default)]
    netns: bool,
    /// One-way latency between nodes, e.g. 25ms (needs --netns).
    #[arg(long)]
    latency: Option<String>,
    /// Packet loss between nodes, e.g. 5% or 0.05 (needs --netns).
    #[arg(long)]
    loss: Option<String>,
    /// Put node N behind a NAT of KIND (cone: port-restricted cone;
    /// symmetric), e.g. 3:cone; repeat for several (needs --netns). Node 0,
    /// public, then relays for them, and they listen through it.
    #[arg(long = "nat", value_name = "N:KIND")]
    #[serde(default)]
    nat: Vec<String>,
    /// Give up after this many seconds [default: 600].
    #[arg(long)]
    timeout_secs: Option<u64>,
}

/// [`ClusterArgs`] with the scenario file merged in and defaults filled.
struct Cluster {
    nodes: usize,
    data: String,
    partition: String,
    rounds: u64,
    seed: u64,
    tapestry: Option<PathBuf>,
    events: Vec<String>,
    regions: usize,
    federate_every: u64,
    federation_graph: String,
    federation_clip: Option<f32>,
    federation_wait: Option<String>,
    region_latency: Option<String>,
    region_loss: Option<String>,
    nat: Vec<String>,
    netns: bool,
    latency: Option<String>,
    loss: Option<String>,
    timeout_secs: u64,
}

impl ClusterArgs {
    /// Merges the scenario file (if any) under the flags.
    fn resolve(self) -> Result<Cluster, String> {
        let file = match &self.scenario {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("scenario {}: {e}", path.display()))?;
                toml::from_str::<ClusterArgs>(&text).map_err(|e| {
                    format!(
                        "scenario {}: {}",
                        path.display(),
                        e.to_string().replace('\n', " ").trim()
                    )
                })?
            }
            None => ClusterArgs::default(),
        };
        Ok(Cluster {
            nodes: self.nodes.or(file.nodes).unwrap_or(5),
            data: self
                .data
                .or(file.data)
                .unwrap_or_else(|| "synthetic".into()),
            partition: self
                .partition
                .or(file.partition)
                .unwrap_or_else(|| "dirichlet:0.5".into()),
            rounds: self.rounds.or(file.rounds).unwrap_or(20),
            seed: self.seed.or(file.seed).unwrap_or(7),
            tapestry: self.tapestry,
            events: file.events.into_iter().chain(self.events).collect(),
            regions: self.regions.or(file.regions).unwrap_or(1),
            federate_every: self.federate_every.or(file.federate_every).unwrap_or(0),
            federation_graph: self
                .federation_graph
                .or(file.federation_graph)
                .unwrap_or_else(|| "ring".into()),
            federation_clip: self.federation_clip.or(file.federation_clip),
            federation_wait: self.federation_wait.or(file.federation_wait),
            region_latency: self.region_latency.or(file.region_latency),
            region_loss: self.region_loss.or(file.region_loss),
            nat: file.nat.into_iter().chain(self.nat).collect(),
            netns: self.netns || file.netns,
            latency: self.latency.or(file.latency),
            loss: self.loss.or(file.loss),
            timeout_secs: self.timeout_secs.or(file.timeout_secs).unwrap_or(600),
        })
    }
}

fn cluster(a: ClusterArgs) -> ExitCode {
    if a.check_netns {
        return match tapestry_lab::netns::available() {
            Ok(()) => {
                println!("network namespaces: available");
                ExitCode::SUCCESS
            }
            Err(why) => {
                eprintln!("network namespaces: not available: {why}");
                ExitCode::from(1)
            }
        };
    }
    let options = match options(a) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("tapestry-lab: {e}");
            return ExitCode::from(2);
        }
    };
    let mut shown = 0.0;
    let result = tapestry_lab::cluster::run(&options, &mut |secs, nodes| {
        if secs - shown >= 2.0 || secs < 0.6 {
            shown = secs;
            let line: Vec<String> = nodes
                .iter()
                .map(|n| {
                    if n.up {
                        format!("r{} {:.3} p{}", n.round, n.accuracy, n.peers)
                    } else {
                        "down".into()
                    }
                })
                .collect();
            eprintln!("{secs:>6.1}s  {}", line.join(" | "));
        }
    });
    match result {
        Ok(r) => {
            let f = &r["final"];
            println!(
                "{} nodes: accuracy mean {:.4} min {:.4}; heads agree: {}; consensus distance {:.2e}",
                options.nodes,
                f["accuracy_mean"].as_f64().unwrap_or(0.0),
                f["accuracy_min"].as_f64().unwrap_or(0.0),
                f["heads_agree"],
                f["consensus_distance"].as_f64().unwrap_or(0.0)
            );
            if let Some(regions) = r["regions"].as_array().filter(|r| r.len() > 1) {
                for g in regions {
                    println!(
                        "{}: accuracy mean {:.4}, on all the data {}; heads agree: {}; mixes signed {}",
                        g["region"].as_str().unwrap_or("?"),
                        g["accuracy_mean"].as_f64().unwrap_or(0.0),
                        g["accuracy_on_all_data"]
                            .as_f64()
                            .map_or("-".into(), |a| format!("{a:.4}")),
                        g["heads_agree"],
                        g["mixes_signed"]
                    );
                }
            }
            println!("report: {}", options.out.join("report.json").display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tapestry-lab: {e}");
            ExitCode::from(1)
        }
    }
}

/// The run's options from the flags and scenario file, every value checked.
fn options(a: ClusterArgs) -> Result<tapestry_lab::cluster::ClusterOptions, String> {
    let out = a.out.clone().ok_or("--out is required")?;
    let a = a.resolve()?;
    if a.nodes < 2 || a.nodes > 64 {
        return Err("--nodes must be between 2 and 64".into());
    }
    if a.regions == 0 || a.regions * 2 > a.nodes {
        return Err(format!(
            "--regions must be between 1 and {} (at least two nodes in each)",
            a.nodes / 2
        ));
    }
    let partition = a.partition.parse().map_err(|e| format!("{e}"))?;
    if a.data != "synthetic" && !std::path::Path::new(&a.data).is_file() {
        return Err(format!("data file {} does not exist", a.data));
    }
    let events = a
        .events
        .iter()
        .map(|e| tapestry_lab::cluster::ClusterEvent::parse(e, a.nodes))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let latency_ms = match a.latency.as_deref() {
        None => 0,
        Some(l) => {
            tapestry_sim::scenario::parse_duration_ms(l).map_err(|e| format!("--latency: {e}"))?
        }
    };
    let loss = match a.loss.as_deref() {
        None => 0.0,
        Some(l) => parse_fraction(l).map_err(|e| format!("--loss: {e}"))?,
    };
    let region_latency_ms = match a.region_latency.as_deref() {
        None => latency_ms,
        Some(l) => tapestry_sim::scenario::parse_duration_ms(l)
            .map_err(|e| format!("--region-latency: {e}"))?,
    };
    let region_loss = match a.region_loss.as_deref() {
        None => loss,
        Some(l) => parse_fraction(l).map_err(|e| format!("--region-loss: {e}"))?,
    };
    if (a.region_latency.is_some() || a.region_loss.is_some()) && a.regions < 2 {
        return Err("--region-latency and --region-loss need --regions ≥ 2".into());
    }
    let federation = if a.federate_every == 0 {
        None
    } else {
        if a.regions < 2 {
            return Err("--federate-every needs --regions ≥ 2".into());
        }
        let wait_ms = match a.federation_wait.as_deref() {
            None => 5_000,
            Some(w) => tapestry_sim::scenario::parse_duration_ms(w)
                .map_err(|e| format!("--federation-wait: {e}"))?,
        };
        if wait_ms == 0 {
            return Err("--federation-wait must be positive".into());
        }
        if a.federation_clip
            .is_some_and(|c| !(c.is_finite() && c > 0.0))
        {
            return Err("--federation-clip must be a positive number".into());
        }
        let f = tapestry_lab::cluster::LabFederation {
            every: a.federate_every,
            graph: a.federation_graph.clone(),
            clip: a.federation_clip,
            wait_ms,
        };
        f.edges(a.regions)
            .map_err(|e| format!("--federation-graph: {e}"))?;
        Some(f)
    };
    let mut nat = Vec::new();
    for n in &a.nat {
        let (node, kind) = n
            .split_once(':')
            .ok_or_else(|| format!("--nat {n:?}: N:KIND (e.g. 3:cone)"))?;
        let node: usize = node
            .parse()
            .map_err(|_| format!("--nat {n:?}: N is not a number"))?;
        if node == 0 || node >= a.nodes {
            return Err(format!(
                "--nat {n:?}: node 1 to {} (node 0 is the public bootstrap and relay)",
                a.nodes - 1
            ));
        }
        let kind: tapestry_lab::netns::NatKind =
            kind.parse().map_err(|e| format!("--nat {n:?}: {e}"))?;
        nat.push((node, kind));
    }
    let wants_faults = latency_ms > 0
        || !nat.is_empty()
        || loss > 0.0
        || region_latency_ms > 0
        || region_loss > 0.0
        || events
            .iter()
            .any(|e| matches!(e, tapestry_lab::cluster::ClusterEvent::Cut { .. }));
    let tapestry = a.tapestry.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("tapestry")))
            .unwrap_or_else(|| PathBuf::from("tapestry"))
    });
    Ok(tapestry_lab::cluster::ClusterOptions {
        nodes: a.nodes,
        data: a.data.clone(),
        partition,
        rounds: a.rounds,
        seed: a.seed,
        out,
        tapestry,
        events,
        timeout: std::time::Duration::from_secs(a.timeout_secs),
        netns: use_netns(a.netns, wants_faults),
        faults: tapestry_lab::netns::LinkFaults { latency_ms, loss },
        interrupted: interrupted_on_signal(),
        regions: a.regions,
        region_faults: tapestry_lab::netns::LinkFaults {
            latency_ms: region_latency_ms,
            loss: region_loss,
        },
        federation,
        nat,
    })
}

/// Whether nodes get network namespaces: asked for and available here.
/// Says on standard error what is lost without them.
fn use_netns(asked: bool, wants_faults: bool) -> bool {
    if !asked {
        if wants_faults {
            eprintln!(
                "tapestry-lab: --latency, --loss and cuts need --netns; without it nodes run on \
                 127.0.0.1 and they are ignored"
            );
        }
        return false;
    }
    match tapestry_lab::netns::available() {
        Ok(()) => true,
        Err(why) => {
            eprintln!(
                "tapestry-lab: no network namespaces ({why}): nodes run on 127.0.0.1 and \
                 network faults are limited to killing and restarting{}",
                if wants_faults {
                    "; --latency, --loss and cuts are ignored"
                } else {
                    ""
                }
            );
            false
        }
    }
}

/// A flag set on Ctrl-C or SIGTERM: the run then stops, kills its nodes
/// and removes its namespaces on the way out.
fn interrupted_on_signal() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupted.clone();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    });
    interrupted
}

fn main() -> ExitCode {
    // Inherited by the node processes: one kernel thread each, so that
    // several nodes share this machine's cores without oversubscribing.
    // SAFETY: the first statement of `main`, before any thread exists.
    #[allow(unsafe_code)]
    unsafe {
        tapestry_core::model::one_kernel_thread()
    };
    let cli: Cli =
        match tapestry_sim::cli::parse_args("tapestry-lab", "tapestry-lab cluster --help") {
            Ok(cli) => cli,
            Err(code) => return code,
        };
    let Command::Cluster(args) = cli.command;
    cluster(*args)
}

/// `5%` or `0.05`, within 0..1.
fn parse_fraction(s: &str) -> Result<f64, String> {
    let v = match s.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => s.trim().parse::<f64>(),
    }
    .map_err(|_| format!("{s:?} is not a fraction (like 5% or 0.05)"))?;
    if (0.0..1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s:?} is not between 0% and 100%"))
    }
}
