//! Drains the new-flow ring buffer. The kernel submits events without waking
//! us (BPF_RB_NO_WAKEUP), so the reader polls in batches on a short timer:
//! one wakeup per interval, not per flow. Once a quarter of the ring is
//! unread the kernel does wake us (BPF_RB_FORCE_WAKEUP), so a burst of new
//! flows is drained as it comes instead of overrunning the ring.

use monitor_common::{hook_in_task, FlowEvent, FlowKey};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Who sent a flow's first packet. Shared (one allocation per sending
/// process and cgroup) by all the flows it opened.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sender {
    pub tgid: u32,
    /// Task name as the kernel reports it (NUL padded).
    pub comm: [u8; 16],
    pub cgroup_id: u64,
    /// Cgroup path under the cgroup2 mount.
    pub cgroup: Option<Arc<str>>,
    /// Best effort, read from /proc when the sender's first event arrived.
    pub exe: Option<Box<str>>,
    pub cmdline: Option<Box<str>>,
}

/// Identity of a flow: 16 bytes, since the tracker keeps one per flow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowMeta {
    pub sender: Arc<Sender>,
    /// Reader batch that recorded it: the oldest make room first.
    pub batch: u32,
    /// Reported by a sock_addr hook (the calling task is the sender).
    pub from_task: bool,
}

/// Identities read from the ring and not yet taken over by the tracker
/// (which does so on the first pass that finds their flow).
pub type MetaTable = Arc<Mutex<Identities>>;

/// Identities by flow (foldhash: fast, and seeded per process).
pub type Identities = HashMap<FlowKey, FlowMeta, foldhash::fast::RandomState>;

/// Most identities pending: a burst can announce as many flows as the kernel
/// holds before a pass takes them; beyond that the oldest make room.
pub fn meta_limit(flow_entries: u32) -> usize {
    flow_entries as usize
}

pub fn meta_table() -> MetaTable {
    Arc::new(Mutex::new(Identities::default()))
}

/// Reader batches (of `POLL_INTERVAL`) an identity waits for its flow to
/// show up in a pass: beyond that, the kernel evicted the flow before any
/// pass saw it.
const PENDING_BATCHES: u32 = 50;

/// Drops identities whose flows no pass is going to find.
pub fn drop_stale(pending: &mut Identities) {
    let Some(newest) = pending.values().map(|m| m.batch).max() else {
        return;
    };
    pending.retain(|_, m| newest.wrapping_sub(m.batch) <= PENDING_BATCHES);
}

pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < std::mem::size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: FlowEvent is plain old data and the slice is long enough.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const FlowEvent) })
}

impl Sender {
    pub fn comm(&self) -> String {
        let end = self.comm.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.comm[..end]).into_owned()
    }
}

/// Records an event without /proc details.
#[cfg(test)]
fn record(table: &mut Identities, event: &FlowEvent) {
    let meta = FlowMeta {
        sender: Arc::new(Sender {
            tgid: event.tgid,
            comm: event.comm,
            cgroup_id: event.cgroup_id,
            ..Default::default()
        }),
        batch: 0,
        from_task: hook_in_task(event.hook),
    };
    record_meta(table, event.key, meta, usize::MAX);
}

/// Records an identity; a task-context identity is never replaced by an
/// skb-only one. At `limit` entries the oldest identities make room first
/// (the kernel's LRU flow map drops the least recently used flows, under
/// churn mostly the oldest).
pub fn record_meta(table: &mut Identities, key: FlowKey, meta: FlowMeta, limit: usize) {
    match table.get(&key) {
        Some(existing) if existing.from_task && !meta.from_task => {}
        Some(_) => {
            table.insert(key, meta);
        }
        None => {
            if table.len() >= limit {
                make_room(table, limit / 8);
            }
            table.insert(key, meta);
        }
    }
}

/// Drops at least `want` (and at least one) of the oldest identities.
fn make_room(table: &mut Identities, want: usize) {
    let want = want.max(1);
    let (oldest, newest) = table.values().fold((u32::MAX, 0), |(lo, hi), m| {
        (lo.min(m.batch), hi.max(m.batch))
    });
    let step = (newest.saturating_sub(oldest)) / 8 + 1;
    let mut cutoff = oldest;
    // Widen the cut a few batches at a time until enough would go.
    while cutoff < newest && table.values().filter(|m| m.batch <= cutoff).count() < want {
        cutoff = cutoff.saturating_add(step).min(newest);
    }
    table.retain(|_, m| m.batch > cutoff);
}

/// Senders by (tgid, comm, cgroup), so a process opening thousands of flows
/// is read from /proc once, not once per flow. Entries live a few seconds:
/// long enough for a burst, short enough that a reused pid is not named
/// after the process that had it before.
struct Senders {
    entries: HashMap<SenderKey, (Instant, Arc<Sender>), foldhash::fast::RandomState>,
    cgroups: crate::identity::process::CgroupNames,
}

/// (tgid, comm, cgroup id)
type SenderKey = (u32, [u8; 16], u64);

const SENDER_TTL: Duration = Duration::from_secs(5);
const MAX_SENDERS: usize = 4096;

impl Senders {
    fn new() -> Senders {
        Senders {
            entries: HashMap::default(),
            cgroups: crate::identity::process::CgroupNames::new(),
        }
    }

