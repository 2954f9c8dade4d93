//! A TCP listener: its socket, its accept loop, and the connections it has handed to the relay.
//!
//! The accept loop reads the listener's current [`ListenerSettings`] through an `ArcSwap` on every
//! connection, so a reload that changes a listener in place (its cluster, idle timeout, cap, allowed
//! sources, even its name) never touches the socket or the connections already open. Each connection is
//! a task tracked by the listener's [`TaskTracker`], which is what a drain waits on; the listener's
//! `close` token ends the connections still open when a drain runs out of time.
//!
//! Accept errors (running out of file descriptors, say) back off exponentially instead of spinning.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use keel_schemas::config::Listener as ListenerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Cluster;
use crate::metrics::{ListenerMetrics, Metrics};
use crate::relay::{self, DirectionCounters, RelayEnd};
use crate::runtime::ClusterMap;

/// Pending connections the kernel queues before `accept`.
const BACKLOG: i32 = 1024;
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What a listener does with a new connection; replaced whole on reload.
#[derive(Debug)]
pub struct ListenerSettings {
    pub config: ListenerConfig,
    pub metrics: ListenerMetrics,
}

/// Binds a listening socket for `address`, with `SO_REUSEADDR` so a restarted proxy can bind while old
/// connections linger in TIME_WAIT.
pub fn bind(address: SocketAddr) -> io::Result<TcpListener> {
    bind_socket(address).and_then(|socket| TcpListener::from_std(socket.into()))
}

fn bind_socket(address: SocketAddr) -> io::Result<socket2::Socket> {
    let domain = socket2::Domain::for_address(address);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket)
}

/// A bound listening socket and the address it got (the port, when the config asked for port 0).
#[derive(Debug)]
pub struct BoundSocket {
    socket: TcpListener,
    local_addr: SocketAddr,
}

impl BoundSocket {
    pub fn bind(address: SocketAddr) -> io::Result<Self> {
        let socket = bind(address)?;
        let local_addr = socket.local_addr()?;
        Ok(Self { socket, local_addr })
    }
}

/// A listener that is accepting (or draining, once stopped).
#[derive(Debug)]
pub struct RunningListener {
    pub settings: Arc<ArcSwap<ListenerSettings>>,
    pub local_addr: SocketAddr,
    stop_accepting: CancellationToken,
    close: CancellationToken,
    connections: TaskTracker,
    active: Arc<AtomicUsize>,
}

impl RunningListener {
    /// Starts accepting on `socket`. `close` (a child of the proxy's close-all token) ends this
    /// listener's connections; `all_connections` tracks them for a whole-proxy drain.
    pub fn start(
        bound: BoundSocket,
        config: ListenerConfig,
        metrics: &Metrics,
        clusters: Arc<ArcSwap<ClusterMap>>,
        close: CancellationToken,
        all_connections: TaskTracker,
    ) -> Self {
        let BoundSocket { socket, local_addr } = bound;
        let settings = Arc::new(ArcSwap::from_pointee(ListenerSettings {
            metrics: ListenerMetrics::new(metrics, &config.name),
            config,
        }));
        let listener = Self {
            settings: Arc::clone(&settings),
            local_addr,
            stop_accepting: CancellationToken::new(),
            close,
            connections: TaskTracker::new(),
            active: Arc::new(AtomicUsize::new(0)),
        };
        let accept = AcceptLoop {
            socket,
            settings,
            clusters,
            stop: listener.stop_accepting.clone(),
            close: listener.close.clone(),
            connections: listener.connections.clone(),
            all_connections,
            active: Arc::clone(&listener.active),
        };
        tokio::spawn(accept.run());
        listener
    }

    /// Applies new settings to connections accepted from now on.
    pub fn update(&self, config: ListenerConfig, metrics: &Metrics) {
        let current = self.settings.load();
        let metrics = if current.config.name == config.name {
            current.metrics.clone()
        } else {
            ListenerMetrics::new(metrics, &config.name)
        };
        self.settings.store(Arc::new(ListenerSettings { config, metrics }));
    }

    pub fn name(&self) -> String {
        self.settings.load().config.name.clone()
    }

    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Tells the accept loop to stop; it closes the socket as soon as it runs, and from then on the
    /// kernel refuses new connections.
    pub fn stop_accepting(&self) {
        self.stop_accepting.cancel();
    }

    /// Stops accepting, waits up to `deadline` for open connections to finish, then closes the rest.
    /// Returns how many had to be closed.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.stop_accepting();
        self.connections.close();
        if tokio::time::timeout(deadline, self.connections.wait()).await.is_ok() {
            return 0;
        }
        let remaining = self.active_connections();
        self.close.cancel();
        self.connections.wait().await;
        remaining
    }
}

