//! Loads the embedded eBPF object, attaches its programs as pinned cgroup
//! links (so counting continues while no agent runs), adopts what an earlier
//! agent left pinned, reads the maps, and removes everything on `detach`.
//!
//! Pin directory layout: one file per pinned map (`PINNED_MAPS`: `FLOWS`,
//! `UID_TOTALS`, `UID_DIRECT`, `EVENTS`, `PAYLOADS`, `STATS`, the list of
//! netlink tc filters `TC_FILTERS` and the pin layout version
//! `LAYOUT_VERSION`), one per attached cgroup hook (`link_<hook>`), and one
//! per tc hook and interface on TCX kernels (`link_<hook>_<interface>`).
//! Nothing else may be in the directory: `run` refuses it, `detach` leaves
//! it.

use crate::bpf::hooks::{self, Hook, HookPlan};
use crate::bpf::system;
use crate::bpf_sys::{self, MapInfo, ObjKind, RawMap};
use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::{CgroupSkb, CgroupSockAddr, ProgramError};
use aya::{Ebpf, EbpfLoader};
use monitor_common::*;
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Load-time options.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub hooks: Option<Vec<Hook>>,
    pub flow_entries: u32,
    pub uid_entries: u32,
    pub ringbuf_bytes: u32,
    /// Interfaces for the tc hooks (default: all but loopback).
    pub tc_ifaces: Option<Vec<String>>,
}

/// Fault injection for the reliability tests: hooks named in
/// `EGRESSMON_SIMULATE_MISSING_HOOKS` (comma separated) fail to attach as
/// they would on a kernel without them (EINVAL from BPF_LINK_CREATE).
/// Only a build with the `fault-injection` feature (the tests') has it.
#[cfg(feature = "fault-injection")]
fn simulated_missing_hook(hook: Hook) -> std::io::Result<()> {
    let listed = std::env::var("EGRESSMON_SIMULATE_MISSING_HOOKS").unwrap_or_default();
    if listed.split(',').any(|h| h.trim() == hook.name()) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

/// A shipped build injects nothing.
#[cfg(not(feature = "fault-injection"))]
fn simulated_missing_hook(_hook: Hook) -> std::io::Result<()> {
    Ok(())
}

/// Summed (over CPUs) counters of one flow.
pub type FlowTotals = FlowValue;

pub struct Kernel {
    ebpf: Ebpf,
    pub plans: Vec<HookPlan>,
    pub options: LoadOptions,
    /// Where the tc hooks are attached, by interface index.
    tc: crate::bpf::tc::Attachments,
    /// The programs skip packets with this mark: the agent's own.
    own_mark: u32,
}

fn link_pin(pin_dir: &Path, hook: Hook) -> PathBuf {
    pin_dir.join(format!("link_{}", hook.name()))
}

/// Every link pinned under `pin_dir` (cgroup and tc).
fn link_pins(pin_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    let mut pins: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("link_"))
        .map(|e| e.path())
        .collect();
    pins.sort();
    pins
}

/// Whether `pin_dir` holds egressmon pins (maps or links).
pub fn has_pins(pin_dir: &Path) -> bool {
    pin_dir.join(MAP_FLOWS).exists() || !link_pins(pin_dir).is_empty()
}

pub(crate) fn verifier_error(hook: Hook, err: ProgramError) -> anyhow::Error {
    match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            anyhow!("the kernel rejected the {hook} program ({io_error}); verifier log:\n{verifier_log}")
        }
        other => anyhow!("loading the {hook} program: {other}"),
    }
}

impl Kernel {
    pub fn load(options: LoadOptions) -> Result<Kernel> {
        system::require_kernel()?;
        if !options.ringbuf_bytes.is_power_of_two() || options.ringbuf_bytes < 4096 {
            bail!(
                "--ringbuf-bytes must be a power of two of at least 4096, got {}",
                options.ringbuf_bytes
            );
        }
        system::ensure_pin_dir(&options.pin_dir)?;
        check_pins(&options)?;
        // No relocation against the kernel's BTF: the programs need none,
        // and kernels without BTF (some Android ones) load them the same.
        let (ephemeral_first, ephemeral_last) = system::ephemeral_ports();
        let own_mark = system::random_mark();
        let ebpf = EbpfLoader::new()
            .btf(None)
            .override_global("EPHEMERAL_FIRST", &ephemeral_first, true)
            .override_global("EPHEMERAL_LAST", &ephemeral_last, true)
            .override_global("OWN_MARK", &own_mark, true)
            .override_global("EVENTS_WAKE_BYTES", &events_wake_bytes(&options), true)
            .default_map_pin_directory(&options.pin_dir)
            .map_max_entries(MAP_FLOWS, options.flow_entries)
            .map_max_entries(MAP_UID_TOTALS, options.uid_entries)
            .map_max_entries(MAP_EVENTS, options.ringbuf_bytes)
            .load(crate::EBPF_OBJECT)
            .with_context(|| {
                format!(
                    "loading egressmon's maps (pinned under {}): if an older egressmon left them \
                     there with other sizes, run `egressmon detach --pin-dir {}` first",
                    options.pin_dir.display(),
                    options.pin_dir.display()
                )
            })?;
        // What aya opened, by descriptor: the pins could have changed since
        // check_pins looked at them.
        check_loaded_maps(&ebpf, &options)?;
        record_layout_version(&options.pin_dir)?;
        let plans = hooks::plan(options.hooks.as_deref(), &options.cgroup)?;
        let mut kernel = Kernel {
            ebpf,
            plans,
            tc: crate::bpf::tc::Attachments::new(&options.pin_dir),
            options,
            own_mark,
        };
        kernel.drop_unplanned_links();
        kernel.write_config()?;
        kernel.attach_planned();
        // Again, in case a planned skb or tc egress hook failed to attach.
        kernel.write_config()?;
        if !kernel.plans.iter().any(|p| p.attach) {
            let reasons: Vec<String> = kernel
                .plans
                .iter()
                .map(|p| format!("{}: {}", p.hook, p.reason.clone().unwrap_or_default()))
                .collect();
            bail!(
                "no hook could be attached at {}:\n  {}",
                kernel.options.cgroup.display(),
                reasons.join("\n  ")
            );
        }
        Ok(kernel)
    }

