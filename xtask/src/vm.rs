//! `cargo xtask vm-test`: the kernel tests inside QEMU guests booting
//! Debian's own kernels (arm64 5.10, 6.1 and 6.12, x86_64 6.12), under
//! software emulation (TCG; no KVM needed).
//!
//! Per kernel: find the newest `linux-image-<series>.*-<arch>-unsigned`
//! package with apt (adding the dpkg architecture when needed; 5.10 through
//! a private apt configuration for Debian bullseye), download and
//! unpack it once under target/vm-cache, take the image and the modules the
//! tests need (veth), build the agent, the kernel test binary and the guest's
//! /init (xtask/vm-init) as static musl binaries, pack them into an
//! initramfs, boot, and read the verdict from the markers /init prints on the
//! serial console (QEMU exits 0 even after a guest panic). Any failed or
//! missing test, unsupported hook, panic or timeout fails the run.

use crate::initramfs::Cpio;
use crate::musl;
use crate::shell::{self, step};
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Arch {
    Arm64,
    #[value(name = "x86_64")]
    X86_64,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Arm64 => "arm64",
            Arch::X86_64 => "x86_64",
        }
    }
    /// Debian's architecture name.
    fn deb(self) -> &'static str {
        match self {
            Arch::Arm64 => "arm64",
            Arch::X86_64 => "amd64",
        }
    }
    fn rust_target(self) -> &'static str {
        match self {
            Arch::Arm64 => musl::AARCH64,
            Arch::X86_64 => musl::X86_64,
        }
    }
    fn qemu(self) -> &'static str {
        match self {
            Arch::Arm64 => "qemu-system-aarch64",
            Arch::X86_64 => "qemu-system-x86_64",
        }
    }
    fn qemu_package(self) -> &'static str {
        match self {
            Arch::Arm64 => "qemu-system-arm",
            Arch::X86_64 => "qemu-system-x86",
        }
    }
    fn machine(self) -> &'static [&'static str] {
        match self {
            // cortex-a57 boots three times faster than -cpu max under TCG.
            Arch::Arm64 => &["-M", "virt", "-cpu", "cortex-a57"],
            Arch::X86_64 => &[],
        }
    }
    fn console(self) -> &'static str {
        match self {
            Arch::Arm64 => "ttyAMA0",
            Arch::X86_64 => "ttyS0",
        }
    }
}

/// A kernel series tested on an architecture.
#[derive(Clone, Copy, Debug)]
pub struct KernelSpec {
    pub arch: Arch,
    pub series: &'static str,
    source: Source,
}

/// Where apt finds a series' packages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// The machine's own apt sources (Debian bookworm: 6.1 and 6.12).
    System,
    /// A Debian suite the machine does not use (bullseye: 5.10), through a
    /// private apt configuration under target/vm-cache/apt-SUITE-ARCH (its
    /// own sources list, lists and cache) on the machine's own Debian
    /// mirror. The machine's sources and caches are never touched.
    Suite(&'static str),
}

impl KernelSpec {
    fn label(&self) -> String {
        format!("{} {}", self.arch.name(), self.series)
    }
}

/// Every kernel `vm-test` knows: the kernels phones and servers run.
/// 5.10 is the GKI line of most Android 12-14 phones (android12-5.10,
/// android13-5.10); before 6.6 phones have no TCX, so the tc fallback goes
/// over netlink there, as it does in the 5.10 and 6.1 guests.
pub const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        arch: Arch::Arm64,
        series: "5.10",
        source: Source::Suite("bullseye"),
    },
    KernelSpec {
        arch: Arch::Arm64,
        series: "6.1",
        source: Source::System,
    },
    KernelSpec {
        arch: Arch::Arm64,
        series: "6.12",
        source: Source::System,
    },
    KernelSpec {
        arch: Arch::X86_64,
        series: "6.12",
        source: Source::System,
    },
];

/// Kernel options the tests cannot do without, and modules they load
/// (config symbol, module path under lib/modules/RELEASE without suffix).
const REQUIRED_CONFIG: &[&str] = &[
    "CONFIG_BPF_SYSCALL",
    "CONFIG_CGROUP_BPF",
    "CONFIG_NET_NS",
    "CONFIG_PACKET",
    "CONFIG_IPV6",
    "CONFIG_DEVTMPFS",
    "CONFIG_BLK_DEV_INITRD",
];
const MODULES: &[(&str, &str)] = &[
    ("CONFIG_VETH", "kernel/drivers/net/veth"),
    // The tc fallback over netlink: the clsact qdisc and BPF filters.
    ("CONFIG_NET_SCH_INGRESS", "kernel/net/sched/sch_ingress"),
    ("CONFIG_NET_CLS_BPF", "kernel/net/sched/cls_bpf"),
];

pub struct Options {
    pub arch: Option<Arch>,
    pub kernel: String,
    pub filter: Option<String>,
    pub timeout: Duration,
}

fn cache_dir() -> PathBuf {
    shell::workspace_root().join("target/vm-cache")
}

