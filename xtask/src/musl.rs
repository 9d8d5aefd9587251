//! Static musl builds for another machine (a VM guest, a phone): installs
//! the rustup target and the C cross compiler when missing, links with
//! rust-lld against Rust's own musl and returns the executables cargo
//! reports.
//!
//! C code in the dependency tree (SQLite, which libsqlite3-sys compiles with
//! the `cc` crate) is compiled by Debian's musl-dev for the target's
//! architecture: it installs `<arch>-linux-musl-gcc`, a wrapper that runs
//! the GNU cross gcc (`<arch>-linux-gnu-gcc`, a dependency) on musl's
//! headers. Only the objects come from it; rust-lld links them with the
//! crt objects and libc.a that rustup ships for the target.

use crate::shell::{self, step};
use anyhow::{bail, Context, Result};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};

pub const AARCH64: &str = "aarch64-unknown-linux-musl";
pub const X86_64: &str = "x86_64-unknown-linux-musl";

/// Installs `target`'s standard library with rustup when it is missing.
pub fn ensure_target(target: &str) -> Result<()> {
    let installed = shell::output("rustup", &["target", "list", "--installed"]).context(
        "rustup not found: static builds need rustup (https://rustup.rs) to add the musl target",
    )?;
    if installed.lines().any(|l| l.trim() == target) {
        step("setup", &format!("rust target {target}: present"));
        return Ok(());
    }
    step(
        "setup",
        &format!("rust target {target}: installing (rustup target add)"),
    );
    shell::run("rustup", &["target", "add", target])
}

/// The C toolchain for a musl target's C code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CToolchain {
    /// `CC_<target>` for the `cc` crate.
    pub cc: &'static str,
    /// `AR_<target>`: binutils' archiver for the architecture (the host's
    /// `ar` cannot index another architecture's objects).
    pub ar: &'static str,
    /// The Debian architecture whose `musl-dev` installs `cc`.
    pub deb_arch: &'static str,
}

impl CToolchain {
    /// The Debian package that installs it (with the GNU cross gcc and
    /// binutils as dependencies).
    pub fn package(&self) -> String {
        format!("musl-dev:{}", self.deb_arch)
    }
}

pub fn c_toolchain(target: &str) -> Result<CToolchain> {
    Ok(match target {
        AARCH64 => CToolchain {
            cc: "aarch64-linux-musl-gcc",
            ar: "aarch64-linux-gnu-ar",
            deb_arch: "arm64",
        },
        X86_64 => CToolchain {
            cc: "x86_64-linux-musl-gcc",
            ar: "x86_64-linux-gnu-ar",
            deb_arch: "amd64",
        },
        _ => bail!("no C toolchain known for {target}: choose {AARCH64} or {X86_64}"),
    })
}

/// One executable cargo built: its target name, kind and path.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub name: String,
    pub kind: String,
    pub path: PathBuf,
}

/// Runs `cargo <args> --target <target>` statically linked with rust-lld,
/// with `extra_rustflags` for the target's code only, and returns every
/// executable built. C code is compiled with [`c_toolchain`]'s compiler
/// (`CC_<target>` and `AR_<target>` already set in the environment win).
pub fn cargo(target: &str, args: &[&str], extra_rustflags: &str) -> Result<Vec<Artifact>> {
    ensure_target(target)?;
    crate::setup::musl_c(target)?;
    let c = c_toolchain(target)?;
    let env_target = target.to_uppercase().replace('-', "_");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(&cargo);
    let cc_target = target.replace('-', "_");
    for (kind, tool) in [("CC", c.cc), ("AR", c.ar)] {
        let var = format!("{kind}_{cc_target}");
        let preset = [&var, &format!("{kind}_{target}")]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        if !preset {
            command.env(var, tool);
        }
    }
    let mut child = command
        .args(args)
        .args([
            "--target",
            target,
            "--message-format=json-render-diagnostics",
        ])
        .env(format!("CARGO_TARGET_{env_target}_LINKER"), "rust-lld")
        .env(
            format!("CARGO_TARGET_{env_target}_RUSTFLAGS"),
            format!("-C link-self-contained=yes -C target-feature=+crt-static {extra_rustflags}"),
        )
        .current_dir(shell::workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cargo}"))?;
    let mut artifacts = Vec::new();
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        if let Some(exe) = msg["executable"].as_str() {
            artifacts.push(Artifact {
                name: msg["target"]["name"].as_str().unwrap_or_default().into(),
                kind: msg["target"]["kind"][0].as_str().unwrap_or_default().into(),
                path: exe.into(),
            });
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "`cargo {} --target {target}` failed ({status}); the errors are above",
            args.join(" ")
        );
    }
    Ok(artifacts)
}

/// The executable named `name` of kind `kind` ("bin", "test").
pub fn find(artifacts: &[Artifact], name: &str, kind: &str) -> Result<PathBuf> {
    artifacts
        .iter()
        .find(|a| a.name == name && a.kind == kind)
        .map(|a| a.path.clone())
        .with_context(|| format!("cargo reported no {kind} executable named {name}"))
}

/// Whether an ELF file has no program interpreter (is statically linked).
pub fn is_static_elf(bytes: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return false; // not a little-endian ELF64
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        at + 4 <= bytes.len() && u32_at(at) != PT_INTERP
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn c_toolchains() {
        let arm = super::c_toolchain(super::AARCH64).unwrap();
        assert_eq!(arm.cc, "aarch64-linux-musl-gcc");
        assert_eq!(arm.package(), "musl-dev:arm64");
        let x86 = super::c_toolchain(super::X86_64).unwrap();
        assert_eq!(x86.cc, "x86_64-linux-musl-gcc");
        assert_eq!(x86.package(), "musl-dev:amd64");
        assert!(super::c_toolchain("riscv64gc-unknown-linux-musl").is_err());
    }

    #[test]
    fn static_elf_detection() {
        // This test binary is dynamically linked (glibc host build).
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!super::is_static_elf(&me));
        assert!(!super::is_static_elf(b"not an elf"));
    }
}
