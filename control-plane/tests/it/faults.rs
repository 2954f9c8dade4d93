//! Faults: the control plane killed with SIGKILL in the middle of writes and of snapshot pushes. The
//! database opens clean, no acknowledged write is lost, the proxy keeps serving its last config while the
//! control plane is gone, and converges on everything the store holds when it returns.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const V1: &str = "/apis/edge.example.com/v1";

/// `wrapper` (a `Command` that ends by running its last arguments) running the `control-plane` binary on
/// `listen` and `database`, with the test's tokens; without a wrapper, the binary itself.
fn control_plane(wrapper: Option<Command>, database: &Path, listen: SocketAddr) -> Command {
    let binary = env!("CARGO_BIN_EXE_control-plane");
    let mut command = match wrapper {
        Some(mut wrapper) => {
            wrapper.arg(binary);
            wrapper
        }
        None => Command::new(binary),
    };
    command
        .args(["--listen", &listen.to_string(), "--database", database.to_str().unwrap()])
        .env("KEEL_CP_OPERATOR_TOKENS", OPERATOR)
        .env("KEEL_CP_PROXY_TOKENS", PROXY)
        .stdout(Stdio::null());
    command
}

/// Waits until something listens on `listen`.
fn wait_listening(listen: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(listen).is_err() {
        assert!(Instant::now() < deadline, "the control plane did not listen on {listen}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `control-plane` binary on `listen`, with the test's tokens; returns it once it serves.
fn spawn_control_plane(database: &Path, listen: SocketAddr) -> Running {
    let child = control_plane(None, database, listen).env("KEEL_LOG", "warn").spawn().unwrap();
    wait_listening(listen);
    Running(child)
}

/// `sh -c SCRIPT` in a mount namespace of its own, with `directory` as `$1` and the control plane's
/// command line after it (the script ends with `shift && exec "$@"`).
fn in_mount_namespace(script: &str, directory: &Path) -> Command {
    let mut command = Command::new("unshare");
    command.args(["--mount", "--propagation", "private", "sh", "-c", script, "sh"]).arg(directory);
    command
}

/// The control plane's process, killed if the test ends early (it holds the test's standard error open).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigkill(running: &mut Running) {
    running.0.kill().unwrap();
    running.0.wait().unwrap();
}

/// A write that may meet a dead control plane: the status, or None when there was no answer.
async fn try_write(addr: SocketAddr, path: &str, body: &Value) -> Option<u16> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let body = body.to_string();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {OPERATOR}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let response = String::from_utf8_lossy(&response);
        response.split(' ').nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), attempt).await.ok().flatten()
}

fn listener(name: &str) -> Value {
    json!({"apiVersion": "edge.example.com/v1", "kind": "Listener", "metadata": {"name": name},
           "spec": {"address": "127.0.0.1:0", "cluster": "echo", "node_selector": {"app": "web"}}})
}

/// Writes listener `name` through the control plane at `listen`: the status and the answer.
async fn post_listener(listen: SocketAddr, name: &str) -> (u16, Value) {
    operator(listen, "POST", &format!("{V1}/listeners"), Some(&listener(name))).await
}

