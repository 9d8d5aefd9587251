//! History: what each uid sent, kept across agent restarts and reboots in an
//! embedded SQLite database under the state directory (`run --state-dir`),
//! and the two commands that read it: `report` (what was sent, per owner)
//! and `diff` (what one run reached that another did not).
//!
//! The agent writes kernel *deltas* (each flow's counters minus what the
//! database already holds of them), each with the flow's new baseline in
//! the same row, in one transaction every `--history-every` (evicted flows
//! at the pass that finds them gone, everything when the agent stops), so
//! a restart, a `kill -9` or a reboot neither doubles nor loses what was
//! written. Rows are per hour, uid, owner and destination, which bounds
//! `--since` to the hour and lets retention drop whole hours, oldest first.
//!
//! Owns: the database file and its schema (`store`), the reading side
//! (`rows`), and the two commands (`report`, `diff`). It reads the tracker's
//! flow table after each pass; nothing else writes the database.

pub(crate) mod diff;
pub(crate) mod report;
pub(crate) mod rows;
pub(crate) mod store;

pub(crate) use store::History;

use std::path::{Path, PathBuf};

/// The database's file name inside the state directory.
pub(crate) const DB_FILE: &str = "history.db";

/// Where history lives unless `--state-dir` says otherwise.
pub(crate) fn default_state_dir() -> PathBuf {
    PathBuf::from(if Path::new("/system/build.prop").exists() {
        "/data/adb/egressmon"
    } else {
        "/var/lib/egressmon"
    })
}

/// A state directory or a database file, as `report` and `diff` take them.
pub(crate) fn database_path(place: &Path) -> PathBuf {
    if place.is_dir() {
        place.join(DB_FILE)
    } else {
        place.to_path_buf()
    }
}
