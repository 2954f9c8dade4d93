//! keel.yaml loading as a user meets it: real text in, every error out with its path and line:column.

use keel_schemas::{MapEnvironment, json_schema, load};
use serde_json::Value;

/// A config that sets every field of every table, so every table can be probed for unknown keys.
const FULL: &str = r#"
node:
  id: edge-1
  cluster: eu-west
  labels: {role: sidecar}
admin:
  address: 127.0.0.1:9901
  token_file: /run/secrets/admin-token
listeners:
  - name: web
    address: 127.0.0.1:8080
    cluster: web
    idle_timeout: 10m
    max_connections: 1000
    allowed_sources: [10.0.0.0/8, 127.0.0.1]
clusters:
  - name: web
    endpoints: [127.0.0.1:8081, "backend.internal:8081"]
    load_balancing: least_connections
    connect_timeout: 2s
    connect_attempts: 2
    health_check: {interval: 5s, timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 3}
    outlier_detection: {consecutive_failures: 5, base_ejection_time: 30s, max_ejection_percent: 50}
drain_timeout: 20s
dns:
  listen: ["127.0.0.2:5353"]
  namespace: default
  cluster_domain: cluster.local
  ip_range: 127.0.66.0/24
  ttl: 30s
  hijack:
    - {service: mysql, namespace: db, address: 127.0.66.10}
    - {name: "*.internal.example"}
  upstreams: ["10.96.0.10:53"]
  upstream_timeout: 2s
  max_in_flight: 512
  cache: {size: 1000, min_ttl: 5s, max_ttl: 10m, negative_ttl: 1m, serve_stale: 2m}
"#;

fn env() -> MapEnvironment {
    MapEnvironment::default().with_file("/run/secrets/admin-token", "s3cret\n")
}

fn errors(text: &str) -> Vec<String> {
    match load(text, "keel.yaml", &env()) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.lines(),
    }
}

#[test]
fn full_config_loads_with_secret_from_file() {
    let config = load(FULL, "keel.yaml", &env()).unwrap();
    assert_eq!(config.admin.token.as_ref().unwrap().expose(), "s3cret");
    assert_eq!(config.listeners[0].allowed_sources.len(), 2);
    let dump = serde_json::to_string(config.config()).unwrap();
    assert!(!dump.contains("s3cret"), "a dump must mask secrets: {dump}");
    assert!(!format!("{config:?}").contains("s3cret"));
}

#[test]
fn empty_file_is_a_valid_config_with_defaults() {
    let config = load("", "keel.yaml", &env()).unwrap();
    assert_eq!(config.admin.address.to_string(), "127.0.0.1:9901");
    assert!(config.listeners.is_empty());
}

