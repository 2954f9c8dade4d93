//! The connected proxies: what each one runs, refused and reported, for `/debug/proxies` (like
//! `istioctl proxy-status`) and for the per-node `Node` resources, which [`flush_nodes`] keeps current.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use keel_schemas::resource::{API_VERSION, Kind, ObjectMeta, Resource, Spec, is_object_name};
use keel_schemas::stream::ProxyStatus;
use serde::Serialize;
use tokio::sync::Mutex;

use crate::State;
use crate::store::Key;

/// One proxy's stream, as the control plane sees it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyRecord {
    pub node: String,
    pub labels: BTreeMap<String, String>,
    /// The proxy's address as seen from here.
    pub address: String,
    pub software: String,
    /// Where it runs (node IP, pod IP, pod name, namespace), as its hello said.
    pub client: keel_schemas::stream::ClientInfo,
    pub connected: bool,
    pub connected_since: String,
    /// The last snapshot sent on this stream, and how many were sent.
    pub sent_version: Option<String>,
    pub snapshots_sent: u64,
    /// The version the proxy runs, as it last acknowledged.
    pub acked_version: Option<String>,
    pub last_nack: Option<Nack>,
    pub status: Option<ProxyStatus>,
}

impl ProxyRecord {
    /// The proxy refused (NACKed) the snapshot last sent to it, and runs an older one.
    pub fn refuses_sent(&self) -> bool {
        match (&self.last_nack, &self.sent_version) {
            (Some(nack), Some(sent)) => &nack.version == sent && self.acked_version.as_ref() != Some(sent),
            _ => false,
        }
    }
}

/// A refused snapshot.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Nack {
    pub version: String,
    pub error: String,
    pub at: String,
}

/// Every stream, by connection id; records of closed streams wait here until written to their node.
#[derive(Debug, Default)]
pub struct Fleet {
    next_id: AtomicU64,
    streams: Mutex<HashMap<u64, Entry>>,
}

#[derive(Debug)]
struct Entry {
    record: ProxyRecord,
    /// Changed since its `Node` resource was last written.
    dirty: bool,
}

impl Fleet {
    pub async fn register(&self, record: ProxyRecord) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.streams.lock().await.insert(id, Entry { record, dirty: true });
        id
    }

    /// Changes a stream's record.
    pub async fn update(&self, id: u64, change: impl FnOnce(&mut ProxyRecord)) {
        if let Some(entry) = self.streams.lock().await.get_mut(&id) {
            change(&mut entry.record);
            entry.dirty = true;
        }
    }

    /// Sets a stream's reported status; only a different one makes the record dirty (to be written).
    pub async fn set_status(&self, id: u64, status: ProxyStatus) {
        if let Some(entry) = self.streams.lock().await.get_mut(&id)
            && entry.record.status.as_ref() != Some(&status)
        {
            entry.record.status = Some(status);
            entry.dirty = true;
        }
    }

    /// Marks a stream closed; its record goes once its node has been written.
    pub async fn disconnected(&self, id: u64) {
        self.update(id, |record| record.connected = false).await;
    }

    /// Connected proxies as probe peers.
    pub async fn peers(&self) -> Vec<crate::snapshot::Peer> {
        self.connected()
            .await
            .into_iter()
            .map(|record| crate::snapshot::Peer {
                node_ip: record.client.node_ip.parse().ok(),
                pod_ip: record.client.pod_ip.parse().ok(),
                node: record.node,
                labels: record.labels,
            })
            .collect()
    }

    /// Connected proxies, by node name.
    pub async fn connected(&self) -> Vec<ProxyRecord> {
        let streams = self.streams.lock().await;
        let mut records: Vec<ProxyRecord> = streams
            .values()
            .filter(|entry| entry.record.connected)
            .map(|entry| entry.record.clone())
            .collect();
        records.sort_by(|a, b| a.node.cmp(&b.node).then(a.connected_since.cmp(&b.connected_since)));
        records
    }

    /// Takes the records changed since the last call, dropping closed streams' records.
    async fn take_dirty(&self) -> Vec<ProxyRecord> {
        let mut streams = self.streams.lock().await;
        let mut out = Vec::new();
        streams.retain(|_, entry| {
            if entry.dirty {
                entry.dirty = false;
                out.push(entry.record.clone());
            }
            entry.record.connected
        });
        out
    }
}

/// Now, as an RFC 3339 timestamp.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Writes changed proxy records to their `Node` resources every `interval`, in one batch, so that a
/// thousand proxies connecting at once cost a handful of writes rather than a thousand stalls.
pub async fn flush_nodes(state: Arc<State>, interval: Duration) {
    let mut skipped_names = std::collections::HashSet::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = state.stop.cancelled() => return,
        }
        let records = state.fleet.take_dirty().await;
        if records.is_empty() {
            continue;
        }
        // Several streams of one node: the connected one wins over a closed one.
        let mut by_node: BTreeMap<String, ProxyRecord> = BTreeMap::new();
        for record in records {
            let replace = by_node.get(&record.node).is_none_or(|kept| !kept.connected || record.connected);
            if replace {
                by_node.insert(record.node.clone(), record);
            }
        }
        let mut store = state.store.lock().await;
        if let Err(error) = store.begin_batch() {
            tracing::warn!(%error, "cannot record node statuses");
            continue;
        }
        for (node, record) in by_node {
            if !is_object_name(&node) {
                if skipped_names.insert(node.clone()) {
                    tracing::warn!(
                        node,
                        "node name is not a valid object name; no Node resource is kept for it"
                    );
                }
                continue;
            }
            let key = Key::new(Kind::Node, None, &node);
            let status = serde_json::to_value(&record).unwrap_or_default();
            let result = match store.get(&key).cloned() {
                None => {
                    let resource = Resource {
                        api_version: API_VERSION.to_string(),
                        kind: Kind::Node.name().to_string(),
                        metadata: ObjectMeta {
                            name: node.clone(),
                            labels: record.labels.clone(),
                            ..Default::default()
                        },
                        spec: serde_json::json!({}),
                        status,
                    };
                    store.create(key, resource, Spec::Node)
                }
                Some(current) => {
                    let mut resource = current.resource.clone();
                    resource.metadata.resource_version.clear();
                    resource.metadata.labels = record.labels.clone();
                    let labels = store.replace(key.clone(), resource.clone(), Spec::Node, false);
                    resource.status = status;
                    labels.and_then(|_| store.replace(key, resource, Spec::Node, true))
                }
            };
            if let Err(error) = result {
                tracing::warn!(node, %error, "cannot record the node's status");
            }
        }
        if let Err(error) = store.end_batch() {
            tracing::warn!(%error, "cannot record node statuses");
        }
    }
}
