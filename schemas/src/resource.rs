//! The control plane's resources: Kubernetes-shaped objects (`apiVersion`, `kind`, `metadata`, `spec`,
//! `status`) under `edge.example.com/v1`, and the checks their specs get before they are stored.
//!
//! Each kind that configures proxies carries one piece of keel.yaml in its `spec`, spelt exactly as in
//! the file (snake_case keys, `10s` durations), plus a `node_selector`: the labels a node must have to get
//! it (all of them; an empty selector selects every node). The resource's name is the piece's name.
//!
//! | kind | plural | scope | spec |
//! |---|---|---|---|
//! | Listener | listeners | cluster | a `listeners` item |
//! | Cluster | clusters | cluster | a `clusters` item |
//! | DnsZone | dnszones | cluster | the `dns` section (hijack entries of every selected zone are merged) |
//! | PublishedService | publishedservices | namespaced | a `tunnels.publish` item |
//! | VisitedService | visitedservices | namespaced | a `tunnels.visit` item (its namespace is the resource's) |
//! | Router | routers | cluster | the router's node, `tunnels.server` settings, and how clients reach it |
//! | Node | nodes | cluster | none; `status` is each proxy's record, kept by the control plane |
//! | DnsRecord | dnsrecords | cluster | a name kept pointing at the address a node reports (DDNS) |
//! | DnsProvider | dnsproviders | cluster | how to change a zone (RFC 2136 with TSIG, Cloudflare, Gandi) |
//!
//! Specs go through the same [`validate`](crate::validate::validate) as a file, on a one-piece config;
//! what only a whole node can show (a port taken twice, a listener's cluster not selected for the node)
//! is found by the proxy, which refuses the snapshot (a NACK) and keeps its last good one.
//! Secrets are never stored: specs name secret *files* on the node (`secret_file`, `token_file`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{
    ClientTls, Cluster, Config, Dns, Listener, Publish, RouterRef, ServerTls, TunnelBalancing, TunnelServer,
    Tunnels, Visit,
};
use crate::types::{Duration, HostPort, SocketAddress};

pub const GROUP: &str = "edge.example.com";
pub const API_VERSION: &str = "edge.example.com/v1";
/// The label every node has implicitly, holding its name, to select one node.
pub const NODE_LABEL: &str = "edge.example.com/node";

/// The kinds of resource the control plane stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Listener,
    Cluster,
    DnsZone,
    PublishedService,
    VisitedService,
    Router,
    Node,
    DnsRecord,
    DnsProvider,
    Probe,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Listener,
        Kind::Cluster,
        Kind::DnsZone,
        Kind::PublishedService,
        Kind::VisitedService,
        Kind::Router,
        Kind::Node,
        Kind::DnsRecord,
        Kind::DnsProvider,
        Kind::Probe,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Listener => "Listener",
            Kind::Cluster => "Cluster",
            Kind::DnsZone => "DnsZone",
            Kind::PublishedService => "PublishedService",
            Kind::VisitedService => "VisitedService",
            Kind::Router => "Router",
            Kind::Node => "Node",
            Kind::DnsRecord => "DnsRecord",
            Kind::DnsProvider => "DnsProvider",
            Kind::Probe => "Probe",
        }
    }

    /// The name in URL paths.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Listener => "listeners",
            Kind::Cluster => "clusters",
            Kind::DnsZone => "dnszones",
            Kind::PublishedService => "publishedservices",
            Kind::VisitedService => "visitedservices",
            Kind::Router => "routers",
            Kind::Node => "nodes",
            Kind::DnsRecord => "dnsrecords",
            Kind::DnsProvider => "dnsproviders",
            Kind::Probe => "probes",
        }
    }

    pub fn namespaced(self) -> bool {
        matches!(self, Kind::PublishedService | Kind::VisitedService)
    }

    pub fn from_plural(plural: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.plural() == plural)
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

/// A stored object, as the REST API reads and writes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resource {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub status: Value,
}

