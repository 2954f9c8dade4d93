//! A published service (`tunnels.publish`): for each of its routers, a control session that registers
//! the service, and a pool of idle connections the router pairs with visitors. A pooled connection that
//! receives `Connect` checks the visitor's proof of the service secret, dials the local service, answers
//! `Accepted` and relays; the router asks for a replacement with `Need`.
//!
//! A lost router is reconnected with jittered backoff; connections relaying at the time go on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use keel_schemas::config::Publish;
use keel_schemas::types::HostPort;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::conn::Conn;
use super::frame::{Frame, Kind, Open, Reason, read_frame, read_frame_and_following, write_frame};
use super::proof::{self, ReplayGuard};
use super::{Backoff, Context, HELLO_TIMEOUT, RouterEndpoint, ServiceMetrics, control_loop, relay_counted};
use crate::cluster::connect_to;

/// What a publication needs to serve, shared by its tasks.
#[derive(Debug)]
struct Settings {
    service: String,
    local: HostPort,
    secret: String,
    share: bool,
    pool: u16,
    connect_timeout: Duration,
    guard: ReplayGuard,
    metrics: ServiceMetrics,
    context: Context,
}

/// One router's side of a publication, as `/tunnels` shows it.
#[derive(Debug)]
struct Link {
    router: RouterEndpoint,
    registered: AtomicBool,
    /// `registered`, as a metric.
    registered_metric: metrics::Gauge,
    session: AtomicU64,
    idle: AtomicUsize,
}

/// A running `tunnels.publish` entry.
#[derive(Debug)]
pub struct Publication {
    settings: Arc<Settings>,
    links: Vec<Arc<Link>>,
    stop: CancellationToken,
}

#[derive(Clone, Debug, Serialize)]
pub struct PublicationStatus {
    pub service: String,
    pub local: String,
    pub routers: Vec<PublisherLinkStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PublisherLinkStatus {
    pub router: String,
    pub address: String,
    /// Registered with the router now.
    pub registered: bool,
    pub idle_connections: usize,
}

impl Publication {
    /// Starts registering `entry` with `routers` (the ones it names, resolved by the caller).
    pub fn start(entry: &Publish, routers: &[RouterEndpoint], max_skew: Duration, context: Context) -> Self {
        let settings = Arc::new(Settings {
            service: entry.name.clone(),
            local: entry.local.clone(),
            secret: entry.secret.as_ref().map(|s| s.expose().to_string()).unwrap_or_default(),
            share: entry.share,
            pool: entry.pool,
            connect_timeout: entry.connect_timeout.get(),
            guard: ReplayGuard::new(max_skew),
            metrics: ServiceMetrics::new(&context.metrics, &entry.name, "publisher"),
            context,
        });
        let stop = CancellationToken::new();
        let links: Vec<Arc<Link>> = routers
            .iter()
            .map(|router| {
                Arc::new(Link {
                    router: router.clone(),
                    registered: AtomicBool::new(false),
                    registered_metric: settings.metrics.router_up(&router.name),
                    session: AtomicU64::new(0),
                    idle: AtomicUsize::new(0),
                })
            })
            .collect();
        for link in &links {
            tokio::spawn(run_link(Arc::clone(&settings), Arc::clone(link), stop.clone()));
        }
        Self { settings, links, stop }
    }

