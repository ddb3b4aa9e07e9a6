//! Command-line arguments (converted into each command's options), and exit codes.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::error::{Error, Result};
use crate::keys::sources::KeySources;
pub use crate::keys::sources::{LIBVIRT_SECRETS_DIR, LIBVIRT_SECRETS_DIR_ENV};

pub mod domain_args;
pub mod generate;
pub mod mount_helper;

/// Exit status: success.
pub const EXIT_OK: i32 = 0;
/// Exit status: the operation failed for a reason none of the others names.
pub const EXIT_FAILURE: i32 = 1;
/// Exit status: the command line was wrong.
pub const EXIT_USAGE: i32 = 2;
/// Exit status: a passphrase is wrong (LUKS: no key slot opens; legacy AES: noise).
pub const EXIT_WRONG_KEY: i32 = 3;
/// Exit status: a passphrase cannot be verified (legacy AES, no data yet) and the command would
/// write with it, or `check-key` could not verify every layer.
pub const EXIT_UNVERIFIED_KEY: i32 = 4;
/// Exit status: the image is in use (a VM, qemu-img, another qcowfs) or the mount is busy.
pub const EXIT_IN_USE: i32 = 5;
/// Exit status: a file is missing or may not be opened as asked.
pub const EXIT_NOT_FOUND: i32 = 6;
/// Exit status: the image (or the guest's file system) is damaged.
pub const EXIT_DAMAGED: i32 = 7;
/// Exit status: reading or writing the host failed (an I/O error, a full disk).
pub const EXIT_IO: i32 = 8;
/// Exit status: stopped by Ctrl-C where it could stop cleanly (128 + SIGINT, as shells say).
pub const EXIT_INTERRUPTED: i32 = 130;

/// The exit status for an error.
pub fn exit_status(e: &Error) -> i32 {
    use crate::error::Failure;
    match e.failure() {
        Failure::Other => EXIT_FAILURE,
        Failure::Usage => EXIT_USAGE,
        Failure::WrongKey => EXIT_WRONG_KEY,
        Failure::UnverifiedKey => EXIT_UNVERIFIED_KEY,
        Failure::InUse => EXIT_IN_USE,
        Failure::NotFound => EXIT_NOT_FOUND,
        Failure::Damaged => EXIT_DAMAGED,
        Failure::Io => EXIT_IO,
        Failure::Interrupted => EXIT_INTERRUPTED,
    }
}

/// Every exit status and what it means: `--help`, the manual pages and the README say the same.
pub const EXIT_STATUSES: [(i32, &str); 10] = [
    (EXIT_OK, "success"),
    (
        EXIT_FAILURE,
        "a failure of another kind (an unsupported image, a refused request)",
    ),
    (
        EXIT_USAGE,
        "bad usage: a wrong option or value, no passphrase for an encrypted image",
    ),
    (
        EXIT_WRONG_KEY,
        "a passphrase is wrong (LUKS: no key slot opens; legacy AES: data decrypts to noise)",
    ),
    (
        EXIT_UNVERIFIED_KEY,
        "a passphrase cannot be verified (legacy AES, no data yet) for a command that writes",
    ),
    (
        EXIT_IN_USE,
        "the image is in use (a VM, qemu-img, another qcowfs) or the mount is busy",
    ),
    (
        EXIT_NOT_FOUND,
        "a file is missing, or may not be opened as asked (permissions, a read-only file)",
    ),
    (
        EXIT_DAMAGED,
        "the image or the guest's file system is damaged (qcowfs check IMAGE tells more)",
    ),
    (
        EXIT_IO,
        "reading or writing the host failed (an I/O error, a full disk)",
    ),
    (
        EXIT_INTERRUPTED,
        "interrupted (Ctrl-C) where it could stop cleanly: seal, run again to finish",
    ),
];

/// The end of `qcowfs --help`.
fn after_help() -> String {
    let mut text = String::from(
        "Exit status (on failure one line on stderr names the file and the problem):\n",
    );
    for (code, meaning) in EXIT_STATUSES {
        text.push_str(&format!("  {code}  {meaning}\n"));
    }
    text.push_str(
        "Logs: -v (repeat for more) or RUST_LOG=debug; a daemonized mount logs to syslog (or --log-file).
mount(8) and /etc/fstab: mount -t fuse.qcowfs IMAGE MOUNTPOINT -o ro,passphrase_file=FILE
(see qcowfs-mount(1)).",
    );
    text
}

