//! egressmon: which app, or which part of the firmware, sends data off this
//! device, and to whom. Kernel programs count every connect, datagram and byte
//! per uid and destination; this library loads them and turns the counters
//! into flows with owners.

pub mod agent;
pub mod bpf;
pub mod cli;
pub mod enrich;
pub mod identity;
pub mod pipeline;
pub mod serve;

/// The raw bpf(2) layer (the egressmon-bpf-sys crate), under its old path.
pub use bpf_sys;

/// The payload parsers (the egressmon-inspect crate), under their old path.
pub use inspect;

/// The eBPF object built from monitor-ebpf by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));
