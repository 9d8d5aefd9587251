//! The `--log` JSON lines: what a line says ([`LogEvent`], typed) and the
//! writer that puts one object per line to stdout (`-`) or a file with
//! size-based rotation (`--log-max-bytes`, `--log-keep`).
//!
//! A line is always written whole with one `write_all` on an O_APPEND file,
//! and rotation happens only between lines, so no reader ever sees a torn
//! line and no line is split across files.

use crate::identity::owners::Owner;
use crate::pipeline::flows::FlowRecord;
use crate::pipeline::vocab::Origin;
use crate::serve::private_fs::{create_private_append, identity, open_private_append};
use serde::Serialize;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One line of the JSON log: `event` (the variant's name in snake_case),
/// `time` (RFC 3339, when the agent wrote it), then the event's fields.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum LogEvent {
    /// A flow seen for the first time, or moving again after `flow_end`
    /// (then with the deltas since that end).
    FlowStart {
        time: String,
        #[serde(flatten)]
        flow: FlowRecord,
        #[serde(flatten, skip_serializing_if = "Option::is_none")]
        deltas: Option<Deltas>,
    },
    /// Counters moved since the flow's last line (every `--log-interval`).
    FlowUpdate {
        time: String,
        #[serde(flatten)]
        flow: FlowRecord,
        #[serde(flatten)]
        deltas: Deltas,
    },
    /// Quiet for `--idle-after`, or gone from the kernel's map.
    FlowEnd {
        time: String,
        #[serde(flatten)]
        flow: FlowRecord,
        #[serde(flatten)]
        deltas: Deltas,
        reason: EndReason,
    },
    /// A rule matched the flow (once per rule and flow).
    Alert {
        time: String,
        #[serde(flatten)]
        flow: FlowRecord,
        rule: String,
    },
    /// A block rule refused the flow (or in a dry run would have): at its
    /// first refused attempt, then at every hundredth (`blocked` counts
    /// them all).
    Block {
        time: String,
        #[serde(flatten)]
        flow: FlowRecord,
        rule: String,
        mode: crate::pipeline::rules::BlockMode,
    },
    /// A uid's owner changed (packages installed, removed or updated).
    OwnerChange {
        time: String,
        #[serde(flatten)]
        owner: Owner,
        previous_owner: String,
        previous_packages: Vec<String>,
        previous_origin: Origin,
        previous_firmware: bool,
    },
}

/// Counters moved since the flow's previous line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Deltas {
    pub(crate) delta_connects: u64,
    pub(crate) delta_udp_sends: u64,
    pub(crate) delta_tx_packets: u64,
    pub(crate) delta_tx_bytes: u64,
}

/// Why a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum EndReason {
    /// No traffic for `--idle-after`; the kernel entry stays.
    Idle,
    /// The kernel's LRU map dropped it (or the maps went).
    Evicted,
}

/// The time stamp of a line written now.
pub(crate) fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// How often the path is checked for the file having been deleted or moved
/// away from outside (one lstat; lines in between go to the open file).
const PATH_CHECK_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) enum JsonlLog {
    Stdout,
    File(RotatingFile),
}

