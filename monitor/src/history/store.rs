//! The history database: its schema, opening it (a damaged file is moved
//! aside, never a reason to stop), the writes of each pass and retention.

use super::DB_FILE;
use crate::pipeline::flows::Description;
use crate::pipeline::tracker::{Counters, Tracker, Unwritten};
use anyhow::{bail, Context, Result};
use monitor_common::{FlowKey, FlowValue};
use rusqlite::{params, Connection, ErrorCode, OpenFlags};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Bumped when the schema changes incompatibly (an older file is moved
/// aside like a damaged one, with its own message).
const SCHEMA: i64 = 2;

const CREATE: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- What each uid sent to each destination, per hour (UTC, unix seconds / 3600).
CREATE TABLE IF NOT EXISTS destinations (
    hour INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    owner TEXT NOT NULL,
    origin TEXT NOT NULL,
    firmware INTEGER NOT NULL,
    partition TEXT,
    proto TEXT NOT NULL,
    direction TEXT NOT NULL,
    dst TEXT NOT NULL,
    port INTEGER NOT NULL,
    host TEXT,
    host_source TEXT,
    country TEXT,
    asn INTEGER,
    payload TEXT NOT NULL,
    leaks TEXT NOT NULL,
    connects INTEGER NOT NULL,
    udp_sends INTEGER NOT NULL,
    tx_packets INTEGER NOT NULL,
    tx_bytes INTEGER NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    before_unlock INTEGER NOT NULL,
    build TEXT NOT NULL,
    kernel TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    -- The kernel counters already written of the flow this row is of, in
    -- the flow map `map_id` of boot `boot_id`: what the next pass
    -- subtracts, read back after a restart from the newest row per flow.
    -- In the row itself, so that a pass writes one statement per flow.
    map_id INTEGER,
    flow_key BLOB,
    base_first_seen INTEGER,
    base_connects INTEGER,
    base_udp_sends INTEGER,
    base_tx_packets INTEGER,
    base_tx_bytes INTEGER,
    PRIMARY KEY (hour, uid, owner, proto, direction, dst, port, build)
);
";

/// Schema 1 kept each flow's written counters in a table of their own.
const FROM_SCHEMA_1: &str = "
ALTER TABLE destinations ADD COLUMN map_id INTEGER;
ALTER TABLE destinations ADD COLUMN flow_key BLOB;
ALTER TABLE destinations ADD COLUMN base_first_seen INTEGER;
ALTER TABLE destinations ADD COLUMN base_connects INTEGER;
ALTER TABLE destinations ADD COLUMN base_udp_sends INTEGER;
ALTER TABLE destinations ADD COLUMN base_tx_packets INTEGER;
ALTER TABLE destinations ADD COLUMN base_tx_bytes INTEGER;
";

const UPSERT: &str = "
INSERT INTO destinations (hour, uid, owner, origin, firmware, partition, proto, direction,
    dst, port, host, host_source, country, asn, payload, leaks, connects, udp_sends,
    tx_packets, tx_bytes, first_seen, last_seen, before_unlock, build, kernel, boot_id,
    map_id, flow_key, base_first_seen, base_connects, base_udp_sends, base_tx_packets,
    base_tx_bytes)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
    ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32, ?33)
ON CONFLICT (hour, uid, owner, proto, direction, dst, port, build) DO UPDATE SET
    origin = excluded.origin,
    firmware = excluded.firmware,
    partition = coalesce(excluded.partition, partition),
    host_source = CASE WHEN excluded.host IS NULL THEN host_source ELSE excluded.host_source END,
    host = coalesce(excluded.host, host),
    country = coalesce(excluded.country, country),
    asn = coalesce(excluded.asn, asn),
    payload = CASE WHEN excluded.payload = 'unknown' THEN payload ELSE excluded.payload END,
    leaks = CASE WHEN excluded.leaks = '[]' THEN leaks ELSE (
        SELECT json_group_array(value) FROM (
            SELECT value FROM json_each(leaks) UNION SELECT value FROM json_each(excluded.leaks)))
        END,
    connects = connects + excluded.connects,
    udp_sends = udp_sends + excluded.udp_sends,
    tx_packets = tx_packets + excluded.tx_packets,
    tx_bytes = tx_bytes + excluded.tx_bytes,
    first_seen = min(first_seen, excluded.first_seen),
    last_seen = max(last_seen, excluded.last_seen),
    before_unlock = max(before_unlock, excluded.before_unlock),
    kernel = excluded.kernel,
    boot_id = excluded.boot_id,
    map_id = excluded.map_id,
    flow_key = excluded.flow_key,
    base_first_seen = excluded.base_first_seen,
    base_connects = excluded.base_connects,
    base_udp_sends = excluded.base_udp_sends,
    base_tx_packets = excluded.base_tx_packets,
    base_tx_bytes = excluded.base_tx_bytes";

