//! `cargo xtask setup`: installs what the build and the tests need, only
//! when missing. Each step checks first, so a second run takes seconds.
//!
//! - nightly toolchain with rust-src (the eBPF crate builds core itself);
//! - Debian's LLVM dev packages for the LLVM major of nightly rustc, and
//!   bpf-linker built against them (the versions must match);
//! - bpftool, iproute2 and nftables for the kernel tests; tshark and
//!   tcpdump read the files `egressmon capture` writes;
//! - for static musl builds (`dist`, `vm-test`), when one is made: the
//!   target's C cross compiler, Debian's musl-dev for its architecture
//!   (see [`musl_c`]).

use crate::shell::{self, step};
use anyhow::{bail, Context, Result};

const BPF_LINKER_VERSION: &str = "0.13.0";
const TEST_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "nftables",
    "openssl",
    "prometheus",
    "tcpdump",
    "tmux",
    "tshark",
];

/// Answers to the questions a package asks while it installs (apt runs
/// with DEBIAN_FRONTEND=noninteractive, which takes these, or the package's
/// defaults): tshark's wireshark-common asks whether non-root users may
/// capture (no: the tests read files as root).
const DEBCONF_ANSWERS: &[(&str, &str)] = &[(
    "tshark",
    "wireshark-common wireshark-common/install-setuid boolean false",
)];

/// Runs every set-up step; returns nightly's LLVM major version.
pub fn all() -> Result<u32> {
    nightly()?;
    let llvm = nightly_llvm_major()?;
    let mut packages: Vec<String> = [format!("llvm-{llvm}-dev"), format!("libpolly-{llvm}-dev")]
        .into_iter()
        .collect();
    packages.extend(["libzstd-dev", "zlib1g-dev", "libxml2-dev"].map(String::from));
    packages.extend(TEST_PACKAGES.iter().map(|s| s.to_string()));
    apt(&packages)?;
    bpf_linker(llvm)?;
    Ok(llvm)
}

