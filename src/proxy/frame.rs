//! WebSocket frame-boundary tracking over a raw byte stream (RFC 6455 §5.2).
//!
//! After the 101 the broker relays bytes as they are: it never unmasks,
//! re-masks or re-encodes data frames. [`FrameScanner`] reads only frame
//! headers, so the relay knows where messages start and end (to inject a
//! Close at a boundary, to buffer whole messages for resume, to enforce
//! `max_message_size`) at the cost of a few comparisons per frame.

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Longest possible frame header: 2 + 8 (extended length) + 4 (mask).
pub const MAX_HEADER_LEN: usize = 14;

/// Messages (all their frames, control frames between them included) and
/// data frames up to this size are relayed only once whole, in both
/// directions of a session: a peer that drops inside one leaves the other
/// side with nothing of it, at a message boundary.
pub const HOLD_FRAMES_UP_TO: usize = 16 * 1024;

/// A boundary the scanner found inside one scanned buffer. Offsets are
/// positions in that buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The first frame of a data message starts here.
    MessageStart { at: usize },
    /// The last payload byte of a data message ends here (exclusive).
    MessageEnd { at: usize },
    /// A whole control frame occupies `at .. at + len`.
    Control { at: usize, len: usize, opcode: u8 },
}

/// Why a stream stopped being relayable. `valid_upto` bytes of the scanned
/// buffer before the fault are well-formed and may still be relayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message exceeds the size limit")]
    TooBig { valid_upto: usize },
    #[error("protocol error: {reason}")]
    Protocol {
        valid_upto: usize,
        reason: &'static str,
    },
}

impl FrameError {
    pub fn valid_upto(&self) -> usize {
        match self {
            FrameError::TooBig { valid_upto } | FrameError::Protocol { valid_upto, .. } => {
                *valid_upto
            }
        }
    }

    /// The close code the sender of the bad stream gets.
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::TooBig { .. } => 1009,
            FrameError::Protocol { .. } => 1002,
        }
    }
}

/// Incremental frame-header tracker for one direction of one connection.
#[derive(Debug, Clone)]
pub struct FrameScanner {
    /// Client-to-server frames must be masked, server-to-client must not.
    expect_masked: bool,
    /// Largest data message (sum of its frames' payloads) allowed.
    max_message: u64,
    /// Payload bytes of the current data frame not yet seen.
    remaining: u64,
    /// The current data frame is the final frame of its message.
    frame_is_final: bool,
    /// Between a message's first frame header and its final payload byte.
    in_message: bool,
    /// Payload bytes of the current message so far.
    message_len: u64,
    /// Data frames up to this many bytes (header included) are relayed
    /// only once whole, so a peer that drops mid-frame leaves the other
    /// side at a frame boundary (a Close can still be sent). 0: none held.
    hold_frames_up_to: u64,
}

impl FrameScanner {
    pub fn new(expect_masked: bool, max_message: u64) -> Self {
        FrameScanner {
            expect_masked,
            max_message,
            remaining: 0,
            frame_is_final: false,
            in_message: false,
            message_len: 0,
            hold_frames_up_to: 0,
        }
    }

    /// Holds back data frames of up to `limit` bytes until whole (see
    /// `hold_frames_up_to`); larger ones are relayed as their bytes come.
    pub fn holding_frames_up_to(mut self, limit: usize) -> Self {
        self.hold_frames_up_to = limit as u64;
        self
    }

    /// No frame is partly relayed: a control frame may be injected here.
    pub fn at_frame_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// No message is partly relayed: a data message may be injected here.
    pub fn at_message_boundary(&self) -> bool {
        self.remaining == 0 && !self.in_message
    }

