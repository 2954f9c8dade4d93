//! Value types that keel.yaml spells as strings: durations (`250ms`, `1m30s`), host:port pairs, CIDR
//! blocks and secrets.
//!
//! Each type parses from a string with an error message that says what was expected, serializes back to
//! the same spelling, and describes itself to JSON Schema as a string with a pattern, so editors can check
//! it before Keel does.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Implements `Serialize`/`Deserialize` through `Display`/`FromStr`, and `JsonSchema` as a string type
/// with the given description and pattern.
macro_rules! string_typed {
    ($ty:ty, $name:literal, $description:literal, $pattern:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = Cow::<str>::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        impl JsonSchema for $ty {
            fn schema_name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": "string",
                    "description": $description,
                    "pattern": $pattern,
                })
            }
        }
    };
}

/// A span of time written with units, such as `250ms`, `5s`, `1m30s` or `2h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(std::time::Duration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }

    pub const fn from_millis(millis: u64) -> Self {
        Self(std::time::Duration::from_millis(millis))
    }

    pub const fn get(self) -> std::time::Duration {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<Duration> for std::time::Duration {
    fn from(value: Duration) -> Self {
        value.0
    }
}

impl From<std::time::Duration> for Duration {
    fn from(value: std::time::Duration) -> Self {
        Self(value)
    }
}

const DURATION_UNITS: [(&str, u64); 5] =
    [("h", 3_600_000_000_000), ("m", 60_000_000_000), ("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000)];

impl FromStr for Duration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "invalid duration {text:?}: expected a number with a unit (h, m, s, ms, us), such as 5s or 1m30s"
            )
        };
        if text.is_empty() {
            return Err(bad());
        }
        let mut nanos: u128 = 0;
        let mut rest = text;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
            if digits == 0 {
                return Err(bad());
            }
            let number: u128 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
            let unit = &rest[..unit_len];
            let (_, scale) = DURATION_UNITS.iter().find(|(name, _)| *name == unit).ok_or_else(bad)?;
            nanos =
                nanos.checked_add(number.checked_mul(u128::from(*scale)).ok_or_else(bad)?).ok_or_else(bad)?;
            rest = &rest[unit_len..];
        }
        let nanos = u64::try_from(nanos).map_err(|_| format!("duration {text:?} is too long"))?;
        Ok(Self(std::time::Duration::from_nanos(nanos)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut nanos = self.0.as_nanos();
        if nanos == 0 {
            return f.write_str("0s");
        }
        for (unit, scale) in DURATION_UNITS {
            let scale = u128::from(scale);
            if nanos >= scale {
                write!(f, "{}{unit}", nanos / scale)?;
                nanos %= scale;
            }
        }
        if nanos > 0 {
            write!(f, "{nanos}ns")?;
        }
        Ok(())
    }
}

string_typed!(
    Duration,
    "Duration",
    "A duration with units: h, m, s, ms, us (for example 250ms, 5s, 1m30s).",
    "^([0-9]+(h|m|s|ms|us))+$"
);

/// A socket address: an IP address and a port, such as `127.0.0.1:8080` or `[::1]:53`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketAddress(pub SocketAddr);

impl FromStr for SocketAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.parse().map(Self).map_err(|_| {
            format!("invalid address {text:?}: expected IP:port, such as 127.0.0.1:8080 or [::1]:8080")
        })
    }
}

impl fmt::Display for SocketAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl SocketAddress {
    /// Whether two listeners on these addresses would compete for the same port: the same port, and the
    /// same IP or a wildcard on the same family.
    pub fn overlaps(&self, other: &SocketAddress) -> bool {
        let (a, b) = (self.0, other.0);
        a.port() == b.port()
            && a.port() != 0
            && (a.ip() == b.ip()
                || (a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified())))
    }
}

string_typed!(
    SocketAddress,
    "SocketAddress",
    "An IP address and port, such as 127.0.0.1:8080 or [::1]:8080.",
    "^(\\[[0-9A-Fa-f:.]+\\]|[0-9.]+):[0-9]{1,5}$"
);

/// The host half of a [`HostPort`]: an IP address or a DNS name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

/// An address to connect to: an IP or DNS name, and a port (`10.0.0.5:5432`, `db.internal:5432`,
/// `[fd00::1]:53`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: Host,
    pub port: u16,
}

impl HostPort {
    /// The socket address, when the host is an IP address and no name resolution is needed.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match &self.host {
            Host::Ip(ip) => Some(SocketAddr::new(*ip, self.port)),
            Host::Name(_) => None,
        }
    }
}

fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

impl FromStr for HostPort {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "invalid address {text:?}: expected host:port, such as 10.0.0.5:5432, db.internal:5432 or [fd00::1]:5432"
            )
        };
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Self { host: Host::Ip(addr.ip()), port: addr.port() });
        }
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.parse::<IpAddr>().is_ok() || host.contains(':') || !is_dns_name(host) {
            return Err(bad());
        }
        Ok(Self { host: Host::Name(host.to_ascii_lowercase()), port })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(ip) => SocketAddr::new(*ip, self.port).fmt(f),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