/// How long history is kept and how large it may grow.
#[derive(Clone, Debug)]
pub(crate) struct HistoryOptions {
    pub(crate) dir: PathBuf,
    pub(crate) retain_days: u32,
    pub(crate) max_bytes: u64,
    /// How often every flow that moved is written (evicted flows are
    /// written when found gone, everything when the agent stops).
    pub(crate) write_every: Duration,
}

/// The kernel counters of one flow already written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Baseline {
    first_seen: u64,
    connects: u64,
    udp_sends: u64,
    tx_packets: u64,
    tx_bytes: u64,
}

impl Baseline {
    fn counters(&self) -> Counters {
        Counters {
            connects: self.connects,
            udp_sends: self.udp_sends,
            tx_packets: self.tx_packets,
            tx_bytes: self.tx_bytes,
        }
    }

    /// What `now` adds to what was written of the flow; all of `now` when
    /// nothing was (or when a counter went back, which a flow's never do).
    fn delta(written: &Counters, now: &FlowValue) -> Option<(Counters, bool)> {
        let now = Counters::from(now);
        let fresh = *written == Counters::default()
            || now.connects < written.connects
            || now.udp_sends < written.udp_sends
            || now.tx_packets < written.tx_packets
            || now.tx_bytes < written.tx_bytes;
        let delta = if fresh {
            now
        } else {
            Counters {
                connects: now.connects - written.connects,
                udp_sends: now.udp_sends - written.udp_sends,
                tx_packets: now.tx_packets - written.tx_packets,
                tx_bytes: now.tx_bytes - written.tx_bytes,
            }
        };
        let moved = delta.connects | delta.udp_sends | delta.tx_packets | delta.tx_bytes != 0;
        moved.then_some((delta, fresh))
    }
}

/// The build, kernel and boot rows are written under.
#[derive(Clone, Debug)]
struct SeenUnder {
    build: String,
    kernel: String,
    boot_id: String,
    map_id: u32,
}

/// Whether the device's user storage is still locked since boot (Android's
/// file-based encryption: nothing but direct-boot-aware code runs yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unlock {
    /// The device says nothing of it (Linux, or no such property).
    Unknown,
    Locked,
    Unlocked,
}

/// Android's property for user 0's credential-encrypted storage: "true"
/// once the user unlocked after boot (set by vold; see AOSP
/// system/vold/VoldNativeService / StorageManagerService).
const CE_AVAILABLE: &str = "sys.user.0.ce_available";

impl Unlock {
    fn read() -> Unlock {
        let getprop = |name: &str| {
            std::process::Command::new("/system/bin/getprop")
                .arg(name)
                .output()
                .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
                .unwrap_or_default()
        };
        if !Path::new("/system/bin/getprop").exists() {
            return Unlock::Unknown;
        }
        let ce = getprop(CE_AVAILABLE);
        if ce == "true" {
            return Unlock::Unlocked;
        }
        Unlock::parse(&ce, &getprop("ro.crypto.type"))
    }

    /// Locked only where the device encrypts per file and has not said the
    /// user's storage is available yet.
    fn parse(ce_available: &str, crypto_type: &str) -> Unlock {
        match (ce_available, crypto_type) {
            ("true", _) => Unlock::Unlocked,
            ("false" | "", "file") => Unlock::Locked,
            _ => Unlock::Unknown,
        }
    }
}

/// What `status` shows of the history.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct HistoryStatus {
    pub(crate) path: PathBuf,
    /// Passes whose writes failed (each retried by the next).
    pub(crate) failed_passes: u64,
    /// Damaged databases this agent moved aside.
    pub(crate) moved_aside: Vec<PathBuf>,
}

/// The agent's writer of history.
pub(crate) struct History {
    path: PathBuf,
    db: Connection,
    options: HistoryOptions,
    context: SeenUnder,
    /// What the database holds of flows the tracker has not been told of
    /// yet: read at start (and after a failed write), handed to the
    /// tracker's flows by the next pass; what is left then is of flows
    /// gone meanwhile. The tracker keeps the rest (`written`).
    pending: HashMap<FlowKey, Baseline, foldhash::fast::RandomState>,
    /// A write failed: the tracker's `written` may be ahead of the
    /// database.
    stale: bool,
    /// Schema 1's table of written counters is still there: read at
    /// start, dropped by the first write.
    legacy_baselines: bool,
    /// Flows evicted before their counters were all written, until a
    /// write commits them.
    evicted: Vec<Unwritten>,
    /// A pass changed something since the last write of every flow.
    owed: bool,
    last_write: Option<Instant>,
    /// Makes the next write fail just before its commit.
    #[cfg(test)]
    fail_next: bool,
    unlock: Unlock,
    last_trim: Option<Instant>,
    failed_passes: u64,
    moved_aside: Vec<PathBuf>,
}

