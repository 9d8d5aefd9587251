//! What the agent derives from the kernel's counters, kept across its own
//! restarts (a clean stop or `kill -9`): per-country bytes, cleartext flows,
//! alerts, netd's totals, and per flow what was already accounted for — the
//! bytes already added to its country, whether its flow_start was logged,
//! which rules alerted, its first-payload verdict and sender.
//!
//! Two files in the agent's root-only run directory, named after the pin
//! directory, each replaced whole (temporary file + rename, 0600):
//! - the pass state, written at the end of every pass that changed
//!   something, while the pass still holds the tracker: no reader (metrics,
//!   status) ever sees a value that is not on disk, so counters never go
//!   back after a restart;
//! - the scrape state (uids with their own series, netd's totals), written
//!   by a scrape before it answers, for the same reason.
//!
//! Log lines are written during a pass, before its state: a restarted agent
//! reads the `--log` lines written after the saved position (following
//! rotation by inode) and applies them (`Tracker::replay`), so a flow_start
//! or alert is never written twice nor lost. A state is used only with the
//! same pinned flow map (same boot, same map id): pins made anew start from
//! zero, like the kernel's own counters.
//!
//! The files live as long as the pins they describe: an agent removes those
//! of pin directories that are gone when it starts.

mod codec;
mod log_tail;
mod rearm;

pub(crate) use rearm::PayloadRearm;

use crate::bpf::netd_stats::{NetdSnapshot, StatsKey, StatsValue, UidTraffic};
use crate::enrich::destinations::{Destinations, FlowInfo};
use crate::identity::events::{FlowMeta, Sender};
use crate::identity::owners::Owner;
use crate::pipeline::tracker::{Counters, SavedFlow, SavedTotals, Tracker};
use crate::pipeline::vocab::Origin;
use anyhow::{bail, Context, Result};
use codec::{Dec, Enc};
use log_tail::LogPosition;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const MAGIC: &[u8; 16] = b"egressmon-state\n";
/// 2: identifier leaks (per flow, counted per flow, and in totals), the
/// sender's SELinux context.
const FORMAT: u64 = 2;
const END: &[u8; 4] = b"end\n";
const PREFIX: &str = "state-";
const PASS_SUFFIX: &str = ".pass";
const SCRAPE_SUFFIX: &str = ".scrape";

/// Which kernel objects a state describes: the pinned flow map of one boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) boot_id: String,
    pub(crate) flows_map_id: u32,
}

impl Identity {
    pub(crate) fn of_flows_map(map: std::os::fd::BorrowedFd<'_>) -> Result<Identity> {
        let info = crate::bpf_sys::map_info(map).context("reading the flow map's id")?;
        Ok(Identity {
            boot_id: boot_id(),
            flows_map_id: info.id,
        })
    }
}

/// This boot's id (empty if unreadable).
pub(crate) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The default `--run-dir` (the same as the CLI's): where the state goes
/// when the caller names no directory.
pub fn default_dir() -> PathBuf {
    PathBuf::from(if Path::new("/system/build.prop").exists() {
        "/data/adb/egressmon"
    } else {
        "/run/egressmon"
    })
}

/// `pin_dir` as one file name (see `serve::escape`): two pin directories
/// never share a name.
fn escape(pin_dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    crate::serve::escape::encode(pin_dir.as_os_str().as_bytes())
}

fn unescape(name: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(crate::serve::escape::decode(
        name,
    )))
}

/// Longest escaped pin directory used as it is in a file name (names are
/// at most 255 bytes); longer ones are hashed, and then never removed as
/// stale, only with their pins (`remove`).
const MAX_ESCAPED: usize = 200;

/// The state files of the agent using `pin_dir`.
fn paths(dir: &Path, pin_dir: &Path) -> [PathBuf; 2] {
    use sha2::Digest;
    let pin_dir = std::fs::canonicalize(pin_dir).unwrap_or_else(|_| pin_dir.to_path_buf());
    let mut name = escape(&pin_dir);
    if name.len() > MAX_ESCAPED {
        let hash = sha2::Sha256::digest(name.as_bytes());
        name = hash.iter().take(16).map(|b| format!("{b:02x}")).collect();
    }
    let stem = format!("{PREFIX}{name}");
    [
        dir.join(format!("{stem}{PASS_SUFFIX}")),
        dir.join(format!("{stem}{SCRAPE_SUFFIX}")),
    ]
}

