//! The router (`tunnels.server`): authenticates publishers and visitors, keeps the publishers' pooled
//! connections per service, and pairs each visitor connection with one of them.
//!
//! Per connection, the first frame says what it is (docs/tunnel-protocol.md):
//! - a control connection registers services (publishers) or watches them (visitors), and carries
//!   `Need`, `Status` and keepalives; when it closes, everything it registered goes with it;
//! - a publisher's pooled connection waits, idle, in its publisher's pool;
//! - a visitor's pooled connection waits for `Open`, then is paired with a pooled publisher connection.
//!
//! The router checks the router token, the clock and the nonce of everything, but cannot check a
//! visitor's proof of the service secret: it never has the secret. It passes the proof on to the
//! publisher, which checks it before dialling anything.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use keel_schemas::config::{TunnelBalancing, TunnelServer};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::conn::Conn;
use super::frame::{
    Frame, FrameError, Hello, Kind, Open, Reason, VERSION, read_frame_and_following, read_hello, write_frame,
};
use super::proof::{self, ReplayGuard};
use super::{Answered, Context, HELLO_TIMEOUT, ServiceMetrics, control_loop, forward_until_answer};
use crate::limit::RefusedLog;

/// A running router.
#[derive(Debug)]
pub struct Router {
    inner: Arc<RouterInner>,
    stop: CancellationToken,
    pub local_addr: SocketAddr,
}

#[derive(Debug)]
struct RouterInner {
    name: String,
    token: String,
    balance: TunnelBalancing,
    connect_timeout: Duration,
    guard: ReplayGuard,
    services: Mutex<HashMap<String, Service>>,
    next_session: AtomicU64,
    context: Context,
    metrics: Mutex<HashMap<String, ServiceMetrics>>,
    tls: Option<super::tls::Server>,
}

/// One service's publishers and watchers.
#[derive(Debug, Default)]
struct Service {
    publishers: Vec<Publisher>,
    watchers: Vec<Watcher>,
    next: usize,
    /// Woken when a pooled connection arrives for any of the publishers.
    arrived: Arc<Notify>,
}

#[derive(Debug)]
struct Publisher {
    session: u64,
    node: String,
    peer: SocketAddr,
    share: bool,
    control: mpsc::UnboundedSender<Frame>,
    idle: VecDeque<Conn>,
    active: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct Watcher {
    session: u64,
    node: String,
    peer: SocketAddr,
    control: mpsc::UnboundedSender<Frame>,
}

impl Service {
    fn status(&self, name: &str) -> Frame {
        Frame::Status { service: name.to_string(), publishers: self.publishers.len().min(65_535) as u16 }
    }

