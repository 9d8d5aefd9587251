//! Block rules (`action = "block"`): which flows the kernel refuses, or in
//! a dry run only counts as refused, and keeping the kernel's `BLOCKS`
//! trie in step with them.
//!
//! Owns: the block rules in force (the rules file's and those `egressmon
//! block` added), their guard rails, turning each rule into trie entries
//! (its uids × its destination prefixes), the entries learnt from DNS
//! answers and from described flows, and writing the trie and its
//! generation (`BLOCK_GEN`, which tells the programs to decide every flow
//! again on its next packet).
//!
//! Where a rule's entries come from:
//! - `dst`: its networks; `country` / `asn`: the networks the GeoIP data
//!   (`--geoip`) places there, expanded when the rule is applied;
//! - `host`, `leak`, `payload`: learnt. A DNS answer a uid of the rule
//!   receives for a matching name adds its addresses as it is processed
//!   (the payload reader drains the kernel's ring every 100 ms: a
//!   connection opened within that window after the answer goes through,
//!   and is refused from its next packet on); a described flow that
//!   matches adds its destination;
//! - none of these: every destination of the rule's uids, but loopback and
//!   link-local ones unless the rule's `scope` says otherwise.
//!
//! Rules are tried in order, those added with `egressmon block` first:
//! where two rules give the same uid and prefix, the first decides.

use crate::enrich::geoip::GeoIp;
use crate::identity::owners::{Owner, OwnerResolver};
use crate::pipeline::rules::{BlockMode, Cidr, Rule, RuleScope, Rules};
use crate::pipeline::vocab::Proto;
use anyhow::{anyhow, bail, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, MapData, MapError};
use monitor_common::*;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

/// Uids a block rule may refuse only with `force = true`: refusing them
/// can cut the whole device off (root and `system` run the platform, netd
/// runs as root, `dns` resolves every app's names, `network_stack`
/// validates networks). A rule for every uid includes them.
pub(crate) const GUARDED_UIDS: [(u32, &str); 4] = [
    (0, "root"),
    (1000, "system"),
    (1051, "dns"),
    (1073, "network_stack"),
];

/// Addresses a rule learns at most (DNS answers, described flows); the
/// oldest make room.
const LEARNT_MAX: usize = 16_384;

/// Destinations that stay on this host or its link, left alone by a rule
/// for every destination unless its `scope` is `local` or `any`.
const LOCAL_NETWORKS: [&str; 8] = [
    "127.0.0.0/8",
    "0.0.0.0/32",
    "169.254.0.0/16",
    "224.0.0.0/24",
    "::1/128",
    "::/128",
    "fe80::/10",
    "ff02::/16",
];

/// An entry that decides "not blocked" for every protocol and port.
const ALLOW_ALL: BlockEntry = BlockEntry {
    rule: 0,
    protos: u32::MAX,
    ports: [0; 4],
    any_port: 1,
    _pad: 0,
};

/// One trie entry's key: prefix length and data.
type TrieKey = (u32, BlockKey);

/// The kernel's block maps, on descriptors of their own.
pub(crate) struct BlockMaps {
    trie: LpmTrie<MapData, BlockKey, BlockEntry>,
    gen: Array<MapData, u32>,
}

impl BlockMaps {
    pub(crate) fn new(trie: MapData, gen: MapData) -> Result<BlockMaps> {
        Ok(BlockMaps {
            trie: LpmTrie::try_from(aya::maps::Map::LpmTrie(trie))?,
            gen: Array::try_from(aya::maps::Map::Array(gen))?,
        })
    }

    /// What an earlier agent left: its entries and generation.
    fn read(&self) -> (HashMap<TrieKey, BlockEntry>, u32) {
        let mut entries = HashMap::new();
        for item in self.trie.iter().flatten() {
            let (key, entry) = item;
            entries.insert((key.prefix_len(), key.data()), entry);
        }
        (entries, self.gen.get(&0, 0).unwrap_or(0))
    }
}

/// Where a block rule came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The rules file (`--rules`).
    File,
    /// `egressmon block`.
    Command,
}

