//! The simulated network: per-message latency (fixed plus uniform jitter),
//! random loss, an upload bandwidth cap per node, partitions and offline
//! nodes. It only decides *whether* and *when* a message arrives; the world
//! queues the delivery.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::scenario::Cut;

/// Messages up to this size do not queue behind large ones.
const ONE_PACKET: u64 = 1500;

/// Why a message did not arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Random loss.
    Lost,
    /// A partition separated the two nodes.
    Cut,
    /// The receiver was offline.
    Offline,
}

/// Links, their faults, and byte counters.
#[derive(Debug)]
pub struct Net {
    latency_ms: u64,
    jitter_ms: u64,
    loss: f64,
    /// Upload bytes per microsecond, if capped.
    bytes_per_us: Option<f64>,
    /// When each node's uplink is next free (µs of virtual time).
    uplink_free_us: Vec<u64>,
    cuts: Vec<Cut>,
    /// Whether each node is online.
    pub online: Vec<bool>,
    rng: ChaCha8Rng,
    /// Bytes each node has sent (delivered or not).
    pub bytes_sent: Vec<u64>,
    /// Each node's region, and the latency between regions.
    region: Vec<usize>,
    region_latency_ms: u64,
    /// The bandwidth of the link between two regions (bytes per µs), and
    /// when each (from, to) link is next free.
    region_bytes_per_us: Option<f64>,
    region_link_free_us: std::collections::BTreeMap<(usize, usize), u64>,
    /// Bytes sent from one region to another.
    pub bytes_cross: u64,
    /// Messages lost at random.
    pub lost: u64,
    /// Messages dropped by a partition.
    pub cut: u64,
    /// Messages to offline nodes.
    pub offline: u64,
}

impl Net {
    /// A network of `n` nodes, all online.
    pub fn new(
        n: usize,
        latency_ms: u64,
        jitter_ms: u64,
        loss: f64,
        bandwidth_mbps: f64,
        cuts: Vec<Cut>,
        seed: u64,
    ) -> Net {
        Net {
            latency_ms,
            jitter_ms,
            loss,
            // 1 Mbit/s = 0.125 bytes per µs.
            bytes_per_us: (bandwidth_mbps > 0.0).then_some(bandwidth_mbps / 8.0),
            uplink_free_us: vec![0; n],
            cuts,
            online: vec![true; n],
            rng: ChaCha8Rng::seed_from_u64(seed),
            bytes_sent: vec![0; n],
            region: vec![0; n],
            region_latency_ms: latency_ms,
            region_bytes_per_us: None,
            region_link_free_us: std::collections::BTreeMap::new(),
            bytes_cross: 0,
            lost: 0,
            cut: 0,
            offline: 0,
        }
    }

    /// Puts the nodes in regions: messages between regions take
    /// `latency_ms`, count as crossing, and (with `bandwidth_mbps` > 0)
    /// queue on the link between the two regions, one after another.
    pub fn set_regions(&mut self, region: Vec<usize>, latency_ms: u64, bandwidth_mbps: f64) {
        self.region = region;
        self.region_latency_ms = latency_ms;
        self.region_bytes_per_us = (bandwidth_mbps > 0.0).then_some(bandwidth_mbps / 8.0);
    }

    /// The base one-way latency.
    pub fn latency_ms(&self) -> u64 {
        self.latency_ms
    }

    /// Whether a partition separates `a` and `b` at `now_ms`.
    pub fn separated(&self, a: usize, b: usize, now_ms: u64) -> bool {
        self.cuts.iter().any(|c| c.separates(a, b, now_ms))
    }

    /// Sends `bytes` from `from` to `to` at `now_ms` over a lossy link:
    /// the time it arrives, or why it does not.
    pub fn send(
        &mut self,
        from: usize,
        to: usize,
        now_ms: u64,
        bytes: u64,
    ) -> Result<u64, Dropped> {
        self.transmit(from, to, now_ms, bytes, true)
    }

    /// Like [`Net::send`] for request-response traffic, which the real node
    /// retries until it gets through: never lost at random, but still
    /// stopped by partitions and offline receivers.
    pub fn send_reliable(
        &mut self,
        from: usize,
        to: usize,
        now_ms: u64,
        bytes: u64,
    ) -> Result<u64, Dropped> {
        self.transmit(from, to, now_ms, bytes, false)
    }

