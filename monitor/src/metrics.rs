//! Prometheus exposition of the agent's state, built at scrape time from the
//! kernel maps (no per-packet work in user space).
//!
//! Series per scrape: flows are folded by (uid, proto), so the traffic
//! families hold at most uids x protocols series each.

use crate::agent::Agent;
use anyhow::Result;
use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use std::collections::BTreeMap;

const TRAFFIC_LABELS: [&str; 5] = ["uid", "owner", "origin", "firmware", "proto"];

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

pub fn render(agent: &Agent) -> Result<String> {
    let registry = Registry::new();
    let bytes = counter(
        &registry,
        "egressmon_tx_bytes_total",
        "Bytes sent (IP header included), by owner",
        &TRAFFIC_LABELS,
    )?;
    let packets = counter(
        &registry,
        "egressmon_tx_packets_total",
        "Packets (skbs before segmentation) sent, by owner",
        &TRAFFIC_LABELS,
    )?;
    let connects = counter(
        &registry,
        "egressmon_connects_total",
        "connect() calls, by owner",
        &TRAFFIC_LABELS,
    )?;
    let udp = counter(
        &registry,
        "egressmon_udp_sends_total",
        "UDP datagrams sent, by owner",
        &TRAFFIC_LABELS,
    )?;
    let hook_attached = gauge(
        &registry,
        "egressmon_hook_attached",
        "1 if the hook is attached, 0 if skipped",
        &["hook"],
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
    let build = gauge(
        &registry,
        "egressmon_build_info",
        "Build and kernel version",
        &["version", "kernel"],
    )?;

    let mut sums: BTreeMap<(u32, String), (crate::flows::FlowRecord, Sums)> = BTreeMap::new();
    for flow in agent.flows()? {
        let entry = sums
            .entry((flow.uid, flow.proto.clone()))
            .or_insert_with(|| (flow.clone(), Sums::default()));
        entry.1.bytes += flow.tx_bytes;
        entry.1.packets += flow.tx_packets;
        entry.1.connects += flow.connects;
        entry.1.udp_sends += flow.udp_sends;
    }
    for ((uid, proto), (flow, s)) in &sums {
        let uid = uid.to_string();
        let firmware = flow.firmware.to_string();
        let labels = [
            uid.as_str(),
            flow.owner.as_str(),
            flow.origin.as_str(),
            firmware.as_str(),
            proto.as_str(),
        ];
        bytes.with_label_values(&labels).inc_by(s.bytes);
        packets.with_label_values(&labels).inc_by(s.packets);
        connects.with_label_values(&labels).inc_by(s.connects);
        udp.with_label_values(&labels).inc_by(s.udp_sends);
    }
    let status = agent.status()?;
    for hook in &status.hooks {
        hook_attached
            .with_label_values(&[hook.hook.as_str()])
            .set(hook.attached as i64);
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
    build
        .with_label_values(&[status.version.as_str(), status.kernel.as_str()])
        .set(1);

    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8(out)?)
}
