//! Kernel tests: the real programs on this machine's kernel, attached to a
//! cgroup made for each test, with traffic from several uids to a server in a
//! network namespace the test creates. Counts are asserted exactly.
//!
//! Run as root (`cargo xtask test`); they never skip.

mod support;

use egressmon::bpf::hooks::Hook;
use egressmon::bpf_sys;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;
use support::netd::{Device, ExclusiveProgram, PROG_TYPE_CGROUP_SKB, PROG_TYPE_CGROUP_SOCK_ADDR};
use support::netd_maps::{NetdMaps, Release, Which};
use support::*;

const UIDS: [u32; 4] = [0, 1000, 10123, 1_010_123];
const IPV4_UDP_HEADERS: u64 = 20 + 8;
const IPV6_UDP_HEADERS: u64 = 40 + 8;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn attached_ids(cgroup: &Path, hook: Hook) -> Vec<u32> {
    let dir = std::fs::File::open(cgroup).unwrap();
    bpf_sys::prog_query(dir.as_fd(), hook.attach_type())
        .unwrap()
        .prog_ids
}

fn program_exists(id: u32) -> bool {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .any(|p| p.id() == id)
}

#[test]
fn counts_every_uid_protocol_and_family_exactly() {
    require_root();
    let tag = tag("count");
    let net = NetPair::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let s4 = format!("{SERVER4}:8080");
    let s6 = format!("[{SERVER6}]:8080");
    let _sink = start_sink(
        &net,
        &[addr(&s4), addr(&s6), addr(&format!("{SERVER4}:8081"))],
        &[
            addr(&format!("{SERVER4}:9000")),
            addr(&format!("{SERVER4}:9001")),
            addr(&format!("[{SERVER6}]:9001")),
            addr(&format!("{SERVER4}:9002")),
        ],
    );
    // Independent count: the frames arriving at the server's veth end.
    let capture = Capture::new(&net);
    let agent = AgentProc::start(&cgroup.path, &tag, &[]);

    let mut tcp4_pid = 0;
    for uid in UIDS {
        tcp4_pid = gen(
            &net,
            &cgroup.path,
            uid,
            &[
                "--hold-ms",
                "1500",
                "tcp",
                "--dst",
                &s4,
                "--count",
                "3",
                "--bytes",
                "1000",
            ],
        );
        gen(
            &net,
            &cgroup.path,
            uid,
            &["tcp", "--dst", &s6, "--count", "2", "--bytes", "500"],
        );
        // An AF_INET6 socket connecting to ::ffff:10.200.0.2, as Java apps do.
        gen(
            &net,
            &cgroup.path,
            uid,
            &[
                "tcp",
                "--dst",
                &format!("[::ffff:{SERVER4}]:8081"),
                "--count",
                "2",
                "--bytes",
                "10",
            ],
        );
        gen(
            &net,
            &cgroup.path,
            uid,
            &[
                "udp-connected",
                "--dst",
                &format!("{SERVER4}:9000"),
                "--count",
                "4",
                "--size",
                "100",
            ],
        );
        gen(
            &net,
            &cgroup.path,
            uid,
            &[
                "udp-sendto",
                "--dst",
                &format!("{SERVER4}:9001"),
                "--count",
                "5",
                "--size",
                "64",
            ],
        );
        gen(
            &net,
            &cgroup.path,
            uid,
            &[
                "udp-sendto",
                "--dst",
                &format!("[{SERVER6}]:9001"),
                "--count",
                "6",
                "--size",
                "64",
            ],
        );
        gen(
            &net,
            &cgroup.path,
            uid,
            &[
                "udp-sendto",
                "--v6-socket",
                "--dst",
                &format!("{SERVER4}:9002"),
                "--count",
                "3",
                "--size",
                "64",
            ],
        );
    }
    // Let the last FIN/ACK exchanges finish before comparing bytes.
    std::thread::sleep(Duration::from_millis(300));

    let flows = agent.flows();
    for uid in UIDS {
        let tcp4 = find(&flows, uid, "tcp", SERVER4, 8080);
        assert_eq!(
            (tcp4.connects, tcp4.udp_sends, tcp4.family.as_str()),
            (3, 0, "ipv4"),
            "uid {uid}"
        );
        assert!(
            tcp4.tx_bytes >= 3 * (1000 + 40),
            "uid {uid}: payload and headers counted"
        );

        let tcp6 = find(&flows, uid, "tcp", SERVER6, 8080);
        assert_eq!(
            (tcp6.connects, tcp6.family.as_str()),
            (2, "ipv6"),
            "uid {uid}"
        );
        assert!(tcp6.tx_bytes >= 2 * (500 + 60));

        let mapped = find(&flows, uid, "tcp", SERVER4, 8081);
        assert_eq!(
            (mapped.connects, mapped.family.as_str()),
            (2, "ipv4"),
            "uid {uid}: mapped reported as IPv4"
        );
        assert!(
            !flows
                .iter()
                .any(|f| f.uid == uid && f.dst.starts_with("::ffff:")),
            "no mapped address leaks"
        );

        let connected = find(&flows, uid, "udp", SERVER4, 9000);
        assert_eq!(
            (
                connected.connects,
                connected.udp_sends,
                connected.tx_packets,
                connected.tx_bytes
            ),
            (1, 4, 4, 4 * (IPV4_UDP_HEADERS + 100)),
            "uid {uid} connected UDP"
        );
        let sendto4 = find(&flows, uid, "udp", SERVER4, 9001);
        assert_eq!(
            (
                sendto4.connects,
                sendto4.udp_sends,
                sendto4.tx_packets,
                sendto4.tx_bytes
            ),
            (0, 5, 5, 5 * (IPV4_UDP_HEADERS + 64)),
            "uid {uid} sendto IPv4"
        );
        let sendto6 = find(&flows, uid, "udp", SERVER6, 9001);
        assert_eq!(
            (
                sendto6.udp_sends,
                sendto6.tx_packets,
                sendto6.tx_bytes,
                sendto6.family.as_str()
            ),
            (6, 6, 6 * (IPV6_UDP_HEADERS + 64), "ipv6"),
            "uid {uid} sendto IPv6"
        );
        let mapped_udp = find(&flows, uid, "udp", SERVER4, 9002);
        assert_eq!(
            (
                mapped_udp.udp_sends,
                mapped_udp.tx_bytes,
                mapped_udp.family.as_str()
            ),
            (3, 3 * (IPV4_UDP_HEADERS + 64), "ipv4"),
            "uid {uid} sendto from an AF_INET6 socket to a mapped address"
        );
        let owner = find(&flows, uid, "udp", SERVER4, 9001);
        assert_eq!((owner.user, owner.app_id), (uid / 100_000, uid % 100_000));
        assert!(owner.first_seen.is_some() && owner.last_seen.is_some());
    }
    // Exactly the flows generated: 7 per uid, nothing else in this cgroup.
    assert_eq!(flows.len(), 7 * UIDS.len(), "{flows:#?}");

    // Per destination, packets and bytes summed over the uids equal what
    // arrived at the server (one frame per skb: veth passes GSO skbs whole).
    for (proto, dst, port) in [
        ("tcp", SERVER4, 8080),
        ("tcp", SERVER6, 8080),
        ("tcp", SERVER4, 8081),
        ("udp", SERVER4, 9000),
        ("udp", SERVER4, 9001),
        ("udp", SERVER6, 9001),
        ("udp", SERVER4, 9002),
    ] {
        let counted = UIDS.iter().fold((0, 0), |(p, b), &uid| {
            let f = find(&flows, uid, proto, dst, port);
            (p + f.tx_packets, b + f.tx_bytes)
        });
        let captured = capture.read(proto, dst, port);
        assert!(captured.0 > 0, "the capture saw {proto} {dst}:{port}");
        assert_eq!(
            counted, captured,
            "{proto} {dst}:{port}: agent (packets, bytes) vs capture"
        );
    }

    // The sender's identity arrives over the ring buffer.
    let last_uid = *UIDS.last().unwrap();
    assert!(
        eventually(Duration::from_secs(3), || {
            let flows = agent.flows();
            let f = find(&flows, last_uid, "tcp", SERVER4, 8080);
            f.pid == Some(tcp4_pid) && f.comm.as_deref() == Some("egressmon-gen")
        }),
        "pid and comm of the connecting process"
    );
    // ... with its executable, command line and cgroup, read while it lived.
    let flows = agent.flows();
    let f = find(&flows, last_uid, "tcp", SERVER4, 8080);
    assert!(
        f.exe
            .as_deref()
            .is_some_and(|e| e.ends_with("egressmon-gen")),
        "{f:?}"
    );
    assert!(
        f.cmdline
            .as_deref()
            .is_some_and(|c| c.contains("egressmon-gen --netns") && c.contains("--dst")),
        "{f:?}"
    );
    let cgroup_name = cgroup.path.file_name().unwrap().to_str().unwrap();
    assert!(
        f.cgroup
            .as_deref()
            .is_some_and(|c| c.ends_with(cgroup_name)),
        "{f:?}"
    );
    let status = agent.status();
    assert_eq!(status["events_lost"], 0);
    assert_eq!(status["flow_update_failures"], 0);
}

