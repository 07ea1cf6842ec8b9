//! The node in one process on tokio's paused clock. The network task is
//! played by the test through a detached [`NetHandle`] and the event
//! channel, so the node's timing — a round's deadline, the silence limit
//! for peers — is checked in virtual time, without real sleeping.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use libp2p::gossipsub::{IdentTopic, MessageAcceptance};
use prometheus_client::registry::Registry;
use tapestry_core::aggregate::AggregationRule;
use tapestry_core::data::synthetic;
use tapestry_core::door::DoorConfig;
use tapestry_storage::MemoryStore;

use super::*;
use crate::metrics::Metrics;
use crate::net::Command;

/// What the node asked the network for, and when (virtual time).
#[derive(Debug)]
enum Seen {
    Published {
        topic: String,
        data: Vec<u8>,
    },
    Disconnected(PeerId),
    Reported {
        id: libp2p::gossipsub::MessageId,
        acceptance: libp2p::gossipsub::MessageAcceptance,
    },
    Fault(PeerId),
}

/// A fetch the network never answers: the request and the reply's sender
/// (closed once the node gives the fetch up).
type Held = (
    FetchRequest,
    tokio::sync::oneshot::Sender<Result<FetchResponse, net::NetError>>,
);

/// Plays the network task: answers what needs an answer (chunk fetches are
/// handed to `held` unanswered, when given), reports publications and
/// disconnections, and tells the node when a peer it dropped is gone.
async fn play_network(
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    seen: mpsc::UnboundedSender<(Instant, Seen)>,
    held: Option<mpsc::UnboundedSender<Held>>,
) {
    while let Some(command) = commands.recv().await {
        let now = Instant::now();
        match command {
            Command::Publish { topic, data } => {
                let _ = seen.send((now, Seen::Published { topic, data }));
            }
            Command::Disconnect(peer) => {
                let _ = seen.send((now, Seen::Disconnected(peer)));
                let _ = events.send(NetEvent::PeerDisconnected(peer)).await;
            }
            Command::Fetch {
                request: request @ FetchRequest::Chunk(_),
                reply,
                ..
            } if held.is_some() => {
                if let Some(h) = &held {
                    let _ = h.send((request, reply));
                }
            }
            Command::Fetch { peer, reply, .. } => {
                let _ = reply.send(Err(net::NetError::Fetch {
                    peer,
                    reason: "nobody serves in this test".into(),
                }));
            }
            Command::Providers { reply, .. } => {
                let _ = reply.send(Vec::new());
            }
            Command::Report { id, acceptance, .. } => {
                let _ = seen.send((now, Seen::Reported { id, acceptance }));
            }
            Command::Fault(peer) => {
                let _ = seen.send((now, Seen::Fault(peer)));
            }
            Command::Blacklist(_)
            | Command::Respond { .. }
            | Command::Provide(_)
            | Command::Unprovide(_) => {}
        }
    }
}

fn key(seed: u8) -> Keypair {
    Keypair::from_secret_bytes(&[seed; 32])
}

fn peer(seed: u8) -> PeerId {
    net::peer_id_of(&key(seed).node_id()).unwrap()
}

/// An in-process node (key 1, synthetic data, a memory store) with
/// `engine`, for `rounds` rounds (or on), against a played network (chunk
/// fetches handed to `held` unanswered, when given).
struct Played {
    events: mpsc::Sender<NetEvent>,
    seen: mpsc::UnboundedReceiver<(Instant, Seen)>,
    shared: Shared,
    running: tokio::task::AbortHandle,
    stop: watch::Sender<bool>,
}

