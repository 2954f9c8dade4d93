//! The REST API, in Kubernetes shape, and the debug endpoints.
//!
//! `/apis/edge.example.com/v1/{plural}[/{name}[/status]]` for cluster-scoped kinds and
//! `/apis/edge.example.com/v1/namespaces/{ns}/{plural}[/{name}[/status]]` for namespaced ones (listing a
//! namespaced kind without a namespace lists all namespaces). GET lists (with `labelSelector`) or watches
//! (`?watch=true&resourceVersion=N`, newline-delimited events); POST creates; PUT replaces; PATCH takes a
//! JSON merge patch (RFC 7386); DELETE deletes. A `metadata.resourceVersion` in a write makes it
//! conditional: a stale one gets 409. Failures are Kubernetes `Status` objects, with the failing field
//! paths in `details.causes`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State as Shared};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keel_schemas::resource::{API_VERSION, FieldError, Kind, Resource, check_envelope, check_spec};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::State;
use crate::auth::{Denied, Role};
use crate::store::{Event, EventType, Key, StoreError, Unwritable};

const BASE: &str = "/apis/edge.example.com/v1";

pub fn router(state: Arc<State>) -> Router {
    // Everything here takes an operator token; the stream and the seed's report endpoint check their
    // own (proxy) tokens, and /healthz is open.
    let operator = Router::new()
        .route(BASE, get(discovery))
        .route(&format!("{BASE}/{{plural}}"), get(list).post(create))
        .route(&format!("{BASE}/namespaces/{{namespace}}/{{plural}}"), get(list).post(create))
        .route(
            &format!("{BASE}/{{plural}}/{{name}}"),
            get(read::<false>).put(replace::<false>).patch(patch::<false>).delete(delete),
        )
        .route(
            &format!("{BASE}/namespaces/{{namespace}}/{{plural}}/{{name}}"),
            get(read::<false>).put(replace::<false>).patch(patch::<false>).delete(delete),
        )
        .route(
            &format!("{BASE}/{{plural}}/{{name}}/status"),
            get(read::<true>).put(replace::<true>).patch(patch::<true>),
        )
        .route(
            &format!("{BASE}/namespaces/{{namespace}}/{{plural}}/{{name}}/status"),
            get(read::<true>).put(replace::<true>).patch(patch::<true>),
        )
        .route("/debug/proxies", get(debug_proxies))
        .route("/matrix", get(crate::netcheck::page::matrix_page))
        .route("/", get(state_page))
        .route("/raw", get(state_raw))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&state), require_operator));
    Router::new()
        .merge(operator)
        .route(keel_schemas::stream::STREAM_PATH, post(crate::stream::open))
        .route("/api/v1/public-ip", post(report_public_ip).get(public_ips))
        .route("/api/v1/public-ip/{node}", get(node_public_ip))
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(crate::netcheck::seed::routes())
        .fallback(|| async {
            Failure::new(StatusCode::NOT_FOUND, "NotFound", "no such path").into_response()
        })
        .with_state(state)
}

async fn require_operator(
    Shared(state): Shared<Arc<State>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let read_only = matches!(*request.method(), axum::http::Method::GET | axum::http::Method::HEAD);
    match state.tokens.check_operator(request.headers(), read_only) {
        Ok(()) => next.run(request).await,
        Err(why) => denied(why),
    }
}

/// A failed request, as a Kubernetes `Status`.
#[derive(Debug)]
pub struct Failure {
    code: StatusCode,
    reason: &'static str,
    message: String,
    causes: Vec<FieldError>,
}

