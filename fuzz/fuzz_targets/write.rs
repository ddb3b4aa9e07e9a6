//! cargo-fuzz target: a write through an arbitrary image (the input's last 8 bytes place it) is
//! refused or changes exactly its bytes (qcowfs::fuzz::check_write); a misplaced write aborts.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir();
    if let Err(misplaced) = qcowfs::fuzz::check_write(&dir, data) {
        panic!("{misplaced}");
    }
});
