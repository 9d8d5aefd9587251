//! `cargo xtask`: set-up, build, run and test automation for egressmon.
//!
//! Every command installs what it needs first (idempotently, saying what it
//! does), so a fresh machine needs nothing but this repository and root.

mod bench;
mod dist;
mod fuzz;
mod initramfs;
mod musl;
mod setup;
mod shell;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "egressmon build, run and test automation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing: rust-src, LLVM dev packages, bpf-linker, bpftool, test tools.
    Setup,
    /// Build the agent with its embedded kernel programs.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, start the agent on the whole system and show the live table
    /// (the agent's log goes to a file the table's footer names).
    Run {
        /// Where the agent's log goes (default target/egressmon-run.log).
        #[arg(long)]
        agent_log: Option<PathBuf>,
        /// Run this egressmon binary instead of building one (the tests
        /// drive `cargo xtask run` with the binary they test).
        #[arg(long, hide = true)]
        bin: Option<PathBuf>,
        /// Extra arguments for `egressmon run` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Measure egressmon's overhead against the bare kernel, empty programs, nftables, tcpdump.
    Bench(bench::BenchArgs),
    /// Run every test: formatting, lints, unit tests, kernel tests (root),
    /// then the kernel tests inside QEMU guests (vm-test).
    Test {
        /// Length of the soak test in seconds.
        #[arg(long, default_value_t = 240)]
        soak_secs: u64,
    },
    /// Boot Debian kernels under QEMU and run the kernel tests inside them.
    VmTest {
        /// Guest architecture (default: both).
        #[arg(long, value_enum)]
        arch: Option<vm::Arch>,
        /// Kernel series (5.10, 6.1, 6.12) or `all`.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Run only the tests whose names contain one of these (comma separated).
        #[arg(long)]
        filter: Option<String>,
        /// Minutes one guest may run before QEMU is killed.
        #[arg(long, default_value_t = 30)]
        timeout_mins: u64,
    },
    /// Fuzz the DNS, TLS, HTTP and QUIC parsers (seed corpora first).
    Fuzz {
        /// Seconds of fuzzing per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Build the static, stripped egressmon for a phone or any Linux box.
    Dist {
        /// aarch64-unknown-linux-musl (default, phones) or x86_64-unknown-linux-musl.
        #[arg(long)]
        target: Option<String>,
        /// Also build a Magisk module zip around it.
        #[arg(long)]
        magisk: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::all().map(drop),
        Command::Build { release } => setup::all().and_then(|_| build(release)),
        Command::Run {
            agent_log,
            bin,
            args,
        } => run(bin, agent_log, args),
        Command::Bench(args) => bench::run(args),
        Command::Test { soak_secs } => test(soak_secs),
        Command::VmTest {
            arch,
            kernel,
            filter,
            timeout_mins,
        } => setup::all().and_then(|_| {
            vm::run(vm::Options {
                arch,
                kernel,
                filter,
                timeout: std::time::Duration::from_secs(timeout_mins * 60),
            })
        }),
        Command::Dist { target, magisk } => dist::run(target, magisk),
        Command::Fuzz { seconds } => fuzz::run(seconds),
    };
    if let Err(err) = result {
        eprintln!("xtask: {err:#}");
        std::process::exit(1);
    }
}

fn build(release: bool) -> Result<()> {
    shell::step("build", "egressmon (agent + embedded eBPF object)");
    let mut args = vec!["build", "--package", "monitor", "--bin", "egressmon"];
    if release {
        args.push("--release");
    }
    shell::cargo(&args)
}

fn run(bin: Option<PathBuf>, agent_log: Option<PathBuf>, extra: Vec<String>) -> Result<()> {
    shell::require_root("cargo xtask run")?;
    let bin = match bin {
        Some(bin) => bin,
        None => {
            setup::all()?;
            build(true)?;
            target_dir().join("release/egressmon")
        }
    };
    let log_path = agent_log.unwrap_or_else(|| target_dir().join("egressmon-run.log"));
    shell::step(
        "run",
        &format!(
            "{} run {} (log: {})",
            bin.display(),
            extra.join(" "),
            log_path.display()
        ),
    );
    let log = agent_log_file(&log_path)?;
    let mut agent = std::process::Command::new(&bin)
        .arg("run")
        .args(&extra)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let listen = listen_arg(&extra);
    if let Err(e) = wait_until_answering(&bin, &listen, &mut agent) {
        let _ = agent.kill();
        let _ = agent.wait();
        anyhow::bail!("{e:#}; {}", log_tail(&log_path));
    }
    // The table alone on the terminal; the agent's lines go to the file the
    // footer names.
    let shown = std::process::Command::new(&bin)
        .args(["top", "--listen", &listen])
        .env("EGRESSMON_AGENT_LOG", &log_path)
        .status();
    // Stop the agent we started (by pid); its pinned programs keep counting
    // until `egressmon detach`.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let _ = agent.wait();
    shown?;
    println!(
        "egressmon stopped; its log is {}. The kernel keeps counting; `{} detach` removes everything.",
        log_path.display(),
        bin.display()
    );
    Ok(())
}

/// The agent's log file, new for this run: root's only, never reached
/// through a symlink.
fn agent_log_file(path: &Path) -> Result<std::fs::File> {
    use anyhow::Context;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("opening the agent's log {}", path.display()))
}

