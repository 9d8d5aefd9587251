//! Where flows went and what they carried: joins the kernel's payload events
//! (each flow's first payload bytes, every DNS response) with the DNS cache
//! and GeoIP data, and fills a flow record's `host`, `host_source`,
//! `payload`, `country` and `asn`.
//!
//! A flow's host comes from its own payload first (TLS or QUIC SNI, HTTP
//! Host), then from the DNS answers the same uid received for its
//! destination, then from anyone's answer for that address.
//!
//! A readable flow's payload (its first `EVIDENCE_BYTES`) also goes through
//! [`Evidence`], which names the device identifiers it carried (`leaks`).

use crate::enrich::evidence::Evidence;
use crate::enrich::geoip::GeoIp;
use crate::pipeline::flows::{destination, FlowRecord};
use inspect::dns::DnsCache;
use inspect::{self, HostSource, Payload};
use monitor_common::{
    FlowKey, PayloadEvent, PAYLOAD_DNS_RESPONSE, PAYLOAD_FIRST_EGRESS, PAYLOAD_HEADER_BYTES,
    PAYLOAD_MORE_EGRESS,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a flow's payload said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FlowInfo {
    /// From its first bytes.
    pub(crate) payload: Payload,
    pub(crate) host: Option<(String, HostSource)>,
    /// Device identifiers it carried (`NAME:FORM`), in the order found:
    /// the list only grows, so the tracker counts each once by position.
    pub(crate) leaks: Vec<String>,
}

pub(crate) struct Destinations {
    flows: HashMap<FlowKey, FlowInfo, foldhash::fast::RandomState>,
    capacity: usize,
    dns: DnsCache,
    geoip: GeoIp,
    evidence: Evidence,
    /// Bumped whenever something a record shows may have changed.
    pub(crate) version: u64,
    pub(crate) dns_responses: u64,
    pub(crate) payloads_seen: u64,
    /// Told of every address a DNS answer resolved for a uid, as the
    /// answer is processed (block rules by host name).
    on_answer: Option<AnswerHook>,
}

/// See [`Destinations::set_answer_hook`]: the uid, the name asked and the
/// name answered, the address and where GeoIP places it.
pub(crate) type AnswerHook =
    Box<dyn FnMut(u32, [&str; 2], std::net::IpAddr, (Option<&str>, Option<u32>)) + Send>;

impl Destinations {
    pub(crate) fn new(geoip: GeoIp, capacity: usize) -> Destinations {
        Destinations {
            flows: HashMap::default(),
            capacity,
            dns: DnsCache::default(),
            geoip,
            evidence: Evidence::empty(),
            version: 0,
            dns_responses: 0,
            payloads_seen: 0,
            on_answer: None,
        }
    }

    /// Calls `hook` for every address a DNS answer resolves.
    pub(crate) fn set_answer_hook(&mut self, hook: AnswerHook) {
        self.on_answer = Some(hook);
    }

    /// The GeoIP sources (block rules by country or network).
    pub(crate) fn geoip(&self) -> &GeoIp {
        &self.geoip
    }

