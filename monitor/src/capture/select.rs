//! Which packets a capture takes (uids, owners, firmware, destination,
//! cleartext only: the kernel filter it becomes), and what each packet's
//! comment says about its flow (from the running agent's flow table).

use crate::cli::text::escape;
use crate::identity::owners::{Owner, OwnerResolver};
use crate::pipeline::flows::{self, FlowRecord};
use crate::pipeline::rules::Glob;
use crate::pipeline::vocab::{Direction, Proto};
use anyhow::{bail, Context, Result};
use monitor_common::*;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

/// `--dst ADDR[:PORT]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dst {
    pub(crate) addr: IpAddr,
    /// None: any port.
    pub(crate) port: Option<u16>,
}

impl Dst {
    /// `203.0.113.7`, `203.0.113.7:443`, `2001:db8::1`, `[2001:db8::1]:443`.
    pub(crate) fn parse(text: &str) -> Result<Dst> {
        if let Ok(addr) = text.parse::<IpAddr>() {
            return Ok(Dst {
                addr: addr.to_canonical(),
                port: None,
            });
        }
        match text.parse::<SocketAddr>() {
            Ok(at) if at.port() != 0 => Ok(Dst {
                addr: at.ip().to_canonical(),
                port: Some(at.port()),
            }),
            _ => bail!(
                "--dst {text:?}: expected an address with an optional port, e.g. 203.0.113.7, \
                 203.0.113.7:443 or [2001:db8::1]:443"
            ),
        }
    }
}

impl std::fmt::Display for Dst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.addr, self.port) {
            (addr, None) => write!(f, "{addr}"),
            (IpAddr::V6(addr), Some(port)) => write!(f, "[{addr}]:{port}"),
            (addr, Some(port)) => write!(f, "{addr}:{port}"),
        }
    }
}

/// What a capture selects.
#[derive(Debug, Clone)]
pub(crate) struct Selection {
    /// `--uid`: always selected.
    pub(crate) uids: BTreeSet<u32>,
    /// `--owner GLOB`: uids whose owner (or one of its packages) matches
    /// (the pattern as given, and compiled).
    pub(crate) owner: Option<(String, Glob)>,
    /// `--firmware`: uids whose owner is part of the firmware.
    pub(crate) firmware: bool,
    pub(crate) cleartext: bool,
    pub(crate) dst: Option<Dst>,
    /// Bytes kept per packet (1..=CAPTURE_BYTES).
    pub(crate) snaplen: u32,
}

impl Selection {
    pub(crate) fn new(
        uids: &[u32],
        owner: Option<&str>,
        firmware: bool,
        cleartext: bool,
        dst: Option<&str>,
        snaplen: u32,
    ) -> Result<Selection> {
        let owner = owner
            .map(|pattern| Glob::new(pattern).map(|glob| (pattern.to_string(), glob)))
            .transpose()
            .map_err(anyhow::Error::msg)
            .context("--owner")?;
        Ok(Selection {
            uids: uids.iter().copied().collect(),
            owner,
            firmware,
            cleartext,
            dst: dst.map(Dst::parse).transpose()?,
            snaplen: match snaplen {
                0 => CAPTURE_BYTES as u32,
                n => n.min(CAPTURE_BYTES as u32),
            },
        })
    }

    /// Whether uids are chosen by owner (from the agent's flow table).
    pub(crate) fn by_owner(&self) -> bool {
        self.owner.is_some() || self.firmware
    }

    /// No uid selector at all: every uid.
    pub(crate) fn any_uid(&self) -> bool {
        self.uids.is_empty() && !self.by_owner()
    }

    /// Whether `owner` matches `--owner` and `--firmware` (both, when both
    /// are given).
    pub(crate) fn owner_matches(&self, owner: &Owner) -> bool {
        self.by_owner()
            && (!self.firmware || owner.firmware)
            && self.owner.as_ref().is_none_or(|(_, glob)| {
                glob.matches(&owner.owner) || owner.packages.iter().any(|p| glob.matches(p))
            })
    }

