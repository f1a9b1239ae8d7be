//! The synthetic agent's msgpack wire format: encoders that write what the Go agent writes
//! (PascalCase keys in alphabetical order, smallest integer encodings, `bin` for bytes, nil
//! for an empty payload) and the lenient request decoding the Go agent does.

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;

use bytes::BytesMut;
use rmpv::Value;
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;

/// The largest request value the synthetic agent buffers before it gives up on a connection.
pub(crate) const MAX_REQUEST_LEN: usize = 16 * 1024 * 1024;

/// A msgpack writer into a `Vec<u8>`. Writing into memory cannot fail, so the `rmp` results
/// (whose error type only exists for other writers) are discarded.
#[derive(Default)]
pub(crate) struct Enc(pub(crate) Vec<u8>);

impl Enc {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Enc(Vec::with_capacity(n))
    }
    pub(crate) fn map(&mut self, len: usize) -> &mut Self {
        let _ = rmp::encode::write_map_len(&mut self.0, len32(len));
        self
    }
    pub(crate) fn array(&mut self, len: usize) -> &mut Self {
        let _ = rmp::encode::write_array_len(&mut self.0, len32(len));
        self
    }
    pub(crate) fn str(&mut self, s: &str) -> &mut Self {
        let _ = rmp::encode::write_str(&mut self.0, s);
        self
    }
    pub(crate) fn bin(&mut self, b: &[u8]) -> &mut Self {
        let _ = rmp::encode::write_bin(&mut self.0, b);
        self
    }
    /// Bytes as the Go agent sends a `[]byte`: `bin`, or nil when empty (a nil slice).
    pub(crate) fn payload(&mut self, b: &[u8]) -> &mut Self {
        if b.is_empty() {
            self.nil()
        } else {
            self.bin(b)
        }
    }
    pub(crate) fn uint(&mut self, v: u64) -> &mut Self {
        let _ = rmp::encode::write_uint(&mut self.0, v);
        self
    }
    pub(crate) fn bool(&mut self, v: bool) -> &mut Self {
        let _ = rmp::encode::write_bool(&mut self.0, v);
        self
    }
    pub(crate) fn nil(&mut self) -> &mut Self {
        let _ = rmp::encode::write_nil(&mut self.0);
        self
    }
    pub(crate) fn f64(&mut self, v: f64) -> &mut Self {
        let _ = rmp::encode::write_f64(&mut self.0, v);
        self
    }
    pub(crate) fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// A string map, keys sorted (Go's map order is random; sorted is one of its orders).
    pub(crate) fn str_map<'a>(
        &mut self,
        len: usize,
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> &mut Self {
        self.map(len);
        for (k, v) in entries {
            self.str(k).str(v);
        }
        self
    }
}

fn len32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// The response header `{Error, Seq}`, in the agent's key order.
pub(crate) fn header(out: &mut Vec<u8>, seq: u64, error: &str) {
    let mut e = Enc(std::mem::take(out));
    e.map(2).str("Error").str(error).str("Seq").uint(seq);
    *out = e.0;
}

/// The encoded `Tags` map of a member: encoded once, shared by every member with these tags.
#[derive(Debug)]
pub(crate) struct Tags {
    pub(crate) map: BTreeMap<String, String>,
    pub(crate) encoded: Vec<u8>,
}

impl Tags {
    pub(crate) fn new(map: BTreeMap<String, String>) -> Self {
        let mut e = Enc::with_capacity(16 * map.len() + 1);
        e.str_map(map.len(), map.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        Tags { map, encoded: e.0 }
    }
}

/// Protocol versions the Debian 0.9.4 agent reports for every member (memberlist 1..5 at 2,
/// serf 2..5 at 5).
pub(crate) const PROTOCOL: [u8; 6] = [1, 5, 2, 2, 5, 5];

/// One `Member` map, keys in the agent's order:
/// `Addr, DelegateCur, DelegateMax, DelegateMin, Name, Port, ProtocolCur, ProtocolMax,
/// ProtocolMin, Status, Tags`.
pub(crate) fn member(e: &mut Enc, name: &str, addr: IpAddr, port: u16, tags: &Tags, status: &str) {
    let [pmin, pmax, pcur, dmin, dmax, dcur] = PROTOCOL;
    e.map(11).str("Addr");
    match addr {
        IpAddr::V4(a) => e.bin(&a.octets()),
        IpAddr::V6(a) => e.bin(&a.octets()),
    };
    e.str("DelegateCur").uint(dcur.into());
    e.str("DelegateMax").uint(dmax.into());
    e.str("DelegateMin").uint(dmin.into());
    e.str("Name").str(name);
    e.str("Port").uint(port.into());
    e.str("ProtocolCur").uint(pcur.into());
    e.str("ProtocolMax").uint(pmax.into());
    e.str("ProtocolMin").uint(pmin.into());
    e.str("Status").str(status);
    e.str("Tags").raw(&tags.encoded);
}

/// Reads msgpack values one at a time from the client's socket.
pub(crate) struct ValueReader {
    rd: OwnedReadHalf,
    buf: BytesMut,
}

impl ValueReader {
    pub(crate) fn new(rd: OwnedReadHalf) -> Self {
        ValueReader {
            rd,
            buf: BytesMut::with_capacity(16 * 1024),
        }
    }

