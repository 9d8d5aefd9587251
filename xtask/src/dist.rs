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
        &format!("egressmon for {target}: profile release-small (whole-program LTO, libraries for size), static, stripped"),
    );
    let built = musl::cargo(
        target,
        &[
            "build",
            "--profile",
            "release-small",
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
         su -c egressmon top; /metrics on 127.0.0.1:9864; log in {DATA_DIR}.\n",
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
ui_print "- egressmon: the agent starts at every boot and again if it dies (log in {DATA_DIR})"
ui_print "- egressmon: su -c egressmon top   shows the live table"
"#
    )
}

/// Marker a deliberate stop leaves in the data directory: the supervisor in
/// service.sh does not restart the agent while it is there (until the next
/// boot).
pub const STOPPED_MARKER: &str = "stopped";

/// Starts the agent at boot, as soon as netd has attached its programs
/// (`egressmon wait-netd`; at its timeout or on an error, once boot has
/// completed instead), and again whenever it dies, waiting 1 s, then
/// twice as long after each quick failure up to 5 min (back to 1 s once a
/// run lasted 10 min). It stops restarting when Magisk disables or removes
/// the module, when the agent exits 0 (asked to stop: `egressmon detach`)
/// or while `DATA/stopped` exists. The EGRESSMON_* variables are for tests.
fn service_sh() -> String {
    format!(
        r#"#!/system/bin/sh
# Run by Magisk at every boot (late_start service): starts the egressmon agent
# as soon as netd has attached its programs, and restarts it when it dies. The agent's output and each restart (with the
# time and exit code) go to {DATA_DIR}/egressmon.log. Its pins live under
# {PIN_DIR} (bpffs), so counting goes on while it is down, until
# `egressmon detach`.
MODDIR=${{0%/*}}
DATA=${{EGRESSMON_DATA:-{DATA_DIR}}}
LOG="$DATA/egressmon.log"
# Seconds: the first wait before a restart, doubled after each quick exit up
# to BACKOFF_MAX; a run of HEALTHY_AFTER or more starts over from the first.
BACKOFF_FIRST=${{EGRESSMON_BACKOFF_FIRST:-1}}
BACKOFF_MAX=${{EGRESSMON_BACKOFF_MAX:-300}}
HEALTHY_AFTER=${{EGRESSMON_HEALTHY_AFTER:-600}}
LOG_MAX_BYTES=1048576
# Seconds to wait for netd's programs before waiting for boot to complete.
NETD_TIMEOUT=120

note() {{ echo "$(date '+%Y-%m-%d %H:%M:%S') service.sh: $*" >>"$LOG"; }}

# Why the agent must not be started (again), if it must not.
stop_reason() {{
  if [ -e "$MODDIR/disable" ]; then
    echo "the module is disabled in Magisk"
  elif [ -e "$MODDIR/remove" ]; then
    echo "the module is being removed"
  elif [ -e "$DATA/{STOPPED_MARKER}" ]; then
    echo "egressmon was stopped on purpose ($DATA/{STOPPED_MARKER})"
  fi
}}

# Keeps a crash loop's output from filling /data.
rotate_log() {{
  if [ -f "$LOG" ] && [ $(($(wc -c <"$LOG"))) -gt $LOG_MAX_BYTES ]; then
    mv -f "$LOG" "$LOG.1"
  fi
}}

supervise() {{
  delay=$BACKOFF_FIRST
  while :; do
    reason=$(stop_reason)
    if [ -n "$reason" ]; then
      note "not starting the agent: $reason"
      return
    fi
    rotate_log
    started=$(date +%s)
    "$MODDIR/system/bin/egressmon" run --pin-dir {PIN_DIR} >>"$LOG" 2>&1 &
    echo $! >"$DATA/egressmon.pid"
    wait $!
    code=$?
    ran=$(($(date +%s) - started))
    exited="the agent exited with code $code"
    if [ "$code" -gt 128 ]; then
      exited="$exited (signal $((code - 128)))"
    fi
    exited="$exited after ${{ran}}s"
    if [ "$code" -eq 0 ]; then
      note "$exited (asked to stop, e.g. by egressmon detach); not restarting"
      return
    fi
    reason=$(stop_reason)
    if [ -n "$reason" ]; then
      note "$exited; not restarting: $reason"
      return
    fi
    if [ "$ran" -ge "$HEALTHY_AFTER" ]; then
      delay=$BACKOFF_FIRST
    fi
    note "$exited; restarting in ${{delay}}s"
    sleep "$delay"
    delay=$((delay * 2))
    if [ "$delay" -gt "$BACKOFF_MAX" ]; then
      delay=$BACKOFF_MAX
    fi
  done
}}

mkdir -p "$DATA" && chmod 700 "$DATA"
# This boot's log starts here; the previous boot's is kept as $LOG.1.
[ -f "$LOG" ] && mv -f "$LOG" "$LOG.1"
# netd attaches its cgroup programs to the root cgroup exclusively, early in
# boot; while a program of ours sits on one of those hooks netd's attach fails
# and networking breaks. So the agent starts as soon as netd's programs are
# there (wait-netd polls the root cgroup for them), never before, which
# catches traffic from well before boot completes. If they do not appear in
# time (or wait-netd fails), it starts once boot has completed: netd has long
# attached by then, and the agent skips whatever hook it holds.
# Magisk runs this script (late_start service) about when netd starts. The
# earlier post-fs-data stage would not help: it blocks boot while its scripts
# run, and netd starts only after it, so nothing may wait for netd there.
"$MODDIR/system/bin/egressmon" wait-netd --timeout "$NETD_TIMEOUT" >>"$LOG" 2>&1
code=$?
if [ "$code" -ne 0 ]; then
  if [ "$code" -eq 1 ]; then
    note "netd's programs did not appear within ${{NETD_TIMEOUT}}s; starting the agent once boot has completed"
  else
    note "egressmon wait-netd failed (exit code $code); starting the agent once boot has completed"
  fi
  until [ "$(getprop sys.boot_completed)" = "1" ]; do sleep 2; done
fi
# A stop on purpose lasts until the next boot; disable the module for longer.
rm -f "$DATA/{STOPPED_MARKER}"
# In the background: Magisk's boot scripts should not wait on it.
supervise </dev/null >/dev/null 2>&1 &
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
        assert!(service.contains("NETD_TIMEOUT=120\n"));
        assert!(service.contains("egressmon\" wait-netd --timeout \"$NETD_TIMEOUT\""));
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

    /// service.sh in a module directory of its own, with fakes for the
    /// agent (each run does what line N of `plan` says; `wait-netd` records
    /// its arguments in `waited` and exits as $FAKE_WAIT_NETD says: netd's
    /// programs found, `timeout` or `error`), `getprop` (records each
    /// question in `getprop`; boot completes at the second) and `sleep`
    /// (which records how long it was asked to wait).
    struct Module {
        dir: PathBuf,
    }

    impl Module {
        fn new(name: &str, plan: &[&str]) -> Module {
            let dir =
                std::env::temp_dir().join(format!("egm-magisk-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            for sub in ["system/bin", "fakes", "data"] {
                std::fs::create_dir_all(dir.join(sub)).unwrap();
            }
            let script = |path: &str, text: &str| {
                std::fs::write(dir.join(path), text).unwrap();
                set_executable(&dir.join(path)).unwrap();
            };
            script("service.sh", &service_sh());
            std::fs::write(dir.join("plan"), plan.join("\n") + "\n").unwrap();
            script(
                "system/bin/egressmon",
                "#!/bin/sh\n\
                 MODDIR=${0%/system/bin/*}\n\
                 if [ \"$1\" = wait-netd ]; then\n\
                   echo \"$*\" >>\"$MODDIR/waited\"\n\
                   case \"$FAKE_WAIT_NETD\" in\n\
                   timeout) echo \"egressmon: fake netd absent\" >&2; exit 1 ;;\n\
                   error) echo \"egressmon: fake error\" >&2; exit 2 ;;\n\
                   esac\n\
                   echo \"fake netd programs attached\"\n\
                   exit 0\n\
                 fi\n\
                 n=$(($(cat \"$MODDIR/runs\" 2>/dev/null || echo 0) + 1))\n\
                 echo $n >\"$MODDIR/runs\"\n\
                 echo \"fake agent run $n: $*\"\n\
                 eval \"$(sed -n \"${n}p\" \"$MODDIR/plan\")\"\n\
                 exit 1\n",
            );
            script(
                "fakes/getprop",
                "#!/bin/sh\n\
                 asked=\"${0%/fakes/getprop}/getprop\"\n\
                 echo \"$*\" >>\"$asked\"\n\
                 if [ $(($(wc -l <\"$asked\"))) -ge 2 ]; then echo 1; else echo 0; fi\n",
            );
            script(
                "fakes/sleep",
                "#!/bin/sh\necho \"$1\" >>\"${0%/fakes/sleep}/slept\"\n",
            );
            Module { dir }
        }

        /// Runs service.sh as Magisk would (it returns at once, leaving its
        /// supervisor in the background) and waits for the supervisor to stop.
        fn boot(&self, env: &[(&str, &str)]) -> Vec<String> {
            let path = format!(
                "{}:{}",
                self.dir.join("fakes").display(),
                std::env::var("PATH").unwrap_or_default()
            );
            let status = std::process::Command::new("/bin/sh")
                .arg(self.dir.join("service.sh"))
                .env("PATH", path)
                .env("EGRESSMON_DATA", self.dir.join("data"))
                .envs(env.iter().copied())
                .status()
                .unwrap();
            assert!(status.success());
            let log = self.dir.join("data/egressmon.log");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("not restarting") || text.contains("not starting") {
                    return text.lines().map(str::to_string).collect();
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the supervisor did not stop:\n{text}"
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }

        fn read(&self, name: &str) -> String {
            std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
        }
    }

    impl Drop for Module {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// The supervisor's own lines, without their "YYYY-MM-DD HH:MM:SS " stamp
    /// (checked here).
    fn supervisor_lines(log: &[String]) -> Vec<String> {
        log.iter()
            .filter(|l| l.contains(" service.sh: "))
            .map(|l| {
                let (stamp, rest) = l.split_at(19);
                let digits: String = stamp.chars().filter(char::is_ascii_digit).collect();
                assert_eq!(digits.len(), 14, "timestamp in {l:?}");
                rest.trim_start().to_string()
            })
            .collect()
    }

    #[test]
    fn service_restarts_a_dead_agent_with_backoff_and_logs_it() {
        let real_sleep = ["/bin/sleep", "/usr/bin/sleep"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("a sleep binary");
        let mut plan = vec!["exit 1"; 10];
        // Run 11 lasts longer than HEALTHY_AFTER: the wait starts over.
        let long_run = format!("{real_sleep} 2.5; exit 3");
        plan.push(&long_run);
        plan.push("kill -9 $$");
        plan.push("touch \"$MODDIR/disable\"; exit 1");
        let module = Module::new("backoff", &plan);
        let log = module.boot(&[("EGRESSMON_HEALTHY_AFTER", "2")]);

        assert_eq!(module.read("runs").trim(), "13", "{log:#?}");
        let waits = module.read("slept");
        assert_eq!(
            waits.lines().collect::<Vec<_>>(),
            ["1", "2", "4", "8", "16", "32", "64", "128", "256", "300", "1", "2"],
            "doubling from 1 s to 5 min, from 1 s again after a healthy run"
        );
        let lines = supervisor_lines(&log);
        assert_eq!(lines.len(), 13, "{log:#?}");
        assert!(
            lines[0].starts_with("service.sh: the agent exited with code 1 after ")
                && lines[0].ends_with("s; restarting in 1s"),
            "{log:#?}"
        );
        assert!(lines[9].ends_with("; restarting in 300s"), "{log:#?}");
        assert!(lines[10].contains("exited with code 3 after "), "{log:#?}");
        assert!(lines[10].ends_with("; restarting in 1s"), "{log:#?}");
        assert!(
            lines[11].contains("exited with code 137 (signal 9) after "),
            "{log:#?}"
        );
        assert_eq!(
            lines[12]
                .split_once(" after ")
                .unwrap()
                .1
                .split_once("; ")
                .unwrap()
                .1,
            "not restarting: the module is disabled in Magisk",
            "{log:#?}"
        );
        // The agent's own output is in the same log, with its arguments.
        assert!(log
            .iter()
            .any(|l| l == "fake agent run 1: run --pin-dir /sys/fs/bpf/egressmon"));
        assert!(module.dir.join("data/egressmon.pid").exists());
        // Once at boot, not at each restart, the wait for netd.
        assert_eq!(module.read("waited"), "wait-netd --timeout 120\n");
    }

    #[test]
    fn service_starts_the_agent_as_soon_as_netd_has_attached() {
        let module = Module::new("netd", &["exit 0"]);
        let log = module.boot(&[]);
        assert_eq!(module.read("waited"), "wait-netd --timeout 120\n");
        assert_eq!(module.read("runs").trim(), "1", "{log:#?}");
        // Not waiting for boot to complete.
        assert_eq!(module.read("getprop"), "", "{log:#?}");
        assert_eq!(module.read("slept"), "", "{log:#?}");
        // wait-netd's report, then the agent, in this boot's log.
        assert_eq!(log[0], "fake netd programs attached", "{log:#?}");
        assert_eq!(
            log[1], "fake agent run 1: run --pin-dir /sys/fs/bpf/egressmon",
            "{log:#?}"
        );
        assert_eq!(supervisor_lines(&log).len(), 1, "{log:#?}");
    }

    #[test]
    fn service_waits_for_boot_completed_when_netd_does_not_show() {
        let cases = [
            (
                "timeout",
                "egressmon: fake netd absent",
                "service.sh: netd's programs did not appear within 120s; \
                 starting the agent once boot has completed",
            ),
            (
                "error",
                "egressmon: fake error",
                "service.sh: egressmon wait-netd failed (exit code 2); \
                 starting the agent once boot has completed",
            ),
        ];
        for (how, said, note) in cases {
            let module = Module::new(&format!("no-netd-{how}"), &["exit 0"]);
            let log = module.boot(&[("FAKE_WAIT_NETD", how)]);
            assert_eq!(module.read("waited"), "wait-netd --timeout 120\n", "{how}");
            // Asked twice (not yet, then completed), two seconds apart.
            assert_eq!(
                module.read("getprop"),
                "sys.boot_completed\nsys.boot_completed\n",
                "{how}: {log:#?}"
            );
            assert_eq!(module.read("slept"), "2\n", "{how}: {log:#?}");
            assert_eq!(module.read("runs").trim(), "1", "{how}: {log:#?}");
            // wait-netd's message, the note, then the agent.
            assert_eq!(log[0], said, "{how}: {log:#?}");
            let lines = supervisor_lines(&log);
            assert_eq!(lines[0], note, "{how}: {log:#?}");
            assert!(log[1].ends_with(note), "{how}: {log:#?}");
            assert_eq!(
                log[2], "fake agent run 1: run --pin-dir /sys/fs/bpf/egressmon",
                "{how}: {log:#?}"
            );
            assert_eq!(lines.len(), 2, "{how}: {log:#?}");
        }
    }

    #[test]
    fn service_stops_restarting_when_stopped_on_purpose_or_removed() {
        let cases = [
            (
                "detach",
                "exit 0",
                "(asked to stop, e.g. by egressmon detach); not restarting",
            ),
            (
                "marker",
                "touch \"$MODDIR/data/stopped\"; exit 1",
                "not restarting: egressmon was stopped on purpose",
            ),
            (
                "remove",
                "touch \"$MODDIR/remove\"; exit 1",
                "not restarting: the module is being removed",
            ),
        ];
        for (name, second_run, expected) in cases {
            let module = Module::new(name, &["exit 1", second_run, "exit 1"]);
            let log = module.boot(&[]);
            assert_eq!(module.read("runs").trim(), "2", "{name}: {log:#?}");
            let lines = supervisor_lines(&log);
            assert_eq!(lines.len(), 2, "{name}: {log:#?}");
            assert!(lines[1].contains(expected), "{name}: {log:#?}");
        }
        // Disabled before boot: never started.
        let module = Module::new("disabled", &["exit 1"]);
        std::fs::write(module.dir.join("disable"), "").unwrap();
        let log = module.boot(&[]);
        assert_eq!(module.read("runs"), "");
        assert_eq!(
            supervisor_lines(&log),
            ["service.sh: not starting the agent: the module is disabled in Magisk"]
        );
    }
}
