//! Device identifiers in what flows sent: follows the payload of readable
//! flows (HTTP, other cleartext, DNS) through their first
//! [`EVIDENCE_BYTES`], as the kernel hands it over in slices, and names each
//! identifier found with its form (`imei:sha256`, `machine_id:plain`).
//!
//! Only names leave this module, never values. Encrypted flows (TLS, QUIC)
//! are not searched: what they carry is not readable on the path, and the
//! kernel stops copying them after their first packet.

use inspect::leaks::{Form, Matcher};
use inspect::Payload;
use monitor_common::{FlowKey, EVIDENCE_BYTES};
use std::collections::HashMap;

/// Flows followed at once; beyond it new flows are not searched (counted).
const MAX_STREAMS: usize = 4096;

/// The end of a flow's payload seen so far, so that a value split across
/// two slices is still found.
struct Stream {
    next_at: u32,
    tail: Vec<u8>,
}

pub(crate) struct Evidence {
    matcher: Matcher,
    /// Identifier names, by the matcher's index.
    names: Vec<String>,
    /// Bytes kept between slices: the longest pattern, less one.
    overlap: usize,
    streams: HashMap<FlowKey, Stream, foldhash::fast::RandomState>,
    /// Slices not searched because too many flows were followed at once.
    pub(crate) skipped: u64,
}

impl Evidence {
    /// A search for `identifiers` ((name, value) pairs); also returns the
    /// names whose values are too short to search for safely.
    pub(crate) fn new(identifiers: &[(String, String)]) -> (Evidence, Vec<String>) {
        let (matcher, too_short) = Matcher::new(identifiers);
        let longest = identifiers
            .iter()
            .map(|(_, value)| value.len())
            .max()
            .unwrap_or(0);
        // Percent-encoding triples a value; a SHA-256 digest is 64 digits.
        let overlap = (3 * longest).max(64);
        let evidence = Evidence {
            matcher,
            names: identifiers.iter().map(|(name, _)| name.clone()).collect(),
            overlap,
            streams: HashMap::default(),
            skipped: 0,
        };
        (evidence, too_short)
    }

    pub(crate) fn empty() -> Evidence {
        Evidence::new(&[]).0
    }

    /// The identifiers (`NAME:FORM`) in one slice of a flow's payload that
    /// starts `at` bytes into it. `payload` is the flow's class, from its
    /// first slice.
    pub(crate) fn search(
        &mut self,
        key: &FlowKey,
        payload: Payload,
        at: u32,
        data: &[u8],
    ) -> Vec<String> {
        if self.matcher.is_empty() || at >= EVIDENCE_BYTES {
            return Vec::new();
        }
        let data = &data[..data.len().min((EVIDENCE_BYTES - at) as usize)];
        match payload {
            Payload::Dns => self.search_dns(key, data),
            Payload::Http | Payload::Cleartext => self.search_stream(key, at, data),
            _ => {
                self.streams.remove(key);
                Vec::new()
            }
        }
    }

    /// A DNS query: its raw bytes (a value inside one label) and its
    /// question names as text, with and without their dots (a long value
    /// is split over labels of at most 63 bytes).
    fn search_dns(&self, key: &FlowKey, data: &[u8]) -> Vec<String> {
        let mut found = self.matcher.find(data);
        if let Some(message) = inspect::dns::parse_payload(key.proto, data) {
            for question in &message.questions {
                found.extend(self.matcher.find(question.name.as_bytes()));
                let joined = question.name.replace('.', "");
                found.extend(self.matcher.find(joined.as_bytes()));
            }
        }
        self.named(found)
    }

    /// One slice of a byte stream, searched with the end of the slices
    /// before it.
    fn search_stream(&mut self, key: &FlowKey, at: u32, data: &[u8]) -> Vec<String> {
        if at != 0 && !self.streams.contains_key(key) && self.streams.len() >= MAX_STREAMS {
            self.skipped += 1;
            return Vec::new();
        }
        let stream = self.streams.entry(*key).or_insert(Stream {
            next_at: at,
            tail: Vec::new(),
        });
        if at != stream.next_at {
            // A slice lost to a full ring, or sent twice: start afresh.
            stream.tail.clear();
        }
        let mut window = std::mem::take(&mut stream.tail);
        window.extend_from_slice(data);
        let found = self.matcher.find(&window);
        let next_at = at + data.len() as u32;
        if next_at >= EVIDENCE_BYTES || data.is_empty() {
            self.streams.remove(key);
        } else {
            let keep = window.len().saturating_sub(self.overlap);
            window.drain(..keep);
            let stream = self.streams.get_mut(key).expect("inserted above");
            stream.tail = window;
            stream.next_at = next_at;
        }
        self.named(found)
    }

