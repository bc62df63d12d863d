//! NodeControl: what mesh nodes call.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use peermesh_proto::api::{
    node_control_server::NodeControl, AuthenticateRequest, AuthenticateResponse, JoinRequest,
    JoinResponse, LeaveRequest, LeaveResponse, NatReport, NetworkMapUpdate, PunchInstruction,
    PunchReadyRequest, PunchReadyResponse, ReportLinksRequest, ReportLinksResponse,
    ReportNatResponse, RequestPunchRequest, RequestPunchResponse, StunEndpoints,
    UpdateEndpointsRequest, UpdateEndpointsResponse, WatchNetworkMapRequest,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::hub::GroupEvent;
use crate::registry::{NodeCtx, Registry, Subscription};
use crate::rendezvous::{MailboxGuard, Rendezvous};

/// Updates a watch stream may have queued towards a slow client before the
/// pump waits for it (and the broadcast backlog absorbs the rest).
const WATCH_QUEUE: usize = 64;

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

type WatchStream = Pin<Box<dyn Stream<Item = Result<NetworkMapUpdate, Status>> + Send>>;

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

    type WatchNetworkMapStream = WatchStream;

    async fn watch_network_map(
        &self,
        req: Request<WatchNetworkMapRequest>,
    ) -> Result<Response<Self::WatchNetworkMapStream>, Status> {
        let ctx = self.ctx(&req)?;
        let sub = self.registry.watch(&ctx)?;
        let mailbox = self.rendezvous.mailbox(&ctx.node_id);
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        tokio::spawn(pump(
            self.registry.clone(),
            ctx,
            sub,
            mailbox,
            self.stun.clone(),
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
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

/// Feeds one watcher: the full map, then every later change of its group.
/// Ends with PERMISSION_DENIED when the watcher itself is removed.
async fn pump(
    registry: Arc<Registry>,
    ctx: NodeCtx,
    sub: Subscription,
    (mut punches, mailbox_guard): (mpsc::Receiver<PunchInstruction>, MailboxGuard),
    stun: Option<StunEndpoints>,
    tx: mpsc::Sender<Result<NetworkMapUpdate, Status>>,
) {
    // Full maps carry the STUN endpoints; the registry does not know them.
    let with_stun = |mut u: NetworkMapUpdate| {
        if let Some(peermesh_proto::api::network_map_update::Kind::Full(m)) = &mut u.kind {
            m.stun = stun.clone();
        }
        u
    };
    let Subscription {
        first,
        mut version,
        mut events,
        guard,
    } = sub;
    if tx.send(Ok(with_stun(first))).await.is_err() {
        return;
    }
    loop {
        let event = tokio::select! {
            ev = events.recv() => ev,
            Some(p) = punches.recv() => {
                let update = NetworkMapUpdate {
                    version,
                    kind: Some(peermesh_proto::api::network_map_update::Kind::Punch(p)),
                };
                if tx.send(Ok(update)).await.is_err() {
                    break;
                }
                continue;
            }
            _ = tx.closed() => break,
        };
        let update = match event {
            Ok(ev) if ev.version() <= version => continue,
            Ok(GroupEvent::Removed {
                node_id, reason, ..
            }) if *node_id == *ctx.node_id => {
                let _ = tx
                    .send(Err(Status::permission_denied(reason.describe())))
                    .await;
                break;
            }
            Ok(ev) => {
                version = ev.version();
                ev.to_update()
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(node = %ctx.node_id, missed, "watcher lagged; sending a full map");
                match registry.resync(&ctx) {
                    Ok(full) => {
                        version = full.version;
                        with_stun(full)
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        break;
                    }
                }
            }
            Err(broadcast::error::RecvError::Closed) => break,
        };
        if tx.send(Ok(update)).await.is_err() {
            break;
        }
    }
    drop(mailbox_guard);
    drop(guard);
}
