//! Load balancing, failover, active health checks and outlier ejection, through real connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::support::{TestProxy, Upstream, closed_port, eventually, read_all};

fn cluster_config(endpoints: &[SocketAddr], cluster_extra: &str) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        r#"
admin: {{address: "127.0.0.1:0"}}
listeners:
  - {{name: front, address: "127.0.0.1:0", cluster: back}}
clusters:
  - name: back
    endpoints: [{}]
{cluster_extra}
"#,
        endpoints.join(", ")
    )
}

async fn tally(addr: SocketAddr, connections: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..connections {
        *seen.entry(read_all(addr).await).or_insert(0) += 1;
    }
    seen
}

#[tokio::test]
async fn round_robin_takes_each_endpoint_in_turn() {
    let (a, b, c) = (Upstream::tagged("a").await, Upstream::tagged("b").await, Upstream::tagged("c").await);
    let proxy = TestProxy::start(&cluster_config(&[a.addr, b.addr, c.addr], "")).await;
    let seen = tally(proxy.addr("front").await, 9).await;
    assert_eq!(seen, HashMap::from([("a".into(), 3), ("b".into(), 3), ("c".into(), 3)]));
    proxy.stop().await;
}

#[tokio::test]
async fn random_reaches_every_endpoint() {
    let (a, b) = (Upstream::tagged("a").await, Upstream::tagged("b").await);
    let proxy = TestProxy::start(&cluster_config(&[a.addr, b.addr], "    load_balancing: random")).await;
    let seen = tally(proxy.addr("front").await, 60).await;
    // Both with probability 1 - 2^-59.
    assert_eq!(seen.len(), 2, "{seen:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn least_connections_prefers_the_least_busy_endpoint() {
    let (a, b, c) = (
        Upstream::tagged_holding("a").await,
        Upstream::tagged_holding("b").await,
        Upstream::tagged_holding("c").await,
    );
    let config = cluster_config(&[a.addr, b.addr, c.addr], "    load_balancing: least_connections");
    let proxy = TestProxy::start(&config).await;
    let addr = proxy.addr("front").await;
    let mut held = HashMap::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut tag = [0u8; 1];
        stream.read_exact(&mut tag).await.unwrap();
        held.insert(tag[0], stream);
    }
    assert_eq!(held.len(), 3, "three open connections should land on three endpoints");
    // Free b: the next connection must go there, while a and c each still hold one.
    drop(held.remove(&b'b'));
    eventually(Duration::from_secs(2), "b's connection to close", || async {
        let (_, clusters) = proxy.get("/clusters").await;
        clusters.contains(&format!("back::{}::cx_active::0", b.addr))
    })
    .await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut tag = [0u8; 1];
    stream.read_exact(&mut tag).await.unwrap();
    assert_eq!(tag[0], b'b');
    drop((held, stream));
    proxy.stop().await;
}