/// Every mapping in `value`, as (path, pointer) pairs.
fn tables(value: &Value, pointer: String, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            out.push(pointer.clone());
            for (key, child) in map {
                // labels is a free-form map: any key is allowed there.
                if key != "labels" {
                    tables(child, format!("{pointer}/{key}"), out);
                }
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                tables(child, format!("{pointer}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn an_unknown_key_in_any_table_is_rejected() {
    let config = load(FULL, "keel.yaml", &env()).unwrap();
    let mut value = serde_json::to_value(config.config()).unwrap();
    // The dump masks the token; drop it so the probe config stays valid apart from the extra key.
    value["admin"].as_object_mut().unwrap().remove("token");
    let mut pointers = Vec::new();
    tables(&value, String::new(), &mut pointers);
    assert!(pointers.len() >= 11, "expected every table to be probed, got {pointers:?}");
    for pointer in pointers {
        let mut probe = value.clone();
        probe.pointer_mut(&pointer).unwrap().as_object_mut().unwrap().insert("bogus_key".into(), 1.into());
        // JSON is YAML: feed the probe back through the YAML loader.
        let text = serde_json::to_string_pretty(&probe).unwrap();
        let lines = errors(&text);
        assert_eq!(lines.len(), 1, "{pointer}: {lines:?}");
        assert!(lines[0].contains("unknown key") && lines[0].contains("bogus_key"), "{pointer}: {lines:?}");
    }
}

#[test]
fn each_class_of_error_names_path_and_line_column() {
    let cases: &[(&str, &str)] = &[
        // unknown key, at the key
        (
            "listeners:\n  - name: a\n    adress: 127.0.0.1:1\n",
            "keel.yaml:3:5: listeners[0].adress: unknown key `adress`",
        ),
        // wrong type, at the value
        (
            "clusters:\n  - name: c\n    endpoints: [127.0.0.1:1]\n    connect_attempts: many\n",
            "keel.yaml:4:23: clusters[0].connect_attempts: invalid type: string \"many\", expected u32",
        ),
        // bad duration
        ("drain_timeout: 5\n", "keel.yaml:1:16: drain_timeout: invalid type: integer `5`, expected"),
        ("drain_timeout: 5 seconds\n", "keel.yaml:1:16: drain_timeout: invalid duration \"5 seconds\""),
        // bad address
        (
            "admin:\n  address: localhost\n",
            "keel.yaml:2:12: admin.address: invalid address \"localhost\": expected IP:port",
        ),
        // bad enum
        (
            "clusters:\n  - name: c\n    endpoints: [127.0.0.1:1]\n    load_balancing: fastest\n",
            "keel.yaml:4:21: clusters[0].load_balancing: unknown variant `fastest`",
        ),
        // missing field, at the mapping
        ("clusters:\n  - name: c\n", "keel.yaml:2:5: clusters[0]: missing field `endpoints`"),
        // dangling reference
        (
            "listeners:\n  - name: a\n    address: 127.0.0.1:1000\n    cluster: db\n",
            "keel.yaml:4:14: listeners[0].cluster: no cluster named \"db\" (no clusters are defined)",
        ),
        // bad CIDR
        (
            "listeners:\n  - name: a\n    address: 127.0.0.1:1000\n    cluster: db\n    allowed_sources: [10.0.0.1/8]\n",
            "keel.yaml:5:23: listeners[0].allowed_sources[0]: invalid CIDR \"10.0.0.1/8\": host bits are set",
        ),
        // unset variable
        (
            "admin:\n  address: ${ADMIN_ADDR}\n",
            "keel.yaml:2:12: admin.address: environment variable ADMIN_ADDR is not set",
        ),
        // unreadable secret file
        ("admin:\n  token_file: /nope\n", "keel.yaml:2:15: admin.token_file: cannot read /nope"),
        // YAML syntax
        ("listeners: [\n", "keel.yaml:2:1: invalid YAML"),
        // unknown section
        ("listner: []\n", "keel.yaml:1:1: listner: unknown key \"listner\", expected one of: node, admin"),
    ];
    for (text, expected) in cases {
        let lines = errors(text);
        assert!(
            lines.iter().any(|line| line.starts_with(expected)),
            "for {text:?}\nexpected a line starting with {expected:?}\ngot {lines:#?}"
        );
    }
}

#[test]
fn every_semantic_error_is_reported_at_once() {
    let text = r#"
listeners:
  - name: a
    address: 127.0.0.1:1000
    cluster: missing
  - name: a
    address: 0.0.0.0:1000
    cluster: c
    max_connections: 0
clusters:
  - name: c
    endpoints: [127.0.0.1:1, 127.0.0.1:1]
    health_check: {interval: 1s, timeout: 2s, healthy_threshold: 0}
  - name: c
    endpoints: []
    outlier_detection: {max_ejection_percent: 150}
"#;
    let lines = errors(text);
    let expected = [
        "keel.yaml:5:14: listeners[0].cluster: no cluster named \"missing\" (defined: c)",
        "keel.yaml:6:11: listeners[1].name: duplicate listener name \"a\" (also listeners[0])",
        "keel.yaml:9:22: listeners[1].max_connections: must be at least 1",
        "keel.yaml:7:14: listeners[1].address: address 0.0.0.0:1000 overlaps listeners[0] (127.0.0.1:1000)",
        "keel.yaml:12:30: clusters[0].endpoints[1]: duplicate endpoint 127.0.0.1:1 (also endpoints[0])",
        "keel.yaml:13:43: clusters[0].health_check.timeout: timeout 2s is longer than interval 1s",
        "keel.yaml:13:66: clusters[0].health_check.healthy_threshold: must be at least 1",
        "keel.yaml:14:11: clusters[1].name: duplicate cluster name \"c\" (also clusters[0])",
        "keel.yaml:15:16: clusters[1].endpoints: a cluster needs at least one endpoint",
        "keel.yaml:16:47: clusters[1].outlier_detection.max_ejection_percent: must be between 0 and 100",
    ];
    for line in expected {
        assert!(lines.iter().any(|l| l.starts_with(line)), "missing {line:?} in {lines:#?}");
    }
    assert_eq!(lines.len(), expected.len(), "{lines:#?}");
}

#[test]
fn structural_errors_in_several_items_are_all_reported() {
    let text = "listeners:\n  - name: a\n    bogus: 1\n  - name: b\n    address: nowhere\nclusters: 5\n";
    let lines = errors(text);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(lines[0].starts_with("keel.yaml:3:5: listeners[0].bogus: unknown key"));
    assert!(lines[1].starts_with("keel.yaml:5:14: listeners[1].address: invalid address"));
    assert!(lines[2].starts_with("keel.yaml:6:11: clusters: invalid type: integer `5`, expected a sequence"));
}

#[test]
fn interpolation_fills_values_from_the_environment() {
    let env = MapEnvironment::default().with_var("UPSTREAM", "10.1.2.3:5432").with_var("PORT", "7000");
    let text = "listeners:\n  - {name: db, address: \"127.0.0.1:${PORT}\", cluster: db}\nclusters:\n  - name: db\n    endpoints: [\"${UPSTREAM}\"]\n    connect_attempts: ${ATTEMPTS:-2}\n";
    let config = load(text, "keel.yaml", &env).unwrap();
    assert_eq!(config.listeners[0].address.to_string(), "127.0.0.1:7000");
    assert_eq!(config.clusters[0].endpoints[0].to_string(), "10.1.2.3:5432");
    assert_eq!(config.clusters[0].connect_attempts, 2);
}

#[test]
fn committed_json_schema_is_current() {
    let committed = include_str!("../keel.schema.json");
    assert!(
        committed == keel_schemas::json_schema_text(),
        "schemas/keel.schema.json is stale: run `cargo run -p keel-schemas --example print-schema > schemas/keel.schema.json`"
    );
}

#[test]
fn schema_lists_every_section_the_loader_knows() {
    let schema = json_schema();
    let mut properties: Vec<&String> = schema["properties"].as_object().unwrap().keys().collect();
    properties.sort();
    let mut sections = [
        "node",
        "admin",
        "listeners",
        "clusters",
        "drain_timeout",
        "dns",
        "tunnels",
        "reporters",
        "probes",
        "control_plane",
    ];
    sections.sort();
    assert_eq!(properties, sections);
    // Every section is actually checked by the per-section pass: an invalid value is reported as a type
    // error of that section, never as an unknown key.
    for section in sections {
        let lines = errors(&format!("{section}: !!str 12345\n"));
        assert_eq!(lines.len(), 1, "{section}: {lines:?}");
        assert!(!lines[0].contains("unknown key"), "{section}: {lines:?}");
    }
}

#[test]
fn every_example_validates() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut seen = 0;
    let mut paths: Vec<std::path::PathBuf> = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            paths.extend(std::fs::read_dir(&path).unwrap().map(|entry| entry.unwrap().path()));
        } else {
            paths.push(path);
        }
    }
    for path in paths {
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // Editors complete it: the first line points yaml-language-server at the committed schema.
        let schema = text
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("# yaml-language-server: $schema="))
            .unwrap_or_else(|| panic!("{}: no yaml-language-server modeline", path.display()));
        let schema = path.parent().unwrap().join(schema);
        assert!(schema.ends_with("schemas/keel.schema.json") && schema.exists(), "{}", schema.display());
        // The secret files the examples name, as a Kubernetes Secret mount would provide them.
        let env = MapEnvironment::default()
            .with_file("/run/secrets/router-token", "router-token\n")
            .with_file("/run/secrets/mysql-tunnel", "mysql-secret\n")
            .with_file("/run/secrets/api-token", "api-token\n")
            .with_file("/run/secrets/tsig", "a2VlbC10ZXN0LWtleS0zMi1ieXRlcy1sb25nLi4uLi4=\n");
        if let Err(errors) = load(&text, &path.display().to_string(), &env) {
            panic!("{errors}");
        }
        seen += 1;
    }
    assert!(seen >= 8, "expected examples in {dir}");
}

