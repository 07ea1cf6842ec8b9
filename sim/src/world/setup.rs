//! What a run starts from: the data set (loaded, scaled, split, dealt to
//! the nodes), the model and the local training settings.

use super::*;

/// The data of a run, loaded and scaled once.
#[derive(Debug, Clone)]
pub struct Data {
    /// Training rows (pooled).
    pub train: Dataset,
    /// Held-out rows.
    pub test: Dataset,
    /// Each node's rows of `train`.
    pub shards: Vec<Dataset>,
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
        let parts = data::partition(&train, s.nodes, settings.partition, s.seed)?;
        let shards = parts.iter().map(|rows| train.subset(rows)).collect();
        Ok(Data {
            train,
            test,
            shards,
        })
    }
}

pub(super) fn train_config(settings: &Settings) -> TrainConfig {
    TrainConfig {
        local_steps: settings.scenario.local_steps,
        batch_size: settings.scenario.batch_size,
        optimizer: InnerOptimizer::SgdMomentum {
            lr: settings.scenario.lr,
            momentum: 0.9,
        },
    }
}

/// The model of a run.
pub fn model_spec(settings: &Settings, data: &Data) -> ModelSpec {
    settings
        .model
        .spec(data.train.n_features, data.train.n_classes)
}
