//! Alert rules: which flows deserve an `alert` event and a count in
//! `egressmon_alerts_total{rule}`.
//!
//! Owns: the rules file format (TOML, `--rules FILE`), checking it (a bad
//! file is refused with its line, column and what is wrong), the shipped
//! default rules, and matching flows against the rules, including the one
//! piece of state a rule can need: the countries each owner has reached.
//!
//! ```toml
//! defaults = true            # keep the shipped rules (the default)
//!
//! [[rule]]
//! name = "platform-to-cn"    # required, unique: the metric label
//! firmware = true            # every condition given must hold;
//! country = ["CN", "HK"]     # a list matches any of its values
//! ```
//!
//! Conditions (all optional, at least one per rule): `uid`, `owner` (glob,
//! matched against the owner and each of its packages), `package` (glob,
//! packages only), `origin` (app, preinstalled, platform, user, system,
//! unknown), `firmware` (bool), `host` (glob; a flow without a host name
//! does not match), `country` (ISO code), `asn`, `port`, `proto` (tcp,
//! udp, icmp, icmpv6, or ipN for protocol number N), `payload` (tls, quic,
//! http, dns, cleartext, unknown), `leak` (glob of identifier names: the
//! flow carried a device identifier so named, in any form; `"*"` for any),
//! `new_country` (bool: the flow's country is one its owner had
//! not reached before, since the agent started or since the state it was
//! given with [`Rules::learn_country`]). Every condition but `firmware`,
//! `new_country` and `scope` takes one value or a list. Globs: `*` any run of
//! characters, `?` one character, `[abc]`, `[a-z]`, `[!a-z]`, `\` escapes;
//! matching ignores ASCII case.
//!
//! Scope: traffic to loopback and link-local destinations never reaches
//! another network (see [`Scope::of`]), so it is counted but a rule leaves
//! it alone unless it says otherwise: `scope = "remote"` (the default),
//! `"local"` (loopback and link-local only; this alone is a condition) or
//! `"any"`.
//!
//! Shipped defaults, on unless the file says `defaults = false` (a rule of
//! the file with the same name replaces a default): `firmware-cleartext`
//! (firmware sending `http` or `cleartext` payload),
//! `firmware-new-country` (firmware reaching a country it had never reached
//! before) and `firmware-identifier-leak` (firmware sending one of the
//! device's identifiers where it can be read).
//!
//! When to evaluate: [`Rules::evaluate`] answers for one flow as it is now.
//! The caller calls it once when a flow appears and again only when a field
//! a rule can look at changes (host, country, asn, payload, leaks, owner,
//! origin),
//! not on every counter update, so that one flow raises an alert once.
//! `new_country` is stateful: the first evaluation of a flow records its
//! country for its owner, so a second evaluation of the same flow no longer
//! sees it as new.

