//! History across restarts and reboots, `report` and `diff`: two runs with
//! different destinations into two state directories are diffed (exit 1
//! naming the new firmware destination, 0 the other way and on itself, 0
//! with it allowed, 2 on error); a kill -9 and restart, then a detach and
//! start (what a reboot does to the kernel's maps) leave `report --json`'s
//! bytes equal to the kernel-exact totals, not doubled; retention drops old
//! hours; a damaged database is moved aside while the agent keeps running.
//!
//! Run as root (`cargo xtask test`, or `cargo test -p monitor --test history
//! -- --test-threads=1`); they never skip.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::*;

const RADIO: u32 = 1001;
const APP: u32 = 10123;
/// IPv4 (20) + UDP (8) headers over each 100-byte datagram.
const DATAGRAM: u64 = 128;

/// A test host with UDP sinks, a device layout naming radio (firmware) and
/// com.example.app, and the test's own cgroup and scratch directory.
struct World {
    _sink: Proc,
    test: TestDevice,
}

impl World {
    fn new(tag: &str) -> World {
        let test = TestDevice::new(tag);
        let udp: Vec<std::net::SocketAddr> = (9000..9010)
            .map(|port| format!("{SERVER4}:{port}").parse().unwrap())
            .collect();
        let sink = start_sink(&test.net, &[], &udp);
        World { _sink: sink, test }
    }

    fn state(&self, name: &str) -> PathBuf {
        self.test.dir.join(name)
    }

