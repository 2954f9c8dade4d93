//! The typed model of keel.yaml.
//!
//! Every struct is closed (`deny_unknown_fields`), so a misspelt key is an error rather than a silently
//! ignored setting. Defaults live here, next to the fields, so a static file, a pushed snapshot and the
//! generated JSON Schema agree on them. Doc comments become the schema's descriptions, which editors show.
//!
//! Sections that later capabilities add (`dns`, `tunnels`, `probes`, `reporters`, `control_plane`) slot in
//! as further optional fields of [`Config`].

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::types::{Cidr, Duration, HostPort, Secret, SocketAddress};

/// A whole keel.yaml: what one proxy runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Who this proxy is: its identity in logs, metrics and towards the control plane.
    #[serde(default)]
    pub node: Node,
    /// The admin HTTP API: readiness, config dump, metrics, reload and drain.
    #[serde(default)]
    pub admin: Admin,
    /// TCP listeners, each relaying its connections to a cluster.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Upstream clusters: groups of endpoints with load balancing and health checking.
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    /// How long open connections may take to finish on shutdown, drain, or the removal of their listener
    /// before they are closed.
    #[serde(default = "defaults::drain_timeout")]
    pub drain_timeout: Duration,
    /// The DNS server: hijacked service names answered with loopback VIPs, everything else forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    /// Tunnels (frp's stcp model): serve as a router, publish local services through routers, visit
    /// services published elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnels: Option<Tunnels>,
    /// Address reporters (the DDNS agent): watch an address and report each change to a sink.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reporters: Vec<Reporter>,
    /// Network probes (seed 002's checks): reachability and latency of targets, as metrics and, with a
    /// control plane, in its connectivity matrix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<Probe>,
    /// Follow a Keel control plane: it sends `listeners`, `clusters`, `dns` and `tunnels` (which the file
    /// then leaves out), chosen for this node by `node.id` and `node.labels`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<ControlPlane>,
}

/// One probe: a kind of check (exactly one of `icmp`, `tcp`, `http`, `dns`, `udp`) run against its
/// targets every `interval`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// Unique name, used in metrics, the admin API and the control plane's matrix.
    pub name: String,
    /// ICMP echo: are the hosts up, and how far. Unprivileged ping sockets where
    /// `net.ipv4.ping_group_range` allows, raw sockets with CAP_NET_RAW otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpProbe>,
    /// TCP connect: is the port open (seed 002's SSH port and health port checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbe>,
    /// HTTP(S) GET with an expected status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    /// Resolve a name, then connect to what it resolved to (seed 002's custom service check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsProbe>,
    /// UDP echo: datagrams sent to an echo service and counted back, for packet loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpProbe>,
    /// How often each target is checked; each round starts up to 10% early or late, so that a fleet
    /// started together does not probe in lockstep.
    #[serde(default = "defaults::probe_interval")]
    pub interval: Duration,
    /// How long one check may take.
    #[serde(default = "defaults::probe_timeout")]
    pub timeout: Duration,
    /// Consecutive failed checks before a target counts as down (and successes before it is up again).
    #[serde(default = "defaults::probe_threshold")]
    pub failure_threshold: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IcmpProbe {
    /// IPv4 or IPv6 addresses.
    #[serde(default)]
    pub targets: Vec<std::net::IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpProbe {
    /// `host:port` to connect to; names are resolved at each check.
    #[serde(default)]
    pub targets: Vec<HostPort>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    /// `http://` or `https://` URLs (HTTPS checked against the Mozilla roots).
    #[serde(default)]
    pub targets: Vec<String>,
    /// Statuses that count as success; any 2xx or 3xx when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected_status: Vec<u16>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DnsProbe {
    /// Names to resolve (`mysql.default.svc.cluster.local`), through the host's resolver configuration.
    #[serde(default)]
    pub targets: Vec<String>,
    /// After resolving, connect to this TCP port of the first address; resolving alone when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UdpProbe {
    /// `host:port` of UDP echo services (RFC 862: each datagram is sent back as it came).
    #[serde(default)]
    pub targets: Vec<HostPort>,
    /// Datagrams per check; the share that does not come back within `timeout` is the loss.
    #[serde(default = "defaults::udp_probe_packets")]
    pub packets: u32,
}

impl Probe {
    /// The kind's name (`icmp`, `tcp`, ...), or `None` when not exactly one kind is given.
    pub fn kind(&self) -> Option<&'static str> {
        let kinds: Vec<&'static str> = [
            ("icmp", self.icmp.is_some()),
            ("tcp", self.tcp.is_some()),
            ("http", self.http.is_some()),
            ("dns", self.dns.is_some()),
            ("udp", self.udp.is_some()),
        ]
        .into_iter()
        .filter_map(|(kind, given)| given.then_some(kind))
        .collect();
        match kinds.as_slice() {
            [kind] => Some(kind),
            _ => None,
        }
    }

    /// Replaces the kind's targets with `targets`, given as text ([`Probe::targets`]'s form); texts that
    /// are not a target of the kind are left out.
    pub fn set_targets(&mut self, targets: &[String]) {
        if let Some(icmp) = &mut self.icmp {
            icmp.targets = targets.iter().filter_map(|t| t.parse().ok()).collect();
        }
        if let Some(tcp) = &mut self.tcp {
            tcp.targets = targets.iter().filter_map(|t| t.parse().ok()).collect();
        }
        if let Some(http) = &mut self.http {
            http.targets = targets.to_vec();
        }
        if let Some(dns) = &mut self.dns {
            dns.targets = targets.to_vec();
        }
        if let Some(udp) = &mut self.udp {
            udp.targets = targets.iter().filter_map(|t| t.parse().ok()).collect();
        }
    }

    /// The targets, as text (what metrics and results name them by).
    pub fn targets(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        if let Some(icmp) = &self.icmp {
            out.extend(icmp.targets.iter().map(ToString::to_string));
        }
        if let Some(tcp) = &self.tcp {
            out.extend(tcp.targets.iter().map(ToString::to_string));
        }
        if let Some(http) = &self.http {
            out.extend(http.targets.iter().cloned());
        }
        if let Some(dns) = &self.dns {
            out.extend(dns.targets.iter().cloned());
        }
        if let Some(udp) = &self.udp {
            out.extend(udp.targets.iter().map(ToString::to_string));
        }
        out
    }
}