    fn tell_watchers(&self, name: &str) {
        let status = self.status(name);
        for watcher in &self.watchers {
            let _ = watcher.control.send(status.clone());
        }
    }
}

/// The router's view, shaped like the seed's Router resource status.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouterStatus {
    pub name: String,
    pub listen: SocketAddr,
    pub active_services: Vec<ActiveService>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ActiveService {
    pub name: String,
    pub clients: Vec<RouterClient>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouterClient {
    /// `node-service`, as the seed named its clients.
    pub id: String,
    /// `publisher` (serves the service) or `visitor` (watches it).
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub remote_addr: SocketAddr,
    pub service_name: String,
    /// Publishers: pooled connections waiting, and connections relaying now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_connections: Option<usize>,
}

impl Router {
    /// Starts serving on `listener` (bound by the caller, so that a bind failure rejects the config).
    pub fn start(
        listener: TcpListener,
        config: &TunnelServer,
        tls: Option<super::tls::Server>,
        max_skew: Duration,
        context: Context,
    ) -> Self {
        let local_addr = listener.local_addr().unwrap_or(config.listen.0);
        let inner = Arc::new(RouterInner {
            name: context.node.clone(),
            token: config.token.as_ref().map(|t| t.expose().to_string()).unwrap_or_default(),
            balance: config.balance,
            connect_timeout: config.connect_timeout.get(),
            guard: ReplayGuard::new(max_skew),
            services: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            context,
            metrics: Mutex::new(HashMap::new()),
            tls,
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, Arc::clone(&inner), stop.clone()));
        tracing::info!(address = %local_addr, "tunnel router listening");
        Self { inner, stop, local_addr }
    }

    /// Stops accepting and closes the control and idle connections; relays in progress go on.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub async fn status(&self) -> RouterStatus {
        let services = self.inner.services.lock().await;
        let mut active_services: Vec<ActiveService> = services
            .iter()
            .map(|(name, service)| {
                let publishers = service.publishers.iter().map(|publisher| RouterClient {
                    id: format!("{}-{name}", publisher.node),
                    kind: "publisher",
                    remote_addr: publisher.peer,
                    service_name: name.clone(),
                    idle_connections: Some(publisher.idle.len()),
                    active_connections: Some(publisher.active.load(Ordering::Relaxed)),
                });
                let watchers = service.watchers.iter().map(|watcher| RouterClient {
                    id: format!("{}-{name}", watcher.node),
                    kind: "visitor",
                    remote_addr: watcher.peer,
                    service_name: name.clone(),
                    idle_connections: None,
                    active_connections: None,
                });
                ActiveService { name: name.clone(), clients: publishers.chain(watchers).collect() }
            })
            .collect();
        active_services.sort_by(|a, b| a.name.cmp(&b.name));
        RouterStatus { name: self.inner.name.clone(), listen: self.local_addr, active_services }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Connections that may be in their handshake (TLS, then a `Hello` not yet proven) at once. Each has
/// [`HELLO_TIMEOUT`] to finish; past the limit new connections are closed at once, so that a flood of
/// unauthenticated connections cannot take every descriptor. Proven connections do not count.
pub const MAX_HANDSHAKING: usize = 1024;

async fn accept_loop(listener: TcpListener, inner: Arc<RouterInner>, stop: CancellationToken) {
    let handshaking = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKING));
    let mut refused = RefusedLog::new("tunnel router (in their handshake)", MAX_HANDSHAKING);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(handshake) = Arc::clone(&handshaking).try_acquire_owned() else {
                    drop(stream);
                    refused.count();
                    continue;
                };
                let _ = stream.set_nodelay(true);
                // Not tracked for the drain: most connections here are control sessions and idle pooled
                // ones; a paired connection's relay is tracked when it starts.
                tokio::spawn(serve(stream, peer, Arc::clone(&inner), stop.clone(), handshake));
            }
            Err(error) => {
                tracing::warn!(%error, "tunnel router: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl RouterInner {
    async fn metrics(&self, service: &str) -> ServiceMetrics {
        let mut metrics = self.metrics.lock().await;
        metrics
            .entry(service.to_string())
            .or_insert_with(|| ServiceMetrics::new(&self.context.metrics, service, "router"))
            .clone()
    }

    async fn refuse(&self, stream: &mut Conn, service: &str, reason: Reason, detail: String) {
        tracing::debug!(service, %reason, detail, "tunnel router: refused");
        self.metrics(service).await.handshake_failed(reason);
        let _ = write_frame(stream, &Frame::Refused { reason, detail }).await;
    }
}

/// One accepted connection, from its TLS handshake (if any) and its `Hello` on. `handshake` is its place
/// among the connections in their handshake, given back once the `Hello` is proven.
async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    inner: Arc<RouterInner>,
    stop: CancellationToken,
    handshake: tokio::sync::OwnedSemaphorePermit,
) {
    let mut stream = match &inner.tls {
        None => Conn::Plain(stream),
        Some(tls) => match tokio::time::timeout(HELLO_TIMEOUT, tls.accept(stream)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "tunnel router: TLS handshake failed");
                inner.metrics("").await.handshake_failed(Reason::TlsHandshake);
                return;
            }
            Err(_) => return,
        },
    };
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut stream)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(FrameError::Malformed(what))) => {
            inner.refuse(&mut stream, "", Reason::Malformed, format!("{what} (from {peer})")).await;
            return;
        }
        Ok(Err(_)) | Err(_) => return,
    };
    // Until the Hello is proven, its fields are the client's word: none of them becomes a metric label.
    if hello.version != VERSION {
        let detail = format!("this router speaks version {VERSION}");
        inner.refuse(&mut stream, "", Reason::UnsupportedVersion, detail).await;
        return;
    }
    if !proof::hello_is_signed(&inner.token, &hello) {
        inner.refuse(&mut stream, "", Reason::BadToken, format!("from {peer}")).await;
        return;
    }
    if let Err(reason) = inner.guard.check(hello.time, &hello.nonce).await {
        inner.refuse(&mut stream, "", reason, format!("from {peer}")).await;
        return;
    }
    drop(handshake);
    match hello.kind {
        Kind::Control => serve_control(stream, peer, hello, inner, stop).await,
        Kind::PublisherPool => pool_arrived(stream, hello, inner).await,
        Kind::VisitorPool => serve_visitor(stream, inner, stop).await,
    }
}

