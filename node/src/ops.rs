//! What the `tapestry` command does to a node's files, as library calls
//! with typed errors: create a node or a region, read a node's settings and
//! data, and export, import, trace and scrub its model versions. The
//! command (`src/main.rs`) parses arguments, calls these and prints.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tapestry_core::data::{self, CsvOptions, Scaler};
use tapestry_core::model::{Architecture, Examples, export_safetensors, import_safetensors};
use tapestry_protocol::{
    ContentId, KeyFileError, Keypair, ModelManifest, NodeId, Roster, Signed, Verified,
};
use tapestry_storage::{ChunkStore, ScrubReport, SledConfig, SledStore, StoreError};

use crate::config::{self, Config, DataDir};
use crate::runtime::{HEAD_REF, LocalData, NodeSettings};

/// Why an operation on a node's files failed. Each message names the file
/// or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// A key file could not be read or written.
    #[error("{}: {source}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        source: KeyFileError,
    },
    /// The chunk store failed (at `path`, if it was being opened).
    #[error("{}{source}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Store {
        /// The store's directory, when opening it failed.
        path: Option<PathBuf>,
        /// Why.
        source: StoreError,
    },
    /// The directory already holds a node or a region.
    #[error("{} already holds {what}; refusing to overwrite it", path.display())]
    Exists {
        /// The directory.
        path: PathBuf,
        /// What it holds.
        what: &'static str,
    },
    /// The store's database is damaged; `tapestry repair` rebuilds it.
    #[error("{source}: stop the node and run `tapestry repair --data-dir {}`", dir.display())]
    Damaged {
        /// The node's data directory.
        dir: PathBuf,
        /// What the store found.
        source: StoreError,
    },
    /// The node has no model version to work on.
    #[error("this node has no model version yet: run it first (tapestry run --data-dir {})", dir.display())]
    NoModel {
        /// Its data directory.
        dir: PathBuf,
    },
    /// The node's configuration cannot be used.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A file's contents or an argument is wrong.
    #[error("{0}")]
    Invalid(String),
}

impl From<StoreError> for OpsError {
    fn from(source: StoreError) -> Self {
        OpsError::Store { path: None, source }
    }
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> OpsError + '_ {
    move |source| OpsError::File {
        path: path.to_owned(),
        source,
    }
}

fn key_error(path: &Path) -> impl FnOnce(KeyFileError) -> OpsError + '_ {
    move |source| OpsError::Key {
        path: path.to_owned(),
        source,
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Creates a node in `dir`: a new identity key (0600) and a commented
/// `config.toml` for `model` in `region`. Refuses a directory that holds
/// either already. Returns the key.
pub fn init(
    dir: &DataDir,
    model: &str,
    region: &str,
    architecture: &Architecture,
) -> Result<Keypair, OpsError> {
    config::check_name("model", model).map_err(OpsError::Invalid)?;
    config::check_name("region", region).map_err(OpsError::Invalid)?;
    std::fs::create_dir_all(&dir.root).map_err(|source| {
        OpsError::Invalid(format!("cannot create {}: {source}", dir.root.display()))
    })?;
    if dir.key().exists() || dir.config().exists() {
        return Err(OpsError::Exists {
            path: dir.root.clone(),
            what: "a node (node.key or config.toml)",
        });
    }
    let key = Keypair::generate(&mut rand::rngs::OsRng);
    key.write_key_file(&dir.key())
        .map_err(key_error(&dir.key()))?;
    std::fs::write(dir.config(), config::commented(model, region, architecture))
        .map_err(file_error(&dir.config()))?;
    Ok(key)
}

/// Reads a node's identity key.
pub fn read_key(dir: &DataDir) -> Result<Keypair, OpsError> {
    Keypair::read_key_file(&dir.key()).map_err(key_error(&dir.key()))
}

/// Reads a node's configuration.
pub fn read_config(dir: &DataDir) -> Result<Config, OpsError> {
    Ok(Config::load(&dir.config())?)
}

/// Signs `roster` with the region key and writes it (tmp file, rename).
fn write_roster(path: &Path, roster: Roster, key: &Keypair) -> Result<(), OpsError> {
    let signed = Signed::sign(roster, key).map_err(|e| OpsError::Invalid(e.to_string()))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, signed.envelope_bytes())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(file_error(path))
}

