//! Fuzzing the parsers of bytes from the network (DNS, TLS, HTTP, QUIC)
//! and the identifier matcher with cargo-fuzz: the crate in monitor/fuzz,
//! one target each.
//!
//! [`run`] installs cargo-fuzz if it is missing (like bpf-linker in
//! setup.rs: check first, so a second run costs nothing), builds the
//! targets once (nightly, AddressSanitizer), replays each seed corpus
//! (monitor/fuzz/corpus/<target>/) and then fuzzes each target for a
//! bounded time. New inputs the fuzzer finds go to target/fuzz-corpus/
//! <target>/, never into the committed seeds; a crash stops the run and
//! says where its input is and how to replay it.
//!
//! `cargo test` replays the same seed corpora without cargo-fuzz (the test
//! `fuzz::tests::replay_fuzz_corpora` of the egressmon-inspect crate).

use crate::shell::{self, step};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// The fuzz targets (binaries of monitor/fuzz, directories of its corpus).
pub const TARGETS: [&str; 5] = ["dns", "tls", "http", "quic", "leaks"];
/// Largest input the fuzzer makes: a whole QUIC Initial is 1200 bytes and
/// the kernel hands over at most a flow's first 4 KiB, so 4 KiB covers
/// every real case.
const MAX_LEN: u32 = 4096;

/// Installs cargo-fuzz if needed, replays every seed corpus, then fuzzes
/// each target for `seconds_per_target` seconds (0: replay only).
pub fn run(seconds_per_target: u64) -> Result<()> {
    crate::setup::all()?;
    cargo_fuzz()?;
    step(
        "fuzz",
        "building the fuzz targets (nightly, AddressSanitizer; the first build takes minutes)",
    );
    fuzz(&["build"])?;
    for target in TARGETS {
        let seeds = format!("fuzz/corpus/{target}");
        step("fuzz", &format!("{target}: replaying {seeds}"));
        fuzz(&["run", target, &seeds, "--", "-runs=0"]).with_context(|| crash_help(target))?;
        if seconds_per_target == 0 {
            continue;
        }
        let work = work_corpus(target)?;
        step(
            "fuzz",
            &format!(
                "{target}: fuzzing for {seconds_per_target} s (new inputs in {})",
                work.display()
            ),
        );
        let work = work.to_string_lossy().into_owned();
        let max_time = format!("-max_total_time={seconds_per_target}");
        let max_len = format!("-max_len={MAX_LEN}");
        fuzz(&[
            "run",
            target,
            &work,
            &seeds,
            "--",
            &max_time,
            &max_len,
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
        ])
        .with_context(|| crash_help(target))?;
    }
    step(
        "fuzz",
        "every target replayed its corpus and fuzzed without a crash",
    );
    Ok(())
}

fn crash_help(target: &str) -> String {
    format!(
        "fuzz target {target} failed: the input that crashed it is in monitor/fuzz/artifacts/{target}/; \
         replay it with `cd monitor && cargo +nightly fuzz run {target} fuzz/artifacts/{target}/<file>`, \
         fix the parser, and add the input to monitor/fuzz/corpus/{target}/"
    )
}

/// Where the fuzzer keeps what it finds: outside the committed seeds.
fn work_corpus(target: &str) -> Result<PathBuf> {
    let dir = shell::workspace_root()
        .join("target/fuzz-corpus")
        .join(target);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// `cargo +nightly fuzz ARGS` in monitor/ (where cargo-fuzz finds fuzz/).
fn fuzz(args: &[&str]) -> Result<()> {
    let status = Command::new("cargo")
        .arg("+nightly")
        .arg("fuzz")
        .args(args)
        .current_dir(shell::workspace_root().join("monitor"))
        // Let rustup pick nightly, and the fuzz crate its own target dir.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("starting cargo +nightly fuzz")?;
    if !status.success() {
        bail!("`cargo +nightly fuzz {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Installs cargo-fuzz with `cargo install --locked` unless it is there.
fn cargo_fuzz() -> Result<()> {
    if let Some(version) = shell::output("cargo", &["fuzz", "--version"]) {
        step("fuzz", &format!("{}: present", version.trim()));
        return Ok(());
    }
    step(
        "fuzz",
        "cargo-fuzz: installing (cargo install cargo-fuzz --locked, about a minute)",
    );
    shell::cargo(&["install", "cargo-fuzz", "--locked"])
        .context("cargo install cargo-fuzz failed: check that the package registry is reachable")
}

#[cfg(test)]
mod tests {
    /// The targets here, the fuzz crate's binaries and the seed corpora
    /// must name the same four parsers.
    #[test]
    fn targets_match_the_fuzz_crate_and_corpora() {
        let fuzz = crate::shell::workspace_root().join("monitor/fuzz");
        let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
        for target in super::TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{target}\"")),
                "{target} is a [[bin]] of monitor/fuzz"
            );
            assert!(fuzz.join(format!("fuzz_targets/{target}.rs")).is_file());
            assert!(fuzz.join(format!("corpus/{target}")).is_dir());
        }
    }
}
