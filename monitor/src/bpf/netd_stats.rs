//! Reads Android netd's own per-uid traffic counters from the maps netd pins
//! on bpffs, and owns the per-uid totals built from them: monotonic tx/rx
//! packet and byte counts per uid that survive netd swapping and draining its
//! maps. A byte source that costs nothing where our skb egress program
//! cannot attach (netd holds the root cgroup's skb hooks exclusively).
//!
//! # The maps
//!
//! Checked against Android's sources:
//! - LineageOS/android_packages_modules_Connectivity, `bpf_progs/netd.h`:
//!   `StatsKey { uint32_t uid, tag, counterSet, ifaceIndex }` (16 bytes),
//!   `StatsValue { uint64_t rxPackets, rxBytes, txPackets, txBytes }` (32
//!   bytes), the pin paths under `/sys/fs/bpf/netd_shared/`,
//!   `CURRENT_STATS_MAP_CONFIGURATION_KEY` 1 and `SELECT_MAP_A` / `_B` 0 / 1.
//! - LineageOS/android_packages_modules_Connectivity, `bpf_progs/netd.c`:
//!   `configuration_map` ARRAY u32 -> u32, `stats_map_A` / `_B` HASH StatsKey
//!   -> StatsValue, `app_uid_stats_map` HASH u32 -> StatsValue, and
//!   `bpf_traffic_account`, which adds each packet to ONE row of the live
//!   stats map (the row of its socket tag, tag 0 when untagged) and to the
//!   uid's `app_uid_stats_map` entry.
//! - LineageOS/android_packages_modules_Connectivity,
//!   `service-t/native/libs/libnetworkstats/BpfNetworkStats.cpp`: system
//!   server reads the inactive stats map, then clears it, and copies tagged
//!   rows into the untagged totals itself ("for historical reasons").
//! - LineageOS/android_system_netd, `libnetdbpf/include/netdbpf/bpf_shared.h`
//!   and `bpf_progs/netd.c`: the older layout (before Android 13, when the
//!   programs lived in netd itself): maps pinned directly in `/sys/fs/bpf/`
//!   (`map_netd_*`), `configuration_map` HASH u32 -> u8 (with the selector at
//!   key 2 in one version), and a tagged packet added twice, to its tagged
//!   row and to the tag 0 row.
//!
//! # How totals are made
//!
//! - `map_netd_app_uid_stats_map` when it exists (both layouts above define
//!   it): one row per uid, every packet of the uid counted once, never swapped
//!   nor drained.
//! - Otherwise the sum over BOTH `map_netd_stats_map_A` and `_B`. netd's
//!   programs write to the one `map_netd_configuration_map` selects; system
//!   server flips the selector, reads the now inactive map and clears it. So a
//!   uid's counts are spread over both maps and the inactive one goes back to
//!   zero after each drain. Rows: `counterSet` (0 default, 1 foreground) and
//!   `ifaceIndex` rows add up. Tags depend on the layout, told apart by the
//!   configuration map's value size: with 4-byte values (netd_shared,
//!   Android 13+) each packet is in exactly one row, so tagged rows are added;
//!   with 1-byte values (older netd) tagged rows repeat part of the tag 0 row
//!   and are skipped. The selector itself is not needed (and its key moved
//!   between releases): both maps are always read.
//!
//! Both sources are turned into monotonic totals the same way: each row's
//! growth since the previous read is added to its uid. A row that went down
//! or disappeared was cleared (a drain, or a uid removed); its earlier counts
//! stay in the total and the row counts again from zero. A total is never
//! lower than one reported before. The totals start with whatever the maps
//! hold at the first read, so compare totals between reads (rates, like a
//! Prometheus counter) rather than reading them as counts since boot.
//!
//! What the A/B fallback cannot see: counts added to a map after our last
//! read and before system server clears it, and a row cleared and grown past
//! its old value between two reads (only its growth above the old value is
//! seen). Both need a drain between two reads: read more often than system
//! server polls (it polls periodically and when apps query data usage). The
//! app-uid map has neither gap.
//!
//! # What the counts are
//!
//! netd counts at its cgroup skb ingress/egress programs, per socket uid (or
//! the uid a socket was tagged on behalf of), `skb->len` bytes (IP header
//! included, no link header). Recent netd counts an skb longer than 1500
//! bytes (GSO) as the wire packets it estimates for a 1500-byte MTU and TCP
//! with timestamps, headers included (the first releases counted one packet
//! of `skb->len`). Egress packets its firewall drops are not
//! counted; CLAT's own traffic is counted on the v4- interface under the
//! app's uid. So netd's numbers are close to, not equal to, our own skb
//! counts.
//!
//! Reading needs root (and on Android an SELinux domain that may read bpf
//! maps, as Magisk's su has). Maps are read with raw bpf(2) commands
//! (`bpf_sys::RawMap`), no BTF needed.

