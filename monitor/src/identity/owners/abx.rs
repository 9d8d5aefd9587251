//! Android Binary XML (ABX): the format Android 12+ writes packages.xml in.
//!
//! Written from the format as AOSP defines it in frameworks/base
//! core/java/com/android/internal/util/BinaryXmlSerializer.java and
//! BinaryXmlPullParser.java, with their FastDataOutput/FastDataInput:
//!
//! - the file starts with the magic `ABX` and a version byte 0;
//! - then one event per token byte: the low nibble is the XmlPullParser
//!   token (0 START_DOCUMENT, 1 END_DOCUMENT, 2 START_TAG, 3 END_TAG, 4 TEXT,
//!   5 CDSECT, 6 ENTITY_REF, 7 IGNORABLE_WHITESPACE, 8
//!   PROCESSING_INSTRUCTION, 9 COMMENT, 10 DOCDECL, and 15 for an attribute
//!   of the last start tag), the high nibble a data type (1 null, 2 string,
//!   3 interned string, 4 bytes as hex, 5 bytes as base64, 6 int, 7 int
//!   hex, 8 long, 9 long hex, 10 float, 11 double, 12 true, 13 false);
//! - numbers are big-endian; a string is a u16 byte length and that many
//!   bytes of Java's modified UTF-8; an interned string is a u16 index into
//!   the strings seen so far, or 0xFFFF followed by a new string, which then
//!   gets the next index (tag names, attribute names and interned values
//!   share one table);
//! - tag names are interned strings; text-like tokens carry a string or,
//!   with type null, nothing.
//!
//! Damaged input (truncated, unknown token or type, a reference to a string
//! not yet defined, an end tag that does not close the open element) gives
//! an [`AbxError`] with the byte offset and what was expected; the reader
//! never panics.

use std::fmt;

pub(crate) const MAGIC: [u8; 4] = *b"ABX\0";

pub(crate) const START_DOCUMENT: u8 = 0;
pub(crate) const END_DOCUMENT: u8 = 1;
pub(crate) const START_TAG: u8 = 2;
pub(crate) const END_TAG: u8 = 3;
pub(crate) const TEXT: u8 = 4;
pub(crate) const DOCDECL: u8 = 10;
pub(crate) const ATTRIBUTE: u8 = 15;

pub(crate) const TYPE_NULL: u8 = 1 << 4;
pub(crate) const TYPE_STRING: u8 = 2 << 4;
pub(crate) const TYPE_STRING_INTERNED: u8 = 3 << 4;
pub(crate) const TYPE_BYTES_HEX: u8 = 4 << 4;
pub(crate) const TYPE_BYTES_BASE64: u8 = 5 << 4;
pub(crate) const TYPE_INT: u8 = 6 << 4;
pub(crate) const TYPE_INT_HEX: u8 = 7 << 4;
pub(crate) const TYPE_LONG: u8 = 8 << 4;
pub(crate) const TYPE_LONG_HEX: u8 = 9 << 4;
pub(crate) const TYPE_FLOAT: u8 = 10 << 4;
pub(crate) const TYPE_DOUBLE: u8 = 11 << 4;
pub(crate) const TYPE_BOOLEAN_TRUE: u8 = 12 << 4;
pub(crate) const TYPE_BOOLEAN_FALSE: u8 = 13 << 4;

/// The interned-string marker: "a new string follows".
const NEW_STRING: u16 = 0xFFFF;

/// A typed attribute value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    String(String),
    InternedString(String),
    BytesHex(Vec<u8>),
    BytesBase64(Vec<u8>),
    Int(i32),
    IntHex(i32),
    Long(i64),
    LongHex(i64),
    Float(f32),
    Double(f64),
    Bool(bool),
}

