//! Block rules end to end, on the real kernel: a test host in a network
//! namespace, a platform uid (radio, 1001) and a user app (10123) of the
//! Android fixtures, rules added with `egressmon block` and from a rules
//! file. Refused connects and sends fail with EPERM and are counted per
//! flow, in egressmon_blocked_total and in `block` log lines; dry runs
//! count without refusing; guarded uids need --force; an open connection
//! is cut when a rule arrives; country and host rules; the tc path of the
//! Android 15 layout drops without touching netd's programs; `unblock`
//! and `detach` leave nothing blocking.
//!
//! Run as root (`cargo xtask test`).

mod support;

use egressmon::pipeline::flows::FlowRecord;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};

use std::time::Duration;
use support::netd::Device;
use support::netd_maps::{NetdMaps, Release, Which};
use support::*;

const RADIO: u32 = 1001;
const APP: u32 = 10123;
const HOST: &str = "zzhc.activation.example.cn";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// `egressmon ARGS --listen` of the agent, as root, with its output.
fn egressmon(agent: &AgentProc, args: &[&str]) -> Output {
    agent
        .command()
        .args(args)
        .args(["--listen", &agent.listen])
        .output()
        .expect("run egressmon")
}

fn flow<'a>(flows: &'a [FlowRecord], uid: u32, proto: &str, port: u16) -> Option<&'a FlowRecord> {
    flows
        .iter()
        .find(|f| f.uid == uid && f.proto == proto && f.port == port && f.dst == SERVER4)
}

/// A device layout, a test host and an agent on a cgroup of the test's.
struct World {
    agent: AgentProc,
    _sink: Proc,
    test: TestDevice,
}

impl World {
    fn new(name: &str, extra: &[&str]) -> World {
        let test = TestDevice::new(&tag(name));
        let tcp: Vec<SocketAddr> = [8301, 8302, 5228]
            .iter()
            .map(|p| addr(&format!("{SERVER4}:{p}")))
            .collect();
        let sink = start_dns_sink(
            &test.net,
            Some(&format!("{SERVER4}:53")),
            &[HOST],
            &tcp,
            &[addr(&format!("{SERVER4}:9301"))],
        );
        let device = test.device();
        let geoip = test.geoip();
        let log = test.dir.join("flows.jsonl");
        let mut args = vec![
            "--android-root",
            device.to_str().unwrap(),
            "--geoip",
            geoip.to_str().unwrap(),
            "--log",
            log.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let agent = AgentProc::start(&test.cgroup.path, &test.tag, &args);
        World {
            agent,
            _sink: sink,
            test,
        }
    }

    fn gen(&self, uid: u32, args: &[&str]) -> Output {
        try_gen(&self.test.net, &self.test.cgroup.path, uid, args)
    }

    fn block(&self, args: &[&str]) -> Output {
        let mut all = vec!["block"];
        all.extend_from_slice(args);
        egressmon(&self.agent, &all)
    }

    fn log(&self) -> Vec<Value> {
        json_lines(&self.test.dir.join("flows.jsonl"))
    }
}

fn tcp_to(port: u16) -> Vec<String> {
    ["tcp", "--dst", &format!("{SERVER4}:{port}"), "--count", "1"]
        .map(String::from)
        .to_vec()
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_firmware_uid_is_refused_its_network_and_every_attempt_is_counted() {
    let w = World::new("blk", &[]);
    let tcp = tcp_to(8301);
    // Before any rule, both uids connect.
    assert_ok(&w.gen(RADIO, &args(&tcp)), "radio before the rule");

    let out = w.block(&[
        "radio-cn",
        "--owner",
        "radio",
        "--dst",
        "10.200.0.0/24",
        "--enforce",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("in force (enforce)"));

    for _ in 0..3 {
        assert_refused(&w.gen(RADIO, &args(&tcp)), "radio's connect");
    }
    let udp = format!("{SERVER4}:9301");
    assert_refused(
        &w.gen(RADIO, &["udp-sendto", "--dst", &udp, "--count", "1"]),
        "radio's sendto",
    );
    // Another uid, same destination: unaffected.
    assert_ok(&w.gen(APP, &args(&tcp)), "the app's connect");
    assert_ok(
        &w.gen(APP, &["udp-sendto", "--dst", &udp, "--count", "2"]),
        "the app's sendto",
    );

    let mut flows = Vec::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            flows = w.agent.flows();
            flow(&flows, RADIO, "tcp", 8301).is_some_and(|f| f.blocked == 3)
                && flow(&flows, RADIO, "udp", 9301).is_some_and(|f| f.blocked == 1)
                && flow(&flows, APP, "udp", 9301).is_some_and(|f| f.udp_sends == 2)
        }),
        "{flows:#?}"
    );
    let radio = flow(&flows, RADIO, "tcp", 8301).unwrap();
    // The connect before the rule counted; the refused ones only as blocked.
    assert_eq!(radio.connects, 1, "{radio:#?}");
    assert_eq!(radio.block_rule.as_deref(), Some("radio-cn"));
    let radio_udp = flow(&flows, RADIO, "udp", 9301).unwrap();
    assert_eq!(
        (radio_udp.udp_sends, radio_udp.tx_bytes),
        (0, 0),
        "{radio_udp:#?}"
    );
    let app = flow(&flows, APP, "tcp", 8301).unwrap();
    assert_eq!((app.blocked, app.connects), (0, 1));

