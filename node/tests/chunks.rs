//! Chunk streams (`/tapestry/chunks/1`) between real network tasks on
//! loopback: a fetch takes chunks from every provider at once, each chunk
//! from whoever holds it; a provider serving a wrong chunk is faulted and
//! dropped while the others finish the fetch; outsiders of a permissioned
//! region get nothing; past its stream limit a peer is answered `Busy`;
//! members fetching one payload at once share its author's upload.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, Ordering};
use tapestry_core::admission::Rejection;
use tapestry_node::metrics::Metrics;
use tapestry_node::net::{self, Frame, NetConfig, NetHandle};
use tapestry_node::runtime::{
    MAX_STREAMS_PER_PEER, Shared, Store, Swarm, fetch_chunk_map, fetch_chunks, serve_chunk_streams,
};
use tapestry_protocol::{ContentId, Keypair};

use tapestry_storage::{Backend, Bytes, GcGate, KvOp, KvVisitor, MemoryStore, StoreError};

/// A network task on loopback, dialling `bootstrap`.
fn start(seed: u8, bootstrap: Vec<libp2p::Multiaddr>) -> NetHandle {
    let cfg = NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap,
        request_timeout: Duration::from_secs(5),
        ..NetConfig::default()
    };
    let (handle, mut events, _task) = net::spawn(
        &Keypair::from_secret_bytes(&[seed; 32]),
        cfg,
        &mut Registry::default(),
    )
    .unwrap();
    // Nobody here answers requests on the node's loop: events are dropped.
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    handle
}

fn shared() -> Shared {
    Shared::new(Arc::new(Metrics::new(Registry::default())))
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
async fn peers(h: &NetHandle, n: usize) {
    for _ in 0..200 {
        if h.snapshot().peers.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("only {} of {n} peers connected", h.snapshot().peers.len());
}

/// `n` distinct chunks of `size` bytes.
fn chunks(n: usize, size: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut c = vec![0u8; size];
            c[..8].copy_from_slice(&(i as u64).to_le_bytes());
            c[size - 1] = 7;
            c
        })
        .collect()
}

/// A provider: a network task serving `held` from a memory store as a
/// node does, to whoever `member` admits.
async fn provider(
    seed: u8,
    held: &[Vec<u8>],
    member: tapestry_node::runtime::MemberCheck,
) -> (NetHandle, Shared) {
    let h = start(seed, Vec::new());
    let store: Store = Arc::new(MemoryStore::new());
    for c in held {
        store.put(c).unwrap();
    }
    let s = shared();
    tokio::spawn(serve_chunk_streams(
        h.accept_chunks().unwrap(),
        store,
        s.clone(),
        member,
    ));
    (h, s)
}

