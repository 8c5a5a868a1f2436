//! The table of every configuration key, and the walk that turns a TOML
//! table into a [`Config`], collecting every problem on the way.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use toml::{Table, Value};

use super::values::{
    format_duration, format_size, parse_duration, parse_size, SessionKey, UpstreamUrl,
};
use super::*;

/// The shape a key's value takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Str,
    Bool,
    Int,
    Duration,
    Size,
    List,
}

/// Every key: section, name, kind. Environment overrides exist for each.
pub const KEYS: &[(&str, &str, Kind)] = &[
    ("node", "id", Kind::Str),
    ("node", "listen", Kind::Str),
    ("node", "advertise", Kind::Str),
    ("node", "drain_timeout", Kind::Duration),
    ("tls", "cert", Kind::Str),
    ("tls", "key", Kind::Str),
    ("session", "key", Kind::Str),
    ("session", "mint", Kind::Bool),
    ("session", "attach", Kind::Str),
    ("session", "resume_grace", Kind::Duration),
    ("session", "resume_buffer", Kind::Size),
    ("session", "idle_timeout", Kind::Duration),
    ("upstream", "servers", Kind::List),
    ("upstream", "balance", Kind::Str),
    ("upstream", "connect_timeout", Kind::Duration),
    ("upstream", "ca_file", Kind::Str),
    ("upstream", "health_interval", Kind::Duration),
    ("upstream", "breaker_failures", Kind::Int),
    ("upstream", "breaker_cooldown", Kind::Duration),
    ("cluster", "registry", Kind::Str),
    ("cluster", "secret", Kind::Str),
    ("cluster", "heartbeat_interval", Kind::Duration),
    ("cluster", "stale_ttl", Kind::Duration),
    ("cluster", "key_prefix", Kind::Str),
    ("cluster", "on_registry_down", Kind::Str),
    ("valkey", "url", Kind::Str),
    ("valkey", "sentinels", Kind::List),
    ("valkey", "master_name", Kind::Str),
    ("valkey", "username", Kind::Str),
    ("valkey", "password", Kind::Str),
    ("admin", "listen", Kind::Str),
    ("admin", "token", Kind::Str),
    ("limits", "max_connections", Kind::Int),
    ("limits", "max_message_size", Kind::Size),
    ("limits", "handshake_timeout", Kind::Duration),
    ("limits", "max_header_bytes", Kind::Size),
    ("log", "format", Kind::Str),
    ("log", "level", Kind::Str),
];

/// Keys whose values are never printed.
const SECRETS: &[(&str, &str)] = &[
    ("cluster", "secret"),
    ("valkey", "password"),
    ("admin", "token"),
];

fn kind_of(section: &str, key: &str) -> Option<Kind> {
    KEYS.iter()
        .find(|(s, k, _)| *s == section && *k == key)
        .map(|(_, _, kind)| *kind)
}

/// Turns an environment variable's text into the value its key expects.
fn env_value(kind: Kind, raw: &str) -> Result<Value, String> {
    Ok(match kind {
        Kind::Str | Kind::Duration | Kind::Size => Value::String(raw.to_string()),
        Kind::Bool => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Value::Boolean(true),
            "false" | "0" | "no" => Value::Boolean(false),
            _ => return Err("expected true or false".into()),
        },
        Kind::Int => Value::Integer(
            raw.trim()
                .parse()
                .map_err(|_| "expected an integer".to_string())?,
        ),
        Kind::List => {
            let raw = raw.trim();
            if raw.starts_with('[') {
                let t: Table = format!("v = {raw}")
                    .parse()
                    .map_err(|_| "not a TOML array".to_string())?;
                t.get("v").cloned().unwrap_or(Value::Array(vec![]))
            } else {
                Value::Array(
                    raw.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| Value::String(s.to_string()))
                        .collect(),
                )
            }
        }
    })
}

/// Collects problems while reading typed values out of the table.
struct Reader {
    table: Table,
    errors: Vec<ConfigError>,
}

impl Reader {
    fn err(&mut self, section: &str, key: &str, reason: impl Into<String>) {
        self.errors.push(ConfigError {
            key: format!("{section}.{key}"),
            reason: reason.into(),
        });
    }

