//! The one check that a passphrase is right, for every command that decrypts: `mount`, `seal`,
//! `info`, `ls`/`cat`/`copy-out` and `check-key`.
//!
//! LUKS checks its own key: a key slot opens only with the right passphrase (its digest), and the
//! chain records a layer whose slots all refused it. Legacy AES (`encryption=on`) has no check at
//! all: any passphrase gives a cipher, and a wrong one reads noise and writes data that the right
//! one reads as noise. So its key is judged by what it decrypts: up to [`SAMPLES`] allocated
//! clusters of the layer, spread over it, must not all decrypt to noise. A layer with no data yet
//! cannot be judged; a command that would write with its key refuses unless told
//! `--unverified-key`, since whatever it writes is then readable only with the key given.

use std::path::{Path, PathBuf};

use crate::chain::{Chain, Layer};
use crate::crypto::{looks_like_plaintext, CryptoError, SECTOR_SIZE};
use crate::error::{Error, Result};
use crate::qcow2::Encryption;

/// Clusters sampled per legacy AES layer.
pub const SAMPLES: usize = 32;
/// Data clusters of a layer looked at to find `SAMPLES` stored as ciphertext.
const CANDIDATES: usize = 4096;

/// What a writing command lets through, from its flags.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyPolicy {
    /// `--force`: no check at all (a guest whose own data is encrypted or random decrypts to
    /// noise under the right key too; nothing can tell it from a wrong one).
    pub force: bool,
    /// `--unverified-key`: a top layer without data yet may be written with the key given.
    pub unverified_key: bool,
}

/// What the check found for one encrypted layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// LUKS: a key slot opened with the passphrase (its digest matched).
    SlotOpened,
    /// Legacy AES: `plausible` of `sampled` clusters decrypt to data rather than noise.
    Plausible { plausible: usize, sampled: usize },
    /// Legacy AES: every one of `sampled` clusters decrypts to noise.
    Noise { sampled: usize },
    /// LUKS: no key slot opens with the passphrase.
    Rejected,
    /// Legacy AES, and the layer holds no data yet: nothing to check the key against.
    NoData,
    /// No passphrase was given for this layer.
    NoKey,
}

impl Verdict {
    pub fn is_verified(self) -> bool {
        matches!(self, Verdict::SlotOpened | Verdict::Plausible { .. })
    }

    pub fn is_wrong(self) -> bool {
        matches!(self, Verdict::Noise { .. } | Verdict::Rejected)
    }

    /// One phrase for messages and `check-key`'s lines.
    pub fn describe(self) -> String {
        match self {
            Verdict::SlotOpened => "verified (a LUKS key slot opens with it)".into(),
            Verdict::Plausible { plausible, sampled } => format!(
                "verified ({plausible} of {sampled} sampled clusters decrypt to data, not noise)"
            ),
            Verdict::Noise { sampled } => {
                format!("wrong passphrase (all {sampled} sampled clusters decrypt to noise)")
            }
            Verdict::Rejected => "wrong passphrase (no LUKS key slot opens with it)".into(),
            Verdict::NoData => "cannot be verified (legacy AES has no key check and the layer \
                                holds no encrypted data yet)"
                .into(),
            Verdict::NoKey => "no passphrase given".into(),
        }
    }

    /// The machine name (`check-key --json`, `info --json`).
    pub fn name(self) -> &'static str {
        match self {
            Verdict::SlotOpened | Verdict::Plausible { .. } => "verified",
            Verdict::Noise { .. } | Verdict::Rejected => "wrong",
            Verdict::NoData => "unverifiable",
            Verdict::NoKey => "no-key",
        }
    }
}

/// One encrypted layer and its verdict.
#[derive(Debug, Clone)]
pub struct LayerKey {
    pub path: PathBuf,
    pub encryption: Encryption,
    /// 0 for the image named, then down the backing chain.
    pub level: usize,
    pub verdict: Verdict,
}

/// The verdicts of every encrypted layer of a chain, top first.
#[derive(Debug, Clone, Default)]
pub struct KeyCheck {
    pub layers: Vec<LayerKey>,
}

impl KeyCheck {
    /// Judge every encrypted layer of `chain` (opened with its keys).
    pub fn of(chain: &Chain) -> Result<KeyCheck> {
        let mut layers = Vec::new();
        for (level, layer) in chain.layers().iter().enumerate() {
            let Layer::Qcow2(image) = layer else { continue };
            let encryption = image.encryption();
            let verdict = match encryption {
                Encryption::None => continue,
                _ if chain.key_rejected(level) => Verdict::Rejected,
                _ if !image.has_cipher() => Verdict::NoKey,
                Encryption::Luks => Verdict::SlotOpened,
                Encryption::Aes => judge_aes(chain, level)?,
            };
            layers.push(LayerKey {
                path: image.path().to_path_buf(),
                encryption,
                level,
                verdict,
            });
        }
        Ok(KeyCheck { layers })
    }

    /// Every encrypted layer's key verified (true for a chain without encryption).
    pub fn all_verified(&self) -> bool {
        self.layers.iter().all(|l| l.verdict.is_verified())
    }