fn nightly() -> Result<()> {
    let toolchains = shell::output("rustup", &["toolchain", "list"]).context(
        "rustup not found: egressmon's eBPF build needs rustup with a nightly toolchain",
    )?;
    if toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("setup", "nightly toolchain: present");
    } else {
        step(
            "setup",
            "nightly toolchain: installing (rustup toolchain install nightly)",
        );
        shell::run(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    let components = shell::output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if components.lines().any(|l| l.starts_with("rust-src")) {
        step("setup", "rust-src for nightly: present");
    } else {
        step("setup", "rust-src for nightly: installing");
        shell::run(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }
    Ok(())
}

/// "LLVM version: 22.1.4" from `rustc +nightly -vV` -> 22.
fn nightly_llvm_major() -> Result<u32> {
    let info =
        shell::output("rustc", &["+nightly", "-vV"]).context("running rustc +nightly -vV")?;
    parse_llvm_major(&info).context("rustc +nightly -vV printed no LLVM version")
}

pub fn parse_llvm_major(info: &str) -> Option<u32> {
    info.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
}

fn installed(package: &str) -> bool {
    shell::output("dpkg-query", &["-W", "-f=${Status}", package])
        .is_some_and(|s| s.contains("install ok installed"))
}

/// Installs the Debian packages that are missing (one apt-get run).
pub fn apt(packages: &[String]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .map(String::as_str)
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        step(
            "setup",
            &format!("Debian packages: present ({})", packages.join(" ")),
        );
        return Ok(());
    }
    step(
        "setup",
        &format!("Debian packages: installing {}", missing.join(" ")),
    );
    if !shell::is_root() {
        bail!(
            "installing {} needs root: run `cargo xtask setup` as root",
            missing.join(" ")
        );
    }
    shell::run("apt-get", &["update", "-q"])?;
    preseed(&missing)?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(missing.iter().copied());
    let status = std::process::Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !status.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

/// The C cross compiler for the musl `target`'s C code (SQLite, which
/// libsqlite3-sys compiles with the `cc` crate): Debian's musl-dev of the
/// target's architecture, with the GNU cross gcc and binutils it depends on,
/// after adding that dpkg architecture when it is foreign (arm64 on an
/// x86_64 machine). Every static musl build (`dist`, `vm-test`) calls it
/// through [`crate::musl::cargo`], so only those install it.
pub fn musl_c(target: &str) -> Result<()> {
    let c = crate::musl::c_toolchain(target)?;
    let package = c.package();
    if !installed(&package) && !shell::is_root() {
        bail!(
            "{target} builds compile C code (SQLite) with {}, from {package}, which is missing: \
             installing it needs root, so run this command as root once",
            c.cc
        );
    }
    dpkg_arch(c.deb_arch, &package)?;
    apt(&[package])
}

/// Adds the dpkg architecture `arch` unless it is the native one or already
/// added; apt's lists for it come with the install's `apt-get update`.
fn dpkg_arch(arch: &str, wanted_for: &str) -> Result<()> {
    let native = shell::output("dpkg", &["--print-architecture"]).unwrap_or_default();
    if native.trim() == arch {
        step("setup", &format!("dpkg architecture {arch}: native"));
        return Ok(());
    }
    let foreign = shell::output("dpkg", &["--print-foreign-architectures"]).unwrap_or_default();
    if foreign.lines().any(|l| l.trim() == arch) {
        step("setup", &format!("dpkg architecture {arch}: present"));
        return Ok(());
    }
    step(
        "setup",
        &format!(
            "dpkg architecture {arch}: adding (dpkg --add-architecture {arch}, for {wanted_for})"
        ),
    );
    if !shell::is_root() {
        bail!("adding the dpkg architecture {arch} needs root");
    }
    shell::run("dpkg", &["--add-architecture", arch])
}

/// Gives debconf the answers in [`DEBCONF_ANSWERS`] for the packages about
/// to be installed.
fn preseed(missing: &[&str]) -> Result<()> {
    use std::io::Write;
    let answers: Vec<&str> = DEBCONF_ANSWERS
        .iter()
        .filter(|(package, _)| missing.contains(package))
        .map(|(_, answer)| *answer)
        .collect();
    if answers.is_empty() {
        return Ok(());
    }
    let mut child = std::process::Command::new("debconf-set-selections")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running debconf-set-selections")?;
    let mut stdin = child.stdin.take().context("debconf-set-selections stdin")?;
    for answer in answers {
        writeln!(stdin, "{answer}")?;
    }
    drop(stdin);
    if !child.wait()?.success() {
        bail!("debconf-set-selections failed");
    }
    Ok(())
}

fn bpf_linker(llvm: u32) -> Result<()> {
    let version = shell::output("bpf-linker", &["--version"]).unwrap_or_default();
    let path = shell::output("sh", &["-c", "command -v bpf-linker"]).unwrap_or_default();
    let linked = shell::output("ldd", &[path.trim()]).unwrap_or_default();
    let llvm_lib = format!("libLLVM.so.{llvm}");
    if version.contains(BPF_LINKER_VERSION) && linked.contains(&llvm_lib) {
        step(
            "setup",
            &format!("bpf-linker {BPF_LINKER_VERSION} (LLVM {llvm}): present"),
        );
        return Ok(());
    }
    step("setup", &format!("bpf-linker {BPF_LINKER_VERSION}: building against Debian's LLVM {llvm} (about a minute)"));
    let prefix = format!("/usr/lib/llvm-{llvm}");
    let feature = format!("llvm-{llvm}");
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                &feature,
            ])
            .env("LLVM_PREFIX", &prefix)
            .status()?;
    if !status.success() {
        bail!("cargo install bpf-linker failed: check that llvm-{llvm}-dev is installed under {prefix}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn llvm_major_parses() {
        let info = "rustc 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(super::parse_llvm_major(info), Some(22));
        assert_eq!(super::parse_llvm_major("nothing"), None);
    }
}