/// One block rule as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct BlockStatus {
    pub name: String,
    pub mode: BlockMode,
    pub source: String,
    /// The uids it refuses; None: every uid.
    pub uids: Option<Vec<u32>>,
    /// Kernel entries it holds (uids × prefixes, and learnt addresses).
    pub entries: usize,
    /// Addresses learnt from DNS answers and flows.
    pub learnt: usize,
}

/// The block rules as the tracker sees them (see [`Blocks::view`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct BlockView {
    /// By number - 1: the rule's name and mode.
    pub(crate) names: Vec<(String, BlockMode)>,
    pub(crate) learning: Vec<Rule>,
}

impl BlockView {
    /// The rule and mode a flow's block mark names.
    pub(crate) fn rule_of(&self, mark: u32) -> Option<&(String, BlockMode)> {
        let number = mark & BLOCK_RULE_MASK;
        (number != 0)
            .then(|| self.names.get(number as usize - 1))
            .flatten()
    }
}

/// The block rules in force and what the kernel holds of them.
pub(crate) struct Blocks {
    file: Vec<Rule>,
    added: Vec<Rule>,
    /// `unblock --all`: the file's block rules stay off until it changes.
    file_suspended: bool,
    /// Rule names by number (`BlockEntry::rule`, from 1): numbers are never
    /// reused while the agent runs, so a flow's mark always names its rule.
    numbers: Vec<String>,
    /// (uid, address) -> the rule that learnt it, in learning order.
    learnt: BTreeMap<(u32, IpAddr), (u64, String)>,
    learnt_tick: u64,
    /// Each rule's uids as last resolved (None: every uid).
    uids: HashMap<String, Option<BTreeSet<u32>>>,
    installed: HashMap<TrieKey, BlockEntry>,
    gen: u32,
    maps: Option<BlockMaps>,
}

impl Blocks {
    /// Blocks over the kernel's maps (adopting what an earlier agent left,
    /// which the first `apply` replaces), or over none (tests).
    pub(crate) fn new(maps: Option<BlockMaps>) -> Blocks {
        let (installed, gen) = maps.as_ref().map(BlockMaps::read).unwrap_or_default();
        Blocks {
            file: Vec::new(),
            added: Vec::new(),
            file_suspended: false,
            numbers: Vec::new(),
            learnt: BTreeMap::new(),
            learnt_tick: 0,
            uids: HashMap::new(),
            installed,
            gen,
            maps,
        }
    }

    /// Works on the kernel's maps from now on, adopting what an earlier
    /// agent left there (the next `apply` replaces it).
    pub(crate) fn use_maps(&mut self, maps: BlockMaps) {
        (self.installed, self.gen) = maps.read();
        self.maps = Some(maps);
    }

    /// Takes the block rules of a (re)loaded rules file; a changed file
    /// lifts an `unblock --all`.
    pub(crate) fn set_file_rules(&mut self, rules: &Rules) {
        self.file = rules.block_rules().cloned().collect();
        self.file_suspended = false;
    }

    /// Takes a reloaded rules file's block rules, unless they fail their
    /// guard rails or do not fit the kernel: then the rules in force stay.
    pub(crate) fn replace_file_rules(
        &mut self,
        rules: &Rules,
        resolver: &OwnerResolver,
        geoip: &GeoIp,
    ) -> Result<()> {
        let previous = (self.file.clone(), self.file_suspended);
        self.set_file_rules(rules);
        let result = self
            .check_all(resolver)
            .and_then(|()| self.apply(resolver, geoip));
        if result.is_err() {
            (self.file, self.file_suspended) = previous;
            let _ = self.apply(resolver, geoip);
        }
        result
    }

    /// What the tracker needs: rule names by number, and the rules that
    /// learn destinations from described flows.
    pub(crate) fn view(&self) -> BlockView {
        BlockView {
            names: self.names(),
            learning: self
                .in_force()
                .filter(|(r, _)| learns(r))
                .map(|(r, _)| r.clone())
                .collect(),
        }
    }

    /// The rules in force, in the order they decide.
    fn in_force(&self) -> impl Iterator<Item = (&Rule, Source)> {
        let file = (!self.file_suspended).then_some(&self.file);
        self.added
            .iter()
            .map(|r| (r, Source::Command))
            .chain(file.into_iter().flatten().map(|r| (r, Source::File)))
    }