    /// A legacy AES layer whose key is not verified: a wrong key there reads as noise, so it
    /// may explain a disk where nothing readable is found.
    pub fn aes_unverified(&self) -> bool {
        self.layers
            .iter()
            .any(|l| l.encryption == Encryption::Aes && !l.verdict.is_verified())
    }

    /// For commands that only read: refuse a wrong key, before anything reads noise as data. A
    /// layer without data reads nothing, so nothing is refused for it.
    pub fn require_right(&self) -> Result<()> {
        match self.layers.iter().find(|l| l.verdict.is_wrong()) {
            Some(l) => Err(wrong(l)),
            None => Ok(()),
        }
    }

    /// For commands that write: refuse a wrong key on any layer (what is copied up from a layer
    /// is read with its key), and a top layer whose key cannot be verified unless
    /// `allow_unverified` (`--unverified-key`): new data is encrypted with it.
    pub fn require_for_writing(&self, allow_unverified: bool) -> Result<()> {
        self.require_right()?;
        match self.layers.iter().find(|l| l.level == 0) {
            Some(top) if top.verdict == Verdict::NoData && !allow_unverified => {
                Err(Error::new(&top.path, CryptoError::Unverifiable))
            }
            Some(top) if top.verdict == Verdict::NoKey => {
                Err(Error::new(&top.path, CryptoError::NoPassphrase))
            }
            _ => Ok(()),
        }
    }

    /// `require_for_writing` as `policy` allows.
    pub fn enforce_for_writing(&self, policy: KeyPolicy) -> Result<()> {
        match policy.force {
            true => Ok(()),
            false => self.require_for_writing(policy.unverified_key),
        }
    }

    /// What a mount lets through (unless `--force`, which skips the check): a writable one
    /// refuses as `require_for_writing` does and returns a warning for each layer it writes with a
    /// key that cannot be verified; a read-only one only shows garbage with a wrong key: a warning.
    pub fn judge_mount(&self, read_only: bool, policy: KeyPolicy) -> Result<Vec<String>> {
        if read_only {
            return Ok(self
                .require_right()
                .err()
                .map(|e| format!("warning: {e}"))
                .into_iter()
                .collect());
        }
        self.require_for_writing(policy.unverified_key)?;
        Ok(self
            .layers
            .iter()
            .filter(|l| l.verdict == Verdict::NoData)
            .map(|l| {
                format!(
                    "warning: {}: the passphrase {}; new data is encrypted with the one given \
                     (--unverified-key)",
                    crate::error::escaped(&l.path),
                    l.verdict.describe()
                )
            })
            .collect())
    }

    /// The layer at `path`, if it is encrypted.
    pub fn layer(&self, path: &Path) -> Option<&LayerKey> {
        self.layers.iter().find(|l| l.path == path)
    }
}

/// The error for a layer whose key is wrong.
fn wrong(layer: &LayerKey) -> Error {
    let problem = match layer.verdict {
        Verdict::Noise { sampled } => CryptoError::LooksWrong { sampled },
        _ => CryptoError::WrongPassphrase,
    };
    Error::new(&layer.path, problem)
}

/// Decrypt the first sector of up to [`SAMPLES`] data clusters of the AES layer at `level`; only
/// sectors stored as noise are judged (see above), and a layer without one has `NoData`.
fn judge_aes(chain: &Chain, level: usize) -> Result<Verdict> {
    let Layer::Qcow2(image) = &chain.layers()[level] else {
        return Ok(Verdict::NoData);
    };
    // Every data cluster of the first few thousand, visited spread out: clusters stored as zeros
    // (a preallocated image is mostly those) are skipped until enough informative ones are found.
    let candidates = image.sample_data_clusters(CANDIDATES)?;
    if candidates.is_empty() {
        return Ok(Verdict::NoData);
    }
    let stride = candidates.len().div_ceil(SAMPLES).max(1);
    let spread = (0..stride).flat_map(|first| candidates.iter().skip(first).step_by(stride));
    let mut sector = [0u8; SECTOR_SIZE];
    let mut stored = [0u8; SECTOR_SIZE];
    let (mut plausible, mut sampled) = (0, 0);
    for &(guest, host) in spread {
        if sampled == SAMPLES {
            break;
        }
        let aligned = guest & !(SECTOR_SIZE as u64 - 1);
        let host = host & !(SECTOR_SIZE as u64 - 1);
        // Only a sector stored as ciphertext (noise) can tell a key: one stored as zeros (a hole,
        // a preallocated cluster, data lost in a power cut) decrypts to a 16-byte pattern that
        // looks like data under any key.
        if image.file().read_at(host, &mut stored).is_err() || looks_like_plaintext(&stored) {
            continue;
        }
        // A cluster that cannot be read says nothing about the key (the read fails later, named).
        if chain.read_level(level, aligned, &mut sector).is_err() {
            continue;
        }
        sampled += 1;
        if looks_like_plaintext(&sector) {
            plausible += 1;
        }
    }
    if sampled == 0 {
        return Ok(Verdict::NoData);
    }
    Ok(match plausible {
        0 => Verdict::Noise { sampled },
        _ => Verdict::Plausible { plausible, sampled },
    })
}

#[cfg(test)]
#[path = "check/tests.rs"]
mod tests;
