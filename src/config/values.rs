//! Parsers for the value shapes the configuration uses: durations, sizes,
//! session-key specs and upstream URLs. Each returns a short reason on error.

use std::sync::Arc;
use std::time::Duration;

/// `"500ms"`, `"30s"`, `"5m"` (humantime syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("not a duration ({e}); use e.g. \"500ms\" or \"30s\""))
}

/// `"1MiB"`, `"16KiB"`, `"64KB"`, `"1024"` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| "not a size; use e.g. \"16KiB\" or \"1MiB\"".to_string())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?}; use B, KiB, MiB or GiB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| "size too large".to_string())
}

/// Renders a duration the way the configuration writes it.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Renders a byte count with the largest binary unit that divides it.
pub fn format_size(n: u64) -> String {
    for (unit, mult) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= mult && n.is_multiple_of(mult) {
            return format!("{}{unit}", n / mult);
        }
    }
    format!("{n}B")
}

/// Where the session id is read from in a client's upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionKey {
    Query(String),
    Header(String),
    Cookie(String),
    /// The N-th path segment, counting from 1.
    Path(usize),
}

impl SessionKey {
    pub fn parse(s: &str) -> Result<SessionKey, String> {
        let (kind, name) = s
            .split_once(':')
            .ok_or("expected query:NAME, header:NAME, cookie:NAME or path:N")?;
        let name = name.trim();
        if name.is_empty() {
            return Err("the name after the colon is empty".into());
        }
        match kind.trim() {
            "query" => Ok(SessionKey::Query(name.to_string())),
            "header" => {
                hyper::header::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("{name:?} is not a valid header name"))?;
                Ok(SessionKey::Header(name.to_ascii_lowercase()))
            }
            "cookie" => Ok(SessionKey::Cookie(name.to_string())),
            "path" => match name.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(SessionKey::Path(n)),
                _ => Err("path:N needs a segment number N >= 1".into()),
            },
            other => Err(format!(
                "unknown source {other:?}; expected query, header, cookie or path"
            )),
        }
    }
}

impl std::fmt::Display for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionKey::Query(n) => write!(f, "query:{n}"),
            SessionKey::Header(n) => write!(f, "header:{n}"),
            SessionKey::Cookie(n) => write!(f, "cookie:{n}"),
            SessionKey::Path(n) => write!(f, "path:{n}"),
        }
    }
}

/// One upstream application replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// As written in the configuration; the upstream's name in metrics and JSON.
    pub url: Arc<str>,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix put before the client's path ("" for none).
    pub base_path: String,
    /// The `Host` header sent to it: [`authority`](Self::authority), without
    /// the port when it is the scheme's default.
    pub host_header: String,
    /// The address to dial when the host is an IP literal (no name to
    /// resolve), parsed once here.
    pub ip: Option<std::net::SocketAddr>,
}

impl UpstreamUrl {
    pub fn parse(s: &str) -> Result<UpstreamUrl, String> {
        let uri: hyper::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL ({e})"))?;
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(format!("{s:?} must start with ws:// or wss://")),
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("{s:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        if uri.query().is_some() {
            return Err(format!("{s:?}: an upstream URL cannot carry a query"));
        }
        let base_path = uri.path().trim_end_matches('/').to_string();
        let ip = host
            .parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| std::net::SocketAddr::new(ip, port));
        let mut url = UpstreamUrl {
            url: Arc::from(s),
            tls,
            host,
            port,
            base_path,
            host_header: String::new(),
            ip,
        };
        url.host_header = url.authority();
        if port == if tls { 443 } else { 80 } {
            let without_port = url.host_header.rfind(':').unwrap_or(url.host_header.len());
            url.host_header.truncate(without_port);
        }
        Ok(url)
    }

    /// `host:port` as dialled (IPv6 literals bracketed).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("16KiB"), Ok(16 << 10));
        assert_eq!(parse_size("64KB"), Ok(64_000));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
        assert_eq!(format_size(16 << 20), "16MiB");
    }

    #[test]
    fn session_keys() {
        assert_eq!(
            SessionKey::parse("query:session"),
            Ok(SessionKey::Query("session".into()))
        );
        assert_eq!(
            SessionKey::parse("header:X-Sid"),
            Ok(SessionKey::Header("x-sid".into()))
        );
        assert_eq!(SessionKey::parse("path:2"), Ok(SessionKey::Path(2)));
        assert!(SessionKey::parse("path:0").is_err());
        assert!(SessionKey::parse("body:x").is_err());
        assert!(SessionKey::parse("query").is_err());
    }

    #[test]
    fn upstream_urls() {
        let u = UpstreamUrl::parse("wss://app.internal:9443/ws/").expect("valid url");
        assert!(u.tls);
        assert_eq!(
            (u.host.as_str(), u.port, u.base_path.as_str()),
            ("app.internal", 9443, "/ws")
        );
        let v6 = UpstreamUrl::parse("ws://[::1]:9001").expect("valid url");
        assert_eq!(v6.authority(), "[::1]:9001");
        assert!(UpstreamUrl::parse("http://x").is_err());
    }

    #[test]
    fn host_headers_leave_out_default_ports() {
        let host = |u: &str| UpstreamUrl::parse(u).expect("valid url").host_header;
        assert_eq!(host("ws://app:80/ws"), "app");
        assert_eq!(host("wss://app"), "app");
        assert_eq!(host("ws://app:9001"), "app:9001");
        assert_eq!(host("wss://app:80"), "app:80");
        assert_eq!(host("ws://[::1]"), "[::1]");
        assert_eq!(host("ws://[::1]:9001"), "[::1]:9001");
    }

    #[test]
    fn ip_literal_hosts_are_parsed_once_names_are_not() {
        let ip = |u: &str| UpstreamUrl::parse(u).expect("valid url").ip;
        assert_eq!(ip("ws://127.0.0.1:9001"), "127.0.0.1:9001".parse().ok());
        assert_eq!(ip("ws://[::1]"), "[::1]:80".parse().ok());
        assert_eq!(ip("ws://app:9001"), None);
    }
}
