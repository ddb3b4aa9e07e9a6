//! qcowfs: mount (encrypted) qcow2 images and their backing chains as a plain file with FUSE.
//!
//! Layers, calls going downward only (tests/it/layers.rs keeps it so; docs/ARCHITECTURE.md draws it):
//! `cli` → `mount` (daemon, FUSE requests, transports) and `cmd` (info, check-key, seal, audit,
//! guest files) → `disk` (guest byte ranges, block cache, flush writer, partition tables) and `keys`
//! (passphrase sources, the key check) → `chain` (the stack of images, qcow2 or raw) → `qcow2` (the
//! format) → `crypto` and `io` (ciphers and key memory, the host I/O seam and QEMU's locks).

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
