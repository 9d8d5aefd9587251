//! `egressmon capture`: pcapng evidence of selected flows, filtered in the
//! kernel. Owns the capture's side of the pinned capture maps (arming the
//! kernel filter `CAPTURE_FILTER` and the uid set `CAPTURE_UIDS`, reading
//! the `CAPTURE` ring, disarming on every way out), the one-capture-at-a-
//! time lock in the agent's run directory, the output file (0600, never
//! through a link), and the loop that writes each packet with a comment
//! naming its flow from the running agent's flow table (`pcapng`,
//! `select`).
//!
//! While no capture runs the kernel copies nothing: the skb and tc
//! programs read `CAPTURE_FILTER.active` and go on.
//!
//! May call: `bpf::pins` (the checked pins), `cli::client` (the agent's
//! control socket), `pipeline` (flow records, globs), `identity::owners`.

pub(crate) mod pcapng;
pub(crate) mod select;

use crate::agent::Status;
use crate::bpf::pins::PinDir;
use crate::bpf::system;
use crate::cli::client::Endpoint;
use crate::cli::Target;
use crate::pipeline::flows::FlowRecord;
use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, RingBuf};
use clap::Args;
use hyper::Method;
use monitor_common::*;
use pcapng::{Direction, PcapNg};
use select::{Annotations, Selection};
use std::collections::{BTreeSet, VecDeque};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::signal::unix::{signal, SignalKind};

/// How often the ring is read when the kernel does not wake the capture.
const POLL: Duration = Duration::from_millis(100);
/// How often the agent's flow table is read again (new uids for `--owner`
/// and `--firmware`, comments for new flows).
const REFRESH: Duration = Duration::from_secs(1);
/// Packets held for their comments at most (then written with what is
/// known), so a slow agent cannot make the capture grow without bound.
const MAX_PENDING: usize = 50_000;
/// How long the last read of the agent's flow table may take at exit.
const FINAL_REFRESH_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Args, Debug)]
pub(crate) struct CaptureArgs {
    /// pcapng file to write (raw IP, a comment per packet naming its uid,
    /// owner and flow). Made with mode 0600; a symbolic link is refused,
    /// never followed.
    #[arg(short = 'w', long = "write", value_name = "FILE")]
    pub(crate) file: PathBuf,
    /// Capture this uid's flows (repeatable).
    #[arg(long = "uid", value_name = "N")]
    pub(crate) uids: Vec<u32>,
    /// Capture the flows of the owners (or packages) matching this glob, as
    /// the running agent names them; a uid that matches later joins within
    /// a second of its first flow.
    #[arg(long, value_name = "GLOB")]
    pub(crate) owner: Option<String>,
    /// Capture the firmware's flows (origin platform, preinstalled or
    /// system); with --owner, only matching firmware owners.
    #[arg(long)]
    pub(crate) firmware: bool,
    /// Leave out flows whose first payload was TLS or QUIC (from the packet
    /// after that payload on).
    #[arg(long)]
    pub(crate) cleartext: bool,
    /// Only flows to this address (and port), as `flows` shows them
    /// (ADDR, ADDR:PORT or [IPV6]:PORT).
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub(crate) dst: Option<String>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub(crate) duration: Option<u64>,
    /// Stop after this many packets.
    #[arg(long, value_name = "N")]
    pub(crate) count: Option<u64>,
    /// Bytes kept per packet from the IP header on (at most 1536; 0 for
    /// the most).
    #[arg(long, value_name = "BYTES", default_value_t = CAPTURE_BYTES as u32)]
    pub(crate) snaplen: u32,
    #[command(flatten)]
    pub(crate) target: Target,
}

