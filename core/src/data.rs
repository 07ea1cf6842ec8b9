//! Data: loading (CSV, gzipped CSV, MNIST IDX), a seeded synthetic set,
//! splitting, partitioning across nodes for experiments, and feature scaling.
//!
//! ## Feature scaling under skew
//!
//! Nodes must feed the shared model the same input space. Standardising each
//! node's features with its *own* mean and deviation breaks that when nodes
//! hold differently distributed data (a node with only "1"s would scale its
//! pixels differently from a node with only "8"s), and the averaged model
//! then fits none of them. So a [`Scaler`] is part of the model's definition:
//! fitted once on reference data (or from the features' declared range) by
//! whoever defines the model, shipped with it, and applied unchanged by every
//! node. [`Scaler::fit`] computes it; nodes only call [`Scaler::apply`].

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma, StandardNormal};

/// Why data could not be loaded or split.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file's content is not what the format says.
    #[error("{path}, line {line}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// 1-based line (0 for binary formats).
        line: usize,
        /// What was wrong.
        reason: String,
    },
    /// A parameter out of range (empty data set, bad fraction...).
    #[error("{0}")]
    Invalid(String),
}

/// A classification data set held in memory: row-major features and labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// `len() × n_features` values, row by row.
    pub features: Vec<f32>,
    /// One class label per row, in `0..n_classes`.
    pub labels: Vec<u32>,
    /// Features per row.
    pub n_features: usize,
    /// Number of classes (largest label + 1 when loaded).
    pub n_classes: usize,
}

impl Dataset {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// One row's features.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.n_features..(i + 1) * self.n_features]
    }

    /// The rows at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut features = Vec::with_capacity(indices.len() * self.n_features);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            features.extend_from_slice(self.row(i));
            labels.push(self.labels[i]);
        }
        Dataset {
            features,
            labels,
            n_features: self.n_features,
            n_classes: self.n_classes,
        }
    }

    /// Rows of each class, counted.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.n_classes];
        for l in &self.labels {
            counts[*l as usize] += 1;
        }
        counts
    }

    /// Splits into (train, test), stratified by class, with a seeded shuffle.
    pub fn split(&self, test_fraction: f64, seed: u64) -> Result<(Dataset, Dataset), DataError> {
        if !(0.0..1.0).contains(&test_fraction) {
            return Err(DataError::Invalid(format!(
                "test fraction {test_fraction} outside [0, 1)"
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for class in 0..self.n_classes as u32 {
            let mut rows: Vec<usize> = (0..self.len())
                .filter(|i| self.labels[*i] == class)
                .collect();
            rows.shuffle(&mut rng);
            let n_test = (rows.len() as f64 * test_fraction).round() as usize;
            test.extend_from_slice(&rows[..n_test]);
            train.extend_from_slice(&rows[n_test..]);
        }
        train.shuffle(&mut rng);
        test.shuffle(&mut rng);
        Ok((self.subset(&train), self.subset(&test)))
    }
}

/// Where the label is in a CSV row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelColumn {
    /// The last column (the default).
    Last,
    /// A 0-based column index.
    Index(usize),
}

/// How to read a CSV file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CsvOptions {
    /// Where the label is.
    pub label: LabelColumn,
    /// `Some(true)`: the first line is a header; `Some(false)`: it is not;
    /// `None`: a header if its fields do not all parse as numbers.
    pub header: Option<bool>,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self {
            label: LabelColumn::Last,
            header: None,
        }
    }
}

pub(crate) fn open_maybe_gz(path: &Path) -> Result<Box<dyn Read>, DataError> {
    let f = File::open(path).map_err(|source| DataError::Io {
        path: path.display().to_string(),
        source,
    })?;
    // Gzip by its magic bytes, whatever the name (a mounted file may have
    // none).
    let mut f = std::io::BufReader::new(f);
    let gz = std::io::BufRead::fill_buf(&mut f)
        .map_err(|source| DataError::Io {
            path: path.display().to_string(),
            source,
        })?
        .starts_with(&[0x1f, 0x8b]);
    if gz {
        // Every member: concatenated gzip files and bgzip output are one stream.
        Ok(Box::new(flate2::read::MultiGzDecoder::new(f)))
    } else {
        Ok(Box::new(f))
    }
}