/// Removes the state files of `pin_dir` from `dir` (after `detach`);
/// returns those removed.
pub fn remove(dir: &Path, pin_dir: &Path) -> Vec<PathBuf> {
    paths(dir, pin_dir)
        .into_iter()
        .filter(|p| std::fs::remove_file(p).is_ok())
        .collect()
}

/// Removes state files in `dir` (and temporary ones left by an agent killed
/// while writing) whose pin directories hold no pins any more: detached,
/// or a reboot emptied bpffs.
fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let rest = rest.strip_suffix(".tmp").unwrap_or(rest);
        let stem = rest
            .strip_suffix(PASS_SUFFIX)
            .or_else(|| rest.strip_suffix(SCRAPE_SUFFIX));
        let stale = stem
            .map(unescape)
            .is_some_and(|pin_dir| !crate::bpf::pins::PinDir::new(&pin_dir).has_pins());
        if stale && std::fs::remove_file(entry.path()).is_ok() {
            log::debug!("removed stale state {}", entry.path().display());
        }
    }
}

/// Replaces `path` with what `fill` writes: a new 0600 file, renamed over
/// it, so a reader (or an agent killed meanwhile) sees the old file or the
/// new one, whole. No fsync: the state lives no longer than the pins it
/// describes, which a reboot drops.
fn replace(
    path: &Path,
    fill: impl FnOnce(&mut Enc<&mut File>) -> io::Result<()>,
) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    let mut file = file;
    let mut enc = Enc::new(&mut file);
    let written = fill(&mut enc).and_then(|()| enc.finish().map(drop));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)
}

/// Opens a state file, `None` when there is none. Only a regular file of
/// this process's user that no one else may write is read: the state
/// decides which lines are written and what counters say.
fn open(path: &Path) -> Result<Option<BufReader<File>>> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        other => other.with_context(|| format!("opening {}", path.display()))?,
    };
    let meta = file.metadata()?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if !meta.is_file() || meta.uid() != euid || meta.mode() & 0o022 != 0 {
        bail!(
            "{} is not a private file of uid {euid}: not used (remove it)",
            path.display()
        );
    }
    Ok(Some(BufReader::with_capacity(1 << 16, file)))
}

fn write_header(e: &mut Enc<&mut File>, identity: &Identity) -> io::Result<()> {
    e.raw(MAGIC)?;
    e.u64(FORMAT)?;
    e.str(&identity.boot_id)?;
    e.u32(identity.flows_map_id)?;
    e.u64(crate::bpf::system::clocks_now().0)
}

/// Reads a header; `Ok(None)` when the state is of other pins (or format).
/// Otherwise how long ago it was saved.
fn read_header<R: BufRead>(d: &mut Dec<R>, identity: &Identity) -> io::Result<Option<Duration>> {
    let mut magic = [0u8; 16];
    d.0.read_exact(&mut magic)?;
    if &magic != MAGIC || d.u64()? != FORMAT {
        return Ok(None);
    }
    let saved = Identity {
        boot_id: d.str()?,
        flows_map_id: d.u32()?,
    };
    let saved_at = d.u64()?;
    if saved != *identity {
        return Ok(None);
    }
    let now = crate::bpf::system::clocks_now().0;
    Ok(Some(Duration::from_nanos(now.saturating_sub(saved_at))))
}

fn read_end<R: BufRead>(d: &mut Dec<R>) -> io::Result<()> {
    let mut end = [0u8; 4];
    d.0.read_exact(&mut end)?;
    if &end != END {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "no end mark"));
    }
    Ok(())
}

/// The state of the agent's passes: the tracker and first-payload verdicts.
pub(crate) struct PassState {
    path: PathBuf,
    identity: Identity,
    /// The `--log` file, whose lines written after a save are replayed.
    log: Option<PathBuf>,
    log_keep: usize,
    pub(crate) save_failures: u64,
}

/// Where a state file is kept and what it belongs to.
pub(crate) struct Place<'a> {
    pub(crate) dir: &'a Path,
    pub(crate) pin_dir: &'a Path,
    pub(crate) identity: Identity,
}

