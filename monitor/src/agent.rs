//! The running agent: owns the loaded kernel programs, the identity table fed
//! by the event reader, the owner resolver and the device's identifiers
//! (both reloaded when their sources change) and the flow tracker; produces what the API serves (flows,
//! status, metrics) and writes the `--log` JSON lines.

use crate::bpf::hooks::{Conflict, Hook};
use crate::bpf::kernel::{Kernel, LoadOptions};
use crate::enrich::destinations::{Destinations, SharedDestinations};
use crate::enrich::evidence::Evidence;
use crate::enrich::geoip::GeoIp;
use crate::enrich::identifiers::{IdentifierSources, Identifiers};
use crate::identity::events::{self, Identified};
use crate::identity::owners::OwnerResolver;
use crate::pipeline::flows::{self, FlowRecord};
use crate::pipeline::rules::Rules;
use crate::pipeline::tracker::{Tracker, TrackerOptions};
use crate::serve::jsonl::JsonlLog;
use crate::serve::state::{PassState, PayloadRearm, ScrapeState, Scraped};
use anyhow::{Context, Result};
use monitor_common::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// User-space options of `egressmon run`.
#[derive(Debug, Clone)]
pub(crate) struct AgentOptions {
    pub(crate) android_root: Option<PathBuf>,
    /// `--log`: a path, or `-` for stdout.
    pub(crate) log: Option<String>,
    pub(crate) log_max_bytes: u64,
    pub(crate) log_keep: usize,
    pub(crate) log_interval: Duration,
    pub(crate) flow_idle: Duration,
    /// How often the flow map is read for the tracker.
    pub(crate) poll_interval: Duration,
    /// Uids that get their own metric series; later ones fold into `other`.
    pub(crate) metrics_max_uids: usize,
    /// `--geoip` files (MaxMind DB or start,end,country CSV).
    pub(crate) geoip: Vec<PathBuf>,
    /// `--rules` file; the shipped rules when absent.
    pub(crate) rules: Option<PathBuf>,
    /// `--identifiers` file: device identifiers to search for beside (or
    /// instead of) those the agent finds itself.
    pub(crate) identifiers: Option<PathBuf>,
    /// `--netd-bpf-root`: where netd's pinned stats maps are (they must be
    /// there); without it they are looked for where Android keeps them.
    pub(crate) netd_bpf_root: Option<PathBuf>,
    /// Root-only directory (the `--run-dir`) where what the agent derives
    /// (per-country bytes, alerts, what each flow was accounted for) is kept
    /// across its restarts; `None`: nothing is kept.
    pub(crate) state_dir: Option<PathBuf>,
    /// `--state-dir`: where the history database is kept; `None`: no
    /// history (`--no-history`).
    pub(crate) history: Option<crate::history::store::HistoryOptions>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            android_root: None,
            log: None,
            log_max_bytes: 10 << 20,
            log_keep: 5,
            log_interval: Duration::from_secs(60),
            flow_idle: Duration::from_secs(300),
            poll_interval: Duration::from_secs(1),
            metrics_max_uids: 1000,
            geoip: Vec::new(),
            rules: None,
            identifiers: None,
            netd_bpf_root: None,
            state_dir: Some(crate::serve::state::default_dir()),
            history: None,
        }
    }
}

pub(crate) struct Agent {
    kernel: Mutex<Kernel>,
    /// The kernel's per-uid totals and health counters, read without the
    /// kernel's lock (which a pass holds for its walk of the flow map).
    counters: crate::bpf::kernel::Counters,
    /// What the latest pass knew, for scrapes and `status`: they never wait
    /// for a pass.
    facts: Mutex<Option<Arc<PassFacts>>>,
    /// Senders the event reader identified, on their way to the tracker.
    identified: Mutex<std::sync::mpsc::Receiver<Identified>>,
    resolver: RwLock<Arc<OwnerResolver>>,
    /// The device's identifiers, searched for in cleartext payloads.
    identifiers: RwLock<Identifiers>,
    sources_stamp: Mutex<Vec<Option<SystemTime>>>,
    pub(crate) tracker: Mutex<Tracker>,
    log: Mutex<Option<JsonlLog>>,
    pub(crate) options: AgentOptions,
    /// Uids given their own metric series, in order of first appearance.
    pub(crate) labelled_uids: Mutex<BTreeSet<u32>>,
    last_flow_count: AtomicU64,
    destinations: SharedDestinations,
    payloads_received: Arc<AtomicU64>,
    ticks: AtomicU64,
    owner_reloads: AtomicU64,
    owner_reloads_rejected: AtomicU64,
    events_received: Arc<AtomicU64>,
    log_errors: AtomicU64,
    started: Instant,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Android netd's own per-uid counters, where they exist.
    pub(crate) netd: Option<Mutex<crate::bpf::netd_stats::NetdStats>>,
    netd_uids: AtomicU64,
    /// The kernel programs' diagnostics (aya-log), drained once a pass.
    kernel_log: crate::bpf::kernel_log::KernelLog,
    kernel_log_reader: Mutex<aya_log::EbpfLogger<crate::bpf::kernel_log::KernelLog>>,
    /// The restart state of passes (taken with the tracker) and of scrapes.
    pass_state: Mutex<Option<PassState>>,
    scrape_state: Option<ScrapeState>,
    /// Re-arms payload capture of flows this agent found already captured.
    rearm: Mutex<Option<PayloadRearm>>,
    /// The history database, written every `--history-every` (see
    /// `History::after_pass`).
    history: Mutex<Option<crate::history::History>>,
    /// Block rules and the kernel's block maps. Lock order: destinations,
    /// then blocks; the tracker is never held with it.
    blocks: Arc<Mutex<crate::block::Blocks>>,
    /// When the rules file was last read.
    rules_stamp: Mutex<Option<SystemTime>>,
    /// What the latest pass began from, to skip passes over a still map.
    quiet: Mutex<Quiet>,
}

