//! A running cluster: its endpoints' state, how one is picked for a new connection, and how failures
//! take endpoints out of rotation.
//!
//! Three things decide whether an endpoint is *routable*: the active health check (a TCP connect every
//! `interval`, with healthy/unhealthy thresholds), passive outlier ejection (N consecutive connect
//! failures from real traffic eject it for a while), and nothing else. [`Cluster::connect`] picks a
//! routable endpoint by the load-balancing policy and, when the connect fails or times out, moves on to
//! the next one. When no endpoint is routable at all, every endpoint is tried ("panic routing", as Envoy
//! does), because a health check that is wrong about every endpoint should not stop all traffic.
//!
//! Endpoint state lives in [`Endpoint`]s shared by `Arc`: a reload that keeps an endpoint keeps its
//! health, ejection and connection count.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use keel_schemas::config::{Cluster as ClusterConfig, HealthCheck, LoadBalancing};
use keel_schemas::types::HostPort;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{ClusterMetrics, EndpointMetrics, Metrics};

/// Longest an ejection lasts, in multiples of the base ejection time.
const MAX_EJECTION_MULTIPLIER: u32 = 10;

/// What the active health check last concluded about an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Not checked yet (or no health check configured): routable.
    Unknown = 0,
    Healthy = 1,
    Unhealthy = 2,
}

impl Health {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// Milliseconds on tokio's clock since the first call; ejection deadlines are stored as these so they fit
/// in an atomic. tokio's clock (not std's) so that tests with a paused clock can step through ejections.
fn now_millis() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One upstream address and everything known about it.
pub struct Endpoint {
    pub address: HostPort,
    label: String,
    active: AtomicUsize,
    health: AtomicU8,
    consecutive_failures: AtomicU32,
    /// `now_millis()` until which the endpoint is ejected; 0 when it is not.
    ejected_until: AtomicU64,
    /// Ejections since the endpoint last accepted a connection; scales the next ejection's length.
    ejections: AtomicU32,
    metrics: EndpointMetrics,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("address", &self.label)
            .field("health", &self.health())
            .field("active", &self.active())
            .finish()
    }
}

impl Endpoint {
    fn new(address: HostPort, metrics: EndpointMetrics) -> Self {
        metrics.healthy.set(1.0);
        Self {
            label: address.to_string(),
            address,
            active: AtomicUsize::new(0),
            health: AtomicU8::new(Health::Unknown as u8),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            metrics,
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now_millis()
    }

    /// Healthy (or unchecked) and not ejected.
    pub fn is_routable(&self) -> bool {
        self.health() != Health::Unhealthy && !self.is_ejected()
    }

    fn refresh_gauge(&self) {
        self.metrics.healthy.set(if self.is_routable() { 1.0 } else { 0.0 });
    }

    fn set_health(&self, health: Health) {
        self.health.store(health as u8, Ordering::Relaxed);
        self.refresh_gauge();
    }
}

/// Consecutive check results of one endpoint, and the health they add up to.
///
/// The first result decides at once (an endpoint is not left "unknown" for several intervals); after
/// that, a healthy endpoint needs `unhealthy_threshold` failures in a row to turn unhealthy, and an
/// unhealthy one `healthy_threshold` successes in a row to come back.
#[derive(Debug, Default)]
struct HealthTracker {
    successes: u32,
    failures: u32,
}

impl HealthTracker {
    fn observe(&mut self, before: Health, ok: bool, check: &HealthCheck) -> Health {
        if ok {
            (self.successes, self.failures) = (self.successes + 1, 0);
            match before {
                Health::Unhealthy if self.successes < check.healthy_threshold => Health::Unhealthy,
                _ => Health::Healthy,
            }
        } else {
            (self.successes, self.failures) = (0, self.failures + 1);
            match before {
                Health::Healthy if self.failures < check.unhealthy_threshold => Health::Healthy,
                _ => Health::Unhealthy,
            }
        }
    }
}

/// An open upstream connection. Dropping it gives back the endpoint's and cluster's connection counts.
#[derive(Debug)]
pub struct Upstream {
    pub stream: TcpStream,
    pub endpoint: Arc<Endpoint>,
    cluster_metrics: ClusterMetrics,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
        self.cluster_metrics.active.decrement(1.0);
    }
}

