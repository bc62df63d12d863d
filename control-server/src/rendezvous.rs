//! The rendezvous of seed 002: the control server coordinates a hole punch
//! between two members instead of hoping that both dial at once.
//!
//! The caller asks for a punch to a peer (`RequestPunch`). The server hands
//! the peer (the callee) the caller's candidates over the peer's open watch
//! stream and tells it to send opening packets now; the callee answers
//! `PunchReady` once its packets are out, with its own fresh candidates. Only
//! then does the caller's call return, with the callee's candidates, and the
//! caller dials: its first packet finds the callee's NAT already open for it.
//! The order (callee opens, caller sends) is the one the seed prescribes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use peermesh_proto::api::{
    ProbeOffer, PunchInstruction, PunchReadyRequest, RequestPunchRequest, RequestPunchResponse,
};
use tokio::sync::{mpsc, oneshot};

use crate::error::{ControlError, Result};
use crate::registry::{NodeCtx, Registry};
use crate::validate;

/// How long a caller waits for the callee's `PunchReady`. The callee
/// answers as soon as its opening packets are out: one instruction down its
/// open watch stream and one call back, well under a second on any working
/// path. A callee that has not answered in three seconds is not reading its
/// stream (or is gone), and waiting longer only delays the caller's next
/// attempt.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
/// Instructions queued towards one watch stream; more means the callee is
/// not reading, and the punch is refused rather than queued.
const MAILBOX: usize = 16;
/// Punches one caller may have waiting at once.
const MAX_PENDING_PER_CALLER: usize = 16;
const MAX_PENDING: usize = 4096;

struct Pending {
    caller: String,
    callee: String,
    /// Whether the caller made a probe offer (the callee may take it up).
    probe: bool,
    /// The callee's fresh candidates, where the server saw it, its offer.
    reply: oneshot::Sender<(Vec<String>, IpAddr, Option<ProbeOffer>)>,
}

#[derive(Default)]
struct State {
    /// Open watch streams per node: (stream number, its mailbox).
    mailboxes: HashMap<String, Vec<(u64, mpsc::Sender<PunchInstruction>)>>,
    pending: HashMap<u64, Pending>,
}

pub struct Rendezvous {
    state: Mutex<State>,
    next_id: AtomicU64,
    timeout: Duration,
}

/// Unregisters a watch stream's mailbox when the stream ends.
pub struct MailboxGuard {
    rendezvous: Arc<Rendezvous>,
    node_id: String,
    stream: u64,
}

impl Drop for MailboxGuard {
    fn drop(&mut self) {
        let mut st = self.rendezvous.lock();
        if let Some(list) = st.mailboxes.get_mut(&self.node_id) {
            list.retain(|(n, _)| *n != self.stream);
            if list.is_empty() {
                st.mailboxes.remove(&self.node_id);
            }
        }
    }
}

/// Removes a punch from the pending table however the caller's wait ends.
struct PendingGuard<'a> {
    rendezvous: &'a Rendezvous,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.rendezvous.lock().pending.remove(&self.id);
    }
}

/// A member's direct candidates: what it sent now first, then what it
/// published; relay circuits are not candidates for a punch, and neither is
/// a public address other than the one the server sees the member at
/// ([`own_address`]): a member cannot point its peer's punch at a third
/// host.
fn candidates(fresh: &[String], published: &[String], observed: IpAddr) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in fresh.iter().chain(published) {
        if !a.contains("/p2p-circuit") && !out.contains(a) && own_address(a, observed) {
            out.push(a.clone());
        }
    }
    out.truncate(validate::MAX_ADDRESSES);
    out
}

/// Whether `ip` is reachable only inside some network (a LAN, this host, a
/// link, a carrier-grade NAT): such addresses are how members behind one
/// router find each other, and the server cannot see them; everything
/// else must be where the server sees the member.
fn is_local(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                // 100.64.0.0/10, shared address space (RFC 6598).
                || (v4.octets()[0] == 100 && v4.octets()[1] & 0xc0 == 64)
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                // fc00::/7 unique local, fe80::/10 link-local.
                || v6.segments()[0] & 0xfe00 == 0xfc00
                || v6.segments()[0] & 0xffc0 == 0xfe80
        }
    }
}

/// The IP address of a candidate multiaddr (`/ip4/A/…`, `/ip6/A/…`).
fn candidate_ip(addr: &str) -> Option<IpAddr> {
    let mut parts = addr.split('/').skip(1);
    match (parts.next()?, parts.next()?) {
        ("ip4" | "ip6", ip) => ip.parse().ok(),
        _ => None,
    }
}

/// Whether candidate `addr` may be a member's own, seen at `observed`: a
/// local address, or a public one equal to `observed`. Names (`/dns/…`)
/// are not candidates for a punch.
fn own_address(addr: &str, observed: IpAddr) -> bool {
    candidate_ip(addr)
        .is_some_and(|ip| is_local(ip) || ip.to_canonical() == observed.to_canonical())
}

