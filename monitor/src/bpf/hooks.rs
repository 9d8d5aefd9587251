//! The hooks egressmon can attach, which ones to attach by default, and the
//! check that keeps us from ever displacing another owner's program (Android's
//! netd attaches its cgroup programs exclusively at the root cgroup). Where
//! the cgroup skb hooks are held, the tc programs on the interfaces take
//! their place (see `tc`).

use crate::bpf_sys::{self, Attached};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    Connect4,
    Connect6,
    Sendmsg4,
    Sendmsg6,
    SkbEgress,
    SkbIngress,
    TcEgress,
    TcIngress,
}

impl Hook {
    pub const ALL: [Hook; 8] = [
        Hook::Connect4,
        Hook::Connect6,
        Hook::Sendmsg4,
        Hook::Sendmsg6,
        Hook::SkbEgress,
        Hook::SkbIngress,
        Hook::TcEgress,
        Hook::TcIngress,
    ];

    /// Name used on the command line, in status, metrics and pin files.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Connect4 => "connect4",
            Hook::Connect6 => "connect6",
            Hook::Sendmsg4 => "sendmsg4",
            Hook::Sendmsg6 => "sendmsg6",
            Hook::SkbEgress => "skb_egress",
            Hook::SkbIngress => "skb_ingress",
            Hook::TcEgress => "tc_egress",
            Hook::TcIngress => "tc_ingress",
        }
    }

    /// Program (function) name in the eBPF object (the same as the hook's).
    pub(crate) fn program(self) -> &'static str {
        self.name()
    }

    /// `enum bpf_attach_type` value of a cgroup hook (tc hooks attach to
    /// interfaces: see `tc`).
    pub fn attach_type(self) -> u32 {
        match self {
            Hook::TcEgress => 47,  // BPF_TCX_EGRESS
            Hook::TcIngress => 46, // BPF_TCX_INGRESS
            Hook::SkbIngress => 0, // BPF_CGROUP_INET_INGRESS
            Hook::SkbEgress => 1,  // BPF_CGROUP_INET_EGRESS
            Hook::Connect4 => 10,  // BPF_CGROUP_INET4_CONNECT
            Hook::Connect6 => 11,  // BPF_CGROUP_INET6_CONNECT
            Hook::Sendmsg4 => 14,  // BPF_CGROUP_UDP4_SENDMSG
            Hook::Sendmsg6 => 15,  // BPF_CGROUP_UDP6_SENDMSG
        }
    }

    pub(crate) fn parse(name: &str) -> Result<Hook> {
        Hook::ALL
            .into_iter()
            .find(|h| h.name() == name)
            .ok_or_else(|| {
                let known: Vec<_> = Hook::ALL.iter().map(|h| h.name()).collect();
                anyhow::anyhow!("unknown hook `{name}`: choose from {}", known.join(", "))
            })
    }

    pub(crate) fn is_sendmsg(self) -> bool {
        matches!(self, Hook::Sendmsg4 | Hook::Sendmsg6)
    }

    /// Attached to network interfaces, not to the cgroup.
    pub fn is_tc(self) -> bool {
        matches!(self, Hook::TcEgress | Hook::TcIngress)
    }

    /// The cgroup hook a tc hook stands in for.
    pub(crate) fn replaces(self) -> Option<Hook> {
        match self {
            Hook::TcEgress => Some(Hook::SkbEgress),
            Hook::TcIngress => Some(Hook::SkbIngress),
            _ => None,
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses `--hooks a,b,c`.
pub(crate) fn parse_list(list: &str) -> Result<Vec<Hook>> {
    let mut hooks = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let hook = Hook::parse(name)?;
        if !hooks.contains(&hook) {
            hooks.push(hook);
        }
    }
    if hooks.is_empty() {
        let known: Vec<_> = Hook::ALL.iter().map(|h| h.name()).collect();
        bail!(
            "--hooks is empty: name at least one of {}",
            known.join(", ")
        );
    }
    Ok(hooks)
}

/// Someone else's exclusive program on a hook we wanted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Conflict {
    pub(crate) cgroup: PathBuf,
    pub(crate) prog_ids: Vec<u32>,
    pub(crate) prog_names: Vec<String>,
    pub(crate) flags: u32,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who: Vec<String> = self
            .prog_ids
            .iter()
            .zip(&self.prog_names)
            .map(|(id, name)| {
                format!(
                    "program {id} ({})",
                    if name.is_empty() { "unnamed" } else { name }
                )
            })
            .collect();
        let mode = if self.flags & bpf_sys::BPF_F_ALLOW_OVERRIDE != 0 {
            "override-only"
        } else {
            "exclusive"
        };
        write!(
            f,
            "held {mode} by {} at {}",
            who.join(", "),
            self.cgroup.display()
        )
    }
}

