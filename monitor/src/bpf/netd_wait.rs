//! Waiting for Android's netd before attaching anything (`egressmon
//! wait-netd`, which the Magisk module runs at boot before `egressmon run`).
//!
//! netd attaches its cgroup programs at the root cgroup with
//! BPF_PROG_ATTACH and flags 0 (exclusive). While a multi-attach program
//! (ours) sits on one of those hooks, netd's exclusive attach of it fails
//! and netd aborts: networking breaks. So at boot egressmon starts only once
//! netd's programs are there. netd's signature is an exclusive program on
//! both cgroup_skb hooks (ingress and egress: Android 9 and later, the 12-14
//! and 15+ layouts alike). netd attaches them first and then, on Android 15
//! and later, connect4/6, recvmsg4/6, sendmsg4/6, get/setsockopt,
//! sock_release and bind4/6, in one quick sequence: connect4 and the sendmsg
//! hooks are hooks egressmon would take where they are free. So the wait
//! ends only once the exclusive holders of netd's hooks have stayed the same
//! for [`SETTLE`] after the skb pair appeared, i.e. after netd's whole
//! sequence, whichever release it is.

use crate::bpf_sys::{self, Attached};
use std::fmt;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// How often the cgroup is queried.
pub(crate) const POLL: Duration = Duration::from_millis(150);

/// How long the holders of netd's hooks must stay unchanged, once its skb
/// programs are there, before netd's sequence of attaches counts as done.
/// netd makes them one after the other with nothing slow between them
/// (milliseconds); a second leaves room for a busy boot.
pub(crate) const SETTLE: Duration = Duration::from_secs(1);

/// The cgroup attach types netd attaches on some release, in the order it
/// attaches them (`BpfHandler::initPrograms`), with egressmon's names.
const NETD_HOOKS: [(u32, &str); 14] = [
    (1, "skb_egress"),    // BPF_CGROUP_INET_EGRESS
    (0, "skb_ingress"),   // BPF_CGROUP_INET_INGRESS
    (2, "inet_create"),   // BPF_CGROUP_INET_SOCK_CREATE
    (10, "connect4"),     // BPF_CGROUP_INET4_CONNECT (15+)
    (11, "connect6"),     // BPF_CGROUP_INET6_CONNECT (15+)
    (19, "recvmsg4"),     // BPF_CGROUP_UDP4_RECVMSG (15+)
    (20, "recvmsg6"),     // BPF_CGROUP_UDP6_RECVMSG (15+)
    (14, "sendmsg4"),     // BPF_CGROUP_UDP4_SENDMSG (15+)
    (15, "sendmsg6"),     // BPF_CGROUP_UDP6_SENDMSG (15+)
    (21, "getsockopt"),   // BPF_CGROUP_GETSOCKOPT (15+, kernel 5.4+)
    (22, "setsockopt"),   // BPF_CGROUP_SETSOCKOPT (15+, kernel 5.4+)
    (34, "sock_release"), // BPF_CGROUP_INET_SOCK_RELEASE (15+, kernel 5.10+)
    (8, "bind4"),         // BPF_CGROUP_INET4_BIND (kernel 4.19+)
    (9, "bind6"),         // BPF_CGROUP_INET6_BIND (kernel 4.19+)
];

/// The hooks whose exclusive holders say netd has attached.
const SIGNATURE: [u32; 2] = [1, 0];

/// One of netd's hooks held exclusively at the cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Held {
    pub(crate) attach_type: u32,
    pub(crate) hook: &'static str,
    pub(crate) attached: Attached,
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let programs: Vec<String> = self
            .attached
            .prog_ids
            .iter()
            .map(|&id| {
                // The kernel's name of the program (15 bytes at most).
                match bpf_sys::prog_stats(id).map(|s| s.name) {
                    Ok(name) if !name.is_empty() => format!("program {id} ({name})"),
                    _ => format!("program {id}"),
                }
            })
            .collect();
        let mode = if self.attached.flags & bpf_sys::BPF_F_ALLOW_OVERRIDE != 0 {
            "override-only"
        } else {
            "exclusive"
        };
        write!(f, "{:<12} {}, {mode}", self.hook, programs.join(", "))
    }
}

/// What the wait came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// netd's programs are there and stayed the same for [`SETTLE`]:
    /// `after` is when the last change (or the first sight) was seen.
    Ready { held: Vec<Held>, after: Duration },
    /// The timeout passed first. `held` is what was there at the end;
    /// `settling` says netd's skb programs were there but its hooks were
    /// still changing.
    TimedOut { held: Vec<Held>, settling: bool },
}

/// The exclusive holders of netd's hooks at the cgroup open as `dir`, in
/// netd's order. Attach types the kernel does not know are left out.
pub(crate) fn held(dir: &std::fs::File) -> std::io::Result<Vec<Held>> {
    let mut held = Vec::new();
    for (attach_type, hook) in NETD_HOOKS {
        let attached = match bpf_sys::prog_query(dir.as_fd(), attach_type) {
            Ok(attached) => attached,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(e) => return Err(e),
        };
        if attached.is_exclusive() {
            held.push(Held {
                attach_type,
                hook,
                attached,
            });
        }
    }
    Ok(held)
}