    /// The uids to capture given the agent's flows: `--uid`s and the uids
    /// of the flows whose owner matches.
    pub(crate) fn uids_in(&self, flows: &[FlowRecord]) -> BTreeSet<u32> {
        let mut uids = self.uids.clone();
        uids.extend(
            flows
                .iter()
                .filter(|f| self.owner_matches(&f.uid_owner))
                .map(|f| f.uid),
        );
        uids
    }

    /// The kernel filter for this selection, active.
    pub(crate) fn filter(&self) -> CaptureFilter {
        let mut filter = CaptureFilter {
            active: 1,
            snaplen: self.snaplen,
            ..Default::default()
        };
        if self.any_uid() {
            filter.flags |= CAPTURE_ANY_UID;
        }
        if self.cleartext {
            filter.flags |= CAPTURE_CLEARTEXT_ONLY;
        }
        if let Some(dst) = self.dst {
            filter.flags |= CAPTURE_DST;
            filter.dst_port = dst.port.unwrap_or(0);
            match dst.addr {
                IpAddr::V4(v4) => {
                    filter.dst_family = FAMILY_IPV4;
                    filter.dst_addr[..4].copy_from_slice(&v4.octets());
                }
                IpAddr::V6(v6) => {
                    filter.dst_family = FAMILY_IPV6;
                    filter.dst_addr = v6.octets();
                }
            }
        }
        filter
    }

    /// What is captured, in words: "uid 1001 (radio)", "every uid",
    /// "owner \"com.*\" firmware", then the other filters.
    pub(crate) fn describe(&self, names: &Annotations) -> String {
        let mut parts = Vec::new();
        if self.any_uid() {
            parts.push("every uid".to_string());
        }
        if !self.uids.is_empty() {
            let uids: Vec<String> = self
                .uids
                .iter()
                .map(|&uid| match names.owner_name(uid) {
                    Some(name) => format!("{uid} ({})", escape(name)),
                    None => uid.to_string(),
                })
                .collect();
            let word = if uids.len() == 1 { "uid" } else { "uids" };
            parts.push(format!("{word} {}", uids.join(", ")));
        }
        match (&self.owner, self.firmware) {
            (Some((pattern, _)), true) => {
                parts.push(format!("firmware owners matching {:?}", escape(pattern)))
            }
            (Some((pattern, _)), false) => {
                parts.push(format!("owners matching {:?}", escape(pattern)))
            }
            (None, true) => parts.push("firmware owners".into()),
            (None, false) => {}
        }
        let mut text = parts.join(" and ");
        if let Some(dst) = self.dst {
            text.push_str(&format!(" to {dst}"));
        }
        if self.cleartext {
            text.push_str(", cleartext flows only");
        }
        text
    }
}

/// A flow as a captured packet names it: uid, protocol, whether it is a
/// local service's replies, remote address and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FlowId {
    uid: u32,
    proto: Proto,
    inbound: bool,
    addr: IpAddr,
    port: u16,
}

impl FlowId {
    fn of_key(key: &FlowKey) -> FlowId {
        FlowId {
            uid: key.uid,
            proto: Proto::from_number(key.proto),
            inbound: flows::is_inbound(key),
            addr: flows::destination(key),
            port: key.port,
        }
    }

    fn of_record(flow: &FlowRecord) -> Option<FlowId> {
        Some(FlowId {
            uid: flow.uid,
            proto: flow.proto,
            inbound: flow.direction == Direction::Inbound,
            addr: flow.dst.parse::<IpAddr>().ok()?.to_canonical(),
            port: flow.port,
        })
    }
}

/// What the comments say: the agent's flows, by flow and by uid, and an
/// owner resolver of this host for uids the agent has no flow of.
#[derive(Default)]
pub(crate) struct Annotations {
    flows: HashMap<FlowId, FlowRecord>,
    owners: HashMap<u32, Owner>,
    /// Made on first use (None inside: this host's sources are unreadable).
    resolver: Option<Option<OwnerResolver>>,
}

