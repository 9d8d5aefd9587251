//! `cargo xtask dist`: the one file a rooted phone (or any Linux box) runs —
//! a static, stripped `egressmon` for a musl target with the eBPF object
//! embedded — and, with `--magisk`, a Magisk module zip that starts the agent
//! at boot and removes everything when uninstalled.

use crate::musl;
use crate::shell::{self, step};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::PathBuf;
use zip::write::SimpleFileOptions;
use zip::CompressionMethod;

/// Size the binary should stay under (a phone's /data/local/tmp is roomy,
/// but an adb push and a Magisk zip should stay small).
const SIZE_GOAL: u64 = 8 << 20;
pub const PIN_DIR: &str = "/sys/fs/bpf/egressmon";
pub const DATA_DIR: &str = "/data/adb/egressmon";

fn dist_dir() -> PathBuf {
    shell::workspace_root().join("target/dist")
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Builds the static binary for `target`; returns its path under target/dist.
pub fn binary(target: &str) -> Result<PathBuf> {
    if ![musl::AARCH64, musl::X86_64].contains(&target) {
        bail!(
            "unsupported --target {target}: choose {} (phones) or {}",
            musl::AARCH64,
            musl::X86_64
        );
    }
    crate::setup::all()?;
    step(
        "dist",
        &format!("egressmon for {target}: release, static, stripped"),
    );
    let built = musl::cargo(
        target,
        &[
            "build",
            "--release",
            "--package",
            "monitor",
            "--bin",
            "egressmon",
        ],
        "-C strip=symbols",
    )?;
    let path = musl::find(&built, "egressmon", "bin")?;
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    if !musl::is_static_elf(&bytes) {
        bail!(
            "{} is not statically linked: check CARGO_TARGET_*_RUSTFLAGS / RUSTFLAGS overrides",
            path.display()
        );
    }
    std::fs::create_dir_all(dist_dir())?;
    let out = dist_dir().join(format!("egressmon-{target}"));
    std::fs::write(&out, &bytes)?;
    set_executable(&out)?;
    let size = bytes.len() as u64;
    step(
        "dist",
        &format!(
            "{}: {} ({size} bytes, static, eBPF object embedded){}",
            out.display(),
            mib(size),
            if size > SIZE_GOAL {
                format!(" — over the {} goal", mib(SIZE_GOAL))
            } else {
                String::new()
            }
        ),
    );
    Ok(out)
}

fn set_executable(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

pub fn run(target: Option<String>, magisk: bool) -> Result<()> {
    let target = target.unwrap_or_else(|| musl::AARCH64.to_string());
    let bin = binary(&target)?;
    if !magisk {
        println!(
            "push it with `adb push {} /data/local/tmp/egressmon`, then in `adb shell`: \
             `su -c /data/local/tmp/egressmon run`",
            bin.display()
        );
        return Ok(());
    }
    let abi = if target == musl::AARCH64 {
        "arm64"
    } else {
        "x64"
    };
    let version = env!("CARGO_PKG_VERSION");
    let zip = magisk_zip(&std::fs::read(&bin)?, version, abi)?;
    let out = dist_dir().join(format!("egressmon-magisk-{version}-{abi}.zip"));
    std::fs::write(&out, &zip)?;
    step(
        "dist",
        &format!(
            "Magisk module: {} ({})",
            out.display(),
            mib(zip.len() as u64)
        ),
    );
    println!(
        "install it with `adb push {} /sdcard/` and Magisk > Modules > Install from storage \
         (or `adb shell su -c magisk --install-module /sdcard/{}`), then reboot",
        out.display(),
        out.file_name().unwrap().to_string_lossy()
    );
    Ok(())
}

/// `versionCode` from "MAJOR.MINOR.PATCH": MAJOR*10000 + MINOR*100 + PATCH.
pub fn version_code(version: &str) -> u32 {
    version
        .split('.')
        .take(3)
        .map(|p| p.parse::<u32>().unwrap_or(0))
        .fold(0, |acc, p| acc * 100 + p)
}

/// Magisk's module installer entry: hands over to Magisk's own installer.
const UPDATE_BINARY: &str = r#"#!/sbin/sh
# Magisk module installer entry point: Magisk's util_functions.sh does the work.
umask 022
OUTFD=$2
ZIPFILE=$3
ui_print() { echo "$1"; }
mount /data 2>/dev/null
if [ ! -f /data/adb/magisk/util_functions.sh ]; then
  ui_print "egressmon: install this zip from the Magisk app (Magisk v20.4 or newer)"
  exit 1
fi
. /data/adb/magisk/util_functions.sh
if [ "$MAGISK_VER_CODE" -lt 20400 ]; then
  ui_print "egressmon: Magisk v20.4 or newer is needed"
  exit 1
fi
install_module
exit 0
"#;

fn module_prop(version: &str) -> String {
    format!(
        "id=egressmon\n\
         name=egressmon\n\
         version=v{version}\n\
         versionCode={}\n\
         author=egressmon developers\n\
         description=Counts outbound connections, datagrams and bytes per UID and destination \
         with eBPF, and names the sender (app, preinstalled package or platform daemon). \
         Agent on 127.0.0.1:9864, log in {DATA_DIR}.\n",
        version_code(version)
    )
}

fn customize_sh(abi: &str) -> String {
    format!(
        r#"# Run by Magisk while installing: check the device, set permissions.
if [ "$ARCH" != "{abi}" ]; then
  abort "egressmon: this module is built for {abi}, this device is $ARCH"
fi
set_perm "$MODPATH/system/bin/egressmon" 0 0 0755
set_perm "$MODPATH/service.sh" 0 0 0755
set_perm "$MODPATH/uninstall.sh" 0 0 0755
ui_print "- egressmon: the agent starts at every boot (log in {DATA_DIR})"
ui_print "- egressmon: su -c egressmon top   shows the live table"
"#
    )
}

fn service_sh() -> String {
    format!(
        r#"#!/system/bin/sh
# Run by Magisk at every boot (late_start service): starts the egressmon agent.
# Its log goes to {DATA_DIR}/egressmon.log; its pins live under {PIN_DIR}
# (bpffs), so counting goes on if the agent stops, until `egressmon detach`.
MODDIR=${{0%/*}}
DATA={DATA_DIR}
mkdir -p "$DATA"
# netd attaches its programs early in boot: start after it, so egressmon sees
# (and never replaces) them.
until [ "$(getprop sys.boot_completed)" = "1" ]; do sleep 2; done
[ -f "$DATA/egressmon.log" ] && mv -f "$DATA/egressmon.log" "$DATA/egressmon.log.1"
"$MODDIR/system/bin/egressmon" run --pin-dir {PIN_DIR} >"$DATA/egressmon.log" 2>&1 &
echo $! >"$DATA/egressmon.pid"
"#
    )
}

fn uninstall_sh() -> String {
    format!(
        r#"#!/system/bin/sh
# Run by Magisk when the module is removed: detach every program, link and
# pin egressmon made, then remove its data.
MODDIR=${{0%/*}}
"$MODDIR/system/bin/egressmon" detach --pin-dir {PIN_DIR} >/dev/null 2>&1
rm -rf {DATA_DIR}
"#
    )
}

/// The Magisk module zip: META-INF installer, module.prop, customize.sh,
/// service.sh, uninstall.sh and system/bin/egressmon.
pub fn magisk_zip(binary: &[u8], version: &str, abi: &str) -> Result<Vec<u8>> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let text = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .unix_permissions(0o644);
    let script = text.unix_permissions(0o755);
    let entries: [(&str, SimpleFileOptions, Vec<u8>); 7] = [
        (
            "META-INF/com/google/android/update-binary",
            script,
            UPDATE_BINARY.into(),
        ),
        (
            "META-INF/com/google/android/updater-script",
            text,
            b"#MAGISK\n".to_vec(),
        ),
        ("module.prop", text, module_prop(version).into_bytes()),
        ("customize.sh", text, customize_sh(abi).into_bytes()),
        ("service.sh", script, service_sh().into_bytes()),
        ("uninstall.sh", script, uninstall_sh().into_bytes()),
        ("system/bin/egressmon", script, binary.to_vec()),
    ];
    for (name, options, data) in entries {
        zip.start_file(name, options)
            .with_context(|| format!("adding {name} to the zip"))?;
        zip.write_all(&data)?;
    }
    Ok(zip.finish()?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn magisk_zip_has_the_module_layout() {
        let fake_binary = b"\x7fELF fake egressmon".to_vec();
        let bytes = magisk_zip(&fake_binary, "0.1.0", "arm64").unwrap();
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        let mut files = std::collections::BTreeMap::new();
        for i in 0..archive.len() {
            let mut entry = archive.by_index(i).unwrap();
            let name = entry.name().unwrap().to_string();
            let mode = entry.unix_mode().unwrap_or(0) & 0o777;
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            files.insert(name, (mode, data));
        }
        let names: Vec<&str> = files.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "META-INF/com/google/android/update-binary",
                "META-INF/com/google/android/updater-script",
                "customize.sh",
                "module.prop",
                "service.sh",
                "system/bin/egressmon",
                "uninstall.sh",
            ]
        );
        let text = |n: &str| String::from_utf8(files[n].1.clone()).unwrap();
        assert_eq!(files["system/bin/egressmon"], (0o755, fake_binary));
        assert_eq!(files["service.sh"].0, 0o755);
        assert_eq!(files["uninstall.sh"].0, 0o755);
        assert_eq!(
            text("META-INF/com/google/android/updater-script"),
            "#MAGISK\n"
        );
        assert!(text("META-INF/com/google/android/update-binary").contains("install_module"));
        let prop = text("module.prop");
        for line in ["id=egressmon", "version=v0.1.0", "versionCode=100"] {
            assert!(prop.lines().any(|l| l == line), "{line} in {prop}");
        }
        let service = text("service.sh");
        assert!(service.starts_with("#!/system/bin/sh"));
        assert!(service.contains("egressmon\" run --pin-dir /sys/fs/bpf/egressmon"));
        assert!(
            service.contains("/data/adb/egressmon/egressmon.log")
                || service.contains("$DATA/egressmon.log")
        );
        assert!(service.contains("MODDIR=${0%/*}"));
        let uninstall = text("uninstall.sh");
        assert!(uninstall.contains("egressmon\" detach --pin-dir /sys/fs/bpf/egressmon"));
        assert!(uninstall.contains("rm -rf /data/adb/egressmon"));
        assert!(text("customize.sh").contains("\"$ARCH\" != \"arm64\""));
    }

    #[test]
    fn version_codes() {
        assert_eq!(version_code("0.1.0"), 100);
        assert_eq!(version_code("1.2.3"), 10203);
    }
}
