//! The baselines a swarm is compared with: one node training on the
//! pooled data (centralized) and every node alone (local only).

use super::*;

/// Centralized baseline: the same model trained on the pooled data for the
/// same number of sequential steps (one node doing every round's steps);
/// test accuracy after each round's worth.
pub fn centralized(settings: &Settings, data: &Data) -> Result<Vec<f64>, SimError> {
    let spec = model_spec(settings, data);
    let cfg = train_config(settings);
    let seed = settings.scenario.seed;
    let mut params = spec.init(seed);
    let mut state = InnerState::default();
    let mut curve = Vec::new();
    for r in 0..settings.scenario.rounds {
        if r < training_rounds(settings) {
            params = train_local(&spec, &params, &data.train, &cfg, &mut state, seed ^ r)?.0;
        }
        curve.push(f64::from(evaluate(&spec, &params, &data.test)?.1));
    }
    Ok(curve)
}

/// Local-only baseline: every node trains alone on its shard for the same
/// number of steps; the mean test accuracy after each round's worth (over a
/// sample of nodes if the scenario asks for one, over all at the end).
pub fn local_only(settings: &Settings, data: &Data) -> Result<Vec<f64>, SimError> {
    let s = &settings.scenario;
    let spec = model_spec(settings, data);
    let cfg = train_config(settings);
    let mut order: Vec<usize> = (0..data.shards.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(s.seed ^ 0x10ca_1000));
    if s.eval_sample > 0 {
        order.truncate(s.eval_sample);
    }
    let sampled: BTreeSet<usize> = order.into_iter().collect();
    let nodes: Vec<usize> = (0..data.shards.len()).collect();
    let curves = par::map(&nodes, par::workers(s.threads), |&i| {
        let mut params = spec.init(s.seed);
        let mut state = InnerState::default();
        let mut curve = Vec::new();
        for r in 0..s.rounds {
            if r < training_rounds(settings) {
                params = local_round(&spec, &params, &data.shards[i], &cfg, &mut state, (i, r))?;
            }
            let last = r + 1 == s.rounds;
            curve.push(if last || sampled.contains(&i) {
                Some(f64::from(evaluate(&spec, &params, &data.test)?.1))
            } else {
                None
            });
        }
        Ok::<_, ModelError>(curve)
    })
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    Ok((0..s.rounds as usize)
        .map(|r| {
            let seen: Vec<f64> = curves.iter().filter_map(|c| c[r]).collect();
            seen.iter().sum::<f64>() / seen.len().max(1) as f64
        })
        .collect())
}
