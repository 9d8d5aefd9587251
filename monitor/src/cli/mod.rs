//! Command-line interface: `egressmon run|flows|owners|top|status|capture|detach|wait-netd`,
//! the client that reaches a running agent over its control socket, and the
//! renderers (plain tables, the live table, escaping of names).
//!
//! May call: `agent` (for `run`), `bpf` (for `detach`, `wait-netd`), `identity::owners`
//! (for `owners`), `pipeline::flows` (the rows it prints).

pub(crate) mod block;
pub mod client;
pub(crate) mod text;
pub(crate) mod top;
pub(crate) mod tui;

use crate::agent::{Agent, AgentOptions, Status};
use crate::bpf::hooks;
use crate::bpf::kernel::LoadOptions;
use crate::bpf::pins::PinDir;
use crate::cli::client::Endpoint;
use crate::identity::owners::OwnerResolver;
use crate::serve::api::{ApiOptions, MetricsAccess};
use crate::{bpf::system, pipeline::flows};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use monitor_common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:9864";
pub(crate) const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/egressmon";

#[derive(Parser, Debug)]
#[command(name = "egressmon", version, about = "Which app, or which part of the firmware, is sending data off this device, and to whom?", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// How to reach one agent (its pins, its control socket, its /metrics).
#[derive(Args, Debug, Clone)]
pub(crate) struct Target {
    /// bpffs directory holding the agent's pinned maps and links (default
    /// /sys/fs/bpf/egressmon). `flows`, `top` and `status` check that the
    /// agent they reach uses it.
    #[arg(long)]
    pub(crate) pin_dir: Option<PathBuf>,
    /// The agent's TCP address for /metrics; its control socket is named
    /// after it.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub(crate) listen: SocketAddr,
    /// Root-only directory of the agent's control socket (default
    /// /run/egressmon, on Android /data/adb/egressmon).
    #[arg(long, env = "EGRESSMON_RUN_DIR")]
    pub(crate) run_dir: Option<PathBuf>,
}

impl Target {
    pub(crate) fn pin_dir(&self) -> PathBuf {
        self.pin_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR))
    }

    /// The control socket of the agent these flags name, checked, when
    /// `--pin-dir` is given, to belong to the agent that uses those pins.
    pub(crate) fn agent(&self) -> Result<Endpoint> {
        let endpoint = self.endpoint();
        if let Some(pin_dir) = &self.pin_dir {
            let status: Status = serde_json::from_str(&endpoint.get("/status")?)?;
            if status.pin_dir != *pin_dir {
                anyhow::bail!(
                    "the agent on {} uses the pins under {}, not {}: give the --listen \
                     (and --run-dir) of the agent that uses {}",
                    endpoint.socket.display(),
                    status.pin_dir.display(),
                    pin_dir.display(),
                    pin_dir.display()
                );
            }
        }
        Ok(endpoint)
    }

    pub(crate) fn run_dir(&self) -> PathBuf {
        self.run_dir.clone().unwrap_or_else(default_run_dir)
    }

    /// The control socket of the agent these flags name.
    pub(crate) fn endpoint(&self) -> Endpoint {
        Endpoint::new(&self.run_dir(), self.listen)
    }
}

/// Whether this is an Android device (not a device layout read from a
/// directory: that is `--android-root`).
fn on_android() -> bool {
    Path::new("/system/build.prop").exists()
}

