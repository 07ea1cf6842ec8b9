//! The baselines a swarm is compared with: one node training on the
//! pooled data (centralized) and every node alone (local only).

use super::*;

/// The figure a baseline curve holds: accuracy for a classifier, bits per
/// byte for a language model.
fn score(e: &Evaluation) -> f64 {
    e.bits_per_byte
        .unwrap_or_else(|| e.accuracy.map_or(0.0, f64::from))
}

/// The centralized baseline's training settings: a classifier takes the
/// same steps as one node (sequential steps on the pooled rows); a
/// language model takes the same steps with the whole swarm's windows in
/// each (the same total compute as the swarm's round).
fn centralized_config(settings: &Settings, data: &Data) -> TrainConfig {
    let mut cfg = train_config(settings);
    if matches!(data.train, Examples::Text(_)) {
        cfg.batch_size *= settings.scenario.nodes.max(1);
    }
    cfg
}

/// Centralized baseline: the same model trained on the pooled data for the
/// same number of sequential steps (one node doing every round's steps);
/// the test score (accuracy, or bits per byte) after each round's worth.
pub fn centralized(settings: &Settings, data: &Data) -> Result<Vec<f64>, SimError> {
    Ok(centralized_run(settings, data)?.0)
}

/// The centralized curve and its final evaluation.
fn centralized_run(
    settings: &Settings,
    data: &Data,
) -> Result<(Vec<f64>, Evaluation, Vec<f32>), SimError> {
    let spec = model_spec(settings, data);
    let cfg = centralized_config(settings, data);
    let seed = settings.scenario.seed;
    let mut params = spec.init(seed);
    let mut state = InnerState::default();
    let mut curve = Vec::new();
    let mut last = Evaluation::default();
    for r in 0..settings.scenario.rounds {
        if r < training_rounds(settings) {
            params = train_on(&spec, &params, &data.train, &cfg, &mut state, seed ^ r)?.0;
        }
        last = evaluate_on(&spec, &params, &data.test)?;
        curve.push(score(&last));
    }
    Ok((curve, last, params))
}

/// Local-only baseline: every node trains alone on its shard for the same
/// number of steps; the mean test score after each round's worth (over a
/// sample of nodes if the scenario asks for one, over all at the end).
pub fn local_only(settings: &Settings, data: &Data) -> Result<Vec<f64>, SimError> {
    let curves = local_runs(settings, data, &local_sample(settings, data))?;
    Ok(local_curve(settings, &curves))
}

/// The nodes the local-only curve follows before the last round.
fn local_sample(settings: &Settings, data: &Data) -> BTreeSet<usize> {
    let s = &settings.scenario;
    let mut order: Vec<usize> = (0..data.shards.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(s.seed ^ 0x10ca_1000));
    if s.eval_sample > 0 {
        order.truncate(s.eval_sample);
    }
    order.into_iter().collect()
}

/// The mean score of the evaluated lone nodes, round by round.
fn local_curve(settings: &Settings, curves: &[Vec<Option<Evaluation>>]) -> Vec<f64> {
    (0..settings.scenario.rounds as usize)
        .map(|r| {
            let seen: Vec<f64> = curves
                .iter()
                .filter_map(|c| c[r].as_ref().map(score))
                .collect();
            seen.iter().sum::<f64>() / seen.len().max(1) as f64
        })
        .collect()
}

/// Every node trained alone: its evaluations after each round's worth
/// (only for nodes in `sampled`, and the last round for all).
fn local_runs(
    settings: &Settings,
    data: &Data,
    sampled: &BTreeSet<usize>,
) -> Result<Vec<Vec<Option<Evaluation>>>, SimError> {
    let s = &settings.scenario;
    let spec = model_spec(settings, data);
    let cfg = train_config(settings);
    let nodes: Vec<usize> = (0..data.shards.len()).collect();
    Ok(par::map(&nodes, par::workers(s.threads), |&i| {
        let mut params = spec.init(s.seed);
        let mut state = InnerState::default();
        let mut curve = Vec::new();
        for r in 0..s.rounds {
            if r < training_rounds(settings) {
                params = train_on(
                    &spec,
                    &params,
                    &data.shards[i],
                    &cfg,
                    &mut state,
                    (i as u64) << 32 | r,
                )?
                .0;
            }
            let last = r + 1 == s.rounds;
            curve.push(if last || sampled.contains(&i) {
                Some(evaluate_on(&spec, &params, &data.test)?)
            } else {
                None
            });
        }
        Ok::<_, ModelError>(curve)
    })
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?)
}

