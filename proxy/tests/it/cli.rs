//! The `proxy` binary as an operator runs it: validate, version, signals.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::support::{Upstream, echo_once, expect_closed, http};

const PROXY: &str = env!("CARGO_BIN_EXE_proxy");

/// A relay from listener `front` (port 0) to `upstream`, admin on port 0, with extra top-level lines.
fn relay_config(upstream: SocketAddr, top: &str) -> String {
    format!(
        "admin: {{address: \"127.0.0.1:0\"}}\n{top}\nlisteners:\n  - {{name: front, address: \"127.0.0.1:0\", cluster: back}}\nclusters:\n  - {{name: back, endpoints: [\"{upstream}\"]}}\n"
    )
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("keel.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn validate_prints_ok_or_every_error_and_binds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // The listener's port is in use: validate must not try to bind it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let good = format!(
        "listeners:\n  - {{name: a, address: \"{}\", cluster: c}}\nclusters:\n  - {{name: c, endpoints: [\"127.0.0.1:1\"]}}\n",
        taken.local_addr().unwrap()
    );
    let path = write_config(&dir, &good);
    let output = Command::new(PROXY).args(["validate", "--config"]).arg(&path).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "OK\n");

    let bad = "listeners:\n  - {name: a, address: \"127.0.0.1:1\", cluster: db}\n  - {name: a, address: nowhere, cluster: c}\n";
    let path = write_config(&dir, bad);
    let output = Command::new(PROXY).args(["validate", "--config"]).arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("keel.yaml:3:24: listeners[1].address: invalid address \"nowhere\""), "{stderr}");

    let bad = "listeners:\n  - {name: a, address: \"127.0.0.1:1\", cluster: db}\n  - {name: a, address: \"127.0.0.1:2\", cluster: db}\n";
    let path = write_config(&dir, bad);
    let output = Command::new(PROXY).args(["validate", "--config"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 3, "{stderr}");
    assert!(stderr.contains("keel.yaml:2:48: listeners[0].cluster: no cluster named \"db\""), "{stderr}");
    assert!(stderr.contains("keel.yaml:3:12: listeners[1].name: duplicate listener name \"a\""), "{stderr}");
}

