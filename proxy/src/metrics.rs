//! The proxy's Prometheus metrics: names, help texts, and the handles the hot paths hold.
//!
//! Each [`Proxy`](crate::Proxy) owns one [`Metrics`] with its own recorder rather than a process-global
//! one, so tests can run several proxies in one process and read each one's output. Hot paths never look a
//! metric up by name: a listener or cluster is given its [`ListenerMetrics`] / [`ClusterMetrics`] once,
//! and each update is an atomic add on a handle.

use std::fmt;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

const CONNECT_DURATION: &str = "keel_cluster_upstream_connect_duration_seconds";
const DNS_UPSTREAM_DURATION: &str = "keel_dns_upstream_duration_seconds";

/// Connect-time histogram buckets, in seconds: loopback connects take tens of microseconds, a connect
/// timeout several seconds.
const CONNECT_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Every metric the proxy exports: name, kind, unit and help text.
const DESCRIPTIONS: &[(&str, Kind, Unit, &str)] = &[
    ("keel_build_info", Kind::Gauge, Unit::Count, "Always 1; the version label says which build runs."),
    (
        "keel_server_ready",
        Kind::Gauge,
        Unit::Count,
        "1 while listeners are up and the proxy is not draining.",
    ),
    ("keel_config_reloads_total", Kind::Counter, Unit::Count, "Configs applied, by source."),
    ("keel_config_reload_failures_total", Kind::Counter, Unit::Count, "Configs rejected, by source."),
    (
        "keel_config_last_reload_success_timestamp_seconds",
        Kind::Gauge,
        Unit::Seconds,
        "When the running config was applied.",
    ),
    ("keel_listener_downstream_connections_total", Kind::Counter, Unit::Count, "Connections accepted."),
    ("keel_listener_downstream_connections_active", Kind::Gauge, Unit::Count, "Connections open now."),
    (
        "keel_listener_downstream_connections_rejected_total",
        Kind::Counter,
        Unit::Count,
        "Connections closed at accept, by reason.",
    ),
    (
        "keel_listener_downstream_received_bytes_total",
        Kind::Counter,
        Unit::Bytes,
        "Bytes received from clients.",
    ),
    ("keel_listener_downstream_sent_bytes_total", Kind::Counter, Unit::Bytes, "Bytes sent to clients."),
    (
        "keel_listener_accept_errors_total",
        Kind::Counter,
        Unit::Count,
        "Failed accept calls (such as running out of file descriptors).",
    ),
    (
        "keel_cluster_upstream_connections_total",
        Kind::Counter,
        Unit::Count,
        "Upstream connections established.",
    ),
    ("keel_cluster_upstream_connections_active", Kind::Gauge, Unit::Count, "Upstream connections open now."),
    (
        "keel_cluster_upstream_connect_failures_total",
        Kind::Counter,
        Unit::Count,
        "Upstream connect attempts that failed or timed out.",
    ),
    (
        "keel_cluster_upstream_no_endpoint_total",
        Kind::Counter,
        Unit::Count,
        "Downstream connections refused because no endpoint could be reached.",
    ),
    (CONNECT_DURATION, Kind::Histogram, Unit::Seconds, "Time to establish an upstream connection."),
    (
        "keel_cluster_upstream_sent_bytes_total",
        Kind::Counter,
        Unit::Bytes,
        "Bytes sent to upstream endpoints.",
    ),
    (
        "keel_cluster_upstream_received_bytes_total",
        Kind::Counter,
        Unit::Bytes,
        "Bytes received from upstream endpoints.",
    ),
    (
        "keel_cluster_endpoint_healthy",
        Kind::Gauge,
        Unit::Count,
        "1 if the endpoint takes new connections (healthy and not ejected), else 0.",
    ),
    (
        "keel_cluster_endpoint_ejections_total",
        Kind::Counter,
        Unit::Count,
        "Outlier ejections of the endpoint.",
    ),
    ("keel_cluster_health_checks_total", Kind::Counter, Unit::Count, "Active health checks, by result."),
    (
        "keel_dns_queries_total",
        Kind::Counter,
        Unit::Count,
        "DNS queries answered, by query type and outcome (hijacked, cache_hit, forwarded, stale, error).",
    ),
    (
        DNS_UPSTREAM_DURATION,
        Kind::Histogram,
        Unit::Seconds,
        "Time for an upstream resolver to answer a forwarded query.",
    ),
    ("keel_dns_cache_entries", Kind::Gauge, Unit::Count, "Answers in the DNS cache."),
    (
        "keel_probe_up",
        Kind::Gauge,
        Unit::Count,
        "1 while the probe's target is up, 0 once it is down, by probe, kind and target.",
    ),
    (
        "keel_probe_latency_seconds",
        Kind::Gauge,
        Unit::Seconds,
        "How long the last successful check took (ICMP, UDP: the round trip; TCP: the connect; HTTP: the request).",
    ),
    (
        "keel_probe_loss_ratio",
        Kind::Gauge,
        Unit::Count,
        "Share of checks (UDP: datagrams) lost recently, 0 to 1.",
    ),
    ("keel_probe_consecutive_failures", Kind::Gauge, Unit::Count, "Checks failed in a row."),
    (
        "keel_probe_checks_total",
        Kind::Counter,
        Unit::Count,
        "Checks made, by probe, kind, target and result.",
    ),
    (
        "keel_reporter_address_changes_total",
        Kind::Counter,
        Unit::Count,
        "Address changes a reporter has seen, by reporter.",
    ),
    (
        "keel_reporter_reports_total",
        Kind::Counter,
        Unit::Count,
        "Reports of an address, by reporter and result (delivered, failed).",
    ),
    (
        "keel_reporter_pending",
        Kind::Gauge,
        Unit::Count,
        "1 while a reporter holds an address change not yet delivered.",
    ),
    (
        "keel_tunnel_connections_total",
        Kind::Counter,
        Unit::Count,
        "Tunnelled connections opened, by service and role (router, publisher, visitor).",
    ),
    ("keel_tunnel_connections_active", Kind::Gauge, Unit::Count, "Tunnelled connections open now."),
    (
        "keel_tunnel_sent_bytes_total",
        Kind::Counter,
        Unit::Bytes,
        "Bytes moved from the visitor's side towards the publisher's, by service and role.",
    ),
    (
        "keel_tunnel_received_bytes_total",
        Kind::Counter,
        Unit::Bytes,
        "Bytes moved from the publisher's side towards the visitor's, by service and role.",
    ),
    (
        "keel_tunnel_handshake_failures_total",
        Kind::Counter,
        Unit::Count,
        "Handshakes refused or failed, by service, role and reason.",
    ),
    (
        "keel_tunnel_reconnects_total",
        Kind::Counter,
        Unit::Count,
        "Control connections to a router opened again after one was lost, by service, role and router.",
    ),
    (
        "keel_tunnel_router_up",
        Kind::Gauge,
        Unit::Count,
        "1 while the control session with a router is up (a publisher registered there, a visitor watching the service there), by service, role and router.",
    ),
    (
        "keel_tunnel_publishers",
        Kind::Gauge,
        Unit::Count,
        "Live publishers of a visited service at a router, as the router last said, by service and router.",
    ),
];

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// The recorder and the renderer of one proxy's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The name of every metric the proxy exports, so that dashboards and alerts can be checked against them.
pub fn metric_names() -> impl Iterator<Item = &'static str> {
    DESCRIPTIONS.iter().map(|(name, ..)| *name)
}

