//! NAT behaviour discovery (seed 003, in the manner of RFC 5780), sans-IO.
//!
//! The control server answers STUN Binding requests on two addresses and two
//! ports. From one local socket the node asks:
//!
//! 1. the primary endpoint: its mapping seen from there (no answer at all:
//!    UDP is blocked);
//! 2. the alternate address, then the alternate address and port, then the
//!    primary address and alternate port: the same mapping everywhere is
//!    endpoint-independent mapping; one per address is address-dependent;
//!    one per endpoint is symmetric, and the steps between the mapped ports
//!    tell sequential (with its stride, the input of port prediction) from
//!    random;
//! 3. before 2 (an endpoint-independent mapping would let the other
//!    endpoints in once we sent to them): the primary endpoint again,
//!    asking for the answer from the other address and port, then from the
//!    other port only; which of those come through tells the filtering.
//!
//! Every request is sent up to [`TRIES`] times, [`RETRY`] apart; the machine
//! takes datagrams and time and gives datagrams, so it is tested on the
//! simulated NATs of [`crate::netsim`] with a virtual clock.

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peermesh_proto::stun::{self, Message, Request, TransactionId};
use serde::{Deserialize, Serialize};

/// Tries per request, and the wait between them.
pub const TRIES: u32 = 5;
pub const RETRY: Duration = Duration::from_millis(150);
/// A stride larger than this is taken as random allocation.
pub const MAX_STRIDE: i32 = 64;

/// How the NAT maps an inside endpoint to public ones (RFC 4787 §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Mapping {
    /// One public endpoint for every destination (cone NATs; or no NAT).
    EndpointIndependent,
    /// One per destination address.
    AddressDependent,
    /// One per destination endpoint, each `stride` ports after the last:
    /// predictable.
    Sequential { stride: i32 },
    /// One per destination endpoint, ports with no pattern.
    Random,
}

/// Which inbound packets a mapping lets in (RFC 4787 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filtering {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

/// What the node learned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatBehavior {
    /// Whether any answer came back.
    pub udp: bool,
    /// The public endpoint towards the primary server address.
    pub public: Option<SocketAddr>,
    /// Whether the public endpoint is the local one (no NAT in the way).
    pub no_nat: bool,
    pub mapping: Option<Mapping>,
    pub filtering: Option<Filtering>,
    /// Mapped ports in the order asked (primary, alt address, alt both,
    /// alt port), for the record.
    pub mapped_ports: Vec<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Test {
    Primary,
    AltIp,
    AltBoth,
    AltPort,
    FilterBoth,
    FilterPort,
}

/// The machine. `primary` is the server's main endpoint; the alternate
/// address and port come from its first answer (OTHER-ADDRESS).
pub struct Discovery {
    primary: SocketAddr,
    local: Option<SocketAddr>,
    other: Option<SocketAddr>,
    test: Option<Test>,
    txid: TransactionId,
    tries: u32,
    next_send: Instant,
    seq: u64,
    mapped: Vec<(Test, SocketAddr)>,
    result: Option<NatBehavior>,
    /// Datagrams that were not an answer we wait for.
    pub ignored: u64,
    /// Only the mapping tests: a few round trips, no waiting for answers
    /// that a filtering NAT drops (what port prediction needs first).
    mapping_only: bool,
}

impl Discovery {
    /// The mapping tests alone (their `filtering` stays `None`). Run from
    /// its own socket beside a full [`Discovery`], it answers in a few
    /// round trips where the filtering tests wait out their retries.
    pub fn mapping_only(primary: SocketAddr, local: Option<SocketAddr>, now: Instant) -> Self {
        let mut d = Self::new(primary, local, now);
        d.mapping_only = true;
        d
    }

    /// `local`: the socket's own address, if known, to tell "no NAT".
    pub fn new(primary: SocketAddr, local: Option<SocketAddr>, now: Instant) -> Self {
        let mut d = Self {
            primary,
            local,
            other: None,
            test: None,
            txid: [0; 12],
            tries: 0,
            next_send: now,
            seq: 0,
            mapped: Vec::new(),
            result: None,
            ignored: 0,
            mapping_only: false,
        };
        d.start(Test::Primary, now);
        d
    }

    pub fn result(&self) -> Option<&NatBehavior> {
        self.result.as_ref()
    }

    fn start(&mut self, t: Test, now: Instant) {
        self.seq += 1;
        self.test = Some(t);
        // Unpredictable enough to tell our answers from stray ones; not a secret.
        let r: u64 = rand::random();
        self.txid[..8].copy_from_slice(&r.to_be_bytes());
        self.txid[8..].copy_from_slice(&(self.seq as u32).to_be_bytes());
        self.tries = 0;
        self.next_send = now;
    }

