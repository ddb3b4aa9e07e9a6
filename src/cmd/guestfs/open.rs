//! Opening a guest file system: the chain read-only, the key checked, the partition chosen, and
//! the file system found there read in-process (`GuestFs`, over the [`Tree`] of backends.rs),
//! its paths resolved by resolve.rs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::backends;
use super::choose::{choose, Volume, Wanted, AES_HINT};
use super::detect;
use super::error::{Contents, GuestError};
use super::read_cache::ReadCache;
use super::resolve;
use super::tree::{shown, FsError, GuestPath, Meta, Node, Tree, Xattr};
use super::xattrs::within_bounds;
use crate::chain::{Chain, KeyRing, OpenOptions};
use crate::disk::{BlockDevice, Disk, DiskOptions};
use crate::error::{Error, Result};
use crate::keys::check::KeyCheck;

/// Memory for decrypted clusters while reading guest files (ext4-view caches blocks itself).
const CACHE_BYTES: u64 = 16 << 20;

/// Memory for the blocks the libraries' small reads come from (read_cache.rs).
const READ_CACHE_BYTES: u64 = 16 << 20;

/// How to open the image for reading guest files.
#[derive(Debug, Default)]
pub struct GuestOptions {
    /// Take no QEMU locks (the image may be in use by a running VM).
    pub force_share: bool,
    /// Backing files must lie in these folders (`--backing-within`).
    pub backing_within: Vec<PathBuf>,
    /// The partition to read (Linux numbering), or None to find the file system.
    pub partition: Option<u32>,
    /// The LVM2 logical volume to read (`VG/LV`), or None to find the file system.
    pub lv: Option<String>,
    /// The btrfs subvolume to read (path or id), or None for the default one.
    pub subvolume: Option<String>,
}

/// The guest file system of an image, open for reading.
pub struct GuestFs {
    image: PathBuf,
    tree: Box<dyn Tree>,
    /// The bytes the file system lies in: no sound tree holds more data, nor more entries
    /// than fit in them (walk.rs's bounds).
    fs_bytes: u64,
}

impl GuestFs {
    /// Open `image` read-only and the guest file system on it (see [`GuestOptions`]).
    pub fn open(image: &Path, keys: &KeyRing, opts: &GuestOptions) -> Result<GuestFs> {
        let chain = Chain::open(
            image,
            keys,
            OpenOptions {
                writable: false,
                force_share: opts.force_share,
                without_keys: false,
                keep_rejected_keys: false,
                backing_within: opts.backing_within.clone(),
                record: None,
                faults: None,
            },
        )?;
        // A wrong key is named first: read as noise, it would look like a disk with no file system.
        let keys = KeyCheck::of(&chain)?;
        keys.require_right()?;
        // Only an unchecked legacy AES key can still explain a disk that does not read.
        let aes = keys.aes_unverified();
        let disk: Arc<dyn BlockDevice> = Arc::new(Disk::new(
            chain,
            DiskOptions {
                cache_size: CACHE_BYTES,
                read_only: true,
            },
        ));
        let disk: Arc<dyn BlockDevice> = Arc::new(ReadCache::new(disk, READ_CACHE_BYTES));
        let wanted = Wanted {
            partition: opts.partition,
            lv: opts.lv.as_deref(),
        };
        let volume = choose(&disk, wanted, aes).map_err(|e| e.at_image(image))?;
        let hint = match aes {
            true => AES_HINT,
            false => "",
        };
        GuestFs::load(image, volume, opts.subvolume.as_deref(), hint)
    }

    /// The file system in `volume`, of the kind its first bytes say; `subvolume` of btrfs;
    /// `hint` is added to a refusal; `image` named in errors.
    pub(super) fn load(
        image: &Path,
        volume: Volume,
        subvolume: Option<&str>,
        hint: &'static str,
    ) -> Result<GuestFs> {
        let Volume {
            view,
            device: disk,
            start,
            len,
            ..
        } = volume;
        let found = detect::detect(disk.as_ref(), start, len)?;
        if subvolume.is_some() && found != Contents::Btrfs {
            let e = GuestError::NoSubvolumes(found.name());
            return Err(Error::new(image, e));
        }
        let tree = backends::load(found, disk, start, len, subvolume).map_err(|e| match e {
            FsError::Disk(e) => e,
            FsError::Guest(g) => Error::new(image, g),
            FsError::Ext4(source) => Error::new(image, GuestError::Load { view, source, hint }),
            FsError::Library(message) => Error::new(
                image,
                GuestError::LoadFs {
                    fs: backends::name(found),
                    view,
                    message,
                    hint,
                },
            ),
        })?;
        Ok(GuestFs {
            image: image.to_path_buf(),
            tree,
            fs_bytes: len,
        })
    }