/// Reads a signed roster (its signature checked; whose key signed it is
/// the caller's to check).
pub fn read_roster(path: &Path) -> Result<Verified<Roster>, OpsError> {
    let bytes = std::fs::read(path).map_err(file_error(path))?;
    Signed::<Roster>::open(&bytes).map_err(|e| {
        OpsError::Invalid(format!(
            "{}: not a valid signed roster: {e}",
            path.display()
        ))
    })
}

/// Creates a permissioned region in `dir`: a region key and a signed
/// roster (version 1, no members). Returns the region key's id.
pub fn region_new(dir: &Path, model: &str, region: &str) -> Result<NodeId, OpsError> {
    std::fs::create_dir_all(dir).map_err(file_error(dir))?;
    let (key_path, roster_path) = (dir.join("region.key"), dir.join("roster.cbor"));
    if key_path.exists() || roster_path.exists() {
        return Err(OpsError::Exists {
            path: dir.to_owned(),
            what: "a region",
        });
    }
    let key = Keypair::generate(&mut rand::rngs::OsRng);
    key.write_key_file(&key_path)
        .map_err(key_error(&key_path))?;
    let roster = Roster {
        model_id: model.to_owned(),
        region: region.to_owned(),
        version: 1,
        members: Vec::new(),
        created_unix_ms: unix_ms(),
    };
    write_roster(&roster_path, roster, &key)?;
    Ok(key.node_id())
}

/// Adds `members` to the region in `dir` (signed by its region key) as the
/// roster's next version. Returns (version, members now).
pub fn region_add(dir: &Path, members: &[NodeId]) -> Result<(u64, usize), OpsError> {
    let (key_path, roster_path) = (dir.join("region.key"), dir.join("roster.cbor"));
    let key = Keypair::read_key_file(&key_path).map_err(key_error(&key_path))?;
    let current = read_roster(&roster_path)?;
    if current.signer() != key.node_id() {
        return Err(OpsError::Invalid(format!(
            "{} is not signed by this region's key",
            roster_path.display()
        )));
    }
    let mut all: BTreeSet<NodeId> = current.message().members.iter().copied().collect();
    all.extend(members.iter().copied());
    let next = Roster {
        version: current.message().version + 1,
        members: all.into_iter().collect(),
        created_unix_ms: unix_ms(),
        ..current.message().clone()
    };
    let (version, count) = (next.version, next.members.len());
    write_roster(&roster_path, next, &key)?;
    Ok((version, count))
}

/// A region [`federation_init`] made: its name, region key and nodes'
/// data directories.
#[derive(Debug, Clone)]
pub struct FederatedRegion {
    /// Its name.
    pub name: String,
    /// Its region key.
    pub key: NodeId,
    /// Its nodes' data directories and ids.
    pub nodes: Vec<(PathBuf, NodeId)>,
}