/// A control connection: registrations, watches and keepalives until it closes.
async fn serve_control(
    mut stream: Conn,
    peer: SocketAddr,
    hello: Hello,
    inner: Arc<RouterInner>,
    stop: CancellationToken,
) {
    let session = inner.next_session.fetch_add(1, Ordering::Relaxed);
    let welcome = Frame::Welcome { router: inner.name.clone(), version: VERSION, session };
    if write_frame(&mut stream, &welcome).await.is_err() {
        return;
    }
    let handler_inner = Arc::clone(&inner);
    let node = hello.node.clone();
    control_loop(stream, stop, move |frame, out| {
        let inner = Arc::clone(&handler_inner);
        let node = node.clone();
        async move {
            match frame {
                Frame::Register { service, share } => {
                    register(&inner, session, &node, peer, service, share, &out).await
                }
                Frame::Watch { service } => {
                    let mut services = inner.services.lock().await;
                    let entry = services.entry(service.clone()).or_default();
                    let _ = out.send(entry.status(&service));
                    entry.watchers.push(Watcher { session, node, peer, control: out });
                    true
                }
                _ => false,
            }
        }
    })
    .await;
    // The session is over: its publishers and watchers go, and the watchers of what changed hear of it.
    let mut services = inner.services.lock().await;
    services.retain(|name, service| {
        let publishers = service.publishers.len();
        service.publishers.retain(|publisher| publisher.session != session);
        service.watchers.retain(|watcher| watcher.session != session);
        if service.publishers.len() != publishers {
            service.tell_watchers(name);
        }
        !service.publishers.is_empty() || !service.watchers.is_empty()
    });
}

/// A publisher's `Register`: added, unless the name is taken by a publisher that does not share it.
async fn register(
    inner: &RouterInner,
    session: u64,
    node: &str,
    peer: SocketAddr,
    service: String,
    share: bool,
    out: &mpsc::UnboundedSender<Frame>,
) -> bool {
    let mut services = inner.services.lock().await;
    let entry = services.entry(service.clone()).or_default();
    if entry.publishers.iter().any(|publisher| publisher.session == session) {
        return true;
    }
    let may_join = share && entry.publishers.iter().all(|publisher| publisher.share);
    if !entry.publishers.is_empty() && !may_join {
        let holder = &entry.publishers[0].node;
        let detail =
            format!("{service} is published by {holder}; set share on every publisher to serve it together");
        drop(services);
        inner.metrics(&service).await.handshake_failed(Reason::NameTaken);
        let _ = out.send(Frame::Refused { reason: Reason::NameTaken, detail });
        // Refusing a registration ends the session: the publisher backs off and tries again.
        return false;
    }
    entry.publishers.push(Publisher {
        session,
        node: node.to_string(),
        peer,
        share,
        control: out.clone(),
        idle: VecDeque::new(),
        active: Arc::new(AtomicUsize::new(0)),
    });
    tracing::info!(service, node, %peer, "tunnel router: publisher registered");
    entry.tell_watchers(&service);
    // The registration's acknowledgement.
    let _ = out.send(entry.status(&service));
    true
}

