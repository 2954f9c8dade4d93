//! The seed sidecar's environment variables, as a shorthand for a `dns` section and the visits of a
//! `tunnels` section.
//!
//! `SIDECAR_MAPPED_SERVICES=mysql,redis` (with `SIDECAR_IP_RANGE` and `SIDECAR_DNS_ADDR`, as the seed
//! sidecar read them) builds the `dns` section a config does not have: those services hijacked, VIPs
//! from the range, listening on the address (default 127.0.0.2:53). Upstreams come from
//! `KEEL_DNS_UPSTREAMS` (comma-separated IP:port), or else from the nameservers in `/etc/resolv.conf`
//! other than the sidecar itself. A config whose file has a `dns` section ignores the variables.
//!
//! A service written with its port (`mysql:3306`) is also visited through the routers of
//! `KEEL_TUNNEL_ROUTERS` (comma-separated host:port), with the router token of `KEEL_TUNNEL_TOKEN` and
//! the service secret of `KEEL_TUNNEL_SECRET_MYSQL` (the name upper-cased, `-` as `_`) or else
//! `KEEL_TUNNEL_SECRET`: the visitor listens on the service's VIP at that port, so `mysql.default.svc:3306`
//! reaches the published MySQL, as the seed's frpc mapping did. The seed found routers and ports in its
//! node API server; here they are given, until the control plane hands them out.
//!
//! Seed 000's agent variables (`SERVER_URL`, `API_TOKEN`, `CHECK_INTERVAL`, `NETWORK_INTERFACE`) build
//! its address reporter; see `agent`.

use keel_schemas::config::{Dns, Hijack, RouterRef, Tunnels, Visit, defaults};
use keel_schemas::types::{Cidr, HostPort, Secret, SocketAddress};
use keel_schemas::{Config, ConfigPath, Diagnostic, Environment};

pub const MAPPED_SERVICES: &str = "SIDECAR_MAPPED_SERVICES";
pub const IP_RANGE: &str = "SIDECAR_IP_RANGE";
pub const DNS_ADDR: &str = "SIDECAR_DNS_ADDR";
pub const DNS_UPSTREAMS: &str = "KEEL_DNS_UPSTREAMS";
pub const TUNNEL_ROUTERS: &str = "KEEL_TUNNEL_ROUTERS";
pub const TUNNEL_TOKEN: &str = "KEEL_TUNNEL_TOKEN";
pub const TUNNEL_SECRET: &str = "KEEL_TUNNEL_SECRET";

pub const SERVER_URL: &str = "SERVER_URL";
pub const API_TOKEN: &str = "API_TOKEN";
pub const CHECK_INTERVAL: &str = "CHECK_INTERVAL";
pub const NETWORK_INTERFACE: &str = "NETWORK_INTERFACE";
pub const REPORTER_STATE_FILE: &str = "KEEL_REPORTER_STATE_FILE";

/// Adds what the seeds' environment variables describe: the sidecar's `dns` (and visits), and seed 000's
/// address reporter. Errors name the variable.
pub fn apply(config: &mut Config, env: &dyn Environment) -> Result<(), Vec<Diagnostic>> {
    let sidecar = sidecar(config, env);
    let agent = agent(config, env);
    match (sidecar, agent) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(mut a), Err(b)) => {
            a.extend(b);
            Err(a)
        }
        (Err(problems), _) | (_, Err(problems)) => Err(problems),
    }
}

