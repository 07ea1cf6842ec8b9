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
    /// Run every arm of an experiment file (a scenario with `target` and
    /// `[[arm]]` tables) and compare the bytes each node sent until the
    /// swarm reached the target: DIR/communication.md, .csv, .json,
    /// DIR/metric_vs_bytes.png, and one directory per arm.
    Compare(CompareArgs),
}

#[derive(Args)]
struct CompareArgs {
    /// Experiment file (TOML): a scenario, `target = ACCURACY` (or bits per
    /// byte for a language model) and one `[[arm]]` table per arm, the
    /// reference first; an arm's keys override the scenario's.
    #[arg(long, value_name = "FILE")]
    experiment: PathBuf,
    /// Where to write the comparison.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Worker threads for every arm (0 = one per core); does not change
    /// results.
    #[arg(long)]
    threads: Option<usize>,
    /// Read back an arm that already ran (DIR/ARM holds a finished run of
    /// the same scenario) instead of running it again: to change the
    /// target, or to finish an experiment that was stopped.
    #[arg(long)]
    reuse: bool,
}

fn compare(args: &CompareArgs) -> ExitCode {
    let exp = std::fs::read_to_string(&args.experiment)
        .map_err(|e| format!("{}: {e}", args.experiment.display()))
        .and_then(|text| {
            tapestry_sim::compare::Experiment::from_toml(&text)
                .map_err(|e| format!("{}: {e}", args.experiment.display()))
        });
    let mut exp = match exp {
        Ok(e) => e,
        Err(e) => {
            eprintln!("tapestry-sim: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(t) = args.threads {
        for arm in &mut exp.arms {
            arm.settings.scenario.threads = t;
        }
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} round {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let arms: Vec<String> = exp.arms.iter().map(|a| a.name.clone()).collect();
    let result = tapestry_sim::compare::run(&exp, &args.out, args.reuse, &mut |i, r, n| {
        bar.set_message(format!("arm {}/{} {}", i + 1, arms.len(), arms[i]));
        bar.set_length(n);
        bar.set_position(r);
    });
    bar.finish_and_clear();
    match result {
        Ok(c) => {
            print!("{}", tapestry_sim::compare::table(&c));
            println!("written: {}", args.out.join("communication.md").display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tapestry-sim: {e}");
            ExitCode::from(1)
        }
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
    /// `synthetic`, a CSV file (.csv or .csv.gz, label in the last column),
    /// or text:PATH (a corpus file or a directory of them, one per
    /// language; for a transformer model).
    #[arg(long)]
    data: Option<String>,
    /// iid | dirichlet:ALPHA | classes:K | regions:K (rows); by-file | iid (text)
    #[arg(long)]
    partition: Option<String>,
    /// logistic | mlp:W1,W2,... | transformer:LAYERS,WIDTH,HEADS,CONTEXT
    #[arg(long)]
    model: Option<String>,
    /// sgd (momentum 0.9) | adamw
    #[arg(long)]
    optimizer: Option<String>,
    /// AdamW's epsilon.
    #[arg(long)]
    adam_eps: Option<f32>,
    /// Inner steps per round.
    #[arg(long)]
    local_steps: Option<usize>,
    /// Rows per inner step.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Inner learning rate.
    #[arg(long)]
    lr: Option<f32>,
    /// f32 | bf16 | int8[:BLOCK] | topk:FRACTION | topk-bf16:FRACTION | topk-int8:FRACTION
    #[arg(long)]
    codec: Option<String>,
    /// mean | trimmed-mean:BETA | median | clip:RADIUS[:ITERATIONS] | median-clip[:FACTOR[:ITERATIONS]] | aligned[:FACTOR[:ITERATIONS]]
    #[arg(long)]
    aggregator: Option<String>,
    /// averaging | sgd:LR | momentum:LR:MU (the outer step on each round's
    /// aggregate; momentum is heavy ball, taken on versions)
    #[arg(long)]
    outer: Option<String>,
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
    /// Regional swarms (broadcast mode): node i in region floor(i*K/N),
    /// each with its own genesis and rounds.
    #[arg(long)]
    regions: Option<usize>,
    /// Regions mix their agreed heads after every N rounds (0: they stay
    /// apart).
    #[arg(long)]
    federation_every: Option<u64>,
    /// complete | ring: the graph of regions heads are mixed on.
    #[arg(long)]
    federation_graph: Option<String>,
    /// Clip each foreign head's difference to this L2 norm (0: no clipping).
    #[arg(long)]
    federation_clip: Option<f32>,
    /// One-way latency between regions in milliseconds (0: latency-ms).
    #[arg(long)]
    region_latency_ms: Option<u64>,
    /// Bandwidth of the link between two regions in Mbit/s (0 = unlimited).
    #[arg(long)]
    region_bandwidth_mbps: Option<f64>,
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
        optimizer,
        adam_eps,
        codec,
        aggregator,
        outer,
        weighting,
        byzantine,
        loss,
        latency_ms,
        jitter_ms,
        bandwidth_mbps,
        churn,
        consensus_rounds,
        eval_sample,
        threads,
        regions,
        federation_every,
        federation_graph,
        federation_clip,
        region_latency_ms,
        region_bandwidth_mbps
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

fn main() -> ExitCode {
    // SAFETY: the first statement of `main`, before any thread exists.
    #[allow(unsafe_code)]
    unsafe {
        tapestry_core::model::one_kernel_thread()
    };
    let cli: Cli = match tapestry_sim::cli::parse_args("tapestry-sim", "tapestry-sim run --help") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let args = match cli.command {
        Command::Run(args) => args,
        Command::Compare(args) => return compare(&args),
    };
    let settings = match scenario(&args).and_then(|s| s.settings().map_err(|e| e.to_string())) {
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
            if let Some(bpb) = f["bits_per_byte_mean"].as_f64() {
                println!(
                    "bits per byte mean {bpb:.4}  worst node {:.4}",
                    f["bits_per_byte_max"].as_f64().unwrap_or(0.0)
                );
                if let Some(parts) = f["bits_per_byte_by_part"].as_object() {
                    let each: Vec<String> = parts
                        .iter()
                        .map(|(k, v)| format!("{k} {:.3}", v.as_f64().unwrap_or(0.0)))
                        .collect();
                    println!("  by language: {}", each.join("  "));
                }
            } else {
                println!(
                    "accuracy mean {:.4}  min {:.4}  max {:.4}",
                    f["accuracy_mean"].as_f64().unwrap_or(0.0),
                    f["accuracy_min"].as_f64().unwrap_or(0.0),
                    f["accuracy_max"].as_f64().unwrap_or(0.0)
                );
            }
            println!(
                "consensus distance {:.3e}  bytes sent per node {}",
                f["consensus_distance"].as_f64().unwrap_or(0.0),
                f["bytes_sent_per_node"]
            );
            let b = &report.json["baselines"];
            if !b["by_part"].is_null() {
                println!(
                    "baselines (bits per byte): centralized {:.4}  local-only {:.4}",
                    b["centralized"]["bits_per_byte"].as_f64().unwrap_or(0.0),
                    b["local_only"]["bits_per_byte_mean"]
                        .as_f64()
                        .unwrap_or(0.0),
                );
                let p = &b["by_part"];
                if let Some(parts) = p["centralized"].as_object() {
                    for (k, c) in parts {
                        println!(
                            "  {k}: centralized {:.3}  alone, seen {:.3}  alone, unseen {:.3} (best {:.3})",
                            c.as_f64().unwrap_or(0.0),
                            p["local_only_seen"][k].as_f64().unwrap_or(f64::NAN),
                            p["local_only_unseen"][k].as_f64().unwrap_or(f64::NAN),
                            p["local_only_unseen_best"][k].as_f64().unwrap_or(f64::NAN),
                        );
                    }
                }
            } else if !b.is_null() {
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
