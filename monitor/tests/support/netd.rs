//! Reproduces Android netd's attachments on a test cgroup: tiny programs
//! attached with BPF_PROG_ATTACH and flags 0 (exclusive), exactly as netd
//! attaches its cgroup programs at the root cgroup; the skb egress one counts
//! bytes per uid into a stats map of netd's layout, as netd's does. Detached
//! on drop. `Device` puts together what each Android release holds.

use egressmon::bpf_sys;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

pub const PROG_TYPE_CGROUP_SKB: u32 = bpf_sys::BPF_PROG_TYPE_CGROUP_SKB;
pub const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = bpf_sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR;
pub const PROG_TYPE_CGROUP_SOCK: u32 = bpf_sys::BPF_PROG_TYPE_CGROUP_SOCK;
pub const ATTACH_INET_SOCK_CREATE: u32 = 2;
pub const ATTACH_UDP4_RECVMSG: u32 = 19;
pub const ATTACH_UDP6_RECVMSG: u32 = 20;

/// `r0 = 1; exit`: allow everything.
fn load_allow(prog_type: u32, attach_type: u32, name: &str) -> OwnedFd {
    bpf_sys::prog_load_allow(prog_type, attach_type, name)
        .unwrap_or_else(|e| panic!("loading the netd stand-in {name}: {e}"))
}

/// One eBPF instruction.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    code as u64
        | ((dst | (src << 4)) as u64) << 8
        | ((off as u16) as u64) << 16
        | (imm as u32 as u64) << 32
}

/// `r{dst} = map` (a two-instruction load of a map descriptor).
fn load_map(dst: u8, map: i32) -> [u64; 2] {
    [insn(0x18, dst, 1, 0, map), 0]
}

/// What netd's cgroup skb egress program does for accounting: per packet,
/// `stats[{socket uid, tag 0, counterSet 0, ifindex}]` gets txPackets += 1
/// and txBytes += skb->len (atomically); then it allows the packet.
fn load_netd_egress(stats_map: i32, name: &str) -> OwnedFd {
    const MOV_REG: u8 = 0xbf;
    const MOV_IMM: u8 = 0xb7;
    const ADD_IMM: u8 = 0x07;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    const STX_W: u8 = 0x63;
    const ST_W: u8 = 0x62;
    const ST_DW: u8 = 0x7a;
    const LDX_W: u8 = 0x61;
    const JNE_IMM: u8 = 0x55;
    const JEQ_IMM: u8 = 0x15;
    const ATOMIC_ADD_DW: u8 = 0xdb;
    const GET_SOCKET_UID: i32 = 47;
    const MAP_LOOKUP: i32 = 1;
    const MAP_UPDATE: i32 = 2;
    const SKB_IFINDEX: i16 = 40;
    let mut p: Vec<u64> = vec![
        insn(MOV_REG, 6, 1, 0, 0),           // r6 = skb
        insn(CALL, 0, 0, 0, GET_SOCKET_UID), // r0 = uid
        insn(STX_W, 10, 0, -16, 0),          // key.uid
        insn(ST_W, 10, 0, -12, 0),           // key.tag = 0
        insn(ST_W, 10, 0, -8, 0),            // key.counterSet = 0
        insn(LDX_W, 1, 6, SKB_IFINDEX, 0),   // r1 = skb->ifindex
        insn(STX_W, 10, 1, -4, 0),           // key.ifaceIndex
        insn(LDX_W, 7, 6, 0, 0),             // r7 = skb->len
    ];
    let lookup = |p: &mut Vec<u64>| {
        p.extend(load_map(1, stats_map));
        p.push(insn(MOV_REG, 2, 10, 0, 0));
        p.push(insn(ADD_IMM, 2, 0, 0, -16));
        p.push(insn(CALL, 0, 0, 0, MAP_LOOKUP));
    };
    lookup(&mut p);
    let found_jump = p.len();
    p.push(0); // if r0 != 0 goto add (patched below)
    for off in [-48, -40, -32, -24] {
        p.push(insn(ST_DW, 10, 0, off, 0)); // a zero StatsValue
    }
    p.extend(load_map(1, stats_map));
    p.push(insn(MOV_REG, 2, 10, 0, 0));
    p.push(insn(ADD_IMM, 2, 0, 0, -16));
    p.push(insn(MOV_REG, 3, 10, 0, 0));
    p.push(insn(ADD_IMM, 3, 0, 0, -48));
    p.push(insn(MOV_IMM, 4, 0, 0, 1)); // BPF_NOEXIST
    p.push(insn(CALL, 0, 0, 0, MAP_UPDATE));
    lookup(&mut p);
    let missing_jump = p.len();
    p.push(0); // if r0 == 0 goto out (patched below)
    let add = p.len();
    p.push(insn(MOV_IMM, 1, 0, 0, 1));
    p.push(insn(ATOMIC_ADD_DW, 0, 1, 16, 0)); // txPackets += 1
    p.push(insn(ATOMIC_ADD_DW, 0, 7, 24, 0)); // txBytes += len
    let out = p.len();
    p.push(insn(MOV_IMM, 0, 0, 0, 1));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p[found_jump] = insn(JNE_IMM, 0, 0, (add - found_jump - 1) as i16, 0);
    p[missing_jump] = insn(JEQ_IMM, 0, 0, (out - missing_jump - 1) as i16, 0);
    load(PROG_TYPE_CGROUP_SKB, 1, name, &p)
}

