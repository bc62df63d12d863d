//! The control server's STUN side (seed 003's registration server with two
//! addresses and two ports; RFC 5780 behaviour discovery): four UDP sockets,
//! (primary, alternate) address × (primary, alternate) port. A Binding
//! request is answered with where its source was seen from, from the socket
//! that its CHANGE-REQUEST asks for, and with the other address and port so
//! the node can address the rest of its tests.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use peermesh_traversal::stun::{self, Message, Response};
use tokio::net::UdpSocket;

#[derive(Debug, thiserror::Error)]
pub enum StunServeError {
    #[error("STUN: the two addresses must differ in address and in port ({primary}, {alternate})")]
    NotDistinct {
        primary: SocketAddr,
        alternate: SocketAddr,
    },
    #[error("STUN: binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Counters, for logs and tests.
#[derive(Default, Debug)]
pub struct StunStats {
    pub answered: AtomicU64,
    pub malformed: AtomicU64,
    /// Requests over the per-address rate limit, dropped unanswered.
    pub limited: AtomicU64,
}

pub struct StunServer {
    /// [primary ip][primary port, alternate port], then the alternate ip.
    sockets: [[Arc<UdpSocket>; 2]; 2],
    ips: [IpAddr; 2],
    ports: [u16; 2],
    pub stats: Arc<StunStats>,
    rates: Option<Arc<crate::ratelimit::RateLimiters>>,
}

impl StunServer {
    /// Binds the four sockets: `primary` and `alternate` must differ in both
    /// address and port (the alternate port is used on both addresses).
    pub async fn bind(primary: SocketAddr, alternate: SocketAddr) -> Result<Self, StunServeError> {
        if primary.ip() == alternate.ip() || primary.port() == alternate.port() {
            return Err(StunServeError::NotDistinct { primary, alternate });
        }
        let ips = [primary.ip(), alternate.ip()];
        let ports = [primary.port(), alternate.port()];
        let bind = |ip: IpAddr, port: u16| async move {
            let addr = SocketAddr::new(ip, port);
            UdpSocket::bind(addr)
                .await
                .map(Arc::new)
                .map_err(|source| StunServeError::Bind { addr, source })
        };
        let sockets = [
            [bind(ips[0], ports[0]).await?, bind(ips[0], ports[1]).await?],
            [bind(ips[1], ports[0]).await?, bind(ips[1], ports[1]).await?],
        ];
        Ok(Self {
            sockets,
            ips,
            ports,
            stats: Arc::default(),
            rates: None,
        })
    }

    /// Drops requests over the STUN rate limit of `rates` (per address).
    pub fn with_rate_limits(mut self, rates: Arc<crate::ratelimit::RateLimiters>) -> Self {
        self.rates = Some(rates);
        self
    }

    /// Where nodes send their first request, and the other endpoint.
    pub fn endpoints(&self) -> (SocketAddr, SocketAddr) {
        (
            SocketAddr::new(self.ips[0], self.ports[0]),
            SocketAddr::new(self.ips[1], self.ports[1]),
        )
    }

    /// Serves until the returned tasks are aborted (they live as long as
    /// the process otherwise).
    pub fn spawn(self) -> Vec<tokio::task::JoinHandle<()>> {
        let me = Arc::new(self);
        let mut tasks = Vec::new();
        for i in 0..2 {
            for j in 0..2 {
                let me = me.clone();
                tasks.push(tokio::spawn(async move { me.serve_socket(i, j).await }));
            }
        }
        tasks
    }

    async fn serve_socket(&self, i: usize, j: usize) {
        let socket = &self.sockets[i][j];
        let mut buf = [0u8; stun::MAX_MESSAGE + 1];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors surface here on Linux; nothing to do.
                    tracing::debug!(error = %e, "STUN receive");
                    continue;
                }
            };
            let req = match stun::decode(&buf[..n]) {
                Ok(Message::Request(r)) => r,
                Ok(Message::Response(_)) | Err(_) => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%from, bytes = n, "STUN: dropped a datagram that is not a request");
                    continue;
                }
            };
            if let Some(rates) = &self.rates {
                if crate::ratelimit::check(&rates.stun, &from.ip()).is_err() {
                    // UDP has no error to answer with that a client would
                    // act on; it retries later like after a loss.
                    self.stats.limited.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            let (ri, rj) = (
                if req.change_ip { 1 - i } else { i },
                if req.change_port { 1 - j } else { j },
            );
            let resp = Response {
                txid: req.txid,
                mapped: from,
                origin: Some(SocketAddr::new(self.ips[ri], self.ports[rj])),
                other: Some(SocketAddr::new(self.ips[1 - i], self.ports[1 - j])),
            };
            match self.sockets[ri][rj].send_to(&resp.encode(), from).await {
                Ok(_) => {
                    self.stats.answered.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!(%from, error = %e, "STUN send"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peermesh_traversal::stun::Request;
    use std::time::Duration;

    async fn ask(
        client: &UdpSocket,
        to: SocketAddr,
        req: Request,
    ) -> Option<(SocketAddr, Response)> {
        client.send_to(&req.encode(), to).await.unwrap();
        let mut buf = [0u8; 600];
        let (n, from) = tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        match stun::decode(&buf[..n]) {
            Ok(Message::Response(r)) => Some((from, r)),
            _ => None,
        }
    }

    #[tokio::test]
    async fn answers_from_the_socket_the_request_asks_for() {
        // 127.0.0.1 and 127.0.0.2 are both loopback on Linux.
        let server = StunServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.2:0".parse().unwrap(),
        )
        .await;
        // Port 0 twice is "the same port": refused.
        assert!(matches!(server, Err(StunServeError::NotDistinct { .. })));
        let p1 = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p2 = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let primary: SocketAddr = format!("127.0.0.1:{p1}").parse().unwrap();
        let alternate: SocketAddr = format!("127.0.0.2:{p2}").parse().unwrap();
        let server = StunServer::bind(primary, alternate).await.unwrap();
        let stats = server.stats.clone();
        let tasks = server.spawn();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let me = client.local_addr().unwrap();
        for (change_ip, change_port, want_from) in [
            (false, false, primary),
            (true, true, alternate),
            (false, true, SocketAddr::new(primary.ip(), p2)),
            (true, false, SocketAddr::new(alternate.ip(), p1)),
        ] {
            let req = Request {
                txid: [
                    change_ip as u8,
                    change_port as u8,
                    9,
                    9,
                    9,
                    9,
                    9,
                    9,
                    9,
                    9,
                    9,
                    9,
                ],
                change_ip,
                change_port,
            };
            let (from, resp) = ask(&client, primary, req).await.expect("an answer");
            assert_eq!(from, want_from);
            assert_eq!(resp.origin, Some(want_from));
            assert_eq!(resp.mapped, me);
            assert_eq!(resp.txid, req.txid);
            assert_eq!(resp.other, Some(alternate));
        }
        // Garbage is counted, not answered.
        client.send_to(b"hello", primary).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(stats.malformed.load(Ordering::Relaxed), 1);
        assert_eq!(stats.answered.load(Ordering::Relaxed), 4);
        for t in tasks {
            t.abort();
        }
    }
}
