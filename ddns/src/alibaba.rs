//! Alibaba Cloud DNS (Alidns, RPC API version `2015-01-09`).
//!
//! DescribeSubDomainRecords lists exactly the name's records of the type (unlike DescribeDomainRecords,
//! whose keyword match is fuzzy). The first is changed with UpdateDomainRecord when its value or TTL
//! differs (AddDomainRecord when there is none), any others are deleted, and the list is read again to
//! verify. `DomainRecordDuplicate` means the record already holds the value: in sync, not an error.
//!
//! Every request is a GET signed with signature version 1.0: the parameters (the action's and the
//! common ones: Format, Version, AccessKeyId, SignatureMethod, Timestamp, SignatureVersion,
//! SignatureNonce) are percent-encoded per RFC 3986, sorted by name and joined into the canonicalized
//! query; `GET&%2F&` plus that query, percent-encoded again, is signed with HMAC-SHA1 keyed with the
//! AccessKey secret and `&`, and the base64 signature is sent as `Signature`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use ring::rand::SecureRandom;
use serde_json::Value;

use super::Failure;
use super::http::{Answer, request};

const API_VERSION: &str = "2015-01-09";
/// Alibaba sends no Retry-After; a throttled caller waits this long.
const THROTTLED_WAIT: Duration = Duration::from_secs(60);

/// One account at Alibaba Cloud DNS.
#[derive(Clone)]
pub struct Alibaba {
    /// `https://alidns.aliyuncs.com/` (a local server in tests).
    pub api_url: String,
    pub access_key_id: String,
    pub access_key_secret: String,
}

impl std::fmt::Debug for Alibaba {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alibaba")
            .field("api_url", &self.api_url)
            .field("access_key_id", &self.access_key_id)
            .finish()
    }
}

/// An error the API answered with (`{"Code": ..., "Message": ...}`).
#[derive(Debug)]
struct ApiError {
    status: u16,
    code: String,
    message: String,
}

impl ApiError {
    fn into_failure(self, action: &str) -> Failure {
        let message =
            format!("Alibaba Cloud DNS: {action} answered {} {}: {}", self.status, self.code, self.message);
        if self.code.starts_with("Throttling") || self.status == 429 {
            Failure { message, retry_after: Some(THROTTLED_WAIT) }
        } else {
            Failure::now(message)
        }
    }
}

impl Alibaba {
    /// Calls `action`: `Err` when it could not be asked, `Ok(Err)` when it refused.
    async fn call(&self, action: &str, params: &[(&str, &str)]) -> Result<Result<Value, ApiError>, Failure> {
        let mut nonce = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| Failure::now("no randomness for the request's nonce"))?;
        let mut query: BTreeMap<&str, String> = BTreeMap::new();
        query.insert("Action", action.to_string());
        query.insert("Format", "JSON".to_string());
        query.insert("Version", API_VERSION.to_string());
        query.insert("AccessKeyId", self.access_key_id.clone());
        query.insert("SignatureMethod", "HMAC-SHA1".to_string());
        query.insert("SignatureVersion", "1.0".to_string());
        query.insert("SignatureNonce", data_encoding::HEXLOWER.encode(&nonce));
        query.insert("Timestamp", humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
        for (name, value) in params {
            query.insert(name, (*value).to_string());
        }
        let canonical = canonical_query(&query);
        let signature = sign(&self.access_key_secret, &string_to_sign(&canonical));
        let url = format!(
            "{}?{canonical}&Signature={}",
            self.api_url.trim_end_matches('/').to_string() + "/",
            percent_encode(&signature)
        );
        let answer = request("GET", &url, &[], None).await.map_err(Failure::now)?;
        Ok(parse(answer))
    }

    /// The name's records of the type, exactly (`SubDomain` is the whole name).
    async fn records(
        &self,
        zone: &str,
        fqdn: &str,
        rr: &str,
        record_type: &str,
    ) -> Result<Vec<Value>, Failure> {
        let sub_domain = fqdn.trim_end_matches('.');
        let params =
            [("SubDomain", sub_domain), ("DomainName", zone), ("Type", record_type), ("PageSize", "500")];
        let listed = self
            .call("DescribeSubDomainRecords", &params)
            .await?
            .map_err(|error| error.into_failure("DescribeSubDomainRecords"))?;
        Ok(listed["DomainRecords"]["Record"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|record| {
                record["Type"].as_str() == Some(record_type)
                    && record["RR"].as_str().is_some_and(|name| name.eq_ignore_ascii_case(rr))
            })
            .cloned()
            .collect())
    }

