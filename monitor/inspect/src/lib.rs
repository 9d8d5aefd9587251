//! What a flow's first bytes say: the kind of payload and the host it is for.
//!
//! Owns: [`classify`] (the contract's `payload` field: `tls`, `quic`,
//! `http`, `dns`, `cleartext`, `unknown`), [`host_from_payload`] (the
//! contract's `host` with `host_source` `sni` or `http`; `dns` names come
//! from [`dns::DnsCache`]), and the host-name rules shared by the parsers.
//! One file per protocol: [`dns`], [`tls`], [`http`], [`quic`]; [`leaks`]
//! finds device identifiers (IMEI, MAC, serial, ...) in payload bytes, plain
//! or encoded; `fuzz` (cargo feature `fuzz`, and the unit tests, which
//! replay its seed corpora) holds the entry points of their fuzz targets.
//!
//! Every function here is pure: bytes in, answer out. The bytes are a
//! flow's payload as the kernel copied it (its first packet's, up to
//! `PAYLOAD_CAPTURE_BYTES` per slice, and for readable flows up to their
//! first `EVIDENCE_BYTES`), shaped by whoever is on the network, so each parser reads
//! only what is there and never panics; each has a fuzz target under
//! `monitor/fuzz`.
//!
//! A crate of its own (egressmon-inspect) so the fuzz targets build it
//! without the agent and its eBPF object; the agent reaches it as
//! `egressmon::inspect`.

pub mod dns;
#[cfg(any(feature = "fuzz", test))]
pub mod fuzz;
pub mod http;
pub mod leaks;
pub mod quic;
pub mod tls;

use monitor_common::{PROTO_TCP, PROTO_UDP};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The kind of a flow's first payload (the contract's `payload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Payload {
    /// A TLS record (a ClientHello, for a client).
    Tls,
    /// A QUIC long-header packet of a known version.
    Quic,
    /// An HTTP/1.x request in the clear.
    Http,
    /// A DNS message to or from port 53 (mDNS 5353, LLMNR 5355).
    Dns,
    /// Readable text that is none of the above; see [`is_cleartext`].
    Cleartext,
    /// Anything else, or no payload seen yet.
    Unknown,
}

impl Payload {
    pub const ALL: [Payload; 6] = [
        Payload::Tls,
        Payload::Quic,
        Payload::Http,
        Payload::Dns,
        Payload::Cleartext,
        Payload::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Payload::Tls => "tls",
            Payload::Quic => "quic",
            Payload::Http => "http",
            Payload::Dns => "dns",
            Payload::Cleartext => "cleartext",
            Payload::Unknown => "unknown",
        }
    }

    /// Whether anyone on the path can read it (`http`, `cleartext`; DNS is
    /// readable too but counted on its own).
    pub fn is_cleartext(self) -> bool {
        matches!(self, Payload::Http | Payload::Cleartext)
    }
}

impl fmt::Display for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for Payload {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Payload {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl FromStr for Payload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Payload::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown payload {s:?}: use one of {}", names(&Payload::ALL)))
    }
}

/// Where a flow's host name came from (the contract's `host_source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostSource {
    /// The server_name of a TLS or QUIC ClientHello.
    Sni,
    /// The Host header of a cleartext HTTP request.
    Http,
    /// A DNS answer the same uid received.
    Dns,
    /// A DNS answer another uid received for the address: a hint, not the
    /// flow's own resolution (shared CDNs serve many names per address).
    DnsOtherUid,
}

impl HostSource {
    pub const ALL: [HostSource; 4] = [
        HostSource::Sni,
        HostSource::Http,
        HostSource::Dns,
        HostSource::DnsOtherUid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HostSource::Sni => "sni",
            HostSource::Http => "http",
            HostSource::Dns => "dns",
            HostSource::DnsOtherUid => "dns_other_uid",
        }
    }
}

impl fmt::Display for HostSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HostSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        HostSource::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown host source {s:?}: use one of {}",
                    names(&HostSource::ALL)
                )
            })
    }
}

