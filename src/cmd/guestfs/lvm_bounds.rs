//! The few fields of an LVM2 physical volume read before the lamlvm crate is let near it: the
//! label, the PV header's areas, and the committed metadata text's size and nesting. lamlvm
//! allocates the text at the size the disk claims (an abort for a hostile 2^60) and parses its
//! sections recursively (a stack overflow for a hostile `a{a{a{…`), so both are bounded here
//! first, as ext.rs bounds the ext2/3/4 superblock before ext4-view. The format is LVM2's
//! (lib/format_text/layout.h); the data area's start is also what maps extents to bytes.

use crate::disk::BlockDevice;

/// Largest committed metadata text read. LVM2's default area is 1 MiB and a VG's text a few KiB
/// (about 1 KiB per LV); a larger one is refused rather than parsed.
pub(crate) const MAX_TEXT: u64 = 1 << 20;

/// Deepest nesting of `{` sections and `[` lists accepted: LVM2 writes at most five
/// (vg { logical_volumes { lv { segment1 { stripes [ … ] } } } }).
const MAX_DEPTH: usize = 16;

/// The PV header's descriptors end at a zero pair; no PV LVM2 writes has more than two of each.
const MAX_DESCRIPTORS: usize = 8;

/// The metadata area header's magic, after its checksum.
const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";

/// What was learnt: where the data area (the physical extents) starts, in bytes of the PV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PvLayout {
    pub data_start: u64,
}

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// Check the PV in `len` bytes of `disk` from `start` for what lamlvm would trust: its label,
/// one data area inside the PV, metadata areas inside it, and committed text of at most
/// [`MAX_TEXT`] bytes nested at most [`MAX_DEPTH`] deep. Err: why it is refused.
pub(crate) fn check(disk: &dyn BlockDevice, start: u64, len: u64) -> Result<PvLayout, String> {
    let read = |at: u64, buf: &mut [u8]| -> Result<(), String> {
        let end = at.checked_add(buf.len() as u64).filter(|&e| e <= len);
        if end.is_none() {
            return Err(format!("it points past its own end ({at})"));
        }
        disk.read_at(start + at, buf).map_err(|e| e.to_string())
    };
    let mut sector = [0u8; 512];
    let mut found = None;
    for s in 0..4u64 {
        read(s * 512, &mut sector)?;
        if &sector[..8] == b"LABELONE" && &sector[24..32] == b"LVM2 001" {
            found = Some(sector);
            break;
        }
    }
    let label = found.ok_or("no LVM2 label")?;
    let pvh_at = u32_at(&label, 20).unwrap_or(0) as usize;
    // The PV header: 32-byte uuid, the PV's size, then data areas and metadata areas as
    // (offset, size) pairs, each list ended by a zero pair.
    let mut at = pvh_at + 40;
    let mut lists: [Vec<(u64, u64)>; 2] = [Vec::new(), Vec::new()];
    for list in &mut lists {
        loop {
            let pair = u64_at(&label, at).zip(u64_at(&label, at + 8));
            let (offset, size) = pair.ok_or("its header runs past the label sector")?;
            at += 16;
            if offset == 0 && size == 0 {
                break;
            }
            if list.len() == MAX_DESCRIPTORS {
                return Err("its header lists too many areas".into());
            }
            list.push((offset, size));
        }
    }
    let [data, metadata] = lists;
    let data_start = match data.as_slice() {
        [(offset, _)] if *offset < len => *offset,
        [_] => return Err("its data area starts past its end".into()),
        _ => {
            return Err(format!(
                "it has {} data areas (LVM2 writes one)",
                data.len()
            ))
        }
    };
    if metadata.is_empty() {
        return Err("it has no metadata area".into());
    }
    for (offset, size) in metadata {
        if offset.checked_add(size).is_none_or(|end| end > len) {
            return Err("a metadata area lies past its end".into());
        }
        check_text(&read, offset, size)?;
    }
    Ok(PvLayout { data_start })
}

/// Reads `buf.len()` bytes at an offset of the PV.
type ReadPv<'a> = &'a dyn Fn(u64, &mut [u8]) -> Result<(), String>;

/// The committed text of the metadata area at `offset` (`size` bytes): within [`MAX_TEXT`] and
/// [`MAX_DEPTH`]. A damaged header is left to lamlvm, which checks its checksums.
fn check_text(read: ReadPv, offset: u64, size: u64) -> Result<(), String> {
    let mut header = [0u8; 512];
    read(offset, &mut header)?;
    if &header[4..20] != MDA_MAGIC {
        return Ok(());
    }
    // The first location: the committed text's offset in the area, and its size.
    let (Some(text_at), Some(text_len)) = (u64_at(&header, 40), u64_at(&header, 48)) else {
        return Ok(());
    };
    if text_len > MAX_TEXT {
        return Err(format!(
            "its metadata text claims {text_len} bytes (qcowfs reads at most {MAX_TEXT})"
        ));
    }
    if text_at < 512 || text_at >= size {
        return Ok(());
    }
    // The text may wrap from the area's end to just after its header.
    let mut text = vec![0u8; text_len as usize];
    let first = text_len.min(size - text_at) as usize;
    read(offset + text_at, &mut text[..first])?;
    if first < text.len() {
        read(offset + 512, &mut text[first..])?;
    }
    match nesting(&text) <= MAX_DEPTH {
        true => Ok(()),
        false => Err(format!("its metadata nests deeper than {MAX_DEPTH} levels")),
    }
}

/// The deepest nesting of `{` and `[` in metadata text, outside strings and comments.
fn nesting(text: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut in_comment) = (false, false);
    for &c in text {
        match c {
            b'\n' => in_comment = false,
            _ if in_comment => {}
            b'"' => in_string = !in_string,
            _ if in_string => {}
            b'#' => in_comment = true,
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::{nesting, MAX_DEPTH};

    #[test]
    fn nesting_counts_sections_and_lists_but_not_strings_or_comments() {
        let text = b"vg {\n  # a { comment [\n  id = \"{[{\"\n  lvs { root { seg { stripes = [\"pv0\", 0] } } }\n}\n";
        assert_eq!(nesting(text), 5);
        let hostile: Vec<u8> = b"a{".repeat(100_000);
        assert!(nesting(&hostile) > MAX_DEPTH);
    }
}