/// `metadata`. `uid`, `resourceVersion`, `generation` and `creationTimestamp` are the server's; a write
/// may carry `resourceVersion` to make it conditional.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource_version: String,
    #[serde(default)]
    pub generation: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

/// One failing field, by its path in the resource (`spec.endpoints[1]`, `metadata.name`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// A piece of config and the nodes it goes to.
#[derive(Clone, Debug, PartialEq)]
pub struct Selected<T> {
    pub node_selector: BTreeMap<String, String>,
    pub item: T,
}

impl<T> Selected<T> {
    /// Whether a node with `labels` gets this piece.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.node_selector.iter().all(|(key, value)| labels.get(key) == Some(value))
    }
}

/// A Router's spec: which node runs it, its `tunnels.server` settings, and how others reach it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSpec {
    /// The node (its `node.id`) that runs the router; the resource's name by default, as in the seed,
    /// where each node's Router is named after the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Where the router listens, on its node.
    pub listen: SocketAddress,
    /// How publishers and visitors reach it (`router-1.example:7000`).
    pub address: HostPort,
    /// File, on every node involved, holding the router token.
    pub token_file: String,
    #[serde(default)]
    pub balance: TunnelBalancing,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    /// The router's certificate (files on the router's node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
    /// How clients check that certificate (files on their nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_tls: Option<ClientTls>,
}

fn default_connect_timeout() -> Duration {
    crate::config::defaults::connect_timeout()
}

impl RouterSpec {
    /// The node that runs the router named `name`.
    pub fn node_of<'a>(&'a self, name: &'a str) -> &'a str {
        self.node.as_deref().unwrap_or(name)
    }

    pub fn server(&self) -> TunnelServer {
        TunnelServer {
            listen: self.listen,
            token: None,
            token_file: Some(self.token_file.clone()),
            balance: self.balance,
            connect_timeout: self.connect_timeout,
            tls: self.tls.clone(),
        }
    }

    pub fn reference(&self, name: &str) -> RouterRef {
        RouterRef {
            name: name.to_string(),
            address: self.address.clone(),
            token: None,
            token_file: Some(self.token_file.clone()),
            tls: self.client_tls.clone(),
        }
    }
}

/// A checked spec.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    Listener(Selected<Listener>),
    Cluster(Selected<Cluster>),
    DnsZone(Selected<Dns>),
    PublishedService(Selected<Publish>),
    VisitedService(Selected<Visit>),
    Router(RouterSpec),
    Node,
    DnsRecord(DnsRecordSpec),
    DnsProvider(DnsProviderSpec),
    Probe(ProbeSpec),
}

/// A Probe: keel.yaml's probe (named by the resource) for the nodes it selects, with fixed targets or
/// with `peers`, which the control plane fills per node from the live proxies the probe also selects.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeSpec {
    pub selected: Selected<crate::config::Probe>,
    pub peers: Option<Peers>,
}

/// Which peers a node probes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peers {
    /// Each peer's node IP (the host mesh) or pod IP (the pod mesh), as its hello gave them.
    #[serde(default)]
    pub address: PeerAddress,
    /// The port for `tcp`, `udp` and `http` probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The path for `http` probes.
    #[serde(default = "default_peer_path")]
    pub path: String,
    /// Peers per node, chosen by rendezvous hashing (assignments barely move when nodes come and go);
    /// 0 for every peer.
    #[serde(default)]
    pub count: usize,
}

