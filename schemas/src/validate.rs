//! Semantic checks that the types alone cannot express: names, cross-references, duplicates, ranges.
//!
//! [`validate`] looks at the whole config and returns every problem at once, each with its path; the
//! loader adds line:column from the source map. The same function guards a static file and a snapshot
//! pushed by the control plane.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::config::{Cluster, Config, ControlPlane, Dns, HealthCheck, Listener, OutlierDetection, Tunnels};
use crate::diagnostic::{ConfigPath, Diagnostic};
use crate::dns::{HijackTable, is_valid_name};
use crate::types::{Duration, Secret, SocketAddress};

/// Most characters in a listener, cluster or node name.
const MAX_NAME_LEN: usize = 128;
/// Most DNS worker threads (`dns.workers`).
const MAX_DNS_WORKERS: u16 = 64;

/// Every semantic problem in `config`, in document order.
pub fn validate(config: &Config) -> Vec<Diagnostic> {
    let mut problems = Problems::default();
    let root = ConfigPath::root();

    if let Some(id) = &config.node.id {
        problems.check_name(&root.key("node").key("id"), id);
    }
    for (key, value) in &config.node.labels {
        let path = root.key("node").key("labels").key(key);
        if key.is_empty() || key.len() > 253 {
            problems.push(&path, "label keys must have 1 to 253 characters");
        }
        if value.len() > 63 {
            problems.push(&path, "label values must have at most 63 characters");
        }
    }
    if config.admin.token.is_some() && config.admin.token_file.is_some() {
        problems.push(&root.key("admin").key("token_file"), "set either token or token_file, not both");
    }
    if matches!(&config.admin.token, Some(token) if token.is_empty()) {
        problems.push(&root.key("admin").key("token"), "the token is empty");
    }

    let clusters: HashMap<&str, usize> =
        config.clusters.iter().enumerate().map(|(i, c)| (c.name.as_str(), i)).collect();
    let mut seen_listeners: HashMap<&str, usize> = HashMap::new();
    for (i, listener) in config.listeners.iter().enumerate() {
        let path = root.key("listeners").index(i);
        if let Some(first) = seen_listeners.insert(&listener.name, i) {
            problems.push(
                &path.key("name"),
                format!("duplicate listener name {:?} (also listeners[{first}])", listener.name),
            );
        }
        check_listener(&mut problems, &path, listener, &clusters);
        let earlier = config.listeners[..i].iter().enumerate();
        for (j, other) in earlier.filter(|(_, other)| other.address.overlaps(&listener.address)) {
            problems.push(
                &path.key("address"),
                format!("address {} overlaps listeners[{j}] ({})", listener.address, other.address),
            );
        }
        if listener.address.overlaps(&config.admin.address) {
            problems.push(
                &path.key("address"),
                format!("address {} overlaps admin.address ({})", listener.address, config.admin.address),
            );
        }
    }

    let mut seen_clusters: HashMap<&str, usize> = HashMap::new();
    for (i, cluster) in config.clusters.iter().enumerate() {
        let path = root.key("clusters").index(i);
        if let Some(first) = seen_clusters.insert(&cluster.name, i) {
            problems.push(
                &path.key("name"),
                format!("duplicate cluster name {:?} (also clusters[{first}])", cluster.name),
            );
        }
        check_cluster(&mut problems, &path, cluster);
    }
    if config.drain_timeout.is_zero() {
        problems.push(&root.key("drain_timeout"), "must be longer than 0s");
    }
    if let Some(dns) = &config.dns {
        check_dns(&mut problems, &root.key("dns"), dns, config);
    }
    if let Some(tunnels) = &config.tunnels {
        check_tunnels(&mut problems, &root.key("tunnels"), tunnels, config);
    }
    let mut reporter_names: HashMap<&str, usize> = HashMap::new();
    for (i, reporter) in config.reporters.iter().enumerate() {
        let path = root.key("reporters").index(i);
        problems.check_name(&path.key("name"), &reporter.name);
        if let Some(first) = reporter_names.insert(&reporter.name, i) {
            problems.push(
                &path.key("name"),
                format!("duplicate reporter name {:?} (also reporters[{first}])", reporter.name),
            );
        }
        check_reporter(&mut problems, &path, reporter);
    }
    let mut probe_names: HashMap<&str, usize> = HashMap::new();
    for (i, probe) in config.probes.iter().enumerate() {
        let path = root.key("probes").index(i);
        problems.check_name(&path.key("name"), &probe.name);
        if let Some(first) = probe_names.insert(&probe.name, i) {
            problems.push(
                &path.key("name"),
                format!("duplicate probe name {:?} (also probes[{first}])", probe.name),
            );
        }
        check_probe(&mut problems, &path, probe);
    }
    if let Some(control_plane) = &config.control_plane {
        check_control_plane(&mut problems, &root, control_plane, config);
    }
    problems.0
}

