//! The server key, the TLS listener and the transport policy.
//!
//! **The server key** is the key of the server's TLS certificate; it also
//! signs every map update, and join tokens carry its fingerprint
//! ([`KeyPin`]). It always lives in `DATA/tls/key.pem` (mode 0600):
//!
//! - self-signed (the default, no set-up): made on first start, with a
//!   self-signed certificate in `DATA/tls/cert.pem`;
//! - from a real CA (`--tls-cert`/`--tls-key`, e.g. an ACME client's
//!   files): the certificate is served as it is; when the key in
//!   `--tls-key` is not the one in `DATA/tls/key.pem` (a renewal with a new
//!   key), the server rotates to it at start or on `admin rotate-key`.
//!
//! **Rotation** ([`KeyStore::rotate`]): the old key signs the new one
//! (a [`KeyRotation`], kept in sled's meta tree); nodes that pinned the old
//! key follow the signed steps, so no node is stranded. A crash in the
//! middle leaves the old key in use or the new one with its rotation
//! recorded: the new key is written beside the old, the rotation committed
//! and flushed, and only then is the new key renamed into place (finished at
//! the next start if the crash fell between the two).
//!
//! **The listener** ([`incoming`]) takes TLS from anyone and plaintext
//! (HTTP/2 without TLS; told apart by the first byte) only from loopback,
//! unless `--insecure`; a plaintext connection from elsewhere is served
//! only an error that says so ([`ConnInfo::refusal`]). Handshakes have a
//! deadline, and a connection with no open stream and no request for
//! [`IDLE_TIMEOUT`] is closed.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use peermesh_proto::api::{KeyRotation, ServerIdentity, ServerSignature};
use peermesh_proto::signing;
use peermesh_proto::store::v1::KeyRotations;
use peermesh_proto::tls::{self as ptls, KeyPin};
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::SignatureScheme;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::store::Store;

pub const TLS_DIR: &str = "tls";
const KEY_FILE: &str = "key.pem";
const CERT_FILE: &str = "cert.pem";
const NEXT_KEY_FILE: &str = "key.next.pem";
const NEXT_CERT_FILE: &str = "cert.next.pem";
const ROTATIONS_META: &str = "key_rotations";

/// How long a new connection may take to send its first byte and finish
/// the TLS handshake: a round trip or three on any working path; ten
/// seconds covers a slow mobile link, and a peer that holds a socket open
/// without a handshake gets nothing else out of the server.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no open stream (watch) and no new request for this
/// long is closed. Nodes and relays always hold a watch stream; the admin
/// CLI closes its connection itself; so this only ends connections that
/// were opened and left (by accident or to hold the server's memory).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections whose handshakes may be in progress at once; more wait in the
/// kernel's accept queue. A handshake is one signature and a key exchange
/// (well under a millisecond of CPU), so this only bounds the memory of
/// half-open connections.
pub const MAX_HANDSHAKES: usize = 1024;

/// TLS signature schemes the server key may sign with (what aws-lc offers
/// for TLS 1.3, the strongest first within each key type).
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error("making the self-signed certificate: {0}")]
    Generate(String),
    #[error("storing the key rotation: {0}")]
    Store(#[from] crate::error::ControlError),
    #[error("{0}")]
    Rotate(String),
}

/// Where the certificate comes from.
#[derive(Clone, Debug)]
pub enum CertSource {
    /// Made by the server (`DATA/tls/cert.pem`).
    SelfSigned,
    /// A CA's certificate chain and its key (PEM files).
    Files { cert: PathBuf, key: PathBuf },
}

/// One server key in use: what TLS serves and what signs.
pub struct ServerKey {
    certified: Arc<CertifiedKey>,
    spki: Vec<u8>,
    pin: KeyPin,
    key_pem: String,
}

impl std::fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerKey").field("pin", &self.pin).finish()
    }
}