    fn write_config(&mut self) -> Result<()> {
        // tc egress counts every datagram that leaves too.
        let skb = self
            .plans
            .iter()
            .any(|p| matches!(p.hook, Hook::SkbEgress | Hook::TcEgress) && p.attach);
        let mut config: Array<&mut MapData, u32> = Array::try_from(
            self.ebpf
                .map_mut(MAP_CONFIG)
                .context("CONFIG map missing")?,
        )?;
        let connects = self
            .plans
            .iter()
            .any(|p| matches!(p.hook, Hook::Connect4 | Hook::Connect6) && p.attach);
        let mut flags = 0;
        if skb {
            flags |= CONFIG_SKB_ATTACHED;
        }
        if connects {
            flags |= CONFIG_CONNECTS_COUNTED;
        }
        config.set(0, flags, 0)?;
        Ok(())
    }

    /// Links pinned by an earlier run for hooks not planned now are removed.
    fn drop_unplanned_links(&self) {
        for plan in self.plans.iter().filter(|p| !p.attach) {
            let prefix = format!("link_{}", plan.hook.name());
            for pin in link_pins(&self.options.pin_dir) {
                let name = pin.file_name().unwrap_or_default().to_string_lossy();
                let ours = name == prefix.as_str()
                    || (plan.hook.is_tc() && name.starts_with(&format!("{prefix}_")));
                if !ours {
                    continue;
                }
                if let Ok(fd) = bpf_sys::obj_get(&pin) {
                    let _ = bpf_sys::link_detach(fd.as_fd());
                }
                let _ = std::fs::remove_file(&pin);
            }
        }
        // Netlink tc filters of an earlier run are taken over in place as
        // the tc hooks attach, and the rest removed after (`tc::sweep`): none
        // is removed before, which would leave packets uncounted.
    }

    fn attach_planned(&mut self) {
        let cgroup_id = system::cgroup_id(&self.options.cgroup).unwrap_or(0);
        for i in 0..self.plans.len() {
            if !self.plans[i].attach {
                continue;
            }
            let hook = self.plans[i].hook;
            if hook.is_tc() {
                self.attach_tc(i);
                continue;
            }
            if let Err(err) = self.attach_one(hook, cgroup_id) {
                log::warn!("hook {hook} not attached: {err:#}");
                self.plans[i].attach = false;
                self.plans[i].reason = Some(format!("failed: {err:#}"));
            }
        }
        self.tc.sweep(&mut self.ebpf, &self.options.pin_dir);
    }

