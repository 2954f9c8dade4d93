//! Tunnels: frp's stcp model in Keel (docs/tunnel-protocol.md has the wire protocol and its reasons).
//!
//! - [`router`]: `tunnels.server`, which pairs visitors' connections with publishers';
//! - [`publisher`]: `tunnels.publish`, a local service offered through routers;
//! - [`visitor`]: `tunnels.visit`, a local listener whose connections reach a publisher;
//! - [`frame`] and [`proof`]: the frames, and the HMAC proofs that keep secrets off the wire;
//! - [`conn`] and [`tls`]: connections between roles, plain TCP or TLS (rustls);
//! - [`set`]: the running tunnels of a config, changed entry by entry on reload.
//!
//! What the three roles share lives here: the control-connection loop with its keepalives, the relay
//! with per-service counters, reconnect backoff, and the per-service metrics.

pub mod conn;
pub mod frame;
pub mod proof;
pub mod publisher;
pub mod router;
pub mod set;
pub mod tls;
pub mod visitor;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::conn::Conn;
use self::frame::{Frame, Reason, read_frame, write_frame};
use crate::metrics::{Metrics, TunnelMetrics};
use crate::relay::DirectionCounters;

/// How long a new connection may take to send its `Hello`, and a peer to answer one.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A control connection that has sent nothing for this long sends a `Ping`.
pub const KEEPALIVE: Duration = Duration::from_secs(10);
/// A control connection that has heard nothing for this long is given up.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(30);

/// What every tunnel component needs from the proxy.
#[derive(Clone, Debug)]
pub struct Context {
    /// This proxy's name on the wire (`node.id`, else the host name).
    pub node: String,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the proxy closes every connection (fast shutdown, end of a drain).
    pub close: CancellationToken,
    /// Every relayed connection is tracked here, so that a drain waits for them.
    pub connections: TaskTracker,
}

/// One service's metric handles in one role.
#[derive(Clone, Debug)]
pub struct ServiceMetrics {
    handles: TunnelMetrics,
    registry: Arc<Metrics>,
}

impl ServiceMetrics {
    pub fn new(registry: &Arc<Metrics>, service: &str, role: &'static str) -> Self {
        Self { handles: TunnelMetrics::new(registry, service, role), registry: Arc::clone(registry) }
    }

    pub fn handshake_failed(&self, reason: Reason) {
        self.handles.handshake_failed(&self.registry, reason.label());
    }

    pub fn reconnected(&self, router: &str) {
        self.handles.reconnected(&self.registry, router);
    }

    /// `keel_tunnel_router_up` for the session with `router`.
    pub fn router_up(&self, router: &str) -> metrics::Gauge {
        self.handles.router_gauge(&self.registry, "keel_tunnel_router_up", router)
    }

    /// Bytes that crossed before the relay started: what went on ahead of the answer (`sent`) and what
    /// came in behind it (`received`).
    pub fn count_before_relay(&self, sent: usize, received: usize) {
        self.handles.sent.increment(sent as u64);
        self.handles.received.increment(received as u64);
    }

    /// `keel_tunnel_publishers`: the service's publishers at `router`.
    pub fn publishers_at(&self, router: &str) -> metrics::Gauge {
        self.handles.router_gauge(&self.registry, "keel_tunnel_publishers", router)
    }
}

/// Relays a paired connection to its end, counting it for the service: `sent` is what moves from the
/// visitor's side towards the publisher's. Plain TCP on both sides is relayed with `splice(2)`; a TLS
/// side is copied through user space, and its bytes are counted when the relay ends.
pub async fn relay_counted(
    visitor_side: &mut Conn,
    publisher_side: &mut Conn,
    metrics: &ServiceMetrics,
    close: &CancellationToken,
) {
    let handles = &metrics.handles;
    handles.connections.increment(1);
    handles.active.increment(1.0);
    match (visitor_side, publisher_side) {
        (Conn::Plain(visitor), Conn::Plain(publisher)) => {
            let sent = DirectionCounters { from: handles.sent.clone(), to: Counter::noop() };
            let received = DirectionCounters { from: handles.received.clone(), to: Counter::noop() };
            if let Err(error) = crate::splice::relay(visitor, publisher, None, &sent, &received, close).await
            {
                tracing::debug!(%error, "tunnel relay ended with an error");
            }
        }
        (visitor, publisher) => {
            let copied = tokio::select! {
                copied = tokio::io::copy_bidirectional_with_sizes(visitor, publisher, COPY_BUFFER, COPY_BUFFER) => copied,
                () = close.cancelled() => Ok((0, 0)),
            };
            match copied {
                Ok((sent, received)) => {
                    handles.sent.increment(sent);
                    handles.received.increment(received);
                }
                Err(error) => tracing::debug!(%error, "tunnel relay ended with an error"),
            }
        }
    }
    handles.active.decrement(1.0);
}

