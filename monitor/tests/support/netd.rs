//! Reproduces Android netd's attachments on a test cgroup: tiny "allow"
//! programs attached with BPF_PROG_ATTACH and flags 0 (exclusive), exactly as
//! netd attaches its cgroup programs at the root cgroup. Detached on drop.

use egressmon::bpf_sys::{self, sys_bpf};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

const BPF_PROG_LOAD: u32 = 5;
const BPF_PROG_ATTACH: u32 = 8;
const BPF_PROG_DETACH: u32 = 9;
pub const PROG_TYPE_CGROUP_SKB: u32 = 8;
pub const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    _pad: u32,
}

/// `r0 = 1; exit`: allow everything.
fn load_allow(prog_type: u32, attach_type: u32, name: &str) -> OwnedFd {
    let insns: [u64; 2] = [
        // code 0xb7 (mov64 imm), dst r0, imm 1
        0xb7 | (1u64 << 32),
        // code 0x95 (exit)
        0x95,
    ];
    let license = CString::new("GPL").unwrap();
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: attach_type,
        ..Default::default()
    };
    attr.prog_name[..name.len()].copy_from_slice(name.as_bytes());
    let fd = unsafe { sys_bpf(BPF_PROG_LOAD, &mut attr) }.expect("loading a netd stand-in program");
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// One exclusive attachment, removed on drop.
pub struct ExclusiveProgram {
    pub cgroup: PathBuf,
    pub attach_type: u32,
    pub prog: OwnedFd,
}

impl ExclusiveProgram {
    pub fn attach(cgroup: &Path, prog_type: u32, attach_type: u32, name: &str) -> ExclusiveProgram {
        let prog = load_allow(prog_type, attach_type, name);
        let dir = std::fs::File::open(cgroup).unwrap();
        let mut attr = ProgAttachAttr {
            target_fd: dir.as_raw_fd() as u32,
            attach_bpf_fd: prog.as_raw_fd() as u32,
            attach_type,
            attach_flags: 0,
            ..Default::default()
        };
        unsafe { sys_bpf(BPF_PROG_ATTACH, &mut attr) }.expect("BPF_PROG_ATTACH flags 0");
        ExclusiveProgram {
            cgroup: cgroup.to_path_buf(),
            attach_type,
            prog,
        }
    }

    /// What the kernel reports attached at the cgroup for this type.
    pub fn query(&self) -> bpf_sys::Attached {
        let dir = std::fs::File::open(&self.cgroup).unwrap();
        bpf_sys::prog_query(dir.as_fd(), self.attach_type).unwrap()
    }
}

impl Drop for ExclusiveProgram {
    fn drop(&mut self) {
        if let Ok(dir) = std::fs::File::open(&self.cgroup) {
            let mut attr = ProgAttachAttr {
                target_fd: dir.as_raw_fd() as u32,
                attach_bpf_fd: self.prog.as_raw_fd() as u32,
                attach_type: self.attach_type,
                ..Default::default()
            };
            let _ = unsafe { sys_bpf(BPF_PROG_DETACH, &mut attr) };
        }
    }
}