/// Idle pooled connections kept per publisher: the largest pool a publisher may be configured with.
const MAX_IDLE_POOLED: usize = keel_schemas::validate::MAX_POOL as usize;

/// A publisher's pooled connection: into its publisher's pool, or refused when the session is unknown.
async fn pool_arrived(mut stream: Conn, hello: Hello, inner: Arc<RouterInner>) {
    let mut services = inner.services.lock().await;
    let service = services.get_mut(&hello.service);
    let arrived = service.as_ref().map(|service| Arc::clone(&service.arrived));
    let publisher = service.and_then(|service| {
        service.publishers.iter_mut().find(|publisher| publisher.session == hello.session)
    });
    match (publisher, arrived) {
        // More idle than any publisher's pool may be (after a burst, each connection taken was replaced):
        // closed, which ends it on the publisher's side too.
        (Some(publisher), Some(_)) if publisher.idle.len() >= MAX_IDLE_POOLED => {
            tracing::debug!(
                service = hello.service,
                "tunnel router: pool full; an extra pooled connection closed"
            );
        }
        (Some(publisher), Some(arrived)) => {
            publisher.idle.push_back(stream);
            arrived.notify_waiters();
        }
        _ => {
            drop(services);
            let detail = format!("no session {} registers {}", hello.session, hello.service);
            inner.refuse(&mut stream, &hello.service, Reason::UnknownService, detail).await;
        }
    }
}

/// A visitor's pooled connection: idle until `Open`, then paired with a publisher.
async fn serve_visitor(mut visitor: Conn, inner: Arc<RouterInner>, stop: CancellationToken) {
    let (open, early) = tokio::select! {
        frame = read_frame_and_following(&mut visitor, super::EARLY_CHUNK) => match frame {
            Ok((Frame::Open(open), early)) => (open, early),
            Ok(_) => {
                inner.refuse(&mut visitor, "", Reason::Malformed, "expected Open".into()).await;
                return;
            }
            Err(_) => return,
        },
        () = stop.cancelled() => return,
    };
    if let Err(reason) = inner.guard.check(open.time, &open.nonce).await {
        inner.refuse(&mut visitor, &open.service, reason, format!("from {}", open.node)).await;
        return;
    }
    let metrics = inner.metrics(&open.service).await;
    let Some((mut publisher, active)) = pair(&inner, &open, &early).await else {
        return refuse_open(&inner, &mut visitor, &open.service).await;
    };
    // What the visitor sends while the publisher checks the proof and dials goes on ahead (what came
    // with `Open` went with `Connect`); the publisher passes none of it to its service before the proof
    // is checked.
    let mut sent_ahead = early;
    let answered =
        forward_until_answer(&mut visitor, &mut publisher, &mut sent_ahead, inner.connect_timeout).await;
    match answered {
        Ok(Answered { frame: Frame::Accepted, after }) => {
            metrics.count_before_relay(sent_ahead.len(), after.len());
            let mut opened = Frame::Opened.encode();
            opened.extend_from_slice(&after);
            if tokio::io::AsyncWriteExt::write_all(&mut visitor, &opened).await.is_ok() {
                let relay =
                    super::relay_counted(&mut visitor, &mut publisher, &metrics, &inner.context.close);
                inner.context.connections.track_future(relay).await;
            }
        }
        Ok(Answered { frame: Frame::Rejected { reason, detail }, .. }) => {
            tracing::debug!(service = open.service, %reason, detail, "tunnel router: publisher rejected");
            inner.refuse(&mut visitor, &open.service, reason, detail).await;
        }
        Ok(_) | Err(_) => {
            let detail = "the publisher's connection failed before it answered".to_string();
            inner.refuse(&mut visitor, &open.service, Reason::Busy, detail).await;
        }
    }
    active.fetch_sub(1, Ordering::Relaxed);
}

