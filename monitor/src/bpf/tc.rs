//! The tc fallback. Where another program holds the cgroup skb hooks
//! exclusively (Android's netd does, at the root cgroup), egressmon runs its
//! `tc_egress` and `tc_ingress` programs on the network interfaces instead:
//! schedcls programs, attached after whatever is there and returning "no
//! verdict", so netd's own tc filters (clat, tethering) run as before.
//!
//! On kernels with TCX (6.6+) each attachment is a link pinned in the pin
//! directory (`link_tc_egress_<interface>`), adopted by the next agent with an
//! atomic program swap, like the cgroup links. Before 6.6 they are netlink
//! filters on a `clsact` qdisc; those outlive the agent on their own, so a
//! pinned map (`TC_FILTERS`) lists them for the next agent and for `detach`
//! to remove (from the same network namespace). A slot is taken before its
//! filter is added, so no filter of ours is ever unlisted for long; and the
//! list is not trusted alone: each interface's filters are read back, and a
//! filter is egressmon's when it carries a program's name and its program
//! uses egressmon's pinned maps. The next agent swaps the program of each
//! filter in place (same priority and handle), so counting never stops and
//! no packet is counted twice.
//!
//! Interfaces are followed by index: one deleted and made again under the
//! same name (a VPN's tun0) is a new interface, attached at the next refresh;
//! the slots, pins and `TC_L3_OFFSET` entries of interfaces that went away
//! are freed.
//!
//! What the fallback sees differs from cgroup skb: traffic on the interfaces
//! of the agent's network namespace, not of one cgroup; no loopback traffic
//! (loopback is not watched: it never leaves the device); forwarded
//! (tethered) packets, counted under the kernel's uid since no local socket
//! sent them.

mod netlink;

use crate::bpf::hooks::Hook;
use crate::bpf::pins::PinDir;
use crate::bpf_sys;
use anyhow::{anyhow, bail, Context, Result};
use aya::maps::HashMap as BpfHashMap;
use aya::maps::{Array, Map, MapData};
use aya::programs::SchedClassifier;
use aya::Ebpf;
use monitor_common::*;
use netlink::{BpfFilter, Side};
use serde::Serialize;
use std::borrow::BorrowMut;
use std::collections::{BTreeMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};

const ARPHRD_ETHER: u16 = 1;
const ARPHRD_PPP: u16 = 512;
const ARPHRD_RAWIP: u16 = 519;
const ARPHRD_LOOPBACK: u16 = 772;
const ARPHRD_NONE: u16 = 0xfffe;

/// An interface the tc programs watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Interface {
    pub(crate) name: String,
    pub(crate) index: u32,
    /// Bytes of link header before the IP header.
    pub(crate) l3_offset: u32,
}

/// The link header length for an ARPHRD type, for the types whose packets
/// the programs can read (Ethernet and Wi-Fi; raw IP such as rmnet_data,
/// tun and ppp).
fn l3_offset(arphrd: u16) -> Option<u32> {
    match arphrd {
        ARPHRD_ETHER => Some(14),
        ARPHRD_RAWIP | ARPHRD_NONE | ARPHRD_PPP => Some(0),
        _ => None,
    }
}

/// The ARPHRD type of interface `name` in the calling thread's namespace.
fn arphrd(name: &str) -> std::io::Result<u16> {
    // SAFETY: a plain socket used for one ioctl, closed by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; the name is NUL terminated within IFNAMSIZ.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SIOCGIFHWADDR as _,
            &mut req,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
}

/// Every interface of the calling thread's namespace, as (name, index).
fn list() -> Result<Vec<(String, u32)>> {
    let mut found = Vec::new();
    // SAFETY: if_nameindex returns an array ended by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            bail!(
                "listing network interfaces: {}",
                std::io::Error::last_os_error()
            );
        }
        let mut entry = list;
        while (*entry).if_index != 0 {
            let name = std::ffi::CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            found.push((name, (*entry).if_index));
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    Ok(found)
}