/// One address reporter: where the address comes from and where it goes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Reporter {
    /// Unique name, used in logs, metrics and the state file.
    pub name: String,
    /// Where the address is read.
    pub source: AddressSource,
    /// Where a changed address is reported.
    pub sink: AddressSink,
    /// Look again this often even without an address event (seed 000's CHECK_INTERVAL).
    #[serde(default = "defaults::report_interval")]
    pub interval: Duration,
    /// After an address event, wait this long for the burst to settle (the kernel re-announces addresses
    /// on every router advertisement).
    #[serde(default = "defaults::report_debounce")]
    pub debounce: Duration,
    /// File that keeps the delivered and the pending address across restarts, so that nothing is lost
    /// and nothing is sent twice. Without it, a restart reports the current address once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_file: Option<String>,
    /// Detect and log, but send nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Where a reporter reads its address.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AddressSource {
    /// An address of a network interface, read from the kernel (netlink) with its flags.
    Interface(InterfaceSource),
    /// The address STUN servers see (RFC 8489 Binding): the public address behind a NAT.
    Stun(StunSource),
    /// The address HTTP echo services see: each URL's body is the caller's address.
    Http(HttpSource),
    /// The address the control plane holds for another node (seed 001's centralized detection: one
    /// reporter detects, every other node follows its result). Changes arrive by long poll.
    ControlPlane(ControlPlaneSource),
    /// A fixed address, for tests and dry runs.
    Static(std::net::IpAddr),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneSource {
    /// `http://host:port`, as for the `control_plane` sink.
    pub url: String,
    /// A proxy token of the control plane.
    #[serde(
        default,
        deserialize_with = "crate::types::present_secret",
        skip_serializing_if = "Option::is_none"
    )]
    pub token: Option<Secret>,
    /// File holding the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// The node whose reports to follow (the detector's `node.id`).
    pub node: String,
    #[serde(default)]
    pub family: AddressFamily,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpSource {
    /// Echo URLs (`https://api64.ipify.org`), asked in order until one answers with an address of the
    /// family; each is dialled over that family.
    pub urls: Vec<String>,
    #[serde(default)]
    pub family: AddressFamily,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StunSource {
    /// STUN servers (`stun.example.net:3478`), asked in order until one answers.
    pub servers: Vec<HostPort>,
    #[serde(default)]
    pub family: AddressFamily,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InterfaceSource {
    /// Interface name (`eth0`).
    pub name: String,
    #[serde(default)]
    pub family: AddressFamily,
    /// Which global address to pick. Link-local, loopback, tentative, DAD-failed and deprecated
    /// addresses are never picked.
    #[serde(default)]
    pub policy: AddressPolicy,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AddressFamily {
    #[default]
    Ipv6,
    Ipv4,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AddressPolicy {
    /// A temporary (privacy) address if there is one, else a stable one: seed 000's behaviour.
    #[default]
    Temporary,
    /// Only stable (non-temporary) addresses.
    Stable,
    /// Any usable address.
    Any,
}

/// Where a reporter sends its address.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AddressSink {
    /// A server speaking seed 000's API (Keel's control plane does): `POST {url}/api/v1/public-ip` with
    /// `X-API-Token` and `{"ipAddress": "..."}`.
    ControlPlane(ReportEndpoint),
    /// A DNS provider directly, for users without a control plane: the record (A for an IPv4 address,
    /// AAAA for IPv6) is changed, then read back; only a read-back showing the address counts.
    Dns(DnsSink),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DnsSink {
    /// The zone the record is in (`example.com`).
    pub zone: String,
    /// The record's name relative to the zone (`gw`; `@` for the apex), or absolute with a final dot.
    pub name: String,
    #[serde(default = "defaults::record_ttl")]
    pub ttl: Duration,
    /// The provider and its settings, as in the control plane's DnsProvider `spec`; credentials are
    /// read from their files at each update.
    pub provider: crate::resource::DnsProviderSpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportEndpoint {
    /// `http://host:port` (seed 000's SERVER_URL).
    pub url: String,
    /// The API token (seed 000's API_TOKEN).
    #[serde(
        default,
        deserialize_with = "crate::types::present_secret",
        skip_serializing_if = "Option::is_none"
    )]
    pub token: Option<Secret>,
    /// File holding the API token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
}

/// How to reach the control plane, and where to keep its last snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlPlane {
    /// `http://host:port` (HTTP/2 in clear) or `https://host:port` (HTTP/2 over TLS).
    pub address: String,
    /// Proxy token the control plane expects (sent as a bearer token).
    #[serde(
        default,
        deserialize_with = "crate::types::present_secret",
        skip_serializing_if = "Option::is_none"
    )]
    pub token: Option<Secret>,
    /// File holding the proxy token; surrounding whitespace is trimmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// PEM CA certificates the control plane's certificate must chain to (for `https://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// The name the control plane's certificate must be valid for; the host of `address` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// Where the last accepted snapshot is kept, so that a restart while the control plane is away comes
    /// up with it. No cache when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_file: Option<String>,
    /// How long connecting (and the TLS handshake) may take.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Duration,
}

