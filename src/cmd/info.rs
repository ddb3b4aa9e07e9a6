//! `qcowfs info`: what an image is, as text or JSON. No key is needed to describe a chain.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::chain::{Chain, KeyRing, Layer, OpenOptions};
use crate::cmd::size::human;
use crate::error::{Error, Result};
use crate::io::extents;
use crate::keys::check::KeyCheck;
use crate::qcow2::{Compression, Encryption, Header};

/// What `qcowfs info` is asked to do.
#[derive(Debug, Default)]
pub struct InfoOptions {
    /// JSON instead of text.
    pub json: bool,
    /// A passphrase: each encrypted layer's key is then checked and shown.
    pub passphrase: Option<Zeroizing<Vec<u8>>>,
    /// Backing files must lie in these folders (canonical).
    pub backing_within: Vec<PathBuf>,
    /// The image to describe.
    pub image: PathBuf,
}

pub fn run(args: InfoOptions) -> Result<()> {
    let keys = KeyRing {
        default: args.passphrase,
        per_layer: Vec::new(),
    };
    let chain = Chain::open(
        &args.image,
        &keys,
        OpenOptions {
            writable: false,
            force_share: true,
            without_keys: true,
            keep_rejected_keys: true,
            backing_within: args.backing_within,
            record: None,
            faults: None,
        },
    )?;
    let mut report = describe(&chain)?;
    // With a passphrase, each encrypted layer's key is checked and shown; a wrong one then fails
    // the command once the report is printed.
    let keys = match keys.default.is_some() {
        true => Some(KeyCheck::of(&chain)?),
        false => None,
    };
    if let (Some(keys), Some(layers)) = (&keys, report["layers"].as_array_mut()) {
        for l in &keys.layers {
            if let Some(v) = layers.get_mut(l.level) {
                v["key"] = json!({"verdict": l.verdict.name(), "detail": l.verdict.describe()});
            }
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print_text(&report);
    }
    keys.map_or(Ok(()), |k| k.require_right())
}

/// A path string from the report, with control characters escaped for the terminal.
fn esc(v: &Value) -> String {
    crate::error::escaped(std::path::Path::new(v.as_str().unwrap_or("")))
}

/// The name of an encryption in every output of `info` and `audit`, text and JSON: QEMU's own
/// (`encrypt.format=aes|luks`). What "aes" is, `info` says on a line of its own.
pub(crate) fn encryption_name(e: Encryption) -> &'static str {
    match e {
        Encryption::None => "none",
        Encryption::Aes => "aes",
        Encryption::Luks => "luks",
    }
}

/// What `info` says of a legacy AES layer, beside its name.
const AES_DETAIL: &str =
    "legacy AES-128-CBC (the passphrase is the key; no key check in the format)";

fn layer_json(layer: &Layer) -> Result<Value> {
    let path = layer.path();
    let mut v = json!({
        "path": path.display().to_string(),
        "format": layer.format(),
        "encrypted": layer.encryption() != Encryption::None,
        "encryption": encryption_name(layer.encryption()),
        "virtual_size": layer.virtual_size()?,
    });
    match layer {
        Layer::Qcow2(q) => {
            v["allocated_bytes"] = json!(allocated_bytes(layer)?);
            if q.encryption() == Encryption::Luks {
                let h = crate::chain::luks_header(q)?;
                v["luks"] = json!({
                    "cipher": format!("{}-{}", h.cipher, h.key_bytes * 8 / if h.mode == "xts" { 2 } else { 1 }),
                    "mode": h.mode,
                    "ivgen": h.ivgen,
                    "hash": h.hash,
                    "active_keyslots": h.slots.iter().map(|s| s.index).collect::<Vec<_>>(),
                });
            }
        }
        Layer::Raw(_) => {
            if let Some(bytes) = allocated_bytes(layer)? {
                v["allocated_bytes"] = json!(bytes);
            }
        }
    }
    Ok(v)
}