/// Interface `name` with its link header length; an error for a link layer
/// the programs cannot read. Loopback only when `named` (by --tc-ifaces).
fn describe(name: &str, index: u32, named: bool) -> Result<Interface> {
    let kind = arphrd(name).with_context(|| format!("reading the type of {name}"))?;
    let l3_offset = l3_offset(kind).or((named && kind == ARPHRD_LOOPBACK).then_some(14));
    let l3_offset = l3_offset.ok_or_else(|| {
        anyhow!("--tc-ifaces: {name} has link type {kind}, which egressmon cannot parse; name Ethernet, Wi-Fi or raw IP interfaces")
    })?;
    Ok(Interface {
        name: name.to_string(),
        index,
        l3_offset,
    })
}

/// Interfaces of the agent's network namespace to watch: `only` if given
/// (each must exist and have a known link layer), else every interface but
/// loopback with a known link layer.
pub(crate) fn interfaces(only: Option<&[String]>) -> Result<Vec<Interface>> {
    let found = list()?;
    let Some(only) = only else {
        return Ok(present_of(&found, None));
    };
    only.iter()
        .map(|want| {
            let (name, index) = found.iter().find(|(n, _)| n == want).ok_or_else(|| {
                let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
                anyhow!(
                    "--tc-ifaces: no interface `{want}` here; there are: {}",
                    names.join(", ")
                )
            })?;
            describe(name, *index, true)
        })
        .collect()
}

/// The interfaces to watch now, for a refresh: as `interfaces`, but an
/// interface named in `only` that is missing (or unreadable) is left out
/// until it is back.
pub(crate) fn present(only: Option<&[String]>) -> Result<Vec<Interface>> {
    Ok(present_of(&list()?, only))
}

fn present_of(found: &[(String, u32)], only: Option<&[String]>) -> Vec<Interface> {
    found
        .iter()
        .filter(|(name, _)| only.is_none_or(|only| only.contains(name)))
        .filter_map(|(name, index)| describe(name, *index, only.is_some()).ok())
        .collect()
}

/// Whether to attach through TCX links (6.6+) or netlink filters.
/// `EGRESSMON_TC_NETLINK=1` forces netlink (the tests cover both paths).
pub(crate) fn use_tcx() -> bool {
    if std::env::var("EGRESSMON_TC_NETLINK").is_ok_and(|v| v == "1") {
        return false;
    }
    crate::bpf::system::kernel_version().is_some_and(|v| v >= (6, 6))
}

const TC_HOOKS: [Hook; 2] = [Hook::TcEgress, Hook::TcIngress];

fn side(hook: Hook) -> Side {
    match hook {
        Hook::TcIngress => Side::Ingress,
        _ => Side::Egress,
    }
}

/// Loads `hook`'s schedcls program once.
pub(crate) fn load(ebpf: &mut Ebpf, hook: Hook) -> Result<()> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(hook.program())
        .with_context(|| format!("program {} missing from the object", hook.program()))?
        .try_into()?;
    if program.fd().is_err() {
        program
            .load()
            .map_err(|e| crate::bpf::kernel::verifier_error(hook, e))?;
    }
    Ok(())
}

/// `hook`'s loaded program: a descriptor of it, and its id.
fn program(ebpf: &Ebpf, hook: Hook) -> Result<(OwnedFd, u32)> {
    let program: &SchedClassifier = ebpf
        .program(hook.program())
        .with_context(|| format!("program {} missing", hook.program()))?
        .try_into()?;
    let fd = program.fd()?.as_fd().try_clone_to_owned()?;
    Ok((fd, program.info()?.id()))
}

/// Tells the programs where the IP header starts on `iface`.
fn set_l3_offset(ebpf: &mut Ebpf, iface: &Interface) -> Result<()> {
    let mut map = l3_offsets(ebpf)?;
    map.insert(iface.index, iface.l3_offset, 0)
        .with_context(|| format!("recording {}'s link header length", iface.name))?;
    Ok(())
}