use crate::identity::owners::Owner;
use crate::pipeline::flows::FlowRecord;
use crate::pipeline::vocab::{Origin, Payload, Proto};
use anyhow::{anyhow, Context, Result};
use serde::de::{self, Deserializer, IntoDeserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::marker::PhantomData;
use std::net::IpAddr;
use std::path::Path;

/// The shipped rules, in the rules file format.
pub(crate) const DEFAULT_RULES: &str = r#"
[[rule]]
name = "firmware-cleartext"
firmware = true
payload = ["http", "cleartext"]

[[rule]]
name = "firmware-new-country"
firmware = true
new_country = true

[[rule]]
name = "firmware-identifier-leak"
firmware = true
leak = "*"
"#;

/// Owners whose reached countries are remembered at most (each holds at
/// most the ~250 country codes).
const MAX_OWNERS_TRACKED: usize = 65_536;

/// One value or a list of values; matches if any matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AnyOf<T>(pub(crate) Vec<T>);

impl<T> AnyOf<T> {
    pub(crate) fn any(&self, f: impl FnMut(&T) -> bool) -> bool {
        self.0.iter().any(f)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for AnyOf<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = AnyOf<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AnyOf<T>, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                if out.is_empty() {
                    return Err(de::Error::custom("an empty list matches nothing: give at least one value or leave the condition out"));
                }
                Ok(AnyOf(out))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<AnyOf<T>, E> {
                T::deserialize(v.into_deserializer()).map(|v| AnyOf(vec![v]))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<AnyOf<T>, E> {
                T::deserialize(v.into_deserializer()).map(|v| AnyOf(vec![v]))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<AnyOf<T>, E> {
                T::deserialize(v.into_deserializer()).map(|v| AnyOf(vec![v]))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<AnyOf<T>, E> {
                T::deserialize(v.into_deserializer()).map(|v| AnyOf(vec![v]))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// A compiled glob pattern (see the module documentation for the syntax),
/// matched by `globset` with ASCII case ignored. Rules files predate it, so
/// two of its extensions keep their old meaning: a run of `*` is one `*`
/// (not a path wildcard), and braces are plain characters (no alternation).
#[derive(Debug, Clone)]
pub(crate) struct Glob {
    pattern: String,
    matcher: globset::GlobMatcher,
}

impl PartialEq for Glob {
    fn eq(&self, other: &Glob) -> bool {
        self.pattern == other.pattern
    }
}

impl Eq for Glob {}

impl Glob {
    pub(crate) fn new(pattern: &str) -> Result<Glob, String> {
        if pattern.is_empty() {
            return Err("empty glob: use \"*\" to match anything".into());
        }
        let mut plain = String::with_capacity(pattern.len());
        let mut chars = pattern.chars();
        while let Some(c) = chars.next() {
            match c {
                '*' if plain.ends_with('*') && !plain.ends_with("\\*") => {}
                '\\' => {
                    plain.push('\\');
                    plain.push(chars.next().ok_or_else(|| {
                        format!(
                            "bad glob {pattern:?}: it ends in a lone \\ (write \\\\ for a backslash)"
                        )
                    })?);
                }
                '{' | '}' => {
                    plain.push('\\');
                    plain.push(c);
                }
                c => plain.push(c),
            }
        }
        let matcher = globset::GlobBuilder::new(&plain)
            .case_insensitive(true)
            .literal_separator(false)
            .backslash_escape(true)
            .build()
            .map_err(|e| {
                let why = match e.kind() {
                    globset::ErrorKind::UnclosedClass => {
                        "[ is never closed (write \\[ for a bracket)".to_string()
                    }
                    globset::ErrorKind::InvalidRange(lo, hi) => {
                        format!("range {lo}-{hi} is backwards")
                    }
                    other => other.to_string(),
                };
                format!("bad glob {pattern:?}: {why}")
            })?
            .compile_matcher();
        Ok(Glob {
            pattern: pattern.to_string(),
            matcher,
        })
    }

    #[cfg(test)]
    pub(crate) fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether the whole of `text` matches (ASCII case ignored).
    pub(crate) fn matches(&self, text: &str) -> bool {
        self.matcher.is_match(text)
    }
}

impl<'de> Deserialize<'de> for Glob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Glob::new(&s).map_err(de::Error::custom)
    }
}

/// A country code: two ASCII letters, kept uppercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Country(String);

impl Country {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Country {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() == 2 && s.bytes().all(|b| b.is_ascii_alphabetic()) {
            Ok(Country(s.to_ascii_uppercase()))
        } else {
            Err(de::Error::custom(format!(
                "bad country {s:?}: use a two-letter ISO 3166-1 code such as \"CN\""
            )))
        }
    }
}

/// Where a destination is, as far as alerting goes (`scope` in the flow
/// table).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    #[default]
    Remote,
    /// This host: 127.0.0.0/8, ::1, and the unspecified address (a connect
    /// to 0.0.0.0 or :: reaches this host on Linux).
    Loopback,
    /// The attached link and nothing beyond: 169.254.0.0/16, fe80::/10, and
    /// link-scope multicast (224.0.0.0/24, ff02::/16: mDNS, LLMNR, router
    /// solicitations), which routers never forward.
    LinkLocal,
}

impl Scope {
    /// The scope of a destination; IPv4-mapped IPv6 addresses
    /// (::ffff:127.0.0.1) are judged as the IPv4 address they carry.
    pub(crate) fn of(addr: IpAddr) -> Scope {
        match addr.to_canonical() {
            IpAddr::V4(a) if a.is_loopback() || a.is_unspecified() => Scope::Loopback,
            IpAddr::V4(a) if a.is_link_local() || a.octets()[..3] == [224, 0, 0] => {
                Scope::LinkLocal
            }
            IpAddr::V6(a) if a.is_loopback() || a.is_unspecified() => Scope::Loopback,
            IpAddr::V6(a) if a.is_multicast() => match a.octets()[1] & 0x0f {
                1 => Scope::Loopback,
                2 => Scope::LinkLocal,
                _ => Scope::Remote,
            },
            IpAddr::V6(a) if a.is_unicast_link_local() => Scope::LinkLocal,
            _ => Scope::Remote,
        }
    }

    /// Traffic that stays on this host or its link.
    pub(crate) fn is_local(self) -> bool {
        self != Scope::Remote
    }
}

/// The destinations a rule looks at (`scope` in a rule).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RuleScope {
    /// Destinations beyond this host and its link (the default).
    #[default]
    Remote,
    /// Loopback and link-local destinations only.
    Local,
    Any,
}

impl RuleScope {
    fn admits(self, scope: Scope) -> bool {
        match self {
            RuleScope::Remote => !scope.is_local(),
            RuleScope::Local => scope.is_local(),
            RuleScope::Any => true,
        }
    }
}

/// One `[[rule]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Rule {
    pub(crate) name: String,
    pub(crate) uid: Option<AnyOf<u32>>,
    pub(crate) owner: Option<AnyOf<Glob>>,
    pub(crate) package: Option<AnyOf<Glob>>,
    pub(crate) origin: Option<AnyOf<Origin>>,
    pub(crate) firmware: Option<bool>,
    pub(crate) host: Option<AnyOf<Glob>>,
    pub(crate) country: Option<AnyOf<Country>>,
    pub(crate) asn: Option<AnyOf<u32>>,
    pub(crate) port: Option<AnyOf<u16>>,
    pub(crate) proto: Option<AnyOf<Proto>>,
    pub(crate) payload: Option<AnyOf<Payload>>,
    pub(crate) leak: Option<AnyOf<Glob>>,
    pub(crate) new_country: Option<bool>,
    /// Destination addresses or networks (`"203.0.113.0/24"`, `"2001:db8::1"`).
    pub(crate) dst: Option<AnyOf<Cidr>>,
    #[serde(default)]
    pub(crate) scope: RuleScope,
    /// `alert` (the default) or `block` (see `crate::block`).
    #[serde(default)]
    pub(crate) action: Action,
    /// Block rules: `dry-run` (the default) counts what would be refused,
    /// `enforce` refuses it.
    pub(crate) mode: Option<BlockMode>,
    /// Block rules: allow a rule that would refuse uids the device needs
    /// (see `crate::block::GUARDED_UIDS`).
    pub(crate) force: Option<bool>,
}

/// What a rule does with the flows it matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Action {
    #[default]
    Alert,
    Block,
}

/// Whether a block rule refuses or only counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockMode {
    #[default]
    DryRun,
    Enforce,
}

