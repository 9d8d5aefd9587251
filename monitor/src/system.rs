//! The host facts the agent depends on: root, kernel version, the cgroup2
//! mount and the cgroup to watch, and bpffs for pins (mounted when missing).

use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Oldest kernel with everything egressmon uses: cgroup links (5.7),
/// BPF ring buffer and `bpf_ktime_get_boot_ns` (5.8).
pub const MIN_KERNEL: (u32, u32) = (5, 8);

pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{what} needs root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN): run it as root, \
             e.g. `sudo egressmon ...` or from `su` in an adb shell"
        );
    }
    Ok(())
}

/// The running kernel's release string (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The running kernel's (major, minor).
pub fn kernel_version() -> Option<(u32, u32)> {
    parse_kernel_version(&kernel_release())
}

/// Parses "6.1.0-56-arm64" into (6, 1).
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

pub fn require_kernel() -> Result<()> {
    let release = kernel_release();
    if let Some(version) = parse_kernel_version(&release) {
        if version < MIN_KERNEL {
            bail!(
                "kernel {release} is too old: egressmon needs Linux {}.{} or newer \
                 (cgroup BPF links and the BPF ring buffer)",
                MIN_KERNEL.0,
                MIN_KERNEL.1
            );
        }
    }
    Ok(())
}

/// Mount points of a filesystem type, from /proc/self/mountinfo.
fn mounts_of_type(fstype: &str) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context("reading /proc/self/mountinfo (is /proc mounted?)")?;
    let mut found = Vec::new();
    for line in text.lines() {
        // "... mount_point options ... - fstype source super_options"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some(fstype) {
            continue;
        }
        if let Some(mount_point) = left.split_whitespace().nth(4) {
            found.push(PathBuf::from(mount_point.replace("\\040", " ")));
        }
    }
    Ok(found)
}

/// The cgroup2 mount point (`/sys/fs/cgroup` on Android and modern distros,
/// `/sys/fs/cgroup/unified` on hybrid layouts).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = mounts_of_type("cgroup2")?;
    mounts
        .into_iter()
        .min_by_key(|p| p.as_os_str().len())
        .context(
            "no cgroup2 filesystem is mounted: mount one with \
         `mount -t cgroup2 none /sys/fs/cgroup` (or /sys/fs/cgroup/unified on a hybrid layout)",
        )
}

/// Resolves `--cgroup` (absolute path or relative to the cgroup2 root).
pub fn resolve_cgroup(arg: Option<&Path>) -> Result<PathBuf> {
    let root = cgroup2_root()?;
    let path = match arg {
        None => root.clone(),
        Some(p) if p.is_absolute() => p.to_path_buf(),
        Some(p) => root.join(p),
    };
    if !path.join("cgroup.procs").exists() {
        bail!(
            "{} is not a cgroup v2 directory: pass --cgroup with a directory under the cgroup2 \
             mount {} (or omit it to watch the whole system)",
            path.display(),
            root.display()
        );
    }
    Ok(path)
}

/// The cgroup id the kernel reports for a cgroup2 directory (its inode).
pub fn cgroup_id(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino())
}

/// `path` and each ancestor up to and including the cgroup2 mount root.
pub fn cgroup_lineage(path: &Path) -> Result<Vec<PathBuf>> {
    let root = cgroup2_root()?;
    let mut lineage = vec![path.to_path_buf()];
    let mut current = path;
    while current != root {
        match current.parent() {
            Some(parent) if parent.starts_with(&root) => {
                lineage.push(parent.to_path_buf());
                current = parent;
            }
            _ => break,
        }
    }
    Ok(lineage)
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(cpath) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(cpath.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Makes sure `pin_dir` lives on a mounted bpffs, mounting /sys/fs/bpf if
/// needed, and creates it.
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<()> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) {
        let default = Path::new("/sys/fs/bpf");
        if parent == default {
            mount_bpffs(default)?;
        } else {
            bail!(
                "{} is not on a bpffs mount: choose a --pin-dir under /sys/fs/bpf, or mount one \
                 with `mount -t bpf bpf {}`",
                pin_dir.display(),
                parent.display()
            );
        }
    }
    std::fs::create_dir_all(pin_dir)
        .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
    // Pins give access to the counters: root only.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(pin_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {} to root", pin_dir.display()))
}

fn mount_bpffs(at: &Path) -> Result<()> {
    std::fs::create_dir_all(at).ok();
    let target = CString::new(at.as_os_str().as_encoded_bytes())?;
    let bpf = CString::new("bpf")?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            bpf.as_ptr(),
            target.as_ptr(),
            bpf.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!(
                "mounting bpffs at {} (try `mount -t bpf bpf {}`)",
                at.display(),
                at.display()
            )
        });
    }
    log::info!("mounted bpffs at {}", at.display());
    Ok(())
}

/// CLOCK_BOOTTIME and CLOCK_REALTIME now, in nanoseconds.
pub fn clocks_now() -> (u64, u64) {
    fn read(clock: libc::clockid_t) -> u64 {
        // SAFETY: clock_gettime writes into a struct we own.
        unsafe {
            let mut ts: libc::timespec = std::mem::zeroed();
            libc::clock_gettime(clock, &mut ts);
            ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
        }
    }
    (read(libc::CLOCK_BOOTTIME), read(libc::CLOCK_REALTIME))
}

/// Converts a kernel CLOCK_BOOTTIME stamp into wall-clock time. The offset
/// between the two clocks moves only when the wall clock is set or slewed,
/// so each thread reads it again at most every 100 ms instead of twice per
/// stamp (the agent converts two stamps per new flow).
pub fn boot_ns_to_system_time(boot_ns: u64) -> std::time::SystemTime {
    use std::cell::Cell;
    use std::time::{Duration, Instant};
    thread_local! {
        static OFFSET: Cell<Option<(Instant, u64)>> = const { Cell::new(None) };
    }
    // Wall clock minus boot clock (wrapping: both are plain u64 nanoseconds).
    let offset = OFFSET.with(|cached| match cached.get() {
        Some((at, offset)) if at.elapsed() < Duration::from_millis(100) => offset,
        _ => {
            let (boot, real) = clocks_now();
            let offset = real.wrapping_sub(boot);
            cached.set(Some((Instant::now(), offset)));
            offset
        }
    });
    let wall_ns = boot_ns.wrapping_add(offset);
    std::time::UNIX_EPOCH + Duration::from_nanos(wall_ns)
}

pub fn rfc3339(boot_ns: u64) -> Option<String> {
    (boot_ns != 0)
        .then(|| humantime::format_rfc3339_millis(boot_ns_to_system_time(boot_ns)).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_kernel_version("6.1.0-56-arm64"), Some((6, 1)));
        assert_eq!(parse_kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.10.198-android12-9"), Some((5, 10)));
        assert_eq!(parse_kernel_version("garbage"), None);
    }
}