/// The kernels `arch` and `kernel` ("all" or a series such as 6.1) select.
pub fn select(arch: Option<Arch>, kernel: &str) -> Result<Vec<KernelSpec>> {
    let chosen: Vec<KernelSpec> = KERNELS
        .iter()
        .filter(|k| arch.is_none_or(|a| a == k.arch))
        .filter(|k| kernel == "all" || kernel == k.series)
        .copied()
        .collect();
    if chosen.is_empty() {
        let known: Vec<String> = KERNELS.iter().map(KernelSpec::label).collect();
        bail!(
            "no kernel {kernel} for {}: choose --kernel all or one of: {}",
            arch.map_or("any architecture", Arch::name),
            known.join(", ")
        );
    }
    Ok(chosen)
}

pub fn run(options: Options) -> Result<()> {
    let started = Instant::now();
    let kernels = select(options.arch, &options.kernel)?;
    let mut arches: Vec<Arch> = kernels.iter().map(|k| k.arch).collect();
    arches.dedup();
    let mut packages: Vec<String> = arches
        .iter()
        .map(|a| a.qemu_package().to_string())
        .collect();
    packages.push("dpkg".into());
    crate::setup::apt(&packages)?;

    let mut outcomes = Vec::new();
    for arch in arches {
        let build_start = Instant::now();
        let guest = build_guest(arch)?;
        step(
            "vm",
            &format!(
                "{} guest binaries ready in {:.0}s",
                arch.name(),
                build_start.elapsed().as_secs_f64()
            ),
        );
        for spec in kernels.iter().filter(|k| k.arch == arch) {
            let outcome = match prepare_and_boot(spec, &guest, &options) {
                Ok(o) => o,
                Err(e) => Outcome::error(spec, format!("{e:#}")),
            };
            outcomes.push(outcome);
        }
    }

    println!();
    step("vm", "summary");
    let mut failed = 0;
    for o in &outcomes {
        println!("    {}", o.summary_line());
        for problem in o.problems() {
            println!("        - {problem}");
        }
        if !o.passed() {
            failed += 1;
        }
    }
    println!(
        "    total {:.0}s; console logs in {}",
        started.elapsed().as_secs_f64(),
        cache_dir().join("logs").display()
    );
    let tests: Vec<&(String, String, f64)> = outcomes.iter().flat_map(|o| &o.tests).collect();
    let ok = tests.iter().filter(|t| t.1 == "ok").count();
    println!("vm-test: {ok} passed, {} failed", tests.len() - ok);
    if failed > 0 {
        bail!(
            "{failed} of {} kernel(s) failed: see the output above and the console logs",
            outcomes.len()
        );
    }
    Ok(())
}

/// Static binaries for one guest architecture.
struct Guest {
    init: PathBuf,
    agent: PathBuf,
    /// egressmon-gen, the tests' traffic generator.
    gen: PathBuf,
    tests: PathBuf,
}

fn build_guest(arch: Arch) -> Result<Guest> {
    let target = arch.rust_target();
    step(
        "vm",
        &format!(
            "building egressmon, egressmon-gen and the kernel tests for {target} (static, rust-lld)"
        ),
    );
    // Debug profile (quick to build) without debug info (small initramfs).
    let flags = "-C debuginfo=0 -C strip=debuginfo";
    let built = musl::cargo(
        target,
        &[
            "test",
            "--package",
            "monitor",
            "--features",
            crate::TEST_FEATURES,
            "--test",
            "kernel",
            "--no-run",
        ],
        flags,
    )?;
    let tests = musl::find(&built, "kernel", "test")?;
    let agent = musl::find(&built, "egressmon", "bin")?;
    // Built with the tests (cargo builds every binary of the package for
    // them): their traffic generator and sink.
    let gen = musl::find(&built, "egressmon-gen", "bin")?;
    step("vm", &format!("building the guest's /init for {target}"));
    let built = musl::cargo(
        target,
        &["build", "--package", "vm-init", "--release"],
        flags,
    )?;
    let init = musl::find(&built, "vm-init", "bin")?;
    Ok(Guest {
        init,
        agent,
        gen,
        tests,
    })
}

/// An unpacked kernel package.
struct KernelTree {
    package: String,
    root: PathBuf,
}

impl KernelTree {
    fn release(&self) -> Result<String> {
        let modules = self.root.join("lib/modules");
        let entry = std::fs::read_dir(&modules)
            .with_context(|| format!("reading {}", modules.display()))?
            .flatten()
            .next()
            .with_context(|| format!("{} is empty", modules.display()))?;
        Ok(entry.file_name().to_string_lossy().into_owned())
    }

    fn image(&self) -> Result<PathBuf> {
        Ok(self.root.join(format!("boot/vmlinuz-{}", self.release()?)))
    }

    fn config(&self) -> Result<String> {
        let path = self.root.join(format!("boot/config-{}", self.release()?));
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }
}

