//! Fetching chunks and payloads from peers, bounded, from several at once
//! (on chunk streams, `/tapestry/chunks/1`): into the store (a head's
//! chunks lost from the disk; a gossiped `f32`/`bf16` delta's payload, as
//! its chunks arrive, judged at the door from there), or into memory (a
//! compressed delta's payload, one named by a version being verified, or
//! any when the store is short of room: stored only once it passes the
//! door); and writing small files atomically.

use std::collections::VecDeque;

use super::*;

/// Provider records this node keeps in the DHT: its own recent deltas and
/// versions. (It serves what it fetched too, to whoever asks, but does not
/// advertise it.)
pub(super) const MAX_PROVIDED: usize = 256;

/// Chunk requests in flight at once for one payload, with a peer that
/// does not speak the chunk stream protocol (one chunk per request).
pub const PARALLEL_FETCHES: usize = 8;
/// Chunk streams one fetch keeps open at once, over all its providers.
pub const PARALLEL_STREAMS: usize = 8;
/// Chunk streams one fetch opens to one provider at once: two, so one
/// request crosses the network while the other's chunks arrive.
pub const STREAMS_PER_PROVIDER: usize = 2;
/// Chunks asked for on one stream (16 MiB at the default chunk size).
pub const BATCH: usize = net::MAX_BATCH;
/// Chunks one stream's worker has being checked and kept at once (on
/// blocking threads) while it reads the next.
const CHECKS_IN_FLIGHT: usize = 4;
/// Providers one attempt of a fetch asks at once (the bits of a chunk's
/// "tried" mask).
const MAX_PROVIDERS: usize = 64;
/// Times in a row a provider that answers `Busy` (or whose stream fails
/// at its start) is asked again by one worker (after about 0.1, 0.2, 0.4,
/// 0.8 and 1.6 s) before the worker gives up on it.
const BUSY_TRIES: u32 = 5;

/// Fetches the chunks of `ids` not yet in the store into it as they
/// arrive, from `providers` at once and, with a `swarm`, from the peers
/// fetching the same content (see `fetch_into`), each checked against its
/// id; whether all are there at the end. The node holds no more of them
/// in memory than the chunks being checked, whatever their number.
/// `content` is what the DHT is asked providers of when `providers` fail.
/// (Public for the transfer bench.)
pub async fn fetch_chunks(
    net: &NetHandle,
    store: &Store,
    content: ContentId,
    ids: &[ContentId],
    (providers, swarm): (&[PeerId], Option<&Swarm>),
    shared: &Shared,
) -> bool {
    let sink = store.clone();
    fetch_into(
        net,
        content,
        ids,
        Sources { providers, swarm },
        shared,
        &|id| store.has(id).unwrap_or(false),
        Arc::new(move |id, bytes| sink.put_checked(id, &bytes).is_ok()),
    )
    .await
}

/// Fetches again the chunks of `ids` whose bytes the store lost (a pack
/// file deleted from under it), from `providers`; returns how many were
/// missing, and whether all are back.
pub(super) async fn refetch_lost(
    net: &NetHandle,
    store: &Store,
    content: ContentId,
    ids: &[ContentId],
    providers: &[PeerId],
    shared: &Shared,
) -> (usize, bool) {
    let lost = |id: &ContentId| !store.has_bytes(id).unwrap_or(true);
    let missing = ids.iter().filter(|id| lost(id)).count();
    if missing == 0 {
        return (0, true);
    }
    let sink = store.clone();
    let back = fetch_into(
        net,
        content,
        ids,
        Sources::peers(providers),
        shared,
        &|id| !lost(id),
        Arc::new(move |id, bytes| sink.put_checked(id, &bytes).is_ok()),
    )
    .await;
    (missing, back)
}

/// Where a fetched chunk goes once it matches its id (on a blocking
/// thread); false if it could not be kept.
type Keep = Arc<dyn Fn(ContentId, Vec<u8>) -> bool + Send + Sync>;

