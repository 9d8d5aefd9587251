//! Countries and networks of destination addresses, from the files given
//! with `--geoip FILE` (repeatable).
//!
//! Owns: opening and checking each source, and looking an address up in
//! them. Two kinds of source:
//!
//! - MaxMind DB files (`.mmdb`, read with the `maxminddb` crate): the
//!   country from `country.iso_code` (GeoLite2-Country / -City, DB-IP's
//!   mmdb; `registered_country.iso_code` when there is no `country`), the
//!   network from `autonomous_system_number` (GeoLite2-ASN, DB-IP ASN).
//! - CSV files of ranges in the layout of the free DB-IP lite downloads:
//!   `start_ip,end_ip,country` (dbip-country-lite), or
//!   `start_ip,end_ip,asn,organisation` (dbip-asn-lite: a number in the
//!   third column). IPv4 and IPv6 lines may be mixed; fields may be quoted;
//!   blank lines, `#` comments and a header line are skipped. The country
//!   `ZZ` (DB-IP's "unknown") is no country. Ranges are kept sorted and
//!   searched with a binary search; overlapping ranges are refused.
//!
//! Lookups try the sources in the order given: the country comes from the
//! first source that has one for the address, the ASN likewise. An
//! IPv4-mapped IPv6 address is looked up as IPv4. A file that cannot be
//! read or is corrupt is refused when opened, with one error naming the
//! file (and the line, for CSV) and what to do.

use crate::pipeline::rules::Cidr;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// The marker that starts the metadata section of a MaxMind DB file.
pub(crate) const MMDB_METADATA_MARKER: &[u8] = b"\xab\xcd\xefMaxMind.com";
/// The metadata section is within this many bytes of the end of the file.
const MMDB_METADATA_MAX: usize = 128 * 1024;
/// Addresses looked up when a MaxMind DB is opened, to catch a damaged
/// search tree or data section early.
const PROBES: [&str; 6] = [
    "1.1.1.1",
    "8.8.8.8",
    "203.0.113.1",
    "81.2.69.160",
    "2001:4860:4860::8888",
    "2a02:2770::1",
];

/// The country and ASN sources named with `--geoip`.
#[derive(Default)]
pub(crate) struct GeoIp {
    sources: Vec<Source>,
}

enum Source {
    Mmdb {
        path: PathBuf,
        reader: maxminddb::Reader<Vec<u8>>,
    },
    Csv {
        path: PathBuf,
        table: RangeTable,
    },
}

impl fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.describe()).finish()
    }
}

impl GeoIp {
    /// Opens every file, in order. The first one that cannot be read, is
    /// of neither kind or is damaged fails the whole call, naming the file.
    pub(crate) fn open(paths: &[PathBuf]) -> Result<GeoIp> {
        let sources = paths
            .iter()
            .map(|p| Source::open(p))
            .collect::<Result<Vec<_>>>()?;
        Ok(GeoIp { sources })
    }

    /// No sources: every lookup answers (None, None).
    pub(crate) fn empty() -> GeoIp {
        GeoIp::default()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// One line per source, for logs and status: path, kind, what it gives.
    pub(crate) fn describe(&self) -> Vec<String> {
        self.sources.iter().map(Source::describe).collect()
    }

    /// The country (ISO 3166-1 alpha-2, uppercase) and the autonomous
    /// system number of `ip`, each from the first source that knows it.
    pub(crate) fn lookup(&self, ip: IpAddr) -> (Option<String>, Option<u32>) {
        let ip = ip.to_canonical();
        let mut country = None;
        let mut asn = None;
        for source in &self.sources {
            let (c, a) = source.lookup(ip);
            country = country.or(c);
            asn = asn.or(a);
            if country.is_some() && asn.is_some() {
                break;
            }
        }
        (country, asn)
    }

    /// Every network the sources place in a country or ASN that `wanted`
    /// accepts (block rules by country or network), from the first source
    /// of the right kind: the networks of the first source that knows
    /// countries when `by_country`, else of the first that knows ASNs.
    pub(crate) fn networks(
        &self,
        by_country: bool,
        wanted: &dyn Fn(Option<&str>, Option<u32>) -> bool,
    ) -> Vec<Cidr> {
        for source in &self.sources {
            let found = source.networks(by_country, wanted);
            if let Some(found) = found {
                return found;
            }
        }
        Vec::new()
    }
}

impl Source {
    /// The source's networks that `wanted` accepts; None when the source
    /// knows no countries (`by_country`) or no ASNs.
    fn networks(
        &self,
        by_country: bool,
        wanted: &dyn Fn(Option<&str>, Option<u32>) -> bool,
    ) -> Option<Vec<Cidr>> {
        match self {
            Source::Csv { table, .. } => {
                if table.asn == by_country {
                    return None;
                }
                let mut out = Vec::new();
                for &(start, end, value) in &table.v4 {
                    let (c, a) = table.value(value);
                    if wanted(c, a) {
                        range_to_cidrs(start as u128, end as u128, 32, &mut out);
                    }
                }
                for &(start, end, value) in &table.v6 {
                    let (c, a) = table.value(value);
                    if wanted(c, a) {
                        range_to_cidrs(start, end, 128, &mut out);
                    }
                }
                Some(out)
            }
            Source::Mmdb { reader, .. } => {
                let kind = &reader.metadata().database_type;
                let has = if by_country {
                    kind.contains("Country") || kind.contains("City") || kind.contains("country")
                } else {
                    kind.contains("ASN") || kind.contains("asn")
                };
                if !has {
                    return None;
                }
                let mut out = Vec::new();
                let Ok(networks) = reader.networks(Default::default()) else {
                    return Some(out);
                };
                for item in networks.flatten() {
                    let Ok(network) = item.network() else {
                        continue;
                    };
                    let country = item
                        .decode_path::<String>(&maxminddb::path!["country", "iso_code"])
                        .ok()
                        .flatten()
                        .or_else(|| {
                            item.decode_path::<String>(&maxminddb::path![
                                "registered_country",
                                "iso_code"
                            ])
                            .ok()
                            .flatten()
                        })
                        .and_then(|c| country_code(&c));
                    let asn = item
                        .decode_path::<u32>(&maxminddb::path!["autonomous_system_number"])
                        .ok()
                        .flatten();
                    if wanted(country.as_deref(), asn) {
                        out.push(Cidr {
                            addr: network.ip(),
                            prefix: network.prefix(),
                        });
                    }
                }
                Some(out)
            }
        }
    }