    /// The next complete value; `None` at a clean end of the stream.
    pub(crate) async fn next(&mut self) -> io::Result<Option<Value>> {
        loop {
            if !self.buf.is_empty() {
                let mut cur = io::Cursor::new(&self.buf[..]);
                match rmpv::decode::read_value(&mut cur) {
                    Ok(v) => {
                        let used = usize::try_from(cur.position()).unwrap_or(self.buf.len());
                        let _ = self.buf.split_to(used.min(self.buf.len()));
                        return Ok(Some(v));
                    }
                    Err(e) if is_eof(&e) => {}
                    Err(e) => {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
                    }
                }
            }
            if self.buf.len() > MAX_REQUEST_LEN {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("request larger than {MAX_REQUEST_LEN} bytes"),
                ));
            }
            self.buf.reserve(16 * 1024);
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed in the middle of a request",
                    ))
                };
            }
        }
    }
}

fn is_eof(e: &rmpv::decode::Error) -> bool {
    match e {
        rmpv::decode::Error::InvalidMarkerRead(io) | rmpv::decode::Error::InvalidDataRead(io) => {
            io.kind() == io::ErrorKind::UnexpectedEof
        }
        _ => false,
    }
}

/// A decoding failure: the Go agent logs it and closes the connection.
#[derive(Debug)]
pub(crate) struct DecodeError(pub(crate) String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad(field: &str, want: &str, got: &Value) -> DecodeError {
    DecodeError(format!(
        "decode failed: field {field}: expected {want}, got {got}"
    ))
}

/// Decodes a request header into `(command, seq)` the way Go's decoder does into a reused
/// struct: keys that are absent keep their previous values, unknown keys are ignored.
pub(crate) fn merge_header(
    v: &Value,
    command: &mut String,
    seq: &mut u64,
) -> Result<(), DecodeError> {
    let Value::Map(entries) = v else {
        return Err(DecodeError(format!(
            "failed to decode request header: expected a map, got {v}"
        )));
    };
    for (k, val) in entries {
        match key(k) {
            Some("Command") => *command = string("Command", val)?,
            Some("Seq") => *seq = uint("Seq", val)?,
            _ => {}
        }
    }
    Ok(())
}

/// A request body: a map read field by field, with Go's zero values for absent keys.
pub(crate) struct Body<'a>(&'a [(Value, Value)]);

impl<'a> Body<'a> {
    pub(crate) fn new(v: &'a Value) -> Result<Self, DecodeError> {
        match v {
            Value::Map(entries) => Ok(Body(entries)),
            Value::Nil => Ok(Body(&[])),
            other => Err(DecodeError(format!(
                "decode failed: expected a map, got {other}"
            ))),
        }
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0
            .iter()
            .find(|(k, _)| key(k) == Some(name))
            .map(|(_, v)| v)
    }

    pub(crate) fn string(&self, name: &str) -> Result<String, DecodeError> {
        self.get(name)
            .map_or(Ok(String::new()), |v| string(name, v))
    }

    pub(crate) fn uint(&self, name: &str) -> Result<u64, DecodeError> {
        self.get(name).map_or(Ok(0), |v| uint(name, v))
    }

    pub(crate) fn int(&self, name: &str) -> Result<i64, DecodeError> {
        match self.get(name) {
            None | Some(Value::Nil) => Ok(0),
            Some(Value::Integer(i)) => i.as_i64().ok_or_else(|| {
                DecodeError(format!("decode failed: field {name}: {i} overflows int64"))
            }),
            Some(other) => Err(bad(name, "an integer", other)),
        }
    }

    pub(crate) fn bool(&self, name: &str) -> Result<bool, DecodeError> {
        match self.get(name) {
            None | Some(Value::Nil) => Ok(false),
            Some(Value::Boolean(b)) => Ok(*b),
            Some(other) => Err(bad(name, "a bool", other)),
        }
    }