#[derive(Debug, Parser)]
#[command(
    name = "qcowfs",
    version,
    about = "Mount (encrypted) qcow2 disk images and their backing chains as a plain file, without booting the VM",
    after_help = after_help()
)]
pub struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount IMAGE so that MOUNTPOINT/disk is the decrypted virtual disk
    #[command(after_help = "\
Example (an OpenStack nova instance disk, legacy AES over a raw base in _base/):
  qcowfs mount --passphrase-file key /var/lib/nova/instances/UUID/disk /mnt/vm
  mount -o loop /mnt/vm/disk /mnt/guest
  ... ; umount /mnt/guest
  qcowfs umount /mnt/vm

The command returns once the mount is live and then serves it from a background daemon.
Writes go to IMAGE only (backing files are never written); they are encrypted with the
layer's key and made durable on fsync, after a few idle seconds, and at umount.")]
    Mount(MountArgs),
    /// Write everything, unmount MOUNTPOINT and wait until the daemon has exited
    #[command(
        after_help = "Example:\n  qcowfs umount /mnt/vm\n\nWhen it returns 0 every write is in the image and no qcowfs process holds it."
    )]
    Umount {
        /// Where the image is mounted
        mountpoint: PathBuf,
    },
    /// List the live qcowfs mounts: image, mount point, daemon pid, mode, unwritten bytes, state
    #[command(after_help = "\
Example:
  qcowfs list
  IMAGE                              MOUNTPOINT  PID   MODE        DIRTY    STATE
  /var/lib/nova/instances/UUID/disk  /mnt/vm     4242  read-write  3.0 MiB  running
  /srv/images/base.qcow2             /mnt/base   4310  read-only   0 B      running

