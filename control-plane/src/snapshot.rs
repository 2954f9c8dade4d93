//! Per-node snapshots: which resources a node gets, assembled into keel.yaml sections and versioned by
//! content.
//!
//! A [`World`] is the store's objects at one revision, published by the debouncer after writes settle.
//! A node's snapshot depends on its labels, and on its name only when a Router runs on it or a selector
//! names it (the implicit `edge.example.com/node` label); snapshots are built once per distinct input
//! and shared, so a thousand nodes with the same labels cost one build.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use keel_schemas::config::{Cluster, Dns, Listener, Probe, Tunnels};
use keel_schemas::resource::{Kind, NODE_LABEL, Spec};
use serde::Serialize;

use crate::store::{Key, Stored};

/// One node's dynamic config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// FNV-1a of `text`: the same content always has the same version.
    pub version: String,
    /// keel.yaml's `listeners`, `clusters`, `dns` and `tunnels` sections, as JSON (which is YAML).
    pub text: String,
}

/// The store at one revision, and the live proxies that probes with `peers` are assigned from.
pub struct World {
    pub revision: i64,
    objects: BTreeMap<Key, Arc<Stored>>,
    /// Nodes whose snapshot depends on their name.
    named_nodes: HashSet<String>,
    /// Live proxies, for Probes with `peers`; with any such Probe every snapshot depends on the name.
    peers: Vec<Peer>,
    has_peer_probes: bool,
    built: moka::sync::Cache<String, Arc<Snapshot>>,
}

/// A live proxy a probe can target.
#[derive(Clone, Debug, PartialEq)]
pub struct Peer {
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub node_ip: Option<std::net::IpAddr>,
    pub pod_ip: Option<std::net::IpAddr>,
}

/// Rendezvous (highest random weight) score of `peer` for `node`: FNV-1a 64 of both names, mixed.
/// Each node ranks every peer by it and keeps the best `count`; a peer joining or leaving changes only
/// the rankings it takes part in.
fn rendezvous(node: &str, peer: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in node.bytes().chain([0]).chain(peer.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // A final mix (splitmix64's), so that names differing in their last byte do not rank alike.
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("revision", &self.revision)
            .field("objects", &self.objects.len())
            .finish()
    }
}

impl World {
    pub fn new(revision: i64, objects: BTreeMap<Key, Arc<Stored>>) -> Self {
        let mut named_nodes = HashSet::new();
        for (key, stored) in &objects {
            match &stored.spec {
                Spec::Router(router) => {
                    named_nodes.insert(router.node_of(&key.name).to_string());
                }
                Spec::Listener(s) => named_nodes.extend(s.node_selector.get(NODE_LABEL).cloned()),
                Spec::Cluster(s) => named_nodes.extend(s.node_selector.get(NODE_LABEL).cloned()),
                Spec::DnsZone(s) => named_nodes.extend(s.node_selector.get(NODE_LABEL).cloned()),
                Spec::PublishedService(s) => named_nodes.extend(s.node_selector.get(NODE_LABEL).cloned()),
                Spec::VisitedService(s) => named_nodes.extend(s.node_selector.get(NODE_LABEL).cloned()),
                Spec::Probe(s) => named_nodes.extend(s.selected.node_selector.get(NODE_LABEL).cloned()),
                Spec::Node | Spec::DnsRecord(_) | Spec::DnsProvider(_) => {}
            }
        }
        let has_peer_probes = objects
            .values()
            .any(|stored| matches!(&stored.spec, Spec::Probe(probe) if probe.peers.is_some()));
        Self {
            revision,
            objects,
            named_nodes,
            peers: Vec::new(),
            has_peer_probes,
            built: moka::sync::Cache::new(10_000),
        }
    }

    /// The live proxies probes with `peers` choose from.
    pub fn with_peers(mut self, peers: Vec<Peer>) -> Self {
        self.peers = peers;
        self
    }

    /// Whether some snapshot depends on the live proxies (a Probe with `peers` exists).
    pub fn uses_peers(&self) -> bool {
        self.has_peer_probes
    }