    fn has_section(&self, section: &str) -> bool {
        self.table.contains_key(section)
    }

    fn raw(&self, section: &str, key: &str) -> Option<&Value> {
        self.table.get(section)?.as_table()?.get(key)
    }

    fn string(&mut self, section: &str, key: &str, default: &str) -> String {
        match self.raw(section, key) {
            None => default.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                let t = other.type_str();
                self.err(section, key, format!("expected a string, found {t}"));
                default.to_string()
            }
        }
    }

    fn boolean(&mut self, section: &str, key: &str, default: bool) -> bool {
        match self.raw(section, key) {
            None => default,
            Some(Value::Boolean(b)) => *b,
            Some(other) => {
                let t = other.type_str();
                self.err(section, key, format!("expected true or false, found {t}"));
                default
            }
        }
    }

    fn integer(&mut self, section: &str, key: &str, default: u64, min: u64) -> u64 {
        match self.raw(section, key) {
            None => default,
            Some(Value::Integer(i)) if *i >= min as i64 => *i as u64,
            Some(Value::Integer(_)) => {
                self.err(section, key, format!("must be at least {min}"));
                default
            }
            Some(other) => {
                let t = other.type_str();
                self.err(section, key, format!("expected an integer, found {t}"));
                default
            }
        }
    }

    fn duration(&mut self, section: &str, key: &str, default: &str) -> Duration {
        let s = self.string(section, key, default);
        parse_duration(&s).unwrap_or_else(|reason| {
            self.err(section, key, reason);
            parse_duration(default).unwrap_or_default()
        })
    }

    /// A duration that must be above zero (a zero timeout or interval
    /// would fail every attempt or spin).
    fn positive_duration(&mut self, section: &str, key: &str, default: &str) -> Duration {
        let d = self.duration(section, key, default);
        if d.is_zero() {
            self.err(section, key, "must be greater than zero");
        }
        d
    }

    fn size(&mut self, section: &str, key: &str, default: &str) -> u64 {
        let v = match self.raw(section, key) {
            Some(Value::Integer(i)) if *i >= 0 => return *i as u64,
            Some(Value::String(s)) => s.clone(),
            None => default.to_string(),
            Some(other) => {
                let t = other.type_str();
                self.err(
                    section,
                    key,
                    format!("expected a size such as \"1MiB\", found {t}"),
                );
                default.to_string()
            }
        };
        parse_size(&v).unwrap_or_else(|reason| {
            self.err(section, key, reason);
            parse_size(default).unwrap_or_default()
        })
    }

    fn list(&mut self, section: &str, key: &str) -> Vec<String> {
        match self.raw(section, key) {
            None => Vec::new(),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                let mut bad = false;
                for item in items {
                    match item.as_str() {
                        Some(s) => out.push(s.to_string()),
                        None => bad = true,
                    }
                }
                if bad {
                    self.err(section, key, "every entry must be a string");
                }
                out
            }
            Some(other) => {
                let t = other.type_str();
                self.err(
                    section,
                    key,
                    format!("expected an array of strings, found {t}"),
                );
                Vec::new()
            }
        }
    }

    fn socket_addr(&mut self, section: &str, key: &str, default: &str) -> SocketAddr {
        let s = self.string(section, key, default);
        s.parse().unwrap_or_else(|_| {
            self.err(
                section,
                key,
                format!("{s:?} is not an address such as \"0.0.0.0:8080\""),
            );
            default
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
        })
    }

    fn choice<T: Copy>(
        &mut self,
        section: &str,
        key: &str,
        default: &str,
        options: &[(&str, T)],
    ) -> T {
        let s = self.string(section, key, default);
        let found = options.iter().find(|(name, _)| *name == s).map(|(_, v)| *v);
        found.unwrap_or_else(|| {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            self.err(
                section,
                key,
                format!("{s:?} is not one of {}", names.join(", ")),
            );
            // The default is always one of the options.
            options
                .iter()
                .find(|(name, _)| *name == default)
                .map(|(_, v)| *v)
                .unwrap_or(options[0].1)
        })
    }
}

