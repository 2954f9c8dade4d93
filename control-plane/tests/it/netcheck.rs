//! Network checking: seed 002's clients against the control plane (its paths, field names, codes and
//! expiry), and a live mesh of Keel proxies probing each other, drawn by the matrix page in headless
//! Chromium with a broken pair marked.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use keel_control_plane::{ControlPlane, NetCheckSettings};
use keel_proxy::{Proxy, Shutdown};
use keel_schemas::MapEnvironment;
use serde_json::{Value, json};

fn node_info(pod: &str, node_ip: &str, pod_ip: &str) -> Value {
    json!({"namespace": "kube-system", "node_ip": node_ip, "pod_ip": pod_ip, "pod_name": pod, "timestamp": "2025-12-12T21:00:00.123+08:00"})
}

#[tokio::test]
async fn seed_002_clients_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(&database(&dir), "127.0.0.1:0".parse().unwrap());
    settings.netcheck =
        NetCheckSettings { expiry: Duration::from_millis(800), ..NetCheckSettings::default() };
    let cp = ControlPlane::start(settings).await.unwrap();
    let addr = cp.local_addr;
    let p = Some(PROXY);

    // With proxy tokens configured, a token is needed (the flag --netcheck-anonymous lifts that).
    let (status, body) = api_token_call(
        addr,
        "POST",
        "/api/v1/heartbeat",
        None,
        Some(node_info("p1", "10.0.0.1", "10.1.0.1")),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (401, Some("UNAUTHORIZED")));
    let (status, body) = api_token_call(
        addr,
        "POST",
        "/api/v1/heartbeat",
        p,
        Some(json!({"pod_name": "p1", "node_ip": "10.0.0.1"})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], "INVALID_REQUEST");
    assert!(body["details"].as_str().unwrap().contains("PodIP"), "{body}");
    let (status, body) =
        api_token_call(addr, "POST", "/api/v1/heartbeat", p, Some(json!("not an object"))).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("INVALID_REQUEST")));

    for (pod, node_ip, pod_ip) in [("p1", "10.0.0.1", "10.1.0.1"), ("p2", "10.0.0.2", "10.1.0.2")] {
        let (status, body) =
            api_token_call(addr, "POST", "/api/v1/heartbeat", p, Some(node_info(pod, node_ip, pod_ip))).await;
        assert_eq!((status, body["status"].as_str()), (200, Some("success")), "{body}");
    }
    let result = |target: &str, ping: &str, port: &str| json!({"source_ip": "10.1.0.1", "target_ip": target, "ping_status": ping, "port_status": {"22": port}, "latency": 1_000_000, "test_duration": 2_010_000_000u64, "timestamp": "2025-12-12T21:00:01+08:00"});
    let hosts = json!({"source_ip": "10.1.0.1", "results": [result("10.0.0.2", "reachable", "open")]});
    assert_eq!(api_token_call(addr, "POST", "/api/v1/test-results/hosts", p, Some(hosts)).await.0, 200);
    let pods = json!({"source_ip": "10.1.0.1", "results": [result("10.1.0.2", "unreachable", "closed")]});
    assert_eq!(api_token_call(addr, "POST", "/api/v1/test-results/pods", p, Some(pods)).await.0, 200);
    let service =
        json!({"source_ip": "10.1.0.1", "result": result("mysql.default.svc", "reachable", "open")});
    assert_eq!(api_token_call(addr, "POST", "/api/v1/test-results/service", p, Some(service)).await.0, 200);
    assert_eq!(
        api_token_call(addr, "POST", "/api/v1/test-results/hosts", p, Some(json!({"results": []}))).await.0,
        400
    );

    assert_eq!(
        api_token_call(addr, "GET", "/api/v1/hosts", p, None).await.1,
        json!({"host_ips": ["10.0.0.1", "10.0.0.2"], "count": 2})
    );
    assert_eq!(
        api_token_call(addr, "GET", "/api/v1/pods", p, None).await.1,
        json!({"pod_ips": ["10.1.0.1", "10.1.0.2"], "count": 2})
    );
    assert_eq!(
        api_token_call(addr, "GET", "/api/v1/clients/count", p, None).await.1["active_client_count"],
        2
    );
    assert_eq!(
        api_token_call(addr, "GET", "/api/v1/health", None, None).await.1,
        json!({"status": "healthy"})
    );
    assert_eq!(
        api_token_call(addr, "GET", "/api/v1/test-results/hosts", p, None).await.1,
        json!({"results": {"10.1.0.1": {"10.0.0.2": {"ping": "reachable", "port_status": "open", "test_duration": 2_010_000_000u64}}}})
    );
    assert_eq!(
        api_token_call(addr, "GET", "/api/v1/test-results/pods", p, None).await.1["results"]["10.1.0.1"]["10.1.0.2"]
            ["ping"],
        "unreachable"
    );
    let (_, all) = api_token_call(addr, "GET", "/api/v1/results", p, None).await;
    let mut keys: Vec<&String> = all.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "active_client_count",
            "host_ips",
            "host_test_results",
            "pod_ips",
            "pod_test_results",
            "service_test_results"
        ]
    );
    assert_eq!(all["service_test_results"]["10.1.0.1"]["target_ip"], "mysql.default.svc");

    // In the matrix: p1 reaches p2's node but not its pod, so the pair is down.
    let (_, matrix) = api_token_call(addr, "GET", "/api/v1/matrix", p, None).await;
    assert_eq!(matrix["summary"]["unreachablePairs"], 1, "{matrix}");
    assert_eq!(matrix["cells"], json!([[0, 1, 2, null, 1.0]]), "p1 -> p2, down");
    let (_, metrics) = operator(addr, "GET", "/metrics", None).await;
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(metrics.contains("keel_netcheck_active_clients{version=\"seed-002\"} 2\n"), "{metrics}");
    assert!(metrics.contains("keel_netcheck_unreachable_pairs 1\n"), "{metrics}");
    promtool_check(&metrics);

    // p2 stops heartbeating: gone after the expiry; p1, still heartbeating, stays with its results.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        api_token_call(addr, "POST", "/api/v1/heartbeat", p, Some(node_info("p1", "10.0.0.1", "10.1.0.1")))
            .await;
    }
    assert_eq!(
        api_token_call(addr, "GET", "/api/v1/hosts", p, None).await.1,
        json!({"host_ips": ["10.0.0.1"], "count": 1})
    );
    assert_eq!(
        api_token_call(addr, "GET", "/api/v1/clients/count", p, None).await.1["active_client_count"],
        1
    );
    assert!(
        !api_token_call(addr, "GET", "/api/v1/test-results/hosts", p, None).await.1["results"]["10.1.0.1"]
            .is_null()
    );
    // Then p1 too: its results go with it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        api_token_call(addr, "GET", "/api/v1/clients/count", p, None).await.1["active_client_count"],
        0
    );
    assert_eq!(
        api_token_call(addr, "GET", "/api/v1/test-results/hosts", p, None).await.1,
        json!({"results": {}})
    );
    assert_eq!(
        api_token_call(addr, "GET", "/api/v1/test-results/service", p, None).await.1,
        json!({"results": {}})
    );
    cp.stop().await;
}

