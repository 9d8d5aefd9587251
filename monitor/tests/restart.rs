//! Restarts are exact for what the agent derives, not only for the
//! kernel's counters: an agent killed (`kill -9`) or stopped (SIGTERM)
//! while traffic flows, then started again on the same pins, neither counts
//! existing flows' bytes into their countries a second time, nor writes
//! their flow_start or alert lines again, nor fires alerts again; cleartext
//! and alert counters carry on from where they were, netd's totals do not
//! start over (not even when system server drained a map meanwhile), and a
//! flow whose first payload the new agent never saw is classified again.
//!
//! Run as root (`cargo xtask test`, or `cargo test -p monitor --test restart
//! -- --test-threads=1`); they never skip.

mod support;

use egressmon::bpf::netd_stats::{StatsKey, StatsValue};
use egressmon::pipeline::flows::FlowRecord;
use monitor_common::{FlowKey, FlowValue, FAMILY_IPV4, PROTO_UDP};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::netd_maps::{NetdMaps, Release, Which};
use support::*;

const FIRMWARE_HOST: &str = "zzhc.activation.example.cn";
const RADIO: u32 = 1001;
const APP: u32 = 10123;

/// Removes the agent's restart state on drop (declared before the agent,
/// so the agent's last save on detach comes first).
struct StateFiles(PathBuf);

impl Drop for StateFiles {
    fn drop(&mut self) {
        egressmon::serve::state::remove(&egressmon::serve::state::default_dir(), &self.0);
    }
}

/// A Chinese test host (DNS, HTTP on several ports, UDP sinks) and a
/// German one (its IPv6 address), a device layout naming radio (1001,
/// firmware) and com.example.app (10123), and GeoIP data for both.
struct World {
    resolver: String,
    _sink: Proc,
    test: TestDevice,
}

impl World {
    fn new(tag: &str) -> World {
        let test = TestDevice::new(tag);
        std::fs::write(
            test.geoip(),
            "10.200.0.0,10.200.0.255,CN\nfd00:200::,fd00:200::ffff,DE\n",
        )
        .unwrap();
        let resolver = format!("{SERVER4}:53");
        let mut tcp: Vec<std::net::SocketAddr> = [80, 81, 82]
            .iter()
            .map(|port| format!("{SERVER4}:{port}").parse().unwrap())
            .collect();
        tcp.push(format!("[{SERVER6}]:8080").parse().unwrap());
        let udp: Vec<std::net::SocketAddr> = (9000..9050)
            .map(|port| format!("{SERVER4}:{port}").parse().unwrap())
            .collect();
        let sink = start_dns_sink(&test.net, Some(&resolver), &[FIRMWARE_HOST], &tcp, &udp);
        World {
            resolver,
            _sink: sink,
            test,
        }
    }

    fn log(&self) -> PathBuf {
        self.test.dir.join("flows.jsonl")
    }

    fn agent_args(&self, log: bool) -> Vec<String> {
        let path = |p: PathBuf| p.to_str().unwrap().to_string();
        let mut args = vec![
            "--android-root".into(),
            path(self.test.device()),
            "--geoip".into(),
            path(self.test.geoip()),
        ];
        if log {
            args.extend(["--log".into(), path(self.log())]);
        }
        args
    }

    fn gen(&self, uid: u32, args: &[&str]) {
        gen(&self.test.net, &self.test.cgroup.path, uid, args);
    }

