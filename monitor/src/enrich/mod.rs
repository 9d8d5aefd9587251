//! Where a flow went: host names (SNI, Host header, DNS answers to the uid
//! that asked), the payload class, country and ASN, from the kernel's
//! payload ring through the `inspect` parsers and GeoIP; and what it
//! carried: the device's identifiers found in its cleartext payload.
//!
//! May call: `inspect`, `bpf` (ring buffers), `pipeline::flows` (to fill a
//! record's destination fields).

pub(crate) mod destinations;
pub(crate) mod evidence;
pub(crate) mod geoip;
pub(crate) mod identifiers;
