//! Structure-aware fuzzing: edits of named fields of a qcow2 image (header, header extensions, L1 and
//! L2 entries, refcount table entries, snapshot table entries, the LUKS header and its key slots),
//! located by walking the image the way a reader does. The cargo-fuzz target `fields` and the stable
//! test in tests/it/fuzz_images.rs both build edit lists and apply them here to qemu-img-made seeds.
//!
//! Locating is best effort: a field whose structure cannot be found in the (already edited) image is
//! left alone, and nothing ever grows the image.

/// Largest key-slot or master-key-digest iteration count an edit sets, so runs stay fast.
pub const MAX_EDIT_ITERATIONS: u64 = 64;

/// A field an edit can change. `Edit::index` picks the instance for fields that repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Version,
    BackingFileOffset,
    BackingFileSize,
    ClusterBits,
    Size,
    CryptMethod,
    L1Size,
    L1TableOffset,
    RefcountTableOffset,
    RefcountTableClusters,
    NbSnapshots,
    SnapshotsOffset,
    IncompatibleFeatures,
    CompatibleFeatures,
    AutoclearFeatures,
    RefcountOrder,
    HeaderLength,
    CompressionType,
    /// Type of the index-th header extension.
    ExtensionType,
    /// Length of the index-th header extension.
    ExtensionLength,
    /// The 64-bit payload of the index-th extension at byte (index / 16 % 2) * 8 (FDE offset/length).
    ExtensionData,
    L1Entry,
    /// An entry of an L2 table the L1 table points to (the table by index, the entry by index / tables).
    L2Entry,
    /// The subcluster bitmap of an extended L2 entry.
    L2Bitmap,
    RefcountTableEntry,
    /// An entry of the first refcount block, as a 64-bit word.
    RefcountBlockWord,
    SnapshotL1Offset,
    SnapshotL1Size,
    SnapshotIdLength,
    SnapshotNameLength,
    SnapshotExtraLength,
    SnapshotVmStateSize,
    SnapshotDiskSize,
    LuksPayloadOffset,
    LuksKeyBytes,
    LuksDigestIterations,
    LuksSlotState,
    LuksSlotIterations,
    LuksSlotMaterialOffset,
    LuksSlotStripes,
}

impl Field {
    pub const ALL: [Field; 40] = [
        Field::Version,
        Field::BackingFileOffset,
        Field::BackingFileSize,
        Field::ClusterBits,
        Field::Size,
        Field::CryptMethod,
        Field::L1Size,
        Field::L1TableOffset,
        Field::RefcountTableOffset,
        Field::RefcountTableClusters,
        Field::NbSnapshots,
        Field::SnapshotsOffset,
        Field::IncompatibleFeatures,
        Field::CompatibleFeatures,
        Field::AutoclearFeatures,
        Field::RefcountOrder,
        Field::HeaderLength,
        Field::CompressionType,
        Field::ExtensionType,
        Field::ExtensionLength,
        Field::ExtensionData,
        Field::L1Entry,
        Field::L2Entry,
        Field::L2Bitmap,
        Field::RefcountTableEntry,
        Field::RefcountBlockWord,
        Field::SnapshotL1Offset,
        Field::SnapshotL1Size,
        Field::SnapshotIdLength,
        Field::SnapshotNameLength,
        Field::SnapshotExtraLength,
        Field::SnapshotVmStateSize,
        Field::SnapshotDiskSize,
        Field::LuksPayloadOffset,
        Field::LuksKeyBytes,
        Field::LuksDigestIterations,
        Field::LuksSlotState,
        Field::LuksSlotIterations,
        Field::LuksSlotMaterialOffset,
        Field::LuksSlotStripes,
    ];
}

/// Set `field` (instance `index`) to `value`, cut to the field's width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edit {
    pub field: Field,
    pub index: u32,
    pub value: u64,
}

