//! Fuzz target: the HTTP parsers (see egressmon_fuzz::inspect::fuzz::http_target).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    egressmon_fuzz::inspect::fuzz::http_target(data);
});