impl fmt::Display for BlockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockMode::DryRun => "dry-run",
            BlockMode::Enforce => "enforce",
        })
    }
}

/// An address or network: `a.b.c.d`, `a.b.c.d/n`, `x::y`, `x::y/n`
/// (bits beyond the prefix must be zero). IPv4-mapped IPv6 networks are
/// kept as the IPv4 network they carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Cidr {
    pub(crate) addr: IpAddr,
    pub(crate) prefix: u8,
}

impl Cidr {
    pub(crate) fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| {
            format!("bad address {text:?}: give an address or network such as \"203.0.113.0/24\" or \"2001:db8::/32\"")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("bad prefix length in {text:?}: 0 to {max}"))?,
            None => max,
        };
        let cidr = Cidr { addr, prefix };
        if cidr.network() != addr {
            return Err(format!(
                "{text:?} has bits set beyond its /{prefix}: write {}/{prefix}",
                cidr.network()
            ));
        }
        // ::ffff:a.b.c.d/n is the IPv4 network a.b.c.d/(n-96).
        if let IpAddr::V6(v6) = addr {
            if let (Some(v4), true) = (v6.to_ipv4_mapped(), prefix >= 96) {
                return Ok(Cidr {
                    addr: IpAddr::V4(v4),
                    prefix: prefix - 96,
                });
            }
        }
        Ok(cidr)
    }

    /// The address with the bits beyond the prefix cleared.
    pub(crate) fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                Cidr {
                    addr: ip,
                    prefix: self.prefix,
                }
                .network()
                    == self.addr
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Cidr::parse(&s).map_err(de::Error::custom)
    }
}

impl Rule {
    fn has_conditions(&self) -> bool {
        self.uid.is_some()
            || self.owner.is_some()
            || self.package.is_some()
            || self.origin.is_some()
            || self.firmware.is_some()
            || self.host.is_some()
            || self.country.is_some()
            || self.asn.is_some()
            || self.port.is_some()
            || self.proto.is_some()
            || self.payload.is_some()
            || self.leak.is_some()
            || self.new_country.is_some()
            || self.dst.is_some()
            || self.scope == RuleScope::Local
    }

    pub(crate) fn is_block(&self) -> bool {
        self.action == Action::Block
    }

    pub(crate) fn mode(&self) -> BlockMode {
        self.mode.unwrap_or_default()
    }

    /// What makes this rule unusable, if anything (beyond what parsing
    /// checks): block-only keys on an alert rule, conditions the kernel
    /// cannot decide at connect() time on a block rule.
    pub(crate) fn problem(&self) -> Option<String> {
        let name = &self.name;
        if !self.is_block() {
            return (self.mode.is_some() || self.force.is_some()).then(|| {
                format!("rule {name:?} sets mode or force, which only block rules take: add action = \"block\" or remove them")
            });
        }
        if self.new_country.is_some() {
            return Some(format!("block rule {name:?} uses new_country, which cannot decide a block (whether a country is new changes as flows come): name the countries with country = [...]"));
        }
        if self.port.as_ref().is_some_and(|p| p.0.len() > 4) {
            return Some(format!(
                "block rule {name:?} lists more than 4 ports: split it into rules of at most 4"
            ));
        }
        if self
            .proto
            .as_ref()
            .is_some_and(|p| p.any(|p| !matches!(p, Proto::Tcp | Proto::Udp)))
        {
            return Some(format!("block rule {name:?} names a protocol other than tcp or udp: egressmon blocks TCP and UDP only"));
        }
        let places = [
            self.dst.is_some(),
            self.country.is_some(),
            self.asn.is_some(),
        ];
        if places.iter().filter(|&&p| p).count() > 1 {
            return Some(format!("block rule {name:?} combines dst, country and asn: give one of them per block rule (split it into several rules)"));
        }
        None
    }

    /// Whether the rule's conditions on who sends (uid, owner, package,
    /// origin, firmware) hold for `owner`.
    pub(crate) fn admits_owner(&self, owner: &Owner) -> bool {
        fn check<T>(cond: &Option<T>, f: impl FnOnce(&T) -> bool) -> bool {
            cond.as_ref().is_none_or(f)
        }
        check(&self.uid, |c| c.any(|u| *u == owner.uid))
            && check(&self.owner, |c| {
                c.any(|g| g.matches(&owner.owner) || owner.packages.iter().any(|p| g.matches(p)))
            })
            && check(&self.package, |c| {
                c.any(|g| owner.packages.iter().any(|p| g.matches(p)))
            })
            && check(&self.origin, |c| c.any(|o| *o == owner.origin))
            && check(&self.firmware, |f| *f == owner.firmware)
    }

