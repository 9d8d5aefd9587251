//! The tc fallback over time, on the real kernel: interfaces coming and
//! going by the hundred (one made again under its old name), and agent
//! restarts in the middle of traffic, over netlink filters and over TCX
//! links. Every packet must be counted exactly once, against a capture on
//! the receiving side; the filter list never fills up; `detach` leaves no
//! filter or link on any interface.
//!
//! Run as root (`cargo xtask test`); they never skip. Host only: interfaces
//! are made with iproute2 and `tc filter show` checks what `detach` left.

mod support;

use aya::maps::{Array, Map, MapData};
use monitor_common::{TcFilter, MAP_TC_FILTERS};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::net::{in_netns, parse_frame};
use support::*;

/// How long a new interface may wait for its filters: one refresh (every
/// 5 agent passes of about a second each) and some slack.
const ONE_REFRESH: Duration = Duration::from_secs(8);
const DATAGRAMS: u64 = 10;
const UDP_PORT: u16 = 9000;
/// Port of the traffic sent after an interface was made again.
const UDP_PORT_AGAIN: u16 = 9001;
const IPV4_UDP_HEADERS: u64 = 20 + 8;

/// How the agent attaches its tc programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attach {
    Netlink,
    Tcx,
}

fn agent_env(attach: Attach) -> &'static [(&'static str, &'static str)] {
    match attach {
        Attach::Netlink => &[("EGRESSMON_TC_NETLINK", "1")],
        Attach::Tcx => &[],
    }
}

const TC_HOOKS: &[&str] = &["--hooks", "tc_egress,tc_ingress"];

/// `ip -n NS -batch -` with `commands`, one a line.
fn ip_batch(ns: &str, commands: &[String]) {
    if commands.is_empty() {
        return;
    }
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running ip");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(commands.join("\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ip -n {ns} -batch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn client_name(i: usize) -> String {
    format!("egt{i}")
}

fn server_addr(i: usize) -> String {
    format!("10.201.{i}.2")
}

/// Makes veth pairs `i` in `ids`: egtI (10.201.I.1/24) in the client
/// namespace, its peer egpI (10.201.I.2/24) in the server's.
fn add_pairs(net: &NetPair, ids: &[usize]) {
    let mut client = Vec::new();
    let mut server = Vec::new();
    for &i in ids {
        client.push(format!(
            "link add egt{i} type veth peer name egp{i} netns {}",
            net.server
        ));
        client.push(format!("addr add 10.201.{i}.1/24 dev egt{i}"));
        client.push(format!("link set egt{i} up"));
        server.push(format!("addr add {}/24 dev egp{i}", server_addr(i)));
        server.push(format!("link set egp{i} up"));
    }
    ip_batch(&net.client, &client);
    ip_batch(&net.server, &server);
}

/// Deletes veth pairs `ids` (deleting one end deletes its peer).
fn delete_pairs(net: &NetPair, ids: &[usize]) {
    let commands: Vec<String> = ids.iter().map(|i| format!("link del egt{i}")).collect();
    ip_batch(&net.client, &commands);
}

/// No IPv6 on interfaces made from now on in `ns`: no router or neighbour
/// solicitations in the way.
fn no_ipv6_on_new_interfaces(ns: &str) {
    in_netns(Path::new(&NetPair::path(ns)), || {
        std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1")
    })
    .unwrap();
}

fn if_index(ns: &str, name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid NUL-terminated name.
    in_netns(Path::new(&NetPair::path(ns)), || unsafe {
        libc::if_nametoindex(c.as_ptr())
    })
}

/// The bpf filters (program name) on one side of interface `dev` of `ns`,
/// listed over rtnetlink as `tc filter show dev DEV egress|ingress` would.
fn bpf_filters(ns: &str, dev: &str, egress: bool) -> Vec<String> {
    let index = if_index(ns, dev);
    assert_ne!(index, 0, "no interface {dev} in {ns}");
    in_netns(Path::new(&NetPair::path(ns)), || {
        let mut socket = Socket::new(NETLINK_ROUTE).unwrap();
        socket.bind_auto().unwrap();
        let mut message = TcMessage::default();
        message.header.index = index as i32;
        message.header.parent = TcHandle {
            major: u16::MAX,
            minor: if egress {
                TcHandle::MIN_EGRESS
            } else {
                TcHandle::MIN_INGRESS
            },
        };
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = 1;
        let mut packet = NetlinkMessage::new(
            header,
            NetlinkPayload::from(RouteNetlinkMessage::GetTrafficFilter(message)),
        );
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        socket.send(&buf, 0).unwrap();
        let mut names = Vec::new();
        loop {
            let (data, _) = socket.recv_from_full().unwrap();
            let mut offset = 0;
            while offset < data.len() {
                let reply =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..]).unwrap();
                offset += (reply.header.length as usize).next_multiple_of(4);
                match reply.payload {
                    NetlinkPayload::Done(_) => return names,
                    NetlinkPayload::Error(e) => panic!("listing filters of {dev}: {e:?}"),
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(f)) => {
                        if u32::from(f.header.handle) == 0 {
                            continue; // the entry of a priority, not a filter
                        }
                        names.push(filter_name(&f.attributes));
                    }
                    _ => {}
                }
            }
        }
    })
}

