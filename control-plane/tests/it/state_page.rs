//! The state page (seed 001's `/`) as a browser shows it: headless Chromium renders it from a running
//! control plane, logged in with an operator token as the Basic password. Names that nodes send are
//! text, never markup.
//!
//! Needs `chromium` (`.ci/install-test-deps` installs it). Elsewhere the test says why it did not run,
//! unless `CI` is set, where not running is a failure.

use crate::support::*;
use serde_json::json;

#[tokio::test]
async fn a_browser_shows_records_addresses_and_errors_as_text() {
    let Some(browser) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&database(&dir)).await;
    let addr = cp.local_addr;
    let token_file = dir.path().join("gandi.token");
    std::fs::write(&token_file, "t\n").unwrap();
    let v1 = "/apis/edge.example.com/v1";
    // A provider nobody answers for: the record stays pending with its error.
    let provider = json!({
        "apiVersion": "edge.example.com/v1", "kind": "DnsProvider", "metadata": {"name": "gandi"},
        "spec": {"gandi": {"api_token_file": token_file.display().to_string(), "api_url": "http://127.0.0.1:1/v5/livedns"}}
    });
    assert_eq!(operator(addr, "POST", &format!("{v1}/dnsproviders"), Some(&provider)).await.0, 201);
    let record = json!({
        "apiVersion": "edge.example.com/v1", "kind": "DnsRecord", "metadata": {"name": "home"},
        "spec": {"zone": "example.org", "name": "home", "type": "A", "address_from": {"node": "gw-1"}, "provider": "gandi"}
    });
    assert_eq!(operator(addr, "POST", &format!("{v1}/dnsrecords"), Some(&record)).await.0, 201);
    report_address(addr, "203.0.113.7").await;
    // A node name that is markup (seed 000's agents are named by whatever they send).
    let hostile = "<img src=x onerror=alert(1)>";
    report_address_as(addr, hostile, "198.51.100.9").await;
    eventually("the failed update in the status", || async {
        let (_, record) = operator(addr, "GET", &format!("{v1}/dnsrecords/home"), None).await;
        record["status"]["lastError"].is_string()
    })
    .await;

    // Without a token the browser gets the 401 and its login prompt (which headless cancels): no data.
    let refused = render(browser, format!("http://{addr}/"), 1000).await;
    assert!(!refused.contains("203.0.113.7") && !refused.contains("<h1>"), "{refused}");

    let page = render(browser, format!("http://admin:{OPERATOR}@{addr}/"), 1000).await;
    assert!(page.contains("<h1>Keel control plane</h1>"), "{page}");
    let records = page.split("<table id=\"records\">").nth(1).unwrap().split("</table>").next().unwrap();
    assert!(
        records.contains("<td>home.example.org.</td><td>A</td><td>gw-1</td><td>203.0.113.7</td>"),
        "{records}"
    );
    assert!(records.contains("<td class=\"bad\">pending</td>"), "{records}");
    assert!(records.contains("cannot reach 127.0.0.1:1"), "{records}");
    let addresses = page.split("<table id=\"addresses\">").nth(1).unwrap().split("</table>").next().unwrap();
    assert!(addresses.contains("<td>gw-1</td><td>203.0.113.7</td>"), "{addresses}");
    assert!(
        addresses.contains("<td>&lt;img src=x onerror=alert(1)&gt;</td><td>198.51.100.9</td>"),
        "{addresses}"
    );
    assert!(!page.contains("<img"), "a node's name became markup: {page}");
    cp.stop().await;
}
