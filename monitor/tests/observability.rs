//! What users see, tested against the real consumers: a real Prometheus
//! server scraping `/metrics`, `promtool check metrics`, the JSON-lines log
//! with rotation, and `egressmon top` and `cargo xtask run` in a real
//! terminal (tmux).
//!
//! Run as root (`cargo xtask test`, which installs prometheus and tmux).

mod support;

use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(tag);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn http_get(url_addr: &str, path: &str) -> String {
    support::http_get(url_addr, path).unwrap_or_default()
}

fn prom_query(prom: &str, query: &str) -> Option<f64> {
    let mut encoded = String::new();
    for b in query.bytes() {
        if b.is_ascii_alphanumeric() || b"_-.".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    let body = http_get(prom, &format!("/api/v1/query?query={encoded}"));
    let v: Value = serde_json::from_str(&body).ok()?;
    let result = v["data"]["result"].as_array()?;
    let first = result.first()?;
    first["value"][1].as_str()?.parse().ok()
}

#[test]
fn real_prometheus_sees_the_agents_exact_counts() {
    require_root();
    let tag = tag("prom");
    let net = NetPair::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let dst = format!("{SERVER4}:8080");
    let _sink = start_sink(&net, &[addr(&dst)], &[addr(&format!("{SERVER4}:9001"))]);
    let agent = AgentProc::start(&cgroup.path, &tag, &[]);
    for uid in [1000u32, 10123] {
        gen(
            &net,
            &cgroup.path,
            uid,
            &["tcp", "--dst", &dst, "--count", "5", "--bytes", "2000"],
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
                "4",
                "--size",
                "64",
            ],
        );
    }
    std::thread::sleep(Duration::from_millis(300));

    // promtool reads the exposition exactly as Prometheus would (after the
    // agent's first pass over the flow map, which feeds bytes by country).
    assert!(eventually(Duration::from_secs(5), || http_get(
        &agent.listen,
        "/metrics"
    )
    .contains("egressmon_tx_bytes_by_country_total{")));
    let exposition = http_get(&agent.listen, "/metrics");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (installed by cargo xtask setup)");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), exposition.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics: {report}\n{exposition}"
    );
    for name in [
        "egressmon_tx_bytes_total",
        "egressmon_tx_packets_total",
        "egressmon_connects_total",
        "egressmon_udp_sends_total",
        "egressmon_tx_bytes_by_country_total",
        "egressmon_hook_attached",
        "egressmon_map_entries",
        "egressmon_map_capacity",
        "egressmon_events_lost_total",
        "egressmon_build_info",
    ] {
        assert!(
            exposition.contains(&format!("\n{name}")),
            "{name} missing:\n{exposition}"
        );
    }

    // A real Prometheus on loopback, scraping every second.
    let dir = scratch(&tag);
    let _cleanup = Scratch(dir.clone());
    let prom_listen = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: egressmon\n    static_configs:\n      - targets: ['{}']\n",
            agent.listen
        ),
    )
    .unwrap();
    let _prom = Proc(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={prom_listen}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (installed by cargo xtask setup)"),
    );

    let flows = agent.flows();
    for uid in [1000u32, 10123] {
        let mine: Vec<_> = flows.iter().filter(|f| f.uid == uid).collect();
        let bytes: u64 = mine.iter().map(|f| f.tx_bytes).sum();
        let connects: u64 = mine.iter().map(|f| f.connects).sum();
        let udp: u64 = mine.iter().map(|f| f.udp_sends).sum();
        assert_eq!((connects, udp), (5, 4));
        let seen = eventually(Duration::from_secs(30), || {
            prom_query(
                &prom_listen,
                &format!("sum(egressmon_tx_bytes_total{{uid=\"{uid}\"}})"),
            ) == Some(bytes as f64)
                && prom_query(
                    &prom_listen,
                    &format!("sum(egressmon_connects_total{{uid=\"{uid}\"}})"),
                ) == Some(connects as f64)
        });
        assert!(
            seen,
            "Prometheus should report uid {uid}: {bytes} bytes, {connects} connects; it has {:?} / {:?}",
            prom_query(&prom_listen, &format!("sum(egressmon_tx_bytes_total{{uid=\"{uid}\"}})")),
            prom_query(&prom_listen, &format!("sum(egressmon_connects_total{{uid=\"{uid}\"}})"))
        );
        assert_eq!(
            prom_query(
                &prom_listen,
                &format!("egressmon_udp_sends_total{{uid=\"{uid}\",proto=\"udp\"}}")
            ),
            Some(4.0)
        );
    }
    assert_eq!(
        prom_query(&prom_listen, "egressmon_hook_attached{hook=\"skb_egress\"}"),
        Some(1.0)
    );
}