/// Seed 000's agent: `SERVER_URL`, `API_TOKEN`, `CHECK_INTERVAL` (seconds, default 5) and
/// `NETWORK_INTERFACE` make a reporter of the interface's IPv6 address (temporary preferred) to
/// `SERVER_URL`, if the config has no reporters. `KEEL_REPORTER_STATE_FILE` keeps its pending address
/// across restarts.
fn agent(config: &mut Config, env: &dyn Environment) -> Result<(), Vec<Diagnostic>> {
    use keel_schemas::config::{
        AddressFamily, AddressPolicy, AddressSink, AddressSource, InterfaceSource, ReportEndpoint, Reporter,
    };
    if !config.reporters.is_empty() {
        return Ok(());
    }
    let Some(url) = env.var(SERVER_URL).filter(|value| !value.trim().is_empty()) else {
        return Ok(());
    };
    let problem = |variable: &str, message: &str| Diagnostic::new(ConfigPath::root().key(variable), message);
    let mut problems = Vec::new();
    let token = env.var(API_TOKEN).filter(|value| !value.trim().is_empty());
    if token.is_none() {
        problems.push(problem(API_TOKEN, "API_TOKEN is not set (SERVER_URL is)"));
    }
    let interface = env.var(NETWORK_INTERFACE).filter(|value| !value.trim().is_empty());
    if interface.is_none() {
        problems.push(problem(NETWORK_INTERFACE, "NETWORK_INTERFACE is not specified (SERVER_URL is set)"));
    }
    let interval = match env.var(CHECK_INTERVAL).filter(|value| !value.trim().is_empty()) {
        None => 5,
        Some(value) => match value.trim().parse::<u64>() {
            Ok(seconds) if seconds > 0 => seconds,
            _ => {
                problems.push(problem(
                    CHECK_INTERVAL,
                    "CHECK_INTERVAL must be a whole number of seconds, at least 1",
                ));
                5
            }
        },
    };
    let (Some(token), Some(interface), true) = (token, interface, problems.is_empty()) else {
        return Err(problems);
    };
    config.reporters.push(Reporter {
        name: "public-ip".to_string(),
        source: AddressSource::Interface(InterfaceSource {
            name: interface.trim().to_string(),
            family: AddressFamily::Ipv6,
            policy: AddressPolicy::Temporary,
        }),
        sink: AddressSink::ControlPlane(ReportEndpoint {
            url: url.trim().to_string(),
            token: Some(Secret::new(token.trim())),
            token_file: None,
        }),
        interval: std::time::Duration::from_secs(interval).into(),
        debounce: defaults::report_debounce(),
        state_file: env.var(REPORTER_STATE_FILE).filter(|value| !value.trim().is_empty()),
        dry_run: false,
    });
    Ok(())
}

