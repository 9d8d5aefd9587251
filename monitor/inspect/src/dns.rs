//! DNS messages seen by the kernel programs, and the cache that turns their
//! answers into host names for flows.
//!
//! Owns: parsing a DNS message in the RFC 1035 wire format (header,
//! questions, A / AAAA / CNAME answers with their TTLs, compressed names),
//! the 2-byte length prefix of DNS over TCP (RFC 1035 4.2.2), resolving
//! CNAME chains so that every address maps to the name the client asked and
//! to the final name, and [`DnsCache`]: a bounded (uid, ip) -> name cache
//! whose entries expire after their TTL (clamped to a floor and a ceiling).
//!
//! The bytes come from the network, so anyone can shape them: every length
//! is checked against the bytes actually captured (the kernel copies at most
//! 512 bytes), compression pointers must point strictly backwards (which
//! makes loops impossible) and a name is at most 255 bytes on the wire.
//! Nothing here panics or allocates more than a small multiple of the input.

use monitor_common::{PROTO_TCP, PROTO_UDP};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

/// RR type A (RFC 1035).
pub const TYPE_A: u16 = 1;
/// RR type CNAME (RFC 1035).
pub const TYPE_CNAME: u16 = 5;
/// RR type AAAA (RFC 3596).
pub const TYPE_AAAA: u16 = 28;
/// Class IN.
pub const CLASS_IN: u16 = 1;

const HEADER_LEN: usize = 12;
/// RFC 1035 3.1: a name is at most 255 bytes on the wire.
const MAX_NAME_WIRE: usize = 255;
/// Compression pointers followed while reading one name. Pointers must go
/// backwards, so this only bounds the work on hostile input.
const MAX_POINTERS: usize = 64;
/// Questions accepted in one message; real resolvers send exactly one.
const MAX_QUESTIONS: u16 = 16;
/// CNAME links followed from a question to an address.
const MAX_CHAIN: usize = 16;

/// One entry of the question section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Lowercase, without the trailing dot ("." for the root).
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
}

/// The data of an answer this module keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// The canonical name the owner is an alias of.
    Cname(String),
}

/// One A, AAAA or CNAME record of class IN from the answer section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Owner name, lowercase, without the trailing dot.
    pub name: String,
    /// Seconds; values with the top bit set count as 0 (RFC 2181 8).
    pub ttl: u32,
    pub data: RData,
}

/// A parsed DNS message: the header fields that matter, every question, and
/// the A / AAAA / CNAME answers (other record types are skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: u16,
    /// QR bit: a response rather than a query.
    pub response: bool,
    pub opcode: u8,
    /// TC bit: the server truncated the message.
    pub truncated: bool,
    pub rcode: u8,
    pub questions: Vec<Question>,
    pub answers: Vec<Answer>,
    /// False when the answer section was cut short by the end of the bytes
    /// captured: `answers` then holds the records that could be read.
    pub complete: bool,
}

/// One address a response resolved, with the names it answers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub addr: IpAddr,
    /// The name the client asked (the question), or, when the answer is not
    /// reachable from a question, the start of its CNAME chain.
    pub query: String,
    /// The owner name of the address record (the end of the CNAME chain).
    pub name: String,
    /// The smallest TTL along the chain, in seconds.
    pub ttl: u32,
}

/// Parses a DNS message carried over UDP (no length prefix).
///
/// Returns None when the header or a question cannot be read, or the
/// message claims an absurd number of questions. Answers are read as far as
/// the bytes go; see [`Message::complete`].
pub fn parse(msg: &[u8]) -> Option<Message> {
    let header = msg.get(..HEADER_LEN)?;
    let id = be16(header, 0)?;
    let flags = be16(header, 2)?;
    let qdcount = be16(header, 4)?;
    let ancount = be16(header, 6)?;
    if qdcount > MAX_QUESTIONS {
        return None;
    }
    let mut pos = HEADER_LEN;
    let mut questions = Vec::with_capacity(usize::from(qdcount));
    for _ in 0..qdcount {
        let (name, next) = read_name(msg, pos)?;
        let qtype = be16(msg, next)?;
        let qclass = be16(msg, next + 2)?;
        pos = next + 4;
        questions.push(Question {
            name,
            qtype,
            qclass,
        });
    }
    let mut answers = Vec::new();
    let mut complete = true;
    for _ in 0..ancount {
        match read_record(msg, pos) {
            Some((record, next)) => {
                pos = next;
                if let Some(answer) = record {
                    answers.push(answer);
                }
            }
            None => {
                complete = false;
                break;
            }
        }
    }
    Some(Message {
        id,
        response: flags & 0x8000 != 0,
        opcode: ((flags >> 11) & 0x0f) as u8,
        truncated: flags & 0x0200 != 0,
        rcode: (flags & 0x000f) as u8,
        questions,
        answers,
        complete,
    })
}