/// Most targets one probe may have: a full mesh of 1,000 nodes.
const MAX_PROBE_TARGETS: usize = 1000;

fn check_probe(problems: &mut Problems, path: &ConfigPath, probe: &crate::config::Probe) {
    problems.check_positive(&path.key("interval"), probe.interval);
    problems.check_positive(&path.key("timeout"), probe.timeout);
    if probe.timeout > probe.interval {
        problems.push(
            &path.key("timeout"),
            format!("timeout {} is longer than interval {}", probe.timeout, probe.interval),
        );
    }
    if probe.failure_threshold == 0 {
        problems.push(&path.key("failure_threshold"), "must be at least 1");
    }
    let Some(kind) = probe.kind() else {
        problems.push(path, "give exactly one of icmp, tcp, http, dns, udp");
        return;
    };
    let at = path.key(kind).key("targets");
    let targets = probe.targets();
    if targets.is_empty() {
        problems.push(&at, "give at least one target");
    }
    if targets.len() > MAX_PROBE_TARGETS {
        problems.push(&at, format!("{} targets; at most {MAX_PROBE_TARGETS}", targets.len()));
    }
    if let Some(icmp) = &probe.icmp {
        for (i, target) in icmp.targets.iter().enumerate() {
            if target.is_unspecified() || target.is_multicast() {
                problems.push(&at.index(i), format!("{target} cannot answer an echo request"));
            }
        }
    }
    if let Some(http) = &probe.http {
        for (i, url) in http.targets.iter().enumerate() {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                problems.push(&at.index(i), format!("{url:?}: give an http:// or https:// URL"));
            }
        }
        for (i, status) in http.expected_status.iter().enumerate() {
            if !(100..=599).contains(status) {
                problems.push(
                    &path.key("http").key("expected_status").index(i),
                    format!("{status} is not an HTTP status"),
                );
            }
        }
    }
    if let Some(dns) = &probe.dns {
        for (i, name) in dns.targets.iter().enumerate() {
            if !crate::dns::is_valid_name(name) {
                problems.push(&at.index(i), format!("invalid name {name:?}"));
            }
        }
        if dns.port == Some(0) {
            problems.push(&path.key("dns").key("port"), "port 0 cannot be connected to");
        }
    }
    if let Some(udp) = &probe.udp
        && !(1..=100).contains(&udp.packets)
    {
        problems.push(&path.key("udp").key("packets"), "must be between 1 and 100");
    }
}

fn check_reporter(problems: &mut Problems, path: &ConfigPath, reporter: &crate::config::Reporter) {
    use crate::config::{AddressSink, AddressSource};
    problems.check_positive(&path.key("interval"), reporter.interval);
    if let AddressSource::Interface(interface) = &reporter.source
        && (interface.name.is_empty() || interface.name.len() > 15 || interface.name.contains(['/', ' ']))
    {
        problems.push(
            &path.key("source").key("interface").key("name"),
            format!("invalid interface name {:?}", interface.name),
        );
    }
    if let AddressSource::Stun(stun) = &reporter.source
        && stun.servers.is_empty()
    {
        problems.push(&path.key("source").key("stun").key("servers"), "give at least one STUN server");
    }
    if let AddressSource::Http(http) = &reporter.source {
        let at = path.key("source").key("http").key("urls");
        if http.urls.is_empty() {
            problems.push(&at, "give at least one echo URL");
        }
        for (i, url) in http.urls.iter().enumerate() {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                problems.push(&at.index(i), format!("{url:?}: give an http:// or https:// URL"));
            }
        }
    }
    if let AddressSource::ControlPlane(source) = &reporter.source {
        let at = path.key("source").key("control_plane");
        check_report_url(problems, &at.key("url"), &source.url);
        check_secret(problems, &at, "token", source.token.as_ref(), source.token_file.is_some());
        let path_safe = |c: char| c.is_ascii_graphic() && !matches!(c, '/' | '?' | '#' | '%');
        if source.node.is_empty() || source.node.len() > 253 || !source.node.chars().all(path_safe) {
            problems.push(&at.key("node"), format!("invalid node name {:?}", source.node));
        }
    }
    match &reporter.sink {
        AddressSink::ControlPlane(endpoint) => {
            let at = path.key("sink").key("control_plane");
            check_report_url(problems, &at.key("url"), &endpoint.url);
            check_secret(problems, &at, "token", endpoint.token.as_ref(), endpoint.token_file.is_some());
        }
        AddressSink::Dns(dns) => {
            let at = path.key("sink").key("dns");
            for (field, message) in crate::resource::record_problems(&dns.zone, &dns.name, dns.ttl) {
                problems.push(&at.key(field), message);
            }
            if let Some((field, message)) = dns.provider.problem() {
                let field_path = field.split('.').fold(at.key("provider"), |path, key| path.key(key));
                problems.push(&field_path, message);
            }
        }
    }
}

