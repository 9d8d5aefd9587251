//! Turns the bench's samples into BENCHMARKS.md: one side-by-side table
//! (conditions as columns; per workload the rate, ratios to the bare kernel
//! and to the floor, client CPU per operation, eBPF ns per program run and
//! the agent's CPU share), the machine, the command, the noise seen, and
//! issue 19's targets, each met or missed with the reason computed from the
//! measurements (a ratio target shows the rate ratio, the client-CPU ratio
//! and the programs' run-time prediction side by side). A hand-written section after [`NOTES_MARKER`] is kept when
//! the file is regenerated.

use super::{sys, Condition, Results, Sample, Workload};
use std::collections::BTreeMap;
use std::fmt::Write as _;

const AGENT_SETTLE_SECS: u64 = super::AGENT_SETTLE.as_secs();
const AGENT_IDLE_SECS: u64 = super::AGENT_IDLE.as_secs();

/// Everything from this line on in an existing report is kept as is.
pub const NOTES_MARKER: &str = "<!-- notes: written by hand, kept by cargo xtask bench -->";

pub fn label(c: Condition) -> &'static str {
    match c {
        Condition::Bare => "bare kernel",
        Condition::Floor => "floor: empty programs on the same hooks, skb ingress included",
        Condition::Egressmon => "egressmon",
        Condition::Nftables => "nftables, 20 meta skuid counter rules",
        Condition::Tcpdump => "tcpdump -s 128 -w /dev/null on lo",
    }
}

fn short(c: Condition) -> &'static str {
    match c {
        Condition::Bare => "bare kernel",
        Condition::Floor => "floor (empty programs)",
        Condition::Egressmon => "**egressmon**",
        Condition::Nftables => "nftables 20× skuid",
        Condition::Tcpdump => "tcpdump -s 128",
    }
}

/// Condition names for the console.
pub fn short_plain(c: Condition) -> &'static str {
    short(c).trim_matches('*')
}

fn title(w: Workload) -> &'static str {
    match w {
        Workload::W1 => "W1 TCP connect+close",
        Workload::W1b => "W1b TCP connect+close, both ends hooked",
        Workload::W2 => "W2 iperf3 bulk TCP",
        Workload::W2b => "W2b iperf3 -R bulk TCP download, both ends hooked",
        Workload::W3 => "W3 64-byte UDP sendto",
        Workload::W3b => "W3b 64-byte UDP sendto to another process, both ends hooked",
        Workload::W4 => "W4 short flows, many ports, 4 uids",
    }
}

fn rate_unit(w: Workload) -> &'static str {
    match w {
        Workload::W1 | Workload::W1b | Workload::W4 => "connects/s",
        Workload::W2 | Workload::W2b => "Gbit/s",
        Workload::W3 | Workload::W3b => "datagrams/s",
    }
}

fn op_unit(w: Workload) -> &'static str {
    match w {
        Workload::W1 | Workload::W1b | Workload::W4 => "connect",
        Workload::W2 | Workload::W2b => "MiB",
        Workload::W3 | Workload::W3b => "datagram",
    }
}

fn bulk(w: Workload) -> bool {
    matches!(w, Workload::W2 | Workload::W2b)
}

pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn min_max(values: &[f64]) -> Option<(f64, f64)> {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    Some((
        v.iter().copied().fold(f64::INFINITY, f64::min),
        v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    ))
}

/// 1234567.8 -> "1,234,568".
pub fn grouped(x: f64) -> String {
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 {
        format!("-{out}")
    } else {
        out
    }
}

fn fmt_rate(w: Workload, x: f64) -> String {
    if bulk(w) {
        format!("{:.2}", x / 1e9)
    } else {
        grouped(x)
    }
}

fn fmt_cpu(w: Workload, ns: f64) -> String {
    if bulk(w) {
        format!("{:.0}", ns / 1000.0)
    } else {
        format!("{:.2}", ns / 1000.0)
    }
}

fn spread(values: &[f64], f: impl Fn(f64) -> String) -> String {
    match (median(values), min_max(values)) {
        (Some(m), Some((lo, hi))) => format!("{} [{}–{}]", f(m), f(lo), f(hi)),
        _ => "–".into(),
    }
}

/// One line per sample on the console while the bench runs.
pub fn sample_line(w: Workload, s: &Sample) -> String {
    let mut line = format!(
        "{} {}, {} µs CPU per {}",
        fmt_rate(w, s.rate),
        rate_unit(w),
        fmt_cpu(w, s.cpu_per_op_ns),
        op_unit(w)
    );
    for p in s.progs.iter().filter(|p| p.runs > 0) {
        let _ = write!(
            line,
            ", {} {:.0} ns/run",
            p.hook,
            p.run_ns as f64 / p.runs as f64
        );
    }
    if let (Some(a), Some(settled)) = (s.agent_share, s.agent_settled_share) {
        let _ = write!(
            line,
            ", agent {:.1}% CPU ({:.1}% with the {} s after)",
            a * 100.0,
            settled * 100.0,
            AGENT_SETTLE_SECS
        );
    }
    if let Some(idle) = s.agent_idle_share {
        let _ = write!(line, ", then {:.1}% at rest", idle * 100.0);
    }
    if let Some(r) = s.received {
        let _ = write!(line, ", {} received", pct(r / s.ops));
    }
    line
}

/// Derived numbers, per condition and workload.
struct View<'a> {
    r: &'a Results,
}

impl<'a> View<'a> {
    fn samples(&self, c: Condition, w: Workload) -> &'a [Sample] {
        self.r
            .samples
            .get(&(c, w))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    fn has(&self, w: Workload) -> bool {
        self.r.workloads.contains(&w)
    }

    fn rates(&self, c: Condition, w: Workload) -> Vec<f64> {
        self.samples(c, w).iter().map(|s| s.rate).collect()
    }

