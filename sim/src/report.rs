//! One simulation run end to end: the swarm, the baselines, `report.json`,
//! `rounds.csv`, `baselines.csv`, `accuracy.png` and `consensus.png`, and
//! for a language model `samples.txt`.

use std::path::Path;
use std::time::Instant;

use serde_json::json;
use tapestry_core::aggregate::AggregationRule;

use crate::error::SimError;
use crate::plot::{self, Series};
use crate::scenario::Settings;
use crate::world::{self, Data, Outcome, RoundStats, SwarmFigures};

/// The figures of a finished run (what `report.json` holds).
#[derive(Debug, Clone)]
pub struct Report {
    /// The JSON document.
    pub json: serde_json::Value,
    /// The swarm's outcome.
    pub outcome: Outcome,
}

/// The `final` object of a `report.json`, the same in simulated runs and in
/// runs of real processes (`tapestry-lab`): figures over the honest nodes'
/// models at the end.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Final {
    /// Accuracy, loss, consensus and traffic at the end (their fields
    /// written inline).
    #[serde(flatten)]
    pub figures: SwarmFigures,
    /// Honest nodes.
    pub honest_nodes: usize,
    /// Simulated runs: honest nodes that reached the final round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes_at_final_round: Option<usize>,
    /// Simulated runs: virtual time at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtual_seconds: Option<f64>,
    /// Real runs: whether every region's nodes ended on one head.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heads_agree: Option<bool>,
}

impl Final {
    /// `figures` of `honest_nodes` nodes, the optional fields unset.
    pub fn new(figures: SwarmFigures, honest_nodes: usize) -> Final {
        Final {
            figures,
            honest_nodes,
            nodes_at_final_round: None,
            virtual_seconds: None,
            heads_agree: None,
        }
    }

    /// A simulated run's, from its last round's figures.
    pub fn of_round(last: &RoundStats, honest_nodes: usize) -> Final {
        Final {
            nodes_at_final_round: Some(last.nodes),
            virtual_seconds: Some(last.virtual_ms as f64 / 1e3),
            ..Final::new(last.figures.clone(), honest_nodes)
        }
    }
}

/// Per-round curves of the baselines.
#[derive(Debug, Clone)]
struct Baselines {
    centralized: Vec<f64>,
    local_only: Vec<f64>,
    plain_mean: Vec<RoundStats>,
    /// The same swarm without its Byzantine nodes' attack (they behave
    /// honestly), if it has any.
    attack_free: Option<Vec<RoundStats>>,
    /// A language model's per-language baselines.
    text: Option<world::TextBaselines>,
    /// The centralized model's parameters at the end.
    centralized_params: Vec<f32>,
}