    pub(crate) fn on_event(&mut self, event: &Received, now: Instant) {
        let data = &event.data[..];
        match event.kind {
            PAYLOAD_FIRST_EGRESS => {
                self.payloads_seen += 1;
                let key = event.key;
                let payload = inspect::classify(key.proto, key.port, data);
                let info = FlowInfo {
                    payload,
                    host: inspect::host_from_payload(key.proto, key.port, data),
                    leaks: self.evidence.search(&key, payload, 0, data),
                };
                if self.flows.len() >= self.capacity && !self.flows.contains_key(&key) {
                    // Bounded like the kernel's flow map; the oldest entries
                    // are pruned by `retain_live`, this only guards bursts.
                    return;
                }
                self.flows.insert(key, info);
                self.version += 1;
            }
            PAYLOAD_MORE_EGRESS => {
                self.payloads_seen += 1;
                let Some(info) = self.flows.get_mut(&event.key) else {
                    return;
                };
                let found = self
                    .evidence
                    .search(&event.key, info.payload, event.at, data);
                let before = info.leaks.len();
                for leak in found {
                    if !info.leaks.contains(&leak) {
                        info.leaks.push(leak);
                    }
                }
                if info.leaks.len() != before {
                    self.version += 1;
                }
            }
            PAYLOAD_DNS_RESPONSE => {
                self.dns_responses += 1;
                let Some(message) = inspect::dns::parse_payload(event.key.proto, data) else {
                    return;
                };
                if self.dns.observe(event.key.uid, &message, now) > 0 {
                    self.version += 1;
                    if let Some(hook) = self.on_answer.as_mut() {
                        for r in message.resolutions() {
                            let (country, asn) = self.geoip.lookup(r.addr);
                            hook(
                                event.key.uid,
                                [&r.query, &r.name],
                                r.addr,
                                (country.as_deref(), asn),
                            );
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Each flow's first-payload verdict, for the restart state.
    pub(crate) fn infos(&self) -> impl ExactSizeIterator<Item = (&FlowKey, &FlowInfo)> {
        self.flows.iter()
    }

    /// Takes back a verdict a previous agent saved (bounded like the rest).
    pub(crate) fn restore_info(&mut self, key: FlowKey, info: FlowInfo) {
        if self.flows.len() < self.capacity {
            self.flows.insert(key, info);
        }
    }

    /// Forgets every verdict (a state file that could not be read whole).
    pub(crate) fn forget_infos(&mut self) {
        self.flows.clear();
    }

    pub(crate) fn has_info(&self, key: &FlowKey) -> bool {
        self.flows.contains_key(key)
    }

    /// Searches payloads for these identifiers from now on.
    pub(crate) fn set_evidence(&mut self, evidence: Evidence) {
        self.evidence = evidence;
    }

    /// Payload slices left unsearched for lack of room.
    pub(crate) fn evidence_skipped(&self) -> u64 {
        self.evidence.skipped
    }

    /// Drops what belongs to flows the kernel no longer holds.
    pub(crate) fn retain_live(&mut self, live: &dyn Fn(&FlowKey) -> bool, now: Instant) {
        self.flows.retain(|k, _| live(k));
        self.evidence.retain_live(live);
        self.dns.purge_expired(now);
    }

    /// A per-flow stamp that changes when the flow's own payload arrives
    /// or shows another identifier (names from DNS answers precede the
    /// connection they name, so they are in place when the flow is first
    /// described).
    pub(crate) fn stamp(&self, key: &FlowKey) -> u64 {
        self.flows
            .get(key)
            .map(|i| 1 + i.host.is_some() as u64 + 2 * i.leaks.len() as u64)
            .unwrap_or(0)
    }

    /// Whether a DNS answer to the flow's uid names its destination now.
    pub(crate) fn has_name(&mut self, key: &FlowKey, now: Instant) -> bool {
        self.dns.lookup(key.uid, destination(key), now).is_some()
    }

    /// (payload infos, DNS names) held.
    pub(crate) fn sizes(&self) -> (u64, u64) {
        (self.flows.len() as u64, self.dns.len() as u64)
    }

    /// The GeoIP sources in use, described for `status`.
    pub(crate) fn geoip_sources(&self) -> Vec<String> {
        self.geoip.describe()
    }

    /// Fills `host`, `host_source`, `payload`, `leaks`, `country` and `asn`.
    pub(crate) fn describe(&mut self, key: &FlowKey, record: &mut FlowRecord, now: Instant) {
        let ip = destination(key);
        let info = self.flows.get(key);
        record.payload = match info {
            Some(i) => i.payload,
            None if key.port == 53 => Payload::Dns,
            None => Payload::Unknown,
        };
        record.leaks = info.map(|i| i.leaks.clone()).unwrap_or_default();
        if let Some((host, source)) = info.and_then(|i| i.host.clone()) {
            record.host = Some(host);
            record.host_source = Some(source.as_str().to_string());
        } else if let Some(name) = self.dns.lookup(key.uid, ip, now) {
            let source = if name.uid == key.uid {
                HostSource::Dns
            } else {
                HostSource::DnsOtherUid
            };
            record.host = Some(name.query);
            record.host_source = Some(source.as_str().to_string());
        }
        let (country, asn) = self.geoip.lookup(ip);
        record.country = country;
        record.asn = asn;
    }
}

pub(crate) type SharedDestinations = Arc<Mutex<Destinations>>;

/// One record of the payload ring, its bytes copied out of the ring.
pub(crate) struct Received {
    pub(crate) key: FlowKey,
    pub(crate) kind: u8,
    /// Where `data` starts in the flow's payload.
    pub(crate) at: u32,
    pub(crate) data: Box<[u8]>,
}

/// A record of the ring: a whole `PayloadEvent` (first payloads, DNS
/// answers) or a `PayloadSlice`'s header and the bytes it copied (later
/// payload of readable flows); both begin with the same header.
fn decode(bytes: &[u8]) -> Option<Received> {
    let header = bytes.get(..PAYLOAD_HEADER_BYTES)?;
    let mut event = std::mem::MaybeUninit::<PayloadEvent>::zeroed();
    // SAFETY: PayloadEvent is plain old data (zero is a valid value); only
    // its header, which a PayloadSlice shares, is overwritten.
    let event = unsafe {
        std::ptr::copy_nonoverlapping(
            header.as_ptr(),
            event.as_mut_ptr() as *mut u8,
            PAYLOAD_HEADER_BYTES,
        );
        event.assume_init()
    };
    let data = &bytes[PAYLOAD_HEADER_BYTES..];
    let captured = (event.captured as usize).min(data.len());
    Some(Received {
        key: event.key,
        kind: event.kind,
        at: event.at,
        data: data[..captured].into(),
    })
}

/// Most payload events held while the table is busy.
const MAX_PENDING: usize = 4096;

/// Drains the payload ring every `interval` (events are submitted without
/// wakeups), parsing outside the kernel's hot path.
pub(crate) fn spawn_reader(
    mut ring: aya::maps::RingBuf<aya::maps::MapData>,
    table: SharedDestinations,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    interval: Duration,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("egressmon-payloads".into())
        .spawn(move || {
            let mut pending: Vec<Received> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                while let Some(item) = ring.next() {
                    if let Some(event) = decode(&item) {
                        received.fetch_add(1, Ordering::Relaxed);
                        if pending.len() < MAX_PENDING {
                            pending.push(event);
                        }
                    }
                }
                if !pending.is_empty() {
                    if let Ok(mut table) = table.try_lock() {
                        let now = Instant::now();
                        for event in pending.drain(..) {
                            table.on_event(&event, now);
                        }
                    }
                }
                std::thread::sleep(interval);
            }
        })
        .expect("spawning the payload reader thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_read_as_long_as_they_are() {
        let key = FlowKey {
            uid: 1001,
            port: 80,
            ..Default::default()
        };
        let mut record = Vec::new();
        // SAFETY: FlowKey is plain old data of 24 bytes.
        record.extend_from_slice(unsafe {
            std::slice::from_raw_parts(&key as *const FlowKey as *const u8, 24)
        });
        record.extend_from_slice(&[PAYLOAD_MORE_EGRESS, 0, 0, 0]);
        record.extend_from_slice(&900u32.to_ne_bytes()); // len
        record.extend_from_slice(&5u32.to_ne_bytes()); // captured
        record.extend_from_slice(&1280u32.to_ne_bytes()); // at
        record.extend_from_slice(b"hello");
        let got = decode(&record).unwrap();
        assert_eq!(
            (got.key, got.kind, got.at, &got.data[..]),
            (key, PAYLOAD_MORE_EGRESS, 1280, &b"hello"[..])
        );
        // A header that claims more than the record holds is cut to it.
        record.truncate(PAYLOAD_HEADER_BYTES + 2);
        assert_eq!(&decode(&record).unwrap().data[..], b"he");
        assert!(decode(&record[..10]).is_none());
    }
}