/// Moves a damaged database (and its WAL files) aside; returns the new name.
fn move_aside(path: &Path, why: &str) -> Result<PathBuf> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let aside = path.with_file_name(format!("{DB_FILE}.corrupt-{stamp}"));
    std::fs::rename(path, &aside)
        .with_context(|| format!("moving the damaged {} aside", path.display()))?;
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if side.exists() {
            let _ = std::fs::rename(&side, format!("{}{suffix}", aside.display()));
        }
    }
    log::warn!(
        "history database {} {why}: moved it aside to {} and started a new one \
         (read the old one with `egressmon report --state-dir {}`, or delete it)",
        path.display(),
        aside.display(),
        aside.display()
    );
    Ok(aside)
}

fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// Opens (creating) the database at `path`, root's alone, in WAL mode, and
/// checks it; `Err(Some(why))` when it is damaged or of another schema.
fn open_checked(path: &Path) -> std::result::Result<Connection, (anyhow::Error, bool)> {
    let plain = |e: anyhow::Error| (e, false);
    create_private(path).map_err(plain)?;
    let db = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {}", path.display()))
    .map_err(plain)?;
    let setup = || -> rusqlite::Result<String> {
        db.busy_timeout(Duration::from_secs(5))?;
        // Only takes effect before the first table: freed pages can then
        // be handed back (see `trim`).
        db.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        // 512 KiB of page cache (SQLite's default is 8 MiB): the agent's
        // rows are written, rarely read back; a bigger cache saved little
        // CPU in a burst of new flows and cost its size in RSS.
        db.pragma_update(None, "cache_size", -512)?;
        let check: String = db.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Ok(check);
        }
        db.execute_batch(CREATE)?;
        Ok(check)
    };
    match setup() {
        Ok(check) if check == "ok" => {}
        Ok(check) => return Err((anyhow::anyhow!("fails its integrity check ({check})"), true)),
        Err(e) if is_damage(&e) => return Err((anyhow::anyhow!("is damaged ({e})"), true)),
        Err(e) => {
            return Err(plain(
                anyhow::Error::new(e).context(format!("preparing {}", path.display())),
            ))
        }
    }
    let schema: Option<String> = db
        .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
            r.get(0)
        })
        .ok();
    match schema.as_deref().map(str::parse::<i64>) {
        None => {
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                [SCHEMA.to_string()],
            )
            .map_err(|e| plain(e.into()))?;
        }
        Some(Ok(SCHEMA)) => {}
        Some(Ok(1)) => {
            let upgrade = || -> rusqlite::Result<()> {
                db.execute_batch(&format!(
                    "BEGIN; {FROM_SCHEMA_1} UPDATE meta SET value = '{SCHEMA}' \
                     WHERE key = 'schema'; COMMIT;"
                ))
            };
            upgrade().map_err(|e| plain(anyhow::Error::new(e).context("upgrading its schema")))?;
        }
        Some(_) => {
            return Err((
                anyhow::anyhow!("has a schema this egressmon does not know"),
                true,
            ))
        }
    }
    Ok(db)
}

/// Creates `path` 0600 when missing; refuses a symlink or a file another
/// user owns or may read.
fn create_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| {
            format!(
                "opening {} (a symbolic link there is refused)",
                path.display()
            )
        })?;
    let meta = file.metadata()?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me || meta.mode() & 0o077 != 0 || meta.nlink() != 1 {
        bail!(
            "{} must be a file of root's that no one else may read or write (chown root {0}; \
             chmod 600 {0})",
            path.display()
        );
    }
    Ok(())
}

