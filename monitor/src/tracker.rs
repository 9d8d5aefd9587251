//! Follows flows over time from periodic snapshots of the kernel map: which
//! flows started, grew, went idle or were evicted, and which uids changed
//! owner. It produces the `--log` events and keeps the running totals that
//! must stay monotonic even when the kernel evicts flows (bytes by country,
//! cleartext flows).
//!
//! Memory is bounded by the flow map: per tracked flow it keeps the kernel's
//! values, the counters last logged, the sender's identity (shared with the
//! sender's other flows) and an index into a small table of (origin,
//! firmware, country) classes, about 140 bytes, in one vector indexed by a
//! small hash table (`IndexMap`: about 170 bytes per flow in all, where a
//! plain hash map at half load would take twice that); full records are
//! built only for the flows it logs.

use crate::events::FlowMeta;
use crate::flows::FlowRecord;
use crate::owners::Owner;
use crate::rules::Rules;
use monitor_common::{FlowKey, FlowValue};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

struct Tracked {
    current: FlowValue,
    /// Totals at the last flow_start/flow_update line.
    logged: Counters,
    /// Who opened the flow, taken over from the event reader.
    meta: Option<FlowMeta>,
    /// Seconds after `Tracker::epoch` the counters last moved.
    last_change: u32,
    /// Ended idle: the next change is logged as a new flow_start.
    ended: bool,
    /// Index into `Tracker::classes`.
    class: u32,
    /// Snapshot number that last contained this flow.
    seen: u32,
    /// `Describe::stamp` when the flow was last described.
    stamp: u64,
    /// Rules (by index) that already alerted on this flow.
    fired: u64,
    /// Counted in `cleartext_flows` already.
    cleartext: bool,
}

/// The counters of a flow value (what deltas are taken of).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Counters {
    connects: u64,
    udp_sends: u64,
    tx_packets: u64,
    tx_bytes: u64,
}

impl From<&FlowValue> for Counters {
    fn from(v: &FlowValue) -> Counters {
        Counters {
            connects: v.connects,
            udp_sends: v.udp_sends,
            tx_packets: v.tx_packets,
            tx_bytes: v.tx_bytes,
        }
    }
}

pub struct TrackerOptions {
    /// Flows the kernel map holds at most: reserved up front, so the table
    /// never doubles (and copies) while the agent runs.
    pub capacity: usize,
    pub update_every: Duration,
    pub idle_after: Duration,
    /// Build log events at all (false without `--log`: totals only).
    pub emit: bool,
    /// Alert rules judged on each flow when it starts and when its
    /// destination or payload becomes known.
    pub rules: Rules,
}

/// (origin, firmware, country)
pub type CountryKey = (String, bool, String);
/// (uid, owner, origin, firmware)
pub type OwnerKey = (u32, String, String, bool);

/// How the tracker learns about flows it has to describe.
pub trait Describe {
    /// The full record of a flow (owner, identity, destination details).
    fn record(&self, key: &FlowKey, value: &FlowValue, meta: Option<&FlowMeta>) -> FlowRecord;
    /// The identity the event reader recorded for a flow, handed over once
    /// (the tracker keeps it from then on).
    fn take_identity(&self, _key: &FlowKey) -> Option<FlowMeta> {
        None
    }
    /// The owner of a uid as the resolver sees it now.
    fn owner(&self, uid: u32) -> Owner;
    /// Changes when what `record` shows of the flow's destination or payload
    /// may have changed (the flow is then described and judged again).
    fn stamp(&self, _key: &FlowKey) -> u64 {
        0
    }
}

/// One pass over the kernel's flow map (see [`Tracker::begin_pass`]).
pub struct Pass {
    now: Instant,
    generation: u32,
    secs: u32,
    boot_now: u64,
}

pub struct Tracker {
    options: TrackerOptions,
    flows: indexmap::IndexMap<FlowKey, Tracked, foldhash::fast::RandomState>,
    owners: HashMap<u32, Owner>,
    classes: Vec<CountryKey>,
    class_index: HashMap<CountryKey, u32, foldhash::fast::RandomState>,
    /// Bytes sent per class, indexed like `classes`.
    class_bytes: Vec<u64>,
    last_update: Option<Instant>,
    generation: u32,
    epoch: Instant,
    pub cleartext_flows: BTreeMap<OwnerKey, u64>,
    /// Matches per alert rule.
    pub alerts: BTreeMap<String, u64>,
    /// Flows that vanished from the kernel map between two snapshots.
    pub flows_evicted: u64,
    /// The rules' names, in order (bit i of `Tracked::fired` is rule i).
    rule_names: Vec<String>,
}

