//! Fleet benchmark: many simulated proxies on one control plane.
//!
//! Starts the release `control-plane` binary (a process of its own, so its RSS is its own), creates a
//! cluster and a listener for every simulated node, then for each fleet size connects that many light
//! clients (one HTTP/1.1 stream each, as proxies open it, speaking the real protocol: hello, snapshot,
//! ACK), and measures:
//! - the time from a REST write (a PATCH of the listener) to the last ACK of the new version, the
//!   median of several writes;
//! - the control plane's RSS per connected proxy: (RSS with the fleet connected − RSS before) / size.
//!
//! Run through benches/control-plane.sh, which builds the binary and raises the file limit.

#![allow(clippy::print_stdout)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

const OPERATOR: &str = "bench-operator";
const PROXY: &str = "bench-proxy";
/// Distinct label sets among the simulated nodes (so that snapshots are not all one).
const GROUPS: usize = 10;

struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|line| line.map(|line| Ok(hyper::body::Frame::data(line))))
    }
}

/// One simulated proxy: ACKs every snapshot; counts itself in `ready` at its first, and in `acked` at
/// its first snapshot after each write (`writes` counts them: nothing else changes snapshots here).
async fn simulated(
    index: usize,
    cp: SocketAddr,
    writes: watch::Receiver<u64>,
    acked: Arc<AtomicUsize>,
    ready: Arc<AtomicUsize>,
) {
    // Like a proxy, retry a stream that failed before its first snapshot.
    for _ in 0..10 {
        if stream(index, cp, writes.clone(), &acked, &ready).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100 + fastrand::u64(..200))).await;
    }
}

/// One stream; false if it failed before the first snapshot.
async fn stream(
    index: usize,
    cp: SocketAddr,
    writes: watch::Receiver<u64>,
    acked: &AtomicUsize,
    ready: &AtomicUsize,
) -> bool {
    let tcp = match TcpStream::connect(cp).await {
        Ok(tcp) => tcp,
        Err(error) => {
            eprintln!("sim {index}: connect failed: {error}");
            return false;
        }
    };
    let (mut sender, connection) = match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
        Ok(handshake) => handshake,
        Err(error) => {
            eprintln!("sim {index}: HTTP handshake failed: {error}");
            return false;
        }
    };
    tokio::spawn(connection);
    let (lines, receive) = mpsc::channel::<Bytes>(4);
    let hello = json!({"type": "hello", "node": format!("sim-{index}"), "labels": {"fleet": "sim", "group": (index % GROUPS).to_string()}, "software": "bench"});
    let _ = lines.send(Bytes::from(format!("{hello}\n"))).await;
    let request = hyper::Request::post(format!("http://{cp}/v1/stream"))
        .header("authorization", format!("Bearer {PROXY}"))
        .body(ChannelBody(receive))
        .unwrap();
    let response = match sender.send_request(request).await {
        Ok(response) => response,
        Err(error) => {
            eprintln!("sim {index}: request failed: {error}");
            return false;
        }
    };
    let mut body = response.into_body();
    let mut buffer = BytesMut::new();
    let mut counted_ready = false;
    let mut counted_write = *writes.borrow();
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(data) = frame.into_data() else { continue };
        buffer.extend_from_slice(&data);
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line = buffer.split_to(end + 1);
            let Ok(message) = serde_json::from_slice::<Value>(&line[..end]) else { continue };
            let (version, nonce) = (
                message["version"].as_str().unwrap_or_default(),
                message["nonce"].as_str().unwrap_or_default(),
            );
            let ack = json!({"type": "ack", "version": version, "nonce": nonce});
            let _ = lines.send(Bytes::from(format!("{ack}\n"))).await;
            if !counted_ready {
                counted_ready = true;
                ready.fetch_add(1, Ordering::SeqCst);
            }
            let write = *writes.borrow();
            if write > counted_write {
                counted_write = write;
                acked.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    counted_ready
}

