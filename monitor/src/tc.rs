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
//! to remove (from the same network namespace).
//!
//! What the fallback sees differs from cgroup skb: traffic on the interfaces
//! of the agent's network namespace, not of one cgroup; no loopback traffic
//! (loopback is not watched: it never leaves the device); forwarded
//! (tethered) packets, counted under the kernel's uid since no local socket
//! sent them.

use crate::bpf_sys;
use crate::hooks::Hook;
use anyhow::{anyhow, bail, Context, Result};
use aya::maps::HashMap as BpfHashMap;
use aya::maps::{Array, Map, MapData};
use aya::programs::links::Link;
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::Ebpf;
use monitor_common::{TcFilter, MAP_TC_FILTERS, MAP_TC_L3_OFFSET};
use serde::Serialize;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

const ARPHRD_ETHER: u16 = 1;
const ARPHRD_PPP: u16 = 512;
const ARPHRD_RAWIP: u16 = 519;
const ARPHRD_LOOPBACK: u16 = 772;
const ARPHRD_NONE: u16 = 0xfffe;

/// An interface the tc programs watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    /// Bytes of link header before the IP header.
    pub l3_offset: u32,
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

/// Interfaces of the agent's network namespace to watch: `only` if given
/// (each must exist and have a known link layer), else every interface but
/// loopback with a known link layer.
pub fn interfaces(only: Option<&[String]>) -> Result<Vec<Interface>> {
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
    if let Some(only) = only {
        return only
            .iter()
            .map(|want| {
                let (name, index) = found.iter().find(|(n, _)| n == want).ok_or_else(|| {
                    let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
                    anyhow!(
                        "--tc-ifaces: no interface `{want}` here; there are: {}",
                        names.join(", ")
                    )
                })?;
                let kind = arphrd(name).with_context(|| format!("reading the type of {name}"))?;
                let l3_offset = l3_offset(kind).or((kind == ARPHRD_LOOPBACK).then_some(14));
                let l3_offset = l3_offset.ok_or_else(|| {
                    anyhow!("--tc-ifaces: {name} has link type {kind}, which egressmon cannot parse; name Ethernet, Wi-Fi or raw IP interfaces")
                })?;
                Ok(Interface {
                    name: name.clone(),
                    index: *index,
                    l3_offset,
                })
            })
            .collect();
    }
    Ok(found
        .into_iter()
        .filter_map(|(name, index)| {
            let kind = arphrd(&name).ok()?;
            let l3_offset = l3_offset(kind)?;
            Some(Interface {
                name,
                index,
                l3_offset,
            })
        })
        .collect())
}

/// Whether to attach through TCX links (6.6+) or netlink filters.
/// `EGRESSMON_TC_NETLINK=1` forces netlink (the tests cover both paths).
pub fn use_tcx() -> bool {
    if std::env::var("EGRESSMON_TC_NETLINK").is_ok_and(|v| v == "1") {
        return false;
    }
    crate::system::kernel_version().is_some_and(|v| v >= (6, 6))
}

fn tc_type(hook: Hook) -> TcAttachType {
    match hook {
        Hook::TcIngress => TcAttachType::Ingress,
        _ => TcAttachType::Egress,
    }
}

fn link_pin(pin_dir: &Path, hook: Hook, iface: &str) -> PathBuf {
    pin_dir.join(format!("link_{}_{}", hook.name(), iface))
}

/// The pinned list of netlink filters under `pin_dir`, if there is one.
fn filters_map(pin_dir: &Path) -> Option<Array<MapData, TcFilter>> {
    let data = MapData::from_pin(pin_dir.join(MAP_TC_FILTERS)).ok()?;
    Array::try_from(Map::Array(data)).ok()
}

/// Records a netlink filter in the first free slot.
fn record_filter(ebpf: &mut Ebpf, filter: TcFilter) -> Result<()> {
    let mut map: Array<&mut MapData, TcFilter> = Array::try_from(
        ebpf.map_mut(MAP_TC_FILTERS)
            .context("TC_FILTERS map missing")?,
    )?;
    for slot in 0..map.len() {
        if map.get(&slot, 0).is_ok_and(|f| f.ifindex == 0) {
            map.set(slot, filter, 0)?;
            return Ok(());
        }
    }
    bail!(
        "more than {} tc filters to remember: name fewer interfaces with --tc-ifaces",
        map.len()
    )
}

fn if_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IFNAMSIZ];
    // SAFETY: buf has IFNAMSIZ bytes, as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Loads `hook`'s schedcls program once.
