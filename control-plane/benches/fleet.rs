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
//! With `--probe-results K`, every simulated proxy also says where it runs and streams a status with K
//! probe results (of K peers) every 5 s, as a proxy with a mesh probe does; the benchmark then also
//! measures the control plane's CPU while it ingests them, and the time to build the matrix.
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
/// What one simulated proxy reports besides ACKs: `results` probe results of peers among `size`.
#[derive(Clone, Copy)]
struct Probing {
    size: usize,
    results: usize,
}

/// The node IP a simulated proxy says it has.
fn node_ip(index: usize) -> String {
    format!("10.{}.{}.{}", index / 65536 % 256, index / 256 % 256, index % 256)
}

async fn simulated(
    index: usize,
    cp: SocketAddr,
    writes: watch::Receiver<u64>,
    acked: Arc<AtomicUsize>,
    ready: Arc<AtomicUsize>,
    probing: Probing,
) {
    // Like a proxy, retry a stream that failed before its first snapshot.
    for _ in 0..10 {
        if stream(index, cp, writes.clone(), &acked, &ready, probing).await {
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
    probing: Probing,
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
    let hello = json!({"type": "hello", "node": format!("sim-{index}"), "labels": {"fleet": "sim", "group": (index % GROUPS).to_string()}, "software": "bench", "client": {"node_ip": node_ip(index)}});
    let _ = lines.send(Bytes::from(format!("{hello}\n"))).await;
    if probing.results > 0 {
        let status_lines = lines.clone();
        tokio::spawn(async move {
            // Proxies started together still report at their own moments (jittered rounds).
            tokio::time::sleep(Duration::from_millis(fastrand::u64(..5000))).await;
            for round in 0u64.. {
                let probes: Vec<Value> = (1..=probing.results)
                    .map(|step| {
                        json!({"probe": "mesh", "kind": "icmp", "target": node_ip((index + step) % probing.size),
                               "up": true, "latencyMs": 0.2 + (round % 7) as f64 * 0.01, "loss": 0.0,
                               "consecutiveFailures": 0, "checkedAt": "2026-11-22T05:00:00.000Z"})
                    })
                    .collect();
                let status =
                    json!({"type": "status", "status": {"ready": true, "listeners": 1, "probes": probes}});
                if status_lines.send(Bytes::from(format!("{status}\n"))).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
    }
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

/// User plus system CPU time of the process, in seconds.
fn cpu_seconds(child: &KillOnDrop) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.0.id())).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / per_second
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
    let results: usize = arg("--probe-results").and_then(|r| r.parse().ok()).unwrap_or(0);

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
            "--netcheck-report-interval",
            "0s",
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
                Probing { size, results },
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
        let ingest = if results > 0 {
            // Every proxy has reported at least once (the first report comes within 5 s).
            tokio::time::sleep(Duration::from_secs(6)).await;
            let (cpu_before, at) = (cpu_seconds(&child), Instant::now());
            tokio::time::sleep(Duration::from_secs(20)).await;
            let cpu = (cpu_seconds(&child) - cpu_before) / at.elapsed().as_secs_f64() * 100.0;
            let mut matrix_ms = Vec::new();
            let mut pairs = 0;
            for _ in 0..5 {
                let start = Instant::now();
                let matrix = call(cp, "GET", "/api/v1/matrix", &Value::Null).await;
                matrix_ms.push(start.elapsed().as_secs_f64() * 1000.0);
                pairs = matrix["summary"]["pairs"].as_u64().unwrap_or(0);
            }
            Some((cpu, rss_kb(&child), median(&mut matrix_ms), pairs))
        } else {
            None
        };
        let per_proxy = (after.saturating_sub(before)) as f64 / size as f64;
        println!(
            "{size:>6}  {:>7.1} MB  {:>7.1} MB  {per_proxy:>6.1} KB   {:.1}",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            median(&mut times)
        );
        if let Some((cpu, rss, matrix_ms, pairs)) = ingest {
            println!(
                "        ingesting {results} probe results per proxy every 5 s: CPU {cpu:.1} % of one core, RSS {:.1} MB, GET /api/v1/matrix ({pairs} pairs) {matrix_ms:.1} ms",
                rss as f64 / 1024.0
            );
        }
        for task in tasks {
            task.abort();
        }
    }
    drop(child);
}
