//! Chunk transfer between two nodes against a raw libp2p stream, side by
//! side in one run, over TCP (noise, yamux) and over QUIC on loopback.
//!
//! - **Fetch**: the node's own code on both sides: its network task
//!   (`net::spawn`, every behaviour of a node); the serving side serves
//!   chunk streams as a node does (`runtime::serve_chunk_streams`: each
//!   chunk re-hashed from its sled store on a blocking thread, read ahead of
//!   the writes); the fetching side runs the node's `runtime::fetch_chunks`
//!   ([`STREAMS_PER_PROVIDER`] streams of [`BATCH`] chunks in flight, every
//!   chunk checked against its BLAKE3 id and put into its own sled store),
//!   then flushes that store. Timed from the first request to the flush's
//!   end.
//! - **Into memory**: the same fetch into a memory store (no disk): what
//!   the protocol and its checks cost apart from writing the chunks to disk.
//! - **Storing alone**: the fetching side's disk work without the network:
//!   the same chunks put into a fresh sled store one after the other and
//!   flushed.
//! - **Raw**: a swarm with nothing but `libp2p-stream` on the same
//!   transports, one stream carrying the same number of bytes from memory
//!   to memory (read and dropped): what the transport itself moves.
//!
//! Chunks of the protocol's size (256 KiB), of 1 MiB and of 4 MiB (the
//! largest a manifest may name): what chunk size to choose. Runs
//! alternate (raw, fetch, into memory, storing alone, raw, ...) so all see the same
//! machine; medians are printed with their ratios.
//!
//! `cargo bench -p tapestry-node --bench transfer [-- MIB [RUNS [CHUNK_KIB]]]`
//! (defaults: 1024 MiB, 3 runs, every chunk size).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, noise, tcp, yamux};
use prometheus_client::registry::Registry;
use tapestry_node::metrics::Metrics;
use tapestry_node::net::{self, NetConfig, NetEvent, NetHandle};
use tapestry_node::runtime::{
    BATCH, STREAMS_PER_PROVIDER, Shared, Store, fetch_chunks, serve_chunk_streams,
};
use tapestry_protocol::{ContentId, DEFAULT_CHUNK_SIZE, Keypair, MAX_CHUNK_SIZE};
use tapestry_storage::{ChunkStore, MemoryStore, SledConfig, SledStore};
use tokio::sync::oneshot;

mod common;
use common::fill;

const RAW: StreamProtocol = StreamProtocol::new("/tapestry-bench/raw/1");

#[derive(Clone, Copy, Debug)]
enum Transport {
    Tcp,
    Quic,
}