fn read_log_lines(path: &Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = (1..=100)
        .rev()
        .map(|n| PathBuf::from(format!("{}.{n}", path.display())))
        .filter(|p| p.exists())
        .collect();
    files.push(path.to_path_buf());
    let mut lines = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{} ends mid-line",
            file.display()
        );
        for line in text.lines() {
            lines.push(
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("torn line in {}: {e}: {line}", file.display())),
            );
        }
    }
    lines
}

#[test]
fn json_log_starts_updates_ends_rotates_and_reports_owner_changes() {
    require_root();
    let tag = tag("log");
    let net = NetPair::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let dir = scratch(&tag);
    let _cleanup = Scratch(dir.clone());
    let android = dir.join("device");
    std::fs::create_dir_all(android.join("data/system")).unwrap();
    let packages = android.join("data/system/packages.list");
    std::fs::write(
        &packages,
        "com.example.one 10123 0 /data/user/0/com.example.one default:targetSdkVersion=34 3003 0 1 1 @null\n",
    )
    .unwrap();
    let log = dir.join("flows.jsonl");
    let dst = format!("{SERVER4}:9001");
    let _sink = start_sink(&net, &[], &[addr(&dst)]);
    let agent = AgentProc::start(
        &cgroup.path,
        &tag,
        &[
            "--log",
            log.to_str().unwrap(),
            "--log-interval",
            "1",
            "--flow-idle",
            "3",
            "--log-max-bytes",
            "1500",
            "--log-keep",
            "100",
            "--android-root",
            android.to_str().unwrap(),
        ],
    );
    gen(
        &net,
        &cgroup.path,
        10123,
        &["udp-sendto", "--dst", &dst, "--count", "3", "--size", "64"],
    );
    std::thread::sleep(Duration::from_millis(1500));
    gen(
        &net,
        &cgroup.path,
        10123,
        &["udp-sendto", "--dst", &dst, "--count", "2", "--size", "64"],
    );
    // A package update renames the uid's owner; the agent notices on reload.
    std::fs::write(
        &packages,
        "com.example.two 10123 0 /data/user/0/com.example.two default:targetSdkVersion=34 3003 0 1 1 @null\n",
    )
    .unwrap();
    let got_all = eventually(Duration::from_secs(20), || {
        let lines = read_log_lines(&log);
        let has = |e: &str| lines.iter().any(|l| l["event"] == e && l["uid"] == 10123);
        has("flow_start") && has("flow_update") && has("flow_end") && has("owner_change")
    });
    let lines = read_log_lines(&log);
    assert!(got_all, "{lines:#?}");
    let mine: Vec<&Value> = lines.iter().filter(|l| l["uid"] == 10123).collect();
    let start = mine.iter().find(|l| l["event"] == "flow_start").unwrap();
    assert_eq!(
        (start["udp_sends"].as_u64(), start["owner"].as_str()),
        (Some(3), Some("com.example.one")),
        "{start}"
    );
    for field in [
        "uid", "owner", "origin", "firmware", "proto", "family", "dst", "port", "tx_bytes", "time",
    ] {
        assert!(
            start.get(field).is_some(),
            "flow_start lacks {field}: {start}"
        );
    }
    let update = mine.iter().find(|l| l["event"] == "flow_update").unwrap();
    assert_eq!(
        (
            update["udp_sends"].as_u64(),
            update["delta_udp_sends"].as_u64()
        ),
        (Some(5), Some(2)),
        "{update}"
    );
    let end = mine.iter().find(|l| l["event"] == "flow_end").unwrap();
    assert_eq!(
        (end["reason"].as_str(), end["udp_sends"].as_u64()),
        (Some("idle"), Some(5)),
        "{end}"
    );
    let change = mine.iter().find(|l| l["event"] == "owner_change").unwrap();
    assert_eq!(
        (change["owner"].as_str(), change["previous_owner"].as_str()),
        (Some("com.example.two"), Some("com.example.one"))
    );
    assert!(
        PathBuf::from(format!("{}.1", log.display())).exists(),
        "rotated at 1500 bytes"
    );
    drop(agent);
}

