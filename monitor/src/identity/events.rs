//! Drains the new-flow ring buffer. The kernel submits events without waking
//! us (BPF_RB_NO_WAKEUP), so the reader polls in batches on a short timer:
//! one wakeup per interval, not per flow. Once a quarter of the ring is
//! unread the kernel does wake us (BPF_RB_FORCE_WAKEUP), so a burst of new
//! flows is drained as it comes instead of overrunning the ring.
//!
//! Each event becomes a flow's identity (its sender), handed over once to
//! the tracker through a channel ([`spawn_reader`]); from then on the tracker
//! owns it: with its flow, or among its [`Identities`] until a pass finds
//! the flow.

use monitor_common::{hook_in_task, FlowEvent, FlowKey};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::mpsc::{Receiver, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Who sent a flow's first packet. Shared (one allocation per sending
/// process and cgroup) by all the flows it opened.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Sender {
    pub(crate) tgid: u32,
    /// Task name as the kernel reports it (NUL padded).
    pub(crate) comm: [u8; 16],
    pub(crate) cgroup_id: u64,
    /// Cgroup path under the cgroup2 mount.
    pub(crate) cgroup: Option<Arc<str>>,
    /// Best effort, read from /proc when the sender's first event arrived.
    pub(crate) exe: Option<Box<str>>,
    pub(crate) cmdline: Option<Box<str>>,
    /// Its SELinux context, where SELinux is on.
    pub(crate) selinux_context: Option<Box<str>>,
}

/// Identity of a flow: 16 bytes, since the tracker keeps one per flow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FlowMeta {
    pub(crate) sender: Arc<Sender>,
    /// When the reader recorded it, in `POLL_INTERVAL`s since the reader
    /// started (drains come sooner in a burst, but age is counted in
    /// intervals): the oldest make room first.
    pub(crate) batch: u32,
    /// Reported by a sock_addr hook (the calling task is the sender).
    pub(crate) from_task: bool,
}

/// Identities the reader hands over, one batch of the ring at a time.
pub(crate) type Identified = Vec<(FlowKey, FlowMeta)>;

/// Identities the tracker holds for flows no pass has found yet (foldhash:
/// fast, and seeded per process). At most `limit` of them: a burst can
/// announce as many flows as the kernel holds before a pass finds them;
/// beyond that the oldest make room.
#[derive(Debug, Default)]
pub(crate) struct Identities {
    by_flow: HashMap<FlowKey, FlowMeta, foldhash::fast::RandomState>,
    limit: usize,
}

/// Reader batches (of `POLL_INTERVAL`) an identity waits for its flow to
/// show up in a pass: beyond that, the kernel evicted the flow before any
/// pass saw it.
const PENDING_BATCHES: u32 = 50;

impl Identities {
    /// Holds at most `limit` identities (the flow map's size).
    pub(crate) fn new(limit: usize) -> Identities {
        Identities {
            by_flow: HashMap::default(),
            limit,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_flow.len()
    }

    /// The identity of `key`'s flow, now the caller's.
    pub(crate) fn take(&mut self, key: &FlowKey) -> Option<FlowMeta> {
        self.by_flow.remove(key)
    }

    /// Records an identity; a task-context identity is never replaced by an
    /// skb-only one. At the limit the oldest identities make room first (the
    /// kernel's LRU flow map drops the least recently used flows, under
    /// churn mostly the oldest).
    pub(crate) fn record(&mut self, key: FlowKey, meta: FlowMeta) {
        match self.by_flow.get(&key) {
            Some(existing) if existing.from_task && !meta.from_task => {}
            Some(_) => {
                self.by_flow.insert(key, meta);
            }
            None => {
                if self.by_flow.len() >= self.limit {
                    self.make_room(self.limit / 8);
                }
                self.by_flow.insert(key, meta);
            }
        }
    }

    /// Drops identities whose flows no pass is going to find.
    pub(crate) fn drop_stale(&mut self) {
        let Some(newest) = self.by_flow.values().map(|m| m.batch).max() else {
            return;
        };
        self.by_flow
            .retain(|_, m| newest.wrapping_sub(m.batch) <= PENDING_BATCHES);
    }

    /// Drops at least `want` (and at least one) of the oldest identities.
    fn make_room(&mut self, want: usize) {
        let table = &mut self.by_flow;
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
}

pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(100);

fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < std::mem::size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: FlowEvent is plain old data and the slice is long enough.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const FlowEvent) })
}