fn filter_name(attributes: &[TcAttribute]) -> String {
    let mut name = String::from("?");
    for attribute in attributes {
        if let TcAttribute::Options(options) = attribute {
            for option in options {
                if let TcOption::Bpf(TcFilterBpfOption::ProgName(n)) = option {
                    name = n.clone();
                }
            }
        }
    }
    name
}

/// The programs attached by TCX on one side of `dev` in `ns`, by name.
fn tcx_programs(ns: &str, dev: &str, egress: bool) -> Vec<String> {
    use aya::programs::{tc::SchedClassifier, TcAttachType};
    let side = if egress {
        TcAttachType::Egress
    } else {
        TcAttachType::Ingress
    };
    in_netns(Path::new(&NetPair::path(ns)), || {
        let (_, programs) = SchedClassifier::query_tcx(dev, side).unwrap();
        programs
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_string())
            .collect()
    })
}

/// The names of our programs on each side of `dev`, however attached.
fn ours_on(ns: &str, dev: &str) -> (usize, usize) {
    let count = |egress: bool, name: &str| {
        bpf_filters(ns, dev, egress)
            .into_iter()
            .chain(tcx_programs(ns, dev, egress))
            .filter(|n| n == name)
            .count()
    };
    (count(true, "tc_egress"), count(false, "tc_ingress"))
}

