//! Opening a guest file system: the chain read-only, the key checked, the partition chosen, and
//! ext2/3/4 mounted in-process over a byte range of the disk (`GuestFs`).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ext4_view::{Ext4, Ext4Error, Metadata};

use super::detect;
use super::error::{Contents, GuestError};
use super::extents;
use super::layout::{self, RawInode};
use super::reader;
use crate::chain::{Chain, KeyRing, OpenOptions};
use crate::disk::partition::read_table;
use crate::disk::{BlockDevice, Disk, DiskOptions};
use crate::error::{Error, Result};
use crate::keys::check::KeyCheck;
use crate::qcow2::Encryption;

/// Memory for decrypted clusters while reading guest files (ext4-view caches blocks itself).
const CACHE_BYTES: u64 = 16 << 20;

/// Said when a chain with a legacy AES layer shows no readable file system.
const AES_HINT: &str = "; or the passphrase is wrong (legacy AES cannot check it)";

/// A guest path (bytes) as terminal-safe text.
pub(crate) fn shown(path: &[u8]) -> String {
    crate::error::escaped(Path::new(OsStr::from_bytes(path)))
}

/// How to open the image for reading guest files.
#[derive(Debug, Default)]
pub struct GuestOptions {
    /// Take no QEMU locks (the image may be in use by a running VM).
    pub force_share: bool,
    /// Backing files must lie in these folders (`--backing-within`).
    pub backing_within: Vec<PathBuf>,
    /// The partition to read (Linux numbering), or None to find the file system.
    pub partition: Option<u32>,
}

/// The guest file system of an image, open for reading.
pub struct GuestFs {
    image: PathBuf,
    fs: Ext4,
    /// The superblock's inode count: no sound tree has more directories (copy.rs's loop bound).
    inodes: u64,
    /// The bytes the file system lies in: no sound tree holds more data, nor more entries
    /// than fit in them (walk.rs's bounds).
    fs_bytes: u64,
    /// Inode numbers and block maps, read by qcowfs itself where it can (layout.rs).
    layout: Option<layout::Layout>,
}

impl GuestFs {
    /// Open `image` read-only and the ext2/3/4 file system on it (see [`GuestOptions`]).
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
        let aes = keys
            .layers
            .iter()
            .any(|l| l.encryption == Encryption::Aes && !l.verdict.is_verified());
        let disk: Arc<dyn BlockDevice> = Arc::new(Disk::new(
            chain,
            DiskOptions {
                cache_size: CACHE_BYTES,
                read_only: true,
            },
        ));
        let (view, start, len) =
            choose(disk.as_ref(), opts.partition, aes).map_err(|e| e.at_image(image))?;
        let hint = match aes {
            true => AES_HINT,
            false => "",
        };
        GuestFs::load(image, disk, view, start, len, hint)
    }

    /// The same file system read through `ext4-view` alone, as when qcowfs cannot read its
    /// block maps itself (tests of that fallback).
    #[cfg(test)]
    pub(super) fn without_layout(mut self) -> Self {
        self.layout = None;
        self
    }

    /// The file system in `len` bytes of `disk` from `start` (`view` names them; `hint` is
    /// added to a refusal), `image` named in errors.
    pub(super) fn load(
        image: &Path,
        disk: Arc<dyn BlockDevice>,
        view: String,
        start: u64,
        len: u64,
        hint: &'static str,
    ) -> Result<GuestFs> {
        let mut sb = [0u8; 1024];
        disk.read_at(start + 1024, &mut sb)?;
        let inodes = check_superblock(&sb, len).map_err(|e| Error::new(image, e))?;
        let layout = layout::Layout::load(disk.clone(), start, len);
        let reader = reader::RangeReader::new(disk, start, len);
        let fs = Ext4::load(Box::new(reader)).map_err(|source| {
            ext4_error(image, source, |source| GuestError::Load {
                view,
                source,
                hint,
            })
        })?;
        Ok(GuestFs {
            image: image.to_path_buf(),
            fs,
            inodes,
            fs_bytes: len,
            layout,
        })
    }

    /// The image, for messages.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// How many inodes the file system has.
    pub(crate) fn inode_count(&self) -> u64 {
        self.inodes
    }

    /// How many bytes the file system lies in.
    pub(crate) fn fs_bytes(&self) -> u64 {
        self.fs_bytes
    }

    pub(crate) fn ext4(&self) -> &Ext4 {
        &self.fs
    }

    pub(crate) fn layout(&self) -> Option<&layout::Layout> {
        self.layout.as_ref()
    }

    /// Inode `number` as qcowfs reads it, if it agrees with ext4-view's `meta` for the same
    /// entry (else None: the entry is copied without the inode's help).
    pub(crate) fn inode(&self, number: Option<u32>, meta: &Metadata) -> Option<RawInode> {
        let inode = self.layout.as_ref()?.inode(number?).ok()?;
        inode.agrees(meta).then_some(inode)
    }

    /// The inode number of guest `path` (`meta`: its metadata, a final symlink followed or not
    /// as the caller chose), found by name from the root along the path ext4-view resolves;
    /// None for a symlink or when qcowfs cannot tell.
    pub(crate) fn inode_of(&self, path: &ext4_view::PathBuf, meta: &Metadata) -> Option<u32> {
        let layout = self.layout.as_ref()?;
        // A symlink is copied as itself: no inode of it is needed.
        if meta.is_symlink() {
            return None;
        }
        let resolved = self.fs.canonicalize(path).ok()?;
        let mut number = ROOT_INODE;
        for c in resolved.components() {
            let ext4_view::Component::Normal(name) = c else {
                continue;
            };
            let dir = layout.inode(number).ok()?;
            let entries = extents::dir_entries(layout, &dir, DIR_SCAN_LIMIT).ok()?;
            number = entries.into_iter().find(|(n, _)| n == name.as_ref())?.1;
        }
        Some(number)
    }

    /// An error about guest `path` from ext4-view, naming the image and the path.
    pub(crate) fn error(&self, path: &[u8], source: Ext4Error) -> Error {
        ext4_error(&self.image, source, |source| GuestError::Ext4 {
            path: shown(path),
            source,
        })
    }

    /// An error of ours about the guest, naming the image.
    pub(crate) fn guest_error(&self, e: GuestError) -> Error {
        Error::new(&self.image, e)
    }

    /// Hand each entry of guest folder `dir` but `.` and `..` to `each`, as read: its name, path,
    /// metadata (a final symlink not followed) and inode number when `inode` is the folder's and
    /// qcowfs reads the same entries from it. A failure to read the folder names it as
    /// `shown_as` (what the user typed, for `ls`).
    pub(crate) fn for_each_child(
        &self,
        dir: &ext4_view::PathBuf,
        inode: Option<&RawInode>,
        shown_as: &[u8],
        mut each: impl FnMut(Vec<u8>, ext4_view::PathBuf, Metadata, Option<u32>) -> Result<()>,
    ) -> Result<()> {
        let entries = self.fs.read_dir(dir).map_err(|e| self.error(shown_as, e))?;
        // The same entries in the same order, with their numbers; dropped at the first that
        // differs from ext4-view's.
        let mut numbers = match (self.layout.as_ref(), inode) {
            (Some(layout), Some(inode)) => extents::dir_entries(layout, inode, DIR_SCAN_LIMIT)
                .ok()
                .map(|v| v.into_iter()),
            _ => None,
        };
        for entry in entries {
            let entry = entry.map_err(|e| self.error(shown_as, e))?;
            let name = entry.file_name().as_ref().to_vec();
            let number = match numbers.as_mut().and_then(|n| n.next()) {
                Some((n, number)) if n == name => Some(number),
                _ => {
                    numbers = None;
                    None
                }
            };
            if name == b"." || name == b".." {
                continue;
            }
            let child = entry.path();
            let meta = entry
                .metadata()
                .map_err(|e| self.error(child.as_ref(), e))?;
            each(name, child, meta, number)?;
        }
        Ok(())
    }
}

