//! The `tapestry` command: run a node, look at it, and try a swarm locally.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use libp2p::Multiaddr;
use tapestry_core::data::{self, Dataset, Partition, Scaler};
use tapestry_core::model::{InnerState, evaluate, local_round};
use tapestry_node::config::{self, Config, ConfigError, DataDir};
use tapestry_node::net::NetConfig;
use tapestry_node::ops;
use tapestry_node::runtime::{self, Launch, LocalData, NodeSettings};
use tapestry_protocol::{ContentId, Keypair, NodeId};
use tapestry_storage::MemoryStore;

/// A Tapestry node: train one shared model with other organisations over a
/// peer-to-peer network, without sending your data anywhere.
#[derive(Parser)]
#[command(name = "tapestry", version)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "TAPESTRY_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create a node: its identity (key file, 0600) and a commented config.toml.
    Init(InitArgs),
    /// Run the node until SIGINT or SIGTERM, then stop cleanly.
    Run(RunArgs),
    /// Show a running node's status (from its HTTP API).
    Status(StatusArgs),
    /// Exit 0 if the node's loop and network task are alive (GET /health),
    /// 1 with the reason if not: for health checks and probes.
    Health(HealthArgs),
    /// Export, import or trace the model.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Check every chunk in the store against its id; exit 1 if any is corrupt.
    Scrub(DirArgs),
    /// Rebuild a damaged store database from the pack files (stop the node
    /// first). The damaged database is kept aside as store/meta.damaged-*;
    /// refs and manifests are lost, so the node starts again from its
    /// genesis and takes the region's head from its peers.
    Repair(DirArgs),
    /// Start a few real nodes on loopback in this process and watch them train.
    Demo(DemoArgs),
    /// Make and extend a permissioned region's roster.
    #[command(subcommand)]
    Region(RegionCommand),
}

#[derive(Subcommand)]
enum RegionCommand {
    /// Create a region key (DIR/region.key, 0600) and an empty signed
    /// roster (DIR/roster.cbor); prints the region key to put in nodes'
    /// config as region_key.
    New(RegionNewArgs),
    /// Sign a new roster version with these node ids added.
    Add(RegionAddArgs),
    /// Create permissioned regions that federate, with their nodes, ready
    /// to run: DIR/REGION/ holds each region's key and roster, and
    /// DIR/REGION/nodeI/ each node's data directory (set its [data] path
    /// or pass --data); every node's config names its roster and its
    /// neighbours' by paths inside DIR.
    Federation(FederationArgs),
}

#[derive(Args)]
struct FederationArgs {
    /// Where the regions go.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// A region and its number of nodes, NAME:N; two or more.
    #[arg(long = "region", value_name = "NAME:N", required = true)]
    regions: Vec<String>,
    /// The model.
    #[arg(long, default_value = "digits")]
    model: String,
    /// Heads are mixed after every this many rounds.
    #[arg(long, default_value_t = 2)]
    every: u64,
    /// The graph of regions: ring or complete.
    #[arg(long, default_value = "ring")]
    graph: String,
    /// Do nothing (and succeed) if DIR already holds the first region: for
    /// a setup step that runs at every start.
    #[arg(long)]
    if_missing: bool,
}

#[derive(Args)]
struct RegionNewArgs {
    /// Where the region key and roster go (created if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The model.
    #[arg(long, default_value = "digits")]
    model: String,
    /// The region.
    #[arg(long)]
    region: String,
}

#[derive(Args)]
struct RegionAddArgs {
    /// The region directory (see `region new`).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Node ids to admit (as printed by `tapestry init`).
    #[arg(required = true, value_name = "NODE_ID")]
    members: Vec<String>,
}

#[derive(Args)]
struct DirArgs {
    /// The node's data directory.
    #[arg(long, value_name = "DIR", env = "TAPESTRY_DATA_DIR")]
    data_dir: PathBuf,
}