    /// Loads `hook`'s program and attaches it: through the pinned link of an
    /// earlier run if it still points at this cgroup (an atomic program swap,
    /// so no packet goes uncounted), or through a new pinned link.
    fn attach_one(&mut self, hook: Hook, cgroup_id: u64) -> Result<()> {
        let program = self
            .ebpf
            .program_mut(hook.program())
            .with_context(|| format!("program {} missing from the object", hook.program()))?;
        let prog_fd = match hook {
            Hook::SkbEgress | Hook::SkbIngress => {
                let p: &mut CgroupSkb = program.try_into()?;
                p.load().map_err(|e| verifier_error(hook, e))?;
                p.fd()?.try_clone()?
            }
            _ => {
                let p: &mut CgroupSockAddr = program.try_into()?;
                p.load().map_err(|e| verifier_error(hook, e))?;
                p.fd()?.try_clone()?
            }
        };
        let pin = link_pin(&self.options.pin_dir, hook);
        if pin.exists() {
            let link =
                bpf_sys::obj_get(&pin).with_context(|| format!("opening {}", pin.display()))?;
            let info = bpf_sys::link_info(link.as_fd())?;
            if info.cgroup_id == cgroup_id {
                bpf_sys::link_update(link.as_fd(), prog_fd.as_fd())
                    .with_context(|| format!("updating the program behind {}", pin.display()))?;
                log::info!(
                    "{hook}: adopted pinned link {} (program replaced in place)",
                    info.id
                );
                return Ok(());
            }
            if info.cgroup_id != 0 {
                bail!(
                    "{} is attached to another cgroup (id {}); run `egressmon detach --pin-dir {}` \
                     or choose another --pin-dir",
                    pin.display(),
                    info.cgroup_id,
                    self.options.pin_dir.display()
                );
            }
            // The cgroup it pointed at is gone: replace the stale pin.
            std::fs::remove_file(&pin)?;
        }
        let cgroup = std::fs::File::open(&self.options.cgroup)?;
        let link = simulated_missing_hook(hook)
            .and_then(|()| bpf_sys::link_create(prog_fd.as_fd(), cgroup.as_fd(), hook.attach_type()))
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    anyhow!("this kernel does not support the {hook} hook ({e}); the other hooks run without it")
                }
                Some(libc::EPERM) => anyhow!(
                    "the kernel refused a multi-attach link ({e}): another program holds this hook \
                     exclusively above {}",
                    self.options.cgroup.display()
                ),
                _ => anyhow!("BPF_LINK_CREATE: {e}"),
            })?;
        bpf_sys::obj_pin(link.as_fd(), &pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
        log::info!("{hook}: attached at {}", self.options.cgroup.display());
        Ok(())
    }

    /// Attaches plan `i` (a tc hook) to every interface it should watch; it
    /// counts as attached if at least one took it.
    fn attach_tc(&mut self, i: usize) {
        let hook = self.plans[i].hook;
        let result = crate::bpf::tc::interfaces(self.options.tc_ifaces.as_deref())
            .and_then(|ifaces| crate::bpf::tc::load(&mut self.ebpf, hook).map(|()| ifaces));
        let ifaces = match result {
            Ok(ifaces) => ifaces,
            Err(err) => {
                log::warn!("hook {hook} not attached: {err:#}");
                self.plans[i].attach = false;
                self.plans[i].reason = Some(format!("failed: {err:#}"));
                return;
            }
        };
        let errors = self
            .tc
            .attach(&mut self.ebpf, hook, &ifaces, &self.options.pin_dir);
        self.plans[i].interfaces = self.tc.names(hook);
        if self.plans[i].interfaces.is_empty() {
            let why = if ifaces.is_empty() {
                "no interface to watch (only loopback here; name some with --tc-ifaces)".to_string()
            } else {
                errors.join("; ")
            };
            log::warn!("hook {hook} not attached: {why}");
            self.plans[i].attach = false;
            self.plans[i].reason = Some(format!("failed: {why}"));
        } else if !errors.is_empty() {
            log::warn!("hook {hook}: {}", errors.join("; "));
        }
    }

    /// Follows the interfaces the tc hooks watch (on a phone, rmnet_data,
    /// wlan0 and tun0 come and go): attaches to new ones and to ones made
    /// again under an old name, frees what listed those that went away, and
    /// puts back a filter or link someone removed.
    pub fn refresh_tc(&mut self) {
        if !self.plans.iter().any(|p| p.hook.is_tc() && p.attach) {
            return;
        }
        let present = match crate::bpf::tc::present(self.options.tc_ifaces.as_deref()) {
            Ok(present) => present,
            Err(err) => {
                log::warn!("tc hooks: {err:#}");
                return;
            }
        };
        for plan in self.plans.iter_mut().filter(|p| p.hook.is_tc() && p.attach) {
            self.tc
                .refresh(&mut self.ebpf, plan.hook, &present, &self.options.pin_dir);
            plan.interfaces = self.tc.names(plan.hook);
        }
        self.tc.prune_l3_offsets(&mut self.ebpf);
    }

    pub fn attached(&self) -> Vec<Hook> {
        self.plans
            .iter()
            .filter(|p| p.attach)
            .map(|p| p.hook)
            .collect()
    }

    fn flows_map(&self) -> Result<BpfHashMap<&MapData, FlowKey, FlowValue>> {
        Ok(BpfHashMap::try_from(
            self.ebpf.map(MAP_FLOWS).context("FLOWS map missing")?,
        )?)
    }

    /// Every flow in the kernel map.
    pub fn flows(&self) -> Result<Vec<FlowEntry>> {
        let mut out = Vec::new();
        self.flows_in_chunks(|chunk| out.extend_from_slice(chunk))?;
        Ok(out)
    }

    /// Walks the flow map, handing its flows to `each` a few thousand at a
    /// time, so a pass over a full map never holds
    /// all of it at once; returns how many were read. Uses batched lookups;
    /// falls back to per-key lookups where the kernel lacks them.
    pub fn flows_in_chunks(&self, mut each: impl FnMut(&[FlowEntry])) -> Result<u64> {
        let mut chunks = Chunks {
            buf: Vec::with_capacity(Chunks::SIZE),
            read: 0,
            each: &mut each,
        };
        let mut batched = false;
        if let Some(aya::maps::Map::LruHashMap(data)) = self.ebpf.map(MAP_FLOWS) {
            let walk = bpf_sys::lookup_batch::<FlowKey, FlowValue>(data.fd().as_fd(), |k, v| {
                chunks.push(k, flow_totals(&k, v))
            });
            match walk {
                Ok(()) => batched = true,
                // Nothing was read: the kernel has no batched lookups.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(anyhow!("reading the flow map: {e}")),
            }
        }
        if !batched {
            let map = self.flows_map()?;
            for item in map.iter() {
                let Ok((key, value)) = item else { continue };
                chunks.push(key, flow_totals(&key, value));
            }
        }
        Ok(chunks.finish())
    }

    /// A reader of the per-uid totals and health counters on descriptors of
    /// its own: scrapes and `status` read them without waiting for a pass
    /// (which holds the kernel for its walk of the flow map).
    pub fn counters(&self) -> Result<Counters> {
        let own = |name: &str| -> Result<MapData> {
            let map = self
                .ebpf
                .map(name)
                .with_context(|| format!("{name} missing"))?;
            let fd = map_fd(map)
                .with_context(|| format!("{name} has no descriptor"))?
                .try_clone_to_owned()?;
            Ok(MapData::from_fd(fd)?)
        };
        Ok(Counters {
            uid_totals: PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(own(
                MAP_UID_TOTALS,
            )?))?,
            uid_direct: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(own(MAP_UID_DIRECT)?))?,
            stats: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(own(MAP_STATS)?))?,
        })
    }

    pub fn take_payloads(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(MAP_PAYLOADS)
            .context("PAYLOADS map already taken")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// One of the loaded maps (`MAP_*`) by descriptor: the restart state
    /// names the flow map by its id and re-arms payload capture through it.
    pub(crate) fn loaded_map_fd(&self, name: &str) -> Option<BorrowedFd<'_>> {
        self.ebpf.map(name).and_then(map_fd)
    }

    /// The kernel programs' aya-log records, handed to `logger` at each
    /// `flush` (taken once, by the agent).
    pub fn take_log(
        &mut self,
        logger: crate::bpf::kernel_log::KernelLog,
    ) -> Result<aya_log::EbpfLogger<crate::bpf::kernel_log::KernelLog>> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger)
            .context("opening the kernel programs' log ring (AYA_LOGS)")
    }

    /// The mark the programs leave uncounted (for the agent's own sockets).
    pub fn own_mark(&self) -> u32 {
        self.own_mark
    }

    /// The new-flow event ring (taken once by the event reader).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(MAP_EVENTS)
            .context("EVENTS map already taken")?;
        Ok(RingBuf::try_from(map)?)
    }
}

