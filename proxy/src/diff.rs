//! The difference between the running config and a new one, as typed changes.
//!
//! A listener is identified by its bind address (by its name when it binds port 0), so renaming a
//! listener, or two listeners trading addresses, is an in-place update that keeps the socket and its
//! connections. A cluster is identified by its name. Anything equal in both configs yields no change.

use std::collections::HashMap;
use std::net::SocketAddr;

use keel_schemas::Config;
use keel_schemas::config::{Cluster, Listener};

#[derive(Clone, Debug, PartialEq)]
pub enum ListenerChange {
    Added(Listener),
    /// Same socket, new settings (possibly a new name).
    Updated {
        old: Listener,
        new: Listener,
    },
    Removed(Listener),
}

#[derive(Clone, Debug, PartialEq)]
pub enum ClusterChange {
    Added(Cluster),
    Updated { old: Cluster, new: Cluster },
    Removed(Cluster),
}

/// Everything that differs between two configs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConfigDiff {
    pub listeners: Vec<ListenerChange>,
    pub clusters: Vec<ClusterChange>,
    /// The admin address differs: that takes a restart, so it is reported rather than applied.
    pub admin_address_changed: bool,
}

impl ConfigDiff {
    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty() && self.clusters.is_empty() && !self.admin_address_changed
    }

    /// A one-line summary for logs: `+1 ~2 -0 listeners, +0 ~1 -0 clusters`.
    pub fn summary(&self) -> String {
        let count = |added: usize, updated: usize, removed: usize| format!("+{added} ~{updated} -{removed}");
        let listeners = count(
            self.listeners.iter().filter(|c| matches!(c, ListenerChange::Added(_))).count(),
            self.listeners.iter().filter(|c| matches!(c, ListenerChange::Updated { .. })).count(),
            self.listeners.iter().filter(|c| matches!(c, ListenerChange::Removed(_))).count(),
        );
        let clusters = count(
            self.clusters.iter().filter(|c| matches!(c, ClusterChange::Added(_))).count(),
            self.clusters.iter().filter(|c| matches!(c, ClusterChange::Updated { .. })).count(),
            self.clusters.iter().filter(|c| matches!(c, ClusterChange::Removed(_))).count(),
        );
        format!("{listeners} listeners, {clusters} clusters")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ListenerKey {
    Address(SocketAddr),
    Name(String),
}

fn listener_key(listener: &Listener) -> ListenerKey {
    let address = listener.address.0;
    if address.port() == 0 { ListenerKey::Name(listener.name.clone()) } else { ListenerKey::Address(address) }
}

pub fn diff(old: &Config, new: &Config) -> ConfigDiff {
    let mut out =
        ConfigDiff { admin_address_changed: old.admin.address != new.admin.address, ..ConfigDiff::default() };

    let old_listeners: HashMap<ListenerKey, &Listener> =
        old.listeners.iter().map(|l| (listener_key(l), l)).collect();
    let new_keys: Vec<ListenerKey> = new.listeners.iter().map(listener_key).collect();
    for (listener, key) in new.listeners.iter().zip(&new_keys) {
        match old_listeners.get(key) {
            None => out.listeners.push(ListenerChange::Added(listener.clone())),
            Some(previous) if *previous != listener => out
                .listeners
                .push(ListenerChange::Updated { old: (*previous).clone(), new: listener.clone() }),
            Some(_) => {}
        }
    }
    for listener in &old.listeners {
        if !new_keys.contains(&listener_key(listener)) {
            out.listeners.push(ListenerChange::Removed(listener.clone()));
        }
    }

    let old_clusters: HashMap<&str, &Cluster> = old.clusters.iter().map(|c| (c.name.as_str(), c)).collect();
    for cluster in &new.clusters {
        match old_clusters.get(cluster.name.as_str()) {
            None => out.clusters.push(ClusterChange::Added(cluster.clone())),
            Some(previous) if *previous != cluster => {
                out.clusters.push(ClusterChange::Updated { old: (*previous).clone(), new: cluster.clone() })
            }
            Some(_) => {}
        }
    }
    for cluster in &old.clusters {
        if !new.clusters.iter().any(|c| c.name == cluster.name) {
            out.clusters.push(ClusterChange::Removed(cluster.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_schemas::MapEnvironment;

    fn config(text: &str) -> Config {
        keel_schemas::load(text, "test", &MapEnvironment::default()).unwrap().config().clone()
    }

    const BASE: &str = r#"
listeners:
  - {name: a, address: "127.0.0.1:7001", cluster: one}
  - {name: b, address: "127.0.0.1:7002", cluster: one}
clusters:
  - {name: one, endpoints: ["127.0.0.1:8001"]}
  - {name: two, endpoints: ["127.0.0.1:8002"]}
"#;

    #[test]
    fn identical_configs_have_no_changes() {
        assert!(diff(&config(BASE), &config(BASE)).is_empty());
    }

    #[test]
    fn listeners_are_matched_by_address() {
        let new = config(
            r#"
listeners:
  - {name: renamed, address: "127.0.0.1:7001", cluster: one}
  - {name: c, address: "127.0.0.1:7003", cluster: one}
clusters:
  - {name: one, endpoints: ["127.0.0.1:8001"]}
  - {name: two, endpoints: ["127.0.0.1:8002"]}
"#,
        );
        let changes = diff(&config(BASE), &new);
        assert_eq!(changes.summary(), "+1 ~1 -1 listeners, +0 ~0 -0 clusters");
        assert!(
            matches!(&changes.listeners[0], ListenerChange::Updated { old, new } if old.name == "a" && new.name == "renamed")
        );
        assert!(matches!(&changes.listeners[1], ListenerChange::Added(l) if l.name == "c"));
        assert!(matches!(&changes.listeners[2], ListenerChange::Removed(l) if l.name == "b"));
    }

    #[test]
    fn clusters_are_matched_by_name() {
        let new = config(
            r#"
listeners:
  - {name: a, address: "127.0.0.1:7001", cluster: one}
  - {name: b, address: "127.0.0.1:7002", cluster: three}
clusters:
  - {name: one, endpoints: ["127.0.0.1:8001", "127.0.0.1:8009"]}
  - {name: three, endpoints: ["127.0.0.1:8003"]}
admin: {address: "127.0.0.1:9999"}
"#,
        );
        let changes = diff(&config(BASE), &new);
        assert_eq!(changes.summary(), "+0 ~1 -0 listeners, +1 ~1 -1 clusters");
        assert!(changes.admin_address_changed);
    }

    #[test]
    fn port_zero_listeners_are_matched_by_name() {
        let old = config(
            "listeners:\n  - {name: a, address: \"127.0.0.1:0\", cluster: c}\n  - {name: b, address: \"127.0.0.1:0\", cluster: c}\nclusters:\n  - {name: c, endpoints: [\"127.0.0.1:1\"]}\n",
        );
        let new = config(
            "listeners:\n  - {name: a, address: \"127.0.0.1:0\", cluster: c, idle_timeout: 1s}\nclusters:\n  - {name: c, endpoints: [\"127.0.0.1:1\"]}\n",
        );
        let changes = diff(&old, &new);
        assert_eq!(changes.summary(), "+0 ~1 -1 listeners, +0 ~0 -0 clusters");
    }
}