    fn open(path: &Path) -> Result<Source> {
        let shown = path.display();
        let bytes = std::fs::read(path).with_context(|| {
            format!("cannot read GeoIP file {shown}: check the path and its permissions, or drop it from --geoip")
        })?;
        if bytes.starts_with(&[0x1f, 0x8b]) {
            bail!("GeoIP file {shown} is gzip-compressed: decompress it first (gunzip), then pass the .mmdb or .csv file to --geoip");
        }
        let tail = &bytes[bytes.len().saturating_sub(MMDB_METADATA_MAX)..];
        let has_marker = tail
            .windows(MMDB_METADATA_MARKER.len())
            .any(|w| w == MMDB_METADATA_MARKER);
        let says_mmdb = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("mmdb"));
        if has_marker {
            return open_mmdb(path, bytes);
        }
        if says_mmdb {
            bail!("GeoIP file {shown} is not a MaxMind DB (no metadata marker: truncated or damaged): download it again, or drop it from --geoip");
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            anyhow::anyhow!("GeoIP file {shown}, line {line}: not text: --geoip takes MaxMind DB (.mmdb) files and CSV files of start_ip,end_ip,country ranges")
        })?;
        let table = RangeTable::parse(&text).map_err(|e| {
            anyhow::anyhow!("GeoIP file {shown}, line {}: {}; fix or delete that line, or drop the file from --geoip", e.line, e.what)
        })?;
        Ok(Source::Csv {
            path: path.to_path_buf(),
            table,
        })
    }

    fn describe(&self) -> String {
        match self {
            Source::Mmdb { path, reader } => {
                let m = reader.metadata();
                format!(
                    "{}: MaxMind DB {} (IPv{}, {} nodes, built {})",
                    path.display(),
                    m.database_type,
                    m.ip_version,
                    m.node_count,
                    m.build_epoch
                )
            }
            Source::Csv { path, table } => format!(
                "{}: CSV, {} IPv4 and {} IPv6 ranges of {}",
                path.display(),
                table.v4.len(),
                table.v6.len(),
                if table.asn { "ASNs" } else { "countries" }
            ),
        }
    }

    fn lookup(&self, ip: IpAddr) -> (Option<String>, Option<u32>) {
        match self {
            Source::Mmdb { reader, .. } => mmdb_lookup(reader, ip).unwrap_or((None, None)),
            Source::Csv { table, .. } => table.lookup(ip),
        }
    }
}

fn open_mmdb(path: &Path, bytes: Vec<u8>) -> Result<Source> {
    let shown = path.display();
    let reader = maxminddb::Reader::from_source(bytes).map_err(|e| {
        anyhow::anyhow!("GeoIP file {shown} is a damaged MaxMind DB ({e}): download it again, or drop it from --geoip")
    })?;
    for probe in PROBES {
        let ip: IpAddr = probe.parse().expect("probe addresses parse");
        if reader.metadata().ip_version == 4 && ip.is_ipv6() {
            continue;
        }
        if let Err(e) = mmdb_lookup(&reader, ip) {
            bail!("GeoIP file {shown} is a damaged MaxMind DB (looking up {probe}: {e}): download it again, or drop it from --geoip");
        }
    }
    Ok(Source::Mmdb {
        path: path.to_path_buf(),
        reader,
    })
}

