//! Valkey Sentinel: finding the primary, and hearing about failovers.
//!
//! Discovery asks each Sentinel in turn for the primary's address and
//! accepts it only after the server itself answers `ROLE` as a primary, so a
//! Sentinel that is down, or names an unreachable or demoted server, is
//! skipped. A watcher subscribes to `+switch-master` on every Sentinel so a
//! failover is followed at once, not at the next failed write.

use std::time::Duration;

use futures_util::StreamExt;
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
use tokio_util::sync::CancellationToken;

use super::RegistryError;

/// Credentials and database used for Sentinels and the primary alike.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    pub username: String,
    pub password: String,
    pub db: i64,
}

impl Auth {
    fn settings(&self, db: i64) -> RedisConnectionInfo {
        let mut s = RedisConnectionInfo::default().set_db(db);
        if !self.username.is_empty() {
            s = s.set_username(&self.username);
        }
        if !self.password.is_empty() {
            s = s.set_password(&self.password);
        }
        s
    }

    /// A client for `host:port` (db 0 for Sentinels).
    pub fn client(
        &self,
        host: &str,
        port: u16,
        sentinel: bool,
    ) -> Result<redis::Client, RegistryError> {
        let info = ConnectionAddr::Tcp(host.to_string(), port)
            .into_connection_info()
            .map_err(|e| RegistryError::Unavailable(e.to_string()))?
            .set_redis_settings(self.settings(if sentinel { 0 } else { self.db }));
        redis::Client::open(info).map_err(|e| RegistryError::Unavailable(e.to_string()))
    }
}

/// Splits `host:port` (IPv6 in brackets).
pub fn split_addr(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Some((host, port.parse().ok()?))
}

async fn ask(
    sentinel: &str,
    master: &str,
    auth: &Auth,
    timeout: Duration,
) -> Result<(String, u16), String> {
    let (host, port) = split_addr(sentinel).ok_or("bad sentinel address")?;
    let client = auth.client(&host, port, true).map_err(|e| e.to_string())?;
    let work = async {
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        let addr: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(master)
            .query_async(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        let (h, p) = addr.ok_or("sentinel does not know the master")?;
        Ok((
            h,
            p.parse()
                .map_err(|_| "bad port from sentinel".to_string())?,
        ))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| "sentinel timed out".to_string())?
}

/// Asks the Sentinels for the primary and connects to it; returns the
/// connection and the primary's `host:port`.
pub async fn connect_primary(
    sentinels: &[String],
    master: &str,
    auth: &Auth,
    timeout: Duration,
    config: &redis::AsyncConnectionConfig,
) -> Result<(redis::aio::MultiplexedConnection, String), RegistryError> {
    let mut last = String::from("no sentinel configured");
    for s in sentinels {
        let (host, port) = match ask(s, master, auth, timeout).await {
            Ok(a) => a,
            Err(e) => {
                last = format!("sentinel {s}: {e}");
                continue;
            }
        };
        let client = auth.client(&host, port, false)?;
        let attempt = async {
            let mut c = client
                .get_multiplexed_async_connection_with_config(config)
                .await
                .map_err(|e| e.to_string())?;
            let role: Vec<redis::Value> = redis::cmd("ROLE")
                .query_async(&mut c)
                .await
                .map_err(|e| e.to_string())?;
            let is_primary = role
                .first()
                .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
                .is_some_and(|r| r == "master");
            if is_primary {
                Ok(c)
            } else {
                Err("named server is not a primary".to_string())
            }
        };
        match tokio::time::timeout(timeout * 2, attempt).await {
            Ok(Ok(c)) => return Ok((c, format!("{host}:{port}"))),
            Ok(Err(e)) => last = format!("sentinel {s} named {host}:{port}: {e}"),
            Err(_) => last = format!("sentinel {s} named {host}:{port}: timed out"),
        }
    }
    Err(RegistryError::Unavailable(last))
}

/// Calls `on_switch` whenever any Sentinel announces `+switch-master` for
/// `master`, until `stop`. Each Sentinel is watched on its own, and
/// re-subscribed after any failure.
pub async fn watch_switches(
    sentinels: Vec<String>,
    master: String,
    auth: Auth,
    on_switch: impl Fn() + Send + Sync + Clone + 'static,
    stop: CancellationToken,
) {
    let watchers = sentinels.into_iter().map(|s| {
        let (master, auth, on_switch, stop) = (
            master.clone(),
            auth.clone(),
            on_switch.clone(),
            stop.clone(),
        );
        async move {
            loop {
                if let Err(e) = watch_one(&s, &master, &auth, &on_switch, &stop).await {
                    tracing::debug!(sentinel = %s, error = %e, "sentinel watch interrupted");
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    });
    futures_util::future::join_all(watchers).await;
}

async fn watch_one(
    sentinel: &str,
    master: &str,
    auth: &Auth,
    on_switch: &(impl Fn() + Send + Sync),
    stop: &CancellationToken,
) -> Result<(), String> {
    let (host, port) = split_addr(sentinel).ok_or("bad sentinel address")?;
    let client = auth.client(&host, port, true).map_err(|e| e.to_string())?;
    let mut pubsub = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub())
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    pubsub
        .subscribe("+switch-master")
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = pubsub.on_message();
    loop {
        let msg = tokio::select! {
            m = messages.next() => m.ok_or("sentinel connection closed")?,
            _ = stop.cancelled() => return Ok(()),
        };
        // "<master> <old-ip> <old-port> <new-ip> <new-port>"
        let payload: String = msg.get_payload().unwrap_or_default();
        if payload.split(' ').next() == Some(master) {
            tracing::info!(sentinel, switch = %payload, "sentinel announced a new primary");
            on_switch();
        }
    }
}
