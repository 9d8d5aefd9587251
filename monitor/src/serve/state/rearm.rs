//! Flows whose first payload the kernel handed over while another agent
//! ran (or none ran), and that this agent has no verdict for: their
//! "captured" marks are set, so the kernel would never copy a payload of
//! theirs again and they would stay unclassified. The agent clears the
//! mark (`captured` in the flow's `FLOWS` value) so the next packet with
//! payload is copied.
//!
//! Clearing `captured` rewrites the flow's value: a packet the
//! kernel counts in the microseconds between that read and that write
//! would be lost from the flow's counters (never from the per-uid totals).
//! So a flow is re-armed only after a pass found it quiet, once per agent
//! start, and only if it is still without a verdict two passes after the
//! agent started (the payload ring's backlog is read by then).

use crate::enrich::destinations::Destinations;
use crate::pipeline::tracker::Tracker;
use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use monitor_common::{FlowKey, FlowValue, MAP_FLOWS};
use std::collections::HashSet;

/// Passes after which flows still without a verdict are re-armed.
const PASSES_BEFORE_REARM: u32 = 3;

/// BPF_MAP_UPDATE_ELEM flag: only an entry that exists (one evicted
/// meanwhile is not made again).
const BPF_EXIST: u64 = 2;

pub(crate) struct PayloadRearm {
    flows: HashMap<MapData, FlowKey, FlowValue>,
    passes: u32,
    /// Flows present at start with a payload taken and no verdict.
    waiting: HashSet<FlowKey>,
    /// Flows re-armed so far.
    pub(crate) rearmed: u64,
}

fn owned(kernel: &crate::bpf::kernel::Kernel, name: &str) -> Result<MapData> {
    let fd = kernel
        .loaded_map_fd(name)
        .with_context(|| format!("{name} map missing"))?
        .try_clone_to_owned()?;
    Ok(MapData::from_fd(fd)?)
}

impl PayloadRearm {
    pub(crate) fn new(kernel: &crate::bpf::kernel::Kernel) -> Result<PayloadRearm> {
        Ok(PayloadRearm {
            flows: HashMap::try_from(Map::LruHashMap(owned(kernel, MAP_FLOWS)?))?,
            passes: 0,
            waiting: HashSet::new(),
            rearmed: 0,
        })
    }

    /// Called after each pass, with what the pass left.
    /// Flows wait to be re-armed: passes must go on to count and find them.
    pub(crate) fn waiting(&self) -> bool {
        self.passes == 0 || !self.waiting.is_empty()
    }

    pub(crate) fn after_pass(&mut self, tracker: &Tracker, destinations: &Destinations) {
        self.passes = self.passes.saturating_add(1);
        if self.passes == 1 {
            self.waiting = tracker
                .captured_flows()
                .filter(|key| !destinations.has_info(key))
                .collect();
            return;
        }
        if self.passes < PASSES_BEFORE_REARM || self.waiting.is_empty() {
            return;
        }
        let due: Vec<FlowKey> = self
            .waiting
            .iter()
            .filter(|key| destinations.has_info(key) || tracker.quiet(key) != Some(false))
            .copied()
            .collect();
        for key in due {
            self.waiting.remove(&key);
            if destinations.has_info(&key) || tracker.quiet(&key).is_none() {
                continue;
            }
            match self.rearm(&key) {
                Ok(true) => self.rearmed += 1,
                Ok(false) => {}
                Err(e) => log::debug!("re-arming payload capture of a flow: {e:#}"),
            }
        }
    }

    /// Clears the flow's capture mark; false if it had none (or is gone).
    fn rearm(&mut self, key: &FlowKey) -> Result<bool> {
        let Ok(value) = self.flows.get(key, 0) else {
            return Ok(false);
        };
        if value.captured == 0 {
            return Ok(false);
        }
        let cleared = FlowValue {
            captured: 0,
            ..value
        };
        self.flows.insert(key, cleared, BPF_EXIST)?;
        Ok(true)
    }
}
