//! Finding the session id in a client's upgrade request (query, header,
//! cookie or path segment), checking it, and minting new ones.

use hyper::http::request::Parts;

use crate::config::SessionKey;

/// Longest session id accepted.
pub const MAX_ID_LEN: usize = 128;

/// Checks an id: 1..=128 bytes of `[A-Za-z0-9._~-]`.
pub fn validate(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("session id is empty");
    }
    if id.len() > MAX_ID_LEN {
        return Err("session id longer than 128 bytes");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
    {
        return Err("session id has characters outside [A-Za-z0-9._~-]");
    }
    Ok(())
}

/// The raw id named by `key`, if the request carries one.
pub fn find<'a>(key: &SessionKey, parts: &'a Parts) -> Option<&'a str> {
    match key {
        SessionKey::Query(name) => parts.uri.query().and_then(|q| {
            q.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == name).then_some(v)
            })
        }),
        SessionKey::Header(name) => parts
            .headers
            .get(name.as_str())
            .map(|v| v.to_str().unwrap_or("\u{0}")),
        SessionKey::Cookie(name) => parts
            .headers
            .get_all(hyper::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                (k.trim() == name).then_some(v.trim().trim_matches('"'))
            }),
        SessionKey::Path(n) => parts
            .uri
            .path()
            .split('/')
            .filter(|s| !s.is_empty())
            .nth(n - 1),
    }
}

/// A fresh random id: 32 hex digits (128 bits from the OS).
pub fn mint() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::getrandom(&mut bytes).is_err() {
        fastrand::fill(&mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = hyper::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("valid request").into_parts().0
    }

    #[test]
    fn every_source() {
        let p = parts(
            "/app/room-7/ws?x=1&session=abc",
            &[("x-sid", "hdr"), ("cookie", "a=1; sid=ck")],
        );
        assert_eq!(find(&SessionKey::Query("session".into()), &p), Some("abc"));
        assert_eq!(find(&SessionKey::Header("x-sid".into()), &p), Some("hdr"));
        assert_eq!(find(&SessionKey::Cookie("sid".into()), &p), Some("ck"));
        assert_eq!(find(&SessionKey::Path(2), &p), Some("room-7"));
        assert_eq!(find(&SessionKey::Path(9), &p), None);
        assert_eq!(find(&SessionKey::Query("nope".into()), &p), None);
    }

    #[test]
    fn validation() {
        assert!(validate("a.b_c~d-E9").is_ok());
        assert!(validate("").is_err());
        assert!(validate(&"a".repeat(129)).is_err());
        assert!(validate(&"a".repeat(128)).is_ok());
        assert!(validate("a b").is_err());
        assert!(validate("a%20b").is_err());
    }

    #[test]
    fn minted_ids_are_valid_and_distinct() {
        let a = mint();
        assert!(validate(&a).is_ok());
        assert_ne!(a, mint());
    }
}