impl ServerKey {
    fn new(
        chain: Vec<CertificateDer<'static>>,
        key_pem: String,
        path: &Path,
    ) -> Result<Self, TlsError> {
        let bad = |reason: String| TlsError::Bad {
            path: path.to_path_buf(),
            reason,
        };
        let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| bad(format!("no private key: {e}")))?;
        let signer = ptls::provider()
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| bad(format!("unusable private key: {e}")))?;
        let leaf = chain.first().ok_or_else(|| bad("no certificate".into()))?;
        let spki = ptls::spki_of_cert(leaf).map_err(|e| bad(format!("certificate: {e}")))?;
        let key_spki = signer
            .public_key()
            .ok_or_else(|| bad("cannot tell the private key's public key".into()))?;
        if key_spki.as_ref() != spki.as_slice() {
            return Err(bad("the private key is not the certificate's key".into()));
        }
        if signer.choose_scheme(SCHEMES).is_none() {
            return Err(bad(
                "the key type cannot sign with ECDSA, Ed25519 or RSA-PSS".into(),
            ));
        }
        Ok(Self {
            pin: KeyPin::of_spki(&spki),
            spki,
            certified: Arc::new(CertifiedKey::new(chain, signer)),
            key_pem,
        })
    }

    pub fn pin(&self) -> KeyPin {
        self.pin
    }

    /// The key's SubjectPublicKeyInfo (DER).
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }

    fn signing_key(&self) -> &Arc<dyn SigningKey> {
        &self.certified.key
    }

    /// Signs `msg` with the server key.
    pub fn sign(&self, msg: &[u8]) -> ServerSignature {
        let signer = self
            .signing_key()
            .choose_scheme(SCHEMES)
            .expect("checked when the key was loaded");
        let signature = signer
            .sign(msg)
            .expect("signing with a loaded key does not fail");
        ServerSignature {
            key_pin: self.pin.0.to_vec(),
            scheme: u32::from(u16::from(signer.scheme())),
            signature,
        }
    }
}

/// The server key in use, its rotations, and how to rotate it.
pub struct KeyStore {
    dir: PathBuf,
    source: CertSource,
    store: Store,
    server_id: String,
    current: RwLock<Arc<ServerKey>>,
    rotations: RwLock<Vec<KeyRotation>>,
    /// Rotations one at a time.
    rotating: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("pin", &self.current().pin)
            .finish()
    }
}

