//! The control plane's side of the snapshot stream (`POST /v1/stream`, see `keel_schemas::stream`).
//!
//! One session per proxy. It sends the node's snapshot whenever the published [`World`] gives the node a
//! version other than the last one sent (or, on a fresh stream, other than what the proxy says it runs
//! or last refused), so a NACKed version is never sent again until the snapshot changes. ACKs and NACKs
//! count only for the nonce last sent; stale ones are ignored, as in xDS.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Extension, State as Shared};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use keel_schemas::resource::{Kind, Spec};
use keel_schemas::stream::{MAX_LINE, ProxyMessage, ProxyStatus, RouterReport, ServerMessage};
use tokio::sync::mpsc;

use crate::State;
use crate::api::{Failure, denied};
use crate::auth::Role;
use crate::fleet::{Nack, ProxyRecord, now};
use crate::snapshot::World;
use crate::store::Key;

/// How long a new stream may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest NACK error kept.
const MAX_ERROR: usize = 8 << 10;
/// Most services a router report may list.
const MAX_REPORTED_SERVICES: usize = 10_000;

/// The peer's address, added to every request by the server.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// Opens a session for a proxy.
pub async fn open(
    Shared(state): Shared<Arc<State>>,
    Extension(PeerAddr(peer)): Extension<PeerAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(why) = state.tokens.check(&headers, Role::Proxy) {
        return denied(why);
    }
    let mut reader = LineReader { body, buffer: BytesMut::new() };
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, reader.next()).await {
        Ok(Ok(Some(line))) => serde_json::from_slice::<ProxyMessage>(&line),
        Ok(Ok(None)) => return Failure::bad_request("the stream closed before its hello").into_response(),
        Ok(Err(problem)) => return Failure::bad_request(problem).into_response(),
        Err(_) => return Failure::bad_request("no hello within 10s").into_response(),
    };
    let (node, labels, version, rejected_version, software, client) = match hello {
        Ok(ProxyMessage::Hello { node, labels, version, rejected_version, software, client }) => {
            (node, labels, version, rejected_version, software, client)
        }
        Ok(_) => return Failure::bad_request("the first message must be a hello").into_response(),
        Err(error) => return Failure::bad_request(format!("invalid hello: {error}")).into_response(),
    };
    if let Err(problem) = check_identity(&node, &labels) {
        return Failure::bad_request(problem).into_response();
    }
    let record = ProxyRecord {
        node: node.clone(),
        labels: labels.clone(),
        address: peer.to_string(),
        software: software.chars().take(64).collect(),
        client,
        connected: true,
        connected_since: now(),
        sent_version: None,
        snapshots_sent: 0,
        acked_version: version.clone(),
        last_nack: None,
        status: None,
    };
    let id = state.fleet.register(record).await;
    state.fleet_changed();
    tracing::info!(node, %peer, running = ?version, "proxy connected");
    let (lines, receive) = mpsc::channel(4);
    let skip: Vec<String> = version.into_iter().chain(rejected_version).collect();
    tokio::spawn(run(
        state,
        Session { id, node, labels, skip, nonce: 0, last_router_report: None },
        reader,
        lines,
    ));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::new(ChannelBody { lines: receive }))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn check_identity(node: &str, labels: &BTreeMap<String, String>) -> Result<(), String> {
    if node.is_empty() || node.len() > 253 || node.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("invalid node name {node:?}"));
    }
    if labels.len() > 64 || labels.iter().any(|(k, v)| k.is_empty() || k.len() > 253 || v.len() > 63) {
        return Err("labels: at most 64, keys of 1 to 253 characters, values of at most 63".to_string());
    }
    Ok(())
}

struct Session {
    id: u64,
    node: String,
    labels: BTreeMap<String, String>,
    /// Versions not to send: what the proxy runs or refused, then the last one sent.
    skip: Vec<String>,
    nonce: u64,
    last_router_report: Option<RouterReport>,
}