    /// Whether the rule names who it applies to (else: every uid).
    pub(crate) fn names_senders(&self) -> bool {
        self.uid.is_some()
            || self.owner.is_some()
            || self.package.is_some()
            || self.origin.is_some()
            || self.firmware.is_some()
    }

    /// Whether the rule's conditions on where (dst, country, asn) hold for
    /// `ip` placed in `country` and `asn`.
    pub(crate) fn admits_place(&self, ip: IpAddr, country: Option<&str>, asn: Option<u32>) -> bool {
        self.dst.as_ref().is_none_or(|c| c.any(|n| n.contains(ip)))
            && self.country.as_ref().is_none_or(|c| {
                country.is_some_and(|fc| c.any(|x| x.as_str().eq_ignore_ascii_case(fc)))
            })
            && self
                .asn
                .as_ref()
                .is_none_or(|c| asn.is_some_and(|a| c.any(|x| *x == a)))
    }

    /// Whether `name` matches the rule's host globs (true without any).
    pub(crate) fn admits_host(&self, name: &str) -> bool {
        self.host
            .as_ref()
            .is_none_or(|c| c.any(|g| g.matches(name)))
    }

    /// Whether `flow` meets every condition; `new_country` says whether the
    /// flow's country is new for its owner.
    pub(crate) fn matches(&self, flow: &FlowRecord, new_country: bool) -> bool {
        fn check<T>(cond: &Option<T>, f: impl FnOnce(&T) -> bool) -> bool {
            cond.as_ref().is_none_or(f)
        }
        self.admits_owner(&flow.uid_owner)
            && check(&self.host, |c| {
                flow.host
                    .as_deref()
                    .is_some_and(|h| c.any(|g| g.matches(h)))
            })
            && check(&self.country, |c| {
                flow.country
                    .as_deref()
                    .is_some_and(|fc| c.any(|x| x.as_str().eq_ignore_ascii_case(fc)))
            })
            && check(&self.asn, |c| flow.asn.is_some_and(|a| c.any(|x| *x == a)))
            && check(&self.port, |c| c.any(|p| *p == flow.port))
            && check(&self.proto, |c| c.any(|p| *p == flow.proto))
            && check(&self.payload, |c| c.any(|p| *p == flow.payload))
            && check(&self.leak, |c| {
                flow.leaks.iter().any(|leak| {
                    let (name, _) = crate::enrich::evidence::split_leak(leak);
                    c.any(|g| g.matches(name))
                })
            })
            && check(&self.new_country, |n| *n == new_country)
            && check(&self.dst, |c| {
                flow.dst
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| c.any(|n| n.contains(ip)))
            })
            && self.scope.admits(flow.scope)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    defaults: Option<bool>,
    #[serde(default)]
    rule: Vec<Rule>,
}

/// The rule names with their places, read once the file is known to be
/// well formed.
#[derive(Deserialize)]
struct NamesOnly {
    #[serde(default)]
    rule: Vec<NameOnly>,
}

#[derive(Deserialize)]
struct NameOnly {
    name: toml::Spanned<String>,
}

/// The rules in force and the state they keep.
#[derive(Debug, Clone, Default)]
pub(crate) struct Rules {
    rules: Vec<Rule>,
    /// owner -> countries it has reached.
    reached: HashMap<String, BTreeSet<String>>,
}

impl Rules {
    /// The shipped rules alone.
    pub(crate) fn defaults() -> Rules {
        let (_, rules) =
            parse_rules(DEFAULT_RULES, "(shipped defaults)").expect("the shipped rules parse");
        Rules {
            rules,
            reached: HashMap::new(),
        }
    }

    /// No rules at all.
    #[cfg(test)]
    pub(crate) fn none() -> Rules {
        Rules::default()
    }

