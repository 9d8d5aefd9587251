//! System plumbing for `cargo xtask bench`: bpf(2) calls through the
//! agent's raw bpf(2) layer, egressmon-bpf-sys (load an empty "allow"
//! program, attach it with a cgroup link, list and read the programs on a
//! cgroup with their run-time statistics), and guards that undo every
//! change they make when dropped — the bench's network namespace, cgroup,
//! sysctls and child processes — so a failed or interrupted run leaves the
//! machine as it found it.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

// ---- bpf(2), through the one raw bpf(2) layer (egressmon-bpf-sys) -------------

pub use bpf_sys::ProgStats;

pub const PROG_TYPE_CGROUP_SKB: u32 = bpf_sys::BPF_PROG_TYPE_CGROUP_SKB;
pub const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = bpf_sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR;

/// `enum bpf_attach_type` values of the cgroup hooks the bench looks at.
pub const ATTACH_INGRESS: u32 = 0;
pub const ATTACH_EGRESS: u32 = 1;
pub const ATTACH_SOCK_CREATE: u32 = 2;
pub const ATTACH_CONNECT4: u32 = 10;
pub const ATTACH_CONNECT6: u32 = 11;
pub const ATTACH_SENDMSG4: u32 = 14;
pub const ATTACH_SENDMSG6: u32 = 15;

/// The hooks egressmon attaches (by default connect4/6 and skb egress and
/// ingress; sendmsg4/6 where the skb hooks are held), by attach type, for
/// the per-program table.
pub const MEASURED_ATTACH_TYPES: [u32; 6] = [
    ATTACH_CONNECT4,
    ATTACH_CONNECT6,
    ATTACH_SENDMSG4,
    ATTACH_SENDMSG6,
    ATTACH_EGRESS,
    ATTACH_INGRESS,
];

/// Every hook on the path of the bench's traffic (for spotting programs that
/// someone else attached above the bench cgroup during the run).
pub const PATH_ATTACH_TYPES: [u32; 7] = [
    ATTACH_INGRESS,
    ATTACH_EGRESS,
    ATTACH_SOCK_CREATE,
    ATTACH_CONNECT4,
    ATTACH_CONNECT6,
    ATTACH_SENDMSG4,
    ATTACH_SENDMSG6,
];

/// Loads `r0 = 1; exit` (allow, count nothing): the cost of the hook itself.
pub fn load_allow(prog_type: u32, attach_type: u32, name: &str) -> Result<OwnedFd> {
    bpf_sys::prog_load_allow(prog_type, attach_type, name)
        .with_context(|| format!("BPF_PROG_LOAD of the empty program {name}"))
}

/// BPF_LINK_CREATE on a cgroup. The link is not pinned: closing the returned
/// descriptor (or the process ending) detaches it.
pub fn link_create(prog: &OwnedFd, cgroup: &Path, attach_type: u32) -> Result<OwnedFd> {
    let dir = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
    bpf_sys::link_create(prog.as_fd(), dir.as_fd(), attach_type)
        .with_context(|| format!("BPF_LINK_CREATE (attach type {attach_type})"))
}

/// Program ids attached to `cgroup` for `attach_type`: at the cgroup itself,
/// or (`effective`) every program that runs for it, ancestors included.
pub fn prog_ids(cgroup: &Path, attach_type: u32, effective: bool) -> Result<Vec<u32>> {
    let dir = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
    let query = if effective {
        bpf_sys::prog_query_effective
    } else {
        bpf_sys::prog_query
    };
    match query(dir.as_fd(), attach_type) {
        Ok(attached) => Ok(attached.prog_ids),
        // A kernel without this attach type has nothing attached there.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Vec::new()),
        Err(e) => Err(e).context("BPF_PROG_QUERY"),
    }
}

/// Name, run_time_ns and run_cnt of program `id` (counted while
/// kernel.bpf_stats_enabled is 1).
pub fn prog_stats(id: u32) -> Result<ProgStats> {
    bpf_sys::prog_stats(id).with_context(|| format!("reading program {id}'s statistics"))
}

