//! Reading history: the database's hourly rows summed per owner and
//! destination, as `report` prints them and `diff` compares them.

use anyhow::{bail, Context, Result};
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// What one uid sent to one destination over the rows read: one element
/// of `report --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Destination {
    pub owner: String,
    pub uid: u32,
    pub origin: String,
    pub firmware: bool,
    /// Where the sender's code lives (`system`, `vendor`, ...), when known.
    pub partition: Option<String>,
    pub proto: String,
    /// `outbound`, or `inbound` for a local service's replies.
    pub direction: String,
    pub dst: String,
    pub port: u16,
    pub host: Option<String>,
    pub host_source: Option<String>,
    pub country: Option<String>,
    pub asn: Option<u32>,
    pub payload: String,
    pub leaks: Vec<String>,
    pub connects: u64,
    pub udp_sends: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// RFC 3339, to the second.
    pub first_seen: String,
    pub last_seen: String,
    /// Some of it was sent before the user first unlocked the device
    /// after boot (Android with file-based encryption).
    pub before_unlock: bool,
    /// The build fingerprint (Android) or distribution (Linux) it was last
    /// seen under, and that build's kernel.
    pub build: String,
    pub kernel: String,
}

/// Which rows to read.
#[derive(Default)]
pub(crate) struct Span {
    /// Unix seconds.
    pub(crate) since: Option<i64>,
    pub(crate) until: Option<i64>,
}

/// Opens a history database to read; says what to do when there is none.
pub(crate) fn open(path: &Path) -> Result<Connection> {
    match std::fs::metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "no history at {}: the agent keeps it when run with --state-dir (default {}); \
             name a state directory or a history.db file",
            path.display(),
            super::default_state_dir().display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
            "{}: permission denied; history is root's alone: run this as root",
            path.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    // Read-write without create: a WAL database's index needs writing even
    // to read, and a missing file is not made.
    let db = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {}", path.display()))?;
    db.busy_timeout(std::time::Duration::from_secs(5))?;
    db.query_row("SELECT count(*) FROM destinations", [], |r| {
        r.get::<_, i64>(0)
    })
    .with_context(|| format!("{} is not an egressmon history database", path.display()))?;
    Ok(db)
}

type Key = (u32, String, String, String, String, u16);

/// The destinations in `db` within `span`, busiest first.
pub(crate) fn read(db: &Connection, span: &Span) -> Result<Vec<Destination>> {
    let mut stmt = db.prepare(
        "SELECT uid, owner, origin, firmware, partition, proto, direction, dst, port, host, \
         host_source, country, asn, payload, leaks, connects, udp_sends, tx_packets, tx_bytes, \
         first_seen, last_seen, before_unlock, build, kernel \
         FROM destinations WHERE last_seen >= ?1 AND first_seen <= ?2 ORDER BY hour, last_seen",
    )?;
    let since = span.since.unwrap_or(i64::MIN);
    let until = span.until.unwrap_or(i64::MAX);
    let mut summed: BTreeMap<Key, (Destination, i64, i64)> = BTreeMap::new();
    let mut rows = stmt.query([since, until])?;
    while let Some(row) = rows.next()? {
        let leaks: String = row.get(14)?;
        let (first, last): (i64, i64) = (row.get(19)?, row.get(20)?);
        let d = Destination {
            uid: row.get(0)?,
            owner: row.get(1)?,
            origin: row.get(2)?,
            firmware: row.get(3)?,
            partition: row.get(4)?,
            proto: row.get(5)?,
            direction: row.get(6)?,
            dst: row.get(7)?,
            port: row.get(8)?,
            host: row.get(9)?,
            host_source: row.get(10)?,
            country: row.get(11)?,
            asn: row.get(12)?,
            payload: row.get(13)?,
            leaks: serde_json::from_str(&leaks).unwrap_or_default(),
            connects: row.get::<_, i64>(15)? as u64,
            udp_sends: row.get::<_, i64>(16)? as u64,
            tx_packets: row.get::<_, i64>(17)? as u64,
            tx_bytes: row.get::<_, i64>(18)? as u64,
            first_seen: String::new(),
            last_seen: String::new(),
            before_unlock: row.get(21)?,
            build: row.get(22)?,
            kernel: row.get(23)?,
        };
        let key = (
            d.uid,
            d.owner.clone(),
            d.proto.clone(),
            d.direction.clone(),
            d.dst.clone(),
            d.port,
        );
        match summed.get_mut(&key) {
            None => {
                summed.insert(key, (d, first, last));
            }
            Some((sum, sum_first, sum_last)) => {
                merge(sum, d);
                *sum_first = (*sum_first).min(first);
                *sum_last = (*sum_last).max(last);
            }
        }
    }
    let mut out: Vec<Destination> = summed
        .into_values()
        .map(|(mut d, first, last)| {
            d.first_seen = rfc3339(first);
            d.last_seen = rfc3339(last);
            d
        })
        .collect();
    out.sort_by(|a, b| {
        b.tx_bytes
            .cmp(&a.tx_bytes)
            .then(b.connects.cmp(&a.connects))
            .then(a.owner.cmp(&b.owner))
    });
    Ok(out)
}

/// Adds a later row of the same destination to `sum`.
fn merge(sum: &mut Destination, later: Destination) {
    sum.connects += later.connects;
    sum.udp_sends += later.udp_sends;
    sum.tx_packets += later.tx_packets;
    sum.tx_bytes += later.tx_bytes;
    sum.before_unlock |= later.before_unlock;
    for leak in later.leaks {
        if !sum.leaks.contains(&leak) {
            sum.leaks.push(leak);
        }
    }
    if later.host.is_some() {
        sum.host = later.host;
        sum.host_source = later.host_source;
    }
    sum.country = later.country.or(sum.country.take());
    sum.asn = later.asn.or(sum.asn);
    sum.partition = later.partition.or(sum.partition.take());
    if later.payload != "unknown" {
        sum.payload = later.payload;
    }
    (sum.origin, sum.firmware) = (later.origin, later.firmware);
    (sum.build, sum.kernel) = (later.build, later.kernel);
}

fn rfc3339(secs: i64) -> String {
    let at = UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

pub(crate) fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

/// A point in time from the command line: a duration back from now
/// (`24h`, `7d`) or an RFC 3339 time.
pub(crate) fn parse_time(text: &str) -> Result<i64> {
    if let Ok(back) = humantime::parse_duration(text) {
        return Ok(now_secs() - back.as_secs() as i64);
    }
    let at = humantime::parse_rfc3339_weak(text).with_context(|| {
        format!("{text:?} is neither a duration (24h, 7d) nor a time (2026-12-01T08:00:00Z)")
    })?;
    Ok(at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_durations_or_instants() {
        let now = now_secs();
        let day = parse_time("1d").unwrap();
        assert!((now - 86_400 - day).abs() <= 1);
        assert_eq!(parse_time("2026-12-01T08:00:00Z").unwrap(), 1_796_112_000);
        let err = parse_time("yesterday").unwrap_err().to_string();
        assert!(err.contains("neither a duration"), "{err}");
    }
}