/// Values worth trying in any field: limits of the format, of QEMU and of integer widths.
pub const INTERESTING: [u64; 24] = [
    0,
    1,
    2,
    3,
    8,
    9,
    16,
    21,
    22,
    64,
    511,
    512,
    4096,
    65535,
    65536,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    0x00ff_ffff_ffff_fe00,
    0x4000_0000_0000_0000,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

fn get(data: &[u8], at: u64, width: usize) -> Option<u64> {
    let at = usize::try_from(at).ok()?;
    let bytes = data.get(at..at.checked_add(width)?)?;
    Some(bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
}

fn put(data: &mut [u8], at: u64, width: usize, value: u64) {
    let Ok(at) = usize::try_from(at) else { return };
    let Some(end) = at.checked_add(width) else {
        return;
    };
    if let Some(bytes) = data.get_mut(at..end) {
        bytes.copy_from_slice(&value.to_be_bytes()[8 - width..]);
    }
}

/// Where the image's structures are, as far as they can be found.
struct Map {
    cluster_size: u64,
    extended_l2: bool,
    /// (offset of the type field) of each header extension.
    extensions: Vec<u64>,
    l1_offset: u64,
    l1_entries: u64,
    l2_tables: Vec<u64>,
    refcount_table: u64,
    refcount_entries: u64,
    first_refcount_block: Option<u64>,
    /// Offset of each snapshot table entry.
    snapshots: Vec<u64>,
    luks: Option<u64>,
}

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const EXT_FDE: u64 = 0x0537_be77;

impl Map {
    fn of(data: &[u8]) -> Option<Map> {
        let version = get(data, 4, 4)?;
        let bits = get(data, 20, 4)?;
        if !(9..=21).contains(&bits) {
            return None;
        }
        let cluster_size = 1u64 << bits;
        let len = data.len() as u64;
        let (header_len, incompatible) = if version >= 3 {
            (get(data, 100, 4)?, get(data, 72, 8)?)
        } else {
            (72, 0)
        };
        let mut extensions = Vec::new();
        let mut luks = None;
        let mut at = header_len;
        while at + 8 <= cluster_size.min(len) && extensions.len() < 64 {
            let kind = get(data, at, 4)?;
            if kind == 0 {
                break;
            }
            let ext_len = get(data, at + 4, 4)?;
            if kind == EXT_FDE && ext_len == 16 {
                luks = get(data, at + 8, 8).filter(|&o| o < len);
            }
            extensions.push(at);
            at += 8 + ext_len.div_ceil(8) * 8;
        }
        let l1_offset = get(data, 40, 8)?;
        let l1_entries = get(data, 36, 4)?.min(len.saturating_sub(l1_offset) / 8);
        let l2_tables: Vec<u64> = (0..l1_entries.min(4096))
            .filter_map(|i| get(data, l1_offset + 8 * i, 8))
            .map(|e| e & OFFSET_MASK)
            .filter(|&o| o != 0 && o < len)
            .collect();
        let refcount_table = get(data, 48, 8)?;
        let refcount_entries =
            (get(data, 56, 4)? * cluster_size / 8).min(len.saturating_sub(refcount_table) / 8);
        let first_refcount_block = get(data, refcount_table, 8)
            .map(|e| e & OFFSET_MASK)
            .filter(|&o| o != 0 && o < len);
        let mut snapshots = Vec::new();
        let mut at = get(data, 64, 8)?;
        for _ in 0..get(data, 60, 4)?.min(64) {
            if at.saturating_add(40) > len {
                break;
            }
            snapshots.push(at);
            let id = get(data, at + 12, 2)?;
            let name = get(data, at + 14, 2)?;
            let extra = get(data, at + 36, 4)?;
            at = at.saturating_add((40 + extra + id + name).div_ceil(8) * 8);
        }
        Some(Map {
            cluster_size,
            extended_l2: incompatible & (1 << 4) != 0,
            extensions,
            l1_offset,
            l1_entries,
            l2_tables,
            refcount_table,
            refcount_entries,
            first_refcount_block,
            snapshots,
            luks,
        })
    }

    /// (offset, width) of the field an edit changes, if it can be found.
    fn locate(&self, field: Field, index: u32) -> Option<(u64, usize)> {
        let i = u64::from(index);
        let pick = |items: &[u64]| -> Option<u64> {
            (!items.is_empty()).then(|| items[(i % items.len() as u64) as usize])
        };
        let snapshot = |at: u64, width| pick(&self.snapshots).map(|s| (s + at, width));
        let slot = |at: u64, width| self.luks.map(|l| (l + 208 + 48 * (i % 8) + at, width));
        let entry_size = if self.extended_l2 { 16 } else { 8 };
        let l2 = |at: u64| {
            let n = self.l2_tables.len() as u64;
            let table = pick(&self.l2_tables)?;
            let entry = (i / n.max(1)) % (self.cluster_size / entry_size);
            Some((table + entry * entry_size + at, 8))
        };
        Some(match field {
            Field::Version => (4, 4),
            Field::BackingFileOffset => (8, 8),
            Field::BackingFileSize => (16, 4),
            Field::ClusterBits => (20, 4),
            Field::Size => (24, 8),
            Field::CryptMethod => (32, 4),
            Field::L1Size => (36, 4),
            Field::L1TableOffset => (40, 8),
            Field::RefcountTableOffset => (48, 8),
            Field::RefcountTableClusters => (56, 4),
            Field::NbSnapshots => (60, 4),
            Field::SnapshotsOffset => (64, 8),
            Field::IncompatibleFeatures => (72, 8),
            Field::CompatibleFeatures => (80, 8),
            Field::AutoclearFeatures => (88, 8),
            Field::RefcountOrder => (96, 4),
            Field::HeaderLength => (100, 4),
            Field::CompressionType => (104, 1),
            Field::ExtensionType => (pick(&self.extensions)?, 4),
            Field::ExtensionLength => (pick(&self.extensions)? + 4, 4),
            Field::ExtensionData => (pick(&self.extensions)? + 8 + (i / 16 % 2) * 8, 8),
            Field::L1Entry if self.l1_entries > 0 => {
                (self.l1_offset + 8 * (i % self.l1_entries), 8)
            }
            Field::L1Entry => return None,
            Field::L2Entry => l2(0)?,
            Field::L2Bitmap if self.extended_l2 => l2(8)?,
            Field::L2Bitmap => return None,
            Field::RefcountTableEntry if self.refcount_entries > 0 => {
                (self.refcount_table + 8 * (i % self.refcount_entries), 8)
            }
            Field::RefcountTableEntry => return None,
            Field::RefcountBlockWord => (
                self.first_refcount_block? + 8 * (i % (self.cluster_size / 8)),
                8,
            ),
            Field::SnapshotL1Offset => snapshot(0, 8)?,
            Field::SnapshotL1Size => snapshot(8, 4)?,
            Field::SnapshotIdLength => snapshot(12, 2)?,
            Field::SnapshotNameLength => snapshot(14, 2)?,
            Field::SnapshotVmStateSize => snapshot(32, 4)?,
            Field::SnapshotExtraLength => snapshot(36, 4)?,
            // The extra data's second word (after the 64-bit VM state size).
            Field::SnapshotDiskSize => snapshot(48, 8)?,
            Field::LuksPayloadOffset => (self.luks? + 104, 4),
            Field::LuksKeyBytes => (self.luks? + 108, 4),
            Field::LuksDigestIterations => (self.luks? + 164, 4),
            Field::LuksSlotState => slot(0, 4)?,
            Field::LuksSlotIterations => slot(4, 4)?,
            Field::LuksSlotMaterialOffset => slot(40, 4)?,
            Field::LuksSlotStripes => slot(44, 4)?,
        })
    }
}

/// Apply `edits` in order; each one locates its field in the image as the earlier ones left it.
pub fn apply(data: &mut [u8], edits: &[Edit]) {
    for edit in edits {
        let Some(map) = Map::of(data) else { return };
        let Some((at, width)) = map.locate(edit.field, edit.index) else {
            continue;
        };
        let value = match edit.field {
            Field::LuksDigestIterations | Field::LuksSlotIterations => {
                edit.value % (MAX_EDIT_ITERATIONS + 1)
            }
            _ => edit.value,
        };
        put(data, at, width, value);
    }
}

/// A copy of `seed` with `edits` applied.
pub fn edited(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut data = seed.to_vec();
    apply(&mut data, edits);
    data
}

/// PBKDF2 iterations opening the image's LUKS header would cost at most (each active slot, and the
/// master-key digest once per slot); 0 when there is no LUKS header to find.
pub fn luks_iterations(data: &[u8]) -> u64 {
    let Some(luks) = Map::of(data).and_then(|m| m.luks) else {
        return 0;
    };
    let digest = get(data, luks + 164, 4).unwrap_or(0);
    (0..8)
        .filter_map(|s| {
            let slot = luks + 208 + 48 * s;
            (get(data, slot, 4)? == 0x00ac_71f3).then(|| get(data, slot + 4, 4))?
        })
        .map(|iterations| iterations + digest)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 header (64 KiB clusters) with an FDE extension pointing at a LUKS header at 0x10000,
    /// one active key slot, and an L1 table at 0x30000 with one entry pointing at 0x40000.
    fn image() -> Vec<u8> {
        let mut b = vec![0u8; 5 << 16];
        b[..4].copy_from_slice(b"QFI\xfb");
        put(&mut b, 4, 4, 3);
        put(&mut b, 20, 4, 16);
        put(&mut b, 36, 4, 1);
        put(&mut b, 40, 8, 0x30000);
        put(&mut b, 48, 8, 0x20000);
        put(&mut b, 56, 4, 1);
        put(&mut b, 100, 4, 104);
        put(&mut b, 104, 4, EXT_FDE);
        put(&mut b, 108, 4, 16);
        put(&mut b, 112, 8, 0x10000);
        put(&mut b, 120, 8, 0x10000);
        put(&mut b, 0x10000 + 164, 4, 1000);
        put(&mut b, 0x10000 + 208, 4, 0x00ac_71f3);
        put(&mut b, 0x10000 + 212, 4, 5000);
        put(&mut b, 0x30000, 8, 0x40000 | 1 << 63);
        b
    }

    #[test]
    fn edits_header_fields_by_name() {
        let mut b = image();
        let edit = |field, value| Edit {
            field,
            index: 0,
            value,
        };
        apply(
            &mut b,
            &[
                edit(Field::BackingFileOffset, u64::MAX),
                edit(Field::NbSnapshots, 7),
            ],
        );
        assert_eq!(get(&b, 8, 8), Some(u64::MAX));
        assert_eq!(get(&b, 60, 4), Some(7));
    }

    #[test]
    fn finds_extensions_tables_and_luks_slots() {
        let mut b = image();
        let edits = [
            Edit {
                field: Field::ExtensionLength,
                index: 0,
                value: 0xffff_ffff,
            },
            Edit {
                field: Field::L2Entry,
                index: 3,
                value: 0x1234,
            },
        ];
        apply(&mut b, &edits);
        assert_eq!(get(&b, 108, 4), Some(0xffff_ffff));
        assert_eq!(get(&b, 0x40000 + 24, 8), Some(0x1234));
    }

    #[test]
    fn caps_the_iteration_counts_it_sets() {
        let mut b = image();
        apply(
            &mut b,
            &[Edit {
                field: Field::LuksSlotIterations,
                index: 0,
                value: u64::MAX,
            }],
        );
        assert!(get(&b, 0x10000 + 212, 4).unwrap() <= MAX_EDIT_ITERATIONS);
        assert!(luks_iterations(&b) <= MAX_EDIT_ITERATIONS + 1000);
        assert_eq!(luks_iterations(&image()), 6000);
    }

    #[test]
    fn leaves_fields_it_cannot_find_alone() {
        let mut b = image();
        let before = b.clone();
        apply(
            &mut b,
            &[Edit {
                field: Field::SnapshotL1Offset,
                index: 0,
                value: 1,
            }],
        );
        assert_eq!(b, before);
        let mut short = b"QFI".to_vec();
        apply(
            &mut short,
            &[Edit {
                field: Field::Version,
                index: 0,
                value: 9,
            }],
        );
        assert_eq!(short, b"QFI");
    }
}