fn l3_offsets(ebpf: &mut Ebpf) -> Result<BpfHashMap<&mut MapData, u32, u32>> {
    Ok(BpfHashMap::try_from(
        ebpf.map_mut(MAP_TC_L3_OFFSET)
            .context("TC_L3_OFFSET map missing")?,
    )?)
}

/// Tells egressmon's tc filters from anyone else's: a filter is egressmon's
/// when it is named after one of its programs and its program uses one of
/// the maps pinned in the pin directory. The name alone is not enough
/// (`tc_egress` is a common name), nor is the list in `TC_FILTERS` (a filter
/// can be added and the agent stopped before it is listed).
#[derive(Debug, Default, Clone)]
pub(crate) struct Ownership {
    map_ids: Vec<u32>,
}

impl Ownership {
    pub(crate) fn of_pins(pins: &PinDir) -> Ownership {
        Ownership {
            map_ids: pins.program_map_ids(),
        }
    }

    /// Whether `filter` runs egressmon's `hook` program: this agent's
    /// (`current`, its id) or one an earlier agent loaded.
    fn owns(&self, hook: Hook, filter: &BpfFilter, current: Option<u32>) -> bool {
        if filter.name != hook.program() {
            return false;
        }
        if Some(filter.prog_id) == current {
            return true;
        }
        bpf_sys::prog_map_ids(filter.prog_id)
            .is_ok_and(|ids| ids.iter().any(|id| self.map_ids.contains(id)))
    }
}

/// The pinned list of netlink filters (`TC_FILTERS`): one slot per filter,
/// `ifindex` 0 when free, `handle` 0 while its filter is being added.
struct FilterTable<T> {
    map: Array<T, TcFilter>,
}

fn table(ebpf: &mut Ebpf) -> Result<FilterTable<&mut MapData>> {
    let map = ebpf
        .map_mut(MAP_TC_FILTERS)
        .context("TC_FILTERS map missing")?;
    Ok(FilterTable {
        map: Array::try_from(map)?,
    })
}

/// The pinned list under `pins`, if there is one.
fn pinned_table(pins: &PinDir) -> Option<FilterTable<MapData>> {
    let data = MapData::from_pin(pins.map(MAP_TC_FILTERS)).ok()?;
    let map = Array::try_from(Map::Array(data)).ok()?;
    Some(FilterTable { map })
}

fn entry(ifindex: u32, hook: Hook, filter: Option<&BpfFilter>) -> TcFilter {
    TcFilter {
        ifindex,
        ingress: u32::from(hook == Hook::TcIngress),
        priority: filter.map_or(0, |f| f.priority.into()),
        handle: filter.map_or(0, |f| f.handle),
    }
}

fn hook_of(entry: &TcFilter) -> Hook {
    if entry.ingress == 1 {
        Hook::TcIngress
    } else {
        Hook::TcEgress
    }
}

fn lists(entry: &TcFilter, filter: &BpfFilter) -> bool {
    entry.priority == u32::from(filter.priority) && entry.handle == filter.handle
}

impl<T: BorrowMut<MapData>> FilterTable<T> {
    /// Every slot in use, with its entry.
    fn used(&self) -> Vec<(u32, TcFilter)> {
        (0..self.map.len())
            .filter_map(|slot| Some((slot, self.map.get(&slot, 0).ok()?)))
            .filter(|(_, entry)| entry.ifindex != 0)
            .collect()
    }

    /// The slots of `hook` on interface `ifindex`.
    fn of(&self, ifindex: u32, hook: Hook) -> Vec<(u32, TcFilter)> {
        self.used()
            .into_iter()
            .filter(|(_, e)| e.ifindex == ifindex && hook_of(e) == hook)
            .collect()
    }

    /// Takes a free slot for `entry`.
    fn reserve(&mut self, entry: TcFilter) -> Result<u32> {
        for slot in 0..self.map.len() {
            if self.map.get(&slot, 0).is_ok_and(|e| e.ifindex == 0) {
                self.map.set(slot, entry, 0)?;
                return Ok(slot);
            }
        }
        bail!(
            "all {} slots of the tc filter list are taken: a filter egressmon could not list \
             would escape `detach`, so none is added; name fewer interfaces with --tc-ifaces",
            self.map.len()
        )
    }

