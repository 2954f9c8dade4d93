//! RFC 2136 dynamic update, signed with TSIG (RFC 8945, hmac-sha256), and the query that verifies it.
//!
//! An update replaces one RRset: "delete the name's records of this type, add this one", in one
//! message, so the server applies both or neither. It goes over TCP (no truncation to handle; the
//! messages are tiny and rare). The response's TSIG is checked too: an answer that is not signed with
//! our key does not count as a confirmation.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use ring::hmac;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TYPE_SOA: u16 = 6;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_TSIG: u16 = 250;
const CLASS_IN: u16 = 1;
const CLASS_ANY: u16 = 255;
const OPCODE_UPDATE: u16 = 5;
/// Allowed clock difference between us and the server, in seconds (RFC 8945 recommends 300).
const FUDGE: u16 = 300;
const ALGORITHM: &str = "hmac-sha256.";
const TIMEOUT: Duration = Duration::from_secs(10);

/// A zone's primary server and the TSIG key it accepts updates signed with.
#[derive(Clone)]
pub struct Server {
    pub address: SocketAddr,
    pub key_name: String,
    pub key: hmac::Key,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("address", &self.address).field("key_name", &self.key_name).finish()
    }
}

impl Server {
    /// `secret` is the key's base64 text, as `tsig-keygen` prints it.
    pub fn new(address: SocketAddr, key_name: &str, secret: &str) -> Result<Self, String> {
        let secret = base64_decode(secret.trim()).ok_or("the TSIG secret is not base64")?;
        if secret.is_empty() {
            return Err("the TSIG secret is empty".to_string());
        }
        Ok(Self { address, key_name: key_name.to_string(), key: hmac::Key::new(hmac::HMAC_SHA256, &secret) })
    }

    /// Makes `fqdn` (in `zone`) hold exactly `address`, with `ttl`.
    pub async fn replace(&self, zone: &str, fqdn: &str, ttl: u32, address: IpAddr) -> Result<(), String> {
        let (record_type, rdata) = match address {
            IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
            IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
        };
        let id: u16 = fastrand::u16(..);
        let mut message = Vec::with_capacity(256);
        // Header: id, opcode UPDATE, one zone, no prerequisites, two updates, no additional yet.
        message.extend_from_slice(&id.to_be_bytes());
        message.extend_from_slice(&(OPCODE_UPDATE << 11).to_be_bytes());
        for count in [1u16, 0, 2, 0] {
            message.extend_from_slice(&count.to_be_bytes());
        }
        encode_name(zone, &mut message)?;
        message.extend_from_slice(&TYPE_SOA.to_be_bytes());
        message.extend_from_slice(&CLASS_IN.to_be_bytes());
        // Delete the RRset (class ANY, TTL 0, no data)...
        encode_name(fqdn, &mut message)?;
        message.extend_from_slice(&record_type.to_be_bytes());
        message.extend_from_slice(&CLASS_ANY.to_be_bytes());
        message.extend_from_slice(&0u32.to_be_bytes());
        message.extend_from_slice(&0u16.to_be_bytes());
        // ...and add the one record.
        encode_name(fqdn, &mut message)?;
        message.extend_from_slice(&record_type.to_be_bytes());
        message.extend_from_slice(&CLASS_IN.to_be_bytes());
        message.extend_from_slice(&ttl.to_be_bytes());
        message.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        message.extend_from_slice(&rdata);
        let time_signed =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        let request_mac = self.sign(&mut message, id, time_signed)?;
        let response = tokio::time::timeout(TIMEOUT, exchange(self.address, &message))
            .await
            .map_err(|_| format!("{} did not answer within {TIMEOUT:?}", self.address))??;
        self.check_answer(&response, id, &request_mac)
    }

    /// Whether the server's answer to the update with `id`, signed with `request_mac`, confirms it: the
    /// same ID, NOERROR, and a TSIG made with our key. Public for the fuzz target (`fuzz/`): these are
    /// bytes from the network.
    #[doc(hidden)]
    pub fn check_answer(&self, response: &[u8], id: u16, request_mac: &[u8]) -> Result<(), String> {
        if response.len() < 12 || response[0..2] != id.to_be_bytes() {
            return Err("the answer does not match the update".to_string());
        }
        let rcode = response[3] & 0x0f;
        if rcode != 0 {
            return Err(format!("the server refused the update: {}", rcode_name(rcode)));
        }
        self.verify(response, request_mac)
    }

