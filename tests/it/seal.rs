//! `qcowfs seal` and the clusters that read as zeros (issue 17): a base's explicitly written zeros
//! (ext4's journal, zeroed inode tables: allocated in the raw file, zeros all the same) are not
//! copied into the sealed image, so it is about as small as `qemu-img convert` of the same chain
//! would make it; with extended L2 subclusters, over three layers, and under AES and LUKS alike.
//! qemu-img is the oracle: `compare` with the chain's raw view, `check` clean, `map` of what the
//! sealed image allocated. The tests of seal's other promises are in tests/it/seal_chain.rs.
//!
//! Each test prints the commands it ran (shown on failure: the steps to reproduce).

use crate::common;

use common::*;
use std::ffi::OsString;
use std::fs;
use std::path::Path;

const PASS: &str = "seal secret";
const CLUSTER: u64 = 64 * KIB;

#[derive(Clone, Copy, Debug)]
enum Cipher {
    Aes,
    Luks,
}

impl Cipher {
    fn name(self) -> &'static str {
        match self {
            Cipher::Aes => "aes",
            Cipher::Luks => "luks",
        }
    }
}

/// `qcowfs seal --passphrase-file KEY IMAGE`, which must succeed.
fn seal(image: &Path, dir: &Path) -> Run {
    let key = passphrase_file(dir, "passphrase", PASS);
    let args: Vec<OsString> = vec![
        "seal".into(),
        "--passphrase-file".into(),
        key.into(),
        image.into(),
    ];
    let r = qcowfs(&args);
    r.assert_success();
    r
}

/// The number seal's summary gives for the clusters it left unallocated because they read as zeros.
fn zero_clusters_reported(r: &Run) -> u64 {
    let out = r.stdout_str();
    let before = out
        .split(" cluster(s) that read as zeros")
        .next()
        .filter(|b| b.len() < out.len())
        .unwrap_or_else(|| panic!("seal's summary does not count the zero clusters:\n{out}"));
    let n = before.rsplit('(').next().unwrap_or_default();
    n.parse()
        .unwrap_or_else(|_| panic!("no count before \"cluster(s)\" in seal's summary:\n{out}"))
}

/// The top image alone (only its own secret): after sealing it has no backing file.
fn alone(top: &Image) -> Image {
    Image {
        path: top.path.clone(),
        format: Format::Qcow2,
        size: top.size,
        secrets: vec![top.secrets[0].clone()],
    }
}

/// Guest ranges `(start, end)` whose data `image`'s own layer stores (`qemu-img map`: depth 0,
/// data true).
fn own_data(image: &Image) -> Vec<(u64, u64)> {
    qemu_map(image)
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| {
            let start = e["start"].as_u64().expect("start");
            (start, start + e["length"].as_u64().expect("length"))
        })
        .collect()
}

/// Guest ranges a layer below the top provides data for (`qemu-img map` of the chain: depth > 0,
/// data true): what seal reads from the backing chain.
fn data_below(image: &Image) -> Vec<(u64, u64)> {
    qemu_map(image)
        .iter()
        .filter(|e| e["depth"].as_u64() > Some(0) && e["data"] == true)
        .map(|e| {
            let start = e["start"].as_u64().expect("start");
            (start, start + e["length"].as_u64().expect("length"))
        })
        .collect()
}

fn overlaps(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    ranges.iter().any(|&(s, e)| s < end && start < e)
}

/// The whole clusters inside `[start, end)`.
fn whole_clusters(start: u64, end: u64) -> (u64, u64) {
    (start.div_ceil(CLUSTER) * CLUSTER, end / CLUSTER * CLUSTER)
}

/// Asserts that the sealed image stores nothing in `[start, end)` (whole clusters of it).
fn assert_unallocated(sealed: &Image, start: u64, end: u64, what: &str) {
    let (s, e) = whole_clusters(start, end);
    let data = own_data(sealed);
    if let Some(&(a, b)) = data.iter().find(|&&(a, b)| a < e && s < b) {
        panic!(
            "{what}: the sealed image allocated guest {a:#x}..{b:#x} inside the zero region \
             {s:#x}..{e:#x}"
        );
    }
}