    /// Adds (or replaces, by name) a rule from `egressmon block`, after its
    /// guard rails, and applies the rules.
    pub(crate) fn add(
        &mut self,
        rule: Rule,
        resolver: &OwnerResolver,
        geoip: &GeoIp,
    ) -> Result<()> {
        if self.file.iter().any(|r| r.name == rule.name) && !self.file_suspended {
            bail!(
                "a block rule named {:?} is in the rules file: pick another name, or change it in the file",
                rule.name
            );
        }
        check_guards(&rule, &rule_uids(&rule, resolver))?;
        let previous = self.added.clone();
        self.added.retain(|r| r.name != rule.name);
        self.added.push(rule);
        if let Err(e) = self.apply(resolver, geoip) {
            self.added = previous;
            let _ = self.apply(resolver, geoip);
            return Err(e);
        }
        Ok(())
    }

    /// Removes a rule `egressmon block` added (the file's stay until the
    /// file changes, or `unblock --all`).
    pub(crate) fn remove(
        &mut self,
        name: &str,
        resolver: &OwnerResolver,
        geoip: &GeoIp,
    ) -> Result<()> {
        let before = self.added.len();
        self.added.retain(|r| r.name != name);
        if self.added.len() == before {
            if self.file.iter().any(|r| r.name == name) {
                bail!("block rule {name:?} is in the rules file: remove it there (the agent reloads the file), or use `egressmon unblock --all`");
            }
            bail!("no block rule named {name:?}: `egressmon status` lists them");
        }
        self.learnt.retain(|_, (_, rule)| rule != name);
        self.apply(resolver, geoip)
    }

    /// Removes every block: the added rules, and the file's until it
    /// changes.
    pub(crate) fn remove_all(&mut self, resolver: &OwnerResolver, geoip: &GeoIp) -> Result<()> {
        self.added.clear();
        self.file_suspended = true;
        self.learnt.clear();
        self.apply(resolver, geoip)
    }

    /// Checks every rule in force against its guard rails (a rules file
    /// that fails them is refused whole).
    pub(crate) fn check_all(&self, resolver: &OwnerResolver) -> Result<()> {
        for (rule, _) in self.in_force() {
            check_guards(rule, &rule_uids(rule, resolver))?;
        }
        Ok(())
    }

    /// Computes the entries the rules in force want and makes the kernel's
    /// trie hold exactly those, then bumps the generation so that every
    /// flow is decided again.
    pub(crate) fn apply(&mut self, resolver: &OwnerResolver, geoip: &GeoIp) -> Result<()> {
        let wanted = self.wanted(resolver, geoip)?;
        self.write(wanted)
    }

    fn number(&mut self, name: &str) -> u32 {
        match self.numbers.iter().position(|n| n == name) {
            Some(i) => i as u32 + 1,
            None => {
                self.numbers.push(name.to_string());
                self.numbers.len() as u32
            }
        }
    }

    /// Whether the kernel holds any block entry (its refusals count in
    /// their flows alone, not in the uids' totals).
    pub(crate) fn in_kernel(&self) -> bool {
        !self.installed.is_empty()
    }

    /// Rule names by number, for the flows' `block_rule`.
    pub(crate) fn names(&self) -> Vec<(String, BlockMode)> {
        self.numbers
            .iter()
            .map(|n| {
                let mode = self
                    .in_force()
                    .find(|(r, _)| &r.name == n)
                    .map_or(BlockMode::DryRun, |(r, _)| r.mode());
                (n.clone(), mode)
            })
            .collect()
    }

    fn entry_of(&mut self, rule: &Rule) -> BlockEntry {
        let mut marker = self.number(&rule.name) & BLOCK_RULE_MASK;
        if rule.mode() == BlockMode::Enforce {
            marker |= BLOCK_ENFORCE;
        }
        let listed: &[u16] = rule.port.as_ref().map_or(&[], |p| &p.0);
        let mut ports = [0u16; 4];
        for (i, slot) in ports.iter_mut().enumerate() {
            // Unused slots repeat the first port: no slot matches by accident.
            *slot = listed.get(i).or(listed.first()).copied().unwrap_or(0);
        }
        let protos = rule.proto.as_ref().map_or(u32::MAX, |p| {
            p.0.iter().fold(0, |bits, p| {
                bits | match p {
                    Proto::Tcp => block_proto_bit(PROTO_TCP),
                    Proto::Udp => block_proto_bit(PROTO_UDP),
                    _ => 0,
                }
            })
        });
        BlockEntry {
            rule: marker,
            protos,
            ports,
            any_port: listed.is_empty() as u32,
            _pad: 0,
        }
    }

