//! Changing guest files in place, in one command and without root: `qcowfs write`, `edit`,
//! `copy-in`, `rm` and `mkdir` (commands.rs), the jobs of virt-edit, virt-copy-in and virt-rm.
//!
//! The image is opened writable under QEMU's write lock (a running VM's disk is refused; there
//! is no `--force-share` for writes), the key is checked as every writing command checks it
//! (a wrong or unverifiable key writes nothing), and the file system is changed by its own
//! library through the disk layer, so the copy-on-write, encryption and commit pipeline of a
//! mount (and the crash-state and fault-state proofs over it) cover every byte: ext2/3/4 by
//! rust-fs-ext4 (JBD2 transactions), XFS by rust-fs-xfs (log records, then a clean unmount),
//! FAT by fstool (no journal: as any FAT).
//! A file system that was not cleanly unmounted, or is marked in error, is refused before
//! anything is written (open.rs). Nothing here writes file-system structures itself.

mod commands;
mod editor;
mod ext;
mod fat;
mod open;
mod xfs;

pub use commands::{copy_in, edit, mkdir, remove, write};
pub use open::{EditOptions, GuestEditor};