type Found = (Option<String>, Option<u32>);

fn mmdb_lookup(
    reader: &maxminddb::Reader<Vec<u8>>,
    ip: IpAddr,
) -> Result<Found, maxminddb::MaxMindDbError> {
    if reader.metadata().ip_version == 4 && ip.is_ipv6() {
        return Ok((None, None));
    }
    let result = reader.lookup(ip)?;
    if !result.has_data() {
        return Ok((None, None));
    }
    let country = result
        .decode_path::<String>(&maxminddb::path!["country", "iso_code"])?
        .or(result.decode_path::<String>(&maxminddb::path!["registered_country", "iso_code"])?)
        .and_then(|c| country_code(&c));
    let asn = result.decode_path::<u32>(&maxminddb::path!["autonomous_system_number"])?;
    Ok((country, asn))
}

/// "cn" -> "CN"; None for anything but two ASCII letters, and for "ZZ".
fn country_code(s: &str) -> Option<String> {
    let s = s.trim();
    if s.len() != 2 || !s.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    let upper = s.to_ascii_uppercase();
    (upper != "ZZ").then_some(upper)
}

/// Sorted, non-overlapping address ranges, each with a value: an index
/// into `countries` or an ASN.
#[derive(Debug, Default)]
struct RangeTable {
    asn: bool,
    countries: Vec<String>,
    v4: Vec<(u32, u32, u32)>,
    v6: Vec<(u128, u128, u32)>,
}

#[derive(Debug)]
struct CsvError {
    line: usize,
    what: String,
}

fn csv_error(line: usize, what: impl Into<String>) -> CsvError {
    CsvError {
        line,
        what: what.into(),
    }
}

/// Splits one CSV line into fields; double quotes group, `""` is a quote.
fn csv_fields(line: &str) -> Option<Vec<String>> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut field)),
            _ => field.push(c),
        }
    }
    if quoted {
        return None;
    }
    fields.push(field);
    Some(fields.into_iter().map(|f| f.trim().to_string()).collect())
}

impl RangeTable {
    fn parse(text: &str) -> Result<RangeTable, CsvError> {
        let mut table = RangeTable::default();
        let mut index: HashMap<String, u32> = HashMap::new();
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        let mut kind: Option<(bool, usize)> = None; // (asn, first line)
        let mut seen_data = false;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields = csv_fields(line).ok_or_else(|| csv_error(n, "unclosed double quote"))?;
            if fields.len() < 3 {
                return Err(csv_error(
                    n,
                    format!(
                        "{} field(s), expected start_ip,end_ip,country (DB-IP lite CSV layout)",
                        fields.len()
                    ),
                ));
            }
            let start: Result<IpAddr, _> = fields[0].parse();
            if start.is_err()
                && !seen_data
                && fields[0].chars().any(|c| c.is_ascii_alphabetic())
                && !fields[0].contains(':')
            {
                continue; // a header line such as start_ip,end_ip,country
            }
            seen_data = true;
            let start =
                start.map_err(|_| csv_error(n, format!("{:?} is not an IP address", fields[0])))?;
            let end: IpAddr = fields[1]
                .parse()
                .map_err(|_| csv_error(n, format!("{:?} is not an IP address", fields[1])))?;
            let is_asn = fields[2].bytes().all(|b| b.is_ascii_digit()) && !fields[2].is_empty();
            match kind {
                None => kind = Some((is_asn, n)),
                Some((asn, first)) if asn != is_asn => {
                    return Err(csv_error(
                        n,
                        format!(
                            "{} in the third column, but line {first} has {}: one file holds either countries or ASNs",
                            if is_asn { "an ASN" } else { "a country" },
                            if asn { "an ASN" } else { "a country" }
                        ),
                    ))
                }
                Some(_) => {}
            }
            let value = if is_asn {
                fields[2]
                    .parse::<u32>()
                    .map_err(|_| csv_error(n, format!("ASN {} is out of range", fields[2])))?
            } else {
                let Some(code) = country_code(&fields[2]) else {
                    if fields[2].eq_ignore_ascii_case("zz") {
                        continue;
                    }
                    return Err(csv_error(
                        n,
                        format!(
                            "{:?} is not a two-letter country code (ISO 3166-1 alpha-2)",
                            fields[2]
                        ),
                    ));
                };
                let next = table.countries.len() as u32;
                *index.entry(code.clone()).or_insert_with(|| {
                    table.countries.push(code);
                    next
                })
            };
            match (start, end) {
                (IpAddr::V4(s), IpAddr::V4(e)) if s <= e => {
                    v4.push((u32::from(s), u32::from(e), value, n))
                }
                (IpAddr::V6(s), IpAddr::V6(e)) if s <= e => {
                    v6.push((u128::from(s), u128::from(e), value, n))
                }
                (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                    return Err(csv_error(
                        n,
                        format!("range starts at {start}, after its end {end}"),
                    ))
                }
                _ => {
                    return Err(csv_error(
                        n,
                        format!("range from {start} to {end} mixes IPv4 and IPv6"),
                    ))
                }
            }
        }
        table.asn = kind.is_some_and(|(asn, _)| asn);
        table.v4 = sorted_disjoint(v4)?;
        table.v6 = sorted_disjoint(v6)?;
        if table.v4.is_empty() && table.v6.is_empty() {
            return Err(csv_error(
                text.lines().count().max(1),
                "no ranges in the file: expected lines of start_ip,end_ip,country",
            ));
        }
        Ok(table)
    }

    /// A range's value as (country, ASN).
    fn value(&self, value: u32) -> (Option<&str>, Option<u32>) {
        if self.asn {
            (None, Some(value))
        } else {
            (self.countries.get(value as usize).map(String::as_str), None)
        }
    }

    fn lookup(&self, ip: IpAddr) -> Found {
        let value = match ip {
            IpAddr::V4(a) => find(&self.v4, u32::from(a)),
            IpAddr::V6(a) => find(&self.v6, u128::from(a)),
        };
        match value {
            None => (None, None),
            Some(asn) if self.asn => (None, Some(asn)),
            Some(i) => (self.countries.get(i as usize).cloned(), None),
        }
    }
}

