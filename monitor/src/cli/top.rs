//! `egressmon top`: the flow table grouped by owner, one row per uid, with
//! the send rate since the previous refresh. Loopback and link-local
//! traffic gets rows of its own, after the others; alerts are marked on
//! their owner's row (`!N`).

use crate::cli::client::Endpoint;
use crate::cli::text::escape;
use crate::pipeline::flows::FlowRecord;
use anyhow::Result;
use std::collections::HashMap;
use std::time::Duration;

/// One owner's traffic.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct OwnerRow {
    pub(crate) uid: u32,
    pub(crate) owner: String,
    pub(crate) origin: String,
    pub(crate) firmware: bool,
    pub(crate) tx_bytes: u64,
    pub(crate) tx_packets: u64,
    pub(crate) connects: u64,
    pub(crate) udp_sends: u64,
    pub(crate) destinations: usize,
    /// Busiest destinations by bytes, "addr:port".
    pub(crate) top_destinations: Vec<String>,
    pub(crate) rate_bps: f64,
    /// Loopback and link-local traffic, in rows of its own after the others.
    pub(crate) local: bool,
    /// Alerts raised on these flows.
    pub(crate) alerts: u64,
    /// Flows that carried one of the device's identifiers readably.
    pub(crate) leaking_flows: u64,
    /// Attempts block rules refused (or in a dry run would have).
    pub(crate) blocked: u64,
}

/// Rows are per uid and per scope (remote, or local).
pub(crate) type RowKey = (u32, bool);

impl OwnerRow {
    pub(crate) fn key(&self) -> RowKey {
        (self.uid, self.local)
    }
}

pub(crate) fn group(flows: &[FlowRecord]) -> Vec<OwnerRow> {
    let mut by_uid: HashMap<RowKey, (OwnerRow, Vec<(u64, String)>)> = HashMap::new();
    for f in flows {
        let local = f.scope.is_local();
        let (row, dests) = by_uid.entry((f.uid, local)).or_insert_with(|| {
            let row = OwnerRow {
                uid: f.uid,
                owner: f.owner.clone(),
                origin: f.origin.to_string(),
                firmware: f.firmware,
                local,
                ..Default::default()
            };
            (row, Vec::new())
        });
        row.tx_bytes += f.tx_bytes;
        row.tx_packets += f.tx_packets;
        row.connects += f.connects;
        row.udp_sends += f.udp_sends;
        row.destinations += 1;
        row.alerts += f.alerts.len() as u64;
        row.leaking_flows += !f.leaks.is_empty() as u64;
        row.blocked += f.blocked;
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
        a.local
            .cmp(&b.local)
            .then(b.tx_bytes.cmp(&a.tx_bytes))
            .then(b.connects.cmp(&a.connects))
            .then(a.uid.cmp(&b.uid))
    });
    rows
}