/// A tmux server of the test's own, on a socket of its own (`tmux -S`), so
/// a tmux the machine's users run is never touched; the server and its
/// socket go on drop.
struct Tmux(String);

impl Tmux {
    fn socket(&self) -> PathBuf {
        std::env::temp_dir().join(format!("{}.tmux", self.0))
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.arg("-S")
            .arg(self.socket())
            .args(args)
            .stderr(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self
            .command(args)
            .output()
            .expect("tmux (installed by cargo xtask setup)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn has_session(&self) -> bool {
        self.command(&["has-session", "-t", &self.0])
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command(&["kill-server"]).status();
        let _ = std::fs::remove_file(self.socket());
    }
}

#[test]
fn top_runs_in_a_real_80x24_terminal() {
    require_root();
    let tag = tag("top");
    let net = NetPair::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let dst = format!("{SERVER4}:8080");
    let _sink = start_sink(&net, &[addr(&dst)], &[]);
    let agent = AgentProc::start(&cgroup.path, &tag, &[]);
    gen(
        &net,
        &cgroup.path,
        0,
        &["tcp", "--dst", &dst, "--count", "2", "--bytes", "3000"],
    );
    gen(
        &net,
        &cgroup.path,
        10123,
        &["tcp", "--dst", &dst, "--count", "3", "--bytes", "100"],
    );

    let once = agent.cli(&["top", "--once"]);
    assert!(once.contains("root") && once.contains("10123"), "{once}");
    assert!(
        once.lines().all(|l| l.chars().count() <= 80),
        "--once fits 80 columns:\n{once}"
    );

    let session = Tmux(tag.clone());
    let command = format!("{BIN} top --listen {}", agent.listen);
    session.run(&[
        "new-session",
        "-d",
        "-s",
        &session.0,
        "-x",
        "80",
        "-y",
        "24",
        &command,
    ]);
    let screen = || session.run(&["capture-pane", "-p", "-t", &session.0]);
    assert!(
        eventually(Duration::from_secs(10), || screen().contains("uid 10123")),
        "{}",
        screen()
    );
    let first = screen();
    assert!(
        first.contains("root") && first.contains("system FW") && first.contains(&dst),
        "{first}"
    );
    // f: firmware only — the unknown uid disappears, root stays.
    session.run(&["send-keys", "-t", &session.0, "f"]);
    assert!(
        eventually(Duration::from_secs(5), || {
            let s = screen();
            s.contains("[firmware only]") && !s.contains("uid 10123")
        }),
        "{}",
        screen()
    );
    // Enter: expand the selected owner into its flows (comm of the sender).
    session.run(&["send-keys", "-t", &session.0, "Enter"]);
    assert!(
        eventually(Duration::from_secs(5), || screen()
            .contains("tcp egressmon")),
        "{}",
        screen()
    );
    // s: next sort key.
    session.run(&["send-keys", "-t", &session.0, "s"]);
    assert!(
        eventually(Duration::from_secs(5), || screen().contains("sort: rate")),
        "{}",
        screen()
    );
    // q: quit — the session ends with the program.
    session.run(&["send-keys", "-t", &session.0, "q"]);
    assert!(
        eventually(Duration::from_secs(5), || !session.has_session()),
        "top did not quit on q"
    );
}

/// Removes an agent's pins and links on drop, whoever stopped the agent.
struct Detach {
    pin_dir: String,
    listen: String,
}

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = Command::new(BIN)
            .args([
                "detach",
                "--pin-dir",
                &self.pin_dir,
                "--listen",
                &self.listen,
            ])
            .output();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// `cargo xtask run` as a newcomer meets it, through an alert: the table
/// alone on the terminal, the alert in it as a marker and a count, and the
/// agent's log lines (the alert's among them) in the file the footer names.
/// xtask runs the binary under test (`--bin`) on the test's cgroup.
#[test]
fn xtask_run_shows_the_table_alone_and_alerts_in_it() {
    require_root();
    let tag = tag("xrun");
    let net = NetPair::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let dir = scratch(&tag);
    let _scratch = Scratch(dir.clone());
    const HOST: &str = "activation.example.net";
    let resolver = format!("{SERVER4}:53");
    let _sink = start_dns_sink(
        &net,
        Some(&resolver),
        &[HOST],
        &[addr(&format!("{SERVER4}:80"))],
        &[],
    );
    let log = dir.join("agent.log");
    let detach = Detach {
        pin_dir: format!("/sys/fs/bpf/{tag}"),
        listen: format!("127.0.0.1:{}", free_port()),
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let command = format!(
        "cd {} && {} xtask run --bin {BIN} --agent-log {} -- --cgroup {} --pin-dir {} --listen {}",
        workspace.display(),
        env!("CARGO"),
        log.display(),
        cgroup.path.display(),
        detach.pin_dir,
        detach.listen,
    );
    let session = Tmux(tag.clone());
    session.run(&[
        "new-session",
        "-d",
        "-s",
        &session.0,
        "-x",
        "80",
        "-y",
        "24",
        &command,
    ]);
    let screen = || session.run(&["capture-pane", "-p", "-t", &session.0]);
    // xtask itself may need building first.
    assert!(
        eventually(Duration::from_secs(300), || screen()
            .starts_with("egressmon top")),
        "{}",
        screen()
    );
    // root (a system account: firmware) POSTs in cleartext.
    gen(
        &net,
        &cgroup.path,
        0,
        &["http-post", "--host", HOST, "--resolver", &resolver],
    );
    assert!(
        eventually(Duration::from_secs(15), || {
            let s = screen();
            s.contains("alerts 1") && s.contains("!1 root")
        }),
        "{}",
        screen()
    );
    let shown = screen();
    let agent_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        agent_log.contains("alert firmware-cleartext"),
        "the alert's log line went to the file: {agent_log}"
    );
    assert!(
        shown.starts_with("egressmon top")
            && shown.contains(&format!("agent log: {}", log.display())),
        "{shown}"
    );
    for log_text in [
        " INFO ",
        " WARN ",
        "alert firmware-cleartext",
        "egressmon::",
    ] {
        assert!(
            !shown.contains(log_text),
            "{log_text:?} drawn over the table:\n{shown}"
        );
    }
    // q: top quits, xtask stops the agent, the session ends.
    session.run(&["send-keys", "-t", &session.0, "q"]);
    assert!(
        eventually(Duration::from_secs(10), || !session.has_session()),
        "xtask run did not end on q: {}",
        screen()
    );
}

/// The agent's passes and its quiet polls, from `status`.
fn passes(agent: &AgentProc) -> (u64, u64) {
    let status = agent.status();
    let count = |field: &str| {
        status[field]
            .as_u64()
            .unwrap_or_else(|| panic!("status lacks {field}: {status:#}"))
    };
    (count("passes"), count("quiet_polls"))
}

/// A flow map that holds still is not walked again: polls read the
/// kernel's totals, find nothing moved and make no pass. The next datagram
/// brings the passes back, and what they log is exact.
#[test]
fn a_still_map_is_not_walked_until_something_moves() {
    require_root();
    let tag = tag("still");
    let net = NetPair::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let dir = scratch(&tag);
    let _cleanup = Scratch(dir.clone());
    let log = dir.join("flows.jsonl");
    let (first, second) = (format!("{SERVER4}:9001"), format!("{SERVER4}:9002"));
    let _sink = start_sink(&net, &[], &[addr(&first), addr(&second)]);
    let agent = AgentProc::start(&cgroup.path, &tag, &["--log", log.to_str().unwrap()]);
    let send = |dst: &str, count: &str| {
        gen(
            &net,
            &cgroup.path,
            10123,
            &["udp-sendto", "--dst", dst, "--count", count, "--size", "64"],
        )
    };
    send(&first, "3");
    // After the passes that find the flow (and history's write of it),
    // polls go on without passes.
    let mut quiet = (0, 0);
    let still = eventually(Duration::from_secs(40), || {
        let before = passes(&agent);
        std::thread::sleep(Duration::from_secs(3));
        quiet = passes(&agent);
        quiet.0 == before.0 && quiet.1 >= before.1 + 2
    });
    assert!(still, "passes and quiet polls: {quiet:?}");
    send(&second, "5");
    let started = |port: u64| {
        read_log_lines(&log)
            .into_iter()
            .find(|l| l["event"] == "flow_start" && l["port"] == port)
    };
    assert!(
        eventually(Duration::from_secs(5), || started(9002).is_some()),
        "no flow_start for the second destination: {:#?}",
        read_log_lines(&log)
    );
    assert_eq!(started(9001).unwrap()["udp_sends"], 3);
    assert_eq!(started(9002).unwrap()["udp_sends"], 5);
    assert!(passes(&agent).0 > quiet.0, "{:?}", passes(&agent));
}