#[test]
fn two_threads_lose_no_increment() {
    require_root();
    let tag = tag("threads");
    let net = NetPair::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let dst = format!("{SERVER4}:8090");
    let _sink = start_sink(&net, &[addr(&dst)], &[]);
    let agent = AgentProc::start(&cgroup.path, &tag, &[]);
    gen(
        &net,
        &cgroup.path,
        1000,
        &["tcp", "--dst", &dst, "--count", "20000", "--threads", "2"],
    );
    let flows = agent.flows();
    assert_eq!(find(&flows, 1000, "tcp", SERVER4, 8090).connects, 20_000);
}

/// Whether a program of this name is loaded anywhere on the machine.
fn program_named(name: &str) -> bool {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .any(|p| p.name_as_str() == Some(name))
}

/// Whether no program of this name is left within a second: the kernel
/// frees a tc program only after the RCU grace period that follows the
/// removal of the filter or link holding it.
fn program_goes(name: &str) -> bool {
    eventually(Duration::from_secs(1), || !program_named(name))
}

#[test]
fn netd_held_hooks_are_skipped_never_replaced() {
    require_root();
    let tag = tag("netd");
    let net = NetPair::new(&tag);
    let parent = TestCgroup::new(&cgroup2_root(), &tag);
    let child = TestCgroup::new(&parent.path, "app");
    let _sink = start_sink(
        &net,
        &[
            addr(&format!("[{SERVER6}]:8080")),
            addr(&format!("{SERVER4}:8080")),
        ],
        &[addr(&format!("{SERVER4}:9001"))],
    );
    // netd's way: exclusive BPF_PROG_ATTACH (flags 0) at the parent cgroup.
    let egress = ExclusiveProgram::attach(
        &parent.path,
        PROG_TYPE_CGROUP_SKB,
        Hook::SkbEgress.attach_type(),
        "netd_sim_egress",
    );
    let connect4 = ExclusiveProgram::attach(
        &parent.path,
        PROG_TYPE_CGROUP_SOCK_ADDR,
        Hook::Connect4.attach_type(),
        "netd_sim_conn4",
    );
    let before = (egress.query(), connect4.query());
    assert!(before.0.is_exclusive() && before.1.is_exclusive());
    let capture = Capture::new(&net);

    // In the client's namespace, the tc fallback watches its veth0.
    let client_ns = NetPair::path(&net.client);
    let mut agent = AgentProc::start_in(Some(&client_ns), &[], &child.path, &tag, &[]);
    let status = agent.status();
    let hook = |name: &str| {
        status["hooks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["hook"] == name)
            .unwrap()
            .clone()
    };
    for held in ["skb_egress", "connect4"] {
        let h = hook(held);
        assert_eq!(h["attached"], false, "{held} must be skipped: {h}");
        assert_eq!(h["held_by"]["cgroup"], parent.path.to_str().unwrap(), "{h}");
        assert!(
            h["reason"].as_str().unwrap().contains("never replaces"),
            "{h}"
        );
    }
    assert!(hook("skb_egress")["held_by"]["prog_names"]
        .as_array()
        .unwrap()
        .contains(&"netd_sim_egress".into()));
    for free in [
        "connect6",
        "sendmsg4",
        "sendmsg6",
        "skb_ingress",
        "tc_egress",
    ] {
        assert_eq!(
            hook(free)["attached"],
            true,
            "{free} should attach: {}",
            hook(free)
        );
    }
    assert_eq!(
        hook("tc_egress")["interfaces"],
        serde_json::json!(["veth0"])
    );
    assert_eq!(hook("tc_ingress")["attached"], false, "skb_ingress is free");
    assert_eq!(
        status["backends"]["tx_bytes"],
        serde_json::json!(["tc_egress"])
    );
    assert_eq!(
        status["backends"]["connects"],
        serde_json::json!(["connect6"])
    );
    // The agent reports the skipped hooks and the fallback in metrics too.
    let metrics = agent.get("/metrics");
    for line in [
        "egressmon_hook_attached{hook=\"skb_egress\"} 0",
        "egressmon_hook_attached{hook=\"sendmsg4\"} 1",
        "egressmon_hook_attached{hook=\"tc_egress\"} 1",
        "egressmon_backend{counter=\"tx_bytes\",hook=\"tc_egress\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }

    gen(
        &net,
        &child.path,
        10123,
        &[
            "udp-sendto",
            "--dst",
            &format!("{SERVER4}:9001"),
            "--count",
            "5",
            "--size",
            "64",
        ],
    );
    gen(
        &net,
        &child.path,
        10123,
        &["tcp", "--dst", &format!("[{SERVER6}]:8080"), "--count", "2"],
    );
    gen(
        &net,
        &child.path,
        10123,
        &["tcp", "--dst", &format!("{SERVER4}:8080"), "--count", "1"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let flows = agent.flows();
    let udp = find(&flows, 10123, "udp", SERVER4, 9001);
    assert_eq!(
        (udp.udp_sends, udp.tx_packets, udp.tx_bytes),
        (5, 5, 5 * (IPV4_UDP_HEADERS + 64)),
        "tc egress counts every datagram (sendmsg4 only names the sender)"
    );
    assert_eq!(find(&flows, 10123, "tcp", SERVER6, 8080).connects, 2);
    assert_eq!(
        find(&flows, 10123, "tcp", SERVER4, 8080).connects,
        0,
        "connect4 is netd's: no connect counted"
    );
    // Bytes per destination, from tc egress, equal what reached the server.
    for (proto, dst, port) in [
        ("udp", SERVER4, 9001),
        ("tcp", SERVER6, 8080),
        ("tcp", SERVER4, 8080),
    ] {
        let f = find(&flows, 10123, proto, dst, port);
        assert_eq!(
            (f.tx_packets, f.tx_bytes),
            capture.read(proto, dst, port),
            "{proto} {dst}:{port}: agent vs capture"
        );
    }

    // Still netd's after the agent died, and after detach.
    agent.kill();
    assert_eq!((egress.query(), connect4.query()), before);
    agent.spawn(&child.path, &[]);
    agent.detach();
    assert_eq!((egress.query(), connect4.query()), before);
    assert!(program_goes("tc_egress"), "detach removed the tc program");

    // Aimed at the very cgroup netd holds, the agent skips the same hooks.
    let mut agent = AgentProc::start_in(Some(&client_ns), &[], &parent.path, &tag, &[]);
    let status = agent.status();
    let attached: Vec<String> = status["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["attached"] == true)
        .map(|h| h["hook"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        attached,
        [
            "connect6",
            "sendmsg4",
            "sendmsg6",
            "skb_ingress",
            "tc_egress"
        ]
    );
    agent.detach();
    assert_eq!((egress.query(), connect4.query()), before);
}

const FIRMWARE_HOST: &str = "activation.example.cn";
const APP_HOST: &str = "api.example.org";
const DNS_ONLY_HOST: &str = "push.example.cn";

/// Where netd holds the cgroup skb and connect hooks (Android 15), the tc
/// programs on the interface count connects (first SYNs) and bytes exactly
/// and still name hosts: from a TLS ClientHello's SNI, an HTTP Host header,
/// and DNS answers matched at tc ingress to the uid whose socket asked.
fn tc_fallback_names_hosts(netlink: bool) {
    require_root();
    let tag = tag(if netlink { "tcnl" } else { "tcx" });
    let net = NetPair::new(&tag);
    let parent = TestCgroup::new(&cgroup2_root(), &tag);
    let child = TestCgroup::new(&parent.path, "app");
    let _held: Vec<ExclusiveProgram> = [
        (PROG_TYPE_CGROUP_SKB, Hook::SkbEgress, "netd_sim_egress"),
        (PROG_TYPE_CGROUP_SKB, Hook::SkbIngress, "netd_sim_ingr"),
        (PROG_TYPE_CGROUP_SOCK_ADDR, Hook::Connect4, "netd_sim_conn4"),
        (PROG_TYPE_CGROUP_SOCK_ADDR, Hook::Connect6, "netd_sim_conn6"),
    ]
    .into_iter()
    .map(|(kind, hook, name)| {
        ExclusiveProgram::attach(&parent.path, kind, hook.attach_type(), name)
    })
    .collect();
    let resolver = format!("{SERVER4}:53");
    let tcp: Vec<SocketAddr> = [80, 443, 5228]
        .iter()
        .map(|port| addr(&format!("{SERVER4}:{port}")))
        .collect();
    let _sink = start_dns_sink(
        &net,
        Some(&resolver),
        &[FIRMWARE_HOST, APP_HOST, DNS_ONLY_HOST],
        &tcp,
        &[],
    );
    let capture = Capture::new(&net);
    let env: &[(&str, &str)] = if netlink {
        &[("EGRESSMON_TC_NETLINK", "1")]
    } else {
        &[]
    };
    let client_ns = NetPair::path(&net.client);
    let mut agent = AgentProc::start_in(Some(&client_ns), env, &child.path, &tag, &[]);
    let status = agent.status();
    assert_eq!(
        status["backends"]["host_dns"],
        serde_json::json!(["tc_ingress"]),
        "{status:#}"
    );
    assert_eq!(
        status["backends"]["connects"],
        serde_json::json!(["tc_egress"]),
        "{status:#}"
    );

    // A SYN that goes unanswered is retransmitted: still one connection.
    let stalled = format!("{SERVER4}:7070");
    let _stalled = start_stalled_listener(&net, addr(&stalled));
    gen(
        &net,
        &child.path,
        10123,
        &["stalled-connects", "--dst", &stalled, "--count", "2"],
    );
    gen(
        &net,
        &child.path,
        1001,
        &[
            "http-post",
            "--host",
            FIRMWARE_HOST,
            "--resolver",
            &resolver,
        ],
    );
    gen(
        &net,
        &child.path,
        1001,
        &[
            "connect",
            "--host",
            DNS_ONLY_HOST,
            "--resolver",
            &resolver,
            "--port",
            "5228",
        ],
    );
    gen(
        &net,
        &child.path,
        10123,
        &["tls", "--host", APP_HOST, "--resolver", &resolver],
    );
    let named = |uid: u32, port: u16, host: &str, source: &str| {
        let flows = agent.flows();
        let f = find(&flows, uid, "tcp", SERVER4, port);
        f.host.as_deref() == Some(host) && f.host_source.as_deref() == Some(source)
    };
    assert!(
        eventually(Duration::from_secs(5), || named(
            1001,
            80,
            FIRMWARE_HOST,
            "http"
        )),
        "{:#?}",
        agent.flows()
    );
    assert!(
        eventually(Duration::from_secs(5), || named(
            10123, 443, APP_HOST, "sni"
        )),
        "{:#?}",
        agent.flows()
    );
    assert!(
        eventually(Duration::from_secs(5), || named(
            1001,
            5228,
            DNS_ONLY_HOST,
            "dns"
        )),
        "{:#?}",
        agent.flows()
    );
    let flows = agent.flows();
    assert_eq!(find(&flows, 1001, "tcp", SERVER4, 80).payload, "http");
    assert_eq!(find(&flows, 10123, "tcp", SERVER4, 443).payload, "tls");
    for (uid, proto, port) in [(1001, "tcp", 80), (1001, "tcp", 5228), (10123, "tcp", 443)] {
        let f = find(&flows, uid, proto, SERVER4, port);
        assert_eq!(
            (f.tx_packets, f.tx_bytes),
            capture.read(proto, SERVER4, port),
            "uid {uid} {proto} {port}: agent vs capture"
        );
        assert_eq!(f.connects, 1, "uid {uid} {port}: one first SYN");
    }
    // Two connect() calls; on the wire the second one's SYN went out three
    // times (at 0, 1 and 3 s), and the handshake and FIN of the first.
    let f = find(&flows, 10123, "tcp", SERVER4, 7070);
    let wire = capture.read("tcp", SERVER4, 7070);
    assert_eq!(f.connects, 2, "retransmitted SYNs are not connections");
    assert!(wire.0 >= 5, "SYN retransmitted: {wire:?} on the wire");
    assert_eq!(
        (f.tx_packets, f.tx_bytes),
        wire,
        "stalled: agent vs capture"
    );
    // Each uid's DNS queries counted as its own, together all that was sent.
    let dns: (u64, u64) = [1001, 10123].iter().fold((0, 0), |(p, b), &uid| {
        let f = find(&flows, uid, "udp", SERVER4, 53);
        (p + f.tx_packets, b + f.tx_bytes)
    });
    assert_eq!(dns, capture.read("udp", SERVER4, 53));

    agent.detach();
    for name in ["tc_egress", "tc_ingress"] {
        assert!(program_goes(name), "detach removed {name}");
    }
}

/// A device's layout on cgroups of the test's: netd's programs held on a
/// parent cgroup (none on Linux), apps in a child cgroup, a test host in
/// network namespaces. Fields drop in order: netd's programs first.
struct Layout {
    held: Vec<ExclusiveProgram>,
    before: Vec<bpf_sys::Attached>,
    netd_maps: Option<NetdMaps>,
    child: TestCgroup,
    _parent: TestCgroup,
    net: NetPair,
}

impl Layout {
    fn new(device: Device, tag: &str) -> Layout {
        let net = NetPair::new(tag);
        let parent = TestCgroup::new(&cgroup2_root(), tag);
        let child = TestCgroup::new(&parent.path, "apps");
        let netd_maps =
            (device != Device::Linux).then(|| NetdMaps::new(tag, Release::Android13, false));
        let held = device.hold(
            &parent.path,
            netd_maps.as_ref().map(|m| m.map(Which::A).fd()),
        );
        let before = held.iter().map(|h| h.query()).collect();
        Layout {
            held,
            before,
            netd_maps,
            child,
            _parent: parent,
            net,
        }
    }

    /// An agent on the apps' cgroup in the client namespace, reading
    /// netd's stats maps where there are some.
    fn agent(&self, tag: &str) -> AgentProc {
        let root = self
            .netd_maps
            .as_ref()
            .map(|m| m.root().to_str().unwrap().to_string());
        let extra: Vec<&str> = match &root {
            Some(root) => vec!["--netd-bpf-root", root],
            None => vec![],
        };
        let client_ns = NetPair::path(&self.net.client);
        AgentProc::start_in(Some(&client_ns), &[], &self.child.path, tag, &extra)
    }

    fn assert_netd_untouched(&self) {
        let now: Vec<_> = self.held.iter().map(|h| h.query()).collect();
        assert_eq!(now, self.before, "netd's programs are as they were");
    }
}

/// One simulated device: netd's programs (on Android, its skb egress one
/// counting per uid into a stats map of netd's layout) at a parent cgroup
/// standing for the root; the agent on a child cgroup in the client's
/// namespace; a fixed workload from three uids. The agent must pick the
/// backends the device leaves free, leave netd's programs as they were, and
/// count every connection, datagram and byte per uid and destination, with
/// per-uid totals equal to netd's own counters.
fn device_case(device: Device) {
    require_root();
    let tag = tag(match device {
        Device::Android12To14 => "a14",
        Device::Android15 => "a15",
        Device::Linux => "linux",
    });
    let layout = Layout::new(device, &tag);
    let (net, child) = (&layout.net, &layout.child);
    let uids = [1000u32, 10123, 10124];
    let tcp: Vec<SocketAddr> = (0..3u16)
        .flat_map(|i| {
            [
                addr(&format!("{SERVER4}:{}", 8201 + i)),
                addr(&format!("[{SERVER6}]:{}", 8201 + i)),
            ]
        })
        .collect();
    let udp = format!("{SERVER4}:9201");
    let _sink = start_sink(net, &tcp, &[addr(&udp)]);
    let capture = Capture::new(net);
    let mut agent = layout.agent(&tag);

    let status = agent.status();
    let attached: Vec<&str> = status["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["attached"] == true)
        .map(|h| h["hook"].as_str().unwrap())
        .collect();
    let (want, bytes_from, connects_from): (&[&str], &str, &[&str]) = match device {
        Device::Linux => (
            &["connect4", "connect6", "skb_egress", "skb_ingress"],
            "skb_egress",
            &["connect4", "connect6"],
        ),
        Device::Android12To14 => (
            &[
                "connect4",
                "connect6",
                "sendmsg4",
                "sendmsg6",
                "tc_egress",
                "tc_ingress",
            ],
            "tc_egress",
            &["connect4", "connect6"],
        ),
        Device::Android15 => (&["tc_egress", "tc_ingress"], "tc_egress", &["tc_egress"]),
    };
    assert_eq!(attached, want, "{device:?}: {status:#}");
    if device != Device::Linux {
        // Phones before 6.6 (5.10, 5.15, 6.1) have no TCX: the filters go
        // over netlink and no link is pinned; from 6.6 they are TCX links.
        let links = std::fs::read_dir(&agent.pin_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("link_tc_"))
            .count();
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let tcx = egressmon::bpf::system::parse_kernel_version(&release).unwrap() >= (6, 6);
        assert_eq!(links > 0, tcx, "{device:?} on {release}: TCX links {links}");
    }
    assert_eq!(
        status["backends"]["tx_bytes"],
        serde_json::json!([bytes_from])
    );
    assert_eq!(
        status["backends"]["connects"],
        serde_json::json!(connects_from)
    );

    for (i, &uid) in uids.iter().enumerate() {
        let port = 8201 + i as u16;
        let (v4, v6) = (format!("{SERVER4}:{port}"), format!("[{SERVER6}]:{port}"));
        let runs: [&[&str]; 3] = [
            &["tcp", "--dst", &v4, "--count", "3", "--bytes", "2000"],
            &["tcp", "--dst", &v6, "--count", "2", "--bytes", "700"],
            &["udp-sendto", "--dst", &udp, "--count", "4", "--size", "100"],
        ];
        for args in runs {
            gen(net, &child.path, uid, args);
        }
    }
    std::thread::sleep(Duration::from_millis(300));

    let flows = agent.flows();
    let metrics = agent.get("/metrics");
    let mut udp_total = (0, 0);
    for (i, &uid) in uids.iter().enumerate() {
        let port = 8201 + i as u16;
        let mut uid_bytes = 0;
        for (dst, connects) in [(SERVER4, 3), (SERVER6, 2)] {
            let f = find(&flows, uid, "tcp", dst, port);
            assert_eq!(f.connects, connects, "{device:?} uid {uid} {dst}:{port}");
            assert_eq!(
                (f.tx_packets, f.tx_bytes),
                capture.read("tcp", dst, port),
                "{device:?} uid {uid} {dst}:{port}: agent vs capture"
            );
            uid_bytes += f.tx_bytes;
        }
        let u = find(&flows, uid, "udp", SERVER4, 9201);
        assert_eq!(
            (u.udp_sends, u.tx_packets, u.tx_bytes),
            (4, 4, 4 * (IPV4_UDP_HEADERS + 100)),
            "{device:?} uid {uid} UDP"
        );
        udp_total = (udp_total.0 + u.tx_packets, udp_total.1 + u.tx_bytes);
        uid_bytes += u.tx_bytes;
        let label = format!("uid=\"{uid}\"");
        let ours = metric_sum(&metrics, "egressmon_tx_bytes_total", &[&label]);
        assert_eq!(ours, uid_bytes, "{device:?} uid {uid}: per-uid total");
        if device != Device::Linux {
            let netd = metric_sum(&metrics, "egressmon_netd_tx_bytes_total", &[&label]);
            assert_eq!(netd, ours, "{device:?} uid {uid}: netd's counter vs ours");
        }
    }
    assert_eq!(udp_total, capture.read("udp", SERVER4, 9201));

    agent.detach();
    layout.assert_netd_untouched();
    if device != Device::Linux {
        // The tc filters (netlink before 6.6, TCX links after) went too.
        for name in ["tc_egress", "tc_ingress"] {
            assert!(program_goes(name), "{device:?}: detach removed {name}");
        }
    }
}

#[test]
fn device_android_12_to_14() {
    device_case(Device::Android12To14);
}

#[test]
fn device_android_15() {
    device_case(Device::Android15);
}

#[test]
fn device_linux() {
    device_case(Device::Linux);
}

#[test]
fn tc_fallback_names_hosts_where_netd_holds_skb() {
    tc_fallback_names_hosts(false);
}

#[test]
fn tc_fallback_over_netlink_filters() {
    tc_fallback_names_hosts(true);
}

#[test]
fn detach_leaves_no_program_link_or_pin() {
    require_root();
    let tag = tag("detach");
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let mut agent = AgentProc::start(
        &cgroup.path,
        &tag,
        &[
            "--hooks",
            "connect4,connect6,sendmsg4,sendmsg6,skb_egress,skb_ingress",
        ],
    );
    let cgroup_hooks = || Hook::ALL.into_iter().filter(|h| !h.is_tc());
    let mut ids = Vec::new();
    for hook in cgroup_hooks() {
        let attached = attached_ids(&cgroup.path, hook);
        assert_eq!(attached.len(), 1, "{hook} attached once");
        ids.extend(attached);
    }
    let pin_dir = agent.pin_dir.clone();
    assert!(pin_dir.join("link_skb_egress").exists() && pin_dir.join("FLOWS").exists());
    let out = agent.detach();
    assert!(out.contains("detached 6 link(s)"), "{out}");
    assert!(!pin_dir.exists(), "pin directory removed");
    for hook in cgroup_hooks() {
        assert!(
            attached_ids(&cgroup.path, hook).is_empty(),
            "{hook} detached"
        );
    }
    assert!(
        eventually(Duration::from_secs(5), || ids
            .iter()
            .all(|&id| !program_exists(id))),
        "programs {ids:?} unloaded"
    );
}

#[test]
fn stopped_agent_keeps_counting_and_restart_adopts() {
    require_root();
    let tag = tag("restart");
    let net = NetPair::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let dst = format!("{SERVER4}:9001");
    let _sink = start_sink(&net, &[], &[addr(&dst)]);
    let mut agent = AgentProc::start(&cgroup.path, &tag, &[]);
    gen(
        &net,
        &cgroup.path,
        1000,
        &["udp-sendto", "--dst", &dst, "--count", "10", "--size", "64"],
    );
    let ids_before = attached_ids(&cgroup.path, Hook::SkbEgress);
    agent.kill();
    // Nobody is running: the pinned links keep the programs counting.
    gen(
        &net,
        &cgroup.path,
        1000,
        &["udp-sendto", "--dst", &dst, "--count", "7", "--size", "64"],
    );
    agent.spawn(&cgroup.path, &[]);
    gen(
        &net,
        &cgroup.path,
        1000,
        &["udp-sendto", "--dst", &dst, "--count", "3", "--size", "64"],
    );
    let flow = find(&agent.flows(), 1000, "udp", SERVER4, 9001).clone();
    assert_eq!(
        (flow.udp_sends, flow.tx_bytes),
        (20, 20 * (IPV4_UDP_HEADERS + 64))
    );
    // Adopted, not attached twice.
    let ids_after = attached_ids(&cgroup.path, Hook::SkbEgress);
    assert_eq!(ids_after.len(), 1);
    assert_ne!(
        ids_before, ids_after,
        "program swapped in place behind the same link"
    );
}

#[test]
fn bad_cgroup_and_hook_names_get_clear_errors() {
    require_root();
    let out = std::process::Command::new(BIN)
        .args([
            "run",
            "--cgroup",
            "/nonexistent/cgroup",
            "--pin-dir",
            "/sys/fs/bpf/egm-bad",
            "--listen",
            "127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a cgroup v2 directory") && err.contains("--cgroup"),
        "{err}"
    );
    let out = std::process::Command::new(BIN)
        .args(["run", "--hooks", "connect5"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown hook `connect5`"),
        "{err}"
    );
    assert!(!Path::new("/sys/fs/bpf/egm-bad").exists());
}

/// Every hook's program passes this kernel's verifier and attaches. Prints
/// one `EGRESSMON-HOOK <hook> attached|unsupported` line per hook (the VM
/// test runner reports them per kernel); a hook the kernel refuses fails the
/// test with the agent's reason, verifier log included.
#[test]
fn every_hook_loads_and_attaches() {
    require_root();
    let tag = tag("hooks");
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    // In a namespace of its own, so the tc hooks watch the test's veth.
    let net = NetPair::new(&tag);
    let all: Vec<&str> = Hook::ALL.iter().map(|h| h.name()).collect();
    let agent = AgentProc::start_in(
        Some(&NetPair::path(&net.client)),
        &[],
        &cgroup.path,
        &tag,
        &["--hooks", &all.join(",")],
    );
    let status = agent.status();
    let kernel = egressmon::bpf::system::kernel_release();
    let mut refused = Vec::new();
    for name in &all {
        let hook = status["hooks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["hook"] == *name)
            .unwrap_or_else(|| panic!("{name} missing from status: {status}"));
        if hook["attached"] == true {
            println!("EGRESSMON-HOOK {name} attached");
        } else {
            let reason = hook["reason"].as_str().unwrap_or("no reason given");
            let first = reason.lines().next().unwrap_or_default();
            println!("EGRESSMON-HOOK {name} unsupported: {first}");
            refused.push(format!("{name}: {reason}"));
        }
    }
    assert!(
        refused.is_empty(),
        "kernel {kernel} does not support every hook:\n{}",
        refused.join("\n")
    );
}

#[test]
fn ipv6_extension_headers_are_stepped_over() {
    require_root();
    let tag = tag("ext6");
    let net = NetPair::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let dst = format!("[{SERVER6}]:9003");
    let _sink = start_sink(&net, &[], &[addr(&dst)]);
    let agent = AgentProc::start(&cgroup.path, &tag, &[]);
    // Setting IPv6 destination options needs CAP_NET_RAW: uid 0 sends.
    gen(
        &net,
        &cgroup.path,
        0,
        &[
            "udp-sendto",
            "--dst",
            &dst,
            "--count",
            "5",
            "--size",
            "64",
            "--dest-opts",
        ],
    );
    let mut flows = Vec::new();
    assert!(eventually(Duration::from_secs(5), || {
        flows = agent.flows();
        flows
            .iter()
            .any(|f| f.uid == 0 && f.dst == SERVER6 && f.port == 9003)
    }));
    let flow = find(&flows, 0, "udp", SERVER6, 9003);
    // IPv6 40 + destination options 8 + UDP 8 + payload 64.
    assert_eq!(
        (flow.udp_sends, flow.tx_packets, flow.tx_bytes),
        (5, 5, 5 * (40 + 8 + 8 + 64)),
        "{flow:?}"
    );
    assert!(
        !flows.iter().any(|f| f.dst == SERVER6 && f.port != 9003),
        "no flow under a wrong port: {flows:#?}"
    );
}

/// Sends SIGSTOP or SIGCONT to the agent (our own child).
fn signal_agent(agent: &AgentProc, signal: i32) {
    let pid = agent.proc.as_ref().unwrap().0.id() as i32;
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

#[test]
fn a_payload_lost_to_a_full_ring_is_captured_from_a_later_packet() {
    require_root();
    let tag = tag("payloadlost");
    let net = NetPair::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let dst = format!("{SERVER4}:9010");
    let _sink = start_sink(&net, &[], &[addr(&dst)]);
    let agent = AgentProc::start(&cgroup.path, &tag, &[]);
    // With the agent stopped nothing drains the payload ring: new flows'
    // first payloads fill it (1 MiB holds about 780).
    signal_agent(&agent, libc::SIGSTOP);
    let resume = Resume(&agent);
    let spray = [
        "udp-spray",
        "--base",
        "127.1.0.0",
        "--port",
        "9",
        "--count",
        "3000",
        "--size",
        "200",
    ];
    gen(&net, &cgroup.path, 1000, &spray);
    let send = ["udp-sendto", "--dst", &dst, "--count", "1", "--size", "300"];
    gen(&net, &cgroup.path, 1000, &send);
    drop(resume);
    let lost = || agent.status()["payloads_lost"].as_u64().unwrap();
    assert!(eventually(Duration::from_secs(5), || lost() > 0));
    let lost_before = lost();
    let flow_payload = |agent: &AgentProc| {
        agent
            .flows()
            .into_iter()
            .find(|f| f.dst == SERVER4 && f.port == 9010)
            .map(|f| f.payload.to_string())
    };
    assert!(eventually(Duration::from_secs(5), || flow_payload(&agent).is_some()));
    assert_eq!(
        flow_payload(&agent).as_deref(),
        Some("unknown"),
        "its first payload was lost"
    );
    // The ring has room again: the flow's next datagram is captured.
    gen(&net, &cgroup.path, 1000, &send);
    assert!(
        eventually(Duration::from_secs(5), || flow_payload(&agent).as_deref()
            == Some("cleartext")),
        "classified from a later packet: {:?}",
        flow_payload(&agent)
    );
    assert_eq!(lost(), lost_before, "nothing else lost");
    // The kernel said so itself, through aya-log, on its rare path (the
    // agent drains those records once a pass).
    let said = || {
        agent.status()["kernel_diagnostics"]["recent"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m.as_str().unwrap().contains("payload ring full"))
    };
    assert!(
        eventually(Duration::from_secs(10), said),
        "{}",
        agent.status()["kernel_diagnostics"]
    );
    let metrics = agent.get("/metrics");
    assert!(
        metrics.contains(&format!("egressmon_payloads_lost_total {lost_before}")),
        "lost payloads are a metric"
    );
}

/// Continues a stopped agent, also when the test fails.
struct Resume<'a>(&'a AgentProc);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        signal_agent(self.0, libc::SIGCONT);
    }
}

#[test]
fn dns_answers_name_only_the_uid_that_asked() {
    require_root();
    let tag = tag("dnsforge");
    let net = NetPair::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let resolver = format!("{SERVER4}:53");
    let ports = [7001, 7002].map(|p| addr(&format!("{SERVER4}:{p}")));
    let _sink = start_dns_sink(&net, Some(&resolver), &["shared.example"], &ports, &[]);
    let agent = AgentProc::start(&cgroup.path, &tag, &[]);
    // uid 10123 has a socket that receives but never asked anything.
    let victim = format!("{CLIENT4}:5555");
    let _victim = start_serve_as(&net, &cgroup.path, 10123, &["--udp", &victim]);
    let answers = || agent.status()["dns_responses"].as_u64().unwrap();
    let before = answers();
    gen(
        &net,
        &cgroup.path,
        0,
        &[
            "dns-answer",
            "--dst",
            &victim,
            "--name",
            "forged.example",
            "--addr",
            SERVER4,
        ],
    );
    // uid 10123 asks (id 0x1111) a resolver that is not there; a forged
    // answer reaches its port with the wrong id while it waits.
    let silent = "127.0.0.1:53";
    let asking = std::process::Command::new(GEN)
        .args(["--netns", &NetPair::path(&net.client), "--cgroup"])
        .arg(&cgroup.path)
        .args(["--uid", "10123", "dns-query", "--resolver", silent])
        .args(["--name", "victim.example", "--port", "5556", "--id", "4369"])
        .args(["--wait-ms", "1500"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let forged_to = format!("{CLIENT4}:5556");
    gen(
        &net,
        &cgroup.path,
        0,
        &[
            "dns-answer",
            "--dst",
            &forged_to,
            "--name",
            "forged.example",
            "--addr",
            SERVER4,
            "--id",
            "4370",
        ],
    );
    let asked = asking.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&asked.stdout).contains("bytes from"),
        "the forged answer did reach the socket: {asked:?}"
    );
    gen(
        &net,
        &cgroup.path,
        10123,
        &["tcp", "--dst", &ports[0].to_string()],
    );
    // uid 1001 resolves the address for itself, then connects.
    gen(
        &net,
        &cgroup.path,
        1001,
        &[
            "connect",
            "--host",
            "shared.example",
            "--resolver",
            &resolver,
            "--port",
            "7002",
        ],
    );
    let named = |uid: u32, port: u16| {
        let flows = agent.flows();
        let f = find(&flows, uid, "tcp", SERVER4, port);
        (f.host.clone(), f.host_source.clone())
    };
    let own = (Some("shared.example".into()), Some("dns".into()));
    assert!(
        eventually(Duration::from_secs(5), || named(1001, 7002) == own),
        "{:#?}",
        agent.flows()
    );
    assert_eq!(
        answers(),
        before + 1,
        "only the answer to 1001's query: none unasked, none with another id"
    );
    assert_eq!(
        named(10123, 7001),
        (Some("shared.example".into()), Some("dns_other_uid".into())),
        "the forged answer never names 10123's flow; 1001's answer is marked as another uid's"
    );
}

/// A block rule on both backends (the guests run this on every kernel):
/// cgroup hooks refuse with EPERM (Linux layout); tc egress drops where
/// netd holds the cgroup hooks (Android 15 layout). Other uids pass, the
/// refused attempts are counted per flow, `unblock --all` lifts it.
fn block_case(device: Device) {
    require_root();
    let tag = tag(if device == Device::Linux {
        "kblk"
    } else {
        "kblk15"
    });
    let layout = Layout::new(device, &tag);
    let (net, child) = (&layout.net, &layout.child);
    let udp = format!("{SERVER4}:9401");
    let tcp = format!("{SERVER4}:8401");
    let _sink = start_sink(net, &[addr(&tcp)], &[addr(&udp)]);
    let capture = Capture::new(net);
    let agent = layout.agent(&tag);
    agent.cli(&[
        "block",
        "k",
        "--uid",
        "10123",
        "--dst",
        SERVER4,
        "--enforce",
    ]);
    let sendto = ["udp-sendto", "--dst", &udp, "--count", "3"];
    let connect = ["tcp", "--dst", &tcp, "--count", "1"];
    let blocked = try_gen(net, &child.path, 10123, &sendto);
    if device == Device::Linux {
        assert_refused(&blocked, "sendto at skb egress");
        assert_refused(&try_gen(net, &child.path, 10123, &connect), "connect4");
    } else {
        // tc drops silently: the sends succeed, nothing leaves.
        assert_ok(&blocked, "sendto at tc egress");
    }
    gen(net, &child.path, 10124, &sendto);
    let want = if device == Device::Linux { 1 } else { 3 };
    let mut flows = Vec::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            flows = agent.flows();
            flows
                .iter()
                .any(|f| f.uid == 10123 && f.port == 9401 && f.blocked == want && f.tx_packets == 0)
                && flows
                    .iter()
                    .any(|f| f.uid == 10124 && f.port == 9401 && f.udp_sends == 3 && f.blocked == 0)
        }),
        "{device:?}: {flows:#?}"
    );
    assert_eq!(
        capture.read("udp", SERVER4, 9401).0,
        3,
        "only uid 10124's datagrams left"
    );
    agent.cli(&["unblock", "--all"]);
    gen(net, &child.path, 10123, &sendto);
    assert!(
        eventually(Duration::from_secs(5), || capture
            .read("udp", SERVER4, 9401)
            .0
            == 6),
        "{device:?}: unblocked datagrams leave"
    );
    layout.assert_netd_untouched();
}

#[test]
fn block_rules_refuse_at_cgroup_hooks() {
    block_case(Device::Linux);
}

#[test]
fn block_rules_drop_at_tc_egress_where_netd_holds_the_cgroup() {
    block_case(Device::Android15);
}