/// A seed-000 API URL: `http://host:port`.
fn check_report_url(problems: &mut Problems, at: &ConfigPath, url: &str) {
    match crate::stream::Endpoint::parse(url) {
        Ok(parsed) if parsed.tls => {
            problems.push(at, "https is not supported for reports yet: give http://host:port")
        }
        Ok(_) => {}
        Err(problem) => problems.push(at, problem),
    }
}

/// The control plane's address, token, and the sections it owns: a file that follows a control plane
/// gives only `node`, `admin`, `drain_timeout` and `control_plane`.
fn check_control_plane(
    problems: &mut Problems,
    root: &ConfigPath,
    control_plane: &ControlPlane,
    config: &Config,
) {
    let path = root.key("control_plane");
    match crate::stream::Endpoint::parse(&control_plane.address) {
        Err(problem) => problems.push(&path.key("address"), problem),
        Ok(endpoint) if endpoint.tls && control_plane.ca_file.is_none() => problems.push(
            &path.key("ca_file"),
            "https needs ca_file: the CA certificates the control plane's certificate must chain to",
        ),
        Ok(_) => {}
    }
    if control_plane.token.is_some() && control_plane.token_file.is_some() {
        problems.push(&path.key("token_file"), "set either token or token_file, not both");
    }
    if matches!(&control_plane.token, Some(token) if token.is_empty()) {
        problems.push(&path.key("token"), "the token is empty");
    }
    problems.check_positive(&path.key("connect_timeout"), control_plane.connect_timeout);
    let owned = [
        ("listeners", !config.listeners.is_empty()),
        ("clusters", !config.clusters.is_empty()),
        ("dns", config.dns.is_some()),
        ("tunnels", config.tunnels.is_some()),
    ];
    for (section, present) in owned {
        if present {
            problems.push(
                &root.key(section),
                format!("{section} come from the control plane when control_plane is set; remove them from the file"),
            );
        }
    }
}

/// A Kubernetes service or namespace name: one DNS label.
fn is_service_name(name: &str) -> bool {
    is_valid_name(name) && !name.contains('.')
}

/// Exactly one of a secret and its file, and not an empty secret.
fn check_secret(problems: &mut Problems, path: &ConfigPath, key: &str, secret: Option<&Secret>, file: bool) {
    match (secret, file) {
        (Some(_), true) => problems
            .push(&path.key(format!("{key}_file")), format!("set either {key} or {key}_file, not both")),
        (None, false) => problems.push(path, format!("give {key} or {key}_file")),
        (Some(secret), false) if secret.is_empty() => {
            problems.push(&path.key(key), format!("the {key} is empty"))
        }
        _ => {}
    }
}

/// The routers an entry names, which must exist; `tunnels.routers` being empty is an error of its own.
fn check_router_refs(problems: &mut Problems, path: &ConfigPath, names: &[String], tunnels: &Tunnels) {
    if tunnels.routers.is_empty() {
        problems.push(path, "tunnels.routers is empty: there is no router to go through");
        return;
    }
    for (i, name) in names.iter().enumerate() {
        if !tunnels.routers.iter().any(|router| &router.name == name) {
            let known: Vec<&str> = tunnels.routers.iter().map(|router| router.name.as_str()).collect();
            problems.push(
                &path.key("routers").index(i),
                format!("no router named {name:?} in tunnels.routers (known: {})", known.join(", ")),
            );
        }
    }
}

/// Most pooled connections per router for one entry (`publish[].pool`, `visit[].pool`).
pub const MAX_POOL: u16 = 64;