#[test]
fn secrets_are_never_lost_or_quoted() {
    // A variable that expands to nothing is an empty token (an error), never "no token".
    let env = MapEnvironment::default().with_var("EMPTY", "");
    let error = load("admin:\n  token: ${EMPTY}\n", "keel.yaml", &env).unwrap_err().to_string();
    assert!(error.contains("keel.yaml:2:10: admin.token: the token is empty"), "{error}");
    let error = load("admin:\n  token: ${UNSET:-}\n", "keel.yaml", &env).unwrap_err().to_string();
    assert!(error.contains("admin.token: the token is empty"), "{error}");
    // A key with no value is an error too.
    let error = load("admin:\n  token:\n", "keel.yaml", &env).unwrap_err().to_string();
    assert!(error.contains("admin.token: the secret has no value"), "{error}");
    // A numeric token is a token, and a wrong type is reported without the value.
    let config = load("admin:\n  token: 123456\n", "keel.yaml", &env).unwrap();
    assert_eq!(config.admin.token.as_ref().unwrap().expose(), "123456");
    let error = load("admin:\n  token: {value: 987654}\n", "keel.yaml", &env).unwrap_err().to_string();
    assert!(error.contains("expected a secret") && !error.contains("987654"), "{error}");
}

#[test]
fn dns_section_errors_are_located() {
    let text = r#"
listeners:
  - {name: web, address: "127.0.0.2:53", cluster: c}
clusters:
  - {name: c, endpoints: ["127.0.0.1:1"]}
dns:
  listen: ["127.0.0.2:53"]
  namespace: "bad.ns"
  hijack:
    - service: mysql
      name: mysql.example
    - {service: "two.labels"}
    - {name: "*.ok.example", namespace: x}
  upstreams: ["10.0.0.10:53", "127.0.0.2:53"]
  cache: {min_ttl: 2h, max_ttl: 1h}
  workers: 0
"#;
    let lines = errors(text);
    let expected = [
        "keel.yaml:7:12: dns.listen[0]: address 127.0.0.2:53 overlaps listeners[0] (127.0.0.2:53)",
        "keel.yaml:8:14: dns.namespace: invalid namespace \"bad.ns\"",
        "keel.yaml:10:7: dns.hijack[0]: give either service (a Kubernetes service name) or name (a DNS name)",
        "keel.yaml:12:17: dns.hijack[1].service: invalid service name \"two.labels\": one DNS label",
        "keel.yaml:13:41: dns.hijack[2].namespace: namespace goes with service, not with name",
        "keel.yaml:14:31: dns.upstreams[1]: 127.0.0.2:53 is this DNS server itself (dns.listen[0]): forwarding there would loop",
        "keel.yaml:15:20: dns.cache.min_ttl: min_ttl 2h is longer than max_ttl 1h",
        "keel.yaml:16:12: dns.workers: must be between 1 and 64",
    ];
    for line in expected {
        assert!(lines.iter().any(|l| l.starts_with(line)), "missing {line:?} in {lines:#?}");
    }
    assert_eq!(lines.len(), expected.len(), "{lines:#?}");
}