DIRTY is what was written to the mount but is not yet in the image (each daemon publishes it at
most once a second). STATE: running; daemon dead (the mount answers nothing: unwritten data is
lost; qcowfs umount detaches it); no mount here (a live daemon whose mount this mount table lacks:
unmounted and still writing, or mounted in another mount namespace); no record (a qcowfs mount
that no record of this user's names). Root sees every user's mounts, with pid and DIRTY for
root's own; another user sees only the mounts they made. --json prints one JSON array of objects
with image, mountpoint, pid, mode (\"read-write\", \"read-only\"), dirty_bytes, state and uid
(null where unknown).")]
    List(ListArgs),
    /// Describe an image: format, sizes, encryption, backing chain, snapshots, features
    #[command(after_help = "Example:\n  qcowfs info --json /var/lib/nova/instances/UUID/disk")]
    Info(InfoArgs),
    /// Audit a host's instance disks: encryption of each disk and how much of its data lies in plaintext bases
    #[command(after_help = crate::cmd::audit::AFTER_HELP)]
    Audit(AuditArgs),
    /// Copy all data from the backing files into IMAGE (encrypted with its key) and drop the backing file
    #[command(after_help = "\
Example (make a nova instance disk self-contained, its raw base's plaintext copied in encrypted):
  qcowfs seal --passphrase-file key /var/lib/nova/instances/UUID/disk

Needs free space for the copied data and takes the image's write lock (the VM must be off).
Clusters that read as all zeros are left unallocated (they read as zeros without the backing file).
Safe to interrupt: until the last step the image still has its backing file. Ctrl-C stops it
cleanly (what was copied made durable, exit status 130) and says so; run it again to finish.
A progress bar shows on a terminal (--no-progress: none).")]
    Seal(SealArgs),
    /// List a folder of the guest's file system (or one file), read straight from the image
    #[command(after_help = GUEST_HELP_LS)]
    Ls(LsArgs),
    /// Write a file of the guest's file system to stdout, read straight from the image
    #[command(after_help = GUEST_HELP_CAT)]
    Cat(GuestArgs),
    /// Copy a file, symlink or whole folder of the guest's file system to the host
    #[command(after_help = GUEST_HELP_COPY)]
    CopyOut(CopyOutArgs),
    /// Edit a file of the guest in place: $VISUAL/$EDITOR on a private copy, written back if changed
    #[command(after_help = GUEST_HELP_EDIT)]
    Edit(EditFileArgs),
    /// Write stdin into a file of the guest (made, mode 0644, if missing), in place
    #[command(after_help = GUEST_HELP_EDIT)]
    Write(EditPathArgs),
    /// Copy host files or folders into a folder of the guest, in place
    #[command(after_help = GUEST_HELP_EDIT)]
    CopyIn(CopyInArgs),
    /// Remove a file, symlink or empty folder of the guest, in place
    #[command(after_help = GUEST_HELP_EDIT)]
    Rm(EditPathArgs),
    /// Make a folder in the guest (mode 0755), in place
    #[command(after_help = GUEST_HELP_EDIT)]
    Mkdir(EditPathArgs),
    /// Check the passphrase of every encrypted layer without opening anything for writing
    #[command(after_help = "\
Example:
  qcowfs check-key --passphrase-file key /var/lib/nova/instances/UUID/disk

One line per encrypted layer: verified, wrong, or cannot be verified. LUKS checks its key
itself (a key slot opens); legacy AES has no key check, so its key is judged by what sampled
clusters of the layer decrypt to (data or noise), and a layer with no data yet cannot be judged.
Exit status: 0 every layer verified, 3 a passphrase is wrong, 4 one cannot be verified,
1 another failure (the image cannot be read). Takes QEMU's reader locks (-U: none).")]
    CheckKey(CheckKeyArgs),
    /// Check (and repair) the image's metadata with qemu-img check, its passphrases passed safely
    #[command(after_help = "\
Examples:
  qcowfs check --passphrase-file key /var/lib/nova/instances/UUID/disk
  qcowfs check -r all --passphrase-file key /var/lib/nova/instances/UUID/disk

qemu-img check needs --object secret and --image-opts for every encrypted layer; this runs it so,
each passphrase in an anonymous memory file only qemu-img inherits (never on a command line),
after checking the passphrases (a wrong one is refused). qemu-img's report is printed as it is.
Exit status: 0 no errors (leaked clusters are harmless: -r leaks reclaims them), 7 corruptions
found (-r all repairs them; the VM must be off), 1 qemu-img could not complete the check.")]
    Check(CheckArgs),
    /// Write the manual pages or shell completions (used by scripts/install.sh)
    #[command(subcommand, hide = true)]
    Generate(generate::Target),
    /// Benchmark only: serve MOUNTPOINT/disk of SIZE bytes from memory through the transports
    /// of mount, with no image, crypto or host I/O behind it (scripts/bench.sh's transport
    /// floor). Reads return a fixed pattern, writes are forgotten; qcowfs umount ends it
    #[command(hide = true)]
    TransportFloor(TransportFloorArgs),
}

/// What `ls`, `cat` and `copy-out` have in common, for their help texts.
macro_rules! guest_help_common {
    () => {
        "\
The image is opened read-only with QEMU's reader locks (--force-share: none, for a running VM),
and the guest's file system is read in-process: no FUSE, no root, no loop device. Read here:
ext2/3/4, XFS (v4, v5; a dirty log is replayed in memory), btrfs (the default subvolume, or
--subvolume), NTFS (symlinks and junctions shown as links) and FAT12/16/32, on the disk, a
partition, or a linear LVM2 logical volume. Without --partition or --lv: the whole disk if it
holds one of those, else the one partition or logical volume that does (more than one: they are
listed; choose with --partition N, numbered as `qcowfs mount` shows disk-partN, or --lv VG/LV).
Other contents (exFAT, LUKS, swap, RAID or thin LVM) are named in the refusal: mount the image
with `qcowfs mount --read-only IMAGE MNT` and use `mount -o loop,ro MNT/disk-partN /mnt/guest`."
    };
}

const GUEST_HELP_EDIT: &str = "\
Examples:
  qcowfs edit --passphrase-file key /var/lib/nova/instances/UUID/disk /etc/fstab
  echo 'nameserver 192.0.2.53' | qcowfs write --passphrase-file key DISK /etc/resolv.conf
  qcowfs copy-in --passphrase-file key DISK ./authorized_keys /root/.ssh
  qcowfs rm --passphrase-file key DISK /etc/systemd/system/multi-user.target.wants/bad.service

The guest's file system is changed in place, in-process, without root: ext2/3/4 (rust-fs-ext4,
each change a journal transaction), XFS (rust-fs-xfs, through its log, then unmounted cleanly)
and FAT (fstool; no journal, as any FAT). The image is opened writable under QEMU's write lock: a running VM's disk is refused,
and there is no --force-share for writes. The passphrase is checked before anything is written
(a wrong one is refused; one that cannot be verified needs --unverified-key). A file system that
was not cleanly unmounted, or records errors, is refused: boot the VM once, or repair it.
Every write goes through the same copy-on-write and encryption as `qcowfs mount`. Guest paths are
taken name by name; a symlink is not followed. `edit` and `write` keep the file's owner, mode,
times other than mtime, and extended attributes; `copy-in` never replaces an existing name and
does not follow host symlinks.";

const GUEST_HELP_LS: &str = concat!(
    "Example:\n  qcowfs ls --passphrase-file key /var/lib/nova/instances/UUID/disk /var/log\n\n",
    "One line per entry: mode, uid, gid, size, mtime (UTC), name, and `-> target` for a symlink;\n",
    "-R lists the folders below too (each under a PATH: line, as ls -lR); --json prints one\n",
    "object per entry and line instead. Text escapes control characters and bytes that are not\n",
    "UTF-8 as \\xNN; JSON gives names exactly (JSON's own escapes), and a name that is not UTF-8\n",
    "also as path_base64 (target_base64).\n",
    "A file or symlink lists itself; a trailing / follows a final symlink (inside the guest).\n\n",
    guest_help_common!()
);

const GUEST_HELP_CAT: &str = concat!(
    "Example:\n  qcowfs cat --passphrase-file key /var/lib/nova/instances/UUID/disk /var/log/syslog\n\n",
    "The bytes are streamed (bounded memory); symlinks are followed inside the guest.\n\n",
    guest_help_common!()
);

const GUEST_HELP_COPY: &str = concat!(
    "Examples:\n  qcowfs copy-out --passphrase-file key /var/lib/nova/instances/UUID/disk /etc/fstab .\n",
    "  qcowfs copy-out --passphrase-file key /var/lib/nova/instances/UUID/disk /var/log /tmp/vm-logs\n\n",
    "DEST an existing folder: copied into it (like cp -r); else DEST is the new name. Nothing\n",
    "existing is overwritten. Kept as cp -a keeps them: modes (without setuid/setgid), mtimes,\n",
    "atimes, hard links, extended attributes and ACLs (without file capabilities), and (as root)\n",
    "owners; what the host refuses is named once at the end. Symlinks are made as symlinks and\n",
    "never followed on the host; devices, FIFOs and sockets are skipped. A progress bar shows on\n",
    "a terminal. DEST '-' writes a tar stream to stdout instead (GNU format; the guest's uid/gid,\n",
    "whole modes, mtimes, xattrs, capabilities and ACLs as the PAX records GNU tar restores with\n",
    "--xattrs --acls):\n",
    "  qcowfs copy-out IMAGE /etc - | tar -tvf -\n\n",
    guest_help_common!()
);

/// Where the passphrase that serves every encrypted layer comes from. At most one source: clap's
/// `passphrase_source` group turns a second one into a usage error (exit status 2).
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// Read the passphrase from FILE ('-' for stdin); one trailing newline is dropped. Without a
    /// passphrase option, an encrypted image prompts on the terminal. It serves every encrypted
    /// layer of the chain
    #[arg(long, value_name = "FILE|-", group = "passphrase_source")]
    pub passphrase_file: Option<PathBuf>,
    /// Read the passphrase base64-encoded from FILE ('-' for stdin), as `virsh secret-get-value
    /// UUID` prints it; whitespace and newlines are ignored
    #[arg(long, value_name = "FILE|-", group = "passphrase_source")]
    pub passphrase_base64_file: Option<PathBuf>,
    /// Use the libvirt secret UUID from libvirt's secret store on this host
    /// (/etc/libvirt/secrets/UUID.base64, readable by root)
    #[arg(long, value_name = "UUID", group = "passphrase_source", value_parser = parse_uuid)]
    pub libvirt_secret: Option<String>,
    /// The passphrase for one layer of the chain, the file PATH; may be repeated
    #[arg(long, value_name = "PATH=FILE")]
    pub layer_passphrase_file: Vec<String>,
    /// Instead of IMAGE: the first disk of libvirt domain NAME, with its libvirt secret (as
    /// virt-cat -d); a running domain's disk is read without locks and never written
    #[arg(short = 'd', long = "domain", value_name = "NAME", value_parser = domain_left_over)]
    pub domain: Option<String>,
    /// How many times the terminal prompt asks again when the passphrase typed is wrong
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub tries: u32,
}

