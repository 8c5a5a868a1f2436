//! Configuration: one TOML file, overridden by `WSBROKER_<SECTION>_<KEY>`.
//!
//! Pipeline: TOML text → `toml::Table` → key check (unknown sections and
//! keys are errors) → environment overrides → typed [`Config`] with defaults
//! → cross-field checks. Every problem found is collected, so one run of
//! `wsbroker check` names every offending key.

mod schema;
pub mod values;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use schema::{render_effective, KEYS};
pub use values::{SessionKey, UpstreamUrl};

/// One problem with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `section.key`, or the file itself for syntax errors.
    pub key: String,
    pub reason: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Every problem found in one configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    Takeover,
    Shared,
    Exclusive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    LeastConn,
    RoundRobin,
    Hash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryKind {
    Memory,
    Valkey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRegistryDown {
    Local,
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: String,
    pub listen: SocketAddr,
    /// Where peers reach this node; `None` only when `listen` is a wildcard
    /// address and the registry is `memory` (no peer needs it).
    pub advertise: Option<String>,
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub key: SessionKey,
    pub mint: bool,
    pub attach: AttachMode,
    pub resume_grace: Duration,
    pub resume_buffer: u64,
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub servers: Vec<UpstreamUrl>,
    pub balance: Balance,
    pub connect_timeout: Duration,
    pub ca_file: Option<PathBuf>,
    pub health_interval: Duration,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub registry: RegistryKind,
    pub secret: String,
    pub heartbeat_interval: Duration,
    pub stale_ttl: Duration,
    pub key_prefix: String,
    pub on_registry_down: OnRegistryDown,
}

#[derive(Debug, Clone)]
pub struct ValkeyConfig {
    pub url: String,
    pub sentinels: Vec<String>,
    pub master_name: String,
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Empty: the admin API needs no token (only sensible on loopback).
    pub token: String,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub max_connections: usize,
    pub max_message_size: u64,
    pub handshake_timeout: Duration,
    pub max_header_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

/// The validated, effective configuration of one node.
#[derive(Debug, Clone)]
pub struct Config {
    pub node: NodeConfig,
    pub tls: Option<TlsConfig>,
    pub session: SessionConfig,
    pub upstream: UpstreamConfig,
    pub cluster: ClusterConfig,
    pub valkey: ValkeyConfig,
    pub admin: Option<AdminConfig>,
    pub limits: LimitsConfig,
    pub log: LogConfig,
}

impl Config {
    /// Parses a configuration file's text, applying overrides from `env`
    /// (a lookup such as `|k| std::env::var(k).ok()`).
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
        schema::build(text, env)
    }

    /// Reads and parses a configuration file with the process environment.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                key: path.display().to_string(),
                reason: format!("cannot read: {e}"),
            }])
        })?;
        Config::parse(&text, &|k| std::env::var(k).ok())
    }

    /// The scheme clients use on the public listener.
    pub fn public_scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "wss"
        } else {
            "ws"
        }
    }
}

/// A default node id: the host name plus a random suffix.
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "wsbroker".to_string());
    format!("{host}-{:06x}", fastrand::u32(..0x100_0000))
}
