//! Fuzz target: the TLS parsers (see egressmon::inspect::fuzz::tls_target).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    egressmon::inspect::fuzz::tls_target(data);
});