fn default_run_dir() -> PathBuf {
    crate::serve::state::default_dir()
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Attach the kernel programs and serve flows, status and /metrics.
    Run(Box<RunArgs>),
    /// Print the running agent's flow table.
    Flows {
        /// One JSON array, fields as documented in the README.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Print the UID -> owner table.
    Owners {
        #[arg(long)]
        json: bool,
        /// Read a device layout (DIR/data/system/packages.list and packages.xml,
        /// text or binary) instead of this host.
        #[arg(long)]
        android_root: Option<PathBuf>,
    },
    /// Live table grouped by owner (q quits); --once prints one plain table.
    Top {
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Hooks attached or skipped (and why), map fill, lost events.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Write the packets of selected flows to a pcapng file (filtered in
    /// the kernel, beside a running agent), a comment on each naming its
    /// uid, owner and flow.
    Capture(Box<crate::capture::CaptureArgs>),
    /// What each owner sent, from the history the agent keeps
    /// (--state-dir): per owner, as JSON, or as a Markdown report.
    Report(Box<crate::history::report::ReportArgs>),
    /// Destinations NEW reached that BASE did not (state directories or
    /// history.db files). Exit 0: no new firmware destination; 1: some
    /// (listed); 2: error.
    Diff(Box<crate::history::diff::DiffArgs>),
    /// Add a block rule to the running agent (a dry run unless --enforce):
    /// what it refuses is counted per flow (`blocked`) and in
    /// egressmon_blocked_total.
    Block(Box<crate::cli::block::BlockArgs>),
    /// Remove a block rule `egressmon block` added, or with --all every
    /// block.
    Unblock(crate::cli::block::UnblockArgs),
    /// Remove every program, link and pin egressmon made (and stop its agent).
    Detach {
        #[command(flatten)]
        target: Target,
    },
    /// Wait until Android's netd has attached its cgroup programs (exclusive
    /// cgroup_skb ingress and egress, and the rest of its sequence), so that
    /// `egressmon run` started next can never make netd's attach fail. Exit
    /// 0 once they are there, 1 at the timeout, 2 on an error.
    WaitNetd(WaitNetdArgs),
}

#[derive(Args, Debug)]
pub(crate) struct WaitNetdArgs {
    /// cgroup v2 directory netd attaches to (default: the cgroup2 root, as
    /// for `run`).
    #[arg(long)]
    pub(crate) cgroup: Option<PathBuf>,
    /// Seconds to wait before giving up (exit 1).
    #[arg(long, default_value_t = 120)]
    pub(crate) timeout: u64,
}

#[derive(Args, Debug)]
pub(crate) struct RunArgs {
    /// cgroup v2 directory to watch (default: the cgroup2 root, i.e. everything).
    #[arg(long)]
    pub(crate) cgroup: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) target: Target,
    /// Hooks to attach, comma separated (connect4, connect6, sendmsg4,
    /// sendmsg6, skb_egress, skb_ingress, tc_egress, tc_ingress). Default:
    /// connect4, connect6, skb_egress, skb_ingress; where another program
    /// holds the skb hooks (Android's netd), sendmsg4/6 and the tc programs
    /// on the network interfaces instead.
    #[arg(long)]
    pub(crate) hooks: Option<String>,
    /// Interfaces for the tc hooks, comma separated (default: every
    /// interface but loopback, including ones that appear later).
    #[arg(long, value_delimiter = ',')]
    pub(crate) tc_ifaces: Option<Vec<String>>,
    /// Directory of Android netd's pinned stats maps, read for exact per-uid
    /// byte totals (default: /sys/fs/bpf/netd_shared, else /sys/fs/bpf, when
    /// they are there).
    #[arg(long)]
    pub(crate) netd_bpf_root: Option<PathBuf>,
    /// Device layout to resolve owners from (DIR/data/system/packages.list and
    /// packages.xml), e.g. files pulled from a phone; default: this machine.
    #[arg(long)]
    pub(crate) android_root: Option<PathBuf>,
    /// Write JSON lines (flow_start, flow_update, flow_end, owner_change,
    /// alert) to this file, or `-` for stdout.
    #[arg(long)]
    pub(crate) log: Option<String>,
    /// Rotate the --log file when the next line would make it larger than this.
    #[arg(long, default_value_t = 10 << 20)]
    pub(crate) log_max_bytes: u64,
    /// Rotated --log files to keep (FILE.1 ... FILE.N).
    #[arg(long, default_value_t = 5)]
    pub(crate) log_keep: usize,
    /// Seconds between flow_update lines for flows that changed.
    #[arg(long, default_value_t = 60)]
    pub(crate) log_interval: u64,
    /// Seconds without traffic after which a flow_end line is written.
    #[arg(long, default_value_t = 300)]
    pub(crate) flow_idle: u64,
    /// GeoIP data for destination countries and networks: MaxMind DB files
    /// (country, ASN) or CSV files of start_ip,end_ip,country ranges.
    /// Repeatable.
    #[arg(long)]
    pub(crate) geoip: Vec<PathBuf>,
    /// Alert rules (TOML); without it the shipped rules apply (firmware
    /// sending cleartext, reaching a new country, or sending one of the
    /// device's identifiers where it can be read).
    #[arg(long)]
    pub(crate) rules: Option<PathBuf>,
    /// Device identifiers to look for in cleartext payloads, beside those
    /// found on the device (TOML: a table [identifiers] of name = "value",
    /// e.g. imei = "..."). Values are never printed, only names.
    #[arg(long)]
    pub(crate) identifiers: Option<PathBuf>,
    /// Uids besides root that may use the control socket (flows, status,
    /// top, detach), e.g. 2000 for `adb shell` without su. Comma separated.
    #[arg(long, value_delimiter = ',')]
    pub(crate) api_allow_uid: Vec<u32>,
    /// Who may scrape /metrics over TCP: uids of local peers, comma
    /// separated, or `any`. Default: any on Linux; 0,2000 (root and adb
    /// forward) on Android and with --android-root.
    #[arg(long, value_delimiter = ',')]
    pub(crate) metrics_allow_uid: Vec<String>,
    /// TLS and basic auth for /metrics, in the Prometheus exporter-toolkit
    /// layout (`tls_server_config: {cert_file, key_file}`,
    /// `basic_auth_users: {user: bcrypt hash}`); with a password or client
    /// certificates, peers on other hosts may scrape.
    #[arg(long)]
    pub(crate) web_config_file: Option<PathBuf>,
    /// Uids that get their own metric series; later uids fold into uid="other".
    #[arg(long, default_value_t = 1000)]
    pub(crate) metrics_max_uids: usize,
    /// Flow map capacity (LRU: least recently used flows are evicted).
    #[arg(long, default_value_t = DEFAULT_FLOW_ENTRIES)]
    pub(crate) flow_entries: u32,
    /// Per-uid totals map capacity.
    #[arg(long, default_value_t = DEFAULT_UID_ENTRIES)]
    pub(crate) uid_entries: u32,
    /// New-flow event ring buffer size in bytes (power of two).
    #[arg(long, default_value_t = DEFAULT_RINGBUF_BYTES)]
    pub(crate) ringbuf_bytes: u32,
    /// Root-only directory for the history database (what each uid sent,
    /// kept across restarts and reboots; read with `egressmon report`).
    /// Default /var/lib/egressmon, on Android /data/adb/egressmon.
    #[arg(long, env = "EGRESSMON_STATE_DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// Keep history this many days (whole hours are dropped, oldest first).
    #[arg(long, default_value_t = 90)]
    pub(crate) retain_days: u32,
    /// Largest size of the history database in MiB; beyond it the oldest
    /// hours are dropped.
    #[arg(long, default_value_t = 256)]
    pub(crate) history_max_mib: u64,
    /// Write every flow that moved to the history database this often, in
    /// seconds (flows the kernel evicts are written when found gone, and
    /// everything when the agent stops; a `kill -9` loses nothing either:
    /// the pinned maps keep counting and the next agent writes it).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) history_every: u64,
    /// Keep no history.
    #[arg(long, conflicts_with = "state_dir")]
    pub(crate) no_history: bool,
}

pub fn main_with(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Flows { json, target } => {
            let body = target.agent()?.get("/flows")?;
            if json {
                println!("{}", body.trim_end());
            } else {
                let rows: Vec<flows::FlowRecord> = serde_json::from_str(&body)?;
                print!("{}", flows::render_text(&rows));
            }
            Ok(())
        }
        Command::Owners { json, android_root } => owners(json, android_root),
        Command::Status { json, target } => {
            let body = target.agent()?.get("/status")?;
            if json {
                println!("{}", body.trim_end());
            } else {
                let status: Status = serde_json::from_str(&body)?;
                print!("{}", render_status(&status));
            }
            Ok(())
        }
        Command::Detach { target } => detach(target),
        Command::Block(args) => crate::cli::block::block(*args),
        Command::Unblock(args) => crate::cli::block::unblock(args),
        Command::Top { once, target } => crate::cli::top::run(&target.agent()?, once),
        Command::Capture(args) => crate::capture::run(*args),
        Command::Report(args) => crate::history::report::run(*args),
        Command::Diff(args) => match crate::history::diff::run(*args) {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("egressmon: {e:#}");
                std::process::exit(2)
            }
        },
        Command::WaitNetd(args) => wait_netd(args),
    }
}