fn prepare_and_boot(spec: &KernelSpec, guest: &Guest, options: &Options) -> Result<Outcome> {
    let label = spec.label();
    step("vm", &format!("{label}: kernel package"));
    let tree = fetch_kernel(spec)?;
    let release = tree.release()?;
    step("vm", &format!("{label}: {} ({release})", tree.package));
    let config = tree.config()?;
    let missing: Vec<&str> = REQUIRED_CONFIG
        .iter()
        .filter(|c| config_value(&config, c).is_none())
        .copied()
        .collect();
    if !missing.is_empty() {
        bail!(
            "kernel {release} lacks {}: egressmon's tests cannot run on it",
            missing.join(", ")
        );
    }

    step("vm", &format!("{label}: initramfs"));
    let mut cpio = Cpio::new();
    cpio.char_dev("/dev/console", 0o600, 5, 1);
    for dir in ["proc", "sys", "run", "tmp", "etc", "lib/modules"] {
        cpio.dir(dir);
    }
    cpio.file("/init", 0o755, &read(&guest.init)?);
    cpio.file("/bin/egressmon", 0o755, &read(&guest.agent)?);
    cpio.file("/bin/egressmon-gen", 0o755, &read(&guest.gen)?);
    cpio.file("/bin/kernel-tests", 0o755, &read(&guest.tests)?);
    for (i, (symbol, module)) in MODULES.iter().enumerate() {
        match config_value(&config, symbol) {
            Some("y") => {} // built in
            Some("m") => {
                let path = find_module(&tree.root.join("lib/modules").join(&release), module)?;
                let name = path.file_name().unwrap().to_string_lossy();
                cpio.file(&format!("/lib/modules/{i:02}-{name}"), 0o644, &read(&path)?);
            }
            _ => bail!("kernel {release} has no {symbol}: the tests need it"),
        }
    }
    let image = cpio.finish();
    let initrd = cache_dir().join(format!(
        "initramfs-{}-{}.cpio",
        spec.arch.name(),
        spec.series
    ));
    std::fs::write(&initrd, &image).with_context(|| format!("writing {}", initrd.display()))?;
    step(
        "vm",
        &format!(
            "{label}: initramfs {:.1} MiB at {}",
            image.len() as f64 / (1 << 20) as f64,
            initrd.display()
        ),
    );
    boot(spec, &tree.image()?, &initrd, options)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// "y", "m" or None for `symbol` in a kernel config.
fn config_value<'a>(config: &'a str, symbol: &str) -> Option<&'a str> {
    config
        .lines()
        .find_map(|l| l.strip_prefix(symbol)?.strip_prefix('='))
}

fn find_module(dir: &Path, module: &str) -> Result<PathBuf> {
    for suffix in [".ko", ".ko.xz", ".ko.zst", ".ko.gz"] {
        let path = dir.join(format!("{module}{suffix}"));
        if path.exists() {
            return Ok(path);
        }
    }
    bail!("module {module} not found under {}", dir.display())
}

// ---- Debian kernel packages -------------------------------------------------

/// Whether `name` is the plain (not cloud, not rt) unsigned image package
/// of `series` for Debian architecture `deb`, e.g.
/// linux-image-6.1.0-57-arm64-unsigned or linux-image-6.12.117+deb12-arm64-unsigned.
pub fn is_kernel_package(name: &str, series: &str, deb: &str) -> bool {
    name.strip_prefix(&format!("linux-image-{series}."))
        .and_then(|rest| rest.strip_suffix(&format!("-{deb}-unsigned")))
        .is_some_and(|abi| {
            abi.starts_with(|c: char| c.is_ascii_digit())
                && abi
                    .chars()
                    .all(|c| c.is_ascii_digit() || "+-.deb".contains(c))
        })
}

/// Numbers in a package name, for ordering ABI levels.
pub fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// apt-get and apt-cache as a kernel's source needs them: the machine's own
/// configuration, or a private one for a suite the machine does not use.
struct Apt {
    options: Vec<String>,
    /// The private lists directory, refreshed daily; None for the machine's.
    lists: Option<PathBuf>,
}