/// Waits until `dev` has exactly one of our programs on each side; returns
/// how long that took.
fn wait_attached(ns: &str, devs: &[String], timeout: Duration) -> Duration {
    let start = Instant::now();
    let mut pending: Vec<&String> = devs.iter().collect();
    while !pending.is_empty() {
        pending.retain(|dev| ours_on(ns, dev) != (1, 1));
        if pending.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < timeout,
            "after {:?}: {} not attached: {:?}",
            start.elapsed(),
            pending.len(),
            pending
                .iter()
                .map(|d| (d.as_str(), ours_on(ns, d)))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

/// The used slots of the agent's pinned filter list.
fn used_slots(pin_dir: &Path) -> Vec<TcFilter> {
    let data = MapData::from_pin(pin_dir.join(MAP_TC_FILTERS)).expect("TC_FILTERS pinned");
    let map: Array<MapData, TcFilter> = Array::try_from(Map::Array(data)).unwrap();
    map.iter()
        .filter_map(Result::ok)
        .filter(|f| f.ifindex != 0)
        .collect()
}

/// The TCX link pins under `pin_dir`.
fn tc_link_pins(pin_dir: &Path) -> Vec<String> {
    let mut pins: Vec<String> = std::fs::read_dir(pin_dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("link_tc_"))
        .collect();
    pins.sort();
    pins
}

/// Sends `count` datagrams of `size` bytes to each of `to`, from the client
/// namespace as root.
fn send_udp(net: &NetPair, to: &[(String, u16, usize)], count: u64) {
    in_netns(Path::new(&NetPair::path(&net.client)), || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        for (addr, port, size) in to {
            let payload = vec![0x5a; *size];
            for _ in 0..count {
                socket.send_to(&payload, (addr.as_str(), *port)).unwrap();
            }
        }
    });
}

const ETH_P_ALL: u16 = 0x0003;
const PACKET_OUTGOING: u8 = 4;

/// Packets and IP-level bytes per (protocol, destination, port).
type Tally = HashMap<(u8, IpAddr, u16), (u64, u64)>;

/// A capture on every interface of the server namespace (AF_PACKET, bound
/// to none): what arrived there, per destination.
struct ServerCapture {
    fd: OwnedFd,
    tally: Tally,
}

impl ServerCapture {
    fn new(net: &NetPair) -> ServerCapture {
        let fd = in_netns(Path::new(&NetPair::path(&net.server)), || {
            // SAFETY: socket calls on a descriptor we own.
            unsafe {
                let raw = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    i32::from(ETH_P_ALL.to_be()),
                );
                assert!(raw >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
                let size: libc::c_int = 64 << 20;
                libc::setsockopt(
                    raw,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    &size as *const _ as *const libc::c_void,
                    std::mem::size_of_val(&size) as u32,
                );
                OwnedFd::from_raw_fd(raw)
            }
        });
        ServerCapture {
            fd,
            tally: HashMap::new(),
        }
    }

    /// Reads every queued frame into the tally; asserts none was dropped.
    fn drain(&mut self) {
        let mut buf = [0u8; 128];
        loop {
            // SAFETY: recvfrom into buffers we own; MSG_TRUNC gives the
            // frame's whole length.
            let (n, sll) = unsafe {
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                let mut len = std::mem::size_of_val(&sll) as u32;
                let n = libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_TRUNC,
                    &mut sll as *mut _ as *mut libc::sockaddr,
                    &mut len,
                );
                (n, sll)
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock, "{err}");
                break;
            }
            if sll.sll_pkttype == PACKET_OUTGOING {
                continue;
            }
            let n = n as usize;
            if let Some(key) = parse_frame(&buf[..n.min(buf.len())]) {
                let entry = self.tally.entry(key).or_default();
                entry.0 += 1;
                entry.1 += (n - 14) as u64;
            }
        }
        // SAFETY: getsockopt into a struct we own.
        let drops = unsafe {
            let mut stats: libc::tpacket_stats = std::mem::zeroed();
            let mut len = std::mem::size_of_val(&stats) as u32;
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                &mut stats as *mut _ as *mut libc::c_void,
                &mut len,
            );
            stats.tp_drops
        };
        assert_eq!(drops, 0, "the capture dropped frames: counts incomplete");
    }

    fn udp(&mut self, dst: &str, port: u16) -> (u64, u64) {
        self.drain();
        let key = (libc::IPPROTO_UDP as u8, dst.parse().unwrap(), port);
        self.tally.get(&key).copied().unwrap_or_default()
    }
}

/// The agent's (packets, bytes) of root's UDP flow to `dst`:`port`.
fn agent_udp(agent: &AgentProc, dst: &str, port: u16) -> (u64, u64) {
    agent
        .flows()
        .iter()
        .find(|f| f.uid == 0 && f.proto == "udp" && f.dst == dst && f.port == port)
        .map_or((0, 0), |f| (f.tx_packets, f.tx_bytes))
}

/// Every interface of namespace `ns` but loopback, by name.
fn interfaces_of(ns: &str) -> Vec<String> {
    let out = sh("ip", &["-n", ns, "-o", "link", "show"]);
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap().to_string())
        .filter(|name| name != "lo")
        .collect()
}

/// After `detach`: `tc filter show` lists nothing on either side of any
/// interface of `ns`, and no TCX program is left on one.
fn assert_nothing_left(ns: &str) {
    let interfaces = interfaces_of(ns);
    assert!(!interfaces.is_empty());
    for dev in &interfaces {
        for side in ["egress", "ingress"] {
            let shown = sh("tc", &["-n", ns, "filter", "show", "dev", dev, side]);
            assert_eq!(shown.trim(), "", "tc filter show dev {dev} {side}");
            assert_eq!(
                tcx_programs(ns, dev, side == "egress"),
                Vec::<String>::new(),
                "TCX programs on {dev} {side}"
            );
        }
    }
}

