//! Percent-encoding of the names egressmon passes around as text: a block
//! rule's name in a control-socket query, and a pin directory in the name
//! of its state files. Every byte but ASCII letters, digits, `.`, `_` and
//! `-` becomes `%XX`, so a name never carries a `/`, `&` or `=`, and two
//! different names never encode alike.

use percent_encoding::{percent_decode, percent_encode, AsciiSet, NON_ALPHANUMERIC};

const ESCAPED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'.').remove(b'_').remove(b'-');

/// `bytes` with every byte outside the kept set as `%XX`.
pub(crate) fn encode(bytes: &[u8]) -> String {
    percent_encode(bytes, ESCAPED).to_string()
}

/// The bytes `encode` made `text` of.
pub(crate) fn decode(text: &str) -> Vec<u8> {
    percent_decode(text.as_bytes()).collect()
}

/// A query value: `%XX` escapes, and `+` for a space as HTML forms send it.
pub(crate) fn decode_query_value(text: &str) -> String {
    String::from_utf8_lossy(&decode(&text.replace('+', " "))).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_survive_the_round_trip_and_keep_only_safe_bytes() {
        for name in ["/sys/fs/bpf/egressmon", "cn activation/ü&x+100% done", ""] {
            let encoded = encode(name.as_bytes());
            assert!(encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-%".contains(&b)));
            assert_eq!(decode(&encoded), name.as_bytes());
            assert_eq!(decode_query_value(&encoded), name);
        }
        assert_eq!(encode(b"/x/y"), "%2Fx%2Fy");
        assert_eq!(decode_query_value("a+b%20c"), "a b c");
    }
}
