//! The hooks egressmon can attach, which ones to attach by default, and the
//! check that keeps us from ever displacing another owner's program (Android's
//! netd attaches its cgroup programs exclusively at the root cgroup).

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
}

impl Hook {
    pub const ALL: [Hook; 6] = [
        Hook::Connect4,
        Hook::Connect6,
        Hook::Sendmsg4,
        Hook::Sendmsg6,
        Hook::SkbEgress,
        Hook::SkbIngress,
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
        }
    }

    /// Program (function) name in the eBPF object (the same as the hook's).
    pub fn program(self) -> &'static str {
        self.name()
    }

    /// `enum bpf_attach_type` value.
    pub fn attach_type(self) -> u32 {
        match self {
            Hook::SkbIngress => 0, // BPF_CGROUP_INET_INGRESS
            Hook::SkbEgress => 1,  // BPF_CGROUP_INET_EGRESS
            Hook::Connect4 => 10,  // BPF_CGROUP_INET4_CONNECT
            Hook::Connect6 => 11,  // BPF_CGROUP_INET6_CONNECT
            Hook::Sendmsg4 => 14,  // BPF_CGROUP_UDP4_SENDMSG
            Hook::Sendmsg6 => 15,  // BPF_CGROUP_UDP6_SENDMSG
        }
    }

    pub fn parse(name: &str) -> Result<Hook> {
        Hook::ALL
            .into_iter()
            .find(|h| h.name() == name)
            .ok_or_else(|| {
                let known: Vec<_> = Hook::ALL.iter().map(|h| h.name()).collect();
                anyhow::anyhow!("unknown hook `{name}`: choose from {}", known.join(", "))
            })
    }

    pub fn is_skb(self) -> bool {
        matches!(self, Hook::SkbEgress | Hook::SkbIngress)
    }

    pub fn is_sendmsg(self) -> bool {
        matches!(self, Hook::Sendmsg4 | Hook::Sendmsg6)
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses `--hooks a,b,c`.
pub fn parse_list(list: &str) -> Result<Vec<Hook>> {
    let mut hooks = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let hook = Hook::parse(name)?;
        if !hooks.contains(&hook) {
            hooks.push(hook);
        }
    }
    if hooks.is_empty() {
        bail!("--hooks is empty: name at least one of connect4, connect6, sendmsg4, sendmsg6, skb_egress");
    }
    Ok(hooks)
}

/// Someone else's exclusive program on a hook we wanted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub cgroup: PathBuf,
    pub prog_ids: Vec<u32>,
    pub prog_names: Vec<String>,
    pub flags: u32,
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
pub fn netd_conflicts(hook: Hook, lineage: &[PathBuf]) -> Result<Option<Conflict>> {
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
pub struct HookPlan {
    pub hook: Hook,
    pub attach: bool,
    /// Why a hook is not attached (skipped, or not selected).
    pub reason: Option<String>,
    pub conflict: Option<Conflict>,
}

/// Chooses hooks: explicit `--hooks`, or the default set (connect4/6 and skb
/// egress; sendmsg4/6 only when skb egress is held by someone else, since the
/// kernel locks the socket around sendmsg programs).
pub fn plan(explicit: Option<&[Hook]>, cgroup: &Path) -> Result<Vec<HookPlan>> {
    let lineage = crate::system::cgroup_lineage(cgroup)?;
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
            None => !hook.is_sendmsg() || !skb_free,
        };
        let conflict = conflict_of(hook);
        let (attach, reason) = match (&conflict, wanted) {
            (_, false) if explicit.is_some() => {
                (false, Some("not selected by --hooks".to_string()))
            }
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
        });
    }
    Ok(plans)
}