/// Creates regions that federate, ready to run, under `dir`: for each
/// `(name, n)` of `regions`, `dir/NAME/` with a region key and a roster
/// holding `n` nodes created in `dir/NAME/nodeI/`, each configured with its
/// roster and a `[federation]` mixing every `every` rounds with its
/// neighbours in `graph` (`ring` or `complete`), whose rosters it names by
/// paths relative to its own directory (so `dir` can be moved or mounted
/// elsewhere whole).
pub fn federation_init(
    dir: &Path,
    model: &str,
    regions: &[(String, usize)],
    every: u64,
    graph: &str,
) -> Result<Vec<FederatedRegion>, OpsError> {
    if regions.len() < 2 {
        return Err(OpsError::Invalid(
            "a federation needs at least two regions".into(),
        ));
    }
    if every == 0 {
        return Err(OpsError::Invalid("--every must be at least 1".into()));
    }
    let names: Vec<String> = regions.iter().map(|(n, _)| n.clone()).collect();
    if names.iter().collect::<BTreeSet<_>>().len() != names.len() {
        return Err(OpsError::Invalid("two regions with one name".into()));
    }
    for (name, n) in regions {
        config::check_name("region", name).map_err(OpsError::Invalid)?;
        if *n == 0 {
            return Err(OpsError::Invalid(format!("region {name} needs a node")));
        }
    }
    let edges = config::graph_edges(&names, graph).map_err(OpsError::Invalid)?;
    let mut made = Vec::new();
    for (name, n) in regions {
        let rdir = dir.join(name);
        let key = region_new(&rdir, model, name)?;
        let mut nodes = Vec::new();
        for i in 0..*n {
            let node = DataDir {
                root: rdir.join(format!("node{i}")),
            };
            let id = init(&node, model, name, &Architecture::Logistic)?.node_id();
            nodes.push((node.root, id));
        }
        let ids: Vec<NodeId> = nodes.iter().map(|(_, id)| *id).collect();
        region_add(&rdir, &ids)?;
        made.push(FederatedRegion {
            name: name.clone(),
            key,
            nodes,
        });
    }
    for r in &made {
        for (root, _) in &r.nodes {
            let node = DataDir { root: root.clone() };
            let mut cfg = read_config(&node)?;
            cfg.roster = "../roster.cbor".into();
            cfg.region_key = r.key.to_string();
            cfg.federation.every = every;
            cfg.federation.edges = edges.clone();
            cfg.federation.neighbours = made
                .iter()
                .filter(|o| {
                    edges.iter().any(|(a, b)| {
                        (*a == r.name && *b == o.name) || (*b == r.name && *a == o.name)
                    })
                })
                .map(|o| config::NeighbourSection {
                    region: o.name.clone(),
                    roster: format!("../../{}/roster.cbor", o.name),
                    region_key: o.key.to_string(),
                    attestations: 0,
                })
                .collect();
            cfg.federation()
                .map_err(|e| OpsError::Invalid(e.to_string()))?;
            let text = toml::to_string(&cfg).map_err(|e| OpsError::Invalid(e.to_string()))?;
            std::fs::write(node.config(), text).map_err(file_error(&node.config()))?;
        }
    }
    Ok(made)
}

/// The rows of `len` that shard `spec` (`I/N`: every N-th row from I;
/// `auto/N`: the rows whose BLAKE3 with `node` falls in its 1/N) keeps.
pub fn shard_rows(spec: &str, len: usize, node: &NodeId) -> Result<Vec<usize>, OpsError> {
    let bad = || {
        OpsError::Invalid(format!(
            "bad --shard {spec:?} (SHARD/OF or auto/OF, e.g. 0/3)"
        ))
    };
    let (i, n) = spec.split_once('/').ok_or_else(bad)?;
    let n: usize = n.parse().ok().filter(|n| *n > 0).ok_or_else(bad)?;
    if i == "auto" {
        // Row r is this node's if BLAKE3(node id, r) falls in its 1/n.
        return Ok((0..len)
            .filter(|r| {
                let mut h = blake3::Hasher::new();
                h.update(node.as_bytes());
                h.update(&(*r as u64).to_le_bytes());
                let b = h.finalize();
                u64::from_le_bytes(b.as_bytes()[..8].try_into().unwrap_or([0; 8])) % n as u64 == 0
            })
            .collect());
    }
    let i: usize = i.parse().ok().filter(|i| *i < n).ok_or_else(bad)?;
    Ok((0..len).filter(|r| r % n == i).collect())
}

