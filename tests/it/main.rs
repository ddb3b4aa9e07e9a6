//! The integration tests, one binary: each module is one concern (reads, writes, faults, the
//! guest file commands, ...), all sharing `common`'s image builders, oracles and mount guard, built
//! once. The differential tester, the crash states and the fault states are harnesses of their
//! own (tests/difftest, tests/crash_states, tests/fault_states).
//!
//! Each test builds its images in its own temporary folder. Host-wide settings: the kernel's FUSE
//! io_uring parameter is changed only under `io_uring`'s lock; `thread_limit` makes a pids cgroup
//! of its own (on cgroup v2 it enables the pids controller for the root's children). scripts/test.sh
//! still runs the tests one at a time: side by side in one process, a test that signals its daemon
//! by pid, or reopens an image it has just closed, can meet another test's processes (pids wrap at
//! 32768 on a machine like this one, and a fork holds copies of every descriptor until it execs);
//! two runs of the suite with two test threads each failed once that way.

mod common;

mod audit;
mod bad_input;
mod concurrent_flush;
mod coverage;
mod damaged_writes;
mod deps;
mod direct_io;
mod domain;
mod exit_status;
mod fleet;
mod fuzz_images;
mod guest_copy_safety;
mod guest_edits;
mod guest_files;
mod guest_kinds;
mod guest_listing;
mod guest_lvm;
mod guest_xattrs;
mod host_files;
mod host_full;
mod host_integration;
mod integrity;
mod io_uring;
mod key_discipline;
mod kill_9;
mod layers;
mod list;
mod luks;
mod memory;
mod mount_states;
mod package;
mod partition_files;
mod prompt;
mod qemu_check;
mod read_matrix;
mod seal;
mod seal_chain;
mod security;
mod snapshot_files;
mod thread_limit;
mod write_path;
