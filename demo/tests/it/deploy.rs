//! deploy/, checked for real: the kustomize overlays render with kubectl and validate against
//! Kubernetes' schemas; the rendered pods follow Keel's rules (non-root, no capability, no API token) and
//! every keel.yaml they mount loads; the alerts pass `promtool check rules` and their unit tests; every
//! metric the alerts and the dashboard read is one Keel exports, scraped live from a running demo and
//! checked with `promtool check metrics`; configure.sh creates its resources in a real control plane.
//!
//! kubectl and kubernetes-validate come from `.ci/install-test-deps` (/opt/keel-test-tools); without them
//! these tests say so and pass, except in CI, which must run them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn kubernetes() -> PathBuf {
    repository().join("deploy/kubernetes")
}

/// The test tools' directory, if installed.
fn tools() -> Option<PathBuf> {
    let dir = std::env::var_os("KEEL_TEST_TOOLS")
        .map_or_else(|| PathBuf::from("/opt/keel-test-tools"), PathBuf::from);
    if dir.join("bin/kubectl").exists() && dir.join("bin/kubernetes-validate").exists() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the deploy tests: .ci/install-test-deps installs their tools"
    );
    eprintln!(
        "skipped: kubectl and kubernetes-validate are not in {} (.ci/install-test-deps)",
        dir.display()
    );
    None
}

fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("{}: {error}", program.display()));
    child.stdin.take().unwrap().write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `kubectl kustomize DIR`, as YAML and as a list of objects.