/// The fewest networks covering `start..=end` exactly (`bits`: 32 for
/// IPv4, 128 for IPv6).
fn range_to_cidrs(mut start: u128, end: u128, bits: u32, out: &mut Vec<Cidr>) {
    let addr = |n: u128| -> IpAddr {
        if bits == 32 {
            IpAddr::V4((n as u32).into())
        } else {
            IpAddr::V6(n.into())
        }
    };
    while start <= end {
        // The largest block aligned at `start` that fits before `end`.
        let mut size = if start == 0 {
            bits
        } else {
            start.trailing_zeros().min(bits)
        };
        while size > 0 && (size >= 128 || start + ((1u128 << size) - 1) > end) {
            size -= 1;
        }
        if size >= 128 {
            size = 127;
        }
        out.push(Cidr {
            addr: addr(start),
            prefix: (bits - size) as u8,
        });
        let Some(next) = start.checked_add(1u128 << size) else {
            break;
        };
        start = next;
    }
}

fn sorted_disjoint<T: Ord + Copy>(
    mut ranges: Vec<(T, T, u32, usize)>,
) -> Result<Vec<(T, T, u32)>, CsvError> {
    ranges.sort_by_key(|r| (r.0, r.1));
    for pair in ranges.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if b.0 <= a.1 {
            let (first, second) = (a.3.min(b.3), a.3.max(b.3));
            return Err(csv_error(
                second,
                format!("this range overlaps the one on line {first}: split them so each address is in one range"),
            ));
        }
    }
    Ok(ranges.into_iter().map(|(s, e, v, _)| (s, e, v)).collect())
}

fn find<T: Ord + Copy>(ranges: &[(T, T, u32)], ip: T) -> Option<u32> {
    let after = ranges.partition_point(|r| r.0 <= ip);
    let r = ranges.get(after.checked_sub(1)?)?;
    (ip <= r.1).then_some(r.2)
}

/// A minimal MaxMind DB writer, so tests (these and the end-to-end ones)
/// can build their own databases. It follows the MaxMind DB File Format
/// Specification 2.0: a binary search tree of 24-bit records, a 16-byte
/// zero separator, the data section, then the metadata marker and the
/// metadata map. No pointers or deduplication in the data section.
#[cfg(test)]
pub(crate) mod testdb {
    use std::net::IpAddr;

    /// A value of the MaxMind DB data section.
    #[derive(Debug, Clone, PartialEq)]
    pub(crate) enum Value {
        Str(String),
        U16(u16),
        U32(u32),
        U64(u64),
        Map(Vec<(String, Value)>),
        Array(Vec<Value>),
    }

    pub(crate) fn s(v: &str) -> Value {
        Value::Str(v.to_string())
    }

    /// `{"country": {"iso_code": CODE, "names": {"en": NAME}}}` as in
    /// GeoLite2-Country.
    pub(crate) fn country(code: &str, name: &str) -> Value {
        Value::Map(vec![(
            "country".into(),
            Value::Map(vec![
                ("iso_code".into(), s(code)),
                ("names".into(), Value::Map(vec![("en".into(), s(name))])),
            ]),
        )])
    }