fn check_tunnels(problems: &mut Problems, path: &ConfigPath, tunnels: &Tunnels, config: &Config) {
    problems.check_positive(&path.key("max_skew"), tunnels.max_skew);
    let mut taken: Vec<(SocketAddress, String)> = config
        .listeners
        .iter()
        .enumerate()
        .map(|(i, listener)| (listener.address, format!("listeners[{i}]")))
        .chain([(config.admin.address, "admin.address".to_string())])
        .chain(config.dns.iter().flat_map(|dns| {
            dns.listen.iter().enumerate().map(|(i, listen)| (*listen, format!("dns.listen[{i}]")))
        }))
        .collect();
    let mut claim = |problems: &mut Problems, at: &ConfigPath, address: SocketAddress| {
        if let Some((_, owner)) = taken.iter().find(|(other, _)| other.overlaps(&address)) {
            problems.push(at, format!("address {address} overlaps {owner}"));
        }
        taken.push((address, at.to_string()));
    };
    if let Some(server) = &tunnels.server {
        let at = path.key("server");
        claim(problems, &at.key("listen"), server.listen);
        check_secret(problems, &at, "token", server.token.as_ref(), server.token_file.is_some());
        problems.check_positive(&at.key("connect_timeout"), server.connect_timeout);
    }
    let mut router_names: HashMap<&str, usize> = HashMap::new();
    for (i, router) in tunnels.routers.iter().enumerate() {
        let at = path.key("routers").index(i);
        problems.check_name(&at.key("name"), &router.name);
        if let Some(first) = router_names.insert(router.name.as_str(), i) {
            problems.push(
                &at.key("name"),
                format!("duplicate router name {:?} (first at tunnels.routers[{first}])", router.name),
            );
        }
        check_secret(problems, &at, "token", router.token.as_ref(), router.token_file.is_some());
        if let Some(tls) = &router.tls
            && tls.cert_file.is_some() != tls.key_file.is_some()
        {
            problems.push(
                &at.key("tls"),
                "give cert_file and key_file together (a client certificate and its key)",
            );
        }
    }
    let mut published: HashMap<&str, usize> = HashMap::new();
    for (i, publish) in tunnels.publish.iter().enumerate() {
        let at = path.key("publish").index(i);
        if !is_service_name(&publish.name) {
            problems.push(&at.key("name"), format!("invalid service name {:?}: one DNS label", publish.name));
        }
        if let Some(first) = published.insert(publish.name.as_str(), i) {
            problems.push(
                &at.key("name"),
                format!("{:?} is already published by tunnels.publish[{first}]", publish.name),
            );
        }
        check_secret(problems, &at, "secret", publish.secret.as_ref(), publish.secret_file.is_some());
        check_router_refs(problems, &at, &publish.routers, tunnels);
        if !(1..=MAX_POOL).contains(&publish.pool) {
            problems.push(&at.key("pool"), format!("must be between 1 and {MAX_POOL}"));
        }
        problems.check_positive(&at.key("connect_timeout"), publish.connect_timeout);
    }
    let mut visited: HashMap<&str, usize> = HashMap::new();
    for (i, visit) in tunnels.visit.iter().enumerate() {
        let at = path.key("visit").index(i);
        if !is_service_name(&visit.name) {
            problems.push(&at.key("name"), format!("invalid service name {:?}: one DNS label", visit.name));
        }
        if let Some(first) = visited.insert(visit.name.as_str(), i) {
            problems.push(
                &at.key("name"),
                format!("{:?} is already visited by tunnels.visit[{first}]", visit.name),
            );
        }
        if let Some(namespace) = &visit.namespace
            && !is_service_name(namespace)
        {
            problems.push(&at.key("namespace"), format!("invalid namespace {namespace:?}"));
        }
        check_secret(problems, &at, "secret", visit.secret.as_ref(), visit.secret_file.is_some());
        check_router_refs(problems, &at, &visit.routers, tunnels);
        if visit.pool > MAX_POOL {
            problems.push(&at.key("pool"), format!("must be between 0 and {MAX_POOL}"));
        }
        match (visit.listen, visit.port) {
            (Some(listen), None) => claim(problems, &at.key("listen"), listen),
            (None, Some(0)) => problems.push(&at.key("port"), "must be between 1 and 65535"),
            (None, Some(_)) if config.dns.is_none() => problems.push(
                &at.key("port"),
                "a port without listen needs a dns section, which gives the service its VIP",
            ),
            (None, Some(_)) => {}
            (Some(_), Some(_)) => problems.push(&at.key("port"), "set either listen or port, not both"),
            (None, None) => {
                problems.push(&at, "give listen (an address), or port (on the service's VIP, with dns)")
            }
        }
    }
}

