//! The admin HTTP API, in Envoy's shape.
//!
//! | path | |
//! |---|---|
//! | `GET /ready` | 200 `LIVE` once listeners are up; 503 before that and while draining |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /config_dump` | running config (secrets masked), version, source, time applied, last rejected config |
//! | `GET /stats/prometheus` | metrics in Prometheus text format |
//! | `GET /clusters` | endpoints and their health (`?format=json` for JSON) |
//! | `GET /listeners` | listeners and their bound addresses (`?format=json` for JSON) |
//! | `POST /reload` | re-read the config file and apply it |
//! | `POST /drain` | stop accepting, mark not ready, let connections finish |
//! | `POST /quitquitquit` | close everything and exit |
//!
//! Mutating endpoints answer only POST. When `admin.token` is set, they and `/config_dump` require
//! `Authorization: Bearer <token>`.
//!
//! Slow clients cannot hold it: a connection must send its request head within
//! [`REQUEST_HEAD_TIMEOUT`], and each connection carries one request (probes and scrapes are one request
//! each), so no idle connection lingers either. At most [`MAX_CONNECTIONS`] are served at once; at that
//! limit the ones still waiting for their request head are closed to make room
//! ([`crate::limit::ConnectionLimit`]), so a flood of slow connections can neither lock out a probe nor
//! take the descriptors the data plane needs.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::limit::{Admission, ConnectionLimit};
use crate::runtime::{Proxy, ReloadError, Shutdown};

/// How long a client has to send its request line and headers.
pub const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections served at once. Probes and scrapes hold one each for a moment.
pub const MAX_CONNECTIONS: usize = 128;

/// Serves the admin API on `listener` until `stop` is cancelled; requests in progress then finish.
pub async fn serve(listener: TcpListener, proxy: Proxy, stop: CancellationToken) -> std::io::Result<()> {
    use tower::ServiceExt;
    let app = router(proxy);
    let connections = tokio_util::task::TaskTracker::new();
    let mut limit = ConnectionLimit::new("admin", MAX_CONNECTIONS);
    while let Some((stream, _, Admission { slot, shed })) = limit.accept(&listener, &stop).await {
        let app = app.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let _slot = slot;
            // A connection that sends nothing is closed like one that sends half a head.
            tokio::select! {
                readable = tokio::time::timeout(REQUEST_HEAD_TIMEOUT, stream.readable()) => {
                    if readable.is_err() {
                        return;
                    }
                }
                () = shed.cancelled() => return,
            }
            let has_request = Arc::new(AtomicBool::new(false));
            let request_seen = Arc::clone(&has_request);
            let service =
                hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    request_seen.store(true, Ordering::Relaxed);
                    app.clone().oneshot(request.map(axum::body::Body::new))
                });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(REQUEST_HEAD_TIMEOUT)
                .keep_alive(false);
            let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
                // Shed while its head is still coming; a request being served is left to finish.
                () = async {
                    shed.cancelled().await;
                    if has_request.load(Ordering::Relaxed) {
                        std::future::pending::<()>().await;
                    }
                } => {}
            }
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

pub fn router(proxy: Proxy) -> Router {
    let guarded = Router::new()
        .route("/config_dump", get(config_dump))
        .route("/reload", post(reload))
        .route("/drain", post(drain))
        .route("/quitquitquit", post(quit))
        .route_layer(middleware::from_fn_with_state(proxy.clone(), require_token));
    Router::new()
        .route("/", get(index))
        .route("/ready", get(ready))
        .route("/healthz", get(|| async { "OK\n" }))
        .route("/stats/prometheus", get(prometheus))
        .route("/clusters", get(clusters))
        .route("/listeners", get(listeners))
        .route("/tunnels", get(tunnels))
        .route("/probes", get(probes))
        .merge(guarded)
        .with_state(proxy)
}

async fn index() -> &'static str {
    "Keel admin\n\n\
     GET  /ready             readiness (503 until listeners are up, and while draining)\n\
     GET  /healthz           liveness\n\
     GET  /config_dump       running config, version, source, last rejected config\n\
     GET  /stats/prometheus  metrics\n\
     GET  /clusters          endpoints and health (?format=json)\n\
     GET  /listeners         listeners (?format=json)\n\
     GET  /tunnels           router (seed Router status shape), publishers, visitors (JSON)\n\
     POST /reload            re-read the config file\n\
     POST /drain             stop accepting and drain connections\n\
     POST /quitquitquit      exit now\n"
}

/// Compares in constant time, so response timing says nothing about how much of a guess was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(proxy): State<Proxy>, request: Request, next: Next) -> Response {
    let expected = proxy.admin_token();
    if let Some(expected) = expected {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        let authorized =
            presented.is_some_and(|token| same_secret(token.as_bytes(), expected.expose().as_bytes()));
        if !authorized {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "missing or wrong admin token\n",
            )
                .into_response();
        }
    }
    next.run(request).await
}