/// Statistics of every program attached directly at `cgroup` on the hooks
/// egressmon uses, with the hook's attach type.
pub fn cgroup_prog_stats(cgroup: &Path) -> Result<Vec<(u32, ProgStats)>> {
    let mut out = Vec::new();
    for attach_type in MEASURED_ATTACH_TYPES {
        for id in prog_ids(cgroup, attach_type, false)? {
            out.push((attach_type, prog_stats(id)?));
        }
    }
    Ok(out)
}

/// Programs that run for `cgroup` but are not attached at it (someone
/// else's, at an ancestor), as "hook:id" strings.
pub fn foreign_programs(cgroup: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for attach_type in PATH_ATTACH_TYPES {
        let own = prog_ids(cgroup, attach_type, false)?;
        for id in prog_ids(cgroup, attach_type, true)? {
            if !own.contains(&id) {
                let name = prog_stats(id).map(|s| s.name).unwrap_or_default();
                out.push(format!("{}:{id}({name})", hook_name(attach_type)));
            }
        }
    }
    Ok(out)
}

/// A hook's place in tables: MEASURED_ATTACH_TYPES' order.
pub fn hook_rank(hook: &str) -> usize {
    MEASURED_ATTACH_TYPES
        .iter()
        .position(|t| hook_name(*t) == hook)
        .unwrap_or(MEASURED_ATTACH_TYPES.len())
}

pub fn hook_name(attach_type: u32) -> &'static str {
    match attach_type {
        ATTACH_INGRESS => "skb_ingress",
        ATTACH_EGRESS => "skb_egress",
        ATTACH_SOCK_CREATE => "sock_create",
        ATTACH_CONNECT4 => "connect4",
        ATTACH_CONNECT6 => "connect6",
        ATTACH_SENDMSG4 => "sendmsg4",
        ATTACH_SENDMSG6 => "sendmsg6",
        _ => "other",
    }
}

// ---- guards --------------------------------------------------------------------

/// Runs a command quietly; returns whether it succeeded.
pub fn quiet(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a command, failing with its stderr if it fails.
pub fn checked(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("starting {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace with loopback up, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Netns> {
        quiet("ip", &["netns", "del", name]);
        checked("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        checked("ip", &["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !quiet("ip", &["netns", "del", &self.name]) {
            eprintln!("bench: could not delete network namespace {}", self.name);
        }
    }
}

/// A cgroup v2 directory, removed on drop (its processes are all ours and
/// have exited by then).
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn create(path: PathBuf) -> Result<Cgroup> {
        if path.exists() {
            let _ = std::fs::remove_dir(&path);
        }
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Cgroup { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Exiting processes leave the cgroup asynchronously: retry briefly.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("bench: could not remove cgroup {}", self.path.display());
    }
}

/// A sysctl set for the run, restored to its previous value on drop.
pub struct Sysctl {
    path: PathBuf,
    previous: String,
}

impl Sysctl {
    pub fn set(name: &str, value: &str) -> Result<Sysctl> {
        let path = PathBuf::from("/proc/sys").join(name.replace('.', "/"));
        let previous = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_string();
        std::fs::write(&path, value).with_context(|| format!("writing {}", path.display()))?;
        Ok(Sysctl { path, previous })
    }

    pub fn current(&self) -> String {
        std::fs::read_to_string(&self.path)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    pub fn previous(&self) -> &str {
        &self.previous
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, &self.previous) {
            eprintln!(
                "bench: could not restore {} to {}: {e}",
                self.path.display(),
                self.previous
            );
        }
    }
}

/// This process's CPU affinity, restored on drop.
pub struct Affinity {
    saved: libc::cpu_set_t,
}

impl Affinity {
    /// Keeps this process (the orchestrator and its scraper) off `cpus_off`.
    pub fn avoid(cpu: usize) -> Result<Affinity> {
        // SAFETY: sched_getaffinity/setaffinity on this process with a
        // properly sized cpu_set_t.
        let mut saved: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        unsafe {
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut saved) != 0 {
                return Err(io::Error::last_os_error()).context("sched_getaffinity");
            }
            let mut others = saved;
            libc::CPU_CLR(cpu, &mut others);
            if libc::CPU_COUNT(&others) > 0 {
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &others);
            }
        }
        Ok(Affinity { saved })
    }
}

impl Drop for Affinity {
    fn drop(&mut self) {
        // SAFETY: restoring the set read in `avoid`.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.saved);
        }
    }
}