/// The chunks a fetch still needs, and which providers each was already
/// asked of in this attempt (bit `i`: provider `i`).
#[derive(Default)]
struct Work {
    queue: VecDeque<ContentId>,
    tried: HashMap<ContentId, u64>,
    /// Batches workers hold (taken, not yet done).
    held: usize,
    /// Chunks reserved for one provider of this attempt (a swarm's owner
    /// of the chunk, or the author for this node's own share) until
    /// `release_at`.
    reserved: HashMap<ContentId, usize>,
    /// When reserved chunks may be asked of anyone: the swarm's grace after
    /// the last chunk a reserved provider served (while they serve, the
    /// wait goes on; once none has served for a grace, anyone is asked).
    release_at: Option<Instant>,
    /// The swarm's grace (see `release_at`).
    grace: Duration,
    /// Reserved chunks their provider said it does not hold yet: not asked
    /// of it again before then.
    not_before: HashMap<ContentId, Instant>,
    /// Providers whose workers have ended in this attempt (bit `i`): what
    /// was reserved for them is anyone's.
    gone: u64,
    /// Per provider of this attempt: chunks reserved for it, and how many
    /// of those it served.
    shares: HashMap<usize, (usize, usize)>,
}

/// How long a reserved chunk's provider, having said it does not hold it
/// yet, is left before it is asked again.
const ASK_AGAIN: Duration = Duration::from_millis(100);

/// What a worker does after a batch.
enum Next {
    /// Take the next.
    Again,
    /// Pause (the provider was busy, or the stream failed at its start),
    /// then take the next.
    Pause,
    /// Stop asking this provider.
    Stop,
}

impl Work {
    /// Whether provider `who` may be asked for chunk `id` now: `Err` with
    /// the time from which it may (if a later time will do).
    fn may_ask(&self, id: &ContentId, who: usize, now: Instant) -> Result<(), Option<Instant>> {
        if self.tried.get(id).is_some_and(|t| t & (1u64 << who) != 0) {
            return Err(None);
        }
        let Some(&reserved) = self.reserved.get(id) else {
            return Ok(());
        };
        if self.gone & (1u64 << reserved) != 0 {
            return Ok(());
        }
        let released = self.release_at.is_none_or(|t| now >= t);
        if reserved == who {
            match self.not_before.get(id) {
                Some(t) if *t > now && !released => Err(Some(*t)),
                _ => Ok(()),
            }
        } else if released {
            Ok(())
        } else {
            Err(self.release_at)
        }
    }

    /// Up to `n` chunks provider `who` may be asked for now; if there are
    /// none, the earliest time one may be.
    fn take(&mut self, who: usize, n: usize) -> (Vec<ContentId>, Option<Instant>) {
        let now = Instant::now();
        let mut taken = Vec::new();
        let mut wake: Option<Instant> = None;
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for id in std::mem::take(&mut self.queue) {
            if taken.len() < n {
                match self.may_ask(&id, who, now) {
                    Ok(()) => {
                        taken.push(id);
                        continue;
                    }
                    Err(Some(t)) => wake = Some(wake.map_or(t, |w| w.min(t))),
                    Err(None) => {}
                }
            }
            kept.push_back(id);
        }
        self.queue = kept;
        (taken, wake)
    }

    /// Chunks to ask for again: of another provider when `who` (the one
    /// that did not serve them) is given, of anyone when it is not.
    fn put_back(&mut self, ids: impl IntoIterator<Item = ContentId>, who: Option<usize>) {
        for id in ids {
            if let Some(who) = who {
                *self.tried.entry(id).or_default() |= 1u64 << who;
            }
            self.queue.push_back(id);
        }
    }

    /// Provider `who` said it does not hold chunk `id`: if the chunk is
    /// reserved for it (it is fetching it itself), asked of it again a
    /// little later; else of another provider.
    fn missing(&mut self, id: ContentId, who: usize) {
        let now = Instant::now();
        let waiting =
            self.reserved.get(&id) == Some(&who) && self.release_at.is_some_and(|t| now < t);
        if waiting {
            self.not_before.insert(id, now + ASK_AGAIN);
            self.queue.push_back(id);
        } else {
            self.put_back([id], Some(who));
        }
    }
}

/// The members fetching one payload at the same time, and its author.
/// Each chunk has an owner among the fetchers (by its id, the same at
/// every fetcher): the owner asks the author for it, the others ask the
/// owner — who serves it as soon as it has it (from its store, or from
/// memory, [`crate::inflight::InFlight`]) — and ask anyone (the author included)
/// only once no owner has served a chunk for [`Swarm::grace`] or the owner
/// cannot be asked (while shares keep coming, the wait goes on: with every
/// member an author at once, an owner may take longer than a grace to get
/// its share, and asking the author then would undo the sharing). The
/// author then uploads about one copy of the payload instead of one per
/// member. A fetcher that sees other members than its peers do only asks
/// the author sooner; nothing depends on the shares agreeing.
#[derive(Debug, Clone)]
pub struct Swarm {
    /// The payload's author.
    pub author: PeerId,
    /// The members fetching it, this node included, the author not; sorted.
    fetchers: Vec<PeerId>,
    /// How long a chunk is asked of its owner only.
    pub grace: Duration,
}