/// The root folder's inode number.
const ROOT_INODE: u32 = 2;

/// Most entries of one folder whose inode numbers qcowfs reads itself (a larger folder is
/// copied without them).
const DIR_SCAN_LIMIT: usize = 1 << 20;

/// The most block groups accepted: 128 TiB of 4 KiB blocks (ext4-view keeps every group
/// descriptor in memory; a hostile count would ask for gigabytes).
const MAX_BLOCK_GROUPS: u64 = 1 << 20;

/// Check the geometry an ext2/3/4 superblock (1024 bytes) claims against what ext4-view would
/// allocate and the `len` bytes the file system has; its inode count.
fn check_superblock(sb: &[u8; 1024], len: u64) -> std::result::Result<u64, GuestError> {
    let u32_at = |o: usize| u64::from(u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]));
    let inodes = u32_at(0);
    let is_64bit = u32_at(96) & 0x80 != 0;
    let blocks = u32_at(4) | if is_64bit { u32_at(0x150) << 32 } else { 0 };
    let log = u32_at(24);
    let per_group = u32_at(32);
    let first = u32_at(20);
    // A block size past 64 KiB or a zero group size is ext4-view's to refuse, by name.
    if log > 6 || per_group == 0 {
        return Ok(inodes);
    }
    let bytes = blocks.saturating_mul(1024 << log);
    if bytes > len {
        return Err(GuestError::Geometry {
            claims: format!("{bytes} bytes"),
            limit: format!("the {len} bytes it lies in"),
        });
    }
    let groups = blocks.saturating_sub(first).div_ceil(per_group);
    if groups > MAX_BLOCK_GROUPS {
        return Err(GuestError::Geometry {
            claims: format!("{groups} block groups"),
            limit: MAX_BLOCK_GROUPS.to_string(),
        });
    }
    Ok(inodes)
}

/// An ext4-view error as ours: a read error of the disk comes back as the error it was (naming
/// the layer that failed); anything else is `wrap`ped.
fn ext4_error(
    image: &Path,
    source: Ext4Error,
    wrap: impl FnOnce(Ext4Error) -> GuestError,
) -> Error {
    match source {
        Ext4Error::Io(inner) => match inner.downcast::<Error>() {
            Ok(ours) => *ours,
            Err(other) => Error::new(image, wrap(Ext4Error::Io(other))),
        },
        other => Error::new(image, wrap(other)),
    }
}

