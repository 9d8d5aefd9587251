//! The flow table users see: kernel counters joined with the sender's
//! identity and owner, in the field names of the product contract.

use crate::bpf::system::rfc3339;
use crate::cli::text::escape;
use crate::identity::events::FlowMeta;
use crate::identity::owners::Owner;
use crate::pipeline::vocab::{Direction, Payload, Proto};
use monitor_common::*;
use serde::{Deserialize, Serialize};
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
    FlowRecord {
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
        family: if key.family & !FAMILY_INBOUND == FAMILY_IPV4 {
            "ipv4"
        } else {
            "ipv6"
        }
        .into(),
        dst: destination(key).to_string(),
        port: key.port,
        connects: value.connects,
        udp_sends: value.udp_sends,
        tx_packets: value.tx_packets,
        tx_bytes: value.tx_bytes,
        first_seen: rfc3339(value.first_seen),
        last_seen: rfc3339(value.last_seen),
        host: None,
        host_source: None,
        country: None,
        asn: None,
        payload: Payload::Unknown,
        leaks: Vec::new(),
        direction: if is_inbound(key) {
            Direction::Inbound
        } else {
            Direction::Outbound
        },
        scope: crate::pipeline::rules::Scope::of(destination(key)),
        alerts: Vec::new(),
    }
}

/// Sets a described flow's counters and times to `value`'s.
pub(crate) fn set_counters(record: &mut FlowRecord, value: &FlowValue) {
    record.connects = value.connects;
    record.udp_sends = value.udp_sends;
    record.tx_packets = value.tx_packets;
    record.tx_bytes = value.tx_bytes;
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
}