#[test]
fn version_and_schema_print() {
    let output = Command::new(PROXY).arg("--version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), format!("proxy {}\n", env!("CARGO_PKG_VERSION")));
    let output = Command::new(PROXY).arg("schema").output().unwrap();
    let schema: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(schema["title"], "keel.yaml");
}

#[tokio::test]
async fn report_once_reports_each_reporter_and_says_how_it_went() {
    // A server speaking seed 000's API, taking one request.
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink = server.local_addr().unwrap();
    let received = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut stream, _) = server.accept().await.unwrap();
        let mut request = Vec::new();
        let mut buffer = [0u8; 4096];
        while !String::from_utf8_lossy(&request).contains("ipAddress") {
            let n = stream.read(&mut buffer).await.unwrap();
            request.extend_from_slice(&buffer[..n]);
        }
        let reply = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 30\r\n\r\nPublic IP updated successfully";
        stream.write_all(reply.as_bytes()).await.unwrap();
        String::from_utf8_lossy(&request).to_string()
    });
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        &format!(
            "reporters:\n  - name: fixed\n    source: {{static: \"2001:db8::7\"}}\n    sink: {{control_plane: {{url: \"http://{sink}\", token: seed-token}}}}\n"
        ),
    );
    let run = move |args: &[&str]| {
        let output = Command::new(PROXY).args(args).arg("--config").arg(&config).output().unwrap();
        (output.status.code(), String::from_utf8_lossy(&output.stdout).to_string())
    };
    assert_eq!(
        run(&["report", "--once", "--dry-run"]),
        (Some(0), "fixed: 2001:db8::7 (dry run: not reported)\n".into())
    );
    let output = tokio::task::spawn_blocking(move || run(&["report", "--once"])).await.unwrap();
    drop(dir);
    assert_eq!(output, (Some(0), "fixed: 2001:db8::7 reported\n".into()));
    let request = received.await.unwrap();
    assert!(request.starts_with("POST /api/v1/public-ip HTTP/1.1\r\n"), "{request}");
    assert!(request.to_ascii_lowercase().contains("x-api-token: seed-token\r\n"), "{request}");
    assert!(request.ends_with(r#"{"ipAddress":"2001:db8::7"}"#), "{request}");
}

/// A `proxy` process with JSON logs, and the admin address read from its log.
struct Process {
    child: Child,
    admin: SocketAddr,
}

impl Process {
    fn start(config: &std::path::Path) -> Process {
        let mut command = Command::new(PROXY);
        command.args(["--log-format", "json", "--config"]).arg(config);
        Self::spawn(command)
    }

    fn spawn(mut command: Command) -> Process {
        let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let admin = loop {
            let line = lines.next().expect("the proxy exited before its admin API came up").unwrap();
            let log: serde_json::Value = serde_json::from_str(&line).unwrap();
            if log["fields"]["message"] == "admin listening" {
                break log["fields"]["address"].as_str().unwrap().parse().unwrap();
            }
        };
        // Keep draining stderr so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Process { child, admin }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").args(["-s", name, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    async fn listener(&self, name: &str) -> SocketAddr {
        let (_, body) = http(self.admin, "GET", "/listeners", None).await;
        let line = body.lines().find(|l| l.starts_with(&format!("{name}::"))).expect("listener");
        line.rsplit("::").next().unwrap().parse().unwrap()
    }

    /// Waits for the process to exit; its exit code.
    async fn wait(mut self, limit: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(tokio::time::Instant::now() < deadline, "the proxy did not exit in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sigterm_drains_open_connections_then_exits_zero() {
    let upstream = Upstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = relay_config(upstream.addr, "drain_timeout: 10s");
    let process = Process::start(&write_config(&dir, &config));
    let front = process.listener("front").await;
    let mut open = TcpStream::connect(front).await.unwrap();
    echo_once(&mut open, b"before").await.unwrap();

    process.signal("TERM");
    // Not ready, not accepting, but the open connection still works.
    let mut ready = 0;
    for _ in 0..100 {
        ready = http(process.admin, "GET", "/ready", None).await.0;
        if ready == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ready, 503);
    // The accept loop closes its socket when it next runs: poll for the refusal.
    let mut refused = false;
    for _ in 0..100 {
        if TcpStream::connect(front).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "a draining proxy must refuse new connections");
    echo_once(&mut open, b"during the drain").await.unwrap();
    // Finishing the last connection lets the process exit at once, well before the 10 s deadline.
    drop(open);
    let started = tokio::time::Instant::now();
    assert_eq!(process.wait(Duration::from_secs(5)).await, Some(0));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn the_drain_deadline_closes_what_is_left_and_exits_zero() {
    let upstream = Upstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = relay_config(upstream.addr, "drain_timeout: 500ms");
    let process = Process::start(&write_config(&dir, &config));
    let mut open = TcpStream::connect(process.listener("front").await).await.unwrap();
    echo_once(&mut open, b"x").await.unwrap();
    let started = tokio::time::Instant::now();
    process.signal("INT");
    expect_closed(&mut open, Duration::from_secs(5)).await;
    assert!(started.elapsed() >= Duration::from_millis(450), "closed after {:?}", started.elapsed());
    assert_eq!(process.wait(Duration::from_secs(5)).await, Some(0));
}

#[tokio::test]
async fn sighup_reloads_the_config_including_secret_files() {
    let upstream = Upstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("token");
    std::fs::write(&token, "first").unwrap();
    let config = format!(
        "admin: {{address: \"127.0.0.1:0\", token_file: \"{}\"}}\nlisteners:\n  - {{name: front, address: \"127.0.0.1:0\", cluster: back}}\nclusters:\n  - {{name: back, endpoints: [\"{}\"]}}\n",
        token.display(),
        upstream.addr
    );
    let process = Process::start(&write_config(&dir, &config));
    assert_eq!(http(process.admin, "GET", "/config_dump", Some("first")).await.0, 200);
    // The token file lives outside the watched directory: only SIGHUP picks the new one up.
    std::fs::write(&token, "second").unwrap();
    process.signal("HUP");
    let mut status = 0;
    for _ in 0..100 {
        status = http(process.admin, "GET", "/config_dump", Some("second")).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200);
    assert_eq!(http(process.admin, "GET", "/config_dump", Some("first")).await.0, 401);
    process.signal("TERM");
    assert_eq!(process.wait(Duration::from_secs(5)).await, Some(0));
}

#[tokio::test]
async fn running_out_of_file_descriptors_backs_off_and_recovers() {
    let upstream = Upstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let config = relay_config(upstream.addr, "drain_timeout: 1s");
    let path = write_config(&dir, &config);
    // A low descriptor limit for the proxy alone, set by the shell it is exec'd from.
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("ulimit -n 48 && exec {PROXY} --log-format json --config {}", path.display()));
    let process = Process::spawn(command);
    let front = process.listener("front").await;

    // Far more clients than the proxy has descriptors for: each relayed connection takes two.
    let mut clients = Vec::new();
    for _ in 0..60 {
        clients.push(TcpStream::connect(front).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(clients);

    // Once the clients are gone the proxy serves again, and it counted the failed accepts.
    let mut recovered = false;
    for _ in 0..100 {
        if let Ok(mut stream) = TcpStream::connect(front).await
            && echo_once(&mut stream, b"alive").await.is_ok()
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "the proxy should serve again once descriptors are free");
    let (_, metrics) = http(process.admin, "GET", "/stats/prometheus", None).await;
    let errors: f64 = metrics
        .lines()
        .find(|line| line.starts_with("keel_listener_accept_errors_total{listener=\"front\"}"))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(errors >= 1.0, "accept errors should be counted:\n{metrics}");
    process.signal("TERM");
    assert_eq!(process.wait(Duration::from_secs(5)).await, Some(0));
}