fn default_peer_path() -> String {
    "/".to_string()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerAddress {
    #[default]
    NodeIp,
    PodIp,
}

impl Peers {
    /// The target text for a peer at `ip`, in the probe's `kind`.
    pub fn target(&self, kind: &str, ip: std::net::IpAddr) -> String {
        let socket = |port: u16| std::net::SocketAddr::new(ip, port).to_string();
        match kind {
            "tcp" | "udp" => socket(self.port.unwrap_or(0)),
            "http" => format!("http://{}{}", socket(self.port.unwrap_or(80)), self.path),
            _ => ip.to_string(),
        }
    }
}

/// A DNS record kept pointing at the address a node reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsRecordSpec {
    /// The zone the record is in (`example.com`).
    pub zone: String,
    /// The record's name, relative to the zone (`gw`; `@` for the zone's apex) or absolute with a final
    /// dot (`gw.example.com.`).
    pub name: String,
    #[serde(rename = "type")]
    pub record_type: RecordType,
    #[serde(default = "crate::config::defaults::record_ttl")]
    pub ttl: Duration,
    /// Whose address: the node that reports it (its `node.id`, or its source address for seed 000's
    /// agents, which send no name).
    pub address_from: AddressFrom,
    /// The DnsProvider that changes the zone.
    pub provider: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressFrom {
    pub node: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordType {
    A,
    #[allow(clippy::upper_case_acronyms)]
    AAAA,
}

impl RecordType {
    /// Whether `address` belongs in a record of this type.
    pub fn fits(self, address: std::net::IpAddr) -> bool {
        matches!(
            (self, address),
            (RecordType::A, std::net::IpAddr::V4(_)) | (RecordType::AAAA, std::net::IpAddr::V6(_))
        )
    }
}

impl DnsRecordSpec {
    /// The record's fully qualified name, lowercase, with the final dot.
    pub fn fqdn(&self) -> String {
        record_fqdn(&self.zone, &self.name)
    }
}

/// What is wrong with a record's `zone`, `name` and `ttl`: (field, why) for each problem.
pub fn record_problems(zone: &str, name: &str, ttl: Duration) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    let fqdn = record_fqdn(zone, name);
    if !crate::dns::is_valid_name(zone.trim_end_matches('.')) {
        problems.push(("zone", format!("invalid zone name {zone:?}")));
    } else if name != "@" && !crate::dns::is_valid_name(fqdn.trim_end_matches('.')) {
        problems.push(("name", format!("invalid record name {name:?}")));
    } else {
        let zone = format!("{}.", zone.trim_end_matches('.').to_ascii_lowercase());
        if fqdn != zone && !fqdn.ends_with(&format!(".{zone}")) {
            problems.push(("name", format!("{fqdn} is not in zone {zone}")));
        }
    }
    if ttl.is_zero() {
        problems.push(("ttl", "must be longer than 0s".to_string()));
    }
    problems
}

/// A record's fully qualified name, lowercase, with the final dot: `name` relative to `zone` (`gw`, `@`
/// for the apex) or absolute with a final dot.
pub fn record_fqdn(zone: &str, name: &str) -> String {
    let zone = zone.trim_end_matches('.').to_ascii_lowercase();
    let name = name.to_ascii_lowercase();
    if name == "@" {
        format!("{zone}.")
    } else if name.ends_with('.') {
        name
    } else {
        format!("{name}.{zone}.")
    }
}

/// How the control plane changes a zone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DnsProviderSpec {
    /// RFC 2136 dynamic update, signed with TSIG (RFC 8945), to the zone's primary server (BIND, Knot,
    /// PowerDNS). Updates are verified by querying that server.
    Rfc2136(Rfc2136Provider),
    /// Cloudflare's API v4 with an API token (Zone.DNS edit).
    Cloudflare(CloudflareProvider),
    /// Alibaba Cloud DNS (the RPC API, signature version 1.0) with a RAM user's AccessKey.
    Alibaba(AlibabaProvider),
    /// Gandi LiveDNS (API v5) with a personal access token.
    Gandi(GandiProvider),
}

impl DnsProviderSpec {
    /// The files holding credentials: ((provider key, field), path).
    pub fn secret_files(&self) -> Vec<((&'static str, &'static str), &str)> {
        match self {
            DnsProviderSpec::Rfc2136(p) => vec![(("rfc2136", "secret_file"), p.secret_file.as_str())],
            DnsProviderSpec::Cloudflare(p) => {
                vec![(("cloudflare", "api_token_file"), p.api_token_file.as_str())]
            }
            DnsProviderSpec::Alibaba(p) => {
                vec![(("alibaba", "access_key_secret_file"), p.access_key_secret_file.as_str())]
            }
            DnsProviderSpec::Gandi(p) => vec![(("gandi", "api_token_file"), p.api_token_file.as_str())],
        }
    }

