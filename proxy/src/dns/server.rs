//! The DNS server: hickory-server's UDP and TCP front end, with Keel's own request handler.
//!
//! For each query the handler reads the current [`DnsState`] (swapped whole on reload):
//! - a hijacked name answers its VIP (A for an IPv4 VIP, AAAA for an IPv6 one); any other type answers
//!   NOERROR with no records and an SOA (NODATA, cacheable by the client), never NXDOMAIN;
//! - any other name is answered from the cache, or forwarded to the upstreams and cached; when every
//!   upstream fails, a stale answer is served if one is still in its window, else SERVFAIL (REFUSED when
//!   no upstream is configured).
//!
//! The response carries an OPT record exactly when the query did, advertising the client's payload size;
//! hickory's encoder then truncates a UDP answer to that size (512 bytes without EDNS) and sets TC.
//! Malformed packets are answered FORMERR by hickory-server itself.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::{
    Edns, Header, HeaderCounts, LowerQuery, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_proto::rr::rdata::{A, AAAA, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::Server;
use hickory_server::net::NetError;
use hickory_server::net::runtime::{Time, TokioTime};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use keel_schemas::Diagnostic;
use keel_schemas::config::{Dns, DnsCache};
use keel_schemas::dns::HijackTable;
use tokio::net::{TcpListener, UdpSocket};

use super::cache::{AnswerCache, CacheKey};
use super::upstream::{ForwardError, Upstreams};
use crate::metrics::{DnsMetrics, DnsOutcome};

/// How long a TCP client may stay silent before its connection is closed.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection (pipelined queries answered out of order).
const TCP_RESPONSE_BUFFER: usize = 32;
/// EDNS payload size Keel asks upstreams for (the DNS Flag Day 2020 value).
const UPSTREAM_PAYLOAD: u16 = 1232;

/// Everything the handler needs for one config.
#[derive(Debug)]
pub struct DnsState {
    pub table: HijackTable,
    ttl: u32,
    upstreams: Upstreams,
    cache: Arc<AnswerCache>,
    cache_settings: DnsCache,
    metrics: DnsMetrics,
}

impl DnsState {
    /// The state for `dns`, keeping the VIPs and the cache of `previous` where they still apply.
    pub fn new(dns: &Dns, previous: Option<&DnsState>, metrics: DnsMetrics) -> Result<Self, Vec<Diagnostic>> {
        let table = HijackTable::build(dns, previous.map(|state| &state.table))?;
        let cache = match previous {
            Some(state) if state.cache_settings == dns.cache => Arc::clone(&state.cache),
            _ => Arc::new(AnswerCache::new(&dns.cache)),
        };
        let upstreams = Upstreams::new(
            dns.upstreams.iter().map(|upstream| upstream.0).collect(),
            dns.upstream_timeout.get(),
            dns.max_in_flight as usize,
        );
        Ok(Self {
            table,
            ttl: u32::try_from(dns.ttl.get().as_secs()).unwrap_or(u32::MAX).max(1),
            upstreams,
            cache,
            cache_settings: dns.cache.clone(),
            metrics,
        })
    }

    /// The metric handles, for the next state to reuse.
    pub fn metrics(&self) -> &DnsMetrics {
        &self.metrics
    }

    pub fn cache_len(&self) -> u64 {
        self.cache.len()
    }
}

/// Keel's request handler.
#[derive(Clone, Debug)]
pub struct Handler {
    state: Arc<ArcSwap<DnsState>>,
}

/// The EDNS record of the response: present exactly when the query had one, with the client's payload
/// size (at least 512) and DO bit.
fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|client| {
        let mut edns = Edns::new();
        edns.set_max_payload(client.max_payload().max(512));
        edns.set_dnssec_ok(client.flags().dnssec_ok);
        edns
    })
}

async fn send_error<R: ResponseHandler>(
    request: &Request,
    code: ResponseCode,
    edns: Option<&Edns>,
    mut response: R,
) -> ResponseInfo {
    let message = MessageResponseBuilder::new(&request.queries, edns).error_msg(&request.metadata, code);
    match response.send_response(message).await {
        Ok(info) => info,
        Err(error) => failed(request, &error),
    }
}

