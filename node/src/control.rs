//! The node's side of the control API: join, authenticate, watch the map,
//! report endpoints and links. Clones share one session, so a re-auth by one
//! task serves all.

use std::sync::{Arc, RwLock};

use libp2p::identity::Keypair;
use peermesh_proto::api::{
    node_control_client::NodeControlClient, AuthenticateRequest, AuthenticateResponse, JoinRequest,
    JoinResponse, LinkReport, NetworkMapUpdate, PunchReadyRequest, ReportLinksRequest,
    RequestPunchRequest, RequestPunchResponse, UpdateEndpointsRequest, WatchNetworkMapRequest,
};
use peermesh_proto::client::{channel, next_timestamp, with_bearer};
use peermesh_proto::signing;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

use crate::error::{NodeError, Result};

#[derive(Default)]
struct Session {
    credential: Option<String>,
    /// Last signed timestamp; each new one must be higher (the server
    /// refuses replays).
    last_ts: u64,
}

#[derive(Clone)]
pub struct ControlClient {
    rpc: NodeControlClient<Channel>,
    keypair: Keypair,
    session: Arc<RwLock<Session>>,
}

impl ControlClient {
    /// A client on a lazily connected channel: it reconnects by itself when
    /// the server comes back after a restart.
    pub fn new(url: &str, keypair: Keypair) -> Result<Self> {
        Ok(Self {
            rpc: NodeControlClient::new(channel(url).map_err(|e| NodeError::BadControlUrl {
                url: e.url,
                reason: e.reason,
            })?),
            keypair,
            session: Arc::default(),
        })
    }

    fn next_ts(&self) -> u64 {
        let mut s = self.session.write().unwrap_or_else(|p| p.into_inner());
        s.last_ts = next_timestamp(s.last_ts);
        s.last_ts
    }

    fn set_credential(&self, credential: Option<String>) {
        self.session
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .credential = credential;
    }

    fn authed<T>(&self, msg: T) -> Request<T> {
        let s = self.session.read().unwrap_or_else(|p| p.into_inner());
        with_bearer(msg, s.credential.as_deref())
    }

    pub async fn join(&mut self, token: &str, name: &str) -> Result<JoinResponse, Status> {
        let public_key = self.keypair.public().encode_protobuf();
        let timestamp_ms = self.next_ts();
        let payload = signing::join_payload(token, &public_key, name, timestamp_ms);
        let signature = self
            .keypair
            .sign(&payload)
            .map_err(|e| Status::internal(format!("signing: {e}")))?;
        let resp = self
            .rpc
            .join(JoinRequest {
                token: token.to_string(),
                public_key,
                name: name.to_string(),
                timestamp_ms,
                signature,
            })
            .await?
            .into_inner();
        self.set_credential(resp.session.as_ref().map(|s| s.credential.clone()));
        Ok(resp)
    }

    pub async fn authenticate(&mut self, server_id: &str) -> Result<AuthenticateResponse, Status> {
        let public_key = self.keypair.public().encode_protobuf();
        let timestamp_ms = self.next_ts();
        let payload = signing::auth_payload(server_id, &public_key, timestamp_ms);
        let signature = self
            .keypair
            .sign(&payload)
            .map_err(|e| Status::internal(format!("signing: {e}")))?;
        let resp = self
            .rpc
            .authenticate(AuthenticateRequest {
                public_key,
                timestamp_ms,
                signature,
            })
            .await?
            .into_inner();
        self.set_credential(resp.session.as_ref().map(|s| s.credential.clone()));
        Ok(resp)
    }

    pub async fn watch(&mut self) -> Result<Streaming<NetworkMapUpdate>, Status> {
        let req = self.authed(WatchNetworkMapRequest {});
        Ok(self.rpc.watch_network_map(req).await?.into_inner())
    }

    pub async fn update_endpoints(&mut self, addresses: Vec<String>) -> Result<(), Status> {
        let req = self.authed(UpdateEndpointsRequest { addresses });
        self.rpc.update_endpoints(req).await?;
        Ok(())
    }

    pub async fn report_links(&mut self, links: Vec<LinkReport>) -> Result<(), Status> {
        let req = self.authed(ReportLinksRequest { links });
        self.rpc.report_links(req).await?;
        Ok(())
    }

    /// Asks the server to coordinate a punch to `peer`; returns once the
    /// peer has sent its opening packets, with its candidates (and its probe
    /// offer, for a punch from probe sockets).
    pub async fn request_punch(
        &mut self,
        peer: &str,
        candidates: Vec<String>,
        probe: Option<peermesh_proto::api::ProbeOffer>,
    ) -> Result<RequestPunchResponse, Status> {
        let req = self.authed(RequestPunchRequest {
            peer_id: peer.to_string(),
            candidates,
            probe,
        });
        Ok(self.rpc.request_punch(req).await?.into_inner())
    }

    pub async fn report_nat(
        &mut self,
        report: peermesh_proto::api::NatReport,
    ) -> Result<(), Status> {
        let req = self.authed(report);
        self.rpc.report_nat(req).await?;
        Ok(())
    }

    /// Tells the server that this node's opening packets for `punch_id` are out.
    pub async fn punch_ready(
        &mut self,
        punch_id: u64,
        candidates: Vec<String>,
        probe: Option<peermesh_proto::api::ProbeOffer>,
    ) -> Result<(), Status> {
        let req = self.authed(PunchReadyRequest {
            punch_id,
            candidates,
            probe,
        });
        self.rpc.punch_ready(req).await?;
        Ok(())
    }
}
