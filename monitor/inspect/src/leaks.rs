//! Device identifiers in payload bytes, in whatever form an app sent them.
//!
//! Owns: [`Matcher`], which turns each identifier's value (an IMEI, a MAC
//! address, a serial, a machine-id, ...) into every byte pattern it is
//! likely to travel as, builds one Aho-Corasick automaton over the patterns
//! of all identifiers, and reports each (identifier, [`Form`]) present in a
//! payload. One pass over the bytes, whatever the number of identifiers:
//! time is linear in the payload's length.
//!
//! The patterns of a value V (its text trimmed of surrounding whitespace):
//!
//! - `plain`: V itself; when V is hex digits or a MAC address, also its
//!   lower- and upper-case spellings.
//! - `hex`: the hex of V's bytes, lower and upper case. A value that is hex
//!   already (only hex digits, at least one of them a letter, as a
//!   machine-id) has none: its hex is its plain text. A MAC address (six
//!   pairs separated by `:` or `-`, or 12 hex digits with a letter among
//!   them) is hex already; its `hex` patterns are its six bytes spelled with
//!   `:`, `-` or no separator, in either case, other than the plain ones.
//!   12 decimal digits are taken for a number, not a MAC.
//! - `base64`: V inside a longer base64 text, standard or URL-safe alphabet,
//!   padded or not. Where V starts in the encoded data shifts its bits, so
//!   one pattern per alignment (0, 1 or 2 bytes before V in its group of
//!   three), each the run of characters all of whose bits come from V.
//! - `urlencoded`: V with every byte but the unreserved ones of RFC 3986
//!   (2.3) as `%XX`, upper or lower case, and the form encoding that writes
//!   a space as `+`; only where that differs from V.
//! - `md5`, `sha1`, `sha256`: the hex digest of V's bytes, lower and upper
//!   case.
//!
//! Short patterns match by chance: a value under [`MIN_VALUE_LEN`] bytes is
//! skipped (and named back to the caller), and a base64 pattern under
//! [`MIN_BASE64_LEN`] characters is dropped, which leaves a 6-byte value
//! found in base64 only at alignment 0. Matching is on raw bytes and
//! case-sensitive; the case variants above are patterns of their own.
//! Nothing here panics.

use aho_corasick::{AhoCorasick, MatchKind};
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;
use md5::Md5;
use serde::{Deserialize, Serialize};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;

/// Shortest identifier value (bytes, after trimming) that is matched.
pub const MIN_VALUE_LEN: usize = 6;
/// Shortest base64 pattern (characters) that is kept.
pub const MIN_BASE64_LEN: usize = 8;

/// How an identifier's value appeared in the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Form {
    Plain,
    Hex,
    Base64,
    Urlencoded,
    Md5,
    Sha1,
    Sha256,
}

impl Form {
    pub const ALL: [Form; 7] = [
        Form::Plain,
        Form::Hex,
        Form::Base64,
        Form::Urlencoded,
        Form::Md5,
        Form::Sha1,
        Form::Sha256,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Form::Plain => "plain",
            Form::Hex => "hex",
            Form::Base64 => "base64",
            Form::Urlencoded => "urlencoded",
            Form::Md5 => "md5",
            Form::Sha1 => "sha1",
            Form::Sha256 => "sha256",
        }
    }
}

impl fmt::Display for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One identifier found: its index in the list given to [`Matcher::new`],
/// and the form it was in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Found {
    pub identifier: usize,
    pub form: Form,
}

/// The patterns of a list of identifiers, ready to search payloads.
#[derive(Debug, Clone)]
pub struct Matcher {
    /// None when no identifier gave a pattern.
    automaton: Option<AhoCorasick>,
    /// By pattern id: whom the pattern stands for, sorted and deduplicated.
    /// Identical bytes from two identifiers or forms are one pattern with
    /// two owners, since the automaton reports a pattern only once.
    owners: Vec<Vec<Found>>,
}

