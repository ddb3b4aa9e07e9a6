//! `qcowfs check-key`: cryptsetup's `open --test-passphrase` for a qcow2 chain. Opens the chain
//! read-only with its keys, judges every encrypted layer's key (`keycheck`) and prints one line
//! per layer; the caller turns the verdicts into the exit status.

use std::io::Write;
use std::path::PathBuf;

use serde_json::json;

use crate::chain::{Chain, KeyRing, OpenOptions};
use crate::error::{escaped, Error, Result};
use crate::keys::check::KeyCheck;
use crate::qcow2::Encryption;

/// What to check, and how to print it.
#[derive(Debug, Default)]
pub struct CheckKeyOptions {
    pub image: PathBuf,
    pub json: bool,
    /// Take no QEMU locks (the image may be in use).
    pub force_share: bool,
    pub backing_within: Vec<PathBuf>,
}

/// Check and print; returns the verdicts (the exit status is the caller's).
pub fn run(opts: &CheckKeyOptions, keys: &KeyRing, out: &mut dyn Write) -> Result<KeyCheck> {
    let chain = Chain::open(
        &opts.image,
        keys,
        OpenOptions {
            writable: false,
            force_share: opts.force_share,
            without_keys: false,
            keep_rejected_keys: true,
            backing_within: opts.backing_within.clone(),
            ..Default::default()
        },
    )?;
    let check = KeyCheck::of(&chain)?;
    let io = |e| Error::new("stdout", e);
    if opts.json {
        for l in &check.layers {
            let line = json!({
                "path": l.path.display().to_string(),
                "level": l.level,
                "encryption": encryption_name(l.encryption),
                "verdict": l.verdict.name(),
                "detail": l.verdict.describe(),
            });
            writeln!(out, "{line}").map_err(io)?;
        }
    } else if check.layers.is_empty() {
        writeln!(
            out,
            "{}: no layer of the chain is encrypted; no passphrase to check",
            escaped(&opts.image)
        )
        .map_err(io)?;
    } else {
        for l in &check.layers {
            writeln!(
                out,
                "{} ({}): {}",
                escaped(&l.path),
                encryption_name(l.encryption),
                l.verdict.describe()
            )
            .map_err(io)?;
        }
    }
    Ok(check)
}

fn encryption_name(e: Encryption) -> &'static str {
    match e {
        Encryption::None => "none",
        Encryption::Aes => "aes",
        Encryption::Luks => "luks",
    }
}