impl Swarm {
    /// The swarm of `fetchers` (this node among them) fetching a payload of
    /// `payload_bytes` from `author`. The grace: a quarter of a second,
    /// plus the time the author takes to upload one copy at 50 MB/s, at
    /// most a minute.
    pub fn new(
        author: PeerId,
        fetchers: impl IntoIterator<Item = PeerId>,
        payload_bytes: u64,
    ) -> Self {
        let mut fetchers: Vec<PeerId> = fetchers.into_iter().filter(|p| *p != author).collect();
        fetchers.sort();
        fetchers.dedup();
        let grace = Duration::from_millis(250 + payload_bytes / 50_000);
        Self {
            author,
            fetchers,
            grace: grace.min(Duration::from_secs(60)),
        }
    }

    /// The fetcher that asks the author for chunk `id`.
    pub fn owner(&self, id: &ContentId) -> Option<PeerId> {
        let n = self.fetchers.len() as u64;
        if n == 0 {
            return None;
        }
        let b = id.as_bytes();
        let x = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        self.fetchers.get((x % n) as usize).copied()
    }
}

/// What one fetch shares among its workers (each a task of its own).
struct Fetch {
    net: NetHandle,
    shared: Shared,
    work: Mutex<Work>,
    /// Providers that served a wrong chunk: not asked again.
    bad: Mutex<BTreeSet<PeerId>>,
    /// A chunk could not be kept (the store failed): the fetch stops.
    failed: std::sync::atomic::AtomicBool,
    keep: Keep,
    /// Woken when a batch is done (what it left is back in the queue).
    changed: tokio::sync::Notify,
}

impl Fetch {
    fn lock_work(&self) -> std::sync::MutexGuard<'_, Work> {
        self.work.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_bad(&self, peer: &PeerId) -> bool {
        self.bad.lock().map(|b| b.contains(peer)).unwrap_or(false)
    }

