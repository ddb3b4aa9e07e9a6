//! qcowfs: mount (encrypted) qcow2 images and their backing chains as a plain file with FUSE.
//!
//! Layers, calls going downward only: `cli` → `mount` (daemon, FUSE inodes) → `disk` (guest byte
//! ranges, cluster cache, flush) → `chain` (the stack of images) → `qcow2` / `raw` (formats) →
//! `crypto` and `io` (ciphers, positional host I/O and QEMU-compatible locks).

pub mod audit;
pub mod chain;
pub mod check_key;
pub mod cli;
pub mod crypto;
pub mod disk;
pub mod error;
pub mod fuzz;
pub mod guestfs;
pub mod info;
pub mod io;
pub mod keycheck;
pub mod mount;
pub mod partition;
pub mod qcow2;
pub mod seal;
pub mod secret;
pub mod size;

pub use error::{Error, Problem, Result};
