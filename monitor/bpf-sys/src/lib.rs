//! egressmon's one raw bpf(2) layer: every bpf(2) command that egressmon's
//! code issues itself rather than through aya 0.14, each with its own
//! `#[repr(C)]` attribute struct laid out as in `union bpf_attr`
//! (include/uapi/linux/bpf.h; unused trailing bytes stay zero), all through
//! one syscall wrapper that also copes with pre-5.11 memlock charging.
//!
//! Owns: querying what is attached to a cgroup (at it, or in effect for it),
//! loading small programs from raw instructions (the tests' stand-ins for
//! netd, the bench's empty programs), attaching them with BPF_PROG_ATTACH or
//! with cgroup and TCX links, pinning and adopting objects, updating and
//! detaching links, reading link, map and program info (a program's maps,
//! its run-time statistics), creating maps, and reading maps that other
//! programs pinned (`RawMap`: Android netd's counters, without BTF).
//!
//! Used by the agent (as `egressmon::bpf_sys`), by `cargo xtask bench`, and
//! by the agent's integration tests. Depends on libc only, so it builds for
//! every target the agent does and without the agent's eBPF object.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

const BPF_MAP_CREATE: u32 = 0;
const BPF_PROG_LOAD: u32 = 5;
const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_DELETE_ELEM: u32 = 3;
const BPF_MAP_GET_NEXT_KEY: u32 = 4;
const BPF_OBJ_PIN: u32 = 6;
const BPF_OBJ_GET: u32 = 7;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_PROG_QUERY: u32 = 16;
const BPF_LINK_CREATE: u32 = 28;
const BPF_LINK_UPDATE: u32 = 29;
const BPF_LINK_DETACH: u32 = 34;

/// `BPF_F_ALLOW_OVERRIDE` / `BPF_F_ALLOW_MULTI` attach flags.
pub const BPF_F_ALLOW_OVERRIDE: u32 = 1;
pub const BPF_F_ALLOW_MULTI: u32 = 2;

/// `BPF_F_RDONLY`: BPF_OBJ_GET file flag for a read-only map descriptor.
pub const BPF_F_RDONLY: u32 = 1 << 3;

/// Calls bpf(2) with `attr`, returning the non-negative result.
///
/// # Safety
/// `attr` must be a valid attribute struct for `cmd`, with any pointers in it
/// valid for the kernel to read or write.
unsafe fn sys_bpf<T>(cmd: u32, attr: &mut T) -> io::Result<i64> {
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_long,
        )
    };
    if ret >= 0 {
        return Ok(ret);
    }
    let error = io::Error::last_os_error();
    let charged = cmd == BPF_MAP_CREATE || cmd == BPF_PROG_LOAD;
    if charged && error.raw_os_error() == Some(libc::EPERM) && raise_memlock() {
        // SAFETY: as above; the same call once more.
        return unsafe { sys_bpf(cmd, attr) };
    }
    Err(error)
}

/// Kernels before 5.11 (the 5.10 GKI line of Android 12-14 phones) charge
/// maps and programs to RLIMIT_MEMLOCK, counted over every process of the
/// user, and answer EPERM when the sum passes the caller's limit. As libbpf
/// and aya do, the limit is raised to infinity once, on the first EPERM;
/// later kernels charge memory cgroups and never get here. Whether it
/// changed anything.
fn raise_memlock() -> bool {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    let mut current = unlimited;
    // SAFETY: get/setrlimit on structs we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut current) == 0
            && current.rlim_cur != libc::RLIM_INFINITY
            && libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) == 0
    }
}

fn owned_fd(ret: i64) -> OwnedFd {
    // SAFETY: the kernel returned a new file descriptor we now own.
    unsafe { OwnedFd::from_raw_fd(ret as i32) }
}

/// What a BPF file descriptor (e.g. from a pin) refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjKind {
    Map,
    Prog,
    Link,
    Other,
}

/// The kind of object behind `fd`, from the name of its anonymous inode.
/// BPF_OBJ_GET_INFO_BY_FD answers for maps, programs and links alike, each
/// in its own layout, so its answer alone cannot tell them apart.
pub fn obj_kind(fd: BorrowedFd<'_>) -> io::Result<ObjKind> {
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok(match target.to_str() {
        Some("anon_inode:bpf-map") => ObjKind::Map,
        Some("anon_inode:bpf-prog") => ObjKind::Prog,
        // bpf_link_new_fd and bpf_link_prime spell it differently.
        Some("anon_inode:bpf-link" | "anon_inode:bpf_link") => ObjKind::Link,
        _ => ObjKind::Other,
    })
}