/// What to report when a response could not be sent.
fn failed(request: &Request, error: &dyn std::fmt::Display) -> ResponseInfo {
    tracing::debug!(client = %request.src(), %error, "DNS response not sent");
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
}

/// The SOA that makes a NODATA answer for a hijacked name cacheable for `ttl`.
fn negative_soa(name: &Name, ttl: u32) -> Record {
    let mname = Name::from_ascii("keel.invalid.").expect("a valid name");
    let rname = Name::from_ascii("hostmaster.keel.invalid.").expect("a valid name");
    let soa = SOA::new(mname, rname, 1, ttl as i32, ttl as i32, ttl as i32, ttl);
    Record::from_rdata(name.clone(), ttl, RData::SOA(soa))
}

impl Handler {
    pub fn new(state: Arc<ArcSwap<DnsState>>) -> Self {
        Self { state }
    }

    async fn hijacked<R: ResponseHandler>(
        &self,
        request: &Request,
        query: &LowerQuery,
        vip: IpAddr,
        ttl: u32,
        edns: Option<&Edns>,
        mut response: R,
    ) -> ResponseInfo {
        let name = query.original().name().clone();
        let address = match (query.query_type(), vip) {
            (RecordType::A | RecordType::ANY, IpAddr::V4(v4)) => Some(RData::A(A::from(v4))),
            (RecordType::AAAA | RecordType::ANY, IpAddr::V6(v6)) => Some(RData::AAAA(AAAA::from(v6))),
            _ => None,
        };
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.recursion_available = true;
        metadata.response_code = ResponseCode::NoError;
        let answers: Vec<Record> =
            address.into_iter().map(|data| Record::from_rdata(name.clone(), ttl, data)).collect();
        let soa: Vec<Record> = if answers.is_empty() { vec![negative_soa(&name, ttl)] } else { Vec::new() };
        let message = MessageResponseBuilder::new(&request.queries, edns).build(
            metadata,
            answers.iter(),
            std::iter::empty(),
            soa.iter(),
            std::iter::empty(),
        );
        match response.send_response(message).await {
            Ok(info) => info,
            Err(error) => failed(request, &error),
        }
    }

    async fn forwarded<R: ResponseHandler>(
        &self,
        state: &DnsState,
        request: &Request,
        query: &LowerQuery,
        edns: Option<&Edns>,
        response: R,
    ) -> ResponseInfo {
        let dnssec_ok = edns.is_some_and(|edns| edns.flags().dnssec_ok);
        let key = CacheKey {
            name: query.name().clone(),
            record_type: query.query_type(),
            class: query.query_class(),
            dnssec_ok,
        };
        let query_type: &'static str = query.query_type().into();
        if let Some(hit) = state.cache.get(&key, request.metadata.id) {
            state.metrics.count(query_type, DnsOutcome::CacheHit);
            return send_answer(request, &hit, edns, response).await;
        }
        let mut upstream_query = Message::new(request.metadata.id, MessageType::Query, OpCode::Query);
        upstream_query.metadata.recursion_desired = request.metadata.recursion_desired;
        upstream_query.metadata.checking_disabled = request.metadata.checking_disabled;
        upstream_query.add_query(query.original().clone());
        let mut upstream_edns = Edns::new();
        upstream_edns.set_max_payload(UPSTREAM_PAYLOAD);
        upstream_edns.set_dnssec_ok(dnssec_ok);
        upstream_query.set_edns(upstream_edns);
        let started = tokio::time::Instant::now();
        match state.upstreams.forward(&upstream_query).await {
            Ok(answer) => {
                state.metrics.upstream_duration.record(started.elapsed().as_secs_f64());
                state.metrics.count(query_type, DnsOutcome::Forwarded);
                state.cache.insert(key, &answer.message);
                state.metrics.cache_entries.set(state.cache.len() as f64);
                send_answer(request, &answer.message, edns, response).await
            }
            Err(error) => {
                if let Some((stale, _)) = state.cache.get_stale(&key, request.metadata.id) {
                    state.metrics.count(query_type, DnsOutcome::Stale);
                    tracing::debug!(%error, name = %query.name(), "upstreams failed; serving a stale answer");
                    return send_answer(request, &stale, edns, response).await;
                }
                let code = match error {
                    ForwardError::NoUpstream => ResponseCode::Refused,
                    _ => ResponseCode::ServFail,
                };
                state.metrics.count(query_type, DnsOutcome::Error);
                tracing::debug!(%error, name = %query.name(), "forwarding failed");
                send_error(request, code, edns, response).await
            }
        }
    }
}