fn stamp(mut value: Value, name: &str) -> Value {
    let map = value.as_object_mut().expect("records serialize to objects");
    map.insert("event".into(), json!(name));
    map.insert(
        "time".into(),
        json!(humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()),
    );
    value
}

fn event(name: &str, record: &FlowRecord) -> Value {
    stamp(
        serde_json::to_value(record).expect("FlowRecord serializes"),
        name,
    )
}

fn with_deltas(mut value: Value, now: &FlowValue, before: &Counters) -> Value {
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

/// Log events go straight to the writer; none is built when logging is off.
struct Sink<'a> {
    emit: bool,
    sink: &'a mut dyn FnMut(Value),
}

impl Sink<'_> {
    fn push_with(&mut self, build: impl FnOnce() -> Value) {
        if self.emit {
            (self.sink)(build());
        }
    }
}

fn end_event(describe: &dyn Describe, key: &FlowKey, tracked: &Tracked, reason: &str) -> Value {
    let record = describe.record(key, &tracked.current, tracked.meta.as_ref());
    let mut end = with_deltas(
        event("flow_end", &record),
        &tracked.current,
        &tracked.logged,
    );
    end["reason"] = json!(reason);
    end
}

fn changed(a: &FlowValue, b: &Counters) -> bool {
    Counters::from(a) != *b
}

impl Tracker {
    /// When a pass last saw the flow's counters move (CLOCK_BOOTTIME ns).
    pub fn last_seen(&self, key: &FlowKey) -> Option<u64> {
        self.flows.get(key).map(|t| t.current.last_seen)
    }

    pub fn contains(&self, key: &FlowKey) -> bool {
        self.flows.contains_key(key)
    }

    /// The identity of a tracked flow's sender.
    pub fn identity(&self, key: &FlowKey) -> Option<&FlowMeta> {
        self.flows.get(key)?.meta.as_ref()
    }

    /// Tracked flows that know their sender.
    pub fn identities(&self) -> usize {
        self.flows.values().filter(|t| t.meta.is_some()).count()
    }

    pub fn new(options: TrackerOptions) -> Tracker {
        let rule_names = options
            .rules
            .names()
            .iter()
            .map(|n| n.to_string())
            .collect();
        let capacity = options.capacity;
        Tracker {
            rule_names,
            options,
            flows: indexmap::IndexMap::with_capacity_and_hasher(capacity, Default::default()),
            owners: HashMap::new(),
            classes: Vec::new(),
            class_index: HashMap::default(),
            class_bytes: Vec::new(),
            last_update: None,
            generation: 0,
            epoch: Instant::now(),
            cleartext_flows: BTreeMap::new(),
            alerts: BTreeMap::new(),
            flows_evicted: 0,
        }
    }

    fn class_of(&mut self, record: &FlowRecord) -> u32 {
        let key = (
            record.origin.clone(),
            record.firmware,
            record.country.clone().unwrap_or_else(|| "unknown".into()),
        );
        if let Some(&i) = self.class_index.get(&key) {
            return i;
        }
        let i = self.classes.len() as u32;
        self.classes.push(key.clone());
        self.class_bytes.push(0);
        self.class_index.insert(key, i);
        i
    }

    fn add_bytes(&mut self, class: u32, bytes: u64) {
        self.class_bytes[class as usize] += bytes;
    }

    /// Bytes sent per (origin, firmware, country), for the classes that sent
    /// any; they only ever grow.
    pub fn bytes_by_country(&self) -> BTreeMap<&CountryKey, u64> {
        self.classes
            .iter()
            .zip(&self.class_bytes)
            .filter(|(_, &bytes)| bytes > 0)
            .map(|(key, &bytes)| (key, bytes))
            .collect()
    }

    /// Consumes one snapshot and hands the log events it implies, in order,
    /// to `sink` (nothing is built when events are off).
    pub fn tick(
        &mut self,
        now: Instant,
        snapshot: &[(FlowKey, FlowValue)],
        describe: &dyn Describe,
        sink: &mut dyn FnMut(Value),
    ) {
        let pass = self.begin_pass(now);
        self.take(&pass, snapshot, describe, sink);
        self.end_pass(pass, describe, sink);
    }

