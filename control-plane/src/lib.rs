//! Keel's control plane: the library behind the `control-plane` binary.
//!
//! Writes come in through the REST API ([`api`]), are checked with the proxy's own validation
//! (`keel_schemas::resource`), and land in the [`store`] (SQLite + memory). After writes settle (the
//! debounce), a new [`snapshot::World`] is published; each proxy's stream session ([`stream`]) builds its
//! node's snapshot from it and sends it if its version changed. Proxies answer with ACK or NACK and report
//! their status on the same stream; [`fleet`] keeps what they said, for `/debug/proxies` and the `Node`
//! and `Router` resources. [`ddns`] keeps `DnsRecord`s pointing at the addresses nodes report (seed 000's
//! `POST /api/v1/public-ip`). [`serve`] accepts HTTP/1.1 and HTTP/2, in clear or over TLS.

pub mod api;
pub mod auth;
pub mod ddns;
pub mod fleet;
pub mod netcheck;
pub mod serve;
pub mod snapshot;
pub mod store;
pub mod stream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::auth::Tokens;
use crate::fleet::Fleet;
use crate::snapshot::World;
use crate::store::Store;

/// How long the control plane waits after a write for more writes before it rebuilds snapshots.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(20);
/// [`Settings::request_head_timeout`] unless told otherwise (nginx's `client_header_timeout` is 60 s;
/// a request head is a few hundred bytes).
pub const DEFAULT_REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// [`Settings::max_connections`] unless told otherwise: room for a large fleet's streams (one per
/// proxy) and the API's clients, far below what the descriptors of a default container allow.
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;

/// How the control plane runs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub database: PathBuf,
    pub tokens: Tokens,
    /// PEM certificate chain and key; plain HTTP without them.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub debounce: Duration,
    /// How often connected proxies' records are written to their `Node` resources.
    pub node_flush_interval: Duration,
    /// How long a client has to send a request's line and headers (HTTP/1.1), or the bytes that say
    /// which HTTP it speaks; slower connections are closed, so that slow clients cannot hold the server.
    pub request_head_timeout: Duration,
    /// Connections served at once; past it, a new connection is closed as soon as it is accepted (and
    /// counted in the log), so that a flood cannot take every descriptor.
    pub max_connections: usize,
    pub netcheck: NetCheckSettings,
}

impl Settings {
    /// The settings `control-plane` runs with by default, for `listen`, `database` and `tokens`: no TLS,
    /// [`DEFAULT_DEBOUNCE`], nodes flushed every second, [`DEFAULT_REQUEST_HEAD_TIMEOUT`],
    /// [`DEFAULT_MAX_CONNECTIONS`], network checking's defaults. Change a field to differ.
    pub fn new(listen: SocketAddr, database: PathBuf, tokens: Tokens) -> Self {
        Self {
            listen,
            database,
            tokens,
            tls: None,
            debounce: DEFAULT_DEBOUNCE,
            node_flush_interval: Duration::from_secs(1),
            request_head_timeout: DEFAULT_REQUEST_HEAD_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            netcheck: NetCheckSettings::default(),
        }
    }
}

/// Network checking's settings.
#[derive(Clone, Debug)]
pub struct NetCheckSettings {
    /// A seed 002 client without a heartbeat for this long is gone.
    pub expiry: Duration,
    /// How often the network health report is logged; zero for never.
    pub report_interval: Duration,
    /// Seed 002's endpoints without a token.
    pub anonymous: bool,
    /// A metric series per probed pair.
    pub pair_metrics: bool,
}

impl Default for NetCheckSettings {
    fn default() -> Self {
        Self {
            expiry: Duration::from_secs(15),
            report_interval: Duration::from_secs(300),
            anonymous: false,
            pair_metrics: false,
        }
    }
}

/// What every request handler shares.
#[derive(Debug)]
pub struct State {
    pub store: Mutex<Store>,
    pub tokens: Tokens,
    pub fleet: Fleet,
    worlds: watch::Sender<Arc<World>>,
    writes: Notify,
    /// Wakes the DNS outbox worker when an update is queued.
    pub ddns_wakeup: Notify,
    /// Bumped at every address report: wakes the long polls of `GET /api/v1/public-ip/{node}`.
    pub address_reports: watch::Sender<u64>,
    /// Live clients and their probe results (network checking).
    pub netcheck: netcheck::NetCheck,
    pub netcheck_anonymous: bool,
    pub netcheck_pair_metrics: bool,
    pub stop: CancellationToken,
}

