//! The restart state without a kernel: a tracker and its verdicts saved,
//! an agent "killed" between a pass's log lines and its save, and a new
//! tracker taking both back.

use super::*;
use crate::enrich::destinations::FlowInfo;
use crate::enrich::geoip::GeoIp;
use crate::pipeline::flows::{record, FlowRecord};
use crate::pipeline::rules::Rules;
use crate::pipeline::tracker::{Describe, TrackerOptions};
use crate::serve::jsonl::JsonlLog;
use inspect::{HostSource, Payload};
use monitor_common::{FlowKey, FlowValue, FAMILY_IPV4, PROTO_TCP};
use serde_json::Value;
use std::cell::RefCell;
use std::time::Instant;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("egm-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Owners by uid (app for 10123, platform for 1001) and the verdicts.
struct Describer<'a>(RefCell<&'a mut Destinations>);

impl Describe for Describer<'_> {
    fn record(&self, key: &FlowKey, value: &FlowValue, meta: Option<&FlowMeta>) -> FlowRecord {
        let mut r = record(key, value, &self.owner(key.uid), meta);
        self.0
            .borrow_mut()
            .describe(key, &mut r, std::time::Instant::now());
        r
    }
    fn owner(&self, uid: u32) -> Owner {
        let origin = if uid < 10000 { "platform" } else { "app" };
        Owner {
            uid,
            user: 0,
            app_id: uid,
            owner: format!("owner{uid}"),
            packages: vec![],
            origin: crate::pipeline::vocab::Origin::parse(origin).unwrap(),
            firmware: uid < 10000,
        }
    }
    fn stamp(&self, key: &FlowKey) -> u64 {
        self.0.borrow().stamp(key)
    }
}

fn tracker() -> Tracker {
    let rules = Rules::parse(
        "defaults = false\n[[rule]]\nname = \"firmware-http\"\nfirmware = true\npayload = \"http\"\n",
        "test",
    )
    .unwrap();
    Tracker::new(TrackerOptions {
        capacity: 16,
        update_every: Duration::from_secs(60),
        idle_after: Duration::from_secs(300),
        emit: true,
        rules,
    })
}

fn key(uid: u32, last: u8) -> FlowKey {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&[203, 0, 113, last]);
    FlowKey {
        uid,
        port: 80,
        proto: PROTO_TCP,
        family: FAMILY_IPV4,
        addr,
    }
}

fn flow(uid: u32, last: u8, bytes: u64) -> (FlowKey, FlowValue) {
    let value = FlowValue {
        connects: 1,
        tx_packets: bytes / 100,
        tx_bytes: bytes,
        first_seen: 1_000 + u64::from(last),
        last_seen: 2_000,
        ..Default::default()
    };
    (key(uid, last), value)
}

fn http(destinations: &mut Destinations, key: FlowKey) {
    destinations.restore_info(
        key,
        FlowInfo {
            payload: Payload::Http,
            host: Some(("a.example".into(), HostSource::Http)),
            leaks: vec!["imei:plain".into()],
        },
    );
}

/// One pass; its lines go to `log`.
fn pass(
    tracker: &mut Tracker,
    destinations: &mut Destinations,
    snapshot: &[(FlowKey, FlowValue)],
    log: &mut JsonlLog,
) -> Vec<Value> {
    let mut lines = Vec::new();
    let describe = Describer(RefCell::new(destinations));
    tracker.tick(Instant::now(), snapshot, &describe, &mut |line| {
        log.write(&line).unwrap();
        lines.push(serde_json::to_value(line).unwrap());
    });
    lines
}

fn names(lines: &[Value]) -> Vec<&str> {
    lines.iter().map(|l| l["event"].as_str().unwrap()).collect()
}

fn place(dir: &Path) -> Place<'_> {
    Place {
        dir,
        pin_dir: Path::new("/sys/fs/bpf/egm-state-test"),
        identity: Identity {
            boot_id: "boot".into(),
            flows_map_id: 7,
        },
    }
}

fn bytes_total(tracker: &Tracker) -> u64 {
    tracker.bytes_by_country().values().sum()
}

