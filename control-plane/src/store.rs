//! The resource store: SQLite on disk (one file, WAL), every object also held in memory.
//!
//! SQLite is the durable copy; reads (the REST API's lists, snapshot builds) are served from memory.
//! Every write runs in one SQLite transaction (a savepoint, so that writes can be batched) that bumps the store's revision, writes the object and
//! appends an event for watchers; memory changes only after the transaction commits, so a failed write
//! changes nothing. The revision is the `resourceVersion` of what the write produced, as in etcd.
//!
//! The schema is migrated on open: `schema_migrations` records each applied step, steps run in order in
//! their own transactions, and a database from a newer control plane is refused rather than damaged.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use keel_schemas::resource::{API_VERSION, Kind, ObjectMeta, Resource, Spec};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

/// The schema, one step per version. Never edit a step that has shipped: add one.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE resources (
            kind TEXT NOT NULL,
            namespace TEXT NOT NULL,
            name TEXT NOT NULL,
            uid TEXT NOT NULL,
            resource_version INTEGER NOT NULL,
            generation INTEGER NOT NULL,
            created TEXT NOT NULL,
            labels TEXT NOT NULL,
            spec TEXT NOT NULL,
            status TEXT NOT NULL,
            PRIMARY KEY (kind, namespace, name)
        );
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO meta (key, value) VALUES ('revision', 0);",
    ),
    (
        2,
        "CREATE TABLE events (
            revision INTEGER PRIMARY KEY,
            type TEXT NOT NULL,
            object TEXT NOT NULL
        );",
    ),
    (3, "ALTER TABLE resources ADD COLUMN annotations TEXT NOT NULL DEFAULT '{}';"),
    (
        4,
        "CREATE TABLE public_ips (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            node TEXT NOT NULL,
            address TEXT NOT NULL,
            reported_at TEXT NOT NULL
        );
        CREATE INDEX public_ips_by_node ON public_ips (node, id);",
    ),
    (
        5,
        "CREATE TABLE dns_outbox (
            record TEXT PRIMARY KEY,
            address TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            next_attempt_ms INTEGER NOT NULL,
            last_error TEXT NOT NULL,
            enqueued_at TEXT NOT NULL
        );",
    ),
];

/// One DNS update waiting to be made: record `record` should hold `address`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxItem {
    pub record: String,
    pub address: String,
    pub attempts: i64,
    pub next_attempt_ms: i64,
    pub last_error: String,
}

/// Reports kept per node in the address history.
const ADDRESS_HISTORY: i64 = 100;

/// Events kept for watchers that resume from an older revision.
const EVENTS_KEPT: i64 = 10_000;

/// Where an object lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub kind: Kind,
    /// Empty for cluster-scoped kinds.
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(kind: Kind, namespace: Option<&str>, name: &str) -> Self {
        Self { kind, namespace: namespace.unwrap_or_default().to_string(), name: name.to_string() }
    }
}

/// An object and its checked spec.
#[derive(Clone, Debug)]
pub struct Stored {
    pub resource: Resource,
    pub spec: Spec,
}

/// What a watcher sees.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: EventType,
    pub object: Resource,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error(
        "{kind} {name:?} has been modified: resourceVersion {given} is stale (now {current}); read it again and retry"
    )]
    Conflict { kind: &'static str, name: String, given: String, current: String },
    #[error(
        "resourceVersion {0} is too old to watch from (events are kept for the last {EVENTS_KEPT} changes); list again"
    )]
    Gone(i64),
    #[error(
        "the database was written by a newer control plane (schema version {found}; this one knows up to {known})"
    )]
    TooNew { found: i64, known: i64 },
    #[error("stored object {key} is unreadable: {problem}")]
    Corrupt { key: String, problem: String },
    #[error("database: {0}")]
    Database(#[from] rusqlite::Error),
}

/// Why the database's storage refused a write: something outside the control plane that an operator
/// must fix (and nothing in memory changed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unwritable {
    /// `SQLITE_FULL`: the file system is out of space (or the file at its size limit).
    DiskFull,
    /// `SQLITE_READONLY`, `SQLITE_IOERR`, `SQLITE_CANTOPEN`, `SQLITE_PERM`: a read-only file system, a
    /// failing disk, lost permissions.
    Unavailable,
}

