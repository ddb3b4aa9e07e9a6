//! Helpers shared by the integration tests: bounded external commands, qemu image builders, the
//! `qemu-img convert -O raw` oracle, byte comparison that names the first differing offset, and a
//! `Mount` guard that never leaves a FUSE mount behind; `qemu-img check` as the consistency oracle
//! and the disk layer opened in-process.
//!
//! QEMU is the oracle and is required: a missing `qemu-img` or `qemu-io` fails the test, it never
//! skips it. Every qemu command line a test runs is printed (shown only when the test fails: the
//! steps to reproduce).

mod check;
mod compare;
mod data;
mod disk;
mod fuse;
mod guest;
mod hostile;
mod image;
mod mmap;
mod proc;
mod run;
mod tmpfs;
mod uring;
mod users;
mod writes;

// Each test crate uses a different part; an unused glob is not a mistake here.
#[allow(unused_imports)]
pub use check::*;
#[allow(unused_imports)]
pub use compare::*;
#[allow(unused_imports)]
pub use data::*;
#[allow(unused_imports)]
pub use disk::*;
#[allow(unused_imports)]
pub use fuse::*;
#[allow(unused_imports)]
pub use guest::*;
#[allow(unused_imports)]
pub use hostile::*;
#[allow(unused_imports)]
pub use image::*;
#[allow(unused_imports)]
pub use mmap::*;
#[allow(unused_imports)]
pub use proc::*;
#[allow(unused_imports)]
pub use run::*;

pub use tmpfs::*;
#[allow(unused_imports)]
pub use uring::*;
#[allow(unused_imports)]
pub use users::*;

pub use writes::*;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
pub const TIB: u64 = 1024 * GIB;
