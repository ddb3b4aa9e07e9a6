//! Tables of big-endian 64-bit words as qcow2 stores them (L1 and L2 tables, the refcount table):
//! one decoder, one encoder, and the loader of a table that must lie inside the file.

use crate::error::Result;
use crate::io::HostFile;

/// The words of `raw`, big-endian; a trailing partial word is ignored.
pub(super) fn decode_words(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

/// The stored bytes of `words`.
pub(super) fn encode_words(words: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.len() * 8);
    for w in words {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out
}

/// Read the `count` words of the table at `offset`; all of it must be inside the file.
pub(super) fn read_words(file: &HostFile, offset: u64, count: usize) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; count * 8];
    file.read_exact_at(offset, &mut raw)?;
    Ok(decode_words(&raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_decodes_big_endian_words() {
        let words = [0, 1, 0x8000_0000_0003_0000, u64::MAX];
        let bytes = encode_words(&words);
        assert_eq!(&bytes[8..16], &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(&bytes[16..24], &[0x80, 0, 0, 0, 0, 3, 0, 0]);
        assert_eq!(decode_words(&bytes), words);
    }

    #[test]
    fn decoding_ignores_a_trailing_partial_word() {
        assert_eq!(decode_words(&[0, 0, 0, 0, 0, 0, 0, 7, 1, 2, 3]), [7]);
    }

    #[test]
    fn reads_a_table_inside_the_file_and_refuses_one_past_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut bytes = vec![0u8; 64];
        bytes[16..32].copy_from_slice(&encode_words(&[5, 6]));
        std::fs::write(&path, bytes).unwrap();
        let file = HostFile::open(&path, false).unwrap();
        assert_eq!(read_words(&file, 16, 2).unwrap(), [5, 6]);
        assert_eq!(read_words(&file, 0, 0).unwrap(), Vec::<u64>::new());
        assert!(read_words(&file, 56, 2).is_err());
    }
}
