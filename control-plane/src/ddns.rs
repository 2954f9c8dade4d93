//! DDNS in the control plane: `DnsRecord`s follow the addresses nodes report, through a durable outbox.
//!
//! When a node reports an address (or a record is written), every record that follows that node gets a
//! row in `dns_outbox` (SQLite): "record R should hold address X". One row per record, so a newer address
//! replaces a pending older one. The [`run`] worker takes due rows, changes the zone through the record's
//! `DnsProvider`, then verifies by asking the zone's server; only a verified update removes the row
//! (and only if no newer address arrived meanwhile). A failure stays in the outbox with its error and a
//! growing delay (1 s doubling to 5 min, jittered) and is retried until it succeeds, across restarts.
//! Each record's `status` says what it should hold, what the server was seen to hold, the last success
//! and the last error.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keel_ddns::{Failure, Target};
use keel_schemas::resource::{Kind, Spec};
use serde_json::{Value, json};

use crate::State;
use crate::fleet::now;
use crate::store::{Key, OutboxItem, Store};

/// The longest wait between two attempts at one update.
const RETRY_MAX: Duration = Duration::from_secs(300);
/// With nothing due, the worker still looks this often.
const IDLE_LOOK: Duration = Duration::from_secs(60);

fn now_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as i64
}

/// Whether a record's status already shows `address` at the server.
fn in_sync(store: &Store, record: &str, address: IpAddr) -> bool {
    store.get(&Key::new(Kind::DnsRecord, None, record)).is_some_and(|stored| {
        let status = &stored.resource.status;
        status["desired"] == address.to_string() && status["observed"] == json!([address.to_string()])
    })
}

/// A node reported `address`: queue an update for every record that follows it and does not hold it.
pub async fn address_reported(state: &State, node: &str, address: IpAddr) {
    let mut store = state.store.lock().await;
    let records: Vec<String> = store
        .list(Kind::DnsRecord, None)
        .filter_map(|stored| match &stored.spec {
            Spec::DnsRecord(record)
                if record.address_from.node == node && record.record_type.fits(address) =>
            {
                Some(stored.resource.metadata.name.clone())
            }
            _ => None,
        })
        .collect();
    let mut queued = false;
    for record in records {
        if in_sync(&store, &record, address) {
            continue;
        }
        match store.enqueue_update(&record, &address.to_string(), now_ms()) {
            Ok(()) => queued = true,
            Err(error) => tracing::error!(record, %error, "cannot queue a DNS update"),
        }
    }
    drop(store);
    if queued {
        state.ddns_wakeup.notify_one();
    }
}

/// A record was written: queue an update if its node has reported an address. A deleted record's
/// pending update is dropped by the worker.
pub async fn record_written(state: &State, name: &str) {
    let mut store = state.store.lock().await;
    let Some(Spec::DnsRecord(record)) =
        store.get(&Key::new(Kind::DnsRecord, None, name)).map(|s| s.spec.clone())
    else {
        drop(store);
        state.ddns_wakeup.notify_one();
        return;
    };
    let address = match store.current_address(&record.address_from.node) {
        Ok(Some(address)) => address.parse::<IpAddr>().ok(),
        Ok(None) => None,
        Err(error) => {
            tracing::error!(record = name, %error, "cannot read the node's address");
            None
        }
    };
    if let Some(address) = address.filter(|address| record.record_type.fits(*address))
        && !in_sync(&store, name, address)
        && let Err(error) = store.enqueue_update(name, &address.to_string(), now_ms())
    {
        tracing::error!(record = name, %error, "cannot queue a DNS update");
    }
    drop(store);
    state.ddns_wakeup.notify_one();
}

/// Works through the outbox until the control plane stops.
pub async fn run(state: Arc<State>) {
    loop {
        let items = match state.store.lock().await.outbox() {
            Ok(items) => items,
            Err(error) => {
                tracing::error!(%error, "cannot read the DNS outbox");
                Vec::new()
            }
        };
        let now = now_ms();
        let (due, later): (Vec<OutboxItem>, Vec<OutboxItem>) =
            items.into_iter().partition(|item| item.next_attempt_ms <= now);
        if !due.is_empty() {
            for item in due {
                if state.stop.is_cancelled() {
                    return;
                }
                attempt(&state, item).await;
            }
            // Read the outbox again: the attempts just made set new due times.
            continue;
        }
        let wait = later
            .iter()
            .map(|item| Duration::from_millis((item.next_attempt_ms - now).max(0) as u64))
            .min()
            .unwrap_or(IDLE_LOOK)
            .min(IDLE_LOOK);
        tokio::select! {
            () = state.ddns_wakeup.notified() => {}
            () = tokio::time::sleep(wait) => {}
            () = state.stop.cancelled() => return,
        }
    }
}