/// Parses the first DNS message of a TCP stream: a 2-byte big-endian length,
/// then the message. A length larger than the bytes captured is fine (the
/// message is read as far as it goes); a length below a DNS header is not.
pub fn parse_tcp(stream: &[u8]) -> Option<Message> {
    let len = usize::from(be16(stream, 0)?);
    if len < HEADER_LEN {
        return None;
    }
    let body = &stream[2..];
    parse(&body[..len.min(body.len())])
}

/// Parses a DNS payload of the given IP protocol (UDP: bare message; TCP:
/// length-prefixed).
pub fn parse_payload(proto: u8, payload: &[u8]) -> Option<Message> {
    match proto {
        PROTO_UDP => parse(payload),
        PROTO_TCP => parse_tcp(payload),
        _ => None,
    }
}

impl Message {
    /// Whether this looks like a standard query a client sends: QR clear,
    /// opcode QUERY, and at least one question.
    pub fn is_query(&self) -> bool {
        !self.response && self.opcode == 0 && !self.questions.is_empty()
    }

    /// The addresses a successful response resolved, each with the name the
    /// client asked and the final name of its CNAME chain. Empty for queries
    /// and for error responses.
    pub fn resolutions(&self) -> Vec<Resolution> {
        if !self.response || self.rcode != 0 {
            return Vec::new();
        }
        let mut alias_of: HashMap<&str, (&str, u32)> = HashMap::new();
        let mut aliased_by: HashMap<&str, (&str, u32)> = HashMap::new();
        for answer in &self.answers {
            if let RData::Cname(target) = &answer.data {
                alias_of
                    .entry(answer.name.as_str())
                    .or_insert((target.as_str(), answer.ttl));
                aliased_by
                    .entry(target.as_str())
                    .or_insert((answer.name.as_str(), answer.ttl));
            }
        }
        let mut out = Vec::new();
        for answer in &self.answers {
            let addr = match answer.data {
                RData::A(a) => IpAddr::V4(a),
                RData::Aaaa(a) => IpAddr::V6(a),
                RData::Cname(_) => continue,
            };
            let (query, ttl) = self
                .questions
                .iter()
                .filter(|q| q.qclass == CLASS_IN)
                .find_map(|q| chain_reaches(&alias_of, &q.name, &answer.name))
                .unwrap_or_else(|| chain_head(&aliased_by, &answer.name));
            out.push(Resolution {
                addr,
                query: query.to_string(),
                name: answer.name.clone(),
                ttl: ttl.min(answer.ttl),
            });
        }
        out
    }
}

/// Follows CNAMEs from `from`; if `to` is reached, returns `from` and the
/// smallest TTL of the links followed.
fn chain_reaches<'a>(
    alias_of: &HashMap<&str, (&'a str, u32)>,
    from: &'a str,
    to: &str,
) -> Option<(&'a str, u32)> {
    let mut cur = from;
    let mut ttl = u32::MAX;
    for _ in 0..=MAX_CHAIN {
        if cur == to {
            return Some((from, ttl));
        }
        let (next, link_ttl) = alias_of.get(cur)?;
        ttl = ttl.min(*link_ttl);
        cur = next;
    }
    None
}

/// Walks CNAMEs backwards from `name` to the first alias of its chain.
fn chain_head<'a>(aliased_by: &HashMap<&str, (&'a str, u32)>, name: &'a str) -> (&'a str, u32) {
    let mut cur = name;
    let mut ttl = u32::MAX;
    for _ in 0..MAX_CHAIN {
        match aliased_by.get(cur) {
            Some((alias, link_ttl)) if *alias != name => {
                ttl = ttl.min(*link_ttl);
                cur = alias;
            }
            _ => break,
        }
    }
    (cur, ttl)
}

