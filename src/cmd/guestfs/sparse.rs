//! A sparse guest file in the tar stream, as GNU tar writes one (the old GNU format, type `S`):
//! the header lists the data ranges (the first four in the header, the rest in 512-byte
//! extension blocks that follow it, 21 each) and the file's real size, and only the data is
//! stored. GNU tar, bsdtar, Python's tarfile and the `tar` crate read it; the stream is as long
//! as the data, never as the holes. Numbers too large for octal are written in base-256, as GNU
//! tar does. A file without holes is a plain entry (tar.rs).

use super::data::Range;

/// Ranges in the GNU header itself, and in each extension block.
const IN_HEADER: usize = 4;
const PER_EXTENSION: usize = 21;

/// Make `h` the header of a sparse file of `len` bytes with data in `ranges` (ordered, block
/// aligned but the last), and return the extension blocks that must follow it.
pub(crate) fn sparse_header(h: &mut tar::Header, ranges: &[Range], len: u64) -> Vec<u8> {
    let mut map: Vec<(u64, u64)> = ranges.iter().map(|r| (r.offset, r.len)).collect();
    // The map must reach the real size: a final hole is an empty range at the end.
    if map.last().is_none_or(|&(o, l)| o + l < len) {
        map.push((len, 0));
    }
    let stored: u64 = ranges.iter().map(|r| r.len).sum();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_size(stored);
    let (first, rest) = map.split_at(map.len().min(IN_HEADER));
    let mut extensions = Vec::new();
    if let Some(gnu) = h.as_gnu_mut() {
        for (slot, &(offset, len)) in gnu.sparse.iter_mut().zip(first) {
            slot.set_offset(offset);
            slot.set_length(len);
        }
        gnu.set_real_size(len);
        gnu.isextended[0] = u8::from(!rest.is_empty());
    }
    let blocks: Vec<&[(u64, u64)]> = rest.chunks(PER_EXTENSION).collect();
    for (i, chunk) in blocks.iter().enumerate() {
        let mut ext = tar::GnuExtSparseHeader::new();
        for (slot, &(offset, len)) in ext.sparse.iter_mut().zip(chunk.iter()) {
            slot.set_offset(offset);
            slot.set_length(len);
        }
        ext.set_is_extended(i + 1 < blocks.len());
        extensions.extend_from_slice(ext.as_bytes());
    }
    extensions
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A sparse entry built here, read back by the `tar` crate.
    fn round_trip(ranges: &[Range], len: u64) -> Vec<u8> {
        let data: Vec<u8> = ranges
            .iter()
            .flat_map(|r| (0..r.len).map(move |i| (r.offset + i) as u8 | 1))
            .collect();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        let ext = sparse_header(&mut h, ranges, len);
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut h, "f", ext.as_slice().chain(data.as_slice()))
            .unwrap();
        let bytes = b.into_inner().unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let mut entry = archive.entries().unwrap().next().unwrap().unwrap();
        let mut out = Vec::new();
        entry.read_to_end(&mut out).unwrap();
        out
    }

    fn expected(ranges: &[Range], len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        for r in ranges {
            for i in r.offset..r.offset + r.len {
                v[i as usize] = i as u8 | 1;
            }
        }
        v
    }

    #[test]
    fn sparse_entries_read_back_with_their_holes_and_extension_blocks() {
        let r = |offset, len| Range { offset, len };
        let few = [r(1024, 1024), r(8192, 100)];
        assert_eq!(round_trip(&few, 8292), expected(&few, 8292));
        // A final hole, and no data at all.
        assert_eq!(round_trip(&few[..1], 70_000), expected(&few[..1], 70_000));
        assert_eq!(round_trip(&[], 5000), vec![0u8; 5000]);
        // 60 ranges: the header's 4, then two extension blocks of 21 and one of 14.
        let many: Vec<Range> = (0..60).map(|i| r(i * 4096, 1024)).collect();
        assert_eq!(round_trip(&many, 60 * 4096), expected(&many, 60 * 4096));
    }

    #[test]
    fn offsets_past_8_gib_are_written_in_base_256() {
        let far = 1u64 << 40;
        let mut h = tar::Header::new_gnu();
        let ext = sparse_header(
            &mut h,
            &[Range {
                offset: far,
                len: 10,
            }],
            far + 10,
        );
        assert!(ext.is_empty());
        let gnu = h.as_gnu().unwrap();
        assert_eq!(gnu.sparse[0].offset().unwrap(), far);
        assert_eq!(gnu.real_size().unwrap(), far + 10);
        assert_eq!(h.entry_size().unwrap(), 10);
    }
}