impl Failure {
    pub fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into(), causes: Vec::new() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn invalid(kind: Kind, name: &str, causes: Vec<FieldError>) -> Self {
        let list: Vec<String> = causes.iter().map(|c| format!("{}: {}", c.field, c.message)).collect();
        Self {
            code: StatusCode::UNPROCESSABLE_ENTITY,
            reason: "Invalid",
            message: format!("{} {name:?} is invalid: {}", kind.name(), list.join("; ")),
            causes,
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let causes: Vec<Value> =
            self.causes.iter().map(|c| json!({"field": c.field, "message": c.message})).collect();
        let body = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
            "details": {"causes": causes},
        });
        (self.code, axum::Json(body)).into_response()
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        if let Some(unwritable) = error.unwritable() {
            tracing::error!(%error, "the database refused a write; nothing was changed");
            let (code, reason, what) = match unwritable {
                Unwritable::DiskFull => {
                    (StatusCode::INSUFFICIENT_STORAGE, "InsufficientStorage", "the database's disk is full")
                }
                Unwritable::Unavailable => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    "the database cannot be written (read-only file system, I/O error or permissions)",
                ),
            };
            let message = format!(
                "{what}: nothing was changed, and proxies keep what they were sent; fix the control plane's storage and retry ({error})"
            );
            return Failure::new(code, reason, message);
        }
        let (code, reason) = match &error {
            StoreError::AlreadyExists { .. } => (StatusCode::CONFLICT, "AlreadyExists"),
            StoreError::Conflict { .. } => (StatusCode::CONFLICT, "Conflict"),
            StoreError::NotFound { .. } => (StatusCode::NOT_FOUND, "NotFound"),
            StoreError::Gone(_) => (StatusCode::GONE, "Expired"),
            StoreError::TooNew { .. } | StoreError::Corrupt { .. } | StoreError::Database(_) => {
                tracing::error!(%error, "store failure");
                (StatusCode::INTERNAL_SERVER_ERROR, "InternalError")
            }
        };
        Failure::new(code, reason, error.to_string())
    }
}

pub fn denied(why: Denied) -> Response {
    match why {
        Denied::Unauthenticated => {
            let mut response =
                Failure::new(StatusCode::UNAUTHORIZED, "Unauthorized", "a valid bearer token is required")
                    .into_response();
            // Browsers then ask for a login; the token goes in as the password (the state page).
            let headers = response.headers_mut();
            headers.append(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            headers.append(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"Keel control plane\""),
            );
            response
        }
        Denied::Forbidden => {
            Failure::new(StatusCode::FORBIDDEN, "Forbidden", "this token's role may not use this endpoint")
                .into_response()
        }
    }
}

/// The kind, namespace and name a path names.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: String,
}

impl Target {
    fn parse(params: &HashMap<String, String>) -> Result<Self, Failure> {
        let plural = params.get("plural").map(String::as_str).unwrap_or_default();
        let kind = Kind::from_plural(plural).ok_or_else(|| {
            let known: Vec<&str> = Kind::ALL.iter().map(|kind| kind.plural()).collect();
            Failure::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("no resource type {plural:?} (known: {})", known.join(", ")),
            )
        })?;
        let namespace = params.get("namespace").cloned();
        if namespace.is_some() && !kind.namespaced() {
            return Err(Failure::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} is cluster-scoped: use {BASE}/{plural}", kind.name()),
            ));
        }
        Ok(Self { kind, namespace, name: params.get("name").cloned().unwrap_or_default() })
    }

    fn key(&self) -> Key {
        Key::new(self.kind, self.namespace.as_deref(), &self.name)
    }
}

async fn discovery() -> Response {
    let resources: Vec<Value> = Kind::ALL
        .iter()
        .flat_map(|kind| {
            let verbs = json!(["create", "delete", "get", "list", "patch", "update", "watch"]);
            [
                json!({"name": kind.plural(), "kind": kind.name(), "namespaced": kind.namespaced(), "verbs": verbs}),
                json!({"name": format!("{}/status", kind.plural()), "kind": kind.name(), "namespaced": kind.namespaced(), "verbs": ["get", "patch", "update"]}),
            ]
        })
        .collect();
    axum::Json(json!({"kind": "APIResourceList", "groupVersion": API_VERSION, "resources": resources}))
        .into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    label_selector: Option<String>,
    #[serde(default)]
    watch: Option<String>,
    resource_version: Option<String>,
}

