//! Types that cross the kernel boundary: map keys and values, ring-buffer
//! events, counter indices and the names of maps and programs.
//!
//! Every struct is `#[repr(C)]` with explicit padding so the eBPF programs and
//! the agent agree on the layout byte for byte, on every architecture.
#![no_std]

/// IP protocol numbers used in [`FlowKey::proto`].
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// Address families used in [`FlowKey::family`] (Linux `AF_*` values).
pub const FAMILY_IPV4: u8 = 2;
pub const FAMILY_IPV6: u8 = 10;
/// Set in [`FlowKey::family`] for the replies of a local service (a socket
/// sending from a fixed local port to a client's ephemeral port): `port` is
/// then the *local* port and `addr` the client, so a server's replies make
/// one flow per client address, not one per client connection.
pub const FAMILY_INBOUND: u8 = 0x80;

/// Pseudo-uid under which bytes are counted when the skb egress hook sees a
/// packet whose socket is not a full socket (kernel-made packets such as
/// request-socket replies). Never a real uid: Linux reserves `(uid_t)-1`.
pub const KERNEL_UID: u32 = u32::MAX;

/// One flow: who (uid) sent what (protocol, family) to where (address, port).
///
/// IPv4 addresses, including IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`),
/// occupy `addr[0..4]` with `family == FAMILY_IPV4`; the rest is zero.
/// `port` is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub uid: u32,
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    pub addr: [u8; 16],
}

/// Counters of one flow, shared by all CPUs (atomic adds).
///
/// Times are `CLOCK_BOOTTIME` nanoseconds (`bpf_ktime_get_boot_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// connect() calls (TCP and connected UDP), from the connect4/6 hooks.
    pub connects: u64,
    /// UDP datagrams: every UDP skb at skb egress, or unconnected sends at
    /// sendmsg4/6 when skb egress is not attached.
    pub udp_sends: u64,
    /// skbs seen at cgroup skb egress (before GSO/TSO segmentation).
    pub tx_packets: u64,
    /// Sum of skb->len at cgroup skb egress: IP header included.
    pub tx_bytes: u64,
    /// The block decision for this flow under the rules of generation
    /// `block_gen`: a [`BlockEntry::rule`] or 0. (Beside the counters: a
    /// packet reads both from the same cache line.)
    pub block: u32,
    /// [`MAP_BLOCK_GEN`] when `block` was decided: the next run decides
    /// again when the rules have changed since.
    pub block_gen: u32,
    /// Payload handed to the agent so far: bytes in the low 32 bits,
    /// packets in the high 32, or [`CAPTURE_ENCRYPTED`] / [`CAPTURE_DONE`]
    /// once no more is wanted (see [`PayloadEvent`] and [`EVIDENCE_BYTES`]).
    pub captured: u64,
    pub first_seen: u64,
    pub last_seen: u64,
    /// Attempts a block rule refused: connect() calls, datagrams, and
    /// packets of connections open when the rule came (in a dry run, those
    /// it would have refused). What is refused is not in the counters above.
    pub blocked: u64,
    /// The decision (`block`) under which `blocked` last grew: names the
    /// rule after a later change decided the flow again.
    pub blocked_by: u32,
    pub _pad: u32,
}

