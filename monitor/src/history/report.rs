//! `egressmon report`: what each owner sent, from the history database —
//! a table per owner, a JSON array of destinations, or the Markdown an
//! auditor would publish.

use super::rows::{self, Destination, Span};
use crate::cli::text::escape;
use anyhow::Result;
use clap::Args;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub(crate) struct ReportArgs {
    /// State directory (or history.db file) to read; the agent's default
    /// when not given.
    #[arg(long, env = "EGRESSMON_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Only what was sent within this long before now (e.g. 24h, 7d), or
    /// since this time (RFC 3339). Rows are hourly: the first hour counts
    /// whole.
    #[arg(long)]
    since: Option<String>,
    /// Only what was sent up to this time (RFC 3339) or this long ago.
    #[arg(long)]
    until: Option<String>,
    /// Only owners matching this glob (e.g. 'com.vendor.*').
    #[arg(long)]
    owner: Option<String>,
    /// Only firmware: preinstalled packages and the platform's own uids.
    #[arg(long)]
    firmware: bool,
    /// A JSON array of destinations (fields as documented in the README).
    #[arg(long, conflicts_with = "markdown")]
    json: bool,
    /// A Markdown report, one sentence per destination.
    #[arg(long)]
    markdown: bool,
}

pub(crate) fn run(args: ReportArgs) -> Result<()> {
    let dir = args
        .state_dir
        .clone()
        .unwrap_or_else(super::default_state_dir);
    let db = rows::open(&super::database_path(&dir))?;
    let span = Span {
        since: args.since.as_deref().map(rows::parse_time).transpose()?,
        until: args.until.as_deref().map(rows::parse_time).transpose()?,
    };
    let owner = args
        .owner
        .as_deref()
        .map(crate::pipeline::rules::Glob::new)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--owner: {e}"))?;
    let destinations: Vec<Destination> = rows::read(&db, &span)?
        .into_iter()
        .filter(|d| !args.firmware || d.firmware)
        .filter(|d| owner.as_ref().is_none_or(|g| g.matches(&d.owner)))
        .collect();
    let out = if args.json {
        let mut text = serde_json::to_string_pretty(&destinations)?;
        text.push('\n');
        text
    } else if args.markdown {
        markdown(&destinations, &span)
    } else {
        table(&destinations)
    };
    crate::cli::text::print(&out)
}

/// Destinations per owner, the busiest owner first.
fn by_owner(destinations: &[Destination]) -> Vec<(&str, Vec<&Destination>)> {
    let mut owners: BTreeMap<&str, Vec<&Destination>> = BTreeMap::new();
    for d in destinations {
        owners.entry(&d.owner).or_default().push(d);
    }
    let mut owners: Vec<_> = owners.into_iter().collect();
    let bytes = |ds: &[&Destination]| ds.iter().map(|d| d.tx_bytes).sum::<u64>();
    owners.sort_by(|a, b| bytes(&b.1).cmp(&bytes(&a.1)).then(a.0.cmp(b.0)));
    owners
}

