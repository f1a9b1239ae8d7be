//! Framing of the agent's byte stream: finds where each msgpack value ends, and encodes
//! requests.
//!
//! The RPC stream has no length prefix: it is a plain sequence of msgpack values. The reader
//! therefore scans the buffered bytes for one complete value before decoding it, so a value
//! split across TCP reads is never mistaken for an error, and a malformed byte is reported
//! at once instead of waiting for more input.

use serde::Serialize;

use crate::error::Error;
use crate::protocol::RequestHeader;

/// The largest single msgpack value the client accepts from the agent. The agent's own
/// records are far smaller (a `members` reply of 500 members is about 75 KiB); anything
/// larger is treated as a protocol violation instead of being buffered without bound.
pub const MAX_FRAME_LEN: usize = 64 * 1024 * 1024;

/// What the scanner found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A complete msgpack value of this many bytes.
    Complete(usize),
    /// The value is not complete yet: read more bytes.
    Incomplete,
}

/// Why bytes are not msgpack.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A byte that no msgpack value starts with (0xc1).
    #[error("invalid msgpack marker 0x{marker:02x} at offset {offset}")]
    InvalidMarker {
        /// The marker byte.
        marker: u8,
        /// Its offset in the value.
        offset: usize,
    },
    /// A value that declares more bytes than [`MAX_FRAME_LEN`].
    #[error("msgpack value of {len} bytes or more exceeds the limit of {MAX_FRAME_LEN} bytes")]
    TooLarge {
        /// The size declared so far.
        len: u64,
    },
}

impl From<FrameError> for Error {
    fn from(e: FrameError) -> Self {
        Error::Protocol(e.to_string())
    }
}

/// Scans `buf` for one complete msgpack value at its start.
///
/// Never panics, whatever the bytes. Runs in time linear in the value's size and uses no
/// recursion, so nesting depth cannot exhaust the stack.
pub fn scan_frame(buf: &[u8]) -> Result<Frame, FrameError> {
    let mut pos: u64 = 0;
    // Values still to read: the top-level one plus every element and key/value announced by
    // the containers read so far.
    let mut pending: u64 = 1;
    while pending > 0 {
        let Some(&marker) = buf.get(pos as usize) else {
            return Ok(Frame::Incomplete);
        };
        pending -= 1;
        let (head, data, children): (u64, Len, u64) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (1, Len::Fixed(0), 0),
            0x80..=0x8f => (1, Len::Fixed(0), 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (1, Len::Fixed(0), u64::from(marker & 0x0f)),
            0xa0..=0xbf => (1, Len::Fixed(u64::from(marker & 0x1f)), 0),
            0xc1 => {
                return Err(FrameError::InvalidMarker {
                    marker,
                    offset: pos as usize,
                });
            }
            0xc4 | 0xd9 => (2, Len::Prefixed(1), 0),
            0xc5 | 0xda => (3, Len::Prefixed(2), 0),
            0xc6 | 0xdb => (5, Len::Prefixed(4), 0),
            // ext 8/16/32: length, then a type byte, then the data
            0xc7 => (3, Len::Prefixed(1), 0),
            0xc8 => (4, Len::Prefixed(2), 0),
            0xc9 => (6, Len::Prefixed(4), 0),
            0xca => (5, Len::Fixed(0), 0),
            0xcb => (9, Len::Fixed(0), 0),
            0xcc | 0xd0 => (2, Len::Fixed(0), 0),
            0xcd | 0xd1 => (3, Len::Fixed(0), 0),
            0xce | 0xd2 => (5, Len::Fixed(0), 0),
            0xcf | 0xd3 => (9, Len::Fixed(0), 0),
            // fixext 1/2/4/8/16: a type byte and the data
            0xd4 => (3, Len::Fixed(0), 0),
            0xd5 => (4, Len::Fixed(0), 0),
            0xd6 => (6, Len::Fixed(0), 0),
            0xd7 => (10, Len::Fixed(0), 0),
            0xd8 => (18, Len::Fixed(0), 0),
            0xdc => (3, Len::Count(2, 1), 0),
            0xdd => (5, Len::Count(4, 1), 0),
            0xde => (3, Len::Count(2, 2), 0),
            0xdf => (5, Len::Count(4, 2), 0),
        };
        let (data_len, more_children) = match data {
            Len::Fixed(n) => (n, children),
            Len::Prefixed(width) => match read_be(buf, pos + 1, width) {
                Some(n) => (n, 0),
                None => return Ok(Frame::Incomplete),
            },
            Len::Count(width, per) => match read_be(buf, pos + 1, width) {
                Some(n) => (0, per * n),
                None => return Ok(Frame::Incomplete),
            },
        };
        pos += head + data_len;
        pending += more_children;
        if pos > MAX_FRAME_LEN as u64 {
            return Err(FrameError::TooLarge { len: pos });
        }
        if pending > MAX_FRAME_LEN as u64 {
            // Every value takes at least one byte, so this many cannot fit the limit.
            return Err(FrameError::TooLarge { len: pending });
        }
        if pos > buf.len() as u64 && pending == 0 {
            return Ok(Frame::Incomplete);
        }
    }
    Ok(Frame::Complete(pos as usize))
}

