//! The REST API and the store: CRUD, optimistic concurrency, validation errors, auth, watch, migrations.

use std::time::Duration;

use crate::support::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const ROUTERS: &str = "/apis/edge.example.com/v1/routers";

fn router(name: &str, port: u16) -> Value {
    json!({
        "apiVersion": "edge.example.com/v1",
        "kind": "Router",
        "metadata": {"name": name, "labels": {"zone": "a"}},
        "spec": {"listen": format!("0.0.0.0:{port}"), "address": format!("{name}.example:{port}"), "token_file": "/run/keel/token"}
    })
}

#[tokio::test]
async fn crud_with_optimistic_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&database(&dir)).await;
    let addr = cp.local_addr;

    let (status, created) = operator(addr, "POST", ROUTERS, Some(&router("node-1", 7000))).await;
    assert_eq!(status, 201, "{created}");
    let version = created["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    assert_eq!(created["metadata"]["generation"], 1);
    assert!(created["metadata"]["uid"].as_str().unwrap().len() == 36);
    assert!(created["metadata"]["creationTimestamp"].as_str().unwrap().ends_with('Z'));

    let (status, again) = operator(addr, "POST", ROUTERS, Some(&router("node-1", 7000))).await;
    assert_eq!((status, again["reason"].as_str()), (409, Some("AlreadyExists")));

    // Replace with the current version works; with the old one it is a 409.
    let mut changed = router("node-1", 7001);
    changed["metadata"]["resourceVersion"] = json!(version);
    let (status, replaced) = operator(addr, "PUT", &format!("{ROUTERS}/node-1"), Some(&changed)).await;
    assert_eq!(status, 200, "{replaced}");
    assert_eq!(replaced["metadata"]["generation"], 2);
    let (status, stale) = operator(addr, "PUT", &format!("{ROUTERS}/node-1"), Some(&changed)).await;
    assert_eq!(status, 409, "{stale}");
    assert_eq!(stale["reason"], "Conflict");
    assert!(stale["message"].as_str().unwrap().contains("stale"), "{stale}");

    // Merge patch: labels and one spec field.
    let patch =
        json!({"metadata": {"labels": {"zone": null, "tier": "edge"}}, "spec": {"listen": "0.0.0.0:7002"}});
    let (status, patched) = operator(addr, "PATCH", &format!("{ROUTERS}/node-1"), Some(&patch)).await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["metadata"]["labels"], json!({"tier": "edge"}));
    assert_eq!(patched["spec"]["listen"], "0.0.0.0:7002");
    assert_eq!(patched["spec"]["token_file"], "/run/keel/token");

    // The status subresource changes only the status; the main resource ignores status.
    let status_patch = json!({"status": {"activeServices": []}, "spec": {"listen": "0.0.0.0:1"}});
    let (status, with_status) =
        operator(addr, "PATCH", &format!("{ROUTERS}/node-1/status"), Some(&status_patch)).await;
    assert_eq!(status, 200, "{with_status}");
    assert_eq!(with_status["status"], json!({"activeServices": []}));
    assert_eq!(with_status["spec"]["listen"], "0.0.0.0:7002");
    assert_eq!(with_status["metadata"]["generation"], 3);

    // Lists, with label selectors.
    operator(addr, "POST", ROUTERS, Some(&router("node-2", 7000))).await;
    let (_, list) = operator(addr, "GET", ROUTERS, None).await;
    assert_eq!(list["kind"], "RouterList");
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    let (_, selected) = operator(addr, "GET", &format!("{ROUTERS}?labelSelector=zone%3Da"), None).await;
    let names: Vec<&str> = selected["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["node-2"]);

    // Delete; then it is gone.
    let (status, _) = operator(addr, "DELETE", &format!("{ROUTERS}/node-2"), None).await;
    assert_eq!(status, 200);
    let (status, missing) = operator(addr, "GET", &format!("{ROUTERS}/node-2"), None).await;
    assert_eq!((status, missing["reason"].as_str()), (404, Some("NotFound")));

    // Everything survives a restart (SQLite), including the revision counter.
    let revision = list["metadata"]["resourceVersion"].as_str().unwrap().parse::<i64>().unwrap();
    cp.stop().await;
    let cp = start(&database(&dir)).await;
    let (_, list) = operator(cp.local_addr, "GET", ROUTERS, None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(list["metadata"]["resourceVersion"].as_str().unwrap().parse::<i64>().unwrap() > revision);
    cp.stop().await;
}

#[tokio::test]
async fn bad_input_names_the_failing_fields() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&database(&dir)).await;
    let addr = cp.local_addr;
    let listeners = "/apis/edge.example.com/v1/listeners";

    let bad = json!({
        "apiVersion": "edge.example.com/v1", "kind": "Listener", "metadata": {"name": "web"},
        "spec": {"address": "127.0.0.1:8080", "cluster": "web", "max_connections": 0}
    });
    let (status, body) = operator(addr, "POST", listeners, Some(&bad)).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["details"]["causes"][0]["field"], "spec.max_connections");

    let unknown = json!({
        "apiVersion": "edge.example.com/v1", "kind": "Listener", "metadata": {"name": "Web_1"},
        "spec": {"address": "127.0.0.1:8080", "cluster": "web", "colour": "red"}
    });
    let (status, body) = operator(addr, "POST", listeners, Some(&unknown)).await;
    assert_eq!(status, 422, "{body}");
    let fields: Vec<&str> =
        body["details"]["causes"].as_array().unwrap().iter().map(|c| c["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["metadata.name"]);

    let (status, body) = operator(addr, "POST", listeners, Some(&json!({"kind": "Listener"}))).await;
    assert_eq!(status, 400, "{body}");

    let secret = json!({
        "apiVersion": "edge.example.com/v1", "kind": "PublishedService", "metadata": {"name": "mysql"},
        "spec": {"local": "127.0.0.1:3306", "secret": "hunter2"}
    });
    let (status, body) =
        operator(addr, "POST", "/apis/edge.example.com/v1/namespaces/db/publishedservices", Some(&secret))
            .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["details"]["causes"][0]["field"], "spec.secret");
    assert!(!body.to_string().contains("hunter2"));

    let (status, _) =
        operator(addr, "POST", "/apis/edge.example.com/v1/publishedservices", Some(&secret)).await;
    assert_eq!(status, 400, "namespaced kinds are created under a namespace");
    let (status, _) = operator(addr, "GET", "/apis/edge.example.com/v1/widgets", None).await;
    assert_eq!(status, 404);
    let (status, _) =
        call(addr, "PATCH", &format!("{ROUTERS}/x"), Some(OPERATOR), Some(("text/plain", &json!({})))).await;
    assert_eq!(status, 415);
    cp.stop().await;
}

