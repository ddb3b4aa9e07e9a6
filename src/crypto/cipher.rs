//! What every sector cipher is (`SectorCipher`), the sector it works in, and the test that tells a
//! decrypted sector from the noise a wrong key makes.

use super::error::CryptoError;

/// The sector size every QEMU block cipher works in.
pub const SECTOR_SIZE: usize = 512;

/// View a buffer of whole 16-byte blocks as AES blocks, in place.
pub(crate) fn as_blocks(
    buf: &mut [u8],
) -> &mut [aes::cipher::generic_array::GenericArray<u8, aes::cipher::consts::U16>] {
    debug_assert_eq!(buf.len() % 16, 0);
    // SAFETY: GenericArray<u8, U16> is a transparent [u8; 16] with alignment 1, and only whole blocks
    // (len / 16 of them) are covered.
    unsafe {
        std::slice::from_raw_parts_mut(
            buf.as_mut_ptr()
                as *mut aes::cipher::generic_array::GenericArray<u8, aes::cipher::consts::U16>,
            buf.len() / 16,
        )
    }
}

/// A block cipher that encrypts and decrypts in place, sector by sector.
pub trait SectorCipher: Send + Sync + std::fmt::Debug {
    /// Decrypt `buf` (a whole number of sectors) whose first sector has number `first_sector`.
    fn decrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<(), CryptoError>;
    /// Encrypt `buf` (a whole number of sectors) whose first sector has number `first_sector`.
    fn encrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<(), CryptoError>;
}

/// Does a decrypted sector look like real data rather than the noise a wrong key produces? Real
/// sectors (file systems, text, binaries) have many zero bytes or a skewed byte distribution; AES
/// output is uniform: about 2 zero bytes and 7.5+ bits of entropy per byte in 512 bytes.
pub fn looks_like_plaintext(sector: &[u8]) -> bool {
    let mut counts = [0u32; 256];
    for &b in sector {
        counts[b as usize] += 1;
    }
    if counts[0] as usize >= sector.len() / 32 {
        return true;
    }
    let n = sector.len() as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    entropy < 7.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::QcowAes;

    #[test]
    fn recognises_noise_and_plaintext() {
        let cipher = QcowAes::new(b"key");
        let mut noise = vec![0u8; 512];
        cipher.encrypt(0, &mut noise).unwrap();
        let mut more = noise.clone();
        cipher.encrypt(1, &mut more).unwrap();
        assert!(!looks_like_plaintext(&noise));
        assert!(!looks_like_plaintext(&more));
        let text: Vec<u8> = b"# /etc/fstab: static file system information.\n"
            .iter()
            .cycle()
            .take(512)
            .copied()
            .collect();
        assert!(looks_like_plaintext(&text));
        assert!(looks_like_plaintext(&[0xab; 512]));
    }
}
