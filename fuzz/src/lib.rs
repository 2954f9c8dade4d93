//! Keel's fuzz targets: each function takes bytes where Keel takes them from outside, and panics only
//! when Keel gets something wrong. The binaries in `fuzz_targets/` hand them to libFuzzer (`run.sh`);
//! `tests/corpus.rs` replays the kept corpus and every crash found so far through them on stable Rust.
//!
//! | target | where the bytes come from | what must hold besides not crashing |
//! | --- | --- | --- |
//! | `config` | a keel.yaml file or a snapshot | - |
//! | `tunnel_frames` | a tunnel peer | a decoded frame encodes and decodes to itself |
//! | `dns_query` | a DNS client | the wire path (hijacked names, cache hits) answers exactly as the decoding path does |
//! | `rest_body` | an API client | a bad request is a 4xx, never a 5xx; nothing hangs |
//! | `proxy_stream` | a proxy's stream to the control plane | 200 or 400; the session ends with the body |
//! | `snapshot_lines` | the control plane's stream to a proxy | - |
//! | `rfc2136_answer` | a DNS server's answer to a signed update | only a correctly signed answer confirms |
//! | `netlink_dump` | the kernel (rtnetlink) | - |
//! | `stun_response` | a STUN server | - |

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use keel_control_plane::auth::Tokens;
use keel_control_plane::stream::PeerAddr;
use keel_control_plane::{ControlPlane, Settings};
use keel_proxy::dns::server::DnsState;
use keel_proxy::metrics::{DnsMetrics, Metrics};
use keel_proxy::tunnel::frame;
use keel_schemas::MapEnvironment;
use keel_schemas::resource::Kind;
use keel_schemas::stream::ServerMessage;
use tower_service::Service;

/// keel.yaml text, loaded and validated as the proxy loads its file.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = keel_schemas::load(text, "fuzz.yaml", &MapEnvironment::default());
}

/// Bytes from a tunnel peer: read as the router reads a connection's first frame, and as a stream of
/// frames. Every frame that decodes must encode to bytes that decode to the same frame.
pub fn tunnel_frames(data: &[u8]) {
    let _ = ready(frame::read_hello(&mut &data[..]));
    let mut rest = data;
    while let Ok(Some((decoded, used))) = frame::parse_frame(rest) {
        let encoded = decoded.encode();
        match frame::parse_frame(&encoded) {
            Ok(Some((again, length))) => {
                assert_eq!(again, decoded, "a frame changed in an encode and decode");
                assert_eq!(length, encoded.len(), "an encoded frame is not read whole");
            }
            other => panic!("{decoded:?} encodes to bytes that do not decode: {other:?}"),
        }
        rest = &rest[used..];
    }
}

/// A UDP DNS query to a sidecar with hijacked names (IPv4 and IPv6 VIPs, a wildcard, service names).
/// When the fast path answers, the decoding path must give the same answer.
pub fn dns_query(data: &[u8]) {
    static STATE: OnceLock<DnsState> = OnceLock::new();
    let state = STATE.get_or_init(|| {
        let text = "dns:\n  listen: [127.0.0.1:0]\n  upstreams: [127.0.0.1:9]\n  cache: {min_ttl: 720h, max_ttl: 720h, negative_ttl: 720h}\n  hijack:\n    - service: mysql\n    - {name: v6.example, address: \"fd00::7\"}\n    - {name: \"*.internal.example\", address: 127.0.66.9}\n    - {name: web.default.svc.cluster.local, address: 127.0.66.10}\n";
        let config = keel_schemas::load(text, "fuzz.yaml", &MapEnvironment::default()).expect("the fuzz config loads");
        let dns = config.dns.as_ref().expect("the fuzz config has dns");
        let state = DnsState::new(dns, None, DnsMetrics::new(&Metrics::new())).expect("the fuzz DNS state builds");
        cache_upstream_answers(&state);
        state
    });
    let (fast, decoded) = state.answer_both_ways(data);
    let Some(fast) = fast else { return };
    let Some(decoded) = decoded else {
        panic!("the fast path answered a query the decoding path does not answer: {fast:?}")
    };
    let parse = |bytes: &[u8]| hickory_proto::op::Message::from_vec(bytes).map_err(|error| error.to_string());
    assert_eq!(parse(&fast), parse(&decoded), "the fast path's answer differs from the decoding path's");
}