    /// Per-round ratios of `c` to `base` (same round, so the machine's
    /// slow and fast spells cancel).
    fn ratios(&self, c: Condition, base: Condition, w: Workload) -> Vec<f64> {
        let base = self.samples(base, w);
        self.samples(c, w)
            .iter()
            .filter_map(|s| {
                let b = base.iter().find(|b| b.round == s.round)?;
                Some(s.rate / b.rate)
            })
            .collect()
    }

    fn ratio(&self, c: Condition, base: Condition, w: Workload) -> Option<f64> {
        median(&self.ratios(c, base, w))
    }

    /// Per-round ratios of client CPU per operation, `base` over `c` (so
    /// that, like a rate ratio, below 1 means `c` costs more). CPU time does
    /// not count the time other processes hold the workload's CPU, so it is
    /// steadier than a rate on a shared machine.
    fn cpu_ratios(&self, c: Condition, base: Condition, w: Workload) -> Vec<f64> {
        let base = self.samples(base, w);
        self.samples(c, w)
            .iter()
            .filter_map(|s| {
                let b = base.iter().find(|b| b.round == s.round)?;
                Some(b.cpu_per_op_ns / s.cpu_per_op_ns)
            })
            .collect()
    }

    fn cpu_ratio(&self, c: Condition, base: Condition, w: Workload) -> Option<f64> {
        median(&self.cpu_ratios(c, base, w))
    }

    /// Per hook: (name, ns per run, runs per operation, runs), summed over rounds.
    fn progs(&self, c: Condition, w: Workload) -> Vec<(String, f64, f64, u64)> {
        let mut by_hook: BTreeMap<(usize, String), (u64, u64)> = BTreeMap::new();
        let mut ops = 0.0;
        for s in self.samples(c, w) {
            ops += s.ops;
            for p in &s.progs {
                let e = by_hook
                    .entry((sys::hook_rank(p.hook), p.hook.to_string()))
                    .or_default();
                e.0 += p.run_ns;
                e.1 += p.runs;
            }
        }
        by_hook
            .into_iter()
            .filter(|(_, (_, runs))| *runs > 0)
            .map(|((_, hook), (ns, runs))| (hook, ns as f64 / runs as f64, runs as f64 / ops, runs))
            .collect()
    }

    /// All programs' run time per operation, ns.
    fn prog_ns_per_op(&self, c: Condition, w: Workload) -> Option<f64> {
        let samples = self.samples(c, w);
        let ops: f64 = samples.iter().map(|s| s.ops).sum();
        let ns: u64 = samples
            .iter()
            .flat_map(|s| s.progs.iter())
            .map(|p| p.run_ns)
            .sum();
        (ops > 0.0).then(|| ns as f64 / ops)
    }

    fn runs_per_op(&self, c: Condition, w: Workload) -> f64 {
        self.progs(c, w).iter().map(|p| p.2).sum()
    }

    /// Mean ns per run of `hook`'s program under `c` over `ws`, and runs.
    fn hook_ns(&self, c: Condition, hook: &str, ws: &[Workload]) -> Option<(f64, u64)> {
        let mut ns = 0u64;
        let mut runs = 0u64;
        for &w in ws {
            for s in self.samples(c, w) {
                for p in s.progs.iter().filter(|p| p.hook == hook) {
                    ns += p.run_ns;
                    runs += p.runs;
                }
            }
        }
        (runs > 0).then(|| (ns as f64 / runs as f64, runs))
    }

    fn agent_shares(&self, w: Workload) -> Vec<f64> {
        self.samples(Condition::Egressmon, w)
            .iter()
            .filter_map(|s| s.agent_share)
            .collect()
    }

    /// The agent's share from the workload's start until its work settled.
    fn agent_settled_shares(&self, w: Workload) -> Vec<f64> {
        self.samples(Condition::Egressmon, w)
            .iter()
            .filter_map(|s| s.agent_settled_share)
            .collect()
    }

    /// W4: the agent's share at rest with its flow map full.
    fn agent_idle_shares(&self, w: Workload) -> Vec<f64> {
        self.samples(Condition::Egressmon, w)
            .iter()
            .filter_map(|s| s.agent_idle_share)
            .collect()
    }

    fn agent_hwm(&self) -> Option<u64> {
        self.r
            .samples
            .iter()
            .filter(|((c, _), _)| *c == Condition::Egressmon)
            .flat_map(|(_, v)| v.iter().filter_map(|s| s.agent_hwm))
            .max()
    }

    /// Peak RSS of the agent over one workload (a fresh agent each time).
    fn agent_hwms(&self, w: Workload) -> Vec<f64> {
        self.samples(Condition::Egressmon, w)
            .iter()
            .filter_map(|s| s.agent_hwm.map(|b| b as f64 / 1048576.0))
            .collect()
    }
}

