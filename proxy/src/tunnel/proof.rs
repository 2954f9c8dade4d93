//! Proofs of a shared secret that never send it and cannot be replayed: HMAC-SHA256 over a label, the
//! fields of the frame, a timestamp and a random nonce; checked in constant time, with the clock within
//! `max_skew` and the nonce not seen within that window.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::Mutex;

use super::frame::{Hello, Kind, Mac, Nonce, Open, Reason};

/// Nonces remembered at most; past this, new proofs are refused as `Busy` until old ones expire.
const MAX_REMEMBERED: usize = 200_000;
/// The fewest nonces held before expired ones are swept out.
const FIRST_SWEEP: usize = 1024;

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs())
}

/// 16 bytes from the operating system's random source.
pub fn nonce() -> Nonce {
    let mut nonce = [0u8; 16];
    // The system source only fails on a broken kernel; a proof without randomness must not go out.
    SystemRandom::new().fill(&mut nonce).expect("the system random source works");
    nonce
}

/// The bytes a MAC covers: a label, then each field, strings with their length byte so that no two field
/// lists give the same bytes.
struct Transcript(Vec<u8>);

impl Transcript {
    fn new(label: &str) -> Self {
        Self(label.as_bytes().to_vec())
    }
    fn str(mut self, value: &str) -> Self {
        let bytes = &value.as_bytes()[..value.len().min(255)];
        self.0.push(bytes.len() as u8);
        self.0.extend_from_slice(bytes);
        self
    }
    fn u8(mut self, value: u8) -> Self {
        self.0.push(value);
        self
    }
    fn u64(mut self, value: u64) -> Self {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }
    fn bytes(mut self, value: &[u8]) -> Self {
        self.0.extend_from_slice(value);
        self
    }
}

fn hello_transcript(
    kind: Kind,
    node: &str,
    service: &str,
    session: u64,
    time: u64,
    nonce: &Nonce,
) -> Vec<u8> {
    Transcript::new("keel-tunnel/1 hello")
        .u8(kind.code())
        .str(node)
        .str(service)
        .u64(session)
        .u64(time)
        .bytes(nonce)
        .0
}

fn open_transcript(service: &str, node: &str, time: u64, nonce: &Nonce) -> Vec<u8> {
    Transcript::new("keel-tunnel/1 visit").str(service).str(node).u64(time).bytes(nonce).0
}

fn sign(secret: &str, message: &[u8]) -> Mac {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hmac::sign(&key, message).as_ref().try_into().expect("HMAC-SHA256 is 32 bytes")
}

fn verify(secret: &str, message: &[u8], mac: &Mac) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    hmac::verify(&key, message, mac).is_ok()
}

/// A `Hello` for `kind`, signed with the router token.
pub fn hello(token: &str, kind: Kind, node: &str, service: &str, session: u64) -> Hello {
    let (time, nonce) = (unix_now(), nonce());
    let mac = sign(token, &hello_transcript(kind, node, service, session, time, &nonce));
    Hello {
        version: super::frame::VERSION,
        kind,
        node: node.into(),
        service: service.into(),
        session,
        time,
        nonce,
        mac,
    }
}

/// Whether `hello` was signed with `token`.
pub fn hello_is_signed(token: &str, hello: &Hello) -> bool {
    let message =
        hello_transcript(hello.kind, &hello.node, &hello.service, hello.session, hello.time, &hello.nonce);
    verify(token, &message, &hello.mac)
}

/// An `Open` for `service`, signed with the service secret.
pub fn open(secret: &str, service: &str, node: &str) -> Open {
    let (time, nonce) = (unix_now(), nonce());
    let mac = sign(secret, &open_transcript(service, node, time, &nonce));
    Open { service: service.into(), node: node.into(), time, nonce, mac }
}

/// Whether `open` was signed with `secret`.
pub fn open_is_signed(secret: &str, open: &Open) -> bool {
    verify(secret, &open_transcript(&open.service, &open.node, open.time, &open.nonce), &open.mac)
}

/// Refuses proofs whose clock is off by more than the window, and nonces seen within it.
#[derive(Debug)]
pub struct ReplayGuard {
    window: Duration,
    /// Nonce → the Unix time after which it can be forgotten.
    seen: Mutex<Seen>,
}

/// The nonces within the window, and how many there may be before the next sweep of expired ones.
#[derive(Debug)]
struct Seen {
    nonces: HashMap<Nonce, u64>,
    /// Twice what the last sweep kept (at least [`FIRST_SWEEP`]): sweeping costs O(1) per proof, and the
    /// table follows the rate of proofs in the window instead of filling up to [`MAX_REMEMBERED`].
    sweep_at: usize,
}

impl ReplayGuard {
    pub fn new(window: Duration) -> Self {
        Self { window, seen: Mutex::new(Seen { nonces: HashMap::new(), sweep_at: FIRST_SWEEP }) }
    }