impl KeyArgs {
    /// The sources these options name.
    pub fn sources(&self) -> KeySources {
        KeySources {
            passphrase_file: self.passphrase_file.clone(),
            passphrase_base64_file: self.passphrase_base64_file.clone(),
            libvirt_secret: self.libvirt_secret.clone(),
            layer_passphrase_files: self.layer_passphrase_file.clone(),
            tries: self.tries,
        }
    }
}

/// Where backing files may be.
#[derive(Debug, Args, Default)]
pub struct ConfineArgs {
    /// Refuse any backing file whose path, symlinks followed, is not inside DIR (may be repeated;
    /// e.g. /var/lib/nova/instances). Without it, backing files are opened wherever the image
    /// says, as QEMU does
    #[arg(long, value_name = "DIR")]
    pub backing_within: Vec<PathBuf>,
}

impl ConfineArgs {
    /// The folders, canonical; a folder that does not exist is an error naming it.
    pub fn folders(&self) -> Result<Vec<PathBuf>> {
        self.backing_within
            .iter()
            .map(|d| {
                let c = std::fs::canonicalize(d).map_err(|e| Error::new(d, e))?;
                if !c.is_dir() {
                    return Err(Error::new(
                        d,
                        crate::Problem::Usage("--backing-within needs a folder".into()),
                    ));
                }
                Ok(c)
            })
            .collect()
    }
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Never write the image (takes QEMU's shared read lock)
    #[arg(short = 'r', long)]
    pub read_only: bool,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub confine: ConfineArgs,
    /// Memory for decrypted clusters (e.g. 256M, 1G); dirty data counts against it
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = crate::cmd::size::parse_size)]
    pub cache_size: u64,
    /// Memory for image metadata (L2 tables, refcount blocks, snapshot L1 tables), all layers
    /// together; the active L1 and refcount tables come on top
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = crate::cmd::size::parse_size)]
    pub metadata_cache: u64,
    /// Stay in the foreground and log to stderr (Ctrl-C unmounts)
    #[arg(short, long)]
    pub foreground: bool,
    /// Let other users access the mount (needs user_allow_other in /etc/fuse.conf for non-root)
    #[arg(long)]
    pub allow_other: bool,
    /// Read-only: take no locks, so a running VM's image can be read (reads may be inconsistent)
    #[arg(short = 'U', long, requires = "read_only")]
    pub force_share: bool,
    /// Mount without checking the passphrase at all (e.g. a guest whose own data is encrypted,
    /// so every sampled cluster decrypts to noise even with the right key)
    #[arg(long)]
    pub force: bool,
    /// Write even when the passphrase of the image cannot be verified: a legacy AES layer with
    /// no data yet has nothing to check it against (LUKS always checks its key)
    #[arg(long)]
    pub unverified_key: bool,
    /// Append the log to FILE (timestamped lines) instead of syslog (or stderr with --foreground)
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    #[command(flatten)]
    pub transport: TransportArgs,
    /// Mount over a folder that has files in it (they are hidden while mounted); never over a
    /// live qcowfs mount
    #[arg(long)]
    pub nonempty: bool,
    /// The qcow2 image to mount (a raw disk image needs no qcowfs: mount -o loop)
    pub image: PathBuf,
    /// An existing empty directory
    pub mountpoint: PathBuf,
}

