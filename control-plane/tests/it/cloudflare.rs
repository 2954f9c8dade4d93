//! DNS records through Cloudflare's API v4, against a local server that checks the documented request
//! shapes and headers exactly and keeps the zone's records: list, create (POST), update (PUT), read
//! back; a 429 is retried only after its Retry-After; through an outage and a control-plane restart the
//! record converges on the last address, and no older one is written after a newer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use axum::body::Bytes;
use axum::extract::State as Shared;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::Mutex;

const ZONE_ID: &str = "023e105f4ecef8ad9ca31a8372d0c353";
const TOKEN: &str = "cf-api-token-123";
const V1: &str = "/apis/edge.example.com/v1";

#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    at: Instant,
}

#[derive(Default)]
struct FakeCloudflare {
    records: Vec<Value>,
    seen: Vec<Seen>,
    rate_limit_once: bool,
    /// An outage: every call answers 500.
    down: bool,
    /// The content of every record written (POST or PUT), in order.
    written: Vec<String>,
    problems: Vec<String>,
}

async fn api(
    Shared(fake): Shared<Arc<Mutex<FakeCloudflare>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut fake = fake.lock().await;
    let path = uri.path().to_string();
    fake.seen.push(Seen { method: method.to_string(), path: uri.to_string(), at: Instant::now() });
    if !has_bearer(&headers, TOKEN) {
        fake.problems.push(format!("{method} {uri}: wrong or missing Authorization"));
        return (
            StatusCode::FORBIDDEN,
            axum::Json(
                json!({"success": false, "errors": [{"code": 9109, "message": "Invalid access token"}]}),
            ),
        )
            .into_response();
    }
    if fake.down {
        return (StatusCode::INTERNAL_SERVER_ERROR, "outage").into_response();
    }
    if fake.rate_limit_once {
        fake.rate_limit_once = false;
        return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")], "rate limited").into_response();
    }
    let collection = format!("/client/v4/zones/{ZONE_ID}/dns_records");
    let ok = |result: Value| {
        axum::Json(json!({"success": true, "errors": [], "messages": [], "result": result})).into_response()
    };
    let check_body = |fake: &mut FakeCloudflare| -> Option<Value> {
        if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/json") {
            fake.problems.push(format!("{method} {uri}: Content-Type is not application/json"));
        }
        let body: Value = serde_json::from_slice(&body).ok()?;
        let keys: Vec<&str> = body.as_object()?.keys().map(String::as_str).collect();
        if keys != ["type", "name", "content", "ttl", "proxied"] {
            fake.problems.push(format!("{method} {uri}: body keys {keys:?}"));
        }
        if body["name"].as_str().is_none_or(|name| name.ends_with('.')) || body["proxied"] != false {
            fake.problems.push(format!("{method} {uri}: body {body}"));
        }
        Some(body)
    };
    match (method.as_str(), path.as_str()) {
        ("GET", p) if p == collection => {
            let query = uri.query().unwrap_or_default();
            let (mut kind, mut name) = (None, None);
            for pair in query.split('&') {
                match pair.split_once('=') {
                    Some(("type", value)) => kind = Some(value.to_string()),
                    Some(("name", value)) => name = Some(value.to_string()),
                    _ => fake.problems.push(format!("unexpected query {query}")),
                }
            }
            let found: Vec<Value> = fake
                .records
                .iter()
                .filter(|r| {
                    Some(r["type"].as_str().unwrap_or_default().to_string()) == kind
                        && Some(r["name"].as_str().unwrap_or_default().to_string()) == name
                })
                .cloned()
                .collect();
            ok(json!(found))
        }
        ("POST", p) if p == collection => {
            let Some(mut body) = check_body(&mut fake) else {
                return StatusCode::BAD_REQUEST.into_response();
            };
            body["id"] = json!(format!("rec{}", fake.records.len() + 1));
            let content = body["content"].as_str().unwrap_or_default().to_string();
            fake.written.push(content);
            fake.records.push(body.clone());
            ok(body)
        }
        ("PUT", p) if p.starts_with(&format!("{collection}/")) => {
            let id = p.rsplit('/').next().unwrap_or_default().to_string();
            let Some(mut body) = check_body(&mut fake) else {
                return StatusCode::BAD_REQUEST.into_response();
            };
            body["id"] = json!(id);
            let content = body["content"].as_str().unwrap_or_default().to_string();
            fake.written.push(content);
            match fake.records.iter_mut().find(|r| r["id"] == id.as_str()) {
                Some(record) => {
                    *record = body.clone();
                    ok(body)
                }
                None => (StatusCode::NOT_FOUND, axum::Json(json!({"success": false, "errors": [{"code": 81044, "message": "Record does not exist."}]}))).into_response(),
            }
        }
        _ => {
            fake.problems.push(format!("unexpected {method} {uri}"));
            StatusCode::NOT_FOUND.into_response()
        }
    }
}

