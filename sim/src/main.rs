//! The `tapestry-sim` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tapestry_sim::scenario::Scenario;

/// Simulate a Tapestry swarm on one machine, deterministically: the node's
/// own round engine with virtual time, lossy links and Byzantine peers.
#[derive(Parser)]
#[command(name = "tapestry-sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario and write DIR/report.json, DIR/rounds.csv,
    /// DIR/baselines.csv, DIR/accuracy.png and DIR/consensus.png.
    Run(Box<RunArgs>),
    /// Start N real `tapestry` node processes on this machine, watch them
    /// train together, and write DIR/report.json, DIR/samples.csv and plots.
    Cluster(Box<ClusterArgs>),
}

/// `tapestry-sim cluster`'s settings: a scenario file's fields, each also
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
    /// iid | dirichlet:ALPHA | classes:K [default: dirichlet:0.5]
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
    /// Regions: node i joins region i mod K; they share the network and
    /// the bootstrap node, and each trains its own model [default: 1].
    #[arg(long)]
    regions: Option<usize>,
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
            netns: self.netns || file.netns,
            latency: self.latency.or(file.latency),
            loss: self.loss.or(file.loss),
            timeout_secs: self.timeout_secs.or(file.timeout_secs).unwrap_or(600),
        })
    }
}

#[derive(Args)]
struct RunArgs {
    /// Scenario file (TOML); flags override its fields.
    #[arg(long, value_name = "FILE")]
    scenario: Option<PathBuf>,
    /// Where to write the report.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Number of nodes.
    #[arg(long)]
    nodes: Option<usize>,
    /// Rounds to run.
    #[arg(long)]
    rounds: Option<u64>,
    /// Seed of everything random.
    #[arg(long)]
    seed: Option<u64>,
    /// complete | ring | random-regular:D | small-world:K:P | regions:K
    #[arg(long)]
    topology: Option<String>,
    /// broadcast | mixing | push-sum:FANOUT
    #[arg(long)]
    mode: Option<String>,
    /// `synthetic` or a CSV file (.csv or .csv.gz, label in the last column).
    #[arg(long)]
    data: Option<String>,
    /// iid | dirichlet:ALPHA | classes:K
    #[arg(long)]
    partition: Option<String>,
    /// logistic | mlp:W1,W2,...
    #[arg(long)]
    model: Option<String>,
    /// Inner steps per round.
    #[arg(long)]
    local_steps: Option<usize>,
    /// Rows per inner step.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Inner learning rate.
    #[arg(long)]
    lr: Option<f32>,
    /// f32 | bf16 | int8[:BLOCK] | topk:FRACTION
    #[arg(long)]
    codec: Option<String>,
    /// mean | trimmed-mean:BETA | median | clip:RADIUS[:ITERATIONS] | median-clip[:FACTOR[:ITERATIONS]] | aligned[:FACTOR[:ITERATIONS]]
    #[arg(long)]
    aggregator: Option<String>,
    /// equal | samples:MAX (how much a delta weighs)
    #[arg(long)]
    weighting: Option<String>,
    /// FRACTION:ATTACK, e.g. 0.25:sign-flip:10 (sign-flip[:K], scaled:K,
    /// gaussian:SIGMA, alie[:Z], ipm[:EPS], nan, replay, free-ride).
    #[arg(long)]
    byzantine: Option<String>,
    /// Probability that a message is lost.
    #[arg(long)]
    loss: Option<f64>,
    /// One-way link latency in milliseconds.
    #[arg(long)]
    latency_ms: Option<u64>,
    /// Extra latency per message, uniform in 0..=JITTER milliseconds.
    #[arg(long)]
    jitter_ms: Option<u64>,
    /// Upload bandwidth of every node in Mbit/s (0 = unlimited).
    #[arg(long)]
    bandwidth_mbps: Option<f64>,
    /// FRACTION:PERIOD, e.g. 0.3:2s: each period a fresh random fraction of
    /// the nodes is offline; returning nodes catch up from a peer.
    #[arg(long)]
    churn: Option<String>,
    /// A network partition GROUPS@FROM-TO, e.g. halves@2s-6s, regions:3@1s-4s
    /// or 0-3,8|4-7@500ms-2s (repeat for several).
    #[arg(long = "cut", value_name = "GROUPS@FROM-TO")]
    cuts: Vec<String>,
    /// The last N rounds skip training and only average.
    #[arg(long)]
    consensus_rounds: Option<u64>,
    /// Evaluate at most N honest nodes per round (0 = all; the last round
    /// evaluates all).
    #[arg(long)]
    eval_sample: Option<usize>,
    /// Worker threads for training and evaluation (0 = one per core); does
    /// not change results.
    #[arg(long)]
    threads: Option<usize>,
    /// Give every node the real chunk store (in memory) and report what it
    /// holds.
    #[arg(long)]
    chunk_store: bool,
    /// Skip the baselines (centralized, local-only, plain mean).
    #[arg(long)]
    no_baselines: bool,
}