use crate::bpf_sys::{RawMap, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Where netd pins its maps since Android 13 (the Connectivity module).
pub(crate) const NETD_BPF_ROOT: &str = "/sys/fs/bpf/netd_shared";
/// Where netd pinned them before Android 13.
pub(crate) const LEGACY_NETD_BPF_ROOT: &str = "/sys/fs/bpf";

pub const STATS_MAP_A: &str = "map_netd_stats_map_A";
pub const STATS_MAP_B: &str = "map_netd_stats_map_B";
pub const CONFIGURATION_MAP: &str = "map_netd_configuration_map";
pub const APP_UID_STATS_MAP: &str = "map_netd_app_uid_stats_map";

/// Index of the live stats map's selector in the configuration map (netd.h;
/// 2 in an older netd). This reader does not need it.
pub const CURRENT_STATS_MAP_CONFIGURATION_KEY: u32 = 1;
/// Selector values: `SELECT_MAP_A`, `SELECT_MAP_B`.
pub const SELECT_MAP_A: u32 = 0;
pub const SELECT_MAP_B: u32 = 1;

pub(crate) const STATS_KEY_SIZE: u32 = 16;
pub(crate) const STATS_VALUE_SIZE: u32 = 32;
const VALUE_SIZE: usize = STATS_VALUE_SIZE as usize;

/// netd's `StatsKey`, in host byte order as the maps hold it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StatsKey {
    pub uid: u32,
    pub tag: u32,
    pub counter_set: u32,
    pub iface_index: u32,
}

impl StatsKey {
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        for (i, v) in [self.uid, self.tag, self.counter_set, self.iface_index]
            .into_iter()
            .enumerate()
        {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }

    pub fn from_bytes(b: &[u8; 16]) -> StatsKey {
        let at = |i: usize| u32::from_ne_bytes(b[i * 4..i * 4 + 4].try_into().unwrap());
        StatsKey {
            uid: at(0),
            tag: at(1),
            counter_set: at(2),
            iface_index: at(3),
        }
    }
}

/// netd's `StatsValue`, in host byte order as the maps hold it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsValue {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

impl StatsValue {
    fn fields(&self) -> [u64; 4] {
        [
            self.rx_packets,
            self.rx_bytes,
            self.tx_packets,
            self.tx_bytes,
        ]
    }

    fn from_fields(f: [u64; 4]) -> StatsValue {
        StatsValue {
            rx_packets: f[0],
            rx_bytes: f[1],
            tx_packets: f[2],
            tx_bytes: f[3],
        }
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, v) in self.fields().into_iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }

    pub fn from_bytes(b: &[u8; 32]) -> StatsValue {
        let at = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        StatsValue::from_fields([at(0), at(1), at(2), at(3)])
    }
}

/// Monotonic per-uid totals (see the module docs for where they start and
/// what netd counts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UidTraffic {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

impl UidTraffic {
    fn add(&mut self, v: &StatsValue) {
        self.tx_packets = self.tx_packets.saturating_add(v.tx_packets);
        self.tx_bytes = self.tx_bytes.saturating_add(v.tx_bytes);
        self.rx_packets = self.rx_packets.saturating_add(v.rx_packets);
        self.rx_bytes = self.rx_bytes.saturating_add(v.rx_bytes);
    }
}

/// How netd's stats maps count a packet sent on a tagged socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum TagAccounting {
    /// Android 13+: once, in the row of its tag; every row adds up.
    OncePerPacket,
    /// Before Android 13: in its tagged row and again in the tag 0 row; only
    /// tag 0 rows add up.
    TaggedAlsoUntagged,
}

/// Which of netd's maps the totals come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Source {
    AppUidStats,
    StatsMaps(TagAccounting),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::AppUidStats => write!(f, "{APP_UID_STATS_MAP}"),
            Source::StatsMaps(TagAccounting::OncePerPacket) => {
                write!(f, "{STATS_MAP_A} + {STATS_MAP_B} (every tag row)")
            }
            Source::StatsMaps(TagAccounting::TaggedAlsoUntagged) => {
                write!(f, "{STATS_MAP_A} + {STATS_MAP_B} (tag 0 rows)")
            }
        }
    }
}

