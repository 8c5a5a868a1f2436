//! Decimal numbers (and IP addresses) written into a stack buffer, for
//! request heads and registry commands built on every new session without
//! `format!`.

/// `n` in decimal, written into the end of `buf`.
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// [`decimal`] as a `&str`.
pub fn decimal_str(n: u64, buf: &mut [u8; 20]) -> &str {
    // Only ASCII digits were written.
    std::str::from_utf8(decimal(n, buf)).unwrap_or("0")
}

/// Longest IP address text (an IPv6 address with an embedded IPv4 one).
pub const MAX_IP_TEXT: usize = 45;

/// `ip` as text (as its `Display` writes it), in `buf`.
pub fn ip_str(ip: std::net::IpAddr, buf: &mut [u8; MAX_IP_TEXT]) -> &str {
    let len = match ip {
        std::net::IpAddr::V4(v4) => {
            let mut at = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[at] = b'.';
                    at += 1;
                }
                let mut digits = [0u8; 20];
                let d = decimal(u64::from(octet), &mut digits);
                buf[at..at + d.len()].copy_from_slice(d);
                at += d.len();
            }
            at
        }
        std::net::IpAddr::V6(v6) => {
            use std::io::Write;
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            // 45 bytes hold any IPv6 text; a failure leaves what was written.
            let _ = write!(cursor, "{v6}");
            cursor.position() as usize
        }
    };
    // Only ASCII was written.
    std::str::from_utf8(&buf[..len]).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_match_to_string() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "192.168.100.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
        ] {
            let ip: std::net::IpAddr = ip.parse().expect("ip");
            assert_eq!(ip_str(ip, &mut [0u8; MAX_IP_TEXT]), ip.to_string());
        }
    }

    #[test]
    fn digits_match_to_string() {
        for n in [0u64, 7, 10, 1234567890, u64::MAX] {
            assert_eq!(decimal_str(n, &mut [0u8; 20]), n.to_string());
        }
    }
}