/// Sends an upstream (or cached) answer to the client, under the client's ID and EDNS.
async fn send_answer<R: ResponseHandler>(
    request: &Request,
    answer: &Message,
    edns: Option<&Edns>,
    mut response: R,
) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = answer.metadata.response_code;
    metadata.recursion_available = true;
    metadata.authentic_data = answer.metadata.authentic_data;
    let message = MessageResponseBuilder::new(&request.queries, edns).build(
        metadata,
        answer.answers.iter(),
        answer.authorities.iter(),
        std::iter::empty(),
        answer.additionals.iter(),
    );
    match response.send_response(message).await {
        Ok(info) => info,
        Err(error) => failed(request, &error),
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        let edns = response_edns(request);
        if request.metadata.message_type != MessageType::Query || request.metadata.op_code != OpCode::Query {
            return send_error(request, ResponseCode::NotImp, edns.as_ref(), response).await;
        }
        let [query] = request.queries.queries() else {
            return send_error(request, ResponseCode::FormErr, edns.as_ref(), response).await;
        };
        let state = self.state.load_full();
        match state.table.lookup(&query.name().to_string()) {
            Some(vip) => {
                state.metrics.count(query.query_type().into(), DnsOutcome::Hijacked);
                self.hijacked(request, query, vip, state.ttl, edns.as_ref(), response).await
            }
            None => self.forwarded(&state, request, query, edns.as_ref(), response).await,
        }
    }
}

/// Why the DNS server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {address}: {error}")]
    Bind { address: SocketAddr, error: std::io::Error },
    #[error("cannot start a DNS worker thread: {0}")]
    Thread(std::io::Error),
}

/// One worker: a thread running a single-threaded runtime with its own hickory server.
struct Worker {
    stop: tokio_util::sync::CancellationToken,
    thread: std::thread::JoinHandle<()>,
}

/// A running DNS server.
///
/// It runs one worker thread per CPU, each with a single-threaded tokio runtime and its own UDP socket
/// on every listen address (`SO_REUSEPORT`, so the kernel spreads clients across them). A query is
/// received, answered and sent on one thread: hickory-server hands each query to a task and each
/// response to a sender task, and on a shared multi-threaded runtime those hand-offs cost a cross-thread
/// wake-up per query, which profiling showed to be most of the time spent. TCP, which carries little
/// DNS traffic, is served by the first worker.
pub struct DnsServer {
    workers: Vec<Worker>,
    state: Arc<ArcSwap<DnsState>>,
    /// The bound addresses (ports filled in), one per `dns.listen` entry.
    pub local_addrs: Vec<SocketAddr>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer").field("local_addrs", &self.local_addrs).finish_non_exhaustive()
    }
}

fn reuse_port_udp(address: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(address), socket2::Type::DGRAM, None)?;
    socket.set_reuse_port(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    Ok(socket.into())
}

/// Tries for a port 0 address: each try takes a fresh port, and one is rarely taken for UDP elsewhere.
const PORT_ZERO_TRIES: usize = 16;