/// The `tunnels` section. The wire protocol is described in docs/tunnel-protocol.md.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tunnels {
    /// Serve as a router: accept publishers and visitors and pair their connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<TunnelServer>,
    /// The routers this proxy publishes and visits through, by name.
    #[serde(default)]
    pub routers: Vec<RouterRef>,
    /// Local services offered to visitors elsewhere.
    #[serde(default)]
    pub publish: Vec<Publish>,
    /// Services published elsewhere, reached through a local listener.
    #[serde(default)]
    pub visit: Vec<Visit>,
    /// Largest difference between two clocks a proof may show; a proof older or newer than this is
    /// refused, and nonces are remembered this long to refuse a replay.
    #[serde(default = "defaults::max_skew")]
    pub max_skew: Duration,
}

/// This proxy as a router.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TunnelServer {
    /// Where publishers and visitors connect.
    pub listen: SocketAddress,
    /// The router token every publisher and visitor must prove it knows (it is never sent).
    #[serde(
        default,
        deserialize_with = "crate::types::present_secret",
        skip_serializing_if = "Option::is_none"
    )]
    pub token: Option<Secret>,
    /// File holding the token; surrounding whitespace is trimmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// How a visitor's connection picks among the publishers of its service.
    #[serde(default)]
    pub balance: TunnelBalancing,
    /// How long a visitor's connection may wait for a publisher to accept it.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Duration,
    /// TLS on the router's listener; without it, the router speaks plain TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
}

/// The router's TLS (rustls): its certificate, and optionally the CA its clients' certificates must
/// chain to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain the router presents.
    pub cert_file: String,
    /// PEM private key of that certificate.
    pub key_file: String,
    /// PEM CA certificates; when set, every publisher and visitor must present a certificate one of them
    /// signed (mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<String>,
}

