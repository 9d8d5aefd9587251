//! `egressmon capture`: pcapng evidence of selected flows, filtered in the
//! kernel, beside a running agent. The files are read back with tshark and
//! tcpdump (Debian's; `cargo xtask setup` installs them), the way a person
//! would open them in Wireshark. Uid 1001 is `radio` in the Android fixture
//! layout the agent reads (`--android-root`).
//!
//! Run as root (`cargo xtask test`).

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};
use support::*;

/// A test device and an agent reading its Android layout; all removed on
/// drop.
struct Setup {
    // Dropped in this order: the agent before its cgroup and network.
    agent: AgentProc,
    test: TestDevice,
}

impl Setup {
    fn new(name: &str) -> Setup {
        Setup::with(name, false, &[])
    }

    /// With `in_client_ns` the agent runs in the client namespace (where
    /// its tc programs attach to the veth), with `extra` arguments.
    fn with(name: &str, in_client_ns: bool, extra: &[&str]) -> Setup {
        let test = TestDevice::new(&tag(name));
        let client_ns = NetPair::path(&test.net.client);
        let device = test.device();
        let mut args = vec!["--android-root", device.to_str().unwrap()];
        args.extend(extra);
        let agent = AgentProc::start_in(
            in_client_ns.then_some(client_ns.as_str()),
            &[],
            &test.cgroup.path,
            &test.tag,
            &args,
        );
        Setup { agent, test }
    }

    /// Starts `egressmon capture ARGS` aimed at the agent and waits for
    /// its "capturing" line (the kernel filter is armed by then).
    fn capture(&self, args: &[&str]) -> CaptureProc {
        let mut cmd = self.agent.command();
        cmd.arg("capture")
            .args(args)
            .arg("--pin-dir")
            .arg(&self.agent.pin_dir)
            .args(["--listen", &self.agent.listen])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn egressmon capture");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut capture = CaptureProc {
            proc: Some(Proc(child)),
            lines,
            seen: Vec::new(),
        };
        let started = Instant::now();
        capture.wait_for_line("capturing", Duration::from_secs(10));
        // The contract: the line comes within a second of the start.
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the capturing line came after {:?}: {:?}",
            started.elapsed(),
            capture.seen
        );
        capture
    }

    fn file(&self, name: &str) -> PathBuf {
        self.test.dir.join(name)
    }
}

/// A running `egressmon capture` (killed on drop if still running) and
/// its stderr, line by line.
struct CaptureProc {
    proc: Option<Proc>,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl CaptureProc {
    fn wait_for_line(&mut self, starting: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.seen.iter().find(|l| l.starts_with(starting)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no {starting:?} line from capture: {:?}", self.seen)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("capture ended without a {starting:?} line: {:?}", self.seen)
                }
            }
        }
    }

    /// Waits for the capture to exit; its exit status and every stderr line.
    fn wait(&mut self, timeout: Duration) -> (std::process::ExitStatus, Vec<String>) {
        let child = &mut self.proc.as_mut().unwrap().0;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "capture still running after {timeout:?}: {:?}",
                self.seen
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        self.seen.extend(self.lines.iter());
        (status, self.seen.clone())
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.proc.as_ref().unwrap().0.id() as libc::pid_t;
        // SAFETY: a signal to our own child, by its pid.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} (Debian's {program} package): {e}"))
}