    fn stopped(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes chunk `id`'s bytes as `peer` (provider `who`) served them
    /// (blocking: hashes and keeps): kept if they match the id, and true;
    /// else the peer is faulted and marked bad, the chunk put back for
    /// others, and false.
    fn received(&self, peer: PeerId, who: usize, id: ContentId, bytes: Vec<u8>) -> bool {
        if self.is_bad(&peer) {
            // Caught already (a chunk checked beside this one): not even
            // hashed.
            self.lock_work().put_back([id], Some(who));
            return false;
        }
        let checking = std::time::Instant::now();
        let good = id.matches(&bytes);
        self.shared
            .metrics
            .time(Stage::CheckChunks, checking.elapsed());
        if !good {
            // Counted and faulted once per peer, however many of its
            // chunks were being checked at the time.
            let first = self.bad.lock().map(|mut b| b.insert(peer)).unwrap_or(false);
            if first {
                tracing::warn!(%peer, chunk = %id.short(), "peer served a corrupt chunk");
                self.shared.metrics.reject("corrupt_chunk");
                self.net.fault(peer);
            }
            self.lock_work().put_back([id], Some(who));
            return false;
        }
        {
            let mut w = self.lock_work();
            if w.reserved.get(&id) == Some(&who)
                && let Some(share) = w.shares.get_mut(&who)
            {
                share.1 += 1;
                // Progress: the shares are coming, so wait on for the rest.
                let now = Instant::now();
                if let Some(t) = w.release_at
                    && now < t
                {
                    w.release_at = Some(t.max(now + w.grace));
                }
            }
        }
        self.shared.metrics.chunks_fetched.inc();
        self.shared.metrics.bytes_in.inc_by(bytes.len() as u64);
        if !(self.keep)(id, bytes) {
            self.failed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        true
    }

    /// [`Fetch::received`] on a blocking thread; whether the chunk was
    /// good.
    async fn check(
        self: &Arc<Self>,
        peer: PeerId,
        who: usize,
        id: ContentId,
        bytes: Vec<u8>,
    ) -> bool {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.received(peer, who, id, bytes))
            .await
            .unwrap_or(false)
    }

    /// The next batch provider `who` was not yet asked for; if there is
    /// none now, waits while other workers hold batches (what they put back
    /// may be for this one); `None` once there is none and none is held.
    async fn next_batch(&self, who: usize, peer: &PeerId) -> Option<Vec<ContentId>> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let wake = {
                let mut w = self.lock_work();
                let (batch, wake) = w.take(who, BATCH);
                if !batch.is_empty() {
                    w.held += 1;
                    return Some(batch);
                }
                if w.held == 0 && wake.is_none() {
                    return None;
                }
                wake
            };
            if self.stopped() || self.is_bad(peer) {
                return None;
            }
            match wake {
                // A chunk becomes askable of this provider then.
                Some(t) => {
                    tokio::select! {
                        () = &mut changed => {}
                        () = tokio::time::sleep_until(t) => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    /// A batch taken with [`Fetch::next_batch`] is done (what is left of it
    /// put back): workers waiting for work look again.
    fn batch_done(&self) {
        let mut w = self.lock_work();
        w.held = w.held.saturating_sub(1);
        drop(w);
        self.changed.notify_waiters();
    }

    /// One worker on provider `who` (`peer`): takes batches of chunks the
    /// provider was not yet asked for and fetches them on one stream each,
    /// until there are none left for it, the provider fails or serves a
    /// wrong chunk, or it stays busy.
    async fn worker(self: Arc<Self>, who: usize, peer: PeerId) {
        self.clone().work(who, peer).await;
        // What was reserved for this provider is anyone's now.
        self.lock_work().gone |= 1u64 << who;
        self.changed.notify_waiters();
    }

    /// [`Fetch::worker`]'s loop.
    async fn work(self: Arc<Self>, who: usize, peer: PeerId) {
        let mut busy = 0u32;
        while !self.stopped() && !self.is_bad(&peer) {
            let Some(batch) = self.next_batch(who, &peer).await else {
                return;
            };
            let next = self.fetch_batch(who, peer, batch).await;
            self.batch_done();
            match next {
                Next::Again => busy = 0,
                Next::Pause => {
                    if !pause(&mut busy).await {
                        return;
                    }
                }
                Next::Stop => return,
            }
        }
    }

    /// Fetches one batch from provider `who` (`peer`) on one stream, each
    /// chunk checked and kept on a blocking thread while the next arrives;
    /// puts back what it did not get; what the worker does next.
    async fn fetch_batch(
        self: &Arc<Self>,
        who: usize,
        peer: PeerId,
        batch: Vec<ContentId>,
    ) -> Next {
        let mut reader = match self.net.chunks(peer, &batch).await {
            Ok(r) => r,
            Err(net::NetError::Unsupported { .. }) => {
                self.one_by_one(who, peer, batch).await;
                return Next::Again;
            }
            Err(e) => {
                // Most often the stream was dropped at the provider's door
                // (its swarm hands inbound streams over one at a time):
                // again after a pause, like `Busy`.
                tracing::debug!(%peer, error = %e, "chunk stream failed");
                self.lock_work().put_back(batch, None);
                return Next::Pause;
            }
        };
        let mut checking: VecDeque<tokio::task::JoinHandle<bool>> = VecDeque::new();
        let mut corrupt = false;
        while let Some(answer) = reader.next().await {
            if checking.len() >= CHECKS_IN_FLIGHT
                && let Some(c) = checking.pop_front()
                && !c.await.unwrap_or(false)
            {
                corrupt = true;
                if let Ok((id, net::Frame::Chunk(_) | net::Frame::Missing)) = answer {
                    self.lock_work().put_back([id], Some(who));
                }
                break;
            }
            match answer {
                Ok((id, net::Frame::Chunk(bytes))) => {
                    let me = self.clone();
                    checking.push_back(tokio::task::spawn_blocking(move || {
                        me.received(peer, who, id, bytes)
                    }));
                }
                Ok((id, net::Frame::Missing)) => self.lock_work().missing(id, who),
                Ok((_, net::Frame::Busy)) => {}
                Err(e) => tracing::debug!(%peer, error = %e, "chunk stream failed"),
            }
            if self.stopped() {
                break;
            }
        }
        for c in checking {
            corrupt |= !c.await.unwrap_or(false);
        }
        let left: Vec<ContentId> = reader.unanswered().collect();
        let ended_early = !left.is_empty();
        // Busy, or the stream ended before its first frame (dropped at the
        // door): nothing this provider did wrong.
        let was_busy = ended_early && !corrupt && left.len() == batch.len();
        // Asked of others first if this provider failed them; of anyone
        // (itself again too) if it was only busy.
        self.lock_work().put_back(left, (!was_busy).then_some(who));
        if was_busy {
            Next::Pause
        } else if ended_early || corrupt {
            Next::Stop
        } else {
            reader.close().await;
            Next::Again
        }
    }

    /// A provider that does not speak the chunk stream protocol: the batch
    /// asked for chunk by chunk, [`PARALLEL_FETCHES`] at once.
    async fn one_by_one(self: &Arc<Self>, who: usize, peer: PeerId, batch: Vec<ContentId>) {
        use futures::StreamExt;
        futures::stream::iter(batch)
            .for_each_concurrent(PARALLEL_FETCHES, |id| async move {
                if self.stopped() || self.is_bad(&peer) {
                    self.lock_work().put_back([id], None);
                    return;
                }
                match self.net.fetch(peer, FetchRequest::Chunk(id)).await {
                    Ok(FetchResponse::Chunk(bytes)) => {
                        self.check(peer, who, id, bytes).await;
                    }
                    Ok(_) => self.lock_work().put_back([id], Some(who)),
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "chunk fetch failed");
                        self.lock_work().put_back([id], Some(who));
                    }
                }
            })
            .await;
    }
}

/// The pause before asking a provider again after the `tries`-th busy
/// answer or failed start in a row (100, 200, 400, ... ms, each ± 50 % so
/// fetchers that met at a provider's door do not meet again); false once
/// there were more than [`BUSY_TRIES`].
async fn pause(tries: &mut u32) -> bool {
    *tries += 1;
    if *tries > BUSY_TRIES {
        return false;
    }
    let base = 100u64 << (*tries - 1);
    let ms = base / 2 + rand::random::<u64>() % base;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    true
}

/// Whom a fetch asks: its providers, and the swarm it is part of, if any.
#[derive(Clone, Copy)]
struct Sources<'a> {
    providers: &'a [PeerId],
    swarm: Option<&'a Swarm>,
}

impl<'a> Sources<'a> {
    fn peers(providers: &'a [PeerId]) -> Self {
        Self {
            providers,
            swarm: None,
        }
    }
}

/// Fetches the chunks of `ids` that `have` says are missing, checking each
/// against its id before handing it to `keep`, from all `providers` at
/// once: [`STREAMS_PER_PROVIDER`] workers per provider (at most
/// [`PARALLEL_STREAMS`] in all, each a task, aborted if this future is
/// dropped) take batches of [`BATCH`] chunks from one shared queue, so each
/// chunk comes from whoever is free and a fast provider serves more. A
/// chunk one provider does not hold goes to the others; a provider that
/// serves a wrong chunk is faulted and not asked again. With a `swarm`,
/// the first attempt asks each chunk of its owner first (see [`Swarm`]).
/// Between attempts (with backoff) the DHT is asked who else provides
/// `content`. Stops (false) as soon as `keep` fails.
async fn fetch_into(
    net: &NetHandle,
    content: ContentId,
    ids: &[ContentId],
    from: Sources<'_>,
    shared: &Shared,
    have: &(dyn Fn(&ContentId) -> bool + Sync),
    keep: Keep,
) -> bool {
    let Sources { providers, swarm } = from;
    let mut providers: Vec<PeerId> = providers.to_vec();
    let mut seen = HashSet::new();
    let missing: VecDeque<ContentId> = ids
        .iter()
        .filter(|id| seen.insert(**id) && !have(id))
        .copied()
        .collect();
    let fetch = Arc::new(Fetch {
        net: net.clone(),
        shared: shared.clone(),
        work: Mutex::new(Work {
            queue: missing,
            ..Work::default()
        }),
        bad: Mutex::default(),
        failed: false.into(),
        keep,
        changed: tokio::sync::Notify::new(),
    });
    for attempt in 0..4u32 {
        if fetch.lock_work().queue.is_empty() {
            return true;
        }
        fetch.lock_work().tried.clear();
        // The providers to ask, in a different order each attempt so a
        // slow first one does not always take the first batches.
        let usable: Vec<PeerId> = providers
            .iter()
            .filter(|p| !fetch.is_bad(p))
            .copied()
            .take(MAX_PROVIDERS)
            .collect();
        {
            let mut w = fetch.lock_work();
            w.gone = 0;
            w.not_before.clear();
            w.reserved.clear();
            w.shares.clear();
            w.release_at = None;
            if let Some(swarm) = swarm.filter(|_| attempt == 0) {
                // This node's share from the author, the others' from them.
                let index = |p: &PeerId| usable.iter().position(|u| u == p);
                let me = net.peer_id();
                let reserved: HashMap<ContentId, usize> = w
                    .queue
                    .iter()
                    .filter_map(|id| {
                        let owner = swarm.owner(id)?;
                        let from = if owner == me { swarm.author } else { owner };
                        // Only a provider this attempt has a worker for.
                        Some((*id, index(&from).filter(|i| *i < PARALLEL_STREAMS)?))
                    })
                    .collect();
                for who in reserved.values() {
                    w.shares.entry(*who).or_default().0 += 1;
                }
                w.reserved = reserved;
                w.grace = swarm.grace;
                w.release_at = Some(Instant::now() + swarm.grace);
            }
        }
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..STREAMS_PER_PROVIDER {
            for k in 0..usable.len() {
                let who = (k + attempt as usize) % usable.len();
                if workers.len() < PARALLEL_STREAMS {
                    workers.spawn(fetch.clone().worker(who, usable[who]));
                }
            }
        }
        while workers.join_next().await.is_some() {}
        if swarm.is_some() && attempt == 0 {
            // Members that served none of their share are not given one
            // by this node for a while (a member that says "not held" for
            // its share would otherwise hold up every fetch by the grace).
            // One that served some is slow, not absent: on a loaded
            // machine, sending its share to the author instead would undo
            // the sharing for every fetch of the next minutes.
            let w = fetch.lock_work();
            for (who, (owed, served)) in &w.shares {
                // (The author's share is this node's own: the author is
                // not a member fetching its own delta.)
                if *served == 0
                    && *owed > 0
                    && let Some(peer) = usable.get(*who)
                    && swarm.is_some_and(|s| s.author != *peer)
                {
                    tracing::debug!(%peer, owed, served, "a member did not serve its share");
                    shared.inflight.note_unshared(*peer);
                }
            }
        }
        if fetch.stopped() {
            return false;
        }
        if fetch.lock_work().queue.is_empty() {
            return true;
        }
        // Who else has it?
        if let Ok(more) = net.providers(content).await {
            for p in more {
                if p != net.peer_id() && !providers.contains(&p) {
                    providers.push(p);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
    }
    fetch.lock_work().queue.is_empty()
}

/// Writes `data` to `path` so that a crash leaves the old or the new
/// contents, never a mix: a temporary file beside it, synced, renamed over.
pub(super) fn write_atomically(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A delta's payload, fetched into memory (chunks the store already holds
/// are read from it): it is stored only once the engine admits it. Until
/// each chunk is copied into the payload, peers fetching the same delta are
/// served it from memory.
pub(super) async fn fetch_payload(
    net: &NetHandle,
    store: &Store,
    manifest: &Verified<DeltaManifest>,
    providers: &[PeerId],
    shared: &Shared,
    swarm: Option<&Swarm>,
) -> Option<Vec<u8>> {
    let m = manifest.message();
    let size = usize::try_from(m.payload_bytes).ok()?;
    let mut got = fetch_chunk_map(
        net,
        store,
        manifest.id(),
        &m.chunk_ids,
        providers,
        shared,
        swarm,
    )
    .await?;
    // Each chunk leaves the map as it is copied in at its last use, so the
    // payload and the chunks are not both held whole.
    // Every chunk must be cut as the protocol cuts (`chunk_size` bytes,
    // the last one the rest), so that slicing the payload gives back each
    // chunk under its id ([`put_fetched`]).
    let chunk_size = (m.chunk_size as usize).max(1);
    let mut uses = chunk_uses(&m.chunk_ids);
    let mut payload = Vec::with_capacity(size);
    for id in &m.chunk_ids {
        let left = uses.get_mut(id)?;
        *left -= 1;
        let before = payload.len();
        if *left == 0 {
            payload.extend_from_slice(&got.take(id)?);
        } else {
            payload.extend_from_slice(got.get(id)?);
        }
        if payload.len() > size || payload.len() - before != chunk_size.min(size - before) {
            return None;
        }
    }
    (payload.len() == size).then_some(payload)
}

/// A fetched payload, as [`Node::on_fetched`] receives it.
pub(super) enum Fetched {
    /// Assembled in memory (stored only once the engine admits it).
    InMemory(Vec<u8>),
    /// Its chunks are in the store ([`fetch_chunks`]).
    Stored,
}

/// Stores a payload [`fetch_payload`] assembled, under its manifest's
/// chunk ids (every chunk was checked against its id as it arrived, or
/// read verified from the store): not hashed again.
pub(super) fn put_fetched(
    store: &Store,
    m: &DeltaManifest,
    payload: &[u8],
) -> Result<(), tapestry_storage::StoreError> {
    let chunk_size = (m.chunk_size as usize).max(1);
    payload
        .chunks(chunk_size)
        .zip(&m.chunk_ids)
        .try_for_each(|(bytes, id)| store.put_checked(*id, bytes))
}

/// How often each chunk id occurs in a payload (a payload may repeat a
/// chunk).
fn chunk_uses(ids: &[ContentId]) -> HashMap<ContentId, usize> {
    let mut uses: HashMap<ContentId, usize> = HashMap::new();
    for id in ids {
        *uses.entry(*id).or_default() += 1;
    }
    uses
}

/// Chunks fetched into memory, each checked against its id. Each is held
/// in flight (served to peers, [`Shared::inflight`]) until it is taken
/// out or this is dropped.
pub struct FetchedChunks {
    chunks: HashMap<ContentId, Arc<Vec<u8>>>,
    inflight: Arc<crate::inflight::InFlight>,
}

impl FetchedChunks {
    /// Chunk `id`.
    pub fn get(&self, id: &ContentId) -> Option<&[u8]> {
        self.chunks.get(id).map(|b| b.as_slice())
    }

    /// Takes chunk `id` out (no longer served from memory).
    pub fn take(&mut self, id: &ContentId) -> Option<Arc<Vec<u8>>> {
        let b = self.chunks.remove(id)?;
        self.inflight.release(id);
        Some(b)
    }

    /// How many distinct chunks are held.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

impl Drop for FetchedChunks {
    fn drop(&mut self) {
        for id in self.chunks.keys() {
            self.inflight.release(id);
        }
    }
}

/// The chunks a fetch into memory has so far (`None` once handed over):
/// what is left in it when the last worker lets go is no longer held in
/// flight.
struct Collecting {
    chunks: Mutex<Option<HashMap<ContentId, Arc<Vec<u8>>>>>,
    inflight: Arc<crate::inflight::InFlight>,
}

impl Collecting {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<HashMap<ContentId, Arc<Vec<u8>>>>> {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps a checked chunk (and holds it in flight); false once the
    /// chunks were handed over.
    fn keep(&self, id: ContentId, bytes: Arc<Vec<u8>>) -> bool {
        let mut g = self.lock();
        let Some(map) = g.as_mut() else { return false };
        if let std::collections::hash_map::Entry::Vacant(e) = map.entry(id) {
            self.inflight.hold(id, bytes.clone());
            e.insert(bytes);
        }
        true
    }

    fn has(&self, id: &ContentId) -> bool {
        self.lock().as_ref().is_some_and(|m| m.contains_key(id))
    }

    fn hand_over(&self) -> FetchedChunks {
        FetchedChunks {
            chunks: self.lock().take().unwrap_or_default(),
            inflight: self.inflight.clone(),
        }
    }
}

impl Drop for Collecting {
    fn drop(&mut self) {
        if let Some(map) = self.lock().take() {
            for id in map.keys() {
                self.inflight.release(id);
            }
        }
    }
}

/// The distinct chunks of `ids` fetched into memory (those the store
/// already holds are read from it), each checked against its id, with a
/// swarm if given; `None` if some chunk could not be had. (Public for the
/// transfer bench.)
pub async fn fetch_chunk_map(
    net: &NetHandle,
    store: &Store,
    content: ContentId,
    ids: &[ContentId],
    providers: &[PeerId],
    shared: &Shared,
    swarm: Option<&Swarm>,
) -> Option<FetchedChunks> {
    let got = Arc::new(Collecting {
        chunks: Mutex::new(Some(HashMap::new())),
        inflight: shared.inflight.clone(),
    });
    for id in ids {
        if let Ok(Some(b)) = store.get_verified(id) {
            got.keep(*id, Arc::new(b.to_vec()));
        }
    }
    let into = got.clone();
    let fetched = fetch_into(
        net,
        content,
        ids,
        Sources { providers, swarm },
        shared,
        &|id| got.has(id),
        Arc::new(move |id, bytes| into.keep(id, Arc::new(bytes))),
    )
    .await;
    if !fetched {
        return None;
    }
    Some(got.hand_over())
}

impl Node {
    /// Checks that the head's chunks are all on disk; any whose bytes were
    /// lost is fetched again from the region's members (on its own task).
    pub(super) fn check_head_chunks(&mut self) {
        let Some(head) = self.shared.head.lock().ok().and_then(|h| h.clone()) else {
            return;
        };
        let (net, store, shared) = (self.net.clone(), self.store.clone(), self.shared.clone());
        let providers: Vec<PeerId> = self.members.iter().copied().collect();
        self.tasks.spawn(async move {
            let m = head.message();
            let (missing, back) =
                refetch_lost(&net, &store, head.id(), &m.chunk_ids, &providers, &shared).await;
            if missing == 0 {
                return;
            }
            if back {
                tracing::warn!(missing, version = %head.id().short(), "chunks of the head were lost from the disk; fetched again from peers");
                shared.metrics.chunks_refetched.inc_by(missing as u64);
                let _ = store.flush();
            } else {
                tracing::error!(missing, version = %head.id().short(), "chunks of the head were lost from the disk and no peer served them (tapestry scrub tells what else is lost)");
            }
        });
    }

    /// A gossiped delta's payload arrived: the engine checks it at its
    /// door. One fetched into memory is stored only if the door admits it
    /// (chunks and manifest, on a blocking thread); one whose chunks were
    /// stored as they came is judged from the store, and its manifest is
    /// stored if it is admitted.
    pub(super) async fn on_fetched(&mut self, manifest: Verified<DeltaManifest>, fetched: Fetched) {
        let payload = match fetched {
            Fetched::InMemory(payload) => payload,
            Fetched::Stored => return self.on_fetched_stored(manifest).await,
        };
        let id = manifest.id();
        let payload = Arc::new(payload);
        self.feed(Input::DeltaPayload {
            id,
            payload: payload.clone(),
        })
        .await;
        if !self.engine.holds_delta(&id) || !self.room_for(payload.len()) {
            return;
        }
        let (store, shared, stored) = (
            self.store.clone(),
            self.shared.clone(),
            self.stored_tx.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let kept = put_fetched(&store, manifest.message(), &payload)
                .and_then(|_| store.put_delta_manifest(&manifest));
            shared.metrics.time(Stage::Store, started.elapsed());
            drop(payload);
            match kept {
                // The engine may read it from the store from now on (and
                // drop the copy it holds).
                Ok(_) => {
                    let _ = stored.blocking_send(manifest);
                }
                Err(e) => {
                    tracing::warn!(error = %e, delta = %id.short(), "cannot store an admitted delta");
                    space::note_failure(&shared, &e);
                }
            }
        });
    }

    /// [`Node::on_fetched`] for a payload whose chunks are in the store.
    async fn on_fetched_stored(&mut self, manifest: Verified<DeltaManifest>) {
        let id = manifest.id();
        let Some(source) = verifying::StoredPayload::new(self.store.clone(), manifest.message())
        else {
            self.shared.landing.end(&id);
            return;
        };
        self.feed(Input::DeltaStored {
            id,
            source: Arc::new(source),
        })
        .await;
        if !self.engine.holds_delta(&id) {
            // Refused at the door (or no longer wanted): no manifest names
            // its chunks, so the collection takes them.
            self.shared.landing.end(&id);
            self.collect_refused();
            return;
        }
        let (store, shared) = (self.store.clone(), self.shared.clone());
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let kept = store.put_delta_manifest(&manifest);
            shared.landing.end(&id);
            shared.metrics.time(Stage::Store, started.elapsed());
            if let Err(e) = kept {
                tracing::warn!(error = %e, delta = %id.short(), "cannot store an admitted delta's manifest");
                space::note_failure(&shared, &e);
            }
        });
    }
}