fn names<T: fmt::Display>(all: &[T]) -> String {
    all.iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Ports whose UDP or TCP payloads are checked for DNS: DNS, mDNS, LLMNR.
pub const DNS_PORTS: [u16; 3] = [53, 5353, 5355];

/// Shortest payload that can count as cleartext.
pub const CLEARTEXT_MIN_LEN: usize = 8;

/// The kind of a flow's first payload. `proto` is the IP protocol (6 TCP,
/// 17 UDP), `port` the destination port, `payload` the L4 payload as
/// captured. Checked in this order:
///
/// - TCP: a TLS record header -> `tls`; an HTTP/1.x request line -> `http`;
///   on a DNS port, a length-prefixed DNS message -> `dns`.
/// - UDP: on a DNS port, a DNS message -> `dns`; a QUIC long header of a
///   known version -> `quic`; an HTTP/1.x request line (SSDP) -> `http`.
/// - Any protocol: [`is_cleartext`] -> `cleartext`; else `unknown` (also
///   for an empty payload).
pub fn classify(proto: u8, port: u16, payload: &[u8]) -> Payload {
    if payload.is_empty() {
        return Payload::Unknown;
    }
    let dns_port = DNS_PORTS.contains(&port);
    match proto {
        PROTO_TCP => {
            if tls::is_record(payload) {
                return Payload::Tls;
            }
            if http::is_request(payload) {
                return Payload::Http;
            }
            if dns_port && dns::parse_tcp(payload).is_some_and(|m| plausible_dns(&m)) {
                return Payload::Dns;
            }
        }
        PROTO_UDP => {
            if dns_port && dns::parse(payload).is_some_and(|m| plausible_dns(&m)) {
                return Payload::Dns;
            }
            if quic::is_long_header(payload) {
                return Payload::Quic;
            }
            if http::is_request(payload) {
                return Payload::Http;
            }
        }
        _ => {}
    }
    if is_cleartext(payload) {
        Payload::Cleartext
    } else {
        Payload::Unknown
    }
}

/// A message with a question, or a response with answers (mDNS
/// announcements carry no question).
fn plausible_dns(m: &dns::Message) -> bool {
    !m.questions.is_empty() || (m.response && !m.answers.is_empty())
}

/// The cleartext rule: at least [`CLEARTEXT_MIN_LEN`] bytes, at least 90%
/// of them text, and at least 4 letters or digits. Text bytes are those of
/// printable characters in valid UTF-8 (ASCII 0x20-0x7e, tab, CR, LF, and
/// non-control multi-byte characters); a multi-byte character cut off by
/// the end of the capture counts as text.
pub fn is_cleartext(payload: &[u8]) -> bool {
    if payload.len() < CLEARTEXT_MIN_LEN {
        return false;
    }
    let mut text = 0usize;
    let mut alnum = 0usize;
    let mut count = |s: &str| {
        for c in s.chars() {
            if !c.is_control() || matches!(c, '\t' | '\n' | '\r') {
                text += c.len_utf8();
            }
            if c.is_alphanumeric() {
                alnum += 1;
            }
        }
    };
    let mut rest = payload;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                count(s);
                break;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                count(std::str::from_utf8(valid).unwrap_or_default());
                match e.error_len() {
                    Some(bad) => rest = &after[bad..],
                    None => {
                        text += after.len(); // a character cut off at the end
                        break;
                    }
                }
            }
        }
    }
    text * 10 >= payload.len() * 9 && alnum >= 4
}

/// The host a flow's first payload names: the server_name of a TLS
/// ClientHello (TCP) or a QUIC Initial (UDP) as `sni`, or the Host of an
/// HTTP request as `http`. `port` is accepted for symmetry with
/// [`classify`]; the payload alone decides.
pub fn host_from_payload(proto: u8, port: u16, payload: &[u8]) -> Option<(String, HostSource)> {
    let _ = port;
    let sni = match proto {
        PROTO_TCP => tls::sni(payload),
        PROTO_UDP => quic::sni(payload),
        _ => return None,
    };
    sni.map(|h| (h, HostSource::Sni))
        .or_else(|| http::host(payload).map(|h| (h, HostSource::Http)))
}