    /// Scans `buf`, pushing the boundaries found onto `events`. Returns how
    /// many bytes are complete enough to relay; the rest (a partial header,
    /// or a control frame not yet whole) must be kept and rescanned with
    /// more bytes appended.
    pub fn scan(&mut self, buf: &[u8], events: &mut Vec<Event>) -> Result<usize, FrameError> {
        let mut pos = 0usize;
        loop {
            if self.remaining > 0 {
                let avail = (buf.len() - pos) as u64;
                let take = self.remaining.min(avail);
                pos += take as usize;
                self.remaining -= take;
                if self.remaining == 0 && self.frame_is_final {
                    self.in_message = false;
                    events.push(Event::MessageEnd { at: pos });
                }
                if pos == buf.len() {
                    return Ok(pos);
                }
                continue;
            }
            let head = match parse_header(&buf[pos..]) {
                Some(h) => h,
                None => return Ok(pos),
            };
            let protocol = |reason| FrameError::Protocol {
                valid_upto: pos,
                reason,
            };
            if head.rsv != 0 {
                return Err(protocol("reserved bits set without a negotiated extension"));
            }
            if head.payload_len >> 63 != 0 {
                return Err(protocol("frame length with its most significant bit set"));
            }
            if head.masked != self.expect_masked {
                return Err(protocol(if self.expect_masked {
                    "client frame not masked"
                } else {
                    "server frame masked"
                }));
            }
            if head.opcode >= 0x8 {
                if !matches!(head.opcode, OP_CLOSE | OP_PING | OP_PONG) {
                    return Err(protocol("reserved control opcode"));
                }
                if !head.fin || head.payload_len > 125 {
                    return Err(protocol("fragmented or oversized control frame"));
                }
                let len = head.header_len + head.payload_len as usize;
                if buf.len() - pos < len {
                    return Ok(pos);
                }
                events.push(Event::Control {
                    at: pos,
                    len,
                    opcode: head.opcode,
                });
                pos += len;
                continue;
            }
            let message_len = match head.opcode {
                OP_CONTINUATION if self.in_message => self.message_len,
                OP_CONTINUATION => return Err(protocol("continuation frame outside a message")),
                OP_TEXT | OP_BINARY if !self.in_message => 0,
                OP_TEXT | OP_BINARY => return Err(protocol("new message inside a fragmented one")),
                _ => return Err(protocol("reserved data opcode")),
            };
            let message_len = message_len.saturating_add(head.payload_len);
            if message_len > self.max_message {
                return Err(FrameError::TooBig { valid_upto: pos });
            }
            if self.hold_frames_up_to > 0 {
                let held = if head.opcode == OP_CONTINUATION {
                    // A frame of a message already being relayed.
                    let frame_len = head.header_len as u64 + head.payload_len;
                    frame_len <= self.hold_frames_up_to && ((buf.len() - pos) as u64) < frame_len
                } else {
                    message_extent(&buf[pos..], self.hold_frames_up_to) == Extent::Partial
                };
                if held {
                    // Not yet whole and small enough to wait for: kept for
                    // the next scan.
                    return Ok(pos);
                }
            }
            if head.opcode != OP_CONTINUATION {
                events.push(Event::MessageStart { at: pos });
                self.in_message = true;
            }
            self.message_len = message_len;
            self.frame_is_final = head.fin;
            self.remaining = head.payload_len;
            pos += head.header_len;
            if self.remaining == 0 && head.fin {
                self.in_message = false;
                events.push(Event::MessageEnd { at: pos });
            }
        }
    }
}

/// How much of a message starting at the front of a buffer is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extent {
    /// Its final frame is in the buffer (or the frames break the protocol,
    /// which the scan reports).
    Whole,
    /// Not all there yet, and no larger than the hold limit so far.
    Partial,
    /// Larger than the hold limit: relayed as it comes.
    TooLarge,
}

/// Walks the frames of the message starting at `buf[0]` (control frames
/// between its fragments included) up to `limit` bytes.
fn message_extent(buf: &[u8], limit: u64) -> Extent {
    let mut at = 0usize;
    loop {
        let Some(h) = parse_header(&buf[at..]) else {
            return if (at + MAX_HEADER_LEN) as u64 > limit {
                Extent::TooLarge
            } else {
                Extent::Partial
            };
        };
        let end = (at as u64)
            .saturating_add(h.header_len as u64)
            .saturating_add(h.payload_len);
        if end > limit {
            return Extent::TooLarge;
        }
        if end > buf.len() as u64 {
            return Extent::Partial;
        }
        let is_data = h.opcode < 0x8;
        // A Close ends the stream: no final fragment follows it, so what
        // is there goes as it is (the Close with it).
        if (is_data && h.fin)
            || (is_data && at > 0 && h.opcode != OP_CONTINUATION)
            || h.opcode == OP_CLOSE
        {
            return Extent::Whole;
        }
        at = end as usize;
    }
}

