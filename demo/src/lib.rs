//! Keel's first run: a whole deployment in one process, on loopback addresses and unprivileged ports.
//!
//! - a control plane on SQLite (a file in the demo's directory);
//! - three proxies that follow it, each with its own admin API and metrics: `demo-router` (the tunnel
//!   router), `demo-publisher` (offers the local `web` service through the router) and `demo-sidecar`
//!   (a pod's sidecar: its DNS answers `web.demo.svc.cluster.local` with a VIP, and its visitor listens
//!   on that VIP and reaches `web` through the tunnel);
//! - `web`, a small HTTP service standing in for an application on the publisher's node.
//!
//! The proxies start with bootstrap configs only (who they are, their admin API, the control plane's
//! address); everything else is created through the control plane's REST API, as an operator would with
//! curl, and reaches them as snapshots. [`Demo::check`] then does what a user would: resolve the name,
//! and send a request to the VIP.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ipnet::Ipv4Net;
use keel_control_plane::{ControlPlane, Settings, auth::Tokens};
use keel_proxy::{ProcessEnvironment, Proxy, Shutdown};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// The REST API's group and version.
const API: &str = "/apis/edge.example.com/v1";
/// The DNS namespace of the demo's service: its names are `web.demo.svc.cluster.local` and shorter.
pub const NAMESPACE: &str = "demo";
/// The service published through the tunnel.
pub const SERVICE: &str = "web";
/// The port the sidecar's visitor listens on, at the service's VIP.
pub const VISIT_PORT: u16 = 8080;
/// How long [`Demo::check`] waits for the snapshots to arrive and the tunnel to carry a request.
const CHECK_DEADLINE: Duration = Duration::from_secs(20);
/// How long the proxies get to drain at exit.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// Where everything listens: `host` and fixed offsets from `base_port`, so the commands the demo prints
/// are the same at every run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub host: IpAddr,
    pub base_port: u16,
    /// VIPs for the sidecar's service names (a loopback range: every 127/8 address is local on Linux).
    pub vip_range: Ipv4Net,
    /// Where the sidecar's DNS forwards names it does not answer itself; none: those are REFUSED.
    pub dns_upstreams: Vec<SocketAddr>,
}

/// The three proxies of the demo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Router,
    Publisher,
    Sidecar,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Router, Role::Publisher, Role::Sidecar];

    /// The node id, which is also the `role` label resources select on.
    pub fn node(self) -> &'static str {
        match self {
            Role::Router => "demo-router",
            Role::Publisher => "demo-publisher",
            Role::Sidecar => "demo-sidecar",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Role::Router => "router",
            Role::Publisher => "publisher",
            Role::Sidecar => "sidecar",
        }
    }

    fn admin_offset(self) -> u16 {
        match self {
            Role::Router => 901,
            Role::Publisher => 902,
            Role::Sidecar => 903,
        }
    }
}

impl Plan {
    /// Checks that every address is loopback and every port unprivileged and in range.
    pub fn check(&self) -> anyhow::Result<()> {
        if !self.host.is_loopback() {
            bail!("--host {} is not a loopback address: the demo listens on loopback only", self.host);
        }
        if !self.vip_range.network().is_loopback() {
            bail!("--vip-range {} is not in 127.0.0.0/8", self.vip_range);
        }
        if self.vip_range.prefix_len() > 30 {
            bail!("--vip-range {} is too small for a VIP", self.vip_range);
        }
        if self.base_port < 1024 || self.base_port > u16::MAX - 1000 {
            bail!("--base-port {} must be between 1024 and {}", self.base_port, u16::MAX - 1000);
        }
        Ok(())
    }

    fn at(&self, offset: u16) -> SocketAddr {
        SocketAddr::new(self.host, self.base_port + offset)
    }

    pub fn control_plane(&self) -> SocketAddr {
        self.at(80)
    }

    /// The `web` service, on the publisher's node.
    pub fn web(&self) -> SocketAddr {
        self.at(81)
    }

    /// The router's tunnel port.
    pub fn router(&self) -> SocketAddr {
        self.at(70)
    }

    /// The sidecar's DNS server (UDP and TCP).
    pub fn dns(&self) -> SocketAddr {
        self.at(53)
    }

    pub fn admin(&self, role: Role) -> SocketAddr {
        self.at(role.admin_offset())
    }
}

/// The fully qualified name the sidecar answers for the demo's service.
pub fn service_name() -> String {
    format!("{SERVICE}.{NAMESPACE}.svc.cluster.local")
}

/// What [`Demo::check`] saw.
#[derive(Debug)]
pub struct Checked {
    /// The VIP the sidecar's DNS answered.
    pub vip: Ipv4Addr,
    /// The body `web` sent back through the tunnel.
    pub body: String,
    /// From the first write to the control plane to the first answer through the tunnel.
    pub elapsed: Duration,
}

