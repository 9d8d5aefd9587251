//! egressmon::bpf::netd_stats against maps of exactly Android netd's layout,
//! pinned on bpffs by the test (support::netd_maps) and moved as netd and
//! system server move them: packets counted into the live map, the selector
//! flipped, the inactive map drained. Totals must be exact and never go
//! backwards.
//!
//! Run as root (`cargo xtask test`, or `cargo test -p monitor --test
//! netd_stats -- --test-threads=1`); they never skip.

mod support;

use egressmon::bpf::netd_stats::{
    NetdStats, Source, StatsKey, StatsValue, TagAccounting, UidTraffic, APP_UID_STATS_MAP,
    CONFIGURATION_MAP, STATS_MAP_A, STATS_MAP_B,
};
use egressmon::bpf_sys::{BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH};
use std::collections::BTreeMap;
use std::path::Path;
use support::netd_maps::{NetdMaps, PinDir, Release, Which};
use support::{require_root, tag};

fn key(uid: u32, tag: u32, counter_set: u32, iface_index: u32) -> StatsKey {
    StatsKey {
        uid,
        tag,
        counter_set,
        iface_index,
    }
}

fn traffic(tx_packets: u64, tx_bytes: u64, rx_packets: u64, rx_bytes: u64) -> StatsValue {
    StatsValue {
        rx_packets,
        rx_bytes,
        tx_packets,
        tx_bytes,
    }
}

/// What the test counted per uid: what the totals must say.
#[derive(Default)]
struct Sent(BTreeMap<u32, UidTraffic>);

impl Sent {
    fn add(&mut self, uid: u32, v: StatsValue) {
        let t = self.0.entry(uid).or_default();
        t.tx_packets += v.tx_packets;
        t.tx_bytes += v.tx_bytes;
        t.rx_packets += v.rx_packets;
        t.rx_bytes += v.rx_bytes;
    }
}

/// Counts through the fixture and remembers it.
fn count(maps: &NetdMaps, sent: &mut Sent, k: StatsKey, v: StatsValue) {
    maps.count(k, v);
    sent.add(k.uid, v);
}

fn count_into(maps: &NetdMaps, sent: &mut Sent, which: Which, k: StatsKey, v: StatsValue) {
    maps.count_into(which, k, v);
    sent.add(k.uid, v);
}

fn open(root: &Path) -> NetdStats {
    NetdStats::open(root)
        .expect("opening the fixture maps")
        .expect("the fixture maps are found")
}

/// Reads totals, checks they equal what was sent and that no uid went
/// backwards since `before`.
fn read_exact(
    stats: &mut NetdStats,
    sent: &Sent,
    before: &mut BTreeMap<u32, UidTraffic>,
    step: &str,
) {
    let now = stats.totals_by_uid().expect("reading totals");
    for (uid, was) in before.iter() {
        let t = now
            .get(uid)
            .unwrap_or_else(|| panic!("{step}: uid {uid} vanished"));
        assert!(
            t.tx_packets >= was.tx_packets
                && t.tx_bytes >= was.tx_bytes
                && t.rx_packets >= was.rx_packets
                && t.rx_bytes >= was.rx_bytes,
            "{step}: uid {uid} went backwards: {was:?} -> {t:?}"
        );
    }
    assert_eq!(now, sent.0, "{step}: totals differ from what was counted");
    *before = now;
}

