//! Test fixtures that need root and the real kernel: a cgroup, a client and a
//! server network namespace joined by a veth pair, a traffic sink, an agent,
//! and a packet capture for independent packet and byte counts (see net.rs).
//! No external tool is needed, so the same tests run inside a minimal VM
//! guest (`cargo xtask vm-test`). Everything made here is removed in `Drop`,
//! also when the test fails.
#![allow(dead_code)]

pub mod net;
pub mod netd;
pub mod netd_maps;
pub mod pins;

#[allow(unused_imports)]
pub use net::{Capture, NetPair, CLIENT4, CLIENT6, SERVER4, SERVER6};

use egressmon::pipeline::flows::FlowRecord;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `egressmon` binary under test: `$EGRESSMON_BIN` when set (the VM
/// guest sets it), otherwise the one cargo built with these tests. Use it as
/// a path or a string: `Command::new(BIN)`, `format!("{BIN}")`, `&*BIN`.
pub const BIN: Bin = Bin::Agent;

/// The test traffic generator and sink, `egressmon-gen` (a binary of the
/// monitor package that is not shipped): `$EGRESSMON_GEN_BIN` when set (the
/// VM guest and `cargo xtask test` set it), otherwise the one cargo built
/// with these tests. Used like [`BIN`].
pub const GEN: Bin = Bin::Gen;

#[derive(Clone, Copy, Debug)]
pub enum Bin {
    Agent,
    Gen,
}

impl Bin {
    pub fn path(&self) -> &'static str {
        static AGENT_PATH: OnceLock<String> = OnceLock::new();
        static GEN_PATH: OnceLock<String> = OnceLock::new();
        match self {
            Bin::Agent => AGENT_PATH.get_or_init(|| {
                std::env::var("EGRESSMON_BIN")
                    .unwrap_or_else(|_| env!("CARGO_BIN_EXE_egressmon").to_string())
            }),
            Bin::Gen => GEN_PATH.get_or_init(|| {
                std::env::var("EGRESSMON_GEN_BIN")
                    .unwrap_or_else(|_| env!("CARGO_BIN_EXE_egressmon-gen").to_string())
            }),
        }
    }
}

impl std::ops::Deref for Bin {
    type Target = str;
    fn deref(&self) -> &str {
        self.path()
    }
}

impl AsRef<OsStr> for Bin {
    fn as_ref(&self) -> &OsStr {
        OsStr::new(self.path())
    }
}

impl AsRef<Path> for Bin {
    fn as_ref(&self) -> &Path {
        Path::new(self.path())
    }
}

impl std::fmt::Display for Bin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.path())
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

pub fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "kernel tests need root: run them with `cargo xtask test` as root"
    );
}

pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn cgroup2_root() -> PathBuf {
    egressmon::bpf::system::cgroup2_root().expect("cgroup2 mounted")
}

/// A cgroup made for one test, removed on drop (after its processes exit).
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(parent: &Path, name: &str) -> TestCgroup {
        let path = parent.join(name);
        std::fs::create_dir_all(&path).expect("mkdir cgroup");
        TestCgroup { path }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}

/// A child process killed (by pid, it is ours) and reaped on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `egressmon-gen serve` in the server namespace.
pub fn start_sink(net: &NetPair, tcp: &[SocketAddr], udp: &[SocketAddr]) -> Proc {
    start_dns_sink(net, None, &[], tcp, udp)
}

/// `egressmon-gen serve` in the server namespace, also answering DNS on
/// `dns` with every name in `zone` pointing at the server.
pub fn start_dns_sink(
    net: &NetPair,
    dns: Option<&str>,
    zone: &[&str],
    tcp: &[SocketAddr],
    udp: &[SocketAddr],
) -> Proc {
    let mut cmd = Command::new(GEN);
    cmd.args(["--netns", &NetPair::path(&net.server), "serve"]);
    if let Some(dns) = dns {
        cmd.args(["--dns", dns]);
    }
    for name in zone {
        cmd.arg(format!("--zone={name}={}", net::SERVER4));
    }
    for a in tcp {
        cmd.args(["--tcp", &a.to_string()]);
    }
    for a in udp {
        cmd.args(["--udp", &a.to_string()]);
    }
    serving(cmd, "sink")
}

