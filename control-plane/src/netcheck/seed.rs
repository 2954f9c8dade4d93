//! Seed 002's HTTP API, with its paths, field names and status codes, so its clients and scripts keep
//! working against the control plane; and Keel's matrix (`/api/v1/matrix`, the page at `/matrix`).
//!
//! The seed's clients send no token. With proxy tokens configured, these endpoints want one (a proxy or
//! operator token, as `Authorization: Bearer` or `X-API-Token`) unless the control plane runs with
//! `--netcheck-anonymous`, for seed clients on a cluster-internal address. What the seed answered in
//! Chinese is answered in English; the keys are the seed's.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State as Shared};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::{NodeInfo, TestStatus};
use crate::State;
use crate::auth::Role;

/// The routes of seed 002's API and the matrix.
pub fn routes() -> Router<Arc<State>> {
    Router::new()
        .route("/api/v1/heartbeat", post(heartbeat))
        .route("/api/v1/test-results/{kind}", post(report_results).get(results_of))
        .route("/api/v1/hosts", get(hosts))
        .route("/api/v1/pods", get(pods))
        .route("/api/v1/clients/count", get(client_count))
        .route("/api/v1/results", get(all_results))
        .route("/api/v1/health", get(|| async { axum::Json(json!({"status": "healthy"})) }))
        .route("/api/v1/matrix", get(matrix))
}

/// Seed 002's error body.
fn error(status: StatusCode, code: &str, message: &str, details: impl Into<String>) -> Response {
    let details: String = details.into();
    let mut body = json!({"code": code, "message": message});
    if !details.is_empty() {
        body["details"] = json!(details);
    }
    (status, axum::Json(body)).into_response()
}

fn success(message: &str) -> Response {
    axum::Json(json!({"status": "success", "message": message})).into_response()
}

/// `None` when the request may go on; the 401 otherwise.
fn refuse_unless_allowed(state: &State, headers: &HeaderMap) -> Option<Response> {
    if state.netcheck_anonymous || !state.tokens.requires(Role::Proxy) {
        return None;
    }
    let allowed =
        [Role::Proxy, Role::Operator].into_iter().any(|role| state.tokens.check(headers, role).is_ok());
    (!allowed).then(|| {
        let mut response =
            error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "a proxy or operator token is required", "");
        // The matrix page's script asks here; a browser answers with the page's login.
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"Keel control plane\""),
        );
        response
    })
}

async fn heartbeat(Shared(state): Shared<Arc<State>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = refuse_unless_allowed(&state, &headers) {
        return refused;
    }
    let info: NodeInfo = match serde_json::from_slice(&body) {
        Ok(info) => info,
        Err(problem) => {
            return error(
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                "invalid request body",
                problem.to_string(),
            );
        }
    };
    if info.pod_name.is_empty() || info.node_ip.is_empty() || info.pod_ip.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "missing required fields",
            "PodName, NodeIP, PodIP must not be empty",
        );
    }
    let too_long =
        [&info.pod_name, &info.node_ip, &info.pod_ip, &info.namespace].iter().any(|v| v.len() > 253);
    if too_long {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "invalid request body",
            "a field is over 253 bytes",
        );
    }
    state.netcheck.heartbeat(info);
    success("heartbeat received")
}

/// Seed 002's stored form of one result: ping, the first port's status, the test's duration.
fn test_status(result: &Value) -> TestStatus {
    let port_status = result["port_status"]
        .as_object()
        .and_then(|ports| ports.values().next())
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string();
    TestStatus {
        ping: result["ping_status"].as_str().unwrap_or("unknown").to_string(),
        port_status,
        test_duration: result["test_duration"].clone(),
    }
}

