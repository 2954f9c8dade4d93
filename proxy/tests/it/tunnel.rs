//! Tunnels over loopback: a router, publishers and visitors, each a proxy of its own in this process.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use keel_proxy::tunnel::frame::{Frame, Kind, Reason, read_frame, write_frame};
use keel_proxy::tunnel::proof;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{TestProxy, Upstream, echo_once, eventually};

const TOKEN: &str = "router-token";
const SECRET: &str = "mysql-secret";

async fn router() -> (TestProxy, SocketAddr) {
    let config = format!(
        "node: {{id: router-1}}\nadmin: {{address: \"127.0.0.1:0\"}}\ndrain_timeout: 1s\ntunnels:\n  server: {{listen: \"127.0.0.1:0\", token: {TOKEN}, connect_timeout: 2s}}\n"
    );
    let proxy = TestProxy::start(&config).await;
    let addr = proxy.proxy.tunnel_router_addr().await.unwrap();
    (proxy, addr)
}

/// A router started again on the address of one that stopped.
async fn router_on(address: SocketAddr) -> TestProxy {
    let config = format!(
        "node: {{id: router-1}}\nadmin: {{address: \"127.0.0.1:0\"}}\ntunnels:\n  server: {{listen: \"{address}\", token: {TOKEN}}}\n"
    );
    TestProxy::start(&config).await
}

fn routers(addrs: &[SocketAddr]) -> String {
    let mut text = String::from("  routers:\n");
    for (i, addr) in addrs.iter().enumerate() {
        text.push_str(&format!("    - {{name: r{i}, address: \"{addr}\", token: {TOKEN}}}\n"));
    }
    text
}

fn publisher_config(node: &str, routers_at: &[SocketAddr], local: SocketAddr, share: bool) -> String {
    format!(
        "node: {{id: {node}}}\nadmin: {{address: \"127.0.0.1:0\"}}\ntunnels:\n{}  publish:\n    - {{name: mysql, local: \"{local}\", secret: {SECRET}, share: {share}, pool: 2}}\n",
        routers(routers_at)
    )
}

async fn publisher(node: &str, routers_at: &[SocketAddr], local: SocketAddr, share: bool) -> TestProxy {
    TestProxy::start(&publisher_config(node, routers_at, local, share)).await
}

fn visitor_config(routers_at: &[SocketAddr], secret: &str, listen: &str) -> String {
    format!(
        "node: {{id: pod-a}}\nadmin: {{address: \"127.0.0.1:0\"}}\ntunnels:\n{}  visit:\n    - {{name: mysql, secret: {secret}, listen: \"{listen}\", pool: 2}}\n",
        routers(routers_at)
    )
}

async fn visitor(routers_at: &[SocketAddr], secret: &str) -> (TestProxy, SocketAddr) {
    let proxy = TestProxy::start(&visitor_config(routers_at, secret, "127.0.0.1:0")).await;
    let addr = proxy.proxy.tunnel_visitor_addr("mysql").await.unwrap();
    (proxy, addr)
}

/// An echo service published by node-b through one router and visited by pod-a, once the visitor sees
/// the publisher: what most tests here start from.
struct Chain {
    local: Upstream,
    router: TestProxy,
    router_at: SocketAddr,
    publisher: TestProxy,
    visitor: TestProxy,
    visit_at: SocketAddr,
}

async fn chain() -> Chain {
    let local = Upstream::echo().await;
    let (router, router_at) = router().await;
    let publisher = publisher("node-b", &[router_at], local.addr, false).await;
    let (visitor, visit_at) = visitor(&[router_at], SECRET).await;
    publishers_seen(&visitor, 1).await;
    Chain { local, router, router_at, publisher, visitor, visit_at }
}

/// Waits until the visitor's first router reports `publishers` publishers of the service.
async fn publishers_seen(visitor: &TestProxy, publishers: u16) {
    eventually(Duration::from_secs(5), "the visitor to see the publishers", || async {
        let status = visitor.proxy.tunnels_status().await;
        status.visit[0].routers.iter().any(|router| router.publishers == publishers)
    })
    .await;
}