    /// What is wrong with these settings, if anything: the field (dotted, from the provider's key, as in
    /// `rfc2136.algorithm`) and why.
    pub fn problem(&self) -> Option<(String, String)> {
        let http_url = |url: &str| url.starts_with("https://") || url.starts_with("http://");
        let at = |field: &str, message: String| Some((field.to_string(), message));
        match self {
            DnsProviderSpec::Rfc2136(rfc2136) => {
                if rfc2136.algorithm != "hmac-sha256" {
                    return at("rfc2136.algorithm", "only hmac-sha256 is supported".to_string());
                }
                if !crate::dns::is_valid_name(rfc2136.key_name.trim_end_matches('.')) {
                    return at("rfc2136.key_name", format!("invalid key name {:?}", rfc2136.key_name));
                }
            }
            DnsProviderSpec::Gandi(gandi) if !http_url(&gandi.api_url) => {
                return at("gandi.api_url", "give an http:// or https:// URL".to_string());
            }
            DnsProviderSpec::Gandi(_) => {}
            DnsProviderSpec::Cloudflare(cloudflare) => {
                if !http_url(&cloudflare.api_url) {
                    return at("cloudflare.api_url", "give an http:// or https:// URL".to_string());
                }
                let bad_id = |id: &String| id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric());
                if cloudflare.zone_id.as_ref().is_some_and(bad_id) {
                    return at("cloudflare.zone_id", "a zone ID is letters and digits".to_string());
                }
            }
            DnsProviderSpec::Alibaba(alibaba) => {
                if !http_url(&alibaba.api_url) {
                    return at("alibaba.api_url", "give an http:// or https:// URL".to_string());
                }
                let id = &alibaba.access_key_id;
                if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return at("alibaba.access_key_id", "an AccessKey ID is letters and digits".to_string());
                }
            }
        }
        None
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GandiProvider {
    /// File holding the personal access token.
    pub api_token_file: String,
    /// The API's base URL.
    #[serde(default = "default_gandi_url")]
    pub api_url: String,
}

