//! Command-line interface: `egressmon run|flows|owners|top|status|detach`.

use crate::agent::{Agent, AgentOptions, Status};
use crate::hooks;
use crate::kernel::{self, LoadOptions};
use crate::owners::OwnerResolver;
use crate::{client, flows, system, traffic};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use monitor_common::*;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9864";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/egressmon";

#[derive(Parser, Debug)]
#[command(name = "egressmon", version, about = "Which app, or which part of the firmware, is sending data off this device, and to whom?", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach one agent (its pins and its HTTP endpoint).
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// bpffs directory holding the agent's pinned maps and links.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Address of the agent's HTTP endpoint (/metrics, /flows, /status).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach the kernel programs and serve flows, status and /metrics.
    Run(RunArgs),
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
    /// Remove every program, link and pin egressmon made (and stop its agent).
    Detach {
        #[command(flatten)]
        target: Target,
    },
    /// Generate test traffic (used by the test suite and benchmarks).
    #[command(hide = true)]
    Gen(traffic::GenArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// cgroup v2 directory to watch (default: the cgroup2 root, i.e. everything).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    #[command(flatten)]
    pub target: Target,
    /// Hooks to attach, comma separated (connect4, connect6, sendmsg4,
    /// sendmsg6, skb_egress, skb_ingress, tc_egress, tc_ingress). Default:
    /// connect4, connect6, skb_egress, skb_ingress; where another program
    /// holds the skb hooks (Android's netd), sendmsg4/6 and the tc programs
    /// on the network interfaces instead.
    #[arg(long)]
    pub hooks: Option<String>,
    /// Interfaces for the tc hooks, comma separated (default: every
    /// interface but loopback, including ones that appear later).
    #[arg(long, value_delimiter = ',')]
    pub tc_ifaces: Option<Vec<String>>,
    /// Directory of Android netd's pinned stats maps, read for exact per-uid
    /// byte totals (default: /sys/fs/bpf/netd_shared, else /sys/fs/bpf, when
    /// they are there).
    #[arg(long)]
    pub netd_bpf_root: Option<PathBuf>,
    /// Device layout to resolve owners from (DIR/data/system/packages.list and
    /// packages.xml), e.g. files pulled from a phone; default: this machine.
    #[arg(long)]
    pub android_root: Option<PathBuf>,
    /// Write JSON lines (flow_start, flow_update, flow_end, owner_change,
    /// alert) to this file, or `-` for stdout.
    #[arg(long)]
    pub log: Option<String>,
    /// Rotate the --log file when the next line would make it larger than this.
    #[arg(long, default_value_t = 10 << 20)]
    pub log_max_bytes: u64,
    /// Rotated --log files to keep (FILE.1 ... FILE.N).
    #[arg(long, default_value_t = 5)]
    pub log_keep: usize,
    /// Seconds between flow_update lines for flows that changed.
    #[arg(long, default_value_t = 60)]
    pub log_interval: u64,
    /// Seconds without traffic after which a flow_end line is written.
    #[arg(long, default_value_t = 300)]
    pub flow_idle: u64,
    /// GeoIP data for destination countries and networks: MaxMind DB files
    /// (country, ASN) or CSV files of start_ip,end_ip,country ranges.
    /// Repeatable.
    #[arg(long)]
    pub geoip: Vec<PathBuf>,
    /// Alert rules (TOML); without it the shipped rules apply (firmware
    /// sending cleartext, firmware reaching a new country).
    #[arg(long)]
    pub rules: Option<PathBuf>,
    /// Uids that get their own metric series; later uids fold into uid="other".
    #[arg(long, default_value_t = 1000)]
    pub metrics_max_uids: usize,
    /// Flow map capacity (LRU: least recently used flows are evicted).
    #[arg(long, default_value_t = DEFAULT_FLOW_ENTRIES)]
    pub flow_entries: u32,
    /// Per-uid totals map capacity.
    #[arg(long, default_value_t = DEFAULT_UID_ENTRIES)]
    pub uid_entries: u32,
    /// New-flow event ring buffer size in bytes (power of two).
    #[arg(long, default_value_t = DEFAULT_RINGBUF_BYTES)]
    pub ringbuf_bytes: u32,
}