async fn list(
    Shared(state): Shared<Arc<State>>,
    Path(params): Path<HashMap<String, String>>,
    Query(query): Query<ListQuery>,
) -> Response {
    let result = async {
        let target = Target::parse(&params)?;
        let selector = Selector::parse(query.label_selector.as_deref().unwrap_or_default())?;
        if matches!(query.watch.as_deref(), Some("true" | "1")) {
            return watch(&state, target, selector, query.resource_version.as_deref()).await;
        }
        let store = state.store.lock().await;
        let items: Vec<&Resource> = store
            .list(target.kind, target.namespace.as_deref())
            .map(|stored| &stored.resource)
            .filter(|resource| selector.matches(&resource.metadata.labels))
            .collect();
        let body = json!({
            "apiVersion": API_VERSION,
            "kind": format!("{}List", target.kind.name()),
            "metadata": {"resourceVersion": store.revision().to_string()},
            "items": items,
        });
        Ok(axum::Json(body).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Streams events: those after `resource_version`, or the current objects as ADDED without one, then
/// every change as it commits.
async fn watch(
    state: &Arc<State>,
    target: Target,
    selector: Selector,
    resource_version: Option<&str>,
) -> Result<Response, Failure> {
    let (kind, namespace) = (target.kind, target.namespace.clone());
    let wanted = move |event: &Event| {
        let meta = &event.object.metadata;
        event.object.kind == kind.name()
            && namespace.as_deref().is_none_or(|ns| meta.namespace.as_deref() == Some(ns))
            && selector.matches(&meta.labels)
    };
    let (backlog, mut changes) = {
        let store = state.store.lock().await;
        let backlog: Vec<Event> = match resource_version.filter(|rv| !rv.is_empty() && *rv != "0") {
            Some(rv) => {
                let rv: i64 = rv
                    .parse()
                    .map_err(|_| Failure::bad_request(format!("invalid resourceVersion {rv:?}")))?;
                store.events_since(rv)?
            }
            None => store
                .list(target.kind, target.namespace.as_deref())
                .map(|stored| Event { kind: EventType::Added, object: stored.resource.clone() })
                .collect(),
        };
        (backlog, store.subscribe())
    };
    let (lines, receive) = tokio::sync::mpsc::channel::<Bytes>(64);
    let stop = state.stop.clone();
    tokio::spawn(async move {
        let line = |event: &Event| {
            let mut line = serde_json::to_vec(event).unwrap_or_default();
            line.push(b'\n');
            Bytes::from(line)
        };
        for event in backlog.iter().filter(|event| wanted(event)) {
            if lines.send(line(event)).await.is_err() {
                return;
            }
        }
        loop {
            let event = tokio::select! {
                event = changes.recv() => event,
                () = lines.closed() => return,
                () = stop.cancelled() => return,
            };
            match event {
                Ok(event) if wanted(&event) => {
                    if lines.send(line(&event)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    let expired = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410, "message": "the watch fell behind; list and watch again"}});
                    let _ = lines.send(Bytes::from(format!("{expired}\n"))).await;
                    return;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/json;stream=watch")
        .body(axum::body::Body::new(crate::stream::ChannelBody::new(receive)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

async fn read<const STATUS: bool>(
    Shared(state): Shared<Arc<State>>,
    Path(params): Path<HashMap<String, String>>,
) -> Response {
    let result = async {
        let target = Target::parse(&params)?;
        let store = state.store.lock().await;
        let stored = store.get(&target.key()).ok_or_else(|| not_found(&target))?;
        Ok::<_, Failure>(axum::Json(&stored.resource).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

fn not_found(target: &Target) -> Failure {
    Failure::from(StoreError::NotFound { kind: target.kind.name(), name: target.name.clone() })
}

fn parse_body(body: &[u8]) -> Result<Resource, Failure> {
    serde_json::from_slice(body).map_err(|error| {
        let mut failure = Failure::bad_request(format!("the body is not a valid object: {error}"));
        failure.causes.push(FieldError { field: String::new(), message: error.to_string() });
        failure
    })
}

/// Checks a written object and returns it with its checked spec.
fn check(target: &Target, resource: &mut Resource) -> Result<keel_schemas::resource::Spec, Failure> {
    if resource.metadata.namespace.is_none() && target.kind.namespaced() {
        resource.metadata.namespace = target.namespace.clone();
    }
    let mut causes = check_envelope(resource, target.kind, target.namespace.as_deref());
    if !causes.is_empty() {
        return Err(Failure::invalid(target.kind, &resource.metadata.name, causes));
    }
    match check_spec(
        target.kind,
        &resource.metadata.name,
        resource.metadata.namespace.as_deref(),
        &resource.spec,
    ) {
        Ok(spec) => Ok(spec),
        Err(errors) => {
            causes.extend(errors);
            Err(Failure::invalid(target.kind, &resource.metadata.name, causes))
        }
    }
}

async fn create(
    Shared(state): Shared<Arc<State>>,
    Path(params): Path<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let result = async {
        let mut target = Target::parse(&params)?;
        if target.kind.namespaced() && target.namespace.is_none() {
            return Err(Failure::bad_request(format!(
                "{} is namespaced: create it under {BASE}/namespaces/{{namespace}}/{}",
                target.kind.name(),
                target.kind.plural()
            )));
        }
        let mut resource = parse_body(&body)?;
        let spec = check(&target, &mut resource)?;
        target.name = resource.metadata.name.clone();
        let event = state.store.lock().await.create(target.key(), resource, spec)?;
        after_write(&state, &target).await;
        Ok((StatusCode::CREATED, axum::Json(event.object)).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn replace<const STATUS: bool>(
    Shared(state): Shared<Arc<State>>,
    Path(params): Path<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let result = async {
        let target = Target::parse(&params)?;
        let resource = parse_body(&body)?;
        write(&state, &target, resource, STATUS).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn write(
    state: &State,
    target: &Target,
    mut resource: Resource,
    status_only: bool,
) -> Result<Response, Failure> {
    if !resource.metadata.name.is_empty() && resource.metadata.name != target.name {
        return Err(Failure::bad_request(format!(
            "metadata.name {:?} does not match the name in the URL ({:?})",
            resource.metadata.name, target.name
        )));
    }
    resource.metadata.name = target.name.clone();
    let mut store = state.store.lock().await;
    let spec = if status_only {
        let current = store.get(&target.key()).ok_or_else(|| not_found(target))?;
        current.spec.clone()
    } else {
        check(target, &mut resource)?
    };
    let event = store.replace(target.key(), resource, spec, status_only)?;
    drop(store);
    if !status_only {
        after_write(state, target).await;
    }
    Ok(axum::Json(event.object).into_response())
}

async fn patch<const STATUS: bool>(
    Shared(state): Shared<Arc<State>>,
    Path(params): Path<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        let content_type =
            headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        if !content_type.starts_with("application/merge-patch+json")
            && !content_type.starts_with("application/json")
        {
            return Err(Failure::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!("PATCH takes application/merge-patch+json (RFC 7386), not {content_type:?}"),
            ));
        }
        let target = Target::parse(&params)?;
        let patch: Value = serde_json::from_slice(&body)
            .map_err(|error| Failure::bad_request(format!("the patch is not JSON: {error}")))?;
        let current = {
            let store = state.store.lock().await;
            store.get(&target.key()).ok_or_else(|| not_found(&target))?.resource.clone()
        };
        let mut merged = serde_json::to_value(&current).unwrap_or_default();
        merge_patch(&mut merged, &patch);
        let resource: Resource = serde_json::from_value(merged)
            .map_err(|error| Failure::bad_request(format!("the patched object is invalid: {error}")))?;
        write(&state, &target, resource, STATUS).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeleteQuery {
    resource_version: Option<String>,
}

async fn delete(
    Shared(state): Shared<Arc<State>>,
    Path(params): Path<HashMap<String, String>>,
    Query(query): Query<DeleteQuery>,
) -> Response {
    let result = async {
        let target = Target::parse(&params)?;
        let event = state
            .store
            .lock()
            .await
            .delete(&target.key(), query.resource_version.as_deref().unwrap_or_default())?;
        if target.kind != Kind::Node {
            state.written();
        }
        Ok::<_, Failure>(axum::Json(event.object).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Seed 001's `/raw`: records, addresses and sync state as JSON.
async fn state_raw(Shared(state): Shared<Arc<State>>) -> Response {
    let view = crate::ddns::state_view(&*state.store.lock().await);
    axum::Json(view).into_response()
}

/// Seed 001's `/`: the same state as a page.
async fn state_page(Shared(state): Shared<Arc<State>>) -> Response {
    let view = crate::ddns::state_view(&*state.store.lock().await);
    let proxies = state.fleet.connected().await.len();
    let cell = |value: &Value| {
        escape(&match value {
            Value::Null => "-".to_string(),
            Value::String(text) => text.clone(),
            other => other.to_string(),
        })
    };
    let mut rows = String::new();
    for record in view["records"].as_array().into_iter().flatten() {
        let status = &record["status"];
        let sync = match status["inSync"].as_bool() {
            Some(true) => "<td class=ok>in sync</td>",
            Some(false) => "<td class=bad>pending</td>",
            None => "<td>-</td>",
        };
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>{sync}<td>{}</td><td>{}</td></tr>\n",
            cell(&record["fqdn"]),
            cell(&record["type"]),
            cell(&record["node"]),
            cell(&status["desired"]),
            cell(&status["observed"]),
            cell(&status["lastSuccess"]),
            cell(&status["lastError"]),
        ));
    }
    let mut addresses = String::new();
    for entry in view["addresses"].as_array().into_iter().flatten() {
        addresses.push_str(&format!(
            "<tr><td>{}</td><td>{}</td></tr>\n",
            cell(&entry["node"]),
            cell(&entry["address"])
        ));
    }
    let page = format!(
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>Keel control plane</title>\n\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:2em}}\
         td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}.ok{{color:#070}}.bad{{color:#b00}}</style></head>\n\
         <body><h1>Keel control plane</h1><p>{proxies} connected proxies; {} DNS updates pending. JSON: <a href=\"raw\">/raw</a></p>\n\
         <h2>DNS records</h2><table id=records><tr><th>name</th><th>type</th><th>node</th><th>desired</th><th>at the server</th><th>state</th><th>last success</th><th>last error</th></tr>\n{rows}</table>\n\
         <h2>Reported addresses</h2><table id=addresses><tr><th>node</th><th>address</th></tr>\n{addresses}</table></body></html>\n",
        view["pendingUpdates"]
    );
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Prometheus metrics, in seed 001's spirit: updates and failures per record, the last update's time,
/// each node's current address, whether each record is in sync; and the connected proxies.
async fn metrics(Shared(state): Shared<Arc<State>>) -> Response {
    let view = crate::ddns::state_view(&*state.store.lock().await);
    let connected = state.fleet.connected().await;
    let label = |value: &Value| {
        value.as_str().unwrap_or_default().replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
    };
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, value) in samples {
            out.push_str(&format!("{name}{labels} {value}\n"));
        }
    };
    let records: Vec<&Value> = view["records"].as_array().map(|r| r.iter().collect()).unwrap_or_default();
    let per_record = |f: &dyn Fn(&Value) -> Option<String>| -> Vec<(String, String)> {
        records
            .iter()
            .filter_map(|record| {
                f(&record["status"])
                    .map(|value| (format!("{{record=\"{}\"}}", label(&record["name"])), value))
            })
            .collect()
    };
    family(
        "keel_ddns_updates_total",
        "counter",
        "DNS updates made and verified.",
        per_record(&|status| Some(status["updates"].as_u64().unwrap_or(0).to_string())),
    );
    family(
        "keel_ddns_update_failures_total",
        "counter",
        "DNS update attempts that failed.",
        per_record(&|status| Some(status["failures"].as_u64().unwrap_or(0).to_string())),
    );
    family(
        "keel_ddns_last_update_timestamp_seconds",
        "gauge",
        "When the record was last updated and verified.",
        per_record(&|status| {
            let at = humantime::parse_rfc3339(status["lastSuccess"].as_str()?).ok()?;
            Some(at.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs().to_string())
        }),
    );
    family(
        "keel_ddns_record_in_sync",
        "gauge",
        "1 when the server holds the record's desired address.",
        per_record(&|status| Some(if status["inSync"] == true { "1" } else { "0" }.to_string())),
    );
    let addresses: Vec<(String, String)> = view["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|entry| {
            (
                format!("{{node=\"{}\",address=\"{}\"}}", label(&entry["node"]), label(&entry["address"])),
                "1".to_string(),
            )
        })
        .collect();
    family("keel_ddns_current_address_info", "gauge", "The address each node last reported.", addresses);
    family(
        "keel_ddns_pending_updates",
        "gauge",
        "DNS updates waiting in the outbox.",
        vec![(String::new(), view["pendingUpdates"].to_string())],
    );
    family(
        "keel_control_plane_connected_proxies",
        "gauge",
        "Proxies with an open snapshot stream.",
        vec![(String::new(), connected.len().to_string())],
    );
    let refusing: Vec<(String, String)> = connected
        .iter()
        .filter(|record| record.refuses_sent())
        .map(|record| (format!("{{node=\"{}\"}}", label(&json!(record.node))), "1".to_string()))
        .collect();
    family(
        "keel_control_plane_proxies_refusing",
        "gauge",
        "Connected proxies that refused (NACKed) the snapshot last sent to them and run an older one.",
        vec![(String::new(), refusing.len().to_string())],
    );
    family(
        "keel_control_plane_proxy_refusing",
        "gauge",
        "1 for each connected proxy that refused the snapshot last sent to it (absent for the others).",
        refusing,
    );
    let matrix = crate::netcheck::seed::matrix_view(&state).await;
    let summary = &matrix["summary"];
    let versions: Vec<(String, String)> = summary["versions"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(version, count)| (format!("{{version=\"{}\"}}", label(&json!(version))), count.to_string()))
        .collect();
    family("keel_netcheck_active_clients", "gauge", "Live network-check clients, by version.", versions);
    family(
        "keel_netcheck_probed_pairs",
        "gauge",
        "Sender and receiver pairs with probe results.",
        vec![(String::new(), summary["pairs"].to_string())],
    );
    family(
        "keel_netcheck_unreachable_pairs",
        "gauge",
        "Pairs whose probes say down.",
        vec![(String::new(), summary["unreachablePairs"].to_string())],
    );
    if state.netcheck_pair_metrics {
        let (up, latency) = crate::netcheck::pair_samples(&matrix);
        let with_labels = |samples: Vec<crate::netcheck::PairSample>| -> Vec<(String, String)> {
            samples
                .into_iter()
                .map(|(from, to, value)| {
                    (
                        format!("{{source=\"{}\",target=\"{}\"}}", label(&json!(from)), label(&json!(to))),
                        value,
                    )
                })
                .collect()
        };
        family(
            "keel_netcheck_pair_up",
            "gauge",
            "1 when the pair's probes say up, 0 when down.",
            with_labels(up),
        );
        family(
            "keel_netcheck_pair_latency_seconds",
            "gauge",
            "The worst latency of the pair's last checks.",
            with_labels(latency),
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// What follows a write: snapshots are rebuilt for config kinds, DNS records are brought in line.
async fn after_write(state: &State, target: &Target) {
    match target.kind {
        Kind::Node => {}
        Kind::DnsRecord => crate::ddns::record_written(state, &target.name).await,
        Kind::DnsProvider => state.ddns_wakeup.notify_one(),
        _ => state.written(),
    }
}

async fn debug_proxies(Shared(state): Shared<Arc<State>>) -> Response {
    let proxies = state.fleet.connected().await;
    axum::Json(json!({"proxies": proxies})).into_response()
}

/// Seed 000's report: `X-API-Token` (a proxy token, or any token when none are configured), body
/// `{"ipAddress": "..."}`; plain-text answers exactly as the seed's server gave them. Keel's reporters add
/// `X-Keel-Node`; the seed's agents do not, and are recorded under their source address.
async fn report_public_ip(
    Shared(state): Shared<Arc<State>>,
    axum::extract::Extension(crate::stream::PeerAddr(peer)): axum::extract::Extension<
        crate::stream::PeerAddr,
    >,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let text = |code: StatusCode, message: &'static str| {
        (code, [(header::CONTENT_TYPE, "text/plain")], message).into_response()
    };
    if !api_token_valid(&state, &headers) {
        return text(StatusCode::UNAUTHORIZED, "Invalid API token");
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Report {
        ip_address: String,
    }
    let Ok(report) = serde_json::from_slice::<Report>(&body) else {
        return text(StatusCode::BAD_REQUEST, "Invalid request body: expected {\"ipAddress\": \"...\"}");
    };
    let Ok(address) = report.ip_address.trim().parse::<std::net::IpAddr>() else {
        return text(StatusCode::BAD_REQUEST, "Invalid IP address");
    };
    let node = headers
        .get("x-keel-node")
        .and_then(|v| v.to_str().ok())
        .filter(|node| !node.is_empty() && node.len() <= 253 && !node.contains(char::is_control))
        .map_or_else(|| peer.ip().to_string(), str::to_string);
    let result = state.store.lock().await.record_address(&node, address);
    match result {
        Ok(previous) => {
            if previous.as_deref() != Some(address.to_string().as_str()) {
                tracing::info!(node, from = ?previous, to = %address, "public address changed");
            }
            state.address_reports.send_modify(|count| *count += 1);
            crate::ddns::address_reported(&state, &node, address).await;
            text(StatusCode::OK, "Public IP updated successfully")
        }
        Err(error) => {
            tracing::error!(%error, "cannot record a public address");
            text(StatusCode::INTERNAL_SERVER_ERROR, "Cannot record the address")
        }
    }
}

/// Whether the request carries a proxy token (seed 000 sends it as `X-API-Token`); anything passes
/// when no proxy tokens are configured.
fn api_token_valid(state: &State, headers: &HeaderMap) -> bool {
    state.tokens.check(headers, Role::Proxy).is_ok()
}

#[derive(Deserialize)]
struct NodeAddressQuery {
    /// `ipv4` or `ipv6` (the default).
    family: Option<String>,
    /// Long poll: answer once the address differs from this one (empty: once there is one)...
    known: Option<String>,
    /// ...or after this many seconds (at most [`LONG_POLL_MAX`]).
    wait: Option<u64>,
}

/// The longest a long poll is held.
const LONG_POLL_MAX: std::time::Duration = std::time::Duration::from_secs(120);

/// The address a node last reported (seed 001's shared detection result, read by the other nodes'
/// reporters): `{"node", "ipAddress", "reportedAt"}`, or 404 when it has reported none of the family.
/// With `known`, the answer waits until the address differs from it, up to `wait` seconds.
async fn node_public_ip(
    Shared(state): Shared<Arc<State>>,
    Path(node): Path<String>,
    Query(query): Query<NodeAddressQuery>,
    headers: HeaderMap,
) -> Response {
    if !api_token_valid(&state, &headers) {
        return (StatusCode::UNAUTHORIZED, [(header::CONTENT_TYPE, "text/plain")], "Invalid API token")
            .into_response();
    }
    let ipv6 = match query.family.as_deref() {
        None | Some("ipv6") => true,
        Some("ipv4") => false,
        Some(other) => {
            let message = format!("family {other:?}: give ipv4 or ipv6");
            return Failure::new(StatusCode::BAD_REQUEST, "BadRequest", &message).into_response();
        }
    };
    let known = match query.known.as_deref().map(str::trim) {
        None => None,
        Some("") => Some(None),
        Some(text) => match text.parse::<std::net::IpAddr>() {
            Ok(address) => Some(Some(address.to_string())),
            Err(_) => {
                let message = format!("known {text:?} is not an address");
                return Failure::new(StatusCode::BAD_REQUEST, "BadRequest", &message).into_response();
            }
        },
    };
    let deadline = tokio::time::Instant::now()
        + std::time::Duration::from_secs(query.wait.unwrap_or(0)).min(LONG_POLL_MAX);
    let mut reports = state.address_reports.subscribe();
    let current = loop {
        let current = match state.store.lock().await.current_address_of(&node, ipv6) {
            Ok(current) => current,
            Err(error) => return Failure::from(error).into_response(),
        };
        let unchanged = known.as_ref().is_some_and(|known| *known == current.as_ref().map(|c| c.0.clone()));
        if !unchanged {
            break current;
        }
        tokio::select! {
            changed = reports.changed() => if changed.is_err() { break current },
            () = tokio::time::sleep_until(deadline) => break current,
            () = state.stop.cancelled() => break current,
        }
    };
    match current {
        Some((address, at)) => {
            axum::Json(json!({"node": node, "ipAddress": address, "reportedAt": at})).into_response()
        }
        None => {
            let family = if ipv6 { "IPv6" } else { "IPv4" };
            let message = format!("node {node:?} has reported no {family} address");
            Failure::new(StatusCode::NOT_FOUND, "NotFound", &message).into_response()
        }
    }
}

/// Every node's current address and its recent history.
async fn public_ips(Shared(state): Shared<Arc<State>>, headers: HeaderMap) -> Response {
    if let Err(why) = state.tokens.check_operator(&headers, true) {
        return denied(why);
    }
    let history = match state.store.lock().await.address_history() {
        Ok(history) => history,
        Err(error) => return Failure::from(error).into_response(),
    };
    let mut nodes: Vec<Value> = Vec::new();
    for (node, address, at) in history {
        let entry = json!({"address": address, "reportedAt": at});
        match nodes.last_mut() {
            Some(last) if last["node"] == node => {
                if let Some(list) = last["history"].as_array_mut() {
                    list.push(entry);
                }
            }
            _ => nodes.push(json!({"node": node, "address": address, "reportedAt": at, "history": [entry]})),
        }
    }
    axum::Json(json!({"nodes": nodes})).into_response()
}

/// RFC 7386: objects merge key by key, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    let Value::Object(fields) = target else { return };
    for (key, value) in patch {
        if value.is_null() {
            fields.remove(key);
        } else {
            merge_patch(fields.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// A label selector: `key=value`, `key==value`, `key!=value`, `key` (present), `!key` (absent), joined
/// by commas; all must hold.
#[derive(Debug, Default)]
pub struct Selector(Vec<Requirement>);

#[derive(Debug)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

impl Selector {
    pub fn parse(text: &str) -> Result<Self, Failure> {
        let mut requirements = Vec::new();
        for term in text.split(',').map(str::trim).filter(|term| !term.is_empty()) {
            let bad = || Failure::bad_request(format!("invalid labelSelector term {term:?}"));
            let requirement = if let Some((key, value)) = term.split_once("!=") {
                Requirement::NotEquals(key.trim().to_string(), value.trim().to_string())
            } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Requirement::Equals(key.trim().to_string(), value.trim().to_string())
            } else if let Some(key) = term.strip_prefix('!') {
                Requirement::Absent(key.trim().to_string())
            } else {
                Requirement::Exists(term.to_string())
            };
            let key = match &requirement {
                Requirement::Equals(key, _)
                | Requirement::NotEquals(key, _)
                | Requirement::Exists(key)
                | Requirement::Absent(key) => key,
            };
            if key.is_empty() || key.contains(char::is_whitespace) || key.contains(['(', ')', '!', '=']) {
                return Err(bad());
            }
            requirements.push(requirement);
        }
        Ok(Self(requirements))
    }

    pub fn matches(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.0.iter().all(|requirement| match requirement {
            Requirement::Equals(key, value) => labels.get(key) == Some(value),
            Requirement::NotEquals(key, value) => labels.get(key) != Some(value),
            Requirement::Exists(key) => labels.contains_key(key),
            Requirement::Absent(key) => !labels.contains_key(key),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn selectors() {
        let labels =
            BTreeMap::from([("app".to_string(), "web".to_string()), ("zone".to_string(), "a".to_string())]);
        for (text, expected) in [
            ("", true),
            ("app=web", true),
            ("app==web,zone=a", true),
            ("app!=web", false),
            ("zone", true),
            ("!zone", false),
            ("!tier", true),
            ("app=db", false),
        ] {
            assert_eq!(Selector::parse(text).unwrap().matches(&labels), expected, "{text}");
        }
        assert!(Selector::parse("a b=c").is_err());
        assert!(Selector::parse("=x").is_err());
    }

    #[test]
    fn merge_patches() {
        let mut target = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge_patch(&mut target, &json!({"a": {"b": null, "e": 3}, "d": [2, 3]}));
        assert_eq!(target, json!({"a": {"c": 2, "e": 3}, "d": [2, 3]}));
    }
}
