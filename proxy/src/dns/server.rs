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
//!
//! UDP is Keel's own loop (`serve_udp`), batched with [`super::batch`]; TCP is hickory-server's, which
//! frames pipelined queries and answers malformed ones FORMERR itself.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::ProtoError;
use hickory_proto::op::{
    Edns, Header, HeaderCounts, LowerQuery, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_proto::rr::rdata::{A, AAAA, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use keel_schemas::Diagnostic;
use keel_schemas::config::{Dns, DnsCache};
use keel_schemas::dns::HijackTable;
use tokio::io::Interest;
use tokio::net::{TcpListener, UdpSocket};

use super::batch::{Datagram, RecvBatch, SendBatch};
use super::cache::{AnswerCache, CacheKey};
use super::upstream::{ForwardError, Upstreams};
use super::wire;
use crate::metrics::{DnsMetrics, DnsOutcome};

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
        Ok(Self::with_table(dns, table, previous, metrics))
    }

    /// The state for `dns` with its hijack table already built (from `previous`'s table, as
    /// [`DnsState::new`] builds it).
    pub fn with_table(
        dns: &Dns,
        table: HijackTable,
        previous: Option<&DnsState>,
        metrics: DnsMetrics,
    ) -> Self {
        let cache = match previous {
            Some(state) if state.cache_settings == dns.cache => Arc::clone(&state.cache),
            _ => Arc::new(AnswerCache::new(&dns.cache)),
        };
        let upstreams = Upstreams::new(
            dns.upstreams.iter().map(|upstream| upstream.0).collect(),
            dns.upstream_timeout.get(),
            dns.max_in_flight as usize,
        );
        Self {
            table,
            ttl: u32::try_from(dns.ttl.get().as_secs()).unwrap_or(u32::MAX).max(1),
            upstreams,
            cache,
            cache_settings: dns.cache.clone(),
            metrics,
        }
    }

    /// The answer to `request` if it needs no upstream: an error, a hijacked name, a cache hit.
    fn resolve_now(&self, request: &Request) -> Resolution {
        if request.metadata.message_type != MessageType::Query || request.metadata.op_code != OpCode::Query {
            return Resolution::Now(Answer::error(request, ResponseCode::NotImp));
        }
        // RFC 6891 section 6.1.3: an EDNS version this server does not speak gets BADVERS, with an OPT
        // record of the version it does (0).
        if request.edns.as_ref().is_some_and(|edns| edns.version() > 0) {
            return Resolution::Now(Answer::error(request, ResponseCode::BADVERS));
        }
        let [query] = request.queries.queries() else {
            return Resolution::Now(Answer::error(request, ResponseCode::FormErr));
        };
        let query_type: &'static str = query.query_type().into();
        if let Some(vip) = self.table.lookup_labels(query.name().iter()) {
            self.metrics.count(query_type, DnsOutcome::Hijacked);
            return Resolution::Now(Answer::hijacked(request, query, vip, self.ttl));
        }
        let dnssec_ok = request.edns.as_ref().is_some_and(|edns| edns.flags().dnssec_ok);
        let key = CacheKey::new(query.name(), query.query_type(), query.query_class(), dnssec_ok);
        match self.cache.get(&key, request.metadata.id) {
            Some(hit) => {
                self.metrics.count(query_type, DnsOutcome::CacheHit);
                Resolution::Now(Answer::forwarded(request, hit))
            }
            None => Resolution::Forward(key),
        }
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

/// What is wrong with a query that can be answered, or what it is answered with: the header and the
/// records of each section (the question is always the query's own).
#[derive(Debug)]
struct Answer {
    metadata: Metadata,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    soa: Vec<Record>,
    additionals: Vec<Record>,
}

impl Answer {
    /// An answer with no records and `code`.
    fn error(request: &Request, code: ResponseCode) -> Self {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = code;
        Self {
            metadata,
            answers: Vec::new(),
            authorities: Vec::new(),
            soa: Vec::new(),
            additionals: Vec::new(),
        }
    }

    /// A hijacked name's answer: its VIP when the type asks for one, else NODATA with an SOA.
    fn hijacked(request: &Request, query: &LowerQuery, vip: IpAddr, ttl: u32) -> Self {
        let name = query.original().name();
        let address = match (query.query_type(), vip) {
            (RecordType::A | RecordType::ANY, IpAddr::V4(v4)) => Some(RData::A(A::from(v4))),
            (RecordType::AAAA | RecordType::ANY, IpAddr::V6(v6)) => Some(RData::AAAA(AAAA::from(v6))),
            _ => None,
        };
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.recursion_available = true;
        metadata.response_code = ResponseCode::NoError;
        let (answers, soa) = match address {
            Some(data) => (vec![Record::from_rdata(name.clone(), ttl, data)], Vec::new()),
            None => (Vec::new(), vec![negative_soa(name, ttl)]),
        };
        Self { metadata, answers, authorities: Vec::new(), soa, additionals: Vec::new() }
    }

    /// An upstream's (or the cache's) answer, under the client's ID and flags.
    fn forwarded(request: &Request, answer: Message) -> Self {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = answer.metadata.response_code;
        metadata.recursion_available = true;
        metadata.authentic_data = answer.metadata.authentic_data;
        Self {
            metadata,
            answers: answer.answers,
            authorities: answer.authorities,
            soa: Vec::new(),
            additionals: answer.additionals,
        }
    }

    /// The response message for `request`, borrowing the records.
    fn response<'q, 'a>(
        &'a self,
        request: &'q Request,
        edns: Option<&'q Edns>,
    ) -> MessageResponse<
        'q,
        'a,
        std::slice::Iter<'a, Record>,
        std::slice::Iter<'a, Record>,
        std::slice::Iter<'a, Record>,
        std::slice::Iter<'a, Record>,
    > {
        MessageResponseBuilder::new(&request.queries, edns).build(
            self.metadata,
            self.answers.iter(),
            self.authorities.iter(),
            self.soa.iter(),
            self.additionals.iter(),
        )
    }

    /// The response in its UDP wire form: cut to the client's EDNS payload size, or 512 bytes without
    /// EDNS (RFC 1035 section 4.2.1), with TC set when records had to be left out.
    fn encode_udp(&self, request: &Request) -> Result<Vec<u8>, ProtoError> {
        let edns = response_edns(request);
        let limit = edns.as_ref().map_or(512, |edns| edns.max_payload().max(512));
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(limit);
        self.response(request, edns.as_ref()).destructive_emit(&mut encoder)?;
        Ok(bytes)
    }
}

/// The SOA that makes a NODATA answer for a hijacked name cacheable for `ttl`.
fn negative_soa(name: &Name, ttl: u32) -> Record {
    let mname = Name::from_ascii("keel.invalid.").expect("a valid name");
    let rname = Name::from_ascii("hostmaster.keel.invalid.").expect("a valid name");
    let soa = SOA::new(mname, rname, 1, ttl as i32, ttl as i32, ttl as i32, ttl);
    Record::from_rdata(name.clone(), ttl, RData::SOA(soa))
}

/// How a query is answered: at once, or after asking the upstreams.
#[derive(Debug)]
enum Resolution {
    Now(Answer),
    Forward(CacheKey),
}

impl Handler {
    pub fn new(state: Arc<ArcSwap<DnsState>>) -> Self {
        Self { state }
    }

    /// The answer to `request`, asking the upstreams if it must.
    async fn resolve(&self, request: &Request) -> Answer {
        let state = self.state.load_full();
        match state.resolve_now(request) {
            Resolution::Now(answer) => answer,
            Resolution::Forward(key) => forward(&state, request, key).await,
        }
    }
}

/// Asks the upstreams (the query is known to have one question), caches what they answer, and falls
/// back to a stale answer when they all fail.
async fn forward(state: &DnsState, request: &Request, key: CacheKey) -> Answer {
    let query = &request.queries.queries()[0];
    let query_type: &'static str = query.query_type().into();
    let mut upstream_query = Message::new(request.metadata.id, MessageType::Query, OpCode::Query);
    upstream_query.metadata.recursion_desired = request.metadata.recursion_desired;
    upstream_query.metadata.checking_disabled = request.metadata.checking_disabled;
    upstream_query.add_query(query.original().clone());
    let mut upstream_edns = Edns::new();
    upstream_edns.set_max_payload(UPSTREAM_PAYLOAD);
    upstream_edns.set_dnssec_ok(key.dnssec_ok());
    upstream_query.set_edns(upstream_edns);
    let started = tokio::time::Instant::now();
    match state.upstreams.forward(&upstream_query).await {
        Ok(answer) => {
            state.metrics.upstream_duration.record(started.elapsed().as_secs_f64());
            state.metrics.count(query_type, DnsOutcome::Forwarded);
            state.cache.insert(key, &answer.message);
            state.metrics.cache_entries.set(state.cache.len() as f64);
            Answer::forwarded(request, answer.message)
        }
        Err(error) => {
            if let Some((stale, _)) = state.cache.get_stale(&key, request.metadata.id) {
                state.metrics.count(query_type, DnsOutcome::Stale);
                tracing::debug!(%error, name = %query.name(), "upstreams failed; serving a stale answer");
                return Answer::forwarded(request, stale);
            }
            let code = match error {
                ForwardError::NoUpstream => ResponseCode::Refused,
                _ => ResponseCode::ServFail,
            };
            state.metrics.count(query_type, DnsOutcome::Error);
            tracing::debug!(%error, name = %query.name(), "forwarding failed");
            Answer::error(request, code)
        }
    }
}

/// The TCP path (and any other transport hickory-server carries): hickory frames the messages.
#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let answer = self.resolve(request).await;
        let edns = response_edns(request);
        match response.send_response(answer.response(request, edns.as_ref())).await {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(client = %request.src(), %error, "DNS response not sent");
                let mut metadata = answer.metadata;
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
            }
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

/// One worker: a thread running a single-threaded runtime with its own sockets.
struct Worker {
    stop: tokio_util::sync::CancellationToken,
    thread: std::thread::JoinHandle<()>,
}

/// A running DNS server.
///
/// It runs `dns.workers` threads (one by default), each with a single-threaded tokio runtime and its own
/// UDP socket on every listen address (`SO_REUSEPORT`, so the kernel spreads clients across them). A
/// query is received, answered and sent on one thread, in batches: hand-offs between threads cost a
/// wake-up per query, which profiling showed to be most of the time spent when hickory-server's UDP path
/// ran on the shared runtime. TCP, which carries little DNS traffic, is served by the first worker.
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
    /// Binds UDP (one socket per worker) and TCP on every listen address and starts `workers` threads
    /// serving `state`.
    /// Every socket is bound before any worker starts, so a bind failure leaves nothing running.
    pub async fn start(listen: &[SocketAddr], workers: u16, state: DnsState) -> Result<Self, StartError> {
        let workers = usize::from(workers.max(1));
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

/// Largest query read over UDP; a query is a header, one question and an OPT record, and a longer
/// datagram is answered FORMERR.
const MAX_UDP_QUERY: usize = 4096;

/// Keel's UDP front end around the handler: receive, answer and send on one task, in batches.
///
/// Each wake-up reads every queued datagram (up to [`super::batch::BATCH`]) with one system call and sends the
/// answers that are ready at once (hijacked names, cache hits, errors) with another. A query that must
/// wait for an upstream is handed to a task of its own, so it never holds up the queries behind it, and
/// that task sends its answer itself. A datagram that is not a query but has a header is answered
/// FORMERR; anything shorter is dropped.
async fn serve_udp(socket: Arc<UdpSocket>, handler: Handler, stop: tokio_util::sync::CancellationToken) {
    let mut received = RecvBatch::new(MAX_UDP_QUERY);
    let mut replies = SendBatch::default();
    loop {
        tokio::select! {
            ready = socket.readable() => {
                if let Err(error) = ready {
                    tracing::error!(%error, "DNS UDP socket failed; no longer serving it");
                    return;
                }
            }
            () = stop.cancelled() => return,
        }
        let count = match socket.try_io(Interest::READABLE, || received.receive(socket.as_fd())) {
            Ok(count) => count,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(error) => {
                tracing::debug!(%error, "DNS UDP receive failed");
                continue;
            }
        };
        let state = handler.state.load_full();
        for datagram in (0..count).filter_map(|index| received.datagram(index)) {
            answer_datagram(&state, &socket, datagram, &mut replies);
        }
        send_replies(&socket, &mut replies).await;
    }
}

/// What to do with one datagram.
#[derive(Debug)]
enum Reply {
    Send(Vec<u8>),
    /// Boxed: the request is large, and this is the slow path.
    Forward(Box<Request>, CacheKey),
    Drop,
}

impl DnsState {
    /// The reply to a datagram: a plain query answered straight from the wire when it can be, anything
    /// else through hickory's types.
    fn reply(&self, datagram: Datagram<'_>) -> Reply {
        if !datagram.truncated
            && let Some(answered) = self.answer_plain(datagram.bytes)
        {
            return Reply::Send(answered.response);
        }
        self.reply_decoded(datagram)
    }

    /// The answer to a plain query (see [`wire`]) that needs neither hickory nor an upstream: a hijacked
    /// name's VIP, or a fresh cached answer that fits the client's payload size. `None` leaves the query
    /// to the generic path, which answers it the same way or differently (NODATA for a hijacked name's
    /// other types, truncation, forwarding).
    fn answer_plain(&self, packet: &[u8]) -> Option<wire::Answered> {
        let query = wire::read_query(packet)?;
        if let Some(vip) = self.table.lookup_labels(query.labels()) {
            let answered = wire::answer_hijacked(&query, vip, self.ttl)?;
            self.metrics.count(answered.query_type, DnsOutcome::Hijacked);
            return Some(answered);
        }
        let mut key = [0; wire::MAX_KEY];
        let response = self.cache.answer_plain(&query, query.cache_key(&mut key))?;
        let query_type: &'static str = RecordType::from(query.query_type()).into();
        self.metrics.count(query_type, DnsOutcome::CacheHit);
        Some(wire::Answered { query_type, response })
    }

    /// A UDP query answered both ways it can be without an upstream, for the fuzz targets (`fuzz/`):
    /// straight from the wire (a hijacked A or AAAA, a cache hit), if that answers, and through
    /// hickory's types (`None` when the query would be forwarded, or dropped). Whenever the wire path
    /// answers, the two answers must say the same.
    #[doc(hidden)]
    pub fn answer_both_ways(&self, bytes: &[u8]) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let fast = self.answer_plain(bytes).map(|answered| answered.response);
        let datagram = Datagram { bytes, sender: SocketAddr::from(([127, 0, 0, 1], 53)), truncated: false };
        let decoded = match self.reply_decoded(datagram) {
            Reply::Send(bytes) => Some(bytes),
            Reply::Forward(..) | Reply::Drop => None,
        };
        (fast, decoded)
    }

    /// Stores `answer` as the upstream's answer to `query` (a whole query message), for the fuzz targets
    /// to have something in the cache. Returns whether it was cached.
    #[doc(hidden)]
    pub fn cache_answer(&self, query: &[u8], answer: &Message) -> bool {
        let Ok(request) =
            Request::from_bytes(query.to_vec(), SocketAddr::from(([127, 0, 0, 1], 53)), Protocol::Udp)
        else {
            return false;
        };
        match self.resolve_now(&request) {
            Resolution::Forward(key) => self.cache.insert(key, answer),
            Resolution::Now(_) => false,
        }
    }

    /// The reply to a datagram, decoded with hickory.
    fn reply_decoded(&self, datagram: Datagram<'_>) -> Reply {
        let parsed = if datagram.truncated {
            None
        } else {
            Request::from_bytes(datagram.bytes.to_vec(), datagram.sender, Protocol::Udp).ok()
        };
        let Some(request) = parsed else {
            return form_error(datagram.bytes).map_or(Reply::Drop, Reply::Send);
        };
        match self.resolve_now(&request) {
            Resolution::Now(answer) => match answer.encode_udp(&request) {
                Ok(bytes) => Reply::Send(bytes),
                Err(error) => {
                    tracing::debug!(client = %datagram.sender, %error, "cannot encode a DNS response");
                    Reply::Drop
                }
            },
            Resolution::Forward(key) => Reply::Forward(Box::new(request), key),
        }
    }
}

/// Answers one datagram: into `replies` when the answer is ready, from a task of its own when it must
/// be forwarded.
fn answer_datagram(
    state: &Arc<DnsState>,
    socket: &Arc<UdpSocket>,
    datagram: Datagram<'_>,
    replies: &mut SendBatch,
) {
    let client = datagram.sender;
    match state.reply(datagram) {
        Reply::Send(bytes) => replies.push(client, bytes),
        Reply::Drop => {}
        Reply::Forward(request, key) => {
            let state = Arc::clone(state);
            let socket = Arc::clone(socket);
            tokio::spawn(async move {
                let answer = forward(&state, &request, key).await;
                match answer.encode_udp(&request) {
                    Ok(bytes) => {
                        if let Err(error) = socket.send_to(&bytes, client).await {
                            tracing::debug!(%client, %error, "DNS response not sent");
                        }
                    }
                    Err(error) => tracing::debug!(%client, %error, "cannot encode a DNS response"),
                }
            });
        }
    }
}

/// Sends the queued answers, waiting for room in the socket's buffer if it is full.
async fn send_replies(socket: &UdpSocket, replies: &mut SendBatch) {
    while !replies.is_empty() {
        match socket.try_io(Interest::WRITABLE, || replies.send(socket.as_fd())) {
            Ok(()) => return,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                if socket.writable().await.is_err() {
                    replies.clear();
                    return;
                }
            }
            // One answer could not be sent (and was dropped); go on with the rest.
            Err(error) => tracing::debug!(%error, "DNS response not sent"),
        }
    }
}

/// FORMERR for a packet with a readable header (its ID and opcode echoed), or nothing.
pub(super) fn form_error(packet: &[u8]) -> Option<Vec<u8>> {
    let header = packet.get(..12)?;
    let mut reply = vec![0u8; 12];
    reply[..2].copy_from_slice(&header[..2]);
    // QR set, the query's opcode kept; RCODE 1 (FORMERR); every count zero.
    reply[2] = 0x80 | (header[2] & 0x78);
    reply[3] = 0x01;
    Some(reply)
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
        let tcp_servers = tokio_util::task::TaskTracker::new();
        for listener in tcp {
            match TcpListener::from_std(listener) {
                Ok(listener) => {
                    tcp_servers.spawn(super::tcp::serve(listener, handler.clone(), stop.clone()));
                }
                Err(error) => tracing::error!(%error, "DNS TCP socket unusable"),
            }
        }
        stop.cancelled().await;
        tcp_servers.close();
        tcp_servers.wait().await;
    });
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;

    use super::*;
    use crate::metrics::Metrics;

    fn state() -> DnsState {
        let text = "dns:\n  hijack:\n    - service: mysql\n    - {name: v6.example, address: \"fd00::7\"}\n    - {name: \"*.internal.example\", address: 127.0.66.9}\n";
        let config = keel_schemas::load(text, "test.yaml", &keel_schemas::MapEnvironment::default()).unwrap();
        DnsState::new(config.dns.as_ref().unwrap(), None, DnsMetrics::new(&Metrics::new())).unwrap()
    }

    fn query(
        id: u16,
        name: &str,
        record_type: RecordType,
        flags: (bool, bool),
        edns: Option<(u16, bool)>,
    ) -> Vec<u8> {
        let mut message = Message::new(id, MessageType::Query, OpCode::Query);
        (message.metadata.recursion_desired, message.metadata.checking_disabled) = flags;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
        if let Some((payload, dnssec_ok)) = edns {
            let mut edns = Edns::new();
            edns.set_max_payload(payload);
            edns.set_dnssec_ok(dnssec_ok);
            message.set_edns(edns);
        }
        message.to_vec().unwrap()
    }

    fn datagram(bytes: &[u8]) -> Datagram<'_> {
        Datagram { bytes, sender: "127.0.0.1:5300".parse().unwrap(), truncated: false }
    }

    fn decoded(state: &DnsState, bytes: &[u8]) -> Vec<u8> {
        match state.reply_decoded(datagram(bytes)) {
            Reply::Send(response) => response,
            other => panic!("the generic path did not answer: {other:?}"),
        }
    }

    #[test]
    fn the_wire_fast_path_answers_as_the_generic_path_does() {
        let state = state();
        let mut checked = 0;
        for name in [
            "mysql.",
            "MySQL.Default.svc.cluster.local.",
            "mysql.default.svc",
            "a.b.Internal.Example.",
            "v6.example.",
        ] {
            for record_type in [RecordType::A, RecordType::AAAA] {
                for flags in [(true, false), (false, true)] {
                    for edns in [None, Some((4096, false)), Some((1232, true)), Some((100, false))] {
                        let bytes = query(0x4b1d, name, record_type, flags, edns);
                        let Some(fast) = state.answer_plain(&bytes) else {
                            // Only a VIP of the other family leaves the fast path.
                            let v6_name = name == "v6.example.";
                            assert_eq!(record_type == RecordType::AAAA, !v6_name, "{name} {record_type}");
                            continue;
                        };
                        let generic = decoded(&state, &bytes);
                        assert_eq!(
                            Message::from_vec(&fast.response).unwrap(),
                            Message::from_vec(&generic).unwrap(),
                            "{name} {record_type} {flags:?} {edns:?}"
                        );
                        // The same bytes, but for the answer's name, which the fast path compresses.
                        let full_name = generic.len() - fast.response.len() + 2;
                        assert_eq!(full_name, name.trim_end_matches('.').len() + 2, "{name}");
                        assert_eq!(fast.query_type, record_type.to_string());
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 40);
    }

    #[test]
    fn anything_unusual_goes_to_the_generic_path() {
        let state = state();
        let fast = |bytes: &[u8]| state.answer_plain(bytes).map(|answered| answered.response);
        let plain = query(7, "mysql.", RecordType::A, (true, false), Some((1232, false)));
        assert!(fast(&plain).is_some());

        for (what, bytes) in [
            ("another type", query(7, "mysql.", RecordType::TXT, (true, false), None)),
            ("a name not hijacked", query(7, "postgres.", RecordType::A, (true, false), None)),
            ("the zone of a wildcard", query(7, "internal.example.", RecordType::A, (true, false), None)),
        ] {
            assert!(fast(&bytes).is_none(), "{what}");
        }
        let mut mutations: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut response_bit = plain.clone();
        response_bit[2] |= 0x80;
        mutations.push(("a response", response_bit));
        let mut notify = plain.clone();
        notify[2] |= 4 << 3;
        mutations.push(("another opcode", notify));
        let mut two_questions = plain.clone();
        two_questions[5] = 2;
        mutations.push(("two questions", two_questions));
        let mut trailing = query(7, "mysql.", RecordType::A, (true, false), None);
        trailing.push(0);
        mutations.push(("bytes after the message", trailing));
        let mut version = plain.clone();
        let opt = version.len() - 11;
        version[opt + 6] = 1;
        mutations.push(("EDNS version 1", version));
        let mut chaos = query(7, "mysql.", RecordType::A, (true, false), None);
        let class = chaos.len() - 1;
        chaos[class] = 3;
        mutations.push(("class CH", chaos));
        let mut odd_label = query(7, "mysql.", RecordType::A, (true, false), None);
        odd_label[13] = b'*';
        mutations.push(("a label with '*'", odd_label));
        let mut subnet = plain.clone();
        let data = subnet.len() - 2;
        subnet.splice(data.., [0, 8, 0, 8, 0, 8, 0, 1, 32, 0, 0, 0]);
        mutations.push(("an EDNS Client Subnet option", subnet));
        let mut cut = plain.clone();
        cut.truncate(plain.len() - 3);
        mutations.push(("a cut OPT record", cut));
        for (what, bytes) in mutations {
            assert!(fast(&bytes).is_none(), "{what}");
        }

        // A compressed question name points elsewhere: the generic path follows it, the fast path does not.
        let mut pointer = plain[..12].to_vec();
        pointer.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        pointer[11] = 0;
        assert!(fast(&pointer).is_none());
        // Harmless options (a cookie here) stay on the fast path, and are not echoed, as hickory does not.
        let mut cookie = plain.clone();
        let data = cookie.len() - 2;
        cookie.splice(data.., [0, 12, 0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            Message::from_vec(&fast(&cookie).unwrap()).unwrap(),
            Message::from_vec(&decoded(&state, &cookie)).unwrap()
        );
    }

    /// An upstream's answer to `name`/`record_type`: `ttls.len()` A records (or one CNAME to
    /// `target.example.` and its A record), an NS in the authority section with its glue, and the
    /// upstream's OPT record; NXDOMAIN with an SOA when `ttls` is empty.
    fn upstream_answer(name: &str, record_type: RecordType, ttls: &[u32]) -> Message {
        use hickory_proto::rr::rdata::{CNAME, NS};
        let owner = Name::from_ascii(name).unwrap();
        let zone = Name::from_ascii("example.").unwrap();
        let mut answer = Message::new(99, MessageType::Response, OpCode::Query);
        answer.metadata.recursion_desired = true;
        answer.metadata.recursion_available = true;
        answer.metadata.authentic_data = true;
        answer.add_query(Query::query(owner.clone(), record_type));
        if ttls.is_empty() {
            answer.metadata.response_code = ResponseCode::NXDomain;
            let soa =
                SOA::new(zone.clone(), Name::from_ascii("hostmaster.example.").unwrap(), 1, 60, 60, 60, 45);
            answer.authorities.push(Record::from_rdata(zone, 50, RData::SOA(soa)));
        } else if record_type == RecordType::CNAME {
            let target = Name::from_ascii("target.example.").unwrap();
            answer.answers.push(Record::from_rdata(owner, ttls[0], RData::CNAME(CNAME(target.clone()))));
            answer.answers.push(Record::from_rdata(target, ttls[0], RData::A(A::new(10, 0, 0, 9))));
        } else {
            for (index, ttl) in ttls.iter().enumerate() {
                let address = A::new(10, 1, (index / 250) as u8, (index % 250) as u8 + 1);
                answer.answers.push(Record::from_rdata(owner.clone(), *ttl, RData::A(address)));
            }
            let server = Name::from_ascii("ns1.example.").unwrap();
            answer.authorities.push(Record::from_rdata(zone, 3600, RData::NS(NS(server.clone()))));
            answer.additionals.push(Record::from_rdata(server, 3600, RData::A(A::new(10, 0, 0, 53))));
        }
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        answer.set_edns(edns);
        answer
    }

    /// `state` with every answer stored as the upstream's, under both DNSSEC-OK and not.
    fn cache_answers(state: &DnsState, answers: &[(&str, RecordType, Message)]) {
        for (name, record_type, answer) in answers {
            for dnssec_ok in [false, true] {
                let asked = query(1, name, *record_type, (true, false), Some((1232, dnssec_ok)));
                assert!(state.cache_answer(&asked, answer), "{name} {record_type} cached");
            }
        }
    }

    fn ttls(bytes: &[u8]) -> Vec<u32> {
        Message::from_vec(bytes).unwrap().all_sections().map(|record| record.ttl).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn cache_hits_from_the_wire_answer_as_the_generic_path_does() {
        let state = state();
        let answers = [
            ("fwd.example.", RecordType::A, upstream_answer("fwd.example.", RecordType::A, &[300, 100])),
            (
                "alias.example.",
                RecordType::CNAME,
                upstream_answer("alias.example.", RecordType::CNAME, &[200]),
            ),
            ("gone.example.", RecordType::AAAA, upstream_answer("gone.example.", RecordType::AAAA, &[])),
        ];
        cache_answers(&state, &answers);
        tokio::time::advance(std::time::Duration::from_secs(7)).await;
        let mut checked = 0;
        for (name, record_type, _) in &answers {
            for asked in [name.to_string(), name.to_uppercase()] {
                for flags in [(true, false), (false, true)] {
                    for edns in [None, Some((4096, false)), Some((1232, true)), Some((100, false))] {
                        let bytes = query(0x7e57, &asked, *record_type, flags, edns);
                        let fast =
                            state.answer_plain(&bytes).expect("a fresh hit answers from the wire").response;
                        let generic = decoded(&state, &bytes);
                        assert_eq!(
                            Message::from_vec(&fast).unwrap(),
                            Message::from_vec(&generic).unwrap(),
                            "{asked} {record_type} {flags:?} {edns:?}"
                        );
                        // The client's question, as it wrote it, and its ID.
                        assert_eq!(fast[..2], [0x7e, 0x57]);
                        assert_eq!(fast[12..12 + asked.len() + 1], generic[12..12 + asked.len() + 1]);
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 48);

        // Every TTL is lowered by the 7 s spent in the cache, and none outlives the answer's freshness
        // (100 s for fwd.example., its smallest TTL; 45 s, the SOA minimum, for gone.example.).
        let fwd = query(1, "fwd.example.", RecordType::A, (true, false), None);
        assert_eq!(ttls(&state.answer_plain(&fwd).unwrap().response), [93, 93, 93, 93]);
        let gone = query(1, "gone.example.", RecordType::AAAA, (true, false), None);
        assert_eq!(ttls(&state.answer_plain(&gone).unwrap().response), [38]);
        tokio::time::advance(std::time::Duration::from_secs(40)).await;
        assert!(state.answer_plain(&gone).is_none(), "expired: the generic path forwards it");
        assert!(matches!(state.reply_decoded(datagram(&gone)), Reply::Forward(..)));
        assert_eq!(ttls(&state.answer_plain(&fwd).unwrap().response), [53, 53, 53, 53]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cached_answer_too_large_for_the_client_is_truncated_by_the_generic_path() {
        let state = state();
        let large = upstream_answer("big.example.", RecordType::A, &[60; 40]);
        cache_answers(&state, &[("big.example.", RecordType::A, large)]);
        let plain = query(3, "big.example.", RecordType::A, (true, false), None);
        assert!(state.answer_plain(&plain).is_none(), "over 512 bytes without EDNS");
        let truncated = decoded(&state, &plain);
        assert!(truncated.len() <= 512);
        assert!(Message::from_vec(&truncated).unwrap().metadata.truncation, "TC set");
        let edns = query(3, "big.example.", RecordType::A, (true, false), Some((4096, false)));
        let whole = state.answer_plain(&edns).expect("fits 4096 bytes").response;
        assert!(whole.len() > 512);
        assert_eq!(Message::from_vec(&whole).unwrap().answers.len(), 40);
    }

    #[test]
    fn a_name_hijacked_after_its_answer_was_cached_is_answered_as_hijacked() {
        let metrics = DnsMetrics::new(&Metrics::new());
        let load = |text: &str| {
            keel_schemas::load(text, "test.yaml", &keel_schemas::MapEnvironment::default()).unwrap()
        };
        let before = load("dns:\n  upstreams: [127.0.0.1:9]\n");
        let before = DnsState::new(before.dns.as_ref().unwrap(), None, metrics.clone()).unwrap();
        let answers = [
            (
                "mysql.default.svc.cluster.local.",
                RecordType::A,
                upstream_answer("mysql.default.svc.cluster.local.", RecordType::A, &[300]),
            ),
            (
                "mysql.default.svc.cluster.local.",
                RecordType::TXT,
                upstream_answer("mysql.default.svc.cluster.local.", RecordType::TXT, &[300]),
            ),
        ];
        cache_answers(&before, &answers);
        let after = load("dns:\n  upstreams: [127.0.0.1:9]\n  hijack:\n    - service: mysql\n");
        let after = DnsState::new(after.dns.as_ref().unwrap(), Some(&before), metrics).unwrap();
        assert_eq!(after.cache_len(), before.cache_len(), "the cache is kept across the reload");

        let a = query(1, "mysql.default.svc.cluster.local.", RecordType::A, (true, false), None);
        let forwarded = before.answer_plain(&a).unwrap().response;
        assert_eq!(Message::from_vec(&forwarded).unwrap().answers[0].data, RData::A(A::new(10, 1, 0, 1)));
        let hijacked = Message::from_vec(&after.answer_plain(&a).unwrap().response).unwrap();
        assert!(
            matches!(hijacked.answers[0].data, RData::A(address) if address.0.octets()[..3] == [127, 0, 66])
        );
        let txt = query(1, "mysql.default.svc.cluster.local.", RecordType::TXT, (true, false), None);
        assert!(after.answer_plain(&txt).is_none(), "a hijacked name's TXT is the generic path's");
        let nodata = Message::from_vec(&decoded(&after, &txt)).unwrap();
        assert!(nodata.answers.is_empty());
        assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
    }
}
