//! What a run measures: per-round rows over the honest nodes (accuracy,
//! loss, consensus, bytes), the chunk stores' figures, and `rounds.csv`.

use super::*;

/// Figures over the honest nodes' models at one point of a run: a round's
/// row, and the `final` object of a report (simulated or of real
/// processes, see [`crate::report::Final`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SwarmFigures {
    /// Mean held-out accuracy.
    pub accuracy_mean: f64,
    /// Lowest.
    pub accuracy_min: f64,
    /// Highest.
    pub accuracy_max: f64,
    /// Mean held-out loss.
    pub loss_mean: f64,
    /// A language model's mean bits per byte on the held-out text of every
    /// language (lower is better); accuracy is 0 for a language model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits_per_byte_mean: Option<f64>,
    /// The worst (highest) node's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits_per_byte_max: Option<f64>,
    /// Mean bits per byte on each part (language) of the held-out text.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub bits_per_byte_by_part: BTreeMap<String, f64>,
    /// Mean distance to the average model over its norm.
    pub consensus_distance: f64,
    /// Bytes sent per node so far (mean over all nodes).
    pub bytes_sent_per_node: u64,
}

impl SwarmFigures {
    /// From each evaluated node's accuracy and loss (their means, lowest
    /// and highest), with the other figures as given.
    pub fn over(
        accuracies: &[f64],
        losses: &[f64],
        consensus_distance: f64,
        bytes_sent_per_node: u64,
    ) -> SwarmFigures {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        SwarmFigures {
            accuracy_mean: mean(accuracies),
            accuracy_min: accuracies.iter().copied().fold(f64::INFINITY, f64::min),
            accuracy_max: accuracies.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            loss_mean: mean(losses),
            bits_per_byte_mean: None,
            bits_per_byte_max: None,
            bits_per_byte_by_part: BTreeMap::new(),
            consensus_distance,
            bytes_sent_per_node,
        }
    }

    /// From each evaluated node's evaluation: accuracy for classifiers,
    /// bits per byte (overall and per part) for language models.
    pub fn of_evaluations(
        scores: &[Evaluation],
        consensus_distance: f64,
        bytes_sent_per_node: u64,
    ) -> SwarmFigures {
        let accs: Vec<f64> = scores
            .iter()
            .map(|e| e.accuracy.map_or(0.0, f64::from))
            .collect();
        let losses: Vec<f64> = scores.iter().map(|e| f64::from(e.loss)).collect();
        let mut f = SwarmFigures::over(&accs, &losses, consensus_distance, bytes_sent_per_node);
        let bpb: Vec<f64> = scores.iter().filter_map(|e| e.bits_per_byte).collect();
        if !bpb.is_empty() {
            f.bits_per_byte_mean = Some(bpb.iter().sum::<f64>() / bpb.len() as f64);
            f.bits_per_byte_max = bpb.iter().copied().reduce(f64::max);
            f.bits_per_byte_by_part = mean_by_part(scores.iter().map(|e| &e.parts));
        }
        f
    }
}

/// The mean of each part's bits per byte over several evaluations.
pub fn mean_by_part<'a>(
    evaluations: impl Iterator<Item = &'a Vec<(String, f64)>>,
) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for parts in evaluations {
        for (name, bpb) in parts {
            let s = sums.entry(name.clone()).or_default();
            s.0 += bpb;
            s.1 += 1;
        }
    }
    sums.into_iter()
        .map(|(k, (sum, n))| (k, sum / n as f64))
        .collect()
}

/// One round's figures over the honest nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundStats {
    /// The round (the version's round number).
    pub round: u64,
    /// Accuracy and loss of the honest nodes evaluated (a sample, if the
    /// scenario asks for one), consensus of all that reached the round.
    pub figures: SwarmFigures,
    /// Honest nodes that reached this round (nodes that caught up past it
    /// or were offline are not counted).
    pub nodes: usize,
    /// Virtual time (ms) the last of them reached it.
    pub virtual_ms: u64,
    /// With several regions: the consensus distance inside each region
    /// (`consensus_distance` in `figures` is over every region's nodes).
    pub region_consensus: Vec<f64>,
}

/// Chunk-store figures at the end of a run (means over all nodes).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StoreFigures {
    /// Bytes held (keys and values).
    pub bytes_per_node: u64,
    /// Chunks held.
    pub chunks_per_node: u64,
}

