//! Keel's DNS providers: make one name hold exactly one address, then check that it does.
//!
//! [`update`] is the whole interface. It changes the zone through the provider named by a
//! [`DnsProviderSpec`] (RFC 2136 with TSIG, Cloudflare, Alibaba Cloud DNS, Gandi LiveDNS) and reads the
//! record back (from the zone's server for RFC 2136, through the provider's API otherwise): only a
//! read-back showing exactly the address counts as success. The control plane calls it from its durable
//! outbox; the proxy's reporters call it for a `dns` sink. Both retry a [`Failure`] with backoff, no
//! sooner than its `retry_after`.

pub mod alibaba;
pub mod cloudflare;
pub mod gandi;
pub mod http;
pub mod rfc2136;

use std::net::IpAddr;
use std::time::Duration;

use keel_schemas::resource::DnsProviderSpec;

/// Why an update did not go through, and how long the provider asked us to wait.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    /// The provider's own "come back later" (a 429's `Retry-After`, a throttling error).
    pub retry_after: Option<Duration>,
}

impl Failure {
    /// A failure that may be retried on the caller's schedule.
    pub fn now(message: impl Into<String>) -> Self {
        Self { message: message.into(), retry_after: None }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self::now(message)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Reads a credential from its file, trimmed; an empty file is an error.
pub fn read_secret(path: &str) -> Result<String, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| Failure::now(format!("cannot read {path}: {error}")))?;
    let text = text.trim().to_string();
    if text.is_empty() {
        return Err(Failure::now(format!("{path} is empty")));
    }
    Ok(text)
}

/// The record type that holds `address`: A for IPv4, AAAA for IPv6.
pub(crate) fn record_type(address: IpAddr) -> &'static str {
    if address.is_ipv6() { "AAAA" } else { "A" }
}

/// `fqdn` relative to `zone` (lowercase, without the final dot), as the providers' APIs name records:
/// `@` for the zone's apex.
pub(crate) fn relative_name(zone: &str, fqdn: &str) -> Result<String, Failure> {
    let fqdn = fqdn.trim_end_matches('.').to_ascii_lowercase();
    if fqdn == zone {
        return Ok("@".to_string());
    }
    fqdn.strip_suffix(&format!(".{zone}"))
        .map(str::to_string)
        .ok_or_else(|| Failure::now(format!("{fqdn} is not in the zone {zone}")))
}

/// The record to change: `fqdn` (lowercase, with the final dot) in `zone`, with `ttl`. Its type follows
/// the address: A for IPv4, AAAA for IPv6.
#[derive(Clone, Debug)]
pub struct Target<'a> {
    pub zone: &'a str,
    pub fqdn: &'a str,
    pub ttl: Duration,
}

/// Makes the target hold exactly `address` through `provider`, then reads it back: `Ok` with what is
/// there when it is exactly `address`.
pub async fn update(
    provider: &DnsProviderSpec,
    target: &Target<'_>,
    address: IpAddr,
) -> Result<Vec<IpAddr>, Failure> {
    let Target { zone, fqdn, ttl } = *target;
    let ttl = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX);
    let (observed, from) = match provider {
        DnsProviderSpec::Rfc2136(settings) => {
            let secret = read_secret(&settings.secret_file)?;
            let server = rfc2136::Server::new(settings.server.0, &settings.key_name, &secret)?;
            server.replace(zone, fqdn, ttl, address).await?;
            (server.query(fqdn, address.is_ipv6()).await?, settings.server.to_string())
        }
        DnsProviderSpec::Cloudflare(settings) => {
            let cloudflare = cloudflare::Cloudflare {
                api_url: settings.api_url.clone(),
                token: read_secret(&settings.api_token_file)?,
                zone_id: settings.zone_id.clone(),
            };
            (cloudflare.replace(zone, fqdn, ttl, address).await?, "Cloudflare".to_string())
        }
        DnsProviderSpec::Alibaba(settings) => {
            let alibaba = alibaba::Alibaba {
                api_url: settings.api_url.clone(),
                access_key_id: settings.access_key_id.clone(),
                access_key_secret: read_secret(&settings.access_key_secret_file)?,
            };
            (alibaba.replace(zone, fqdn, ttl, address).await?, "Alibaba Cloud DNS".to_string())
        }
        DnsProviderSpec::Gandi(settings) => {
            let gandi = gandi::Gandi {
                api_url: settings.api_url.clone(),
                token: read_secret(&settings.api_token_file)?,
            };
            (gandi.replace(zone, fqdn, ttl, address).await?, "Gandi".to_string())
        }
    };
    if observed != [address] {
        return Err(Failure::now(format!("verification: {from} has {observed:?} for {fqdn}, not {address}")));
    }
    Ok(observed)
}

#[cfg(test)]
mod tests {
    use super::relative_name;

    #[test]
    fn names_relative_to_the_zone() {
        assert_eq!(relative_name("example.com", "example.com.").unwrap(), "@");
        assert_eq!(relative_name("example.com", "gw.Example.com.").unwrap(), "gw");
        assert_eq!(relative_name("example.com", "a.b.example.com").unwrap(), "a.b");
        assert!(relative_name("example.com", "example.org.").is_err());
        assert!(relative_name("example.com", "badexample.com.").is_err());
    }
}