/// Loads a CSV (or `.csv.gz`) file of numeric features and an integer class
/// label per row.
pub fn load_csv(path: &Path, options: CsvOptions) -> Result<Dataset, DataError> {
    let name = path.display().to_string();
    let reader = BufReader::new(open_maybe_gz(path)?);
    let parse_err = |line, reason: String| DataError::Parse {
        path: name.clone(),
        line,
        reason,
    };
    let mut features = Vec::new();
    let mut labels = Vec::new();
    let mut width: Option<usize> = None;
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|source| DataError::Io {
            path: name.clone(),
            source,
        })?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if i == 0 {
            let numeric = fields.iter().all(|f| f.parse::<f64>().is_ok());
            if options.header.unwrap_or(!numeric) {
                continue;
            }
        }
        if *width.get_or_insert(fields.len()) != fields.len() {
            return Err(parse_err(
                i + 1,
                format!("{} fields, expected {}", fields.len(), width.unwrap_or(0)),
            ));
        }
        if fields.len() < 2 {
            return Err(parse_err(
                i + 1,
                "a row needs at least one feature and a label".into(),
            ));
        }
        let label_at = match options.label {
            LabelColumn::Last => fields.len() - 1,
            LabelColumn::Index(c) if c < fields.len() => c,
            LabelColumn::Index(c) => {
                return Err(parse_err(
                    i + 1,
                    format!("label column {c} but only {} fields", fields.len()),
                ));
            }
        };
        for (c, f) in fields.iter().enumerate() {
            if c == label_at {
                let label: u32 = f
                    .parse::<u32>()
                    .ok()
                    .or_else(|| {
                        f.parse::<f64>()
                            .ok()
                            .filter(|v| v.fract() == 0.0 && *v >= 0.0 && *v < 1e6)
                            .map(|v| v as u32)
                    })
                    .ok_or_else(|| {
                        parse_err(i + 1, format!("label {f:?} is not a class number"))
                    })?;
                labels.push(label);
            } else {
                let v: f32 = f
                    .parse()
                    .map_err(|_| parse_err(i + 1, format!("{f:?} is not a number")))?;
                if !v.is_finite() {
                    return Err(parse_err(i + 1, format!("{f:?} is not finite")));
                }
                features.push(v);
            }
        }
    }
    let n_features = width
        .map(|w| w - 1)
        .ok_or_else(|| DataError::Invalid(format!("{name} has no rows")))?;
    let n_classes = labels.iter().max().map_or(0, |m| *m as usize + 1);
    Ok(Dataset {
        features,
        labels,
        n_features,
        n_classes,
    })
}