    /// radio POSTs activation data in cleartext to the Chinese host.
    fn post(&self, port: u16) {
        self.gen(
            RADIO,
            &[
                "http-post",
                "--host",
                FIRMWARE_HOST,
                "--resolver",
                &self.resolver,
                "--port",
                &port.to_string(),
            ],
        );
    }
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Lines of `event` per flow (and rule, for alerts).
fn count_lines(log: &[Value], event: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in log.iter().filter(|l| l["event"] == event) {
        let id = format!(
            "{} {} {} {} {} {}",
            line["uid"], line["proto"], line["dst"], line["port"], line["direction"], line["rule"]
        );
        *counts.entry(id).or_default() += 1;
    }
    counts
}

fn metrics(agent: &AgentProc) -> String {
    let fetch = || http_get(&agent.listen, "/metrics").unwrap();
    match &agent.netns {
        Some(ns) => support::net::in_netns(Path::new(ns), fetch),
        None => fetch(),
    }
}

/// Bytes by country as the agent counts them (metrics) and as the kernel's
/// flows add up (read from the map when asked).
type ByCountry = BTreeMap<String, u64>;

fn countries(agent: &AgentProc) -> (ByCountry, ByCountry) {
    let text = metrics(agent);
    let mut kernel = ByCountry::new();
    for f in agent.flows() {
        let country = f.country.unwrap_or_else(|| "unknown".into());
        *kernel.entry(country).or_default() += f.tx_bytes;
    }
    let counted = kernel
        .keys()
        .map(|c| {
            let label = format!("country=\"{c}\"");
            let sum = metric_sum(&text, "egressmon_tx_bytes_by_country_total", &[&label]);
            (c.clone(), sum)
        })
        .collect();
    (counted, kernel)
}

fn alerts(text: &str, rule: &str) -> u64 {
    metric_sum(
        text,
        "egressmon_alerts_total",
        &[&format!("rule=\"{rule}\"")],
    )
}

fn cleartext(text: &str) -> u64 {
    metric_sum(text, "egressmon_cleartext_flows_total", &[])
}

fn is_cleartext(f: &FlowRecord) -> bool {
    matches!(f.payload.as_str(), "http" | "cleartext")
}

fn netd_key(uid: u32) -> StatsKey {
    StatsKey {
        uid,
        tag: 0,
        counter_set: 0,
        iface_index: 3,
    }
}

fn tx(bytes: u64) -> StatsValue {
    StatsValue {
        tx_packets: bytes / 1000,
        tx_bytes: bytes,
        ..Default::default()
    }
}

fn netd_bytes(agent: &AgentProc, uid: u32) -> u64 {
    metric_sum(
        &metrics(agent),
        "egressmon_netd_tx_bytes_total",
        &[&format!("uid=\"{uid}\"")],
    )
}

/// Traffic in a thread until stopped: radio's UDP to one destination, the
/// app's TCP over IPv6, and a new UDP destination of the app each round
/// (flows that start around the restart).
fn background(world: &Arc<World>) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (w, s) = (world.clone(), stop.clone());
    let handle = std::thread::spawn(move || {
        let radio = format!("{SERVER4}:9001");
        let app6 = format!("[{SERVER6}]:8080");
        for round in 0..40 {
            if s.load(Ordering::Relaxed) {
                return;
            }
            w.gen(RADIO, &["udp-sendto", "--dst", &radio, "--count", "20"]);
            w.gen(APP, &["tcp", "--dst", &app6, "--count", "1"]);
            let fresh = format!("{SERVER4}:{}", 9010 + round);
            w.gen(APP, &["udp-sendto", "--dst", &fresh, "--count", "2"]);
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    (stop, handle)
}

/// Drops a flow from the pinned flow map, as the kernel's LRU would.
fn evict(pin_dir: &Path, flow: &FlowRecord) {
    use aya::maps::{HashMap, Map, MapData};
    let data = MapData::from_pin(pin_dir.join("FLOWS")).expect("the pinned flow map");
    let mut map: HashMap<MapData, FlowKey, FlowValue> =
        HashMap::try_from(Map::LruHashMap(data)).unwrap();
    let ip: std::net::Ipv4Addr = flow.dst.parse().unwrap();
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&ip.octets());
    let key = FlowKey {
        uid: flow.uid,
        port: flow.port,
        proto: PROTO_UDP,
        family: FAMILY_IPV4,
        addr,
    };
    map.remove(&key).expect("evicting the flow");
}

#[derive(Clone, Copy, Debug)]
enum Stop {
    Kill9,
    Sigterm,
}

/// Where the agent counts: cgroup hooks, or tc programs on the client's
/// interface (where netd holds the skb hooks) by netlink filter or TCX.
#[derive(Clone, Copy, Debug)]
enum Hooks {
    Cgroup,
    TcNetlink,
    Tcx,
}

/// Starts the agent counting the way `hooks` says.
fn start_agent(world: &World, tag: &str, hooks: Hooks, args: &[&str]) -> AgentProc {
    let client = NetPair::path(&world.test.net.client);
    let (netns, env): (Option<&str>, &[(&str, &str)]) = match hooks {
        Hooks::Cgroup => (None, &[]),
        Hooks::TcNetlink => (Some(&client), &[("EGRESSMON_TC_NETLINK", "1")]),
        Hooks::Tcx => (Some(&client), &[]),
    };
    AgentProc::start_in(netns, env, &world.test.cgroup.path, tag, args)
}

fn stop(agent: &mut AgentProc, how: Stop) {
    match how {
        Stop::Kill9 => agent.kill(),
        Stop::Sigterm => {
            let mut proc = agent.proc.take().expect("agent running");
            // SAFETY: kill(2) on our own child.
            assert_eq!(unsafe { libc::kill(proc.0.id() as i32, libc::SIGTERM) }, 0);
            let status = proc.0.wait().unwrap();
            assert!(status.success(), "a clean stop: {status}");
        }
    }
}

fn restart_keeps_everything_exact(how: Stop, hooks: Hooks) {
    require_root();
    let tag = tag(&format!("{how:?}{hooks:?}").to_lowercase());
    let world = Arc::new(World::new(&tag));
    let mut netd = NetdMaps::new(&format!("{tag}-netd"), Release::Android13, false);
    let mut agent_args = world.agent_args(true);
    agent_args.extend([
        "--netd-bpf-root".into(),
        netd.root().to_str().unwrap().into(),
    ]);
    if !matches!(hooks, Hooks::Cgroup) {
        agent_args.extend(["--hooks".into(), "tc_egress,tc_ingress".into()]);
    }
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{tag}"));
    let _state = StateFiles(pin_dir.clone());
    let mut agent = start_agent(&world, &tag, hooks, &args(&agent_args));
    assert_eq!(agent.pin_dir, pin_dir);
    netd.count(netd_key(APP), tx(15_000));

    // Before: radio's cleartext POST to China (two alerts), its UDP, the
    // app's TCP to Germany.
    world.post(80);
    let radio_udp = format!("{SERVER4}:9001");
    world.gen(RADIO, &["udp-sendto", "--dst", &radio_udp, "--count", "10"]);
    let app6 = format!("[{SERVER6}]:8080");
    world.gen(APP, &["tcp", "--dst", &app6, "--count", "2"]);
    // A flow the kernel evicts while no agent runs.
    let doomed = format!("{SERVER4}:9002");
    world.gen(APP, &["udp-sendto", "--dst", &doomed, "--count", "5"]);
    assert!(
        eventually(Duration::from_secs(10), || {
            let text = metrics(&agent);
            alerts(&text, "firmware-cleartext") >= 1
                && alerts(&text, "firmware-new-country") == 1
                && ["CN", "DE"].map(|c| countries(&agent).0.contains_key(c)) == [true; 2]
        }),
        "{}",
        metrics(&agent)
    );
    std::thread::sleep(Duration::from_secs(2));
    let before = metrics(&agent);
    let (by_country_before, _) = countries(&agent);
    let evicted = find(&agent.flows(), APP, "udp", SERVER4, 9002).clone();
    assert_eq!(netd_bytes(&agent, APP), 15_000);

    // Stopped while traffic flows; meanwhile netd swaps its maps and system
    // server drains the old one.
    let (traffic, thread) = background(&world);
    std::thread::sleep(Duration::from_millis(1500));
    stop(&mut agent, how);
    evict(&pin_dir, &evicted);
    netd.select(Which::B);
    netd.count(netd_key(APP), tx(4_000));
    netd.drain(Which::A);
    std::thread::sleep(Duration::from_millis(500));
    agent.spawn(&world.test.cgroup.path, &args(&agent_args));
    std::thread::sleep(Duration::from_millis(1500));
    traffic.store(true, Ordering::Relaxed);
    thread.join().expect("background traffic");
    // After: two new cleartext flows of radio's (one alert each; China is
    // no new country for radio any more).
    world.post(81);
    world.post(82);

    let fc = alerts(&before, "firmware-cleartext");
    assert!(
        eventually(Duration::from_secs(15), || {
            let text = metrics(&agent);
            let (counted, mut kernel) = countries(&agent);
            // The evicted flow's bytes stay counted.
            *kernel.entry("CN".into()).or_default() += evicted.tx_bytes;
            alerts(&text, "firmware-cleartext") == fc + 2 && counted == kernel
        }),
        "bytes by country (counted, kernel): {:?}\n{}",
        countries(&agent),
        metrics(&agent)
    );
    let after = metrics(&agent);
    assert_eq!(alerts(&after, "firmware-new-country"), 1, "{after}");
    for (country, bytes) in &by_country_before {
        assert!(
            countries(&agent).0[country] >= *bytes,
            "{country} went back"
        );
    }
    // Cleartext flows: each once, before and after.
    let flows = agent.flows();
    let cleartext_flows = flows
        .iter()
        .chain([&evicted])
        .filter(|f| is_cleartext(f))
        .count() as u64;
    assert_eq!(cleartext(&after), cleartext_flows, "{after}");
    assert!(cleartext(&after) >= cleartext(&before) + 2, "{after}");
    // netd's totals went on from 15,000 (map A, drained meanwhile).
    assert_eq!(netd_bytes(&agent, APP), 19_000);

    // The log: one flow_start per flow, one alert per flow and rule, as
    // many alert lines per rule as the counter says.
    let log = json_lines(&world.log());
    let starts = count_lines(&log, "flow_start");
    assert_eq!(starts.len(), flows.len() + 1, "{starts:#?}\n{flows:#?}");
    assert!(starts.values().all(|&n| n == 1), "{starts:#?}");
    let ends: Vec<&Value> = log
        .iter()
        .filter(|l| l["event"] == "flow_end" && l["port"] == 9002)
        .collect();
    assert_eq!(ends.len(), 1, "{ends:#?}");
    assert_eq!(ends[0]["reason"], "evicted");
    let alert_lines = count_lines(&log, "alert");
    assert!(alert_lines.values().all(|&n| n == 1), "{alert_lines:#?}");
    for rule in ["firmware-cleartext", "firmware-new-country"] {
        let logged = log
            .iter()
            .filter(|l| l["event"] == "alert" && l["rule"] == rule)
            .count() as u64;
        assert_eq!(alerts(&after, rule), logged, "{rule}");
    }
}

#[test]
fn kill_9_during_traffic_neither_doubles_nor_drops() {
    restart_keeps_everything_exact(Stop::Kill9, Hooks::Cgroup);
}

#[test]
fn sigterm_during_traffic_neither_doubles_nor_drops() {
    restart_keeps_everything_exact(Stop::Sigterm, Hooks::Cgroup);
}

#[test]
fn tc_netlink_kill_9_during_traffic_neither_doubles_nor_drops() {
    restart_keeps_everything_exact(Stop::Kill9, Hooks::TcNetlink);
}

#[test]
fn tcx_kill_9_during_traffic_neither_doubles_nor_drops() {
    restart_keeps_everything_exact(Stop::Kill9, Hooks::Tcx);
}

/// The new agent has nothing of the old one's (its state is gone): the
/// flow's "captured" marks are set in the kernel, yet the flow is
/// classified again from its next payload, and re-arming lost no count.
#[test]
fn a_flow_whose_payload_the_new_agent_never_saw_is_classified_again() {
    require_root();
    let tag = tag("rearm");
    let world = World::new(&tag);
    let agent_args = world.agent_args(false);
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{tag}"));
    let _state = StateFiles(pin_dir.clone());
    let mut agent = AgentProc::start(&world.test.cgroup.path, &tag, &args(&agent_args));
    let post = |flows: &[FlowRecord]| find(flows, RADIO, "tcp", SERVER4, 80).clone();
    world.post(80);
    assert!(eventually(Duration::from_secs(10), || post(&agent.flows())
        .payload
        == "http"));

    // A pass has saved it; then the state is lost with the agent.
    std::thread::sleep(Duration::from_secs(2));
    agent.kill();
    let dir = egressmon::serve::state::default_dir();
    assert!(!egressmon::serve::state::remove(&dir, &pin_dir).is_empty());
    agent.spawn(&world.test.cgroup.path, &args(&agent_args));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(post(&agent.flows()).payload, "unknown", "nothing known");
    // Quiet for three passes: re-armed.
    std::thread::sleep(Duration::from_secs(3));
    world.post(80);
    let mut flows = Vec::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            flows = agent.flows();
            post(&flows).payload == "http"
        }),
        "{flows:#?}"
    );
    assert_eq!(post(&flows).host.as_deref(), Some(FIRMWARE_HOST));
    let radio_bytes: u64 = flows
        .iter()
        .filter(|f| f.uid == RADIO)
        .map(|f| f.tx_bytes)
        .sum();
    let total = metric_sum(
        &metrics(&agent),
        "egressmon_tx_bytes_total",
        &[&format!("uid=\"{RADIO}\"")],
    );
    assert_eq!(radio_bytes, total, "every byte in its flow");
}