fn unknown_owner(uid: u32) -> Owner {
    Owner {
        uid,
        user: uid / 100_000,
        app_id: uid % 100_000,
        owner: format!("uid {uid}"),
        packages: Vec::new(),
        origin: crate::pipeline::vocab::Origin::Unknown,
        firmware: false,
    }
}

impl Annotations {
    /// Takes in the agent's current flows (earlier ones stay known).
    pub(crate) fn update(&mut self, flows: Vec<FlowRecord>) {
        for flow in flows {
            self.owners.insert(flow.uid, flow.uid_owner.clone());
            if let Some(id) = FlowId::of_record(&flow) {
                self.flows.insert(id, flow);
            }
        }
    }

    /// The owner's name of `uid`, if the agent has a flow of it.
    pub(crate) fn owner_name(&self, uid: u32) -> Option<&str> {
        self.owners.get(&uid).map(|o| o.owner.as_str())
    }

    /// The comment of a packet of flow `key`: `uid=N owner=NAME
    /// origin=ORIGIN firmware=BOOL`, then ` pid=P comm=C host=H
    /// leaks=a:b,c:d` for what the agent knows of the flow.
    pub(crate) fn comment(&mut self, key: &FlowKey) -> String {
        let flow = self.flows.get(&FlowId::of_key(key));
        let owner = match (flow, self.owners.get(&key.uid)) {
            (Some(flow), _) => flow.uid_owner.clone(),
            (None, Some(owner)) => owner.clone(),
            (None, None) => {
                if self.resolver.is_none() {
                    self.resolver = Some(OwnerResolver::new(None).ok());
                }
                let owner = match self.resolver.as_ref().and_then(Option::as_ref) {
                    Some(resolver) => resolver.resolve(key.uid),
                    None => unknown_owner(key.uid),
                };
                self.owners.insert(key.uid, owner.clone());
                owner
            }
        };
        let flow = self.flows.get(&FlowId::of_key(key));
        let mut text = format!(
            "uid={} owner={} origin={} firmware={}",
            key.uid,
            word(&owner.owner),
            owner.origin,
            owner.firmware
        );
        if let Some(flow) = flow {
            if let Some(pid) = flow.pid {
                text.push_str(&format!(" pid={pid}"));
            }
            if let Some(comm) = flow.comm.as_deref().filter(|c| !c.is_empty()) {
                text.push_str(&format!(" comm={}", word(comm)));
            }
            if let Some(host) = &flow.host {
                text.push_str(&format!(" host={}", word(host)));
            }
            if !flow.leaks.is_empty() {
                text.push_str(&format!(" leaks={}", word(&flow.leaks.join(","))));
            }
        }
        text
    }
}