/// `egressmon wait-netd`: exits 1 at the timeout and 2 on an error (not
/// root, no cgroup2, a failed query), so a boot script can tell them apart.
fn wait_netd(args: WaitNetdArgs) -> Result<()> {
    use crate::bpf::netd_wait::{self, Outcome};
    let timeout = std::time::Duration::from_secs(args.timeout);
    let outcome = system::require_root("egressmon wait-netd")
        .and_then(|()| system::resolve_cgroup(args.cgroup.as_deref()))
        .and_then(|cgroup| Ok((netd_wait::wait(&cgroup, timeout)?, cgroup)));
    let (outcome, cgroup) = match outcome {
        Ok(done) => done,
        Err(err) => {
            eprintln!("egressmon: {err:#}");
            std::process::exit(2);
        }
    };
    let at = crate::cli::text::escape(&cgroup.to_string_lossy()).into_owned();
    match outcome {
        Outcome::Ready { held, after } => {
            let mut out = format!(
                "netd's programs are attached at {at} (seen after {}, unchanged for {}):\n",
                netd_wait::seconds(after),
                netd_wait::seconds(netd_wait::SETTLE)
            );
            for hook in &held {
                out.push_str(&format!("  {hook}\n"));
            }
            print!("{out}");
            Ok(())
        }
        Outcome::TimedOut { held, settling } => {
            let waited = netd_wait::seconds(timeout);
            let what = if settling {
                format!("netd's programs at {at} were still changing after {waited}")
            } else {
                format!("netd has not attached its programs at {at} after {waited}")
            };
            let mut message = format!(
                "egressmon: {what}: start egressmon only once netd runs (by hand: \
                 `egressmon run`), since a program of ours on netd's hooks first would make \
                 netd's attach fail and break networking\n"
            );
            if held.is_empty() {
                message.push_str("  no exclusive program on netd's hooks\n");
            } else {
                message.push_str("  held so far:\n");
                for hook in &held {
                    message.push_str(&format!("    {hook}\n"));
                }
            }
            eprint!("{message}");
            std::process::exit(1);
        }
    }
}