    fn target(&self, t: Test) -> Option<(SocketAddr, bool, bool)> {
        let other = self.other;
        Some(match t {
            Test::Primary => (self.primary, false, false),
            Test::AltIp => (
                SocketAddr::new(other?.ip(), self.primary.port()),
                false,
                false,
            ),
            Test::AltBoth => (other?, false, false),
            Test::AltPort => (
                SocketAddr::new(self.primary.ip(), other?.port()),
                false,
                false,
            ),
            Test::FilterBoth => (self.primary, true, true),
            Test::FilterPort => (self.primary, false, true),
        })
    }

    /// The next datagram to send, when one is due.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        let t = self.test?;
        if now < self.next_send || self.tries >= TRIES {
            return None;
        }
        let (to, change_ip, change_port) = self.target(t)?;
        self.tries += 1;
        self.next_send = now + RETRY;
        let req = Request {
            txid: self.txid,
            change_ip,
            change_port,
        };
        Some((to, req.encode()))
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.test?;
        Some(self.next_send)
    }

    /// Gives up on the current test once its last try has had its time.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(t) = self.test else { return };
        if self.tries < TRIES || now < self.next_send {
            return;
        }
        self.on_answer(t, None, now);
    }

    /// A datagram from `from`; anything that is not the awaited answer is
    /// counted and dropped.
    pub fn handle_datagram(&mut self, from: SocketAddr, bytes: &[u8], now: Instant) {
        let Some(t) = self.test else {
            self.ignored += 1;
            return;
        };
        let resp = match stun::decode(bytes) {
            Ok(Message::Response(r)) if r.txid == self.txid => r,
            _ => {
                self.ignored += 1;
                return;
            }
        };
        if t == Test::Primary {
            self.other = resp.other;
        }
        let _ = from;
        self.on_answer(t, Some(resp.mapped), now);
    }

    fn on_answer(&mut self, t: Test, mapped: Option<SocketAddr>, now: Instant) {
        if let Some(m) = mapped {
            self.mapped.push((t, m));
        }
        // Filtering first: once we have sent to the other endpoints, an
        // endpoint-independent mapping would let their answers in anyway.
        let next = match (t, mapped) {
            (Test::Primary, None) => {
                self.finish(false);
                return;
            }
            // A server without an alternate endpoint: mapping and filtering
            // stay unknown beyond "UDP works".
            (Test::Primary, Some(_)) if self.other.is_none() => {
                self.finish(true);
                return;
            }
            (Test::Primary, Some(_)) if self.mapping_only => Test::AltIp,
            (Test::Primary, Some(_)) => Test::FilterBoth,
            (Test::FilterBoth, Some(_)) => Test::AltIp,
            (Test::FilterBoth, None) => Test::FilterPort,
            (Test::FilterPort, _) => Test::AltIp,
            (Test::AltIp, m) if m.is_some() && m == self.port_of(Test::Primary) => {
                self.finish(true);
                return;
            }
            (Test::AltIp, _) => Test::AltBoth,
            (Test::AltBoth, _) => Test::AltPort,
            (Test::AltPort, _) => {
                self.finish(true);
                return;
            }
        };
        self.start(next, now);
    }

    fn port_of(&self, t: Test) -> Option<SocketAddr> {
        self.mapped.iter().find(|(x, _)| *x == t).map(|(_, a)| *a)
    }

    fn finish(&mut self, udp: bool) {
        self.test = None;
        let public = self.port_of(Test::Primary);
        let (m1, m2, m3, m4) = (
            public,
            self.port_of(Test::AltIp),
            self.port_of(Test::AltBoth),
            self.port_of(Test::AltPort),
        );
        let mapping = match (m1, m2, m3) {
            (Some(a), Some(b), _) if a == b => Some(Mapping::EndpointIndependent),
            (Some(_), Some(b), Some(c)) if b == c => Some(Mapping::AddressDependent),
            (Some(a), Some(b), Some(c)) => {
                let mut steps = vec![
                    i32::from(b.port()) - i32::from(a.port()),
                    i32::from(c.port()) - i32::from(b.port()),
                ];
                if let Some(d) = m4 {
                    steps.push(i32::from(d.port()) - i32::from(c.port()));
                }
                // Other flows from behind the same NAT may take ports
                // between ours (churn): small steps of one sign are
                // sequential, the smallest being the stride.
                let small = |x: &i32| *x != 0 && x.abs() <= MAX_STRIDE;
                let one_sign = steps.iter().all(|x| *x > 0) || steps.iter().all(|x| *x < 0);
                if one_sign && steps.iter().all(small) {
                    let stride = *steps.iter().min_by_key(|x| x.abs()).expect("not empty");
                    Some(Mapping::Sequential { stride })
                } else {
                    Some(Mapping::Random)
                }
            }
            _ => None,
        };
        let heard = |t| self.port_of(t).is_some();
        let filtering = if !udp || self.other.is_none() || self.mapping_only {
            None
        } else if heard(Test::FilterBoth) {
            Some(Filtering::EndpointIndependent)
        } else if heard(Test::FilterPort) {
            Some(Filtering::AddressDependent)
        } else {
            Some(Filtering::AddressAndPortDependent)
        };
        self.result = Some(NatBehavior {
            udp,
            public,
            no_nat: public.is_some() && public == self.local,
            mapping,
            filtering,
            mapped_ports: self.mapped.iter().map(|(_, a)| a.port()).collect(),
        });
    }
}

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

