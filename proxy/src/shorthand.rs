//! The seed sidecar's environment variables, as a shorthand for a `dns` section.
//!
//! `SIDECAR_MAPPED_SERVICES=mysql,redis` (with `SIDECAR_IP_RANGE` and `SIDECAR_DNS_ADDR`, as the seed
//! sidecar read them) builds the `dns` section a config does not have: those services hijacked, VIPs
//! from the range, listening on the address (default 127.0.0.2:53). Upstreams come from
//! `KEEL_DNS_UPSTREAMS` (comma-separated IP:port), or else from the nameservers in `/etc/resolv.conf`
//! other than the sidecar itself. A config whose file has a `dns` section ignores the variables.

use keel_schemas::config::{Dns, Hijack, defaults};
use keel_schemas::types::{Cidr, SocketAddress};
use keel_schemas::{Config, ConfigPath, Diagnostic, Environment};

pub const MAPPED_SERVICES: &str = "SIDECAR_MAPPED_SERVICES";
pub const IP_RANGE: &str = "SIDECAR_IP_RANGE";
pub const DNS_ADDR: &str = "SIDECAR_DNS_ADDR";
pub const DNS_UPSTREAMS: &str = "KEEL_DNS_UPSTREAMS";

/// Adds the `dns` section the environment describes, if the config has none. Errors name the variable.
pub fn apply(config: &mut Config, env: &dyn Environment) -> Result<(), Vec<Diagnostic>> {
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
    if !problems.is_empty() {
        return Err(problems);
    }
    let hijack = services
        .split(',')
        .map(str::trim)
        .filter(|service| !service.is_empty())
        .map(|service| Hijack {
            service: Some(service.to_string()),
            namespace: None,
            name: None,
            address: None,
            for_visit: None,
        })
        .collect();
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
}
