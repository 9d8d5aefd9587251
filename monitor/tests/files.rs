//! Files the agent writes as root and text it prints, through the binary:
//! a `--log` path another user could have prepared is refused before
//! anything is loaded or attached, and names with terminal escape sequences
//! are printed escaped.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::{cgroup2_root, free_port, require_root, TestCgroup, BIN};

/// A directory of this test's own under /tmp, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("egm-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `egressmon run --log <log>` on a test cgroup and pin directory of its
/// own; it must exit by itself (an agent that starts is killed and fails
/// the test).
fn run_with_log(tag: &str, log: &Path) -> (Output, PathBuf) {
    let cgroup = TestCgroup::new(&cgroup2_root(), &format!("{tag}-{}", std::process::id()));
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{tag}-{}", std::process::id()));
    let mut child = Command::new(BIN)
        .args(["run", "--cgroup"])
        .arg(&cgroup.path)
        .arg("--pin-dir")
        .arg(&pin_dir)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--log")
        .arg(log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn egressmon run");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            let _ = Command::new(BIN)
                .arg("detach")
                .arg("--pin-dir")
                .arg(&pin_dir)
                .status();
            panic!(
                "the agent started with --log {}: {}",
                log.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().unwrap(), pin_dir)
}

/// Runs the agent with `log` and checks it refused it, saying `expected`,
/// before it pinned anything.
fn assert_refused(tag: &str, log: &Path, expected: &str) {
    let (out, pin_dir) = run_with_log(tag, log);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted --log {}", log.display());
    assert!(
        stderr.contains(expected) && stderr.contains(&log.display().to_string()),
        "stderr should say {expected:?} about {}: {stderr}",
        log.display()
    );
    assert!(
        !pin_dir.exists(),
        "{} was made before the log was refused",
        pin_dir.display()
    );
}

#[test]
fn run_refuses_a_symlinked_log_before_attaching_anything() {
    require_root();
    let dir = Scratch::new("symlink");
    let target = dir.0.join("target");
    std::fs::write(&target, "precious\n").unwrap();
    let log = dir.0.join("flows.jsonl");
    std::os::unix::fs::symlink(&target, &log).unwrap();
    assert_refused("egm-files-symlink", &log, "is a symbolic link");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
}

#[test]
fn run_refuses_a_log_of_another_user_or_writable_by_others() {
    require_root();
    let dir = Scratch::new("foreign");
    let log = dir.0.join("flows.jsonl");
    std::fs::write(&log, "").unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&log, Some(65534), Some(65534)).unwrap();
    assert_refused("egm-files-foreign", &log, "is owned by uid 65534");

    std::os::unix::fs::chown(&log, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_refused("egm-files-writable", &log, "writable by group or others");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "");
}

/// A device layout whose shared-user name tries to retitle the terminal.
fn hostile_android_root(dir: &Path) -> PathBuf {
    let system = dir.join("data/system");
    std::fs::create_dir_all(&system).unwrap();
    std::fs::write(
        system.join("packages.list"),
        "com.example.evil 10200 0 /data/user/0/com.example.evil default:targetSdkVersion=33 none\n",
    )
    .unwrap();
    std::fs::write(
        system.join("packages.xml"),
        "<?xml version='1.0' encoding='utf-8' standalone='yes' ?>\n<packages>\n\
         <package name=\"com.example.evil\" codePath=\"/data/app/evil\" publicFlags=\"0\" \
         sharedUserId=\"10200\" />\n\
         <shared-user name=\"\x1b]0;pwned\x07\" userId=\"10200\" />\n</packages>\n",
    )
    .unwrap();
    dir.to_path_buf()
}

#[test]
fn owners_prints_names_escaped_and_json_exact() {
    let dir = Scratch::new("owners");
    let root = hostile_android_root(&dir.0);
    let owners = |json: bool| {
        let mut cmd = Command::new(BIN);
        cmd.arg("owners").arg("--android-root").arg(&root);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let text = owners(false);
    let row = text
        .lines()
        .find(|l| l.trim_start().starts_with("10200 "))
        .unwrap_or_else(|| panic!("no row for uid 10200:\n{text}"));
    assert!(row.contains(r"\x1b]0;pwned\x07"), "{row}");
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "a control character reached the terminal: {text:?}"
    );

    let table: serde_json::Value = serde_json::from_str(&owners(true)).unwrap();
    let evil = table
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["uid"] == 10200)
        .unwrap();
    assert_eq!(
        evil["owner"], "\x1b]0;pwned\x07",
        "JSON keeps the exact name"
    );
}