impl Matcher {
    /// A matcher for `identifiers`, (name, value) pairs, and the names of
    /// those skipped because their value is too short to match safely
    /// (under [`MIN_VALUE_LEN`] bytes once trimmed). Should the automaton
    /// be too large to build, the matcher is empty and every name is
    /// returned.
    pub fn new(identifiers: &[(String, String)]) -> (Matcher, Vec<String>) {
        let mut ids: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        let mut owners: Vec<Vec<Found>> = Vec::new();
        let mut skipped = Vec::new();
        for (identifier, (name, value)) in identifiers.iter().enumerate() {
            let value = value.trim().as_bytes();
            if value.len() < MIN_VALUE_LEN {
                skipped.push(name.clone());
                continue;
            }
            for (form, pattern) in patterns_of(value) {
                let id = *ids.entry(pattern).or_insert_with_key(|p| {
                    patterns.push(p.clone());
                    owners.push(Vec::new());
                    patterns.len() - 1
                });
                owners[id].push(Found { identifier, form });
            }
        }
        for list in &mut owners {
            list.sort_unstable();
            list.dedup();
        }
        if patterns.is_empty() {
            return (Matcher::none(), skipped);
        }
        // Standard semantics: the only kind that reports overlapping
        // matches, so a pattern inside another is found too.
        match AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .build(&patterns)
        {
            Ok(automaton) => (
                Matcher {
                    automaton: Some(automaton),
                    owners,
                },
                skipped,
            ),
            // Only an automaton too large for its state ids fails to
            // build: then nothing is matched, and every name says so.
            Err(_) => (
                Matcher::none(),
                identifiers.iter().map(|(name, _)| name.clone()).collect(),
            ),
        }
    }

    fn none() -> Matcher {
        Matcher {
            automaton: None,
            owners: Vec::new(),
        }
    }

    /// Whether there is nothing to look for.
    pub fn is_empty(&self) -> bool {
        self.automaton.is_none()
    }

    /// Every (identifier, form) present anywhere in `bytes`, sorted and
    /// deduplicated. One pass over the bytes.
    pub fn find(&self, bytes: &[u8]) -> Vec<Found> {
        let Some(automaton) = &self.automaton else {
            return Vec::new();
        };
        // Fails only for leftmost match kinds, which `new` never builds.
        let Ok(matches) = automaton.try_find_overlapping_iter(bytes) else {
            return Vec::new();
        };
        let mut seen = vec![false; self.owners.len()];
        for m in matches {
            if let Some(s) = seen.get_mut(m.pattern().as_usize()) {
                *s = true;
            }
        }
        let mut found: Vec<Found> = seen
            .iter()
            .zip(&self.owners)
            .filter(|(seen, _)| **seen)
            .flat_map(|(_, owners)| owners.iter().copied())
            .collect();
        found.sort_unstable();
        found.dedup();
        found
    }
}

/// Every (form, pattern) of a value (trimmed, at least MIN_VALUE_LEN
/// bytes). Repeats are harmless: `Matcher::new` merges them.
fn patterns_of(value: &[u8]) -> Vec<(Form, Vec<u8>)> {
    let mut out = Vec::new();
    let mac = mac_address(value);
    let plain = if mac.is_some() || value.iter().all(u8::is_ascii_hexdigit) {
        vec![
            value.to_vec(),
            value.to_ascii_lowercase(),
            value.to_ascii_uppercase(),
        ]
    } else {
        vec![value.to_vec()]
    };
    match mac {
        Some(bytes) => {
            for sep in ["", ":", "-"] {
                for upper in [false, true] {
                    let text = join_hex(&bytes, sep, upper);
                    if !plain.contains(&text) {
                        out.push((Form::Hex, text));
                    }
                }
            }
        }
        None if !is_hex_already(value) => {
            out.push((Form::Hex, join_hex(value, "", false)));
            out.push((Form::Hex, join_hex(value, "", true)));
        }
        None => {}
    }
    out.extend(plain.into_iter().map(|p| (Form::Plain, p)));
    out.extend(base64_runs(value).into_iter().map(|p| (Form::Base64, p)));
    for plus in [false, true] {
        for upper in [false, true] {
            let encoded = percent_encode(value, upper, plus);
            if encoded != value {
                out.push((Form::Urlencoded, encoded));
            }
        }
    }
    for (form, digest) in [
        (Form::Md5, Md5::digest(value).to_vec()),
        (Form::Sha1, Sha1::digest(value).to_vec()),
        (Form::Sha256, Sha256::digest(value).to_vec()),
    ] {
        out.push((form, join_hex(&digest, "", false)));
        out.push((form, join_hex(&digest, "", true)));
    }
    out
}

