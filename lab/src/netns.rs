//! Real network faults between the nodes of `tapestry-lab cluster --netns`.
//!
//! Each node runs in its own network namespace (`ip netns`), with its own
//! kernel network stack, on a private address `10.A.B.(i+1)`. Its only
//! interface (`eth0`) is a TUN device whose other end this process holds:
//! a small userspace router carries every IPv4 packet between the
//! namespaces, and that is where latency (each packet held for the one-way
//! delay), loss (each packet dropped with the given probability) and
//! partitions (packets between cut-off groups dropped) happen. The nodes'
//! TCP and QUIC stacks see a real lossy, slow or cut network, and recover
//! from it with their own retransmissions and timeouts. (The kernel's
//! `netem` would do the same inside the kernel, but is not available on
//! every kernel; this needs only TUN and namespaces.)
//!
//! A node can also sit behind a NAT of its own ([`NatKind`]): the router
//! then rewrites its packets' source to the NAT's public address
//! `10.A.B.(129+i)` and a port it maps, and lets in only what the NAT's
//! kind lets in — a port-restricted cone NAT keeps one mapping per inside
//! port (the same port outside when it is free) and admits packets from
//! any address and port the inside port has sent to; a symmetric NAT maps
//! every destination to a port of its own and admits only that
//! destination. Packets to a NATed node's private
//! address from other nodes are dropped (it is not routable). TCP gives up
//! a connection attempt after 1 retry of its SYN in every namespace (3 s;
//! Linux's default is 6, about two minutes), so dials into a NAT fail in
//! seconds.
//!
//! This process reaches the nodes' HTTP APIs through one more TUN device in
//! its own namespace, `10.A.B.254`; that traffic is not delayed, dropped
//! or cut: it is the observer, not part of the experiment.
//!
//! Everything is named after this process's id (`tapestry-<pid>-<i>`
//! namespaces, `tpt<pid>.<i>` and `tpb<pid>` devices), torn down when the
//! [`Lab`] is dropped, and recognised as a leftover by a later run once
//! that process is gone ([`clean_leftovers`]).

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::error::{LabError, NetnsUnavailable};

/// Prefix of every namespace this module creates.
const NS_PREFIX: &str = "tapestry-";

/// Nodes one run can have in namespaces: addresses `10.A.B.1` up to this,
/// below the host's `.254`.
const MAX_NODES: usize = 250;

/// Nodes one run can have when some are behind NAT: the NATs' public
/// addresses are `10.A.B.(129+i)`.
const MAX_NAT_NODES: usize = 120;

/// Where a node sits on the lab's network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NatKind {
    /// On a public address.
    #[default]
    Public,
    /// Behind a port-restricted cone NAT.
    Cone,
    /// Behind a symmetric NAT.
    Symmetric,
}

impl std::str::FromStr for NatKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "public" => Ok(NatKind::Public),
            "cone" => Ok(NatKind::Cone),
            "symmetric" => Ok(NatKind::Symmetric),
            _ => Err(format!("{s:?}: public, cone or symmetric")),
        }
    }
}

/// An address and port.
type Endpoint = ([u8; 4], u16);

/// A mapping's key: protocol, inside port, and for a symmetric NAT the
/// destination.
type MapKey = (u8, u16, Option<Endpoint>);

/// One NAT's mappings.
#[derive(Debug, Default)]
struct NatTable {
    /// (protocol, inside port, the destination for a symmetric NAT) →
    /// outside port.
    out: HashMap<MapKey, u16>,
    /// (protocol, outside port) → (inside port, the addresses and ports
    /// it has sent to).
    back: HashMap<(u8, u16), (u16, HashSet<Endpoint>)>,
    next: u16,
}

impl NatTable {
    /// The outside port of a packet from `port` to `to`, mapped now if
    /// new, and `to` remembered as a peer it may hear from.
    fn outbound(&mut self, kind: NatKind, proto: u8, port: u16, to: ([u8; 4], u16)) -> u16 {
        let key = (proto, port, (kind == NatKind::Symmetric).then_some(to));
        let ext = match self.out.get(&key) {
            Some(e) => *e,
            None => {
                // A cone NAT keeps the inside port when it is free (as
                // Linux's masquerading does, and as peers assume when they
                // tell a node the address they see); a symmetric NAT
                // gives each destination a port of its own, from 20001
                // up, never twice.
                let ext = if kind == NatKind::Cone && !self.back.contains_key(&(proto, port)) {
                    port
                } else {
                    loop {
                        self.next = self.next.max(20_000).wrapping_add(1).max(20_001);
                        if !self.back.contains_key(&(proto, self.next)) {
                            break self.next;
                        }
                    }
                };
                self.out.insert(key, ext);
                ext
            }
        };
        self.back
            .entry((proto, ext))
            .or_insert_with(|| (port, HashSet::new()))
            .1
            .insert(to);
        ext
    }