impl History {
    /// Opens the history in `options.dir` for the flow map `map_id` of this
    /// boot: only its flows' baselines are read back.
    pub(crate) fn open(options: HistoryOptions, map_id: u32) -> Result<History> {
        crate::serve::private_fs::ensure_private_dir(&options.dir).with_context(|| {
            format!(
                "the state directory {} (--state-dir)",
                options.dir.display()
            )
        })?;
        let path = options.dir.join(DB_FILE);
        let mut moved_aside = Vec::new();
        let db = match open_checked(&path) {
            Ok(db) => db,
            Err((why, true)) => {
                moved_aside.push(move_aside(&path, &why.to_string())?);
                open_checked(&path).map_err(|(e, _)| e)?
            }
            Err((e, false)) => return Err(e),
        };
        let context = SeenUnder {
            build: build_fingerprint(),
            kernel: crate::bpf::system::kernel_release(),
            boot_id: crate::serve::state::boot_id(),
            map_id,
        };
        let mut history = History {
            path,
            db,
            options,
            context,
            pending: HashMap::default(),
            stale: false,
            legacy_baselines: false,
            evicted: Vec::new(),
            owed: false,
            last_write: None,
            #[cfg(test)]
            fail_next: false,
            unlock: Unlock::Unknown,
            last_trim: None,
            failed_passes: 0,
            moved_aside,
        };
        history.legacy_baselines = history
            .db
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'baselines'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .context("reading the database's tables")?
            > 0;
        history.load_baselines()?;
        history.trim();
        Ok(history)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn status(&self) -> HistoryStatus {
        HistoryStatus {
            path: self.path.clone(),
            failed_passes: self.failed_passes,
            moved_aside: self.moved_aside.clone(),
        }
    }

    /// Reads back the newest written counters of each flow of this boot's
    /// flow map `map_id` (and, once, schema 1's table of them).
    fn load_baselines(&mut self) -> Result<()> {
        let SeenUnder {
            boot_id, map_id, ..
        } = &self.context;
        let mut read = |sql: &str, args: &[&dyn rusqlite::ToSql]| -> Result<()> {
            let mut stmt = self.db.prepare(sql)?;
            let rows = stmt.query_map(args, |r| {
                let key: Vec<u8> = r.get(0)?;
                let numbers: [i64; 5] = [r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?];
                Ok((key, numbers))
            })?;
            // Oldest first: a flow's newest row has the last word.
            for row in rows {
                let (key, n) = row?;
                if let Some(key) = key_from_bytes(&key) {
                    let base = Baseline {
                        first_seen: n[0] as u64,
                        connects: n[1] as u64,
                        udp_sends: n[2] as u64,
                        tx_packets: n[3] as u64,
                        tx_bytes: n[4] as u64,
                    };
                    self.pending.insert(key, base);
                }
            }
            Ok(())
        };
        if self.legacy_baselines {
            read(
                "SELECT key, first_seen, connects, udp_sends, tx_packets, tx_bytes FROM baselines \
                 WHERE boot_id = ?1 AND map_id = ?2",
                params![boot_id, map_id],
            )?;
        }
        // Only rows since this boot can be of its maps.
        read(
            "SELECT flow_key, base_first_seen, base_connects, base_udp_sends, base_tx_packets, \
             base_tx_bytes FROM destinations WHERE hour >= ?1 AND boot_id = ?2 AND map_id = ?3 \
             AND flow_key IS NOT NULL ORDER BY hour, last_seen",
            params![wall_secs(0) / 3600 - 1, boot_id, map_id],
        )
        .context("reading back what was written of this boot's flows")
    }

    /// After each pass: every `write_every` (and when the agent stops),
    /// writes what the kernel counted since the last write, in one
    /// transaction; flows the kernel evicted meanwhile are written at the
    /// pass that finds them gone. On failure nothing is written and the
    /// next pass writes it; a database found damaged is moved aside and a
    /// new one started.
    pub(crate) fn after_pass(&mut self, tracker: &mut Tracker, changed: bool, stopping: bool) {
        self.owed |= changed;
        let evicted = tracker.take_unwritten();
        if self.evicted.is_empty() {
            self.evicted = evicted;
        } else {
            self.evicted.extend(evicted);
        }
        let due = stopping
            || self
                .last_write
                .is_none_or(|t| t.elapsed() >= self.options.write_every);
        let all = self.owed && due;
        if all || !self.evicted.is_empty() {
            self.record(tracker, all);
        }
        if self
            .last_trim
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            self.trim();
        }
    }

    /// Whether the next pass has something to write even if no flow moved:
    /// evicted flows a failed write left, or moved flows now due.
    pub(crate) fn wants_pass(&self) -> bool {
        !self.evicted.is_empty()
            || (self.owed
                && self
                    .last_write
                    .is_none_or(|t| t.elapsed() >= self.options.write_every))
    }