    fn args(&self, state: &Path, extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            "--android-root".to_string(),
            self.test.dir.join("device").to_str().unwrap().to_string(),
            "--state-dir".to_string(),
            state.to_str().unwrap().to_string(),
        ];
        // Every pass writes unless a test says otherwise.
        if !extra.contains(&"--history-every") {
            args.extend(["--history-every".to_string(), "1".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    fn agent(&self, tag: &str, state: &Path, extra: &[&str]) -> AgentProc {
        let args = self.args(state, extra);
        AgentProc::start(&self.test.cgroup.path, tag, &strs(&args))
    }

    /// A state directory holding one row (radio's two datagrams to 9001),
    /// its agent gone.
    fn seeded(&self, tag: &str) -> PathBuf {
        let state = self.state("state");
        let mut agent = self.agent(tag, &state, &[]);
        self.send(RADIO, 9001, 2);
        wait_reported(&state, RADIO, 9001, 2 * DATAGRAM);
        agent.detach();
        state
    }

    fn send(&self, uid: u32, port: u16, count: u64) {
        let dst = format!("{SERVER4}:{port}");
        let count = count.to_string();
        gen(
            &self.test.net,
            &self.test.cgroup.path,
            uid,
            &[
                "udp-sendto",
                "--dst",
                &dst,
                "--count",
                &count,
                "--size",
                "100",
            ],
        );
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn egressmon(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run egressmon")
}

fn report(state: &Path) -> Vec<Value> {
    let out = egressmon(&["report", "--json", "--state-dir", state.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "report: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .expect("report --json parses")
        .as_array()
        .expect("an array")
        .clone()
}

/// Bytes `report` holds for uid's UDP destination port.
fn reported(state: &Path, uid: u32, port: u16) -> u64 {
    report(state)
        .iter()
        .filter(|d| d["uid"] == uid && d["port"] == port && d["proto"] == "udp")
        .map(|d| d["tx_bytes"].as_u64().unwrap())
        .sum()
}

/// Bytes the kernel counted (the agent's flow table) for that flow.
fn counted(agent: &AgentProc, uid: u32, port: u16) -> u64 {
    agent
        .flows()
        .iter()
        .filter(|f| f.uid == uid && f.port == port && f.dst == SERVER4)
        .map(|f| f.tx_bytes)
        .sum()
}

/// Waits until the history holds `bytes` for the flow, and no more.
fn wait_reported(state: &Path, uid: u32, port: u16, bytes: u64) {
    let ok = eventually(Duration::from_secs(15), || {
        reported(state, uid, port) == bytes
    });
    assert!(
        ok,
        "history holds {} bytes for uid {uid} port {port}, expected {bytes}",
        reported(state, uid, port)
    );
}

fn diff(base: &Path, new: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["diff", base.to_str().unwrap(), new.to_str().unwrap()];
    args.extend(extra);
    let out = egressmon(&args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn diff_fails_on_a_new_firmware_destination_and_only_then() {
    require_root();
    let tag = tag("hist-diff");
    let world = World::new(&tag);
    let (old, new) = (world.state("old"), world.state("new"));
    // The old build: radio reaches 9001, the app 9003.
    let mut agent = world.agent(&tag, &old, &[]);
    world.send(RADIO, 9001, 3);
    world.send(APP, 9003, 2);
    wait_reported(&old, RADIO, 9001, 3 * DATAGRAM);
    wait_reported(&old, APP, 9003, 2 * DATAGRAM);
    agent.detach();
    // The new build: radio also reaches 9002, the app 9004.
    let mut agent = world.agent(&tag, &new, &[]);
    world.send(RADIO, 9001, 3);
    world.send(RADIO, 9002, 4);
    world.send(APP, 9004, 1);
    wait_reported(&new, RADIO, 9002, 4 * DATAGRAM);
    wait_reported(&new, APP, 9004, DATAGRAM);
    agent.detach();

    let (code, out, err) = diff(&old, &new, &[]);
    assert_eq!(code, 1, "new firmware destination: exit 1\n{out}{err}");
    let failing: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with('!'))
        .collect();
    assert_eq!(failing.len(), 1, "{out}");
    assert!(
        failing[0].contains("radio") && failing[0].contains(":9002/udp"),
        "{out}"
    );
    assert!(
        out.contains(":9004/udp"),
        "the app's new destination is listed: {out}"
    );

    let (code, out, _) = diff(&new, &old, &[]);
    assert_eq!(code, 0, "only gone destinations: exit 0\n{out}");
    assert!(out.contains(":9002/udp") && out.contains("gone"), "{out}");
    let (code, out, _) = diff(&new, &new, &[]);
    assert_eq!(code, 0, "itself: exit 0\n{out}");

    let allow = world.test.dir.join("allow.toml");
    std::fs::write(
        &allow,
        "[[allow]]\nowner = \"radio\"\nhost = \"10.200.0.*\"\nport = 9002\n",
    )
    .unwrap();
    let (code, out, _) = diff(&old, &new, &["--allow", allow.to_str().unwrap()]);
    assert_eq!(code, 0, "allowed: exit 0\n{out}");
    let (code, out, _) = diff(
        &old,
        &new,
        &["--allow", allow.to_str().unwrap(), "--all-origins"],
    );
    assert_eq!(code, 1, "--all-origins gates on the app's 9004 too\n{out}");

    let (code, json, _) = diff(&old, &new, &["--json"]);
    assert_eq!(code, 1);
    let json: Value = serde_json::from_str(&json).expect("diff --json parses");
    assert_eq!(json["failing"], 1);
    assert_eq!(json["new"].as_array().unwrap().len(), 2);

    // History is root's alone: another uid is told so, and diff says it
    // with exit 2.
    let bin = BinForAnyUid::new(&tag);
    let as_nobody = |args: &[&str]| {
        use std::os::unix::process::CommandExt;
        Command::new(&bin.path)
            .uid(65534)
            .gid(65534)
            .args(args)
            .output()
            .expect("run egressmon as nobody")
    };
    let out = as_nobody(&["report", "--state-dir", old.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("root's alone"),
        "{err}"
    );
    let out = as_nobody(&["diff", old.to_str().unwrap(), new.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("root's alone"), "{err}");

    let (code, _, err) = diff(&old, &world.state("missing"), &[]);
    assert_eq!(code, 2, "error: exit 2 ({err})");
    assert!(err.contains("no history at"), "{err}");
    std::fs::write(&allow, "[[allow]]\nownr = \"radio\"\n").unwrap();
    let (code, _, err) = diff(&old, &new, &["--allow", allow.to_str().unwrap()]);
    assert_eq!(code, 2, "a bad allow file: exit 2 ({err})");
}

#[test]
fn restart_and_reboot_neither_double_nor_lose() {
    require_root();
    let tag = tag("hist-restart");
    let world = World::new(&tag);
    let state = world.state("state");
    let mut agent = world.agent(&tag, &state, &[]);
    world.send(RADIO, 9001, 10);
    wait_reported(&state, RADIO, 9001, 10 * DATAGRAM);

    // kill -9, traffic while no agent runs, start again on the same pins.
    agent.kill();
    world.send(RADIO, 9001, 5);
    agent.spawn(&world.test.cgroup.path, &strs(&world.args(&state, &[])));
    wait_reported(&state, RADIO, 9001, 15 * DATAGRAM);
    assert_eq!(
        counted(&agent, RADIO, 9001),
        15 * DATAGRAM,
        "the kernel's count"
    );
    // Nothing more is added by later passes.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(reported(&state, RADIO, 9001), 15 * DATAGRAM, "not doubled");

    // A reboot: the pins and maps go; a new agent counts from zero into
    // the same rows.
    // This agent writes every flow once an hour, and everything when it
    // stops.
    agent.detach();
    let mut agent = world.agent(&tag, &state, &["--history-every", "3600"]);
    world.send(RADIO, 9001, 4);
    assert!(
        eventually(Duration::from_secs(15), || counted(&agent, RADIO, 9001)
            == 4 * DATAGRAM),
        "new maps count anew"
    );
    agent.detach();
    assert_eq!(
        reported(&state, RADIO, 9001),
        19 * DATAGRAM,
        "written when the agent stopped"
    );
    let mut agent = world.agent(&tag, &state, &[]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(reported(&state, RADIO, 9001), 19 * DATAGRAM, "not doubled");
    let row = report(&state)
        .into_iter()
        .find(|d| d["uid"] == RADIO && d["port"] == 9001)
        .unwrap();
    assert_eq!(row["owner"], "radio");
    assert_eq!(row["firmware"], true);
    assert_eq!(row["udp_sends"], 19);
    assert_eq!(row["tx_packets"], 19);
    assert_eq!(row["dst"], SERVER4);
    for field in [
        "origin",
        "host",
        "country",
        "payload",
        "connects",
        "first_seen",
        "last_seen",
    ] {
        assert!(row.get(field).is_some(), "{field} in {row}");
    }
    // --owner and --firmware filter; the text and Markdown forms name it.
    let text = egressmon(&[
        "report",
        "--state-dir",
        state.to_str().unwrap(),
        "--owner",
        "rad*",
    ]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("radio (uid 1001"));
    let md = egressmon(&[
        "report",
        "--markdown",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    let md = String::from_utf8_lossy(&md.stdout);
    assert!(
        md.contains(&format!("sent {} bytes", 19 * DATAGRAM)),
        "{md}"
    );
    agent.detach();
}

#[test]
fn retention_drops_old_hours() {
    require_root();
    let tag = tag("hist-retain");
    let world = World::new(&tag);
    let state = world.seeded(&tag);
    // An hour 60 days back, as an older agent would have written it.
    let db = rusqlite::Connection::open(state.join("history.db")).unwrap();
    let copied = db
        .execute(
            "INSERT INTO destinations (hour, uid, owner, origin, firmware, partition, proto, \
             direction, dst, port, host, host_source, country, asn, payload, leaks, connects, \
             udp_sends, tx_packets, tx_bytes, first_seen, last_seen, before_unlock, build, \
             kernel, boot_id) SELECT hour - 1440, uid, owner, origin, firmware, partition, \
             proto, direction, dst, 9009, host, host_source, country, asn, payload, leaks, \
             connects, udp_sends, tx_packets, tx_bytes, first_seen - 5184000, \
             last_seen - 5184000, before_unlock, build, kernel, boot_id FROM destinations",
            [],
        )
        .unwrap();
    assert_eq!(copied, 1);
    drop(db);
    assert_eq!(
        reported(&state, RADIO, 9009),
        2 * DATAGRAM,
        "the old row is there"
    );
    let since = egressmon(&[
        "report",
        "--json",
        "--since",
        "30d",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(
        !String::from_utf8_lossy(&since.stdout).contains("9009"),
        "--since leaves it out"
    );
    let mut agent = world.agent(&tag, &state, &["--retain-days", "90"]);
    assert_eq!(
        reported(&state, RADIO, 9009),
        2 * DATAGRAM,
        "kept within 90 days"
    );
    agent.detach();
    let mut agent = world.agent(&tag, &state, &["--retain-days", "30"]);
    assert_eq!(reported(&state, RADIO, 9009), 0, "dropped beyond 30 days");
    assert_eq!(
        reported(&state, RADIO, 9001),
        2 * DATAGRAM,
        "today's row stays"
    );
    agent.detach();
}

#[test]
fn a_damaged_database_is_moved_aside_and_the_agent_keeps_running() {
    require_root();
    let tag = tag("hist-damaged");
    let world = World::new(&tag);
    let state = world.seeded(&tag);
    let db = state.join("history.db");
    let file = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    file.set_len(1000).unwrap();
    drop(file);
    let _ = std::fs::remove_file(state.join("history.db-wal"));
    let _ = std::fs::remove_file(state.join("history.db-shm"));

    let mut agent = world.agent(&tag, &state, &[]);
    let aside: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.starts_with("history.db.corrupt-") && !n.ends_with("-wal") && !n.ends_with("-shm")
        })
        .collect();
    assert_eq!(aside.len(), 1, "moved aside: {aside:?}");
    world.send(RADIO, 9002, 3);
    wait_reported(&state, RADIO, 9002, 3 * DATAGRAM);
    assert_eq!(counted(&agent, RADIO, 9002), 3 * DATAGRAM, "still counting");
    let status = agent.status();
    let moved = status["history"]["moved_aside"]
        .as_array()
        .expect("status names it");
    assert_eq!(moved.len(), 1, "{status}");
    assert!(moved[0].as_str().unwrap().ends_with(&aside[0]));
    let out = egressmon(&[
        "report",
        "--state-dir",
        state.join(&aside[0]).to_str().unwrap(),
    ]);
    assert!(
        !out.status.success(),
        "the damaged copy is reported as such"
    );
    agent.detach();
}
