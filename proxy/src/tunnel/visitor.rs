//! A visited service (`tunnels.visit`): a local listener whose connections reach a publisher through a
//! router. For each router it keeps a control session watching the service (how many publishers the
//! router has for it) and a pool of idle, authenticated connections.
//!
//! An accepted connection goes to the first router, in configured order, that has a live publisher: a
//! pooled connection is taken, `Open` (the proof of the service secret) written, and the answer read;
//! `Opened` starts the relay, `Refused` moves on to the next router. When no router has a live
//! publisher the connection is reset at once, so the application fails fast instead of hanging. The
//! listener itself stays up whatever the routers do.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::Duration;

use keel_schemas::config::Visit;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

use super::conn::Conn;
use super::frame::{Frame, Kind, read_frame, write_frame};
use super::{
    Answered, Backoff, Context, HELLO_TIMEOUT, RouterEndpoint, ServiceMetrics, control_loop,
    forward_until_answer, proof, relay_counted,
};

/// How often a link checks that its pool is full (beyond being woken when a connection is taken).
const POOL_CHECK: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Settings {
    service: String,
    secret: String,
    pool: u16,
    metrics: ServiceMetrics,
    context: Context,
}

/// One router's side of a visit.
#[derive(Debug)]
struct Link {
    router: RouterEndpoint,
    /// The control session is up.
    watching: AtomicBool,
    /// Live publishers of the service on this router, as its last `Status` said.
    publishers: AtomicU16,
    /// `watching` and `publishers`, as metrics.
    watching_metric: metrics::Gauge,
    publishers_metric: metrics::Gauge,
    idle: Mutex<VecDeque<Conn>>,
    taken: Notify,
}

/// A running `tunnels.visit` entry.
#[derive(Debug)]
pub struct Visitation {
    settings: Arc<Settings>,
    links: Vec<Arc<Link>>,
    stop: CancellationToken,
    pub local_addr: SocketAddr,
}

#[derive(Clone, Debug, Serialize)]
pub struct VisitationStatus {
    pub service: String,
    pub listen: SocketAddr,
    pub routers: Vec<VisitorLinkStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VisitorLinkStatus {
    pub router: String,
    pub address: String,
    /// The control session with the router is up.
    pub connected: bool,
    /// Publishers of the service the router has now.
    pub publishers: u16,
    pub idle_connections: usize,
}

impl Visitation {
    /// Starts serving `listener` (bound by the caller) for `entry` through `routers`, in that order.
    pub fn start(listener: TcpListener, entry: &Visit, routers: &[RouterEndpoint], context: Context) -> Self {
        let local_addr = listener.local_addr().expect("a bound listener has an address");
        let settings = Arc::new(Settings {
            service: entry.name.clone(),
            secret: entry.secret.as_ref().map(|s| s.expose().to_string()).unwrap_or_default(),
            pool: entry.pool,
            metrics: ServiceMetrics::new(&context.metrics, &entry.name, "visitor"),
            context,
        });
        let stop = CancellationToken::new();
        let links: Vec<Arc<Link>> = routers
            .iter()
            .map(|router| {
                Arc::new(Link {
                    router: router.clone(),
                    watching: AtomicBool::new(false),
                    publishers: AtomicU16::new(0),
                    watching_metric: settings.metrics.router_up(&router.name),
                    publishers_metric: settings.metrics.publishers_at(&router.name),
                    idle: Mutex::new(VecDeque::new()),
                    taken: Notify::new(),
                })
            })
            .collect();
        for link in &links {
            tokio::spawn(watch(Arc::clone(&settings), Arc::clone(link), stop.clone()));
            tokio::spawn(fill_pool(Arc::clone(&settings), Arc::clone(link), stop.clone()));
        }
        tokio::spawn(accept_loop(listener, Arc::clone(&settings), links.clone(), stop.clone()));
        tracing::info!(service = entry.name, address = %local_addr, "tunnel visitor listening");
        Self { settings, links, stop, local_addr }
    }