/// Loads the data file, keeps a shard of it if asked, scales it with the
/// model's fixed range, and splits off the evaluation rows. A language
/// model's data is text instead: a corpus file or a directory of them
/// ([`local_text`]).
pub fn local_data(
    cfg: &Config,
    path: &Path,
    shard: Option<&str>,
    node: &NodeId,
) -> Result<LocalData, OpsError> {
    if cfg.model.architecture.is_text() {
        return local_text(path, shard);
    }
    let mut all = data::load_csv(path, CsvOptions::default())
        .map_err(|e| OpsError::Invalid(e.to_string()))?;
    if let Some(bad) = all
        .labels
        .iter()
        .find(|l| **l as usize >= cfg.model.classes)
    {
        return Err(OpsError::Invalid(format!(
            "{} has label {bad}, but the model has {} classes (labels 0 to {}; [model] classes)",
            path.display(),
            cfg.model.classes,
            cfg.model.classes.saturating_sub(1)
        )));
    }
    if let Some(s) = shard.filter(|s| !s.is_empty()) {
        let rows = shard_rows(s, all.len(), node)?;
        all = all.subset(&rows);
    }
    if all.n_features != cfg.model.inputs {
        return Err(OpsError::Invalid(format!(
            "{} has {} features; the model takes {}",
            path.display(),
            all.n_features,
            cfg.model.inputs
        )));
    }
    let (mut train, mut test) = all
        .split(cfg.data.test_fraction, cfg.model.seed)
        .map_err(|e| OpsError::Invalid(e.to_string()))?;
    if train.is_empty() {
        return Err(OpsError::Invalid(format!(
            "{}{} leaves no rows to train on",
            path.display(),
            shard.map(|s| format!(" (shard {s})")).unwrap_or_default()
        )));
    }
    let scaler = Scaler::from_range(cfg.model.inputs, cfg.data.feature_min, cfg.data.feature_max);
    scaler.apply(&mut train);
    scaler.apply(&mut test);
    Ok(LocalData::rows(train, test))
}

/// A language model's data: the corpus file at `path`, or every corpus
/// file in the directory `path` (one part each, named by the file name up
/// to its first `.`, e.g. the language), every tenth quote or paragraph
/// held out. A `text:` prefix on the path is accepted and ignored.
pub fn local_text(path: &Path, shard: Option<&str>) -> Result<LocalData, OpsError> {
    if shard.is_some_and(|s| !s.is_empty()) {
        return Err(OpsError::Invalid(
            "--shard cuts the rows of a CSV file; a language model's node reads the corpus files it is given (give each node its own file or directory)".into(),
        ));
    }
    let raw = path.to_string_lossy();
    let path = Path::new(raw.strip_prefix("text:").unwrap_or(&raw));
    let (train, test) = tapestry_core::text::load_texts(path)
        .map_err(|e| OpsError::Invalid(format!("{e} (a transformer trains on text: a UTF-8 or fortune-format file, .gz or not, or a directory of them)")))?;
    Ok(LocalData {
        train: Examples::Text(train),
        test: Examples::Text(test),
    })
}

/// The running node's settings from its configuration, data directory
/// and key (the engine's seed comes from the node id).
pub fn node_settings(cfg: &Config, dir: &DataDir, key: &Keypair) -> Result<NodeSettings, OpsError> {
    let seed = u64::from_le_bytes(key.node_id().as_bytes()[..8].try_into().unwrap_or([0; 8]));
    Ok(NodeSettings {
        engine: cfg.engine(seed)?,
        train: cfg.train()?,
        model_seed: cfg.model.seed,
        rounds: (cfg.round.rounds > 0).then_some(cfg.round.rounds),
        start_peers: cfg.round.start_peers,
        start_wait: cfg.start_wait(),
        min_round: Duration::from_millis(cfg.round.min_round_ms),
        keep_versions: cfg.store.keep_versions,
        quota_bytes: (cfg.store.quota_mb > 0).then(|| cfg.store.quota_mb.saturating_mul(1 << 20)),
        freeze_at_round: None,
        roster: if cfg.roster.is_empty() {
            None
        } else {
            Some(read_roster(&dir.root.join(&cfg.roster))?)
        },
        region_key: if cfg.region_key.is_empty() {
            None
        } else {
            Some(
                cfg.region_key.parse::<NodeId>().map_err(|e| {
                    OpsError::Invalid(format!("region_key {:?}: {e}", cfg.region_key))
                })?,
            )
        },
        vote_file: Some(dir.last_vote()),
        sequences_file: Some(dir.sequences()),
        attestations: cfg.attestations,
        neighbours: cfg
            .federation
            .neighbours
            .iter()
            .map(|n| neighbour(cfg, dir, n))
            .collect::<Result<_, _>>()?,
    })
}