fn table(v: &View) -> String {
    let r = v.r;
    let mut t = String::new();
    t.push_str("| |");
    for c in Condition::ALL {
        let _ = write!(t, " {} |", short(c));
    }
    t.push_str("\n|---|");
    for _ in Condition::ALL {
        t.push_str("---|");
    }
    t.push('\n');
    let mut row = |name: String, cell: &dyn Fn(Condition) -> String| {
        let _ = write!(t, "| {name} |");
        for c in Condition::ALL {
            let _ = write!(t, " {} |", cell(c));
        }
        t.push('\n');
    };
    for &w in &r.workloads {
        row(
            format!("**{}**: {}, median [min–max]", title(w), rate_unit(w)),
            &|c| spread(&v.rates(c, w), |x| fmt_rate(w, x)),
        );
        row(format!("{w} ratio to bare, per round"), &|c| {
            if c == Condition::Bare {
                "1".into()
            } else {
                spread(&v.ratios(c, Condition::Bare, w), |x| format!("{x:.3}"))
            }
        });
        row(format!("{w} ratio to floor, per round"), &|c| match c {
            Condition::Bare => "–".into(),
            Condition::Floor => "1".into(),
            _ => spread(&v.ratios(c, Condition::Floor, w), |x| format!("{x:.3}")),
        });
        row(
            format!("{w} ratio to bare by client CPU per {}", op_unit(w)),
            &|c| {
                if c == Condition::Bare {
                    "1".into()
                } else {
                    spread(&v.cpu_ratios(c, Condition::Bare, w), |x| format!("{x:.3}"))
                }
            },
        );
        row(
            format!("{w} ratio to floor by client CPU per {}", op_unit(w)),
            &|c| match c {
                Condition::Bare => "–".into(),
                Condition::Floor => "1".into(),
                _ => spread(&v.cpu_ratios(c, Condition::Floor, w), |x| format!("{x:.3}")),
            },
        );
        row(
            format!("{w} predicted from eBPF run times (programs only)"),
            &|c| match (c, predicted(v, w)) {
                (Condition::Floor, Some(p)) => {
                    format!("{:.3} of bare", p.op_bare / (p.op_bare + p.f))
                }
                (Condition::Egressmon, Some(p)) => format!(
                    "{:.3} of floor, {:.3} of bare<br>(+{:.0} ns per {})",
                    p.vs_floor(),
                    p.vs_bare(),
                    p.e - p.f,
                    op_unit(w)
                ),
                _ => "–".into(),
            },
        );
        row(format!("{w} client CPU, µs per {}", op_unit(w)), &|c| {
            let cpu: Vec<f64> = v.samples(c, w).iter().map(|s| s.cpu_per_op_ns).collect();
            spread(&cpu, |x| fmt_cpu(w, x))
        });
        if w == Workload::W3b {
            row(
                format!("{w} received by the other process, of sent"),
                &|c| {
                    let got: Vec<f64> = v
                        .samples(c, w)
                        .iter()
                        .filter_map(|s| Some(s.received? / s.ops))
                        .collect();
                    spread(&got, pct)
                },
            );
        }
        row(
            format!("{w} eBPF ns per run (runs per {})", op_unit(w)),
            &|c| {
                let progs = v.progs(c, w);
                if progs.is_empty() {
                    return "–".into();
                }
                progs
                    .iter()
                    .map(|(hook, ns, per_op, runs)| {
                        if *per_op >= 0.01 {
                            format!("{hook} {} ({per_op:.2})", grouped(*ns))
                        } else {
                            // A handful of runs (iperf3's two connects): cold caches.
                            format!(
                                "{hook} {} ({} runs in all)",
                                grouped(*ns),
                                grouped(*runs as f64)
                            )
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("<br>")
            },
        );
        row(format!("{w} agent CPU (% of one core: during the workload; from its start to {AGENT_SETTLE_SECS} s after its end), peak RSS"), &|c| {
            if c != Condition::Egressmon {
                return "–".into();
            }
            let during = spread(&v.agent_shares(w), |x| format!("{:.1}%", x * 100.0));
            let settled = spread(&v.agent_settled_shares(w), |x| format!("{:.1}%", x * 100.0));
            let mut cpu = format!("{during}; {settled}");
            let idle = v.agent_idle_shares(w);
            if !idle.is_empty() {
                let idle = spread(&idle, |x| format!("{:.1}%", x * 100.0));
                let _ = write!(cpu, "<br>then at rest, the flow map full, for {AGENT_IDLE_SECS} s: {idle}");
            }
            let lost: f64 = v.samples(c, w).iter().filter_map(|s| s.events_lost).sum();
            let rss = spread(&v.agent_hwms(w), |x| format!("{x:.1}"));
            let mut cell = format!("{cpu}<br>peak RSS {rss} MiB");
            if lost > 0.0 {
                let _ = write!(cell, "<br>new-flow events lost: {}", grouped(lost));
            }
            cell
        });
    }
    row(
        "agent peak RSS (VmHWM, max over rounds)".into(),
        &|c| match (c, v.agent_hwm()) {
            (Condition::Egressmon, Some(b)) => format!("{:.1} MiB", b as f64 / 1048576.0),
            _ => "–".into(),
        },
    );
    t
}

struct Target {
    what: String,
    measured: String,
    met: Option<bool>,
    note: String,
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// The issue-19 targets, in its order.
fn targets(v: &View) -> Vec<Target> {
    use Condition::{Bare, Floor};
    use Workload::{W1b, W2b, W3b, W1, W2, W3, W4};
    let mut out = vec![ratio_target(v, W1, Bare, 0.97)];
    for w in [W1b, W3b] {
        out.push(ratio_target(v, w, Floor, 0.97));
        out.push(ratio_target(v, w, Bare, 0.93));
    }
    for (w, goal) in [(W2, 0.98), (W2b, 0.98), (W3, 0.95)] {
        out.push(ratio_target(v, w, Bare, goal));
    }
    out.push(prediction_target(v, W3, 0.98));
    out.push(ratio_target(v, W4, Bare, 0.95));
    out.push(connect4_target(v, 400.0));
    out.push(over_floor_target(v, "skb_egress", W3, 30.0, "on W3"));
    out.push(over_floor_target(
        v,
        "skb_ingress",
        W3b,
        10.0,
        "for non-DNS packets (W3b: every datagram received)",
    ));
    out.push(events_lost_target(v));
    out.push(agent_cpu_target(v, W4));
    out.push(agent_rss_target(v));
    for w in [W1, W3] {
        for rival in [Condition::Nftables, Condition::Tcpdump] {
            out.push(rival_target(v, w, rival));
        }
    }
    out
}

/// egressmon's rate over `base`'s on `w` ≥ `goal` (the verdict), with the
/// client-CPU ratio and the programs' run-time prediction beside it.
fn ratio_target(v: &View, w: Workload, base: Condition, goal: f64) -> Target {
    let floor = base == Condition::Floor;
    let what = format!(
        "{w} egressmon / {} ≥ {goal}",
        if floor { "floor" } else { "bare" }
    );
    let Some(r) = v
        .has(w)
        .then(|| v.ratio(Condition::Egressmon, base, w))
        .flatten()
    else {
        return not_measured(what);
    };
    let cpu = v.cpu_ratio(Condition::Egressmon, base, w);
    let from_runs = predicted(v, w).map(|p| if floor { p.vs_floor() } else { p.vs_bare() });
    let mut note = match (r < goal, floor) {
        (false, _) => String::new(),
        (true, true) => floor_miss(v, w, r, goal),
        (true, false) => bare_miss(v, w, r, goal),
    };
    cross_check(&mut note, r, cpu, from_runs, goal);
    Target {
        what,
        measured: measured_ratio(r, cpu, from_runs),
        met: Some(r >= goal),
        note,
    }
}

/// The run times' prediction against the floor ≥ `goal` (the verdict): the
/// programs' own cost, which this shared machine's noise hardly moves.
fn prediction_target(v: &View, w: Workload, goal: f64) -> Target {
    let what = format!("{w} run-time prediction ≥ {goal} of the floor");
    let Some(p) = v.has(w).then(|| predicted(v, w)).flatten() else {
        return not_measured(what);
    };
    let pr = p.vs_floor();
    let mut measured = format!("from eBPF run times {pr:.3}");
    if let Some(r) = v.ratio(Condition::Egressmon, Condition::Floor, w) {
        let _ = write!(measured, "<br>rate {r:.3}");
    }
    if let Some(c) = v.cpu_ratio(Condition::Egressmon, Condition::Floor, w) {
        let _ = write!(measured, "<br>by client CPU {c:.3}");
    }
    let note = if pr < goal {
        floor_miss(v, w, pr, goal)
    } else {
        format!(
            "egressmon's programs run {:+.0} ns per {u} beyond the empty ones, on {:.0} ns of \
             client CPU per {u} at the floor. The rate and CPU ratios are shown for reference.",
            p.e - p.f,
            p.op_floor,
            u = op_unit(w)
        )
    };
    Target {
        what,
        measured,
        met: Some(pr >= goal),
        note,
    }
}

/// connect4 on a new flow, judged by its mean over W4 (new flows and
/// repeats mixed), with W1's (one flow over and over) beside it.
fn connect4_target(v: &View, goal: f64) -> Target {
    let what = format!("connect4 on a new flow ≤ {goal:.0} ns per run (W4's mean)");
    if !v.has(Workload::W4) {
        return not_measured(what);
    }
    let Some((ns, runs)) = v.hook_ns(Condition::Egressmon, "connect4", &[Workload::W4]) else {
        return no_runs(what, "connect4", Workload::W4);
    };
    let w1 = v.hook_ns(Condition::Egressmon, "connect4", &[Workload::W1]);
    let measured = format!(
        "W4 {ns:.0} ns<br>W1 {} (one flow)",
        w1.map_or("not measured".into(), |(n, _)| format!("{n:.0} ns"))
    );
    let s = v.r.sizes;
    let per_uid = s.w4_connects as f64 / 4.0;
    let first = (s.w4_destinations as f64 / per_uid).min(1.0);
    let mut note = format!(
        "W4's mean over {} runs: each uid connects {} times over {} destinations ({:.1} \
         passes), so {} of the connects are a first contact and the rest repeat one (new again \
         only if the flow was evicted meanwhile). W1 connects to one destination throughout: \
         connect4 on a known flow. The empty program: {}.",
        grouped(runs as f64),
        grouped(per_uid),
        grouped(s.w4_destinations as f64),
        per_uid / s.w4_destinations as f64,
        pct(first),
        hook_floor_text(v, "connect4", Workload::W4)
    );
    if ns > goal {
        note = format!("Missed by {:.0} ns. {note}", ns - goal);
    }
    Target {
        what,
        measured,
        met: Some(ns <= goal),
        note,
    }
}

/// `hook`'s ns per run under egressmon minus the empty program's on `w`,
/// ≤ `goal` ns.
fn over_floor_target(v: &View, hook: &str, w: Workload, goal: f64, scope: &str) -> Target {
    let what = format!("{hook} ≤ floor + {goal:.0} ns per run {scope}");
    if !v.has(w) {
        return not_measured(what);
    }
    let (Some((e, runs)), Some((f, _))) = (
        v.hook_ns(Condition::Egressmon, hook, &[w]),
        v.hook_ns(Condition::Floor, hook, &[w]),
    ) else {
        return no_runs(what, hook, w);
    };
    let extra = e - f;
    let ops: f64 = v
        .samples(Condition::Egressmon, w)
        .iter()
        .map(|s| s.ops)
        .sum();
    let mut note = format!(
        "{w}: {} runs counted ({:.2} per {}).",
        grouped(runs as f64),
        runs as f64 / ops.max(1.0),
        op_unit(w)
    );
    if extra > goal {
        note = format!("Missed by {:.0} ns. {note}", extra - goal);
    }
    Target {
        what,
        measured: format!("{extra:+.0} ns<br>({e:.0} ns − floor {f:.0} ns)"),
        met: Some(extra <= goal),
        note,
    }
}

fn hook_floor_text(v: &View, hook: &str, w: Workload) -> String {
    v.hook_ns(Condition::Floor, hook, &[w])
        .map_or("–".into(), |(f, _)| format!("{f:.0} ns"))
}

/// No new-flow event lost in W4 (egressmon_events_lost_total of a fresh
/// agent after each run).
fn events_lost_target(v: &View) -> Target {
    let what = "new-flow events lost: 0 in W4".to_string();
    if !v.has(Workload::W4) {
        return not_measured(what);
    }
    let lost: Vec<f64> = v
        .samples(Condition::Egressmon, Workload::W4)
        .iter()
        .filter_map(|s| s.events_lost)
        .collect();
    let Some((_, max)) = min_max(&lost) else {
        return Target {
            what,
            measured: "no metric".into(),
            met: None,
            note: "The agent's /metrics had no egressmon_events_lost_total.".into(),
        };
    };
    let total: f64 = lost.iter().sum();
    let s = v.r.sizes;
    let flows = (u64::from(s.w4_destinations) * 4).min(s.w4_connects);
    let mut note = format!(
        "egressmon_events_lost_total of a fresh agent after each W4 run, summed over {} \
         rounds; W4 makes {} flows per round.",
        lost.len(),
        grouped(flows as f64)
    );
    if total > 0.0 {
        note = format!("Missed: at most {} lost in one round. {note}", grouped(max));
    }
    Target {
        what,
        measured: grouped(total),
        met: Some(total == 0.0),
        note,
    }
}

fn agent_cpu_target(v: &View, w: Workload) -> Target {
    let what = format!("agent < 5% of one core during {w}");
    let shares = v.agent_settled_shares(w);
    let during = median(&v.agent_shares(w));
    let (Some(m), Some((_, hi))) = (median(&shares), min_max(&shares)) else {
        return not_measured(what);
    };
    let during = during.map_or_else(|| "not measured".into(), pct);
    Target {
        what,
        measured: format!(
            "{} (max {}) from the workload's start to {AGENT_SETTLE_SECS} s after its end<br>\
             {during} during the workload alone",
            pct(m),
            pct(hi)
        ),
        met: Some(m < 0.05),
        note: if m < 0.05 {
            format!(
                "Median over rounds; /proc/PID/stat ticks (10 ms) from the workload's start to \
                 {AGENT_SETTLE_SECS} s after its end (the agent writes history every 10 s), over \
                 that time."
            )
        } else {
            format!(
                "Missed by {} of a core (median). New flows drive it: the agent drains the \
                 new-flow ring, reads the flow map and writes history.",
                pct(m - 0.05)
            )
        },
    }
}

fn agent_rss_target(v: &View) -> Target {
    let what = "agent peak RSS < 32 MiB".to_string();
    let Some(b) = v.agent_hwm() else {
        return not_measured(what);
    };
    let mib = b as f64 / 1048576.0;
    let per: Vec<String> =
        v.r.workloads
            .iter()
            .filter_map(|&w| {
                let m = median(&v.agent_hwms(w))?;
                Some(format!("{w} {m:.1} MiB"))
            })
            .collect();
    let per = format!(
        "VmHWM of a fresh agent per workload, median over rounds: {}.",
        per.join(", ")
    );
    Target {
        what,
        measured: format!("{mib:.1} MiB"),
        met: Some(mib < 32.0),
        note: if mib < 32.0 {
            per
        } else {
            format!(
                "Missed by {:.1} MiB (max over all rounds). {per} The agent's memory grows with \
                 the flows it tracks.",
                mib - 32.0
            )
        },
    }
}

/// egressmon ahead of `rival` on `w`, both against the bare kernel.
fn rival_target(v: &View, w: Workload, rival: Condition) -> Target {
    let what = format!("egressmon beats {} on {w}", short(rival));
    let (Some(e), Some(x)) = (
        v.has(w)
            .then(|| v.ratio(Condition::Egressmon, Condition::Bare, w))
            .flatten(),
        v.has(w)
            .then(|| v.ratio(rival, Condition::Bare, w))
            .flatten(),
    ) else {
        return not_measured(what);
    };
    let ce = v.cpu_ratio(Condition::Egressmon, Condition::Bare, w);
    let cx = v.cpu_ratio(rival, Condition::Bare, w);
    let mut measured = format!("{e:.3} vs {x:.3} of bare");
    if let (Some(ce), Some(cx)) = (ce, cx) {
        let _ = write!(measured, "<br>by client CPU {ce:.3} vs {cx:.3}");
    }
    let mut note = if e > x {
        String::new()
    } else {
        format!(
            "Missed: egressmon is {:.1}% slower than {} here.",
            (1.0 - e / x) * 100.0,
            short(rival)
        )
    };
    if let (Some(ce), Some(cx)) = (ce, cx) {
        if (ce > cx) != (e > x) {
            if !note.is_empty() {
                note.push(' ');
            }
            let _ = write!(
                note,
                "By client CPU per operation the order is the other way round \
                 ({ce:.3} vs {cx:.3}): within this machine's noise."
            );
        }
    }
    Target {
        what,
        measured,
        met: Some(e > x),
        note,
    }
}

fn measured_ratio(rate: f64, cpu: Option<f64>, from_runs: Option<f64>) -> String {
    let mut m = format!("{rate:.3}");
    if let Some(c) = cpu {
        let _ = write!(m, "<br>by client CPU {c:.3}");
    }
    if let Some(p) = from_runs {
        let _ = write!(m, "<br>from eBPF run times {p:.3}");
    }
    m
}

/// Says so when the CPU-time ratio, or the ratio the programs' run times
/// predict, disagrees with the rate ratio on a target.
fn cross_check(note: &mut String, rate: f64, cpu: Option<f64>, from_runs: Option<f64>, goal: f64) {
    let verdict = |x: f64| if x >= goal { "met" } else { "missed" };
    let mut add = |text: String| {
        if !note.is_empty() {
            note.push(' ');
        }
        note.push_str(&text);
    };
    if let Some(cpu) = cpu.filter(|c| (*c >= goal) != (rate >= goal)) {
        add(format!(
            "By client CPU per operation, which other processes on the shared CPU do not \
             inflate, the ratio is {cpu:.3}: the target would be {}.",
            verdict(cpu)
        ));
    }
    if let Some(p) = from_runs.filter(|p| (*p >= goal) != (rate >= goal)) {
        add(format!(
            "The programs' measured run times alone predict {p:.3}: the target would be {}. \
             Trust that more than a rate ratio on this shared machine.",
            verdict(p)
        ));
    }
}

fn not_measured(what: String) -> Target {
    Target {
        what,
        measured: "not measured".into(),
        met: None,
        note: "Workload not part of this run.".into(),
    }
}

/// The workload ran but no run of `hook` was counted (not attached, or
/// bpf_stats off).
fn no_runs(what: String, hook: &str, w: Workload) -> Target {
    Target {
        what,
        measured: "no runs counted".into(),
        met: None,
        note: format!("No {hook} program run was counted in {w} (egressmon or floor)."),
    }
}

/// What the measured program run times alone predict: the programs' time
/// per operation (egressmon, empty programs) against the client's CPU time
/// per operation. Noise on a shared machine moves rates and CPU times by
/// tens of percent between rounds; ns per run and runs per operation hardly.
struct Predicted {
    /// egressmon's programs, ns per operation.
    e: f64,
    /// The empty programs, ns per operation.
    f: f64,
    /// Client CPU per operation at the floor and on the bare kernel (medians).
    op_floor: f64,
    op_bare: f64,
}

impl Predicted {
    fn vs_floor(&self) -> f64 {
        self.op_floor / (self.op_floor + self.e - self.f)
    }

    fn vs_bare(&self) -> f64 {
        self.op_bare / (self.op_bare + self.e)
    }
}

fn predicted(v: &View, w: Workload) -> Option<Predicted> {
    let cpu = |c: Condition| -> Option<f64> {
        median(
            &v.samples(c, w)
                .iter()
                .map(|s| s.cpu_per_op_ns)
                .collect::<Vec<_>>(),
        )
    };
    Some(Predicted {
        e: v.prog_ns_per_op(Condition::Egressmon, w)?,
        f: v.prog_ns_per_op(Condition::Floor, w).unwrap_or(0.0),
        op_floor: cpu(Condition::Floor)?,
        op_bare: cpu(Condition::Bare)?,
    })
}

/// Why egressmon/floor on `w` is `r` < `goal`, from the programs' measured
/// run times, and how much they must shrink.
fn floor_miss(v: &View, w: Workload, r: f64, goal: f64) -> String {
    let mut note = format!("Missed by {:.3}. ", goal - r);
    let Some(p) = predicted(v, w) else {
        return note;
    };
    let extra = p.e - p.f;
    let allowed = p.op_floor * (1.0 / goal - 1.0);
    let _ = write!(
        note,
        "egressmon's programs run {e:.0} ns per {u}, the empty ones {f:.0} ns: {extra:+.0} ns on \
         {op:.0} ns of client CPU per {u} at the floor, which alone predicts {pr:.3}. Meeting \
         {goal} allows at most {allowed:.0} ns of program work per {u} beyond the empty programs",
        e = p.e,
        f = p.f,
        op = p.op_floor,
        pr = p.vs_floor(),
        u = op_unit(w)
    );
    note + &cut_text(v, w, extra - allowed)
}

/// The end of a miss note: how much the programs must shrink to make up
/// `over` ns per operation, or, when their run times already fit, where
/// the rest of the gap lies.
fn cut_text(v: &View, w: Workload, over: f64) -> String {
    let u = op_unit(w);
    if over <= 0.0 {
        return ": the programs' run times fit; the rest of the gap is the hooks' dispatch, the \
                agent or this machine's noise."
            .into();
    }
    let runs = v.runs_per_op(Condition::Egressmon, w).max(1e-9);
    format!(
        ": {over:.0} ns less per {u}, about {per:.0} ns less per program run ({runs:.1} runs per \
         {u}).",
        per = over / runs
    )
}

/// Why egressmon/bare on `w` is `r` < `goal`.
fn bare_miss(v: &View, w: Workload, r: f64, goal: f64) -> String {
    let mut note = format!("Missed by {:.3}.", goal - r);
    let Some(p) = predicted(v, w) else {
        return note;
    };
    let allowed = p.op_bare * (1.0 / goal - 1.0);
    let _ = write!(
        note,
        " The programs alone take {e:.0} ns per {u} (the empty ones {f:.0} ns) on {op:.0} ns of \
         client CPU per {u} on the bare kernel: {pr:.3} predicted from run times, before the \
         hooks' own dispatch and the agent. Meeting {goal} leaves at most {allowed:.0} ns per {u} \
         for hooks and programs together",
        e = p.e,
        f = p.f,
        op = p.op_bare,
        pr = p.vs_bare(),
        u = op_unit(w)
    );
    note + &cut_text(v, w, p.e - allowed)
}

fn machine() -> (String, String, String) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    (nproc, model, kernel)
}

pub fn markdown(r: &Results, previous: &str) -> String {
    let v = View { r };
    let (nproc, model, kernel) = machine();
    let mut m = String::new();
    m.push_str("# egressmon benchmarks\n\n");
    m.push_str(
        "Generated by `cargo xtask bench` (xtask/src/bench.rs); everything above the notes \
         section is rewritten by each run.\n\n",
    );
    if r.quick {
        m.push_str("**Quick run (`--quick`): a harness check with small workloads, not a measurement.**\n\n");
    }
    let _ = writeln!(
        m,
        "- Machine: {nproc} vCPUs, {model}, Linux {kernel}; workload pinned to CPU {} (client and \
         server), the bench itself kept off it; the agent, tcpdump and everyone else's processes \
         float.",
        r.cpu
    );
    let _ = writeln!(m, "- Command: `{}`", r.command);
    let _ = writeln!(
        m,
        "- Run: {}, {} rounds, {:.1} min. In each round every workload runs under the five \
         conditions back to back (each set up fresh: a new agent with empty maps, new programs, \
         rules or capture), in an order that rotates from round to round; ratios are taken \
         within a round, then the median (and min–max) over rounds.",
        r.started,
        r.rounds,
        r.duration.as_secs_f64() / 60.0
    );
    m.push_str(&workloads_text(r));
    let _ = writeln!(
        m,
        "- Conditions: {}. Hooks attached by egressmon: {}; by the floor: {}. The floor's empty \
         programs sit on every hook egressmon attaches, skb ingress included, for every \
         workload; skb ingress runs for what the bench cgroup's sockets receive: the client's \
         SYN-ACK and FIN in W1 and W4, the upload's ACKs in W2, nothing in W3, every packet \
         received in W1b, W2b and W3b. The agent runs `egressmon run --cgroup <bench cgroup> \
         --pin-dir <own> --listen <own> --state-dir <own>` (history on) and is scraped (GET /metrics) once a second: {} \
         scrapes answered, {} failed.",
        Condition::ALL.map(label).join("; "),
        list_or_dash(&r.egressmon_hooks),
        list_or_dash(&r.floor_hooks),
        r.scrapes_ok,
        r.scrapes_failed
    );
    let _ = writeln!(
        m,
        "- eBPF ns per run: kernel.bpf_stats_enabled=1 for the whole run (it was {}; restored), \
         run_time_ns/run_cnt deltas of the programs on the bench cgroup. bpf_stats adds two clock \
         reads per program run to the hooked conditions (floor and egressmon alike).{}",
        r.stats_sysctl_previous,
        if r.stats_lapses > 0 {
            format!(
                " Someone else switched it off {} time(s) during the run; those samples have no \
                 run times.",
                r.stats_lapses
            )
        } else {
            String::new()
        }
    );
    m.push('\n');
    m.push_str("## Results\n\n");
    m.push_str(&table(&v));
    m.push_str(
        "\nRatios above 1 mean faster than the reference. Client CPU: user + system time of the \
         generator (iperf3 client for W2 and W2b; sender and receiver processes for W3b) per \
         operation, from getrusage around the traffic loop (softirq work done in its context \
         counts as its system time). Agent CPU: utime + stime from /proc/PID/stat over the \
         workload's wall time, and from the workload's start until 12 s after its end over \
         that time (the agent writes history every 10 s: what the workload left it to write \
         is counted in the second figure, which the target judges).\n\n",
    );
    m.push_str("## Noise\n\n");
    let busy: Vec<String> = r
        .cpu_busy
        .iter()
        .enumerate()
        .map(|(i, b)| format!("CPU{i} {}", pct(*b)))
        .collect();
    let _ = writeln!(
        m,
        "- Machine busy over the run (all processes, ours included): {}; load average {} at the \
         start, {} at the end. Other engineers' builds and tests share these 2 vCPUs.",
        busy.join(", "),
        r.loadavg_start,
        r.loadavg_end
    );
    for &w in &r.workloads {
        let bare = v.rates(Condition::Bare, w);
        if let (Some(med), Some((lo, hi))) = (median(&bare), min_max(&bare)) {
            let _ = writeln!(
                m,
                "- {w}: bare kernel rounds spread {:.3}–{:.3} of their median; floor/bare \
                 per-round ratios {}.",
                lo / med,
                hi / med,
                spread(
                    &v.ratios(Condition::Floor, Condition::Bare, w),
                    |x| format!("{x:.3}")
                )
            );
        }
    }
    if r.foreign_programs.is_empty() {
        m.push_str(
            "- No other cgroup program ran for the bench's traffic (checked at every condition).\n",
        );
    } else {
        let _ = writeln!(
            m,
            "- Programs attached above the bench cgroup by someone else ran for its traffic in \
             every condition: {}.",
            r.foreign_programs.join(", ")
        );
    }
    m.push_str("\n## Targets (issue 19)\n\n| target | measured | result | why / what would close it |\n|---|---|---|---|\n");
    for t in targets(&v) {
        let result = match t.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "–",
        };
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} |",
            t.what, t.measured, result, t.note
        );
    }
    m.push('\n');
    match previous.find(NOTES_MARKER) {
        Some(at) => m.push_str(&previous[at..]),
        None => {
            m.push_str(NOTES_MARKER);
            m.push_str("\n\n## Notes\n\n(None yet.)\n");
        }
    }
    m
}

