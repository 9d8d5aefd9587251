//! `egressmon top`: the flow table grouped by owner, one row per uid, with
//! the send rate since the previous refresh.

use crate::client;
use crate::flows::FlowRecord;
use anyhow::Result;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// One owner's traffic.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OwnerRow {
    pub uid: u32,
    pub owner: String,
    pub origin: String,
    pub firmware: bool,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub connects: u64,
    pub udp_sends: u64,
    pub destinations: usize,
    /// Busiest destinations by bytes, "addr:port".
    pub top_destinations: Vec<String>,
    pub rate_bps: f64,
}

pub fn group(flows: &[FlowRecord]) -> Vec<OwnerRow> {
    let mut by_uid: HashMap<u32, (OwnerRow, Vec<(u64, String)>)> = HashMap::new();
    for f in flows {
        let (row, dests) = by_uid.entry(f.uid).or_insert_with(|| {
            let row = OwnerRow {
                uid: f.uid,
                owner: f.owner.clone(),
                origin: f.origin.clone(),
                firmware: f.firmware,
                ..Default::default()
            };
            (row, Vec::new())
        });
        row.tx_bytes += f.tx_bytes;
        row.tx_packets += f.tx_packets;
        row.connects += f.connects;
        row.udp_sends += f.udp_sends;
        row.destinations += 1;
        let dst = if f.family == "ipv6" {
            format!("[{}]:{}", f.dst, f.port)
        } else {
            format!("{}:{}", f.dst, f.port)
        };
        dests.push((f.tx_bytes.max(f.connects), dst));
    }
    let mut rows: Vec<OwnerRow> = by_uid
        .into_values()
        .map(|(mut row, mut dests)| {
            dests.sort_by_key(|d| std::cmp::Reverse(d.0));
            row.top_destinations = dests.into_iter().take(3).map(|(_, d)| d).collect();
            row
        })
        .collect();
    rows.sort_by(|a, b| {
        b.tx_bytes
            .cmp(&a.tx_bytes)
            .then(b.connects.cmp(&a.connects))
            .then(a.uid.cmp(&b.uid))
    });
    rows
}

pub fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} {}", UNITS[0])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Plain table that fits 80 columns (the busiest destination is cut to fit).
pub fn render_plain(rows: &[OwnerRow]) -> String {
    let mut out = format!(
        "{:>7} {:<16} {:<11} {:>7} {:>7} {:>5} {:>4} {}\n",
        "UID", "OWNER", "ORIGIN", "RATE/s", "TOTAL", "CONN", "DSTS", "BUSIEST"
    );
    for r in rows {
        let origin = if r.firmware {
            format!("{} FW", r.origin)
        } else {
            r.origin.clone()
        };
        let busiest: String = r
            .top_destinations
            .first()
            .cloned()
            .unwrap_or_default()
            .chars()
            .take(16)
            .collect();
        out.push_str(&format!(
            "{:>7} {:<16.16} {:<11.11} {:>7} {:>7} {:>5} {:>4} {}\n",
            r.uid,
            r.owner,
            origin,
            human_bytes(r.rate_bps),
            human_bytes(r.tx_bytes as f64),
            r.connects,
            r.destinations,
            busiest
        ));
    }
    out
}

fn fetch(listen: SocketAddr) -> Result<Vec<FlowRecord>> {
    Ok(serde_json::from_str(&client::get(listen, "/flows")?)?)
}

/// Adds send rates from the previous sample.
pub fn with_rates(
    mut rows: Vec<OwnerRow>,
    previous: &HashMap<u32, u64>,
    elapsed: Duration,
) -> Vec<OwnerRow> {
    let secs = elapsed.as_secs_f64().max(0.001);
    for r in &mut rows {
        if let Some(before) = previous.get(&r.uid) {
            r.rate_bps = r.tx_bytes.saturating_sub(*before) as f64 / secs;
        }
    }
    rows
}

pub fn run(listen: SocketAddr, once: bool) -> Result<()> {
    if once {
        print!("{}", render_plain(&group(&fetch(listen)?)));
        return Ok(());
    }
    crate::tui::run(listen)
}

pub fn sample(listen: SocketAddr) -> Result<Vec<FlowRecord>> {
    fetch(listen)
}

pub fn totals(rows: &[OwnerRow]) -> HashMap<u32, u64> {
    rows.iter().map(|r| (r.uid, r.tx_bytes)).collect()
}

pub fn now() -> Instant {
    Instant::now()
}