fn check_dns(problems: &mut Problems, path: &ConfigPath, dns: &Dns, config: &Config) {
    if dns.listen.is_empty() {
        problems.push(&path.key("listen"), "give at least one address to serve DNS on");
    }
    for (i, listen) in dns.listen.iter().enumerate() {
        let at = path.key("listen").index(i);
        // DNS serves TCP too, so it competes with the TCP listeners and the admin API for ports.
        for (j, listener) in config.listeners.iter().enumerate() {
            if listener.address.overlaps(listen) {
                problems
                    .push(&at, format!("address {listen} overlaps listeners[{j}] ({})", listener.address));
            }
        }
        if listen.overlaps(&config.admin.address) {
            problems.push(&at, format!("address {listen} overlaps admin.address ({})", config.admin.address));
        }
        if let Some(j) = dns.listen[..i].iter().position(|other| other.overlaps(listen)) {
            problems.push(&at, format!("address {listen} overlaps dns.listen[{j}]"));
        }
    }
    if !is_valid_name(&dns.namespace) || dns.namespace.contains('.') {
        problems.push(&path.key("namespace"), format!("invalid namespace {:?}", dns.namespace));
    }
    if !is_valid_name(&dns.cluster_domain) {
        problems.push(&path.key("cluster_domain"), format!("invalid DNS name {:?}", dns.cluster_domain));
    }
    let mut entries_valid = true;
    for (i, entry) in dns.hijack.iter().enumerate() {
        if entry.for_visit.is_some() {
            // Added for a visited service: its name and namespace are checked at tunnels.visit.
            let service_ok = entry.service.as_deref().is_some_and(is_service_name);
            let namespace_ok = entry.namespace.as_deref().is_none_or(is_service_name);
            entries_valid &= service_ok && namespace_ok;
            continue;
        }
        let at = path.key("hijack").index(i);
        let before = problems.0.len();
        match (&entry.service, &entry.name) {
            (Some(_), Some(_)) | (None, None) => {
                problems.push(&at, "give either service (a Kubernetes service name) or name (a DNS name)")
            }
            (Some(service), None) => {
                if !is_service_name(service) {
                    problems
                        .push(&at.key("service"), format!("invalid service name {service:?}: one DNS label"));
                }
            }
            (None, Some(name)) => {
                if entry.namespace.is_some() {
                    problems.push(&at.key("namespace"), "namespace goes with service, not with name");
                }
                let bare = name.strip_prefix("*.").unwrap_or(name);
                if !is_valid_name(bare) {
                    problems.push(&at.key("name"), format!("invalid DNS name {name:?}"));
                }
            }
        }
        if let Some(namespace) = &entry.namespace
            && !is_service_name(namespace)
        {
            problems.push(&at.key("namespace"), format!("invalid namespace {namespace:?}"));
        }
        entries_valid &= problems.0.len() == before;
    }
    if entries_valid && let Err(allocation) = HijackTable::build(dns, None) {
        problems.0.extend(allocation);
    }
    for (i, upstream) in dns.upstreams.iter().enumerate() {
        let loops_to = dns.listen.iter().position(|listen| is_same_server(listen.0, upstream.0));
        if let Some(j) = loops_to {
            problems.push(
                &path.key("upstreams").index(i),
                format!(
                    "{upstream} is this DNS server itself (dns.listen[{j}]): forwarding there would loop"
                ),
            );
        }
    }
    problems.check_positive(&path.key("ttl"), dns.ttl);
    problems.check_positive(&path.key("upstream_timeout"), dns.upstream_timeout);
    if dns.max_in_flight == 0 {
        problems.push(&path.key("max_in_flight"), "must be at least 1");
    }
    if !(1..=MAX_DNS_WORKERS).contains(&dns.workers) {
        problems.push(&path.key("workers"), format!("must be between 1 and {MAX_DNS_WORKERS}"));
    }
    let cache = path.key("cache");
    if dns.cache.size == 0 {
        problems.push(&cache.key("size"), "must be at least 1");
    }
    if dns.cache.min_ttl > dns.cache.max_ttl {
        problems.push(
            &cache.key("min_ttl"),
            format!("min_ttl {} is longer than max_ttl {}", dns.cache.min_ttl, dns.cache.max_ttl),
        );
    }
}