static METADATA: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(CONNECT_DURATION.into()), &CONNECT_BUCKETS)
            .expect("the bucket list is not empty")
            .set_buckets_for_metric(Matcher::Full(DNS_UPSTREAM_DURATION.into()), &CONNECT_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        for (name, kind, unit, help) in DESCRIPTIONS {
            let (name, help) = (metrics::KeyName::from_const_str(name), SharedString::const_str(help));
            match kind {
                Kind::Counter => recorder.describe_counter(name, Some(*unit), help),
                Kind::Gauge => recorder.describe_gauge(name, Some(*unit), help),
                Kind::Histogram => recorder.describe_histogram(name, Some(*unit), help),
            }
        }
        let handle = recorder.handle();
        let metrics = Self { recorder, handle };
        metrics.gauge("keel_build_info", &[("version", env!("CARGO_PKG_VERSION"))]).set(1.0);
        metrics
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder.register_counter(&key(name, labels), &METADATA)
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder.register_gauge(&key(name, labels), &METADATA)
    }

    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder.register_histogram(&key(name, labels), &METADATA)
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, v.to_string())).collect();
    Key::from_parts(name, labels)
}

/// Handles for one listener.
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    pub accepted: Counter,
    pub active: Gauge,
    pub rejected_over_limit: Counter,
    pub rejected_source: Counter,
    pub received_bytes: Counter,
    pub sent_bytes: Counter,
    pub accept_errors: Counter,
}