#[tokio::test]
async fn tokens_are_required_and_roles_kept_apart() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&database(&dir)).await;
    let addr = cp.local_addr;
    let body = router("node-1", 7000);
    let json = Some(("application/json", &body));
    assert_eq!(call(addr, "POST", ROUTERS, None, json).await.0, 401);
    assert_eq!(call(addr, "POST", ROUTERS, Some("wrong"), json).await.0, 401);
    assert_eq!(call(addr, "POST", ROUTERS, Some(PROXY), json).await.0, 403);
    assert_eq!(call(addr, "GET", "/debug/proxies", Some(PROXY), None).await.0, 403);
    assert_eq!(call(addr, "POST", "/v1/stream", Some(OPERATOR), None).await.0, 403);
    assert_eq!(call(addr, "POST", "/v1/stream", None, None).await.0, 401);
    assert_eq!(call(addr, "POST", ROUTERS, Some(OPERATOR), json).await.0, 201);
    cp.stop().await;
}

#[tokio::test]
async fn a_viewer_token_reads_everything_an_operator_reads_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings(&database(&dir), "127.0.0.1:0".parse().unwrap());
    settings.tokens = settings.tokens.with_viewers(vec!["viewer-token".into()]);
    let cp = keel_control_plane::ControlPlane::start(settings).await.unwrap();
    let addr = cp.local_addr;
    let viewer = Some("viewer-token");
    assert_eq!(operator(addr, "POST", ROUTERS, Some(&router("node-1", 7000))).await.0, 201);
    for path in [
        ROUTERS,
        "/apis/edge.example.com/v1/routers/node-1",
        "/debug/proxies",
        "/metrics",
        "/raw",
        "/api/v1/public-ip",
    ] {
        assert_eq!(call(addr, "GET", path, viewer, None).await.0, 200, "GET {path}");
    }
    // Every write is refused as forbidden (the token is known, the role may not), nothing changes.
    let body = router("node-2", 7000);
    assert_eq!(call(addr, "POST", ROUTERS, viewer, Some(("application/json", &body))).await.0, 403);
    let patch = json!({"spec": {"listen": "0.0.0.0:7001"}});
    let path = format!("{ROUTERS}/node-1");
    assert_eq!(
        call(addr, "PATCH", &path, viewer, Some(("application/merge-patch+json", &patch))).await.0,
        403
    );
    assert_eq!(call(addr, "DELETE", &path, viewer, None).await.0, 403);
    assert_eq!(call(addr, "POST", "/v1/stream", viewer, None).await.0, 401, "not a proxy either");
    let (_, list) = operator(addr, "GET", ROUTERS, None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"][0]["spec"]["listen"], "0.0.0.0:7000");
    cp.stop().await;
}