/// A flow as read from the kernel.
pub type FlowEntry = (FlowKey, FlowValue);

/// Hands flows on to a consumer a few thousand at a time.
struct Chunks<'a> {
    buf: Vec<FlowEntry>,
    read: u64,
    each: &'a mut dyn FnMut(&[FlowEntry]),
}

impl Chunks<'_> {
    const SIZE: usize = 4096;

    fn push(&mut self, key: FlowKey, value: FlowValue) {
        self.buf.push((key, value));
        self.read += 1;
        if self.buf.len() == Self::SIZE {
            (self.each)(&self.buf);
            self.buf.clear();
        }
    }

    /// Hands on the rest; returns how many flows went through.
    fn finish(self) -> u64 {
        if !self.buf.is_empty() {
            (self.each)(&self.buf);
        }
        self.read
    }
}

/// The kernel's per-uid totals and health counters (see [`Kernel::counters`]).
pub struct Counters {
    uid_totals: PerCpuHashMap<MapData, UidKey, UidTotals>,
    uid_direct: PerCpuArray<MapData, UidTotals>,
    stats: PerCpuArray<MapData, u64>,
}

impl Counters {
    /// Per-uid totals (not subject to flow eviction), summed over CPUs:
    /// every key `UID_TOTALS` lists, with its direct slot's counts where it
    /// has one.
    pub fn uid_totals(&self) -> Result<HashMap<UidKey, UidTotals>> {
        let mut out = HashMap::new();
        for item in self.uid_totals.iter() {
            let Ok((uid, per_cpu)) = item else { continue };
            let mut t = UidTotals::default();
            per_cpu.iter().for_each(|v| add_totals(&mut t, v));
            if let Some(slot) = direct_uid_slot(uid.uid, uid.proto) {
                if let Ok(direct) = self.uid_direct.get(&slot, 0) {
                    direct.iter().for_each(|v| add_totals(&mut t, v));
                }
            }
            t.udp_sends = udp_datagrams(uid.proto, t.udp_sends, t.tx_packets);
            out.insert(uid, t);
        }
        Ok(out)
    }

    /// Health counters summed over CPUs, indexed by `STAT_*`.
    pub fn stats(&self) -> Result<[u64; STAT_COUNT as usize]> {
        let mut out = [0u64; STAT_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.stats.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        Ok(out)
    }
}

fn add_totals(total: &mut UidTotals, v: &UidTotals) {
    total.connects += v.connects;
    total.udp_sends += v.udp_sends;
    total.tx_packets += v.tx_packets;
    total.tx_bytes += v.tx_bytes;
}

/// A flow's value as the agent reads it: `udp_sends` becomes the flow's
/// datagrams ([`udp_datagrams`]).
pub fn flow_totals(key: &FlowKey, value: FlowValue) -> FlowValue {
    FlowValue {
        udp_sends: udp_datagrams(key.proto, value.udp_sends, value.tx_packets),
        ..value
    }
}

/// Unread bytes in the new-flow ring past which the kernel wakes the event
/// reader: a quarter of the ring.
fn events_wake_bytes(options: &LoadOptions) -> u64 {
    u64::from(ring_bytes(options.ringbuf_bytes)) / 4
}

/// How one pinned map must look for this build to use it: the agent reads
/// it with buffers sized from these (a planted or version-skewed map of
/// another value size would make the batched read overflow them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapSpec {
    name: &'static str,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    /// The `run` option that sets `max_entries`, if one does.
    option: Option<&'static str>,
}

