//! The async shell around [`HolePunch`]: real UDP sockets, the clock, TTL.
//!
//! Socket 0 is opened first and its public endpoint learnt from the control
//! server's STUN ([`open`]), so that the peer can be told where to aim. The
//! machine may ask for more sockets (the random-symmetric side of a
//! birthday search). When a pair answers, every socket is closed and the
//! winning one's port is returned, for [`crate::swarm::punched`] to bind
//! again for QUIC.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use peermesh_traversal::hole_punch::{
    Action, Config, Counters, Event, FailReason, HolePunch, Instruction, ProbeMessage,
};

/// Datagrams queued from the sockets' readers; a flood beyond is dropped.
const INBOX: usize = 1024;
/// Longest wait for queued answers once the pair is found; shorter than
/// the initiator's wait before it dials through the pair.
const LINGER: Duration = Duration::from_millis(20);
/// Largest datagram read; probes are [`ProbeMessage::LEN`] bytes.
const MAX_DATAGRAM: usize = 64;

/// Socket 0 of an attempt and where the control server saw it.
pub struct Opened {
    pub socket: UdpSocket,
    /// `None` when no STUN server answered.
    pub public: Option<SocketAddr>,
}

/// Binds socket 0 and asks `stun` for its public endpoint.
pub async fn open(stun: Option<SocketAddr>) -> io::Result<Opened> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    let public = match stun {
        Some(s) => crate::nat::probe_from(&socket, s).await?,
        None => None,
    };
    Ok(Opened { socket, public })
}

/// The pair that got through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Punched {
    /// Local port of the winning socket, closed now.
    pub local_port: u16,
    pub remote: SocketAddr,
    pub rtt: Option<Duration>,
}

#[derive(Debug)]
pub struct Outcome {
    pub result: Result<Punched, FailReason>,
    pub counters: Counters,
    /// Sockets opened in all.
    pub sockets: u16,
    /// Datagrams that were not probe messages, or came while the inbox was full.
    pub malformed: u64,
}

struct Sockets {
    list: Vec<Arc<UdpSocket>>,
    readers: Vec<JoinHandle<()>>,
    inbox: mpsc::Sender<(u16, SocketAddr, Vec<u8>)>,
    /// The TTL datagrams normally leave with, to restore after an opening packet.
    default_ttl: u32,
}

impl Sockets {
    fn add(&mut self, socket: UdpSocket) {
        let index = self.list.len() as u16;
        let socket = Arc::new(socket);
        let tx = self.inbox.clone();
        let s = socket.clone();
        self.readers.push(tokio::spawn(async move {
            let mut buf = [0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                // Full: the machine is behind; a probe is retried anyway.
                let _ = tx.try_send((index, from, buf[..n].to_vec()));
            }
        }));
        self.list.push(socket);
    }

    async fn send(&self, socket: u16, to: SocketAddr, bytes: &[u8], ttl: Option<u8>) {
        let Some(s) = self.list.get(usize::from(socket)) else {
            return;
        };
        // Sends on one socket are sequential (this task), so the TTL set for
        // an opening packet applies to it alone.
        if let Some(t) = ttl {
            if let Err(e) = s.set_ttl(u32::from(t)) {
                tracing::debug!(error = %e, "setting the opening packet's TTL");
                return;
            }
        }
        if let Err(e) = s.send_to(bytes, to).await {
            tracing::trace!(%to, error = %e, "probe send");
        }
        if ttl.is_some() {
            let _ = s.set_ttl(self.default_ttl);
        }
    }

    /// Stops the readers and closes every socket; after this the ports are free.
    async fn close(mut self) {
        for r in &self.readers {
            r.abort();
        }
        for r in self.readers.drain(..) {
            let _ = r.await;
        }
        self.list.clear();
    }
}