    /// The same file system with no entry numbers known, as when qcowfs cannot read an ext
    /// file system's inodes itself (tests of the walk's bounds without them).
    #[cfg(test)]
    pub(super) fn without_layout(mut self) -> Self {
        self.tree = Box::new(backends::NoIds(self.tree));
        self
    }

    /// The image, for messages.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// How many bytes the file system lies in.
    pub(crate) fn fs_bytes(&self) -> u64 {
        self.fs_bytes
    }

    pub(crate) fn tree(&self) -> &dyn Tree {
        self.tree.as_ref()
    }

    /// The entry guest `path` names (absolute, checked), a final symlink followed when
    /// `follow_last`: its resolved path and metadata.
    pub(crate) fn resolve(&self, path: &[u8], follow_last: bool) -> Result<(GuestPath, Meta)> {
        if !path.starts_with(b"/") {
            return Err(Error::new(
                &self.image,
                GuestError::NotAbsolute(shown(path)),
            ));
        }
        resolve::resolve(self.tree(), path, follow_last).map_err(|e| self.error(path, e))
    }

    /// Hand each entry of folder `dir` (resolved, its metadata `meta`) but `.` and `..` to
    /// `each`: its name, path and metadata (a final symlink not followed). A failure to read
    /// the folder names it as `shown_as` (what the user typed, for `ls`).
    pub(crate) fn for_each_child(
        &self,
        dir: &GuestPath,
        meta: &Meta,
        shown_as: &[u8],
        mut each: impl FnMut(Vec<u8>, GuestPath, Meta) -> Result<()>,
    ) -> Result<()> {
        // Our own errors from `each` pass through the tree's callback unchanged.
        let mut failed = None;
        let node = Node { path: dir, meta };
        let read = self.tree.read_dir(node, &mut |name, m| {
            let child = dir.join(&name);
            each(name, child, m).map_err(|e| {
                failed = Some(e);
                FsError::Library(String::new())
            })
        });
        match (read, failed) {
            (_, Some(e)) => Err(e),
            (Err(e), None) => Err(self.error(shown_as, e)),
            (Ok(()), None) => Ok(()),
        }
    }

    /// The extended attributes and ACLs of `path` (its metadata `meta`) that a copy carries.
    pub(crate) fn xattrs(&self, path: &GuestPath, meta: &Meta) -> Result<Vec<Xattr>> {
        let attrs = self
            .tree
            .xattrs(Node { path, meta })
            .map_err(|e| self.error(path.as_bytes(), e))?;
        match within_bounds(&attrs) {
            true => Ok(attrs),
            false => Err(self.guest_error(GuestError::BadXattrs(shown(path.as_bytes())))),
        }
    }

    /// The target of symlink `path` (as stored, never resolved).
    pub(crate) fn read_link(&self, path: &GuestPath, meta: &Meta) -> Result<Vec<u8>> {
        resolve::link_target(self.tree(), Node { path, meta })
            .map_err(|e| self.error(path.as_bytes(), e))
    }

    /// An error from the file system about guest `path`, naming the image and the path.
    pub(crate) fn error(&self, path: &[u8], e: FsError) -> Error {
        match e {
            FsError::Disk(e) => e,
            FsError::Guest(g) => Error::new(&self.image, g),
            FsError::Ext4(source) => Error::new(
                &self.image,
                GuestError::Ext4 {
                    path: shown(path),
                    source,
                },
            ),
            FsError::Library(message) => Error::new(
                &self.image,
                GuestError::Library {
                    fs: self.tree.name(),
                    path: shown(path),
                    message,
                },
            ),
        }
    }

    /// An error of ours about the guest, naming the image.
    pub(crate) fn guest_error(&self, e: GuestError) -> Error {
        Error::new(&self.image, e)
    }
}