/// The TCP listener and one UDP socket per worker for one listen address, on one port.
///
/// The TCP listener goes first. With port 0 it is bound plainly, which reserves a port no other server
/// of ours holds (binding port 0 with SO_REUSEPORT may hand out a port that another reuseport socket of
/// the same user already uses); if some other program has that port for UDP, another port is tried.
/// With a given port, TCP takes SO_REUSEPORT like the UDP sockets, so that a reload which adds a listen
/// address can start the new server on the old addresses before the old server lets go of them.
fn bind_address(
    address: SocketAddr,
    workers: usize,
) -> Result<(std::net::TcpListener, Vec<std::net::UdpSocket>), StartError> {
    let tries = if address.port() == 0 { PORT_ZERO_TRIES } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        let listener = if address.port() == 0 {
            std::net::TcpListener::bind(address).and_then(|listener| {
                listener.set_nonblocking(true)?;
                Ok(listener)
            })
        } else {
            reuse_port_tcp(address)
        }
        .map_err(|error| StartError::Bind { address, error })?;
        let bound = listener.local_addr().map_err(|error| StartError::Bind { address, error })?;
        match (0..workers).map(|_| reuse_port_udp(bound)).collect::<std::io::Result<Vec<_>>>() {
            Ok(sockets) => return Ok((listener, sockets)),
            Err(error) => last = Some(StartError::Bind { address: bound, error }),
        }
    }
    Err(last.expect("at least one try was made"))
}

/// A TCP listener with `SO_REUSEPORT` (see [`bind_address`]).
fn reuse_port_tcp(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(address), socket2::Type::STREAM, None)?;
    socket.set_reuse_port(true)?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

impl DnsServer {
    /// Binds UDP (one socket per worker) and TCP on every listen address and starts serving `state`.
    /// Every socket is bound before any worker starts, so a bind failure leaves nothing running.
    pub async fn start(listen: &[SocketAddr], state: DnsState) -> Result<Self, StartError> {
        let workers = std::thread::available_parallelism().map_or(1, usize::from);
        let mut udp: Vec<Vec<std::net::UdpSocket>> = (0..workers).map(|_| Vec::new()).collect();
        let mut tcp = Vec::new();
        let mut local_addrs = Vec::new();
        for &address in listen {
            let (listener, sockets) = bind_address(address, workers)?;
            let bound = listener.local_addr().map_err(|error| StartError::Bind { address, error })?;
            for (worker, socket) in udp.iter_mut().zip(sockets) {
                worker.push(socket);
            }
            tcp.push(listener);
            local_addrs.push(bound);
        }
        let state = Arc::new(ArcSwap::from_pointee(state));
        let mut running = Vec::new();
        for (index, sockets) in udp.into_iter().enumerate() {
            let listeners = if index == 0 { std::mem::take(&mut tcp) } else { Vec::new() };
            let handler = Handler::new(Arc::clone(&state));
            let stop = tokio_util::sync::CancellationToken::new();
            let token = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("keel-dns-{index}"))
                .spawn(move || run_worker(handler, sockets, listeners, token))
                .map_err(StartError::Thread)?;
            running.push(Worker { stop, thread });
        }
        for address in &local_addrs {
            tracing::info!(%address, workers, "DNS listening (UDP and TCP)");
        }
        Ok(Self { workers: running, state, local_addrs })
    }

    /// The state the handler answers from now.
    pub fn state(&self) -> Arc<DnsState> {
        self.state.load_full()
    }

    /// Answers from `state` from now on; queries in flight finish with the state they started with.
    pub fn replace_state(&self, state: DnsState) {
        self.state.store(Arc::new(state));
    }

    /// Stops serving, letting queries in flight finish.
    pub async fn shutdown(self) {
        for worker in &self.workers {
            worker.stop.cancel();
        }
        let threads: Vec<_> = self.workers.into_iter().map(|worker| worker.thread).collect();
        let joined =
            tokio::task::spawn_blocking(move || threads.into_iter().all(|thread| thread.join().is_ok()));
        if !matches!(joined.await, Ok(true)) {
            tracing::warn!("a DNS worker thread panicked");
        }
    }
}

/// Largest query read over UDP; a query is a header, one question and an OPT record.
const MAX_UDP_QUERY: usize = 4096;