/// Fills the fuzz state's cache with what an upstream could have answered: `fwd.example.` A (two
/// addresses, an NS and its glue) and `gone.example.` AAAA (NXDOMAIN with an SOA), each asked with and
/// without the DO bit, so that queries for them are answered from the cache both ways. The fuzz config
/// keeps every answer for 30 days (`min_ttl`), so they stay fresh however long the fuzzer runs.
fn cache_upstream_answers(state: &DnsState) {
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::rdata::{A, NS, SOA};
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    let name = |text: &str| Name::from_ascii(text).expect("a valid name");
    let question = |owner: &str, record_type: RecordType, dnssec_ok: bool| {
        let mut query = Message::new(1, MessageType::Query, OpCode::Query);
        query.add_query(Query::query(name(owner), record_type));
        let mut edns = Edns::new();
        edns.set_dnssec_ok(dnssec_ok);
        query.set_edns(edns);
        query
    };
    let mut found = question("fwd.example.", RecordType::A, false);
    found.metadata.message_type = MessageType::Response;
    found.metadata.recursion_available = true;
    for last in [1, 2] {
        found.answers.push(Record::from_rdata(name("fwd.example."), 300, RData::A(A::new(10, 0, 0, last))));
    }
    found.authorities.push(Record::from_rdata(name("example."), 3600, RData::NS(NS(name("ns1.example.")))));
    found.additionals.push(Record::from_rdata(name("ns1.example."), 3600, RData::A(A::new(10, 0, 0, 53))));
    let mut gone = question("gone.example.", RecordType::AAAA, false);
    gone.metadata.message_type = MessageType::Response;
    gone.metadata.response_code = ResponseCode::NXDomain;
    let month = 30 * 86_400;
    let soa = SOA::new(name("example."), name("hostmaster.example."), 1, 60, 60, 60, month);
    gone.authorities.push(Record::from_rdata(name("example."), month, RData::SOA(soa)));
    for (owner, record_type, answer) in
        [("fwd.example.", RecordType::A, found), ("gone.example.", RecordType::AAAA, gone)]
    {
        for dnssec_ok in [false, true] {
            let query = question(owner, record_type, dnssec_ok).to_vec().expect("the query encodes");
            assert!(state.cache_answer(&query, &answer), "the fuzz cache takes {owner}");
        }
    }
}

/// The control plane's side of a proxy's stream: NDJSON lines, each read as the proxy reads it, and a
/// snapshot merged with a bootstrap file (node, admin, a probe of its own) and validated as the proxy
/// does before applying it.
pub fn snapshot_lines(data: &[u8]) {
    static BOOTSTRAP: OnceLock<keel_schemas::Config> = OnceLock::new();
    let bootstrap = BOOTSTRAP.get_or_init(|| {
        let text = "node: {id: fuzz}\nadmin: {address: 127.0.0.1:9901}\nprobes:\n  - name: boot\n    tcp: {targets: [\"127.0.0.1:9\"]}\n";
        keel_schemas::load(text, "bootstrap.yaml", &MapEnvironment::default())
            .expect("the fuzz bootstrap loads")
            .config()
            .clone()
    });
    for line in data.split(|&byte| byte == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(ServerMessage::Snapshot { version, nonce: _, config }) = serde_json::from_slice(line) else {
            continue;
        };
        let _ = keel_proxy::control_plane::load_snapshot(
            &config,
            &version,
            bootstrap,
            &MapEnvironment::default(),
        );
    }
}

/// A DNS server's answer to an RFC 2136 update signed with TSIG. The answer's ID is taken as the
/// update's, so that the TSIG checks are reached; without the key, no answer may confirm the update.
pub fn rfc2136_answer(data: &[u8]) {
    static SERVER: OnceLock<keel_ddns::rfc2136::Server> = OnceLock::new();
    let server = SERVER.get_or_init(|| {
        let address = SocketAddr::from(([127, 0, 0, 1], 53));
        keel_ddns::rfc2136::Server::new(address, "fuzz-key.", "c2VjcmV0LWtleS1mb3ItZnV6emluZw==")
            .expect("the fuzz key is base64")
    });
    let id = data.get(..2).map_or(0, |id| u16::from_be_bytes([id[0], id[1]]));
    let request_mac = [0x5a; 32];
    let confirmed = server.check_answer(data, id, &request_mac);
    assert!(confirmed.is_err(), "an answer made without the key confirmed an update");
}

/// A message from the kernel's address dump.
pub fn netlink_dump(data: &[u8]) {
    let mut addresses = Vec::new();
    let _ = keel_proxy::reporter::netlink::parse(data, &mut addresses);
}

/// A STUN server's response. The transaction ID expected is the one the message carries (bytes 8 to
/// 20), so that the matching path is reached as well as the refusing one.
pub fn stun_response(data: &[u8]) {
    let mut transaction = [0u8; 12];
    if let Some(id) = data.get(8..20) {
        transaction.copy_from_slice(id);
    }
    let _ = keel_proxy::reporter::stun::parse(data, &transaction);
}