    /// Appends a TSIG record to `message` (whose additional count is 0), returning the MAC.
    fn sign(&self, message: &mut Vec<u8>, id: u16, time_signed: u64) -> Result<Vec<u8>, String> {
        let mut signed = message.clone();
        self.variables_at(&mut signed, time_signed, FUDGE)?;
        let mac = hmac::sign(&self.key, &signed).as_ref().to_vec();
        self.append_tsig(message, id, time_signed, &mac)?;
        let additional = u16::from_be_bytes([message[10], message[11]]) + 1;
        message[10..12].copy_from_slice(&additional.to_be_bytes());
        Ok(mac)
    }

    fn append_tsig(
        &self,
        message: &mut Vec<u8>,
        id: u16,
        time_signed: u64,
        mac: &[u8],
    ) -> Result<(), String> {
        encode_name(&self.key_name.to_ascii_lowercase(), message)?;
        message.extend_from_slice(&TYPE_TSIG.to_be_bytes());
        message.extend_from_slice(&CLASS_ANY.to_be_bytes());
        message.extend_from_slice(&0u32.to_be_bytes());
        let mut rdata = Vec::new();
        encode_name(ALGORITHM, &mut rdata)?;
        rdata.extend_from_slice(&time_signed.to_be_bytes()[2..]);
        rdata.extend_from_slice(&FUDGE.to_be_bytes());
        rdata.extend_from_slice(&(mac.len() as u16).to_be_bytes());
        rdata.extend_from_slice(mac);
        rdata.extend_from_slice(&id.to_be_bytes());
        rdata.extend_from_slice(&0u16.to_be_bytes());
        rdata.extend_from_slice(&0u16.to_be_bytes());
        message.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        message.extend_from_slice(&rdata);
        Ok(())
    }