    /// The inside port a packet from `from` to outside port `ext` goes to,
    /// if the NAT lets it in.
    fn inbound(&self, proto: u8, ext: u16, from: ([u8; 4], u16)) -> Option<u16> {
        let (port, allowed) = self.back.get(&(proto, ext))?;
        allowed.contains(&from).then_some(*port)
    }
}

/// Where a packet's destination address leads.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dest {
    /// Node i's own address.
    Node(usize),
    /// The public address of node i's NAT.
    Nat(usize),
    /// This process.
    Host,
}

/// Sets the IPv4 header checksum and the TCP or UDP checksum of `p` again
/// (after its addresses or ports were rewritten).
fn fix_checksums(p: &mut [u8]) {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let sum = |data: &[u8], mut acc: u32| {
        for c in data.chunks(2) {
            acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        acc
    };
    let fold = |mut acc: u32| {
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    };
    p[10] = 0;
    p[11] = 0;
    let ip = fold(sum(&p[..ihl], 0));
    p[10..12].copy_from_slice(&ip.to_be_bytes());
    let proto = p[9];
    let at = match proto {
        6 => 16,
        17 => 6,
        _ => return,
    };
    if p.len() < ihl + at + 2 {
        return;
    }
    let len = (p.len() - ihl) as u32;
    p[ihl + at] = 0;
    p[ihl + at + 1] = 0;
    let pseudo = sum(&p[12..20], u32::from(proto) + len);
    let mut c = fold(sum(&p[ihl..], pseudo));
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    p[ihl + at..ihl + at + 2].copy_from_slice(&c.to_be_bytes());
}

/// The protocol and ports of a TCP or UDP packet (`None` for anything
/// else, or a fragment).
fn ports(p: &[u8]) -> Option<(u8, u16, u16)> {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let fragment = u16::from_be_bytes([p[6], p[7]]) & 0x1fff != 0;
    if !matches!(p[9], 6 | 17) || fragment || p.len() < ihl + 4 {
        return None;
    }
    let sport = u16::from_be_bytes([p[ihl], p[ihl + 1]]);
    let dport = u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]);
    Some((p[9], sport, dport))
}

/// Faults on the links between nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkFaults {
    /// One-way delay of every packet between two nodes.
    pub latency_ms: u64,
    /// Probability that a packet between two nodes is dropped.
    pub loss: f64,
}

/// What the router did, for the report.
#[derive(Debug, Default)]
pub struct RouterStats {
    /// Packets delivered between nodes.
    pub forwarded: AtomicU64,
    /// Packets dropped by the loss rate.
    pub dropped_loss: AtomicU64,
    /// Packets dropped by a partition.
    pub dropped_cut: AtomicU64,
    /// Packets a NAT did not let in (or sent to a private address).
    pub dropped_nat: AtomicU64,
    /// Bytes delivered between nodes of one region.
    pub bytes_within: AtomicU64,
    /// Bytes delivered between nodes of different regions.
    pub bytes_across: AtomicU64,
}

/// The regions of a run's nodes and the faults between regions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegionLinks {
    /// Each node's region (all 0: one region).
    pub region: Vec<usize>,
    /// Latency and loss between nodes of different regions (instead of
    /// the within-region faults).
    pub across: LinkFaults,
}

/// Whether namespaces can be made here: Linux, root, `ip` and `/dev/net/tun`.
/// `Err` says what is missing.
pub fn available() -> Result<(), NetnsUnavailable> {
    if !cfg!(target_os = "linux") {
        return Err(NetnsUnavailable::NotLinux);
    }
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
        })
        .unwrap_or_default();
    if uid != "0" {
        return Err(NetnsUnavailable::NotRoot);
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err(NetnsUnavailable::NoTun);
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err(NetnsUnavailable::NoIp),
    }
}