#[test]
fn a_wildcard_listen_address_still_detects_the_loop() {
    let lines =
        errors("dns:\n  listen: [\"0.0.0.0:5353\"]\n  upstreams: [\"127.0.0.1:5353\", \"127.0.0.1:53\"]\n");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("dns.upstreams[0]: 127.0.0.1:5353 is this DNS server itself"), "{lines:#?}");
}

#[test]
fn dns_defaults_follow_the_seed_sidecar() {
    let config = load("dns:\n  hijack: [{service: mysql}]\n", "keel.yaml", &env()).unwrap();
    let dns = config.dns.as_ref().unwrap();
    assert_eq!(dns.listen[0].to_string(), "127.0.0.2:53");
    assert_eq!(dns.ip_range.to_string(), "127.0.66.0/24");
    assert_eq!(dns.ttl.to_string(), "30s");
    assert_eq!((dns.namespace.as_str(), dns.cluster_domain.as_str()), ("default", "cluster.local"));
    assert_eq!(dns.workers, 1);
}

#[test]
fn tunnel_errors_are_located() {
    let text = r#"
admin: {address: "127.0.0.1:9901"}
tunnels:
  server: {listen: "127.0.0.1:9901"}
  routers:
    - {name: a, address: "router.example:7000", token: t}
    - {name: a, address: "router.example:7001", token: t, token_file: /x}
  publish:
    - {name: "my.sql", local: "127.0.0.1:3306", routers: [b], pool: 0}
  visit:
    - {name: redis, secret: s, port: 6379}
    - {name: pg, secret: s}
"#;
    let lines = errors(text);
    let expected = [
        "keel.yaml:4:20: tunnels.server.listen: address 127.0.0.1:9901 overlaps admin.address",
        "keel.yaml:4:11: tunnels.server: give token or token_file",
        "keel.yaml:7:14: tunnels.routers[1].name: duplicate router name \"a\" (first at tunnels.routers[0])",
        "keel.yaml:7:71: tunnels.routers[1].token_file: set either token or token_file, not both",
        "keel.yaml:9:14: tunnels.publish[0].name: invalid service name \"my.sql\": one DNS label",
        "keel.yaml:9:7: tunnels.publish[0]: give secret or secret_file",
        "keel.yaml:9:59: tunnels.publish[0].routers[0]: no router named \"b\" in tunnels.routers (known: a, a)",
        "keel.yaml:9:69: tunnels.publish[0].pool: must be between 1 and 64",
        "keel.yaml:11:38: tunnels.visit[0].port: a port without listen needs a dns section",
        "keel.yaml:12:7: tunnels.visit[1]: give listen (an address), or port (on the service's VIP, with dns)",
    ];
    for line in expected {
        assert!(lines.iter().any(|l| l.starts_with(line)), "missing {line:?} in {lines:#?}");
    }
    assert_eq!(lines.len(), expected.len(), "{lines:#?}");
}