fn read_be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Loads MNIST-style IDX files (images: magic 0x00000803, unsigned bytes;
/// labels: magic 0x00000801), plain or gzipped. Pixels become 0..255 floats.
pub fn load_idx(images: &Path, labels: &Path) -> Result<Dataset, DataError> {
    let read_all = |p: &Path| -> Result<Vec<u8>, DataError> {
        let mut buf = Vec::new();
        open_maybe_gz(p)?
            .read_to_end(&mut buf)
            .map_err(|source| DataError::Io {
                path: p.display().to_string(),
                source,
            })?;
        Ok(buf)
    };
    let bad = |p: &Path, reason: &str| DataError::Parse {
        path: p.display().to_string(),
        line: 0,
        reason: reason.into(),
    };
    let img = read_all(images)?;
    let lab = read_all(labels)?;
    if read_be_u32(&img, 0) != Some(0x0803) {
        return Err(bad(images, "not an IDX image file (magic 0x00000803)"));
    }
    if read_be_u32(&lab, 0) != Some(0x0801) {
        return Err(bad(labels, "not an IDX label file (magic 0x00000801)"));
    }
    let n = read_be_u32(&img, 4).ok_or_else(|| bad(images, "truncated header"))? as usize;
    let rows = read_be_u32(&img, 8).ok_or_else(|| bad(images, "truncated header"))? as usize;
    let cols = read_be_u32(&img, 12).ok_or_else(|| bad(images, "truncated header"))? as usize;
    let n_labels = read_be_u32(&lab, 4).ok_or_else(|| bad(labels, "truncated header"))? as usize;
    let pixels = n
        .checked_mul(rows)
        .and_then(|v| v.checked_mul(cols))
        .ok_or_else(|| bad(images, "absurd size"))?;
    if n_labels != n {
        return Err(bad(labels, "label count differs from image count"));
    }
    if img.len() != 16 + pixels || lab.len() != 8 + n {
        return Err(bad(images, "file length does not match its header"));
    }
    let labels: Vec<u32> = lab[8..].iter().map(|l| u32::from(*l)).collect();
    Ok(Dataset {
        features: img[16..].iter().map(|p| f32::from(*p)).collect(),
        n_classes: labels.iter().max().map_or(0, |m| *m as usize + 1),
        labels,
        n_features: rows * cols,
    })
}

/// A built-in, seeded classification set, so everything runs on a fresh
/// machine without files: `n_classes` Gaussian clusters in `n_features`
/// dimensions, centres drawn at random, unit noise.
pub fn synthetic(seed: u64, n_samples: usize, n_features: usize, n_classes: usize) -> Dataset {
    synthetic_with_separation(seed, n_samples, n_features, n_classes, 2.0)
}

/// [`synthetic`] with the spread of the class centres chosen: centres are
/// drawn with this standard deviation per feature around the origin and the
/// noise has deviation 1, so small values make classes overlap (a harder
/// task, where pooling data matters).
pub fn synthetic_with_separation(
    seed: u64,
    n_samples: usize,
    n_features: usize,
    n_classes: usize,
    separation: f32,
) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..n_classes)
        .map(|_| {
            (0..n_features)
                .map(|_| separation * rng.sample::<f32, _>(StandardNormal))
                .collect()
        })
        .collect();
    let mut features = Vec::with_capacity(n_samples * n_features);
    let mut labels = Vec::with_capacity(n_samples);
    for i in 0..n_samples {
        let class = i % n_classes;
        for c in &centres[class] {
            features.push(c + rng.sample::<f32, _>(StandardNormal));
        }
        labels.push(class as u32);
    }
    Dataset {
        features,
        labels,
        n_features,
        n_classes,
    }
}

/// How rows are dealt out to nodes in an experiment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Partition {
    /// Uniformly at random.
    Iid,
    /// Label skew: each class's rows are split among nodes in proportions
    /// drawn from Dirichlet(α) (Hsu et al. 2019); small α, strong skew.
    Dirichlet(f64),
    /// Each node holds rows of only `k` classes (more if nodes · k < classes,
    /// so that no row is dropped).
    KClasses(usize),
    /// Regional skew: `k` regions of consecutive nodes (node i in region
    /// ⌊i·k/N⌋), each holding the rows of its own classes only (class c in
    /// region ⌊c·k/C⌋), dealt evenly among its nodes.
    Regions(usize),
}

