//! The control plane and real proxies (the `keel_proxy` library) on loopback: snapshots reach the
//! matching proxies and are ACKed, a refused one is NACKed once, proxies ride out a control-plane restart
//! and come up from their cache, and a router's status lands in its Router resource.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use keel_proxy::{ProcessEnvironment, Proxy};
use serde_json::{Value, json};

const V1: &str = "/apis/edge.example.com/v1";

/// Proxy `node-a` (app=web) relaying the `web` config to an echo server, with its snapshot ACKed.
async fn web_proxy_acked(dir: &Path, addr: SocketAddr) -> Proxy {
    let a = start_proxy(dir, "node-a", &[("app", "web")], addr).await;
    web_config(addr, echo().await).await;
    eventually("the listener", || async { a.listener_addr("web").await.is_some() }).await;
    eventually("the ACK", || async {
        record(addr, "node-a").await.is_some_and(|p| p["ackedVersion"] == p["sentVersion"])
    })
    .await;
    a
}

fn object(kind: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "edge.example.com/v1", "kind": kind, "metadata": {"name": name}, "spec": spec})
}

async fn create(cp: SocketAddr, plural: &str, body: Value) {
    let (status, reply) = operator(cp, "POST", &format!("{V1}/{plural}"), Some(&body)).await;
    assert_eq!(status, 201, "{reply}");
}

async fn proxies(cp: SocketAddr) -> Vec<Value> {
    let (status, body) = operator(cp, "GET", "/debug/proxies", None).await;
    assert_eq!(status, 200, "{body}");
    body["proxies"].as_array().unwrap().clone()
}

async fn record(cp: SocketAddr, node: &str) -> Option<Value> {
    proxies(cp).await.into_iter().find(|proxy| proxy["node"] == node)
}

/// The echo cluster for every node, and a listener for `app=web` nodes.
async fn web_config(cp: SocketAddr, upstream: SocketAddr) {
    create(cp, "clusters", object("Cluster", "echo", json!({"endpoints": [upstream.to_string()]}))).await;
    let listener = json!({"address": "127.0.0.1:0", "cluster": "echo", "node_selector": {"app": "web"}});
    create(cp, "listeners", object("Listener", "web", listener)).await;
}

#[tokio::test]
async fn a_write_reaches_every_matching_proxy_and_is_acked() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&database(&dir)).await;
    let addr = cp.local_addr;
    let a = start_proxy(dir.path(), "node-a", &[("app", "web")], addr).await;
    let b = start_proxy(dir.path(), "node-b", &[("app", "web")], addr).await;
    let c = start_proxy(dir.path(), "node-c", &[("app", "db")], addr).await;
    eventually("three proxies connected", || async { proxies(addr).await.len() == 3 }).await;

    web_config(addr, echo().await).await;
    eventually("listeners on the web nodes", || async {
        a.listener_addr("web").await.is_some() && b.listener_addr("web").await.is_some()
    })
    .await;
    assert!(round_trip(a.listener_addr("web").await.unwrap()).await);
    assert!(round_trip(b.listener_addr("web").await.unwrap()).await);
    eventually("every proxy ACKed what it was sent", || async {
        let all = proxies(addr).await;
        all.len() == 3
            && all.iter().all(|p| p["ackedVersion"] == p["sentVersion"] && p["sentVersion"].is_string())
    })
    .await;
    // node-c got the cluster but not the listener.
    assert!(c.listener_addr("web").await.is_none());
    assert!(c.clusters().contains_key("echo"));
    // Same labels, same snapshot.
    let (a_record, b_record) = (record(addr, "node-a").await.unwrap(), record(addr, "node-b").await.unwrap());
    assert_eq!(a_record["ackedVersion"], b_record["ackedVersion"]);
    assert_eq!(a.applied().unwrap().source, format!("control-plane:http://{addr}"));

    // Each proxy's record is kept as a Node resource.
    eventually("Node resources", || async {
        let (status, node) = operator(addr, "GET", &format!("{V1}/nodes/node-a"), None).await;
        status == 200
            && node["status"]["ackedVersion"] == a_record["ackedVersion"]
            && node["metadata"]["labels"]["app"] == "web"
    })
    .await;

    for proxy in [&a, &b, &c] {
        stop_proxy(proxy).await;
    }
    cp.stop().await;
}

