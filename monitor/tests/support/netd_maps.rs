//! A stand-in for Android netd's per-uid counter maps: maps of exactly netd's
//! layout (see egressmon::bpf::netd_stats), pinned in a directory made on bpffs for
//! one test, and the moves netd and system server make on them: count a
//! packet into the live map, flip the selector, drain (clear) a map. The pins
//! and the directory are removed on drop, also when the test fails.

use egressmon::bpf::netd_stats::{
    StatsKey, StatsValue, APP_UID_STATS_MAP, CONFIGURATION_MAP,
    CURRENT_STATS_MAP_CONFIGURATION_KEY, SELECT_MAP_A, SELECT_MAP_B, STATS_MAP_A, STATS_MAP_B,
};
use egressmon::bpf_sys::{self, RawMap, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH};
use std::path::{Path, PathBuf};

const BPF_ANY: u64 = 0;

/// BPF_MAP_CREATE (names are cut to the kernel's 15 bytes).
pub fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> RawMap {
    let short: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(15)
        .collect();
    let fd = bpf_sys::map_create(map_type, key_size, value_size, max_entries, &short)
        .unwrap_or_else(|e| panic!("BPF_MAP_CREATE {name}: {e}"));
    RawMap::from_fd(fd).expect("map info")
}

/// A directory on bpffs for one test's pins; removed with everything in it
/// on drop.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new(tag: &str) -> PinDir {
        let path = Path::new("/sys/fs/bpf").join(tag);
        let dir = PinDir { path };
        egressmon::bpf::system::ensure_pin_dir(&dir.path).expect("pin directory on bpffs");
        dir
    }

    /// Creates a map and pins it as `name` in this directory.
    pub fn pin(
        &self,
        name: &str,
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    ) -> RawMap {
        let map = create_map(map_type, key_size, value_size, max_entries, name);
        bpf_sys::obj_pin(map.fd(), &self.path.join(name))
            .unwrap_or_else(|e| panic!("pinning {name}: {e}"));
        map
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if self.path.exists() {
                eprintln!("warning: could not remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Which netd release's layout to reproduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// netd_shared (Connectivity module): configuration map ARRAY u32 -> u32;
    /// a packet is counted once, in the row of its tag.
    Android13,
    /// Before Android 13 (system/netd): configuration map HASH u32 -> u8; a
    /// tagged packet is counted in its tagged row and again in the tag 0 row.
    Legacy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    A,
    B,
}

/// netd's counter maps in a test directory.
pub struct NetdMaps {
    pub a: RawMap,
    pub b: RawMap,
    pub config: RawMap,
    pub app_uid: Option<RawMap>,
    pub release: Release,
    live: Which,
    // Last, so the maps' descriptors close before the pins go.
    pub dir: PinDir,
}

impl NetdMaps {
    /// All of netd's maps (`with_app_uid`: also map_netd_app_uid_stats_map),
    /// with map A live, as netd starts.
    pub fn new(tag: &str, release: Release, with_app_uid: bool) -> NetdMaps {
        let dir = PinDir::new(&format!("{tag}-netd"));
        let a = dir.pin(STATS_MAP_A, BPF_MAP_TYPE_HASH, 16, 32, 5000);
        let b = dir.pin(STATS_MAP_B, BPF_MAP_TYPE_HASH, 16, 32, 5000);
        let config = match release {
            Release::Android13 => dir.pin(CONFIGURATION_MAP, BPF_MAP_TYPE_ARRAY, 4, 4, 2),
            Release::Legacy => dir.pin(CONFIGURATION_MAP, BPF_MAP_TYPE_HASH, 4, 1, 2),
        };
        let app_uid =
            with_app_uid.then(|| dir.pin(APP_UID_STATS_MAP, BPF_MAP_TYPE_HASH, 4, 32, 10000));
        let mut maps = NetdMaps {
            a,
            b,
            config,
            app_uid,
            release,
            live: Which::A,
            dir,
        };
        maps.select(Which::A);
        maps
    }

    pub fn root(&self) -> &Path {
        &self.dir.path
    }

    pub fn map(&self, which: Which) -> &RawMap {
        match which {
            Which::A => &self.a,
            Which::B => &self.b,
        }
    }

    /// What netd's config says is live.
    pub fn live(&self) -> Which {
        self.live
    }

    /// Flips the selector as system server does before draining.
    pub fn select(&mut self, which: Which) {
        let value = match which {
            Which::A => SELECT_MAP_A,
            Which::B => SELECT_MAP_B,
        };
        let key = CURRENT_STATS_MAP_CONFIGURATION_KEY.to_ne_bytes();
        match self.release {
            Release::Android13 => self.config.update(&key, &value.to_ne_bytes(), BPF_ANY),
            Release::Legacy => self.config.update(&key, &[value as u8], BPF_ANY),
        }
        .expect("writing the selector");
        self.live = which;
    }

    pub fn get(&self, which: Which, key: StatsKey) -> Option<StatsValue> {
        let mut value = [0u8; 32];
        self.map(which)
            .lookup(&key.to_bytes(), &mut value)
            .unwrap()
            .then(|| StatsValue::from_bytes(&value))
    }

    /// Writes one row as it is (no accounting).
    pub fn set(&self, which: Which, key: StatsKey, value: StatsValue) {
        self.map(which)
            .update(&key.to_bytes(), &value.to_bytes(), BPF_ANY)
            .expect("writing a stats row");
    }

    fn add_row(&self, which: Which, key: StatsKey, delta: &StatsValue) {
        let now = self.get(which, key).unwrap_or_default();
        self.set(which, key, sum(&now, delta));
    }

    /// Counts traffic of a socket with this key as netd's skb programs do:
    /// into the live stats map (per release's tag rule) and the app-uid map.
    pub fn count(&self, key: StatsKey, delta: StatsValue) {
        self.count_into(self.live, key, delta);
    }

    /// `count`, but into `which` whatever the selector says (a packet that
    /// read the selector just before a flip).
    pub fn count_into(&self, which: Which, key: StatsKey, delta: StatsValue) {
        self.add_row(which, key, &delta);
        if self.release == Release::Legacy && key.tag != 0 {
            self.add_row(which, StatsKey { tag: 0, ..key }, &delta);
        }
        if let Some(app) = &self.app_uid {
            let uid = key.uid.to_ne_bytes();
            let mut value = [0u8; 32];
            let now = if app.lookup(&uid, &mut value).unwrap() {
                StatsValue::from_bytes(&value)
            } else {
                StatsValue::default()
            };
            app.update(&uid, &sum(&now, &delta).to_bytes(), BPF_ANY)
                .expect("writing the app uid row");
        }
    }

    /// Deletes every row of `which`, one key at a time, as system server's
    /// `BpfMap::clear()` does after reading the inactive map.
    pub fn drain(&self, which: Which) {
        let map = self.map(which);
        let mut key = [0u8; 16];
        while map.next_key(None, &mut key).unwrap() {
            map.delete(&key).unwrap();
        }
    }

    /// Removes a uid's app-uid row (netd does when a uid is removed).
    pub fn remove_app_uid(&self, uid: u32) {
        let app = self.app_uid.as_ref().expect("app uid map");
        assert!(app.delete(&uid.to_ne_bytes()).unwrap(), "no row for {uid}");
    }
}

pub fn sum(a: &StatsValue, b: &StatsValue) -> StatsValue {
    StatsValue {
        rx_packets: a.rx_packets + b.rx_packets,
        rx_bytes: a.rx_bytes + b.rx_bytes,
        tx_packets: a.tx_packets + b.tx_packets,
        tx_bytes: a.tx_bytes + b.tx_bytes,
    }
}