    /// Closes the listener, the control sessions and the idle pooled connections; relays go on.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub async fn status(&self) -> VisitationStatus {
        let mut routers = Vec::new();
        for link in &self.links {
            routers.push(VisitorLinkStatus {
                router: link.router.name.clone(),
                address: link.router.address.to_string(),
                connected: link.watching.load(Ordering::Relaxed),
                publishers: link.publishers.load(Ordering::Relaxed),
                idle_connections: link.idle.lock().await.len(),
            });
        }
        VisitationStatus { service: self.settings.service.clone(), listen: self.local_addr, routers }
    }
}

impl Drop for Visitation {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Keeps a control session with the router up, tracking the service's publishers there.
async fn watch(settings: Arc<Settings>, link: Arc<Link>, stop: CancellationToken) {
    let mut backoff = Backoff::default();
    let mut first = true;
    let mut first_failure = true;
    while !stop.is_cancelled() {
        if !first {
            settings.metrics.reconnected(&link.router.name);
        }
        first = false;
        let result = watch_session(&settings, &link, &stop, &mut backoff).await;
        let was_watching = link.watching.swap(false, Ordering::Relaxed);
        link.watching_metric.set(0.0);
        if let Err(error) = result {
            // Loud once when a working session ends; quiet while retrying a router that stays down.
            if was_watching || first_failure {
                tracing::warn!(
                    service = settings.service,
                    router = link.router.name,
                    error,
                    "tunnel visitor: session with the router ended"
                );
            } else {
                tracing::debug!(
                    service = settings.service,
                    router = link.router.name,
                    error,
                    "tunnel visitor: router still unreachable"
                );
            }
            first_failure = false;
        }
        link.publishers.store(0, Ordering::Relaxed);
        link.publishers_metric.set(0.0);
        // Pooled connections to a router that went away are of no use.
        link.idle.lock().await.clear();
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = stop.cancelled() => return,
        }
    }
}

async fn watch_session(
    settings: &Settings,
    link: &Arc<Link>,
    stop: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let mut stream = link.router.connect(Kind::Control, &settings.context.node, "", 0).await?;
    match tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut stream)).await {
        Ok(Ok(Frame::Welcome { .. })) => {}
        Ok(Ok(Frame::Refused { reason, detail })) => {
            settings.metrics.handshake_failed(reason);
            return Err(format!("refused: {reason} ({detail})"));
        }
        Ok(Ok(other)) => return Err(format!("expected Welcome, got {other:?}")),
        Ok(Err(error)) => return Err(error.to_string()),
        Err(_) => return Err("no Welcome in time".into()),
    }
    write_frame(&mut stream, &Frame::Watch { service: settings.service.clone() })
        .await
        .map_err(|error| error.to_string())?;
    link.watching.store(true, Ordering::Relaxed);
    link.watching_metric.set(1.0);
    backoff.reset();
    link.taken.notify_one();
    let handler_link = Arc::clone(link);
    control_loop(stream, stop.clone(), move |frame, _out| {
        let link = Arc::clone(&handler_link);
        async move {
            match frame {
                Frame::Status { publishers, .. } => {
                    link.publishers.store(publishers, Ordering::Relaxed);
                    link.publishers_metric.set(f64::from(publishers));
                    // Publishers appeared: the pool may fill now.
                    link.taken.notify_one();
                    true
                }
                _ => false,
            }
        }
    })
    .await;
    if stop.is_cancelled() { Ok(()) } else { Err("connection lost".into()) }
}

/// A fresh pooled connection to the link's router.
async fn pooled_connection(settings: &Settings, link: &Link) -> Result<Conn, String> {
    link.router.connect(Kind::VisitorPool, &settings.context.node, "", 0).await
}

