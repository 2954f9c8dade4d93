//! Hot reload: live traffic survives it, bad configs are refused whole, removed listeners drain, and the
//! file is watched through editors' renames and Kubernetes' symlink swaps.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use crate::support::{TestProxy, Upstream, echo_once, eventually, expect_closed, read_all};

fn two_cluster_config(main: SocketAddr, tagged: SocketAddr, with_extra: bool, idle: &str) -> String {
    let extra =
        if with_extra { "  - {name: extra, address: \"127.0.0.1:0\", cluster: tagged}\n" } else { "" };
    format!(
        r#"
admin: {{address: "127.0.0.1:0"}}
listeners:
  - {{name: front, address: "127.0.0.1:0", cluster: back, idle_timeout: {idle}}}
{extra}clusters:
  - {{name: back, endpoints: ["{main}"]}}
  - {{name: tagged, endpoints: ["{tagged}"]}}
"#
    )
}

async fn version(proxy: &TestProxy) -> String {
    proxy.proxy.applied().unwrap().version.clone()
}

#[tokio::test]
async fn reloads_under_live_traffic_drop_no_established_connection() {
    let (a, b) = (Upstream::echo().await, Upstream::echo().await);
    let tagged = Upstream::tagged("extra").await;
    let v1 = two_cluster_config(a.addr, tagged.addr, false, "1h");
    let v2 = two_cluster_config(b.addr, tagged.addr, true, "30m");
    let proxy = TestProxy::start(&v1).await;
    let front = proxy.addr("front").await;

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for id in 0..20 {
        let mut stream = TcpStream::connect(front).await.unwrap();
        let (stop, rounds) = (Arc::clone(&stop), Arc::clone(&rounds));
        clients.push(tokio::spawn(async move {
            let mut mine = 0;
            while !stop.load(Ordering::Relaxed) {
                echo_once(&mut stream, format!("client {id} round {mine}").as_bytes()).await?;
                mine += 1;
                rounds.fetch_add(1, Ordering::Relaxed);
            }
            std::io::Result::Ok(mine)
        }));
    }

    for i in 0..10 {
        let (next, has_extra) = if i % 2 == 0 { (&v2, true) } else { (&v1, false) };
        let before = version(&proxy).await;
        proxy.replace_config(next);
        let (status, body) = proxy.post("/reload").await;
        assert_eq!(status, 200, "{body}");
        assert_ne!(version(&proxy).await, before);
        match proxy.proxy.listener_addr("extra").await {
            Some(extra) => {
                assert!(has_extra);
                assert_eq!(read_all(extra).await, "extra");
            }
            None => assert!(!has_extra),
        }
        // Fresh connections work after every reload (which upstream they reach is checked in
        // a_changed_cluster_takes_effect_for_new_connections_only).
        let mut fresh = TcpStream::connect(front).await.unwrap();
        echo_once(&mut fresh, b"fresh").await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let completed = client.await.unwrap().expect("an established connection failed during reloads");
        assert!(completed > 0);
    }
    assert!(rounds.load(Ordering::Relaxed) >= 20);
    // Ten POST /reloads plus the first apply; the file watcher may apply some versions first as well.
    assert!(proxy.metric("keel_config_reloads_total{source=\"file\"}").await >= 11.0);
    proxy.stop().await;
}