#[derive(Debug, Args)]
pub struct TransportFloorArgs {
    /// The size of the null disk (e.g. 1G)
    #[arg(long, value_name = "SIZE", value_parser = crate::cmd::size::parse_size)]
    pub size: u64,
    /// Stay in the foreground and log to stderr (Ctrl-C unmounts)
    #[arg(short, long)]
    pub foreground: bool,
    #[command(flatten)]
    pub transport: TransportArgs,
    /// An existing empty directory
    pub mountpoint: PathBuf,
}

/// Which transport carries the requests: one option for `mount` and `transport-floor`, so that the
/// floor is always measured on the transport a mount would use.
#[derive(Debug, Args)]
pub struct TransportArgs {
    /// Take requests from per-CPU io_uring queues (Linux 6.14+, when root has enabled it:
    /// echo 1 > /sys/module/fuse/parameters/enable_uring) instead of reading /dev/fuse; each
    /// request is answered on the CPU that made it. auto: when the kernel offers it
    #[arg(
        long,
        value_name = "WHEN",
        value_enum,
        default_value_t,
        env = "QCOWFS_IO_URING"
    )]
    pub io_uring: crate::mount::uring::Mode,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print one JSON array instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub confine: ConfineArgs,
    /// The image to describe
    pub image: PathBuf,
}