fn run(args: RunArgs) -> Result<()> {
    system::require_root("egressmon run")?;
    // Big tables and snapshots in their own mappings: returned to the system
    // when freed and grown by remapping, not copying (glibc otherwise raises
    // this threshold as big blocks come and go, and keeps them in its heap).
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
    let api = api_options(&args)?;
    let cgroup = system::resolve_cgroup(args.cgroup.as_deref())?;
    let hooks = args.hooks.as_deref().map(hooks::parse_list).transpose()?;
    let options = LoadOptions {
        cgroup,
        pin_dir: args.target.pin_dir(),
        hooks,
        flow_entries: args.flow_entries,
        uid_entries: args.uid_entries,
        ringbuf_bytes: args.ringbuf_bytes,
        tc_ifaces: args.tc_ifaces.clone(),
    };
    let agent_options = AgentOptions {
        android_root: args.android_root.clone(),
        log: args.log.clone(),
        log_max_bytes: args.log_max_bytes,
        log_keep: args.log_keep,
        log_interval: std::time::Duration::from_secs(args.log_interval.max(1)),
        flow_idle: std::time::Duration::from_secs(args.flow_idle.max(1)),
        metrics_max_uids: args.metrics_max_uids,
        geoip: args.geoip.clone(),
        rules: args.rules.clone(),
        identifiers: args.identifiers.clone(),
        netd_bpf_root: args.netd_bpf_root.clone(),
        state_dir: Some(args.target.run_dir()),
        history: (!args.no_history).then(|| crate::history::store::HistoryOptions {
            dir: args
                .state_dir
                .clone()
                .unwrap_or_else(crate::history::default_state_dir),
            retain_days: args.retain_days.max(1),
            max_bytes: args.history_max_mib.max(1) << 20,
            write_every: std::time::Duration::from_secs(args.history_every),
        }),
        ..AgentOptions::default()
    };
    let agent = Agent::start(options, agent_options)?;
    for hook in agent.hook_report() {
        match (&hook.attached, &hook.reason) {
            (true, _) => log::info!("hook {}: attached", hook.hook),
            (false, Some(reason)) if hook.held_by.is_some() => {
                log::warn!("hook {}: {reason}", hook.hook)
            }
            (false, reason) => log::info!(
                "hook {}: not attached ({})",
                hook.hook,
                reason.clone().unwrap_or_default()
            ),
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let api = ApiOptions {
        own_mark: agent.own_mark(),
        ..api
    };
    runtime.block_on(serve_until_stopped(api, agent.clone()))?;
    agent.stop();
    log::info!(
        "agent stopped; the kernel keeps counting into pinned maps under {} until `egressmon detach`",
        args.target.pin_dir().display()
    );
    Ok(())
}

/// Where the agent answers and to whom, with its run directory made
/// (root's, checked) before anything is attached.
fn api_options(args: &RunArgs) -> Result<ApiOptions> {
    let control_uids: std::collections::BTreeSet<u32> = args
        .api_allow_uid
        .iter()
        .copied()
        .filter(|&u| u != 0)
        .collect();
    let run_dir = args.target.run_dir();
    prepare_run_dir(&run_dir, !control_uids.is_empty())?;
    Ok(ApiOptions {
        listen: args.target.listen,
        socket: args.target.endpoint().socket,
        control_uids,
        metrics: metrics_access(&args.metrics_allow_uid, args.android_root.is_some())?,
        web: Arc::new(match &args.web_config_file {
            Some(path) => crate::serve::web_config::WebConfig::load(path)?,
            None => Default::default(),
        }),
        own_mark: 0,
    })
}

fn metrics_access(allow: &[String], android_layout: bool) -> Result<MetricsAccess> {
    if allow.iter().any(|a| a == "any") {
        return Ok(MetricsAccess::Anyone);
    }
    if allow.is_empty() {
        return Ok(if android_layout || on_android() {
            MetricsAccess::Uids([0, 2000].into())
        } else {
            MetricsAccess::Anyone
        });
    }
    let uids = allow
        .iter()
        .map(|a| {
            a.parse::<u32>().with_context(|| {
                format!("--metrics-allow-uid {a}: expected uids (e.g. 0,2000) or `any`")
            })
        })
        .collect::<Result<_>>()?;
    Ok(MetricsAccess::Uids(uids))
}

/// The control socket's directory: made 0700 (0711 when other uids may use
/// the socket: they may then reach the socket by name, not list the
/// directory), and refused unless it is a real directory of root's that no
/// one else can write.
fn prepare_run_dir(dir: &Path, open_to_others: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    crate::serve::private_fs::ensure_private_dir(dir)
        .with_context(|| format!("the run directory {} (--run-dir)", dir.display()))?;
    let mode = if open_to_others { 0o711 } else { 0o700 };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("restricting {} to root", dir.display()))
}

async fn serve_until_stopped(api: ApiOptions, agent: Arc<Agent>) -> Result<()> {
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let _socket = crate::serve::api::serve(api, agent, shutdown.clone()).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => log::info!("interrupted"),
        _ = term.recv() => log::info!("terminated"),
        _ = shutdown.notified() => log::info!("shutdown requested"),
    }
    Ok(())
}