struct OpenMap {
    map: RawMap,
    path: PathBuf,
}

enum Maps {
    AppUid(OpenMap),
    StatsAb {
        a: OpenMap,
        b: OpenMap,
        tags: TagAccounting,
    },
}

/// A reader of netd's per-uid counters; keeps the monotonic totals between
/// reads, so keep one for the life of the process.
pub struct NetdStats {
    root: PathBuf,
    maps: Maps,
    totals: Totals,
}

impl NetdStats {
    /// Opens netd's maps under `root` (normally `NETD_BPF_ROOT`). `Ok(None)`
    /// when none of them is there (not Android, or not netd's bpf). An error
    /// when they are there but cannot be read, or are not laid out as netd's.
    pub fn open(root: &Path) -> Result<Option<NetdStats>> {
        let path = |name: &str| root.join(name);
        let app_uid = path(APP_UID_STATS_MAP);
        if exists(&app_uid)? {
            let map = open_map(&app_uid, &APP_UID_LAYOUT)?;
            return Ok(Some(NetdStats {
                root: root.to_path_buf(),
                maps: Maps::AppUid(map),
                totals: Totals::default(),
            }));
        }
        let names = [STATS_MAP_A, STATS_MAP_B, CONFIGURATION_MAP];
        let mut found = Vec::new();
        for name in names {
            if exists(&path(name))? {
                found.push(name);
            }
        }
        if found.is_empty() {
            return Ok(None);
        }
        if found.len() < names.len() {
            let missing: Vec<&str> = names.into_iter().filter(|n| !found.contains(n)).collect();
            bail!(
                "{}: netd's per-uid counters need {APP_UID_STATS_MAP}, or all of {}; found only {} \
                 (missing {}). Is this netd's bpf directory? Point egressmon at the directory that \
                 holds all of them.",
                root.display(),
                names.join(", "),
                found.join(", "),
                missing.join(", ")
            );
        }
        let a = open_map(&path(STATS_MAP_A), &STATS_LAYOUT)?;
        let b = open_map(&path(STATS_MAP_B), &STATS_LAYOUT)?;
        let config = open_map(&path(CONFIGURATION_MAP), &CONFIGURATION_LAYOUT)?;
        let tags = if config.map.info().value_size == 1 {
            TagAccounting::TaggedAlsoUntagged
        } else {
            TagAccounting::OncePerPacket
        };
        Ok(Some(NetdStats {
            root: root.to_path_buf(),
            maps: Maps::StatsAb { a, b, tags },
            totals: Totals::default(),
        }))
    }

    /// `open` on `NETD_BPF_ROOT`, then on `LEGACY_NETD_BPF_ROOT`.
    pub(crate) fn open_default() -> Result<Option<NetdStats>> {
        match NetdStats::open(Path::new(NETD_BPF_ROOT))? {
            Some(stats) => Ok(Some(stats)),
            None => NetdStats::open(Path::new(LEGACY_NETD_BPF_ROOT)),
        }
    }

    /// The directory the maps were opened in.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub fn source(&self) -> Source {
        match &self.maps {
            Maps::AppUid(_) => Source::AppUidStats,
            Maps::StatsAb { tags, .. } => Source::StatsMaps(*tags),
        }
    }

    /// Reads the maps and returns every uid's monotonic totals (uids seen
    /// once stay, also after their rows are gone). On an error nothing is
    /// updated and the next read carries on from the previous one.
    pub fn totals_by_uid(&mut self) -> Result<BTreeMap<u32, UidTraffic>> {
        let mut rows = HashMap::new();
        match &self.maps {
            Maps::AppUid(m) => {
                for (key, value) in read_hash(m)? {
                    let uid = u32::from_ne_bytes(key[..4].try_into().unwrap());
                    let id = RowId {
                        map: 0,
                        key: StatsKey {
                            uid,
                            ..Default::default()
                        },
                    };
                    rows.insert(id, StatsValue::from_bytes(&value));
                }
            }
            Maps::StatsAb { a, b, tags } => {
                for (index, m) in [a, b].into_iter().enumerate() {
                    for (key, value) in read_hash(m)? {
                        let key = StatsKey::from_bytes(&key[..16].try_into().unwrap());
                        if counts(&key, *tags) {
                            let id = RowId {
                                map: index as u8,
                                key,
                            };
                            rows.insert(id, StatsValue::from_bytes(&value));
                        }
                    }
                }
            }
        }
        self.totals.update(rows);
        Ok(self.totals.by_uid.clone())
    }
}