/// The seed sidecar's `dns` section (and visits), if the config has none.
fn sidecar(config: &mut Config, env: &dyn Environment) -> Result<(), Vec<Diagnostic>> {
    if config.dns.is_some() {
        return Ok(());
    }
    let Some(services) = env.var(MAPPED_SERVICES).filter(|value| !value.trim().is_empty()) else {
        return Ok(());
    };
    let mut problems = Vec::new();
    let problem =
        |variable: &str, message: String| Diagnostic::new(ConfigPath::root().key(variable), message);
    let ip_range: Cidr = match env.var(IP_RANGE).filter(|v| !v.is_empty()) {
        Some(value) => value.parse().unwrap_or_else(|error: String| {
            problems.push(problem(IP_RANGE, error));
            defaults::ip_range()
        }),
        None => defaults::ip_range(),
    };
    let listen: SocketAddress = match env.var(DNS_ADDR).filter(|v| !v.is_empty()) {
        Some(value) => value.parse().unwrap_or_else(|error: String| {
            problems.push(problem(DNS_ADDR, error));
            defaults::dns_listen()[0]
        }),
        None => defaults::dns_listen()[0],
    };
    let upstreams = match env.var(DNS_UPSTREAMS).filter(|v| !v.is_empty()) {
        Some(value) => value
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .filter_map(|item| match item.parse::<SocketAddress>() {
                Ok(address) => Some(address),
                Err(error) => {
                    problems.push(problem(DNS_UPSTREAMS, error));
                    None
                }
            })
            .collect(),
        None => resolv_conf_nameservers(&env.read_file("/etc/resolv.conf").unwrap_or_default(), listen),
    };
    let mut hijack = Vec::new();
    let mut visits = Vec::new();
    for item in services.split(',').map(str::trim).filter(|item| !item.is_empty()) {
        match item.split_once(':') {
            None => hijack.push(Hijack {
                service: Some(item.to_string()),
                namespace: None,
                name: None,
                address: None,
                for_visit: None,
            }),
            Some((service, port)) => match port.parse::<u16>() {
                Ok(port) if port > 0 => visits.push((service.to_string(), port)),
                _ => problems.push(problem(MAPPED_SERVICES, format!("invalid port in {item:?}"))),
            },
        }
    }
    if !visits.is_empty() && config.tunnels.is_none() {
        match visits_section(&visits, env) {
            Ok(tunnels) => config.tunnels = Some(tunnels),
            Err(mut more) => problems.append(&mut more),
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    config.dns = Some(Dns {
        listen: vec![listen],
        namespace: defaults::dns_namespace(),
        cluster_domain: defaults::cluster_domain(),
        ip_range,
        ttl: defaults::dns_ttl(),
        hijack,
        upstreams,
        upstream_timeout: defaults::upstream_timeout(),
        max_in_flight: defaults::max_in_flight(),
        workers: defaults::dns_workers(),
        cache: Default::default(),
    });
    Ok(())
}

/// The `tunnels` section for services given with a port: one visit each, through every router.
fn visits_section(visits: &[(String, u16)], env: &dyn Environment) -> Result<Tunnels, Vec<Diagnostic>> {
    let problem =
        |variable: &str, message: String| Diagnostic::new(ConfigPath::root().key(variable), message);
    let mut problems = Vec::new();
    let Some(routers) = env.var(TUNNEL_ROUTERS).filter(|value| !value.trim().is_empty()) else {
        let (service, port) = &visits[0];
        let message =
            format!("{service}:{port} is to be visited through a tunnel, which needs {TUNNEL_ROUTERS}");
        return Err(vec![problem(MAPPED_SERVICES, message)]);
    };
    let token = env.var(TUNNEL_TOKEN).map(Secret::new);
    let routers: Vec<RouterRef> = routers
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .enumerate()
        .filter_map(|(index, item)| match item.parse::<HostPort>() {
            Ok(address) => Some(RouterRef {
                name: format!("router-{index}"),
                address,
                token: token.clone(),
                token_file: None,
                tls: None,
            }),
            Err(error) => {
                problems.push(problem(TUNNEL_ROUTERS, error));
                None
            }
        })
        .collect();
    let shared_secret = env.var(TUNNEL_SECRET);
    let visit = visits
        .iter()
        .map(|(service, port)| {
            let own = format!("{TUNNEL_SECRET}_{}", service.to_ascii_uppercase().replace('-', "_"));
            Visit {
                name: service.clone(),
                secret: env.var(&own).or_else(|| shared_secret.clone()).map(Secret::new),
                secret_file: None,
                routers: Vec::new(),
                listen: None,
                port: Some(*port),
                namespace: None,
                pool: defaults::visit_pool(),
            }
        })
        .collect();
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Tunnels { server: None, routers, publish: Vec::new(), visit, max_skew: defaults::max_skew() })
}

/// The `nameserver` lines of a resolv.conf, on port 53, without `own` (the sidecar's own address).
fn resolv_conf_nameservers(text: &str, own: SocketAddress) -> Vec<SocketAddress> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddress(std::net::SocketAddr::new(ip, 53)))
        .filter(|server| *server != own)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_schemas::MapEnvironment;

    #[test]
    fn seed_000s_variables_build_a_reporter() {
        use keel_schemas::config::{AddressPolicy, AddressSink, AddressSource};
        let env = MapEnvironment::default()
            .with_var(SERVER_URL, "http://autodns:8080")
            .with_var(API_TOKEN, "secure-token-123")
            .with_var(CHECK_INTERVAL, "10")
            .with_var(NETWORK_INTERFACE, "eth0");
        let mut config = Config::default();
        apply(&mut config, &env).unwrap();
        let reporter = &config.reporters[0];
        let AddressSource::Interface(interface) = &reporter.source else { panic!("{reporter:?}") };
        assert_eq!((interface.name.as_str(), interface.policy), ("eth0", AddressPolicy::Temporary));
        assert_eq!(reporter.interval.get(), std::time::Duration::from_secs(10));
        let AddressSink::ControlPlane(sink) = &reporter.sink else { panic!("{reporter:?}") };
        assert_eq!(sink.url, "http://autodns:8080");
        assert_eq!(sink.token.as_ref().unwrap().expose(), "secure-token-123");

        // The seed's own checks, by variable.
        let env = MapEnvironment::default()
            .with_var(SERVER_URL, "http://autodns:8080")
            .with_var(CHECK_INTERVAL, "soon");
        let problems = apply(&mut Config::default(), &env).unwrap_err();
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines.iter().any(|line| line.contains("NETWORK_INTERFACE is not specified")), "{lines:?}");
        // No SERVER_URL: no reporter.
        let mut config = Config::default();
        apply(&mut config, &MapEnvironment::default().with_var(NETWORK_INTERFACE, "eth0")).unwrap();
        assert!(config.reporters.is_empty());
    }

    #[test]
    fn the_seed_variables_build_a_dns_section() {
        let env = MapEnvironment::default()
            .with_var(MAPPED_SERVICES, "mysql, redis")
            .with_var(IP_RANGE, "127.0.77.0/24")
            .with_file(
                "/etc/resolv.conf",
                "search default.svc.cluster.local\nnameserver 127.0.0.2\nnameserver 10.96.0.10\n",
            );
        let mut config = Config::default();
        apply(&mut config, &env).unwrap();
        let dns = config.dns.unwrap();
        assert_eq!(dns.listen[0].to_string(), "127.0.0.2:53");
        assert_eq!(dns.ip_range.to_string(), "127.0.77.0/24");
        let services: Vec<_> = dns.hijack.iter().map(|h| h.service.clone().unwrap()).collect();
        assert_eq!(services, ["mysql", "redis"]);
        assert_eq!(
            dns.upstreams.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["10.96.0.10:53"],
            "not itself"
        );
    }

    #[test]
    fn explicit_upstreams_and_bad_values_and_files_that_say_otherwise() {
        let env = MapEnvironment::default()
            .with_var(MAPPED_SERVICES, "mysql")
            .with_var(DNS_ADDR, "127.0.0.3:5353")
            .with_var(DNS_UPSTREAMS, "10.0.0.10:53,10.0.0.11:53");
        let mut config = Config::default();
        apply(&mut config, &env).unwrap();
        assert_eq!(config.dns.as_ref().unwrap().upstreams.len(), 2);
        assert_eq!(config.dns.as_ref().unwrap().listen[0].to_string(), "127.0.0.3:5353");

        let bad =
            MapEnvironment::default().with_var(MAPPED_SERVICES, "mysql").with_var(IP_RANGE, "not-a-range");
        let error = apply(&mut Config::default(), &bad).unwrap_err()[0].to_string();
        assert!(error.contains("SIDECAR_IP_RANGE: invalid CIDR \"not-a-range\""), "{error}");

        // A config with its own dns section wins.
        let mut from_file = config.clone();
        from_file.dns.as_mut().unwrap().hijack.clear();
        apply(&mut from_file, &env).unwrap();
        assert!(from_file.dns.unwrap().hijack.is_empty());
    }

    #[test]
    fn services_with_a_port_are_visited_through_the_routers_given() {
        let env = MapEnvironment::default()
            .with_var(MAPPED_SERVICES, "mysql:3306, redis, my-cache:6379")
            .with_var(DNS_UPSTREAMS, "10.0.0.10:53")
            .with_var(TUNNEL_ROUTERS, "router-a.example:7000, 10.0.0.2:7000")
            .with_var(TUNNEL_TOKEN, "router-token")
            .with_var(TUNNEL_SECRET, "shared")
            .with_var("KEEL_TUNNEL_SECRET_MY_CACHE", "own");
        // Config::default() is not an empty keel.yaml (drain_timeout would be 0): take serde's defaults.
        let mut config: Config = serde_json::from_str("{}").unwrap();
        apply(&mut config, &env).unwrap();
        let hijacked: Vec<_> =
            config.dns.as_ref().unwrap().hijack.iter().map(|h| h.service.clone().unwrap()).collect();
        assert_eq!(hijacked, ["redis"], "visited services are hijacked through their visits");
        let tunnels = config.tunnels.as_ref().unwrap();
        assert_eq!(tunnels.routers.len(), 2);
        assert_eq!(tunnels.routers[0].token.as_ref().unwrap().expose(), "router-token");
        assert_eq!(tunnels.visit[0].name, "mysql");
        assert_eq!(tunnels.visit[0].port, Some(3306));
        assert_eq!(tunnels.visit[0].secret.as_ref().unwrap().expose(), "shared");
        assert_eq!(tunnels.visit[1].secret.as_ref().unwrap().expose(), "own");
        // The whole thing validates, and the visited services get VIPs.
        let validated = keel_schemas::ValidatedConfig::from_config(config, "environment", &env).unwrap();
        assert_eq!(validated.dns.as_ref().unwrap().hijack.len(), 3);

        let no_routers = MapEnvironment::default().with_var(MAPPED_SERVICES, "mysql:3306");
        let error = apply(&mut Config::default(), &no_routers).unwrap_err()[0].to_string();
        assert!(error.contains("needs KEEL_TUNNEL_ROUTERS"), "{error}");
        let bad_port = MapEnvironment::default().with_var(MAPPED_SERVICES, "mysql:http");
        let error = apply(&mut Config::default(), &bad_port).unwrap_err()[0].to_string();
        assert!(error.contains("invalid port in \"mysql:http\""), "{error}");
    }
}