impl Place<'_> {
    /// Checks the directory (root's, private) and clears stale states.
    pub(crate) fn prepare(&self) -> Result<()> {
        crate::serve::private_fs::check_private_dir(self.dir).with_context(|| {
            format!(
                "the state directory {} (the agent's --run-dir)",
                self.dir.display()
            )
        })?;
        remove_stale(self.dir);
        Ok(())
    }
}

impl PassState {
    /// `log`: the `--log` target (`-` is stdout, whose lines cannot be
    /// read back).
    pub(crate) fn new(place: &Place<'_>, log: Option<&str>, log_keep: usize) -> PassState {
        PassState {
            path: paths(place.dir, place.pin_dir)[0].clone(),
            identity: place.identity.clone(),
            log: log.filter(|l| *l != "-").map(PathBuf::from),
            log_keep,
            save_failures: 0,
        }
    }

    /// Writes the state after a pass (call it while the pass still holds
    /// the tracker and the verdicts, after its log lines are written).
    pub(crate) fn save(&mut self, tracker: &Tracker, destinations: &Destinations) {
        let position = self.log.as_deref().and_then(log_tail::position);
        let written = replace(&self.path, |e| {
            write_header(e, &self.identity)?;
            write_position(e, position.as_ref())?;
            write_totals(e, &tracker.saved_totals())?;
            write_flows(e, tracker)?;
            write_infos(e, destinations)?;
            e.raw(END)
        });
        if let Err(e) = written {
            self.save_failures += 1;
            log::warn!(
                "saving the restart state {}: {e} (a restart now would count part of the \
                 last passes again)",
                self.path.display()
            );
        }
    }

    /// Takes back what the previous agent of these pins saved, then the log
    /// lines it wrote after. On an error the tracker and verdicts may hold
    /// part of it: the caller starts them afresh.
    pub(crate) fn restore(
        &self,
        tracker: &mut Tracker,
        destinations: &mut Destinations,
    ) -> Result<bool> {
        let Some(reader) = open(&self.path)? else {
            return Ok(false);
        };
        let mut d = Dec(reader);
        let context = || format!("reading the restart state {}", self.path.display());
        let Some(downtime) = read_header(&mut d, &self.identity).with_context(context)? else {
            log::info!(
                "{} describes other pins (made anew since, or another boot): not used",
                self.path.display()
            );
            return Ok(false);
        };
        let position = read_position(&mut d).with_context(context)?;
        let restoring =
            tracker.restore_totals(read_totals(&mut d).with_context(context)?, downtime);
        read_flows(&mut d, |flow| tracker.restore_flow(flow, &restoring)).with_context(context)?;
        read_infos(&mut d, destinations).with_context(context)?;
        read_end(&mut d).with_context(context)?;
        let replayed = match (&self.log, position) {
            (Some(log), Some(at)) => log_tail::replay(log, self.log_keep, &at, tracker),
            _ => 0,
        };
        log::info!(
            "restart state taken back: {} flows{}",
            tracker.tracked(),
            if replayed > 0 {
                format!(", {replayed} log lines written after it")
            } else {
                String::new()
            }
        );
        Ok(true)
    }
}

fn write_position(e: &mut Enc<&mut File>, at: Option<&LogPosition>) -> io::Result<()> {
    e.bool(at.is_some())?;
    match at {
        Some(at) => {
            e.u64(at.dev)?;
            e.u64(at.ino)?;
            e.u64(at.len)
        }
        None => Ok(()),
    }
}

fn read_position<R: BufRead>(d: &mut Dec<R>) -> io::Result<Option<LogPosition>> {
    if !d.bool()? {
        return Ok(None);
    }
    Ok(Some(LogPosition {
        dev: d.u64()?,
        ino: d.u64()?,
        len: d.u64()?,
    }))
}

fn write_owner(e: &mut Enc<&mut File>, o: &Owner) -> io::Result<()> {
    e.u32(o.uid)?;
    e.u32(o.user)?;
    e.u32(o.app_id)?;
    e.str(&o.owner)?;
    e.strs(o.packages.iter().map(String::as_str))?;
    e.str(o.origin.as_str())?;
    e.bool(o.firmware)
}

