//! NodeControl: what mesh nodes call.

use std::sync::Arc;

use peermesh_proto::api::{
    network_map_update::Kind, node_control_server::NodeControl, AuthenticateRequest,
    AuthenticateResponse, JoinRequest, JoinResponse, LeaveRequest, LeaveResponse, NatReport,
    NetworkMapUpdate, PunchInstruction, PunchReadyRequest, PunchReadyResponse, ReportLinksRequest,
    ReportLinksResponse, ReportNatResponse, RequestPunchRequest, RequestPunchResponse,
    StunEndpoints, UpdateEndpointsRequest, UpdateEndpointsResponse, WatchNetworkMapRequest,
};
use tonic::{Request, Response, Status};

use super::stream::{self, Feed, Step, UpdateStream};
use crate::hub::GroupEvent;
use crate::registry::{NodeCtx, Registry, Subscription, WatchGuard};
use crate::rendezvous::{MailboxGuard, Rendezvous};

pub struct NodeApi {
    registry: Arc<Registry>,
    rendezvous: Arc<Rendezvous>,
    stun: Option<StunEndpoints>,
}

impl NodeApi {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self::with_punch_timeout(registry, crate::rendezvous::DEFAULT_TIMEOUT)
    }

    /// With how long a punch caller waits for the callee.
    pub fn with_punch_timeout(registry: Arc<Registry>, timeout: std::time::Duration) -> Self {
        Self {
            registry,
            rendezvous: Rendezvous::new(timeout),
            stun: None,
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
        Ok(Response::new(self.registry.join(req.get_ref()).await?))
    }

    async fn authenticate(
        &self,
        req: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        Ok(Response::new(
            self.registry.authenticate(req.get_ref()).await?,
        ))
    }

    type WatchNetworkMapStream = UpdateStream<NetworkMapUpdate>;

    async fn watch_network_map(
        &self,
        req: Request<WatchNetworkMapRequest>,
    ) -> Result<Response<Self::WatchNetworkMapStream>, Status> {
        let ctx = self.ctx(&req)?;
        let Subscription {
            first,
            version,
            events,
            guard,
        } = self.registry.watch(&ctx)?;
        let (punches, mailbox) = self.rendezvous.mailbox(&ctx.node_id);
        let feed = WatchFeed {
            registry: self.registry.clone(),
            ctx,
            version,
            stun: self.stun.clone(),
            _mailbox: mailbox,
            _watch: guard,
        };
        let first = feed.with_stun(first);
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
        Ok(Response::new(
            self.rendezvous
                .request(&self.registry, &ctx, req.get_ref())
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
        self.rendezvous.ready(&ctx, req.get_ref())?;
        Ok(Response::new(PunchReadyResponse {}))
    }
}

/// Feeds one watcher: the full map, then every later change of its group,
/// and the punch instructions for it. Ends with PERMISSION_DENIED when the
/// watcher itself is removed.
struct WatchFeed {
    registry: Arc<Registry>,
    ctx: NodeCtx,
    /// The version the watcher's map is at.
    version: u64,
    stun: Option<StunEndpoints>,
    // Dropped in this order when the stream ends: the punch mailbox, then
    // the watch (the node goes offline with its last stream).
    _mailbox: MailboxGuard,
    _watch: WatchGuard,
}

impl WatchFeed {
    /// Full maps carry the STUN endpoints; the registry does not know them.
    fn with_stun(&self, mut u: NetworkMapUpdate) -> NetworkMapUpdate {
        if let Some(Kind::Full(m)) = &mut u.kind {
            m.stun = self.stun.clone();
        }
        u
    }
}

impl Feed for WatchFeed {
    type Event = GroupEvent;
    type Update = NetworkMapUpdate;
    type Side = PunchInstruction;

    fn event(&mut self, ev: GroupEvent) -> Step<NetworkMapUpdate> {
        match ev {
            ev if ev.version() <= self.version => Step::Skip,
            GroupEvent::Removed {
                node_id, reason, ..
            } if *node_id == *self.ctx.node_id => {
                Step::End(Status::permission_denied(reason.describe()))
            }
            ev => {
                self.version = ev.version();
                Step::Send(ev.to_update())
            }
        }
    }

    fn lagged(&mut self, missed: u64) -> Step<NetworkMapUpdate> {
        tracing::debug!(node = %self.ctx.node_id, missed, "watcher lagged; sending a full map");
        match self.registry.resync(&self.ctx) {
            Ok(full) => {
                self.version = full.version;
                Step::Send(self.with_stun(full))
            }
            Err(e) => Step::End(e.into()),
        }
    }

    fn side(&mut self, p: PunchInstruction) -> NetworkMapUpdate {
        NetworkMapUpdate {
            version: self.version,
            kind: Some(Kind::Punch(p)),
        }
    }
}