    /// Checks the response's TSIG (RFC 8945 §5.3): signed over the request's MAC, the response without
    /// its TSIG, and the TSIG variables, with our key.
    fn verify(&self, response: &[u8], request_mac: &[u8]) -> Result<(), String> {
        let unsigned = || "the server's answer is not signed with the key".to_string();
        let additional = u16::from_be_bytes([response[10], response[11]]);
        if additional == 0 {
            return Err(unsigned());
        }
        let tsig_start = last_record_offset(response).ok_or_else(unsigned)?;
        let mut position = skip_name(response, tsig_start).ok_or_else(unsigned)?;
        let record_type = u16::from_be_bytes(
            response.get(position..position + 2).ok_or_else(unsigned)?.try_into().map_err(|_| unsigned())?,
        );
        if record_type != TYPE_TSIG {
            return Err(unsigned());
        }
        position += 10; // type, class, TTL, rdlength
        let algorithm_end = skip_name(response, position).ok_or_else(unsigned)?;
        let fixed = response.get(algorithm_end..algorithm_end + 10).ok_or_else(unsigned)?;
        let time_signed =
            u64::from_be_bytes([0, 0, fixed[0], fixed[1], fixed[2], fixed[3], fixed[4], fixed[5]]);
        let fudge = u16::from_be_bytes([fixed[6], fixed[7]]);
        let mac_len = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let mac = response.get(algorithm_end + 10..algorithm_end + 10 + mac_len).ok_or_else(unsigned)?;
        let error_at = algorithm_end + 10 + mac_len + 2;
        let error = response.get(error_at..error_at + 2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
        if error != 0 {
            return Err(format!("the server rejected the signature (TSIG error {error})"));
        }
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        if now.abs_diff(time_signed) > u64::from(fudge) {
            return Err("the server's signature is outside the allowed time window".to_string());
        }
        let mut signed = Vec::with_capacity(response.len() + 64);
        signed.extend_from_slice(&(request_mac.len() as u16).to_be_bytes());
        signed.extend_from_slice(request_mac);
        let mut body = response[..tsig_start].to_vec();
        body[10..12].copy_from_slice(&(additional - 1).to_be_bytes());
        signed.extend_from_slice(&body);
        self.variables_at(&mut signed, time_signed, fudge)?;
        hmac::verify(&self.key, &signed, mac)
            .map_err(|_| "the server's signature does not verify".to_string())
    }

    /// The TSIG variables (RFC 8945 §4.3.3) that follow the message in what is signed.
    fn variables_at(&self, out: &mut Vec<u8>, time_signed: u64, fudge: u16) -> Result<(), String> {
        encode_name(&self.key_name.to_ascii_lowercase(), out)?;
        out.extend_from_slice(&CLASS_ANY.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        encode_name(ALGORITHM, out)?;
        out.extend_from_slice(&time_signed.to_be_bytes()[2..]);
        out.extend_from_slice(&fudge.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        Ok(())
    }

    /// The addresses `fqdn` has at the server now, of `address`'s family (for verification).
    pub async fn query(&self, fqdn: &str, ipv6: bool) -> Result<Vec<IpAddr>, String> {
        let name = Name::from_ascii(fqdn).map_err(|error| error.to_string())?;
        let record_type = if ipv6 { RecordType::AAAA } else { RecordType::A };
        let mut query = Message::new(fastrand::u16(..), MessageType::Query, OpCode::Query);
        query.add_query(Query::query(name, record_type));
        let bytes = query.to_vec().map_err(|error| error.to_string())?;
        let response = tokio::time::timeout(TIMEOUT, exchange(self.address, &bytes))
            .await
            .map_err(|_| format!("{} did not answer within {TIMEOUT:?}", self.address))??;
        let response = Message::from_vec(&response).map_err(|error| format!("unreadable answer: {error}"))?;
        Ok(response
            .answers
            .iter()
            .filter_map(|record| match &record.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                _ => None,
            })
            .collect())
    }
}

/// One DNS message over TCP: length-prefixed both ways.
async fn exchange(server: SocketAddr, message: &[u8]) -> Result<Vec<u8>, String> {
    let mut stream =
        TcpStream::connect(server).await.map_err(|error| format!("cannot reach {server}: {error}"))?;
    let mut framed = (message.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(message);
    stream.write_all(&framed).await.map_err(|error| format!("{server}: {error}"))?;
    let length = stream.read_u16().await.map_err(|error| format!("{server}: {error}"))?;
    let mut response = vec![0u8; usize::from(length)];
    stream.read_exact(&mut response).await.map_err(|error| format!("{server}: {error}"))?;
    Ok(response)
}

/// A name in uncompressed wire form.
fn encode_name(name: &str, out: &mut Vec<u8>) -> Result<(), String> {
    for label in name.trim_end_matches('.').split('.').filter(|label| !label.is_empty()) {
        if label.len() > 63 {
            return Err(format!("label {label:?} of {name:?} is longer than 63 bytes"));
        }
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    Ok(())
}

/// The offset just past the (possibly compressed) name at `at`.
fn skip_name(message: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let length = *message.get(at)?;
        match length {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => return Some(at + 2),
            l => at += 1 + usize::from(l),
        }
    }
}

/// The offset of the message's last resource record (the TSIG, when there is one).
fn last_record_offset(message: &[u8]) -> Option<usize> {
    let count = |at: usize| usize::from(u16::from_be_bytes([message[at], message[at + 1]]));
    let (questions, records) = (count(4), count(6) + count(8) + count(10));
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(message, at)? + 4;
    }
    let mut last = None;
    for _ in 0..records {
        last = Some(at);
        at = skip_name(message, at)?;
        let length = usize::from(u16::from_be_bytes([*message.get(at + 8)?, *message.get(at + 9)?]));
        at += 10 + length;
    }
    if at > message.len() {
        return None;
    }
    last
}

fn rcode_name(rcode: u8) -> String {
    match rcode {
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED (is the key allowed to update this zone?)".into(),
        6 => "YXDOMAIN".into(),
        7 => "YXRRSET".into(),
        8 => "NXRRSET".into(),
        9 => "NOTAUTH (wrong key, or the server is not authoritative for the zone)".into(),
        10 => "NOTZONE (the name is not in the zone)".into(),
        other => format!("RCODE {other}"),
    }
}

/// Standard base64 (with padding), as TSIG secrets are written.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    data_encoding::BASE64.decode(text.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_tsig_keygen_writes_it() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8h").unwrap(), b"hello!");
        assert_eq!(base64_decode("aGk=").unwrap(), b"hi");
        assert!(base64_decode("a$==").is_none());
    }

    #[test]
    fn names_and_record_walking() {
        let mut name = Vec::new();
        encode_name("gw.example.test.", &mut name).unwrap();
        assert_eq!(name, b"\x02gw\x07example\x04test\x00");
        assert!(encode_name(&format!("{}.test", "x".repeat(64)), &mut Vec::new()).is_err());
        // A message with one question and one answer whose name is a compression pointer.
        let mut message = vec![0, 1, 0x84, 0, 0, 1, 0, 1, 0, 0, 0, 0];
        message.extend_from_slice(&name);
        message.extend_from_slice(&[0, 1, 0, 1]);
        let answer = message.len();
        message.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
        assert_eq!(last_record_offset(&message), Some(answer));
        assert_eq!(last_record_offset(&message[..message.len() - 2]), None);
    }
}
