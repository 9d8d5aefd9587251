//! Android owners on the real kernel: a directory laid out like an Android
//! 14 device (binary packages.xml, packages.list, a work profile, a vendor
//! passwd), an agent started with `--android-root` on it, and traffic sent
//! under the uids it describes. `flows --json`, `/metrics` and
//! `owners --json` must say who each uid is and whether it is firmware.
//!
//! Boot on a simulated Android device: `egressmon wait-netd` (what the
//! Magisk module runs before `egressmon run`) returns only once netd's
//! stand-ins are attached, for the Android 12-14 and 15+ layouts, and the
//! agent then attaches beside them without touching them.
//!
//! Run as root (`cargo xtask test`, or `cargo test -p monitor --test android
//! -- --test-threads=1`); they never skip.

mod support;

use egressmon::pipeline::flows::FlowRecord;
use serde_json::Value;
use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::netd::{
    Device, ExclusiveProgram, ATTACH_UDP4_RECVMSG, ATTACH_UDP6_RECVMSG, PROG_TYPE_CGROUP_SKB,
    PROG_TYPE_CGROUP_SOCK_ADDR,
};
use support::netd_maps::{NetdMaps, Release, Which};
use support::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/android")
}

/// A device root for one test: the Android 14 fixture plus user 10's data
/// directory, removed on drop.
struct DeviceRoot {
    path: PathBuf,
}

impl DeviceRoot {
    fn lay_out(tag: &str) -> DeviceRoot {
        let path = std::env::temp_dir().join(format!("{tag}-device"));
        let _ = std::fs::remove_dir_all(&path);
        copy_tree(&fixtures().join("android14"), &path);
        // A work profile's app data lives under data/user/10 on the device.
        std::fs::create_dir_all(path.join("data/user/10/com.example.app")).unwrap();
        DeviceRoot { path }
    }

    fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for DeviceRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// uid, owner, packages, origin, firmware.
type Expected = (
    u32,
    &'static str,
    &'static [&'static str],
    &'static str,
    bool,
);

const EXPECTED: &[Expected] = &[
    (0, "root", &[], "platform", true),
    (
        1000,
        "system",
        &["android", "com.android.settings"],
        "platform",
        true,
    ),
    (
        1001,
        "radio",
        &["com.android.phone", "com.android.providers.telephony"],
        "platform",
        true,
    ),
    (2901, "vendor_modem_diag", &[], "platform", true),
    // Preinstalled: /system/priv-app, and a shared uid from /product.
    (
        10050,
        "com.vendor.telemetry",
        &["com.vendor.telemetry"],
        "preinstalled",
        true,
    ),
    (
        10057,
        "com.google.uid.shared",
        &["com.google.android.gms", "com.google.android.gsf"],
        "preinstalled",
        true,
    ),
    // User-installed, in user 0 and in the work profile (user 10).
    (10123, "com.example.app", &["com.example.app"], "app", false),
    (
        1_010_123,
        "com.example.app",
        &["com.example.app"],
        "app",
        false,
    ),
    // The SDK sandbox of com.sandboxed (app id 10200).
    (
        20200,
        "com.sandboxed (sdk sandbox)",
        &["com.sandboxed"],
        "app",
        false,
    ),
    // Named by no source: numbers only, never dropped.
    (99_001, "u0_i9001 (isolated)", &[], "unknown", false),
    (10_999, "u0_a999", &[], "unknown", false),
];

fn describe(f: &FlowRecord) -> (u32, u32, String, Vec<String>, String, bool) {
    (
        f.user,
        f.app_id,
        f.owner.clone(),
        f.packages.clone(),
        f.origin.to_string(),
        f.firmware,
    )
}

fn expected(e: &Expected) -> (u32, u32, String, Vec<String>, String, bool) {
    let (uid, owner, packages, origin, firmware) = *e;
    (
        uid / 100_000,
        uid % 100_000,
        owner.into(),
        packages.iter().map(|p| p.to_string()).collect(),
        origin.into(),
        firmware,
    )
}

