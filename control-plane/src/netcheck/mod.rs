//! Network checking (seed 002's server, goldpinger's matrix): which clients are live, what each one's
//! probes found, and the sender x receiver matrix built from both.
//!
//! Two kinds of client feed it. Keel proxies are live while their stream is connected; their probe
//! results arrive with their status ([`NetCheck::proxy_results`]) and carry the target as configured.
//! Seed 002's clients heartbeat over HTTP (`POST /api/v1/heartbeat`, [`seed`]) and are live until
//! `expiry` passes without one (15 s, as the seed); their results are keyed by source and target IP.
//! An expired or disconnected client's results are dropped with it.
//!
//! The matrix has one row per live client (the sender) and one column per live client (the receiver),
//! plus a column for each probed address that belongs to no live client (marked absent). A cell folds
//! every result of the sender whose target is one of the receiver's addresses (node IP, pod IP): down if
//! any is down, else up if any is up; the worst latency and loss. A client whose software is older than
//! the newest one seen is marked outdated.

pub mod page;
pub mod report;
pub mod seed;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use keel_schemas::stream::{ClientInfo, ProbeResult};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::fleet::ProxyRecord;

/// Seed 002's heartbeat body (its `NodeInfo`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub node_ip: String,
    #[serde(default)]
    pub pod_ip: String,
    #[serde(default)]
    pub pod_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

/// Seed 002's stored host or pod result for one target (its `TestStatus`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TestStatus {
    pub ping: String,
    pub port_status: String,
    pub test_duration: Value,
}

/// A live client, whichever way it reports.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LiveClient {
    /// The node name of a Keel proxy, the pod name of a seed 002 client.
    pub id: String,
    /// `keel` or `seed-002`.
    pub source: &'static str,
    pub node_ip: String,
    pub pod_ip: String,
    pub pod_name: String,
    pub namespace: String,
    pub version: String,
}

impl LiveClient {
    fn addresses(&self) -> impl Iterator<Item = &str> {
        [self.node_ip.as_str(), self.pod_ip.as_str()].into_iter().filter(|a| !a.is_empty())
    }
}

/// One result, from either kind of client, with the address it probed.
#[derive(Clone, Debug, PartialEq)]
pub struct PairResult {
    pub source: String,
    /// The probed address (an IP, or a name for DNS probes).
    pub target: String,
    pub kind: String,
    pub up: Option<bool>,
    pub latency_ms: Option<f64>,
    pub loss: f64,
    pub error: Option<String>,
}

/// What the control plane knows of the network.
#[derive(Debug)]
pub struct NetCheck {
    seed_clients: moka::sync::Cache<String, NodeInfo>,
    seed_hosts: moka::sync::Cache<String, Arc<BTreeMap<String, TestStatus>>>,
    seed_pods: moka::sync::Cache<String, Arc<BTreeMap<String, TestStatus>>>,
    seed_service: moka::sync::Cache<String, Arc<Value>>,
    proxy_results: moka::sync::Cache<String, Arc<Vec<ProbeResult>>>,
}

/// Most seed 002 clients kept (each one a pod).
const MAX_SEED_CLIENTS: u64 = 100_000;

impl NetCheck {
    /// Clients expire `expiry` after their last heartbeat (seed 002's CACHE_KEY_SECOND, 15 s).
    pub fn new(expiry: Duration) -> Self {
        let seed_hosts: moka::sync::Cache<String, Arc<BTreeMap<String, TestStatus>>> =
            moka::sync::Cache::new(MAX_SEED_CLIENTS);
        let seed_pods: moka::sync::Cache<String, Arc<BTreeMap<String, TestStatus>>> =
            moka::sync::Cache::new(MAX_SEED_CLIENTS);
        let seed_service: moka::sync::Cache<String, Arc<Value>> = moka::sync::Cache::new(MAX_SEED_CLIENTS);
        let dropped = (seed_hosts.clone(), seed_pods.clone(), seed_service.clone());
        let seed_clients = moka::sync::Cache::builder()
            .max_capacity(MAX_SEED_CLIENTS)
            .time_to_live(expiry)
            .eviction_listener(move |_name, info: NodeInfo, cause| {
                if cause != moka::notification::RemovalCause::Replaced {
                    // An expired client's results go with it.
                    dropped.0.invalidate(&info.pod_ip);
                    dropped.1.invalidate(&info.pod_ip);
                    dropped.2.invalidate(&info.pod_ip);
                }
            })
            .build();
        let proxy_results = moka::sync::Cache::builder().max_capacity(MAX_SEED_CLIENTS).build();
        Self { seed_clients, seed_hosts, seed_pods, seed_service, proxy_results }
    }