/// netd's totals as the restart state keeps them (see `crate::serve::state`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NetdSnapshot {
    pub(crate) root: PathBuf,
    /// Ids of the maps the rows were read from.
    pub(crate) map_ids: Vec<u32>,
    /// Rows as last read: (0 = A or the app-uid map, 1 = B; key; value).
    pub(crate) rows: Vec<(u8, StatsKey, StatsValue)>,
    pub(crate) by_uid: BTreeMap<u32, UidTraffic>,
}

impl NetdStats {
    fn map_ids(&self) -> Vec<u32> {
        match &self.maps {
            Maps::AppUid(m) => vec![m.map.info().id],
            Maps::StatsAb { a, b, .. } => vec![a.map.info().id, b.map.info().id],
        }
    }

    pub(crate) fn snapshot(&self) -> NetdSnapshot {
        let mut rows: Vec<(u8, StatsKey, StatsValue)> = self
            .totals
            .last
            .iter()
            .map(|(id, value)| (id.map, id.key, *value))
            .collect();
        rows.sort_by_key(|(map, key, _)| (*map, *key));
        NetdSnapshot {
            root: self.root.clone(),
            map_ids: self.map_ids(),
            rows,
            by_uid: self.totals.by_uid.clone(),
        }
    }

    /// Carries a previous agent's totals on (read from the same root), so
    /// they keep growing from where it left them instead of starting over.
    /// Its rows count as already read only if they came from these very
    /// maps: maps made anew since hold only counts it never saw.
    pub(crate) fn restore(&mut self, saved: NetdSnapshot) -> bool {
        if saved.root != self.root {
            return false;
        }
        if saved.map_ids == self.map_ids() {
            self.totals.last = saved
                .rows
                .into_iter()
                .map(|(map, key, value)| (RowId { map, key }, value))
                .collect();
        }
        self.totals.by_uid = saved.by_uid;
        true
    }
}

/// Whether a stats map row adds to its uid's total.
fn counts(key: &StatsKey, tags: TagAccounting) -> bool {
    match tags {
        TagAccounting::OncePerPacket => true,
        TagAccounting::TaggedAlsoUntagged => key.tag == 0,
    }
}

/// One counted row: which map (0 = A or the app-uid map, 1 = B) and its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct RowId {
    map: u8,
    key: StatsKey,
}

/// Rows as last read, and what they added up to per uid.
#[derive(Default)]
struct Totals {
    last: HashMap<RowId, StatsValue>,
    by_uid: BTreeMap<u32, UidTraffic>,
}

impl Totals {
    /// Takes one complete read of every counted row.
    fn update(&mut self, rows: HashMap<RowId, StatsValue>) {
        for (id, now) in &rows {
            let grown = match self.last.get(id) {
                Some(before) => {
                    let (b, n) = (before.fields(), now.fields());
                    if n.iter().zip(b).all(|(n, b)| *n >= b) {
                        StatsValue::from_fields([
                            n[0] - b[0],
                            n[1] - b[1],
                            n[2] - b[2],
                            n[3] - b[3],
                        ])
                    } else {
                        // Went down: cleared and counting again from zero.
                        *now
                    }
                }
                // New, or back after being cleared.
                None => *now,
            };
            self.by_uid.entry(id.key.uid).or_default().add(&grown);
        }
        self.last = rows;
    }
}

struct Layout {
    what: &'static str,
    types: &'static [u32],
    key_size: u32,
    value_sizes: &'static [u32],
    expected: &'static str,
}

const STATS_LAYOUT: Layout = Layout {
    what: "per-uid stats map",
    types: &[BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH],
    key_size: STATS_KEY_SIZE,
    value_sizes: &[STATS_VALUE_SIZE],
    expected: "a hash map with 16-byte keys (StatsKey: uid, tag, counterSet, ifaceIndex) and \
               32-byte values (StatsValue: rx/tx packets and bytes)",
};