/// The fields of one frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload_len: u64,
    pub header_len: usize,
}

/// Parses a frame header at the start of `buf`; `None` when incomplete.
pub fn parse_header(buf: &[u8]) -> Option<Header> {
    if buf.len() < 2 {
        return None;
    }
    let (b0, b1) = (buf[0], buf[1]);
    let masked = b1 & 0x80 != 0;
    let (len_bytes, payload_len) = match b1 & 0x7f {
        126 => {
            let b = buf.get(2..4)?;
            (2, u16::from_be_bytes([b[0], b[1]]) as u64)
        }
        127 => {
            let b: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            // As sent: a length with its most significant bit set breaks
            // RFC 6455 §5.2, and the scan refuses it.
            (8, u64::from_be_bytes(b))
        }
        n => (0, n as u64),
    };
    let header_len = 2 + len_bytes + if masked { 4 } else { 0 };
    if buf.len() < header_len {
        return None;
    }
    Some(Header {
        fin: b0 & 0x80 != 0,
        rsv: b0 & 0x70,
        opcode: b0 & 0x0f,
        masked,
        payload_len,
        header_len,
    })
}

/// The payload of a whole frame, unmasked.
pub fn frame_payload(frame: &[u8]) -> Vec<u8> {
    let Some(head) = parse_header(frame) else {
        return Vec::new();
    };
    let start = head.header_len;
    let end = (start + head.payload_len as usize).min(frame.len());
    let mut payload = frame[start.min(end)..end].to_vec();
    if head.masked {
        let key = &frame[start - 4..start];
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    payload
}

/// The status code and reason of a Close payload (1005 when absent).
pub fn parse_close(payload: &[u8]) -> (u16, String) {
    if payload.len() < 2 {
        return (1005, String::new());
    }
    let code = u16::from_be_bytes([payload[0], payload[1]]);
    (code, String::from_utf8_lossy(&payload[2..]).into_owned())
}

/// Encodes one final frame. With `mask` the payload is masked, as every
/// frame the broker sends towards an upstream must be.
pub fn encode_frame(opcode: u8, payload: &[u8], mask: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + MAX_HEADER_LEN);
    out.push(0x80 | opcode);
    let mask_bit = if mask { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if mask {
        let key = fastrand::u32(..).to_be_bytes();
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// Encodes a Close frame with a code and a reason (cut to fit 125 bytes).
pub fn encode_close(code: u16, reason: &str, mask: bool) -> Vec<u8> {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode_frame(OP_CLOSE, &payload, mask)
}

/// Re-encodes a whole control frame with the masking the other side needs.
pub fn remask_control(frame: &[u8], mask: bool) -> Vec<u8> {
    let opcode = frame.first().map(|b| b & 0x0f).unwrap_or(OP_CLOSE);
    encode_frame(opcode, &frame_payload(frame), mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(s: &mut FrameScanner, buf: &[u8]) -> (usize, Vec<Event>) {
        let mut ev = Vec::new();
        let n = s.scan(buf, &mut ev).expect("valid stream");
        (n, ev)
    }

    #[test]
    fn single_text_frame_is_one_message() {
        let f = encode_frame(OP_TEXT, b"hello", false);
        let mut s = FrameScanner::new(false, 1024);
        let (n, ev) = scan_all(&mut s, &f);
        assert_eq!(n, f.len());
        assert_eq!(
            ev,
            vec![
                Event::MessageStart { at: 0 },
                Event::MessageEnd { at: f.len() }
            ]
        );
        assert!(s.at_message_boundary());
    }

    #[test]
    fn a_small_frame_is_held_until_whole_and_a_large_one_streams() {
        let small = encode_frame(OP_TEXT, &[b'a'; 100], true);
        let mut s = FrameScanner::new(true, 1 << 20).holding_frames_up_to(1024);
        let (n, ev) = scan_all(&mut s, &small[..50]);
        assert_eq!((n, ev.len()), (0, 0), "nothing of a partial small frame");
        assert!(s.at_message_boundary());
        let (n, ev) = scan_all(&mut s, &small);
        assert_eq!(n, small.len());
        assert_eq!(
            ev,
            vec![
                Event::MessageStart { at: 0 },
                Event::MessageEnd { at: small.len() }
            ]
        );
        let large = encode_frame(OP_BINARY, &[7u8; 4096], true);
        let (n, ev) = scan_all(&mut s, &large[..2000]);
        assert_eq!(n, 2000, "a frame over the limit streams");
        assert_eq!(ev, vec![Event::MessageStart { at: 0 }]);
        assert!(!s.at_frame_boundary());
    }

    #[test]
    fn a_small_fragmented_message_is_held_until_its_final_frame() {
        let mut msg = encode_frame(OP_TEXT, b"hel", true);
        msg[0] &= 0x7f; // not final
        let ping = encode_frame(OP_PING, b"p", true);
        let mut last = encode_frame(OP_CONTINUATION, b"lo", true);
        let mut all = msg.clone();
        all.extend_from_slice(&ping);
        let before_last = all.len();
        all.append(&mut last);
        let mut s = FrameScanner::new(true, 1 << 20).holding_frames_up_to(1024);
        for cut in [1, msg.len(), before_last, all.len() - 1] {
            let (n, ev) = scan_all(&mut s, &all[..cut]);
            assert_eq!((n, ev.len()), (0, 0), "held at {cut} bytes");
            assert!(s.at_message_boundary());
        }
        let (n, ev) = scan_all(&mut s, &all);
        assert_eq!(n, all.len());
        assert_eq!(ev.first(), Some(&Event::MessageStart { at: 0 }));
        assert_eq!(ev.last(), Some(&Event::MessageEnd { at: all.len() }));
        // A Close after a first fragment: no final fragment will come, so
        // the fragment and the Close go as they are.
        let mut first = encode_frame(OP_TEXT, b"hel", true);
        first[0] &= 0x7f;
        let close = encode_close(1011, "bye", true);
        let mut closing = first.clone();
        closing.extend_from_slice(&close);
        let mut s = FrameScanner::new(true, 1 << 20).holding_frames_up_to(1024);
        let (n, ev) = scan_all(&mut s, &closing);
        assert_eq!(n, closing.len());
        assert!(ev.iter().any(|e| matches!(
            e,
            Event::Control {
                opcode: OP_CLOSE,
                ..
            }
        )));
        // Over the limit, the first fragment goes at once.
        let mut big = encode_frame(OP_BINARY, &[1u8; 2000], true);
        big[0] &= 0x7f;
        let mut s = FrameScanner::new(true, 1 << 20).holding_frames_up_to(1024);
        let (n, _) = scan_all(&mut s, &big);
        assert_eq!(n, big.len());
        assert!(!s.at_message_boundary());
    }

    #[test]
    fn a_64_bit_length_with_its_top_bit_set_is_a_protocol_error() {
        let mut f = vec![0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 5, 1, 2, 3, 4];
        f.extend_from_slice(b"hello");
        let mut s = FrameScanner::new(true, 1 << 20);
        let err = s.scan(&f, &mut Vec::new()).expect_err("refused");
        assert_eq!(err.close_code(), 1002);
        assert_eq!(err.valid_upto(), 0);
    }

    #[test]
    fn header_split_across_reads_is_kept() {
        let f = encode_frame(OP_BINARY, &[7u8; 300], true);
        let mut s = FrameScanner::new(true, 1024);
        let (n, ev) = scan_all(&mut s, &f[..3]);
        assert_eq!((n, ev.len()), (0, 0));
        let (n, ev) = scan_all(&mut s, &f[..100]);
        assert_eq!(n, 100);
        assert_eq!(ev, vec![Event::MessageStart { at: 0 }]);
        assert!(!s.at_frame_boundary());
        let (n, ev) = scan_all(&mut s, &f[100..]);
        assert_eq!(n, f.len() - 100);
        assert_eq!(ev, vec![Event::MessageEnd { at: n }]);
    }

    #[test]
    fn fragmented_message_with_interleaved_ping() {
        let mut buf = Vec::new();
        let mut first = encode_frame(OP_TEXT, b"ab", false);
        first[0] &= 0x7f; // not final
        buf.extend_from_slice(&first);
        let ping = encode_frame(OP_PING, b"p", false);
        buf.extend_from_slice(&ping);
        buf.extend_from_slice(&encode_frame(OP_CONTINUATION, b"cd", false));
        let mut s = FrameScanner::new(false, 1024);
        let (n, ev) = scan_all(&mut s, &buf);
        assert_eq!(n, buf.len());
        assert_eq!(ev[0], Event::MessageStart { at: 0 });
        assert_eq!(
            ev[1],
            Event::Control {
                at: first.len(),
                len: ping.len(),
                opcode: OP_PING
            }
        );
        assert_eq!(ev[2], Event::MessageEnd { at: buf.len() });
    }

    #[test]
    fn control_frame_waits_until_whole() {
        let close = encode_close(1000, "bye", true);
        let mut s = FrameScanner::new(true, 1024);
        let (n, ev) = scan_all(&mut s, &close[..close.len() - 1]);
        assert_eq!((n, ev.len()), (0, 0));
        let (n, ev) = scan_all(&mut s, &close);
        assert_eq!(n, close.len());
        assert_eq!(parse_close(&frame_payload(&close)), (1000, "bye".into()));
        assert!(matches!(
            ev[0],
            Event::Control {
                opcode: OP_CLOSE,
                ..
            }
        ));
    }

    #[test]
    fn oversized_message_is_refused_at_its_frame() {
        let ok = encode_frame(OP_TEXT, &[b'a'; 10], false);
        let big = encode_frame(OP_TEXT, &[b'a'; 20], false);
        let mut buf = ok.clone();
        buf.extend_from_slice(&big);
        let mut s = FrameScanner::new(false, 16);
        let err = s.scan(&buf, &mut Vec::new()).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooBig {
                valid_upto: ok.len()
            }
        );
        assert_eq!(err.close_code(), 1009);
    }

    #[test]
    fn fragments_add_up_against_the_limit() {
        let mut a = encode_frame(OP_TEXT, &[b'a'; 10], false);
        a[0] &= 0x7f;
        let b = encode_frame(OP_CONTINUATION, &[b'a'; 10], false);
        let mut buf = a.clone();
        buf.extend_from_slice(&b);
        let mut s = FrameScanner::new(false, 16);
        let err = s.scan(&buf, &mut Vec::new()).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooBig {
                valid_upto: a.len()
            }
        );
    }

    #[test]
    fn masking_direction_is_enforced() {
        let f = encode_frame(OP_TEXT, b"x", false);
        let mut s = FrameScanner::new(true, 16);
        let err = s.scan(&f, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, FrameError::Protocol { valid_upto: 0, .. }));
        assert_eq!(err.close_code(), 1002);
    }

    #[test]
    fn continuation_without_start_is_a_protocol_error() {
        let f = encode_frame(OP_CONTINUATION, b"x", false);
        let mut s = FrameScanner::new(false, 16);
        assert!(s.scan(&f, &mut Vec::new()).is_err());
    }

    #[test]
    fn masked_payload_round_trips() {
        let f = encode_frame(OP_BINARY, &[1, 2, 3, 4, 5], true);
        assert_eq!(frame_payload(&f), vec![1, 2, 3, 4, 5]);
        let unmasked = remask_control(&encode_close(4001, "x", true), false);
        assert_eq!(parse_close(&frame_payload(&unmasked)), (4001, "x".into()));
        assert_eq!(unmasked[1] & 0x80, 0);
    }

    #[test]
    fn long_lengths_parse() {
        let f = encode_frame(OP_BINARY, &vec![0u8; 70_000], false);
        let h = parse_header(&f).expect("complete header");
        assert_eq!((h.payload_len, h.header_len), (70_000, 10));
    }
}
