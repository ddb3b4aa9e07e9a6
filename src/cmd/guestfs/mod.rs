//! Files of the guest, read in-process from the decrypted chain: `qcowfs ls`, `cat` and
//! `copy-out`. No FUSE, no root, no loop device: the chain is opened read-only (QEMU's reader
//! locks, or none with `--force-share`), the file system is found on the disk or one of its
//! partitions by its magic (detect.rs), and ext2/3/4 is read by the `ext4-view` crate through a
//! byte range of the disk (reader.rs); open.rs holds `GuestFs`, the open file system every command
//! reads through. Listing and streaming are in list.rs; copying out walks the
//! tree (walk.rs) into a host folder (copy.rs) or a tar stream (tar.rs), each file's data ranges
//! (data.rs) found from its block map (layout.rs, extents.rs) so holes stay holes.

mod backends;
mod btrfs;
mod choose;
mod copy;
mod data;
mod detect;
mod device;
pub mod edit;
pub(crate) mod error;
mod ext;
mod ext_xattrs;
mod extents;
mod fat;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod layout;
mod list;
mod lvm;
mod lvm_bounds;
mod ntfs;
mod open;
mod read_cache;
mod reader;
mod resolve;
mod sparse;
mod tar;
mod tree;
mod walk;
mod xattrs;
mod xfs;

pub use choose::Wanted;
pub use copy::copy_out;
pub use error::{Contents, GuestError, LayoutError};
pub use list::{cat, ls, LsOptions};
pub use open::{GuestFs, GuestOptions};
pub use tar::copy_out_tar;
pub use walk::CopyReport;
