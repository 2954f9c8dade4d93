//! Per-node snapshots: which resources a node gets, assembled into keel.yaml sections and versioned by
//! content.
//!
//! A [`World`] is the store's objects at one revision, published by the debouncer after writes settle.
//! A node's snapshot depends on its labels, and on its name only when a Router runs on it or a selector
//! names it (the implicit `edge.example.com/node` label); snapshots are built once per distinct input
//! and shared, so a thousand nodes with the same labels cost one build.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use keel_schemas::config::{Cluster, Dns, Listener, Tunnels};
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

/// The store at one revision.
pub struct World {
    pub revision: i64,
    objects: BTreeMap<Key, Arc<Stored>>,
    /// Nodes whose snapshot depends on their name.
    named_nodes: HashSet<String>,
    built: moka::sync::Cache<String, Arc<Snapshot>>,
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
                Spec::Node | Spec::DnsRecord(_) | Spec::DnsProvider(_) => {}
            }
        }
        Self { revision, objects, named_nodes, built: moka::sync::Cache::new(10_000) }
    }

    /// The snapshot for node `node` with `labels`.
    pub fn snapshot_for(&self, node: &str, labels: &BTreeMap<String, String>) -> Arc<Snapshot> {
        let by_name = self.named_nodes.contains(node);
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
}