    /// Starts a pass over the kernel map; its flows come in through
    /// [`Tracker::take`], one chunk at a time, and [`Tracker::end_pass`]
    /// settles what the pass did not find.
    pub fn begin_pass(&mut self, now: Instant) -> Pass {
        self.generation = self.generation.wrapping_add(1);
        Pass {
            now,
            generation: self.generation,
            secs: now.saturating_duration_since(self.epoch).as_secs() as u32,
            boot_now: crate::system::clocks_now().0,
        }
    }

    /// Consumes one chunk of a pass.
    pub fn take(
        &mut self,
        pass: &Pass,
        snapshot: &[(FlowKey, FlowValue)],
        describe: &dyn Describe,
        sink: &mut dyn FnMut(Value),
    ) {
        let mut events = Sink {
            emit: self.options.emit,
            sink,
        };
        self.note_owners(snapshot, describe, &mut events);
        let (generation, secs, boot_now) = (pass.generation, pass.secs, pass.boot_now);
        for (key, value) in snapshot {
            // One hash lookup per flow and pass; indices from here on.
            let Some(mut index) = self.flows.get_index_of(key) else {
                let meta = describe.take_identity(key);
                // Classes and rules need no process details: those are
                // described only for the lines that show them.
                let record = describe.record(key, value, None);
                let class = self.class_of(&record);
                self.add_bytes(class, value.tx_bytes);
                events
                    .push_with(|| event("flow_start", &describe.record(key, value, meta.as_ref())));
                let mut tracked = Tracked {
                    current: *value,
                    logged: value.into(),
                    meta,
                    last_change: secs,
                    ended: false,
                    class,
                    seen: generation,
                    stamp: describe.stamp(key),
                    fired: 0,
                    cleartext: false,
                };
                let meta = tracked.meta.clone();
                self.judge(&record, &mut tracked, &mut events, &|| {
                    describe.record(key, value, meta.as_ref())
                });
                self.flows.insert(*key, tracked);
                continue;
            };
            let tracked = &mut self.flows[index];
            if tracked.meta.is_none() {
                // Its event was read after the snapshot that found it.
                tracked.meta = describe.take_identity(key);
            }
            let stamp = describe.stamp(key);
            if stamp != tracked.stamp {
                // Its payload or name arrived: describe and judge it again.
                let record = describe.record(key, value, None);
                let mut tracked = self.flows.swap_remove_index(index).expect("present").1;
                tracked.stamp = stamp;
                let meta = tracked.meta.clone();
                self.judge(&record, &mut tracked, &mut events, &|| {
                    describe.record(key, value, meta.as_ref())
                });
                index = self.flows.insert_full(*key, tracked).0;
            }
            let tracked = &self.flows[index];
            let (before, class, ended, logged) = (
                tracked.current,
                tracked.class,
                tracked.ended,
                tracked.logged,
            );
            let meta = if ended { tracked.meta.clone() } else { None };
            self.add_bytes(class, value.tx_bytes.saturating_sub(before.tx_bytes));
            let moved = changed(value, &(&before).into());
            if moved && ended {
                events.push_with(|| {
                    with_deltas(
                        event("flow_start", &describe.record(key, value, meta.as_ref())),
                        value,
                        &logged,
                    )
                });
            }
            let tracked = &mut self.flows[index];
            // The kernel stamps a flow when it creates it; after that, "last
            // seen" is when a pass found its counters moved.
            let last_seen = if moved { boot_now } else { before.last_seen };
            tracked.current = FlowValue {
                last_seen,
                ..*value
            };
            tracked.seen = generation;
            if moved {
                tracked.last_change = secs;
                if ended {
                    tracked.ended = false;
                    tracked.logged = value.into();
                }
            }
        }
    }

