//! Prometheus exposition, built at scrape time: traffic counters from the
//! kernel's per-uid totals (exact, never evicted, monotonic across agent
//! restarts because the map is pinned), the rest from the agent's state.
//! No per-packet work happens in user space.
//!
//! Series are bounded. With U uids seen, P protocols (tcp, udp, icmp...),
//! M = `--metrics-max-uids`, K owner classes (origin x firmware, at most 8)
//! and C countries:
//!   traffic families: 4 x (min(U, M) + K) x P series
//!   bytes by country: K x C; cleartext flows: min(U, M) + K
//!   identifier leaks: I x F x K (I identifiers, F <= 7 forms)
//! Uids beyond the first M seen share `uid="other", owner="other"` series per
//! origin, firmware and protocol, counted in `egressmon_metrics_folded_uids`.
//! Assignment is sticky (first come), so every series stays monotonic.

use crate::agent::Agent;
use crate::identity::owners::OwnerResolver;
use crate::pipeline::vocab::Proto;
use anyhow::Result;
use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use std::collections::BTreeMap;

const TRAFFIC_LABELS: [&str; 5] = ["uid", "owner", "origin", "firmware", "proto"];
pub(crate) const OTHER: &str = "other";

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

#[derive(Default)]
struct Sums {
    bytes: u64,
    packets: u64,
    connects: u64,
    udp_sends: u64,
}

/// The one place a uid becomes metric labels: `[uid, owner, origin,
/// firmware]`, with the owner as resolved now (so after an owners reload
/// every family follows the new owner alike). A uid has its own series while
/// it is among the first `--metrics-max-uids` seen (sticky, so every series
/// stays monotonic); later ones fold into `uid="other", owner="other"`.
struct UidLabels<'a> {
    agent: &'a Agent,
    resolver: &'a OwnerResolver,
    folded: std::collections::BTreeSet<u32>,
}

impl UidLabels<'_> {
    fn of(&mut self, uid: u32) -> [String; 4] {
        let owner = self.resolver.resolve(uid);
        let (uid_label, name) = if self.labelled(uid) {
            (uid.to_string(), owner.owner)
        } else {
            self.folded.insert(uid);
            (OTHER.to_string(), OTHER.to_string())
        };
        [
            uid_label,
            name,
            owner.origin.to_string(),
            owner.firmware.to_string(),
        ]
    }

    /// Whether `uid` has (or now gets) its own series.
    fn labelled(&self, uid: u32) -> bool {
        let mut set = self.agent.labelled_uids.lock().unwrap();
        if set.contains(&uid) {
            return true;
        }
        if set.len() < self.agent.options.metrics_max_uids {
            set.insert(uid);
            return true;
        }
        false
    }
}

