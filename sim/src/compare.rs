//! Communication experiments: several arms of one scenario (codec, local
//! steps, anything a scenario sets), each run in full, compared by the bytes
//! each node sent until the swarm first reached a target accuracy (or bits
//! per byte, for a language model). The first arm is the reference, usually
//! naive averaging: f32 deltas after every local step.
//!
//! An experiment file is a scenario file (the base every arm starts from)
//! with `target` and one `[[arm]]` table per arm; an arm's keys override the
//! base's, and its `label` names it in the table and the chart:
//!
//! ```toml
//! name = "communication-digits"
//! target = 0.965
//! nodes = 16
//! # ... any scenario key ...
//! [[arm]]
//! name = "naive"
//! label = "f32 after every step"
//! local_steps = 1
//! rounds = 600
//! ```
//!
//! Outputs in the run's directory: one sub-directory per arm (its own
//! `report.json` and `rounds.csv`, no baselines), `communication.json`,
//! `communication.csv`, `communication.md` (the table) and
//! `metric_vs_bytes.png` (each arm's accuracy or bits per byte against the
//! log10 of the bytes each node sent).

use std::path::Path;

use serde::Serialize;

use crate::error::{ScenarioError, SimError};
use crate::plot::{self, Series};
use crate::report;
use crate::scenario::{Scenario, Settings};

/// One arm: a name (its directory), a label and its settings.
#[derive(Debug, Clone)]
pub struct Arm {
    /// Directory name and scenario name.
    pub name: String,
    /// What the table and the chart call it.
    pub label: String,
    /// The checked settings of its scenario.
    pub settings: Settings,
}

/// A parsed and checked experiment.
#[derive(Debug, Clone)]
pub struct Experiment {
    /// The experiment's name.
    pub name: String,
    /// Accuracy to reach (higher is better), or bits per byte for a language
    /// model (lower is better).
    pub target: f64,
    /// The arms, the reference first.
    pub arms: Vec<Arm>,
}

fn bad(msg: impl Into<String>) -> ScenarioError {
    ScenarioError::Experiment(msg.into())
}

impl Experiment {
    /// Parses an experiment file and checks every arm's scenario.
    pub fn from_toml(text: &str) -> Result<Experiment, ScenarioError> {
        let mut base: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| bad(e.message().replace('\n', " ")))?;
        let target = match base.remove("target") {
            Some(toml::Value::Float(t)) if t.is_finite() && t > 0.0 => t,
            Some(toml::Value::Integer(t)) if t > 0 => t as f64,
            Some(v) => return Err(bad(format!("target {v} is not a positive number"))),
            None => return Err(bad("no target (the accuracy or bits per byte to reach)")),
        };
        let arms = match base.remove("arm") {
            Some(toml::Value::Array(arms)) if arms.len() >= 2 => arms,
            _ => return Err(bad("at least two [[arm]] tables are needed")),
        };
        let name = match base.get("name") {
            Some(toml::Value::String(s)) => s.clone(),
            _ => "experiment".to_owned(),
        };
        let mut out: Vec<Arm> = Vec::with_capacity(arms.len());
        for (i, arm) in arms.into_iter().enumerate() {
            let toml::Value::Table(mut arm) = arm else {
                return Err(bad(format!("arm {i} is not a table")));
            };
            let arm_name = match arm.get("name") {
                Some(toml::Value::String(s))
                    if !s.is_empty()
                        && s.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
                {
                    s.clone()
                }
                _ => {
                    return Err(bad(format!(
                        "arm {i} needs a name of letters, digits, - and _ (its directory)"
                    )));
                }
            };
            if out.iter().any(|a| a.name == arm_name) {
                return Err(bad(format!("two arms are named {arm_name}")));
            }
            let label = match arm.remove("label") {
                Some(toml::Value::String(s)) => s,
                Some(v) => return Err(bad(format!("arm {arm_name}: label {v} is not a string"))),
                None => arm_name.clone(),
            };
            let mut merged = base.clone();
            merged.extend(std::mem::take(&mut arm));
            let scenario = Scenario::from_toml(&merged.to_string())
                .map_err(|e| bad(format!("arm {arm_name}: {e}")))?;
            let settings = scenario
                .settings()
                .map_err(|e| bad(format!("arm {arm_name}: {e}")))?;
            out.push(Arm {
                name: arm_name,
                label,
                settings,
            });
        }
        Ok(Experiment {
            name,
            target,
            arms: out,
        })
    }
}

/// What one arm did.
#[derive(Debug, Clone, Serialize)]
pub struct ArmResult {
    /// The arm's name.
    pub name: String,
    /// Its label.
    pub label: String,
    /// Its codec.
    pub codec: String,
    /// Local steps per round.
    pub local_steps: usize,
    /// Rounds completed.
    pub rounds: u64,
    /// Accuracy, or bits per byte for a language model, at the end.
    pub final_metric: f64,
    /// The best over the run.
    pub best_metric: f64,
    /// The first round at which the swarm's mean reached the target.
    pub round_at_target: Option<u64>,
    /// Bytes each node had sent by then (mean over nodes).
    pub bytes_to_target: Option<u64>,
    /// Virtual seconds by then.
    pub seconds_to_target: Option<f64>,
    /// Bytes each node sent over the whole run.
    pub bytes_total: u64,
    /// The reference's bytes to the target over this arm's.
    pub saving: Option<f64>,
    /// The final metric's cost against the reference's final metric, as a
    /// fraction (positive is worse).
    pub cost: f64,
}