pub fn main_with(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => run(args),
        Command::Flows { json, target } => {
            let body = client::get(target.listen, "/flows")?;
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
            let body = client::get(target.listen, "/status")?;
            if json {
                println!("{}", body.trim_end());
            } else {
                let status: Status = serde_json::from_str(&body)?;
                print!("{}", render_status(&status));
            }
            Ok(())
        }
        Command::Detach { target } => detach(target),
        Command::Top { once, target } => crate::top::run(target.listen, once),
        Command::Gen(args) => traffic::run(args),
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
    let cgroup = system::resolve_cgroup(args.cgroup.as_deref())?;
    let hooks = args.hooks.as_deref().map(hooks::parse_list).transpose()?;
    let options = LoadOptions {
        cgroup,
        pin_dir: args.target.pin_dir.clone(),
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
        netd_bpf_root: args.netd_bpf_root.clone(),
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
    runtime.block_on(serve_until_stopped(args.target.listen, agent.clone()))?;
    agent.stop();
    log::info!(
        "agent stopped; the kernel keeps counting into pinned maps under {} until `egressmon detach`",
        args.target.pin_dir.display()
    );
    Ok(())
}

async fn serve_until_stopped(listen: SocketAddr, agent: Arc<Agent>) -> Result<()> {
    let shutdown = Arc::new(tokio::sync::Notify::new());
    crate::api::serve(listen, agent, shutdown.clone()).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => log::info!("interrupted"),
        _ = term.recv() => log::info!("terminated"),
        _ = shutdown.notified() => log::info!("shutdown requested"),
    }
    Ok(())
}

fn owners(json: bool, android_root: Option<PathBuf>) -> Result<()> {
    use std::io::Write;
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
                format!(" [{}]", o.packages.join(", "))
            };
            out.push_str(&format!(
                "{:>8} {:>5} {:>6} {:<12} {:<3} {}{packages}\n",
                o.uid,
                o.user,
                o.app_id,
                o.origin,
                if o.firmware { "yes" } else { "" },
                o.owner
            ));
        }
    }
    // A closed pipe (`egressmon owners | head`) is not an error.
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn detach(target: Target) -> Result<()> {
    system::require_root("egressmon detach")?;
    if client::post(target.listen, "/shutdown").is_ok() {
        println!("asked the agent on {} to stop", target.listen);
    }
    let report = kernel::detach(&target.pin_dir).with_context(|| {
        format!(
            "detaching what egressmon pinned under {}",
            target.pin_dir.display()
        )
    })?;
    if report.pins.is_empty() {
        println!("nothing to detach under {}", target.pin_dir.display());
    } else {
        println!(
            "detached {} link(s) [{}], removed {} pin(s) and {}",
            report.links.len(),
            report.links.join(", "),
            report.pins.len(),
            target.pin_dir.display()
        );
    }
    Ok(())
}

pub fn render_status(s: &Status) -> String {
    let mut out = format!(
        "egressmon {} on kernel {}, pid {}, up {}s\ncgroup  {}\npins    {}\n\nhooks:\n",
        s.version,
        s.kernel,
        s.pid,
        s.uptime_seconds,
        s.cgroup.display(),
        s.pin_dir.display()
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
        out.push_str(&format!("  {:<11} {state}{on}\n", h.hook));
    }
    out.push_str("\nmaps:\n");
    for m in &s.maps {
        out.push_str(&format!("  {:<11} {} / {}\n", m.map, m.entries, m.capacity));
    }
    out.push_str(&format!(
        "\nevents lost: {}   flow update failures: {}   uid update failures: {}\n",
        s.events_lost, s.flow_update_failures, s.uid_update_failures
    ));
    out
}
