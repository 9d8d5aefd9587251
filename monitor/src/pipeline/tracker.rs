//! Follows flows over time from periodic snapshots of the kernel map: which
//! flows started, grew, went idle or were evicted, and which uids changed
//! owner. It produces the `--log` events and keeps the running totals that
//! must stay monotonic even when the kernel evicts flows (bytes by country,
//! cleartext flows, identifier leaks).
//!
//! Memory is bounded by the flow map: per tracked flow it keeps the kernel's
//! values, the counters last logged, the sender's identity and the owner and
//! sender parts of its description (both shared with the sender's other
//! flows), what was learnt of its destination, the counters the history
//! database holds of it, and an index into a small table of (origin,
//! firmware, country) classes, about 250 bytes, in one
//! vector indexed by a small hash table (`IndexMap`, where a plain hash map
//! at half load would take twice that); full records are built only when
//! read or logged.

use crate::identity::events::{FlowMeta, Identities};
use crate::identity::owners::Owner;
use crate::pipeline::flows::{Description, FlowRecord, Senders};
use crate::pipeline::rules::Rules;
use crate::pipeline::vocab::Payload;
use crate::serve::jsonl::{self, Deltas, EndReason, LogEvent};
use monitor_common::{FlowKey, FlowValue};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

struct Tracked {
    current: FlowValue,
    /// Totals at the last flow_start/flow_update line.
    logged: Counters,
    /// Who opened the flow, as the event reader identified it.
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
    /// Its leaks (in the order found) counted in `identifier_leaks` already.
    leaks_counted: u32,
    /// The counters the history database holds of this flow (zero until
    /// it is first written; see `crate::history`).
    written: Counters,
    /// The flow described (owner, sender, destination, payload), once per
    /// change: when it starts, its sender becomes known, its destination or
    /// payload is learnt, or its uid's owner changes. None until then (a
    /// flow restored from a state file). Counters are filled in when read.
    description: Option<Description>,
}

impl Tracked {
    /// What history has not written of this evicted flow, if anything.
    fn take_unwritten(&mut self, key: &FlowKey) -> Option<Unwritten> {
        if Counters::from(&self.current) == self.written {
            return None;
        }
        Some(Unwritten {
            key: *key,
            value: self.current,
            written: self.written,
            description: self.description.take()?,
        })
    }

    /// Describes the flow (see `description`).
    fn describe(&mut self, record: FlowRecord, senders: &mut Senders) {
        let sender_id = self
            .meta
            .as_ref()
            .map_or(0, |m| std::sync::Arc::as_ptr(&m.sender) as usize);
        self.description = Some(Description::keep(record, sender_id, senders));
    }

    /// The flow as it is now: its description, made when missing, with
    /// `value`'s counters.
    fn now(
        &mut self,
        describe: &dyn Describe,
        senders: &mut Senders,
        key: &FlowKey,
        value: &FlowValue,
    ) -> FlowRecord {
        match &self.description {
            Some(description) => description.record(key, value),
            None => {
                let record = describe.record(key, value, self.meta.as_ref());
                self.describe(record.clone(), senders);
                record
            }
        }
    }
}

/// The counters of a flow value (what deltas are taken of).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub(crate) connects: u64,
    pub(crate) udp_sends: u64,
    pub(crate) tx_packets: u64,
    pub(crate) tx_bytes: u64,
}