/// The bytes of data a layer's file holds: a qcow2 layer's data clusters (mapped, not counting
/// metadata), a raw file's written extents (`io::extents`: space reserved by fallocate or mkfs
/// but never written reads as zeros and is not counted), or where the file system has no extent
/// map its allocated blocks (`st_blocks`, as `qemu-img info` shows "disk size"). None for a raw
/// layer without a host file (in memory, in unit tests).
pub(crate) fn allocated_bytes(layer: &Layer) -> Result<Option<u64>> {
    match layer {
        Layer::Qcow2(q) => q.allocated_bytes().map(Some),
        Layer::Raw(f) => match f.os_file() {
            Some(os) => {
                let meta = os.metadata().map_err(|e| Error::new(layer.path(), e))?;
                if meta.is_file() {
                    match extents::written_bytes(os, meta.len()) {
                        Ok(Some(bytes)) => return Ok(Some(bytes)),
                        Ok(None) => {}
                        Err(e) => return Err(Error::new(layer.path(), e)),
                    }
                }
                Ok(Some(meta.blocks().saturating_mul(512)))
            }
            None => Ok(None),
        },
    }
}

/// Encryption coverage of a chain: the guest data bytes each layer provides (what the guest
/// reads from it: data no layer above covers) and how much of that is not encrypted. The walk
/// maps extents through the chain, so memory stays O(layers) whatever the virtual size.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Coverage {
    /// Bytes each layer provides, top first.
    pub provided: Vec<u64>,
    /// Every byte of guest data the chain holds.
    pub data_bytes: u64,
    /// The part of `data_bytes` that unencrypted layers provide.
    pub unencrypted_bytes: u64,
}

impl Coverage {
    pub(crate) fn of(chain: &Chain) -> Result<Coverage> {
        let provided = chain.coverage()?;
        let data_bytes = provided.iter().sum();
        let unencrypted_bytes = chain
            .layers()
            .iter()
            .zip(&provided)
            .filter(|(layer, _)| layer.encryption() == Encryption::None)
            .map(|(_, bytes)| bytes)
            .sum();
        Ok(Coverage {
            provided,
            data_bytes,
            unencrypted_bytes,
        })
    }

    /// `unencrypted_bytes / data_bytes`, 0 for a chain without data.
    pub(crate) fn unencrypted_share(&self) -> f64 {
        share(self.unencrypted_bytes, self.data_bytes)
    }
}

/// `part / whole` as a fraction, 0 when `whole` is 0.
pub(crate) fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn describe(chain: &Chain) -> Result<Value> {
    let top = chain.top();
    let mut layers = chain
        .layers()
        .iter()
        .map(layer_json)
        .collect::<Result<Vec<_>>>()?;
    // Backing files that lie elsewhere on the host than the image (a name like ../../etc/shadow).
    for (layer, v) in chain.layers().iter().zip(layers.iter_mut()).skip(1) {
        let outside = crate::chain::outside_tree(top.path(), layer.path());
        v["outside_image_tree"] = json!(outside.is_some());
        if let Some(resolved) = outside {
            v["resolved_path"] = json!(resolved.display().to_string());
        }
    }
    // Encryption coverage: what the guest reads from each layer, and how much of it is plaintext.
    let cov = Coverage::of(chain)?;
    for (v, bytes) in layers.iter_mut().zip(&cov.provided) {
        v["provided_bytes"] = json!(bytes);
    }
    let coverage = json!({
        "data_bytes": cov.data_bytes,
        "unencrypted_bytes": cov.unencrypted_bytes,
        "unencrypted_share": cov.unencrypted_share(),
    });
    let mut report = json!({
        "image": top.path().display().to_string(),
        "format": top.format(),
        "virtual_size": chain.size(),
        "encrypted": top.encryption() != Encryption::None,
        "encryption": encryption_name(top.encryption()),
        "layers": layers,
        "coverage": coverage,
    });
    let q = chain.image();
    let h: Header = q.header();
    report["version"] = json!(h.version);
    report["cluster_size"] = json!(h.cluster_size());
    report["refcount_bits"] = json!(h.refcount_bits());
    report["extended_l2"] = json!(h.extended_l2());
    report["compression"] = json!(match h.compression {
        Compression::Zlib => "zlib",
        Compression::Zstd => "zstd",
    });
    report["backing_file"] = json!(h.backing_file);
    report["backing_format"] = json!(h.backing_format);
    report["features"] = json!({
        "incompatible": h.incompatible,
        "compatible": h.compatible,
        "autoclear": h.autoclear,
        "dirty": h.is_dirty(),
        "lazy_refcounts": h.compatible & crate::qcow2::header::COMPAT_LAZY_REFCOUNTS != 0,
    });
    report["snapshots"] = q
        .snapshots()
        .iter()
        .map(|s| {
            json!({
                "id": s.id,
                "name": s.name,
                "disk_size": s.disk_size,
                "vm_state_size": s.vm_state_size,
                "date": s.date_sec,
            })
        })
        .collect();
    Ok(report)
}