/// A running demo.
#[derive(Debug)]
pub struct Demo {
    pub plan: Plan,
    control_plane: ControlPlane,
    proxies: Vec<(Role, Proxy, JoinHandle<std::io::Result<()>>)>,
    web: JoinHandle<()>,
    configured_at: Instant,
}

impl Demo {
    /// Starts the control plane, `web` and the three proxies, and creates the resources that connect
    /// them. Files (the database, secrets, snapshot caches) go in `dir`.
    pub async fn start(plan: Plan, dir: &Path) -> anyhow::Result<Self> {
        plan.check()?;
        let web = serve_web(plan.web()).await?;
        // Loopback only: the demo's REST API and stream are open to local users, as `control-plane`
        // allows without tokens on a loopback address.
        let tokens = Tokens::new(Vec::new(), Vec::new());
        let control_plane =
            ControlPlane::start(Settings::new(plan.control_plane(), dir.join("keel.db"), tokens))
                .await
                .with_context(|| format!("cannot start the control plane on {}", plan.control_plane()))?;

        let mut proxies = Vec::new();
        for role in Role::ALL {
            let proxy = start_proxy(&plan, role, dir)
                .await
                .with_context(|| format!("cannot start {}", role.node()))?;
            proxies.push(proxy);
        }
        let configured_at = Instant::now();
        let demo = Self { plan, control_plane, proxies, web, configured_at };
        demo.configure(dir).await?;
        Ok(demo)
    }

    /// Creates the Router, the published and visited `web`, and the sidecar's DNS zone through the REST
    /// API.
    async fn configure(&self, dir: &Path) -> anyhow::Result<()> {
        let router_token = write_secret(dir, "router.token")?;
        let web_secret = write_secret(dir, "web.secret")?;
        let plan = &self.plan;
        let selector = |role: Role| json!({"role": role.label()});
        let resources = [
            (
                "routers".to_string(),
                object(
                    "Router",
                    Role::Router.node(),
                    None,
                    json!({
                        "listen": plan.router().to_string(),
                        "address": plan.router().to_string(),
                        "token_file": router_token,
                    }),
                ),
            ),
            (
                format!("namespaces/{NAMESPACE}/publishedservices"),
                object(
                    "PublishedService",
                    SERVICE,
                    Some(NAMESPACE),
                    json!({
                        "local": plan.web().to_string(),
                        "secret_file": web_secret,
                        "node_selector": selector(Role::Publisher),
                    }),
                ),
            ),
            (
                "dnszones".to_string(),
                object(
                    "DnsZone",
                    "sidecar",
                    None,
                    json!({
                        "listen": [plan.dns().to_string()],
                        "namespace": NAMESPACE,
                        "ip_range": plan.vip_range.to_string(),
                        "upstreams": plan.dns_upstreams.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "node_selector": selector(Role::Sidecar),
                    }),
                ),
            ),
            (
                format!("namespaces/{NAMESPACE}/visitedservices"),
                object(
                    "VisitedService",
                    SERVICE,
                    Some(NAMESPACE),
                    json!({
                        "secret_file": web_secret,
                        "port": VISIT_PORT,
                        "node_selector": selector(Role::Sidecar),
                    }),
                ),
            ),
        ];
        let base = format!("http://{}{API}", plan.control_plane());
        for (path, resource) in resources {
            let router = path == "routers";
            let body = serde_json::to_vec(&resource)?;
            let url = format!("{base}/{path}");
            let answer =
                keel_ddns::http::request("POST", &url, &[("Content-Type", "application/json")], Some(body))
                    .await
                    .map_err(anyhow::Error::msg)?;
            if answer.status != 201 {
                bail!("POST {url}: {} {}", answer.status, String::from_utf8_lossy(&answer.body));
            }
            if router {
                // The publisher and the visitor would retry a router that is not up yet, after a backoff
                // and a warning; waiting for its port keeps the first run quick and quiet.
                wait_for_port(plan.router()).await?;
            }
        }
        Ok(())
    }

