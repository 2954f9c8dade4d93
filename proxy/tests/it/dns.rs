//! The DNS server over real UDP and TCP sockets: hijacked names, forwarding, the cache, truncation,
//! EDNS, and state swaps. A fake upstream resolver counts what reaches it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use keel_proxy::dns::server::{DnsServer, DnsState};
use keel_schemas::MapEnvironment;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A fake upstream resolver on UDP and TCP: answers `big.example.` with 40 A records, `nx.example.`
/// with NXDOMAIN and an SOA, `short.example.` with TTL 1, and anything else with one A record.
struct FakeUpstream {
    addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    silent: Arc<AtomicBool>,
}

fn upstream_answer(query: &Message) -> Message {
    let mut answer = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
    answer.queries = query.queries.clone();
    answer.metadata.recursion_available = true;
    let name = query.queries[0].name().clone();
    match name.to_ascii().as_str() {
        "big.example." => {
            for i in 0..40 {
                let data = RData::A(A::from(Ipv4Addr::new(10, 1, 0, i)));
                answer.answers.push(Record::from_rdata(name.clone(), 300, data));
            }
        }
        "nx.example." => {
            answer.metadata.response_code = ResponseCode::NXDomain;
            let zone = Name::from_ascii("example.").unwrap();
            let soa = SOA::new(zone.clone(), Name::from_ascii("h.example.").unwrap(), 1, 60, 60, 60, 120);
            answer.authorities.push(Record::from_rdata(zone, 300, RData::SOA(soa)));
        }
        other => {
            let ttl = if other == "short.example." { 1 } else { 300 };
            answer.answers.push(Record::from_rdata(
                name.clone(),
                ttl,
                RData::A(A::from(Ipv4Addr::new(10, 0, 0, 1))),
            ));
        }
    }
    if query.edns.is_some() {
        answer.set_edns(Edns::new());
    }
    answer
}

impl FakeUpstream {
    async fn start() -> FakeUpstream {
        // UDP and TCP on one port: retry when the port the kernel gave for UDP is taken for TCP.
        let mut tries = 0;
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            match TcpListener::bind(udp.local_addr().unwrap()).await {
                Ok(tcp) => break (udp, tcp),
                Err(_) if tries < 16 => tries += 1,
                Err(error) => panic!("no port free for both UDP and TCP: {error}"),
            }
        };
        let addr = udp.local_addr().unwrap();
        let queries = Arc::new(AtomicUsize::new(0));
        let silent = Arc::new(AtomicBool::new(false));
        let (count, quiet) = (Arc::clone(&queries), Arc::clone(&silent));
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 65535];
            while let Ok((length, peer)) = udp.recv_from(&mut buffer).await {
                count.fetch_add(1, Ordering::SeqCst);
                if quiet.load(Ordering::SeqCst) {
                    continue;
                }
                let query = Message::from_vec(&buffer[..length]).unwrap();
                let mut answer = upstream_answer(&query);
                // Like a real server: a big answer over UDP is truncated.
                if answer.answers.len() > 10 {
                    answer.answers.clear();
                    answer.metadata.truncation = true;
                }
                udp.send_to(&answer.to_vec().unwrap(), peer).await.unwrap();
            }
        });
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = tcp.accept().await {
                let length = stream.read_u16().await.unwrap();
                let mut buffer = vec![0u8; usize::from(length)];
                stream.read_exact(&mut buffer).await.unwrap();
                let answer = upstream_answer(&Message::from_vec(&buffer).unwrap()).to_vec().unwrap();
                stream.write_u16(answer.len() as u16).await.unwrap();
                stream.write_all(&answer).await.unwrap();
            }
        });
        FakeUpstream { addr, queries, silent }
    }
}

fn state(yaml: &str, previous: Option<&DnsState>) -> DnsState {
    let config =
        keel_schemas::load(yaml, "keel.yaml", &MapEnvironment::default()).unwrap_or_else(|e| panic!("{e}"));
    let metrics = keel_proxy::metrics::Metrics::new();
    DnsState::new(config.dns.as_ref().unwrap(), previous, keel_proxy::metrics::DnsMetrics::new(&metrics))
        .unwrap()
}

