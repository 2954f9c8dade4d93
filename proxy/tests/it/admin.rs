//! The admin API: readiness, dumps, metrics format, methods, tokens, drain and quit.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::support::{TestProxy, Upstream, echo_once, eventually, http};

fn config(upstream: std::net::SocketAddr, admin_extra: &str) -> String {
    format!(
        r#"
admin:
  address: 127.0.0.1:0
{admin_extra}
listeners:
  - {{name: front, address: "127.0.0.1:0", cluster: back}}
clusters:
  - name: back
    endpoints: ["{upstream}"]
    health_check: {{interval: 1s, timeout: 500ms}}
"#
    )
}

#[tokio::test]
async fn status_endpoints_answer_and_mutations_are_post_only() {
    let upstream = Upstream::echo().await;
    let proxy = TestProxy::start(&config(upstream.addr, "")).await;
    assert_eq!(proxy.get("/ready").await, (200, "LIVE\n".into()));
    assert_eq!(proxy.get("/healthz").await.0, 200);
    assert_eq!(proxy.get("/nope").await.0, 404);
    for path in ["/reload", "/drain", "/quitquitquit"] {
        assert_eq!(proxy.get(path).await.0, 405, "GET {path}");
    }
    let (status, listeners) = proxy.get("/listeners").await;
    assert_eq!(status, 200);
    assert_eq!(listeners, format!("front::{}\n", proxy.addr("front").await));
    let (_, clusters) = proxy.get("/clusters?format=json").await;
    let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    assert_eq!(clusters["clusters"][0]["endpoints"][0]["address"], upstream.addr.to_string());
    proxy.stop().await;
}

