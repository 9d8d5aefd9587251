//! The network parsers of egressmon (monitor/src/inspect), compiled on their
//! own for fuzzing: the same source files, without the agent around them.

#[path = "../../src/inspect/mod.rs"]
pub mod inspect;