fn read_owner<R: BufRead>(d: &mut Dec<R>) -> io::Result<Owner> {
    Ok(Owner {
        uid: d.u32()?,
        user: d.u32()?,
        app_id: d.u32()?,
        owner: d.str()?,
        packages: d.strs()?,
        origin: {
            let text = d.str()?;
            Origin::parse(&text).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown origin {text:?}"),
                )
            })?
        },
        firmware: d.bool()?,
    })
}

fn write_totals(e: &mut Enc<&mut File>, t: &SavedTotals) -> io::Result<()> {
    e.strs(t.rule_names.iter().map(String::as_str))?;
    e.u64(t.classes.len() as u64)?;
    for ((origin, firmware, country), bytes) in &t.classes {
        e.str(origin)?;
        e.bool(*firmware)?;
        e.str(country)?;
        e.u64(*bytes)?;
    }
    e.u64(t.cleartext_flows.len() as u64)?;
    for ((uid, owner, origin, firmware), count) in &t.cleartext_flows {
        e.u32(*uid)?;
        e.str(owner)?;
        e.str(origin)?;
        e.bool(*firmware)?;
        e.u64(*count)?;
    }
    e.u64(t.identifier_leaks.len() as u64)?;
    for ((identifier, form, origin, firmware), count) in &t.identifier_leaks {
        e.str(identifier)?;
        e.str(form)?;
        e.str(origin)?;
        e.bool(*firmware)?;
        e.u64(*count)?;
    }
    e.u64(t.alerts.len() as u64)?;
    for (rule, count) in &t.alerts {
        e.str(rule)?;
        e.u64(*count)?;
    }
    e.u64(t.flows_evicted)?;
    e.u64(t.owners.len() as u64)?;
    for owner in &t.owners {
        write_owner(e, owner)?;
    }
    e.u64(t.countries_reached.len() as u64)?;
    for (owner, countries) in &t.countries_reached {
        e.str(owner)?;
        e.strs(countries.iter().map(String::as_str))?;
    }
    e.bool(t.since_update.is_some())?;
    e.u32(t.since_update.unwrap_or(0))
}

fn read_totals<R: BufRead>(d: &mut Dec<R>) -> io::Result<SavedTotals> {
    let mut t = SavedTotals {
        rule_names: d.strs()?,
        ..Default::default()
    };
    for _ in 0..d.len()? {
        let key = (d.str()?, d.bool()?, d.str()?);
        t.classes.push((key, d.u64()?));
    }
    for _ in 0..d.len()? {
        let key = (d.u32()?, d.str()?, d.str()?, d.bool()?);
        t.cleartext_flows.insert(key, d.u64()?);
    }
    for _ in 0..d.len()? {
        let key = (d.str()?, d.str()?, d.str()?, d.bool()?);
        t.identifier_leaks.insert(key, d.u64()?);
    }
    for _ in 0..d.len()? {
        let rule = d.str()?;
        t.alerts.insert(rule, d.u64()?);
    }
    t.flows_evicted = d.u64()?;
    for _ in 0..d.len()? {
        t.owners.push(read_owner(d)?);
    }
    for _ in 0..d.len()? {
        t.countries_reached.push((d.str()?, d.strs()?));
    }
    let since_update = d.bool()?;
    t.since_update = Some(d.u32()?).filter(|_| since_update);
    Ok(t)
}

fn write_sender(e: &mut Enc<&mut File>, s: &Sender) -> io::Result<()> {
    e.u32(s.tgid)?;
    e.bytes(&s.comm)?;
    e.u64(s.cgroup_id)?;
    e.opt_str(s.cgroup.as_deref())?;
    e.opt_str(s.exe.as_deref())?;
    e.opt_str(s.cmdline.as_deref())?;
    e.opt_str(s.selinux_context.as_deref())
}

fn read_sender<R: BufRead>(d: &mut Dec<R>) -> io::Result<Sender> {
    let tgid = d.u32()?;
    let comm = d.bytes()?;
    let comm: [u8; 16] = comm
        .try_into()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "comm is not 16 bytes"))?;
    Ok(Sender {
        tgid,
        comm,
        cgroup_id: d.u64()?,
        cgroup: d.opt_str()?.map(Arc::from),
        exe: d.opt_str()?.map(String::into_boxed_str),
        cmdline: d.opt_str()?.map(String::into_boxed_str),
        selinux_context: d.opt_str()?.map(String::into_boxed_str),
    })
}

