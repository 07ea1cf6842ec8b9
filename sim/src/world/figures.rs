//! What a run measures: per-round rows over the honest nodes (accuracy,
//! loss, consensus, bytes), the chunk stores' figures, and `rounds.csv`.

use super::*;

impl World<'_> {
    pub(super) fn store_figures(&self) -> Result<Option<StoreFigures>, String> {
        if self.stores.is_empty() {
            return Ok(None);
        }
        let n = self.stores.len() as u64;
        let mut f = StoreFigures::default();
        for store in &self.stores {
            f.bytes_per_node += store.disk_bytes().map_err(|e| e.to_string())?;
            f.chunks_per_node += store.chunk_ids().map_err(|e| e.to_string())?.len() as u64;
        }
        f.bytes_per_node /= n;
        f.chunks_per_node /= n;
        Ok(Some(f))
    }

    /// Closes every round row that can no longer change, in order: all
    /// honest nodes reached it, or (before the last round) are offline.
    pub(super) fn finish_rows(&mut self, progress: &mut dyn FnMut(u64)) -> Result<(), String> {
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
    ) -> Result<(), String> {
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
    ) -> Result<(), String> {
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
        let scores = par::map(&evaluated, self.threads, |p| evaluate(spec, p, test))
            .into_iter()
            .collect::<Result<Vec<(f32, f32)>, _>>()
            .map_err(|e| e.to_string())?;
        if scores.is_empty() {
            return Ok(());
        }
        let accs: Vec<f64> = scores.iter().map(|(_, a)| f64::from(*a)).collect();
        let losses: Vec<f64> = scores.iter().map(|(l, _)| f64::from(*l)).collect();
        let models: Vec<Vec<f32>> = row.params.into_values().collect();
        let n = self.keys.len() as u64;
        self.stats.push(RoundStats {
            round: r,
            nodes: models.len(),
            accuracy_mean: accs.iter().sum::<f64>() / accs.len() as f64,
            accuracy_min: accs.iter().copied().fold(f64::MAX, f64::min),
            accuracy_max: accs.iter().copied().fold(f64::MIN, f64::max),
            loss_mean: losses.iter().sum::<f64>() / losses.len() as f64,
            consensus_distance: consensus_distance(&models),
            bytes_sent_per_node: self.net.bytes_sent.iter().sum::<u64>() / n,
            virtual_ms: row.last_ms,
        });
        progress(r);
        Ok(())
    }
}

/// Writes `rounds.csv`.
pub fn write_rounds_csv(path: &Path, rounds: &[RoundStats]) -> std::io::Result<()> {
    let mut out = String::from(
        "round,accuracy_mean,accuracy_min,accuracy_max,loss_mean,consensus_distance,bytes_sent_per_node,nodes,virtual_ms\n",
    );
    for r in rounds {
        out.push_str(&format!(
            "{},{:.6},{:.6},{:.6},{:.6},{:.6e},{},{},{}\n",
            r.round,
            r.accuracy_mean,
            r.accuracy_min,
            r.accuracy_max,
            r.loss_mean,
            r.consensus_distance,
            r.bytes_sent_per_node,
            r.nodes,
            r.virtual_ms
        ));
    }
    std::fs::write(path, out)
}
