//! Where an upstream named by host name is. Its addresses are resolved at
//! most once per [`REFRESH`] and kept per upstream, so a new session does
//! not wait on the system resolver (a blocking-pool round trip, and a DNS
//! query where nothing caches). The address that last worked is tried
//! first, also after a refresh that still lists it; when a refresh fails,
//! the addresses kept are used until it succeeds (as Envoy keeps its last
//! hosts). Once addresses are stale, one session resolves the name again
//! while the others go on with them. A connect that fails on every address
//! forgets them, so the next session resolves again. Upstreams given by IP
//! address never resolve.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long resolved addresses are used before the name is resolved again
/// (Envoy's default DNS refresh for a strict-DNS cluster).
pub const REFRESH: Duration = Duration::from_secs(5);

/// One upstream's resolved addresses.
#[derive(Debug, Default)]
pub struct UpstreamAddrs {
    cached: Mutex<Option<Cached>>,
    /// A session is resolving stale addresses again.
    refreshing: AtomicBool,
}

/// Clears the refresh mark however the refresh ends (a dial that times out
/// drops it half-way).
struct Refreshing<'a>(&'a AtomicBool);

impl Drop for Refreshing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[derive(Debug)]
struct Cached {
    at: Instant,
    /// Best first.
    addrs: Arc<[SocketAddr]>,
}