    fn set(&mut self, slot: u32, entry: TcFilter) -> Result<()> {
        Ok(self.map.set(slot, entry, 0)?)
    }

    fn free(&mut self, slot: u32) {
        let _ = self.map.set(slot, TcFilter::default(), 0);
    }
}

/// Makes sure `hook`'s program (loaded) runs on `iface` exactly once
/// through a netlink filter listed in `TC_FILTERS`: takes over a filter of
/// ours that is there (swapping its program in place), removes any second
/// one, or adds one.
fn ensure_filter(
    ebpf: &mut Ebpf,
    hook: Hook,
    iface: &Interface,
    ownership: &Ownership,
) -> Result<()> {
    let (prog, prog_id) = program(ebpf, hook)?;
    if let Err(e) = netlink::add_clsact(iface.index) {
        // Adding the filter says what is wrong.
        log::debug!("adding a clsact qdisc to {}: {e}", iface.name);
    }
    let found = netlink::filters(iface.index, side(hook))
        .with_context(|| format!("listing the tc filters of {}", iface.name))?;
    let ours: Vec<BpfFilter> = found
        .into_iter()
        .filter(|f| ownership.owns(hook, f, Some(prog_id)))
        .collect();
    let mut table = table(ebpf)?;
    let listed = table.of(iface.index, hook);
    let keeper = ours
        .iter()
        .find(|f| listed.iter().any(|(_, e)| lists(e, f)))
        .or(ours.first())
        .cloned();
    for extra in ours.iter().filter(|f| Some(*f) != keeper.as_ref()) {
        // A second filter of ours would count every packet twice.
        netlink::delete(iface.index, side(hook), extra)
            .with_context(|| format!("removing a second {hook} filter from {}", iface.name))?;
        log::info!(
            "{hook} on {}: removed a second filter of ours (priority {}, handle {:#x})",
            iface.name,
            extra.priority,
            extra.handle
        );
    }
    let filter = match keeper {
        Some(filter) => filter,
        None => return add_filter(&mut table, hook, iface, &listed, prog),
    };
    keep_listed(&mut table, hook, iface, &filter, &listed)?;
    if filter.prog_id != prog_id {
        netlink::replace(
            iface.index,
            side(hook),
            &filter,
            prog.as_fd(),
            hook.program(),
        )
        .map_err(|e| {
            anyhow!(
                "swapping the program of {hook}'s filter on {}: {e}",
                iface.name
            )
        })?;
        log::info!(
            "{hook} on {}: took over the filter of an earlier run (priority {}, handle {:#x}), program swapped in place",
            iface.name,
            filter.priority,
            filter.handle
        );
    }
    Ok(())
}

/// Lists `filter` (ours, on `iface`) in exactly one slot; a filter that
/// cannot be listed is removed.
fn keep_listed<T: BorrowMut<MapData>>(
    table: &mut FilterTable<T>,
    hook: Hook,
    iface: &Interface,
    filter: &BpfFilter,
    listed: &[(u32, TcFilter)],
) -> Result<()> {
    let slot = match listed
        .iter()
        .find(|(_, e)| lists(e, filter))
        .or(listed.first())
    {
        Some((slot, _)) => Ok(*slot),
        None => table.reserve(entry(iface.index, hook, Some(filter))),
    };
    let recorded = slot.and_then(|slot| {
        table
            .set(slot, entry(iface.index, hook, Some(filter)))
            .map(|()| slot)
    });
    let slot = match recorded {
        Ok(slot) => slot,
        Err(e) => {
            let _ = netlink::delete(iface.index, side(hook), filter);
            return Err(e.context(format!("listing the {hook} filter on {}", iface.name)));
        }
    };
    for (other, _) in listed.iter().filter(|(other, _)| *other != slot) {
        table.free(*other);
    }
    Ok(())
}