/// Copy buffer per direction when a side is TLS.
const COPY_BUFFER: usize = 64 * 1024;

/// How long a pool waits before replacing a connection that was taken: the visitor before it dials,
/// the router before it asks the publisher with `Need`, so that the replacement does not compete with
/// the connection being set up. A `Need` for a waiting `Open` (no idle connection left) goes at once.
pub const REFILL_DELAY: Duration = Duration::from_millis(3);

/// Most bytes read at once from an application or a peer before the relay starts: the early bytes read
/// along with `Open` or `Connect`, and each read of [`forward_until_answer`].
pub const EARLY_CHUNK: usize = 16 * 1024;

/// Most bytes sent on ahead of an answer (see [`forward_until_answer`]).
pub const EARLY_DATA_LIMIT: usize = 64 * 1024;

/// How [`forward_until_answer`] ended.
#[derive(Debug)]
pub struct Answered {
    pub frame: Frame,
    /// Bytes that followed the frame in the same read: relayed data, to be passed on first.
    pub after: Vec<u8>,
}

/// Waits for the answer frame on `remote` (`Opened` or `Refused` from a router, `Accepted` or `Rejected`
/// from a publisher) while already passing what `local` sends on to `remote`, up to
/// [`EARLY_DATA_LIMIT`] bytes, so that an application that speaks first loses no round trip. What was
/// sent on ahead is appended to `sent`, for a caller that may replay it elsewhere. An end of file from
/// `local` is left for the relay to pass on.
pub async fn forward_until_answer(
    local: &mut Conn,
    remote: &mut Conn,
    sent: &mut Vec<u8>,
    limit: Duration,
) -> Result<Answered, frame::FrameError> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut answer: Vec<u8> = Vec::with_capacity(64);
    let mut answer_chunk = [0u8; 4096];
    let mut chunk = vec![0u8; EARLY_CHUNK];
    let mut local_open = true;
    let start = sent.len();
    loop {
        if let Some((frame, used)) = frame::parse_frame(&answer)? {
            return Ok(Answered { frame, after: answer[used..].to_vec() });
        }
        let room = EARLY_DATA_LIMIT - (sent.len() - start);
        let may_read_local = local_open && room > 0;
        // Both reads are cancel-safe: a read that loses the race has taken no bytes.
        tokio::select! {
            read = remote.read(&mut answer_chunk) => match read? {
                0 => return Err(frame::FrameError::Closed),
                read => answer.extend_from_slice(&answer_chunk[..read]),
            },
            read = local.read(&mut chunk[..room.min(EARLY_CHUNK)]), if may_read_local => match read? {
                0 => local_open = false,
                read => {
                    remote.write_all(&chunk[..read]).await?;
                    sent.extend_from_slice(&chunk[..read]);
                }
            },
            () = tokio::time::sleep_until(deadline) => {
                return Err(frame::FrameError::Io(std::io::ErrorKind::TimedOut.into()));
            }
        }
    }
}

/// A router as publishers and visitors reach it.
#[derive(Clone, Debug)]
pub struct RouterEndpoint {
    pub name: String,
    pub address: keel_schemas::types::HostPort,
    token: String,
    tls: Option<tls::Client>,
}

impl RouterEndpoint {
    pub fn new(router: &keel_schemas::config::RouterRef, tls: Option<tls::Client>) -> Self {
        Self {
            name: router.name.clone(),
            address: router.address.clone(),
            token: router.token.as_ref().map(|token| token.expose().to_string()).unwrap_or_default(),
            tls,
        }
    }