/// After a seal: no backing file, `qemu-img check` clean, and the guest view the chain had.
fn assert_sealed_as(sealed: &Image, recorded_raw: &Path) {
    let info = sealed.qemu_info();
    assert!(
        info.get("backing-filename").is_none() && info.get("full-backing-filename").is_none(),
        "qemu-img info still shows a backing file:\n{info:#}"
    );
    assert_eq!(info["encrypted"], true, "{info:#}");
    assert_check_clean(sealed);
    let r = qemu_compare_with_raw(sealed, recorded_raw);
    assert!(
        r.status.success(),
        "qemu-img compare of the sealed image with the chain's raw view: {}\n{}{}",
        describe_status(r.status),
        r.stdout_str(),
        r.stderr
    );
}

/// Clusters seal should leave unallocated: some byte comes from below (`below`), the top does not
/// store it (`own`), and the chain reads all zeros there (`raw`).
fn expected_zero_clusters(raw: &[u8], below: &[(u64, u64)], own: &[(u64, u64)]) -> u64 {
    (0..raw.len() as u64)
        .step_by(CLUSTER as usize)
        .filter(|&c| {
            let end = (c + CLUSTER).min(raw.len() as u64);
            overlaps(below, c, end)
                && !overlaps(own, c, end)
                && raw[c as usize..end as usize].iter().all(|&b| b == 0)
        })
        .count() as u64
}

/// `qemu-img convert -O qcow2 -o encrypt.format=CIPHER` of `top`'s chain into `dest`: the size
/// QEMU's own way of making one encrypted image gives.
fn convert_encrypted(top: &Image, dest: &Path, cipher: Cipher) -> u64 {
    let (mut args, target) = top.qemu_open_args();
    args.insert(0, "convert".into());
    args.extend([
        "--object".into(),
        format!("secret,id=out,data={PASS}"),
        target,
        "-O".into(),
        "qcow2".into(),
        "-o".into(),
        format!(
            "encrypt.format={},encrypt.key-secret=out{}",
            cipher.name(),
            match cipher {
                Cipher::Aes => "",
                Cipher::Luks => ",encrypt.iter-time=10",
            }
        ),
        dest.to_str().expect("UTF-8 path").into(),
    ]);
    qemu_img(&args);
    fs::metadata(dest).expect("converted image").len()
}

