//! DNS names and the hijack table: which names `dns.hijack` answers, and with which VIP.
//!
//! A `service:` entry answers in every search-domain form a pod's resolver may try (`mysql`,
//! `mysql.default`, `mysql.default.svc`, `mysql.default.svc.cluster.local`); a `name:` entry answers that
//! one name, or, as `*.zone`, every name under `zone`. Names compare case-insensitively and without the
//! trailing dot.
//!
//! VIPs come from the entry's `address`, or from `ip_range`:
//! 1. pinned addresses are taken first;
//! 2. on a reload, a name the running table already has keeps its VIP (so a service keeps its VIP while it
//!    exists, whatever was added or removed around it);
//! 3. every other name, in config order, takes the address its FNV-1a hash points at, or the next free one.
//!
//! Step 3 depends only on the config, so the same config gives the same VIPs after a restart; appending
//! a service never moves an existing one. No two names share an allocated VIP, and a range with no free
//! address left is a config error.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use crate::config::{Dns, Hijack};
use crate::diagnostic::{ConfigPath, Diagnostic};

/// Lowercases a DNS name and drops its trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `name` is a valid DNS name: dot-separated labels of 1 to 63 letters, digits, `-` or `_`,
/// not starting or ending with `-`, 253 characters at most.
pub fn is_valid_name(name: &str) -> bool {
    let name = name.trim_end_matches('.');
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// What one hijack entry answers.
enum Matcher {
    /// These exact names.
    Exact(Vec<String>),
    /// Every name strictly under this zone.
    Wildcard(String),
}

/// The names an entry answers, and the key that identifies it across reloads.
fn matcher(entry: &Hijack, dns: &Dns) -> (String, Matcher) {
    match (&entry.service, &entry.name) {
        (Some(service), _) => {
            let service = normalize(service);
            let namespace = normalize(entry.namespace.as_deref().unwrap_or(&dns.namespace));
            let domain = normalize(&dns.cluster_domain);
            let forms = vec![
                service.clone(),
                format!("{service}.{namespace}"),
                format!("{service}.{namespace}.svc"),
                format!("{service}.{namespace}.svc.{domain}"),
            ];
            (forms[3].clone(), Matcher::Exact(forms))
        }
        (None, Some(name)) => {
            let name = normalize(name);
            match name.strip_prefix("*.") {
                Some(zone) => (name.clone(), Matcher::Wildcard(zone.to_string())),
                None => (name.clone(), Matcher::Exact(vec![name])),
            }
        }
        // Validation reports an entry with neither; it answers nothing.
        (None, None) => (String::new(), Matcher::Exact(Vec::new())),
    }
}

/// Adds a `dns.hijack` entry for every visited service that listens on a VIP (`port` without `listen`)
/// and is not hijacked already, so that its names answer the VIP its visitor listens on.
pub fn add_visited_services(config: &mut crate::Config) {
    let (Some(dns), Some(tunnels)) = (config.dns.as_mut(), config.tunnels.as_ref()) else { return };
    for (index, visit) in tunnels.visit.iter().enumerate() {
        if visit.listen.is_some() || visit.port.is_none() {
            continue;
        }
        let namespace = visit.namespace.as_deref().unwrap_or(&dns.namespace).to_string();
        let hijacked = dns.hijack.iter().any(|entry| {
            entry.service.as_deref() == Some(visit.name.as_str())
                && entry.namespace.as_deref().unwrap_or(&dns.namespace) == namespace
        });
        if !hijacked {
            dns.hijack.push(Hijack {
                service: Some(visit.name.clone()),
                namespace: visit.namespace.clone(),
                name: None,
                address: None,
                for_visit: Some(index),
            });
        }
    }
}

/// The name a visited service's VIP is looked up by: its fully qualified service name.
pub fn visited_service_name(visit: &crate::config::Visit, dns: &Dns) -> String {
    let namespace = visit.namespace.as_deref().unwrap_or(&dns.namespace);
    format!("{}.{}.svc.{}", normalize(&visit.name), normalize(namespace), normalize(&dns.cluster_domain))
}

/// The running map of hijacked names to VIPs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HijackTable {
    exact: HashMap<String, IpAddr>,
    wildcards: HashMap<String, IpAddr>,
    /// Each entry's key (`mysql.default.svc.cluster.local`, `*.internal.example`) and VIP, in config order.
    entries: Vec<(String, IpAddr)>,
}

