//! Loads the embedded eBPF object, attaches its programs as pinned cgroup
//! links (so counting continues while no agent runs), adopts what an earlier
//! agent left pinned, reads the maps, and removes everything on `detach`.
//!
//! Pin directory layout: one file per map (`FLOWS`, `FLOW_SEEN`, `UID_TOTALS`,
//! `EVENTS`, `STATS`), one per attached cgroup hook (`link_<hook>`), one per
//! tc hook and interface on TCX kernels (`link_<hook>_<interface>`), and the
//! list of netlink tc filters elsewhere (`tc_filters`).

use crate::bpf_sys;
use crate::hooks::{self, Hook, HookPlan};
use crate::system;
use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{Array, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use aya::programs::{CgroupSkb, CgroupSockAddr, ProgramError};
use aya::{Ebpf, EbpfLoader};
use monitor_common::*;
use std::collections::HashMap;
use std::os::fd::AsFd;
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
fn simulated_missing_hook(hook: Hook) -> std::io::Result<()> {
    let listed = std::env::var("EGRESSMON_SIMULATE_MISSING_HOOKS").unwrap_or_default();
    if listed.split(',').any(|h| h.trim() == hook.name()) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

/// Summed (over CPUs) counters of one flow.
pub type FlowTotals = FlowValue;

pub struct Kernel {
    ebpf: Ebpf,
    pub plans: Vec<HookPlan>,
    pub options: LoadOptions,
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
        system::ensure_pin_dir(&options.pin_dir)?;
        if !options.ringbuf_bytes.is_power_of_two() || options.ringbuf_bytes < 4096 {
            bail!(
                "--ringbuf-bytes must be a power of two of at least 4096, got {}",
                options.ringbuf_bytes
            );
        }
        // No relocation against the kernel's BTF: the programs need none,
        // and kernels without BTF (some Android ones) load them the same.
        let ebpf = EbpfLoader::new()
            .btf(None)
            .default_map_pin_directory(&options.pin_dir)
            .map_max_entries(MAP_FLOWS, options.flow_entries)
            .map_max_entries(MAP_FLOW_SEEN, options.flow_entries)
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
        let plans = hooks::plan(options.hooks.as_deref(), &options.cgroup)?;
        let mut kernel = Kernel {
            ebpf,
            plans,
            options,
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
        // Netlink filters cannot be adopted: the planned ones are attached
        // again right after.
        for removed in crate::tc::remove_filters(&self.options.pin_dir) {
            log::info!("removed the tc filter {removed} of an earlier run");
        }
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
        let result = crate::tc::interfaces(self.options.tc_ifaces.as_deref())
            .and_then(|ifaces| crate::tc::load(&mut self.ebpf, hook).map(|()| ifaces));
        let ifaces = match result {
            Ok(ifaces) => ifaces,
            Err(err) => {
                log::warn!("hook {hook} not attached: {err:#}");
                self.plans[i].attach = false;
                self.plans[i].reason = Some(format!("failed: {err:#}"));
                return;
            }
        };
        let mut errors = Vec::new();
        for iface in &ifaces {
            match self.attach_tc_to(hook, iface) {
                Ok(()) => self.plans[i].interfaces.push(iface.name.clone()),
                Err(err) => errors.push(format!("{err:#}")),
            }
        }
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

    fn attach_tc_to(&mut self, hook: Hook, iface: &crate::tc::Interface) -> Result<()> {
        crate::tc::set_l3_offset(&mut self.ebpf, iface)?;
        crate::tc::attach(&mut self.ebpf, hook, iface, &self.options.pin_dir)
    }

    /// Attaches the tc hooks to interfaces that appeared since (on a phone,
    /// rmnet_data and wlan0 come and go); forgets those that went away.
    pub fn refresh_tc(&mut self) {
        if self.options.tc_ifaces.is_some() {
            return;
        }
        if !self.plans.iter().any(|p| p.hook.is_tc() && p.attach) {
            return;
        }
        let Ok(now) = crate::tc::interfaces(None) else {
            return;
        };
        for i in 0..self.plans.len() {
            let hook = self.plans[i].hook;
            if !hook.is_tc() || !self.plans[i].attach {
                continue;
            }
            self.plans[i]
                .interfaces
                .retain(|name| now.iter().any(|n| &n.name == name));
            for iface in &now {
                if self.plans[i].interfaces.contains(&iface.name) {
                    continue;
                }
                match self.attach_tc_to(hook, iface) {
                    Ok(()) => self.plans[i].interfaces.push(iface.name.clone()),
                    Err(err) => log::warn!("hook {hook} on new interface {}: {err:#}", iface.name),
                }
            }
        }
    }

    pub fn attached(&self) -> Vec<Hook> {
        self.plans
            .iter()
            .filter(|p| p.attach)
            .map(|p| p.hook)
            .collect()
    }

    fn flows_map(&self) -> Result<PerCpuHashMap<&MapData, FlowKey, FlowValue>> {
        Ok(PerCpuHashMap::try_from(
            self.ebpf.map(MAP_FLOWS).context("FLOWS map missing")?,
        )?)
    }

    /// Every flow in the kernel map, counters summed over CPUs.
    pub fn flows(&self) -> Result<Vec<FlowEntry>> {
        let mut out = Vec::new();
        self.flows_in_chunks(|chunk| out.extend_from_slice(chunk))?;
        Ok(out)
    }

    /// Walks the flow map, handing its flows (counters summed over CPUs) to
    /// `each` a few thousand at a time, so a pass over a full map never holds
    /// all of it at once; returns how many were read. Uses batched lookups;
    /// falls back to per-key lookups where the kernel lacks them.
    pub fn flows_in_chunks(&self, mut each: impl FnMut(&[FlowEntry])) -> Result<u64> {
        let mut chunks = Chunks {
            buf: Vec::with_capacity(Chunks::SIZE),
            read: 0,
            each: &mut each,
        };
        let mut batched = false;
        if let Some(aya::maps::Map::PerCpuLruHashMap(data)) = self.ebpf.map(MAP_FLOWS) {
            let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
            let walk = bpf_sys::percpu_lookup_batch::<FlowKey, FlowValue>(
                data.fd().as_fd(),
                cpus,
                |k, v| chunks.push(k, sum_flow(&k, v.iter())),
            );
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
                let Ok((key, per_cpu)) = item else { continue };
                chunks.push(key, sum_flow(&key, per_cpu.iter()));
            }
        }
        Ok(chunks.finish())
    }

    /// Per-uid totals (not subject to flow eviction).
    pub fn uid_totals(&self) -> Result<HashMap<UidKey, UidTotals>> {
        let map: PerCpuHashMap<&MapData, UidKey, UidTotals> = PerCpuHashMap::try_from(
            self.ebpf
                .map(MAP_UID_TOTALS)
                .context("UID_TOTALS missing")?,
        )?;
        let mut out = HashMap::new();
        for item in map.iter() {
            let Ok((uid, per_cpu)) = item else { continue };
            let mut t = UidTotals::default();
            for v in per_cpu.iter() {
                t.connects += v.connects;
                t.udp_sends += v.udp_sends;
                t.tx_packets += v.tx_packets;
                t.tx_bytes += v.tx_bytes;
            }
            if uid.proto == PROTO_UDP {
                t.udp_sends += t.tx_packets;
            }
            out.insert(uid, t);
        }
        Ok(out)
    }

    /// Health counters summed over CPUs, indexed by `STAT_*`.
    pub fn stats(&self) -> Result<[u64; STAT_COUNT as usize]> {
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map(MAP_STATS).context("STATS missing")?)?;
        let mut out = [0u64; STAT_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = map.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        Ok(out)
    }

    /// The payload ring (taken once by the payload reader).
    pub fn take_payloads(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(MAP_PAYLOADS)
            .context("PAYLOADS map already taken")?;
        Ok(RingBuf::try_from(map)?)
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

/// A flow as read from the kernel, counters summed over CPUs.
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

/// Sums per-CPU flow values: counters add, first_seen is the earliest
/// non-zero stamp, last_seen the latest. skb egress sees one skb per UDP
/// datagram and does not spend an add on `udp_sends` (the sendmsg hooks
/// count them only where skb egress is not attached, when `tx_packets` stays
/// 0): a UDP flow's datagrams are `udp_sends + tx_packets`.
pub fn sum_flow<'a>(key: &FlowKey, values: impl Iterator<Item = &'a FlowValue>) -> FlowValue {
    let mut total = FlowValue::default();
    for v in values {
        total.connects += v.connects;
        total.udp_sends += v.udp_sends;
        total.tx_packets += v.tx_packets;
        total.tx_bytes += v.tx_bytes;
        if v.first_seen != 0 && (total.first_seen == 0 || v.first_seen < total.first_seen) {
            total.first_seen = v.first_seen;
        }
        total.last_seen = total.last_seen.max(v.last_seen);
        total.captured |= v.captured;
    }
    if key.proto == PROTO_UDP {
        total.udp_sends += total.tx_packets;
    }
    total
}

/// What `detach` removed.
#[derive(Debug, Default)]
pub struct DetachReport {
    pub links: Vec<String>,
    pub pins: Vec<String>,
}

/// Detaches every pinned link under `pin_dir` and removes every pin and the
/// directory itself. Programs and maps are freed by the kernel once the last
/// reference (pin, link or agent fd) is gone.
pub fn detach(pin_dir: &Path) -> Result<DetachReport> {
    let mut report = DetachReport::default();
    if !pin_dir.exists() {
        return Ok(report);
    }
    for pin in link_pins(pin_dir) {
        match bpf_sys::obj_get(&pin) {
            Ok(fd) => {
                if let Err(e) = bpf_sys::link_detach(fd.as_fd()) {
                    // Pre-5.9 kernels: removing the last reference detaches.
                    log::debug!("BPF_LINK_DETACH {}: {e}", pin.display());
                }
                let name = pin.file_name().unwrap_or_default().to_string_lossy();
                report
                    .links
                    .push(name.trim_start_matches("link_").to_string());
            }
            Err(e) => log::warn!("opening {}: {e}", pin.display()),
        }
    }
    report.links.extend(crate::tc::remove_filters(pin_dir));
    for entry in std::fs::read_dir(pin_dir)? {
        let entry = entry?;
        std::fs::remove_file(entry.path())
            .with_context(|| format!("removing {}", entry.path().display()))?;
        report
            .pins
            .push(entry.file_name().to_string_lossy().into_owned());
    }
    std::fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    Ok(report)
}
