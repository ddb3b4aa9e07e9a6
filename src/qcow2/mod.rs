//! The qcow2 format: header, tables, refcounts, mapping guest clusters, reading and writing them.

mod alloc;
mod commit;
mod compress;
mod data_refs;
pub(crate) mod error;
pub mod header;
mod header_write;
mod image;
mod l2_update;
pub mod layout;
mod memory;
mod overlap;
mod pinned_lru;
#[cfg(test)]
mod qemu_tools;
pub mod refcount;
pub mod snapshot;
pub mod snapshot_l1;
pub mod table;
#[cfg(test)]
pub(crate) mod tiny;
mod words;

pub use commit::{ClusterWrite, Durability};
pub use error::FormatError;
pub use header::{Compression, Encryption, Header};
pub use image::{Qcow2Image, WriteTarget};
pub use memory::share_metadata_budget;
pub use table::ClusterSource;