impl Drop for Sockets {
    /// An attempt dropped midway (its task aborted) closes its sockets too.
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

/// The winning pair as the machine names it: (socket, remote, RTT).
type Found = (u16, SocketAddr, Option<Duration>);

/// Answers still queued when the pair is found (the ack of the nomination
/// may wait for send credit after a birthday burst) go out before the
/// sockets close; without it the peer never learns that it is done.
async fn linger(hp: &mut HolePunch, sockets: &Sockets, rng: &mut StdRng) {
    let until = Instant::now() + LINGER;
    while let Some(at) = hp.poll_timeout().filter(|at| *at <= until) {
        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        hp.handle(Instant::now(), Event::Timeout, rng);
        while let Some(action) = hp.poll_action() {
            if let Some((socket, to, bytes, ttl)) = action.datagram() {
                sockets.send(socket, to, &bytes, ttl).await;
            }
        }
    }
}

/// Runs one attempt to its end: a pair that answered, or a failure.
pub async fn run(socket0: UdpSocket, cfg: Config, ins: Instruction) -> Outcome {
    let mut rng = StdRng::from_entropy();
    let (tx, mut rx) = mpsc::channel(INBOX);
    let default_ttl = socket0.ttl().unwrap_or(64);
    let mut sockets = Sockets {
        list: Vec::new(),
        readers: Vec::new(),
        inbox: tx,
        default_ttl,
    };
    sockets.add(socket0);
    let mut hp = HolePunch::new(cfg);
    let mut malformed = 0u64;
    hp.handle(Instant::now(), Event::Instruction(ins), &mut rng);
    let result = loop {
        let mut done: Option<Result<Found, FailReason>> = None;
        // Every action of this step, the answers included, goes out before
        // the sockets close.
        while let Some(action) = hp.poll_action() {
            if let Some((socket, to, bytes, ttl)) = action.datagram() {
                sockets.send(socket, to, &bytes, ttl).await;
                continue;
            }
            match action {
                Action::OpenSockets { count } => {
                    while sockets.list.len() < usize::from(count) {
                        match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await {
                            Ok(s) => sockets.add(s),
                            Err(e) => {
                                tracing::warn!(error = %e, opened = sockets.list.len(), "opening probe sockets");
                                break;
                            }
                        }
                    }
                }
                Action::Succeeded {
                    remote,
                    socket,
                    rtt,
                } => done = Some(Ok((socket, remote, rtt))),
                Action::Failed { reason } => done = Some(Err(reason)),
                // Retries are the link's: it asks again after its backoff.
                Action::RequestRetry { .. } => {}
                Action::SendProbe { .. } | Action::SendProbeAck { .. } => {}
            }
        }
        if let Some(d) = done {
            if d.is_ok() {
                linger(&mut hp, &sockets, &mut rng).await;
            }
            break d;
        }
        let Some(at) = hp.poll_timeout() else {
            // Nothing pending and no verdict cannot happen in a live attempt.
            break Err(FailReason::Timeout);
        };
        tokio::select! {
            got = rx.recv() => {
                let Some((socket, from, bytes)) = got else {
                    break Err(FailReason::Timeout);
                };
                match ProbeMessage::decode(&bytes) {
                    Some(m) => hp.handle(Instant::now(), m.into_event(socket, from), &mut rng),
                    None => malformed += 1,
                }
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {
                hp.handle(Instant::now(), Event::Timeout, &mut rng);
            }
        }
    };
    let opened = sockets.list.len() as u16;
    let result = match result {
        Ok((socket, remote, rtt)) => match sockets.list.get(usize::from(socket)) {
            Some(s) => match s.local_addr() {
                Ok(a) => Ok(Punched {
                    local_port: a.port(),
                    remote,
                    rtt,
                }),
                Err(_) => Err(FailReason::Timeout),
            },
            None => Err(FailReason::Timeout),
        },
        Err(r) => Err(r),
    };
    sockets.close().await;
    Outcome {
        result,
        counters: hp.counters().clone(),
        sockets: opened,
        malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peermesh_base::NatMapping;
    use peermesh_traversal::hole_punch::plan::{self, Offer};
    use peermesh_traversal::hole_punch::Role;

    /// A loopback socket and its offer (no NAT: the endpoint is the socket's).
    async fn side() -> (UdpSocket, Offer) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let offer = Offer {
            endpoint: socket.local_addr().unwrap(),
            mapping: Some(NatMapping::EndpointIndependent),
        };
        (socket, offer)
    }

    /// Two attempts on loopback find each other and free the winning port.
    #[tokio::test]
    async fn two_sides_on_loopback_agree_on_one_pair() {
        let (a, oa) = side().await;
        let (b, ob) = side().await;
        let start = Instant::now();
        let cfg = Config {
            // Loopback has no NAT to open.
            null_ttl: None,
            ..Config::default()
        };
        let ia = plan::instruction(Role::Initiator, 42, start, &oa, &ob).unwrap();
        let ib = plan::instruction(Role::Responder, 42, start, &ob, &oa).unwrap();
        let (ra, rb) = tokio::join!(run(a, cfg.clone(), ia), run(b, cfg, ib));
        let pa = ra.result.expect("initiator got through");
        let pb = rb.result.expect("responder got through");
        assert_eq!(pa.remote, ob.endpoint);
        assert_eq!(pb.remote, oa.endpoint);
        assert_eq!(pa.local_port, oa.endpoint.port());
        assert!(pa.rtt.is_some());
        assert!(ra.counters.total_packets >= 2);
        // Closed: the port can be bound again (for QUIC).
        UdpSocket::bind(("127.0.0.1", pa.local_port))
            .await
            .expect("the winning port is free again");
    }

    /// A wrong secret never finishes an attempt; it times out.
    #[tokio::test]
    async fn probes_with_another_secret_are_ignored() {
        let (a, oa) = side().await;
        let (b, ob) = side().await;
        let start = Instant::now();
        let cfg = Config {
            null_ttl: None,
            attempt_timeout: Duration::from_millis(600),
            ..Config::default()
        };
        let ia = plan::instruction(Role::Initiator, 1, start, &oa, &ob).unwrap();
        let ib = plan::instruction(Role::Responder, 2, start, &ob, &oa).unwrap();
        let (ra, rb) = tokio::join!(run(a, cfg.clone(), ia), run(b, cfg, ib));
        assert_eq!(ra.result, Err(FailReason::Timeout));
        assert_eq!(rb.result, Err(FailReason::Timeout));
        assert!(ra.counters.ignored > 0 || rb.counters.ignored > 0);
    }

    /// Garbage on a probe socket is counted and changes nothing.
    #[tokio::test]
    async fn garbage_is_counted_not_fatal() {
        let (a, oa) = side().await;
        let port = oa.endpoint.port();
        let (peer, op) = side().await;
        let cfg = Config {
            null_ttl: None,
            attempt_timeout: Duration::from_millis(400),
            ..Config::default()
        };
        let ia = plan::instruction(Role::Responder, 9, Instant::now(), &oa, &op).unwrap();
        let attempt = tokio::spawn(run(a, cfg, ia));
        for junk in [&b"PMHP"[..], &[0u8; 21][..], &[0xff; 63][..], &[][..]] {
            peer.send_to(junk, ("127.0.0.1", port)).await.unwrap();
        }
        let out = attempt.await.unwrap();
        assert_eq!(out.result, Err(FailReason::Timeout));
        assert_eq!(out.malformed, 4);
    }
}
