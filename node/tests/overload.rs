//! The network task under load, on real libp2p swarms over loopback: it
//! never waits for the node. A node that stops reading its events (frozen,
//! or slower than what peers send) has its peers' requests answered `Busy`
//! and counted, and its network task keeps connecting peers.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::future::join_all;
use prometheus_client::registry::Registry;
use tapestry_node::net::{self, NetConfig, NetHandle};
use tapestry_protocol::{FetchRequest, FetchResponse, Keypair};

/// A network task on loopback, with `tune` applied to its configuration.
fn start(
    seed: u8,
    bootstrap: Vec<libp2p::Multiaddr>,
    tune: impl FnOnce(&mut NetConfig),
) -> (NetHandle, net::Events, Registry) {
    let mut registry = Registry::default();
    let mut cfg = NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap,
        request_timeout: Duration::from_secs(5),
        ..NetConfig::default()
    };
    tune(&mut cfg);
    let (handle, events, _task) =
        net::spawn(&Keypair::from_secret_bytes(&[seed; 32]), cfg, &mut registry).unwrap();
    (handle, events, registry)
}

/// `net_shed_total{kind}` as `registry` reports it (0 before any).
fn shed(registry: &Registry, kind: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    let series = format!("net_shed_total{{kind=\"{kind}\"}}");
    text.lines()
        .find(|l| l.starts_with(&series))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// `addr/p2p/peer` once the node listens (bounded wait).
async fn address(h: &NetHandle) -> libp2p::Multiaddr {
    for _ in 0..100 {
        if let Some(a) = h.snapshot().listen.first() {
            let addr: libp2p::Multiaddr = a.parse().unwrap();
            return addr.with(libp2p::multiaddr::Protocol::P2p(h.peer_id()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the node never listened");
}

/// Waits (bounded) until `h` sees `n` peers.
async fn peers(h: &NetHandle, n: usize) -> bool {
    for _ in 0..200 {
        if h.snapshot().peers.len() >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_reading_gets_busy_answers_not_a_stuck_network() {
    let queue = 8;
    let (frozen, events, registry) = start(1, Vec::new(), |c| c.event_queue = queue);
    // Nobody reads this node's events: it is frozen from the start.
    std::mem::forget(events);
    let at = address(&frozen).await;
    let (asker, _asker_events, _) = start(2, vec![at.clone()], |_| {});
    assert!(peers(&frozen, 1).await, "the asker never connected");

    // Fill the frozen node's queue (if its own connection and ping events
    // have not already): these requests wait there unanswered.
    let target = frozen.peer_id();
    let waiting: Vec<_> = (0..queue)
        .map(|_| {
            let asker = asker.clone();
            tokio::spawn(async move {
                asker
                    .fetch(
                        target,
                        FetchRequest::Chunk(tapestry_protocol::ContentId::of(b"x")),
                    )
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Everything beyond the queue is answered `Busy` (at once; the asker
    // asks again a few times, then gives up with that answer).
    let answers = join_all((0..40).map(|_| {
        asker.fetch(
            target,
            FetchRequest::Chunk(tapestry_protocol::ContentId::of(b"y")),
        )
    }))
    .await;
    let busy = answers
        .iter()
        .filter(|a| matches!(a, Ok(FetchResponse::Busy)))
        .count();
    assert_eq!(busy, answers.len(), "{answers:?}");

    // The network task still works for the node: a new peer connects and
    // shows in its view.
    let (_late, _late_events, _) = start(3, vec![at], |_| {});
    assert!(
        peers(&frozen, 2).await,
        "a peer connecting later was never seen"
    );

    // The shedding is counted.
    assert!(shed(&registry, "request") >= 40.0);
    for w in waiting {
        w.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_beyond_the_queues_byte_bound_is_shed_and_counted() {
    // A node that does not read its events holds at most 64 KiB of gossip
    // for it, however many events its queue could take.
    let topic = "/tapestry/1/digits/test/deltas".to_string();
    let spawn = |seed: u8, bootstrap: Vec<libp2p::Multiaddr>| {
        start(seed, bootstrap, |c| {
            c.topics = vec![topic.clone()];
            c.event_queue_bytes = 64 << 10;
        })
    };
    let (frozen, events, registry) = spawn(4, Vec::new());
    let at = address(&frozen).await;
    let (sender, _sender_events, _) = spawn(5, vec![at]);
    assert!(peers(&frozen, 1).await, "the sender never connected");
    // Subscriptions exchanged, a heartbeat or two for the mesh.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..20u8 {
        sender.publish(&topic, vec![i; 16 << 10]).await.unwrap();
    }
    // Bounded wait for the 16 that do not fit to be counted.
    for _ in 0..100 {
        if shed(&registry, "gossip") >= 16.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(shed(&registry, "gossip"), 16.0);
    assert_eq!(events.queued_bytes(), 64 << 10);
}