/// Through the control plane at `listen`: an echo cluster and listener `name` for app=web nodes, and a
/// proxy (node-a, app=web) following it, once it runs that listener; the proxy and the listener's address.
async fn relaying(dir: &Path, listen: SocketAddr, name: &str) -> (keel_proxy::Proxy, SocketAddr) {
    let cluster = json!({"apiVersion": "edge.example.com/v1", "kind": "Cluster", "metadata": {"name": "echo"},
                         "spec": {"endpoints": [echo().await.to_string()], "node_selector": {"app": "web"}}});
    assert_eq!(try_write(listen, &format!("{V1}/clusters"), &cluster).await, Some(201));
    assert_eq!(try_write(listen, &format!("{V1}/listeners"), &listener(name)).await, Some(201));
    let proxy = start_proxy(dir, "node-a", &[("app", "web")], listen).await;
    eventually("the first listener", || async { proxy.listener_addr(name).await.is_some() }).await;
    let address = proxy.listener_addr(name).await.unwrap();
    (proxy, address)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_writes_and_pushes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let database = database(&dir);
    let listen = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let mut cp = spawn_control_plane(&database, listen);

    // A proxy following it, relaying one listener.
    let (proxy, first) = relaying(dir.path(), listen, "first").await;

    // Writers create listeners the proxy gets (each write is also a push) as fast as they are answered;
    // the control plane is killed in the middle.
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for index in 0.. {
                    let name = format!("w{writer}-{index}");
                    match try_write(listen, &format!("{V1}/listeners"), &listener(&name)).await {
                        Some(201) => acknowledged.push(name),
                        Some(status) => panic!("{name}: {status}"),
                        None => break,
                    }
                }
                acknowledged
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    sigkill(&mut cp);
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    assert!(acknowledged.len() > 20, "only {} writes before the kill", acknowledged.len());

    // Gone: the proxy keeps serving what it runs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(proxy.listener_addr("first").await, Some(first));
    assert!(round_trip(first).await);

    // Back on the same address and database: it opens clean and holds every acknowledged write.
    let restarted = Instant::now();
    let mut cp = spawn_control_plane(&database, listen);
    let (status, list) = operator(listen, "GET", &format!("{V1}/listeners"), None).await;
    assert_eq!(status, 200, "{list}");
    let stored: std::collections::BTreeSet<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    let lost: Vec<&String> = acknowledged.iter().filter(|name| !stored.contains(*name)).collect();
    assert!(lost.is_empty(), "acknowledged but lost after SIGKILL: {lost:?}");

    // The proxy resyncs to exactly what the store holds (acknowledged writes, and any committed just
    // before the kill whose answer never left), without disturbing the listener it kept running.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running: std::collections::BTreeSet<String> =
            proxy.listeners().await.into_iter().map(|listener| listener.name).collect();
        if running == stored {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy runs {} listeners, the store has {}",
            running.len(),
            stored.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Reconnect backoff is at most 800 ms; the resync is one snapshot.
    let resync = restarted.elapsed();
    eprintln!(
        "SIGKILL after {} acknowledged writes ({} stored): none lost; the proxy resynced {resync:?} after the restart",
        acknowledged.len(),
        stored.len()
    );
    assert!(resync < Duration::from_secs(3), "resync took {resync:?}");
    assert_eq!(proxy.listener_addr("first").await, Some(first), "the running listener kept its socket");
    assert!(round_trip(first).await);
    eventually("the proxy's ACK of the resynced snapshot", || async {
        let (_, proxies) = operator(listen, "GET", "/debug/proxies", None).await;
        let record = &proxies["proxies"][0];
        record["ackedVersion"] == record["sentVersion"]
    })
    .await;

    stop_proxy(&proxy).await;
    sigkill(&mut cp);
}

/// The `control-plane` binary in a mount namespace of its own, with its database on a 4 MiB tmpfs that
/// only it sees, which the test fills from inside the namespace (nsenter). Needs root (CI runs as
/// root); elsewhere the test says why it did not run.
struct OnSmallDisk {
    running: Running,
    directory: std::path::PathBuf,
}

impl OnSmallDisk {
    fn spawn(directory: &Path, listen: SocketAddr) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var_os("CI").is_none(), "CI must run the storage fault test: needs root");
            eprintln!("skipping the storage fault test: it needs root (a tmpfs in a mount namespace)");
            return None;
        }
        let script = r#"mount -t tmpfs -o size=4m keel-test "$1" && shift && exec "$@""#;
        let wrapper = in_mount_namespace(script, directory);
        let child = control_plane(Some(wrapper), &directory.join("cp.db"), listen)
            .env("KEEL_LOG", "off")
            .spawn()
            .unwrap();
        let running = Running(child);
        wait_listening(listen);
        Some(Self { running, directory: directory.to_path_buf() })
    }

    /// Runs `script` (sh, `$1` is the database's directory) in the control plane's mount namespace.
    fn inside(&self, script: &str) {
        let output = Command::new("nsenter")
            .args(["--target", &self.running.0.id().to_string(), "--mount", "sh", "-c", script, "sh"])
            .arg(&self.directory)
            .output()
            .unwrap();
        assert!(output.status.success(), "{script}: {}", String::from_utf8_lossy(&output.stderr));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_clearly_and_proxies_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let Some(cp) = OnSmallDisk::spawn(dir.path(), listen) else { return };
    let (proxy, first) = relaying(dir.path(), listen, "first").await;

    // Full: every write is refused with 507 and says why; reads, the stream and the proxy go on.
    cp.inside(r#"dd if=/dev/zero of="$1/filler" bs=64k 2>/dev/null; test -s "$1/filler""#);
    for attempt in 0..3 {
        let name = format!("while-full-{attempt}");
        let (status, answer) = post_listener(listen, &name).await;
        assert_eq!(status, 507, "{answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains("disk is full") && message.contains("nothing was changed"), "{message}");
        assert_eq!(answer["reason"], "InsufficientStorage");
    }
    let (status, list) = operator(listen, "GET", &format!("{V1}/listeners"), None).await;
    assert_eq!((status, list["items"].as_array().unwrap().len()), (200, 1), "{list}");
    assert!(round_trip(first).await);

    // Space again: the next write lands and reaches the proxy.
    cp.inside(r#"rm "$1/filler""#);
    let (status, answer) = post_listener(listen, "after-full").await;
    assert_eq!(status, 201, "{answer}");
    eventually("the listener written after the disk was freed", || async {
        proxy.listener_addr("after-full").await.is_some()
    })
    .await;

    let (_, list) = operator(listen, "GET", &format!("{V1}/listeners"), None).await;
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["after-full", "first"]);

    stop_proxy(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_is_served_writes_are_refused_and_proxies_keep_serving() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var_os("CI").is_none(), "CI must run the storage fault test: needs root");
        eprintln!("skipping the read-only database test: it needs root (a read-only bind mount)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let database = database(&dir);
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut cp = spawn_control_plane(&database, listen);
    let (proxy, first) = relaying(dir.path(), listen, "first").await;
    sigkill(&mut cp);

    // The database's directory read-only (a bind mount of it, in a mount namespace of its own): the
    // control plane starts, says so, serves what it holds (the proxy resyncs from it) and refuses every
    // write with 503 and why; the proxy serves on throughout.
    let script = r#"mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@""#;
    let mut read_only = Running(
        control_plane(Some(in_mount_namespace(script, dir.path())), &database, listen)
            .env("KEEL_LOG", "error")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_listening(listen);
    let (status, list) = operator(listen, "GET", &format!("{V1}/listeners"), None).await;
    assert_eq!((status, list["items"].as_array().unwrap().len()), (200, 1), "{list}");
    let (status, answer) = post_listener(listen, "refused").await;
    assert_eq!(status, 503, "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains("cannot be written") && message.contains("nothing was changed"), "{message}");
    assert!(round_trip(first).await);
    eventually("the proxy's ACK from the read-only control plane", || async {
        let (_, proxies) = operator(listen, "GET", "/debug/proxies", None).await;
        proxies["proxies"][0]["connected"] == true
    })
    .await;
    sigkill(&mut read_only);
    let mut said = String::new();
    std::io::Read::read_to_string(&mut read_only.0.stderr.take().unwrap(), &mut said).unwrap();
    assert!(
        said.contains("the database is read-only") && said.contains(database.to_str().unwrap()),
        "{said}"
    );

    // Writable again: it starts with what it held, and the proxy resyncs.
    let mut cp = spawn_control_plane(&database, listen);
    let (status, answer) = post_listener(listen, "second").await;
    assert_eq!(status, 201, "{answer}");
    eventually("the listener written after the restart", || async {
        proxy.listener_addr("second").await.is_some()
    })
    .await;
    assert_eq!(proxy.listener_addr("first").await, Some(first));

    stop_proxy(&proxy).await;
    sigkill(&mut cp);
}

/// Snapshot pushes at a high rate under live traffic: 20 connections echo through a listener the
/// control plane gave the proxy while writers create, change and delete other listeners and clusters as
/// fast as the API answers. No established connection fails, and the proxy ends on the last snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_pushes_drops_no_established_connection() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&database(&dir)).await;
    let listen = cp.local_addr;
    let (proxy, steady) = relaying(dir.path(), listen, "steady").await;

    let running = Arc::new(AtomicBool::new(true));
    let echoes = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..20)
        .map(|client| {
            let (running, echoes) = (Arc::clone(&running), Arc::clone(&echoes));
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(steady).await.unwrap();
                let mut round = 0u64;
                while running.load(Ordering::Relaxed) {
                    let message = format!("client {client} round {round}");
                    stream.write_all(message.as_bytes()).await.unwrap_or_else(|e| panic!("{message}: {e}"));
                    let mut back = vec![0u8; message.len()];
                    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
                        .await
                        .unwrap_or_else(|_| panic!("{message}: no echo within 5 s"))
                        .unwrap_or_else(|e| panic!("{message}: {e}"));
                    assert_eq!(back, message.as_bytes());
                    round += 1;
                    echoes.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    // Writers: each write is a new snapshot for the proxy.
    let started = Instant::now();
    let mut writes = 0u32;
    for round in 0..100 {
        let name = format!("churn-{round}");
        assert_eq!(post_listener(listen, &name).await.0, 201);
        let patch = json!({"spec": {"idle_timeout": format!("{}s", 60 + round)}});
        assert_eq!(operator(listen, "PATCH", &format!("{V1}/listeners/{name}"), Some(&patch)).await.0, 200);
        assert_eq!(operator(listen, "DELETE", &format!("{V1}/listeners/{name}"), None).await.0, 200);
        writes += 3;
    }
    let storm = started.elapsed();
    let last = json!({"apiVersion": "edge.example.com/v1", "kind": "Listener", "metadata": {"name": "last"},
                      "spec": {"address": "127.0.0.1:0", "cluster": "echo", "node_selector": {"app": "web"}}});
    assert_eq!(operator(listen, "POST", &format!("{V1}/listeners"), Some(&last)).await.0, 201);
    eventually("the proxy on the last snapshot", || async {
        let mut names: Vec<String> =
            proxy.listeners().await.into_iter().map(|listener| listener.name).collect();
        names.sort();
        names == ["last", "steady"]
    })
    .await;
    running.store(false, Ordering::Relaxed);
    for client in clients {
        client.await.expect("an established connection failed during the storm");
    }
    let (_, proxies) = operator(listen, "GET", "/debug/proxies", None).await;
    eprintln!(
        "push storm: {writes} writes in {storm:?} ({:.0}/s), {} snapshots pushed and applied; 20 connections echoed {} times, none failed",
        f64::from(writes) / storm.as_secs_f64(),
        proxies["proxies"][0]["snapshotsSent"],
        echoes.load(Ordering::Relaxed)
    );
    assert_eq!(proxy.listener_addr("steady").await, Some(steady), "the steady listener kept its socket");
    stop_proxy(&proxy).await;
    cp.stop().await;
}