/// What a poll reads to tell whether anything moved since the latest pass
/// began: the kernel's counts, the payloads and identities received, and
/// changes to rules, owners and blocks.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Probe {
    kernel: crate::bpf::kernel::Movement,
    payloads: u64,
    identities: u64,
    changes: u64,
}

/// See [`Agent::may_skip_pass`].
#[derive(Default)]
struct Quiet {
    /// Read as the latest pass began (None: the next poll makes a pass).
    before_pass: Option<Probe>,
    /// Rules, owners or blocks changed this many times (see `pass_due`).
    changes: u64,
    last_pass: Option<Instant>,
    /// Polls that skipped their pass.
    skipped: u64,
}

/// A still map is walked at least this often all the same.
const QUIET_AT_MOST: Duration = Duration::from_secs(30);

/// The history database for the flow map `kernel` uses, if history is on
/// and its directory usable (without it, the agent runs and says why).
fn open_history(kernel: &Kernel, options: &AgentOptions) -> Option<crate::history::History> {
    let history = options.history.clone()?;
    let dir = history.dir.clone();
    let opened = kernel
        .loaded_map_fd(MAP_FLOWS)
        .context("FLOWS map missing")
        .and_then(|flows| Ok(crate::bpf_sys::map_info(flows)?.id))
        .and_then(|map_id| crate::history::History::open(history, map_id));
    match opened {
        Ok(history) => {
            log::info!("history: {}", history.path().display());
            Some(history)
        }
        Err(e) => {
            log::warn!(
                "{e:#}: running without history (fix it, or pass another --state-dir {} or \
                 --no-history)",
                dir.display()
            );
            None
        }
    }
}

/// The restart state files of the pins `kernel` uses, if `options` name a
/// usable directory (without one, a restart counts everything again).
fn open_states(kernel: &Kernel, options: &AgentOptions) -> Option<(PassState, ScrapeState)> {
    let dir = options.state_dir.as_deref()?;
    states_in(dir, kernel, options)
        .map_err(|e| {
            log::warn!(
                "{e:#}: nothing is kept across restarts (a restarted agent counts per-country \
                 bytes, flow starts and alerts of existing flows again)"
            )
        })
        .ok()
}

fn states_in(
    dir: &Path,
    kernel: &Kernel,
    options: &AgentOptions,
) -> Result<(PassState, ScrapeState)> {
    let flows = kernel
        .loaded_map_fd(MAP_FLOWS)
        .context("FLOWS map missing")?;
    let place = crate::serve::state::Place {
        dir,
        pin_dir: &kernel.options.pin_dir,
        identity: crate::serve::state::Identity::of_flows_map(flows)?,
    };
    place.prepare()?;
    Ok((
        PassState::new(&place, options.log.as_deref(), options.log_keep),
        ScrapeState::new(&place),
    ))
}

/// Takes back a previous agent's passes; starts afresh if the state cannot
/// be read whole, and then saves the fresh start at once: the log position
/// in it makes even a kill during the first pass exact.
fn restore_passes(
    state: &mut PassState,
    tracker: &mut Tracker,
    destinations: &mut Destinations,
    fresh: impl Fn() -> Tracker,
) {
    match state.restore(tracker, destinations) {
        Ok(true) => return,
        Ok(false) => {}
        Err(e) => {
            log::warn!("{e:#}: starting without it");
            *tracker = fresh();
            destinations.forget_infos();
        }
    }
    state.save(tracker, destinations);
}

/// Takes back the uids with their own series and netd's totals.
fn restore_scrapes(
    state: &ScrapeState,
    labelled: &mut BTreeSet<u32>,
    netd: Option<&mut crate::bpf::netd_stats::NetdStats>,
) {
    let scraped = match state.restore() {
        Ok(Some(scraped)) => scraped,
        Ok(None) => return,
        Err(e) => return log::warn!("{e:#}: starting without it"),
    };
    *labelled = scraped.labelled_uids;
    if let (Some(netd), Some(saved)) = (netd, scraped.netd) {
        if !netd.restore(saved) {
            log::info!("netd's totals were saved from another root: starting them afresh");
        }
    }
}

/// netd's counters: those under an explicit root must be there and
/// readable; the default places are optional (a damaged or unreadable set
/// there is reported and skipped: our own counters do not depend on it).
fn open_netd_stats(root: Option<&Path>) -> Result<Option<crate::bpf::netd_stats::NetdStats>> {
    use crate::bpf::netd_stats::NetdStats;
    let opened = match root {
        Some(root) => {
            let stats = NetdStats::open(root)?;
            if stats.is_none() {
                anyhow::bail!(
                    "--netd-bpf-root {}: no netd stats maps there (map_netd_stats_map_A/B, \
                     map_netd_configuration_map); on a phone they are under {}",
                    root.display(),
                    crate::bpf::netd_stats::NETD_BPF_ROOT
                );
            }
            stats
        }
        None => NetdStats::open_default().unwrap_or_else(|e| {
            log::warn!("netd's stats maps: {e:#}; going on without them");
            None
        }),
    };
    if let Some(stats) = &opened {
        log::info!(
            "reading netd's per-uid counters from {} ({})",
            stats.root().display(),
            stats.source()
        );
    }
    Ok(opened)
}

