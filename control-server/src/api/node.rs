//! NodeControl: what mesh nodes call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use peermesh_proto::api::{
    network_map_update::Kind, node_control_server::NodeControl, AuthenticateRequest,
    AuthenticateResponse, GetServerIdentityRequest, JoinRequest, JoinResponse, LeaveRequest,
    LeaveResponse, NatReport, NetworkMapUpdate, PunchInstruction, PunchReadyRequest,
    PunchReadyResponse, ReportLinksRequest, ReportLinksResponse, ReportNatResponse,
    RequestPunchRequest, RequestPunchResponse, ServerIdentity, SignedMapUpdate, StunEndpoints,
    UpdateEndpointsRequest, UpdateEndpointsResponse, WatchNetworkMapRequest,
};
use peermesh_proto::signing;
use prost::Message;
use tonic::{Request, Response, Status};

use super::stream::{self, Feed, Step, UpdateStream};
use crate::error::ControlError;
use crate::hub::{GroupEvent, MapParts};
use crate::ratelimit::{self, RateLimiters};
use crate::registry::{NodeCtx, Registry, Subscription, WatchGuard};
use crate::rendezvous::{MailboxGuard, Rendezvous};
use crate::tls::{ConnInfo, KeyStore, StreamGuard};

/// Shortest and longest watch nonce: 16 bytes of randomness make a repeat
/// hopeless; 64 bound what a client makes the server sign over.
const NONCE_BYTES: std::ops::RangeInclusive<usize> = 16..=64;

pub struct NodeApi {
    registry: Arc<Registry>,
    rendezvous: Arc<Rendezvous>,
    stun: Option<StunEndpoints>,
    keys: Arc<KeyStore>,
    rates: Arc<RateLimiters>,
    watches: Arc<WatchCounts>,
}

/// Open watch streams per node, capped.
pub struct WatchCounts {
    max: usize,
    open: Mutex<HashMap<String, usize>>,
}

impl WatchCounts {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Counts one more stream of `who`, or refuses it past the cap.
    pub fn open(self: &Arc<Self>, who: &str, what: &str) -> Result<WatchSlot, ControlError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(who.to_string()).or_insert(0);
        if *n >= self.max {
            return Err(ControlError::ResourceExhausted(format!(
                "{what} already holds {} watch streams, the limit per {what}; close one first",
                self.max
            )));
        }
        *n += 1;
        Ok(WatchSlot {
            counts: self.clone(),
            who: who.to_string(),
        })
    }
}

/// One counted watch stream; see [`WatchCounts::open`].
pub struct WatchSlot {
    counts: Arc<WatchCounts>,
    who: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.who) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.who);
            }
        }
    }
}

/// The connection a request came on (every connection the server accepts
/// has one; a request without is refused).
pub(crate) fn conn<T>(req: &Request<T>) -> Result<&ConnInfo, Status> {
    req.extensions()
        .get::<ConnInfo>()
        .ok_or_else(|| Status::internal("request without connection information"))
}

impl NodeApi {
    pub fn new(
        registry: Arc<Registry>,
        keys: Arc<KeyStore>,
        rates: Arc<RateLimiters>,
        max_watches: usize,
    ) -> Self {
        Self::with_punch_timeout(
            registry,
            keys,
            rates,
            max_watches,
            crate::rendezvous::DEFAULT_TIMEOUT,
        )
    }

    /// With how long a punch caller waits for the callee.
    pub fn with_punch_timeout(
        registry: Arc<Registry>,
        keys: Arc<KeyStore>,
        rates: Arc<RateLimiters>,
        max_watches: usize,
        timeout: std::time::Duration,
    ) -> Self {
        Self {
            registry,
            rendezvous: Rendezvous::new(timeout),
            stun: None,
            keys,
            rates,
            watches: WatchCounts::new(max_watches),
        }
    }

    /// Tells every node where NAT behaviour discovery runs (in its full maps).
    pub fn with_stun(
        mut self,
        primary: std::net::SocketAddr,
        alternate: std::net::SocketAddr,
    ) -> Self {
        self.stun = Some(StunEndpoints {
            primary: primary.to_string(),
            alternate: alternate.to_string(),
        });
        self
    }

    fn ctx<T>(&self, req: &Request<T>) -> Result<NodeCtx, Status> {
        let credential = super::bearer(req.metadata())?;
        Ok(self.registry.authorize(credential)?)
    }
}