fn owners(json: bool, android_root: Option<PathBuf>) -> Result<()> {
    let resolver = OwnerResolver::new(android_root.as_deref())?;
    let table = resolver.known_owners();
    let mut out = String::new();
    if json {
        out = serde_json::to_string_pretty(&table)?;
        out.push('\n');
    } else {
        out.push_str(&format!(
            "{:>8} {:>5} {:>6} {:<12} {:<3} OWNER\n",
            "UID", "USER", "APP_ID", "ORIGIN", "FW"
        ));
        for o in &table {
            let packages = if o.packages.is_empty() || o.packages == [o.owner.clone()] {
                String::new()
            } else {
                format!(" [{}]", crate::cli::text::escape(&o.packages.join(", ")))
            };
            out.push_str(&format!(
                "{:>8} {:>5} {:>6} {:<12} {:<3} {}{packages}\n",
                o.uid,
                o.user,
                o.app_id,
                o.origin,
                if o.firmware { "yes" } else { "" },
                crate::cli::text::escape(&o.owner)
            ));
        }
    }
    crate::cli::text::print(&out)
}

/// Removes the socket a killed agent left behind: a socket nobody answers.
fn remove_stale_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    let refused = std::os::unix::net::UnixStream::connect(path)
        .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
    if is_socket && refused && std::fs::remove_file(path).is_ok() {
        println!("removed the stale control socket {}", path.display());
    }
}