#[tokio::test]
async fn config_dump_shows_version_and_source_and_masks_secrets() {
    let upstream = Upstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "very-secret-token\n").unwrap();
    let proxy =
        TestProxy::start(&config(upstream.addr, &format!("  token_file: {}", token_file.display()))).await;

    // Without the token: refused.
    assert_eq!(proxy.get("/config_dump").await.0, 401);
    assert_eq!(proxy.post("/reload").await.0, 401);
    assert_eq!(http(proxy.admin, "POST", "/drain", Some("wrong")).await.0, 401);
    // Read-only status stays open.
    assert_eq!(proxy.get("/ready").await.0, 200);

    let (status, body) = http(proxy.admin, "GET", "/config_dump", Some("very-secret-token")).await;
    assert_eq!(status, 200);
    assert!(!body.contains("very-secret-token"), "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["running"]["config"]["admin"]["token"], "**redacted**");
    assert_eq!(dump["running"]["source"], format!("file:{}", proxy.config_path.display()));
    assert_eq!(dump["running"]["version"].as_str().unwrap().len(), 16);
    assert!(dump["running"]["applied_at"].as_str().unwrap().ends_with('Z'));
    assert!(dump["last_rejected"].is_null());
    assert_eq!(http(proxy.admin, "POST", "/reload", Some("very-secret-token")).await.0, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn prometheus_output_passes_promtool() {
    let upstream = Upstream::echo().await;
    let proxy = TestProxy::start(&config(upstream.addr, "")).await;
    let mut stream = TcpStream::connect(proxy.addr("front").await).await.unwrap();
    echo_once(&mut stream, b"metrics please").await.unwrap();
    drop(stream);
    // Let the connect-time histogram and health checks record something.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, body) = proxy.get("/stats/prometheus").await;
    assert_eq!(status, 200);
    for name in [
        "keel_listener_downstream_connections_total",
        "keel_listener_downstream_connections_active",
        "keel_listener_downstream_received_bytes_total",
        "keel_cluster_upstream_connect_failures_total",
        "keel_cluster_upstream_connect_duration_seconds_bucket",
        "keel_cluster_endpoint_healthy",
        "keel_config_reloads_total",
        "keel_config_reload_failures_total",
        "keel_build_info",
    ] {
        assert!(body.contains(name), "missing {name} in\n{body}");
    }
    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut promtool = match promtool {
        Ok(promtool) => promtool,
        // CI installs promtool (.ci/install-test-deps) and must run this check; a developer machine
        // without it still checks everything above.
        Err(error) if std::env::var_os("CI").is_none() => {
            eprintln!("promtool not found ({error}): run .ci/install-test-deps for the full check");
            return;
        }
        Err(error) => panic!("promtool is required in CI: {error}"),
    };
    use std::io::Write;
    promtool.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let output = promtool.wait_with_output().unwrap();
    let complaints =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success() && complaints.trim().is_empty(),
        "promtool check metrics:\n{complaints}\n{body}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn drain_marks_not_ready_and_stops_accepting_but_lets_connections_finish() {
    let upstream = Upstream::echo().await;
    let proxy = TestProxy::start(&config(upstream.addr, "")).await;
    let front = proxy.addr("front").await;
    let mut open = TcpStream::connect(front).await.unwrap();
    echo_once(&mut open, b"before").await.unwrap();
    assert_eq!(proxy.post("/drain").await, (200, "draining\n".into()));
    assert_eq!(proxy.get("/ready").await, (503, "DRAINING\n".into()));
    eventually(Duration::from_secs(2), "the listener to close", || async {
        TcpStream::connect(front).await.is_err()
    })
    .await;
    echo_once(&mut open, b"during").await.unwrap();
    assert_eq!(proxy.metric("keel_server_ready").await, 0.0);
    drop(open);
    proxy.stop().await;
}

#[tokio::test]
async fn quitquitquit_stops_the_proxy_now() {
    let upstream = Upstream::echo().await;
    let proxy = TestProxy::start(&config(upstream.addr, "")).await;
    let mut open = TcpStream::connect(proxy.addr("front").await).await.unwrap();
    echo_once(&mut open, b"x").await.unwrap();
    assert_eq!(proxy.post("/quitquitquit").await.0, 200);
    // Fast shutdown does not wait for the open connection: serve returns promptly.
    tokio::time::timeout(Duration::from_secs(3), proxy.stop()).await.expect("the proxy should stop at once");
}

#[tokio::test]
async fn ready_is_503_until_a_config_is_applied() {
    use keel_proxy::{ProcessEnvironment, Proxy, source};
    let proxy = Proxy::new(std::sync::Arc::new(ProcessEnvironment), None);
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = socket.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(keel_proxy::admin::serve(socket, proxy.clone(), stop.clone()));
    assert_eq!(http(admin, "GET", "/ready", None).await, (503, "NOT READY\n".into()));
    let upstream = Upstream::echo().await;
    let loaded = source::load_text(&config(upstream.addr, ""), "test", &ProcessEnvironment).unwrap();
    proxy.apply(loaded.config, "test:inline", &loaded.version).await.unwrap();
    assert_eq!(http(admin, "GET", "/ready", None).await, (200, "LIVE\n".into()));
    stop.cancel();
    server.await.unwrap().unwrap();
    proxy.close_all_connections().await;
}

#[tokio::test]
async fn a_flood_of_slow_connections_is_shed_for_a_probe() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::echo().await;
    let proxy = TestProxy::start(&config(upstream.addr, "")).await;
    // Every slot taken by a connection that sent half a request head.
    let mut slow = Vec::new();
    for _ in 0..keel_proxy::admin::MAX_CONNECTIONS {
        let mut stream = TcpStream::connect(proxy.admin).await.unwrap();
        stream.write_all(b"GET /ready HTTP/1.1\r\nHost: admin\r\n").await.unwrap();
        slow.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    assert_eq!(proxy.get("/ready").await, (200, "LIVE\n".into()));
    assert!(started.elapsed() < Duration::from_millis(500), "answered after {:?}", started.elapsed());
    // They were closed to make room, well before their head timeout.
    for (index, stream) in slow.iter_mut().enumerate() {
        let mut buffer = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buffer)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "slow connection {index} is still open: {read:?}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_starve_no_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::echo().await;
    let proxy = TestProxy::start(&config(upstream.addr, "")).await;
    // 200 slow connections: silent, and half a request head.
    let mut slow = Vec::new();
    for index in 0..200 {
        let mut stream = TcpStream::connect(proxy.admin).await.unwrap();
        if index % 2 == 1 {
            stream.write_all(b"GET /ready HTTP/1.1\r\nHost: admin\r\n").await.unwrap();
        }
        slow.push(stream);
    }
    // Probes and scrapes are answered meanwhile.
    let started = std::time::Instant::now();
    assert_eq!(proxy.get("/ready").await, (200, "LIVE\n".into()));
    assert_eq!(proxy.get("/stats/prometheus").await.0, 200);
    assert!(started.elapsed() < Duration::from_millis(500), "answered after {:?}", started.elapsed());

    tokio::time::sleep(keel_proxy::admin::REQUEST_HEAD_TIMEOUT + Duration::from_millis(700)).await;
    for (index, stream) in slow.iter_mut().enumerate() {
        let mut buffer = [0u8; 256];
        let closed = match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(read)) => String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 408"),
            Err(_) => false,
        };
        assert!(closed, "slow connection {index} is still open");
    }
    // A request is answered and its connection closed: nothing idles.
    let mut stream = TcpStream::connect(proxy.admin).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    proxy.stop().await;
}
