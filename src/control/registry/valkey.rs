//! The clustered registry on Valkey (or Redis): one multiplexed
//! connection, re-opened after any failure, every call bounded by a
//! timeout, ownership changed only through the scripts in `scripts.rs`
//! (and, for a new session and a session's end, the plain commands sent
//! on the fast lane, `lane.rs`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Script};
use serde::{Deserialize, Serialize};

use super::keys::Keys;
use super::lane::{Lane, LaneAuth, Reply};
use super::scripts;
use super::sentinel::{self, Auth};
use super::{Claim, RegistryError, SessionEnd};
use crate::clock;
use crate::config::Config;

/// Longest a batch of session ends waits for a claim's write to carry it
/// before it is written on its own.
const END_RIDE_ALONG: Duration = Duration::from_millis(2);

/// A node's registration record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: String,
    pub advertise: String,
    /// Unix seconds.
    pub started_at: u64,
    pub version: String,
    /// Random per process: tells this process's registration from another's.
    pub instance: String,
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Registration refreshed.
    Refreshed,
    /// It had lapsed (this node was frozen or cut off, or the write was lost
    /// in a failover) and was written anew.
    Lapsed,
    /// Another live process holds this id.
    Conflict,
}

/// One member as seen in the registry.
#[derive(Debug, Clone)]
pub struct Member {
    pub record: NodeRecord,
    pub ttl_left_ms: u64,
    pub sessions: usize,
}

/// Where the primary is found.
enum Target {
    /// A fixed server (`valkey.url`).
    Direct(redis::Client),
    /// Whatever primary the Sentinels name (`valkey.sentinels`).
    Sentinel {
        sentinels: Vec<String>,
        master: String,
        auth: Auth,
    },
}

pub struct ValkeyRegistry {
    pub keys: Keys,
    target: Target,
    /// The primary in use (`host:port`), for `/health`.
    primary: std::sync::Mutex<String>,
    /// Primary changes followed (`wsbroker_registry_failovers_total`).
    pub failovers: prometheus_client::metrics::counter::Counter,
    /// Signalled when a Sentinel announces a new primary.
    pub switched: tokio::sync::Notify,
    pub me: NodeRecord,
    record_json: String,
    stale_ttl: Duration,
    heartbeat: Duration,
    resume_grace: Duration,
    op_timeout: Duration,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// Bumped on every new connection: the membership loop re-asserts
    /// everything when it changes.
    generation: AtomicU64,
    /// The fast lane for claims of new sessions and for session ends.
    lane: std::sync::Mutex<Option<Arc<Lane>>>,
    /// Held while a lane is being opened.
    lane_open: tokio::sync::Mutex<()>,
    lane_auth: LaneAuth,
    /// This node's session set key (`node-sessions:{id}`).
    my_set: String,
    /// The server knows `DELIFEQ` (Valkey 9): a session end is a plain
    /// command instead of a script. Cleared on the first "unknown command".
    delifeq: AtomicBool,
    claim: Script,
    bump: Script,
    set_upstream: Script,
    end: Script,
    release: Script,
    assert: Script,
    heartbeat_script: Script,
    forget: Script,
}

fn unavailable(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Unavailable(e.to_string())
}