/// Waits (up to 10 s) until `egressmon status` gets an answer from the agent.
fn wait_until_answering(bin: &Path, listen: &str, agent: &mut std::process::Child) -> Result<()> {
    for _ in 0..100 {
        if let Some(status) = agent.try_wait()? {
            anyhow::bail!("egressmon run exited: {status}");
        }
        let probe = std::process::Command::new(bin)
            .args(["status", "--listen", listen])
            .output()?;
        if probe.status.success() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    anyhow::bail!("the agent did not answer on {listen}")
}

/// The last lines of the agent's log, to say why it stopped.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(5)..].join("\n");
    format!("the agent's log {} ends with:\n{tail}", path.display())
}

fn listen_arg(extra: &[String]) -> String {
    extra
        .iter()
        .position(|a| a == "--listen")
        .and_then(|i| extra.get(i + 1).cloned())
        .or_else(|| {
            extra
                .iter()
                .find_map(|a| a.strip_prefix("--listen=").map(str::to_string))
        })
        .unwrap_or_else(|| "127.0.0.1:9864".into())
}

/// Features the integration tests are built with: the fault injection
/// they use (`reliability`), which a shipped build leaves out. Every build
/// of the tests passes it (here and the VM guest's in vm.rs), so that one
/// build serves them all.
pub const TEST_FEATURES: &str = "fault-injection";

/// The agent binary the integration tests run (`EGRESSMON_BIN`), copied
/// into a fresh directory only root can enter, as a clone in /root or in
/// `mktemp -d` would have it: a test that runs it as another uid without
/// a copy of its own (`support::BinForAnyUid`) fails here (EACCES), not on
/// a newcomer's first run. A copy, not a chmod, and no second build. The
/// test traffic generator (`EGRESSMON_GEN_BIN`) is copied beside it.
struct PrivateBin {
    dir: PathBuf,
}

impl PrivateBin {
    fn install() -> Result<PrivateBin> {
        use anyhow::Context;
        // The binaries exactly as the integration tests build them.
        shell::cargo(&[
            "test",
            "--package",
            "monitor",
            "--features",
            TEST_FEATURES,
            "--tests",
            "--no-run",
        ])?;
        let mut template = *b"/tmp/egressmon-test-bin.XXXXXX\0";
        // SAFETY: a NUL-terminated template that mkdtemp fills in place.
        let made = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
        anyhow::ensure!(
            !made.is_null(),
            "mkdtemp: {}",
            std::io::Error::last_os_error()
        );
        let dir = PathBuf::from(std::str::from_utf8(&template[..template.len() - 1])?);
        let private = PrivateBin { dir };
        for name in ["egressmon", "egressmon-gen"] {
            let built = target_dir().join("debug").join(name);
            std::fs::copy(&built, private.dir.join(name))
                .with_context(|| format!("copying {}", built.display()))?;
        }
        let bin = private.dir.join("egressmon");
        shell::step(
            "test",
            &format!(
                "integration tests run {} (a 0700 directory, as in a private clone)",
                bin.display()
            ),
        );
        std::env::set_var("EGRESSMON_BIN", &bin);
        std::env::set_var("EGRESSMON_GEN_BIN", private.dir.join("egressmon-gen"));
        Ok(private)
    }
}

