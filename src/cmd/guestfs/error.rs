//! What can go wrong reading a guest's files, and what a byte range of its disk was found to
//! hold: the vocabulary the crate's `Error` wraps, kept in a leaf file (it imports nothing of the
//! crate) so that the error type sits below every layer that returns it.

use ext4_view::Ext4Error;

/// What went wrong reading the guest's files. Wrapped in an [`Error`] naming the image.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("the disk has no partition {number} ({present})")]
    NoPartition { number: u32, present: String },
    #[error("{view} holds {}, which qcowfs cannot read in place; {}", .found.name(), .found.suggestion(.view))]
    Unsupported { view: String, found: Contents },
    #[error("no file system qcowfs reads found ({found}); {hint}")]
    NoneSupported { found: String, hint: String },
    #[error("{list} hold file systems qcowfs reads; choose one with {choose}")]
    Ambiguous { list: String, choose: &'static str },
    #[error("--lv {lv}: no such logical volume ({present})")]
    NoLv { lv: String, present: String },
    #[error(
        "--lv {lv}: {why}; qcowfs reads linear logical volumes of the physical volume on this disk"
    )]
    LvNotRead { lv: String, why: String },
    #[error(
        "{view} holds an LVM2 physical volume whose volume group qcowfs cannot read ({why}); {}",
        Contents::Lvm2.suggestion(.view)
    )]
    LvmUnread { view: String, why: String },
    #[error("cannot read the ext2/3/4 file system on {view}: {source}{hint}")]
    Load {
        view: String,
        source: Ext4Error,
        /// Set when a legacy AES layer could explain it (a wrong key reads as noise).
        hint: &'static str,
    },
    #[error("cannot read the {fs} file system on {view}: {message}{hint}")]
    LoadFs {
        fs: &'static str,
        view: String,
        message: String,
        /// As [`GuestError::Load`]'s.
        hint: &'static str,
    },
    #[error("{path}: {source}")]
    Ext4 { path: String, source: Ext4Error },
    #[error("{path}: {message} ({fs})")]
    Library {
        fs: &'static str,
        path: String,
        message: String,
    },
    #[error("{0}: encrypted with EFS (Windows holds the key); not read")]
    Encrypted(String),
    #[error("--subvolume: the guest holds {0}, which has no subvolumes (btrfs has them)")]
    NoSubvolumes(&'static str),
    #[error(
        "{view} holds {found}, which qcowfs cannot change in place (ext2/3/4, XFS and FAT it can); \
         qcowfs mount IMAGE MNT, then mount -o loop MNT/{view} /mnt/guest"
    )]
    NotEditable { view: String, found: &'static str },
    #[error("{view} holds {found}, which cannot be changed now: {why}")]
    NotEditableNow {
        view: String,
        found: &'static str,
        why: String,
    },
    #[error(
        "the guest file system was not cleanly unmounted ({0}); refusing to change it: boot the \
         VM once, or repair it (qcowfs mount IMAGE MNT, then e2fsck -f MNT/disk-partN)"
    )]
    NotClean(&'static str),
    #[error("{0}: exists; choose a new name, or rm it first")]
    AlreadyExists(String),
    #[error("{0}: not a regular file; only regular files are written or edited")]
    NotRegular(String),
    #[error("{path}: {len} bytes, more than the {limit} qcowfs edits in memory; copy-in a new file instead")]
    TooBigToEdit { path: String, len: u64, limit: u64 },
    #[error("the editor failed ({0}); nothing was written")]
    EditorFailed(String),
    #[error("{0}: file not found")]
    NotFound(String),
    #[error("{0}: path is not a directory")]
    NotADirectory(String),
    #[error("{0}: too many levels of symbolic links")]
    TooManyLinks(String),
    #[error("the ext2/3/4 superblock claims {claims}, more than {limit}; refusing it as damaged")]
    Geometry { claims: String, limit: String },
    #[error("{0}: guest paths are absolute (start with /)")]
    NotAbsolute(String),
    #[error("{0}: is a directory (use ls, or copy-out for a tree)")]
    IsADirectory(String),
    #[error("{0}: refusing an unsafe name in the guest file system (a '/', '.' or '..' entry)")]
    UnsafeName(String),
    #[error("{path}: the tree is deeper than {max} levels (a directory loop?)")]
    TooDeep { path: String, max: usize },
    #[error("exists; copy-out never overwrites (remove it or name a new file)")]
    Exists,
    #[error("exists; the guest's root has no name to copy into it: name a folder that does not exist yet")]
    RootHasNoName,
    #[error("not a name for a new file")]
    NotAName,
    #[error("{0}: a device, fifo or socket, which holds no data to read")]
    NotAFile(String),
    #[error("{0}: not a regular file, directory or symlink; not copied")]
    Special(String),
    #[error("{path}: a symbolic link of {len} bytes, longer than any kernel makes (a damaged file system)")]
    LinkTooLong { path: String, len: u64 },
    #[error("{0}: extended attributes beyond the kernel's bounds (a value over 64 KiB, a name over 255 bytes, or over 1 MiB in all)")]
    BadXattrs(String),
    #[error(
        "{0}: a second name for a folder already copied (folders have one name: a damaged or \
         hostile file system; its fsck repairs it)"
    )]
    SecondPath(String),
    #[error("{path}: the copy reaches more than {limit} entries, more than a {fs_bytes}-byte file system can hold (hard-linked folders?)")]
    TooManyEntries {
        path: String,
        limit: u64,
        fs_bytes: u64,
    },
    #[error("{path}: the copy reaches more than {limit} bytes of file data, more than the file system holds (cross-linked files?)")]
    TooMuchData { path: String, limit: u64 },
    #[error(
        "{path}: {len} bytes, longer than the {limit}-byte file system, and qcowfs cannot map \
         its holes; mount the image and copy it with cp --sparse"
    )]
    Unmapped { path: String, len: u64, limit: u64 },
    #[error(
        "{path}: claims {len} bytes, more than any host file can hold (a damaged file system)"
    )]
    TooLong { path: String, len: u64 },
}

