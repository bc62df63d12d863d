//! RelayControl: what relay servers call.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use peermesh_proto::api::{
    relay_control_server::RelayControl, MemberUpdate, RegisterRelayRequest, RegisterRelayResponse,
    RelayLoad, ReportRelayLoadResponse, WatchMembersRequest,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::relays::{MemberStep, MemberSubscription, RelayCtx, RelayDirectory};

/// Updates a member stream may have queued towards a slow relay before the
/// pump waits for it (and the broadcast backlog absorbs the rest).
const WATCH_QUEUE: usize = 64;

pub struct RelayApi {
    relays: Arc<RelayDirectory>,
}

impl RelayApi {
    pub fn new(relays: Arc<RelayDirectory>) -> Self {
        Self { relays }
    }

    fn ctx<T>(&self, req: &Request<T>) -> Result<RelayCtx, Status> {
        let credential = super::bearer(req.metadata())?;
        Ok(self.relays.authorize_relay(credential)?)
    }
}

type MemberStream = Pin<Box<dyn Stream<Item = Result<MemberUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl RelayControl for RelayApi {
    async fn register_relay(
        &self,
        req: Request<RegisterRelayRequest>,
    ) -> Result<Response<RegisterRelayResponse>, Status> {
        Ok(Response::new(
            self.relays.register_relay(req.get_ref()).await?,
        ))
    }

    type WatchMembersStream = MemberStream;

    async fn watch_members(
        &self,
        req: Request<WatchMembersRequest>,
    ) -> Result<Response<Self::WatchMembersStream>, Status> {
        let ctx = self.ctx(&req)?;
        let sub = self.relays.watch_members(&ctx)?;
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        tokio::spawn(pump(self.relays.clone(), ctx, sub, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_relay_load(
        &self,
        req: Request<RelayLoad>,
    ) -> Result<Response<ReportRelayLoadResponse>, Status> {
        let ctx = self.ctx(&req)?;
        self.relays.report_relay_load(&ctx, req.get_ref())?;
        Ok(Response::new(ReportRelayLoadResponse {}))
    }
}

/// Feeds one relay: the full member set, then every later change. Ends with
/// PERMISSION_DENIED when the relay is dropped from the directory.
async fn pump(
    relays: Arc<RelayDirectory>,
    ctx: RelayCtx,
    sub: MemberSubscription,
    tx: mpsc::Sender<Result<MemberUpdate, Status>>,
) {
    let MemberSubscription {
        first,
        mut cursor,
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
            Ok(ev) => match cursor.step(&ev) {
                MemberStep::Skip => continue,
                MemberStep::Send(update) => update,
                MemberStep::End(err) => {
                    let _ = tx.send(Err(err.into())).await;
                    break;
                }
            },
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(relay = %ctx.relay_id, missed, "member watcher lagged; sending a full set");
                match relays.member_resync(&ctx) {
                    Ok((full, seen)) => {
                        cursor.reset(seen);
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