/// The senders (each once: many flows share one) then the flows.
fn write_flows(e: &mut Enc<&mut File>, tracker: &Tracker) -> io::Result<()> {
    let mut index: HashMap<*const Sender, u64> = HashMap::new();
    let mut senders: Vec<Arc<Sender>> = Vec::new();
    for flow in tracker.saved_flows() {
        if let Some(meta) = flow.meta {
            index.entry(Arc::as_ptr(&meta.sender)).or_insert_with(|| {
                senders.push(meta.sender.clone());
                senders.len() as u64
            });
        }
    }
    e.u64(senders.len() as u64)?;
    for sender in &senders {
        write_sender(e, sender)?;
    }
    let flows = tracker.saved_flows();
    e.u64(flows.len() as u64)?;
    for f in flows {
        e.key(&f.key)?;
        e.value(&f.current)?;
        let l = &f.logged;
        for n in [l.connects, l.udp_sends, l.tx_packets, l.tx_bytes] {
            e.u64(n)?;
        }
        e.u32(f.idle_secs)?;
        e.bool(f.ended)?;
        e.bool(f.cleartext)?;
        e.u32(f.leaks_counted)?;
        e.u32(f.class)?;
        e.u64(f.fired)?;
        e.u64(f.stamp)?;
        // 0: no sender; else its index + 1.
        match &f.meta {
            Some(meta) => {
                e.u64(index[&Arc::as_ptr(&meta.sender)])?;
                e.bool(meta.from_task)?;
            }
            None => e.u64(0)?,
        }
    }
    Ok(())
}

fn read_flows<R: BufRead>(d: &mut Dec<R>, mut each: impl FnMut(SavedFlow)) -> io::Result<()> {
    let senders: Vec<Arc<Sender>> = (0..d.len()?)
        .map(|_| read_sender(d).map(Arc::new))
        .collect::<io::Result<_>>()?;
    for _ in 0..d.len()? {
        let key = d.key()?;
        let current = d.value()?;
        let logged = Counters {
            connects: d.u64()?,
            udp_sends: d.u64()?,
            tx_packets: d.u64()?,
            tx_bytes: d.u64()?,
        };
        let (idle_secs, ended, cleartext) = (d.u32()?, d.bool()?, d.bool()?);
        let leaks_counted = d.u32()?;
        let (class, fired, stamp) = (d.u32()?, d.u64()?, d.u64()?);
        let meta = match d.u64()? {
            0 => None,
            n => {
                let sender = senders
                    .get(n as usize - 1)
                    .cloned()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unknown sender"))?;
                Some(FlowMeta {
                    sender,
                    batch: 0,
                    from_task: d.bool()?,
                })
            }
        };
        each(SavedFlow {
            key,
            current,
            logged,
            idle_secs,
            ended,
            cleartext,
            leaks_counted,
            class,
            fired,
            stamp,
            meta,
        });
    }
    Ok(())
}

fn write_infos(e: &mut Enc<&mut File>, destinations: &Destinations) -> io::Result<()> {
    let infos = destinations.infos();
    e.u64(infos.len() as u64)?;
    for (key, info) in infos {
        e.key(key)?;
        e.str(info.payload.as_str())?;
        e.bool(info.host.is_some())?;
        if let Some((host, source)) = &info.host {
            e.str(host)?;
            e.str(source.as_str())?;
        }
        e.strs(info.leaks.iter().map(String::as_str))?;
    }
    Ok(())
}

fn read_infos<R: BufRead>(d: &mut Dec<R>, destinations: &mut Destinations) -> io::Result<()> {
    let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
    for _ in 0..d.len()? {
        let key = d.key()?;
        let payload = d.str()?.parse().map_err(invalid)?;
        let host = match d.bool()? {
            true => Some((d.str()?, d.str()?.parse().map_err(invalid)?)),
            false => None,
        };
        let leaks = d.strs()?;
        destinations.restore_info(
            key,
            FlowInfo {
                payload,
                host,
                leaks,
            },
        );
    }
    Ok(())
}

/// What a scrape hands out beyond the kernel's counters.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Scraped {
    /// Uids given their own metric series, so each keeps its series.
    pub(crate) labelled_uids: BTreeSet<u32>,
    pub(crate) netd: Option<NetdSnapshot>,
}