    /// Ends a pass: flows it did not find were evicted, quiet ones go idle,
    /// and flow_update lines are due every `update_every`.
    pub fn end_pass(&mut self, pass: Pass, describe: &dyn Describe, sink: &mut dyn FnMut(Value)) {
        let mut events = Sink {
            emit: self.options.emit,
            sink,
        };
        let (now, generation, secs) = (pass.now, pass.generation, pass.secs);
        let update_due = self
            .last_update
            .is_none_or(|t| now.duration_since(t) >= self.options.update_every);
        // Evicted by the kernel (LRU) or gone with the maps.
        let before = self.flows.len();
        self.flows.retain(|key, tracked| {
            if tracked.seen != generation {
                events.push_with(|| end_event(describe, key, tracked, "evicted"));
            }
            tracked.seen == generation
        });
        self.flows_evicted += (before - self.flows.len()) as u64;
        // Idle flows end; the kernel entry stays and new traffic restarts it.
        let idle_secs = self.options.idle_after.as_secs_f64().ceil() as u32;
        for (key, tracked) in self.flows.iter_mut() {
            if !tracked.ended && secs.saturating_sub(tracked.last_change) >= idle_secs {
                events.push_with(|| end_event(describe, key, tracked, "idle"));
                tracked.logged = (&tracked.current).into();
                tracked.ended = true;
            }
        }
        if update_due {
            self.last_update = Some(now);
            for (key, tracked) in self.flows.iter_mut().filter(|(_, t)| !t.ended) {
                if changed(&tracked.current, &tracked.logged) {
                    events.push_with(|| {
                        let record = describe.record(key, &tracked.current, tracked.meta.as_ref());
                        with_deltas(
                            event("flow_update", &record),
                            &tracked.current,
                            &tracked.logged,
                        )
                    });
                    tracked.logged = (&tracked.current).into();
                }
            }
        }
    }

    /// Counts a cleartext flow once and raises each matching rule's alert
    /// once per flow.
    /// `r` is the flow without process details; `full` describes it with
    /// them, for the alert lines.
    fn judge(
        &mut self,
        r: &FlowRecord,
        tracked: &mut Tracked,
        events: &mut Sink<'_>,
        full: &dyn Fn() -> FlowRecord,
    ) {
        if !tracked.cleartext && matches!(r.payload.as_str(), "cleartext" | "http") {
            tracked.cleartext = true;
            *self
                .cleartext_flows
                .entry((r.uid, r.owner.clone(), r.origin.clone(), r.firmware))
                .or_default() += 1;
        }
        for rule in self.options.rules.evaluate(r) {
            let index = self
                .rule_names
                .iter()
                .position(|n| *n == rule)
                .unwrap_or(63)
                .min(63);
            if tracked.fired & (1 << index) != 0 {
                continue;
            }
            tracked.fired |= 1 << index;
            *self.alerts.entry(rule.clone()).or_default() += 1;
            log::warn!(
                "alert {rule}: uid {} ({}, {}) -> {}:{} host {} country {} payload {}",
                r.uid,
                r.owner,
                r.origin,
                r.dst,
                r.port,
                r.host.as_deref().unwrap_or("?"),
                r.country.as_deref().unwrap_or("?"),
                r.payload
            );
            events.push_with(|| {
                let mut alert = event("alert", &full());
                alert["rule"] = json!(rule);
                alert
            });
        }
    }

    /// One resolver lookup per uid in the snapshot; a difference from the
    /// last one seen is an owner_change.
    fn note_owners(
        &mut self,
        snapshot: &[(FlowKey, FlowValue)],
        describe: &dyn Describe,
        events: &mut Sink<'_>,
    ) {
        // Few uids, many flows: skip runs of the same uid before hashing.
        let mut uids: Vec<u32> = Vec::new();
        let mut seen: std::collections::HashSet<u32, foldhash::fast::RandomState> =
            Default::default();
        let mut last = None;
        for (key, _) in snapshot {
            if last != Some(key.uid) && seen.insert(key.uid) {
                uids.push(key.uid);
            }
            last = Some(key.uid);
        }
        uids.sort_unstable();
        for uid in uids {
            let owner = describe.owner(uid);
            if let Some(before) = self.owners.get(&uid).filter(|b| **b != owner) {
                events.push_with(|| {
                    let mut value = stamp(
                        serde_json::to_value(&owner).expect("Owner serializes"),
                        "owner_change",
                    );
                    let map = value.as_object_mut().expect("object");
                    map.insert("previous_owner".into(), json!(before.owner));
                    map.insert("previous_packages".into(), json!(before.packages));
                    map.insert("previous_origin".into(), json!(before.origin));
                    map.insert("previous_firmware".into(), json!(before.firmware));
                    value
                });
            }
            self.owners.insert(uid, owner);
        }
    }

    pub fn rule_names(&self) -> Vec<String> {
        self.rule_names.clone()
    }