const APP_UID_LAYOUT: Layout = Layout {
    what: "app uid stats map",
    types: &[BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH],
    key_size: 4,
    value_sizes: &[STATS_VALUE_SIZE],
    expected: "a hash map with 4-byte keys (uid) and 32-byte values (StatsValue: rx/tx \
               packets and bytes)",
};

const CONFIGURATION_LAYOUT: Layout = Layout {
    what: "configuration map",
    types: &[BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH],
    key_size: 4,
    value_sizes: &[4, 1],
    expected: "an array (Android 13+) or hash map (before) with 4-byte keys and 4-byte (or, \
               before Android 13, 1-byte) values",
};

fn type_name(map_type: u32) -> String {
    match map_type {
        BPF_MAP_TYPE_HASH => "a hash".into(),
        BPF_MAP_TYPE_ARRAY => "an array".into(),
        BPF_MAP_TYPE_LRU_HASH => "an LRU hash".into(),
        other => format!("a type {other}"),
    }
}

/// Whether `path` exists; an error when it cannot be looked at.
fn exists(path: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => Ok(false),
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot look for netd's map {}: run egressmon as root to read netd's counters",
                path.display()
            )
        }),
    }
}

fn open_map(path: &Path, layout: &Layout) -> Result<OpenMap> {
    let map = match RawMap::open_pinned_read_only(path) {
        Ok(map) => map,
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)) => bail!(
            "cannot open netd's {} {}: {e}. Reading it needs root (CAP_SYS_ADMIN or CAP_BPF) \
             and, on Android, an SELinux domain allowed to read bpf maps (Magisk's su is): run \
             egressmon as root",
            layout.what,
            path.display()
        ),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "opening netd's {} {} (is it a pinned bpf map?)",
                    layout.what,
                    path.display()
                )
            })
        }
    };
    let info = *map.info();
    if !layout.types.contains(&info.map_type)
        || info.key_size != layout.key_size
        || !layout.value_sizes.contains(&info.value_size)
    {
        bail!(
            "{} is not laid out as netd's {}: it is {} map with {}-byte keys and {}-byte \
             values, expected {}. Refusing to read it (another Android release, or not netd's \
             map)",
            path.display(),
            layout.what,
            type_name(info.map_type),
            info.key_size,
            info.value_size,
            layout.expected
        );
    }
    Ok(OpenMap {
        map,
        path: path.to_path_buf(),
    })
}

/// Every row of a hash map, each key once, with BPF_MAP_GET_NEXT_KEY and
/// BPF_MAP_LOOKUP_ELEM (any kernel netd runs on; batch reads need 5.6). Rows
/// deleted while we read are skipped; if the key we stand on is deleted, the
/// kernel starts over from the first key and the duplicates fold together.
fn read_hash(m: &OpenMap) -> Result<HashMap<Vec<u8>, [u8; VALUE_SIZE]>> {
    let map = &m.map;
    let key_size = map.info().key_size as usize;
    let ctx = || format!("reading netd's map {}", m.path.display());
    let mut rows = HashMap::new();
    let mut key = vec![0u8; key_size];
    let mut more = match map.next_key(None, &mut key) {
        // Before 4.12 there is no "first key" request: start after a key
        // that is not in the map.
        Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
            let start = absent_key(map).with_context(ctx)?;
            map.next_key(Some(&start), &mut key).with_context(ctx)?
        }
        other => other.with_context(ctx)?,
    };
    let limit = 4 * map.info().max_entries as usize + 64;
    let mut steps = 0;
    while more {
        steps += 1;
        if steps > limit {
            bail!(
                "{}: the map kept changing while it was read ({steps} steps for at most {} rows); \
                 read again",
                m.path.display(),
                map.info().max_entries
            );
        }
        let mut value = [0u8; VALUE_SIZE];
        if map.lookup(&key, &mut value).with_context(ctx)? {
            rows.insert(key.clone(), value);
        }
        let mut next = vec![0u8; key_size];
        more = map.next_key(Some(&key), &mut next).with_context(ctx)?;
        key = next;
    }
    Ok(rows)
}