fn default_gandi_url() -> String {
    "https://api.gandi.net/v5/livedns".to_string()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CloudflareProvider {
    /// File holding the API token.
    pub api_token_file: String,
    /// The zone's ID (the dashboard shows it); looked up by the record's zone name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_id: Option<String>,
    /// The API's base URL.
    #[serde(default = "default_cloudflare_url")]
    pub api_url: String,
}

fn default_cloudflare_url() -> String {
    "https://api.cloudflare.com/client/v4".to_string()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AlibabaProvider {
    /// The AccessKey's ID (not a secret: it names the key).
    pub access_key_id: String,
    /// File holding the AccessKey's secret.
    pub access_key_secret_file: String,
    /// The API's endpoint.
    #[serde(default = "default_alibaba_url")]
    pub api_url: String,
}

fn default_alibaba_url() -> String {
    "https://alidns.aliyuncs.com/".to_string()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rfc2136Provider {
    /// The primary server, `IP:port`.
    pub server: SocketAddress,
    /// The TSIG key's name, as the server knows it.
    pub key_name: String,
    /// The TSIG algorithm; `hmac-sha256` is the one supported.
    #[serde(default = "default_tsig_algorithm")]
    pub algorithm: String,
    /// File holding the key's secret, base64 as `tsig-keygen` prints it.
    pub secret_file: String,
}

fn default_tsig_algorithm() -> String {
    "hmac-sha256".to_string()
}

/// Checks an object's envelope and metadata for `kind` (the URL's), where `namespace` is the URL's.
pub fn check_envelope(resource: &Resource, kind: Kind, namespace: Option<&str>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if resource.api_version != API_VERSION {
        errors.push(FieldError::new("apiVersion", format!("must be {API_VERSION}")));
    }
    if resource.kind != kind.name() {
        errors.push(FieldError::new("kind", format!("must be {} at this path", kind.name())));
    }
    let meta = &resource.metadata;
    if !is_object_name(&meta.name) {
        errors.push(FieldError::new(
            "metadata.name",
            format!("invalid name {:?}: lowercase letters, digits, '-' and '.', at most 253, starting and ending with a letter or digit", meta.name),
        ));
    }
    match (kind.namespaced(), meta.namespace.as_deref(), namespace) {
        (true, Some(given), Some(url)) if given != url => errors.push(FieldError::new(
            "metadata.namespace",
            format!("{given:?} does not match the namespace in the URL ({url:?})"),
        )),
        (false, Some(_), _) => {
            errors.push(FieldError::new("metadata.namespace", format!("{} is not namespaced", kind.name())))
        }
        _ => {}
    }
    for (key, value) in &meta.labels {
        if key.is_empty() || key.len() > 253 {
            errors.push(FieldError::new(format!("metadata.labels.{key}"), "keys have 1 to 253 characters"));
        }
        if value.len() > 63 {
            errors
                .push(FieldError::new(format!("metadata.labels.{key}"), "values have at most 63 characters"));
        }
    }
    errors
}

/// A Kubernetes object name (RFC 1123 subdomain).
pub fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Checks `spec` for a resource of `kind` named `name` (in `namespace`) with keel.yaml's own checks.
pub fn check_spec(
    kind: Kind,
    name: &str,
    namespace: Option<&str>,
    spec: &Value,
) -> Result<Spec, Vec<FieldError>> {
    match kind {
        Kind::Node => Ok(Spec::Node),
        Kind::DnsRecord => {
            let record: DnsRecordSpec = deserialize(spec.clone(), "spec")?;
            let mut errors: Vec<FieldError> = record_problems(&record.zone, &record.name, record.ttl)
                .into_iter()
                .map(|(field, message)| FieldError::new(format!("spec.{field}"), message))
                .collect();
            if record.address_from.node.is_empty() {
                errors.push(FieldError::new(
                    "spec.address_from.node",
                    "name the node whose address the record follows",
                ));
            }
            if !is_object_name(&record.provider) {
                errors.push(FieldError::new(
                    "spec.provider",
                    format!("invalid provider name {:?}", record.provider),
                ));
            }
            if errors.is_empty() { Ok(Spec::DnsRecord(record)) } else { Err(errors) }
        }
        Kind::DnsProvider => {
            let provider: DnsProviderSpec = deserialize(spec.clone(), "spec")?;
            if let Some((field, message)) = provider.problem() {
                return Err(vec![FieldError::new(format!("spec.{field}"), message)]);
            }
            Ok(Spec::DnsProvider(provider))
        }
        Kind::Router => {
            let router: RouterSpec = deserialize(spec.clone(), "spec")?;
            let config = fragment(|config| {
                config.tunnels = Some(tunnels_with(|tunnels| tunnels.server = Some(router.server())));
            });
            semantic(&config, "tunnels.server", &[])?;
            if let Some(node) = &router.node
                && !is_object_name(node)
            {
                return Err(vec![FieldError::new("spec.node", format!("invalid node name {node:?}"))]);
            }
            Ok(Spec::Router(router))
        }
        Kind::Probe => {
            let mut spec = spec.clone();
            let peers: Option<Peers> = match spec.as_object_mut().and_then(|fields| fields.remove("peers")) {
                Some(peers) => Some(deserialize(peers, "spec.peers")?),
                None => None,
            };
            let (node_selector, item) = piece::<crate::config::Probe>(&spec, name, None)?;
            let mut checked = item.clone();
            if let Some(peers) = &peers {
                let kind = item.kind().unwrap_or_default();
                if !item.targets().is_empty() {
                    return Err(vec![FieldError::new(
                        format!("spec.{kind}.targets"),
                        "leave them out: with peers, the control plane gives each node its targets",
                    )]);
                }
                let needs_port = matches!(kind, "tcp" | "udp" | "http");
                if kind == "dns" {
                    return Err(vec![FieldError::new(
                        "spec.peers",
                        "peers are addresses; a dns probe resolves names",
                    )]);
                }
                if needs_port && peers.port.is_none_or(|port| port == 0) {
                    return Err(vec![FieldError::new(
                        "spec.peers.port",
                        format!("a {kind} probe needs the peers' port"),
                    )]);
                }
                if !peers.path.starts_with('/') {
                    return Err(vec![FieldError::new("spec.peers.path", "a path starts with /")]);
                }
                // Validate as the proxy will see it, with one peer in place.
                checked.set_targets(&[peers.target(kind, std::net::IpAddr::from([192, 0, 2, 1]))]);
            }
            let config = fragment(|config| config.probes = vec![checked.clone()]);
            semantic(&config, "probes[0]", &[])?;
            Ok(Spec::Probe(ProbeSpec { selected: Selected { node_selector, item }, peers }))
        }
        Kind::Listener => {
            let (node_selector, item) = piece::<Listener>(spec, name, None)?;
            let config = fragment(|config| {
                config.clusters = vec![stub_cluster(&item.cluster)];
                config.listeners = vec![item.clone()];
            });
            semantic(&config, "listeners[0]", &["admin.address"])?;
            Ok(Spec::Listener(Selected { node_selector, item }))
        }
        Kind::Cluster => {
            let (node_selector, item) = piece::<Cluster>(spec, name, None)?;
            let config = fragment(|config| config.clusters = vec![item.clone()]);
            semantic(&config, "clusters[0]", &[])?;
            Ok(Spec::Cluster(Selected { node_selector, item }))
        }
        Kind::DnsZone => {
            let (node_selector, item) = piece::<Dns>(spec, "", None)?;
            let config = fragment(|config| config.dns = Some(item.clone()));
            semantic(&config, "dns", &["admin.address"])?;
            Ok(Spec::DnsZone(Selected { node_selector, item }))
        }
        Kind::PublishedService => {
            let (node_selector, item) = piece::<Publish>(spec, name, None)?;
            refuse_inline_secret(item.secret.is_some())?;
            let config = fragment(|config| {
                config.tunnels = Some(tunnels_with(|tunnels| {
                    tunnels.routers = stub_routers(&item.routers);
                    tunnels.publish = vec![item.clone()];
                }));
            });
            semantic(&config, "tunnels.publish[0]", &[])?;
            Ok(Spec::PublishedService(Selected { node_selector, item }))
        }
        Kind::VisitedService => {
            let (node_selector, item) = piece::<Visit>(spec, name, namespace)?;
            refuse_inline_secret(item.secret.is_some())?;
            let config = fragment(|config| {
                config.dns = Some(from_empty());
                config.tunnels = Some(tunnels_with(|tunnels| {
                    tunnels.routers = stub_routers(&item.routers);
                    tunnels.visit = vec![item.clone()];
                }));
            });
            semantic(&config, "tunnels.visit[0]", &["admin.address", "dns.listen"])?;
            Ok(Spec::VisitedService(Selected { node_selector, item }))
        }
    }
}

/// A section as an empty mapping gives it: every field at its default.
fn from_empty<T: serde::de::DeserializeOwned>() -> T {
    serde_json::from_value(Value::Object(Map::new())).expect("every field of the section has a default")
}

/// An otherwise empty keel.yaml (serde's defaults, as a file gets them) holding one piece.
fn fragment(fill: impl FnOnce(&mut Config)) -> Config {
    let mut config: Config = from_empty();
    fill(&mut config);
    config
}

fn refuse_inline_secret(inline: bool) -> Result<(), Vec<FieldError>> {
    if inline {
        return Err(vec![FieldError::new(
            "spec.secret",
            "secrets are not stored in the control plane: give secret_file, a file on the node (such as a mounted Kubernetes Secret)",
        )]);
    }
    Ok(())
}

fn tunnels_with(fill: impl FnOnce(&mut Tunnels)) -> Tunnels {
    let mut tunnels: Tunnels = from_empty();
    fill(&mut tunnels);
    tunnels
}

fn stub_cluster(name: &str) -> Cluster {
    serde_json::from_value(serde_json::json!({"name": name, "endpoints": ["127.0.0.1:1"]}))
        .expect("a cluster with one endpoint is whole")
}

/// Routers for a piece's references to point at, so that only the piece itself is judged.
fn stub_routers(names: &[String]) -> Vec<RouterRef> {
    let names: Vec<String> = if names.is_empty() { vec!["router".to_string()] } else { names.to_vec() };
    names
        .into_iter()
        .map(|name| RouterRef {
            name,
            address: "127.0.0.1:1".parse().expect("a literal address"),
            token: None,
            token_file: Some("/stub".to_string()),
            tls: None,
        })
        .collect()
}

/// Splits `node_selector` off a spec, puts the resource's name (and namespace) in, and deserializes the
/// rest as a keel.yaml piece.
fn piece<T: serde::de::DeserializeOwned>(
    spec: &Value,
    name: &str,
    namespace: Option<&str>,
) -> Result<(BTreeMap<String, String>, T), Vec<FieldError>> {
    let Value::Object(fields) = spec else {
        return Err(vec![FieldError::new("spec", "must be an object")]);
    };
    let mut fields = fields.clone();
    let node_selector = match fields.remove("node_selector") {
        Some(selector) => deserialize(selector, "spec.node_selector")?,
        None => BTreeMap::new(),
    };
    if !name.is_empty() {
        if fields.contains_key("name") {
            return Err(vec![FieldError::new("spec.name", "leave it out: the name is metadata.name")]);
        }
        fields.insert("name".into(), Value::String(name.to_string()));
    }
    if let Some(namespace) = namespace {
        if fields.contains_key("namespace") {
            return Err(vec![FieldError::new(
                "spec.namespace",
                "leave it out: the namespace is metadata.namespace",
            )]);
        }
        fields.insert("namespace".into(), Value::String(namespace.to_string()));
    }
    Ok((node_selector, deserialize(Value::Object(fields), "spec")?))
}

fn deserialize<T: serde::de::DeserializeOwned>(value: Value, base: &str) -> Result<T, Vec<FieldError>> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let field = if path == "." { base.to_string() } else { format!("{base}.{path}") };
        let message = error.inner().to_string();
        let message = message.rfind(" at line ").map_or(message.clone(), |cut| message[..cut].to_string());
        vec![FieldError::new(field, message)]
    })
}

