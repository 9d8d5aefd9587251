//! Fuzz target: the identifier matcher (see egressmon_fuzz::inspect::fuzz::leaks_target).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    egressmon_fuzz::inspect::fuzz::leaks_target(data);
});