/// An image and a path in its guest file system (`ls`, `cat`).
#[derive(Debug, Args)]
pub struct GuestArgs {
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub confine: ConfineArgs,
    /// Take no locks, so a running VM's image can be read (reads may be inconsistent)
    #[arg(short = 'U', long)]
    pub force_share: bool,
    /// Read partition N (as `qcowfs mount` numbers disk-partN: MBR 1-4, logicals from 5; GPT)
    #[arg(long, value_name = "N")]
    pub partition: Option<u32>,
    /// Read this LVM2 logical volume (linear, on the guest disk), named as `lvs` names it:
    /// VG/LV
    #[arg(long, value_name = "VG/LV")]
    pub lv: Option<String>,
    /// Read this btrfs subvolume (its path as `btrfs subvolume list` prints it, or its id)
    /// instead of the default one
    #[arg(long, value_name = "PATH|ID")]
    pub subvolume: Option<String>,
    /// The qcow2 image
    pub image: PathBuf,
    /// An absolute path in the guest file system, e.g. /var/log/syslog
    pub guest_path: std::ffi::OsString,
}

/// `ls`: an image, a guest path, and how to list it.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// One JSON object per entry and line (path, name, kind, mode, uid, gid, size, links, mtime,
    /// mtime_utc, target; names as they are, and path_base64 / target_base64 beside a name that
    /// is not UTF-8)
    #[arg(long)]
    pub json: bool,
    /// The folders below too, as ls -lR lists them
    #[arg(short = 'R', long)]
    pub recursive: bool,
    #[command(flatten)]
    pub guest: GuestArgs,
}

/// The image a changing command opens, and how.
#[derive(Debug, Args)]
pub struct EditTarget {
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub confine: ConfineArgs,
    /// Change partition N (as `qcowfs mount` numbers disk-partN)
    #[arg(long, value_name = "N")]
    pub partition: Option<u32>,
    /// Change this LVM2 logical volume (VG/LV, as `lvs` names it)
    #[arg(long, value_name = "VG/LV")]
    pub lv: Option<String>,
    /// Write even when the passphrase cannot be verified (a legacy AES overlay with no data of
    /// its own yet): new data is then encrypted with the one given
    #[arg(long)]
    pub unverified_key: bool,
    /// The qcow2 image
    pub image: PathBuf,
}

/// `write`, `rm`, `mkdir`: an image and a guest path.
#[derive(Debug, Args)]
pub struct EditPathArgs {
    #[command(flatten)]
    pub target: EditTarget,
    /// An absolute path in the guest file system
    pub guest_path: std::ffi::OsString,
}

/// `edit`: an image, a guest file, and the editor.
#[derive(Debug, Args)]
pub struct EditFileArgs {
    #[command(flatten)]
    pub target: EditTarget,
    /// The editor command (default: $VISUAL, then $EDITOR, then vi); it is given the copy's path
    #[arg(long, value_name = "COMMAND")]
    pub editor: Option<String>,
    /// An absolute path of a regular file in the guest
    pub guest_path: std::ffi::OsString,
}

/// `copy-in`: an image, host sources, and the guest folder they go into.
#[derive(Debug, Args)]
pub struct CopyInArgs {
    #[command(flatten)]
    pub target: EditTarget,
    /// Host files or folders, then the guest folder to copy them into (which must exist)
    #[arg(num_args = 2.., required = true, value_name = "SRC... GUESTDIR")]
    pub paths: Vec<PathBuf>,
}

