//! The running proxy and its one apply path.
//!
//! Every config, whatever its source (a file, `POST /reload`, SIGHUP, later the control plane), reaches
//! the listeners and clusters through [`Proxy::apply`], which takes only a [`ValidatedConfig`]:
//!
//! 1. diff it against the running config into typed changes ([`crate::diff`]);
//! 2. bind the sockets of added listeners; if any bind fails, stop here: nothing has changed;
//! 3. build the new cluster set (endpoints keep their state) and publish it through `ArcSwap`;
//! 4. update listeners in place, start added ones, and drain removed ones with the drain deadline;
//! 5. publish the applied config (version, source, time) for `/config_dump`.
//!
//! A config that fails validation or binding is recorded as the last rejected one, and the running config
//! stays as it was. Applies are serialized by the listener-table lock; the data path never takes it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use keel_schemas::dns::HijackTable;
use keel_schemas::{ConfigErrors, ConfigPath, Diagnostic, Environment, ValidatedConfig};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Cluster;
use crate::diff::{ClusterChange, ListenerChange, diff};
use crate::dns::server::{DnsServer, DnsState, StartError};
use crate::listener::{BoundSocket, RunningListener};
use crate::metrics::{ConfigMetrics, DnsMetrics, Metrics};
use crate::source;
use crate::tunnel::set::{TunnelSet, TunnelsStatus};

/// The clusters the data path reads, by name.
pub type ClusterMap = HashMap<String, Arc<Cluster>>;

/// The config that is running, and where it came from.
#[derive(Debug)]
pub struct Applied {
    pub config: ValidatedConfig,
    pub version: String,
    pub source: String,
    pub applied_at: SystemTime,
}

/// The last config that was refused, and why.
#[derive(Debug)]
pub struct Rejected {
    pub version: Option<String>,
    /// The text itself is wrong (parse or validation errors), as opposed to a failure outside it (a
    /// port in use): only the former is certain to fail again unchanged.
    pub invalid_text: bool,
    pub source: String,
    pub rejected_at: SystemTime,
    pub errors: Vec<String>,
}

/// How the proxy should stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// Stop accepting, mark not ready, let connections finish within the drain timeout.
    Graceful,
    /// Close everything now.
    Fast,
}

/// Why a config could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Bind(ConfigErrors),
    #[error("the proxy is draining and takes no new config")]
    Draining,
    #[error("{0}")]
    Dns(ConfigErrors),
}

/// Why a reload did not apply a new config.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload: the proxy runs its embedded default config")]
    NoSource,
    #[error(
        "the file no longer has control_plane: switching between a control plane and a static file takes a restart"
    )]
    LeftControlPlane,
    #[error("the bootstrap file was re-read; no snapshot has come from the control plane yet")]
    AwaitingControlPlane,
    #[error(transparent)]
    Load(#[from] source::LoadError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// What an apply did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyReport {
    pub version: String,
    pub summary: String,
    pub changed: bool,
}

/// A handle to the running proxy; cheap to clone.
#[derive(Clone, Debug)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    metrics: Arc<Metrics>,
    config_metrics: ConfigMetrics,
    env: Arc<dyn Environment + Send + Sync>,
    config_file: Option<PathBuf>,
    applied: ArcSwapOption<Applied>,
    rejected: ArcSwapOption<Rejected>,
    clusters: Arc<ArcSwap<ClusterMap>>,
    listeners: Mutex<HashMap<String, RunningListener>>,
    /// The DNS server, when the config has a `dns` section. Locked after `listeners`, by applies only.
    dns: Mutex<Option<DnsServer>>,
    /// Routers, publishers and visitors. Locked after `dns`.
    tunnels: Mutex<TunnelSet>,
    /// Running address reporters by name, with the config each runs and its stop token.
    reporters: Mutex<HashMap<String, (keel_schemas::config::Reporter, CancellationToken)>>,
    /// Running probes by name, with the config each runs and its stop token; their states.
    probes: Mutex<HashMap<String, (keel_schemas::config::Probe, CancellationToken)>>,
    probe_states: Arc<crate::probe::Registry>,
    draining: AtomicBool,
    /// With `control_plane:` set: the bootstrap file's config, the snapshot running, and when the
    /// control plane was last heard from.
    bootstrap: ArcSwapOption<keel_schemas::Config>,
    snapshot: ArcSwapOption<crate::control_plane::Snapshot>,
    control_plane_contact: ArcSwapOption<tokio::time::Instant>,
    close_all: CancellationToken,
    all_connections: TaskTracker,
    shutdown: watch::Sender<Option<Shutdown>>,
    /// How many configs have been applied; bumped after each, for whoever waits on a change.
    applies: watch::Sender<u64>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("config_file", &self.config_file).finish_non_exhaustive()
    }
}

