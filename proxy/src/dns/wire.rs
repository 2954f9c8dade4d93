//! Hijacked names answered straight from the wire.
//!
//! Nearly every query a sidecar sees for a hijacked name is the same shape: one A or AAAA question, no
//! records but perhaps an OPT. Such a query is answered here without decoding it into hickory's types:
//! the header and the question are checked in place, the name is looked up by its labels, and the
//! response is the header, the question as the client sent it, one answer record whose name points back
//! at the question's, and an OPT record when the query had one. That is the message the generic path
//! builds with hickory (the server's tests hold the two together), two bytes for the answer's name
//! instead of the name in full: hickory's encoder does not compress against the question.
//!
//! Anything else goes to the generic path: another type or class, a name that is not hijacked or whose
//! VIP is of the other family, more questions or records, an EDNS version or extended RCODE other than 0,
//! an EDNS option hickory would have to decode (NSID, Client Subnet), a label with a byte no hijack name
//! has, a compression pointer, or bytes after the message.

use std::net::IpAddr;

use keel_schemas::dns::HijackTable;

const HEADER: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// EDNS options whose data hickory decodes (and may refuse): NSID and Client Subnet.
const DECODED_OPTIONS: [u16; 2] = [3, 8];
/// A name has at most 127 labels (each at least two bytes of a 255-byte name).
const MAX_LABELS: usize = 127;

/// A hijacked name's response, ready to send.
#[derive(Debug)]
pub struct Hijacked {
    /// The question's type, for the metrics: `A` or `AAAA`.
    pub query_type: &'static str,
    pub response: Vec<u8>,
}

/// The query's OPT record, as far as the response needs it.
#[derive(Debug, Clone, Copy)]
struct Opt {
    payload: u16,
    dnssec_ok: bool,
}

fn u16_at(packet: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(packet.get(at..at + 2)?.try_into().ok()?))
}

/// The response to `packet` if it is a plain A or AAAA query for a name `table` hijacks to a VIP of that
/// family; `None` sends it to the generic path.
pub fn answer_hijacked(packet: &[u8], table: &HijackTable, ttl: u32) -> Option<Hijacked> {
    let header = packet.get(..HEADER)?;
    // QR 0 (a query), OPCODE 0 (QUERY), RCODE 0.
    if header[2] & 0xf8 != 0 || header[3] & 0x0f != 0 {
        return None;
    }
    let counts = [u16_at(header, 4)?, u16_at(header, 6)?, u16_at(header, 8)?, u16_at(header, 10)?];
    if counts[..3] != [1, 0, 0] || counts[3] > 1 {
        return None;
    }

    let mut labels = [(0usize, 0usize); MAX_LABELS];
    let mut label_count = 0;
    let mut at = HEADER;
    loop {
        let length = usize::from(*packet.get(at)?);
        if length == 0 {
            at += 1;
            break;
        }
        // A length of 64 or more is a compression pointer or an extended label type.
        if length > 63 || label_count == MAX_LABELS {
            return None;
        }
        let label = packet.get(at + 1..at + 1 + length)?;
        if !label.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_') {
            return None;
        }
        labels[label_count] = (at + 1, length);
        label_count += 1;
        at += 1 + length;
    }
    if at - HEADER > 255 {
        return None;
    }
    let query_type = u16_at(packet, at)?;
    if u16_at(packet, at + 2)? != CLASS_IN {
        return None;
    }
    let question_end = at + 4;

    let opt = if counts[3] == 1 { Some(read_opt(packet, question_end)?) } else { None };
    if opt.is_none() && packet.len() != question_end {
        return None;
    }

    let vip = table
        .lookup_labels(labels[..label_count].iter().map(|&(start, length)| &packet[start..start + length]))?;
    let (name, address): (&'static str, Vec<u8>) = match (query_type, vip) {
        (TYPE_A, IpAddr::V4(v4)) => ("A", v4.octets().to_vec()),
        (TYPE_AAAA, IpAddr::V6(v6)) => ("AAAA", v6.octets().to_vec()),
        _ => return None,
    };

    let mut response = Vec::with_capacity(question_end + 12 + address.len() + 11);
    response.extend_from_slice(&header[..2]);
    // QR 1, OPCODE 0, AA 1, RD as asked; RA 1, CD as asked, RCODE 0 (NOERROR).
    response.push(0x84 | (header[2] & 0x01));
    response.push(0x80 | (header[3] & 0x10));
    response.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, u8::from(opt.is_some())]);
    response.extend_from_slice(&packet[HEADER..question_end]);
    // The answer's name is a pointer to the question's, at offset 12.
    response.extend_from_slice(&[0xc0, 0x0c]);
    response.extend_from_slice(&query_type.to_be_bytes());
    response.extend_from_slice(&CLASS_IN.to_be_bytes());
    response.extend_from_slice(&ttl.to_be_bytes());
    response.extend_from_slice(&(address.len() as u16).to_be_bytes());
    response.extend_from_slice(&address);
    if let Some(opt) = opt {
        // Root name, type OPT, the client's payload size (512 at least), extended RCODE 0, version 0,
        // the DO bit echoed, no options.
        response.push(0);
        response.extend_from_slice(&TYPE_OPT.to_be_bytes());
        response.extend_from_slice(&opt.payload.max(512).to_be_bytes());
        response.extend_from_slice(&[0, 0, if opt.dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
    }
    Some(Hijacked { query_type: name, response })
}

/// The OPT record that must fill the rest of `packet` from `at`, if it is one the fast path takes.
fn read_opt(packet: &[u8], at: usize) -> Option<Opt> {
    if *packet.get(at)? != 0 || u16_at(packet, at + 1)? != TYPE_OPT {
        return None;
    }
    let payload = u16_at(packet, at + 3)?;
    let (extended_rcode, version) = (*packet.get(at + 5)?, *packet.get(at + 6)?);
    let flags = u16_at(packet, at + 7)?;
    if extended_rcode != 0 || version != 0 {
        return None;
    }
    let data_length = usize::from(u16_at(packet, at + 9)?);
    let data = packet.get(at + 11..)?;
    if data.len() != data_length {
        return None;
    }
    let mut option = 0;
    while option < data.len() {
        let code = u16_at(data, option)?;
        let length = usize::from(u16_at(data, option + 2)?);
        if DECODED_OPTIONS.contains(&code) || option + 4 + length > data.len() {
            return None;
        }
        option += 4 + length;
    }
    Some(Opt { payload, dnssec_ok: flags & 0x8000 != 0 })
}
