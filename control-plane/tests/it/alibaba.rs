//! DNS records through Alibaba Cloud DNS, against a local server that checks each request as the API
//! documents it (the common parameters, a fresh nonce, a current timestamp, and the signature version
//! 1.0, recomputed here from the secret) and keeps the records the API would.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::support::*;
use axum::extract::State as Shared;
use axum::http::{Method, Uri};
use axum::response::{IntoResponse, Response};
use encoding::{decode, encode};
use serde_json::{Value, json};
use tokio::sync::Mutex;

const KEY_ID: &str = "LTAI5tKeelTest";
const SECRET: &str = "keel-alibaba-secret";

/// The client side's encoding, written again from the documentation for the server side.
mod encoding {
    pub fn decode(text: &str) -> String {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    pub fn encode(text: &str) -> String {
        text.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }
}

#[derive(Default)]
struct FakeAlibaba {
    /// RecordId -> record, as DescribeSubDomainRecords shows it.
    records: BTreeMap<String, Value>,
    next_id: u64,
    nonces: HashSet<String>,
    problems: Vec<String>,
    actions: Vec<String>,
    /// The next listing of this name shows nothing (as right after a change elsewhere).
    hide_once: Option<String>,
}

fn error(code: &str, message: &str) -> Response {
    (
        axum::http::StatusCode::BAD_REQUEST,
        axum::Json(
            json!({"RequestId": "0-0", "HostId": "alidns.aliyuncs.com", "Code": code, "Message": message}),
        ),
    )
        .into_response()
}

async fn api(Shared(fake): Shared<Arc<Mutex<FakeAlibaba>>>, method: Method, uri: Uri) -> Response {
    let mut fake = fake.lock().await;
    if method != Method::GET || uri.path() != "/" {
        fake.problems.push(format!("unexpected {method} {}", uri.path()));
        return error("InvalidAction", "GET / only");
    }
    let mut params: BTreeMap<String, String> = BTreeMap::new();
    for pair in uri.query().unwrap_or_default().split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        params.insert(decode(name), decode(value));
    }
    let Some(signature) = params.remove("Signature") else {
        fake.problems.push("no Signature".to_string());
        return error("MissingSignature", "Signature is mandatory");
    };
    for (name, expected) in [
        ("Format", "JSON"),
        ("Version", "2015-01-09"),
        ("AccessKeyId", KEY_ID),
        ("SignatureMethod", "HMAC-SHA1"),
        ("SignatureVersion", "1.0"),
    ] {
        if params.get(name).map(String::as_str) != Some(expected) {
            fake.problems.push(format!("{name} is {:?}, not {expected}", params.get(name)));
        }
    }
    let nonce = params.get("SignatureNonce").cloned().unwrap_or_default();
    if nonce.is_empty() || !fake.nonces.insert(nonce.clone()) {
        fake.problems.push(format!("nonce {nonce:?} missing or reused"));
        return error("SignatureNonceUsed", "Specified signature nonce was used already.");
    }
    let timestamp = params.get("Timestamp").cloned().unwrap_or_default();
    let at = humantime::parse_rfc3339(&timestamp);
    let fresh = at.ok().and_then(|at| SystemTime::now().duration_since(at).ok().or(Some(Duration::ZERO)));
    if timestamp.len() != 20
        || !timestamp.ends_with('Z')
        || fresh.is_none_or(|age| age > Duration::from_secs(900))
    {
        fake.problems.push(format!("Timestamp {timestamp:?} is not current ISO 8601 UTC"));
    }
    let canonical = params
        .iter()
        .map(|(name, value)| format!("{}={}", encode(name), encode(value)))
        .collect::<Vec<_>>()
        .join("&");
    let to_sign = format!("GET&%2F&{}", encode(&canonical));
    let key =
        ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, format!("{SECRET}&").as_bytes());
    let expected = data_encoding::BASE64.encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref());
    if signature != expected {
        return error("SignatureDoesNotMatch", "Specified signature is not matched with our calculation.");
    }
    let action = params.get("Action").cloned().unwrap_or_default();
    fake.actions.push(action.clone());
    let param = |name: &str| params.get(name).cloned().unwrap_or_default();
    match action.as_str() {
        "DescribeSubDomainRecords" => {
            let sub_domain = param("SubDomain");
            if fake.hide_once.as_deref() == Some(sub_domain.as_str()) {
                fake.hide_once = None;
                return axum::Json(json!({"TotalCount": 0, "DomainRecords": {"Record": []}})).into_response();
            }
            let found: Vec<Value> = fake
                .records
                .values()
                .filter(|record| {
                    let name = if record["RR"] == "@" {
                        record["DomainName"].as_str().unwrap().to_string()
                    } else {
                        format!(
                            "{}.{}",
                            record["RR"].as_str().unwrap(),
                            record["DomainName"].as_str().unwrap()
                        )
                    };
                    name == sub_domain
                        && params.get("Type").is_none_or(|kind| record["Type"] == kind.as_str())
                })
                .cloned()
                .collect();
            axum::Json(json!({"TotalCount": found.len(), "PageNumber": 1, "PageSize": 500, "RequestId": "1-1", "DomainRecords": {"Record": found}})).into_response()
        }
        "AddDomainRecord" => {
            let (rr, kind, value) = (param("RR"), param("Type"), param("Value"));
            if param("DomainName") != "example.cn" || rr.is_empty() || param("TTL").parse::<u64>().is_err() {
                fake.problems.push(format!("AddDomainRecord with {params:?}"));
            }
            if fake
                .records
                .values()
                .any(|r| r["RR"] == rr.as_str() && r["Type"] == kind.as_str() && r["Value"] == value.as_str())
            {
                return error("DomainRecordDuplicate", "The DNS record already exists.");
            }
            fake.next_id += 1;
            let id = format!("{}", 1000 + fake.next_id);
            let record = json!({"RecordId": id, "DomainName": "example.cn", "RR": rr, "Type": kind, "Value": value, "TTL": param("TTL").parse::<u64>().unwrap_or(0), "Line": "default", "Status": "ENABLE"});
            fake.records.insert(id.clone(), record);
            axum::Json(json!({"RequestId": "2-2", "RecordId": id})).into_response()
        }
        "UpdateDomainRecord" => {
            let id = param("RecordId");
            let Some(record) = fake.records.get_mut(&id) else {
                return error("DomainRecordNotBelongToUser", "The DNS record does not exist.");
            };
            if record["Value"] == param("Value").as_str()
                && record["RR"] == param("RR").as_str()
                && record["TTL"] == json!(param("TTL").parse::<u64>().unwrap_or(0))
            {
                return error("DomainRecordDuplicate", "The DNS record already exists.");
            }
            record["RR"] = json!(param("RR"));
            record["Value"] = json!(param("Value"));
            record["TTL"] = json!(param("TTL").parse::<u64>().unwrap_or(0));
            axum::Json(json!({"RequestId": "3-3", "RecordId": id})).into_response()
        }
        "DeleteDomainRecord" => match fake.records.remove(&param("RecordId")) {
            Some(_) => axum::Json(json!({"RequestId": "4-4", "RecordId": param("RecordId")})).into_response(),
            None => error("DomainRecordNotBelongToUser", "The DNS record does not exist."),
        },
        other => {
            fake.problems.push(format!("unexpected action {other}"));
            error("InvalidAction.NotFound", "Specified api is not found.")
        }
    }
}