/// Why no upstream connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cluster {cluster}: every endpoint was tried")]
    Exhausted { cluster: String },
    #[error("cluster {cluster}: {attempts} connect attempt(s) failed, the last to {endpoint}: {error}")]
    Failed { cluster: String, attempts: u32, endpoint: String, error: io::Error },
}

/// A cluster as it runs: its config, endpoints and counters.
pub struct Cluster {
    pub config: ClusterConfig,
    endpoints: Vec<Arc<Endpoint>>,
    next: AtomicUsize,
    metrics: ClusterMetrics,
    /// Stops this cluster's health-check tasks.
    health_checks: CancellationToken,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.config.name)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl Cluster {
    /// Builds a cluster, keeping the state of every endpoint that `previous` already had.
    pub fn new(config: ClusterConfig, previous: Option<&Cluster>, metrics: &Metrics) -> Self {
        let endpoints = config
            .endpoints
            .iter()
            .map(|address| {
                previous
                    .and_then(|old| old.endpoints.iter().find(|e| e.address == *address))
                    .cloned()
                    .unwrap_or_else(|| {
                        let labels = EndpointMetrics::new(metrics, &config.name, &address.to_string());
                        Arc::new(Endpoint::new(address.clone(), labels))
                    })
            })
            .collect::<Vec<Arc<Endpoint>>>();
        if config.health_check.is_none() {
            // Without a checker nothing would ever clear an old verdict: unchecked endpoints count as
            // healthy, as the config documents.
            for endpoint in &endpoints {
                endpoint.set_health(Health::Unknown);
            }
        }
        Self {
            metrics: ClusterMetrics::new(metrics, &config.name),
            config,
            endpoints,
            next: AtomicUsize::new(0),
            health_checks: CancellationToken::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    pub fn metrics(&self) -> &ClusterMetrics {
        &self.metrics
    }

    /// Starts one health-check task per endpoint, if the cluster has a health check.
    pub fn start_health_checks(self: &Arc<Self>) {
        let Some(check) = self.config.health_check.clone() else { return };
        for endpoint in &self.endpoints {
            let (cluster, endpoint, check) = (Arc::clone(self), Arc::clone(endpoint), check.clone());
            tokio::spawn(async move {
                let stop = cluster.health_checks.clone();
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = cluster.health_check_loop(&endpoint, &check) => {}
                }
            });
        }
    }

    /// Stops the health checks; the cluster keeps serving connections already made.
    pub fn stop_health_checks(&self) {
        self.health_checks.cancel();
    }

    async fn health_check_loop(&self, endpoint: &Endpoint, check: &HealthCheck) {
        let mut tracker = HealthTracker::default();
        loop {
            let ok = matches!(
                tokio::time::timeout(check.timeout.get(), connect_to(&endpoint.address)).await,
                Ok(Ok(_))
            );
            if self.health_checks.is_cancelled() {
                return;
            }
            if ok {
                self.metrics.health_checks_ok.increment(1);
                // A passing active check lifts an outlier ejection, as Envoy does by default.
                endpoint.ejected_until.store(0, Ordering::Relaxed);
            } else {
                self.metrics.health_checks_failed.increment(1);
            }
            let before = endpoint.health();
            let after = tracker.observe(before, ok, check);
            if after != before {
                tracing::info!(
                    cluster = %self.config.name, endpoint = %endpoint.label,
                    from = before.as_str(), to = after.as_str(), "endpoint health changed"
                );
            }
            endpoint.set_health(after);
            // Up to 10% jitter keeps the checks of many proxies from lining up.
            let interval = check.interval.get();
            let jitter = interval.mul_f64(fastrand::f64() * 0.1);
            tokio::time::sleep(interval + jitter).await;
        }
    }

    /// Picks the next endpoint to try, skipping `tried`.
    fn pick(&self, tried: &[usize]) -> Option<usize> {
        let count = self.endpoints.len();
        let untried = |i: &usize| !tried.contains(i);
        let mut candidates: Vec<usize> =
            (0..count).filter(untried).filter(|&i| self.endpoints[i].is_routable()).collect();
        if candidates.is_empty() && !self.endpoints.iter().any(|e| e.is_routable()) {
            candidates = (0..count).filter(untried).collect();
        }
        if candidates.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        Some(match self.config.load_balancing {
            // Rotating over the candidates (not over all endpoints) keeps the share even when some are
            // out of rotation.
            LoadBalancing::RoundRobin => candidates[start % candidates.len()],
            LoadBalancing::LeastConnections => {
                // Ties go round-robin, so equal endpoints share the load.
                let offset = start % candidates.len();
                let rotated = candidates[offset..].iter().chain(&candidates[..offset]);
                *rotated.min_by_key(|&&i| self.endpoints[i].active()).expect("candidates is not empty")
            }
            LoadBalancing::Random => candidates[fastrand::usize(..candidates.len())],
        })
    }

    /// Connects to an endpoint, trying up to `connect_attempts` different ones.
    pub async fn connect(&self) -> Result<Upstream, ConnectError> {
        let timeout = self.config.connect_timeout.get();
        let mut tried = Vec::with_capacity(self.config.connect_attempts as usize);
        let mut last_error = None;
        while tried.len() < self.config.connect_attempts as usize {
            let Some(index) = self.pick(&tried) else { break };
            tried.push(index);
            let endpoint = &self.endpoints[index];
            let started = Instant::now();
            let result = match tokio::time::timeout(timeout, connect_to(&endpoint.address)).await {
                Ok(result) => result,
                Err(_) => {
                    Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")))
                }
            };
            match result {
                Ok(stream) => {
                    self.metrics.connect_duration.record(started.elapsed().as_secs_f64());
                    self.metrics.connections.increment(1);
                    self.metrics.active.increment(1.0);
                    endpoint.active.fetch_add(1, Ordering::Relaxed);
                    self.record_success(endpoint);
                    return Ok(Upstream {
                        stream,
                        endpoint: Arc::clone(endpoint),
                        cluster_metrics: self.metrics.clone(),
                    });
                }
                Err(error) => {
                    self.metrics.connect_failures.increment(1);
                    tracing::debug!(cluster = %self.config.name, endpoint = %endpoint.label, %error, "connect failed");
                    self.record_failure(endpoint);
                    last_error = Some((endpoint.label.clone(), error));
                }
            }
        }
        self.metrics.no_endpoint.increment(1);
        let cluster = self.config.name.clone();
        Err(match last_error {
            Some((endpoint, error)) => {
                ConnectError::Failed { cluster, attempts: tried.len() as u32, endpoint, error }
            }
            None => ConnectError::Exhausted { cluster },
        })
    }

    fn record_success(&self, endpoint: &Endpoint) {
        endpoint.consecutive_failures.store(0, Ordering::Relaxed);
        endpoint.ejections.store(0, Ordering::Relaxed);
    }

    fn record_failure(&self, endpoint: &Arc<Endpoint>) {
        let Some(outlier) = &self.config.outlier_detection else { return };
        let failures = endpoint.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < outlier.consecutive_failures || endpoint.is_ejected() {
            return;
        }
        let ejected_now = self.endpoints.iter().filter(|e| e.is_ejected()).count();
        let allowed = (self.endpoints.len() * usize::from(outlier.max_ejection_percent) / 100).max(1);
        if ejected_now >= allowed {
            return;
        }
        let ejections = endpoint.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let length = outlier.base_ejection_time.get() * ejections.min(MAX_EJECTION_MULTIPLIER);
        let until = now_millis() + u64::try_from(length.as_millis()).unwrap_or(u64::MAX / 2);
        endpoint.ejected_until.store(until, Ordering::Relaxed);
        endpoint.consecutive_failures.store(0, Ordering::Relaxed);
        endpoint.metrics.ejections.increment(1);
        endpoint.refresh_gauge();
        tracing::warn!(
            cluster = %self.config.name, endpoint = %endpoint.label, failures, ejection = ?length,
            "endpoint ejected after consecutive connect failures"
        );
        // Put the gauge back when the ejection ends, unless something else changed it meanwhile.
        let endpoint = Arc::clone(endpoint);
        tokio::spawn(async move {
            tokio::time::sleep(length + Duration::from_millis(1)).await;
            endpoint.refresh_gauge();
        });
    }
}

/// The addresses of a host name, found the way the system finds them (`/etc/hosts`, then the
/// nameservers and search domains of `/etc/resolv.conf`) but without glibc's NSS modules, so that a
/// statically linked proxy resolves names on any system. The configuration is read on every call, as
/// getaddrinfo does, so that changes to those files apply at once.
pub async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    use hickory_resolver::TokioResolver;
    match TokioResolver::builder_tokio().and_then(|builder| builder.build()) {
        Ok(resolver) => {
            let found = resolver
                .lookup_ip(host)
                .await
                .map_err(|error| io::Error::new(io::ErrorKind::NotFound, format!("{host}: {error}")))?;
            Ok(found.iter().map(|ip| SocketAddr::new(ip, port)).collect())
        }
        // No usable resolv.conf: let the C library try.
        Err(_) => Ok(tokio::net::lookup_host((host, port)).await?.collect()),
    }
}

