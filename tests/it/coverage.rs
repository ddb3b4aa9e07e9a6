//! The encryption coverage of `qcowfs info`: which share of the guest's data each layer provides
//! and how much of it is unencrypted, computed from the ranges each layer was given and checked
//! against a model of them.
//!
//! Each test prints the commands it ran (shown on failure: the steps to reproduce).

use crate::common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};

const PASS: &str = "coverage secret";

const CLUSTER: u64 = 64 * KIB;

/// What one layer holds in a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    Data,
    /// A zero cluster: hides what lies below, provides nothing.
    Zero,
}

/// The clusters each layer of a chain holds (top first), to compute what each layer provides.
struct CoverageModel {
    layers: Vec<BTreeMap<u64, Held>>,
    encrypted: Vec<bool>,
}

impl CoverageModel {
    fn new(encrypted: &[bool]) -> Self {
        CoverageModel {
            layers: vec![BTreeMap::new(); encrypted.len()],
            encrypted: encrypted.to_vec(),
        }
    }

    /// Layer `level` holds `held` in every cluster that `off..off+len` touches.
    fn mark(&mut self, level: usize, off: u64, len: u64, held: Held) {
        for c in off / CLUSTER..(off + len).div_ceil(CLUSTER) {
            self.layers[level].insert(c, held);
        }
    }

    /// Bytes each layer provides: data clusters no upper layer covers.
    fn provided(&self) -> Vec<u64> {
        let all: BTreeSet<u64> = self.layers.iter().flat_map(|l| l.keys().copied()).collect();
        let mut out = vec![0; self.layers.len()];
        for c in all {
            if let Some((level, held)) = self
                .layers
                .iter()
                .enumerate()
                .find_map(|(i, l)| l.get(&c).map(|h| (i, *h)))
            {
                if held == Held::Data {
                    out[level] += CLUSTER;
                }
            }
        }
        out
    }

    fn data_bytes(&self) -> u64 {
        self.provided().iter().sum()
    }

    fn unencrypted_bytes(&self) -> u64 {
        self.provided()
            .iter()
            .zip(&self.encrypted)
            .filter(|(_, &e)| !e)
            .map(|(p, _)| p)
            .sum()
    }
}

/// `info --json` agrees with the model: per layer provided bytes, encryption and format, and the
/// coverage totals; the text output warns exactly when some data is unencrypted.
fn assert_coverage(image: &Image, model: &CoverageModel, formats: &[&str], names: &[&str]) {
    let info = qcowfs_info_json(&image.path, &[]);
    let layers = info["layers"].as_array().expect("layers array");
    assert_eq!(layers.len(), model.layers.len(), "layers: {info:#}");
    let provided = model.provided();
    for (i, layer) in layers.iter().enumerate() {
        assert_eq!(
            layer["provided_bytes"].as_u64(),
            Some(provided[i]),
            "provided_bytes of layer {i} ({}) — expected {} ({} clusters)\n{layer:#}",
            names[i],
            provided[i],
            provided[i] / CLUSTER
        );
        assert_eq!(
            layer["encrypted"].as_bool(),
            Some(model.encrypted[i]),
            "{layer:#}"
        );
        assert_eq!(layer["format"], formats[i], "{layer:#}");
        let path = layer["path"].as_str().expect("layer path");
        assert!(
            path.ends_with(names[i]),
            "layer {i} path {path:?}, expected …{}",
            names[i]
        );
        let allocated = layer["allocated_bytes"].as_u64().expect("allocated_bytes");
        assert!(
            allocated >= provided[i],
            "layer {i}: allocated_bytes {allocated} < provided_bytes {}",
            provided[i]
        );
    }
    let coverage = &info["coverage"];
    let data = model.data_bytes();
    let plain = model.unencrypted_bytes();
    assert_eq!(coverage["data_bytes"].as_u64(), Some(data), "{coverage:#}");
    assert_eq!(
        coverage["unencrypted_bytes"].as_u64(),
        Some(plain),
        "{coverage:#}"
    );
    let share = coverage["unencrypted_share"]
        .as_f64()
        .expect("unencrypted_share");
    let want = if data == 0 {
        0.0
    } else {
        plain as f64 / data as f64
    };
    assert!(
        (share - want).abs() < 1e-6,
        "unencrypted_share {share}, expected {want} ({plain} of {data} bytes)"
    );

    let text = qcowfs(["info".as_ref(), image.path.as_os_str()]);
    text.assert_success();
    let out = text.stdout_str();
    let warnings: Vec<&str> = out
        .lines()
        .chain(text.stderr.lines())
        .filter(|l| l.starts_with("warning: "))
        .collect();
    if plain == 0 {
        assert!(warnings.is_empty(), "no warning expected:\n{out}");
        return;
    }
    assert_eq!(
        warnings.len(),
        1,
        "one warning line expected:\n{out}{}",
        text.stderr
    );
    let line = warnings[0];
    assert!(
        line.contains("% of this disk's data lives in the unencrypted"),
        "warning line {line:?}"
    );
    let percent: f64 = line["warning: ".len()..line.find('%').expect("a %")]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("percentage in {line:?}"));
    assert!(
        (percent - want * 100.0).abs() <= 1.0,
        "warning says {percent}%, the share is {:.2}%: {line:?}",
        want * 100.0
    );
    let base_name = names.last().expect("a base");
    assert!(
        line.contains(base_name),
        "the warning names the base {base_name}: {line:?}"
    );
}

