//! The virtual network interface (seed 000): a TUN device with this node's
//! mesh addresses, whose packets travel to the peer that owns their
//! destination over that peer's link, on whatever path the link uses at
//! the moment (relay, direct or forwarded). The link is an exactly-once,
//! in-order message stream across path switches, so a TCP connection
//! through the interface never notices a switch.
//!
//! - Addresses: the control server assigns each node an IPv4 address in
//!   100.64.0.0/10 and an IPv6 address in a ULA /48 (`Peer.mesh_ipv4/6`);
//!   the interface gets them with the /10 and /48 prefix, so the kernel
//!   routes the whole mesh range into it ([`netcfg`], iproute2).
//! - Outbound: one task reads packets from the device, looks the
//!   destination up in a table rebuilt from the network map when it changes
//!   ([`routes`]), and queues the packet on the peer's link (one message per
//!   packet on the [`PROTOCOL`] protocol). A packet for an address nobody owns, or for
//!   a peer whose link queue is full or gone, is dropped and counted, like
//!   a router drops; it never holds up packets for other peers.
//! - Inbound: one task takes packets of the protocol from the router, checks
//!   that the source address is one the sending peer owns (no spoofing) and
//!   that the destination is ours, and writes them to the device.
//! - MTU: the interface MTU (default [`DEFAULT_MTU`]) is the largest packet
//!   the mesh carries, whole: a packet is one link message and is never
//!   fragmented on the wire. For local senders the kernel does the rest:
//!   TCP uses an MSS from the MTU, and a larger datagram is fragmented by
//!   the kernel (IPv4) or refused with EMSGSIZE/"packet too big" (IPv6, or
//!   DF set). A peer's packet larger than our MTU is still delivered (the
//!   peer may run a larger MTU); nothing is ever silently black-holed
//!   without a counter.
//!
//! No lock on the packet path: each task owns its copy of the table;
//! counters are atomics.

pub mod device;
pub mod netcfg;
pub mod packet;
pub mod routes;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use peermesh_base::status::{NodeStatus, TunStatus};
use peermesh_base::NodeId;
use peermesh_node::protocol::MAX_MESSAGE;
use peermesh_node::{Endpoint, Incoming, LinkSender, ProtocolHandler, ProtocolId, SendError};
use tokio::sync::watch;

pub use device::Device;
pub use routes::Table;

/// Default interface MTU. Large: the link carries messages up to 64 KiB,
/// and fewer, larger packets are what makes TCP through the mesh fast (the
/// per-message cost of the link dominates at 1500 bytes). The underlay
/// path MTU does not matter: QUIC splits link messages into its own
/// datagrams.
pub const DEFAULT_MTU: u16 = 65000;
/// Smallest MTU accepted (IPv6's minimum).
pub const MIN_MTU: u16 = 1280;
/// Largest MTU: one IP packet (65535 bytes) must fit one link message.
pub const MAX_MTU: u16 = 65535;
pub const DEFAULT_NAME: &str = "peermesh0";
/// The protocol IP packets travel on.
pub const PROTOCOL: &str = "/peermesh/ip/1";

const _: () = assert!(MAX_MTU as usize <= MAX_MESSAGE);

/// [`PROTOCOL`] as the router takes it.
pub fn protocol() -> ProtocolId {
    ProtocolId::from_static(PROTOCOL)
}

#[derive(Clone, Debug)]
pub struct TunConfig {
    pub name: String,
    pub mtu: u16,
}

