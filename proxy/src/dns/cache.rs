//! The cache of forwarded answers.
//!
//! Answers are stored in wire form: hickory's encoding of the upstream's answer without its OPT record,
//! with where each record's TTL is. A hit of the plain shape (see [`super::wire`]) is written from those
//! bytes with the client's ID, question and OPT record and each TTL lowered by the time the answer has
//! spent in the cache; any other hit (over TCP, one that must be truncated, a stale answer) is decoded
//! into hickory's `Message` and lowered the same way. The decisions are made once, when an answer is
//! stored:
//!
//! - positive answers live for their smallest answer TTL, clamped to `min_ttl..=max_ttl`;
//! - negative answers (NXDOMAIN, or NOERROR with no answer) live for the SOA's minimum (or the SOA
//!   record's own TTL, if lower; RFC 2308), at most `negative_ttl`, and are not cached without an SOA;
//! - truncated answers, and answers with any other response code, are not cached;
//! - once expired, an answer may still be served for `serve_stale` when every upstream fails, with a TTL
//!   of 30 s (RFC 8767).
//!
//! Freshness is measured on tokio's clock (so tests can step through it); moka bounds the number of
//! entries and evicts each one once its stale window has passed.

use std::borrow::Borrow;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, LowerName, RData, RecordType};
use keel_schemas::config::DnsCache;
use tokio::time::Instant;

use super::wire::{self, CachedAnswer, PlainQuery};

/// TTL of an answer served stale (RFC 8767 section 4).
const STALE_TTL: u32 = 30;

/// What a cached answer is the answer to, as bytes: the question's name in wire form and lower case,
/// its type and class, and whether the client asked for DNSSEC records (the answers differ). The wire
/// path writes the same bytes straight from a query ([`PlainQuery::cache_key`]) and looks them up
/// without building a key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey(Box<[u8]>);

impl CacheKey {
    pub fn new(name: &LowerName, record_type: RecordType, class: DNSClass, dnssec_ok: bool) -> Self {
        let mut bytes = Vec::with_capacity(wire::MAX_KEY);
        for label in name.iter() {
            // A decoded name's labels are at most 63 bytes.
            bytes.push(label.len() as u8);
            bytes.extend(label.iter().map(u8::to_ascii_lowercase));
        }
        bytes.push(0);
        bytes.extend_from_slice(&u16::from(record_type).to_be_bytes());
        bytes.extend_from_slice(&u16::from(class).to_be_bytes());
        bytes.push(u8::from(dnssec_ok));
        Self(bytes.into_boxed_slice())
    }

    pub fn dnssec_ok(&self) -> bool {
        self.0.last() == Some(&1)
    }
}

/// Derived `Hash` and `Eq` of the one field are those of the bytes, as `Borrow` requires.
impl Borrow<[u8]> for CacheKey {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

#[derive(Debug)]
struct Entry {
    /// The answer without its OPT record, as hickory encodes it, under the upstream's ID.
    wire: Box<[u8]>,
    question_end: u16,
    ttl_offsets: Box<[u16]>,
    stored: Instant,
    fresh_for: u32,
    stale_for: u32,
}

impl Entry {
    /// Seconds in the cache.
    fn age(&self) -> u32 {
        u32::try_from(self.stored.elapsed().as_secs()).unwrap_or(u32::MAX)
    }
}

/// How fresh a served answer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    Stale,
}

/// Answers by question, bounded in number.
pub struct AnswerCache {
    entries: moka::sync::Cache<CacheKey, Arc<Entry>>,
    settings: DnsCache,
}

impl std::fmt::Debug for AnswerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerCache").field("entries", &self.entries.entry_count()).finish()
    }
}

/// Evicts an entry once its stale window is over too.
struct StaleWindowExpiry;

impl moka::Expiry<CacheKey, Arc<Entry>> for StaleWindowExpiry {
    fn expire_after_create(
        &self,
        _: &CacheKey,
        entry: &Arc<Entry>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(Duration::from_secs(u64::from(entry.fresh_for) + u64::from(entry.stale_for)))
    }
}

impl AnswerCache {
    pub fn new(settings: &DnsCache) -> Self {
        let entries =
            moka::sync::Cache::builder().max_capacity(settings.size).expire_after(StaleWindowExpiry).build();
        Self { entries, settings: settings.clone() }
    }

