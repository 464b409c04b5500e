//! The stored metadata record: key, status, headers, times, body length and hash. Versioned
//! (the magic carries the format version) and checksummed, so a torn or corrupted record is
//! detected and skipped, never served.
//!
//! Layout (integers big-endian):
//! `magic "SCMETA02" | u32 payload_len | payload | blake3(magic..payload)[..16]`
//! payload: `u16 status | u64 request_ms | u64 response_ms | u64 body_len | [32] digest |
//! str key | u16 n, n x (str name, bytes value) | u16 m, m x (str name, opt bytes)`
//! where `str`/`bytes` are `u32 len | data` and `opt` is `u8 present | bytes`.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::cache::key::{CacheKey, Digest};
use crate::policy::Prepared;

const MAGIC: &[u8; 8] = b"SCMETA02";
const CHECKSUM_LEN: usize = 16;
/// Upper bound on a record, so a corrupt length can never make us allocate wildly.
pub const MAX_RECORD: usize = 1 << 20;
/// Upper bound on stored header fields.
const MAX_HEADERS: usize = 4096;

/// A stored response's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    /// The full cache key (compared on every lookup).
    pub key: CacheKey,
    /// Response status.
    pub status: u16,
    /// Response headers as stored (hop-by-hop ones already removed).
    pub headers: HeaderMap,
    /// When the request that filled it was sent.
    pub request_time: SystemTime,
    /// When its response head arrived.
    pub response_time: SystemTime,
    /// Body length in bytes.
    pub body_len: u64,
    /// blake3 of the body.
    pub digest: Digest,
    /// For each header named by `Vary`: the value the filling request had (None: absent).
    pub vary: Vec<(HeaderName, Option<HeaderValue>)>,
    /// What serving it needs, worked out on first use; never written to disk.
    pub prepared: Derived,
}

/// A [`Prepared`] kept beside a record. A clone starts empty, so a changed copy (a 304
/// refresh) never carries facts worked out from the old head.
#[derive(Default)]
pub struct Derived(OnceLock<Prepared>);

impl Derived {
    /// The facts, worked out by `init` on first use.
    pub fn get_or_init(&self, init: impl FnOnce() -> Prepared) -> &Prepared {
        self.0.get_or_init(init)
    }
}

impl Clone for Derived {
    fn clone(&self) -> Derived {
        Derived::default()
    }
}

impl PartialEq for Derived {
    /// Derived facts are not part of a record's identity.
    fn eq(&self, _: &Derived) -> bool {
        true
    }
}