/// An error that does not yet name its image, or one that already names a file.
enum Choice {
    Guest(GuestError),
    Disk(Error),
}

impl Choice {
    fn at_image(self, image: &Path) -> Error {
        match self {
            Choice::Guest(g) => Error::new(image, g),
            Choice::Disk(e) => e,
        }
    }
}

impl From<Error> for Choice {
    fn from(e: Error) -> Self {
        Choice::Disk(e)
    }
}

/// Which byte range holds the file system: (its name as the mountpoint shows it, start, length).
/// Partition `number` if asked; else the whole disk if it holds one; else the one partition that
/// does. `aes`: a legacy AES layer is in the chain (a wrong passphrase reads as noise).
fn choose(
    disk: &dyn BlockDevice,
    number: Option<u32>,
    aes: bool,
) -> std::result::Result<(String, u64, u64), Choice> {
    let size = disk.size();
    let table = read_table(disk);
    if let Some(n) = number {
        let Some(p) = table.partitions.iter().find(|p| p.number == n) else {
            let present = match table.partitions.is_empty() {
                true => "it has no partition table".to_string(),
                false => format!(
                    "it has {}",
                    table
                        .partitions
                        .iter()
                        .map(|p| p.number.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            return Err(Choice::Guest(GuestError::NoPartition {
                number: n,
                present,
            }));
        };
        let view = format!("disk-part{n}");
        let found = detect::detect(disk, p.start, p.len)?;
        if !found.is_supported() {
            return Err(Choice::Guest(GuestError::Unsupported { view, found }));
        }
        return Ok((view, p.start, p.len));
    }
    let whole = detect::detect(disk, 0, size)?;
    if whole.is_supported() {
        return Ok(("disk".into(), 0, size));
    }
    if table.partitions.is_empty() {
        if whole == Contents::Nothing || whole == Contents::PartitionTable {
            return Err(Choice::Guest(none_found(
                "the disk holds no file system or partition".into(),
                aes,
            )));
        }
        return Err(Choice::Guest(GuestError::Unsupported {
            view: "disk".into(),
            found: whole,
        }));
    }
    let mut found = Vec::new();
    for p in &table.partitions {
        found.push((p, detect::detect(disk, p.start, p.len)?));
    }
    let supported: Vec<_> = found.iter().filter(|(_, c)| c.is_supported()).collect();
    match supported.as_slice() {
        [(p, _)] => Ok((format!("disk-part{}", p.number), p.start, p.len)),
        [] => {
            let list = found
                .iter()
                .map(|(p, c)| format!("partition {}: {}", p.number, c.name()))
                .collect::<Vec<_>>()
                .join(", ");
            Err(Choice::Guest(none_found(list, aes)))
        }
        many => Err(Choice::Guest(GuestError::Ambiguous {
            list: format!(
                "partitions {}",
                many.iter()
                    .map(|(p, _)| p.number.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })),
    }
}

/// The refusal when nothing readable was found: what was, and how to look with a mount.
fn none_found(found: String, aes: bool) -> GuestError {
    let mut hint = "qcowfs mount --read-only IMAGE MNT, then mount -o loop,ro MNT/disk-partN \
                    /mnt/guest (or MNT/disk)"
        .to_string();
    if aes {
        hint.push_str(AES_HINT);
    }
    GuestError::NoneSupported { found, hint }
}

/// Check that a guest path is absolute; return it as ext4-view wants it.
pub(crate) fn guest_path(image: &Path, path: &OsStr) -> Result<ext4_view::PathBuf> {
    let bytes = path.as_bytes();
    if !bytes.starts_with(b"/") {
        return Err(Error::new(image, GuestError::NotAbsolute(shown(bytes))));
    }
    ext4_view::PathBuf::try_from(bytes).map_err(|_| {
        Error::new(
            image,
            GuestError::Ext4 {
                path: shown(bytes),
                source: Ext4Error::MalformedPath,
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(blocks: u32, log: u32, per_group: u32) -> [u8; 1024] {
        let mut sb = [0u8; 1024];
        sb[0..4].copy_from_slice(&64u32.to_le_bytes());
        sb[4..8].copy_from_slice(&blocks.to_le_bytes());
        sb[24..28].copy_from_slice(&log.to_le_bytes());
        sb[32..36].copy_from_slice(&per_group.to_le_bytes());
        sb
    }

    #[test]
    fn a_superblock_larger_than_its_disk_or_with_too_many_groups_is_refused() {
        assert_eq!(
            check_superblock(&superblock(16384, 0, 8192), 16 << 20).unwrap(),
            64
        );
        assert!(check_superblock(&superblock(16385, 0, 8192), 16 << 20).is_err());
        let e = check_superblock(&superblock(u32::MAX, 0, 8), u64::MAX).unwrap_err();
        assert!(e.to_string().contains("block groups"), "{e}");
    }
}
