//! The extended attributes and ACLs of ext2/3/4 entries, which ext4-view does not read: read by
//! rust-fs-ext4 (the crate that also edits ext4, edit/ext.rs) over the same read-only byte
//! range, opened the first time an entry has any. ext4 stores a POSIX ACL in its own compact
//! form; it is handed on in the kernel's `posix_acl_xattr` form, as `getfattr` shows it.

use std::sync::{Arc, OnceLock};

use fs_ext4::acl::{self, AclTag};
use fs_ext4::fs::Filesystem;
use fs_ext4::xattr;

use super::device::RangeDevice;
use super::tree::{shown, FsError, FsResult, Xattr};
use super::xattrs::{vfs_acl, AclEntry, MAX_VALUE};

/// ext2/3/4 attributes, read on demand.
pub(crate) struct ExtXattrs {
    device: Arc<RangeDevice>,
    /// rust-fs-ext4's view of the file system, or why it could not open it.
    fs: OnceLock<Result<Filesystem, String>>,
}

impl ExtXattrs {
    pub fn new(device: Arc<RangeDevice>) -> ExtXattrs {
        ExtXattrs {
            device,
            fs: OnceLock::new(),
        }
    }

    fn fs(&self) -> FsResult<&Filesystem> {
        let fs = self.fs.get_or_init(|| {
            let dev = Arc::new(fs_ext4::fs_core_bridge::CoreDevice::new(
                self.device.clone(),
            ));
            Filesystem::mount(dev).map_err(|e| self.device.error(e).to_string())
        });
        fs.as_ref().map_err(|m| FsError::Library(m.clone()))
    }

    /// The attributes of inode `number`, or of the entry at `path` when its number is unknown.
    pub fn read(&self, number: Option<u32>, path: &[u8]) -> FsResult<Vec<Xattr>> {
        let fs = self.fs()?;
        let err = |e: fs_ext4::error::Error| self.device.error(e);
        let ino = match number {
            Some(n) => n,
            None => fs.lookup_path_bytes(path).map_err(err)?,
        };
        let (inode, raw) = fs.read_inode_verified(ino).map_err(err)?;
        // The names alone first: the library checks the attribute block's checksum there (and
        // not in `read_all`, which reads the values without resolving EA inodes).
        xattr::list_names(fs, &inode, &raw).map_err(err)?;
        let stored = xattr::read_all(
            fs.dev.as_ref(),
            &inode,
            &raw,
            fs.sb.inode_size,
            fs.sb.block_size(),
        )
        .map_err(err)?;
        let mut out = Vec::with_capacity(stored.len());
        // `system.data` holds an inline-data file's tail: the file's bytes, not an attribute
        // (the kernel does not list it).
        for entry in stored.into_iter().filter(|e| e.name != "system.data") {
            let mut value = entry.value;
            if entry.value_inum != 0 {
                // A value in its own inode: bounded before it is read (a hostile size would be
                // gigabytes), as the kernel bounds every value.
                if entry.value_size as usize > MAX_VALUE {
                    return Err(self.device.error(format!(
                        "inode {ino}: attribute {} claims {} bytes",
                        shown(entry.name.as_bytes()),
                        entry.value_size
                    )));
                }
                value = fs_ext4::ea_inode::read_value_inode(fs, entry.value_inum, entry.value_size)
                    .map_err(err)?;
            }
            if entry.name.starts_with("system.posix_acl_") {
                let entries = acl::decode(&value).map_err(err)?;
                value = vfs_acl(entries.iter().map(|e| AclEntry {
                    tag: tag_bits(e.tag),
                    perm: e.perm,
                    id: e.id,
                }));
            }
            out.push(Xattr {
                name: entry.name.into_bytes(),
                value,
            });
        }
        Ok(out)
    }
}

/// The POSIX tag value of an ACL entry (ext4 stores the same numbers).
fn tag_bits(tag: AclTag) -> u16 {
    tag as u16
}