    fn named(&self, found: Vec<inspect::leaks::Found>) -> Vec<String> {
        let mut leaks: Vec<String> = found
            .into_iter()
            .filter_map(|f| Some(leak_name(self.names.get(f.identifier)?, f.form)))
            .collect();
        leaks.sort();
        leaks.dedup();
        leaks
    }

    /// Forgets flows the kernel no longer holds.
    pub(crate) fn retain_live(&mut self, live: &dyn Fn(&FlowKey) -> bool) {
        self.streams.retain(|key, _| live(key));
    }
}

/// The contract's `NAME:FORM`.
pub(crate) fn leak_name(identifier: &str, form: Form) -> String {
    format!("{identifier}:{}", form.as_str())
}

/// Splits `NAME:FORM` (a leak as flows carry it) into its two parts.
pub(crate) fn split_leak(leak: &str) -> (&str, &str) {
    leak.rsplit_once(':').unwrap_or((leak, ""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use monitor_common::{FAMILY_IPV4, PROTO_TCP};

    fn key() -> FlowKey {
        FlowKey {
            uid: 1000,
            port: 80,
            proto: PROTO_TCP,
            family: FAMILY_IPV4,
            addr: [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    fn evidence() -> Evidence {
        let ids = [
            ("imei".to_string(), "356938035643809".to_string()),
            ("serial".to_string(), "R58M12ABCDE".to_string()),
        ];
        Evidence::new(&ids).0
    }

    #[test]
    fn a_value_split_across_slices_is_found() {
        let mut e = evidence();
        let first = b"POST /a HTTP/1.1\r\n\r\nimei=3569380";
        assert!(e.search(&key(), Payload::Http, 0, first).is_empty());
        let second = b"35643809&x=1";
        assert_eq!(
            e.search(&key(), Payload::Http, first.len() as u32, second),
            vec!["imei:plain".to_string()]
        );
    }

    #[test]
    fn a_gap_starts_afresh_and_encrypted_flows_are_not_searched() {
        let mut e = evidence();
        assert!(e
            .search(&key(), Payload::Http, 0, b"imei=3569380")
            .is_empty());
        assert!(e.search(&key(), Payload::Http, 100, b"35643809").is_empty());
        assert!(e
            .search(&key(), Payload::Tls, 0, b"356938035643809")
            .is_empty());
    }

    #[test]
    fn bytes_past_the_evidence_window_are_not_searched() {
        let mut e = evidence();
        let at = EVIDENCE_BYTES - 4;
        assert!(e
            .search(&key(), Payload::Cleartext, at, b"356938035643809")
            .is_empty());
    }

    /// A DNS query for `name` (one question, type A).
    fn dns_query(name: &str) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    }

    #[test]
    fn dns_query_names_are_searched_within_and_across_labels() {
        let mut e = evidence();
        let dns = FlowKey {
            port: 53,
            proto: monitor_common::PROTO_UDP,
            ..key()
        };
        // In one label, and split over two ("3569380.35643809").
        let one = dns_query("356938035643809.t.example.net");
        assert_eq!(e.search(&dns, Payload::Dns, 0, &one), ["imei:plain"]);
        let split = dns_query("3569380.35643809.t.example.net");
        assert_eq!(e.search(&dns, Payload::Dns, 64, &split), ["imei:plain"]);
        let clean = dns_query("www.example.net");
        assert!(e.search(&dns, Payload::Dns, 0, &clean).is_empty());
    }

    #[test]
    fn leak_names_split_back() {
        assert_eq!(leak_name("imei", Form::Sha256), "imei:sha256");
        assert_eq!(split_leak("imei:sha256"), ("imei", "sha256"));
    }
}