impl UpstreamAddrs {
    /// The addresses of `host:port`, best first: kept ones while fresh (or
    /// while another session refreshes them), else resolved now.
    pub async fn get(&self, host: &str, port: u16) -> io::Result<Arc<[SocketAddr]>> {
        self.get_or(async { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
            .await
    }

    /// [`get`](Self::get), with `resolve` polled only when the kept
    /// addresses are missing or stale.
    async fn get_or(
        &self,
        resolve: impl Future<Output = io::Result<Vec<SocketAddr>>>,
    ) -> io::Result<Arc<[SocketAddr]>> {
        let kept = match self.kept() {
            Some((addrs, true)) => return Ok(addrs),
            Some((addrs, false)) => {
                if self.refreshing.swap(true, Ordering::AcqRel) {
                    return Ok(addrs);
                }
                Some(addrs)
            }
            None => None,
        };
        let _refresh = kept.is_some().then_some(Refreshing(&self.refreshing));
        let resolved = match resolve.await {
            Ok(found) => found,
            Err(e) => return kept.ok_or(e),
        };
        if resolved.is_empty() {
            return kept.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "the upstream's name has no address",
                )
            });
        }
        let addrs = best_first(resolved, kept.as_ref().and_then(|k| k.first()));
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
                c.addrs = best_first(c.addrs.to_vec(), Some(&addr));
            }
        }
    }

    /// No address answered: resolve again next time.
    pub fn forget(&self) {
        *self.lock() = None;
    }

    /// A cache holding `list`, resolved `at` (for tests).
    #[cfg(test)]
    pub fn kept_since(at: Instant, list: Vec<SocketAddr>) -> UpstreamAddrs {
        let addrs = UpstreamAddrs::default();
        *addrs.lock() = Some(Cached {
            at,
            addrs: list.into(),
        });
        addrs
    }

    /// The addresses kept, and whether they are fresh.
    fn kept(&self) -> Option<(Arc<[SocketAddr]>, bool)> {
        let cached = self.lock();
        let c = cached.as_ref()?;
        Some((c.addrs.clone(), c.at.elapsed() < REFRESH))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Cached>> {
        // A poisoned lock only means a panic elsewhere while it was held;
        // the cache is replaced whole, so it is always consistent.
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `addrs` with `best` first when it is among them, the rest in order.
fn best_first(mut addrs: Vec<SocketAddr>, best: Option<&SocketAddr>) -> Arc<[SocketAddr]> {
    if let Some(i) = best.and_then(|b| addrs.iter().position(|a| a == b)) {
        addrs[..=i].rotate_right(1);
    }
    addrs.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resolver that must not be asked.
    async fn never() -> io::Result<Vec<SocketAddr>> {
        panic!("kept addresses were fresh: nothing to resolve")
    }

    /// A resolver that is down.
    async fn failing() -> io::Result<Vec<SocketAddr>> {
        Err(io::Error::other("resolver down"))
    }

    /// A moment one refresh period ago, or longer.
    fn stale_time() -> Instant {
        // The monotonic clock starts at boot: long past by now.
        Instant::now()
            .checked_sub(REFRESH + Duration::from_millis(1))
            .expect("the machine has been up longer than the refresh")
    }

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
        let a: SocketAddr = "127.0.0.1:9".parse().expect("literal");
        let b: SocketAddr = "[::1]:9".parse().expect("literal");
        let addrs = UpstreamAddrs::kept_since(Instant::now(), vec![b, a]);
        addrs.worked(a);
        assert_eq!(addrs.get_or(never()).await.expect("kept")[..], [a, b]);
        let stranger: SocketAddr = "127.0.0.2:9".parse().expect("literal");
        addrs.worked(stranger);
        assert_eq!(addrs.get_or(never()).await.expect("kept")[..], [a, b]);
    }

    #[test]
    fn the_best_address_moves_first_and_the_rest_keep_their_order() {
        let a: SocketAddr = "127.0.0.1:1".parse().expect("literal");
        let b: SocketAddr = "127.0.0.2:1".parse().expect("literal");
        let c: SocketAddr = "127.0.0.3:1".parse().expect("literal");
        assert_eq!(best_first(vec![a, b, c], Some(&c))[..], [c, a, b]);
        assert_eq!(best_first(vec![a, b, c], Some(&a))[..], [a, b, c]);
        let stranger: SocketAddr = "127.0.0.4:1".parse().expect("literal");
        assert_eq!(best_first(vec![a, b], Some(&stranger))[..], [a, b]);
        assert_eq!(best_first(vec![a, b], None)[..], [a, b]);
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_the_stale_addresses() {
        let stale: SocketAddr = "127.0.0.2:9".parse().expect("literal");
        let addrs = UpstreamAddrs::kept_since(stale_time(), vec![stale]);
        let got = addrs.get_or(failing()).await.expect("stale kept");
        assert_eq!(got[..], [stale]);
        addrs.forget();
        assert!(addrs.get_or(failing()).await.is_err());
        let fresh: SocketAddr = "127.0.0.3:9".parse().expect("literal");
        let got = addrs.get_or(async move { Ok(vec![fresh]) }).await;
        assert_eq!(got.expect("resolved")[..], [fresh]);
        // Refreshed, the address in use stays first.
        let other: SocketAddr = "127.0.0.4:9".parse().expect("literal");
        if let Some(c) = addrs.lock().as_mut() {
            c.at = stale_time();
        }
        let got = addrs.get_or(async move { Ok(vec![other, fresh]) }).await;
        assert_eq!(got.expect("resolved")[..], [fresh, other]);
    }

    #[tokio::test]
    async fn one_session_refreshes_stale_addresses_while_the_others_use_them() {
        let stale: SocketAddr = "127.0.0.2:9".parse().expect("literal");
        let fresh: SocketAddr = "127.0.0.3:9".parse().expect("literal");
        let addrs = UpstreamAddrs::kept_since(stale_time(), vec![stale]);
        let (answer, answered) = tokio::sync::oneshot::channel::<()>();
        let refresh = addrs.get_or(async move {
            let _ = answered.await;
            Ok(vec![fresh])
        });
        tokio::pin!(refresh);
        // Polled once: it is now waiting on the resolver.
        let waiting = tokio::time::timeout(Duration::from_millis(20), &mut refresh).await;
        assert!(waiting.is_err(), "the refresh waits for its resolver");
        let meanwhile = addrs.get_or(never()).await.expect("the stale addresses");
        assert_eq!(meanwhile[..], [stale]);
        let _ = answer.send(());
        assert_eq!(refresh.await.expect("refreshed")[..], [fresh]);
        assert!(!addrs.refreshing.load(Ordering::Acquire), "mark cleared");
    }

    #[tokio::test]
    async fn a_dropped_refresh_lets_the_next_session_refresh() {
        let stale: SocketAddr = "127.0.0.2:9".parse().expect("literal");
        let fresh: SocketAddr = "127.0.0.3:9".parse().expect("literal");
        let addrs = UpstreamAddrs::kept_since(stale_time(), vec![stale]);
        let hung = tokio::time::timeout(
            Duration::from_millis(20),
            addrs.get_or(std::future::pending()),
        )
        .await;
        assert!(hung.is_err(), "the refresh was still waiting");
        let got = addrs.get_or(async move { Ok(vec![fresh]) }).await;
        assert_eq!(got.expect("refreshed")[..], [fresh]);
    }

    #[tokio::test]
    async fn kept_addresses_expire_after_the_refresh() {
        let stale: SocketAddr = "127.0.0.2:9".parse().expect("literal");
        let addrs = UpstreamAddrs::kept_since(stale_time(), vec![stale]);
        let got = addrs.get("localhost", 9).await.expect("localhost resolves");
        assert!(!got.contains(&stale), "a stale entry is resolved anew");
    }
}
