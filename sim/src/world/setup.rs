//! What a run starts from: the data set (loaded, scaled, split, dealt to
//! the nodes), the model and the local training settings.

use super::*;

/// The data of a run, loaded and scaled once.
#[derive(Debug, Clone)]
pub struct Data {
    /// Training rows or text (pooled).
    pub train: Examples,
    /// Held-out rows or text.
    pub test: Examples,
    /// Each node's part of `train`.
    pub shards: Vec<Examples>,
}

impl Data {
    /// Loads, splits, scales and partitions the data of `settings`.
    pub fn load(settings: &Settings) -> Result<Data, SimError> {
        let s = &settings.scenario;
        let all = match &settings.data {
            // Ten overlapping classes: hard enough that pooling matters;
            // 3,000 rows, or 30 per node for large swarms.
            DataSource::Synthetic => {
                data::synthetic_with_separation(s.seed, (30 * s.nodes).max(3000), 20, 10, 0.8)
            }
            DataSource::Csv(path) => data::load_csv(path, CsvOptions::default())?,
            DataSource::Text(path) => {
                let (train, test) = tapestry_core::text::load_texts(path)?;
                let shards = match settings.partition {
                    Some(data::Partition::Iid) => iid_text(&train, s.nodes),
                    _ => by_file(&train, s.nodes),
                };
                if let Some(i) = shards.iter().position(|t| t.len() < 2) {
                    return Err(SimError::Data(data::DataError::Invalid(format!(
                        "node {i} gets no text: {} nodes share {} bytes of training text",
                        s.nodes,
                        train.len()
                    ))));
                }
                return Ok(Data {
                    train: Examples::Text(train),
                    test: Examples::Text(test),
                    shards: shards.into_iter().map(Examples::Text).collect(),
                });
            }
        };
        let (mut train, mut test) = all.split(s.test_fraction, s.seed)?;
        if test.len() > MAX_TEST_ROWS {
            // Enough to read accuracy to about a percent; evaluation cost
            // stays bounded in large swarms.
            let rows: Vec<usize> = (0..MAX_TEST_ROWS).collect();
            test = test.subset(&rows);
        }
        // One scaler for everyone, from the pooled training rows: in a real
        // swarm it ships with the model definition (see core::data).
        let scaler = Scaler::fit(&train);
        scaler.apply(&mut train);
        scaler.apply(&mut test);
        let partition = settings.partition.unwrap_or(data::Partition::Iid);
        let parts = data::partition(&train, s.nodes, partition, s.seed)?;
        let shards = parts
            .iter()
            .map(|rows| Examples::Rows(train.subset(rows)))
            .collect();
        Ok(Data {
            train: Examples::Rows(train),
            test: Examples::Rows(test),
            shards,
        })
    }

    /// Whether this is text (a language model's data).
    pub fn is_text(&self) -> bool {
        matches!(self.train, Examples::Text(_))
    }

    /// The part names (languages) node `i` trains on (none for rows).
    pub fn parts_of(&self, i: usize) -> Vec<String> {
        match self.shards.get(i) {
            Some(Examples::Text(t)) => t.parts.iter().map(|(n, _)| n.clone()).collect(),
            _ => Vec::new(),
        }
    }
}

/// Text dealt by file: with at least as many nodes as files, node i holds
/// file ⌊i·F/N⌋, whose training text is cut (at line ends) into equal
/// shares among the nodes holding it; with fewer nodes than files, node i
/// holds every file f with ⌊f·N/F⌋ = i.
pub fn by_file(train: &Text, nodes: usize) -> Vec<Text> {
    let files = train.parts.len();
    let mut out = vec![Text::default(); nodes];
    if files == 0 || nodes == 0 {
        return out;
    }
    if nodes < files {
        for (f, (name, bytes)) in train.iter_parts().enumerate() {
            out[f * nodes / files].push(name, bytes);
        }
        return out;
    }
    for (f, (name, bytes)) in train.iter_parts().enumerate() {
        let group: Vec<usize> = (0..nodes).filter(|i| i * files / nodes == f).collect();
        for (node, span) in group.iter().zip(cut_at_lines(bytes, group.len())) {
            out[*node].push(name, &bytes[span]);
        }
    }
    out
}

/// Text dealt evenly (the control for [`by_file`]): every node holds an
/// equal share of every file's training text, cut at line ends.
pub fn iid_text(train: &Text, nodes: usize) -> Vec<Text> {
    let mut out = vec![Text::default(); nodes];
    for (name, bytes) in train.iter_parts() {
        for (node, span) in out.iter_mut().zip(cut_at_lines(bytes, nodes)) {
            if !span.is_empty() {
                node.push(name, &bytes[span]);
            }
        }
    }
    out
}

/// `k` consecutive spans of `bytes` of about equal length, each ending at
/// a line end (the last at the end).
fn cut_at_lines(bytes: &[u8], k: usize) -> Vec<std::ops::Range<usize>> {
    let mut cuts = vec![0];
    for j in 1..k {
        let at = bytes.len() * j / k;
        let end = bytes[at..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(bytes.len(), |p| at + p + 1);
        cuts.push(end.max(*cuts.last().unwrap_or(&0)));
    }
    cuts.push(bytes.len());
    cuts.windows(2).map(|w| w[0]..w[1]).collect()
}

pub(super) fn train_config(settings: &Settings) -> TrainConfig {
    let lr = settings.scenario.lr;
    TrainConfig {
        local_steps: settings.scenario.local_steps,
        batch_size: settings.scenario.batch_size,
        optimizer: if settings.scenario.optimizer == "adamw" {
            InnerOptimizer::AdamW {
                lr,
                weight_decay: 0.0,
                eps: settings.scenario.adam_eps,
            }
        } else {
            InnerOptimizer::SgdMomentum { lr, momentum: 0.9 }
        },
    }
}

/// The model of a run.
pub fn model_spec(settings: &Settings, data: &Data) -> ModelSpec {
    match &data.train {
        Examples::Rows(rows) => settings.model.spec(rows.n_features, rows.n_classes),
        Examples::Text(_) => settings.model.spec(0, 0),
    }
}
