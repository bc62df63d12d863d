//! A punch from probe sockets, coordinated through the control server: the
//! caller opens socket 0 and makes an offer with its `RequestPunch`; the
//! callee takes it up (or declines, and the punch is from the mesh's QUIC
//! socket as before) with an offer of its own in `PunchReady`; then both run
//! [`driver::run`] with the server's secret, and the winning socket goes to
//! QUIC ([`crate::swarm::punched`]), where the caller dials the peer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use peermesh_proto::api::ProbeOffer;
use tokio::sync::mpsc;

use peermesh_base::NatMapping;
use peermesh_traversal::hole_punch::plan::{self, Offer};
use peermesh_traversal::hole_punch::{Config, Role};
use peermesh_traversal::rendezvous::{Own, NO_DIRECT_PATH};

use super::driver::{self, Opened};
use crate::mesh::MeshCommand;
use crate::swarm::punched::Adopter;

/// The responder's socket may be rebinding for QUIC when the initiator's
/// first packet arrives; a lost QUIC Initial costs a whole retransmission
/// timeout, so the initiator gives it this long.
const DIAL_AFTER: Duration = Duration::from_millis(25);

/// What one punch did, back to the endpoint for the link's status.
#[derive(Debug)]
pub enum Report {
    /// A punch from the mesh's QUIC socket was asked for or answered.
    Quic { peer: PeerId },
    /// The control server refused the request (peer offline, timeout).
    Refused { peer: PeerId },
    Probe {
        peer: PeerId,
        packets: u64,
        birthday_probes: u64,
        sockets: u16,
        /// "direct" or why not.
        result: String,
    },
}

impl Report {
    /// An attempt that sent nothing because no direct path can exist.
    pub fn no_direct_path(peer: PeerId) -> Self {
        Report::Probe {
            peer,
            packets: 0,
            birthday_probes: 0,
            sockets: 0,
            result: NO_DIRECT_PATH.into(),
        }
    }
}

/// The mapping a probe offer names.
pub fn offered_mapping(o: &ProbeOffer) -> Option<NatMapping> {
    NatMapping::from_report(&o.mapping, o.port_stride)
}

/// Socket 0 and its offer; `None` without STUN (nothing to offer).
pub async fn offer(
    stun: Option<SocketAddr>,
    own: Own,
    fallback: bool,
) -> Option<(Opened, ProbeOffer)> {
    let opened = match driver::open(stun).await {
        Ok(o) => o,
        Err(e) => {
            tracing::debug!(error = %e, "opening a probe socket");
            return None;
        }
    };
    let public = opened.public?;
    let (mapping, port_stride) = own.mapping.map_or(("", 0), NatMapping::report_name);
    let offer = ProbeOffer {
        endpoint: public.to_string(),
        mapping: mapping.to_string(),
        port_stride,
        fallback,
    };
    Some((opened, offer))
}

/// Everything one side needs to run its part.
pub struct Attempt {
    pub peer: PeerId,
    pub role: Role,
    pub secret: u64,
    pub own: Own,
    pub opened: Opened,
    pub own_offer: ProbeOffer,
    pub peer_offer: ProbeOffer,
}

/// Runs this side's part to the end; on success the socket is QUIC's and
/// the initiator has dialed through it.
pub async fn run(
    a: Attempt,
    adopter: Adopter,
    mesh: mpsc::Sender<MeshCommand>,
    reports: mpsc::Sender<Report>,
) {
    let peer = a.peer;
    let report = |packets, birthday_probes, sockets, result: String| Report::Probe {
        peer,
        packets,
        birthday_probes,
        sockets,
        result,
    };
    let parse = |o: &ProbeOffer| {
        o.endpoint.parse::<SocketAddr>().ok().map(|endpoint| Offer {
            endpoint,
            mapping: offered_mapping(o),
        })
    };
    let (Some(own_offer), Some(peer_offer)) = (parse(&a.own_offer), parse(&a.peer_offer)) else {
        let _ = reports
            .send(report(0, 0, 0, "failed: malformed offer".into()))
            .await;
        return;
    };
    let Some(ins) = plan::instruction(a.role, a.secret, Instant::now(), &own_offer, &peer_offer)
    else {
        let _ = reports.send(Report::no_direct_path(peer)).await;
        return;
    };
    let cfg = Config {
        null_ttl: if a.own.no_nat {
            None
        } else {
            Config::default().null_ttl
        },
        ..Config::default()
    };
    tracing::info!(%peer, role = ?a.role, sockets = ins.local_sockets, prediction = ?ins.prediction, peer_endpoint = %peer_offer.endpoint, "punch: probing from probe sockets");
    let started = Instant::now();
    let out = driver::run(a.opened.socket, cfg, ins).await;
    let c = &out.counters;
    let result = match out.result {
        Ok(p) => match adopter.adopt(peer, p.local_port, p.remote).await {
            Ok(()) => {
                tracing::info!(%peer, remote = %p.remote, local_port = p.local_port, rtt_ms = ?p.rtt.map(|r| r.as_secs_f64() * 1e3), packets = c.total_packets, birthday_probes = c.birthday_probes_sent, took_ms = started.elapsed().as_secs_f64() * 1e3, malformed = out.malformed, "punch: probe pair answered; QUIC takes the socket");
                if a.role == Role::Initiator {
                    tokio::time::sleep(DIAL_AFTER).await;
                    let _ = mesh
                        .send(MeshCommand::Punch {
                            peer,
                            addrs: vec![peermesh_relay::quic_addr(p.remote)],
                            open_first: false,
                            started: None,
                        })
                        .await;
                }
                "direct".to_string()
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "punch: handing the probe socket to QUIC");
                format!("failed: {e}")
            }
        },
        Err(reason) => {
            tracing::info!(%peer, ?reason, packets = c.total_packets, birthday_probes = c.birthday_probes_sent, malformed = out.malformed, "punch: no probe pair answered");
            format!("failed: {reason:?}")
        }
    };
    let _ = reports
        .send(report(
            c.total_packets,
            c.birthday_probes_sent,
            out.sockets,
            result,
        ))
        .await;
}
