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
    let tokens = Tokens::new(vec![OPERATOR.into()], vec![PROXY.into()]);
    let mut settings = Settings::new(listen, database.to_path_buf(), tokens);
    (settings.debounce, settings.node_flush_interval) =
        (Duration::from_millis(10), Duration::from_millis(50));
    settings
}

/// Stops a proxy started with [`start_proxy`] at once: listeners, connections and tunnels.
pub async fn stop_proxy(proxy: &keel_proxy::Proxy) {
    proxy.shutdown(keel_proxy::Shutdown::Fast);
    proxy.close_all_connections().await;
    proxy.stop_tunnels().await;
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
    let auth = token.map(|token| format!("Bearer {token}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|value| ("Authorization", value.as_str())).collect();
    request(addr, method, path, &headers, body).await
}

/// One request with the token in `X-API-Token`, as seed 000's and 002's clients send it, and a JSON body.
pub async fn api_token_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let headers: Vec<(&str, &str)> = token.iter().map(|token| ("X-API-Token", *token)).collect();
    request(addr, method, path, &headers, body.as_ref().map(|body| ("application/json", body))).await
}

/// One HTTP/1.1 request with `headers` and an optional body of a content type.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &Value)>,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut head: String = headers.iter().map(|(name, value)| format!("{name}: {value}\r\n")).collect();
    let body = match body {
        Some((content_type, body)) => {
            head.push_str(&format!("Content-Type: {content_type}\r\n"));
            body.to_string()
        }
        None => String::new(),
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: cp\r\n{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
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

/// Waits up to `within` for `count` DnsRecords to be in sync, as `/raw` shows them.
pub async fn records_in_sync(cp: SocketAddr, count: usize, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (_, raw) = operator(cp, "GET", "/raw", None).await;
        let synced =
            raw["records"].as_array().unwrap().iter().filter(|r| r["status"]["inSync"] == true).count();
        if synced == count {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "not in sync: {raw}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a reporter on node `gw-1` sends (seed 000's request); the control plane must answer 200.
pub async fn report_address(cp: SocketAddr, address: &str) {
    report_address_as(cp, "gw-1", address).await;
}

/// What a reporter on node `node` sends (seed 000's request); the control plane must answer 200.
pub async fn report_address_as(cp: SocketAddr, node: &str, address: &str) {
    let headers = [("X-API-Token", PROXY), ("X-Keel-Node", node)];
    let body = serde_json::json!({"ipAddress": address});
    let (status, answer) =
        request(cp, "POST", "/api/v1/public-ip", &headers, Some(("application/json", &body))).await;
    assert_eq!(status, 200, "{answer}");
}

/// Runs a command; panics with its error output when it fails; returns its output.
/// Whether a fake provider's request carries `Authorization: Bearer <token>`.
pub fn has_bearer(headers: &axum::http::HeaderMap, token: &str) -> bool {
    headers.get("authorization").and_then(|value| value.to_str().ok()) == Some(&format!("Bearer {token}"))
}

pub fn run(program: &str, args: &[&str]) -> String {
    let output = std::process::Command::new(program).args(args).output().expect("run a command");
    assert!(
        output.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// Whether network namespaces can be made here (root and iproute2); CI must be able to.
pub fn can_run_namespaces() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let has_ip = std::process::Command::new("ip")
        .arg("-V")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if root && has_ip {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI must run the namespace tests: needs root and iproute2");
    eprintln!("skipping a namespace test: it needs root and iproute2 (run .ci/install-test-deps as root)");
    false
}

/// Moves this thread into network namespace `name`: every socket it opens from now on is there.
pub fn enter(name: &str) {
    use std::os::fd::AsRawFd;
    let handle = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
    // SAFETY: setns on a namespace file this thread holds open; it changes only this thread's namespace.
    assert_eq!(unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
}

/// Checks Prometheus text with a real `promtool check metrics`; CI must have it.
pub fn promtool_check(metrics: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let Ok(mut promtool) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        assert!(std::env::var_os("CI").is_none(), "CI must check the metrics with promtool");
        return;
    };
    promtool.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Headless Chromium's command, if installed; CI must have it.
pub fn chromium() -> Option<&'static str> {
    let found = ["chromium", "chromium-browser"].into_iter().find(|name| {
        std::process::Command::new(name).arg("--version").output().is_ok_and(|out| out.status.success())
    });
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "CI must run the browser tests: install chromium");
        eprintln!("skipping a browser test: chromium is not installed (run .ci/install-test-deps)");
    }
    found
}

/// The DOM `browser` builds for `url` after letting its scripts run for `script_ms` of virtual time.
pub async fn render(browser: &'static str, url: String, script_ms: u32) -> String {
    let profile = tempfile::tempdir().unwrap();
    let user_data = format!("--user-data-dir={}", profile.path().display());
    let budget = format!("--virtual-time-budget={script_ms}");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(browser)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", &user_data, &budget])
            .args(["--dump-dom", &url])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "chromium: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// A proxy following the control plane at `cp` with the test's proxy token, as
/// `proxy --config bootstrap.yaml` runs it; its snapshot cache is in `dir`.
pub async fn start_proxy(
    dir: &Path,
    node: &str,
    labels: &[(&str, &str)],
    cp: SocketAddr,
) -> keel_proxy::Proxy {
    use keel_proxy::{ProcessEnvironment, Proxy};
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let bootstrap = format!(
        "node: {{id: {node}, labels: {{{}}}}}\nadmin: {{address: \"127.0.0.1:0\"}}\ndrain_timeout: 1s\ncontrol_plane:\n  address: http://{cp}\n  token: {PROXY}\n  cache_file: {}/{node}.snapshot\n",
        labels.join(", "),
        dir.display()
    );
    let loaded = keel_proxy::source::load_text(&bootstrap, "bootstrap.yaml", &ProcessEnvironment).unwrap();
    let proxy = Proxy::new(std::sync::Arc::new(ProcessEnvironment), None);
    keel_proxy::control_plane::start_following(&proxy, loaded.config.config().clone()).await;
    proxy
}

/// A TCP echo server on loopback; returns its address.
pub async fn echo() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// Whether `ping` sent to `addr` comes back (within 2 s).
pub async fn round_trip(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else { return false };
    if stream.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut reply = [0u8; 4];
    matches!(tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut reply)).await, Ok(Ok(_)))
        && &reply == b"ping"
}