/// TLS to a router (rustls).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM CA certificates the router's certificate must chain to.
    pub ca_file: String,
    /// The name (or IP address) the router's certificate must be valid for; the host of `address` by
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// PEM client certificate chain, for a router that requires one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    /// PEM private key of the client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
}

/// How a router spreads connections over the publishers of one service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TunnelBalancing {
    /// Each publisher in turn.
    #[default]
    RoundRobin,
    /// The publisher with the fewest open connections through this router.
    LeastConnections,
}

/// A router this proxy connects to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouterRef {
    /// The name `publish` and `visit` entries use for it.
    pub name: String,
    /// Its `tunnels.server.listen` address, as reached from here.
    pub address: HostPort,
    /// The router's token.
    #[serde(
        default,
        deserialize_with = "crate::types::present_secret",
        skip_serializing_if = "Option::is_none"
    )]
    pub token: Option<Secret>,
    /// File holding the token; surrounding whitespace is trimmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// TLS to this router; it must match the router's `tunnels.server.tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTls>,
}

/// A local service published through routers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    /// The service name visitors ask for (`mysql`).
    pub name: String,
    /// Where the service listens here; each visitor connection is dialled to it.
    pub local: HostPort,
    /// The service secret: visitors prove they know it; no router ever sees it.
    #[serde(
        default,
        deserialize_with = "crate::types::present_secret",
        skip_serializing_if = "Option::is_none"
    )]
    pub secret: Option<Secret>,
    /// File holding the secret; surrounding whitespace is trimmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<String>,
    /// The routers to register with, by name; all of `tunnels.routers` when empty.
    #[serde(default)]
    pub routers: Vec<String>,
    /// Several publishers may serve this name on one router only when all of them set `share`; otherwise
    /// a router refuses a second publisher of a name.
    #[serde(default)]
    pub share: bool,
    /// Connections kept open and authenticated to each router, ready for visitors.
    #[serde(default = "defaults::publish_pool")]
    pub pool: u16,
    /// How long dialling `local` may take.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Duration,
}

/// A service published elsewhere, reached through a local listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Visit {
    /// The published service's name.
    pub name: String,
    /// The service secret, as its publisher has it.
    #[serde(
        default,
        deserialize_with = "crate::types::present_secret",
        skip_serializing_if = "Option::is_none"
    )]
    pub secret: Option<Secret>,
    /// File holding the secret; surrounding whitespace is trimmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<String>,
    /// The routers to go through, by name, in order of preference; all of `tunnels.routers` when empty.
    #[serde(default)]
    pub routers: Vec<String>,
    /// Where to listen. Without it, `port` is required and the service gets a VIP from `dns.ip_range`:
    /// its names are hijacked to the VIP and the visitor listens on VIP:port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddress>,
    /// The port to listen on at the service's VIP (with `dns`, instead of `listen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The namespace of the service's DNS names, when it is not `dns.namespace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Connections kept open and authenticated to each router, ready for new local connections.
    #[serde(default = "defaults::visit_pool")]
    pub pool: u16,
}

/// The pod's DNS server. Point the pod at it with `dnsPolicy: None` and `nameservers: [127.0.0.2]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// Addresses to serve DNS on, over both UDP and TCP.
    #[serde(default = "defaults::dns_listen")]
    pub listen: Vec<SocketAddress>,
    /// The pod's namespace: `service:` entries answer as `NAME.NAMESPACE.svc.CLUSTER_DOMAIN` and its
    /// shorter search-domain forms.
    #[serde(default = "defaults::dns_namespace")]
    pub namespace: String,
    /// The cluster's DNS domain.
    #[serde(default = "defaults::cluster_domain")]
    pub cluster_domain: String,
    /// Where VIPs are allocated for hijacked names that do not give an `address`.
    #[serde(default = "defaults::ip_range")]
    pub ip_range: Cidr,
    /// TTL of hijacked answers (and of the SOA that makes NODATA answers cacheable).
    #[serde(default = "defaults::dns_ttl")]
    pub ttl: Duration,
    /// Names answered locally, each with its VIP.
    #[serde(default)]
    pub hijack: Vec<Hijack>,
    /// Resolvers every other query is forwarded to, in order of preference: usually the nameservers the
    /// pod's resolv.conf had before it pointed at the sidecar. With none, other queries get REFUSED.
    #[serde(default)]
    pub upstreams: Vec<SocketAddress>,
    /// An upstream that has not answered within this time is given up on, and the next one is tried.
    #[serde(default = "defaults::upstream_timeout")]
    pub upstream_timeout: Duration,
    /// Most forwarded queries waiting for an upstream at once; further ones get SERVFAIL.
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: u32,
    /// Threads answering UDP queries, each with its own socket on every listen address
    /// (`SO_REUSEPORT`). One thread batches its system calls and answers over 100,000 queries a second
    /// on one core; more only help when the DNS server has cores to itself, as every thread competes
    /// with the application and the client for CPU.
    #[serde(default = "defaults::dns_workers")]
    pub workers: u16,
    /// The cache of forwarded answers.
    #[serde(default)]
    pub cache: DnsCache,
}

