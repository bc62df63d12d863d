//! The node's side of the control API: join, authenticate, watch the map,
//! report endpoints and links. Clones share one session, so a re-auth by one
//! task serves all.
//!
//! Trust (issue 13): the channel is TLS with the server key pinned from the
//! join token (or plaintext to loopback, or with `insecure`); every answer
//! that names the server key is checked against the pin
//! ([`ServerTrust::accept`], which follows signed rotations), and every map
//! update is checked against the server key's signature before the node
//! looks at it ([`MapStream`]).

use std::sync::{Arc, RwLock};

use libp2p::identity::Keypair;
use peermesh_proto::api::{
    network_map_update::Kind, node_control_client::NodeControlClient, AuthenticateRequest,
    AuthenticateResponse, JoinRequest, JoinResponse, LinkReport, NetworkMapUpdate,
    PunchReadyRequest, ReportLinksRequest, RequestPunchRequest, RequestPunchResponse,
    ServerIdentity, SignedMapUpdate, UpdateEndpointsRequest, WatchNetworkMapRequest,
};
use peermesh_proto::client::{channel, next_timestamp, with_bearer, Security};
use peermesh_proto::signing;
use peermesh_proto::tls::{self, KeyPin, TrustError};
use peermesh_proto::token::JoinToken;
use prost::Message;
use rand::RngCore;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

use crate::error::{NodeError, Result};

/// Bytes of a watch stream's nonce (see `WatchNetworkMapRequest.nonce`).
const NONCE_BYTES: usize = 32;

#[derive(Default)]
struct Session {
    credential: Option<String>,
    /// Last signed timestamp; each new one must be higher (the server
    /// refuses replays).
    last_ts: u64,
    /// The server's id and its key (SubjectPublicKeyInfo), as checked
    /// against the pin.
    server_id: String,
    server_key: Vec<u8>,
    node_id: String,
}

#[derive(Clone)]
pub struct ControlClient {
    rpc: NodeControlClient<Channel>,
    url: String,
    security: Security,
    keypair: Keypair,
    session: Arc<RwLock<Session>>,
}

