//! The async shell of coordinated punches (seed 002): the caller's request
//! and the callee's answer, as tasks beside the control session. What to
//! do is decided by `peermesh_traversal::rendezvous`; this file does the
//! STUN probes, the gRPC calls, the probe sockets and the QUIC dials.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use peermesh_base::event::{EventKind, PunchMethod, PunchRole};
use peermesh_base::NodeId;
use peermesh_proto::api::PunchInstruction;
use peermesh_traversal::hole_punch::Role;
use peermesh_traversal::port_prediction::{predict, MAX_PREDICTION_WINDOW, PREDICTION_WINDOW};
use peermesh_traversal::rendezvous::{self, Answer, Own, Request, MAPPING_VERDICT_PATIENCE};
use tokio::sync::{mpsc, watch};

use super::events::EventLog;
use crate::control::ControlClient;
use crate::mesh::MeshCommand;
use crate::punch::coordinated::{self, offered_mapping, Report};
use crate::swarm::punched::Adopter;

/// Candidates offered for one punch at most (the control API's limit).
pub const MAX_CANDIDATES: usize = 32;
/// The callee's opening packets leave when the swarm next polls the dial it
/// started; this is "a moment later", so that `PunchReady` (and with it the
/// caller's dial) never overtakes them.
const OPENING_HEAD_START: Duration = Duration::from_millis(2);

/// What both sides' tasks need from the endpoint.
#[derive(Clone)]
pub(crate) struct PunchCtx {
    pub client: ControlClient,
    pub mesh: mpsc::Sender<MeshCommand>,
    pub adopter: Adopter,
    pub reports: mpsc::Sender<Report>,
    pub events: Arc<EventLog>,
    /// The control server's primary STUN endpoint, once known.
    pub stun: Option<SocketAddr>,
    /// This node's direct candidates, freshest (observed) first.
    pub candidates: Vec<String>,
}

impl PunchCtx {
    fn event(&self, peer: PeerId, role: PunchRole, method: PunchMethod) {
        if let Ok(peer) = NodeId::from_bytes(&peer.to_bytes()) {
            self.events.publish(EventKind::Punch { peer, role, method });
        }
    }
}

fn parse_addrs(list: &[String]) -> Vec<Multiaddr> {
    list.iter().filter_map(|a| a.parse().ok()).collect()
}

/// The QUIC multiaddrs of the next `window` mappings of a sequential NAT
/// whose last one is `last`.
fn predicted(last: SocketAddr, stride: i32, window: u16) -> Vec<String> {
    let window = window.min(MAX_PREDICTION_WINDOW);
    let p: Vec<String> = predict(last, stride, window)
        .into_iter()
        .map(|a| peermesh_relay::quic_addr(a).to_string())
        .collect();
    tracing::debug!(%last, stride, predicted = p.len(), "port prediction");
    p
}

/// `candidates` with, first, the public endpoints a sequential NAT will give
/// our next new mappings (probed just now), when this node is behind one.
async fn with_predictions(
    candidates: Vec<String>,
    stun: Option<SocketAddr>,
    own: Own,
    window: u16,
) -> Vec<String> {
    let (Some(stun), Some(stride)) = (stun, own.stride()) else {
        return candidates;
    };
    match crate::nat::probe(stun).await {
        Ok(Some(last)) => {
            rendezvous::predicted_first(candidates, predicted(last, stride, window), MAX_CANDIDATES)
        }
        Ok(None) | Err(_) => candidates,
    }
}

/// The caller's part (seed 002): ask the server, which returns once the peer
/// has opened its NAT, then dial. Runs beside the session so the map keeps
/// flowing meanwhile.
///
/// The request carries an offer to punch from probe sockets instead; the
/// peer takes it up when a NAT is random symmetric, or when this side says
/// that punching from the QUIC socket did not work last time (`fallback`).
pub(crate) fn request(ctx: PunchCtx, req: Request<PeerId>) {
    tokio::spawn(async move {
        let peer = req.peer;
        let started = std::time::Instant::now();
        // Probe socket 0's STUN mapping is the NAT's latest: on a sequential
        // NAT both the peer's prediction of our probe sockets and that of our
        // QUIC socket start there (no second probe).
        let offered = coordinated::offer(ctx.stun, req.own, req.fallback).await;
        let last = offered.as_ref().and_then(|(o, _)| o.public);
        let candidates = match (req.own.stride(), last) {
            (Some(stride), Some(last)) => rendezvous::predicted_first(
                ctx.candidates.clone(),
                predicted(last, stride, PREDICTION_WINDOW),
                MAX_CANDIDATES,
            ),
            _ => {
                with_predictions(ctx.candidates.clone(), ctx.stun, req.own, PREDICTION_WINDOW).await
            }
        };
        let offer = offered.as_ref().map(|(_, o)| o.clone());
        let mut client = ctx.client.clone();
        let r = match client
            .request_punch(&peer.to_string(), candidates, offer)
            .await
        {
            Ok(r) => r,
            Err(s) => {
                tracing::debug!(%peer, code = ?s.code(), error = %s.message(), "punch request refused");
                let _ = ctx.reports.send(Report::Refused { peer }).await;
                return;
            }
        };
        let rendezvous_ms = started.elapsed().as_secs_f64() * 1e3;
        match (r.peer_probe, offered) {
            (Some(peer_offer), Some((opened, own_offer))) => {
                tracing::info!(%peer, punch = r.punch_id, rendezvous_ms, "punch: peer took up probe sockets");
                ctx.event(peer, PunchRole::Caller, PunchMethod::Probe);
                let attempt = coordinated::Attempt {
                    peer,
                    role: Role::Initiator,
                    secret: r.probe_secret,
                    own: req.own,
                    opened,
                    own_offer,
                    peer_offer,
                };
                coordinated::run(attempt, ctx.adopter, ctx.mesh, ctx.reports).await;
            }
            _ => {
                let addrs = parse_addrs(&r.peer_candidates);
                tracing::info!(%peer, punch = r.punch_id, candidates = addrs.len(), rendezvous_ms, "punch: peer is open; dialing");
                ctx.event(peer, PunchRole::Caller, PunchMethod::Quic);
                let _ = ctx.reports.send(Report::Quic { peer }).await;
                let _ = ctx
                    .mesh
                    .send(MeshCommand::Punch {
                        peer,
                        addrs,
                        open_first: false,
                        started: None,
                    })
                    .await;
            }
        }
    });
}

