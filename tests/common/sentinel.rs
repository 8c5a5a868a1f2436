//! A Sentinel-watched primary and replica: real server processes, plus a
//! fake Sentinel that names an unreachable primary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::eventually;
use super::free_port;
use super::valkey::{exited, server_binary, Valkey};

pub const MASTER: &str = "mymaster";
pub const DOWN_AFTER_MS: u64 = 1000;
pub const FAILOVER_TIMEOUT_MS: u64 = 2000;

/// One Sentinel process.
pub struct Sentinel {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
}

impl Sentinel {
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start(port: u16, primary_port: u16, bin: &PathBuf) -> Sentinel {
        let dir =
            std::env::temp_dir().join(format!("wsbroker-sentinel-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {MASTER} 127.0.0.1 {primary_port} 2\n\
                 sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\nsentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n\
                 sentinel parallel-syncs {MASTER} 1\n",
                dir.display()
            ),
        )
        .expect("sentinel.conf");
        let child = Command::new(bin)
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sentinel");
        Sentinel {
            child: Some(child),
            port,
            dir,
        }
    }
}

impl Sentinel {
    /// Starts a Sentinel on a free port and waits until it answers PING; a
    /// port taken meanwhile by another process (the Sentinel exits) is
    /// replaced by another, up to three times.
    pub async fn start_answering(primary_port: u16, bin: &PathBuf) -> Sentinel {
        for _ in 0..3 {
            let mut s = Sentinel::start(free_port(), primary_port, bin);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while tokio::time::Instant::now() < deadline {
                if exited(&mut s.child) {
                    break;
                }
                let pong: Option<String> = query(&s.addr(), &redis::cmd("PING")).await;
                if pong.is_some() {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            s.kill();
        }
        panic!("no Sentinel would start (three ports tried)");
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A primary, one replica and three Sentinels.
pub struct SentinelSetup {
    pub servers: Vec<Valkey>,
    pub sentinels: Vec<Sentinel>,
    pub bin: PathBuf,
}

async fn query<T: redis::FromRedisValue>(addr: &str, cmd: &redis::Cmd) -> Option<T> {
    let client = redis::Client::open(format!("redis://{addr}/")).ok()?;
    let mut c = tokio::time::timeout(
        Duration::from_millis(500),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()?;
    tokio::time::timeout(Duration::from_millis(500), cmd.query_async(&mut c))
        .await
        .ok()?
        .ok()
}

impl SentinelSetup {
    pub async fn start() -> SentinelSetup {
        SentinelSetup::start_with(server_binary()).await
    }

    pub async fn start_with(bin: PathBuf) -> SentinelSetup {
        let primary = Valkey::start_any(&bin, &[]).await;
        let replica = Valkey::start_any(
            &bin,
            &["--replicaof", "127.0.0.1", &primary.port.to_string()],
        )
        .await;
        let replica_addr = replica.addr().to_string();
        eventually(Duration::from_secs(10), "replica in sync", || {
            let a = replica_addr.clone();
            async move {
                let info: Option<String> = query(&a, redis::cmd("INFO").arg("replication")).await;
                info.is_some_and(|i| i.contains("master_link_status:up"))
            }
        })
        .await;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(Sentinel::start_answering(primary.port, &bin).await);
        }
        let setup = SentinelSetup {
            servers: vec![primary, replica],
            sentinels,
            bin,
        };
        setup.await_sentinels_agree().await;
        setup
    }

    /// Waits until every Sentinel knows the other two and the replicas.
    pub async fn await_sentinels_agree(&self) {
        for s in &self.sentinels {
            let addr = s.addr();
            eventually(
                Duration::from_secs(30),
                "sentinels discover each other and the replica",
                || {
                    let addr = addr.clone();
                    async move {
                        let peers: Option<Vec<redis::Value>> =
                            query(&addr, redis::cmd("SENTINEL").arg("sentinels").arg(MASTER)).await;
                        let replicas: Option<Vec<redis::Value>> =
                            query(&addr, redis::cmd("SENTINEL").arg("replicas").arg(MASTER)).await;
                        peers.is_some_and(|p| p.len() >= 2)
                            && replicas.is_some_and(|r| !r.is_empty())
                    }
                },
            )
            .await;
        }
    }

    pub fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinels.iter().map(Sentinel::addr).collect()
    }

    /// The primary as the Sentinels currently name it.
    pub async fn primary_addr(&self) -> Option<String> {
        for s in &self.sentinels {
            let a: Option<(String, String)> = query(
                &s.addr(),
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(MASTER),
            )
            .await;
            if let Some((h, p)) = a {
                return Some(format!("{h}:{p}"));
            }
        }
        None
    }

    /// Waits until every Sentinel names `addr` and the server there is a
    /// primary: the failover is over, not merely under way.
    pub async fn await_primary_settled(&self, addr: &str) {
        let sentinels = self.sentinel_addrs();
        let addr = addr.to_string();
        eventually(
            Duration::from_secs(20),
            "every Sentinel names the new primary",
            || {
                let (sentinels, addr) = (sentinels.clone(), addr.clone());
                async move {
                    for s in &sentinels {
                        let a: Option<(String, String)> = query(
                            s,
                            redis::cmd("SENTINEL")
                                .arg("get-master-addr-by-name")
                                .arg(MASTER),
                        )
                        .await;
                        if a.map(|(h, p)| format!("{h}:{p}")) != Some(addr.clone()) {
                            return false;
                        }
                    }
                    // No Sentinel may still be in the middle of the failover.
                    for s in &sentinels {
                        let fields: Option<Vec<String>> =
                            query(s, redis::cmd("SENTINEL").arg("master").arg(MASTER)).await;
                        let flags = fields.and_then(|f| {
                            f.iter()
                                .position(|k| k == "flags")
                                .and_then(|i| f.get(i + 1).cloned())
                        });
                        if flags.as_deref() != Some("master") {
                            return false;
                        }
                    }
                    let info: Option<String> =
                        query(&addr, redis::cmd("INFO").arg("replication")).await;
                    info.is_some_and(|i| i.contains("role:master"))
                }
            },
        )
        .await;
    }

    /// The running server at `addr`.
    pub fn server_at(&mut self, addr: &str) -> Option<&mut Valkey> {
        self.servers
            .iter_mut()
            .find(|v| v.addr().to_string() == addr && v.child.is_some())
    }

    /// The `[valkey]` section for nodes using these Sentinels (`extra`
    /// Sentinel addresses go first).
    pub fn node_extra(&self, first: &[String]) -> String {
        let list: Vec<String> = first
            .iter()
            .cloned()
            .chain(self.sentinel_addrs())
            .map(|a| format!("\"{a}\""))
            .collect();
        format!(
            "[valkey]\nsentinels = [{}]\nmaster_name = \"{MASTER}\"\n",
            list.join(", ")
        )
    }
}

/// A fake Sentinel that names an unreachable primary (127.0.0.1:1) for
/// every question.
pub async fn lying_sentinel() -> (String, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let text = String::from_utf8_lossy(&buf[..n]).to_ascii_uppercase();
                    // One reply per request in the read (pipelines count their '*').
                    let requests =
                        text.matches("\r\n*").count() + usize::from(text.starts_with('*'));
                    for _ in 0..requests.max(1) {
                        let reply: &[u8] = if text.contains("SENTINEL") {
                            b"*2\r\n$9\r\n127.0.0.1\r\n$1\r\n1\r\n"
                        } else {
                            b"+OK\r\n"
                        };
                        if s.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}
