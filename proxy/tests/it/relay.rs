//! The relay as a client sees it: bytes, half-close, large transfers, timeouts and caps.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{TestProxy, Upstream, echo_once, eventually, expect_closed};

fn relay_config(upstream: std::net::SocketAddr, listener_extra: &str) -> String {
    format!(
        r#"
admin: {{address: "127.0.0.1:0"}}
listeners:
  - name: front
    address: 127.0.0.1:0
    cluster: back
{listener_extra}
clusters:
  - name: back
    endpoints: ["{upstream}"]
"#
    )
}

#[tokio::test]
async fn relays_bytes_both_ways_and_counts_them() {
    let upstream = Upstream::echo().await;
    let proxy = TestProxy::start(&relay_config(upstream.addr, "")).await;
    let mut client = TcpStream::connect(proxy.addr("front").await).await.unwrap();
    for round in 0..10 {
        echo_once(&mut client, format!("round {round}").as_bytes()).await.unwrap();
    }
    drop(client);
    let sent = (10 * "round 0".len()) as f64;
    let received = "keel_listener_downstream_received_bytes_total{listener=\"front\"}";
    eventually(Duration::from_secs(2), "byte counters", || async { proxy.metric(received).await == sent })
        .await;
    assert_eq!(proxy.metric("keel_cluster_upstream_received_bytes_total{cluster=\"back\"}").await, sent);
    assert_eq!(proxy.metric("keel_listener_downstream_connections_total{listener=\"front\"}").await, 1.0);
    proxy.stop().await;
}

#[tokio::test]
async fn large_transfer_arrives_intact() {
    let upstream = Upstream::echo().await;
    let proxy = TestProxy::start(&relay_config(upstream.addr, "")).await;
    let client = TcpStream::connect(proxy.addr("front").await).await.unwrap();
    let payload: Vec<u8> =
        (0..32 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let (mut read, mut write) = client.into_split();
    let expected = payload.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&payload).await.unwrap();
        write.shutdown().await.unwrap();
    });
    let mut echoed = Vec::with_capacity(expected.len());
    read.read_to_end(&mut echoed).await.unwrap();
    writer.await.unwrap();
    assert_eq!(echoed.len(), expected.len());
    assert!(echoed == expected, "the echoed bytes differ from the sent bytes");
    proxy.stop().await;
}

#[tokio::test]
async fn half_close_reaches_upstream_and_the_reply_still_comes_back() {
    // The upstream reads until the client's FIN, then answers with the byte count: this only works if
    // the proxy passes the FIN on while keeping the other direction open.
    let upstream = Upstream::serve("127.0.0.1:0".parse().unwrap(), |mut stream| async move {
        let mut received = Vec::new();
        stream.read_to_end(&mut received).await.unwrap();
        stream.write_all(format!("got {}", received.len()).as_bytes()).await.unwrap();
    })
    .await;
    let proxy = TestProxy::start(&relay_config(upstream.addr, "")).await;
    let mut client = TcpStream::connect(proxy.addr("front").await).await.unwrap();
    client.write_all(&[7u8; 100_000]).await.unwrap();
    client.shutdown().await.unwrap();
    let mut reply = String::new();
    client.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, "got 100000");
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_half_close_lets_the_client_keep_sending() {
    // The upstream greets, closes its write side, then counts what the client still sends.
    let (count_tx, mut count_rx) = tokio::sync::mpsc::unbounded_channel();
    let upstream = Upstream::serve("127.0.0.1:0".parse().unwrap(), move |mut stream| {
        let count_tx = count_tx.clone();
        async move {
            stream.write_all(b"hello").await.unwrap();
            stream.shutdown().await.unwrap();
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).await.unwrap();
            count_tx.send(rest.len()).unwrap();
        }
    })
    .await;
    let proxy = TestProxy::start(&relay_config(upstream.addr, "")).await;
    let mut client = TcpStream::connect(proxy.addr("front").await).await.unwrap();
    let mut greeting = String::new();
    client.read_to_string(&mut greeting).await.unwrap();
    assert_eq!(greeting, "hello");
    client.write_all(b"still talking").await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(count_rx.recv().await, Some("still talking".len()));
    proxy.stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let upstream = Upstream::echo().await;
    let proxy = TestProxy::start(&relay_config(upstream.addr, "    idle_timeout: 300ms")).await;
    let mut client = TcpStream::connect(proxy.addr("front").await).await.unwrap();
    echo_once(&mut client, b"ping").await.unwrap();
    let started = tokio::time::Instant::now();
    expect_closed(&mut client, Duration::from_secs(5)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "closed after {waited:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn traffic_keeps_a_connection_past_the_idle_timeout() {
    let upstream = Upstream::echo().await;
    let proxy = TestProxy::start(&relay_config(upstream.addr, "    idle_timeout: 300ms")).await;
    let mut client = TcpStream::connect(proxy.addr("front").await).await.unwrap();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        echo_once(&mut client, b"keepalive").await.unwrap();
    }
    proxy.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    let upstream = Upstream::echo().await;
    let proxy = TestProxy::start(&relay_config(upstream.addr, "    max_connections: 2")).await;
    let addr = proxy.addr("front").await;
    let mut first = TcpStream::connect(addr).await.unwrap();
    let mut second = TcpStream::connect(addr).await.unwrap();
    echo_once(&mut first, b"1").await.unwrap();
    echo_once(&mut second, b"2").await.unwrap();
    let mut third = TcpStream::connect(addr).await.unwrap();
    expect_closed(&mut third, Duration::from_secs(2)).await;
    let rejected =
        "keel_listener_downstream_connections_rejected_total{listener=\"front\",reason=\"max_connections\"}";
    assert_eq!(proxy.metric(rejected).await, 1.0);
    // A slot frees up when a connection ends.
    drop(first);
    eventually(Duration::from_secs(2), "a free slot", || async {
        let mut fourth = TcpStream::connect(addr).await.unwrap();
        echo_once(&mut fourth, b"4").await.is_ok()
    })
    .await;
    drop((second, third));
    proxy.stop().await;
}

#[tokio::test]
async fn clients_outside_allowed_sources_are_refused() {
    let upstream = Upstream::echo().await;
    let proxy = TestProxy::start(&relay_config(upstream.addr, "    allowed_sources: [10.0.0.0/8]")).await;
    let mut client = TcpStream::connect(proxy.addr("front").await).await.unwrap();
    expect_closed(&mut client, Duration::from_secs(2)).await;
    let rejected = "keel_listener_downstream_connections_rejected_total{listener=\"front\",reason=\"source_not_allowed\"}";
    assert_eq!(proxy.metric(rejected).await, 1.0);
    proxy.stop().await;
}
