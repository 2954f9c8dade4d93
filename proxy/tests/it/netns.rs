//! Tunnels across hosts: three network namespaces (router, the publisher's node, the visitor's node)
//! joined by veth pairs, with the proxy binary running in each. The publisher's and the visitor's nodes
//! have no route to each other: everything goes through the router.
//!
//! Needs root and iproute2 (`.ci/install-test-deps` installs it; CI runs as root). Elsewhere the test
//! says why it did not run, unless `CI` is set, where not running is a failure.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Network namespaces and the processes in them, removed when dropped.
struct Lab {
    /// This lab's part of every name: the process and the lab's number in it (tests run in parallel).
    tag: String,
    names: Vec<String>,
    children: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {}", args.join(" "));
}

impl Lab {
    /// Namespaces `r` (router), `p` (publisher) and `v` (visitor); p–r on 10.77.1.0/24, v–r on
    /// 10.77.2.0/24, the router .1 on both.
    fn new() -> Lab {
        static LABS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let number = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{}x{number}", std::process::id());
        let name = |role: &str| format!("keel-{role}-{tag}");
        let mut lab = Lab { tag: tag.clone(), names: Vec::new(), children: Vec::new() };
        for role in ["r", "p", "v"] {
            ip(&["netns", "add", &name(role)]);
            lab.names.push(name(role));
            ip(&["-n", &name(role), "link", "set", "lo", "up"]);
        }
        for (side, subnet) in [("p", 1), ("v", 2)] {
            let (outer, inner) = (format!("kr{side}{tag}"), format!("k{side}r{tag}"));
            let (outer, inner) = (&outer[..outer.len().min(15)], &inner[..inner.len().min(15)]);
            ip(&[
                "link",
                "add",
                outer,
                "netns",
                &name("r"),
                "type",
                "veth",
                "peer",
                "name",
                inner,
                "netns",
                &name(side),
            ]);
            ip(&["-n", &name("r"), "addr", "add", &format!("10.77.{subnet}.1/24"), "dev", outer]);
            ip(&["-n", &name("r"), "link", "set", outer, "up"]);
            ip(&["-n", &name(side), "addr", "add", &format!("10.77.{subnet}.2/24"), "dev", inner]);
            ip(&["-n", &name(side), "link", "set", inner, "up"]);
        }
        lab
    }

    fn ns(&self, role: &str) -> String {
        format!("keel-{role}-{}", self.tag)
    }

    /// The router's end of the veth pair to `side` (`p` or `v`).
    fn router_link(&self, side: &str) -> String {
        let name = format!("kr{side}{}", self.tag);
        name[..name.len().min(15)].to_string()
    }