/// Whether queries sent to `upstream` would reach a server listening on `listen`: the same address, or
/// a wildcard listen address and an upstream on this host (loopback or wildcard) with the same port.
fn is_same_server(listen: SocketAddr, upstream: SocketAddr) -> bool {
    listen.port() == upstream.port()
        && (listen.ip() == upstream.ip()
            || (listen.ip().is_unspecified()
                && listen.is_ipv4() == upstream.is_ipv4()
                && (upstream.ip().is_loopback() || upstream.ip().is_unspecified())))
}

fn check_listener(
    problems: &mut Problems,
    path: &ConfigPath,
    listener: &Listener,
    clusters: &HashMap<&str, usize>,
) {
    problems.check_name(&path.key("name"), &listener.name);
    if !clusters.contains_key(listener.cluster.as_str()) {
        let mut known: Vec<&str> = clusters.keys().copied().collect();
        known.sort_unstable();
        let hint = if known.is_empty() {
            "no clusters are defined".to_string()
        } else {
            format!("defined: {}", known.join(", "))
        };
        problems.push(&path.key("cluster"), format!("no cluster named {:?} ({hint})", listener.cluster));
    }
    if listener.max_connections == Some(0) {
        problems.push(&path.key("max_connections"), "must be at least 1 (leave it out for no limit)");
    }
}

fn check_cluster(problems: &mut Problems, path: &ConfigPath, cluster: &Cluster) {
    problems.check_name(&path.key("name"), &cluster.name);
    if cluster.endpoints.is_empty() {
        problems.push(&path.key("endpoints"), "a cluster needs at least one endpoint");
    }
    for (i, endpoint) in cluster.endpoints.iter().enumerate() {
        let endpoint_path = path.key("endpoints").index(i);
        if endpoint.port == 0 {
            problems.push(&endpoint_path, "port 0 cannot be connected to");
        }
        if let Some(first) = cluster.endpoints[..i].iter().position(|other| other == endpoint) {
            problems.push(&endpoint_path, format!("duplicate endpoint {endpoint} (also endpoints[{first}])"));
        }
    }
    problems.check_positive(&path.key("connect_timeout"), cluster.connect_timeout);
    if cluster.connect_attempts == 0 {
        problems.push(&path.key("connect_attempts"), "must be at least 1");
    }
    if let Some(health) = &cluster.health_check {
        check_health(problems, &path.key("health_check"), health);
    }
    if let Some(outlier) = &cluster.outlier_detection {
        check_outlier(problems, &path.key("outlier_detection"), outlier);
    }
}

fn check_health(problems: &mut Problems, path: &ConfigPath, health: &HealthCheck) {
    problems.check_positive(&path.key("interval"), health.interval);
    problems.check_positive(&path.key("timeout"), health.timeout);
    if health.timeout > health.interval {
        problems.push(
            &path.key("timeout"),
            format!("timeout {} is longer than interval {}", health.timeout, health.interval),
        );
    }
    if health.healthy_threshold == 0 {
        problems.push(&path.key("healthy_threshold"), "must be at least 1");
    }
    if health.unhealthy_threshold == 0 {
        problems.push(&path.key("unhealthy_threshold"), "must be at least 1");
    }
}

fn check_outlier(problems: &mut Problems, path: &ConfigPath, outlier: &OutlierDetection) {
    if outlier.consecutive_failures == 0 {
        problems.push(&path.key("consecutive_failures"), "must be at least 1");
    }
    problems.check_positive(&path.key("base_ejection_time"), outlier.base_ejection_time);
    if outlier.max_ejection_percent > 100 {
        problems.push(&path.key("max_ejection_percent"), "must be between 0 and 100");
    }
}

#[derive(Default)]
struct Problems(Vec<Diagnostic>);

impl Problems {
    fn push(&mut self, path: &ConfigPath, message: impl Into<String>) {
        self.0.push(Diagnostic::new(path.clone(), message));
    }

    fn check_name(&mut self, path: &ConfigPath, name: &str) {
        let valid_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if name.is_empty() || name.len() > MAX_NAME_LEN || !valid_chars {
            self.push(
                path,
                format!("invalid name {name:?}: use 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.'"),
            );
        }
    }

    fn check_positive(&mut self, path: &ConfigPath, duration: Duration) {
        if duration.is_zero() {
            self.push(path, "must be longer than 0s");
        }
    }
}