/// The fingerprint of the server key kept in the data directory `data`
/// (for the admin CLI on the server's machine).
pub fn pin_of_data_dir(data: &Path) -> Result<KeyPin, TlsError> {
    let path = data.join(TLS_DIR).join(KEY_FILE);
    let key = rcgen::KeyPair::from_pem(&read(&path)?).map_err(|e| TlsError::Bad {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(KeyPin::of_spki(&key.public_key_der()))
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    crate::secrets::write_private(path, text).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn certs(pem: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let chain = chain.map_err(|e| TlsError::Bad {
        path: path.to_path_buf(),
        reason: format!("not PEM certificates: {e}"),
    })?;
    if chain.is_empty() {
        return Err(TlsError::Bad {
            path: path.to_path_buf(),
            reason: "no certificate in the file".into(),
        });
    }
    Ok(chain)
}

/// A new key and a self-signed certificate for it (PEM: certificate, key).
fn self_signed() -> Result<(String, String), TlsError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    // Nodes check the key, not names or dates (the token pins the key), so
    // the certificate only has to be well formed.
    let mut params = rcgen::CertificateParams::new(vec!["peermesh-control".to_string()])
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "peermesh control server");
    let cert = params
        .self_signed(&key)
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl KeyStore {
    /// Loads the server key from `data`/tls (making it on first start), its
    /// rotations from `store`, and, for a CA certificate whose key changed,
    /// rotates to it.
    pub async fn open(
        data: &Path,
        source: CertSource,
        store: Store,
        server_id: &str,
    ) -> Result<Arc<Self>, TlsError> {
        let dir = data.join(TLS_DIR);
        std::fs::create_dir_all(&dir).map_err(|source| TlsError::Io {
            path: dir.clone(),
            source,
        })?;
        let rotations = match store.meta_bytes(ROTATIONS_META)? {
            Some(b) => {
                KeyRotations::decode(b.as_slice())
                    .map_err(|e| TlsError::Bad {
                        path: dir.clone(),
                        reason: format!("stored key rotations are corrupt: {e}"),
                    })?
                    .rotations
            }
            None => Vec::new(),
        };
        // A rotation interrupted after it was recorded: finish it.
        let next_key = dir.join(NEXT_KEY_FILE);
        if next_key.exists() {
            let pem = read(&next_key)?;
            let recorded = rotations.last().is_some_and(|r| {
                rcgen::KeyPair::from_pem(&pem).is_ok_and(|k| k.public_key_der() == r.new_key)
            });
            if recorded {
                tracing::warn!("finishing a key rotation interrupted by a crash");
                Self::install_next(&dir)?;
            } else {
                tracing::warn!("dropping a key rotation that was never recorded");
                let _ = std::fs::remove_file(&next_key);
                let _ = std::fs::remove_file(dir.join(NEXT_CERT_FILE));
            }
        }
        let key_path = dir.join(KEY_FILE);
        if !key_path.exists() {
            let (cert, key) = match &source {
                CertSource::SelfSigned => self_signed()?,
                CertSource::Files { cert, key } => (read(cert)?, read(key)?),
            };
            if matches!(source, CertSource::SelfSigned) {
                write_private(&dir.join(CERT_FILE), &cert)?;
            }
            write_private(&key_path, &key)?;
            tracing::info!(dir = %dir.display(), "server key created");
        }
        let current = Self::load_current(&dir, &source)?;
        let this = Arc::new(Self {
            dir,
            source,
            store,
            server_id: server_id.to_string(),
            current: RwLock::new(Arc::new(current)),
            rotations: RwLock::new(rotations),
            rotating: tokio::sync::Mutex::new(()),
        });
        if let CertSource::Files { key, .. } = &this.source {
            let given = read(key)?;
            if given.trim() != this.current().key_pem.trim() {
                tracing::info!("--tls-key holds a new key; rotating to it");
                this.rotate().await?;
            }
        }
        Ok(this)
    }

    /// The key in use: `DATA/tls/key.pem` with the self-signed certificate,
    /// or with `--tls-cert` when that certificate is for this key.
    fn load_current(dir: &Path, source: &CertSource) -> Result<ServerKey, TlsError> {
        let key_path = dir.join(KEY_FILE);
        let key_pem = read(&key_path)?;
        let cert_path = match source {
            CertSource::SelfSigned => dir.join(CERT_FILE),
            CertSource::Files { cert, .. } => cert.clone(),
        };
        let chain = certs(&read(&cert_path)?, &cert_path)?;
        match ServerKey::new(chain, key_pem.clone(), &cert_path) {
            Ok(k) => Ok(k),
            // A CA certificate renewed with a new key while the old key is
            // still the one in use: serve a self-made certificate of the old
            // key until the rotation (right after this) moves to the new one.
            Err(_) if matches!(source, CertSource::Files { .. }) => {
                let kp = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Bad {
                    path: key_path.clone(),
                    reason: e.to_string(),
                })?;
                let params = rcgen::CertificateParams::new(vec!["peermesh-control".to_string()])
                    .map_err(|e| TlsError::Generate(e.to_string()))?;
                let cert = params
                    .self_signed(&kp)
                    .map_err(|e| TlsError::Generate(e.to_string()))?;
                ServerKey::new(vec![cert.der().clone()], key_pem, &key_path)
            }
            Err(e) => Err(e),
        }
    }

    fn install_next(dir: &Path) -> Result<(), TlsError> {
        let mv = |from: &str, to: &str| {
            let (from, to) = (dir.join(from), dir.join(to));
            if from.exists() {
                std::fs::rename(&from, &to).map_err(|source| TlsError::Io { path: to, source })?;
            }
            Ok::<_, TlsError>(())
        };
        mv(NEXT_CERT_FILE, CERT_FILE)?;
        mv(NEXT_KEY_FILE, KEY_FILE)
    }

    pub fn current(&self) -> Arc<ServerKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn pin(&self) -> KeyPin {
        self.current().pin
    }

    /// The key and its rotations, as nodes check them.
    pub fn identity(&self) -> ServerIdentity {
        ServerIdentity {
            key: self.current().spki.clone(),
            rotations: self
                .rotations
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            server_id: self.server_id.clone(),
        }
    }

    /// Signs `msg` with the key in use.
    pub fn sign(&self, msg: &[u8]) -> ServerSignature {
        self.current().sign(msg)
    }

    /// Replaces the server key: a new self-signed key, or the key of the
    /// (renewed) `--tls-cert`/`--tls-key`. The old key signs the new one.
    /// Returns the old and the new key's pins.
    pub async fn rotate(&self) -> Result<(KeyPin, KeyPin), TlsError> {
        let _one = self.rotating.lock().await;
        let old = self.current();
        let (cert_pem, key_pem) = match &self.source {
            CertSource::SelfSigned => self_signed()?,
            CertSource::Files { cert, key } => (read(cert)?, read(key)?),
        };
        let cert_path = match &self.source {
            CertSource::SelfSigned => self.dir.join(NEXT_CERT_FILE),
            CertSource::Files { cert, .. } => cert.clone(),
        };
        let next = ServerKey::new(certs(&cert_pem, &cert_path)?, key_pem.clone(), &cert_path)?;
        if next.pin == old.pin {
            return Err(TlsError::Rotate(
                "the new key is the key in use: install the renewed certificate and its new key first"
                    .into(),
            ));
        }
        let at_ms = crate::sessions::system_clock()();
        let rotation = KeyRotation {
            old_key: old.spki.clone(),
            new_key: next.spki.clone(),
            signature: Some(old.sign(&signing::rotation_payload(
                &self.server_id,
                &next.spki,
                at_ms,
            ))),
            at_ms,
        };
        // New key beside the old, then the rotation recorded for good, then
        // the new key in place (see the module documentation).
        if matches!(self.source, CertSource::SelfSigned) {
            write_private(&self.dir.join(NEXT_CERT_FILE), &cert_pem)?;
        }
        write_private(&self.dir.join(NEXT_KEY_FILE), &key_pem)?;
        let mut all = self
            .rotations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        all.push(rotation);
        let rotations = KeyRotations {
            rotations: all.clone(),
        }
        .encode_to_vec();
        self.store
            .write(|t| t.meta_put_bytes(ROTATIONS_META, &rotations))?;
        self.store.flush().await?;
        Self::install_next(&self.dir)?;
        *self.rotations.write().unwrap_or_else(|p| p.into_inner()) = all;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        let new = self.pin();
        tracing::info!(old = %old.pin, %new, "server key rotated");
        Ok((old.pin, new))
    }

    /// The TLS configuration: always the key in use (rotation takes effect
    /// for the next handshake).
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(ptls::provider())
            .with_safe_default_protocol_versions()
            .expect("aws-lc supports the default TLS versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![ptls::ALPN_H2.to_vec()];
        Arc::new(config)
    }
}

#[derive(Debug)]
struct Resolver(Arc<KeyStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
}

/// What a connection's requests know about it (in their extensions).
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub tls: bool,
    /// Plaintext from an address the server takes no plaintext from: every
    /// request is refused with [`Self::refusal`].
    pub plaintext_refused: bool,
    pub activity: Arc<Activity>,
}