/// Only hex digits, and at least one letter among them: a decimal number
/// is not hex already (its hex is that of its digits' text).
fn is_hex_already(value: &[u8]) -> bool {
    value.iter().all(u8::is_ascii_hexdigit) && value.iter().any(u8::is_ascii_alphabetic)
}

/// The six bytes of a MAC address written `xx:xx:xx:xx:xx:xx`,
/// `xx-xx-xx-xx-xx-xx`, or as 12 hex digits that are hex already.
fn mac_address(value: &[u8]) -> Option<[u8; 6]> {
    let digits: Vec<u8> = match value.len() {
        17 => {
            let sep = *value.get(2).filter(|s| matches!(s, b':' | b'-'))?;
            let mut digits = Vec::with_capacity(12);
            for (i, pair) in value.chunks(3).enumerate() {
                if i < 5 && pair.get(2) != Some(&sep) {
                    return None;
                }
                digits.extend(pair.iter().take(2));
            }
            digits
        }
        12 if is_hex_already(value) => value.to_vec(),
        _ => return None,
    };
    let mut bytes = [0u8; 6];
    for (byte, pair) in bytes.iter_mut().zip(digits.chunks(2)) {
        let &[hi, lo] = pair else {
            return None;
        };
        *byte = (nibble(hi)? << 4) | nibble(lo)?;
    }
    Some(bytes)
}

fn nibble(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// `bytes` as hex digits, `sep` between bytes.
fn join_hex(bytes: &[u8], sep: &str, upper: bool) -> Vec<u8> {
    let digits: &[u8; 16] = if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    };
    let mut out = Vec::with_capacity(bytes.len() * (2 + sep.len()));
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(sep.as_bytes());
        }
        out.push(digits[usize::from(b >> 4)]);
        out.push(digits[usize::from(b & 0x0f)]);
    }
    out
}

/// The base64 runs that stand for `value` wherever it lies in a longer
/// encoded text. With k unknown bytes before it in its group of three
/// (k = 0, 1, 2), the characters that hold bits of those bytes (the first
/// 0, 2 or 3) and the last one when it also holds bits of the byte after
/// are dropped; what is left is the same whatever surrounds the value.
/// Runs under MIN_BASE64_LEN are dropped; URL-safe spellings are added
/// where they differ.
fn base64_runs(value: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for k in 0..3usize {
        let mut data = vec![0u8; k];
        data.extend_from_slice(value);
        let first = (8 * k).div_ceil(6);
        let end = 8 * data.len() / 6;
        for engine in [STANDARD_NO_PAD, URL_SAFE_NO_PAD] {
            let encoded = engine.encode(&data);
            let Some(run) = encoded.as_bytes().get(first..end) else {
                continue;
            };
            if run.len() >= MIN_BASE64_LEN && !out.iter().any(|o: &Vec<u8>| o == run) {
                out.push(run.to_vec());
            }
        }
    }
    out
}