/// The log file: root's own (see `private_fs`), reopened when rotated,
/// deleted or replaced, always without following a link.
pub(crate) struct RotatingFile {
    path: PathBuf,
    file: File,
    /// Device and inode of `file`, to see when the path names another file.
    identity: (u64, u64),
    size: u64,
    max_bytes: u64,
    keep: usize,
    checked_at: Instant,
    check_every: Duration,
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn exists_no_follow(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

fn ignore_not_found(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl JsonlLog {
    /// `-` is stdout; anything else a file, created 0600 or appended to if
    /// it is root's own (a link, another user's file or one others may
    /// write is refused with what to do about it).
    pub(crate) fn open(target: &str, max_bytes: u64, keep: usize) -> anyhow::Result<JsonlLog> {
        if target == "-" {
            return Ok(JsonlLog::Stdout);
        }
        let path = PathBuf::from(target);
        let file = open_private_append(&path)?;
        let meta = file.metadata()?;
        Ok(JsonlLog::File(RotatingFile {
            path,
            file,
            identity: identity(&meta),
            size: meta.len(),
            max_bytes: max_bytes.max(1),
            keep,
            checked_at: Instant::now(),
            check_every: PATH_CHECK_INTERVAL,
        }))
    }

    /// Writes one JSON object as one line.
    pub(crate) fn write(&mut self, value: &impl Serialize) -> io::Result<()> {
        let mut line = serde_json::to_vec(value)?;
        line.push(b'\n');
        match self {
            JsonlLog::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(&line)?;
                out.flush()
            }
            JsonlLog::File(f) => f.write_line(&line),
        }
    }
}

impl RotatingFile {
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        self.follow_path()?;
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    /// A log deleted or moved away from outside (by hand, by logrotate)
    /// would otherwise swallow every later line: start a new file.
    fn follow_path(&mut self) -> io::Result<()> {
        let now = Instant::now();
        if now.duration_since(self.checked_at) < self.check_every {
            return Ok(());
        }
        self.checked_at = now;
        let current = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| identity(&m));
        if current == Some(self.identity) {
            return Ok(());
        }
        log::warn!(
            "--log {} was deleted or replaced: writing to a new file there",
            self.path.display()
        );
        self.reopen()
    }

    /// path -> path.1 -> path.2 ... ; the oldest beyond `keep` is removed.
    /// Renames never follow links (a link planted at path.N is replaced).
    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        if self.keep == 0 {
            ignore_not_found(std::fs::remove_file(&self.path))?;
        } else {
            ignore_not_found(std::fs::remove_file(rotated(&self.path, self.keep)))?;
            for n in (1..self.keep).rev() {
                let from = rotated(&self.path, n);
                if exists_no_follow(&from) {
                    std::fs::rename(&from, rotated(&self.path, n + 1))?;
                }
            }
            ignore_not_found(std::fs::rename(&self.path, rotated(&self.path, 1)))?;
        }
        self.reopen()
    }

