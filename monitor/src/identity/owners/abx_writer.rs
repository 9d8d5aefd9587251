//! Test-only: a small Android Binary XML writer, the mirror of
//! [`super::abx`], so tests can produce binary packages.xml fixtures from
//! their text form and check the reader against bytes written the way
//! Android's BinaryXmlSerializer writes them.

use super::abx::*;
use std::collections::HashMap;

pub(crate) struct Writer {
    out: Vec<u8>,
    interned: HashMap<String, u16>,
}

impl Writer {
    pub(crate) fn new() -> Writer {
        let mut out = MAGIC.to_vec();
        out.push(START_DOCUMENT | TYPE_NULL);
        Writer {
            out,
            interned: HashMap::new(),
        }
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.out.push(END_DOCUMENT | TYPE_NULL);
        self.out
    }

    pub(crate) fn start_tag(&mut self, name: &str) {
        self.out.push(START_TAG | TYPE_STRING_INTERNED);
        self.interned(name);
    }

    pub(crate) fn end_tag(&mut self, name: &str) {
        self.out.push(END_TAG | TYPE_STRING_INTERNED);
        self.interned(name);
    }

    pub(crate) fn text(&mut self, text: &str) {
        self.out.push(TEXT | TYPE_STRING);
        self.utf(text);
    }

    pub(crate) fn attribute(&mut self, name: &str, value: &Value) {
        let kind = match value {
            Value::Null => TYPE_NULL,
            Value::String(_) => TYPE_STRING,
            Value::InternedString(_) => TYPE_STRING_INTERNED,
            Value::BytesHex(_) => TYPE_BYTES_HEX,
            Value::BytesBase64(_) => TYPE_BYTES_BASE64,
            Value::Int(_) => TYPE_INT,
            Value::IntHex(_) => TYPE_INT_HEX,
            Value::Long(_) => TYPE_LONG,
            Value::LongHex(_) => TYPE_LONG_HEX,
            Value::Float(_) => TYPE_FLOAT,
            Value::Double(_) => TYPE_DOUBLE,
            Value::Bool(true) => TYPE_BOOLEAN_TRUE,
            Value::Bool(false) => TYPE_BOOLEAN_FALSE,
        };
        self.out.push(ATTRIBUTE | kind);
        self.interned(name);
        match value {
            Value::Null | Value::Bool(_) => {}
            Value::String(s) => self.utf(s),
            Value::InternedString(s) => self.interned(s),
            Value::BytesHex(b) | Value::BytesBase64(b) => {
                self.out.extend((b.len() as u16).to_be_bytes());
                self.out.extend(b);
            }
            Value::Int(v) | Value::IntHex(v) => self.out.extend(v.to_be_bytes()),
            Value::Long(v) | Value::LongHex(v) => self.out.extend(v.to_be_bytes()),
            Value::Float(v) => self.out.extend(v.to_be_bytes()),
            Value::Double(v) => self.out.extend(v.to_be_bytes()),
        }
    }

    /// Java's modified UTF-8: NUL as C0 80, characters beyond the BMP as
    /// two 3-byte surrogates.
    fn utf(&mut self, s: &str) {
        let mut bytes = Vec::new();
        for unit in s.encode_utf16() {
            match unit {
                1..=0x7f => bytes.push(unit as u8),
                0 | 0x80..=0x7ff => {
                    bytes.push(0xc0 | (unit >> 6) as u8);
                    bytes.push(0x80 | (unit & 0x3f) as u8);
                }
                _ => {
                    bytes.push(0xe0 | (unit >> 12) as u8);
                    bytes.push(0x80 | (unit >> 6 & 0x3f) as u8);
                    bytes.push(0x80 | (unit & 0x3f) as u8);
                }
            }
        }
        self.out.extend((bytes.len() as u16).to_be_bytes());
        self.out.extend(bytes);
    }

    fn interned(&mut self, s: &str) {
        if let Some(index) = self.interned.get(s) {
            self.out.extend(index.to_be_bytes());
            return;
        }
        self.out.extend(0xffffu16.to_be_bytes());
        self.utf(s);
        let next = self.interned.len();
        if next < 0xffff {
            self.interned.insert(s.to_string(), next as u16);
        }
    }
}

/// The type Android's package manager gives a packages.xml attribute when
/// it writes ABX (attributeInt, attributeLongHex, attributeBytesHex, ...);
/// anything else is a plain string.
fn typed(name: &str, text: &str) -> Value {
    let parsed = match name {
        "userId" | "sharedUserId" | "publicFlags" | "privateFlags" | "flags" | "sdkVersion"
        | "databaseVersion" | "count" | "index" | "schemeVersion" => {
            text.parse().ok().map(Value::Int)
        }
        "version" => text.parse().ok().map(Value::Long),
        "ft" | "it" | "ut" => i64::from_str_radix(text, 16).ok().map(Value::LongHex),
        "key" => (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()
            .map(Value::BytesHex),
        "installer" => Some(Value::InternedString(text.into())),
        "isOrphaned" => text.parse().ok().map(Value::Bool),
        _ => None,
    };
    parsed.unwrap_or_else(|| Value::String(text.into()))
}

/// A text packages.xml in Android Binary XML, attributes typed as the
/// package manager types them. Comments and whitespace between elements
/// are dropped, as Android's binary serializer never writes them.
pub(crate) fn from_text_xml(text: &str) -> Vec<u8> {
    use quick_xml::events::{BytesStart, Event};
    let mut reader = quick_xml::Reader::from_str(text);
    let mut w = Writer::new();
    let start = |w: &mut Writer, e: &BytesStart| -> String {
        let name = e.name().as_ref().to_string();
        w.start_tag(&name);
        for attr in e.attributes() {
            let attr = attr.unwrap();
            let key = attr.key.as_ref().to_string();
            let value = attr
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .unwrap();
            w.attribute(&key, &typed(&key, &value));
        }
        name
    };
    loop {
        match reader.read_event().expect("well-formed text fixture") {
            Event::Start(e) => {
                start(&mut w, &e);
            }
            Event::Empty(e) => {
                let name = start(&mut w, &e);
                w.end_tag(&name);
            }
            Event::End(e) => w.end_tag(e.name().as_ref()),
            Event::Eof => break,
            _ => {}
        }
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_and_reader_agree() {
        let mut w = Writer::new();
        w.start_tag("packages");
        w.attribute("n", &Value::String("a\0\u{1f600}é".into()));
        w.attribute("i", &Value::InternedString("packages".into()));
        w.attribute("x", &Value::LongHex(-1));
        w.text("hi");
        w.start_tag("package");
        w.end_tag("package");
        w.end_tag("packages");
        let doc = w.finish();
        // "packages" is interned once (#0) and referenced by the attribute
        // value and the end tag.
        assert_eq!(&doc[..19], b"ABX\0\x10\x32\xff\xff\x00\x08packages\x2f");
        let events = read_all(&doc).unwrap();
        assert_eq!(
            events[0],
            Event::StartTag {
                name: "packages".into(),
                attributes: vec![
                    ("n".into(), Value::String("a\0\u{1f600}é".into())),
                    ("i".into(), Value::InternedString("packages".into())),
                    ("x".into(), Value::LongHex(-1)),
                ],
                offset: 5,
            }
        );
        assert_eq!(events.len(), 5);
    }
}