#[test]
fn a_visited_service_on_a_port_gets_a_hijacked_vip() {
    let text = r#"
dns:
  hijack: [{service: mysql, address: 127.0.66.9}]
tunnels:
  routers: [{name: r, address: "10.0.0.1:7000", token_file: /run/token}]
  visit:
    - {name: mysql, secret: s, port: 3306}
    - {name: redis, secret: s, port: 6379, namespace: cache}
    - {name: pg, secret: s, listen: "127.0.0.1:5432"}
"#;
    let env = env().with_file("/run/token", "router-token\n");
    let config = load(text, "keel.yaml", &env).unwrap();
    let dns = config.dns.as_ref().unwrap();
    // mysql was hijacked already (its pinned VIP stands); redis is added; pg has an address of its own.
    assert_eq!(dns.hijack.len(), 2, "{:#?}", dns.hijack);
    assert_eq!(dns.hijack[1].service.as_deref(), Some("redis"));
    assert_eq!(dns.hijack[1].namespace.as_deref(), Some("cache"));
    let tunnels = config.tunnels.as_ref().unwrap();
    assert_eq!(tunnels.routers[0].token.as_ref().unwrap().expose(), "router-token");
    let table = keel_schemas::dns::HijackTable::build(dns, None).unwrap();
    let name = keel_schemas::dns::visited_service_name(&tunnels.visit[1], dns);
    assert_eq!(name, "redis.cache.svc.cluster.local");
    assert!(table.lookup(&name).is_some());
    assert_eq!(table.lookup("mysql").unwrap().to_string(), "127.0.66.9");
    // The dump shows the added entry, and the secrets masked.
    let dumped = serde_json::to_string(config.config()).unwrap();
    assert!(!dumped.contains("router-token") && !dumped.contains("\"s\""), "{dumped}");
}