impl Sender {
    pub(crate) fn comm(&self) -> String {
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
    table.record(event.key, meta);
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
            selinux_context: live
                .then(|| crate::identity::process::selinux_context(event.tgid))
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

/// Most identities the reader holds while the tracker has not taken the
/// earlier ones (the channel is full); beyond this the oldest are dropped:
/// as many new flows as the default flow map holds have come since, so
/// their flows have most likely left it.
const MAX_PENDING: usize = 1 << 16;

/// Batches of identities in the channel at most. With `MAX_PENDING` this
/// bounds the identities in flight (and the reader's memory) however fast
/// new flows come; the tracker takes them all at each pass.
const HANDOVER_BATCHES: usize = 2;

/// Spawns the polling thread; it ends when `stop` is set or the receiver is
/// gone. The ring is drained every interval whatever the tracker does, so a
/// long pass over the flow map never makes the kernel drop events; each
/// interval's identities go out as one batch on the returned channel.
pub(crate) fn spawn_reader(
    mut ring: aya::maps::RingBuf<aya::maps::MapData>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    received: Arc<std::sync::atomic::AtomicU64>,
) -> (std::thread::JoinHandle<()>, Receiver<Identified>) {
    let (handover, identities) = std::sync::mpsc::sync_channel(HANDOVER_BATCHES);
    let reader = std::thread::Builder::new()
        .name("egressmon-events".into())
        .spawn(move || {
            let wakeups = Wakeups::new(ring.as_fd());
            let mut ready: Identified = Vec::new();
            let mut senders = Senders::new();
            let started = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut events = Vec::new();
                while let Some(item) = ring.next() {
                    if let Some(event) = decode(&item) {
                        events.push(event);
                    }
                }
                received.fetch_add(events.len() as u64, std::sync::atomic::Ordering::Relaxed);
                if !events.is_empty() {
                    // /proc is read now, while the processes most likely
                    // still live.
                    let now = Instant::now();
                    let batch =
                        (started.elapsed().as_millis() / POLL_INTERVAL.as_millis()) as u32 + 1;
                    ready.extend(events.iter().map(|e| {
                        let meta = FlowMeta {
                            sender: senders.get(e, now),
                            batch,
                            from_task: hook_in_task(e.hook),
                        };
                        (e.key, meta)
                    }));
                }
                if ready.len() > MAX_PENDING {
                    ready.drain(..ready.len() - MAX_PENDING);
                }
                if !ready.is_empty() {
                    match handover.try_send(std::mem::take(&mut ready)) {
                        Ok(()) => {}
                        Err(TrySendError::Full(back)) => ready = back,
                        Err(TrySendError::Disconnected(_)) => break,
                    }
                }
                wakeups.wait(POLL_INTERVAL);
            }
        })
        .expect("spawning the event reader thread");
    (reader, identities)
}

#[cfg(test)]
mod tests {
    use super::*;
    use monitor_common::HOOK_CONNECT4;

    #[test]
    fn task_identity_wins_over_skb() {
        let mut table = Identities::new(usize::MAX);
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
        let meta = table.take(&ev.key).unwrap();
        assert_eq!(meta.sender.comm(), "curl");
        assert_eq!(meta.sender.tgid, 42);
    }

    #[test]
    fn stale_identities_go() {
        let mut table = Identities::new(64);
        for batch in [1u32, 2, 100] {
            let key = FlowKey {
                port: batch as u16,
                ..Default::default()
            };
            let meta = FlowMeta {
                batch,
                ..Default::default()
            };
            table.record(key, meta);
        }
        table.drop_stale();
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn full_table_drops_the_oldest() {
        let mut table = Identities::new(64);
        for port in 0..1000u16 {
            let key = FlowKey {
                port,
                ..Default::default()
            };
            let meta = FlowMeta {
                batch: port as u32,
                ..Default::default()
            };
            table.record(key, meta);
            assert!(table.len() <= 64);
        }
        assert!(
            table.by_flow.values().all(|m| m.batch >= 1000 - 64),
            "only the oldest identities were dropped"
        );
        let last = FlowKey {
            port: 999,
            ..Default::default()
        };
        assert!(table.take(&last).is_some(), "the newest identity is kept");
    }
}
