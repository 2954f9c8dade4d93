//! Slow clients cannot hold the control plane: connections that send nothing, half a request head, or
//! half the HTTP/2 preface are closed after the request-head timeout, while a normal request is answered
//! at once and a proxy's long-lived stream stays up.

use std::time::{Duration, Instant};

use crate::support::*;
use keel_proxy::Shutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEAD_TIMEOUT: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_is_cut_off_and_starves_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(&database(&dir), "127.0.0.1:0".parse().unwrap());
    settings.request_head_timeout = HEAD_TIMEOUT;
    let cp = keel_control_plane::ControlPlane::start(settings).await.unwrap();
    let addr = cp.local_addr;

    // A proxy on its long-lived stream.
    let proxy = start_proxy(dir.path(), "node-a", &[], addr).await;
    eventually("the proxy's stream", || async {
        operator(addr, "GET", "/debug/proxies", None).await.1["proxies"][0]["connected"] == true
    })
    .await;
    let since = operator(addr, "GET", "/debug/proxies", None).await.1["proxies"][0]["connectedSince"].clone();

    // 300 slow connections: silent, half a request head, half the HTTP/2 preface.
    let mut slow = Vec::new();
    for index in 0..300 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        match index % 3 {
            0 => {}
            1 => stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: cp\r\n").await.unwrap(),
            _ => stream.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap(),
        }
        slow.push(stream);
    }

    // Everyone else is served at once meanwhile.
    let started = Instant::now();
    let (status, _) = call(addr, "GET", "/healthz", None, None).await;
    assert_eq!(status, 200);
    let (status, _) = operator(addr, "GET", "/apis/edge.example.com/v1/listeners", None).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_millis(300), "answered after {:?}", started.elapsed());

    // Past the timeout, every slow connection has been closed by the server.
    tokio::time::sleep(HEAD_TIMEOUT * 3).await;
    for (index, stream) in slow.iter_mut().enumerate() {
        let mut buffer = [0u8; 512];
        let closed = match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            // HTTP/1.1 may answer 408 before closing.
            Ok(Ok(read)) => String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 408"),
            Err(_) => false,
        };
        assert!(closed, "slow connection {index} (kind {}) is still open", index % 3);
    }

    // The proxy's stream, whose head was sent at once, is the same stream as before.
    let record = operator(addr, "GET", "/debug/proxies", None).await.1["proxies"][0].clone();
    assert_eq!(record["connected"], true);
    assert_eq!(record["connectedSince"], since, "the stream was not cut");

    proxy.shutdown(Shutdown::Fast);
    proxy.close_all_connections().await;
    cp.stop().await;
}

/// A flood of connections past `max_connections`: each is closed as soon as it is accepted, so the
/// flood holds no more than the limit; once the slow ones are cut off, the server serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_limit_new_connections_are_closed_at_once() {
    const LIMIT: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(&database(&dir), "127.0.0.1:0".parse().unwrap());
    settings.request_head_timeout = HEAD_TIMEOUT;
    settings.max_connections = LIMIT;
    let cp = keel_control_plane::ControlPlane::start(settings).await.unwrap();
    let addr = cp.local_addr;

    let mut held = Vec::new();
    for _ in 0..LIMIT {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    // Give the server the time to accept them all.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for attempt in 0..20 {
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: cp\r\n\r\n").await;
        let mut buffer = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buffer)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "connection {attempt} past the limit was not closed at once: {read:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(300), "closed after {:?}", started.elapsed());
    }

    // The held connections send nothing: cut off after the head timeout, which frees their slots.
    tokio::time::sleep(HEAD_TIMEOUT * 3).await;
    let (status, _) = call(addr, "GET", "/healthz", None, None).await;
    assert_eq!(status, 200);
    drop(held);
    cp.stop().await;
}