/// Keel's UDP front end around hickory's request handling: receive, handle and send on one task.
///
/// A query whose answer is ready at once (a hijacked name, a cache hit) is answered inline, with no task
/// and no channel; one that must wait for an upstream is handed to a task of its own, so it never holds
/// up the queries behind it. A packet that is not a query but has a header is answered FORMERR; anything
/// shorter is dropped.
async fn serve_udp(socket: Arc<UdpSocket>, handler: Handler, stop: tokio_util::sync::CancellationToken) {
    let mut buffer = vec![0u8; MAX_UDP_QUERY];
    loop {
        let received = tokio::select! {
            received = socket.recv_from(&mut buffer) => received,
            () = stop.cancelled() => return,
        };
        let (length, client) = match received {
            Ok(received) => received,
            Err(error) => {
                tracing::debug!(%error, "DNS UDP receive failed");
                continue;
            }
        };
        let packet = &buffer[..length];
        let request = match Request::from_bytes(packet.to_vec(), client, Protocol::Udp) {
            Ok(request) => request,
            Err(_) => {
                if let Some(reply) = form_error(packet) {
                    let _ = socket.try_send_to(&reply, client);
                }
                continue;
            }
        };
        let responder = UdpResponder { socket: Arc::clone(&socket), client };
        let handler = handler.clone();
        let mut answer = Box::pin(async move {
            handler.handle_request::<_, TokioTime>(&request, responder).await;
        });
        if poll_once(answer.as_mut()).is_pending() {
            tokio::spawn(answer);
        }
    }
}

/// Polls a future once, with a waker that does nothing: the caller spawns it if it is not done, and
/// the runtime's first poll of the task registers the real waker.
fn poll_once<F: std::future::Future + ?Sized>(future: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    future.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
}

/// FORMERR for a packet with a readable header (its ID and opcode echoed), or nothing.
fn form_error(packet: &[u8]) -> Option<Vec<u8>> {
    let header = packet.get(..12)?;
    let mut reply = vec![0u8; 12];
    reply[..2].copy_from_slice(&header[..2]);
    // QR set, the query's opcode kept; RCODE 1 (FORMERR); every count zero.
    reply[2] = 0x80 | (header[2] & 0x78);
    reply[3] = 0x01;
    Some(reply)
}

/// Sends a response straight to the client's address on the socket the query came in on.
#[derive(Clone)]
struct UdpResponder {
    socket: Arc<UdpSocket>,
    client: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpResponder {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        // RFC 1035 section 4.2.1: 512 bytes without EDNS; the client's payload size with it. The
        // encoder drops what does not fit and sets TC.
        let limit = response.edns().map_or(512, |edns| edns.max_payload().max(512));
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(limit);
        let info = response.destructive_emit(&mut encoder)?;
        match self.socket.try_send_to(&bytes, self.client) {
            Ok(_) => Ok(info),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                self.socket
                    .send_to(&bytes, self.client)
                    .await
                    .map_err(|error| NetError::Io(Arc::new(error)))?;
                Ok(info)
            }
            Err(error) => Err(NetError::Io(Arc::new(error))),
        }
    }
}

/// A worker thread's life: serve its sockets until told to stop.
fn run_worker(
    handler: Handler,
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
    stop: tokio_util::sync::CancellationToken,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start a DNS worker runtime");
            return;
        }
    };
    runtime.block_on(async move {
        for socket in udp {
            match UdpSocket::from_std(socket) {
                Ok(socket) => {
                    tokio::spawn(serve_udp(Arc::new(socket), handler.clone(), stop.clone()));
                }
                Err(error) => tracing::error!(%error, "DNS UDP socket unusable"),
            }
        }
        let mut server = Server::new(handler);
        for listener in tcp {
            match TcpListener::from_std(listener) {
                Ok(listener) => server.register_listener(listener, TCP_TIMEOUT, TCP_RESPONSE_BUFFER),
                Err(error) => tracing::error!(%error, "DNS TCP socket unusable"),
            }
        }
        stop.cancelled().await;
        if let Err(error) = server.shutdown_gracefully().await {
            tracing::warn!(%error, "DNS worker did not shut down cleanly");
        }
    });
}