fn scenario(args: &RunArgs) -> Result<Scenario, String> {
    let mut s = match &args.scenario {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            Scenario::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => Scenario::default(),
    };
    macro_rules! set {
        ($($f:ident),*) => { $(if let Some(v) = &args.$f { s.$f = v.clone(); })* };
    }
    set!(
        nodes,
        rounds,
        seed,
        topology,
        mode,
        data,
        partition,
        model,
        local_steps,
        batch_size,
        lr,
        codec,
        aggregator,
        weighting,
        byzantine,
        loss,
        latency_ms,
        jitter_ms,
        bandwidth_mbps,
        churn,
        consensus_rounds,
        eval_sample,
        threads
    );
    if !args.cuts.is_empty() {
        s.cuts = args.cuts.clone();
    }
    if args.chunk_store {
        s.chunk_store = true;
    }
    if args.no_baselines {
        s.baselines = false;
    }
    Ok(s)
}

/// candle asks for its thread count on every matrix product and, unless
/// `RAYON_NUM_THREADS` says, works it out again each time by reading
/// `/proc/cpuinfo` (on machines without CPU capacity files, like most
/// x86 VMs): half the simulator's time went there. The simulator runs nodes
/// in parallel itself, so candle's kernels get one thread each.
#[allow(unsafe_code)]
fn one_kernel_thread() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: the first statement of `main`, before any thread exists,
        // so nothing reads the environment concurrently.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
}