    /// A Keel proxy's latest probe results (with its status, on its stream).
    pub fn proxy_results(&self, node: &str, results: Vec<ProbeResult>) {
        if results.is_empty() {
            self.proxy_results.invalidate(node);
        } else {
            self.proxy_results.insert(node.to_string(), Arc::new(results));
        }
    }

    /// A seed 002 client's heartbeat.
    pub fn heartbeat(&self, info: NodeInfo) {
        self.seed_clients.insert(info.pod_name.clone(), info);
    }

    /// Every live client: the connected Keel proxies (from `fleet`), then seed 002's unexpired ones.
    pub fn live_clients(&self, fleet: &[ProxyRecord]) -> Vec<LiveClient> {
        self.seed_clients.run_pending_tasks();
        let mut out: BTreeMap<String, LiveClient> = BTreeMap::new();
        for record in fleet.iter().filter(|record| record.connected) {
            let ClientInfo { node_ip, pod_ip, pod_name, namespace } = record.client.clone();
            out.insert(
                record.node.clone(),
                LiveClient {
                    id: record.node.clone(),
                    source: "keel",
                    node_ip,
                    pod_ip,
                    pod_name,
                    namespace,
                    version: record.software.clone(),
                },
            );
        }
        for (name, info) in self.seed_clients.iter() {
            out.entry(name.to_string()).or_insert_with(|| LiveClient {
                id: name.to_string(),
                source: "seed-002",
                node_ip: info.node_ip.clone(),
                pod_ip: info.pod_ip.clone(),
                pod_name: info.pod_name.clone(),
                namespace: info.namespace.clone(),
                version: "seed-002".to_string(),
            });
        }
        out.into_values().collect()
    }

    /// Seed 002 results of one kind (`hosts` or `pods`) by source IP, as its API shows them.
    pub fn seed_results(&self, pods: bool) -> BTreeMap<String, Arc<BTreeMap<String, TestStatus>>> {
        let cache = if pods { &self.seed_pods } else { &self.seed_hosts };
        cache.iter().map(|(source, results)| (source.to_string(), results)).collect()
    }

    pub fn set_seed_results(&self, pods: bool, source_ip: String, results: BTreeMap<String, TestStatus>) {
        let cache = if pods { &self.seed_pods } else { &self.seed_hosts };
        cache.insert(source_ip, Arc::new(results));
    }

    pub fn seed_service_results(&self) -> BTreeMap<String, Arc<Value>> {
        self.seed_service.iter().map(|(source, result)| (source.to_string(), result)).collect()
    }

    pub fn set_seed_service_result(&self, source_ip: String, result: Value) {
        self.seed_service.insert(source_ip, Arc::new(result));
    }

    /// Every result of every live client.
    pub fn pairs(&self, clients: &[LiveClient]) -> Vec<PairResult> {
        let mut out = Vec::new();
        let by_pod_ip: BTreeMap<&str, &str> = clients
            .iter()
            .filter(|c| !c.pod_ip.is_empty())
            .map(|c| (c.pod_ip.as_str(), c.id.as_str()))
            .collect();
        for client in clients.iter().filter(|client| client.source == "keel") {
            let Some(results) = self.proxy_results.get(&client.id) else { continue };
            out.extend(results.iter().map(|result| PairResult {
                source: client.id.clone(),
                target: target_address(&result.kind, &result.target),
                kind: result.kind.clone(),
                up: result.up,
                latency_ms: result.latency_ms,
                loss: result.loss,
                error: result.error.clone(),
            }));
        }
        for pods in [false, true] {
            for (source_ip, results) in self.seed_results(pods) {
                let Some(source) = by_pod_ip.get(source_ip.as_str()) else { continue };
                for (target, status) in results.iter() {
                    let up = status.ping == "reachable" && status.port_status == "open";
                    out.push(PairResult {
                        source: source.to_string(),
                        target: target.clone(),
                        kind: if pods { "seed-pods" } else { "seed-hosts" }.to_string(),
                        up: Some(up),
                        latency_ms: None,
                        loss: if status.ping == "reachable" { 0.0 } else { 1.0 },
                        error: (!up).then(|| format!("ping {}, port {}", status.ping, status.port_status)),
                    });
                }
            }
        }
        out
    }
}

