//! qcowfs: mount (encrypted) qcow2 images and their backing chains as a plain file with FUSE.
//!
//! Layers, calls going downward only: `cli` → `mount` (daemon, FUSE inodes) → `disk` (guest byte
//! ranges, cluster cache, flush) → `chain` (the stack of images) → `qcow2` / `raw` (formats) →
//! `crypto` and `io` (ciphers, positional host I/O and QEMU-compatible locks).

pub mod chain;
pub mod cli;
pub mod cmd;
pub mod crypto;
pub mod disk;
pub mod error;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod io;
pub mod keys;
pub mod mount;
pub(crate) mod qcow2;

pub use error::{Error, Problem, Result};