#[derive(Clone, Copy)]
enum Len {
    /// Fixed data length after the head.
    Fixed(u64),
    /// A big-endian length of this many bytes right after the marker.
    Prefixed(u64),
    /// A big-endian element count of this many bytes; each element is this many values.
    Count(u64, u64),
}

/// Reads a big-endian length of `width` bytes at `at`; `None` when not all of it is buffered.
fn read_be(buf: &[u8], at: u64, width: u64) -> Option<u64> {
    let start = usize::try_from(at).ok()?;
    let bytes = buf.get(start..start.checked_add(width as usize)?)?;
    Some(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
}

/// Encodes one request: the header and, when given, its body, into one buffer that is
/// written with a single call so a request is never interleaved with another.
pub(crate) fn encode_request<B: Serialize>(
    command: &str,
    seq: u64,
    body: Option<&B>,
) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(64);
    let header = RequestHeader { command, seq };
    rmp_serde::encode::write_named(&mut out, &header)
        .map_err(|e| Error::Invalid(format!("cannot encode {command} request header: {e}")))?;
    if let Some(body) = body {
        rmp_serde::encode::write_named(&mut out, body)
            .map_err(|e| Error::Invalid(format!("cannot encode {command} request body: {e}")))?;
    }
    Ok(out)
}

/// Decodes one complete msgpack value into `T`.
pub(crate) fn decode<'a, T: serde::Deserialize<'a>>(
    bytes: &'a [u8],
    what: &'static str,
) -> Result<T, Error> {
    rmp_serde::from_slice(bytes).map_err(|e| Error::Decode {
        what,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: &rmpv::Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    #[test]
    fn complete_values_are_measured_exactly() {
        use rmpv::Value;
        let values = vec![
            Value::Nil,
            Value::from(true),
            Value::from(5u8),
            Value::from(-3i8),
            Value::from(300u16),
            Value::from(70_000u32),
            Value::from(u64::MAX),
            Value::from(i64::MIN),
            Value::from(1.5f32),
            Value::from(2.5f64),
            Value::from("x".repeat(40)),
            Value::from("y".repeat(300)),
            Value::from("z".repeat(70_000)),
            Value::Binary(vec![1; 10]),
            Value::Binary(vec![1; 300]),
            Value::Binary(vec![1; 70_000]),
            Value::Array((0..20).map(Value::from).collect()),
            Value::Map(
                (0..20)
                    .map(|i| (Value::from(format!("k{i}")), Value::from(i)))
                    .collect(),
            ),
            Value::Ext(1, vec![1]),
            Value::Ext(1, vec![1, 2]),
            Value::Ext(1, vec![1; 4]),
            Value::Ext(1, vec![1; 8]),
            Value::Ext(1, vec![1; 16]),
            Value::Ext(1, vec![1; 3]),
            Value::Ext(1, vec![1; 300]),
        ];
        for v in values {
            let bytes = enc(&v);
            let mut with_tail = bytes.clone();
            with_tail.extend_from_slice(&[0x82, 0x01]);
            assert_eq!(
                scan_frame(&with_tail),
                Ok(Frame::Complete(bytes.len())),
                "{v}"
            );
            for cut in 0..bytes.len() {
                assert_eq!(
                    scan_frame(&bytes[..cut]),
                    Ok(Frame::Incomplete),
                    "{v} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn reserved_marker_is_an_error() {
        assert_eq!(
            scan_frame(&[0x92, 0x01, 0xc1]),
            Err(FrameError::InvalidMarker {
                marker: 0xc1,
                offset: 2
            })
        );
    }

    #[test]
    fn huge_declared_lengths_are_refused_not_buffered() {
        // str32 of 4 GiB
        assert!(matches!(
            scan_frame(&[0xdb, 0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::TooLarge { .. })
        ));
        // map32 with 4 G entries
        assert!(matches!(
            scan_frame(&[0xdf, 0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn deep_nesting_does_not_recurse() {
        let mut bytes = vec![0x91; 1_000_000];
        bytes.push(0xc0);
        assert_eq!(scan_frame(&bytes), Ok(Frame::Complete(bytes.len())));
    }

    #[test]
    fn request_encoding_matches_captured_bytes() {
        // serf-rpc.md §2: handshake request, header then body.
        let bytes = encode_request(
            "handshake",
            0,
            Some(&crate::protocol::HandshakeRequest { version: 1 }),
        )
        .unwrap();
        let mut expected = vec![0x82, 0xa7];
        expected.extend_from_slice(b"Command");
        expected.push(0xa9);
        expected.extend_from_slice(b"handshake");
        expected.push(0xa3);
        expected.extend_from_slice(b"Seq");
        expected.extend_from_slice(&[0x00, 0x81, 0xa7]);
        expected.extend_from_slice(b"Version");
        expected.push(0x01);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn event_request_matches_captured_bytes() {
        // serf-rpc.md §3.5
        let bytes = encode_request(
            "event",
            1,
            Some(&crate::protocol::EventRequest {
                name: "deploy",
                payload: b"v1.2.3",
                coalesce: false,
            }),
        )
        .unwrap();
        let hex = "82a7436f6d6d616e64a56576656e74a3536571018\
                   3a44e616d65a66465706c6f79a75061796c6f6164c40676312e322e33a8436f616c65736365c2";
        let expected: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(bytes, expected);
    }
}