/// What `status` says about netd's counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct NetdStatus {
    pub(crate) root: PathBuf,
    pub(crate) source: String,
    pub(crate) uids: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HookStatus {
    pub(crate) hook: String,
    pub(crate) attached: bool,
    pub(crate) reason: Option<String>,
    pub(crate) held_by: Option<Conflict>,
    /// Interfaces a tc hook watches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) interfaces: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MapStatus {
    pub(crate) map: String,
    /// Entries seen by the agent's last walk of the map. A walk is not
    /// atomic: under heavy churn it can also meet keys that replaced ones it
    /// had already read, so it may briefly exceed `capacity` by a few.
    pub(crate) entries: u64,
    pub(crate) capacity: u64,
}

/// What a pass knows that `status` and `/metrics` show, published when the
/// pass ends.
#[derive(Debug, Clone)]
pub(crate) struct PassFacts {
    agent_tables: AgentTables,
    dns_responses: u64,
    geoip: Vec<String>,
    evidence_skipped: u64,
    tracker_evicted: u64,
    rules: Vec<String>,
    hooks: Vec<HookStatus>,
    attached: Vec<Hook>,
    load: LoadOptions,
    /// Bytes per (origin, firmware, country).
    pub(crate) bytes_by_country: Vec<(crate::pipeline::tracker::CountryKey, u64)>,
    /// Cleartext flows per (uid, owner, origin, firmware).
    pub(crate) cleartext_flows: Vec<(crate::pipeline::tracker::OwnerKey, u64)>,
    /// Flows per (identifier, form, origin, firmware).
    pub(crate) identifier_leaks: Vec<(crate::pipeline::tracker::LeakKey, u64)>,
    /// Matches per alert rule.
    pub(crate) alerts: Vec<(String, u64)>,
    /// Attempts refused per (rule, uid, owner, origin, firmware).
    pub(crate) blocked: Vec<(crate::pipeline::tracker::BlockedKey, u64)>,
    /// Identifier names searched for, with where each came from.
    identifiers: Vec<String>,
    history: Option<crate::history::store::HistoryStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct AgentTables {
    pub(crate) identities: u64,
    pub(crate) payload_infos: u64,
    pub(crate) dns_names: u64,
    pub(crate) tracked_flows: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Status {
    pub(crate) version: String,
    pub(crate) kernel: String,
    pub(crate) cgroup: PathBuf,
    pub(crate) pin_dir: PathBuf,
    pub(crate) pid: u32,
    pub(crate) uptime_seconds: u64,
    pub(crate) hooks: Vec<HookStatus>,
    /// Per counter, the hooks that feed it.
    pub(crate) backends: std::collections::BTreeMap<String, Vec<String>>,
    /// netd's per-uid counters, read alongside ours (Android).
    #[serde(default)]
    pub(crate) netd_stats: Option<NetdStatus>,
    pub(crate) maps: Vec<MapStatus>,
    pub(crate) events_lost: u64,
    pub(crate) flow_update_failures: u64,
    pub(crate) uid_update_failures: u64,
    pub(crate) unparsed_packets: u64,
    pub(crate) kernel_packets: u64,
    /// Distinct flows the kernel announced since its maps were created.
    pub(crate) flows_created: u64,
    /// Flows no longer in the map: created minus present (or the evictions
    /// the tracker saw, if higher).
    pub(crate) flows_evicted: u64,
    /// New-flow events this agent read from the ring buffer.
    pub(crate) events_received: u64,
    /// Passes over the flow map, and polls that made none because nothing
    /// had moved since the latest pass.
    #[serde(default)]
    pub(crate) passes: u64,
    #[serde(default)]
    pub(crate) quiet_polls: u64,
    pub(crate) log_write_errors: u64,
    /// Owner sources reread after a change, and rereads refused because the
    /// files were damaged (the last good owners stay in use).
    pub(crate) owner_reloads: u64,
    pub(crate) owner_reloads_rejected: u64,
    /// Problems found in the owner sources in use (skipped lines, ...).
    pub(crate) owner_warnings: Vec<String>,
    /// Payload events read (first payloads and DNS responses), and those the
    /// kernel dropped because the payload ring was full.
    pub(crate) payloads_received: u64,
    pub(crate) payloads_lost: u64,
    pub(crate) dns_responses: u64,
    /// `--geoip` sources in use.
    pub(crate) geoip: Vec<String>,
    /// Entries in the agent's own tables (each bounded by the flow map).
    pub(crate) agent_tables: AgentTables,
    /// Alert rules in force.
    pub(crate) rules: Vec<String>,
    /// Device identifiers searched for in cleartext (names and where each
    /// was read, never values), and those not found with why.
    #[serde(default)]
    pub(crate) identifiers: Vec<String>,
    /// Payload slices not searched for identifiers because too many flows
    /// were followed at once.
    #[serde(default)]
    pub(crate) evidence_slices_skipped: u64,
    /// The kernel programs' own diagnostics (aya-log, rare paths only).
    #[serde(default)]
    pub(crate) kernel_diagnostics: crate::bpf::kernel_log::KernelDiagnostics,
    /// The history database (--state-dir), null without one.
    #[serde(default)]
    pub(crate) history: Option<crate::history::store::HistoryStatus>,
    /// Block rules in force.
    #[serde(default)]
    pub(crate) blocks: Vec<crate::block::BlockStatus>,
}

/// What `status` says of blocks when the agent is gone.
pub(crate) const BLOCKS_OUTLIVE_AGENT: &str = "blocks stay in force while no agent runs (fail-closed: they live in the pinned BLOCKS map the attached programs read); a new agent applies its own rules, and `egressmon detach` or `egressmon unblock --all` removes every block";

/// Flows one pass walks per poll interval. A pass costs about 0.5 µs per
/// flow (the kernel's batched read, then the tracker), so above this many
/// flows the passes space out to keep the agent's share of a core roughly
/// constant: every 2 s at the default 65,536-entry map. The per-uid totals,
/// `top` and `flows` are read from the kernel when asked, whatever this is.
const WALK_FLOWS_PER_INTERVAL: u64 = 32_768;

fn walk_interval(base: Duration, flows: u64) -> Duration {
    // At most 4 s: identities wait 5 s for the pass that finds their flow.
    base * flows.div_ceil(WALK_FLOWS_PER_INTERVAL).clamp(1, 4) as u32
}

/// Files the owner resolver and the identifier set read; a change to any
/// of them triggers a reload of both.
fn reload_sources(options: &AgentOptions) -> Vec<PathBuf> {
    let root = options
        .android_root
        .clone()
        .unwrap_or_else(|| PathBuf::from("/"));
    let mut paths = vec![
        PathBuf::from("/etc/passwd"),
        root.join("data/system/packages.list"),
        root.join("data/system/packages.xml"),
    ];
    paths.extend(options.identifiers.clone());
    paths
}

fn identifier_sources(options: &AgentOptions) -> IdentifierSources {
    IdentifierSources {
        android_root: options.android_root.clone(),
        file: options.identifiers.clone(),
        linux_root: PathBuf::from("/"),
    }
}

/// The search for `identifiers`; says which are too short to search for.
fn evidence_for(identifiers: &Identifiers) -> Evidence {
    let (evidence, too_short) = Evidence::new(&identifiers.pairs());
    if !too_short.is_empty() {
        log::warn!(
            "identifiers too short to search for without false matches (fewer than 6 characters): {}",
            too_short.join(", ")
        );
    }
    evidence
}

/// When `path` was last modified, if it can be read.
fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn stamps(paths: &[PathBuf]) -> Vec<Option<SystemTime>> {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// Builds records for the tracker, resolving each uid once per pass.
struct Describer<'a> {
    resolver: &'a OwnerResolver,
    owners: std::cell::RefCell<HashMap<u32, crate::identity::owners::Owner>>,
    destinations: std::cell::RefCell<std::sync::MutexGuard<'a, Destinations>>,
    now: Instant,
}

impl crate::pipeline::tracker::Describe for Describer<'_> {
    fn record(
        &self,
        key: &FlowKey,
        value: &FlowValue,
        meta: Option<&events::FlowMeta>,
    ) -> FlowRecord {
        let owner = self.owner(key.uid);
        let mut record = flows::record(key, value, &owner, meta);
        record.partition = self
            .resolver
            .partition(key.uid, record.exe.as_deref(), record.cmdline.as_deref())
            .map(str::to_string);
        self.destinations
            .borrow_mut()
            .describe(key, &mut record, self.now);
        record
    }

    fn owner(&self, uid: u32) -> crate::identity::owners::Owner {
        self.owners
            .borrow_mut()
            .entry(uid)
            .or_insert_with(|| self.resolver.resolve(uid))
            .clone()
    }

    fn stamp(&self, key: &FlowKey) -> u64 {
        self.destinations.borrow().stamp(key)
    }

    fn has_name(&self, key: &FlowKey) -> bool {
        self.destinations.borrow_mut().has_name(key, self.now)
    }
}

impl Agent {
    pub(crate) fn start(load: LoadOptions, options: AgentOptions) -> Result<Arc<Agent>> {
        let log = match &options.log {
            Some(target) => Some(
                JsonlLog::open(target, options.log_max_bytes, options.log_keep)
                    .with_context(|| format!("opening --log {target}"))?,
            ),
            None => None,
        };
        let resolver = OwnerResolver::new(options.android_root.as_deref())?;
        let mut netd = open_netd_stats(options.netd_bpf_root.as_deref())?;
        let geoip = if options.geoip.is_empty() {
            GeoIp::empty()
        } else {
            GeoIp::open(&options.geoip)?
        };
        let rules = match &options.rules {
            Some(path) => Rules::load(path)?,
            None => Rules::defaults(),
        };
        let identifiers =
            Identifiers::load(&identifier_sources(&options)).map_err(anyhow::Error::msg)?;
        let capacity = load.flow_entries as usize;
        // Guard rails before anything is attached: a refused rules file
        // leaves the kernel as it was.
        let mut blocks = crate::block::Blocks::new(None);
        blocks.set_file_rules(&rules);
        blocks.check_all(&resolver).map_err(|e| {
            let file = options.rules.as_deref().unwrap_or(Path::new("(none)"));
            anyhow::anyhow!("rules file {}: {e:#}", file.display())
        })?;
        let mut kernel = Kernel::load(load)?;
        blocks.use_maps(kernel.block_maps()?);
        blocks.apply(&resolver, &geoip)?;
        let blocks = Arc::new(Mutex::new(blocks));
        let states = open_states(&kernel, &options);
        let history = open_history(&kernel, &options);
        let rearm = PayloadRearm::new(&kernel)
            .map_err(|e| log::warn!("payload capture cannot be re-armed: {e:#}"))
            .ok();
        let tracker_options = || TrackerOptions {
            capacity,
            update_every: options.log_interval,
            idle_after: options.flow_idle,
            emit: options.log.is_some(),
            rules: rules.clone(),
        };
        let mut tracker = Tracker::new(tracker_options());
        tracker.set_blocks(blocks.lock().unwrap().view());
        let mut destinations = Destinations::new(geoip, capacity);
        destinations.set_evidence(evidence_for(&identifiers));
        let answers = blocks.clone();
        destinations.set_answer_hook(Box::new(move |uid, names, addr, place| {
            answers
                .lock()
                .unwrap()
                .learn_answer(uid, names, addr, place);
        }));
        let mut labelled_uids = BTreeSet::new();
        let (mut pass_state, scrape_state) = states.unzip();
        if let Some(state) = &mut pass_state {
            restore_passes(state, &mut tracker, &mut destinations, || {
                Tracker::new(tracker_options())
            });
        }
        if let Some(state) = &scrape_state {
            restore_scrapes(state, &mut labelled_uids, netd.as_mut());
        }
        if history.is_some() {
            tracker.keep_unwritten();
        }
        let ring = kernel.take_events()?;
        let payload_ring = kernel.take_payloads()?;
        let kernel_log = crate::bpf::kernel_log::KernelLog::default();
        let kernel_log_reader = Mutex::new(kernel.take_log(kernel_log.clone())?);
        let stop = Arc::new(AtomicBool::new(false));
        let events_received = Arc::new(AtomicU64::new(0));
        let (reader, identified) =
            events::spawn_reader(ring, stop.clone(), events_received.clone());
        let destinations: SharedDestinations = Arc::new(Mutex::new(destinations));
        let payloads_received = Arc::new(AtomicU64::new(0));
        let payload_reader = crate::enrich::destinations::spawn_reader(
            payload_ring,
            destinations.clone(),
            stop.clone(),
            payloads_received.clone(),
            events::POLL_INTERVAL,
        );
        let sources_stamp = stamps(&reload_sources(&options));
        let rules_stamp = options.rules.as_deref().and_then(modified);
        let counters = kernel.counters()?;
        let agent = Arc::new(Agent {
            kernel: Mutex::new(kernel),
            counters,
            facts: Mutex::new(None),
            identified: Mutex::new(identified),
            resolver: RwLock::new(Arc::new(resolver)),
            identifiers: RwLock::new(identifiers),
            sources_stamp: Mutex::new(sources_stamp),
            tracker: Mutex::new(tracker),
            log: Mutex::new(log),
            options,
            labelled_uids: Mutex::new(labelled_uids),
            last_flow_count: AtomicU64::new(0),
            destinations,
            payloads_received,
            ticks: AtomicU64::new(0),
            owner_reloads: AtomicU64::new(0),
            owner_reloads_rejected: AtomicU64::new(0),
            events_received,
            log_errors: AtomicU64::new(0),
            started: Instant::now(),
            stop,
            threads: Mutex::new(vec![reader, payload_reader]),
            netd: netd.map(Mutex::new),
            netd_uids: AtomicU64::new(0),
            kernel_log,
            kernel_log_reader,
            pass_state: Mutex::new(pass_state),
            scrape_state,
            rearm: Mutex::new(rearm),
            history: Mutex::new(history),
            blocks,
            rules_stamp: Mutex::new(rules_stamp),
            quiet: Mutex::new(Quiet::default()),
        });
        let poller = Agent::spawn_poller(agent.clone());
        agent.threads.lock().unwrap().push(poller);
        Ok(agent)
    }