/// Parses, checks and completes a configuration.
pub fn build(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
    let table: Table = text.parse().map_err(|e: toml::de::Error| {
        ConfigErrors(vec![ConfigError {
            key: "(file)".into(),
            reason: format!("not valid TOML: {}", e.message()),
        }])
    })?;
    let mut r = Reader {
        table,
        errors: Vec::new(),
    };
    check_keys(&mut r);
    apply_env(&mut r, env);
    let config = read_config(&mut r);
    if r.errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(r.errors))
    }
}

fn check_keys(r: &mut Reader) {
    let mut errors = Vec::new();
    for (section, value) in &r.table {
        let known = KEYS.iter().any(|(s, _, _)| s == section);
        match value.as_table() {
            _ if !known => errors.push(ConfigError {
                key: section.clone(),
                reason: "unknown section".into(),
            }),
            None => errors.push(ConfigError {
                key: section.clone(),
                reason: "expected a [section] table".into(),
            }),
            Some(keys) => {
                for key in keys.keys() {
                    if kind_of(section, key).is_none() {
                        errors.push(ConfigError {
                            key: format!("{section}.{key}"),
                            reason: "unknown key".into(),
                        });
                    }
                }
            }
        }
    }
    // Drop what is not understood so the typed walk below sees only known keys.
    r.table
        .retain(|s, v| KEYS.iter().any(|(k, _, _)| *k == s) && v.is_table());
    r.errors.extend(errors);
}

fn apply_env(r: &mut Reader, env: &dyn Fn(&str) -> Option<String>) {
    for (section, key, kind) in KEYS {
        let var = format!(
            "WSBROKER_{}_{}",
            section.to_ascii_uppercase(),
            key.to_ascii_uppercase()
        );
        let Some(raw) = env(&var) else { continue };
        match env_value(*kind, &raw) {
            Ok(value) => {
                let entry = r
                    .table
                    .entry(section.to_string())
                    .or_insert_with(|| Value::Table(Table::new()));
                if let Some(t) = entry.as_table_mut() {
                    t.insert(key.to_string(), value);
                }
            }
            Err(reason) => r.errors.push(ConfigError { key: var, reason }),
        }
    }
}