    /// Runs the proxy with `config` in the namespace of `role`.
    fn proxy(&mut self, role: &str, config: &str, dir: &std::path::Path) {
        let path = dir.join(format!("{role}.yaml"));
        std::fs::write(&path, config).unwrap();
        let log = File::create(dir.join(format!("{role}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(role), env!("CARGO_BIN_EXE_proxy"), "--config"])
            .arg(&path)
            .args(["--log-level", "info"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the proxy");
        self.children.push(child);
    }
}

/// Runs `work` on a thread of its own whose sockets live in network namespace `ns`.
fn in_namespace<F, Fut, T>(ns: &str, work: F) -> std::thread::JoinHandle<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let handle = File::open(format!("/var/run/netns/{ns}")).expect("open the namespace");
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace file this thread holds open; it only changes this thread's
        // network namespace, for the sockets it creates from now on.
        let entered = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(work())
    })
}

fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let has_ip = Command::new("ip").arg("-V").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    if root && has_ip {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI must run the namespace test: needs root and iproute2");
    eprintln!("skipping the namespace test: it needs root and iproute2 (run .ci/install-test-deps as root)");
    false
}

/// The lab with an echo service on the publisher's node, published through the router and visited
/// from the visitor's node on 127.0.0.1:5432 (in its namespace); the service runs for `service_for`.
fn tunnel_lab(dir: &std::path::Path, service_for: Duration) -> Lab {
    let mut lab = Lab::new();
    // The service: an echo server on the publisher's node, on its loopback.
    let (service_tx, service_rx) = std::sync::mpsc::channel::<SocketAddr>();
    let _service = in_namespace(&lab.ns("p"), move || async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        service_tx.send(listener.local_addr().unwrap()).unwrap();
        let deadline = tokio::time::Instant::now() + service_for;
        while let Ok(Ok((mut stream, _))) = tokio::time::timeout_at(deadline, listener.accept()).await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    let service = service_rx.recv_timeout(Duration::from_secs(5)).unwrap();

    let token = "netns-router-token";
    let secret = "netns-secret";
    lab.proxy(
        "r",
        &format!("node: {{id: router}}\nadmin: {{address: \"127.0.0.1:9901\"}}\ntunnels:\n  server: {{listen: \"0.0.0.0:7000\", token: {token}}}\n"),
        dir,
    );
    lab.proxy(
        "p",
        &format!(
            "node: {{id: db-node}}\nadmin: {{address: \"127.0.0.1:9901\"}}\ntunnels:\n  routers: [{{name: r, address: \"10.77.1.1:7000\", token: {token}}}]\n  publish:\n    - {{name: db, local: \"{service}\", secret: {secret}}}\n"
        ),
        dir,
    );
    lab.proxy(
        "v",
        &format!(
            "node: {{id: app-node}}\nadmin: {{address: \"127.0.0.1:9901\"}}\ntunnels:\n  routers: [{{name: r, address: \"10.77.2.1:7000\", token: {token}}}]\n  visit:\n    - {{name: db, secret: {secret}, listen: \"127.0.0.1:5432\"}}\n"
        ),
        dir,
    );

    lab
}

/// Waits (in the visitor's namespace) until a connection to `visit` echoes.
async fn wait_through(visit: SocketAddr, limit: Duration) {
    let started = Instant::now();
    loop {
        if echoes(visit, Duration::from_secs(1)).await {
            return;
        }
        assert!(started.elapsed() < limit, "the tunnel never came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a new connection to `visit` echoes a message within `limit`.
async fn echoes(visit: SocketAddr, limit: Duration) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(visit).await.ok()?;
        stream.write_all(b"ping").await.ok()?;
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).await.ok()?;
        Some(back == *b"ping")
    };
    tokio::time::timeout(limit, attempt).await.ok().flatten().unwrap_or(false)
}

#[test]
fn a_visitor_reaches_a_publisher_on_another_node_through_the_router() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lab = tunnel_lab(dir.path(), Duration::from_secs(60));

    // From the visitor's node: the tunnel works once everyone has registered; then bytes both ways,
    // a large transfer, and many connections at once.
    let client = in_namespace(&lab.ns("v"), || async {
        let visit: SocketAddr = "127.0.0.1:5432".parse().unwrap();
        wait_through(visit, Duration::from_secs(15)).await;
        let mut stream = TcpStream::connect(visit).await.unwrap();
        let payload: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 241) as u8).collect();
        let (mut read, mut write) = stream.split();
        let send = async {
            write.write_all(&payload).await.unwrap();
            write.shutdown().await.unwrap();
        };
        let mut echoed = Vec::new();
        let (_, received) = tokio::join!(send, read.read_to_end(&mut echoed));
        received.unwrap();
        assert!(echoed == payload, "the echoed bytes differ");

        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..20u32 {
            tasks.spawn(async move {
                let mut stream = TcpStream::connect(visit).await.unwrap();
                let message = format!("connection {i}");
                stream.write_all(message.as_bytes()).await.unwrap();
                let mut back = vec![0u8; message.len()];
                stream.read_exact(&mut back).await.unwrap();
                assert_eq!(back, message.as_bytes());
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    });
    let result = client.join();
    if result.is_err() {
        for role in ["r", "p", "v"] {
            let log = std::fs::read_to_string(dir.path().join(format!("{role}.log"))).unwrap_or_default();
            eprintln!("--- {role}.log ---\n{log}");
        }
    }
    result.expect("the client in the visitor's namespace");

    // The publisher's node cannot reach the visitor's: the traffic above went through the router.
    let isolated = Command::new("ip")
        .args(["netns", "exec", &lab.ns("p"), "ip", "route", "get", "10.77.2.2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!isolated.success(), "the publisher's node has a route to the visitor's");
}

/// Fault: the publisher's node cut off (its link to the router loses carrier: packets are dropped, no
/// error comes back) and healed. While it is cut off, a visitor's connection is refused within the
/// router's connect timeout (5 s) instead of hanging; once healed, connections get through again.
#[test]
fn a_partitioned_publisher_is_refused_in_bounded_time_and_returns_when_healed() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lab = tunnel_lab(dir.path(), Duration::from_secs(120));
    let visit: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let router_side = lab.router_link("p");
    let link = |state: &str| ip(&["-n", &lab.ns("r"), "link", "set", &router_side, state]);

    let up =
        in_namespace(&lab.ns("v"), move || async move { wait_through(visit, Duration::from_secs(15)).await });
    up.join().expect("the tunnel came up");

    link("down");
    let cut = Instant::now();
    let during = in_namespace(&lab.ns("v"), move || async move {
        let mut refused = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            assert!(!echoes(visit, Duration::from_secs(15)).await, "a connection got through the partition");
            refused.push(started.elapsed());
        }
        refused
    })
    .join()
    .expect("the client during the partition");
    link("up");
    let healed = Instant::now();
    let back = in_namespace(&lab.ns("v"), move || async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !echoes(visit, Duration::from_secs(2)).await {
            assert!(Instant::now() < deadline, "no connection got through 30 s after the partition healed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .join();
    if back.is_err() {
        for role in ["r", "p", "v"] {
            let log = std::fs::read_to_string(dir.path().join(format!("{role}.log"))).unwrap_or_default();
            eprintln!("--- {role}.log ---\n{log}");
        }
    }
    back.expect("the client after the partition");
    let recovery = healed.elapsed();
    eprintln!(
        "publisher partitioned for {:?}: connections refused after {during:?}; through again {recovery:?} after healing",
        healed - cut
    );
    assert!(during.iter().all(|took| *took < Duration::from_secs(7)), "refused after {during:?}");
    assert!(recovery < Duration::from_secs(15), "through again only after {recovery:?}");
}
