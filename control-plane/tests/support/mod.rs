//! Shared test helpers: a control plane on 127.0.0.1:0 with a temporary database, and a small HTTP/1.1
//! client.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_control_plane::auth::Tokens;
use keel_control_plane::{ControlPlane, Settings};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const OPERATOR: &str = "operator-token";
pub const PROXY: &str = "proxy-token";

pub fn settings(database: &Path, listen: SocketAddr) -> Settings {
    Settings {
        listen,
        database: database.to_path_buf(),
        tokens: Tokens::new(vec![OPERATOR.into()], vec![PROXY.into()]),
        tls: None,
        debounce: Duration::from_millis(10),
        node_flush_interval: Duration::from_millis(50),
        netcheck: keel_control_plane::NetCheckSettings::default(),
    }
}

pub async fn start(database: &Path) -> ControlPlane {
    ControlPlane::start(settings(database, "127.0.0.1:0".parse().unwrap())).await.unwrap()
}

pub fn database(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("cp.db")
}

/// One request: (status, body as JSON, or as a string value when it is not JSON).
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<(&str, &Value)>,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let auth = token.map(|token| format!("Authorization: Bearer {token}\r\n")).unwrap_or_default();
    let (content_type, body) = match body {
        Some((content_type, body)) => (format!("Content-Type: {content_type}\r\n"), body.to_string()),
        None => (String::new(), String::new()),
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: cp\r\n{auth}{content_type}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response).to_string();
    let status = response.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let (_, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()));
    (status, body)
}

pub async fn operator(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let content_type = if method == "PATCH" { "application/merge-patch+json" } else { "application/json" };
    call(addr, method, path, Some(OPERATOR), body.map(|body| (content_type, body))).await
}

/// Waits up to 5 s for `check` to hold.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a reporter on node `gw-1` sends (seed 000's request); the control plane must answer 200.
pub async fn report_address(cp: SocketAddr, address: &str) {
    let mut stream = TcpStream::connect(cp).await.unwrap();
    let body = format!(r#"{{"ipAddress": "{address}"}}"#);
    let request = format!(
        "POST /api/v1/public-ip HTTP/1.1\r\nHost: cp\r\nX-API-Token: {PROXY}\r\nX-Keel-Node: gw-1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}