impl MapSpec {
    const fn new(name: &'static str, map_type: u32, key: usize, value: usize, max: u32) -> Self {
        MapSpec {
            name,
            map_type,
            key_size: key as u32,
            value_size: value as u32,
            max_entries: max,
            option: None,
        }
    }

    const fn set_by(self, option: &'static str) -> Self {
        MapSpec {
            option: Some(option),
            ..self
        }
    }
}

const TC_FILTERS_SPEC: MapSpec = MapSpec::new(
    MAP_TC_FILTERS,
    bpf_sys::BPF_MAP_TYPE_ARRAY,
    4,
    size_of::<TcFilter>(),
    TC_FILTER_SLOTS,
);

const LAYOUT_VERSION_SPEC: MapSpec =
    MapSpec::new(MAP_LAYOUT_VERSION, bpf_sys::BPF_MAP_TYPE_ARRAY, 4, 4, 1);

/// Every map egressmon pins: the eBPF object's pinned maps and the layout
/// version. A map the object pins but this list lacks would be refused as
/// foreign when the next agent starts.
const PINNED_MAPS: [&str; 8] = [
    MAP_FLOWS,
    MAP_UID_TOTALS,
    MAP_UID_DIRECT,
    MAP_EVENTS,
    MAP_PAYLOADS,
    MAP_STATS,
    MAP_TC_FILTERS,
    MAP_LAYOUT_VERSION,
];

/// Every map egressmon pins (in the order of `PINNED_MAPS`), as this build
/// and `options` make it.
fn pinned_map_specs(options: &LoadOptions) -> [MapSpec; 8] {
    use bpf_sys::*;
    let flows = options.flow_entries;
    let ring = ring_bytes(options.ringbuf_bytes);
    [
        MapSpec::new(
            MAP_FLOWS,
            BPF_MAP_TYPE_LRU_HASH,
            size_of::<FlowKey>(),
            size_of::<FlowValue>(),
            flows,
        )
        .set_by("--flow-entries"),
        MapSpec::new(
            MAP_UID_TOTALS,
            BPF_MAP_TYPE_PERCPU_HASH,
            size_of::<UidKey>(),
            size_of::<UidTotals>(),
            options.uid_entries,
        )
        .set_by("--uid-entries"),
        MapSpec::new(
            MAP_UID_DIRECT,
            BPF_MAP_TYPE_PERCPU_ARRAY,
            size_of::<u32>(),
            size_of::<UidTotals>(),
            DIRECT_UID_SLOTS,
        ),
        MapSpec::new(MAP_EVENTS, BPF_MAP_TYPE_RINGBUF, 0, 0, ring).set_by("--ringbuf-bytes"),
        MapSpec::new(
            MAP_PAYLOADS,
            BPF_MAP_TYPE_RINGBUF,
            0,
            0,
            ring_bytes(DEFAULT_PAYLOAD_RING_BYTES),
        ),
        MapSpec::new(
            MAP_STATS,
            BPF_MAP_TYPE_PERCPU_ARRAY,
            size_of::<u32>(),
            size_of::<u64>(),
            STAT_COUNT,
        ),
        TC_FILTERS_SPEC,
        LAYOUT_VERSION_SPEC,
    ]
}

/// A ring buffer's size as aya makes it: a power-of-two number of pages.
fn ring_bytes(requested: u32) -> u32 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u32;
    page * requested.div_ceil(page).next_power_of_two()
}

/// The first 15 bytes of `name`: all the kernel keeps of a map's name.
fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(15)]
}

/// How `info` differs from `spec`, in words ("value size 8, expected 56").
fn map_differences(spec: &MapSpec, info: &MapInfo) -> Vec<String> {
    let mut differences = Vec::new();
    if info.name() != kernel_name(spec.name) {
        differences.push(format!("named {:?} in the kernel", info.name()));
    }
    let numbers = [
        ("type", info.map_type, spec.map_type),
        ("key size", info.key_size, spec.key_size),
        ("value size", info.value_size, spec.value_size),
        ("max entries", info.max_entries, spec.max_entries),
    ];
    for (what, found, expected) in numbers {
        if found != expected {
            differences.push(format!("{what} {found}, expected {expected}"));
        }
    }
    differences
}

/// Why the map pinned as `spec.name` under `pin_dir` must not be used, with
/// what to do; `None` when it is exactly the map this build makes.
fn adoption_problem(spec: &MapSpec, info: &MapInfo, pin_dir: &Path) -> Option<String> {
    let differences = map_differences(spec, info);
    if differences.is_empty() {
        return None;
    }
    let pin = pin_dir.join(spec.name);
    let dir = pin_dir.display();
    let only_size = differences.len() == 1 && info.max_entries != spec.max_entries;
    if let (true, Some(option)) = (only_size, spec.option) {
        return Some(format!(
            "{} was made for {pinned} max entries, this run asks for {}: start with {option} \
             {pinned} to keep counting into it, or run `egressmon detach --pin-dir {dir}` first \
             to resize it (the counts in it are lost)",
            pin.display(),
            spec.max_entries,
            pinned = info.max_entries,
        ));
    }
    Some(format!(
        "{} is not a map this egressmon can use ({}): an egressmon of another version left it \
         there, or something else put it there. Run `egressmon detach --pin-dir {dir}` to remove \
         egressmon's pins (the counts in them are lost), then start again",
        pin.display(),
        differences.join(", ")
    ))
}