/// Key of the per-uid totals: uid and IP protocol (so metrics can be split
/// by protocol without depending on the evictable flow map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UidKey {
    pub uid: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Uids below this have direct slots for TCP and UDP in `UID_DIRECT` (an
/// array index per packet instead of a hash lookup): Linux's system and
/// first users, Android's system uids and user 0's apps (10000-19999).
pub const DIRECT_UIDS: u32 = 20_000;
/// Size of `UID_DIRECT`: a TCP and a UDP slot per direct uid.
pub const DIRECT_UID_SLOTS: u32 = DIRECT_UIDS * 2;

/// A uid's direct slot for `proto`, if it has one (TCP or UDP, uid below
/// [`DIRECT_UIDS`]); everything else counts in `UID_TOTALS`.
#[inline(always)]
pub const fn direct_uid_slot(uid: u32, proto: u8) -> Option<u32> {
    if uid >= DIRECT_UIDS {
        return None;
    }
    match proto {
        PROTO_TCP => Some(uid * 2),
        PROTO_UDP => Some(uid * 2 + 1),
        _ => None,
    }
}

/// Per-uid totals, kept in a plain hash map that destination churn cannot
/// evict (one entry per uid and protocol, not per destination).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UidTotals {
    pub connects: u64,
    pub udp_sends: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

/// UDP datagrams of a flow or uid from its kernel counters. A UDP skb is
/// one datagram: skb egress counts it in `tx_packets` only, saving an add
/// per datagram, and the sendmsg hooks count `udp_sends` only where skb
/// egress is not attached (then `tx_packets` stays 0). So a UDP flow's
/// datagrams are `udp_sends + tx_packets`; other protocols send none.
pub const fn udp_datagrams(proto: u8, udp_sends: u64, tx_packets: u64) -> u64 {
    if proto == PROTO_UDP {
        udp_sends + tx_packets
    } else {
        udp_sends
    }
}

/// Which hook saw a flow first, carried in [`FlowEvent::hook`].
pub const HOOK_CONNECT4: u8 = 1;
pub const HOOK_CONNECT6: u8 = 2;
pub const HOOK_SENDMSG4: u8 = 3;
pub const HOOK_SENDMSG6: u8 = 4;
pub const HOOK_SKB_EGRESS: u8 = 5;
/// tc (schedcls) egress on an interface: the fallback where netd holds the
/// cgroup skb hooks.
pub const HOOK_TC_EGRESS: u8 = 6;
/// cgroup skb ingress and tc ingress: only in [`CapturedPacket::hook`].
pub const HOOK_SKB_INGRESS: u8 = 7;
pub const HOOK_TC_INGRESS: u8 = 8;

/// Whether a hook runs in the sending task's context (so pid, comm and the
/// task's cgroup in its event name the sender).
pub const fn hook_in_task(hook: u8) -> bool {
    matches!(
        hook,
        HOOK_CONNECT4 | HOOK_CONNECT6 | HOOK_SENDMSG4 | HOOK_SENDMSG6
    )
}

/// Emitted once per new flow over the ring buffer.
///
/// `pid`/`tgid`/`comm` are those of the current task. At skb egress the
/// current task may be unrelated to the socket (softirq), so the agent prefers
/// the identity reported by a sock_addr hook for the same flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub key: FlowKey,
    pub cgroup_id: u64,
    pub ts: u64,
    pub pid: u32,
    pub tgid: u32,
    pub comm: [u8; 16],
    pub hook: u8,
    pub _pad: [u8; 7],
}

/// [`PayloadEvent::kind`]: the first payload bytes a flow sent (TLS
/// ClientHello, HTTP request, QUIC Initial, DNS query...).
pub const PAYLOAD_FIRST_EGRESS: u8 = 1;
/// A DNS response received (UDP or TCP source port 53); the key's address
/// and port are the resolver's, the uid the receiving socket's.
pub const PAYLOAD_DNS_RESPONSE: u8 = 2;
/// More of a flow's payload after its first bytes, for flows whose first
/// payload is not TLS or QUIC (evidence: identifiers sent in cleartext are
/// often in a request's body, not in the packet carrying its headers).
pub const PAYLOAD_MORE_EGRESS: u8 = 3;
/// Bytes of payload copied per event: a QUIC Initial's minimum datagram.
pub const PAYLOAD_CAPTURE_BYTES: usize = 1280;
/// A flow's payload is handed over until this many bytes...
pub const EVIDENCE_BYTES: u32 = 4096;
/// ...or this many packets have been, whichever comes first.
pub const EVIDENCE_PACKETS: u32 = 16;
/// [`FlowValue::captured`] once the flow's payload needs no more capture:
/// its first [`EVIDENCE_BYTES`] (or [`EVIDENCE_PACKETS`]) are over.
pub const CAPTURE_DONE: u64 = u64::MAX;
/// [`FlowValue::captured`] once the flow's first payload was TLS or QUIC:
/// no more payload capture either, and `egressmon capture --cleartext`
/// leaves the flow out. Every mark at or above it stops payload capture.
pub const CAPTURE_ENCRYPTED: u64 = u64::MAX - 1;

