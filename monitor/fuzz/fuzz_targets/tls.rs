//! Fuzz target: the TLS parsers (see egressmon_fuzz::inspect::fuzz::tls_target).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    egressmon_fuzz::inspect::fuzz::tls_target(data);
});
