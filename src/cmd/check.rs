//! `qcowfs check`: `qemu-img check` on an encrypted image, with its keys handed over safely and
//! its layers handed over as the files qcowfs opened.
//!
//! QEMU's own repair hint, `qemu-img check -r all IMAGE`, fails on every encrypted image: QEMU
//! needs `--object secret,...` and `--image-opts` with each encrypted layer's key named, and the
//! obvious `secret,data=PASSPHRASE` puts the key on the command line, where every user of the host
//! reads it in /proc. Here each key goes into an anonymous memory file (memfd) that only qemu-img
//! inherits, named as `secret,file=/proc/self/fd/N`. The keys are judged before qemu-img runs: a
//! repair with a wrong legacy AES key would not corrupt data (it rewrites metadata only), but its
//! report would be about a disk nobody can read.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;

use crate::chain::{Chain, KeyRing, Layer, OpenOptions};
use crate::error::{Error, Problem, Result};
use crate::keys::check::KeyCheck;
use crate::qcow2::Encryption;

/// What `qcowfs check` is asked to do.
#[derive(Debug, Default)]
pub struct CheckOptions {
    pub image: PathBuf,
    /// `qemu-img check -r`: "leaks" or "all".
    pub repair: Option<String>,
    /// `--output=json`.
    pub json: bool,
    /// Take no locks (a running VM's image; never with a repair).
    pub force_share: bool,
    pub backing_within: Vec<PathBuf>,
}

/// What qemu-img found, by its exit status (qemu-img(1), "check").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No errors (0), or only leaked clusters (3): harmless, space a repair reclaims (qemu-img's
    /// report, printed as it is, counts them).
    Clean,
    /// Corruptions were found (2).
    Corrupt,
}

/// Run `qemu-img check` on `opts.image` with `keys`; qemu-img's report goes to this process's
/// stdout and stderr as it prints it.
pub fn run(opts: &CheckOptions, keys: &KeyRing) -> Result<Verdict> {
    let open = |force_share: bool, without_keys: bool| {
        Chain::open(
            &opts.image,
            keys,
            OpenOptions {
                writable: false,
                force_share,
                without_keys,
                keep_rejected_keys: !without_keys,
                backing_within: opts.backing_within.clone(),
                ..Default::default()
            },
        )
    };
    // With QEMU's reader locks (unless -U): an image a VM holds is in use, said as qcowfs says it.
    KeyCheck::of(&open(opts.force_share, false)?)?.require_right()?;
    // qemu-img is handed the very files qcowfs opened (and confined), layer by layer, by
    // descriptor: left to itself it would find the backing chain again by name, protocol
    // prefixes (nbd:, json:) and all. Opened without locks, so that qemu-img takes its own.
    let chain = open(true, true)?;
    let mut secrets = Vec::new();
    let mut files = Vec::new();
    let mut objects = Vec::new();
    let mut image_opts = Vec::new();
    let mut prefix = String::new();
    for layer in chain.layers() {
        let (driver, file, encryption) = match layer {
            Layer::Qcow2(q) => ("qcow2", q.file(), q.encryption()),
            Layer::Raw(f) => ("raw", f, Encryption::None),
        };
        let fd = inherited(file).map_err(|e| Error::new(layer.path(), e))?;
        image_opts.push(format!("{prefix}driver={driver}"));
        image_opts.push(format!("{prefix}file.driver=file"));
        image_opts.push(format!(
            "{prefix}file.filename=/proc/self/fd/{}",
            fd.as_raw_fd()
        ));
        files.push(fd);
        if encryption != Encryption::None {
            let Some(key) = keys.for_layer(layer.path()) else {
                return Err(Error::new(
                    layer.path(),
                    crate::crypto::CryptoError::NoPassphrase,
                ));
            };
            let id = format!("qcowfs-key{}", secrets.len());
            let fd = secret_file(key).map_err(|e| Error::new("memfd", e))?;
            objects.push(format!(
                "secret,id={id},file=/proc/self/fd/{}",
                fd.as_raw_fd()
            ));
            image_opts.push(format!("{prefix}encrypt.key-secret={id}"));
            secrets.push(fd);
        }
        prefix.push_str("backing.");
    }
    drop(chain);
    let image_opts = image_opts.join(",");
    let mut cmd = Command::new("qemu-img");
    cmd.arg("check");
    for object in &objects {
        cmd.arg("--object").arg(object);
    }
    if let Some(mode) = &opts.repair {
        cmd.arg("-r").arg(mode);
    }
    if opts.force_share {
        cmd.arg("-U");
    }
    if opts.json {
        cmd.arg("--output=json");
    }
    cmd.arg("--image-opts").arg(&image_opts);
    let status = cmd.status().map_err(|e| {
        let err = Error::new("qemu-img", e);
        match err.os_error() {
            Some(libc::ENOENT) => err.hint("install it (Debian: apt install qemu-utils)"),
            _ => err,
        }
    })?;
    drop((secrets, files));
    match status.code() {
        Some(0 | 3) => Ok(Verdict::Clean),
        Some(2) => Ok(Verdict::Corrupt),
        code => Err(Error::new(
            &opts.image,
            Problem::Refused(format!(
                "qemu-img check could not complete ({}; its message is above)",
                match code {
                    Some(c) => format!("exit status {c}"),
                    None => "killed by a signal".to_string(),
                }
            )),
        )),
    }
}

/// A descriptor of `file` that a child inherits (dup(2) leaves close-on-exec off): qemu-img
/// opens the layer as /proc/self/fd/N.
fn inherited(file: &crate::io::HostFile) -> std::io::Result<OwnedFd> {
    let os = file
        .os_file()
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::Unsupported))?;
    // SAFETY: dup of a valid descriptor; the new one is owned by the OwnedFd.
    let fd = unsafe { libc::dup(os.as_raw_fd()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: dup returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An anonymous memory file holding `key`, inherited by the child (no close-on-exec) and by no
/// one else: no name in any folder, nothing on the command line.
fn secret_file(key: &[u8]) -> std::io::Result<OwnedFd> {
    let name = CString::new("qcowfs-key").expect("no NUL in the name");
    // SAFETY: a valid NUL-terminated name; flags 0 (inherited across exec on purpose).
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(fd.try_clone()?);
    file.write_all(key)?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_file_holds_exactly_the_key() {
        let fd = secret_file(b"pass\nword").unwrap();
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        assert_eq!(std::fs::read(path).unwrap(), b"pass\nword");
    }
}
