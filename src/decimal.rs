//! Decimal numbers written into a stack buffer, for request heads and
//! registry commands built on every new session without `format!`.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_match_to_string() {
        for n in [0u64, 7, 10, 1234567890, u64::MAX] {
            assert_eq!(decimal_str(n, &mut [0u8; 20]), n.to_string());
        }
    }
}
