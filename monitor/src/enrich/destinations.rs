//! Where flows went and what they carried: joins the kernel's payload events
//! (each flow's first payload bytes, every DNS response) with the DNS cache
//! and GeoIP data, and fills a flow record's `host`, `host_source`,
//! `payload`, `country` and `asn`.
//!
//! A flow's host comes from its own payload first (TLS or QUIC SNI, HTTP
//! Host), then from the DNS answers the same uid received for its
//! destination, then from anyone's answer for that address.

use crate::enrich::geoip::GeoIp;
use crate::pipeline::flows::{destination, FlowRecord};
use inspect::dns::DnsCache;
use inspect::{self, HostSource, Payload};
use monitor_common::{FlowKey, PayloadEvent, PAYLOAD_DNS_RESPONSE, PAYLOAD_FIRST_EGRESS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a flow's first payload said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FlowInfo {
    pub(crate) payload: Payload,
    pub(crate) host: Option<(String, HostSource)>,
}

pub(crate) struct Destinations {
    flows: HashMap<FlowKey, FlowInfo, foldhash::fast::RandomState>,
    capacity: usize,
    dns: DnsCache,
    geoip: GeoIp,
    /// Bumped whenever something a record shows may have changed.
    pub(crate) version: u64,
    pub(crate) dns_responses: u64,
    pub(crate) payloads_seen: u64,
}

impl Destinations {
    pub(crate) fn new(geoip: GeoIp, capacity: usize) -> Destinations {
        Destinations {
            flows: HashMap::default(),
            capacity,
            dns: DnsCache::default(),
            geoip,
            version: 0,
            dns_responses: 0,
            payloads_seen: 0,
        }
    }

    pub(crate) fn on_event(&mut self, event: &PayloadEvent, now: Instant) {
        let captured = (event.captured as usize).min(event.data.len());
        let data = &event.data[..captured];
        match event.kind {
            PAYLOAD_FIRST_EGRESS => {
                self.payloads_seen += 1;
                let key = event.key;
                let info = FlowInfo {
                    payload: inspect::classify(key.proto, key.port, data),
                    host: inspect::host_from_payload(key.proto, key.port, data),
                };
                if self.flows.len() >= self.capacity && !self.flows.contains_key(&key) {
                    // Bounded like the kernel's flow map; the oldest entries
                    // are pruned by `retain_live`, this only guards bursts.
                    return;
                }
                self.flows.insert(key, info);
                self.version += 1;
            }
            PAYLOAD_DNS_RESPONSE => {
                self.dns_responses += 1;
                if self
                    .dns
                    .observe_payload(event.key.uid, event.key.proto, data, now)
                    > 0
                {
                    self.version += 1;
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

    /// Drops what belongs to flows the kernel no longer holds.
    pub(crate) fn retain_live(&mut self, live: &dyn Fn(&FlowKey) -> bool, now: Instant) {
        self.flows.retain(|k, _| live(k));
        self.dns.purge_expired(now);
    }

    /// A per-flow stamp that changes when the flow's own payload arrives
    /// (names from DNS answers precede the connection they name, so they
    /// are in place when the flow is first described).
    pub(crate) fn stamp(&self, key: &FlowKey) -> u64 {
        self.flows
            .get(key)
            .map(|i| 1 + i.host.is_some() as u64)
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

    /// Fills `host`, `host_source`, `payload`, `country` and `asn`.
    pub(crate) fn describe(&mut self, key: &FlowKey, record: &mut FlowRecord, now: Instant) {
        let ip = destination(key);
        let info = self.flows.get(key);
        record.payload = match info {
            Some(i) => i.payload,
            None if key.port == 53 => Payload::Dns,
            None => Payload::Unknown,
        };
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

fn decode(bytes: &[u8]) -> Option<PayloadEvent> {
    if bytes.len() < std::mem::size_of::<PayloadEvent>() {
        return None;
    }
    // SAFETY: PayloadEvent is plain old data and the slice is long enough.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const PayloadEvent) })
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
            let mut pending: Vec<PayloadEvent> = Vec::new();
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
