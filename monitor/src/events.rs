//! Drains the new-flow ring buffer. The kernel submits events without waking
//! us (BPF_RB_NO_WAKEUP), so the reader polls in batches on a short timer:
//! one wakeup per interval, not per flow.

use monitor_common::{FlowEvent, FlowKey, HOOK_SKB_EGRESS};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Identity of the first sender of a flow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowMeta {
    pub pid: u32,
    pub tgid: u32,
    /// Task name as the kernel reports it (NUL padded, no allocation).
    pub comm: [u8; 16],
    pub cgroup_id: u64,
    /// Reported by a sock_addr hook (the calling task is the sender).
    pub from_task: bool,
    /// Best effort, read from /proc when the event arrived.
    pub exe: Option<Box<str>>,
    pub cmdline: Option<Box<str>>,
    /// Cgroup path under the cgroup2 mount.
    pub cgroup: Option<Box<str>>,
}

pub type MetaTable = Arc<Mutex<HashMap<FlowKey, FlowMeta>>>;

pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < std::mem::size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: FlowEvent is plain old data and the slice is long enough.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const FlowEvent) })
}

impl FlowMeta {
    pub fn comm(&self) -> String {
        comm_string(&self.comm)
    }
}

fn comm_string(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Records an event; a task-context identity replaces an skb-only one.
pub fn record(table: &mut HashMap<FlowKey, FlowMeta>, event: &FlowEvent) {
    let meta = FlowMeta {
        pid: event.tgid,
        tgid: event.tgid,
        comm: event.comm,
        cgroup_id: event.cgroup_id,
        from_task: event.hook != HOOK_SKB_EGRESS,
        ..Default::default()
    };
    record_meta(table, event.key, meta);
}

/// Records an identity already enriched with process details.
pub fn record_meta(table: &mut HashMap<FlowKey, FlowMeta>, key: FlowKey, meta: FlowMeta) {
    let event_key = key;
    match table.get(&event_key) {
        Some(existing) if existing.from_task && !meta.from_task => {}
        _ => {
            table.insert(event_key, meta);
        }
    }
}

/// Spawns the polling thread; it ends when `stop` is set.
/// An event's identity plus what /proc and the cgroup tree say about it.
fn enrich(event: &FlowEvent, cgroups: &mut crate::process::CgroupNames) -> FlowMeta {
    let from_task = event.hook != HOOK_SKB_EGRESS;
    let live = from_task && event.tgid != 0;
    FlowMeta {
        pid: event.tgid,
        tgid: event.tgid,
        comm: event.comm,
        cgroup_id: event.cgroup_id,
        from_task,
        exe: if live {
            crate::process::exe(event.tgid)
        } else {
            None
        },
        cmdline: if live {
            crate::process::cmdline(event.tgid)
        } else {
            None
        },
        cgroup: cgroups.path(event.cgroup_id),
    }
}

/// Most events held while the identity table is busy (the flow poller holds
/// it during a pass); beyond this the oldest pending identities are dropped.
const MAX_PENDING: usize = 1 << 17;

/// Spawns the polling thread; it ends when `stop` is set. The ring is
/// drained every interval even while the table is locked, so a long pass
/// over the flow map never makes the kernel drop events.
pub fn spawn_reader(
    mut ring: aya::maps::RingBuf<aya::maps::MapData>,
    table: MetaTable,
    stop: Arc<std::sync::atomic::AtomicBool>,
    received: Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("egressmon-events".into())
        .spawn(move || {
            let mut pending: Vec<FlowEvent> = Vec::new();
            let mut cgroups = crate::process::CgroupNames::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let before = pending.len();
                while let Some(item) = ring.next() {
                    if let Some(event) = decode(&item) {
                        pending.push(event);
                    }
                }
                received.fetch_add(
                    (pending.len() - before) as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                if pending.len() > MAX_PENDING {
                    pending.drain(..pending.len() - MAX_PENDING);
                }
                if !pending.is_empty() {
                    // /proc is read outside the table lock, while the
                    // processes most likely still live.
                    let enriched: Vec<(FlowKey, FlowMeta)> = pending
                        .iter()
                        .map(|e| (e.key, enrich(e, &mut cgroups)))
                        .collect();
                    if let Ok(mut table) = table.try_lock() {
                        for (key, meta) in enriched {
                            record_meta(&mut table, key, meta);
                        }
                        pending.clear();
                    }
                }
                if pending.capacity() > 4096 && pending.is_empty() {
                    pending.shrink_to(4096);
                }
                std::thread::sleep(POLL_INTERVAL);
            }
        })
        .expect("spawning the event reader thread")
}

#[cfg(test)]
mod tests {
    use super::*;
    use monitor_common::HOOK_CONNECT4;

    #[test]
    fn task_identity_wins_over_skb() {
        let mut table = HashMap::new();
        let mut ev = FlowEvent {
            hook: HOOK_CONNECT4,
            tgid: 42,
            ..Default::default()
        };
        ev.comm[..4].copy_from_slice(b"curl");
        record(&mut table, &ev);
        let skb = FlowEvent {
            hook: HOOK_SKB_EGRESS,
            ..Default::default()
        };
        record(&mut table, &skb);
        assert_eq!(table[&ev.key].comm(), "curl");
        assert_eq!(table[&ev.key].pid, 42);
    }
}
