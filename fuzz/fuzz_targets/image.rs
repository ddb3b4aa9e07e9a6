//! cargo-fuzz target: arbitrary bytes as a qcow2 image, opened, read and written.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir();
    let _ = qcowfs::fuzz::read_image(&dir, data);
    let _ = qcowfs::fuzz::write_image(&dir, data);
});