#[derive(Args)]
struct InitArgs {
    /// The node's data directory (created if missing).
    #[arg(long, value_name = "DIR", env = "TAPESTRY_DATA_DIR")]
    data_dir: PathBuf,
    /// The region to join.
    #[arg(long, default_value = "default", env = "TAPESTRY_REGION")]
    region: String,
    /// The model to train.
    #[arg(long, default_value = "digits", env = "TAPESTRY_MODEL")]
    model: String,
    /// The architecture written to config.toml: logistic, mlp:W1,W2,... or
    /// transformer:LAYERS,WIDTH,HEADS,CONTEXT (a byte-level language model
    /// trained on text; its training defaults to AdamW).
    #[arg(long, default_value = "logistic", env = "TAPESTRY_ARCHITECTURE")]
    architecture: tapestry_core::model::Architecture,
}

#[derive(Args)]
struct RunArgs {
    /// The node's data directory (see `tapestry init`).
    #[arg(long, value_name = "DIR", env = "TAPESTRY_DATA_DIR")]
    data_dir: PathBuf,
    /// Listen address (repeat for several); replaces the config's list.
    #[arg(long, value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// A peer to join (repeat for several); added to the config's list.
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// A relay to listen through, ending in /p2p/<relay peer id> (repeat
    /// for several); added to the config's `relays`. For a node behind NAT.
    #[arg(long, value_name = "MULTIADDR")]
    relay: Vec<String>,
    /// Serve as a relay for peers behind NAT (within the config's
    /// `[relay_limits]`).
    #[arg(long)]
    relay_server: bool,
    /// The HTTP API address.
    #[arg(long, value_name = "HOST:PORT", env = "TAPESTRY_API")]
    api: Option<String>,
    /// This node's private data: a CSV file, label last; for a transformer,
    /// a text file (UTF-8 or fortune format, .gz or not) or a directory of
    /// them, one per language.
    #[arg(long, value_name = "FILE", env = "TAPESTRY_DATA")]
    data: Option<PathBuf>,
    /// Stop starting rounds after this many (0 = never).
    #[arg(long, env = "TAPESTRY_ROUNDS")]
    rounds: Option<u64>,
    /// Wait for this many peers before the first round.
    #[arg(long, env = "TAPESTRY_START_PEERS")]
    start_peers: Option<usize>,
    /// Start a round at most every this many milliseconds.
    #[arg(long, value_name = "MS", env = "TAPESTRY_MIN_ROUND_MS")]
    min_round_ms: Option<u64>,
    /// Use only the rows i ≡ SHARD (mod OF) of the data file: a quick way
    /// to give test nodes different data from one file (SHARD/OF). With
    /// `auto/OF` each node keeps its own pseudo-random 1/OF of the rows,
    /// chosen by its node id (for replicas that share one file and one
    /// command line).
    #[arg(long, value_name = "SHARD/OF", env = "TAPESTRY_SHARD")]
    shard: Option<String>,
    /// Create the node first (as `tapestry init` would, with
    /// TAPESTRY_REGION and TAPESTRY_MODEL) if the data directory holds
    /// none; for containers and services whose first start makes the node.
    #[arg(long, env = "TAPESTRY_INIT", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    init: bool,
}