    pub fn tracked(&self) -> usize {
        self.flows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::record;
    use monitor_common::{FAMILY_IPV4, PROTO_TCP};
    use std::cell::RefCell;

    struct Fixed(RefCell<Owner>);
    impl Describe for Fixed {
        fn record(&self, key: &FlowKey, value: &FlowValue, meta: Option<&FlowMeta>) -> FlowRecord {
            record(key, value, &self.0.borrow(), meta)
        }
        fn owner(&self, _uid: u32) -> Owner {
            self.0.borrow().clone()
        }
    }

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

    fn snap(bytes: u64) -> Vec<(FlowKey, FlowValue)> {
        let key = FlowKey {
            uid: 10123,
            port: 80,
            proto: PROTO_TCP,
            family: FAMILY_IPV4,
            addr: [203, 0, 113, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        vec![(
            key,
            FlowValue {
                connects: 1,
                tx_packets: bytes / 100,
                tx_bytes: bytes,
                ..Default::default()
            },
        )]
    }

    #[test]
    fn a_pass_in_chunks_keeps_what_any_chunk_found() {
        let mut t = Tracker::new(TrackerOptions {
            capacity: 16,
            update_every: Duration::from_secs(10),
            idle_after: Duration::from_secs(30),
            emit: true,
            rules: Rules::none(),
        });
        let d = Fixed(RefCell::new(owner("com.example.app", "app")));
        let first = snap(100);
        let mut second = snap(200);
        second[0].0.port = 443;
        let mut events = Vec::new();
        let t0 = Instant::now();
        for at in [t0, t0 + Duration::from_secs(1)] {
            let pass = t.begin_pass(at);
            t.take(&pass, &first, &d, &mut |v| events.push(v));
            t.take(&pass, &second, &d, &mut |v| events.push(v));
            t.end_pass(pass, &d, &mut |v| events.push(v));
        }
        let names: Vec<&str> = events
            .iter()
            .map(|e| e["event"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["flow_start", "flow_start"]);
        assert_eq!((t.tracked(), t.flows_evicted), (2, 0));
        assert_eq!(t.bytes_by_country().values().sum::<u64>(), 300);
    }

    #[test]
    fn start_update_idle_end_restart_evict_and_owner_change() {
        let mut t = Tracker::new(TrackerOptions {
            capacity: 16,
            update_every: Duration::from_secs(10),
            idle_after: Duration::from_secs(30),
            emit: true,
            rules: Rules::none(),
        });
        let tick = |t: &mut Tracker, at: Instant, snap: &[(FlowKey, FlowValue)], d: &Fixed| {
            let mut out = Vec::new();
            t.tick(at, snap, d, &mut |v| out.push(v));
            out
        };
        let d = Fixed(RefCell::new(owner("com.example.app", "app")));
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let names = |evs: &[Value]| {
            evs.iter()
                .map(|e| e["event"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&tick(&mut t, t0, &snap(100), &d)), ["flow_start"]);
        assert!(
            tick(&mut t, s(5), &snap(300), &d).is_empty(),
            "no update before the interval"
        );
        let evs = tick(&mut t, s(10), &snap(300), &d);
        assert_eq!(names(&evs), ["flow_update"]);
        assert_eq!(
            (
                evs[0]["tx_bytes"].as_u64(),
                evs[0]["delta_tx_bytes"].as_u64()
            ),
            (Some(300), Some(200))
        );
        assert_eq!(names(&tick(&mut t, s(41), &snap(300), &d)), ["flow_end"]);
        assert!(tick(&mut t, s(45), &snap(300), &d).is_empty(), "ended once");
        let evs = tick(&mut t, s(50), &snap(500), &d);
        assert_eq!(names(&evs), ["flow_start"]);
        assert_eq!(evs[0]["delta_tx_bytes"].as_u64(), Some(200));
        *d.0.borrow_mut() = owner("com.vendor.updater", "preinstalled");
        let evs = tick(&mut t, s(51), &snap(500), &d);
        assert_eq!(names(&evs), ["owner_change"]);
        assert_eq!(
            (evs[0]["owner"].as_str(), evs[0]["previous_owner"].as_str()),
            (Some("com.vendor.updater"), Some("com.example.app"))
        );
        let evs = tick(&mut t, s(52), &[], &d);
        assert_eq!(names(&evs), ["flow_end"]);
        assert_eq!(evs[0]["reason"], "evicted");
        assert_eq!(t.flows_evicted, 1);
        // Country totals only ever grow: 500 bytes seen in all.
        assert_eq!(t.bytes_by_country().values().sum::<u64>(), 500);
    }
}