/// Adds a filter running `prog` on `iface`: its slot is taken first and
/// filled in after, and the filter is removed again if it cannot be.
fn add_filter<T: BorrowMut<MapData>>(
    table: &mut FilterTable<T>,
    hook: Hook,
    iface: &Interface,
    listed: &[(u32, TcFilter)],
    prog: OwnedFd,
) -> Result<()> {
    let pending = entry(iface.index, hook, None);
    let slot = match listed.first() {
        Some((slot, _)) => {
            table.set(*slot, pending)?;
            *slot
        }
        None => table.reserve(pending)?,
    };
    for (stale, _) in listed.iter().skip(1) {
        table.free(*stale);
    }
    let filter = match netlink::add(iface.index, side(hook), prog.as_fd(), hook.program()) {
        Ok(filter) => filter,
        Err(e) => {
            table.free(slot);
            bail!("attaching {hook} to {} (netlink): {e}", iface.name);
        }
    };
    if let Err(e) = table.set(slot, entry(iface.index, hook, Some(&filter))) {
        let _ = netlink::delete(iface.index, side(hook), &filter);
        table.free(slot);
        return Err(e.context(format!("listing the {hook} filter on {}", iface.name)));
    }
    log::info!(
        "{hook}: attached to {} (netlink filter, priority {}, handle {:#x})",
        iface.name,
        filter.priority,
        filter.handle
    );
    Ok(())
}

/// Removes egressmon's netlink filters from every interface of the calling
/// thread's namespace, except `hook`'s on the interfaces `keep` names, and
/// frees their slots. A filter goes when its slot lists it or when it is
/// ours by `ownership`. Returns what it removed, as `hook/interface`.
fn remove_filters_except<T: BorrowMut<MapData>>(
    table: &mut FilterTable<T>,
    ownership: &Ownership,
    keep: impl Fn(Hook, u32) -> bool,
) -> Vec<String> {
    let mut removed = Vec::new();
    for (name, index) in list().unwrap_or_default() {
        for hook in TC_HOOKS.into_iter().filter(|&h| !keep(h, index)) {
            let listed = table.of(index, hook);
            let Ok(found) = netlink::filters(index, side(hook)) else {
                continue;
            };
            for filter in found {
                let in_list =
                    filter.name == hook.program() && listed.iter().any(|(_, e)| lists(e, &filter));
                if !in_list && !ownership.owns(hook, &filter, None) {
                    continue;
                }
                match netlink::delete(index, side(hook), &filter) {
                    Ok(()) => removed.push(format!("{hook}/{name}")),
                    Err(e) => log::debug!("removing the {hook} filter on {name}: {e}"),
                }
            }
        }
    }
    // The rest are gone with their interfaces.
    for (slot, entry) in table.used() {
        if !keep(hook_of(&entry), entry.ifindex) {
            table.free(slot);
        }
    }
    removed
}

/// Removes the netlink filters an earlier agent made (listed, or found on
/// an interface and ours) and empties the list: for `detach`. TCX links are
/// pins, removed with the others. Returns what it removed, as
/// `hook/interface`.
pub(crate) fn remove_filters(pins: &PinDir) -> Vec<String> {
    let Some(mut table) = pinned_table(pins) else {
        return Vec::new();
    };
    remove_filters_except(&mut table, &Ownership::of_pins(pins), |_, _| false)
}