/// `tshark -r FILE -T fields -e FIELD...`: one row of fields per packet;
/// tshark must read the file without complaint.
fn tshark_fields(file: &Path, fields: &[&str]) -> Vec<Vec<String>> {
    let mut args = vec!["-r", file.to_str().unwrap(), "-T", "fields"];
    for field in fields {
        args.extend(["-e", field]);
    }
    args.extend(["-E", "separator=|"]);
    let out = run("tshark", &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tshark -r failed: {stderr}");
    // tshark warns about running as root; anything else is a complaint.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("Running as user"))
        .collect();
    assert!(complaints.is_empty(), "tshark: {complaints:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('|').map(str::to_string).collect())
        .collect()
}

/// Reads the packets `tcpdump -r` lists (it must read the file too).
fn tcpdump_lines(file: &Path) -> Vec<String> {
    let out = run("tcpdump", &["-n", "-r", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "tcpdump -r failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The capture's "N packets captured, M lost" line.
fn totals(lines: &[String]) -> (u64, u64) {
    let line = lines
        .iter()
        .find(|l| l.contains(" packets captured, "))
        .unwrap_or_else(|| panic!("no totals line: {lines:?}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

/// The kernel copies nothing once the capture is over: the filter is
/// inactive and no uid is selected.
fn assert_disarmed(pin_dir: &Path) {
    let filter =
        egressmon::bpf_sys::RawMap::open_pinned_read_only(&pin_dir.join("CAPTURE_FILTER")).unwrap();
    let mut value = vec![0u8; filter.info().value_size as usize];
    assert!(filter.lookup(&0u32.to_ne_bytes(), &mut value).unwrap());
    assert_eq!(&value[..4], &[0; 4], "CAPTURE_FILTER still active");
    let uids =
        egressmon::bpf_sys::RawMap::open_pinned_read_only(&pin_dir.join("CAPTURE_UIDS")).unwrap();
    let mut next = [0u8; 4];
    assert!(
        !uids.next_key(None, &mut next).unwrap(),
        "CAPTURE_UIDS not cleared"
    );
}

#[test]
fn one_uids_datagrams_are_captured_and_named_while_another_uid_sends_too() {
    let setup = Setup::new("capture");
    let sink = format!("{SERVER4}:9999");
    let elsewhere = format!("{SERVER4}:9998");
    let _sink = start_sink(
        &setup.test.net,
        &[],
        &[sink.parse().unwrap(), elsewhere.parse().unwrap()],
    );
    let file = setup.file("radio.pcapng");
    let mut capture = setup.capture(&[
        "-w",
        file.to_str().unwrap(),
        "--uid",
        "1001",
        "--dst",
        &sink,
        "--count",
        "7",
    ]);
    let send = |uid: u32, dst: &str, count: &str| {
        gen(
            &setup.test.net,
            &setup.test.cgroup.path,
            uid,
            &[
                "udp-sendto",
                "--dst",
                dst,
                "--count",
                count,
                "--size",
                "100",
            ],
        )
    };
    send(10123, &sink, "5");
    // Another destination of the same uid: left out by --dst.
    send(1001, &elsewhere, "3");
    send(1001, &sink, "7");
    send(10123, &sink, "5");
    let (status, lines) = capture.wait(Duration::from_secs(20));
    assert!(status.success(), "capture: {status} {lines:?}");
    assert_eq!(totals(&lines), (7, 0), "{lines:?}");

    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(&file).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.uid()), (0o600, 0));

    let rows = tshark_fields(
        &file,
        &[
            "frame.comment",
            "ip.dst",
            "udp.dstport",
            "frame.len",
            "frame.packet_flags_direction",
        ],
    );
    assert_eq!(rows.len(), 7, "exactly uid 1001's 7 datagrams: {rows:#?}");
    for row in &rows {
        let comment = &row[0];
        assert!(
            comment.starts_with("uid=1001 owner=radio origin=platform firmware=true"),
            "{row:?}"
        );
        assert_eq!(
            (row[1].as_str(), row[2].as_str(), row[3].as_str()),
            (SERVER4, "9999", "128"),
            "raw IP from the IP header on (20 + 8 + 100 bytes): {row:?}"
        );
        assert_eq!(row[4], "0x00000002", "outbound: {row:?}");
    }
    assert_eq!(tcpdump_lines(&file).len(), 7);
    assert_disarmed(&setup.agent.pin_dir);
    let lock = setup.agent.run_dir().join(format!(
        "capture-{}.lock",
        setup.agent.listen.replace(':', "-")
    ));
    assert!(!lock.exists(), "{} left behind", lock.display());
}

#[test]
fn a_capture_stopped_by_sigint_is_a_valid_file_with_both_directions() {
    let setup = Setup::new("capint");
    let service = format!("{SERVER4}:8080");
    let _sink = start_sink(&setup.test.net, &[service.parse().unwrap()], &[]);
    let file = setup.file("both.pcapng");
    let mut capture = setup.capture(&["-w", file.to_str().unwrap(), "--uid", "1001"]);
    // A second capture beside the agent is refused while this one runs.
    let second = setup
        .agent
        .command()
        .arg("capture")
        .args(["-w", setup.file("second.pcapng").to_str().unwrap()])
        .arg("--pin-dir")
        .arg(&setup.agent.pin_dir)
        .args(["--listen", &setup.agent.listen])
        .output()
        .unwrap();
    let refusal = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success() && refusal.contains("one capture at a time"),
        "{refusal}"
    );
    assert!(!setup.file("second.pcapng").exists());

    gen(
        &setup.test.net,
        &setup.test.cgroup.path,
        1001,
        &["tcp", "--dst", &service, "--bytes", "300"],
    );
    gen(
        &setup.test.net,
        &setup.test.cgroup.path,
        10123,
        &["tcp", "--dst", &service, "--bytes", "300"],
    );
    // Read and named within a couple of polls.
    std::thread::sleep(Duration::from_millis(1500));
    capture.signal(libc::SIGINT);
    let (status, lines) = capture.wait(Duration::from_secs(20));
    assert!(status.success(), "capture: {status} {lines:?}");
    let (captured, lost) = totals(&lines);
    assert_eq!(lost, 0);

    let rows = tshark_fields(
        &file,
        &[
            "frame.comment",
            "frame.packet_flags_direction",
            "ip.src",
            "tcp.srcport",
            "tcp.dstport",
        ],
    );
    assert_eq!(rows.len() as u64, captured, "{rows:#?}");
    let outbound: Vec<_> = rows.iter().filter(|r| r[1] == "0x00000002").collect();
    let inbound: Vec<_> = rows.iter().filter(|r| r[1] == "0x00000001").collect();
    assert!(
        outbound.len() >= 4 && inbound.len() >= 3,
        "SYN, ACKs, data and FIN both ways: {rows:#?}"
    );
    for row in &rows {
        assert!(row[0].starts_with("uid=1001 owner=radio "), "{row:?}");
    }
    for row in &outbound {
        assert_eq!(
            (row[2].as_str(), row[4].as_str()),
            (CLIENT4, "8080"),
            "{row:?}"
        );
    }
    for row in &inbound {
        assert_eq!(
            (row[2].as_str(), row[3].as_str()),
            (SERVER4, "8080"),
            "{row:?}"
        );
    }
    assert_eq!(tcpdump_lines(&file).len() as u64, captured);
    assert_disarmed(&setup.agent.pin_dir);
}

#[test]
fn capture_without_an_agent_says_so_and_leaves_no_file() {
    require_root();
    let tag = tag("capnone");
    let dir = std::env::temp_dir().join(&tag);
    let _scratch = Scratch(dir.clone());
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("none.pcapng");
    let pin_dir = format!("/sys/fs/bpf/{tag}");
    let out = Command::new(BIN)
        .args(["capture", "-w", file.to_str().unwrap(), "--uid", "1001"])
        .args(["--pin-dir", &pin_dir])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "no egressmon agent is running with pin directory {pin_dir}: start `egressmon run` \
             first"
        )),
        "{stderr}"
    );
    assert!(!file.exists(), "no file left behind");
    assert!(!Path::new(&pin_dir).exists(), "nothing made under bpffs");
}

#[test]
fn the_tc_fallback_captures_raw_ip_both_ways_for_the_uid() {
    // Where netd holds the cgroup skb hooks: tc on the interfaces, whose
    // packets start with an Ethernet header the capture leaves out, and
    // whose answers carry no socket yet (the uid comes from the port the
    // captured packets left from).
    let setup = Setup::with("captc", true, &["--hooks", "tc_egress,tc_ingress"]);
    let status = setup.agent.status();
    for hook in ["tc_egress", "tc_ingress"] {
        let entry = status["hooks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["hook"] == hook)
            .unwrap_or_else(|| panic!("{hook} in {status}"));
        assert_eq!(entry["interfaces"], serde_json::json!(["veth0"]), "{entry}");
    }
    let service = format!("{SERVER4}:8080");
    let _sink = start_sink(&setup.test.net, &[service.parse().unwrap()], &[]);
    let file = setup.file("tc.pcapng");
    let mut capture = setup.capture(&["-w", file.to_str().unwrap(), "--uid", "1001"]);
    for uid in [10123, 1001, 10123] {
        gen(
            &setup.test.net,
            &setup.test.cgroup.path,
            uid,
            &["tcp", "--dst", &service, "--bytes", "300"],
        );
    }
    std::thread::sleep(Duration::from_millis(1500));
    capture.signal(libc::SIGTERM);
    let (status, lines) = capture.wait(Duration::from_secs(20));
    assert!(status.success(), "capture: {status} {lines:?}");
    let (captured, lost) = totals(&lines);
    assert_eq!(lost, 0);
    let rows = tshark_fields(
        &file,
        &[
            "frame.comment",
            "frame.packet_flags_direction",
            "ip.src",
            "ip.dst",
            "tcp.srcport",
            "tcp.dstport",
        ],
    );
    assert_eq!(rows.len() as u64, captured, "{rows:#?}");
    let ports: std::collections::BTreeSet<&str> = rows
        .iter()
        .map(|r| {
            if r[1] == "0x00000002" {
                r[4].as_str()
            } else {
                r[5].as_str()
            }
        })
        .collect();
    assert_eq!(ports.len(), 1, "one connection, uid 1001's: {rows:#?}");
    let (mut outbound, mut inbound) = (0, 0);
    for row in &rows {
        assert!(row[0].starts_with("uid=1001 owner=radio "), "{row:?}");
        match row[1].as_str() {
            "0x00000002" => {
                outbound += 1;
                assert_eq!(
                    (row[2].as_str(), row[3].as_str()),
                    (CLIENT4, SERVER4),
                    "{row:?}"
                );
            }
            "0x00000001" => {
                inbound += 1;
                assert_eq!(
                    (row[2].as_str(), row[3].as_str()),
                    (SERVER4, CLIENT4),
                    "{row:?}"
                );
            }
            other => panic!("direction {other}: {row:?}"),
        }
    }
    assert!(outbound >= 4 && inbound >= 3, "{rows:#?}");
    assert_disarmed(&setup.agent.pin_dir);
}

#[test]
fn firmware_owners_join_the_capture_as_the_agent_names_them() {
    let setup = Setup::new("capfw");
    let sink = format!("{SERVER4}:9999");
    let _sink = start_sink(&setup.test.net, &[], &[sink.parse().unwrap()]);
    let file = setup.file("firmware.pcapng");
    let mut capture = setup.capture(&["-w", file.to_str().unwrap(), "--firmware", "--count", "3"]);
    let send = |uid: u32, port: &str, count: &str| {
        let dst = format!("{SERVER4}:{port}");
        gen(
            &setup.test.net,
            &setup.test.cgroup.path,
            uid,
            &["udp-sendto", "--dst", &dst, "--count", count],
        )
    };
    // radio's first flow names it as firmware; the user app never is.
    send(1001, "9998", "1");
    send(10123, "9999", "2");
    let joined = capture.wait_for_line("also capturing uid", Duration::from_secs(10));
    assert_eq!(joined, "also capturing uid 1001 (radio)");
    send(10123, "9999", "3");
    send(1001, "9999", "3");
    let (status, lines) = capture.wait(Duration::from_secs(20));
    assert!(status.success(), "capture: {status} {lines:?}");
    assert_eq!(totals(&lines), (3, 0), "{lines:?}");
    let rows = tshark_fields(&file, &["frame.comment", "udp.dstport"]);
    assert_eq!(rows.len(), 3, "{rows:#?}");
    for row in &rows {
        assert!(row[0].starts_with("uid=1001 owner=radio "), "{row:?}");
        assert_eq!(row[1], "9999", "{row:?}");
    }
    assert_disarmed(&setup.agent.pin_dir);
}

#[test]
fn cleartext_only_leaves_tls_flows_out_after_their_first_payload() {
    let setup = Setup::new("capclear");
    let resolver = format!("{SERVER4}:53");
    let tcp: Vec<std::net::SocketAddr> = [80, 443]
        .iter()
        .map(|port| format!("{SERVER4}:{port}").parse().unwrap())
        .collect();
    let _sink = start_dns_sink(
        &setup.test.net,
        Some(&resolver),
        &["plain.example.cn", "tls.example.org"],
        &tcp,
        &[],
    );
    let secret = setup.file("secret.txt");
    std::fs::write(&secret, "s".repeat(200)).unwrap();
    let file = setup.file("cleartext.pcapng");
    let mut capture =
        setup.capture(&["-w", file.to_str().unwrap(), "--uid", "1001", "--cleartext"]);
    gen(
        &setup.test.net,
        &setup.test.cgroup.path,
        1001,
        &[
            "tls",
            "--host",
            "tls.example.org",
            "--resolver",
            &resolver,
            "--then-file",
            secret.to_str().unwrap(),
        ],
    );
    gen(
        &setup.test.net,
        &setup.test.cgroup.path,
        1001,
        &[
            "http-post",
            "--host",
            "plain.example.cn",
            "--resolver",
            &resolver,
            "--bytes",
            "300",
        ],
    );
    std::thread::sleep(Duration::from_millis(1500));
    capture.signal(libc::SIGINT);
    let (status, lines) = capture.wait(Duration::from_secs(20));
    assert!(status.success(), "capture: {status} {lines:?}");
    let rows = tshark_fields(
        &file,
        &[
            "frame.comment",
            "tcp.srcport",
            "tcp.dstport",
            "tcp.len",
            "udp.dstport",
        ],
    );
    let port = |row: &Vec<String>, p: &str| row[1] == p || row[2] == p;
    let has_payload = |row: &Vec<String>| row[3].parse::<u32>().is_ok_and(|n| n > 0);
    assert!(
        rows.iter().any(|r| r[2] == "80" && has_payload(r)),
        "the cleartext POST is in: {rows:#?}"
    );
    assert!(
        rows.iter().any(|r| r[4] == "53"),
        "and the DNS queries: {rows:#?}"
    );
    let tls: Vec<_> = rows
        .iter()
        .filter(|r| port(r, "443") && has_payload(r))
        .collect();
    assert!(
        tls.len() <= 1,
        "of the TLS flow at most its ClientHello, not the data after it: {rows:#?}"
    );
    for row in &rows {
        assert!(row[0].starts_with("uid=1001 owner=radio "), "{row:?}");
    }
}
