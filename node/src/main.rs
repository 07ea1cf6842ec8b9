//! The `tapestry` command: run a node, look at it, and try a swarm locally.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use libp2p::Multiaddr;
use tapestry_core::data::{self, CsvOptions, Dataset, Partition, Scaler};
use tapestry_core::model::{
    InnerState, evaluate, export_safetensors, import_safetensors, train_local,
};
use tapestry_node::config::{self, Config, DataDir};
use tapestry_node::net::NetConfig;
use tapestry_node::runtime::{self, HEAD_REF, Launch, LocalData, NodeSettings};
use tapestry_protocol::{ContentId, Keypair, NodeId, Roster, Signed, Verified};
use tapestry_storage::{ChunkStore, MemoryStore, SledConfig, SledStore};

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
    /// Export, import or trace the model.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Check every chunk in the store against its id; exit 1 if any is corrupt.
    Scrub(DirArgs),
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
    /// The HTTP API address.
    #[arg(long, value_name = "HOST:PORT", env = "TAPESTRY_API")]
    api: Option<String>,
    /// This node's private data (CSV, label last).
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
}

#[derive(Args)]
struct ExportArgs {
    /// The node's data directory.
    #[arg(long, value_name = "DIR", env = "TAPESTRY_DATA_DIR")]
    data_dir: PathBuf,
    /// Output file.
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
    one_kernel_thread();
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
        Command::Model(ModelCommand::Export(a)) => export(&a),
        Command::Model(ModelCommand::Import(a)) => import(&a),
        Command::Model(ModelCommand::Lineage(a)) => lineage(&a),
        Command::Scrub(a) => scrub(&a),
        Command::Demo(a) => tokio_main(demo(a)),
        Command::Region(RegionCommand::New(a)) => region_new(&a),
        Command::Region(RegionCommand::Add(a)) => region_add(&a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tapestry: {e}");
            ExitCode::from(1)
        }
    }
}

/// candle sizes its thread pool on every matrix product by re-reading
/// `/proc/cpuinfo` unless `RAYON_NUM_THREADS` is set (see the README); a
/// node trains small models, so one kernel thread.
#[allow(unsafe_code)]
fn one_kernel_thread() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: the first statement of `main`, before any thread exists,
        // so nothing reads the environment concurrently.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
}

