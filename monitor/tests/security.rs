//! Who may see what (README "Security"): as unprivileged uids, nothing the
//! agent exposes reveals a destination or stops it; root's CLI, uids the
//! operator allows and Prometheus keep working; a foreign `Host` is refused;
//! a flood of idle and slow connections does not lock anyone out.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

/// A destination only the agent's flow table knows of.
const SECRET_DST: &str = "127.0.0.93";

/// What one request as `uid` got: HTTP status (0: no answer) and body.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

/// curl as `uid`, to a TCP address or through a unix socket.
fn curl_as(uid: u32, args: &[&str]) -> Answer {
    let out = Command::new("curl")
        .uid(uid)
        .gid(uid)
        .args(["-s", "-m", "5", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    Answer {
        status: status.trim().parse().unwrap_or(0),
        body: body.to_string(),
    }
}

fn egressmon_as(bin: &BinForAnyUid, uid: u32, args: &[&str]) -> std::process::Output {
    Command::new(&bin.path)
        .uid(uid)
        .gid(uid)
        .args(args)
        .output()
        .expect("run egressmon")
}

/// Socket inodes the process holds open.
fn socket_inodes(pid: u32) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// Every endpoint the agent listens on: TCP addresses and unix paths, found
/// from its open sockets, not from what it was told.
fn listening_endpoints(pid: u32) -> (Vec<SocketAddr>, Vec<PathBuf>) {
    let inodes = socket_inodes(pid);
    let mut tcp = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        for line in std::fs::read_to_string(file).unwrap().lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let inode: u64 = f[9].parse().unwrap();
            if f[3] == "0A" && inodes.contains(&inode) {
                tcp.push(parse_proc_addr(f[1], v6));
            }
        }
    }
    let mut unix = Vec::new();
    for line in std::fs::read_to_string("/proc/net/unix")
        .unwrap()
        .lines()
        .skip(1)
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Flags 00010000: __SO_ACCEPTCON, a listening socket.
        if f.len() >= 8 && f[3] == "00010000" && inodes.contains(&f[6].parse().unwrap()) {
            unix.push(PathBuf::from(f[7]));
        }
    }
    (tcp, unix)
}

