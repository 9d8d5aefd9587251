//! /data/system/packages.xml: the package manager's own record of every
//! package, read for what packages.list lacks: where a package's code lives
//! (system image or /data/app), its flags, and the names of shared uids.
//!
//! Android 12 and later write it as Android Binary XML ([`super::abx`]);
//! earlier releases, and devices configured back to text, write plain XML
//! (read with quick-xml). Both become the same list of elements, so one
//! interpreter serves both. Used, from the children of the `<packages>` root:
//!
//! - `<package name=.. userId=|sharedUserId=.. codePath=.. publicFlags=..>`
//!   (`flags=` before Android 6);
//! - `<shared-user name="android.uid.system" userId="1000">`;
//! - `<updated-package name=..>`: the system image's copy of a package that
//!   has since been updated into /data/app, which makes it preinstalled.
//!
//! When `packages-backup.xml` exists, the package manager was interrupted
//! while writing packages.xml and reads the backup instead; so do we.

use super::abx::{self, Value};
use std::fmt;
use std::path::{Path, PathBuf};

/// ApplicationInfo.FLAG_SYSTEM: installed in the system image.
pub(crate) const FLAG_SYSTEM: i64 = 1;

/// Partitions of the system image. A package whose code lives under one of
/// them came with the firmware. /oem is the pre-Treble OEM partition.
pub(crate) const IMAGE_PARTITIONS: &[&str] = &[
    "/system",
    "/system_ext",
    "/product",
    "/vendor",
    "/odm",
    "/oem",
    "/apex",
];

/// The partition a file lives on, as the contract's `partition` names it:
/// an image partition (system, system_ext, product, vendor, odm, oem, apex;
/// `/system/product/...` on devices that keep product inside system is
/// product) or `data` (apps installed later, /data/app). None for other
/// paths (a Linux host's /usr/bin).
pub(crate) fn partition_of(path: &str) -> Option<&'static str> {
    const INSIDE_SYSTEM: [(&str, &str); 3] = [
        ("/system/system_ext", "system_ext"),
        ("/system/product", "product"),
        ("/system/vendor", "vendor"),
    ];
    const TOP: [(&str, &str); 8] = [
        ("/system_ext", "system_ext"),
        ("/system", "system"),
        ("/product", "product"),
        ("/vendor", "vendor"),
        ("/odm", "odm"),
        ("/oem", "oem"),
        ("/apex", "apex"),
        ("/data", "data"),
    ];
    let under = |prefix: &str| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    INSIDE_SYSTEM
        .iter()
        .chain(TOP.iter())
        .find(|(prefix, _)| under(prefix))
        .map(|(_, name)| *name)
}

/// True when `path` lies in a system image partition, false otherwise
/// (/data/app, adopted storage under /mnt/expand, ...).
pub(crate) fn in_system_image(path: &str) -> bool {
    IMAGE_PARTITIONS.iter().any(|p| {
        path.strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// Where in a file something was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Position {
    /// Byte offset in a binary (ABX) file.
    Byte(usize),
    /// 1-based line and column in a text file.
    Line { line: usize, column: usize },
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Byte(b) => write!(f, "byte {b}"),
            Position::Line { line, column } => write!(f, "line {line}, column {column}"),
        }
    }
}

/// packages.xml could not be read: which file, where, and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct XmlError {
    pub(crate) file: PathBuf,
    pub(crate) position: Position,
    pub(crate) message: String,
}

impl fmt::Display for XmlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.file.display(),
            self.position,
            self.message
        )
    }
}

impl std::error::Error for XmlError {}

/// A start tag with its attributes and its nesting depth (the root is 1).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Element {
    pub(crate) name: String,
    pub(crate) depth: usize,
    pub(crate) attributes: Vec<(String, Value)>,
    pub(crate) position: Position,
}

impl Element {
    pub(crate) fn attr(&self, name: &str) -> Option<&Value> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    fn text(&self, name: &str) -> Option<String> {
        self.attr(name).and_then(Value::to_text)
    }

    fn number(&self, name: &str) -> Option<i64> {
        self.attr(name).and_then(Value::as_i64)
    }
}

/// Every start tag of a packages.xml, text or binary (told apart by the ABX
/// magic).
pub(crate) fn elements(data: &[u8], file: &Path) -> Result<Vec<Element>, XmlError> {
    if data.starts_with(&abx::MAGIC) {
        abx_elements(data, file)
    } else {
        text_elements(data, file)
    }
}

fn abx_elements(data: &[u8], file: &Path) -> Result<Vec<Element>, XmlError> {
    let fail = |e: abx::AbxError| XmlError {
        file: file.to_path_buf(),
        position: Position::Byte(e.offset),
        message: format!(
            "expected {}, found {} (Android Binary XML)",
            e.expected, e.found
        ),
    };
    let mut reader = abx::Reader::new(data).map_err(fail)?;
    let mut out = Vec::new();
    let mut depth = 0;
    while let Some(event) = reader.next_event().map_err(fail)? {
        match event {
            abx::Event::StartTag {
                name,
                attributes,
                offset,
            } => {
                depth += 1;
                out.push(Element {
                    name,
                    depth,
                    attributes,
                    position: Position::Byte(offset),
                });
            }
            abx::Event::EndTag { .. } => depth -= 1,
            abx::Event::Text { .. } => {}
        }
    }
    Ok(out)
}

