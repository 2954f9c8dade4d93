//! Cloudflare's DNS API (v4): list the name's records of the type, PUT the first to the address (POST
//! when there is none), DELETE any others, so that the name holds exactly the address; then list again
//! to verify. An API token (`Authorization: Bearer`) with Zone.DNS edit rights; a 429 is answered after
//! its `Retry-After`.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::{Value, json};

use super::Failure;
use super::http::{Answer, request};

/// One zone at Cloudflare.
#[derive(Clone)]
pub struct Cloudflare {
    /// `https://api.cloudflare.com/client/v4` (a local server in tests).
    pub api_url: String,
    pub token: String,
    /// The zone's ID; looked up by the zone's name when absent.
    pub zone_id: Option<String>,
}

impl std::fmt::Debug for Cloudflare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cloudflare").field("api_url", &self.api_url).field("zone_id", &self.zone_id).finish()
    }
}

/// Cloudflare's record: the name without its final dot.
fn plain(fqdn: &str) -> &str {
    fqdn.trim_end_matches('.')
}

impl Cloudflare {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.api_url.trim_end_matches('/'));
        let authorization = format!("Bearer {}", self.token);
        let mut headers = vec![("Authorization", authorization.as_str())];
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        let answer = request(method, &url, &headers, body.map(|b| b.to_string().into_bytes()))
            .await
            .map_err(Failure::now)?;
        check(method, path, answer)
    }

    async fn zone(&self, zone: &str) -> Result<String, Failure> {
        if let Some(id) = &self.zone_id {
            return Ok(id.clone());
        }
        let found = self.call("GET", &format!("/zones?name={}", plain(zone)), None).await?;
        found["result"][0]["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| Failure::now(format!("Cloudflare has no zone named {}", plain(zone))))
    }

    async fn records(&self, zone_id: &str, fqdn: &str, record_type: &str) -> Result<Vec<Value>, Failure> {
        let listed = self
            .call(
                "GET",
                &format!("/zones/{zone_id}/dns_records?type={record_type}&name={}", plain(fqdn)),
                None,
            )
            .await?;
        Ok(listed["result"].as_array().cloned().unwrap_or_default())
    }

    /// Makes `fqdn` hold exactly `address`; returns what a read-back shows.
    pub async fn replace(
        &self,
        zone: &str,
        fqdn: &str,
        ttl: u32,
        address: IpAddr,
    ) -> Result<Vec<IpAddr>, Failure> {
        let record_type = crate::record_type(address);
        let zone_id = self.zone(zone).await?;
        let existing = self.records(&zone_id, fqdn, record_type).await?;
        let body = json!({"type": record_type, "name": plain(fqdn), "content": address.to_string(), "ttl": ttl, "proxied": false});
        match existing.first().and_then(|record| record["id"].as_str()) {
            Some(id) => {
                let current = existing[0]["content"].as_str() == Some(address.to_string().as_str())
                    && existing[0]["ttl"].as_u64() == Some(u64::from(ttl));
                if !current {
                    self.call("PUT", &format!("/zones/{zone_id}/dns_records/{id}"), Some(body)).await?;
                }
            }
            None => {
                self.call("POST", &format!("/zones/{zone_id}/dns_records"), Some(body)).await?;
            }
        }
        for extra in existing.iter().skip(1).filter_map(|record| record["id"].as_str()) {
            self.call("DELETE", &format!("/zones/{zone_id}/dns_records/{extra}"), None).await?;
        }
        let seen = self.records(&zone_id, fqdn, record_type).await?;
        Ok(seen.iter().filter_map(|record| record["content"].as_str()?.parse().ok()).collect())
    }
}

/// Cloudflare's envelope: `success` with `errors`; 429 with `Retry-After`.
fn check(method: &str, path: &str, answer: Answer) -> Result<Value, Failure> {
    if answer.status == 429 {
        let wait = answer.retry_after().unwrap_or(Duration::from_secs(60));
        return Err(Failure {
            message: format!("Cloudflare: rate limited ({method} {path})"),
            retry_after: Some(wait),
        });
    }
    let body: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    if (200..300).contains(&answer.status) && body["success"] == true {
        return Ok(body);
    }
    let errors: Vec<String> = body["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|error| format!("{} {}", error["code"], error["message"].as_str().unwrap_or_default()))
        .collect();
    let detail = if errors.is_empty() {
        String::from_utf8_lossy(&answer.body).chars().take(200).collect()
    } else {
        errors.join("; ")
    };
    Err(Failure::now(format!("Cloudflare: {method} {path} answered {}: {detail}", answer.status)))
}