impl Value {
    /// The value as text, the way Android's parser returns it from
    /// `getAttributeValue` (so a text and a binary packages.xml read alike):
    /// hex types as signed lowercase hex without prefix, bytes as lowercase
    /// hex or padded base64. Floats use Rust's shortest round-trip form,
    /// which differs from Java's only in exponent notation.
    pub(crate) fn to_text(&self) -> Option<String> {
        Some(match self {
            Value::Null => return None,
            Value::String(s) | Value::InternedString(s) => s.clone(),
            Value::BytesHex(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
            Value::BytesBase64(b) => base64(b),
            Value::Int(v) => v.to_string(),
            Value::IntHex(v) => signed_hex(*v as i64),
            Value::Long(v) => v.to_string(),
            Value::LongHex(v) => signed_hex(*v),
            Value::Float(v) => java_float(*v as f64, format!("{v:?}")),
            Value::Double(v) => java_float(*v, format!("{v:?}")),
            Value::Bool(v) => v.to_string(),
        })
    }

    /// The value as an integer: typed ints directly, strings parsed as
    /// decimal (or hex with a `0x` prefix), as a text packages.xml has them.
    pub(crate) fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(v) | Value::IntHex(v) => Some(*v as i64),
            Value::Long(v) | Value::LongHex(v) => Some(*v),
            Value::String(s) | Value::InternedString(s) => {
                let s = s.trim();
                match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                    Some(hex) => i64::from_str_radix(hex, 16).ok(),
                    None => s.parse().ok(),
                }
            }
            _ => None,
        }
    }
}

fn signed_hex(v: i64) -> String {
    if v < 0 {
        format!("-{:x}", v.unsigned_abs())
    } else {
        format!("{v:x}")
    }
}

fn java_float(v: f64, shortest: String) -> String {
    if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        shortest
    }
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One event of the document.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    /// A start tag with all its attributes; `offset` is its token byte.
    StartTag {
        name: String,
        attributes: Vec<(String, Value)>,
        offset: usize,
    },
    EndTag {
        name: String,
        offset: usize,
    },
    /// TEXT, CDSECT, ENTITY_REF, whitespace, processing instruction, comment
    /// or DOCDECL (`token` says which), with its text if any.
    Text {
        token: u8,
        text: Option<String>,
        offset: usize,
    },
}

/// Where and why a binary document could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AbxError {
    /// Byte offset (from the start of the file) where reading stopped.
    pub(crate) offset: usize,
    pub(crate) expected: String,
    pub(crate) found: String,
}

impl fmt::Display for AbxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "byte {}: expected {}, found {}",
            self.offset, self.expected, self.found
        )
    }
}

impl std::error::Error for AbxError {}

/// A pull reader over a whole ABX document held in memory.
pub(crate) struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    strings: Vec<String>,
    open: Vec<String>,
    finished: bool,
}

