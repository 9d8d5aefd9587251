//! The kernel side: loading the programs, attaching them (cgroup hooks and
//! the tc fallback), the pin directory, reading the maps, the programs'
//! diagnostics, Android netd's own counters, waiting at boot for netd's
//! programs (`netd_wait`), and the host facts all of it depends on (kernel
//! version, cgroup2, bpffs).
//!
//! May call: the `bpf_sys` crate (raw bpf(2)), `aya`, monitor-common. Knows
//! nothing of owners, destinations or outputs.

pub mod hooks;
pub(crate) mod kernel;
pub(crate) mod kernel_log;
pub mod netd_stats;
pub(crate) mod netd_wait;
pub(crate) mod pins;
pub mod system;
pub(crate) mod tc;