impl std::str::FromStr for Partition {
    type Err = DataError;
    /// `iid`, `dirichlet:ALPHA`, `classes:K`, `regions:K`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            DataError::Invalid(format!(
                "unknown partition {s:?} (iid, dirichlet:ALPHA, classes:K, regions:K)"
            ))
        };
        match s.split_once(':') {
            None if s == "iid" => Ok(Partition::Iid),
            Some(("dirichlet", a)) => match a.parse::<f64>() {
                Ok(a) if a > 0.0 && a.is_finite() => Ok(Partition::Dirichlet(a)),
                _ => Err(bad()),
            },
            Some(("classes", k)) => match k.parse::<usize>() {
                Ok(k) if k > 0 => Ok(Partition::KClasses(k)),
                _ => Err(bad()),
            },
            Some(("regions", k)) => match k.parse::<usize>() {
                Ok(k) if k > 0 => Ok(Partition::Regions(k)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

/// Deals the rows of `data` out to `nodes` nodes; returns each node's row
/// indices. Every row goes to exactly one node, and every node gets at least
/// one row.
pub fn partition(
    data: &Dataset,
    nodes: usize,
    how: Partition,
    seed: u64,
) -> Result<Vec<Vec<usize>>, DataError> {
    if nodes == 0 || data.len() < nodes {
        return Err(DataError::Invalid(format!(
            "cannot deal {} rows to {nodes} nodes",
            data.len()
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let by_class: Vec<Vec<usize>> = (0..data.n_classes as u32)
        .map(|c| {
            let mut rows: Vec<usize> = (0..data.len()).filter(|i| data.labels[*i] == c).collect();
            rows.shuffle(&mut rng);
            rows
        })
        .collect();
    let mut shards = vec![Vec::new(); nodes];
    match how {
        Partition::Iid => {
            let mut rows: Vec<usize> = (0..data.len()).collect();
            rows.shuffle(&mut rng);
            for (i, r) in rows.into_iter().enumerate() {
                shards[i % nodes].push(r);
            }
        }
        Partition::Dirichlet(alpha) => {
            let gamma = Gamma::new(alpha, 1.0)
                .map_err(|e| DataError::Invalid(format!("dirichlet α = {alpha}: {e}")))?;
            for rows in &by_class {
                let draws: Vec<f64> = (0..nodes).map(|_| gamma.sample(&mut rng)).collect();
                let total: f64 = draws.iter().sum::<f64>().max(f64::MIN_POSITIVE);
                let mut start = 0usize;
                let mut acc = 0.0;
                for (node, d) in draws.iter().enumerate() {
                    acc += d / total;
                    let end = if node + 1 == nodes {
                        rows.len()
                    } else {
                        ((acc * rows.len() as f64).round() as usize).min(rows.len())
                    };
                    shards[node].extend_from_slice(&rows[start..end.max(start)]);
                    start = end.max(start);
                }
            }
        }
        Partition::Regions(k) => {
            let k = k.min(nodes).min(data.n_classes.max(1));
            for (class, rows) in by_class.iter().enumerate() {
                let region = class * k / data.n_classes.max(1);
                let members: Vec<usize> = (0..nodes).filter(|i| i * k / nodes == region).collect();
                for (j, r) in rows.iter().enumerate() {
                    shards[members[j % members.len()]].push(*r);
                }
            }
        }
        Partition::KClasses(k) => {
            let k = k.min(data.n_classes.max(1));
            // Node i holds classes i·k, i·k+1, ..., i·k+k−1 (mod C); a class
            // no node drew (when nodes · k < C) goes to node (class mod
            // nodes), so no row is dropped. Each class's rows are split evenly
            // among the nodes that hold it.
            let mut holders: Vec<Vec<usize>> = vec![Vec::new(); data.n_classes];
            for node in 0..nodes {
                for j in 0..k {
                    let class = (node * k + j) % data.n_classes;
                    if !holders[class].contains(&node) {
                        holders[class].push(node);
                    }
                }
            }
            for (class, h) in holders.iter_mut().enumerate() {
                if h.is_empty() {
                    h.push(class % nodes);
                }
            }
            for (class, rows) in by_class.iter().enumerate() {
                let h = &holders[class];
                if h.is_empty() {
                    continue;
                }
                for (i, r) in rows.iter().enumerate() {
                    shards[h[i % h.len()]].push(*r);
                }
            }
        }
    }
    // No node may be left empty: give each empty one a row from the largest.
    for i in 0..nodes {
        if shards[i].is_empty() {
            let largest = (0..nodes).max_by_key(|j| shards[*j].len()).unwrap_or(0);
            if let Some(r) = shards[largest].pop() {
                shards[i].push(r);
            }
        }
    }
    Ok(shards)
}

/// A per-feature affine transform `(x − mean) / scale`, part of a model's
/// definition (module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Scaler {
    /// Subtracted from each feature.
    pub mean: Vec<f32>,
    /// Each feature is divided by this (never zero).
    pub scale: Vec<f32>,
}

impl Scaler {
    /// Standardisation statistics of reference data (constant features get
    /// scale 1).
    pub fn fit(data: &Dataset) -> Scaler {
        let n = data.len().max(1) as f64;
        let d = data.n_features;
        let mut mean = vec![0f64; d];
        for i in 0..data.len() {
            for (m, x) in mean.iter_mut().zip(data.row(i)) {
                *m += f64::from(*x) / n;
            }
        }
        let mut var = vec![0f64; d];
        for i in 0..data.len() {
            for ((v, x), m) in var.iter_mut().zip(data.row(i)).zip(&mean) {
                *v += (f64::from(*x) - m).powi(2) / n;
            }
        }
        Scaler {
            mean: mean.iter().map(|m| *m as f32).collect(),
            scale: var
                .iter()
                .map(|v| if *v > 1e-12 { v.sqrt() as f32 } else { 1.0 })
                .collect(),
        }
    }

    /// Scaling from a declared value range (e.g. pixels 0..=16): maps it to
    /// [−1, 1] without looking at any data.
    pub fn from_range(n_features: usize, lo: f32, hi: f32) -> Scaler {
        let mid = (lo + hi) / 2.0;
        let half = ((hi - lo) / 2.0).max(f32::MIN_POSITIVE);
        Scaler {
            mean: vec![mid; n_features],
            scale: vec![half; n_features],
        }
    }

    /// Applies the transform in place.
    pub fn apply(&self, data: &mut Dataset) {
        let d = data.n_features;
        for row in data.features.chunks_exact_mut(d) {
            for ((x, m), s) in row.iter_mut().zip(&self.mean).zip(&self.scale) {
                *x = (*x - m) / s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_deal_every_row_once() {
        let data = synthetic(1, 1000, 5, 10);
        for how in [
            Partition::Iid,
            Partition::Dirichlet(0.5),
            Partition::Dirichlet(0.05),
            Partition::KClasses(2),
            Partition::Regions(4),
        ] {
            let shards = partition(&data, 8, how, 7).unwrap();
            let mut all: Vec<usize> = shards.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..1000).collect::<Vec<_>>(), "{how:?}");
            assert!(shards.iter().all(|s| !s.is_empty()), "{how:?}");
            // Deterministic.
            assert_eq!(shards, partition(&data, 8, how, 7).unwrap());
        }
        // k classes per node: each node sees at most k labels.
        let shards = partition(&data, 8, Partition::KClasses(2), 7).unwrap();
        for s in &shards {
            let mut classes: Vec<u32> = s.iter().map(|i| data.labels[*i]).collect();
            classes.sort_unstable();
            classes.dedup();
            assert!(classes.len() <= 2);
        }
        // Regions: 8 nodes in 4 regions of 2, 10 classes as 3, 2, 3, 2;
        // both nodes of a region hold exactly its classes.
        let shards = partition(&data, 8, Partition::Regions(4), 7).unwrap();
        let expected: [&[u32]; 4] = [&[0, 1, 2], &[3, 4], &[5, 6, 7], &[8, 9]];
        for (i, s) in shards.iter().enumerate() {
            let mut classes: Vec<u32> = s.iter().map(|i| data.labels[*i]).collect();
            classes.sort_unstable();
            classes.dedup();
            assert_eq!(classes, expected[i / 2], "node {i}");
        }
        // Small α skews labels far more than IID.
        let skew = |how| {
            let shards = partition(&data, 8, how, 3).unwrap();
            shards
                .iter()
                .map(|s| {
                    let mut counts = [0usize; 10];
                    for i in s {
                        counts[data.labels[*i] as usize] += 1;
                    }
                    *counts.iter().max().unwrap_or(&0) as f64 / s.len() as f64
                })
                .sum::<f64>()
                / 8.0
        };
        assert!(skew(Partition::Dirichlet(0.1)) > 2.0 * skew(Partition::Iid));
    }

    #[test]
    fn split_is_stratified_and_disjoint() {
        let data = synthetic(2, 500, 3, 5);
        let (train, test) = data.split(0.2, 1).unwrap();
        assert_eq!(train.len() + test.len(), 500);
        assert_eq!(test.class_counts(), vec![20; 5]);
    }

    #[test]
    fn csv_and_idx_loaders_read_and_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("d.csv");
        std::fs::write(&csv, "a,b,label\n1,2,0\n3.5,4,2\n").unwrap();
        let d = load_csv(&csv, CsvOptions::default()).unwrap();
        assert_eq!((d.len(), d.n_features, d.n_classes), (2, 2, 3));
        assert_eq!(d.features, vec![1.0, 2.0, 3.5, 4.0]);
        let first = load_csv(
            &csv,
            CsvOptions {
                label: LabelColumn::Index(0),
                header: Some(true),
            },
        );
        assert!(first.is_err(), "1 and 3.5 as labels: 3.5 is not a class");
        std::fs::write(&csv, "1,2,0\n3,x,1\n").unwrap();
        assert!(matches!(
            load_csv(&csv, CsvOptions::default()),
            Err(DataError::Parse { line: 2, .. })
        ));
        std::fs::write(&csv, "1,2,0\n3,1\n").unwrap();
        assert!(matches!(
            load_csv(&csv, CsvOptions::default()),
            Err(DataError::Parse { line: 2, .. })
        ));
        assert!(matches!(
            load_csv(&dir.path().join("none.csv"), CsvOptions::default()),
            Err(DataError::Io { .. })
        ));

        let img = dir.path().join("img.idx");
        let lab = dir.path().join("lab.idx");
        let mut bytes = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2];
        bytes.extend_from_slice(&[0, 255, 10, 20, 1, 2, 3, 4]);
        std::fs::write(&img, &bytes).unwrap();
        std::fs::write(&lab, [0, 0, 8, 1, 0, 0, 0, 2, 7, 3]).unwrap();
        let d = load_idx(&img, &lab).unwrap();
        assert_eq!(
            (d.len(), d.n_features, d.labels.clone()),
            (2, 4, vec![7, 3])
        );
        std::fs::write(&lab, [0, 0, 8, 1, 0, 0, 0, 3, 7, 3]).unwrap();
        assert!(load_idx(&img, &lab).is_err());
    }

    #[test]
    fn a_gzip_file_of_several_members_is_read_whole() {
        use std::io::Write;
        // Two gzip files concatenated (as `cat a.gz b.gz` or bgzip make):
        // the header and a row in the first member, two rows in the second.
        let gz = |text: &str| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(text.as_bytes()).unwrap();
            e.finish().unwrap()
        };
        let mut bytes = gz("a,b,label\n1,2,0\n");
        bytes.extend(gz("3,4,1\n5,6,2\n"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.csv.gz");
        std::fs::write(&path, bytes).unwrap();
        let d = load_csv(&path, CsvOptions::default()).unwrap();
        assert_eq!(d.labels, vec![0, 1, 2]);
        assert_eq!(d.features, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }
}