#[test]
fn flows_name_every_android_uid_class() {
    require_root();
    let tag = tag("android");
    let device = DeviceRoot::lay_out(&tag);
    let net = NetPair::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let dst = format!("{SERVER4}:8443");
    let _sink = start_sink(&net, &[dst.parse::<SocketAddr>().unwrap()], &[]);
    let agent = AgentProc::start(&cgroup.path, &tag, &["--android-root", device.arg()]);

    for e in EXPECTED {
        gen(
            &net,
            &cgroup.path,
            e.0,
            &["tcp", "--dst", &dst, "--count", "1", "--bytes", "100"],
        );
    }

    let flows = agent.flows();
    for e in EXPECTED {
        let flow = find(&flows, e.0, "tcp", SERVER4, 8443);
        assert_eq!(describe(flow), expected(e), "uid {}", e.0);
        assert_eq!(flow.connects, 1, "uid {}", e.0);
    }

    // The metrics carry the same owner, origin and firmware labels.
    let metrics = http_get(&agent.listen, "/metrics").unwrap();
    for e in EXPECTED {
        let (uid, owner, _, origin, firmware) = *e;
        let labels = [
            format!("uid=\"{uid}\""),
            format!("owner=\"{owner}\""),
            format!("origin=\"{origin}\""),
            format!("firmware=\"{firmware}\""),
            "proto=\"tcp\"".to_string(),
        ];
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("egressmon_connects_total{")
                    && l.ends_with("} 1")
                    && labels.iter().all(|label| l.contains(label.as_str()))),
            "no egressmon_connects_total with {labels:?} in\n{metrics}"
        );
    }
}

fn owners_json(root: &str) -> Vec<Value> {
    let out = Command::new(BIN)
        .args(["owners", "--json", "--android-root", root])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run egressmon owners");
    assert!(
        out.status.success(),
        "owners --json: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("packages.list:13: skipping malformed line"),
        "the malformed fixture line is reported: {stderr}"
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .expect("owners --json parses")
        .as_array()
        .expect("owners --json is an array")
        .clone()
}

#[test]
fn owners_json_from_an_android_root() {
    require_root();
    let device = DeviceRoot::lay_out(&tag("owners"));
    let table = owners_json(device.arg());
    let row = |uid: u32| -> &Value {
        table
            .iter()
            .find(|o| o["uid"] == uid)
            .unwrap_or_else(|| panic!("uid {uid} missing from owners --json"))
    };
    for e in EXPECTED.iter().filter(|e| {
        // Sandbox, isolated and unnamed app uids appear only in traffic.
        ![20200, 99_001, 10_999].contains(&e.0)
    }) {
        let o = row(e.0);
        let got = (
            o["user"].as_u64().unwrap() as u32,
            o["app_id"].as_u64().unwrap() as u32,
            o["owner"].as_str().unwrap().to_string(),
            o["packages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_string())
                .collect::<Vec<_>>(),
            o["origin"].as_str().unwrap().to_string(),
            o["firmware"].as_bool().unwrap(),
        );
        assert_eq!(got, expected(e), "uid {}", e.0);
        let keys: Vec<&str> = o.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 7, "exactly the contract's fields: {keys:?}");
    }
    // Every fixed AID for user 0, the platform AIDs for user 10.
    for (uid, owner) in [
        (1010, "wifi"),
        (1051, "dns"),
        (1073, "network_stack"),
        (3003, "inet"),
        (9999, "nobody"),
        (1_001_000, "system"),
        (1_001_073, "network_stack"),
    ] {
        assert_eq!(row(uid)["owner"], owner, "uid {uid}");
        assert_eq!(row(uid)["origin"], "platform", "uid {uid}");
    }
    // The updated system app (now in /data/app) and the package only
    // packages.list's installer field marks as preinstalled.
    assert_eq!(row(10090)["origin"], "preinstalled");
    assert_eq!(row(10060)["origin"], "preinstalled");
    assert!(
        !table.iter().any(|o| o["uid"] == 1_000_000),
        "no root for user 10"
    );
}

#[test]
fn a_damaged_packages_xml_is_reported_and_packages_list_still_names_apps() {
    require_root();
    let device = DeviceRoot::lay_out(&tag("damaged"));
    let xml = device.path.join("data/system/packages.xml");
    let full = std::fs::read(&xml).unwrap();
    std::fs::write(&xml, &full[..full.len() / 3]).unwrap();
    let out = Command::new(BIN)
        .args(["owners", "--json", "--android-root", device.arg()])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}: byte ", xml.display())) && stderr.contains("expected"),
        "the damage is located: {stderr}"
    );
    let table: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let app = table.iter().find(|o| o["uid"] == 10123).unwrap();
    assert_eq!(
        (app["owner"].as_str(), app["origin"].as_str()),
        (Some("com.example.app"), Some("app"))
    );
    let vendor = table.iter().find(|o| o["uid"] == 10050).unwrap();
    assert_eq!(vendor["origin"], "preinstalled", "from the installer field");
}

