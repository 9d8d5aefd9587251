//! Pin directories as someone else could have left them (a symbolic link,
//! another owner, a writable mode, planted maps, a bpffs mounted inside
//! bpffs), and `egressmon run` and `detach` aimed at them. Everything made
//! here is removed on drop, also when the test fails.

use super::{free_port, Proc, BIN};
use egressmon::bpf_sys;
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A path under /sys/fs/bpf, removed on drop with whatever is there (a
/// directory and its pins, a pin, a symbolic link, a mount).
pub struct BpfPath {
    pub path: PathBuf,
    mounted: bool,
}

impl BpfPath {
    /// Nothing made yet: the path is removed on drop if something made it.
    pub fn new(name: &str) -> BpfPath {
        BpfPath {
            path: Path::new("/sys/fs/bpf").join(name),
            mounted: false,
        }
    }

    /// A directory of exactly `mode`, owned by `uid`.
    pub fn dir(name: &str, mode: u32, uid: u32) -> BpfPath {
        let dir = BpfPath::new(name);
        std::fs::create_dir(&dir.path).unwrap_or_else(|e| panic!("mkdir {name}: {e}"));
        std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&dir.path, Some(uid), Some(uid)).unwrap();
        dir
    }

    /// A symbolic link to `target`.
    pub fn symlink(name: &str, target: &Path) -> BpfPath {
        let link = BpfPath::new(name);
        std::os::unix::fs::symlink(target, &link.path)
            .unwrap_or_else(|e| panic!("symlink {name}: {e}"));
        link
    }

    /// A bpffs of its own (mode 0700) mounted on a new directory: a pin
    /// directory that is a mount root, as /sys/fs/bpf is.
    pub fn mount(name: &str) -> BpfPath {
        let mut dir = BpfPath::dir(name, 0o700, 0);
        let path = CString::new(dir.path.as_os_str().as_encoded_bytes()).unwrap();
        let bpf = CString::new("bpf").unwrap();
        let options = CString::new("mode=0700").unwrap();
        // SAFETY: valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                bpf.as_ptr(),
                path.as_ptr(),
                bpf.as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mount bpffs: {}", std::io::Error::last_os_error());
        dir.mounted = true;
        dir
    }

    /// Creates a map the kernel knows as `kernel_name` and pins it as `pin`
    /// in this directory.
    pub fn plant(&self, pin: &str, kernel_name: &str, shape: MapShape) -> OwnedFd {
        plant(&self.path.join(pin), kernel_name, shape)
    }

    pub fn entries(&self) -> Vec<String> {
        entries(&self.path)
    }
}

/// A map's type, key size, value size and max entries.
pub type MapShape = (u32, u32, u32, u32);

/// Creates a map the kernel knows as `kernel_name` (letters, digits and
/// `_`) and pins it at `pin`.
pub fn plant(pin: &Path, kernel_name: &str, shape: MapShape) -> OwnedFd {
    let (map_type, key_size, value_size, max_entries) = shape;
    let fd = bpf_sys::map_create(map_type, key_size, value_size, max_entries, kernel_name)
        .unwrap_or_else(|e| panic!("BPF_MAP_CREATE {kernel_name}: {e}"));
    bpf_sys::obj_pin(fd.as_fd(), pin).unwrap_or_else(|e| panic!("pinning {}: {e}", pin.display()));
    fd
}

/// The names in directory `dir`, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

impl Drop for BpfPath {
    fn drop(&mut self) {
        if self.mounted {
            let path = CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        let removed = match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&self.path),
            Ok(_) => std::fs::remove_file(&self.path),
            Err(_) => Ok(()),
        };
        if let Err(e) = removed {
            eprintln!("warning: could not remove {}: {e}", self.path.display());
        }
    }
}

/// `egressmon run` on `cgroup` with `pin_dir` and `extra`, which must
/// refuse to start: its error output. An agent that starts anyway fails the
/// test (killed; its pins go with the test's directory).
pub fn run_refused(cgroup: &Path, pin_dir: &Path, extra: &[&str]) -> String {
    let mut child = Command::new(BIN)
        .args(["run", "--cgroup"])
        .arg(cgroup)
        .arg("--pin-dir")
        .arg(pin_dir)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn egressmon run");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            drop(Proc(child));
            panic!("egressmon run started with --pin-dir {}", pin_dir.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "egressmon run succeeded: {err}");
    err
}

/// `egressmon detach --pin-dir DIR`, aimed at a port no agent listens on.
pub fn detach(pin_dir: &Path) -> Output {
    Command::new(BIN)
        .args(["detach", "--pin-dir"])
        .arg(pin_dir)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .expect("run egressmon detach")
}