async fn ready(State(proxy): State<Proxy>) -> Response {
    if proxy.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n").into_response()
    } else if proxy.is_ready() {
        (StatusCode::OK, "LIVE\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "NOT READY\n").into_response()
    }
}

fn timestamp(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

async fn config_dump(State(proxy): State<Proxy>) -> Response {
    let running = proxy.applied().map(|applied| {
        json!({
            "version": applied.version,
            "source": applied.source,
            "applied_at": timestamp(applied.applied_at),
            "config": applied.config.config(),
        })
    });
    let rejected = proxy.last_rejected().map(|rejected| {
        json!({
            "version": rejected.version,
            "source": rejected.source,
            "rejected_at": timestamp(rejected.rejected_at),
            "errors": rejected.errors,
        })
    });
    let dns = proxy.dns_status().await.map(|status| {
        let hijack: serde_json::Map<String, serde_json::Value> =
            status.hijack.iter().map(|(name, vip)| (name.clone(), json!(vip))).collect();
        json!({ "listening": status.listening, "hijack": hijack, "cache_entries": status.cache_entries })
    });
    axum::Json(json!({ "running": running, "dns": dns, "last_rejected": rejected })).into_response()
}

async fn prometheus(State(proxy): State<Proxy>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], proxy.metrics().render())
        .into_response()
}

#[derive(Deserialize)]
struct Format {
    format: Option<String>,
}

impl Format {
    fn json(&self) -> bool {
        self.format.as_deref() == Some("json")
    }
}

async fn clusters(State(proxy): State<Proxy>, Query(format): Query<Format>) -> Response {
    let clusters = proxy.clusters();
    let mut names: Vec<&String> = clusters.keys().collect();
    names.sort();
    if format.json() {
        let body: Vec<_> = names
            .iter()
            .map(|name| {
                let cluster = &clusters[*name];
                let endpoints: Vec<_> = cluster
                    .endpoints()
                    .iter()
                    .map(|endpoint| {
                        json!({
                            "address": endpoint.label(),
                            "health": endpoint.health().as_str(),
                            "ejected": endpoint.is_ejected(),
                            "routable": endpoint.is_routable(),
                            "active_connections": endpoint.active(),
                        })
                    })
                    .collect();
                json!({
                    "name": name,
                    "load_balancing": cluster.config.load_balancing,
                    "endpoints": endpoints,
                })
            })
            .collect();
        return axum::Json(json!({ "clusters": body })).into_response();
    }
    // Envoy's text form: cluster::endpoint::field::value, one per line.
    let mut text = String::new();
    for name in names {
        for endpoint in clusters[name].endpoints() {
            let prefix = format!("{name}::{}", endpoint.label());
            let _ = writeln!(text, "{prefix}::health_flags::{}", endpoint.health().as_str());
            let _ = writeln!(text, "{prefix}::ejected::{}", endpoint.is_ejected());
            let _ = writeln!(text, "{prefix}::cx_active::{}", endpoint.active());
        }
    }
    text.into_response()
}

async fn listeners(State(proxy): State<Proxy>, Query(format): Query<Format>) -> Response {
    let listeners = proxy.listeners().await;
    if format.json() {
        return axum::Json(json!({ "listeners": listeners })).into_response();
    }
    let mut text = String::new();
    for listener in listeners {
        let _ = writeln!(text, "{}::{}", listener.name, listener.bound);
    }
    text.into_response()
}

/// The tunnels: the router's view (`activeServices` with their clients, as the seed's Router status),
/// each published service with its routers, each visited service with its routers.
async fn tunnels(State(proxy): State<Proxy>) -> Response {
    axum::Json(proxy.tunnels_status().await).into_response()
}

async fn reload(State(proxy): State<Proxy>) -> Response {
    match proxy.reload().await {
        Ok(report) => axum::Json(json!({
            "version": report.version,
            "changed": report.changed,
            "changes": report.summary,
        }))
        .into_response(),
        Err(ReloadError::NoSource) => {
            (StatusCode::CONFLICT, format!("{}\n", ReloadError::NoSource)).into_response()
        }
        Err(error) => {
            (StatusCode::BAD_REQUEST, format!("config rejected; the running config stays:\n{error}\n"))
                .into_response()
        }
    }
}

async fn drain(State(proxy): State<Proxy>) -> Response {
    if proxy.is_draining() {
        return (StatusCode::OK, "already draining\n").into_response();
    }
    tokio::spawn(async move {
        proxy.drain().await;
    });
    (StatusCode::OK, "draining\n").into_response()
}

async fn quit(State(proxy): State<Proxy>) -> Response {
    proxy.shutdown(Shutdown::Fast);
    (StatusCode::OK, "OK\n").into_response()
}

/// Every probe target's latest result.
async fn probes(State(proxy): State<Proxy>) -> Response {
    axum::Json(json!({"probes": proxy.probe_results().await})).into_response()
}