/// How long `detach` waits for the agent to finish its last pass and exit.
const AGENT_EXIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn detach(target: Target) -> Result<()> {
    system::require_root("egressmon detach")?;
    if on_android() {
        // The Magisk service restarts an agent that died; this tells it the
        // stop was meant (cleared at the next boot).
        let marker = target.run_dir().join("stopped");
        if let Err(e) = std::fs::write(&marker, b"") {
            println!("cannot leave {}: {e}", marker.display());
        }
    }
    stop_agent(&target);
    for removed in crate::serve::state::remove(&target.run_dir(), &target.pin_dir()) {
        println!("removed the agent's state {}", removed.display());
    }
    let report = PinDir::new(&target.pin_dir()).detach().with_context(|| {
        format!(
            "detaching what egressmon pinned under {}",
            target.pin_dir().display()
        )
    })?;
    let pin_dir = target.pin_dir();
    let dir = pin_dir.display();
    if report.pins.is_empty() && report.links.is_empty() && report.foreign.is_empty() {
        println!("nothing to detach under {dir}");
    } else {
        let and_dir = if report.dir_removed {
            format!(" and {dir}")
        } else {
            String::new()
        };
        println!(
            "detached {} link(s) [{}], removed {} pin(s){and_dir}",
            report.links.len(),
            report.links.join(", "),
            report.pins.len(),
        );
    }
    if !report.foreign.is_empty() {
        println!(
            "left {dir}: it holds pins egressmon did not make: {}",
            crate::cli::text::escape(&report.foreign.join(", "))
        );
    }
    Ok(())
}