pub(crate) fn run(args: CaptureArgs) -> Result<()> {
    system::require_root("egressmon capture")?;
    let selection = Selection::new(
        &args.uids,
        args.owner.as_deref(),
        args.firmware,
        args.cleartext,
        args.dst.as_deref(),
        args.snaplen,
    )?;
    if args.count == Some(0) {
        bail!("--count 0 captures nothing: give at least 1, or leave it out");
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(capture(args, selection))
}

async fn capture(args: CaptureArgs, selection: Selection) -> Result<()> {
    let pin_dir = args.target.pin_dir();
    let endpoint = running_agent(&args.target).await?;
    let flows = agent_flows(endpoint.clone()).await?;
    let uids = selection.uids_in(&flows);
    let mut notes = Annotations::default();
    notes.update(flows);
    let mut maps = CaptureMaps::open(&PinDir::new(&pin_dir))?;
    let _lock = CaptureLock::take(&args.target, &endpoint)?;
    let file = create_output(&args.file)?;
    let started = wall_clock();
    let writer = match PcapNg::new(
        BufWriter::with_capacity(1 << 20, file),
        selection.snaplen,
        &format!("egressmon capture of {}", selection.describe(&notes)),
    ) {
        Ok(writer) => writer,
        Err(e) => {
            let _ = std::fs::remove_file(&args.file);
            return Err(e);
        }
    };
    // Signals are taken before the filter is armed: from here on SIGINT
    // and SIGTERM end the capture with the filter off, never the process.
    let signals = Signals {
        interrupt: signal(SignalKind::interrupt())?,
        terminate: signal(SignalKind::terminate())?,
    };
    if let Err(e) = maps.arm(&selection, &uids) {
        drop(maps);
        let _ = std::fs::remove_file(&args.file);
        return Err(e);
    }
    eprintln!(
        "capturing {} to {}; Ctrl-C to stop",
        selection.describe(&notes),
        crate::cli::text::escape(&args.file.to_string_lossy())
    );
    let mut capture = Capture {
        maps,
        writer,
        notes,
        selection,
        uids,
        endpoint,
        pending: VecDeque::new(),
        read: 0,
        count: args.count,
        agent_failed: false,
    };
    let stopped = capture
        .run(signals, args.duration.map(Duration::from_secs))
        .await;
    let lost = capture.maps.disarm();
    capture.drain()?;
    match tokio::time::timeout(FINAL_REFRESH_TIMEOUT, agent_flows(capture.endpoint.clone())).await {
        Ok(Ok(flows)) => capture.notes.update(flows),
        Ok(Err(e)) => capture.agent_trouble(&e),
        Err(_) => capture.agent_trouble(&anyhow!("no answer within a few seconds")),
    }
    capture.write_pending(u64::MAX)?;
    let captured = capture.writer.packets();
    let out = capture
        .writer
        .finish(started, wall_clock(), lost)?
        .into_inner()
        .map_err(|e| e.into_error())
        .context("writing the capture file")?;
    out.sync_all().context("syncing the capture file")?;
    eprintln!("{captured} packets captured, {lost} lost");
    stopped
}

/// The agent on the control socket `target` names, checked to use
/// `target`'s pin directory: a capture reads the maps that agent's
/// programs fill, and names flows from its table.
async fn running_agent(target: &Target) -> Result<Endpoint> {
    let pin_dir = target.pin_dir();
    let endpoint = target.endpoint();
    let none = |why: String| {
        anyhow!(
            "no egressmon agent is running with pin directory {}: start `egressmon run` first \
             ({why})",
            pin_dir.display()
        )
    };
    let body = endpoint
        .call(Method::GET, "/status")
        .await
        .map_err(|e| none(format!("{e:#}")))?;
    let status: Status = serde_json::from_str(&body).context("reading the agent's status")?;
    if status.pin_dir != pin_dir {
        return Err(none(format!(
            "the agent on {} uses {}; give the --listen (and --run-dir) of the agent that uses \
             {}",
            endpoint.socket.display(),
            status.pin_dir.display(),
            pin_dir.display()
        )));
    }
    Ok(endpoint)
}

async fn agent_flows(endpoint: Endpoint) -> Result<Vec<FlowRecord>> {
    let body = endpoint.call(Method::GET, "/flows").await?;
    serde_json::from_str(&body).context("reading the agent's flows")
}

fn wall_clock() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// A packet read from the ring, waiting for the agent's table to name its
/// flow.
struct Pending {
    /// Its place in reading order (packets read before a refresh started
    /// are named by that refresh).
    seq: u64,
    key: FlowKey,
    time: Duration,
    len: u32,
    direction: Direction,
    data: Vec<u8>,
}

/// The signals that end a capture.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

/// A running capture: the armed maps, the file, what names the flows.
struct Capture {
    maps: CaptureMaps,
    writer: PcapNg<BufWriter<File>>,
    notes: Annotations,
    selection: Selection,
    /// Uids in `CAPTURE_UIDS`.
    uids: BTreeSet<u32>,
    endpoint: Endpoint,
    pending: VecDeque<Pending>,
    /// Packets read (and kept) so far.
    read: u64,
    count: Option<u64>,
    /// The agent stopped answering (said once).
    agent_failed: bool,
}

impl Capture {
    /// Reads and writes until `--duration`, `--count`, SIGINT or SIGTERM;
    /// Err only for a failed write (the caller still finishes the file).
    async fn run(&mut self, mut signals: Signals, duration: Option<Duration>) -> Result<()> {
        let deadline = duration.map(|d| tokio::time::Instant::now() + d);
        let until_deadline = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(until_deadline);
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (refreshed, mut refreshes) = tokio::sync::mpsc::channel(1);
        let mut refreshing = false;
        let mut last_refresh = Instant::now();
        loop {
            tokio::select! {
                _ = signals.interrupt.recv() => return Ok(()),
                _ = signals.terminate.recv() => return Ok(()),
                _ = &mut until_deadline => return Ok(()),
                ready = self.maps.ring.readable_mut() => ready?.clear_ready(),
                _ = poll.tick() => {}
                Some((seq, flows)) = refreshes.recv() => {
                    refreshing = false;
                    self.refreshed(flows)?;
                    self.write_pending(seq)?;
                }
            }
            self.drain()?;
            if self.count.is_some_and(|count| self.read >= count) {
                return Ok(());
            }
            if !refreshing && last_refresh.elapsed() >= REFRESH {
                refreshing = true;
                last_refresh = Instant::now();
                let (seq, endpoint, done) = (self.read, self.endpoint.clone(), refreshed.clone());
                tokio::spawn(async move {
                    let _ = done.send((seq, agent_flows(endpoint).await)).await;
                });
            }
            while self.pending.len() > MAX_PENDING {
                let oldest = self.pending.front().map_or(0, |p| p.seq);
                self.write_pending(oldest + 1)?;
            }
        }
    }

    /// Moves what the ring holds into `pending` (none past `--count`).
    fn drain(&mut self) -> Result<()> {
        let header = std::mem::offset_of!(CapturedPacket, data);
        let ring = self.maps.ring.get_mut();
        while let Some(item) = ring.next() {
            if item.len() < header || self.count.is_some_and(|count| self.read >= count) {
                continue;
            }
            // SAFETY: the kernel writes whole CapturedPacket headers; read
            // unaligned from the ring's bytes.
            let packet: CapturedPacket = unsafe {
                let mut packet = std::mem::MaybeUninit::<CapturedPacket>::zeroed();
                std::ptr::copy_nonoverlapping(
                    item.as_ptr(),
                    packet.as_mut_ptr().cast::<u8>(),
                    item.len().min(std::mem::size_of::<CapturedPacket>()),
                );
                packet.assume_init()
            };
            let captured = (packet.captured as usize)
                .min(CAPTURE_BYTES)
                .min(item.len() - header);
            let time = system::boot_ns_to_system_time(packet.ts)
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            self.pending.push_back(Pending {
                seq: self.read,
                key: packet.key,
                time,
                len: packet.len,
                direction: match packet.direction {
                    CAPTURED_INGRESS => Direction::Inbound,
                    _ => Direction::Outbound,
                },
                data: packet.data[..captured].to_vec(),
            });
            self.read += 1;
        }
        Ok(())
    }

    /// The agent's table read again: names for the comments, and the uids
    /// `--owner` / `--firmware` now select.
    fn refreshed(&mut self, flows: Result<Vec<FlowRecord>>) -> Result<()> {
        let flows = match flows {
            Ok(flows) => flows,
            Err(e) => {
                self.agent_trouble(&e);
                return Ok(());
            }
        };
        if self.agent_failed {
            eprintln!("the agent answers again");
            self.agent_failed = false;
        }
        if self.selection.by_owner() {
            let now = self.selection.uids_in(&flows);
            let new: Vec<u32> = now.difference(&self.uids).copied().collect();
            self.notes.update(flows);
            for uid in new {
                self.maps.select_uid(uid)?;
                self.uids.insert(uid);
                eprintln!(
                    "also capturing uid {uid} ({})",
                    crate::cli::text::escape(self.notes.owner_name(uid).unwrap_or("?"))
                );
            }
        } else {
            self.notes.update(flows);
        }
        Ok(())
    }

    fn agent_trouble(&mut self, e: &anyhow::Error) {
        if !self.agent_failed {
            eprintln!(
                "the agent's flow table could not be read ({e:#}): comments name owners only \
                 until it answers"
            );
            self.agent_failed = true;
        }
    }

    /// Writes the pending packets read before packet `before`.
    fn write_pending(&mut self, before: u64) -> Result<()> {
        while self.pending.front().is_some_and(|p| p.seq < before) {
            let p = self.pending.pop_front().expect("checked above");
            let comment = self.notes.comment(&p.key);
            self.writer
                .packet(p.time, &p.data, p.len, p.direction, &comment)?;
        }
        Ok(())
    }
}

/// The capture maps the agent pinned, checked.
struct CaptureMaps {
    ring: AsyncFd<RingBuf<MapData>>,
    filter: Array<MapData, CaptureFilter>,
    uids: BpfHashMap<MapData, u32, u8>,
    armed: bool,
}

impl CaptureMaps {
    fn open(pins: &PinDir) -> Result<CaptureMaps> {
        let [ring, filter, uids] = pins.open_capture_maps().with_context(|| {
            format!(
                "the capture maps under {} (an agent of another egressmon version?)",
                pins.path().display()
            )
        })?;
        let data = |fd| MapData::from_fd(fd).context("opening a capture map");
        let ring = RingBuf::try_from(Map::RingBuf(data(ring)?))?;
        // SAFETY: the ring owns its map's descriptor and always returns it,
        // for as long as the AsyncFd owns the ring.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| anyhow!("watching the capture ring: {e}"))?;
        Ok(CaptureMaps {
            ring,
            filter: Array::try_from(Map::Array(data(filter)?))?,
            uids: BpfHashMap::try_from(Map::HashMap(data(uids)?))?,
            armed: false,
        })
    }

    /// Starts the kernel copying: `uids` selected (unless the selection
    /// takes any), then the filter made active. What a capture killed
    /// before it could disarm left behind is cleared first.
    fn arm(&mut self, selection: &Selection, uids: &BTreeSet<u32>) -> Result<()> {
        self.armed = true;
        self.clear_uids();
        while self.ring.get_mut().next().is_some() {}
        for &uid in uids {
            self.select_uid(uid)?;
        }
        self.filter
            .set(0, selection.filter(), 0)
            .context("arming the kernel capture filter")
    }

    fn select_uid(&mut self, uid: u32) -> Result<()> {
        self.uids
            .insert(uid, 1, 0)
            .with_context(|| format!("selecting uid {uid} (at most {CAPTURE_UID_ENTRIES} uids)"))
    }

    fn clear_uids(&mut self) {
        let keys: Vec<u32> = self.uids.keys().filter_map(Result::ok).collect();
        for uid in keys {
            let _ = self.uids.remove(&uid);
        }
    }

    /// Stops the kernel copying (the filter inactive, the uids cleared);
    /// returns the packets lost to a full ring. Safe to call twice.
    fn disarm(&mut self) -> u64 {
        if !self.armed {
            return self.lost();
        }
        let mut filter = self.filter.get(&0, 0).unwrap_or_default();
        filter.active = 0;
        filter.flags = 0;
        if let Err(e) = self.filter.set(0, filter, 0) {
            eprintln!("egressmon: disarming the kernel capture filter: {e}");
        }
        self.clear_uids();
        self.armed = false;
        self.lost()
    }

    fn lost(&self) -> u64 {
        self.filter.get(&0, 0).map_or(0, |f| f.lost)
    }
}

impl Drop for CaptureMaps {
    fn drop(&mut self) {
        self.disarm();
    }
}

/// One capture at a time per agent: an flock on
/// `RUN_DIR/capture-ADDR-PORT.lock` (named after the agent's control
/// socket) in the agent's root-only run directory, holding the pid of the
/// capture that holds it. The kernel releases it however the process ends;
/// the file is removed, still locked, when the capture ends normally.
struct CaptureLock {
    file: File,
    path: PathBuf,
}

impl CaptureLock {
    fn take(target: &Target, endpoint: &Endpoint) -> Result<CaptureLock> {
        let run_dir = target.run_dir();
        crate::serve::private_fs::check_private_dir(&run_dir)
            .with_context(|| format!("the agent's run directory {}", run_dir.display()))?;
        let path = lock_path(&run_dir, endpoint);
        // A capture ending removes the file it locked: a lock taken on a
        // file no longer at the path is taken again on the new one.
        for _ in 0..3 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            let meta = file.metadata()?;
            if !meta.is_file() || meta.uid() != 0 {
                bail!("{} is not a file of root's: remove it", path.display());
            }
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return Err(err).with_context(|| format!("locking {}", path.display()));
                }
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = match holder.trim() {
                    "" => String::new(),
                    pid => format!(" (pid {pid})"),
                };
                bail!(
                    "another egressmon capture{holder} is running beside the agent with pin \
                     directory {}: one capture at a time; stop it first",
                    target.pin_dir().display()
                );
            }
            let still_there = std::fs::symlink_metadata(&path)
                .is_ok_and(|now| (now.dev(), now.ino()) == (meta.dev(), meta.ino()));
            if !still_there {
                continue;
            }
            file.set_len(0)?;
            writeln!(file, "{}", std::process::id())?;
            return Ok(CaptureLock { file, path });
        }
        bail!(
            "{} keeps being replaced: is another capture starting and stopping?",
            path.display()
        )
    }
}