/// Runs the whole discovery from one fresh socket.
pub async fn run(primary: SocketAddr) -> std::io::Result<NatBehavior> {
    drive(primary, false).await
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

impl NatBehavior {
    /// Short words for `meshnode status`: "port-restricted cone",
    /// "symmetric (sequential, stride 1)", …
    pub fn describe(&self) -> String {
        if !self.udp {
            return "UDP blocked".into();
        }
        if self.no_nat {
            return "no NAT".into();
        }
        let mapping = match self.mapping {
            Some(Mapping::EndpointIndependent) => match self.filtering {
                Some(Filtering::EndpointIndependent) => "full cone".to_string(),
                Some(Filtering::AddressDependent) => "address-restricted cone".to_string(),
                Some(Filtering::AddressAndPortDependent) => "port-restricted cone".to_string(),
                None => "cone".to_string(),
            },
            Some(Mapping::AddressDependent) => "address-dependent mapping".to_string(),
            Some(Mapping::Sequential { stride }) => {
                format!("symmetric (sequential, stride {stride})")
            }
            Some(Mapping::Random) => "symmetric (random)".to_string(),
            None => "unknown".to_string(),
        };
        mapping
    }

    /// As the control server keeps it.
    pub fn to_proto(&self) -> peermesh_proto::api::NatReport {
        let (mapping, stride) = match self.mapping {
            Some(Mapping::EndpointIndependent) => ("endpoint_independent", 0),
            Some(Mapping::AddressDependent) => ("address_dependent", 0),
            Some(Mapping::Sequential { stride }) => ("sequential", stride),
            Some(Mapping::Random) => ("random", 0),
            None => ("", 0),
        };
        let filtering = match self.filtering {
            Some(Filtering::EndpointIndependent) => "endpoint_independent",
            Some(Filtering::AddressDependent) => "address_dependent",
            Some(Filtering::AddressAndPortDependent) => "address_and_port_dependent",
            None => "",
        };
        peermesh_proto::api::NatReport {
            udp: self.udp,
            public_endpoint: self.public.map(|p| p.to_string()).unwrap_or_default(),
            no_nat: self.no_nat,
            mapping: mapping.into(),
            port_stride: stride,
            filtering: filtering.into(),
            measured_ms: 0,
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
/// (three tries, 100 ms each); `None` when it does not answer.
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
    for _ in 0..3 {
        socket.send_to(&req.encode(), primary).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
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

/// Port prediction (seed 003): the public endpoints the next `window` new
/// mappings of a sequential NAT will get, after the one at `last`, nearest
/// first.
pub fn predict(last: SocketAddr, stride: i32, window: usize) -> Vec<SocketAddr> {
    (1..=window as i32)
        .filter_map(|k| {
            let port = i32::from(last.port()) + stride * k;
            u16::try_from(port)
                .ok()
                .filter(|p| *p != 0)
                .map(|p| SocketAddr::new(last.ip(), p))
        })
        .collect()
}

#[cfg(test)]
mod predict_tests {
    use super::*;

    #[test]
    fn predictions_follow_the_stride_and_stay_in_range() {
        let last: SocketAddr = "203.0.113.9:20007".parse().unwrap();
        let p = predict(last, 1, 3);
        assert_eq!(
            p.iter().map(|a| a.port()).collect::<Vec<_>>(),
            vec![20008, 20009, 20010]
        );
        assert!(p.iter().all(|a| a.ip() == last.ip()));
        let p = predict("203.0.113.9:65530".parse().unwrap(), 4, 4);
        assert_eq!(p.iter().map(|a| a.port()).collect::<Vec<_>>(), vec![65534]);
        let p = predict("203.0.113.9:10".parse().unwrap(), -5, 4);
        assert_eq!(p.iter().map(|a| a.port()).collect::<Vec<_>>(), vec![5]);
    }
}
