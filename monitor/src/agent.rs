//! The running agent: owns the loaded kernel programs, the identity table fed
//! by the event reader and the owner resolver, and produces the snapshots the
//! API serves (flows, status, metrics).

use crate::events::{self, MetaTable};
use crate::flows::{self, FlowRecord};
use crate::hooks::{Conflict, Hook};
use crate::kernel::{Kernel, LoadOptions};
use crate::owners::OwnerResolver;
use anyhow::Result;
use monitor_common::*;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub struct Agent {
    kernel: Mutex<Kernel>,
    meta: MetaTable,
    resolver: OwnerResolver,
    started: Instant,
    stop: Arc<AtomicBool>,
    reader: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HookStatus {
    pub hook: String,
    pub attached: bool,
    pub reason: Option<String>,
    pub held_by: Option<Conflict>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapStatus {
    pub map: String,
    pub entries: u64,
    pub capacity: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub kernel: String,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub hooks: Vec<HookStatus>,
    pub maps: Vec<MapStatus>,
    pub events_lost: u64,
    pub flow_update_failures: u64,
    pub uid_update_failures: u64,
    pub unparsed_packets: u64,
    pub kernel_packets: u64,
}

impl Agent {
    pub fn start(options: LoadOptions, resolver: OwnerResolver) -> Result<Arc<Agent>> {
        let mut kernel = Kernel::load(options)?;
        let ring = kernel.take_events()?;
        let meta: MetaTable = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let reader = events::spawn_reader(ring, meta.clone(), stop.clone());
        Ok(Arc::new(Agent {
            kernel: Mutex::new(kernel),
            meta,
            resolver,
            started: Instant::now(),
            stop,
            reader: Mutex::new(Some(reader)),
        }))
    }

    pub fn attached(&self) -> Vec<Hook> {
        self.kernel.lock().unwrap().attached()
    }

    pub fn hook_report(&self) -> Vec<HookStatus> {
        let kernel = self.kernel.lock().unwrap();
        kernel
            .plans
            .iter()
            .map(|p| HookStatus {
                hook: p.hook.name().into(),
                attached: p.attach,
                reason: p.reason.clone(),
                held_by: p.conflict.clone(),
            })
            .collect()
    }

    /// The flow table, busiest first.
    pub fn flows(&self) -> Result<Vec<FlowRecord>> {
        let (flows, capacity) = {
            let kernel = self.kernel.lock().unwrap();
            (kernel.flows()?, kernel.options.flow_entries as usize)
        };
        let mut meta = self.meta.lock().unwrap();
        if meta.len() > capacity * 2 {
            let live: std::collections::HashSet<FlowKey> = flows.iter().map(|(k, _)| *k).collect();
            meta.retain(|k, _| live.contains(k));
        }
        Ok(flows::table(&flows, &meta, &self.resolver))
    }

    pub fn uid_totals(&self) -> Result<std::collections::HashMap<u32, UidTotals>> {
        self.kernel.lock().unwrap().uid_totals()
    }

    pub fn resolver(&self) -> &OwnerResolver {
        &self.resolver
    }

    pub fn status(&self) -> Result<Status> {
        let hooks = self.hook_report();
        let kernel = self.kernel.lock().unwrap();
        let stats = kernel.stats()?;
        let flow_entries = kernel.flow_count() as u64;
        let uid_entries = kernel.uid_totals().map(|t| t.len() as u64).unwrap_or(0);
        let o = &kernel.options;
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").into(),
            kernel: crate::system::kernel_release(),
            cgroup: o.cgroup.clone(),
            pin_dir: o.pin_dir.clone(),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            hooks,
            maps: vec![
                MapStatus {
                    map: MAP_FLOWS.to_lowercase(),
                    entries: flow_entries,
                    capacity: o.flow_entries as u64,
                },
                MapStatus {
                    map: MAP_UID_TOTALS.to_lowercase(),
                    entries: uid_entries,
                    capacity: o.uid_entries as u64,
                },
            ],
            events_lost: stats[STAT_EVENTS_LOST as usize],
            flow_update_failures: stats[STAT_FLOW_UPDATE_FAILED as usize],
            uid_update_failures: stats[STAT_UID_UPDATE_FAILED as usize],
            unparsed_packets: stats[STAT_PARSE_SKIPPED as usize],
            kernel_packets: stats[STAT_KERNEL_PACKETS as usize],
        })
    }

    /// Stops the event reader. Programs stay attached through their pinned
    /// links: the kernel keeps counting until `egressmon detach`.
    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(handle) = self.reader.lock().unwrap().take() {
            let _ = handle.join();
        }
    }
}