/// A language model's baselines at the end of the run, per part (language)
/// of the held-out text.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TextBaselines {
    /// Centralized training on all the text: bits per byte per part.
    pub centralized: BTreeMap<String, f64>,
    /// Centralized, over all parts.
    pub centralized_mean: f64,
    /// Nodes alone, on the parts they trained on (mean over those nodes).
    pub local_only_seen: BTreeMap<String, f64>,
    /// Nodes alone, on the parts they never saw (mean over those nodes).
    pub local_only_unseen: BTreeMap<String, f64>,
    /// The best (lowest) bits per byte any lone node reached on a part it
    /// never saw.
    pub local_only_unseen_best: BTreeMap<String, f64>,
}

/// Both baselines of a run, each computed once.
#[derive(Debug, Clone)]
pub struct AllBaselines {
    /// The centralized curve (see [`centralized`]).
    pub centralized: Vec<f64>,
    /// The local-only curve (see [`local_only`]).
    pub local_only: Vec<f64>,
    /// A language model's per-language figures.
    pub text: Option<TextBaselines>,
    /// The centralized model's parameters at the end.
    pub centralized_params: Vec<f32>,
}

/// Both baselines, each computed once: the centralized and the local-only
/// curves, and for a language model its [`TextBaselines`].
///
/// With two workers or more, the centralized model trains on one of them
/// while the lone nodes share the others (the centralized run is one
/// sequential model, as long as all the lone nodes together); the results
/// do not depend on it.
pub fn all_baselines(settings: &Settings, data: &Data) -> Result<AllBaselines, SimError> {
    let sampled = local_sample(settings, data);
    let workers = par::workers(settings.scenario.threads);
    let (central_run, runs) = if workers >= 2 {
        let mut alone = settings.clone();
        alone.scenario.threads = workers - 1;
        std::thread::scope(|scope| {
            let central = scope.spawn(|| centralized_run(settings, data));
            let runs = local_runs(&alone, data, &sampled);
            let central = central
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (central, runs)
        })
    } else {
        (
            centralized_run(settings, data),
            local_runs(settings, data, &sampled),
        )
    };
    let (centralized, central, centralized_params) = central_run?;
    let runs = runs?;
    Ok(AllBaselines {
        centralized,
        local_only: local_curve(settings, &runs),
        text: matches!(data.train, Examples::Text(_))
            .then(|| text_baselines(data, &central, &runs)),
        centralized_params,
    })
}

/// [`TextBaselines`] from the centralized model's and the lone nodes'
/// final evaluations.
fn text_baselines(
    data: &Data,
    central: &Evaluation,
    runs: &[Vec<Option<Evaluation>>],
) -> TextBaselines {
    let mut seen: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let mut unseen: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let mut best: BTreeMap<String, f64> = BTreeMap::new();
    for (i, curve) in runs.iter().enumerate() {
        let Some(Some(last)) = curve.last() else {
            continue;
        };
        let own = data.parts_of(i);
        for (name, bpb) in &last.parts {
            let mine = own.contains(name);
            let slot = if mine { &mut seen } else { &mut unseen };
            let e = slot.entry(name.clone()).or_default();
            e.0 += bpb;
            e.1 += 1;
            if !mine {
                let b = best.entry(name.clone()).or_insert(f64::INFINITY);
                *b = b.min(*bpb);
            }
        }
    }
    let means = |m: BTreeMap<String, (f64, usize)>| {
        m.into_iter().map(|(k, (s, n))| (k, s / n as f64)).collect()
    };
    TextBaselines {
        centralized: central.parts.iter().cloned().collect(),
        centralized_mean: central.bits_per_byte.unwrap_or(f64::NAN),
        local_only_seen: means(seen),
        local_only_unseen: means(unseen),
        local_only_unseen_best: best,
    }
}
