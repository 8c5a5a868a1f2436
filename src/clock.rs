//! Coarse monotonic time in milliseconds, cheap enough to stamp every
//! message, and wall-clock formatting for the admin API.

use std::sync::OnceLock;
use std::time::SystemTime;

fn origin() -> &'static tokio::time::Instant {
    static ORIGIN: OnceLock<tokio::time::Instant> = OnceLock::new();
    ORIGIN.get_or_init(tokio::time::Instant::now)
}

/// Milliseconds since the first call in this process (monotonic).
pub fn now_ms() -> u64 {
    origin().elapsed().as_millis() as u64
}

/// The tokio instant `ms` milliseconds after the origin.
pub fn instant_at(ms: u64) -> tokio::time::Instant {
    *origin() + std::time::Duration::from_millis(ms)
}

/// Wall-clock time as RFC 3339 (UTC).
pub fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Seconds since the Unix epoch.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