fn read_config(r: &mut Reader) -> Config {
    let id = r.string("node", "id", "");
    let id = if id.is_empty() { default_node_id() } else { id };
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        || id.len() > 64
    {
        r.err("node", "id", "use at most 64 of A-Z a-z 0-9 . _ -");
    }
    let listen = r.socket_addr("node", "listen", "0.0.0.0:8080");
    let advertise = r.string("node", "advertise", "");
    let advertise = if !advertise.is_empty() {
        Some(advertise)
    } else if listen.ip().is_unspecified() {
        None
    } else {
        Some(listen.to_string())
    };
    let node = NodeConfig {
        id,
        listen,
        advertise,
        drain_timeout: r.duration("node", "drain_timeout", "30s"),
    };

    let tls = if r.has_section("tls") {
        let cert = r.string("tls", "cert", "");
        let key = r.string("tls", "key", "");
        if cert.is_empty() {
            r.err("tls", "cert", "required when [tls] is present");
        }
        if key.is_empty() {
            r.err("tls", "key", "required when [tls] is present");
        }
        Some(TlsConfig {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
        })
    } else {
        None
    };

    let key_spec = r.string("session", "key", "query:session");
    let key = SessionKey::parse(&key_spec).unwrap_or_else(|reason| {
        r.err("session", "key", reason);
        SessionKey::Query("session".into())
    });
    let session = SessionConfig {
        key,
        mint: r.boolean("session", "mint", true),
        attach: r.choice(
            "session",
            "attach",
            "takeover",
            &[
                ("takeover", AttachMode::Takeover),
                ("shared", AttachMode::Shared),
                ("exclusive", AttachMode::Exclusive),
            ],
        ),
        resume_grace: r.duration("session", "resume_grace", "30s"),
        resume_buffer: r.size("session", "resume_buffer", "1MiB"),
        idle_timeout: r.duration("session", "idle_timeout", "5m"),
    };

    let mut servers = Vec::new();
    for s in r.list("upstream", "servers") {
        match UpstreamUrl::parse(&s) {
            Ok(u) => servers.push(u),
            Err(reason) => r.err("upstream", "servers", reason),
        }
    }
    if servers.is_empty() && !r.errors.iter().any(|e| e.key == "upstream.servers") {
        r.err(
            "upstream",
            "servers",
            "at least one ws:// or wss:// upstream is required",
        );
    }
    let ca_file = r.string("upstream", "ca_file", "");
    let upstream = UpstreamConfig {
        servers,
        balance: r.choice(
            "upstream",
            "balance",
            "least_conn",
            &[
                ("least_conn", Balance::LeastConn),
                ("round_robin", Balance::RoundRobin),
                ("hash", Balance::Hash),
            ],
        ),
        connect_timeout: r.positive_duration("upstream", "connect_timeout", "5s"),
        ca_file: (!ca_file.is_empty()).then(|| PathBuf::from(ca_file)),
        health_interval: r.positive_duration("upstream", "health_interval", "5s"),
        breaker_failures: r
            .integer("upstream", "breaker_failures", 5, 1)
            .min(u32::MAX as u64) as u32,
        breaker_cooldown: r.duration("upstream", "breaker_cooldown", "30s"),
    };

    let cluster = ClusterConfig {
        registry: r.choice(
            "cluster",
            "registry",
            "memory",
            &[
                ("memory", RegistryKind::Memory),
                ("valkey", RegistryKind::Valkey),
            ],
        ),
        secret: r.string("cluster", "secret", ""),
        heartbeat_interval: r.duration("cluster", "heartbeat_interval", "2s"),
        stale_ttl: r.duration("cluster", "stale_ttl", "10s"),
        key_prefix: r.string("cluster", "key_prefix", "wsb:"),
        on_registry_down: r.choice(
            "cluster",
            "on_registry_down",
            "local",
            &[
                ("local", OnRegistryDown::Local),
                ("reject", OnRegistryDown::Reject),
            ],
        ),
    };
    if cluster.stale_ttl < cluster.heartbeat_interval * 3 {
        r.err(
            "cluster",
            "stale_ttl",
            "must be at least 3 x heartbeat_interval",
        );
    }
    if cluster.heartbeat_interval.is_zero() {
        r.err("cluster", "heartbeat_interval", "must be greater than zero");
    }
    if cluster.registry == RegistryKind::Valkey {
        if cluster.secret.is_empty() {
            r.err("cluster", "secret", "required with registry = \"valkey\"");
        }
        if node.advertise.is_none() {
            r.err(
                "node",
                "advertise",
                "required when listen is a wildcard address and registry = \"valkey\"",
            );
        }
    }

    let valkey = ValkeyConfig {
        url: r.string("valkey", "url", "redis://127.0.0.1:6379/0"),
        sentinels: r.list("valkey", "sentinels"),
        master_name: r.string("valkey", "master_name", "mymaster"),
        username: r.string("valkey", "username", ""),
        password: r.string("valkey", "password", ""),
    };
    for addr in &valkey.sentinels {
        if !is_host_port(addr) {
            r.err(
                "valkey",
                "sentinels",
                format!("{addr:?} is not host:port (IPv6 in brackets)"),
            );
        }
    }
    if !valkey.sentinels.is_empty() && valkey.master_name.is_empty() {
        r.err("valkey", "master_name", "required with sentinels");
    }
    // TLS to the registry is not built in: refused here rather than failing
    // (or speaking plain TCP to a TLS port) once the node is running.
    if valkey.url.starts_with("rediss://") {
        r.err(
            "valkey",
            "url",
            "rediss:// (TLS to Valkey) is not supported; use redis:// on a private network or through a TLS tunnel",
        );
    } else if !valkey.url.starts_with("redis://") {
        r.err("valkey", "url", "must start with redis://");
    } else if redis::IntoConnectionInfo::into_connection_info(valkey.url.as_str()).is_err() {
        r.err(
            "valkey",
            "url",
            "not a valid URL such as redis://user:password@host:6379/0",
        );
    }

    // The admin listener is off when `listen` is absent, whatever else the
    // section (or the environment) sets.
    let admin_token = r.string("admin", "token", "");
    let admin = if r.raw("admin", "listen").is_some() {
        Some(AdminConfig {
            listen: r.socket_addr("admin", "listen", "127.0.0.1:9090"),
            token: admin_token,
        })
    } else {
        None
    };

    let max_header_bytes = r.size("limits", "max_header_bytes", "16KiB");
    if max_header_bytes < 8192 {
        r.err("limits", "max_header_bytes", "must be at least 8KiB");
    }
    let limits = LimitsConfig {
        max_connections: r.integer("limits", "max_connections", 100_000, 1) as usize,
        max_message_size: r.size("limits", "max_message_size", "16MiB"),
        handshake_timeout: r.positive_duration("limits", "handshake_timeout", "10s"),
        max_header_bytes: max_header_bytes as usize,
    };
    if limits.max_message_size == 0 {
        r.err("limits", "max_message_size", "must be greater than zero");
    }

    let log = LogConfig {
        format: r.choice(
            "log",
            "format",
            "text",
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        ),
        level: r.string("log", "level", "info"),
    };
    if !is_log_filter(&log.level) {
        r.err(
            "log",
            "level",
            "not a level or filter such as \"info\" or \"wsbroker=debug\"",
        );
    }

    check_files(r, tls.as_ref(), upstream.ca_file.as_deref());

    Config {
        node,
        tls,
        session,
        upstream,
        cluster,
        valkey,
        admin,
        limits,
        log,
    }
}