impl Default for TunConfig {
    fn default() -> Self {
        Self {
            name: DEFAULT_NAME.into(),
            mtu: DEFAULT_MTU,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("cannot create TUN interface {name:?}: {source} (needs root or CAP_NET_ADMIN, and /dev/net/tun)")]
    Open {
        name: String,
        source: std::io::Error,
    },
    #[error("MTU {0} is outside {MIN_MTU}..={MAX_MTU}")]
    Mtu(u16),
    #[error("`{command}` failed: {error}")]
    Config { command: String, error: String },
    #[error("TUN device: {0}")]
    Io(#[from] std::io::Error),
}

/// Counters of the interface; every dropped packet lands in exactly one.
#[derive(Debug, Default)]
pub struct Stats {
    /// Packets from the interface sent to a peer.
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Packets from peers written to the interface.
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// From the interface, to an address no peer owns.
    pub drop_no_route: AtomicU64,
    /// From the interface, for a peer with no link (yet).
    pub drop_no_link: AtomicU64,
    /// From the interface, for a peer whose link queue is full.
    pub drop_congested: AtomicU64,
    /// Not an IP packet (either direction).
    pub drop_malformed: AtomicU64,
    /// From a peer, with a source address the peer does not own.
    pub drop_spoofed: AtomicU64,
    /// From a peer, to an address that is not ours.
    pub drop_not_for_us: AtomicU64,
    /// The kernel refused a write.
    pub write_errors: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What the local API reads: the counters and the interface's state.
pub struct TunInfo {
    pub name: String,
    pub mtu: u16,
    pub up: std::sync::atomic::AtomicBool,
    pub stats: Stats,
}

impl TunInfo {
    pub fn snapshot(&self) -> TunStatus {
        let s = &self.stats;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TunStatus {
            name: self.name.clone(),
            mtu: self.mtu,
            up: self.up.load(Ordering::Relaxed),
            tx_packets: g(&s.tx_packets),
            tx_bytes: g(&s.tx_bytes),
            rx_packets: g(&s.rx_packets),
            rx_bytes: g(&s.rx_bytes),
            drop_no_route: g(&s.drop_no_route),
            drop_no_link: g(&s.drop_no_link),
            drop_congested: g(&s.drop_congested),
            drop_malformed: g(&s.drop_malformed),
            drop_spoofed: g(&s.drop_spoofed),
            drop_not_for_us: g(&s.drop_not_for_us),
            write_errors: g(&s.write_errors),
        }
    }
}

/// An open TUN device, not yet running.
pub struct TunService {
    dev: Arc<Device>,
    info: Arc<TunInfo>,
}

impl TunService {
    /// Creates the interface (it stays down, without addresses, until the
    /// control server has told this node its mesh addresses).
    pub fn open(config: &TunConfig) -> Result<Self, TunError> {
        if config.mtu < MIN_MTU {
            return Err(TunError::Mtu(config.mtu));
        }
        let dev = Device::open(&config.name).map_err(|source| TunError::Open {
            name: config.name.clone(),
            source,
        })?;
        let info = Arc::new(TunInfo {
            name: dev.name().to_string(),
            mtu: config.mtu,
            up: false.into(),
            stats: Stats::default(),
        });
        tracing::info!(interface = %info.name, mtu = config.mtu, "TUN interface created");
        Ok(Self {
            dev: Arc::new(dev),
            info,
        })
    }

    pub fn info(&self) -> Arc<TunInfo> {
        self.info.clone()
    }

    /// The interface's protocol handler on `endpoint`'s router.
    pub fn handler(self, endpoint: Endpoint) -> TunHandler {
        TunHandler {
            service: self,
            endpoint,
        }
    }
}

/// Runs the interface until the node stops: configures it once the node's
/// mesh addresses are known (and again if they change), then pumps packets
/// both ways.
pub struct TunHandler {
    service: TunService,
    endpoint: Endpoint,
}

impl ProtocolHandler for TunHandler {
    async fn serve(self, incoming: Incoming) {
        let TunHandler { service, endpoint } = self;
        let inbound = tokio::spawn(inbound(
            service.dev.clone(),
            service.info.clone(),
            endpoint.status(),
            incoming,
        ));
        if let Err(e) = outbound(service.dev, service.info.clone(), endpoint).await {
            tracing::error!(error = %e, interface = %service.info.name, "TUN interface stopped");
        }
        inbound.abort();
    }
}

/// Waits for the next change of the network map (or of our own mesh
/// addresses) in `status`; the new table, or None when the node is gone.
async fn next_table(status: &mut watch::Receiver<NodeStatus>, last: &mut u64) -> Option<Table> {
    loop {
        status.changed().await.ok()?;
        let s = status.borrow_and_update();
        // Link status changes (paths, counters) are published too: only a
        // new map version can change who owns which address.
        if s.map_version != *last {
            *last = s.map_version;
            return Some(Table::from_status(&s));
        }
    }
}

/// Device → peers.
async fn outbound(
    dev: Arc<Device>,
    info: Arc<TunInfo>,
    endpoint: Endpoint,
) -> Result<(), TunError> {
    let mut status = endpoint.status();
    let sender = endpoint.sender(protocol());
    let (mut table, mut version) = {
        let s = status.borrow_and_update();
        (Table::from_status(&s), s.map_version)
    };
    // Not up before we know our own addresses (they come with the map).
    while table.me_v4.is_none() && table.me_v6.is_none() {
        table = next_table(&mut status, &mut version)
            .await
            .ok_or_else(|| std::io::Error::other("node stopped"))?;
    }
    let stats = &info.stats;
    let mut configured = (table.me_v4, table.me_v6);
    netcfg::configure(&info.name, info.mtu, configured.0, configured.1).await?;
    info.up.store(true, Ordering::Relaxed);
    tracing::info!(interface = %info.name, ipv4 = ?configured.0, ipv6 = ?configured.1, mtu = info.mtu, "TUN interface up");

    let mut senders: HashMap<NodeId, LinkSender> = HashMap::new();
    // Room for any packet the kernel may hand over, whatever the MTU.
    let mut buf = vec![0u8; usize::from(MAX_MTU) + 1];
    loop {
        tokio::select! {
            t = next_table(&mut status, &mut version) => {
                let Some(t) = t else { return Ok(()) };
                table = t;
                senders.retain(|p, _| table.has_peer(p));
                if (table.me_v4, table.me_v6) != configured && (table.me_v4.is_some() || table.me_v6.is_some()) {
                    configured = (table.me_v4, table.me_v6);
                    tracing::warn!(ipv4 = ?configured.0, ipv6 = ?configured.1, "mesh addresses changed; reconfiguring");
                    netcfg::configure(&info.name, info.mtu, configured.0, configured.1).await?;
                }
            }
            r = dev.recv(&mut buf) => {
                let n = r?;
                let pkt = &buf[..n];
                let dst = match packet::parse(pkt) {
                    Ok(h) => h.dst,
                    Err(e) => {
                        tracing::trace!(error = %e, "malformed packet from the interface");
                        bump(&stats.drop_malformed);
                        continue;
                    }
                };
                let Some(peer) = table.route(&dst) else {
                    tracing::trace!(%dst, "no peer owns the destination");
                    bump(&stats.drop_no_route);
                    continue;
                };
                let tx = match senders.get(&peer) {
                    Some(tx) => tx,
                    None => match sender.link(peer).await {
                        Some(tx) => senders.entry(peer).or_insert(tx),
                        None => {
                            bump(&stats.drop_no_link);
                            continue;
                        }
                    },
                };
                match tx.try_send(pkt) {
                    Ok(()) => {
                        bump(&stats.tx_packets);
                        stats.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(SendError::Full) => bump(&stats.drop_congested),
                    Err(SendError::LinkClosed | SendError::NotMember(_)) => {
                        // The link was replaced; ask for the new one next time.
                        senders.remove(&peer);
                        bump(&stats.drop_no_link);
                    }
                    // Larger than any IP packet: not one.
                    Err(SendError::TooLarge(_) | SendError::WrongProtocol) => {
                        bump(&stats.drop_malformed)
                    }
                }
            }
        }
    }
}

/// What to do with a packet from a peer.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Deliver,
    Malformed,
    Spoofed,
    NotForUs,
}

fn check_inbound(table: &Table, peer: &NodeId, pkt: &[u8]) -> Verdict {
    match packet::parse(pkt) {
        Err(_) => Verdict::Malformed,
        Ok(h) if !table.source_ok(peer, &h.src) => Verdict::Spoofed,
        Ok(h) if !table.is_mine(&h.dst) => Verdict::NotForUs,
        Ok(_) => Verdict::Deliver,
    }
}

/// Peers → device.
async fn inbound(
    dev: Arc<Device>,
    info: Arc<TunInfo>,
    mut status: watch::Receiver<NodeStatus>,
    mut incoming: Incoming,
) {
    let stats = &info.stats;
    let (mut table, mut version) = {
        let s = status.borrow_and_update();
        (Table::from_status(&s), s.map_version)
    };
    loop {
        tokio::select! {
            t = next_table(&mut status, &mut version) => match t {
                Some(t) => table = t,
                None => return,
            },
            m = incoming.recv() => {
                let Some(m) = m else { return };
                let (peer, pkt) = (m.from, m.data);
                match check_inbound(&table, &peer, &pkt) {
                    Verdict::Deliver => {}
                    v => {
                        tracing::debug!(%peer, verdict = ?v, len = pkt.len(), "packet from a peer dropped");
                        bump(match v {
                            Verdict::Malformed => &stats.drop_malformed,
                            Verdict::Spoofed => &stats.drop_spoofed,
                            _ => &stats.drop_not_for_us,
                        });
                        continue;
                    }
                }
                match dev.send(&pkt).await {
                    Ok(_) => {
                        bump(&stats.rx_packets);
                        stats.rx_bytes.fetch_add(pkt.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "TUN write refused");
                        bump(&stats.write_errors);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::packet::tests::{v4, v6};
    use super::routes::tests::{peer, random_id, status};
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn table() -> (Table, NodeId, NodeId) {
        let (a, b) = (random_id(), random_id());
        let s = status(
            ("100.64.0.1", "fd00::1"),
            vec![
                peer(a, "100.64.0.2", "fd00::2"),
                peer(b, "100.64.0.3", "fd00::3"),
            ],
        );
        (Table::from_status(&s), a, b)
    }

    #[test]
    fn inbound_packets_are_checked() {
        let (t, a, b) = table();
        let me: Ipv4Addr = "100.64.0.1".parse().unwrap();
        let a4: Ipv4Addr = "100.64.0.2".parse().unwrap();
        let me6: Ipv6Addr = "fd00::1".parse().unwrap();
        let a6: Ipv6Addr = "fd00::2".parse().unwrap();
        assert_eq!(check_inbound(&t, &a, &v4(a4, me, 100)), Verdict::Deliver);
        assert_eq!(check_inbound(&t, &a, &v6(a6, me6, 100)), Verdict::Deliver);
        // b sending with a's address.
        assert_eq!(check_inbound(&t, &b, &v4(a4, me, 100)), Verdict::Spoofed);
        assert_eq!(check_inbound(&t, &b, &v6(a6, me6, 10)), Verdict::Spoofed);
        // A stranger.
        assert_eq!(
            check_inbound(&t, &random_id(), &v4(a4, me, 100)),
            Verdict::Spoofed
        );
        // Through us to someone else.
        let b4: Ipv4Addr = "100.64.0.3".parse().unwrap();
        assert_eq!(check_inbound(&t, &a, &v4(a4, b4, 100)), Verdict::NotForUs);
        assert_eq!(check_inbound(&t, &a, &[0x45, 0, 1]), Verdict::Malformed);
    }

    proptest! {
        #[test]
        fn no_bytes_from_a_peer_are_delivered_unless_they_are_its_packets_to_us(
            p in proptest::collection::vec(any::<u8>(), 0..120),
        ) {
            let (t, a, _) = table();
            if check_inbound(&t, &a, &p) == Verdict::Deliver {
                let h = packet::parse(&p).unwrap();
                prop_assert!(t.source_ok(&a, &h.src));
                prop_assert!(t.is_mine(&h.dst));
            }
        }
    }

    #[test]
    fn mtu_bounds() {
        assert!(TunService::open(&TunConfig {
            name: "x".into(),
            mtu: 576
        })
        .is_err());
        assert_eq!(TunConfig::default().mtu, DEFAULT_MTU);
    }
}