string_typed!(
    HostPort,
    "HostPort",
    "A host (IP address or DNS name) and port, such as 10.0.0.5:5432, db.internal:5432 or [fd00::1]:5432.",
    "^.+:[0-9]{1,5}$"
);

/// A CIDR block such as `10.0.0.0/8` or `fd00::/8`. A bare address means a single host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr(pub ipnet::IpNet);

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client reaching a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            IpAddr::V4(_) => ip,
        };
        self.0.contains(&ip)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "invalid CIDR {text:?}: expected an address and prefix length, such as 10.0.0.0/8 or fd00::/8"
            )
        };
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Self(ipnet::IpNet::from(ip)));
        }
        let net: ipnet::IpNet = text.parse().map_err(|_| bad())?;
        if net.trunc() != net {
            return Err(format!("invalid CIDR {text:?}: host bits are set; did you mean {}?", net.trunc()));
        }
        Ok(Self(net))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

string_typed!(
    Cidr,
    "Cidr",
    "An IP network in CIDR notation, such as 10.0.0.0/8 or fd00::/8; a bare address means one host.",
    "^[0-9A-Fa-f:.]+(/[0-9]{1,3})?$"
);

/// A secret value (a token, a key). Its `Debug` and `Serialize` forms are a mask, so a secret never
/// reaches a log line or a config dump; [`Secret::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub const MASK: &'static str = "**redacted**";

    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::MASK)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(Self::MASK)
    }
}

/// Takes any scalar as the secret's text (a numeric token is still a token), and never quotes the value
/// in an error: errors end up in logs and in `/config_dump`.
struct SecretVisitor;

impl serde::de::Visitor<'_> for SecretVisitor {
    type Value = Secret;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a secret (text)")
    }

    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Secret, E> {
        Ok(Secret::new(value))
    }

    fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Secret, E> {
        Ok(Secret::new(value.to_string()))
    }

    fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Secret, E> {
        Ok(Secret::new(value.to_string()))
    }

    fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Secret, E> {
        Ok(Secret::new(value.to_string()))
    }

    fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<Secret, E> {
        Ok(Secret::new(value.to_string()))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Secret, E> {
        Err(E::custom("the secret has no value: give one, or remove the key"))
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SecretVisitor)
    }
}

/// For `Option<Secret>` fields: absent is `None`, but a key that is present must hold a value (serde
/// would otherwise read `token:` with nothing after it as "no token").
pub fn present_secret<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Secret>, D::Error> {
    deserializer.deserialize_any(SecretVisitor).map(Some)
}

impl JsonSchema for Secret {
    fn schema_name() -> Cow<'static, str> {
        Cow::Borrowed("Secret")
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A secret. Prefer the sibling `*_file` field, or ${ENV} interpolation, over writing it here.",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print() {
        for (text, millis) in [("5s", 5_000), ("250ms", 250), ("1m30s", 90_000), ("2h", 7_200_000), ("0s", 0)]
        {
            let parsed: Duration = text.parse().unwrap();
            assert_eq!(parsed.get(), std::time::Duration::from_millis(millis), "{text}");
            assert_eq!(parsed.to_string(), text);
        }
        assert_eq!("1500us".parse::<Duration>().unwrap().to_string(), "1ms500us");
        for bad in ["", "5", "s", "5 s", "-1s", "1.5s", "5d", "99999999999999999999h"] {
            assert!(bad.parse::<Duration>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn host_ports_accept_ips_and_names() {
        let ip: HostPort = "10.0.0.5:5432".parse().unwrap();
        assert_eq!(ip.socket_addr(), Some("10.0.0.5:5432".parse().unwrap()));
        let v6: HostPort = "[fd00::1]:53".parse().unwrap();
        assert_eq!(v6.to_string(), "[fd00::1]:53");
        let name: HostPort = "DB.internal:5432".parse().unwrap();
        assert_eq!(name.host, Host::Name("db.internal".into()));
        assert_eq!(name.socket_addr(), None);
        for bad in ["db", "db:", "db:99999", ":80", "fd00::1:53", "bad name:80", "-x.y:1"] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn cidrs_reject_host_bits_and_match_mapped_v4() {
        let net: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert_eq!("192.0.2.7".parse::<Cidr>().unwrap().to_string(), "192.0.2.7/32");
        let err = "10.0.0.1/8".parse::<Cidr>().unwrap_err();
        assert!(err.contains("did you mean 10.0.0.0/8"), "{err}");
    }

    #[test]
    fn bind_addresses_overlap_on_wildcards() {
        let a: SocketAddress = "0.0.0.0:80".parse().unwrap();
        let b: SocketAddress = "127.0.0.1:80".parse().unwrap();
        let c: SocketAddress = "127.0.0.1:81".parse().unwrap();
        let d: SocketAddress = "[::1]:80".parse().unwrap();
        assert!(a.overlaps(&b));
        assert!(!b.overlaps(&c));
        assert!(!a.overlaps(&d));
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), Secret::MASK);
        assert_eq!(serde_json::to_string(&secret).unwrap(), format!("\"{}\"", Secret::MASK));
        assert_eq!(secret.expose(), "hunter2");
    }
}