    /// A new connection to the router (TLS when configured), its `Hello` of `kind` sent.
    pub async fn connect(
        &self,
        kind: frame::Kind,
        node: &str,
        service: &str,
        session: u64,
    ) -> Result<Conn, String> {
        let hello = proof::hello(&self.token, kind, node, service, session);
        dial(&self.address, self.tls.as_ref(), &Frame::Hello(hello)).await
    }
}

/// Opens a connection to a router (TLS when `tls` says so) and sends `hello` on it.
async fn dial(
    address: &keel_schemas::types::HostPort,
    tls: Option<&tls::Client>,
    hello: &Frame,
) -> Result<Conn, String> {
    let connect = async {
        let stream = crate::cluster::connect_to(address).await?;
        match tls {
            Some(tls) => tls.connect(stream).await,
            None => Ok(Conn::Plain(stream)),
        }
    };
    let mut conn = tokio::time::timeout(HELLO_TIMEOUT, connect)
        .await
        .map_err(|_| format!("cannot connect to {address}: no answer in time"))?
        .map_err(|error| format!("cannot connect to {address}: {error}"))?;
    write_frame(&mut conn, hello).await.map_err(|error| error.to_string())?;
    Ok(conn)
}

/// Runs a control connection until it ends: a writer task sends what arrives on the returned channel's
/// other end and a `Ping` after [`KEEPALIVE`] of quiet; this task reads frames, answers `Ping`, skips
/// frame types it does not know, and hands every other frame to `handle`, which returns `false` to end
/// the connection. It also ends after [`SILENCE_LIMIT`] without a frame, on EOF or error, and on `stop`.
pub async fn control_loop<F, Fut>(stream: Conn, stop: CancellationToken, mut handle: F)
where
    F: FnMut(Frame, mpsc::UnboundedSender<Frame>) -> Fut,
    Fut: Future<Output = bool>,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (out, mut outgoing) = mpsc::unbounded_channel::<Frame>();
    let done = CancellationToken::new();
    let writer_done = done.clone();
    let writer_task = tokio::spawn(async move {
        let mut sequence = 0u64;
        loop {
            let frame = tokio::select! {
                frame = outgoing.recv() => match frame {
                    Some(frame) => frame,
                    None => break,
                },
                () = tokio::time::sleep(KEEPALIVE) => {
                    sequence += 1;
                    Frame::Ping(sequence)
                }
                () = writer_done.cancelled() => break,
            };
            if write_frame(&mut writer, &frame).await.is_err() {
                break;
            }
        }
        writer_done.cancel();
    });
    loop {
        let frame = tokio::select! {
            frame = tokio::time::timeout(SILENCE_LIMIT, read_frame(&mut reader)) => frame,
            () = stop.cancelled() => break,
            () = done.cancelled() => break,
        };
        let frame = match frame {
            Ok(Ok(frame)) => frame,
            Ok(Err(error)) => {
                tracing::debug!(%error, "tunnel control connection ended");
                break;
            }
            Err(_) => {
                tracing::debug!("tunnel control connection silent for too long");
                break;
            }
        };
        match frame {
            Frame::Ping(sequence) => {
                let _ = out.send(Frame::Pong(sequence));
            }
            Frame::Pong(_) | Frame::Unknown(_) => {}
            frame => {
                if !handle(frame, out.clone()).await {
                    break;
                }
            }
        }
    }
    // Let frames already queued (a refusal, say) go out, then close.
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
    done.cancel();
}

/// Reconnect delays: 100 ms doubling to 800 ms, each within ±20 %. The ceiling is low on purpose: a
/// router that returns must be in use again within a second, and one TCP connection attempt a second
/// per link to a router that is down costs nothing worth saving.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: Backoff::FIRST }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_millis(800);

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        base.mul_f64(0.8 + fastrand::f64() * 0.4)
    }

    /// A connection worked: start from the shortest delay again.
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// This proxy's name: `node.id`, else the host name, else `keel`.
pub fn node_name(config: &keel_schemas::Config) -> String {
    config
        .node
        .id
        .clone()
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|name| name.trim().to_string())
        })
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "keel".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_ceiling_with_jitter_and_resets() {
        let mut backoff = Backoff::default();
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120), "{first:?}");
        for _ in 0..20 {
            backoff.next_delay();
        }
        let late = backoff.next_delay();
        assert!(late >= Duration::from_millis(640) && late <= Duration::from_millis(960), "{late:?}");
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(120));
    }
}
