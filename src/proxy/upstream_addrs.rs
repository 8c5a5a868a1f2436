//! Where an upstream named by host name is. Its addresses are resolved at
//! most once per [`REFRESH`] and kept per upstream, so a new session does
//! not wait on the system resolver (a blocking-pool round trip, and a DNS
//! query where nothing caches). The address that last worked is tried
//! first; a connect that fails on every address forgets them, so the next
//! session resolves again. Upstreams given by IP address never resolve.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long resolved addresses are used before the name is resolved again
/// (Envoy's default DNS refresh for a strict-DNS cluster).
pub const REFRESH: Duration = Duration::from_secs(5);

/// One upstream's resolved addresses.
#[derive(Debug, Default)]
pub struct UpstreamAddrs {
    cached: Mutex<Option<Cached>>,
}

#[derive(Debug)]
struct Cached {
    at: Instant,
    /// Best first.
    addrs: Arc<[SocketAddr]>,
}

impl UpstreamAddrs {
    /// The addresses of `host:port`, best first: kept ones while fresh,
    /// else resolved now.
    pub async fn get(&self, host: &str, port: u16) -> io::Result<Arc<[SocketAddr]>> {
        if let Some(addrs) = self.fresh() {
            return Ok(addrs);
        }
        let addrs: Arc<[SocketAddr]> = tokio::net::lookup_host((host, port)).await?.collect();
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the upstream's name has no address",
            ));
        }
        *self.lock() = Some(Cached {
            at: Instant::now(),
            addrs: addrs.clone(),
        });
        Ok(addrs)
    }

    /// `addr` answered: it goes first from now on.
    pub fn worked(&self, addr: SocketAddr) {
        let mut cached = self.lock();
        if let Some(c) = cached.as_mut() {
            if c.addrs.first() != Some(&addr) && c.addrs.contains(&addr) {
                let mut reordered = Vec::with_capacity(c.addrs.len());
                reordered.push(addr);
                reordered.extend(c.addrs.iter().copied().filter(|a| *a != addr));
                c.addrs = reordered.into();
            }
        }
    }

    /// No address answered: resolve again next time.
    pub fn forget(&self) {
        *self.lock() = None;
    }

    fn fresh(&self) -> Option<Arc<[SocketAddr]>> {
        let cached = self.lock();
        let c = cached.as_ref()?;
        (c.at.elapsed() < REFRESH).then(|| c.addrs.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Cached>> {
        // A poisoned lock only means a panic elsewhere while it was held;
        // the cache is replaced whole, so it is always consistent.
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_name_is_resolved_once_per_refresh_and_again_once_forgotten() {
        let addrs = UpstreamAddrs::default();
        let first = addrs.get("localhost", 9).await.expect("localhost resolves");
        assert!(first.iter().all(|a| a.ip().is_loopback() && a.port() == 9));
        let again = addrs.get("localhost", 9).await.expect("kept");
        assert!(Arc::ptr_eq(&first, &again), "kept addresses are reused");
        addrs.forget();
        let fresh = addrs.get("localhost", 9).await.expect("resolves again");
        assert!(
            !Arc::ptr_eq(&first, &fresh),
            "a forgotten name is resolved anew"
        );
        assert_eq!(first[..], fresh[..]);
    }

    #[tokio::test]
    async fn the_address_that_worked_goes_first() {
        let addrs = UpstreamAddrs::default();
        let a: SocketAddr = "127.0.0.1:9".parse().expect("literal");
        let b: SocketAddr = "[::1]:9".parse().expect("literal");
        *addrs.lock() = Some(Cached {
            at: Instant::now(),
            addrs: vec![b, a].into(),
        });
        addrs.worked(a);
        assert_eq!(
            addrs.get("unused.invalid", 9).await.expect("kept")[..],
            [a, b]
        );
        let stranger: SocketAddr = "127.0.0.2:9".parse().expect("literal");
        addrs.worked(stranger);
        assert_eq!(
            addrs.get("unused.invalid", 9).await.expect("kept")[..],
            [a, b]
        );
    }

    #[tokio::test]
    async fn kept_addresses_expire_after_the_refresh() {
        let addrs = UpstreamAddrs::default();
        let stale: SocketAddr = "127.0.0.2:9".parse().expect("literal");
        // The monotonic clock starts at boot: long past by now.
        let past = Instant::now().checked_sub(REFRESH + Duration::from_millis(1));
        *addrs.lock() = Some(Cached {
            at: past.expect("the machine has been up longer than the refresh"),
            addrs: vec![stale].into(),
        });
        let got = addrs.get("localhost", 9).await.expect("localhost resolves");
        assert!(!got.contains(&stale), "a stale entry is resolved anew");
    }
}