/// Normalises a host name from a ClientHello or a Host header: one
/// trailing dot dropped, lowercase, 1 to 253 bytes of letters, digits,
/// `-`, `_` and `.`, no empty label. None for anything else (control bytes,
/// spaces, non-ASCII: IDNs travel as punycode).
pub(crate) fn normalize_host(raw: &[u8]) -> Option<String> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    if raw.is_empty() || raw.len() > 253 {
        return None;
    }
    if raw.split(|&b| b == b'.').any(|label| label.is_empty()) {
        return None;
    }
    if !raw
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return None;
    }
    Some(String::from_utf8_lossy(raw).to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_and_host_source_serialize_as_the_contract_names() {
        for p in Payload::ALL {
            assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{p}\""));
            assert_eq!(p.as_str().parse::<Payload>(), Ok(p));
        }
        assert_eq!(
            Payload::ALL.map(Payload::as_str),
            ["tls", "quic", "http", "dns", "cleartext", "unknown"]
        );
        assert_eq!(
            HostSource::ALL.map(HostSource::as_str),
            ["sni", "http", "dns", "dns_other_uid"]
        );
        for s in HostSource::ALL {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
            assert_eq!(s.as_str().parse::<HostSource>(), Ok(s));
        }
        let err = "TLS".parse::<Payload>().unwrap_err();
        assert!(
            err.contains("tls, quic, http, dns, cleartext, unknown"),
            "{err}"
        );
        assert!("x".parse::<HostSource>().is_err());
        assert!(Payload::Http.is_cleartext() && Payload::Cleartext.is_cleartext());
        assert!(!Payload::Tls.is_cleartext());
    }

    #[test]
    fn classify_each_kind() {
        let tls = tls::build::records(&tls::build::typical("a.test", true), 16384);
        assert_eq!(classify(PROTO_TCP, 443, &tls), Payload::Tls);
        let quic = quic::build::initial(quic::VERSION_1, &[1; 8], &[0x01], 0);
        assert_eq!(classify(PROTO_UDP, 443, &quic), Payload::Quic);
        assert_eq!(classify(PROTO_UDP, 443, &quic[..512]), Payload::Quic);
        let http = b"POST /x HTTP/1.1\r\nHost: h.test\r\n\r\n";
        assert_eq!(classify(PROTO_TCP, 80, http), Payload::Http);
        assert_eq!(classify(PROTO_TCP, 8080, &http[..10]), Payload::Http);
        let query = dns::build::query(1, "example.com", dns::TYPE_A);
        assert_eq!(classify(PROTO_UDP, 53, &query), Payload::Dns);
        assert_eq!(
            classify(PROTO_TCP, 53, &dns::build::tcp(&query)),
            Payload::Dns
        );
        // The same bytes elsewhere are not DNS.
        assert_eq!(classify(PROTO_UDP, 4000, &query), Payload::Unknown);
        assert_eq!(
            classify(PROTO_TCP, 5000, b"imei=356938035643809&model=TA-1046"),
            Payload::Cleartext
        );
        assert_eq!(
            classify(PROTO_UDP, 9999, b"{\"event\":\"activate\"}"),
            Payload::Cleartext
        );
        assert_eq!(
            classify(
                PROTO_TCP,
                22,
                &[0x00, 0x01, 0x02, 0xff, 0x80, 0x90, 0x10, 0x20, 0x30]
            ),
            Payload::Unknown
        );
        assert_eq!(classify(PROTO_TCP, 80, b""), Payload::Unknown);
        assert_eq!(classify(1, 0, b"ping ping ping"), Payload::Cleartext);
    }

    #[test]
    fn cleartext_rule() {
        assert!(!is_cleartext(b"abcdefg"), "under 8 bytes");
        assert!(is_cleartext(b"abcdefgh"));
        assert!(!is_cleartext(b"........"), "needs letters or digits");
        assert!(is_cleartext("Grüße aus Köln, 你好".as_bytes()));
        // 9 text bytes of 10: 90% is enough; 8 of 10 is not.
        assert!(is_cleartext(b"abcdefghi\x00"));
        assert!(!is_cleartext(b"abcdefgh\x00\x00"));
        // A multi-byte character cut off at the end counts as text.
        let s = "données".as_bytes();
        let cut = &s[..s.len() - 3]; // ends inside 'é'
        assert!(is_cleartext(&[b"abcdefgh".as_slice(), cut].concat()));
        // C1 controls and invalid UTF-8 do not.
        assert!(!is_cleartext(&[0xc2, 0x80].repeat(8)));
        assert!(!is_cleartext(&[0xff; 16]));
    }

    #[test]
    fn host_from_each_payload() {
        let tls = tls::build::records(&tls::build::typical("Sni.Test", true), 16384);
        assert_eq!(
            host_from_payload(PROTO_TCP, 443, &tls),
            Some(("sni.test".into(), HostSource::Sni))
        );
        let quic = quic::build::initial(
            quic::VERSION_1,
            &[7; 8],
            &quic::build::crypto_frame(0, &tls::build::typical("quic.test", true)),
            0,
        );
        assert_eq!(
            host_from_payload(PROTO_UDP, 443, &quic),
            Some(("quic.test".into(), HostSource::Sni))
        );
        assert_eq!(
            host_from_payload(PROTO_TCP, 80, b"GET / HTTP/1.1\r\nHost: web.test\r\n\r\n"),
            Some(("web.test".into(), HostSource::Http))
        );
        assert_eq!(host_from_payload(PROTO_TCP, 80, b"hello there"), None);
        assert_eq!(host_from_payload(1, 0, &tls), None);
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(
            normalize_host(b"WWW.Example.com.").as_deref(),
            Some("www.example.com")
        );
        assert_eq!(
            normalize_host(b"_srv.x-y.test").as_deref(),
            Some("_srv.x-y.test")
        );
        for bad in [
            &b""[..],
            b".",
            b"a..b",
            b".a",
            b"a b",
            b"a\x00",
            b"caf\xc3\xa9",
        ] {
            assert_eq!(normalize_host(bad), None, "{bad:?}");
        }
        assert_eq!(normalize_host(&[b'a'; 254]), None);
    }
}