impl HijackTable {
    /// Builds the table for `dns`, keeping the VIPs `previous` gave to names that are still there.
    pub fn build(dns: &Dns, previous: Option<&HijackTable>) -> Result<Self, Vec<Diagnostic>> {
        // An entry Keel added for a visited service is reported at that `tunnels.visit` entry.
        let at = |i: usize| match dns.hijack[i].for_visit {
            Some(visit) => ConfigPath::root().key("tunnels").key("visit").index(visit),
            None => ConfigPath::root().key("dns").key("hijack").index(i),
        };
        let mut problems = Vec::new();
        let matchers: Vec<(String, Matcher)> = dns.hijack.iter().map(|entry| matcher(entry, dns)).collect();

        // Names answered twice are ambiguous: refuse them.
        let mut owners: HashMap<&str, usize> = HashMap::new();
        for (i, (key, matcher)) in matchers.iter().enumerate() {
            let names: Vec<&str> = match matcher {
                Matcher::Exact(names) => names.iter().map(String::as_str).collect(),
                Matcher::Wildcard(_) => vec![key.as_str()],
            };
            for name in names {
                if let Some(first) = owners.insert(name, i) {
                    problems
                        .push(Diagnostic::new(at(i), format!("{name} is already answered by {}", at(first))));
                }
            }
        }

        let pool = AddressPool::new(dns);
        let mut vips: Vec<Option<IpAddr>> = vec![None; dns.hijack.len()];
        let mut taken: HashMap<IpAddr, usize> = HashMap::new();
        for (i, entry) in dns.hijack.iter().enumerate() {
            if let Some(address) = entry.address {
                if let Some(first) = taken.insert(address, i) {
                    problems.push(Diagnostic::new(
                        at(i).key("address"),
                        format!("{address} is already the address of {}", at(first)),
                    ));
                }
                vips[i] = Some(address);
            }
        }
        if let Some(previous) = previous {
            let kept: HashMap<&str, IpAddr> =
                previous.entries.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            for (i, (key, _)) in matchers.iter().enumerate() {
                if vips[i].is_none()
                    && let Some(&vip) = kept.get(key.as_str())
                    && pool.contains(vip)
                    && !taken.contains_key(&vip)
                {
                    taken.insert(vip, i);
                    vips[i] = Some(vip);
                }
            }
        }
        let used: HashSet<IpAddr> = taken.keys().copied().collect();
        let mut free = pool.free_count(&used);
        let mut used = used;
        for (i, (key, _)) in matchers.iter().enumerate() {
            if vips[i].is_some() {
                continue;
            }
            if free == 0 {
                problems.push(Diagnostic::new(
                    at(i),
                    format!(
                        "no free address left in dns.ip_range {} ({} usable) for {key}",
                        dns.ip_range,
                        pool.size()
                    ),
                ));
                continue;
            }
            let vip = pool.probe(key, &used);
            used.insert(vip);
            free -= 1;
            vips[i] = Some(vip);
        }
        if !problems.is_empty() {
            return Err(problems);
        }

        let mut table = HijackTable::default();
        for ((key, matcher), vip) in matchers.into_iter().zip(vips) {
            let vip = vip.expect("every entry has a VIP when there are no problems");
            match matcher {
                Matcher::Exact(names) => {
                    for name in names {
                        table.exact.insert(name, vip);
                    }
                }
                Matcher::Wildcard(zone) => {
                    table.wildcards.insert(zone, vip);
                }
            }
            table.entries.push((key, vip));
        }
        Ok(table)
    }

