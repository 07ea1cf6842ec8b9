//! What peers send and ask: network events, gossiped deltas, requests
//! answered from the store, and the roster checks behind them.

use super::*;

impl Node {
    /// Whether the roster (if any) admits `author`.
    pub(super) fn admitted(&self, author: &NodeId) -> bool {
        match &self.settings.roster {
            None => true,
            Some(r) => r.message().members.binary_search(author).is_ok(),
        }
    }

    pub(super) async fn on_net(&mut self, event: NetEvent) {
        match event {
            NetEvent::Listening(addr) => {
                tracing::info!(%addr, "listening");
                self.refresh_network().await;
            }
            NetEvent::PeerConnected(peer) => {
                self.peers.insert(peer);
                self.refresh_network().await;
            }
            NetEvent::Subscribed { peer, topic } if topic == self.deltas_hash => {
                // A member of this region. In a permissioned region only
                // those on the roster count towards a round's quorum.
                if let Some(id) = node_id_of(&peer).filter(|id| self.admitted(id))
                    && self.members.insert(peer)
                {
                    if self.running {
                        // Someone new (or back, after a cut): where is it?
                        self.ask_heads(vec![peer]);
                        self.feed(Input::PeerJoined(id)).await;
                    } else {
                        self.engine.handle(Input::PeerJoined(id), self.now_ms());
                    }
                }
            }
            NetEvent::Subscribed { .. } => {}
            NetEvent::Unsubscribed { peer, topic } => {
                if topic == self.deltas_hash
                    && self.members.remove(&peer)
                    && let Some(id) = node_id_of(&peer)
                {
                    self.feed(Input::PeerLeft(id)).await;
                }
            }
            NetEvent::PeerDisconnected(peer) => {
                self.peers.remove(&peer);
                if self.members.remove(&peer)
                    && let Some(id) = node_id_of(&peer)
                {
                    self.feed(Input::PeerLeft(id)).await;
                }
                self.refresh_network().await;
            }
            NetEvent::Request {
                peer,
                request,
                channel,
            } => {
                let response = self.answer(&request);
                if let FetchResponse::Chunk(bytes) = &response {
                    self.shared.metrics.chunks_served.inc();
                    self.count_out(bytes.len());
                }
                tracing::trace!(%peer, ?request, "request");
                let _ = self.net.respond(channel, response).await;
            }
            NetEvent::Gossip {
                id,
                source,
                topic,
                data,
            } => {
                self.shared.metrics.bytes_in.inc_by(data.len() as u64);
                let acceptance = if topic == self.deltas_hash {
                    Some(self.on_delta(source, &data).await)
                } else if topic == self.models_hash {
                    // A version being verified is reported when the
                    // verdict comes: forwarded only if it passed.
                    self.on_model(source, &data, Some(id.clone())).await
                } else {
                    Some(MessageAcceptance::Ignore)
                };
                if let Some(acceptance) = acceptance {
                    self.report(id, source, acceptance).await;
                }
            }
        }
    }

    /// Validates an announced delta and hands it to the engine.
    pub(super) async fn on_delta(&mut self, source: PeerId, data: &[u8]) -> MessageAcceptance {
        if data.len() > net::MAX_ANNOUNCEMENT_BYTES {
            tracing::info!(%source, bytes = data.len(), "announcement rejected: oversized");
            self.count_rejected("oversized");
            return MessageAcceptance::Reject;
        }
        let manifest = match Signed::<DeltaManifest>::open(data) {
            Ok(m) => m,
            Err(e) => {
                let reason = match e {
                    tapestry_protocol::DecodeError::BadSignature
                    | tapestry_protocol::DecodeError::InvalidKey => "bad_signature",
                    tapestry_protocol::DecodeError::TooLarge { .. } => "oversized",
                    tapestry_protocol::DecodeError::Invalid(_) => "invalid",
                    _ => "malformed",
                };
                tracing::info!(%source, %reason, error = %e, "announcement rejected");
                self.count_rejected(reason);
                return MessageAcceptance::Reject;
            }
        };
        if !self.admitted(&manifest.message().author) {
            self.count_rejected("not_in_roster");
            return MessageAcceptance::Reject;
        }
        self.providers
            .entry(manifest.id())
            .or_default()
            .push(source);
        let now = self.now_ms();
        let actions = self.engine.handle(Input::DeltaAnnounced(manifest), now);
        let rejected = actions.iter().any(|a| matches!(a, Action::Penalise(_)));
        let fetching = actions.iter().any(|a| matches!(a, Action::Fetch { .. }));
        for action in actions {
            self.act(action).await;
        }
        if rejected {
            MessageAcceptance::Reject
        } else if fetching {
            self.shared.metrics.deltas_accepted.inc();
            MessageAcceptance::Accept
        } else {
            // A duplicate, or one this node no longer needs.
            MessageAcceptance::Ignore
        }
    }

    /// Answers a peer's request from the store.
    pub(super) fn answer(&self, request: &FetchRequest) -> FetchResponse {
        match request {
            FetchRequest::Chunk(id) => match self.store.get_verified(id) {
                Ok(Some(bytes)) => FetchResponse::Chunk(bytes.to_vec()),
                _ => FetchResponse::NotFound,
            },
            FetchRequest::SignedManifest(id) => match self.store.manifest_bytes(id) {
                Ok(Some((_, bytes))) => FetchResponse::SignedManifest(bytes.to_vec()),
                _ => FetchResponse::NotFound,
            },
            FetchRequest::Attest(id) => match self.attestation(id) {
                Some(a) => FetchResponse::SignedManifest(a.envelope_bytes().to_vec()),
                None => FetchResponse::NotFound,
            },
            FetchRequest::Head { model_id, region } => {
                let cfg = &self.settings.engine;
                if *model_id == cfg.model_id && *region == cfg.region {
                    FetchResponse::Head(self.engine.version())
                } else {
                    FetchResponse::NotFound
                }
            }
        }
    }
}

/// Checks that a roster governs this node's model and region and is signed
/// by the region key.
pub(super) fn check_roster(
    roster: &Verified<Roster>,
    settings: &NodeSettings,
) -> Result<(), NodeError> {
    let r = roster.message();
    let cfg = &settings.engine;
    let Some(region_key) = settings.region_key else {
        return Err(NodeError::Config(
            "a roster needs the region key that signs it (region_key)".into(),
        ));
    };
    if roster.signer() != region_key {
        return Err(NodeError::Config(format!(
            "the roster is signed by {}, not by the region key {}",
            roster.signer(),
            region_key
        )));
    }
    if r.model_id != cfg.model_id || r.region != cfg.region {
        return Err(NodeError::Config(format!(
            "the roster governs {}/{}, not {}/{}",
            r.model_id, r.region, cfg.model_id, cfg.region
        )));
    }
    Ok(())
}