/// Payload bytes for the agent's host-name and payload classification and
/// its search for device identifiers, over the `PAYLOADS` ring buffer: a
/// flow's first [`EVIDENCE_BYTES`] at egress (only its first packet when
/// that is TLS or QUIC), once per DNS response at ingress. Never per packet
/// otherwise.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PayloadRecord<const N: usize> {
    pub key: FlowKey,
    pub kind: u8,
    pub _pad: [u8; 3],
    /// Payload length in the packet.
    pub len: u32,
    /// Bytes copied into `data` (at most `N`).
    pub captured: u32,
    /// Where `data` starts in the flow's payload (0 for its first bytes;
    /// 0 for DNS responses).
    pub at: u32,
    pub data: [u8; N],
}

/// A first payload or a DNS answer: the record is the whole struct.
pub type PayloadEvent = PayloadRecord<PAYLOAD_CAPTURE_BYTES>;

/// Bytes before `data` in every [`PayloadRecord`] (the same header).
pub const PAYLOAD_HEADER_BYTES: usize = 40;

/// A readable flow's payload after its first [`PAYLOAD_CAPTURE_BYTES`]
/// ([`PAYLOAD_MORE_EGRESS`]). The record in the ring is only as long as
/// what was copied (`PAYLOAD_HEADER_BYTES + captured`), not the whole
/// struct, which is the kernel's scratch space.
pub type PayloadSlice = PayloadRecord<{ EVIDENCE_BYTES as usize }>;

/// Indices into the per-CPU `STATS` array.
pub const STAT_EVENTS_LOST: u32 = 0;
pub const STAT_FLOW_UPDATE_FAILED: u32 = 1;
pub const STAT_UID_UPDATE_FAILED: u32 = 2;
pub const STAT_PARSE_SKIPPED: u32 = 3;
pub const STAT_KERNEL_PACKETS: u32 = 4;
/// Distinct flows announced (each either reached the ring buffer or was
/// counted in `STAT_EVENTS_LOST`).
pub const STAT_FLOWS_CREATED: u32 = 5;
/// Payload events dropped because the `PAYLOADS` ring was full.
pub const STAT_PAYLOADS_LOST: u32 = 6;
/// Payload events sent.
pub const STAT_PAYLOADS_SENT: u32 = 7;
pub const STAT_COUNT: u32 = 8;

/// Bit in the `CONFIG` array: skb egress is attached (sendmsg hooks then
/// only name senders instead of counting datagrams a second time).
pub const CONFIG_SKB_ATTACHED: u32 = 1;
/// Bit in `CONFIG`: a connect4/connect6 program counts connects, so tc
/// egress does not count first SYNs as connects.
pub const CONFIG_CONNECTS_COUNTED: u32 = 2;
pub const MAP_CONFIG: &str = "CONFIG";

/// Block rules (`action = "block"`): an LPM trie of [`BlockKey`] (with the
/// prefix length in front, as BPF_MAP_TYPE_LPM_TRIE wants) to
/// [`BlockEntry`]. Pinned: blocks outlive the agent (fail-closed).
pub const MAP_BLOCKS: &str = "BLOCKS";
/// One u32: the generation of the block rules, bumped by the agent at every
/// change, 0 while there is none (then a run costs one compare). Pinned, so
/// that a new agent goes on from the old one's generation.
pub const MAP_BLOCK_GEN: &str = "BLOCK_GEN";
/// Room in [`MAP_BLOCKS`]: prefixes of countries and networks for the uids
/// of the block rules, and the addresses their hosts resolved to.
pub const BLOCK_ENTRIES: u32 = 262_144;
/// [`BlockKey::uid`] of an entry for every uid (never a real one: Linux
/// reserves `(uid_t)-1`, and egressmon's kernel pseudo-uid is that).
pub const BLOCK_ANY_UID: u32 = u32::MAX - 1;
/// Bits of a [`BlockKey`]: the uid's 32, then the address's 128.
pub const BLOCK_KEY_BITS: u32 = 160;
/// [`BlockEntry::rule`]: refuse (the rule is enforced, not a dry run).
pub const BLOCK_ENFORCE: u32 = 1 << 31;
/// [`BlockEntry::rule`]: the rule's number (from 1) in its low bits.
pub const BLOCK_RULE_MASK: u32 = 0x00ff_ffff;