    /// The VIP for a queried name, if it is hijacked. The most specific wildcard wins.
    pub fn lookup(&self, name: &str) -> Option<IpAddr> {
        // Names from a DNS server arrive lowercased: then dropping the trailing dot needs no copy.
        let trimmed = name.strip_suffix('.').unwrap_or(name);
        let name = if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(normalize(trimmed))
        } else {
            std::borrow::Cow::Borrowed(trimmed)
        };
        let name = name.as_ref();
        if let Some(vip) = self.exact.get(name) {
            return Some(*vip);
        }
        let mut rest = name;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(vip) = self.wildcards.get(parent) {
                return Some(*vip);
            }
            rest = parent;
        }
        None
    }

    /// The VIP for a queried name given as its labels (as they are on the wire, without the root), if
    /// it is hijacked: [`lookup`](Self::lookup) without building the dotted text first.
    ///
    /// A label that no hijack name can contain (a byte other than a letter, digit, `-` or `_`, as a
    /// literal `*` or an escaped dot) cannot be part of a match, but a wildcard zone below it still
    /// matches, as it does for [`lookup`](Self::lookup).
    pub fn lookup_labels<'a>(&self, labels: impl IntoIterator<Item = &'a [u8]>) -> Option<IpAddr> {
        // A name is at most 255 bytes on the wire, which is more than its dotted form takes.
        let mut key = [0u8; 256];
        let mut length = 0;
        // Where the part of the name that can still match starts, and where each label after it starts.
        let mut usable_from = 0;
        let mut starts = [0usize; 128];
        let mut labels_seen = 0;
        for label in labels {
            let dot = usize::from(length > 0);
            if length + dot + label.len() > key.len() || labels_seen == starts.len() {
                return None;
            }
            if dot == 1 {
                key[length] = b'.';
                length += 1;
            }
            starts[labels_seen] = length;
            labels_seen += 1;
            let valid = !label.is_empty()
                && label.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
            for (slot, byte) in key[length..].iter_mut().zip(label) {
                *slot = byte.to_ascii_lowercase();
            }
            length += label.len();
            if !valid {
                usable_from = labels_seen;
            }
        }
        let text = |from: usize| std::str::from_utf8(&key[starts[from]..length]).ok();
        if usable_from == 0
            && labels_seen > 0
            && let Some(vip) = text(0).and_then(|name| self.exact.get(name))
        {
            return Some(*vip);
        }
        // A wildcard zone is a proper suffix: it starts at the second usable label or later.
        (usable_from.max(1)..labels_seen)
            .find_map(|from| text(from).and_then(|zone| self.wildcards.get(zone)).copied())
    }

    /// Each entry's key and VIP, in config order.
    pub fn entries(&self) -> &[(String, IpAddr)] {
        &self.entries
    }
}

/// The allocatable addresses of `dns.ip_range`: every address of the network, but for IPv4 networks of
/// four addresses or more, not the network and broadcast addresses.
struct AddressPool {
    first: u128,
    size: u128,
    v4: bool,
}

impl AddressPool {
    fn new(dns: &Dns) -> Self {
        let net = dns.ip_range.0;
        let (network, broadcast, v4) = match (net.network(), net.broadcast()) {
            (IpAddr::V4(n), IpAddr::V4(b)) => (u128::from(u32::from(n)), u128::from(u32::from(b)), true),
            (IpAddr::V6(n), IpAddr::V6(b)) => (u128::from(n), u128::from(b), false),
            _ => unreachable!("a network and its broadcast share a family"),
        };
        let skip_ends = v4 && net.prefix_len() <= 30;
        let (first, last) = if skip_ends { (network + 1, broadcast - 1) } else { (network, broadcast) };
        Self { first, size: last - first + 1, v4 }
    }

    fn size(&self) -> u128 {
        self.size
    }

    fn address(&self, index: u128) -> IpAddr {
        let value = self.first + index;
        if self.v4 {
            IpAddr::V4(u32::try_from(value).expect("IPv4 pool addresses fit in 32 bits").into())
        } else {
            IpAddr::V6(value.into())
        }
    }

    fn index(&self, ip: IpAddr) -> Option<u128> {
        let value = match ip {
            IpAddr::V4(v4) if self.v4 => u128::from(u32::from(v4)),
            IpAddr::V6(v6) if !self.v4 => u128::from(v6),
            _ => return None,
        };
        value.checked_sub(self.first).filter(|index| *index < self.size)
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.index(ip).is_some()
    }