    /// Resolves the service's name at the sidecar's DNS and sends a request to the VIP it answers, as a
    /// user would; retries until the snapshots have arrived and the tunnel carries the request.
    pub async fn check(&self) -> anyhow::Result<Checked> {
        let deadline = Instant::now() + CHECK_DEADLINE;
        let mut last_problem = String::from("nothing tried yet");
        while Instant::now() < deadline {
            match self.check_once().await {
                Ok((vip, body)) => {
                    return Ok(Checked { vip, body, elapsed: self.configured_at.elapsed() });
                }
                Err(problem) => last_problem = format!("{problem:#}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "the demo did not come up within {CHECK_DEADLINE:?}: {last_problem} (GET http://{}/debug/proxies shows what each proxy runs)",
            self.plan.control_plane()
        )
    }

    async fn check_once(&self) -> anyhow::Result<(Ipv4Addr, String)> {
        let vip = resolve(self.plan.dns(), &service_name()).await?;
        let url = format!("http://{vip}:{VISIT_PORT}/");
        let answer = keel_ddns::http::request("GET", &url, &[], None).await.map_err(anyhow::Error::msg)?;
        if answer.status != 200 {
            bail!("GET {url}: {}", answer.status);
        }
        Ok((vip, String::from_utf8_lossy(&answer.body).into_owned()))
    }

    /// Drains the proxies (each gets a few seconds), then stops the control plane and `web`.
    pub async fn stop(self) {
        for (_, proxy, _) in &self.proxies {
            proxy.shutdown(Shutdown::Graceful);
        }
        for (role, proxy, serving) in self.proxies {
            match tokio::time::timeout(STOP_DEADLINE, serving).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => {
                    tracing::warn!(node = role.node(), %error, "proxy stopped with an error")
                }
                Ok(Err(error)) => tracing::warn!(node = role.node(), %error, "proxy task failed"),
                Err(_) => {
                    tracing::warn!(
                        node = role.node(),
                        "proxy did not drain in time; closing its connections"
                    );
                    proxy.shutdown(Shutdown::Fast);
                }
            }
        }
        self.control_plane.stop().await;
        self.web.abort();
    }
}

/// Waits until something accepts connections on `address`.
async fn wait_for_port(address: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + CHECK_DEADLINE;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(address).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("nothing listens on {address} after {CHECK_DEADLINE:?}")
}

/// A resource in the REST API's shape.
fn object(kind: &str, name: &str, namespace: Option<&str>, spec: Value) -> Value {
    let mut metadata = json!({"name": name});
    if let Some(namespace) = namespace {
        metadata["namespace"] = json!(namespace);
    }
    json!({"apiVersion": "edge.example.com/v1", "kind": kind, "metadata": metadata, "spec": spec})
}

/// Writes a fresh random secret to `dir/name` (owner-only) and returns the file's path.
fn write_secret(dir: &Path, name: &str) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path: PathBuf = dir.join(name);
    let mut bytes = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness for {name}"))?;
    let secret: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(file, "{secret}")?;
    Ok(path.display().to_string())
}

/// Starts one proxy from its bootstrap config: node, admin API, and the control plane to follow.
async fn start_proxy(
    plan: &Plan,
    role: Role,
    dir: &Path,
) -> anyhow::Result<(Role, Proxy, JoinHandle<std::io::Result<()>>)> {
    let bootstrap = format!(
        "node: {{id: {node}, labels: {{role: {label}}}}}\nadmin: {{address: \"{admin}\"}}\ndrain_timeout: 2s\ncontrol_plane:\n  address: http://{cp}\n  cache_file: {cache}\n",
        node = role.node(),
        label = role.label(),
        admin = plan.admin(role),
        cp = plan.control_plane(),
        cache = dir.join(format!("{}.snapshot", role.node())).display(),
    );
    let source = format!("{}.yaml", role.node());
    let loaded = keel_proxy::source::load_text(&bootstrap, &source, &ProcessEnvironment)
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let admin = keel_proxy::bind_admin(&loaded.config)
        .with_context(|| format!("cannot bind the admin API on {}", plan.admin(role)))?;
    let proxy = Proxy::new(Arc::new(ProcessEnvironment), None);
    keel_proxy::control_plane::start_following(&proxy, loaded.config.config().clone()).await;
    let serving = tokio::spawn(keel_proxy::serve(proxy.clone(), admin));
    Ok((role, proxy, serving))
}

/// Serves `web`: a plain-text greeting that counts its requests, so a user sees each one arrive.
async fn serve_web(address: SocketAddr) -> anyhow::Result<JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address} for the web service"))?;
    let served = Arc::new(AtomicU64::new(0));
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let count = served.fetch_add(1, Ordering::Relaxed) + 1;
            async move {
                format!(
                    "hello from {SERVICE} on {}, through the tunnel (request {count})\n",
                    Role::Publisher.node()
                )
            }
        }),
    );
    Ok(tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the web service stopped");
        }
    }))
}

/// Asks `server` for the A record of `name`, over UDP.
async fn resolve(server: SocketAddr, name: &str) -> anyhow::Result<Ipv4Addr> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut query = Message::new(fastrand::u16(..), MessageType::Query, OpCode::Query);
    query.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    let socket = tokio::net::UdpSocket::bind(SocketAddr::new(server.ip(), 0)).await?;
    // Connected, so that a server not listening yet is an immediate error (ICMP port unreachable), not
    // a timeout.
    socket.connect(server).await?;
    socket.send(&query.to_vec()?).await?;
    let mut buffer = [0u8; 512];
    let received = tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut buffer))
        .await
        .with_context(|| format!("{server}: no DNS answer within 1s"))??;
    let answer = Message::from_vec(&buffer[..received])?;
    answer
        .answers
        .iter()
        .find_map(|record| match &record.data {
            RData::A(address) => Some(address.0),
            _ => None,
        })
        .with_context(|| format!("{server}: no A record for {name} ({})", answer.metadata.response_code))
}