/// Whether `held` carries netd's signature (both skb hooks).
fn netd_attached(held: &[Held]) -> bool {
    SIGNATURE
        .iter()
        .all(|t| held.iter().any(|h| h.attach_type == *t))
}

/// Polls `cgroup` every [`POLL`] until netd's programs are there and have
/// settled, or `timeout` passes (the settling counts within it).
pub(crate) fn wait(cgroup: &Path, timeout: Duration) -> anyhow::Result<Outcome> {
    use anyhow::Context;
    let dir = std::fs::File::open(cgroup)
        .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
    let query = || held(&dir).with_context(|| format!("BPF_PROG_QUERY on {}", cgroup.display()));
    wait_with(query, timeout, SETTLE, POLL)
}

fn wait_with<E>(
    mut query: impl FnMut() -> Result<Vec<Held>, E>,
    timeout: Duration,
    settle: Duration,
    poll: Duration,
) -> Result<Outcome, E> {
    let start = Instant::now();
    let deadline = start + timeout;
    // netd's programs as last seen, and since when they have been so.
    let mut seen: Option<(Vec<Held>, Instant)> = None;
    loop {
        let held = query()?;
        let now = Instant::now();
        if !netd_attached(&held) {
            seen = None;
        } else if seen.as_ref().is_none_or(|(before, _)| *before != held) {
            seen = Some((held.clone(), now));
        }
        if let Some((_, since)) = &seen {
            if now.duration_since(*since) >= settle {
                let after = since.duration_since(start);
                return Ok(Outcome::Ready { held, after });
            }
        }
        if now >= deadline {
            let settling = seen.is_some();
            return Ok(Outcome::TimedOut { held, settling });
        }
        std::thread::sleep(poll.min(deadline - now));
    }
}

/// "1 s", "2.5 s".
pub(crate) fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{s:.1} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(types: &[u32]) -> Vec<Held> {
        NETD_HOOKS
            .iter()
            .filter(|(t, _)| types.contains(t))
            .map(|&(attach_type, hook)| Held {
                attach_type,
                hook,
                attached: Attached {
                    flags: 0,
                    prog_ids: vec![100 + attach_type],
                },
            })
            .collect()
    }

    /// A query that answers `steps` in turn (the last one from then on).
    fn scripted(steps: Vec<Vec<Held>>) -> impl FnMut() -> Result<Vec<Held>, ()> {
        let mut i = 0;
        move || {
            let answer = steps[i.min(steps.len() - 1)].clone();
            i += 1;
            Ok(answer)
        }
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn waits_for_both_skb_hooks_and_for_netds_sequence_to_end() {
        let android15 = hold(&[1, 0, 2, 10, 11, 19, 20, 14, 15]);
        let steps = vec![
            vec![],
            vec![],
            hold(&[1]),       // egress only: not yet
            hold(&[1, 0, 2]), // 12-14 layout so far...
            hold(&[1, 0, 2]),
            android15.clone(), // ...then 15's hooks: settle again
        ];
        let outcome = wait_with(scripted(steps), 5000 * MS, 200 * MS, MS).unwrap();
        match outcome {
            Outcome::Ready { held, .. } => assert_eq!(held, android15),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_holder_that_goes_away_starts_the_wait_over() {
        let steps = vec![hold(&[1, 0]), vec![], hold(&[1])];
        let outcome = wait_with(scripted(steps), 60 * MS, 5 * MS, MS).unwrap();
        assert_eq!(
            outcome,
            Outcome::TimedOut {
                held: hold(&[1]),
                settling: false
            }
        );
    }

    #[test]
    fn still_changing_at_the_deadline_is_a_timeout() {
        let mut n = 0;
        let changing = move || -> Result<Vec<Held>, ()> {
            n += 1;
            let mut held = hold(&[1, 0]);
            held[0].attached.prog_ids = vec![n];
            Ok(held)
        };
        match wait_with(changing, 30 * MS, 20 * MS, MS).unwrap() {
            Outcome::TimedOut { settling, held } => {
                assert!(settling);
                assert_eq!(held.len(), 2);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn multi_attach_programs_are_not_netds() {
        let multi = Attached {
            flags: bpf_sys::BPF_F_ALLOW_MULTI,
            prog_ids: vec![7],
        };
        assert!(!multi.is_exclusive(), "held() keeps exclusive holders only");
        assert!(!netd_attached(&hold(&[1, 2])));
        assert!(netd_attached(&hold(&[0, 1])));
    }

    #[test]
    fn durations_read_as_seconds() {
        assert_eq!(seconds(Duration::from_secs(120)), "120 s");
        assert_eq!(seconds(Duration::from_millis(2500)), "2.5 s");
    }
}
