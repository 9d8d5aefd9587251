//! The flow table users see: kernel counters joined with the sender's
//! identity and owner, in the field names of the product contract.

use crate::bpf::system::rfc3339;
use crate::cli::text::escape;
use crate::identity::events::FlowMeta;
use crate::identity::owners::Owner;
use crate::pipeline::vocab::{Direction, Payload, Proto};
use monitor_common::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One row of `egressmon flows --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlowRecord {
    /// The flow's uid and who owns it (`uid`, `user`, `app_id`, `owner`,
    /// `packages`, `origin`, `firmware`), as the owner resolver describes
    /// it and `owners --json` lists it.
    #[serde(flatten)]
    pub uid_owner: Owner,
    pub comm: Option<String>,
    pub pid: Option<u32>,
    pub cgroup_id: Option<u64>,
    /// Cgroup path of the first sender, and its systemd unit if any.
    pub cgroup: Option<String>,
    pub unit: Option<String>,
    /// Executable and command line of the first sender (best effort).
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    /// SELinux context of the first sender (null without SELinux or when
    /// the sender is not known).
    pub selinux_context: Option<String>,
    /// The system-image partition the sender's executable, or the owning
    /// package's code, lives on: `system`, `system_ext`, `product`,
    /// `vendor`, `odm`, `apex`, `data`; null when neither tells.
    pub partition: Option<String>,
    pub proto: Proto,
    pub family: String,
    pub dst: String,
    pub port: u16,
    pub connects: u64,
    pub udp_sends: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub first_seen: Option<String>,
    pub last_seen: Option<String>,
    pub host: Option<String>,
    pub host_source: Option<String>,
    pub country: Option<String>,
    pub asn: Option<u32>,
    pub payload: Payload,
    /// Device identifiers the flow carried where they can be read
    /// (`NAME:FORM`, e.g. `imei:sha256`), never their values; `[]` when
    /// none or when its payload is encrypted.
    #[serde(default)]
    pub leaks: Vec<String>,
    /// `outbound`, or `inbound` for a local service's replies: then `dst`
    /// is the client and `port` the service's own local port.
    #[serde(default)]
    pub direction: Direction,
    /// Remote, or a destination that stays on this host or its link
    /// (counted, but left alone by rules unless they ask for it).
    #[serde(default)]
    pub scope: crate::pipeline::rules::Scope,
    /// Alert rules that fired on this flow (empty in log lines, where each
    /// alert has a line of its own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<String>,
    /// Attempts block rules refused, or in a dry run would have refused:
    /// connect() calls, datagrams, and packets of connections open when
    /// the rule came. What was refused is not in the counters above.
    #[serde(default)]
    pub blocked: u64,
    /// The block rule that decides this flow (null when none does), and
    /// whether it refuses (`enforce`) or only counts (`dry-run`).
    #[serde(default)]
    pub block_rule: Option<String>,
    #[serde(default)]
    pub block_mode: Option<crate::pipeline::rules::BlockMode>,
}

/// A flow reads as its owner: `flow.uid`, `flow.owner`, `flow.origin`.
impl std::ops::Deref for FlowRecord {
    type Target = Owner;

    fn deref(&self) -> &Owner {
        &self.uid_owner
    }
}

/// Whether the flow is a local service's replies (see [`FAMILY_INBOUND`]).
pub(crate) fn is_inbound(key: &FlowKey) -> bool {
    key.family & FAMILY_INBOUND != 0
}

pub(crate) fn destination(key: &FlowKey) -> IpAddr {
    if key.family & !FAMILY_INBOUND == FAMILY_IPV4 {
        IpAddr::V4(Ipv4Addr::new(
            key.addr[0],
            key.addr[1],
            key.addr[2],
            key.addr[3],
        ))
    } else {
        IpAddr::V6(Ipv6Addr::from(key.addr))
    }
}

pub(crate) fn record(
    key: &FlowKey,
    value: &FlowValue,
    owner: &Owner,
    meta: Option<&FlowMeta>,
) -> FlowRecord {
    let sender = meta.map(|m| &*m.sender);
    let known = sender.filter(|s| s.tgid != 0);
    let mut record = FlowRecord {
        uid_owner: Owner {
            uid: key.uid,
            ..owner.clone()
        },
        comm: known.map(|s| s.comm()),
        pid: known.map(|s| s.tgid),
        cgroup_id: sender.map(|s| s.cgroup_id).filter(|&id| id != 0),
        cgroup: sender.and_then(|s| s.cgroup.as_deref()).map(str::to_string),
        unit: sender
            .and_then(|s| s.cgroup.as_deref())
            .and_then(crate::identity::process::unit_of)
            .map(str::to_string),
        exe: known.and_then(|s| s.exe.as_deref()).map(str::to_string),
        cmdline: known.and_then(|s| s.cmdline.as_deref()).map(str::to_string),
        selinux_context: known
            .and_then(|s| s.selinux_context.as_deref())
            .map(str::to_string),
        partition: None,
        proto: Proto::from_number(key.proto),
        family: String::new(),
        dst: String::new(),
        port: 0,
        connects: 0,
        udp_sends: 0,
        tx_packets: 0,
        tx_bytes: 0,
        first_seen: None,
        last_seen: None,
        host: None,
        host_source: None,
        country: None,
        asn: None,
        payload: Payload::Unknown,
        leaks: Vec::new(),
        direction: Direction::Outbound,
        scope: crate::pipeline::rules::Scope::Remote,
        alerts: Vec::new(),
        blocked: 0,
        block_rule: None,
        block_mode: None,
    };
    set_key(&mut record, key);
    set_counters(&mut record, value);
    record
}

/// Sets what a flow's key says: protocol, family, destination, direction.
fn set_key(record: &mut FlowRecord, key: &FlowKey) {
    record.proto = Proto::from_number(key.proto);
    record.family = if key.family & !FAMILY_INBOUND == FAMILY_IPV4 {
        "ipv4"
    } else {
        "ipv6"
    }
    .into();
    record.dst = destination(key).to_string();
    record.port = key.port;
    record.direction = if is_inbound(key) {
        Direction::Inbound
    } else {
        Direction::Outbound
    };
    record.scope = crate::pipeline::rules::Scope::of(destination(key));
}

/// A described flow as the tracker keeps it between passes: what its owner
/// and sender say, shared with the other flows of that sender (see
/// [`Senders`]), and what was learnt of its destination. The rest of a
/// record (counters, times, what the key says) is filled in when one is
/// made: tens of bytes per flow, where a whole record takes about a
/// kilobyte with its strings.
pub(crate) struct Description {
    sender: std::sync::Arc<FlowRecord>,
    payload: Payload,
    /// None until something is learnt (most flows of a burst never name
    /// their host nor carry an identifier).
    learnt: Option<Box<Learnt>>,
}

/// What was learnt of a flow's destination and payload.
#[derive(Default, PartialEq)]
struct Learnt {
    host: Option<Box<str>>,
    host_source: Option<Box<str>>,
    country: Option<Box<str>>,
    asn: Option<u32>,
    leaks: Vec<String>,
}

impl Description {
    /// Keeps `record`'s description, its owner and sender parts shared
    /// through `senders` under `sender_id` (any number naming the sender;
    /// a shared part is reused only when equal).
    pub(crate) fn keep(mut record: FlowRecord, sender_id: usize, senders: &mut Senders) -> Self {
        let learnt = Learnt {
            host: record.host.take().map(String::into_boxed_str),
            host_source: record.host_source.take().map(String::into_boxed_str),
            country: record.country.take().map(String::into_boxed_str),
            asn: record.asn.take(),
            leaks: std::mem::take(&mut record.leaks),
        };
        let payload = record.payload;
        // What `record` fills in again, made equal between the sender's
        // flows so that they share one part.
        record.family = String::new();
        record.dst = String::new();
        record.port = 0;
        record.proto = Proto::Tcp;
        record.direction = Direction::Outbound;
        record.scope = crate::pipeline::rules::Scope::Remote;
        (record.connects, record.udp_sends) = (0, 0);
        (record.tx_packets, record.tx_bytes) = (0, 0);
        record.first_seen = None;
        record.last_seen = None;
        record.alerts = Vec::new();
        record.payload = Payload::Unknown;
        Description {
            sender: senders.share(record, sender_id),
            payload,
            learnt: (learnt != Learnt::default()).then(|| Box::new(learnt)),
        }
    }

    pub(crate) fn has_host(&self) -> bool {
        self.learnt.as_ref().is_some_and(|l| l.host.is_some())
    }

    /// The owner and sender parts (counters, key and destination fields
    /// are not filled in): for readers that need a few fields of many
    /// flows without building records.
    pub(crate) fn sender(&self) -> &FlowRecord {
        &self.sender
    }

    pub(crate) fn payload(&self) -> Payload {
        self.payload
    }

    pub(crate) fn host(&self) -> (Option<&str>, Option<&str>) {
        self.learnt.as_ref().map_or((None, None), |l| {
            (l.host.as_deref(), l.host_source.as_deref())
        })
    }

    pub(crate) fn place(&self) -> (Option<&str>, Option<u32>) {
        self.learnt
            .as_ref()
            .map_or((None, None), |l| (l.country.as_deref(), l.asn))
    }

    pub(crate) fn leaks(&self) -> &[String] {
        self.learnt.as_ref().map_or(&[], |l| &l.leaks)
    }

    /// The flow's record, with `value`'s counters.
    pub(crate) fn record(&self, key: &FlowKey, value: &FlowValue) -> FlowRecord {
        let mut record = (*self.sender).clone();
        set_key(&mut record, key);
        set_counters(&mut record, value);
        record.payload = self.payload;
        if let Some(learnt) = &self.learnt {
            record.host = learnt.host.as_deref().map(str::to_string);
            record.host_source = learnt.host_source.as_deref().map(str::to_string);
            record.country = learnt.country.as_deref().map(str::to_string);
            record.asn = learnt.asn;
            record.leaks = learnt.leaks.clone();
        }
        record
    }
}

/// The owner and sender parts of described flows, one per sender.
#[derive(Default)]
pub(crate) struct Senders {
    by_id: HashMap<(u32, usize), std::sync::Arc<FlowRecord>, foldhash::fast::RandomState>,
}

impl Senders {
    fn share(&mut self, record: FlowRecord, sender_id: usize) -> std::sync::Arc<FlowRecord> {
        let id = (record.uid, sender_id);
        match self.by_id.get(&id) {
            Some(shared) if **shared == record => shared.clone(),
            _ => {
                let shared = std::sync::Arc::new(record);
                self.by_id.insert(id, shared.clone());
                shared
            }
        }
    }

    /// Forgets the parts no flow uses any more.
    pub(crate) fn drop_unused(&mut self) {
        self.by_id
            .retain(|_, shared| std::sync::Arc::strong_count(shared) > 1);
    }
}

/// Sets a described flow's counters and times to `value`'s.
pub(crate) fn set_counters(record: &mut FlowRecord, value: &FlowValue) {
    record.connects = value.connects;
    record.udp_sends = value.udp_sends;
    record.tx_packets = value.tx_packets;
    record.tx_bytes = value.tx_bytes;
    record.blocked = value.blocked;
    record.first_seen = rfc3339(value.first_seen);
    record.last_seen = rfc3339(value.last_seen);
}

pub(crate) fn sort_busiest_first(rows: &mut [FlowRecord]) {
    rows.sort_by(|a, b| {
        b.tx_bytes
            .cmp(&a.tx_bytes)
            .then(b.connects.cmp(&a.connects))
    });
}

/// Plain-text table for terminals, names escaped (see `text::escape`).
pub(crate) fn render_text(rows: &[FlowRecord]) -> String {
    let mut out = format!(
        "{:>8} {:<16} {:<9} {:<5} {:<40} {:>8} {:>8} {:>8} {:>12}\n",
        "UID", "OWNER", "ORIGIN", "PROTO", "DESTINATION", "CONNECTS", "UDP", "PACKETS", "BYTES"
    );
    for r in rows {
        let dst = if r.family == "ipv6" {
            format!("[{}]:{}", r.dst, r.port)
        } else {
            format!("{}:{}", r.dst, r.port)
        };
        let origin = if r.firmware {
            format!("{}*", r.origin)
        } else {
            r.origin.to_string()
        };
        out.push_str(&format!(
            "{:>8} {:<16.16} {:<9} {:<5} {:<40} {:>8} {:>8} {:>8} {:>12}\n",
            r.uid,
            escape(&r.owner),
            origin,
            r.proto,
            escape(&dst),
            r.connects,
            r.udp_sends,
            r.tx_packets,
            r.tx_bytes
        ));
    }
    out.push_str("(* = firmware: platform, preinstalled or system)\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_and_ipv6_destinations_render() {
        let mut key = FlowKey {
            uid: 1000,
            port: 443,
            proto: PROTO_TCP,
            family: FAMILY_IPV4,
            addr: [0; 16],
        };
        key.addr[..4].copy_from_slice(&[203, 0, 113, 7]);
        assert_eq!(destination(&key).to_string(), "203.0.113.7");
        let key6 = FlowKey {
            family: FAMILY_IPV6,
            addr: Ipv6Addr::LOCALHOST.octets(),
            ..key
        };
        assert_eq!(destination(&key6).to_string(), "::1");
    }

    #[test]
    fn a_senders_flows_share_one_description_and_read_back_whole() {
        let owner = Owner {
            uid: 1001,
            user: 0,
            app_id: 1001,
            owner: "radio".into(),
            packages: vec!["com.android.phone".into()],
            origin: crate::pipeline::vocab::Origin::Platform,
            firmware: true,
        };
        let meta = FlowMeta::default();
        let mut senders = Senders::default();
        let mut kept = Vec::new();
        for (port, proto) in [(80, PROTO_TCP), (53, PROTO_UDP)] {
            let mut key = FlowKey {
                uid: 1001,
                port,
                proto,
                family: FAMILY_IPV4,
                addr: [0; 16],
            };
            key.addr[..4].copy_from_slice(&[192, 0, 2, port as u8]);
            let value = FlowValue {
                tx_bytes: 100 + port as u64,
                connects: 1,
                first_seen: 1_000_000_000,
                ..Default::default()
            };
            let mut full = record(&key, &value, &owner, Some(&meta));
            full.host = Some(format!("h{port}.example"));
            full.host_source = Some("dns".into());
            full.country = Some("DE".into());
            full.leaks = vec!["imei:sha256".into()];
            let description = Description::keep(full.clone(), 7, &mut senders);
            assert_eq!(description.record(&key, &value), full);
            kept.push(description);
        }
        assert!(std::sync::Arc::ptr_eq(&kept[0].sender, &kept[1].sender));
        drop(kept);
        senders.drop_unused();
        assert!(senders.by_id.is_empty());
    }
}