struct AcceptLoop {
    socket: TcpListener,
    settings: Arc<ArcSwap<ListenerSettings>>,
    clusters: Arc<ArcSwap<ClusterMap>>,
    stop: CancellationToken,
    close: CancellationToken,
    connections: TaskTracker,
    all_connections: TaskTracker,
    active: Arc<AtomicUsize>,
}

impl AcceptLoop {
    async fn run(self) {
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            let accepted = tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                accepted = self.socket.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    self.admit(stream, peer);
                }
                // The client gave up before we accepted: nothing to do.
                Err(error) if is_per_connection(&error) => {}
                Err(error) => {
                    let settings = self.settings.load();
                    settings.metrics.accept_errors.increment(1);
                    tracing::warn!(listener = %settings.config.name, %error, ?backoff, "accept failed; backing off");
                    tokio::select! {
                        () = self.stop.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
        // Dropping the socket here closes it; connections already accepted carry on.
    }

    fn admit(&self, stream: TcpStream, peer: SocketAddr) {
        let settings = self.settings.load_full();
        let config = &settings.config;
        if !config.allowed_sources.is_empty()
            && !config.allowed_sources.iter().any(|net| net.contains(peer.ip()))
        {
            settings.metrics.rejected_source.increment(1);
            tracing::debug!(listener = %config.name, %peer, "client not in allowed_sources; closed");
            return;
        }
        let active = self.active.fetch_add(1, Ordering::Relaxed);
        if let Some(max) = config.max_connections
            && active >= max as usize
        {
            self.active.fetch_sub(1, Ordering::Relaxed);
            settings.metrics.rejected_over_limit.increment(1);
            tracing::debug!(listener = %config.name, %peer, max, "max_connections reached; closed");
            return;
        }
        settings.metrics.accepted.increment(1);
        settings.metrics.active.increment(1.0);
        let guard = ActiveGuard { active: Arc::clone(&self.active), settings: Arc::clone(&settings) };
        let cluster = self.clusters.load().get(&config.cluster).cloned();
        let connection = handle(stream, peer, settings, cluster, self.close.clone(), guard);
        self.connections.spawn(self.all_connections.track_future(connection));
    }
}

/// Errors from `accept` that concern only the one connection that failed.
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    )
}

/// Gives back a listener's connection slot when its connection ends.
struct ActiveGuard {
    active: Arc<AtomicUsize>,
    settings: Arc<ListenerSettings>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.settings.metrics.active.decrement(1.0);
    }
}

/// One downstream connection: connect upstream, relay, log how it ended.
async fn handle(
    mut downstream: TcpStream,
    peer: SocketAddr,
    settings: Arc<ListenerSettings>,
    cluster: Option<Arc<Cluster>>,
    close: CancellationToken,
    _guard: ActiveGuard,
) {
    let config = &settings.config;
    let Some(cluster) = cluster else {
        // Validation makes this impossible for a config that passed it; say so loudly if it happens.
        tracing::error!(listener = %config.name, cluster = %config.cluster, "listener points at a missing cluster");
        return;
    };
    let _ = downstream.set_nodelay(true);
    let upstream = tokio::select! {
        upstream = cluster.connect() => upstream,
        () = close.cancelled() => return,
    };
    let mut upstream = match upstream {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::warn!(listener = %config.name, %peer, %error, "no upstream; downstream connection closed");
            return;
        }
    };
    let upload = DirectionCounters {
        from: settings.metrics.received_bytes.clone(),
        to: cluster.metrics().sent_bytes.clone(),
    };
    let download = DirectionCounters {
        from: cluster.metrics().received_bytes.clone(),
        to: settings.metrics.sent_bytes.clone(),
    };
    let idle = Some(config.idle_timeout.get()).filter(|timeout| !timeout.is_zero());
    let ended = relay::relay(&mut downstream, &mut upstream.stream, idle, &upload, &download, &close).await;
    match ended {
        Ok(RelayEnd::Closed) => {}
        Ok(RelayEnd::IdleTimeout) => {
            tracing::debug!(listener = %config.name, %peer, "idle timeout; connection closed");
        }
        Ok(RelayEnd::ClosedByProxy) => {
            tracing::debug!(listener = %config.name, %peer, "closed by the proxy (drain deadline or shutdown)");
        }
        Err(error) => {
            tracing::debug!(listener = %config.name, %peer, endpoint = %upstream.endpoint.label(), %error, "relay ended");
        }
    }
}