impl Counters {
    fn value(&self) -> FlowValue {
        FlowValue {
            connects: self.connects,
            udp_sends: self.udp_sends,
            tx_packets: self.tx_packets,
            tx_bytes: self.tx_bytes,
            ..Default::default()
        }
    }
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

pub(crate) struct TrackerOptions {
    /// Flows the kernel map holds at most: reserved up front, so the table
    /// never doubles (and copies) while the agent runs.
    pub(crate) capacity: usize,
    pub(crate) update_every: Duration,
    pub(crate) idle_after: Duration,
    /// Build log events at all (false without `--log`: totals only).
    pub(crate) emit: bool,
    /// Alert rules judged on each flow when it starts and when its
    /// destination or payload becomes known.
    pub(crate) rules: Rules,
}

/// (origin, firmware, country)
pub(crate) type CountryKey = (String, bool, String);
/// (uid, owner, origin, firmware)
pub(crate) type OwnerKey = (u32, String, String, bool);
/// (identifier, form, origin, firmware)
pub(crate) type LeakKey = (String, String, String, bool);

/// How the tracker learns about flows it has to describe.
pub(crate) trait Describe {
    /// The full record of a flow (owner, identity, destination details).
    fn record(&self, key: &FlowKey, value: &FlowValue, meta: Option<&FlowMeta>) -> FlowRecord;
    /// The owner of a uid as the resolver sees it now.
    fn owner(&self, uid: u32) -> Owner;
    /// Changes when what `record` shows of the flow's destination or payload
    /// may have changed (the flow is then described and judged again).
    fn stamp(&self, _key: &FlowKey) -> u64 {
        0
    }
    /// Whether a host name for the flow's destination is known now (from a
    /// DNS answer to its uid): a flow described without one is described
    /// again once it is.
    fn has_name(&self, _key: &FlowKey) -> bool {
        false
    }
}

/// One pass over the kernel's flow map (see [`Tracker::begin_pass`]).
pub(crate) struct Pass {
    now: Instant,
    generation: u32,
    secs: u32,
    boot_now: u64,
}

pub(crate) struct Tracker {
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
    pub(crate) cleartext_flows: BTreeMap<OwnerKey, u64>,
    /// Flows that carried an identifier, per identifier and form.
    pub(crate) identifier_leaks: BTreeMap<LeakKey, u64>,
    /// Matches per alert rule.
    pub(crate) alerts: BTreeMap<String, u64>,
    /// Flows that vanished from the kernel map between two snapshots.
    pub(crate) flows_evicted: u64,
    /// The rules' names, in order (bit i of `Tracked::fired` is rule i).
    rule_names: Vec<String>,
    /// Flows whose flow_start a previous agent logged after its last save
    /// (see [`Tracker::replay`]): they start here without a second line.
    announced: HashMap<FlowKey, Announced, foldhash::fast::RandomState>,
    /// Something a state file keeps changed since [`Tracker::take_dirty`].
    dirty: bool,
    /// `Pass::secs` of the latest pass.
    last_secs: u32,
    /// Identities the event reader handed over whose flows no pass has
    /// found yet (see [`Tracker::receive`]).
    unclaimed: Identities,
    /// The owner and sender parts of the flows' descriptions.
    senders: Senders,
    /// Flows evicted with counters history has not written yet (kept
    /// only while history is on; see [`Tracker::keep_unwritten`]).
    unwritten: Option<Vec<Unwritten>>,
    /// Flows the current pass found while the tracker held as many flows
    /// as the map can: they start once the pass has dropped what the kernel
    /// evicted, so that a pass over a churning map never tracks its old and
    /// new flows at once (up to twice the map's size). Below that, a new
    /// flow starts where the walk finds it (a full map's first pass would
    /// otherwise hold all of it here, 104 bytes a flow).
    arrivals: Vec<(FlowKey, FlowValue)>,
    /// `Pass::secs` at which the soonest flow goes idle (`u32::MAX`: none).
    next_idle: u32,
    /// A flow moved since the last flow_update lines.
    unlogged: bool,
    /// The block rules' names by number, and those that learn
    /// destinations from described flows.
    blocks: crate::block::BlockView,
    /// Attempts refused (or that a dry run would have refused), per rule
    /// and owner.
    pub(crate) blocked: BTreeMap<BlockedKey, u64>,
    /// Destinations described flows taught a learning block rule (rule,
    /// uid, address), for the agent to hand to the block rules.
    block_matches: Vec<(String, u32, std::net::IpAddr)>,
}

/// Labels of `egressmon_blocked_total`: rule, uid, owner, origin, firmware.
pub(crate) type BlockedKey = (String, u32, String, String, bool);

/// A `block` log line goes out at a flow's first refused attempt and then
/// at every this many.
pub(crate) const BLOCK_LOG_EVERY: u64 = 100;

/// A flow the kernel evicted before history wrote all it counted: its last
/// counters, what history holds of it and its description.
pub(crate) struct Unwritten {
    pub(crate) key: FlowKey,
    pub(crate) value: FlowValue,
    pub(crate) written: Counters,
    pub(crate) description: Description,
}

/// What a previous agent logged of a flow it had not saved yet.
#[derive(Default)]
struct Announced {
    logged: Counters,
    fired: u64,
}

/// A tracked flow as a state file keeps it over an agent restart (see
/// `crate::serve::state`).
pub(crate) struct SavedFlow {
    pub(crate) key: FlowKey,
    /// The kernel's counters as of the last pass: its bytes up to here are
    /// in `class`'s total.
    pub(crate) current: FlowValue,
    pub(crate) logged: Counters,
    /// Seconds since its counters last moved, as of the last pass.
    pub(crate) idle_secs: u32,
    pub(crate) ended: bool,
    pub(crate) cleartext: bool,
    pub(crate) leaks_counted: u32,
    pub(crate) class: u32,
    /// Rules that alerted on it, bit i for `SavedTotals::rule_names[i]`.
    pub(crate) fired: u64,
    pub(crate) stamp: u64,
    pub(crate) meta: Option<FlowMeta>,
}

/// Everything else a state file keeps of the tracker.
#[derive(Default)]
pub(crate) struct SavedTotals {
    pub(crate) rule_names: Vec<String>,
    /// Bytes per class, in class index order.
    pub(crate) classes: Vec<(CountryKey, u64)>,
    pub(crate) cleartext_flows: BTreeMap<OwnerKey, u64>,
    pub(crate) identifier_leaks: BTreeMap<LeakKey, u64>,
    pub(crate) alerts: BTreeMap<String, u64>,
    pub(crate) flows_evicted: u64,
    pub(crate) owners: Vec<Owner>,
    /// Countries each owner reached (for `new_country` rules).
    pub(crate) countries_reached: Vec<(String, Vec<String>)>,
    /// Seconds since the last flow_update round, as of the last pass.
    pub(crate) since_update: Option<u32>,
}

/// How saved flows are brought back (see [`Tracker::restore_totals`]).
pub(crate) struct Restoring {
    /// New rule index of each saved rule bit.
    rule_bits: Vec<Option<usize>>,
    /// Seconds the agent was away (added to every idle time).
    downtime_secs: u32,
    /// `Pass::secs` of the first pass to come, about.
    base_secs: u32,
}

/// A `--log` line of a previous agent, written after its last save.
pub(crate) enum Logged {
    Start(FlowKey, Counters),
    Update(FlowKey, Counters),
    End {
        key: FlowKey,
        counters: Counters,
        evicted: bool,
    },
    Alert(FlowKey, String),
    OwnerChange(Owner),
}

fn deltas(now: &FlowValue, before: &Counters) -> Deltas {
    Deltas {
        delta_connects: now.connects.saturating_sub(before.connects),
        delta_udp_sends: now.udp_sends.saturating_sub(before.udp_sends),
        delta_tx_packets: now.tx_packets.saturating_sub(before.tx_packets),
        delta_tx_bytes: now.tx_bytes.saturating_sub(before.tx_bytes),
    }
}

/// Log events go straight to the writer; none is built when logging is off.
struct Sink<'a> {
    emit: bool,
    sink: &'a mut dyn FnMut(LogEvent),
}

impl Sink<'_> {
    fn push_with(&mut self, build: impl FnOnce() -> LogEvent) {
        if self.emit {
            (self.sink)(build());
        }
    }
}