fn cluster(a: ClusterArgs) -> ExitCode {
    let fail = |e: String| {
        eprintln!("tapestry-sim: {e}");
        ExitCode::from(2)
    };
    if a.check_netns {
        return match tapestry_sim::netns::available() {
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
    let Some(out) = a.out.clone() else {
        return fail("--out is required".into());
    };
    let a = match a.resolve() {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    if a.nodes < 2 || a.nodes > 64 {
        return fail("--nodes must be between 2 and 64".into());
    }
    if a.regions == 0 || a.regions * 2 > a.nodes {
        return fail(format!(
            "--regions must be between 1 and {} (at least two nodes in each)",
            a.nodes / 2
        ));
    }
    let partition = match a.partition.parse() {
        Ok(p) => p,
        Err(e) => return fail(format!("{e}")),
    };
    if a.data != "synthetic" && !std::path::Path::new(&a.data).is_file() {
        return fail(format!("data file {} does not exist", a.data));
    }
    let events = match a
        .events
        .iter()
        .map(|e| tapestry_sim::cluster::ClusterEvent::parse(e, a.nodes))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let latency_ms = match a
        .latency
        .as_deref()
        .map(tapestry_sim::scenario::parse_duration_ms)
    {
        None => 0,
        Some(Ok(ms)) => ms,
        Some(Err(e)) => return fail(format!("--latency: {e}")),
    };
    let loss = match a.loss.as_deref().map(parse_fraction) {
        None => 0.0,
        Some(Ok(l)) => l,
        Some(Err(e)) => return fail(format!("--loss: {e}")),
    };
    let wants_faults = latency_ms > 0
        || loss > 0.0
        || events
            .iter()
            .any(|e| matches!(e, tapestry_sim::cluster::ClusterEvent::Cut { .. }));
    let netns = if a.netns {
        match tapestry_sim::netns::available() {
            Ok(()) => true,
            Err(why) => {
                eprintln!(
                    "tapestry-sim: no network namespaces ({why}): nodes run on 127.0.0.1 and \
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
    } else {
        if wants_faults {
            eprintln!(
                "tapestry-sim: --latency, --loss and cuts need --netns; without it nodes run on \
                 127.0.0.1 and they are ignored"
            );
        }
        false
    };
    // Ctrl-C or SIGTERM: the run stops, kills its nodes and removes its
    // namespaces on the way out.
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
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
    }
    let tapestry = a.tapestry.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("tapestry")))
            .unwrap_or_else(|| PathBuf::from("tapestry"))
    });
    let options = tapestry_sim::cluster::ClusterOptions {
        nodes: a.nodes,
        data: a.data.clone(),
        partition,
        rounds: a.rounds,
        seed: a.seed,
        out,
        tapestry,
        events,
        timeout: std::time::Duration::from_secs(a.timeout_secs),
        netns,
        faults: tapestry_sim::netns::LinkFaults { latency_ms, loss },
        interrupted,
        regions: a.regions,
    };
    let mut shown = 0.0;
    let result = tapestry_sim::cluster::run(&options, &mut |secs, nodes| {
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
                a.nodes,
                f["accuracy_mean"].as_f64().unwrap_or(0.0),
                f["accuracy_min"].as_f64().unwrap_or(0.0),
                f["heads_agree"],
                f["consensus_distance"].as_f64().unwrap_or(0.0)
            );
            println!("report: {}", options.out.join("report.json").display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tapestry-sim: {e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    one_kernel_thread();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line naming the problem; `--help` has the rest.
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("tapestry-sim: {first} (see tapestry-sim run --help)");
            return ExitCode::from(2);
        }
    };
    let args = match cli.command {
        Command::Run(args) => args,
        Command::Cluster(args) => return cluster(*args),
    };
    let settings = match scenario(&args).and_then(|s| s.settings()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tapestry-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let bar = indicatif::ProgressBar::new(settings.scenario.rounds);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} round {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let result = tapestry_sim::report::run(&settings, &args.out, &mut |r, _| bar.set_position(r));
    bar.finish_and_clear();
    match result {
        Ok(report) => {
            let f = &report.json["final"];
            println!(
                "nodes {}  rounds {}  honest {}",
                settings.scenario.nodes, report.json["rounds_completed"], f["honest_nodes"]
            );
            println!(
                "accuracy mean {:.4}  min {:.4}  max {:.4}",
                f["accuracy_mean"].as_f64().unwrap_or(0.0),
                f["accuracy_min"].as_f64().unwrap_or(0.0),
                f["accuracy_max"].as_f64().unwrap_or(0.0)
            );
            println!(
                "consensus distance {:.3e}  bytes sent per node {}",
                f["consensus_distance"].as_f64().unwrap_or(0.0),
                f["bytes_sent_per_node"]
            );
            let b = &report.json["baselines"];
            if !b.is_null() {
                println!(
                    "baselines: centralized {:.4}  local-only {:.4}  plain mean {:.4}",
                    b["centralized"]["accuracy"].as_f64().unwrap_or(0.0),
                    b["local_only"]["accuracy_mean"].as_f64().unwrap_or(0.0),
                    b["plain_mean"]["accuracy_mean"].as_f64().unwrap_or(0.0)
                );
            }
            println!("report: {}", args.out.join("report.json").display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tapestry-sim: {e}");
            ExitCode::from(1)
        }
    }
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
