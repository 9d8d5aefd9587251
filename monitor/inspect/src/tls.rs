//! The server name a TLS client asks for, from the first bytes it sends.
//!
//! Owns: recognising the start of a TLS stream (a handshake record carrying
//! a ClientHello), and reading the ClientHello's server_name extension
//! (RFC 6066 3, name type 0 host_name) through the record layer (RFC 8446
//! 5.1; a ClientHello split over several records is joined), the handshake
//! header, legacy version and random, session id, cipher suites,
//! compression methods and the extensions list. QUIC carries the same
//! ClientHello in CRYPTO frames without records: [`client_hello_sni`] reads
//! a bare handshake message for it.
//!
//! The kernel copies only the first bytes of a flow (512), and a modern
//! ClientHello (post-quantum key shares, padding) is often longer. Parsing
//! goes as far as the bytes go: if the server_name lies within them it is
//! returned, otherwise None. Nothing here panics on any input.

use super::normalize_host;

/// TLS record content type handshake.
const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake message type client_hello.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Extension server_name.
const EXT_SERVER_NAME: u16 = 0;
/// ServerName name_type host_name.
const NAME_TYPE_HOST: u8 = 0;
const RECORD_HEADER: usize = 5;
/// Largest record body allowed (2^14 plus the 2048 bytes of expansion
/// TLS 1.2 allows for protected records).
const MAX_RECORD: usize = 16384 + 2048;

/// Whether `data` starts with a TLS record header: content type 20 to 23
/// (change_cipher_spec, alert, handshake, application_data), version 3.0
/// to 3.4, and a length a record can have.
pub fn is_record(data: &[u8]) -> bool {
    let Some(header) = data.get(..RECORD_HEADER) else {
        return false;
    };
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    (20..=23).contains(&header[0])
        && header[1] == 3
        && header[2] <= 4
        && len > 0
        && len <= MAX_RECORD
}

/// Whether `data` starts like a TLS stream from a client: a handshake
/// record (version 3.x) whose first message is a ClientHello.
pub fn is_client_hello(data: &[u8]) -> bool {
    let Some(header) = data.get(..RECORD_HEADER + 1) else {
        return false;
    };
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    header[0] == CONTENT_HANDSHAKE
        && header[1] == 3
        && header[2] <= 4
        && (4..=MAX_RECORD).contains(&len)
        && header[5] == HANDSHAKE_CLIENT_HELLO
}

/// The server_name of the ClientHello at the start of a TLS stream, or None
/// if it is not one or the name lies beyond the bytes given.
pub fn sni(stream: &[u8]) -> Option<String> {
    if !is_client_hello(stream) {
        return None;
    }
    client_hello_sni(&handshake_bytes(stream))
}

/// Joins the bodies of the leading handshake records (all of them, or as
/// much as was captured).
fn handshake_bytes(stream: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = stream;
    while let Some(header) = rest.get(..RECORD_HEADER) {
        if header[0] != CONTENT_HANDSHAKE || header[1] != 3 {
            break;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > MAX_RECORD {
            break;
        }
        let body = &rest[RECORD_HEADER..];
        let take = len.min(body.len());
        out.extend_from_slice(&body[..take]);
        rest = &body[take..];
    }
    out
}

/// A cursor over bytes that never reads past the end.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn u8(&mut self) -> Option<u8> {
        let v = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(v)
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self) -> Option<usize> {
        let b = self.take(3)?;
        Some(usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    /// Up to `n` bytes: all of them if present, else what is left.
    fn take_upto(&mut self, n: usize) -> &'a [u8] {
        let end = self.pos.saturating_add(n).min(self.buf.len());
        let out = &self.buf[self.pos..end];
        self.pos = end;
        out
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(drop)
    }
}

/// The server_name of a ClientHello handshake message (type, 3-byte length,
/// body), possibly truncated. Used for TLS (after the record layer) and
/// QUIC (CRYPTO frame data).
pub fn client_hello_sni(handshake: &[u8]) -> Option<String> {
    let mut r = Reader::new(handshake);
    if r.u8()? != HANDSHAKE_CLIENT_HELLO {
        return None;
    }
    let declared = r.u24()?;
    let mut body = Reader::new(r.take_upto(declared));
    let version = body.u16()?;
    if version >> 8 != 3 {
        return None;
    }
    body.skip(32)?; // random
    let session_id = usize::from(body.u8()?);
    if session_id > 32 {
        return None;
    }
    body.skip(session_id)?;
    let suites = usize::from(body.u16()?);
    if suites < 2 || suites % 2 != 0 {
        return None;
    }
    body.skip(suites)?;
    let compression = usize::from(body.u8()?);
    if compression < 1 {
        return None;
    }
    body.skip(compression)?;
    let ext_len = usize::from(body.u16()?);
    let mut exts = Reader::new(body.take_upto(ext_len));
    loop {
        let ext_type = exts.u16()?;
        let len = usize::from(exts.u16()?);
        let data = exts.take_upto(len);
        if ext_type == EXT_SERVER_NAME {
            return server_name(data);
        }
        if data.len() < len {
            return None; // cut off before the server_name
        }
    }
}

/// Reads a server_name extension body (possibly truncated): the first
/// host_name entry that is complete.
fn server_name(data: &[u8]) -> Option<String> {
    let mut r = Reader::new(data);
    let list_len = usize::from(r.u16()?);
    let mut list = Reader::new(r.take_upto(list_len));
    loop {
        let name_type = list.u8()?;
        let len = usize::from(list.u16()?);
        let name = list.take(len)?;
        if name_type == NAME_TYPE_HOST {
            return normalize_host(name);
        }
    }
}

