//! `tapestry-testkit`: what the tests and benchmarks of every crate share.
//! Only for development: the data files it points at live beside the
//! checkout (`../shared/data`), never in a build.
//!
//! - [`digits_path`], [`digits`], [`digits_split`]: the scikit-learn
//!   digits (1,797 rows, 64 pixel counts 0..=16, ten classes), scaled from
//!   their declared range like a node's config does.
//! - [`logistic`], [`sgd`]: the small model and optimiser most tests use;
//!   [`engine_config`]: a broadcast region of that model.
//! - [`sign`]: signed test versions and deltas of a region's model.
//! - [`swarm`]: round engines driven through an in-memory queue.

pub mod sign;
pub mod swarm;

use std::path::PathBuf;

use tapestry_core::aggregate::AggregationRule;
use tapestry_core::data::{self, CsvOptions, Dataset, Scaler};
use tapestry_core::door::DoorConfig;
use tapestry_core::engine::{EngineConfig, Mode};
use tapestry_core::model::{InnerOptimizer, ModelSpec, TrainConfig};
use tapestry_core::outer::OuterOptimizer;
use tapestry_protocol::Codec;

/// The digits data set's file (`shared/data/digits.csv.gz` beside the
/// checkout). Panics, saying where it looked, if it is not there: tests
/// that need it cannot run without it.
pub fn digits_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/digits.csv.gz");
    assert!(
        p.is_file(),
        "tests need the shared digits data set beside the checkout ({})",
        p.display()
    );
    // Absolute and without `..` (container mounts want that).
    p.canonicalize().unwrap_or(p)
}

/// The fortunes corpus directory (`shared/data/fortunes/` beside the
/// checkout: one gzipped text file per language). Panics, saying where it
/// looked, if it is not there.
pub fn fortunes_dir() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/fortunes");
    assert!(
        p.join("en.txt.gz").is_file(),
        "tests need the shared fortunes corpus beside the checkout ({})",
        p.display()
    );
    p.canonicalize().unwrap_or(p)
}

/// [`digits_path`] as a string (for command lines and scenarios).
pub fn digits_arg() -> String {
    digits_path().display().to_string()
}

/// All 1,797 digits, scaled from the pixel range 0..=16 to 0..=1.
pub fn digits() -> Dataset {
    let mut all = data::load_csv(&digits_path(), CsvOptions::default())
        .unwrap_or_else(|e| panic!("the digits data set does not load: {e}"));
    assert_eq!(
        (all.len(), all.n_features, all.n_classes),
        (1797, 64, 10),
        "not the digits"
    );
    Scaler::from_range(64, 0.0, 16.0).apply(&mut all);
    all
}

/// [`digits`] split into training and held-out rows (a quarter held out,
/// stratified, seed 0).
pub fn digits_split() -> (Dataset, Dataset) {
    digits()
        .split(0.25, 0)
        .unwrap_or_else(|e| panic!("splitting the digits: {e}"))
}

/// Writes the digits whose labels are in `classes`, unscaled, as CSV
/// (label last) at `path`: a region's or a node's own share of the classes.
pub fn write_digits_of(classes: std::ops::Range<u32>, path: &std::path::Path) {
    let all = data::load_csv(&digits_path(), CsvOptions::default())
        .unwrap_or_else(|e| panic!("the digits data set does not load: {e}"));
    let mut out = String::new();
    for (i, label) in all.labels.iter().enumerate() {
        if classes.contains(label) {
            for v in &all.features[i * all.n_features..(i + 1) * all.n_features] {
                out.push_str(&format!("{v},"));
            }
            out.push_str(&format!("{label}\n"));
        }
    }
    std::fs::write(path, out).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Logistic regression on the digits: 64 inputs, ten classes.
pub fn logistic() -> ModelSpec {
    ModelSpec::Logistic {
        inputs: 64,
        classes: 10,
    }
}

/// SGD with momentum 0.9: `local_steps` steps of `batch_size` rows at `lr`.
pub fn sgd(local_steps: usize, batch_size: usize, lr: f32) -> TrainConfig {
    TrainConfig {
        local_steps,
        batch_size,
        optimizer: InnerOptimizer::SgdMomentum { lr, momentum: 0.9 },
    }
}

/// A broadcast region `digits`/`test` of [`logistic`]: f32 deltas, 16-KiB
/// chunks, plain averaging as the outer step, quorum 1, 10-s round
/// timeout, with this rule, door and seed.
pub fn engine_config(rule: AggregationRule, door: DoorConfig, seed: u64) -> EngineConfig {
    EngineConfig {
        model_id: "digits".into(),
        region: "test".into(),
        spec: logistic(),
        codec: Codec::F32,
        chunk_size: 16 << 10,
        rule,
        outer: OuterOptimizer::averaging(),
        federation: None,
        quorum: 1.0,
        round_timeout_ms: 10_000,
        door,
        mode: Mode::Broadcast,
        seed,
    }
}