    fn wanted(
        &mut self,
        resolver: &OwnerResolver,
        geoip: &GeoIp,
    ) -> Result<HashMap<TrieKey, BlockEntry>> {
        let rules: Vec<Rule> = self.in_force().map(|(r, _)| r.clone()).collect();
        let mut out: HashMap<TrieKey, BlockEntry> = HashMap::new();
        self.uids.clear();
        for rule in &rules {
            let entry = self.entry_of(rule);
            let uids = rule_uids(rule, resolver);
            self.uids.insert(rule.name.clone(), uids.clone());
            if learns(rule) {
                continue;
            }
            let keys: Vec<u32> = match &uids {
                None => vec![BLOCK_ANY_UID],
                Some(set) => set.iter().copied().collect(),
            };
            let prefixes = places(rule, geoip);
            for uid in keys {
                match &prefixes {
                    None => {
                        out.entry(trie_key(uid, None)).or_insert(entry);
                        if rule.scope == RuleScope::Remote {
                            for local in LOCAL_NETWORKS {
                                let local = Cidr::parse(local).expect("fixed networks parse");
                                out.entry(trie_key(uid, Some(local))).or_insert(ALLOW_ALL);
                            }
                        }
                    }
                    Some(prefixes) => {
                        for p in prefixes {
                            out.entry(trie_key(uid, Some(*p))).or_insert(entry);
                        }
                    }
                }
                if out.len() > BLOCK_ENTRIES as usize {
                    bail!(
                        "the block rules need more than the {BLOCK_ENTRIES} entries the kernel's block map holds (at rule {:?}): narrow it to fewer uids, countries or networks",
                        rule.name
                    );
                }
            }
        }
        let learnt: Vec<((u32, IpAddr), String)> = self
            .learnt
            .iter()
            .map(|(k, (_, rule))| (*k, rule.clone()))
            .collect();
        for ((uid, ip), name) in learnt {
            let Some(rule) = rules.iter().find(|r| r.name == name) else {
                continue;
            };
            let entry = self.entry_of(rule);
            out.entry(trie_key(uid, Some(host_network(ip))))
                .or_insert(entry);
        }
        Ok(out)
    }

    /// Makes the trie hold `wanted`, then moves the generation on (0 when
    /// nothing is blocked: the programs then skip every lookup).
    fn write(&mut self, wanted: HashMap<TrieKey, BlockEntry>) -> Result<()> {
        if let Some(maps) = self.maps.as_mut() {
            let stale: Vec<TrieKey> = self
                .installed
                .keys()
                .filter(|k| !wanted.contains_key(k))
                .copied()
                .collect();
            for key in stale {
                match maps.trie.remove(&Key::new(key.0, key.1)) {
                    Ok(()) | Err(MapError::ElementNotFound) => {}
                    Err(e) => return Err(anyhow!("removing a block entry: {e}")),
                }
                self.installed.remove(&key);
            }
            for (key, entry) in &wanted {
                if self.installed.get(key) == Some(entry) {
                    continue;
                }
                maps.trie.insert(&Key::new(key.0, key.1), entry, 0).map_err(|e| {
                    anyhow!("writing a block entry: {e}; the kernel's block map holds {BLOCK_ENTRIES}: narrow the block rules")
                })?;
                self.installed.insert(*key, *entry);
            }
        }
        self.installed = wanted;
        self.bump()
    }

    fn bump(&mut self) -> Result<()> {
        self.gen = if self.installed.is_empty() {
            0
        } else {
            self.gen.wrapping_add(1).max(1)
        };
        if let Some(maps) = self.maps.as_mut() {
            maps.gen
                .set(0, self.gen, 0)
                .map_err(|e| anyhow!("writing the block generation: {e}"))?;
        }
        Ok(())
    }