#[test]
fn a_damaged_packages_xml_on_reload_keeps_the_last_good_owners() {
    require_root();
    let tag = tag("reload");
    let device = DeviceRoot::lay_out(&tag);
    let net = NetPair::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let dst = format!("{SERVER4}:8443");
    let _sink = start_sink(&net, &[dst.parse::<SocketAddr>().unwrap()], &[]);
    let agent = AgentProc::start(&cgroup.path, &tag, &["--android-root", device.arg()]);
    for uid in [10057, 10090] {
        gen(
            &net,
            &cgroup.path,
            uid,
            &["tcp", "--dst", &dst, "--count", "1"],
        );
    }
    let owners = |agent: &AgentProc| {
        let flows = agent.flows();
        [10057, 10090].map(|uid| {
            let f = find(&flows, uid, "tcp", SERVER4, 8443);
            (f.owner.clone(), f.origin.to_string())
        })
    };
    let good = owners(&agent);
    assert_eq!(
        good[0],
        (
            "com.google.uid.shared".to_string(),
            "preinstalled".to_string()
        )
    );
    assert_eq!(
        good[1].1, "preinstalled",
        "an updated system app (updated-package under /product)"
    );

    // The file is cut short while the agent runs (a crash mid-write).
    let xml = device.path.join("data/system/packages.xml");
    let full = std::fs::read(&xml).unwrap();
    std::fs::write(&xml, &full[..full.len() / 3]).unwrap();
    assert!(
        eventually(std::time::Duration::from_secs(15), || agent.status()
            ["owner_reloads_rejected"]
            .as_u64()
            >= Some(1)),
        "the agent noticed the change: {}",
        agent.status()
    );
    assert_eq!(owners(&agent), good, "last good owners kept");

    // Fixed again: the next reread is accepted.
    std::fs::write(&xml, &full).unwrap();
    assert!(
        eventually(std::time::Duration::from_secs(15), || agent.status()
            ["owner_reloads"]
            .as_u64()
            >= Some(1)),
        "{}",
        agent.status()
    );
    assert_eq!(owners(&agent), good);
}

#[test]
fn a_package_installed_while_running_is_named_within_5_s() {
    require_root();
    let tag = tag("install");
    let device = DeviceRoot::lay_out(&tag);
    let net = NetPair::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let dst = format!("{SERVER4}:8443");
    let _sink = start_sink(&net, &[dst.parse::<SocketAddr>().unwrap()], &[]);
    let agent = AgentProc::start(&cgroup.path, &tag, &["--android-root", device.arg()]);
    gen(
        &net,
        &cgroup.path,
        10300,
        &["tcp", "--dst", &dst, "--count", "1"],
    );
    let owner = |agent: &AgentProc| {
        find(&agent.flows(), 10300, "tcp", SERVER4, 8443)
            .owner
            .clone()
    };
    assert_eq!(owner(&agent), "u0_a300", "not installed yet: numbers only");
    // The package manager writes the new line (as an install does).
    let list = device.path.join("data/system/packages.list");
    let mut text = std::fs::read_to_string(&list).unwrap();
    text.push_str("com.new.install 10300 0 /data/user/0/com.new.install default:targetSdkVersion=34 3003 0 1 1 com.android.vending\n");
    std::fs::write(&list, text).unwrap();
    let installed = std::time::Instant::now();
    assert!(
        eventually(std::time::Duration::from_secs(5), || owner(&agent)
            == "com.new.install"),
        "still {} after 5 s",
        owner(&agent)
    );
    println!(
        "FIGURE install: named after {} ms",
        installed.elapsed().as_millis()
    );
}

/// `egressmon wait-netd` as the Magisk module's service.sh runs it at boot,
/// on a test cgroup standing for the root cgroup netd attaches to; killed
/// (it is ours) and reaped on drop.
struct WaitNetd {
    proc: Proc,
}

/// How wait-netd ended: exit status, output, and when it was seen gone.
struct WaitNetdEnd {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
    at: Instant,
}