fn be16(buf: &[u8], at: usize) -> Option<u16> {
    let b = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

fn be32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Reads one resource record at `pos`. Returns the record if it is an A,
/// AAAA or CNAME of class IN (None inside for anything else) and the
/// position after it; None if it does not fit in the message.
fn read_record(msg: &[u8], pos: usize) -> Option<(Option<Answer>, usize)> {
    let (name, at) = read_name(msg, pos)?;
    let rtype = be16(msg, at)?;
    let class = be16(msg, at + 2)?;
    let ttl = be32(msg, at + 4)?;
    let rdlength = usize::from(be16(msg, at + 8)?);
    let start = at + 10;
    let end = start + rdlength;
    let rdata = msg.get(start..end)?;
    // RFC 2181 8: a TTL with the most significant bit set is treated as 0.
    let ttl = if ttl & 0x8000_0000 != 0 { 0 } else { ttl };
    let data = match (rtype, class) {
        (TYPE_A, CLASS_IN) => {
            let octets: [u8; 4] = rdata.try_into().ok()?;
            Some(RData::A(Ipv4Addr::from(octets)))
        }
        (TYPE_AAAA, CLASS_IN) => {
            let octets: [u8; 16] = rdata.try_into().ok()?;
            Some(RData::Aaaa(Ipv6Addr::from(octets)))
        }
        (TYPE_CNAME, CLASS_IN) => {
            let (target, after) = read_name(msg, start)?;
            if after > end {
                return None;
            }
            Some(RData::Cname(target))
        }
        _ => None,
    };
    Some((data.map(|data| Answer { name, ttl, data }), end))
}

/// Reads a possibly compressed name at `pos`. Returns the name (lowercase,
/// labels joined by dots, bytes outside `[a-z0-9-_*]` escaped as `\DDD`
/// and a dot inside a label as `\.`) and the position after the name where
/// it started (after its first pointer, if any).
fn read_name(msg: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut wire_len = 0usize;
    let mut pointers = 0usize;
    let mut after: Option<usize> = None;
    // A pointer must point before the start of the run of labels it ends;
    // anything else would revisit bytes of this same name.
    let mut run_start = pos;
    loop {
        let len = usize::from(*msg.get(pos)?);
        match len & 0xc0 {
            0x00 => {
                wire_len += len + 1;
                if wire_len > MAX_NAME_WIRE {
                    return None;
                }
                if len == 0 {
                    let end = after.unwrap_or(pos + 1);
                    if name.is_empty() {
                        name.push('.');
                    } else {
                        name.pop();
                    }
                    return Some((name, end));
                }
                let label = msg.get(pos + 1..pos + 1 + len)?;
                push_label(&mut name, label);
                name.push('.');
                pos += 1 + len;
            }
            0xc0 => {
                let low = usize::from(*msg.get(pos + 1)?);
                let target = ((len & 0x3f) << 8) | low;
                if target >= run_start {
                    return None;
                }
                pointers += 1;
                if pointers > MAX_POINTERS {
                    return None;
                }
                after.get_or_insert(pos + 2);
                run_start = target;
                pos = target;
            }
            // 0x40 (extended label types, RFC 6891) and 0x80 are not names.
            _ => return None,
        }
    }
}

fn push_label(name: &mut String, label: &[u8]) {
    for &b in label {
        match b {
            b'A'..=b'Z' => name.push(char::from(b.to_ascii_lowercase())),
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'*' => name.push(char::from(b)),
            b'.' => name.push_str("\\."),
            _ => name.push_str(&format!("\\{b:03}")),
        }
    }
}

/// Limits of a [`DnsCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsCacheOptions {
    /// Entries kept at most; the least recently used goes first.
    pub capacity: usize,
    /// Entries one uid may hold at most (its own least recently used goes
    /// first): a uid that floods answers cannot push the others' names out.
    pub per_uid: usize,
    /// Shortest life of an entry, whatever the TTL says: applications
    /// connect after the answer arrives and often keep using an address
    /// for a while after a TTL of 0 or a few seconds.
    pub min_ttl: Duration,
    /// Longest life of an entry: an address can move to another name.
    pub max_ttl: Duration,
}

