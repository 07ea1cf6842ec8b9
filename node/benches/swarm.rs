//! Swarming: one author and seven members fetching its payload at once,
//! with the node's own fetch and serve code, over TCP on loopback; with
//! the members sharing the author's upload (`runtime::Swarm`: each chunk
//! asked of its owner first, served from memory while in flight) and
//! without (every member asks the author and whoever else it knows, in
//! the same order), alternating in one run. What the author uploads, in
//! copies of the payload, and how long until the last member has it all.
//!
//! `cargo bench -p tapestry-node --bench swarm [-- MIB [RUNS [MEMBERS]]]`
//! (defaults: 64 MiB in 256 KiB chunks, 3 runs, 7 members).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use prometheus_client::registry::Registry;
use tapestry_node::metrics::Metrics;
use tapestry_node::net::{self, NetConfig, NetEvent, NetHandle};
use tapestry_node::runtime::{Shared, Store, Swarm, fetch_chunk_map, serve_chunk_streams};
use tapestry_protocol::{ContentId, DEFAULT_CHUNK_SIZE, Keypair};
use tapestry_storage::MemoryStore;

mod common;
use common::fill;

/// One node: its network task, what it serves from, its shared state.
struct Node {
    net: NetHandle,
    shared: Shared,
    addr: Multiaddr,
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mib: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(64);
    let runs: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let members: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(7);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let size = DEFAULT_CHUNK_SIZE;
        let store: Store = Arc::new(MemoryStore::new());
        let ids = fill(store.as_ref(), (mib << 20) / size, size);
        let payload = (ids.len() * size) as u64;
        let author = node(store, &[]).await;
        let mut dial = vec![author.addr.clone()];
        let mut nodes = Vec::new();
        for _ in 0..members {
            let n = node(Arc::new(MemoryStore::new()), &dial).await;
            dial.push(n.addr.clone());
            nodes.push(n);
        }
        for n in &nodes {
            connected(&n.net, members).await;
        }
        println!(
            "{members} members fetch {mib} MiB ({} chunks of {} KiB) from one author at once, TCP on loopback; {runs} runs each, alternating",
            ids.len(),
            size >> 10
        );
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for run in 0..runs {
            for swarmed in [true, false] {
                let (copies, took, served) =
                    fetch_all(&author, &nodes, &ids, payload, swarmed).await;
                eprintln!(
                    "run {run}, {}: the author uploaded {copies:.2} copies; the last member done after {:.2} s; members served {served:?} chunks",
                    if swarmed { "sharing" } else { "not sharing" },
                    took.as_secs_f64()
                );
                if swarmed {
                    with.push((copies, took));
                } else {
                    without.push((copies, took));
                }
            }
        }
        println!("| members | author's upload, copies of the payload (median) | the last member done (median) |");
        println!("|---|---|---|");
        for (name, v) in [("sharing the author's upload", &with), ("not sharing", &without)] {
            let copies = median(v.iter().map(|x| x.0).collect());
            let took = median(v.iter().map(|x| x.1.as_secs_f64()).collect());
            println!("| {name} | {copies:.2} | {took:.2} s |");
        }
    });
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Every member fetches every chunk at once (each into memory, serving
/// what it holds); the author's upload in copies of the payload, the time
/// until the last member was done, and what each member served.
async fn fetch_all(
    author: &Node,
    nodes: &[Node],
    ids: &[ContentId],
    payload: u64,
    swarmed: bool,
) -> (f64, Duration, Vec<u64>) {
    let out_before = author.shared.metrics.bytes_out.get();
    let served_before: Vec<u64> = nodes
        .iter()
        .map(|n| n.shared.metrics.chunks_served.get())
        .collect();
    let members: Vec<PeerId> = nodes.iter().map(|n| n.net.peer_id()).collect();
    let swarm = Swarm::new(author.net.peer_id(), members.clone(), payload);
    let start = Instant::now();
    let tasks: Vec<_> = nodes
        .iter()
        .map(|n| {
            let providers: Vec<PeerId> = [author.net.peer_id()]
                .into_iter()
                .chain(members.iter().copied().filter(|p| *p != n.net.peer_id()))
                .collect();
            let (net, shared, ids) = (n.net.clone(), n.shared.clone(), ids.to_vec());
            let swarm = swarmed.then(|| swarm.clone());
            tokio::spawn(async move {
                let empty: Store = Arc::new(MemoryStore::new());
                let got = fetch_chunk_map(
                    &net,
                    &empty,
                    ids[0],
                    &ids,
                    &providers,
                    &shared,
                    swarm.as_ref(),
                )
                .await
                .expect("a fetch failed");
                (start.elapsed(), got)
            })
        })
        .collect();
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.unwrap());
    }
    // Every member holds every chunk until all are done (a node stores
    // what it fetched and serves it from its store after).
    assert!(done.iter().all(|(_, got)| got.len() == ids.len()));
    let last = done.iter().map(|(t, _)| *t).max().unwrap();
    let copies = (author.shared.metrics.bytes_out.get() - out_before) as f64 / payload as f64;
    let served = nodes
        .iter()
        .zip(served_before)
        .map(|(n, b)| n.shared.metrics.chunks_served.get() - b)
        .collect();
    (copies, last, served)
}

/// A node's network task on a fresh key listening on TCP, dialling
/// `bootstrap`, serving chunk streams from `store` (and what its fetches
/// hold) as a node does.
async fn node(store: Store, bootstrap: &[Multiaddr]) -> Node {
    let key = Keypair::generate(&mut rand::rngs::OsRng);
    let (net, mut events, _task) = net::spawn(
        &key,
        NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            bootstrap: bootstrap.to_vec(),
            ..NetConfig::default()
        },
        &mut Registry::default(),
    )
    .unwrap();
    let addr = loop {
        match events.recv().await.unwrap() {
            NetEvent::Listening(addr) => break addr,
            _ => continue,
        }
    };
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    let shared = Shared::new(Arc::new(Metrics::new(Registry::default())));
    tokio::spawn(serve_chunk_streams(
        net.accept_chunks().unwrap(),
        store,
        shared.clone(),
        Arc::new(|_: &PeerId| true),
    ));
    let addr = addr.with(libp2p::multiaddr::Protocol::P2p(net.peer_id()));
    Node { net, shared, addr }
}

/// Waits (bounded) until `net` sees `n` peers.
async fn connected(net: &NetHandle, n: usize) {
    for _ in 0..600 {
        if net.snapshot().peers.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("only {} of {n} peers connected", net.snapshot().peers.len());
}