impl StoreError {
    /// Whether this is the storage refusing a write, and how.
    pub fn unwritable(&self) -> Option<Unwritable> {
        use rusqlite::ErrorCode;
        let StoreError::Database(rusqlite::Error::SqliteFailure(failure, _)) = self else { return None };
        match failure.code {
            ErrorCode::DiskFull => Some(Unwritable::DiskFull),
            ErrorCode::ReadOnly
            | ErrorCode::SystemIoFailure
            | ErrorCode::CannotOpen
            | ErrorCode::PermissionDenied => Some(Unwritable::Unavailable),
            _ => None,
        }
    }
}

/// The store. Not shared by itself: the control plane holds it behind one async mutex.
pub struct Store {
    connection: Connection,
    objects: BTreeMap<Key, Arc<Stored>>,
    revision: i64,
    /// Every committed change, for live watches.
    changes: tokio::sync::broadcast::Sender<Event>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("objects", &self.objects.len())
            .field("revision", &self.revision)
            .finish()
    }
}

impl Store {
    /// Whether SQLite opened the database read-only (a read-only file system or file): everything is
    /// served from it, and every write is refused with [`Unwritable::Unavailable`].
    pub fn read_only(&self) -> bool {
        self.connection.is_readonly(rusqlite::MAIN_DB).unwrap_or(false)
    }