fn table(destinations: &[Destination]) -> String {
    let mut out = String::new();
    if destinations.is_empty() {
        out.push_str("nothing recorded in this span\n");
        return out;
    }
    for (owner, list) in by_owner(destinations) {
        let first = list[0];
        let bytes: u64 = list.iter().map(|d| d.tx_bytes).sum();
        let _ = writeln!(
            out,
            "{} (uid {}, {}{}): {} bytes to {} destinations",
            escape(owner),
            first.uid,
            first.origin,
            if first.firmware { ", firmware" } else { "" },
            bytes,
            list.len()
        );
        for d in list {
            let _ = writeln!(
                out,
                "  {:<5} {:<40} {:<7} {:<9} {:>12} B {:>6} conn  {} .. {}{}{}",
                d.proto,
                escape(&destination_name(d)),
                d.country.as_deref().unwrap_or("-"),
                d.payload,
                d.tx_bytes,
                d.connects,
                d.first_seen,
                d.last_seen,
                if d.leaks.is_empty() {
                    String::new()
                } else {
                    format!("  leaks {}", escape(&d.leaks.join(",")))
                },
                if d.before_unlock {
                    "  before unlock"
                } else {
                    ""
                },
            );
        }
    }
    out.push('\n');
    for line in origin_summary(destinations) {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// One line per origin: owners, destinations, bytes, cleartext ones.
fn origin_summary(destinations: &[Destination]) -> Vec<String> {
    let mut origins: BTreeMap<&str, (std::collections::BTreeSet<&str>, usize, u64, usize)> =
        BTreeMap::new();
    for d in destinations {
        let entry = origins.entry(&d.origin).or_default();
        entry.0.insert(&d.owner);
        entry.1 += 1;
        entry.2 += d.tx_bytes;
        entry.3 += usize::from(is_cleartext(d));
    }
    origins
        .into_iter()
        .map(|(origin, (owners, count, bytes, clear))| {
            format!(
                "{origin}: {} owners, {count} destinations, {bytes} bytes, {clear} in cleartext",
                owners.len()
            )
        })
        .collect()
}

fn is_cleartext(d: &Destination) -> bool {
    matches!(d.payload.as_str(), "http" | "cleartext")
}

fn destination_name(d: &Destination) -> String {
    match &d.host {
        Some(host) => format!("{host} ({}:{})", d.dst, d.port),
        None => format!("{}:{}", d.dst, d.port),
    }
}

/// The report an auditor publishes: per owner, one sentence per
/// destination.
fn markdown(destinations: &[Destination], span: &Span) -> String {
    let mut out = String::from("# egressmon report\n\n");
    let when = |t: Option<i64>, none: &str| {
        t.map(|s| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.max(0) as u64),
            )
            .to_string()
        })
        .unwrap_or_else(|| none.to_string())
    };
    let _ = writeln!(
        out,
        "Traffic recorded from {} to {}.\n",
        when(span.since, "the start of the history"),
        when(span.until, "now")
    );
    if destinations.is_empty() {
        out.push_str("Nothing was recorded in this span.\n");
        return out;
    }
    for (owner, list) in by_owner(destinations) {
        let first = list[0];
        let mut what = vec![first.origin.clone()];
        if let Some(partition) = &first.partition {
            what.push(format!("/{partition}"));
        }
        let _ = writeln!(
            out,
            "## {} ({}; uid {})\n",
            md(owner),
            what.join(", "),
            first.uid
        );
        for d in list {
            let _ = writeln!(out, "- {}", sentence(d));
        }
        out.push('\n');
    }
    out.push_str("## Summary\n\n");
    for line in origin_summary(destinations) {
        let _ = writeln!(out, "- {line}");
    }
    out
}

/// "component X (preinstalled, /system) sent N bytes over HTTP to host H
/// in country C between T1 and T2, carrying the IMEI as SHA-256."
fn sentence(d: &Destination) -> String {
    let verb = if d.direction == "inbound" {
        "answered"
    } else {
        "sent"
    };
    let to = match &d.host {
        Some(host) => format!("host `{}` ({}, port {})", md(host), d.dst, d.port),
        None => format!("{} port {}", d.dst, d.port),
    };
    let country = d
        .country
        .as_deref()
        .map(|c| format!(" in {c}"))
        .unwrap_or_default();
    let mut text = format!(
        "{} {verb} {} bytes ({} packets, {} connections) {} to {to}{country} between {} and {}",
        md(&d.owner),
        d.tx_bytes,
        d.tx_packets,
        d.connects,
        over(&d.payload, &d.proto),
        d.first_seen,
        d.last_seen
    );
    if !d.leaks.is_empty() {
        let carried: Vec<String> = d.leaks.iter().map(|l| leak_phrase(l)).collect();
        let _ = write!(text, ", carrying {}", join_words(&carried));
    }
    if d.before_unlock {
        text.push_str(", some of it before the device was first unlocked");
    }
    text.push('.');
    text
}