    /// Reads a rules file (see the module documentation for its format).
    pub(crate) fn load(path: &Path) -> Result<Rules> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read rules file {}: check the path and its permissions",
                path.display()
            )
        })?;
        Rules::parse(&text, &path.display().to_string())
    }

    /// Parses rules from `text`; `origin` names it in errors. Unless the
    /// text says `defaults = false`, the shipped rules are added (after the
    /// file's, and only those whose names the file does not use).
    pub(crate) fn parse(text: &str, origin: &str) -> Result<Rules> {
        let (defaults, mut rules) = parse_rules(text, origin)?;
        if defaults {
            for default in Rules::defaults().rules {
                if !rules.iter().any(|r| r.name == default.name) {
                    rules.push(default);
                }
            }
        }
        Ok(Rules {
            rules,
            reached: HashMap::new(),
        })
    }

    #[cfg(test)]
    pub(crate) fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The block rules, in order.
    pub(crate) fn block_rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().filter(|r| r.is_block())
    }

    pub(crate) fn names(&self) -> Vec<&str> {
        self.rules.iter().map(|r| r.name.as_str()).collect()
    }

    /// The names of the rules `flow` matches, in the order of the rules.
    /// Records the flow's country as reached by its owner (see the module
    /// documentation on when to call this).
    pub(crate) fn evaluate(&mut self, flow: &FlowRecord) -> Vec<String> {
        let new_country = flow
            .country
            .as_deref()
            .is_some_and(|c| !self.has_reached(&flow.owner, c));
        let matched = self
            .rules
            .iter()
            .filter(|r| !r.is_block() && r.matches(flow, new_country))
            .map(|r| r.name.clone())
            .collect();
        if let Some(country) = flow.country.as_deref() {
            self.learn_country(&flow.owner, country);
        }
        matched
    }

    /// Whether `owner` is known to have reached `country`.
    pub(crate) fn has_reached(&self, owner: &str, country: &str) -> bool {
        self.reached
            .get(owner)
            .is_some_and(|set| set.contains(&country.to_ascii_uppercase()))
    }

    /// Records that `owner` has reached `country` (for example from a
    /// previous run), so it will not count as new.
    pub(crate) fn learn_country(&mut self, owner: &str, country: &str) {
        let country = country.to_ascii_uppercase();
        if let Some(set) = self.reached.get_mut(owner) {
            set.insert(country);
        } else if self.reached.len() < MAX_OWNERS_TRACKED {
            self.reached
                .insert(owner.to_string(), BTreeSet::from([country]));
        }
    }

    /// Every owner and the countries it has reached.
    pub(crate) fn countries_reached(&self) -> impl Iterator<Item = (&str, &BTreeSet<String>)> {
        self.reached.iter().map(|(o, c)| (o.as_str(), c))
    }
}

/// Reads and checks the rules of `text`: whether to add the defaults, and
/// the file's rules in order.
fn parse_rules(text: &str, origin: &str) -> Result<(bool, Vec<Rule>)> {
    let file: RulesFile = toml::from_str(text).map_err(|e| toml_error(origin, text, &e))?;
    let names: Vec<toml::Spanned<String>> = toml::from_str::<NamesOnly>(text)
        .map(|n| n.rule.into_iter().map(|r| r.name).collect())
        .unwrap_or_default();
    let mut rules: Vec<Rule> = Vec::with_capacity(file.rule.len());
    for (i, rule) in file.rule.into_iter().enumerate() {
        let (line, column) = names
            .get(i)
            .map(|n| line_col(text, n.span().start))
            .unwrap_or((0, 0));
        let problem = if rule.name.trim().is_empty() {
            Some("the rule name is empty: give every rule a name".to_string())
        } else if rules.iter().any(|r| r.name == rule.name) {
            Some(format!(
                "a second rule named {:?}: rule names must be unique",
                rule.name
            ))
        } else if !rule.has_conditions() {
            Some(format!(
                "rule {:?} has no conditions and would match every flow: add at least one",
                rule.name
            ))
        } else {
            rule.problem()
        };
        if let Some(problem) = problem {
            return Err(anyhow!(
                "rules file {origin}, line {line}, column {column}: {problem}; {FIX}"
            ));
        }
        rules.push(rule);
    }
    Ok((file.defaults.unwrap_or(true), rules))
}