/// A 48 MiB raw base in the nova layout: data, explicitly written (allocated) zeros, more data, a
/// zero region that starts inside a cluster, a long zero region, then a hole; under a 64 MiB
/// encrypted overlay with writes of its own. Sealed, it must allocate none of the zero regions and
/// be within 2% (plus a few clusters of metadata) of what `qemu-img convert` makes.
fn sealing_skips_what_reads_as_zeros(cipher: Cipher) {
    let dir = workdir();
    let base = create_raw(dir.path().join("base.raw"), 48 * MIB);
    base.write_random(0, 4 * MIB as usize, 1);
    base.write_pattern(4 * MIB, 8 * MIB, 0); // 4..12 MiB: the journal
    base.write_random(12 * MIB, (8 * MIB + 100 * KIB) as usize, 2); // to 20 MiB + 100 KiB
    base.write_pattern(20 * MIB + 100 * KIB, 20 * MIB - 100 * KIB, 0); // to 40 MiB
    let zero_regions = [(4 * MIB, 12 * MIB), (20 * MIB + 100 * KIB, 40 * MIB)];
    let base_map = qemu_map(&base);
    for &(s, e) in &zero_regions {
        assert!(
            base_map
                .iter()
                .filter(|x| x["data"] == true)
                .any(|x| x["start"].as_u64() <= Some(s)
                    && x["start"].as_u64().zip(x["length"].as_u64()).map(|(a, l)| a + l)
                        >= Some(e)),
            "the base must store its zeros {s:#x}..{e:#x} (allocated in the raw file):\n{base_map:#?}"
        );
    }
    let builder = qcow2(dir.path().join("disk"), 64 * MIB).backing_named(&base, "base.raw");
    let top = match cipher {
        Cipher::Aes => builder.aes(PASS),
        Cipher::Luks => builder.luks(PASS),
    }
    .create();
    top.write_random(2 * MIB, MIB as usize, 3); // over base data
    top.write_random(6 * MIB, 256 * KIB as usize, 4); // inside the journal: the top's own
    top.write_random(50 * MIB, 512 * KIB as usize, 5); // past the base's end
    let recorded = dir.path().join("chain.raw");
    top.convert_raw(&recorded);
    let raw = fs::read(&recorded).expect("read the chain's raw view");
    let expected = expected_zero_clusters(&raw, &data_below(&top), &own_data(&top));
    let converted = convert_encrypted(&top, &dir.path().join("converted.qcow2"), cipher);

    let r = seal(&top.path, dir.path());
    let sealed = alone(&top);
    assert_sealed_as(&sealed, &recorded);
    assert_eq!(
        zero_clusters_reported(&r),
        expected,
        "clusters seal left unallocated, by its summary:\n{}",
        r.stdout_str()
    );
    assert_unallocated(
        &sealed,
        4 * MIB,
        6 * MIB,
        "the journal before the top's write",
    );
    assert_unallocated(
        &sealed,
        6 * MIB + 256 * KIB,
        12 * MIB,
        "the journal after it",
    );
    assert_unallocated(
        &sealed,
        20 * MIB + 100 * KIB,
        40 * MIB,
        "the second zero region",
    );
    assert_unallocated(
        &sealed,
        40 * MIB,
        50 * MIB,
        "the base's hole and past its end",
    );
    let size = fs::metadata(&sealed.path).expect("sealed image").len();
    eprintln!(
        "{}: sealed {size} bytes ({:.2} MiB), qemu-img convert {converted} bytes ({:.2} MiB); \
         {expected} zero clusters left unallocated",
        cipher.name(),
        size as f64 / MIB as f64,
        converted as f64 / MIB as f64
    );
    let margin = converted / 50 + 4 * CLUSTER;
    assert!(
        size <= converted + margin,
        "{}: the sealed image is {size} bytes, qemu-img convert of the same chain {converted} \
         (allowed: {margin} more)",
        cipher.name()
    );
}

#[test]
fn sealing_an_aes_overlay_leaves_the_bases_zero_regions_unallocated_and_is_as_small_as_qemu_img_convert(
) {
    sealing_skips_what_reads_as_zeros(Cipher::Aes);
}

#[test]
fn sealing_a_luks_overlay_leaves_the_bases_zero_regions_unallocated_and_is_as_small_as_qemu_img_convert(
) {
    sealing_skips_what_reads_as_zeros(Cipher::Luks);
}