impl Proxy {
    /// A proxy with nothing running yet. `config_file` is what reloads read; `None` for a config that
    /// did not come from a file.
    pub fn new(env: Arc<dyn Environment + Send + Sync>, config_file: Option<PathBuf>) -> Self {
        let metrics = Arc::new(Metrics::new());
        let config_metrics = ConfigMetrics::new(&metrics);
        config_metrics.ready.set(0.0);
        let close_all = CancellationToken::new();
        let all_connections = TaskTracker::new();
        let tunnel_context = crate::tunnel::Context {
            node: String::new(),
            metrics: Arc::clone(&metrics),
            close: close_all.clone(),
            connections: all_connections.clone(),
        };
        Self {
            inner: Arc::new(Inner {
                metrics,
                config_metrics,
                env,
                config_file,
                applied: ArcSwapOption::empty(),
                rejected: ArcSwapOption::empty(),
                clusters: Arc::new(ArcSwap::from_pointee(ClusterMap::new())),
                listeners: Mutex::new(HashMap::new()),
                dns: Mutex::new(None),
                tunnels: Mutex::new(TunnelSet::new(tunnel_context)),
                reporters: Mutex::new(HashMap::new()),
                probes: Mutex::new(HashMap::new()),
                probe_states: Arc::new(crate::probe::Registry::default()),
                draining: AtomicBool::new(false),
                bootstrap: ArcSwapOption::empty(),
                snapshot: ArcSwapOption::empty(),
                control_plane_contact: ArcSwapOption::empty(),
                close_all,
                all_connections,
                shutdown: watch::channel(None).0,
                applies: watch::channel(0).0,
            }),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn env(&self) -> &(dyn Environment + Send + Sync) {
        &*self.inner.env
    }

    pub fn config_file(&self) -> Option<&PathBuf> {
        self.inner.config_file.as_ref()
    }

    /// Makes this proxy follow a control plane, with `bootstrap` (the file's config) giving its node,
    /// admin API and drain timeout. The file watcher stays off; SIGHUP and `POST /reload` re-read the
    /// file and re-apply the running snapshot with it.
    pub fn set_bootstrap(&self, bootstrap: keel_schemas::Config) {
        self.inner.bootstrap.store(Some(Arc::new(bootstrap)));
    }

    pub fn follows_control_plane(&self) -> bool {
        self.inner.bootstrap.load().is_some()
    }

    /// The admin token in force: the running config's, or before any, the bootstrap file's.
    pub fn admin_token(&self) -> Option<keel_schemas::types::Secret> {
        match self.applied() {
            Some(applied) => applied.config.admin.token.clone(),
            None => self.inner.bootstrap.load().as_ref().and_then(|bootstrap| bootstrap.admin.token.clone()),
        }
    }

    /// The control-plane snapshot running now.
    pub fn snapshot(&self) -> Option<crate::control_plane::Snapshot> {
        self.inner.snapshot.load_full().map(|snapshot| (*snapshot).clone())
    }

    pub(crate) fn set_snapshot(&self, snapshot: crate::control_plane::Snapshot) {
        self.inner.snapshot.store(Some(Arc::new(snapshot)));
    }

    pub(crate) fn touch_control_plane(&self) {
        self.inner.control_plane_contact.store(Some(Arc::new(tokio::time::Instant::now())));
    }

    /// When the control plane last accepted a stream or sent a snapshot.
    pub fn last_control_plane_contact(&self) -> Option<tokio::time::Instant> {
        self.inner.control_plane_contact.load_full().map(|at| *at)
    }

    /// What the proxy reports of itself to the control plane.
    pub async fn status_report(&self) -> keel_schemas::stream::ProxyStatus {
        let listeners = self.listeners().await;
        let router = self.tunnels_status().await.router.map(|router| keel_schemas::stream::RouterReport {
            listen: router.listen.to_string(),
            active_services: router
                .active_services
                .into_iter()
                .map(|service| keel_schemas::stream::ActiveService {
                    name: service.name,
                    clients: service
                        .clients
                        .into_iter()
                        .map(|client| keel_schemas::stream::RouterClient {
                            id: client.id,
                            kind: client.kind.to_string(),
                            remote_addr: client.remote_addr.to_string(),
                            service_name: client.service_name,
                            idle_connections: client.idle_connections,
                            active_connections: client.active_connections,
                        })
                        .collect(),
                })
                .collect(),
        });
        keel_schemas::stream::ProxyStatus {
            ready: self.is_ready(),
            listeners: listeners.len(),
            active_connections: listeners.iter().map(|listener| listener.active_connections).sum(),
            router,
            probes: self.probe_results().await,
        }
    }

    /// The running config, once one has been applied.
    pub fn applied(&self) -> Option<Arc<Applied>> {
        self.inner.applied.load_full()
    }

    pub fn last_rejected(&self) -> Option<Arc<Rejected>> {
        self.inner.rejected.load_full()
    }

    pub fn clusters(&self) -> Arc<ClusterMap> {
        self.inner.clusters.load_full()
    }

    /// Ready: a config is applied (so its listeners are bound) and the proxy is not draining.
    pub fn is_ready(&self) -> bool {
        self.inner.applied.load().is_some() && !self.is_draining()
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Each listener's name, configured address, bound address and open connections.
    pub async fn listeners(&self) -> Vec<ListenerStatus> {
        let table = self.inner.listeners.lock().await;
        let mut out: Vec<ListenerStatus> = table
            .values()
            .map(|listener| {
                let settings = listener.settings.load();
                ListenerStatus {
                    name: settings.config.name.clone(),
                    cluster: settings.config.cluster.clone(),
                    configured: settings.config.address.0,
                    bound: listener.local_addr,
                    active_connections: listener.active_connections(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The address a listener is bound to (useful with port 0).
    pub async fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.inner.listeners.lock().await.get(name).map(|listener| listener.local_addr)
    }

    /// Applies a validated config from `source`, labelled `version`.
    pub async fn apply(
        &self,
        config: ValidatedConfig,
        source: &str,
        version: &str,
    ) -> Result<ApplyReport, ApplyError> {
        let result = self.apply_inner(config, source, version).await;
        match &result {
            Ok(report) => {
                ConfigMetrics::applied(&self.inner.metrics, source_kind(source)).increment(1);
                // Registered at zero, so a dashboard sees the series before the first failure.
                ConfigMetrics::rejected(&self.inner.metrics, source_kind(source)).increment(0);
                let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                self.inner.config_metrics.last_success.set(now.as_secs_f64());
                self.refresh_ready_gauge();
                tracing::info!(version = %report.version, source, changes = %report.summary, "config applied");
                self.inner.applies.send_modify(|applies| *applies += 1);
            }
            Err(ApplyError::Bind(errors)) => self.record_rejected(source, Some(version), errors, false),
            Err(ApplyError::Dns(errors)) => self.record_rejected(source, Some(version), errors, true),
            Err(ApplyError::Draining) => {}
        }
        result
    }

    async fn apply_inner(
        &self,
        config: ValidatedConfig,
        source: &str,
        version: &str,
    ) -> Result<ApplyReport, ApplyError> {
        let inner = &self.inner;
        let mut table = inner.listeners.lock().await;
        if self.is_draining() {
            return Err(ApplyError::Draining);
        }
        let previous = inner.applied.load_full();
        let empty = keel_schemas::Config::default();
        let old = previous.as_ref().map_or(&empty, |applied| applied.config.config());
        let changes = diff(old, config.config());
        if changes.admin_address_changed && previous.is_some() {
            tracing::warn!(
                from = %old.admin.address, to = %config.admin.address,
                "admin.address changes take effect on restart; the admin API stays where it is"
            );
        }

        // Bind every new socket first: a failure here leaves the running config untouched.
        let mut bound = Vec::new();
        let mut failures = Vec::new();
        for change in &changes.listeners {
            if let ListenerChange::Added(listener) = change {
                match BoundSocket::bind(listener.address.0) {
                    Ok(socket) => bound.push((listener.clone(), socket)),
                    Err(error) => {
                        let index =
                            config.listeners.iter().position(|l| l.name == listener.name).unwrap_or(0);
                        let path = ConfigPath::root().key("listeners").index(index).key("address");
                        failures.push(Diagnostic::new(
                            path,
                            format!("cannot bind {}: {error}", listener.address),
                        ));
                    }
                }
            }
        }
        if !failures.is_empty() {
            return Err(ApplyError::Bind(ConfigErrors { origin: source.to_string(), diagnostics: failures }));
        }
        let mut dns_slot = inner.dns.lock().await;
        // Tunnels bind before DNS starts anything, so that a tunnel bind failure leaves no new DNS server
        // behind. Visitors listen on the VIPs the new hijack table gives (the DNS plan builds the same
        // table: allocation is deterministic given the running one).
        let mut tunnels = inner.tunnels.lock().await;
        let running_dns = dns_slot.as_ref().map(DnsServer::state);
        let hijack_table = match &config.dns {
            Some(dns) => {
                Some(HijackTable::build(dns, running_dns.as_ref().map(|state| &state.table)).map_err(
                    |diagnostics| ApplyError::Dns(ConfigErrors { origin: source.to_string(), diagnostics }),
                )?)
            }
            None => None,
        };
        let tunnel_plan = tunnels.plan(config.config(), hijack_table.as_ref()).map_err(|diagnostics| {
            ApplyError::Bind(ConfigErrors { origin: source.to_string(), diagnostics })
        })?;
        let dns_plan = self.plan_dns(config.config(), old, dns_slot.as_ref(), hijack_table, source).await?;

        // Clusters before listeners, so a listener never points at a cluster that is not there yet.
        let mut clusters: ClusterMap = (**inner.clusters.load()).clone();
        for change in &changes.clusters {
            match change {
                ClusterChange::Added(config) => {
                    let cluster = Arc::new(Cluster::new(config.clone(), None, &inner.metrics));
                    cluster.start_health_checks();
                    clusters.insert(config.name.clone(), cluster);
                }
                ClusterChange::Updated { new, .. } => {
                    let old = clusters.get(&new.name).cloned();
                    let cluster = Arc::new(Cluster::new(new.clone(), old.as_deref(), &inner.metrics));
                    if let Some(old) = old {
                        old.stop_health_checks();
                    }
                    cluster.start_health_checks();
                    clusters.insert(new.name.clone(), cluster);
                }
                // Removed only after the listeners have moved off them (below), so that a connection
                // accepted mid-apply never finds its listener's cluster missing.
                ClusterChange::Removed(_) => {}
            }
        }
        inner.clusters.store(Arc::new(clusters.clone()));

        // Take every updated and removed listener out of the table before putting any back under its new
        // name: a rename may reuse the name of another listener in the same change (two listeners
        // swapping names, or `b` moving onto `a`'s address while `b`'s old address goes away).
        let drain_timeout = config.drain_timeout.get();
        let mut renamed = Vec::new();
        for change in &changes.listeners {
            match change {
                ListenerChange::Updated { old, new } => {
                    if let Some(running) = table.remove(&old.name) {
                        renamed.push((running, new.clone()));
                    }
                }
                ListenerChange::Removed(old) => {
                    if let Some(running) = table.remove(&old.name) {
                        running.stop_accepting();
                        tokio::spawn(async move {
                            let closed = running.drain(drain_timeout).await;
                            tracing::info!(listener = %running.name(), closed, "removed listener drained");
                        });
                    }
                }
                ListenerChange::Added(_) => {}
            }
        }
        for (running, new) in renamed {
            let name = new.name.clone();
            running.update(new, &inner.metrics);
            table.insert(name, running);
        }
        for (config, socket) in bound {
            let name = config.name.clone();
            let running = RunningListener::start(
                socket,
                config,
                &inner.metrics,
                Arc::clone(&inner.clusters),
                inner.close_all.child_token(),
                inner.all_connections.clone(),
            );
            tracing::info!(listener = %name, address = %running.local_addr, "listening");
            table.insert(name, running);
        }

        let mut removed_any = false;
        for change in &changes.clusters {
            if let ClusterChange::Removed(config) = change
                && let Some(old) = clusters.remove(&config.name)
            {
                old.stop_health_checks();
                removed_any = true;
            }
        }
        if removed_any {
            inner.clusters.store(Arc::new(clusters));
        }

        match dns_plan {
            DnsPlan::Keep => {}
            DnsPlan::Stop => {
                if let Some(server) = dns_slot.take() {
                    server.shutdown().await;
                }
            }
            DnsPlan::Replace(state) => {
                if let Some(server) = dns_slot.as_ref() {
                    server.replace_state(*state);
                }
            }
            DnsPlan::Start(server) => {
                if let Some(previous) = dns_slot.replace(*server) {
                    previous.shutdown().await;
                }
            }
        }
        drop(dns_slot);
        tunnels.set_node(crate::tunnel::node_name(config.config()));
        tunnels.commit(tunnel_plan);
        drop(tunnels);
        self.update_reporters(config.config()).await;
        self.update_probes(config.config()).await;

        let changed = !changes.is_empty();
        inner.applied.store(Some(Arc::new(Applied {
            config,
            version: version.to_string(),
            source: source.to_string(),
            applied_at: SystemTime::now(),
        })));
        Ok(ApplyReport { version: version.to_string(), summary: changes.summary(), changed })
    }

    /// Decides what the DNS server does for `new` (with `table`, its hijack table, built by the caller
    /// from the running one), doing everything that can fail (binding new sockets) before the apply
    /// commits anything.
    async fn plan_dns(
        &self,
        new: &keel_schemas::Config,
        old: &keel_schemas::Config,
        running: Option<&DnsServer>,
        table: Option<HijackTable>,
        source: &str,
    ) -> Result<DnsPlan, ApplyError> {
        let (Some(dns), Some(table)) = (&new.dns, table) else {
            return Ok(if running.is_some() { DnsPlan::Stop } else { DnsPlan::Keep });
        };
        let previous = running.map(DnsServer::state);
        // The running state's metric handles carry over; registering them anew on every reload is waste.
        let metrics = previous
            .as_ref()
            .map_or_else(|| DnsMetrics::new(&self.inner.metrics), |state| state.metrics().clone());
        let state = DnsState::with_table(dns, table, previous.as_deref(), metrics);
        let same_sockets =
            old.dns.as_ref().is_some_and(|old| old.listen == dns.listen && old.workers == dns.workers);
        if running.is_some() && same_sockets {
            return Ok(DnsPlan::Replace(Box::new(state)));
        }
        let listen: Vec<SocketAddr> = dns.listen.iter().map(|address| address.0).collect();
        match DnsServer::start(&listen, dns.workers, state).await {
            Ok(server) => Ok(DnsPlan::Start(Box::new(server))),
            Err(StartError::Bind { address, error }) => {
                let index = listen.iter().position(|a| *a == address).unwrap_or(0);
                let path = ConfigPath::root().key("dns").key("listen").index(index);
                let diagnostic = Diagnostic::new(path, format!("cannot bind {address}: {error}"));
                Err(ApplyError::Bind(ConfigErrors {
                    origin: source.to_string(),
                    diagnostics: vec![diagnostic],
                }))
            }
            Err(error @ StartError::Thread(_)) => {
                let diagnostic = Diagnostic::new(ConfigPath::root().key("dns"), error.to_string());
                Err(ApplyError::Bind(ConfigErrors {
                    origin: source.to_string(),
                    diagnostics: vec![diagnostic],
                }))
            }
        }
    }

    /// The DNS server's addresses, hijack table and cache size, when it runs.
    pub async fn dns_status(&self) -> Option<DnsStatus> {
        let slot = self.inner.dns.lock().await;
        let server = slot.as_ref()?;
        let state = server.state();
        Some(DnsStatus {
            listening: server.local_addrs.clone(),
            hijack: state.table.entries().to_vec(),
            cache_entries: state.cache_len(),
        })
    }

    /// Starts, restarts (when their config changed) and stops reporters to match `config`. A reporter's
    /// state file carries its pending address across a restart, so nothing is lost.
    async fn update_reporters(&self, config: &keel_schemas::Config) {
        let node = crate::tunnel::node_name(config);
        let mut running = self.inner.reporters.lock().await;
        reconcile(
            &mut running,
            &config.reporters,
            &self.inner.close_all,
            |reporter| &reporter.name,
            "reporter",
            |_| {},
            |reporter, stop| {
                tokio::spawn(crate::reporter::run(
                    reporter.clone(),
                    node.clone(),
                    Arc::clone(&self.inner.metrics),
                    stop,
                ));
            },
        );
    }

    /// Starts, restarts (when their config changed) and stops probes to match `config`. A restarted
    /// probe starts its targets afresh (unjudged) and its old task's last writes go nowhere.
    async fn update_probes(&self, config: &keel_schemas::Config) {
        let mut running = self.inner.probes.lock().await;
        let states = &self.inner.probe_states;
        let forget = |name: &str| states.remove(name);
        reconcile(
            &mut running,
            &config.probes,
            &self.inner.close_all,
            |probe| &probe.name,
            "probe",
            forget,
            |probe, stop| {
                tokio::spawn(crate::probe::run(
                    probe.clone(),
                    Arc::clone(states),
                    Arc::clone(&self.inner.metrics),
                    stop,
                ));
            },
        );
    }

    /// Every probe target's latest result, for `/probes` and the control plane.
    pub async fn probe_results(&self) -> Vec<keel_schemas::stream::ProbeResult> {
        self.inner.probe_states.results().await
    }

    /// Routers, publishers and visitors, for `/tunnels`.
    pub async fn tunnels_status(&self) -> TunnelsStatus {
        self.inner.tunnels.lock().await.status().await
    }

    /// Where a visitor of `service` listens (its port filled in).
    pub async fn tunnel_visitor_addr(&self, service: &str) -> Option<SocketAddr> {
        self.inner.tunnels.lock().await.visitor_addr(service)
    }

    /// Where this proxy's tunnel router listens (its port filled in).
    pub async fn tunnel_router_addr(&self) -> Option<SocketAddr> {
        self.inner.tunnels.lock().await.router_addr()
    }

    /// Stops the tunnels' listeners, sessions and pools; relays in progress are the drain's.
    pub async fn stop_tunnels(&self) {
        self.inner.tunnels.lock().await.stop_all();
    }

    /// Stops the DNS server (at the end of `serve`).
    pub async fn stop_dns(&self) {
        if let Some(server) = self.inner.dns.lock().await.take() {
            server.shutdown().await;
        }
    }

    /// Records a config that was refused, for `/config_dump` and the metrics.
    pub fn record_rejected(
        &self,
        source: &str,
        version: Option<&str>,
        errors: &ConfigErrors,
        invalid_text: bool,
    ) {
        ConfigMetrics::rejected(&self.inner.metrics, source_kind(source)).increment(1);
        let lines = errors.lines();
        tracing::warn!(source, errors = %lines.join("; "), "config rejected; the running config stays");
        self.inner.rejected.store(Some(Arc::new(Rejected {
            version: version.map(str::to_string),
            invalid_text,
            source: source.to_string(),
            rejected_at: SystemTime::now(),
            errors: lines,
        })));
    }

    /// Reads the config file again and applies it; a bad file is recorded as rejected.
    pub async fn reload(&self) -> Result<ApplyReport, ReloadError> {
        let path = self.inner.config_file.clone().ok_or(ReloadError::NoSource)?;
        let loaded = source::load_file(&path, self.env());
        if self.follows_control_plane() {
            return self.reload_bootstrap(&path, loaded).await;
        }
        self.apply_loaded(&path, loaded).await
    }

    /// Control-plane mode: the file is the bootstrap; re-apply the running snapshot with it.
    async fn reload_bootstrap(
        &self,
        path: &std::path::Path,
        loaded: Result<source::Loaded, source::LoadError>,
    ) -> Result<ApplyReport, ReloadError> {
        let loaded = match loaded {
            Ok(loaded) if loaded.config.control_plane.is_some() => loaded,
            Ok(_) => return Err(ReloadError::LeftControlPlane),
            Err(error) => {
                let source_name = source::file_source_name(path);
                let invalid_text = matches!(error, source::LoadError::Invalid { .. });
                self.record_rejected(&source_name, error.version(), &error.as_config_errors(), invalid_text);
                return Err(error.into());
            }
        };
        let bootstrap = loaded.config.config().clone();
        if self.inner.bootstrap.load().as_ref().map(|old| &old.control_plane)
            != Some(&bootstrap.control_plane)
        {
            tracing::warn!("control_plane settings change on restart; the running stream stays as it is");
        }
        self.set_bootstrap(bootstrap.clone());
        let snapshot = self.snapshot().ok_or(ReloadError::AwaitingControlPlane)?;
        let source_name = source::file_source_name(path);
        let config =
            crate::control_plane::load_snapshot(&snapshot.text, &snapshot.version, &bootstrap, self.env())
                .map_err(|errors| {
                    self.record_rejected(&source_name, Some(&snapshot.version), &errors, true);
                    ReloadError::Load(source::LoadError::Invalid {
                        version: snapshot.version.clone(),
                        errors,
                    })
                })?;
        Ok(self.apply(config, &source_name, &snapshot.version).await?)
    }

    /// Applies what loading the config file at `path` gave, or records its errors as rejected (and
    /// whether the text itself was at fault, which the watcher uses to avoid re-reporting it).
    pub async fn apply_loaded(
        &self,
        path: &std::path::Path,
        loaded: Result<source::Loaded, source::LoadError>,
    ) -> Result<ApplyReport, ReloadError> {
        let source_name = source::file_source_name(path);
        match loaded {
            Ok(loaded) => Ok(self.apply(loaded.config, &source_name, &loaded.version).await?),
            Err(error) => {
                let invalid_text = matches!(error, source::LoadError::Invalid { .. });
                self.record_rejected(&source_name, error.version(), &error.as_config_errors(), invalid_text);
                Err(error.into())
            }
        }
    }

    /// Stops accepting everywhere, marks the proxy not ready, and waits up to the drain timeout for open
    /// connections to finish before closing the rest. Returns how many had to be closed.
    pub async fn drain(&self) -> usize {
        let deadline = {
            let table = self.inner.listeners.lock().await;
            self.inner.draining.store(true, Ordering::SeqCst);
            self.refresh_ready_gauge();
            for listener in table.values() {
                listener.stop_accepting();
            }
            // Tunnels stop accepting too: visitor listeners close, publishers unregister.
            self.inner.tunnels.lock().await.stop_all();
            let drain_timeout = self.applied().map(|applied| applied.config.drain_timeout);
            drain_timeout.unwrap_or_else(keel_schemas::config::defaults::drain_timeout).get()
        };
        let tracker = &self.inner.all_connections;
        tracker.close();
        tracing::info!(open = tracker.len(), ?deadline, "draining");
        if tokio::time::timeout(deadline, tracker.wait()).await.is_ok() {
            tracing::info!("drained: every connection finished");
            return 0;
        }
        let remaining = tracker.len();
        tracing::warn!(remaining, "drain deadline reached; closing the remaining connections");
        self.close_all_connections().await;
        remaining
    }

    /// Stops every cluster's health checks (at the end of `serve`).
    pub fn stop_health_checks(&self) {
        for cluster in self.inner.clusters.load().values() {
            cluster.stop_health_checks();
        }
    }

    /// Closes every open connection now.
    pub async fn close_all_connections(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        self.refresh_ready_gauge();
        for listener in self.inner.listeners.lock().await.values() {
            listener.stop_accepting();
        }
        self.inner.close_all.cancel();
        self.inner.all_connections.close();
        self.inner.all_connections.wait().await;
    }

    /// Asks the proxy to stop; [`Proxy::shutdown_requests`] sees the request. A fast request overrides a
    /// graceful one already under way.
    pub fn shutdown(&self, kind: Shutdown) {
        self.inner.shutdown.send_if_modified(|current| {
            let upgrade = *current != Some(Shutdown::Fast) && *current != Some(kind);
            if upgrade {
                *current = Some(kind);
            }
            upgrade
        });
    }

    /// Resolves with the next shutdown request.
    pub fn shutdown_requests(&self) -> watch::Receiver<Option<Shutdown>> {
        self.inner.shutdown.subscribe()
    }

    /// Changes after every config applied (its value: how many have been).
    pub fn applies(&self) -> watch::Receiver<u64> {
        self.inner.applies.subscribe()
    }

    fn refresh_ready_gauge(&self) {
        self.inner.config_metrics.ready.set(if self.is_ready() { 1.0 } else { 0.0 });
    }
}

/// What an apply does with the DNS server.
enum DnsPlan {
    Keep,
    Stop,
    Replace(Box<DnsState>),
    Start(Box<DnsServer>),
}

/// The DNS server as `/config_dump` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DnsStatus {
    pub listening: Vec<SocketAddr>,
    /// Each hijacked name (its key: the full service name, or the wildcard) and its VIP.
    pub hijack: Vec<(String, std::net::IpAddr)>,
    pub cache_entries: u64,
}

/// `file:/etc/keel.yaml` → `file`, for metric labels with a bounded set of values.
fn source_kind(source: &str) -> &str {
    source.split(':').next().unwrap_or(source)
}

/// One listener as `/listeners` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ListenerStatus {
    pub name: String,
    pub cluster: String,
    pub configured: SocketAddr,
    pub bound: SocketAddr,
    pub active_connections: usize,
}

/// Makes the tasks in `running` (by name: the config each runs and its stop token) match `wanted`: a task
/// whose config is gone or changed is stopped (`stopped` is told its name), and every wanted one not
/// running is started by `start` with a stop token of its own, a child of `parent`.
fn reconcile<T: Clone + PartialEq>(
    running: &mut HashMap<String, (T, CancellationToken)>,
    wanted: &[T],
    parent: &CancellationToken,
    name_of: impl Fn(&T) -> &String,
    what: &str,
    stopped: impl Fn(&str),
    mut start: impl FnMut(&T, CancellationToken),
) {
    running.retain(|name, (current, stop)| {
        let keep = wanted.iter().any(|item| item == current);
        if !keep {
            tracing::info!(name = %name, "{what} stopped");
            stop.cancel();
            stopped(name);
        }
        keep
    });
    for item in wanted {
        let name = name_of(item);
        if running.contains_key(name) {
            continue;
        }
        let stop = parent.child_token();
        tracing::info!(name = %name, "{what} started");
        start(item, stop.clone());
        running.insert(name.clone(), (item.clone(), stop));
    }
}