/// The address a probe target names: the IP of `10.0.0.2`, `10.0.0.2:22`, `[fd00::2]:22` or
/// `http://10.0.0.2:6100/health`; the name of a DNS target.
pub fn target_address(kind: &str, target: &str) -> String {
    if kind == "http" {
        if let Ok(uri) = target.parse::<axum::http::Uri>()
            && let Some(host) = uri.host()
        {
            return host.trim_matches(['[', ']']).to_string();
        }
        return target.to_string();
    }
    if let Ok(ip) = target.parse::<IpAddr>() {
        return ip.to_string();
    }
    if let Ok(address) = target.parse::<std::net::SocketAddr>() {
        return address.ip().to_string();
    }
    match target.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() && !host.contains(':') => host.to_string(),
        _ => target.to_string(),
    }
}

/// A cell of the matrix: what a sender's results about one receiver add up to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cell {
    pub up: Option<bool>,
    pub latency_ms: Option<f64>,
    pub loss: f64,
    pub errors: Vec<String>,
}

impl Cell {
    fn fold(&mut self, result: &PairResult) {
        self.up = match (self.up, result.up) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), _) | (_, Some(true)) => Some(true),
            _ => None,
        };
        if let Some(latency) = result.latency_ms {
            self.latency_ms = Some(self.latency_ms.map_or(latency, |worst| worst.max(latency)));
        }
        self.loss = self.loss.max(result.loss);
        if let Some(error) = &result.error
            && self.errors.len() < 3
        {
            self.errors.push(format!("{} {}: {error}", result.kind, result.target));
        }
    }
}

/// Whether version `a` is older than `b` (dotted numbers compared as numbers).
fn older(a: &str, b: &str) -> bool {
    let parts = |v: &str| -> Vec<u64> { v.split(['.', '-']).map(|p| p.parse().unwrap_or(0)).collect() };
    parts(a) < parts(b)
}