    /// Unregisters (the control sessions close) and closes the idle pooled connections; relays go on.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn status(&self) -> PublicationStatus {
        PublicationStatus {
            service: self.settings.service.clone(),
            local: self.settings.local.to_string(),
            routers: self
                .links
                .iter()
                .map(|link| PublisherLinkStatus {
                    router: link.router.name.clone(),
                    address: link.router.address.to_string(),
                    registered: link.registered.load(Ordering::Relaxed),
                    idle_connections: link.idle.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }
}

impl Drop for Publication {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Why a session with a router ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Connect(String),
    #[error("no answer in time")]
    Timeout,
    #[error("refused: {reason} ({detail})")]
    Refused { reason: Reason, detail: String },
    #[error("{0}")]
    Protocol(String),
    #[error("connection lost")]
    Lost,
}

/// Keeps a session with one router up, reconnecting with backoff.
async fn run_link(settings: Arc<Settings>, link: Arc<Link>, stop: CancellationToken) {
    let mut backoff = Backoff::default();
    let mut first = true;
    let mut first_failure = true;
    loop {
        if !first {
            settings.metrics.reconnected(&link.router.name);
        }
        first = false;
        let result = session(&settings, &link, &stop, &mut backoff).await;
        let was_registered = link.registered.swap(false, Ordering::Relaxed);
        link.registered_metric.set(0.0);
        if stop.is_cancelled() {
            return;
        }
        if let Err(error) = result {
            if let SessionError::Refused { reason, .. } = &error {
                settings.metrics.handshake_failed(*reason);
            }
            // Loud once when a working session ends; quiet while retrying a router that stays down.
            if was_registered || first_failure {
                tracing::warn!(service = settings.service, router = link.router.name, %error, "tunnel publisher: session with the router ended");
            } else {
                tracing::debug!(service = settings.service, router = link.router.name, %error, "tunnel publisher: router still unreachable");
            }
            first_failure = false;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = stop.cancelled() => return,
        }
    }
}

async fn expect_frame(stream: &mut Conn) -> Result<Frame, SessionError> {
    match tokio::time::timeout(HELLO_TIMEOUT, read_frame(stream)).await {
        Err(_) => Err(SessionError::Timeout),
        Ok(Err(_)) => Err(SessionError::Lost),
        Ok(Ok(Frame::Refused { reason, detail })) => Err(SessionError::Refused { reason, detail }),
        Ok(Ok(frame)) => Ok(frame),
    }
}

/// One control session: register, fill the pool, serve `Need` until the connection ends.
async fn session(
    settings: &Arc<Settings>,
    link: &Arc<Link>,
    stop: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), SessionError> {
    let node = &settings.context.node;
    let mut stream = link.router.connect(Kind::Control, node, "", 0).await.map_err(SessionError::Connect)?;
    let session = match expect_frame(&mut stream).await? {
        Frame::Welcome { session, .. } => session,
        other => return Err(SessionError::Protocol(format!("expected Welcome, got {other:?}"))),
    };
    let register = Frame::Register { service: settings.service.clone(), share: settings.share };
    write_frame(&mut stream, &register).await.map_err(|_| SessionError::Lost)?;
    match expect_frame(&mut stream).await? {
        Frame::Status { .. } => {}
        other => return Err(SessionError::Protocol(format!("expected Status, got {other:?}"))),
    }
    link.session.store(session, Ordering::Relaxed);
    link.registered.store(true, Ordering::Relaxed);
    link.registered_metric.set(1.0);
    backoff.reset();
    tracing::info!(
        service = settings.service,
        router = link.router.name,
        session,
        "tunnel publisher: registered"
    );

    let pool_stop = stop.child_token();
    for _ in 0..settings.pool {
        tokio::spawn(pooled(Arc::clone(settings), Arc::clone(link), session, pool_stop.clone()));
    }
    let refused = Arc::new(tokio::sync::Mutex::new(None));
    let refusal = Arc::clone(&refused);
    let handler_settings = Arc::clone(settings);
    let handler_link = Arc::clone(link);
    let handler_stop = pool_stop.clone();
    control_loop(stream, stop.clone(), move |frame, _out| {
        let settings = Arc::clone(&handler_settings);
        let link = Arc::clone(&handler_link);
        let pool_stop = handler_stop.clone();
        let refusal = Arc::clone(&refusal);
        async move {
            match frame {
                Frame::Need { count, .. } => {
                    for _ in 0..count.min(settings.pool.max(1)) {
                        tokio::spawn(pooled(
                            Arc::clone(&settings),
                            Arc::clone(&link),
                            session,
                            pool_stop.clone(),
                        ));
                    }
                    true
                }
                Frame::Status { .. } => true,
                Frame::Refused { reason, detail } => {
                    *refusal.lock().await = Some(SessionError::Refused { reason, detail });
                    false
                }
                _ => false,
            }
        }
    })
    .await;
    pool_stop.cancel();
    match refused.lock().await.take() {
        Some(error) => Err(error),
        None if stop.is_cancelled() => Ok(()),
        None => Err(SessionError::Lost),
    }
}

/// One pooled connection: idle until the router pairs it, then one relayed connection.
async fn pooled(settings: Arc<Settings>, link: Arc<Link>, session: u64, stop: CancellationToken) {
    let node = &settings.context.node;
    let mut stream = match link.router.connect(Kind::PublisherPool, node, &settings.service, session).await {
        Ok(stream) => stream,
        Err(error) => {
            tracing::debug!(service = settings.service, router = link.router.name, %error, "tunnel publisher: no pooled connection");
            return;
        }
    };
    link.idle.fetch_add(1, Ordering::Relaxed);
    let frame = tokio::select! {
        frame = read_frame_and_following(&mut stream, super::EARLY_CHUNK) => frame,
        () = stop.cancelled() => Err(super::frame::FrameError::Closed),
    };
    link.idle.fetch_sub(1, Ordering::Relaxed);
    match frame {
        Ok((Frame::Connect(open), early)) => {
            let tracker = settings.context.connections.clone();
            tracker.track_future(serve_visitor(&settings, stream, open, early)).await;
        }
        Ok((Frame::Refused { reason, detail }, _)) => {
            settings.metrics.handshake_failed(reason);
            tracing::debug!(service = settings.service, %reason, detail, "tunnel publisher: pooled connection refused");
        }
        Ok(_) | Err(_) => {}
    }
}

/// A visitor's connection, paired by the router: check its proof, dial the local service, pass on the
/// `early` bytes that came with `Connect`, relay.
async fn serve_visitor(settings: &Settings, mut stream: Conn, open: Open, early: Vec<u8>) {
    let checked = check_open(settings, &open).await;
    let mut local = match checked {
        Ok(()) => match tokio::time::timeout(settings.connect_timeout, connect_to(&settings.local)).await {
            Ok(Ok(local)) => Conn::Plain(local),
            Ok(Err(error)) => {
                return reject(
                    settings,
                    &mut stream,
                    Reason::LocalUnreachable,
                    format!("{}: {error}", settings.local),
                )
                .await;
            }
            Err(_) => {
                let detail = format!("{}: no answer within {:?}", settings.local, settings.connect_timeout);
                return reject(settings, &mut stream, Reason::LocalUnreachable, detail).await;
            }
        },
        Err(reason) => return reject(settings, &mut stream, reason, format!("from {}", open.node)).await,
    };
    // `Accepted` goes first: until it is sent, no byte of the visitor's has reached the service, which is
    // what lets a router that hears no answer refuse, and the visitor try another router.
    if write_frame(&mut stream, &Frame::Accepted).await.is_err() {
        return;
    }
    if !early.is_empty() {
        if let Err(error) = tokio::io::AsyncWriteExt::write_all(&mut local, &early).await {
            tracing::debug!(service = settings.service, %error, "tunnel publisher: the local service closed at once");
            return;
        }
        settings.metrics.count_before_relay(early.len(), 0);
    }
    relay_counted(&mut stream, &mut local, &settings.metrics, &settings.context.close).await;
}

async fn check_open(settings: &Settings, open: &Open) -> Result<(), Reason> {
    if open.service != settings.service {
        return Err(Reason::UnknownService);
    }
    // The MAC first: a forged proof must not use up a nonce.
    if !proof::open_is_signed(&settings.secret, open) {
        return Err(Reason::BadSecret);
    }
    settings.guard.check(open.time, &open.nonce).await
}

async fn reject(settings: &Settings, stream: &mut Conn, reason: Reason, detail: String) {
    tracing::info!(service = settings.service, %reason, detail, "tunnel publisher: visitor rejected");
    settings.metrics.handshake_failed(reason);
    let _ = write_frame(stream, &Frame::Rejected { reason, detail }).await;
}
