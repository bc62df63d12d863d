//! The relay server's side of the control API: register, learn whom to
//! serve, report load. The channel is TLS with the server key pinned from
//! the relay token (or plaintext to loopback, or with `insecure`).

use libp2p::identity::Keypair;
use peermesh_proto::api::{
    relay_control_client::RelayControlClient as Rpc, MemberUpdate, RegisterRelayRequest,
    RegisterRelayResponse, RelayLoad, WatchMembersRequest,
};
use peermesh_proto::client::{channel, explain, next_timestamp, with_bearer, BadUrl, Security};
use peermesh_proto::signing;
use peermesh_proto::token::JoinToken;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

#[derive(Clone)]
pub struct RelayControlClient {
    rpc: Rpc<Channel>,
    url: String,
    security: Security,
    keypair: Keypair,
    credential: Option<String>,
    server_id: String,
    last_ts: u64,
}

impl RelayControlClient {
    /// A client of the control server at `url`, trusting the key that
    /// `token` pins.
    pub fn new(
        url: &str,
        token: &JoinToken,
        keypair: Keypair,
        insecure: bool,
    ) -> Result<Self, BadUrl> {
        let security = Security {
            trust: peermesh_proto::tls::ServerTrust::new(token.pin),
            insecure,
        };
        Ok(Self {
            rpc: Rpc::new(channel(url, &security)?),
            url: url.to_string(),
            security,
            keypair,
            credential: None,
            server_id: String::new(),
            last_ts: 0,
        })
    }

    pub async fn register(
        &mut self,
        token: &JoinToken,
        addresses: Vec<String>,
        region: &str,
    ) -> Result<RegisterRelayResponse, Status> {
        let public_key = self.keypair.public().encode_protobuf();
        self.last_ts = next_timestamp(self.last_ts);
        let payload =
            signing::relay_payload(&token.secret, &public_key, &addresses, region, self.last_ts);
        let signature = self
            .keypair
            .sign(&payload)
            .map_err(|e| Status::internal(format!("signing: {e}")))?;
        let resp = match self
            .rpc
            .register_relay(RegisterRelayRequest {
                token: token.secret.clone(),
                public_key,
                addresses,
                region: region.to_string(),
                timestamp_ms: self.last_ts,
                signature,
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => {
                return Err(explain(&self.url, &self.security.trust, &self.server_id, s).await)
            }
        };
        self.security
            .trust
            .accept(&resp.server_id, resp.server_identity.as_ref())
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        self.server_id = resp.server_id.clone();
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