const OPERATOR: &str = "fuzz-operator";
const PROXY: &str = "fuzz-proxy";
const API: &str = "/apis/edge.example.com/v1";
/// Longest wait for any one request: the control plane answers every one of these in milliseconds.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// A request body to the control plane's REST API (and the seeds' endpoints). The first byte chooses
/// the kind and the request; the rest is the body. Whatever the body, the answer is a success or a
/// 4xx with a reason, never a 5xx, and it comes. What a request creates is deleted again, so that the
/// store stays small over millions of runs.
pub fn rest_body(data: &[u8]) {
    let Some((&choice, body)) = data.split_first() else { return };
    let kind = Kind::ALL[usize::from(choice) % Kind::ALL.len()];
    let collection = match kind.namespaced() {
        true => format!("{API}/namespaces/fuzz/{}", kind.plural()),
        false => format!("{API}/{}", kind.plural()),
    };
    let (method, path, token, content_type) = match choice / 16 {
        0..=5 => (Method::POST, collection.clone(), OPERATOR, "application/json"),
        6..=8 => (Method::PUT, format!("{collection}/fuzz"), OPERATOR, "application/json"),
        9..=11 => (Method::PATCH, format!("{collection}/fuzz"), OPERATOR, "application/merge-patch+json"),
        12 => (Method::PUT, format!("{collection}/fuzz/status"), OPERATOR, "application/json"),
        13 => (Method::POST, "/api/v1/public-ip".to_string(), PROXY, "application/json"),
        14 => (Method::POST, "/api/v1/heartbeat".to_string(), PROXY, "application/json"),
        _ => {
            let kind = ["hosts", "pods", "service"][usize::from(choice) % 3];
            (Method::POST, format!("/api/v1/test-results/{kind}"), PROXY, "application/json")
        }
    };
    let request = Request::builder()
        .method(method.clone())
        .uri(&path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body.to_vec()))
        .expect("a valid request");
    let (status, answer) = control_plane().call(request);
    assert!(
        !status.is_server_error(),
        "{method} {path} answered {status}: {}",
        String::from_utf8_lossy(&answer)
    );
    if status == StatusCode::CREATED
        && method == Method::POST
        && let Ok(created) = serde_json::from_slice::<serde_json::Value>(&answer)
        && let Some(name) = created["metadata"]["name"].as_str()
    {
        let request = Request::builder()
            .method(Method::DELETE)
            .uri(format!("{collection}/{name}"))
            .header(header::AUTHORIZATION, format!("Bearer {OPERATOR}"))
            .body(Body::empty())
            .expect("a valid request");
        let (status, answer) = control_plane().call(request);
        assert!(
            status.is_success(),
            "deleting {name} answered {status}: {}",
            String::from_utf8_lossy(&answer)
        );
    }
}

/// The body of a proxy's stream to the control plane: a hello, then ACKs, NACKs and status reports, one
/// JSON object per line. The stream is answered 200 (and its snapshots sent) or refused with 400, and
/// the session ends when the body does.
pub fn proxy_stream(data: &[u8]) {
    let request = Request::builder()
        .method(Method::POST)
        .uri(keel_schemas::stream::STREAM_PATH)
        .header(header::AUTHORIZATION, format!("Bearer {PROXY}"))
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from(data.to_vec()))
        .expect("a valid request");
    let (status, answer) = control_plane().call(request);
    assert!(
        matches!(status, StatusCode::OK | StatusCode::BAD_REQUEST),
        "the stream answered {status}: {}",
        String::from_utf8_lossy(&answer)
    );
}