    /// A DNS answer `uid` received: blocks `addr` for it where a rule with
    /// a `host` condition matches the name asked or answered and its other
    /// conditions hold. Returns whether anything was added.
    pub(crate) fn learn_answer(
        &mut self,
        uid: u32,
        names: [&str; 2],
        addr: IpAddr,
        place: (Option<&str>, Option<u32>),
    ) -> bool {
        let addr = addr.to_canonical();
        let matching: Vec<Rule> = self
            .in_force()
            .filter(|(r, _)| r.host.is_some() && r.leak.is_none() && r.payload.is_none())
            .filter(|(r, _)| names.iter().any(|n| r.admits_host(n)))
            .filter(|(r, _)| r.admits_place(addr, place.0, place.1))
            .map(|(r, _)| r.clone())
            .collect();
        let mut added = false;
        for rule in matching {
            let applies = match self.uids.get(&rule.name) {
                Some(None) => true,
                Some(Some(set)) => set.contains(&uid),
                None => false,
            };
            if applies {
                added |= self.learn(uid, addr, &rule);
            }
        }
        added
    }

    /// A described flow matched block rule `name` (one that learns): its
    /// destination is blocked for its uid from now on.
    pub(crate) fn learn_flow(&mut self, name: &str, uid: u32, addr: IpAddr) -> bool {
        let Some(rule) = self
            .in_force()
            .find(|(r, _)| r.name == name)
            .map(|(r, _)| r.clone())
        else {
            return false;
        };
        self.learn(uid, addr.to_canonical(), &rule)
    }

    fn learn(&mut self, uid: u32, addr: IpAddr, rule: &Rule) -> bool {
        if self.learnt.contains_key(&(uid, addr)) {
            return false;
        }
        if self.learnt.len() >= LEARNT_MAX {
            let oldest = self
                .learnt
                .iter()
                .min_by_key(|(_, (tick, _))| *tick)
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                self.learnt.remove(&oldest);
                let key = trie_key(oldest.0, Some(host_network(oldest.1)));
                if self.installed.remove(&key).is_some() {
                    if let Some(maps) = self.maps.as_mut() {
                        let _ = maps.trie.remove(&Key::new(key.0, key.1));
                    }
                }
            }
        }
        self.learnt_tick += 1;
        self.learnt
            .insert((uid, addr), (self.learnt_tick, rule.name.clone()));
        let key = trie_key(uid, Some(host_network(addr)));
        if self.installed.contains_key(&key) {
            return false;
        }
        let entry = self.entry_of(rule);
        if let Some(maps) = self.maps.as_mut() {
            if let Err(e) = maps.trie.insert(&Key::new(key.0, key.1), entry, 0) {
                log::warn!(
                    "block rule {}: cannot add {addr} for uid {uid}: {e}",
                    rule.name
                );
                return false;
            }
        }
        self.installed.insert(key, entry);
        if let Err(e) = self.bump() {
            log::warn!("{e:#}");
        }
        log::info!(
            "block rule {}: {addr} blocked for uid {uid} ({})",
            rule.name,
            rule.mode()
        );
        true
    }

    /// The rules in force, for `status`.
    pub(crate) fn status(&self) -> Vec<BlockStatus> {
        self.in_force()
            .map(|(rule, source)| {
                let number = self
                    .numbers
                    .iter()
                    .position(|n| n == &rule.name)
                    .map(|i| i as u32 + 1);
                let entries = number.map_or(0, |n| {
                    self.installed
                        .values()
                        .filter(|e| e.rule & BLOCK_RULE_MASK == n)
                        .count()
                });
                BlockStatus {
                    name: rule.name.clone(),
                    mode: rule.mode(),
                    source: match source {
                        Source::File => "file",
                        Source::Command => "command",
                    }
                    .into(),
                    uids: self
                        .uids
                        .get(&rule.name)
                        .cloned()
                        .flatten()
                        .map(|s| s.into_iter().collect()),
                    entries,
                    learnt: self
                        .learnt
                        .values()
                        .filter(|(_, r)| r == &rule.name)
                        .count(),
                }
            })
            .collect()
    }
}

