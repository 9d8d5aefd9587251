//! A minimal cpio "newc" writer (the format the kernel unpacks an initramfs
//! from): directories, regular files and device nodes, parents created
//! first, no compression. Used by `vm-test` to pack /init, the binaries and
//! the kernel modules for the guest.

use std::collections::BTreeSet;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;
const TRAILER: &str = "TRAILER!!!";

/// An archive being written in memory.
pub struct Cpio {
    out: Vec<u8>,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl Default for Cpio {
    fn default() -> Self {
        Self::new()
    }
}

impl Cpio {
    pub fn new() -> Cpio {
        Cpio {
            out: Vec::new(),
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn pad4(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: reproducible archives
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad4();
        self.out.extend_from_slice(data);
        self.pad4();
    }

    /// Adds `path`'s missing ancestors (not `path` itself).
    fn parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.dir(&prefix.clone());
        }
    }

    /// A directory (mode 0755), with its parents.
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/').to_string();
        if path.is_empty() || self.dirs.contains(&path) {
            return;
        }
        self.parents(&path);
        self.dirs.insert(path.clone());
        self.entry(&path, S_IFDIR | 0o755, (0, 0), &[]);
    }

    /// A regular file with permission bits `perm` (e.g. 0o755).
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        let path = path.trim_start_matches('/');
        self.parents(path);
        self.entry(path, S_IFREG | (perm & 0o7777), (0, 0), data);
    }

    /// A character device node (e.g. /dev/console is 5:1).
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        let path = path.trim_start_matches('/');
        self.parents(path);
        self.entry(path, S_IFCHR | (perm & 0o7777), (major, minor), &[]);
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry(TRAILER, 0, (0, 0), &[]);
        // The kernel reads the initramfs in 512-byte blocks.
        while !self.out.len().is_multiple_of(512) {
            self.out.push(0);
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, rdevmajor, rdevminor, data) of every entry.
    fn parse(mut bytes: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let mut entries = Vec::new();
        let total = bytes.len();
        loop {
            assert_eq!(&bytes[..6], b"070701", "magic");
            let field = |i: usize| {
                let s = std::str::from_utf8(&bytes[6 + i * 8..6 + i * 8 + 8]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) =
                (field(1), field(6), field(9), field(10), field(11));
            let name_end = 110 + namesize as usize;
            let name = std::str::from_utf8(&bytes[110..name_end - 1])
                .unwrap()
                .to_string();
            assert_eq!(bytes[name_end - 1], 0, "name is NUL-terminated");
            let data_start = (name_end + 3) & !3;
            let data_end = data_start + size as usize;
            let data = bytes[data_start..data_end].to_vec();
            let consumed = (data_end + 3) & !3;
            assert_eq!((total - bytes.len()) % 4, 0, "entries start 4-aligned");
            bytes = &bytes[consumed..];
            if name == TRAILER {
                break;
            }
            entries.push((name, mode, rmaj, rmin, data));
        }
        assert!(
            bytes.iter().all(|&b| b == 0),
            "only padding after the trailer"
        );
        entries
    }

    #[test]
    fn newc_archive_round_trips() {
        let mut cpio = Cpio::new();
        cpio.char_dev("/dev/console", 0o600, 5, 1);
        cpio.file("/init", 0o755, b"\x7fELF...");
        cpio.file("/lib/modules/00-veth.ko.xz", 0o644, b"abcde");
        cpio.dir("/proc");
        cpio.dir("lib/modules"); // already there: not repeated
        let bytes = cpio.finish();
        assert_eq!(bytes.len() % 512, 0);
        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/00-veth.ko.xz",
                "proc"
            ]
        );
        let console = &entries[1];
        assert_eq!((console.1, console.2, console.3), (S_IFCHR | 0o600, 5, 1));
        assert_eq!(entries[2].1, S_IFREG | 0o755);
        assert_eq!(entries[5].4, b"abcde");
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
    }
}
