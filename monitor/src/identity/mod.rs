//! Who sent a flow: the first sender's pid, comm and cgroup (the kernel's
//! new-flow ring), what /proc says of that process, and the owner of a uid
//! (app, preinstalled package, platform daemon) from the device's sources.
//!
//! May call: `bpf` (ring buffers), `pipeline::vocab`. Knows nothing of
//! destinations or outputs.

pub(crate) mod events;
pub mod owners;
pub mod process;
