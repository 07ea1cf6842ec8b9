//! What Byzantine nodes send instead of their honest work: forged deltas
//! (broadcast) and forged models (mixing).

use super::*;

impl World<'_> {
    /// Mixing mode: the model node `i` sends its neighbours after training
    /// for `round`: its own, or a Byzantine node's forgery — the attack
    /// applied to its delta (round-start model minus trained model) — or
    /// nothing (free-riding). Colluding attacks see the honest deltas of the
    /// round so far, or of the previous round.
    pub(super) fn mixing_model(
        &mut self,
        i: usize,
        round: u64,
        params: Vec<f32>,
    ) -> Option<Vec<f32>> {
        let Some(attack) = self.attack else {
            return Some(params);
        };
        let start = self.engines[i].params();
        let delta: Vec<f32> = start.iter().zip(&params).map(|(a, b)| a - b).collect();
        if !self.byzantine.contains(&i) {
            if matches!(attack, Attack::Alie(_) | Attack::Ipm(_)) {
                self.honest_deltas.entry(round).or_default().push(delta);
            }
            return Some(params);
        }
        let first = self
            .first_mix_delta
            .entry(i)
            .or_insert_with(|| delta.clone())
            .clone();
        let honest = self
            .honest_deltas
            .get(&round)
            .filter(|v| !v.is_empty())
            .or_else(|| self.honest_deltas.get(&round.saturating_sub(1)));
        let forged = attacked(attack, delta, honest, Some(first), &mut self.rng)?;
        Some(start.iter().zip(&forged).map(|(a, d)| a - d).collect())
    }

    pub(super) fn forge_and_send(
        &mut self,
        i: usize,
        now: u64,
        manifest: &Verified<DeltaManifest>,
        payload: &[u8],
    ) {
        let Some(attack) = self.attack else { return };
        let forged = forge(
            attack,
            manifest,
            payload,
            &self.honest_deltas,
            &self.first_delta,
            i,
            &self.keys[i],
            &mut self.rng,
        );
        self.first_delta
            .entry(i)
            .or_insert_with(|| (manifest.clone(), payload.to_vec()));
        for (m, p) in forged {
            self.announce(i, now, m, p);
        }
    }
}

/// Builds a Byzantine node's replacement for its honest delta (or `None`
/// to send nothing this round).
#[allow(clippy::too_many_arguments)]
pub(super) fn forge(
    attack: Attack,
    manifest: &Verified<DeltaManifest>,
    payload: &[u8],
    honest: &BTreeMap<u64, Vec<Vec<f32>>>,
    first: &BTreeMap<usize, (Verified<DeltaManifest>, Vec<u8>)>,
    node: usize,
    key: &Keypair,
    rng: &mut ChaCha8Rng,
) -> Vec<(Verified<DeltaManifest>, Vec<u8>)> {
    let m = manifest.message();
    let n: usize = m
        .layout
        .iter()
        .map(|t| t.shape.iter().product::<u64>() as usize)
        .sum();
    let Ok(own) = m.codec.decode(payload, n) else {
        return Vec::new();
    };
    let first = first
        .get(&node)
        .and_then(|(fm, fp)| fm.message().codec.decode(fp, n).ok());
    let Some(values) = attacked(attack, own, honest.get(&m.round), first, rng) else {
        return Vec::new();
    };
    let copies = attack.copies();
    (0..copies)
        .filter_map(|k| {
            // Ballot stuffing: slightly different copies (different ids),
            // numbered after the honest sequence.
            let values: Vec<f32> = values.iter().map(|v| v * (1.0 + k as f32 * 1e-4)).collect();
            // NaN cannot go through a codec; send raw f32 bytes under the f32 codec.
            let (codec, bytes) = match m.codec.encode(&values) {
                Ok(b) => (m.codec, b),
                Err(_) => (
                    tapestry_protocol::Codec::F32,
                    tapestry_protocol::f32_le_bytes(&values),
                ),
            };
            let mut forged = m.clone();
            forged.codec = codec;
            forged.payload_bytes = bytes.len() as u64;
            forged.chunk_ids = bytes
                .chunks(m.chunk_size as usize)
                .map(ContentId::of)
                .collect();
            let norm = values
                .iter()
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .sqrt() as f32;
            forged.l2_norm = if norm.is_finite() { norm } else { 0.0 };
            if copies > 1 {
                forged.seq = m.seq.saturating_mul(64).saturating_add(k as u64);
            }
            if attack.inflates() {
                forged.sample_count = u64::MAX;
            }
            Some((Signed::sign(forged, key).ok()?, bytes))
        })
        .collect()
}

/// A Byzantine node's replacement for its honest delta `own` (or `None` to
/// send nothing): `honest` holds the honest deltas of the round so far (for
/// colluding attacks), `first` the node's first delta (for replay).
pub(super) fn attacked(
    attack: Attack,
    own: Vec<f32>,
    honest: Option<&Vec<Vec<f32>>>,
    first: Option<Vec<f32>>,
    rng: &mut ChaCha8Rng,
) -> Option<Vec<f32>> {
    let n = own.len();
    let peers = honest.filter(|v| !v.is_empty());
    let mean_std = |vs: &Vec<Vec<f32>>| {
        let k = vs.len() as f32;
        let mean: Vec<f32> = (0..n)
            .map(|j| vs.iter().map(|v| v[j]).sum::<f32>() / k)
            .collect();
        let std: Vec<f32> = (0..n)
            .map(|j| (vs.iter().map(|v| (v[j] - mean[j]).powi(2)).sum::<f32>() / k).sqrt())
            .collect();
        (mean, std)
    };
    Some(match attack {
        Attack::SignFlip(k) => own.iter().map(|v| -k * v).collect(),
        Attack::Scaled(k) => own.iter().map(|v| k * v).collect(),
        Attack::Gaussian(sigma) => own
            .iter()
            .map(|v| v + sigma * rng.sample::<f32, _>(StandardNormal))
            .collect(),
        Attack::Alie(z) => {
            let (mean, std) = mean_std(peers.unwrap_or(&vec![own.clone()]));
            mean.iter().zip(&std).map(|(m, s)| m - z * s).collect()
        }
        Attack::Ipm(eps) => {
            let (mean, _) = mean_std(peers.unwrap_or(&vec![own.clone()]));
            mean.iter().map(|m| -eps * m).collect()
        }
        Attack::NotANumber => vec![f32::NAN; n],
        // Re-send the first delta as this round's.
        Attack::StaleReplay => first.unwrap_or(own),
        Attack::FreeRide => return None,
        // Honest deltas; these attack the versions (or the head a region
        // hands to others).
        Attack::ForgeVersion | Attack::ForgeMerge | Attack::RoundJump | Attack::PoisonHead => own,
        Attack::BallotStuffing | Attack::Takeover => own.iter().map(|v| -9.0 * v).collect(),
        Attack::WeightInflation => own.iter().map(|v| -3.0 * v).collect(),
    })
}