impl<'a> Reader<'a> {
    /// Checks the magic; the events follow from [`Reader::next_event`].
    pub(crate) fn new(data: &'a [u8]) -> Result<Reader<'a>, AbxError> {
        if !data.starts_with(&MAGIC) {
            let head = &data[..data.len().min(4)];
            return Err(AbxError {
                offset: 0,
                expected: "the Android Binary XML magic \"ABX\\0\"".into(),
                found: format!("{head:02x?}"),
            });
        }
        Ok(Reader {
            data,
            pos: MAGIC.len(),
            strings: Vec::new(),
            open: Vec::new(),
            finished: false,
        })
    }

    fn err<T>(
        &self,
        offset: usize,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Result<T, AbxError> {
        Err(AbxError {
            offset,
            expected: expected.into(),
            found: found.into(),
        })
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], AbxError> {
        let left = self.data.len() - self.pos;
        if left < n {
            return self.err(
                self.pos,
                what,
                format!("the end of the file ({left} of {n} bytes present)"),
            );
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], AbxError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, AbxError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, AbxError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn utf(&mut self, what: &str) -> Result<String, AbxError> {
        let len = self.u16(&format!("the 2-byte length of {what}"))? as usize;
        let start = self.pos;
        let bytes = self.take(len, &format!("{len} bytes of {what}"))?;
        decode_modified_utf8(bytes).or_else(|at| {
            self.err(
                start + at,
                format!("modified UTF-8 in {what}"),
                format!("byte {:#04x}", bytes[at]),
            )
        })
    }

    fn interned(&mut self, what: &str) -> Result<String, AbxError> {
        let at = self.pos;
        let index = self.u16(&format!("{what} (an interned string reference)"))?;
        if index == NEW_STRING {
            let s = self.utf(what)?;
            // FastDataOutput stops numbering once the table is full; the
            // string is still written out in full every time after that.
            if self.strings.len() < NEW_STRING as usize {
                self.strings.push(s.clone());
            }
            return Ok(s);
        }
        match self.strings.get(index as usize) {
            Some(s) => Ok(s.clone()),
            None => self.err(
                at,
                format!(
                    "{what}: a reference to one of the {} strings defined so far",
                    self.strings.len()
                ),
                format!("reference #{index}"),
            ),
        }
    }

    fn attribute(&mut self, at: usize, kind: u8) -> Result<(String, Value), AbxError> {
        if !(TYPE_NULL..=TYPE_BOOLEAN_FALSE).contains(&kind) {
            return self.err(
                at,
                "an attribute data type (1 to 13 in the high nibble)",
                format!("type {}", kind >> 4),
            );
        }
        let name = self.interned("an attribute name")?;
        let what = format!("the value of attribute {name:?}");
        let value = match kind {
            TYPE_NULL => Value::Null,
            TYPE_STRING => Value::String(self.utf(&what)?),
            TYPE_STRING_INTERNED => Value::InternedString(self.interned(&what)?),
            TYPE_BYTES_HEX | TYPE_BYTES_BASE64 => {
                let len = self.u16(&format!("the 2-byte length of {what}"))? as usize;
                let bytes = self.take(len, &format!("{len} bytes of {what}"))?.to_vec();
                if kind == TYPE_BYTES_HEX {
                    Value::BytesHex(bytes)
                } else {
                    Value::BytesBase64(bytes)
                }
            }
            TYPE_INT => Value::Int(i32::from_be_bytes(self.array(&what)?)),
            TYPE_INT_HEX => Value::IntHex(i32::from_be_bytes(self.array(&what)?)),
            TYPE_LONG => Value::Long(i64::from_be_bytes(self.array(&what)?)),
            TYPE_LONG_HEX => Value::LongHex(i64::from_be_bytes(self.array(&what)?)),
            TYPE_FLOAT => Value::Float(f32::from_be_bytes(self.array(&what)?)),
            TYPE_DOUBLE => Value::Double(f64::from_be_bytes(self.array(&what)?)),
            TYPE_BOOLEAN_TRUE => Value::Bool(true),
            _ => Value::Bool(false),
        };
        Ok((name, value))
    }

    fn tag_name(&mut self, at: usize, kind: u8, what: &str) -> Result<String, AbxError> {
        match kind {
            TYPE_STRING_INTERNED => self.interned(what),
            // The serializer always interns tag names; a plain string is
            // accepted all the same.
            TYPE_STRING => self.utf(what),
            other => self.err(
                at,
                format!("{what} as an (interned) string"),
                format!("type {}", other >> 4),
            ),
        }
    }

    /// The next event, or `None` at the end of the document.
    pub(crate) fn next_event(&mut self) -> Result<Option<Event>, AbxError> {
        loop {
            if self.finished {
                return Ok(None);
            }
            if self.pos == self.data.len() {
                if let Some(open) = self.open.last() {
                    return self.err(
                        self.pos,
                        format!(
                            "the end tag </{open}> ({} element(s) still open)",
                            self.open.len()
                        ),
                        "the end of the file",
                    );
                }
                // Android's parser also treats a missing END_DOCUMENT as the end.
                self.finished = true;
                return Ok(None);
            }
            let at = self.pos;
            let byte = self.u8("a token")?;
            let (token, kind) = (byte & 0x0f, byte & 0xf0);
            match token {
                START_DOCUMENT => continue,
                END_DOCUMENT => {
                    if let Some(open) = self.open.last() {
                        return self.err(at, format!("the end tag </{open}>"), "END_DOCUMENT");
                    }
                    self.finished = true;
                    return Ok(None);
                }
                START_TAG => {
                    let name = self.tag_name(at, kind, "a start tag name")?;
                    let mut attributes = Vec::new();
                    while self
                        .data
                        .get(self.pos)
                        .is_some_and(|b| b & 0x0f == ATTRIBUTE)
                    {
                        let attr_at = self.pos;
                        let kind = self.u8("an attribute")? & 0xf0;
                        attributes.push(self.attribute(attr_at, kind)?);
                    }
                    self.open.push(name.clone());
                    return Ok(Some(Event::StartTag {
                        name,
                        attributes,
                        offset: at,
                    }));
                }
                END_TAG => {
                    let name = self.tag_name(at, kind, "an end tag name")?;
                    match self.open.pop() {
                        Some(open) if open == name => {}
                        Some(open) => {
                            return self.err(
                                at,
                                format!("the end tag </{open}>"),
                                format!("</{name}>"),
                            )
                        }
                        None => {
                            return self.err(
                                at,
                                "a start tag or the end of the document",
                                format!("the end tag </{name}> with no element open"),
                            )
                        }
                    }
                    return Ok(Some(Event::EndTag { name, offset: at }));
                }
                ATTRIBUTE => {
                    return self.err(
                        at,
                        "a token (attributes only follow a start tag)",
                        "an attribute",
                    )
                }
                TEXT..=DOCDECL => {
                    let text = match kind {
                        TYPE_NULL => None,
                        TYPE_STRING => Some(self.utf("text")?),
                        other => {
                            return self.err(
                                at,
                                "text of type null or string",
                                format!("type {}", other >> 4),
                            )
                        }
                    };
                    return Ok(Some(Event::Text {
                        token,
                        text,
                        offset: at,
                    }));
                }
                other => {
                    return self.err(
                        at,
                        "a token (0 to 10, or 15 for an attribute)",
                        format!("token {other} (byte {byte:#04x})"),
                    )
                }
            }
        }
    }
}

/// Decodes Java's modified UTF-8 (NUL as C0 80, characters beyond the BMP
/// as two 3-byte surrogates); plain 4-byte UTF-8, which newer writers may
/// emit, is accepted too. The error is the offset of the bad byte.
pub(crate) fn decode_modified_utf8(bytes: &[u8]) -> Result<String, usize> {
    if let Ok(s) = std::str::from_utf8(bytes) {
        return Ok(s.to_string());
    }
    let mut units: Vec<u16> = Vec::with_capacity(bytes.len());
    let mut i = 0;
    let cont = |j: usize| -> Result<u32, usize> {
        match bytes.get(j) {
            Some(b) if b & 0xc0 == 0x80 => Ok((b & 0x3f) as u32),
            Some(_) => Err(j),
            None => Err(j.min(bytes.len().saturating_sub(1))),
        }
    };
    while i < bytes.len() {
        let b = bytes[i] as u32;
        if b < 0x80 {
            units.push(b as u16);
            i += 1;
        } else if b & 0xe0 == 0xc0 {
            units.push(((b & 0x1f) << 6 | cont(i + 1)?) as u16);
            i += 2;
        } else if b & 0xf0 == 0xe0 {
            units.push(((b & 0x0f) << 12 | cont(i + 1)? << 6 | cont(i + 2)?) as u16);
            i += 3;
        } else if b & 0xf8 == 0xf0 {
            let c = (b & 0x07) << 18 | cont(i + 1)? << 12 | cont(i + 2)? << 6 | cont(i + 3)?;
            match char::from_u32(c) {
                Some(ch) => {
                    let mut buf = [0u16; 2];
                    units.extend_from_slice(ch.encode_utf16(&mut buf));
                }
                None => return Err(i),
            }
            i += 4;
        } else {
            return Err(i);
        }
    }
    // A lone surrogate cannot be represented in a Rust string; it becomes
    // U+FFFD rather than failing the whole document.
    Ok(String::from_utf16_lossy(&units))
}

/// Reads a whole document into its events.
#[cfg(test)]
pub(crate) fn read_all(data: &[u8]) -> Result<Vec<Event>, AbxError> {
    let mut reader = Reader::new(data)?;
    let mut events = Vec::new();
    while let Some(event) = reader.next_event()? {
        events.push(event);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The magic, START_DOCUMENT, and `<t` with the attribute name `a`
    /// interned as string #1 (`t` is #0), ready for one attribute value.
    fn doc_with_attribute(kind: u8, value: &[u8]) -> Vec<u8> {
        let mut d = b"ABX\0".to_vec();
        d.push(START_DOCUMENT | TYPE_NULL); // 0x10
        d.extend([
            START_TAG | TYPE_STRING_INTERNED,
            0xff,
            0xff,
            0x00,
            0x01,
            b't',
        ]); // 0x32
        d.extend([ATTRIBUTE | kind, 0xff, 0xff, 0x00, 0x01, b'a']);
        d.extend_from_slice(value);
        d.extend([END_TAG | TYPE_STRING_INTERNED, 0x00, 0x00]); // </t> by reference #0
        d.push(END_DOCUMENT | TYPE_NULL);
        d
    }

    fn only_attribute(doc: &[u8]) -> Value {
        let events = read_all(doc).unwrap();
        assert_eq!(events.len(), 2, "{events:?}");
        match &events[0] {
            Event::StartTag {
                name, attributes, ..
            } => {
                assert_eq!(name, "t");
                assert_eq!(attributes.len(), 1);
                assert_eq!(attributes[0].0, "a");
                attributes[0].1.clone()
            }
            other => panic!("expected a start tag, got {other:?}"),
        }
    }

    #[test]
    fn every_attribute_type_byte_by_byte() {
        let cases: Vec<(u8, Vec<u8>, Value, Option<&str>)> = vec![
            (0x10, vec![], Value::Null, None),
            (
                0x20,
                vec![0x00, 0x02, b'h', b'i'],
                Value::String("hi".into()),
                Some("hi"),
            ),
            // A new interned string (#2: after `t` and `a`).
            (
                0x30,
                vec![0xff, 0xff, 0x00, 0x03, b'a', b'b', b'c'],
                Value::InternedString("abc".into()),
                Some("abc"),
            ),
            // An interned reference to string #0 (`t`).
            (
                0x30,
                vec![0x00, 0x00],
                Value::InternedString("t".into()),
                Some("t"),
            ),
            (
                0x40,
                vec![0x00, 0x03, 0xde, 0xad, 0x01],
                Value::BytesHex(vec![0xde, 0xad, 0x01]),
                Some("dead01"),
            ),
            (
                0x50,
                vec![0x00, 0x04, b'a', b'b', b'c', b'd'],
                Value::BytesBase64(b"abcd".to_vec()),
                Some("YWJjZA=="),
            ),
            (
                0x60,
                vec![0xff, 0xff, 0xff, 0xfe],
                Value::Int(-2),
                Some("-2"),
            ),
            (
                0x60,
                vec![0x00, 0x00, 0x27, 0x8b],
                Value::Int(10123),
                Some("10123"),
            ),
            (
                0x70,
                vec![0x00, 0x00, 0x01, 0xff],
                Value::IntHex(0x1ff),
                Some("1ff"),
            ),
            (
                0x70,
                vec![0xff, 0xff, 0xff, 0x01],
                Value::IntHex(-255),
                Some("-ff"),
            ),
            (
                0x80,
                vec![0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x02],
                Value::Long(0x1_0000_0002),
                Some("4294967298"),
            ),
            (
                0x90,
                vec![0x00, 0x00, 0x01, 0x8c, 0x2a, 0x3b, 0x4c, 0x5d],
                Value::LongHex(0x18c_2a3b_4c5d),
                Some("18c2a3b4c5d"),
            ),
            (
                0xa0,
                vec![0x3f, 0xc0, 0x00, 0x00],
                Value::Float(1.5),
                Some("1.5"),
            ),
            (
                0xb0,
                vec![0xc0, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00],
                Value::Double(-2.5),
                Some("-2.5"),
            ),
            (0xc0, vec![], Value::Bool(true), Some("true")),
            (0xd0, vec![], Value::Bool(false), Some("false")),
        ];
        for (kind, bytes, value, text) in cases {
            let got = only_attribute(&doc_with_attribute(kind, &bytes));
            assert_eq!(got, value, "type {kind:#04x}");
            assert_eq!(got.to_text().as_deref(), text, "type {kind:#04x}");
        }
    }

    #[test]
    fn modified_utf8_nul_and_supplementary_characters() {
        // "a\0" + U+1F600 as a surrogate pair (ED A0 BD, ED B8 80).
        let bytes = [b'a', 0xc0, 0x80, 0xed, 0xa0, 0xbd, 0xed, 0xb8, 0x80];
        assert_eq!(decode_modified_utf8(&bytes).unwrap(), "a\0\u{1f600}");
        // Standard 4-byte UTF-8 is accepted as well.
        assert_eq!(
            decode_modified_utf8("é\u{1f600}".as_bytes()).unwrap(),
            "é\u{1f600}"
        );
        assert_eq!(decode_modified_utf8(&[b'a', 0xff]), Err(1));
        assert_eq!(decode_modified_utf8(&[0xe2, 0x82]), Err(1));
    }

    #[test]
    fn text_tokens_and_nesting() {
        let mut d = b"ABX\0".to_vec();
        d.extend([0x32, 0xff, 0xff, 0x00, 0x01, b'r']); // <r>
        d.extend([0x24, 0x00, 0x02, b'h', b'i']); // text "hi"
        d.extend([0x19]); // comment without text
        d.extend([0x32, 0x00, 0x00]); // <r> again, by reference
        d.extend([0x33, 0x00, 0x00, 0x33, 0x00, 0x00]); // </r></r>
        let events = read_all(&d).unwrap();
        assert_eq!(events.len(), 6);
        assert_eq!(
            events[1],
            Event::Text {
                token: TEXT,
                text: Some("hi".into()),
                offset: 10
            }
        );
        assert_eq!(
            events[2],
            Event::Text {
                token: 9,
                text: None,
                offset: 15
            }
        );
    }

    #[test]
    fn damaged_documents_say_where_and_what() {
        let e = read_all(b"<?xml").unwrap_err();
        assert_eq!(e.offset, 0);
        assert!(e.to_string().contains("ABX"), "{e}");

        let mut d = b"ABX\0".to_vec();
        d.extend([0x32, 0x00, 0x05]);
        let e = read_all(&d).unwrap_err();
        assert_eq!(e.offset, 5);
        assert!(e.expected.contains("0 strings defined"), "{e}");

        let mut d = b"ABX\0".to_vec();
        d.extend([0x32, 0xff, 0xff, 0x00, 0x01, b'r', 0xef]);
        let e = read_all(&d).unwrap_err();
        assert_eq!((e.offset, e.found.as_str()), (10, "type 14"));

        let mut d = b"ABX\0".to_vec();
        d.extend([0x32, 0xff, 0xff, 0x00, 0x01, b'r', 0x0c]);
        let e = read_all(&d).unwrap_err();
        assert_eq!(e.offset, 10);
        assert!(e.found.contains("token 12"), "{e}");

        let mut d = b"ABX\0".to_vec();
        d.extend([
            0x32, 0xff, 0xff, 0x00, 0x01, b'r', 0x33, 0xff, 0xff, 0x00, 0x01, b's',
        ]);
        let e = read_all(&d).unwrap_err();
        assert_eq!(
            e.to_string(),
            "byte 10: expected the end tag </r>, found </s>"
        );

        let mut d = b"ABX\0".to_vec();
        d.extend([0x32, 0xff, 0xff, 0x00, 0x01, b'r']);
        let e = read_all(&d).unwrap_err();
        assert_eq!(
            e.to_string(),
            "byte 10: expected the end tag </r> (1 element(s) still open), found the end of the file"
        );
    }

    #[test]
    fn every_truncation_of_a_document_is_an_error_never_a_panic() {
        let doc = doc_with_attribute(TYPE_LONG, &[1, 2, 3, 4, 5, 6, 7, 8]);
        // Up to START_DOCUMENT the document is merely empty, and cutting
        // right after END_TAG leaves a complete document without
        // END_DOCUMENT: Android accepts both.
        for cut in [4, 5, doc.len() - 1] {
            assert!(read_all(&doc[..cut]).is_ok(), "cut at {cut}");
        }
        for cut in (0..4).chain(6..doc.len() - 1) {
            let e = read_all(&doc[..cut]).expect_err(&format!("cut at {cut}"));
            assert!(e.offset <= cut, "cut {cut}: {e}");
            assert!(e.to_string().starts_with("byte "), "{e}");
        }
        // The attribute's 8 value bytes start at offset 17; cut inside them.
        let e = read_all(&doc[..20]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "byte 17: expected the value of attribute \"a\", found the end of the file (3 of 8 bytes present)"
        );
    }
}