/// The report's "Workloads" item: what each workload does, at this run's
/// sizes, and where its two ends sit.
fn workloads_text(r: &Results) -> String {
    let s = r.sizes;
    let n = |x: u64| grouped(x as f64);
    let w4_destinations = if s.w4_addrs > 1 {
        format!(
            "{} destinations ({} ports × {} loopback addresses: RLIMIT_NOFILE's hard limit here \
             does not allow one listener per destination)",
            n(u64::from(s.w4_destinations)),
            n(u64::from(s.w4_ports)),
            s.w4_addrs
        )
    } else {
        format!("{} destination ports", n(u64::from(s.w4_destinations)))
    };
    format!(
        "- Workloads, on loopback in the bench's own network namespace: W1 {} TCP connect+close \
         (accepted in-process, closed by the server, then RST by the client); W1b {} of the same \
         with the listener and the accepting side hooked too; W2 iperf3 -t {} bulk TCP upload; \
         W2b iperf3 -R -t {} bulk TCP download (the server sends), server and client both \
         hooked; W3 {} × 64-byte UDP sendto on an unconnected socket, received in-process; W3b \
         {} × the same to a receiving process of its own on port 9100, both hooked and on the \
         workload CPU (the rate is the sender's, the client CPU both processes'); W4 {} \
         connects over {} from 4 uids ({} flows). In W1–W4 the client side runs in the bench \
         cgroup, where egressmon and the empty programs attach, and the server side \
         (listeners, receiving socket, iperf3 -s) in an unhooked sibling cgroup, standing in \
         for a remote peer. The \"b\" workloads put both ends in the bench cgroup, as on a \
         phone, where every socket, sender and receiver alike, sits under the watched cgroup; \
         their server ports (9000, 5201, 9100) lie outside the ephemeral range, so the server's \
         replies key as one inbound flow per client address. nftables' output chain and \
         tcpdump on lo, set up as users set them up, see both directions.\n",
        n(s.w1_connects),
        n(s.w1b_connects),
        s.w2_secs,
        s.w2b_secs,
        n(s.w3_datagrams),
        n(s.w3b_datagrams),
        n(s.w4_connects),
        w4_destinations,
        n((u64::from(s.w4_destinations) * 4).min(s.w4_connects)),
    )
}

