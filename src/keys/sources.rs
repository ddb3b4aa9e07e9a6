//! Where passphrases come from: a file, a base64 file (as `virsh secret-get-value` prints it),
//! libvirt's secret store, per-layer files, or the terminal, read into memory that is zeroized when
//! dropped; and which encrypted layers of a chain are left without one. The command line names the
//! sources ([`KeySources`]); the chain only applies the keys it is given.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::chain::{Chain, KeyRing, OpenOptions};
use crate::crypto::CryptoError;
use crate::error::{Error, Problem, Result, Role};
use crate::qcow2::Encryption;

/// Room reserved for a key file's contents before reading it.
const KEY_FILE_CAPACITY: usize = 4096;

/// Where libvirt keeps the values of persistent secrets, one `UUID.base64` file per secret.
pub const LIBVIRT_SECRETS_DIR: &str = "/etc/libvirt/secrets";
/// Overrides [`LIBVIRT_SECRETS_DIR`]; meant for tests.
pub const LIBVIRT_SECRETS_DIR_ENV: &str = "QCOWFS_LIBVIRT_SECRETS_DIR";

/// The passphrase sources a command was given.
#[derive(Debug, Default, Clone)]
pub struct KeySources {
    /// A passphrase file ('-' is stdin).
    pub passphrase_file: Option<PathBuf>,
    /// A base64 passphrase file ('-' is stdin).
    pub passphrase_base64_file: Option<PathBuf>,
    /// A libvirt secret UUID, normalized.
    pub libvirt_secret: Option<String>,
    /// `PATH=FILE`: the passphrase file for one layer of the chain.
    pub layer_passphrase_files: Vec<String>,
    /// How many passphrases the terminal prompt takes before a wrong one is final (0 is 1).
    pub tries: u32,
}

/// Read a passphrase file ('-' is stdin); one trailing newline is dropped.
pub fn read_passphrase(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let mut data = read_all(path)?;
    if data.last() == Some(&b'\n') {
        data.pop();
    }
    Ok(data)
}

/// The whole of a key file ('-' is stdin), in memory that is zeroized when dropped.
fn read_all(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    // Key files are small; reserving up front keeps a growing Vec from leaving copies behind.
    let mut data = Zeroizing::new(Vec::with_capacity(KEY_FILE_CAPACITY));
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_end(&mut data)
            .map_err(|e| Error::new("<stdin>", e))?;
    } else {
        let key_file = |e| Error::new(path, e).as_role(Role::PassphraseFile);
        let mut f = std::fs::File::open(path).map_err(key_file)?;
        warn_if_others_can_read(path, &f);
        f.read_to_end(&mut data).map_err(key_file)?;
    }
    Ok(data)
}

/// A key file that group or others may read is used, with a warning naming it and its mode (as
/// ssh does for keys; a regular file only: a pipe or /dev/stdin has no mode worth telling).
fn warn_if_others_can_read(path: &Path, f: &std::fs::File) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = f.metadata() else { return };
    let mode = meta.permissions().mode() & 0o7777;
    if meta.is_file() && mode & 0o044 != 0 {
        eprintln!(
            "qcowfs: warning: passphrase file {}: readable by {} (mode {mode:04o}); chmod 600 it",
            crate::error::escaped(path),
            if mode & 0o004 != 0 {
                "everyone"
            } else {
                "its group"
            }
        );
    }
}

/// Read a file of base64 text ('-' is stdin), as `virsh secret-get-value` prints it, and decode it.
/// Whitespace anywhere (line breaks, a trailing newline) is ignored; padding is optional.
pub fn read_base64_passphrase(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    use base64::Engine;
    let text = read_all(path)?;
    let compact: Zeroizing<Vec<u8>> = Zeroizing::new(
        text.iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect(),
    );
    if compact.is_empty() {
        return Err(
            Error::new(path, Problem::Usage("empty (base64 text expected)".into()))
                .as_role(Role::PassphraseFile),
        );
    }
    // Sized up front: a Vec that grew would leave copies of the key behind in freed memory.
    let mut key = Zeroizing::new(vec![0u8; compact.len().div_ceil(4) * 3]);
    let n = base64::engine::general_purpose::STANDARD_PAD_INDIFFERENT
        .decode_slice(&compact[..], &mut key[..])
        .map_err(|_| {
            let why = "not base64 (a plain passphrase? use --passphrase-file)";
            Error::new(path, Problem::Usage(why.into())).as_role(Role::PassphraseFile)
        })?;
    key.truncate(n);
    Ok(key)
}

/// The file holding libvirt secret `uuid`'s value: `UUID.base64` in [`LIBVIRT_SECRETS_DIR`], or in
/// `$QCOWFS_LIBVIRT_SECRETS_DIR` when set (for tests).
pub fn libvirt_secret_path(uuid: &str) -> PathBuf {
    let dir = std::env::var_os(LIBVIRT_SECRETS_DIR_ENV)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(LIBVIRT_SECRETS_DIR));
    dir.join(format!("{uuid}.base64"))
}

/// The value of libvirt secret `uuid`, read from libvirt's secret store on this host.
pub fn read_libvirt_secret(uuid: &str) -> Result<Zeroizing<Vec<u8>>> {
    let path = libvirt_secret_path(uuid);
    match std::fs::metadata(&path) {
        Ok(_) => read_base64_passphrase(&path),
        Err(e) => {
            let why = match e.kind() {
                std::io::ErrorKind::NotFound => {
                    "the secret is not in libvirt's secret store on this host (ephemeral secrets \
                     never are)"
                }
                std::io::ErrorKind::PermissionDenied => {
                    "libvirt's secret store is readable by root only"
                }
                _ => "libvirt's secret store cannot be read",
            };
            Err(Error::new(&path, e).hint(why))
        }
    }
}

