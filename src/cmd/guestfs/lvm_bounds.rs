//! The few fields of an LVM2 physical volume read before the lamlvm crate is let near it: the
//! label, the PV header's areas, and the committed metadata text's size and nesting. lamlvm
//! allocates the text at the size the disk claims (an abort for a hostile 2^60) and parses its
//! sections recursively (a stack overflow for a hostile `a{a{a{…`), so both are bounded here
//! first, as ext.rs bounds the ext2/3/4 superblock before ext4-view, reading what lamlvm will
//! read (the same label, the same areas, the same text). The format is LVM2's
//! (lib/format_text/layout.h); the data area's start is also what maps extents to bytes.

use crate::disk::BlockDevice;

/// Largest committed metadata text read. LVM2's default area is 1 MiB and a VG's text a few KiB
/// (about 1 KiB per LV); a larger one is refused rather than parsed.
pub(crate) const MAX_TEXT: u64 = 1 << 20;

/// Deepest nesting of `{` sections and `[` lists accepted: LVM2 writes at most five
/// (vg { logical_volumes { lv { segment1 { stripes [ … ] } } } }).
const MAX_DEPTH: usize = 16;

/// Largest extent accepted, in 512-byte sectors (LVM2's own limit is 16 GiB): lamlvm multiplies
/// it by 512 unchecked.
const MAX_EXTENT_SECTORS: u64 = 1 << 32;

/// The label sector: its magic, its own sector number, its checksum (over the bytes from
/// [`LABEL_CRC_FROM`]), where the PV header starts in the sector, and the label type.
const LABEL_MAGIC: &[u8; 8] = b"LABELONE";
const LABEL_SECTOR_AT: usize = 8;
const LABEL_CRC_AT: usize = 16;
const LABEL_CRC_FROM: usize = 20;
const LABEL_PVH_AT: usize = 20;
const LABEL_TYPE_AT: usize = 24;
const LABEL_TYPE: &[u8; 8] = b"LVM2 001";

/// The PV header: a 32-byte UUID and the PV's size, then the (offset, size) pairs.
const PVH_AREAS_AT: usize = 40;

/// The metadata area header: checksum (over the bytes after it), magic, version, its own
/// offset and size, then the first location (the committed text's offset, size, checksum,
/// flags).
const MDA_CRC_FROM: usize = 4;
const MDA_MAGIC_AT: usize = 4;
const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
const MDA_VERSION_AT: usize = 20;
const MDA_OFFSET_AT: usize = 24;
const MDA_SIZE_AT: usize = 32;
const MDA_TEXT_AT: usize = 40;
const MDA_TEXT_LEN_AT: usize = 48;
const MDA_TEXT_FLAGS_AT: usize = 60;
/// `RAW_LOCN_IGNORED`: the area is kept but not read.
const TEXT_IGNORED: u32 = 1;
const MDA_HEADER: u64 = 512;

/// LVM2's checksum: CRC-32 (reflected, 0xedb88320) from this seed, no final inversion.
const LVM_CRC_SEED: u32 = 0xf597_a6cf;

/// What was learnt: where the data area (the physical extents) starts, and the metadata areas
/// (offset, size), in bytes of the PV: no logical volume may overlap those or the label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PvLayout {
    pub data_start: u64,
    pub metadata: Vec<(u64, u64)>,
}

/// Why a PV is not given to lamlvm.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PvError {
    #[error("no LVM2 label with a sound checksum")]
    NoLabel,
    #[error("its header is damaged ({0})")]
    Header(&'static str),
    #[error("it has {0} data areas (LVM2 writes one)")]
    DataAreas(usize),
    #[error("its metadata text claims {0} bytes (qcowfs reads at most {MAX_TEXT})")]
    TextTooLong(u64),
    #[error("its metadata nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("its extent size claims {0} sectors")]
    ExtentSize(u64),
    #[error("it cannot be read: {0}")]
    Read(String),
    #[error("its metadata: {0}")]
    Metadata(String),
}

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

