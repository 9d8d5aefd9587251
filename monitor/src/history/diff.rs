//! `egressmon diff BASE NEW`: the destinations one history reached that
//! another did not — e.g. two firmware builds run through the same
//! scenario. Exit 0 when NEW's firmware reached nothing new, 1 when it did
//! (listed), 2 on error: a CI gate.

use super::rows::{self, Destination, Span};
use crate::cli::text::escape;
use crate::pipeline::rules::Glob;
use anyhow::{Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub(crate) struct DiffArgs {
    /// The reference: a state directory or history.db file.
    base: PathBuf,
    /// The one judged: a state directory or history.db file.
    new: PathBuf,
    /// One JSON object: {"new": [...], "gone": [...], "failing": N}.
    #[arg(long)]
    json: bool,
    /// Fail on new destinations of apps too, not only of firmware.
    #[arg(long)]
    all_origins: bool,
    /// TOML file of accepted destinations: [[allow]] entries with `owner`
    /// and `host` globs (host matches the name or the address), optional
    /// `port` and `proto`.
    #[arg(long)]
    allow: Option<PathBuf>,
}

/// A destination, as two histories are compared: who reached what.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Reached {
    owner: String,
    /// The host name, or the address when no name is known.
    destination: String,
    port: u16,
    proto: String,
}

impl Reached {
    fn of(d: &Destination) -> Reached {
        Reached {
            owner: d.owner.clone(),
            destination: d.host.clone().unwrap_or_else(|| d.dst.clone()),
            port: d.port,
            proto: d.proto.clone(),
        }
    }
}

/// One line of the diff.
#[derive(Debug, Serialize)]
struct Change {
    owner: String,
    uid: u32,
    origin: String,
    firmware: bool,
    proto: String,
    /// The host name, or the address when no name is known.
    destination: String,
    dst: String,
    port: u16,
    host: Option<String>,
    country: Option<String>,
    payload: String,
    leaks: Vec<String>,
    tx_bytes: u64,
    connects: u64,
    /// An --allow entry accepts it.
    allowed: bool,
    /// It makes the diff fail (new, not allowed, firmware or --all-origins).
    failing: bool,
}