fn check_map(spec: &MapSpec, fd: BorrowedFd<'_>, pin_dir: &Path) -> Result<()> {
    let info = bpf_sys::map_info(fd)
        .with_context(|| format!("checking {}", pin_dir.join(spec.name).display()))?;
    match adoption_problem(spec, &info, pin_dir) {
        Some(problem) => bail!(problem),
        None => Ok(()),
    }
}

/// What kind of object egressmon pins under `name`, if it pins anything
/// under that name: its maps (and the layout version), and links named
/// `link_<hook>`, or `link_<tc hook>_<interface>`.
fn kind_of_our_pin(name: &str) -> Option<ObjKind> {
    if PINNED_MAPS.contains(&name) {
        return Some(ObjKind::Map);
    }
    let hook = name.strip_prefix("link_")?;
    let is_link = Hook::ALL.iter().any(|h| {
        let tail = hook.strip_prefix(h.name());
        match tail {
            Some("") => !h.is_tc(),
            Some(tail) => h.is_tc() && tail.len() > 1 && tail.starts_with('_'),
            None => false,
        }
    });
    is_link.then_some(ObjKind::Link)
}

/// Whether the pin at `path` holds what egressmon pins under that name:
/// a map that the kernel knows by the same name, or a link.
fn holds_our_object(path: &Path, name: &str, kind: ObjKind) -> bool {
    let Ok(fd) = bpf_sys::obj_get(path) else {
        return false;
    };
    match bpf_sys::obj_kind(fd.as_fd()) {
        Ok(ObjKind::Map) if kind == ObjKind::Map => {
            bpf_sys::map_info(fd.as_fd()).is_ok_and(|info| info.name() == kernel_name(name))
        }
        Ok(found) => found == kind,
        Err(_) => false,
    }
}

/// The entries of a pin directory: egressmon's pins, and everything else.
#[derive(Debug, Default)]
struct PinDirContents {
    maps: Vec<String>,
    links: Vec<String>,
    foreign: Vec<String>,
}

/// Sorts the entries of `pin_dir`. A pin is egressmon's when its name is
/// one egressmon makes, it is a pin (a regular bpffs file, never followed
/// through a symbolic link) that root made, and it holds the kind of object
/// of that name.
fn read_pin_dir(pin_dir: &Path) -> Result<PinDirContents> {
    let mut contents = PinDirContents::default();
    let entries =
        std::fs::read_dir(pin_dir).with_context(|| format!("listing {}", pin_dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", pin_dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // lstat: a link is not followed; egressmon's pins are root's.
        let is_pin = entry.metadata().is_ok_and(|m| m.is_file() && m.uid() == 0);
        let ours = kind_of_our_pin(&name)
            .filter(|&kind| is_pin && holds_our_object(&entry.path(), &name, kind));
        match ours {
            Some(ObjKind::Map) => contents.maps.push(name),
            Some(_) => contents.links.push(name),
            None => contents.foreign.push(name),
        }
    }
    contents.maps.sort();
    contents.links.sort();
    contents.foreign.sort();
    Ok(contents)
}

/// Before anything is loaded: refuses a pin directory that holds pins
/// egressmon did not make, maps this build cannot use, or pins of another
/// pin layout.
fn check_pins(options: &LoadOptions) -> Result<()> {
    let pin_dir = &options.pin_dir;
    let contents = read_pin_dir(pin_dir)?;
    if !contents.foreign.is_empty() {
        bail!(
            "--pin-dir {} holds pins egressmon did not make ({}): egressmon keeps its pins in a \
             directory of its own and never adopts or removes anyone else's; choose another \
             --pin-dir, or remove those if nothing uses them",
            pin_dir.display(),
            contents.foreign.join(", ")
        );
    }
    for spec in pinned_map_specs(options) {
        if contents.maps.iter().any(|m| m == spec.name) {
            let pin = pin_dir.join(spec.name);
            let fd =
                bpf_sys::obj_get(&pin).with_context(|| format!("opening {}", pin.display()))?;
            check_map(&spec, fd.as_fd(), pin_dir)?;
        }
    }
    check_layout_version(pin_dir)
}

/// The maps aya opened or made, checked by descriptor: what the agent will
/// actually read.
fn check_loaded_maps(ebpf: &Ebpf, options: &LoadOptions) -> Result<()> {
    for spec in pinned_map_specs(options) {
        if spec.name == MAP_LAYOUT_VERSION {
            continue;
        }
        let map = ebpf
            .map(spec.name)
            .with_context(|| format!("{} map missing from the object", spec.name))?;
        let fd = map_fd(map).with_context(|| format!("{} has an unexpected kind", spec.name))?;
        check_map(&spec, fd, &options.pin_dir)?;
    }
    Ok(())
}

/// The descriptor of a map of one of the kinds egressmon pins.
fn map_fd(map: &aya::maps::Map) -> Option<BorrowedFd<'_>> {
    use aya::maps::Map;
    let data = match map {
        Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::RingBuf(d) => d,
        _ => return None,
    };
    Some(data.fd().as_fd())
}