#[test]
fn reporter_source_and_sink_errors_are_located() {
    let text = r#"
reporters:
  - name: follow
    source: {control_plane: {url: "https://cp:7080", token_file: /run/secrets/admin-token, node: "a/b"}}
    sink: {control_plane: {url: "http://cp:7080"}}
  - name: direct
    source: {static: 192.0.2.1}
    sink:
      dns:
        zone: "example..com"
        name: "gw"
        ttl: 0s
        provider: {alibaba: {access_key_id: "LTAI-5t", access_key_secret_file: /run/secrets/missing}}
  - name: bind
    source: {static: 192.0.2.1}
    sink:
      dns:
        zone: example.com
        name: gw.example.org.
        provider: {rfc2136: {server: "127.0.0.1:53", key_name: keel, algorithm: hmac-md5, secret_file: /run/secrets/admin-token}}
"#;
    let lines = errors(text);
    let expected = [
        "keel.yaml:4:35: reporters[0].source.control_plane.url: https is not supported for reports yet",
        "keel.yaml:4:98: reporters[0].source.control_plane.node: invalid node name \"a/b\"",
        "keel.yaml:5:27: reporters[0].sink.control_plane: give token or token_file",
        "keel.yaml:10:15: reporters[1].sink.dns.zone: invalid zone name \"example..com\"",
        "keel.yaml:12:14: reporters[1].sink.dns.ttl: must be longer than 0s",
        "keel.yaml:13:45: reporters[1].sink.dns.provider.alibaba.access_key_id: an AccessKey ID is letters and digits",
        "keel.yaml:19:15: reporters[2].sink.dns.name: gw.example.org. is not in zone example.com.",
        "keel.yaml:20:81: reporters[2].sink.dns.provider.rfc2136.algorithm: only hmac-sha256 is supported",
    ];
    for line in expected {
        assert!(lines.iter().any(|l| l.starts_with(line)), "missing {line:?} in {lines:#?}");
    }
    assert_eq!(lines.len(), expected.len(), "{lines:#?}");
    // Once the rest is valid, the provider's credential files must be readable (they are read again at
    // each update, so they can be rotated).
    let text = "reporters:\n  - name: direct\n    source: {static: 192.0.2.1}\n    sink: {dns: {zone: example.com, name: gw, provider: {gandi: {api_token_file: /run/secrets/missing}}}}\n";
    assert_eq!(
        errors(text),
        [
            "keel.yaml:4:82: reporters[0].sink.dns.provider.gandi.api_token_file: cannot read /run/secrets/missing: No such file or directory"
        ]
    );
}

#[test]
fn probe_errors_are_located() {
    let text = r#"
probes:
  - name: none
  - name: two
    tcp: {targets: ["127.0.0.1:22"]}
    icmp: {targets: [127.0.0.1]}
  - name: slow
    http: {targets: ["ftp://x"], expected_status: [700]}
    interval: 1s
    timeout: 2s
    failure_threshold: 0
  - name: slow
    icmp: {targets: [0.0.0.0]}
  - name: resolve
    dns: {targets: ["bad..name"], port: 0}
  - name: loss
    udp: {targets: ["127.0.0.1:7"], packets: 0}
  - name: empty
    tcp: {targets: []}
"#;
    let lines = errors(text);
    let expected = [
        "keel.yaml:3:5: probes[0]: give exactly one of icmp, tcp, http, dns, udp",
        "keel.yaml:4:5: probes[1]: give exactly one of icmp, tcp, http, dns, udp",
        "keel.yaml:10:14: probes[2].timeout: timeout 2s is longer than interval 1s",
        "keel.yaml:11:24: probes[2].failure_threshold: must be at least 1",
        "keel.yaml:8:22: probes[2].http.targets[0]: \"ftp://x\": give an http:// or https:// URL",
        "keel.yaml:8:52: probes[2].http.expected_status[0]: 700 is not an HTTP status",
        "keel.yaml:12:11: probes[3].name: duplicate probe name \"slow\" (also probes[2])",
        "keel.yaml:13:22: probes[3].icmp.targets[0]: 0.0.0.0 cannot answer an echo request",
        "keel.yaml:15:21: probes[4].dns.targets[0]: invalid name \"bad..name\"",
        "keel.yaml:15:41: probes[4].dns.port: port 0 cannot be connected to",
        "keel.yaml:17:46: probes[5].udp.packets: must be between 1 and 100",
        "keel.yaml:19:20: probes[6].tcp.targets: give at least one target",
    ];
    for line in expected {
        assert!(lines.iter().any(|l| l.starts_with(line)), "missing {line:?} in {lines:#?}");
    }
    assert_eq!(lines.len(), expected.len(), "{lines:#?}");
    // A valid one, with its defaults.
    let config =
        load("probes:\n  - name: mesh\n    icmp: {targets: [10.0.0.2, \"fd00::2\"]}\n", "keel.yaml", &env())
            .unwrap();
    let probe = &config.probes[0];
    assert_eq!((probe.kind(), probe.targets().len()), (Some("icmp"), 2));
    assert_eq!(
        (probe.interval.to_string(), probe.timeout.to_string(), probe.failure_threshold),
        ("5s".into(), "1s".into(), 3)
    );
}
