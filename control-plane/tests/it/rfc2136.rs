//! DNS records following reported addresses, against a real BIND (`named`) that the test starts: the
//! zone changes and is verified; an update made while BIND is down arrives when it is back; an update
//! pending when the control plane stops is made after it restarts; a wrong key is reported, not lost.
//!
//! Needs `named` (Debian package bind9; `.ci/install-test-deps` installs it). Elsewhere the test says
//! why it did not run, unless `CI` is set, where not running is a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::*;
use serde_json::{Value, json};

/// `keel`'s TSIG secret (base64 of 32 bytes), as `tsig-keygen` would print it.
const SECRET: &str = "a2VlbC10ZXN0LWtleS0zMi1ieXRlcy1sb25nLi4uLi4=";
const OTHER_SECRET: &str = "b3RoZXItdGVzdC1rZXktMzItYnl0ZXMtbG9uZy4uLi4=";
const V1: &str = "/apis/edge.example.com/v1";

fn named_binary() -> Option<PathBuf> {
    ["/usr/sbin/named", "/usr/bin/named"].into_iter().map(PathBuf::from).find(|path| path.exists())
}

fn can_run() -> bool {
    if named_binary().is_some() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the BIND test: install bind9 (.ci/install-test-deps)"
    );
    eprintln!("skipping the BIND test: named is not installed (run .ci/install-test-deps)");
    false
}