/// Refuses pins left by an egressmon of another pin layout. Pins from
/// before the version was recorded are adopted when every map checks out.
fn check_layout_version(pin_dir: &Path) -> Result<()> {
    let pin = pin_dir.join(MAP_LAYOUT_VERSION);
    if std::fs::symlink_metadata(&pin).is_err() {
        return Ok(());
    }
    let fd = bpf_sys::obj_get(&pin).with_context(|| format!("opening {}", pin.display()))?;
    check_map(&LAYOUT_VERSION_SPEC, fd.as_fd(), pin_dir)?;
    let map = RawMap::from_fd(fd)?;
    let mut value = [0u8; 4];
    map.lookup(&0u32.to_ne_bytes(), &mut value)
        .with_context(|| format!("reading {}", pin.display()))?;
    let found = u32::from_ne_bytes(value);
    if found != PIN_LAYOUT_VERSION {
        bail!(
            "the pins under {dir} have pin layout {found}, this egressmon uses layout \
             {PIN_LAYOUT_VERSION}: an egressmon of another version made them. Run `egressmon \
             detach --pin-dir {dir}` to remove them (the counts in them are lost), then start \
             again",
            dir = pin_dir.display()
        );
    }
    Ok(())
}

/// Pins the layout version beside the maps, unless it is there already.
fn record_layout_version(pin_dir: &Path) -> Result<()> {
    let pin = pin_dir.join(MAP_LAYOUT_VERSION);
    if std::fs::symlink_metadata(&pin).is_ok() {
        return Ok(());
    }
    let spec = LAYOUT_VERSION_SPEC;
    let map = bpf_sys::map_create(spec.map_type, 4, 4, 1, spec.name)
        .and_then(RawMap::from_fd)
        .context("creating the layout version map")?;
    map.update(&0u32.to_ne_bytes(), &PIN_LAYOUT_VERSION.to_ne_bytes(), 0)
        .context("writing the layout version")?;
    bpf_sys::obj_pin(map.fd(), &pin).with_context(|| format!("pinning {}", pin.display()))
}

/// What `detach` did.
#[derive(Debug, Default)]
pub struct DetachReport {
    /// Hooks detached (`hook`, `hook_interface` or `hook/interface`).
    pub links: Vec<String>,
    /// egressmon's pins removed.
    pub pins: Vec<String>,
    /// Entries of the pin directory egressmon did not make, left in place.
    pub foreign: Vec<String>,
    /// Whether the directory itself was removed (never while something
    /// foreign is in it, never a mount point such as /sys/fs/bpf).
    pub dir_removed: bool,
}

/// Detaches egressmon's pinned links and netlink tc filters, removes its
/// pins, and the directory if nothing else is in it. Never removes a pin
/// egressmon did not make. Programs and maps are freed by the kernel once
/// the last reference (pin, link or agent fd) is gone.
pub fn detach(pin_dir: &Path) -> Result<DetachReport> {
    let mut report = DetachReport::default();
    match std::fs::symlink_metadata(pin_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
        other => other.with_context(|| format!("checking {}", pin_dir.display()))?,
    };
    system::check_pin_dir(pin_dir, system::PinDirUse::Detach)?;
    let contents = read_pin_dir(pin_dir)?;
    for name in &contents.links {
        detach_link(&pin_dir.join(name));
        report
            .links
            .push(name.trim_start_matches("link_").to_string());
    }
    if contents.maps.iter().any(|m| m == MAP_TC_FILTERS) && tc_filters_are_ours(pin_dir) {
        report.links.extend(crate::bpf::tc::remove_filters(pin_dir));
    }
    for name in contents.links.iter().chain(&contents.maps) {
        let pin = pin_dir.join(name);
        std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        report.pins.push(name.clone());
    }
    report.foreign = contents.foreign;
    if report.foreign.is_empty() && !system::is_mount_point(pin_dir) {
        std::fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
        report.dir_removed = true;
    }
    Ok(report)
}

fn detach_link(pin: &Path) {
    match bpf_sys::obj_get(pin) {
        Ok(fd) => {
            if let Err(e) = bpf_sys::link_detach(fd.as_fd()) {
                // Pre-5.9 kernels: removing the last reference detaches.
                log::debug!("BPF_LINK_DETACH {}: {e}", pin.display());
            }
        }
        Err(e) => log::warn!("opening {}: {e}", pin.display()),
    }
}

