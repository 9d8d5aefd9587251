//! Files and directories only root may change: the `--log` file, the run and
//! state directories.
//!
//! egressmon runs as root and writes what it knows (every app's
//! destinations) into them. A path another user prepared could send those
//! writes elsewhere (a symlink or hard link to a system file) or let that
//! user read or rewrite them (a file or directory they own or may write), so
//! each is checked on the opened file or with lstat, never through a link.

use anyhow::{bail, Context, Result};
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

const GROUP_OR_OTHER_WRITE: u32 = 0o022;
const GROUP_OR_OTHER_READ: u32 = 0o044;

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Checks that `path` is a real directory (not a symlink) owned by this
/// process's user (root) and not writable by group or others.
pub(crate) fn check_private_dir(path: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("checking directory {}", path.display()))?;
    if meta.file_type().is_symlink() {
        bail!(
            "{} is a symbolic link: egressmon does not follow links for its own directories; \
             remove the link or choose a real directory",
            path.display()
        );
    }
    if !meta.is_dir() {
        bail!("{} is not a directory", path.display());
    }
    check_owner_and_mode(path, &meta, "directory", "chmod go-w")
}

/// Creates `path` (mode 0700) when missing, its parents as usual, then
/// checks it with [`check_private_dir`].
pub(crate) fn ensure_private_dir(path: &Path) -> Result<()> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
    {
        Ok(()) => {}
        // A symlink to a directory makes `create` succeed; a dangling one fails:
        // either way the check below says what it is.
        Err(e) if std::fs::symlink_metadata(path).is_ok() => log::debug!("{e}"),
        Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
    }
    check_private_dir(path)
}

fn check_owner_and_mode(path: &Path, meta: &Metadata, what: &str, fix: &str) -> Result<()> {
    let owner = euid();
    if meta.uid() != owner {
        bail!(
            "{what} {} is owned by uid {}, not by uid {owner} which egressmon runs as: \
             another user could read or replace what egressmon writes there; \
             remove it or `chown {owner} {}`",
            path.display(),
            meta.uid(),
            path.display()
        );
    }
    if meta.mode() & GROUP_OR_OTHER_WRITE != 0 {
        bail!(
            "{what} {} is writable by group or others (mode {:03o}): \
             `{fix} {}` or choose another path",
            path.display(),
            meta.mode() & 0o777,
            path.display()
        );
    }
    Ok(())
}

/// Opens `path` for appending: created 0600 when missing; an existing one
/// must be a regular file with one name, owned by this process's user and
/// not writable by group or others. A symlink is refused, never followed.
pub(crate) fn open_private_append(path: &Path) -> Result<File> {
    refuse_link_or_special(path)?;
    let file = append_options()
        .create(true)
        .open(path)
        .map_err(|e| explain_open_error(path, e))?;
    check_private_file(path, &file)?;
    Ok(file)
}

/// Creates `path` 0600 for appending; fails if anything is there already
/// (so the file is surely new and ours).
pub(crate) fn create_private_append(path: &Path) -> io::Result<File> {
    append_options().create_new(true).open(path)
}

fn append_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options
        .append(true)
        .mode(0o600)
        // NONBLOCK: a FIFO planted at the path must not hang the open (the
        // check after it refuses anything but a regular file).
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK);
    options
}

/// A clear refusal before opening; the checks on the opened file are the
/// ones that count (the path may change in between).
fn refuse_link_or_special(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => bail!(
            "{} is a symbolic link: egressmon does not follow links for files it writes \
             as root; remove the link or pass the real path",
            path.display()
        ),
        Ok(meta) if !meta.is_file() => bail!(
            "{} exists and is not a regular file; choose another path",
            path.display()
        ),
        _ => Ok(()),
    }
}

fn explain_open_error(path: &Path, e: io::Error) -> anyhow::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        anyhow::anyhow!(
            "{} is a symbolic link: egressmon does not follow links for files it writes \
             as root; remove the link or pass the real path",
            path.display()
        )
    } else {
        anyhow::Error::new(e).context(format!("opening {}", path.display()))
    }
}

fn check_private_file(path: &Path, file: &File) -> Result<()> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    check_owner_and_mode(path, &meta, "file", "chmod go-w")?;
    if meta.nlink() > 1 {
        bail!(
            "{} has {} hard links: it may be another file under a second name; \
             remove it or choose another path",
            path.display(),
            meta.nlink()
        );
    }
    if meta.mode() & GROUP_OR_OTHER_READ != 0 {
        log::warn!(
            "{} is readable by group or others (mode {:03o}) and will name every app's \
             destinations: `chmod 600` it unless that is intended",
            path.display(),
            meta.mode() & 0o777
        );
    }
    Ok(())
}

/// Device and inode: which file a path or descriptor is.
pub(crate) fn identity(meta: &Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("egm-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn is_root() -> bool {
        euid() == 0
    }

    #[test]
    fn private_dir_checks() {
        let tmp = TempDir::new("private-dir");
        let dir = tmp.0.join("run");
        ensure_private_dir(&dir).unwrap();
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);
        check_private_dir(&dir).unwrap();

        chmod(&dir, 0o770);
        let e = format!("{:#}", check_private_dir(&dir).unwrap_err());
        assert!(
            e.contains("writable by group or others") && e.contains("chmod"),
            "{e}"
        );
        chmod(&dir, 0o700);

        let link = tmp.0.join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let e = format!("{:#}", check_private_dir(&link).unwrap_err());
        assert!(e.contains("symbolic link"), "{e}");
        let e = format!("{:#}", ensure_private_dir(&link).unwrap_err());
        assert!(e.contains("symbolic link"), "{e}");

        let file = tmp.0.join("file");
        std::fs::write(&file, "").unwrap();
        assert!(check_private_dir(&file).is_err());

        if is_root() {
            std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
            let e = format!("{:#}", check_private_dir(&dir).unwrap_err());
            assert!(e.contains("owned by uid 65534"), "{e}");
        }
    }

    #[test]
    fn private_file_is_created_0600() {
        let tmp = TempDir::new("private-file");
        let path = tmp.0.join("new.log");
        open_private_append(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(create_private_append(&path).is_err(), "exists already");
    }

    #[test]
    fn private_file_refuses_links_and_special_files() {
        let tmp = TempDir::new("private-links");
        let target = tmp.0.join("target");
        std::fs::write(&target, "untouched").unwrap();
        chmod(&target, 0o600);
        let link = tmp.0.join("link.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = format!("{:#}", open_private_append(&link).unwrap_err());
        assert!(e.contains("symbolic link"), "{e}");

        let hard = tmp.0.join("hard.log");
        std::fs::hard_link(&target, &hard).unwrap();
        let e = format!("{:#}", open_private_append(&hard).unwrap_err());
        assert!(e.contains("hard links"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");

        let fifo = tmp.0.join("fifo.log");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = format!("{:#}", open_private_append(&fifo).unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
    }
}
