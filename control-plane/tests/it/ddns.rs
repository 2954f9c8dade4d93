//! Address reporters (keel_proxy::reporter) against the control plane's `POST /api/v1/public-ip`:
//! delivery only when confirmed, retries until the sink is back, a pending address survives a restart,
//! no duplicates; and, in a network namespace, the right interface address under each kernel state
//! (tentative, temporary, deprecated), reported within a second of the change.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use keel_control_plane::State;
use keel_proxy::metrics::Metrics;
use keel_schemas::config::Reporter;
use tokio_util::sync::CancellationToken;

/// A reporter as keel.yaml gives it, through the real loader.
fn reporter(source: &str, sink: SocketAddr, state_file: &std::path::Path) -> Reporter {
    let text = format!(
        "reporters:\n  - name: gw\n    source: {source}\n    sink: {{control_plane: {{url: \"http://{sink}\", token: {PROXY}}}}}\n    interval: 60s\n    debounce: 100ms\n    state_file: {}\n",
        state_file.display()
    );
    let config = keel_schemas::load(&text, "test.yaml", &keel_schemas::MapEnvironment::default()).unwrap();
    config.reporters[0].clone()
}

fn start_reporter(reporter: Reporter) -> CancellationToken {
    let stop = CancellationToken::new();
    tokio::spawn(keel_proxy::reporter::run(reporter, "gw-1".into(), Arc::new(Metrics::new()), stop.clone()));
    stop
}

async fn reports(state: &State) -> Vec<String> {
    let history = state.store.lock().await.address_history().unwrap();
    history.into_iter().filter(|(node, _, _)| node == "gw-1").map(|(_, address, _)| address).rev().collect()
}

#[tokio::test]
async fn a_report_waits_for_the_sink_and_survives_a_restart_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("gw.state");
    // The sink's address is known, but nothing listens there yet.
    let sink: SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let stop = start_reporter(reporter("{static: \"2001:db8::1\"}", sink, &state_file));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    assert_eq!(saved["pending"], "2001:db8::1", "the address is pending, on disk, while the sink is down");

    // The sink comes up: the retry (after ~1 s) delivers it.
    let cp = keel_control_plane::ControlPlane::start(settings(&database(&dir), sink)).await.unwrap();
    eventually("the delivery", || async { reports(&cp.state).await == ["2001:db8::1"] }).await;
    eventually("the state file says delivered", || async {
        let saved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
        saved["delivered"] == "2001:db8::1" && saved["pending"].is_null()
    })
    .await;
    stop.cancel();

    // Restarted with the same address: nothing is sent again.
    let stop = start_reporter(reporter("{static: \"2001:db8::1\"}", sink, &state_file));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(reports(&cp.state).await, ["2001:db8::1"]);
    stop.cancel();

    // A change while the sink is down stays pending across a reporter restart, and is then delivered once.
    cp.stop().await;
    let stop = start_reporter(reporter("{static: \"2001:db8::2\"}", sink, &state_file));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    assert_eq!(
        (saved["delivered"].as_str(), saved["pending"].as_str()),
        (Some("2001:db8::1"), Some("2001:db8::2"))
    );
    let cp = keel_control_plane::ControlPlane::start(settings(&database(&dir), sink)).await.unwrap();
    let stop = start_reporter(reporter("{static: \"2001:db8::2\"}", sink, &state_file));
    eventually("the pending address delivered after the restart", || async {
        reports(&cp.state).await == ["2001:db8::1", "2001:db8::2"]
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(reports(&cp.state).await.len(), 2, "delivered once");
    stop.cancel();
    cp.stop().await;
}

/// A namespace with a veth pair, removed when dropped.
struct Namespace {
    name: String,
    interface: String,
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).status();
    }
}