    /// Writes the evicted flows, and with `all` every tracked flow that
    /// moved.
    fn record(&mut self, tracker: &mut Tracker, all: bool) {
        if self.unlock != Unlock::Unlocked {
            self.unlock = Unlock::read();
        }
        match self.write(tracker, all) {
            Ok(()) if all => {
                self.owed = false;
                self.last_write = Some(Instant::now());
            }
            Ok(()) => {}
            Err(e) if e.downcast_ref::<rusqlite::Error>().is_some_and(is_damage) => {
                self.start_over(&format!("was damaged while writing ({e})"))
            }
            Err(e) => {
                self.failed_passes += 1;
                // The transaction rolled back: the next pass reads back
                // what the database holds before it subtracts anything.
                self.stale = true;
                if self.failed_passes.is_power_of_two() {
                    log::warn!(
                        "writing history to {}: {e:#} (retried at the next pass; {} passes \
                         failed so far; check the disk's free space)",
                        self.path.display(),
                        self.failed_passes
                    );
                }
            }
        }
    }

    fn start_over(&mut self, why: &str) {
        match move_aside(&self.path, why).and_then(|aside| {
            let db = open_checked(&self.path).map_err(|(e, _)| e)?;
            Ok((aside, db))
        }) {
            Ok((aside, db)) => {
                self.db = db;
                self.moved_aside.push(aside);
                self.pending.clear();
                self.stale = true;
            }
            Err(e) => {
                self.failed_passes += 1;
                log::warn!("{e:#}");
            }
        }
    }

    fn write(&mut self, tracker: &mut Tracker, all: bool) -> Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        let before_unlock = self.unlock == Unlock::Locked;
        if self.stale {
            // The last write rolled back: start again from what the
            // database holds.
            tracker.reset_written();
            for flow in &mut self.evicted {
                flow.written = Counters::default();
            }
            self.pending.clear();
            self.load_baselines()?;
            self.stale = false;
        }
        let tx = self.db.transaction()?;
        let result = (|| -> Result<()> {
            let mut upsert = tx.prepare_cached(UPSERT)?;
            let ctx = &self.context;
            let pending = &mut self.pending;
            let mut row = |key: &FlowKey,
                           value: &FlowValue,
                           description: &Description,
                           written: &mut Counters|
             -> Result<()> {
                if let Some(held) = pending.remove(key) {
                    if held.first_seen == 0
                        || value.first_seen == 0
                        || held.first_seen == value.first_seen
                    {
                        *written = held.counters();
                    }
                }
                let Some((delta, fresh)) = Baseline::delta(written, value) else {
                    return Ok(());
                };
                let first_seen = if fresh && value.first_seen != 0 {
                    wall_secs(value.first_seen).min(now)
                } else {
                    now
                };
                // Fields read in place: no record is built per flow.
                let sender = description.sender();
                let (host, host_source) = description.host();
                let (country, asn) = description.place();
                let leaks = match description.leaks() {
                    [] => "[]".to_string(),
                    leaks => serde_json::to_string(leaks)?,
                };
                let direction = if crate::pipeline::flows::is_inbound(key) {
                    "inbound"
                } else {
                    "outbound"
                };
                upsert.execute(params![
                    now / 3600,
                    key.uid,
                    sender.owner,
                    sender.origin.as_str(),
                    sender.firmware,
                    sender.partition,
                    crate::pipeline::vocab::Proto::from_number(key.proto).as_str(),
                    direction,
                    crate::pipeline::flows::destination(key).to_string(),
                    key.port,
                    host,
                    host_source,
                    country,
                    asn,
                    description.payload().as_str(),
                    leaks,
                    delta.connects as i64,
                    delta.udp_sends as i64,
                    delta.tx_packets as i64,
                    delta.tx_bytes as i64,
                    first_seen,
                    now,
                    before_unlock,
                    ctx.build,
                    ctx.kernel,
                    ctx.boot_id,
                    ctx.map_id,
                    key_bytes(key),
                    value.first_seen as i64,
                    value.connects as i64,
                    value.udp_sends as i64,
                    value.tx_packets as i64,
                    value.tx_bytes as i64,
                ])?;
                *written = value.into();
                Ok(())
            };
            self.evicted
                .sort_unstable_by_key(|flow| row_order(&flow.key));
            for flow in &mut self.evicted {
                row(&flow.key, &flow.value, &flow.description, &mut flow.written)?;
            }
            if !all {
                return Ok(());
            }
            tracker.for_each_written(row_order, row)?;
            if self.legacy_baselines {
                tx.execute_batch("DROP TABLE baselines")?;
            }
            #[cfg(test)]
            if std::mem::take(&mut self.fail_next) {
                anyhow::bail!("injected failure");
            }
            Ok(())
        })();
        match result.and_then(|()| Ok(tx.commit()?)) {
            Ok(()) => {
                self.evicted = Vec::new();
                if all {
                    // Held for flows no pass found: gone (their rows'
                    // counters are never read again: a flow made anew
                    // starts at zero with another first_seen).
                    self.pending = HashMap::default();
                    self.legacy_baselines = false;
                }
                Ok(())
            }
            Err(e) => {
                self.stale = true;
                Err(e)
            }
        }
    }

    /// Drops hours older than `--retain-days`, then the oldest hours while
    /// the database is over its size cap, and hands freed pages back.
    fn trim(&mut self) {
        self.last_trim = Some(Instant::now());
        if let Err(e) = self.trim_now() {
            log::warn!("trimming history {}: {e:#}", self.path.display());
        }
    }

    fn trim_now(&mut self) -> Result<()> {
        let hour = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64
            / 3600;
        let oldest_kept = hour - i64::from(self.options.retain_days) * 24;
        let mut dropped = self
            .db
            .execute("DELETE FROM destinations WHERE hour < ?1", [oldest_kept])?;
        while self.used_bytes()? > self.options.max_bytes {
            let removed = self.db.execute(
                "DELETE FROM destinations WHERE hour = (SELECT min(hour) FROM destinations) \
                 AND hour < ?1",
                [hour],
            )?;
            if removed == 0 {
                break;
            }
            dropped += removed;
        }
        if dropped > 0 {
            self.db.execute_batch("PRAGMA incremental_vacuum")?;
            log::info!(
                "history: dropped {dropped} rows (older than {} days or over {} MiB)",
                self.options.retain_days,
                self.options.max_bytes >> 20
            );
        }
        Ok(())
    }

    fn used_bytes(&self) -> Result<u64> {
        let pages: i64 = self.db.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let free: i64 = self
            .db
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        let size: i64 = self.db.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        Ok(((pages - free).max(0) * size) as u64)
    }
}

