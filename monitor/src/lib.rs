//! egressmon: which app, or which part of the firmware, sends data off this
//! device, and to whom. Kernel programs count every connect, datagram and byte
//! per uid and destination; this library loads them and turns the counters
//! into flows with owners.
//!
//! Everything is `pub(crate)` unless the `egressmon` binary (`cli`) or the
//! integration tests (monitor/tests) use it: the flow record and its words,
//! the control socket's client, the host facts and pin directory the tests
//! set up, netd's counters, and the state files `detach` removes.

pub(crate) mod agent;
pub mod block;
pub mod bpf;
pub(crate) mod capture;
pub mod cli;
pub(crate) mod enrich;
pub(crate) mod history;
pub mod identity;
pub mod pipeline;
pub mod serve;

/// The raw bpf(2) layer (the egressmon-bpf-sys crate), under its old path.
pub use bpf_sys;

/// The eBPF object built from monitor-ebpf by build.rs.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));