#[test]
fn a_clean_restart_goes_on_where_the_last_pass_left() {
    let tmp = TempDir::new("clean");
    let log_path = tmp.0.join("flows.jsonl");
    let mut log = JsonlLog::open(log_path.to_str().unwrap(), 1 << 20, 2).unwrap();
    let place = place(&tmp.0);
    let mut state = PassState::new(&place, log_path.to_str(), 2);
    let (mut t, mut d) = (tracker(), Destinations::new(GeoIp::empty(), 16));
    let firmware = flow(1001, 1, 1_000);
    let app = flow(10123, 2, 500);
    http(&mut d, firmware.0);
    let first = pass(&mut t, &mut d, &[firmware, app], &mut log);
    assert_eq!(names(&first), ["flow_start", "alert", "flow_start"]);
    state.save(&t, &d);

    // A new agent: counters where they were, then 300 more bytes.
    let (mut t2, mut d2) = (tracker(), Destinations::new(GeoIp::empty(), 16));
    assert!(state.restore(&mut t2, &mut d2).unwrap());
    assert_eq!(bytes_total(&t2), 1_500);
    assert_eq!(t2.alerts, t.alerts);
    assert_eq!(t2.cleartext_flows, t.cleartext_flows);
    assert!(d2.has_info(&firmware.0));
    let mut grown = firmware;
    grown.1.tx_bytes += 300;
    let lines = pass(&mut t2, &mut d2, &[grown, app], &mut log);
    assert!(
        !names(&lines).contains(&"flow_start") && !names(&lines).contains(&"alert"),
        "{lines:#?}"
    );
    assert_eq!(bytes_total(&t2), 1_800);
    assert_eq!(t2.alerts["firmware-http"], 1);
    assert_eq!(t2.cleartext_flows.values().sum::<u64>(), 1);
}

#[test]
fn lines_written_after_the_last_save_are_neither_repeated_nor_lost() {
    let tmp = TempDir::new("killed");
    let log_path = tmp.0.join("flows.jsonl");
    // A tiny log: the unsaved pass's lines rotate into flows.jsonl.1.
    let mut log = JsonlLog::open(log_path.to_str().unwrap(), 1_500, 3).unwrap();
    let place = place(&tmp.0);
    let mut state = PassState::new(&place, log_path.to_str(), 3);
    let (mut t, mut d) = (tracker(), Destinations::new(GeoIp::empty(), 16));
    let old = flow(1001, 1, 1_000);
    pass(&mut t, &mut d, &[old], &mut log);
    state.save(&t, &d);
    // Killed after this pass wrote its lines, before it saved: a new
    // firmware flow (start + alert), the old one's payload (alert).
    let new = flow(1001, 2, 700);
    http(&mut d, old.0);
    http(&mut d, new.0);
    let unsaved = pass(&mut t, &mut d, &[old, new], &mut log);
    assert_eq!(names(&unsaved), ["alert", "flow_start", "alert"]);
    assert!(tmp.0.join("flows.jsonl.1").exists(), "the log rotated");

    let (mut t2, mut d2) = (tracker(), Destinations::new(GeoIp::empty(), 16));
    assert!(state.restore(&mut t2, &mut d2).unwrap());
    // The verdicts of the unsaved pass are lost with it: the new agent gets
    // them again (payload capture re-armed).
    http(&mut d2, old.0);
    http(&mut d2, new.0);
    let lines = pass(&mut t2, &mut d2, &[old, new], &mut log);
    assert!(lines.is_empty(), "{lines:#?}");
    assert_eq!(t2.alerts["firmware-http"], 2, "one per alert line");
    assert_eq!(t2.cleartext_flows.values().sum::<u64>(), 2);
    assert_eq!(bytes_total(&t2), 1_700, "each byte once");
}

#[test]
fn a_flow_made_again_under_its_key_is_a_new_flow() {
    let tmp = TempDir::new("again");
    let log_path = tmp.0.join("flows.jsonl");
    let mut log = JsonlLog::open(log_path.to_str().unwrap(), 1 << 20, 1).unwrap();
    let (mut t, mut d) = (tracker(), Destinations::new(GeoIp::empty(), 16));
    let first = flow(10123, 1, 1_000);
    pass(&mut t, &mut d, &[first], &mut log);
    let mut again = flow(10123, 1, 200);
    again.1.first_seen += 5;
    let lines = pass(&mut t, &mut d, &[again], &mut log);
    assert_eq!(names(&lines), ["flow_end", "flow_start"]);
    assert_eq!(lines[0]["reason"], "evicted");
    assert_eq!(bytes_total(&t), 1_200);
    assert_eq!(t.flows_evicted, 1);
}

#[test]
fn a_state_of_other_pins_or_damaged_is_not_used() {
    let tmp = TempDir::new("other");
    let mut state = PassState::new(&place(&tmp.0), None, 0);
    let (mut t, mut d) = (tracker(), Destinations::new(GeoIp::empty(), 16));
    let mut log = JsonlLog::open(tmp.0.join("l").to_str().unwrap(), 1 << 20, 0).unwrap();
    pass(&mut t, &mut d, &[flow(1001, 1, 100)], &mut log);
    state.save(&t, &d);
    let mut other = place(&tmp.0);
    other.identity.flows_map_id = 8;
    let (mut t2, mut d2) = (tracker(), Destinations::new(GeoIp::empty(), 16));
    let other = PassState::new(&other, None, 0);
    assert!(!other.restore(&mut t2, &mut d2).unwrap());
    assert_eq!(t2.tracked(), 0);
    let path = &paths(&tmp.0, place(&tmp.0).pin_dir)[0];
    let whole = std::fs::read(path).unwrap();
    std::fs::write(path, &whole[..whole.len() - 3]).unwrap();
    assert!(state.restore(&mut t2, &mut d2).is_err(), "truncated");
}