#[derive(Args)]
struct StatusArgs {
    /// The node's API address.
    #[arg(long, default_value = "127.0.0.1:7400", env = "TAPESTRY_API")]
    api: String,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct HealthArgs {
    /// The node's API address.
    #[arg(long, default_value = "127.0.0.1:7400", env = "TAPESTRY_API")]
    api: String,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Write the head model as safetensors.
    Export(ExportArgs),
    /// Make a safetensors file (names and shapes must match the model) the
    /// node's head: a new version, signed by this node, whose parent is
    /// the previous head. Run it while the node is stopped.
    Import(ImportArgs),
    /// List the signed deltas, by author, that built a version (default: head).
    Lineage(LineageArgs),
    /// Continue a prompt with the head model (a language model: architecture
    /// transformer:...). Prints the prompt and the bytes that follow. Run it
    /// while the node is stopped, or on a copy of its data directory.
    Sample(SampleArgs),
}

#[derive(Args)]
struct SampleArgs {
    /// The node's data directory.
    #[arg(long, value_name = "DIR", env = "TAPESTRY_DATA_DIR")]
    data_dir: PathBuf,
    /// The text to continue (its last CONTEXT bytes are what the model sees).
    #[arg(long, default_value = "")]
    prompt: String,
    /// Bytes to generate.
    #[arg(long, default_value_t = 200)]
    bytes: usize,
    /// Sampling temperature: 0 takes the most likely byte each time, 1
    /// samples the model's distribution, higher is wilder.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Seed of the sampling (the same seed, the same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct ExportArgs {
    /// The node's data directory.
    #[arg(long, value_name = "DIR", env = "TAPESTRY_DATA_DIR")]
    data_dir: PathBuf,
    /// Output file. For a transformer a GPT-2 config.json is written beside
    /// it: name it DIR/model.safetensors and DIR loads with Hugging Face's
    /// GPT2LMHeadModel.from_pretrained(DIR).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Args)]
struct ImportArgs {
    /// The node's data directory.
    #[arg(long, value_name = "DIR", env = "TAPESTRY_DATA_DIR")]
    data_dir: PathBuf,
    /// The safetensors file.
    #[arg(long, value_name = "FILE")]
    file: PathBuf,
}

#[derive(Args)]
struct LineageArgs {
    /// The node's data directory.
    #[arg(long, value_name = "DIR", env = "TAPESTRY_DATA_DIR")]
    data_dir: PathBuf,
    /// The version (manifest id); the head if omitted.
    version: Option<String>,
    /// Versions to walk back at most.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
}

#[derive(Args)]
struct DemoArgs {
    /// Nodes to start.
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Rounds to train.
    #[arg(long, default_value_t = 15)]
    rounds: u64,
}

fn main() -> ExitCode {
    // SAFETY: the first statements of `main`, before any thread exists.
    #[allow(unsafe_code)]
    unsafe {
        tapestry_core::model::one_kernel_thread()
    };
    // glibc gives each thread that contends for the allocator an arena of
    // its own (up to 8 per core) and rarely returns their free pages: under
    // a flood, a node's RSS crept ~1 MiB a minute with the default and
    // stayed flat with two arenas (BENCHMARKS.md, "Soak"). Two arenas for
    // a process whose heavy work runs on a few threads.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets a malloc parameter; no thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        // Buffers of a model's size (a delta, the parameters, a gradient)
        // are mapped and unmapped on their own: glibc's default raises its
        // mmap threshold to 32 MiB after the first such free, and then
        // keeps them in the heap, where the peak of what overlapped stays
        // resident long after it was freed.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("tapestry: {first} (see tapestry --help)");
            return ExitCode::from(2);
        }
    };
    logging(cli.log_format, matches!(cli.command, Command::Demo(_)));
    let result = match cli.command {
        Command::Init(a) => init(&a),
        Command::Run(a) => tokio_main(run(a)),
        Command::Status(a) => status(&a),
        Command::Health(a) => health(&a),
        Command::Model(ModelCommand::Export(a)) => export(&a),
        Command::Model(ModelCommand::Sample(a)) => sample(&a),
        Command::Model(ModelCommand::Import(a)) => import(&a),
        Command::Model(ModelCommand::Lineage(a)) => lineage(&a),
        Command::Scrub(a) => scrub(&a),
        Command::Repair(a) => repair(&a),
        Command::Demo(a) => tokio_main(demo(a)),
        Command::Region(RegionCommand::New(a)) => region_new(&a),
        Command::Region(RegionCommand::Add(a)) => region_add(&a),
        Command::Region(RegionCommand::Federation(a)) => federation(&a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tapestry: {e}");
            ExitCode::from(1)
        }
    }
}

