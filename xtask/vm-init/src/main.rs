//! `/init` of the kernel CI guest that `cargo xtask vm-test` boots: mounts
//! proc, sys, devtmpfs, cgroup2 and bpffs, loads the kernel modules shipped
//! in the initramfs (/lib/modules, in name order), brings loopback up, runs
//! every kernel test of /bin/kernel-tests one by one and powers the VM off.
//!
//! It speaks to the host through the serial console, one marker per line:
//! `EGRESSMON-BOOT <release>`, `EGRESSMON-MODULE <file> loaded|<error>`,
//! `EGRESSMON-TESTS <count>`, `EGRESSMON-TEST-START <name>`,
//! `EGRESSMON-TEST <name> ok|FAILED|TIMEOUT <seconds>` and finally
//! `EGRESSMON-DONE passed=<n> failed=<n>`. A missing DONE means the guest
//! died (panic, hang): the host treats it as a failure.
//!
//! `egm.filter=A,B` on the kernel command line runs only the tests whose
//! names contain A or B. Static, std + libc only.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const TESTS: &str = "/bin/kernel-tests";
const AGENT: &str = "/bin/egressmon";
/// The tests' traffic generator and sink.
const GEN: &str = "/bin/egressmon-gen";
const MODULES: &str = "/lib/modules";
/// One test may take this long under software emulation before it is killed.
const TEST_TIMEOUT: Duration = Duration::from_secs(1200);
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A leading newline keeps the marker on a line of its own even when a
    // kernel message or test output left the cursor mid-line.
    let _ = writeln!(out, "\n{line}");
    let _ = out.flush();
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

fn mount(source: &str, target: &str, fstype: &str) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("mkdir {target}: {e}"))?;
    let (src, dst, fs) = (cstr(source), cstr(target), cstr(fstype));
    // SAFETY: valid NUL-terminated strings, no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fs.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "mount -t {fstype} {source} {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn mount_all() -> Result<(), String> {
    mount("proc", "/proc", "proc")?;
    mount("sysfs", "/sys", "sysfs")?;
    // devtmpfs needs dev nodes: no MS_NODEV for it.
    std::fs::create_dir_all("/dev").ok();
    // SAFETY: as in mount().
    let rc = unsafe {
        libc::mount(
            cstr("devtmpfs").as_ptr(),
            cstr("/dev").as_ptr(),
            cstr("devtmpfs").as_ptr(),
            libc::MS_NOSUID,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "mount devtmpfs: {}",
            std::io::Error::last_os_error()
        ));
    }
    mount("tmpfs", "/run", "tmpfs")?;
    mount("tmpfs", "/tmp", "tmpfs")?;
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2")?;
    mount("bpf", "/sys/fs/bpf", "bpf")?;
    Ok(())
}

fn load_modules() {
    let Ok(dir) = std::fs::read_dir(MODULES) else {
        return;
    };
    let mut files: Vec<_> = dir.flatten().map(|e| e.path()).collect();
    files.sort();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let compressed = [".xz", ".zst", ".gz"].iter().any(|s| name.ends_with(s));
        let result = std::fs::File::open(&path)
            .map_err(|e| e.to_string())
            .and_then(|f| {
                use std::os::fd::AsRawFd;
                let flags = if compressed {
                    MODULE_INIT_COMPRESSED_FILE
                } else {
                    0
                };
                // SAFETY: finit_module on a file we hold, empty parameters.
                let rc = unsafe {
                    libc::syscall(
                        libc::SYS_finit_module,
                        f.as_raw_fd(),
                        cstr("").as_ptr(),
                        flags,
                    )
                };
                let err = std::io::Error::last_os_error();
                match rc {
                    0 => Ok(()),
                    _ if err.raw_os_error() == Some(libc::EEXIST) => Ok(()),
                    _ => Err(err.to_string()),
                }
            });
        match result {
            Ok(()) => say(&format!("EGRESSMON-MODULE {name} loaded")),
            Err(e) => say(&format!("EGRESSMON-MODULE {name} failed: {e}")),
        }
    }
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn loopback_up() -> Result<(), String> {
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS on a socket we own with an ifreq we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..2].copy_from_slice(b"lo");
        let ok = libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req) == 0 && {
            req.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &mut req) == 0
        };
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if !ok {
            return Err(format!("lo up: {err}"));
        }
    }
    Ok(())
}

