//! A small HTTP/1.1 client for the DNS providers' APIs (and the proxy's HTTP echo sources): one request
//! per connection, HTTPS with the Mozilla roots (webpki-roots) or plain HTTP (for tests against a local
//! server).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(15);
/// Largest answer read.
const MAX_BODY: usize = 1 << 20;

/// An answer: status, headers, body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// `Retry-After` in seconds, when the server gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        let seconds: u64 =
            self.headers.get(hyper::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
        Some(Duration::from_secs(seconds))
    }
}

fn tls() -> tokio_rustls::TlsConnector {
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Sends one request to `url` (`http://` or `https://`).
pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<Answer, String> {
    tokio::time::timeout(TIMEOUT, request_inner(None, method, url, headers, body))
        .await
        .map_err(|_| format!("{url}: no answer within {TIMEOUT:?}"))?
}

/// Sends one request to `url`, dialling `dial` rather than what the URL's host resolves to (to choose
/// the address family); the TLS name and `Host` are still the URL's.
pub async fn request_at(
    dial: SocketAddr,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<Answer, String> {
    tokio::time::timeout(TIMEOUT, request_inner(Some(dial), method, url, headers, body))
        .await
        .map_err(|_| format!("{url}: no answer within {TIMEOUT:?}"))?
}

async fn request_inner(
    dial: Option<SocketAddr>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<Answer, String> {
    let uri: hyper::Uri = url.parse().map_err(|error| format!("invalid URL {url:?}: {error}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("{url}: only http:// and https:// URLs")),
    };
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?.trim_matches(['[', ']']).to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = match dial {
        Some(address) => TcpStream::connect(address).await,
        None => TcpStream::connect((host.as_str(), port)).await,
    }
    .map_err(|error| format!("cannot reach {host}:{port}: {error}"))?;
    let _ = tcp.set_nodelay(true);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let authority = uri.authority().map(|a| a.to_string()).unwrap_or_else(|| host.clone());
    let mut builder =
        hyper::Request::builder().method(method).uri(path).header(hyper::header::HOST, authority);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|error| format!("{url}: {error}"))?;
    let response = if https {
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|_| format!("{host}: not a valid server name"))?;
        let stream = tls().connect(name, tcp).await.map_err(|error| format!("TLS to {host}: {error}"))?;
        send(TokioIo::new(stream), request).await?
    } else {
        send(TokioIo::new(tcp), request).await?
    };
    let (parts, body) = response.into_parts();
    let body = http_body_util::Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|error| format!("{url}: reading the answer: {error}"))?
        .to_bytes();
    Ok(Answer { status: parts.status.as_u16(), headers: parts.headers, body })
}

async fn send<S>(
    io: TokioIo<S>,
    request: hyper::Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(io).await.map_err(|error| format!("HTTP: {error}"))?;
    tokio::spawn(connection);
    sender.send_request(request).await.map_err(|error| format!("HTTP: {error}"))
}