pub(crate) fn human_bytes(n: f64) -> String {
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

/// `!N ` before an owner with N alerts, `ID ` before one that sent the
/// device's identifiers readably and `BLK ` before one a block rule
/// refused, so they stand out in any terminal.
pub(crate) fn alert_mark(row: &OwnerRow) -> String {
    let mut mark = String::new();
    if row.alerts > 0 {
        mark = format!("!{} ", row.alerts);
    }
    if row.leaking_flows > 0 {
        mark.push_str("ID ");
    }
    if row.blocked > 0 {
        mark.push_str("BLK ");
    }
    mark
}

/// What an expanded flow row shows after its destination: what block
/// rules refused of it, the rules that alerted and the identifiers it
/// carried.
pub(crate) fn flow_notes(flow: &FlowRecord) -> String {
    let mut notes = Vec::new();
    if flow.blocked > 0 {
        notes.push(match (&flow.block_rule, flow.block_mode) {
            (Some(rule), Some(crate::pipeline::rules::BlockMode::DryRun)) => {
                format!("BLK(dry-run {rule}) {}", flow.blocked)
            }
            _ => format!("BLK {}", flow.blocked),
        });
    }
    if !flow.alerts.is_empty() {
        notes.push(flow.alerts.join(","));
    }
    if !flow.leaks.is_empty() {
        notes.push(format!("ID {}", flow.leaks.join(",")));
    }
    notes.join(" ")
}

/// Heads the local rows: what they are and why they are apart.
pub(crate) const LOCAL_HEADING: &str = "local (loopback, link-local: stays on this host or link)";

/// Plain table that fits 80 columns (the busiest destination is cut to fit).
pub(crate) fn render_plain(rows: &[OwnerRow]) -> String {
    let mut out = format!(
        "{:>7} {:<16} {:<11} {:>7} {:>7} {:>5} {:>4} {}\n",
        "UID", "OWNER", "ORIGIN", "RATE/s", "TOTAL", "CONN", "DSTS", "BUSIEST"
    );
    for (i, r) in rows.iter().enumerate() {
        // Rows come sorted with the local ones last.
        if r.local && (i == 0 || !rows[i - 1].local) {
            out.push_str(LOCAL_HEADING);
            out.push('\n');
        }
        let origin = if r.firmware {
            format!("{} FW", escape(&r.origin))
        } else {
            escape(&r.origin).into_owned()
        };
        let busiest: String = escape(r.top_destinations.first().map_or("", String::as_str))
            .chars()
            .take(16)
            .collect();
        out.push_str(&format!(
            "{:>7} {:<16.16} {:<11.11} {:>7} {:>7} {:>5} {:>4} {}\n",
            r.uid,
            format!("{}{}", alert_mark(r), escape(&r.owner)),
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

fn fetch(agent: &Endpoint) -> Result<Vec<FlowRecord>> {
    Ok(serde_json::from_str(&agent.get("/flows")?)?)
}

/// Adds send rates from the previous sample.
pub(crate) fn with_rates(
    mut rows: Vec<OwnerRow>,
    previous: &HashMap<RowKey, u64>,
    elapsed: Duration,
) -> Vec<OwnerRow> {
    let secs = elapsed.as_secs_f64().max(0.001);
    for r in &mut rows {
        if let Some(before) = previous.get(&r.key()) {
            r.rate_bps = r.tx_bytes.saturating_sub(*before) as f64 / secs;
        }
    }
    rows
}

pub(crate) fn run(agent: &Endpoint, once: bool) -> Result<()> {
    if once {
        print!("{}", render_plain(&group(&fetch(agent)?)));
        return Ok(());
    }
    crate::cli::tui::run(agent)
}

pub(crate) fn sample(agent: &Endpoint) -> Result<Vec<FlowRecord>> {
    fetch(agent)
}

pub(crate) fn totals(rows: &[OwnerRow]) -> HashMap<RowKey, u64> {
    rows.iter().map(|r| (r.key(), r.tx_bytes)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::rules::Scope;

    fn flow(uid: u32, dst: &str, bytes: u64, alerts: &[&str]) -> FlowRecord {
        let record = serde_json::json!({
            "uid": uid, "user": 0, "app_id": uid, "owner": format!("uid {uid}"),
            "packages": [], "origin": "system", "firmware": true, "comm": null,
            "pid": null, "cgroup_id": null, "cgroup": null, "unit": null, "exe": null,
            "cmdline": null, "proto": "tcp", "family": "ipv4", "dst": dst, "port": 80,
            "connects": 1, "udp_sends": 0, "tx_packets": 1, "tx_bytes": bytes,
            "first_seen": null, "last_seen": null, "host": null, "host_source": null,
            "country": null, "asn": null, "payload": "http", "alerts": alerts,
        });
        let mut flow: FlowRecord = serde_json::from_value(record).unwrap();
        flow.scope = Scope::of(dst.parse().unwrap());
        flow
    }

    #[test]
    fn owners_and_flows_with_identifiers_are_marked() {
        let mut leaking = flow(1001, "203.0.113.7", 10, &["firmware-identifier-leak"]);
        leaking.leaks = vec!["imei:sha256".into(), "serial:base64".into()];
        let rows = group(&[leaking.clone(), flow(1001, "203.0.113.8", 5, &[])]);
        assert_eq!(rows[0].leaking_flows, 1);
        assert_eq!(alert_mark(&rows[0]), "!1 ID ");
        assert_eq!(
            flow_notes(&leaking),
            "firmware-identifier-leak ID imei:sha256,serial:base64"
        );
        assert_eq!(flow_notes(&flow(1001, "203.0.113.8", 5, &[])), "");
    }

    #[test]
    fn owners_and_flows_a_block_rule_refused_are_marked() {
        let mut refused = flow(1001, "203.0.113.7", 0, &[]);
        refused.blocked = 7;
        refused.block_rule = Some("radio-cn".into());
        refused.block_mode = Some(crate::pipeline::rules::BlockMode::Enforce);
        let rows = group(&[refused.clone()]);
        assert_eq!(
            (rows[0].blocked, alert_mark(&rows[0]).as_str()),
            (7, "BLK ")
        );
        assert_eq!(flow_notes(&refused), "BLK 7");
        refused.block_mode = Some(crate::pipeline::rules::BlockMode::DryRun);
        assert_eq!(flow_notes(&refused), "BLK(dry-run radio-cn) 7");
    }

    #[test]
    fn local_rows_come_last_under_a_heading_and_alerts_are_marked() {
        let rows = group(&[
            flow(0, "127.0.0.1", 9000, &[]),
            flow(0, "169.254.1.1", 1000, &[]),
            flow(0, "203.0.113.7", 10, &["firmware-cleartext"]),
            flow(7, "203.0.113.8", 500, &[]),
        ]);
        let keys: Vec<RowKey> = rows.iter().map(OwnerRow::key).collect();
        assert_eq!(keys, [(7, false), (0, false), (0, true)]);
        assert_eq!((rows[2].destinations, rows[2].tx_bytes), (2, 10_000));
        let text = render_plain(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[3], LOCAL_HEADING, "{text}");
        assert!(lines[2].contains("!1 uid 0"), "{text}");
        assert!(lines[4].contains("127.0.0.1:80"), "{text}");
        assert!(lines.iter().all(|l| l.chars().count() <= 80), "{text}");
    }
}
