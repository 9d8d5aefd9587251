//! Loads the embedded eBPF object, attaches its programs as pinned cgroup
//! links (so counting continues while no agent runs), adopts what an earlier
//! agent left pinned, and reads the maps. What is pinned where, and whether
//! an earlier agent's pins may be adopted, is `bpf::pins`'s.

use crate::bpf::hooks::{self, Hook, HookPlan};
use crate::bpf::pins::{self, PinDir};
use crate::bpf::system;
use crate::bpf_sys;
use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::{CgroupSkb, CgroupSockAddr, ProgramError};
use aya::{Ebpf, EbpfLoader};
use monitor_common::*;
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;

/// Load-time options.
#[derive(Debug, Clone)]
pub(crate) struct LoadOptions {
    pub(crate) cgroup: PathBuf,
    pub(crate) pin_dir: PathBuf,
    pub(crate) hooks: Option<Vec<Hook>>,
    pub(crate) flow_entries: u32,
    pub(crate) uid_entries: u32,
    pub(crate) ringbuf_bytes: u32,
    /// Interfaces for the tc hooks (default: all but loopback).
    pub(crate) tc_ifaces: Option<Vec<String>>,
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

pub(crate) struct Kernel {
    ebpf: Ebpf,
    pub(crate) plans: Vec<HookPlan>,
    pub(crate) options: LoadOptions,
    /// Where its pins are.
    pins: PinDir,
    /// Where the tc hooks are attached, by interface index.
    tc: crate::bpf::tc::Attachments,
    /// The programs skip packets with this mark: the agent's own.
    own_mark: u32,
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
    pub(crate) fn load(options: LoadOptions) -> Result<Kernel> {
        system::require_kernel()?;
        if !options.ringbuf_bytes.is_power_of_two() || options.ringbuf_bytes < 4096 {
            bail!(
                "--ringbuf-bytes must be a power of two of at least 4096, got {}",
                options.ringbuf_bytes
            );
        }
        let pins = PinDir::new(&options.pin_dir);
        pins.prepare()?;
        pins.check_adoptable(&options)?;
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
            .default_map_pin_directory(pins.path())
            .map_max_entries(MAP_FLOWS, options.flow_entries)
            .map_max_entries(MAP_UID_TOTALS, options.uid_entries)
            .map_max_entries(MAP_EVENTS, options.ringbuf_bytes)
            .load(crate::EBPF_OBJECT)
            .with_context(|| {
                format!(
                    "loading egressmon's maps (pinned under {}): if an older egressmon left them \
                     there with other sizes, run `egressmon detach --pin-dir {}` first",
                    pins.path().display(),
                    pins.path().display()
                )
            })?;
        pins.check_loaded(&ebpf, &options)?;
        pins.record_layout_version()?;
        let plans = hooks::plan(options.hooks.as_deref(), &options.cgroup)?;
        let mut kernel = Kernel {
            ebpf,
            plans,
            tc: crate::bpf::tc::Attachments::new(&pins),
            pins,
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
            for pin in self.pins.links_of(plan.hook) {
                pins::remove_link(&pin);
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
        self.tc.sweep(&mut self.ebpf, &self.pins);
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
        let pin = self.pins.link(hook);
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
                    self.pins.path().display()
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
        let errors = self.tc.attach(&mut self.ebpf, hook, &ifaces, &self.pins);
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
    pub(crate) fn refresh_tc(&mut self) {
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
                .refresh(&mut self.ebpf, plan.hook, &present, &self.pins);
            plan.interfaces = self.tc.names(plan.hook);
        }
        self.tc.prune_l3_offsets(&mut self.ebpf);
    }

    pub(crate) fn attached(&self) -> Vec<Hook> {
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

    /// Walks the flow map, handing its flows to `each` a few thousand at a
    /// time, so a pass over a full map never holds
    /// all of it at once; returns how many were read. Uses batched lookups;
    /// falls back to per-key lookups where the kernel lacks them.
    pub(crate) fn flows_in_chunks(&self, mut each: impl FnMut(&[FlowEntry])) -> Result<u64> {
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
    pub(crate) fn counters(&self) -> Result<Counters> {
        let own = |name| self.own_map(name);
        Ok(Counters {
            uid_totals: PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(own(
                MAP_UID_TOTALS,
            )?))?,
            uid_direct: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(own(MAP_UID_DIRECT)?))?,
            stats: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(own(MAP_STATS)?))?,
        })
    }

    /// The block maps on descriptors of their own (rules change without
    /// waiting for a pass).
    pub(crate) fn block_maps(&self) -> Result<crate::block::BlockMaps> {
        crate::block::BlockMaps::new(self.own_map(MAP_BLOCKS)?, self.own_map(MAP_BLOCK_GEN)?)
    }

    /// Loaded map `name` on a descriptor of its own.
    fn own_map(&self, name: &str) -> Result<MapData> {
        let map = self
            .ebpf
            .map(name)
            .with_context(|| format!("{name} missing"))?;
        let fd = map_fd(map)
            .with_context(|| format!("{name} has no descriptor"))?
            .try_clone_to_owned()?;
        Ok(MapData::from_fd(fd)?)
    }

    pub(crate) fn take_payloads(&mut self) -> Result<RingBuf<MapData>> {
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
    pub(crate) fn take_log(
        &mut self,
        logger: crate::bpf::kernel_log::KernelLog,
    ) -> Result<aya_log::EbpfLogger<crate::bpf::kernel_log::KernelLog>> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger)
            .context("opening the kernel programs' log ring (AYA_LOGS)")
    }