    /// Accepts a proof made at `time` with `nonce` once: a second time, or out of the window, is refused.
    pub async fn check(&self, time: u64, nonce: &Nonce) -> Result<(), Reason> {
        self.check_at(unix_now(), time, nonce).await
    }

    async fn check_at(&self, now: u64, time: u64, nonce: &Nonce) -> Result<(), Reason> {
        let window = self.window.as_secs().max(1);
        if now.abs_diff(time) > window {
            return Err(Reason::ClockSkew);
        }
        let mut seen = self.seen.lock().await;
        if seen.nonces.len() >= seen.sweep_at {
            seen.nonces.retain(|_, forget_after| *forget_after >= now);
            let kept = seen.nonces.len();
            // After a burst, give the memory back too.
            seen.nonces.shrink_to(kept * 2);
            seen.sweep_at = (kept * 2).clamp(FIRST_SWEEP, MAX_REMEMBERED);
        }
        if seen.nonces.len() >= MAX_REMEMBERED {
            return Err(Reason::Busy);
        }
        // A nonce can be forgotten once its proof's time is out of the window on either clock.
        match seen.nonces.insert(*nonce, time.max(now) + window) {
            Some(_) => Err(Reason::Replayed),
            None => Ok(()),
        }
    }

    #[cfg(test)]
    async fn remembered(&self) -> usize {
        self.seen.lock().await.nonces.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_verifies_with_its_secret_only_and_covers_every_field() {
        let signed = hello("router-token", Kind::PublisherPool, "node-1", "mysql", 7);
        assert!(hello_is_signed("router-token", &signed));
        assert!(!hello_is_signed("other-token", &signed));
        let mut changed = signed.clone();
        changed.service = "redis".into();
        assert!(!hello_is_signed("router-token", &changed));
        let mut changed = signed.clone();
        changed.session = 8;
        assert!(!hello_is_signed("router-token", &changed));
        let mut changed = signed;
        changed.kind = Kind::VisitorPool;
        assert!(!hello_is_signed("router-token", &changed));

        let visit = open("s3cret", "mysql", "pod-a");
        assert!(open_is_signed("s3cret", &visit));
        assert!(!open_is_signed("s3cret!", &visit));
        let mut changed = visit.clone();
        changed.time += 1;
        assert!(!open_is_signed("s3cret", &changed));
        // Field boundaries are part of the proof: ("ab", "c") and ("a", "bc") differ.
        let a = open_transcript("ab", "c", 1, &[0; 16]);
        let b = open_transcript("a", "bc", 1, &[0; 16]);
        assert_ne!(a, b);
        assert_ne!(nonce(), nonce());
    }

    #[tokio::test]
    async fn a_nonce_is_accepted_once_and_only_within_the_window() {
        let guard = ReplayGuard::new(Duration::from_secs(30));
        let now = 1_000_000;
        assert_eq!(guard.check_at(now, now - 5, &[1; 16]).await, Ok(()));
        assert_eq!(guard.check_at(now + 1, now - 5, &[1; 16]).await, Err(Reason::Replayed));
        assert_eq!(guard.check_at(now, now - 31, &[2; 16]).await, Err(Reason::ClockSkew));
        assert_eq!(guard.check_at(now, now + 31, &[3; 16]).await, Err(Reason::ClockSkew));
        assert_eq!(guard.check_at(now, now + 30, &[4; 16]).await, Ok(()));
        // Long after, the nonce's proof is out of the window: refused for its clock, not remembered forever.
        assert_eq!(guard.check_at(now + 100, now - 5, &[1; 16]).await, Err(Reason::ClockSkew));
        assert_eq!(guard.remembered().await, 2);
    }

    #[tokio::test]
    async fn expired_nonces_are_swept_so_the_table_follows_the_rate() {
        let guard = ReplayGuard::new(Duration::from_secs(30));
        let start = 1_000_000u64;
        // 100 proofs a second for ten minutes: about 6,000 within the window at any time.
        let mut most = 0;
        for second in 0..600u64 {
            for index in 0..100u64 {
                let mut nonce = [0u8; 16];
                nonce[..8].copy_from_slice(&second.to_be_bytes());
                nonce[8..].copy_from_slice(&index.to_be_bytes());
                assert_eq!(guard.check_at(start + second, start + second, &nonce).await, Ok(()));
            }
            most = most.max(guard.remembered().await);
        }
        // Never more than twice the window's proofs (the sweep comes at twice what the last one kept),
        // where sweeping only at half the cap let the table grow to 100,000.
        assert!(most <= 2 * 31 * 100 + FIRST_SWEEP, "{most} nonces remembered at once");
        let Seen { nonces, .. } = &*guard.seen.lock().await;
        assert!(nonces.capacity() <= 4 * 31 * 100 + 2 * FIRST_SWEEP, "capacity {}", nonces.capacity());
    }
}