/// What the control plane holds before the first run: an object named `fuzz` of every kind, which the
/// PUT and PATCH requests change.
const EXISTING: [(Kind, &str); 10] = [
    (Kind::Listener, r#"{"address": "127.0.0.1:8080", "cluster": "web", "node_selector": {"app": "web"}}"#),
    (Kind::Cluster, r#"{"endpoints": ["127.0.0.1:9000"], "node_selector": {"app": "web"}}"#),
    (
        Kind::DnsZone,
        r#"{"listen": ["127.0.0.2:53"], "namespace": "fuzz", "ip_range": "127.0.66.0/24", "upstreams": ["127.0.0.1:5353"]}"#,
    ),
    (Kind::PublishedService, r#"{"local": "127.0.0.1:3306", "secret_file": "/run/keel/secret"}"#),
    (Kind::VisitedService, r#"{"secret_file": "/run/keel/secret", "port": 3306}"#),
    (
        Kind::Router,
        r#"{"listen": "0.0.0.0:7000", "address": "r1.example:7000", "token_file": "/run/keel/token"}"#,
    ),
    (Kind::Node, "{}"),
    (
        Kind::DnsRecord,
        r#"{"zone": "example.com", "name": "gw", "type": "AAAA", "ttl": "120s", "address_from": {"node": "gw-1"}, "provider": "fuzz"}"#,
    ),
    (
        Kind::DnsProvider,
        r#"{"cloudflare": {"api_token_file": "/run/keel/cf", "zone_id": "023e105f4ecef8ad9ca31a8372d0c353"}}"#,
    ),
    (Kind::Probe, r#"{"tcp": {"targets": ["127.0.0.1:22"]}}"#),
];

/// A control plane with a database of its own, started once per process, called without a socket.
struct ControlPlaneUnderTest {
    runtime: tokio::runtime::Runtime,
    app: axum::Router,
    _running: ControlPlane,
    _directory: std::path::PathBuf,
}

/// The database's directory: in memory where there is a tmpfs (SQLite's syncs would otherwise be most
/// of each run), named after this process. A process that runs the targets ends without dropping its
/// statics (libFuzzer exits), so each new one first removes the directories of processes that are gone.
fn database_directory() -> std::path::PathBuf {
    let parent = match std::path::Path::new("/dev/shm").is_dir() {
        true => std::path::PathBuf::from("/dev/shm"),
        false => std::env::temp_dir(),
    };
    if let Ok(entries) = std::fs::read_dir(&parent) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix("keel-fuzz-") else { continue };
            if !std::path::Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let directory = parent.join(format!("keel-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).expect("a directory for the fuzz database");
    directory
}

fn control_plane() -> &'static ControlPlaneUnderTest {
    static CONTROL_PLANE: OnceLock<ControlPlaneUnderTest> = OnceLock::new();
    CONTROL_PLANE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let directory = database_directory();
        let mut settings = Settings::new(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            directory.join("fuzz.db"),
            Tokens::new(vec![OPERATOR.into()], vec![PROXY.into()]),
        );
        (settings.debounce, settings.node_flush_interval) = (Duration::from_millis(10), Duration::from_millis(50));
        let running = runtime.block_on(ControlPlane::start(settings)).expect("the control plane starts");
        let app = keel_control_plane::api::router(Arc::clone(&running.state));
        let control_plane = ControlPlaneUnderTest { runtime, app, _running: running, _directory: directory };
        for (kind, spec) in EXISTING {
            let mut metadata = serde_json::json!({"name": "fuzz"});
            let mut path = format!("{API}/{}", kind.plural());
            if kind.namespaced() {
                metadata["namespace"] = "fuzz".into();
                path = format!("{API}/namespaces/fuzz/{}", kind.plural());
            }
            let spec: serde_json::Value = serde_json::from_str(spec).expect("a JSON spec");
            let object = serde_json::json!({"apiVersion": "edge.example.com/v1", "kind": kind.name(), "metadata": metadata, "spec": spec});
            let request = Request::builder()
                .method(Method::POST)
                .uri(path)
                .header(header::AUTHORIZATION, format!("Bearer {OPERATOR}"))
                .body(Body::from(object.to_string()))
                .expect("a valid request");
            let (status, answer) = control_plane.call(request);
            assert_eq!(status, StatusCode::CREATED, "{kind:?}: {}", String::from_utf8_lossy(&answer));
        }
        control_plane
    })
}

impl ControlPlaneUnderTest {
    /// One request through the API's router, from a client on loopback: its status and its whole body.
    fn call(&self, mut request: Request<Body>) -> (StatusCode, Vec<u8>) {
        request.extensions_mut().insert(PeerAddr(SocketAddr::from(([127, 0, 0, 1], 40000))));
        let mut app = self.app.clone();
        let what = format!("{} {}", request.method(), request.uri());
        self.runtime.block_on(async move {
            let exchange = async {
                let response = app.call(request).await.expect("the router is infallible");
                let status = response.status();
                let body = response.into_body().collect().await.map(|body| body.to_bytes().to_vec());
                (status, body.unwrap_or_default())
            };
            tokio::time::timeout(REQUEST_DEADLINE, exchange)
                .await
                .unwrap_or_else(|_| panic!("{what} was not answered within {REQUEST_DEADLINE:?}"))
        })
    }
}

/// The output of a future that needs nothing but the bytes it was given.
fn ready<F: Future>(future: F) -> F::Output {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("reading from memory waited"),
    }
}