fn ip(args: &[&str]) -> Result<(), LabError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| LabError::IpCommand {
            command: args.join(" "),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Ip {
            command: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes namespaces (and the processes in them) left by earlier runs
/// whose process is gone; namespaces of live runs and anything not named
/// by this module are left alone. Returns the namespaces removed.
pub fn clean_leftovers() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let mut parts = rest.split('-');
        let (Some(pid), Some(idx), None) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(pid), true) = (pid.parse::<u32>(), idx.parse::<u32>().is_ok()) else {
            continue;
        };
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        kill_inside(name);
        if ip(&["netns", "del", name]).is_ok() {
            removed.push(name.to_owned());
        }
    }
    removed
}

/// SIGKILLs every process in namespace `name`.
fn kill_inside(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
}

/// Opens a TUN device named `name` (IPv4 packets, no extra header).
#[allow(unsafe_code)]
fn open_tun(name: &str) -> Result<File, LabError> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TUN: libc::c_short = 0x0001;
    const IFF_NO_PI: libc::c_short = 0x1000;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    if name.len() > 15 {
        return Err(LabError::TunName(name.to_owned()));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(LabError::io("/dev/net/tun"))?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TUN | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    use std::os::fd::AsRawFd;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `IfReq`
    // lays out (16-byte name, then the flags, 40 bytes in all); `req`
    // lives across the call and `file` is an open descriptor.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(LabError::Tun {
            name: name.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(file)
}

/// A packet waiting for its delivery time.
struct Held {
    at: Instant,
    seq: u64,
    to: usize,
    packet: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Earliest first out of the (max-)heap.
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// State shared by the router's threads.
struct RouterState {
    faults: LinkFaults,
    regions: RegionLinks,
    /// Each node's place: public or behind a NAT.
    nat: Vec<NatKind>,
    /// Each node's NAT's mappings.
    tables: Mutex<Vec<NatTable>>,
    /// Side of each node while a partition is on (packets between
    /// different sides are dropped).
    sides: Mutex<Option<Vec<u8>>>,
    queue: Mutex<(BinaryHeap<Held>, u64)>,
    wake: Condvar,
    stop: AtomicBool,
    stats: RouterStats,
}

/// Names and addresses of one run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    pid: u32,
    nodes: usize,
    net: [u8; 2],
}

impl Plan {
    fn namespace(&self, i: usize) -> String {
        format!("{NS_PREFIX}{}-{i}", self.pid)
    }

    fn address(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net[0], self.net[1], i as u8 + 1)
    }

    /// The public address of node `i`'s NAT.
    fn nat_address(&self, i: usize) -> [u8; 4] {
        [10, self.net[0], self.net[1], 129 + i as u8]
    }

    /// Where a destination address leads, if it is on this network.
    fn index_of(&self, dst: [u8; 4]) -> Option<Dest> {
        if dst[0] != 10 || dst[1..3] != self.net {
            return None;
        }
        let k = dst[3] as usize;
        match k {
            254 => Some(Dest::Host),
            k if (1..=self.nodes).contains(&k) => Some(Dest::Node(k - 1)),
            k if k >= 129 && k - 129 < self.nodes.min(MAX_NAT_NODES) => Some(Dest::Nat(k - 129)),
            _ => None,
        }
    }
}

/// The namespaces, devices and router of one cluster run; dropping it
/// tears them down (and kills whatever still runs in the namespaces).
pub struct Lab {
    plan: Plan,
    state: Arc<RouterState>,
}

impl Lab {
    /// Creates `nodes` namespaces linked by the router, with `faults` on
    /// every link between two nodes. Cleans up leftovers of dead runs first.
    pub fn create(nodes: usize, faults: LinkFaults, seed: u64) -> Result<Lab, LabError> {
        Self::create_regions(nodes, faults, RegionLinks::default(), Vec::new(), seed)
    }