#[tokio::test]
async fn watch_streams_changes_from_a_resource_version() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&database(&dir)).await;
    let addr = cp.local_addr;
    let (_, first) = operator(addr, "POST", ROUTERS, Some(&router("node-1", 7000))).await;
    let after_first = first["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    operator(addr, "POST", ROUTERS, Some(&router("node-2", 7000))).await;

    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {ROUTERS}?watch=true&resourceVersion={after_first} HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {OPERATOR}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut events = Vec::new();
    let read_event = async |reader: &mut BufReader<tokio::net::TcpStream>| loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        // Chunk-size lines of the chunked encoding are skipped: events are objects.
        if let Ok(event @ Value::Object(_)) = serde_json::from_str::<Value>(line.trim()) {
            return event;
        }
    };
    // The backlog: only what came after `after_first`.
    events.push(read_event(&mut reader).await);
    assert_eq!(
        (events[0]["type"].as_str(), events[0]["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("node-2"))
    );
    // Live changes follow.
    operator(addr, "DELETE", &format!("{ROUTERS}/node-1"), None).await;
    let deleted =
        tokio::time::timeout(std::time::Duration::from_secs(5), read_event(&mut reader)).await.unwrap();
    assert_eq!(
        (deleted["type"].as_str(), deleted["object"]["metadata"]["name"].as_str()),
        (Some("DELETED"), Some("node-1"))
    );
    cp.stop().await;
}

#[tokio::test]
async fn an_old_database_is_migrated_on_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = database(&dir);
    {
        // A database as the first release left it: schema version 1, one Router.
        let connection = rusqlite::Connection::open(&path).unwrap();
        connection
            .execute_batch(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);",
            )
            .unwrap();
        for (version, sql) in keel_control_plane::store::migrations_up_to(1) {
            connection.execute_batch(sql).unwrap();
            connection.execute("INSERT INTO schema_migrations VALUES (?1, 'then')", [version]).unwrap();
        }
        connection
            .execute(
                "INSERT INTO resources VALUES ('Router', '', 'old', 'u-1', 7, 1, '2025-01-01T00:00:00Z', '{\"zone\":\"a\"}', ?1, 'null')",
                [router("old", 7000)["spec"].to_string()],
            )
            .unwrap();
        connection.execute("UPDATE meta SET value = 7 WHERE key = 'revision'", []).unwrap();
    }
    let cp = start(&path).await;
    let (status, old) = operator(cp.local_addr, "GET", &format!("{ROUTERS}/old"), None).await;
    assert_eq!(status, 200, "{old}");
    assert_eq!(old["metadata"]["resourceVersion"], "7");
    assert_eq!(old["metadata"]["labels"]["zone"], "a");
    // The new columns and tables work: annotations are stored, and events are kept for watches.
    let patch = json!({"metadata": {"annotations": {"owner": "ops"}}});
    let (status, patched) = operator(cp.local_addr, "PATCH", &format!("{ROUTERS}/old"), Some(&patch)).await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["metadata"]["annotations"]["owner"], "ops");
    cp.stop().await;
    let connection = rusqlite::Connection::open(&path).unwrap();
    assert_eq!(keel_control_plane::store::schema_version(&connection).unwrap(), 5);

    // A database from a newer control plane is refused, not damaged.
    connection.execute("INSERT INTO schema_migrations VALUES (99, 'future')", []).unwrap();
    drop(connection);
    let error = keel_control_plane::ControlPlane::start(settings(&path, "127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("newer control plane"), "{error}");
}

#[tokio::test]
async fn public_ip_reports_speak_seed_000s_api() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&database(&dir)).await;
    let addr = cp.local_addr;
    let report = |token: &'static str, node: Option<&'static str>, body: &'static str| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let node = node.map(|node| format!("X-Keel-Node: {node}\r\n")).unwrap_or_default();
        let request = format!(
            "POST /api/v1/public-ip HTTP/1.1\r\nHost: cp\r\nX-API-Token: {token}\r\n{node}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut response).await.unwrap();
        let status: u16 = response.split(' ').nth(1).unwrap().parse().unwrap();
        (status, response.split_once("\r\n\r\n").unwrap().1.to_string())
    };
    assert_eq!(
        report("wrong", None, r#"{"ipAddress": "2001:db8::1"}"#).await,
        (401, "Invalid API token".to_string())
    );
    assert_eq!(
        report(PROXY, Some("gw-1"), r#"{"ipAddress": "2001:db8::1"}"#).await,
        (200, "Public IP updated successfully".to_string())
    );
    assert_eq!(report(PROXY, Some("gw-1"), r#"{"ipAddress": "2001:db8::2"}"#).await.0, 200);
    assert_eq!(report(PROXY, None, r#"{"ipAddress": "203.0.113.9"}"#).await.0, 200);
    assert_eq!(report(PROXY, Some("gw-1"), r#"{"ipAddress": "not-an-ip"}"#).await.0, 400);
    assert_eq!(report(PROXY, Some("gw-1"), r#"{"ip": "2001:db8::3"}"#).await.0, 400);

    let (status, body) = operator(addr, "GET", "/api/v1/public-ip", None).await;
    assert_eq!(status, 200, "{body}");
    let nodes = body["nodes"].as_array().unwrap();
    let gw = nodes.iter().find(|n| n["node"] == "gw-1").unwrap();
    assert_eq!(gw["address"], "2001:db8::2");
    assert_eq!(gw["history"].as_array().unwrap().len(), 2);
    // The seed's agents send no node name: they are known by their source address.
    assert!(nodes.iter().any(|n| n["node"] == "127.0.0.1" && n["address"] == "203.0.113.9"), "{body}");
    cp.stop().await;
}

/// `GET /api/v1/public-ip/{node}`: the address of a family a node last reported, for the other nodes'
/// reporters; with `known`, held until it changes.
#[tokio::test]
async fn a_nodes_address_can_be_read_and_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(&database(&dir)).await;
    let addr = cp.local_addr;
    let get = |path: &'static str, token: &'static str| api_token_call(addr, "GET", path, Some(token), None);
    assert_eq!(
        get("/api/v1/public-ip/gw-1", "wrong").await,
        (401, Value::String("Invalid API token".into()))
    );
    assert_eq!(get("/api/v1/public-ip/gw-1?family=ipv4", PROXY).await.0, 404);
    assert_eq!(get("/api/v1/public-ip/gw-1?family=ip5", PROXY).await.0, 400);
    assert_eq!(get("/api/v1/public-ip/gw-1?known=nonsense", PROXY).await.0, 400);

    report_address(addr, "203.0.113.5").await;
    report_address(addr, "2001:db8::5").await;
    let (status, body) = get("/api/v1/public-ip/gw-1?family=ipv4", PROXY).await;
    assert_eq!((status, &body["ipAddress"], &body["node"]), (200, &json!("203.0.113.5"), &json!("gw-1")));
    assert!(body["reportedAt"].is_string());
    assert_eq!(get("/api/v1/public-ip/gw-1", PROXY).await.1["ipAddress"], "2001:db8::5");

    // Known and unchanged: held until the wait runs out, then the same address.
    let started = std::time::Instant::now();
    let (_, body) = get("/api/v1/public-ip/gw-1?family=ipv4&known=203.0.113.5&wait=1", PROXY).await;
    assert_eq!(body["ipAddress"], "203.0.113.5");
    assert!(started.elapsed() >= Duration::from_millis(900), "{:?}", started.elapsed());
    // A report of the other family does not end it; one of this family does, at once.
    let waiting = tokio::spawn(get("/api/v1/public-ip/gw-1?family=ipv4&known=203.0.113.5&wait=30", PROXY));
    tokio::time::sleep(Duration::from_millis(200)).await;
    report_address(addr, "2001:db8::6").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished());
    let reported = std::time::Instant::now();
    report_address(addr, "203.0.113.6").await;
    let (status, body) = waiting.await.unwrap();
    assert_eq!((status, body["ipAddress"].as_str()), (200, Some("203.0.113.6")));
    assert!(reported.elapsed() < Duration::from_millis(500), "{:?}", reported.elapsed());
    cp.stop().await;
}