/// Makes sure `hook`'s program (loaded) runs on `iface` through the TCX link
/// pinned for it: adopts the pinned link (swapping its program atomically),
/// or makes one when there is none or it belongs to an interface that went
/// away.
fn ensure_link(ebpf: &Ebpf, hook: Hook, iface: &Interface, pins: &PinDir) -> Result<()> {
    let (prog, prog_id) = program(ebpf, hook)?;
    let pin = pins.tc_link(hook, &iface.name);
    if pin.exists() {
        let link = bpf_sys::obj_get(&pin).with_context(|| format!("opening {}", pin.display()))?;
        let info = bpf_sys::link_info(link.as_fd())?;
        if info.tcx_ifindex() == iface.index {
            if info.prog_id != prog_id {
                bpf_sys::link_update(link.as_fd(), prog.as_fd())
                    .with_context(|| format!("updating the program behind {}", pin.display()))?;
                log::info!("{hook} on {}: adopted pinned link {}", iface.name, info.id);
            }
            return Ok(());
        }
        // Its interface went away, or another one has the name now.
        let _ = bpf_sys::link_detach(link.as_fd());
        std::fs::remove_file(&pin)?;
    }
    // Until pinned, the link lives by this descriptor: if pinning fails,
    // dropping it detaches the link, so nothing unlisted stays behind.
    let link = bpf_sys::link_create_tcx(prog.as_fd(), iface.index, hook.attach_type())
        .map_err(|e| anyhow!("attaching {hook} to {} (TCX): {e}", iface.name))?;
    bpf_sys::obj_pin(link.as_fd(), &pin).with_context(|| format!("pinning {}", pin.display()))?;
    log::info!("{hook}: attached to {} (TCX link)", iface.name);
    Ok(())
}

/// Removes the pinned TCX link of `hook` on `iface` (gone), unless the pin
/// now holds the link of another interface that took the name.
fn remove_link_of(pins: &PinDir, hook: Hook, iface: &Interface) {
    let pin = pins.tc_link(hook, &iface.name);
    let Ok(link) = bpf_sys::obj_get(&pin) else {
        return;
    };
    let index = bpf_sys::link_info(link.as_fd()).map_or(0, |info| info.tcx_ifindex());
    if index == 0 || index == iface.index {
        let _ = bpf_sys::link_detach(link.as_fd());
        let _ = std::fs::remove_file(&pin);
    }
}

/// Where the tc hooks are attached: for each hook, the interfaces by index.
#[derive(Debug, Default)]
pub(crate) struct Attachments {
    attached: BTreeMap<(Hook, u32), Interface>,
    /// Attachments that failed and were logged (once, until they work).
    failing: HashSet<(Hook, u32)>,
    ownership: Ownership,
}

impl Attachments {
    /// For the agent whose maps are pinned in `pins`.
    pub(crate) fn new(pins: &PinDir) -> Attachments {
        Attachments {
            ownership: Ownership::of_pins(pins),
            ..Attachments::default()
        }
    }

    /// The names of the interfaces `hook` is attached to.
    pub(crate) fn names(&self, hook: Hook) -> Vec<String> {
        self.attached
            .iter()
            .filter(|((h, _), _)| *h == hook)
            .map(|(_, iface)| iface.name.clone())
            .collect()
    }