/// `copy-out`: an image, a guest path, and where to put it.
#[derive(Debug, Args)]
pub struct CopyOutArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    /// An existing folder to copy into, or the new name; '-' writes a tar stream to stdout
    pub dest: PathBuf,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Print JSON Lines instead of tables: one object per line, each disk ("kind": "disk") then
    /// each base image ("kind": "base"), every one with the host name ("host")
    #[arg(long)]
    pub json: bool,
    /// Take no locks: the default (kept for older scripts). A running VM's disk is audited and
    /// marked in use; its numbers may be changing while they are read
    #[arg(short = 'U', long)]
    pub force_share: bool,
    #[command(flatten)]
    pub confine: ConfineArgs,
    /// Audit every qcow2 disk of libvirt domain NAME (given instead of DIR|IMAGE)
    #[arg(short = 'd', long = "domain", value_name = "NAME", value_parser = domain_left_over)]
    pub domain: Option<String>,
    /// Folders to search (nova instance folders, storage pools: every qcow2 down to DIR/*/*, and
    /// nova's DIR/*/disk*; DIR/_base is not searched) or qcow2 image files
    #[arg(value_name = "DIR|IMAGE", default_value = crate::cmd::audit::NOVA_INSTANCES)]
    pub paths: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SealArgs {
    /// Show no progress bar (one shows on a terminal by default)
    #[arg(long, conflicts_with = "progress")]
    pub no_progress: bool,
    /// Show a progress bar on a terminal (the default; kept for older scripts)
    #[arg(long, hide = true)]
    pub progress: bool,
    /// Seal even when the passphrase of the image cannot be verified (a legacy AES overlay with
    /// no data of its own yet): everything copied up is then encrypted with the one given
    #[arg(long)]
    pub unverified_key: bool,
    /// Seal without checking the passphrases at all (only when the guest's own data is
    /// encrypted or random, so that the right legacy AES key decrypts to noise too)
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub confine: ConfineArgs,
    /// The image to make self-contained
    pub image: PathBuf,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Repair: leaks (reclaim leaked clusters) or all (also fix corruptions; may lose data
    /// whose metadata is damaged)
    #[arg(short = 'r', long, value_name = "leaks|all", value_parser = ["leaks", "all"])]
    pub repair: Option<String>,
    /// qemu-img's JSON report instead of text
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub confine: ConfineArgs,
    /// Take no locks, so a running VM's image can be checked (not with --repair)
    #[arg(short = 'U', long, conflicts_with = "repair")]
    pub force_share: bool,
    /// The image to check
    pub image: PathBuf,
}

#[derive(Debug, Args)]
pub struct CheckKeyArgs {
    /// Print one JSON object per encrypted layer (path, level, encryption, verdict, detail)
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub confine: ConfineArgs,
    /// Take no locks, so a running VM's image can be checked
    #[arg(short = 'U', long)]
    pub force_share: bool,
    /// The image whose chain to check
    pub image: PathBuf,
}

/// `-d NAME` is resolved before clap parses (`domain_args`); one that reaches clap was given where
/// that could not see it: inside a group of flags (`-Ud NAME`).
fn domain_left_over(_: &str) -> std::result::Result<String, String> {
    Err("give -d NAME on its own, not in a group of flags such as -Ud".into())
}

/// A libvirt secret UUID: 32 hex digits, dashes allowed between them (libvirt's own spellings),
/// normalized to the lower-case 8-4-4-4-12 form libvirt names its files by. Anything else, such as
/// a path, is refused.
pub fn parse_uuid(text: &str) -> std::result::Result<String, String> {
    let digits: Vec<char> = text.chars().filter(|&c| c != '-').collect();
    let dashes_ok = !text.starts_with('-') && !text.ends_with('-') && !text.contains("--");
    if digits.len() != 32 || !dashes_ok || !digits.iter().all(char::is_ascii_hexdigit) {
        return Err("expected a UUID such as 3f8f9a5e-6d7c-4e11-9a9b-2f1c0d7e8a41".into());
    }
    let hex: String = digits.iter().map(char::to_ascii_lowercase).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_normalized_and_paths_refused() {
        let canonical = "3f8f9a5e-6d7c-4e11-9a9b-2f1c0d7e8a41";
        assert_eq!(parse_uuid(canonical).unwrap(), canonical);
        assert_eq!(
            parse_uuid("3F8F9A5E6D7C4E119A9B2F1C0D7E8A41").unwrap(),
            canonical
        );
        for bad in [
            "",
            "../../etc/shadow",
            "3f8f9a5e-6d7c-4e11-9a9b-2f1c0d7e8a4",
            "3f8f9a5e-6d7c-4e11-9a9b-2f1c0d7e8a41-",
            "3f8f9a5e--6d7c-4e11-9a9b-2f1c0d7e8a41",
            "3f8f9a5e-6d7c-4e11-9a9b-2f1c0d7e8a4g",
        ] {
            assert!(parse_uuid(bad).is_err(), "{bad:?} accepted");
        }
    }
}