/// Refuses a probe endpoint on a public address other than the caller's.
fn own_probe(o: &ProbeOffer, observed: IpAddr) -> Result<()> {
    let ip = o
        .endpoint
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip())
        .map_err(|_| ControlError::invalid("probe endpoint is not host:port"))?;
    if is_local(ip) || ip.to_canonical() == observed.to_canonical() {
        Ok(())
    } else {
        Err(ControlError::PermissionDenied(format!(
            "probe endpoint {} is not this node's: the server sees it at {observed}",
            o.endpoint
        )))
    }
}

impl Rendezvous {
    pub fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            // Not secret (PunchReady is checked against the callee), only
            // unlikely to repeat across restarts.
            next_id: AtomicU64::new(rand::random::<u64>() >> 1),
            timeout,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A mailbox for one watch stream of `node_id`; instructions for the
    /// node go to its newest stream.
    pub fn mailbox(
        self: &Arc<Self>,
        node_id: &str,
    ) -> (mpsc::Receiver<PunchInstruction>, MailboxGuard) {
        let (tx, rx) = mpsc::channel(MAILBOX);
        let stream = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .mailboxes
            .entry(node_id.to_string())
            .or_default()
            .push((stream, tx));
        (
            rx,
            MailboxGuard {
                rendezvous: self.clone(),
                node_id: node_id.to_string(),
                stream,
            },
        )
    }

    /// `RequestPunch`: tells the callee to open, waits for it, returns its
    /// candidates.
    /// `observed` is the address the caller's request came from.
    pub async fn request(
        &self,
        registry: &Registry,
        ctx: &NodeCtx,
        req: &RequestPunchRequest,
        observed: IpAddr,
    ) -> Result<RequestPunchResponse> {
        validate::addresses(&req.candidates)?;
        if let Some(o) = &req.probe {
            probe_offer(o)?;
            own_probe(o, observed)?;
        }
        let foreign: Vec<&String> = req
            .candidates
            .iter()
            .filter(|a| !a.contains("/p2p-circuit") && !own_address(a, observed))
            .collect();
        if !foreign.is_empty() && foreign.len() == req.candidates.len() {
            return Err(ControlError::PermissionDenied(format!(
                "candidates {foreign:?} are not this node's addresses (the server sees it at \
                 {observed}); a punch goes to the caller's own addresses only"
            )));
        }
        if req.peer_id.is_empty() {
            return Err(ControlError::invalid("peer_id is empty"));
        }
        if req.peer_id == ctx.node_id {
            return Err(ControlError::invalid("cannot punch a hole to yourself"));
        }
        let callee = registry.member(ctx, &req.peer_id)?;
        let me = registry.member(ctx, &ctx.node_id)?;
        let probe_secret = if req.probe.is_some() {
            rand::random::<u64>()
        } else {
            0
        };
        let instruction = PunchInstruction {
            punch_id: 0,
            peer_id: ctx.node_id.clone(),
            peer_candidates: candidates(&req.candidates, &me.addresses, observed),
            peer_probe: req.probe.clone(),
            probe_secret,
        };
        let (id, rx) = {
            let mut st = self.lock();
            if st.pending.len() >= MAX_PENDING
                || st
                    .pending
                    .values()
                    .filter(|p| p.caller == ctx.node_id)
                    .count()
                    >= MAX_PENDING_PER_CALLER
            {
                return Err(ControlError::Unavailable(
                    "too many punches waiting; retry later".into(),
                ));
            }
            // One attempt per pair at a time: a member cannot make its peer
            // send bursts of probes back to back.
            if st.pending.values().any(|p| {
                (p.caller == ctx.node_id && p.callee == req.peer_id)
                    || (p.caller == req.peer_id && p.callee == ctx.node_id)
            }) {
                return Err(ControlError::Unavailable(format!(
                    "a punch between this node and {} is under way; retry when it ends",
                    req.peer_id
                )));
            }
            let mailbox = st
                .mailboxes
                .get(&req.peer_id)
                .and_then(|l| l.last())
                .map(|(_, tx)| tx.clone())
                .ok_or_else(|| {
                    ControlError::FailedPrecondition(format!(
                        "peer {} is offline (no watch stream)",
                        req.peer_id
                    ))
                })?;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (reply, rx) = oneshot::channel();
            mailbox
                .try_send(PunchInstruction {
                    punch_id: id,
                    ..instruction
                })
                .map_err(|_| {
                    ControlError::Unavailable("peer is not reading its instructions".into())
                })?;
            st.pending.insert(
                id,
                Pending {
                    caller: ctx.node_id.clone(),
                    callee: req.peer_id.clone(),
                    probe: req.probe.is_some(),
                    reply,
                },
            );
            (id, rx)
        };
        let _guard = PendingGuard {
            rendezvous: self,
            id,
        };
        tracing::debug!(punch = id, caller = %ctx.node_id, callee = %req.peer_id, "punch: callee told to open");
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok((fresh, callee_at, peer_probe))) => Ok(RequestPunchResponse {
                punch_id: id,
                peer_candidates: candidates(&fresh, &callee.addresses, callee_at),
                peer_probe,
                probe_secret,
            }),
            Ok(Err(_)) => Err(ControlError::Unavailable(
                "the punch was dropped; retry".into(),
            )),
            Err(_) => Err(ControlError::DeadlineExceeded(format!(
                "peer {} did not answer the punch within {:?}",
                req.peer_id, self.timeout
            ))),
        }
    }

    /// `PunchReady`: the callee's packets are out; release the caller.
    /// `observed` is the address the callee's call came from.
    pub fn ready(&self, ctx: &NodeCtx, req: &PunchReadyRequest, observed: IpAddr) -> Result<()> {
        validate::addresses(&req.candidates)?;
        if let Some(o) = &req.probe {
            probe_offer(o)?;
            own_probe(o, observed)?;
        }
        let mut st = self.lock();
        match st.pending.get(&req.punch_id) {
            Some(p) if p.callee == ctx.node_id => {
                if !p.probe && req.probe.is_some() {
                    return Err(ControlError::invalid(
                        "the caller made no probe offer to answer",
                    ));
                }
            }
            _ => {
                return Err(ControlError::not_found(format!(
                    "no punch {} waits for this node (expired or not yours)",
                    req.punch_id
                )))
            }
        }
        let p = st.pending.remove(&req.punch_id).expect("checked above");
        // The caller may have given up a moment ago; nothing to do then.
        let _ = p
            .reply
            .send((req.candidates.clone(), observed, req.probe.clone()));
        Ok(())
    }
}

