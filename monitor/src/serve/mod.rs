//! Everything the agent hands out: the control socket and /metrics (HTTP,
//! TLS, peer checks), the Prometheus exposition, the JSON log, and the state
//! files that keep all of it exact across restarts; plus the checks that
//! keep the files it writes root's alone.
//!
//! May call: the `agent` (to read the flow table and counters),
//! `pipeline`. Never walks the kernel maps itself.

pub(crate) mod api;
pub(crate) mod escape;
pub(crate) mod jsonl;
pub(crate) mod metrics;
pub(crate) mod peer;
pub(crate) mod private_fs;
pub mod state;
pub(crate) mod web_config;