/// A neighbouring region of the federation: its roster read, signed by
/// its region key, and governing this model and that region.
fn neighbour(
    cfg: &Config,
    dir: &DataDir,
    n: &crate::config::NeighbourSection,
) -> Result<crate::runtime::Neighbour, OpsError> {
    let what = format!("federation neighbour {:?}", n.region);
    let key = n
        .region_key
        .parse::<NodeId>()
        .map_err(|e| OpsError::Invalid(format!("{what}: region_key {:?}: {e}", n.region_key)))?;
    let roster = read_roster(&dir.root.join(&n.roster))?;
    if roster.signer() != key {
        return Err(OpsError::Invalid(format!(
            "{what}: its roster is signed by {}, not by its region key {key}",
            roster.signer()
        )));
    }
    let r = roster.message();
    if r.model_id != cfg.model_id || r.region != n.region {
        return Err(OpsError::Invalid(format!(
            "{what}: its roster governs {}/{}, not {}/{}",
            r.model_id, r.region, cfg.model_id, n.region
        )));
    }
    Ok(crate::runtime::Neighbour {
        region: n.region.clone(),
        roster,
        attestations: n.attestations,
    })
}

/// Opens a node's store, creating it if `create`.
pub fn open_store(dir: &DataDir, create: bool) -> Result<SledStore, OpsError> {
    if !create && !dir.store().exists() {
        return Err(OpsError::NoModel {
            dir: dir.root.clone(),
        });
    }
    SledStore::open(
        &dir.store(),
        &SledConfig {
            create,
            ..SledConfig::default()
        },
    )
    .map_err(|source| match source {
        StoreError::DamagedDatabase { .. } => OpsError::Damaged {
            dir: dir.root.clone(),
            source,
        },
        source => OpsError::Store {
            path: Some(dir.store()),
            source,
        },
    })
}

/// The node's head version, if it has one.
fn head(store: &SledStore, dir: &DataDir) -> Result<Verified<ModelManifest>, OpsError> {
    let id = store.get_ref(HEAD_REF)?.ok_or_else(|| OpsError::NoModel {
        dir: dir.root.clone(),
    })?;
    store.get_model_manifest(&id)?.ok_or_else(|| {
        OpsError::Invalid("the head's manifest is missing (run tapestry scrub)".into())
    })
}

/// The node's head version and its parameters.
fn head_params(dir: &DataDir) -> Result<(Verified<ModelManifest>, Vec<f32>), OpsError> {
    let store = open_store(dir, false)?;
    let m = head(&store, dir)?;
    let bytes = store.read_payload(&m.message().chunk_ids, m.message().payload_bytes)?;
    Ok((m, tapestry_protocol::f32_from_le_bytes(&bytes)))
}

/// Where a Hugging Face `config.json` goes for a model file: beside it.
pub fn config_json_beside(file: &Path) -> PathBuf {
    file.with_file_name("config.json")
}

/// Writes the node's head model to `out` (safetensors); for a transformer
/// also a GPT-2 `config.json` beside it, so the directory loads with
/// Hugging Face's `GPT2LMHeadModel.from_pretrained` (name the file
/// `model.safetensors`). Returns the version's round and id.
pub fn export(dir: &DataDir, out: &Path) -> Result<(u64, ContentId), OpsError> {
    let cfg = read_config(dir)?;
    let spec = cfg.spec()?;
    let (m, params) = head_params(dir)?;
    export_safetensors(&spec, &params, out).map_err(|e| OpsError::Invalid(e.to_string()))?;
    if let Some(t) = spec.transformer() {
        let path = config_json_beside(out);
        std::fs::write(&path, t.gpt2_config_json())
            .map_err(|e| OpsError::Invalid(format!("{}: {e}", path.display())))?;
    }
    Ok((m.message().round, m.id()))
}