/// A proxy on "node" `ip` (a loopback address), following the control plane, probing `probes`.
async fn mesh_proxy(dir: &std::path::Path, node: &str, ip: &str, cp: SocketAddr, probes: &str) -> Proxy {
    let bootstrap = format!(
        "node: {{id: {node}}}\nadmin: {{address: \"127.0.0.1:0\"}}\ndrain_timeout: 1s\ncontrol_plane:\n  address: http://{cp}\n  token: {PROXY}\n  cache_file: {}/{node}.snapshot\nprobes:\n{probes}",
        dir.display()
    );
    let env = MapEnvironment::default()
        .with_var("NODE_IP", ip)
        .with_var("POD_NAME", &format!("keel-{node}"))
        .with_var("NAMESPACE", "edge");
    let loaded = keel_proxy::source::load_text(&bootstrap, "bootstrap.yaml", &env).unwrap();
    let bootstrap = loaded.config.config().clone();
    let proxy = Proxy::new(Arc::new(env), None);
    proxy.set_bootstrap(bootstrap.clone());
    tokio::spawn(keel_proxy::control_plane::follow(proxy.clone(), bootstrap));
    proxy
}

#[tokio::test]
async fn the_matrix_page_shows_a_live_mesh_and_marks_a_broken_pair() {
    let Some(browser) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&database(&dir)).await;
    let addr = cp.local_addr;
    let icmp = |targets: &str| {
        format!(
            "  - {{name: mesh, icmp: {{targets: [{targets}]}}, interval: 300ms, timeout: 200ms, failure_threshold: 1}}\n"
        )
    };
    // Three "nodes" on loopback addresses, each pinging the others; a also checks a closed TCP port of c
    // (its broken pair), and b an address no client has (an absent receiver).
    let closed = std::net::TcpListener::bind("127.0.0.13:0").unwrap().local_addr().unwrap();
    let a_probes = icmp("127.0.0.12, 127.0.0.13")
        + &format!(
            "  - {{name: ssh, tcp: {{targets: [\"{closed}\"]}}, interval: 300ms, timeout: 200ms, failure_threshold: 1}}\n"
        );
    let proxies = vec![
        mesh_proxy(dir.path(), "a", "127.0.0.11", addr, &a_probes).await,
        mesh_proxy(dir.path(), "b", "127.0.0.12", addr, &icmp("127.0.0.11, 127.0.0.13, 127.0.0.99")).await,
        mesh_proxy(dir.path(), "c", "127.0.0.13", addr, &icmp("127.0.0.11, 127.0.0.12")).await,
    ];
    let mut matrix = Value::Null;
    for _ in 0..100 {
        matrix = operator(addr, "GET", "/api/v1/matrix", None).await.1;
        if matrix["summary"]["pairs"] == 7 && matrix["summary"]["unreachablePairs"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Six pairs among the three, and b's probe of an absent address.
    assert_eq!(matrix["summary"]["pairs"], 7, "{matrix}");
    assert_eq!(matrix["summary"]["unreachable"][0]["from"], "a");
    assert_eq!(matrix["summary"]["unreachable"][0]["to"], "c");
    assert_eq!(matrix["absent"], json!(["127.0.0.99"]));

    let page = render(browser, format!("http://admin:{OPERATOR}@{addr}/matrix"), 5000).await;
    let cell = |from: &str, to: &str| -> String {
        let marker = format!("data-from=\"{from}\" data-to=\"{to}\"");
        let at = page.find(&marker).unwrap_or_else(|| panic!("no cell {from} -> {to} in {page}"));
        let start = page[..at].rfind("<td").unwrap();
        let end = at + page[at..].find('>').unwrap();
        page[start..end].to_string()
    };
    assert!(page.contains("3 live clients"), "{page}");
    assert!(cell("a", "c").contains("class=\"down\""), "{}", cell("a", "c"));
    assert!(cell("a", "b").contains("class=\"up"), "{}", cell("a", "b"));
    assert!(cell("c", "a").contains("class=\"up"), "{}", cell("c", "a"));
    assert!(cell("a", "a").contains("class=\"self\""), "{}", cell("a", "a"));
    assert!(page.contains("127.0.0.99 (absent)"), "{page}");
    assert!(page.contains("updated "), "the script ran: {page}");

    for proxy in &proxies {
        proxy.shutdown(Shutdown::Fast);
    }
    cp.stop().await;
}

/// A hub namespace with a bridge (the control plane's, 10.78.0.1) and one namespace per node, each on
/// the bridge by a veth pair (10.78.0.11, .12, ...). Removed when dropped.
struct Mesh {
    hub: String,
    nodes: Vec<(String, String)>,
}

impl Mesh {
    fn new(count: usize) -> Self {
        let tag = std::process::id();
        let hub = format!("keel-nc-{tag}-hub");
        run("ip", &["netns", "add", &hub]);
        let mut mesh = Mesh { hub: hub.clone(), nodes: Vec::new() };
        run("ip", &["-n", &hub, "link", "set", "lo", "up"]);
        run("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        run("ip", &["-n", &hub, "addr", "add", "10.78.0.1/24", "dev", "br0"]);
        run("ip", &["-n", &hub, "link", "set", "br0", "up"]);
        for i in 0..count {
            let name = format!("keel-nc-{tag}-{i}");
            let ip = format!("10.78.0.{}", 11 + i);
            run("ip", &["netns", "add", &name]);
            mesh.nodes.push((name.clone(), ip.clone()));
            let port = format!("p{i}");
            run(
                "ip",
                &["-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &name],
            );
            run("ip", &["-n", &hub, "link", "set", &port, "master", "br0"]);
            run("ip", &["-n", &hub, "link", "set", &port, "up"]);
            run("ip", &["-n", &name, "link", "set", "lo", "up"]);
            run("ip", &["-n", &name, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            run("ip", &["-n", &name, "link", "set", "eth0", "up"]);
        }
        mesh
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for (name, _) in &self.nodes {
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
        }
        let _ = Command::new("ip").args(["netns", "delete", &self.hub]).status();
    }
}

/// A proxy in its own namespace and thread (its own runtime), following `cp`, until `stop` fires.
fn proxy_in(
    namespace: String,
    node: String,
    ip: String,
    cp: SocketAddr,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        enter(&namespace);
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async move {
            let bootstrap = format!(
                "node: {{id: {node}, labels: {{mesh: \"yes\"}}}}\nadmin: {{address: \"127.0.0.1:0\"}}\ndrain_timeout: 1s\ncontrol_plane:\n  address: http://{cp}\n  token: {PROXY}\n"
            );
            let env = MapEnvironment::default().with_var("NODE_IP", &ip).with_var("POD_NAME", &format!("keel-{node}"));
            let loaded = keel_proxy::source::load_text(&bootstrap, "bootstrap.yaml", &env).unwrap();
            let bootstrap = loaded.config.config().clone();
            let proxy = Proxy::new(Arc::new(env), None);
            proxy.set_bootstrap(bootstrap.clone());
            let follow = tokio::spawn(keel_proxy::control_plane::follow(proxy.clone(), bootstrap));
            let _ = stop.await;
            follow.abort();
            proxy.shutdown(Shutdown::Fast);
        });
    })
}

/// The unreachable pairs of the matrix, as "from->to", sorted; and the number of probed pairs.
async fn unreachable(cp: SocketAddr) -> (Vec<String>, u64) {
    let (_, matrix) = operator(cp, "GET", "/api/v1/matrix", None).await;
    let mut pairs: Vec<String> = matrix["summary"]["unreachable"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|pair| {
            format!("{}->{}", pair["from"].as_str().unwrap_or("?"), pair["to"].as_str().unwrap_or("?"))
        })
        .collect();
    pairs.sort();
    (pairs, matrix["summary"]["pairs"].as_u64().unwrap_or(0))
}

/// Three proxies in namespaces ping each other on the control plane's assignment (a Probe with peers).
/// A cut link (a blackhole route in a's namespace for b) shows as exactly that pair down, in both
/// directions (b's echo requests reach a, a's replies do not leave), after the failure threshold; the
/// link restored, the pair is up again.
#[test]
fn a_cut_link_is_exactly_that_pair_down_and_recovers() {
    if !can_run_namespaces() {
        return;
    }
    let mesh = Mesh::new(3);
    let hub = mesh.hub.clone();
    let nodes = mesh.nodes.clone();
    let scenario = std::thread::spawn(move || {
        enter(&hub);
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async move {
            let dir = tempfile::tempdir().unwrap();
            let cp =
                ControlPlane::start(settings(&database(&dir), "10.78.0.1:0".parse().unwrap())).await.unwrap();
            let addr = cp.local_addr;
            let probe = json!({
                "apiVersion": "edge.example.com/v1", "kind": "Probe", "metadata": {"name": "mesh"},
                "spec": {"node_selector": {"mesh": "yes"}, "icmp": {}, "peers": {"address": "node_ip"},
                         "interval": "300ms", "timeout": "200ms", "failure_threshold": 2}
            });
            let (status, body) =
                operator(addr, "POST", "/apis/edge.example.com/v1/probes", Some(&probe)).await;
            assert_eq!(status, 201, "{body}");
            let mut stops = Vec::new();
            let mut threads = Vec::new();
            for (i, (namespace, ip)) in nodes.iter().enumerate() {
                let (stop, stopped) = tokio::sync::oneshot::channel();
                stops.push(stop);
                let node = ["a", "b", "c"][i].to_string();
                threads.push(proxy_in(namespace.clone(), node, ip.clone(), addr, stopped));
            }
            let settle = |what: &'static str, want: Vec<&'static str>| async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
                loop {
                    let (down, pairs) = unreachable(addr).await;
                    if pairs == 6 && down == want {
                        return;
                    }
                    assert!(tokio::time::Instant::now() < deadline, "{what}: {pairs} pairs, down {down:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            settle("the full mesh up", vec![]).await;

            let cut = std::time::Instant::now();
            run("ip", &["-n", &nodes[0].0, "route", "add", "blackhole", &format!("{}/32", nodes[1].1)]);
            settle("the cut pair down", vec!["a->b", "b->a"]).await;
            let took = cut.elapsed();
            // Two failed checks at 300 ms (+/- 10%), the status's 1 s cadence, and the poll: well under 3 s.
            assert!(took < Duration::from_secs(3), "reported after {took:?}");
            assert!(took >= Duration::from_millis(400), "reported after {took:?}: before the threshold");
            run("ip", &["-n", &nodes[0].0, "route", "del", "blackhole", &format!("{}/32", nodes[1].1)]);
            settle("the pair up again", vec![]).await;

            for stop in stops {
                let _ = stop.send(());
            }
            for thread in threads {
                thread.join().unwrap();
            }
            cp.stop().await;
        });
    });
    scenario.join().unwrap();
    drop(mesh);
}

/// The ICMP fallback, in a namespace of its own: with `net.ipv4.ping_group_range` closed (the kernel's
/// default, "1 0") the probe uses a raw socket (this test runs as root, with CAP_NET_RAW); opened to
/// every group, an unprivileged ping socket. Both get an answer, over IPv4 and IPv6.
#[test]
fn icmp_uses_a_ping_socket_where_allowed_and_a_raw_socket_otherwise() {
    use keel_proxy::probe::icmp::{Method, ping};
    if !can_run_namespaces() {
        return;
    }
    let name = format!("keel-nc-{}-icmp", std::process::id());
    run("ip", &["netns", "add", &name]);
    let mesh = Mesh { hub: name.clone(), nodes: Vec::new() };
    run("ip", &["-n", &name, "link", "set", "lo", "up"]);
    let sysctl = |range: &str| {
        run("ip", &["netns", "exec", &name, "sysctl", "-qw", &format!("net.ipv4.ping_group_range={range}")])
    };
    let probe = |namespace: String| {
        std::thread::spawn(move || {
            enter(&namespace);
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
                let timeout = Duration::from_secs(2);
                let v4 = ping("127.0.0.1".parse().unwrap(), 1, timeout).await.unwrap();
                let v6 = ping("::1".parse().unwrap(), 1, timeout).await.unwrap();
                assert_eq!(v4.1, v6.1, "one choice for both families");
                v4.1
            })
        })
        .join()
        .unwrap()
    };
    sysctl("1 0");
    assert_eq!(probe(name.clone()), Method::Raw);
    sysctl("0 2147483647");
    assert_eq!(probe(name.clone()), Method::Datagram);

    // Neither: the range closed again, and CAP_NET_RAW dropped from this thread's effective set
    // (capabilities are per thread). The error says how to allow either.
    sysctl("1 0");
    let namespace = name.clone();
    let error = std::thread::spawn(move || {
        enter(&namespace);
        drop_net_raw();
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
            ping("127.0.0.1".parse().unwrap(), 1, Duration::from_secs(1)).await.unwrap_err().to_string()
        })
    })
    .join()
    .unwrap();
    assert!(error.contains("net.ipv4.ping_group_range") && error.contains("CAP_NET_RAW"), "{error}");
    drop(mesh);
}