fn end_event(
    describe: &dyn Describe,
    senders: &mut Senders,
    key: &FlowKey,
    tracked: &mut Tracked,
    reason: EndReason,
) -> LogEvent {
    let current = tracked.current;
    LogEvent::FlowEnd {
        time: jsonl::now(),
        flow: tracked.now(describe, senders, key, &current),
        deltas: deltas(&current, &tracked.logged),
        reason,
    }
}

fn changed(a: &FlowValue, b: &Counters) -> bool {
    Counters::from(a) != *b
}

/// Whether `now` is the flow `tracked` was: the kernel stamps `first_seen`
/// once, when it creates the entry (0 would be no stamp: not compared).
fn same_flow(tracked: &FlowValue, now: &FlowValue) -> bool {
    tracked.first_seen == 0 || now.first_seen == 0 || tracked.first_seen == now.first_seen
}

impl Tracker {
    /// When a pass last saw the flow's counters move (CLOCK_BOOTTIME ns).
    pub(crate) fn contains(&self, key: &FlowKey) -> bool {
        self.flows.contains_key(key)
    }

    /// The flow table as of the latest pass: each flow's description with
    /// its counters and the rules that alerted on it (`top` marks them).
    pub(crate) fn records(&self) -> Vec<FlowRecord> {
        self.flows
            .iter()
            .filter_map(|(key, tracked)| {
                let mut record = tracked.description.as_ref()?.record(key, &tracked.current);
                self.name_block(&mut record, &tracked.current);
                record.alerts = self
                    .rule_names
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| tracked.fired & (1 << (*i).min(63)) != 0)
                    .map(|(_, name)| name.clone())
                    .collect();
                Some(record)
            })
            .collect()
    }

    /// History's walk: every described flow with its kernel counters as of
    /// the latest pass and what the history database holds of it, which
    /// `f` may move forward, in the order of `order`'s keys (history's
    /// rows in index order: each page of the index is fetched once per
    /// walk instead of once per row).
    pub(crate) fn for_each_written<K: Ord, E>(
        &mut self,
        order: impl Fn(&FlowKey) -> K,
        mut f: impl FnMut(&FlowKey, &FlowValue, &Description, &mut Counters) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut indices: Vec<usize> = (0..self.flows.len()).collect();
        indices.sort_unstable_by_key(|&i| order(self.flows.get_index(i).expect("in range").0));
        for i in indices {
            let (key, tracked) = self.flows.get_index_mut(i).expect("in range");
            let Tracked {
                current,
                description,
                written,
                ..
            } = tracked;
            if let Some(description) = description {
                f(key, current, description, written)?;
            }
        }
        Ok(())
    }

    /// From now on, keeps evicted flows that history has not written all
    /// of until [`Tracker::take_unwritten`].
    pub(crate) fn keep_unwritten(&mut self) {
        self.unwritten.get_or_insert_with(Vec::new);
    }

    /// The flows evicted since the last call with counters history has
    /// not written.
    pub(crate) fn take_unwritten(&mut self) -> Vec<Unwritten> {
        self.unwritten
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Forgets what history wrote of every flow (its write failed; what
    /// the database holds is read back).
    pub(crate) fn reset_written(&mut self) {
        for tracked in self.flows.values_mut() {
            tracked.written = Counters::default();
        }
    }

    /// Identities the tracker holds: of tracked flows, and of flows no pass
    /// has found yet.
    pub(crate) fn identities(&self) -> usize {
        self.flows.values().filter(|t| t.meta.is_some()).count() + self.unclaimed.len()
    }

    /// Takes over the identities the event reader found: each goes to its
    /// flow when a pass finds it (one found already without its sender is
    /// described again with it), or leaves when none does in time.
    pub(crate) fn receive(&mut self, identified: impl IntoIterator<Item = (FlowKey, FlowMeta)>) {
        for (key, meta) in identified {
            self.unclaimed.record(key, meta);
        }
    }

    pub(crate) fn new(options: TrackerOptions) -> Tracker {
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
            identifier_leaks: BTreeMap::new(),
            alerts: BTreeMap::new(),
            flows_evicted: 0,
            announced: HashMap::default(),
            dirty: false,
            last_secs: 0,
            unclaimed: Identities::new(capacity),
            senders: Senders::default(),
            unwritten: None,
            arrivals: Vec::new(),
            next_idle: u32::MAX,
            unlogged: false,
            blocks: Default::default(),
            blocked: BTreeMap::new(),
            block_matches: Vec::new(),
        }
    }

    /// The block rules in force (names by number, learning rules).
    pub(crate) fn set_blocks(&mut self, view: crate::block::BlockView) {
        self.blocks = view;
    }

    /// A reloaded rules file's alert rules.
    pub(crate) fn set_rules(&mut self, rules: Rules) {
        self.rule_names = rules.names().iter().map(|n| n.to_string()).collect();
        self.options.rules = rules;
    }

    /// Destinations learning block rules matched since the last call.
    pub(crate) fn take_block_matches(&mut self) -> Vec<(String, u32, std::net::IpAddr)> {
        std::mem::take(&mut self.block_matches)
    }

    /// Names the block rule of a record's flow.
    fn name_block(&self, record: &mut FlowRecord, value: &FlowValue) {
        let mark = if value.block != 0 {
            value.block
        } else {
            value.blocked_by
        };
        if let Some((rule, mode)) = self.blocks.rule_of(mark) {
            record.block_rule = Some(rule.clone());
            record.block_mode = Some(*mode);
        }
    }

    /// Counts what block rules refused of a flow since `before` (its
    /// blocked count at the last pass), and logs its first refused attempt
    /// and every `BLOCK_LOG_EVERY`-th.
    fn count_blocked(
        &mut self,
        record: &FlowRecord,
        before: u64,
        value: &FlowValue,
        events: &mut Sink<'_>,
    ) {
        let now = value.blocked;
        // A count below the last one is a flow the kernel made again.
        let delta = if now >= before { now - before } else { now };
        if delta == 0 {
            return;
        }
        let (rule, mode) = self
            .blocks
            .rule_of(if value.blocked_by != 0 {
                value.blocked_by
            } else {
                value.block
            })
            .cloned()
            .unwrap_or_else(|| ("unknown".into(), crate::pipeline::rules::BlockMode::DryRun));
        *self
            .blocked
            .entry((
                rule.clone(),
                record.uid,
                record.owner.clone(),
                record.origin.to_string(),
                record.firmware,
            ))
            .or_default() += delta;
        self.dirty = true;
        let first = before == 0 || now < before;
        if first || before / BLOCK_LOG_EVERY != now / BLOCK_LOG_EVERY {
            if first {
                log::warn!(
                    "block {rule} ({mode}): uid {} ({}) -> {}:{} refused",
                    record.uid,
                    crate::cli::text::escape(&record.owner),
                    record.dst,
                    record.port
                );
            }
            let mut flow = record.clone();
            flow.block_rule = Some(rule.clone());
            flow.block_mode = Some(mode);
            flow.blocked = now;
            events.push_with(|| LogEvent::Block {
                time: jsonl::now(),
                flow,
                rule,
                mode,
            });
        }
    }

    fn class_of(&mut self, record: &FlowRecord) -> u32 {
        self.class_index_of((
            record.origin.to_string(),
            record.firmware,
            record.country.clone().unwrap_or_else(|| "unknown".into()),
        ))
    }

    fn class_index_of(&mut self, key: CountryKey) -> u32 {
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
    pub(crate) fn bytes_by_country(&self) -> BTreeMap<&CountryKey, u64> {
        self.classes
            .iter()
            .zip(&self.class_bytes)
            .filter(|(_, &bytes)| bytes > 0)
            .map(|(key, &bytes)| (key, bytes))
            .collect()
    }

    /// Consumes one snapshot and hands the log events it implies, in order,
    /// to `sink` (nothing is built when events are off).
    #[cfg(test)]
    pub(crate) fn tick(
        &mut self,
        now: Instant,
        snapshot: &[(FlowKey, FlowValue)],
        describe: &dyn Describe,
        sink: &mut dyn FnMut(LogEvent),
    ) {
        let pass = self.begin_pass(now);
        self.take(&pass, snapshot, describe, sink);
        self.end_pass(pass, describe, sink);
    }

    /// Starts a pass over the kernel map; its flows come in through
    /// [`Tracker::take`], one chunk at a time, and [`Tracker::end_pass`]
    /// settles what the pass did not find.
    pub(crate) fn begin_pass(&mut self, now: Instant) -> Pass {
        self.generation = self.generation.wrapping_add(1);
        Pass {
            now,
            generation: self.generation,
            secs: now.saturating_duration_since(self.epoch).as_secs() as u32,
            boot_now: crate::bpf::system::clocks_now().0,
        }
    }

    /// Consumes one chunk of a pass.
    pub(crate) fn take(
        &mut self,
        pass: &Pass,
        snapshot: &[(FlowKey, FlowValue)],
        describe: &dyn Describe,
        sink: &mut dyn FnMut(LogEvent),
    ) {
        let mut events = Sink {
            emit: self.options.emit,
            sink,
        };
        self.note_owners(snapshot, describe, &mut events);
        for (key, value) in snapshot {
            if self.find(pass, key, value, describe, &mut events) {
                continue;
            }
            if self.flows.len() < self.options.capacity {
                self.start(pass, key, value, describe, &mut events);
            } else {
                self.arrivals.push((*key, *value));
            }
        }
    }

    /// Follows a flow the tracker holds; false when it holds none under
    /// `key` (or held one the kernel has since evicted and made again, which
    /// ends here).
    fn find(
        &mut self,
        pass: &Pass,
        key: &FlowKey,
        value: &FlowValue,
        describe: &dyn Describe,
        events: &mut Sink<'_>,
    ) -> bool {
        // One hash lookup per flow and pass; indices from here on.
        let Some(index) = self.flows.get_index_of(key) else {
            return false;
        };
        if same_flow(&self.flows[index].current, value) {
            self.follow(pass, index, key, value, describe, events);
            return true;
        }
        // Evicted and made again under the same key since the last pass
        // (or while no agent ran): the old one ended.
        let (_, mut old) = self.flows.swap_remove_index(index).expect("present");
        let senders = &mut self.senders;
        events.push_with(|| end_event(describe, senders, key, &mut old, EndReason::Evicted));
        self.flows_evicted += 1;
        false
    }

    /// A flow the tracker did not follow yet.
    fn start(
        &mut self,
        pass: &Pass,
        key: &FlowKey,
        value: &FlowValue,
        describe: &dyn Describe,
        events: &mut Sink<'_>,
    ) {
        self.dirty = true;
        let meta = self.unclaimed.take(key);
        let record = describe.record(key, value, meta.as_ref());
        let class = self.class_of(&record);
        self.add_bytes(class, value.tx_bytes);
        let announced = self.announced.remove(key);
        if announced.is_none() {
            events.push_with(|| LogEvent::FlowStart {
                time: jsonl::now(),
                flow: record.clone(),
                deltas: None,
            });
        }
        let mut tracked = Tracked {
            current: *value,
            logged: announced.as_ref().map_or(value.into(), |a| a.logged),
            meta,
            last_change: pass.secs,
            ended: false,
            class,
            seen: pass.generation,
            stamp: describe.stamp(key),
            fired: announced.map_or(0, |a| a.fired),
            cleartext: false,
            leaks_counted: 0,
            written: Counters::default(),
            description: None,
        };
        self.judge(&record, &mut tracked, events);
        self.count_blocked(&record, 0, value, events);
        tracked.describe(record, &mut self.senders);
        self.flows.insert(*key, tracked);
    }

    /// A tracked flow found again.
    fn follow(
        &mut self,
        pass: &Pass,
        mut index: usize,
        key: &FlowKey,
        value: &FlowValue,
        describe: &dyn Describe,
        events: &mut Sink<'_>,
    ) {
        let tracked = &mut self.flows[index];
        if tracked.meta.is_none() {
            // Its event was read after the snapshot that found it.
            tracked.meta = self.unclaimed.take(key);
            if tracked.meta.is_some() {
                tracked.description = None;
            }
        }
        let stamp = describe.stamp(key);
        let named = tracked
            .description
            .as_ref()
            .is_some_and(|d| !d.has_host() && describe.has_name(key));
        if stamp != tracked.stamp || named {
            // Its payload, name or owner changed: describe and judge again.
            self.dirty = true;
            let mut tracked = self.flows.swap_remove_index(index).expect("present").1;
            let record = describe.record(key, value, tracked.meta.as_ref());
            tracked.stamp = stamp;
            self.judge(&record, &mut tracked, events);
            tracked.describe(record, &mut self.senders);
            index = self.flows.insert_full(*key, tracked).0;
        }
        let tracked = &self.flows[index];
        let (before, class, ended, logged) = (
            tracked.current,
            tracked.class,
            tracked.ended,
            tracked.logged,
        );
        self.add_bytes(class, value.tx_bytes.saturating_sub(before.tx_bytes));
        if value.blocked != before.blocked {
            let tracked = &mut self.flows[index];
            let record = tracked.now(describe, &mut self.senders, key, value);
            self.count_blocked(&record, before.blocked, value, events);
        }
        let moved = changed(value, &(&before).into());
        if moved && ended {
            let tracked = &mut self.flows[index];
            let senders = &mut self.senders;
            events.push_with(|| LogEvent::FlowStart {
                time: jsonl::now(),
                flow: tracked.now(describe, senders, key, value),
                deltas: Some(deltas(value, &logged)),
            });
        }
        self.dirty |= moved;
        self.unlogged |= moved;
        let tracked = &mut self.flows[index];
        // The kernel stamps a flow when it creates it; after that, "last
        // seen" is when a pass found its counters moved.
        let last_seen = if moved {
            pass.boot_now
        } else {
            before.last_seen
        };
        tracked.current = FlowValue {
            last_seen,
            ..*value
        };
        tracked.seen = pass.generation;
        if moved {
            tracked.last_change = pass.secs;
            if ended {
                tracked.ended = false;
                tracked.logged = value.into();
            }
        }
    }

    /// Ends a pass: flows it did not find were evicted, quiet ones go idle,
    /// and flow_update lines are due every `update_every`.
    pub(crate) fn end_pass(
        &mut self,
        pass: Pass,
        describe: &dyn Describe,
        sink: &mut dyn FnMut(LogEvent),
    ) {
        let mut events = Sink {
            emit: self.options.emit,
            sink,
        };
        let (now, generation, secs) = (pass.now, pass.generation, pass.secs);
        self.last_secs = secs;
        let update_due = self
            .last_update
            .is_none_or(|t| now.duration_since(t) >= self.options.update_every);
        // Evicted by the kernel (LRU) or gone with the maps.
        let before = self.flows.len();
        let senders = &mut self.senders;
        let unwritten = &mut self.unwritten;
        self.flows.retain(|key, tracked| {
            if tracked.seen != generation {
                events.push_with(|| end_event(describe, senders, key, tracked, EndReason::Evicted));
                if let Some(unwritten) = unwritten.as_mut() {
                    unwritten.extend(tracked.take_unwritten(key));
                }
            }
            tracked.seen == generation
        });
        self.flows_evicted += (before - self.flows.len()) as u64;
        // A walk over a changing map can return a key twice: the second
        // finds the flow its first started.
        for (key, value) in std::mem::take(&mut self.arrivals) {
            if !self.find(&pass, &key, &value, describe, &mut events) {
                self.start(&pass, &key, &value, describe, &mut events);
            }
        }
        self.end_unmet_announced(describe, &mut events);
        self.unclaimed.drop_stale();
        self.senders.drop_unused();
        self.dirty |= self.flows.len() != before;
        // Idle flows end; the kernel entry stays and new traffic restarts it.
        let idle_secs = self.idle_secs();
        self.next_idle = u32::MAX;
        for (key, tracked) in self.flows.iter_mut().filter(|(_, t)| !t.ended) {
            let idle_at = tracked.last_change.saturating_add(idle_secs);
            if secs < idle_at {
                self.next_idle = self.next_idle.min(idle_at);
                continue;
            }
            let senders = &mut self.senders;
            events.push_with(|| end_event(describe, senders, key, tracked, EndReason::Idle));
            tracked.logged = (&tracked.current).into();
            tracked.ended = true;
            self.dirty = true;
        }
        // Flows restored from a state file are described once, here.
        for (key, tracked) in self.flows.iter_mut() {
            if tracked.description.is_none() {
                let current = tracked.current;
                tracked.now(describe, &mut self.senders, key, &current);
            }
        }
        if update_due {
            self.last_update = Some(now);
            self.unlogged = false;
            for (key, tracked) in self.flows.iter_mut().filter(|(_, t)| !t.ended) {
                if changed(&tracked.current, &tracked.logged) {
                    self.dirty = true;
                    let current = tracked.current;
                    let senders = &mut self.senders;
                    events.push_with(|| LogEvent::FlowUpdate {
                        time: jsonl::now(),
                        flow: tracked.now(describe, senders, key, &current),
                        deltas: deltas(&current, &tracked.logged),
                    });
                    tracked.logged = (&tracked.current).into();
                }
            }
        }
    }

    /// Whether a pass has work to do even where the kernel's map did not
    /// change: a previous agent's flows wait for theirs, flows go idle, or
    /// flow_update lines are due. (Identities that no pass found a flow of
    /// find none in a map that did not change.)
    pub(crate) fn wants_pass(&self, now: Instant) -> bool {
        let secs = now.saturating_duration_since(self.epoch).as_secs() as u32;
        let update_due = self.options.emit
            && self.unlogged
            && self
                .last_update
                .is_none_or(|t| now.duration_since(t) >= self.options.update_every);
        !self.announced.is_empty() || secs >= self.next_idle || update_due
    }

    fn idle_secs(&self) -> u32 {
        self.options.idle_after.as_secs_f64().ceil() as u32
    }

    /// Flows a previous agent logged a start of that no pass has found: the
    /// kernel dropped them before this agent looked.
    fn end_unmet_announced(&mut self, describe: &dyn Describe, events: &mut Sink<'_>) {
        for (key, announced) in std::mem::take(&mut self.announced) {
            let value = announced.logged.value();
            events.push_with(|| LogEvent::FlowEnd {
                time: jsonl::now(),
                flow: describe.record(&key, &value, None),
                deltas: deltas(&value, &announced.logged),
                reason: EndReason::Evicted,
            });
            self.flows_evicted += 1;
            self.dirty = true;
        }
    }

    /// Counts a cleartext flow and each identifier it carried once, and
    /// raises each matching rule's alert once per flow.
    fn judge(&mut self, r: &FlowRecord, tracked: &mut Tracked, events: &mut Sink<'_>) {
        for leak in r.leaks.iter().skip(tracked.leaks_counted as usize) {
            let (identifier, form) = crate::enrich::evidence::split_leak(leak);
            let key = (
                identifier.to_string(),
                form.to_string(),
                r.origin.to_string(),
                r.firmware,
            );
            *self.identifier_leaks.entry(key).or_default() += 1;
            tracked.leaks_counted += 1;
            self.dirty = true;
        }
        if !tracked.cleartext && matches!(r.payload, Payload::Cleartext | Payload::Http) {
            tracked.cleartext = true;
            self.dirty = true;
            *self
                .cleartext_flows
                .entry((r.uid, r.owner.clone(), r.origin.to_string(), r.firmware))
                .or_default() += 1;
        }
        for rule in &self.blocks.learning {
            if rule.matches(r, false) {
                if let Ok(ip) = r.dst.parse::<std::net::IpAddr>() {
                    self.block_matches.push((rule.name.clone(), r.uid, ip));
                }
            }
        }
        for rule in self.options.rules.evaluate(r) {
            let bit = self.rule_bit(&rule);
            if tracked.fired & bit != 0 {
                continue;
            }
            tracked.fired |= bit;
            self.dirty = true;
            *self.alerts.entry(rule.clone()).or_default() += 1;
            log::warn!(
                "alert {rule}: uid {} ({}, {}) -> {}:{} host {} country {} payload {}",
                r.uid,
                crate::cli::text::escape(&r.owner),
                r.origin,
                r.dst,
                r.port,
                crate::cli::text::escape(r.host.as_deref().unwrap_or("?")),
                r.country.as_deref().unwrap_or("?"),
                r.payload
            );
            events.push_with(|| LogEvent::Alert {
                time: jsonl::now(),
                flow: r.clone(),
                rule: rule.clone(),
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
                events.push_with(|| LogEvent::OwnerChange {
                    time: jsonl::now(),
                    owner: owner.clone(),
                    previous_owner: before.owner.clone(),
                    previous_packages: before.packages.clone(),
                    previous_origin: before.origin,
                    previous_firmware: before.firmware,
                });
            }
            if self.owners.get(&uid) != Some(&owner) {
                self.dirty = true;
                if self.owners.contains_key(&uid) {
                    // Describe and judge its flows again as they are found.
                    for (_, tracked) in self.flows.iter_mut().filter(|(k, _)| k.uid == uid) {
                        tracked.stamp = u64::MAX;
                    }
                }
                self.owners.insert(uid, owner);
            }
        }
    }

    pub(crate) fn rule_names(&self) -> Vec<String> {
        self.rule_names.clone()
    }

    /// A rule's bit in `Tracked::fired` (rules beyond 63 share the last).
    fn rule_bit(&self, rule: &str) -> u64 {
        let index = self.rule_names.iter().position(|n| n == rule);
        1 << index.unwrap_or(63).min(63)
    }

    pub(crate) fn tracked(&self) -> usize {
        self.flows.len()
    }

    /// Whether something a state file keeps changed since the last call.
    pub(crate) fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Flows whose first payload the kernel has taken (as of the last pass).
    pub(crate) fn captured_flows(&self) -> impl Iterator<Item = FlowKey> + '_ {
        self.flows
            .iter()
            .filter(|(_, t)| t.current.captured != 0)
            .map(|(key, _)| *key)
    }

    /// Whether a tracked flow's counters stood still over the latest pass.
    pub(crate) fn quiet(&self, key: &FlowKey) -> Option<bool> {
        self.flows.get(key).map(|t| t.last_change < self.last_secs)
    }

    /// Everything a state file keeps but the flows.
    pub(crate) fn saved_totals(&self) -> SavedTotals {
        let mut owners: Vec<Owner> = self.owners.values().cloned().collect();
        owners.sort_by_key(|o| o.uid);
        let since_update = self
            .last_update
            .map(|t| t.elapsed().as_secs().min(u32::MAX.into()) as u32);
        SavedTotals {
            rule_names: self.rule_names.clone(),
            classes: self
                .classes
                .iter()
                .cloned()
                .zip(self.class_bytes.iter().copied())
                .collect(),
            cleartext_flows: self.cleartext_flows.clone(),
            identifier_leaks: self.identifier_leaks.clone(),
            alerts: self.alerts.clone(),
            flows_evicted: self.flows_evicted,
            owners,
            countries_reached: self
                .options
                .rules
                .countries_reached()
                .map(|(owner, countries)| (owner.to_string(), countries.iter().cloned().collect()))
                .collect(),
            since_update,
        }
    }

    /// Every tracked flow as a state file keeps it.
    pub(crate) fn saved_flows(&self) -> impl ExactSizeIterator<Item = SavedFlow> + '_ {
        self.flows.iter().map(|(key, t)| SavedFlow {
            key: *key,
            current: t.current,
            logged: t.logged,
            idle_secs: self.last_secs.saturating_sub(t.last_change),
            ended: t.ended,
            cleartext: t.cleartext,
            leaks_counted: t.leaks_counted,
            class: t.class,
            fired: t.fired,
            stamp: t.stamp,
            meta: t.meta.clone(),
        })
    }

    /// Takes back a previous agent's totals, `downtime` after it saved them;
    /// its flows follow through [`Tracker::restore_flow`].
    pub(crate) fn restore_totals(&mut self, saved: SavedTotals, downtime: Duration) -> Restoring {
        for (key, bytes) in saved.classes {
            let class = self.class_index_of(key);
            self.class_bytes[class as usize] += bytes;
        }
        self.cleartext_flows = saved.cleartext_flows;
        self.identifier_leaks = saved.identifier_leaks;
        self.alerts = saved.alerts;
        self.flows_evicted = saved.flows_evicted;
        self.owners = saved.owners.into_iter().map(|o| (o.uid, o)).collect();
        for (owner, countries) in &saved.countries_reached {
            for country in countries {
                self.options.rules.learn_country(owner, country);
            }
        }
        let downtime_secs = downtime.as_secs().min(u32::MAX.into()) as u32;
        self.last_update = saved.since_update.and_then(|since| {
            let ago = Duration::from_secs(u64::from(since) + u64::from(downtime_secs));
            Instant::now().checked_sub(ago)
        });
        // Idle times carry over: the clock starts far enough back that a
        // flow quiet for longer than --flow-idle ends on the first pass.
        let base = self.idle_secs().saturating_add(1);
        let base_secs = match Instant::now().checked_sub(Duration::from_secs(base.into())) {
            Some(epoch) => {
                self.epoch = epoch;
                base
            }
            None => 0,
        };
        self.dirty = true;
        Restoring {
            rule_bits: saved
                .rule_names
                .iter()
                .map(|name| self.rule_names.iter().position(|n| n == name))
                .collect(),
            downtime_secs,
            base_secs,
        }
    }

    /// Takes back one flow of a previous agent (after `restore_totals`).
    pub(crate) fn restore_flow(&mut self, saved: SavedFlow, restoring: &Restoring) {
        let idle = saved.idle_secs.saturating_add(restoring.downtime_secs);
        let mut fired = 0;
        for (bit, index) in restoring.rule_bits.iter().enumerate().take(64) {
            match *index {
                Some(index) if saved.fired & (1 << bit) != 0 => fired |= 1 << index.min(63),
                _ => {}
            }
        }
        let class = if (saved.class as usize) < self.classes.len() {
            saved.class
        } else {
            self.class_index_of(("unknown".into(), false, "unknown".into()))
        };
        let tracked = Tracked {
            current: saved.current,
            logged: saved.logged,
            meta: saved.meta,
            last_change: restoring.base_secs.saturating_sub(idle),
            ended: saved.ended,
            class,
            // Not seen by any pass of this agent yet (passes count from 1).
            seen: 0,
            stamp: saved.stamp,
            fired,
            cleartext: saved.cleartext,
            leaks_counted: saved.leaks_counted,
            written: Counters::default(),
            description: None,
        };
        self.flows.insert(saved.key, tracked);
    }

    /// Applies a line a previous agent logged after its last save, so that
    /// this agent neither writes it again nor counts its alert twice.
    pub(crate) fn replay(&mut self, line: Logged) {
        self.dirty = true;
        match line {
            Logged::Start(key, counters) => match self.flows.get_mut(&key) {
                Some(t) => {
                    t.ended = false;
                    t.logged = counters;
                }
                None => self.announced.entry(key).or_default().logged = counters,
            },
            Logged::Update(key, counters) => {
                if let Some(t) = self.flows.get_mut(&key) {
                    t.logged = counters;
                } else if let Some(a) = self.announced.get_mut(&key) {
                    a.logged = counters;
                }
            }
            Logged::End {
                key,
                counters,
                evicted: false,
            } => {
                if let Some(t) = self.flows.get_mut(&key) {
                    t.ended = true;
                    t.logged = counters;
                }
            }
            Logged::End { key, .. } => {
                let gone = self.flows.swap_remove(&key).is_some();
                if self.announced.remove(&key).is_some() || gone {
                    self.flows_evicted += 1;
                }
            }
            Logged::Alert(key, rule) => {
                let bit = self.rule_bit(&rule);
                match self.flows.get_mut(&key) {
                    Some(t) => t.fired |= bit,
                    None => self.announced.entry(key).or_default().fired |= bit,
                }
                *self.alerts.entry(rule).or_default() += 1;
            }
            Logged::OwnerChange(owner) => {
                self.owners.insert(owner.uid, owner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::flows::record;
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
            origin: crate::pipeline::vocab::Origin::parse(origin).unwrap(),
            firmware: origin != "app",
        }
    }

    /// Flow updates every 10 s, idle after 30 s, log lines made if `emit`.
    fn options(emit: bool) -> TrackerOptions {
        TrackerOptions {
            capacity: 16,
            update_every: Duration::from_secs(10),
            idle_after: Duration::from_secs(30),
            emit,
            rules: Rules::none(),
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
        let mut t = Tracker::new(options(true));
        let d = Fixed(RefCell::new(owner("com.example.app", "app")));
        let first = snap(100);
        let mut second = snap(200);
        second[0].0.port = 443;
        let mut events = Vec::new();
        let t0 = Instant::now();
        for at in [t0, t0 + Duration::from_secs(1)] {
            let pass = t.begin_pass(at);
            t.take(&pass, &first, &d, &mut |v| {
                events.push(serde_json::to_value(v).unwrap())
            });
            t.take(&pass, &second, &d, &mut |v| {
                events.push(serde_json::to_value(v).unwrap())
            });
            t.end_pass(pass, &d, &mut |v| {
                events.push(serde_json::to_value(v).unwrap())
            });
        }
        let names: Vec<&str> = events
            .iter()
            .map(|e| e["event"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["flow_start", "flow_start"]);
        assert_eq!((t.tracked(), t.flows_evicted), (2, 0));
        assert_eq!(t.bytes_by_country().values().sum::<u64>(), 300);
    }

    /// A pass over a churning map: the kernel evicted the one flow of the
    /// last pass, and the walk returns a new one twice, grown in between.
    /// Returns the events (name, port) and the flows tracked after each
    /// chunk.
    fn churning_pass(t: &mut Tracker) -> (Vec<(String, u64)>, Vec<usize>) {
        let d = Fixed(RefCell::new(owner("com.example.app", "app")));
        let mut events = Vec::new();
        let t0 = Instant::now();
        t.tick(t0, &snap(100), &d, &mut |_| {});
        let mut new = snap(300);
        new[0].0.port = 443;
        let mut again = snap(400);
        again[0].0.port = 443;
        let pass = t.begin_pass(t0 + Duration::from_secs(1));
        let mut tracked = Vec::new();
        for chunk in [&new, &again] {
            t.take(&pass, chunk, &d, &mut |v| {
                events.push(serde_json::to_value(v).unwrap())
            });
            tracked.push(t.tracked());
        }
        t.end_pass(pass, &d, &mut |v| {
            events.push(serde_json::to_value(v).unwrap())
        });
        let seen = events
            .iter()
            .map(|e| {
                (
                    e["event"].as_str().unwrap().to_string(),
                    e["port"].as_u64().unwrap(),
                )
            })
            .collect();
        (seen, tracked)
    }

    #[test]
    fn a_full_tracker_starts_a_key_walked_twice_once_after_the_evicted_end() {
        let mut t = Tracker::new(TrackerOptions {
            capacity: 1,
            ..options(true)
        });
        let (seen, tracked) = churning_pass(&mut t);
        // Never more flows than the map holds: nothing starts before the
        // pass has dropped what it lost.
        assert_eq!(tracked, [1, 1]);
        assert_eq!(seen, [("flow_end".into(), 80), ("flow_start".into(), 443)]);
        assert_eq!((t.tracked(), t.flows_evicted), (1, 1));
        // Bytes: 100 of the old flow, 400 of the new, none twice.
        assert_eq!(t.bytes_by_country().values().sum::<u64>(), 500);
    }

    #[test]
    fn a_tracker_with_room_starts_a_new_flow_where_the_walk_finds_it() {
        let mut t = Tracker::new(options(true));
        let (seen, tracked) = churning_pass(&mut t);
        // Started at the first chunk, found again at the second.
        assert_eq!(tracked, [2, 2]);
        assert_eq!(seen, [("flow_start".into(), 443), ("flow_end".into(), 80)]);
        assert_eq!((t.tracked(), t.flows_evicted), (1, 1));
        assert_eq!(t.bytes_by_country().values().sum::<u64>(), 500);
    }

    #[test]
    fn a_still_tracker_wants_a_pass_when_a_flow_goes_idle_or_a_log_line_is_due() {
        let d = Fixed(RefCell::new(owner("com.example.app", "app")));
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        for emit in [false, true] {
            let mut t = Tracker::new(options(emit));
            t.tick(t0, &snap(100), &d, &mut |_| {});
            assert!(!t.wants_pass(at(5)));
            // It moved: with a log, its flow_update is due 10 s on.
            t.tick(at(1), &snap(200), &d, &mut |_| {});
            assert!(!t.wants_pass(at(5)));
            assert_eq!(t.wants_pass(at(11)), emit, "emit {emit}");
            // Idle 30 s after it last moved, log or not.
            t.tick(at(11), &snap(200), &d, &mut |_| {});
            assert!(!t.wants_pass(at(20)));
            assert!(t.wants_pass(at(31)));
            t.tick(at(31), &snap(200), &d, &mut |_| {});
            assert!(!t.wants_pass(at(300)), "an ended flow waits for nothing");
        }
    }

    #[test]
    fn a_sender_handed_over_before_or_after_its_flow_is_found_is_shown() {
        let mut t = Tracker::new(options(false));
        let d = Fixed(RefCell::new(owner("com.example.app", "app")));
        let sender = |tgid: u32| FlowMeta {
            sender: std::sync::Arc::new(crate::identity::events::Sender {
                tgid,
                comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
                ..Default::default()
            }),
            batch: 1,
            from_task: true,
        };
        let early = snap(100);
        let mut late = snap(100);
        late[0].0.port = 443;
        // The first flow's event arrives before a pass finds it.
        t.receive([(early[0].0, sender(7))]);
        let both = [early[0], late[0]];
        t.tick(Instant::now(), &both, &d, &mut |_| {});
        // The second's arrives after.
        t.receive([(late[0].0, sender(8))]);
        t.tick(Instant::now(), &both, &d, &mut |_| {});
        let mut pids: Vec<(u16, Option<u32>)> =
            t.records().iter().map(|r| (r.port, r.pid)).collect();
        pids.sort_unstable();
        assert_eq!(pids, [(80, Some(7)), (443, Some(8))]);
        assert_eq!(t.identities(), 2);
    }

    #[test]
    fn start_update_idle_end_restart_evict_and_owner_change() {
        let mut t = Tracker::new(options(true));
        let tick = |t: &mut Tracker, at: Instant, snap: &[(FlowKey, FlowValue)], d: &Fixed| {
            let mut out = Vec::new();
            t.tick(at, snap, d, &mut |v| {
                out.push(serde_json::to_value(v).unwrap())
            });
            out
        };
        let d = Fixed(RefCell::new(owner("com.example.app", "app")));
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let names = |evs: &[serde_json::Value]| {
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
