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
    #[error("full map in parts: {0}")]
    Parts(&'static str),
}

/// Most parts a full map may announce: 4,096 × 64 members, far beyond any
/// group a server keeps (10,000 by default); a bound on what a node buffers.
const MAX_MAP_PARTS: u32 = 4096;

/// What the watch stream gave: a checked update, or why it stopped.
pub enum MapError {
    Status(Status),
    Refused(MapRefused),
}

/// A watch stream whose updates are checked against the server key.
pub struct MapStream {
    inner: Streaming<SignedMapUpdate>,
    checker: MapChecker,
}

impl MapStream {
    /// The next update, checked; `Ok(None)` when the stream ended.
    pub async fn message(&mut self) -> Result<Option<NetworkMapUpdate>, MapError> {
        loop {
            let Some(signed) = self.inner.message().await.map_err(MapError::Status)? else {
                return Ok(None);
            };
            // None: a part of a full map that is not complete yet.
            if let Some(update) = self.checker.check(signed).map_err(MapError::Refused)? {
                return Ok(Some(update));
            }
        }
    }
}

/// Checks one watch stream's updates: full maps and punches signed for this
/// node and this stream's nonce, deltas for the group and the feed epoch of
/// the stream's full map, all by the pinned server key.
struct MapChecker {
    client: ControlClient,
    nonce: Vec<u8>,
    /// The group and feed epoch of this stream's full map.
    base: Option<(String, Vec<u8>)>,
    /// A full map whose parts are still arriving.
    pending: Option<PendingMap>,
}

/// A checked full map's head and the parts received so far.
struct PendingMap {
    head: NetworkMapUpdate,
    want: u32,
    digest: Vec<u8>,
    bytes: Vec<bytes::Bytes>,
    parts: Vec<peermesh_proto::api::PeerBatch>,
}

