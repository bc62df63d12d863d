//! NodeControl: what mesh nodes call.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use peermesh_proto::api::{
    node_control_server::NodeControl, AuthenticateRequest, AuthenticateResponse, JoinRequest,
    JoinResponse, LeaveRequest, LeaveResponse, NetworkMapUpdate, ReportLinksRequest,
    ReportLinksResponse, UpdateEndpointsRequest, UpdateEndpointsResponse, WatchNetworkMapRequest,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::registry::{GroupEvent, NodeCtx, Registry, Subscription};

/// Updates a watch stream may have queued towards a slow client before the
/// pump waits for it (and the broadcast backlog absorbs the rest).
const WATCH_QUEUE: usize = 64;

pub struct NodeApi {
    registry: Arc<Registry>,
}

impl NodeApi {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
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
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        tokio::spawn(pump(self.registry.clone(), ctx, sub, tx));
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
}

/// Feeds one watcher: the full map, then every later change of its group.
/// Ends with PERMISSION_DENIED when the watcher itself is removed.
async fn pump(
    registry: Arc<Registry>,
    ctx: NodeCtx,
    sub: Subscription,
    tx: mpsc::Sender<Result<NetworkMapUpdate, Status>>,
) {
    let Subscription {
        first,
        mut version,
        mut events,
        guard,
    } = sub;
    if tx.send(Ok(first)).await.is_err() {
        return;
    }
    loop {
        let event = tokio::select! {
            ev = events.recv() => ev,
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
                        full
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
    drop(guard);
}