impl ObjKind {
    fn name(self) -> &'static str {
        match self {
            ObjKind::Map => "map",
            ObjKind::Prog => "program",
            ObjKind::Link => "link",
            ObjKind::Other => "other object",
        }
    }
}

fn require_kind(fd: BorrowedFd<'_>, want: ObjKind) -> io::Result<()> {
    let kind = obj_kind(fd)?;
    if kind != want {
        let message = format!("a BPF {}, not a {}", kind.name(), want.name());
        return Err(io::Error::new(io::ErrorKind::InvalidInput, message));
    }
    Ok(())
}

#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// What is attached directly at one cgroup for one attach type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attached {
    /// `BPF_F_ALLOW_*` flags of the cgroup for this type (0 = exclusive).
    pub flags: u32,
    pub prog_ids: Vec<u32>,
}

impl Attached {
    /// True when a program holds this hook without allowing others beside
    /// it: attaching below it would be refused, or would replace it.
    pub fn is_exclusive(&self) -> bool {
        !self.prog_ids.is_empty() && self.flags & BPF_F_ALLOW_MULTI == 0
    }
}

/// `BPF_F_QUERY_EFFECTIVE`: BPF_PROG_QUERY flag for every program that runs
/// for a cgroup, its ancestors' included.
const BPF_F_QUERY_EFFECTIVE: u32 = 1;

/// BPF_PROG_QUERY on `cgroup` (programs attached at that cgroup itself).
pub fn prog_query(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Attached> {
    prog_query_flags(cgroup, attach_type, 0)
}

/// BPF_PROG_QUERY with `BPF_F_QUERY_EFFECTIVE`: every program that runs for
/// `cgroup`, those attached at its ancestors included.
pub fn prog_query_effective(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Attached> {
    prog_query_flags(cgroup, attach_type, BPF_F_QUERY_EFFECTIVE)
}

fn prog_query_flags(
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
    query_flags: u32,
) -> io::Result<Attached> {
    let mut ids = vec![0u32; 64];
    let mut attr = ProgQueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        query_flags,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    // SAFETY: attr matches BPF_PROG_QUERY; `ids` outlives the call.
    unsafe { sys_bpf(BPF_PROG_QUERY, &mut attr)? };
    ids.truncate(attr.prog_cnt.min(64) as usize);
    Ok(Attached {
        flags: attr.attach_flags,
        prog_ids: ids,
    })
}

/// `BPF_PROG_TYPE_*` values of the cgroup programs loaded through
/// [`prog_load`].
pub const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
pub const BPF_PROG_TYPE_CGROUP_SOCK: u32 = 9;
pub const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

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

/// BPF_PROG_LOAD of raw instructions (GPL, so every helper is allowed),
/// named `name` (kept to the kernel's 15 bytes). When the kernel refuses
/// the program, the error carries the verifier's log.
pub fn prog_load(
    prog_type: u32,
    expected_attach_type: u32,
    name: &str,
    insns: &[u64],
) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type,
        ..Default::default()
    };
    let len = name.len().min(15);
    attr.prog_name[..len].copy_from_slice(&name.as_bytes()[..len]);
    // SAFETY: attr matches BPF_PROG_LOAD; `insns` and `license` outlive it.
    let refused = match unsafe { sys_bpf(BPF_PROG_LOAD, &mut attr) } {
        Ok(fd) => return Ok(owned_fd(fd)),
        Err(e) => e,
    };
    // Once more with the verifier's log, to say why.
    let mut log = vec![0u8; 64 * 1024];
    attr.log_level = 1;
    attr.log_size = log.len() as u32;
    attr.log_buf = log.as_mut_ptr() as u64;
    // SAFETY: as above; `log` outlives the call and has `log_size` bytes.
    if let Ok(fd) = unsafe { sys_bpf(BPF_PROG_LOAD, &mut attr) } {
        return Ok(owned_fd(fd));
    }
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]);
    if text.trim().is_empty() {
        return Err(refused);
    }
    Err(io::Error::new(
        refused.kind(),
        format!("{refused}; the verifier says:\n{}", text.trim_end()),
    ))
}