/// Interfaces made and deleted by batches while traffic goes out on each,
/// one deleted and made again under its name between two refreshes.
fn interfaces_come_and_go(attach: Attach, batches: usize, batch_size: usize) {
    require_root();
    let started = Instant::now();
    let tag = tag(match attach {
        Attach::Netlink => "tcchurn",
        Attach::Tcx => "tcxchurn",
    });
    let net = NetPair::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    no_ipv6_on_new_interfaces(&net.client);
    no_ipv6_on_new_interfaces(&net.server);
    let mut capture = ServerCapture::new(&net);
    let client_ns = NetPair::path(&net.client);
    let mut agent = AgentProc::start_in(
        Some(&client_ns),
        agent_env(attach),
        &cgroup.path,
        &tag,
        TC_HOOKS,
    );
    wait_attached(&net.client, &["veth0".to_string()], ONE_REFRESH);

    let mut sent: Vec<(String, u16, usize)> = Vec::new();
    let mut slowest = Duration::ZERO;
    let mut most_slots = 0;
    let mut live: Vec<usize> = Vec::new();
    for batch in 0..batches {
        let ids: Vec<usize> = (batch * batch_size..(batch + 1) * batch_size).collect();
        delete_pairs(&net, &live);
        add_pairs(&net, &ids);
        live = ids.clone();
        let names: Vec<String> = ids.iter().map(|&i| client_name(i)).collect();
        slowest = slowest.max(wait_attached(&net.client, &names, ONE_REFRESH));
        let to: Vec<(String, u16, usize)> = ids
            .iter()
            .map(|&i| (server_addr(i), UDP_PORT, 32 + i))
            .collect();
        send_udp(&net, &to, DATAGRAMS);
        sent.extend(to);
        if batch + 1 == batches {
            // Right after a refresh (the one that attached this batch), well
            // before the next: one deleted and made again under its name,
            // which the agent never sees missing. It has a new index.
            let old_index = if_index(&net.client, &names[0]);
            delete_pairs(&net, &ids[..1]);
            add_pairs(&net, &ids[..1]);
            assert_ne!(if_index(&net.client, &names[0]), old_index);
            slowest = slowest.max(wait_attached(&net.client, &names[..1], ONE_REFRESH));
            let to = vec![(server_addr(ids[0]), UDP_PORT_AGAIN, 100)];
            send_udp(&net, &to, DATAGRAMS);
            sent.extend(to);
        }
        let slots = used_slots(&agent.pin_dir);
        most_slots = most_slots.max(slots.len());
        match attach {
            // Exactly the filters on the interfaces there now, both sides:
            // those of the interfaces deleted before were freed.
            Attach::Netlink => assert_eq!(
                slots.len(),
                2 * (1 + live.len()),
                "filter slots in use after batch {batch}"
            ),
            Attach::Tcx => {
                assert!(slots.is_empty(), "no netlink filter listed on TCX");
                assert_eq!(tc_link_pins(&agent.pin_dir).len(), 2 * (1 + live.len()));
            }
        }
    }

    // Every datagram arrived, and the agent counted each exactly once.
    std::thread::sleep(Duration::from_millis(300));
    let mut mismatches = Vec::new();
    for (dst, port, size) in &sent {
        let expected = (DATAGRAMS, DATAGRAMS * (IPV4_UDP_HEADERS + *size as u64));
        let wire = capture.udp(dst, *port);
        assert_eq!(wire, expected, "{dst}:{port} on the wire");
        let counted = eventually(Duration::from_secs(5), || {
            agent_udp(&agent, dst, *port) == wire
        });
        if !counted {
            mismatches.push((dst.clone(), *port, agent_udp(&agent, dst, *port), wire));
        }
    }
    assert!(mismatches.is_empty(), "agent vs capture: {mismatches:#?}");
    assert!(most_slots < monitor_common::TC_FILTER_SLOTS as usize);

    agent.detach();
    assert_nothing_left(&net.client);
    assert!(!agent.pin_dir.exists(), "detach removed the pins");
    eprintln!(
        "{attach:?}: {} interfaces, {} datagrams; slowest attach {slowest:?}; at most {most_slots} \
         filter slots used; {:?} in all",
        batches * batch_size + 1,
        sent.len() as u64 * DATAGRAMS,
        started.elapsed()
    );
}