/// `bytes` bytes continuing `prompt` from the node's head (a transformer):
/// see [`tapestry_core::transformer::Transformer::sample`]. Returns the
/// head's round and the bytes.
pub fn sample(
    dir: &DataDir,
    prompt: &[u8],
    bytes: usize,
    temperature: f32,
    seed: u64,
) -> Result<(u64, Vec<u8>), OpsError> {
    let cfg = read_config(dir)?;
    let spec = cfg.spec()?;
    let Some(t) = spec.transformer() else {
        return Err(OpsError::Invalid(format!(
            "the model is {}, not a language model (architecture = \"transformer:LAYERS,WIDTH,HEADS,CONTEXT\")",
            cfg.model.architecture
        )));
    };
    let (m, params) = head_params(dir)?;
    let out = t
        .sample(&params, prompt, bytes, temperature, seed)
        .map_err(|e| OpsError::Invalid(e.to_string()))?;
    Ok((m.message().round, out))
}

/// Makes the model in `file` (safetensors) the node's head: a version of
/// the round after its head's, signed by the node, with the head as
/// parent. Returns the new version's round and id.
pub fn import(dir: &DataDir, file: &Path) -> Result<(u64, ContentId), OpsError> {
    let cfg = read_config(dir)?;
    let key = read_key(dir)?;
    let spec = cfg.spec()?;
    if let Some(t) = spec.transformer() {
        // A GPT-2 directory's config.json, if there is one, must describe
        // this node's model (the tensors are checked below in any case).
        let path = config_json_beside(file);
        let json = match std::fs::read_to_string(&path) {
            Ok(json) => Some(json),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(OpsError::Invalid(format!(
                    "{}: {e} (a config.json beside the model must describe it; move it away to import without one)",
                    path.display()
                )));
            }
        };
        if let Some(json) = json {
            let theirs = tapestry_core::transformer::Transformer::from_gpt2_config(&json)
                .map_err(|e| OpsError::Invalid(format!("{}: {e}", path.display())))?;
            if theirs != *t {
                return Err(OpsError::Invalid(format!(
                    "{} describes transformer:{theirs}, the node's model is transformer:{t}",
                    path.display()
                )));
            }
        }
    }
    let params = import_safetensors(&spec, file)
        .map_err(|e| OpsError::Invalid(format!("{}: {e}", file.display())))?;
    if !params.iter().all(|v| v.is_finite()) {
        return Err(OpsError::Invalid(format!(
            "{}: non-finite parameters",
            file.display()
        )));
    }
    let store = open_store(dir, true)?;
    let parent = store
        .get_ref(HEAD_REF)?
        .and_then(|id| store.get_model_manifest(&id).ok().flatten());
    let bytes: Vec<u8> = tapestry_protocol::f32_le_bytes(&params);
    let chunk_size = tapestry_protocol::DEFAULT_CHUNK_SIZE;
    let chunk_ids = store.put_payload(&bytes, chunk_size)?;
    let manifest = ModelManifest {
        model_id: cfg.model_id.clone(),
        region: cfg.region.clone(),
        round: parent
            .as_ref()
            .map_or(0, |p| p.message().round.saturating_add(1)),
        author: key.node_id(),
        layout: spec.layout(),
        payload_bytes: bytes.len() as u64,
        chunk_size: chunk_size as u32,
        chunk_ids,
        parents: parent.iter().map(|p| p.id()).collect(),
        deltas: Vec::new(),
        created_unix_ms: unix_ms(),
    };
    let signed = Signed::sign(manifest, &key).map_err(|e| OpsError::Invalid(e.to_string()))?;
    let id = store.put_model_manifest(&signed)?;
    store.set_ref(HEAD_REF, id)?;
    store.flush()?;
    Ok((signed.message().round, id))
}