#[test]
fn coverage_of_an_aes_overlay_over_a_raw_base_counts_what_each_layer_provides() {
    let dir = workdir();
    let size = 64 * MIB;
    let (top_path, base_path) = nova_paths(dir.path());
    let base = create_raw(&base_path, size);
    let mut model = CoverageModel::new(&[true, false]);
    // The raw base: cluster-aligned ranges only (what SEEK_DATA finds is exactly what was written).
    for (off, len, byte) in [
        (0, 4 * MIB, 0x41),
        (16 * MIB, 2 * MIB, 0x42),
        (40 * MIB, 256 * KIB, 0x43),
        (60 * MIB, 4 * MIB, 0x44),
    ] {
        base.write_pattern(off, len, byte);
        model.mark(1, off, len, Held::Data);
    }
    let top = qcow2(&top_path, size)
        .aes(PASS)
        .backing_named(&base, "../_base/3b2c1f0e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c")
        .create();
    // The overlay: data over part of the base and beside it, zero clusters hiding base data,
    // a small unaligned write that allocates one whole cluster.
    let mut cmds = vec![];
    for (off, len) in [(3 * MIB, 2 * MIB), (32 * MIB, MIB), (63 * MIB, 128 * KIB)] {
        cmds.push(format!("write -P 0x51 {off} {len}"));
        model.mark(0, off, len, Held::Data);
    }
    cmds.push(format!("write -P 0x52 {} 100", 50 * MIB + 10));
    model.mark(0, 50 * MIB + 10, 100, Held::Data);
    cmds.push(format!("write -z {} {}", 17 * MIB, 64 * KIB));
    model.mark(0, 17 * MIB, 64 * KIB, Held::Zero);
    cmds.push(format!("write -z -u {} {}", MIB, 128 * KIB));
    model.mark(0, MIB, 128 * KIB, Held::Zero);
    top.qemu_io(&cmds);
    assert!(
        model.unencrypted_bytes() > 0 && model.provided()[0] > 0,
        "the model has data in both layers"
    );
    assert_coverage(
        &top,
        &model,
        &["qcow2", "raw"],
        &["disk", "3b2c1f0e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c"],
    );
}

#[test]
fn coverage_counts_a_plain_qcow2_middle_layer_with_compressed_clusters_as_unencrypted() {
    let dir = workdir();
    let size = 32 * MIB;
    let base = create_raw(dir.path().join("base.raw"), size);
    let mut model = CoverageModel::new(&[true, false, false]);
    base.write_pattern(0, 8 * MIB, 0x61);
    model.mark(2, 0, 8 * MIB, Held::Data);
    let mid = qcow2(dir.path().join("mid.qcow2"), size)
        .backing_named(&base, "base.raw")
        .create();
    mid.write_pattern(2 * MIB, MIB, 0x62);
    model.mark(1, 2 * MIB, MIB, Held::Data);
    mid.write_compressed(20 * MIB, &compressible_bytes(256 * KIB as usize, 9));
    model.mark(1, 20 * MIB, 256 * KIB, Held::Data);
    mid.write_zeroes(6 * MIB, 64 * KIB);
    model.mark(1, 6 * MIB, 64 * KIB, Held::Zero);
    assert!(
        has_extent(&mid, "compressed"),
        "the middle layer has compressed clusters"
    );
    let top = qcow2(dir.path().join("top.qcow2"), size)
        .aes(PASS)
        .backing_named(&mid, "mid.qcow2")
        .create();
    top.write_pattern(2 * MIB + 512 * KIB, MIB, 0x71);
    model.mark(0, 2 * MIB + 512 * KIB, MIB, Held::Data);
    top.write_pattern(24 * MIB, 3 * MIB, 0x72);
    model.mark(0, 24 * MIB, 3 * MIB, Held::Data);
    assert_coverage(
        &top,
        &model,
        &["qcow2", "qcow2", "raw"],
        &["top.qcow2", "mid.qcow2", "base.raw"],
    );
}

#[test]
fn coverage_of_an_image_without_a_backing_file_is_fully_encrypted_and_warns_of_nothing() {
    let dir = workdir();
    let image = qcow2(dir.path().join("alone.qcow2"), 16 * MIB)
        .aes(PASS)
        .create();
    let mut model = CoverageModel::new(&[true]);
    image.write_pattern(MIB, 3 * MIB, 0x5a);
    model.mark(0, MIB, 3 * MIB, Held::Data);
    assert_coverage(&image, &model, &["qcow2"], &["alone.qcow2"]);
}
