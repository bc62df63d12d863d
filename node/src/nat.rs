//! NAT behaviour discovery on real sockets: the async shell around the
//! sans-IO [`Discovery`] machine of `peermesh-traversal`, and one-shot STUN
//! probes for port prediction.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peermesh_base::NatBehavior;
use peermesh_traversal::nat_discovery::Discovery;
use peermesh_traversal::stun::{self, Message, Request};

/// One STUN probe: tries, and the wait for an answer to each. Three tries
/// 100 ms apart ride out a lost datagram on a LAN-to-server path without
/// holding a punch up for long (the probe runs just before one).
const PROBE_TRIES: u32 = 3;
const PROBE_WAIT: Duration = Duration::from_millis(100);

/// Runs discovery against `primary` from fresh UDP sockets (the NAT treats
/// them like the mesh's own socket: same host, same rules): the mapping
/// verdict goes to `early` as soon as it is known (a few round trips), the
/// full verdict is returned once the filtering tests are done.
pub async fn run_with_early(
    primary: SocketAddr,
    early: tokio::sync::oneshot::Sender<NatBehavior>,
) -> std::io::Result<NatBehavior> {
    let fast = async {
        if let Ok(m) = drive(primary, true).await {
            let _ = early.send(m);
        }
    };
    let (_, full) = tokio::join!(fast, drive(primary, false));
    full
}

async fn drive(primary: SocketAddr, mapping_only: bool) -> std::io::Result<NatBehavior> {
    let bind: SocketAddr = if primary.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(bind).await?;
    // The source address the route to the server picks: equal to the
    // public endpoint only when no NAT is in the way.
    let local = {
        let probe = std::net::UdpSocket::bind(bind)?;
        probe.connect(primary)?;
        SocketAddr::new(probe.local_addr()?.ip(), socket.local_addr()?.port())
    };
    let mut d = if mapping_only {
        Discovery::mapping_only(primary, Some(local), Instant::now())
    } else {
        Discovery::new(primary, Some(local), Instant::now())
    };
    let mut buf = [0u8; stun::MAX_MESSAGE + 1];
    loop {
        let now = Instant::now();
        d.handle_timeout(now);
        while let Some((to, bytes)) = d.poll_transmit(now) {
            if let Err(e) = socket.send_to(&bytes, to).await {
                tracing::debug!(%to, error = %e, "NAT discovery send");
            }
        }
        if let Some(r) = d.result() {
            return Ok(r.clone());
        }
        let Some(deadline) = d.poll_timeout() else {
            continue;
        };
        tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, from)) => d.handle_datagram(from, &buf[..n], Instant::now()),
                // ICMP unreachable from a closed port: as good as silence.
                Err(e) => tracing::debug!(error = %e, "NAT discovery receive"),
            },
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
}

/// One Binding request from a fresh socket: the public endpoint its new
/// mapping got. On a sequential NAT this is the counter's position right
/// now: the next new mapping (the punch's) will be `stride` after it.
pub async fn probe(primary: SocketAddr) -> std::io::Result<Option<SocketAddr>> {
    let bind: SocketAddr = if primary.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(bind).await?;
    probe_from(&socket, primary).await
}

/// The public endpoint of `socket` as the STUN server at `primary` sees it
/// ([`PROBE_TRIES`] tries, [`PROBE_WAIT`] each); `None` when it does not answer.
pub async fn probe_from(
    socket: &tokio::net::UdpSocket,
    primary: SocketAddr,
) -> std::io::Result<Option<SocketAddr>> {
    let req = Request {
        txid: rand::random(),
        change_ip: false,
        change_port: false,
    };
    let mut buf = [0u8; stun::MAX_MESSAGE + 1];
    for _ in 0..PROBE_TRIES {
        socket.send_to(&req.encode(), primary).await?;
        let deadline = tokio::time::Instant::now() + PROBE_WAIT;
        while let Ok(r) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
            let Ok((n, _)) = r else { break };
            if let Ok(Message::Response(resp)) = stun::decode(&buf[..n]) {
                if resp.txid == req.txid {
                    return Ok(Some(resp.mapped));
                }
            }
        }
    }
    Ok(None)
}