    /// Opens (creating and migrating as needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut connection = Connection::open(path)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut connection)?;
        let revision: i64 =
            connection.query_row("SELECT value FROM meta WHERE key = 'revision'", [], |row| row.get(0))?;
        let mut objects = BTreeMap::new();
        {
            let mut statement = connection.prepare(
                "SELECT kind, namespace, name, uid, resource_version, generation, created, labels, annotations, spec, status FROM resources",
            )?;
            let rows = statement.query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, i64>(4)?,
                    row.get::<_, i64>(5)?,
                    row.get::<_, String>(6)?,
                    row.get::<_, String>(7)?,
                    row.get::<_, String>(8)?,
                    row.get::<_, String>(9)?,
                    row.get::<_, String>(10)?,
                ))
            })?;
            for row in rows {
                let (
                    kind,
                    namespace,
                    name,
                    uid,
                    version,
                    generation,
                    created,
                    labels,
                    annotations,
                    spec,
                    status,
                ) = row?;
                let key_text = format!("{kind}/{namespace}/{name}");
                let corrupt = |problem: String| StoreError::Corrupt { key: key_text.clone(), problem };
                let kind = Kind::from_name(&kind).ok_or_else(|| corrupt(format!("unknown kind {kind}")))?;
                let parse =
                    |text: &str| serde_json::from_str::<Value>(text).map_err(|e| corrupt(e.to_string()));
                let resource = Resource {
                    api_version: API_VERSION.to_string(),
                    kind: kind.name().to_string(),
                    metadata: ObjectMeta {
                        name: name.clone(),
                        namespace: (!namespace.is_empty()).then(|| namespace.clone()),
                        labels: serde_json::from_value(parse(&labels)?)
                            .map_err(|e| corrupt(e.to_string()))?,
                        annotations: serde_json::from_value(parse(&annotations)?)
                            .map_err(|e| corrupt(e.to_string()))?,
                        uid,
                        resource_version: version.to_string(),
                        generation,
                        creation_timestamp: Some(created),
                    },
                    spec: parse(&spec)?,
                    status: parse(&status)?,
                };
                // A spec stored by an older control plane may fail today's checks; it is kept (and
                // reported) rather than dropped, and takes no part in snapshots until it is fixed.
                let spec = match keel_schemas::resource::check_spec(
                    kind,
                    &name,
                    resource.metadata.namespace.as_deref(),
                    &resource.spec,
                ) {
                    Ok(spec) => spec,
                    Err(errors) => {
                        tracing::warn!(object = %key_text, ?errors, "stored spec no longer valid; ignored until replaced");
                        continue;
                    }
                };
                objects.insert(Key { kind, namespace, name }, Arc::new(Stored { resource, spec }));
            }
        }
        let changes = tokio::sync::broadcast::channel(4096).0;
        Ok(Self { connection, objects, revision, changes })
    }

    /// Starts a batch: the writes until [`Store::end_batch`] share one SQLite transaction (each is a
    /// savepoint within it), which makes a thousand small writes cost one disk sync instead of a thousand.
    pub fn begin_batch(&mut self) -> Result<(), StoreError> {
        Ok(self.connection.execute_batch("BEGIN")?)
    }

    /// Commits a batch. Should the commit fail, memory holds writes the disk lost; only the control
    /// plane's own soft state (node records, rewritten on every flush) is written in batches.
    pub fn end_batch(&mut self) -> Result<(), StoreError> {
        Ok(self.connection.execute_batch("COMMIT")?)
    }

    /// Records an address a node reported (seed 000's `POST /api/v1/public-ip`). Returns the node's
    /// previous address. The history keeps the last reports of each node.
    pub fn record_address(
        &mut self,
        node: &str,
        address: std::net::IpAddr,
    ) -> Result<Option<String>, StoreError> {
        let previous = self.current_address(node)?;
        let transaction = self.connection.savepoint()?;
        transaction.execute(
            "INSERT INTO public_ips (node, address, reported_at) VALUES (?1, ?2, ?3)",
            params![
                node,
                address.to_string(),
                humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
            ],
        )?;
        transaction.execute(
            "DELETE FROM public_ips WHERE node = ?1 AND id NOT IN (SELECT id FROM public_ips WHERE node = ?1 ORDER BY id DESC LIMIT ?2)",
            params![node, ADDRESS_HISTORY],
        )?;
        transaction.commit()?;
        Ok(previous)
    }

    /// The address a node last reported.
    pub fn current_address(&self, node: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .connection
            .query_row(
                "SELECT address FROM public_ips WHERE node = ?1 ORDER BY id DESC LIMIT 1",
                [node],
                |row| row.get(0),
            )
            .optional()?)
    }

    /// The address of one family a node last reported, with when: (address, reported_at).
    pub fn current_address_of(&self, node: &str, ipv6: bool) -> Result<Option<(String, String)>, StoreError> {
        Ok(self
            .connection
            .query_row(
                "SELECT address, reported_at FROM public_ips WHERE node = ?1 AND (instr(address, ':') > 0) = ?2
                 ORDER BY id DESC LIMIT 1",
                params![node, ipv6],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?)
    }

    /// Every node's reports, newest first: (node, address, reported_at).
    pub fn address_history(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        let mut statement = self
            .connection
            .prepare("SELECT node, address, reported_at FROM public_ips ORDER BY node, id DESC")?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Asks for record `record` to hold `address`. One row per record: a newer address replaces a pending
    /// one (and starts its attempts afresh); the same address again changes nothing.
    pub fn enqueue_update(&mut self, record: &str, address: &str, now_ms: i64) -> Result<(), StoreError> {
        self.connection.execute(
            "INSERT INTO dns_outbox (record, address, attempts, next_attempt_ms, last_error, enqueued_at)
             VALUES (?1, ?2, 0, ?3, '', ?4)
             ON CONFLICT (record) DO UPDATE SET address = excluded.address, attempts = 0,
               next_attempt_ms = excluded.next_attempt_ms, last_error = '', enqueued_at = excluded.enqueued_at
             WHERE dns_outbox.address != excluded.address",
            params![
                record,
                address,
                now_ms,
                humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
            ],
        )?;
        Ok(())
    }

    /// Every waiting update, soonest first.
    pub fn outbox(&self) -> Result<Vec<OutboxItem>, StoreError> {
        let mut statement = self.connection.prepare(
            "SELECT record, address, attempts, next_attempt_ms, last_error FROM dns_outbox ORDER BY next_attempt_ms",
        )?;
        let rows = statement.query_map([], |row| {
            Ok(OutboxItem {
                record: row.get(0)?,
                address: row.get(1)?,
                attempts: row.get(2)?,
                next_attempt_ms: row.get(3)?,
                last_error: row.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// An update was made and verified: done, unless a newer address arrived meanwhile.
    pub fn update_done(&mut self, item: &OutboxItem) -> Result<(), StoreError> {
        self.connection.execute(
            "DELETE FROM dns_outbox WHERE record = ?1 AND address = ?2",
            params![item.record, item.address],
        )?;
        Ok(())
    }

    /// An update failed: try again at `next_attempt_ms`, unless a newer address arrived meanwhile.
    pub fn update_failed(
        &mut self,
        item: &OutboxItem,
        error: &str,
        next_attempt_ms: i64,
    ) -> Result<(), StoreError> {
        self.connection.execute(
            "UPDATE dns_outbox SET attempts = attempts + 1, next_attempt_ms = ?3, last_error = ?4
             WHERE record = ?1 AND address = ?2",
            params![item.record, item.address, next_attempt_ms, error],
        )?;
        Ok(())
    }

    /// Drops the waiting update of a record that no longer exists.
    pub fn forget_update(&mut self, record: &str) -> Result<(), StoreError> {
        self.connection.execute("DELETE FROM dns_outbox WHERE record = ?1", [record])?;
        Ok(())
    }

    /// Every node's current address (the latest report of each).
    pub fn current_addresses(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut statement = self.connection.prepare(
            "SELECT node, address FROM public_ips WHERE id IN (SELECT MAX(id) FROM public_ips GROUP BY node)",
        )?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Changes from now on. Subscribe while holding the store, after reading [`Store::events_since`], so
    /// that nothing falls between the two.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.changes.subscribe()
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }

    pub fn get(&self, key: &Key) -> Option<&Arc<Stored>> {
        self.objects.get(key)
    }

    /// Every object of `kind` (in `namespace`, or in all when `None`), in key order.
    pub fn list(&self, kind: Kind, namespace: Option<&str>) -> impl Iterator<Item = &Arc<Stored>> {
        self.objects
            .iter()
            .filter(move |(key, _)| key.kind == kind && namespace.is_none_or(|ns| key.namespace == ns))
            .map(|(_, stored)| stored)
    }

    /// All objects, shared: what snapshots are built from.
    pub fn all(&self) -> BTreeMap<Key, Arc<Stored>> {
        self.objects.clone()
    }

    /// Stores a new object; `resource` has been checked, `spec` is its checked spec.
    pub fn create(&mut self, key: Key, mut resource: Resource, spec: Spec) -> Result<Event, StoreError> {
        if self.objects.contains_key(&key) {
            return Err(StoreError::AlreadyExists { kind: key.kind.name(), name: key.name });
        }
        let meta = &mut resource.metadata;
        meta.uid = new_uid();
        meta.generation = 1;
        meta.creation_timestamp = Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
        self.write(key, resource, spec, EventType::Added)
    }

    /// Replaces an object's metadata and spec (or, with `status_only`, its status), if `resourceVersion`
    /// is absent or current.
    pub fn replace(
        &mut self,
        key: Key,
        mut resource: Resource,
        spec: Spec,
        status_only: bool,
    ) -> Result<Event, StoreError> {
        let current = self.current(&key, &resource.metadata.resource_version)?;
        let old = &current.resource;
        let meta = &mut resource.metadata;
        meta.uid = old.metadata.uid.clone();
        meta.creation_timestamp = old.metadata.creation_timestamp.clone();
        meta.generation = old.metadata.generation;
        let spec = if status_only {
            meta.labels = old.metadata.labels.clone();
            meta.annotations = old.metadata.annotations.clone();
            resource.spec = old.spec.clone();
            current.spec.clone()
        } else {
            resource.status = old.status.clone();
            if resource.spec != old.spec {
                resource.metadata.generation += 1;
            }
            spec
        };
        if resource.spec == old.spec
            && resource.status == old.status
            && resource.metadata.labels == old.metadata.labels
            && resource.metadata.annotations == old.metadata.annotations
        {
            // Nothing changed: no new revision, no event, no snapshot rebuild.
            return Ok(Event { kind: EventType::Modified, object: old.clone() });
        }
        self.write(key, resource, spec, EventType::Modified)
    }

    /// Deletes an object, if `resource_version` is empty or current.
    pub fn delete(&mut self, key: &Key, resource_version: &str) -> Result<Event, StoreError> {
        let current = self.current(key, resource_version)?;
        let revision = self.revision + 1;
        let mut object = current.resource.clone();
        object.metadata.resource_version = revision.to_string();
        let transaction = self.connection.savepoint()?;
        transaction.execute(
            "DELETE FROM resources WHERE kind = ?1 AND namespace = ?2 AND name = ?3",
            params![key.kind.name(), key.namespace, key.name],
        )?;
        record(&transaction, revision, EventType::Deleted, &object)?;
        transaction.commit()?;
        self.revision = revision;
        self.objects.remove(key);
        let event = Event { kind: EventType::Deleted, object };
        let _ = self.changes.send(event.clone());
        Ok(event)
    }

    /// Events after `revision`, oldest first.
    pub fn events_since(&self, revision: i64) -> Result<Vec<Event>, StoreError> {
        if revision >= self.revision {
            return Ok(Vec::new());
        }
        let oldest: Option<i64> = self
            .connection
            .query_row("SELECT MIN(revision) FROM events", [], |row| row.get(0))
            .optional()?
            .flatten();
        // Events are complete from `oldest` on; anything older than the one before it is compacted.
        if oldest.is_none_or(|oldest| revision + 1 < oldest) {
            return Err(StoreError::Gone(revision));
        }
        let mut statement = self
            .connection
            .prepare("SELECT type, object FROM events WHERE revision > ?1 ORDER BY revision")?;
        let rows = statement
            .query_map([revision], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))?;
        let mut events = Vec::new();
        for row in rows {
            let (kind, object) = row?;
            let corrupt = |problem: String| StoreError::Corrupt { key: format!("event {kind}"), problem };
            let kind: EventType =
                serde_json::from_value(Value::String(kind.clone())).map_err(|e| corrupt(e.to_string()))?;
            let object: Resource = serde_json::from_str(&object).map_err(|e| corrupt(e.to_string()))?;
            events.push(Event { kind, object });
        }
        Ok(events)
    }

    fn current(&self, key: &Key, resource_version: &str) -> Result<Arc<Stored>, StoreError> {
        let current = self
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| StoreError::NotFound { kind: key.kind.name(), name: key.name.clone() })?;
        let now = &current.resource.metadata.resource_version;
        if !resource_version.is_empty() && resource_version != now {
            return Err(StoreError::Conflict {
                kind: key.kind.name(),
                name: key.name.clone(),
                given: resource_version.to_string(),
                current: now.clone(),
            });
        }
        Ok(current)
    }

    fn write(
        &mut self,
        key: Key,
        mut resource: Resource,
        spec: Spec,
        kind: EventType,
    ) -> Result<Event, StoreError> {
        let revision = self.revision + 1;
        resource.api_version = API_VERSION.to_string();
        resource.kind = key.kind.name().to_string();
        resource.metadata.name = key.name.clone();
        resource.metadata.namespace = (!key.namespace.is_empty()).then(|| key.namespace.clone());
        resource.metadata.resource_version = revision.to_string();
        let json = |value: &Value| value.to_string();
        let meta = &resource.metadata;
        let transaction = self.connection.savepoint()?;
        transaction.execute(
            "INSERT INTO resources (kind, namespace, name, uid, resource_version, generation, created, labels, annotations, spec, status)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
             ON CONFLICT (kind, namespace, name) DO UPDATE SET
               resource_version = excluded.resource_version, generation = excluded.generation,
               labels = excluded.labels, annotations = excluded.annotations,
               spec = excluded.spec, status = excluded.status",
            params![
                key.kind.name(),
                key.namespace,
                key.name,
                meta.uid,
                revision,
                meta.generation,
                meta.creation_timestamp.clone().unwrap_or_default(),
                serde_json::to_string(&meta.labels).unwrap_or_default(),
                serde_json::to_string(&meta.annotations).unwrap_or_default(),
                json(&resource.spec),
                json(&resource.status),
            ],
        )?;
        record(&transaction, revision, kind, &resource)?;
        transaction.commit()?;
        self.revision = revision;
        self.objects.insert(key, Arc::new(Stored { resource: resource.clone(), spec }));
        let event = Event { kind, object: resource };
        let _ = self.changes.send(event.clone());
        Ok(event)
    }
}

/// Bumps the stored revision and appends the event, compacting old ones now and then.
fn record(
    transaction: &Connection,
    revision: i64,
    kind: EventType,
    object: &Resource,
) -> Result<(), StoreError> {
    transaction.execute("UPDATE meta SET value = ?1 WHERE key = 'revision'", [revision])?;
    transaction.execute(
        "INSERT INTO events (revision, type, object) VALUES (?1, ?2, ?3)",
        params![revision, kind.as_str(), serde_json::to_string(object).unwrap_or_default()],
    )?;
    if revision % 1000 == 0 {
        transaction.execute("DELETE FROM events WHERE revision <= ?1", [revision - EVENTS_KEPT])?;
    }
    Ok(())
}

/// Applies every migration the database lacks.
fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    connection.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);",
    )?;
    let current: i64 =
        connection
            .query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |row| row.get(0))?;
    let known = MIGRATIONS.last().map_or(0, |(version, _)| *version);
    if current > known {
        return Err(StoreError::TooNew { found: current, known });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(version, _)| *version > current) {
        let transaction = connection.transaction()?;
        transaction.execute_batch(sql)?;
        transaction.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            params![version, humantime::format_rfc3339_seconds(SystemTime::now()).to_string()],
        )?;
        transaction.commit()?;
        tracing::info!(version, "database migrated");
    }
    Ok(())
}

/// The schema version a database file is at (for tests and `control-plane --version` checks).
pub fn schema_version(connection: &Connection) -> Result<i64, rusqlite::Error> {
    connection.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |row| row.get(0))
}

/// The SQL of migrations up to and including `version`, for building an old database in tests.
pub fn migrations_up_to(version: i64) -> impl Iterator<Item = (i64, &'static str)> {
    MIGRATIONS.iter().filter(move |(v, _)| *v <= version).copied()
}

fn new_uid() -> String {
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}