    /// The targets of a peer probe for `node`: the selected live peers' addresses, all of them or the
    /// `count` best by rendezvous score.
    fn peer_targets(&self, node: &str, probe: &keel_schemas::resource::ProbeSpec) -> Vec<String> {
        let Some(peers) = &probe.peers else { return Vec::new() };
        let kind = probe.selected.item.kind().unwrap_or_default();
        let mut candidates: Vec<(u64, std::net::IpAddr)> = self
            .peers
            .iter()
            .filter(|peer| peer.node != node && probe.selected.selects(&with_name(&peer.labels, &peer.node)))
            .filter_map(|peer| {
                let address = match peers.address {
                    keel_schemas::resource::PeerAddress::NodeIp => peer.node_ip,
                    keel_schemas::resource::PeerAddress::PodIp => peer.pod_ip,
                }?;
                Some((rendezvous(node, &peer.node), address))
            })
            .collect();
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        if peers.count > 0 {
            candidates.truncate(peers.count);
        }
        let mut targets: Vec<String> = candidates.into_iter().map(|(_, ip)| peers.target(kind, ip)).collect();
        targets.sort();
        targets.dedup();
        targets
    }

    /// The snapshot for node `node` with `labels`.
    pub fn snapshot_for(&self, node: &str, labels: &BTreeMap<String, String>) -> Arc<Snapshot> {
        let by_name = self.has_peer_probes || self.named_nodes.contains(node);
        let mut cache_key = serde_json::to_string(labels).unwrap_or_default();
        if by_name {
            cache_key.push('\n');
            cache_key.push_str(node);
        }
        self.built.get_with(cache_key, || Arc::new(self.build(node, labels, by_name)))
    }

    fn build(&self, node: &str, labels: &BTreeMap<String, String>, by_name: bool) -> Snapshot {
        let mut labels = labels.clone();
        if by_name {
            labels.insert(NODE_LABEL.to_string(), node.to_string());
        }
        let mut sections = Sections::default();
        let mut tunnels = Tunnels {
            server: None,
            routers: Vec::new(),
            publish: Vec::new(),
            visit: Vec::new(),
            max_skew: keel_schemas::config::defaults::max_skew(),
        };
        let mut routers_wanted: BTreeSet<&str> = BTreeSet::new();
        let mut all_routers = false;
        for (key, stored) in &self.objects {
            match &stored.spec {
                Spec::Listener(s) if s.selects(&labels) => sections.listeners.push(&s.item),
                Spec::Cluster(s) if s.selects(&labels) => sections.clusters.push(&s.item),
                Spec::DnsZone(s) if s.selects(&labels) => match &mut sections.dns {
                    None => sections.dns = Some(s.item.clone()),
                    Some(dns) => dns.hijack.extend(s.item.hijack.iter().cloned()),
                },
                Spec::PublishedService(s) if s.selects(&labels) => {
                    all_routers |= s.item.routers.is_empty();
                    routers_wanted.extend(s.item.routers.iter().map(String::as_str));
                    tunnels.publish.push(s.item.clone());
                }
                Spec::VisitedService(s) if s.selects(&labels) => {
                    all_routers |= s.item.routers.is_empty();
                    routers_wanted.extend(s.item.routers.iter().map(String::as_str));
                    tunnels.visit.push(s.item.clone());
                }
                Spec::Probe(probe) if probe.selected.selects(&labels) => {
                    let mut item = probe.selected.item.clone();
                    if probe.peers.is_some() {
                        let targets = self.peer_targets(node, probe);
                        if targets.is_empty() {
                            continue;
                        }
                        item.set_targets(&targets);
                    }
                    sections.probes.push(item);
                }
                Spec::Router(router) if by_name && router.node_of(&key.name) == node => {
                    if tunnels.server.is_none() {
                        tunnels.server = Some(router.server());
                    } else {
                        tracing::warn!(node, router = %key.name, "a second Router on one node is ignored");
                    }
                }
                _ => {}
            }
        }
        if !tunnels.publish.is_empty() || !tunnels.visit.is_empty() {
            for (key, stored) in self.objects.range(kind_range(Kind::Router)) {
                if let Spec::Router(router) = &stored.spec
                    && (all_routers || routers_wanted.contains(key.name.as_str()))
                {
                    tunnels.routers.push(router.reference(&key.name));
                }
            }
        }
        if tunnels.server.is_some() || !tunnels.publish.is_empty() || !tunnels.visit.is_empty() {
            sections.tunnels = Some(tunnels);
        }
        let text = serde_json::to_string_pretty(&sections).unwrap_or_default();
        Snapshot { version: keel_schemas::version_of(&text), text }
    }
}

