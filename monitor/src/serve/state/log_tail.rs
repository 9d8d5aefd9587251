//! The `--log` lines a previous agent wrote after its last save: a pass
//! writes its lines before its state, so an agent killed in between left
//! lines its state does not know of. They are read back (the saved file by
//! inode, from the saved length, then every newer file of the rotation)
//! and handed to the tracker, which then neither writes them again nor
//! counts their alerts twice.

use crate::identity::owners::Owner;
use crate::pipeline::flows::FlowRecord;
use crate::pipeline::tracker::{Counters, Logged, Tracker};
use crate::pipeline::vocab::Origin;
use monitor_common::{FlowKey, FlowValue, FAMILY_INBOUND, FAMILY_IPV4, FAMILY_IPV6};
use serde_json::Value;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where the log file stood when a state was saved: which file, how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogPosition {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) len: u64,
}

/// Where the log at `path` stands now (never through a link).
pub(crate) fn position(path: &Path) -> Option<LogPosition> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    meta.is_file().then(|| LogPosition {
        dev: meta.dev(),
        ino: meta.ino(),
        len: meta.len(),
    })
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    if n == 0 {
        return path.to_path_buf();
    }
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Applies to `tracker` the lines written after `at` to the log at `path`
/// (rotated up to `keep` times); returns how many.
pub(crate) fn replay(path: &Path, keep: usize, at: &LogPosition, tracker: &mut Tracker) -> usize {
    let mut applied = 0;
    for line in lines_after(path, keep, at) {
        if let Some(logged) = parse(&line) {
            tracker.replay(logged);
            applied += 1;
        }
    }
    applied
}

/// The lines written after `at`, oldest first. Nothing when the file that
/// was at the path then is gone (deleted, or rotated out of `keep`).
fn lines_after(path: &Path, keep: usize, at: &LogPosition) -> Vec<String> {
    let files: Vec<PathBuf> = (0..=keep).map(|n| rotated(path, n)).collect();
    let Some(start) = files
        .iter()
        .position(|f| position(f).is_some_and(|p| (p.dev, p.ino) == (at.dev, at.ino)))
    else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    for (n, file) in files[..=start].iter().enumerate().rev() {
        let from = if n == start { at.len } else { 0 };
        read_lines(file, from, &mut lines);
    }
    lines
}

/// Appends the whole lines of `path` from byte `from`. Only a regular file
/// of this process's user that no one else may write is read.
fn read_lines(path: &Path, from: u64, out: &mut Vec<String>) {
    let Ok(mut file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    else {
        return;
    };
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let private = file
        .metadata()
        .is_ok_and(|m| m.is_file() && m.uid() == euid && m.mode() & 0o022 == 0);
    if !private || file.seek(SeekFrom::Start(from)).is_err() {
        return;
    }
    for line in BufReader::new(file).split(b'\n') {
        match line {
            Ok(line) => out.push(String::from_utf8_lossy(&line).into_owned()),
            Err(_) => return,
        }
    }
}

/// What a log line says the tracker did; `None` for lines of no interest
/// or that do not name a flow this build can key.
pub(crate) fn parse(line: &str) -> Option<Logged> {
    let v: Value = serde_json::from_str(line).ok()?;
    match v["event"].as_str()? {
        "flow_start" => Some(Logged::Start(key_of(&v)?, counters_of(&v)?)),
        "flow_update" => Some(Logged::Update(key_of(&v)?, counters_of(&v)?)),
        "flow_end" => Some(Logged::End {
            key: key_of(&v)?,
            counters: counters_of(&v)?,
            evicted: v["reason"] == "evicted",
        }),
        "alert" => Some(Logged::Alert(key_of(&v)?, v["rule"].as_str()?.to_string())),
        "owner_change" => Some(Logged::OwnerChange(owner_of(&v)?)),
        _ => None,
    }
}

fn counters_of(v: &Value) -> Option<Counters> {
    Some(Counters {
        connects: v["connects"].as_u64()?,
        udp_sends: v["udp_sends"].as_u64()?,
        tx_packets: v["tx_packets"].as_u64()?,
        tx_bytes: v["tx_bytes"].as_u64()?,
    })
}

fn owner_of(v: &Value) -> Option<Owner> {
    let uid = |field: &str| u32::try_from(v[field].as_u64()?).ok();
    Some(Owner {
        uid: uid("uid")?,
        user: uid("user")?,
        app_id: uid("app_id")?,
        owner: v["owner"].as_str()?.to_string(),
        packages: v["packages"]
            .as_array()?
            .iter()
            .map(|p| p.as_str().map(str::to_string))
            .collect::<Option<_>>()?,
        origin: Origin::parse(v["origin"].as_str()?)?,
        firmware: v["firmware"].as_bool()?,
    })
}

fn proto_number(name: &str) -> Option<u8> {
    match name {
        "tcp" => Some(monitor_common::PROTO_TCP),
        "udp" => Some(monitor_common::PROTO_UDP),
        "icmp" => Some(monitor_common::PROTO_ICMP),
        "icmpv6" => Some(monitor_common::PROTO_ICMPV6),
        other => other.strip_prefix("ip")?.parse().ok(),
    }
}

/// The flow key a line names, checked by rendering the key back the way
/// `flows::record` does: a line this build would not have written for
/// that key names no flow.
fn key_of(v: &Value) -> Option<FlowKey> {
    let mut addr = [0u8; 16];
    let mut family = match v["dst"].as_str()?.parse::<IpAddr>().ok()? {
        IpAddr::V4(ip) => {
            addr[..4].copy_from_slice(&ip.octets());
            FAMILY_IPV4
        }
        IpAddr::V6(ip) => {
            addr = ip.octets();
            FAMILY_IPV6
        }
    };
    if v["direction"] == "inbound" {
        family |= FAMILY_INBOUND;
    }
    let key = FlowKey {
        uid: u32::try_from(v["uid"].as_u64()?).ok()?,
        port: u16::try_from(v["port"].as_u64()?).ok()?,
        proto: proto_number(v["proto"].as_str()?)?,
        family,
        addr,
    };
    renders_as(&key, v).then_some(key)
}

/// Whether `key`'s record shows the same flow identity as the line `v`.
fn renders_as(key: &FlowKey, v: &Value) -> bool {
    let owner = Owner {
        uid: key.uid,
        user: 0,
        app_id: 0,
        owner: String::new(),
        packages: Vec::new(),
        origin: Origin::Unknown,
        firmware: false,
    };
    let record: FlowRecord =
        crate::pipeline::flows::record(key, &FlowValue::default(), &owner, None);
    let Ok(rendered) = serde_json::to_value(record) else {
        return false;
    };
    ["uid", "proto", "family", "dst", "port", "direction"]
        .iter()
        .all(|field| rendered.get(field) == v.get(field))
}