impl Default for DnsCacheOptions {
    fn default() -> Self {
        DnsCacheOptions {
            capacity: 8192,
            per_uid: 2048,
            min_ttl: Duration::from_secs(120),
            max_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// What the cache knows about an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedName {
    /// The name the client asked (use this as the flow's host).
    pub query: String,
    /// The final name of the CNAME chain (equal to `query` without CNAMEs).
    pub name: String,
    /// The uid whose socket received the answer.
    pub uid: u32,
}

#[derive(Debug, Clone)]
struct Entry {
    query: String,
    name: String,
    expires: Instant,
    tick: u64,
}

/// A bounded cache from (uid, ip) to the DNS name that uid resolved to that
/// ip, so names are attributed to the uid that asked. On Android the
/// resolver hands its sockets to the app that asked (netd `fchown`s them),
/// so the socket uid of a DNS response is the app's. Where one daemon
/// resolves for everyone (systemd-resolved, dnsmasq) the uid is the
/// daemon's: [`DnsCache::lookup`] then falls back to the most recent answer
/// for the ip from any uid.
///
/// Addresses are stored canonically: an IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`, what a dual-stack socket connects to) is the IPv4
/// address. Times are passed in, so the cache is a pure data structure.
#[derive(Debug, Clone)]
pub struct DnsCache {
    options: DnsCacheOptions,
    entries: HashMap<(u32, IpAddr), Entry>,
    /// tick -> key, oldest use first.
    order: BTreeMap<u64, (u32, IpAddr)>,
    /// ip -> uids with an entry for it.
    by_ip: HashMap<IpAddr, Vec<u32>>,
    /// uid -> ticks of its entries, oldest use first.
    by_uid: HashMap<u32, BTreeSet<u64>>,
    tick: u64,
}

impl Default for DnsCache {
    fn default() -> Self {
        DnsCache::new(DnsCacheOptions::default())
    }
}

impl DnsCache {
    /// A cache with these limits (a capacity of 0 counts as 1, and a
    /// ceiling below the floor is raised to the floor).
    pub fn new(mut options: DnsCacheOptions) -> DnsCache {
        options.capacity = options.capacity.max(1);
        options.per_uid = options.per_uid.clamp(1, options.capacity);
        options.max_ttl = options.max_ttl.max(options.min_ttl);
        DnsCache {
            options,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            by_ip: HashMap::new(),
            by_uid: HashMap::new(),
            tick: 0,
        }
    }

    pub fn options(&self) -> DnsCacheOptions {
        self.options
    }

    /// Entries held, expired ones included until they are looked up or
    /// purged.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries `uid` holds.
    pub fn held_by(&self, uid: u32) -> usize {
        self.by_uid.get(&uid).map_or(0, BTreeSet::len)
    }

    /// Records that `uid` resolved `res.addr` to `res.query` / `res.name`.
    /// A newer answer for the same (uid, ip) replaces the older one.
    pub fn insert(&mut self, uid: u32, res: &Resolution, now: Instant) {
        let ip = res.addr.to_canonical();
        let key = (uid, ip);
        let life = Duration::from_secs(u64::from(res.ttl))
            .clamp(self.options.min_ttl, self.options.max_ttl);
        let tick = self.next_tick();
        let entry = Entry {
            query: res.query.clone(),
            name: res.name.clone(),
            expires: now + life,
            tick,
        };
        if let Some(old) = self.entries.insert(key, entry) {
            self.forget_tick(uid, old.tick);
        } else {
            self.by_ip.entry(ip).or_default().push(uid);
        }
        self.order.insert(tick, key);
        self.by_uid.entry(uid).or_default().insert(tick);
        while let Some(&oldest_tick) = self
            .by_uid
            .get(&uid)
            .filter(|ticks| ticks.len() > self.options.per_uid)
            .and_then(|ticks| ticks.first())
        {
            let Some(&oldest) = self.order.get(&oldest_tick) else {
                break;
            };
            self.remove(oldest);
        }
        while self.entries.len() > self.options.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.remove(oldest);
        }
    }

    /// Records every address a DNS response received by `uid` resolved.
    /// Returns how many were recorded (0 for queries and errors).
    pub fn observe(&mut self, uid: u32, msg: &Message, now: Instant) -> usize {
        let resolutions = msg.resolutions();
        for res in &resolutions {
            self.insert(uid, res, now);
        }
        resolutions.len()
    }

    /// Parses a DNS payload received by `uid` over `proto` (UDP: bare
    /// message; TCP: length-prefixed) and records what it resolved.
    pub fn observe_payload(&mut self, uid: u32, proto: u8, payload: &[u8], now: Instant) -> usize {
        parse_payload(proto, payload).map_or(0, |msg| self.observe(uid, &msg, now))
    }

    /// The name `uid` resolved to `ip`, or else the most recently recorded
    /// name any uid resolved to `ip` (see [`CachedName::uid`]).
    pub fn lookup(&mut self, uid: u32, ip: IpAddr, now: Instant) -> Option<CachedName> {
        self.lookup_exact(uid, ip, now)
            .or_else(|| self.lookup_ip(ip, now))
    }

    /// The name `uid` itself resolved to `ip`, if it has not expired.
    pub fn lookup_exact(&mut self, uid: u32, ip: IpAddr, now: Instant) -> Option<CachedName> {
        let key = (uid, ip.to_canonical());
        let entry = self.entries.get(&key)?;
        if entry.expires <= now {
            self.remove(key);
            return None;
        }
        let old_tick = entry.tick;
        let tick = self.next_tick();
        self.forget_tick(uid, old_tick);
        self.order.insert(tick, key);
        self.by_uid.entry(uid).or_default().insert(tick);
        let entry = self.entries.get_mut(&key)?;
        entry.tick = tick;
        Some(CachedName {
            query: entry.query.clone(),
            name: entry.name.clone(),
            uid,
        })
    }

    /// The most recently recorded, unexpired name for `ip` from any uid.
    pub fn lookup_ip(&mut self, ip: IpAddr, now: Instant) -> Option<CachedName> {
        let ip = ip.to_canonical();
        let uids = self.by_ip.get(&ip)?.clone();
        let mut best: Option<(u64, u32)> = None;
        for uid in uids {
            let key = (uid, ip);
            let Some(entry) = self.entries.get(&key) else {
                continue;
            };
            if entry.expires <= now {
                self.remove(key);
            } else if best.is_none_or(|(tick, _)| entry.tick > tick) {
                best = Some((entry.tick, uid));
            }
        }
        let (_, uid) = best?;
        self.lookup_exact(uid, ip, now)
    }

    /// Drops every expired entry; returns how many.
    pub fn purge_expired(&mut self, now: Instant) -> usize {
        let expired: Vec<(u32, IpAddr)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.expires <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in &expired {
            self.remove(*key);
        }
        expired.len()
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn forget_tick(&mut self, uid: u32, tick: u64) {
        self.order.remove(&tick);
        if let Some(ticks) = self.by_uid.get_mut(&uid) {
            ticks.remove(&tick);
            if ticks.is_empty() {
                self.by_uid.remove(&uid);
            }
        }
    }

    fn remove(&mut self, key: (u32, IpAddr)) {
        if let Some(entry) = self.entries.remove(&key) {
            self.forget_tick(key.0, entry.tick);
        }
        if let Some(uids) = self.by_ip.get_mut(&key.1) {
            uids.retain(|&u| u != key.0);
            if uids.is_empty() {
                self.by_ip.remove(&key.1);
            }
        }
    }
}

/// Builds DNS messages for tests and fuzz seeds (uncompressed unless a
/// record's owner is given as a pointer).
#[cfg(test)]
pub(crate) mod build {
    use super::*;

    pub fn name(out: &mut Vec<u8>, name: &str) {
        for label in name.split('.').filter(|l| !l.is_empty()) {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
    }

    pub fn header(id: u16, flags: u16, qd: u16, an: u16) -> Vec<u8> {
        let mut out = Vec::new();
        for v in [id, flags, qd, an, 0, 0] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out
    }

    pub fn query(id: u16, qname: &str, qtype: u16) -> Vec<u8> {
        let mut out = header(id, 0x0100, 1, 0);
        name(&mut out, qname);
        out.extend_from_slice(&qtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out
    }

    /// Owner of a record: a name, or a pointer to an offset.
    pub enum Owner<'a> {
        Name(&'a str),
        Pointer(u16),
    }

    pub fn record(out: &mut Vec<u8>, owner: Owner, rtype: u16, ttl: u32, rdata: &[u8]) {
        match owner {
            Owner::Name(n) => name(out, n),
            Owner::Pointer(p) => out.extend_from_slice(&(0xc000 | p).to_be_bytes()),
        }
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(rdata);
    }

    pub fn name_bytes(n: &str) -> Vec<u8> {
        let mut out = Vec::new();
        name(&mut out, n);
        out
    }

    /// A response to `qname`: CNAMEs `chain` (each aliasing the next, the
    /// first aliasing qname), then A records for `v4` on the final name.
    pub fn response(id: u16, qname: &str, chain: &[&str], v4: &[Ipv4Addr], ttl: u32) -> Vec<u8> {
        let an = (chain.len() + v4.len()) as u16;
        let mut out = header(id, 0x8180, 1, an);
        name(&mut out, qname);
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        let mut owner = qname.to_string();
        for target in chain {
            record(
                &mut out,
                Owner::Name(&owner),
                TYPE_CNAME,
                ttl,
                &name_bytes(target),
            );
            owner = target.to_string();
        }
        for a in v4 {
            record(&mut out, Owner::Name(&owner), TYPE_A, ttl, &a.octets());
        }
        out
    }

    pub fn tcp(msg: &[u8]) -> Vec<u8> {
        let mut out = (msg.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(msg);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn query_parses_with_its_question() {
        let msg = parse(&query(0x1234, "Example.COM", TYPE_AAAA)).unwrap();
        assert_eq!(msg.id, 0x1234);
        assert!(msg.is_query());
        assert!(msg.complete);
        assert_eq!(
            msg.questions,
            vec![Question {
                name: "example.com".into(),
                qtype: TYPE_AAAA,
                qclass: CLASS_IN
            }]
        );
        assert!(msg.resolutions().is_empty());
    }

    #[test]
    fn a_response_maps_addresses_to_the_question() {
        let bytes = response(7, "zzhc.example.cn", &[], &[v4("203.0.113.7")], 300);
        let msg = parse(&bytes).unwrap();
        assert!(msg.response && !msg.is_query());
        assert_eq!(
            msg.resolutions(),
            vec![Resolution {
                addr: "203.0.113.7".parse().unwrap(),
                query: "zzhc.example.cn".into(),
                name: "zzhc.example.cn".into(),
                ttl: 300,
            }]
        );
    }

    #[test]
    fn cname_chains_resolve_to_question_and_final_name_with_smallest_ttl() {
        let mut bytes = header(1, 0x8180, 1, 4);
        name(&mut bytes, "www.example.org");
        bytes.extend_from_slice(&TYPE_A.to_be_bytes());
        bytes.extend_from_slice(&CLASS_IN.to_be_bytes());
        // www.example.org -> edge.cdn.test (pointer to the question name as owner)
        record(
            &mut bytes,
            Owner::Pointer(12),
            TYPE_CNAME,
            3600,
            &name_bytes("edge.cdn.test"),
        );
        let edge = bytes.len() - 15; // offset of the CNAME's rdata (the name edge.cdn.test)
        record(
            &mut bytes,
            Owner::Pointer(edge as u16),
            TYPE_CNAME,
            60,
            &name_bytes("a1.cdn.test"),
        );
        let a1 = bytes.len() - 13;
        record(
            &mut bytes,
            Owner::Pointer(a1 as u16),
            TYPE_A,
            20,
            &[192, 0, 2, 1],
        );
        let mut aaaa = [0u8; 16];
        aaaa[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        aaaa[15] = 1;
        record(&mut bytes, Owner::Pointer(a1 as u16), TYPE_AAAA, 900, &aaaa);
        let msg = parse(&bytes).unwrap();
        assert!(msg.complete);
        assert_eq!(msg.answers.len(), 4);
        assert_eq!(msg.answers[1].name, "edge.cdn.test");
        let res = msg.resolutions();
        assert_eq!(res.len(), 2);
        assert_eq!(res[0].addr, IpAddr::V4(v4("192.0.2.1")));
        assert_eq!(res[0].query, "www.example.org");
        assert_eq!(res[0].name, "a1.cdn.test");
        assert_eq!(res[0].ttl, 20);
        assert_eq!(res[1].addr, "2001:db8::1".parse::<IpAddr>().unwrap());
        assert_eq!(res[1].ttl, 60, "smallest TTL along the chain");
    }

    #[test]
    fn answers_unrelated_to_the_question_use_their_chain_head() {
        let mut bytes = header(1, 0x8180, 1, 2);
        name(&mut bytes, "asked.test");
        bytes.extend_from_slice(&[0, 1, 0, 1]);
        record(
            &mut bytes,
            Owner::Name("other.test"),
            TYPE_CNAME,
            100,
            &name_bytes("final.test"),
        );
        record(
            &mut bytes,
            Owner::Name("final.test"),
            TYPE_A,
            100,
            &[10, 0, 0, 1],
        );
        let res = parse(&bytes).unwrap().resolutions();
        assert_eq!(res[0].query, "other.test");
        assert_eq!(res[0].name, "final.test");
    }

    #[test]
    fn cname_loops_terminate() {
        let mut bytes = header(1, 0x8180, 1, 3);
        name(&mut bytes, "a.test");
        bytes.extend_from_slice(&[0, 1, 0, 1]);
        record(
            &mut bytes,
            Owner::Name("a.test"),
            TYPE_CNAME,
            1,
            &name_bytes("b.test"),
        );
        record(
            &mut bytes,
            Owner::Name("b.test"),
            TYPE_CNAME,
            1,
            &name_bytes("a.test"),
        );
        record(&mut bytes, Owner::Name("c.test"), TYPE_A, 1, &[10, 0, 0, 2]);
        let res = parse(&bytes).unwrap().resolutions();
        assert_eq!(res.len(), 1);
        assert_eq!(res[0].query, "c.test");
    }

    #[test]
    fn error_responses_and_other_types_resolve_nothing() {
        let mut bytes = response(1, "gone.test", &[], &[v4("10.0.0.1")], 5);
        bytes[3] = 0x83; // NXDOMAIN
        assert!(parse(&bytes).unwrap().resolutions().is_empty());
        // An MX record is skipped, the A after it is kept.
        let mut bytes = header(1, 0x8180, 1, 2);
        name(&mut bytes, "mx.test");
        bytes.extend_from_slice(&[0, 15, 0, 1]);
        record(&mut bytes, Owner::Pointer(12), 15, 60, &[0, 10, 0]);
        record(&mut bytes, Owner::Pointer(12), TYPE_A, 60, &[10, 0, 0, 3]);
        let msg = parse(&bytes).unwrap();
        assert_eq!(msg.answers.len(), 1);
        assert!(msg.complete);
    }

    #[test]
    fn pointer_loops_and_forward_pointers_are_rejected() {
        // Question name is a pointer to itself.
        let mut bytes = header(1, 0x0100, 1, 0);
        bytes.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(parse(&bytes).is_none());
        // Two names pointing at each other.
        let mut bytes = header(1, 0x0100, 1, 0);
        bytes.extend_from_slice(&[1, b'a', 0xc0, 16, 1, b'b', 0xc0, 12, 0, 1, 0, 1]);
        assert!(parse(&bytes).is_none());
        // A pointer to a later offset.
        let mut bytes = header(1, 0x0100, 1, 0);
        bytes.extend_from_slice(&[0xc0, 14, 0, 1, 0, 1, 0]);
        assert!(parse(&bytes).is_none());
        // Reserved label types.
        let mut bytes = header(1, 0x0100, 1, 0);
        bytes.extend_from_slice(&[0x41, 0, 0, 1, 0, 1]);
        assert!(parse(&bytes).is_none());
    }

    #[test]
    fn over_long_names_are_rejected() {
        let long: Vec<String> = (0..5).map(|_| "a".repeat(63)).collect();
        let bytes = query(1, &long.join("."), TYPE_A);
        assert!(parse(&bytes).is_none());
        let ok: Vec<String> = (0..3).map(|_| "a".repeat(63)).collect();
        assert!(parse(&query(1, &ok.join("."), TYPE_A)).is_some());
    }

    #[test]
    fn odd_label_bytes_are_escaped() {
        let mut bytes = header(1, 0x0100, 1, 0);
        bytes.extend_from_slice(&[3, b'a', b'.', 0x07, 2, b'X', b'Y', 0, 0, 1, 0, 1]);
        let msg = parse(&bytes).unwrap();
        assert_eq!(msg.questions[0].name, "a\\.\\007.xy");
        let mut root = header(1, 0x0100, 1, 0);
        root.extend_from_slice(&[0, 0, 2, 0, 1]);
        assert_eq!(parse(&root).unwrap().questions[0].name, ".");
    }

    #[test]
    fn truncated_answers_keep_what_was_read() {
        let bytes = response(
            9,
            "many.test",
            &[],
            &[v4("10.0.0.1"), v4("10.0.0.2"), v4("10.0.0.3")],
            60,
        );
        for cut in 0..bytes.len() {
            let msg = parse(&bytes[..cut]);
            if let Some(msg) = msg {
                assert!(!msg.complete || cut == bytes.len());
                assert!(msg.answers.len() < 3);
            }
        }
        let msg = parse(&bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(msg.answers.len(), 2);
        assert!(!msg.complete);
        assert!(parse(&bytes[..11]).is_none());
    }

    #[test]
    fn bad_rdata_lengths_stop_the_answers() {
        let mut bytes = header(1, 0x8180, 1, 1);
        name(&mut bytes, "x.test");
        bytes.extend_from_slice(&[0, 1, 0, 1]);
        record(&mut bytes, Owner::Pointer(12), TYPE_A, 60, &[1, 2, 3]);
        let msg = parse(&bytes).unwrap();
        assert!(msg.answers.is_empty());
        assert!(!msg.complete);
    }

    #[test]
    fn ttl_with_top_bit_counts_as_zero() {
        let bytes = response(1, "t.test", &[], &[v4("10.0.0.1")], 0x8000_0001);
        assert_eq!(parse(&bytes).unwrap().answers[0].ttl, 0);
    }

    #[test]
    fn tcp_length_prefix_is_accepted() {
        let msg = response(3, "tcp.test", &["alias.test"], &[v4("198.51.100.1")], 60);
        let framed = tcp(&msg);
        let parsed = parse_tcp(&framed).unwrap();
        assert_eq!(parsed.resolutions()[0].query, "tcp.test");
        assert_eq!(parse_payload(PROTO_TCP, &framed), Some(parsed.clone()));
        assert_eq!(parse_payload(PROTO_UDP, &msg), Some(parsed));
        // A prefix longer than the capture reads what is there.
        assert!(parse_tcp(&framed[..framed.len() - 2]).is_some());
        // A prefix shorter than a header is not DNS.
        assert!(parse_tcp(&[0, 5, 0, 0, 0, 0, 0]).is_none());
        assert!(parse_tcp(&[0]).is_none());
        assert!(parse_payload(1, &msg).is_none());
    }

    #[test]
    fn too_many_questions_is_not_dns() {
        let mut bytes = header(1, 0x0100, 200, 0);
        bytes.extend_from_slice(&[0; 64]);
        assert!(parse(&bytes).is_none());
    }

    fn resolution(ip: &str, query: &str, ttl: u32) -> Resolution {
        Resolution {
            addr: ip.parse().unwrap(),
            query: query.into(),
            name: query.into(),
            ttl,
        }
    }

    #[test]
    fn cache_attributes_names_to_the_uid_that_asked() {
        let now = Instant::now();
        let mut cache = DnsCache::default();
        cache.insert(10001, &resolution("192.0.2.1", "app.test", 300), now);
        cache.insert(1000, &resolution("192.0.2.1", "firmware.test", 300), now);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(cache.lookup(10001, ip, now).unwrap().query, "app.test");
        assert_eq!(cache.lookup(1000, ip, now).unwrap().query, "firmware.test");
        // A uid that never asked falls back to the most recent answer.
        let hit = cache.lookup(2000, ip, now).unwrap();
        assert_eq!((hit.query.as_str(), hit.uid), ("firmware.test", 1000));
        assert!(cache.lookup_exact(2000, ip, now).is_none());
        assert!(cache
            .lookup(1000, "192.0.2.2".parse().unwrap(), now)
            .is_none());
    }

    #[test]
    fn cache_maps_ipv4_mapped_addresses_to_ipv4() {
        let now = Instant::now();
        let mut cache = DnsCache::default();
        cache.insert(1, &resolution("192.0.2.9", "mapped.test", 60), now);
        let mapped: IpAddr = "::ffff:192.0.2.9".parse().unwrap();
        assert_eq!(cache.lookup(1, mapped, now).unwrap().query, "mapped.test");
    }

    #[test]
    fn one_uid_flooding_answers_keeps_to_its_share() {
        let now = Instant::now();
        let mut cache = DnsCache::new(DnsCacheOptions {
            capacity: 16,
            per_uid: 4,
            ..DnsCacheOptions::default()
        });
        cache.insert(7, &resolution("192.0.2.7", "victim.test", 300), now);
        for i in 0..100 {
            let addr = format!("198.51.100.{i}");
            cache.insert(666, &resolution(&addr, "flood.test", 300), now);
        }
        assert_eq!(cache.held_by(666), 4, "the flooder keeps only its share");
        let victim: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(
            cache
                .lookup_exact(7, victim, now)
                .map(|n| n.query)
                .as_deref(),
            Some("victim.test"),
            "another uid's name survives the flood"
        );
        let last: IpAddr = "198.51.100.99".parse().unwrap();
        assert!(cache.lookup_exact(666, last, now).is_some(), "newest kept");
        assert_eq!(cache.len(), 5);
    }

    #[test]
    fn cache_entries_expire_within_floor_and_ceiling() {
        let now = Instant::now();
        let options = DnsCacheOptions {
            capacity: 16,
            per_uid: 16,
            min_ttl: Duration::from_secs(30),
            max_ttl: Duration::from_secs(600),
        };
        let mut cache = DnsCache::new(options);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let ip2: IpAddr = "192.0.2.2".parse().unwrap();
        cache.insert(1, &resolution("192.0.2.1", "short.test", 0), now);
        cache.insert(1, &resolution("192.0.2.2", "long.test", 1_000_000), now);
        let at = |s| now + Duration::from_secs(s);
        assert!(cache.lookup(1, ip, at(29)).is_some(), "floor of 30 s");
        assert!(cache.lookup(1, ip, at(30)).is_none());
        assert_eq!(cache.len(), 1, "expired entry removed on lookup");
        assert!(cache.lookup(1, ip2, at(599)).is_some(), "ceiling of 600 s");
        assert_eq!(cache.purge_expired(at(600)), 1);
        assert!(cache.is_empty());
    }

    #[test]
    fn cache_evicts_least_recently_used() {
        let now = Instant::now();
        let mut cache = DnsCache::new(DnsCacheOptions {
            capacity: 2,
            ..DnsCacheOptions::default()
        });
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        cache.insert(1, &resolution("10.0.0.1", "one.test", 60), now);
        cache.insert(1, &resolution("10.0.0.2", "two.test", 60), now);
        // Touch one, so two is the least recently used.
        assert!(cache.lookup(1, ip("10.0.0.1"), now).is_some());
        cache.insert(1, &resolution("10.0.0.3", "three.test", 60), now);
        assert_eq!(cache.len(), 2);
        assert!(cache.lookup(1, ip("10.0.0.2"), now).is_none());
        assert!(cache.lookup_ip(ip("10.0.0.2"), now).is_none());
        assert!(cache.lookup(1, ip("10.0.0.1"), now).is_some());
        assert!(cache.lookup(1, ip("10.0.0.3"), now).is_some());
        // Replacing an entry does not grow the cache.
        cache.insert(1, &resolution("10.0.0.3", "renamed.test", 60), now);
        assert_eq!(cache.len(), 2);
        assert_eq!(
            cache.lookup(1, ip("10.0.0.3"), now).unwrap().query,
            "renamed.test"
        );
        let zero = DnsCache::new(DnsCacheOptions {
            capacity: 0,
            ..DnsCacheOptions::default()
        });
        assert_eq!(zero.options().capacity, 1);
    }

    #[test]
    fn cache_observes_payloads() {
        let now = Instant::now();
        let mut cache = DnsCache::default();
        let msg = response(5, "udp.test", &["edge.test"], &[v4("10.1.0.1")], 60);
        assert_eq!(cache.observe_payload(10050, PROTO_UDP, &msg, now), 1);
        let tcp_msg = tcp(&response(6, "tcp.test", &[], &[v4("10.1.0.2")], 60));
        assert_eq!(cache.observe_payload(10050, PROTO_TCP, &tcp_msg, now), 1);
        assert_eq!(cache.observe_payload(10050, PROTO_UDP, b"junk", now), 0);
        let hit = cache
            .lookup(10050, "10.1.0.1".parse().unwrap(), now)
            .unwrap();
        assert_eq!(hit.query, "udp.test");
        assert_eq!(hit.name, "edge.test");
        assert_eq!(
            cache
                .lookup(10050, "10.1.0.2".parse().unwrap(), now)
                .unwrap()
                .query,
            "tcp.test"
        );
    }

    #[test]
    fn every_prefix_and_bit_flip_of_a_response_is_safe() {
        let bytes = response(
            77,
            "flip.example.net",
            &["c1.example.net", "c2.example.net"],
            &[v4("192.0.2.55"), v4("192.0.2.56")],
            120,
        );
        for cut in 0..=bytes.len() {
            let _ = parse(&bytes[..cut]).map(|m| m.resolutions());
            let _ = parse_tcp(&bytes[..cut]);
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                let _ = parse(&b).map(|m| m.resolutions());
            }
        }
    }
}