fn parse_proc_addr(field: &str, v6: bool) -> SocketAddr {
    let (ip, port) = field.split_once(':').unwrap();
    let port = u16::from_str_radix(port, 16).unwrap();
    let bytes: Vec<u8> = (0..ip.len() / 2)
        .map(|i| u8::from_str_radix(&ip[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    // /proc prints each 32-bit word in host order.
    let words: Vec<[u8; 4]> = bytes
        .chunks(4)
        .map(|w| {
            u32::from_be_bytes(w.try_into().unwrap())
                .swap_bytes()
                .to_be_bytes()
        })
        .collect();
    let flat: Vec<u8> = words.concat();
    let ip: std::net::IpAddr = if v6 {
        <[u8; 16]>::try_from(flat.as_slice()).unwrap().into()
    } else {
        <[u8; 4]>::try_from(flat.as_slice()).unwrap().into()
    };
    SocketAddr::new(ip, port)
}

/// Makes a flow whose destination only the agent can tell.
fn secret_flow(cgroup: &Path) {
    let out = Command::new(GEN)
        .args(["--cgroup"])
        .arg(cgroup)
        .args(["--uid", "1000", "udp-sendto", "--dst"])
        .arg(format!("{SECRET_DST}:4242"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn agent_pid(agent: &AgentProc) -> u32 {
    agent.proc.as_ref().unwrap().0.id()
}

fn still_running(agent: &AgentProc) {
    assert!(
        egressmon::identity::process::alive(agent_pid(agent)),
        "the agent must keep running"
    );
    let flows = agent.flows();
    assert!(
        flows.iter().any(|f| f.dst == SECRET_DST),
        "root still reads the flows"
    );
}

#[test]
fn unprivileged_uids_neither_read_nor_stop_the_agent() {
    require_root();
    let tag = tag("unpriv");
    let bin = BinForAnyUid::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let agent = AgentProc::start(&cgroup.path, &tag, &[]);
    secret_flow(&cgroup.path);
    assert!(eventually(Duration::from_secs(5), || agent
        .flows()
        .iter()
        .any(|f| f.dst == SECRET_DST)));
    let (tcp, unix) = listening_endpoints(agent_pid(&agent));
    assert_eq!(tcp.len(), 1, "one TCP listener (/metrics): {tcp:?}");
    assert_eq!(unix.len(), 1, "one control socket: {unix:?}");
    assert_eq!(unix[0], agent.endpoint().socket);
    let run_dir = unix[0].parent().unwrap();
    assert_eq!(mode(run_dir), 0o700, "run directory: root only");
    assert_eq!(mode(&unix[0]), 0o600, "control socket: root only");
    for uid in [10123, 65534] {
        for addr in &tcp {
            let base = format!("http://{addr}");
            for path in ["/flows", "/status", "/flows?limit=1", "/", "/shutdown"] {
                let got = curl_as(uid, &[&format!("{base}{path}")]);
                assert_ne!(got.status, 200, "GET {path} as {uid}: {got:?}");
                assert!(!got.body.contains(SECRET_DST), "{path} as {uid}: {got:?}");
            }
            let stop = curl_as(uid, &["-X", "POST", &format!("{base}/shutdown")]);
            assert_eq!(stop.status, 403, "POST /shutdown as {uid}: {stop:?}");
            // Linux default: anyone may scrape, and it names no destination.
            let metrics = curl_as(uid, &[&format!("{base}/metrics")]);
            assert_eq!(metrics.status, 200, "{metrics:?}");
            assert!(metrics.body.contains("egressmon_tx_bytes_total"));
            assert!(!metrics.body.contains(SECRET_DST));
        }
        let socket = unix[0].to_str().unwrap();
        for (method, path) in [("GET", "/flows"), ("GET", "/status"), ("POST", "/shutdown")] {
            let got = curl_as(
                uid,
                &[
                    "--unix-socket",
                    socket,
                    "-X",
                    method,
                    &format!("http://x{path}"),
                ],
            );
            assert_eq!(
                got.status, 0,
                "{method} {path} as {uid} over the socket: {got:?}"
            );
        }
        let cli = egressmon_as(&bin, uid, &["flows", "--json", "--listen", &agent.listen]);
        let err = String::from_utf8_lossy(&cli.stderr);
        assert!(!cli.status.success() && err.contains("root"), "{err}");
        let detach = egressmon_as(&bin, uid, &["detach", "--listen", &agent.listen]);
        assert!(!detach.status.success());
        still_running(&agent);
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn allowed_uids_use_the_control_socket_others_are_refused_by_peer_credentials() {
    require_root();
    let tag = tag("allowuid");
    let bin = BinForAnyUid::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    // A run directory of its own: its mode changes with the allowed uids.
    let run_dir = std::path::Path::new("/run").join(&tag);
    let _cleanup = Scratch(run_dir.clone());
    let env = [("EGRESSMON_RUN_DIR", run_dir.to_str().unwrap())];
    let agent = AgentProc::start_in(None, &env, &cgroup.path, &tag, &["--api-allow-uid", "2000"]);
    let socket = agent.endpoint().socket;
    assert_eq!(socket.parent().unwrap(), run_dir);
    secret_flow(&cgroup.path);
    assert_eq!(
        mode(&run_dir),
        0o711,
        "others may reach the socket by name only"
    );
    assert_eq!(mode(&socket), 0o666, "SO_PEERCRED decides");
    let run_dir_arg = run_dir.to_str().unwrap();
    let as_shell = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--listen", &agent.listen, "--run-dir", run_dir_arg]);
        egressmon_as(&bin, 2000, &all)
    };
    let status = as_shell(&["status", "--json"]);
    assert!(status.status.success(), "{status:?}");
    let flows = as_shell(&["flows", "--json"]);
    assert!(String::from_utf8_lossy(&flows.stdout).contains(SECRET_DST));
    let socket = socket.to_str().unwrap();
    let refused = curl_as(10123, &["--unix-socket", socket, "http://x/flows"]);
    assert_eq!(refused.status, 403, "{refused:?}");
    assert!(refused.body.contains("--api-allow-uid"), "{refused:?}");
    assert!(!refused.body.contains(SECRET_DST));
    let stop = curl_as(
        10123,
        &["--unix-socket", socket, "-X", "POST", "http://x/shutdown"],
    );
    assert_eq!(stop.status, 403);
    // An allowed uid reads flows but never changes blocks.
    let rule = "[[rule]]\nname = \"x\"\naction = \"block\"\nmode = \"enforce\"\nuid = 10123\n";
    let block = curl_as(
        2000,
        &[
            "--unix-socket",
            socket,
            "-X",
            "POST",
            "--data-binary",
            rule,
            "http://x/block",
        ],
    );
    assert_eq!(block.status, 403, "{block:?}");
    assert!(block.body.contains("only root"), "{block:?}");
    let unblock = curl_as(
        2000,
        &[
            "--unix-socket",
            socket,
            "-X",
            "POST",
            "http://x/unblock?all",
        ],
    );
    assert_eq!(unblock.status, 403, "{unblock:?}");
    assert_eq!(agent.status()["blocks"], serde_json::json!([]));
    still_running(&agent);
    let out = agent
        .command()
        .args(["detach", "--pin-dir"])
        .arg(&agent.pin_dir)
        .args(["--listen", &agent.listen])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("stopped agent pid"), "{text}");
}

#[test]
fn on_an_android_layout_only_root_and_shell_may_scrape() {
    require_root();
    let tag = tag("androidscrape");
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/android/android14"
    );
    let agent = AgentProc::start(&cgroup.path, &tag, &["--android-root", fixture]);
    let url = format!("http://{}/metrics", agent.listen);
    let app = curl_as(10123, &[&url]);
    assert_eq!(
        app.status, 0,
        "an app's connection is closed unanswered: {app:?}"
    );
    let shell = curl_as(2000, &[&url]);
    assert_eq!(shell.status, 200, "adb forward (shell) scrapes: {shell:?}");
    let root = curl_as(0, &[&url]);
    assert_eq!(root.status, 200);
    assert!(egressmon::identity::process::alive(agent_pid(&agent)));
}

#[test]
fn a_foreign_host_header_is_refused() {
    require_root();
    let tag = tag("rebind");
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let agent = AgentProc::start(&cgroup.path, &tag, &[]);
    let url = format!("http://{}/metrics", agent.listen);
    let rebound = curl_as(0, &["-H", "Host: rebind.attacker.example", &url]);
    assert_eq!(rebound.status, 421, "{rebound:?}");
    let by_ip = curl_as(0, &[&url]);
    assert_eq!(by_ip.status, 200);
    let port = agent.listen.rsplit_once(':').unwrap().1;
    let by_name = curl_as(0, &[&format!("http://localhost:{port}/metrics")]);
    assert_eq!(by_name.status, 200);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max.min(65536);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

#[test]
fn idle_and_slowloris_floods_do_not_lock_out_root_or_prometheus() {
    require_root();
    raise_fd_limit();
    let tag = tag("flood");
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let agent = AgentProc::start(&cgroup.path, &tag, &[]);
    let pid = agent_pid(&agent);
    let listen: SocketAddr = agent.listen.parse().unwrap();
    let before = rss_kib(pid);
    let idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(listen).unwrap())
        .collect();
    let idle_control: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&agent.endpoint().socket).unwrap())
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut conns: Vec<TcpStream> = (0..100)
                .map(|_| TcpStream::connect(listen).unwrap())
                .collect();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (i, c) in conns.iter_mut().enumerate() {
                    let piece: &[u8] = if n == 0 {
                        b"GET /metrics HTTP/1.1\r\n"
                    } else {
                        b"X-a: b\r\n"
                    };
                    if c.write_all(piece).is_err() {
                        // Closed by the agent: come back, as a slowloris does.
                        if let Ok(again) = TcpStream::connect(listen) {
                            *c = again;
                        }
                    }
                    let _ = i;
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let mut worst = BTreeMap::new();
    for round in 0..5 {
        let started = Instant::now();
        let status = agent.status();
        assert!(status["pid"].as_u64().is_some());
        let status_time = started.elapsed();
        let started = Instant::now();
        let scrape = curl_as(0, &[&format!("http://{listen}/metrics")]);
        let scrape_time = started.elapsed();
        assert_eq!(scrape.status, 200, "round {round}: {scrape:?}");
        for (what, took) in [("status", status_time), ("scrape", scrape_time)] {
            assert!(
                took < Duration::from_secs(2),
                "{what} took {took:?} under the flood"
            );
            let w = worst.entry(what).or_insert(Duration::ZERO);
            *w = (*w).max(took);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let during = rss_kib(pid);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    slow.join().unwrap();
    drop(idle);
    drop(idle_control);
    eprintln!(
        "flood: worst status {:?}, worst scrape {:?}, agent RSS {before} KiB before, {during} KiB during",
        worst["status"], worst["scrape"]
    );
    assert!(
        during < before + 32 * 1024,
        "RSS grew from {before} to {during} KiB under the flood"
    );
    assert!(egressmon::identity::process::alive(pid));
}

#[test]
fn files_and_defaults_are_root_only() {
    require_root();
    let tag = tag("defaults");
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let dir = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = Scratch(dir.clone());
    let log = dir.join("flows.jsonl");
    let agent = AgentProc::start(&cgroup.path, &tag, &["--log", log.to_str().unwrap()]);
    assert_eq!(mode(&agent.pin_dir), 0o700, "pins: root only");
    assert_eq!(mode(&log), 0o600, "log: root only");
    let help = Command::new(BIN).args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("127.0.0.1:9864"),
        "default listen is loopback"
    );
    assert!(help.contains("--api-allow-uid") && help.contains("--metrics-allow-uid"));
}

/// A self-signed P-256 certificate for 127.0.0.1, written into `dir`.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("agent.crt"), dir.join("agent.key"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=egressmon"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "{out:?}");
    (cert, key)
}

#[test]
fn metrics_over_tls_with_basic_auth_from_a_web_config() {
    require_root();
    let tag = tag("webtls");
    let dir = Path::new("/tmp").join(&tag);
    std::fs::create_dir(&dir).unwrap();
    let _cleanup = Scratch(dir.clone());
    let (cert, _) = self_signed(&dir);
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let config = dir.join("web.yml");
    std::fs::write(
        &config,
        format!(
            "tls_server_config:\n  cert_file: agent.crt\n  key_file: agent.key\n\
             basic_auth_users:\n  prometheus: '{hash}'\n"
        ),
    )
    .unwrap();
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let agent = AgentProc::start(
        &cgroup.path,
        &tag,
        &["--web-config-file", config.to_str().unwrap()],
    );
    let url = format!("https://{}/metrics", agent.listen);
    let cacert = cert.to_str().unwrap();
    let anonymous = curl_as(0, &["--cacert", cacert, &url]);
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    let wrong = curl_as(0, &["--cacert", cacert, "-u", "prometheus:guess", &url]);
    assert_eq!(wrong.status, 401, "{wrong:?}");
    let scraper = curl_as(0, &["--cacert", cacert, "-u", "prometheus:s3cret", &url]);
    assert_eq!(scraper.status, 200, "{scraper:?}");
    assert!(scraper.body.contains("egressmon_build_info"), "{scraper:?}");
    let plain = curl_as(0, &[&format!("http://{}/metrics", agent.listen)]);
    assert_ne!(plain.status, 200, "no cleartext answer: {plain:?}");
    // A bad config is refused at start, before anything is attached.
    let bad = dir.join("bad.yml");
    std::fs::write(
        &bad,
        "tls_server_config:\n  cert_file: missing.crt\n  key_file: agent.key\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "run",
            "--web-config-file",
            bad.to_str().unwrap(),
            "--pin-dir",
        ])
        .arg(format!("/sys/fs/bpf/{tag}-bad"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cert_file missing.crt"),
        "{err}"
    );
    assert!(!Path::new(&format!("/sys/fs/bpf/{tag}-bad")).exists());
}
