//! The network parsers of egressmon (the egressmon-inspect crate in
//! monitor/inspect, with its fuzz entry points), for the fuzz targets.

pub use inspect;