impl State {
    /// Tells the debouncer that the store changed.
    pub fn written(&self) {
        self.writes.notify_one();
    }

    pub fn worlds(&self) -> watch::Receiver<Arc<World>> {
        self.worlds.subscribe()
    }

    /// A proxy connected or left: snapshots that assign peers must be built again.
    pub fn fleet_changed(&self) {
        if self.worlds.borrow().uses_peers() {
            self.written();
        }
    }
}

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    pub local_addr: SocketAddr,
    pub state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl ControlPlane {
    /// Opens the store, binds `settings.listen` and starts serving.
    pub async fn start(settings: Settings) -> anyhow::Result<Self> {
        let store = Store::open(&settings.database)
            .map_err(|error| anyhow::anyhow!("cannot open {}: {error}", settings.database.display()))?;
        if store.read_only() {
            tracing::error!(
                database = %settings.database.display(),
                "the database is read-only: the control plane serves what it holds and refuses every write (503) until it can write"
            );
        }
        let world = World::new(store.revision(), store.all());
        let state = Arc::new(State {
            store: Mutex::new(store),
            tokens: settings.tokens.clone(),
            fleet: Fleet::default(),
            worlds: watch::channel(Arc::new(world)).0,
            writes: Notify::new(),
            ddns_wakeup: Notify::new(),
            address_reports: watch::Sender::new(0),
            netcheck: netcheck::NetCheck::new(settings.netcheck.expiry),
            netcheck_anonymous: settings.netcheck.anonymous,
            netcheck_pair_metrics: settings.netcheck.pair_metrics,
            stop: CancellationToken::new(),
        });
        let acceptor = match &settings.tls {
            Some((cert, key)) => Some(serve::tls_acceptor(cert, key)?),
            None => None,
        };
        let listener = bind(settings.listen)
            .map_err(|error| anyhow::anyhow!("cannot listen on {}: {error}", settings.listen))?;
        let local_addr = listener.local_addr()?;
        tokio::spawn(debounce(Arc::clone(&state), settings.debounce));
        tokio::spawn(fleet::flush_nodes(Arc::clone(&state), settings.node_flush_interval));
        tokio::spawn(ddns::run(Arc::clone(&state)));
        if !settings.netcheck.report_interval.is_zero() {
            tokio::spawn(netcheck::report::run(Arc::clone(&state), settings.netcheck.report_interval));
        }
        let app = api::router(Arc::clone(&state));
        let stop = state.stop.clone();
        let limits = serve::Limits {
            head_timeout: settings.request_head_timeout,
            max_connections: settings.max_connections,
        };
        let task = tokio::spawn(serve::serve(listener, acceptor, app, stop, limits));
        tracing::info!(address = %local_addr, tls = settings.tls.is_some(), "control plane listening");
        Ok(Self { local_addr, state, task })
    }

    /// Stops accepting, ends every stream and waits for the server to finish.
    pub async fn stop(self) {
        self.state.stop.cancel();
        let _ = self.task.await;
    }

    /// Serves until the stop token is cancelled.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Binds the API's socket with a deep accept queue: after a control-plane restart every proxy of the
/// fleet reconnects within a second or so.
fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket =
        if address.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Connections the kernel may queue before the control plane accepts them (capped by somaxconn).
const ACCEPT_BACKLOG: u32 = 8192;

/// Publishes a new [`World`] once writes have settled for `debounce`.
async fn debounce(state: Arc<State>, debounce: Duration) {
    loop {
        tokio::select! {
            () = state.writes.notified() => {}
            () = state.stop.cancelled() => return,
        }
        tokio::time::sleep(debounce).await;
        let world = {
            let store = state.store.lock().await;
            World::new(store.revision(), store.all())
        };
        let world = if world.uses_peers() { world.with_peers(state.fleet.peers().await) } else { world };
        tracing::debug!(revision = world.revision, "snapshots rebuilt");
        state.worlds.send_replace(Arc::new(world));
    }
}