/// One HTTP/1.1 request to the REST API.
async fn call(cp: SocketAddr, method: &str, path: &str, body: &Value) -> Value {
    let mut stream = TcpStream::connect(cp).await.unwrap();
    let body = body.to_string();
    let content_type = if method == "PATCH" { "application/merge-patch+json" } else { "application/json" };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {OPERATOR}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (_, body) = response.split_once("\r\n\r\n").unwrap_or_default();
    serde_json::from_str(body).unwrap_or(Value::Null)
}

/// The control plane's process, killed when the benchmark ends (or panics).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kb(child: &KillOnDrop) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.0.id())).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let binary = arg("--control-plane").unwrap_or_else(|| "target/release/control-plane".to_string());
    let sizes: Vec<usize> = arg("--sizes")
        .unwrap_or_else(|| "100,1000,10000".to_string())
        .split(',')
        .map(|s| s.parse().expect("--sizes: numbers"))
        .collect();
    let writes: usize = arg("--writes").and_then(|w| w.parse().ok()).unwrap_or(5);

    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cp: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new(&binary)
        .args([
            "--listen",
            &cp.to_string(),
            "--database",
            &dir.path().join("bench.db").display().to_string(),
            "--log-level",
            "warn",
        ])
        .env("KEEL_CP_OPERATOR_TOKENS", OPERATOR)
        .env("KEEL_CP_PROXY_TOKENS", PROXY)
        .stdout(Stdio::null())
        .spawn()
        .expect("start the control plane");
    let child = KillOnDrop(child);
    for _ in 0..100 {
        if TcpStream::connect(cp).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let base = "/apis/edge.example.com/v1";
    call(cp, "POST", &format!("{base}/clusters"), &json!({"apiVersion": "edge.example.com/v1", "kind": "Cluster", "metadata": {"name": "app"}, "spec": {"endpoints": ["127.0.0.1:8080"], "node_selector": {"fleet": "sim"}}})).await;
    let listener = json!({"apiVersion": "edge.example.com/v1", "kind": "Listener", "metadata": {"name": "app"}, "spec": {"address": "127.0.0.1:15001", "cluster": "app", "idle_timeout": "1s", "node_selector": {"fleet": "sim"}}});
    call(cp, "POST", &format!("{base}/listeners"), &listener).await;

    println!("fleet   RSS before  RSS after   per proxy   write->last ACK (median of {writes}, ms)");
    let mut idle_seconds = 1;
    for &size in &sizes {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let before = rss_kb(&child);
        let (writes_tx, writes_rx) = watch::channel(0u64);
        let acked = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for index in 0..size {
            tasks.push(tokio::spawn(simulated(
                index,
                cp,
                writes_rx.clone(),
                Arc::clone(&acked),
                Arc::clone(&ready),
            )));
            if index % 500 == 499 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while ready.load(Ordering::SeqCst) < size && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = ready.load(Ordering::SeqCst);
        assert_eq!(got, size, "only {got} of {size} simulated proxies got their first snapshot");
        // Let the node records settle (they are flushed every second) before measuring memory.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let after = rss_kb(&child);

        let mut times = Vec::new();
        for _ in 0..writes {
            idle_seconds += 1;
            acked.store(0, Ordering::SeqCst);
            writes_tx.send_modify(|writes| *writes += 1);
            let start = Instant::now();
            let patch = json!({"spec": {"idle_timeout": format!("{idle_seconds}s")}});
            call(cp, "PATCH", &format!("{base}/listeners/app"), &patch).await;
            let deadline = Instant::now() + Duration::from_secs(60);
            while acked.load(Ordering::SeqCst) < size && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let elapsed = start.elapsed().as_secs_f64() * 1000.0;
            assert_eq!(acked.load(Ordering::SeqCst), size, "not every simulated proxy ACKed the write");
            times.push(elapsed);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let per_proxy = (after.saturating_sub(before)) as f64 / size as f64;
        println!(
            "{size:>6}  {:>7.1} MB  {:>7.1} MB  {per_proxy:>6.1} KB   {:.1}",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            median(&mut times)
        );
        for task in tasks {
            task.abort();
        }
    }
    drop(child);
}