fn print_text(r: &Value) {
    let num = |v: &Value| v.as_u64().unwrap_or(0);
    println!("image: {}", esc(&r["image"]));
    println!("format: {}", r["format"].as_str().unwrap_or(""));
    if let Some(v) = r["version"].as_u64() {
        println!("version: {v}");
    }
    println!(
        "virtual size: {} ({} bytes)",
        human(num(&r["virtual_size"])),
        num(&r["virtual_size"])
    );
    if let Some(cs) = r["cluster_size"].as_u64() {
        println!("cluster size: {cs}");
        println!("refcount bits: {}", num(&r["refcount_bits"]));
        println!(
            "extended L2: {}",
            r["extended_l2"].as_bool().unwrap_or(false)
        );
        println!("compression: {}", r["compression"].as_str().unwrap_or(""));
    }
    println!("encryption: {}", r["encryption"].as_str().unwrap_or(""));
    if let Some(f) = r.get("features") {
        println!(
            "features: incompatible {:#x}, compatible {:#x}, autoclear {:#x}",
            num(&f["incompatible"]),
            num(&f["compatible"]),
            num(&f["autoclear"])
        );
    }
    println!("backing chain (top first):");
    for (i, l) in r["layers"].as_array().into_iter().flatten().enumerate() {
        println!(
            "  {i}: {} [{}, {}] size {}, allocated {}, provides {} of guest data",
            esc(&l["path"]),
            l["format"].as_str().unwrap_or(""),
            l["encryption"].as_str().unwrap_or(""),
            human(num(&l["virtual_size"])),
            human(num(&l["allocated_bytes"])),
            human(num(&l["provided_bytes"])),
        );
        if l["outside_image_tree"] == true {
            println!(
                "     warning: outside the image's tree: the file is {} (--backing-within refuses such files)",
                esc(&l["resolved_path"])
            );
        }
        if let Some(key) = l.get("key") {
            println!("     key: {}", key["detail"].as_str().unwrap_or(""));
        }
        if l["encryption"] == "aes" {
            println!("     AES: {AES_DETAIL}");
        }
        if let Some(luks) = l.get("luks") {
            println!(
                "     LUKS: cipher {} mode {} ivgen {} hash {}, active key slots {}",
                luks["cipher"].as_str().unwrap_or(""),
                luks["mode"].as_str().unwrap_or(""),
                luks["ivgen"].as_str().unwrap_or(""),
                luks["hash"].as_str().unwrap_or(""),
                luks["active_keyslots"],
            );
        }
    }
    let cov = &r["coverage"];
    let share = cov["unencrypted_share"].as_f64().unwrap_or(0.0);
    println!(
        "guest data: {} ({} unencrypted)",
        human(num(&cov["data_bytes"])),
        percent(share)
    );
    if let Some(w) = coverage_warning(r) {
        println!("warning: {w}");
    }
    let snaps = r["snapshots"].as_array().cloned().unwrap_or_default();
    if !snaps.is_empty() {
        println!("snapshots:");
        for s in snaps {
            println!(
                "  {} {} (disk size {})",
                s["id"].as_str().unwrap_or(""),
                s["name"].as_str().unwrap_or(""),
                num(&s["disk_size"])
            );
        }
    }
}

/// One plain sentence when some of the guest's data is not encrypted, naming the biggest such layer.
fn coverage_warning(r: &Value) -> Option<String> {
    let share = r["coverage"]["unencrypted_share"].as_f64()?;
    if share <= 0.0 {
        return None;
    }
    let layers = r["layers"].as_array()?;
    let (index, plain) = layers
        .iter()
        .enumerate()
        .filter(|(_, l)| l["encrypted"] == json!(false))
        .max_by_key(|(_, l)| l["provided_bytes"].as_u64().unwrap_or(0))?;
    let kind = if index == 0 { "image" } else { "base image" };
    Some(format!(
        "{} of this disk's data lives in the unencrypted {kind} {}",
        percent(share),
        esc(&plain["path"])
    ))
}

/// A share as a whole percentage, "<1%" for a small non-zero one.
pub(crate) fn percent(share: f64) -> String {
    if share > 0.0 && share < 0.005 {
        "<1%".to_string()
    } else {
        format!("{:.0}%", share * 100.0)
    }
}