#[tokio::test]
async fn a_dead_endpoint_fails_over_to_the_next() {
    let dead = closed_port().await;
    let alive = Upstream::tagged("alive").await;
    let proxy = TestProxy::start(&cluster_config(&[dead, alive.addr], "")).await;
    let seen = tally(proxy.addr("front").await, 10).await;
    assert_eq!(seen, HashMap::from([("alive".into(), 10)]));
    assert!(proxy.metric("keel_cluster_upstream_connect_failures_total{cluster=\"back\"}").await >= 5.0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_connect_that_hangs_times_out_and_moves_on() {
    // A listener with a full accept queue drops SYNs, so connects to it hang until they time out.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    socket.listen(0).unwrap();
    let black_hole = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let filler = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        filler.set_nonblocking(true).unwrap();
        let _ = filler.connect(&black_hole.into());
        fillers.push(filler);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let alive = Upstream::tagged("alive").await;
    let config = cluster_config(&[black_hole, alive.addr], "    connect_timeout: 200ms");
    let proxy = TestProxy::start(&config).await;
    let started = tokio::time::Instant::now();
    // Round robin starts at the black hole.
    assert_eq!(read_all(proxy.addr("front").await).await, "alive");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(190),
        "the first attempt should have waited for its timeout: {waited:?}"
    );
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn health_checks_eject_a_dead_endpoint_and_bring_it_back() {
    let a = Upstream::tagged("a").await;
    let b = Upstream::tagged("b").await;
    let a_addr = a.addr;
    let health =
        "    health_check: {interval: 100ms, timeout: 100ms, healthy_threshold: 2, unhealthy_threshold: 2}";
    let proxy = TestProxy::start(&cluster_config(&[a.addr, b.addr], health)).await;
    let front = proxy.addr("front").await;
    let healthy = |addr: SocketAddr, state: &'static str| {
        let proxy = &proxy;
        async move {
            let (_, body) = proxy.get("/clusters").await;
            body.contains(&format!("back::{addr}::health_flags::{state}"))
        }
    };
    eventually(Duration::from_secs(3), "a healthy", || healthy(a_addr, "healthy")).await;

    drop(a);
    eventually(Duration::from_secs(3), "a unhealthy", || healthy(a_addr, "unhealthy")).await;
    let gauge = format!("keel_cluster_endpoint_healthy{{cluster=\"back\",endpoint=\"{a_addr}\"}}");
    assert_eq!(proxy.metric(&gauge).await, 0.0);
    let failures_before =
        proxy.metric("keel_cluster_upstream_connect_failures_total{cluster=\"back\"}").await;
    let seen = tally(front, 6).await;
    assert_eq!(seen, HashMap::from([("b".into(), 6)]));
    let failures_after = proxy.metric("keel_cluster_upstream_connect_failures_total{cluster=\"back\"}").await;
    assert_eq!(failures_before, failures_after, "an unhealthy endpoint must not even be tried");

    let _a_again = Upstream::tagged_at(a_addr, "a").await;
    eventually(Duration::from_secs(3), "a healthy again", || healthy(a_addr, "healthy")).await;
    let seen = tally(front, 6).await;
    assert_eq!(seen, HashMap::from([("a".into(), 3), ("b".into(), 3)]));
    proxy.stop().await;
}

#[tokio::test]
async fn consecutive_connect_failures_eject_an_endpoint() {
    let dead = closed_port().await;
    let alive = Upstream::tagged("alive").await;
    let outlier = "    outlier_detection: {consecutive_failures: 2, base_ejection_time: 30s}";
    let proxy = TestProxy::start(&cluster_config(&[dead, alive.addr], outlier)).await;
    let front = proxy.addr("front").await;
    let failures = "keel_cluster_upstream_connect_failures_total{cluster=\"back\"}";
    let ejections = format!("keel_cluster_endpoint_ejections_total{{cluster=\"back\",endpoint=\"{dead}\"}}");
    for _ in 0..4 {
        assert_eq!(read_all(front).await, "alive");
    }
    assert_eq!(proxy.metric(&ejections).await, 1.0);
    let failed = proxy.metric(failures).await;
    assert_eq!(failed, 2.0);
    for _ in 0..10 {
        assert_eq!(read_all(front).await, "alive");
    }
    assert_eq!(proxy.metric(failures).await, failed, "an ejected endpoint must not be tried");
    let (_, clusters) = proxy.get("/clusters").await;
    assert!(clusters.contains(&format!("back::{dead}::ejected::true")), "{clusters}");
    proxy.stop().await;
}

#[tokio::test]
async fn every_endpoint_down_refuses_the_connection() {
    let (dead_a, dead_b) = (closed_port().await, closed_port().await);
    let proxy = TestProxy::start(&cluster_config(&[dead_a, dead_b], "")).await;
    assert_eq!(read_all(proxy.addr("front").await).await, "");
    assert_eq!(proxy.metric("keel_cluster_upstream_no_endpoint_total{cluster=\"back\"}").await, 1.0);
    proxy.stop().await;
}

/// Fault: an endpoint flapping (its listener up 100 ms, down 100 ms) beside a steady one, under a
/// stream of connections: a connect refused by the flapping one fails over to the steady one, so every
/// connection is served by one or the other.
#[tokio::test]
async fn a_flapping_endpoint_costs_no_connection() {
    let steady = Upstream::tagged("steady").await;
    let flapping_at = closed_port().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let flaps = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut flaps = 0u32;
            while !stop.is_cancelled() {
                let up = loop {
                    match tokio::net::TcpListener::bind(flapping_at).await {
                        Ok(listener) => break listener,
                        Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                };
                let serving = tokio::spawn(async move {
                    while let Ok((mut stream, _)) = up.accept().await {
                        tokio::spawn(async move {
                            let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, b"flapping").await;
                        });
                    }
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
                serving.abort();
                let _ = serving.await;
                flaps += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            flaps
        })
    };
    let proxy = TestProxy::start(&cluster_config(&[flapping_at, steady.addr], "")).await;
    let front = proxy.addr("front").await;
    let started = std::time::Instant::now();
    let mut served = HashMap::new();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(3) {
        let began = std::time::Instant::now();
        *served.entry(read_all(front).await).or_insert(0u32) += 1;
        slowest = slowest.max(began.elapsed());
    }
    stop.cancel();
    let flaps = flaps.await.unwrap();
    let total: u32 = served.values().sum();
    let failovers = proxy.metric("keel_cluster_upstream_connect_failures_total{cluster=\"back\"}").await;
    eprintln!(
        "flapping endpoint ({flaps} flaps): {total} connections, served {served:?}, {failovers} connects refused and failed over, slowest {slowest:?}"
    );
    assert_eq!(
        served.keys().filter(|tag| !matches!(tag.as_str(), "steady" | "flapping")).count(),
        0,
        "{served:?}"
    );
    assert!(served.get("flapping").copied().unwrap_or(0) > 0 && served["steady"] > 0, "{served:?}");
    assert!(failovers >= 1.0, "the flapping endpoint was never found down");
    assert!(slowest < Duration::from_millis(500), "slowest connection {slowest:?}");
    proxy.stop().await;
}