impl Apt {
    fn for_spec(spec: &KernelSpec) -> Result<Apt> {
        let deb = spec.arch.deb();
        match spec.source {
            Source::System => {
                ensure_dpkg_arch(deb)?;
                Ok(Apt {
                    options: vec![],
                    lists: None,
                })
            }
            Source::Suite(suite) => private_apt(suite, deb),
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        for option in &self.options {
            cmd.args(["-o", option]);
        }
        cmd
    }

    fn output(&self, program: &str, args: &[&str]) -> Option<String> {
        let out = self.command(program).args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Updates a private configuration's lists when older than a day.
    fn refresh_if_stale(&self) {
        let Some(lists) = &self.lists else { return };
        // apt dates the list files by the mirror's clock: a marker of our own.
        if !younger_than_a_day(&lists.join(".updated")) {
            let _ = self.update();
        }
    }

    fn update(&self) -> Result<()> {
        step("vm", "apt-get update");
        let status = self
            .command("apt-get")
            .args(["update", "-q"])
            .status()
            .context("starting apt-get")?;
        if !status.success() {
            bail!("`apt-get update` failed ({status})");
        }
        if let Some(lists) = &self.lists {
            std::fs::write(lists.join(".updated"), b"")?;
        }
        Ok(())
    }

    /// The series' image packages with a download candidate, newest first.
    fn packages(&self, spec: &KernelSpec) -> Vec<String> {
        let deb = spec.arch.deb();
        let prefix = format!("linux-image-{}.", spec.series);
        let names = self
            .output("apt-cache", &["pkgnames", &prefix])
            .unwrap_or_default();
        let mut candidates: Vec<&str> = names
            .lines()
            .map(str::trim)
            .filter(|n| is_kernel_package(n, spec.series, deb))
            .collect();
        candidates.sort_by_key(|n| std::cmp::Reverse(version_key(n)));
        candidates
            .into_iter()
            .filter(|name| {
                let policy = self
                    .output("apt-cache", &["policy", &format!("{name}:{deb}")])
                    .unwrap_or_default();
                policy
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("Candidate:"))
                    .is_some_and(|c| c.trim() != "(none)")
            })
            .map(String::from)
            .collect()
    }

    fn download(&self, package: &str, deb: &str, dir: &Path) -> Result<()> {
        let status = self
            .command("apt-get")
            // The cache is root's alone: no sandbox user could write there.
            .args(["-o", "APT::Sandbox::User=root"])
            .args(["download", "-q", &format!("{package}:{deb}")])
            .current_dir(dir)
            .status()
            .context("starting apt-get")?;
        if !status.success() {
            bail!("apt-get download {package}:{deb} failed");
        }
        Ok(())
    }
}

fn ensure_dpkg_arch(deb: &str) -> Result<()> {
    let native = shell::output("dpkg", &["--print-architecture"]).unwrap_or_default();
    let foreign = shell::output("dpkg", &["--print-foreign-architectures"]).unwrap_or_default();
    if native.trim() == deb || foreign.lines().any(|l| l.trim() == deb) {
        return Ok(());
    }
    step(
        "vm",
        &format!("dpkg --add-architecture {deb} (to download {deb} kernel packages)"),
    );
    shell::require_root("adding a dpkg architecture")?;
    shell::run("dpkg", &["--add-architecture", deb])?;
    Apt {
        options: vec![],
        lists: None,
    }
    .update()
}

/// A private apt configuration for `suite` on architecture `deb`, under
/// target/vm-cache/apt-SUITE-DEB: a sources file naming the suite (and its
/// security suite) on the Debian mirrors the machine's own sources use, and
/// its own lists and cache, so nothing of the machine's apt state changes.
fn private_apt(suite: &str, deb: &str) -> Result<Apt> {
    let dir = cache_dir().join(format!("apt-{suite}-{deb}"));
    for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    let system = system_sources();
    let mirrors = debian_mirrors(&system).with_context(|| {
        format!(
            "no Debian mirror in /etc/apt/sources.list(.d): the {suite} kernels are fetched \
             from the mirror the machine's own Debian sources use"
        )
    })?;
    let sources = dir.join("debian.sources");
    std::fs::write(&sources, private_sources(&mirrors, suite, deb))
        .with_context(|| format!("writing {}", sources.display()))?;
    let path = |p: &Path| p.to_string_lossy().into_owned();
    Ok(Apt {
        options: vec![
            format!("Dir::Etc::SourceList={}", path(&sources)),
            format!(
                "Dir::Etc::SourceParts={}",
                path(&dir.join("sources.list.d"))
            ),
            format!("Dir::State::Lists={}", path(&dir.join("lists"))),
            format!("Dir::Cache={}", path(&dir.join("cache"))),
            format!("APT::Architecture={deb}"),
            format!("APT::Architectures={deb}"),
            "Acquire::Languages=none".into(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
        ],
        lists: Some(dir.join("lists")),
    })
}

/// The machine's apt sources: sources.list and every *.list and *.sources
/// file in sources.list.d, as (file name, text).
fn system_sources() -> Vec<(String, String)> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut parts: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        parts.sort();
        files.extend(parts);
    }
    files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources"))
        .filter_map(|p| {
            let text = std::fs::read_to_string(&p).ok()?;
            Some((p.to_string_lossy().into_owned(), text))
        })
        .collect()
}

/// The Debian archive and security mirrors of the machine's sources.
#[derive(Debug, PartialEq, Eq)]
pub struct Mirrors {
    pub archive: String,
    pub security: Option<String>,
}