/// A probe offer names a socket address and a known mapping behaviour.
fn probe_offer(o: &ProbeOffer) -> Result<()> {
    o.endpoint.parse::<std::net::SocketAddr>().map_err(|_| {
        ControlError::invalid(format!("probe endpoint {:?} is not host:port", o.endpoint))
    })?;
    let known = [
        "",
        "endpoint_independent",
        "address_dependent",
        "sequential",
        "random",
    ];
    if !known.contains(&o.mapping.as_str()) {
        return Err(ControlError::invalid(format!(
            "unknown NAT mapping {:?}",
            o.mapping
        )));
    }
    if o.port_stride.unsigned_abs() > 1024 {
        return Err(ControlError::invalid("port stride out of range"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_put_fresh_first_and_leave_out_circuits() {
        let fresh = vec!["/ip4/1.2.3.4/udp/1/quic-v1".to_string()];
        let published = vec![
            "/ip4/5.6.7.8/udp/2/quic-v1/p2p/12D3KooWA/p2p-circuit".to_string(),
            "/ip4/1.2.3.4/udp/1/quic-v1".to_string(),
            "/ip4/10.0.0.1/udp/3/quic-v1".to_string(),
        ];
        let seen: IpAddr = "1.2.3.4".parse().unwrap();
        assert_eq!(
            candidates(&fresh, &published, seen),
            vec![
                "/ip4/1.2.3.4/udp/1/quic-v1".to_string(),
                "/ip4/10.0.0.1/udp/3/quic-v1".to_string()
            ]
        );
    }

    /// Local addresses pass (the server cannot see them); a public one
    /// passes only where the server sees the member.
    #[test]
    fn only_own_or_local_addresses_are_candidates() {
        let seen: IpAddr = "198.18.0.7".parse().unwrap();
        for ok in [
            "/ip4/198.18.0.7/udp/4000/quic-v1",
            "/ip4/10.1.0.2/udp/4000/quic-v1",
            "/ip4/192.168.1.2/udp/1/quic-v1",
            "/ip4/100.64.0.9/udp/1/quic-v1",
            "/ip4/127.0.0.1/udp/1/quic-v1",
            "/ip6/fd00::1/udp/1/quic-v1",
            "/ip6/fe80::1/udp/1/quic-v1",
        ] {
            assert!(own_address(ok, seen), "{ok} refused");
        }
        for bad in [
            "/ip4/203.0.113.66/udp/4000/quic-v1",
            "/ip4/8.8.8.8/udp/53/quic-v1",
            "/ip6/2001:db8::1/udp/1/quic-v1",
            "/dns4/example.com/udp/1/quic-v1",
            "garbage",
        ] {
            assert!(!own_address(bad, seen), "{bad} taken");
        }
        // The server may see an IPv4 client as an IPv4-mapped IPv6 address.
        let mapped: IpAddr = "::ffff:198.18.0.7".parse().unwrap();
        assert!(own_address("/ip4/198.18.0.7/udp/1/quic-v1", mapped));
        let offer = |endpoint: &str| ProbeOffer {
            endpoint: endpoint.into(),
            ..Default::default()
        };
        own_probe(&offer("198.18.0.7:5000"), seen).unwrap();
        own_probe(&offer("10.0.0.2:5000"), seen).unwrap();
        assert!(matches!(
            own_probe(&offer("203.0.113.66:5000"), seen),
            Err(ControlError::PermissionDenied(_))
        ));
    }
}