#[tokio::test]
async fn an_invalid_reload_keeps_the_old_config_serving() {
    let upstream = Upstream::echo().await;
    let tagged = Upstream::tagged("t").await;
    let proxy = TestProxy::start(&two_cluster_config(upstream.addr, tagged.addr, false, "1h")).await;
    let running = version(&proxy).await;
    let front = proxy.addr("front").await;
    let mut open = TcpStream::connect(front).await.unwrap();
    echo_once(&mut open, b"before").await.unwrap();

    proxy.replace_config(
        "admin: {address: \"127.0.0.1:0\"}\nlisteners:\n  - {name: front, address: \"127.0.0.1:0\", cluster: nope}\nclusters: []\n",
    );
    let (status, body) = proxy.post("/reload").await;
    assert_eq!(status, 400);
    assert!(body.contains(":3:52: listeners[0].cluster: no cluster named \"nope\""), "{body}");

    assert_eq!(version(&proxy).await, running);
    echo_once(&mut open, b"after").await.unwrap();
    let mut fresh = TcpStream::connect(front).await.unwrap();
    echo_once(&mut fresh, b"fresh").await.unwrap();

    let (_, dump) = proxy.get("/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["running"]["version"], running.as_str());
    let errors = dump["last_rejected"]["errors"][0].as_str().unwrap();
    assert!(errors.contains("no cluster named \"nope\""), "{dump}");
    // The POST rejected it; the file watcher may have rejected the same text just before.
    assert!(proxy.metric("keel_config_reload_failures_total{source=\"file\"}").await >= 1.0);
    drop((open, fresh));
    proxy.stop().await;
}

#[tokio::test]
async fn a_config_whose_listener_cannot_bind_is_refused_whole() {
    let upstream = Upstream::echo().await;
    let tagged = Upstream::tagged("t").await;
    let proxy = TestProxy::start(&two_cluster_config(upstream.addr, tagged.addr, false, "1h")).await;
    let running = version(&proxy).await;
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let bad = format!(
        "admin: {{address: \"127.0.0.1:0\"}}\nlisteners:\n  - {{name: front, address: \"127.0.0.1:0\", cluster: back, idle_timeout: 5s}}\n  - {{name: clash, address: \"{taken_addr}\", cluster: back}}\nclusters:\n  - {{name: back, endpoints: [\"{}\"]}}\n",
        tagged.addr
    );
    proxy.replace_config(&bad);
    let (status, body) = proxy.post("/reload").await;
    assert_eq!(status, 400);
    assert!(body.contains(&format!("listeners[1].address: cannot bind {taken_addr}")), "{body}");
    assert_eq!(version(&proxy).await, running);
    // The cluster change in the refused config did not happen either.
    let mut stream = TcpStream::connect(proxy.addr("front").await).await.unwrap();
    echo_once(&mut stream, b"still the echo cluster").await.unwrap();
    drop(stream);
    proxy.stop().await;
}

#[tokio::test]
async fn a_removed_listener_stops_accepting_and_drains_its_connections() {
    let upstream = Upstream::echo().await;
    let config = |with_old: bool| {
        let old = if with_old { "  - {name: old, address: \"127.0.0.1:0\", cluster: back}\n" } else { "" };
        format!(
            "admin: {{address: \"127.0.0.1:0\"}}\ndrain_timeout: 1s\nlisteners:\n  - {{name: keep, address: \"127.0.0.1:0\", cluster: back}}\n{old}clusters:\n  - {{name: back, endpoints: [\"{}\"]}}\n",
            upstream.addr
        )
    };
    let proxy = TestProxy::start(&config(true)).await;
    let old_addr = proxy.addr("old").await;
    let mut open = TcpStream::connect(old_addr).await.unwrap();
    echo_once(&mut open, b"before").await.unwrap();

    proxy.replace_config(&config(false));
    let (status, body) = proxy.post("/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(TcpStream::connect(old_addr).await.is_err(), "a removed listener must refuse new connections");
    // The open connection keeps working until the drain deadline...
    echo_once(&mut open, b"during drain").await.unwrap();
    // ...and is closed when it passes.
    expect_closed(&mut open, Duration::from_secs(3)).await;
    proxy.stop().await;
}

#[tokio::test]
async fn renaming_a_listener_keeps_its_socket_and_connections() {
    let upstream = Upstream::echo().await;
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let config = |name: &str| {
        format!(
            "admin: {{address: \"127.0.0.1:0\"}}\nlisteners:\n  - {{name: {name}, address: \"127.0.0.1:{port}\", cluster: back}}\nclusters:\n  - {{name: back, endpoints: [\"{}\"]}}\n",
            upstream.addr
        )
    };
    let proxy = TestProxy::start(&config("before")).await;
    let addr = proxy.addr("before").await;
    let mut open = TcpStream::connect(addr).await.unwrap();
    echo_once(&mut open, b"1").await.unwrap();
    proxy.replace_config(&config("after"));
    assert_eq!(proxy.post("/reload").await.0, 200);
    assert_eq!(proxy.addr("after").await, addr);
    echo_once(&mut open, b"2").await.unwrap();
    let mut fresh = TcpStream::connect(addr).await.unwrap();
    echo_once(&mut fresh, b"3").await.unwrap();
    eventually(Duration::from_secs(2), "metrics under the new name", || async {
        proxy.metric("keel_listener_downstream_connections_total{listener=\"after\"}").await == 1.0
    })
    .await;
    drop((open, fresh));
    proxy.stop().await;
}

#[tokio::test]
async fn the_watcher_applies_a_file_replaced_by_rename() {
    let upstream = Upstream::echo().await;
    let tagged = Upstream::tagged("extra").await;
    let proxy = TestProxy::start(&two_cluster_config(upstream.addr, tagged.addr, false, "1h")).await;
    proxy.replace_config(&two_cluster_config(upstream.addr, tagged.addr, true, "1h"));
    eventually(Duration::from_secs(5), "the watcher to add the listener", || async {
        proxy.proxy.listener_addr("extra").await.is_some()
    })
    .await;
    assert_eq!(read_all(proxy.addr("extra").await).await, "extra");
    // An invalid file is reported once and changes nothing.
    proxy.replace_config("listeners: 7\n");
    eventually(Duration::from_secs(5), "the watcher to reject the file", || async {
        proxy.proxy.last_rejected().is_some()
    })
    .await;
    assert!(proxy.proxy.listener_addr("extra").await.is_some());
    let failures = "keel_config_reload_failures_total{source=\"file\"}";
    assert_eq!(proxy.metric(failures).await, 1.0);
    proxy.replace_config("listeners: 7\n");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(proxy.metric(failures).await, 1.0, "the same invalid text is not reported again");
    proxy.stop().await;
}

#[tokio::test]
async fn the_watcher_follows_a_kubernetes_configmap_symlink_swap() {
    // The layout kubelet writes: keel.yaml -> ..data/keel.yaml, ..data -> ..<timestamp>/
    let upstream = Upstream::echo().await;
    let tagged = Upstream::tagged("extra").await;
    let dir = tempfile::tempdir().unwrap();
    let write_generation = |name: &str, config: &str| {
        let generation = dir.path().join(name);
        std::fs::create_dir(&generation).unwrap();
        std::fs::write(generation.join("keel.yaml"), config).unwrap();
        let link = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(name, &link).unwrap();
        std::fs::rename(&link, dir.path().join("..data")).unwrap();
    };
    write_generation("..2026_11_21_1", &two_cluster_config(upstream.addr, tagged.addr, false, "1h"));
    let config_path = dir.path().join("keel.yaml");
    std::os::unix::fs::symlink("..data/keel.yaml", &config_path).unwrap();
    let proxy = TestProxy::start_at(dir, config_path).await;
    assert!(proxy.proxy.listener_addr("extra").await.is_none());

    let dir = proxy.dir.path().to_path_buf();
    let generation = dir.join("..2026_11_21_2");
    std::fs::create_dir(&generation).unwrap();
    std::fs::write(generation.join("keel.yaml"), two_cluster_config(upstream.addr, tagged.addr, true, "1h"))
        .unwrap();
    std::os::unix::fs::symlink("..2026_11_21_2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    eventually(Duration::from_secs(5), "the watcher to follow the symlink swap", || async {
        proxy.proxy.listener_addr("extra").await.is_some()
    })
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_changed_cluster_takes_effect_for_new_connections_only() {
    let a = Upstream::tagged_holding("a").await;
    let b = Upstream::tagged_holding("b").await;
    let config = |endpoint: SocketAddr| {
        format!(
            "admin: {{address: \"127.0.0.1:0\"}}\nlisteners:\n  - {{name: front, address: \"127.0.0.1:0\", cluster: back}}\nclusters:\n  - {{name: back, endpoints: [\"{endpoint}\"]}}\n"
        )
    };
    let proxy = TestProxy::start(&config(a.addr)).await;
    let front = proxy.addr("front").await;
    let first_byte = |mut stream: TcpStream| async move {
        let mut tag = [0u8; 1];
        stream.read_exact(&mut tag).await.unwrap();
        (tag[0], stream)
    };
    let (tag, on_a) = first_byte(TcpStream::connect(front).await.unwrap()).await;
    assert_eq!(tag, b'a');

    proxy.replace_config(&config(b.addr));
    assert_eq!(proxy.post("/reload").await.0, 200);
    let (tag, on_b) = first_byte(TcpStream::connect(front).await.unwrap()).await;
    assert_eq!(tag, b'b');
    // The connection made before the reload is still open, to a.
    let mut on_a = on_a;
    let mut buffer = [0u8; 1];
    let still_open = tokio::time::timeout(Duration::from_millis(200), on_a.read(&mut buffer)).await;
    assert!(still_open.is_err(), "the old connection should still be open and quiet");
    drop((on_a, on_b));
    proxy.stop().await;
}

/// Two ports the kernel hands out, released again for the test to bind by number.
async fn two_free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = TcpListener::bind("127.0.0.1:0").await.unwrap();
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

#[tokio::test]
async fn listeners_swapping_names_keep_both_sockets() {
    let upstream = Upstream::echo().await;
    let (p1, p2) = two_free_ports().await;
    let config = |first: &str, second: &str| {
        format!(
            "admin: {{address: \"127.0.0.1:0\"}}\nlisteners:\n  - {{name: {first}, address: \"127.0.0.1:{p1}\", cluster: back}}\n  - {{name: {second}, address: \"127.0.0.1:{p2}\", cluster: back}}\nclusters:\n  - {{name: back, endpoints: [\"{}\"]}}\n",
            upstream.addr
        )
    };
    let proxy = TestProxy::start(&config("a", "b")).await;
    let mut on_p1 = TcpStream::connect(proxy.addr("a").await).await.unwrap();
    proxy.replace_config(&config("b", "a"));
    assert_eq!(proxy.post("/reload").await.0, 200);
    assert_eq!(proxy.addr("b").await.port(), p1);
    assert_eq!(proxy.addr("a").await.port(), p2);
    assert_eq!(proxy.proxy.listeners().await.len(), 2);
    echo_once(&mut on_p1, b"kept").await.unwrap();
    for port in [p1, p2] {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        echo_once(&mut stream, b"both sockets accept").await.unwrap();
    }
    drop(on_p1);
    proxy.stop().await;
}

#[tokio::test]
async fn a_rename_onto_a_removed_listeners_name_drains_the_right_socket() {
    let upstream = Upstream::echo().await;
    let (p1, p2) = two_free_ports().await;
    let addr = upstream.addr;
    let before = format!(
        "admin: {{address: \"127.0.0.1:0\"}}\nlisteners:\n  - {{name: a, address: \"127.0.0.1:{p1}\", cluster: back}}\n  - {{name: b, address: \"127.0.0.1:{p2}\", cluster: back}}\nclusters:\n  - {{name: back, endpoints: [\"{addr}\"]}}\n"
    );
    let after = format!(
        "admin: {{address: \"127.0.0.1:0\"}}\ndrain_timeout: 1s\nlisteners:\n  - {{name: b, address: \"127.0.0.1:{p1}\", cluster: back}}\nclusters:\n  - {{name: back, endpoints: [\"{addr}\"]}}\n"
    );
    let proxy = TestProxy::start(&before).await;
    proxy.replace_config(&after);
    assert_eq!(proxy.post("/reload").await.0, 200);
    assert_eq!(proxy.addr("b").await.port(), p1);
    assert_eq!(proxy.proxy.listeners().await.len(), 1);
    let mut kept = TcpStream::connect(("127.0.0.1", p1)).await.unwrap();
    echo_once(&mut kept, b"p1 stays").await.unwrap();
    eventually(Duration::from_secs(2), "p2 to stop accepting", || async {
        TcpStream::connect(("127.0.0.1", p2)).await.is_err()
    })
    .await;
    drop(kept);
    proxy.stop().await;
}