    fn spawn_poller(agent: Arc<Agent>) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new()
            .name("egressmon-poll".into())
            .spawn(move || {
                let mut last_reload_check = Instant::now();
                let mut polls: u64 = 0;
                while !agent.stop.load(Ordering::Relaxed) {
                    if last_reload_check.elapsed() >= Duration::from_secs(2) {
                        agent.reload_owners_if_changed();
                        agent.reload_rules_if_changed();
                        last_reload_check = Instant::now();
                    }
                    // Interfaces come and go whether or not anything moved.
                    let refresh_tc = polls.is_multiple_of(5);
                    if refresh_tc {
                        agent.kernel.lock().unwrap().refresh_tc();
                    }
                    polls += 1;
                    if agent.may_skip_pass() {
                        agent.quiet.lock().unwrap().skipped += 1;
                        if refresh_tc {
                            agent.publish_facts();
                        }
                    } else if let Err(e) = agent.tick() {
                        log::warn!("reading flows: {e:#}");
                    }
                    agent.kernel_log_reader.lock().unwrap().flush();
                    let pause = walk_interval(
                        agent.options.poll_interval,
                        agent.last_flow_count.load(Ordering::Relaxed),
                    );
                    let mut slept = Duration::ZERO;
                    while slept < pause && !agent.stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
                        slept += Duration::from_millis(50);
                    }
                }
                let _ = agent.tick();
            })
            .expect("spawning the flow poller")
    }

    /// One tracker pass: the kernel's flows, a chunk at a time, then events
    /// and log lines. Locks in this order: kernel, destinations, log,
    /// tracker, then the reader's channel (others take the kernel alone).
    pub(crate) fn tick(&self) -> Result<()> {
        let kernel = self.kernel.lock().unwrap();
        // Read before the walk: whatever moves from here on, the next
        // probe sees.
        let probe = self.probe();
        let resolver = self.resolver();
        let destinations = self.destinations.lock().unwrap();
        let prune = self
            .ticks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(10);
        let describe = Describer {
            resolver: &resolver,
            owners: Default::default(),
            destinations: std::cell::RefCell::new(destinations),
            now: Instant::now(),
        };
        let mut log = self.log.lock().unwrap();
        let mut write = |event: crate::serve::jsonl::LogEvent| {
            if let Some(log) = log.as_mut() {
                if let Err(e) = log.write(&event) {
                    self.log_errors.fetch_add(1, Ordering::Relaxed);
                    log::warn!("writing the --log line: {e}");
                }
            }
        };
        let mut tracker = self.tracker.lock().unwrap();
        tracker.receive(self.identified.lock().unwrap().try_iter().flatten());
        let pass = tracker.begin_pass(Instant::now());
        let read = kernel.flows_in_chunks(|chunk| {
            tracker.take(&pass, chunk, &describe, &mut write);
        });
        drop(kernel);
        let read = read?;
        self.last_flow_count.store(read, Ordering::Relaxed);
        {
            let mut quiet = self.quiet.lock().unwrap();
            quiet.before_pass = probe;
            quiet.last_pass = Some(Instant::now());
        }
        tracker.end_pass(pass, &describe, &mut write);
        if prune {
            // What the kernel no longer holds, the tracker just dropped too.
            describe
                .destinations
                .borrow_mut()
                .retain_live(&|k| tracker.contains(k), Instant::now());
        }
        self.after_pass(&mut tracker, &describe.destinations.borrow());
        let learnt = tracker.take_block_matches();
        drop(tracker);
        drop(describe);
        drop(log);
        if !learnt.is_empty() {
            let mut blocks = self.blocks.lock().unwrap();
            for (rule, uid, addr) in learnt {
                blocks.learn_flow(&rule, uid, addr);
            }
        }
        self.publish_facts();
        // Big passes leave freed memory in malloc's arenas; hand it back.
        #[cfg(target_env = "gnu")]
        if read > 4096 {
            // SAFETY: malloc_trim has no preconditions.
            unsafe { libc::malloc_trim(0) };
        }
        Ok(())
    }

    /// Reads what moved, without walking the flow map (None if the kernel's
    /// counters cannot be read: then every poll makes a pass).
    fn probe(&self) -> Option<Probe> {
        Some(Probe {
            kernel: self.counters.movement().ok()?,
            payloads: self.payloads_received.load(Ordering::Relaxed),
            identities: self.events_received.load(Ordering::Relaxed),
            changes: self.quiet.lock().unwrap().changes,
        })
    }

    /// Whether this poll may skip its pass: nothing moved since the latest
    /// pass began (the kernel made, evicted and counted nothing; no payload
    /// or identity arrived), nothing waits on a pass (idle endings, due log
    /// lines or history writes, identities, re-arming), no block entry is in
    /// the kernel (a refused attempt counts in its flow alone), and the
    /// latest pass is under [`QUIET_AT_MOST`] old. A walk of a full map
    /// costs tens of milliseconds; a probe, a few syscalls per uid.
    fn may_skip_pass(&self) -> bool {
        let now = Instant::now();
        let (before, last_pass) = {
            let quiet = self.quiet.lock().unwrap();
            (quiet.before_pass, quiet.last_pass)
        };
        let Some(before) = before else { return false };
        if last_pass.is_none_or(|t| now.duration_since(t) >= QUIET_AT_MOST)
            || self.blocks.lock().unwrap().in_kernel()
            || self.tracker_wants_pass(now)
            || self
                .history
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|h| h.wants_pass())
            || self
                .rearm
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|r| r.waiting())
            || self.probe() != Some(before)
        {
            return false;
        }
        true
    }

    /// Whether the tracker has work for a pass (see `Tracker::wants_pass`),
    /// or identities came that it holds no flow of yet: events are counted
    /// as they are read, before they reach the channel.
    fn tracker_wants_pass(&self, now: Instant) -> bool {
        let mut tracker = self.tracker.lock().unwrap();
        let mut received = false;
        for batch in self.identified.lock().unwrap().try_iter() {
            received = true;
            tracker.receive(batch);
        }
        received || tracker.wants_pass(now)
    }

    /// The next poll makes a pass (rules, owners or blocks changed), even
    /// if the change came during a pass that began before it.
    fn pass_due(&self) {
        self.quiet.lock().unwrap().changes += 1;
    }

    /// Re-arms payload capture where due, then saves the pass's state while
    /// the pass still holds the tracker: nothing reads a value that is not
    /// saved yet.
    fn after_pass(&self, tracker: &mut Tracker, destinations: &Destinations) {
        if let Some(rearm) = self.rearm.lock().unwrap().as_mut() {
            rearm.after_pass(tracker, destinations);
        }
        let changed = tracker.take_dirty();
        if let Some(history) = self.history.lock().unwrap().as_mut() {
            history.after_pass(tracker, changed, self.stop.load(Ordering::Relaxed));
        }
        if changed {
            if let Some(state) = self.pass_state.lock().unwrap().as_mut() {
                state.save(tracker, destinations);
            }
        }
    }

    /// Keeps what a scrape hands out beyond the kernel's counters (uids with
    /// series of their own, netd's totals): call it before answering.
    pub(crate) fn save_scrape_state(&self) {
        let Some(state) = &self.scrape_state else {
            return;
        };
        state.save(Scraped {
            labelled_uids: self.labelled_uids.lock().unwrap().clone(),
            netd: self.netd.as_ref().map(|n| n.lock().unwrap().snapshot()),
        });
    }

    /// Rereads the rules file when it changed: alert rules go to the
    /// tracker, block rules to the kernel. A file that does not parse, or
    /// whose block rules fail their guard rails, is refused with its error
    /// logged, and the rules in force stay.
    pub(crate) fn reload_rules_if_changed(&self) {
        let Some(path) = self.options.rules.as_deref() else {
            return;
        };
        let now = modified(path);
        let mut last = self.rules_stamp.lock().unwrap();
        if *last == now {
            return;
        }
        *last = now;
        let rules = match Rules::load(path) {
            Ok(rules) => rules,
            Err(e) => {
                log::warn!("rules file changed but was not taken, the rules in force stay: {e:#}");
                return;
            }
        };
        match self.apply_block_rules(|blocks, resolver, geoip| {
            blocks.replace_file_rules(&rules, resolver, geoip)
        }) {
            Ok(()) => {
                self.tracker.lock().unwrap().set_rules(rules);
                self.pass_due();
                log::info!("rules file changed: reloaded");
            }
            Err(e) => {
                log::warn!("rules file changed but was not taken, the rules in force stay: {e:#}")
            }
        }
    }

    /// Runs `change` on the block rules with the owners and GeoIP data it
    /// needs, then hands the tracker the rules' names.
    pub(crate) fn apply_block_rules(
        &self,
        change: impl FnOnce(
            &mut crate::block::Blocks,
            &crate::identity::owners::OwnerResolver,
            &GeoIp,
        ) -> Result<()>,
    ) -> Result<()> {
        let resolver = self.resolver();
        let destinations = self.destinations.lock().unwrap();
        let mut blocks = self.blocks.lock().unwrap();
        let result = change(&mut blocks, &resolver, destinations.geoip());
        drop(destinations);
        self.pass_due();
        let view = blocks.view();
        drop(blocks);
        self.tracker.lock().unwrap().set_blocks(view);
        result
    }

    /// `egressmon block`: adds (or replaces) the rule in `toml` (one
    /// `[[rule]]` with `action = "block"`).
    pub(crate) fn block(&self, toml: &str) -> Result<String> {
        let rule = crate::block::parse_command_rule(toml)?;
        let (name, mode) = (rule.name.clone(), rule.mode());
        self.apply_block_rules(|blocks, resolver, geoip| blocks.add(rule, resolver, geoip))?;
        log::info!("block rule {name} ({mode}) added by egressmon block");
        Ok(format!("block rule {name} in force ({mode})"))
    }

    /// `egressmon unblock`: `name=NAME` removes one rule, `all` every block.
    pub(crate) fn unblock(&self, query: &str) -> Result<String> {
        if query.split('&').any(|p| p == "all" || p == "all=1") {
            self.apply_block_rules(|blocks, resolver, geoip| blocks.remove_all(resolver, geoip))?;
            log::info!("every block removed by egressmon unblock --all");
            return Ok("every block removed (the rules file's come back when it changes)".into());
        }
        let name = query
            .split('&')
            .find_map(|p| p.strip_prefix("name="))
            .map(crate::serve::escape::decode_query_value)
            .context("name a block rule, or use --all")?;
        self.apply_block_rules(|blocks, resolver, geoip| blocks.remove(&name, resolver, geoip))?;
        log::info!("block rule {name} removed by egressmon unblock");
        Ok(format!("block rule {name} removed"))
    }

    /// Rebuilds the resolver and the identifier set when one of their
    /// files changed.
    pub(crate) fn reload_owners_if_changed(&self) {
        let now = stamps(&reload_sources(&self.options));
        let mut last = self.sources_stamp.lock().unwrap();
        if *last == now {
            return;
        }
        *last = now;
        self.reload_identifiers();
        self.pass_due();
        let current_warnings = self.resolver().warnings().len();
        match OwnerResolver::new(self.options.android_root.as_deref()) {
            // More damage than before (a truncated packages.xml, a broken
            // line): keep naming owners with the last good state.
            Ok(fresh) if fresh.warnings().len() > current_warnings => {
                self.owner_reloads_rejected.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "owner sources changed but are damaged ({}); keeping the previous owners until they are fixed",
                    fresh.warnings().join("; ")
                );
            }
            Ok(fresh) => {
                *self.resolver.write().unwrap() = Arc::new(fresh);
                self.owner_reloads.fetch_add(1, Ordering::Relaxed);
                log::info!("owner sources changed: reloaded");
                // Block rules by owner or package follow the uids.
                if let Err(e) = self.apply_block_rules(|b, r, g| b.apply(r, g)) {
                    log::warn!("block rules not reapplied to the new owners: {e:#}");
                }
            }
            Err(e) => {
                self.owner_reloads_rejected.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "owner sources changed but cannot be read ({e:#}); keeping the previous owners"
                );
            }
        }
    }

    /// A bad `--identifiers` file keeps the identifiers in use.
    fn reload_identifiers(&self) {
        match Identifiers::load(&identifier_sources(&self.options)) {
            Ok(fresh) => {
                let evidence = evidence_for(&fresh);
                self.destinations.lock().unwrap().set_evidence(evidence);
                *self.identifiers.write().unwrap() = fresh;
            }
            Err(e) => log::warn!("identifiers not reloaded, the previous ones stay in use: {e}"),
        }
    }

    pub(crate) fn resolver(&self) -> Arc<OwnerResolver> {
        self.resolver.read().unwrap().clone()
    }

    pub(crate) fn hook_report(&self) -> Vec<HookStatus> {
        let kernel = self.kernel.lock().unwrap();
        kernel
            .plans
            .iter()
            .map(|p| HookStatus {
                hook: p.hook.name().into(),
                attached: p.attach,
                reason: p.reason.clone(),
                held_by: p.conflict.clone(),
                interfaces: p.interfaces.clone(),
            })
            .collect()
    }

    /// The flow table, busiest first: a pass brings the tracker's model up
    /// to the kernel's counters (unless nothing moved since the latest
    /// began), then the model is read (nothing is described a second time).
    pub(crate) fn flows(&self) -> Result<Vec<FlowRecord>> {
        if !self.may_skip_pass() {
            self.tick()?;
        }
        let mut rows = self.tracker.lock().unwrap().records();
        flows::sort_busiest_first(&mut rows);
        Ok(rows)
    }

    /// netd's per-uid totals (monotonic), if this is Android.
    pub(crate) fn netd_totals(
        &self,
    ) -> Option<Result<std::collections::BTreeMap<u32, crate::bpf::netd_stats::UidTraffic>>> {
        let netd = self.netd.as_ref()?;
        let totals = netd.lock().unwrap().totals_by_uid();
        if let Ok(t) = &totals {
            self.netd_uids.store(t.len() as u64, Ordering::Relaxed);
        }
        Some(totals)
    }

    /// The mark that keeps the agent's own packets out of the counts.
    pub(crate) fn own_mark(&self) -> u32 {
        self.kernel.lock().unwrap().own_mark()
    }

    pub(crate) fn uid_totals(&self) -> Result<HashMap<UidKey, UidTotals>> {
        self.counters.uid_totals()
    }

    /// Gathers what the pass knows (locks in the poller's order).
    fn gather_facts(&self) -> PassFacts {
        let mut agent_tables = AgentTables::default();
        let (dns_responses, geoip, evidence_skipped) = {
            let d = self.destinations.lock().unwrap();
            (agent_tables.payload_infos, agent_tables.dns_names) = d.sizes();
            (d.dns_responses, d.geoip_sources(), d.evidence_skipped())
        };
        let hooks = self.hook_report();
        let (attached, load) = {
            let kernel = self.kernel.lock().unwrap();
            (kernel.attached(), kernel.options.clone())
        };
        let t = self.tracker.lock().unwrap();
        agent_tables.tracked_flows = t.tracked() as u64;
        agent_tables.identities = t.identities() as u64;
        PassFacts {
            agent_tables,
            dns_responses,
            geoip,
            evidence_skipped,
            tracker_evicted: t.flows_evicted,
            rules: t.rule_names(),
            hooks,
            attached,
            load,
            bytes_by_country: t
                .bytes_by_country()
                .into_iter()
                .map(|(k, v)| (k.clone(), v))
                .collect(),
            cleartext_flows: t
                .cleartext_flows
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            identifier_leaks: t
                .identifier_leaks
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            alerts: t.alerts.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            blocked: t.blocked.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            identifiers: self.identifiers.read().unwrap().describe(),
            history: self.history.lock().unwrap().as_ref().map(|h| h.status()),
        }
    }

    /// Publishes what the pass that just ended knows.
    fn publish_facts(&self) {
        let facts = Arc::new(self.gather_facts());
        *self.facts.lock().unwrap() = Some(facts);
    }

    /// What the latest pass knew (gathered now if no pass has ended yet).
    pub(crate) fn facts(&self) -> Arc<PassFacts> {
        if let Some(facts) = self.facts.lock().unwrap().clone() {
            return facts;
        }
        Arc::new(self.gather_facts())
    }

    /// The agent's status: the latest pass's facts with the kernel's health
    /// counters as they are now; waits for no pass.
    pub(crate) fn status(&self) -> Result<Status> {
        let facts = self.facts();
        let resolver = self.resolver();
        let mut backends = crate::bpf::hooks::backends(&facts.attached);
        let netd_stats = self.netd.as_ref().map(|n| {
            let n = n.lock().unwrap();
            NetdStatus {
                root: n.root().to_path_buf(),
                source: n.source().to_string(),
                uids: self.netd_uids.load(Ordering::Relaxed),
            }
        });
        if netd_stats.is_some() {
            backends.insert("netd_uid_tx_bytes".into(), vec!["netd_stats".into()]);
        }
        let stats = self.counters.stats()?;
        let uid_entries = self
            .counters
            .uid_totals()
            .map(|t| t.len() as u64)
            .unwrap_or(0);
        let o = &facts.load;
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").into(),
            kernel: crate::bpf::system::kernel_release(),
            cgroup: o.cgroup.clone(),
            pin_dir: o.pin_dir.clone(),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            hooks: facts.hooks.clone(),
            backends,
            netd_stats,
            maps: vec![
                MapStatus {
                    map: MAP_FLOWS.to_lowercase(),
                    entries: self.last_flow_count.load(Ordering::Relaxed),
                    capacity: o.flow_entries as u64,
                },
                MapStatus {
                    map: MAP_UID_TOTALS.to_lowercase(),
                    entries: uid_entries,
                    capacity: o.uid_entries as u64,
                },
            ],
            events_lost: stats[STAT_EVENTS_LOST as usize],
            flow_update_failures: stats[STAT_FLOW_UPDATE_FAILED as usize],
            uid_update_failures: stats[STAT_UID_UPDATE_FAILED as usize],
            unparsed_packets: stats[STAT_PARSE_SKIPPED as usize],
            kernel_packets: stats[STAT_KERNEL_PACKETS as usize],
            flows_created: stats[STAT_FLOWS_CREATED as usize],
            flows_evicted: stats[STAT_FLOWS_CREATED as usize]
                .saturating_sub(self.last_flow_count.load(Ordering::Relaxed))
                .max(facts.tracker_evicted),
            events_received: self.events_received.load(Ordering::Relaxed),
            passes: self.ticks.load(Ordering::Relaxed),
            quiet_polls: self.quiet.lock().unwrap().skipped,
            log_write_errors: self.log_errors.load(Ordering::Relaxed),
            owner_reloads: self.owner_reloads.load(Ordering::Relaxed),
            owner_reloads_rejected: self.owner_reloads_rejected.load(Ordering::Relaxed),
            owner_warnings: resolver.warnings().to_vec(),
            payloads_received: self.payloads_received.load(Ordering::Relaxed),
            payloads_lost: stats[STAT_PAYLOADS_LOST as usize],
            dns_responses: facts.dns_responses,
            geoip: facts.geoip.clone(),
            agent_tables: facts.agent_tables.clone(),
            rules: facts.rules.clone(),
            identifiers: facts.identifiers.clone(),
            evidence_slices_skipped: facts.evidence_skipped,
            kernel_diagnostics: self.kernel_log.diagnostics(),
            history: facts.history.clone(),
            blocks: self.blocks.lock().unwrap().status(),
        })
    }

    /// Stops the background threads after a last tracker step. Programs stay
    /// attached through their pinned links: the kernel keeps counting until
    /// `egressmon detach`.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for handle in self.threads.lock().unwrap().drain(..) {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_space_out_only_for_big_maps() {
        let second = Duration::from_secs(1);
        assert_eq!(walk_interval(second, 0), second);
        assert_eq!(walk_interval(second, 32_768), second);
        assert_eq!(walk_interval(second, 65_536), 2 * second);
        assert_eq!(walk_interval(second, 10_000_000), 4 * second);
    }
}