async fn run(state: Arc<State>, mut session: Session, mut reader: LineReader, lines: mpsc::Sender<Bytes>) {
    let mut worlds = state.worlds();
    loop {
        let world: Arc<World> = worlds.borrow_and_update().clone();
        let snapshot = world.snapshot_for(&session.node, &session.labels);
        if !session.skip.contains(&snapshot.version) {
            session.nonce += 1;
            let message = ServerMessage::Snapshot {
                version: snapshot.version.clone(),
                nonce: session.nonce.to_string(),
                config: snapshot.text.clone(),
            };
            let mut line = serde_json::to_vec(&message).unwrap_or_default();
            line.push(b'\n');
            if lines.send(Bytes::from(line)).await.is_err() {
                break;
            }
            session.skip = vec![snapshot.version.clone()];
            let version = snapshot.version.clone();
            state
                .fleet
                .update(session.id, |record| {
                    record.sent_version = Some(version);
                    record.snapshots_sent += 1;
                })
                .await;
        }
        tokio::select! {
            changed = worlds.changed() => if changed.is_err() { break },
            line = reader.next() => match line {
                Ok(Some(line)) => handle(&state, &mut session, &line).await,
                Ok(None) => break,
                Err(problem) => {
                    // Mostly a proxy that went away without closing its stream: normal in a fleet.
                    tracing::info!(node = %session.node, problem, "proxy stream broken");
                    break;
                }
            },
            () = lines.closed() => break,
            () = state.stop.cancelled() => break,
        }
    }
    state.fleet.disconnected(session.id).await;
    state.fleet_changed();
    tracing::info!(node = %session.node, "proxy disconnected");
}

async fn handle(state: &State, session: &mut Session, line: &[u8]) {
    let message = match serde_json::from_slice::<ProxyMessage>(line) {
        Ok(message) => message,
        Err(error) => {
            tracing::warn!(node = %session.node, %error, "ignoring an unreadable message from a proxy");
            return;
        }
    };
    let current = session.nonce.to_string();
    match message {
        ProxyMessage::Ack { version, nonce } if nonce == current => {
            tracing::debug!(node = %session.node, version, "ACK");
            state.fleet.update(session.id, |record| record.acked_version = Some(version)).await;
        }
        ProxyMessage::Nack { version, nonce, error } if nonce == current => {
            let error: String = error.chars().take(MAX_ERROR).collect();
            tracing::warn!(node = %session.node, version, error, "NACK: the proxy refused its snapshot");
            let nack = Nack { version, error, at: now() };
            state.fleet.update(session.id, |record| record.last_nack = Some(nack)).await;
        }
        ProxyMessage::Ack { .. } | ProxyMessage::Nack { .. } => {
            tracing::debug!(node = %session.node, "ignoring a reply to an older snapshot");
        }
        ProxyMessage::Status { status } => report(state, session, status).await,
        ProxyMessage::Hello { .. } => tracing::warn!(node = %session.node, "ignoring a second hello"),
    }
}

async fn report(state: &State, session: &mut Session, mut status: ProxyStatus) {
    if let Some(router) = &mut status.router {
        router.active_services.truncate(MAX_REPORTED_SERVICES);
    }
    let router = status.router.clone();
    // Probe results go to the connectivity matrix, not to the Node resource: they change every round.
    let probes = std::mem::take(&mut status.probes);
    state.netcheck.proxy_results(&session.node, probes);
    state.fleet.set_status(session.id, status).await;
    let Some(router) = router else { return };
    if session.last_router_report.as_ref() == Some(&router) {
        return;
    }
    let status = serde_json::to_value(&router).unwrap_or_default();
    let mut store = state.store.lock().await;
    let routers: Vec<Key> = store
        .list(Kind::Router, None)
        .filter(|stored| {
            matches!(&stored.spec, Spec::Router(spec) if spec.node_of(&stored.resource.metadata.name) == session.node)
        })
        .map(|stored| Key::new(Kind::Router, None, &stored.resource.metadata.name))
        .collect();
    for key in routers {
        let Some(current) = store.get(&key).cloned() else { continue };
        let mut resource = current.resource.clone();
        resource.metadata.resource_version.clear();
        resource.status = status.clone();
        if let Err(error) = store.replace(key, resource, current.spec.clone(), true) {
            tracing::warn!(node = %session.node, %error, "cannot record the router's status");
        }
    }
    session.last_router_report = Some(router);
}

/// Reads newline-delimited messages from a request body.
struct LineReader {
    body: Body,
    buffer: BytesMut,
}

impl LineReader {
    /// The next line, `None` at the end of the body. Cancel-safe: bytes read are kept in the buffer.
    async fn next(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line = self.buffer.split_to(end + 1).freeze();
                let line = line.slice(..end);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(line));
            }
            if self.buffer.len() > MAX_LINE {
                return Err(format!("a message longer than {MAX_LINE} bytes"));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(error)) => return Err(format!("reading the stream: {error}")),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// A response body fed by a channel: each item is one line.
pub(crate) struct ChannelBody {
    lines: mpsc::Receiver<Bytes>,
}

impl ChannelBody {
    pub(crate) fn new(lines: mpsc::Receiver<Bytes>) -> Self {
        Self { lines }
    }
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.lines.poll_recv(cx).map(|line| line.map(|line| Ok(http_body::Frame::data(line))))
    }
}