/// Finds, in apt sources (one-line `.list` or deb822 `.sources`), the URI
/// serving a Debian release suite with `main` (e.g. bookworm) and the one
/// serving its `-security` suite.
pub fn debian_mirrors(files: &[(String, String)]) -> Option<Mirrors> {
    let mut entries: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    for (name, text) in files {
        if name.ends_with(".sources") {
            for stanza in text.split("\n\n") {
                let field = |key: &str| -> Vec<String> {
                    stanza
                        .lines()
                        .filter(|l| !l.trim_start().starts_with('#'))
                        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                        .map(|v| v.split_whitespace().map(String::from).collect())
                        .unwrap_or_default()
                };
                if !field("Types").iter().any(|t| t == "deb")
                    || field("Enabled").iter().any(|e| e == "no")
                {
                    continue;
                }
                for uri in field("URIs") {
                    entries.push((uri, field("Suites"), field("Components")));
                }
            }
        } else {
            for line in text.lines() {
                let mut words = line.split_whitespace().peekable();
                if words.next() != Some("deb") {
                    continue;
                }
                if words.peek().is_some_and(|w| w.starts_with('[')) {
                    for w in words.by_ref() {
                        if w.ends_with(']') {
                            break;
                        }
                    }
                }
                let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
                    continue;
                };
                entries.push((
                    uri.into(),
                    vec![suite.into()],
                    words.map(String::from).collect(),
                ));
            }
        }
    }
    let serves = |pred: &dyn Fn(&str) -> bool| {
        entries
            .iter()
            .find(|(_, suites, comps)| {
                suites.iter().any(|s| pred(s)) && comps.iter().any(|c| c == "main")
            })
            .map(|(uri, _, _)| uri.trim_end_matches('/').to_string())
    };
    Some(Mirrors {
        archive: serves(&|s| is_debian_codename(s))?,
        security: serves(&|s| s.strip_suffix("-security").is_some_and(is_debian_codename)),
    })
}

/// Debian release codenames (buster onward), the suites a kernel can come from.
fn is_debian_codename(suite: &str) -> bool {
    [
        "buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid",
    ]
    .contains(&suite)
}

/// The private sources file: `suite` and `suite-security` from the mirrors.
pub fn private_sources(mirrors: &Mirrors, suite: &str, deb: &str) -> String {
    let stanza = |uri: &str, suite: &str| {
        format!(
            "Types: deb\nURIs: {uri}\nSuites: {suite}\nComponents: main\nArchitectures: {deb}\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        )
    };
    let mut text = stanza(&mirrors.archive, suite);
    if let Some(security) = &mirrors.security {
        text.push('\n');
        text.push_str(&stanza(security, &format!("{suite}-security")));
    }
    text
}

/// The unpacked kernel package for `spec`: the newest the mirror serves
/// (a mirror may list a security update whose file it does not carry: then
/// the next older one), downloaded once; the newest cached one when apt has
/// no answer (offline).
fn fetch_kernel(spec: &KernelSpec) -> Result<KernelTree> {
    let label = spec.label();
    let mut problems = Vec::new();
    match Apt::for_spec(spec) {
        Ok(apt) => {
            apt.refresh_if_stale();
            let mut packages = apt.packages(spec);
            if packages.is_empty() && apt.update().is_ok() {
                packages = apt.packages(spec);
            }
            for package in packages {
                match unpacked(spec, &apt, &package) {
                    Ok(tree) => return Ok(tree),
                    Err(e) => {
                        step(
                            "vm",
                            &format!("{label}: {package}: {e:#}; trying older ones"),
                        );
                        problems.push(format!("{package}: {e:#}"));
                    }
                }
            }
        }
        Err(e) => problems.push(format!("{e:#}")),
    }
    let Some(tree) = newest_cached(spec) else {
        let hint = match spec.source {
            Source::System => {
                "check that /etc/apt/sources.list(.d) has Debian bookworm and \
                 bookworm-security (they carry 6.1 and 6.12), then run `apt-get update` as root"
            }
            Source::Suite(_) => {
                "the private apt configuration under target/vm-cache/apt-* uses the \
                 machine's own Debian mirror: check that it is reachable"
            }
        };
        bail!(
            "no linux-image-{}.*-{}-unsigned to be had ({}): {hint}",
            spec.series,
            spec.arch.deb(),
            if problems.is_empty() {
                "apt knows none".to_string()
            } else {
                problems.join("; ")
            }
        );
    };
    step(
        "vm",
        &format!(
            "{label}: apt has no answer, using the cached {}",
            tree.package
        ),
    );
    Ok(tree)
}

fn younger_than_a_day(marker: &Path) -> bool {
    std::fs::metadata(marker)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < Duration::from_secs(86_400))
}

fn newest_cached(spec: &KernelSpec) -> Option<KernelTree> {
    let trees = cache_dir().join("kernels");
    let mut cached: Vec<String> = std::fs::read_dir(&trees)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_kernel_package(n, spec.series, spec.arch.deb()))
        .filter(|n| trees.join(n).join(".unpacked").exists())
        .collect();
    cached.sort_by_key(|n| std::cmp::Reverse(version_key(n)));
    let package = cached.into_iter().next()?;
    Some(KernelTree {
        root: trees.join(&package),
        package,
    })
}