async fn refuse_open(inner: &RouterInner, visitor: &mut Conn, service: &str) {
    let known =
        inner.services.lock().await.get(service).is_some_and(|service| !service.publishers.is_empty());
    let (reason, detail) = if known {
        (Reason::Busy, format!("no publisher of {service} accepted the connection"))
    } else {
        (Reason::UnknownService, format!("no publisher of {service} is registered here"))
    };
    inner.refuse(visitor, service, reason, detail).await;
}

/// How many pooled connections a visitor's `Open` may try before giving up.
const PAIR_ATTEMPTS: usize = 4;

/// A publisher connection with `Connect` and the visitor's `early` bytes written on it, in one write: a
/// pooled one is taken (another one tried when writing fails: it died while idle). `None` when none
/// could be had in time.
async fn pair(inner: &RouterInner, open: &Open, early: &[u8]) -> Option<(Conn, Arc<AtomicUsize>)> {
    let deadline = tokio::time::Instant::now() + inner.connect_timeout;
    let mut connect = Frame::Connect(open.clone()).encode();
    connect.extend_from_slice(early);
    for _ in 0..PAIR_ATTEMPTS {
        let (mut stream, active) = take_pooled(inner, &open.service, deadline).await?;
        if tokio::io::AsyncWriteExt::write_all(&mut stream, &connect).await.is_ok() {
            return Some((stream, active));
        }
        active.fetch_sub(1, Ordering::Relaxed);
    }
    None
}

/// An idle pooled connection of some publisher of `service` (by the configured balancing), waiting for
/// one to arrive until `deadline`. The publisher is asked for a replacement at once.
async fn take_pooled(
    inner: &RouterInner,
    service: &str,
    deadline: tokio::time::Instant,
) -> Option<(Conn, Arc<AtomicUsize>)> {
    // Each waiter asks for one more connection once: an arrival wakes every waiter, and asking again at
    // each wake-up would grow the publishers' pools with the square of a burst.
    let mut asked = false;
    loop {
        let arrived = Arc::clone(&inner.services.lock().await.get(service)?.arrived);
        // Listen for arrivals before looking, so that one in between is not missed.
        let notified = arrived.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let mut services = inner.services.lock().await;
            let entry = services.get_mut(service)?;
            if entry.publishers.is_empty() {
                return None;
            }
            let count = entry.publishers.len();
            let order: Vec<usize> = match inner.balance {
                TunnelBalancing::RoundRobin => {
                    entry.next = entry.next.wrapping_add(1);
                    (0..count).map(|i| (entry.next + i) % count).collect()
                }
                TunnelBalancing::LeastConnections => {
                    let mut order: Vec<usize> = (0..count).collect();
                    order.sort_by_key(|&i| entry.publishers[i].active.load(Ordering::Relaxed));
                    order
                }
            };
            for index in order {
                let publisher = &mut entry.publishers[index];
                while let Some(stream) = publisher.idle.pop_front() {
                    let need = Frame::Need { service: service.to_string(), count: 1 };
                    if stream.is_closed() {
                        let _ = publisher.control.send(need);
                        continue;
                    }
                    // The replacement for a connection about to be set up is asked for a moment later:
                    // a `Need` arriving with the `Connect` would have the publisher open a connection
                    // before it serves the one that is waiting.
                    let control = publisher.control.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(super::REFILL_DELAY).await;
                        let _ = control.send(need);
                    });
                    publisher.active.fetch_add(1, Ordering::Relaxed);
                    return Some((stream, Arc::clone(&publisher.active)));
                }
            }
            // Nothing idle: ask every publisher for more, and wait for the first to arrive.
            if !asked {
                for publisher in &entry.publishers {
                    let _ = publisher.control.send(Frame::Need { service: service.to_string(), count: 1 });
                }
                asked = true;
            }
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return None;
        }
    }
}