impl ConnInfo {
    /// Why a request on this connection is refused, if it is.
    pub fn refusal(&self) -> Option<tonic::Status> {
        self.plaintext_refused.then(|| {
            tonic::Status::failed_precondition(format!(
                "this control server takes plaintext (http://) only from loopback, and {} is not: \
                 use https:// (the join token carries the server key's fingerprint)",
                self.remote.ip()
            ))
        })
    }
}

/// A connection's use, for the idle timeout.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    /// Milliseconds after `start` of the last request.
    last_request_ms: AtomicU64,
    /// Open server streams (watches).
    streams: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_request_ms: AtomicU64::new(0),
            streams: AtomicUsize::new(0),
        }
    }

    pub fn request(&self) {
        self.last_request_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Counts an open stream until the guard is dropped.
    pub fn stream(self: &Arc<Self>) -> StreamGuard {
        self.streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }

    /// When the connection counts as idle, or `None` while a stream is open.
    fn idle_at(&self) -> Option<Instant> {
        if self.streams.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(
            self.start
                + Duration::from_millis(self.last_request_ms.load(Ordering::Relaxed))
                + IDLE_TIMEOUT,
        )
    }
}

/// See [`Activity::stream`].
#[derive(Debug)]
pub struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
        self.0.request();
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted connection, TLS or plaintext, closed when idle.
pub struct ServerIo {
    io: Io,
    info: ConnInfo,
    idle: Pin<Box<Sleep>>,
}