/// One hijacked name: either a Kubernetes service (`service`, answered in all its search-domain forms)
/// or a literal name (`name`, which may be a wildcard such as `*.internal.example`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Hijack {
    /// A service name such as `mysql`; answers `mysql`, `mysql.NS`, `mysql.NS.svc` and
    /// `mysql.NS.svc.CLUSTER_DOMAIN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The service's namespace, when it is not the pod's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// A literal DNS name, or a wildcard (`*.internal.example` answers every name under it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The VIP to answer with; allocated from `ip_range` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::IpAddr>,
    /// Set on the entries Keel adds for `tunnels.visit[N]` (the index), so that problems with them are
    /// reported there.
    #[serde(skip)]
    #[schemars(skip)]
    pub for_visit: Option<usize>,
}

/// The cache of forwarded answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DnsCache {
    /// Most answers kept.
    #[serde(default = "defaults::cache_size")]
    pub size: u64,
    /// Answers are kept at least this long, whatever their TTL says.
    #[serde(default = "defaults::cache_min_ttl")]
    pub min_ttl: Duration,
    /// And at most this long.
    #[serde(default = "defaults::cache_max_ttl")]
    pub max_ttl: Duration,
    /// Longest a negative answer (NXDOMAIN, NODATA) is kept; its SOA minimum decides below that.
    #[serde(default = "defaults::cache_negative_ttl")]
    pub negative_ttl: Duration,
    /// When every upstream fails, expired answers are served for up to this long past their expiry.
    #[serde(default = "defaults::cache_serve_stale")]
    pub serve_stale: Duration,
}

impl Default for DnsCache {
    fn default() -> Self {
        Self {
            size: defaults::cache_size(),
            min_ttl: defaults::cache_min_ttl(),
            max_ttl: defaults::cache_max_ttl(),
            negative_ttl: defaults::cache_negative_ttl(),
            serve_stale: defaults::cache_serve_stale(),
        }
    }
}

/// The identity of this proxy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Unique name of this proxy. Defaults to the host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The group this proxy belongs to (a Kubernetes cluster, a site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Labels the control plane selects configuration by.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The admin API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Where the admin API listens. Keep it on loopback unless `token` is set.
    #[serde(default = "defaults::admin_address")]
    pub address: SocketAddress,
    /// Bearer token required by the mutating endpoints (`POST /reload`, `/drain`, `/quitquitquit`) and by
    /// `/config_dump`. Without it, anyone who reaches the address may use them.
    #[serde(
        default,
        deserialize_with = "crate::types::present_secret",
        skip_serializing_if = "Option::is_none"
    )]
    pub token: Option<Secret>,
    /// File holding the token (a Kubernetes Secret mount); surrounding whitespace is trimmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
}

impl Default for Admin {
    fn default() -> Self {
        Self { address: defaults::admin_address(), token: None, token_file: None }
    }
}

/// A TCP listener that relays each accepted connection to a cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Unique name, used in metrics and logs.
    pub name: String,
    /// Address to listen on.
    pub address: SocketAddress,
    /// Name of the cluster connections are relayed to.
    pub cluster: String,
    /// Close a connection after this long without bytes in either direction; `0s` disables the timeout.
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: Duration,
    /// Most connections open at once; further connections are accepted and closed at once. Unlimited
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Only accept clients from these networks; every client when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_sources: Vec<Cidr>,
}

/// A group of interchangeable upstream endpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Unique name, referenced by listeners.
    pub name: String,
    /// Upstream addresses (`10.0.0.5:5432` or `db.internal:5432`; names are resolved at connect time).
    pub endpoints: Vec<HostPort>,
    /// How an endpoint is picked for each new connection.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Give up on an endpoint that has not accepted the connection within this time.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Duration,
    /// Endpoints tried for one downstream connection before it is refused; each failed attempt moves on
    /// to the next healthy endpoint.
    #[serde(default = "defaults::connect_attempts")]
    pub connect_attempts: u32,
    /// Active TCP health checking; without it every endpoint counts as healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Passive ejection of endpoints that keep failing to connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
}