    /// [`Lab::create`] with the nodes in regions: `faults` within a
    /// region, `regions.across` between regions.
    pub fn create_regions(
        nodes: usize,
        faults: LinkFaults,
        regions: RegionLinks,
        nat: Vec<NatKind>,
        seed: u64,
    ) -> Result<Lab, LabError> {
        available()?;
        if nodes > MAX_NODES {
            return Err(LabError::TooManyNodes(MAX_NODES));
        }
        if nodes > MAX_NAT_NODES && nat.iter().any(|k| *k != NatKind::Public) {
            return Err(LabError::TooManyNodes(MAX_NAT_NODES));
        }
        let removed = clean_leftovers();
        if !removed.is_empty() {
            eprintln!(
                "removed {} namespaces left by an earlier run",
                removed.len()
            );
        }
        let pid = std::process::id();
        let net = [64 + ((pid >> 8) % 64) as u8, (pid & 0xff) as u8];
        let state = Arc::new(RouterState {
            faults,
            regions,
            tables: Mutex::new((0..nodes).map(|_| NatTable::default()).collect()),
            nat,
            sides: Mutex::new(None),
            queue: Mutex::new((BinaryHeap::new(), 0)),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            stats: RouterStats::default(),
        });
        let lab = Lab {
            plan: Plan { pid, nodes, net },
            state,
        };
        // From here on, dropping `lab` tears down whatever was made.
        let mut devices = Vec::new();
        for i in 0..nodes {
            let ns = lab.namespace(i);
            ip(&["netns", "add", &ns])?;
            let dev = format!("tpt{pid}.{i}");
            let file = open_tun(&dev)?;
            ip(&["link", "set", "dev", &dev, "netns", &ns])?;
            ip(&["-n", &ns, "link", "set", "dev", &dev, "name", "eth0"])?;
            let addr = format!("{}/24", lab.address(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            // A dial into a NAT that drops it fails in seconds, not minutes.
            let shortened = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns,
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.tcp_syn_retries=1",
                ])
                .status()
                .is_ok_and(|s| s.success());
            if !shortened && i == 0 {
                eprintln!(
                    "tapestry-lab: cannot shorten TCP's SYN retries in the namespaces (sysctl, from procps): dials into a NAT take about two minutes to fail"
                );
            }
            devices.push(file);
        }
        let host = format!("tpb{pid}");
        devices.push(open_tun(&host)?);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", lab.host_address()),
            "dev",
            &host,
        ])?;
        ip(&["link", "set", &host, "up"])?;
        lab.start_router(devices, seed)?;
        Ok(lab)
    }

    /// Namespace of node `i`.
    pub fn namespace(&self, i: usize) -> String {
        self.plan.namespace(i)
    }

    /// Address of node `i`.
    pub fn address(&self, i: usize) -> Ipv4Addr {
        self.plan.address(i)
    }

    /// This process's address on the nodes' network.
    pub fn host_address(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.plan.net[0], self.plan.net[1], 254)
    }

    /// Cuts the nodes into sides (`sides[i]` is node i's); packets between
    /// different sides are dropped until [`Lab::heal`].
    pub fn cut(&self, sides: Vec<u8>) {
        if let Ok(mut s) = self.state.sides.lock() {
            *s = Some(sides);
        }
    }

    /// Ends a partition.
    pub fn heal(&self) {
        if let Ok(mut s) = self.state.sides.lock() {
            *s = None;
        }
    }

    /// Packets NATs did not let in so far.
    pub fn dropped_nat(&self) -> u64 {
        self.state.stats.dropped_nat.load(Ordering::Relaxed)
    }

    /// What the router did so far: (forwarded, dropped by loss, dropped by
    /// a partition).
    pub fn stats(&self) -> (u64, u64, u64) {
        let s = &self.state.stats;
        (
            s.forwarded.load(Ordering::Relaxed),
            s.dropped_loss.load(Ordering::Relaxed),
            s.dropped_cut.load(Ordering::Relaxed),
        )
    }

    /// IP bytes delivered between nodes so far: (within a region, across
    /// regions).
    pub fn bytes(&self) -> (u64, u64) {
        let s = &self.state.stats;
        (
            s.bytes_within.load(Ordering::Relaxed),
            s.bytes_across.load(Ordering::Relaxed),
        )
    }

    fn start_router(&self, devices: Vec<File>, seed: u64) -> Result<(), LabError> {
        let writers: Vec<File> = devices
            .iter()
            .map(File::try_clone)
            .collect::<Result<_, _>>()
            .map_err(LabError::Router)?;
        let host = self.plan.nodes;
        for (from, mut dev) in devices.into_iter().enumerate() {
            let state = self.state.clone();
            let lookup = self.plan;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (from as u64) << 32);
            std::thread::Builder::new()
                .name(format!("router-in-{from}"))
                .spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    while !state.stop.load(Ordering::Relaxed) {
                        let Ok(n) = dev.read(&mut buf) else { break };
                        let p = &mut buf[..n];
                        if n < 20 || p[0] >> 4 != 4 {
                            continue; // IPv4 only
                        }
                        let Some(dest) = lookup.index_of([p[16], p[17], p[18], p[19]]) else {
                            continue;
                        };
                        let Some(to) = route(&state, &lookup, from, dest, p) else {
                            state.stats.dropped_nat.fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        if to == from {
                            continue;
                        }
                        let mut at = Instant::now();
                        if from != host && to != host {
                            let cut = state
                                .sides
                                .lock()
                                .ok()
                                .and_then(|s| s.as_ref().map(|s| s[from] != s[to]))
                                .unwrap_or(false);
                            if cut {
                                state.stats.dropped_cut.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            let r = &state.regions.region;
                            let across = r.get(from) != r.get(to);
                            let faults = if across {
                                state.regions.across
                            } else {
                                state.faults
                            };
                            if faults.loss > 0.0 && rng.gen_bool(faults.loss.min(1.0)) {
                                state.stats.dropped_loss.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            at += Duration::from_millis(faults.latency_ms);
                            state.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                            let bytes = if across {
                                &state.stats.bytes_across
                            } else {
                                &state.stats.bytes_within
                            };
                            bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        if let Ok(mut q) = state.queue.lock() {
                            q.1 += 1;
                            let seq = q.1;
                            q.0.push(Held {
                                at,
                                seq,
                                to,
                                packet: p.to_vec(),
                            });
                            state.wake.notify_one();
                        }
                    }
                })
                .map_err(LabError::Router)?;
        }
        let state = self.state.clone();
        std::thread::Builder::new()
            .name("router-out".into())
            .spawn(move || {
                let mut writers = writers;
                let Ok(mut q) = state.queue.lock() else {
                    return;
                };
                while !state.stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    match q.0.peek().map(|h| h.at) {
                        Some(at) if at <= now => {
                            if let Some(h) = q.0.pop() {
                                // A full device queue drops, as a link would.
                                let _ = writers[h.to].write(&h.packet);
                            }
                        }
                        Some(at) => {
                            let Ok((g, _)) = state.wake.wait_timeout(q, at - now) else {
                                return;
                            };
                            q = g;
                        }
                        None => {
                            let Ok((g, _)) = state.wake.wait_timeout(q, Duration::from_millis(200))
                            else {
                                return;
                            };
                            q = g;
                        }
                    }
                }
            })
            .map_err(LabError::Router)?;
        Ok(())
    }
}