/// Runs keel.yaml's validation on a one-piece config and keeps what it says about the piece at
/// `prefix`, minus messages about the node's other parts (`ignore`), which only the proxy can judge.
fn semantic(config: &Config, prefix: &str, ignore: &[&str]) -> Result<(), Vec<FieldError>> {
    let errors: Vec<FieldError> = crate::validate::validate(config)
        .into_iter()
        .filter_map(|diagnostic| {
            let path = diagnostic.path.to_string();
            let rest = path.strip_prefix(prefix)?;
            if ignore.iter().any(|other| diagnostic.message.contains(other)) {
                return None;
            }
            let field = match rest {
                ".name" => "metadata.name".to_string(),
                ".namespace" => "metadata.namespace".to_string(),
                "" => "spec".to_string(),
                _ => format!("spec{rest}"),
            };
            Some(FieldError::new(field, diagnostic.message))
        })
        .collect();
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(result: Result<Spec, Vec<FieldError>>) -> Vec<String> {
        result.unwrap_err().into_iter().map(|error| format!("{}: {}", error.field, error.message)).collect()
    }

    #[test]
    fn listener_specs_are_keel_yaml_listeners() {
        let spec = json!({"node_selector": {"zone": "a"}, "address": "127.0.0.1:8080", "cluster": "db"});
        let Spec::Listener(listener) = check_spec(Kind::Listener, "web", None, &spec).unwrap() else {
            panic!()
        };
        assert_eq!(listener.item.name, "web");
        assert!(listener.selects(&BTreeMap::from([("zone".into(), "a".into()), ("x".into(), "y".into())])));
        assert!(!listener.selects(&BTreeMap::new()));

        let bad = json!({"address": "127.0.0.1:80", "cluster": "db", "max_connections": 0, "colour": 1});
        assert_eq!(
            fields(check_spec(Kind::Listener, "web", None, &bad)),
            [
                "spec.colour: unknown field `colour`, expected one of `name`, `address`, `cluster`, `idle_timeout`, `max_connections`, `allowed_sources`"
            ]
        );
        let bad = json!({"address": "127.0.0.1:80", "cluster": "db", "max_connections": 0});
        assert_eq!(
            fields(check_spec(Kind::Listener, "web", None, &bad)),
            ["spec.max_connections: must be at least 1 (leave it out for no limit)"]
        );
        let named = json!({"name": "x", "address": "127.0.0.1:80", "cluster": "db"});
        assert_eq!(
            fields(check_spec(Kind::Listener, "web", None, &named)),
            ["spec.name: leave it out: the name is metadata.name"]
        );
    }

    #[test]
    fn cluster_and_router_specs() {
        let bad = json!({"endpoints": []});
        assert_eq!(
            fields(check_spec(Kind::Cluster, "db", None, &bad))[0].split(':').next(),
            Some("spec.endpoints")
        );
        let router =
            json!({"listen": "0.0.0.0:7000", "address": "router-1:7000", "token_file": "/run/token"});
        let Spec::Router(spec) = check_spec(Kind::Router, "node-1", None, &router).unwrap() else { panic!() };
        assert_eq!(spec.node_of("node-1"), "node-1");
        let bad = json!({"listen": "0.0.0.0:7000", "address": "nowhere", "token_file": "/run/token"});
        assert!(
            fields(check_spec(Kind::Router, "node-1", None, &bad))[0]
                .starts_with("spec.address: invalid address")
        );
    }

    #[test]
    fn tunnel_specs_refuse_inline_secrets() {
        let inline = json!({"local": "127.0.0.1:3306", "secret": "s3cret"});
        assert!(
            fields(check_spec(Kind::PublishedService, "mysql", Some("db"), &inline))[0]
                .starts_with("spec.secret: secrets are not stored")
        );
        let good = json!({"local": "127.0.0.1:3306", "secret_file": "/run/mysql", "routers": ["r1"]});
        assert!(check_spec(Kind::PublishedService, "mysql", Some("db"), &good).is_ok());
        let visit = json!({"secret_file": "/run/mysql", "port": 3306});
        let Spec::VisitedService(visit) =
            check_spec(Kind::VisitedService, "mysql", Some("db"), &visit).unwrap()
        else {
            panic!()
        };
        assert_eq!(visit.item.namespace.as_deref(), Some("db"));
        let bad = json!({"secret_file": "/run/mysql"});
        assert!(!fields(check_spec(Kind::VisitedService, "mysql", Some("db"), &bad)).is_empty());
    }

    #[test]
    fn envelopes() {
        let resource: Resource = serde_json::from_value(json!({
            "apiVersion": "edge.example.com/v1", "kind": "Router", "metadata": {"name": "Node_1", "namespace": "x"}, "spec": {}
        }))
        .unwrap();
        let errors: Vec<String> =
            check_envelope(&resource, Kind::Router, None).into_iter().map(|e| e.field).collect();
        assert_eq!(errors, ["metadata.name", "metadata.namespace"]);
        assert_eq!(Kind::from_plural("dnszones"), Some(Kind::DnsZone));
    }
}