/// Key of [`MAP_BLOCKS`] after its prefix length: the uid (big-endian, so
/// that it is the first 32 bits matched) and the destination as IPv6 (IPv4
/// as `::ffff:a.b.c.d`). An entry's prefix length is 32 for every address
/// of the uid, 32 + 96 + n for an IPv4 /n, 32 + n for an IPv6 /n.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    pub uid: [u8; 4],
    pub addr: [u8; 16],
}

/// What a block entry refuses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockEntry {
    /// The rule's number ([`BLOCK_RULE_MASK`]) and [`BLOCK_ENFORCE`].
    pub rule: u32,
    /// Protocols refused, as bit `proto & 31` ([`block_proto_bit`]); all
    /// ones for every protocol.
    pub protos: u32,
    /// Destination ports refused (unused slots repeat a listed one)...
    pub ports: [u16; 4],
    /// ...unless this is 1: every port.
    pub any_port: u32,
    pub _pad: u32,
}

/// [`BlockEntry::protos`]'s bit for IP protocol `proto`.
pub const fn block_proto_bit(proto: u8) -> u32 {
    1 << (proto & 31)
}

impl BlockEntry {
    /// Whether the entry refuses a flow of `proto` to `port`. Arithmetic,
    /// not compares: BPF has no conditional move, and each compare would
    /// fork the verifier's walk of every program's hot path.
    #[inline(always)]
    pub fn covers(&self, proto: u8, port: u16) -> bool {
        let proto_ok = (self.protos >> (proto & 31)) & 1;
        let port = port as u64;
        // Zero exactly when a slot holds `port` (four factors below 2^16).
        let misses = (self.ports[0] as u64 ^ port)
            * (self.ports[1] as u64 ^ port)
            * (self.ports[2] as u64 ^ port)
            * (self.ports[3] as u64 ^ port);
        let listed_miss = misses * (1 ^ (self.any_port as u64 & 1));
        proto_ok != 0 && listed_miss == 0
    }
}

/// Map names as they appear in the object file and under the pin directory.
pub const MAP_FLOWS: &str = "FLOWS";
pub const MAP_UID_TOTALS: &str = "UID_TOTALS";
pub const MAP_UID_DIRECT: &str = "UID_DIRECT";
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_STATS: &str = "STATS";
pub const MAP_PAYLOADS: &str = "PAYLOADS";
/// Per-CPU scratch of the kernel's [`PayloadSlice`]s (not pinned).
pub const MAP_PAYLOAD_SCRATCH: &str = "PAYLOAD_SCRATCH";

/// `egressmon capture`: the packets of the selected flows
/// ([`CapturedPacket`]), a ring buffer only a capture reads.
pub const MAP_CAPTURE: &str = "CAPTURE";
/// The capture's one-slot array of [`CaptureFilter`]: what to copy, and
/// whether anything is (`active`, the only check on the hot path).
pub const MAP_CAPTURE_FILTER: &str = "CAPTURE_FILTER";
/// The uids a capture selects (key uid, value unused) unless it takes any.
pub const MAP_CAPTURE_UIDS: &str = "CAPTURE_UIDS";
/// Local port -> uid of the tc egress packets a capture took (tc only, not
/// pinned): at tc ingress a packet has no socket yet, so its uid is that of
/// the socket that sent from its destination port.
pub const MAP_CAPTURE_PORTS: &str = "CAPTURE_PORTS";

/// 4 MiB: about 2,600 full packets between two polls of the capture.
pub const CAPTURE_RING_BYTES: u32 = 4 << 20;
pub const CAPTURE_UID_ENTRIES: u32 = 1024;
pub const CAPTURE_PORT_ENTRIES: u32 = 4096;
/// Bytes of a packet copied at most (from the IP header on); the capture's
/// snap length lowers it.
pub const CAPTURE_BYTES: usize = 1536;

/// [`CaptureFilter::flags`]: every uid (no `CAPTURE_UIDS` lookup).
pub const CAPTURE_ANY_UID: u32 = 1;
/// Leave out flows whose first payload was TLS or QUIC
/// ([`CAPTURE_ENCRYPTED`]).
pub const CAPTURE_CLEARTEXT_ONLY: u32 = 2;
/// Only flows to `dst_addr` (and `dst_port` unless 0).
pub const CAPTURE_DST: u32 = 4;