/// Clears CAP_NET_RAW from the calling thread's effective capabilities.
fn drop_net_raw() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_RAW: u32 = 13;
    let mut header = Header { version: VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a version-3 header and the two data structs that version expects;
    // pid 0 is the calling thread.
    unsafe {
        assert_eq!(libc::syscall(libc::SYS_capget, &mut header as *mut Header, data.as_mut_ptr()), 0);
        data[0].effective &= !(1 << CAP_NET_RAW);
        assert_eq!(libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()), 0);
    }
}

/// docs/netcheck-openapi.yaml describes what is served: every path and method it lists is routed here.
#[tokio::test]
async fn the_openapi_file_lists_what_is_served() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/netcheck-openapi.yaml"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&database(&dir)).await;
    let mut path = String::new();
    let mut checked = 0;
    for line in text.lines() {
        if let Some(listed) = line.strip_prefix("  /").and_then(|rest| rest.strip_suffix(':')) {
            path = format!("/{listed}");
        } else if let Some(method) = ["get", "post"].into_iter().find(|m| line == format!("    {m}:")) {
            let body = (method == "post").then(|| json!({}));
            let (status, answer) =
                api_token_call(cp.local_addr, &method.to_uppercase(), &path, Some(PROXY), body).await;
            assert!(status != 404 && status != 405, "{method} {path}: {status} {answer}");
            checked += 1;
        }
    }
    assert_eq!(checked, 13, "operations found in the file");
    cp.stop().await;
}