impl ValkeyRegistry {
    pub fn new(config: &Config) -> Result<ValkeyRegistry, RegistryError> {
        let url_client = redis::Client::open(config.valkey.url.as_str()).map_err(unavailable)?;
        let url_info = url_client.get_connection_info().clone();
        let auth = Auth {
            username: config.valkey.username.clone(),
            password: config.valkey.password.clone(),
            db: url_info.redis_settings().db(),
        };
        let lane_auth = {
            let url = url_info.redis_settings();
            let pick = |configured: &str, from_url: Option<&str>| {
                Some(configured)
                    .filter(|c| !c.is_empty())
                    .or(from_url)
                    .map(str::to_string)
            };
            LaneAuth {
                username: pick(&config.valkey.username, url.username()),
                password: pick(&config.valkey.password, url.password()),
                db: url.db(),
            }
        };
        let (target, primary) = if config.valkey.sentinels.is_empty() {
            let client = if auth.username.is_empty() && auth.password.is_empty() {
                url_client
            } else {
                let addr = url_info.addr().to_string();
                let (host, port) =
                    sentinel::split_addr(&addr).ok_or_else(|| unavailable("bad valkey.url"))?;
                auth.client(&host, port, false)?
            };
            let primary = client.get_connection_info().addr().to_string();
            (Target::Direct(client), primary)
        } else {
            let target = Target::Sentinel {
                sentinels: config.valkey.sentinels.clone(),
                master: config.valkey.master_name.clone(),
                auth,
            };
            (target, String::new())
        };
        let mut instance = [0u8; 8];
        fastrand::fill(&mut instance);
        let me = NodeRecord {
            id: config.node.id.clone(),
            advertise: config
                .node
                .advertise
                .clone()
                .unwrap_or_else(|| config.node.listen.to_string()),
            started_at: clock::unix_secs(SystemTime::now()),
            version: env!("CARGO_PKG_VERSION").to_string(),
            instance: instance.iter().map(|b| format!("{b:02x}")).collect(),
        };
        let hb = config.cluster.heartbeat_interval;
        let keys = Keys::new(&config.cluster.key_prefix);
        let my_set = keys.node_sessions(&config.node.id);
        Ok(ValkeyRegistry {
            keys,
            record_json: serde_json::to_string(&me).unwrap_or_default(),
            me,
            stale_ttl: config.cluster.stale_ttl,
            heartbeat: hb,
            resume_grace: config.session.resume_grace,
            // A wedged connection must show within one heartbeat.
            op_timeout: hb.clamp(Duration::from_millis(50), Duration::from_secs(2)),
            target,
            primary: std::sync::Mutex::new(primary),
            failovers: Default::default(),
            switched: tokio::sync::Notify::new(),
            conn: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            lane: std::sync::Mutex::new(None),
            lane_open: tokio::sync::Mutex::new(()),
            lane_auth,
            my_set,
            delifeq: AtomicBool::new(true),
            claim: Script::new(scripts::CLAIM),
            bump: Script::new(scripts::BUMP),
            set_upstream: Script::new(scripts::SET_UPSTREAM),
            end: Script::new(scripts::END),
            release: Script::new(scripts::RELEASE),
            assert: Script::new(scripts::ASSERT),
            heartbeat_script: Script::new(scripts::HEARTBEAT),
            forget: Script::new(scripts::FORGET),
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn stale_ttl(&self) -> Duration {
        self.stale_ttl
    }

    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat
    }

    /// The current connection, opening one if there is none.
    async fn conn(&self) -> Result<MultiplexedConnection, RegistryError> {
        let mut current = self.conn.lock().await;
        if let Some(c) = current.as_ref() {
            return Ok(c.clone());
        }
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.op_timeout))
            .set_response_timeout(Some(self.op_timeout));
        let c = match &self.target {
            Target::Direct(client) => tokio::time::timeout(
                self.op_timeout * 2,
                client.get_multiplexed_async_connection_with_config(&cfg),
            )
            .await
            .map_err(|_| unavailable("connect timed out"))?
            .map_err(unavailable)?,
            Target::Sentinel {
                sentinels,
                master,
                auth,
            } => {
                let (c, addr) =
                    sentinel::connect_primary(sentinels, master, auth, self.op_timeout, &cfg)
                        .await?;
                let mut primary = self.primary.lock().unwrap_or_else(|p| p.into_inner());
                if !primary.is_empty() && *primary != addr {
                    self.failovers.inc();
                    tracing::warn!(from = %primary, to = %addr, "registry primary changed");
                }
                *primary = addr;
                c
            }
        };
        *current = Some(c.clone());
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(c)
    }