impl MapChecker {
    /// Checks one update; `None` when it was a part of a full map that is
    /// not complete yet (the map comes out whole with its last part).
    fn check(&mut self, signed: SignedMapUpdate) -> Result<Option<NetworkMapUpdate>, MapRefused> {
        let update = NetworkMapUpdate::decode(signed.update.as_ref())?;
        if let Some(Kind::Part(part)) = update.kind {
            return self.part(signed.update, update.version, part);
        }
        if self.pending.take().is_some() {
            return Err(MapRefused::Parts("a full map's parts were cut off"));
        }
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
            if full.parts > 0 {
                if full.parts > MAX_MAP_PARTS {
                    return Err(MapRefused::Parts("more parts than any group has"));
                }
                self.pending = Some(PendingMap {
                    want: full.parts,
                    digest: full.parts_digest.clone(),
                    head: update,
                    bytes: Vec::new(),
                    parts: Vec::new(),
                });
                return Ok(None);
            }
        }
        Ok(Some(update))
    }

    /// One part of the pending full map; the whole map once the last part
    /// is in and the parts match the digest the signed head carries.
    fn part(
        &mut self,
        bytes: bytes::Bytes,
        version: u64,
        part: peermesh_proto::api::PeerBatch,
    ) -> Result<Option<NetworkMapUpdate>, MapRefused> {
        let p = self
            .pending
            .as_mut()
            .ok_or(MapRefused::Parts("a part without its full map"))?;
        if version != p.head.version {
            return Err(MapRefused::Parts("a part of another version"));
        }
        p.bytes.push(bytes);
        p.parts.push(part);
        if p.parts.len() < p.want as usize {
            return Ok(None);
        }
        let p = self.pending.take().expect("checked above");
        if signing::map_parts_digest(p.bytes.iter().map(|b| b.as_ref())) != p.digest {
            return Err(MapRefused::Parts(
                "the parts do not match the signed digest (changed on the path?)",
            ));
        }
        let mut head = p.head;
        if let Some(Kind::Full(m)) = head.kind.take() {
            head.kind = Some(Kind::Full(signing::assemble_map(m, p.parts)));
        }
        Ok(Some(head))
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
            checker: MapChecker {
                pending: None,
                client: self.clone(),
                nonce,
                base: None,
            },
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use peermesh_proto::api::{NetworkMap, Peer, ServerSignature};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::sign::SigningKey;
    use rustls::SignatureScheme;

    use super::*;

    const SERVER: &str = "srv_test";
    const ME: &str = "me";
    const GROUP: &str = "g";
    const EPOCH: [u8; 16] = [9; 16];

    /// A server key: what signs, and its SubjectPublicKeyInfo.
    struct Key {
        signer: Arc<dyn SigningKey>,
        spki: Vec<u8>,
    }

    impl Key {
        fn new() -> Self {
            let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let der = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(kp.serialize_der()));
            Self {
                signer: tls::provider().key_provider.load_private_key(der).unwrap(),
                spki: kp.public_key_der(),
            }
        }

        fn sign(&self, msg: &[u8]) -> ServerSignature {
            let signer = self
                .signer
                .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
                .unwrap();
            ServerSignature {
                key_pin: KeyPin::of_spki(&self.spki).0.to_vec(),
                scheme: u32::from(u16::from(signer.scheme())),
                signature: signer.sign(msg).unwrap(),
            }
        }

        fn identity(&self) -> ServerIdentity {
            ServerIdentity {
                key: self.spki.clone(),
                rotations: vec![],
                server_id: SERVER.into(),
            }
        }

        /// `u` signed as the server signs a full map for `nonce`.
        fn personal(&self, u: &NetworkMapUpdate, nonce: &[u8]) -> SignedMapUpdate {
            let update = u.encode_to_vec();
            SignedMapUpdate {
                signature: Some(
                    self.sign(&signing::map_personal_payload(SERVER, ME, nonce, &update)),
                ),
                update: update.into(),
            }
        }

        /// `u` signed as the server signs a delta of the group.
        fn delta(&self, u: &NetworkMapUpdate) -> SignedMapUpdate {
            let update = u.encode_to_vec();
            SignedMapUpdate {
                signature: Some(
                    self.sign(&signing::map_delta_payload(SERVER, GROUP, &EPOCH, &update)),
                ),
                update: update.into(),
            }
        }
    }

    /// A checker of a node that joined the server with `key`.
    fn checker(key: &Key, nonce: &[u8]) -> MapChecker {
        let client = ControlClient::new(
            "http://127.0.0.1:1",
            Keypair::generate_ed25519(),
            Security::pinned(Some(KeyPin::of_spki(&key.spki))),
        )
        .unwrap();
        {
            let mut s = client.session_mut();
            s.server_id = SERVER.into();
            s.node_id = ME.into();
            s.server_key = key.spki.clone();
        }
        MapChecker {
            client,
            nonce: nonce.to_vec(),
            base: None,
            pending: None,
        }
    }

    fn peer(id: &str, address: &str) -> Peer {
        Peer {
            node_id: id.into(),
            addresses: vec![address.into()],
            ..Default::default()
        }
    }

    fn full(identity: ServerIdentity, peers: Vec<Peer>) -> NetworkMapUpdate {
        NetworkMapUpdate {
            version: 1,
            kind: Some(Kind::Full(NetworkMap {
                group: GROUP.into(),
                self_node: Some(peer(ME, "/ip4/192.0.2.1/udp/1/quic-v1")),
                peers,
                epoch: EPOCH.to_vec(),
                server_identity: Some(identity),
                ..Default::default()
            })),
        }
    }

    fn upsert(version: u64, p: Peer) -> NetworkMapUpdate {
        NetworkMapUpdate {
            version,
            kind: Some(Kind::PeerUpsert(p)),
        }
    }

    /// `signed` with its update replaced by `u` (the signature kept): what a
    /// proxy on the path that rewrites maps sends.
    fn rewritten(signed: &SignedMapUpdate, u: &NetworkMapUpdate) -> SignedMapUpdate {
        SignedMapUpdate {
            update: u.encode_to_vec().into(),
            signature: signed.signature.clone(),
        }
    }

    /// A full map in parts: the signed head and its parts make the map; a
    /// part changed on the path, or one without a head, is refused.
    #[tokio::test]
    async fn a_full_map_in_parts_is_checked_by_its_digest() {
        let key = Key::new();
        let nonce = [7u8; 32];
        let peers: Vec<Peer> = (0..5)
            .map(|i| peer(&format!("p{i}"), "/ip4/192.0.2.9/udp/9/quic-v1"))
            .collect();
        // The server's parts list every member, the node itself among them.
        let mut all = peers.clone();
        all.push(peer(ME, "/ip4/192.0.2.1/udp/1/quic-v1"));
        let parts: Vec<SignedMapUpdate> = all
            .chunks(2)
            .map(|c| SignedMapUpdate {
                update: NetworkMapUpdate {
                    version: 1,
                    kind: Some(Kind::Part(peermesh_proto::api::PeerBatch {
                        peers: c.to_vec(),
                    })),
                }
                .encode_to_vec()
                .into(),
                signature: None,
            })
            .collect();
        let mut head = full(key.identity(), vec![]);
        if let Some(Kind::Full(m)) = &mut head.kind {
            m.parts = parts.len() as u32;
            m.parts_digest = signing::map_parts_digest(parts.iter().map(|p| p.update.as_ref()));
        }
        let whole = full(key.identity(), peers.clone());

        let mut c = checker(&key, &nonce);
        assert_eq!(c.check(key.personal(&head, &nonce)).unwrap(), None);
        assert_eq!(c.check(parts[0].clone()).unwrap(), None);
        assert_eq!(c.check(parts[1].clone()).unwrap(), None);
        assert_eq!(c.check(parts[2].clone()).unwrap(), Some(whole));

        // A member slipped into a part on the path.
        let mut c = checker(&key, &nonce);
        c.check(key.personal(&head, &nonce)).unwrap();
        let forged = SignedMapUpdate {
            update: NetworkMapUpdate {
                version: 1,
                kind: Some(Kind::Part(peermesh_proto::api::PeerBatch {
                    peers: vec![peer("mallory", "/ip4/203.0.113.66/udp/6/quic-v1")],
                })),
            }
            .encode_to_vec()
            .into(),
            signature: None,
        };
        c.check(parts[0].clone()).unwrap();
        c.check(parts[1].clone()).unwrap();
        assert!(matches!(c.check(forged.clone()), Err(MapRefused::Parts(_))));
        // A part with no full map before it.
        let mut c = checker(&key, &nonce);
        assert!(matches!(
            c.check(parts[0].clone()),
            Err(MapRefused::Parts(_))
        ));
    }

    #[tokio::test]
    async fn signed_maps_pass_and_rewritten_ones_are_refused() {
        let key = Key::new();
        let nonce = [7u8; 32];
        let mut c = checker(&key, &nonce);
        let bob = peer("bob", "/ip4/192.0.2.2/udp/2/quic-v1");

        // A delta before any full map has nothing to be checked against.
        let early = key.delta(&upsert(2, bob.clone()));
        assert!(matches!(c.check(early), Err(MapRefused::NoBase)));

        // The full map as the server signed it.
        let map = full(key.identity(), vec![bob.clone()]);
        let signed = key.personal(&map, &nonce);
        assert_eq!(c.check(signed.clone()).unwrap(), Some(map.clone()));

        // A peer added on the path.
        let mallory = peer("mallory", "/ip4/203.0.113.66/udp/6/quic-v1");
        let added = full(key.identity(), vec![bob.clone(), mallory.clone()]);
        assert!(matches!(
            c.check(rewritten(&signed, &added)),
            Err(MapRefused::Signature(tls::SignatureError::Invalid(_)))
        ));
        // The right map, replayed from another stream (another nonce).
        let other_stream = key.personal(&map, &[8u8; 32]);
        assert!(matches!(
            c.check(other_stream),
            Err(MapRefused::Signature(tls::SignatureError::Invalid(_)))
        ));

        // A delta as signed passes; its address changed on the path does not.
        let moved = peer("bob", "/ip4/192.0.2.2/udp/3/quic-v1");
        let delta = key.delta(&upsert(2, moved));
        c.check(delta.clone()).expect("a signed delta");
        let hijacked = peer("bob", "/ip4/203.0.113.66/udp/6/quic-v1");
        assert!(matches!(
            c.check(rewritten(&delta, &upsert(2, hijacked.clone()))),
            Err(MapRefused::Signature(tls::SignatureError::Invalid(_)))
        ));

        // The proxy signs with its own key: not the server's.
        let proxy = Key::new();
        assert!(matches!(
            c.check(proxy.delta(&upsert(3, hijacked))),
            Err(MapRefused::Signature(tls::SignatureError::WrongKey { .. }))
        ));
        // …nor can it swap its key in through a full map.
        let swapped = full(proxy.identity(), vec![bob, mallory]);
        assert!(matches!(
            c.check(proxy.personal(&swapped, &nonce)),
            Err(MapRefused::Trust(TrustError::Mismatch { .. }))
        ));
        assert_eq!(
            c.client.server_pin(),
            Some(KeyPin::of_spki(&key.spki)),
            "the pin did not move"
        );
    }
}