fn logging(format: LogFormat, quiet: bool) {
    let default = if quiet { "warn" } else { "info,libp2p=warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log that cannot be written (its disk full) loses lines; it must
        // not stop the node (the default reports through `eprintln!`, which
        // panics when standard error cannot be written).
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn tokio_main(
    f: impl std::future::Future<Output = Result<ExitCode, String>>,
) -> Result<ExitCode, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Blocking work (store reads for peers, store writes, signature
        // batches) queues for 16 threads rather than growing the pool to
        // tokio's default of 512 under a flood of requests: each thread
        // keeps its stack and allocator caches, so a pool grown by a peer
        // is memory that peer holds. Reads in flight are bounded anyway
        // (256, see PROTOCOL.md), and two cores gain nothing from more.
        .max_blocking_threads(16)
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?
        .block_on(f)
}

fn init(a: &InitArgs) -> Result<ExitCode, String> {
    let dir = DataDir {
        root: a.data_dir.clone(),
    };
    let key = ops::init(&dir, &a.model, &a.region, &a.architecture).map_err(|e| e.to_string())?;
    let peer = tapestry_node::net::peer_id_of(&key.node_id())
        .map(|p| p.to_string())
        .unwrap_or_default();
    println!("node id  {}", key.node_id());
    println!("peer id  {peer}");
    println!(
        "created  {} and {}",
        dir.key().display(),
        dir.config().display()
    );
    println!(
        "next: set [data] path in config.toml, then tapestry run --data-dir {}",
        dir.root.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn region_new(a: &RegionNewArgs) -> Result<ExitCode, String> {
    let key = ops::region_new(&a.dir, &a.model, &a.region).map_err(|e| e.to_string())?;
    println!("region key  {key}");
    println!(
        "roster      {} (version 1, no members yet)",
        a.dir.join("roster.cbor").display()
    );
    println!(
        "next: tapestry region add --dir {} <node id>...",
        a.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn region_add(a: &RegionAddArgs) -> Result<ExitCode, String> {
    let members = a
        .members
        .iter()
        .map(|m| {
            m.parse::<NodeId>()
                .map_err(|e| format!("node id {m:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (version, count) = ops::region_add(&a.dir, &members).map_err(|e| e.to_string())?;
    println!("roster version {version}: {count} members");
    Ok(ExitCode::SUCCESS)
}

fn federation(a: &FederationArgs) -> Result<ExitCode, String> {
    let regions = a
        .regions
        .iter()
        .map(|r| {
            let (name, n) = r
                .split_once(':')
                .ok_or_else(|| format!("--region {r:?}: NAME:N"))?;
            let n: usize = n
                .parse()
                .map_err(|_| format!("--region {r:?}: N is not a number"))?;
            Ok((name.to_owned(), n))
        })
        .collect::<Result<Vec<_>, String>>()?;
    if a.if_missing
        && let Some((first, _)) = regions.first()
        && a.dir.join(first).join("roster.cbor").exists()
    {
        println!(
            "{} already holds region {first}: nothing done",
            a.dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let made = ops::federation_init(&a.dir, &a.model, &regions, a.every, &a.graph)
        .map_err(|e| e.to_string())?;
    for r in &made {
        println!("region {}  key {}", r.name, r.key);
        for (dir, id) in &r.nodes {
            println!("  node {id}  {}", dir.display());
        }
    }
    println!(
        "next: tapestry run --data-dir DIR/REGION/nodeI --data FILE (the first node of each region, then the others with --bootstrap)"
    );
    Ok(ExitCode::SUCCESS)
}

fn parse_addrs(list: &[String]) -> Result<Vec<Multiaddr>, String> {
    list.iter()
        .map(|a| {
            a.parse::<Multiaddr>()
                .map_err(|e| format!("bad multiaddr {a:?}: {e}"))
        })
        .collect()
}

async fn run(a: RunArgs) -> Result<ExitCode, String> {
    let dir = DataDir {
        root: a.data_dir.clone(),
    };
    if a.init && !dir.key().exists() && !dir.config().exists() {
        init(&InitArgs {
            data_dir: a.data_dir.clone(),
            region: std::env::var("TAPESTRY_REGION").unwrap_or_else(|_| "default".into()),
            model: std::env::var("TAPESTRY_MODEL").unwrap_or_else(|_| "digits".into()),
            architecture: match std::env::var("TAPESTRY_ARCHITECTURE") {
                Ok(a) => a
                    .parse()
                    .map_err(|e| format!("TAPESTRY_ARCHITECTURE: {e}"))?,
                Err(_) => tapestry_core::model::Architecture::Logistic,
            },
        })?;
    }
    let mut cfg = Config::load(&dir.config()).map_err(|e| match &e {
        ConfigError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            format!("{e} (create the node with tapestry init, or run with --init)")
        }
        _ => e.to_string(),
    })?;
    if !a.listen.is_empty() {
        cfg.listen = a.listen.clone();
    }
    cfg.bootstrap.extend(a.bootstrap.iter().cloned());
    cfg.relays.extend(a.relay.iter().cloned());
    cfg.relay_server |= a.relay_server;
    if let Some(api) = &a.api {
        cfg.api = api.clone();
    }
    if let Some(p) = &a.data {
        cfg.data.path = p.display().to_string();
    }
    if let Some(r) = a.rounds {
        cfg.round.rounds = r;
    }
    if let Some(p) = a.start_peers {
        cfg.round.start_peers = p;
    }
    if let Some(ms) = a.min_round_ms {
        cfg.round.min_round_ms = ms;
    }
    if cfg.data.path.is_empty() {
        return Err("no data: set [data] path in config.toml or pass --data FILE".into());
    }
    let key = ops::read_key(&dir).map_err(|e| e.to_string())?;
    let data = ops::local_data(
        &cfg,
        Path::new(&cfg.data.path),
        a.shard.as_deref(),
        &key.node_id(),
    )
    .map_err(|e| e.to_string())?;
    let mut settings = ops::node_settings(&cfg, &dir, &key).map_err(|e| e.to_string())?;
    // Fault injection for tests; never set in production.
    settings.freeze_at_round = std::env::var("TAPESTRY_FAULT_FREEZE_AT_ROUND")
        .ok()
        .and_then(|v| v.parse().ok());
    let store = ops::open_store(&dir, true).map_err(|e| e.to_string())?;
    let model = &settings.engine;
    let net = NetConfig {
        listen: parse_addrs(&cfg.listen)?,
        bootstrap: parse_addrs(&cfg.bootstrap)?,
        mdns: cfg.mdns,
        topics: vec![
            runtime::deltas_topic(&model.model_id, &model.region),
            runtime::models_topic(&model.model_id, &model.region),
        ],
        round_window: Duration::from_millis(
            model
                .round_timeout_ms
                .saturating_mul(model.door.staleness.saturating_add(1)),
        ),
        relay_server: cfg.relay_limits(),
        relays: parse_addrs(&cfg.relays)?,
        ..NetConfig::default()
    };
    let running = runtime::launch(Launch {
        key: key.clone(),
        settings,
        store: Arc::new(store),
        data,
        net,
        api: Some(cfg.api_addr().map_err(|e| e.to_string())?),
    })
    .await
    .map_err(|e| e.to_string())?;
    tracing::info!(
        node = %key.node_id(),
        peer = %running.net.peer_id(),
        api = ?running.api,
        region = %cfg.region,
        "node running"
    );
    // Where to reach this node, for scripts and tests (rewritten each start).
    let listen: Vec<String> = running
        .listen_addrs()
        .await
        .iter()
        .map(|a| format!("{a}/p2p/{}", running.net.peer_id()))
        .collect();
    let endpoints = serde_json::json!({
        "node_id": key.node_id().to_string(),
        "peer_id": running.net.peer_id().to_string(),
        "api": running.api.map(|a| a.to_string()),
        "listen": listen,
    });
    ops::write_endpoints(&dir, &endpoints).map_err(|e| e.to_string())?;
    let _watchdog = systemd_watchdog(running.shared.health.clone());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
    }
    running.stop().await.map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

/// Under systemd (`Type=notify`): says ready, then, if the unit has a
/// watchdog (`WatchdogSec`), pets it at half its period while the node's
/// loop and network task are alive (`GET /health`'s judgement), so systemd
/// restarts a node that hangs. Elsewhere: nothing.
fn systemd_watchdog(
    health: std::sync::Arc<tapestry_node::status::Health>,
) -> Option<tokio::task::JoinHandle<()>> {
    let path = std::env::var_os("NOTIFY_SOCKET")?;
    let notify = move |msg: &str| -> std::io::Result<()> {
        use std::os::linux::net::SocketAddrExt;
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        match bytes.strip_prefix(b"@") {
            Some(name) => {
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(msg.as_bytes(), &addr)?;
            }
            None => {
                sock.send_to(msg.as_bytes(), &path)?;
            }
        }
        Ok(())
    };
    if let Err(e) = notify("READY=1") {
        tracing::warn!(error = %e, "cannot notify systemd");
        return None;
    }
    let period = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|us| us.parse::<u64>().ok())
        .filter(|us| *us > 0)
        .map(|us| Duration::from_micros(us / 2))?;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            match health.check() {
                Ok(()) => {
                    if let Err(e) = notify("WATCHDOG=1") {
                        tracing::warn!(error = %e, "cannot pet the systemd watchdog");
                    }
                }
                Err(why) => tracing::error!(%why, "unhealthy: not petting the systemd watchdog"),
            }
        }
    }))
}

fn health(a: &HealthArgs) -> Result<ExitCode, String> {
    match tapestry_node::api::get(&a.api, "/health", Duration::from_secs(5)) {
        Ok(body) => {
            print!("{body}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("unhealthy: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn status(a: &StatusArgs) -> Result<ExitCode, String> {
    let body = tapestry_node::api::get(&a.api, "/status", Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    if a.json {
        println!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let s: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    let get = |k: &str| s[k].to_string().trim_matches('"').to_owned();
    println!("node      {}", get("node_id"));
    println!("region    {} / {}", get("model_id"), get("region"));
    println!("round     {}", get("round"));
    println!("head      {}", get("head"));
    if let Some(bpb) = s["bits_per_byte"].as_f64() {
        let parts: Vec<String> = s["bits_per_byte_by_part"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k} {:.3}", v.as_f64().unwrap_or(f64::NAN)))
                    .collect()
            })
            .unwrap_or_default();
        println!("bits/byte {bpb:.4}  ({})", parts.join(", "));
    } else {
        println!(
            "accuracy  {}  loss {}",
            s["accuracy"]
                .as_f64()
                .map_or("-".into(), |a| format!("{a:.4}")),
            s["loss"].as_f64().map_or("-".into(), |l| format!("{l:.4}"))
        );
    }
    println!("peers     {}", get("peers"));
    let r = &s["reach"];
    if r.is_object() {
        let conns = r["connections"].as_array().map_or(0, Vec::len);
        let relayed = r["connections"]
            .as_array()
            .map_or(0, |c| c.iter().filter(|c| c["relayed"] == true).count());
        println!(
            "reach     NAT {}{}; {conns} connections ({relayed} relayed); hole punches {} ok, {} failed{}",
            r["nat_status"].as_str().unwrap_or("?"),
            r["public_address"]
                .as_str()
                .map(|a| format!(" at {a}"))
                .unwrap_or_default(),
            r["hole_punches_succeeded"],
            r["hole_punches_failed"],
            if r["relay_server"] == true {
                format!("; relay server: {} circuits relayed", r["circuits_relayed"])
            } else {
                String::new()
            }
        );
    }
    println!("bytes     in {}  out {}", get("bytes_in"), get("bytes_out"));
    println!("rejected  {}", s["rejected"]);
    let f = &s["federation"];
    if f.is_object() {
        println!(
            "federated every {} rounds with {}; {} mixes signed, {} foreign heads taken",
            f["every"],
            f["neighbours"]
                .as_array()
                .map(|n| n
                    .iter()
                    .map(|r| r.as_str().unwrap_or("?").to_owned())
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default(),
            f["mixes_signed"],
            f["foreign_heads_taken"]
        );
        let last = &f["last_mix"];
        if last.is_object() {
            let short = |v: &serde_json::Value| {
                v.as_str()
                    .unwrap_or("")
                    .chars()
                    .take(12)
                    .collect::<String>()
            };
            println!(
                "last mix  round {} on own head {}",
                last["round"],
                short(&last["own_head"])
            );
            for h in last["foreign"].as_array().into_iter().flatten() {
                println!(
                    "  {} head {}  vouchers {}  distance {:.4}",
                    h["region"].as_str().unwrap_or("?"),
                    short(&h["head"]),
                    h["vouchers"],
                    h["distance"].as_f64().unwrap_or(f64::NAN)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn export(a: &ExportArgs) -> Result<ExitCode, String> {
    let dir = DataDir {
        root: a.data_dir.clone(),
    };
    let (round, id) = ops::export(&dir, &a.out).map_err(|e| e.to_string())?;
    println!("exported round {round} ({id}) to {}", a.out.display());
    Ok(ExitCode::SUCCESS)
}

fn sample(a: &SampleArgs) -> Result<ExitCode, String> {
    use std::io::Write as _;
    if a.bytes > 1 << 20 {
        return Err(format!("--bytes {} above 1048576", a.bytes));
    }
    let dir = DataDir {
        root: a.data_dir.clone(),
    };
    let (round, out) = ops::sample(&dir, a.prompt.as_bytes(), a.bytes, a.temperature, a.seed)
        .map_err(|e| e.to_string())?;
    eprintln!("(the head of round {round})");
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(a.prompt.as_bytes())
        .and_then(|()| stdout.write_all(&out))
        .and_then(|()| stdout.write_all(b"\n"))
        .map_err(|e| format!("writing the sample: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

fn import(a: &ImportArgs) -> Result<ExitCode, String> {
    let dir = DataDir {
        root: a.data_dir.clone(),
    };
    let (round, id) = ops::import(&dir, &a.file).map_err(|e| e.to_string())?;
    println!("imported {} as round {round} ({id})", a.file.display());
    Ok(ExitCode::SUCCESS)
}

fn lineage(a: &LineageArgs) -> Result<ExitCode, String> {
    let dir = DataDir {
        root: a.data_dir.clone(),
    };
    let version = match &a.version {
        Some(v) => Some(v.parse::<ContentId>().map_err(|e| format!("{v:?}: {e}"))?),
        None => None,
    };
    let out = ops::lineage(&dir, version, a.limit).map_err(|e| e.to_string())?;
    println!(
        "{}",
        serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
    );
    Ok(ExitCode::SUCCESS)
}

fn scrub(a: &DirArgs) -> Result<ExitCode, String> {
    let dir = DataDir {
        root: a.data_dir.clone(),
    };
    let report = ops::scrub(&dir).map_err(|e| e.to_string())?;
    println!("{report:#?}");
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn repair(a: &DirArgs) -> Result<ExitCode, String> {
    let dir = DataDir {
        root: a.data_dir.clone(),
    };
    let r = ops::repair(&dir).map_err(|e| e.to_string())?;
    println!(
        "repaired: {} chunks indexed again ({} MiB checked), {} corrupt and not served; \
         refs and manifests were lost: the node starts again from its genesis and takes the \
         region's head from its peers",
        r.index_repairs,
        r.bytes_checked >> 20,
        r.corrupt_chunks.len()
    );
    Ok(ExitCode::SUCCESS)
}

async fn demo(a: DemoArgs) -> Result<ExitCode, String> {
    if !(2..=16).contains(&a.nodes) {
        return Err("--nodes must be between 2 and 16".into());
    }
    if a.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    // The built-in data set: ten overlapping classes, label-skewed shards.
    let all = data::synthetic_with_separation(7, 4000, 20, 10, 0.8);
    let (mut train, mut test) = all.split(0.25, 7).map_err(|e| e.to_string())?;
    let scaler = Scaler::fit(&train);
    scaler.apply(&mut train);
    scaler.apply(&mut test);
    let parts = data::partition(&train, a.nodes, Partition::Dirichlet(0.5), 7)
        .map_err(|e| e.to_string())?;
    let shards: Vec<Dataset> = parts.iter().map(|rows| train.subset(rows)).collect();
    let cfg = Config {
        model_id: "demo".into(),
        region: "loopback".into(),
        model: config::ModelSection {
            inputs: 20,
            ..config::ModelSection::default()
        },
        round: config::RoundSection {
            timeout_ms: 5_000,
            rounds: a.rounds,
            start_peers: a.nodes - 1,
            ..config::RoundSection::default()
        },
        ..Config::default()
    };
    println!(
        "starting {} nodes on 127.0.0.1, {} rounds, label-skewed shards of a built-in data set",
        a.nodes, a.rounds
    );
    let nodes = launch_demo(&cfg, &shards, &test, &a).await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60 + 20 * a.rounds);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let st: Vec<runtime::Status> = nodes.iter().map(|n| n.shared.status()).collect();
        let line: Vec<String> = st
            .iter()
            .map(|s| format!("r{} {:.3}", s.round, s.accuracy.unwrap_or(0.0)))
            .collect();
        println!("{:>4}s  {}", started.elapsed().as_secs(), line.join("  "));
        if st.iter().all(|s| s.finished) || Instant::now() > deadline {
            break;
        }
    }
    let st: Vec<runtime::Status> = nodes.iter().map(|n| n.shared.status()).collect();
    for n in nodes {
        n.stop().await.map_err(|e| e.to_string())?;
    }
    let local = local_only(&cfg, &shards, &test, a.rounds)?;
    println!();
    println!("node  round  accuracy  local-only  head parameters");
    for (i, s) in st.iter().enumerate() {
        println!(
            "{i:>4}  {:>5}  {:>8.4}  {:>10.4}  {}",
            s.round,
            s.accuracy.unwrap_or(0.0),
            local[i],
            s.head_params
                .as_deref()
                .map_or("-", |h| &h[..12.min(h.len())])
        );
    }
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
    let accs: Vec<f32> = st.iter().map(|s| s.accuracy.unwrap_or(0.0)).collect();
    let heads: BTreeSet<&str> = st.iter().filter_map(|s| s.head_params.as_deref()).collect();
    println!(
        "swarm mean {:.4}; local-only mean {:.4}; {} distinct head{}",
        mean(&accs),
        mean(&local),
        heads.len(),
        if heads.len() == 1 {
            " (all agree)"
        } else {
            "s"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Starts the demo's nodes in this process, each on its shard, node 0
/// first and the others bootstrapping from it.
async fn launch_demo(
    cfg: &Config,
    shards: &[Dataset],
    test: &Dataset,
    a: &DemoArgs,
) -> Result<Vec<runtime::Running>, String> {
    let mut nodes = Vec::new();
    let mut first: Option<Multiaddr> = None;
    for (i, shard) in shards.iter().enumerate() {
        let key = Keypair::generate(&mut rand::rngs::OsRng);
        let model = cfg.engine(i as u64).map_err(|e| e.to_string())?;
        let settings = NodeSettings {
            engine: model.clone(),
            train: cfg.train().map_err(|e| e.to_string())?,
            model_seed: cfg.model.seed,
            rounds: Some(a.rounds),
            start_peers: a.nodes - 1,
            start_wait: Duration::from_secs(20),
            min_round: Duration::ZERO,
            keep_versions: cfg.store.keep_versions,
            quota_bytes: None,
            freeze_at_round: None,
            roster: None,
            region_key: None,
            vote_file: None,
            sequences_file: None,
            attestations: 0,
            neighbours: Vec::new(),
        };
        let net = NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().map_err(|e| format!("{e}"))?],
            bootstrap: first.iter().cloned().collect(),
            topics: vec![
                runtime::deltas_topic(&model.model_id, &model.region),
                runtime::models_topic(&model.model_id, &model.region),
            ],
            ..NetConfig::default()
        };
        let running = runtime::launch(Launch {
            key,
            settings,
            store: Arc::new(MemoryStore::new()),
            data: LocalData::rows(shard.clone(), test.clone()),
            net,
            api: Some("127.0.0.1:0".parse().map_err(|e| format!("{e}"))?),
        })
        .await
        .map_err(|e| e.to_string())?;
        if first.is_none() {
            let addr = running
                .listen_addrs()
                .await
                .into_iter()
                .next()
                .ok_or("the first node did not start listening")?;
            first = Some(addr.with(libp2p::multiaddr::Protocol::P2p(running.net.peer_id())));
        }
        nodes.push(running);
    }
    Ok(nodes)
}

/// The local-only baseline of the demo: each node alone on its shard for
/// the same number of rounds; each one's held-out accuracy.
fn local_only(
    cfg: &Config,
    shards: &[Dataset],
    test: &Dataset,
    rounds: u64,
) -> Result<Vec<f32>, String> {
    let spec = cfg.spec().map_err(|e| e.to_string())?;
    let train_cfg = cfg.train().map_err(|e| e.to_string())?;
    let mut local = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let mut p = spec.init(cfg.model.seed);
        let mut state = InnerState::default();
        for r in 0..rounds {
            p = local_round(&spec, &p, shard, &train_cfg, &mut state, (i, r))
                .map_err(|e| e.to_string())?;
        }
        local.push(evaluate(&spec, &p, test).map_err(|e| e.to_string())?.1);
    }
    Ok(local)
}