/// A name as one space-free word of a comment (escaped as the CLI prints
/// names; a space becomes `\x20`).
fn word(text: &str) -> String {
    escape(text).replace(' ', "\\x20")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::vocab::Origin;

    fn owner(uid: u32, name: &str, origin: Origin) -> Owner {
        Owner {
            uid,
            user: uid / 100_000,
            app_id: uid % 100_000,
            owner: name.into(),
            packages: vec![],
            origin,
            firmware: origin.is_firmware(),
        }
    }

    fn key(uid: u32, proto: u8, addr: [u8; 4], port: u16) -> FlowKey {
        let mut key = FlowKey {
            uid,
            port,
            proto,
            family: FAMILY_IPV4,
            addr: [0; 16],
        };
        key.addr[..4].copy_from_slice(&addr);
        key
    }

    fn record(key: &FlowKey, owner: &Owner) -> FlowRecord {
        flows::record(key, &FlowValue::default(), owner, None)
    }

    #[test]
    fn destinations_parse_with_and_without_ports() {
        let d = |t: &str| Dst::parse(t).unwrap();
        assert_eq!(d("203.0.113.7").port, None);
        assert_eq!(d("203.0.113.7:443").port, Some(443));
        assert_eq!(d("[2001:db8::1]:443").to_string(), "[2001:db8::1]:443");
        assert_eq!(d("2001:db8::1").to_string(), "2001:db8::1");
        assert_eq!(d("::ffff:10.0.0.1").addr.to_string(), "10.0.0.1");
        for bad in ["", "host.example:80", "10.0.0.1:0", "10.0.0.1:x"] {
            assert!(Dst::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_filter_carries_the_selection() {
        let any = Selection::new(&[], None, false, true, Some("10.0.0.9:53"), 0).unwrap();
        let f = any.filter();
        assert_eq!(f.active, 1);
        assert_eq!(
            f.flags,
            CAPTURE_ANY_UID | CAPTURE_CLEARTEXT_ONLY | CAPTURE_DST
        );
        assert_eq!((f.dst_family, f.dst_port), (FAMILY_IPV4, 53));
        assert_eq!(&f.dst_addr[..5], &[10, 0, 0, 9, 0]);
        assert_eq!(f.snaplen, CAPTURE_BYTES as u32);
        let one = Selection::new(&[1001], None, false, false, None, 96).unwrap();
        assert_eq!((one.filter().flags, one.filter().snaplen), (0, 96));
        let firmware = Selection::new(&[], None, true, false, None, 99_999).unwrap();
        assert_eq!(firmware.filter().flags, 0, "uids come from the agent");
        assert_eq!(firmware.snaplen, CAPTURE_BYTES as u32);
    }

    #[test]
    fn owners_and_firmware_choose_uids_from_the_flows() {
        let radio = owner(1001, "radio", Origin::Platform);
        let app = owner(10123, "com.example.app", Origin::App);
        let flows = vec![
            record(&key(1001, PROTO_UDP, [10, 0, 0, 1], 53), &radio),
            record(&key(10123, PROTO_TCP, [10, 0, 0, 2], 443), &app),
        ];
        let firmware = Selection::new(&[], None, true, false, None, 0).unwrap();
        assert_eq!(firmware.uids_in(&flows), BTreeSet::from([1001]));
        let glob = Selection::new(&[7], Some("COM.example.*"), false, false, None, 0).unwrap();
        assert_eq!(glob.uids_in(&flows), BTreeSet::from([7, 10123]));
        let both = Selection::new(&[], Some("com.*"), true, false, None, 0).unwrap();
        assert!(both.uids_in(&flows).is_empty());
        assert_eq!(
            glob.describe(&Annotations::default()),
            "uid 7 and owners matching \"COM.example.*\""
        );
    }

    #[test]
    fn comments_name_the_flow_or_at_least_its_owner() {
        let radio = owner(1001, "radio", Origin::Platform);
        let known = key(1001, PROTO_TCP, [10, 200, 0, 2], 80);
        let mut flow = record(&known, &radio);
        flow.pid = Some(4242);
        flow.comm = Some("ril daemon".into());
        flow.host = Some("zzhc.example.cn".into());
        flow.leaks = vec!["imei:plain".into(), "serial:md5".into()];
        let mut notes = Annotations::default();
        notes.update(vec![flow]);
        assert_eq!(
            notes.comment(&known),
            "uid=1001 owner=radio origin=platform firmware=true pid=4242 comm=ril\\x20daemon \
             host=zzhc.example.cn leaks=imei:plain,serial:md5"
        );
        let other = key(1001, PROTO_UDP, [10, 200, 0, 2], 123);
        assert_eq!(
            notes.comment(&other),
            "uid=1001 owner=radio origin=platform firmware=true"
        );
        let d = Selection::new(&[1001], None, false, false, None, 0).unwrap();
        assert_eq!(d.describe(&notes), "uid 1001 (radio)");
    }
}