/// Loads the certificate, key and CA files named, as a running node does,
/// so `check` passes no configuration that `run` refuses; each problem is
/// reported with the others, under its own key.
fn check_files(r: &mut Reader, tls: Option<&TlsConfig>, ca_file: Option<&std::path::Path>) {
    if let Some(tls) = tls {
        if !tls.cert.as_os_str().is_empty() && !tls.key.as_os_str().is_empty() {
            let (cert, key) = crate::tls::check_server_files(&tls.cert, &tls.key);
            if let Some(e) = cert {
                r.err("tls", "cert", e.to_string());
            }
            if let Some(e) = key {
                r.err("tls", "key", e.to_string());
            }
        }
    }
    if let Some(ca) = ca_file {
        if let Err(e) = crate::tls::UpstreamTls::new(Some(ca)) {
            r.err("upstream", "ca_file", e.to_string());
        }
    }
}

/// `host:port` with a host name or address (IPv6 in brackets) and a port
/// in 1..=65535.
fn is_host_port(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
        }
    };
    host_ok && port.parse::<u16>().is_ok_and(|p| p > 0)
}

/// A level (`info`) or comma-separated directives (`wsbroker=debug,warn`)
/// whose levels are real ones. `EnvFilter` alone would read an unknown word
/// as a target name and then log nothing.
fn is_log_filter(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |l: &str| LEVELS.iter().any(|x| x.eq_ignore_ascii_case(l.trim()));
    let directives_ok = filter.split(',').all(|d| {
        let d = d.trim();
        match d.rsplit_once('=') {
            Some((target, level)) => !target.trim().is_empty() && is_level(level),
            None => is_level(d),
        }
    });
    directives_ok && tracing_subscriber::EnvFilter::try_new(filter).is_ok()
}

/// A `redis://` URL with the password part of its user info replaced.
fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    match rest[..at].split_once(':') {
        Some((user, password)) if !password.is_empty() => {
            format!("{scheme}://{user}:<redacted>{}", &rest[at..])
        }
        _ => url.to_string(),
    }
}

