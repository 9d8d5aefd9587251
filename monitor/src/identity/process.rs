//! Who inside a uid sent it: the sending process's executable and command
//! line (read from /proc while it lives; an Android app process's cmdline is
//! its package or `package:service`, which names the component inside a
//! shared uid like 1000), and the cgroup it runs in, with the systemd unit
//! that cgroup belongs to (`system` traffic then names its service); its
//! SELinux context, which on Android splits uid 0 and 1000 into the daemons
//! behind them (`u:r:netd:s0`, `u:r:system_server:s0`).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Whether process `pid` still runs (a zombie waiting for its parent to
/// reap it has exited).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which may hold spaces and ')'.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
    })
}

/// Best effort: None once the process has exited or /proc hides it.
pub(crate) fn exe(tgid: u32) -> Option<Box<str>> {
    let path = std::fs::read_link(format!("/proc/{tgid}/exe")).ok()?;
    Some(path.to_string_lossy().into())
}

/// NUL-separated arguments joined by spaces, capped at 256 bytes.
pub(crate) fn cmdline(tgid: u32) -> Option<Box<str>> {
    let raw = std::fs::read(format!("/proc/{tgid}/cmdline")).ok()?;
    let text: String = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    if text.is_empty() {
        return None;
    }
    let mut end = text.len().min(256);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Some(text[..end].into())
}

/// Where the kernel shows a task's SELinux context; present only where
/// SELinux is on (selinuxfs mounted): other security modules (AppArmor)
/// answer in the same file with labels of their own.
const SELINUXFS: &str = "/sys/fs/selinux";

/// The SELinux context of process `tgid`, None without SELinux or once the
/// process has exited.
pub(crate) fn selinux_context(tgid: u32) -> Option<Box<str>> {
    if !Path::new(SELINUXFS).join("enforce").exists() {
        return None;
    }
    context_from(&std::fs::read(format!("/proc/{tgid}/attr/current")).ok()?)
}

/// The context in attr/current's bytes: text up to a NUL or newline.
fn context_from(raw: &[u8]) -> Option<Box<str>> {
    let end = raw
        .iter()
        .position(|&b| b == 0 || b == b'\n')
        .unwrap_or(raw.len());
    let text = std::str::from_utf8(&raw[..end.min(256)]).ok()?.trim();
    (!text.is_empty()).then(|| text.into())
}

/// The systemd unit (`*.service`, `*.scope`, `*.socket`) a cgroup path
/// belongs to: its last such component.
pub(crate) fn unit_of(path: &str) -> Option<&str> {
    path.split('/')
        .rev()
        .find(|c| c.ends_with(".service") || c.ends_with(".scope") || c.ends_with(".socket"))
}

/// Maps cgroup ids (the inode numbers of cgroup2 directories, as BPF
/// reports them) to paths under the cgroup2 mount. Rescans the tree on a
/// miss, at most once every few seconds, and never holds more than
/// `MAX_CGROUPS` entries.
pub(crate) struct CgroupNames {
    root: Option<PathBuf>,
    ids: HashMap<u64, std::sync::Arc<str>>,
    last_scan: Option<Instant>,
}

const MAX_CGROUPS: usize = 65_536;
const RESCAN_EVERY: Duration = Duration::from_secs(5);

impl CgroupNames {
    pub(crate) fn new() -> CgroupNames {
        CgroupNames {
            root: crate::bpf::system::cgroup2_root().ok(),
            ids: HashMap::new(),
            last_scan: None,
        }
    }

    pub(crate) fn path(&mut self, id: u64) -> Option<std::sync::Arc<str>> {
        if id == 0 {
            return None;
        }
        if let Some(path) = self.ids.get(&id) {
            return Some(path.clone());
        }
        if self.last_scan.is_none_or(|t| t.elapsed() >= RESCAN_EVERY) {
            self.scan();
        }
        self.ids.get(&id).cloned()
    }

    fn scan(&mut self) {
        self.last_scan = Some(Instant::now());
        let Some(root) = self.root.clone() else {
            return;
        };
        self.ids.clear();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            if self.ids.len() >= MAX_CGROUPS {
                break;
            }
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let relative = Path::new("/").join(dir.strip_prefix(&root).unwrap_or(Path::new("")));
            self.ids
                .insert(meta.ino(), relative.to_string_lossy().into());
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(entry.path());
                    }
                }
            }
        }
    }
}

impl Default for CgroupNames {
    fn default() -> Self {
        CgroupNames::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_come_from_the_cgroup_path() {
        assert_eq!(
            unit_of("/system.slice/systemd-resolved.service"),
            Some("systemd-resolved.service")
        );
        assert_eq!(
            unit_of("/user.slice/user-1000.slice/session-2.scope"),
            Some("session-2.scope")
        );
        assert_eq!(unit_of("/uid_10123/pid_4567"), None);
    }

    #[test]
    fn selinux_contexts_end_at_nul_or_newline() {
        assert_eq!(
            context_from(b"u:r:system_server:s0\0").as_deref(),
            Some("u:r:system_server:s0")
        );
        assert_eq!(
            context_from(b"u:r:untrusted_app:s0:c123,c256\n").as_deref(),
            Some("u:r:untrusted_app:s0:c123,c256")
        );
        assert_eq!(context_from(b"\0"), None);
        assert_eq!(context_from(&[0xff, 0xfe]), None);
    }

    #[test]
    fn this_process_is_readable() {
        let me = std::process::id();
        assert!(exe(me).is_some());
        assert!(cmdline(me).is_some());
        assert!(exe(u32::MAX).is_none());
    }
}