/// The matrix, as the page draws it: `clients` (rows, and the first columns), `absent` (probed addresses
/// of no live client: the further columns), `cells` for the probed pairs only, each
/// `[row, column, state, latencyMs, loss]` with state 1 up, 2 down, 3 not yet judged, and a summary.
pub fn matrix(clients: &[LiveClient], pairs: &[PairResult]) -> Value {
    let newest = clients
        .iter()
        .filter(|client| client.source == "keel")
        .map(|client| client.version.as_str())
        .fold(None::<&str>, |newest, version| match newest {
            Some(current) if !older(current, version) => Some(current),
            _ => Some(version),
        });
    let mut owner: BTreeMap<&str, usize> = BTreeMap::new();
    for (index, client) in clients.iter().enumerate() {
        for address in client.addresses() {
            owner.insert(address, index);
        }
    }
    let absent: Vec<String> = pairs
        .iter()
        .filter(|pair| !owner.contains_key(pair.target.as_str()))
        .map(|pair| pair.target.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let absent_column: BTreeMap<&str, usize> =
        absent.iter().enumerate().map(|(i, address)| (address.as_str(), clients.len() + i)).collect();
    let column_of =
        |target: &str| -> Option<usize> { owner.get(target).or_else(|| absent_column.get(target)).copied() };
    let row_of: BTreeMap<&str, usize> = clients.iter().enumerate().map(|(i, c)| (c.id.as_str(), i)).collect();
    // Sparse: only probed pairs have a cell (a 1,000-node mesh probing 10 peers each has 10,000 of a
    // million).
    let mut cells: BTreeMap<(usize, usize), Cell> = BTreeMap::new();
    for pair in pairs {
        let (Some(&row), Some(column)) = (row_of.get(pair.source.as_str()), column_of(&pair.target)) else {
            continue;
        };
        cells.entry((row, column)).or_default().fold(pair);
    }
    let mut unreachable = Vec::new();
    let mut latencies = Vec::new();
    let name_of = |column: usize| -> String {
        clients.get(column).map_or_else(|| absent[column - clients.len()].clone(), |c| c.id.clone())
    };
    let encoded: Vec<Value> = cells
        .iter()
        .map(|(&(row, column), cell)| {
            let state = match cell.up {
                Some(true) => 1,
                Some(false) => 2,
                None => 3,
            };
            if state == 2 {
                unreachable
                    .push(json!({"from": clients[row].id, "to": name_of(column), "errors": cell.errors}));
            }
            if let Some(latency) = cell.latency_ms {
                latencies.push((latency, clients[row].id.clone(), name_of(column)));
            }
            json!([row, column, state, cell.latency_ms.map(|l| (l * 100.0).round() / 100.0), cell.loss])
        })
        .collect();
    latencies.sort_by(|a, b| b.0.total_cmp(&a.0));
    let worst: Vec<Value> = latencies
        .iter()
        .take(5)
        .map(|(latency, from, to)| json!({"from": from, "to": to, "latencyMs": (latency * 100.0).round() / 100.0}))
        .collect();
    let mut versions: BTreeMap<&str, usize> = BTreeMap::new();
    for client in clients {
        *versions.entry(client.version.as_str()).or_default() += 1;
    }
    let clients_json: Vec<Value> = clients
        .iter()
        .map(|client| {
            let outdated =
                client.source == "keel" && newest.is_some_and(|newest| older(&client.version, newest));
            json!({
                "id": client.id, "source": client.source, "nodeIp": client.node_ip, "podIp": client.pod_ip,
                "podName": client.pod_name, "namespace": client.namespace, "version": client.version,
                "outdated": outdated,
            })
        })
        .collect();
    json!({
        "clients": clients_json,
        "absent": absent,
        "cells": encoded,
        "summary": {
            "clients": clients.len(),
            "versions": versions,
            "pairs": cells.len(),
            "unreachablePairs": unreachable.len(),
            "unreachable": unreachable,
            "worstLatencies": worst,
        },
    })
}

/// A metric sample of one pair: (source, target, value).
pub type PairSample = (String, String, String);

/// Per-pair samples of a [`matrix`]: (source, target, up as 1/0) for judged pairs, (source, target,
/// latency in seconds) where one was measured.
pub fn pair_samples(matrix: &Value) -> (Vec<PairSample>, Vec<PairSample>) {
    let names: Vec<String> = matrix["clients"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|client| client["id"].as_str().unwrap_or_default().to_string())
        .chain(
            matrix["absent"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| a.as_str().unwrap_or_default().to_string()),
        )
        .collect();
    let (mut up, mut latency) = (Vec::new(), Vec::new());
    for cell in matrix["cells"].as_array().into_iter().flatten() {
        let index = |i: usize| cell[i].as_u64().and_then(|n| usize::try_from(n).ok());
        let (Some(from), Some(to)) =
            (index(0).and_then(|r| names.get(r)), index(1).and_then(|c| names.get(c)))
        else {
            continue;
        };
        match cell[2].as_u64() {
            Some(1) => up.push((from.clone(), to.clone(), "1".to_string())),
            Some(2) => up.push((from.clone(), to.clone(), "0".to_string())),
            _ => {}
        }
        if let Some(ms) = cell[3].as_f64() {
            latency.push((from.clone(), to.clone(), (ms / 1000.0).to_string()));
        }
    }
    (up, latency)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: &str, node_ip: &str, version: &str) -> LiveClient {
        LiveClient {
            id: id.into(),
            source: "keel",
            node_ip: node_ip.into(),
            pod_ip: String::new(),
            pod_name: String::new(),
            namespace: String::new(),
            version: version.into(),
        }
    }

    fn pair(source: &str, target: &str, up: Option<bool>, latency: Option<f64>) -> PairResult {
        PairResult {
            source: source.into(),
            target: target.into(),
            kind: "icmp".into(),
            up,
            latency_ms: latency,
            loss: if up == Some(false) { 1.0 } else { 0.0 },
            error: (up == Some(false)).then(|| "timeout".to_string()),
        }
    }

    #[test]
    fn targets_are_addresses() {
        assert_eq!(target_address("icmp", "10.0.0.2"), "10.0.0.2");
        assert_eq!(target_address("tcp", "10.0.0.2:22"), "10.0.0.2");
        assert_eq!(target_address("udp", "[fd00::2]:7"), "fd00::2");
        assert_eq!(target_address("tcp", "db.internal:5432"), "db.internal");
        assert_eq!(target_address("http", "http://10.0.0.3:6100/health"), "10.0.0.3");
        assert_eq!(target_address("http", "https://[fd00::3]/"), "fd00::3");
        assert_eq!(target_address("dns", "mysql.default.svc"), "mysql.default.svc");
    }

    #[test]
    fn cells_fold_results_and_mark_absent_and_outdated_clients() {
        let clients = vec![
            client("a", "10.0.0.1", "0.2.0"),
            client("b", "10.0.0.2", "0.2.0"),
            client("c", "10.0.0.3", "0.1.9"),
        ];
        let pairs = vec![
            pair("a", "10.0.0.2", Some(true), Some(1.5)),
            pair("a", "10.0.0.3", Some(true), Some(0.4)),
            pair("b", "10.0.0.1", Some(true), Some(0.3)),
            pair("b", "10.0.0.3", Some(false), None),
            // Two checks of one pair: down wins, the worst latency is kept.
            pair("c", "10.0.0.1", Some(true), Some(2.0)),
            pair("c", "10.0.0.1", Some(false), None),
            pair("c", "10.0.0.9", None, None),
        ];
        let m = matrix(&clients, &pairs);
        assert_eq!(m["absent"], json!(["10.0.0.9"]));
        assert_eq!(
            m["cells"],
            json!([
                [0, 1, 1, 1.5, 0.0],
                [0, 2, 1, 0.4, 0.0],
                [1, 0, 1, 0.3, 0.0],
                [1, 2, 2, null, 1.0],
                [2, 0, 2, 2.0, 1.0],
                [2, 3, 3, null, 0.0]
            ])
        );
        assert_eq!(m["summary"]["unreachablePairs"], 2);
        assert_eq!(m["summary"]["unreachable"][0]["to"], "c");
        assert_eq!(m["summary"]["worstLatencies"][0], json!({"from": "c", "to": "a", "latencyMs": 2.0}));
        assert_eq!(m["summary"]["versions"], json!({"0.1.9": 1, "0.2.0": 2}));
        let outdated: Vec<bool> =
            m["clients"].as_array().unwrap().iter().map(|c| c["outdated"].as_bool().unwrap()).collect();
        assert_eq!(outdated, [false, false, true]);
    }

    #[test]
    fn an_expired_seed_client_takes_its_results_along() {
        let netcheck = NetCheck::new(Duration::from_millis(200));
        netcheck.heartbeat(NodeInfo {
            pod_name: "p1".into(),
            pod_ip: "10.1.0.1".into(),
            node_ip: "10.0.0.1".into(),
            ..NodeInfo::default()
        });
        let status =
            TestStatus { ping: "reachable".into(), port_status: "open".into(), test_duration: json!(1000) };
        netcheck.set_seed_results(
            false,
            "10.1.0.1".into(),
            BTreeMap::from([("10.0.0.2".to_string(), status)]),
        );
        assert_eq!(netcheck.live_clients(&[]).len(), 1);
        assert_eq!(netcheck.seed_results(false).len(), 1);
        std::thread::sleep(Duration::from_millis(300));
        assert!(netcheck.live_clients(&[]).is_empty());
        netcheck.seed_hosts.run_pending_tasks();
        assert!(netcheck.seed_results(false).is_empty(), "results dropped with the client");
    }
}