/// The callee's part: open towards the caller, then tell the server. A
/// probe offer is taken up (once this node's NAT is known) when a side is
/// random symmetric or the caller falls back to it.
///
/// `own`: this node's NAT now; `verdict`: where the mapping verdict arrives
/// while discovery still runs (`awaiting`), waited for within the caller's
/// patience, since an opening packet before it would take the mapping that
/// prediction then cannot name.
pub(crate) fn answer(
    ctx: PunchCtx,
    p: PunchInstruction,
    own: Own,
    awaiting: bool,
    mut verdict: watch::Receiver<Option<Own>>,
) {
    let Ok(peer) = p.peer_id.parse::<PeerId>() else {
        tracing::debug!(peer = %p.peer_id, "punch instruction for a malformed peer id");
        return;
    };
    tokio::spawn(async move {
        let own = if awaiting {
            let wait = verdict.wait_for(|o| o.is_some());
            match tokio::time::timeout(MAPPING_VERDICT_PATIENCE, wait).await {
                Ok(Ok(o)) => o.unwrap_or(own),
                _ => own,
            }
        } else {
            own
        };
        let answer = p.peer_probe.as_ref().map_or(Answer::Quic, |o| {
            rendezvous::answer(own.mapping, offered_mapping(o), o.fallback)
        });
        let offered = match answer {
            Answer::Quic => None,
            _ => coordinated::offer(ctx.stun, own, false).await,
        };
        let mut client = ctx.client.clone();
        // Without a probe socket (no STUN answer): from the QUIC socket.
        if let (Some((opened, own_offer)), Some(peer_offer)) = (offered, p.peer_probe.clone()) {
            let probing = if answer == Answer::Probe {
                tracing::info!(%peer, punch = p.punch_id, "punch: taking up probe sockets");
                ctx.event(peer, PunchRole::Callee, PunchMethod::Probe);
                let attempt = coordinated::Attempt {
                    peer,
                    role: Role::Responder,
                    secret: p.probe_secret,
                    own,
                    opened,
                    own_offer: own_offer.clone(),
                    peer_offer,
                };
                Some(tokio::spawn(coordinated::run(
                    attempt,
                    ctx.adopter.clone(),
                    ctx.mesh.clone(),
                    ctx.reports.clone(),
                )))
            } else {
                // Our offer tells the caller too; nobody sends anything.
                drop(opened);
                tracing::info!(%peer, punch = p.punch_id, "punch: no direct path can exist; not punching");
                ctx.event(peer, PunchRole::Callee, PunchMethod::None);
                let _ = ctx.reports.send(Report::no_direct_path(peer)).await;
                None
            };
            if let Err(s) = client
                .punch_ready(p.punch_id, ctx.candidates.clone(), Some(own_offer))
                .await
            {
                tracing::debug!(%peer, code = ?s.code(), error = %s.message(), "punch ready refused");
                if let Some(probing) = probing {
                    probing.abort();
                }
            }
            return;
        }
        let addrs = parse_addrs(&p.peer_candidates);
        tracing::info!(%peer, punch = p.punch_id, candidates = addrs.len(), "punch: opening towards the caller");
        ctx.event(peer, PunchRole::Callee, PunchMethod::Quic);
        let _ = ctx.reports.send(Report::Quic { peer }).await;
        // Probe before opening: each opening packet to a new candidate takes
        // the next mapping of a sequential NAT, so the window covers as many
        // of them as we open (and a few others' flows).
        let window = u16::try_from(addrs.len())
            .unwrap_or(u16::MAX)
            .saturating_add(PREDICTION_WINDOW / 2);
        let candidates = with_predictions(ctx.candidates.clone(), ctx.stun, own, window).await;
        let (started, opened) = tokio::sync::oneshot::channel();
        let _ = ctx
            .mesh
            .send(MeshCommand::Punch {
                peer,
                addrs,
                open_first: true,
                started: Some(started),
            })
            .await;
        // The dial is under way once `opened` fires; its first opening
        // packet leaves when the swarm next polls it, a moment later.
        let _ = opened.await;
        tokio::time::sleep(OPENING_HEAD_START).await;
        if let Err(s) = client.punch_ready(p.punch_id, candidates, None).await {
            tracing::debug!(%peer, code = ?s.code(), error = %s.message(), "punch ready refused");
        }
    });
}