fn wall_secs(boot_ns: u64) -> i64 {
    crate::bpf::system::boot_ns_to_system_time(boot_ns)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

/// Where a flow's row sits in the primary key (uid, owner, proto,
/// direction, dst, port): rows written in this order touch each index page
/// once. Addresses go by their bytes, which for most follows their text.
fn row_order(key: &FlowKey) -> (u32, u8, bool, u8, [u8; 16], u16) {
    let inbound = crate::pipeline::flows::is_inbound(key);
    (key.uid, key.proto, !inbound, key.family, key.addr, key.port)
}

fn key_bytes(key: &FlowKey) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..4].copy_from_slice(&key.uid.to_le_bytes());
    out[4..6].copy_from_slice(&key.port.to_le_bytes());
    out[6] = key.proto;
    out[7] = key.family;
    out[8..].copy_from_slice(&key.addr);
    out
}

fn key_from_bytes(bytes: &[u8]) -> Option<FlowKey> {
    let bytes: &[u8; 24] = bytes.try_into().ok()?;
    Some(FlowKey {
        uid: u32::from_le_bytes(bytes[..4].try_into().ok()?),
        port: u16::from_le_bytes(bytes[4..6].try_into().ok()?),
        proto: bytes[6],
        family: bytes[7],
        addr: bytes[8..].try_into().ok()?,
    })
}

/// What build this is: Android's build fingerprint, or the Linux
/// distribution's name and version.
fn build_fingerprint() -> String {
    for file in ["/system/build.prop", "/system/system/build.prop"] {
        if let Ok(text) = std::fs::read_to_string(file) {
            if let Some(found) = prop_value(
                &text,
                &["ro.system.build.fingerprint", "ro.build.fingerprint"],
            ) {
                return found;
            }
        }
    }
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| os_release_name(&text))
        .unwrap_or_else(|| "unknown".into())
}

fn prop_value(text: &str, names: &[&str]) -> Option<String> {
    names.iter().find_map(|name| {
        text.lines().find_map(|line| {
            let (k, v) = line.split_once('=')?;
            (k.trim() == *name && !v.trim().is_empty()).then(|| v.trim().to_string())
        })
    })
}