impl ListenerMetrics {
    pub fn new(metrics: &Metrics, listener: &str) -> Self {
        let labels = [("listener", listener)];
        let rejected = |reason| {
            metrics.counter(
                "keel_listener_downstream_connections_rejected_total",
                &[("listener", listener), ("reason", reason)],
            )
        };
        Self {
            accepted: metrics.counter("keel_listener_downstream_connections_total", &labels),
            active: metrics.gauge("keel_listener_downstream_connections_active", &labels),
            rejected_over_limit: rejected("max_connections"),
            rejected_source: rejected("source_not_allowed"),
            received_bytes: metrics.counter("keel_listener_downstream_received_bytes_total", &labels),
            sent_bytes: metrics.counter("keel_listener_downstream_sent_bytes_total", &labels),
            accept_errors: metrics.counter("keel_listener_accept_errors_total", &labels),
        }
    }
}

/// Handles for one cluster.
#[derive(Clone, Debug)]
pub struct ClusterMetrics {
    pub connections: Counter,
    pub active: Gauge,
    pub connect_failures: Counter,
    pub no_endpoint: Counter,
    pub connect_duration: Histogram,
    pub sent_bytes: Counter,
    pub received_bytes: Counter,
    pub health_checks_ok: Counter,
    pub health_checks_failed: Counter,
}

impl ClusterMetrics {
    pub fn new(metrics: &Metrics, cluster: &str) -> Self {
        let labels = [("cluster", cluster)];
        let checks = |result| {
            metrics.counter("keel_cluster_health_checks_total", &[("cluster", cluster), ("result", result)])
        };
        Self {
            connections: metrics.counter("keel_cluster_upstream_connections_total", &labels),
            active: metrics.gauge("keel_cluster_upstream_connections_active", &labels),
            connect_failures: metrics.counter("keel_cluster_upstream_connect_failures_total", &labels),
            no_endpoint: metrics.counter("keel_cluster_upstream_no_endpoint_total", &labels),
            connect_duration: metrics.histogram(CONNECT_DURATION, &labels),
            sent_bytes: metrics.counter("keel_cluster_upstream_sent_bytes_total", &labels),
            received_bytes: metrics.counter("keel_cluster_upstream_received_bytes_total", &labels),
            health_checks_ok: checks("success"),
            health_checks_failed: checks("failure"),
        }
    }
}

/// Handles for one endpoint of a cluster.
#[derive(Clone, Debug)]
pub struct EndpointMetrics {
    pub healthy: Gauge,
    pub ejections: Counter,
}

impl EndpointMetrics {
    pub fn new(metrics: &Metrics, cluster: &str, endpoint: &str) -> Self {
        let labels = [("cluster", cluster), ("endpoint", endpoint)];
        Self {
            healthy: metrics.gauge("keel_cluster_endpoint_healthy", &labels),
            ejections: metrics.counter("keel_cluster_endpoint_ejections_total", &labels),
        }
    }
}

/// Handles for the config apply path.
#[derive(Clone, Debug)]
pub struct ConfigMetrics {
    pub ready: Gauge,
    pub last_success: Gauge,
}

impl ConfigMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            ready: metrics.gauge("keel_server_ready", &[]),
            last_success: metrics.gauge("keel_config_last_reload_success_timestamp_seconds", &[]),
        }
    }

    pub fn applied(metrics: &Metrics, source: &str) -> Counter {
        metrics.counter("keel_config_reloads_total", &[("source", source)])
    }

    pub fn rejected(metrics: &Metrics, source: &str) -> Counter {
        metrics.counter("keel_config_reload_failures_total", &[("source", source)])
    }
}