/// The effective configuration as TOML, secrets shown as `"<redacted>"`.
pub fn render_effective(c: &Config) -> String {
    let mut sections: BTreeMap<&str, Table> = BTreeMap::new();
    let mut put = |section: &'static str, key: &str, value: Value| {
        sections
            .entry(section)
            .or_default()
            .insert(key.to_string(), value);
    };
    let s = |v: &str| Value::String(v.to_string());
    let d = |v: Duration| Value::String(format_duration(v));
    let z = |v: u64| Value::String(format_size(v));
    put("node", "id", s(&c.node.id));
    put("node", "listen", s(&c.node.listen.to_string()));
    put(
        "node",
        "advertise",
        s(c.node.advertise.as_deref().unwrap_or("")),
    );
    put("node", "drain_timeout", d(c.node.drain_timeout));
    if let Some(tls) = &c.tls {
        put("tls", "cert", s(&tls.cert.display().to_string()));
        put("tls", "key", s(&tls.key.display().to_string()));
    }
    put("session", "key", s(&c.session.key.to_string()));
    put("session", "mint", Value::Boolean(c.session.mint));
    let attach = match c.session.attach {
        AttachMode::Takeover => "takeover",
        AttachMode::Shared => "shared",
        AttachMode::Exclusive => "exclusive",
    };
    put("session", "attach", s(attach));
    put("session", "resume_grace", d(c.session.resume_grace));
    put("session", "resume_buffer", z(c.session.resume_buffer));
    put("session", "idle_timeout", d(c.session.idle_timeout));
    let servers = c.upstream.servers.iter().map(|u| s(&u.url)).collect();
    put("upstream", "servers", Value::Array(servers));
    let balance = match c.upstream.balance {
        Balance::LeastConn => "least_conn",
        Balance::RoundRobin => "round_robin",
        Balance::Hash => "hash",
    };
    put("upstream", "balance", s(balance));
    put("upstream", "connect_timeout", d(c.upstream.connect_timeout));
    let ca = c
        .upstream
        .ca_file
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    put("upstream", "ca_file", s(&ca));
    put("upstream", "health_interval", d(c.upstream.health_interval));
    put(
        "upstream",
        "breaker_failures",
        Value::Integer(c.upstream.breaker_failures as i64),
    );
    put(
        "upstream",
        "breaker_cooldown",
        d(c.upstream.breaker_cooldown),
    );
    let registry = match c.cluster.registry {
        RegistryKind::Memory => "memory",
        RegistryKind::Valkey => "valkey",
    };
    put("cluster", "registry", s(registry));
    put("cluster", "secret", s(&c.cluster.secret));
    put(
        "cluster",
        "heartbeat_interval",
        d(c.cluster.heartbeat_interval),
    );
    put("cluster", "stale_ttl", d(c.cluster.stale_ttl));
    put("cluster", "key_prefix", s(&c.cluster.key_prefix));
    let down = match c.cluster.on_registry_down {
        OnRegistryDown::Local => "local",
        OnRegistryDown::Reject => "reject",
    };
    put("cluster", "on_registry_down", s(down));
    put("valkey", "url", s(&redact_url_password(&c.valkey.url)));
    put(
        "valkey",
        "sentinels",
        Value::Array(c.valkey.sentinels.iter().map(|x| s(x)).collect()),
    );
    put("valkey", "master_name", s(&c.valkey.master_name));
    put("valkey", "username", s(&c.valkey.username));
    put("valkey", "password", s(&c.valkey.password));
    if let Some(admin) = &c.admin {
        put("admin", "listen", s(&admin.listen.to_string()));
        put("admin", "token", s(&admin.token));
    }
    put(
        "limits",
        "max_connections",
        Value::Integer(c.limits.max_connections as i64),
    );
    put("limits", "max_message_size", z(c.limits.max_message_size));
    put("limits", "handshake_timeout", d(c.limits.handshake_timeout));
    put(
        "limits",
        "max_header_bytes",
        z(c.limits.max_header_bytes as u64),
    );
    let format = match c.log.format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    put("log", "format", s(format));
    put("log", "level", s(&c.log.level));

    for (section, key) in SECRETS {
        if let Some(Value::String(v)) = sections.get_mut(section).and_then(|t| t.get_mut(*key)) {
            if !v.is_empty() {
                *v = "<redacted>".to_string();
            }
        }
    }
    let mut out = String::new();
    for section in [
        "node", "tls", "session", "upstream", "cluster", "valkey", "admin", "limits", "log",
    ] {
        if let Some(t) = sections.get(section) {
            out.push_str(&format!(
                "[{section}]\n{}\n",
                toml::to_string(t).unwrap_or_default()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const MINIMAL: &str = "[upstream]\nservers = [\"ws://127.0.0.1:9001\"]\n";

    #[test]
    fn defaults_follow_the_contract() {
        let c = build(MINIMAL, &no_env).expect("minimal config is valid");
        assert_eq!(c.node.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.node.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.session.key, SessionKey::Query("session".into()));
        assert!(c.session.mint);
        assert_eq!(c.session.attach, AttachMode::Takeover);
        assert_eq!(c.session.resume_grace, Duration::from_secs(30));
        assert_eq!(c.session.resume_buffer, 1 << 20);
        assert_eq!(c.session.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.upstream.balance, Balance::LeastConn);
        assert_eq!(c.upstream.breaker_failures, 5);
        assert_eq!(c.cluster.registry, RegistryKind::Memory);
        assert_eq!(c.cluster.key_prefix, "wsb:");
        assert_eq!(c.cluster.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(c.cluster.stale_ttl, Duration::from_secs(10));
        assert_eq!(c.limits.max_connections, 100_000);
        assert_eq!(c.limits.max_message_size, 16 << 20);
        assert_eq!(c.limits.max_header_bytes, 16 << 10);
        assert_eq!(c.limits.handshake_timeout, Duration::from_secs(10));
        assert!(c.admin.is_none() && c.tls.is_none());
        assert_eq!(c.log.format, LogFormat::Text);
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = "[node]\nlisten = \"nowhere\"\nbogus = 1\n[session]\nattach = \"maybe\"\n[whatever]\nx = 1\n[cluster]\nheartbeat_interval = \"5s\"\n";
        let errs = build(text, &no_env).unwrap_err().0;
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        for k in [
            "node.bogus",
            "whatever",
            "node.listen",
            "session.attach",
            "upstream.servers",
            "cluster.stale_ttl",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn a_tls_registry_url_is_refused_with_its_reason() {
        let text = format!("{MINIMAL}[valkey]\nurl = \"rediss://127.0.0.1:6380/0\"\n");
        let errs = build(&text, &no_env).unwrap_err().0;
        let e = errs
            .iter()
            .find(|e| e.key == "valkey.url")
            .expect("valkey.url reported");
        assert!(e.reason.contains("not supported"), "{}", e.reason);
        let text = format!("{MINIMAL}[valkey]\nurl = \"http://127.0.0.1:6379\"\n");
        let errs = build(&text, &no_env).unwrap_err().0;
        assert!(errs.iter().any(|e| e.key == "valkey.url"));
    }

    #[test]
    fn environment_wins_over_the_file() {
        let env = |k: &str| match k {
            "WSBROKER_SESSION_ATTACH" => Some("shared".to_string()),
            "WSBROKER_UPSTREAM_SERVERS" => Some("ws://127.0.0.1:1,ws://127.0.0.1:2".to_string()),
            "WSBROKER_SESSION_MINT" => Some("false".to_string()),
            _ => None,
        };
        let c = build(MINIMAL, &env).expect("valid");
        assert_eq!(c.session.attach, AttachMode::Shared);
        assert_eq!(c.upstream.servers.len(), 2);
        assert!(!c.session.mint);
    }

    #[test]
    fn secrets_are_redacted() {
        let text = format!("{MINIMAL}[cluster]\nsecret = \"hunter2\"\n[admin]\nlisten = \"127.0.0.1:9090\"\ntoken = \"tok\"\n");
        let c = build(&text, &no_env).expect("valid");
        let out = render_effective(&c);
        assert!(
            !out.contains("hunter2") && !out.contains("\"tok\""),
            "{out}"
        );
        assert!(out.contains("<redacted>"));
        // The rendering is itself a valid configuration.
        build(&out.replace("<redacted>", "x"), &no_env).expect("rendered config parses");
    }

    #[test]
    fn a_password_in_the_registry_url_is_redacted() {
        let text =
            format!("{MINIMAL}[valkey]\nurl = \"redis://default:hunter2@127.0.0.1:6379/0\"\n");
        let c = build(&text, &no_env).expect("valid");
        let out = render_effective(&c);
        assert!(!out.contains("hunter2"), "{out}");
        assert!(
            out.contains("redis://default:<redacted>@127.0.0.1:6379/0"),
            "{out}"
        );
        assert_eq!(
            redact_url_password("redis://:pw@[::1]:6379"),
            "redis://:<redacted>@[::1]:6379"
        );
        assert_eq!(
            redact_url_password("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
    }

    #[test]
    fn zero_timeouts_bad_sentinels_and_unknown_levels_are_refused() {
        let text = "[upstream]\nservers = [\"ws://127.0.0.1:9001\"]\n\
                    connect_timeout = \"0s\"\nhealth_interval = \"0ms\"\n\
                    [limits]\nhandshake_timeout = \"0s\"\n\
                    [valkey]\nsentinels = [\"nohostport\", \"127.0.0.1:0\", \"[::1]:26379\"]\n\
                    [log]\nlevel = \"loud\"\n";
        let errs = build(text, &no_env).unwrap_err().0;
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        for k in [
            "upstream.connect_timeout",
            "upstream.health_interval",
            "limits.handshake_timeout",
            "valkey.sentinels",
            "log.level",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        let sentinel_errors = errs.iter().filter(|e| e.key == "valkey.sentinels").count();
        assert_eq!(sentinel_errors, 2, "{errs:?}");
        for good in ["debug", "WARN", "wsbroker=debug,info", "info,hyper=off"] {
            assert!(is_log_filter(good), "{good}");
        }
        for good in ["127.0.0.1:26379", "sentinel-1.example:26379", "[::1]:26379"] {
            assert!(is_host_port(good), "{good}");
        }
        for bad in [
            "redis://127.0.0.1:26379",
            "host with space:1",
            "[::x]:1",
            ":26379",
        ] {
            assert!(!is_host_port(bad), "{bad}");
        }
        let text = format!("{MINIMAL}[valkey]\nurl = \"redis://user:pw@[::1/0\"\n");
        let errs = build(&text, &no_env).unwrap_err().0;
        assert!(errs.iter().any(|e| e.key == "valkey.url"), "{errs:?}");
        for bad in ["loud", "wsbroker=loud", "=info", ""] {
            assert!(!is_log_filter(bad), "{bad}");
        }
    }

    #[test]
    fn the_admin_listener_is_off_without_listen() {
        let text = format!("{MINIMAL}[admin]\ntoken = \"tok\"\n");
        let c = build(&text, &no_env).expect("valid");
        assert!(c.admin.is_none());
        let env = |k: &str| (k == "WSBROKER_ADMIN_TOKEN").then(|| "tok".to_string());
        assert!(build(MINIMAL, &env).expect("valid").admin.is_none());
        let text = format!("{MINIMAL}[admin]\nlisten = \"127.0.0.1:9090\"\n");
        let admin = build(&text, &env).expect("valid").admin.expect("on");
        assert_eq!(admin.token, "tok");
    }

    #[test]
    fn the_reference_file_parses_and_documents_every_key() {
        let text = include_str!("../../config/wsbroker.toml");
        let c = build(text, &no_env).expect("config/wsbroker.toml is valid");
        assert_eq!(c.node.id, "node-a");
        assert!(c.admin.is_some());
        for (section, key, _) in KEYS {
            let documented =
                text.contains(&format!("[{section}]")) || text.contains(&format!("# [{section}]"));
            let has_key = text
                .lines()
                .any(|l| l.trim_start_matches("# ").starts_with(&format!("{key} =")));
            assert!(
                documented && has_key,
                "{section}.{key} is not in config/wsbroker.toml"
            );
        }
    }

    #[test]
    fn valkey_needs_a_secret() {
        let text = format!(
            "{MINIMAL}[cluster]\nregistry = \"valkey\"\n[node]\nlisten = \"127.0.0.1:1\"\n"
        );
        let errs = build(&text, &no_env).unwrap_err().0;
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].key, "cluster.secret");
    }
}