#[tokio::test]
async fn a_refused_snapshot_is_nacked_once_and_the_old_config_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&database(&dir)).await;
    let addr = cp.local_addr;
    let a = web_proxy_acked(dir.path(), addr).await;
    let good = record(addr, "node-a").await.unwrap();
    let listener = a.listener_addr("web").await.unwrap();

    // Valid on its own, but this node has no cluster "missing": the proxy refuses the snapshot.
    let patch = json!({"spec": {"cluster": "missing"}});
    let (status, body) = operator(addr, "PATCH", &format!("{V1}/listeners/web"), Some(&patch)).await;
    assert_eq!(status, 200, "{body}");
    eventually("the NACK", || async {
        record(addr, "node-a").await.is_some_and(|p| p["lastNack"].is_object())
    })
    .await;
    let nacked = record(addr, "node-a").await.unwrap();
    let error = nacked["lastNack"]["error"].as_str().unwrap();
    assert!(
        error.contains("listeners[0].cluster") && error.contains("no cluster named \"missing\""),
        "{error}"
    );
    assert_eq!(nacked["ackedVersion"], good["ackedVersion"], "the proxy stays on its last good snapshot");
    assert_ne!(nacked["lastNack"]["version"], good["ackedVersion"]);
    // What the KeelProxyRefusingConfig alert reads.
    let metrics = control_plane_metrics(addr).await;
    assert!(metrics.contains("\nkeel_control_plane_proxies_refusing 1\n"), "{metrics}");
    assert!(metrics.contains("\nkeel_control_plane_proxy_refusing{node=\"node-a\"} 1\n"), "{metrics}");
    promtool_check(&metrics);

    // No resend loop: unrelated writes that do not change this node's snapshot send nothing.
    create(
        addr,
        "listeners",
        object(
            "Listener",
            "other",
            json!({"address": "127.0.0.1:0", "cluster": "echo", "node_selector": {"app": "none"}}),
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = record(addr, "node-a").await.unwrap();
    assert_eq!(later["snapshotsSent"], nacked["snapshotsSent"]);
    // The old listener still relays, on the same socket.
    assert_eq!(a.listener_addr("web").await, Some(listener));
    assert!(round_trip(listener).await);
    assert!(a.last_rejected().unwrap().errors.iter().any(|line| line.contains("no cluster named")));

    // Fixing it sends the new snapshot, which is ACKed.
    let patch = json!({"spec": {"cluster": "echo", "idle_timeout": "30s"}});
    operator(addr, "PATCH", &format!("{V1}/listeners/web"), Some(&patch)).await;
    eventually("the ACK of the fix", || async {
        record(addr, "node-a").await.is_some_and(|p| {
            p["ackedVersion"] == p["sentVersion"] && p["ackedVersion"] != good["ackedVersion"]
        })
    })
    .await;
    assert_eq!(a.listener_addr("web").await, Some(listener));
    let metrics = control_plane_metrics(addr).await;
    assert!(metrics.contains("\nkeel_control_plane_proxies_refusing 0\n"), "{metrics}");
    assert!(!metrics.contains("keel_control_plane_proxy_refusing{"), "{metrics}");
    stop_proxy(&a).await;
    cp.stop().await;
}

async fn control_plane_metrics(addr: SocketAddr) -> String {
    let (status, body) = operator(addr, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    body.as_str().unwrap().to_string()
}

#[tokio::test]
async fn proxies_ride_out_a_control_plane_restart_and_restart_from_their_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&database(&dir)).await;
    let addr = cp.local_addr;
    let a = web_proxy_acked(dir.path(), addr).await;
    let version = a.snapshot().unwrap().version;

    cp.stop().await;
    // The control plane is gone: the proxy keeps serving.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listener = a.listener_addr("web").await.unwrap();
    assert!(round_trip(listener).await);

    // A proxy (re)started now comes up from its cache.
    let fresh = start_proxy(dir.path(), "node-a", &[("app", "web")], addr).await;
    assert_eq!(fresh.snapshot().map(|snapshot| snapshot.version), Some(version.clone()));
    assert!(fresh.applied().unwrap().source.starts_with("cache:"));
    assert!(round_trip(fresh.listener_addr("web").await.unwrap()).await);
    stop_proxy(&fresh).await;

    // The control plane returns on the same address: the proxy resyncs, and new writes reach it.
    let cp = keel_control_plane::ControlPlane::start(settings(&database(&dir), addr)).await.unwrap();
    eventually("the proxy reconnected", || async { record(addr, "node-a").await.is_some() }).await;
    let reconnected = record(addr, "node-a").await.unwrap();
    assert_eq!(reconnected["ackedVersion"], version.as_str());
    assert_eq!(reconnected["snapshotsSent"], 0, "what the proxy runs is not sent again");
    let second = json!({"address": "127.0.0.1:0", "cluster": "echo", "node_selector": {"app": "web"}});
    create(addr, "listeners", object("Listener", "web-2", second)).await;
    eventually("the new listener", || async { a.listener_addr("web-2").await.is_some() }).await;
    assert_eq!(a.listener_addr("web").await, Some(listener), "the running listener was not disturbed");
    stop_proxy(&a).await;
    cp.stop().await;
}