fn lvm_crc(data: &[u8]) -> u32 {
    let mut crc = LVM_CRC_SEED;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Reads `buf.len()` bytes at an offset of the PV.
type ReadPv<'a> = &'a dyn Fn(u64, &mut [u8]) -> Result<(), PvError>;

/// Check the PV in `len` bytes of `disk` from `start` as lamlvm will read it — the same label
/// (the first of four sectors whose magic, own sector number and checksum hold), the same
/// areas, the same committed text — for what lamlvm trusts: one data area, metadata text of at
/// most [`MAX_TEXT`] bytes nested at most [`MAX_DEPTH`] deep, an extent size it can multiply.
pub(crate) fn check(disk: &dyn BlockDevice, start: u64, len: u64) -> Result<PvLayout, PvError> {
    let read = |at: u64, buf: &mut [u8]| -> Result<(), PvError> {
        let end = at.checked_add(buf.len() as u64).filter(|&e| e <= len);
        if end.is_none() {
            return Err(PvError::Header("an area lies past the end of the volume"));
        }
        disk.read_at(start + at, buf)
            .map_err(|e| PvError::Read(e.to_string()))
    };
    let mut label = None;
    for s in 0..4u64 {
        let mut sector = [0u8; 512];
        read(s * 512, &mut sector)?;
        let sound = &sector[..8] == LABEL_MAGIC
            && &sector[LABEL_TYPE_AT..LABEL_TYPE_AT + 8] == LABEL_TYPE
            && u64_at(&sector, LABEL_SECTOR_AT) == Some(s)
            && u32_at(&sector, LABEL_CRC_AT) == Some(lvm_crc(&sector[LABEL_CRC_FROM..]));
        if sound {
            label = Some(sector);
            break;
        }
    }
    let label = label.ok_or(PvError::NoLabel)?;
    let pvh = u32_at(&label, LABEL_PVH_AT).unwrap_or(u32::MAX) as usize;
    let mut at = pvh.saturating_add(PVH_AREAS_AT);
    let mut lists: [Vec<(u64, u64)>; 2] = [Vec::new(), Vec::new()];
    for list in &mut lists {
        loop {
            let pair = u64_at(&label, at).zip(u64_at(&label, at + 8));
            let (offset, size) = pair.ok_or(PvError::Header("areas run past the label"))?;
            at += 16;
            if offset == 0 && size == 0 {
                break;
            }
            list.push((offset, size));
        }
    }
    let [data, metadata] = lists;
    let data_start = match data.as_slice() {
        [(offset, _)] if *offset < len => *offset,
        [_] => return Err(PvError::Header("the data area starts past the end")),
        _ => return Err(PvError::DataAreas(data.len())),
    };
    for &(offset, size) in &metadata {
        if offset.checked_add(size).is_none_or(|end| end > len) {
            return Err(PvError::Header("a metadata area lies past the end"));
        }
        check_text(&read, offset, size)?;
    }
    Ok(PvLayout {
        data_start,
        metadata,
    })
}

/// The committed text of the metadata area at `offset` (`size` bytes), found as lamlvm finds
/// it; an area lamlvm would refuse before reading its text (checksum, version, position, an
/// ignored or misplaced text) is left to it.
fn check_text(read: ReadPv, offset: u64, size: u64) -> Result<(), PvError> {
    let mut header = [0u8; MDA_HEADER as usize];
    read(offset, &mut header)?;
    let field = |o| u64_at(&header, o).unwrap_or(0);
    let readable = &header[MDA_MAGIC_AT..MDA_MAGIC_AT + 16] == MDA_MAGIC
        && u32_at(&header, 0) == Some(lvm_crc(&header[MDA_CRC_FROM..]))
        && u32_at(&header, MDA_VERSION_AT) == Some(1)
        && field(MDA_OFFSET_AT) == offset
        && field(MDA_SIZE_AT) <= size
        && u32_at(&header, MDA_TEXT_FLAGS_AT).unwrap_or(0) & TEXT_IGNORED == 0;
    if !readable {
        return Ok(());
    }
    let area = field(MDA_SIZE_AT);
    let (text_at, text_len) = (field(MDA_TEXT_AT), field(MDA_TEXT_LEN_AT));
    if text_at < MDA_HEADER || text_at >= area || text_len > area - MDA_HEADER {
        return Ok(());
    }
    if text_len > MAX_TEXT {
        return Err(PvError::TextTooLong(text_len));
    }
    // The text may wrap from the area's end to just after its header.
    let mut text = vec![0u8; text_len as usize];
    let first = text_len.min(area - text_at) as usize;
    read(offset + text_at, &mut text[..first])?;
    if first < text.len() {
        read(offset + MDA_HEADER, &mut text[first..])?;
    }
    if nesting(&text) > MAX_DEPTH {
        return Err(PvError::TooDeep);
    }
    match largest_extent_size(&text) {
        Some(n) if n > MAX_EXTENT_SECTORS => Err(PvError::ExtentSize(n)),
        _ => Ok(()),
    }
}

/// The deepest nesting of `{` and `[` in metadata text, as lamlvm's grammar nests them: a `#`
/// starts a comment (to the end of the line) only where lamlvm skips whitespace — after
/// whitespace, a bracket or `=`, or a `,` inside a list — else it is part of a name; a `"`
/// starts a string only where a value may start (after `=`, `[`, or `,` inside a list). Where
/// this reading and lamlvm's could differ, this one counts more, never less.
fn nesting(text: &[u8]) -> usize {
    let mut open: Vec<u8> = Vec::new();
    let mut deepest = 0usize;
    let (mut in_comment, mut in_string) = (false, false);
    // The byte before (None at the start), and the last one that was not whitespace.
    let (mut prev, mut prev_solid): (Option<u8>, Option<u8>) = (None, None);
    for &c in text {
        if in_comment {
            // lamlvm ends a comment at a line end; a lone '\r' ends it here too, which can
            // only count more.
            in_comment = c != b'\n' && c != b'\r';
            prev = Some(c);
            continue;
        }
        if in_string {
            if c == b'"' {
                in_string = false;
                prev_solid = Some(c);
            }
            prev = Some(c);
            continue;
        }
        let in_list = open.last() == Some(&b'[');
        match c {
            b' ' | b'\t' | b'\r' | b'\n' => {
                prev = Some(c);
                continue;
            }
            b'#' => {
                in_comment = match prev {
                    None
                    | Some(b' ' | b'\t' | b'\r' | b'\n' | b'{' | b'}' | b'[' | b']' | b'=') => true,
                    Some(b',') => in_list,
                    _ => false,
                };
            }
            b'"' => {
                in_string = match prev_solid {
                    Some(b'=' | b'[') => true,
                    Some(b',') => in_list,
                    _ => false,
                };
            }
            b'{' | b'[' => {
                open.push(c);
                deepest = deepest.max(open.len());
            }
            b'}' | b']' => {
                open.pop();
            }
            _ => {}
        }
        prev = Some(c);
        prev_solid = Some(c);
    }
    deepest
}

/// The largest value given to `extent_size` anywhere in the text (comments and strings
/// included: a false match only refuses more), or None.
fn largest_extent_size(text: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"extent_size";
    let mut largest = None;
    let mut from = 0;
    while let Some(i) = text[from..].windows(KEY.len()).position(|w| w == KEY) {
        let mut at = from + i + KEY.len();
        from = at;
        let mut seen_equals = false;
        // Whitespace, comments and one '=' may come before the number.
        while let Some(&c) = text.get(at) {
            match c {
                b' ' | b'\t' | b'\r' | b'\n' => at += 1,
                b'#' => {
                    while text.get(at).is_some_and(|&c| c != b'\n') {
                        at += 1;
                    }
                }
                b'=' if !seen_equals => {
                    seen_equals = true;
                    at += 1;
                }
                _ => break,
            }
        }
        let digits = text[at..].iter().take_while(|c| c.is_ascii_digit()).count();
        if seen_equals && digits > 0 {
            let n = std::str::from_utf8(&text[at..at + digits])
                .ok()
                .and_then(|d| d.parse::<u64>().ok())
                .unwrap_or(u64::MAX);
            largest = largest.max(Some(n));
        }
    }
    largest
}

#[cfg(test)]
mod tests {
    use super::{largest_extent_size, nesting, MAX_DEPTH};

    #[test]
    fn nesting_counts_sections_and_lists_but_not_strings_or_comments() {
        let text = b"vg {\n  # a { comment [\n  id = \"{[{\"\n  lvs { root { seg { stripes = [\"pv0\", 0] } } }\n}\n";
        assert_eq!(nesting(text), 5);
        let hostile: Vec<u8> = b"a{".repeat(100_000);
        assert!(nesting(&hostile) > MAX_DEPTH);
    }

    #[test]
    fn a_hash_or_quote_inside_a_name_hides_nothing() {
        // lamlvm reads `x#` and `x"` as names: the brackets after them nest.
        let lists = [&b"a = "[..], &b"[".repeat(50)].concat();
        for hostile in [b"x#{".repeat(50), b"x\"{".repeat(50), lists] {
            assert!(
                nesting(&hostile) > MAX_DEPTH,
                "{}",
                String::from_utf8_lossy(&hostile)
            );
        }
        // A ',' outside a list is part of a name too.
        assert!(nesting(&b"x,#{".repeat(50)) > MAX_DEPTH);
        assert!(nesting(&b"x,\"{".repeat(50)) > MAX_DEPTH);
        // A lone '\r' ends a comment here (lamlvm fails the comment and reads on).
        assert!(nesting(&b"#\r{".repeat(50)) > MAX_DEPTH);
    }

    #[test]
    fn extent_sizes_are_found_past_comments() {
        assert_eq!(largest_extent_size(b"extent_size = 8192\n"), Some(8192));
        let text = b"a { extent_size = # c\n 99999999999999999999\n }";
        assert_eq!(largest_extent_size(text), Some(u64::MAX));
        assert_eq!(largest_extent_size(b"id = 1"), None);
    }
}