/// How a DNS query was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DnsOutcome {
    Hijacked,
    CacheHit,
    Forwarded,
    Stale,
    Error,
}

impl DnsOutcome {
    /// Every outcome, in declaration order, so that `outcome as usize` is its index here.
    const ALL: [DnsOutcome; 5] = [
        DnsOutcome::Hijacked,
        DnsOutcome::CacheHit,
        DnsOutcome::Forwarded,
        DnsOutcome::Stale,
        DnsOutcome::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            DnsOutcome::Hijacked => "hijacked",
            DnsOutcome::CacheHit => "cache_hit",
            DnsOutcome::Forwarded => "forwarded",
            DnsOutcome::Stale => "stale",
            DnsOutcome::Error => "error",
        }
    }
}

/// Query types counted by name; every other type counts as `other`, so the label set stays bounded.
const DNS_TYPES: [&str; 12] =
    ["A", "AAAA", "ANY", "CNAME", "HTTPS", "MX", "NS", "PTR", "SOA", "SRV", "SVCB", "TXT"];

/// Handles for the DNS server.
#[derive(Clone, Debug)]
pub struct DnsMetrics {
    /// One counter per outcome (in [`DnsOutcome::ALL`] order) for each of [`DNS_TYPES`], then `other`.
    queries: Vec<[Counter; DnsOutcome::ALL.len()]>,
    pub upstream_duration: Histogram,
    pub cache_entries: Gauge,
}

impl DnsMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        let queries = DNS_TYPES
            .iter()
            .copied()
            .chain(["other"])
            .map(|query_type| {
                DnsOutcome::ALL.map(|outcome| {
                    let labels = [("type", query_type), ("outcome", outcome.label())];
                    metrics.counter("keel_dns_queries_total", &labels)
                })
            })
            .collect();
        Self {
            queries,
            upstream_duration: metrics.histogram(DNS_UPSTREAM_DURATION, &[]),
            cache_entries: metrics.gauge("keel_dns_cache_entries", &[]),
        }
    }

    /// Counts one query of type `query_type` (its mnemonic, such as `AAAA`).
    pub fn count(&self, query_type: &str, outcome: DnsOutcome) {
        let row = DNS_TYPES.iter().position(|known| *known == query_type).unwrap_or(DNS_TYPES.len());
        self.queries[row][outcome as usize].increment(1);
    }
}

/// Handles for one tunnelled service in one role (`router`, `publisher` or `visitor`).
#[derive(Clone, Debug)]
pub struct TunnelMetrics {
    metrics_service: String,
    role: &'static str,
    pub connections: Counter,
    pub active: Gauge,
    pub sent: Counter,
    pub received: Counter,
}

impl TunnelMetrics {
    pub fn new(metrics: &Metrics, service: &str, role: &'static str) -> Self {
        let labels = [("service", service), ("role", role)];
        Self {
            metrics_service: service.to_string(),
            role,
            connections: metrics.counter("keel_tunnel_connections_total", &labels),
            active: metrics.gauge("keel_tunnel_connections_active", &labels),
            sent: metrics.counter("keel_tunnel_sent_bytes_total", &labels),
            received: metrics.counter("keel_tunnel_received_bytes_total", &labels),
        }
    }

    /// Counts a refused or failed handshake.
    pub fn handshake_failed(&self, metrics: &Metrics, reason: &str) {
        let labels = [("service", self.metrics_service.as_str()), ("role", self.role), ("reason", reason)];
        metrics.counter("keel_tunnel_handshake_failures_total", &labels).increment(1);
    }

    /// A gauge of this service and role at `router` (`keel_tunnel_router_up`, `keel_tunnel_publishers`).
    pub fn router_gauge(&self, metrics: &Metrics, name: &'static str, router: &str) -> Gauge {
        metrics.gauge(
            name,
            &[("service", self.metrics_service.as_str()), ("role", self.role), ("router", router)],
        )
    }

    /// Counts a control connection to `router` opened again.
    pub fn reconnected(&self, metrics: &Metrics, router: &str) {
        let labels = [("service", self.metrics_service.as_str()), ("role", self.role), ("router", router)];
        metrics.counter("keel_tunnel_reconnects_total", &labels).increment(1);
    }
}
