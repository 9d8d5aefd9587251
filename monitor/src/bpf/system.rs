//! The host facts the agent depends on: root, kernel version, the cgroup2
//! mount and the cgroup to watch, and bpffs for pins (mounted when missing).

use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Oldest kernel with everything egressmon uses: cgroup links (5.7),
/// BPF ring buffer and `bpf_ktime_get_boot_ns` (5.8).
pub(crate) const MIN_KERNEL: (u32, u32) = (5, 8);

pub(crate) fn require_root(what: &str) -> Result<()> {
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
pub(crate) fn kernel_version() -> Option<(u32, u32)> {
    parse_kernel_version(&kernel_release())
}

/// Parses "6.1.0-56-arm64" into (6, 1).
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

pub(crate) fn require_kernel() -> Result<()> {
    check_kernel(&kernel_release())
}

/// Refuses kernels older than MIN_KERNEL by name: on phones that is the
/// android11-5.4 GKI line and the 4.x kernels before it.
fn check_kernel(release: &str) -> Result<()> {
    if let Some(version) = parse_kernel_version(release) {
        if version < MIN_KERNEL {
            bail!(
                "kernel {release} is too old: egressmon needs Linux {}.{} or newer (cgroup BPF \
                 links and the BPF ring buffer; on phones the android12-5.10 kernels and later). \
                 Nothing was attached",
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
pub(crate) fn resolve_cgroup(arg: Option<&Path>) -> Result<PathBuf> {
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
pub(crate) fn cgroup_id(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino())
}

/// `path` and each ancestor up to and including the cgroup2 mount root.
pub(crate) fn cgroup_lineage(path: &Path) -> Result<Vec<PathBuf>> {
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

/// Makes sure `pin_dir` is a directory only root controls on a mounted
/// bpffs (see [`crate::bpf::pins::PinDir::prepare`]).
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<()> {
    crate::bpf::pins::PinDir::new(pin_dir).prepare()
}

/// Makes sure the parent of `pin_dir` is a bpffs directory only root
/// controls, mounting /sys/fs/bpf (root only) if needed: the pin directory
/// itself is `PinDir`'s to make and check.
pub(crate) fn prepare_bpffs_for(pin_dir: &Path) -> Result<()> {
    if !pin_dir.is_absolute() {
        bail!(
            "--pin-dir must be an absolute path, got {}",
            pin_dir.display()
        );
    }
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) && is_bpffs(pin_dir) {
        bail!(
            "{} is the root of a bpffs mount, shared with other programs' pins: egressmon keeps \
             its pins in a directory of their own, e.g. --pin-dir {}",
            pin_dir.display(),
            pin_dir.join("egressmon").display()
        );
    }
    if !is_bpffs(parent) {
        let default = Path::new("/sys/fs/bpf");
        if parent == default {
            mount_bpffs(default)?;
        } else {
            bail!(
                "{} is not on a bpffs mount: choose a --pin-dir under /sys/fs/bpf, or mount one \
                 with `mount -t bpf -o mode=0700 bpf {}`",
                pin_dir.display(),
                parent.display()
            );
        }
    }
    check_real_path(parent)?;
    check_parent_dir(parent)
}

/// Refuses `dir` unless it is its own real path (no symbolic link or `..`
/// on the way), so the directory checked is the one used.
fn check_real_path(dir: &Path) -> Result<()> {
    let real =
        std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
    if real != dir {
        bail!(
            "{} is reached through a symbolic link or `..` (it is {}): egressmon does not \
             follow links to its pin directory; pass the real path in --pin-dir",
            dir.display(),
            real.display()
        );
    }
    Ok(())
}

/// Refuses a parent directory where others could rename the pin directory
/// away and put their own in its place (writable by them, without the
/// sticky bit that bpffs mounts have).
fn check_parent_dir(parent: &Path) -> Result<()> {
    let meta = std::fs::metadata(parent).with_context(|| format!("stat {}", parent.display()))?;
    let mode = meta.mode();
    if mode & GROUP_OR_OTHER_WRITE != 0 && mode & libc::S_ISVTX == 0 {
        bail!(
            "{} is writable by group or others without the sticky bit (mode {:o}): anyone could \
             replace the pin directory in it; `chmod o-w,g-w {}` or choose another --pin-dir",
            parent.display(),
            mode & 0o7777,
            parent.display()
        );
    }
    Ok(())
}

/// Mode bits that let group or others write.
pub(crate) const GROUP_OR_OTHER_WRITE: u32 = 0o022;

/// Whether `dir` is the root of a mount (a directory egressmon never
/// removes, e.g. /sys/fs/bpf itself).
pub(crate) fn is_mount_point(dir: &Path) -> bool {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    match (std::fs::symlink_metadata(dir), std::fs::metadata(parent)) {
        (Ok(d), Ok(p)) => d.dev() != p.dev() || d.ino() == p.ino(),
        _ => false,
    }
}

/// Mounts bpffs at `at`, root only (bpffs alone would allow everyone in).
fn mount_bpffs(at: &Path) -> Result<()> {
    std::fs::create_dir_all(at).ok();
    let target = CString::new(at.as_os_str().as_encoded_bytes())?;
    let bpf = CString::new("bpf")?;
    let options = CString::new("mode=0700")?;
    // SAFETY: valid NUL-terminated strings; bpffs takes its options as text.
    let rc = unsafe {
        libc::mount(
            bpf.as_ptr(),
            target.as_ptr(),
            bpf.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!(
                "mounting bpffs at {} (try `mount -t bpf -o mode=0700 bpf {}`)",
                at.display(),
                at.display()
            )
        });
    }
    log::info!("mounted bpffs at {} (mode 0700)", at.display());
    Ok(())
}

/// CLOCK_BOOTTIME and CLOCK_REALTIME now, in nanoseconds.
pub(crate) fn clocks_now() -> (u64, u64) {
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
pub(crate) fn boot_ns_to_system_time(boot_ns: u64) -> std::time::SystemTime {
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

pub(crate) fn rfc3339(boot_ns: u64) -> Option<String> {
    (boot_ns != 0)
        .then(|| humantime::format_rfc3339_millis(boot_ns_to_system_time(boot_ns)).to_string())
}

/// The ephemeral port range of this network namespace
/// (`net.ipv4.ip_local_port_range`, which IPv6 shares); Linux's default when
/// unreadable.
pub(crate) fn ephemeral_ports() -> (u32, u32) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| parse_port_range(&text))
        .unwrap_or((32768, 60999))
}

fn parse_port_range(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.split_whitespace().map(str::parse::<u32>);
    let (first, last) = (parts.next()?.ok()?, parts.next()?.ok()?);
    (first <= last && last <= 65535).then_some((first, last))
}

/// A random non-zero socket mark, new at every load (for the agent's own
/// sockets, which the kernel programs then leave uncounted).
pub(crate) fn random_mark() -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into our buffer.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    let random = if got == 4 {
        u32::from_ne_bytes(bytes)
    } else {
        std::process::id().wrapping_mul(0x9e37_79b9) ^ 0x6567_6d00
    };
    random.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_range_is_parsed_or_defaulted() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("1024 65535"), Some((1024, 65535)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("x"), None);
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_kernel_version("6.1.0-56-arm64"), Some((6, 1)));
        assert_eq!(parse_kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.10.198-android12-9"), Some((5, 10)));
        assert_eq!(parse_kernel_version("garbage"), None);
        let refused = check_kernel("5.4.233-android11-2-g1d2e5f").unwrap_err();
        assert!(
            format!("{refused}").starts_with("kernel 5.4.233-android11-2-g1d2e5f is too old"),
            "{refused}"
        );
        assert!(check_kernel("4.19.191-android").is_err());
        assert!(check_kernel("5.10.198-android12-9").is_ok());
        assert!(check_kernel("6.1.0-57-arm64").is_ok());
    }

    #[test]
    fn bpffs_is_mounted_root_only() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting bpffs needs root");
            return;
        }
        let at = std::env::temp_dir().join(format!("egm-bpffs-{}", std::process::id()));
        std::fs::create_dir_all(&at).unwrap();
        let mounted = mount_bpffs(&at);
        let mode = std::fs::metadata(&at).map(|m| m.mode() & 0o777);
        let target = CString::new(at.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        std::fs::remove_dir(&at).unwrap();
        mounted.unwrap();
        assert_eq!(mode.unwrap(), 0o700);
    }

    #[test]
    fn mount_points_are_told_apart() {
        assert!(is_mount_point(Path::new("/")));
        assert!(is_mount_point(Path::new("/proc")));
        assert!(!is_mount_point(
            &std::env::current_dir().unwrap().join("src")
        ));
    }
}