impl Drop for CaptureLock {
    fn drop(&mut self) {
        // Removed while still locked (the descriptor closes after this).
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.flush();
    }
}

fn lock_path(run_dir: &Path, endpoint: &Endpoint) -> PathBuf {
    let socket = endpoint
        .socket
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = socket
        .strip_prefix("api-")
        .and_then(|s| s.strip_suffix(".sock"))
        .unwrap_or("agent");
    run_dir.join(format!("capture-{name}.lock"))
}

/// Creates the capture file, mode 0600. Packets are sensitive: a symbolic
/// link is never followed (O_NOFOLLOW, O_EXCL), and an existing file is
/// replaced only when it is a regular file of root's with one name.
fn create_output(path: &Path) -> Result<File> {
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY)
            .open(path)
    };
    let file = match open() {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(path)
                .with_context(|| format!("checking {}", path.display()))?;
            if meta.file_type().is_symlink() {
                bail!(
                    "{} is a symbolic link: egressmon does not write packets through links; \
                     remove it or choose another file",
                    path.display()
                );
            }
            if !meta.is_file() || meta.uid() != 0 || meta.nlink() != 1 {
                bail!(
                    "{} exists and is not a file of root's with one name: choose another file",
                    path.display()
                );
            }
            std::fs::remove_file(path).with_context(|| format!("replacing {}", path.display()))?;
            open().with_context(|| format!("creating {}", path.display()))?
        }
        Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
    };
    // Exactly 0600, whatever the umask.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to root", path.display()))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_is_named_after_the_agent() {
        let endpoint = Endpoint::new(
            Path::new("/run/egressmon"),
            "127.0.0.1:9864".parse().unwrap(),
        );
        assert_eq!(
            lock_path(Path::new("/run/egressmon"), &endpoint),
            Path::new("/run/egressmon/capture-127.0.0.1-9864.lock")
        );
    }

    #[test]
    fn the_output_is_private_and_never_a_link() {
        let dir = std::env::temp_dir().join(format!("egm-capture-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("out.pcapng");
        let _ = std::fs::remove_file(&file);
        create_output(&file).unwrap();
        let mode = std::fs::metadata(&file).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let link = dir.join("link.pcapng");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let err = create_output(&link).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