fn absent_key(map: &RawMap) -> std::io::Result<Vec<u8>> {
    let mut value = vec![0u8; map.info().value_size as usize];
    for byte in (0..=255u8).rev() {
        let key = vec![byte; map.info().key_size as usize];
        if !map.lookup(&key, &mut value)? {
            return Ok(key);
        }
    }
    Err(std::io::Error::other(
        "no absent key to start iterating from",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(map: u8, uid: u32, tag: u32, set: u32, iface: u32) -> RowId {
        RowId {
            map,
            key: StatsKey {
                uid,
                tag,
                counter_set: set,
                iface_index: iface,
            },
        }
    }

    fn tx(packets: u64, bytes: u64) -> StatsValue {
        StatsValue {
            tx_packets: packets,
            tx_bytes: bytes,
            ..Default::default()
        }
    }

    #[test]
    fn layouts_match_netd() {
        assert_eq!(std::mem::size_of::<StatsKey>(), 16);
        assert_eq!(std::mem::size_of::<StatsValue>(), 32);
        let key = StatsKey {
            uid: 10001,
            tag: 0xffffff82,
            counter_set: 1,
            iface_index: 7,
        };
        assert_eq!(StatsKey::from_bytes(&key.to_bytes()), key);
        assert_eq!(&key.to_bytes()[..4], &10001u32.to_ne_bytes());
        let value = StatsValue {
            rx_packets: 1,
            rx_bytes: 2,
            tx_packets: 3,
            tx_bytes: 4,
        };
        assert_eq!(StatsValue::from_bytes(&value.to_bytes()), value);
        assert_eq!(&value.to_bytes()[16..24], &3u64.to_ne_bytes());
    }

    #[test]
    fn growth_is_added_and_clears_do_not_go_backwards() {
        let mut t = Totals::default();
        t.update(HashMap::from([(row(0, 7, 0, 0, 1), tx(2, 200))]));
        assert_eq!(t.by_uid[&7].tx_bytes, 200);
        t.update(HashMap::from([
            (row(0, 7, 0, 0, 1), tx(3, 300)),
            (row(1, 7, 0, 0, 1), tx(1, 50)),
        ]));
        assert_eq!((t.by_uid[&7].tx_packets, t.by_uid[&7].tx_bytes), (4, 350));
        // Map 0 drained: its row is gone, the total stays.
        t.update(HashMap::from([(row(1, 7, 0, 0, 1), tx(1, 50))]));
        assert_eq!(t.by_uid[&7].tx_bytes, 350);
        // The row comes back from zero.
        t.update(HashMap::from([
            (row(0, 7, 0, 0, 1), tx(1, 10)),
            (row(1, 7, 0, 0, 1), tx(1, 50)),
        ]));
        assert_eq!(t.by_uid[&7].tx_bytes, 360);
        // A row that went down was cleared and regrew in between.
        t.update(HashMap::from([
            (row(0, 7, 0, 0, 1), tx(1, 10)),
            (row(1, 7, 0, 0, 1), tx(1, 20)),
        ]));
        assert_eq!(t.by_uid[&7].tx_bytes, 380);
    }

    #[test]
    fn totals_never_decrease() {
        let mut t = Totals::default();
        let mut seed = 0x2545f491u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut before = BTreeMap::new();
        for _ in 0..500 {
            let mut rows = HashMap::new();
            for uid in 0..4u32 {
                for map in 0..2u8 {
                    if next() % 3 != 0 {
                        rows.insert(row(map, uid, 0, 0, 1), tx(next() % 100, next() % 10_000));
                    }
                }
            }
            t.update(rows);
            for (uid, now) in &t.by_uid {
                let was: UidTraffic = before.get(uid).copied().unwrap_or_default();
                assert!(now.tx_bytes >= was.tx_bytes && now.tx_packets >= was.tx_packets);
            }
            before = t.by_uid.clone();
        }
    }

    #[test]
    fn tag_rows_count_by_layout() {
        let tagged = StatsKey {
            uid: 1,
            tag: 5,
            ..Default::default()
        };
        let untagged = StatsKey {
            uid: 1,
            ..Default::default()
        };
        assert!(counts(&tagged, TagAccounting::OncePerPacket));
        assert!(counts(&untagged, TagAccounting::OncePerPacket));
        assert!(!counts(&tagged, TagAccounting::TaggedAlsoUntagged));
        assert!(counts(&untagged, TagAccounting::TaggedAlsoUntagged));
    }

    #[test]
    fn no_maps_is_none() {
        let dir = std::env::temp_dir().join(format!("egm-netd-none-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let opened = NetdStats::open(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(opened.unwrap().is_none());
        assert!(NetdStats::open(Path::new("/nonexistent/egm-netd"))
            .unwrap()
            .is_none());
    }
}