fn over(payload: &str, proto: &str) -> String {
    match payload {
        "http" => "over HTTP, unencrypted".into(),
        "tls" => "over TLS".into(),
        "quic" => "over QUIC".into(),
        "dns" => "as DNS queries".into(),
        "cleartext" => format!("unencrypted over {}", proto.to_uppercase()),
        _ => format!("over {}", proto.to_uppercase()),
    }
}

/// `imei:sha256` -> "the IMEI as SHA-256".
fn leak_phrase(leak: &str) -> String {
    let (name, form) = crate::enrich::evidence::split_leak(leak);
    let name = match name {
        "imei" => "the IMEI".to_string(),
        "imsi" => "the IMSI".to_string(),
        "iccid" => "the SIM's ICCID".to_string(),
        "serial" => "the serial number".to_string(),
        "android_id" => "the Android ID".to_string(),
        "phone_number" => "the phone number".to_string(),
        "wifi_mac" => "the Wi-Fi MAC address".to_string(),
        "bt_mac" => "the Bluetooth MAC address".to_string(),
        "mac" => "a MAC address".to_string(),
        "machine_id" => "the machine id".to_string(),
        "dmi_serial" => "the hardware serial number".to_string(),
        "dmi_uuid" => "the hardware UUID".to_string(),
        other => format!("`{}`", md(other)),
    };
    let form = match form {
        "plain" => "in plain text",
        "hex" => "hex-encoded",
        "base64" => "base64-encoded",
        "urlencoded" => "URL-encoded",
        "md5" => "as MD5",
        "sha1" => "as SHA-1",
        "sha256" => "as SHA-256",
        _ => "",
    };
    format!("{name} {form}").trim_end().to_string()
}

fn join_words(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// Text from the device (owner and host names) made inert in Markdown.
fn md(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in escape(text).chars() {
        if matches!(
            c,
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '#' | '|' | '!'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaky() -> Destination {
        Destination {
            owner: "com.vendor.activation".into(),
            uid: 1001,
            origin: "preinstalled".into(),
            firmware: true,
            partition: Some("system".into()),
            proto: "tcp".into(),
            direction: "outbound".into(),
            dst: "198.51.100.7".into(),
            port: 80,
            host: Some("act.example.cn".into()),
            host_source: Some("http".into()),
            country: Some("CN".into()),
            asn: None,
            payload: "http".into(),
            leaks: vec!["imei:sha256".into(), "serial:base64".into()],
            connects: 2,
            udp_sends: 0,
            tx_packets: 9,
            tx_bytes: 1234,
            first_seen: "2026-12-01T08:00:00Z".into(),
            last_seen: "2026-12-01T09:00:00Z".into(),
            before_unlock: true,
            build: "b".into(),
            kernel: "k".into(),
        }
    }

    #[test]
    fn the_auditors_sentence() {
        assert_eq!(
            sentence(&leaky()),
            "com.vendor.activation sent 1234 bytes (9 packets, 2 connections) over HTTP, \
             unencrypted to host `act.example.cn` (198.51.100.7, port 80) in CN between \
             2026-12-01T08:00:00Z and 2026-12-01T09:00:00Z, carrying the IMEI as SHA-256 and \
             the serial number base64-encoded, some of it before the device was first unlocked."
        );
        let text = markdown(&[leaky()], &Span::default());
        assert!(text.contains("## com.vendor.activation (preinstalled, /system; uid 1001)"));
        assert!(
            text.contains("- preinstalled: 1 owners, 1 destinations, 1234 bytes, 1 in cleartext")
        );
    }

    #[test]
    fn names_from_the_device_cannot_format_markdown() {
        assert_eq!(md("a*b_[x](y)"), "a\\*b\\_\\[x\\](y)");
    }
}
