//! The one flow table: each kernel flow tracked with its counters,
//! described once per change (owner, sender, destination, payload) into the
//! contract's `FlowRecord`, judged by the alert rules, and turned into log
//! events. Every output reads it; the contract's words live in `vocab`.
//!
//! May call: `identity` (owners), `enrich` (destinations), `serve::jsonl`
//! (the typed log events it emits). Never reads the kernel itself: the agent
//! hands it each pass's flows.

pub mod flows;
pub mod rules;
pub(crate) mod tracker;
pub mod vocab;