async fn report_results(
    Shared(state): Shared<Arc<State>>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = refuse_unless_allowed(&state, &headers) {
        return refused;
    }
    let invalid =
        |details: String| error(StatusCode::BAD_REQUEST, "INVALID_REQUEST", "invalid request body", details);
    let body: Value = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(problem) => return invalid(problem.to_string()),
    };
    let Some(source_ip) = body["source_ip"].as_str().filter(|ip| !ip.is_empty() && ip.len() <= 64) else {
        return invalid("source_ip is required".to_string());
    };
    match kind.as_str() {
        "hosts" | "pods" => {
            let Some(results) = body["results"].as_array() else {
                return invalid("results is required".to_string());
            };
            let stored: BTreeMap<String, TestStatus> = results
                .iter()
                .filter_map(|result| {
                    let target = result["target_ip"].as_str().filter(|t| !t.is_empty() && t.len() <= 253)?;
                    Some((target.to_string(), test_status(result)))
                })
                .collect();
            state.netcheck.set_seed_results(kind == "pods", source_ip.to_string(), stored);
        }
        "service" => {
            if !body["result"].is_object() {
                return invalid("result is required".to_string());
            }
            state.netcheck.set_seed_service_result(source_ip.to_string(), body["result"].clone());
        }
        _ => return error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such result kind", kind),
    }
    success("test results saved")
}

/// Live clients and every result in seed 002's shapes: its own clients' results as they sent them, and
/// Keel proxies' probe results folded into them (ICMP to `ping`, TCP to `port_status`), keyed by the
/// proxy's pod IP (else its node IP) and filed under hosts or pods by whose address the target is.
struct SeedView {
    clients: usize,
    host_ips: Vec<String>,
    pod_ips: Vec<String>,
    hosts: BTreeMap<String, BTreeMap<String, Value>>,
    pods: BTreeMap<String, BTreeMap<String, Value>>,
}

async fn seed_view(state: &State) -> SeedView {
    let fleet = state.fleet.connected().await;
    let clients = state.netcheck.live_clients(&fleet);
    let mut host_ips: Vec<String> =
        clients.iter().map(|c| c.node_ip.clone()).filter(|ip| !ip.is_empty()).collect();
    host_ips.sort();
    host_ips.dedup();
    let mut pod_ips: Vec<String> =
        clients.iter().map(|c| c.pod_ip.clone()).filter(|ip| !ip.is_empty()).collect();
    pod_ips.sort();
    pod_ips.dedup();
    let as_values = |results: BTreeMap<String, Arc<BTreeMap<String, TestStatus>>>| {
        results
            .into_iter()
            .map(|(source, targets)| {
                let targets = targets
                    .iter()
                    .map(|(target, status)| {
                        (target.clone(), serde_json::to_value(status).unwrap_or_default())
                    })
                    .collect();
                (source, targets)
            })
            .collect::<BTreeMap<String, BTreeMap<String, Value>>>()
    };
    let mut hosts = as_values(state.netcheck.seed_results(false));
    let mut pods = as_values(state.netcheck.seed_results(true));
    // Keel proxies' results, keyed as seed 002 keys its own: by the prober's pod IP, else node IP.
    let keel_sources: BTreeMap<&str, &str> = clients
        .iter()
        .filter(|client| client.source == "keel")
        .filter_map(|client| {
            let source = if client.pod_ip.is_empty() { &client.node_ip } else { &client.pod_ip };
            (!source.is_empty()).then_some((client.id.as_str(), source.as_str()))
        })
        .collect();
    let (host_set, pod_set): (BTreeSet<&str>, BTreeSet<&str>) =
        (host_ips.iter().map(String::as_str).collect(), pod_ips.iter().map(String::as_str).collect());
    for pair in state.netcheck.pairs(&clients) {
        let Some(source) = keel_sources.get(pair.source.as_str()).map(|s| s.to_string()) else { continue };
        let table = if pod_set.contains(pair.target.as_str()) {
            &mut pods
        } else if host_set.contains(pair.target.as_str()) {
            &mut hosts
        } else {
            continue;
        };
        let entry = table
            .entry(source)
            .or_default()
            .entry(pair.target.clone())
            .or_insert_with(|| json!({"ping": "unknown", "port_status": "unknown", "test_duration": 0}));
        let verdict = |up: Option<bool>, yes: &str, no: &str| match up {
            Some(true) => yes.to_string(),
            Some(false) => no.to_string(),
            None => "unknown".to_string(),
        };
        match pair.kind.as_str() {
            "icmp" => entry["ping"] = json!(verdict(pair.up, "reachable", "unreachable")),
            "tcp" => entry["port_status"] = json!(verdict(pair.up, "open", "closed")),
            _ => {}
        }
        if let Some(latency) = pair.latency_ms {
            // Go's time.Duration, as the seed encodes it: nanoseconds.
            entry["test_duration"] = json!((latency * 1_000_000.0) as u64);
        }
    }
    SeedView { clients: clients.len(), host_ips, pod_ips, hosts, pods }
}