impl Namespace {
    fn new() -> Self {
        let tag = std::process::id();
        let name = format!("keel-ddns-{tag}");
        let interface = format!("kd{tag}");
        let interface = interface[..interface.len().min(12)].to_string();
        let peer = format!("{interface}p");
        run("ip", &["netns", "add", &name]);
        let namespace = Namespace { name: name.clone(), interface: interface.clone() };
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        run("ip", &["-n", &name, "link", "add", &interface, "type", "veth", "peer", "name", &peer]);
        // Temporary addresses for prefixes added with mngtmpaddr (RFC 8981), as privacy extensions make them.
        run(
            "ip",
            &["netns", "exec", &name, "sysctl", "-qw", &format!("net.ipv6.conf.{interface}.use_tempaddr=2")],
        );
        run("ip", &["-n", &name, "link", "set", &interface, "up"]);
        run("ip", &["-n", &name, "link", "set", &peer, "up"]);
        namespace
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    fn addresses(&self) -> String {
        run("ip", &["-n", &self.name, "-6", "addr", "show", "dev", &self.interface])
    }
}

#[tokio::test]
async fn the_reporter_follows_the_kernels_addresses_within_a_second() {
    if !can_run_namespaces() {
        return;
    }
    let namespace = Namespace::new();
    let dir = tempfile::tempdir().unwrap();
    let database = database(&dir);
    let state_file = dir.path().join("gw.state");
    let (states, got_state) = std::sync::mpsc::channel::<Arc<State>>();
    let stop = CancellationToken::new();
    let stop_inside = stop.clone();
    let interface = namespace.interface.clone();
    // The control plane and the reporter both live in the namespace: the reporter's netlink sockets see
    // the namespace's interfaces, and its reports go to the namespace's loopback.
    let namespace_name = namespace.name.clone();
    let thread = std::thread::spawn(move || {
        enter(&namespace_name);
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async move {
            let cp =
                keel_control_plane::ControlPlane::start(settings(&database, "127.0.0.1:0".parse().unwrap()))
                    .await
                    .unwrap();
            states.send(Arc::clone(&cp.state)).unwrap();
            let source = format!("{{interface: {{name: {interface}, family: ipv6, policy: temporary}}}}");
            let reporter = reporter(&source, cp.local_addr, &state_file);
            keel_proxy::reporter::run(reporter, "gw-1".into(), Arc::new(Metrics::new()), stop_inside).await;
            cp.stop().await;
        });
    });
    let state = got_state.recv().unwrap();
    let latest = || {
        let state = Arc::clone(&state);
        async move { reports(&state).await.last().cloned() }
    };
    let wait_for = |expected: String, limit: Duration| {
        let latest = &latest;
        async move {
            let start = Instant::now();
            loop {
                if latest().await.as_deref() == Some(expected.as_str()) {
                    return start.elapsed();
                }
                assert!(
                    start.elapsed() < limit,
                    "{expected} not reported within {limit:?}; last: {:?}",
                    latest().await
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };

    // A stable address, no duplicate address detection: reported within a second.
    namespace.ip(&["-6", "addr", "add", "2001:db8:1::10/64", "dev", &namespace.interface, "nodad"]);
    let took = wait_for("2001:db8:1::10".to_string(), Duration::from_secs(1)).await;
    eprintln!("stable address reported after {took:?}");

    // A deprecated address (preferred lifetime 0) and a tentative one (DAD running) are never picked.
    namespace.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:1::1/64",
        "dev",
        &namespace.interface,
        "nodad",
        "preferred_lft",
        "0",
    ]);
    namespace.ip(&["-6", "addr", "add", "2001:db8:1::2/64", "dev", &namespace.interface]);
    assert!(namespace.addresses().contains("tentative"), "{}", namespace.addresses());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(latest().await.as_deref(), Some("2001:db8:1::10"));

    // Deprecating the reported address moves the report to the best other one: ::2 once DAD is done.
    namespace.ip(&[
        "-6",
        "addr",
        "change",
        "2001:db8:1::10/64",
        "dev",
        &namespace.interface,
        "preferred_lft",
        "0",
    ]);
    let took = wait_for("2001:db8:1::2".to_string(), Duration::from_secs(3)).await;
    eprintln!("fallback after deprecation reported after {took:?}");

    // A prefix with kernel-managed temporary addresses: the `temporary` policy reports the temporary one.
    namespace.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:2::1/64",
        "dev",
        &namespace.interface,
        "nodad",
        "mngtmpaddr",
    ]);
    let start = Instant::now();
    let temporary = loop {
        let shown = namespace.addresses();
        let temporary = shown
            .lines()
            .filter(|line| line.contains("temporary") && !line.contains("tentative"))
            .find_map(|line| line.split_whitespace().nth(1))
            .map(|cidr| cidr.split('/').next().unwrap().to_string());
        if let Some(temporary) = temporary {
            break temporary;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "the kernel made no temporary address:\n{shown}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(temporary.parse::<IpAddr>().unwrap().to_string().starts_with("2001:db8:2:"), "{temporary}");
    let took = wait_for(temporary.clone(), Duration::from_secs(1)).await;
    eprintln!("temporary address {temporary} reported {took:?} after it became usable");

    // Removing it falls back to a stable address (::2 and 2::1 are both stable; the policy picks one).
    namespace.ip(&["-6", "addr", "del", &format!("{temporary}/64"), "dev", &namespace.interface]);
    let start = Instant::now();
    loop {
        let now = latest().await.unwrap();
        if now != temporary {
            assert!(now == "2001:db8:1::2" || now == "2001:db8:2::1", "{now}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(1), "no report after the temporary address went away");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    thread.join().unwrap();
}

/// A STUN server that answers every Binding request with the mapped address `mapped`.
async fn fake_stun(mapped: std::net::SocketAddrV4) -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let address = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buffer = [0u8; 1500];
        loop {
            let Ok((length, from)) = socket.recv_from(&mut buffer).await else { return };
            if length < 20 || buffer[0..2] != [0x00, 0x01] {
                continue;
            }
            let cookie = 0x2112_A442u32.to_be_bytes();
            let mut answer = vec![0x01, 0x01, 0x00, 0x0c];
            answer.extend_from_slice(&cookie);
            answer.extend_from_slice(&buffer[8..20]);
            answer.extend_from_slice(&[0x00, 0x20, 0x00, 0x08, 0x00, 0x01]);
            answer.extend_from_slice(&(mapped.port() ^ 0x2112).to_be_bytes());
            answer.extend(mapped.ip().octets().iter().zip(cookie).map(|(byte, mask)| byte ^ mask));
            let _ = socket.send_to(&answer, from).await;
        }
    });
    address
}

#[tokio::test]
async fn a_stun_source_reports_the_address_the_server_sees() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&database(&dir)).await;
    let stun = fake_stun("203.0.113.50:40000".parse().unwrap()).await;
    let source = format!("{{stun: {{servers: [\"{stun}\"], family: ipv4}}}}");
    let state_file = dir.path().join("stun.state");
    let stop = start_reporter(reporter(&source, cp.local_addr, &state_file));
    eventually("the STUN-mapped address reported", || async { reports(&cp.state).await == ["203.0.113.50"] })
        .await;
    stop.cancel();
    cp.stop().await;
}