#[tonic::async_trait]
impl NodeControl for NodeApi {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        ratelimit::check(&self.rates.join, &conn(&req)?.remote.ip())?;
        let mut resp = self.registry.join(req.get_ref()).await?;
        resp.server_identity = Some(self.keys.identity());
        Ok(Response::new(resp))
    }

    async fn authenticate(
        &self,
        req: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        ratelimit::check(&self.rates.authenticate, &conn(&req)?.remote.ip())?;
        let mut resp = self.registry.authenticate(req.get_ref()).await?;
        resp.server_identity = Some(self.keys.identity());
        Ok(Response::new(resp))
    }

    async fn get_server_identity(
        &self,
        _req: Request<GetServerIdentityRequest>,
    ) -> Result<Response<ServerIdentity>, Status> {
        Ok(Response::new(self.keys.identity()))
    }

    type WatchNetworkMapStream = UpdateStream<SignedMapUpdate>;

    async fn watch_network_map(
        &self,
        req: Request<WatchNetworkMapRequest>,
    ) -> Result<Response<Self::WatchNetworkMapStream>, Status> {
        let ctx = self.ctx(&req)?;
        let nonce = req.get_ref().nonce.clone();
        if !NONCE_BYTES.contains(&nonce.len()) {
            return Err(Status::invalid_argument(format!(
                "nonce of {} bytes; it must be {} to {} random bytes",
                nonce.len(),
                NONCE_BYTES.start(),
                NONCE_BYTES.end()
            )));
        }
        let slot = self.watches.open(&ctx.node_id, "node")?;
        let stream_guard = conn(&req)?.activity.stream();
        let Subscription {
            first,
            parts,
            version,
            events,
            guard,
        } = self.registry.watch(&ctx)?;
        let (punches, mailbox) = self.rendezvous.mailbox(&ctx.node_id);
        let group = self.registry.group_hub(&ctx.group)?;
        let feed = WatchFeed {
            registry: self.registry.clone(),
            keys: self.keys.clone(),
            server_id: self.registry.server_id().to_string(),
            epoch: group.epoch().to_vec(),
            ctx,
            nonce,
            version,
            stun: self.stun.clone(),
            _mailbox: mailbox,
            _watch: guard,
            _slot: slot,
            _stream: stream_guard,
        };
        let first = feed.full_map(first, &parts);
        Ok(Response::new(stream::spawn(
            feed,
            first,
            events,
            Some(punches),
        )))
    }

    async fn update_endpoints(
        &self,
        req: Request<UpdateEndpointsRequest>,
    ) -> Result<Response<UpdateEndpointsResponse>, Status> {
        let ctx = self.ctx(&req)?;
        ratelimit::check(&self.rates.update_endpoints, &ctx.node_id)?;
        self.registry
            .update_endpoints(&ctx, &req.get_ref().addresses)
            .await?;
        Ok(Response::new(UpdateEndpointsResponse {}))
    }

    async fn report_links(
        &self,
        req: Request<ReportLinksRequest>,
    ) -> Result<Response<ReportLinksResponse>, Status> {
        let ctx = self.ctx(&req)?;
        self.registry.report_links(&ctx, req.into_inner().links)?;
        Ok(Response::new(ReportLinksResponse {}))
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        let ctx = self.ctx(&req)?;
        self.registry.leave(&ctx).await?;
        Ok(Response::new(LeaveResponse {}))
    }

    async fn request_punch(
        &self,
        req: Request<RequestPunchRequest>,
    ) -> Result<Response<RequestPunchResponse>, Status> {
        let ctx = self.ctx(&req)?;
        ratelimit::check(&self.rates.request_punch, &ctx.node_id)?;
        let observed = conn(&req)?.remote.ip();
        Ok(Response::new(
            self.rendezvous
                .request(&self.registry, &ctx, req.get_ref(), observed)
                .await?,
        ))
    }

    async fn report_nat(
        &self,
        req: Request<NatReport>,
    ) -> Result<Response<ReportNatResponse>, Status> {
        let ctx = self.ctx(&req)?;
        self.registry.report_nat(&ctx, req.into_inner()).await?;
        Ok(Response::new(ReportNatResponse {}))
    }

    async fn punch_ready(
        &self,
        req: Request<PunchReadyRequest>,
    ) -> Result<Response<PunchReadyResponse>, Status> {
        let ctx = self.ctx(&req)?;
        let observed = conn(&req)?.remote.ip();
        self.rendezvous.ready(&ctx, req.get_ref(), observed)?;
        Ok(Response::new(PunchReadyResponse {}))
    }
}