/// The scrape state: written by a scrape before it answers, when it changed.
pub(crate) struct ScrapeState {
    path: PathBuf,
    identity: Identity,
    last: std::sync::Mutex<Option<Scraped>>,
}

impl ScrapeState {
    pub(crate) fn new(place: &Place<'_>) -> ScrapeState {
        ScrapeState {
            path: paths(place.dir, place.pin_dir)[1].clone(),
            identity: place.identity.clone(),
            last: std::sync::Mutex::new(None),
        }
    }

    /// Writes `now` unless it is what was written last.
    pub(crate) fn save(&self, now: Scraped) {
        let mut last = self.last.lock().unwrap();
        if last.as_ref() == Some(&now) {
            return;
        }
        let written = replace(&self.path, |e| {
            write_header(e, &self.identity)?;
            write_scraped(e, &now)?;
            e.raw(END)
        });
        match written {
            Ok(()) => *last = Some(now),
            Err(e) => log::warn!("saving the scrape state {}: {e}", self.path.display()),
        }
    }

    pub(crate) fn restore(&self) -> Result<Option<Scraped>> {
        let Some(reader) = open(&self.path)? else {
            return Ok(None);
        };
        let mut d = Dec(reader);
        let context = || format!("reading the scrape state {}", self.path.display());
        if read_header(&mut d, &self.identity)
            .with_context(context)?
            .is_none()
        {
            return Ok(None);
        }
        let scraped = read_scraped(&mut d).with_context(context)?;
        read_end(&mut d).with_context(context)?;
        Ok(Some(scraped))
    }
}

fn write_scraped(e: &mut Enc<&mut File>, s: &Scraped) -> io::Result<()> {
    e.u64(s.labelled_uids.len() as u64)?;
    for uid in &s.labelled_uids {
        e.u32(*uid)?;
    }
    e.bool(s.netd.is_some())?;
    let Some(netd) = &s.netd else {
        return Ok(());
    };
    use std::os::unix::ffi::OsStrExt;
    e.bytes(netd.root.as_os_str().as_bytes())?;
    e.u64(netd.map_ids.len() as u64)?;
    for id in &netd.map_ids {
        e.u32(*id)?;
    }
    e.u64(netd.rows.len() as u64)?;
    for (map, key, value) in &netd.rows {
        e.u32((*map).into())?;
        e.raw(&key.to_bytes())?;
        e.raw(&value.to_bytes())?;
    }
    e.u64(netd.by_uid.len() as u64)?;
    for (uid, t) in &netd.by_uid {
        e.u32(*uid)?;
        for n in [t.tx_packets, t.tx_bytes, t.rx_packets, t.rx_bytes] {
            e.u64(n)?;
        }
    }
    Ok(())
}

fn read_scraped<R: BufRead>(d: &mut Dec<R>) -> io::Result<Scraped> {
    let mut s = Scraped::default();
    for _ in 0..d.len()? {
        s.labelled_uids.insert(d.u32()?);
    }
    if !d.bool()? {
        return Ok(s);
    }
    use std::os::unix::ffi::OsStringExt;
    let mut netd = NetdSnapshot {
        root: PathBuf::from(std::ffi::OsString::from_vec(d.bytes()?)),
        ..Default::default()
    };
    for _ in 0..d.len()? {
        netd.map_ids.push(d.u32()?);
    }
    for _ in 0..d.len()? {
        let map = u8::try_from(d.u32()?)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad map index"))?;
        let mut key = [0u8; 16];
        let mut value = [0u8; 32];
        d.0.read_exact(&mut key)?;
        d.0.read_exact(&mut value)?;
        netd.rows.push((
            map,
            StatsKey::from_bytes(&key),
            StatsValue::from_bytes(&value),
        ));
    }
    for _ in 0..d.len()? {
        let uid = d.u32()?;
        let traffic = UidTraffic {
            tx_packets: d.u64()?,
            tx_bytes: d.u64()?,
            rx_packets: d.u64()?,
            rx_bytes: d.u64()?,
        };
        netd.by_uid.insert(uid, traffic);
    }
    s.netd = Some(netd);
    Ok(s)
}

#[cfg(test)]
mod tests;