/// Whether `TC_FILTERS` is exactly egressmon's list: its entries name tc
/// filters to delete, so a list of another layout is never acted on.
fn tc_filters_are_ours(pin_dir: &Path) -> bool {
    let pin = pin_dir.join(MAP_TC_FILTERS);
    let usable = bpf_sys::obj_get(&pin)
        .and_then(|fd| bpf_sys::map_info(fd.as_fd()))
        .is_ok_and(|info| map_differences(&TC_FILTERS_SPEC, &info).is_empty());
    if !usable {
        log::warn!(
            "{} is not egressmon's filter list: its filters are left",
            pin.display()
        );
    }
    usable
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel file names its maps by their statics; the agent opens and
    /// pins them by the `MAP_*` names: both must name the same maps.
    #[test]
    fn map_names_agree_with_the_object() {
        let object = aya_obj::Object::parse(crate::EBPF_OBJECT).expect("parse the eBPF object");
        let mut in_object: Vec<&str> = object
            .maps
            .keys()
            .map(String::as_str)
            .filter(|name| !name.starts_with('.') && !name.starts_with("AYA_LOG"))
            .collect();
        in_object.sort_unstable();
        let mut named: Vec<&str> = PINNED_MAPS
            .iter()
            .copied()
            .filter(|&name| name != MAP_LAYOUT_VERSION) // made by the agent
            .chain([MAP_CONFIG, MAP_TC_L3_OFFSET, MAP_DNS_PORTS])
            .collect();
        named.sort_unstable();
        assert_eq!(in_object, named);
    }

    fn options(flow_entries: u32) -> LoadOptions {
        LoadOptions {
            cgroup: PathBuf::from("/sys/fs/cgroup"),
            pin_dir: PathBuf::from("/sys/fs/bpf/egressmon"),
            hooks: None,
            flow_entries,
            uid_entries: DEFAULT_UID_ENTRIES,
            ringbuf_bytes: DEFAULT_RINGBUF_BYTES,
            tc_ifaces: None,
        }
    }

    fn info_of(spec: &MapSpec) -> MapInfo {
        let mut info = MapInfo {
            map_type: spec.map_type,
            key_size: spec.key_size,
            value_size: spec.value_size,
            max_entries: spec.max_entries,
            ..Default::default()
        };
        let name = kernel_name(spec.name).as_bytes();
        info.name[..name.len()].copy_from_slice(name);
        info
    }

    fn flows_spec(flow_entries: u32) -> MapSpec {
        pinned_map_specs(&options(flow_entries))[0]
    }

    #[test]
    fn the_map_egressmon_makes_is_adopted() {
        let dir = Path::new("/sys/fs/bpf/egressmon");
        for spec in pinned_map_specs(&options(DEFAULT_FLOW_ENTRIES)) {
            assert_eq!(adoption_problem(&spec, &info_of(&spec), dir), None);
        }
    }

    #[test]
    fn a_flow_map_of_another_value_size_is_refused_with_detach() {
        let spec = flows_spec(1024);
        let planted = MapInfo {
            value_size: 48,
            ..info_of(&spec)
        };
        let problem = adoption_problem(&spec, &planted, Path::new("/p")).unwrap();
        assert!(
            problem.starts_with(
                "/p/FLOWS is not a map this egressmon can use (value size 48, expected 56)"
            ) && problem.contains("`egressmon detach --pin-dir /p`"),
            "{problem}"
        );
    }

    #[test]
    fn a_map_named_otherwise_in_the_kernel_is_not_ours() {
        let spec = flows_spec(1024);
        let mut other = info_of(&spec);
        other.name = *b"netd_map\0\0\0\0\0\0\0\0";
        let problem = adoption_problem(&spec, &other, Path::new("/p")).unwrap();
        assert!(
            problem.contains("(named \"netd_map\" in the kernel)"),
            "{problem}"
        );
    }

    #[test]
    fn another_size_names_the_option_that_sets_it() {
        let pinned = info_of(&flows_spec(4096));
        let problem = adoption_problem(&flows_spec(8192), &pinned, Path::new("/p")).unwrap();
        assert!(
            problem.starts_with("/p/FLOWS was made for 4096 max entries, this run asks for 8192")
                && problem.contains("start with --flow-entries 4096 to keep counting")
                && problem.contains("`egressmon detach --pin-dir /p`"),
            "{problem}"
        );
    }

    #[test]
    fn every_pinned_map_has_a_spec() {
        let specs = pinned_map_specs(&options(DEFAULT_FLOW_ENTRIES));
        assert_eq!(specs.map(|s| s.name), PINNED_MAPS);
    }

    #[test]
    fn our_pin_names() {
        for name in ["FLOWS", "TC_FILTERS", "LAYOUT_VERSION"] {
            assert_eq!(kind_of_our_pin(name), Some(ObjKind::Map), "{name}");
        }
        for name in ["link_connect4", "link_skb_egress", "link_tc_egress_wlan0"] {
            assert_eq!(kind_of_our_pin(name), Some(ObjKind::Link), "{name}");
        }
        let foreign = [
            "CONFIG",
            "map_netd_cookie_tag_map",
            "link_",
            "link_connect4_eth0",
            "link_tc_egress",
            "link_tc_egress_",
            "link_bogus",
            "flows",
        ];
        for name in foreign {
            assert_eq!(kind_of_our_pin(name), None, "{name}");
        }
    }

    #[test]
    fn rings_are_whole_pages() {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u32;
        assert_eq!(ring_bytes(page), page);
        assert_eq!(ring_bytes(page * 4), page * 4);
        assert_eq!(ring_bytes(page * 3), page * 4);
        assert_eq!(ring_bytes(1), page);
    }
}
