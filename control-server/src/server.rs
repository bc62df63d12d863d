//! Starting a control server: data directory, admin credential, server
//! key, listener (TLS, and plaintext from loopback), limits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use peermesh_proto::api::{
    admin_server::AdminServer, node_control_server::NodeControlServer,
    relay_control_server::RelayControlServer,
};
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;

use crate::api::{admin::AdminApi, node::NodeApi, relay::RelayApi};
use crate::hub::Hub;
use crate::limits::Limits;
use crate::ratelimit::RateLimiters;
use crate::registry::Registry;
use crate::relays::RelayDirectory;
use crate::sessions::{system_clock, Sessions};
use crate::tls::{CertSource, ConnInfo, KeyStore, PlaintextPolicy, TlsError};
use crate::{secrets, validate};

pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// How often the server pings an idle HTTP/2 connection. A node or relay
/// that vanished without closing its connection (power cut, lost NAT
/// mapping, cable out) holds its watch stream, and so stays online in every
/// map, until a ping goes unanswered; ten seconds (plus
/// [`KEEPALIVE_TIMEOUT`]) brings that under half a minute for a few bytes
/// per connection and interval.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a keepalive ping may go unanswered before the connection (and
/// its streams) is dropped: far above any round trip a live peer has, so
/// only dead ones are cut.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Stops the STUN tasks with the server.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening the state database: {0}")]
    Store(#[from] crate::error::ControlError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("server key: {0}")]
    Tls(#[from] TlsError),
}

/// How a server is started besides its address and data directory.
#[derive(Clone, Debug)]
pub struct Options {
    pub limits: Limits,
    /// The TLS certificate: self-made (default) or a CA's.
    pub cert: CertSource,
    /// Plaintext from any address, not only loopback.
    pub insecure: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            cert: CertSource::SelfSigned,
            insecure: false,
        }
    }
}

/// Every call first: refuses plaintext from where the server takes none,
/// and notes the connection's activity (for the idle timeout).
fn transport_check(req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    let info = req
        .extensions()
        .get::<ConnInfo>()
        .ok_or_else(|| tonic::Status::internal("request without connection information"))?;
    if let Some(refusal) = info.refusal() {
        return Err(refusal);
    }
    info.activity.request();
    Ok(req)
}

type Check = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;

/// Reads the admin credential from `data`, creating it (mode 0600) on the
/// first start.
pub fn admin_credential(data: &Path) -> Result<String, ServeError> {
    let io = |source| ServeError::DataDir {
        path: data.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(data).map_err(io)?;
    let path = data.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if secrets::well_formed(s.trim(), secrets::ADMIN_PREFIX) => Ok(s.trim().to_string()),
        Ok(_) => Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} does not hold an admin credential", path.display()),
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let credential = secrets::generate(secrets::ADMIN_PREFIX);
            secrets::write_private(&path, &format!("{credential}\n")).map_err(io)?;
            Ok(credential)
        }
        Err(e) => Err(io(e)),
    }
}

pub struct Server {
    pub registry: Arc<Registry>,
    pub relays: Arc<RelayDirectory>,
    pub keys: Arc<KeyStore>,
    listener: TcpListener,
    admin_credential: String,
    stun: Option<crate::stun::StunServer>,
    limits: Limits,
    rates: Arc<RateLimiters>,
    insecure: bool,
}

impl Server {
    pub async fn bind(listen: SocketAddr, data: &Path) -> Result<Self, ServeError> {
        Self::bind_with(listen, data, Options::default()).await
    }

    pub async fn bind_with(
        listen: SocketAddr,
        data: &Path,
        options: Options,
    ) -> Result<Self, ServeError> {
        let Options {
            limits,
            cert,
            insecure,
        } = options;
        let admin_credential = admin_credential(data)?;
        let store = crate::store::Store::open(&data.join("db"))?;
        let sessions = Sessions::open(store.clone(), system_clock(), &limits)?;
        let keys = KeyStore::open(data, cert, store, sessions.server_id()).await?;
        let hub = Hub::new(limits.watch_backlog);
        let registry = Registry::open(sessions.clone(), hub.clone(), &limits)?;
        let relays = RelayDirectory::new(sessions, hub);
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ServeError::Listen {
                addr: listen,
                source,
            })?;
        Ok(Self {
            registry,
            relays,
            keys,
            listener,
            admin_credential,
            stun: None,
            rates: RateLimiters::new(&limits.rates),
            limits,
            insecure,
        })
    }

    /// Also answers STUN for NAT behaviour discovery (seed 003) on
    /// `primary` and `alternate` (different addresses and ports; four
    /// sockets), and tells nodes so.
    pub async fn with_stun(
        mut self,
        primary: SocketAddr,
        alternate: SocketAddr,
    ) -> Result<Self, crate::stun::StunServeError> {
        self.stun = Some(
            crate::stun::StunServer::bind(primary, alternate)
                .await?
                .with_rate_limits(self.rates.clone()),
        );
        Ok(self)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        self.rates.spawn_janitor();
        let max_watches = self.limits.max_watches_per_node;
        let mut node_api = NodeApi::new(
            self.registry.clone(),
            self.keys.clone(),
            self.rates.clone(),
            max_watches,
        );
        let _stun_tasks = match self.stun {
            Some(stun) => {
                let (primary, alternate) = stun.endpoints();
                tracing::info!(%primary, %alternate, "STUN (NAT behaviour discovery) listening");
                node_api = node_api.with_stun(primary, alternate);
                AbortOnDrop(stun.spawn())
            }
            None => AbortOnDrop(Vec::new()),
        };
        let check: Check = transport_check;
        let node = InterceptedService::new(
            NodeControlServer::new(node_api).max_decoding_message_size(validate::MAX_MESSAGE_BYTES),
            check,
        );
        let relay = InterceptedService::new(
            RelayControlServer::new(RelayApi::new(
                self.relays.clone(),
                self.keys.clone(),
                max_watches,
            ))
            .max_decoding_message_size(validate::MAX_MESSAGE_BYTES),
            check,
        );
        let admin = InterceptedService::new(
            AdminServer::new(AdminApi::new(
                self.registry.clone(),
                self.relays.clone(),
                self.keys.clone(),
                &self.admin_credential,
            ))
            .max_decoding_message_size(validate::MAX_MESSAGE_BYTES),
            check,
        );
        let incoming = crate::tls::incoming(
            self.listener,
            self.keys.server_config(),
            PlaintextPolicy {
                anywhere: self.insecure,
            },
        );
        tonic::transport::Server::builder()
            // Dead peers must drop their watch streams (and go offline) soon.
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .max_concurrent_streams(Some(self.limits.max_streams_per_connection))
            .timeout(self.limits.request_timeout)
            .add_service(node)
            .add_service(relay)
            .add_service(admin)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
        Ok(())
    }
}