/// What to do about any error in a rules file.
const FIX: &str = "fix the rules file, or start without --rules to use the shipped defaults";

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn toml_error(origin: &str, text: &str, e: &toml::de::Error) -> anyhow::Error {
    let message = e.message().trim().trim_end_matches('.');
    match e.span() {
        Some(span) => {
            let (line, column) = line_col(text, span.start);
            anyhow!("rules file {origin}, line {line}, column {column}: {message}; {FIX}")
        }
        None => anyhow!("rules file {origin}: {message}; {FIX}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::owners::Owner;

    fn flow() -> FlowRecord {
        FlowRecord {
            uid_owner: Owner {
                uid: 1000,
                user: 0,
                app_id: 1000,
                owner: "system".into(),
                packages: vec!["android".into(), "com.android.settings".into()],
                origin: crate::pipeline::vocab::Origin::Platform,
                firmware: true,
            },
            comm: None,
            pid: None,
            cgroup_id: None,
            cgroup: None,
            unit: None,
            exe: None,
            cmdline: None,
            selinux_context: None,
            partition: None,
            proto: crate::pipeline::vocab::Proto::Tcp,
            family: "ipv4".into(),
            dst: "203.0.113.7".into(),
            port: 80,
            connects: 1,
            udp_sends: 0,
            tx_packets: 3,
            tx_bytes: 400,
            first_seen: None,
            last_seen: None,
            host: Some("zzhc.example.cn".into()),
            host_source: Some("dns".into()),
            country: Some("CN".into()),
            asn: Some(4134),
            payload: crate::pipeline::vocab::Payload::Http,
            leaks: Vec::new(),
            direction: crate::pipeline::vocab::Direction::Outbound,
            scope: Scope::Remote,
            alerts: Vec::new(),
            blocked: 0,
            block_rule: None,
            block_mode: None,
        }
    }

    /// `flow()` carrying an IMEI's digest.
    fn leaking_flow() -> FlowRecord {
        FlowRecord {
            leaks: vec!["imei:sha256".into()],
            ..flow()
        }
    }

    /// `flow()` with its owner changed by `change`.
    fn flow_owned(change: impl FnOnce(&mut Owner)) -> FlowRecord {
        let mut f = flow();
        change(&mut f.uid_owner);
        f
    }

    fn app_flow() -> FlowRecord {
        FlowRecord {
            uid_owner: Owner {
                uid: 10123,
                app_id: 10123,
                owner: "org.example.app".into(),
                packages: vec!["org.example.app".into()],
                origin: crate::pipeline::vocab::Origin::App,
                firmware: false,
                ..flow().uid_owner
            },
            payload: crate::pipeline::vocab::Payload::Tls,
            direction: crate::pipeline::vocab::Direction::Outbound,
            host: Some("api.example.org".into()),
            host_source: Some("sni".into()),
            port: 443,
            ..flow()
        }
    }

    #[test]
    fn defaults_flag_firmware_cleartext_and_new_countries() {
        let mut rules = Rules::defaults();
        assert_eq!(
            rules.names(),
            [
                "firmware-cleartext",
                "firmware-new-country",
                "firmware-identifier-leak"
            ]
        );
        let f = flow();
        assert_eq!(
            rules.evaluate(&f),
            ["firmware-cleartext", "firmware-new-country"]
        );
        // Same flow again: CN is no longer new for "system"; once it is
        // seen carrying an identifier, that rule joins in.
        assert_eq!(
            rules.evaluate(&leaking_flow()),
            ["firmware-cleartext", "firmware-identifier-leak"]
        );
        // Another owner reaching CN for the first time is new.
        let other = FlowRecord {
            payload: crate::pipeline::vocab::Payload::Tls,
            direction: crate::pipeline::vocab::Direction::Outbound,
            ..flow_owned(|o| {
                o.owner = "com.vendor.activation".into();
                o.origin = crate::pipeline::vocab::Origin::Preinstalled;
            })
        };
        assert_eq!(rules.evaluate(&other), ["firmware-new-country"]);
        // A user app: nothing, even in cleartext to a new country.
        let app = FlowRecord {
            payload: crate::pipeline::vocab::Payload::Cleartext,
            direction: crate::pipeline::vocab::Direction::Outbound,
            country: Some("RU".into()),
            ..app_flow()
        };
        assert!(rules.evaluate(&app).is_empty());
        assert!(rules.has_reached("org.example.app", "ru"));
        // No country: never new.
        let nowhere = FlowRecord {
            country: None,
            payload: crate::pipeline::vocab::Payload::Tls,
            direction: crate::pipeline::vocab::Direction::Outbound,
            ..flow()
        };
        assert!(rules.evaluate(&nowhere).is_empty());
    }

    #[test]
    fn scopes_of_destinations() {
        use Scope::*;
        let cases = [
            ("127.0.0.1", Loopback),
            ("127.8.9.10", Loopback),
            ("0.0.0.0", Loopback),
            ("::1", Loopback),
            ("::", Loopback),
            ("::ffff:127.0.0.1", Loopback),
            ("ff01::1", Loopback),
            ("169.254.169.254", LinkLocal),
            ("::ffff:169.254.1.2", LinkLocal),
            ("fe80::1", LinkLocal),
            ("febf:ffff::1", LinkLocal),
            ("224.0.0.251", LinkLocal),
            ("ff02::fb", LinkLocal),
            ("ff12::1:3", LinkLocal),
            ("10.0.0.1", Remote),
            ("128.0.0.1", Remote),
            ("169.255.0.1", Remote),
            ("203.0.113.7", Remote),
            ("::ffff:203.0.113.7", Remote),
            ("224.0.1.1", Remote),
            ("239.255.255.250", Remote),
            ("fec0::1", Remote),
            ("ff05::2", Remote),
            ("2001:db8::1", Remote),
        ];
        for (addr, want) in cases {
            assert_eq!(Scope::of(addr.parse().unwrap()), want, "{addr}");
        }
        assert_eq!(
            serde_json::to_value([Remote, Loopback, LinkLocal]).unwrap(),
            serde_json::json!(["remote", "loopback", "link_local"])
        );
        // A flow table without the field (an older agent) is remote.
        let mut old = serde_json::to_value(flow()).unwrap();
        old.as_object_mut().unwrap().remove("scope");
        let old: FlowRecord = serde_json::from_value(old).unwrap();
        assert_eq!(old.scope, Remote);
    }

    #[test]
    fn local_flows_alert_only_where_a_rule_asks() {
        let local = |dst: &str| {
            let scope = Scope::of(dst.parse().unwrap());
            FlowRecord {
                dst: dst.into(),
                scope,
                country: None,
                ..flow()
            }
        };
        let loopback = local("127.0.0.1");
        let link_local = local("fe80::1");
        assert_eq!(loopback.scope, Scope::Loopback);
        assert_eq!(link_local.scope, Scope::LinkLocal);
        let mut defaults = Rules::defaults();
        for f in [&loopback, &link_local] {
            assert!(defaults.evaluate(f).is_empty(), "{}", f.dst);
        }
        let text = r#"
[[rule]]
name = "cleartext-anywhere"
firmware = true
payload = "http"
scope = "any"

[[rule]]
name = "local-only"
scope = "local"
"#;
        let mut rules = Rules::parse(text, "t").unwrap();
        assert_eq!(
            rules.evaluate(&loopback),
            ["cleartext-anywhere", "local-only"]
        );
        assert_eq!(
            rules.evaluate(&link_local),
            ["cleartext-anywhere", "local-only"]
        );
        assert_eq!(
            rules.evaluate(&flow()),
            [
                "cleartext-anywhere",
                "firmware-cleartext",
                "firmware-new-country"
            ]
        );
        assert!(err("[[rule]]\nname = \"x\"\nscope = \"any\"\n")
            .contains("rule \"x\" has no conditions"));
        assert!(
            err("[[rule]]\nname = \"x\"\nport = 1\nscope = \"lan\"\n").contains(
                "line 4, column 9: unknown variant `lan`, expected one of `remote`, `local`, `any`"
            )
        );
    }

    #[test]
    fn learned_countries_are_not_new() {
        let mut rules = Rules::defaults();
        rules.learn_country("system", "cn");
        let f = FlowRecord {
            payload: crate::pipeline::vocab::Payload::Tls,
            direction: crate::pipeline::vocab::Direction::Outbound,
            ..flow()
        };
        assert!(rules.evaluate(&f).is_empty());
        let reached: Vec<_> = rules.countries_reached().collect();
        assert_eq!(reached.len(), 1);
        assert!(reached[0].1.contains("CN"));
    }

    #[test]
    fn every_condition() {
        let text = r#"
defaults = false

[[rule]]
name = "all"
uid = [1000, 1001]
owner = "sys*"
package = "com.android.*"
origin = ["platform", "preinstalled"]
firmware = true
host = "*.cn"
country = "cn"
asn = 4134
port = [80, 8080]
proto = "tcp"
payload = ["http", "cleartext"]
leak = ["imei", "serial"]
new_country = true
"#;
        let mut rules = Rules::parse(text, "t.toml").unwrap();
        assert_eq!(rules.names(), ["all"]);
        assert_eq!(rules.evaluate(&leaking_flow()), ["all"]);
        // Each condition alone can fail the rule.
        let base = Rules::parse(text, "t.toml").unwrap();
        let rule = &base.rules()[0];
        let f = leaking_flow();
        assert!(rule.matches(&f, true));
        assert!(!rule.matches(&f, false), "new_country");
        let fails = [
            flow(),
            FlowRecord {
                leaks: vec!["android_id:plain".into()],
                ..flow()
            },
            flow_owned(|o| o.uid = 1002),
            flow_owned(|o| {
                o.owner = "root".into();
                o.packages = vec!["com.android.x".into()];
            }),
            flow_owned(|o| o.packages = vec!["org.other".into()]),
            flow_owned(|o| o.origin = crate::pipeline::vocab::Origin::App),
            flow_owned(|o| o.firmware = false),
            FlowRecord {
                host: Some("example.com".into()),
                ..flow()
            },
            FlowRecord {
                host: None,
                ..flow()
            },
            FlowRecord {
                country: Some("DE".into()),
                ..flow()
            },
            FlowRecord {
                country: None,
                ..flow()
            },
            FlowRecord {
                asn: Some(1),
                ..flow()
            },
            FlowRecord {
                asn: None,
                ..flow()
            },
            FlowRecord {
                port: 443,
                ..flow()
            },
            FlowRecord {
                proto: crate::pipeline::vocab::Proto::Udp,
                ..flow()
            },
            FlowRecord {
                payload: crate::pipeline::vocab::Payload::Tls,
                direction: crate::pipeline::vocab::Direction::Outbound,
                ..flow()
            },
        ];
        for (i, f) in fails.iter().enumerate() {
            // After the two leak cases, each case fails on its own field.
            let mut f = f.clone();
            if i >= 2 {
                f.leaks = leaking_flow().leaks;
            }
            assert!(!rule.matches(&f, true), "case {i}");
        }
        // owner also matches through a package.
        let via_package = flow_owned(|o| {
            o.owner = "shared:android.uid.system".into();
            o.packages = vec!["system_server".into(), "com.android.phone".into()];
        });
        let owner_rule = Rules::parse(
            "defaults = false\n[[rule]]\nname = \"o\"\nowner = \"system_*\"\n",
            "t",
        )
        .unwrap();
        assert!(owner_rule.rules()[0].matches(&via_package, false));
        assert!(!owner_rule.rules()[0].matches(&app_flow(), false));
    }

    #[test]
    fn file_rules_come_first_and_can_replace_a_default() {
        let text = r#"
[[rule]]
name = "firmware-cleartext"
firmware = true
payload = "http"
port = 8080

[[rule]]
name = "anything-to-ru"
country = "RU"
"#;
        let rules = Rules::parse(text, "t").unwrap();
        assert_eq!(
            rules.names(),
            [
                "firmware-cleartext",
                "anything-to-ru",
                "firmware-new-country",
                "firmware-identifier-leak"
            ]
        );
        assert_eq!(rules.rules()[0].port, Some(AnyOf(vec![8080])));
        let off = Rules::parse("defaults = false\n", "t").unwrap();
        assert!(off.rules().is_empty());
        assert_eq!(Rules::parse("", "t").unwrap().names().len(), 3);
        assert!(Rules::none().rules().is_empty());
    }

    fn err(text: &str) -> String {
        format!("{:#}", Rules::parse(text, "rules.toml").unwrap_err())
    }

    #[test]
    fn bad_files_name_line_column_and_problem() {
        let cases: &[(&str, &str)] = &[
            (
                "[[rule]]\nname = \"x\"\nhots = \"a\"\n",
                "line 3, column 1: unknown field `hots`, expected one of",
            ),
            (
                "[[rule]]\nname = \"x\"\nfirmware = \"yes\"\n",
                "line 3, column 12: invalid type: string \"yes\", expected a boolean",
            ),
            (
                "[[rule]]\nname = \"x\"\nport = 70000\n",
                "line 3, column 8:",
            ),
            (
                "[[rule]]\nname = \"x\"\nhost = \"[a-\"\n",
                "line 3, column 8: bad glob \"[a-\": [ is never closed",
            ),
            (
                "[[rule]]\nname = \"x\"\nproto = \"sctp\"\n",
                "line 3, column 9: unknown protocol \"sctp\": tcp, udp, icmp, icmpv6 or ipN",
            ),
            (
                "[[rule]]\nname = \"x\"\npayload = [\"http\", \"plain\"]\n",
                "line 3, column 20: unknown variant `plain`, expected one of `tls`, `quic`, `http`, `dns`, `cleartext`, `unknown`",
            ),
            (
                "[[rule]]\nname = \"x\"\norigin = \"vendor\"\n",
                "line 3, column 10: unknown origin \"vendor\"",
            ),
            (
                "[[rule]]\nname = \"x\"\ncountry = \"China\"\n",
                "line 3, column 11: bad country \"China\": use a two-letter ISO 3166-1 code",
            ),
            (
                "[[rule]]\nname = \"x\"\nasn = []\n",
                "line 3, column 7: an empty list matches nothing",
            ),
            (
                "[[rule]]\nname = \"x\"\nuid = -1\n",
                "line 3, column 7:",
            ),
            ("[[rule]]\nfirmware = true\n", "missing field `name`"),
            (
                "[[rules]]\nname = \"x\"\n",
                "line 1, column 3: unknown field `rules`, expected `defaults` or `rule`",
            ),
            ("defaults = 1\n", "line 1, column 12: invalid type: integer `1`, expected a boolean"),
            ("[[rule]\nname = 1", "line 1, column"),
            (
                "[[rule]]\nname = \"a\"\nport = 1\n\n[[rule]]\nname = \"a\"\nport = 2\n",
                "line 6, column 8: a second rule named \"a\"",
            ),
            (
                "[[rule]]\nname = \"quiet\"\n",
                "line 2, column 8: rule \"quiet\" has no conditions",
            ),
            (
                "[[rule]]\nname = \" \"\nport = 1\n",
                "line 2, column 8: the rule name is empty",
            ),
        ];
        for (text, want) in cases {
            let e = err(text);
            assert!(e.contains(want), "{text:?}\n got: {e}\nwant: {want}");
            assert!(e.starts_with("rules file rules.toml"), "{e}");
            assert!(e.ends_with(FIX), "{e}");
        }
    }

    #[test]
    fn load_reads_a_file_and_names_a_missing_one() {
        let dir = std::env::temp_dir().join(format!("egressmon-rules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rules.toml");
        std::fs::write(
            &path,
            "defaults = false\n[[rule]]\nname = \"p\"\nport = 23\n",
        )
        .unwrap();
        assert_eq!(Rules::load(&path).unwrap().names(), ["p"]);
        let e = format!("{:#}", Rules::load(&dir.join("nope.toml")).unwrap_err());
        assert!(
            e.contains("cannot read rules file") && e.contains("nope.toml"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_can_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Rules>();
        send_sync::<crate::enrich::geoip::GeoIp>();
        send_sync::<inspect::dns::DnsCache>();
    }

    #[test]
    fn globs() {
        let g = |p: &str| Glob::new(p).unwrap();
        assert!(g("*.cn").matches("zzhc.example.cn"));
        assert!(g("*.CN").matches("a.cn"));
        assert!(!g("*.cn").matches("cn"));
        assert!(g("*").matches(""));
        assert!(g("a*b*c").matches("aXXbYYc"));
        assert!(!g("a*b*c").matches("aXXbYY"));
        assert!(g("com.android.*").matches("com.android.phone"));
        assert!(g("?.test").matches("a.test"));
        assert!(!g("?.test").matches("ab.test"));
        assert!(g("[a-c]x").matches("bx"));
        assert!(!g("[a-c]x").matches("dx"));
        assert!(g("[!a-c]x").matches("dx"));
        assert!(g("[^a-c]x").matches("dx"));
        assert!(g("[-a]").matches("-"));
        assert!(g("[a-]").matches("-"));
        assert!(g("\\*").matches("*"));
        assert!(!g("\\*").matches("x"));
        assert!(g("**.x").matches("a.x"));
        assert!(g("a/*").matches("a/b/c"), "no path semantics");
        assert!(g("{a,b}").matches("{a,b}") && !g("{a,b}").matches("a"));
        assert!(!g("*a*a*a*a*b").matches(&"a".repeat(40)));
        assert!(g("*a*a*a*a*b").matches(&format!("{}b", "a".repeat(40))));
        for bad in ["", "[abc", "a\\", "[]", "[z-a]", "[!]"] {
            assert!(Glob::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(g("x*").as_str(), "x*");
    }
}
