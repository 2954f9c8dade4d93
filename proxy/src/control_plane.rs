//! The control-plane config source: follow a Keel control plane's snapshot stream.
//!
//! With `control_plane:` in keel.yaml, the file is a bootstrap (node, admin, drain_timeout, its own
//! reporters and probes, how to reach the control plane) and the control plane sends the rest. Each
//! snapshot is merged with the bootstrap and goes through the same load, validation and
//! [`Proxy::apply`] as a file reload, so it has the same no-drop guarantees; the proxy answers ACK, or
//! NACK with the errors and keeps its last good config.
//! An accepted snapshot is written to `cache_file`, from which a restart comes up while the control plane
//! is away. Disconnected, the proxy keeps serving and reconnects with jittered backoff; its hello names
//! the version it runs and the one it last refused, so the control plane sends only what is new.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use keel_schemas::config::ControlPlane;
use keel_schemas::stream::{Endpoint, MAX_LINE, ProxyMessage, ProxyStatus, STREAM_PATH, ServerMessage};
use keel_schemas::{Config, ConfigErrors, Environment, ValidatedConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::runtime::{ApplyError, Proxy};
use crate::tunnel::Backoff;

/// How often the proxy looks at its own status, and sends it when it changed.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// TCP keepalive probes find a control plane that vanished without closing the connection: after
/// this long idle, then every quarter of it, three times.
const KEEPALIVE: Duration = Duration::from_secs(20);

/// A snapshot the proxy runs (or ran): kept to re-apply it when the bootstrap file is reloaded.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub version: String,
    pub text: String,
}