/// One attempt at one update.
async fn attempt(state: &State, item: OutboxItem) {
    let (record, provider) = {
        let mut store = state.store.lock().await;
        let record = match store.get(&Key::new(Kind::DnsRecord, None, &item.record)).map(|s| s.spec.clone()) {
            Some(Spec::DnsRecord(record)) => record,
            _ => {
                if let Err(error) = store.forget_update(&item.record) {
                    tracing::error!(record = item.record, %error, "cannot drop a deleted record's update");
                }
                return;
            }
        };
        let provider =
            match store.get(&Key::new(Kind::DnsProvider, None, &record.provider)).map(|s| s.spec.clone()) {
                Some(Spec::DnsProvider(provider)) => Some(provider),
                _ => None,
            };
        (record, provider)
    };
    let result = match provider {
        None => Err(Failure::now(format!("no DnsProvider named {:?}", record.provider))),
        Some(provider) => match item.address.parse::<IpAddr>() {
            Ok(address) => {
                let fqdn = record.fqdn();
                let target = Target { zone: &record.zone, fqdn: &fqdn, ttl: record.ttl.get() };
                keel_ddns::update(&provider, &target, address).await
            }
            Err(_) => Err(Failure::now(format!("invalid address {:?} in the outbox", item.address))),
        },
    };
    let mut store = state.store.lock().await;
    match result {
        Ok(observed) => {
            tracing::info!(record = item.record, address = item.address, "DNS record updated and verified");
            if let Err(error) = store.update_done(&item) {
                tracing::error!(record = item.record, %error, "cannot mark a DNS update done");
            }
            write_status(&mut store, &item.record, |status| {
                status["desired"] = json!(item.address);
                status["observed"] = json!(observed.iter().map(ToString::to_string).collect::<Vec<_>>());
                status["inSync"] = json!(true);
                status["lastSuccess"] = json!(now());
                status["lastError"] = Value::Null;
                status["attempts"] = json!(item.attempts + 1);
                status["updates"] = json!(status["updates"].as_u64().unwrap_or(0) + 1);
            });
        }
        Err(Failure { message: error, retry_after }) => {
            let backoff = Duration::from_secs(1u64 << item.attempts.clamp(0, 9))
                .min(RETRY_MAX)
                .mul_f64(0.8 + fastrand::f64() * 0.4);
            // A provider that said when to come back (429 Retry-After) is not asked sooner.
            let delay = retry_after.map_or(backoff, |asked| asked.max(backoff));
            tracing::warn!(record = item.record, address = item.address, error, retry_in = ?delay, "DNS update failed; will retry");
            if let Err(store_error) = store.update_failed(&item, &error, now_ms() + delay.as_millis() as i64)
            {
                tracing::error!(record = item.record, %store_error, "cannot record a failed DNS update");
            }
            write_status(&mut store, &item.record, |status| {
                status["desired"] = json!(item.address);
                status["inSync"] = json!(false);
                status["lastError"] = json!(error);
                status["lastErrorAt"] = json!(now());
                status["attempts"] = json!(item.attempts + 1);
                status["failures"] = json!(status["failures"].as_u64().unwrap_or(0) + 1);
            });
        }
    }
}

/// Every record with its spec and status, and every node's address: the state page's data (seed 001's
/// `/raw`).
pub fn state_view(store: &Store) -> Value {
    let records: Vec<Value> = store
        .list(Kind::DnsRecord, None)
        .filter_map(|stored| match &stored.spec {
            Spec::DnsRecord(record) => Some(json!({
                "name": stored.resource.metadata.name,
                "fqdn": record.fqdn(),
                "type": record.record_type,
                "node": record.address_from.node,
                "provider": record.provider,
                "status": stored.resource.status,
            })),
            _ => None,
        })
        .collect();
    let addresses: Vec<Value> = store
        .current_addresses()
        .unwrap_or_default()
        .into_iter()
        .map(|(node, address)| json!({"node": node, "address": address}))
        .collect();
    let pending = store.outbox().map(|outbox| outbox.len()).unwrap_or(0);
    json!({"records": records, "addresses": addresses, "pendingUpdates": pending})
}

/// Changes a record's status in place (keeping what `change` does not touch).
fn write_status(store: &mut Store, record: &str, change: impl FnOnce(&mut Value)) {
    let key = Key::new(Kind::DnsRecord, None, record);
    let Some(current) = store.get(&key).cloned() else { return };
    let mut resource = current.resource.clone();
    if !resource.status.is_object() {
        resource.status = json!({});
    }
    change(&mut resource.status);
    resource.metadata.resource_version.clear();
    if let Err(error) = store.replace(key, resource, current.spec.clone(), true) {
        tracing::warn!(record, %error, "cannot write the record's status");
    }
}