pub fn load(ebpf: &mut Ebpf, hook: Hook) -> Result<()> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(hook.program())
        .with_context(|| format!("program {} missing from the object", hook.program()))?
        .try_into()?;
    if program.fd().is_err() {
        program
            .load()
            .map_err(|e| crate::kernel::verifier_error(hook, e))?;
    }
    Ok(())
}

/// Tells the programs where the IP header starts on `iface`.
pub fn set_l3_offset(ebpf: &mut Ebpf, iface: &Interface) -> Result<()> {
    let mut map: BpfHashMap<_, u32, u32> = BpfHashMap::try_from(
        ebpf.map_mut(MAP_TC_L3_OFFSET)
            .context("TC_L3_OFFSET map missing")?,
    )?;
    map.insert(iface.index, iface.l3_offset, 0)
        .with_context(|| format!("recording {}'s link header length", iface.name))?;
    Ok(())
}

/// Attaches `hook`'s program (loaded) to `iface`, adopting what an earlier
/// agent left there.
pub fn attach(ebpf: &mut Ebpf, hook: Hook, iface: &Interface, pin_dir: &Path) -> Result<()> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(hook.program())
        .with_context(|| format!("program {} missing", hook.program()))?
        .try_into()?;
    if use_tcx() {
        let prog_fd = program.fd()?.try_clone()?;
        let pin = link_pin(pin_dir, hook, &iface.name);
        if pin.exists() {
            let link =
                bpf_sys::obj_get(&pin).with_context(|| format!("opening {}", pin.display()))?;
            let info = bpf_sys::link_info(link.as_fd())?;
            if info.tcx_ifindex() == iface.index {
                bpf_sys::link_update(link.as_fd(), prog_fd.as_fd())
                    .with_context(|| format!("updating the program behind {}", pin.display()))?;
                log::info!("{hook} on {}: adopted pinned link {}", iface.name, info.id);
                return Ok(());
            }
            // The interface went away (or the name moved): start over.
            let _ = bpf_sys::link_detach(link.as_fd());
            std::fs::remove_file(&pin)?;
        }
        let link = bpf_sys::link_create_tcx(prog_fd.as_fd(), iface.index, hook.attach_type())
            .map_err(|e| anyhow!("attaching {hook} to {} (TCX): {e}", iface.name))?;
        bpf_sys::obj_pin(link.as_fd(), &pin)
            .with_context(|| format!("pinning {}", pin.display()))?;
    } else {
        // EEXIST when a clsact qdisc is there already (netd's, or ours).
        let _ = aya::programs::tc::qdisc_add_clsact(&iface.name);
        let id = program
            .attach_with_options(
                &iface.name,
                tc_type(hook),
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .map_err(|e| anyhow!("attaching {hook} to {} (netlink): {e}", iface.name))?;
        let link = program.take_link(id)?;
        let filter = TcFilter {
            ifindex: iface.index,
            ingress: (hook == Hook::TcIngress) as u32,
            priority: link.priority()?.into(),
            handle: link.handle()?.into(),
        };
        // The filter stays when the agent exits; the list lets the next
        // agent or `detach` remove exactly it.
        std::mem::forget(link);
        record_filter(ebpf, filter)?;
    }
    log::info!("{hook}: attached to {}", iface.name);
    Ok(())
}

/// Removes the netlink filters an earlier agent listed (TCX links are
/// adopted instead) and empties the list. Returns what it removed, as
/// `hook/interface`.
pub fn remove_filters(pin_dir: &Path) -> Vec<String> {
    let Some(mut map) = filters_map(pin_dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for slot in 0..map.len() {
        let Ok(filter) = map.get(&slot, 0) else {
            continue;
        };
        if filter.ifindex == 0 {
            continue;
        }
        let (hook, kind) = if filter.ingress == 1 {
            (Hook::TcIngress, TcAttachType::Ingress)
        } else {
            (Hook::TcEgress, TcAttachType::Egress)
        };
        // Gone with its interface otherwise.
        if let Some(iface) = if_name(filter.ifindex) {
            let detached = SchedClassifierLink::attached(
                &iface,
                kind,
                filter.priority as u16,
                TcHandle::from(filter.handle),
                None,
            )
            .map_err(anyhow::Error::from)
            .and_then(|link| link.detach().map_err(anyhow::Error::from));
            match detached {
                Ok(()) => removed.push(format!("{hook}/{iface}")),
                Err(e) => log::debug!("removing the {hook} filter on {iface}: {e}"),
            }
        }
        let _ = map.set(slot, TcFilter::default(), 0);
    }
    removed
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