    fn transmit(
        &mut self,
        from: usize,
        to: usize,
        now_ms: u64,
        bytes: u64,
        lossy: bool,
    ) -> Result<u64, Dropped> {
        self.bytes_sent[from] += bytes;
        let crosses = self.region.get(from) != self.region.get(to);
        if crosses {
            self.bytes_cross += bytes;
        }
        // The uplink sends large messages one after another; a message of
        // one packet (announcements, requests) slips in between, as it
        // would between the packets of concurrent streams.
        let departs_us = match self.bytes_per_us {
            Some(rate) if bytes <= ONE_PACKET => {
                now_ms * 1000 + (bytes as f64 / rate).ceil() as u64
            }
            Some(rate) => {
                let start = self.uplink_free_us[from].max(now_ms * 1000);
                let end = start + (bytes as f64 / rate).ceil() as u64;
                self.uplink_free_us[from] = end;
                end
            }
            None => now_ms * 1000,
        };
        if !self.online[to] {
            self.offline += 1;
            return Err(Dropped::Offline);
        }
        if self.separated(from, to, now_ms) {
            self.cut += 1;
            return Err(Dropped::Cut);
        }
        if lossy && self.loss > 0.0 && self.rng.gen_bool(self.loss) {
            self.lost += 1;
            return Err(Dropped::Lost);
        }
        let jitter = if self.jitter_ms > 0 {
            self.rng.gen_range(0..=self.jitter_ms)
        } else {
            0
        };
        let (latency, departs_us) = if crosses {
            // Then over the link between the two regions.
            let leaves = match self.region_bytes_per_us {
                Some(rate) => {
                    let link = (self.region[from], self.region[to]);
                    let free = self.region_link_free_us.entry(link).or_default();
                    let end = (*free).max(departs_us) + (bytes as f64 / rate).ceil() as u64;
                    *free = end;
                    end
                }
                None => departs_us,
            };
            (self.region_latency_ms, leaves)
        } else {
            (self.latency_ms, departs_us)
        };
        Ok(departs_us.div_ceil(1000) + latency + jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_between_regions_take_the_region_latency_and_queue_on_their_link() {
        // Nodes 0, 1 in region 0, node 2 and 3 in region 1; 10 ms inside,
        // 150 ms between, 8 Mbit/s (1 byte/µs) between, unlimited uplinks.
        let mut net = Net::new(4, 10, 0, 0.0, 0.0, vec![], 1);
        net.set_regions(vec![0, 0, 1, 1], 150, 8.0);
        assert_eq!(net.send(0, 1, 0, 10_000), Ok(10), "inside: no link");
        assert_eq!(net.send(0, 2, 0, 10_000), Ok(160), "10 ms on the link");
        assert_eq!(net.send(1, 3, 0, 10_000), Ok(170), "waits for the link");
        assert_eq!(net.send(2, 0, 0, 10_000), Ok(160), "the other way is free");
        assert_eq!(net.bytes_cross, 30_000);
    }

    #[test]
    fn bandwidth_queues_messages_and_cuts_and_offline_nodes_drop_them() {
        // 8 Mbit/s = 1 byte/µs: 10 kB takes 10 ms on the wire.
        let cut = Cut::parse("0|1-2@100-200", 3).unwrap();
        let mut net = Net::new(3, 5, 0, 0.0, 8.0, vec![cut], 1);
        assert_eq!(net.send(0, 1, 0, 10_000), Ok(15));
        assert_eq!(net.send(0, 2, 0, 10_000), Ok(25), "waits for the first");
        assert_eq!(net.send(1, 2, 0, 10_000), Ok(15), "its own uplink");
        assert_eq!(net.send(0, 1, 150, 10), Err(Dropped::Cut));
        assert_eq!(net.send(1, 2, 150, 10), Ok(156), "same side");
        assert_eq!(net.send(0, 1, 200, 10), Ok(206), "healed");
        net.online[2] = false;
        assert_eq!(net.send_reliable(0, 2, 300, 10), Err(Dropped::Offline));
        assert_eq!(net.bytes_sent, vec![20_030, 10_010, 0]);
        assert_eq!((net.cut, net.offline, net.lost), (1, 1, 0));
    }

    #[test]
    fn loss_drops_about_its_rate_and_reliable_sends_are_not_lost() {
        let mut net = Net::new(2, 1, 3, 0.25, 0.0, vec![], 9);
        let lost = (0..10_000)
            .filter(|_| net.send(0, 1, 0, 1).is_err())
            .count();
        assert!((2200..2800).contains(&lost), "{lost}");
        assert!((0..1000).all(|_| {
            net.send_reliable(0, 1, 0, 1)
                .is_ok_and(|t| (1..=4).contains(&t))
        }));
    }
}