/// The signed contributions behind `version` (default: the head), as far
/// back as `limit` versions: per version its round, parents, deltas and
/// distinct authors; the deltas by author and their rounds; what is not
/// held.
pub fn lineage(
    dir: &DataDir,
    version: Option<ContentId>,
    limit: usize,
) -> Result<serde_json::Value, OpsError> {
    let store = open_store(dir, false)?;
    let version = match version {
        Some(v) => v,
        None => head(&store, dir)?.id(),
    };
    let l = store.lineage(version, limit)?;
    // The signed deltas, by author, whose manifests this node holds.
    let mut by_author: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut rounds: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut absent = Vec::new();
    for id in &l.deltas {
        match store.get_delta_manifest(id)? {
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
        if let Some(m) = store.get_model_manifest(v)? {
            let m = m.message();
            let authors: BTreeSet<String> = m
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
    Ok(serde_json::json!({
        "version": version.to_string(),
        "by_version": per_version,
        "versions": l.versions.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "deltas_by_author": by_author,
        "rounds_by_author": rounds,
        "deltas_not_held": absent,
        "versions_not_held": l.missing_versions.iter().map(ToString::to_string).collect::<Vec<_>>(),
    }))
}

/// Rehashes every chunk of the node's store.
pub fn scrub(dir: &DataDir) -> Result<ScrubReport, OpsError> {
    Ok(open_store(dir, false)?.scrub()?)
}

/// Rebuilds the store's database from its pack files (see
/// [`SledStore::repair`]): the damaged database is kept aside, every sound
/// chunk record is indexed again. What lived only in the database —
/// manifests, refs (the head among them), pins — is gone: the node starts
/// again from its genesis and takes the region's head from its peers as a
/// new node does, without fetching the chunks it still holds. Its
/// identity, sequence numbers and last vote are files of their own and are
/// kept.
pub fn repair(dir: &DataDir) -> Result<ScrubReport, OpsError> {
    if !dir.store().exists() {
        return Err(OpsError::NoModel {
            dir: dir.root.clone(),
        });
    }
    let (store, report) = SledStore::repair(&dir.store()).map_err(|source| OpsError::Store {
        path: Some(dir.store()),
        source,
    })?;
    drop(store);
    Ok(report)
}

/// Writes where a running node can be reached (`endpoints.json`: node and
/// peer ids, API and listen addresses), replacing the file atomically.
pub fn write_endpoints(dir: &DataDir, endpoints: &serde_json::Value) -> Result<(), OpsError> {
    let tmp = dir.root.join("endpoints.json.tmp");
    std::fs::write(&tmp, endpoints.to_string())
        .and_then(|_| std::fs::rename(&tmp, dir.endpoints()))
        .map_err(file_error(&dir.endpoints()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn data_that_cannot_train_the_model_stops_the_node_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        let csv = tmp.path().join("d.csv");
        let cfg = Config {
            model: config::ModelSection {
                inputs: 2,
                classes: 3,
                ..Default::default()
            },
            ..Default::default()
        };
        let node = Keypair::from_secret_bytes(&[1; 32]).node_id();
        let rows: String = (0..20).map(|i| format!("{i},1,{}\n", i % 3)).collect();
        std::fs::write(&csv, &rows).unwrap();
        assert!(local_data(&cfg, &csv, None, &node).is_ok());
        // A label the model has no class for.
        std::fs::write(&csv, format!("{rows}4,4,3\n")).unwrap();
        let err = local_data(&cfg, &csv, None, &node).unwrap_err().to_string();
        assert!(
            err.contains("label 3") && err.contains("3 classes"),
            "{err}"
        );
        // A shard that leaves nothing to train on.
        std::fs::write(&csv, "1,1,0\n2,2,1\n").unwrap();
        let err = local_data(&cfg, &csv, Some("5/9"), &node)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no rows to train on"), "{err}");
    }

    fn node_dir() -> (tempfile::TempDir, DataDir) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir {
            root: tmp.path().join("node"),
        };
        (tmp, dir)
    }

    #[test]
    fn a_new_node_refuses_a_second_init_and_says_it_has_no_model_yet() {
        let (_tmp, dir) = node_dir();
        let key = init(&dir, "digits", "europe", &Architecture::Logistic).unwrap();
        assert_eq!(read_key(&dir).unwrap().node_id(), key.node_id());
        assert_eq!(read_config(&dir).unwrap().region, "europe");
        let again = init(&dir, "digits", "europe", &Architecture::Logistic).unwrap_err();
        assert!(matches!(again, OpsError::Exists { .. }), "{again}");
        assert!(
            again.to_string().contains("refusing to overwrite"),
            "{again}"
        );
        // Never run: no store yet. Export, lineage and scrub say so plainly
        // (and create nothing).
        let out = dir.root.join("model.safetensors");
        for e in [
            export(&dir, &out).unwrap_err(),
            lineage(&dir, None, 10).unwrap_err(),
            scrub(&dir).unwrap_err(),
        ] {
            assert!(matches!(e, OpsError::NoModel { .. }), "{e}");
            assert!(e.to_string().contains("run it first"), "{e}");
        }
        assert!(!dir.store().exists());
        assert!(!out.exists());
    }

    #[test]
    fn an_imported_model_becomes_the_head_and_exports_unchanged() {
        let (_tmp, dir) = node_dir();
        init(&dir, "digits", "europe", &Architecture::Logistic).unwrap();
        let spec = read_config(&dir).unwrap().spec().unwrap();
        let params = spec.init(3);
        let file = dir.root.join("in.safetensors");
        export_safetensors(&spec, &params, &file).unwrap();
        let (round, id) = import(&dir, &file).unwrap();
        assert_eq!(round, 0);
        // A second import builds on the first.
        let (round2, id2) = import(&dir, &file).unwrap();
        assert_eq!(round2, 1);
        assert_ne!(id, id2);
        let out = dir.root.join("out.safetensors");
        assert_eq!(export(&dir, &out).unwrap(), (1, id2));
        assert_eq!(import_safetensors(&spec, &out).unwrap(), params);
        let l = lineage(&dir, None, 10).unwrap();
        assert_eq!(l["versions"].as_array().unwrap().len(), 2, "{l}");
        assert!(scrub(&dir).unwrap().is_clean());
        // A file that is not this model's is refused, naming the file.
        std::fs::write(&file, b"not safetensors").unwrap();
        let e = import(&dir, &file).unwrap_err();
        assert!(e.to_string().contains("in.safetensors"), "{e}");
    }

    #[test]
    fn a_region_roster_grows_by_signed_versions() {
        let tmp = tempfile::tempdir().unwrap();
        let region = tmp.path().join("region");
        region_new(&region, "digits", "europe").unwrap();
        let e = region_new(&region, "digits", "europe").unwrap_err();
        assert!(matches!(e, OpsError::Exists { .. }), "{e}");
        let a = Keypair::from_secret_bytes(&[1; 32]).node_id();
        let b = Keypair::from_secret_bytes(&[2; 32]).node_id();
        assert_eq!(region_add(&region, &[a]).unwrap(), (2, 1));
        assert_eq!(region_add(&region, &[a, b]).unwrap(), (3, 2));
        let roster = read_roster(&region.join("roster.cbor")).unwrap();
        assert_eq!(roster.message().members.len(), 2);
        // A roster file that is not one is an error naming it.
        std::fs::write(region.join("roster.cbor"), b"junk").unwrap();
        let e = region_add(&region, &[a]).unwrap_err();
        assert!(e.to_string().contains("roster.cbor"), "{e}");
    }

    #[test]
    fn shards_split_the_rows_without_overlap() {
        let node = Keypair::from_secret_bytes(&[7; 32]).node_id();
        let all: Vec<usize> = (0..3)
            .flat_map(|i| shard_rows(&format!("{i}/3"), 100, &node).unwrap())
            .collect();
        let mut sorted = all.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        let auto = shard_rows("auto/4", 1000, &node).unwrap();
        assert!((150..350).contains(&auto.len()), "{}", auto.len());
        for bad in ["3/3", "x/2", "1/0", "1"] {
            let e = shard_rows(bad, 10, &node).unwrap_err();
            assert!(e.to_string().contains("bad --shard"), "{bad}: {e}");
        }
    }
}