pub(crate) fn render(agent: &Agent) -> Result<String> {
    let registry = Registry::new();
    let bytes = counter(
        &registry,
        "egressmon_tx_bytes_total",
        "Bytes sent, IP header included (skb->len at cgroup egress)",
        &TRAFFIC_LABELS,
    )?;
    let packets = counter(
        &registry,
        "egressmon_tx_packets_total",
        "Packets sent (skbs at cgroup egress, before GSO/TSO segmentation)",
        &TRAFFIC_LABELS,
    )?;
    let connects = counter(
        &registry,
        "egressmon_connects_total",
        "connect() calls",
        &TRAFFIC_LABELS,
    )?;
    let udp = counter(
        &registry,
        "egressmon_udp_sends_total",
        "UDP datagrams sent",
        &TRAFFIC_LABELS,
    )?;
    let by_country = counter(
        &registry,
        "egressmon_tx_bytes_by_country_total",
        "Bytes sent by destination country (unknown without GeoIP)",
        &["origin", "firmware", "country"],
    )?;
    let cleartext = counter(
        &registry,
        "egressmon_cleartext_flows_total",
        "Flows that sent readable cleartext",
        &["uid", "owner", "origin", "firmware"],
    )?;
    let leaks = counter(
        &registry,
        "egressmon_identifier_leaks_total",
        "Flows that carried a device identifier where it can be read, by identifier and form",
        &["identifier", "form", "origin", "firmware"],
    )?;
    let alerts = counter(
        &registry,
        "egressmon_alerts_total",
        "Alert rule matches",
        &["rule"],
    )?;
    let blocked = counter(
        &registry,
        "egressmon_blocked_total",
        "Attempts block rules refused (dry runs: would have refused): connect() calls, datagrams, packets of connections open when the rule came",
        &["rule", "uid", "owner", "origin", "firmware"],
    )?;
    let hook_attached = gauge(
        &registry,
        "egressmon_hook_attached",
        "1 if the hook is attached, 0 if skipped",
        &["hook"],
    )?;
    let counter_backend = gauge(
        &registry,
        "egressmon_backend",
        "1 for each hook that feeds a counter (tc_egress where netd holds skb_egress, ...)",
        &["counter", "hook"],
    )?;
    let map_entries = gauge(
        &registry,
        "egressmon_map_entries",
        "Entries in a kernel map",
        &["map"],
    )?;
    let map_capacity = gauge(
        &registry,
        "egressmon_map_capacity",
        "Capacity of a kernel map",
        &["map"],
    )?;
    let lost = counter(
        &registry,
        "egressmon_events_lost_total",
        "New-flow events dropped because the ring buffer was full",
        &[],
    )?;
    let payloads_lost = counter(
        &registry,
        "egressmon_payloads_lost_total",
        "First payloads and DNS answers dropped because the payload ring was full \
         (the flow's next packet is tried again)",
        &[],
    )?;
    let evicted = counter(
        &registry,
        "egressmon_flows_evicted_total",
        "Flows evicted from the LRU flow map (per-uid totals stay exact)",
        &[],
    )?;
    let created = counter(
        &registry,
        "egressmon_flows_created_total",
        "Distinct flows announced by the kernel",
        &[],
    )?;
    let folded = gauge(
        &registry,
        "egressmon_metrics_folded_uids",
        "Uids folded into uid=\"other\" series (over --metrics-max-uids)",
        &[],
    )?;
    let netd_bytes = counter(
        &registry,
        "egressmon_netd_tx_bytes_total",
        "Bytes sent per uid as Android's netd counts them (its pinned stats maps; all interfaces)",
        &["uid", "owner", "origin", "firmware"],
    )?;
    let netd_packets = counter(
        &registry,
        "egressmon_netd_tx_packets_total",
        "Packets sent per uid as Android's netd counts them",
        &["uid", "owner", "origin", "firmware"],
    )?;
    let build = gauge(
        &registry,
        "egressmon_build_info",
        "Build and kernel version",
        &["version", "kernel"],
    )?;

    let resolver = agent.resolver();
    let mut uid_labels = UidLabels {
        agent,
        resolver: &resolver,
        folded: Default::default(),
    };
    let mut sums: BTreeMap<[String; 5], Sums> = BTreeMap::new();
    for (key, totals) in agent.uid_totals()? {
        let [uid, owner, origin, firmware] = uid_labels.of(key.uid);
        let proto = Proto::from_number(key.proto).to_string();
        let s = sums
            .entry([uid, owner, origin, firmware, proto])
            .or_default();
        s.bytes += totals.tx_bytes;
        s.packets += totals.tx_packets;
        s.connects += totals.connects;
        s.udp_sends += totals.udp_sends;
    }
    for (labels, s) in &sums {
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        bytes.with_label_values(&labels).inc_by(s.bytes);
        packets.with_label_values(&labels).inc_by(s.packets);
        connects.with_label_values(&labels).inc_by(s.connects);
        udp.with_label_values(&labels).inc_by(s.udp_sends);
    }
    if let Some(totals) = agent.netd_totals() {
        let mut netd_sums: BTreeMap<[String; 4], (u64, u64)> = BTreeMap::new();
        for (uid, traffic) in totals? {
            let s = netd_sums.entry(uid_labels.of(uid)).or_default();
            s.0 += traffic.tx_bytes;
            s.1 += traffic.tx_packets;
        }
        for (labels, (b, p)) in &netd_sums {
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            netd_bytes.with_label_values(&labels).inc_by(*b);
            netd_packets.with_label_values(&labels).inc_by(*p);
        }
    }
    // The tracker's totals as of the latest pass (a scrape waits for none).
    let facts = agent.facts();
    for ((origin, firmware, country), value) in &facts.bytes_by_country {
        by_country
            .with_label_values(&[origin.as_str(), &firmware.to_string(), country.as_str()])
            .inc_by(*value);
    }
    // Counted per uid; labelled like the traffic counters, by the owner the
    // uid has now.
    let mut cleartext_sums: BTreeMap<[String; 4], u64> = BTreeMap::new();
    for ((uid, ..), value) in &facts.cleartext_flows {
        *cleartext_sums.entry(uid_labels.of(*uid)).or_default() += value;
    }
    for (labels, value) in &cleartext_sums {
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        cleartext.with_label_values(&labels).inc_by(*value);
    }
    for ((identifier, form, origin, firmware), value) in &facts.identifier_leaks {
        leaks
            .with_label_values(&[identifier, form, origin, &firmware.to_string()])
            .inc_by(*value);
    }
    for (rule, value) in &facts.alerts {
        alerts.with_label_values(&[rule.as_str()]).inc_by(*value);
    }
    let mut blocked_sums: BTreeMap<(String, [String; 4]), u64> = BTreeMap::new();
    for ((rule, uid, ..), value) in &facts.blocked {
        *blocked_sums
            .entry((rule.clone(), uid_labels.of(*uid)))
            .or_default() += value;
    }
    for ((rule, labels), value) in &blocked_sums {
        let mut all = vec![rule.as_str()];
        all.extend(labels.iter().map(String::as_str));
        blocked.with_label_values(&all).inc_by(*value);
    }
    folded
        .with_label_values::<&str>(&[])
        .set(uid_labels.folded.len() as i64);
    // Before answering: a restarted agent must not hand out less.
    agent.save_scrape_state();
    let status = agent.status()?;
    for hook in &status.hooks {
        hook_attached
            .with_label_values(&[hook.hook.as_str()])
            .set(hook.attached as i64);
    }
    for (counter, hooks) in &status.backends {
        for hook in hooks {
            counter_backend
                .with_label_values(&[counter.as_str(), hook.as_str()])
                .set(1);
        }
    }
    for map in &status.maps {
        map_entries
            .with_label_values(&[map.map.as_str()])
            .set(map.entries as i64);
        map_capacity
            .with_label_values(&[map.map.as_str()])
            .set(map.capacity as i64);
    }
    lost.with_label_values::<&str>(&[])
        .inc_by(status.events_lost);
    payloads_lost
        .with_label_values::<&str>(&[])
        .inc_by(status.payloads_lost);
    evicted
        .with_label_values::<&str>(&[])
        .inc_by(status.flows_evicted);
    created
        .with_label_values::<&str>(&[])
        .inc_by(status.flows_created);
    build
        .with_label_values(&[status.version.as_str(), status.kernel.as_str()])
        .set(1);

    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8(out)?)
}

#[cfg(test)]
mod tests {
    /// The shipped Grafana dashboard only queries metrics this module exports.
    #[test]
    fn dashboard_uses_exported_metrics() {
        let text = include_str!("../../dashboards/egressmon.json");
        let dashboard: serde_json::Value = serde_json::from_str(text).expect("dashboard is JSON");
        let exported = [
            "egressmon_tx_bytes_total",
            "egressmon_tx_packets_total",
            "egressmon_connects_total",
            "egressmon_udp_sends_total",
            "egressmon_tx_bytes_by_country_total",
            "egressmon_cleartext_flows_total",
            "egressmon_alerts_total",
            "egressmon_hook_attached",
            "egressmon_map_entries",
            "egressmon_map_capacity",
            "egressmon_events_lost_total",
            "egressmon_flows_evicted_total",
            "egressmon_build_info",
        ];
        let mut queried = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("egressmon_") {
                        assert!(
                            exported.contains(&word),
                            "dashboard queries unknown metric {word}"
                        );
                        queried += 1;
                    }
                }
            }
        }
        assert!(queried >= 9);
    }
}
