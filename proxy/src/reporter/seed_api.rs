//! Seed 000's address API, both ways: reporting an address (`POST /api/v1/public-ip`, the seed's request
//! exactly, plus `X-Keel-Node`) and reading the address another node reported (`GET
//! /api/v1/public-ip/{node}`, Keel's addition for seed 001's centralized detection), with a long poll
//! that returns as soon as the address differs from the one the caller knows.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use keel_schemas::config::AddressFamily;
use keel_schemas::types::Secret;

/// How long a plain request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the control plane holds a long poll; the request may take this plus [`REQUEST_TIMEOUT`].
pub const LONG_POLL: Duration = Duration::from_secs(50);
/// Largest answer read.
const MAX_BODY: usize = 64 * 1024;

/// Why a call got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach {url}: {error}")]
    Connect { url: String, error: String },
    #[error("{url} answered {status}: {body}")]
    Refused { url: String, status: u16, body: String },
    #[error("{url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

/// One request to `url` (`http://host:port`) at `path`; the status and body when it answered.
async fn call(
    url: &str,
    method: hyper::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    timeout: Duration,
) -> Result<(u16, Bytes), CallError> {
    let url = url.trim_end_matches('/');
    let exchange = async {
        let connect = |error: String| CallError::Connect { url: url.to_string(), error };
        let parsed = keel_schemas::stream::Endpoint::parse(url).map_err(connect)?;
        let target: keel_schemas::types::HostPort = parsed.authority().parse().map_err(connect)?;
        let stream = crate::cluster::connect_to(&target).await.map_err(|e| connect(e.to_string()))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| connect(e.to_string()))?;
        tokio::spawn(connection);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, parsed.authority());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body)).map_err(|e| connect(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(|e| connect(e.to_string()))?;
        let status = response.status().as_u16();
        let body = http_body_util::Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| CallError::Timeout { url: url.to_string(), timeout })?
}

fn refused(url: &str, status: u16, body: &[u8]) -> CallError {
    let body = String::from_utf8_lossy(&body[..body.len().min(256)]).trim().to_string();
    CallError::Refused { url: url.to_string(), status, body }
}

/// Seed 000's report: `POST /api/v1/public-ip`, `X-API-Token`, `{"ipAddress": "..."}`; `Ok` on a 2xx.
pub async fn post_public_ip(
    url: &str,
    token: Option<&Secret>,
    node: &str,
    address: IpAddr,
) -> Result<(), CallError> {
    let body = serde_json::json!({ "ipAddress": address.to_string() }).to_string();
    let mut headers = vec![("Content-Type", "application/json"), ("X-Keel-Node", node)];
    if let Some(token) = token {
        headers.push(("X-API-Token", token.expose()));
    }
    let (status, answer) =
        call(url, hyper::Method::POST, "/api/v1/public-ip", &headers, Bytes::from(body), REQUEST_TIMEOUT)
            .await?;
    if (200..300).contains(&status) { Ok(()) } else { Err(refused(url, status, &answer)) }
}

/// The address of `family` that `node` last reported, or `None` when it has reported none.
pub async fn read_public_ip(
    url: &str,
    token: Option<&Secret>,
    node: &str,
    family: AddressFamily,
) -> Result<Option<IpAddr>, CallError> {
    fetch_public_ip(url, token, node, family, None).await
}

/// Like [`read_public_ip`], but the control plane first waits up to [`LONG_POLL`] for the address to
/// differ from `known` (`None`: for there to be one).
pub async fn next_public_ip(
    url: &str,
    token: Option<&Secret>,
    node: &str,
    family: AddressFamily,
    known: Option<IpAddr>,
) -> Result<Option<IpAddr>, CallError> {
    fetch_public_ip(url, token, node, family, Some(known)).await
}

async fn fetch_public_ip(
    url: &str,
    token: Option<&Secret>,
    node: &str,
    family: AddressFamily,
    long_poll: Option<Option<IpAddr>>,
) -> Result<Option<IpAddr>, CallError> {
    let family_name = match family {
        AddressFamily::Ipv4 => "ipv4",
        AddressFamily::Ipv6 => "ipv6",
    };
    let mut path = format!("/api/v1/public-ip/{node}?family={family_name}");
    let mut timeout = REQUEST_TIMEOUT;
    if let Some(known) = long_poll {
        let known = known.map(|address| address.to_string()).unwrap_or_default();
        path.push_str(&format!("&known={known}&wait={}", LONG_POLL.as_secs()));
        timeout += LONG_POLL;
    }
    let mut headers = Vec::new();
    if let Some(token) = token {
        headers.push(("X-API-Token", token.expose()));
    }
    let (status, answer) = call(url, hyper::Method::GET, &path, &headers, Bytes::new(), timeout).await?;
    match status {
        200 => {
            let value: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
            let address = value["ipAddress"].as_str().and_then(|text| text.parse::<IpAddr>().ok());
            match address {
                Some(address) if address.is_ipv6() == (family == AddressFamily::Ipv6) => Ok(Some(address)),
                _ => Err(refused(url, status, &answer)),
            }
        }
        404 => Ok(None),
        _ => Err(refused(url, status, &answer)),
    }
}
