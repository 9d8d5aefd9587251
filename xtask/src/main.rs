//! `cargo xtask`: set-up, build, run and test automation for egressmon.
//!
//! Every command installs what it needs first (idempotently, saying what it
//! does), so a fresh machine needs nothing but this repository and root.

mod bench;
mod setup;
mod shell;

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
    /// Run every test: formatting, lints, unit tests, kernel tests (root).
    Test {
        /// Length of the soak test in seconds.
        #[arg(long, default_value_t = 240)]
        soak_secs: u64,
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
    shell::cargo(&["test", "--package", "monitor-common", "--package", "xtask"])?;
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
        "what users see: a real Prometheus, the JSON log, top in tmux",
    );
    integration_test("observability")?;
    shell::step(
        "test",
        &format!("faults: kill -9, a million destinations, bad input, soak for {soak_secs}s, security defaults"),
    );
    std::env::set_var("EGRESSMON_SOAK_SECS", soak_secs.to_string());
    integration_test("reliability")?;
    bench::smoke()?;
    shell::step("test", "all passed");
    Ok(())
}