    /// `{"autonomous_system_number": ASN, "autonomous_system_organization":
    /// ORG}` as in GeoLite2-ASN.
    pub(crate) fn asn(number: u32, org: &str) -> Value {
        Value::Map(vec![
            ("autonomous_system_number".into(), Value::U32(number)),
            ("autonomous_system_organization".into(), s(org)),
        ])
    }

    fn control(out: &mut Vec<u8>, kind: u8, size: usize) {
        let (first, extra): (u8, Vec<u8>) = if size < 29 {
            (size as u8, vec![])
        } else if size < 29 + 256 {
            (29, vec![(size - 29) as u8])
        } else if size < 285 + 65536 {
            (30, ((size - 285) as u16).to_be_bytes().to_vec())
        } else {
            (31, ((size - 65821) as u32).to_be_bytes()[1..].to_vec())
        };
        if kind <= 7 {
            out.push(kind << 5 | first);
        } else {
            out.push(first);
            out.push(kind - 7);
        }
        out.extend_from_slice(&extra);
    }

    fn uint(out: &mut Vec<u8>, kind: u8, v: u64) {
        let bytes = v.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        control(out, kind, 8 - skip);
        out.extend_from_slice(&bytes[skip..]);
    }

    /// Appends the encoding of `v`.
    pub(crate) fn encode(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::Str(s) => {
                control(out, 2, s.len());
                out.extend_from_slice(s.as_bytes());
            }
            Value::U16(n) => uint(out, 5, u64::from(*n)),
            Value::U32(n) => uint(out, 6, u64::from(*n)),
            Value::U64(n) => uint(out, 9, *n),
            Value::Map(entries) => {
                control(out, 7, entries.len());
                for (k, v) in entries {
                    encode(out, &Value::Str(k.clone()));
                    encode(out, v);
                }
            }
            Value::Array(items) => {
                control(out, 11, items.len());
                for v in items {
                    encode(out, v);
                }
            }
        }
    }

    #[derive(Clone, Copy)]
    enum Child {
        Empty,
        Node(usize),
        Data(usize),
    }

    /// A database of `database_type` whose search tree is for IPv4 (32
    /// bits) or IPv6 (128 bits; IPv4 networks then live under ::/96, as
    /// in MaxMind's files). `networks`: (address, prefix length, record).
    pub(crate) fn mmdb(
        database_type: &str,
        ip_version: u16,
        networks: &[(IpAddr, u8, Value)],
    ) -> Vec<u8> {
        let bits = if ip_version == 4 { 32 } else { 128 };
        let mut nodes: Vec<[Child; 2]> = vec![[Child::Empty; 2]];
        let mut data = Vec::new();
        for (addr, prefix, value) in networks {
            let (key, key_prefix) = match addr {
                IpAddr::V4(a) if bits == 32 => (u128::from(u32::from(*a)) << 96, *prefix),
                IpAddr::V4(a) => (u128::from(u32::from(*a)), 96 + *prefix),
                IpAddr::V6(a) => (u128::from(*a), *prefix),
            };
            assert!(
                key_prefix >= 1 && usize::from(key_prefix) <= bits,
                "prefix out of range"
            );
            let offset = data.len();
            encode(&mut data, value);
            let mut node = 0;
            for depth in 0..usize::from(key_prefix) {
                let bit = ((key >> (127 - depth)) & 1) as usize;
                if depth + 1 == usize::from(key_prefix) {
                    nodes[node][bit] = Child::Data(offset);
                    break;
                }
                node = match nodes[node][bit] {
                    Child::Node(n) => n,
                    _ => {
                        nodes.push([Child::Empty; 2]);
                        let n = nodes.len() - 1;
                        nodes[node][bit] = Child::Node(n);
                        n
                    }
                };
            }
        }
        let count = nodes.len();
        let mut out = Vec::new();
        for node in &nodes {
            for child in node {
                let record = match child {
                    Child::Empty => count,
                    Child::Node(n) => *n,
                    Child::Data(offset) => count + 16 + offset,
                };
                out.extend_from_slice(&(record as u32).to_be_bytes()[1..]);
            }
        }
        out.extend_from_slice(&[0; 16]);
        out.extend_from_slice(&data);
        out.extend_from_slice(super::MMDB_METADATA_MARKER);
        let metadata = Value::Map(vec![
            ("binary_format_major_version".into(), Value::U16(2)),
            ("binary_format_minor_version".into(), Value::U16(0)),
            ("build_epoch".into(), Value::U64(1_700_000_000)),
            ("database_type".into(), s(database_type)),
            (
                "description".into(),
                Value::Map(vec![("en".into(), s("egressmon test database"))]),
            ),
            ("ip_version".into(), Value::U16(ip_version)),
            ("languages".into(), Value::Array(vec![s("en")])),
            ("node_count".into(), Value::U32(count as u32)),
            ("record_size".into(), Value::U16(24)),
        ]);
        encode(&mut out, &metadata);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testdb::*;
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_become_the_fewest_networks_and_csv_countries_expand() {
        let cidrs = |a: &str, b: &str| {
            let (a, b) = (ip(a), ip(b));
            let mut out = Vec::new();
            match (a, b) {
                (IpAddr::V4(a), IpAddr::V4(b)) => {
                    range_to_cidrs(u32::from(a).into(), u32::from(b).into(), 32, &mut out)
                }
                (IpAddr::V6(a), IpAddr::V6(b)) => range_to_cidrs(a.into(), b.into(), 128, &mut out),
                _ => unreachable!(),
            }
            out.iter().map(ToString::to_string).collect::<Vec<_>>()
        };
        assert_eq!(cidrs("10.0.0.0", "10.0.1.255"), ["10.0.0.0/23"]);
        assert_eq!(
            cidrs("10.0.0.1", "10.0.0.6"),
            ["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/31", "10.0.0.6/32"]
        );
        assert_eq!(cidrs("0.0.0.0", "255.255.255.255"), ["0.0.0.0/0"]);
        assert_eq!(cidrs("2001:db8::", "2001:db8::ffff"), ["2001:db8::/112"]);
        let dir = Dir::new("networks");
        let csv = dir.file(
            "c.csv",
            b"10.200.0.0,10.200.0.255,CN\n10.201.0.0,10.201.0.9,US\n2001:db8::,2001:db8::ff,CN\n",
        );
        let geo = GeoIp::open(&[csv]).unwrap();
        let cn: Vec<String> = geo
            .networks(true, &|c, _| c == Some("CN"))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(cn, ["10.200.0.0/24", "2001:db8::/120"]);
        assert!(
            geo.networks(false, &|_, _| true).is_empty(),
            "no ASN source"
        );
    }

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let dir =
                std::env::temp_dir().join(format!("egressmon-geoip-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn country_db() -> Vec<u8> {
        mmdb(
            "GeoLite2-Country",
            6,
            &[
                (ip("203.0.113.0"), 24, country("CN", "China")),
                (ip("198.51.100.0"), 25, country("DE", "Germany")),
                (ip("2001:db8:cafe::"), 48, country("JP", "Japan")),
                (
                    ip("192.0.2.0"),
                    24,
                    Value::Map(vec![(
                        "registered_country".into(),
                        Value::Map(vec![("iso_code".into(), s("fr"))]),
                    )]),
                ),
            ],
        )
    }

    fn asn_db() -> Vec<u8> {
        mmdb(
            "GeoLite2-ASN",
            6,
            &[
                (ip("203.0.113.0"), 24, asn(4134, "Chinanet")),
                (ip("2001:db8::"), 32, asn(64500, "Example IPv6 network")),
            ],
        )
    }

    #[test]
    fn mmdb_networks_of_a_country_and_an_asn() {
        let dir = Dir::new("mmdb-networks");
        let c = dir.file("GeoLite2-Country.mmdb", &country_db());
        let a = dir.file("GeoLite2-ASN.mmdb", &asn_db());
        let geo = GeoIp::open(&[c, a]).unwrap();
        let names = |by_country, wanted: &dyn Fn(Option<&str>, Option<u32>) -> bool| {
            let mut found: Vec<String> = geo
                .networks(by_country, wanted)
                .iter()
                .map(ToString::to_string)
                .collect();
            found.sort();
            found
        };
        assert_eq!(names(true, &|c, _| c == Some("CN")), ["203.0.113.0/24"]);
        // registered_country stands in where country is missing.
        assert_eq!(names(true, &|c, _| c == Some("FR")), ["192.0.2.0/24"]);
        assert_eq!(names(false, &|_, a| a == Some(64500)), ["2001:db8::/32"]);
    }

    #[test]
    fn mmdb_country_and_asn_through_the_maxminddb_crate() {
        let dir = Dir::new("mmdb");
        let c = dir.file("GeoLite2-Country.mmdb", &country_db());
        let a = dir.file("GeoLite2-ASN.mmdb", &asn_db());
        let geo = GeoIp::open(&[c, a]).unwrap();
        assert_eq!(
            geo.lookup(ip("203.0.113.7")),
            (Some("CN".into()), Some(4134))
        );
        assert_eq!(geo.lookup(ip("198.51.100.1")), (Some("DE".into()), None));
        assert_eq!(
            geo.lookup(ip("198.51.100.200")),
            (None, None),
            "outside the /25"
        );
        assert_eq!(
            geo.lookup(ip("2001:db8:cafe::1")),
            (Some("JP".into()), Some(64500))
        );
        assert_eq!(geo.lookup(ip("2001:db8:beef::1")), (None, Some(64500)));
        assert_eq!(
            geo.lookup(ip("192.0.2.1")),
            (Some("FR".into()), None),
            "registered_country"
        );
        assert_eq!(
            geo.lookup(ip("::ffff:203.0.113.9")),
            (Some("CN".into()), Some(4134)),
            "IPv4-mapped"
        );
        assert_eq!(geo.lookup(ip("10.0.0.1")), (None, None));
        let described = geo.describe();
        assert!(
            described[0].contains("MaxMind DB GeoLite2-Country"),
            "{described:?}"
        );
        assert!(!geo.is_empty());
        assert!(GeoIp::empty().is_empty());
        assert_eq!(GeoIp::empty().lookup(ip("203.0.113.7")), (None, None));
    }

    #[test]
    fn ipv4_only_mmdb() {
        let dir = Dir::new("mmdb4");
        let db = mmdb(
            "DBIP-Country-Lite",
            4,
            &[(ip("203.0.113.0"), 24, country("CN", "China"))],
        );
        let geo = GeoIp::open(&[dir.file("dbip.mmdb", &db)]).unwrap();
        assert_eq!(geo.lookup(ip("203.0.113.1")).0.as_deref(), Some("CN"));
        assert_eq!(geo.lookup(ip("2001:db8::1")), (None, None));
    }

    #[test]
    fn csv_country_ranges_ipv4_and_ipv6() {
        let dir = Dir::new("csv");
        let csv = "\
# DB-IP lite layout
1.0.0.0,1.0.0.255,AU
\"203.0.113.0\",\"203.0.113.255\",\"cn\"

2001:db8::,2001:db8:ffff:ffff:ffff:ffff:ffff:ffff,JP
10.0.0.0,10.255.255.255,ZZ
198.51.100.0,198.51.100.0,DE
";
        let geo = GeoIp::open(&[dir.file("dbip-country-lite.csv", csv.as_bytes())]).unwrap();
        assert_eq!(geo.lookup(ip("1.0.0.0")).0.as_deref(), Some("AU"));
        assert_eq!(geo.lookup(ip("1.0.0.255")).0.as_deref(), Some("AU"));
        assert_eq!(geo.lookup(ip("1.0.1.0")).0, None);
        assert_eq!(geo.lookup(ip("0.255.255.255")).0, None);
        assert_eq!(geo.lookup(ip("203.0.113.77")).0.as_deref(), Some("CN"));
        assert_eq!(geo.lookup(ip("2001:db8::5")).0.as_deref(), Some("JP"));
        assert_eq!(geo.lookup(ip("2001:db9::")).0, None);
        assert_eq!(geo.lookup(ip("10.1.2.3")).0, None, "ZZ is no country");
        assert_eq!(geo.lookup(ip("198.51.100.0")).0.as_deref(), Some("DE"));
        assert_eq!(geo.lookup(ip("198.51.100.1")).0, None);
        assert!(
            geo.describe()[0].contains("3 IPv4 and 1 IPv6 ranges of countries"),
            "{:?}",
            geo.describe()
        );
    }

    #[test]
    fn csv_asn_ranges_and_source_order() {
        let dir = Dir::new("asn");
        let asn_csv =
            "start_ip,end_ip,asn,org\n203.0.113.0,203.0.113.255,4134,\"Chinanet, backbone\"\n";
        let a = dir.file("dbip-asn-lite.csv", asn_csv.as_bytes());
        let first = dir.file("first.csv", b"203.0.113.0,203.0.113.127,HK\n");
        let second = dir.file("second.csv", b"203.0.113.0,203.0.113.255,CN\n");
        let geo = GeoIp::open(&[first, second, a]).unwrap();
        assert_eq!(
            geo.lookup(ip("203.0.113.1")),
            (Some("HK".into()), Some(4134))
        );
        assert_eq!(
            geo.lookup(ip("203.0.113.200")),
            (Some("CN".into()), Some(4134))
        );
    }

    #[test]
    fn lookups_use_binary_search_over_many_ranges() {
        let mut csv = String::new();
        for i in 0..=255u32 {
            for j in (0..=255u32).step_by(2) {
                csv.push_str(&format!(
                    "10.{i}.{j}.0,10.{i}.{j}.255,{}\n",
                    if j % 4 == 0 { "AA" } else { "BB" }
                ));
            }
        }
        let table = RangeTable::parse(&csv).unwrap();
        assert_eq!(table.v4.len(), 256 * 128);
        assert_eq!(table.lookup(ip("10.7.4.9")).0.as_deref(), Some("AA"));
        assert_eq!(table.lookup(ip("10.7.6.9")).0.as_deref(), Some("BB"));
        assert_eq!(table.lookup(ip("10.7.5.9")).0, None);
        assert_eq!(table.lookup(ip("10.255.254.255")).0.as_deref(), Some("BB"));
        assert_eq!(table.lookup(ip("11.0.0.0")).0, None);
    }

    fn open_err(dir: &Dir, name: &str, bytes: &[u8]) -> String {
        let path = dir.file(name, bytes);
        format!("{:#}", GeoIp::open(&[path]).unwrap_err())
    }

    #[test]
    fn bad_csv_lines_are_named() {
        let dir = Dir::new("badcsv");
        let cases: &[(&str, &str)] = &[
            (
                "1.0.0.0,1.0.0.255,AU\n1.0.1.0,nope,AU\n",
                "line 2: \"nope\" is not an IP address",
            ),
            (
                "1.0.0.0,1.0.0.255\n",
                "line 1: 2 field(s), expected start_ip,end_ip,country",
            ),
            (
                "1.0.0.0,1.0.0.255,Australia\n",
                "line 1: \"Australia\" is not a two-letter country code",
            ),
            (
                "1.0.0.9,1.0.0.1,AU\n",
                "line 1: range starts at 1.0.0.9, after its end 1.0.0.1",
            ),
            (
                "1.0.0.0,::1,AU\n",
                "line 1: range from 1.0.0.0 to ::1 mixes IPv4 and IPv6",
            ),
            (
                "1.0.0.0,1.0.0.255,AU\n\n1.0.0.128,1.0.1.0,NZ\n",
                "line 3: this range overlaps the one on line 1",
            ),
            (
                "1.0.0.0,1.0.0.255,AU\n2.0.0.0,2.0.0.255,13335\n",
                "line 2: an ASN in the third column, but line 1 has a country",
            ),
            (
                "1.0.0.0,1.0.0.255,99999999999\n",
                "line 1: ASN 99999999999 is out of range",
            ),
            ("\"1.0.0.0,1.0.0.255,AU\n", "line 1: unclosed double quote"),
            ("# nothing\n\n", "line 2: no ranges in the file"),
        ];
        for (csv, want) in cases {
            let err = open_err(&dir, "ranges.csv", csv.as_bytes());
            assert!(err.contains(want), "{csv:?}: {err}");
            assert!(err.contains("ranges.csv"), "{err}");
            assert!(err.contains("fix or delete that line"), "{err}");
        }
        let err = open_err(&dir, "binary.dat", &[b'1', b'\n', 0xff, 0xfe]);
        assert!(err.contains("binary.dat, line 2: not text"), "{err}");
    }

    #[test]
    fn unreadable_and_corrupt_files_are_refused_clearly() {
        let dir = Dir::new("corrupt");
        let missing = dir.0.join("missing.mmdb");
        let err = format!("{:#}", GeoIp::open(&[missing]).unwrap_err());
        assert!(
            err.contains("cannot read GeoIP file") && err.contains("missing.mmdb"),
            "{err}"
        );
        let err = open_err(&dir, "gz.mmdb", &[0x1f, 0x8b, 8, 0]);
        assert!(
            err.contains("gzip-compressed: decompress it first"),
            "{err}"
        );
        // Truncated: the metadata at the end is gone.
        let db = country_db();
        let err = open_err(&dir, "cut.mmdb", &db[..db.len() / 2]);
        assert!(
            err.contains("cut.mmdb is not a MaxMind DB (no metadata marker"),
            "{err}"
        );
        // Metadata that is not a valid map.
        let marker = db
            .windows(14)
            .position(|w| w == MMDB_METADATA_MARKER)
            .unwrap();
        let mut bad_meta = db[..marker + 14].to_vec();
        bad_meta.extend_from_slice(&[0xff, 0xff, 0xff]);
        let err = open_err(&dir, "meta.mmdb", &bad_meta);
        assert!(err.contains("meta.mmdb is a damaged MaxMind DB"), "{err}");
        assert!(err.contains("download it again"), "{err}");
        // A search tree pointing outside the data section.
        let mut bad_tree = db.clone();
        for b in &mut bad_tree[..60] {
            *b = 0xee;
        }
        let err = open_err(&dir, "tree.mmdb", &bad_tree);
        assert!(err.contains("tree.mmdb is a damaged MaxMind DB"), "{err}");
        // One bad file among good ones fails the whole set, naming it.
        let good = dir.file("good.csv", b"1.0.0.0,1.0.0.255,AU\n");
        let bad = dir.file("bad.csv", b"x,y,z\n1,2,3\n");
        let err = format!("{:#}", GeoIp::open(&[good, bad]).unwrap_err());
        assert!(err.contains("bad.csv, line 2"), "{err}");
    }
}