/// Builds ClientHellos for tests and fuzz seeds.
#[cfg(test)]
pub(crate) mod build {
    /// Extension list: (type, data).
    pub fn client_hello(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0x11; 32]); // random
        body.push(32);
        body.extend_from_slice(&[0x22; 32]); // session id
        body.extend_from_slice(&[0, 6, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03]);
        body.extend_from_slice(&[1, 0]); // compression: null
        let mut ext_bytes = Vec::new();
        for (t, d) in exts {
            ext_bytes.extend_from_slice(&t.to_be_bytes());
            ext_bytes.extend_from_slice(&(d.len() as u16).to_be_bytes());
            ext_bytes.extend_from_slice(d);
        }
        body.extend_from_slice(&(ext_bytes.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext_bytes);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        hs
    }

    pub fn sni_ext(name: &str) -> (u16, Vec<u8>) {
        let mut entry = vec![0];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name.as_bytes());
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&entry);
        (0, data)
    }

    /// A typical modern set: supported_groups, a big key share, then SNI.
    pub fn typical(name: &str, sni_first: bool) -> Vec<u8> {
        let groups = (10u16, vec![0, 4, 0x00, 0x1d, 0x00, 0x17]);
        let alpn = (16u16, b"\x00\x0c\x02h2\x08http/1.1".to_vec());
        let key_share = (51u16, vec![0x42; 300]);
        let mut exts = vec![groups, alpn, key_share];
        if sni_first {
            exts.insert(0, sni_ext(name));
        } else {
            exts.push(sni_ext(name));
        }
        client_hello(&exts)
    }

    /// Wraps a handshake message in records of at most `max` bytes.
    pub fn records(handshake: &[u8], max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in handshake.chunks(max) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    #[test]
    fn sni_is_read_from_a_client_hello() {
        let stream = records(&typical("Example.COM.", true), 16384);
        assert!(is_client_hello(&stream));
        assert_eq!(sni(&stream).as_deref(), Some("example.com"));
        let stream = records(&typical("late.example.net", false), 16384);
        assert_eq!(sni(&stream).as_deref(), Some("late.example.net"));
    }

    #[test]
    fn a_hello_split_over_records_is_joined() {
        let stream = records(&typical("split.example.org", false), 100);
        assert_eq!(sni(&stream).as_deref(), Some("split.example.org"));
    }

    #[test]
    fn truncation_returns_the_name_only_if_it_was_captured() {
        let early = records(&typical("early.test", true), 16384);
        let late = records(&typical("late.test", false), 16384);
        // SNI first: present in the first 120 bytes.
        assert_eq!(sni(&early[..120]).as_deref(), Some("early.test"));
        // SNI after a 300-byte key share: not in the first 256 bytes.
        assert_eq!(sni(&late[..256]), None);
        // Every prefix is safe, and the name is never a partial one.
        for stream in [&early, &late] {
            for cut in 0..=stream.len() {
                if let Some(name) = sni(&stream[..cut]) {
                    assert!(name == "early.test" || name == "late.test", "{name}");
                }
            }
        }
    }

    #[test]
    fn no_sni_or_not_a_hello_is_none() {
        let hello = client_hello(&[(10, vec![0, 2, 0, 0x1d])]);
        assert_eq!(sni(&records(&hello, 16384)), None);
        assert!(!is_client_hello(b"GET / HTTP/1.1\r\n"));
        assert!(!is_client_hello(&[22, 3, 3, 0, 10, 2])); // ServerHello
        assert!(!is_client_hello(&[23, 3, 3, 0, 10, 1])); // application data
        assert!(!is_client_hello(&[22, 3, 1, 0xff, 0xff, 1])); // oversize record
        assert_eq!(sni(&[]), None);
        assert!(is_record(&[22, 3, 3, 0, 10, 2]));
        assert!(is_record(&[23, 3, 3, 0, 10]));
        assert!(!is_record(&[24, 3, 3, 0, 10]));
        assert!(!is_record(&[22, 3, 5, 0, 10]));
        assert!(!is_record(&[22, 3, 3, 0, 0]));
        assert!(!is_record(&[22, 3, 3, 0]));
    }

    #[test]
    fn skips_other_names_and_rejects_bad_ones() {
        // An entry of an unknown name type, then host_name.
        let mut list = vec![7, 0, 3, b'x', b'y', b'z', 0, 0, 6];
        list.extend_from_slice(b"a.test");
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        let hello = client_hello(&[(0, data)]);
        assert_eq!(client_hello_sni(&hello).as_deref(), Some("a.test"));
        // Control bytes and spaces are not a host name.
        let hello = client_hello(&[sni_ext("bad\u{1}name.test")]);
        assert_eq!(client_hello_sni(&hello), None);
        let hello = client_hello(&[sni_ext("")]);
        assert_eq!(client_hello_sni(&hello), None);
    }

    #[test]
    fn bad_fields_are_rejected() {
        let good = typical("x.test", true);
        assert!(client_hello_sni(&good).is_some());
        let mut bad_version = good.clone();
        bad_version[4] = 2;
        assert_eq!(client_hello_sni(&bad_version), None);
        let mut long_session = good.clone();
        long_session[4 + 2 + 32] = 33;
        assert_eq!(client_hello_sni(&long_session), None);
        let mut odd_suites = good.clone();
        odd_suites[4 + 2 + 32 + 1 + 32 + 1] = 5;
        assert_eq!(client_hello_sni(&odd_suites), None);
    }

    #[test]
    fn every_bit_flip_is_safe() {
        let stream = records(&typical("flip.test", true), 64);
        for i in 0..stream.len() {
            for bit in 0..8 {
                let mut b = stream.clone();
                b[i] ^= 1 << bit;
                let _ = sni(&b);
            }
        }
    }
}