#[derive(Debug, Serialize)]
struct Outcome {
    new: Vec<Change>,
    gone: Vec<Change>,
    failing: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowFile {
    #[serde(default)]
    allow: Vec<Allow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Allow {
    owner: Option<Glob>,
    host: Option<Glob>,
    port: Option<u16>,
    proto: Option<String>,
}

impl Allow {
    fn accepts(&self, d: &Destination) -> bool {
        self.owner.as_ref().is_none_or(|g| g.matches(&d.owner))
            && self.host.as_ref().is_none_or(|g| {
                g.matches(&d.dst) || d.host.as_deref().is_some_and(|h| g.matches(h))
            })
            && self.port.is_none_or(|p| p == d.port)
            && self
                .proto
                .as_deref()
                .is_none_or(|p| p.eq_ignore_ascii_case(&d.proto))
    }
}

fn load_allow(path: &Path) -> Result<Vec<Allow>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the --allow file {}", path.display()))?;
    let file: AllowFile = toml::from_str(&text).with_context(|| {
        format!(
            "{}: expected [[allow]] entries with owner/host globs, port, proto",
            path.display()
        )
    })?;
    Ok(file.allow)
}

/// Outbound destinations by who reached what (a local service's replies
/// are not destinations it chose).
fn reached(place: &Path) -> Result<BTreeMap<Reached, Destination>> {
    let db = rows::open(&super::database_path(place))?;
    let mut out: BTreeMap<Reached, Destination> = BTreeMap::new();
    for d in rows::read(&db, &Span::default())? {
        if d.direction == "inbound" {
            continue;
        }
        match out.get_mut(&Reached::of(&d)) {
            Some(seen) => {
                seen.tx_bytes += d.tx_bytes;
                seen.connects += d.connects;
            }
            None => {
                out.insert(Reached::of(&d), d);
            }
        }
    }
    Ok(out)
}

/// Runs the diff; returns the exit code (0 or 1). Errors are exit 2.
pub(crate) fn run(args: DiffArgs) -> Result<i32> {
    let allow = args.allow.as_deref().map(load_allow).transpose()?;
    let base = reached(&args.base).with_context(|| format!("BASE {}", args.base.display()))?;
    let new = reached(&args.new).with_context(|| format!("NEW {}", args.new.display()))?;
    let change = |d: &Destination, new: bool| {
        let allowed = allow
            .as_ref()
            .is_some_and(|list| list.iter().any(|a| a.accepts(d)));
        Change {
            owner: d.owner.clone(),
            uid: d.uid,
            origin: d.origin.clone(),
            firmware: d.firmware,
            proto: d.proto.clone(),
            destination: Reached::of(d).destination,
            dst: d.dst.clone(),
            port: d.port,
            host: d.host.clone(),
            country: d.country.clone(),
            payload: d.payload.clone(),
            leaks: d.leaks.clone(),
            tx_bytes: d.tx_bytes,
            connects: d.connects,
            allowed,
            failing: new && !allowed && (d.firmware || args.all_origins),
        }
    };
    let outcome = {
        let added: Vec<Change> = new
            .iter()
            .filter(|(k, _)| !base.contains_key(k))
            .map(|(_, d)| change(d, true))
            .collect();
        let gone: Vec<Change> = base
            .iter()
            .filter(|(k, _)| !new.contains_key(k))
            .map(|(_, d)| change(d, false))
            .collect();
        Outcome {
            failing: added.iter().filter(|c| c.failing).count(),
            new: added,
            gone,
        }
    };
    let text = if args.json {
        let mut text = serde_json::to_string_pretty(&outcome)?;
        text.push('\n');
        text
    } else {
        render(&outcome, &args)
    };
    crate::cli::text::print(&text)?;
    Ok(i32::from(outcome.failing > 0))
}

fn render(outcome: &Outcome, args: &DiffArgs) -> String {
    let mut out = String::new();
    let line = |out: &mut String, mark: &str, c: &Change| {
        let _ = writeln!(
            out,
            "  {mark} {} ({}{}) -> {}:{}/{}  {}  {}  {} B{}{}",
            escape(&c.owner),
            c.origin,
            if c.firmware { ", firmware" } else { "" },
            escape(&c.destination),
            c.port,
            c.proto,
            c.country.as_deref().unwrap_or("-"),
            c.payload,
            c.tx_bytes,
            if c.leaks.is_empty() {
                String::new()
            } else {
                format!("  leaks {}", escape(&c.leaks.join(",")))
            },
            if c.allowed { "  (allowed)" } else { "" },
        );
    };
    let _ = writeln!(
        out,
        "new in {} ({}), ! marks what fails the diff:",
        args.new.display(),
        outcome.new.len()
    );
    for c in &outcome.new {
        line(&mut out, if c.failing { "!" } else { "+" }, c);
    }
    let _ = writeln!(
        out,
        "gone since {} ({}):",
        args.base.display(),
        outcome.gone.len()
    );
    for c in &outcome.gone {
        line(&mut out, "-", c);
    }
    let whose = if args.all_origins {
        "any owner"
    } else {
        "firmware"
    };
    if outcome.failing > 0 {
        let _ = writeln!(
            out,
            "FAIL: {} new destination(s) of {whose} not in BASE and not allowed",
            outcome.failing
        );
    } else {
        let _ = writeln!(out, "OK: no new destination of {whose}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_entries_match_owner_and_host_or_address() {
        let list: AllowFile = toml::from_str(
            "[[allow]]\nowner = \"com.android.*\"\nhost = \"*.example.org\"\n\
             [[allow]]\nhost = \"192.0.2.*\"\nport = 53\n",
        )
        .unwrap();
        let d = |owner: &str, host: Option<&str>, dst: &str, port| Destination {
            owner: owner.into(),
            host: host.map(str::to_string),
            dst: dst.into(),
            port,
            uid: 0,
            origin: String::new(),
            firmware: true,
            partition: None,
            proto: "udp".into(),
            direction: "outbound".into(),
            host_source: None,
            country: None,
            asn: None,
            payload: String::new(),
            leaks: vec![],
            connects: 0,
            udp_sends: 0,
            tx_packets: 0,
            tx_bytes: 0,
            first_seen: String::new(),
            last_seen: String::new(),
            before_unlock: false,
            build: String::new(),
            kernel: String::new(),
        };
        let accepts = |d: &Destination| list.allow.iter().any(|a| a.accepts(d));
        assert!(accepts(&d(
            "com.android.phone",
            Some("a.example.org"),
            "203.0.113.1",
            443
        )));
        assert!(!accepts(&d(
            "com.vendor.x",
            Some("a.example.org"),
            "203.0.113.1",
            443
        )));
        assert!(accepts(&d("anyone", None, "192.0.2.9", 53)));
        assert!(!accepts(&d("anyone", None, "192.0.2.9", 443)));
        let bad = toml::from_str::<AllowFile>("[[allow]]\nowner = \"[\"\n");
        assert!(bad.is_err());
    }
}