/// Whether a connection to `addr` is closed or reset without any byte, quickly.
async fn refused_fast(addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut buffer = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await.unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "expected no bytes, got {read:?}");
    started.elapsed()
}

#[tokio::test]
async fn a_visitor_reaches_a_published_service_through_a_router() {
    let Chain { local: _local, router, router_at: _, publisher, visitor, visit_at } = chain().await;

    // Bytes both ways, and the first byte quickly.
    let started = Instant::now();
    let mut stream = TcpStream::connect(visit_at).await.unwrap();
    echo_once(&mut stream, b"ping").await.unwrap();
    let first = started.elapsed();
    assert!(first < Duration::from_millis(100), "first round trip took {first:?}");
    drop(stream);

    // A large transfer arrives whole and in order, with half-close passed through.
    let mut stream = TcpStream::connect(visit_at).await.unwrap();
    let payload: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let (mut read, mut write) = stream.split();
    let send = async {
        write.write_all(&payload).await.unwrap();
        write.shutdown().await.unwrap();
    };
    let mut echoed = Vec::new();
    let receive = read.read_to_end(&mut echoed);
    let ((), received) = tokio::join!(send, receive);
    received.unwrap();
    assert!(echoed == payload, "the echoed bytes differ");

    // Many connections at once.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50u32 {
        tasks.spawn(async move {
            let mut stream = TcpStream::connect(visit_at).await.unwrap();
            echo_once(&mut stream, format!("hello {i}").as_bytes()).await.unwrap();
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }

    let status = router.proxy.tunnels_status().await;
    let router_view = serde_json::to_value(status.router.unwrap()).unwrap();
    let clients = &router_view["activeServices"][0]["clients"];
    assert_eq!(router_view["activeServices"][0]["name"], "mysql");
    assert!(
        clients.as_array().unwrap().iter().any(|c| c["type"] == "publisher" && c["id"] == "node-b-mysql")
    );
    assert!(clients.as_array().unwrap().iter().any(|c| c["type"] == "visitor" && c["id"] == "pod-a-mysql"));
    let opened = visitor.metric("keel_tunnel_connections_total{service=\"mysql\",role=\"visitor\"}").await;
    assert_eq!(opened, 52.0);
    let sent = publisher.metric("keel_tunnel_sent_bytes_total{service=\"mysql\",role=\"publisher\"}").await;
    assert!(sent >= payload.len() as f64, "{sent}");
}

#[tokio::test]
async fn every_role_counts_every_byte_including_those_sent_before_the_relay() {
    let Chain { local: _local, router, router_at: _, publisher, visitor, visit_at } = chain().await;
    // The application speaks at once, so its first bytes travel with `Open` and `Connect`, or ahead of
    // the answers: bytes no relay sees.
    for _ in 0..3 {
        let mut stream = TcpStream::connect(visit_at).await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(&back, b"hello");
    }
    for (proxy, role) in [(&visitor, "visitor"), (&router, "router"), (&publisher, "publisher")] {
        for direction in ["sent", "received"] {
            let name = format!("keel_tunnel_{direction}_bytes_total{{service=\"mysql\",role=\"{role}\"}}");
            eventually(Duration::from_secs(5), &format!("{role} to count 15 bytes {direction}"), || async {
                proxy.metric(&name).await == 15.0
            })
            .await;
        }
    }
}

#[tokio::test]
async fn a_wrong_secret_is_rejected_by_the_publisher() {
    let local = Upstream::echo().await;
    let (_router, router_at) = router().await;
    let publisher = publisher("node-b", &[router_at], local.addr, false).await;
    let (visitor, visit_at) = visitor(&[router_at], "not-the-secret").await;
    publishers_seen(&visitor, 1).await;
    refused_fast(visit_at).await;
    let rejected = publisher
        .metric("keel_tunnel_handshake_failures_total{service=\"mysql\",role=\"publisher\",reason=\"bad_secret\"}")
        .await;
    assert_eq!(rejected, 1.0);
}

#[tokio::test]
async fn a_replayed_or_forged_handshake_is_refused() {
    let local = Upstream::echo().await;
    let (_router, router_at) = router().await;
    let _publisher = publisher("node-b", &[router_at], local.addr, false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    async fn pooled(router_at: SocketAddr) -> TcpStream {
        let mut stream = TcpStream::connect(router_at).await.unwrap();
        let hello = proof::hello(TOKEN, Kind::VisitorPool, "attacker", "", 0);
        write_frame(&mut stream, &Frame::Hello(hello)).await.unwrap();
        stream
    }
    // A genuine Open goes through once.
    let open = proof::open(SECRET, "mysql", "pod-a");
    let mut first = pooled(router_at).await;
    write_frame(&mut first, &Frame::Open(open.clone())).await.unwrap();
    assert_eq!(read_frame(&mut first).await.unwrap(), Frame::Opened);
    echo_once(&mut first, b"genuine").await.unwrap();
    // The same bytes again, as a captured handshake would be: refused.
    let mut replay = pooled(router_at).await;
    write_frame(&mut replay, &Frame::Open(open)).await.unwrap();
    assert!(matches!(
        read_frame(&mut replay).await.unwrap(),
        Frame::Refused { reason: Reason::Replayed, .. }
    ));
    // A replayed Hello is refused too, before anything else.
    let hello = proof::hello(TOKEN, Kind::VisitorPool, "attacker", "", 0);
    for expected in [None, Some(Reason::Replayed)] {
        let mut stream = TcpStream::connect(router_at).await.unwrap();
        write_frame(&mut stream, &Frame::Hello(hello.clone())).await.unwrap();
        if let Some(reason) = expected {
            assert!(
                matches!(read_frame(&mut stream).await.unwrap(), Frame::Refused { reason: r, .. } if r == reason)
            );
        }
    }
    // A wrong router token, and a stale clock.
    let mut stream = TcpStream::connect(router_at).await.unwrap();
    let forged = proof::hello("guess", Kind::VisitorPool, "attacker", "", 0);
    write_frame(&mut stream, &Frame::Hello(forged)).await.unwrap();
    assert!(matches!(
        read_frame(&mut stream).await.unwrap(),
        Frame::Refused { reason: Reason::BadToken, .. }
    ));
    let mut stale = proof::open(SECRET, "mysql", "pod-a");
    stale.time -= 3600;
    let mut stream = pooled(router_at).await;
    write_frame(&mut stream, &Frame::Open(stale)).await.unwrap();
    assert!(matches!(
        read_frame(&mut stream).await.unwrap(),
        Frame::Refused { reason: Reason::ClockSkew, .. }
    ));
    // Something that is not Keel at all.
    let mut stream = TcpStream::connect(router_at).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(matches!(
        read_frame(&mut stream).await.unwrap(),
        Frame::Refused { reason: Reason::Malformed, .. }
    ));
}

#[tokio::test]
async fn without_a_live_publisher_the_visitor_refuses_at_once() {
    let (_router, router_at) = router().await;
    let (visitor, visit_at) = visitor(&[router_at], SECRET).await;
    eventually(Duration::from_secs(5), "the visitor to connect", || async {
        visitor.proxy.tunnels_status().await.visit[0].routers[0].connected
    })
    .await;
    let took = refused_fast(visit_at).await;
    assert!(took < Duration::from_millis(200), "refusing took {took:?}");
}

#[tokio::test]
async fn a_router_restart_keeps_the_visitor_listening_and_service_returns_quickly() {
    let Chain { local: _local, router, router_at, publisher, visitor, visit_at } = chain().await;
    let mut held = TcpStream::connect(visit_at).await.unwrap();
    echo_once(&mut held, b"before").await.unwrap();
    // What the tunnel-down alerts read: sessions up, and the publishers each router has.
    let publisher_up = "keel_tunnel_router_up{service=\"mysql\",role=\"publisher\",router=";
    let visitor_up = "keel_tunnel_router_up{service=\"mysql\",role=\"visitor\",router=";
    let publishers = "keel_tunnel_publishers{service=\"mysql\",role=\"visitor\",router=";
    assert_eq!(publisher.metric(publisher_up).await, 1.0);
    assert_eq!(visitor.metric(visitor_up).await, 1.0);
    assert_eq!(visitor.metric(publishers).await, 1.0);

    router.stop().await;
    // The listener stays up: connections are accepted and refused at once, not left hanging.
    eventually(Duration::from_secs(5), "the visitor to see the router gone", || async {
        !visitor.proxy.tunnels_status().await.visit[0].routers[0].connected
    })
    .await;
    assert_eq!(visitor.metric(visitor_up).await, 0.0);
    assert_eq!(visitor.metric(publishers).await, 0.0);
    eventually(Duration::from_secs(5), "the publisher's session metric down", || async {
        publisher.metric(publisher_up).await == 0.0
    })
    .await;
    refused_fast(visit_at).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The router comes back on the same address.
    let _router = router_on(router_at).await;
    let returned = Instant::now();
    eventually(Duration::from_secs(5), "a connection through the returned router", || async {
        match TcpStream::connect(visit_at).await {
            Ok(mut stream) => echo_once(&mut stream, b"after").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    let took = returned.elapsed();
    assert!(took < Duration::from_millis(1500), "service returned after {took:?}");
}

/// A flood of connections that never finish their handshake: past `MAX_HANDSHAKING` the router closes
/// new ones at once instead of holding a descriptor for each, and connections already through the
/// tunnel carry on; when the flood goes, new connections get through again.
#[tokio::test]
async fn a_flood_of_unfinished_handshakes_is_capped_and_established_tunnels_carry_on() {
    let Chain {
        local: _local,
        router: _router,
        router_at,
        publisher: _publisher,
        visitor: _visitor,
        visit_at,
    } = chain().await;
    let mut held = TcpStream::connect(visit_at).await.unwrap();
    echo_once(&mut held, b"before").await.unwrap();

    let mut flood = Vec::new();
    for _ in 0..keel_proxy::tunnel::router::MAX_HANDSHAKING {
        flood.push(TcpStream::connect(router_at).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..5 {
        let took = refused_fast(router_at).await;
        assert!(took < Duration::from_millis(300), "a connection past the cap was held {took:?}");
    }
    echo_once(&mut held, b"during").await.unwrap();

    drop(flood);
    eventually(Duration::from_secs(5), "a new connection through the tunnel after the flood", || async {
        match TcpStream::connect(visit_at).await {
            Ok(mut stream) => echo_once(&mut stream, b"after").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    echo_once(&mut held, b"still").await.unwrap();
}

/// Fault: the router killed under load (four clients opening connections through the tunnel without a
/// pause) and started again on the same address. While it is gone every attempt is refused at once (none
/// hangs), and within 1.5 s of its return connections go through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_killed_under_load_refuses_fast_and_service_returns_quickly() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let local = Upstream::echo().await;
    let (router, router_at) = router().await;
    let _publisher = publisher("node-b", &[router_at], local.addr, false).await;
    let (visitor, visit_at) = visitor(&[router_at], SECRET).await;
    publishers_seen(&visitor, 1).await;

    let running = Arc::new(AtomicBool::new(true));
    let (served, refused, slowest_ms) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let last_success = Arc::new(tokio::sync::Mutex::new(Instant::now()));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (running, served, refused, slowest_ms, last_success) = (
                Arc::clone(&running),
                Arc::clone(&served),
                Arc::clone(&refused),
                Arc::clone(&slowest_ms),
                Arc::clone(&last_success),
            );
            tokio::spawn(async move {
                while running.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let attempt = async {
                        let mut stream = TcpStream::connect(visit_at).await?;
                        echo_once(&mut stream, b"load").await
                    };
                    let outcome = tokio::time::timeout(Duration::from_secs(3), attempt).await;
                    slowest_ms.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                    match outcome {
                        Ok(Ok(())) => {
                            served.fetch_add(1, Ordering::Relaxed);
                            *last_success.lock().await = Instant::now();
                        }
                        Ok(Err(_)) => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err(_) => panic!("a connection through the tunnel hung for 3 s"),
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = served.load(Ordering::Relaxed);
    assert!(before > 0, "nothing went through before the kill");

    router.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = served.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(served.load(Ordering::Relaxed), during, "served while the router was gone");

    let _router = router_on(router_at).await;
    let returned = Instant::now();
    let deadline = returned + Duration::from_secs(5);
    while *last_success.lock().await < returned {
        assert!(Instant::now() < deadline, "no connection through the returned router");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recovery = last_success.lock().await.duration_since(returned);
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.store(false, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    eprintln!(
        "router killed under load: {} connections served, {} refused while it was gone (slowest attempt {} ms); service back {recovery:?} after the restart",
        served.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        slowest_ms.load(Ordering::Relaxed)
    );
    assert!(recovery < Duration::from_millis(1500), "service returned after {recovery:?}");
    assert!(refused.load(Ordering::Relaxed) > 0);
}

#[tokio::test]
async fn two_sharing_publishers_split_the_load_and_one_leaving_moves_it() {
    let a = Upstream::tagged("A").await;
    let b = Upstream::tagged("B").await;
    let (_router, router_at) = router().await;
    let publisher_a = publisher("node-a", &[router_at], a.addr, true).await;
    let _publisher_b = publisher("node-b", &[router_at], b.addr, true).await;
    let (visitor, visit_at) = visitor(&[router_at], SECRET).await;
    publishers_seen(&visitor, 2).await;
    let mut tags = String::new();
    for _ in 0..10 {
        tags.push_str(&crate::support::read_all(visit_at).await);
    }
    assert!(tags.contains('A') && tags.contains('B'), "{tags}");

    publisher_a.stop().await;
    publishers_seen(&visitor, 1).await;
    for _ in 0..5 {
        assert_eq!(crate::support::read_all(visit_at).await, "B");
    }
}

#[tokio::test]
async fn a_second_publisher_of_an_unshared_name_is_refused() {
    let local = Upstream::echo().await;
    let (router, router_at) = router().await;
    let _first = publisher("node-a", &[router_at], local.addr, false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = publisher("node-b", &[router_at], local.addr, false).await;
    eventually(Duration::from_secs(5), "the second publisher to be refused", || async {
        second
            .metric("keel_tunnel_handshake_failures_total{service=\"mysql\",role=\"publisher\",reason=\"name_taken\"}")
            .await
            >= 1.0
    })
    .await;
    let status = serde_json::to_value(router.proxy.tunnels_status().await.router.unwrap()).unwrap();
    let publishers: Vec<_> = status["activeServices"][0]["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|client| client["type"] == "publisher")
        .map(|client| client["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(publishers, ["node-a-mysql"]);
}

#[tokio::test]
async fn an_application_resolves_the_service_name_and_reaches_it_through_the_tunnel() {
    let local = Upstream::echo().await;
    let (_router, router_at) = router().await;
    let _publisher = publisher("node-b", &[router_at], local.addr, false).await;
    // The visited service listens on its VIP at this port (a free one, as tests never use fixed ports).
    let port = crate::support::closed_port().await.port();
    let config = format!(
        "node: {{id: pod-a}}\nadmin: {{address: \"127.0.0.1:0\"}}\ndns:\n  listen: [\"127.0.0.1:0\"]\ntunnels:\n{}  visit:\n    - {{name: mysql, secret: {SECRET}, port: {port}}}\n",
        routers(&[router_at])
    );
    let visitor = TestProxy::start(&config).await;
    publishers_seen(&visitor, 1).await;

    let dns = visitor.proxy.dns_status().await.unwrap();
    let answer = crate::dns::ask_udp(
        dns.listening[0],
        &crate::dns::query("mysql.default.svc.", hickory_proto::rr::RecordType::A, false),
    )
    .await;
    let vips = crate::dns::addresses(&answer);
    assert_eq!(vips.len(), 1, "{answer:?}");
    let vip: std::net::IpAddr = vips[0].parse().unwrap();
    assert!(vip.to_string().starts_with("127.0.66."), "{vip}");
    assert_eq!(visitor.proxy.tunnel_visitor_addr("mysql").await, Some(SocketAddr::new(vip, port)));

    let mut stream = TcpStream::connect((vip, port)).await.unwrap();
    echo_once(&mut stream, b"SELECT 1").await.unwrap();

    // /tunnels on the admin API shows the visit, its VIP listener and its router.
    let (status, body) = visitor.get("/tunnels").await;
    assert_eq!(status, 200);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["visit"][0]["service"], "mysql");
    assert_eq!(body["visit"][0]["listen"], format!("{vip}:{port}"));
    assert_eq!(body["visit"][0]["routers"][0]["publishers"], 1);
}

#[tokio::test]
async fn a_refusing_router_passes_the_connection_and_its_early_bytes_to_the_next() {
    let local = Upstream::echo().await;
    let (_first, first_at) = router().await;
    let (_second, second_at) = router().await;
    // The first router's publisher has another secret, so it rejects the visitor's proof.
    let wrong = publisher_config("node-a", &[first_at], local.addr, false).replace(SECRET, "other-secret");
    let _wrong = TestProxy::start(&wrong).await;
    let _right = publisher("node-b", &[second_at], local.addr, false).await;
    let (visitor, visit_at) = visitor(&[first_at, second_at], SECRET).await;
    eventually(Duration::from_secs(5), "both routers to have a publisher", || async {
        visitor.proxy.tunnels_status().await.visit[0].routers.iter().all(|router| router.publishers == 1)
    })
    .await;
    // The application speaks first: its bytes travel ahead of the answers, through the refusal, and
    // arrive once, in order, through the second router.
    let mut stream = TcpStream::connect(visit_at).await.unwrap();
    stream.write_all(b"first words").await.unwrap();
    let mut back = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(&back, b"first words");
    echo_once(&mut stream, b" and more").await.unwrap();
    let refused = visitor
        .metric(
            "keel_tunnel_handshake_failures_total{service=\"mysql\",role=\"visitor\",reason=\"bad_secret\"}",
        )
        .await;
    assert_eq!(refused, 1.0);
}

/// A test CA, with a certificate for the router (`router.test`) and one for its clients, as PEM files.
struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    fn new() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        for (name, san) in [("router", "router.test"), ("client", "pod-a.test")] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![san.to_string()]).unwrap().signed_by(&key, &ca).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
        }
        TestPki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

#[tokio::test]
async fn tunnels_run_over_tls_with_client_certificates() {
    let pki = TestPki::new();
    let local = Upstream::echo().await;
    let router_config = format!(
        "node: {{id: router-1}}\nadmin: {{address: \"127.0.0.1:0\"}}\ntunnels:\n  server:\n    listen: \"127.0.0.1:0\"\n    token: {TOKEN}\n    tls: {{cert_file: {}, key_file: {}, client_ca_file: {}}}\n",
        pki.path("router.pem"),
        pki.path("router-key.pem"),
        pki.path("ca.pem")
    );
    let router = TestProxy::start(&router_config).await;
    let router_at = router.proxy.tunnel_router_addr().await.unwrap();
    let client_tls = format!(
        "tls: {{ca_file: {}, server_name: router.test, cert_file: {}, key_file: {}}}",
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client-key.pem")
    );
    let with_tls = |config: String| {
        config.replace(&format!("token: {TOKEN}}}"), &format!("token: {TOKEN}, {client_tls}}}"))
    };
    let _publisher =
        TestProxy::start(&with_tls(publisher_config("node-b", &[router_at], local.addr, false))).await;
    let visitor = TestProxy::start(&with_tls(visitor_config(&[router_at], SECRET, "127.0.0.1:0"))).await;
    let visit_at = visitor.proxy.tunnel_visitor_addr("mysql").await.unwrap();
    publishers_seen(&visitor, 1).await;
    let mut stream = TcpStream::connect(visit_at).await.unwrap();
    echo_once(&mut stream, b"over TLS").await.unwrap();
    let payload = vec![7u8; 1024 * 1024];
    stream.write_all(&payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert!(back == payload);

    // A visitor that does not present a client certificate never gets in.
    let no_cert = visitor_config(&[router_at], SECRET, "127.0.0.1:0").replace(
        &format!("token: {TOKEN}}}"),
        &format!("token: {TOKEN}, tls: {{ca_file: {}, server_name: router.test}}}}", pki.path("ca.pem")),
    );
    let stranger = TestProxy::start(&no_cert).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!stranger.proxy.tunnels_status().await.visit[0].routers[0].connected);
    let stranger_at = stranger.proxy.tunnel_visitor_addr("mysql").await.unwrap();
    refused_fast(stranger_at).await;

    // A CA file that is not PEM rejects the config, located at the router's tls.
    let bad = std::env::temp_dir().join(format!("keel-bad-ca-{}.pem", std::process::id()));
    std::fs::write(&bad, "not a certificate").unwrap();
    let rejected = with_tls(visitor_config(&[router_at], SECRET, "127.0.0.1:0"))
        .replace(&pki.path("ca.pem"), &bad.display().to_string());
    visitor.replace_config(&rejected);
    let (_, body) = visitor.post("/reload").await;
    assert!(body.contains("tunnels.routers[0].tls"), "{body}");
    std::fs::remove_file(bad).unwrap();
}

#[tokio::test]
async fn a_reload_leaves_untouched_tunnels_and_their_connections_alone() {
    let Chain { local: _local, router: _router, router_at, publisher: _publisher, visitor, visit_at } =
        chain().await;
    let mut held = TcpStream::connect(visit_at).await.unwrap();
    echo_once(&mut held, b"before").await.unwrap();

    // Another visit is added; the first entry is unchanged, so it keeps its listener (port 0 is not
    // bound again: the address stays the one it got) and its sessions and connections.
    let config = visitor_config(&[router_at], SECRET, "127.0.0.1:0")
        + &format!("    - {{name: redis, secret: {SECRET}, listen: \"127.0.0.1:0\"}}\n");
    visitor.replace_config(&config);
    let (status, body) = visitor.post("/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(visitor.proxy.tunnel_visitor_addr("redis").await.is_some());
    assert_eq!(visitor.proxy.tunnel_visitor_addr("mysql").await, Some(visit_at), "mysql was restarted");
    echo_once(&mut held, b"after the reload").await.unwrap();
    let mut fresh = TcpStream::connect(visit_at).await.unwrap();
    echo_once(&mut fresh, b"new connection").await.unwrap();

    // Removing the second visit closes its listener; the first is still served.
    let redis_at = visitor.proxy.tunnel_visitor_addr("redis").await.unwrap();
    visitor.replace_config(&visitor_config(&[router_at], SECRET, "127.0.0.1:0"));
    let (status, _) = visitor.post("/reload").await;
    assert_eq!(status, 200);
    assert!(visitor.proxy.tunnel_visitor_addr("redis").await.is_none());
    eventually(Duration::from_secs(2), "the removed visitor's listener to close", || async {
        TcpStream::connect(redis_at).await.is_err()
    })
    .await;
    assert_eq!(visitor.proxy.tunnel_visitor_addr("mysql").await, Some(visit_at));
    echo_once(&mut held, b"still here").await.unwrap();
}

#[tokio::test]
async fn a_publisher_registers_with_every_router_and_a_visitor_fails_over_when_one_dies() {
    let local = Upstream::echo().await;
    let (first, first_at) = router().await;
    let (_second, second_at) = router().await;
    let publisher = publisher("node-b", &[first_at, second_at], local.addr, false).await;
    let (visitor, visit_at) = visitor(&[first_at, second_at], SECRET).await;
    eventually(Duration::from_secs(5), "the publisher on both routers", || async {
        visitor.proxy.tunnels_status().await.visit[0].routers.iter().all(|router| router.publishers == 1)
    })
    .await;
    let registered =
        publisher.proxy.tunnels_status().await.publish[0].routers.iter().filter(|r| r.registered).count();
    assert_eq!(registered, 2);
    let mut stream = TcpStream::connect(visit_at).await.unwrap();
    echo_once(&mut stream, b"through the first").await.unwrap();

    first.stop().await;
    eventually(Duration::from_secs(5), "the visitor to see the first router gone", || async {
        !visitor.proxy.tunnels_status().await.visit[0].routers[0].connected
    })
    .await;
    for _ in 0..5 {
        let mut stream = TcpStream::connect(visit_at).await.unwrap();
        echo_once(&mut stream, b"through the second").await.unwrap();
    }
}