impl std::fmt::Debug for Derived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Derived(ready)"
        } else {
            "Derived(empty)"
        })
    }
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Wrong magic: another format or version.
    #[error("unknown record format")]
    Magic,
    /// Shorter than its declared length.
    #[error("truncated record")]
    Truncated,
    /// The checksum does not match.
    #[error("record checksum mismatch")]
    Checksum,
    /// A field is malformed.
    #[error("malformed record field {0}")]
    Field(&'static str),
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl Meta {
    /// Encodes the record.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(256 + self.headers.len() * 48);
        p.extend_from_slice(&self.status.to_be_bytes());
        p.extend_from_slice(&millis(self.request_time).to_be_bytes());
        p.extend_from_slice(&millis(self.response_time).to_be_bytes());
        p.extend_from_slice(&self.body_len.to_be_bytes());
        p.extend_from_slice(&self.digest.0);
        put_bytes(&mut p, self.key.as_str().as_bytes());
        p.extend_from_slice(&(self.headers.len().min(u16::MAX as usize) as u16).to_be_bytes());
        for (name, value) in self.headers.iter().take(u16::MAX as usize) {
            put_bytes(&mut p, name.as_str().as_bytes());
            put_bytes(&mut p, value.as_bytes());
        }
        p.extend_from_slice(&(self.vary.len().min(u16::MAX as usize) as u16).to_be_bytes());
        for (name, value) in self.vary.iter().take(u16::MAX as usize) {
            put_bytes(&mut p, name.as_str().as_bytes());
            match value {
                Some(v) => {
                    p.push(1);
                    put_bytes(&mut p, v.as_bytes());
                }
                None => p.push(0),
            }
        }
        let mut out = Vec::with_capacity(MAGIC.len() + 4 + p.len() + CHECKSUM_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(&p);
        let sum = blake3::hash(&out);
        out.extend_from_slice(&sum.as_bytes()[..CHECKSUM_LEN]);
        out
    }

    /// Decodes and verifies a record.
    pub fn decode(buf: &[u8]) -> Result<Meta, DecodeError> {
        if buf.len() < MAGIC.len() + 4 || &buf[..MAGIC.len()] != MAGIC {
            return Err(DecodeError::Magic);
        }
        let len = u32::from_be_bytes(buf[8..12].try_into().expect("4 bytes")) as usize;
        if len > MAX_RECORD {
            return Err(DecodeError::Field("length"));
        }
        let end = 12 + len;
        if buf.len() < end + CHECKSUM_LEN {
            return Err(DecodeError::Truncated);
        }
        if buf.len() != end + CHECKSUM_LEN {
            return Err(DecodeError::Field("trailing bytes"));
        }
        let sum = blake3::hash(&buf[..end]);
        if sum.as_bytes()[..CHECKSUM_LEN] != buf[end..] {
            return Err(DecodeError::Checksum);
        }
        let mut r = Reader { buf: &buf[12..end] };
        let status = r.u16("status")?;
        if !(100..=999).contains(&status) {
            return Err(DecodeError::Field("status"));
        }
        let request_time = from_millis(r.u64("request_time")?);
        let response_time = from_millis(r.u64("response_time")?);
        let body_len = r.u64("body_len")?;
        let digest = Digest(r.array::<32>("digest")?);
        let key = String::from_utf8(r.bytes("key")?.to_vec()).map_err(|_| DecodeError::Field("key"))?;
        let n = r.u16("header count")?;
        // A header map holds at most 32,768 fields (and no response needs a fraction of that):
        // a larger count is corruption, not a reason to panic (found by fuzzing).
        if n as usize > MAX_HEADERS {
            return Err(DecodeError::Field("header count"));
        }
        let mut headers = HeaderMap::with_capacity(n as usize);
        for _ in 0..n {
            let name =
                HeaderName::from_bytes(r.bytes("header name")?).map_err(|_| DecodeError::Field("header name"))?;
            let value =
                HeaderValue::from_bytes(r.bytes("header value")?).map_err(|_| DecodeError::Field("header value"))?;
            headers.append(name, value);
        }
        let m = r.u16("vary count")?;
        let mut vary = Vec::with_capacity(m as usize);
        for _ in 0..m {
            let name = HeaderName::from_bytes(r.bytes("vary name")?).map_err(|_| DecodeError::Field("vary name"))?;
            let value = match r.u8("vary flag")? {
                0 => None,
                1 => Some(
                    HeaderValue::from_bytes(r.bytes("vary value")?).map_err(|_| DecodeError::Field("vary value"))?,
                ),
                _ => return Err(DecodeError::Field("vary flag")),
            };
            vary.push((name, value));
        }
        if !r.buf.is_empty() {
            return Err(DecodeError::Field("payload trailing bytes"));
        }
        Ok(Meta {
            key: CacheKey::from_stored(key),
            status,
            headers,
            request_time,
            response_time,
            body_len,
            digest,
            vary,
            prepared: Default::default(),
        })
    }

    /// The hash this variant is stored under.
    pub fn storage_hash(&self) -> crate::cache::key::KeyHash {
        crate::cache::key::variant_hash(&self.key, &self.vary)
    }

    /// Bytes this record takes on disk ([`Meta::encode`]'s length, counted without encoding:
    /// a fill knows its file's size from the head, before the body's digest is known).
    pub fn encoded_len(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .take(u16::MAX as usize)
            .map(|(name, value)| 8 + name.as_str().len() + value.len())
            .sum();
        let vary: usize = self
            .vary
            .iter()
            .take(u16::MAX as usize)
            .map(|(name, value)| 4 + name.as_str().len() + 1 + value.as_ref().map_or(0, |v| 4 + v.len()))
            .sum();
        let payload = 2 + 8 + 8 + 8 + 32 + 4 + self.key.as_str().len() + 2 + headers + 2 + vary;
        (MAGIC.len() + 4 + payload + CHECKSUM_LEN) as u64
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Field(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N, what)?.try_into().expect("took exactly N bytes"))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = u32::from_be_bytes(self.array(what)?) as usize;
        self.take(n, what)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Meta {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/css"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        Meta {
            key: CacheKey::from_stored("http://h/a.css?x=1".into()),
            status: 200,
            headers,
            request_time: from_millis(1_700_000_000_000),
            response_time: from_millis(1_700_000_000_250),
            body_len: 12345,
            digest: Digest::from(blake3::hash(b"body")),
            vary: vec![
                (
                    HeaderName::from_static("accept-encoding"),
                    Some(HeaderValue::from_static("gzip")),
                ),
                (HeaderName::from_static("x-absent"), None),
            ],
            prepared: Default::default(),
        }
    }

    #[test]
    fn record_round_trips() {
        let m = sample();
        let bytes = m.encode();
        assert_eq!(Meta::decode(&bytes).unwrap(), m);
        assert_eq!(m.encoded_len(), bytes.len() as u64);
        // Counted, not encoded: the count agrees without vary, without headers, with empties.
        let mut bare = m.clone();
        bare.vary.clear();
        bare.headers.clear();
        bare.headers.insert("x-empty", HeaderValue::from_static(""));
        assert_eq!(bare.encoded_len(), bare.encode().len() as u64);
    }

    #[test]
    fn every_truncation_and_bit_flip_is_detected() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(Meta::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(Meta::decode(&b).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn an_absurd_header_count_is_an_error_not_a_panic() {
        // A checksummed record whose payload claims 40,000 header fields.
        let mut p = Vec::new();
        p.extend_from_slice(&200u16.to_be_bytes());
        p.extend_from_slice(&[0u8; 8 * 3]);
        p.extend_from_slice(&[0u8; 32]);
        put_bytes(&mut p, b"http://h/");
        p.extend_from_slice(&40_000u16.to_be_bytes());
        let mut rec = MAGIC.to_vec();
        rec.extend_from_slice(&(p.len() as u32).to_be_bytes());
        rec.extend_from_slice(&p);
        let sum = blake3::hash(&rec);
        rec.extend_from_slice(&sum.as_bytes()[..CHECKSUM_LEN]);
        assert_eq!(Meta::decode(&rec), Err(DecodeError::Field("header count")));
    }

    #[test]
    fn another_version_is_refused() {
        let mut bytes = sample().encode();
        bytes[7] = b'3';
        assert_eq!(Meta::decode(&bytes), Err(DecodeError::Magic));
    }
}