    /// A `[]byte`: bin, str, an array of small ints, or nil.
    pub(crate) fn bytes(&self, name: &str) -> Result<Vec<u8>, DecodeError> {
        match self.get(name) {
            None | Some(Value::Nil) => Ok(Vec::new()),
            Some(Value::Binary(b)) => Ok(b.clone()),
            Some(Value::String(s)) => Ok(s.as_bytes().to_vec()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_u64()
                        .and_then(|n| u8::try_from(n).ok())
                        .ok_or_else(|| bad(name, "bytes", i))
                })
                .collect(),
            Some(other) => Err(bad(name, "bytes", other)),
        }
    }

    pub(crate) fn str_map(&self, name: &str) -> Result<BTreeMap<String, String>, DecodeError> {
        match self.get(name) {
            None | Some(Value::Nil) => Ok(BTreeMap::new()),
            Some(Value::Map(entries)) => entries
                .iter()
                .map(|(k, v)| Ok((string(name, k)?, string(name, v)?)))
                .collect(),
            Some(other) => Err(bad(name, "a map", other)),
        }
    }

    pub(crate) fn str_list(&self, name: &str) -> Result<Vec<String>, DecodeError> {
        match self.get(name) {
            None | Some(Value::Nil) => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(|v| string(name, v)).collect(),
            Some(other) => Err(bad(name, "an array", other)),
        }
    }
}

fn key(k: &Value) -> Option<&str> {
    match k {
        Value::String(s) => s.as_str(),
        Value::Binary(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

fn string(name: &str, v: &Value) -> Result<String, DecodeError> {
    match v {
        Value::Nil => Ok(String::new()),
        Value::String(s) => Ok(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Value::Binary(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        other => Err(bad(name, "a string", other)),
    }
}

fn uint(name: &str, v: &Value) -> Result<u64, DecodeError> {
    match v {
        Value::Nil => Ok(0),
        Value::Integer(i) => i
            .as_u64()
            .ok_or_else(|| bad(name, "an unsigned integer", v)),
        other => Err(bad(name, "an unsigned integer", other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_matches_captured_bytes() {
        // serf-rpc.md §2: 82 a5 "Error" a0 a3 "Seq" 00
        let mut out = Vec::new();
        header(&mut out, 0, "");
        let mut want = vec![0x82, 0xa5];
        want.extend_from_slice(b"Error");
        want.push(0xa0);
        want.push(0xa3);
        want.extend_from_slice(b"Seq");
        want.push(0x00);
        assert_eq!(out, want);
    }

    #[test]
    fn member_matches_captured_bytes() {
        // serf-rpc.md §3.5, the first member of the captured members reply.
        let tags = Tags::new(
            [("role", "web"), ("dc", "east"), ("my-tag.x", "v1")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        let mut e = Enc::default();
        member(
            &mut e,
            "node1",
            IpAddr::from([127, 0, 0, 1]),
            7946,
            &tags,
            "alive",
        );
        let v = rmpv::decode::read_value(&mut &e.0[..]).unwrap();
        let keys: Vec<String> = v
            .as_map()
            .unwrap()
            .iter()
            .map(|(k, _)| k.as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            keys,
            [
                "Addr",
                "DelegateCur",
                "DelegateMax",
                "DelegateMin",
                "Name",
                "Port",
                "ProtocolCur",
                "ProtocolMax",
                "ProtocolMin",
                "Status",
                "Tags"
            ]
        );
        // 8b a4 "Addr" c4 04 7f 00 00 01 ab "DelegateCur" 05
        assert_eq!(&e.0[..12], b"\x8b\xa4Addr\xc4\x04\x7f\x00\x00\x01");
        assert!(e.0.windows(8).any(|w| w == b"Port\xcd\x1f\x0a\xab"));
    }

    #[test]
    fn header_keeps_missing_keys_like_go() {
        let mut command = "members".to_string();
        let mut seq = 4;
        let v = Value::Map(vec![(Value::from("X"), Value::from(1))]);
        merge_header(&v, &mut command, &mut seq).unwrap();
        assert_eq!((command.as_str(), seq), ("members", 4));
        let neg = Value::Map(vec![(Value::from("Seq"), Value::from(-1))]);
        assert!(merge_header(&neg, &mut command, &mut seq).is_err());
    }

    #[test]
    fn bytes_accept_bin_str_array_and_nil() {
        let v = Value::Map(vec![
            (Value::from("A"), Value::Binary(vec![1, 2])),
            (Value::from("B"), Value::from("hi")),
            (
                Value::from("C"),
                Value::Array(vec![Value::from(3), Value::from(4)]),
            ),
            (Value::from("D"), Value::Nil),
        ]);
        let b = Body::new(&v).unwrap();
        assert_eq!(b.bytes("A").unwrap(), [1, 2]);
        assert_eq!(b.bytes("B").unwrap(), b"hi");
        assert_eq!(b.bytes("C").unwrap(), [3, 4]);
        assert!(b.bytes("D").unwrap().is_empty());
        assert!(b.bytes("missing").unwrap().is_empty());
    }
}