/// What a running capture selects, written by `egressmon capture` (slot 0
/// of `CAPTURE_FILTER`); all zero when no capture runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureFilter {
    /// 0: no capture runs, nothing is copied (the hot path reads only this).
    pub active: u32,
    /// `CAPTURE_ANY_UID`, `CAPTURE_CLEARTEXT_ONLY`, `CAPTURE_DST`.
    pub flags: u32,
    /// Bytes copied per packet at most (capped at [`CAPTURE_BYTES`]).
    pub snaplen: u32,
    /// With `CAPTURE_DST`: the flow's address and port as in [`FlowKey`]
    /// (family without [`FAMILY_INBOUND`]; port 0 for any).
    pub dst_port: u16,
    pub dst_family: u8,
    pub _pad: u8,
    pub dst_addr: [u8; 16],
    /// Selected packets the ring had no room for (atomic adds).
    pub lost: u64,
    /// Selected packets put in the ring (atomic adds).
    pub seen: u64,
}

/// [`CapturedPacket::direction`].
pub const CAPTURED_EGRESS: u8 = 1;
pub const CAPTURED_INGRESS: u8 = 2;

/// One packet of a selected flow, over the `CAPTURE` ring buffer. `data`
/// starts at the IP header (raw IP: cgroup skb packets start there, and the
/// tc programs copy from their L3 offset).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CapturedPacket {
    /// The flow it belongs to, as `FLOWS` keys it (at ingress: the local
    /// socket's flow, the remote end being the packet's source).
    pub key: FlowKey,
    /// `CLOCK_BOOTTIME` nanoseconds.
    pub ts: u64,
    /// Length on the wire from the IP header on.
    pub len: u32,
    /// Bytes copied into `data`.
    pub captured: u32,
    /// [`CAPTURED_EGRESS`] or [`CAPTURED_INGRESS`].
    pub direction: u8,
    /// `HOOK_SKB_EGRESS`, `HOOK_TC_EGRESS`, `HOOK_SKB_INGRESS`,
    /// `HOOK_TC_INGRESS`.
    pub hook: u8,
    pub _pad: [u8; 6],
    pub data: [u8; CAPTURE_BYTES],
}

/// Per interface index: bytes before the IP header on that interface (14 on
/// Ethernet, 0 on raw-IP links such as Android's rmnet_data), written by the
/// agent for every interface its tc programs are attached to.
pub const MAP_TC_L3_OFFSET: &str = "TC_L3_OFFSET";
/// DNS queries seen at tc egress: the querying socket's uid by its local
/// port, so tc ingress (where answers carry no socket yet) can name the uid
/// that asked.
pub const MAP_DNS_PORTS: &str = "DNS_PORTS";

/// Key of `DNS_PORTS`: the local port of a DNS query's socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsPortKey {
    pub port: u16,
    pub family: u8,
    pub proto: u8,
}

/// Value of `DNS_PORTS`: the uid whose socket sent DNS queries from that
/// port, and the ids of its latest queries (resolvers send several at once,
/// A and AAAA: an answer must carry one of these ids). Unused slots repeat
/// the first id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsQueries {
    pub uid: u32,
    pub ids: [u16; DNS_QUERY_IDS],
    /// Slot the next query id goes into (wraps).
    pub next: u32,
}

pub const DNS_QUERY_IDS: usize = 4;

/// Netlink tc filters the agent added (kernels before TCX): they outlive the
/// agent, so the next agent and `detach` find them here. A pinned array, so
/// the list lives in the pin directory (bpffs holds no regular files).
pub const MAP_TC_FILTERS: &str = "TC_FILTERS";
pub const TC_FILTER_SLOTS: u32 = 64;

/// One netlink tc filter; `ifindex` 0 marks a free slot, `handle` 0 a slot
/// taken for a filter being added (the agent takes the slot first, so a
/// filter of ours is never left unlisted).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcFilter {
    pub ifindex: u32,
    /// 1 for ingress, 0 for egress.
    pub ingress: u32,
    pub priority: u32,
    pub handle: u32,
}

