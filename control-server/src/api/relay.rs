//! RelayControl: what relay servers call.

use std::convert::Infallible;
use std::sync::Arc;

use peermesh_proto::api::{
    relay_control_server::RelayControl, MemberUpdate, RegisterRelayRequest, RegisterRelayResponse,
    RelayLoad, ReportRelayLoadResponse, WatchMembersRequest,
};
use tonic::{Request, Response, Status};

use super::node::{conn, WatchCounts, WatchSlot};
use super::stream::{self, Feed, Step, UpdateStream};
use crate::hub::MemberEvent;
use crate::relays::{
    MemberCursor, MemberStep, MemberSubscription, RelayCtx, RelayDirectory, RelayGuard,
};
use crate::tls::{KeyStore, StreamGuard};

pub struct RelayApi {
    relays: Arc<RelayDirectory>,
    keys: Arc<KeyStore>,
    watches: Arc<WatchCounts>,
}

impl RelayApi {
    pub fn new(relays: Arc<RelayDirectory>, keys: Arc<KeyStore>, max_watches: usize) -> Self {
        Self {
            relays,
            keys,
            watches: WatchCounts::new(max_watches),
        }
    }

    fn ctx<T>(&self, req: &Request<T>) -> Result<RelayCtx, Status> {
        let credential = super::bearer(req.metadata())?;
        Ok(self.relays.authorize_relay(credential)?)
    }
}

#[tonic::async_trait]
impl RelayControl for RelayApi {
    async fn register_relay(
        &self,
        req: Request<RegisterRelayRequest>,
    ) -> Result<Response<RegisterRelayResponse>, Status> {
        let mut resp = self.relays.register_relay(req.get_ref()).await?;
        resp.server_identity = Some(self.keys.identity());
        Ok(Response::new(resp))
    }

    type WatchMembersStream = UpdateStream<MemberUpdate>;

    async fn watch_members(
        &self,
        req: Request<WatchMembersRequest>,
    ) -> Result<Response<Self::WatchMembersStream>, Status> {
        let ctx = self.ctx(&req)?;
        let slot = self.watches.open(&ctx.relay_id, "relay")?;
        let stream_guard = conn(&req)?.activity.stream();
        let MemberSubscription {
            first,
            cursor,
            events,
            guard,
        } = self.relays.watch_members(&ctx)?;
        let feed = MembersFeed {
            relays: self.relays.clone(),
            ctx,
            cursor,
            _guard: guard,
            _slot: slot,
            _stream: stream_guard,
        };
        Ok(Response::new(stream::spawn(
            feed,
            vec![first],
            events,
            None,
        )))
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
struct MembersFeed {
    relays: Arc<RelayDirectory>,
    ctx: RelayCtx,
    cursor: MemberCursor,
    /// Takes the relay offline with its last stream.
    _guard: RelayGuard,
    _slot: WatchSlot,
    _stream: StreamGuard,
}

impl Feed for MembersFeed {
    type Event = MemberEvent;
    type Update = MemberUpdate;
    type Side = Infallible;

    fn event(&mut self, ev: MemberEvent) -> Step<MemberUpdate> {
        match self.cursor.step(&ev) {
            MemberStep::Skip => Step::Skip,
            MemberStep::Send(update) => Step::Send(update),
            MemberStep::End(err) => Step::End(err.into()),
        }
    }

    fn lagged(&mut self, missed: u64) -> Step<MemberUpdate> {
        tracing::debug!(relay = %self.ctx.relay_id, missed, "member watcher lagged; sending a full set");
        match self.relays.member_resync(&self.ctx) {
            Ok((full, seen)) => {
                self.cursor.reset(seen);
                Step::Send(full)
            }
            Err(e) => Step::End(e.into()),
        }
    }

    fn side(&mut self, never: Infallible) -> MemberUpdate {
        match never {}
    }
}