/// `package` unpacked under target/vm-cache/kernels, downloading it first
/// when no copy is cached.
fn unpacked(spec: &KernelSpec, apt: &Apt, package: &str) -> Result<KernelTree> {
    let deb = spec.arch.deb();
    let root = cache_dir().join("kernels").join(package);
    let tree = KernelTree {
        package: package.to_string(),
        root: root.clone(),
    };
    if root.join(".unpacked").exists() {
        step("vm", &format!("{}: {package} cached", spec.label()));
        return Ok(tree);
    }
    let debs = cache_dir().join("debs");
    std::fs::create_dir_all(&debs)?;
    let existing = || -> Option<PathBuf> {
        std::fs::read_dir(&debs)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with(&format!("{package}_")) && n.ends_with(&format!("_{deb}.deb"))
                })
            })
    };
    let deb_file = match existing() {
        Some(f) => f,
        None => {
            // A file the mirror lacked is not asked for again for a day.
            let missing = debs.join(format!("{package}.unavailable"));
            if younger_than_a_day(&missing) {
                bail!("the mirror did not have it (within the last day)");
            }
            step(
                "vm",
                &format!("{}: downloading {package}:{deb} with apt", spec.label()),
            );
            if let Err(e) = apt.download(package, deb, &debs) {
                let _ = std::fs::write(&missing, b"");
                return Err(e);
            }
            existing().with_context(|| {
                format!("apt-get download left no {package} in {}", debs.display())
            })?
        }
    };
    step(
        "vm",
        &format!("{}: unpacking {}", spec.label(), deb_file.display()),
    );
    let partial = root.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb_file)
        .arg(&partial)
        .status()
        .context("starting dpkg-deb")?;
    if !status.success() {
        bail!(
            "dpkg-deb -x {} failed: delete it and retry",
            deb_file.display()
        );
    }
    std::fs::File::create(partial.join(".unpacked"))?;
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&partial, &root)?;
    Ok(tree)
}

// ---- Booting and reading the console ----------------------------------------

/// What one guest run showed.
#[derive(Debug, Default)]
pub struct Outcome {
    pub label: String,
    pub release: Option<String>,
    pub expected: Option<usize>,
    pub tests: Vec<(String, String, f64)>,
    pub hooks: Vec<(String, String)>,
    pub modules_failed: Vec<String>,
    pub setup_failed: Option<String>,
    pub panic: Option<String>,
    pub done: bool,
    pub timed_out: bool,
    pub error: Option<String>,
    pub boot_secs: Option<f64>,
    pub total_secs: f64,
}

impl Outcome {
    fn error(spec: &KernelSpec, error: String) -> Outcome {
        Outcome {
            label: spec.label(),
            error: Some(error),
            ..Default::default()
        }
    }

    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(e) = &self.error {
            p.push(e.clone());
        }
        if let Some(e) = &self.setup_failed {
            p.push(format!("guest set-up failed: {e}"));
        }
        for m in &self.modules_failed {
            p.push(format!("module {m}"));
        }
        if let Some(line) = &self.panic {
            p.push(format!("kernel panic: {line}"));
        }
        if self.timed_out {
            p.push("timed out: QEMU killed".into());
        }
        for (hook, state) in &self.hooks {
            if state != "attached" {
                p.push(format!("hook {hook} not supported on this kernel: {state}"));
            }
        }
        for (name, verdict, _) in &self.tests {
            if verdict != "ok" {
                p.push(format!("test {name} {verdict}"));
            }
        }
        if let Some(n) = self.expected {
            if self.tests.len() < n {
                p.push(format!("only {} of {n} tests reported", self.tests.len()));
            }
        }
        if self.error.is_none() && !self.done && !self.timed_out && self.panic.is_none() {
            p.push("the guest stopped before reporting all results".into());
        }
        p
    }

    pub fn passed(&self) -> bool {
        self.done && !self.tests.is_empty() && self.problems().is_empty()
    }

    fn summary_line(&self) -> String {
        let ok = self.tests.iter().filter(|t| t.1 == "ok").count();
        format!(
            "{:<12} {:<6} {:<28} tests {ok}/{}  hooks {}/{}  boot {}  total {:.0}s",
            self.label,
            if self.passed() { "PASS" } else { "FAIL" },
            self.release.as_deref().unwrap_or("-"),
            self.expected.unwrap_or(self.tests.len()),
            self.hooks.iter().filter(|h| h.1 == "attached").count(),
            self.hooks.len(),
            self.boot_secs.map_or("-".into(), |s| format!("{s:.1}s")),
            self.total_secs
        )
    }

    /// Updates the outcome from one console line; returns a progress
    /// message worth printing, if any.
    pub fn observe(&mut self, line: &str) -> Option<String> {
        if line.contains("Kernel panic - not syncing") && self.panic.is_none() {
            self.panic = Some(line.trim().to_string());
            return Some(format!("KERNEL PANIC: {}", line.trim()));
        }
        let marker = &line[line.find("EGRESSMON-")?..];
        let (word, rest) = marker.split_once(' ').unwrap_or((marker, ""));
        let rest = rest.trim();
        match word {
            "EGRESSMON-BOOT" => {
                self.release = Some(rest.to_string());
                Some(format!("booted {rest}"))
            }
            "EGRESSMON-MODULE" => {
                if !rest.ends_with(" loaded") {
                    self.modules_failed.push(rest.to_string());
                }
                Some(format!("module {rest}"))
            }
            "EGRESSMON-SETUP-FAILED" => {
                self.setup_failed = Some(rest.to_string());
                Some(format!("guest set-up failed: {rest}"))
            }
            "EGRESSMON-TESTS" => {
                self.expected = rest.parse().ok();
                Some(format!("running {rest} tests"))
            }
            "EGRESSMON-TEST-START" => Some(format!("test {rest} ...")),
            "EGRESSMON-TEST" => {
                let mut parts = rest.split_whitespace();
                let name = parts.next()?.to_string();
                let verdict = parts.next()?.to_string();
                let secs: f64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
                let msg = format!("test {name} {verdict} ({secs:.1}s)");
                self.tests.push((name, verdict, secs));
                Some(msg)
            }
            "EGRESSMON-HOOK" => {
                let (hook, state) = rest.split_once(' ')?;
                self.hooks.push((hook.to_string(), state.to_string()));
                None
            }
            "EGRESSMON-DONE" => {
                self.done = true;
                Some(format!("done: {rest}"))
            }
            _ => None,
        }
    }
}