fn list_or_dash(v: &[String]) -> String {
    if v.is_empty() {
        "–".into()
    } else {
        v.join(", ")
    }
}

/// Every sample, one line each, for a second look at a run.
pub fn samples_tsv(r: &Results) -> String {
    let mut t = String::from(
        "condition\tworkload\tround\tops\trate\tcpu_ns_per_op\tagent_share\tagent_settled_share\tagent_idle_share\tagent_hwm\tevents_lost\treceived\tprograms\n",
    );
    for ((c, w), samples) in &r.samples {
        for s in samples {
            let progs: Vec<String> = s
                .progs
                .iter()
                .map(|p| format!("{}:{}ns/{}", p.hook, p.run_ns, p.runs))
                .collect();
            let opt = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v}"));
            let _ = writeln!(
                t,
                "{}\t{w}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                short_plain(*c),
                s.round + 1,
                s.ops,
                s.rate,
                s.cpu_per_op_ns,
                opt(s.agent_share),
                opt(s.agent_settled_share),
                opt(s.agent_idle_share),
                opt(s.agent_hwm.map(|b| b as f64)),
                opt(s.events_lost),
                opt(s.received),
                progs.join(" ")
            );
        }
    }
    t
}

/// The table and the targets, for the terminal.
pub fn console_summary(r: &Results) -> String {
    let v = View { r };
    let mut s = String::from("\n");
    s.push_str(&table(&v));
    s.push('\n');
    for t in targets(&v) {
        let result = match t.met {
            Some(true) => "met   ",
            Some(false) => "MISSED",
            None => "  –   ",
        };
        let _ = writeln!(s, "{result} {}: {}", t.what, t.measured);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{ProgRun, Sizes};

    fn sample(round: usize, rate: f64, progs: &[(&'static str, u64, u64)]) -> Sample {
        Sample {
            round,
            ops: 1000.0,
            rate,
            cpu_per_op_ns: 1e9 / rate,
            progs: progs
                .iter()
                .map(|&(hook, run_ns, runs)| ProgRun { hook, run_ns, runs })
                .collect(),
            events_lost: Some(0.0),
            received: Some(1000.0),
            ..Default::default()
        }
    }

    /// W3b only: bare 1000/s, floor 990/s, egressmon 960/s; skb_ingress
    /// 40 ns empty, 48 ns in egressmon.
    fn w3b_results() -> Results {
        let mut samples = BTreeMap::new();
        let w = Workload::W3b;
        samples.insert((Condition::Bare, w), vec![sample(0, 1000.0, &[])]);
        samples.insert(
            (Condition::Floor, w),
            vec![sample(
                0,
                990.0,
                &[("skb_egress", 40_000, 1000), ("skb_ingress", 40_000, 1000)],
            )],
        );
        samples.insert(
            (Condition::Egressmon, w),
            vec![sample(
                0,
                960.0,
                &[("skb_egress", 100_000, 1000), ("skb_ingress", 48_000, 1000)],
            )],
        );
        Results {
            samples,
            workloads: vec![w],
            rounds: 1,
            sizes: Sizes::new(true),
            quick: true,
            cpu: 1,
            command: String::new(),
            started: String::new(),
            duration: std::time::Duration::ZERO,
            loadavg_start: String::new(),
            loadavg_end: String::new(),
            cpu_busy: Vec::new(),
            foreign_programs: Vec::new(),
            egressmon_hooks: Vec::new(),
            floor_hooks: Vec::new(),
            scrapes_ok: 0,
            scrapes_failed: 0,
            stats_sysctl_previous: "0".into(),
            stats_lapses: 0,
        }
    }

    #[test]
    fn issue_19_targets() {
        let r = w3b_results();
        let ts = targets(&View { r: &r });
        let find = |what: &str| ts.iter().find(|t| t.what == what).unwrap();
        let floor = find("W3b egressmon / floor ≥ 0.97");
        assert_eq!(floor.met, Some(false));
        assert!(floor.measured.starts_with("0.970"), "{}", floor.measured);
        // 68 ns of program work on 1 ms per datagram: not the programs.
        assert!(floor.note.contains("run times fit"), "{}", floor.note);
        assert_eq!(find("W3b egressmon / bare ≥ 0.93").met, Some(true));
        let ingress =
            find("skb_ingress ≤ floor + 10 ns per run for non-DNS packets (W3b: every datagram received)");
        assert_eq!(ingress.met, Some(true));
        assert!(
            ingress.measured.starts_with("+8 ns"),
            "{}",
            ingress.measured
        );
        // Workloads not run.
        assert_eq!(find("W1 egressmon / bare ≥ 0.97").measured, "not measured");
        assert_eq!(find("skb_egress ≤ floor + 30 ns per run on W3").met, None);
        assert_eq!(find("new-flow events lost: 0 in W4").met, None);
        let text = markdown(&r, "");
        assert!(text.contains("## Targets (issue 19)"));
        assert!(text.contains("W3b received by the other process, of sent"));
        assert!(text.contains("skb_ingress 48 (1.00)"));
    }

    #[test]
    fn medians_and_grouping() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(grouped(1234567.4), "1,234,567");
        assert_eq!(grouped(999.0), "999");
        assert_eq!(grouped(1000.0), "1,000");
    }
}
