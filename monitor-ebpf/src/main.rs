//! egressmon's kernel programs: one compact file, one program per hook, all
//! sharing the same accounting helper and maps.
//!
//! * `connect4`/`connect6` (cgroup sock_addr): connect() calls per flow, uid of
//!   the calling task.
//! * `sendmsg4`/`sendmsg6` (cgroup sock_addr): unconnected UDP datagrams per
//!   flow, uid of the calling task. Only attached where skb egress cannot be.
//! * `skb_egress` (cgroup_skb egress): packets and bytes per flow, uid of the
//!   socket (on Android the DNS resolver `fchown`s its sockets to the app that
//!   asked, so the socket owner is the right owner of bytes).
//! * `skb_ingress` (cgroup_skb ingress): DNS answers for the agent.
//! * While `egressmon capture` runs (`CAPTURE_FILTER` active), the skb and
//!   tc programs also copy the packets of the selected flows, both ways,
//!   into the `CAPTURE` ring (see [`capture_packet`]); otherwise that costs
//!   one inlined array load and a compare per packet.
//! * `tc_egress`, `tc_ingress` (schedcls on interfaces): the same work as the
//!   two skb programs, for where netd holds the cgroup skb hooks; they read
//!   the IP header after the link header (`TC_L3_OFFSET`) and never act on a
//!   packet (TC_ACT_UNSPEC: the next filter, netd's included, runs as if we
//!   were not there).
//!
//! Block rules (`BLOCKS`, an LPM trie by uid and destination prefix) are
//! decided once per flow and rules generation (`BLOCK_GEN`) and kept in the
//! flow's value: connect4/6 and sendmsg4/6 refuse (EPERM), skb egress
//! drops (a datagram's sender gets EPERM), tc egress drops (TC_ACT_SHOT).
//! While no block rule exists a run pays one compare; in a dry run, and
//! for every flow no rule names, the programs allow everything.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_ktime_get_boot_ns,
        generated::{bpf_sk_fullsock, bpf_skb_cgroup_id, bpf_skb_load_bytes, bpf_tcp_sock},
    },
    macros::{cgroup_skb, cgroup_sock_addr, classifier, map},
    maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf,
    },
    programs::{sk_buff::SkBuff, SkBuffContext, SockAddrContext, TcContext},
};
use aya_log_ebpf::debug;
use monitor_common::*;

// Maps are named by their statics (`#[map]` takes the identifier), and the
// agent opens them by the `MAP_*` names of monitor-common: the agent's test
// `map_names_agree_with_the_object` checks that the two agree.

/// Flow counters, one entry per flow for all CPUs (a flow is one socket's
/// traffic, sent from one CPU at a time): the insert that makes an entry is
/// also the flow's one "new flow" moment, and the payload mark is seen by
/// every CPU. Increments are atomic adds (other CPUs, softirqs, preemption).
#[map]
static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(DEFAULT_FLOW_ENTRIES, 0);

/// Per-uid totals of TCP and UDP for uids below [`DIRECT_UIDS`], per CPU, at
/// [`direct_uid_slot`]: an index, not a hash lookup, on every packet.
#[map]
static UID_DIRECT: PerCpuArray<UidTotals> = PerCpuArray::pinned(DIRECT_UID_SLOTS, 0);

/// Per-uid totals of everything else, and the list of every (uid, protocol)
/// counted at all (a direct slot's first use on a CPU enters its key here):
/// one entry per uid and protocol, so destination churn cannot evict them.
#[map]
static UID_TOTALS: PerCpuHashMap<UidKey, UidTotals> = PerCpuHashMap::pinned(DEFAULT_UID_ENTRIES, 0);

/// New-flow events for the agent (pid, comm, cgroup of the first sender).
#[map]
static EVENTS: RingBuf = RingBuf::pinned(DEFAULT_RINGBUF_BYTES, 0);

/// Payload bytes for host names and payload classes (see `PayloadEvent`).
#[map]
static PAYLOADS: RingBuf = RingBuf::pinned(DEFAULT_PAYLOAD_RING_BYTES, 0);

/// Where a readable flow's later payload is copied before it goes to
/// `PAYLOADS` as a record of just the bytes copied (see `PayloadSlice`).
#[map]
static PAYLOAD_SCRATCH: PerCpuArray<PayloadSlice> = PerCpuArray::with_max_entries(1, 0);

/// Written by the agent at load: `CONFIG_SKB_ATTACHED` tells the sendmsg
/// programs that skb egress already counts every datagram, so they only name
/// the sender (pid, comm) and do not count it twice.
#[map]
static CONFIG: Array<u32> = Array::with_max_entries(1, 0);

/// Block rules: (uid, destination prefix) -> the rule that refuses it.
#[map]
static BLOCKS: LpmTrie<BlockKey, BlockEntry> = LpmTrie::pinned(BLOCK_ENTRIES, 0);

/// The block rules' generation (slot 0), 0 while there is none.
#[map]
static BLOCK_GEN: Array<u32> = Array::pinned(1, 0);

/// Bytes before the IP header per interface index, for the tc programs.
#[map]
static TC_L3_OFFSET: HashMap<u32, u32> = HashMap::with_max_entries(256, 0);

/// Uid of the socket that sent a DNS query, by its local port (tc only).
#[map]
static DNS_PORTS: LruHashMap<DnsPortKey, DnsQueries> = LruHashMap::with_max_entries(4096, 0);

/// Netlink tc filters the agent added, for the next agent and `detach`
/// (written by the agent only).
#[map]
static TC_FILTERS: Array<TcFilter> = Array::pinned(TC_FILTER_SLOTS, 0);

/// Health counters (`STAT_*`): lost events, failed updates.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);

/// `egressmon capture`: the selected flows' packets ([`CapturedPacket`]).
#[map]
static CAPTURE: RingBuf = RingBuf::pinned(CAPTURE_RING_BYTES, 0);

/// What a running capture selects (one [`CaptureFilter`]); `active` 0 when
/// none runs.
#[map]
static CAPTURE_FILTER: Array<CaptureFilter> = Array::pinned(1, 0);

/// The uids a capture selects (unless `CAPTURE_ANY_UID`).
#[map]
static CAPTURE_UIDS: HashMap<u32, u8> = HashMap::pinned(CAPTURE_UID_ENTRIES, 0);

