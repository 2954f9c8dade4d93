//! Gandi LiveDNS (API v5): one PUT replaces the name's RRset of the type (`rrset_values`, `rrset_ttl`),
//! then a GET of the same RRset reads it back. A personal access token, sent as `Authorization: Bearer`.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::{Value, json};

use super::Failure;
use super::http::request;

/// One domain at Gandi.
#[derive(Clone)]
pub struct Gandi {
    /// `https://api.gandi.net/v5/livedns` (a local server in tests).
    pub api_url: String,
    pub token: String,
}

impl std::fmt::Debug for Gandi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gandi").field("api_url", &self.api_url).finish()
    }
}

impl Gandi {
    /// Makes `fqdn` (in `zone`) hold exactly `address`; returns what a read-back shows.
    pub async fn replace(
        &self,
        zone: &str,
        fqdn: &str,
        ttl: u32,
        address: IpAddr,
    ) -> Result<Vec<IpAddr>, Failure> {
        let zone = zone.trim_end_matches('.').to_ascii_lowercase();
        let name = crate::relative_name(&zone, fqdn)?;
        let record_type = crate::record_type(address);
        let url =
            format!("{}/domains/{zone}/records/{name}/{record_type}", self.api_url.trim_end_matches('/'));
        let authorization = format!("Bearer {}", self.token);
        // Gandi's smallest TTL is 300 s.
        let body = json!({"rrset_values": [address.to_string()], "rrset_ttl": ttl.max(300)});
        let headers = [("Authorization", authorization.as_str()), ("Content-Type", "application/json")];
        let answer = request("PUT", &url, &headers, Some(body.to_string().into_bytes()))
            .await
            .map_err(Failure::now)?;
        if answer.status == 429 {
            let wait = answer.retry_after().unwrap_or(Duration::from_secs(60));
            return Err(Failure { message: "Gandi: rate limited".to_string(), retry_after: Some(wait) });
        }
        if !(200..300).contains(&answer.status) {
            let body: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
            let message = body["message"].as_str().map_or_else(
                || String::from_utf8_lossy(&answer.body).chars().take(200).collect(),
                str::to_string,
            );
            return Err(Failure::now(format!("Gandi: PUT {url} answered {}: {message}", answer.status)));
        }
        let answer = request("GET", &url, &headers[..1], None).await.map_err(Failure::now)?;
        if answer.status != 200 {
            return Err(Failure::now(format!("Gandi: reading {url} back answered {}", answer.status)));
        }
        let rrset: Value = serde_json::from_slice(&answer.body)
            .map_err(|error| Failure::now(format!("Gandi: unreadable RRset: {error}")))?;
        Ok(rrset["rrset_values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|value| value.as_str()?.parse().ok())
            .collect())
    }
}