/// A BIND serving `example.test` on 127.0.0.1:`port`, accepting updates signed with key `keel`.
struct Bind {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Bind {
    fn configure(dir: &Path, port: u16) -> Bind {
        let config = format!(
            r#"options {{
    directory "{dir}";
    pid-file "{dir}/named.pid";
    session-keyfile "{dir}/session.key";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
}};
controls {{ }};
key "keel" {{ algorithm hmac-sha256; secret "{SECRET}"; }};
zone "example.test" {{ type primary; file "{dir}/example.test.zone"; allow-update {{ key "keel"; }}; }};
"#,
            dir = dir.display()
        );
        std::fs::write(dir.join("named.conf"), config).unwrap();
        let zone = "$TTL 300\n@ IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 300\n@ IN NS ns.example.test.\nns IN A 127.0.0.1\n";
        std::fs::write(dir.join("example.test.zone"), zone).unwrap();
        Bind { dir: dir.to_path_buf(), port, child: None }
    }

    /// A started BIND in `dir`, and the file holding the key's secret.
    async fn running(dir: &Path) -> (Bind, PathBuf) {
        let mut bind = Bind::configure(dir, free_port());
        bind.start().await;
        let secret_file = dir.join("tsig.secret");
        std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
        (bind, secret_file)
    }

    async fn start(&mut self) {
        let child = Command::new(named_binary().unwrap())
            .args(["-g", "-c"])
            .arg(self.dir.join("named.conf"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("named.log")).unwrap())
            .spawn()
            .expect("start named");
        self.child = Some(child);
        let address = format!("127.0.0.1:{}", self.port);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(&address).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "named did not start: {}",
            std::fs::read_to_string(self.dir.join("named.log")).unwrap_or_default()
        );
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What BIND answers for gw.example.test AAAA, through dig.
    fn lookup(&self) -> String {
        let output = Command::new("dig")
            .args(["@127.0.0.1", "-p", &self.port.to_string(), "+short", "+tcp", "gw.example.test", "AAAA"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn record_status(cp: std::net::SocketAddr) -> Value {
    operator(cp, "GET", &format!("{V1}/dnsrecords/gw"), None).await.1["status"].clone()
}

async fn eventually_long(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn records_follow_reported_addresses_through_bind_and_no_update_is_lost() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut bind, secret_file) = Bind::running(dir.path()).await;

    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cp = keel_control_plane::ControlPlane::start(settings(&database(&dir), listen)).await.unwrap();
    let provider = json!({
        "apiVersion": "edge.example.com/v1", "kind": "DnsProvider", "metadata": {"name": "bind"},
        "spec": {"rfc2136": {"server": format!("127.0.0.1:{}", bind.port), "key_name": "keel", "secret_file": secret_file.display().to_string()}}
    });
    assert_eq!(operator(listen, "POST", &format!("{V1}/dnsproviders"), Some(&provider)).await.0, 201);
    let record = json!({
        "apiVersion": "edge.example.com/v1", "kind": "DnsRecord", "metadata": {"name": "gw"},
        "spec": {"zone": "example.test", "name": "gw", "type": "AAAA", "ttl": "60s", "address_from": {"node": "gw-1"}, "provider": "bind"}
    });
    let (status, body) = operator(listen, "POST", &format!("{V1}/dnsrecords"), Some(&record)).await;
    assert_eq!(status, 201, "{body}");

    // A report changes the zone, verified: the record's status says so, and dig agrees.
    report_address(listen, "2001:db8::1").await;
    eventually_long("the first update", async || bind.lookup() == "2001:db8::1").await;
    eventually_long("the status", async || record_status(listen).await["inSync"] == true).await;
    let status = record_status(listen).await;
    assert_eq!(status["observed"], json!(["2001:db8::1"]));
    assert!(status["lastSuccess"].is_string());

    // Seed 001's views: /raw, the page, and the metrics (checked by a real promtool).
    let (_, raw) = operator(listen, "GET", "/raw", None).await;
    assert_eq!(raw["records"][0]["fqdn"], "gw.example.test.");
    assert_eq!(raw["records"][0]["status"]["inSync"], true);
    assert_eq!(raw["addresses"][0], json!({"node": "gw-1", "address": "2001:db8::1"}));
    let (status, page) = operator(listen, "GET", "/", None).await;
    let page = page.as_str().unwrap().to_string();
    assert_eq!(status, 200);
    assert!(page.contains("<td>gw.example.test.</td>") && page.contains("in sync"), "{page}");
    let (_, metrics) = operator(listen, "GET", "/metrics", None).await;
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(metrics.contains("keel_ddns_updates_total{record=\"gw\"} 1\n"), "{metrics}");
    assert!(metrics.contains("keel_ddns_record_in_sync{record=\"gw\"} 1\n"), "{metrics}");
    promtool_check(&metrics);

    // BIND down: the update fails, is kept, and arrives once BIND is back.
    bind.stop();
    report_address(listen, "2001:db8::2").await;
    eventually_long("the failure in the status", async || {
        let status = record_status(listen).await;
        status["inSync"] == false && status["lastError"].as_str().is_some_and(|e| e.contains("cannot reach"))
    })
    .await;
    bind.start().await;
    eventually_long("the update after BIND's return", async || bind.lookup() == "2001:db8::2").await;

    // Pending when the control plane stops: made after it restarts.
    bind.stop();
    report_address(listen, "2001:db8::3").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cp.stop().await;
    bind.start().await;
    let cp = keel_control_plane::ControlPlane::start(settings(&database(&dir), listen)).await.unwrap();
    eventually_long("the pending update after the restart", async || bind.lookup() == "2001:db8::3").await;

    // A wrong key: refused by BIND, reported in the status, kept for a retry.
    std::fs::write(&secret_file, format!("{OTHER_SECRET}\n")).unwrap();
    report_address(listen, "2001:db8::4").await;
    eventually_long("the refusal in the status", async || {
        record_status(listen).await["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("NOTAUTH") || e.contains("signature"))
    })
    .await;
    assert_eq!(bind.lookup(), "2001:db8::3");
    // The right key again: the kept update goes through.
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    eventually_long("the update with the right key", async || bind.lookup() == "2001:db8::4").await;
    cp.stop().await;
}

/// Seed 001's split: one detector reports the address to the control plane; a follower reads it from
/// there (long poll) and changes the zone itself, straight through RFC 2136, with no DnsRecord in the
/// control plane. A new detection reaches BIND through the follower within a second.
#[tokio::test]
async fn a_follower_takes_the_detected_address_from_the_control_plane_to_bind() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (bind, secret_file) = Bind::running(dir.path()).await;
    let cp = start(&database(&dir)).await;
    let listen = cp.local_addr;

    let text = format!(
        r#"reporters:
  - name: follow-detector
    source: {{control_plane: {{url: "http://{listen}", token: {PROXY}, node: gw-1, family: ipv6}}}}
    sink:
      dns:
        zone: example.test
        name: gw
        ttl: 60s
        provider: {{rfc2136: {{server: "127.0.0.1:{port}", key_name: keel, secret_file: "{secret}"}}}}
    interval: 60s
"#,
        port = bind.port,
        secret = secret_file.display()
    );
    let env = keel_schemas::MapEnvironment::default().with_file(secret_file.to_str().unwrap(), SECRET);
    let config = keel_schemas::load(&text, "follower.yaml", &env).unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let metrics = std::sync::Arc::new(keel_proxy::metrics::Metrics::new());
    tokio::spawn(keel_proxy::reporter::run(
        config.reporters[0].clone(),
        "edge-2".into(),
        metrics,
        stop.clone(),
    ));

    // Nothing detected yet: the follower waits (its long poll is held), BIND has nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bind.lookup(), "");

    report_address(listen, "2001:db8::71").await;
    eventually_long("the first detection in BIND", async || bind.lookup() == "2001:db8::71").await;
    for (i, address) in ["2001:db8::72", "2001:db8::73"].into_iter().enumerate() {
        let started = std::time::Instant::now();
        report_address(listen, address).await;
        eventually_long("the new detection in BIND", async || bind.lookup() == address).await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "change {i} took {took:?}: the long poll should carry it");
    }
    // The follower's own report went to BIND only: the control plane holds just the detector's.
    let (_, addresses) = call(listen, "GET", "/api/v1/public-ip", Some(OPERATOR), None).await;
    let nodes: Vec<&str> =
        addresses["nodes"].as_array().unwrap().iter().map(|n| n["node"].as_str().unwrap()).collect();
    assert_eq!(nodes, ["gw-1"]);
    stop.cancel();
    cp.stop().await;
}
