//! cargo-fuzz target: arbitrary bytes as an ext2/3/4 file system in memory, listed, read and
//! copied out (tar stream and host folder) as `qcowfs ls`, `cat` and `copy-out` do.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = qcowfs::cmd::guestfs::fuzzing::guest_bytes(data, &std::env::temp_dir());
});