    fn free_count(&self, used: &HashSet<IpAddr>) -> u128 {
        self.size - used.iter().filter(|ip| self.contains(**ip)).count() as u128
    }

    /// The first free address at or after the one `key` hashes to, wrapping around. The caller makes
    /// sure one is free.
    fn probe(&self, key: &str, used: &HashSet<IpAddr>) -> IpAddr {
        let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let start = u128::from(hash) % self.size;
        (0..self.size)
            .map(|step| self.address((start + step) % self.size))
            .find(|ip| !used.contains(ip))
            .expect("the caller checked that a free address exists")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MapEnvironment;

    /// The `dns` section of `text`, deserialized but not validated (validation runs the allocation too).
    fn dns(text: &str) -> Dns {
        let root = crate::yaml::parse(&format!("dns:\n{text}")).unwrap();
        let converted = crate::yaml::to_value(root.as_ref(), &MapEnvironment::default());
        serde_json::from_value(converted.value["dns"].clone()).unwrap()
    }

    fn entry(service: Option<&str>, name: Option<&str>, address: Option<&str>) -> Hijack {
        Hijack {
            service: service.map(Into::into),
            namespace: None,
            name: name.map(Into::into),
            address: address.map(|a| a.parse().unwrap()),
            for_visit: None,
        }
    }

    #[test]
    fn services_answer_in_every_search_domain_form_case_insensitively() {
        let dns = dns("  hijack:\n    - service: mysql\n    - {service: redis, namespace: cache}\n");
        let table = HijackTable::build(&dns, None).unwrap();
        let vip = table.lookup("mysql").unwrap();
        for form in ["mysql", "MySQL.default", "mysql.default.svc", "mysql.default.svc.cluster.local."] {
            assert_eq!(table.lookup(form), Some(vip), "{form}");
        }
        assert_eq!(table.lookup("redis.cache.svc.cluster.local"), table.lookup("redis"));
        assert_eq!(table.lookup("redis.default"), None);
        assert_eq!(table.lookup("mysql.other"), None);
        assert!(dns.ip_range.contains(vip));
        assert_eq!(table.entries()[0].0, "mysql.default.svc.cluster.local");
    }

    #[test]
    fn wildcards_answer_every_name_below_their_zone_but_not_the_zone() {
        let dns = dns(
            "  hijack:\n    - {name: \"*.internal.example\", address: 127.0.66.7}\n    - {name: \"*.deep.internal.example\", address: 127.0.66.8}\n    - {name: api.internal.example, address: 127.0.66.9}\n",
        );
        let table = HijackTable::build(&dns, None).unwrap();
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(table.lookup("a.internal.example"), ip("127.0.66.7"));
        assert_eq!(table.lookup("a.b.internal.example"), ip("127.0.66.7"));
        assert_eq!(table.lookup("x.deep.internal.example"), ip("127.0.66.8"), "the most specific zone wins");
        assert_eq!(table.lookup("API.internal.example"), ip("127.0.66.9"), "an exact name beats a wildcard");
        assert_eq!(table.lookup("internal.example"), None);
        assert_eq!(table.lookup("example"), None);
    }

    #[test]
    fn a_lookup_by_wire_labels_agrees_with_a_lookup_by_text() {
        let dns = dns(
            "  hijack:\n    - {name: \"*.internal.example\", address: 127.0.66.7}\n    - {name: \"*.deep.internal.example\", address: 127.0.66.8}\n    - {name: api.internal.example, address: 127.0.66.9}\n    - service: mysql\n",
        );
        let table = HijackTable::build(&dns, None).unwrap();
        let by_labels = |labels: &[&[u8]]| table.lookup_labels(labels.iter().copied());
        for name in [
            "a.internal.example",
            "A.B.Internal.Example",
            "x.deep.internal.example",
            "api.internal.example",
            "internal.example",
            "example",
            "mysql",
            "MySQL.default.svc.cluster.local",
            "mysql.default.svc.cluster.local.extra",
            "mysql.other",
            "under_score.internal.example",
        ] {
            let labels: Vec<&[u8]> = name.split('.').map(str::as_bytes).collect();
            assert_eq!(by_labels(&labels), table.lookup(name), "{name}");
        }
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        // Bytes no hijack name has keep a label from matching, but not the zones below it.
        assert_eq!(by_labels(&[b"*", b"internal", b"example"]), ip("127.0.66.7"));
        assert_eq!(by_labels(&[b"a.b", b"internal", b"example"]), ip("127.0.66.7"));
        assert_eq!(by_labels(&[b"a", b"\xff", b"internal", b"example"]), ip("127.0.66.7"));
        assert_eq!(by_labels(&[b"my sql"]), None);
        assert_eq!(by_labels(&[b"x", b"deep\x00", b"internal", b"example"]), ip("127.0.66.7"));
        assert_eq!(by_labels(&[]), None);
        assert_eq!(by_labels(&[b"internal.example"]), None);
    }

    #[test]
    fn allocation_is_deterministic_unique_and_avoids_pinned_addresses() {
        let mut text = String::from(
            "  ip_range: 127.0.66.0/28\n  hijack:\n    - {service: pinned, address: 127.0.66.1}\n",
        );
        for i in 0..13 {
            text.push_str(&format!("    - service: svc{i}\n"));
        }
        let dns = dns(&text);
        let first = HijackTable::build(&dns, None).unwrap();
        let second = HijackTable::build(&dns, None).unwrap();
        assert_eq!(first, second, "the same config gives the same VIPs");
        let vips: HashSet<IpAddr> = first.entries().iter().map(|(_, vip)| *vip).collect();
        assert_eq!(vips.len(), 14, "14 names, 14 different VIPs (the whole usable /28)");
        for vip in &vips {
            let last = match vip {
                IpAddr::V4(v4) => v4.octets()[3],
                IpAddr::V6(_) => unreachable!(),
            };
            assert!((1..=14).contains(&last), "network and broadcast addresses stay free: {vip}");
        }
    }

    #[test]
    fn appending_or_removing_names_keeps_the_other_vips() {
        let mut dns = dns("  hijack:\n    - service: a\n    - service: b\n    - service: c\n");
        let before = HijackTable::build(&dns, None).unwrap();
        // Appending: nobody moves, even without the previous table (config order decides collisions).
        dns.hijack.push(entry(Some("d"), None, None));
        let appended = HijackTable::build(&dns, None).unwrap();
        assert_eq!(&appended.entries()[..3], before.entries());
        // Removing one and adding another in front, on a reload: the survivors keep their VIPs.
        dns.hijack.remove(0);
        dns.hijack.insert(0, entry(Some("z"), None, None));
        let reloaded = HijackTable::build(&dns, Some(&appended)).unwrap();
        for (key, vip) in &appended.entries()[1..] {
            assert!(reloaded.entries().contains(&(key.clone(), *vip)), "{key} moved");
        }
    }

    #[test]
    fn an_exhausted_range_and_duplicates_are_errors() {
        let dns = dns(
            "  ip_range: 127.0.66.0/30\n  hijack:\n    - service: a\n    - service: b\n    - service: c\n    - {name: a.default, address: 10.1.1.1}\n    - {name: x.example, address: 10.1.1.1}\n",
        );
        let problems: Vec<String> =
            HijackTable::build(&dns, None).unwrap_err().iter().map(ToString::to_string).collect();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("dns.hijack[3]: a.default is already answered by dns.hijack[0]")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p
                    .starts_with("dns.hijack[4].address: 10.1.1.1 is already the address of dns.hijack[3]")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p
                .starts_with("dns.hijack[2]: no free address left in dns.ip_range 127.0.66.0/30 (2 usable)")),
            "{problems:?}"
        );
    }

    #[test]
    fn names_are_checked() {
        for good in ["mysql", "a-b.c_d.example.", "x"] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in ["", "-a", "a-", "a..b", "a b", &"x".repeat(64)] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }
}