    /// The sender of an event; /proc is read only for task-context events
    /// (at skb egress the current task may be unrelated).
    fn get(&mut self, event: &FlowEvent, now: Instant) -> Arc<Sender> {
        let key = (event.tgid, event.comm, event.cgroup_id);
        if let Some((at, sender)) = self.entries.get(&key) {
            if now.duration_since(*at) < SENDER_TTL {
                return sender.clone();
            }
        }
        if self.entries.len() >= MAX_SENDERS {
            self.entries
                .retain(|_, (at, _)| now.duration_since(*at) < SENDER_TTL);
            if self.entries.len() >= MAX_SENDERS {
                self.entries.clear();
            }
        }
        let live = hook_in_task(event.hook) && event.tgid != 0;
        let sender = Arc::new(Sender {
            tgid: event.tgid,
            comm: event.comm,
            cgroup_id: event.cgroup_id,
            cgroup: self.cgroups.path(event.cgroup_id),
            exe: live
                .then(|| crate::identity::process::exe(event.tgid))
                .flatten(),
            cmdline: live
                .then(|| crate::identity::process::cmdline(event.tgid))
                .flatten(),
        });
        self.entries.insert(key, (now, sender.clone()));
        sender
    }
}

/// The kernel's wakeups of the ring, edge-triggered: `wait` returns when the
/// kernel woke the ring since the last wait (it does only when the ring
/// fills up), or after the timeout; events submitted without a wakeup do not
/// end it, though they are readable.
struct Wakeups(Option<OwnedFd>);

impl Wakeups {
    fn new(ring: BorrowedFd<'_>) -> Wakeups {
        // SAFETY: epoll_create1 has no preconditions; the descriptor it
        // returns is ours.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            log::warn!(
                "epoll_create1: {}; the event reader polls on its timer only",
                std::io::Error::last_os_error()
            );
            return Wakeups(None);
        }
        // SAFETY: a descriptor epoll_create1 just returned.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        let mut interest = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: 0,
        };
        // SAFETY: valid descriptors and event struct.
        let added = unsafe {
            libc::epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                ring.as_raw_fd(),
                &mut interest,
            )
        };
        if added < 0 {
            log::warn!(
                "watching the new-flow ring: {}; the event reader polls on its timer only",
                std::io::Error::last_os_error()
            );
            return Wakeups(None);
        }
        Wakeups(Some(epoll))
    }

    fn wait(&self, timeout: Duration) {
        let Some(epoll) = &self.0 else {
            std::thread::sleep(timeout);
            return;
        };
        let mut ready = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: room for one event; EINTR and errors end the wait early,
        // which only means an earlier drain.
        unsafe { libc::epoll_wait(epoll.as_raw_fd(), &mut ready, 1, timeout.as_millis() as i32) };
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
    limit: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
    received: Arc<std::sync::atomic::AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("egressmon-events".into())
        .spawn(move || {
            let wakeups = Wakeups::new(ring.as_fd());
            let mut pending: Vec<FlowEvent> = Vec::new();
            let mut senders = Senders::new();
            let mut batch = 0u32;
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
                    let now = Instant::now();
                    batch = batch.wrapping_add(1);
                    let enriched: Vec<(FlowKey, FlowMeta)> = pending
                        .iter()
                        .map(|e| {
                            let meta = FlowMeta {
                                sender: senders.get(e, now),
                                batch,
                                from_task: hook_in_task(e.hook),
                            };
                            (e.key, meta)
                        })
                        .collect();
                    if let Ok(mut table) = table.try_lock() {
                        for (key, meta) in enriched {
                            record_meta(&mut table, key, meta, limit);
                        }
                        pending.clear();
                    }
                }
                if pending.capacity() > 4096 && pending.is_empty() {
                    pending.shrink_to(4096);
                }
                wakeups.wait(POLL_INTERVAL);
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
        let mut table = Identities::default();
        let mut ev = FlowEvent {
            hook: HOOK_CONNECT4,
            tgid: 42,
            ..Default::default()
        };
        ev.comm[..4].copy_from_slice(b"curl");
        record(&mut table, &ev);
        let skb = FlowEvent {
            hook: monitor_common::HOOK_SKB_EGRESS,
            ..Default::default()
        };
        record(&mut table, &skb);
        assert_eq!(table[&ev.key].sender.comm(), "curl");
        assert_eq!(table[&ev.key].sender.tgid, 42);
    }

    #[test]
    fn stale_identities_go() {
        let mut table = Identities::default();
        for batch in [1u32, 2, 100] {
            let key = FlowKey {
                port: batch as u16,
                ..Default::default()
            };
            let meta = FlowMeta {
                batch,
                ..Default::default()
            };
            record_meta(&mut table, key, meta, 64);
        }
        drop_stale(&mut table);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn full_table_drops_the_oldest() {
        let mut table = Identities::default();
        for port in 0..1000u16 {
            let key = FlowKey {
                port,
                ..Default::default()
            };
            let meta = FlowMeta {
                batch: port as u32,
                ..Default::default()
            };
            record_meta(&mut table, key, meta, 64);
            assert!(table.len() <= 64);
        }
        assert!(
            table.values().all(|m| m.batch >= 1000 - 64),
            "only the oldest identities were dropped"
        );
        let last = FlowKey {
            port: 999,
            ..Default::default()
        };
        assert!(table.contains_key(&last), "the newest identity is kept");
    }
}