impl Transport {
    fn listen(self) -> Multiaddr {
        match self {
            Transport::Tcp => "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
            Transport::Quic => "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "TCP+noise+yamux",
            Transport::Quic => "QUIC",
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mib: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let runs: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    // Optionally one chunk size only, in KiB.
    let only: Option<usize> = args.get(2).and_then(|a| a.parse::<usize>().ok());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    println!(
        "transfer of {mib} MiB, {runs} runs each, medians; the node fetches on {STREAMS_PER_PROVIDER} streams of {BATCH} chunks"
    );
    println!(
        "| transport | chunk | raw stream MB/s | fetch MB/s | fetch / raw | the final flush, of the fetch's time | fetch into memory MB/s | into memory / raw | storing alone MB/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let cases: Vec<usize> = [DEFAULT_CHUNK_SIZE, 1 << 20, MAX_CHUNK_SIZE]
        .into_iter()
        .filter(|s| only.is_none_or(|k| k << 10 == *s))
        .collect();
    let mut stores: Vec<(usize, Store, Vec<ContentId>)> = Vec::new();
    for &size in &cases {
        if stores.iter().any(|(s, _, _)| *s == size) {
            continue;
        }
        let chunks = (mib << 20) / size;
        eprintln!(
            "writing {chunks} chunks of {} KiB into a serving store",
            size >> 10
        );
        let store: Store = Arc::new(
            SledStore::open(
                &tmp.path().join(format!("server-{size}")),
                &SledConfig::default(),
            )
            .unwrap(),
        );
        let ids = fill(store.as_ref(), chunks, size);
        stores.push((size, store, ids));
    }
    for transport in [Transport::Tcp, Transport::Quic] {
        for &size in &cases {
            let (_, store, ids) = stores.iter().find(|(s, _, _)| *s == size).unwrap();
            let total = ids.len() * size;
            let (mut raw, mut fetched, mut flushes, mut in_memory, mut stored) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for run in 0..runs {
                let r = rt.block_on(raw_stream(transport, total));
                let dir = tmp.path().join(format!("client-{run}"));
                let (f, flush) = rt.block_on(fetch_all(transport, store.clone(), ids, Some(&dir)));
                let _ = std::fs::remove_dir_all(&dir);
                let (m, _) = rt.block_on(fetch_all(transport, store.clone(), ids, None));
                let dir = tmp.path().join(format!("alone-{run}"));
                let a = store_alone(store, ids, &dir);
                let _ = std::fs::remove_dir_all(&dir);
                eprintln!(
                    "{}, {} KiB chunks, run {run}: raw {:.0} MB/s, fetch {:.0} MB/s (flush {:.2} s), into memory {:.0} MB/s, storing alone {:.0} MB/s",
                    transport.name(),
                    size >> 10,
                    mbps(total, r),
                    mbps(total, f),
                    flush.as_secs_f64(),
                    mbps(total, m),
                    mbps(total, a),
                );
                stored.push(a);
                raw.push(r);
                fetched.push(f);
                flushes.push(flush);
                in_memory.push(m);
            }
            let (r, f, flush, m, a) = (
                median(raw),
                median(fetched),
                median(flushes),
                median(in_memory),
                median(stored),
            );
            println!(
                "| {} | {} KiB | {:.0} | {:.0} | **{:.2}×** | {:.2} s of {:.2} s | {:.0} | {:.2}× | {:.0} |",
                transport.name(),
                size >> 10,
                mbps(total, r),
                mbps(total, f),
                r.as_secs_f64() / f.as_secs_f64(),
                flush.as_secs_f64(),
                f.as_secs_f64(),
                mbps(total, m),
                r.as_secs_f64() / m.as_secs_f64(),
                mbps(total, a),
            );
        }
    }
}

fn mbps(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e6
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The fetching side's disk work alone: the chunks of `ids`, read from
/// `store` into memory first (untimed), then put into a fresh sled store
/// in `dir` one after the other as a fetch puts them (`put_checked`) and
/// flushed. How long the puts and the flush took.
fn store_alone(store: &Store, ids: &[ContentId], dir: &std::path::Path) -> Duration {
    let chunks: Vec<_> = ids
        .iter()
        .map(|id| store.get(id).unwrap().unwrap())
        .collect();
    let sink = SledStore::open(dir, &SledConfig::default()).unwrap();
    let start = Instant::now();
    for (id, bytes) in ids.iter().zip(&chunks) {
        sink.put_checked(*id, bytes).unwrap();
    }
    sink.flush().unwrap();
    start.elapsed()
}

/// The node's network task on a fresh key, listening on `listen` or
/// dialling `bootstrap`.
fn node_net(
    listen: Option<Multiaddr>,
    bootstrap: Option<Multiaddr>,
) -> (NetHandle, net::Events, tokio::task::JoinHandle<()>) {
    let key = Keypair::generate(&mut rand::rngs::OsRng);
    net::spawn(
        &key,
        NetConfig {
            listen: listen.into_iter().collect(),
            bootstrap: bootstrap.into_iter().collect(),
            ..NetConfig::default()
        },
        &mut Registry::default(),
    )
    .unwrap()
}

/// Two nodes' network tasks; one serves `store`'s chunks as a node does,
/// the other fetches `ids` as a node does into a fresh sled store in
/// `dir` (or, without one, a memory store: what the transfer and its
/// checks cost without the disk). How long the fetch took, to the flush's
/// end, and how long the flush took of that.
async fn fetch_all(
    transport: Transport,
    store: Store,
    ids: &[ContentId],
    dir: Option<&std::path::Path>,
) -> (Duration, Duration) {
    let (server, mut server_events, server_task) = node_net(Some(transport.listen()), None);
    let addr = loop {
        match server_events.recv().await.unwrap() {
            NetEvent::Listening(addr) => break addr,
            _ => continue,
        }
    };
    let serving = tokio::spawn(serve_chunk_streams(
        server.accept_chunks().unwrap(),
        store,
        Shared::new(Arc::new(Metrics::new(Registry::default()))),
        Arc::new(|_: &PeerId| true),
    ));
    let idle = tokio::spawn(async move { while server_events.recv().await.is_some() {} });
    let with_peer = addr.with(libp2p::multiaddr::Protocol::P2p(server.peer_id()));
    let (client, mut client_events, client_task) = node_net(None, Some(with_peer));
    loop {
        match client_events.recv().await.unwrap() {
            NetEvent::PeerConnected(p) if p == server.peer_id() => break,
            _ => continue,
        }
    }
    let draining = tokio::spawn(async move { while client_events.recv().await.is_some() {} });
    let sink: Store = match dir {
        Some(dir) => Arc::new(SledStore::open(dir, &SledConfig::default()).unwrap()),
        None => Arc::new(MemoryStore::new()),
    };
    let shared = Shared::new(Arc::new(Metrics::new(Registry::default())));
    let peer = server.peer_id();
    let start = Instant::now();
    let all = fetch_chunks(&client, &sink, ids[0], ids, (&[peer], None), &shared).await;
    let fetched = start.elapsed();
    sink.flush().unwrap();
    let took = start.elapsed();
    assert!(all, "not every chunk was fetched");
    assert_eq!(shared.metrics.chunks_fetched.get(), ids.len() as u64);
    for task in [serving, idle, draining, server_task, client_task] {
        task.abort();
    }
    (took, took - fetched)
}

/// A swarm with nothing but raw streams, on the node's transports and
/// their settings.
fn raw_swarm() -> Swarm<libp2p_stream::Behaviour> {
    SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_quic()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// Two raw swarms; the listener writes `total` bytes on one stream, the
/// dialler reads them to the end. How long that took, from opening the
/// stream.
async fn raw_stream(transport: Transport, total: usize) -> Duration {
    let mut server = raw_swarm();
    let server_id = *server.local_peer_id();
    let mut incoming = server.behaviour().new_control().accept(RAW).unwrap();
    server.listen_on(transport.listen()).unwrap();
    let (listening_tx, listening) = oneshot::channel();
    let server_task = tokio::spawn(async move {
        let mut listening_tx = Some(listening_tx);
        loop {
            if let SwarmEvent::NewListenAddr { address, .. } = server.select_next_some().await
                && let Some(tx) = listening_tx.take()
            {
                let _ = tx.send(address);
            }
        }
    });
    let writer = tokio::spawn(async move {
        let (_, mut stream) = incoming.next().await.unwrap();
        let block = vec![0x5au8; 1 << 20];
        let mut left = total;
        while left > 0 {
            let n = left.min(block.len());
            stream.write_all(&block[..n]).await.unwrap();
            left -= n;
        }
        stream.close().await.unwrap();
    });
    let addr = listening.await.unwrap();
    let mut client = raw_swarm();
    let mut control = client.behaviour().new_control();
    client.dial(addr).unwrap();
    let (connected_tx, connected) = oneshot::channel::<PeerId>();
    let client_task = tokio::spawn(async move {
        let mut connected_tx = Some(connected_tx);
        loop {
            if let SwarmEvent::ConnectionEstablished { peer_id, .. } =
                client.select_next_some().await
                && let Some(tx) = connected_tx.take()
            {
                let _ = tx.send(peer_id);
            }
        }
    });
    assert_eq!(connected.await.unwrap(), server_id);
    let start = Instant::now();
    let mut stream = control.open_stream(server_id, RAW).await.unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0;
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        read += n;
    }
    let took = start.elapsed();
    assert_eq!(read, total);
    writer.await.unwrap();
    server_task.abort();
    client_task.abort();
    took
}