impl Connected for ServerIo {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.idle.as_mut().poll(cx).is_ready() {
            match this.info.activity.idle_at() {
                Some(at) if at <= Instant::now() => {
                    tracing::debug!(remote = %this.info.remote, "closing an idle connection");
                    // End of stream: the HTTP/2 connection closes.
                    return Poll::Ready(Ok(()));
                }
                Some(at) => this.idle.as_mut().reset(at),
                None => this.idle.as_mut().reset(Instant::now() + IDLE_TIMEOUT),
            }
        }
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Where plaintext is taken from.
#[derive(Clone, Copy, Debug)]
pub struct PlaintextPolicy {
    /// From any address (`--insecure`), not only loopback.
    pub anywhere: bool,
}

impl PlaintextPolicy {
    fn allows(&self, remote: &SocketAddr) -> bool {
        let ip = match remote.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(std::net::IpAddr::V4)
                .unwrap_or(std::net::IpAddr::V6(v6)),
            ip => ip,
        };
        self.anywhere || ip.is_loopback()
    }
}

/// The first byte of a TLS connection (a handshake record); an HTTP/2
/// connection without TLS starts with the preface `PRI * HTTP/2.0`.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The connections of `listener`, TLS (with `config`) or plaintext, for
/// tonic's `serve_with_incoming`. Handshakes run in their own tasks, so a
/// slow client holds up no other.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    policy: PlaintextPolicy,
) -> ReceiverStream<io::Result<ServerIo>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                p = handshakes.clone().acquire_owned() => p.expect("never closed"),
                _ = tx.closed() => return,
            };
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors, most likely: wait for
                        // some to be closed rather than spin.
                        tracing::warn!(error = %e, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let accepted =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, accept(tcp, remote, &acceptor, policy))
                        .await;
                match accepted {
                    Ok(Ok(io)) => {
                        let _ = tx.send(Ok(io)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "connection refused"),
                    Err(_) => tracing::debug!(%remote, "handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn accept(
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: &tokio_rustls::TlsAcceptor,
    policy: PlaintextPolicy,
) -> io::Result<ServerIo> {
    // Nagle would hold back small answers and stream updates until the
    // peer's delayed ACK (~40 ms on Linux).
    tcp.set_nodelay(true)?;
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
    }
    let activity = Arc::new(Activity::new());
    let (io, tls) = if first[0] == TLS_HANDSHAKE_RECORD {
        (Io::Tls(Box::new(acceptor.accept(tcp).await?)), true)
    } else {
        (Io::Plain(tcp), false)
    };
    Ok(ServerIo {
        io,
        info: ConnInfo {
            remote,
            tls,
            plaintext_refused: !tls && !policy.allows(&remote),
            activity,
        },
        idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate and its key (PEM files, as --tls-cert/--tls-key) in
    /// `dir`, named `name`.
    fn ca_files(dir: &Path, name: &str) -> (PathBuf, PathBuf, KeyPin) {
        let (cert, key) = self_signed().unwrap();
        let pin = KeyPin::of_spki(&rcgen::KeyPair::from_pem(&key).unwrap().public_key_der());
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        (c, k, pin)
    }

    #[tokio::test]
    async fn a_self_made_key_stays_and_a_rotation_is_signed_by_the_old_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let keys = KeyStore::open(dir.path(), CertSource::SelfSigned, store.clone(), "srv")
            .await
            .unwrap();
        let first = keys.pin();
        assert_eq!(pin_of_data_dir(dir.path()).unwrap(), first);
        drop(keys);
        let keys = KeyStore::open(dir.path(), CertSource::SelfSigned, store.clone(), "srv")
            .await
            .unwrap();
        assert_eq!(keys.pin(), first, "the key survives a restart");

        let (old, new) = keys.rotate().await.unwrap();
        assert_eq!(old, first);
        assert_ne!(new, first);
        assert_eq!(pin_of_data_dir(dir.path()).unwrap(), new);
        let identity = keys.identity();
        assert_eq!(KeyPin::of_spki(&identity.key), new);
        let [r] = identity.rotations.as_slice() else {
            panic!("one rotation: {identity:?}");
        };
        ptls::check_rotation("srv", r).expect("signed by the old key");
        assert!(ptls::check_rotation("another server", r).is_err());
        // A node that pinned the first key follows to the new one.
        let trust = ptls::ServerTrust::new(Some(first));
        trust.accept("srv", Some(&identity)).unwrap();
        assert_eq!(trust.pin(), Some(new));
    }

    #[tokio::test]
    async fn a_certificate_from_files_is_served_and_a_renewal_with_a_new_key_is_rotated_to() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let (cert, key, pin) = ca_files(dir.path(), "ca1");
        let source = CertSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        };
        let keys = KeyStore::open(dir.path(), source.clone(), store.clone(), "srv")
            .await
            .unwrap();
        assert_eq!(keys.pin(), pin, "tokens pin the CA certificate's key");
        assert!(keys.identity().rotations.is_empty());
        drop(keys);

        // The ACME client renewed the certificate with a new key.
        let (cert2, key2, pin2) = ca_files(dir.path(), "ca2");
        std::fs::rename(cert2, &cert).unwrap();
        std::fs::rename(key2, &key).unwrap();
        let keys = KeyStore::open(dir.path(), source, store, "srv")
            .await
            .unwrap();
        assert_eq!(keys.pin(), pin2);
        let identity = keys.identity();
        let trust = ptls::ServerTrust::new(Some(pin));
        trust
            .accept("srv", Some(&identity))
            .expect("the old pin follows");
        assert_eq!(trust.pin(), Some(pin2));
    }

    #[test]
    fn plaintext_only_from_loopback_unless_insecure() {
        let only_loopback = PlaintextPolicy { anywhere: false };
        let from = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert!(only_loopback.allows(&from("127.0.0.1:5000")));
        assert!(only_loopback.allows(&from("[::1]:5000")));
        // An IPv4 loopback client on a dual-stack listener.
        assert!(only_loopback.allows(&from("[::ffff:127.0.0.1]:5000")));
        assert!(!only_loopback.allows(&from("192.0.2.1:5000")));
        assert!(!only_loopback.allows(&from("[::ffff:192.0.2.1]:5000")));
        assert!(!only_loopback.allows(&from("[2001:db8::1]:5000")));
        let insecure = PlaintextPolicy { anywhere: true };
        assert!(insecure.allows(&from("192.0.2.1:5000")));
    }

    #[test]
    fn a_refused_plaintext_connection_is_told_why() {
        let info = |remote: &str, tls: bool, refused: bool| ConnInfo {
            remote: remote.parse().unwrap(),
            tls,
            plaintext_refused: refused,
            activity: Arc::new(Activity::new()),
        };
        let refusal = info("192.0.2.1:5000", false, true)
            .refusal()
            .expect("refused");
        assert_eq!(refusal.code(), tonic::Code::FailedPrecondition);
        assert!(
            refusal
                .message()
                .contains("only from loopback, and 192.0.2.1 is not"),
            "{}",
            refusal.message()
        );
        assert!(info("192.0.2.1:5000", true, false).refusal().is_none());
    }
}