fn start_played(
    engine: EngineConfig,
    rounds: Option<u64>,
    held: Option<mpsc::UnboundedSender<Held>>,
) -> Played {
    let settings = NodeSettings {
        engine,
        train: tapestry_testkit::sgd(2, 16, 0.05),
        model_seed: 1,
        rounds,
        start_peers: 1,
        start_wait: Duration::from_secs(60),
        min_round: Duration::ZERO,
        keep_versions: 4,
        quota_bytes: None,
        freeze_at_round: None,
        roster: None,
        region_key: None,
        vote_file: None,
        sequences_file: None,
        attestations: 0,
        neighbours: Vec::new(),
    };
    let (train, test) = synthetic(3, 300, 64, 10).split(0.2, 1).unwrap();
    let shared = Shared::new(Arc::new(Metrics::new(Registry::default())));
    let store: Store = Arc::new(MemoryStore::new());
    let (net, commands) = NetHandle::detached(peer(1));
    let node = Node::new(
        settings,
        key(1),
        store,
        net,
        LocalData::rows(train, test),
        shared.clone(),
    )
    .unwrap();
    let (events, events_rx) = mpsc::channel(64);
    let (seen_tx, seen) = mpsc::unbounded_channel();
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(play_network(commands, events.clone(), seen_tx, held));
    let running = tokio::spawn(node.run(net::Events::from_receiver(events_rx), stop_rx));
    Played {
        events,
        seen,
        shared,
        running: running.abort_handle(),
        stop,
    }
}

/// Runs `test` on a current-thread runtime with paused time, on its own
/// thread, and fails if it has not finished after `real` (wall clock): a
/// node that never goes idle never lets virtual time advance, and must not
/// hang the suite.
fn paused<F: std::future::Future<Output = ()> + Send + 'static>(real: Duration, test: F) {
    let (done_tx, done) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(test);
        let _ = done_tx.send(());
    });
    match done.recv_timeout(real) {
        Ok(()) => worker.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // The test panicked: report its panic.
            if let Err(p) = worker.join() {
                std::panic::resume_unwind(p);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("still running after {real:?} of real time")
        }
    }
}

#[test]
fn a_round_deadline_closes_a_round_and_a_silent_peer_is_dropped() {
    paused(Duration::from_secs(120), round_deadline_and_silent_peer());
}

async fn round_deadline_and_silent_peer() {
    let timeout = Duration::from_secs(5);
    let mut engine =
        tapestry_testkit::engine_config(AggregationRule::Mean, DoorConfig::default(), 1);
    engine.round_timeout_ms = timeout.as_millis() as u64;
    // Two rounds, then idle: virtual time then runs on to the silent
    // peer's deadline.
    let Played {
        events: events_tx,
        mut seen,
        shared,
        running,
        stop: _stop,
    } = start_played(engine, Some(2), None);

    // A region member that answers pings but sends no delta, so the round
    // can only close at its deadline; and a peer that falls silent.
    let t0 = Instant::now();
    let (member, silent) = (peer(2), peer(3));
    let deltas = IdentTopic::new(deltas_topic("digits", "test")).hash();
    for event in [
        NetEvent::PeerConnected(member),
        NetEvent::PeerConnected(silent),
        NetEvent::Subscribed {
            peer: member,
            topic: deltas,
        },
    ] {
        events_tx.send(event).await.unwrap();
    }
    let pings = events_tx.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let outcome = PingOutcome::Answered(Duration::from_millis(2));
            if pings
                .send(NetEvent::Ping {
                    peer: member,
                    outcome,
                })
                .await
                .is_err()
            {
                break;
            }
        }
    });

    // Bounded: if the node never closes its round, virtual time runs out.
    let (mut delta_at, mut version_at, mut dropped) = (None, None, Vec::new());
    let watch = async {
        while let Some((at, s)) = seen.recv().await {
            match s {
                Seen::Published { topic, .. } if topic.ends_with("/deltas") => {
                    delta_at.get_or_insert(at);
                }
                Seen::Published { topic, data } if topic.ends_with("/models") => {
                    let m = Signed::<ModelManifest>::open(&data).unwrap();
                    if m.message().round == 1 {
                        version_at = Some(at);
                    }
                }
                Seen::Published { .. } | Seen::Reported { .. } | Seen::Fault(_) => {}
                Seen::Disconnected(p) => dropped.push((at, p)),
            }
            if version_at.is_some() && !dropped.is_empty() {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), watch)
        .await
        .expect("the round never closed, or the silent peer was never dropped");

    let delta_at = delta_at.expect("the node announced no delta of its own");
    let version_at = version_at.unwrap();
    // Quorum was never met (the member sent nothing): the round closed at
    // its deadline, not before, and on the node's own delta.
    assert!(version_at >= delta_at, "{version_at:?} before {delta_at:?}");
    assert!(version_at.duration_since(t0) >= timeout, "closed early");
    assert!(version_at.duration_since(t0) < timeout * 2, "closed late");
    assert!(shared.status().round >= 1);
    // The silent peer went after the silence limit; the member stayed.
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    let (at, p) = dropped[0];
    assert_eq!(p, silent);
    assert!(at.duration_since(t0) >= net::SILENCE_LIMIT);
    assert!(at.duration_since(t0) < net::SILENCE_LIMIT + Duration::from_secs(1));
    running.abort();
}