#[test]
fn scrape_state_round_trips_and_is_written_only_on_change() {
    let tmp = TempDir::new("scrape");
    let state = ScrapeState::new(&place(&tmp.0));
    assert_eq!(state.restore().unwrap(), None);
    let scraped = Scraped {
        labelled_uids: [0, 1001, 10123].into(),
        netd: Some(NetdSnapshot {
            root: "/sys/fs/bpf/netd_shared".into(),
            map_ids: vec![3, 4],
            rows: vec![(
                1,
                StatsKey {
                    uid: 10123,
                    tag: 0,
                    counter_set: 1,
                    iface_index: 3,
                },
                StatsValue {
                    tx_packets: 2,
                    tx_bytes: 300,
                    ..Default::default()
                },
            )],
            by_uid: [(
                10123,
                UidTraffic {
                    tx_packets: 9,
                    tx_bytes: 900,
                    ..Default::default()
                },
            )]
            .into(),
        }),
    };
    state.save(scraped);
    let path = paths(&tmp.0, place(&tmp.0).pin_dir)[1].clone();
    let written = std::fs::metadata(&path).unwrap().modified().unwrap();
    let back = state.restore().unwrap().unwrap();
    assert_eq!(back.labelled_uids, [0, 1001, 10123].into());
    assert_eq!(back.netd.as_ref().unwrap().by_uid[&10123].tx_bytes, 900);
    assert_eq!(back.netd.as_ref().unwrap().rows.len(), 1);
    std::thread::sleep(Duration::from_millis(20));
    state.save(back);
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        written,
        "unchanged: not written again"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn file_names_name_their_pin_directory_and_stale_ones_go() {
    let pin = Path::new("/sys/fs/bpf/a b%/c");
    assert_eq!(unescape(&escape(pin)), pin);
    assert_ne!(
        escape(Path::new("/x/y")),
        escape(Path::new("/x%2Fy")),
        "no two pin directories share a name"
    );
    let tmp = TempDir::new("stale");
    let [pass, scrape] = paths(&tmp.0, Path::new("/sys/fs/bpf/egm-gone-nowhere"));
    std::fs::write(&pass, "x").unwrap();
    std::fs::write(&scrape, "x").unwrap();
    std::fs::write(tmp.0.join("api-127.0.0.1-9864.sock"), "").unwrap();
    let mut tmp_name = pass.as_os_str().to_owned();
    tmp_name.push(".tmp");
    std::fs::write(&tmp_name, "x").unwrap();
    let long = PathBuf::from(format!("/sys/fs/bpf/{}", "x".repeat(300)));
    let [long_pass, _] = paths(&tmp.0, &long);
    assert!(long_pass.file_name().unwrap().len() < 100, "{long_pass:?}");
    remove_stale(&tmp.0);
    assert!(!pass.exists() && !scrape.exists());
    assert!(!Path::new(&tmp_name).exists());
    assert!(tmp.0.join("api-127.0.0.1-9864.sock").exists(), "not ours");
}

#[test]
fn log_lines_name_the_flows_they_were_written_for() {
    let owner = Owner {
        uid: 10123,
        user: 0,
        app_id: 10123,
        owner: "app".into(),
        packages: vec![],
        origin: crate::pipeline::vocab::Origin::App,
        firmware: false,
    };
    let v6 = FlowKey {
        uid: 10123,
        port: 443,
        proto: monitor_common::PROTO_UDP,
        family: monitor_common::FAMILY_IPV6,
        addr: "2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    };
    let inbound = FlowKey {
        family: FAMILY_IPV4 | monitor_common::FAMILY_INBOUND,
        ..key(0, 9)
    };
    for key in [key(1001, 1), v6, inbound] {
        let value = FlowValue {
            tx_bytes: 5,
            ..Default::default()
        };
        let mut line = serde_json::to_value(record(&key, &value, &owner, None)).unwrap();
        line["event"] = "flow_start".into();
        match log_tail::parse(&line.to_string()) {
            Some(crate::pipeline::tracker::Logged::Start(parsed, counters)) => {
                assert_eq!((parsed, counters.tx_bytes), (key, 5))
            }
            _ => panic!("{line}"),
        }
        line["family"] = "ipv9".into();
        assert!(log_tail::parse(&line.to_string()).is_none());
    }
}