/// Loads `r0 = 1; exit`: a program that allows everything and counts
/// nothing.
pub fn prog_load_allow(
    prog_type: u32,
    expected_attach_type: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    let insns: [u64; 2] = [
        0xb7 | (1u64 << 32), // BPF_ALU64 | BPF_MOV | BPF_K: r0 = 1
        0x95,                // BPF_JMP | BPF_EXIT
    ];
    prog_load(prog_type, expected_attach_type, name, &insns)
}

const BPF_PROG_ATTACH: u32 = 8;
const BPF_PROG_DETACH: u32 = 9;

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

/// BPF_PROG_ATTACH of `prog` to `cgroup` with `BPF_F_ALLOW_*` `flags`
/// (0: exclusive, as Android netd attaches its programs).
pub fn prog_attach(
    cgroup: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach_type: u32,
    flags: u32,
) -> io::Result<()> {
    let mut attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        attach_flags: flags,
        ..Default::default()
    };
    // SAFETY: attr matches BPF_PROG_ATTACH.
    unsafe { sys_bpf(BPF_PROG_ATTACH, &mut attr) }.map(drop)
}

/// BPF_PROG_DETACH of `prog` from `cgroup`.
pub fn prog_detach(
    cgroup: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    let mut attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    // SAFETY: attr matches BPF_PROG_DETACH.
    unsafe { sys_bpf(BPF_PROG_DETACH, &mut attr) }.map(drop)
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// BPF_LINK_CREATE: a multi-attach cgroup link (never replaces anyone).
pub fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    // SAFETY: attr matches BPF_LINK_CREATE.
    unsafe { sys_bpf(BPF_LINK_CREATE, &mut attr) }.map(owned_fd)
}

/// BPF_LINK_CREATE of a TCX link (kernel 6.6+) on interface `ifindex` of
/// the calling thread's network namespace, after the programs already there.
pub fn link_create_tcx(
    prog: BorrowedFd<'_>,
    ifindex: u32,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: ifindex,
        attach_type,
        flags: 0,
    };
    // SAFETY: attr matches BPF_LINK_CREATE (tcx: relative_fd and
    // expected_revision left 0, i.e. append).
    unsafe { sys_bpf(BPF_LINK_CREATE, &mut attr) }.map(owned_fd)
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// BPF_LINK_UPDATE: atomically swap the program behind an existing link.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: attr matches BPF_LINK_UPDATE.
    unsafe { sys_bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// BPF_LINK_DETACH: detach now, even if other processes hold the link.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    // SAFETY: attr matches BPF_LINK_DETACH.
    unsafe { sys_bpf(BPF_LINK_DETACH, &mut attr) }.map(drop)
}

#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// BPF_OBJ_PIN: make `fd` outlive this process at `path` on bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let cpath = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: attr matches BPF_OBJ_PIN; `cpath` outlives the call.
    unsafe { sys_bpf(BPF_OBJ_PIN, &mut attr) }.map(drop)
}

/// BPF_OBJ_GET: open a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    obj_get_flags(path, 0)
}

/// BPF_OBJ_GET with `file_flags` (0 or `BPF_F_RDONLY`; kernels before 4.15
/// reject any flag with EINVAL).
pub fn obj_get_flags(path: &Path, file_flags: u32) -> io::Result<OwnedFd> {
    let cpath = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: cpath.as_ptr() as u64,
        file_flags,
        ..Default::default()
    };
    // SAFETY: attr matches BPF_OBJ_GET; `cpath` outlives the call.
    unsafe { sys_bpf(BPF_OBJ_GET, &mut attr) }.map(owned_fd)
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The part of `struct bpf_link_info` egressmon reads (cgroup links).
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct CgroupLinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    _pad: u32,
    /// 0 once the cgroup is gone or the link was detached.
    pub cgroup_id: u64,
    pub attach_type: u32,
    _rest: [u32; 9],
}

impl CgroupLinkInfo {
    /// For a TCX link: the interface index (the union's first word), 0 once
    /// the interface is gone.
    pub fn tcx_ifindex(&self) -> u32 {
        self.cgroup_id as u32
    }
}