impl WaitNetd {
    fn start(cgroup: &Path, timeout_secs: u32) -> WaitNetd {
        let child = Command::new(BIN)
            .arg("wait-netd")
            .arg("--cgroup")
            .arg(cgroup)
            .args(["--timeout", &timeout_secs.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn egressmon wait-netd");
        WaitNetd { proc: Proc(child) }
    }

    fn running(&mut self) -> bool {
        self.proc.0.try_wait().unwrap().is_none()
    }

    /// Waits (up to `limit`) for it to exit; looks every 10 ms.
    fn end(mut self, limit: Duration) -> WaitNetdEnd {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.proc.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "wait-netd still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let at = Instant::now();
        let mut stdout = String::new();
        let mut stderr = String::new();
        self.proc
            .0
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        self.proc
            .0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        WaitNetdEnd {
            status,
            stdout,
            stderr,
            at,
        }
    }
}

/// The hooks the agent attaches where netd holds what `device` holds (as
/// in the kernel tests' device cases).
fn hooks_beside_netd(device: Device) -> &'static [&'static str] {
    match device {
        Device::Android12To14 => &[
            "connect4",
            "connect6",
            "sendmsg4",
            "sendmsg6",
            "tc_egress",
            "tc_ingress",
        ],
        Device::Android15 => &["tc_egress", "tc_ingress"],
        Device::Linux => unreachable!("no netd on Linux"),
    }
}

/// Boot on a simulated device, as the Magisk module does it: `wait-netd`
/// starts before netd; netd's stand-ins are attached a second later; it
/// must still be waiting until then, and come back once they are all there,
/// naming each; then `egressmon run` (what service.sh runs next) attaches
/// beside them on the same cgroup and leaves them exactly as they were.
fn boot_waits_for_netd(device: Device) {
    require_root();
    let tag = tag(match device {
        Device::Android12To14 => "boot14",
        Device::Android15 => "boot15",
        Device::Linux => unreachable!("no netd on Linux"),
    });
    let net = NetPair::new(&tag);
    // Stands for the root cgroup: netd's programs and egressmon's on it.
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let netd_maps = NetdMaps::new(&tag, Release::Android13, false);
    let mut wait = WaitNetd::start(&cgroup.path, 20);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        wait.running(),
        "{device:?}: wait-netd returned before netd attached anything"
    );
    let held = device.hold(&cgroup.path, Some(netd_maps.map(Which::A).fd()));
    let attached = Instant::now();
    let before: Vec<_> = held.iter().map(|h| h.query()).collect();
    let end = wait.end(Duration::from_secs(25));
    assert!(
        end.status.success(),
        "{device:?}: wait-netd {}: {}{}",
        end.status,
        end.stdout,
        end.stderr
    );
    // What it printed is what it saw last: every stand-in, so it returned
    // after the last one was attached (and it was still waiting before the
    // first).
    assert!(
        end.stdout.starts_with(&format!(
            "netd's programs are attached at {}",
            cgroup.path.display()
        )),
        "{}",
        end.stdout
    );
    for query in &before {
        for id in &query.prog_ids {
            assert!(
                end.stdout.contains(&format!("program {id} (netd_sim_")),
                "{device:?}: program {id} missing from\n{}",
                end.stdout
            );
        }
    }
    assert_eq!(
        end.stdout.matches(", exclusive").count(),
        held.len(),
        "{device:?}: one line per hook netd holds:\n{}",
        end.stdout
    );
    println!(
        "FIGURE boot {device:?}: wait-netd returned {} ms after netd's stand-ins\n{}",
        end.at.duration_since(attached).as_millis(),
        end.stdout
    );