/// The keys of one kind, for a range scan of the ordered map.
fn kind_range(kind: Kind) -> std::ops::RangeInclusive<Key> {
    let low = Key { kind, namespace: String::new(), name: String::new() };
    let high = Key { kind, namespace: "\u{10ffff}".to_string(), name: "\u{10ffff}".to_string() };
    low..=high
}

#[derive(Default, Serialize)]
struct Sections<'a> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    listeners: Vec<&'a Listener>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    clusters: Vec<&'a Cluster>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dns: Option<Dns>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tunnels: Option<Tunnels>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    probes: Vec<Probe>,
}

/// `labels` with the implicit node-name label, as selectors see a node.
fn with_name(labels: &BTreeMap<String, String>, node: &str) -> BTreeMap<String, String> {
    let mut labels = labels.clone();
    labels.insert(NODE_LABEL.to_string(), node.to_string());
    labels
}

#[cfg(test)]
mod tests {
    use keel_schemas::resource::{Resource, check_spec};
    use serde_json::json;

    use super::*;

    fn object(
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
        spec: serde_json::Value,
    ) -> (Key, Arc<Stored>) {
        let checked = check_spec(kind, name, namespace, &spec).unwrap();
        let resource: Resource = serde_json::from_value(json!({
            "apiVersion": "edge.example.com/v1", "kind": kind.name(), "metadata": {"name": name}, "spec": spec
        }))
        .unwrap();
        (Key::new(kind, namespace, name), Arc::new(Stored { resource, spec: checked }))
    }

    #[test]
    fn nodes_get_what_selects_them() {
        let objects = BTreeMap::from([
            object(Kind::Cluster, None, "db", json!({"endpoints": ["10.0.0.1:5432"]})),
            object(
                Kind::Listener,
                None,
                "db",
                json!({"address": "127.0.0.1:5432", "cluster": "db", "node_selector": {"app": "web"}}),
            ),
            object(
                Kind::Router,
                None,
                "node-r",
                json!({"listen": "0.0.0.0:7000", "address": "10.0.0.9:7000", "token_file": "/t"}),
            ),
            object(
                Kind::VisitedService,
                Some("db"),
                "mysql",
                json!({"secret_file": "/s", "port": 3306, "node_selector": {"app": "web"}}),
            ),
        ]);
        let world = World::new(4, objects);
        let web = BTreeMap::from([("app".to_string(), "web".to_string())]);
        let snapshot = world.snapshot_for("node-a", &web);
        let config: serde_json::Value = serde_json::from_str(&snapshot.text).unwrap();
        assert_eq!(config["listeners"][0]["name"], "db");
        assert_eq!(config["tunnels"]["visit"][0]["namespace"], "db");
        assert_eq!(config["tunnels"]["routers"][0]["address"], "10.0.0.9:7000");
        assert!(config["tunnels"].get("server").is_none());
        // Same labels, another node: the same snapshot, built once.
        assert!(Arc::ptr_eq(&snapshot, &world.snapshot_for("node-b", &web)));
        // The router's node gets the server, and nothing selected by app=web.
        let router = world.snapshot_for("node-r", &BTreeMap::new());
        let config: serde_json::Value = serde_json::from_str(&router.text).unwrap();
        assert_eq!(config["tunnels"]["server"]["listen"], "0.0.0.0:7000");
        assert!(config.get("listeners").is_none());
        assert_ne!(router.version, snapshot.version);
        // Content decides the version.
        let again = World::new(5, world.objects.clone()).snapshot_for("node-a", &web);
        assert_eq!(again.version, snapshot.version);
    }

