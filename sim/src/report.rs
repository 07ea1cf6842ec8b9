//! One simulation run end to end: the swarm, the baselines, `report.json`
//! and `rounds.csv`.

use std::path::Path;
use std::time::Instant;

use serde_json::json;
use tapestry_node::core::aggregate::AggregationRule;

use crate::scenario::Settings;
use crate::world::{self, Data, Outcome};

/// The figures of a finished run (what `report.json` holds).
#[derive(Debug, Clone)]
pub struct Report {
    /// The JSON document.
    pub json: serde_json::Value,
    /// The swarm's outcome.
    pub outcome: Outcome,
}

/// Runs the scenario and writes `report.json` and `rounds.csv` into `out`.
/// `progress` gets (round, total) after each round of the main swarm.
pub fn run(
    settings: &Settings,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, String> {
    let started = Instant::now();
    let s = &settings.scenario;
    let data = Data::load(settings)?;
    let outcome = world::run_swarm(settings, &data, &mut |r| progress(r, s.rounds))?;
    let last = outcome.rounds.last().cloned().ok_or("no round completed")?;
    let baselines = if s.baselines {
        let plain = if settings.aggregator == AggregationRule::Mean {
            last.accuracy_mean
        } else {
            let mut plain = settings.clone();
            plain.aggregator = AggregationRule::Mean;
            world::run_swarm(&plain, &data, &mut |_| {})?
                .rounds
                .last()
                .map_or(0.0, |r| r.accuracy_mean)
        };
        json!({
            "centralized": {"accuracy": world::centralized(settings, &data)?},
            "local_only": {"accuracy_mean": world::local_only(settings, &data)?},
            "plain_mean": {"accuracy_mean": plain},
        })
    } else {
        json!(null)
    };
    let json = json!({
        "scenario": serde_json::to_value(s).map_err(|e| e.to_string())?,
        "seed": s.seed,
        "nodes": s.nodes,
        "rounds": s.rounds,
        "rounds_completed": last.round,
        "final": {
            "accuracy_mean": last.accuracy_mean,
            "accuracy_min": last.accuracy_min,
            "accuracy_max": last.accuracy_max,
            "loss_mean": last.loss_mean,
            "consensus_distance": last.consensus_distance,
            "bytes_sent_per_node": last.bytes_sent_per_node,
            "honest_nodes": outcome.honest_nodes,
        },
        "baselines": baselines,
        "rejected": outcome.rejected,
        "messages_lost": outcome.messages_lost,
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    std::fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())? + "\n";
    std::fs::write(out.join("report.json"), text)
        .map_err(|e| format!("writing report.json: {e}"))?;
    world::write_rounds_csv(&out.join("rounds.csv"), &outcome.rounds)
        .map_err(|e| format!("writing rounds.csv: {e}"))?;
    Ok(Report { json, outcome })
}