    // What service.sh runs next, on the cgroup netd holds.
    let root = netd_maps.root().to_str().unwrap().to_string();
    let client_ns = NetPair::path(&net.client);
    let mut agent = AgentProc::start_in(
        Some(&client_ns),
        &[],
        &cgroup.path,
        &tag,
        &["--netd-bpf-root", &root],
    );
    let status = agent.status();
    let attached_hooks: Vec<&str> = status["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["attached"] == true)
        .map(|h| h["hook"].as_str().unwrap())
        .collect();
    assert_eq!(attached_hooks, hooks_beside_netd(device), "{status:#}");
    let now: Vec<_> = held.iter().map(|h| h.query()).collect();
    assert_eq!(now, before, "{device:?}: netd's programs untouched");
    if device == Device::Android12To14 {
        // Ours sit beside netd's on the same cgroup, as multi-attach links.
        let dir = std::fs::File::open(&cgroup.path).unwrap();
        for attach_type in [10, 11, 14, 15] {
            let ours = egressmon::bpf_sys::prog_query(dir.as_fd(), attach_type).unwrap();
            assert!(
                ours.prog_ids.len() == 1 && !ours.is_exclusive(),
                "attach type {attach_type}: {ours:?}"
            );
        }
    }
    agent.detach();
    let after: Vec<_> = held.iter().map(|h| h.query()).collect();
    assert_eq!(after, before, "{device:?}: netd's programs untouched");
}

#[test]
fn boot_waits_for_netd_android_12_to_14() {
    boot_waits_for_netd(Device::Android12To14);
}

#[test]
fn boot_waits_for_netd_android_15() {
    boot_waits_for_netd(Device::Android15);
}

/// Android 15's netd attaches its skb and socket-create programs first and
/// its connect, recvmsg and sendmsg programs after them. wait-netd must not
/// return in between: egressmon would then take connect4 and the sendmsg
/// hooks, and netd's exclusive attach of them would fail. Here the second
/// half comes 400 ms after the first (netd takes milliseconds).
#[test]
fn wait_netd_waits_for_the_end_of_netds_sequence() {
    require_root();
    let tag = tag("boot-seq");
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let netd_maps = NetdMaps::new(&tag, Release::Android13, false);
    let mut wait = WaitNetd::start(&cgroup.path, 20);
    std::thread::sleep(Duration::from_millis(300));
    assert!(wait.running(), "wait-netd returned before netd attached");
    let mut held = Device::Android12To14.hold(&cgroup.path, Some(netd_maps.map(Which::A).fd()));
    std::thread::sleep(Duration::from_millis(400));
    for (attach_type, name) in [
        (10, "netd_sim_conn4"),
        (11, "netd_sim_conn6"),
        (ATTACH_UDP4_RECVMSG, "netd_sim_recv4"),
        (ATTACH_UDP6_RECVMSG, "netd_sim_recv6"),
        (14, "netd_sim_send4"),
        (15, "netd_sim_send6"),
    ] {
        held.push(ExclusiveProgram::attach(
            &cgroup.path,
            PROG_TYPE_CGROUP_SOCK_ADDR,
            attach_type,
            name,
        ));
    }
    let end = wait.end(Duration::from_secs(25));
    assert!(end.status.success(), "{}{}", end.stdout, end.stderr);
    // What it printed is what it saw last: the second half too.
    for hook in [
        "skb_egress",
        "skb_ingress",
        "inet_create",
        "connect4",
        "connect6",
        "recvmsg4",
        "recvmsg6",
        "sendmsg4",
        "sendmsg6",
    ] {
        assert!(
            end.stdout.contains(&format!("\n  {hook} ")),
            "{hook} missing from\n{}",
            end.stdout
        );
    }
}

/// No netd: exit 1 at the timeout with a message that says why egressmon
/// must not be started and how to start it; what is there (half of netd)
/// is named; and exit 2 for an error.
#[test]
fn wait_netd_times_out_without_netd() {
    require_root();
    let tag = tag("boot-timeout");
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let wait_netd = |timeout: &str, cgroup: &Path| {
        let started = Instant::now();
        let out = Command::new(BIN)
            .arg("wait-netd")
            .arg("--cgroup")
            .arg(cgroup)
            .args(["--timeout", timeout])
            .output()
            .expect("run egressmon wait-netd");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stderr, out.stdout, started.elapsed())
    };

    let (code, stderr, stdout, took) = wait_netd("1", &cgroup.path);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stdout.is_empty());
    assert!(
        stderr.starts_with(&format!(
            "egressmon: netd has not attached its programs at {} after 1 s: start egressmon \
             only once netd runs (by hand: `egressmon run`)",
            cgroup.path.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("break networking"), "{stderr}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "{took:?}"
    );

    // Only netd's egress program: still waiting at the timeout, and named.
    let egress = ExclusiveProgram::attach(&cgroup.path, PROG_TYPE_CGROUP_SKB, 1, "netd_sim_egress");
    let (code, stderr, _, _) = wait_netd("1", &cgroup.path);
    assert_eq!(code, Some(1), "{stderr}");
    let id = egress.query().prog_ids[0];
    assert!(
        stderr.contains(&format!(
            "skb_egress   program {id} (netd_sim_egress), exclusive"
        )),
        "{stderr}"
    );
    drop(egress);

    // Errors: exit 2.
    let missing = cgroup.path.join("missing");
    let (code, stderr, _, _) = wait_netd("1", &missing);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("is not a cgroup v2 directory"), "{stderr}");
    let bin = BinForAnyUid::new(&tag);
    let out = Command::new(&bin.path)
        .uid(65534)
        .gid(65534)
        .args(["wait-netd", "--timeout", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("egressmon wait-netd needs root"),
        "{stderr}"
    );
}