    let metrics = http_get(&w.agent.listen, "/metrics").unwrap();
    assert_eq!(
        metric_sum(
            &metrics,
            "egressmon_blocked_total",
            &["rule=\"radio-cn\"", "uid=\"1001\""]
        ),
        4,
        "{metrics}"
    );
    assert!(metrics.contains("owner=\"radio\""), "{metrics}");
    assert_eq!(
        metric_sum(&metrics, "egressmon_blocked_total", &["uid=\"10123\""]),
        0
    );
    let status = w.agent.status();
    let blocks = status["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 1, "{status:#}");
    assert_eq!(blocks[0]["name"], "radio-cn");
    assert_eq!(blocks[0]["mode"], "enforce");
    // radio of every Android user on the device (user 10's is 1001001).
    assert!(
        blocks[0]["uids"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(RADIO)),
        "{status:#}"
    );
    let text = String::from_utf8_lossy(&egressmon(&w.agent, &["status"]).stdout).into_owned();
    assert!(
        text.contains("radio-cn (enforce, from the command)") && text.contains("fail-closed"),
        "{text}"
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            w.log()
                .iter()
                .any(|l| l["event"] == "block" && l["uid"] == RADIO && l["rule"] == "radio-cn")
        }),
        "{:#?}",
        w.log()
    );
    let first = w.log().into_iter().find(|l| l["event"] == "block").unwrap();
    assert_eq!(first["mode"], "enforce");
    assert_eq!(first["dst"], SERVER4);