/// What a range of the disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contents {
    /// The ext2/3/4 superblock magic: readable here.
    Ext,
    Xfs,
    Btrfs,
    Ntfs,
    ExFat,
    Fat,
    Lvm2,
    Luks,
    Swap,
    /// A partition table (an extended partition's chain, or a nested table).
    PartitionTable,
    Nothing,
}

impl Contents {
    /// Whether `ls`, `cat` and `copy-out` can read it.
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            Contents::Ext | Contents::Xfs | Contents::Btrfs | Contents::Ntfs | Contents::Fat
        )
    }

    /// What it is, in a few words.
    pub fn name(self) -> &'static str {
        match self {
            Contents::Ext => "an ext2/3/4 file system",
            Contents::Xfs => "an XFS file system",
            Contents::Btrfs => "a btrfs file system",
            Contents::Ntfs => "an NTFS file system",
            Contents::ExFat => "an exFAT file system",
            Contents::Fat => "a FAT file system",
            Contents::Lvm2 => "an LVM2 physical volume",
            Contents::Luks => "a LUKS encrypted volume",
            Contents::Swap => "swap space",
            Contents::PartitionTable => "a partition table",
            Contents::Nothing => "no file system",
        }
    }

    /// How to get at it without these commands, where `file` is the mountpoint's file for it
    /// (`MNT/disk` or `MNT/disk-partN`).
    pub fn suggestion(self, file: &str) -> String {
        let mount = "qcowfs mount --read-only IMAGE MNT";
        match self {
            Contents::Ext | Contents::Nothing | Contents::PartitionTable => {
                format!("{mount}, then look at MNT/{file}")
            }
            Contents::Swap => "swap space holds no files".to_string(),
            Contents::Lvm2 => {
                format!("{mount}, then losetup -r -f --show MNT/{file} and vgchange -ay")
            }
            Contents::Luks => format!("{mount}, then cryptsetup open --readonly MNT/{file} NAME"),
            _ => format!("{mount}, then mount -o loop,ro MNT/{file} /mnt/guest"),
        }
    }
}

/// Why qcowfs could not read a record itself (the copy then falls back to ext4-view alone).
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("block {0} lies past the end of the file system")]
    PastEnd(u64),
    #[error("inode {0} does not exist")]
    NoInode(u32),
    #[error("the block map is damaged: {0}")]
    BadMap(&'static str),
    #[error("the disk cannot be read: {0}")]
    Disk(String),
}