    fn peer(node: &str, ip: &str) -> Peer {
        Peer {
            node: node.into(),
            labels: BTreeMap::from([("mesh".to_string(), "yes".to_string())]),
            node_ip: ip.parse().ok(),
            pod_ip: None,
        }
    }

    fn targets(world: &World, node: &str) -> Vec<String> {
        let labels = BTreeMap::from([("mesh".to_string(), "yes".to_string())]);
        let snapshot = world.snapshot_for(node, &labels);
        let config: serde_json::Value = serde_json::from_str(&snapshot.text).unwrap();
        let probe = &config["probes"][0];
        let kind = ["icmp", "tcp"].into_iter().find(|kind| !probe[*kind].is_null()).unwrap();
        probe[kind]["targets"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()
    }

    #[test]
    fn peers_are_assigned_by_rendezvous_and_barely_move() {
        let objects = BTreeMap::from([
            object(
                Kind::Probe,
                None,
                "mesh",
                json!({"icmp": {}, "peers": {"count": 2}, "node_selector": {"mesh": "yes"}}),
            ),
            object(
                Kind::Probe,
                None,
                "ssh",
                json!({"tcp": {}, "peers": {"port": 22}, "interval": "10s", "node_selector": {"mesh": "yes"}}),
            ),
        ]);
        let names: Vec<String> = (1..=8).map(|i| format!("n{i}")).collect();
        let fleet: Vec<Peer> =
            names.iter().enumerate().map(|(i, n)| peer(n, &format!("10.0.0.{}", i + 1))).collect();
        let world = World::new(1, objects.clone()).with_peers(fleet.clone());
        assert!(world.uses_peers());
        let before: Vec<Vec<String>> = names.iter().map(|n| targets(&world, n)).collect();
        for (i, assigned) in before.iter().enumerate() {
            assert_eq!(assigned.len(), 2, "{assigned:?}");
            assert!(!assigned.contains(&format!("10.0.0.{}", i + 1)), "a node never probes itself");
        }
        // Every other node, with the port, for a probe without a count.
        let labels = BTreeMap::from([("mesh".to_string(), "yes".to_string())]);
        let config: serde_json::Value =
            serde_json::from_str(&world.snapshot_for("n1", &labels).text).unwrap();
        let ssh = config["probes"].as_array().unwrap().iter().find(|p| p["name"] == "ssh").unwrap();
        assert_eq!(ssh["tcp"]["targets"].as_array().unwrap().len(), 7);
        assert_eq!(ssh["tcp"]["targets"][0], "10.0.0.2:22");

        // A ninth node joins: each node's pair changes by at most the newcomer.
        let mut grown = fleet.clone();
        grown.push(peer("n9", "10.0.0.9"));
        let world = World::new(2, objects.clone()).with_peers(grown);
        let mut moved = 0;
        for (i, name) in names.iter().enumerate() {
            let after = targets(&world, name);
            let kept = after.iter().filter(|t| before[i].contains(t)).count();
            assert!(kept >= 1, "{name}: {:?} -> {after:?}", before[i]);
            if kept == 1 {
                assert!(after.contains(&"10.0.0.9".to_string()));
                moved += 1;
            }
        }
        assert!(moved < names.len(), "not everything moves");
        // One leaves: only the nodes that probed it get another peer.
        let shrunk: Vec<Peer> = fleet.iter().filter(|p| p.node != "n3").cloned().collect();
        let world = World::new(3, objects).with_peers(shrunk);
        for (i, name) in names.iter().enumerate().filter(|(_, n)| *n != "n3") {
            let after = targets(&world, name);
            if !before[i].contains(&"10.0.0.3".to_string()) {
                assert_eq!(after, before[i], "{name} did not probe n3 and keeps its peers");
            }
        }
    }
}