// ---- processes -------------------------------------------------------------------

/// Where a spawned process runs: network namespace, cgroup, CPU.
#[derive(Default, Clone)]
pub struct Placement {
    pub netns: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    pub cpu: Option<usize>,
}

impl Placement {
    /// Applies the placement to `cmd` in the child between fork and exec.
    pub fn apply(&self, cmd: &mut Command) -> Result<()> {
        let netns = match &self.netns {
            Some(p) => Some(File::open(p).with_context(|| format!("opening {}", p.display()))?),
            None => None,
        };
        let procs = match &self.cgroup {
            Some(c) => Some(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(c.join("cgroup.procs"))
                    .with_context(|| format!("opening {}/cgroup.procs", c.display()))?,
            ),
            None => None,
        };
        let cpu = self.cpu;
        // SAFETY: only async-signal-safe syscalls between fork and exec, on
        // descriptors opened (close-on-exec) by the parent.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(f) = &procs {
                    // "0" moves the writing process itself.
                    if libc::write(f.as_raw_fd(), b"0".as_ptr() as *const libc::c_void, 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if let Some(f) = &netns {
                    if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if let Some(cpu) = cpu {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok(())
    }
}

/// A child process we started: SIGTERM, then SIGKILL, by pid, and reaped
/// on drop unless already reaped.
pub struct Proc {
    pub child: Child,
    reaped: bool,
}

impl Proc {
    pub fn new(child: Child) -> Proc {
        Proc {
            child,
            reaped: false,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Whether it has exited (reaps it if so).
    pub fn exited(&mut self) -> bool {
        if self.reaped {
            return true;
        }
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            self.reaped = true;
        }
        self.reaped
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; reaps it.
    pub fn stop(&mut self, grace: Duration) {
        if self.exited() {
            return;
        }
        // SAFETY: signalling our own child by pid (not yet reaped).
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// How a finished process went.
pub struct Finished {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
    /// Wall time from spawn to exit.
    pub wall: Duration,
    /// User + system CPU time of the process (and its waited-for children).
    pub cpu: Duration,
}

fn read_all(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Set by SIGINT/SIGTERM: the bench stops between steps and cleans up.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches SIGINT and SIGTERM so that the guards run instead of the process
/// dying with programs, rules and sysctls left behind.
pub fn catch_signals() {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs `cmd` to completion (killed after `timeout`), measuring its wall
/// time and, through wait4, its CPU time.
pub fn run_measured(mut cmd: Command, name: &str, timeout: Duration) -> Result<Finished> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let out = read_all(child.stdout.take().expect("piped"));
    let err = read_all(child.stderr.take().expect("piped"));
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut killed = false;
    loop {
        // SAFETY: wait4 on our own child; fills status and usage.
        let ret = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if ret == pid {
            break;
        }
        if ret < 0 {
            return Err(io::Error::last_os_error()).context("wait4");
        }
        if (start.elapsed() > timeout || INTERRUPTED.load(Ordering::SeqCst)) && !killed {
            // SAFETY: our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let wall = start.elapsed();
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    // `child` is reaped already: dropping it does not wait or signal.
    drop(child);
    check_interrupted()?;
    if killed {
        bail!("{name} did not finish within {timeout:?}: killed; stderr: {stderr}");
    }
    Ok(Finished {
        success: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        stdout,
        stderr,
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
    })
}

// ---- /proc -------------------------------------------------------------------------

/// utime + stime of a process (all its threads), in clock ticks.
pub fn proc_cpu_ticks(pid: i32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_stat_ticks(&stat).context("parsing /proc/PID/stat")
}

/// Fields 14 and 15 (utime, stime) of /proc/PID/stat; the command name in
/// parentheses may contain spaces, so fields are counted after the last ')'.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 -> index 11.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Peak resident set size (VmHWM) of a process, in bytes.
pub fn proc_hwm_bytes(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .context("no VmHWM in /proc/PID/status")
}

/// Busy and total jiffies per CPU from /proc/stat.
pub fn cpu_times() -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_skip_the_command_name() {
        let stat = "1234 (egress mon) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0";
        assert_eq!(parse_stat_ticks(stat), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }
}
