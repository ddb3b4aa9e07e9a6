//! Deterministic test data: a seeded generator, incompressible and guest-like bytes.

/// splitmix64: small, seeded, good enough to make test data that no two offsets share.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `len` incompressible bytes from `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// `len` bytes that compress to roughly a third (words from a small vocabulary, runs of one byte,
/// some noise), so compressed clusters have varied, unaligned lengths.
pub fn compressible_bytes(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&[u8]; 12] = [
        b"qcow2 ",
        b"cluster ",
        b"backing ",
        b"refcount ",
        b"\n",
        b"L2 ",
        b"zstd ",
        b"zlib ",
        b"snapshot ",
        b"guest ",
        b"sector ",
        b"nova ",
    ];
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(len + 64);
    while v.len() < len {
        match rng.below(10) {
            0 => {
                let n = rng.range(1, 40) as usize;
                let b = rng.next_u64() as u8;
                v.resize(v.len() + n, b);
            }
            1 => {
                let mut noise = [0u8; 8];
                rng.fill(&mut noise);
                v.extend_from_slice(&noise);
            }
            _ => v.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize]),
        }
    }
    v.truncate(len);
    v
}
