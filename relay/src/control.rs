//! The relay server's side of the control API: register, learn whom to
//! serve, report load.

use libp2p::identity::Keypair;
use peermesh_proto::api::{
    relay_control_client::RelayControlClient as Rpc, MemberUpdate, RegisterRelayRequest,
    RegisterRelayResponse, RelayLoad, WatchMembersRequest,
};
use peermesh_proto::client::{channel, next_timestamp, with_bearer, BadUrl};
use peermesh_proto::signing;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

#[derive(Clone)]
pub struct RelayControlClient {
    rpc: Rpc<Channel>,
    keypair: Keypair,
    credential: Option<String>,
    last_ts: u64,
}

impl RelayControlClient {
    pub fn new(url: &str, keypair: Keypair) -> Result<Self, BadUrl> {
        Ok(Self {
            rpc: Rpc::new(channel(url)?),
            keypair,
            credential: None,
            last_ts: 0,
        })
    }

    pub async fn register(
        &mut self,
        token: &str,
        addresses: Vec<String>,
        region: &str,
    ) -> Result<RegisterRelayResponse, Status> {
        let public_key = self.keypair.public().encode_protobuf();
        self.last_ts = next_timestamp(self.last_ts);
        let payload = signing::relay_payload(token, &public_key, &addresses, region, self.last_ts);
        let signature = self
            .keypair
            .sign(&payload)
            .map_err(|e| Status::internal(format!("signing: {e}")))?;
        let resp = self
            .rpc
            .register_relay(RegisterRelayRequest {
                token: token.to_string(),
                public_key,
                addresses,
                region: region.to_string(),
                timestamp_ms: self.last_ts,
                signature,
            })
            .await?
            .into_inner();
        self.credential = resp.session.as_ref().map(|s| s.credential.clone());
        Ok(resp)
    }

    fn authed<T>(&self, msg: T) -> Request<T> {
        with_bearer(msg, self.credential.as_deref())
    }

    pub async fn watch_members(&mut self) -> Result<Streaming<MemberUpdate>, Status> {
        let req = self.authed(WatchMembersRequest {});
        Ok(self.rpc.watch_members(req).await?.into_inner())
    }

    pub async fn report_load(&mut self, load: RelayLoad) -> Result<(), Status> {
        let req = self.authed(load);
        self.rpc.report_relay_load(req).await?;
        Ok(())
    }
}