/// A listener in the server namespace that never accepts, with a backlog of
/// 0: one connection fills its queue, later SYNs go unanswered.
pub fn start_stalled_listener(net: &NetPair, at: SocketAddr) -> Proc {
    let mut cmd = Command::new(GEN);
    cmd.args(["--netns", &NetPair::path(&net.server), "serve"])
        .args(["--tcp-stalled", &at.to_string()]);
    serving(cmd, "stalled listener")
}

/// `egressmon-gen serve ARGS` in network namespace `ns` (a name), e.g. on
/// the client namespace's own loopback.
pub fn start_serve_in(ns: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(GEN);
    cmd.args(["--netns", &NetPair::path(ns), "serve"])
        .args(args);
    serving(cmd, "server")
}

/// `egressmon-gen serve ARGS` as `uid` in the test cgroup and the client
/// namespace: a socket of that uid that receives without having sent.
pub fn start_serve_as(net: &NetPair, cgroup: &Path, uid: u32, args: &[&str]) -> Proc {
    let mut cmd = Command::new(GEN);
    cmd.args(["--netns", &NetPair::path(&net.client), "--cgroup"])
        .arg(cgroup)
        .args(["--uid", &uid.to_string(), "serve"])
        .args(args);
    serving(cmd, "server")
}

/// Starts `egressmon-gen serve` and waits for its "ready" line.
fn serving(mut cmd: Command, what: &str) -> Proc {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "{what} did not start");
    Proc(child)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `egressmon run` on a test cgroup with its own pins and port,
/// in the test's own network namespace or in one the test made (then every
/// `egressmon` command aimed at it runs in that namespace too).
pub struct AgentProc {
    pub pin_dir: PathBuf,
    pub listen: String,
    pub proc: Option<Proc>,
    pub netns: Option<String>,
    /// Environment for the agent process.
    pub env: Vec<(String, String)>,
}