#[tokio::test]
async fn records_go_through_alibaba_cloud_dns_with_signed_requests() {
    let fake = Arc::new(Mutex::new(FakeAlibaba::default()));
    {
        // Two stale records for `home`: one is updated, the other deleted. The apex exists already with
        // the address, but the first listing misses it: AddDomainRecord's DomainRecordDuplicate says so.
        let mut fake = fake.lock().await;
        for (id, value) in [("1", "198.51.100.1"), ("2", "198.51.100.2")] {
            fake.records.insert(id.to_string(), json!({"RecordId": id, "DomainName": "example.cn", "RR": "home", "Type": "A", "Value": value, "TTL": 600}));
        }
        fake.records.insert("3".to_string(), json!({"RecordId": "3", "DomainName": "example.cn", "RR": "@", "Type": "A", "Value": "203.0.113.7", "TTL": 600}));
        fake.hide_once = Some("example.cn".to_string());
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(api).with_state(Arc::clone(&fake));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("alibaba.secret");
    // First a wrong secret: the update fails with the API's error, and is retried.
    std::fs::write(&secret_file, "not-the-secret\n").unwrap();
    let cp = start(&database(&dir)).await;
    let addr = cp.local_addr;
    let v1 = "/apis/edge.example.com/v1";
    let provider = json!({
        "apiVersion": "edge.example.com/v1", "kind": "DnsProvider", "metadata": {"name": "aliyun"},
        "spec": {"alibaba": {"access_key_id": KEY_ID, "access_key_secret_file": secret_file.display().to_string(), "api_url": format!("http://{api_addr}/")}}
    });
    assert_eq!(operator(addr, "POST", &format!("{v1}/dnsproviders"), Some(&provider)).await.0, 201);
    for (name, record_name) in [("apex", "@"), ("home", "home")] {
        let record = json!({
            "apiVersion": "edge.example.com/v1", "kind": "DnsRecord", "metadata": {"name": name},
            "spec": {"zone": "example.cn", "name": record_name, "type": "A", "ttl": "600s", "address_from": {"node": "gw-1"}, "provider": "aliyun"}
        });
        assert_eq!(operator(addr, "POST", &format!("{v1}/dnsrecords"), Some(&record)).await.0, 201);
    }
    report_address(addr, "203.0.113.7").await;

    eventually("the signature error in the record's status", || async {
        let (_, record) = operator(addr, "GET", &format!("{v1}/dnsrecords/home"), None).await;
        record["status"]["lastError"].as_str().is_some_and(|error| error.contains("SignatureDoesNotMatch"))
    })
    .await;
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();

    records_in_sync(addr, 2, Duration::from_secs(15)).await;
    let fake = fake.lock().await;
    assert!(fake.problems.is_empty(), "{:?}", fake.problems);
    let held: Vec<(String, String, u64)> = fake
        .records
        .values()
        .map(|r| {
            (
                r["RR"].as_str().unwrap().to_string(),
                r["Value"].as_str().unwrap().to_string(),
                r["TTL"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        held,
        [
            ("home".to_string(), "203.0.113.7".to_string(), 600),
            ("@".to_string(), "203.0.113.7".to_string(), 600)
        ]
    );
    assert!(fake.actions.contains(&"AddDomainRecord".to_string()), "{:?}", fake.actions);
    assert!(fake.actions.contains(&"UpdateDomainRecord".to_string()), "{:?}", fake.actions);
    assert!(fake.actions.contains(&"DeleteDomainRecord".to_string()), "{:?}", fake.actions);
    drop(fake);
    cp.stop().await;
}