impl World<'_> {
    pub(super) fn store_figures(&self) -> Result<Option<StoreFigures>, SimError> {
        if self.stores.is_empty() {
            return Ok(None);
        }
        let n = self.stores.len() as u64;
        let mut f = StoreFigures::default();
        for store in &self.stores {
            f.bytes_per_node += store.disk_bytes()?;
            f.chunks_per_node += store.chunk_ids()?.len() as u64;
        }
        f.bytes_per_node /= n;
        f.chunks_per_node /= n;
        Ok(Some(f))
    }

    /// Closes every round row that can no longer change, in order: all
    /// honest nodes reached it, or (before the last round) are offline.
    pub(super) fn finish_rows(&mut self, progress: &mut dyn FnMut(u64)) -> Result<(), SimError> {
        let rounds = self.settings.scenario.rounds;
        while self.next_row <= rounds {
            let r = self.next_row;
            let done = self
                .honest
                .iter()
                .all(|&v| self.reached[v] >= r || (r < rounds && !self.net.online[v]));
            if !done {
                break;
            }
            self.finish_row(r, progress)?;
        }
        Ok(())
    }

    pub(super) fn finish_rows_at_end(
        &mut self,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), SimError> {
        while self.next_row <= self.settings.scenario.rounds {
            if !self.rows.contains_key(&self.next_row) {
                break;
            }
            self.finish_row(self.next_row, progress)?;
        }
        Ok(())
    }

    pub(super) fn finish_row(
        &mut self,
        r: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), SimError> {
        self.next_row = r + 1;
        let Some(row) = self.rows.remove(&r) else {
            return Ok(());
        };
        let last = r == self.settings.scenario.rounds;
        let evaluated: Vec<&Vec<f32>> = row
            .params
            .iter()
            .filter(|(v, _)| last || self.sampled.contains(v))
            .map(|(_, p)| p)
            .collect();
        let (spec, test) = (&self.spec, &self.data.test);
        let scores = par::map(&evaluated, self.threads, |p| evaluate_on(spec, p, test))
            .into_iter()
            .collect::<Result<Vec<Evaluation>, _>>()?;
        if scores.is_empty() {
            return Ok(());
        }
        let regions = self.settings.scenario.regions;
        let region_consensus: Vec<f64> = if regions > 1 {
            (0..regions)
                .map(|k| {
                    let inside: Vec<Vec<f32>> = row
                        .params
                        .iter()
                        .filter(|(v, _)| self.region[**v] == k)
                        .map(|(_, p)| p.clone())
                        .collect();
                    consensus_distance(&inside)
                })
                .collect()
        } else {
            Vec::new()
        };
        let models: Vec<Vec<f32>> = row.params.into_values().collect();
        let n = self.keys.len() as u64;
        let bytes_sent_per_node = self.net.bytes_sent.iter().sum::<u64>() / n;
        self.stats.push(RoundStats {
            round: r,
            figures: SwarmFigures::of_evaluations(
                &scores,
                consensus_distance(&models),
                bytes_sent_per_node,
            ),
            nodes: models.len(),
            virtual_ms: row.last_ms,
            region_consensus,
        });
        progress(r);
        Ok(())
    }
}

/// Writes `rounds.csv`.
pub fn write_rounds_csv(path: &Path, rounds: &[RoundStats]) -> std::io::Result<()> {
    let regions = rounds
        .iter()
        .map(|r| r.region_consensus.len())
        .max()
        .unwrap_or(0);
    let mut out = String::from(
        "round,accuracy_mean,accuracy_min,accuracy_max,loss_mean,consensus_distance,bytes_sent_per_node,nodes,virtual_ms,bits_per_byte_mean",
    );
    for k in 0..regions {
        out.push_str(&format!(",consensus_r{k}"));
    }
    out.push('\n');
    for r in rounds {
        let f = &r.figures;
        out.push_str(&format!(
            "{},{:.6},{:.6},{:.6},{:.6},{:.6e},{},{},{},{}",
            r.round,
            f.accuracy_mean,
            f.accuracy_min,
            f.accuracy_max,
            f.loss_mean,
            f.consensus_distance,
            f.bytes_sent_per_node,
            r.nodes,
            r.virtual_ms,
            f.bits_per_byte_mean
                .map_or(String::new(), |b| format!("{b:.6}"))
        ));
        for k in 0..regions {
            let c = r.region_consensus.get(k);
            out.push_str(&c.map_or(",".into(), |c| format!(",{c:.6e}")));
        }
        out.push('\n');
    }
    std::fs::write(path, out)
}
