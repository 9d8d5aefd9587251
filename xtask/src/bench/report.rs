//! Turns the bench's samples into BENCHMARKS.md: one side-by-side table
//! (conditions as columns; per workload the rate, ratios to the bare kernel
//! and to the floor, client CPU per operation, eBPF ns per program run and
//! the agent's CPU share), the machine, the command, the noise seen, and the
//! issue's targets, each met or missed with the reason computed from the
//! measurements. A hand-written section after [`NOTES_MARKER`] is kept when
//! the file is regenerated.

use super::{sys, Condition, Results, Sample, Workload};
use std::collections::BTreeMap;
use std::fmt::Write as _;

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
    if let Some(a) = s.agent_share {
        let _ = write!(line, ", agent {:.1}% CPU", a * 100.0);
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

    /// Per hook: (ns per run, runs per operation), summed over rounds.
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

    /// Mean ns per run of `hook`'s program under egressmon over `ws`.
    fn hook_mean(&self, hook: &str, ws: &[Workload]) -> Option<(f64, u64)> {
        let mut ns = 0u64;
        let mut runs = 0u64;
        for &w in ws {
            for s in self.samples(Condition::Egressmon, w) {
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
        row(format!("{w} agent CPU (% of one core), peak RSS"), &|c| {
            if c != Condition::Egressmon {
                return "–".into();
            }
            let cpu = spread(&v.agent_shares(w), |x| format!("{:.1}%", x * 100.0));
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

fn targets(v: &View) -> Vec<Target> {
    let mut out = Vec::new();
    let has = |w: Workload| v.r.workloads.contains(&w);
    // Ratios to the floor: the programs' own work.
    for (w, goal) in [(Workload::W1, 0.98), (Workload::W3, 0.98)] {
        let what = format!("{w} egressmon / floor ≥ {goal}");
        let Some(r) = has(w)
            .then(|| v.ratio(Condition::Egressmon, Condition::Floor, w))
            .flatten()
        else {
            out.push(not_measured(what));
            continue;
        };
        let cpu = v.cpu_ratio(Condition::Egressmon, Condition::Floor, w);
        let mut note = String::new();
        if r < goal {
            note = floor_miss(v, w, r, goal);
        }
        let from_runs = predicted(v, w).map(|p| p.vs_floor());
        cross_check(&mut note, r, cpu, from_runs, goal);
        out.push(Target {
            what,
            measured: measured_ratio(r, cpu, from_runs),
            met: Some(r >= goal),
            note,
        });
    }
    // Ratios to the bare kernel.
    for (w, goal) in [
        (Workload::W1, 0.96),
        (Workload::W2, 0.98),
        (Workload::W3, 0.94),
    ] {
        let what = format!("{w} egressmon / bare ≥ {goal}");
        let Some(r) = has(w)
            .then(|| v.ratio(Condition::Egressmon, Condition::Bare, w))
            .flatten()
        else {
            out.push(not_measured(what));
            continue;
        };
        let mut note = String::new();
        if r < goal {
            note = bare_miss(v, w, r, goal);
        }
        let cpu = v.cpu_ratio(Condition::Egressmon, Condition::Bare, w);
        let from_runs = predicted(v, w).map(|p| p.vs_bare());
        cross_check(&mut note, r, cpu, from_runs, goal);
        out.push(Target {
            what,
            measured: measured_ratio(r, cpu, from_runs),
            met: Some(r >= goal),
            note,
        });
    }
    // Nanoseconds per program run, averaged over W1 and W3.
    for (hook, goal) in [("connect4", 250.0), ("skb_egress", 150.0)] {
        let what = format!("{hook} ≤ {goal:.0} ns per run (mean over W1 and W3)");
        let ws: Vec<Workload> = [Workload::W1, Workload::W3]
            .into_iter()
            .filter(|w| has(*w))
            .collect();
        match v.hook_mean(hook, &ws) {
            Some((ns, runs)) => {
                let floor = hook_floor(v, hook, &ws);
                let mut note = format!(
                    "{} runs counted; the empty program on this hook: {}.",
                    grouped(runs as f64),
                    floor.map_or("–".into(), |f| format!("{f:.0} ns"))
                );
                if ns > goal {
                    note = format!(
                        "Missed by {:.0} ns ({:.0}% over). {note} See the notes below for what the \
                         program spends it on.",
                        ns - goal,
                        (ns / goal - 1.0) * 100.0
                    );
                }
                out.push(Target {
                    what,
                    measured: format!("{ns:.0} ns"),
                    met: Some(ns <= goal),
                    note,
                });
            }
            None => out.push(not_measured(what)),
        }
    }
    // The agent.
    for w in [Workload::W1, Workload::W4] {
        let what = format!("agent < 5% of one core during {w}");
        let shares = v.agent_shares(w);
        match (median(&shares), min_max(&shares)) {
            (Some(m), Some((_, hi))) => out.push(Target {
                what,
                measured: format!("{} (max {})", pct(m), pct(hi)),
                met: Some(m < 0.05),
                note: if m < 0.05 {
                    "Median over rounds; /proc/PID/stat ticks (10 ms) over the workload's wall time."
                        .into()
                } else {
                    format!(
                        "Missed by {} of a core (median). New flows drive it: the agent drains \
                         the new-flow ring every 100 ms and reads the whole flow map every second.",
                        pct(m - 0.05)
                    )
                },
            }),
            _ => out.push(not_measured(what)),
        }
    }
    let what = "agent peak RSS < 32 MiB".to_string();
    match v.agent_hwm() {
        Some(b) => {
            let mib = b as f64 / 1048576.0;
            out.push(Target {
                what,
                measured: format!("{mib:.1} MiB"),
                met: Some(mib < 32.0),
                note: {
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
                    if mib < 32.0 {
                        per
                    } else {
                        format!(
                            "Missed by {:.1} MiB (max over all rounds). {per} The agent's memory \
                             grows with the flows it tracks.",
                            mib - 32.0
                        )
                    }
                },
            })
        }
        None => out.push(not_measured(what)),
    }
    // Beating the alternatives.
    for w in [Workload::W1, Workload::W3] {
        for rival in [Condition::Nftables, Condition::Tcpdump] {
            let what = format!("egressmon beats {} on {w}", short(rival));
            let (Some(e), Some(x)) = (
                has(w)
                    .then(|| v.ratio(Condition::Egressmon, Condition::Bare, w))
                    .flatten(),
                has(w).then(|| v.ratio(rival, Condition::Bare, w)).flatten(),
            ) else {
                out.push(not_measured(what));
                continue;
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
            out.push(Target {
                what,
                measured,
                met: Some(e > x),
                note,
            });
        }
    }
    out
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

fn hook_floor(v: &View, hook: &str, ws: &[Workload]) -> Option<f64> {
    let mut ns = 0u64;
    let mut runs = 0u64;
    for &w in ws {
        for s in v.samples(Condition::Floor, w) {
            for p in s.progs.iter().filter(|p| p.hook == hook) {
                ns += p.run_ns;
                runs += p.runs;
            }
        }
    }
    (runs > 0).then(|| ns as f64 / runs as f64)
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
    let cut = (extra - allowed).max(0.0);
    let runs = v.runs_per_op(Condition::Egressmon, w).max(1e-9);
    let _ = write!(
        note,
        "egressmon's programs run {e:.0} ns per {u}, the empty ones {f:.0} ns: {extra:+.0} ns on \
         {op:.0} ns of client CPU per {u} at the floor, which alone predicts {pr:.3}. Meeting \
         {goal} allows at most {allowed:.0} ns of program work per {u} beyond the empty programs: \
         {cut:.0} ns less per {u}, about {per:.0} ns less per program run ({runs:.1} runs per {u}).",
        e = p.e,
        f = p.f,
        op = p.op_floor,
        pr = p.vs_floor(),
        per = cut / runs,
        u = op_unit(w)
    );
    note
}

/// Why egressmon/bare on `w` is `r` < `goal`.
fn bare_miss(v: &View, w: Workload, r: f64, goal: f64) -> String {
    let mut note = format!("Missed by {:.3}.", goal - r);
    let Some(p) = predicted(v, w) else {
        return note;
    };
    let allowed = p.op_bare * (1.0 / goal - 1.0);
    let cut = (p.e - allowed).max(0.0);
    let runs = v.runs_per_op(Condition::Egressmon, w).max(1e-9);
    let _ = write!(
        note,
        " The programs alone take {e:.0} ns per {u} (the empty ones {f:.0} ns) on {op:.0} ns of \
         client CPU per {u} on the bare kernel: {pr:.3} predicted from run times, before the \
         hooks' own dispatch and the agent. Meeting {goal} leaves at most {allowed:.0} ns per {u} \
         for hooks and programs together: {cut:.0} ns less per {u}, about {per:.0} ns less per \
         program run ({runs:.1} runs per {u}).",
        e = p.e,
        f = p.f,
        op = p.op_bare,
        pr = p.vs_bare(),
        per = cut / runs,
        u = op_unit(w)
    );
    note
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
         --pin-dir <own> --listen <own>` and is scraped (GET /metrics) once a second: {} \
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
         workload's wall time.\n\n",
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
    m.push_str("\n## Targets (issue 9)\n\n| target | measured | result | why / what would close it |\n|---|---|---|---|\n");
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
        "condition\tworkload\tround\tops\trate\tcpu_ns_per_op\tagent_share\tagent_hwm\tevents_lost\treceived\tprograms\n",
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
                "{}\t{w}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                short_plain(*c),
                s.round + 1,
                s.ops,
                s.rate,
                s.cpu_per_op_ns,
                opt(s.agent_share),
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