/// Opens a TCP connection to a host:port, resolving a name if it is one, with Nagle off: the relay
/// forwards what it reads at once, and coalescing would only add latency.
pub async fn connect_to(address: &HostPort) -> io::Result<TcpStream> {
    let stream = match address.socket_addr() {
        Some(addr) => TcpStream::connect(addr).await?,
        None => {
            let host = address.to_string();
            let name = match &address.host {
                keel_schemas::types::Host::Name(name) => name.clone(),
                keel_schemas::types::Host::Ip(ip) => ip.to_string(),
            };
            let addrs = resolve(&name, address.port).await?;
            let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} resolved to no address"));
            let mut connected = None;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(stream) => {
                        connected = Some(stream);
                        break;
                    }
                    Err(error) => last = error,
                }
            }
            connected.ok_or(last)?
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_schemas::config::OutlierDetection;
    use keel_schemas::types::Duration as ConfigDuration;

    #[tokio::test]
    async fn names_resolve_from_the_hosts_file_without_the_c_library() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stream = connect_to(&format!("localhost:{port}").parse().unwrap()).await.unwrap();
        assert_eq!(stream.peer_addr().unwrap().port(), port);
    }

    fn cluster(endpoints: &[&str], outlier: Option<OutlierDetection>) -> Cluster {
        let config = ClusterConfig {
            name: "test".into(),
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            load_balancing: LoadBalancing::RoundRobin,
            connect_timeout: ConfigDuration::from_secs(1),
            connect_attempts: 3,
            health_check: None,
            outlier_detection: outlier,
        };
        Cluster::new(config, None, &Metrics::new())
    }

    #[test]
    fn health_follows_thresholds_after_a_first_decisive_result() {
        let check = HealthCheck { healthy_threshold: 2, unhealthy_threshold: 3, ..HealthCheck::default() };
        let mut tracker = HealthTracker::default();
        let mut health = Health::Unknown;
        let mut step = |ok| {
            health = tracker.observe(health, ok, &check);
            health
        };
        assert_eq!(step(true), Health::Healthy, "the first success decides");
        assert_eq!(step(false), Health::Healthy);
        assert_eq!(step(false), Health::Healthy);
        assert_eq!(step(true), Health::Healthy, "a success resets the failure count");
        assert_eq!(step(false), Health::Healthy);
        assert_eq!(step(false), Health::Healthy);
        assert_eq!(step(false), Health::Unhealthy, "three failures in a row");
        assert_eq!(step(true), Health::Unhealthy);
        assert_eq!(step(false), Health::Unhealthy, "a failure resets the success count");
        assert_eq!(step(true), Health::Unhealthy);
        assert_eq!(step(true), Health::Healthy, "two successes in a row");

        let mut first_failure = HealthTracker::default();
        assert_eq!(first_failure.observe(Health::Unknown, false, &check), Health::Unhealthy);
    }

    #[test]
    fn unroutable_endpoints_are_skipped_unless_none_is_routable() {
        let cluster = cluster(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], None);
        cluster.endpoints[0].set_health(Health::Unhealthy);
        for _ in 0..10 {
            assert_ne!(cluster.pick(&[]), Some(0));
        }
        assert_eq!(cluster.pick(&[1, 2]), None, "a routable endpoint exists, so no panic routing");
        for endpoint in &cluster.endpoints {
            endpoint.set_health(Health::Unhealthy);
        }
        assert!(cluster.pick(&[]).is_some(), "with nothing routable, every endpoint is tried");
        assert_eq!(cluster.pick(&[0, 1, 2]), None);
    }

    #[test]
    fn round_robin_stays_even_with_an_endpoint_out_of_rotation() {
        let cluster = cluster(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], None);
        cluster.endpoints[1].set_health(Health::Unhealthy);
        let mut counts = [0; 3];
        for _ in 0..100 {
            counts[cluster.pick(&[]).unwrap()] += 1;
        }
        assert_eq!(counts, [50, 0, 50]);
    }

    #[test]
    fn removing_the_health_check_forgets_old_verdicts() {
        let metrics = Metrics::new();
        let mut config = cluster(&["127.0.0.1:1"], None).config.clone();
        config.health_check = Some(HealthCheck::default());
        let checked = Cluster::new(config.clone(), None, &metrics);
        checked.endpoints[0].set_health(Health::Unhealthy);
        config.health_check = None;
        let unchecked = Cluster::new(config, Some(&checked), &metrics);
        assert!(
            Arc::ptr_eq(&checked.endpoints[0], &unchecked.endpoints[0]),
            "endpoint state is carried over"
        );
        assert_eq!(unchecked.endpoints[0].health(), Health::Unknown);
        assert!(unchecked.endpoints[0].is_routable());
    }

    #[tokio::test(start_paused = true)]
    async fn ejections_expire_and_grow_until_a_success() {
        let outlier = OutlierDetection {
            consecutive_failures: 2,
            base_ejection_time: ConfigDuration::from_secs(10),
            max_ejection_percent: 50,
        };
        let cluster = cluster(&["127.0.0.1:1", "127.0.0.1:2"], Some(outlier));
        let endpoint = Arc::clone(&cluster.endpoints[0]);
        let advance = |secs: u64| tokio::time::advance(Duration::from_secs(secs));

        cluster.record_failure(&endpoint);
        assert!(!endpoint.is_ejected(), "one failure is not enough");
        cluster.record_failure(&endpoint);
        assert!(endpoint.is_ejected());
        advance(9).await;
        assert!(endpoint.is_ejected());
        advance(2).await;
        assert!(!endpoint.is_ejected(), "the first ejection lasts the base time");

        cluster.record_failure(&endpoint);
        cluster.record_failure(&endpoint);
        advance(15).await;
        assert!(endpoint.is_ejected(), "the second ejection lasts twice as long");
        advance(6).await;
        assert!(!endpoint.is_ejected());

        cluster.record_success(&endpoint);
        cluster.record_failure(&endpoint);
        cluster.record_failure(&endpoint);
        advance(11).await;
        assert!(!endpoint.is_ejected(), "a success resets the multiplier");
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejection_percent_keeps_endpoints_in_rotation() {
        let outlier = OutlierDetection {
            consecutive_failures: 1,
            base_ejection_time: ConfigDuration::from_secs(10),
            max_ejection_percent: 50,
        };
        let cluster = cluster(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"], Some(outlier));
        for endpoint in cluster.endpoints.clone() {
            cluster.record_failure(&endpoint);
        }
        let ejected = cluster.endpoints.iter().filter(|e| e.is_ejected()).count();
        assert_eq!(ejected, 2, "at most half of four endpoints");
    }
}
