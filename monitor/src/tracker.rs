//! Follows flows over time from periodic snapshots of the kernel map: which
//! flows started, grew, went idle or were evicted, and which uids changed
//! owner. It produces the `--log` events and keeps the running totals that
//! must stay monotonic even when the kernel evicts flows (bytes by country,
//! cleartext flows).

use crate::flows::FlowRecord;
use crate::owners::Owner;
use monitor_common::FlowKey;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

struct Tracked {
    current: FlowRecord,
    /// Totals at the last flow_start/flow_update line.
    logged: FlowRecord,
    last_change: Instant,
    /// Ended idle: the next change is logged as a new flow_start.
    ended: bool,
    counted_cleartext: bool,
}

pub struct TrackerOptions {
    pub update_every: Duration,
    pub idle_after: Duration,
}

/// (origin, firmware, country)
pub type CountryKey = (String, bool, String);
/// (uid, owner, origin, firmware)
pub type OwnerKey = (u32, String, String, bool);

pub struct Tracker {
    options: TrackerOptions,
    flows: HashMap<FlowKey, Tracked>,
    owners: HashMap<u32, Owner>,
    last_update: Option<Instant>,
    pub bytes_by_country: BTreeMap<CountryKey, u64>,
    pub cleartext_flows: BTreeMap<OwnerKey, u64>,
    /// Matches per alert rule.
    pub alerts: BTreeMap<String, u64>,
    pub flows_evicted: u64,
}

fn event(name: &str, flow: &FlowRecord) -> Value {
    let mut value = serde_json::to_value(flow).expect("FlowRecord serializes");
    let map = value.as_object_mut().expect("FlowRecord is an object");
    map.insert("event".into(), json!(name));
    map.insert(
        "time".into(),
        json!(humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()),
    );
    value
}

fn with_deltas(mut value: Value, now: &FlowRecord, before: &FlowRecord) -> Value {
    let map = value.as_object_mut().expect("object");
    map.insert(
        "delta_connects".into(),
        json!(now.connects.saturating_sub(before.connects)),
    );
    map.insert(
        "delta_udp_sends".into(),
        json!(now.udp_sends.saturating_sub(before.udp_sends)),
    );
    map.insert(
        "delta_tx_packets".into(),
        json!(now.tx_packets.saturating_sub(before.tx_packets)),
    );
    map.insert(
        "delta_tx_bytes".into(),
        json!(now.tx_bytes.saturating_sub(before.tx_bytes)),
    );
    value
}

fn changed(a: &FlowRecord, b: &FlowRecord) -> bool {
    (a.connects, a.udp_sends, a.tx_packets, a.tx_bytes)
        != (b.connects, b.udp_sends, b.tx_packets, b.tx_bytes)
}

impl Tracker {
    pub fn new(options: TrackerOptions) -> Tracker {
        Tracker {
            options,
            flows: HashMap::new(),
            owners: HashMap::new(),
            last_update: None,
            bytes_by_country: BTreeMap::new(),
            cleartext_flows: BTreeMap::new(),
            alerts: BTreeMap::new(),
            flows_evicted: 0,
        }
    }