fn logging(format: LogFormat, quiet: bool) {
    let default = if quiet { "warn" } else { "info,libp2p=warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
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
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?
        .block_on(f)
}

fn init(a: &InitArgs) -> Result<ExitCode, String> {
    let dir = DataDir {
        root: a.data_dir.clone(),
    };
    std::fs::create_dir_all(&dir.root)
        .map_err(|e| format!("cannot create {}: {e}", dir.root.display()))?;
    if dir.key().exists() || dir.config().exists() {
        return Err(format!(
            "{} already holds a node (node.key or config.toml); refusing to overwrite it",
            dir.root.display()
        ));
    }
    let key = Keypair::generate(&mut rand::rngs::OsRng);
    key.write_key_file(&dir.key())
        .map_err(|e| format!("{}: {e}", dir.key().display()))?;
    std::fs::write(dir.config(), config::commented(&a.model, &a.region))
        .map_err(|e| format!("{}: {e}", dir.config().display()))?;
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

fn write_roster(path: &Path, roster: Roster, key: &Keypair) -> Result<(), String> {
    let signed = Signed::sign(roster, key).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, signed.envelope_bytes())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn read_roster(path: &Path) -> Result<Verified<Roster>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Signed::<Roster>::open(&bytes)
        .map_err(|e| format!("{}: not a valid signed roster: {e}", path.display()))
}

fn region_new(a: &RegionNewArgs) -> Result<ExitCode, String> {
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    let (key_path, roster_path) = (a.dir.join("region.key"), a.dir.join("roster.cbor"));
    if key_path.exists() || roster_path.exists() {
        return Err(format!(
            "{} already holds a region; refusing to overwrite it",
            a.dir.display()
        ));
    }
    let key = Keypair::generate(&mut rand::rngs::OsRng);
    key.write_key_file(&key_path)
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    let roster = Roster {
        model_id: a.model.clone(),
        region: a.region.clone(),
        version: 1,
        members: Vec::new(),
        created_unix_ms: unix_ms(),
    };
    write_roster(&roster_path, roster, &key)?;
    println!("region key  {}", key.node_id());
    println!(
        "roster      {} (version 1, no members yet)",
        roster_path.display()
    );
    println!(
        "next: tapestry region add --dir {} <node id>...",
        a.dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn region_add(a: &RegionAddArgs) -> Result<ExitCode, String> {
    let (key_path, roster_path) = (a.dir.join("region.key"), a.dir.join("roster.cbor"));
    let key =
        Keypair::read_key_file(&key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
    let current = read_roster(&roster_path)?;
    if current.signer() != key.node_id() {
        return Err(format!(
            "{} is not signed by this region's key",
            roster_path.display()
        ));
    }
    let mut members: BTreeSet<NodeId> = current.message().members.iter().copied().collect();
    for m in &a.members {
        members.insert(
            m.parse::<NodeId>()
                .map_err(|e| format!("node id {m:?}: {e}"))?,
        );
    }
    let next = Roster {
        version: current.message().version + 1,
        members: members.into_iter().collect(),
        created_unix_ms: unix_ms(),
        ..current.message().clone()
    };
    let (version, count) = (next.version, next.members.len());
    write_roster(&roster_path, next, &key)?;
    println!("roster version {version}: {count} members");
    Ok(ExitCode::SUCCESS)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn parse_addrs(list: &[String]) -> Result<Vec<Multiaddr>, String> {
    list.iter()
        .map(|a| {
            a.parse::<Multiaddr>()
                .map_err(|e| format!("bad multiaddr {a:?}: {e}"))
        })
        .collect()
}

/// Loads the data file, keeps a shard of it if asked, scales it with the
/// model's fixed range, and splits off the evaluation rows.
fn local_data(
    cfg: &Config,
    path: &Path,
    shard: Option<&str>,
    node: &NodeId,
) -> Result<LocalData, String> {
    let mut all = data::load_csv(path, CsvOptions::default())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(s) = shard.filter(|s| !s.is_empty()) {
        let bad = || format!("bad --shard {s:?} (SHARD/OF or auto/OF, e.g. 0/3)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let n: usize = n.parse().ok().filter(|n| *n > 0).ok_or_else(bad)?;
        let rows: Vec<usize> = if i == "auto" {
            // Row r is this node's if BLAKE3(node id, r) falls in its 1/n.
            (0..all.len())
                .filter(|r| {
                    let mut h = blake3::Hasher::new();
                    h.update(node.as_bytes());
                    h.update(&(*r as u64).to_le_bytes());
                    let b = h.finalize();
                    u64::from_le_bytes(b.as_bytes()[..8].try_into().unwrap_or([0; 8])) % n as u64
                        == 0
                })
                .collect()
        } else {
            let i: usize = i.parse().ok().filter(|i| *i < n).ok_or_else(bad)?;
            (0..all.len()).filter(|r| r % n == i).collect()
        };
        all = all.subset(&rows);
    }
    if all.n_features != cfg.model.inputs {
        return Err(format!(
            "{} has {} features; the model takes {}",
            path.display(),
            all.n_features,
            cfg.model.inputs
        ));
    }
    let (mut train, mut test) = all
        .split(cfg.data.test_fraction, cfg.model.seed)
        .map_err(|e| e.to_string())?;
    let scaler = Scaler::from_range(cfg.model.inputs, cfg.data.feature_min, cfg.data.feature_max);
    scaler.apply(&mut train);
    scaler.apply(&mut test);
    Ok(LocalData { train, test })
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
        })?;
    }
    let mut cfg = Config::load(&dir.config())
        .map_err(|e| format!("{e} (create the node with tapestry init)"))?;
    if !a.listen.is_empty() {
        cfg.listen = a.listen.clone();
    }
    cfg.bootstrap.extend(a.bootstrap.iter().cloned());
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
    let key =
        Keypair::read_key_file(&dir.key()).map_err(|e| format!("{}: {e}", dir.key().display()))?;
    let data = local_data(
        &cfg,
        Path::new(&cfg.data.path),
        a.shard.as_deref(),
        &key.node_id(),
    )?;
    let seed = u64::from_le_bytes(key.node_id().as_bytes()[..8].try_into().unwrap_or([0; 8]));
    let settings = NodeSettings {
        engine: cfg.engine(seed)?,
        train: cfg.train()?,
        model_seed: cfg.model.seed,
        rounds: (cfg.round.rounds > 0).then_some(cfg.round.rounds),
        start_peers: cfg.round.start_peers,
        start_wait: cfg.start_wait(),
        min_round: Duration::from_millis(cfg.round.min_round_ms),
        roster: if cfg.roster.is_empty() {
            None
        } else {
            Some(read_roster(&dir.root.join(&cfg.roster))?)
        },
        region_key: if cfg.region_key.is_empty() {
            None
        } else {
            Some(
                cfg.region_key
                    .parse::<NodeId>()
                    .map_err(|e| format!("region_key {:?}: {e}", cfg.region_key))?,
            )
        },
        vote_file: Some(dir.last_vote()),
        attestations: cfg.attestations,
    };
    let store = SledStore::open(&dir.store(), &SledConfig::default())
        .map_err(|e| format!("{}: {e}", dir.store().display()))?;
    let model = &settings.engine;
    let net = NetConfig {
        listen: parse_addrs(&cfg.listen)?,
        bootstrap: parse_addrs(&cfg.bootstrap)?,
        mdns: cfg.mdns,
        topics: vec![
            runtime::deltas_topic(&model.model_id, &model.region),
            runtime::models_topic(&model.model_id, &model.region),
        ],
        ..NetConfig::default()
    };
    let running = runtime::launch(Launch {
        key: key.clone(),
        settings,
        store: Arc::new(store),
        data,
        net,
        api: Some(cfg.api_addr()?),
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
    let tmp = dir.root.join("endpoints.json.tmp");
    std::fs::write(&tmp, endpoints.to_string())
        .and_then(|_| std::fs::rename(&tmp, dir.endpoints()))
        .map_err(|e| format!("{}: {e}", dir.endpoints().display()))?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
    }
    running.stop().await.map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

/// A plain HTTP/1.1 GET (the API is local and tiny; no client library).
fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let sock: SocketAddr = addr
        .parse()
        .map_err(|_| format!("api address {addr:?} is not HOST:PORT"))?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(3))
        .map_err(|e| format!("no node API at {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| format!("reading from {addr}: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "{path}: {}",
            head.lines().next().unwrap_or("no status")
        ));
    }
    Ok(body.to_owned())
}

fn status(a: &StatusArgs) -> Result<ExitCode, String> {
    let body = http_get(&a.api, "/status")?;
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
    println!(
        "accuracy  {}  loss {}",
        s["accuracy"]
            .as_f64()
            .map_or("-".into(), |a| format!("{a:.4}")),
        s["loss"].as_f64().map_or("-".into(), |l| format!("{l:.4}"))
    );
    println!("peers     {}", get("peers"));
    println!("bytes     in {}  out {}", get("bytes_in"), get("bytes_out"));
    println!("rejected  {}", s["rejected"]);
    Ok(ExitCode::SUCCESS)
}

fn open_store(dir: &Path) -> Result<SledStore, String> {
    let d = DataDir {
        root: dir.to_path_buf(),
    };
    SledStore::open(
        &d.store(),
        &SledConfig {
            create: false,
            ..SledConfig::default()
        },
    )
    .map_err(|e| format!("{}: {e}", d.store().display()))
}

fn export(a: &ExportArgs) -> Result<ExitCode, String> {
    let cfg = Config::load(
        &DataDir {
            root: a.data_dir.clone(),
        }
        .config(),
    )?;
    let store = open_store(&a.data_dir)?;
    let head = store
        .get_ref(HEAD_REF)
        .map_err(|e| e.to_string())?
        .ok_or("this node has no model version yet")?;
    let m = store
        .get_model_manifest(&head)
        .map_err(|e| e.to_string())?
        .ok_or("the head's manifest is missing (run tapestry scrub)")?;
    let bytes = store
        .read_payload(&m.message().chunk_ids, m.message().payload_bytes)
        .map_err(|e| e.to_string())?;
    let spec = cfg.spec()?;
    export_safetensors(&spec, &runtime::floats(&bytes), &a.out).map_err(|e| e.to_string())?;
    println!(
        "exported round {} ({}) to {}",
        m.message().round,
        head,
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn import(a: &ImportArgs) -> Result<ExitCode, String> {
    let dir = DataDir {
        root: a.data_dir.clone(),
    };
    let cfg = Config::load(&dir.config())?;
    let key =
        Keypair::read_key_file(&dir.key()).map_err(|e| format!("{}: {e}", dir.key().display()))?;
    let spec = cfg.spec()?;
    let params =
        import_safetensors(&spec, &a.file).map_err(|e| format!("{}: {e}", a.file.display()))?;
    if !params.iter().all(|v| v.is_finite()) {
        return Err(format!("{}: non-finite parameters", a.file.display()));
    }
    let store = open_store(&a.data_dir).or_else(|_| {
        SledStore::open(&dir.store(), &SledConfig::default())
            .map_err(|e| format!("{}: {e}", dir.store().display()))
    })?;
    let parent = store
        .get_ref(HEAD_REF)
        .map_err(|e| e.to_string())?
        .and_then(|id| store.get_model_manifest(&id).ok().flatten());
    let bytes: Vec<u8> = tapestry_protocol::f32_le_bytes(&params);
    let chunk_size = tapestry_protocol::DEFAULT_CHUNK_SIZE;
    let chunk_ids = store
        .put_payload(&bytes, chunk_size)
        .map_err(|e| e.to_string())?;
    let manifest = tapestry_protocol::ModelManifest {
        model_id: cfg.model_id.clone(),
        region: cfg.region.clone(),
        round: parent.as_ref().map_or(0, |p| p.message().round + 1),
        author: key.node_id(),
        layout: spec.layout(),
        payload_bytes: bytes.len() as u64,
        chunk_size: chunk_size as u32,
        chunk_ids,
        parents: parent.iter().map(|p| p.id()).collect(),
        deltas: Vec::new(),
        created_unix_ms: unix_ms(),
    };
    let signed = Signed::sign(manifest, &key).map_err(|e| e.to_string())?;
    let id = store
        .put_model_manifest(&signed)
        .map_err(|e| e.to_string())?;
    store.set_ref(HEAD_REF, id).map_err(|e| e.to_string())?;
    store.flush().map_err(|e| e.to_string())?;
    println!(
        "imported {} as round {} ({id})",
        a.file.display(),
        signed.message().round
    );
    Ok(ExitCode::SUCCESS)
}

fn lineage(a: &LineageArgs) -> Result<ExitCode, String> {
    let store = open_store(&a.data_dir)?;
    let version = match &a.version {
        Some(v) => v.parse::<ContentId>().map_err(|e| format!("{v:?}: {e}"))?,
        None => store
            .get_ref(HEAD_REF)
            .map_err(|e| e.to_string())?
            .ok_or("this node has no model version yet")?,
    };
    let l = store.lineage(version, a.limit).map_err(|e| e.to_string())?;
    // The signed deltas, by author, whose manifests this node holds.
    let mut by_author: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut rounds: std::collections::BTreeMap<String, std::collections::BTreeSet<u64>> =
        Default::default();
    let mut absent = Vec::new();
    for id in &l.deltas {
        match store.get_delta_manifest(id).map_err(|e| e.to_string())? {
            Some(m) => {
                let author = m.message().author.to_string();
                rounds
                    .entry(author.clone())
                    .or_default()
                    .insert(m.message().round);
                by_author.entry(author).or_default().push(id.to_string());
            }
            None => absent.push(id.to_string()),
        }
    }
    // Per version: its round, and how many deltas of how many distinct
    // authors it aggregated (as far as their manifests are held).
    let mut per_version = serde_json::Map::new();
    for v in &l.versions {
        if let Some(m) = store.get_model_manifest(v).map_err(|e| e.to_string())? {
            let m = m.message();
            let authors: std::collections::BTreeSet<String> = m
                .deltas
                .iter()
                .filter_map(|d| store.get_delta_manifest(d).ok().flatten())
                .map(|d| d.message().author.to_string())
                .collect();
            per_version.insert(
                v.to_string(),
                serde_json::json!({
                    "round": m.round,
                    "parents": m.parents.len(),
                    "deltas": m.deltas.len(),
                    "authors": authors.len(),
                }),
            );
        }
    }
    let out = serde_json::json!({
        "version": version.to_string(),
        "by_version": per_version,
        "versions": l.versions.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "deltas_by_author": by_author,
        "rounds_by_author": rounds,
        "deltas_not_held": absent,
        "versions_not_held": l.missing_versions.iter().map(ToString::to_string).collect::<Vec<_>>(),
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
    );
    Ok(ExitCode::SUCCESS)
}

fn scrub(a: &DirArgs) -> Result<ExitCode, String> {
    let store = open_store(&a.data_dir)?;
    let report = store.scrub().map_err(|e| e.to_string())?;
    println!("{report:#?}");
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
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
    let mut nodes = Vec::new();
    let mut first: Option<Multiaddr> = None;
    for (i, shard) in shards.iter().enumerate() {
        let key = Keypair::generate(&mut rand::rngs::OsRng);
        let model = cfg.engine(i as u64)?;
        let settings = NodeSettings {
            engine: model.clone(),
            train: cfg.train()?,
            model_seed: cfg.model.seed,
            rounds: Some(a.rounds),
            start_peers: a.nodes - 1,
            start_wait: Duration::from_secs(20),
            min_round: Duration::ZERO,
            roster: None,
            region_key: None,
            vote_file: None,
            attestations: 0,
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
            data: LocalData {
                train: shard.clone(),
                test: test.clone(),
            },
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
    // Local-only: each node alone on its shard for the same number of steps.
    let spec = cfg.spec()?;
    let train_cfg = cfg.train()?;
    let mut local = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let mut p = spec.init(cfg.model.seed);
        let mut state = InnerState::default();
        for r in 0..a.rounds {
            p = train_local(
                &spec,
                &p,
                shard,
                &train_cfg,
                &mut state,
                (i as u64) << 32 | r,
            )
            .map_err(|e| e.to_string())?
            .0;
        }
        local.push(evaluate(&spec, &p, &test).map_err(|e| e.to_string())?.1);
    }
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