    /// Runs one registry operation with the timeout; a failure drops the
    /// connection so the next call opens a fresh one.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, RegistryError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let c = self.conn().await?;
        match tokio::time::timeout(self.op_timeout, op(c)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                // A demoted primary answers READONLY: never keep writing to
                // it; the next call asks the Sentinels again.
                let readonly = matches!(
                    e.kind(),
                    redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
                );
                if readonly
                    || e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_timeout()
                    || e.is_unrecoverable_error()
                {
                    if readonly {
                        tracing::warn!(primary = %self.primary(), "registry server is read-only; finding the primary again");
                    }
                    self.reconnect().await;
                }
                Err(unavailable(e))
            }
            Err(_) => {
                self.reconnect().await;
                Err(unavailable("timed out"))
            }
        }
    }

    /// Runs one ownership script (EVALSHA, loading it on NOSCRIPT).
    async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[String],
        args: &[String],
    ) -> Result<T, RegistryError> {
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(k);
        }
        for a in args {
            invocation.arg(a);
        }
        self.run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await
    }

    /// A live round trip.
    pub async fn ping(&self) -> Result<(), RegistryError> {
        self.run(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .map(|_| ())
    }

    /// Writes the registration only if no live one holds the id.
    pub async fn register(&self) -> Result<bool, RegistryError> {
        let key = self.keys.node(&self.me.id);
        let nodes = self.keys.nodes();
        let json = self.record_json.clone();
        let ttl = self.stale_ttl.as_millis() as u64;
        let id = self.me.id.clone();
        self.run(|mut c| async move {
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&json)
                .arg("NX")
                .arg("PX")
                .arg(ttl)
                .query_async(&mut c)
                .await?;
            if set.is_some() {
                redis::cmd("SADD")
                    .arg(&nodes)
                    .arg(&id)
                    .query_async::<i64>(&mut c)
                    .await?;
            }
            Ok(set.is_some())
        })
        .await
    }

    pub async fn heartbeat(&self) -> Result<Beat, RegistryError> {
        let keys = [self.keys.node(&self.me.id), self.keys.nodes()];
        let args = [
            self.record_json.clone(),
            self.stale_ttl.as_millis().to_string(),
            self.me.id.clone(),
        ];
        let r: i64 = self.eval(&self.heartbeat_script, &keys, &args).await?;
        Ok(match r {
            1 => Beat::Refreshed,
            0 => Beat::Lapsed,
            _ => Beat::Conflict,
        })
    }

    /// Removes this node's registration (drain).
    pub async fn deregister(&self) -> Result<(), RegistryError> {
        let key = self.keys.node(&self.me.id);
        let nodes = self.keys.nodes();
        let id = self.me.id.clone();
        let json = self.record_json.clone();
        self.run(|mut c| async move {
            let cur: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut c).await?;
            if cur.as_deref() == Some(json.as_str()) {
                redis::cmd("DEL")
                    .arg(&key)
                    .query_async::<i64>(&mut c)
                    .await?;
            }
            redis::cmd("SREM")
                .arg(&nodes)
                .arg(&id)
                .query_async::<i64>(&mut c)
                .await
        })
        .await
        .map(|_| ())
    }

    pub async fn claim(
        &self,
        sid: &str,
        allow_takeover: bool,
        proposed: Option<&Arc<str>>,
    ) -> Result<Claim, RegistryError> {
        let proposed_name: &str = proposed.map_or("", |p| p);
        let session_key = self.keys.session(sid);
        // A new session, the common case, costs two plain commands in one
        // round trip: its id goes into this node's set first (a node that
        // dies between the two leaves nothing uncollected), then the key is
        // created only if absent. A value found there goes to the script.
        let value = session_value(&self.me.id, 1, proposed_name);
        let replies = self
            .lane_call(&[
                &[b"SADD", self.my_set.as_bytes(), sid.as_bytes()],
                &[
                    b"SET",
                    session_key.as_bytes(),
                    value.as_bytes(),
                    b"NX",
                    b"GET",
                ],
            ])
            .await?;
        match replies.get(1) {
            Some(Reply::Nil) => {
                return Ok(Claim::Owned {
                    epoch: 1,
                    prefer: proposed.cloned(),
                    took_over: false,
                })
            }
            Some(Reply::Bulk(_)) => {}
            Some(Reply::Error(e)) => return Err(unavailable(e)),
            _ => return Err(unavailable("unexpected reply to SET")),
        }
        let keys = [session_key, self.my_set.clone()];
        let allow = if allow_takeover { "1" } else { "0" };
        let args = [
            self.me.id.clone(),
            self.keys.node_prefix(),
            sid.to_string(),
            allow.to_string(),
            proposed_name.to_string(),
            "1".to_string(),
        ];
        let (verdict, epoch, upstream, detail): (String, u64, String, String) =
            self.eval(&self.claim, &keys, &args).await?;
        let prefer = (!upstream.is_empty()).then(|| Arc::from(upstream));
        Ok(match verdict.as_str() {
            "new" => Claim::Owned {
                epoch,
                prefer,
                took_over: false,
            },
            "takeover" => Claim::Owned {
                epoch,
                prefer,
                took_over: true,
            },
            "mine" => Claim::Mine { epoch, prefer },
            "owned" => match serde_json::from_str::<NodeRecord>(&detail) {
                Ok(node) => Claim::Elsewhere {
                    node: node.id,
                    advertise: node.advertise,
                    epoch,
                },
                Err(_) => Claim::Wait,
            },
            _ => Claim::Wait,
        })
    }

    /// Raises the epoch of a session the registry says is this node's but
    /// that this process does not hold.
    pub async fn bump(&self, sid: &str, seen: u64) -> Result<Option<u64>, RegistryError> {
        let keys = [self.keys.session(sid), self.keys.node_sessions(&self.me.id)];
        let args = [self.me.id.clone(), seen.to_string(), sid.to_string()];
        let epoch: u64 = self.eval(&self.bump, &keys, &args).await?;
        Ok((epoch > 0).then_some(epoch))
    }

    pub async fn set_upstream(
        &self,
        sid: &str,
        epoch: u64,
        upstream: &str,
    ) -> Result<(), RegistryError> {
        let keys = [self.keys.session(sid)];
        let args = [self.me.id.clone(), epoch.to_string(), upstream.to_string()];
        self.eval::<i64>(&self.set_upstream, &keys, &args)
            .await
            .map(|_| ())
    }

    pub async fn end(&self, sid: &str, epoch: u64) -> Result<(), RegistryError> {
        let keys = [self.keys.session(sid), self.keys.node_sessions(&self.me.id)];
        let args = [self.me.id.clone(), epoch.to_string(), sid.to_string()];
        self.eval::<i64>(&self.end, &keys, &args).await.map(|_| ())
    }

    /// Records the end of many sessions in one pipelined round trip (each
    /// deleted only if still this node's at that epoch). With the upstream
    /// known and a server that has `DELIFEQ`, an end is two plain commands;
    /// a key that did not hold exactly the expected value is checked again
    /// by the script.
    pub async fn end_many(&self, ends: &[SessionEnd]) -> Result<(), RegistryError> {
        let me = self.me.id.clone();
        let set = &self.my_set;
        let plain = self.delifeq.load(Ordering::Relaxed);
        let mut by_script = Vec::new();
        let mut checked = Vec::new();
        let mut keys = Vec::new();
        let mut values = Vec::new();
        for end in ends {
            match (&end.upstream, plain) {
                (Some(up), true) => {
                    keys.push(self.keys.session(&end.session));
                    values.push(session_value(&me, end.epoch, up));
                    checked.push(end);
                }
                _ => by_script.push(end),
            }
        }
        if !checked.is_empty() {
            let mut commands: Vec<[&[u8]; 3]> = Vec::with_capacity(2 * checked.len());
            for ((end, key), value) in checked.iter().zip(&keys).zip(&values) {
                commands.push([b"SREM", set.as_bytes(), end.session.as_bytes()]);
                commands.push([b"DELIFEQ", key.as_bytes(), value.as_bytes()]);
            }
            let commands: Vec<&[&[u8]]> = commands.iter().map(|c| &c[..]).collect();
            // Ends are not waited on by anyone: they ride along with the
            // next claim's write when one comes soon.
            let replies = self
                .lane_call_within(&commands, Some(END_RIDE_ALONG))
                .await?;
            // Replies pair up with commands: SREM, DELIFEQ, SREM, ...
            for (end, deleted) in checked.iter().zip(replies.iter().skip(1).step_by(2)) {
                match deleted {
                    Reply::Int(1) => {}
                    Reply::Error(e) if e.to_ascii_lowercase().contains("unknown command") => {
                        // Redis, or a Valkey before 9.
                        self.delifeq.store(false, Ordering::Relaxed);
                        by_script.push(end);
                    }
                    // Not exactly the value expected: the script decides.
                    _ => by_script.push(end),
                }
            }
        }
        if by_script.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for end in by_script {
            let keys = [self.keys.session(&end.session), set.clone()];
            let args = [me.clone(), end.epoch.to_string(), end.session.to_string()];
            pipe.add_command(evalsha(&self.end, &keys, &args)).ignore();
        }
        let first = {
            let pipe = pipe.clone();
            self.run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
                .await
        };
        match first {
            // The server does not have the script yet (first use, or a
            // promoted replica): load it and run the batch again.
            Err(e) if e.to_string().to_ascii_lowercase().contains("noscript") => {
                self.run_script_pipe::<()>(pipe, &self.end).await
            }
            other => other,
        }
    }

    /// Releases many sessions of `owner` at once (drain, or collecting a
    /// dead node), keeping each epoch for `ttl`.
    pub async fn release_many(
        &self,
        owner: &str,
        sessions: &[(String, Option<u64>)],
        ttl: Duration,
    ) -> Result<(), RegistryError> {
        self.release_batch(owner, sessions, ttl, false).await
    }

    /// Releases, as a dead node's, the sessions an earlier process under
    /// this node's id left recorded; called once registered, before this
    /// process serves any. Returns how many there were.
    pub async fn release_inherited(&self) -> Result<usize, RegistryError> {
        let set = self.my_set.clone();
        let sids: Vec<String> = self
            .run(|mut c| async move { redis::cmd("SMEMBERS").arg(&set).query_async(&mut c).await })
            .await?;
        let sessions: Vec<(String, Option<u64>)> = sids.into_iter().map(|s| (s, None)).collect();
        let me = self.me.id.clone();
        self.release_batch(&me, &sessions, self.collected_ttl(), true)
            .await?;
        Ok(sessions.len())
    }

    async fn release_batch(
        &self,
        owner: &str,
        sessions: &[(String, Option<u64>)],
        ttl: Duration,
        own_id: bool,
    ) -> Result<(), RegistryError> {
        for chunk in sessions.chunks(500) {
            let mut pipe = redis::pipe();
            for (sid, epoch) in chunk {
                let keys = [
                    self.keys.session(sid),
                    self.keys.node_sessions(owner),
                    self.keys.node(owner),
                ];
                let epoch = epoch.map(|e| e.to_string()).unwrap_or_default();
                let args = [
                    owner.to_string(),
                    epoch,
                    (ttl.as_millis() as u64).to_string(),
                    sid.clone(),
                    if own_id { "1" } else { "0" }.to_string(),
                ];
                pipe.add_command(evalsha(&self.release, &keys, &args))
                    .ignore();
            }
            self.run_script_pipe::<()>(pipe, &self.release).await?;
        }
        Ok(())
    }

    /// The TTL a drained node's released sessions keep their epoch for.
    pub fn release_ttl(&self) -> Duration {
        self.resume_grace + self.stale_ttl
    }

    /// The TTL of a dead node's sessions once collected: gone within
    /// 2 x stale_ttl of the death.
    pub fn collected_ttl(&self) -> Duration {
        self.stale_ttl
            .saturating_sub(self.heartbeat)
            .max(Duration::from_millis(10))
    }

    /// Restates every session this node holds; returns the ids that
    /// another owner has won (their local copies must close).
    pub async fn assert_many(
        &self,
        sessions: &[(String, u64, String)],
    ) -> Result<Vec<String>, RegistryError> {
        let mut lost = Vec::new();
        for chunk in sessions.chunks(500) {
            let mut pipe = redis::pipe();
            for (sid, epoch, upstream) in chunk {
                let keys = [self.keys.session(sid), self.keys.node_sessions(&self.me.id)];
                let args = [
                    self.me.id.clone(),
                    epoch.to_string(),
                    upstream.clone(),
                    sid.clone(),
                ];
                pipe.add_command(evalsha(&self.assert, &keys, &args));
            }
            let results: Vec<i64> = self.run_script_pipe(pipe, &self.assert).await?;
            lost.extend(
                chunk
                    .iter()
                    .zip(results)
                    .filter(|(_, r)| *r == 0)
                    .map(|((sid, _, _), _)| sid.clone()),
            );
        }
        Ok(lost)
    }

    /// Runs a pipeline of EVALSHA calls, loading the script first.
    async fn run_script_pipe<T: redis::FromRedisValue + Send + 'static>(
        &self,
        pipe: redis::Pipeline,
        script: &Script,
    ) -> Result<T, RegistryError> {
        let load = script.clone();
        self.run(|mut c| async move {
            load.prepare_invoke().load_async(&mut c).await?;
            pipe.query_async(&mut c).await
        })
        .await
    }

    /// Every registered member with its record, remaining TTL and session
    /// count; ids whose registration is gone come back as `dead`.
    pub async fn members(&self) -> Result<(Vec<Member>, Vec<String>), RegistryError> {
        let nodes_key = self.keys.nodes();
        let ids: Vec<String> = self
            .run(|mut c| async move {
                redis::cmd("SMEMBERS")
                    .arg(&nodes_key)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        if ids.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("GET").arg(self.keys.node(id));
            pipe.cmd("PTTL").arg(self.keys.node(id));
            pipe.cmd("SCARD").arg(self.keys.node_sessions(id));
        }
        let values: Vec<redis::Value> = self
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        let mut members = Vec::new();
        let mut dead = Vec::new();
        for (id, v) in ids.into_iter().zip(values.chunks(3)) {
            let record: Option<String> = redis::from_redis_value(v[0].clone()).ok().flatten();
            let ttl: i64 = redis::from_redis_value(v[1].clone()).unwrap_or(-2);
            let sessions: usize = redis::from_redis_value(v[2].clone()).unwrap_or(0);
            match record.and_then(|r| serde_json::from_str::<NodeRecord>(&r).ok()) {
                Some(record) => members.push(Member {
                    record,
                    ttl_left_ms: ttl.max(0) as u64,
                    sessions,
                }),
                None => dead.push(id),
            }
        }
        Ok((members, dead))
    }

    /// Collects a dead node: one survivor wins the lock, releases the dead
    /// node's sessions (short TTL) and removes it from the member set.
    pub async fn collect(&self, dead: &str) -> Result<usize, RegistryError> {
        let lock = self.keys.gc(dead);
        let me = self.me.id.clone();
        let ttl = self.stale_ttl.as_millis() as u64;
        let won: Option<String> = self
            .run(|mut c| async move {
                redis::cmd("SET")
                    .arg(&lock)
                    .arg(&me)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        if won.is_none() {
            return Ok(0);
        }
        let set = self.keys.node_sessions(dead);
        let sids: Vec<String> = self
            .run(|mut c| async move { redis::cmd("SMEMBERS").arg(&set).query_async(&mut c).await })
            .await?;
        let sessions: Vec<(String, Option<u64>)> = sids.into_iter().map(|s| (s, None)).collect();
        self.release_many(dead, &sessions, self.collected_ttl())
            .await?;
        let keys = [
            self.keys.node(dead),
            self.keys.node_sessions(dead),
            self.keys.nodes(),
        ];
        self.eval::<i64>(&self.forget, &keys, &[dead.to_string()])
            .await?;
        Ok(sessions.len())
    }

    /// The owner, epoch and upstream recorded for a session (written by
    /// [`session_value`] and the scripts).
    pub async fn lookup(&self, sid: &str) -> Result<Option<(String, u64, String)>, RegistryError> {
        let key = self.keys.session(sid);
        let v: Option<String> = self
            .run(|mut c| async move { redis::cmd("GET").arg(&key).query_async(&mut c).await })
            .await?;
        Ok(v.and_then(|v| {
            let mut parts = v.splitn(3, '|');
            let owner = parts.next()?.to_string();
            let epoch = parts.next()?.parse().ok()?;
            let up = parts.next().unwrap_or("").to_string();
            Some((owner, epoch, up))
        }))
    }

    /// A node's record, if it is registered.
    pub async fn node(&self, id: &str) -> Result<Option<NodeRecord>, RegistryError> {
        let key = self.keys.node(id);
        let v: Option<String> = self
            .run(|mut c| async move { redis::cmd("GET").arg(&key).query_async(&mut c).await })
            .await?;
        Ok(v.and_then(|v| serde_json::from_str(&v).ok()))
    }

    /// The address of the primary in use.
    pub fn primary(&self) -> String {
        self.primary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// At least one Sentinel answers (always true without Sentinels).
    pub async fn sentinels_ok(&self) -> bool {
        let Target::Sentinel {
            sentinels, auth, ..
        } = &self.target
        else {
            return true;
        };
        let pings = sentinels.iter().map(|s| async move {
            let (host, port) = sentinel::split_addr(s)?;
            let client = auth.client(&host, port, true).ok()?;
            let ping = async {
                let mut c = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING").query_async::<String>(&mut c).await.ok()
            };
            tokio::time::timeout(self.op_timeout, ping)
                .await
                .ok()
                .flatten()
        });
        futures_util::future::join_all(pings)
            .await
            .iter()
            .any(Option::is_some)
    }

    /// Drops the current connection and the lane: the next call finds the
    /// primary anew.
    pub async fn reconnect(&self) {
        *self.conn.lock().await = None;
        self.drop_lane();
    }

    fn drop_lane(&self) {
        let old = self.lane.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(old);
    }

    /// Drops `failed` if it is still the current lane (not a newer one
    /// opened since it failed).
    fn drop_failed_lane(&self, failed: &Arc<Lane>) {
        let mut lane = self.lane.lock().unwrap_or_else(|p| p.into_inner());
        if lane.as_ref().is_some_and(|l| Arc::ptr_eq(l, failed)) {
            drop(lane.take());
        }
    }

    /// The lane, if open, healthy and on the general connection's primary.
    fn current_lane(&self) -> Option<Arc<Lane>> {
        let lane = self.lane.lock().unwrap_or_else(|p| p.into_inner());
        lane.as_ref()
            .filter(|l| !l.is_dead() && l.generation == self.generation())
            .cloned()
    }

    /// The fast lane, opened to the primary the general connection uses
    /// (which is opened first when there is none: it finds the primary).
    async fn lane(&self) -> Result<Arc<Lane>, RegistryError> {
        if let Some(lane) = self.current_lane() {
            return Ok(lane);
        }
        let _opening = self.lane_open.lock().await;
        if let Some(lane) = self.current_lane() {
            return Ok(lane);
        }
        self.conn().await?;
        let generation = self.generation();
        let primary = self.primary();
        let (host, port) =
            sentinel::split_addr(&primary).ok_or_else(|| unavailable("bad primary address"))?;
        let lane = Lane::open(
            (&host, port),
            &self.lane_auth,
            generation,
            self.op_timeout * 2,
        )
        .await
        .map_err(unavailable)?;
        let lane = Arc::new(lane);
        *self.lane.lock().unwrap_or_else(|p| p.into_inner()) = Some(lane.clone());
        Ok(lane)
    }

    /// One pipeline on the fast lane. An error reply is returned as such;
    /// `READONLY` (a demoted primary) also drops both connections.
    async fn lane_call(&self, commands: &[&[&[u8]]]) -> Result<Vec<Reply>, RegistryError> {
        self.lane_call_within(commands, None).await
    }

    /// [`Self::lane_call`], with the commands waiting up to `defer` for
    /// another call's write to carry them.
    async fn lane_call_within(
        &self,
        commands: &[&[&[u8]]],
        defer: Option<Duration>,
    ) -> Result<Vec<Reply>, RegistryError> {
        let lane = self.lane().await?;
        let answer = match defer {
            None => lane.call(commands, self.op_timeout).await,
            Some(delay) => lane.call_deferred(commands, self.op_timeout, delay).await,
        };
        let replies = match answer {
            Ok(r) => r,
            Err(e) => {
                self.drop_failed_lane(&lane);
                return Err(unavailable(e));
            }
        };
        let readonly = replies
            .iter()
            .any(|r| matches!(r, Reply::Error(e) if e.starts_with("READONLY")));
        if readonly {
            tracing::warn!(primary = %self.primary(), "registry server is read-only; finding the primary again");
            self.reconnect().await;
            return Err(unavailable("registry server is read-only"));
        }
        Ok(replies)
    }

    /// Follows Sentinel `+switch-master` notices until `stop` (no-op
    /// without Sentinels).
    pub async fn watch_failovers(&self, stop: tokio_util::sync::CancellationToken) {
        let Target::Sentinel {
            sentinels,
            master,
            auth,
        } = &self.target
        else {
            return;
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let on_switch = move || {
            let _ = tx.try_send(());
        };
        let watch = sentinel::watch_switches(
            sentinels.clone(),
            master.clone(),
            auth.clone(),
            on_switch,
            stop.clone(),
        );
        tokio::pin!(watch);
        loop {
            tokio::select! {
                _ = &mut watch => return,
                Some(()) = rx.recv() => {
                    self.reconnect().await;
                    self.switched.notify_one();
                }
            }
        }
    }
}

/// One EVALSHA call for a pipeline (the script is loaded just before).
fn evalsha(script: &Script, keys: &[String], args: &[String]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len());
    for k in keys {
        cmd.arg(k);
    }
    for a in args {
        cmd.arg(a);
    }
    cmd
}

/// A session key's value: `owner|epoch|upstream`, as the scripts write it.
fn session_value(owner: &str, epoch: u64, upstream: &str) -> String {
    let mut epoch_text = [0u8; 20];
    let epoch = crate::decimal::decimal_str(epoch, &mut epoch_text);
    let mut value = String::with_capacity(owner.len() + epoch.len() + upstream.len() + 2);
    value.push_str(owner);
    value.push('|');
    value.push_str(epoch);
    value.push('|');
    value.push_str(upstream);
    value
}