fn render(tools: &Path, dir: &str) -> (String, Vec<Value>) {
    let path = kubernetes().join(dir);
    let (ok, yaml, stderr) = run(&tools.join("bin/kubectl"), &["kustomize", path.to_str().unwrap()], None);
    assert!(ok, "kubectl kustomize {dir}: {stderr}");
    let script =
        "import sys, json, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)";
    let (ok, json, stderr) = run(&tools.join("bin/python3"), &["-c", script], Some(&yaml));
    assert!(ok, "{stderr}");
    (yaml, serde_json::from_str(&json).unwrap())
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|object| object["kind"] == kind && object["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn pod_spec(object: &Value) -> Option<&Value> {
    matches!(object["kind"].as_str(), Some("Deployment" | "DaemonSet" | "StatefulSet"))
        .then(|| &object["spec"]["template"]["spec"])
}

fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    pod["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(pod["containers"].as_array().into_iter().flatten())
}

#[test]
fn the_overlays_render_and_validate_against_kubernetes_schemas() {
    let Some(tools) = tools() else { return };
    let dir = tempfile::tempdir().unwrap();
    for overlay in ["overlays/development", "overlays/production"] {
        let (yaml, objects) = render(&tools, overlay);
        let file = dir.path().join(overlay.replace('/', "-") + ".yaml");
        std::fs::write(&file, &yaml).unwrap();
        let (ok, stdout, stderr) = run(
            &tools.join("bin/kubernetes-validate"),
            &["--strict", "--kubernetes-version", "1.33", file.to_str().unwrap()],
            None,
        );
        let said = format!("{stdout}{stderr}");
        assert!(ok, "{overlay}:\n{said}");
        // Every object was checked, except the Prometheus operator's kinds (no schema offline; the
        // monitoring test checks them against what they select).
        let validated = said.lines().filter(|line| line.contains(" passed for resource ")).count();
        let operator_kinds =
            objects.iter().filter(|object| object["apiVersion"] == "monitoring.coreos.com/v1").count();
        assert_eq!(validated + operator_kinds, objects.len(), "{overlay}:\n{said}");
        for line in said.lines().filter(|line| line.contains("Couldn't find schema")) {
            assert!(line.contains("monitoring.coreos.com/v1"), "{overlay}: {line}");
        }
    }
}

#[test]
fn pods_run_unprivileged_and_need_no_kubernetes_api() {
    let Some(tools) = tools() else { return };
    let (_, objects) = render(&tools, "overlays/development");
    let mut pods = 0;
    for object in &objects {
        let kind = object["kind"].as_str().unwrap();
        let name = object["metadata"]["name"].as_str().unwrap();
        assert!(
            !matches!(kind, "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding"),
            "Keel needs no Kubernetes API permission, yet {kind} {name} grants some"
        );
        if kind == "ServiceAccount" {
            assert_eq!(object["automountServiceAccountToken"], false, "{name}");
        }
        let Some(pod) = pod_spec(object) else { continue };
        pods += 1;
        assert_eq!(pod["automountServiceAccountToken"], false, "{name}: no API token in the pod");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault", "{name}");
        for container in containers(pod) {
            let context = &container["securityContext"];
            let container_name = container["name"].as_str().unwrap();
            assert_eq!(context["allowPrivilegeEscalation"], false, "{name}/{container_name}");
            assert_eq!(
                context["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{name}/{container_name}"
            );
            assert!(context["capabilities"]["add"].is_null(), "{name}/{container_name} adds a capability");
            assert_ne!(context["privileged"], true, "{name}/{container_name}");
            let image = container["image"].as_str().unwrap();
            if image.starts_with("keel/") {
                assert_eq!(context["readOnlyRootFilesystem"], true, "{name}/{container_name}");
                // Probes name ports the container has.
                let ports: BTreeSet<&str> = container["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|port| port["name"].as_str())
                    .collect();
                for probe in ["readinessProbe", "livenessProbe"] {
                    let port = container[probe]["httpGet"]["port"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{name}: {probe}"));
                    assert!(ports.contains(port), "{name}/{container_name}: {probe} on unknown port {port}");
                }
            }
        }
        // Every Secret and ConfigMap a pod mounts is in the rendering, in the pod's namespace.
        let namespace = object["metadata"]["namespace"].as_str().unwrap();
        for volume in pod["volumes"].as_array().into_iter().flatten() {
            for (key, kind, field) in [("secret", "Secret", "secretName"), ("configMap", "ConfigMap", "name")]
            {
                if let Some(wanted) = volume[key][field].as_str() {
                    assert!(
                        objects.iter().any(|other| other["kind"] == kind
                            && other["metadata"]["name"] == wanted
                            && other["metadata"]["namespace"] == namespace),
                        "{name} mounts {kind} {namespace}/{wanted}, which is not rendered"
                    );
                }
            }
        }
    }
    assert_eq!(pods, 5, "control plane, router, DDNS agent, example web and client");

    // Only the DDNS agent has the host's network, and the routers a host port.
    for object in objects.iter().filter(|object| pod_spec(object).is_some()) {
        let name = object["metadata"]["name"].as_str().unwrap();
        let pod = pod_spec(object).unwrap();
        assert_eq!(pod["hostNetwork"] == true, name == "keel-ddns-agent", "{name}");
    }

    // The application pod: DNS from the sidecar, which is a native sidecar started first.
    let client = pod_spec(named(&objects, "Deployment", "example-client")).unwrap();
    assert_eq!(client["dnsPolicy"], "None");
    assert_eq!(client["dnsConfig"]["nameservers"], serde_json::json!(["127.0.0.2"]));
    let sidecar = &client["initContainers"][0];
    assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar: before the app, stopped after it");
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/ready");
    let sysctls: BTreeSet<&str> = client["securityContext"]["sysctls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sysctl| sysctl["name"].as_str().unwrap())
        .collect();
    assert!(sysctls.contains("net.ipv4.ip_unprivileged_port_start"), "port 53 without NET_BIND_SERVICE");
    assert!(sysctls.contains("net.ipv4.ping_group_range"), "ICMP probes without NET_RAW");
    let namespace = named(&objects, "Namespace", "keel-example");
    assert_eq!(namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "restricted");
}

/// The keel.yaml ConfigMaps load as the proxy loads them, with the pod's environment and secret files.
#[test]
fn every_mounted_keel_yaml_loads() {
    let Some(tools) = tools() else { return };
    let (_, objects) = render(&tools, "overlays/development");
    // The pod's environment, with token files holding `token` (the Secrets' keys, mounted).
    let env = |token: &str| {
        keel_schemas::MapEnvironment::default()
            .with_var("NODE_NAME", "node-a")
            .with_var("POD_NAME", "example-client-7d9f")
            .with_var("POD_IP", "10.0.0.7")
            .with_var("APP", "example-client")
            .with_file("/etc/keel/admin/token", token)
            .with_file("/etc/keel/proxy-token/token", token)
    };
    let mut loaded = 0;
    for object in objects.iter().filter(|object| object["kind"] == "ConfigMap") {
        let Some(text) = object["data"]["keel.yaml"].as_str() else { continue };
        let name = object["metadata"]["name"].as_str().unwrap();
        let config = keel_proxy::source::load_text(text, name, &env("dev-token\n"))
            .unwrap_or_else(|error| panic!("{error}"));
        loaded += 1;
        // Its admin address is the port its pods' probes use.
        let port = config.config.config().admin.address.0.port();
        let uses = objects.iter().filter_map(pod_spec).flat_map(containers).any(|container| {
            container["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|mount| mount["mountPath"] == "/etc/keel/config")
                && container["ports"].as_array().into_iter().flatten().any(|p| p["containerPort"] == port)
        });
        assert!(uses, "{name}: no pod has a port {port} for its admin API");

        // The base's empty token Secret is refused rather than run without a token.
        let error =
            keel_proxy::source::load_text(text, name, &env("")).expect_err("an empty token file is refused");
        assert!(error.to_string().contains("empty"), "{name}: {error}");
    }
    assert_eq!(loaded, 3, "router, DDNS agent, sidecar");
}

/// Collects the PromQL expressions of the PrometheusRule and the dashboard.
fn expressions(objects: &[Value]) -> (Value, Vec<String>) {
    let rules = named(objects, "PrometheusRule", "keel");
    let dashboard: Value = serde_json::from_str(
        named(objects, "ConfigMap", "keel-grafana-dashboard")["data"]["keel.json"].as_str().unwrap(),
    )
    .unwrap();
    let mut exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|target| target["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 15, "the dashboard has {} queries", exprs.len());
    for group in rules["spec"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            exprs.push(rule["expr"].as_str().unwrap().to_string());
        }
    }
    (rules["spec"].clone(), exprs)
}

#[test]
fn the_alerts_pass_promtool_and_fire_on_what_they_are_for() {
    let Some(tools) = tools() else { return };
    let Ok(promtool) = which("promtool") else {
        panic!("promtool is needed (.ci/install-test-deps)");
    };
    let (_, objects) = render(&tools, "overlays/production");
    let (spec, exprs) = expressions(&objects);
    let dir = tempfile::tempdir().unwrap();
    // JSON is YAML: the PrometheusRule's spec is a rules file.
    std::fs::write(dir.path().join("keel-rules.yaml"), spec.to_string()).unwrap();
    std::fs::copy(kubernetes().join("monitoring/rules-test.yaml"), dir.path().join("rules-test.yaml"))
        .unwrap();
    let in_dir = |args: &[&str]| {
        let output = Command::new(&promtool).args(args).current_dir(dir.path()).output().unwrap();
        let said =
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "promtool {args:?}:\n{said}");
        said
    };
    let said = in_dir(&["check", "rules", "keel-rules.yaml"]);
    assert!(said.contains("SUCCESS: 12 rules found"), "{said}");
    in_dir(&["test", "rules", "rules-test.yaml"]);
    // Every alert has a unit test.
    let tests = std::fs::read_to_string(kubernetes().join("monitoring/rules-test.yaml")).unwrap();
    for group in spec["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let alert = rule["alert"].as_str().unwrap();
            assert!(tests.contains(&format!("alertname: {alert}\n")), "{alert} has no test");
        }
    }
    // The dashboard's queries parse too (as recording rules).
    let recording: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(index, expr)| serde_json::json!({"record": format!("keel:dashboard_query_{index}"), "expr": expr}))
        .collect();
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": recording}]});
    std::fs::write(dir.path().join("dashboard-rules.yaml"), file.to_string()).unwrap();
    in_dir(&["check", "rules", "dashboard-rules.yaml"]);
}

fn which(program: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.exists())
        .ok_or(())
}

/// `keel_*` metric names in a PromQL expression, with the histogram suffixes taken off.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("keel_") {
        let tail = &rest[start..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let base =
            ["_bucket", "_sum", "_count"].iter().find_map(|suffix| name.strip_suffix(suffix)).unwrap_or(name);
        names.insert(base.to_string());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alerts_and_dashboard_read_is_exported() {
    let Some(tools) = tools() else { return };
    let (_, objects) = render(&tools, "overlays/production");
    let (_, exprs) = expressions(&objects);
    let wanted: BTreeSet<String> = exprs.iter().flat_map(|expr| metric_names(expr)).collect();
    assert!(wanted.len() > 20, "{wanted:?}");

    // A running demo: the control plane and three proxies, scraped as Prometheus would.
    let dir = tempfile::tempdir().unwrap();
    let host: std::net::IpAddr =
        format!("127.{}.{}.1", 100 + std::process::id() % 100, 210 + std::process::id() % 40)
            .parse()
            .unwrap();
    let plan = keel_demo::Plan {
        host,
        base_port: 21000,
        vip_range: format!("127.{}.250.0/24", 100 + std::process::id() % 100).parse().unwrap(),
        dns_upstreams: Vec::new(),
    };
    let demo = keel_demo::Demo::start(plan.clone(), dir.path()).await.unwrap();
    demo.check().await.unwrap();
    let mut exported: BTreeSet<String> = keel_proxy::metrics::metric_names().map(String::from).collect();
    let mut pages = vec![format!("http://{}/metrics", plan.control_plane())];
    pages.extend(keel_demo::Role::ALL.map(|role| format!("http://{}/stats/prometheus", plan.admin(role))));
    for url in pages {
        let answer = keel_ddns::http::request("GET", &url, &[], None).await.unwrap();
        assert_eq!(answer.status, 200, "{url}");
        let text = String::from_utf8(answer.body.to_vec()).unwrap();
        let (ok, stdout, stderr) =
            run(&which("promtool").expect("promtool"), &["check", "metrics"], Some(&text));
        assert!(ok, "{url}: {stdout}{stderr}");
        exported.extend(
            text.lines()
                .filter_map(|line| line.strip_prefix("# TYPE "))
                .map(|rest| rest.split(' ').next().unwrap().to_string()),
        );
    }
    demo.stop().await;
    let missing: Vec<&String> = wanted.iter().filter(|name| !exported.contains(*name)).collect();
    assert!(missing.is_empty(), "read by alerts or the dashboard but exported by nobody: {missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configure_sh_creates_routers_and_the_example_in_a_control_plane() {
    if which("curl").is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI needs curl (.ci/install-test-deps)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tokens =
        keel_control_plane::auth::Tokens::new(vec!["operator-token".into()], vec!["proxy-token".into()]);
    let control_plane = keel_control_plane::ControlPlane::start(keel_control_plane::Settings::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("keel.db"),
        tokens,
    ))
    .await
    .unwrap();
    let url = format!("http://{}", control_plane.local_addr);
    let script = kubernetes().join("configure.sh");
    let configure = || {
        Command::new(&script)
            .args([
                "--example",
                "--routers",
                "node-a=10.0.0.1 node-b=10.0.0.2",
                "--cluster-dns",
                "10.96.0.10",
            ])
            .env("KEEL_CP_URL", &url)
            .env("KEEL_CP_OPERATOR_TOKEN", "operator-token")
            .output()
            .unwrap()
    };
    // Twice: the second run replaces what the first created.
    for round in 0..2 {
        // (Blocking is fine: the test's body is not on one of the runtime's workers.)
        let output = configure();
        let said =
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "round {round}:\n{said}");
        assert_eq!(said.matches(": applied").count(), 5, "{said}");
    }
    let get = |path: String| {
        let url = url.clone();
        async move {
            let answer = keel_ddns::http::request(
                "GET",
                &format!("{url}/apis/edge.example.com/v1/{path}"),
                &[("Authorization", "Bearer operator-token")],
                None,
            )
            .await
            .unwrap();
            assert_eq!(answer.status, 200, "{path}");
            serde_json::from_slice::<Value>(&answer.body).unwrap()
        }
    };
    let router = get("routers/node-b".into()).await;
    assert_eq!(router["spec"]["address"], "10.0.0.2:7000");
    assert_eq!(router["spec"]["token_file"], "/etc/keel/router-token/token");
    let zone = get("dnszones/example-client".into()).await;
    assert_eq!(zone["spec"]["upstreams"], serde_json::json!(["10.96.0.10:53"]));
    let visited = get("namespaces/keel-example/visitedservices/web".into()).await;
    assert_eq!(visited["spec"]["port"], 8080);
    assert_eq!(visited["metadata"]["generation"], 1, "an unchanged replace is not a change");
    let published = get("namespaces/keel-example/publishedservices/web".into()).await;
    // The secret and token files it names are the ones the example's pods mount.
    let web = std::fs::read_to_string(kubernetes().join("example/web.yaml")).unwrap();
    assert!(web.contains("mountPath: /etc/keel/tunnels/web"), "{}", published["spec"]["secret_file"]);
    assert_eq!(published["spec"]["secret_file"], "/etc/keel/tunnels/web/secret");
    let router_pods = std::fs::read_to_string(kubernetes().join("base/router.yaml")).unwrap();
    assert!(router_pods.contains("mountPath: /etc/keel/router-token"));

    // A wrong token is an error that says so, not a silent success.
    let output = Command::new(&script)
        .args(["--routers", "node-a=10.0.0.1"])
        .env("KEEL_CP_URL", &url)
        .env("KEEL_CP_OPERATOR_TOKEN", "wrong")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("routers/node-a: HTTP 401"));
    control_plane.stop().await;
}

/// The binaries the images contain, built by the script their Dockerfiles run: two release builds
/// (minutes), so only in CI or with KEEL_TEST_IMAGES=1. Without the release profile's fat LTO, which
/// changes how fast the code is, not what it does, and would double CI's time for this test; in a
/// target directory of its own, so that this slower binary never replaces the one the benchmarks run
/// (`target/x86_64-unknown-linux-gnu/release/proxy`).
#[test]
fn the_image_binaries_build_and_run_the_deploy_configs() {
    if std::env::var_os("CI").is_none() && std::env::var_os("KEEL_TEST_IMAGES").is_none() {
        eprintln!("skipped: release builds take minutes; CI (or KEEL_TEST_IMAGES=1) runs them");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(repository().join("deploy/build-binaries.sh"))
        .arg(out.path())
        .env("CARGO_PROFILE_RELEASE_LTO", "false")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16")
        .env("CARGO_TARGET_DIR", repository().join("target/image-test"))
        .output()
        .unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{said}");
    for (binary, version) in [("proxy", "proxy 0.1.0"), ("control-plane", "control-plane 0.1.0")] {
        let (ok, stdout, stderr) = run(&out.path().join(binary), &["--version"], None);
        assert!(ok && stdout.trim() == version, "{binary}: {stdout}{stderr}");
    }
    // The image's proxy validates every keel.yaml the manifests mount, given their files.
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("token"), "a-token\n").unwrap();
    for config in ["base/config/router.yaml", "base/config/ddns-agent.yaml", "example/config/sidecar.yaml"] {
        let text = std::fs::read_to_string(kubernetes().join(config)).unwrap();
        let token = secrets.path().join("token");
        let text = text
            .replace("/etc/keel/admin/token", token.to_str().unwrap())
            .replace("/etc/keel/proxy-token/token", token.to_str().unwrap());
        let file = secrets.path().join("keel.yaml");
        std::fs::write(&file, text).unwrap();
        let output = Command::new(out.path().join("proxy"))
            .args(["validate", "--config", file.to_str().unwrap()])
            .env("NODE_NAME", "node-a")
            .env("POD_NAME", "pod-a")
            .env("POD_IP", "10.0.0.7")
            .env("APP", "example-client")
            .output()
            .unwrap();
        assert!(output.status.success(), "{config}: {}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "OK");
    }
}

/// Prometheus reads the control plane with a key of the tokens Secret that the control plane loads as
/// viewer (read-only) tokens.
#[test]
fn prometheus_reads_the_control_plane_with_a_read_only_token() {
    let Some(tools) = tools() else { return };
    let (_, production) = render(&tools, "overlays/production");
    let (_, development) = render(&tools, "overlays/development");
    let monitor = named(&production, "ServiceMonitor", "keel-control-plane");
    let credentials = &monitor["spec"]["endpoints"][0]["authorization"]["credentials"];
    assert_eq!(credentials["name"], "keel-control-plane-tokens");
    let key = credentials["key"].as_str().unwrap();
    let secret = named(&development, "Secret", "keel-control-plane-tokens");
    assert!(
        !secret["data"][key].is_null() || !secret["stringData"][key].is_null(),
        "no key {key} in {secret}"
    );
    let control_plane = pod_spec(named(&production, "Deployment", "keel-control-plane")).unwrap();
    let args = control_plane["containers"][0]["args"].as_array().unwrap();
    assert!(
        args.iter()
            .any(|arg| arg.as_str() == Some(format!("--viewer-token-file=/etc/keel/tokens/{key}").as_str())),
        "{args:?}"
    );
}