impl Drop for PrivateBin {
    fn drop(&mut self) {
        std::env::remove_var("EGRESSMON_BIN");
        std::env::remove_var("EGRESSMON_GEN_BIN");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Cargo's target directory.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| shell::workspace_root().join("target"))
}

/// One integration test file of the agent, tests run one at a time (each
/// makes cgroups, namespaces and pins of its own).
fn integration_test(name: &str) -> Result<()> {
    shell::cargo(&[
        "test",
        "--package",
        "monitor",
        "--features",
        TEST_FEATURES,
        "--test",
        name,
        "--",
        "--test-threads=1",
    ])
}

fn test(soak_secs: u64) -> Result<()> {
    setup::all()?;
    shell::require_root("cargo xtask test (the kernel tests load eBPF programs)")?;
    shell::step("test", "formatting (cargo fmt --check)");
    shell::cargo(&["fmt", "--all", "--check"])?;
    shell::step("test", "lints (cargo clippy -D warnings)");
    shell::cargo(&[
        "clippy",
        "--package",
        "monitor",
        "--package",
        "egressmon-bpf-sys",
        "--package",
        "egressmon-inspect",
        "--package",
        "monitor-common",
        "--package",
        "xtask",
        "--package",
        "vm-init",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    shell::run_in(
        "monitor-ebpf",
        "cargo",
        &[
            "+nightly",
            "clippy",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
            "../target/ebpf-clippy",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    shell::step("test", "unit tests");
    shell::cargo(&[
        "test",
        "--package",
        "egressmon-bpf-sys",
        "--package",
        "egressmon-inspect",
        "--package",
        "monitor-common",
        "--package",
        "xtask",
        "--package",
        "vm-init",
    ])?;
    shell::cargo(&["test", "--package", "monitor", "--lib", "--bins"])?;
    let private_bin = PrivateBin::install()?;
    // The agents the tests start keep their history here, not in the
    // machine's /var/lib/egressmon (the history tests name their own).
    let history = shell::workspace_root().join("target/test-history");
    let _ = std::fs::remove_dir_all(&history);
    std::env::set_var("EGRESSMON_STATE_DIR", &history);
    shell::step(
        "test",
        "kernel tests on this machine's kernel (root, real programs, exact counts)",
    );
    integration_test("kernel")?;
    shell::step(
        "test",
        "the tc fallback over time: 100 interfaces coming and going, restarts during traffic",
    );
    integration_test("tc")?;
    shell::step(
        "test",
        "owners on a simulated Android device (--android-root, app and platform uids); the boot wait for netd",
    );
    integration_test("android")?;
    shell::step(
        "test",
        "Android netd's own per-uid counters: maps of netd's layout, swapped and drained",
    );
    integration_test("netd_stats")?;
    shell::step(
        "test",
        "what users see: a real Prometheus, the JSON log, top in tmux",
    );
    integration_test("observability")?;
    shell::step(
        "test",
        "fleet examples: Vector, Fluent Bit, ClickHouse and Prometheus configs against real log lines and metric names",
    );
    integration_test("fleet")?;
    shell::step(
        "test",
        "where it went: DNS, SNI, HTTP Host, GeoIP and alert rules end to end",
    );
    integration_test("destinations")?;
    shell::step(
        "test",
        "evidence: the test's IMEI, serial and machine id found in cleartext POSTs, in their forms, not inside TLS",
    );
    integration_test("evidence")?;
    shell::step(
        "test",
        "who may see what: unprivileged uids, peer credentials, Host checks, connection floods",
    );
    integration_test("security")?;
    shell::step(
        "test",
        "pins and files: symlinks, foreign owners, planted maps, foreign pins, the --log file",
    );
    integration_test("pins")?;
    integration_test("files")?;
    shell::step(
        "test",
        "a local service's replies: 10,000 connections, one inbound flow",
    );
    integration_test("services")?;
    shell::step(
        "test",
        "egressmon capture: pcapng of selected uids, filtered in the kernel, read by tshark",
    );
    integration_test("capture")?;
    shell::step(
        "test",
        "blocking: refused connects and sends, dry runs, guard rails, a cut connection, country and host rules, the tc path",
    );
    integration_test("blocking")?;
    shell::step(
        "test",
        "restarts: per-country bytes, alerts, log lines and netd totals exact across kill -9",
    );
    integration_test("restart")?;
    shell::step(
        "test",
        "history: restarts and reboots exact in report --json, diff exit codes, retention, a damaged database",
    );
    integration_test("history")?;
    shell::step(
        "test",
        &format!("faults: kill -9, a million destinations, bad input, soak for {soak_secs}s"),
    );
    std::env::set_var("EGRESSMON_SOAK_SECS", soak_secs.to_string());
    integration_test("reliability")?;
    drop(private_bin);
    let _ = std::fs::remove_dir_all(&history);
    bench::smoke()?;
    shell::step(
        "test",
        "fuzzing the DNS, TLS, HTTP and QUIC parsers (corpora replayed, 10 s per target)",
    );
    fuzz::run(10)?;
    shell::step(
        "test",
        "kernel tests inside QEMU guests: Debian arm64 5.10, 6.1 and 6.12, x86_64 6.12",
    );
    vm::run(vm::Options {
        arch: None,
        kernel: "all".into(),
        filter: None,
        timeout: std::time::Duration::from_secs(30 * 60),
    })?;
    shell::step("test", "all passed");
    Ok(())
}