impl KeySources {
    /// The passphrase for every encrypted layer, from whichever source is named (at most one: the
    /// command line enforces it), or `None`.
    pub fn default_passphrase(&self) -> Result<Option<Zeroizing<Vec<u8>>>> {
        if let Some(p) = &self.passphrase_file {
            return read_passphrase(p).map(Some);
        }
        if let Some(p) = &self.passphrase_base64_file {
            return read_base64_passphrase(p).map(Some);
        }
        if let Some(uuid) = &self.libvirt_secret {
            return read_libvirt_secret(uuid).map(Some);
        }
        Ok(None)
    }

    /// The key ring for `image`'s chain; with `prompt`, ask on the terminal when an encrypted layer
    /// has no key from any source.
    pub fn key_ring(&self, image: &Path, prompt: bool, within: &[PathBuf]) -> Result<KeyRing> {
        let mut ring = KeyRing {
            default: self.default_passphrase()?,
            ..KeyRing::default()
        };
        for spec in &self.layer_passphrase_files {
            let Some((layer, file)) = spec.split_once('=') else {
                return Err(Error::new(
                    spec,
                    Problem::Usage("--layer-passphrase-file takes PATH=FILE".into()),
                ));
            };
            let layer_path = PathBuf::from(layer);
            let canon = std::fs::canonicalize(&layer_path).map_err(|e| {
                let why = crate::error::io_text(&e);
                let why = format!("the layer named by --layer-passphrase-file: {why}");
                Error::new(&layer_path, Problem::Usage(why))
            })?;
            ring.per_layer
                .push((canon, read_passphrase(Path::new(file))?));
        }
        // Each key given for a layer must name one: a mistyped path would otherwise leave that
        // layer to the default passphrase (or the prompt) without a word.
        let layers = match ring.per_layer.is_empty() && ring.default.is_some() {
            true => Vec::new(),
            false => chain_layers(image, &ring, within)?,
        };
        for (given, _) in &ring.per_layer {
            if !layers.iter().any(|(path, _)| path == given) {
                let names: Vec<String> = layers
                    .iter()
                    .map(|(p, _)| crate::error::escaped(p))
                    .collect();
                return Err(Error::new(
                    given,
                    Problem::Usage(format!(
                        "--layer-passphrase-file names no layer of {}'s chain ({})",
                        crate::error::escaped(image),
                        names.join(", ")
                    )),
                ));
            }
        }
        if ring.default.is_none() {
            let missing: Vec<&PathBuf> = layers
                .iter()
                .filter(|(path, encryption)| {
                    *encryption != Encryption::None
                        && !ring.per_layer.iter().any(|(p, _)| p == path)
                })
                .map(|(path, _)| path)
                .collect();
            if let Some(first) = missing.first() {
                if !prompt || !std::io::stdin().is_terminal() {
                    return Err(Error::new(first, CryptoError::NoPassphrase));
                }
                self.prompt(image, &mut ring, within)?;
            }
        }
        Ok(ring)
    }

    /// Ask on the terminal for the passphrase of `image`'s chain until one is not found wrong, at
    /// most `tries` times, as cryptsetup does: a mistyped passphrase costs a retype, not a
    /// rerun. A passphrase that cannot be judged (legacy AES without data) is taken; the command
    /// judges it again as it needs.
    fn prompt(&self, image: &Path, ring: &mut KeyRing, within: &[PathBuf]) -> Result<()> {
        let tries = self.tries.max(1);
        for attempt in 1..=tries {
            let answer = rpassword::prompt_password(format!(
                "Passphrase for {}: ",
                crate::error::escaped(image)
            ))
            .map_err(|e| Error::new(image, e))?;
            ring.default = Some(Zeroizing::new(answer.into_bytes()));
            let opts = OpenOptions {
                writable: false,
                force_share: true,
                without_keys: false,
                keep_rejected_keys: true,
                backing_within: within.to_vec(),
                record: None,
                faults: None,
            };
            let chain = Chain::open(image, ring, opts)?;
            match crate::keys::check::KeyCheck::of(&chain)?.require_right() {
                Ok(()) => return Ok(()),
                Err(e) if attempt == tries => return Err(e),
                Err(e) => eprintln!("qcowfs: {e}; try again ({} left)", tries - attempt),
            }
        }
        Ok(())
    }
}

/// The layers of `image`'s chain, top first: each one's canonical path and encryption (read
/// without keys).
fn chain_layers(
    image: &Path,
    ring: &KeyRing,
    within: &[PathBuf],
) -> Result<Vec<(PathBuf, Encryption)>> {
    let opts = OpenOptions {
        writable: false,
        force_share: true,
        without_keys: true,
        keep_rejected_keys: false,
        backing_within: within.to_vec(),
        record: None,
        faults: None,
    };
    let chain = Chain::open(image, ring, opts)?;
    Ok(chain
        .layers()
        .iter()
        .map(|l| {
            let path = std::fs::canonicalize(l.path()).unwrap_or_else(|_| l.path().to_path_buf());
            (path, l.encryption())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_files_ignore_whitespace_and_padding() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, &[u8]); 4] = [
            ("c2VjcmV0\n", b"secret"),
            ("  c2Vj\r\ncmV0 \n\n", b"secret"),
            ("aHVudGVyMg==\n", b"hunter2"),
            ("aHVudGVyMg\n", b"hunter2"),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("k{i}"));
            std::fs::write(&path, text).unwrap();
            assert_eq!(
                &read_base64_passphrase(&path).unwrap()[..],
                *want,
                "{text:?}"
            );
        }
    }

    #[test]
    fn bad_base64_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [("empty", " \n"), ("junk", "not*base64!\n")] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let e = read_base64_passphrase(&path).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
    }
}
