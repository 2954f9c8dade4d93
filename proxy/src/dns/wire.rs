//! Plain queries answered straight from the wire: hijacked names, and forwarded answers the cache holds.
//!
//! Nearly every query a sidecar sees is the same shape: one A or AAAA question (or another type, for a
//! name that is forwarded), no records but perhaps an OPT. Such a *plain* query is read here in place,
//! without decoding it into hickory's types, and two kinds of answer are written straight into bytes:
//!
//! - a hijacked name's VIP: the header, the question as the client sent it, one answer record whose name
//!   points back at the question's, and an OPT record when the query had one. That is the message the
//!   generic path builds with hickory (the server's tests and the `dns_query` fuzz target hold the two
//!   together), two bytes for the answer's name instead of the name in full: hickory's encoder does not
//!   compress against the question;
//! - a cached forwarded answer: the header, the client's question, then the records the cache stores in
//!   wire form (see [`records_ttl_offsets`]) with each TTL lowered by the time spent in the cache, and the
//!   client's OPT record. An answer that would not fit the client's payload size goes to the generic
//!   path, which truncates it.
//!
//! Anything else goes to the generic path: a response, another opcode or class, more questions or
//! records, an EDNS version or extended RCODE other than 0, an EDNS option hickory would have to decode
//! (NSID, Client Subnet), a label with a byte no hijack name has, a compression pointer, or bytes after
//! the message.

use std::net::IpAddr;

const HEADER: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// EDNS options whose data hickory decodes (and may refuse): NSID and Client Subnet.
const DECODED_OPTIONS: [u16; 2] = [3, 8];
/// A name has at most 127 labels (each at least two bytes of a 255-byte name).
const MAX_LABELS: usize = 127;
/// The OPT record Keel answers with: root name, type, payload size, extended RCODE, version, flags, and
/// no data.
const OPT_LENGTH: usize = 11;
/// A cache key's bytes at most: a 255-byte name, its type, its class and the DO bit.
pub const MAX_KEY: usize = 255 + 5;

/// The query's OPT record, as far as the response needs it.
#[derive(Debug, Clone, Copy)]
struct Opt {
    payload: u16,
    dnssec_ok: bool,
}

fn u16_at(packet: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(packet.get(at..at + 2)?.try_into().ok()?))
}

/// A plain query, read in place: one question of class IN whose labels hold only letters, digits, `-`
/// and `_`, no records but perhaps an OPT record with no option hickory decodes, and nothing after.
#[derive(Debug, Clone, Copy)]
pub struct PlainQuery<'a> {
    packet: &'a [u8],
    question_end: usize,
    query_type: u16,
    opt: Option<Opt>,
}

/// `packet` read as a plain query, or `None` for the generic path.
pub fn read_query(packet: &[u8]) -> Option<PlainQuery<'_>> {
    let header = packet.get(..HEADER)?;
    // QR 0 (a query), OPCODE 0 (QUERY), RCODE 0.
    if header[2] & 0xf8 != 0 || header[3] & 0x0f != 0 {
        return None;
    }
    let counts = [u16_at(header, 4)?, u16_at(header, 6)?, u16_at(header, 8)?, u16_at(header, 10)?];
    if counts[..3] != [1, 0, 0] || counts[3] > 1 {
        return None;
    }

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
    Some(PlainQuery { packet, question_end, query_type, opt })
}

impl<'a> PlainQuery<'a> {
    /// The question's name, label by label, as the client wrote it.
    pub fn labels(&self) -> impl Iterator<Item = &'a [u8]> + use<'a> {
        let packet = self.packet;
        let mut at = HEADER;
        std::iter::from_fn(move || {
            // `read_query` checked every label: a length below 64, within the packet, and a final 0.
            let length = usize::from(packet[at]);
            if length == 0 {
                return None;
            }
            let label = &packet[at + 1..at + 1 + length];
            at += 1 + length;
            Some(label)
        })
    }

    pub fn query_type(&self) -> u16 {
        self.query_type
    }