/// Feeds one watcher: the full map, then every later change of its group,
/// and the punch instructions for it. Ends with PERMISSION_DENIED when the
/// watcher itself is removed.
struct WatchFeed {
    registry: Arc<Registry>,
    keys: Arc<KeyStore>,
    server_id: String,
    /// The group feed's run, which deltas are signed over.
    epoch: Vec<u8>,
    ctx: NodeCtx,
    /// The watcher's nonce, which full maps and punches are signed over.
    nonce: Vec<u8>,
    /// The version the watcher's map is at.
    version: u64,
    stun: Option<StunEndpoints>,
    // Dropped in this order when the stream ends: the punch mailbox, then
    // the watch (the node goes offline with its last stream), the slot
    // under the per-node cap, the connection's stream count.
    _mailbox: MailboxGuard,
    _watch: WatchGuard,
    _slot: WatchSlot,
    _stream: StreamGuard,
}

impl WatchFeed {
    /// Full maps carry the STUN endpoints and the server key; the registry
    /// knows neither.
    fn with_stun(&self, mut u: NetworkMapUpdate) -> NetworkMapUpdate {
        if let Some(Kind::Full(m)) = &mut u.kind {
            m.stun = self.stun.clone();
            m.server_identity = Some(self.keys.identity());
        }
        u
    }

    /// A full map as the stream sends it: the head signed for this watcher
    /// (it covers the parts' digest), then the shared parts, unsigned.
    fn full_map(&self, head: NetworkMapUpdate, parts: &MapParts) -> Vec<SignedMapUpdate> {
        let mut out = Vec::with_capacity(1 + parts.parts.len());
        out.push(self.personal(self.with_stun(head)));
        out.extend(parts.parts.iter().map(|p| SignedMapUpdate {
            update: p.clone(),
            signature: None,
        }));
        out
    }

    /// `u` signed for this watcher alone (a full map, a punch).
    fn personal(&self, u: NetworkMapUpdate) -> SignedMapUpdate {
        let update = Bytes::from(u.encode_to_vec());
        let payload =
            signing::map_personal_payload(&self.server_id, &self.ctx.node_id, &self.nonce, &update);
        SignedMapUpdate {
            signature: Some(self.keys.sign(&payload)),
            update,
        }
    }

    /// A change of the group, signed once for all its watchers.
    fn delta(&self, ev: &GroupEvent) -> SignedMapUpdate {
        ev.signed()
            .get_or_init(|| {
                let update = Bytes::from(ev.to_update().encode_to_vec());
                let payload = signing::map_delta_payload(
                    &self.server_id,
                    &self.ctx.group,
                    &self.epoch,
                    &update,
                );
                SignedMapUpdate {
                    signature: Some(self.keys.sign(&payload)),
                    update,
                }
            })
            .clone()
    }
}

impl Feed for WatchFeed {
    type Event = GroupEvent;
    type Update = SignedMapUpdate;
    type Side = PunchInstruction;

    fn event(&mut self, ev: GroupEvent) -> Step<SignedMapUpdate> {
        match ev {
            ev if ev.version() <= self.version => Step::Skip,
            GroupEvent::Removed {
                node_id, reason, ..
            } if *node_id == *self.ctx.node_id => {
                Step::End(Status::permission_denied(reason.describe()))
            }
            ev => {
                self.version = ev.version();
                Step::Send(self.delta(&ev))
            }
        }
    }

    fn lagged(&mut self, missed: u64) -> Step<SignedMapUpdate> {
        tracing::debug!(node = %self.ctx.node_id, missed, "watcher lagged; sending a full map");
        match self.registry.resync_in_parts(&self.ctx) {
            Ok((head, parts)) => {
                self.version = head.version;
                Step::SendAll(self.full_map(head, &parts))
            }
            Err(e) => Step::End(e.into()),
        }
    }

    fn side(&mut self, p: PunchInstruction) -> SignedMapUpdate {
        self.personal(NetworkMapUpdate {
            version: self.version,
            kind: Some(Kind::Punch(p)),
        })
    }
}
