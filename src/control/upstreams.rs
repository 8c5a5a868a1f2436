//! The upstream pool: balancing (least_conn, round_robin, hash), active
//! health probes, and a per-upstream circuit breaker.
//!
//! An upstream takes new sessions when its last probe succeeded and its
//! circuit is not open. The circuit opens after `breaker_failures`
//! consecutive failed handshakes, stays open for `breaker_cooldown`, then
//! lets one trial handshake through (half-open): success closes it, failure
//! opens it again.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::clock;
use crate::config::{Balance, UpstreamConfig, UpstreamUrl};
use crate::proxy::upstream_addrs::UpstreamAddrs;
use crate::tls::UpstreamTls;

/// Circuit-breaker state, as `/health` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Circuit {
    Closed,
    Open,
    HalfOpen,
}

/// One upstream replica and what the node knows about it.
#[derive(Debug)]
pub struct Upstream {
    pub url: UpstreamUrl,
    /// Its name's addresses, when it is named by host name.
    pub addrs: UpstreamAddrs,
    /// Result of the last active probe (true until the first probe says otherwise).
    healthy: AtomicBool,
    /// Consecutive failed handshakes.
    failures: AtomicU32,
    /// While the circuit is open: when it may half-open (ms on [`clock`]).
    open_until_ms: AtomicU64,
    /// A half-open trial handshake is under way.
    trial: AtomicBool,
    /// Sessions of this node on this upstream.
    sessions: AtomicUsize,
}

/// Holds one session's place on an upstream; dropping it frees the place.
#[derive(Debug)]
pub struct UpstreamLease {
    pub upstream: Arc<Upstream>,
}

impl Drop for UpstreamLease {
    fn drop(&mut self) {
        self.upstream.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `/health` view of one upstream.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamStatus {
    pub url: String,
    pub healthy: bool,
    pub circuit: Circuit,
    pub sessions: usize,
}

impl Upstream {
    fn new(url: UpstreamUrl) -> Upstream {
        Upstream {
            url,
            addrs: UpstreamAddrs::default(),
            healthy: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            trial: AtomicBool::new(false),
            sessions: AtomicUsize::new(0),
        }
    }

    pub fn lease(self: &Arc<Self>) -> UpstreamLease {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        UpstreamLease {
            upstream: self.clone(),
        }
    }

    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }
}

/// The configured upstreams and the balancing policy over them.
#[derive(Debug)]
pub struct Upstreams {
    list: Vec<Arc<Upstream>>,
    balance: Balance,
    breaker_failures: u32,
    breaker_cooldown: Duration,
    connect_timeout: Duration,
    health_interval: Duration,
    /// Next start position for round_robin (and tie-breaking in least_conn).
    next: AtomicUsize,
    tls: UpstreamTls,
}

impl Upstreams {
    pub fn new(cfg: &UpstreamConfig, tls: UpstreamTls) -> Upstreams {
        Upstreams {
            list: cfg
                .servers
                .iter()
                .cloned()
                .map(|u| Arc::new(Upstream::new(u)))
                .collect(),
            balance: cfg.balance,
            breaker_failures: cfg.breaker_failures,
            breaker_cooldown: cfg.breaker_cooldown,
            connect_timeout: cfg.connect_timeout,
            health_interval: cfg.health_interval,
            next: AtomicUsize::new(0),
            tls,
        }
    }