/// Why a map update was refused: not signed by the server key, or changing
/// what no signed change may (this node's identity, a peer's key).
#[derive(Debug, thiserror::Error)]
pub enum MapRefused {
    #[error("not signed by the control server's key: {0}")]
    Signature(#[from] tls::SignatureError),
    #[error("{0}")]
    Trust(#[from] TrustError),
    #[error("undecodable update: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("a delta before any full map")]
    NoBase,
}

/// What the watch stream gave: a checked update, or why it stopped.
pub enum MapError {
    Status(Status),
    Refused(MapRefused),
}

/// A watch stream whose updates are checked against the server key.
pub struct MapStream {
    inner: Streaming<SignedMapUpdate>,
    client: ControlClient,
    nonce: Vec<u8>,
    /// The group and feed epoch of this stream's full map.
    base: Option<(String, Vec<u8>)>,
}

impl MapStream {
    /// The next update, checked; `Ok(None)` when the stream ended.
    pub async fn message(&mut self) -> Result<Option<NetworkMapUpdate>, MapError> {
        let Some(signed) = self.inner.message().await.map_err(MapError::Status)? else {
            return Ok(None);
        };
        self.check(signed).map(Some).map_err(MapError::Refused)
    }

    fn check(&mut self, signed: SignedMapUpdate) -> Result<NetworkMapUpdate, MapRefused> {
        let update = NetworkMapUpdate::decode(signed.update.as_ref())?;
        let (server_id, node_id) = {
            let s = self.client.session();
            (s.server_id.clone(), s.node_id.clone())
        };
        let payload = match &update.kind {
            Some(Kind::Full(full)) => {
                // A rotated key comes with its signed rotation.
                if let Some(identity) = &full.server_identity {
                    self.client.accept_identity(&server_id, identity)?;
                }
                signing::map_personal_payload(&server_id, &node_id, &self.nonce, &signed.update)
            }
            Some(Kind::Punch(_)) => {
                signing::map_personal_payload(&server_id, &node_id, &self.nonce, &signed.update)
            }
            _ => {
                let (group, epoch) = self.base.as_ref().ok_or(MapRefused::NoBase)?;
                signing::map_delta_payload(&server_id, group, epoch, &signed.update)
            }
        };
        let key = self.client.session().server_key.clone();
        tls::verify(&key, signed.signature.as_ref(), &payload)?;
        if let Some(Kind::Full(full)) = &update.kind {
            self.base = Some((full.group.clone(), full.epoch.clone()));
        }
        Ok(update)
    }
}

impl ControlClient {
    /// A client on a lazily connected channel: it reconnects by itself when
    /// the server comes back after a restart.
    pub fn new(url: &str, keypair: Keypair, security: Security) -> Result<Self> {
        Ok(Self {
            rpc: NodeControlClient::new(channel(url, &security).map_err(|e| {
                NodeError::BadControlUrl {
                    url: e.url,
                    reason: e.reason,
                }
            })?),
            url: url.to_string(),
            security,
            keypair,
            session: Arc::default(),
        })
    }

    fn session(&self) -> std::sync::RwLockReadGuard<'_, Session> {
        self.session.read().unwrap_or_else(|p| p.into_inner())
    }

    fn session_mut(&self) -> std::sync::RwLockWriteGuard<'_, Session> {
        self.session.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The pinned server key's fingerprint (from the token, or moved along
    /// a signed rotation since).
    pub fn server_pin(&self) -> Option<KeyPin> {
        self.security.trust.pin()
    }

    fn next_ts(&self) -> u64 {
        let mut s = self.session_mut();
        s.last_ts = next_timestamp(s.last_ts);
        s.last_ts
    }

    fn authed<T>(&self, msg: T) -> Request<T> {
        let s = self.session();
        with_bearer(msg, s.credential.as_deref())
    }

    /// Checks the server key an answer names against the pin, and keeps it
    /// for checking map signatures.
    fn accept_identity(
        &self,
        server_id: &str,
        identity: &ServerIdentity,
    ) -> Result<(), TrustError> {
        let (key, moved) = self.security.trust.accept(server_id, Some(identity))?;
        if moved {
            tracing::info!(server_key = %KeyPin::of_spki(&key), "control server key pinned");
        }
        self.session_mut().server_key = key;
        Ok(())
    }

    /// An answer's session and server identity, checked.
    fn adopt(
        &self,
        server_id: &str,
        node_id: &str,
        identity: Option<&ServerIdentity>,
        credential: Option<String>,
    ) -> Result<(), Status> {
        let identity =
            identity.ok_or_else(|| Status::failed_precondition(TrustError::NoKey.to_string()))?;
        self.accept_identity(server_id, identity)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let mut s = self.session_mut();
        s.credential = credential;
        s.server_id = server_id.to_string();
        s.node_id = node_id.to_string();
        Ok(())
    }

    /// A transport failure explained (a TLS handshake with another key: a
    /// rotation to follow, or the wrong server); see
    /// [`peermesh_proto::client::explain`].
    async fn explain(&self, s: Status) -> Status {
        let server_id = self.session().server_id.clone();
        peermesh_proto::client::explain(&self.url, &self.security.trust, &server_id, s).await
    }

    pub async fn join(&mut self, token: &JoinToken, name: &str) -> Result<JoinResponse, Status> {
        let plaintext = self
            .url
            .get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case("http://"));
        if plaintext && self.security.trust.pin().is_some() {
            // Without TLS nothing proves the server's key before the token
            // is sent: ask for the key first, so that a token meant for
            // another server is not spent here (the join's answer is
            // checked again, and the map signatures hold either way).
            let (identity, _) = peermesh_proto::client::fetch_identity(&self.url).await?;
            self.security
                .trust
                .accept(&identity.server_id, Some(&identity))
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
        }
        let public_key = self.keypair.public().encode_protobuf();
        let timestamp_ms = self.next_ts();
        let payload = signing::join_payload(&token.secret, &public_key, name, timestamp_ms);
        let signature = self
            .keypair
            .sign(&payload)
            .map_err(|e| Status::internal(format!("signing: {e}")))?;
        let resp = match self
            .rpc
            .join(JoinRequest {
                token: token.secret.clone(),
                public_key,
                name: name.to_string(),
                timestamp_ms,
                signature,
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.explain(s).await),
        };
        self.adopt(
            &resp.server_id,
            &resp.node_id,
            resp.server_identity.as_ref(),
            resp.session.as_ref().map(|s| s.credential.clone()),
        )?;
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
        let resp = match self
            .rpc
            .authenticate(AuthenticateRequest {
                public_key,
                timestamp_ms,
                signature,
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.explain(s).await),
        };
        if resp.server_id != server_id {
            return Err(Status::failed_precondition(format!(
                "the control server is {:?}, not the {server_id:?} this node joined",
                resp.server_id
            )));
        }
        self.adopt(
            &resp.server_id,
            &resp.node_id,
            resp.server_identity.as_ref(),
            resp.session.as_ref().map(|s| s.credential.clone()),
        )?;
        Ok(resp)
    }

    /// Opens the watch stream; its updates are checked before they are
    /// handed out.
    pub async fn watch(&mut self) -> Result<MapStream, Status> {
        let mut nonce = vec![0u8; NONCE_BYTES];
        rand::thread_rng().fill_bytes(&mut nonce);
        let req = self.authed(WatchNetworkMapRequest {
            nonce: nonce.clone(),
        });
        let inner = match self.rpc.watch_network_map(req).await {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.explain(s).await),
        };
        Ok(MapStream {
            inner,
            client: self.clone(),
            nonce,
            base: None,
        })
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