fn filters() -> Vec<String> {
    std::fs::read_to_string("/proc/cmdline")
        .unwrap_or_default()
        .split_whitespace()
        .find_map(|w| w.strip_prefix("egm.filter="))
        .map(|f| {
            f.split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn list_tests() -> Result<Vec<String>, String> {
    let out = Command::new(TESTS)
        .args(["--list", "--format", "terse"])
        .output()
        .map_err(|e| format!("running {TESTS} --list: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{TESTS} --list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(String::from)
        .collect())
}

/// Reaps every exited child (orphans are re-parented to us, pid 1).
fn reap() {
    // SAFETY: waitpid with WNOHANG on any child.
    unsafe { while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {} }
}

fn run_one(name: &str) -> (&'static str, f64) {
    let start = Instant::now();
    let spawned = Command::new(TESTS)
        .args(["--exact", name, "--test-threads=1", "--nocapture"])
        .env("EGRESSMON_BIN", AGENT)
        .env("EGRESSMON_GEN_BIN", GEN)
        .env("RUST_BACKTRACE", "1")
        .env("PATH", "/bin")
        .env("HOME", "/tmp")
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            say(&format!("cannot start {TESTS}: {e}"));
            return ("FAILED", 0.0);
        }
    };
    let pgid = child.id() as i32;
    let verdict = loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break "ok",
            Ok(Some(_)) | Err(_) => break "FAILED",
            Ok(None) if start.elapsed() > TEST_TIMEOUT => {
                say(&format!(
                    "{name}: no result after {}s, killing it",
                    TEST_TIMEOUT.as_secs()
                ));
                break "TIMEOUT";
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    // Whatever the test left running in its process group goes too.
    // SAFETY: signalling a process group we created.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = child.wait();
    reap();
    (verdict, start.elapsed().as_secs_f64())
}

fn power_off() -> ! {
    // SAFETY: plain syscalls; we are pid 1 and nothing else needs flushing.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot() only returns on error; exiting pid 1 panics the kernel, which
    // with panic=-1 and QEMU's -no-reboot also ends the VM.
    std::process::exit(1)
}

fn main() {
    if let Err(e) = mount_all() {
        say(&format!("EGRESSMON-SETUP-FAILED {e}"));
        power_off();
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    say(&format!("EGRESSMON-BOOT {}", release.trim()));
    load_modules();
    if let Err(e) = loopback_up() {
        say(&format!("EGRESSMON-SETUP-FAILED {e}"));
        power_off();
    }
    for needed in [AGENT, GEN] {
        if !Path::new(needed).exists() {
            say(&format!("EGRESSMON-SETUP-FAILED {needed} missing"));
            power_off();
        }
    }
    let tests = match list_tests() {
        Ok(t) => t,
        Err(e) => {
            say(&format!("EGRESSMON-SETUP-FAILED {e}"));
            power_off();
        }
    };
    let filters = filters();
    let tests: Vec<String> = tests
        .into_iter()
        .filter(|t| filters.is_empty() || filters.iter().any(|f| t.contains(f.as_str())))
        .collect();
    say(&format!("EGRESSMON-TESTS {}", tests.len()));
    let (mut passed, mut failed) = (0, 0);
    for name in &tests {
        say(&format!("EGRESSMON-TEST-START {name}"));
        let (verdict, secs) = run_one(name);
        if verdict == "ok" {
            passed += 1;
        } else {
            failed += 1;
        }
        say(&format!("EGRESSMON-TEST {name} {verdict} {secs:.1}"));
    }
    say(&format!("EGRESSMON-DONE passed={passed} failed={failed}"));
    power_off();
}