/// The experiment's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The experiment's name.
    pub name: String,
    /// `accuracy` or `bits_per_byte`.
    pub metric: &'static str,
    /// The target.
    pub target: f64,
    /// One entry per arm, the reference first.
    pub arms: Vec<ArmResult>,
}

/// Per round (bytes sent per node, metric, virtual seconds), and whether
/// the metric is bits per byte (lower is better).
type Curve = (Vec<(u64, f64, f64)>, bool);

/// The curve of a run.
fn curve(rep: &report::Report) -> Curve {
    let text = rep
        .outcome
        .rounds
        .iter()
        .any(|r| r.figures.bits_per_byte_mean.is_some());
    let points = rep
        .outcome
        .rounds
        .iter()
        .map(|r| {
            let m = if text {
                r.figures.bits_per_byte_mean.unwrap_or(f64::NAN)
            } else {
                r.figures.accuracy_mean
            };
            (r.figures.bytes_sent_per_node, m, r.virtual_ms as f64 / 1e3)
        })
        .collect();
    (points, text)
}

/// Summarises one arm's curve against the target.
fn summarise(arm: &Arm, points: &[(u64, f64, f64)], lower_better: bool, target: f64) -> ArmResult {
    let better = |a: f64, b: f64| if lower_better { a < b } else { a > b };
    let reached = |m: f64| {
        if lower_better {
            m <= target
        } else {
            m >= target
        }
    };
    let first = points.iter().position(|p| reached(p.1));
    let best = points
        .iter()
        .map(|p| p.1)
        .filter(|m| m.is_finite())
        .fold(
            f64::NAN,
            |b, m| if b.is_nan() || better(m, b) { m } else { b },
        );
    let s = &arm.settings.scenario;
    ArmResult {
        name: arm.name.clone(),
        label: arm.label.clone(),
        codec: arm.settings.codec.to_string(),
        local_steps: s.local_steps,
        rounds: points.len() as u64,
        final_metric: points.last().map_or(f64::NAN, |p| p.1),
        best_metric: best,
        round_at_target: first.map(|i| i as u64 + 1),
        bytes_to_target: first.map(|i| points[i].0),
        seconds_to_target: first.map(|i| points[i].2),
        bytes_total: points.last().map_or(0, |p| p.0),
        saving: None,
        cost: 0.0,
    }
}

fn write(out: &Path, file: &'static str, text: &str) -> Result<(), SimError> {
    std::fs::write(out.join(file), text).map_err(|source| SimError::Write { file, source })
}

/// Human-readable bytes (decimal units).
fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

/// The markdown table of a comparison.
pub fn table(c: &Comparison) -> String {
    let lower = c.metric == "bits_per_byte";
    let mut t = format!(
        "| arm | codec | local steps | rounds | final {m} | cost vs reference | rounds to {target} | bytes per node to {target} | saving |\n|---|---|---|---|---|---|---|---|---|\n",
        m = if lower { "bits/byte" } else { "accuracy" },
        target = c.target,
    );
    for a in &c.arms {
        t += &format!(
            "| {} | `{}` | {} | {} | {:.4} | {:+.2} % | {} | {} | {} |\n",
            a.label,
            a.codec,
            a.local_steps,
            a.rounds,
            a.final_metric,
            a.cost * 100.0,
            a.round_at_target
                .map_or_else(|| "not reached".to_owned(), |r| r.to_string()),
            a.bytes_to_target.map_or_else(|| "—".to_owned(), bytes),
            a.saving
                .map_or_else(|| "—".to_owned(), |s| format!("{s:.0}×")),
        );
    }
    t
}

/// The scenario an arm runs, as its `report.json` records it, with the
/// thread count (which changes no result) left out.
fn comparable(scenario: &serde_json::Value) -> serde_json::Value {
    let mut s = scenario.clone();
    if let Some(o) = s.as_object_mut() {
        o.remove("threads");
    }
    s
}