/// Load-balancing policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// The endpoint with the fewest open connections from this proxy.
    LeastConnections,
    /// An endpoint chosen uniformly at random.
    Random,
}

/// Active health checking: a TCP connect to each endpoint every `interval`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Time between checks of one endpoint.
    #[serde(default = "defaults::health_interval")]
    pub interval: Duration,
    /// A check that has not connected within this time fails.
    #[serde(default = "defaults::health_timeout")]
    pub timeout: Duration,
    /// Consecutive successes that bring an unhealthy endpoint back.
    #[serde(default = "defaults::healthy_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures that mark a healthy endpoint unhealthy.
    #[serde(default = "defaults::unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            interval: defaults::health_interval(),
            timeout: defaults::health_timeout(),
            healthy_threshold: defaults::healthy_threshold(),
            unhealthy_threshold: defaults::unhealthy_threshold(),
        }
    }
}

/// Passive outlier ejection on connect failures seen by real traffic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive connect failures that eject an endpoint.
    #[serde(default = "defaults::consecutive_failures")]
    pub consecutive_failures: u32,
    /// How long the first ejection lasts. Each further ejection of the same endpoint, with no successful
    /// connection to it in between, lasts once more as long, up to ten times this.
    #[serde(default = "defaults::base_ejection_time")]
    pub base_ejection_time: Duration,
    /// Most endpoints of the cluster ejected at once, in percent; one endpoint may always be ejected.
    #[serde(default = "defaults::max_ejection_percent")]
    pub max_ejection_percent: u8,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: defaults::consecutive_failures(),
            base_ejection_time: defaults::base_ejection_time(),
            max_ejection_percent: defaults::max_ejection_percent(),
        }
    }
}

/// Default values, named so that serde, the schema and the docs share them.
pub mod defaults {
    use crate::types::{Cidr, Duration, SocketAddress};

    pub fn admin_address() -> SocketAddress {
        SocketAddress(std::net::SocketAddr::from(([127, 0, 0, 1], 9901)))
    }
    pub fn drain_timeout() -> Duration {
        Duration::from_secs(25)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn report_interval() -> Duration {
        Duration::from_secs(60)
    }

    pub fn report_debounce() -> Duration {
        Duration::from_millis(200)
    }

    pub fn record_ttl() -> Duration {
        Duration::from_secs(300)
    }

    pub fn probe_interval() -> Duration {
        Duration::from_secs(5)
    }

    pub fn probe_timeout() -> Duration {
        Duration::from_secs(1)
    }

    pub fn probe_threshold() -> u32 {
        3
    }

    pub fn udp_probe_packets() -> u32 {
        5
    }

    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn connect_attempts() -> u32 {
        3
    }
    pub fn health_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn health_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn healthy_threshold() -> u32 {
        2
    }
    pub fn unhealthy_threshold() -> u32 {
        3
    }
    pub fn consecutive_failures() -> u32 {
        5
    }
    pub fn base_ejection_time() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_ejection_percent() -> u8 {
        50
    }
    pub fn dns_listen() -> Vec<SocketAddress> {
        vec![SocketAddress(std::net::SocketAddr::from(([127, 0, 0, 2], 53)))]
    }
    pub fn dns_namespace() -> String {
        "default".into()
    }
    pub fn cluster_domain() -> String {
        "cluster.local".into()
    }
    pub fn ip_range() -> Cidr {
        "127.0.66.0/24".parse().expect("a valid CIDR")
    }
    pub fn dns_ttl() -> Duration {
        Duration::from_secs(30)
    }
    pub fn upstream_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn max_in_flight() -> u32 {
        1024
    }
    pub fn dns_workers() -> u16 {
        1
    }
    pub fn max_skew() -> Duration {
        Duration::from_secs(30)
    }
    pub fn publish_pool() -> u16 {
        4
    }
    pub fn visit_pool() -> u16 {
        2
    }
    pub fn cache_size() -> u64 {
        10_000
    }
    pub fn cache_min_ttl() -> Duration {
        Duration::from_secs(0)
    }
    pub fn cache_max_ttl() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn cache_negative_ttl() -> Duration {
        Duration::from_secs(300)
    }
    pub fn cache_serve_stale() -> Duration {
        Duration::from_secs(300)
    }
}