/// At 200 clients the page still draws every row, in 4 px cells (about 800 px across), with the
/// column labels given way to tooltips, and the one broken pair marked.
#[tokio::test]
async fn the_matrix_page_scales_to_200_clients() {
    let Some(browser) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&database(&dir)).await;
    let addr = cp.local_addr;
    let ip = |i: usize| format!("10.0.{}.{}", i / 200, i % 200 + 1);
    for i in 0..200 {
        let info = node_info(&format!("pod-{i:03}"), &ip(i), &format!("10.1.{}.{}", i / 200, i % 200 + 1));
        assert_eq!(api_token_call(addr, "POST", "/api/v1/heartbeat", Some(PROXY), Some(info)).await.0, 200);
        // Each pings the next five; pod-007 cannot reach pod-008.
        let results: Vec<Value> = (1..=5)
            .map(|step| {
                let target = (i + step) % 200;
                let ping = if i == 7 && target == 8 { "unreachable" } else { "reachable" };
                json!({"source_ip": format!("10.1.0.{}", i + 1), "target_ip": ip(target), "ping_status": ping, "port_status": {"22": "open"}})
            })
            .collect();
        let report = json!({"source_ip": format!("10.1.{}.{}", i / 200, i % 200 + 1), "results": results});
        assert_eq!(
            api_token_call(addr, "POST", "/api/v1/test-results/hosts", Some(PROXY), Some(report)).await.0,
            200
        );
    }
    let page = render(browser, format!("http://admin:{OPERATOR}@{addr}/matrix"), 3000).await;
    assert!(page.contains("200 live clients"), "{}", &page[..page.len().min(2000)]);
    assert!(page.contains("td{width:4px;height:4px;min-width:4px}"), "cells shrink to fit");
    assert_eq!(page.matches("<tr>").count(), 201, "a header row and 200 client rows");
    assert!(page.contains("data-from=\"pod-007\" data-to=\"pod-008\" class=\"down\""), "the broken pair");
    assert_eq!(page.matches("class=\"down\"").count(), 1);
    cp.stop().await;
}