/// Runs the scenario and writes its outputs into `out`. `progress` gets
/// (round, total) after each round of the main swarm.
pub fn run(
    settings: &Settings,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, SimError> {
    let started = Instant::now();
    let s = &settings.scenario;
    std::fs::create_dir_all(out).map_err(|source| SimError::CreateDir {
        path: out.to_path_buf(),
        source,
    })?;
    let data = Data::load(settings)?;
    let outcome = world::run_swarm(settings, &data, &mut |r| progress(r, s.rounds))?;
    let last = outcome
        .rounds
        .last()
        .cloned()
        .ok_or(SimError::NoRoundCompleted)?;
    let baselines = if s.baselines {
        let plain_mean = if settings.aggregator == AggregationRule::Mean {
            outcome.rounds.clone()
        } else {
            let mut plain = settings.clone();
            plain.aggregator = AggregationRule::Mean;
            world::run_swarm(&plain, &data, &mut |_| {})?.rounds
        };
        let attack_free = match settings.byzantine {
            Some(_) => {
                let mut calm = settings.clone();
                calm.byzantine = None;
                calm.byzantine_region = None;
                Some(world::run_swarm(&calm, &data, &mut |_| {})?.rounds)
            }
            None => None,
        };
        let all = world::all_baselines(settings, &data)?;
        Some(Baselines {
            centralized: all.centralized,
            local_only: all.local_only,
            plain_mean,
            attack_free,
            text: all.text,
            centralized_params: all.centralized_params,
        })
    } else {
        None
    };
    let final_of = |v: &[f64]| v.last().copied().unwrap_or(0.0);
    let baselines_json = match &baselines {
        Some(b) if b.text.is_some() => {
            let plain = b.plain_mean.last().map(|r| &r.figures);
            json!({
                "centralized": {"bits_per_byte": final_of(&b.centralized)},
                "local_only": {"bits_per_byte_mean": final_of(&b.local_only)},
                "by_part": b.text,
                "plain_mean": {
                    "bits_per_byte_mean": plain.and_then(|f| f.bits_per_byte_mean),
                    "consensus_distance": plain.map_or(0.0, |f| f.consensus_distance),
                },
            })
        }
        Some(b) => {
            let plain = b.plain_mean.last().map(|r| &r.figures);
            json!({
                "centralized": {"accuracy": final_of(&b.centralized)},
                "local_only": {"accuracy_mean": final_of(&b.local_only)},
                "plain_mean": {
                    "accuracy_mean": plain.map_or(0.0, |f| f.accuracy_mean),
                    "accuracy_min": plain.map_or(0.0, |f| f.accuracy_min),
                    "consensus_distance": plain.map_or(0.0, |f| f.consensus_distance),
                },
                "attack_free": b.attack_free.as_ref().and_then(|r| r.last()).map(|r| json!({
                    "accuracy_mean": r.figures.accuracy_mean,
                    "accuracy_min": r.figures.accuracy_min,
                })),
            })
        }
        None => json!(null),
    };
    let json = json!({
        "scenario": serde_json::to_value(s)?,
        "seed": s.seed,
        "nodes": s.nodes,
        "rounds": s.rounds,
        "rounds_completed": last.round,
        "final": Final::of_round(&last, outcome.honest_nodes),
        "baselines": baselines_json,
        "rejected": outcome.rejected,
        "network": {
            "messages_lost": outcome.messages_lost,
            "messages_cut": outcome.messages_cut,
            "messages_to_offline": outcome.messages_to_offline,
        },
        "churn": outcome.churn,
        "store": outcome.store,
        "regions": (!outcome.regions.is_empty()).then(|| json!({
            "each": outcome.regions,
            "bytes_cross_region": outcome.bytes_cross_region,
            "bytes_total": outcome.bytes_total,
            "cross_region_share": outcome.bytes_cross_region as f64 / outcome.bytes_total.max(1) as f64,
            "mixes_adopted": outcome.federation.0,
            "heads_carried_across": outcome.federation.1,
        })),
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    let text = serde_json::to_string_pretty(&json)? + "\n";
    let writing = |file| move |source| SimError::Write { file, source };
    std::fs::write(out.join("report.json"), text).map_err(writing("report.json"))?;
    world::write_rounds_csv(&out.join("rounds.csv"), &outcome.rounds)
        .map_err(writing("rounds.csv"))?;
    if let Some(b) = &baselines {
        write_baselines_csv(&out.join("baselines.csv"), b).map_err(writing("baselines.csv"))?;
    }
    plots(
        out,
        &outcome.rounds,
        baselines.as_ref(),
        Data::is_text(&data),
    )?;
    if let Some(text) = samples(
        settings,
        &data,
        &outcome.head,
        baselines.as_ref().map(|b| b.centralized_params.as_slice()),
    )? {
        std::fs::write(out.join("samples.txt"), text).map_err(writing("samples.txt"))?;
    }
    Ok(Report { json, outcome })
}

/// Bytes sampled per language and model in `samples.txt`.
pub const SAMPLE_BYTES: usize = 160;
/// The temperature of those samples.
pub const SAMPLE_TEMPERATURE: f32 = 0.7;

/// For a language model: a continuation of the start of each language's
/// held-out text by the swarm's head (and by the centralized model, if it
/// was trained), [`SAMPLE_BYTES`] bytes at [`SAMPLE_TEMPERATURE`], seeded
/// by the scenario's seed and the language's place; `None` for other
/// models.
fn samples(
    settings: &Settings,
    data: &Data,
    head: &[f32],
    centralized: Option<&[f32]>,
) -> Result<Option<String>, SimError> {
    use std::fmt::Write as _;
    let (
        tapestry_core::model::ModelSpec::Transformer(t),
        tapestry_core::model::Examples::Text(test),
    ) = (world::model_spec(settings, data), &data.test)
    else {
        return Ok(None);
    };
    let mut text = String::new();
    for (k, (name, part)) in test.iter_parts().enumerate() {
        // The first line of the held-out text, cut to at most 24 bytes at
        // a character boundary, is the prompt.
        let line = part.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut prompt = String::new();
        for c in line.chars() {
            if prompt.len() + c.len_utf8() > 24 {
                break;
            }
            prompt.push(c);
        }
        let seed = settings.scenario.seed ^ k as u64;
        let mut models = vec![("swarm", head)];
        if let Some(c) = centralized {
            models.push(("centralized", c));
        }
        let _ = writeln!(text, "== {name}: prompt {prompt:?}");
        for (who, params) in models {
            let got = t.sample(
                params,
                prompt.as_bytes(),
                SAMPLE_BYTES,
                SAMPLE_TEMPERATURE,
                seed,
            )?;
            let _ = writeln!(
                text,
                "-- {who}: {prompt}{}",
                String::from_utf8_lossy(&got).replace('\n', " / ")
            );
        }
    }
    Ok(Some(text))
}

fn write_baselines_csv(path: &Path, b: &Baselines) -> std::io::Result<()> {
    let mut out = String::from(
        "round,centralized,local_only_mean,plain_mean_accuracy,plain_mean_consensus\n",
    );
    for (r, (c, l)) in b.centralized.iter().zip(&b.local_only).enumerate() {
        let round = r as u64 + 1;
        let plain = b
            .plain_mean
            .iter()
            .find(|p| p.round == round)
            .map(|p| &p.figures);
        out.push_str(&format!(
            "{round},{c:.6},{l:.6},{},{}\n",
            plain.map_or(String::new(), |p| format!("{:.6}", p.accuracy_mean)),
            plain.map_or(String::new(), |p| format!("{:.6e}", p.consensus_distance)),
        ));
    }
    std::fs::write(path, out)
}

const BLUE: (u8, u8, u8) = (31, 119, 180);
const LIGHT_BLUE: (u8, u8, u8) = (158, 202, 225);
const GREEN: (u8, u8, u8) = (44, 160, 44);
const ORANGE: (u8, u8, u8) = (255, 127, 14);
const RED: (u8, u8, u8) = (214, 39, 40);

fn plots(
    out: &Path,
    rounds: &[RoundStats],
    b: Option<&Baselines>,
    text: bool,
) -> Result<(), SimError> {
    // A language model's figure is bits per byte (lower is better), in the
    // place of a classifier's accuracy.
    let score = |f: &SwarmFigures| {
        if text {
            f.bits_per_byte_mean.unwrap_or(f64::NAN)
        } else {
            f.accuracy_mean
        }
    };
    let worst = |f: &SwarmFigures| {
        if text {
            f.bits_per_byte_max.unwrap_or(f64::NAN)
        } else {
            f.accuracy_min
        }
    };
    let xy = |f: &dyn Fn(&SwarmFigures) -> f64, rows: &[RoundStats]| -> Vec<(f64, f64)> {
        rows.iter()
            .map(|r| (r.round as f64, f(&r.figures)))
            .collect()
    };
    let curve = |v: &[f64]| -> Vec<(f64, f64)> {
        v.iter()
            .enumerate()
            .map(|(r, a)| (r as f64 + 1.0, *a))
            .collect()
    };
    let line = |label: &str, points, color, thin| Series {
        label: label.into(),
        points,
        color,
        thin,
    };
    let mut acc = vec![
        line(
            "swarm: mean over honest nodes",
            xy(&score, rounds),
            BLUE,
            false,
        ),
        line("swarm: worst node", xy(&worst, rounds), LIGHT_BLUE, true),
    ];
    // log10 of the consensus distance; exact agreement (0) drawn at -12.
    let log = |v: f64| v.max(1e-12).log10();
    let mut cons = vec![line(
        "swarm",
        xy(&|r| log(r.consensus_distance), rounds),
        BLUE,
        false,
    )];
    if let Some(b) = b {
        acc.push(line(
            "centralized (pooled data)",
            curve(&b.centralized),
            GREEN,
            false,
        ));
        acc.push(line(
            "local only (each node alone)",
            curve(&b.local_only),
            ORANGE,
            false,
        ));
        acc.push(line(
            "same swarm, plain mean",
            xy(&score, &b.plain_mean),
            RED,
            true,
        ));
        cons.push(line(
            "same swarm, plain mean",
            xy(&|r| log(r.consensus_distance), &b.plain_mean),
            RED,
            true,
        ));
    }
    if text {
        plot::line_chart(
            &out.join("bits_per_byte.png"),
            "Bits per byte on held-out text by round (lower is better)",
            "round",
            "bits per byte (all languages)",
            &acc,
            None,
        )?;
    } else {
        plot::line_chart(
            &out.join("accuracy.png"),
            "Test accuracy by round",
            "round",
            "accuracy (held-out split)",
            &acc,
            Some((0.0, 1.0)),
        )?;
    }
    plot::line_chart(
        &out.join("consensus.png"),
        "Consensus distance by round (honest nodes)",
        "round",
        "log10 (mean distance to average / its norm)",
        &cons,
        None,
    )?;
    Ok(())
}