#[tokio::test]
async fn a_router_reports_its_services_into_its_router_resource() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("router.token");
    let secret = dir.path().join("mysql.secret");
    std::fs::write(&token, "router-token\n").unwrap();
    std::fs::write(&secret, "mysql-secret\n").unwrap();
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let cp = start(&database(&dir)).await;
    let addr = cp.local_addr;
    let router = start_proxy(dir.path(), "router-node", &[], addr).await;
    let publisher = start_proxy(dir.path(), "db-node", &[("app", "db")], addr).await;
    let router_spec = json!({
        "listen": format!("127.0.0.1:{port}"),
        "address": format!("127.0.0.1:{port}"),
        "token_file": token.display().to_string(),
    });
    create(addr, "routers", object("Router", "router-node", router_spec)).await;
    let published = json!({
        "apiVersion": "edge.example.com/v1", "kind": "PublishedService", "metadata": {"name": "mysql", "namespace": "db"},
        "spec": {"local": echo().await.to_string(), "secret_file": secret.display().to_string(), "node_selector": {"app": "db"}}
    });
    let (status, body) =
        operator(addr, "POST", &format!("{V1}/namespaces/db/publishedservices"), Some(&published)).await;
    assert_eq!(status, 201, "{body}");

    eventually("the router's status in its Router resource", || async {
        let (_, router) = operator(addr, "GET", &format!("{V1}/routers/router-node"), None).await;
        let services = &router["status"]["activeServices"];
        services[0]["name"] == "mysql" && services[0]["clients"][0]["type"] == "publisher"
    })
    .await;
    let (_, resource) = operator(addr, "GET", &format!("{V1}/routers/router-node"), None).await;
    assert_eq!(resource["status"]["activeServices"][0]["clients"][0]["id"], "db-node-mysql");
    assert!(!resource.to_string().contains("router-token") && !resource.to_string().contains("mysql-secret"));
    stop_proxy(&publisher).await;
    stop_proxy(&router).await;
    cp.stop().await;
}

#[tokio::test]
async fn the_stream_runs_over_tls() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["cp.test".to_string()]).unwrap().signed_by(&key, &ca).unwrap();
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("cp.pem"), cert.pem()).unwrap();
    std::fs::write(path("cp-key.pem"), key.serialize_pem()).unwrap();

    let mut tls_settings = settings(&database(&dir), "127.0.0.1:0".parse().unwrap());
    tls_settings.tls = Some((path("cp.pem"), path("cp-key.pem")));
    let cp = keel_control_plane::ControlPlane::start(tls_settings).await.unwrap();
    let addr = cp.local_addr;
    let state = std::sync::Arc::clone(&cp.state);

    let bootstrap = format!(
        "node: {{id: node-tls, labels: {{app: web}}}}\nadmin: {{address: \"127.0.0.1:0\"}}\ncontrol_plane:\n  address: https://127.0.0.1:{}\n  server_name: cp.test\n  ca_file: {}\n  token: {PROXY}\n",
        addr.port(),
        path("ca.pem").display()
    );
    let loaded = keel_proxy::source::load_text(&bootstrap, "bootstrap.yaml", &ProcessEnvironment).unwrap();
    let proxy = Proxy::new(Arc::new(ProcessEnvironment), None);
    proxy.set_bootstrap(loaded.config.config().clone());
    tokio::spawn(keel_proxy::control_plane::follow(proxy.clone(), loaded.config.config().clone()));

    // The REST API is behind TLS too; write through the store's API-facing state instead of a TLS client.
    eventually("the proxy connected over TLS", || async { state.fleet.connected().await.len() == 1 }).await;
    let upstream = echo().await;
    {
        use keel_control_plane::store::Key;
        use keel_schemas::resource::{Kind, Resource, check_spec};
        let mut store = state.store.lock().await;
        for (kind, name, spec) in [
            (Kind::Cluster, "echo", json!({"endpoints": [upstream.to_string()]})),
            (Kind::Listener, "web", json!({"address": "127.0.0.1:0", "cluster": "echo"})),
        ] {
            let checked = check_spec(kind, name, None, &spec).unwrap();
            let resource: Resource = serde_json::from_value(object(kind.name(), name, spec)).unwrap();
            store.create(Key::new(kind, None, name), resource, checked).unwrap();
        }
    }
    state.written();
    eventually("the listener from a snapshot sent over TLS", || async {
        proxy.listener_addr("web").await.is_some()
    })
    .await;
    assert!(round_trip(proxy.listener_addr("web").await.unwrap()).await);
    stop_proxy(&proxy).await;
    cp.stop().await;
}
