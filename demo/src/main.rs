//! `keel-demo`: start the demonstration, check it works, print what to try, and stop on Ctrl-C.

// Telling the user what runs and what to try is this binary's job.
#![allow(clippy::print_stdout)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use keel_demo::{Checked, Demo, NAMESPACE, Plan, Role, SERVICE, VISIT_PORT, service_name};

#[derive(Parser)]
#[command(
    name = "keel-demo",
    version,
    about = "Keel on one machine: a control plane, a router, a publisher and a sidecar, on loopback"
)]
struct Cli {
    /// The loopback address everything listens on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Ports are this plus a fixed offset: control plane +80, web +81, router +70, DNS +53, admin APIs
    /// +901 (router), +902 (publisher), +903 (sidecar).
    #[arg(long, default_value_t = 15000)]
    base_port: u16,
    /// Where the sidecar allocates VIPs for service names.
    #[arg(long, default_value = "127.0.66.0/24")]
    vip_range: ipnet::Ipv4Net,
    /// Where the sidecar's DNS forwards other names (repeat for several); by default the nameservers of
    /// /etc/resolv.conf. `none`: other names are refused.
    #[arg(long)]
    dns_upstream: Vec<String>,
    /// Keep the database, secrets and snapshot caches here (a temporary directory, removed at exit, by
    /// default).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Log filter, such as `info` or `keel_proxy=debug,warn`.
    #[arg(long, default_value = "warn", env = "KEEL_LOG")]
    log_level: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("keel-demo: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("keel-demo: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let dns_upstreams = upstreams(&cli.dns_upstream)?;
    let plan = Plan { host: cli.host, base_port: cli.base_port, vip_range: cli.vip_range, dns_upstreams };
    let (_temporary, dir) = match cli.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            (None, dir)
        }
        None => {
            let temporary = tempfile::Builder::new().prefix("keel-demo-").tempdir()?;
            let dir = temporary.path().to_path_buf();
            (Some(temporary), dir)
        }
    };
    let demo = Demo::start(plan, &dir).await?;
    let checked = match demo.check().await {
        Ok(checked) => checked,
        Err(error) => {
            demo.stop().await;
            return Err(error);
        }
    };
    print_tour(&demo.plan, &dir, &checked);

    wait_for_signal().await;
    println!("stopping: draining the proxies, then the control plane");
    demo.stop().await;
    println!("stopped");
    Ok(())
}

/// `--dns-upstream` values, or the nameservers of /etc/resolv.conf.
fn upstreams(given: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    if given.iter().any(|value| value == "none") {
        return Ok(Vec::new());
    }
    if !given.is_empty() {
        return given
            .iter()
            .map(|value| {
                value
                    .parse::<SocketAddr>()
                    .or_else(|_| value.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| {
                        anyhow::anyhow!("--dns-upstream {value:?}: not an address (1.2.3.4 or 1.2.3.4:53)")
                    })
            })
            .collect();
    }
    let resolv_conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    Ok(resolv_conf
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect())
}

fn print_tour(plan: &Plan, dir: &std::path::Path, checked: &Checked) {
    let cp = plan.control_plane();
    let admin = |role| plan.admin(role);
    let name = service_name();
    let vip = checked.vip;
    let dns = plan.dns();
    println!(
        r#"
Keel demo: running. Files in {dir}. Ctrl-C stops it.

  control plane   http://{cp}  (SQLite: {db})
  demo-router     tunnel router on {router}; admin http://{router_admin}
  demo-publisher  offers "{SERVICE}" (the web service on {web}) through the router; admin http://{publisher_admin}
  demo-sidecar    DNS on {dns} ({name} -> VIP), visitor on VIP:{VISIT_PORT}; admin http://{sidecar_admin}

Checked: {name} resolved to {vip}, and GET http://{vip}:{VISIT_PORT}/ came back through the tunnel
in {elapsed} ms from the first write to the control plane:
  {body}
Try:
  dig @{dns_ip} -p {dns_port} +short {name}
  curl http://{vip}:{VISIT_PORT}/
  curl --resolve {name}:{VISIT_PORT}:{vip} http://{name}:{VISIT_PORT}/

Look at:
  curl http://{cp}/debug/proxies                                 # each proxy: connected, versions sent and ACKed
  curl http://{cp}/apis/edge.example.com/v1/routers/demo-router  # the router's status: services and their clients
  curl http://{cp}/apis/edge.example.com/v1/namespaces/{NAMESPACE}/visitedservices
  curl http://{sidecar_admin}/config_dump                          # the sidecar's running config and its version
  curl http://{router_admin}/tunnels                              # the router's view of publishers and visitors
  curl -s http://{sidecar_admin}/stats/prometheus | grep -E '^keel_(dns|tunnel)'

Change it (the sidecar applies the new snapshot within milliseconds, keeping open connections):
  curl -X PATCH -H 'Content-Type: application/merge-patch+json' -d '{{"spec":{{"port":9090}}}}' \
    http://{cp}/apis/edge.example.com/v1/namespaces/{NAMESPACE}/visitedservices/{SERVICE}
  curl http://{vip}:9090/
"#,
        dir = dir.display(),
        db = dir.join("keel.db").display(),
        router = plan.router(),
        router_admin = admin(Role::Router),
        web = plan.web(),
        publisher_admin = admin(Role::Publisher),
        sidecar_admin = admin(Role::Sidecar),
        elapsed = checked.elapsed.as_millis(),
        body = checked.body.trim_end(),
        dns_ip = dns.ip(),
        dns_port = dns.port(),
    );
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stopping");
        }
    }
}

fn init_logging(filter: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter: tracing_subscriber::filter::Targets = filter.parse().unwrap_or_else(|error| {
        eprintln!("invalid --log-level {filter:?} ({error}); using warn");
        tracing_subscriber::filter::Targets::new().with_default(tracing::Level::WARN)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
}