/// Extended L2: clusters the top holds some subclusters of. Over base data the cluster is copied
/// and the top's own subclusters kept; over base zeros, a cluster whose own subclusters hold zeros
/// too is left as it is (its other subclusters read zeros once the backing file is gone), and one
/// whose own subclusters hold data is copied.
#[test]
fn sealing_an_extended_l2_overlay_keeps_its_own_subclusters_and_skips_clusters_that_read_as_zeros()
{
    let dir = workdir();
    let base = create_raw(dir.path().join("base.raw"), 8 * MIB);
    base.write_random(0, 2 * MIB as usize, 11);
    base.write_pattern(2 * MIB, 4 * MIB, 0); // 2..6 MiB, allocated zeros
    let top = qcow2(dir.path().join("disk"), 8 * MIB)
        .extended_l2()
        .aes(PASS)
        .backing_named(&base, "base.raw")
        .create();
    top.write_random(4 * KIB, 4 * KIB as usize, 12); // a subcluster over base data
    top.write_random(CLUSTER + 6 * KIB, 2 * KIB as usize, 13); // part of one
    top.write_pattern(3 * MIB + 8 * KIB, 4 * KIB, 0); // zeros of its own over base zeros
    top.write_random(4 * MIB + 32 * KIB, 4 * KIB as usize, 14); // data over base zeros
    let recorded = dir.path().join("chain.raw");
    top.convert_raw(&recorded);

    let r = seal(&top.path, dir.path());
    let sealed = alone(&top);
    assert_sealed_as(&sealed, &recorded);
    // 2..6 MiB is 64 clusters; the one at 4 MiB holds data and is copied.
    assert_eq!(zero_clusters_reported(&r), 63, "{}", r.stdout_str());
    assert_unallocated(
        &sealed,
        2 * MIB,
        3 * MIB,
        "base zeros before the top's zeros",
    );
    assert_unallocated(&sealed, 3 * MIB + CLUSTER, 4 * MIB, "base zeros between");
    assert_unallocated(
        &sealed,
        4 * MIB + CLUSTER,
        8 * MIB,
        "base zeros and hole after",
    );
    let data = own_data(&sealed);
    assert!(
        overlaps(&data, 3 * MIB + 8 * KIB, 3 * MIB + 12 * KIB),
        "the top's own zero subcluster is still its own: {data:?}"
    );
    assert!(
        !overlaps(&data, 3 * MIB, 3 * MIB + 8 * KIB),
        "the subclusters beside it stay unallocated: {data:?}"
    );
}

/// Three layers: what reads as zeros is judged through all of them. A middle layer's stored
/// zeros and zero cluster over base data read zeros and are not copied; its data over base zeros
/// is.
#[test]
fn sealing_a_three_layer_chain_judges_zeros_through_every_layer() {
    let dir = workdir();
    let size = 8 * MIB;
    let base = create_raw(dir.path().join("base.raw"), size);
    base.write_random(0, 4 * MIB as usize, 21);
    base.write_pattern(4 * MIB, 4 * MIB, 0);
    let mid = qcow2(dir.path().join("mid.qcow2"), size)
        .backing_named(&base, "base.raw")
        .create();
    mid.write_pattern(0, 512 * KIB, 0); // stored zeros over base data
    mid.write_zeroes(MIB, 512 * KIB); // a zero cluster over base data
    mid.write_random(6 * MIB, 512 * KIB as usize, 22); // data over base zeros
    let top = qcow2(dir.path().join("top.qcow2"), size)
        .aes(PASS)
        .backing_named(&mid, "mid.qcow2")
        .create();
    top.write_random(3 * MIB, CLUSTER as usize, 23);
    let recorded = dir.path().join("chain.raw");
    top.convert_raw(&recorded);
    let raw = fs::read(&recorded).expect("read the chain's raw view");
    let expected = expected_zero_clusters(&raw, &data_below(&top), &own_data(&top));
    let base_bytes = fs::read(&base.path).expect("read base");
    let mid_bytes = fs::read(&mid.path).expect("read mid");

    let r = seal(&top.path, dir.path());
    let sealed = alone(&top);
    assert_sealed_as(&sealed, &recorded);
    assert_eq!(zero_clusters_reported(&r), expected, "{}", r.stdout_str());
    assert!(
        fs::read(&base.path).expect("base") == base_bytes
            && fs::read(&mid.path).expect("mid") == mid_bytes,
        "a backing file changed"
    );
    assert_unallocated(&sealed, 0, 512 * KIB, "the middle layer's stored zeros");
    assert_unallocated(
        &sealed,
        MIB,
        MIB + 512 * KIB,
        "the middle layer's zero cluster",
    );
    assert_unallocated(&sealed, 4 * MIB, 6 * MIB, "base zeros");
    assert_unallocated(&sealed, 6 * MIB + 512 * KIB, 8 * MIB, "base zeros after");
    assert!(
        overlaps(&own_data(&sealed), 6 * MIB, 6 * MIB + 512 * KIB),
        "the middle layer's data over base zeros was copied"
    );
}