fn line_column(data: &[u8], offset: usize) -> Position {
    let before = &data[..offset.min(data.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    Position::Line {
        line,
        column: before.len() - line_start + 1,
    }
}

fn text_elements(data: &[u8], file: &Path) -> Result<Vec<Element>, XmlError> {
    use quick_xml::events::{BytesStart, Event};
    let fail = |offset: u64, message: String| XmlError {
        file: file.to_path_buf(),
        position: line_column(data, offset as usize),
        message,
    };
    let mut reader = quick_xml::Reader::from_reader(data);
    reader.config_mut().check_end_names = true;
    let mut open: Vec<String> = Vec::new();
    let mut out = Vec::new();
    let element = |e: &BytesStart, depth: usize, offset: u64| -> Result<Element, XmlError> {
        let mut attributes = Vec::new();
        for attr in e.attributes() {
            let attr = attr.map_err(|err| fail(offset, format!("malformed attribute: {err}")))?;
            let value = attr
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|err| fail(offset, format!("malformed attribute value: {err}")))?;
            attributes.push((
                attr.key.as_ref().to_string(),
                Value::String(value.into_owned()),
            ));
        }
        Ok(Element {
            name: e.name().as_ref().to_string(),
            depth,
            attributes,
            position: line_column(data, offset as usize),
        })
    };
    loop {
        let start = reader.buffer_position();
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                let el = element(&e, open.len() + 1, start)?;
                open.push(el.name.clone());
                out.push(el);
            }
            Ok(Event::Empty(e)) => out.push(element(&e, open.len() + 1, start)?),
            Ok(Event::End(_)) => {
                open.pop();
            }
            Ok(Event::Eof) => {
                if let Some(name) = open.last() {
                    return Err(fail(
                        data.len() as u64,
                        format!(
                            "expected the end tag </{name}> ({} element(s) still open), found the end of the file",
                            open.len()
                        ),
                    ));
                }
                return Ok(out);
            }
            Ok(_) => {}
            Err(e) => return Err(fail(reader.error_position(), format!("malformed XML: {e}"))),
        }
    }
}

/// One `<package>` (or `<updated-package>`) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct XmlPackage {
    pub(crate) name: String,
    pub(crate) app_id: u32,
    /// Joined a shared uid (`sharedUserId=` rather than `userId=`).
    pub(crate) shared: bool,
    pub(crate) code_path: Option<String>,
    pub(crate) flags: Option<i64>,
}