#[test]
fn tc_netlink_follows_100_interfaces_exactly() {
    interfaces_come_and_go(Attach::Netlink, 5, 20);
}

#[test]
fn tcx_follows_interfaces_exactly() {
    interfaces_come_and_go(Attach::Tcx, 2, 10);
}

/// A thread in the client namespace sending datagrams to `dst`:`port` until
/// stopped; returns how many it sent.
struct Sender {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sender {
    fn start(net: &NetPair, dst: &str, port: u16, size: usize) -> Sender {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let ns = PathBuf::from(NetPair::path(&net.client));
        let target = format!("{dst}:{port}");
        let thread = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let file = std::fs::File::open(&ns).unwrap();
                // SAFETY: setns for this thread only.
                assert_eq!(
                    unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                    0
                );
                let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
                let payload = vec![0x5a; size];
                while !stop.load(Ordering::Relaxed) {
                    // Bursts with pauses: dense enough that a gap of a
                    // millisecond in counting shows, light enough that the
                    // receiving side never drops.
                    for _ in 0..10 {
                        socket.send_to(&payload, &target).unwrap();
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        Sender {
            stop,
            sent,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The agent killed and started again three times while a sender keeps
/// going: the kernel's count equals what arrived, exactly.
fn restart_during_traffic(attach: Attach) {
    require_root();
    let tag = tag(match attach {
        Attach::Netlink => "tcnlrestart",
        Attach::Tcx => "tcxrestart",
    });
    let net = NetPair::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let capture = Capture::new(&net);
    let client_ns = NetPair::path(&net.client);
    let mut agent = AgentProc::start_in(
        Some(&client_ns),
        agent_env(attach),
        &cgroup.path,
        &tag,
        TC_HOOKS,
    );
    wait_attached(&net.client, &["veth0".to_string()], ONE_REFRESH);
    let size = 64;
    let sender = Sender::start(&net, SERVER4, UDP_PORT, size);
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        agent.kill();
        std::thread::sleep(Duration::from_millis(200));
        agent.spawn(&cgroup.path, TC_HOOKS);
        // Reading drains the capture, which must not overflow.
        capture.read("udp", SERVER4, UDP_PORT);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            ours_on(&net.client, "veth0"),
            (1, 1),
            "one filter or link each side"
        );
        capture.read("udp", SERVER4, UDP_PORT);
    }
    let sent = sender.finish();
    std::thread::sleep(Duration::from_millis(300));
    let wire = capture.read("udp", SERVER4, UDP_PORT);
    assert_eq!(
        wire,
        (sent, sent * (IPV4_UDP_HEADERS + size as u64)),
        "all {sent} datagrams on the wire"
    );
    let counted = eventually(Duration::from_secs(5), || {
        agent_udp(&agent, SERVER4, UDP_PORT) == wire
    });
    assert!(
        counted,
        "{attach:?}: agent {:?} vs capture {wire:?} ({sent} sent)",
        agent_udp(&agent, SERVER4, UDP_PORT)
    );
    match attach {
        Attach::Netlink => assert_eq!(used_slots(&agent.pin_dir).len(), 2),
        Attach::Tcx => assert_eq!(tc_link_pins(&agent.pin_dir).len(), 2),
    }
    agent.detach();
    assert_nothing_left(&net.client);
    eprintln!("{attach:?}: {sent} datagrams across 3 restarts, all counted once");
}

#[test]
fn tc_netlink_restart_during_traffic_counts_exactly() {
    restart_during_traffic(Attach::Netlink);
}

#[test]
fn tcx_restart_during_traffic_counts_exactly() {
    restart_during_traffic(Attach::Tcx);
}