#[test]
fn gossip_is_checked_in_batches_and_only_evident_faults_cost_score() {
    paused(Duration::from_secs(120), gossip_verdicts());
}

/// Announcements arrive all at once (one batch for the checker): a forged
/// one, one for another region, a valid delta, the same author's second
/// vote for the round, one from far ahead, and garbage. Each gets the
/// verdict its fault deserves, and only authors proven at fault are
/// reported to the network task.
async fn gossip_verdicts() {
    let engine = tapestry_testkit::engine_config(AggregationRule::Mean, DoorConfig::default(), 1);
    let cfg = engine.clone();
    let Played {
        events: events_tx,
        mut seen,
        running,
        stop: _stop,
        ..
    } = start_played(engine, None, None);
    let member = peer(2);
    let deltas = IdentTopic::new(deltas_topic("digits", "test")).hash();
    for event in [
        NetEvent::PeerConnected(member),
        NetEvent::Subscribed {
            peer: member,
            topic: deltas.clone(),
        },
    ] {
        events_tx.send(event).await.unwrap();
    }
    // The node's own delta tells its round.
    let round = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Some((_, Seen::Published { topic, data })) = seen.recv().await
                && topic.ends_with("/deltas")
            {
                return Signed::<DeltaManifest>::open(&data)
                    .unwrap()
                    .message()
                    .round;
            }
        }
    })
    .await
    .expect("the node never announced its delta");

    let values = vec![0.01f32; cfg.spec.n_params()];
    let bytes = |m: Verified<DeltaManifest>| m.envelope_bytes().to_vec();
    let (valid, _) = tapestry_testkit::sign::delta(&cfg, &key(2), round, 1, &values);
    let mut forged = bytes(valid.clone());
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let other: Vec<f32> = values.iter().map(|v| v * 2.0).collect();
    let (second, _) = tapestry_testkit::sign::delta(&cfg, &key(2), round, 2, &other);
    let (mut elsewhere, _) =
        tapestry_testkit::sign::delta_manifest(&cfg, &key(4), round, 1, &values);
    elsewhere.region = "elsewhere".into();
    let elsewhere = tapestry_testkit::sign::signed(elsewhere, &key(4));
    let (ahead, _) = tapestry_testkit::sign::delta(&cfg, &key(3), round + 100, 1, &values);
    let cases = [
        ("forged", forged, MessageAcceptance::Reject),
        ("elsewhere", bytes(elsewhere), MessageAcceptance::Reject),
        ("valid", bytes(valid), MessageAcceptance::Accept),
        ("second vote", bytes(second), MessageAcceptance::Ignore),
        ("far ahead", bytes(ahead), MessageAcceptance::Ignore),
        ("garbage", vec![0xff; 40], MessageAcceptance::Reject),
    ];
    for (k, (_, data, _)) in cases.iter().enumerate() {
        events_tx
            .send(NetEvent::Gossip {
                id: libp2p::gossipsub::MessageId::new(&[k as u8]),
                source: member,
                topic: deltas.clone(),
                data: data.clone(),
            })
            .await
            .unwrap();
    }
    let (mut verdicts, mut faults) = (HashMap::new(), Vec::new());
    tokio::time::timeout(Duration::from_secs(60), async {
        while verdicts.len() < cases.len() {
            match seen.recv().await {
                Some((_, Seen::Reported { id, acceptance })) => {
                    verdicts.insert(id.0[0] as usize, acceptance);
                }
                Some((_, Seen::Fault(p))) => faults.push(p),
                Some(_) => {}
                None => break,
            }
        }
    })
    .await
    .expect("not every announcement got its verdict");
    for (k, (what, _, expected)) in cases.iter().enumerate() {
        assert_eq!(verdicts.get(&k), Some(expected), "{what}");
    }
    // Faults are reported as the verdicts are: give them a moment.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some((_, s)) = seen.recv().await {
            if let Seen::Fault(p) = s {
                faults.push(p);
            }
        }
    })
    .await;
    faults.sort();
    let mut expected = vec![peer(2), peer(4)];
    expected.sort();
    // The equivocating author and the one signing for another region; not
    // the one merely ahead, not the forwarder of a forgery.
    assert_eq!(faults, expected);
    running.abort();
}

