//! Deltas in flight: a node's published delta announced to its region (or
//! replaced by a Byzantine node's forgery, or withheld), and payloads
//! fetched from their authors, through the nodes' chunk stores when the
//! scenario gives them stores.

use super::*;

impl World<'_> {
    /// Node `i` publishes a delta: announced as it is, or, from a Byzantine
    /// node, replaced by its forgery (colluding attacks first wait to hear
    /// the honest deltas), or withheld (free-riding).
    pub(super) fn publish(
        &mut self,
        i: usize,
        now: u64,
        manifest: Verified<DeltaManifest>,
        payload: Vec<u8>,
    ) {
        match (self.byzantine.contains(&i), self.attack) {
            (true, Some(Attack::FreeRide)) => {}
            (true, Some(attack)) if attack != Attack::PoisonHead => {
                let wait = match attack {
                    Attack::Alie(_) | Attack::Ipm(_) => {
                        self.net.latency_ms() + self.settings.scenario.jitter_ms + 1
                    }
                    _ => 0,
                };
                self.push(
                    now + wait,
                    Event::Forge {
                        node: i,
                        manifest,
                        payload,
                    },
                );
            }
            _ => {
                let colluding = matches!(self.attack, Some(Attack::Alie(_) | Attack::Ipm(_)));
                let n_params = self.spec.n_params();
                let decoded = colluding
                    .then(|| manifest.message().codec.decode(&payload, n_params).ok())
                    .flatten();
                if let Some(v) = decoded {
                    self.honest_deltas
                        .entry(manifest.message().round)
                        .or_default()
                        .push(v);
                }
                self.announce(i, now, manifest, payload);
            }
        }
    }

    /// Node `i` fetches a delta's payload from its author (from the
    /// author's chunk store when there are stores) into its own store.
    pub(super) fn fetch(
        &mut self,
        i: usize,
        now: u64,
        manifest: Verified<DeltaManifest>,
    ) -> Result<(), SimError> {
        let author = self.index.get(&manifest.message().author).copied();
        let payload = match (author, self.stores.is_empty()) {
            (Some(a), false) => {
                let m = manifest.message();
                self.stores[a]
                    .read_payload(&m.chunk_ids, m.payload_bytes)
                    .ok()
            }
            _ => self.published.get(&manifest.id()).cloned(),
        };
        let (Some(payload), Some(a)) = (payload, author) else {
            return Ok(());
        };
        if let Some(store) = self.stores.get(i) {
            let m = manifest.message();
            store
                .put_payload(&payload, m.chunk_size as usize)
                .and_then(|_| store.put_delta_manifest(&manifest))?;
        }
        let id = manifest.id();
        // The request travels, then the author's uplink sends.
        let asked = self.net.send_reliable(i, a, now, 128);
        if let Ok(at) = asked.and_then(|t| self.net.send_reliable(a, i, t, payload.len() as u64)) {
            let input = Input::DeltaPayload {
                id,
                payload: payload.into(),
            };
            self.push(at, Event::Deliver { node: i, input });
        }
        Ok(())
    }

    /// Stores a payload for fetching and announces its manifest to the region.
    pub(super) fn announce(
        &mut self,
        i: usize,
        now: u64,
        manifest: Verified<DeltaManifest>,
        payload: Vec<u8>,
    ) {
        self.published_in
            .entry(manifest.message().round)
            .or_default()
            .push(manifest.id());
        if let Some(store) = self.stores.get(i) {
            // The author keeps what it announces; fetches are served from here.
            let stored = store
                .put_payload(&payload, manifest.message().chunk_size as usize)
                .and_then(|_| store.put_delta_manifest(&manifest));
            if stored.is_err() {
                return;
            }
        }
        self.published.insert(manifest.id(), payload);
        self.delta_manifests.insert(manifest.id(), manifest.clone());
        let size = manifest.envelope_bytes().len() as u64;
        for j in 0..self.keys.len() {
            if j == i || self.region[j] != self.region[i] {
                continue;
            }
            if let Ok(at) = self.net.send(i, j, now, size) {
                let input = Input::DeltaAnnounced(manifest.clone());
                self.push(at, Event::Deliver { node: j, input });
            }
        }
    }
}