fn load(prog_type: u32, attach_type: u32, name: &str, insns: &[u64]) -> OwnedFd {
    // On a refusal the error carries the verifier's log.
    bpf_sys::prog_load(prog_type, attach_type, name, insns)
        .unwrap_or_else(|e| panic!("loading the netd stand-in {name}: {e}"))
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
        ExclusiveProgram::attach_loaded(cgroup, prog, attach_type)
    }

    /// netd's skb egress program, counting into `stats_map` (netd's layout).
    pub fn attach_netd_egress(cgroup: &Path, stats_map: BorrowedFd<'_>) -> ExclusiveProgram {
        let prog = load_netd_egress(stats_map.as_raw_fd(), "netd_sim_egress");
        ExclusiveProgram::attach_loaded(cgroup, prog, 1)
    }

    fn attach_loaded(cgroup: &Path, prog: OwnedFd, attach_type: u32) -> ExclusiveProgram {
        let dir = std::fs::File::open(cgroup).unwrap();
        bpf_sys::prog_attach(dir.as_fd(), prog.as_fd(), attach_type, 0)
            .expect("BPF_PROG_ATTACH flags 0");
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
            let _ = bpf_sys::prog_detach(dir.as_fd(), self.prog.as_fd(), self.attach_type);
        }
    }
}

/// What netd holds at the root cgroup on a given kind of device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// Android 9 to 14: cgroup skb ingress and egress, inet socket create.
    Android12To14,
    /// Android 15 and later: also connect4/6, sendmsg4/6, recvmsg4/6.
    Android15,
    /// A Linux host: nothing held.
    Linux,
}

impl Device {
    /// netd's programs on `cgroup`, its skb egress one counting into
    /// `stats_map`. Attachments are removed when the vector drops.
    pub fn hold(self, cgroup: &Path, stats_map: Option<BorrowedFd<'_>>) -> Vec<ExclusiveProgram> {
        if self == Device::Linux {
            return Vec::new();
        }
        let mut held = vec![
            ExclusiveProgram::attach_netd_egress(cgroup, stats_map.expect("netd's stats map")),
            ExclusiveProgram::attach(cgroup, PROG_TYPE_CGROUP_SKB, 0, "netd_sim_ingr"),
            ExclusiveProgram::attach(
                cgroup,
                PROG_TYPE_CGROUP_SOCK,
                ATTACH_INET_SOCK_CREATE,
                "netd_sim_create",
            ),
        ];
        if self == Device::Android15 {
            for (attach_type, name) in [
                (10, "netd_sim_conn4"),
                (11, "netd_sim_conn6"),
                (14, "netd_sim_send4"),
                (15, "netd_sim_send6"),
                (ATTACH_UDP4_RECVMSG, "netd_sim_recv4"),
                (ATTACH_UDP6_RECVMSG, "netd_sim_recv6"),
            ] {
                held.push(ExclusiveProgram::attach(
                    cgroup,
                    PROG_TYPE_CGROUP_SOCK_ADDR,
                    attach_type,
                    name,
                ));
            }
        }
        held
    }
}