/// BPF_OBJ_GET_INFO_BY_FD on a link (refused for anything else).
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<CgroupLinkInfo> {
    require_kind(link, ObjKind::Link)?;
    let mut info = CgroupLinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<CgroupLinkInfo>() as u32,
        info: &mut info as *mut CgroupLinkInfo as u64,
    };
    // SAFETY: attr matches BPF_OBJ_GET_INFO_BY_FD; `info` outlives the call.
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    Ok(info)
}

/// `BPF_MAP_TYPE_*` values `MapInfo::map_type` is compared with.
pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
pub const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
pub const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;
pub const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
pub const BPF_MAP_TYPE_RINGBUF: u32 = 27;

/// The leading part of `struct bpf_map_info` (all `u32`, so no padding; the
/// kernel fills what it knows and leaves the rest zero).
#[repr(C)]
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapInfo {
    pub map_type: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
    /// NUL-padded; empty before 4.15.
    pub name: [u8; 16],
    pub ifindex: u32,
    pub btf_vmlinux_value_type_id: u32,
}

impl MapInfo {
    /// The map's name as the kernel knows it (at most 15 bytes).
    pub fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }

    /// True for the per-CPU types, whose lookups return one value per CPU.
    pub fn is_per_cpu(&self) -> bool {
        // PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, PERCPU_CGROUP_STORAGE
        matches!(self.map_type, 5 | 6 | 10 | 21)
    }
}

/// BPF_OBJ_GET_INFO_BY_FD on a map (refused for anything else).
pub fn map_info(map: BorrowedFd<'_>) -> io::Result<MapInfo> {
    require_kind(map, ObjKind::Map)?;
    let mut info = MapInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: map.as_raw_fd() as u32,
        info_len: std::mem::size_of::<MapInfo>() as u32,
        info: &mut info as *mut MapInfo as u64,
    };
    // SAFETY: attr matches BPF_OBJ_GET_INFO_BY_FD; `info` outlives the call.
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    Ok(info)
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// BPF_MAP_CREATE of a map named `name` (kept to the kernel's 15 bytes;
/// letters, digits, `_` and `.` only).
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        ..Default::default()
    };
    for (dst, src) in attr.map_name[..15].iter_mut().zip(name.bytes()) {
        *dst = src;
    }
    // SAFETY: attr matches BPF_MAP_CREATE.
    unsafe { sys_bpf(BPF_MAP_CREATE, &mut attr) }.map(owned_fd)
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// `value` or `next_key`.
    value: u64,
    flags: u64,
}

/// A map opened by descriptor with its key and value sizes, so that element
/// commands can check every buffer against them before the kernel reads or
/// writes it. Not for per-CPU maps (their values are per CPU).
#[derive(Debug)]
pub struct RawMap {
    fd: OwnedFd,
    info: MapInfo,
}