fn config(upstream: SocketAddr, hijack: &str) -> String {
    format!(
        "dns:\n  listen: [\"127.0.0.1:0\"]\n  upstreams: [\"{upstream}\"]\n  upstream_timeout: 300ms\n  hijack:\n{hijack}"
    )
}

const HIJACK: &str = "    - {service: mysql, address: 127.0.66.5}\n    - {name: \"*.internal.example\", address: 127.0.66.6}\n";

/// A server with two workers, so that the tests also cover the sockets shared through SO_REUSEPORT.
async fn start(upstream: SocketAddr, hijack: &str) -> DnsServer {
    DnsServer::start(&["127.0.0.1:0".parse().unwrap()], 2, state(&config(upstream, hijack), None))
        .await
        .unwrap()
}

pub fn query(name: &str, record_type: RecordType, edns: bool) -> Message {
    let mut message = Message::new(fastrand::u16(..), MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
    if edns {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        message.set_edns(edns);
    }
    message
}

pub async fn ask_udp(server: SocketAddr, question: &Message) -> Message {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(&question.to_vec().unwrap(), server).await.unwrap();
    let mut buffer = vec![0u8; 65535];
    let (length, _) =
        tokio::time::timeout(Duration::from_secs(3), socket.recv_from(&mut buffer)).await.unwrap().unwrap();
    let answer = Message::from_vec(&buffer[..length]).unwrap();
    assert_eq!(answer.metadata.id, question.metadata.id, "the reply echoes the ID");
    assert_eq!(answer.queries, question.queries, "the reply echoes the question");
    answer
}

async fn ask_tcp(server: SocketAddr, question: &Message) -> Message {
    let mut stream = TcpStream::connect(server).await.unwrap();
    send_tcp(&mut stream, &question.to_vec().unwrap()).await;
    receive_tcp(&mut stream).await
}

/// Writes one DNS message over TCP: its length, then its bytes.
async fn send_tcp(stream: &mut TcpStream, bytes: &[u8]) {
    stream.write_u16(bytes.len() as u16).await.unwrap();
    stream.write_all(bytes).await.unwrap();
}

/// Reads one DNS message from TCP.
async fn receive_tcp(stream: &mut TcpStream) -> Message {
    let length = stream.read_u16().await.unwrap();
    let mut buffer = vec![0u8; usize::from(length)];
    stream.read_exact(&mut buffer).await.unwrap();
    Message::from_vec(&buffer).unwrap()
}

pub fn addresses(answer: &Message) -> Vec<String> {
    answer
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn hijacked_names_answer_in_every_form_and_case() {
    let upstream = FakeUpstream::start().await;
    let server = start(upstream.addr, HIJACK).await;
    let addr = server.local_addrs[0];
    for name in ["mysql.", "MySQL.default.", "mysql.default.svc.", "mysql.default.svc.cluster.local."] {
        let answer = ask_udp(addr, &query(name, RecordType::A, false)).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError, "{name}");
        assert_eq!(addresses(&answer), ["127.0.66.5"], "{name}");
        assert_eq!(answer.answers[0].ttl, 30);
    }
    let wildcard = ask_udp(addr, &query("db.eu.internal.example.", RecordType::A, false)).await;
    assert_eq!(addresses(&wildcard), ["127.0.66.6"]);
    assert_eq!(upstream.queries.load(Ordering::SeqCst), 0, "hijacked names never reach the upstream");
    server.shutdown().await;
}

#[tokio::test]
async fn other_types_for_a_hijacked_name_are_nodata_with_an_soa() {
    let upstream = FakeUpstream::start().await;
    let server = start(upstream.addr, HIJACK).await;
    for record_type in [RecordType::AAAA, RecordType::TXT, RecordType::MX] {
        let answer =
            ask_udp(server.local_addrs[0], &query("mysql.default.svc.cluster.local.", record_type, true))
                .await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError, "{record_type}: never NXDOMAIN");
        assert!(answer.answers.is_empty(), "{record_type}");
        assert!(matches!(answer.authorities.first().map(|r| &r.data), Some(RData::SOA(_))), "{record_type}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn forwarded_answers_are_cached_positive_and_negative() {
    let upstream = FakeUpstream::start().await;
    let server = start(upstream.addr, HIJACK).await;
    let addr = server.local_addrs[0];
    for _ in 0..3 {
        let answer = ask_udp(addr, &query("www.example.", RecordType::A, true)).await;
        assert_eq!(addresses(&answer), ["10.0.0.1"]);
        assert!(answer.metadata.recursion_available);
    }
    assert_eq!(upstream.queries.load(Ordering::SeqCst), 1, "repeats are cache hits");
    for _ in 0..3 {
        let answer = ask_udp(addr, &query("nx.example.", RecordType::A, true)).await;
        assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
    }
    assert_eq!(upstream.queries.load(Ordering::SeqCst), 2, "NXDOMAIN with an SOA is cached too");
    assert!(server.state().cache_len() <= 2);
    server.shutdown().await;
}

#[tokio::test]
async fn a_stale_answer_is_served_when_every_upstream_fails() {
    let upstream = FakeUpstream::start().await;
    let server = start(upstream.addr, HIJACK).await;
    let addr = server.local_addrs[0];
    assert_eq!(addresses(&ask_udp(addr, &query("short.example.", RecordType::A, true)).await), ["10.0.0.1"]);
    upstream.silent.store(true, Ordering::SeqCst);
    // The answer's TTL is 1 s: let it expire (the cache measures whole seconds).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let stale = ask_udp(addr, &query("short.example.", RecordType::A, true)).await;
    assert_eq!(addresses(&stale), ["10.0.0.1"]);
    assert_eq!(stale.answers[0].ttl, 30, "stale answers carry TTL 30 (RFC 8767)");
    let never_seen = ask_udp(addr, &query("other.example.", RecordType::A, true)).await;
    assert_eq!(never_seen.metadata.response_code, ResponseCode::ServFail);
    server.shutdown().await;
}

/// Fault: the first upstream black-holed (it reads queries and never answers). The first query waits
/// out the upstream timeout and is answered by the second; the first upstream is then passed over, so
/// the queries after it are answered at once instead of each paying the timeout.
#[tokio::test]
async fn a_black_holed_upstream_costs_one_query_the_timeout_not_every_query() {
    let black_hole = FakeUpstream::start().await;
    black_hole.silent.store(true, Ordering::SeqCst);
    let working = FakeUpstream::start().await;
    let yaml = format!(
        "dns:\n  listen: [\"127.0.0.1:0\"]\n  upstreams: [\"{}\", \"{}\"]\n  upstream_timeout: 300ms\n  hijack:\n{HIJACK}",
        black_hole.addr, working.addr
    );
    let server = DnsServer::start(&["127.0.0.1:0".parse().unwrap()], 2, state(&yaml, None)).await.unwrap();
    let addr = server.local_addrs[0];
    let mut latencies = Vec::new();
    for index in 0..50 {
        let started = std::time::Instant::now();
        let answer = ask_udp(addr, &query(&format!("name-{index}.example."), RecordType::A, true)).await;
        assert_eq!(addresses(&answer), ["10.0.0.1"], "query {index}");
        latencies.push(started.elapsed());
    }
    let waited = latencies.iter().filter(|latency| **latency >= Duration::from_millis(300)).count();
    let mut after_first = latencies[1..].to_vec();
    after_first.sort();
    eprintln!(
        "black-holed upstream: first query {:?}, the next 49: median {:?}, max {:?}",
        latencies[0],
        after_first[after_first.len() / 2],
        after_first[after_first.len() - 1]
    );
    assert_eq!(waited, 1, "queries that waited for the black hole: {latencies:?}");
    assert!(latencies[0] >= Duration::from_millis(300), "{latencies:?}");
    assert!(after_first[after_first.len() - 1] < Duration::from_millis(150), "{after_first:?}");
    assert_eq!(black_hole.queries.load(Ordering::SeqCst), 1, "the black hole was asked again");
    server.shutdown().await;
}

#[tokio::test]
async fn large_answers_truncate_for_udp_clients_without_edns_and_come_whole_over_tcp() {
    let upstream = FakeUpstream::start().await;
    let server = start(upstream.addr, HIJACK).await;
    let addr = server.local_addrs[0];
    // Keel fetched the whole answer from upstream over TCP after the upstream's TC.
    let plain = ask_udp(addr, &query("big.example.", RecordType::A, false)).await;
    assert!(plain.metadata.truncation, "more than 512 bytes for a client without EDNS");
    assert!(plain.edns.is_none(), "no OPT for a client that sent none");
    let over_tcp = ask_tcp(addr, &query("big.example.", RecordType::A, false)).await;
    assert!(!over_tcp.metadata.truncation);
    assert_eq!(over_tcp.answers.len(), 40);
    let with_edns = ask_udp(addr, &query("big.example.", RecordType::A, true)).await;
    assert!(with_edns.edns.is_some(), "OPT answered with OPT");
    assert!(!with_edns.metadata.truncation, "40 A records fit in 1232 bytes");
    assert_eq!(with_edns.answers.len(), 40);
    server.shutdown().await;
}

#[tokio::test]
async fn without_upstreams_other_names_are_refused_and_a_silent_one_is_servfail() {
    let upstream = FakeUpstream::start().await;
    let yaml = format!("dns:\n  listen: [\"127.0.0.1:0\"]\n  hijack:\n{HIJACK}");
    let server = DnsServer::start(&["127.0.0.1:0".parse().unwrap()], 1, state(&yaml, None)).await.unwrap();
    let answer = ask_udp(server.local_addrs[0], &query("www.example.", RecordType::A, false)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::Refused);
    server.shutdown().await;

    upstream.silent.store(true, Ordering::SeqCst);
    let server = start(upstream.addr, HIJACK).await;
    let answer = ask_udp(server.local_addrs[0], &query("www.example.", RecordType::A, false)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    server.shutdown().await;
}

#[tokio::test]
async fn a_new_state_changes_names_without_restarting_and_keeps_vips() {
    let upstream = FakeUpstream::start().await;
    let two = "    - service: mysql\n    - service: redis\n";
    let server = start(upstream.addr, two).await;
    let addr = server.local_addrs[0];
    let redis = addresses(&ask_udp(addr, &query("redis.", RecordType::A, false)).await);
    let next =
        state(&config(upstream.addr, "    - service: kafka\n    - service: redis\n"), Some(&server.state()));
    server.replace_state(next);
    assert_eq!(
        addresses(&ask_udp(addr, &query("redis.", RecordType::A, false)).await),
        redis,
        "redis keeps its VIP"
    );
    assert_eq!(addresses(&ask_udp(addr, &query("kafka.", RecordType::A, false)).await).len(), 1);
    // mysql is no longer hijacked: it is forwarded now.
    assert_eq!(addresses(&ask_udp(addr, &query("mysql.", RecordType::A, false)).await), ["10.0.0.1"]);
    server.shutdown().await;
}

#[tokio::test]
async fn idle_tcp_connections_are_shed_at_the_limit_for_a_new_client() {
    use keel_proxy::dns::tcp::{IDLE_TIMEOUT, MAX_CONNECTIONS};
    let upstream = FakeUpstream::start().await;
    let server = start(upstream.addr, HIJACK).await;
    let addr = server.local_addrs[0];
    // Every slot taken: half of them silent, half in the middle of a message (a length, then 3 bytes).
    let mut idle = Vec::new();
    for index in 0..MAX_CONNECTIONS {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        if index % 2 == 1 {
            stream.write_all(&[0, 40, 1, 2, 3]).await.unwrap();
        }
        idle.push(stream);
    }
    // Let the server accept them all before the next client comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let answer = ask_tcp(addr, &query("mysql.", RecordType::A, false)).await;
    assert_eq!(addresses(&answer), ["127.0.66.5"]);
    assert!(started.elapsed() < Duration::from_millis(500), "answered after {:?}", started.elapsed());
    // The idle ones were closed to make room, long before their idle timeout.
    for (index, stream) in idle.iter_mut().enumerate() {
        let mut buffer = [0u8; 16];
        let read = tokio::time::timeout(IDLE_TIMEOUT / 10, stream.read(&mut buffer)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "idle connection {index} is still open: {read:?}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn an_unreadable_tcp_message_gets_formerr_and_the_connection_goes_on() {
    let upstream = FakeUpstream::start().await;
    let server = start(upstream.addr, HIJACK).await;
    let mut stream = TcpStream::connect(server.local_addrs[0]).await.unwrap();
    // A header that promises a question, and no question.
    send_tcp(&mut stream, b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff").await;
    let answer = receive_tcp(&mut stream).await;
    assert_eq!((answer.metadata.id, answer.metadata.response_code), (0x1234, ResponseCode::FormErr));
    send_tcp(&mut stream, &query("mysql.", RecordType::A, false).to_vec().unwrap()).await;
    assert_eq!(addresses(&receive_tcp(&mut stream).await), ["127.0.66.5"]);
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_packets_do_no_harm() {
    let upstream = FakeUpstream::start().await;
    let server = start(upstream.addr, HIJACK).await;
    let addr = server.local_addrs[0];
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for junk in [&b""[..], b"\x00", b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff", &[0xffu8; 600]] {
        socket.send_to(junk, addr).await.unwrap();
    }
    let txt = query("mysql.", RecordType::TXT, false);
    let answer = ask_udp(addr, &txt).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError, "the server still answers");
    server.shutdown().await;
}

#[tokio::test]
async fn an_edns_version_it_does_not_speak_gets_badvers_with_version_0() {
    let upstream = FakeUpstream::start().await;
    let server = start(upstream.addr, HIJACK).await;
    let mut question = query("mysql.", RecordType::A, true);
    question.edns.as_mut().unwrap().set_version(1);
    let answer = ask_udp(server.local_addrs[0], &question).await;
    // RCODE 16 is BADVERS next to an OPT record (hickory decodes the number as BADSIG, its TSIG twin).
    assert_eq!(u16::from(answer.metadata.response_code), u16::from(ResponseCode::BADVERS));
    assert!(answer.answers.is_empty());
    assert_eq!(answer.edns.as_ref().unwrap().version(), 0);
    assert_eq!(upstream.queries.load(Ordering::SeqCst), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn the_proxy_serves_dns_from_keel_yaml_and_reloads_it() {
    use crate::support::TestProxy;
    let upstream = FakeUpstream::start().await;
    let yaml = |hijack: &str| {
        format!(
            "admin: {{address: \"127.0.0.1:0\"}}\ndns:\n  listen: [\"127.0.0.1:0\"]\n  upstreams: [\"{}\"]\n  hijack:\n{hijack}",
            upstream.addr
        )
    };
    // An explicit port (as in production), so that a reload can start a second server beside it.
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let yaml = |hijack: &str| yaml(hijack).replace("127.0.0.1:0\"]", &format!("127.0.0.1:{port}\"]"));
    let proxy = TestProxy::start(&yaml("    - service: mysql\n")).await;
    let status = proxy.proxy.dns_status().await.expect("the DNS server runs");
    let addr = status.listening[0];
    let mysql =
        addresses(&ask_udp(addr, &query("mysql.default.svc.cluster.local.", RecordType::A, false)).await);
    assert_eq!(mysql.len(), 1);

    proxy.replace_config(&yaml("    - service: mysql\n    - service: redis\n"));
    assert_eq!(proxy.post("/reload").await.0, 200);
    let after = proxy.proxy.dns_status().await.unwrap();
    assert_eq!(after.listening, status.listening, "same listen addresses: same sockets");
    assert_eq!(addresses(&ask_udp(addr, &query("mysql.", RecordType::A, false)).await), mysql);
    assert_eq!(addresses(&ask_udp(addr, &query("redis.", RecordType::A, false)).await).len(), 1);

    let (_, dump) = proxy.get("/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["dns"]["hijack"]["mysql.default.svc.cluster.local"], mysql[0].as_str());
    assert!(dump["dns"]["hijack"]["redis.default.svc.cluster.local"].is_string(), "{dump}");
    let hijacked = "keel_dns_queries_total{type=\"A\",outcome=\"hijacked\"}";
    assert_eq!(proxy.metric(hijacked).await, 3.0);

    // Adding a listen address keeps the first one answering: the new server binds both.
    let second = UdpSocket::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let two = format!(
        "admin: {{address: \"127.0.0.1:0\"}}\ndns:\n  listen: [\"{addr}\", \"{second}\"]\n  upstreams: [\"{}\"]\n  hijack:\n    - service: mysql\n    - service: redis\n",
        upstream.addr
    );
    proxy.replace_config(&two);
    let (status, body) = proxy.post("/reload").await;
    assert_eq!(status, 200, "{body}");
    for server in [addr, second] {
        assert_eq!(addresses(&ask_udp(server, &query("mysql.", RecordType::A, false)).await), mysql);
        assert_eq!(addresses(&ask_tcp(server, &query("mysql.", RecordType::A, false)).await), mysql);
    }

    // Removing the section stops the server.
    proxy.replace_config("admin: {address: \"127.0.0.1:0\"}\n");
    assert_eq!(proxy.post("/reload").await.0, 200);
    assert!(proxy.proxy.dns_status().await.is_none());
    proxy.stop().await;
}

#[tokio::test]
async fn tcp_pipelining_answers_every_query_on_one_connection() {
    let upstream = FakeUpstream::start().await;
    let server = start(upstream.addr, HIJACK).await;
    let mut stream = TcpStream::connect(server.local_addrs[0]).await.unwrap();
    let questions: Vec<Message> = ["mysql.", "redis-not-hijacked.example.", "x.internal.example."]
        .iter()
        .map(|name| query(name, RecordType::A, false))
        .collect();
    // All three written before any answer is read.
    for question in &questions {
        send_tcp(&mut stream, &question.to_vec().unwrap()).await;
    }
    let mut ids = Vec::new();
    for _ in &questions {
        let answer = receive_tcp(&mut stream).await;
        assert_eq!(answer.answers.len(), 1);
        ids.push(answer.metadata.id);
    }
    let mut expected: Vec<u16> = questions.iter().map(|q| q.metadata.id).collect();
    ids.sort_unstable();
    expected.sort_unstable();
    assert_eq!(ids, expected, "one answer per pipelined query, in any order");
    server.shutdown().await;
}

#[tokio::test]
async fn vips_are_the_same_after_a_restart() {
    let upstream = FakeUpstream::start().await;
    let services = "    - service: mysql\n    - service: redis\n    - service: kafka\n";
    let mut seen = Vec::new();
    for _ in 0..2 {
        let server = start(upstream.addr, services).await;
        let mut vips = Vec::new();
        for name in ["mysql.", "redis.", "kafka."] {
            vips.push(addresses(&ask_udp(server.local_addrs[0], &query(name, RecordType::A, false)).await));
        }
        server.shutdown().await;
        seen.push(vips);
    }
    assert_eq!(seen[0], seen[1]);
}

#[tokio::test]
async fn dig_gets_the_hijacked_answer() {
    let upstream = FakeUpstream::start().await;
    let server = start(upstream.addr, HIJACK).await;
    let port = server.local_addrs[0].port().to_string();
    let dig = tokio::process::Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port,
            "+short",
            "+tries=1",
            "+time=2",
            "MySQL.default.svc.cluster.local",
            "A",
        ])
        .output()
        .await;
    let output = match dig {
        Ok(output) => output,
        // CI installs dig (.ci/install-test-deps); a developer machine without it skips this check.
        Err(error) if std::env::var_os("CI").is_none() => {
            eprintln!("dig not found ({error}): run .ci/install-test-deps for this check");
            return server.shutdown().await;
        }
        Err(error) => panic!("dig is required in CI: {error}"),
    };
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "127.0.66.5");
    let tcp = tokio::process::Command::new("dig")
        .args(["@127.0.0.1", "-p", &port, "+short", "+tcp", "x.internal.example", "A"])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&tcp.stdout).trim(), "127.0.66.6");
    server.shutdown().await;
}