    /// The mark the programs leave uncounted (for the agent's own sockets).
    pub(crate) fn own_mark(&self) -> u32 {
        self.own_mark
    }

    /// The new-flow event ring (taken once by the event reader).
    pub(crate) fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(MAP_EVENTS)
            .context("EVENTS map already taken")?;
        Ok(RingBuf::try_from(map)?)
    }
}

/// A flow as read from the kernel.
pub(crate) type FlowEntry = (FlowKey, FlowValue);

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

/// A reading of [`Counters::movement`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Movement {
    flows_created: u64,
    counted: u64,
}

/// The kernel's per-uid totals and health counters (see [`Kernel::counters`]).
pub(crate) struct Counters {
    uid_totals: PerCpuHashMap<MapData, UidKey, UidTotals>,
    uid_direct: PerCpuArray<MapData, UidTotals>,
    stats: PerCpuArray<MapData, u64>,
}

impl Counters {
    /// Per-uid totals (not subject to flow eviction), summed over CPUs:
    /// every key `UID_TOTALS` lists, with its direct slot's counts where it
    /// has one.
    pub(crate) fn uid_totals(&self) -> Result<HashMap<UidKey, UidTotals>> {
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

    /// Everything the kernel counted, summed: flows made and every uid's
    /// totals. Two equal readings mean the flow map did not change between
    /// them but for refused attempts, which count in their flow alone (see
    /// `Agent::may_skip_pass`): the LRU evicts only to make a flow, and
    /// every other count reaches its uid's totals.
    pub(crate) fn movement(&self) -> Result<Movement> {
        let flows_created = self
            .stats
            .get(&STAT_FLOWS_CREATED, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0);
        let counted = self.uid_totals()?.values().fold(0u64, |sum, t| {
            sum.wrapping_add(t.connects)
                .wrapping_add(t.udp_sends)
                .wrapping_add(t.tx_packets)
                .wrapping_add(t.tx_bytes)
        });
        Ok(Movement {
            flows_created,
            counted,
        })
    }

    /// Health counters summed over CPUs, indexed by `STAT_*`.
    pub(crate) fn stats(&self) -> Result<[u64; STAT_COUNT as usize]> {
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
pub(crate) fn flow_totals(key: &FlowKey, value: FlowValue) -> FlowValue {
    FlowValue {
        udp_sends: udp_datagrams(key.proto, value.udp_sends, value.tx_packets),
        ..value
    }
}

/// Unread bytes in the new-flow ring past which the kernel wakes the event
/// reader: a quarter of the ring.
fn events_wake_bytes(options: &LoadOptions) -> u64 {
    u64::from(pins::ring_bytes(options.ringbuf_bytes)) / 4
}

/// The descriptor of a map of one of the kinds egressmon pins.
pub(crate) fn map_fd(map: &aya::maps::Map) -> Option<BorrowedFd<'_>> {
    use aya::maps::Map;
    let data = match map {
        Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::LpmTrie(d)
        | Map::RingBuf(d) => d,
        _ => return None,
    };
    Some(data.fd().as_fd())
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::pins::PINNED_MAPS;

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
            .chain([
                MAP_CONFIG,
                MAP_TC_L3_OFFSET,
                MAP_DNS_PORTS,
                MAP_CAPTURE_PORTS,
                MAP_PAYLOAD_SCRATCH,
            ])
            .collect();
        named.sort_unstable();
        assert_eq!(in_object, named);
    }
}