/// Makes `cmd` enter the network namespace at `ns` before it runs.
pub fn command_in_netns(cmd: &mut Command, ns: Option<&str>) {
    let Some(ns) = ns else { return };
    let file = std::fs::File::open(ns).unwrap_or_else(|e| panic!("opening {ns}: {e}"));
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = file.as_raw_fd();
    // SAFETY: only async-signal-safe calls (setns) between fork and exec;
    // `file` stays open in the parent until the command is spawned.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &file;
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl AgentProc {
    pub fn start(cgroup: &Path, tag: &str, extra: &[&str]) -> AgentProc {
        AgentProc::start_in(None, &[], cgroup, tag, extra)
    }

    /// Starts the agent in network namespace `netns` (a path), with `env`.
    pub fn start_in(
        netns: Option<&str>,
        env: &[(&str, &str)],
        cgroup: &Path,
        tag: &str,
        extra: &[&str],
    ) -> AgentProc {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{tag}"));
        let listen = format!("127.0.0.1:{}", free_port());
        let mut agent = AgentProc {
            pin_dir,
            listen,
            proc: None,
            netns: netns.map(str::to_string),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        agent.spawn(cgroup, extra);
        agent
    }

    /// An `egressmon` command aimed at this agent's namespace, with the
    /// agent's environment (`EGRESSMON_RUN_DIR` among it, if set).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        command_in_netns(&mut cmd, self.netns.as_deref());
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }

    /// The agent's run directory: `EGRESSMON_RUN_DIR` of its environment,
    /// else the default.
    pub fn run_dir(&self) -> PathBuf {
        self.env
            .iter()
            .find(|(k, _)| k == "EGRESSMON_RUN_DIR")
            .map_or_else(
                || PathBuf::from("/run/egressmon"),
                |(_, v)| PathBuf::from(v),
            )
    }

    /// The agent's control socket.
    pub fn endpoint(&self) -> egressmon::cli::client::Endpoint {
        egressmon::cli::client::Endpoint::new(&self.run_dir(), self.listen.parse().unwrap())
    }

    /// GET `path` from the agent's control socket.
    pub fn get(&self, path: &str) -> String {
        let fetch = || self.endpoint().get(path).unwrap();
        match &self.netns {
            Some(ns) => net::in_netns(Path::new(ns), fetch),
            None => fetch(),
        }
    }

    pub fn spawn(&mut self, cgroup: &Path, extra: &[&str]) {
        let child = self
            .command()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args(["run", "--cgroup"])
            .arg(cgroup)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(["--listen", &self.listen])
            .args(extra)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("spawn agent");
        self.proc = Some(Proc(child));
        // Loading and verifying the programs takes seconds under emulation
        // (the arm64 guests on an x86 machine), more on a busy machine.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(out) = self
                .command()
                .args(["status", "--json", "--listen", &self.listen])
                .output()
            {
                if out.status.success() {
                    return;
                }
            }
            if let Some(status) = self.proc.as_mut().unwrap().0.try_wait().unwrap() {
                panic!("agent exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "agent did not answer on {}",
                self.listen
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = self
            .command()
            .args(args)
            .args(["--listen", &self.listen])
            .output()
            .expect("run egressmon");
        assert!(
            out.status.success(),
            "egressmon {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn flows(&self) -> Vec<FlowRecord> {
        serde_json::from_str(&self.cli(&["flows", "--json"])).expect("flows --json parses")
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.cli(&["status", "--json"])).expect("status --json parses")
    }

    pub fn detach(&mut self) -> String {
        let out = self
            .command()
            .args(["detach", "--pin-dir"])
            .arg(&self.pin_dir)
            .args(["--listen", &self.listen])
            .output()
            .expect("run detach");
        assert!(
            out.status.success(),
            "detach: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(mut p) = self.proc.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while p.0.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Kills the agent without detaching (its pins keep counting).
    pub fn kill(&mut self) {
        self.proc.take();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self
            .command()
            .args(["detach", "--pin-dir"])
            .arg(&self.pin_dir)
            .args(["--listen", &self.listen])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.proc.take();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// GET `path` over plain HTTP/1.0 from `addr` (the agent's /metrics, a
/// Prometheus API): the body of a 200 answer.
pub fn http_get(addr: &str, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("{addr}{path}: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    match head.split_whitespace().nth(1) {
        Some("200") => Ok(body.to_string()),
        _ => Err(format!("{addr}{path}: {head}")),
    }
}

/// A unique tag for one test's objects (netns, cgroup, pins).
pub fn tag(name: &str) -> String {
    format!(
        "egm-{name}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `egressmon-gen` as `uid` inside the test cgroup and client netns.
pub fn gen(net: &NetPair, cgroup: &Path, uid: u32, args: &[&str]) -> u32 {
    let child = Command::new(GEN)
        .args(["--netns", &NetPair::path(&net.client), "--cgroup"])
        .arg(cgroup)
        .args(["--uid", &uid.to_string()])
        .args(args)
        .spawn()
        .expect("spawn gen");
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "gen {args:?} as uid {uid} failed");
    pid
}

/// Runs `egressmon-gen ARGS` as `uid` in the cgroup and client namespace,
/// without asserting success (a refused connect is the point).
pub fn try_gen(net: &NetPair, cgroup: &Path, uid: u32, args: &[&str]) -> std::process::Output {
    Command::new(GEN)
        .args(["--netns", &NetPair::path(&net.client), "--cgroup"])
        .arg(cgroup)
        .args(["--uid", &uid.to_string()])
        .args(args)
        .output()
        .expect("spawn gen")
}

/// The run failed with EPERM (a block rule refused it).
pub fn assert_refused(out: &std::process::Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && (err.contains("os error 1)") || err.contains("Operation not permitted")),
        "{what}: expected EPERM, got {:?}: {err}",
        out.status
    );
}

pub fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One flow from the table, by uid, protocol, destination and port.
pub fn find<'a>(
    flows: &'a [FlowRecord],
    uid: u32,
    proto: &str,
    dst: &str,
    port: u16,
) -> &'a FlowRecord {
    flows
        .iter()
        .find(|f| f.uid == uid && f.proto == proto && f.dst == dst && f.port == port)
        .unwrap_or_else(|| panic!("no flow uid={uid} {proto} {dst}:{port} in {flows:#?}"))
}

/// Polls `check` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}

/// Sum of a metric's samples in a Prometheus text exposition, over the
/// series whose label text contains every filter.
pub fn metric_sum(text: &str, name: &str, filters: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

/// Copies a directory tree (test fixtures into a scratch directory).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A copy of the binary under test that any uid can run, for tests that
/// drop privileges before exec: the checkout, and the `target/` in it, may
/// sit in a directory only root can enter (a clone in /root or in
/// `mktemp -d`). The copy lives in a fresh 0755 directory under /tmp (not
/// `$TMPDIR`, which may be private too) and is removed on drop.
pub struct BinForAnyUid {
    dir: PathBuf,
    pub path: PathBuf,
    /// The same for `egressmon-gen` ([`GEN`]).
    pub gen: PathBuf,
}

impl BinForAnyUid {
    pub fn new(tag: &str) -> BinForAnyUid {
        use std::os::unix::fs::PermissionsExt;
        let dir = Path::new("/tmp").join(format!("{tag}-bin"));
        // create_dir fails on anything already there, a symlink included.
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let copy = BinForAnyUid {
            path: dir.join("egressmon"),
            gen: dir.join("egressmon-gen"),
            dir,
        };
        std::fs::set_permissions(&copy.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for (from, to) in [(BIN, &copy.path), (GEN, &copy.gen)] {
            std::fs::copy(from, to).unwrap_or_else(|e| panic!("copying {from}: {e}"));
            std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        copy
    }
}

impl Drop for BinForAnyUid {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes a scratch directory on drop.
pub struct Scratch(pub PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The Android 14 device layout among the tests' fixtures.
pub fn android14() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/android/android14")
}

/// The tests' GeoIP data: the test host (10.200.0.0/24) in China, what
/// lies below 10.0.0.0 in the US.
pub const TEST_COUNTRIES: &str = "10.200.0.0,10.200.0.255,CN\n0.0.0.0,9.255.255.255,US\n";

/// The JSON lines of a file: none while it is missing, and a line being
/// written (not whole yet) is skipped.
pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// What a test playing a phone needs: a network pair and a cgroup of its
/// own, and a scratch directory holding a copy of the Android 14 layout
/// (`device()`) and [`TEST_COUNTRIES`] (`geoip()`). All of it goes on
/// drop, which should come after the agent's: as a local, declare it
/// before the agent; as a field, after it.
pub struct TestDevice {
    pub tag: String,
    pub net: NetPair,
    pub cgroup: TestCgroup,
    pub dir: PathBuf,
    _scratch: Scratch,
}

impl TestDevice {
    /// Everything named after `tag` (see [`tag`]).
    pub fn new(tag: &str) -> TestDevice {
        require_root();
        let dir = std::env::temp_dir().join(tag);
        let scratch = Scratch(dir.clone());
        copy_tree(&android14(), &dir.join("device"));
        std::fs::write(dir.join("countries.csv"), TEST_COUNTRIES).unwrap();
        TestDevice {
            tag: tag.to_string(),
            net: NetPair::new(tag),
            cgroup: TestCgroup::new(&cgroup2_root(), tag),
            dir,
            _scratch: scratch,
        }
    }

    /// The copy of the device layout (`--android-root`).
    pub fn device(&self) -> PathBuf {
        self.dir.join("device")
    }

    /// The GeoIP file (`--geoip`).
    pub fn geoip(&self) -> PathBuf {
        self.dir.join("countries.csv")
    }
}