/// Carries a packet from node (or host) `from` to `dest` through the NATs
/// on its way: rewrites it, and returns the device it goes to, or `None`
/// if a NAT drops it.
fn route(state: &RouterState, plan: &Plan, from: usize, dest: Dest, p: &mut [u8]) -> Option<usize> {
    let host = plan.nodes;
    let kind = |i: usize| state.nat.get(i).copied().unwrap_or_default();
    // The observer talks to every node directly, as it is.
    if from == host {
        return match dest {
            Dest::Node(i) => Some(i),
            _ => None,
        };
    }
    if dest == Dest::Host {
        return Some(host);
    }
    let mut tables = state.tables.lock().ok()?;
    // Out through the sender's NAT.
    let sender = kind(from);
    if sender != NatKind::Public {
        let (proto, sport, dport) = ports(p)?;
        let to = ([p[16], p[17], p[18], p[19]], dport);
        let ext = tables.get_mut(from)?.outbound(sender, proto, sport, to);
        p[12..16].copy_from_slice(&plan.nat_address(from));
        let ihl = usize::from(p[0] & 0x0f) * 4;
        p[ihl..ihl + 2].copy_from_slice(&ext.to_be_bytes());
    }
    let to = match dest {
        Dest::Host => return Some(host),
        // A node behind NAT has no address the others can reach.
        Dest::Node(i) if kind(i) != NatKind::Public => return None,
        Dest::Node(i) => i,
        Dest::Nat(i) if kind(i) == NatKind::Public => return None,
        Dest::Nat(i) => {
            let (proto, sport, ext) = ports(p)?;
            let src = ([p[12], p[13], p[14], p[15]], sport);
            let port = tables.get(i)?.inbound(proto, ext, src)?;
            p[16..20].copy_from_slice(&plan.address(i).octets());
            let ihl = usize::from(p[0] & 0x0f) * 4;
            p[ihl + 2..ihl + 4].copy_from_slice(&port.to_be_bytes());
            i
        }
    };
    if sender != NatKind::Public || matches!(dest, Dest::Nat(_)) {
        fix_checksums(p);
    }
    Some(to)
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        self.state.wake.notify_all();
        for i in 0..self.plan.nodes {
            let ns = self.plan.namespace(i);
            kill_inside(&ns);
            let _ = ip(&["netns", "del", &ns]);
        }
        let _ = ip(&["link", "del", &format!("tpb{}", self.plan.pid)]);
    }
}
