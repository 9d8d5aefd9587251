//! egressmon: which app, or which part of the firmware, sends data off this
//! device, and to whom. Kernel programs count every connect, datagram and byte
//! per uid and destination; this library loads them and turns the counters
//! into flows with owners.

pub mod agent;
pub mod api;
pub mod cli;
pub mod client;
pub mod destinations;
pub mod events;
pub mod flows;
pub mod geoip;
pub mod hooks;
pub mod jsonl;
pub mod kernel;
pub mod kernel_log;
pub mod metrics;
pub mod netd_stats;
pub mod owners;
pub mod peer;
pub mod private_fs;
pub mod process;
pub mod rules;
pub mod state;
pub mod system;
pub mod tc;
pub mod text;
pub mod top;
pub mod tracker;
pub mod tui;
pub mod vocab;
pub mod web_config;

/// The raw bpf(2) layer (the egressmon-bpf-sys crate), under its old path.
pub use bpf_sys;

/// The payload parsers (the egressmon-inspect crate), under their old path.
pub use inspect;

/// The eBPF object built from monitor-ebpf by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));