    /// Answers stored now (an estimate: moka counts lazily).
    pub fn len(&self) -> u64 {
        self.entries.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stores `answer`, the upstream's answer to `key`, if it may be cached. Returns whether it was.
    pub fn insert(&self, key: CacheKey, answer: &Message) -> bool {
        let Some(fresh_for) = self.lifetime(answer) else { return false };
        // The OPT record was the upstream's to Keel, and each client gets its own; a signature is not
        // the client's either.
        let mut records = answer.clone();
        records.edns = None;
        records.signature = None;
        let encoded = records.to_vec().map_err(|error| error.to_string()).and_then(|wire| {
            let (question_end, ttl_offsets) =
                wire::records_ttl_offsets(&wire).ok_or("its encoding does not read back")?;
            Ok((wire, question_end, ttl_offsets))
        });
        let (wire, question_end, ttl_offsets) = match encoded {
            Ok(encoded) => encoded,
            Err(error) => {
                tracing::debug!(%error, "an upstream's answer is not cached");
                return false;
            }
        };
        let stale_for = u32::try_from(self.settings.serve_stale.get().as_secs()).unwrap_or(u32::MAX);
        let entry = Entry {
            wire: wire.into_boxed_slice(),
            question_end,
            ttl_offsets: ttl_offsets.into_boxed_slice(),
            stored: Instant::now(),
            fresh_for,
            stale_for,
        };
        self.entries.insert(key, Arc::new(entry));
        true
    }

    /// The answer to a plain query whose key is `key`, written from a fresh entry's wire form; `None`
    /// when there is none, or when it must go through hickory (see [`wire::answer_cached`]).
    pub fn answer_plain(&self, query: &PlainQuery<'_>, key: &[u8]) -> Option<Vec<u8>> {
        let entry = self.entries.get(key)?;
        let elapsed = entry.age();
        if elapsed >= entry.fresh_for {
            return None;
        }
        let remaining = entry.fresh_for - elapsed;
        wire::answer_cached(
            query,
            CachedAnswer {
                wire: &entry.wire,
                question_end: entry.question_end,
                ttl_offsets: &entry.ttl_offsets,
                elapsed,
                remaining,
            },
        )
    }

    /// A fresh answer to `key`, with `id` and TTLs lowered by its time in the cache.
    pub fn get(&self, key: &CacheKey, id: u16) -> Option<Message> {
        self.lookup(key, id, false).map(|(message, _)| message)
    }

    /// A fresh answer, or else one whose stale window is still open: for when every upstream failed.
    pub fn get_stale(&self, key: &CacheKey, id: u16) -> Option<(Message, Freshness)> {
        self.lookup(key, id, true)
    }

    fn lookup(&self, key: &CacheKey, id: u16, allow_stale: bool) -> Option<(Message, Freshness)> {
        let entry = self.entries.get(key)?;
        let elapsed = entry.age();
        let freshness = if elapsed < entry.fresh_for {
            Freshness::Fresh
        } else if allow_stale && elapsed - entry.fresh_for < entry.stale_for {
            Freshness::Stale
        } else {
            return None;
        };
        let remaining = entry.fresh_for.saturating_sub(elapsed);
        let mut message = Message::from_vec(&entry.wire).ok()?;
        message.metadata.id = id;
        let records =
            message.answers.iter_mut().chain(&mut message.authorities).chain(&mut message.additionals);
        for record in records {
            record.ttl = match freshness {
                Freshness::Fresh => record.ttl.saturating_sub(elapsed).min(remaining),
                Freshness::Stale => STALE_TTL,
            };
        }
        Some((message, freshness))
    }

    /// How long an answer stays fresh, in seconds; `None` if it must not be cached.
    fn lifetime(&self, message: &Message) -> Option<u32> {
        let secs = |duration: keel_schemas::types::Duration| {
            u32::try_from(duration.get().as_secs()).unwrap_or(u32::MAX)
        };
        if message.metadata.truncation {
            return None;
        }
        let code = message.metadata.response_code;
        let lifetime = if code == ResponseCode::NoError && !message.answers.is_empty() {
            let smallest = message.answers.iter().map(|record| record.ttl).min()?;
            smallest.clamp(secs(self.settings.min_ttl), secs(self.settings.max_ttl))
        } else if code == ResponseCode::NXDomain || code == ResponseCode::NoError {
            let soa = message.authorities.iter().find_map(|record| match &record.data {
                RData::SOA(soa) => Some(record.ttl.min(soa.minimum)),
                _ => None,
            })?;
            soa.min(secs(self.settings.negative_ttl))
        } else {
            return None;
        };
        (lifetime > 0).then_some(lifetime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{Name, Record};
    use keel_schemas::types::Duration as ConfigDuration;

    fn settings() -> DnsCache {
        DnsCache {
            size: 100,
            min_ttl: ConfigDuration::from_secs(5),
            max_ttl: ConfigDuration::from_secs(600),
            negative_ttl: ConfigDuration::from_secs(120),
            serve_stale: ConfigDuration::from_secs(60),
        }
    }

    fn key(name: &str) -> CacheKey {
        CacheKey::new(&LowerName::from(Name::from_ascii(name).unwrap()), RecordType::A, DNSClass::IN, false)
    }

    fn answer(name: &str, code: ResponseCode, ttls: &[u32], soa: Option<(u32, u32)>) -> Message {
        let name = Name::from_ascii(name).unwrap();
        let mut message = Message::new(7, MessageType::Response, OpCode::Query);
        message.metadata.response_code = code;
        message.add_query(Query::query(name.clone(), RecordType::A));
        for (i, ttl) in ttls.iter().enumerate() {
            let address = std::net::Ipv4Addr::new(10, 0, 0, i as u8 + 1);
            message.answers.push(Record::from_rdata(name.clone(), *ttl, RData::A(A::from(address))));
        }
        if let Some((record_ttl, minimum)) = soa {
            let zone = Name::from_ascii("example.").unwrap();
            let rname = Name::from_ascii("hostmaster.example.").unwrap();
            let soa = SOA::new(zone.clone(), rname, 1, 3600, 600, 86400, minimum);
            message.authorities.push(Record::from_rdata(zone, record_ttl, RData::SOA(soa)));
        }
        message.set_edns(Edns::new());
        message
    }

    fn ttls_of(message: &Message) -> Vec<u32> {
        message.all_sections().map(|record| record.ttl).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn hits_carry_the_client_id_and_ttls_lowered_by_the_time_spent() {
        let cache = AnswerCache::new(&settings());
        let stored = answer("a.example.", ResponseCode::NoError, &[100, 300], None);
        assert!(cache.insert(key("a.example."), &stored));
        tokio::time::advance(Duration::from_secs(30)).await;
        let hit = cache.get(&key("A.Example."), 0xBEEF).unwrap();
        assert_eq!(hit.metadata.id, 0xBEEF);
        // Fresh for 100 s (the smallest TTL); every TTL is capped by what is left of that.
        assert_eq!(ttls_of(&hit), [70, 70]);
        tokio::time::advance(Duration::from_secs(71)).await;
        assert!(cache.get(&key("a.example."), 1).is_none(), "expired");
    }

    #[tokio::test(start_paused = true)]
    async fn ttls_are_clamped_to_the_configured_bounds() {
        let cache = AnswerCache::new(&settings());
        cache.insert(key("low.example."), &answer("low.example.", ResponseCode::NoError, &[1], None));
        cache.insert(key("high.example."), &answer("high.example.", ResponseCode::NoError, &[86400], None));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(cache.get(&key("low.example."), 1).is_some(), "kept for min_ttl (5 s) despite TTL 1");
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(cache.get(&key("high.example."), 1).is_none(), "dropped after max_ttl (600 s)");
    }

    #[tokio::test(start_paused = true)]
    async fn negative_answers_live_for_the_soa_minimum() {
        let cache = AnswerCache::new(&settings());
        let nx = answer("nx.example.", ResponseCode::NXDomain, &[], Some((3600, 90)));
        assert!(cache.insert(key("nx.example."), &nx));
        let nodata = answer("nd.example.", ResponseCode::NoError, &[], Some((20, 900)));
        assert!(cache.insert(key("nd.example."), &nodata));
        tokio::time::advance(Duration::from_secs(25)).await;
        assert!(cache.get(&key("nx.example."), 1).is_some());
        assert!(cache.get(&key("nd.example."), 1).is_none(), "the SOA record's own TTL (20 s) is lower");
        tokio::time::advance(Duration::from_secs(70)).await;
        assert!(cache.get(&key("nx.example."), 1).is_none(), "the SOA minimum (90 s) has passed");

        let capped = answer("cap.example.", ResponseCode::NXDomain, &[], Some((86400, 86400)));
        cache.insert(key("cap.example."), &capped);
        tokio::time::advance(Duration::from_secs(121)).await;
        assert!(cache.get(&key("cap.example."), 1).is_none(), "negative_ttl (120 s) caps it");
    }

    #[test]
    fn some_answers_are_never_cached() {
        let cache = AnswerCache::new(&settings());
        let no_soa = answer("x.example.", ResponseCode::NXDomain, &[], None);
        assert!(!cache.insert(key("x.example."), &no_soa), "a negative answer without SOA");
        let servfail = answer("x.example.", ResponseCode::ServFail, &[], Some((60, 60)));
        assert!(!cache.insert(key("x.example."), &servfail));
        let mut truncated = answer("x.example.", ResponseCode::NoError, &[60], None);
        truncated.metadata.truncation = true;
        assert!(!cache.insert(key("x.example."), &truncated));
        let zero = answer("x.example.", ResponseCode::NoError, &[0], None);
        let no_floor = AnswerCache::new(&DnsCache { min_ttl: ConfigDuration::from_secs(0), ..settings() });
        assert!(!no_floor.insert(key("x.example."), &zero), "TTL 0 means do not cache");
    }

    #[tokio::test(start_paused = true)]
    async fn expired_answers_are_served_stale_only_on_request_and_only_for_a_while() {
        let cache = AnswerCache::new(&settings());
        cache.insert(key("s.example."), &answer("s.example.", ResponseCode::NoError, &[10], None));
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(cache.get(&key("s.example."), 1).is_none());
        let (stale, freshness) = cache.get_stale(&key("s.example."), 9).unwrap();
        assert_eq!(freshness, Freshness::Stale);
        assert_eq!(ttls_of(&stale), [STALE_TTL]);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(cache.get_stale(&key("s.example."), 1).is_none(), "the 60 s stale window is over");
    }

    #[test]
    fn the_cache_is_bounded() {
        let cache = AnswerCache::new(&DnsCache { size: 10, ..settings() });
        for i in 0..100 {
            let name = format!("n{i}.example.");
            cache.insert(key(&name), &answer(&name, ResponseCode::NoError, &[60], None));
        }
        cache.entries.run_pending_tasks();
        assert!(cache.len() <= 10, "{} entries", cache.len());
    }
}