fn boot(spec: &KernelSpec, image: &Path, initrd: &Path, options: &Options) -> Result<Outcome> {
    let label = spec.label();
    let logs = cache_dir().join("logs");
    std::fs::create_dir_all(&logs)?;
    let log_path = logs.join(format!("{}-{}.log", spec.arch.name(), spec.series));
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut append = format!(
        "console={} panic=-1 loglevel=4 oops=panic",
        spec.arch.console()
    );
    if let Some(f) = &options.filter {
        append.push_str(&format!(" egm.filter={f}"));
    }
    let mut cmd = Command::new(spec.arch.qemu());
    cmd.args(spec.arch.machine())
        .args(["-smp", "2", "-m", "1024", "-nographic", "-no-reboot"])
        .args(["-nic", "none"])
        .arg("-kernel")
        .arg(image)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    step(
        "vm",
        &format!(
            "{label}: booting {} (timeout {} min, console log {})",
            spec.arch.qemu(),
            options.timeout.as_secs() / 60,
            log_path.display()
        ),
    );
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "starting {}: install {} (`cargo xtask vm-test` does it with apt as root)",
            spec.arch.qemu(),
            spec.arch.qemu_package()
        )
    })?;
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(stream);
            let mut buf = Vec::new();
            while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                let line = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                if tx.send(line).is_err() {
                    break;
                }
                buf.clear();
            }
        });
    }
    drop(tx);

    let mut outcome = Outcome {
        label: label.clone(),
        ..Default::default()
    };
    // Console lines of the running test (or of the boot), shown on failure.
    let mut pending: Vec<String> = Vec::new();
    let deadline = started + options.timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let _ = writeln!(log, "{line}");
                let before = outcome.tests.len();
                let was_booted = outcome.release.is_some();
                let progress = outcome.observe(&line);
                if !was_booted && outcome.release.is_some() {
                    outcome.boot_secs = Some(started.elapsed().as_secs_f64());
                    pending.clear();
                }
                if let Some(msg) = &progress {
                    step(&format!("vm {label}"), msg);
                }
                if outcome.tests.len() > before {
                    let (_, verdict, _) = outcome.tests.last().unwrap();
                    if verdict != "ok" {
                        show(&pending);
                    }
                    pending.clear();
                } else if line.contains("EGRESSMON-TEST-START") {
                    pending.clear();
                } else if progress.is_none() && !line.trim().is_empty() {
                    pending.push(line);
                    if pending.len() > 4000 {
                        pending.drain(..1000);
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                outcome.timed_out = true;
                step(
                    &format!("vm {label}"),
                    &format!(
                        "no result after {} min: killing QEMU (pid {})",
                        options.timeout.as_secs() / 60,
                        child.id()
                    ),
                );
                let _ = child.kill();
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.wait();
    outcome.total_secs = started.elapsed().as_secs_f64();
    if !outcome.done {
        // The guest died or hung mid-way: show how it ended.
        let tail = pending.len().saturating_sub(60);
        show(&pending[tail..]);
    }
    step(
        &format!("vm {label}"),
        &format!(
            "{} after {:.0}s",
            if outcome.passed() { "passed" } else { "FAILED" },
            outcome.total_secs
        ),
    );
    Ok(outcome)
}

fn show(lines: &[String]) {
    if lines.is_empty() {
        return;
    }
    println!("    ---- guest console ----");
    for l in lines {
        println!("    | {l}");
    }
    println!("    -----------------------");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_package_names() {
        assert!(is_kernel_package(
            "linux-image-6.1.0-57-arm64-unsigned",
            "6.1",
            "arm64"
        ));
        assert!(is_kernel_package(
            "linux-image-6.12.117+deb12-arm64-unsigned",
            "6.12",
            "arm64"
        ));
        assert!(is_kernel_package(
            "linux-image-6.12.117+deb12-amd64-unsigned",
            "6.12",
            "amd64"
        ));
        for other in [
            "linux-image-6.1.0-57-cloud-arm64-unsigned",
            "linux-image-6.1.0-57-rt-arm64-unsigned",
            "linux-image-6.1.0-57-arm64",
            "linux-image-6.12.117+deb12-arm64-unsigned",
            "linux-image-6.1.0-57-amd64-unsigned",
        ] {
            assert!(!is_kernel_package(other, "6.1", "arm64"), "{other}");
        }
        assert!(is_kernel_package(
            "linux-image-5.10.0-46-arm64-unsigned",
            "5.10",
            "arm64"
        ));
        assert!(!is_kernel_package(
            "linux-image-5.10.0-46-rt-arm64-unsigned",
            "5.10",
            "arm64"
        ));
        assert!(
            version_key("linux-image-6.1.0-57-arm64-unsigned")
                > version_key("linux-image-6.1.0-9-arm64-unsigned")
        );
    }

    #[test]
    fn private_sources_reuse_the_machines_debian_mirror() {
        let deb822 = "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\n\
                      Suites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://mirror.example/debian-security\n\
                      Suites: bookworm-security\nComponents: main\n";
        let other = "deb [arch=amd64] https://vendor.example/apt stable main\n";
        let files = vec![
            ("/etc/apt/sources.list.d/vendor.list".into(), other.into()),
            (
                "/etc/apt/sources.list.d/debian.sources".into(),
                deb822.into(),
            ),
        ];
        let mirrors = debian_mirrors(&files).unwrap();
        assert_eq!(
            mirrors,
            Mirrors {
                archive: "http://mirror.example/debian".into(),
                security: Some("http://mirror.example/debian-security".into()),
            }
        );
        let text = private_sources(&mirrors, "bullseye", "arm64");
        assert!(text.contains("URIs: http://mirror.example/debian\nSuites: bullseye\n"));
        assert!(text.contains("Suites: bullseye-security\n"));
        assert!(text.contains("Architectures: arm64\n"));

        let one_line = "# deb http://old.example/debian buster main\n\
                        deb http://mirror.example/debian bookworm main contrib\n";
        let files = vec![("/etc/apt/sources.list".into(), one_line.into())];
        let mirrors = debian_mirrors(&files).unwrap();
        assert_eq!(mirrors.archive, "http://mirror.example/debian");
        assert_eq!(mirrors.security, None);
        assert!(debian_mirrors(&[("/etc/apt/sources.list".into(), other.into())]).is_none());
    }

    #[test]
    fn selection() {
        assert_eq!(select(None, "all").unwrap().len(), 4);
        assert_eq!(select(Some(Arch::Arm64), "all").unwrap().len(), 3);
        let old = select(Some(Arch::Arm64), "5.10").unwrap();
        assert_eq!(old[0].source, Source::Suite("bullseye"));
        assert!(select(Some(Arch::X86_64), "5.10").is_err());
        let one = select(Some(Arch::X86_64), "6.12").unwrap();
        assert_eq!((one[0].arch, one[0].series), (Arch::X86_64, "6.12"));
        assert!(select(Some(Arch::X86_64), "6.1").is_err());
    }

    #[test]
    fn markers_decide_the_verdict() {
        let mut o = Outcome::default();
        for line in [
            "[    0.000000] Booting Linux",
            "EGRESSMON-BOOT 6.1.0-57-arm64",
            "EGRESSMON-MODULE 00-veth.ko loaded",
            "EGRESSMON-TESTS 2",
            "EGRESSMON-TEST-START a",
            "EGRESSMON-HOOK connect4 attached",
            "EGRESSMON-TEST a ok 1.5",
            "garbage from the kernelEGRESSMON-TEST b ok 2.0",
        ] {
            o.observe(line);
        }
        assert!(!o.passed(), "no DONE marker yet");
        o.observe("EGRESSMON-DONE passed=2 failed=0");
        assert!(o.passed(), "{:?}", o.problems());

        let mut hook = Outcome::default();
        for line in [
            "EGRESSMON-TESTS 1",
            "EGRESSMON-HOOK sendmsg6 unsupported: failed: the kernel rejected it",
            "EGRESSMON-TEST every_hook FAILED 3.0",
            "EGRESSMON-DONE passed=0 failed=1",
        ] {
            hook.observe(line);
        }
        assert!(!hook.passed());
        assert!(hook.problems().iter().any(|p| p.contains("sendmsg6")));

        let mut panic = Outcome::default();
        panic.observe("EGRESSMON-TESTS 1");
        panic.observe("[ 3.1] Kernel panic - not syncing: Attempted to kill init!");
        assert!(!panic.passed() && panic.panic.is_some());

        let mut missing = Outcome::default();
        for line in [
            "EGRESSMON-TESTS 2",
            "EGRESSMON-TEST a ok 1.0",
            "EGRESSMON-DONE passed=1 failed=0",
        ] {
            missing.observe(line);
        }
        assert!(!missing.passed(), "a test without a result fails the run");
    }
}