fn err_text(root: &Path) -> String {
    match NetdStats::open(root) {
        Ok(Some(_)) => panic!("{} opened, expected an error", root.display()),
        Ok(None) => panic!("{} is None, expected an error", root.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn tagged_rows_once_counter_sets_and_ifaces_summed() {
    require_root();
    for release in [Release::Android13, Release::Legacy] {
        let maps = NetdMaps::new(&tag("netd-fixture"), release, false);
        let mut sent = Sent::default();
        let app = 10001;
        count(
            &maps,
            &mut sent,
            key(app, 0, 0, 2),
            traffic(10, 1000, 4, 400),
        );
        count(
            &maps,
            &mut sent,
            key(app, 0x1234, 0, 2),
            traffic(3, 300, 1, 80),
        );
        count(&maps, &mut sent, key(app, 0, 1, 2), traffic(5, 500, 0, 0));
        count(&maps, &mut sent, key(app, 0, 0, 3), traffic(2, 200, 2, 120));
        count(&maps, &mut sent, key(app, 7, 1, 3), traffic(1, 100, 0, 0));
        count(&maps, &mut sent, key(10002, 0, 0, 2), traffic(1, 60, 1, 60));
        // Enough rows to walk a real hash map, not one bucket.
        for uid in 20000..23000 {
            count(
                &maps,
                &mut sent,
                key(uid, 0, 0, 2),
                traffic(1, uid as u64, 0, 0),
            );
        }

        // The fixture does what each release does with a tagged packet.
        let untagged = maps.get(Which::A, key(app, 0, 0, 2)).unwrap();
        match release {
            Release::Android13 => assert_eq!(untagged.tx_bytes, 1000),
            Release::Legacy => assert_eq!(untagged.tx_bytes, 1300),
        }

        let mut stats = open(maps.root());
        let tags = match release {
            Release::Android13 => TagAccounting::OncePerPacket,
            Release::Legacy => TagAccounting::TaggedAlsoUntagged,
        };
        assert_eq!(stats.source(), Source::StatsMaps(tags));
        let mut before = BTreeMap::new();
        read_exact(&mut stats, &sent, &mut before, &format!("{release:?}"));
        assert_eq!(
            before[&app],
            UidTraffic {
                tx_packets: 21,
                tx_bytes: 2100,
                rx_packets: 7,
                rx_bytes: 600
            },
            "{release:?}"
        );
        // Reading again without traffic changes nothing.
        read_exact(
            &mut stats,
            &sent,
            &mut before,
            &format!("{release:?} again"),
        );
    }
}

#[test]
fn swaps_and_drains_keep_totals_exact_and_monotonic() {
    require_root();
    for release in [Release::Android13, Release::Legacy] {
        let mut maps = NetdMaps::new(&tag("netd-fixture"), release, false);
        let mut sent = Sent::default();
        let mut before = BTreeMap::new();
        let (app, other) = (10123, 10200);
        let plain = key(app, 0, 0, 2);
        let tagged = key(app, 0xffffff82, 0, 2);
        let fg = key(app, 0, 1, 5);
        let mut stats = open(maps.root());
        let step = |s: &str| format!("{release:?}: {s}");

        count(&maps, &mut sent, plain, traffic(5, 500, 7, 900));
        count(&maps, &mut sent, key(other, 0, 0, 2), traffic(1, 40, 0, 0));
        read_exact(&mut stats, &sent, &mut before, &step("A live"));

        // System server flips to B; a packet that read the old selector
        // still lands in A; new traffic goes to B.
        maps.select(Which::B);
        count_into(&maps, &mut sent, Which::A, plain, traffic(1, 40, 0, 0));
        count(&maps, &mut sent, plain, traffic(2, 100, 1, 70));
        count(&maps, &mut sent, tagged, traffic(1, 60, 1, 90));
        read_exact(
            &mut stats,
            &sent,
            &mut before,
            &step("B live, A not drained"),
        );

        // ... then reads A and clears it.
        maps.drain(Which::A);
        read_exact(&mut stats, &sent, &mut before, &step("A drained"));

        count(&maps, &mut sent, plain, traffic(3, 300, 0, 0));
        count(&maps, &mut sent, fg, traffic(2, 150, 2, 150));
        read_exact(&mut stats, &sent, &mut before, &step("B grows"));

        // Next poll: back to A (empty, counting from zero), drain B.
        maps.select(Which::A);
        count(&maps, &mut sent, plain, traffic(1, 10, 0, 0));
        read_exact(&mut stats, &sent, &mut before, &step("A live again"));
        maps.drain(Which::B);
        read_exact(&mut stats, &sent, &mut before, &step("B drained"));

        // Counters moving between every step of a few more rounds.
        for round in 0..6u64 {
            let next = match maps.live() {
                Which::A => Which::B,
                Which::B => Which::A,
            };
            let old = maps.live();
            count(
                &maps,
                &mut sent,
                plain,
                traffic(round + 1, 100 * round + 7, 1, 33),
            );
            count(&maps, &mut sent, tagged, traffic(1, 11, 0, 0));
            read_exact(&mut stats, &sent, &mut before, &step("round: counted"));
            maps.select(next);
            count_into(&maps, &mut sent, old, fg, traffic(1, 5, 0, 0));
            count(&maps, &mut sent, plain, traffic(2, 20, 2, 20));
            read_exact(&mut stats, &sent, &mut before, &step("round: flipped"));
            maps.drain(old);
            read_exact(&mut stats, &sent, &mut before, &step("round: drained"));
        }
        assert!(before[&app].tx_bytes > 0 && before[&other].tx_bytes == 40);
    }
}

#[test]
fn cleared_map_never_makes_totals_go_backwards() {
    require_root();
    let mut maps = NetdMaps::new(&tag("netd-fixture"), Release::Android13, false);
    let mut sent = Sent::default();
    let mut before = BTreeMap::new();
    let app = 10555;
    let k = key(app, 0, 0, 2);
    let mut stats = open(maps.root());

    count(&maps, &mut sent, k, traffic(10, 1000, 10, 1000));
    read_exact(&mut stats, &sent, &mut before, "counted");

    // Drained while inactive: the uid has no row left anywhere.
    maps.select(Which::B);
    maps.drain(Which::A);
    read_exact(&mut stats, &sent, &mut before, "no rows left");
    assert_eq!(before[&app].tx_bytes, 1000);

    // Live again: the row comes back from zero.
    maps.select(Which::A);
    maps.drain(Which::B);
    count(&maps, &mut sent, k, traffic(2, 50, 0, 0));
    read_exact(&mut stats, &sent, &mut before, "row back");

    // Cleared and counted again between two reads: the row went down.
    maps.select(Which::B);
    maps.drain(Which::A);
    maps.select(Which::A);
    count(&maps, &mut sent, k, traffic(1, 20, 0, 0));
    assert_eq!(maps.get(Which::A, k).unwrap().tx_bytes, 20);
    read_exact(&mut stats, &sent, &mut before, "cleared and regrown");
    assert_eq!(before[&app].tx_bytes, 1070);

    // A fresh reader starts from what the maps hold now.
    let mut fresh = open(maps.root());
    let now = fresh.totals_by_uid().unwrap();
    assert_eq!(now[&app].tx_bytes, 20);
}

#[test]
fn app_uid_map_is_used_when_present() {
    require_root();
    let mut maps = NetdMaps::new(&tag("netd-fixture"), Release::Android13, true);
    let mut sent = Sent::default();
    let mut before = BTreeMap::new();
    let (app, gone) = (10777, 10778);
    count(&maps, &mut sent, key(app, 0, 0, 2), traffic(3, 300, 1, 100));
    count(
        &maps,
        &mut sent,
        key(app, 0x99, 1, 3),
        traffic(1, 100, 0, 0),
    );
    count(&maps, &mut sent, key(gone, 0, 0, 2), traffic(1, 50, 0, 0));
    // A stats row the app-uid map does not have: must not be read.
    maps.set(Which::B, key(app, 0, 0, 9), traffic(99, 99_999, 99, 99_999));

    let mut stats = open(maps.root());
    assert_eq!(stats.source(), Source::AppUidStats);
    read_exact(&mut stats, &sent, &mut before, "app uid map");

    // Swaps and drains of the stats maps do not touch it.
    maps.select(Which::B);
    maps.drain(Which::A);
    maps.drain(Which::B);
    count(&maps, &mut sent, key(app, 0, 0, 2), traffic(2, 20, 2, 20));
    read_exact(&mut stats, &sent, &mut before, "after swaps");

    // A removed uid keeps its total; a new row for it counts from zero.
    maps.remove_app_uid(gone);
    read_exact(&mut stats, &sent, &mut before, "uid removed");
    count(&maps, &mut sent, key(gone, 0, 0, 2), traffic(2, 20, 0, 0));
    read_exact(&mut stats, &sent, &mut before, "uid back");
    assert_eq!(before[&gone].tx_bytes, 70);
}

#[test]
fn absent_maps_are_none() {
    require_root();
    let dir = PinDir::new(&tag("netd-fixture"));
    assert!(NetdStats::open(&dir.path).unwrap().is_none());
    // Someone else's map is not netd's.
    dir.pin("map_other_counters", BPF_MAP_TYPE_HASH, 16, 32, 8);
    assert!(NetdStats::open(&dir.path).unwrap().is_none());
    assert!(NetdStats::open(&dir.path.join("missing"))
        .unwrap()
        .is_none());
}

#[test]
fn wrong_layouts_are_refused_with_the_expected_sizes() {
    require_root();
    {
        let dir = PinDir::new(&tag("netd-fixture"));
        dir.pin(STATS_MAP_A, BPF_MAP_TYPE_HASH, 16, 24, 16);
        dir.pin(STATS_MAP_B, BPF_MAP_TYPE_HASH, 16, 32, 16);
        dir.pin(CONFIGURATION_MAP, BPF_MAP_TYPE_ARRAY, 4, 4, 2);
        let text = err_text(&dir.path);
        let path = dir.path.join(STATS_MAP_A);
        for want in [
            path.to_str().unwrap(),
            "24-byte values",
            "16-byte keys",
            "32-byte values",
            "Refusing",
        ] {
            assert!(text.contains(want), "{want:?} not in: {text}");
        }
    }
    {
        let dir = PinDir::new(&tag("netd-fixture"));
        dir.pin(APP_UID_STATS_MAP, BPF_MAP_TYPE_HASH, 8, 32, 16);
        let text = err_text(&dir.path);
        assert!(
            text.contains(APP_UID_STATS_MAP) && text.contains("4-byte keys"),
            "{text}"
        );
    }
    {
        let dir = PinDir::new(&tag("netd-fixture"));
        dir.pin(STATS_MAP_A, BPF_MAP_TYPE_HASH, 16, 32, 16);
        dir.pin(STATS_MAP_B, BPF_MAP_TYPE_HASH, 16, 32, 16);
        dir.pin(CONFIGURATION_MAP, BPF_MAP_TYPE_ARRAY, 4, 8, 2);
        let text = err_text(&dir.path);
        assert!(
            text.contains(CONFIGURATION_MAP) && text.contains("8-byte values"),
            "{text}"
        );
    }
}

#[test]
fn incomplete_stats_maps_are_an_error() {
    require_root();
    let dir = PinDir::new(&tag("netd-fixture"));
    dir.pin(STATS_MAP_A, BPF_MAP_TYPE_HASH, 16, 32, 16);
    dir.pin(CONFIGURATION_MAP, BPF_MAP_TYPE_ARRAY, 4, 4, 2);
    let text = err_text(&dir.path);
    assert!(text.contains(&format!("missing {STATS_MAP_B}")), "{text}");
}

#[test]
fn fixtures_leave_nothing_behind() {
    require_root();
    let path = {
        let maps = NetdMaps::new(&tag("netd-fixture"), Release::Android13, true);
        maps.count(key(1, 0, 0, 1), traffic(1, 1, 1, 1));
        maps.root().to_path_buf()
    };
    assert!(!path.exists(), "{} left behind", path.display());
    let failed = std::panic::catch_unwind(|| {
        let maps = NetdMaps::new(&tag("netd-fixture"), Release::Legacy, false);
        let path = maps.root().to_path_buf();
        std::panic::panic_any(path);
    });
    let path = *failed
        .unwrap_err()
        .downcast::<std::path::PathBuf>()
        .unwrap();
    assert!(
        !path.exists(),
        "{} left behind after a panic",
        path.display()
    );
}

/// Runs `f` with effective uid `uid` (the saved uid stays 0, so root comes
/// back, also when `f` panics).
fn as_euid<T>(uid: u32, f: impl FnOnce() -> T) -> T {
    struct Back;
    impl Drop for Back {
        fn drop(&mut self) {
            assert_eq!(unsafe { libc::seteuid(0) }, 0, "getting root back");
        }
    }
    assert_eq!(unsafe { libc::seteuid(uid) }, 0, "seteuid({uid})");
    let _back = Back;
    f()
}

#[test]
fn unreadable_maps_say_to_run_as_root() {
    require_root();
    let maps = NetdMaps::new(&tag("netd-fixture"), Release::Android13, true);
    let map = maps.root().join(APP_UID_STATS_MAP);
    // The pin directory is root's alone: not even the maps can be looked at.
    let text = as_euid(65534, || err_text(maps.root()));
    assert!(
        text.contains(map.to_str().unwrap()) && text.contains("run egressmon as root"),
        "{text}"
    );
    // Reachable, but opening a map needs root.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(maps.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = as_euid(65534, || err_text(maps.root()));
    assert!(
        text.contains(map.to_str().unwrap()) && text.contains("run egressmon as root"),
        "{text}"
    );
}

/// The agent reads netd's counters beside its own: per-uid totals in
/// `egressmon_netd_tx_bytes_total`, the source in status, across a swap.
#[test]
fn agent_exports_netd_totals() {
    require_root();
    let tag = tag("netdagent");
    let maps = NetdMaps::new(&tag, Release::Android13, false);
    let cgroup = support::TestCgroup::new(&support::cgroup2_root(), &tag);
    let mut sent = Sent::default();
    count(
        &maps,
        &mut sent,
        key(10123, 0, 0, 3),
        traffic(10, 15_000, 0, 0),
    );
    count(&maps, &mut sent, key(1001, 0, 1, 4), traffic(3, 900, 0, 0));
    let root = maps.root().to_str().unwrap().to_string();
    let agent = support::AgentProc::start(&cgroup.path, &tag, &["--netd-bpf-root", &root]);
    let status = agent.status();
    assert_eq!(status["netd_stats"]["root"], root.as_str(), "{status:#}");
    assert_eq!(
        status["backends"]["netd_uid_tx_bytes"],
        serde_json::json!(["netd_stats"])
    );
    let bytes = |uid: u32| {
        support::metric_sum(
            &agent.get("/metrics"),
            "egressmon_netd_tx_bytes_total",
            &[&format!("uid=\"{uid}\"")],
        )
    };
    assert_eq!(bytes(10123), sent.0[&10123].tx_bytes);
    assert_eq!(bytes(1001), sent.0[&1001].tx_bytes);
    // netd swaps maps and system server drains the old one: still exact.
    let mut maps = maps;
    maps.select(Which::B);
    count(
        &maps,
        &mut sent,
        key(10123, 0, 0, 3),
        traffic(2, 3_000, 0, 0),
    );
    maps.drain(Which::A);
    assert_eq!(bytes(10123), sent.0[&10123].tx_bytes);

    // An explicit root without netd's maps is refused with what to do.
    let empty = PinDir::new(&format!("{tag}-empty"));
    let out = std::process::Command::new(support::BIN)
        .args(["run", "--cgroup"])
        .arg(&cgroup.path)
        .args(["--pin-dir", &format!("/sys/fs/bpf/{tag}-refused")])
        .arg("--netd-bpf-root")
        .arg(&empty.path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no netd stats maps there"), "{err}");
    let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/{tag}-refused"));
}