/// Pin (and kernel) name of the one-entry array in which egressmon records
/// [`PIN_LAYOUT_VERSION`] beside its pins. Written by the agent, not by the
/// eBPF programs.
pub const MAP_LAYOUT_VERSION: &str = "LAYOUT_VERSION";
/// The layout of the pinned maps' keys and values above. Bump it whenever
/// one changes, even at the same size, so that no agent adopts maps an
/// egressmon of another layout left pinned.
/// 2: FLOWS shared by all CPUs (was per CPU, with FLOW_SEEN beside it),
/// UID_DIRECT added.
/// 3: CAPTURE, CAPTURE_FILTER and CAPTURE_UIDS added (`egressmon capture`).
/// 4: FlowValue gains `blocked`, `block`, `block_gen`; BLOCKS and BLOCK_GEN
/// added (block rules).
pub const PIN_LAYOUT_VERSION: u32 = 4;

/// Default map sizes (overridable at load time).
pub const DEFAULT_FLOW_ENTRIES: u32 = 65_536;
pub const DEFAULT_UID_ENTRIES: u32 = 16_384;
/// 512 KiB: about 7,000 new-flow events between two 100 ms polls (70,000 new
/// flows a second); the ring is mapped twice, so it costs twice that in RSS.
pub const DEFAULT_RINGBUF_BYTES: u32 = 512 * 1024;
pub const DEFAULT_PAYLOAD_RING_BYTES: u32 = 1024 * 1024;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain-old-data, repr(C), no implicit padding.
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for DnsPortKey {}
    unsafe impl aya::Pod for DnsQueries {}
    unsafe impl aya::Pod for TcFilter {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for BlockKey {}
    unsafe impl aya::Pod for BlockEntry {}
    unsafe impl aya::Pod for UidTotals {}
    unsafe impl aya::Pod for UidKey {}
    unsafe impl aya::Pod for PayloadEvent {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for CaptureFilter {}
    unsafe impl aya::Pod for CapturedPacket {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<FlowKey>(), 24);
        assert_eq!(size_of::<DnsQueries>(), 16);
        assert_eq!(size_of::<FlowValue>(), 80);
        assert_eq!(size_of::<BlockKey>(), 20);
        assert_eq!(size_of::<BlockEntry>(), 24);
        assert_eq!(size_of::<PayloadEvent>(), 24 + 16 + PAYLOAD_CAPTURE_BYTES);
        assert_eq!(
            size_of::<PayloadSlice>(),
            PAYLOAD_HEADER_BYTES + EVIDENCE_BYTES as usize
        );
        assert_eq!(
            core::mem::offset_of!(PayloadEvent, data),
            PAYLOAD_HEADER_BYTES
        );
        assert_eq!(
            core::mem::offset_of!(PayloadSlice, data),
            PAYLOAD_HEADER_BYTES
        );
        assert_eq!(size_of::<UidTotals>(), 32);
        assert_eq!(size_of::<UidKey>(), 8);
        assert_eq!(size_of::<FlowEvent>(), 24 + 8 + 8 + 4 + 4 + 16 + 8);
        assert_eq!(
            size_of::<CaptureFilter>(),
            4 + 4 + 4 + 2 + 1 + 1 + 16 + 8 + 8
        );
        assert_eq!(
            size_of::<CapturedPacket>(),
            24 + 8 + 4 + 4 + 1 + 1 + 6 + CAPTURE_BYTES
        );
        assert_eq!(size_of::<CapturedPacket>() % 8, 0);
    }

    #[test]
    fn direct_slots_are_distinct_and_in_range() {
        assert_eq!(direct_uid_slot(0, PROTO_TCP), Some(0));
        assert_eq!(direct_uid_slot(0, PROTO_UDP), Some(1));
        assert_eq!(direct_uid_slot(10123, PROTO_UDP), Some(20247));
        let last = direct_uid_slot(DIRECT_UIDS - 1, PROTO_UDP).unwrap();
        assert_eq!(last, DIRECT_UID_SLOTS - 1);
        assert_eq!(direct_uid_slot(DIRECT_UIDS, PROTO_TCP), None);
        assert_eq!(direct_uid_slot(1000, PROTO_ICMP), None);
        assert_eq!(direct_uid_slot(KERNEL_UID, PROTO_TCP), None);
    }
}
