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
    /// Build, start the agent on the whole system and show the live table.
    Run {
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
        /// Kernel series (6.1, 6.12) or `all`.
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
        Command::Run { args } => run(args),
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

fn run(extra: Vec<String>) -> Result<()> {
    setup::all()?;
    shell::require_root("cargo xtask run")?;
    build(true)?;
    let bin = shell::workspace_root().join("target/release/egressmon");
    shell::step("run", &format!("{} run {}", bin.display(), extra.join(" ")));
    let mut agent = std::process::Command::new(&bin)
        .arg("run")
        .args(&extra)
        .spawn()?;
    let listen = listen_arg(&extra);
    // Wait for the agent's endpoint, then show the live table in the foreground.
    let mut ready = false;
    for _ in 0..100 {
        if let Some(status) = agent.try_wait()? {
            anyhow::bail!("egressmon run exited: {status}");
        }
        let probe = std::process::Command::new(&bin)
            .args(["status", "--listen", &listen])
            .output()?;
        if probe.status.success() {
            ready = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if !ready {
        let _ = agent.kill();
        anyhow::bail!("the agent did not answer on {listen}");
    }
    let shown = std::process::Command::new(&bin)
        .args(["top", "--listen", &listen])
        .status();
    // Stop the agent we started (by pid); its pinned programs keep counting
    // until `egressmon detach`.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let _ = agent.wait();
    shown?;
    println!("egressmon stopped. The kernel keeps counting; `target/release/egressmon detach` removes everything.");
    Ok(())
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

/// One integration test file of the agent, tests run one at a time (each
/// makes cgroups, namespaces and pins of its own).
fn integration_test(name: &str) -> Result<()> {
    shell::cargo(&[
        "test",
        "--package",
        "monitor",
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
        "monitor-common",
        "--package",
        "xtask",
        "--package",
        "vm-init",
    ])?;
    shell::cargo(&["test", "--package", "monitor", "--lib", "--bins"])?;
    shell::step(
        "test",
        "kernel tests on this machine's kernel (root, real programs, exact counts)",
    );
    integration_test("kernel")?;
    shell::step(
        "test",
        "owners on a simulated Android device (--android-root, app and platform uids)",
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
        "where it went: DNS, SNI, HTTP Host, GeoIP and alert rules end to end",
    );
    integration_test("destinations")?;
    shell::step(
        "test",
        &format!("faults: kill -9, a million destinations, bad input, soak for {soak_secs}s, security defaults"),
    );
    std::env::set_var("EGRESSMON_SOAK_SECS", soak_secs.to_string());
    integration_test("reliability")?;
    bench::smoke()?;
    shell::step(
        "test",
        "fuzzing the DNS, TLS, HTTP and QUIC parsers (corpora replayed, 10 s per target)",
    );
    fuzz::run(10)?;
    shell::step(
        "test",
        "kernel tests inside QEMU guests: Debian arm64 6.1 and 6.12, x86_64 6.12",
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