/// An arm's curve read back from a finished run of the same scenario in
/// `dir` (its `report.json` and `rounds.csv`), or `None` if there is none or
/// it ran another scenario. `rounds.csv` holds six decimals: a figure
/// within 10⁻⁶ of the target may be taken as reached one round apart.
fn earlier_run(dir: &Path, settings: &Settings) -> Result<Option<Curve>, SimError> {
    let Ok(report) = std::fs::read_to_string(dir.join("report.json")) else {
        return Ok(None);
    };
    let Ok(report) = serde_json::from_str::<serde_json::Value>(&report) else {
        return Ok(None);
    };
    if comparable(&report["scenario"]) != comparable(&serde_json::to_value(&settings.scenario)?) {
        return Ok(None);
    }
    let Ok(csv) = std::fs::read_to_string(dir.join("rounds.csv")) else {
        return Ok(None);
    };
    let broken = |line: usize| {
        SimError::Scenario(bad(format!(
            "{}: line {line} is not a row of rounds.csv",
            dir.join("rounds.csv").display()
        )))
    };
    let mut points = Vec::new();
    let mut text = false;
    for (i, line) in csv.lines().enumerate().skip(1) {
        let c: Vec<&str> = line.split(',').collect();
        if c.len() != 10 {
            return Err(broken(i + 1));
        }
        let bytes: u64 = c[6].parse().map_err(|_| broken(i + 1))?;
        let ms: u64 = c[8].parse().map_err(|_| broken(i + 1))?;
        let metric: f64 = if c[9].is_empty() {
            c[1].parse().map_err(|_| broken(i + 1))?
        } else {
            text = true;
            c[9].parse().map_err(|_| broken(i + 1))?
        };
        points.push((bytes, metric, ms as f64 / 1e3));
    }
    if points.is_empty() {
        return Ok(None);
    }
    Ok(Some((points, text)))
}

/// Runs every arm in order and writes the comparison into `out`.
/// `progress` gets (arm index, round, rounds) as arms run. With `reuse`, an
/// arm whose directory already holds a finished run of its scenario is read
/// back instead of run again (to change the target, or finish an
/// experiment that was stopped).
pub fn run(
    exp: &Experiment,
    out: &Path,
    reuse: bool,
    progress: &mut dyn FnMut(usize, u64, u64),
) -> Result<Comparison, SimError> {
    std::fs::create_dir_all(out).map_err(|source| SimError::CreateDir {
        path: out.to_path_buf(),
        source,
    })?;
    let mut results = Vec::with_capacity(exp.arms.len());
    let mut series = Vec::with_capacity(exp.arms.len() + 1);
    let mut lower_better = false;
    for (i, arm) in exp.arms.iter().enumerate() {
        let mut settings = arm.settings.clone();
        settings.scenario.baselines = false;
        let dir = out.join(&arm.name);
        let earlier = if reuse {
            earlier_run(&dir, &settings)?
        } else {
            None
        };
        let (points, text) = match earlier {
            Some(c) => c,
            None => curve(&report::run(&settings, &dir, &mut |r, n| {
                progress(i, r, n)
            })?),
        };
        lower_better = text;
        results.push(summarise(arm, &points, text, exp.target));
        series.push(Series {
            label: arm.label.clone(),
            points: points
                .iter()
                .filter(|p| p.0 > 0)
                .map(|p| ((p.0 as f64).log10(), p.1))
                .collect(),
            color: plot::PALETTE[i % plot::PALETTE.len()],
            thin: false,
        });
    }
    let reference = results[0].clone();
    for r in &mut results {
        r.saving = match (reference.bytes_to_target, r.bytes_to_target) {
            (Some(a), Some(b)) if b > 0 => Some(a as f64 / b as f64),
            _ => None,
        };
        let (f, r0) = (r.final_metric, reference.final_metric);
        r.cost = if r0 == 0.0 {
            0.0
        } else if lower_better {
            (f - r0) / r0
        } else {
            (r0 - f) / r0
        };
    }
    let comparison = Comparison {
        name: exp.name.clone(),
        metric: if lower_better {
            "bits_per_byte"
        } else {
            "accuracy"
        },
        target: exp.target,
        arms: results,
    };
    let (x0, x1) = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    if x0 <= x1 {
        series.push(Series {
            label: format!("target {}", exp.target),
            points: vec![(x0, exp.target), (x1, exp.target)],
            color: (0, 0, 0),
            thin: true,
        });
    }
    plot::line_chart(
        &out.join("metric_vs_bytes.png"),
        &format!("{}: {} against bytes sent", exp.name, comparison.metric),
        "log10 bytes sent per node",
        if lower_better {
            "bits per byte (held out)"
        } else {
            "accuracy (held out)"
        },
        &series,
        None,
    )?;
    write(
        out,
        "communication.json",
        &serde_json::to_string_pretty(&comparison)?,
    )?;
    let mut csv = String::from(
        "arm,codec,local_steps,rounds,final_metric,best_metric,round_at_target,bytes_to_target,seconds_to_target,bytes_total,saving,cost\n",
    );
    let opt = |v: Option<String>| v.unwrap_or_default();
    for a in &comparison.arms {
        csv += &format!(
            "{},{},{},{},{},{},{},{},{},{},{},{}\n",
            a.name,
            a.codec,
            a.local_steps,
            a.rounds,
            a.final_metric,
            a.best_metric,
            opt(a.round_at_target.map(|v| v.to_string())),
            opt(a.bytes_to_target.map(|v| v.to_string())),
            opt(a.seconds_to_target.map(|v| v.to_string())),
            a.bytes_total,
            opt(a.saving.map(|v| v.to_string())),
            a.cost,
        );
    }
    write(out, "communication.csv", &csv)?;
    write(out, "communication.md", &table(&comparison))?;
    Ok(comparison)
}