    pub fn tls(&self) -> &UpstreamTls {
        &self.tls
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    pub fn circuit(&self, u: &Upstream) -> Circuit {
        if u.failures.load(Ordering::Relaxed) < self.breaker_failures {
            Circuit::Closed
        } else if clock::now_ms() < u.open_until_ms.load(Ordering::Relaxed) {
            Circuit::Open
        } else {
            Circuit::HalfOpen
        }
    }

    fn available(&self, u: &Upstream) -> bool {
        u.healthy.load(Ordering::Relaxed)
            && match self.circuit(u) {
                Circuit::Closed => true,
                Circuit::Open => false,
                Circuit::HalfOpen => !u.trial.load(Ordering::Relaxed),
            }
    }

    /// Upstreams that may take a new session, best first. `prefer` (a
    /// session's previous upstream) goes first when it is available.
    pub fn candidates(&self, session_id: &str, prefer: Option<&str>) -> Vec<Arc<Upstream>> {
        let mut out = self.order(session_id);
        prefer_first(&mut out, prefer);
        out
    }

    /// The upstreams to try for a new session, best first (advances the
    /// round-robin rotation: call once per session).
    pub fn order(&self, session_id: &str) -> Vec<Arc<Upstream>> {
        // The rotation runs over the available upstreams only, so the one
        // after a down upstream does not take its turns too.
        let mut out: Vec<Arc<Upstream>> = self
            .list
            .iter()
            .filter(|u| self.available(u))
            .cloned()
            .collect();
        if !out.is_empty() {
            let start = self.next.fetch_add(1, Ordering::Relaxed);
            let n = out.len();
            out.rotate_left(start % n);
        }
        match self.balance {
            Balance::RoundRobin => {}
            // Stable sort keeps the rotation as the tie-breaker.
            Balance::LeastConn => out.sort_by_key(|u| u.sessions()),
            Balance::Hash => {
                out.sort_by_key(|u| std::cmp::Reverse(rendezvous_score(session_id, &u.url.url)))
            }
        }
        out
    }

    /// Marks the start of a handshake; returns false when a half-open
    /// circuit already has its one trial running.
    pub fn begin_attempt(&self, u: &Upstream) -> bool {
        match self.circuit(u) {
            Circuit::Closed => true,
            Circuit::Open => false,
            Circuit::HalfOpen => u
                .trial
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok(),
        }
    }

    pub fn record_success(&self, u: &Upstream) {
        u.failures.store(0, Ordering::Relaxed);
        u.trial.store(false, Ordering::Relaxed);
    }

    pub fn record_failure(&self, u: &Upstream) {
        let failures = u.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if failures >= self.breaker_failures {
            let until = clock::now_ms() + self.breaker_cooldown.as_millis() as u64;
            u.open_until_ms.store(until, Ordering::Relaxed);
            if failures == self.breaker_failures {
                tracing::warn!(upstream = %u.url.url, failures, "circuit opened");
            }
        }
        u.trial.store(false, Ordering::Relaxed);
    }

    pub fn find(&self, url: &str) -> Option<Arc<Upstream>> {
        self.list.iter().find(|u| *u.url.url == *url).cloned()
    }

    pub fn status(&self) -> Vec<UpstreamStatus> {
        self.list
            .iter()
            .map(|u| UpstreamStatus {
                url: u.url.url.to_string(),
                healthy: u.healthy.load(Ordering::Relaxed),
                circuit: self.circuit(u),
                sessions: u.sessions(),
            })
            .collect()
    }

    /// Probes every upstream each `health_interval` until `stop`.
    pub async fn run_health_probes(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let probes = self.list.iter().map(|u| {
                let this = self.clone();
                let u = u.clone();
                async move {
                    let ok = crate::proxy::upstream_dial::probe(&u.url, &u.addrs, &this.tls, this.connect_timeout).await;
                    let was = u.healthy.swap(ok, Ordering::Relaxed);
                    if was != ok {
                        tracing::warn!(upstream = %u.url.url, healthy = ok, "upstream health changed");
                    }
                }
            });
            tokio::select! {
                _ = futures_util::future::join_all(probes) => {}
                _ = stop.cancelled() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(self.health_interval) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Highest-random-weight score: each session id ranks the upstreams in its
/// own stable order, so removing one upstream moves only its sessions.
fn rendezvous_score(session_id: &str, upstream: &str) -> u64 {
    // FNV-1a over both strings, then a finalizer to spread the bits.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in session_id.bytes().chain([0xff]).chain(upstream.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// Moves the upstream a session is bound to (when usable) to the front.
pub fn prefer_first(list: &mut Vec<Arc<Upstream>>, prefer: Option<&str>) {
    if let Some(prefer) = prefer {
        if let Some(i) = list.iter().position(|u| *u.url.url == *prefer) {
            let u = list.remove(i);
            list.insert(0, u);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(balance: Balance, n: usize) -> Upstreams {
        let cfg = UpstreamConfig {
            servers: (0..n)
                .map(|i| {
                    UpstreamUrl::parse(&format!("ws://127.0.0.1:{}", 9001 + i)).expect("valid")
                })
                .collect(),
            balance,
            connect_timeout: Duration::from_secs(1),
            ca_file: None,
            health_interval: Duration::from_secs(5),
            breaker_failures: 2,
            breaker_cooldown: Duration::from_secs(60),
        };
        Upstreams::new(&cfg, UpstreamTls::system_only())
    }

    #[test]
    fn round_robin_rotates() {
        let p = pool(Balance::RoundRobin, 3);
        let firsts: Vec<String> = (0..3)
            .map(|_| p.candidates("s", None)[0].url.url.to_string())
            .collect();
        assert_eq!(firsts.len(), 3);
        assert_ne!(firsts[0], firsts[1]);
        assert_ne!(firsts[1], firsts[2]);
    }

    #[test]
    fn least_conn_picks_the_emptiest() {
        let p = pool(Balance::LeastConn, 3);
        let a = p.list[0].lease();
        let b = p.list[1].lease();
        assert_eq!(p.candidates("s", None)[0].url.url, p.list[2].url.url);
        drop((a, b));
    }

    #[test]
    fn hash_is_stable_per_session() {
        let p = pool(Balance::Hash, 5);
        let first = p.candidates("abc", None)[0].url.url.clone();
        for _ in 0..10 {
            assert_eq!(p.candidates("abc", None)[0].url.url, first);
        }
        let spread: std::collections::HashSet<String> = (0..50)
            .map(|i| p.candidates(&format!("s{i}"), None)[0].url.url.to_string())
            .collect();
        assert!(spread.len() >= 3, "hash spreads sessions: {spread:?}");
    }

    #[test]
    fn breaker_opens_after_consecutive_failures_and_allows_one_trial() {
        let p = pool(Balance::RoundRobin, 1);
        let u = p.list[0].clone();
        p.record_failure(&u);
        assert_eq!(p.circuit(&u), Circuit::Closed);
        p.record_failure(&u);
        assert_eq!(p.circuit(&u), Circuit::Open);
        assert!(p.candidates("s", None).is_empty());
        u.open_until_ms.store(0, Ordering::Relaxed); // cooldown over
        assert_eq!(p.circuit(&u), Circuit::HalfOpen);
        assert!(p.begin_attempt(&u));
        assert!(!p.begin_attempt(&u), "only one half-open trial");
        p.record_success(&u);
        assert_eq!(p.circuit(&u), Circuit::Closed);
    }

    #[test]
    fn preferred_upstream_goes_first() {
        let p = pool(Balance::LeastConn, 3);
        let _lease = p.list[2].lease();
        let want = p.list[2].url.url.clone();
        assert_eq!(p.candidates("s", Some(&want))[0].url.url, want);
    }
}