    // Unblocked: radio connects again.
    let out = egressmon(&w.agent, &["unblock", "radio-cn"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ok(&w.gen(RADIO, &args(&tcp)), "radio after unblock");

    // Blocked again, then detached: nothing blocks any more.
    let mut agent_gone = w;
    let out = agent_gone.block(&["again", "--uid", "1001", "--enforce"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_refused(&agent_gone.gen(RADIO, &args(&tcp)), "radio blocked again");
    agent_gone.agent.detach();
    assert_ok(&agent_gone.gen(RADIO, &args(&tcp)), "radio after detach");
    assert!(!agent_gone.agent.pin_dir.join("BLOCKS").exists());
}

#[test]
fn a_dry_run_counts_without_refusing_and_guard_rails_need_force() {
    let w = World::new("dry", &[]);
    let out = w.block(&["try-radio", "--uid", "1001", "--dst", "10.200.0.2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("dry-run"));
    let many = [
        "tcp",
        "--dst",
        &format!("{SERVER4}:8302"),
        "--count",
        "3",
        "--bytes",
        "500",
    ];
    assert_ok(&w.gen(RADIO, &many), "radio under a dry run");
    let udp = format!("{SERVER4}:9301");
    assert_ok(
        &w.gen(RADIO, &["udp-sendto", "--dst", &udp, "--count", "4"]),
        "radio's datagrams",
    );
    let mut flows = Vec::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            flows = w.agent.flows();
            flow(&flows, RADIO, "tcp", 8302).is_some_and(|f| f.connects == 3 && f.blocked == 3)
                && flow(&flows, RADIO, "udp", 9301)
                    .is_some_and(|f| f.udp_sends == 4 && f.blocked == 4)
        }),
        "{flows:#?}"
    );
    let tcp = flow(&flows, RADIO, "tcp", 8302).unwrap();
    assert_eq!(
        tcp.block_mode,
        Some(egressmon::pipeline::rules::BlockMode::DryRun)
    );
    assert!(
        tcp.tx_bytes > 1500,
        "a dry run lets the bytes through: {tcp:#?}"
    );

    // Guard rails: system (1000) and every uid need --force.
    let out = w.block(&["cut-system", "--uid", "1000", "--enforce"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("1000 (system)") && err.contains("force"),
        "{err}"
    );
    let out = w.block(&["cut-all", "--dst", "10.200.0.0/24", "--enforce"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("every uid"), "{err}");
    let out = w.block(&["cut-system", "--uid", "1000", "--enforce", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_refused(&w.gen(1000, &args(&tcp_to(8301))), "system with --force");
    let out = egressmon(&w.agent, &["unblock", "--all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ok(
        &w.gen(1000, &args(&tcp_to(8301))),
        "system after unblock --all",
    );
    assert_eq!(w.agent.status()["blocks"], serde_json::json!([]));

    // A rules file that would refuse every uid is refused before anything
    // is attached.
    let guarded = w.test.dir.join("guarded.toml");
    std::fs::write(
        &guarded,
        "[[rule]]\nname = \"all-cn\"\naction = \"block\"\nmode = \"enforce\"\ndst = \"10.200.0.0/24\"\n",
    )
    .unwrap();
    let other = TestCgroup::new(&w.test.cgroup.path, "guarded");
    let pin_dir = PathBuf::from(format!("{}-guarded", w.agent.pin_dir.display()));
    let err = support::pins::run_refused(
        &other.path,
        &pin_dir,
        &["--rules", guarded.to_str().unwrap()],
    );
    assert!(
        err.contains("all-cn") && err.contains("every uid") && err.contains("force = true"),
        "{err}"
    );
    assert!(!pin_dir.exists(), "nothing was pinned");
}

#[test]
fn an_open_connection_is_cut_when_a_rule_arrives() {
    let w = World::new("cut", &[]);
    let dst = format!("{SERVER4}:8301");
    let mut stream = Command::new(GEN)
        .args(["--netns", &NetPair::path(&w.test.net.client), "--cgroup"])
        .arg(&w.test.cgroup.path)
        .args([
            "--uid",
            "1001",
            "tcp-stream",
            "--dst",
            &dst,
            "--duration-ms",
            "6000",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut flows = Vec::new();
    assert!(
        eventually(Duration::from_secs(5), || {
            flows = w.agent.flows();
            flow(&flows, RADIO, "tcp", 8301).is_some_and(|f| f.tx_bytes > 1000)
        }),
        "{flows:#?}"
    );
    let out = w.block(&[
        "cut-radio",
        "--uid",
        "1001",
        "--dst",
        SERVER4,
        "--port",
        "8301",
        "--enforce",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The flow's next packets are dropped: blocked grows, bytes sent stop.
    let mut before = None;
    assert!(
        eventually(Duration::from_secs(5), || {
            flows = w.agent.flows();
            let f = flow(&flows, RADIO, "tcp", 8301).unwrap();
            if f.blocked == 0 {
                return false;
            }
            before.get_or_insert((f.tx_packets, f.blocked));
            true
        }),
        "{flows:#?}"
    );
    std::thread::sleep(Duration::from_millis(2500));
    let after = w.agent.flows();
    let f = flow(&after, RADIO, "tcp", 8301).unwrap();
    let (packets, blocked) = before.unwrap();
    assert_eq!(f.tx_packets, packets, "nothing sent once blocked: {f:#?}");
    assert!(
        f.blocked > blocked,
        "the retransmissions are refused too: {f:#?}"
    );
    assert_eq!(f.block_rule.as_deref(), Some("cut-radio"));
    let _ = stream.kill();
    let _ = stream.wait();
}

#[test]
fn country_and_host_rules_from_the_rules_file_block_what_they_name() {
    let rules_dir = std::env::temp_dir().join(tag("blk-rules"));
    let _rules_scratch = Scratch(rules_dir.clone());
    std::fs::create_dir_all(&rules_dir).unwrap();
    let rules = rules_dir.join("rules.toml");
    std::fs::write(
        &rules,
        r#"
[[rule]]
name = "radio-to-cn"
action = "block"
mode = "enforce"
owner = "radio"
country = "CN"
port = 8301
"#,
    )
    .unwrap();
    let w = World::new("geo", &["--rules", rules.to_str().unwrap()]);
    assert_refused(&w.gen(RADIO, &args(&tcp_to(8301))), "radio to China");
    assert_ok(&w.gen(RADIO, &args(&tcp_to(8302))), "another port");
    assert_ok(&w.gen(APP, &args(&tcp_to(8301))), "the app to China");
    assert_eq!(w.agent.status()["blocks"][0]["source"], "file");

    // The file changes: a host rule replaces the country rule.
    std::fs::write(
        &rules,
        r#"
[[rule]]
name = "activation-host"
action = "block"
mode = "enforce"
uid = 1001
host = "*.activation.example.cn"
port = 5228
"#,
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            w.agent.status()["blocks"][0]["name"] == "activation-host"
        }),
        "{:#}",
        w.agent.status()
    );
    assert_ok(
        &w.gen(RADIO, &args(&tcp_to(8301))),
        "the country rule is gone",
    );
    let resolver = format!("{SERVER4}:53");
    let connect = [
        "connect",
        "--host",
        HOST,
        "--resolver",
        &resolver,
        "--port",
        "5228",
    ];
    // The first answer teaches the rule the address (a connection racing
    // the answer may get through: documented); then it is refused.
    let _ = w.gen(RADIO, &connect);
    assert!(
        eventually(Duration::from_secs(10), || w.agent.status()["blocks"][0]
            ["learnt"]
            == 1),
        "{:#}",
        w.agent.status()
    );
    assert_refused(&w.gen(RADIO, &connect), "radio to the activation host");
    // The app resolving the same name is not blocked.
    assert_ok(&w.gen(APP, &connect), "the app to the same host");
}

#[test]
fn on_the_android_15_layout_tc_egress_drops_and_netd_is_untouched() {
    require_root();
    let tag = tag("blk15");
    let net = NetPair::new(&tag);
    let parent = TestCgroup::new(&cgroup2_root(), &tag);
    let child = TestCgroup::new(&parent.path, "apps");
    let netd_maps = NetdMaps::new(&tag, Release::Android13, false);
    let held = Device::Android15.hold(&parent.path, Some(netd_maps.map(Which::A).fd()));
    let before: Vec<_> = held.iter().map(|h| h.query()).collect();
    let udp = format!("{SERVER4}:9301");
    let _sink = start_sink(&net, &[], &[addr(&udp)]);
    let capture = Capture::new(&net);
    let root = netd_maps.root().to_str().unwrap().to_string();
    let client_ns = NetPair::path(&net.client);
    let mut agent = AgentProc::start_in(
        Some(&client_ns),
        &[],
        &child.path,
        &tag,
        &["--netd-bpf-root", &root],
    );
    let out = egressmon(
        &agent,
        &[
            "block",
            "app-udp",
            "--uid",
            "10123",
            "--dst",
            SERVER4,
            "--enforce",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // tc drops silently: the sends succeed, nothing reaches the wire.
    gen(
        &net,
        &child.path,
        APP,
        &["udp-sendto", "--dst", &udp, "--count", "5"],
    );
    gen(
        &net,
        &child.path,
        10124,
        &["udp-sendto", "--dst", &udp, "--count", "3"],
    );
    let mut flows = Vec::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            flows = agent.flows();
            flow(&flows, APP, "udp", 9301).is_some_and(|f| f.blocked == 5)
                && flow(&flows, 10124, "udp", 9301).is_some_and(|f| f.udp_sends == 3)
        }),
        "{flows:#?}"
    );
    assert_eq!(
        capture.read("udp", SERVER4, 9301).0,
        3,
        "only the other uid's datagrams left"
    );
    let after: Vec<_> = held.iter().map(|h| h.query()).collect();
    assert_eq!(before, after, "netd's programs are as they were");

    // Detached: nothing blocks.
    agent.detach();
    gen(
        &net,
        &child.path,
        APP,
        &["udp-sendto", "--dst", &udp, "--count", "2"],
    );
    assert!(
        eventually(Duration::from_secs(5), || capture
            .read("udp", SERVER4, 9301)
            .0
            == 5),
        "after detach the app's datagrams leave"
    );
    let after_detach: Vec<_> = held.iter().map(|h| h.query()).collect();
    assert_eq!(before, after_detach, "netd's programs outlive egressmon");
}