impl XmlPackage {
    /// Came with the system image: flagged FLAG_SYSTEM or its code lives in
    /// an image partition.
    pub(crate) fn preinstalled(&self) -> bool {
        self.flags.is_some_and(|f| f & FLAG_SYSTEM != 0)
            || self.code_path.as_deref().is_some_and(in_system_image)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SharedUser {
    pub(crate) name: String,
    pub(crate) app_id: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PackagesXml {
    pub(crate) packages: Vec<XmlPackage>,
    pub(crate) shared_users: Vec<SharedUser>,
    /// Names of system packages that have been updated from the store.
    pub(crate) updated: Vec<String>,
}

fn app_id(el: &Element) -> Option<(u32, bool)> {
    let (value, shared) = match (el.number("userId"), el.number("sharedUserId")) {
        (Some(v), _) => (v, false),
        (None, Some(v)) => (v, true),
        (None, None) => return None,
    };
    u32::try_from(value)
        .ok()
        .map(|uid| (uid % super::aids::USER_OFFSET, shared))
}

/// Interprets the elements of a packages.xml. An entry without the
/// attributes we need is skipped with a warning; a document that is not a
/// package list at all is an error.
pub(crate) fn interpret(
    elements: &[Element],
    file: &Path,
) -> Result<(PackagesXml, Vec<String>), XmlError> {
    match elements.first() {
        Some(root) if root.name == "packages" => {}
        Some(root) => {
            return Err(XmlError {
                file: file.to_path_buf(),
                position: root.position,
                message: format!(
                    "expected the root element <packages>, found <{}>",
                    root.name
                ),
            })
        }
        None => {
            return Err(XmlError {
                file: file.to_path_buf(),
                position: Position::Byte(0),
                message: "expected the root element <packages>, found no element at all".into(),
            })
        }
    }
    let mut out = PackagesXml::default();
    let mut warnings = Vec::new();
    let mut skip = |el: &Element, why: &str| {
        warnings.push(format!(
            "{}: {}: skipping <{}> ({why}); the other entries are used",
            file.display(),
            el.position,
            el.name
        ))
    };
    for el in elements.iter().filter(|e| e.depth == 2) {
        match el.name.as_str() {
            "package" | "updated-package" => {
                let Some(name) = el.text("name") else {
                    skip(el, "no name attribute");
                    continue;
                };
                if el.name == "updated-package" {
                    out.updated.push(name);
                    continue;
                }
                let Some((app_id, shared)) = app_id(el) else {
                    skip(
                        el,
                        &format!("{name}: no numeric userId or sharedUserId attribute"),
                    );
                    continue;
                };
                out.packages.push(XmlPackage {
                    name,
                    app_id,
                    shared,
                    code_path: el.text("codePath"),
                    flags: el.number("publicFlags").or_else(|| el.number("flags")),
                });
            }
            "shared-user" => match (el.text("name"), app_id(el)) {
                (Some(name), Some((app_id, _))) => {
                    out.shared_users.push(SharedUser { name, app_id })
                }
                _ => skip(el, "no name or no numeric userId attribute"),
            },
            _ => {}
        }
    }
    Ok((out, warnings))
}

/// The file Android itself would read under `system_dir` (packages-backup.xml
/// first), if any.
pub(crate) fn locate(system_dir: &Path) -> Option<PathBuf> {
    ["packages-backup.xml", "packages.xml"]
        .iter()
        .map(|f| system_dir.join(f))
        .find(|p| p.is_file())
}

/// Reads and interprets one packages.xml file.
pub(crate) fn load(file: &Path) -> Result<(PackagesXml, Vec<String>), XmlError> {
    let data = std::fs::read(file).map_err(|e| XmlError {
        file: file.to_path_buf(),
        position: Position::Byte(0),
        message: format!("cannot read: {e}"),
    })?;
    interpret(&elements(&data, file)?, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"<?xml version='1.0' encoding='utf-8' standalone='yes' ?>
<packages>
    <version sdkVersion="28" databaseVersion="3" />
    <package name="com.android.phone" codePath="/system/priv-app/TeleService" publicFlags="940097093" sharedUserId="1001">
        <sigs count="1"><cert index="0" /></sigs>
    </package>
    <package name="com.example.app" codePath="/data/app/com.example.app-1" publicFlags="0x00c8be44" userId="10123" />
    <package name="com.old.style" codePath="/data/app/com.old.style-1" flags="1" userId="10124" />
    <package name="com.broken" codePath="/data/app/x" />
    <updated-package name="com.google.chrome" codePath="/product/app/Chrome" userId="10090" />
    <shared-user name="android.uid.phone" userId="1001">
        <package name="nested.is.ignored" userId="1" />
    </shared-user>
    <shared-user userId="1002" />
</packages>
"#;

    #[test]
    fn text_packages_xml() {
        let file = Path::new("/dev/packages.xml");
        let els = elements(TEXT.as_bytes(), file).unwrap();
        assert_eq!(
            els[2].position,
            Position::Line { line: 4, column: 5 },
            "{:?}",
            els[2]
        );
        let (xml, warnings) = interpret(&els, file).unwrap();
        let names: Vec<_> = xml
            .packages
            .iter()
            .map(|p| (p.name.as_str(), p.app_id, p.shared, p.preinstalled()))
            .collect();
        assert_eq!(
            names,
            [
                ("com.android.phone", 1001, true, true),
                ("com.example.app", 10123, false, false),
                ("com.old.style", 10124, false, true),
            ]
        );
        assert_eq!(xml.packages[1].flags, Some(0x00c8be44));
        assert_eq!(xml.updated, ["com.google.chrome"]);
        assert_eq!(
            xml.shared_users,
            [SharedUser {
                name: "android.uid.phone".into(),
                app_id: 1001
            }]
        );
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].starts_with("/dev/packages.xml: line 9, column 5: skipping <package> (com.broken: no numeric userId"),
            "{warnings:?}"
        );
    }

    #[test]
    fn image_partitions() {
        for p in [
            "/system/app/X",
            "/system_ext/priv-app/Y",
            "/product/app/Z",
            "/vendor/app/V",
            "/odm/app/O",
            "/apex/com.android.tethering",
        ] {
            assert!(in_system_image(p), "{p}");
        }
        for p in [
            "/data/app/~~a==/com.x-b==",
            "/systemx/app",
            "/mnt/expand/1234/app/x",
            "system/app",
        ] {
            assert!(!in_system_image(p), "{p}");
        }
    }

    #[test]
    fn broken_text_xml_names_file_line_and_what() {
        let file = Path::new("p.xml");
        let e = elements(b"<packages>\n  <package name=\"a\" userId=\"1\">\n", file).unwrap_err();
        assert_eq!(
            e.to_string(),
            "p.xml: line 3, column 1: expected the end tag </package> (2 element(s) still open), found the end of the file"
        );
        let e = elements(b"<packages>\n <package name=\"a\"></packages>", file).unwrap_err();
        assert!(e.to_string().starts_with("p.xml: line 2, column "), "{e}");
        assert!(e.message.contains("package"), "{e}");
        let e = interpret(&elements(b"<html/>", file).unwrap(), file).unwrap_err();
        assert_eq!(
            e.to_string(),
            "p.xml: line 1, column 1: expected the root element <packages>, found <html>"
        );
    }
}