    /// Consumes one snapshot; returns the log events it implies, in order.
    pub fn tick(&mut self, now: Instant, snapshot: Vec<(FlowKey, FlowRecord)>) -> Vec<Value> {
        let mut events = Vec::new();
        let update_due = self
            .last_update
            .is_none_or(|t| now.duration_since(t) >= self.options.update_every);
        let mut seen = std::collections::HashSet::with_capacity(snapshot.len());
        for (key, record) in snapshot {
            seen.insert(key);
            self.note_owner(&record, &mut events);
            match self.flows.get_mut(&key) {
                None => {
                    let country = record.country.clone().unwrap_or_else(|| "unknown".into());
                    *self
                        .bytes_by_country
                        .entry((record.origin.clone(), record.firmware, country))
                        .or_default() += record.tx_bytes;
                    events.push(event("flow_start", &record));
                    let mut tracked = Tracked {
                        logged: record.clone(),
                        current: record,
                        last_change: now,
                        ended: false,
                        counted_cleartext: false,
                    };
                    Self::count_cleartext(&mut self.cleartext_flows, &mut tracked);
                    self.flows.insert(key, tracked);
                }
                Some(tracked) => {
                    let delta = record.tx_bytes.saturating_sub(tracked.current.tx_bytes);
                    if delta > 0 {
                        let country = record.country.clone().unwrap_or_else(|| "unknown".into());
                        *self
                            .bytes_by_country
                            .entry((record.origin.clone(), record.firmware, country))
                            .or_default() += delta;
                    }
                    let moved = changed(&record, &tracked.current);
                    tracked.current = record;
                    if moved {
                        tracked.last_change = now;
                        if tracked.ended {
                            tracked.ended = false;
                            events.push(with_deltas(
                                event("flow_start", &tracked.current),
                                &tracked.current,
                                &tracked.logged,
                            ));
                            tracked.logged = tracked.current.clone();
                        }
                    }
                    Self::count_cleartext(&mut self.cleartext_flows, tracked);
                }
            }
        }
        // Evicted by the kernel (LRU) or gone with the maps.
        let gone: Vec<FlowKey> = self
            .flows
            .keys()
            .filter(|k| !seen.contains(k))
            .copied()
            .collect();
        for key in gone {
            let tracked = self.flows.remove(&key).expect("present");
            self.flows_evicted += 1;
            let mut end = with_deltas(
                event("flow_end", &tracked.current),
                &tracked.current,
                &tracked.logged,
            );
            end["reason"] = json!("evicted");
            events.push(end);
        }
        // Idle flows end; the kernel entry stays, new traffic restarts it.
        let idle: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|(_, t)| {
                !t.ended && now.duration_since(t.last_change) >= self.options.idle_after
            })
            .map(|(k, _)| *k)
            .collect();
        for key in idle {
            let tracked = self.flows.get_mut(&key).expect("present");
            let mut end = with_deltas(
                event("flow_end", &tracked.current),
                &tracked.current,
                &tracked.logged,
            );
            end["reason"] = json!("idle");
            events.push(end);
            // Keep tracking so byte deltas stay right; a restart is a new flow_start.
            tracked.logged = tracked.current.clone();
            tracked.ended = true;
        }
        if update_due {
            self.last_update = Some(now);
            for tracked in self.flows.values_mut().filter(|t| !t.ended) {
                if changed(&tracked.current, &tracked.logged) {
                    events.push(with_deltas(
                        event("flow_update", &tracked.current),
                        &tracked.current,
                        &tracked.logged,
                    ));
                    tracked.logged = tracked.current.clone();
                }
            }
        }
        events
    }

    fn count_cleartext(counts: &mut BTreeMap<OwnerKey, u64>, tracked: &mut Tracked) {
        let r = &tracked.current;
        if !tracked.counted_cleartext && matches!(r.payload.as_str(), "cleartext" | "http") {
            tracked.counted_cleartext = true;
            *counts
                .entry((r.uid, r.owner.clone(), r.origin.clone(), r.firmware))
                .or_default() += 1;
        }
    }

    fn note_owner(&mut self, record: &FlowRecord, events: &mut Vec<Value>) {
        let owner = Owner {
            uid: record.uid,
            user: record.user,
            app_id: record.app_id,
            owner: record.owner.clone(),
            packages: record.packages.clone(),
            origin: record.origin.clone(),
            firmware: record.firmware,
        };
        match self.owners.get(&record.uid) {
            Some(before) if *before != owner => {
                let mut value = serde_json::to_value(&owner).expect("Owner serializes");
                let map = value.as_object_mut().expect("object");
                map.insert("event".into(), json!("owner_change"));
                map.insert(
                    "time".into(),
                    json!(
                        humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
                    ),
                );
                map.insert("previous_owner".into(), json!(before.owner));
                map.insert("previous_packages".into(), json!(before.packages));
                map.insert("previous_origin".into(), json!(before.origin));
                map.insert("previous_firmware".into(), json!(before.firmware));
                events.push(value);
                self.owners.insert(record.uid, owner);
            }
            Some(_) => {}
            None => {
                self.owners.insert(record.uid, owner);
            }
        }
    }

    pub fn tracked(&self) -> usize {
        self.flows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::record;
    use monitor_common::{FlowValue, FAMILY_IPV4, PROTO_TCP};

    fn owner(name: &str, origin: &str) -> Owner {
        Owner {
            uid: 10123,
            user: 0,
            app_id: 10123,
            owner: name.into(),
            packages: vec![],
            origin: origin.into(),
            firmware: origin != "app",
        }
    }

    fn snap(bytes: u64, o: &Owner) -> Vec<(FlowKey, FlowRecord)> {
        let key = FlowKey {
            uid: 10123,
            port: 80,
            proto: PROTO_TCP,
            family: FAMILY_IPV4,
            addr: [203, 0, 113, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        let value = FlowValue {
            connects: 1,
            tx_packets: bytes / 100,
            tx_bytes: bytes,
            ..Default::default()
        };
        vec![(key, record(&key, &value, o, None))]
    }

    #[test]
    fn start_update_idle_end_restart_evict_and_owner_change() {
        let mut t = Tracker::new(TrackerOptions {
            update_every: Duration::from_secs(10),
            idle_after: Duration::from_secs(30),
        });
        let app = owner("com.example.app", "app");
        let t0 = Instant::now();
        let names = |evs: &[Value]| {
            evs.iter()
                .map(|e| e["event"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&t.tick(t0, snap(100, &app))), ["flow_start"]);
        assert!(
            t.tick(t0 + Duration::from_secs(5), snap(300, &app))
                .is_empty(),
            "no update before the interval"
        );
        let evs = t.tick(t0 + Duration::from_secs(10), snap(300, &app));
        assert_eq!(names(&evs), ["flow_update"]);
        assert_eq!(
            (
                evs[0]["tx_bytes"].as_u64(),
                evs[0]["delta_tx_bytes"].as_u64()
            ),
            (Some(300), Some(200))
        );
        assert_eq!(
            names(&t.tick(t0 + Duration::from_secs(41), snap(300, &app))),
            ["flow_end"]
        );
        let evs = t.tick(t0 + Duration::from_secs(50), snap(500, &app));
        assert_eq!(names(&evs), ["flow_start"]);
        assert_eq!(evs[0]["delta_tx_bytes"].as_u64(), Some(200));
        let renamed = owner("com.vendor.updater", "preinstalled");
        let evs = t.tick(t0 + Duration::from_secs(51), snap(500, &renamed));
        assert_eq!(names(&evs), ["owner_change"]);
        assert_eq!(
            (evs[0]["owner"].as_str(), evs[0]["previous_owner"].as_str()),
            (Some("com.vendor.updater"), Some("com.example.app"))
        );
        let evs = t.tick(t0 + Duration::from_secs(52), vec![]);
        assert_eq!(names(&evs), ["flow_end"]);
        assert_eq!(evs[0]["reason"], "evicted");
        assert_eq!(t.flows_evicted, 1);
        // Country totals only ever grow: 500 bytes seen in all.
        assert_eq!(t.bytes_by_country.values().sum::<u64>(), 500);
    }
}
