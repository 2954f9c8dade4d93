//! Accepting connections: HTTP/1.1 and HTTP/2 (prior knowledge in clear, ALPN over TLS) on one port.
//! Proxies stream over HTTP/1.1 (chunked both ways); HTTP/2 clients are served the same.
//!
//! Each request gets the peer's address as an extension. On stop, the listener closes and every
//! connection is asked to finish (HTTP/2 GOAWAY); streams end when their sessions see the stop.
//!
//! Slow clients cannot hold the server: the protocol is chosen by ALPN under TLS (after a handshake with
//! a deadline) and, in clear, from the first bytes, which must arrive within the request-head timeout;
//! an HTTP/1.1 request's line and headers must arrive within it too. A long-lived stream is unaffected:
//! its head is sent at once, and only its body lasts.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::stream::PeerAddr;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections get to finish after a stop.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// HTTP/2 pings (and, for HTTP/1.1 streams, TCP keepalive probes) find proxies that vanished without
/// closing their connection.
const KEEPALIVE: Duration = Duration::from_secs(20);

/// A TLS acceptor for the certificate chain and key in these PEM files, offering h2 and http/1.1.
pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|error| anyhow::anyhow!("cannot read {}: {error}", path.display()))
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<_, _>>()
        .map_err(|error| anyhow::anyhow!("{}: not PEM certificates: {error}", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("{}: no certificate in the file", cert.display());
    }
    let key = PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|error| anyhow::anyhow!("{}: no usable private key: {error}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The HTTP/2 client preface: a connection whose first bytes are not a prefix of it speaks HTTP/1.1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What one client may take of the server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long a client may take to send a request head (or, in clear, the bytes that say which HTTP).
    pub head_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `stop`, within `limits`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    stop: CancellationToken,
    limits: Limits,
) {
    let Limits { head_timeout, max_connections } = limits;
    let connections = tokio_util::task::TaskTracker::new();
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut refused = RefusedLog::default();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, mostly: wait rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            refused.count(max_connections);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Proxies on HTTP/1.1 get no pings: TCP keepalive finds the ones that vanished.
        let keepalive =
            socket2::TcpKeepalive::new().with_time(KEEPALIVE).with_interval(KEEPALIVE / 4).with_retries(3);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let app = app.clone();
        let tls = tls.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let _slot = slot;
            match tls {
                None => match tokio::time::timeout(head_timeout, speaks_http2(&stream)).await {
                    Ok(Ok(http2)) => connection(stream, peer, app, stop, http2, head_timeout).await,
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "connection failed before a request"),
                    Err(_) => tracing::debug!(%peer, "no request within {head_timeout:?}; closed"),
                },
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let http2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            connection(stream, peer, app, stop, http2, head_timeout).await
                        }
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(STOP_GRACE, connections.wait()).await.is_err() {
        tracing::warn!("connections still open after the stop grace period");
    }
}

/// Connections closed at the limit, logged at most once a second with how many since the last line.
#[derive(Debug, Default)]
struct RefusedLog {
    since_logged: u64,
    logged_at: Option<tokio::time::Instant>,
}

impl RefusedLog {
    fn count(&mut self, max_connections: usize) {
        self.since_logged += 1;
        let now = tokio::time::Instant::now();
        if self.logged_at.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1)) {
            tracing::warn!(
                refused = self.since_logged,
                max_connections,
                "at the connection limit: new connections are closed at once"
            );
            self.since_logged = 0;
            self.logged_at = Some(now);
        }
    }
}

/// Whether a clear-text connection opens with the HTTP/2 preface, read (without consuming it) from its
/// first bytes.
async fn speaks_http2(stream: &tokio::net::TcpStream) -> std::io::Result<bool> {
    let mut first = [0u8; H2_PREFACE.len()];
    loop {
        let read = stream.peek(&mut first).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if first[..read] != H2_PREFACE[..read] {
            return Ok(false);
        }
        if read == H2_PREFACE.len() {
            return Ok(true);
        }
        // A prefix of the preface so far: wait for more (peek returns at once while bytes are queued).
        stream.readable().await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn connection<S>(
    stream: S,
    peer: std::net::SocketAddr,
    app: Router,
    stop: CancellationToken,
    http2: bool,
    head_timeout: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(PeerAddr(peer));
        app.clone().oneshot(request.map(axum::body::Body::new))
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(head_timeout);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(KEEPALIVE).keep_alive_timeout(KEEPALIVE);
    // The protocol is already known: the builder must not wait, without a deadline, to detect it.
    let builder = if http2 { builder.http2_only() } else { builder.http1_only() };
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        }
        () = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(STOP_GRACE, connection).await;
        }
    }
}