/// The rule `egressmon block` sends: one `[[rule]]` with `action =
/// "block"`, checked as a rules file's would be.
pub(crate) fn parse_command_rule(text: &str) -> Result<Rule> {
    let rules = Rules::parse(&format!("defaults = false\n{text}"), "(egressmon block)")?;
    let mut block: Vec<Rule> = rules.block_rules().cloned().collect();
    if block.len() != 1 || rules.names().len() != 1 {
        bail!("egressmon block sends one block rule at a time");
    }
    Ok(block.remove(0))
}

/// A rule whose addresses are learnt (host, leak, payload), not known up
/// front.
fn learns(rule: &Rule) -> bool {
    rule.host.is_some() || rule.leak.is_some() || rule.payload.is_some()
}

/// The uids a rule applies to: None for every uid (it names none); else
/// the uids it lists that meet its other conditions, or every known uid
/// that does.
pub(crate) fn rule_uids(rule: &Rule, resolver: &OwnerResolver) -> Option<BTreeSet<u32>> {
    if !rule.names_senders() {
        return None;
    }
    let candidates: Vec<Owner> = match &rule.uid {
        Some(uids) => uids.0.iter().map(|&u| resolver.resolve(u)).collect(),
        None => resolver.known_owners(),
    };
    Some(
        candidates
            .iter()
            .filter(|o| rule.admits_owner(o))
            .map(|o| o.uid)
            .collect(),
    )
}

/// Refuses an enforced rule that would refuse a guarded uid (or every uid)
/// unless it says `force = true`.
pub(crate) fn check_guards(rule: &Rule, uids: &Option<BTreeSet<u32>>) -> Result<()> {
    if rule.mode() != BlockMode::Enforce || rule.force == Some(true) {
        return Ok(());
    }
    let name = &rule.name;
    let hit: Vec<String> = match uids {
        None => {
            bail!("block rule {name:?} would refuse every uid, root and the system's included: name the uids, owners or packages it is for, or add force = true (--force) if you mean it")
        }
        Some(set) => GUARDED_UIDS
            .iter()
            .filter(|(u, _)| set.contains(u))
            .map(|(u, n)| format!("{u} ({n})"))
            .collect(),
    };
    if !hit.is_empty() {
        bail!(
            "block rule {name:?} would refuse uid {}, which the device needs to stay online: narrow it (uid, owner, package), or add force = true (--force) if you mean it",
            hit.join(", ")
        );
    }
    Ok(())
}

/// The rule's destination networks: None for every destination.
fn places(rule: &Rule, geoip: &GeoIp) -> Option<Vec<Cidr>> {
    if let Some(dst) = &rule.dst {
        return Some(dst.0.clone());
    }
    if let Some(countries) = &rule.country {
        let found = geoip.networks(true, &|c, _| {
            c.is_some_and(|c| countries.any(|x| x.as_str().eq_ignore_ascii_case(c)))
        });
        if found.is_empty() {
            log::warn!(
                "block rule {}: the GeoIP data (--geoip) places no network in its countries: it blocks nothing until it does",
                rule.name
            );
        }
        return Some(found);
    }
    if let Some(asns) = &rule.asn {
        let found = geoip.networks(false, &|_, a| a.is_some_and(|a| asns.any(|x| *x == a)));
        if found.is_empty() {
            log::warn!(
                "block rule {}: the GeoIP data (--geoip) places no network in its ASNs: it blocks nothing until it does",
                rule.name
            );
        }
        return Some(found);
    }
    None
}

fn host_network(ip: IpAddr) -> Cidr {
    let ip = ip.to_canonical();
    Cidr {
        addr: ip,
        prefix: if ip.is_ipv4() { 32 } else { 128 },
    }
}

/// The trie key of `uid` and `network` (None: every address).
fn trie_key(uid: u32, network: Option<Cidr>) -> TrieKey {
    let mut data = BlockKey {
        uid: uid.to_be_bytes(),
        addr: [0; 16],
    };
    let Some(network) = network else {
        return (32, data);
    };
    match network.addr {
        IpAddr::V4(a) => {
            data.addr[10] = 0xff;
            data.addr[11] = 0xff;
            data.addr[12..].copy_from_slice(&a.octets());
            (32 + 96 + network.prefix as u32, data)
        }
        IpAddr::V6(a) => {
            data.addr = a.octets();
            (32 + network.prefix as u32, data)
        }
    }
}

#[cfg(test)]
mod tests;