    /// The key the answer cache files this question under (see `cache::CacheKey`), written into
    /// `buffer`: the name in lower case, the type and class as they are, and the DO bit.
    pub fn cache_key<'b>(&self, buffer: &'b mut [u8; MAX_KEY]) -> &'b [u8] {
        // The question is the name (at most 255 bytes, checked by `read_query`), the type and the class;
        // length bytes are below 64, so lowering the name's case changes only the labels' letters.
        let question = &self.packet[HEADER..self.question_end];
        let name_end = question.len() - 4;
        for (slot, byte) in buffer.iter_mut().zip(&question[..name_end]) {
            *slot = byte.to_ascii_lowercase();
        }
        buffer[name_end..question.len()].copy_from_slice(&question[name_end..]);
        buffer[question.len()] = u8::from(self.opt.is_some_and(|opt| opt.dnssec_ok));
        &buffer[..=question.len()]
    }

    /// The largest UDP response the client takes: its EDNS payload size (at least 512), or 512 bytes
    /// without EDNS (RFC 1035 section 4.2.1).
    fn payload_limit(&self) -> usize {
        self.opt.map_or(512, |opt| usize::from(opt.payload.max(512)))
    }

    /// The header's ID, flags and the question, as a response starts: QR 1, OPCODE 0, RD and CD as
    /// asked, then `flags` (AA, AD, RCODE), RA 1, one question, `counts` for the other sections (one more
    /// additional record when the query had an OPT record).
    fn start_response(&self, capacity: usize, aa: bool, ad_and_rcode: u8, counts: [u16; 3]) -> Vec<u8> {
        let header = &self.packet[..HEADER];
        let mut response = Vec::with_capacity(capacity);
        response.extend_from_slice(&header[..2]);
        response.push(0x80 | if aa { 0x04 } else { 0 } | (header[2] & 0x01));
        response.push(0x80 | (ad_and_rcode & 0x2f) | (header[3] & 0x10));
        let additionals = counts[2] + u16::from(self.opt.is_some());
        for count in [1, counts[0], counts[1], additionals] {
            response.extend_from_slice(&u16::to_be_bytes(count));
        }
        response.extend_from_slice(&self.packet[HEADER..self.question_end]);
        response
    }

    /// The response's OPT record, when the query had one: root name, type OPT, the client's payload size
    /// (512 at least), extended RCODE 0, version 0, the DO bit echoed, no options.
    fn push_opt(&self, response: &mut Vec<u8>) {
        if let Some(opt) = self.opt {
            response.push(0);
            response.extend_from_slice(&TYPE_OPT.to_be_bytes());
            response.extend_from_slice(&opt.payload.max(512).to_be_bytes());
            response.extend_from_slice(&[0, 0, if opt.dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
        }
    }

    fn opt_length(&self) -> usize {
        if self.opt.is_some() { OPT_LENGTH } else { 0 }
    }
}

/// A response written from the wire, ready to send.
#[derive(Debug)]
pub struct Answered {
    /// The question's type, for the metrics: `A`, `AAAA`...
    pub query_type: &'static str,
    pub response: Vec<u8>,
}

/// The answer to a plain query for a name hijacked to `vip`: the VIP when the query asks for its family
/// (A for IPv4, AAAA for IPv6); `None` for any other type, which the generic path answers NODATA.
pub fn answer_hijacked(query: &PlainQuery<'_>, vip: IpAddr, ttl: u32) -> Option<Answered> {
    let (v4, v6);
    let (name, address): (&'static str, &[u8]) = match (query.query_type, vip) {
        (TYPE_A, IpAddr::V4(address)) => {
            v4 = address.octets();
            ("A", &v4)
        }
        (TYPE_AAAA, IpAddr::V6(address)) => {
            v6 = address.octets();
            ("AAAA", &v6)
        }
        _ => return None,
    };
    let capacity = query.question_end + 12 + address.len() + query.opt_length();
    // AA 1, RCODE 0 (NOERROR); one answer.
    let mut response = query.start_response(capacity, true, 0, [1, 0, 0]);
    // The answer's name is a pointer to the question's, at offset 12.
    response.extend_from_slice(&[0xc0, 0x0c]);
    response.extend_from_slice(&query.query_type.to_be_bytes());
    response.extend_from_slice(&CLASS_IN.to_be_bytes());
    response.extend_from_slice(&ttl.to_be_bytes());
    response.extend_from_slice(&(address.len() as u16).to_be_bytes());
    response.extend_from_slice(address);
    query.push_opt(&mut response);
    Some(Answered { query_type: name, response })
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

/// A forwarded answer as the cache keeps it: hickory's encoding of the upstream's answer without its OPT
/// record (header, question, records), where the question ends and where each record's TTL is (both from
/// [`records_ttl_offsets`]), and how fresh it is.
#[derive(Debug, Clone, Copy)]
pub struct CachedAnswer<'a> {
    pub wire: &'a [u8],
    pub question_end: u16,
    pub ttl_offsets: &'a [u16],
    /// Seconds the answer has spent in the cache.
    pub elapsed: u32,
    /// Seconds it stays fresh from now: no TTL is served above it.
    pub remaining: u32,
}

/// The answer to a plain query from a fresh cached answer to its question, under the client's ID and
/// flags, with the client's OPT record; `None` when it would not fit the client's payload size (the
/// generic path truncates it) or the stored question is not the query's length.
pub fn answer_cached(query: &PlainQuery<'_>, cached: CachedAnswer<'_>) -> Option<Vec<u8>> {
    // The key matched, so the stored question is the query's in another case, of the same length: every
    // compression pointer in the records still points at what it pointed at.
    if usize::from(cached.question_end) != query.question_end {
        return None;
    }
    let records = cached.wire.get(query.question_end..)?;
    let length = query.question_end + records.len() + query.opt_length();
    if length > query.payload_limit() {
        return None;
    }
    let counts = [u16_at(cached.wire, 6)?, u16_at(cached.wire, 8)?, u16_at(cached.wire, 10)?];
    // AA 0 (a forwarded answer), the upstream's AD bit and RCODE.
    let mut response = query.start_response(length, false, cached.wire[3], counts);
    response.extend_from_slice(records);
    for &at in cached.ttl_offsets {
        let at = usize::from(at);
        let field: &mut [u8; 4] = response.get_mut(at..at + 4)?.try_into().ok()?;
        let lowered = u32::from_be_bytes(*field).saturating_sub(cached.elapsed).min(cached.remaining);
        *field = lowered.to_be_bytes();
    }
    query.push_opt(&mut response);
    Some(response)
}

/// Where the question of `message` (a whole message with one question and no OPT record) ends, and
/// where each record's TTL field is: what [`answer_cached`] needs. `None` if it does not read so.
pub fn records_ttl_offsets(message: &[u8]) -> Option<(u16, Vec<u16>)> {
    let header = message.get(..HEADER)?;
    if u16_at(header, 4)? != 1 {
        return None;
    }
    let records: usize =
        [6, 8, 10].iter().map(|&at| u16_at(header, at).map(usize::from)).sum::<Option<_>>()?;
    let question_end = skip_name(message, HEADER)? + 4;
    let mut at = question_end;
    let mut offsets = Vec::with_capacity(records);
    for _ in 0..records {
        at = skip_name(message, at)?;
        // Type, class, TTL, data length, data.
        if u16_at(message, at)? == TYPE_OPT {
            return None;
        }
        offsets.push(u16::try_from(at + 4).ok()?);
        at += 10 + usize::from(u16_at(message, at + 8)?);
    }
    (at == message.len()).then_some((u16::try_from(question_end).ok()?, offsets))
}

/// Where the name that starts at `at` ends: after its root label or its compression pointer.
fn skip_name(message: &[u8], mut at: usize) -> Option<usize> {
    loop {
        match *message.get(at)? {
            0 => return Some(at + 1),
            length @ 1..=63 => at += 1 + usize::from(length),
            0xc0..=0xff => return message.get(at + 1).map(|_| at + 2),
            _ => return None,
        }
    }
}