/// RFC 3986 percent-encoding of everything but the unreserved characters
/// (2.3), with `%XX` in upper or lower case; `plus` writes a space as `+`
/// (HTML form encoding).
fn percent_encode(value: &[u8], upper: bool, plus: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() * 3);
    for &b in value {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else if plus && b == b' ' {
            out.push(b'+');
        } else {
            out.push(b'%');
            out.extend(join_hex(&[b], "", upper));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};

    fn ids(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn one(value: &str) -> Matcher {
        let (m, skipped) = Matcher::new(&ids(&[("id", value)]));
        assert!(skipped.is_empty());
        m
    }

    /// The forms found for identifier 0.
    fn forms(m: &Matcher, bytes: &[u8]) -> Vec<Form> {
        m.find(bytes)
            .into_iter()
            .map(|f| {
                assert_eq!(f.identifier, 0);
                f.form
            })
            .collect()
    }

    const IMEI: &str = "356938035643809";
    const NONE: [Form; 0] = [];
    const NOTHING: [Found; 0] = [];

    #[test]
    fn forms_serialize_as_their_names() {
        assert_eq!(
            Form::ALL.map(Form::as_str),
            [
                "plain",
                "hex",
                "base64",
                "urlencoded",
                "md5",
                "sha1",
                "sha256"
            ]
        );
        for f in Form::ALL {
            assert_eq!(serde_json::to_string(&f).unwrap(), format!("\"{f}\""));
        }
    }

    #[test]
    fn imei_plain_and_hex() {
        let m = one(IMEI);
        assert!(!m.is_empty());
        assert_eq!(forms(&m, b"imei=356938035643809&x=1"), [Form::Plain]);
        // The hex of the digits' text; decimal digits have no case.
        assert_eq!(
            forms(&m, b"id=333536393338303335363433383039;"),
            [Form::Hex]
        );
        // A prefix of the value is not the value.
        assert_eq!(forms(&m, b"35693803564380"), NONE);
    }

    #[test]
    fn imei_base64_at_every_alignment() {
        let m = one(IMEI);
        // Known encodings (Python's base64.b64encode) of the IMEI with 0, 1
        // and 2 bytes before it and some after: unpadded, padded twice,
        // padded once.
        for text in [
            "MzU2OTM4MDM1NjQzODA5eXo=",
            "MzU2OTM4MDM1NjQzODA5",
            "eDM1NjkzODAzNTY0MzgwOXl6",
            "eDM1NjkzODAzNTY0MzgwOQ==",
            "eHkzNTY5MzgwMzU2NDM4MDl5eg==",
            "eHkzNTY5MzgwMzU2NDM4MDk=",
        ] {
            assert_eq!(forms(&m, text.as_bytes()), [Form::Base64], "{text}");
        }
        // Inside a longer base64 run, at every offset, whatever follows.
        for before in ["", "a", "ab", "abc", "abcd"] {
            for after in ["", "z", "yz", "\u{ff}\u{fe}"] {
                let data = format!("{before}{IMEI}{after}");
                for engine in [STANDARD, URL_SAFE, STANDARD_NO_PAD] {
                    let body = format!("{{\"d\":\"{}\"}}", engine.encode(&data));
                    assert_eq!(forms(&m, body.as_bytes()), [Form::Base64], "{body}");
                }
            }
        }
    }

    #[test]
    fn url_safe_base64_differs_and_is_found() {
        let value = "Jörg’s Pixel 7";
        let m = one(value);
        let data = format!("xy{value}!");
        let standard = STANDARD.encode(&data);
        let url = URL_SAFE.encode(&data);
        assert_eq!(standard, "eHlKw7ZyZ+KAmXMgUGl4ZWwgNyE=");
        assert_eq!(url, "eHlKw7ZyZ-KAmXMgUGl4ZWwgNyE=");
        assert_eq!(forms(&m, standard.as_bytes()), [Form::Base64]);
        assert_eq!(forms(&m, url.as_bytes()), [Form::Base64]);
        assert_eq!(forms(&m, value.as_bytes()), [Form::Plain]);
    }

    #[test]
    fn imei_digests_lower_and_upper() {
        let m = one(IMEI);
        // From md5sum, sha1sum and sha256sum of the IMEI's 15 bytes.
        let md5 = "af2d48f2495881aed1737bb21017f9b6";
        let sha1 = "31f455635a12252f8cedb39cd7533fc58a064bff";
        let sha256 = "a1b575e0d3dabdc93f3c6190a239b5420f65d13601dcf1eee2bbd4f6a6168111";
        for (digest, form) in [(md5, Form::Md5), (sha1, Form::Sha1), (sha256, Form::Sha256)] {
            let lower = format!("h={digest}&");
            assert_eq!(forms(&m, lower.as_bytes()), [form]);
            let upper = lower.to_ascii_uppercase();
            assert_eq!(forms(&m, upper.as_bytes()), [form]);
        }
        let all = format!("{IMEI} {md5} {} {sha256}", sha1.to_ascii_uppercase());
        assert_eq!(
            forms(&m, all.as_bytes()),
            [Form::Plain, Form::Md5, Form::Sha1, Form::Sha256]
        );
    }

    #[test]
    fn phone_number_urlencoded() {
        let m = one("  +49 170 1234567\n");
        for text in [
            "tel=%2B49%20170%201234567",
            "tel=%2b49%20170%201234567",
            "tel=%2B49+170+1234567&x",
            "tel=%2b49+170+1234567",
        ] {
            assert_eq!(forms(&m, text.as_bytes()), [Form::Urlencoded], "{text}");
        }
        assert_eq!(forms(&m, b"tel=+49 170 1234567"), [Form::Plain]);
        // Hex of its text (trimmed), as for any value not hex already.
        assert_eq!(forms(&m, b"2b3439203137302031323334353637"), [Form::Hex]);
        assert_eq!(forms(&m, b"<2B3439203137302031323334353637>"), [Form::Hex]);
        assert_eq!(forms(&m, b"2b343920313730203132333435363"), NONE);
    }

    #[test]
    fn machine_id_is_plain_in_either_case_and_has_no_hex_form() {
        let id = "4c3a1b2e9f8d4e6a8b7c6d5e4f3a2b1c";
        let m = one(id);
        assert_eq!(forms(&m, id.as_bytes()), [Form::Plain]);
        assert_eq!(forms(&m, id.to_ascii_uppercase().as_bytes()), [Form::Plain]);
        let hex_of_text = join_hex(id.as_bytes(), "", false);
        assert_eq!(forms(&m, &hex_of_text), NONE);
        assert!(patterns_of(id.as_bytes())
            .iter()
            .all(|(form, _)| *form != Form::Hex));
    }

    #[test]
    fn mac_address_spellings() {
        let m = one("02:42:ac:11:00:02");
        assert_eq!(forms(&m, b"mac=02:42:ac:11:00:02"), [Form::Plain]);
        assert_eq!(forms(&m, b"mac=02:42:AC:11:00:02"), [Form::Plain]);
        assert_eq!(forms(&m, b"mac=0242ac110002"), [Form::Hex]);
        assert_eq!(forms(&m, b"mac=02-42-AC-11-00-02"), [Form::Hex]);
        assert_eq!(forms(&m, b"mac=0242AC110002&"), [Form::Hex]);
        assert_eq!(
            forms(&m, b"mac=02%3A42%3Aac%3A11%3A00%3A02"),
            [Form::Urlencoded]
        );
        // No hex of the text: a MAC is hex already.
        assert_eq!(forms(&m, &join_hex(b"02:42:ac:11:00:02", "", false)), NONE);
        // Written bare, its separated spellings are hex.
        let bare = one("0242AC110002");
        assert_eq!(forms(&bare, b"0242ac110002"), [Form::Plain]);
        assert_eq!(forms(&bare, b"02:42:ac:11:00:02"), [Form::Hex]);
        // Not MACs: mixed separators, 12 decimal digits.
        assert_eq!(mac_address(b"02:42-ac:11:00:02"), None);
        assert_eq!(mac_address(b"024211000200"), None);
        assert_eq!(mac_address(b"02:42:ac:11:00:0g"), None);
        assert_eq!(
            mac_address(b"0242AC110002"),
            Some([2, 0x42, 0xac, 0x11, 0, 2])
        );
    }

    #[test]
    fn clean_payload_and_short_values() {
        let (m, skipped) = Matcher::new(&ids(&[
            ("imei", IMEI),
            ("pin", "12345"),
            ("blank", "   "),
            ("serial", "R58M12ABCDE"),
        ]));
        assert_eq!(skipped, ["pin", "blank"]);
        assert!(!m.is_empty());
        assert_eq!(
            m.find(b"POST /v1/ping HTTP/1.1\r\nHost: a.test\r\n\r\n{\"ok\":true}"),
            NOTHING
        );
        assert_eq!(m.find(b""), NOTHING);
        // A skipped value is not looked for; indices stay those of the list.
        assert_eq!(
            m.find(b"pin=12345 serial=R58M12ABCDE"),
            [Found {
                identifier: 3,
                form: Form::Plain
            }]
        );
        let (empty, skipped) = Matcher::new(&ids(&[("pin", "1234")]));
        assert!(empty.is_empty());
        assert_eq!(skipped, ["pin"]);
        assert_eq!(empty.find(b"1234"), NOTHING);
        assert!(Matcher::new(&[]).0.is_empty());
    }

    #[test]
    fn several_identifiers_overlapping_all_reported_sorted_once() {
        let (m, _) = Matcher::new(&ids(&[
            ("serial", "R58M12ABCDE"),
            ("imei", IMEI),
            ("imei_prefix", "35693803"),
            ("mac", "02:42:ac:11:00:02"),
        ]));
        let body = format!(
            "mac=0242ac110002&imei={IMEI}&again={IMEI}&s=R58M12ABCDE&b={}",
            STANDARD.encode(IMEI)
        );
        let f = |identifier, form| Found { identifier, form };
        assert_eq!(
            m.find(body.as_bytes()),
            [
                f(0, Form::Plain),
                f(1, Form::Plain),
                f(1, Form::Base64),
                f(2, Form::Plain),
                f(2, Form::Base64),
                f(3, Form::Hex),
            ]
        );
    }

    #[test]
    fn identical_patterns_keep_every_owner() {
        // The hex of one value's text is the other value.
        let (m, _) = Matcher::new(&ids(&[("a", "id-0242ac"), ("b", "69642d303234326163")]));
        assert_eq!(join_hex(b"id-0242ac", "", false), b"69642d303234326163");
        assert_eq!(
            m.find(b"69642d303234326163"),
            [
                Found {
                    identifier: 0,
                    form: Form::Hex
                },
                Found {
                    identifier: 1,
                    form: Form::Plain
                }
            ]
        );
        let (twice, _) = Matcher::new(&ids(&[("x", IMEI), ("y", IMEI)]));
        assert_eq!(
            twice.find(IMEI.as_bytes()),
            [
                Found {
                    identifier: 0,
                    form: Form::Plain
                },
                Found {
                    identifier: 1,
                    form: Form::Plain
                }
            ]
        );
    }

    #[test]
    fn serial_unpadded_base64_in_json() {
        let m = one("R58M12ABCDE");
        // base64 of {"serial":"R58M12ABCDE","os":"14"} without padding.
        let json = r#"{"serial":"R58M12ABCDE","os":"14"}"#;
        assert!(STANDARD.encode(json).ends_with('='), "padding left out");
        let inner = STANDARD_NO_PAD.encode(json);
        let body = format!(r#"{{"v":2,"blob":"{inner}"}}"#);
        assert_eq!(forms(&m, body.as_bytes()), [Form::Base64]);
        // Known encoding at alignment 1: "x" + serial.
        assert_eq!(forms(&m, b"\"eFI1OE0xMkFCQ0RF\""), [Form::Base64]);
    }

    #[test]
    fn short_base64_runs_are_dropped() {
        // Six bytes: 8 characters at alignment 0, 7 at the others.
        let runs = base64_runs(b"abcdef");
        assert_eq!(runs, [b"YWJjZGVm".to_vec()]);
        assert_eq!(base64_runs(b"abcdefg").len(), 3);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let (m, _) = Matcher::new(&ids(&[("imei", IMEI), ("odd", "\u{0}\u{ff}\u{7f}xyz")]));
        let mut data = Vec::new();
        for i in 0..2048u32 {
            data.push((i.wrapping_mul(2_654_435_761) >> 24) as u8);
        }
        for end in [0, 1, 7, 511, 2048] {
            let _ = m.find(&data[..end]);
        }
    }
}