impl RawMap {
    /// Wraps a map descriptor, reading its info.
    pub fn from_fd(fd: OwnedFd) -> io::Result<RawMap> {
        let info = map_info(fd.as_fd())?;
        if info.is_per_cpu() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "per-CPU maps are not supported by RawMap",
            ));
        }
        Ok(RawMap { fd, info })
    }

    /// Opens a pinned map read-only (falling back to read-write on kernels
    /// without `BPF_F_RDONLY`).
    pub fn open_pinned_read_only(path: &Path) -> io::Result<RawMap> {
        let fd = match obj_get_flags(path, BPF_F_RDONLY) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => obj_get(path)?,
            other => other?,
        };
        RawMap::from_fd(fd)
    }

    pub fn info(&self) -> &MapInfo {
        &self.info
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn check(&self, key: &[u8], value: Option<usize>) -> io::Result<()> {
        let bad = |what: &str, got: usize, want: u32| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{what} buffer of {got} bytes for a map with {want}-byte {what}s"),
            )
        };
        if key.len() != self.info.key_size as usize {
            return Err(bad("key", key.len(), self.info.key_size));
        }
        match value {
            Some(len) if len != self.info.value_size as usize => {
                Err(bad("value", len, self.info.value_size))
            }
            _ => Ok(()),
        }
    }

    fn elem(&self, cmd: u32, key: u64, value: u64, flags: u64) -> io::Result<i64> {
        let mut attr = MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key,
            value,
            flags,
            ..Default::default()
        };
        // SAFETY: callers checked both buffers against the map's key and
        // value sizes; they outlive the call.
        unsafe { sys_bpf(cmd, &mut attr) }
    }

    /// BPF_MAP_LOOKUP_ELEM: `Ok(false)` when the key is absent.
    pub fn lookup(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        self.check(key, Some(value.len()))?;
        match self.elem(
            BPF_MAP_LOOKUP_ELEM,
            key.as_ptr() as u64,
            value.as_mut_ptr() as u64,
            0,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// BPF_MAP_UPDATE_ELEM with `BPF_ANY` (0), `BPF_NOEXIST` (1) or
    /// `BPF_EXIST` (2).
    pub fn update(&self, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
        self.check(key, Some(value.len()))?;
        self.elem(
            BPF_MAP_UPDATE_ELEM,
            key.as_ptr() as u64,
            value.as_ptr() as u64,
            flags,
        )
        .map(drop)
    }

    /// BPF_MAP_DELETE_ELEM: `Ok(false)` when the key was absent.
    pub fn delete(&self, key: &[u8]) -> io::Result<bool> {
        self.check(key, None)?;
        match self.elem(BPF_MAP_DELETE_ELEM, key.as_ptr() as u64, 0, 0) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// BPF_MAP_GET_NEXT_KEY: the key after `key` (after a key that is not in
    /// the map, the first key; `None` asks for the first key, which kernels
    /// before 4.12 refuse with EFAULT). `Ok(false)` after the last key.
    pub fn next_key(&self, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
        if let Some(key) = key {
            self.check(key, None)?;
        }
        self.check(next, None)?;
        let key = key.map_or(0, |k| k.as_ptr() as u64);
        match self.elem(BPF_MAP_GET_NEXT_KEY, key, next.as_mut_ptr() as u64, 0) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

const BPF_MAP_LOOKUP_BATCH: u32 = 24;

#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Reads a whole hash map (one value per key) with BPF_MAP_LOOKUP_BATCH
/// (5.6+); see [`percpu_lookup_batch`].
pub fn lookup_batch<K: Copy + Default, V: Copy + Default>(
    map: BorrowedFd<'_>,
    mut each: impl FnMut(K, V),
) -> io::Result<()> {
    percpu_lookup_batch::<K, V>(map, 1, |k, v| each(k, v[0]))
}

/// Reads a whole per-CPU hash map with BPF_MAP_LOOKUP_BATCH (5.6+): a few
/// syscalls for thousands of entries instead of two per entry. Each value
/// comes back as one `V` per possible CPU. `V`'s size must be a multiple of 8
/// (the kernel pads per-CPU values to 8 bytes). `each` sees every entry once,
/// with its per-CPU values, without a per-entry allocation.
pub fn percpu_lookup_batch<K: Copy + Default, V: Copy + Default>(
    map: BorrowedFd<'_>,
    cpus: usize,
    mut each: impl FnMut(K, &[V]),
) -> io::Result<()> {
    assert_eq!(
        std::mem::size_of::<V>() % 8,
        0,
        "per-CPU values are 8-byte padded"
    );
    const CHUNK: usize = 1024;
    let mut keys = vec![K::default(); CHUNK];
    let mut values = vec![V::default(); CHUNK * cpus];
    let mut cursor = [0u64; 2];
    let mut first = true;
    loop {
        let mut next = [0u64; 2];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { cursor.as_mut_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: buffers sized for CHUNK keys and CHUNK * cpus values.
        let result = unsafe { sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let done = match result {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        let n = (attr.count as usize).min(CHUNK);
        for i in 0..n {
            each(keys[i], &values[i * cpus..(i + 1) * cpus]);
        }
        if done {
            return Ok(());
        }
        cursor = next;
        first = false;
    }
}

const BPF_PROG_GET_FD_BY_ID: u32 = 13;

#[repr(C)]
#[derive(Default)]
struct GetByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// The leading part of `struct bpf_prog_info`, up to its map ids.
#[repr(C)]
#[derive(Default)]
struct ProgInfoHead {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
}

/// BPF_PROG_GET_FD_BY_ID: a descriptor of the loaded program `id`.
fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetByIdAttr {
        id,
        ..Default::default()
    };
    // SAFETY: attr matches BPF_PROG_GET_FD_BY_ID.
    unsafe { sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) }.map(owned_fd)
}

/// The ids of the maps program `prog_id` uses (BPF_PROG_GET_FD_BY_ID, then
/// BPF_OBJ_GET_INFO_BY_FD): how a program is told to be egressmon's, since
/// its programs use egressmon's pinned maps.
pub fn prog_map_ids(prog_id: u32) -> io::Result<Vec<u32>> {
    let prog = prog_fd_by_id(prog_id)?;
    let mut ids = vec![0u32; 64];
    loop {
        let mut info = ProgInfoHead {
            nr_map_ids: ids.len() as u32,
            map_ids: ids.as_mut_ptr() as u64,
            ..Default::default()
        };
        let mut attr = InfoAttr {
            bpf_fd: prog.as_raw_fd() as u32,
            info_len: std::mem::size_of::<ProgInfoHead>() as u32,
            info: &mut info as *mut ProgInfoHead as u64,
        };
        // SAFETY: attr matches BPF_OBJ_GET_INFO_BY_FD; `info` and `ids`
        // outlive the call, and `ids` has room for `nr_map_ids` ids.
        unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
        let used = info.nr_map_ids as usize;
        if used <= ids.len() {
            ids.truncate(used);
            return Ok(ids);
        }
        ids = vec![0u32; used];
    }
}

/// Size of `struct bpf_prog_info` up to `attach_btf_id` (kernel 5.x-6.x),
/// and the offsets of the fields [`prog_stats`] reads from it.
const PROG_INFO_LEN: usize = 232;
const OFF_ID: usize = 4;
const OFF_NAME: usize = 64;
const OFF_RUN_TIME_NS: usize = 192;
const OFF_RUN_CNT: usize = 200;

/// One program's identity and bpf_stats counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgStats {
    pub id: u32,
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// BPF_PROG_GET_FD_BY_ID + BPF_OBJ_GET_INFO_BY_FD: name, run_time_ns and
/// run_cnt (counted while kernel.bpf_stats_enabled is 1) of program `id`.
pub fn prog_stats(id: u32) -> io::Result<ProgStats> {
    let fd = prog_fd_by_id(id)?;
    let mut info = [0u8; PROG_INFO_LEN];
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: PROG_INFO_LEN as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: attr matches BPF_OBJ_GET_INFO_BY_FD; `info` has `info_len`
    // bytes and outlives the call.
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    Ok(parse_prog_info(&info))
}

fn parse_prog_info(info: &[u8; PROG_INFO_LEN]) -> ProgStats {
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_ne_bytes(info[o..o + 8].try_into().expect("8 bytes"));
    let name = &info[OFF_NAME..OFF_NAME + 16];
    let end = name.iter().position(|&b| b == 0).unwrap_or(16);
    ProgStats {
        id: u32_at(OFF_ID),
        name: String::from_utf8_lossy(&name[..end]).into_owned(),
        run_time_ns: u64_at(OFF_RUN_TIME_NS),
        run_cnt: u64_at(OFF_RUN_CNT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prog_info_fields() {
        let mut info = [0u8; PROG_INFO_LEN];
        info[OFF_ID..OFF_ID + 4].copy_from_slice(&42u32.to_ne_bytes());
        info[OFF_NAME..OFF_NAME + 8].copy_from_slice(b"connect4");
        info[OFF_RUN_TIME_NS..OFF_RUN_TIME_NS + 8].copy_from_slice(&5000u64.to_ne_bytes());
        info[OFF_RUN_CNT..OFF_RUN_CNT + 8].copy_from_slice(&25u64.to_ne_bytes());
        let s = parse_prog_info(&info);
        assert_eq!(
            s,
            ProgStats {
                id: 42,
                name: "connect4".into(),
                run_time_ns: 5000,
                run_cnt: 25
            }
        );
    }

    #[test]
    fn attr_layouts_match_union_bpf_attr() {
        use std::mem::size_of;
        assert_eq!(size_of::<ProgLoadAttr>(), 72);
        assert_eq!(size_of::<ProgAttachAttr>(), 24);
        assert_eq!(size_of::<ProgQueryAttr>(), 32);
        assert_eq!(size_of::<MapCreateAttr>(), 44);
        assert_eq!(size_of::<ProgInfoHead>(), 64);
    }
}