/// Why a session with the control plane ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot connect to {address}: {error}")]
    Connect { address: String, error: std::io::Error },
    #[error("connecting to {0} timed out")]
    ConnectTimeout(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP/2: {0}")]
    Http(#[from] hyper::Error),
    #[error("the control plane answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("the stream broke: {0}")]
    Stream(String),
}

/// The name a snapshot's errors and `/config_dump` give as its source.
fn source_name(control_plane: &ControlPlane) -> String {
    format!("control-plane:{}", control_plane.address)
}

/// Merges a snapshot's sections with the bootstrap's and validates the result, as a file is.
pub fn load_snapshot(
    text: &str,
    version: &str,
    bootstrap: &Config,
    env: &dyn Environment,
) -> Result<ValidatedConfig, ConfigErrors> {
    let origin = format!("snapshot {version}");
    let prepare = |config: &mut Config| {
        config.node = bootstrap.node.clone();
        config.admin = bootstrap.admin.clone();
        config.drain_timeout = bootstrap.drain_timeout;
        config.control_plane = None;
        // The file's own reporters and probes run beside what the control plane sends (a probe name
        // given by both is a validation error, reported like any other).
        config.reporters = bootstrap.reporters.clone();
        let sent = std::mem::take(&mut config.probes);
        config.probes = bootstrap.probes.iter().cloned().chain(sent).collect();
        Ok(())
    };
    keel_schemas::load_with(text, &origin, env, &prepare)
}

/// Applies a snapshot; `Err` carries the NACK's error text.
async fn apply_snapshot(
    proxy: &Proxy,
    bootstrap: &Config,
    snapshot: Snapshot,
    source: &str,
) -> Result<(), String> {
    let config = match load_snapshot(&snapshot.text, &snapshot.version, bootstrap, proxy.env()) {
        Ok(config) => config,
        Err(errors) => {
            proxy.record_rejected(source, Some(&snapshot.version), &errors, true);
            return Err(errors.to_string());
        }
    };
    match proxy.apply(config, source, &snapshot.version).await {
        Ok(_) => {
            proxy.set_snapshot(snapshot);
            Ok(())
        }
        Err(ApplyError::Draining) => Err("the proxy is draining".to_string()),
        Err(error) => Err(error.to_string()),
    }
}

/// Comes up from the cached snapshot, if there is a readable one that still applies.
pub async fn apply_cache(proxy: &Proxy, bootstrap: &Config) {
    let Some(control_plane) = &bootstrap.control_plane else { return };
    let Some(path) = &control_plane.cache_file else { return };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
        Err(error) => {
            tracing::warn!(file = path, %error, "cannot read the snapshot cache");
            return;
        }
    };
    let cached: CachedSnapshot = match serde_json::from_str(&text) {
        Ok(cached) => cached,
        Err(error) => {
            tracing::warn!(file = path, %error, "the snapshot cache is unreadable; waiting for the control plane");
            return;
        }
    };
    let snapshot = Snapshot { version: cached.version, text: cached.config };
    let version = snapshot.version.clone();
    match apply_snapshot(proxy, bootstrap, snapshot, &format!("cache:{path}")).await {
        Ok(()) => tracing::info!(
            file = path,
            version,
            "running the cached snapshot until the control plane answers"
        ),
        Err(error) => tracing::warn!(
            file = path,
            error,
            "the cached snapshot does not apply; waiting for the control plane"
        ),
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CachedSnapshot {
    version: String,
    config: String,
}

/// Writes the cache next to its final name and renames it over, so a crash never leaves half a file.
fn write_cache(path: &str, snapshot: &Snapshot) -> std::io::Result<()> {
    let cached = CachedSnapshot { version: snapshot.version.clone(), config: snapshot.text.clone() };
    let temporary = format!("{path}.tmp");
    std::fs::write(&temporary, serde_json::to_vec(&cached).unwrap_or_default())?;
    std::fs::rename(&temporary, path)
}

/// Makes `proxy` a follower of the control plane its bootstrap file names: it comes up from the cached
/// snapshot (if any still applies) and then follows the control plane in a task of its own.
pub async fn start_following(proxy: &Proxy, bootstrap: Config) {
    proxy.set_bootstrap(bootstrap.clone());
    apply_cache(proxy, &bootstrap).await;
    tokio::spawn(follow(proxy.clone(), bootstrap));
}

/// Follows the control plane until the proxy shuts down.
pub async fn follow(proxy: Proxy, bootstrap: Config) {
    let Some(control_plane) = bootstrap.control_plane.clone() else { return };
    let endpoint = match Endpoint::parse(&control_plane.address) {
        Ok(endpoint) => endpoint,
        Err(problem) => {
            tracing::error!(problem, "invalid control_plane.address");
            return;
        }
    };
    let tls = match (endpoint.tls, &control_plane.ca_file) {
        (true, Some(ca_file)) => {
            let server_name = control_plane.server_name.clone().unwrap_or_else(|| endpoint.host.clone());
            match crate::tunnel::tls::control_plane_client(ca_file, &server_name) {
                Ok(tls) => Some(tls),
                Err(problem) => {
                    tracing::error!(problem, "cannot set up TLS to the control plane");
                    return;
                }
            }
        }
        _ => None,
    };
    let mut shutdown = proxy.shutdown_requests();
    let mut backoff = Backoff::default();
    let mut logged_down = false;
    loop {
        let connected_at = tokio::time::Instant::now();
        let result = tokio::select! {
            result = session(&proxy, &bootstrap, &control_plane, &endpoint, tls.as_ref()) => result,
            _ = shutdown.changed() => return,
        };
        if proxy.is_draining() {
            return;
        }
        match result {
            Ok(()) => tracing::info!(address = %control_plane.address, "the control plane closed the stream"),
            Err(error) if !logged_down => {
                tracing::warn!(%error, "control plane unreachable; serving the last config and retrying");
                logged_down = true;
            }
            Err(error) => tracing::debug!(%error, "control plane still unreachable"),
        }
        // A stream that lived a while was a success: retry soon.
        if connected_at.elapsed() > Duration::from_secs(5) {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
        if proxy.last_control_plane_contact().is_some_and(|at| at >= connected_at) {
            logged_down = false;
        }
    }
}

/// One stream: connect, hello, then snapshots in and ACK/NACK and status out until it breaks.
async fn session(
    proxy: &Proxy,
    bootstrap: &Config,
    control_plane: &ControlPlane,
    endpoint: &Endpoint,
    tls: Option<&crate::tunnel::tls::ControlPlaneClient>,
) -> Result<(), SessionError> {
    let address = endpoint.authority();
    let target: keel_schemas::types::HostPort =
        address.parse().map_err(|problem: String| SessionError::Stream(problem))?;
    let timeout = control_plane.connect_timeout.get();
    let tcp = tokio::time::timeout(timeout, crate::cluster::connect_to(&target))
        .await
        .map_err(|_| SessionError::ConnectTimeout(address.clone()))?
        .map_err(|error| SessionError::Connect { address: address.clone(), error })?;
    // A control plane that vanished without closing the connection is noticed by TCP keepalive.
    let keepalive =
        socket2::TcpKeepalive::new().with_time(KEEPALIVE).with_interval(KEEPALIVE / 4).with_retries(3);
    if let Err(error) = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive) {
        tracing::debug!(%error, "cannot set TCP keepalive on the control-plane connection");
    }
    let stream: Box<dyn Io> = match tls {
        None => Box::new(tcp),
        Some(tls) => Box::new(
            tokio::time::timeout(timeout, tls.connect(tcp))
                .await
                .map_err(|_| SessionError::ConnectTimeout(address.clone()))?
                .map_err(|error| SessionError::Tls(error.to_string()))?,
        ),
    };
    // HTTP/1.1 with chunked bodies both ways (hyper streams a request body and a response body at once).
    // HTTP/2 would do as well, but its code costs every proxy ~1 MB of idle memory.
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let connection = tokio::spawn(connection);
    let _stop_connection = AbortOnDrop(connection);

    let (lines, receive) = mpsc::channel::<Bytes>(8);
    let node = crate::tunnel::node_name(bootstrap);
    let hello = ProxyMessage::Hello {
        node: node.clone(),
        labels: bootstrap.node.labels.clone(),
        version: proxy.snapshot().map(|snapshot| snapshot.version),
        rejected_version: proxy
            .last_rejected()
            .filter(|r| r.source.starts_with("control-plane:"))
            .and_then(|r| r.version.clone()),
        software: env!("CARGO_PKG_VERSION").to_string(),
        client: keel_schemas::stream::ClientInfo::from_env(|name| proxy.env().var(name)),
    };
    send(&lines, &hello).await?;
    let scheme = if endpoint.tls { "https" } else { "http" };
    let mut request = hyper::Request::post(format!("{scheme}://{address}{STREAM_PATH}"))
        .header(hyper::header::CONTENT_TYPE, "application/x-ndjson");
    if let Some(token) = &control_plane.token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {}", token.expose()));
    }
    let request = request
        .body(ChannelBody { lines: receive })
        .map_err(|error| SessionError::Stream(error.to_string()))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    if !status.is_success() {
        let body = response.into_body().collect().await.map(|body| body.to_bytes()).unwrap_or_default();
        let body = String::from_utf8_lossy(&body[..body.len().min(512)]).trim().to_string();
        return Err(SessionError::Refused { status: status.as_u16(), body });
    }
    proxy.touch_control_plane();
    tracing::info!(address = %control_plane.address, node, "following the control plane");
    let mut body = response.into_body();
    let mut buffer = BytesMut::new();
    let source = source_name(control_plane);
    let mut last_status: Option<ProxyStatus> = None;
    let mut status_tick = tokio::time::interval(STATUS_INTERVAL);
    loop {
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line = buffer.split_to(end + 1);
            let line = &line[..end];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let message: ServerMessage = serde_json::from_slice(line)
                .map_err(|error| SessionError::Stream(format!("unreadable message: {error}")))?;
            let ServerMessage::Snapshot { version, nonce, config } = message;
            proxy.touch_control_plane();
            let snapshot = Snapshot { version: version.clone(), text: config };
            let reply = match apply_snapshot(proxy, bootstrap, snapshot.clone(), &source).await {
                Ok(()) => {
                    if let Some(path) = &control_plane.cache_file
                        && let Err(error) = write_cache(path, &snapshot)
                    {
                        tracing::warn!(file = path, %error, "cannot write the snapshot cache");
                    }
                    ProxyMessage::Ack { version, nonce }
                }
                Err(error) => ProxyMessage::Nack { version, nonce, error },
            };
            send(&lines, &reply).await?;
        }
        if buffer.len() > MAX_LINE {
            return Err(SessionError::Stream(format!("a message longer than {MAX_LINE} bytes")));
        }
        tokio::select! {
            frame = body.frame() => match frame {
                None => return Ok(()),
                Some(Err(error)) => return Err(error.into()),
                Some(Ok(frame)) => if let Ok(data) = frame.into_data() { buffer.extend_from_slice(&data) },
            },
            _ = status_tick.tick() => {
                let status = proxy.status_report().await;
                if last_status.as_ref() != Some(&status) {
                    send(&lines, &ProxyMessage::Status { status: status.clone() }).await?;
                    last_status = Some(status);
                }
            }
        }
    }
}

async fn send(lines: &mpsc::Sender<Bytes>, message: &ProxyMessage) -> Result<(), SessionError> {
    let mut line = serde_json::to_vec(message).map_err(|error| SessionError::Stream(error.to_string()))?;
    line.push(b'\n');
    lines
        .send(Bytes::from(line))
        .await
        .map_err(|_| SessionError::Stream("the request body closed".to_string()))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The request body: one line per message.
struct ChannelBody {
    lines: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.lines.poll_recv(cx).map(|line| line.map(|line| Ok(hyper::body::Frame::data(line))))
    }
}
