//! `qcowfs check`: `qemu-img check` on an encrypted image, with its keys handed over safely.
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
use std::path::{Path, PathBuf};
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
    /// No errors (0), or only leaked clusters (3): harmless, space a repair reclaims.
    Clean { leaks: bool },
    /// Corruptions were found (2).
    Corrupt,
}

/// Run `qemu-img check` on `opts.image` with `keys`; qemu-img's report goes to this process's
/// stdout and stderr as it prints it.
pub fn run(opts: &CheckOptions, keys: &KeyRing) -> Result<Verdict> {
    let chain = Chain::open(
        &opts.image,
        keys,
        OpenOptions {
            writable: false,
            force_share: true,
            without_keys: false,
            keep_rejected_keys: true,
            backing_within: opts.backing_within.clone(),
            ..Default::default()
        },
    )?;
    KeyCheck::of(&chain)?.require_right()?;
    let mut secrets = Vec::new();
    let mut objects = Vec::new();
    let mut image_opts = format!("driver=qcow2,file.filename={}", opt_value(&opts.image)?);
    let mut prefix = String::new();
    for layer in chain.layers() {
        if let Layer::Qcow2(q) = layer {
            if q.encryption() != Encryption::None {
                let Some(key) = keys.for_layer(q.path()) else {
                    return Err(Error::new(
                        q.path(),
                        crate::crypto::CryptoError::NoPassphrase,
                    ));
                };
                let id = format!("qcowfs-key{}", secrets.len());
                let fd = secret_file(key).map_err(|e| Error::new("memfd", e))?;
                objects.push(format!(
                    "secret,id={id},file=/proc/self/fd/{}",
                    fd.as_raw_fd()
                ));
                image_opts.push_str(&format!(",{prefix}encrypt.key-secret={id}"));
                secrets.push(fd);
            }
        }
        prefix.push_str("backing.");
    }
    drop(chain);
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
    drop(secrets);
    match status.code() {
        Some(0) => Ok(Verdict::Clean { leaks: false }),
        Some(3) => Ok(Verdict::Clean { leaks: true }),
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

/// A path as a value of QEMU's `key=value,...` options: a comma is doubled. Paths that QEMU's
/// option parser cannot take whole (not UTF-8) are refused by name.
fn opt_value(path: &Path) -> Result<String> {
    let Some(text) = path.to_str() else {
        return Err(Error::new(
            path,
            Problem::Refused("qemu-img cannot be given a path that is not UTF-8".into()),
        ));
    };
    Ok(text.replace(',', ",,"))
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
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn commas_in_paths_are_doubled_for_qemu() {
        assert_eq!(opt_value(Path::new("/a,b/c")).unwrap(), "/a,,b/c");
        let odd = Path::new(std::ffi::OsStr::from_bytes(b"/a\xff"));
        assert!(opt_value(odd).is_err());
    }

    #[test]
    fn the_secret_file_holds_exactly_the_key() {
        let fd = secret_file(b"pass\nword").unwrap();
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        assert_eq!(std::fs::read(path).unwrap(), b"pass\nword");
    }
}
