//! DNS records through Gandi LiveDNS v5, against a local server that checks the documented request
//! (PUT of the RRset, `Authorization: Bearer` personal access token, JSON body) and serves it back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use axum::body::Bytes;
use axum::extract::State as Shared;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::Mutex;

const TOKEN: &str = "gandi-pat-456";

#[derive(Default)]
struct FakeGandi {
    rrsets: HashMap<String, Value>,
    problems: Vec<String>,
    puts: usize,
}

async fn api(
    Shared(fake): Shared<Arc<Mutex<FakeGandi>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut fake = fake.lock().await;
    if !has_bearer(&headers, TOKEN) {
        fake.problems.push(format!("{method} {uri}: wrong or missing Authorization"));
        return (StatusCode::FORBIDDEN, axum::Json(json!({"code": 403, "message": "Access was denied"})))
            .into_response();
    }
    let path = uri.path().to_string();
    if !path.starts_with("/v5/livedns/domains/example.org/records/") {
        fake.problems.push(format!("unexpected path {path}"));
        return StatusCode::NOT_FOUND.into_response();
    }
    match method.as_str() {
        "PUT" => {
            if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/json") {
                fake.problems.push("PUT without Content-Type: application/json".to_string());
            }
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let keys: Vec<&str> =
                body.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
            if keys != ["rrset_values", "rrset_ttl"] {
                fake.problems.push(format!("PUT body keys {keys:?}"));
            }
            fake.puts += 1;
            fake.rrsets.insert(path, body);
            (StatusCode::CREATED, axum::Json(json!({"message": "DNS Record Created"}))).into_response()
        }
        "GET" => match fake.rrsets.get(&path) {
            Some(rrset) => {
                let mut parts = path.rsplit('/');
                let (kind, name) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
                axum::Json(json!({"rrset_name": name, "rrset_type": kind, "rrset_ttl": rrset["rrset_ttl"], "rrset_values": rrset["rrset_values"]})).into_response()
            }
            None => (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"code": 404, "message": "Can't find the DNS record"})),
            )
                .into_response(),
        },
        _ => {
            fake.problems.push(format!("unexpected {method} {path}"));
            StatusCode::METHOD_NOT_ALLOWED.into_response()
        }
    }
}

#[tokio::test]
async fn records_go_through_gandi_livedns_as_documented() {
    let fake = Arc::new(Mutex::new(FakeGandi::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(api).with_state(Arc::clone(&fake));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("gandi.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let cp = start(&database(&dir)).await;
    let addr = cp.local_addr;
    let v1 = "/apis/edge.example.com/v1";
    let provider = json!({
        "apiVersion": "edge.example.com/v1", "kind": "DnsProvider", "metadata": {"name": "gandi"},
        "spec": {"gandi": {"api_token_file": token_file.display().to_string(), "api_url": format!("http://{api_addr}/v5/livedns")}}
    });
    assert_eq!(operator(addr, "POST", &format!("{v1}/dnsproviders"), Some(&provider)).await.0, 201);
    for (name, record_name) in [("apex", "@"), ("home", "home")] {
        let record = json!({
            "apiVersion": "edge.example.com/v1", "kind": "DnsRecord", "metadata": {"name": name},
            "spec": {"zone": "example.org", "name": record_name, "type": "A", "ttl": "60s", "address_from": {"node": "gw-1"}, "provider": "gandi"}
        });
        assert_eq!(operator(addr, "POST", &format!("{v1}/dnsrecords"), Some(&record)).await.0, 201);
    }

    report_address(addr, "203.0.113.7").await;

    records_in_sync(addr, 2, Duration::from_secs(10)).await;
    let fake = fake.lock().await;
    assert!(fake.problems.is_empty(), "{:?}", fake.problems);
    assert_eq!(fake.puts, 2);
    // The apex is `@`; Gandi's smallest TTL is 300.
    assert_eq!(
        fake.rrsets["/v5/livedns/domains/example.org/records/@/A"],
        json!({"rrset_values": ["203.0.113.7"], "rrset_ttl": 300})
    );
    assert!(fake.rrsets.contains_key("/v5/livedns/domains/example.org/records/home/A"));
    drop(fake);
    cp.stop().await;
}