fn os_release_name(text: &str) -> Option<String> {
    let unquote = |v: &str| v.trim().trim_matches('"').to_string();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('=').map(unquote))
    };
    field("PRETTY_NAME").or_else(|| field("NAME"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_continue_a_flow_and_start_over_when_nothing_was_written() {
        let value = |bytes| FlowValue {
            tx_bytes: bytes,
            tx_packets: bytes / 100,
            ..Default::default()
        };
        let nothing = Counters::default();
        assert_eq!(
            Baseline::delta(&nothing, &value(300)).unwrap().0.tx_bytes,
            300
        );
        let written = Counters::from(&value(300));
        assert!(Baseline::delta(&written, &value(300)).is_none());
        let (d, fresh) = Baseline::delta(&written, &value(500)).unwrap();
        assert_eq!((d.tx_bytes, d.tx_packets, fresh), (200, 2, false));
        let (d, fresh) = Baseline::delta(&written, &value(200)).unwrap();
        assert_eq!((d.tx_bytes, fresh), (200, true));
    }

    #[test]
    fn locked_only_where_the_device_says_so() {
        assert_eq!(Unlock::parse("", "file"), Unlock::Locked);
        assert_eq!(Unlock::parse("false", "file"), Unlock::Locked);
        assert_eq!(Unlock::parse("true", "file"), Unlock::Unlocked);
        assert_eq!(Unlock::parse("", "block"), Unlock::Unknown);
        assert_eq!(Unlock::parse("", ""), Unlock::Unknown);
    }

    #[test]
    fn keys_round_trip() {
        let key = FlowKey {
            uid: 10123,
            port: 443,
            proto: 6,
            family: 2,
            addr: [7; 16],
        };
        assert_eq!(key_from_bytes(&key_bytes(&key)), Some(key));
        assert_eq!(key_from_bytes(&[0; 23]), None);
    }

    #[test]
    fn build_names() {
        let props = "# x\nro.build.fingerprint=google/oriole/oriole:14/AP2A/1:user/release-keys\n";
        assert_eq!(
            prop_value(
                props,
                &["ro.system.build.fingerprint", "ro.build.fingerprint"]
            )
            .as_deref(),
            Some("google/oriole/oriole:14/AP2A/1:user/release-keys")
        );
        let os = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n";
        assert_eq!(
            os_release_name(os).as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
    }

    #[test]
    fn a_truncated_database_is_moved_aside_and_a_new_one_works() {
        let dir = std::env::temp_dir().join(format!("egm-history-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(DB_FILE);
        drop(open_checked(&path).map_err(|(e, _)| e).unwrap());
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len > 0);
        let garbage = vec![0x5au8; 3000];
        std::fs::write(&path, garbage).unwrap();
        let Err((why, damaged)) = open_checked(&path) else {
            panic!("damage not found");
        };
        assert!(damaged, "{why:#}");
        let aside = move_aside(&path, "test").unwrap();
        assert!(aside.exists());
        open_checked(&path).map_err(|(e, _)| e).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    use crate::pipeline::tracker::{Describe, TrackerOptions};

    /// Every uid is radio, a platform daemon.
    struct Radio;

    impl Describe for Radio {
        fn record(
            &self,
            key: &FlowKey,
            value: &FlowValue,
            meta: Option<&crate::identity::events::FlowMeta>,
        ) -> crate::pipeline::flows::FlowRecord {
            crate::pipeline::flows::record(key, value, &self.owner(key.uid), meta)
        }
        fn owner(&self, uid: u32) -> crate::identity::owners::Owner {
            crate::identity::owners::Owner {
                uid,
                user: 0,
                app_id: uid,
                owner: "radio".into(),
                packages: vec![],
                origin: crate::pipeline::vocab::Origin::Platform,
                firmware: true,
            }
        }
    }

    fn new_tracker() -> Tracker {
        let mut tracker = Tracker::new(TrackerOptions {
            capacity: 16,
            update_every: Duration::from_secs(60),
            idle_after: Duration::from_secs(300),
            emit: false,
            rules: crate::pipeline::rules::Rules::none(),
        });
        tracker.keep_unwritten();
        tracker
    }

    fn scratch(name: &str, write_every: Duration) -> HistoryOptions {
        let dir = std::env::temp_dir().join(format!("egm-history-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        HistoryOptions {
            dir,
            retain_days: 90,
            max_bytes: 64 << 20,
            write_every,
        }
    }

    /// The bytes `report` reads.
    fn total(dir: &Path) -> u64 {
        let db = crate::history::rows::open(&dir.join(DB_FILE)).unwrap();
        let rows = crate::history::rows::read(&db, &Default::default()).unwrap();
        rows.iter().map(|d| d.tx_bytes).sum()
    }

    fn udp_flow(port: u16) -> FlowKey {
        FlowKey {
            uid: 1001,
            port,
            proto: monitor_common::PROTO_UDP,
            family: monitor_common::FAMILY_IPV4,
            addr: [10, 200, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    fn sent(bytes: u64) -> FlowValue {
        FlowValue {
            udp_sends: bytes / 100,
            tx_packets: bytes / 100,
            tx_bytes: bytes,
            first_seen: 1,
            ..Default::default()
        }
    }

    /// Between writes of every flow, an evicted flow is written at the
    /// pass that finds it gone, and everything when the agent stops.
    #[test]
    fn evicted_flows_and_a_stop_are_written_between_writes() {
        let options = scratch("between", Duration::from_secs(3600));
        let dir = options.dir.clone();
        let mut tracker = new_tracker();
        let mut history = History::open(options, 7).unwrap();
        let start = Instant::now();
        let (a, b) = (udp_flow(9001), udp_flow(9002));
        let mut pass = |at: u64, flows: &[(FlowKey, FlowValue)], stopping: bool| {
            tracker.tick(start + Duration::from_secs(at), flows, &Radio, &mut |_| {});
            let changed = tracker.take_dirty();
            history.after_pass(&mut tracker, changed, stopping);
            total(&dir)
        };
        assert_eq!(pass(1, &[(a, sent(100)), (b, sent(1000))], false), 1100);
        assert_eq!(
            pass(2, &[(a, sent(300)), (b, sent(2000))], false),
            1100,
            "not due"
        );
        assert_eq!(
            pass(3, &[(b, sent(2500))], false),
            1300,
            "a's last 200 bytes"
        );
        assert_eq!(
            pass(4, &[(b, sent(2600))], true),
            2900,
            "b's 1600 bytes at stop"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Passes of a tracker holding one flow, written to a history in a
    /// scratch directory: `report`'s bytes after each step.
    #[test]
    fn a_failed_write_a_restart_and_new_maps_neither_double_nor_lose() {
        let options = scratch("passes", Duration::ZERO);
        let dir = options.dir.clone();
        let mut tracker = new_tracker();
        let key = udp_flow(9001);
        let start = Instant::now();
        let mut step = 0;
        let mut pass = |tracker: &mut Tracker, history: &mut History, bytes: u64| {
            step += 1;
            let at = start + Duration::from_secs(step);
            tracker.tick(at, &[(key, sent(bytes))], &Radio, &mut |_| {});
            history.after_pass(tracker, true, false);
        };
        let mut history = History::open(options.clone(), 7).unwrap();
        pass(&mut tracker, &mut history, 300);
        assert_eq!(total(&dir), 300);
        history.fail_next = true;
        pass(&mut tracker, &mut history, 500);
        assert_eq!(
            (total(&dir), history.failed_passes),
            (300, 1),
            "rolled back"
        );
        pass(&mut tracker, &mut history, 700);
        assert_eq!(
            total(&dir),
            700,
            "the failed pass's bytes come with the next"
        );
        drop(history);
        // A restart on the same maps: the database's baselines, no doubling.
        let mut history = History::open(options.clone(), 7).unwrap();
        pass(&mut tracker, &mut history, 800);
        assert_eq!(total(&dir), 800);
        drop(history);
        // New maps (the old one's id is gone): counters start over and add.
        let options_again = options.clone();
        let mut history = History::open(options, u32::MAX - 1).unwrap();
        let mut fresh = new_tracker();
        pass(&mut fresh, &mut history, 50);
        assert_eq!(total(&dir), 850);
        drop(history);
        // Written by schema 1 (baselines in a table of their own), then
        // upgraded: its baselines still count, once.
        let db = Connection::open(dir.join(DB_FILE)).unwrap();
        let columns = FROM_SCHEMA_1
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5));
        for column in columns {
            db.execute_batch(&format!("ALTER TABLE destinations DROP COLUMN {column}"))
                .unwrap();
        }
        db.execute_batch(&format!(
            "UPDATE meta SET value = '1' WHERE key = 'schema';
             CREATE TABLE baselines (boot_id TEXT NOT NULL, map_id INTEGER NOT NULL,
                 key BLOB NOT NULL, first_seen INTEGER NOT NULL, connects INTEGER NOT NULL,
                 udp_sends INTEGER NOT NULL, tx_packets INTEGER NOT NULL,
                 tx_bytes INTEGER NOT NULL, PRIMARY KEY (boot_id, map_id, key)) WITHOUT ROWID;
             INSERT INTO baselines VALUES ('{}', {}, x'{}', 1, 0, 0, 0, 50);",
            crate::serve::state::boot_id(),
            u32::MAX - 1,
            key_bytes(&key)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ))
        .unwrap();
        drop(db);
        let mut history = History::open(options_again, u32::MAX - 1).unwrap();
        assert!(history.legacy_baselines);
        let mut restarted = new_tracker();
        pass(&mut restarted, &mut history, 60);
        assert_eq!(total(&dir), 860, "schema 1's baseline subtracted");
        assert!(!history.legacy_baselines, "its table dropped");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
