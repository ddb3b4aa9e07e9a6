//! The qcow2 format: header, tables, refcounts, mapping guest clusters, reading and writing them.

mod compress;
mod error;
pub mod header;
mod image;
pub mod layout;
mod overlap;
pub mod refcount;
pub mod snapshot;
pub mod table;
#[cfg(test)]
pub(crate) mod tiny;
mod words;
mod write;

pub use error::FormatError;
pub use header::{Compression, Encryption, Header};
pub use image::{Qcow2Image, WriteTarget};
pub use layout::Layout;
pub use table::ClusterSource;
pub use write::{ClusterWrite, Prepared, Staged};