    /// A new 0600 file at the path (O_EXCL: surely ours); if something got
    /// there first, it must pass the same checks as at start.
    fn reopen(&mut self) -> io::Result<()> {
        let file = match create_private_append(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                open_private_append(&self.path).map_err(|e| io::Error::other(format!("{e:#}")))?
            }
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        self.identity = identity(&meta);
        self.size = meta.len();
        self.file = file;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn test_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("egm-jsonl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o777
    }

    fn open_err(path: &Path) -> String {
        match JsonlLog::open(path.to_str().unwrap(), 1000, 2) {
            Ok(_) => panic!("{} was accepted", path.display()),
            Err(e) => format!("{e:#}"),
        }
    }

    /// A log that checks its path on every write instead of once a second.
    fn open_checking_every_write(path: &Path, max_bytes: u64, keep: usize) -> JsonlLog {
        let mut log = JsonlLog::open(path.to_str().unwrap(), max_bytes, keep).unwrap();
        if let JsonlLog::File(f) = &mut log {
            f.check_every = Duration::ZERO;
        }
        log
    }

    fn lines_of(path: &Path) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "file ends mid-line"
        );
        text.lines()
            .map(|l| serde_json::from_str(l).expect("every line is whole JSON"))
            .collect()
    }

    #[test]
    fn rotation_never_tears_or_loses_a_line() {
        let dir = test_dir("rotation");
        let path = dir.join("flows.jsonl");
        let mut log = JsonlLog::open(path.to_str().unwrap(), 1000, 100).unwrap();
        for i in 0..500u64 {
            // Lines of varying length so rotation points fall everywhere.
            log.write(
                &json!({"event": "flow_update", "seq": i, "pad": "x".repeat((i % 37) as usize)}),
            )
            .unwrap();
        }
        let mut seqs = Vec::new();
        for n in (1..=100).rev() {
            let rotated = rotated(&path, n);
            if rotated.exists() {
                let size = std::fs::metadata(&rotated).unwrap().len();
                assert!(size <= 1000, "{} is {size} bytes", rotated.display());
                seqs.extend(
                    lines_of(&rotated)
                        .iter()
                        .map(|v| v["seq"].as_u64().unwrap()),
                );
            }
        }
        seqs.extend(lines_of(&path).iter().map(|v| v["seq"].as_u64().unwrap()));
        assert_eq!(
            seqs,
            (0..500).collect::<Vec<_>>(),
            "every line, in order, exactly once"
        );

        // With a small keep, only the newest files stay, each still whole.
        let path2 = dir.join("small.jsonl");
        let mut log = JsonlLog::open(path2.to_str().unwrap(), 200, 2).unwrap();
        for i in 0..100u64 {
            log.write(&json!({"seq": i})).unwrap();
        }
        assert!(rotated(&path2, 2).exists() && !rotated(&path2, 3).exists());
        let last: Vec<u64> = lines_of(&path2)
            .iter()
            .map(|v| v["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(*last.last().unwrap(), 99);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_symlink_is_refused_and_its_target_untouched() {
        let dir = test_dir("symlink");
        let target = dir.join("passwd");
        std::fs::write(&target, "root:x:0:0\n").unwrap();
        let link = dir.join("flows.jsonl");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = open_err(&link);
        assert!(
            e.contains("symbolic link") && e.contains("remove the link"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "root:x:0:0\n");
        // A dangling link is not created through either.
        let dangling = dir.join("dangling.jsonl");
        std::os::unix::fs::symlink(dir.join("nowhere"), &dangling).unwrap();
        assert!(open_err(&dangling).contains("symbolic link"));
        assert!(!dir.join("nowhere").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_others_may_write_is_refused() {
        let dir = test_dir("writable");
        let path = dir.join("flows.jsonl");
        std::fs::write(&path, "").unwrap();
        for bad in [0o620, 0o602, 0o666] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(bad)).unwrap();
            let e = open_err(&path);
            assert!(
                e.contains("writable by group or others") && e.contains("chmod go-w"),
                "{e}"
            );
        }
        // Readable by others is the owner's choice (with a warning), not a risk to root.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        JsonlLog::open(path.to_str().unwrap(), 1000, 2).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_of_another_user_is_refused() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: chown to another user needs root");
            return;
        }
        let dir = test_dir("foreign");
        let path = dir.join("flows.jsonl");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let e = open_err(&path);
        assert!(
            e.contains("owned by uid 65534") && e.contains("chown 0"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_deleted_or_moved_log_is_recreated() {
        let dir = test_dir("deleted");
        let path = dir.join("flows.jsonl");
        let mut log = open_checking_every_write(&path, 1 << 20, 2);
        log.write(&json!({"seq": 0})).unwrap();
        std::fs::remove_file(&path).unwrap();
        log.write(&json!({"seq": 1})).unwrap();
        assert_eq!(lines_of(&path), [json!({"seq": 1})]);
        assert_eq!(mode(&path), 0o600);

        // Moved away (as logrotate does): the old file keeps its lines.
        let moved = dir.join("moved.jsonl");
        std::fs::rename(&path, &moved).unwrap();
        log.write(&json!({"seq": 2})).unwrap();
        assert_eq!(lines_of(&moved), [json!({"seq": 1})]);
        assert_eq!(lines_of(&path), [json!({"seq": 2})]);

        // Replaced by a link: refused, and nothing is written through it.
        let target = dir.join("target");
        std::fs::write(&target, "").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let e = log.write(&json!({"seq": 3})).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_path_is_checked_at_most_once_a_second() {
        let dir = test_dir("interval");
        let path = dir.join("flows.jsonl");
        let mut log = JsonlLog::open(path.to_str().unwrap(), 1 << 20, 2).unwrap();
        std::fs::remove_file(&path).unwrap();
        log.write(&json!({"seq": 0})).unwrap();
        assert!(!path.exists(), "checked before a second went by");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotation_makes_new_0600_files_and_replaces_planted_links() {
        let dir = test_dir("rotation-mode");
        let path = dir.join("flows.jsonl");
        // The operator's own file, readable by a log shipper: kept as it is.
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        std::os::unix::fs::symlink(&victim, rotated(&path, 1)).unwrap();
        std::os::unix::fs::symlink(&victim, rotated(&path, 2)).unwrap();
        let mut log = JsonlLog::open(path.to_str().unwrap(), 100, 2).unwrap();
        for i in 0..20u64 {
            log.write(&json!({"seq": i, "pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}))
                .unwrap();
        }
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&rotated(&path, 1)), 0o600);
        assert_eq!(mode(&rotated(&path, 2)), 0o600);
        assert!(std::fs::symlink_metadata(rotated(&path, 2))
            .unwrap()
            .is_file());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