async fn results_of(
    Shared(state): Shared<Arc<State>>,
    Path(kind): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = refuse_unless_allowed(&state, &headers) {
        return refused;
    }
    match kind.as_str() {
        "hosts" => axum::Json(json!({"results": seed_view(&state).await.hosts})).into_response(),
        "pods" => axum::Json(json!({"results": seed_view(&state).await.pods})).into_response(),
        "service" => axum::Json(json!({"results": service_results(&state)})).into_response(),
        _ => error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such result kind", kind),
    }
}

fn service_results(state: &State) -> BTreeMap<String, Value> {
    state
        .netcheck
        .seed_service_results()
        .into_iter()
        .map(|(source, result)| (source, Value::clone(&result)))
        .collect()
}

async fn hosts(Shared(state): Shared<Arc<State>>, headers: HeaderMap) -> Response {
    if let Some(refused) = refuse_unless_allowed(&state, &headers) {
        return refused;
    }
    let view = seed_view(&state).await;
    axum::Json(json!({"host_ips": view.host_ips, "count": view.host_ips.len()})).into_response()
}

async fn pods(Shared(state): Shared<Arc<State>>, headers: HeaderMap) -> Response {
    if let Some(refused) = refuse_unless_allowed(&state, &headers) {
        return refused;
    }
    let view = seed_view(&state).await;
    axum::Json(json!({"pod_ips": view.pod_ips, "count": view.pod_ips.len()})).into_response()
}

/// Seed 002's count, plus Keel's per-version counts.
async fn client_count(Shared(state): Shared<Arc<State>>, headers: HeaderMap) -> Response {
    if let Some(refused) = refuse_unless_allowed(&state, &headers) {
        return refused;
    }
    let fleet = state.fleet.connected().await;
    let clients = state.netcheck.live_clients(&fleet);
    let mut versions: BTreeMap<String, usize> = BTreeMap::new();
    for client in &clients {
        *versions.entry(client.version.clone()).or_default() += 1;
    }
    axum::Json(json!({"active_client_count": clients.len(), "versions": versions})).into_response()
}

async fn all_results(Shared(state): Shared<Arc<State>>, headers: HeaderMap) -> Response {
    if let Some(refused) = refuse_unless_allowed(&state, &headers) {
        return refused;
    }
    let view = seed_view(&state).await;
    axum::Json(json!({
        "active_client_count": view.clients,
        "host_ips": view.host_ips,
        "pod_ips": view.pod_ips,
        "host_test_results": view.hosts,
        "pod_test_results": view.pods,
        "service_test_results": service_results(&state),
    }))
    .into_response()
}

/// The matrix as JSON (see [`super::matrix`]).
async fn matrix(Shared(state): Shared<Arc<State>>, headers: HeaderMap) -> Response {
    if let Some(refused) = refuse_unless_allowed(&state, &headers) {
        return refused;
    }
    axum::Json(matrix_view(&state).await).into_response()
}

pub async fn matrix_view(state: &State) -> Value {
    let fleet = state.fleet.connected().await;
    let clients = state.netcheck.live_clients(&fleet);
    let pairs = state.netcheck.pairs(&clients);
    super::matrix(&clients, &pairs)
}
