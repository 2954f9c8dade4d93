//! The snapshot stream between a proxy and the control plane: its endpoint and its messages.
//!
//! A proxy opens one HTTP/2 request, `POST /v1/stream`, and keeps it open. Both bodies are newline-
//! delimited JSON: the control plane sends [`ServerMessage`]s (a snapshot with its version and a nonce),
//! the proxy sends [`ProxyMessage`]s (hello first, then ACK or NACK for each snapshot, and status reports).
//! docs/control-plane.md describes the exchange and why it is shaped this way.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The path of the stream.
pub const STREAM_PATH: &str = "/v1/stream";

/// Longest line either side accepts: a snapshot of a large node fits many times over.
pub const MAX_LINE: usize = 4 << 20;

/// Where the control plane is: `http://host:port` or `https://host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    pub fn parse(address: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(rest) = address.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = address.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(format!("{address:?}: give http://host:port or https://host:port"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(format!("{address:?}: give only the scheme, host and port, no path"));
        }
        let host_port: crate::types::HostPort = rest.parse()?;
        let host = match host_port.host {
            crate::types::Host::Ip(ip) => ip.to_string(),
            crate::types::Host::Name(name) => name,
        };
        Ok(Self { tls, host, port: host_port.port })
    }

    /// `host:port`, with brackets around an IPv6 address.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What the control plane sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The whole dynamic config for this node: keel.yaml's `listeners`, `clusters`, `dns` and `tunnels`
    /// sections, as YAML (JSON) text. `version` names the content; `nonce` this one sending of it.
    Snapshot { version: String, nonce: String, config: String },
}

/// What a proxy sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ProxyMessage {
    /// First on every stream: who the proxy is and what it runs, so that a reconnecting proxy is not sent
    /// what it already has (or what it already refused).
    Hello {
        node: String,
        #[serde(default)]
        labels: BTreeMap<String, String>,
        /// The snapshot version running now, if any (from this connection's predecessor or the cache).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
        /// The last version this proxy refused, which the control plane must not send again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rejected_version: Option<String>,
        /// The proxy's software version.
        #[serde(default)]
        software: String,
        /// Where the proxy runs (seed 002's client info), for the connectivity matrix.
        #[serde(default, skip_serializing_if = "ClientInfo::is_empty")]
        client: ClientInfo,
    },
    /// The snapshot was applied.
    Ack { version: String, nonce: String },
    /// The snapshot was refused; the proxy keeps running its last good one.
    Nack { version: String, nonce: String, error: String },
    /// The proxy's health and, for a router, its tunnel view. Sent on change.
    Status { status: ProxyStatus },
}

/// A proxy's report of itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyStatus {
    pub ready: bool,
    #[serde(default)]
    pub listeners: usize,
    /// Active connections over all listeners.
    #[serde(default)]
    pub active_connections: usize,
    /// The router's status in the seed's `Router` status shape (`activeServices` with their clients),
    /// when this proxy runs a router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<RouterReport>,
    /// The latest result of every probe target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<ProbeResult>,
}

/// Where a proxy runs, as Kubernetes' downward API gives it (`NODE_IP`, `POD_IP`, `POD_NAME`,
/// `NAMESPACE`, seed 002's variables); empty fields are unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_ip: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_ip: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

impl ClientInfo {
    pub fn is_empty(&self) -> bool {
        self.node_ip.is_empty()
            && self.pod_ip.is_empty()
            && self.pod_name.is_empty()
            && self.namespace.is_empty()
    }

    /// From the process environment (seed 002's variables).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| var(name).map(|value| value.trim().to_string()).unwrap_or_default();
        Self {
            node_ip: get("NODE_IP"),
            pod_ip: get("POD_IP"),
            pod_name: get("POD_NAME"),
            namespace: get("NAMESPACE"),
        }
    }
}

/// One probe target's state: the outcome of its last check and what the checks before it add up to.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeResult {
    pub probe: String,
    /// `icmp`, `tcp`, `http`, `dns` or `udp`.
    pub kind: String,
    pub target: String,
    /// Up after a successful check, down after `failure_threshold` failed ones in a row; absent before
    /// the first check ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up: Option<bool>,
    /// The last successful check's round trip (connect time for TCP, time to the status for HTTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Lost share (0 to 1): of the last check's datagrams for UDP, of the recent checks otherwise.
    #[serde(default)]
    pub loss: f64,
    #[serde(default)]
    pub consecutive_failures: u32,
    /// Why the last check failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the last check ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<String>,
}

/// A router's view, named by the router (`tunnels.server`) it belongs to. Its JSON is the `status` of
/// the `Router` resource.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouterReport {
    pub listen: String,
    #[serde(default)]
    pub active_services: Vec<ActiveService>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActiveService {
    pub name: String,
    #[serde(default)]
    pub clients: Vec<RouterClient>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouterClient {
    /// `node-service`, as the seed named its clients.
    pub id: String,
    /// `publisher` (serves the service) or `visitor` (reaches it).
    #[serde(rename = "type")]
    pub kind: String,
    pub remote_addr: String,
    pub service_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_connections: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_connections: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let plain = Endpoint::parse("http://127.0.0.1:7080").unwrap();
        assert_eq!(plain, Endpoint { tls: false, host: "127.0.0.1".into(), port: 7080 });
        let tls = Endpoint::parse("https://cp.example:443/").unwrap();
        assert!(tls.tls);
        assert_eq!(tls.authority(), "cp.example:443");
        assert_eq!(Endpoint::parse("https://[::1]:7080").unwrap().authority(), "[::1]:7080");
        assert!(Endpoint::parse("cp:7080").unwrap_err().contains("http://"));
        assert!(Endpoint::parse("http://cp:7080/v1").unwrap_err().contains("no path"));
        assert!(Endpoint::parse("http://cp").is_err());
    }

    #[test]
    fn messages_round_trip() {
        let hello = ProxyMessage::Hello {
            node: "n1".into(),
            labels: BTreeMap::from([("zone".into(), "a".into())]),
            version: None,
            rejected_version: Some("v2".into()),
            software: "0.1.0".into(),
            client: ClientInfo { node_ip: "192.0.2.1".into(), ..ClientInfo::default() },
        };
        let line = serde_json::to_string(&hello).unwrap();
        assert!(line.starts_with(r#"{"type":"hello","node":"n1""#), "{line}");
        assert_eq!(serde_json::from_str::<ProxyMessage>(&line).unwrap(), hello);
        let snapshot =
            ServerMessage::Snapshot { version: "v".into(), nonce: "1".into(), config: "{}".into() };
        let line = serde_json::to_string(&snapshot).unwrap();
        assert_eq!(serde_json::from_str::<ServerMessage>(&line).unwrap(), snapshot);
    }
}