fn anyone() -> tapestry_node::runtime::MemberCheck {
    Arc::new(|_: &PeerId| true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_takes_chunks_from_every_provider_and_drops_one_serving_wrong_chunks() {
    let all = chunks(300, 4 << 10);
    let ids: Vec<ContentId> = all.iter().map(|c| ContentId::of(c)).collect();
    // Every chunk is held by two of A, B and C, and each holds a sixth of
    // them that neither other does: A 0..150, B 100..250, C 200..300 and
    // 0..50.
    let (a, a_shared) = provider(1, &all[..150], anyone()).await;
    let (b, b_shared) = provider(2, &all[100..250], anyone()).await;
    let c_held: Vec<Vec<u8>> = all[200..].iter().chain(&all[..50]).cloned().collect();
    let (c, c_shared) = provider(3, &c_held, anyone()).await;
    // The rogue answers every request with wrong bytes.
    let rogue = start(4, Vec::new());
    let mut incoming = rogue.accept_chunks().unwrap();
    tokio::spawn(async move {
        use futures::StreamExt;
        while let Some((_, mut stream)) = incoming.next().await {
            tokio::spawn(async move {
                let ids = net::read_request(&mut stream).await.unwrap();
                for _ in ids {
                    if net::write_chunk(&mut stream, b"not the chunk")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    let mut dial = Vec::new();
    for h in [&a, &b, &c, &rogue] {
        dial.push(address(h).await);
    }
    let fetcher = start(5, dial);
    peers(&fetcher, 4).await;

    let sink: Store = Arc::new(MemoryStore::new());
    let s = shared();
    let providers = [rogue.peer_id(), a.peer_id(), b.peer_id(), c.peer_id()];
    let ok = tokio::time::timeout(
        Duration::from_secs(60),
        fetch_chunks(&fetcher, &sink, ids[0], &ids, (&providers, None), &s),
    )
    .await
    .expect("the fetch never ended");
    assert!(ok, "not every chunk was fetched");
    for (id, bytes) in ids.iter().zip(&all) {
        assert_eq!(&*sink.get_verified(id).unwrap().unwrap(), &bytes[..]);
    }
    assert_eq!(s.metrics.chunks_fetched.get(), 300);
    // The rogue is caught, counted and faulted once, and asked no more.
    let corrupt = s.metrics.rejected().get("corrupt_chunk").copied();
    assert_eq!(corrupt, Some(1));
    // Each honest provider served at least what only it holds, and no
    // chunk was served twice.
    let served: Vec<u64> = [&a_shared, &b_shared, &c_shared]
        .iter()
        .map(|s| s.metrics.chunks_served.get())
        .collect();
    assert!(served.iter().all(|n| *n >= 50), "served {served:?}");
    assert_eq!(served.iter().sum::<u64>(), 300, "served {served:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_get_no_chunks_and_a_peer_past_its_stream_limit_is_told_busy() {
    let big = chunks(8, 4 << 10);
    let ids: Vec<ContentId> = big.iter().map(|c| ContentId::of(c)).collect();
    let asker_id = net::peer_id_of(&Keypair::from_secret_bytes(&[11; 32]).node_id()).unwrap();
    let member: tapestry_node::runtime::MemberCheck = Arc::new(move |p: &PeerId| *p == asker_id);
    let gate = Arc::new(AtomicBool::new(true));
    let store: Store = Arc::new(Gated {
        inner: MemoryStore::new(),
        open: gate.clone(),
    });
    for c in &big {
        store.put(c).unwrap();
    }
    let server = start(12, Vec::new());
    let server_shared = shared();
    tokio::spawn(serve_chunk_streams(
        server.accept_chunks().unwrap(),
        store,
        server_shared.clone(),
        member,
    ));
    let at = address(&server).await;
    let asker = start(11, vec![at.clone()]);
    peers(&asker, 1).await;

    // An outsider is refused: its stream is dropped with no frame, and that
    // is counted.
    let outsider = start(13, vec![at]);
    peers(&outsider, 1).await;
    // (The close may even beat the request's write.)
    if let Ok(mut r) = outsider.chunks(server.peer_id(), &ids[..1]).await {
        assert!(r.next().await.unwrap().is_err(), "an outsider was answered");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // (Its side opens a stream that fails at its start up to four times.)
    let label = Rejection::Outsider(String::new()).label();
    let refused = server_shared.metrics.rejected().get(label).copied();
    assert!(refused.is_some_and(|n| (1..=4).contains(&n)), "{refused:?}");
    assert_eq!(server_shared.metrics.chunks_served.get(), 0);

    // A member's streams whose reads are held up hold their places; past
    // the limit it is told `Busy`, and that is counted.
    gate.store(false, Ordering::SeqCst);
    let mut held = Vec::new();
    for k in 0..MAX_STREAMS_PER_PEER {
        held.push(
            asker
                .chunks(server.peer_id(), &ids[k..k + 1])
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut extra = asker.chunks(server.peer_id(), &ids[4..5]).await.unwrap();
    let (_, frame) = extra.next().await.unwrap().unwrap();
    assert_eq!(frame, Frame::Busy);
    assert!(extra.next().await.is_none(), "a frame after busy");
    assert_eq!(server_shared.metrics.requests_busy.get(), 1);
    // Once the reads go on, the held streams are answered and their
    // places freed.
    gate.store(true, Ordering::SeqCst);
    for (k, mut r) in held.into_iter().enumerate() {
        let (id, frame) = r.next().await.unwrap().unwrap();
        assert_eq!(id, ids[k]);
        assert_eq!(frame, Frame::Chunk(big[k].clone()));
        assert!(r.next().await.is_none());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = asker.chunks(server.peer_id(), &ids[4..5]).await.unwrap();
    let (_, frame) = again.next().await.unwrap().unwrap();
    assert_eq!(frame, Frame::Chunk(big[4].clone()));
}

/// A memory store whose reads wait while its gate is closed (a slow disk).
struct Gated {
    inner: MemoryStore,
    open: Arc<AtomicBool>,
}

impl Backend for Gated {
    fn kv_get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        for _ in 0..3000 {
            if self.open.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.inner.kv_get(key)
    }
    fn kv_contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        self.inner.kv_contains(key)
    }
    fn kv_apply(&self, batch: Vec<KvOp<'_>>) -> Result<(), StoreError> {
        self.inner.kv_apply(batch)
    }
    fn kv_for_each(&self, prefix: u8, f: &mut KvVisitor<'_>) -> Result<(), StoreError> {
        self.inner.kv_for_each(prefix, f)
    }
    fn kv_compare_and_swap(
        &self,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        self.inner.kv_compare_and_swap(key, old, new)
    }
    fn kv_flush(&self) -> Result<(), StoreError> {
        self.inner.kv_flush()
    }
    fn kv_size(&self) -> Result<u64, StoreError> {
        self.inner.kv_size()
    }
    fn gc_gate(&self) -> &GcGate {
        self.inner.gc_gate()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_turning_bad_midway_through_a_large_delta_is_dropped_and_the_rest_comes_from_another()
 {
    // A 64 MiB payload in the protocol's 256 KiB chunks, fetched into a
    // sled store on disk.
    let all = chunks(256, 256 << 10);
    let ids: Vec<ContentId> = all.iter().map(|c| ContentId::of(c)).collect();
    let (a, a_shared) = provider(1, &all, anyone()).await;
    // The rogue holds the whole payload and serves its first 20 chunks
    // honestly; from then on it serves wrong bytes.
    let rogue = start(4, Vec::new());
    let honest: Arc<std::collections::HashMap<ContentId, Vec<u8>>> =
        Arc::new(ids.iter().copied().zip(all.iter().cloned()).collect());
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut incoming = rogue.accept_chunks().unwrap();
    let (honest_r, served_r) = (honest.clone(), served.clone());
    tokio::spawn(async move {
        use futures::StreamExt;
        while let Some((_, mut stream)) = incoming.next().await {
            let (honest, served) = (honest_r.clone(), served_r.clone());
            tokio::spawn(async move {
                let Ok(ids) = net::read_request(&mut stream).await else {
                    return;
                };
                for id in ids {
                    let n = served.fetch_add(1, Ordering::SeqCst);
                    let bytes = match honest.get(&id) {
                        Some(b) if n < 20 => b.clone(),
                        Some(b) => {
                            let mut bad = b.clone();
                            bad[1000] ^= 1;
                            bad
                        }
                        None => b"not held".to_vec(),
                    };
                    if net::write_chunk(&mut stream, &bytes).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let dial = vec![address(&rogue).await, address(&a).await];
    let fetcher = start(5, dial);
    peers(&fetcher, 2).await;

    let tmp = tempfile::tempdir().unwrap();
    let sink: Store = Arc::new(
        tapestry_storage::SledStore::open(
            &tmp.path().join("store"),
            &tapestry_storage::SledConfig::default(),
        )
        .unwrap(),
    );
    let s = shared();
    let providers = [rogue.peer_id(), a.peer_id()];
    let ok = tokio::time::timeout(
        Duration::from_secs(120),
        fetch_chunks(&fetcher, &sink, ids[0], &ids, (&providers, None), &s),
    )
    .await
    .expect("the fetch never ended");
    assert!(ok, "not every chunk was fetched");
    sink.flush().unwrap();
    for (id, bytes) in ids.iter().zip(&all) {
        assert_eq!(&*sink.get_verified(id).unwrap().unwrap(), &bytes[..]);
    }
    assert_eq!(s.metrics.chunks_fetched.get(), 256);
    // The rogue was asked for more than its honest 20 (so it did serve a
    // bad chunk), was caught once and asked no more; the honest provider
    // served the rest, the chunk the rogue spoiled among them.
    assert!(served.load(Ordering::SeqCst) > 20);
    assert_eq!(s.metrics.rejected().get("corrupt_chunk").copied(), Some(1));
    let from_a = a_shared.metrics.chunks_served.get();
    assert!(from_a >= 256 - 20, "the honest provider served {from_a}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_fetching_one_payload_share_the_authors_upload() {
    // The author holds 64 chunks; five members fetch them at once, each
    // serving from memory what it has fetched so far.
    let all = chunks(64, 64 << 10);
    let ids: Vec<ContentId> = all.iter().map(|c| ContentId::of(c)).collect();
    let (author, author_shared) = provider(1, &all, anyone()).await;
    let mut dial = vec![address(&author).await];
    let mut fetchers = Vec::new();
    for seed in 10..15u8 {
        let h = start(seed, dial.clone());
        dial.push(address(&h).await);
        let s = shared();
        tokio::spawn(serve_chunk_streams(
            h.accept_chunks().unwrap(),
            Arc::new(MemoryStore::new()),
            s.clone(),
            anyone(),
        ));
        fetchers.push((h, s));
    }
    for (h, _) in &fetchers {
        peers(h, 5).await;
    }
    let members: Vec<PeerId> = fetchers.iter().map(|(h, _)| h.peer_id()).collect();
    let swarm = Swarm::new(author.peer_id(), members.clone(), 64 * (64 << 10));
    let runs = fetchers.iter().map(|(h, s)| {
        let providers: Vec<PeerId> = [author.peer_id()]
            .into_iter()
            .chain(members.iter().copied().filter(|p| *p != h.peer_id()))
            .collect();
        let (h, s, ids, swarm) = (h.clone(), s.clone(), ids.clone(), swarm.clone());
        tokio::spawn(async move {
            let store: Store = Arc::new(MemoryStore::new());
            fetch_chunk_map(&h, &store, ids[0], &ids, &providers, &s, Some(&swarm)).await
        })
    });
    let got: Vec<_> =
        tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(runs))
            .await
            .expect("the fetches never ended");
    for g in &got {
        let g = g.as_ref().unwrap().as_ref().expect("a fetch failed");
        for (id, bytes) in ids.iter().zip(&all) {
            assert_eq!(g.get(id).unwrap(), &bytes[..]);
        }
    }
    // Each chunk went from the author to its owner, and from the owner to
    // the other four: the author served one copy (a few more if an owner
    // was late), not five; every member served its share to the others.
    let from_author = author_shared.metrics.chunks_served.get();
    let from_members: Vec<u64> = fetchers
        .iter()
        .map(|(_, s)| s.metrics.chunks_served.get())
        .collect();
    eprintln!("the author served {from_author} chunks, the members {from_members:?}");
    assert!(
        from_author <= 2 * 64,
        "the author served {from_author} chunks, the members {from_members:?}"
    );
    assert!(
        from_members.iter().all(|n| *n > 0),
        "the author served {from_author} chunks, the members {from_members:?}"
    );
    assert_eq!(from_author + from_members.iter().sum::<u64>(), 5 * 64);
    // Handed over, the chunks are no longer held in flight.
    drop(got);
    assert!(fetchers.iter().all(|(_, s)| s.inflight.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_never_serves_its_share_delays_a_fetch_once_by_the_grace() {
    let all = chunks(64, 64 << 10);
    let ids: Vec<ContentId> = all.iter().map(|c| ContentId::of(c)).collect();
    let (author, _) = provider(1, &all, anyone()).await;
    // A member that says "not held" for everything, its share included.
    let (idle, _) = provider(2, &[], anyone()).await;
    let dial = vec![address(&author).await, address(&idle).await];
    let fetcher = start(5, dial);
    peers(&fetcher, 2).await;
    let s = shared();
    let swarm = Swarm::new(
        author.peer_id(),
        [fetcher.peer_id(), idle.peer_id()],
        64 * (64 << 10),
    );
    let store: Store = Arc::new(MemoryStore::new());
    let providers = [author.peer_id(), idle.peer_id()];
    let started = std::time::Instant::now();
    let got = tokio::time::timeout(
        Duration::from_secs(60),
        fetch_chunk_map(&fetcher, &store, ids[0], &ids, &providers, &s, Some(&swarm)),
    )
    .await
    .expect("the fetch never ended")
    .expect("the fetch failed");
    let took = started.elapsed();
    for (id, bytes) in ids.iter().zip(&all) {
        assert_eq!(got.get(id).unwrap(), &bytes[..]);
    }
    // Its share came from the author after the grace, and it is given no
    // share by this node for a while.
    assert!(took >= swarm.grace, "{took:?}");
    assert!(!s.inflight.shares(&idle.peer_id()));
    assert!(s.inflight.shares(&author.peer_id()));
}