fn program_name(id: u32) -> String {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Checks `cgroup` and each ancestor for a program attached to `hook`'s type
/// without BPF_F_ALLOW_MULTI. Attaching below such a program would either be
/// refused by the kernel or (for override mode) hide it from this subtree.
pub(crate) fn netd_conflicts(hook: Hook, lineage: &[PathBuf]) -> Result<Option<Conflict>> {
    if hook.is_tc() {
        return Ok(None);
    }
    for cgroup in lineage {
        let dir = std::fs::File::open(cgroup)?;
        let attached: Attached = match bpf_sys::prog_query(dir.as_fd(), hook.attach_type()) {
            Ok(a) => a,
            // Kernels that do not know this attach type cannot have a holder.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(e) => return Err(e.into()),
        };
        if attached.is_exclusive() {
            let prog_names = attached
                .prog_ids
                .iter()
                .map(|&id| program_name(id))
                .collect();
            return Ok(Some(Conflict {
                cgroup: cgroup.clone(),
                prog_ids: attached.prog_ids,
                prog_names,
                flags: attached.flags,
            }));
        }
    }
    Ok(None)
}

/// What to do with each hook at start.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HookPlan {
    pub(crate) hook: Hook,
    pub(crate) attach: bool,
    /// Why a hook is not attached (skipped, or not selected).
    pub(crate) reason: Option<String>,
    pub(crate) conflict: Option<Conflict>,
    /// Interfaces a tc hook is attached to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) interfaces: Vec<String>,
}

/// Chooses hooks: explicit `--hooks`, or the default set (connect4/6, skb
/// egress and ingress; sendmsg4/6 only when skb egress is held by someone
/// else, since the kernel locks the socket around sendmsg programs; the tc
/// programs only where the skb hook they stand in for is held).
pub(crate) fn plan(explicit: Option<&[Hook]>, cgroup: &Path) -> Result<Vec<HookPlan>> {
    let lineage = crate::bpf::system::cgroup_lineage(cgroup)?;
    let mut conflicts = Vec::new();
    for hook in Hook::ALL {
        conflicts.push((hook, netd_conflicts(hook, &lineage)?));
    }
    let conflict_of = |h: Hook| {
        conflicts
            .iter()
            .find(|(c, _)| *c == h)
            .and_then(|(_, c)| c.clone())
    };
    let skb_free = conflict_of(Hook::SkbEgress).is_none();
    let mut plans = Vec::new();
    for hook in Hook::ALL {
        let wanted = match explicit {
            Some(list) => list.contains(&hook),
            None => match hook.replaces() {
                Some(skb) => conflict_of(skb).is_some(),
                None => !hook.is_sendmsg() || !skb_free,
            },
        };
        let conflict = conflict_of(hook);
        let (attach, reason) = match (&conflict, wanted) {
            (_, false) if explicit.is_some() => {
                (false, Some("not selected by --hooks".to_string()))
            }
            (_, false) if hook.is_tc() => (
                false,
                Some(format!(
                    "not needed: {} is free",
                    hook.replaces().expect("tc hooks replace one")
                )),
            ),
            (_, false) => (
                false,
                Some("not needed: skb_egress counts every UDP datagram".to_string()),
            ),
            (Some(c), true) => (
                false,
                Some(format!(
                    "skipped: {c}; egressmon never replaces another program"
                )),
            ),
            (None, true) => (true, None),
        };
        plans.push(HookPlan {
            hook,
            attach,
            reason,
            conflict,
            interfaces: Vec::new(),
        });
    }
    Ok(plans)
}

/// Which attached hooks feed each counter (status `backends`, metric
/// `egressmon_backend`). A counter no attached hook feeds maps to
/// an empty list: it stays 0.
pub(crate) fn backends(attached: &[Hook]) -> std::collections::BTreeMap<String, Vec<String>> {
    let pick = |candidates: &[Hook]| -> Vec<String> {
        candidates
            .iter()
            .filter(|h| attached.contains(h))
            .map(|h| h.name().to_string())
            .collect()
    };
    let bytes = pick(&[Hook::SkbEgress, Hook::TcEgress]);
    let mut udp = bytes.clone();
    if udp.is_empty() {
        udp = pick(&[Hook::Sendmsg4, Hook::Sendmsg6]);
    }
    let mut connects = pick(&[Hook::Connect4, Hook::Connect6]);
    if connects.is_empty() {
        // First SYNs, where netd holds both connect hooks.
        connects = pick(&[Hook::TcEgress]);
    }
    [
        ("connects", connects),
        ("udp_sends", udp),
        ("tx_packets", bytes.clone()),
        ("tx_bytes", bytes.clone()),
        ("host_sni_http", bytes),
        ("host_dns", pick(&[Hook::SkbIngress, Hook::TcIngress])),
    ]
    .into_iter()
    .map(|(counter, hooks)| (counter.to_string(), hooks))
    .collect()
}

#[cfg(test)]
mod backend_tests {
    use super::*;

    #[test]
    fn tc_stands_in_for_skb() {
        let android = backends(&[
            Hook::Connect4,
            Hook::Connect6,
            Hook::Sendmsg4,
            Hook::Sendmsg6,
            Hook::TcEgress,
            Hook::TcIngress,
        ]);
        assert_eq!(android["tx_bytes"], ["tc_egress"]);
        assert_eq!(android["udp_sends"], ["tc_egress"]);
        assert_eq!(android["host_dns"], ["tc_ingress"]);
        let bare = backends(&[Hook::Sendmsg4]);
        assert!(bare["tx_bytes"].is_empty());
        assert_eq!(bare["udp_sends"], ["sendmsg4"]);
    }
}