/// Keeps `pool` idle connections to the router while it has publishers of the service.
async fn fill_pool(settings: Arc<Settings>, link: Arc<Link>, stop: CancellationToken) {
    loop {
        let wanted = link.watching.load(Ordering::Relaxed) && link.publishers.load(Ordering::Relaxed) > 0;
        if wanted {
            let mut idle = link.idle.lock().await;
            idle.retain(|stream| !stream.is_closed());
            let missing = usize::from(settings.pool).saturating_sub(idle.len());
            drop(idle);
            for _ in 0..missing {
                match pooled_connection(&settings, &link).await {
                    Ok(stream) => link.idle.lock().await.push_back(stream),
                    Err(error) => {
                        tracing::debug!(
                            service = settings.service,
                            router = link.router.name,
                            error,
                            "tunnel visitor: no pooled connection"
                        );
                        break;
                    }
                }
            }
        }
        tokio::select! {
            // Refill a moment later: the connection that was just taken is being set up now, and a
            // refill competing with it for the CPU would only slow it down.
            () = link.taken.notified() => tokio::time::sleep(super::REFILL_DELAY).await,
            () = tokio::time::sleep(POOL_CHECK) => {}
            () = stop.cancelled() => return,
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    settings: Arc<Settings>,
    links: Vec<Arc<Link>>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                let settings = Arc::clone(&settings);
                let links = links.clone();
                settings
                    .context
                    .connections
                    .clone()
                    .spawn(async move { carry(stream, &settings, &links).await });
            }
            Err(error) => {
                tracing::warn!(service = settings.service, %error, "tunnel visitor: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Carries one accepted connection to a publisher through the first router that takes it. What the
/// application sends while a router answers goes on ahead, and is kept to be sent again through the
/// next router if this one refuses.
async fn carry(local: TcpStream, settings: &Settings, links: &[Arc<Link>]) {
    let mut local = Conn::Plain(local);
    let mut sent_ahead = Vec::new();
    for link in links {
        if !link.watching.load(Ordering::Relaxed) || link.publishers.load(Ordering::Relaxed) == 0 {
            continue;
        }
        let Some(mut remote) = take(settings, link).await else { continue };
        if sent_ahead.is_empty() {
            // A client that speaks first has usually sent by now: its bytes go with `Open`, in one write.
            read_waiting(local.tcp(), &mut sent_ahead);
        }
        let open = proof::open(&settings.secret, &settings.service, &settings.context.node);
        let mut first = Frame::Open(open).encode();
        first.extend_from_slice(&sent_ahead);
        if remote.write_all(&first).await.is_err() {
            continue;
        }
        match forward_until_answer(&mut local, &mut remote, &mut sent_ahead, HELLO_TIMEOUT).await {
            Ok(Answered { frame: Frame::Opened, after }) => {
                settings.metrics.count_before_relay(sent_ahead.len(), after.len());
                if !after.is_empty() && local.write_all(&after).await.is_err() {
                    return;
                }
                relay_counted(&mut local, &mut remote, &settings.metrics, &settings.context.close).await;
                return;
            }
            Ok(Answered { frame: Frame::Refused { reason, detail }, .. }) => {
                settings.metrics.handshake_failed(reason);
                tracing::info!(service = settings.service, router = link.router.name, %reason, detail, "tunnel visitor: refused");
            }
            Ok(_) | Err(_) => {
                tracing::debug!(
                    service = settings.service,
                    router = link.router.name,
                    "tunnel visitor: no answer to Open"
                );
                // The bytes sent ahead may have reached the service before the router went away: sending
                // them again elsewhere could repeat a request. Only a refusal is safe to retry.
                if !sent_ahead.is_empty() {
                    return;
                }
            }
        }
    }
    // No router could take it: reset the connection at once rather than leave the application waiting.
    tracing::debug!(service = settings.service, "tunnel visitor: no live publisher; connection reset");
    let _ = local.tcp().set_zero_linger();
}

/// Appends what `local` has already sent (up to [`super::EARLY_CHUNK`] bytes) to `sent`, without
/// waiting: nothing there, an end of file or an error are all left for the relay to find.
fn read_waiting(local: &TcpStream, sent: &mut Vec<u8>) {
    let mut chunk = [0u8; super::EARLY_CHUNK];
    if let Ok(read) = local.try_read(&mut chunk) {
        sent.extend_from_slice(&chunk[..read]);
    }
}

/// An idle pooled connection (a fresh one when the pool is empty); the pool refills behind it.
async fn take(settings: &Settings, link: &Link) -> Option<Conn> {
    let pooled = {
        let mut idle = link.idle.lock().await;
        let mut found = None;
        while let Some(stream) = idle.pop_front() {
            if !stream.is_closed() {
                found = Some(stream);
                break;
            }
        }
        found
    };
    link.taken.notify_one();
    match pooled {
        Some(stream) => Some(stream),
        None => pooled_connection(settings, link).await.ok(),
    }
}