/// Stops the agent that uses `target`'s pins, and waits for it to exit so
/// its last pass is over before the links go. An agent on that socket that
/// uses other pins is left running.
fn stop_agent(target: &Target) {
    let endpoint = target.endpoint();
    let status: Status = match endpoint
        .get("/status")
        .and_then(|body| Ok(serde_json::from_str(&body)?))
    {
        Ok(status) => status,
        Err(e) => {
            println!("no agent to stop ({e:#})");
            remove_stale_socket(&endpoint.socket);
            return;
        }
    };
    if status.pin_dir != target.pin_dir() {
        println!(
            "the agent on {} (pid {}) uses {}, not {}: left running",
            endpoint.socket.display(),
            status.pid,
            status.pin_dir.display(),
            target.pin_dir().display()
        );
        return;
    }
    if let Err(e) = endpoint.post("/shutdown") {
        println!("asking agent pid {} to stop: {e:#}", status.pid);
        return;
    }
    let deadline = std::time::Instant::now() + AGENT_EXIT_TIMEOUT;
    while crate::identity::process::alive(status.pid) {
        if std::time::Instant::now() > deadline {
            println!(
                "agent pid {} did not exit within {}s; detaching anyway",
                status.pid,
                AGENT_EXIT_TIMEOUT.as_secs()
            );
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    println!("stopped agent pid {}", status.pid);
}

pub(crate) fn render_status(s: &Status) -> String {
    let mut out = format!(
        "egressmon {} on kernel {}, pid {}, up {}s\ncgroup  {}\npins    {}\n\nhooks:\n",
        s.version,
        s.kernel,
        s.pid,
        s.uptime_seconds,
        crate::cli::text::escape(&s.cgroup.to_string_lossy()),
        crate::cli::text::escape(&s.pin_dir.to_string_lossy())
    );
    for h in &s.hooks {
        let state = if h.attached {
            "attached".to_string()
        } else {
            h.reason.clone().unwrap_or_else(|| "not attached".into())
        };
        let on = if h.interfaces.is_empty() {
            String::new()
        } else {
            format!(" on {}", h.interfaces.join(", "))
        };
        out.push_str(&format!(
            "  {:<11} {}{}\n",
            h.hook,
            crate::cli::text::escape(&state),
            crate::cli::text::escape(&on)
        ));
    }
    out.push_str("\nmaps:\n");
    for m in &s.maps {
        out.push_str(&format!("  {:<11} {} / {}\n", m.map, m.entries, m.capacity));
    }
    out.push_str(&format!(
        "\nevents lost: {}   flow update failures: {}   uid update failures: {}\n",
        s.events_lost, s.flow_update_failures, s.uid_update_failures
    ));
    out.push_str(&format!(
        "passes over the flow map: {}   polls with nothing moved (no pass): {}\n",
        s.passes, s.quiet_polls
    ));
    match &s.history {
        Some(h) => {
            out.push_str(&format!(
                "\nhistory: {} ({} passes failed to write",
                crate::cli::text::escape(&h.path.to_string_lossy()),
                h.failed_passes
            ));
            for aside in &h.moved_aside {
                out.push_str(&format!(
                    "; damaged copy moved to {}",
                    crate::cli::text::escape(&aside.to_string_lossy())
                ));
            }
            out.push_str(")\n");
        }
        None => out.push_str("\nhistory: none (--no-history, or its directory was unusable)\n"),
    }
    if !s.blocks.is_empty() {
        out.push_str("\nblock rules:\n");
        for b in &s.blocks {
            let uids = match &b.uids {
                None => "every uid".to_string(),
                Some(u) if u.len() > 8 => format!("{} uids", u.len()),
                Some(u) => format!(
                    "uid {}",
                    u.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
                ),
            };
            out.push_str(&format!(
                "  {} ({}, from the {}): {}, {} kernel entries, {} learnt addresses\n",
                crate::cli::text::escape(&b.name),
                b.mode,
                b.source,
                uids,
                b.entries,
                b.learnt
            ));
        }
        out.push_str(&format!("  {}\n", crate::agent::BLOCKS_OUTLIVE_AGENT));
    }
    if !s.identifiers.is_empty() {
        out.push_str("\nidentifiers searched for (names only):\n");
        for line in &s.identifiers {
            out.push_str(&format!("  {}\n", crate::cli::text::escape(line)));
        }
    }
    let diagnostics = &s.kernel_diagnostics;
    if let Some(latest) = diagnostics.recent.last() {
        out.push_str(&format!(
            "kernel diagnostics: {} (latest: {})\n",
            diagnostics.count,
            crate::cli::text::escape(latest)
        ));
    }
    out
}
