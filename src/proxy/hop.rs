//! Node-to-node hops: a forwarded upgrade carries an HMAC-SHA256 signature
//! over the sending node, a timestamp, a nonce, the client's address and
//! scheme, the session id and the request target. The receiving node
//! rejects a bad signature, a timestamp outside the window, or a nonce it
//! has seen (replay) — and never forwards a hop again.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header a hop travels in.
pub const HOP_HEADER: &str = "x-wsbroker-hop";
/// How far ahead of the receiver's clock a hop's timestamp may be (skew).
pub const WINDOW: Duration = Duration::from_secs(30);
/// Added to the sender's patience when judging a hop's age (clock skew).
pub const AGE_MARGIN: Duration = Duration::from_millis(500);
/// Nonces remembered at most (older ones are pruned first).
const MAX_NONCES: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HopError {
    #[error("malformed hop header")]
    Malformed,
    #[error("hop signature does not match")]
    BadSignature,
    #[error("hop is stale")]
    Stale,
    #[error("hop was replayed")]
    Replayed,
}

/// What a verified hop says about the original client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub from: String,
    pub client: String,
    pub tls: bool,
}

pub struct HopKeys {
    secret: Vec<u8>,
    /// Nonce → expiry (unix ms).
    seen: DashMap<String, u64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

impl HopKeys {
    pub fn new(secret: &str) -> HopKeys {
        HopKeys {
            secret: secret.as_bytes().to_vec(),
            seen: DashMap::new(),
        }
    }

    fn mac(&self, fields: &[&str]) -> Hmac<Sha256> {
        // HMAC accepts keys of any length: this cannot fail.
        #[allow(clippy::expect_used)]
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        for f in fields {
            mac.update(f.as_bytes());
            mac.update(b"\n");
        }
        mac
    }

    /// The header value for forwarding `session` at `target` (path and query).
    pub fn sign(&self, from: &str, client: &str, tls: bool, session: &str, target: &str) -> String {
        let ts = now_ms().to_string();
        let mut n = [0u8; 16];
        if getrandom::getrandom(&mut n).is_err() {
            fastrand::fill(&mut n);
        }
        let nonce = hex(&n);
        let proto = if tls { "https" } else { "http" };
        let sig = hex(&self
            .mac(&["v1", from, &ts, &nonce, client, proto, session, target])
            .finalize()
            .into_bytes());
        format!("v1 from={from} ts={ts} nonce={nonce} client={client} proto={proto} sig={sig}")
    }

    /// Checks a hop header for `session` at `target`. A hop older than
    /// `max_age` is stale: its sender (which waits at most that long) has
    /// given up on it, as after this node was frozen.
    pub fn verify(
        &self,
        header: &str,
        session: &str,
        target: &str,
        max_age: Duration,
    ) -> Result<Hop, HopError> {
        let mut parts = header.split(' ');
        if parts.next() != Some("v1") {
            return Err(HopError::Malformed);
        }
        let mut field = |name: &str| -> Result<String, HopError> {
            parts
                .next()
                .and_then(|p| p.strip_prefix(name))
                .and_then(|p| p.strip_prefix('='))
                .map(str::to_string)
                .ok_or(HopError::Malformed)
        };
        let (from, ts, nonce, client, proto, sig) = (
            field("from")?,
            field("ts")?,
            field("nonce")?,
            field("client")?,
            field("proto")?,
            field("sig")?,
        );
        let sig = (0..sig.len())
            .step_by(2)
            .map(|i| {
                sig.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .collect::<Option<Vec<u8>>>()
            .ok_or(HopError::Malformed)?;
        self.mac(&["v1", &from, &ts, &nonce, &client, &proto, session, target])
            .verify_slice(&sig)
            .map_err(|_| HopError::BadSignature)?;
        let ts: u64 = ts.parse().map_err(|_| HopError::Malformed)?;
        let now = now_ms();
        let window = WINDOW.as_millis() as u64;
        let oldest = now.saturating_sub((max_age + AGE_MARGIN).as_millis() as u64);
        if ts < oldest || ts > now + window {
            return Err(HopError::Stale);
        }
        if self.seen.len() >= MAX_NONCES {
            self.seen.retain(|_, expiry| *expiry > now);
        }
        if self.seen.insert(nonce, ts + 2 * window).is_some() {
            return Err(HopError::Replayed);
        }
        Ok(Hop {
            from,
            client,
            tls: proto == "https",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_hops_verify_once() {
        let k = HopKeys::new("s3cret");
        let h = k.sign("node-a", "192.0.2.1", false, "sid", "/?session=sid");
        let hop = k
            .verify(&h, "sid", "/?session=sid", WINDOW)
            .expect("valid hop");
        assert_eq!(
            hop,
            Hop {
                from: "node-a".into(),
                client: "192.0.2.1".into(),
                tls: false
            }
        );
        assert_eq!(
            k.verify(&h, "sid", "/?session=sid", WINDOW),
            Err(HopError::Replayed)
        );
    }

    #[test]
    fn forged_or_rebound_hops_fail() {
        let k = HopKeys::new("s3cret");
        let other = HopKeys::new("guess");
        let h = other.sign("node-a", "192.0.2.1", false, "sid", "/");
        assert_eq!(
            k.verify(&h, "sid", "/", WINDOW),
            Err(HopError::BadSignature)
        );
        let h = k.sign("node-a", "192.0.2.1", false, "sid", "/");
        assert_eq!(
            k.verify(&h, "other-session", "/", WINDOW),
            Err(HopError::BadSignature)
        );
        assert_eq!(
            k.verify("v1 from=x", "sid", "/", WINDOW),
            Err(HopError::Malformed)
        );
    }

    #[test]
    fn stale_hops_fail() {
        let k = HopKeys::new("s3cret");
        let ts = now_ms() - 60_000;
        let sig = hex(&k
            .mac(&["v1", "a", &ts.to_string(), "00", "c", "http", "sid", "/"])
            .finalize()
            .into_bytes());
        let h = format!("v1 from=a ts={ts} nonce=00 client=c proto=http sig={sig}");
        assert_eq!(k.verify(&h, "sid", "/", WINDOW), Err(HopError::Stale));
    }
}
