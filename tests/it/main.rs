//! The integration tests, one binary: each module is one concern (reads, writes, faults, the
//! guest file commands, ...), all sharing `common`'s image builders, oracles and mount guard, built
//! once. The differential tester, the crash states and the fault states are harnesses of their
//! own (tests/difftest, tests/crash_states, tests/fault_states).
//!
//! The tests of one binary run side by side on the test threads, so nothing here may depend on
//! another test's absence: each builds its images in its own temporary folder, and the one
//! process-wide switch (the kernel's FUSE io_uring parameter) is changed only under `io_uring`'s
//! lock, by tests that hold it throughout.

mod common;

mod audit;
mod bad_input;
mod concurrent_flush;
mod coverage;
mod damaged_writes;
mod deps;
mod fuzz_images;
mod guest_files;
mod host_files;
mod host_full;
mod host_integration;
mod integrity;
mod io_uring;
mod key_discipline;
mod kill_9;
mod layers;
mod luks;
mod memory;
mod mount_states;
mod partition_files;
mod read_matrix;
mod seal;
mod seal_chain;
mod security;
mod snapshot_files;
mod write_path;