    /// Attaches `hook` (loaded) to each of `ifaces`; returns the errors.
    pub(crate) fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        hook: Hook,
        ifaces: &[Interface],
        pins: &PinDir,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        for iface in ifaces {
            if let Err(e) = self.ensure(ebpf, hook, iface, pins) {
                // Logged by the caller: refreshes stay quiet until it works.
                self.failing.insert((hook, iface.index));
                errors.push(format!("{e:#}"));
            }
        }
        errors
    }

    /// Follows the interfaces `present` now: forgets those that went away,
    /// attaches to new ones (and to ones made again under an old name: they
    /// have a new index), and puts back a filter or link someone removed.
    pub(crate) fn refresh(
        &mut self,
        ebpf: &mut Ebpf,
        hook: Hook,
        present: &[Interface],
        pins: &PinDir,
    ) {
        let gone: Vec<Interface> = self
            .attached
            .iter()
            .filter(|((h, index), _)| *h == hook && !present.iter().any(|p| p.index == *index))
            .map(|(_, iface)| iface.clone())
            .collect();
        for iface in &gone {
            self.forget(ebpf, hook, iface, pins);
        }
        for iface in present {
            let key = (hook, iface.index);
            match self.ensure(ebpf, hook, iface, pins) {
                Ok(()) => {
                    if self.failing.remove(&key) {
                        log::info!("hook {hook}: attached to {} now", iface.name);
                    }
                }
                Err(err) => {
                    if self.failing.insert(key) {
                        log::warn!("hook {hook} on {}: {err:#}", iface.name);
                    }
                }
            }
        }
        self.failing
            .retain(|(h, index)| *h != hook || present.iter().any(|p| p.index == *index));
    }

    fn ensure(
        &mut self,
        ebpf: &mut Ebpf,
        hook: Hook,
        iface: &Interface,
        pins: &PinDir,
    ) -> Result<()> {
        let key = (hook, iface.index);
        set_l3_offset(ebpf, iface)?;
        let result = if use_tcx() {
            if let Some(old) = self.attached.get(&key).filter(|old| old.name != iface.name) {
                // Renamed: the pin follows, so its link is adopted, not doubled.
                let _ = std::fs::rename(
                    pins.tc_link(hook, &old.name),
                    pins.tc_link(hook, &iface.name),
                );
            }
            ensure_link(ebpf, hook, iface, pins)
        } else {
            ensure_filter(ebpf, hook, iface, &self.ownership)
        };
        match result {
            Ok(()) => self.attached.insert(key, iface.clone()),
            Err(_) => self.attached.remove(&key),
        };
        result
    }

    /// `iface` went away, and its filters or links with it: frees what
    /// listed them.
    fn forget(&mut self, ebpf: &mut Ebpf, hook: Hook, iface: &Interface, pins: &PinDir) {
        self.attached.remove(&(hook, iface.index));
        if use_tcx() {
            remove_link_of(pins, hook, iface);
        } else if let Ok(mut table) = table(ebpf) {
            for (slot, _) in table.of(iface.index, hook) {
                table.free(slot);
            }
        }
        log::info!("{hook}: {} (index {}) went away", iface.name, iface.index);
    }

    /// Drops the `TC_L3_OFFSET` entries of interfaces no hook is attached to.
    pub(crate) fn prune_l3_offsets(&self, ebpf: &mut Ebpf) {
        let Ok(mut map) = l3_offsets(ebpf) else {
            return;
        };
        let stale: Vec<u32> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|index| !self.attached.keys().any(|(_, i)| i == index))
            .collect();
        for index in stale {
            let _ = map.remove(&index);
        }
    }

    /// Once this run has attached: removes what earlier runs left that it
    /// did not take over (hooks not planned now, interfaces no longer
    /// watched or gone, the other attach method), so nothing counts twice.
    pub(crate) fn sweep(&self, ebpf: &mut Ebpf, pins: &PinDir) {
        let tcx = use_tcx();
        for (hook, name, pin) in pins.tc_links() {
            let taken = tcx
                && self
                    .attached
                    .iter()
                    .any(|((h, _), iface)| *h == hook && iface.name == name);
            if taken {
                continue;
            }
            crate::bpf::pins::remove_link(&pin);
            log::info!("removed the {hook} link of an earlier run on {name}");
        }
        let Ok(mut table) = table(ebpf) else {
            return;
        };
        let keep = |hook, index| !tcx && self.attached.contains_key(&(hook, index));
        for removed in remove_filters_except(&mut table, &self.ownership, keep) {
            log::info!("removed the tc filter {removed} of an earlier run");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers_by_type() {
        assert_eq!(l3_offset(ARPHRD_ETHER), Some(14));
        assert_eq!(l3_offset(ARPHRD_RAWIP), Some(0));
        assert_eq!(l3_offset(ARPHRD_NONE), Some(0));
        assert_eq!(l3_offset(ARPHRD_LOOPBACK), None);
        assert_eq!(l3_offset(778), None);
    }

    #[test]
    fn loopback_is_not_watched_by_default() {
        let all = interfaces(None).unwrap();
        assert!(all.iter().all(|i| i.name != "lo"));
        let lo = interfaces(Some(&["lo".to_string()])).unwrap();
        assert_eq!(lo[0].l3_offset, 14);
        let err = interfaces(Some(&["egm-none0".to_string()])).unwrap_err();
        assert!(
            err.to_string().contains("no interface `egm-none0`"),
            "{err}"
        );
    }
}