#[test]
fn a_payload_fetch_is_given_up_once_its_round_leaves_the_window() {
    paused(Duration::from_secs(120), fetch_given_up());
}

/// A peer announces a delta and never serves it: the node's fetch of its
/// payload waits (the round closes at its deadline without it) until the
/// delta's round leaves the staleness window, and is then aborted, not
/// left waiting for ever.
async fn fetch_given_up() {
    let mut engine =
        tapestry_testkit::engine_config(AggregationRule::Mean, DoorConfig::default(), 1);
    engine.round_timeout_ms = 1_000;
    let cfg = engine.clone();
    let staleness = cfg.door.staleness;
    let (held_tx, mut held) = mpsc::unbounded_channel();
    let Played {
        events: events_tx,
        mut seen,
        running,
        stop: _stop,
        ..
    } = start_played(engine, None, Some(held_tx));
    let member = peer(2);
    let deltas = IdentTopic::new(deltas_topic("digits", "test")).hash();
    for event in [
        NetEvent::PeerConnected(member),
        NetEvent::Subscribed {
            peer: member,
            topic: deltas.clone(),
        },
    ] {
        events_tx.send(event).await.unwrap();
    }
    // The member answers pings, so it stays a member of the round.
    let pings = events_tx.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let outcome = PingOutcome::Answered(Duration::from_millis(2));
            if pings
                .send(NetEvent::Ping {
                    peer: member,
                    outcome,
                })
                .await
                .is_err()
            {
                break;
            }
        }
    });
    // The node's own delta tells its round.
    let published_round = |data: &[u8], topic: &str| -> Option<u64> {
        if topic.ends_with("/deltas") {
            Signed::<DeltaManifest>::open(data)
                .ok()
                .map(|m| m.message().round)
        } else {
            Signed::<ModelManifest>::open(data)
                .ok()
                .map(|m| m.message().round)
        }
    };
    let round = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Some((_, Seen::Published { topic, data })) = seen.recv().await
                && topic.ends_with("/deltas")
            {
                return published_round(&data, &topic).unwrap();
            }
        }
    })
    .await
    .expect("the node never announced its delta");

    // The member's delta of this round: accepted, its payload asked for.
    let values = vec![0.01f32; cfg.spec.n_params()];
    let (announced, _) = tapestry_testkit::sign::delta(&cfg, &key(2), round, 1, &values);
    let chunk = announced.message().chunk_ids[0];
    events_tx
        .send(NetEvent::Gossip {
            id: libp2p::gossipsub::MessageId::new(b"delta"),
            source: member,
            topic: deltas,
            data: announced.envelope_bytes().to_vec(),
        })
        .await
        .unwrap();
    let (request, mut reply) = tokio::time::timeout(Duration::from_secs(10), held.recv())
        .await
        .expect("the payload was never asked for")
        .unwrap();
    assert_eq!(request, FetchRequest::Chunk(chunk));

    // Rounds close at their deadlines without it. While its round is in
    // the window the fetch waits; once the head is past it, it is aborted.
    let mut head_round = round;
    let aborted = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            tokio::select! {
                () = reply.closed() => return head_round,
                Some((_, s)) = seen.recv() => {
                    if let Seen::Published { topic, data } = s
                        && topic.ends_with("/models")
                    {
                        head_round = head_round.max(published_round(&data, &topic).unwrap());
                    }
                }
            }
        }
    })
    .await
    .expect("the fetch was never given up");
    // (The node gives the fetch up as it adopts round + staleness + 1,
    // just before announcing that version: the last announcement seen is
    // that one's or the one before.)
    assert!(
        aborted >= round + staleness,
        "given up at head round {aborted}, with round {round}'s delta still in the window"
    );
    assert!(
        aborted <= round + staleness + 1,
        "given up only at head round {aborted} (delta of round {round})"
    );
    running.abort();
}
