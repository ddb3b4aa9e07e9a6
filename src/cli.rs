//! Command-line arguments, passphrase sources and exit codes.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use zeroize::Zeroizing;

use crate::chain::{Chain, KeyRing, OpenOptions};
use crate::crypto::CryptoError;
use crate::error::{Error, Problem, Result};
use crate::qcow2::Encryption;

/// Exit status: success.
pub const EXIT_OK: i32 = 0;
/// Exit status: the operation failed (the message says why).
pub const EXIT_FAILURE: i32 = 1;
/// Exit status: the command line was wrong.
pub const EXIT_USAGE: i32 = 2;

const AFTER_HELP: &str = "\
Exit status: 0 success, 1 failure (one line on stderr names the file and the problem), 2 bad usage.
Logs: -v (repeat for more) or RUST_LOG=debug; a daemonized mount logs to syslog.";

#[derive(Debug, Parser)]
#[command(
    name = "qcowfs",
    version,
    about = "Mount (encrypted) qcow2 disk images and their backing chains as a plain file, without booting the VM",
    after_help = AFTER_HELP
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
    /// Describe an image: format, sizes, encryption, backing chain, snapshots, features
    #[command(after_help = "Example:\n  qcowfs info --json /var/lib/nova/instances/UUID/disk")]
    Info(InfoArgs),
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    /// Read the passphrase from FILE ('-' for stdin); one trailing newline is dropped. Without it,
    /// an encrypted image prompts on the terminal. It serves every encrypted layer of the chain
    #[arg(long, value_name = "FILE|-")]
    pub passphrase_file: Option<PathBuf>,
    /// The passphrase for one layer of the chain, the file PATH; may be repeated
    #[arg(long, value_name = "PATH=FILE")]
    pub layer_passphrase_file: Vec<String>,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Never write the image (takes QEMU's shared read lock)
    #[arg(short = 'r', long)]
    pub read_only: bool,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Memory for decrypted clusters (e.g. 256M, 1G); dirty data counts against it
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = crate::size::parse_size)]
    pub cache_size: u64,
    /// Stay in the foreground and log to stderr (Ctrl-C unmounts)
    #[arg(short, long)]
    pub foreground: bool,
    /// Let other users access the mount (needs user_allow_other in /etc/fuse.conf for non-root)
    #[arg(long)]
    pub allow_other: bool,
    /// Read-only: take no locks, so a running VM's image can be read (reads may be inconsistent)
    #[arg(short = 'U', long, requires = "read_only")]
    pub force_share: bool,
    /// Mount even when the passphrase looks wrong (every sampled cluster decrypts to noise)
    #[arg(long)]
    pub force: bool,
    /// The qcow2 (or raw) image to mount
    pub image: PathBuf,
    /// An existing empty directory
    pub mountpoint: PathBuf,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// The image to describe
    pub image: PathBuf,
}

/// Read a passphrase file ('-' is stdin); one trailing newline is dropped.
pub fn read_passphrase(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let mut data = Zeroizing::new(Vec::new());
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_end(&mut data)
            .map_err(|e| Error::new("<stdin>", e))?;
    } else {
        let mut f = std::fs::File::open(path).map_err(|e| Error::new(path, e))?;
        f.read_to_end(&mut data).map_err(|e| Error::new(path, e))?;
    }
    if data.last() == Some(&b'\n') {
        data.pop();
    }
    Ok(data)
}

/// Build the key ring from the arguments; prompt on a terminal for an encrypted chain without keys.
pub fn key_ring(args: &KeyArgs, image: &Path, prompt: bool) -> Result<KeyRing> {
    let mut ring = KeyRing::default();
    if let Some(p) = &args.passphrase_file {
        ring.default = Some(read_passphrase(p)?);
    }
    for spec in &args.layer_passphrase_file {
        let Some((layer, file)) = spec.split_once('=') else {
            return Err(Error::new(
                spec,
                Problem::Usage("--layer-passphrase-file takes PATH=FILE".into()),
            ));
        };
        let layer_path = PathBuf::from(layer);
        let canon = std::fs::canonicalize(&layer_path).map_err(|e| Error::new(&layer_path, e))?;
        ring.per_layer
            .push((canon, read_passphrase(Path::new(file))?));
    }
    if ring.default.is_none() {
        let missing = encrypted_layers_without_keys(image, &ring)?;
        if let Some(first) = missing.first() {
            if !prompt || !std::io::stdin().is_terminal() {
                return Err(Error::new(first, CryptoError::NoPassphrase));
            }
            let answer =
                rpassword::prompt_password(format!("Passphrase for {}: ", image.display()))
                    .map_err(|e| Error::new(image, e))?;
            ring.default = Some(Zeroizing::new(answer.into_bytes()));
        }
    }
    Ok(ring)
}

/// Encrypted layers of the chain that the ring has no key for.
fn encrypted_layers_without_keys(image: &Path, ring: &KeyRing) -> Result<Vec<PathBuf>> {
    let opts = OpenOptions {
        writable: false,
        force_share: true,
        without_keys: true,
    };
    let chain = Chain::open(image, ring, opts)?;
    Ok(chain
        .layers()
        .iter()
        .filter(|l| l.encryption() != Encryption::None)
        .filter(|l| {
            let canon = std::fs::canonicalize(l.path()).ok();
            !ring
                .per_layer
                .iter()
                .any(|(p, _)| Some(p) == canon.as_ref())
        })
        .map(|l| l.path().to_path_buf())
        .collect())
}