#[tokio::test]
async fn records_go_through_cloudflares_api_as_documented() {
    let fake = Arc::new(Mutex::new(FakeCloudflare { rate_limit_once: true, ..Default::default() }));
    let api_addr = serve_fake(&fake).await;

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("cloudflare.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let cp = start(&database(&dir)).await;
    let addr = cp.local_addr;
    provider_and_record(addr, api_addr, &token_file).await;

    report_address(addr, "2001:db8::1").await;
    eventually_long_enough(addr).await;
    {
        let fake = fake.lock().await;
        assert!(fake.problems.is_empty(), "{:?}", fake.problems);
        let calls: Vec<String> = fake.seen.iter().map(|s| format!("{} {}", s.method, s.path)).collect();
        let list = format!("GET /client/v4/zones/{ZONE_ID}/dns_records?type=AAAA&name=gw.example.com");
        assert_eq!(
            calls,
            [list.clone(), list.clone(), format!("POST /client/v4/zones/{ZONE_ID}/dns_records"), list]
        );
        assert!(
            fake.seen[1].at - fake.seen[0].at >= Duration::from_secs(1),
            "the Retry-After was not respected"
        );
        assert_eq!(
            fake.records[0],
            json!({"type": "AAAA", "name": "gw.example.com", "content": "2001:db8::1", "ttl": 120, "proxied": false, "id": "rec1"})
        );
    }

    // A new address updates the existing record in place.
    report_address(addr, "2001:db8::2").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.lock().await.records[0]["content"] != "2001:db8::2" {
        assert!(Instant::now() < deadline, "the update did not arrive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fake = fake.lock().await;
    assert!(fake.problems.is_empty(), "{:?}", fake.problems);
    assert_eq!(fake.records.len(), 1);
    assert!(
        fake.seen
            .iter()
            .any(|s| s.method == "PUT" && s.path == format!("/client/v4/zones/{ZONE_ID}/dns_records/rec1"))
    );
    drop(fake);
    cp.stop().await;
}

/// The `cloudflare` DnsProvider (the fake API at `api_addr`) and the record `gw.example.com` (AAAA)
/// following node gw-1.
/// Serves the fake API on 127.0.0.1:0; its address.
async fn serve_fake(fake: &Arc<Mutex<FakeCloudflare>>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(api).with_state(Arc::clone(fake));
    tokio::spawn(async move { axum::serve(listener, app).await });
    api_addr
}

async fn provider_and_record(
    cp: std::net::SocketAddr,
    api_addr: std::net::SocketAddr,
    token_file: &std::path::Path,
) {
    let provider = json!({
        "apiVersion": "edge.example.com/v1", "kind": "DnsProvider", "metadata": {"name": "cloudflare"},
        "spec": {"cloudflare": {"api_token_file": token_file.display().to_string(), "zone_id": ZONE_ID, "api_url": format!("http://{api_addr}/client/v4")}}
    });
    assert_eq!(operator(cp, "POST", &format!("{V1}/dnsproviders"), Some(&provider)).await.0, 201);
    let record = json!({
        "apiVersion": "edge.example.com/v1", "kind": "DnsRecord", "metadata": {"name": "gw"},
        "spec": {"zone": "example.com", "name": "gw", "type": "AAAA", "ttl": "120s", "address_from": {"node": "gw-1"}, "provider": "cloudflare"}
    });
    assert_eq!(operator(cp, "POST", &format!("{V1}/dnsrecords"), Some(&record)).await.0, 201);
}

async fn eventually_long_enough(addr: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, record) = operator(addr, "GET", &format!("{V1}/dnsrecords/gw"), None).await;
        if record["status"]["inSync"] == true {
            assert_eq!(record["status"]["observed"], json!(["2001:db8::1"]));
            return;
        }
        assert!(Instant::now() < deadline, "not in sync: {}", record["status"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fault: the provider down (every call 500) while the address changes twice and the control plane
/// restarts. When the provider is back, the record converges on the last address, and nothing older is
/// written once a newer one has been.
#[tokio::test]
async fn through_an_outage_and_a_restart_the_record_converges_in_order() {
    let fake = Arc::new(Mutex::new(FakeCloudflare::default()));
    let api_addr = serve_fake(&fake).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("cloudflare.token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let cp = start(&database(&dir)).await;
    provider_and_record(cp.local_addr, api_addr, &token_file).await;
    report_address(cp.local_addr, "2001:db8::1").await;
    eventually("the first address in the zone", || async {
        fake.lock().await.records.first().is_some_and(|record| record["content"] == "2001:db8::1")
    })
    .await;

    // The outage: two changes, a restart in the middle, each attempt refused.
    fake.lock().await.down = true;
    let outage = Instant::now();
    report_address(cp.local_addr, "2001:db8::2").await;
    eventually("a failed attempt in the record's status", || async {
        let (_, record) = operator(cp.local_addr, "GET", &format!("{V1}/dnsrecords/gw"), None).await;
        record["status"]["inSync"] == false && record["status"]["lastError"].is_string()
    })
    .await;
    cp.stop().await;
    let cp = start(&database(&dir)).await;
    report_address(cp.local_addr, "2001:db8::3").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let down_for = outage.elapsed();
    fake.lock().await.down = false;

    // Back: the last address arrives, and nothing older after it.
    let healed = Instant::now();
    let deadline = healed + Duration::from_secs(20);
    while fake.lock().await.records[0]["content"] != "2001:db8::3" {
        assert!(Instant::now() < deadline, "the record did not converge: {:?}", fake.lock().await.records);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let converged = healed.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fake = fake.lock().await;
    assert!(fake.problems.is_empty(), "{:?}", fake.problems);
    assert_eq!(fake.records.len(), 1, "{:?}", fake.records);
    assert_eq!(fake.records[0]["content"], "2001:db8::3");
    let order = |content: &String| content.trim_start_matches("2001:db8::").parse::<u32>().unwrap();
    assert!(
        fake.written.windows(2).all(|pair| order(&pair[0]) <= order(&pair[1])),
        "an older address was written after a newer one: {:?}",
        fake.written
    );
    eprintln!(
        "provider down {down_for:?} across a restart: converged {converged:?} after it came back; written in order: {:?}",
        fake.written
    );
    let (_, record) = operator(cp.local_addr, "GET", &format!("{V1}/dnsrecords/gw"), None).await;
    assert_eq!(record["status"]["inSync"], true, "{}", record["status"]);
    cp.stop().await;
}