/// Uid of the socket whose packets a capture took at tc egress, by local
/// port: tc ingress packets carry no socket of ours yet (tc only).
#[map]
static CAPTURE_PORTS: LruHashMap<DnsPortKey, u32> =
    LruHashMap::with_max_entries(CAPTURE_PORT_ENTRIES, 0);

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range` of the
/// agent's namespace), set by the agent at load; read-only data, so the
/// check costs no map lookup.
#[unsafe(no_mangle)]
static EPHEMERAL_FIRST: u32 = 32768;
#[unsafe(no_mangle)]
static EPHEMERAL_LAST: u32 = 60999;

/// The mark the agent puts on its own loopback `/metrics` listener (new at
/// every load, 0 for none): its answers to scrapes carry it, and are not
/// counted. egressmon never observes its own traffic.
#[unsafe(no_mangle)]
static OWN_MARK: u32 = 0;

/// Unread bytes in the new-flow ring past which an event wakes the agent
/// (a quarter of the ring, set by the loader), so a burst of new flows does
/// not overrun the ring between two of its polls.
#[unsafe(no_mangle)]
static EVENTS_WAKE_BYTES: u64 = DEFAULT_RINGBUF_BYTES as u64 / 4;

const ALLOW: i32 = 1;
/// cgroup hooks: refuse (connect()/sendmsg() fail with EPERM, a packet is
/// dropped).
const DENY: i32 = 0;
/// tc: drop the packet.
const TC_ACT_SHOT: i32 = 2;
/// tc: no verdict, run the next filter (netd's, if any) as usual.
const TC_ACT_UNSPEC: i32 = -1;
/// Longest link header the tc programs skip (Ethernet with two VLAN tags).
const MAX_L3_OFFSET: u32 = 22;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// The agent polls the ring buffer in batches: no wakeup per event...
const BPF_RB_NO_WAKEUP: u64 = 1;
/// ...unless the ring is filling up (see [`EVENTS_WAKE_BYTES`]).
const BPF_RB_FORCE_WAKEUP: u64 = 2;
/// `bpf_ringbuf_query`: bytes written and not yet read.
const BPF_RB_AVAIL_DATA: u64 = 0;
const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86DD;

/// What one program run adds to a flow.
#[derive(Clone, Copy)]
struct Delta {
    connects: u64,
    udp_sends: u64,
    packets: u64,
    bytes: u64,
}

#[inline(always)]
fn add(counter: &mut u64, value: u64) {
    if value != 0 {
        // SAFETY: `counter` points into a map value; lowers to BPF `lock xadd`.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                counter, value,
            );
        }
    }
}

/// Adds one to a health counter; returns this CPU's count (0 if the slot
/// is missing).
#[inline(always)]
fn bump_stat(index: u32) -> u64 {
    let Some(slot) = STATS.get_ptr_mut(index) else {
        return 0;
    };
    // SAFETY: per-CPU array slot, always present for index < STAT_COUNT.
    unsafe {
        add(&mut *slot, 1);
        *slot
    }
}

/// Counts a rare failure and tells the agent's log (aya-log, debug level)
/// on its 1st, 2nd, 4th, 8th... occurrence on a CPU: a flood costs a
/// counter, not a log record per packet. Never on the per-packet hot path;
/// each call site passes a constant, so inlining keeps one message per site.
#[inline(always)]
fn trouble(index: u32) {
    let n = bump_stat(index);
    if n == 0 || n & (n - 1) != 0 {
        return;
    }
    match index {
        STAT_FLOW_UPDATE_FAILED => debug!(&(), "flow map update failed ({} on this CPU)", n),
        STAT_UID_UPDATE_FAILED => debug!(
            &(),
            "uid totals update failed, map full? ({} on this CPU)", n
        ),
        STAT_EVENTS_LOST => debug!(&(), "new-flow ring full, event lost ({} on this CPU)", n),
        STAT_PAYLOADS_LOST => debug!(&(), "payload ring full, payload lost ({} on this CPU)", n),
        _ => debug!(&(), "unparsable packet skipped ({} on this CPU)", n),
    }
}

/// No clock read here: `last_seen` is kept by the agent (when it sees the
/// counters move), which saves a clock read on every packet.
#[inline(always)]
fn add_to_flow(value: &mut FlowValue, delta: &Delta) {
    add(&mut value.connects, delta.connects);
    add(&mut value.udp_sends, delta.udp_sends);
    add(&mut value.tx_packets, delta.packets);
    add(&mut value.tx_bytes, delta.bytes);
}

#[inline(always)]
fn add_to_totals(totals: &mut UidTotals, delta: &Delta) {
    add(&mut totals.connects, delta.connects);
    add(&mut totals.udp_sends, delta.udp_sends);
    add(&mut totals.tx_packets, delta.packets);
    add(&mut totals.tx_bytes, delta.bytes);
}

/// Adds to the uid's totals: its direct slot where it has one (an array
/// index), else its hash entry (made on first use).
#[inline(always)]
fn add_to_uid(flow: &FlowKey, delta: &Delta) {
    if delta.connects | delta.udp_sends | delta.packets == 0 {
        return;
    }
    let key = UidKey {
        uid: flow.uid,
        proto: flow.proto,
        _pad: [0; 3],
    };
    if let Some(slot) = direct_uid_slot(flow.uid, flow.proto) {
        let Some(totals) = UID_DIRECT.get_ptr_mut(slot) else {
            return;
        };
        // SAFETY: per-CPU array slot, present for every index below its size.
        let totals = unsafe { &mut *totals };
        if totals.tx_packets == 0 && totals.connects == 0 && totals.udp_sends == 0 {
            // First use on this CPU: list the key for the agent (it reads
            // direct slots of the keys it finds in UID_TOTALS).
            let _ = UID_TOTALS.insert(key, UidTotals::default(), BPF_NOEXIST as u64);
            if unsafe { UID_TOTALS.get(key) }.is_none() {
                trouble(STAT_UID_UPDATE_FAILED);
            }
        }
        add_to_totals(totals, delta);
        return;
    }
    if let Some(totals) = UID_TOTALS.get_ptr_mut(key) {
        // SAFETY: map value pointer from a successful lookup.
        add_to_totals(unsafe { &mut *totals }, delta);
        return;
    }
    let fresh = UidTotals {
        connects: delta.connects,
        udp_sends: delta.udp_sends,
        tx_packets: delta.packets,
        tx_bytes: delta.bytes,
    };
    if UID_TOTALS.insert(key, fresh, BPF_NOEXIST as u64).is_err() {
        // Lost a race with a same-CPU insert, or the map is full.
        match UID_TOTALS.get_ptr_mut(key) {
            Some(totals) => add_to_totals(unsafe { &mut *totals }, delta),
            None => trouble(STAT_UID_UPDATE_FAILED),
        }
    }
}

/// What [`account`] did with one program run.
#[derive(Clone, Copy)]
struct Counted {
    /// The flow's value (null for a new flow at a sock_addr hook, whose
    /// callers need only the block decision).
    value: *mut FlowValue,
    /// The flow's block decision ([`BlockEntry::rule`], 0 for none).
    block: u32,
}

impl Counted {
    /// The run is refused: connect()/sendmsg() fail with EPERM, a packet is
    /// dropped.
    #[inline(always)]
    fn refused(&self) -> bool {
        self.block & BLOCK_ENFORCE != 0
    }
}

/// The one accounting path shared by every hook. Hot path: one flow
/// lookup, one uid slot (an array index for most uids), a few local
/// atomic adds and the block check (one compare while no block rule
/// exists), no clock read. The slow path (a flow's first packet) inserts
/// and emits the flow's one event. `attempt`: the run is a connect() or
/// a datagram, which a block rule counts even in a dry run (packets of
/// open connections are counted only where they are dropped). What is
/// refused is counted in `blocked` alone.
#[inline(always)]
fn account(
    key: &FlowKey,
    delta: Delta,
    hook: u8,
    attempt: bool,
    skb: Option<&SkBuff>,
) -> Option<Counted> {
    let gen = block_gen();
    let value = match FLOWS.get_ptr_mut(key) {
        Some(value) => value,
        None => {
            if skb.is_none() && gen == 0 {
                // A sock_addr hook while no block rule exists: the flow's
                // decision is known (none), so the run is counted by the
                // insert itself, one hash walk fewer per new flow.
                if new_flow(key, &delta, gen, hook, None) {
                    add_to_uid(key, &delta);
                    return Some(Counted {
                        value: core::ptr::null_mut(),
                        block: 0,
                    });
                }
            } else {
                // A new flow starts empty and undecided, and this run is
                // counted below like any other: one path for the verifier.
                new_flow(key, &NOTHING, gen.wrapping_add(1), hook, skb);
            }
            match FLOWS.get_ptr_mut(key) {
                Some(value) => value,
                None => {
                    // The uid's totals stay exact when a flow cannot be kept.
                    add_to_uid(key, &delta);
                    trouble(STAT_FLOW_UPDATE_FAILED);
                    return None;
                }
            }
        }
    };
    // SAFETY: map value pointer from a successful lookup.
    let flow = unsafe { &mut *value };
    if flow.block_gen != gen {
        // The one lookup site (the verifier walks it once per program).
        // Plain stores: every CPU that races here decides the same.
        flow.block = if gen == 0 { 0 } else { lookup_block(key) };
        flow.block_gen = gen;
    }
    // Read back from the map: one state for the verifier, whatever the
    // lookup found.
    // SAFETY: the field just written, in the same map value.
    let block = unsafe { core::ptr::read_volatile(&flow.block) };
    count_in_flow(flow, key, &delta, block, attempt);
    Some(Counted { value, block })
}

/// Inserts a new flow holding the calls in `counted` (a sock_addr hook's
/// connect or datagram, or nothing), decided under `block_gen` (not the
/// rules' generation: undecided), and emits its one event. Returns false
/// when another CPU made it first (its event names the flow).
#[inline(always)]
fn new_flow(
    key: &FlowKey,
    counted: &Delta,
    block_gen: u32,
    hook: u8,
    skb: Option<&SkBuff>,
) -> bool {
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let fresh = FlowValue {
        connects: counted.connects,
        udp_sends: counted.udp_sends,
        first_seen: now,
        last_seen: now,
        block_gen,
        ..FlowValue::default()
    };
    if FLOWS.insert(key, fresh, BPF_NOEXIST as u64).is_err() {
        return false;
    }
    bump_stat(STAT_FLOWS_CREATED);
    emit_new_flow(key, now, hook, skb);
    true
}

/// Adds one run to a flow and to its uid's totals: `delta`, or when
/// `block` refuses the run, one in `blocked` alone.
#[inline(always)]
fn count_in_flow(value: &mut FlowValue, key: &FlowKey, delta: &Delta, block: u32, attempt: bool) {
    if counts_blocked(block, attempt) {
        add(&mut value.blocked, 1);
        value.blocked_by = block;
    }
    if block & BLOCK_ENFORCE == 0 {
        add_to_uid(key, delta);
        add_to_flow(value, delta);
    }
}

/// A connection's first SYN seen at tc egress: its connect, or in a dry
/// run an attempt the rule would have refused.
/// (The flow's decision is read from its value: nothing about it stays
/// live in the caller, whose paths then merge for the verifier.)
#[inline(never)]
fn count_first_syn(key: &FlowKey, value: *mut FlowValue) {
    // SAFETY: the skb hooks always get the flow's value back.
    let Some(value) = (unsafe { value.as_mut() }) else {
        return;
    };
    add(&mut value.connects, 1);
    add_to_uid(key, &CONNECT);
    // SAFETY: a field of the map value.
    let block = unsafe { core::ptr::read_volatile(&value.block) };
    if block != 0 {
        add(&mut value.blocked, 1);
        value.blocked_by = block;
    }
}

/// Whether a run under `block` counts as blocked: refused, or in a dry run
/// an attempt (a connect() or a datagram) it would have refused.
#[inline(always)]
fn counts_blocked(block: u32, attempt: bool) -> bool {
    block != 0 && (attempt || block & BLOCK_ENFORCE != 0)
}

/// The block rules' generation (0: there is none).
#[inline(always)]
fn block_gen() -> u32 {
    BLOCK_GEN.get(0).copied().unwrap_or(0)
}

/// Looks the flow up in the block rules: an entry for its uid, else one for
/// every uid; inbound flows (a local service's replies) are never blocked.
#[inline(always)]
fn lookup_block(key: &FlowKey) -> u32 {
    if key.family & FAMILY_INBOUND != 0 {
        return 0;
    }
    let mut data = BlockKey {
        uid: key.uid.to_be_bytes(),
        addr: [0; 16],
    };
    if key.family == FAMILY_IPV4 {
        data.addr[10] = 0xff;
        data.addr[11] = 0xff;
        data.addr[12..16].copy_from_slice(&key.addr[..4]);
    } else {
        data.addr = key.addr;
    }
    if let Some(entry) = BLOCKS.get(Key::new(BLOCK_KEY_BITS, data)) {
        if entry.covers(key.proto, key.port) {
            return entry.rule;
        }
    }
    data.uid = BLOCK_ANY_UID.to_be_bytes();
    match BLOCKS.get(Key::new(BLOCK_KEY_BITS, data)) {
        Some(entry) if entry.covers(key.proto, key.port) => entry.rule,
        _ => 0,
    }
}

#[inline(always)]
fn emit_new_flow(key: &FlowKey, now: u64, hook: u8, skb: Option<&SkBuff>) {
    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        trouble(STAT_EVENTS_LOST);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to reserved ring-buffer memory of the right size;
    // every field is written before submit.
    unsafe {
        (*event).key = *key;
        (*event).ts = now;
        (*event).hook = hook;
        (*event)._pad = [0; 7];
        if let Some(skb) = skb {
            // At skb egress the current task may be unrelated (softirq).
            (*event).pid = 0;
            (*event).tgid = 0;
            (*event).comm = [0; 16];
            (*event).cgroup_id = bpf_skb_cgroup_id(skb.skb);
        } else {
            let pid_tgid = bpf_get_current_pid_tgid();
            (*event).pid = pid_tgid as u32;
            (*event).tgid = (pid_tgid >> 32) as u32;
            (*event).comm = bpf_get_current_comm().unwrap_or([0; 16]);
            (*event).cgroup_id = bpf_get_current_cgroup_id();
        }
    }
    // SAFETY: a read-only global the loader set.
    let wake_at = unsafe { core::ptr::read_volatile(&EVENTS_WAKE_BYTES) };
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA) > wake_at {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags);
}

// ---- sock_addr hooks -------------------------------------------------------

#[inline(always)]
fn current_uid() -> u32 {
    bpf_get_current_uid_gid() as u32
}

/// Key for an IPv4 destination from a sock_addr context.
#[inline(always)]
fn key_from_addr4(ctx: &SockAddrContext) -> FlowKey {
    let sa = unsafe { &*ctx.sock_addr };
    let mut key = FlowKey {
        uid: current_uid(),
        port: u16::from_be(sa.user_port as u16),
        proto: sa.protocol as u8,
        family: FAMILY_IPV4,
        addr: [0; 16],
    };
    key.addr[..4].copy_from_slice(&sa.user_ip4.to_ne_bytes());
    key
}

/// Key for an IPv6 destination; `::ffff:a.b.c.d` becomes IPv4 a.b.c.d, which
/// is also what skb egress sees for such a socket.
#[inline(always)]
fn key_from_addr6(ctx: &SockAddrContext) -> FlowKey {
    let sa = unsafe { &*ctx.sock_addr };
    let words = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let mut key = FlowKey {
        uid: current_uid(),
        port: u16::from_be(sa.user_port as u16),
        proto: sa.protocol as u8,
        family: FAMILY_IPV6,
        addr: [0; 16],
    };
    // Words are in network byte order as stored in memory.
    let mapped = words[0] == 0 && words[1] == 0 && words[2] == u32::from_be(0x0000_ffff);
    if mapped {
        key.family = FAMILY_IPV4;
        key.addr[..4].copy_from_slice(&words[3].to_ne_bytes());
    } else {
        key.addr[0..4].copy_from_slice(&words[0].to_ne_bytes());
        key.addr[4..8].copy_from_slice(&words[1].to_ne_bytes());
        key.addr[8..12].copy_from_slice(&words[2].to_ne_bytes());
        key.addr[12..16].copy_from_slice(&words[3].to_ne_bytes());
    }
    key
}

const CONNECT: Delta = Delta {
    connects: 1,
    udp_sends: 0,
    packets: 0,
    bytes: 0,
};
const UDP_SEND: Delta = Delta {
    connects: 0,
    udp_sends: 1,
    packets: 0,
    bytes: 0,
};
const NOTHING: Delta = Delta {
    connects: 0,
    udp_sends: 0,
    packets: 0,
    bytes: 0,
};

#[inline(always)]
fn udp_send_delta() -> Delta {
    if config_has(CONFIG_SKB_ATTACHED) {
        NOTHING
    } else {
        UDP_SEND
    }
}

/// A sock_addr hook's answer: 0 (the call fails with EPERM) when a block
/// rule refuses the flow.
#[inline(always)]
fn sock_addr_verdict(counted: Option<Counted>) -> i32 {
    match counted {
        Some(c) if c.refused() => DENY,
        _ => ALLOW,
    }
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    let key = key_from_addr4(&ctx);
    sock_addr_verdict(account(&key, CONNECT, HOOK_CONNECT4, true, None))
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    let key = key_from_addr6(&ctx);
    sock_addr_verdict(account(&key, CONNECT, HOOK_CONNECT6, true, None))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    let key = key_from_addr4(&ctx);
    let delta = udp_send_delta();
    sock_addr_verdict(account(
        &key,
        delta,
        HOOK_SENDMSG4,
        delta.udp_sends != 0,
        None,
    ))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    let key = key_from_addr6(&ctx);
    let delta = udp_send_delta();
    sock_addr_verdict(account(
        &key,
        delta,
        HOOK_SENDMSG6,
        delta.udp_sends != 0,
        None,
    ))
}

// ---- skb egress ------------------------------------------------------------

#[cgroup_skb(egress)]
pub fn skb_egress(ctx: SkBuffContext) -> i32 {
    if is_own(&ctx.skb) {
        return ALLOW;
    }
    if let Some(filter) = capture_filter() {
        capture_egress(&ctx.skb, filter, 0, HOOK_SKB_EGRESS);
    }
    match count_skb(&ctx.skb, 0, HOOK_SKB_EGRESS) {
        Some((_, _, true)) => DENY,
        Some((key, l4_offset, false)) => {
            note_dns_query(&ctx.skb, &key, l4_offset);
            ALLOW
        }
        None => ALLOW,
    }
}

#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    if let Some(l3) = l3_offset(&ctx.skb) {
        if let Some(filter) = capture_filter() {
            capture_egress(&ctx.skb, filter, l3, HOOK_TC_EGRESS);
        }
        match count_skb(&ctx.skb, l3, HOOK_TC_EGRESS) {
            Some((_, _, true)) => return TC_ACT_SHOT,
            Some((key, l4_offset, false)) => note_dns_query(&ctx.skb, &key, l4_offset),
            None => {}
        }
    }
    TC_ACT_UNSPEC
}

/// Where the IP header starts on the packet's interface, if the agent
/// attached us there.
#[inline(always)]
fn l3_offset(skb: &SkBuff) -> Option<usize> {
    let ifindex = unsafe { (*skb.skb).ifindex };
    let offset = unsafe { TC_L3_OFFSET.get(ifindex) }.copied()?;
    (offset <= MAX_L3_OFFSET).then_some(offset as usize)
}

/// Counts one packet at `l3` (0 at cgroup skb, the link header's length at
/// tc) and captures its flow's payload; returns the key, the transport
/// header's offset and whether a block rule refuses the packet.
#[inline(always)]
fn count_skb(skb: &SkBuff, l3: usize, hook: u8) -> Option<(FlowKey, usize, bool)> {
    let sk_buff = unsafe { &*skb.skb };
    // Bytes from the IP header on, as at cgroup skb.
    let len = sk_buff.len.saturating_sub(l3 as u32);
    let quick = match l3 {
        0 => quick_destination(sk_buff),
        _ => None,
    };
    // A match, not `or_else`: a closure may become a BPF subprogram, whose
    // stack frame adds to the program's (512 bytes for the whole chain).
    let parsed = match quick {
        Some(parsed) => Some(parsed),
        None => parse_destination(skb, sk_buff.protocol, l3),
    };
    let Some((mut key, l4_offset, local_port)) = parsed else {
        trouble(STAT_PARSE_SKIPPED);
        return None;
    };
    key.uid = skb_owner(skb);
    if is_service_reply(local_port, key.port) {
        key.port = local_port;
        key.family |= FAMILY_INBOUND;
    }
    // A UDP skb is one datagram: the agent reads `udp_sends` of UDP flows as
    // `udp_sends + tx_packets`, which saves two atomic adds per datagram.
    let delta = Delta {
        connects: 0,
        udp_sends: 0,
        packets: 1,
        bytes: len as u64,
    };
    let counted = account(&key, delta, hook, key.proto == PROTO_UDP, Some(skb))?;
    if counted.refused() {
        return Some((key, l4_offset, true));
    }
    let value = counted.value;
    // Hot path ends here for every flow whose payload needs no capture.
    if unsafe { (*value).captured } < CAPTURE_ENCRYPTED {
        // In place at cgroup skb only: tc's variable link header would
        // multiply the verifier's walk past its limit.
        let in_place = hook == HOOK_SKB_EGRESS;
        capture_payload(skb, &key, l4_offset, sk_buff.len, value, in_place);
    }
    // Where netd holds connect4/6, tc egress counts a connection's first
    // SYN as its connect. Last, so that its branches do not multiply the
    // verifier's walk of the capture above.
    if hook == HOOK_TC_EGRESS
        && key.proto == PROTO_TCP
        && !config_has(CONFIG_CONNECTS_COUNTED)
        && first_syn(skb, l4_offset)
    {
        count_first_syn(&key, value);
    }
    Some((key, l4_offset, false))
}

/// The common case at cgroup skb egress, read in place with word loads:
/// IPv4 without options or IPv6 without extension headers, carrying TCP or
/// UDP. Anything else (None) goes through [`parse_destination`]. Returns the
/// same as it does.
#[inline(always)]
fn quick_destination(sk_buff: &aya_ebpf::bindings::__sk_buff) -> Option<(FlowKey, usize, u16)> {
    let (data, end) = (sk_buff.data as usize, sk_buff.data_end as usize);
    let p = data as *const u8;
    // SAFETY: every load is within the bytes checked against data_end just
    // before it. Words are loaded unaligned, which the JITs of the kernels
    // egressmon runs on (x86-64, arm64) allow for packet data.
    let (proto, family, addr, l4_offset, ports) = unsafe {
        match u16::from_be(sk_buff.protocol as u16) as u32 {
            ETH_P_IP => {
                if data + 24 > end || *p != 0x45 {
                    return None;
                }
                let daddr = *(p.add(16) as *const u32);
                (
                    *p.add(9),
                    FAMILY_IPV4,
                    [daddr, 0, 0, 0],
                    20,
                    *(p.add(20) as *const u32),
                )
            }
            ETH_P_IPV6 => {
                if data + 44 > end {
                    return None;
                }
                let word = |at: usize| *(p.add(at) as *const u32);
                let daddr = [word(24), word(28), word(32), word(36)];
                (*p.add(6), FAMILY_IPV6, daddr, 40, word(40))
            }
            _ => return None,
        }
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    // The two big-endian ports as they lie in memory.
    let ports = ports.to_ne_bytes();
    let key = FlowKey {
        uid: 0,
        port: u16::from_be_bytes([ports[2], ports[3]]),
        proto,
        family,
        // SAFETY: four words are sixteen bytes, in memory order.
        addr: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(addr) },
    };
    Some((key, l4_offset, u16::from_be_bytes([ports[0], ports[1]])))
}

/// A packet of the agent's own (its sockets carry [`OWN_MARK`]; only
/// processes with CAP_NET_ADMIN can set a mark, and this one is random).
#[inline(always)]
fn is_own(skb: &SkBuff) -> bool {
    // SAFETY: a read-only global the loader set.
    let own = unsafe { core::ptr::read_volatile(&OWN_MARK) };
    own != 0 && unsafe { (*skb.skb).mark } == own
}

#[inline(always)]
fn is_ephemeral(port: u16) -> bool {
    // SAFETY: read-only globals the loader set; volatile so the compiler
    // does not fold in the defaults.
    let (first, last) = unsafe {
        (
            core::ptr::read_volatile(&EPHEMERAL_FIRST),
            core::ptr::read_volatile(&EPHEMERAL_LAST),
        )
    };
    (first..=last).contains(&(port as u32))
}

/// A packet from a fixed local port to an ephemeral remote one: a local
/// service answering a client (an accepted TCP connection, a UDP server).
/// Clients send from ephemeral ports, so their traffic never matches.
#[inline(always)]
fn is_service_reply(local_port: u16, remote_port: u16) -> bool {
    local_port != 0 && !is_ephemeral(local_port) && is_ephemeral(remote_port)
}

/// A connection's first SYN (not a retransmission): where netd holds
/// connect4/6, tc egress counts connects from it. The socket's `segs_out`
/// already includes the segment being sent, so it is 1 only for the first.
#[inline(always)]
fn first_syn(skb: &SkBuff, l4_offset: usize) -> bool {
    let Ok(flags) = skb.load::<u8>(l4_offset + 13) else {
        return false;
    };
    // SYN without ACK.
    if flags & 0x12 != 0x02 {
        return false;
    }
    let Some(full) = full_sock(skb) else {
        return false;
    };
    // SAFETY: a helper on a full socket, its result null-checked.
    unsafe {
        let tcp = bpf_tcp_sock(full);
        !tcp.is_null() && (*tcp).segs_out == 1
    }
}

/// The full socket the packet belongs to, if it has one.
#[inline(always)]
fn full_sock(skb: &SkBuff) -> Option<*mut aya_ebpf::bindings::bpf_sock> {
    // SAFETY: helpers on the skb's socket pointer, each result null-checked.
    unsafe {
        let sk = (*skb.skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return None;
        }
        let full = bpf_sk_fullsock(sk);
        (!full.is_null()).then_some(full)
    }
}

#[inline(always)]
fn config_has(bit: u32) -> bool {
    CONFIG.get(0).is_some_and(|flags| flags & bit != 0)
}

/// Remembers which uid's socket sent a DNS query from which local port, and
/// the query's id: an answer is forwarded only to the uid that asked from
/// that port, with one of its ids (at tc ingress answers carry no socket;
/// at skb ingress one uid could otherwise name another uid's destinations
/// with forged answers).
#[inline(always)]
fn note_dns_query(skb: &SkBuff, key: &FlowKey, l4_offset: usize) {
    if key.port != 53 || key.uid == KERNEL_UID || key.family & FAMILY_INBOUND != 0 {
        return;
    }
    let Ok(sport) = skb.load::<u16>(l4_offset) else {
        return;
    };
    let Some(id) = dns_id(skb, key.proto, l4_offset) else {
        return;
    };
    let port_key = DnsPortKey {
        port: u16::from_be(sport),
        family: key.family,
        proto: key.proto,
    };
    if let Some(known) = DNS_PORTS.get_ptr_mut(port_key) {
        // SAFETY: map value from a successful lookup.
        let known = unsafe { &mut *known };
        if known.uid == key.uid {
            let slot = (known.next as usize) % DNS_QUERY_IDS;
            if let Some(entry) = known.ids.get_mut(slot) {
                *entry = id;
            }
            known.next = known.next.wrapping_add(1);
            return;
        }
    }
    let fresh = DnsQueries {
        uid: key.uid,
        ids: [id; DNS_QUERY_IDS],
        next: 1,
    };
    let _ = DNS_PORTS.insert(port_key, fresh, BPF_ANY as u64);
}

/// The id of the DNS message in this packet: the first two payload bytes
/// (over TCP, after the two-byte length). None without payload.
#[inline(always)]
fn dns_id(skb: &SkBuff, proto: u8, l4_offset: usize) -> Option<u16> {
    let len = unsafe { (*skb.skb).len };
    let offset = payload_offset(skb, proto, l4_offset, len, false)?;
    let at = if proto == PROTO_TCP {
        offset + 2
    } else {
        offset
    };
    skb.load::<u16>(at).ok()
}

/// The TCP header's data offset byte. With `in_place`, read in place where
/// the header is in the skb's linear area (at cgroup skb egress, always: the
/// local stack built it): that saves a helper call on every packet of a flow
/// whose payload is still wanted, such as a connection that has sent none.
#[inline(always)]
fn tcp_data_offset(skb: &SkBuff, l4_offset: usize, in_place: bool) -> Option<u8> {
    // SAFETY: the context fields the verifier rewrites into packet pointers.
    let (data, end) = unsafe { ((*skb.skb).data as usize, (*skb.skb).data_end as usize) };
    // The offset bounded first, so the verifier accepts it into the packet.
    if in_place && l4_offset <= MAX_L4_OFFSET && data + l4_offset + 13 <= end {
        // SAFETY: bounds checked against data_end just above.
        return Some(unsafe { *((data + l4_offset + 12) as *const u8) });
    }
    skb.load(l4_offset + 12).ok()
}

/// Offset of the transport payload, if the packet carries any (`in_place`:
/// see [`tcp_data_offset`]).
#[inline(always)]
fn payload_offset(
    skb: &SkBuff,
    proto: u8,
    l4_offset: usize,
    len: u32,
    in_place: bool,
) -> Option<usize> {
    let offset = match proto {
        PROTO_TCP => {
            let data_offset = tcp_data_offset(skb, l4_offset, in_place)?;
            l4_offset + ((data_offset >> 4) as usize) * 4
        }
        PROTO_UDP => l4_offset + 8,
        _ => return None,
    };
    (offset < len as usize).then_some(offset)
}

/// Hands a flow's payload to the agent: its first packet's, and for flows
/// whose first payload is not TLS or QUIC the following packets' too, until
/// [`EVIDENCE_BYTES`] or [`EVIDENCE_PACKETS`] (identifiers in a request's
/// body are rarely in the packet carrying its headers). The flow value's
/// mark, shared by every CPU, says how far it got, then [`CAPTURE_DONE`]
/// (or [`CAPTURE_ENCRYPTED`] when the first payload is TLS or QUIC) stops
/// further tries. A first payload that finds the ring full leaves the mark
/// alone: the next packet tries again, so a flood cannot leave a flow
/// unclassified for good. At most two copies per packet and no loop, so
/// the verifier's walk stays short.
#[inline(always)]
fn capture_payload(
    skb: &SkBuff,
    key: &FlowKey,
    l4_offset: usize,
    len: u32,
    value: *mut FlowValue,
    in_place: bool,
) {
    let Some(offset) = payload_offset(skb, key.proto, l4_offset, len, in_place) else {
        return;
    };
    // SAFETY: map value pointer from a successful lookup.
    let mark = unsafe { (*value).captured };
    let (mut at, packets) = (mark as u32, (mark >> 32) as u32);
    let mut from = offset as u32;
    if at == 0 {
        let Some((copied, encrypted)) = emit_payload(skb, key, PAYLOAD_FIRST_EGRESS, from, len, 0)
        else {
            return;
        };
        if encrypted {
            // SAFETY: as above.
            unsafe { (*value).captured = CAPTURE_ENCRYPTED };
            return;
        }
        at = copied;
        from += copied;
    }
    if from < len && at < EVIDENCE_BYTES {
        at += emit_more_payload(skb, key, from, len, at);
    }
    let mark = match packets + 1 >= EVIDENCE_PACKETS || at >= EVIDENCE_BYTES {
        true => CAPTURE_DONE,
        false => ((packets as u64 + 1) << 32) | at as u64,
    };
    // SAFETY: as above.
    unsafe { (*value).captured = mark };
}

/// Hands the payload from skb offset `from` to the agent, up to the flow's
/// first [`EVIDENCE_BYTES`] (it starts `at` bytes into them), as a record
/// only as long as what was copied: a per-CPU scratch slice is filled,
/// then output. Returns the bytes handed over (0 when the ring is full,
/// counted in `STAT_PAYLOADS_LOST`).
#[inline(always)]
fn emit_more_payload(skb: &SkBuff, key: &FlowKey, from: u32, len: u32, at: u32) -> u32 {
    let Some(slice) = PAYLOAD_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let want = len
        .saturating_sub(from)
        .min(EVIDENCE_BYTES.saturating_sub(at));
    let Some(n) = copy_len(want, EVIDENCE_BYTES) else {
        return 0;
    };
    // SAFETY: a per-CPU map value of PayloadSlice's size: the header is
    // written whole, `data` up to `n` by the helper, and only the header
    // and those `n` bytes are output.
    unsafe {
        (*slice).key = *key;
        (*slice).kind = PAYLOAD_MORE_EGRESS;
        (*slice)._pad = [0; 3];
        (*slice).len = len - from;
        (*slice).captured = n;
        (*slice).at = at;
        let data = (*slice).data.as_mut_ptr() as *mut core::ffi::c_void;
        if bpf_skb_load_bytes(skb.skb as *const _, from, data, n) != 0 {
            return 0;
        }
        let record =
            core::slice::from_raw_parts(slice as *const u8, PAYLOAD_HEADER_BYTES + n as usize);
        if PAYLOADS.output::<[u8]>(record, BPF_RB_NO_WAKEUP).is_err() {
            trouble(STAT_PAYLOADS_LOST);
            return 0;
        }
    }
    bump_stat(STAT_PAYLOADS_SENT);
    n
}

/// How many of `wanted` bytes to copy into `capacity` bytes, as a length
/// the verifier can prove to be in 1..=capacity (it tracks `wanted - 1`
/// clamped to `capacity - 1`, plus one, better than a plain `min`); None
/// for nothing to copy.
#[inline(always)]
fn copy_len(wanted: u32, capacity: u32) -> Option<u32> {
    // Read through memory, so the compiler keeps the clamp below even where
    // it can prove the bound itself (the verifier cannot always follow it).
    // SAFETY: a read of a local.
    let wanted = unsafe { core::ptr::read_volatile(&wanted) };
    if wanted == 0 {
        return None;
    }
    let mut last = wanted - 1;
    if last > capacity - 1 {
        last = capacity - 1;
    }
    Some(last + 1)
}

/// A first payload that opens TLS (a handshake record) or QUIC (a long
/// header of version 1 or 2): encrypted from here on.
#[inline(always)]
fn looks_encrypted(key: &FlowKey, head: &[u8; PAYLOAD_CAPTURE_BYTES]) -> bool {
    match key.proto {
        PROTO_TCP => head[0] == 0x16 && head[1] == 0x03,
        _ => {
            let version = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
            key.port != 53 && head[0] & 0xC0 == 0xC0 && (version == 1 || version == 0x6b33_43cf)
        }
    }
}

/// Hands up to [`PAYLOAD_CAPTURE_BYTES`] of payload from skb offset `from`
/// to the agent, marked as starting `at` bytes into the flow's payload.
/// Returns the bytes copied and whether they look encrypted, or None when
/// the ring is full (counted in `STAT_PAYLOADS_LOST`).
#[inline(always)]
fn emit_payload(
    skb: &SkBuff,
    key: &FlowKey,
    kind: u8,
    from: u32,
    len: u32,
    at: u32,
) -> Option<(u32, bool)> {
    let Some(mut entry) = PAYLOADS.reserve::<PayloadEvent>(0) else {
        trouble(STAT_PAYLOADS_LOST);
        return None;
    };
    let event = entry.as_mut_ptr();
    let mut encrypted = false;
    // SAFETY: reserved ring-buffer memory of PayloadEvent's size; every
    // header field is written, `data` up to `captured`.
    unsafe {
        (*event).key = *key;
        (*event).kind = kind;
        (*event)._pad = [0; 3];
        (*event).len = len.saturating_sub(from);
        (*event).at = at;
        (*event).captured = 0;
        if let Some(n) = copy_len(len.saturating_sub(from), PAYLOAD_CAPTURE_BYTES as u32) {
            let data = (*event).data.as_mut_ptr() as *mut core::ffi::c_void;
            if bpf_skb_load_bytes(skb.skb as *const _, from, data, n) == 0 {
                (*event).captured = n;
                encrypted = n >= 5 && looks_encrypted(key, &(*event).data);
            }
        }
    }
    bump_stat(STAT_PAYLOADS_SENT);
    // SAFETY: written just above.
    let copied = unsafe { (*event).captured };
    entry.submit(BPF_RB_NO_WAKEUP);
    Some((copied, encrypted))
}

// ---- skb ingress: DNS responses ---------------------------------------------

#[cgroup_skb(ingress)]
pub fn skb_ingress(ctx: SkBuffContext) -> i32 {
    if let Some(filter) = capture_filter() {
        capture_ingress(&ctx.skb, filter, 0, HOOK_SKB_INGRESS);
    }
    if may_be_dns_answer(&ctx.skb) {
        dns_response(&ctx.skb, 0, false);
    }
    ALLOW
}

/// Every received packet passes skb ingress, so it is turned away from the
/// headers read in place (no helper call): false for a TCP or UDP packet
/// whose source port is not 53, and for other protocols. Packets whose
/// headers are not where this looks (IPv4 options, IPv6 extension headers,
/// short linear data) go to the full parse.
#[inline(always)]
fn may_be_dns_answer(skb: &SkBuff) -> bool {
    // SAFETY: the context fields the verifier rewrites into packet pointers.
    let (data, end, protocol) = unsafe {
        let sk_buff = &*skb.skb;
        (
            sk_buff.data as usize,
            sk_buff.data_end as usize,
            sk_buff.protocol,
        )
    };
    let (proto, sport) = match u16::from_be(protocol as u16) as u32 {
        ETH_P_IP => {
            if data + 22 > end {
                return true;
            }
            // SAFETY: bounds checked against data_end just above.
            let header = unsafe { &*(data as *const [u8; 22]) };
            if header[0] & 0x0f != 5 {
                return true;
            }
            (header[9], [header[20], header[21]])
        }
        ETH_P_IPV6 => {
            if data + 42 > end {
                return true;
            }
            // SAFETY: bounds checked against data_end just above.
            let header = unsafe { &*(data as *const [u8; 42]) };
            if is_ipv6_extension(header[6]) {
                return true;
            }
            (header[6], [header[40], header[41]])
        }
        _ => return false,
    };
    (proto == PROTO_UDP || proto == PROTO_TCP) && u16::from_be_bytes(sport) == 53
}

#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    if let Some(l3) = l3_offset(&ctx.skb) {
        if let Some(filter) = capture_filter() {
            capture_ingress(&ctx.skb, filter, l3, HOOK_TC_INGRESS);
        }
        dns_response(&ctx.skb, l3, true);
    }
    TC_ACT_UNSPEC
}

/// Forwards DNS responses (source port 53) to the agent, keyed by the
/// receiving socket's uid (at tc, the uid that sent the query from that
/// port) and the resolver's address. Any other packet costs two byte loads
/// and a compare.
#[inline(always)]
fn dns_response(skb: &SkBuff, l3: usize, tc: bool) -> Option<()> {
    let sk_buff = unsafe { &*skb.skb };
    let mut key = FlowKey::default();
    let l4_offset;
    match u16::from_be(sk_buff.protocol as u16) as u32 {
        ETH_P_IP => {
            key.proto = skb.load::<u8>(l3 + 9).ok()?;
            if key.proto != PROTO_UDP && key.proto != PROTO_TCP {
                return None;
            }
            let vihl: u8 = skb.load(l3).ok()?;
            l4_offset = l3 + ((vihl & 0x0f) as usize) * 4;
            key.family = FAMILY_IPV4;
        }
        ETH_P_IPV6 => {
            key.proto = skb.load::<u8>(l3 + 6).ok()?;
            l4_offset = if is_ipv6_extension(key.proto) {
                let (inner, offset, _) = past_ipv6_extensions(skb, key, l3 + 40);
                key.proto = inner.proto;
                offset
            } else {
                l3 + 40
            };
            if key.proto != PROTO_UDP && key.proto != PROTO_TCP {
                return None;
            }
            key.family = FAMILY_IPV6;
        }
        _ => return None,
    }
    let ports: [u8; 4] = skb.load(l4_offset).ok()?;
    if u16::from_be_bytes([ports[0], ports[1]]) != 53 {
        return None;
    }
    if key.family == FAMILY_IPV4 {
        let saddr: [u8; 4] = skb.load(l3 + 12).ok()?;
        key.addr[..4].copy_from_slice(&saddr);
    } else {
        key.addr = skb.load(l3 + 8).ok()?;
    }
    key.port = 53;
    // The uid whose socket sent a query from this port. At tc ingress the
    // packet has no socket of ours yet (on a veth it may still carry the
    // sender's, from the other namespace), so that uid is the answer's
    // owner; at skb ingress the receiving socket must be that uid's, else
    // the answer is not forwarded (no query, or another uid's).
    let port_key = DnsPortKey {
        port: u16::from_be_bytes([ports[2], ports[3]]),
        family: key.family,
        proto: key.proto,
    };
    let id = dns_id(skb, key.proto, l4_offset)?;
    let asked_by = unsafe { DNS_PORTS.get(port_key) }
        .filter(|asked| asked.ids.contains(&id))
        .map(|asked| asked.uid);
    key.uid = if tc {
        asked_by.unwrap_or(KERNEL_UID)
    } else if sk_buff_has_sock(sk_buff) && asked_by == Some(skb.get_socket_uid()) {
        asked_by?
    } else {
        return None;
    };
    let len = sk_buff.len;
    let offset = payload_offset(skb, key.proto, l4_offset, len, false)?;
    emit_payload(skb, &key, PAYLOAD_DNS_RESPONSE, offset as u32, len, 0);
    Some(())
}

// ---- egressmon capture --------------------------------------------------------

/// The running capture's filter, or None when no capture runs: an array
/// lookup at a constant index (the verifier inlines it) and one compare,
/// all that every packet pays while nobody captures.
#[inline(always)]
fn capture_filter() -> Option<*mut CaptureFilter> {
    let filter = CAPTURE_FILTER.get_ptr_mut(0)?;
    // SAFETY: the array's one slot, always present.
    (unsafe { (*filter).active } != 0).then_some(filter)
}

/// Whether the capture selects a packet of flow `key` whose flow value
/// carries payload mark `mark`.
#[inline(always)]
fn capture_selects(filter: &CaptureFilter, key: &FlowKey, mark: u64) -> bool {
    let flags = filter.flags;
    if flags & CAPTURE_ANY_UID == 0 && unsafe { CAPTURE_UIDS.get(key.uid) }.is_none() {
        return false;
    }
    if flags & CAPTURE_CLEARTEXT_ONLY != 0 && mark == CAPTURE_ENCRYPTED {
        return false;
    }
    if flags & CAPTURE_DST != 0 {
        if key.family & !FAMILY_INBOUND != filter.dst_family || key.addr != filter.dst_addr {
            return false;
        }
        if filter.dst_port != 0 && key.port != filter.dst_port {
            return false;
        }
    }
    true
}

/// Copies one packet of flow `key` into the capture ring if the capture
/// selects it: from the IP header at `l3` on, at most the snap length
/// (and [`CAPTURE_BYTES`]). A full ring counts the packet in `lost`.
/// Returns whether the packet was selected.
#[inline(always)]
fn capture_packet(
    skb: &SkBuff,
    filter: *mut CaptureFilter,
    key: &FlowKey,
    l3: usize,
    mark: u64,
    direction: u8,
    hook: u8,
) -> bool {
    // SAFETY: the filter map's slot (from `capture_filter`).
    let filter = unsafe { &mut *filter };
    if !capture_selects(filter, key, mark) {
        return false;
    }
    let Some(mut entry) = CAPTURE.reserve::<CapturedPacket>(0) else {
        add(&mut filter.lost, 1);
        return true;
    };
    add(&mut filter.seen, 1);
    let len = unsafe { (*skb.skb).len }.saturating_sub(l3 as u32);
    let mut wanted = filter.snaplen;
    if wanted > len {
        wanted = len;
    }
    let packet = entry.as_mut_ptr();
    // SAFETY: reserved ring-buffer memory of CapturedPacket's size; every
    // header field is written, `data` up to `captured`.
    unsafe {
        (*packet).key = *key;
        (*packet).ts = bpf_ktime_get_boot_ns();
        (*packet).len = len;
        (*packet).captured = 0;
        (*packet).direction = direction;
        (*packet).hook = hook;
        // Byte by byte: a 6-byte fill would become a call to memset, a
        // frame more in the chain.
        for i in 0..6 {
            core::ptr::write_volatile(&mut (*packet)._pad[i], 0);
        }
        if let Some(n) = copy_len(wanted, CAPTURE_BYTES as u32) {
            let data = (*packet).data.as_mut_ptr() as *mut core::ffi::c_void;
            if bpf_skb_load_bytes(skb.skb as *const _, l3 as u32, data, n) == 0 {
                (*packet).captured = n;
            }
        }
    }
    let flags = if CAPTURE.query(BPF_RB_AVAIL_DATA) > CAPTURE_RING_BYTES as u64 / 4 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags);
    true
}

/// At tc egress, the local port a captured packet left from names its uid
/// for the answers tc ingress sees (they carry no socket of ours yet).
#[inline(always)]
fn remember_capture_port(key: &FlowKey, local_port: u16, hook: u8) {
    if hook != HOOK_TC_EGRESS || local_port == 0 || key.uid == KERNEL_UID {
        return;
    }
    let port_key = DnsPortKey {
        port: local_port,
        family: key.family & !FAMILY_INBOUND,
        proto: key.proto,
    };
    let _ = CAPTURE_PORTS.insert(port_key, key.uid, BPF_ANY as u64);
}

/// Captures a sent packet, if selected, before it is counted. It parses
/// the packet on its own and leaves nothing behind that the counting reads,
/// so the verifier walks the counting once, not once per way through the
/// capture (tc egress's counting alone takes half of the verifier's budget).
/// A function of its own (a BPF subprogram): returning to the same state
/// lets the verifier prune at the call's end. The chain of frames stays
/// within 512 bytes with a 32-byte callee (5.10 rounds each frame up to 32).
#[inline(never)]
fn capture_egress(skb: &SkBuff, filter: *mut CaptureFilter, l3: usize, hook: u8) {
    let sk_buff = unsafe { &*skb.skb };
    let Some((mut key, _, local_port)) = parse_destination(skb, sk_buff.protocol, l3) else {
        return;
    };
    key.uid = match sk_buff_has_sock(sk_buff) {
        true => skb.get_socket_uid(),
        false => KERNEL_UID,
    };
    if is_service_reply(local_port, key.port) {
        key.port = local_port;
        key.family |= FAMILY_INBOUND;
    }
    let mark = cleartext_mark(filter, &key);
    if capture_packet(skb, filter, &key, l3, mark, CAPTURED_EGRESS, hook) {
        remember_capture_port(&key, local_port, hook);
    }
}

/// The flow's payload mark when the capture leaves encrypted flows out
/// (else 0: no lookup).
#[inline(always)]
fn cleartext_mark(filter: *mut CaptureFilter, key: &FlowKey) -> u64 {
    // SAFETY: the filter map's slot (from `capture_filter`).
    match unsafe { (*filter).flags } & CAPTURE_CLEARTEXT_ONLY != 0 {
        true => unsafe { FLOWS.get(key) }.map_or(0, |value| value.captured),
        false => 0,
    }
}

/// Captures a received packet, if selected, as part of the local socket's
/// flow: the flow key egress gives the socket's packets to the packet's
/// source. At cgroup skb ingress the uid is the receiving socket's; at tc
/// ingress, the uid whose captured packets left from the destination port.
/// A BPF subprogram, like [`capture_egress`].
#[inline(never)]
fn capture_ingress(skb: &SkBuff, filter: *mut CaptureFilter, l3: usize, hook: u8) {
    let sk_buff = unsafe { &*skb.skb };
    let Some((mut key, local_port)) = parse_source(skb, sk_buff.protocol, l3) else {
        return;
    };
    key.uid = if hook == HOOK_TC_INGRESS {
        let port_key = DnsPortKey {
            port: local_port,
            family: key.family & !FAMILY_INBOUND,
            proto: key.proto,
        };
        unsafe { CAPTURE_PORTS.get(port_key) }
            .copied()
            .unwrap_or(KERNEL_UID)
    } else if !sk_buff_has_sock(sk_buff) {
        KERNEL_UID
    } else if is_own_socket(skb) {
        return;
    } else {
        skb.get_socket_uid()
    };
    let mark = cleartext_mark(filter, &key);
    capture_packet(skb, filter, &key, l3, mark, CAPTURED_INGRESS, hook);
}

/// A received packet for one of the agent's own sockets (they carry
/// [`OWN_MARK`]): egressmon never observes its own traffic.
#[inline(always)]
fn is_own_socket(skb: &SkBuff) -> bool {
    // SAFETY: a read-only global the loader set.
    let own = unsafe { core::ptr::read_volatile(&OWN_MARK) };
    if own == 0 {
        return false;
    }
    // SAFETY: a full socket from the helper, null-checked.
    full_sock(skb).is_some_and(|full| unsafe { (*full).mark } == own)
}

/// The flow key (uid unset) of the local socket a received packet is for,
/// and the local port: the remote end is the packet's source, and a local
/// service's clients make inbound flows keyed by the service's port, as at
/// egress (see [`is_service_reply`]). Only while a capture runs.
#[inline(always)]
fn parse_source(skb: &SkBuff, protocol_be: u32, l3: usize) -> Option<(FlowKey, u16)> {
    let mut key = FlowKey::default();
    let l4_offset;
    match u16::from_be(protocol_be as u16) as u32 {
        ETH_P_IP => {
            let header: [u8; 20] = skb.load(l3).ok()?;
            key.proto = header[9];
            key.family = FAMILY_IPV4;
            key.addr[..4].copy_from_slice(&header[12..16]);
            // A non-first fragment has no ports.
            if u16::from_be_bytes([header[6], header[7]]) & 0x1fff != 0 {
                return Some((key, 0));
            }
            l4_offset = l3 + ((header[0] & 0x0f) as usize) * 4;
        }
        ETH_P_IPV6 => {
            let header: [u8; 24] = skb.load(l3).ok()?;
            key.proto = header[6];
            key.family = FAMILY_IPV6;
            key.addr.copy_from_slice(&header[8..24]);
            l4_offset = l3 + 40;
            if is_ipv6_extension(key.proto) {
                // Its "destination" port is the packet's: our local one.
                let (inner, _, remote_port) = past_ipv6_extensions(skb, key, l4_offset);
                let local_port = inner.port;
                return Some((with_remote_port(inner, local_port, remote_port), local_port));
            }
        }
        _ => return None,
    }
    if key.proto != PROTO_TCP && key.proto != PROTO_UDP {
        return Some((key, 0));
    }
    let ports: [u8; 4] = skb.load(l4_offset).ok()?;
    let remote_port = u16::from_be_bytes([ports[0], ports[1]]);
    let local_port = u16::from_be_bytes([ports[2], ports[3]]);
    Some((with_remote_port(key, local_port, remote_port), local_port))
}

/// `key` with the port egress would key the socket's flow by.
#[inline(always)]
fn with_remote_port(mut key: FlowKey, local_port: u16, remote_port: u16) -> FlowKey {
    key.port = remote_port;
    if is_service_reply(local_port, remote_port) {
        key.port = local_port;
        key.family |= FAMILY_INBOUND;
    }
    key
}

#[inline(always)]
fn sk_buff_has_sock(sk_buff: &aya_ebpf::bindings::__sk_buff) -> bool {
    !unsafe { sk_buff.__bindgen_anon_2.sk }.is_null()
}

/// The socket's uid, or [`KERNEL_UID`] when the skb carries no full socket.
#[inline(always)]
fn skb_owner(skb: &SkBuff) -> u32 {
    if !sk_buff_has_sock(unsafe { &*skb.skb }) {
        bump_stat(STAT_KERNEL_PACKETS);
        return KERNEL_UID;
    }
    skb.get_socket_uid()
}

/// Destination (protocol, family, address, port) from the IP header at
/// `l3`. The hooks run before fragmentation, so every skb starts with its L4
/// header. At cgroup skb (`l3` 0) the headers a local socket builds are in
/// the skb's linear area, which the program reads in place (no helper call);
/// anything else goes through `bpf_skb_load_bytes`. Returns the key (uid
/// unset), the transport header's offset and the local (source) port (0
/// without TCP or UDP).
#[inline(always)]
fn parse_destination(skb: &SkBuff, protocol_be: u32, l3: usize) -> Option<(FlowKey, usize, u16)> {
    // SAFETY: the context fields the verifier rewrites into packet pointers.
    let (data, end) = unsafe { ((*skb.skb).data as usize, (*skb.skb).data_end as usize) };
    let mut key = FlowKey::default();
    let l4_offset;
    let mut ports = None;
    match u16::from_be(protocol_be as u16) as u32 {
        ETH_P_IP => {
            if l3 == 0 && data + 24 <= end {
                // SAFETY: bounds checked against data_end just above.
                let header = unsafe { &*(data as *const [u8; 24]) };
                key.proto = header[9];
                key.addr[..4].copy_from_slice(&header[16..20]);
                l4_offset = ((header[0] & 0x0f) as usize) * 4;
                if l4_offset == 20 {
                    ports = Some([header[20], header[21], header[22], header[23]]);
                }
            } else {
                let header: [u8; 20] = skb.load(l3).ok()?;
                key.proto = header[9];
                key.addr[..4].copy_from_slice(&header[16..20]);
                key.family = FAMILY_IPV4;
                // tc sees IP fragments: a non-first one has no ports.
                if u16::from_be_bytes([header[6], header[7]]) & 0x1fff != 0 {
                    return Some((key, NO_L4, 0));
                }
                l4_offset = l3 + ((header[0] & 0x0f) as usize) * 4;
            }
            key.family = FAMILY_IPV4;
        }
        ETH_P_IPV6 => {
            if l3 == 0 && data + 44 <= end {
                // SAFETY: bounds checked against data_end just above.
                let header = unsafe { &*(data as *const [u8; 44]) };
                key.proto = header[6];
                key.addr.copy_from_slice(&header[24..40]);
                ports = Some([header[40], header[41], header[42], header[43]]);
            } else {
                let header: [u8; 40] = skb.load(l3).ok()?;
                key.proto = header[6];
                key.addr.copy_from_slice(&header[24..40]);
            }
            key.family = FAMILY_IPV6;
            l4_offset = l3 + 40;
            if is_ipv6_extension(key.proto) {
                return Some(past_ipv6_extensions(skb, key, l4_offset));
            }
        }
        _ => return None,
    }
    let mut local_port = 0;
    if key.proto == PROTO_TCP || key.proto == PROTO_UDP {
        let ports = match ports {
            Some(ports) => ports,
            None => skb.load::<[u8; 4]>(l4_offset).ok()?,
        };
        local_port = u16::from_be_bytes([ports[0], ports[1]]);
        key.port = u16::from_be_bytes([ports[2], ports[3]]);
    }
    Some((key, l4_offset, local_port))
}

/// IPv6 extension headers egressmon steps over to reach the transport
/// header: hop-by-hop options, routing, fragment, destination options.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;
/// More than this many extension headers in a row is not a real sender's.
const MAX_IPV6_EXTENSIONS: usize = 4;
/// An offset no packet reaches: "no transport header here" for the callers
/// that read ports, flags or payload at the L4 offset (their loads fail).
const NO_L4: usize = 0xffff;
/// Where an in-place read of the transport header may start at most (the
/// verifier needs a bound on the offset): past the longest link header and
/// an IPv4 header with every option (82 bytes) with room to spare. A header
/// further in (IPv6 behind long extension headers) is read by the helper.
const MAX_L4_OFFSET: usize = 256;

#[inline(always)]
fn is_ipv6_extension(next: u8) -> bool {
    matches!(
        next,
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_DEST_OPTS
    )
}

/// The key and L4 offset of an IPv6 packet whose first next-header is an
/// extension header: the real transport protocol and port past them. A
/// non-first fragment (and a chain too long or unreadable) has no transport
/// header: its bytes count under port 0 with the last protocol read.
#[inline(always)]
fn past_ipv6_extensions(
    skb: &SkBuff,
    mut key: FlowKey,
    mut offset: usize,
) -> (FlowKey, usize, u16) {
    key.port = 0;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        let Ok(header) = skb.load::<[u8; 4]>(offset) else {
            return (key, NO_L4, 0);
        };
        let this = key.proto;
        key.proto = header[0];
        if this == IPV6_FRAGMENT {
            offset += 8;
            if u16::from_be_bytes([header[2], header[3]]) & 0xfff8 != 0 {
                return (key, NO_L4, 0);
            }
        } else {
            offset += (header[1] as usize + 1) * 8;
        }
        if !is_ipv6_extension(key.proto) {
            let mut local_port = 0;
            if key.proto == PROTO_TCP || key.proto == PROTO_UDP {
                let Ok(ports) = skb.load::<[u8; 4]>(offset) else {
                    return (key, NO_L4, 0);
                };
                local_port = u16::from_be_bytes([ports[0], ports[1]]);
                key.port = u16::from_be_bytes([ports[2], ports[3]]);
            }
            return (key, offset, local_port);
        }
    }
    (key, NO_L4, 0)
}

const _: () = {
    assert!(AF_INET as u8 == FAMILY_IPV4 && AF_INET6 as u8 == FAMILY_IPV6);
};

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
