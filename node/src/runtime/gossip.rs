//! What peers send and ask: network events, gossiped deltas, requests
//! answered from the store, and the roster checks behind them.

use super::*;

/// Non-members of a permissioned region kept connected at once (they are
/// served nothing; a few may be a relay or a bootstrap address).
pub(super) const MAX_OUTSIDERS: usize = 16;

impl Node {
    /// Whether the roster (if any) admits `author`.
    pub(super) fn admitted(&self, author: &NodeId) -> bool {
        admission::on_roster(self.roster(), author)
    }

    /// Whether `peer` may take part: any peer in an open region, a roster
    /// member in a permissioned one.
    pub(super) fn member(&self, peer: &PeerId) -> bool {
        is_member(self.roster(), peer)
    }

    /// Connected non-members this node keeps (at most [`MAX_OUTSIDERS`];
    /// 0 in an open region).
    pub(super) fn outsiders(&self) -> usize {
        self.peers
            .iter()
            .filter(|p| !self.member(p) && !self.federated(p))
            .count()
    }

    /// Whether `peer` is a member of a neighbouring region of the
    /// federation (served the exported versions, not counted as an
    /// outsider, kept out of the gossip mesh).
    pub(super) fn federated(&self, peer: &PeerId) -> bool {
        self.federation.as_ref().is_some_and(|f| f.federated(peer))
    }

    /// The region's roster, if it is permissioned.
    pub(super) fn roster(&self) -> Option<&Roster> {
        self.settings.roster.as_ref().map(|r| r.message())
    }

    pub(super) async fn on_net(&mut self, event: NetEvent) {
        match event {
            NetEvent::Listening(addr) => {
                tracing::info!(%addr, "listening");
                self.refresh_network().await;
            }
            NetEvent::PeerConnected(peer) => {
                self.liveness.connected(peer, Instant::now());
                if !self.member(&peer) {
                    // A permissioned region's gossip is its members' alone,
                    // and so are all but a few of its connections: past
                    // [`MAX_OUTSIDERS`] connected non-members (neighbouring
                    // regions' members aside), more are turned away
                    // (refused, counted), so a crowd of peer ids cannot
                    // take the slots members connect on.
                    if !self.federated(&peer) && self.outsiders() >= MAX_OUTSIDERS {
                        self.refuse(&Rejection::Outsider(peer.to_string()), &peer);
                        let _ = self.net.disconnect(peer).await;
                        return;
                    }
                    let _ = self.net.blacklist(peer).await;
                }
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
            NetEvent::Ping { peer, outcome } => {
                if let PingOutcome::Failed(error) = &outcome {
                    tracing::debug!(%peer, %error, "ping failed");
                }
                self.liveness.ping(peer, &outcome, Instant::now());
            }
            NetEvent::PeerDisconnected(peer) => {
                self.liveness.gone(&peer);
                self.gossip_budget.forget(&peer);
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
            } => self.serve(peer, request, channel).await,
            NetEvent::Gossip {
                id,
                source,
                topic,
                data,
            } => {
                self.shared.metrics.bytes_in.inc_by(data.len() as u64);
                self.on_gossip(id, source, topic, data).await;
            }
        }
    }

    /// Hands an announced delta (its envelope and roster checked) to the
    /// engine.
    pub(super) async fn on_delta(
        &mut self,
        source: PeerId,
        manifest: Verified<DeltaManifest>,
    ) -> Verdict {
        if !self.accepting() {
            // The store is full: no new data (not fetched, not forwarded).
            return Verdict::Ignore;
        }
        self.providers
            .entry(manifest.id())
            .or_default()
            .push(source);
        let (id, m) = (manifest.id(), manifest.message().clone());
        let now = self.now_ms();
        let actions = self.engine.handle(Input::DeltaAnnounced(manifest), now);
        // Refused at the door: rejected (costing the forwarder) only if the
        // manifest itself is wrong, ignored if it is refused for what this
        // node has seen (see `Rejection::verdict`).
        let refused = actions.iter().find_map(|a| match a {
            Action::Penalise(r) => Some(Rejection::Delta(r.clone()).verdict()),
            _ => None,
        });
        let fetching = actions.iter().any(|a| matches!(a, Action::Fetch { .. }));
        tracing::debug!(
            round = m.round,
            author = %m.author.short(),
            delta = %id.short(),
            %source,
            fetching,
            refused = refused.is_some(),
            "delta heard"
        );
        for action in actions {
            self.act(action).await;
        }
        if let Some(verdict) = refused {
            verdict
        } else if fetching {
            self.shared.metrics.deltas_accepted.inc();
            Verdict::Accept
        } else {
            // A duplicate, or one this node no longer needs.
            Verdict::Ignore
        }
    }

    /// Logs and counts a refusal; returns its gossip verdict.
    pub(super) fn refuse(&self, r: &Rejection, source: &PeerId) -> Verdict {
        tracing::info!(%source, reason = r.label(), error = %r, "refused");
        self.shared.metrics.reject(r.label());
        r.verdict()
    }

    /// Lowers the gossip score of `author` if `r` shows it at fault (see
    /// [`Rejection::blames_author`]).
    pub(super) fn blame(&self, r: &Rejection, author: &NodeId) {
        if r.blames_author()
            && let Some(peer) = net::peer_id_of(author)
        {
            self.net.fault(peer);
        }
    }
}

/// Whether `peer` may take part under `roster`: any peer without one, a
/// member of it with one.
pub(super) fn is_member(roster: Option<&Roster>, peer: &PeerId) -> bool {
    roster.is_none() || node_id_of(peer).is_some_and(|id| admission::on_roster(roster, &id))
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