    /// Makes `fqdn` (in `zone`) hold exactly `address`; returns what a read-back shows.
    pub async fn replace(
        &self,
        zone: &str,
        fqdn: &str,
        ttl: u32,
        address: IpAddr,
    ) -> Result<Vec<IpAddr>, Failure> {
        let zone = zone.trim_end_matches('.').to_ascii_lowercase();
        let rr = crate::relative_name(&zone, fqdn)?;
        let record_type = crate::record_type(address);
        let value = address.to_string();
        let ttl_text = ttl.to_string();
        let existing = self.records(&zone, fqdn, &rr, record_type).await?;
        match existing.first() {
            Some(first) => {
                let id = first["RecordId"].as_str().unwrap_or_default();
                let current = first["Value"].as_str() == Some(value.as_str())
                    && first["TTL"].as_u64() == Some(u64::from(ttl));
                if !current {
                    let params = [
                        ("RecordId", id),
                        ("RR", &rr),
                        ("Type", record_type),
                        ("Value", &value),
                        ("TTL", &ttl_text),
                    ];
                    self.change("UpdateDomainRecord", &params).await?;
                }
            }
            None => {
                let params = [
                    ("DomainName", zone.as_str()),
                    ("RR", &rr),
                    ("Type", record_type),
                    ("Value", &value),
                    ("TTL", &ttl_text),
                ];
                self.change("AddDomainRecord", &params).await?;
            }
        }
        for extra in existing.iter().skip(1).filter_map(|record| record["RecordId"].as_str()) {
            self.change("DeleteDomainRecord", &[("RecordId", extra)]).await?;
        }
        let seen = self.records(&zone, fqdn, &rr, record_type).await?;
        Ok(seen.iter().filter_map(|record| record["Value"].as_str()?.parse().ok()).collect())
    }

    /// A change; `DomainRecordDuplicate` (the record already holds the value) counts as done.
    async fn change(&self, action: &str, params: &[(&str, &str)]) -> Result<(), Failure> {
        match self.call(action, params).await? {
            Ok(_) => Ok(()),
            Err(error) if error.code == "DomainRecordDuplicate" => Ok(()),
            Err(error) => Err(error.into_failure(action)),
        }
    }
}

/// The record's name relative to the zone, as Alibaba's `RR`: `@` for the apex.
fn parse(answer: Answer) -> Result<Value, ApiError> {
    let body: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    if answer.status == 200 && body.is_object() {
        return Ok(body);
    }
    let text = || String::from_utf8_lossy(&answer.body).chars().take(200).collect::<String>();
    Err(ApiError {
        status: answer.status,
        code: body["Code"].as_str().unwrap_or("(no code)").to_string(),
        message: body["Message"].as_str().map_or_else(text, str::to_string),
    })
}

/// RFC 3986 percent-encoding as the signature wants it: only `A-Z a-z 0-9 - _ . ~` stay as they are,
/// every other byte of the UTF-8 text becomes `%XX` (upper case), a space `%20`.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The parameters, encoded, in the order of their names, as `name=value` joined by `&`.
pub fn canonical_query<K: AsRef<str>, V: AsRef<str>>(params: &BTreeMap<K, V>) -> String {
    params
        .iter()
        .map(|(name, value)| format!("{}={}", percent_encode(name.as_ref()), percent_encode(value.as_ref())))
        .collect::<Vec<_>>()
        .join("&")
}

/// What is signed for a GET: `GET&%2F&` and the canonicalized query, encoded once more.
pub fn string_to_sign(canonical_query: &str) -> String {
    format!("GET&{}&{}", percent_encode("/"), percent_encode(canonical_query))
}

/// The signature: base64 of HMAC-SHA1 keyed with the secret and `&`.
pub fn sign(access_key_secret: &str, string_to_sign: &str) -> String {
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        format!("{access_key_secret}&").as_bytes(),
    );
    data_encoding::BASE64.encode(ring::hmac::sign(&key, string_to_sign.as_bytes()).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of Alibaba Cloud DNS's signature documentation (help.aliyun.com, document 29747):
    /// its parameters, string to sign and signature.
    #[test]
    fn signs_the_documented_example() {
        let params: BTreeMap<&str, &str> = [
            ("Format", "XML"),
            ("AccessKeyId", "testid"),
            ("Action", "DescribeDomainRecords"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("DomainName", "example.com"),
            ("SignatureNonce", "f59ed6a9-83fc-473b-9cc6-99c95df3856e"),
            ("SignatureVersion", "1.0"),
            ("Version", "2015-01-09"),
            ("Timestamp", "2016-03-24T16:41:54Z"),
        ]
        .into_iter()
        .collect();
        let to_sign = string_to_sign(&canonical_query(&params));
        assert_eq!(
            to_sign,
            "GET&%2F&AccessKeyId%3Dtestid%26Action%3DDescribeDomainRecords%26DomainName%3Dexample.com\
             %26Format%3DXML%26SignatureMethod%3DHMAC-SHA1%26SignatureNonce%3Df59ed6a9-83fc-473b-9cc6-\
             99c95df3856e%26SignatureVersion%3D1.0%26Timestamp%3D2016-03-24T16%253A41%253A54Z%26Version\
             %3D2015-01-09"
        );
        assert_eq!(sign("testsecret", &to_sign), "uRpHwaSEt3J+6KQD//svCh/x+pI=");
    }

    #[test]
    fn percent_encoding_keeps_only_unreserved_characters() {
        assert_eq!(percent_encode("a b*c~d/e+f=g:h"), "a%20b%2Ac~d%2Fe%2Bf%3Dg%3Ah");
        assert_eq!(percent_encode("é"), "%C3%A9");
        assert_eq!(percent_encode("2001:db8::1"), "2001%3Adb8%3A%3A1");
    }
}
